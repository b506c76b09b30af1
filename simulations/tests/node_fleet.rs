//! Many instances of the node's state machine wired together by the simulator's fake
//! network and clock, as quinn-proto tests a connection pair: publish, gossip, fetch, stage, waves, activation, gates,
//! advance or roll back; partitions, restarts, late joiners, a version that does not load,
//! a liar. No processes; deterministic; seconds to run.

use proptest::prelude::*;
use slmesh_protocol::cohort::{cohort, wave_of};
use slmesh_protocol::fleet::{CommandAction, GateVerdict, RolloutCommand, SignedCommand};
use slmesh_protocol::history::{HistoryKind, Outcome};
use slmesh_protocol::mesh::{GossipVerdict, TOPIC_COMMANDS, TOPIC_METRICS};
use slmesh_protocol::rollout::{Gates, RolloutPhase, Wave};
use slmesh_protocol::trust::DEFAULT_FLEET;
use slmesh_sim::fleet::{CrashPoint, FleetSpec, NodeFleet as Fleet, MODEL};
use slmesh_sim::scenario::Behaviour;
use std::collections::BTreeSet;

const MS: u64 = 1000;

fn on_v1(n: usize) -> Fleet {
    let f = Fleet::on_v1(FleetSpec::lan(n));
    for i in 0..n {
        assert_eq!(f.active(i), Some(1), "node {i} is not on v1: {:#?}", f.events_of(i));
    }
    f
}

fn bad(error_rate: f64) -> Behaviour {
    Behaviour { latency_median_secs: 0.2, ttft_median_secs: 0.05, tokens_per_sec: 50.0, error_rate }
}

/// Every node that serves `version` joined it in a wave that was open at that moment.
fn assert_served_only_in_open_waves(f: &Fleet, version: u64) {
    for i in f.live() {
        let Some(record) = f.node(i).version_record(MODEL, version) else { continue };
        for (at, v) in &f.nodes[i].served {
            if *v != version {
                continue;
            }
            let wave = record.my_wave.unwrap_or_else(|| panic!("node {i} served v{version} with no wave")) as usize;
            let opened = record.opened.get(wave).unwrap_or_else(|| panic!("node {i}: wave {wave} never opened"));
            let at = Fleet::unix_secs(*at);
            assert!(at >= *opened, "node {i} served v{version} at {at} before its wave opened at {opened}");
        }
    }
}

fn three_waves() -> Vec<(f64, u64)> {
    vec![(0.34, 5), (0.67, 5), (1.0, 0)]
}

#[test]
fn a_good_version_goes_through_its_waves() {
    let mut f = on_v1(6);
    let m = f.manifest(2, &three_waves(), Fleet::quick_gates(2));
    f.publish(0, m).expect("publish");
    f.run_for(4_000 * MS);
    let canaries: Vec<usize> = f.live().filter(|i| f.active(*i) == Some(2)).collect();
    assert!(canaries.len() >= 2 && canaries.len() < 6, "canary after 4 s: {canaries:?}");
    f.run_for(40_000 * MS);
    for i in 0..6 {
        assert_eq!(f.active(i), Some(2), "node {i}: {:#?}", f.events_of(i));
    }
    let record = f.node(3).version_record(MODEL, 2).expect("record");
    assert_eq!(record.opened.len(), 3);
    assert!(record.opened[1] >= record.opened[0] + 5, "the canary soaked: {:?}", record.opened);
    assert_served_only_in_open_waves(&f, 2);
    // v1 stays on disk as the previous version everywhere.
    assert!(f.live().all(|i| f.node(i).model(MODEL).is_some_and(|m| m.previous == Some(1))));
}

/// Version 2 ran on some nodes but not all, every node is back on version 1, and each
/// holds v2 halted for `reason`: the nodes that ran it.
fn halted_in_its_canary(f: &Fleet, reason: &str) -> Vec<usize> {
    let n = f.nodes.len();
    let ever: Vec<usize> = (0..n).filter(|i| f.nodes[*i].served.iter().any(|(_, v)| *v == 2)).collect();
    assert!(!ever.is_empty() && ever.len() < n, "only the canary ran v2: {ever:?}");
    for i in 0..n {
        assert_eq!(f.active(i), Some(1), "node {i} is back on v1");
        let record = f.node(i).version_record(MODEL, 2).expect("record");
        assert!(record.halted.as_deref().is_some_and(|h| h.contains(reason)), "{record:?}");
    }
    ever
}

#[test]
fn a_bad_version_halts_in_its_canary_and_rolls_back() {
    let mut f = on_v1(6);
    f.behaviour.insert(2, bad(0.5));
    let m = f.manifest(2, &[(0.34, 20), (1.0, 0)], Fleet::quick_gates(2));
    f.publish(0, m).expect("publish");
    f.run_for(60_000 * MS);
    let ever = halted_in_its_canary(&f, "error rate");
    for i in 0..6 {
        let record = f.node(i).version_record(MODEL, 2).expect("record");
        assert_eq!(record.opened.len(), 1, "wave 2 never opened");
    }
    for i in ever.iter().copied() {
        assert_eq!(f.node(i).version_record(MODEL, 2).expect("record").phase, RolloutPhase::RolledBack);
    }
    // A canary node's history says what it decided, in order, and why.
    let kinds: Vec<&HistoryKind> =
        f.nodes[ever[0]].history.iter().filter(|e| e.version == 2).map(|e| &e.kind).collect();
    let at = |want: &dyn Fn(&HistoryKind) -> bool| kinds.iter().position(|k| want(k));
    let opened = at(&|k| matches!(k, HistoryKind::WaveOpened { wave: 1, waves: 2 })).expect("wave 1 opened");
    let activated = at(&|k| matches!(k, HistoryKind::Activated)).expect("activated");
    let failed = at(&|k| matches!(k, HistoryKind::Verdict { outcome: Outcome::Fail, .. })).expect("a failing verdict");
    let halted = at(&|k| matches!(k, HistoryKind::Halted { reason } if reason.contains("error rate"))).expect("halted");
    assert!(opened < activated && activated < failed && failed < halted, "{kinds:?}");
    let Some(HistoryKind::Verdict { figures, .. }) = kinds.get(failed) else { unreachable!() };
    assert!(figures.nodes_measured >= 2 && figures.median_error_rate.is_some_and(|r| r > 0.1), "{figures:?}");
    let v1 = f.nodes[ever[0]].history.iter().filter(|e| e.version == 1).map(|e| &e.kind);
    assert!(v1.clone().any(|k| matches!(k, HistoryKind::RolledBack { from: 2 })), "{:?}", v1.collect::<Vec<_>>());
    let outside = (0..6).find(|i| !ever.contains(i)).expect("a node outside the canary");
    assert!(
        !f.nodes[outside].history.iter().any(|e| e.version == 2 && matches!(e.kind, HistoryKind::Activated)),
        "a node outside the canary never activated v2"
    );
}

fn suite(cases: usize) -> slmesh_protocol::eval::EvalSuite {
    let lines: String = (0..cases).map(|i| format!("{{\"prompt\": \"q{i}\", \"exact\": \"a{i}\"}}\n")).collect();
    slmesh_protocol::eval::EvalSuite::parse_jsonl(&lines).expect("suite")
}

#[test]
fn a_version_that_answers_wrongly_is_halted_in_its_canary_by_its_suite_and_a_good_one_passes() {
    let mut f = on_v1(6);
    // Fast and error-free, but wrong: 2 of 10 cases pass.
    f.wrong_answers.insert(2, 0.2);
    let gates = Gates { min_eval_pass_rate: Some(0.8), ..Fleet::quick_gates(2) };
    let m = f.manifest_with_suite(2, &[(0.34, 20), (1.0, 0)], gates.clone(), Some(suite(10)));
    f.publish(0, m).expect("publish");
    f.run_for(60_000 * MS);
    let ever = halted_in_its_canary(&f, "evaluation suite passed 20%");
    // The canary's history has its own counts, and the verdict the median of theirs.
    let canary = &f.nodes[ever[0]].history;
    assert!(canary.iter().any(|e| e.version == 2 && e.kind == HistoryKind::Evaluated { passed: 2, cases: 10 }));
    let figures = canary.iter().find_map(|e| match &e.kind {
        HistoryKind::Verdict { outcome: Outcome::Fail, figures, .. } if e.version == 2 => Some(figures.clone()),
        _ => None,
    });
    let figures = figures.expect("a failing verdict");
    assert!(figures.nodes_evaluated >= 2 && figures.median_eval_pass_rate == Some(0.2), "{figures:?}");
    // A good version with the same suite goes everywhere; each node ran the suite once.
    let m = f.manifest_with_suite(3, &[(0.34, 5), (1.0, 0)], gates, Some(suite(10)));
    f.publish(0, m).expect("publish");
    f.run_for(60_000 * MS);
    for i in 0..6 {
        assert_eq!(f.active(i), Some(3), "node {i}: {:#?}", f.events_of(i));
        let runs =
            f.nodes[i].history.iter().filter(|e| e.version == 3 && matches!(e.kind, HistoryKind::Evaluated { .. }));
        assert_eq!(runs.count(), 1, "node {i}");
    }
    let view = f.node(0).rollouts().iter().find(|r| r.version == 3).expect("view").clone();
    assert_eq!(view.figures.median_eval_pass_rate, Some(1.0), "{view:?}");
    // Two releases later (v3 previous, v4 active), nobody reports v2's counts any more.
    assert!(f.node(0).fleet().summary(MODEL, 2).per_node.iter().any(|n| n.eval_pass_rate.is_some()));
    let m = f.manifest_with_suite(4, &[(1.0, 0)], Fleet::quick_gates(2), Some(suite(10)));
    f.publish(0, m).expect("publish");
    f.run_for(60_000 * MS);
    assert!((0..6).all(|i| f.active(i) == Some(4)));
    let v2 = f.node(0).fleet().summary(MODEL, 2);
    assert!(v2.per_node.iter().all(|n| n.eval_pass_rate.is_none()), "{v2:?}");
}

#[test]
fn a_suite_that_compares_halts_a_version_that_passes_fewer_cases_than_the_one_it_replaces() {
    let mut f = on_v1(6);
    // 7 of 10 cases: above the minimum of 50%, but v1 passes all 10.
    f.wrong_answers.insert(2, 0.7);
    let gates = Gates { min_eval_pass_rate: Some(0.5), ..Fleet::quick_gates(2) };
    let mut comparing = suite(10);
    comparing.compare_with_previous = true;
    let m = f.manifest_with_suite(2, &[(0.34, 20), (1.0, 0)], gates.clone(), Some(comparing.clone()));
    f.publish(0, m).expect("publish");
    f.run_for(60_000 * MS);
    let ever = halted_in_its_canary(&f, "3 case(s) fewer than the previous version");
    let texts: Vec<&str> = f.nodes[ever[0]].history.iter().map(|e| e.text.as_str()).collect();
    assert!(texts.iter().any(|t| t.contains("7 of 10 case(s) passed (the version served before: 10)")), "{texts:#?}");
    // Without the comparison the same version passes its suite.
    let m = f.manifest_with_suite(3, &[(0.34, 5), (1.0, 0)], gates, Some(suite(10)));
    f.wrong_answers.insert(3, 0.7);
    f.publish(0, m).expect("publish");
    f.run_for(60_000 * MS);
    assert!((0..6).all(|i| f.active(i) == Some(3)), "{:#?}", f.events_of(0));
}

/// The nodes of `f` in the first `k` of the cohort order of `version` (its canary, when
/// the canary holds `k` nodes).
fn first_in_cohort(f: &Fleet, version: u64, k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = f.live().collect();
    order.sort_by(|a, b| cohort(&f.id(*a), MODEL, version).total_cmp(&cohort(&f.id(*b), MODEL, version)));
    order.truncate(k);
    order
}

#[test]
fn a_version_that_answers_unlike_its_baseline_is_halted_by_shadow_comparison_and_a_good_one_passes() {
    let mut f = on_v1(7);
    // Fast and error-free, but 8 answers in 10 unlike the previous version's.
    f.wrong_answers.insert(2, 0.2);
    // A canary of three (the gates' minimum), one of which claims full agreement.
    let agreement = slmesh_protocol::shadow::AgreementGate { min: 0.5, sample: 0.5 };
    let gates = Gates { agreement: Some(agreement), ..Fleet::quick_gates(3) };
    let canary = first_in_cohort(&f, 2, 3);
    f.nodes[canary[1]].flatterer = true;
    let m = f.manifest(2, &[(0.01, 20), (1.0, 0)], gates.clone());
    f.publish(0, m).expect("publish");
    f.run_for(60_000 * MS);
    let ever = halted_in_its_canary(&f, "agreement with the previous version 0.1");
    assert_eq!(
        ever,
        {
            let mut c = canary.clone();
            c.sort();
            c
        },
        "the canary"
    );
    for i in &canary {
        let events = f.events_of(*i);
        let started =
            events.iter().any(|e| e.contains("v2: shadow comparison: 50% of requests answered again by version 1"));
        assert!(started, "node {i}: {events:#?}");
        assert!(f.nodes[*i].shadowing.is_none(), "node {i} still shadows after the halt");
    }
    for i in (0..7).filter(|i| !canary.contains(i)) {
        assert!(!f.events_of(i).iter().any(|e| e.contains("shadow comparison")), "node {i} outside the canary");
    }
    // A good version with the same gate goes everywhere; its canary compared with v1 and
    // stopped once the next wave opened.
    f.nodes[canary[1]].flatterer = false;
    let m = f.manifest(3, &[(0.01, 10), (1.0, 0)], gates);
    f.publish(0, m).expect("publish");
    f.run_for(60_000 * MS);
    for i in 0..7 {
        assert_eq!(f.active(i), Some(3), "node {i}: {:#?}", f.events_of(i));
        assert!(f.nodes[i].shadowing.is_none(), "node {i} still shadows");
    }
    let view = f.node(0).rollouts().iter().find(|r| r.version == 3).expect("view").clone();
    assert!(view.figures.nodes_compared >= 3, "{view:?}");
    assert!(view.figures.median_agreement.is_some_and(|a| a > 0.85), "{view:?}");
    let canary3 = first_in_cohort(&f, 3, 3);
    for i in &canary3 {
        let events = f.events_of(*i);
        assert!(
            events.iter().any(|e| e.contains("v3: shadow comparison with version 1 ended")),
            "node {i}: {events:#?}"
        );
    }
}

#[test]
fn a_node_whose_budget_cannot_hold_the_baseline_does_not_shadow_and_says_why() {
    let mut spec = FleetSpec::lan(4);
    // The simulated weights are larger than a byte.
    spec.node_config.shadow_max_weights_bytes = 1;
    let mut f = Fleet::on_v1(spec);
    let agreement = slmesh_protocol::shadow::AgreementGate { min: 0.5, sample: 1.0 };
    let gates = Gates { agreement: Some(agreement), ..Fleet::quick_gates(2) };
    let m = f.manifest(2, &[(0.01, 5), (1.0, 0)], gates);
    f.publish(0, m).expect("publish");
    f.run_for(30_000 * MS);
    let canary: Vec<usize> = f.live().filter(|i| f.active(*i) == Some(2)).collect();
    assert!(canary.len() >= 2, "{canary:?}");
    for i in &canary {
        let events = f.events_of(*i);
        let why = events.iter().any(|e| e.contains("no shadow comparison on this node") && e.contains("shadow budget"));
        assert!(why, "node {i}: {events:#?}");
        assert!(f.nodes[*i].shadowing.is_none());
    }
    // With no comparisons the gate waits: the rollout neither passes nor halts.
    let view = f.node(canary[0]).rollouts().iter().find(|r| r.version == 2).expect("view").clone();
    assert_eq!(view.waves_open, 1, "{view:?}");
    assert!(matches!(&view.verdict, GateVerdict::Pending(r) if r.contains("0 node(s) compared")), "{view:?}");
}

/// A version number for which no node of `f`'s ids has a cohort below `fraction`.
fn version_with_empty_canary(f: &Fleet, fraction: f64) -> u64 {
    let plan = slmesh_protocol::rollout::RolloutPlan {
        waves: vec![slmesh_protocol::rollout::Wave { fraction, soak_secs: 1 }],
        ..Default::default()
    };
    (2..1000)
        .find(|v| (0..f.nodes.len()).all(|i| wave_of(&plan, cohort(&f.id(i), MODEL, *v)).is_none()))
        .expect("some version leaves the hashed canary empty")
}

#[test]
fn an_empty_canary_is_filled_up_to_what_the_gates_need() {
    let mut f = on_v1(4);
    let v = version_with_empty_canary(&f, 0.3);
    let m = f.manifest(v, &[(0.3, 5), (1.0, 0)], Fleet::quick_gates(2));
    f.publish(0, m).expect("publish");
    f.run_for(4_000 * MS);
    let canaries = f.live().filter(|i| f.active(*i) == Some(v)).count();
    assert_eq!(canaries, 2, "the two lowest cohorts are the canary");
    let view = f.node(0).rollouts().iter().find(|r| r.version == v).expect("view").clone();
    assert_eq!(view.known_per_wave, vec![2, 2], "{view:?}");
    f.run_for(30_000 * MS);
    assert!(f.live().all(|i| f.active(i) == Some(v)), "the rollout completes");
    assert_served_only_in_open_waves(&f, v);
}

#[test]
fn the_status_says_when_a_wave_holds_no_node() {
    let mut f = on_v1(4);
    // Wave 2 adds nothing beyond the canary floor of 4: it holds no node.
    let m = f.manifest(2, &[(0.3, 60), (0.31, 60), (1.0, 0)], Fleet::quick_gates(4));
    f.publish(0, m).expect("publish");
    f.run_for(3_000 * MS);
    let view = f.node(1).rollouts().iter().find(|r| r.version == 2).expect("view").clone();
    assert_eq!(view.known_per_wave[0], 4);
    assert!(view.decision.contains("wave(s) 2") && view.decision.contains("hold no node"), "{}", view.decision);
}

#[test]
fn the_waves_a_node_counts_follow_the_nodes_it_knows() {
    // Each node keeps the cohorts of the nodes it knows per version; a revoked node
    // leaves the peer book, and the counts at the next tick.
    let mut f = on_v1(6);
    let m = f.manifest(2, &[(0.5, 600), (1.0, 0)], Fleet::quick_gates(2));
    f.publish(0, m).expect("publish");
    f.run_for(3_000 * MS);
    let counted = |f: &Fleet| -> usize {
        f.node(1).rollouts().iter().find(|r| r.version == 2).expect("view").known_per_wave.iter().sum()
    };
    assert_eq!(counted(&f), 6, "itself and the five others");
    f.revoke(0, 5, "decommissioned").expect("revoke");
    f.run_for(3_000 * MS);
    assert_eq!(counted(&f), 5, "the revoked node is no longer counted");
}

#[test]
fn the_default_gates_need_three_nodes() {
    assert_eq!(Gates::default().min_reporting_nodes, 3);
}

#[test]
fn a_version_that_does_not_load_is_tried_a_bounded_number_of_times_and_halts_the_rollout() {
    let mut spec = FleetSpec::lan(5);
    spec.node_config.activation_retry_ms = 2_000;
    let mut f = Fleet::on_v1(spec);
    f.broken.insert(2);
    let m = f.manifest(2, &[(1.0, 0)], Fleet::quick_gates(3));
    f.publish(0, m).expect("publish");
    f.run_for(120_000 * MS);
    for i in 0..5 {
        let loads = f.nodes[i].loads.get(&2).copied().unwrap_or(0);
        assert!((1..=3).contains(&loads), "node {i} loaded v2 {loads} times");
        assert_eq!(f.serving(i), Some(1), "node {i} still serves v1");
        let record = f.node(i).version_record(MODEL, 2).expect("record");
        // Either it gave up itself, or the fleet halted the rollout first.
        assert!(record.halted.as_deref().is_some_and(|h| h.contains("failed to load")), "node {i}: {record:?}");
    }
    let view = f.node(2).rollouts().iter().find(|r| r.version == 2).expect("view").clone();
    assert!(view.activation_failures >= 1 && view.activation_error.is_some(), "{view:?}");
    // Far later, nothing loads it again.
    let before: u32 = (0..5).map(|i| f.nodes[i].loads[&2]).sum();
    f.run_for(600_000 * MS);
    let after: u32 = (0..5).map(|i| f.nodes[i].loads[&2]).sum();
    assert_eq!(before, after);
    // Each failed load is in the history of the node that tried, with its reason.
    let failed_loads = (0..5)
        .flat_map(|i| f.nodes[i].history.iter())
        .filter(|e| e.version == 2 && matches!(&e.kind, HistoryKind::ActivationFailed { reason } if !reason.is_empty()))
        .count() as u32;
    assert_eq!(failed_loads, after, "one event per failed load");
}

#[test]
fn the_canary_soak_counts_from_when_the_version_was_published() {
    let mut f = on_v1(4);
    // The manifest was written a day before it was published (created_at = T0 - 1 day).
    f.run_for(5_000 * MS);
    let m = f.manifest(2, &[(0.5, 60), (1.0, 0)], Fleet::quick_gates(2));
    let published = f.now_ms() / 1000;
    f.publish(0, m).expect("publish");
    f.run_for(40_000 * MS);
    let record = f.node(0).version_record(MODEL, 2).expect("record").clone();
    assert_eq!(record.opened.len(), 1, "the canary soaks 60 s: {record:?}");
    assert!(record.first_seen >= published && record.opened[0] >= published);
    f.run_for(40_000 * MS);
    let record = f.node(0).version_record(MODEL, 2).expect("record");
    assert_eq!(record.opened.len(), 2);
    assert!(record.opened[1] >= published + 60);
}

#[test]
fn a_restarted_node_resumes_the_rollout_where_it_was_pause_included() {
    let mut f = on_v1(6);
    let m = f.manifest(2, &[(0.34, 6), (1.0, 0)], Fleet::quick_gates(2));
    f.publish(0, m).expect("publish");
    f.run_for(3_000 * MS);
    f.command(0, 2, CommandAction::Pause).expect("pause");
    f.run_for(2_000 * MS);
    let waiting: Vec<usize> = (0..6).filter(|i| f.active(*i) == Some(1)).collect();
    assert!(!waiting.is_empty());
    let opened_before = f.node(waiting[0]).version_record(MODEL, 2).expect("record").opened.clone();
    // Every node restarts (a power cut); the rollout stays paused well past its soak.
    for i in 0..6 {
        f.crash(i);
    }
    f.run_for(1_000 * MS);
    f.start_all();
    f.run_for(30_000 * MS);
    for &i in &waiting {
        assert_eq!(f.active(i), Some(1), "node {i} activated v2 while the rollout was paused");
    }
    let record = f.node(waiting[0]).version_record(MODEL, 2).expect("record");
    assert_eq!(record.opened, opened_before, "wave open times survive the restart");
    assert!(f.node(waiting[0]).rollouts().iter().any(|r| r.version == 2 && r.paused));
    // Canaries came back serving v2, not v1.
    for i in (0..6).filter(|i| !waiting.contains(i)) {
        assert_eq!(f.serving(i), Some(2), "canary {i} serves v2 again after the restart");
    }
    f.command(0, 2, CommandAction::Resume).expect("resume");
    f.run_for(20_000 * MS);
    assert!((0..6).all(|i| f.active(i) == Some(2)));
    assert_served_only_in_open_waves(&f, 2);
}

#[test]
fn one_liar_cannot_stop_a_good_version() {
    let mut f = on_v1(5);
    f.nodes[1].liar = true;
    let m = f.manifest(2, &[(0.5, 5), (1.0, 0)], Fleet::quick_gates(3));
    f.publish(0, m).expect("publish");
    f.run_for(60_000 * MS);
    for i in 0..5 {
        assert_eq!(f.active(i), Some(2), "node {i}: {:#?}", f.events_of(i));
    }
}

#[test]
fn partitions_heal_and_late_joiners_catch_up() {
    let mut f = Fleet::new(FleetSpec::lan(6));
    for i in 0..5 {
        f.start(i);
    }
    f.run_for(1_000 * MS);
    let m = f.manifest(1, &[(1.0, 0)], Fleet::quick_gates(1));
    f.publish(0, m).expect("v1");
    f.run_for(10_000 * MS);
    // Nodes 3 and 4 are cut off while version 2 is published; node 5 is not there yet.
    f.partition(&[3, 4], true);
    let m = f.manifest(2, &[(1.0, 0)], Fleet::quick_gates(1));
    f.publish(0, m).expect("v2");
    f.run_for(10_000 * MS);
    assert_eq!(f.active(3), Some(1), "no manifest crosses the partition");
    f.partition(&[3, 4], false);
    f.start(5);
    f.run_for(20_000 * MS);
    for i in 0..6 {
        assert_eq!(f.active(i), Some(2), "node {i} caught up: {:#?}", f.events_of(i));
    }
}

#[test]
fn an_operator_rollback_sends_every_node_back_and_a_newer_version_still_rolls_out() {
    let mut f = on_v1(4);
    let m = f.manifest(2, &[(1.0, 0)], Fleet::quick_gates(1));
    f.publish(0, m).expect("v2");
    f.run_for(10_000 * MS);
    assert!((0..4).all(|i| f.active(i) == Some(2)));
    f.command(2, 2, CommandAction::RollBackTo { to: 1 }).expect("rollback");
    f.run_for(10_000 * MS);
    for i in 0..4 {
        assert_eq!(f.active(i), Some(1), "node {i} went back to v1");
        // Every node's history holds the order, with the key that signed it.
        let order = f.nodes[i].history.iter().find_map(|e| match &e.kind {
            HistoryKind::Command { action: CommandAction::RollBackTo { to: 1 }, signer, .. } => Some(signer.clone()),
            _ => None,
        });
        assert!(order.is_some_and(|s| !s.is_empty()), "node {i}: {:?}", f.nodes[i].history);
    }
    let m = f.manifest(3, &[(1.0, 0)], Fleet::quick_gates(1));
    f.publish(0, m).expect("v3");
    f.run_for(10_000 * MS);
    assert!((0..4).all(|i| f.active(i) == Some(3)), "v3 supersedes the order back to v1");
}

#[test]
fn gossip_from_a_peer_not_admitted_counts_for_nothing() {
    let mut f = on_v1(2);
    let m = f.manifest(2, &[(1.0, 0)], Fleet::quick_gates(1));
    let data = m.to_bytes().expect("bytes");
    let stranger = slmesh_sim::fleet::node_key(99).public();
    let now = f.now_ms();
    let node = f.nodes[1].node.as_mut().expect("running");
    let verdict = node.handle_gossip(now, stranger, slmesh_protocol::mesh::TOPIC_MANIFESTS, &data);
    assert!(matches!(verdict, slmesh_protocol::mesh::GossipVerdict::Ignore(_)));
    assert!(node.version_record(MODEL, 2).is_none());
    // Garbage from an admitted peer is rejected, not a panic.
    let peer = f.id(0);
    let verdict = f.nodes[1].node.as_mut().expect("running").handle_gossip(now, peer, TOPIC_METRICS, &[1, 2, 3]);
    assert!(matches!(verdict, slmesh_protocol::mesh::GossipVerdict::Reject(_)));
}

#[test]
fn an_enrolled_node_cannot_speak_for_node_ids_it_made_up() {
    use slmesh_protocol::fleet::{MetricsMessage, MetricsRecord, SignedMetrics, VersionReport};
    let mut f = on_v1(5);
    let m = f.manifest(2, &[(0.5, 5), (1.0, 0)], Fleet::quick_gates(3));
    f.publish(0, m).expect("publish");
    // Node 1 is enrolled; it makes up 100 node ids (fresh keys) that report every request
    // of version 2 as failed, with its own certificate beside the record or none, and
    // sends them to node 2 as often as the real records go.
    let insider = f.id(1);
    let certificate = f.nodes[1].identity.certificate.clone();
    let mut verdicts = vec![];
    for round in 0..60u64 {
        f.run_for(1_000 * MS);
        let now = f.now_ms();
        for k in 0..100 {
            let made_up = slmesh_sim::fleet::node_key(10_000 + k);
            let failing = VersionReport {
                model: MODEL.into(),
                version: 2,
                active: true,
                requests: 1_000,
                errors: 1_000,
                ..Default::default()
            };
            let record = MetricsRecord {
                node: made_up.public(),
                seq: round + 1,
                issued_at: now / 1000,
                versions: vec![failing],
            };
            let record = SignedMetrics::sign(&record, &made_up).expect("record");
            let with_its_certificate = k % 2 == 0;
            let certificate = with_its_certificate.then(|| certificate.clone());
            let data = MetricsMessage { record, certificate }.to_bytes().expect("record");
            let node = f.nodes[2].node.as_mut().expect("running");
            verdicts.push((with_its_certificate, node.handle_gossip(now, insider, TOPIC_METRICS, &data)));
        }
    }
    // Another node's certificate is a lie (the sender is penalised); no certificate is
    // nothing to go on (ignored: an honest forwarder may not have had it either).
    for (with_its_certificate, verdict) in &verdicts {
        match verdict {
            GossipVerdict::Reject(_) => assert!(with_its_certificate, "{verdict:?}"),
            GossipVerdict::Ignore(why) => assert!(!with_its_certificate && why.contains("no certificate"), "{why}"),
            GossipVerdict::Accept => panic!("a made-up node's record was taken"),
        }
    }
    for i in 0..5 {
        assert_eq!(f.active(i), Some(2), "node {i}: {:#?}", f.events_of(i));
    }
}

#[test]
fn a_revoked_node_is_dropped_by_every_peer_and_stays_out_after_a_restart() {
    let mut f = on_v1(6);
    f.run_for(5_000 * MS);
    let revoked = f.id(5);
    let admitted_by = |f: &Fleet, i: usize| f.node(i).admitted().any(|(n, _)| *n == revoked);
    assert!((0..5).any(|i| admitted_by(&f, i)), "node 5 is a peer before");
    let said = f.revoke(0, 5, "key stolen").expect("revoke");
    assert!(said.contains("revoked"), "{said}");
    // Gossip carries it; a node that misses it gets it by anti-entropy.
    f.run_for(20_000 * MS);
    for i in 0..5 {
        assert!(!admitted_by(&f, i), "node {i} still admits the revoked node");
        assert!(f.node(i).revoked().any(|r| r.node == revoked && r.reason == "key stolen"), "node {i}");
        assert!(f.node(i).fleet().record(&revoked).is_none(), "node {i} still counts its metrics");
    }
    assert_eq!(f.node(5).admitted().count(), 0, "the revoked node has no peer left");
    // Its records are ignored from now on, whoever forwards them.
    let now = f.now_ms();
    let record = slmesh_protocol::fleet::MetricsRecord {
        node: revoked,
        seq: u64::MAX / 2,
        issued_at: now / 1000,
        versions: vec![],
    };
    let record = slmesh_protocol::fleet::SignedMetrics::sign(&record, &f.nodes[5].identity.secret).expect("record");
    let certificate = Some(f.nodes[5].identity.certificate.clone());
    let data = slmesh_protocol::fleet::MetricsMessage { record, certificate }.to_bytes().expect("record");
    let peer = f.id(0);
    let verdict = f.nodes[1].node.as_mut().expect("running").handle_gossip(now, peer, TOPIC_METRICS, &data);
    assert!(matches!(verdict, GossipVerdict::Ignore(ref why) if why.contains("revoked")), "{verdict:?}");
    // A restarted node still refuses it from what it persisted: with every other node
    // down, and the stolen key's copy starting from an empty store (it cannot hand the
    // revocation back).
    for i in 0..6 {
        f.crash(i);
    }
    f.nodes[5].store = Default::default();
    f.run_for(1_000 * MS);
    f.start(2);
    f.start(5);
    f.run_for(10_000 * MS);
    assert!(f.linked(2, 5) && f.nodes[2].peers.contains(&5), "the two are connected again");
    assert!(!admitted_by(&f, 2), "after a restart: {:#?}", f.events_of(2));
    assert!(f.node(5).revoked().len() == 0, "the copy never heard of it");
}

#[test]
fn manifests_commands_revocations_and_peers_of_another_fleet_count_for_nothing() {
    use slmesh_protocol::manifest::{ModelManifest, SignedManifest};
    use slmesh_protocol::revocation::{Revocation, SignedRevocation};
    // The same publisher key signs for a staging fleet: none of it is valid in this one.
    let mut f = on_v1(3);
    let staging = |m: &SignedManifest| {
        let mut body: ModelManifest = slmesh_protocol::wire::decode(&m.body, "manifest").expect("body");
        body.fleet = "staging".into();
        SignedManifest::sign(&body, &f.publisher).expect("sign")
    };
    let m = staging(&f.manifest(2, &[(1.0, 0)], Fleet::quick_gates(1)));
    let refused = f.publish(0, m.clone());
    assert!(refused.as_ref().is_err_and(|e| e.contains("fleet \"staging\"")), "{refused:?}");
    let (now, from) = (f.now_ms(), f.id(0));
    let data = m.to_bytes().expect("bytes");
    let node = f.nodes[1].node.as_mut().expect("running");
    let verdict = node.handle_gossip(now, from, slmesh_protocol::mesh::TOPIC_MANIFESTS, &data);
    assert!(matches!(verdict, GossipVerdict::Reject(ref why) if why.contains("staging")), "{verdict:?}");

    let c = RolloutCommand {
        model: MODEL.into(),
        version: 1,
        action: CommandAction::Abort,
        issued_at: now / 1000,
        fleet: "staging".into(),
    };
    let data = SignedCommand::sign(&c, &f.publisher).and_then(|s| s.to_bytes()).expect("command");
    let verdict = f.nodes[1].node.as_mut().expect("running").handle_gossip(now, from, TOPIC_COMMANDS, &data);
    assert!(matches!(verdict, GossipVerdict::Ignore(ref why) if why.contains("staging")), "{verdict:?}");

    let r = Revocation { node: f.id(2), issued_at: now / 1000, reason: "staging".into(), fleet: "staging".into() };
    let data = SignedRevocation::sign(&r, &f.publisher).and_then(|s| s.to_bytes()).expect("revocation");
    let node = f.nodes[1].node.as_mut().expect("running");
    let verdict = node.handle_gossip(now, from, slmesh_protocol::mesh::TOPIC_REVOCATIONS, &data);
    assert!(matches!(verdict, GossipVerdict::Reject(_)), "{verdict:?}");
    assert_eq!(f.node(1).revoked().len(), 0);

    // A staging node with a valid certificate from the same key is not admitted.
    f.crash(2);
    f.reenroll(2, slmesh_sim::fleet::T0_MS / 1000 + 86_400, "staging");
    f.run_for(1_000 * MS);
    f.start(2);
    f.run_for(10_000 * MS);
    let peer2 = f.id(2);
    for i in 0..2 {
        assert!(!f.node(i).admitted().any(|(n, _)| *n == peer2), "node {i} admitted a staging node");
        assert_eq!(f.active(i), Some(1), "node {i}");
    }
    assert!(f.events_of(0).iter().any(|e| e.contains("fleet \"staging\"")), "{:#?}", f.events_of(0));
}

#[test]
fn a_hello_from_a_peer_admitted_already_still_brings_its_blob_addresses() {
    use slmesh_protocol::mesh::{Hello, PeerRequest};
    use slmesh_protocol::node::Output;
    // Both sides ask at once: the answer to ours (with the addresses) comes after its
    // request (without them) admitted it.
    let mut f = on_v1(2);
    let (now, peer) = (f.now_ms(), f.id(0));
    let certificate = f.nodes[0].identity.certificate.clone();
    let addrs = vec!["127.0.0.1:4002".to_string()];
    let hello = PeerRequest::Hello(Hello { certificate, blob_addrs: addrs.clone() }).to_bytes().expect("hello");
    let node = f.nodes[1].node.as_mut().expect("running");
    assert!(node.admitted().any(|(n, _)| *n == peer), "admitted already");
    while node.poll_output().is_some() {}
    let _ = node.handle_request(now, peer, &hello);
    let mut learned = false;
    while let Some(output) = node.poll_output() {
        learned |= matches!(output, Output::LearnAddrs { node, addrs: ref a } if node == peer && *a == addrs);
    }
    assert!(learned, "the addresses of a second hello were dropped");
}

/// One step of a random schedule.
#[derive(Debug, Clone)]
enum Step {
    Run(u64),
    Crash(usize),
    Restart(usize),
    Cut(usize),
    Heal,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (500u64..8_000).prop_map(Step::Run),
        1 => (1usize..5).prop_map(Step::Crash),
        1 => (1usize..5).prop_map(Step::Restart),
        1 => (1usize..5).prop_map(Step::Cut),
        1 => Just(Step::Heal),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random crashes, restarts and partitions during a rollout: no node ever serves the
    /// new version outside its open waves, and once the faults stop every node converges.
    #[test]
    fn random_faults_never_break_the_waves_and_every_node_converges(steps in prop::collection::vec(step(), 1..12)) {
        let mut f = on_v1(5);
        let m = f.manifest(2, &[(0.4, 4), (1.0, 0)], Fleet::quick_gates(2));
        f.publish(0, m).expect("publish");
        for s in steps {
            match s {
                Step::Run(ms) => f.run_for(ms * MS),
                Step::Crash(i) => f.crash(i),
                Step::Restart(i) => if f.nodes[i].node.is_none() { f.start(i) },
                Step::Cut(i) => f.partition(&[i], true),
                Step::Heal => { let all: Vec<usize> = (0..5).collect(); for i in all { f.partition(&[i], false) } }
            }
            assert_served_only_in_open_waves(&f, 2);
        }
        for i in 0..5 {
            f.partition(&[i], false);
            if f.nodes[i].node.is_none() {
                f.start(i);
            }
        }
        f.run_for(90_000 * MS);
        for i in 0..5 {
            prop_assert_eq!(f.active(i), Some(2), "node {} did not converge: {:#?}", i, f.events_of(i));
        }
        assert_served_only_in_open_waves(&f, 2);
    }
}

#[test]
fn a_fetch_with_no_provider_left_waits_without_spinning() {
    // Node 1 fetches version 2 from its only provider, which goes away mid-transfer.
    let mut spec = FleetSpec::lan(2);
    spec.uplink_bytes_per_sec = 100_000.0;
    let mut f = Fleet::on_v1(spec);
    let m = f.manifest(2, &[(1.0, 0)], Fleet::quick_gates(1));
    f.publish(0, m).expect("publish");
    f.run_for(2_000 * MS);
    f.crash(0);
    let before = f.events_processed();
    // The simulator checks after every timeout that a node does not ask to be woken at
    // once again; a minute of waiting costs a bounded number of events.
    f.run_for(60_000 * MS);
    let events = f.events_processed() - before;
    assert!(events < 1_000, "{events} events in a minute of waiting");
    assert!(f.events_of(1).iter().any(|e| e.contains("fetch of version 2 failed")), "{:#?}", f.events_of(1));
    f.start(0);
    f.run_for(60_000 * MS);
    assert_eq!(f.active(1), Some(2), "{:#?}", f.events_of(1));
}

#[test]
fn a_provider_that_takes_piece_requests_and_sends_nothing_loses_them_to_another() {
    // Node 1 fetches version 2 like anyone, but never answers a piece request itself
    // (it keeps the connection open and sends nothing). Node 2 asks both for pieces; the
    // origin has seeded some into the site already and refuses those for a while, so
    // node 2 needs node 1's. Without a deadline on each request, the pieces it claimed
    // from node 1 are never asked of anyone else.
    let mut spec = FleetSpec::lan(3);
    spec.model_bytes = 4 << 20;
    spec.uplink_bytes_per_sec = 1_000_000.0;
    let mut f = Fleet::on_v1(spec);
    f.nodes[1].stalls = true;
    let m = f.manifest(2, &[(1.0, 0)], Fleet::quick_gates(1));
    f.publish(0, m).expect("publish");
    let mut waited = 0;
    while f.serving(2) != Some(2) {
        // Each fetch attempt loses one request deadline (20 s) to node 1 before it drops
        // it (a later attempt starts afresh and may ask it again): bounded, not forever.
        assert!(waited < 150, "node 2 never got version 2: {:#?}", f.events_of(2));
        f.run_for(1_000 * MS);
        waited += 1;
    }
}

#[test]
fn a_peer_that_never_sends_a_hello_gets_no_gossip_and_is_dropped_within_the_deadline() {
    // Node 2 connects and stays silent: it answers no request, so it never presents a
    // certificate. Its peers gossip nothing to it, and refuse it once the admission
    // deadline has passed (however long their hellos take to time out), which makes the
    // driver disconnect and block it.
    let mut f = Fleet::new(FleetSpec::lan(3));
    f.nodes[2].silent = true;
    f.start_all();
    f.run_for(1_000 * MS);
    let m = f.manifest(1, &[(1.0, 0)], Fleet::quick_gates(1));
    f.publish(0, m).expect("publish");
    f.run_for(5_000 * MS);
    assert_eq!(f.active(1), Some(1), "the honest peer got the version by gossip: {:#?}", f.events_of(1));
    assert_eq!(f.nodes[2].gossip_received, 0, "the silent peer was sent gossip");
    let deadline = f.spec.node_config.admission_deadline_ms;
    f.run_for((deadline + 1_000) * MS);
    for i in 0..2 {
        assert!(
            f.refusals.iter().any(|(n, why)| *n == i && why.contains("not admitted within")),
            "node {i} did not drop the silent peer: {:?}",
            f.refusals
        );
        assert!(!f.node(i).is_admitted(&f.id(2)));
    }
    assert!(f.node(0).is_admitted(&f.id(1)), "the honest peers admitted each other");
    assert_eq!(f.nodes[2].gossip_received, 0, "the silent peer was sent gossip");
}

#[test]
fn a_command_issued_far_ahead_of_the_clock_is_refused_and_cannot_outrank_later_ones() {
    let mut f = on_v1(3);
    let m = f.manifest(2, &[(0.34, 600), (1.0, 0)], Fleet::quick_gates(1));
    f.publish(0, m).expect("publish");
    f.run_for(3_000 * MS);
    let paused = |f: &Fleet, i: usize| f.node(i).rollouts().iter().any(|r| r.version == 2 && r.paused);
    // A pause dated a day ahead (a publisher's clock gone wrong): taken, it would outrank
    // every command issued until then, a resume included.
    let tomorrow = f.now_ms() / 1000 + 86_400;
    let refused = f.command_issued(0, 2, CommandAction::Pause, tomorrow);
    assert!(refused.as_ref().is_err_and(|e| e.contains("ahead of this node's clock")), "{refused:?}");
    let c = RolloutCommand {
        model: MODEL.into(),
        version: 2,
        action: CommandAction::Pause,
        issued_at: tomorrow,
        fleet: DEFAULT_FLEET.into(),
    };
    let bytes = SignedCommand::sign(&c, &f.publisher).expect("sign").to_bytes().expect("bytes");
    let (now, from) = (f.now_ms(), f.id(0));
    let verdict = f.nodes[1].node.as_mut().expect("running").handle_gossip(now, from, TOPIC_COMMANDS, &bytes);
    assert!(matches!(verdict, GossipVerdict::Ignore(_)), "{verdict:?}");
    f.run_for(2_000 * MS);
    assert!(!paused(&f, 1), "the future pause was taken");
    // Commands on time still work, in order.
    f.command(0, 2, CommandAction::Pause).expect("pause");
    f.run_for(2_000 * MS);
    assert!((0..3).all(|i| paused(&f, i)));
    f.command(0, 2, CommandAction::Resume).expect("resume");
    f.run_for(2_000 * MS);
    assert!((0..3).all(|i| !paused(&f, i)), "a resume after the pause wins");
}

#[test]
fn a_replayed_old_command_changes_nothing_even_after_a_restart() {
    let mut f = on_v1(3);
    let m = f.manifest(2, &[(0.34, 600), (1.0, 0)], Fleet::quick_gates(1));
    f.publish(0, m).expect("publish");
    f.run_for(3_000 * MS);
    let paused = |f: &Fleet, i: usize| f.node(i).rollouts().iter().any(|r| r.version == 2 && r.paused);
    let pause = RolloutCommand {
        model: MODEL.into(),
        version: 2,
        action: CommandAction::Pause,
        issued_at: f.now_ms() / 1000,
        fleet: DEFAULT_FLEET.into(),
    };
    let pause = SignedCommand::sign(&pause, &f.publisher).expect("sign");
    let now = f.now_ms();
    f.nodes[0].node.as_mut().expect("running").command(now, pause.clone()).expect("pause");
    f.run_for(2_000 * MS);
    assert!((0..3).all(|i| paused(&f, i)), "the pause reached every node");
    f.command(0, 2, CommandAction::Resume).expect("resume");
    f.run_for(2_000 * MS);
    assert!((0..3).all(|i| !paused(&f, i)), "the resume reached every node");

    // Someone who recorded the pause sends it again: held already, it changes nothing.
    let bytes = pause.to_bytes().expect("bytes");
    let replay = |f: &mut Fleet, to: usize| {
        let (now, from) = (f.now_ms(), f.id(0));
        f.nodes[to].node.as_mut().expect("running").handle_gossip(now, from, TOPIC_COMMANDS, &bytes)
    };
    let verdict = replay(&mut f, 1);
    assert!(matches!(&verdict, GossipVerdict::Ignore(why) if why.contains("already held")), "{verdict:?}");
    f.run_for(2_000 * MS);
    assert!(!paused(&f, 1), "the replayed pause was taken");
    // A node that restarted kept both commands (persisted): the replay is as old there.
    f.crash(2);
    f.start(2);
    f.run_for(2_000 * MS);
    assert!(!paused(&f, 2), "the restarted node forgot the resume");
    let verdict = replay(&mut f, 2);
    assert!(matches!(verdict, GossipVerdict::Ignore(_)), "{verdict:?}");
    f.run_for(2_000 * MS);
    assert!((0..3).all(|i| !paused(&f, i)), "a replayed pause paused a node");
    // Through the API too: taken as held, and the later resume still wins.
    let now = f.now_ms();
    let said = f.nodes[1].node.as_mut().expect("running").command(now, pause);
    assert!(said.is_ok(), "{said:?}");
    f.run_for(2_000 * MS);
    assert!((0..3).all(|i| !paused(&f, i)), "a replayed pause paused a node");
}

#[test]
fn with_a_versions_commands_at_their_cap_an_abort_still_gets_in() {
    let mut f = on_v1(3);
    let m = f.manifest(2, &[(0.34, 600), (1.0, 0)], Fleet::quick_gates(1));
    f.publish(0, m).expect("publish");
    f.run_for(3_000 * MS);
    // 64 pauses and resumes, each dated a second apart in the past: the version's cap.
    let start = f.now_ms() / 1000 - 200;
    for k in 0..64 {
        let action = if k % 2 == 0 { CommandAction::Pause } else { CommandAction::Resume };
        f.command_issued(0, 2, action, start + k).expect("under the cap");
    }
    let full = f.command_issued(0, 2, CommandAction::Pause, start + 100);
    assert!(full.as_ref().is_err_and(|e| e.contains("held for")), "{full:?}");
    f.command(0, 2, CommandAction::Abort).expect("an abort always gets in");
    f.run_for(5_000 * MS);
    for i in 0..3 {
        assert!(
            f.node(i).rollouts().iter().any(|r| r.version == 2 && r.halted.is_some()),
            "node {i} did not halt: {:?}",
            f.node(i).rollouts()
        );
    }
}

#[test]
fn a_peer_whose_certificate_expires_while_connected_is_dropped() {
    // Node 2's certificate expires 20 s after the start: its peers admitted it at the
    // handshake, and drop it when it expires, not at some later handshake.
    let mut f = Fleet::new(FleetSpec::lan(3));
    let expires_at = slmesh_sim::fleet::T0_MS / 1000 + 20;
    f.reenroll(2, expires_at, DEFAULT_FLEET);
    f.start_all();
    f.run_for(5_000 * MS);
    assert!(f.node(0).is_admitted(&f.id(2)) && f.node(1).is_admitted(&f.id(2)));
    f.run_for(20_000 * MS);
    for i in 0..2 {
        assert!(!f.node(i).is_admitted(&f.id(2)), "node {i} still admits the expired peer");
        assert!(f.refusals.iter().any(|(n, why)| *n == i && why.contains("certificate expired")), "{:?}", f.refusals);
    }
    assert!(f.node(0).is_admitted(&f.id(1)));
}

#[test]
fn a_pin_in_the_local_config_overrides_the_plan() {
    let mut f = on_v1(3);
    f.crash(1);
    f.pin(1, Some(1));
    f.start(1);
    let m = f.manifest(2, &[(1.0, 0)], Fleet::quick_gates(1));
    f.publish(0, m).expect("publish");
    f.run_for(20_000 * MS);
    assert_eq!((f.active(0), f.active(1), f.active(2)), (Some(2), Some(1), Some(2)));
    assert_eq!(f.serving(1), Some(1));
    let view = f.node(1).rollouts().iter().find(|r| r.version == 2).expect("view").clone();
    assert!(view.decision.contains("pinned"), "{}", view.decision);
}

#[test]
fn a_restart_whose_load_fails_is_tried_again_after_its_back_off() {
    let mut spec = FleetSpec::lan(2);
    spec.node_config.activation_retry_ms = 5_000;
    let mut f = Fleet::on_v1(spec);
    f.crash(1);
    // The weights of version 1 fail to load when node 1 comes back (a disk that is not
    // mounted yet, say); then they load again.
    f.broken.insert(1);
    f.start(1);
    f.run_for(3_000 * MS);
    assert_eq!(f.serving(1), None);
    assert_eq!(f.active(1), Some(1), "still the version to serve");
    f.broken.remove(&1);
    f.run_for(10_000 * MS);
    assert_eq!(f.serving(1), Some(1), "{:#?}", f.events_of(1));
    assert_eq!(f.nodes[1].loads[&1], 3, "the first start, the failed restore, the retry");
}

#[test]
fn a_publisher_that_restarts_still_knows_what_it_published() {
    let mut f = on_v1(2);
    let published = f.node(0).originated().clone();
    assert_eq!(published.len(), 1);
    f.crash(0);
    f.start(0);
    assert_eq!(f.node(0).originated(), &published, "it seeds them as the origin again");
    assert!(f.node(1).originated().is_empty());
}

#[test]
fn peers_spread_a_version_in_pieces_and_the_origin_sends_about_one_copy() {
    // Eight nodes on one site, 2 MB/s uplinks, an 8 MB model: 16 pieces of 512 KiB.
    let mut spec = FleetSpec::lan(8);
    spec.uplink_bytes_per_sec = 2e6;
    spec.model_bytes = 8 << 20;
    let mut f = Fleet::on_v1(spec);
    f.run_for(60_000 * MS);
    assert!((0..8).all(|i| f.active(i) == Some(1)), "v1 everywhere");
    let origin_before = f.links.sent[0];
    let m = f.manifest(2, &[(1.0, 0)], Fleet::quick_gates(1));
    f.publish(0, m).expect("publish");
    f.run_for(60_000 * MS);
    for i in 0..8 {
        assert_eq!(f.active(i), Some(2), "node {i}: {:#?}", f.events_of(i));
    }
    let origin = (f.links.sent[0] - origin_before) as f64 / (8 << 20) as f64;
    // Seven fetchers: without swarming the origin would send seven copies. It seeds each
    // piece once (again after 20 s, or to a peer that asks again) and stops once two peers
    // hold the file; gossip adds a little.
    assert!(origin < 1.5, "the origin sent {origin:.2} copies of the model; peers should send the rest");
    let peers_sent: u64 = (1..8).map(|i| f.links.sent[i]).sum();
    assert!(peers_sent > 5 * (8 << 20), "peers passed pieces on: {peers_sent} bytes");
}

#[test]
fn garbage_collection_cut_short_by_a_crash_leaves_no_version_without_its_files_nor_stray_files() {
    for point in [CrashPoint::BeforeFiles, CrashPoint::AfterFiles] {
        let mut f = on_v1(3);
        let m = f.manifest(2, &[(1.0, 0)], Fleet::quick_gates(1));
        f.publish(0, m).expect("publish");
        f.run_for(10_000 * MS);
        assert_eq!(f.active(1), Some(2), "{:#?}", f.events_of(1));
        // Version 3 makes version 1 garbage on node 1, which crashes as its files go.
        f.nodes[1].crash_at_delete = Some(point);
        let m = f.manifest(3, &[(1.0, 0)], Fleet::quick_gates(1));
        f.publish(0, m).expect("publish");
        f.run_for(10_000 * MS);
        assert!(f.nodes[1].node.is_none(), "{point:?}: node 1 never collected version 1");
        let on_disk = |f: &Fleet| f.nodes[1].on_disk.iter().map(|(_, v)| *v).collect::<BTreeSet<u64>>();
        let staged = |f: &Fleet| f.nodes[1].store.model(MODEL).map(|m| m.staged.clone()).unwrap_or_default();
        // What the store lists as staged is on disk, wherever the crash fell.
        assert!(staged(&f).is_subset(&on_disk(&f)), "{point:?}: staged {:?}, on disk {:?}", staged(&f), on_disk(&f));
        f.start(1);
        f.run_for(5_000 * MS);
        assert_eq!(f.active(1), Some(3), "{point:?}: {:#?}", f.events_of(1));
        // Nothing is left on disk that no state lists.
        assert_eq!(on_disk(&f), BTreeSet::from([2, 3]), "{point:?}: {:#?}", f.events_of(1));
        assert_eq!(staged(&f), BTreeSet::from([2, 3]), "{point:?}");
    }
}

#[test]
fn a_record_without_its_certificate_whose_held_one_lapsed_is_ignored_not_blamed_on_the_forwarder() {
    use slmesh_protocol::fleet::{MetricsMessage, MetricsRecord, SignedMetrics};
    let mut f = on_v1(5);
    // Node 3 restarts with a certificate that lapses in 20 s; node 1 takes its records
    // under it.
    f.crash(3);
    f.reenroll(3, f.now_ms() / 1000 + 20, DEFAULT_FLEET);
    f.start(3);
    f.run_for(10_000 * MS);
    let node3 = f.id(3);
    assert!(f.node(1).fleet().record(&node3).is_some(), "node 1 holds node 3's record");
    f.run_for(12_000 * MS);
    assert!(f.node(1).fleet().record(&node3).is_some(), "and still does once its certificate lapsed");
    // A later record of node 3, as it sends after renewing its enrollment, forwarded
    // without its certificate by an honest peer that has the renewed one.
    let now = f.now_ms();
    let record = MetricsRecord { node: node3, seq: u64::MAX / 2, issued_at: now / 1000, versions: vec![] };
    let record = SignedMetrics::sign(&record, &f.nodes[3].identity.secret).expect("record");
    let data = MetricsMessage { record, certificate: None }.to_bytes().expect("bytes");
    let from = (0..5).map(|j| f.id(j)).find(|j| *j != node3 && f.node(1).is_admitted(j)).expect("an admitted peer");
    let verdict = f.nodes[1].node.as_mut().expect("running").handle_gossip(now, from, TOPIC_METRICS, &data);
    assert!(matches!(verdict, GossipVerdict::Ignore(ref why) if why.contains("no longer valid")), "{verdict:?}");
}

/// The truth a rollout's progress per wave estimates: for each wave (as a node that
/// knows the whole fleet places nodes), nodes holding `version` staged while serving an
/// older one, and nodes serving it.
fn true_progress(f: &Fleet, version: u64, waves: &[(f64, u64)]) -> Vec<(u64, u64)> {
    let plan = slmesh_protocol::rollout::RolloutPlan {
        waves: waves.iter().map(|(fraction, soak_secs)| Wave { fraction: *fraction, soak_secs: *soak_secs }).collect(),
        selector: Default::default(),
        gates: Fleet::quick_gates(2),
    };
    let ids: Vec<_> = f.live().map(|i| (f.id(i), i)).collect();
    let placed =
        slmesh_protocol::cohort::waves_with_floor(&plan, ids.iter().map(|(id, i)| (id, *i)), MODEL, version, ids.len());
    let mut truth = vec![(0, 0); waves.len()];
    for (wave, i) in placed {
        let Some(w) = wave else { continue };
        let staged = f.node(i).model(MODEL).is_some_and(|m| m.staged.contains(&version));
        match f.active(i) {
            Some(v) if v == version => truth[w].1 += 1,
            Some(v) if v < version && staged => truth[w].0 += 1,
            _ => {}
        }
    }
    truth
}

#[test]
fn every_node_counts_the_nodes_staged_and_serving_in_each_wave() {
    let mut f = on_v1(8);
    let waves = [(0.3, 120), (0.7, 120), (1.0, 0)];
    let m = f.manifest(2, &waves, Fleet::quick_gates(2));
    f.publish(0, m).expect("publish");
    // Fetched and staged everywhere, the canary serving; staged versions ride with the
    // next record, at most five metrics intervals later.
    f.run_for(20_000 * MS);
    let truth = true_progress(&f, 2, &waves);
    let serving: u64 = truth.iter().map(|t| t.1).sum();
    let staged: u64 = truth.iter().map(|t| t.0).sum();
    assert!(serving >= 2 && staged >= 3 && truth[0].0 == 0, "truth: {truth:?}");
    for i in f.live() {
        // Every node reports into the panels while they have room: the counts are exact.
        let seen: Vec<(u64, u64)> = f.node(i).wave_progress(MODEL, 2).iter().map(|w| (w.staged, w.serving)).collect();
        assert_eq!(seen, truth, "node {i}");
        let view = f.node(i).rollouts_with_progress().into_iter().find(|r| r.version == 2).expect("view");
        assert_eq!(view.per_wave.len(), 3);
    }
}
