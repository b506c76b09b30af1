use super::*;
use crate::identity::{KeyKind, NodeId, SecretKey};
use crate::rollout::{Gates, RolloutPlan, Wave};
use crate::trust::DEFAULT_FLEET;

fn node(seed: u8) -> SecretKey {
    SecretKey::from_seed(KeyKind::Node, [seed; 32])
}

fn report(version: u64, requests: u64, errors: u64, latency: f64) -> VersionReport {
    let mut r = VersionReport { model: "m".into(), version, active: true, requests, errors, ..Default::default() };
    for _ in 0..requests {
        r.latency.add(latency);
        r.ttft.add(latency / 4.0);
        r.tokens_per_sec.add(50.0);
    }
    r
}

fn operator() -> SecretKey {
    SecretKey::from_seed(KeyKind::Publisher, [200; 32])
}

fn trust() -> crate::trust::TrustStore {
    let mut trust = crate::trust::TrustStore::new();
    trust.add("ops", operator().public()).unwrap();
    trust
}

fn record(seed: u8, seq: u64, versions: Vec<VersionReport>) -> MetricsRecord {
    MetricsRecord { node: node(seed).public(), seq, issued_at: 100, versions }
}

/// The operator's enrollment of node `seed`.
fn cert(seed: u8) -> crate::trust::EnrollmentCertificate {
    crate::trust::test_certificate(&node(seed), &operator())
}

fn gates() -> Gates {
    Gates { min_samples: 30, min_reporting_nodes: 3, ..Gates::default() }
}

#[test]
fn records_are_self_signed_and_checked() {
    let r = record(1, 5, vec![report(2, 10, 1, 0.2)]);
    let signed = SignedMetrics::sign(&r, &node(1)).unwrap();
    let back = SignedMetrics::from_bytes(&signed.to_bytes().unwrap()).unwrap();
    assert_eq!(verify_metrics(&back, &cert(1), &trust(), DEFAULT_FLEET, 100).unwrap(), r);
    for (key, certificate) in [(2, 1), (2, 2)] {
        assert!(
            verify_metrics(
                &SignedMetrics::sign(&r, &node(key)).unwrap(),
                &cert(certificate),
                &trust(),
                DEFAULT_FLEET,
                100
            )
            .is_err(),
            "speaking for another node"
        );
    }
    let mut lying = r.clone();
    lying.versions[0].errors = 11;
    assert!(verify_metrics(&SignedMetrics::sign(&lying, &node(1)).unwrap(), &cert(1), &trust(), DEFAULT_FLEET, 100)
        .is_err());
}

#[test]
fn a_metrics_message_carries_the_certificate_beside_the_record_or_not_at_all() {
    let signed = SignedMetrics::sign(&record(1, 5, vec![report(2, 10, 1, 0.2)]), &node(1)).unwrap();
    let with = MetricsMessage { record: signed.clone(), certificate: Some(cert(1)) };
    let without = MetricsMessage { record: signed, certificate: None };
    let (with_bytes, without_bytes) = (with.to_bytes().unwrap(), without.to_bytes().unwrap());
    assert_eq!(MetricsMessage::from_bytes(&with_bytes).unwrap(), with);
    assert_eq!(MetricsMessage::from_bytes(&without_bytes).unwrap(), without);
    assert!(without_bytes.len() + 150 < with_bytes.len(), "{} against {}", without_bytes.len(), with_bytes.len());
    // Truncated, with trailing bytes, or of another protocol version: an error each.
    for cut in [1, without_bytes.len() / 2, without_bytes.len() - 1] {
        assert!(MetricsMessage::from_bytes(&without_bytes[..cut]).is_err(), "cut at {cut}");
    }
    let mut longer = with_bytes.clone();
    longer.push(0);
    assert!(MetricsMessage::from_bytes(&longer).is_err(), "trailing bytes");
    let mut other_version = without.clone();
    other_version.record.protocol_version += 1;
    let err = MetricsMessage::from_bytes(&other_version.to_bytes().unwrap()).unwrap_err();
    assert!(matches!(err, crate::ProtocolError::UnknownProtocolVersion { .. }), "{err}");
}

#[test]
fn a_record_counts_only_from_a_node_the_operator_enrolled() {
    // An enrolled insider makes up a node id (its own fresh key) and signs a record
    // for it with a certificate it has: its own, or one it signed itself.
    let insider = node(1);
    let made_up = node(77);
    let r = record(77, 5, vec![report(2, 10, 0, 0.2)]);
    let signed = SignedMetrics::sign(&r, &made_up).unwrap();
    let insiders = crate::trust::test_certificate(&insider, &operator());
    let err = verify_metrics(&signed, &insiders, &trust(), DEFAULT_FLEET, 100).unwrap_err().to_string();
    assert!(err.contains("not from an enrolled node"), "{err}");
    let self_enrolled = crate::trust::test_certificate(&made_up, &insider);
    assert!(verify_metrics(&signed, &self_enrolled, &trust(), DEFAULT_FLEET, 100).is_err(), "self-enrolled");
    // A genuine member's record is refused once its certificate has expired.
    let expiring = record(3, 5, vec![]);
    let expiring_cert = crate::trust::Enrollment {
        node: node(3).public(),
        tags: Default::default(),
        issued_at: 0,
        expires_at: 1_000,
        fleet: DEFAULT_FLEET.into(),
    }
    .sign(&operator())
    .unwrap();
    let signed = SignedMetrics::sign(&expiring, &node(3)).unwrap();
    assert!(verify_metrics(&signed, &expiring_cert, &trust(), DEFAULT_FLEET, 999).is_ok());
    assert!(verify_metrics(&signed, &expiring_cert, &trust(), DEFAULT_FLEET, 1_000).is_err(), "expired");
}

#[test]
fn reports_of_one_version_add_up() {
    let mut total = report(2, 10, 1, 0.2);
    total.active = false;
    total.add(&report(2, 5, 2, 0.4));
    assert_eq!((total.requests, total.errors, total.latency.count()), (15, 3, 15));
    assert!(total.active);
}

#[test]
fn a_repeated_or_reordered_record_never_double_counts() {
    let mut view = FleetView::default();
    let new = record(1, 2, vec![report(2, 20, 0, 0.2)]);
    let old = record(1, 1, vec![report(2, 10, 0, 0.2)]);
    assert!(view.update(new.clone(), 10));
    assert!(!view.update(new.clone(), 11), "a duplicate is not news");
    assert!(!view.update(old, 12), "an older record does not replace a newer one");
    assert!(view.update(record(2, 1, vec![report(2, 5, 0, 0.2)]), 12));
    let s = view.summary("m", 2);
    assert_eq!((s.pooled.requests, s.nodes_reporting), (25, 2));
    assert_eq!(view.expire(100, 89), 1, "node 1 was last heard at 10");
    assert_eq!(view.summary("m", 2).pooled.requests, 5);
}

fn many(i: u32) -> NodeId {
    let mut seed = [7u8; 32];
    seed[..4].copy_from_slice(&i.to_le_bytes());
    SecretKey::from_seed(KeyKind::Node, seed).public()
}

fn record_of(node: NodeId, seq: u64, versions: Vec<VersionReport>) -> MetricsRecord {
    record_at(node, seq, 100, versions)
}

fn record_at(node: NodeId, seq: u64, issued_at: u64, versions: Vec<VersionReport>) -> MetricsRecord {
    MetricsRecord { node, seq, issued_at, versions }
}

/// The panel members among `nodes` for version 2 of "m": the lowest ranks.
fn lowest_ranked(nodes: &[NodeId]) -> Vec<NodeId> {
    let mut ranked: Vec<(u64, NodeId)> = nodes.iter().map(|n| (panel_rank(n, "m", 2), *n)).collect();
    ranked.sort();
    ranked.into_iter().take(PANEL_SIZE).map(|(_, n)| n).collect()
}

#[test]
fn the_panel_holds_the_lowest_ranks_whatever_the_order_records_arrive_in() {
    let nodes: Vec<NodeId> = (0..200).map(many).collect();
    let mut want = lowest_ranked(&nodes);
    want.sort();
    for order in [0u32, 1, 2] {
        let mut arrival = nodes.clone();
        // Three orders: as made, reversed, and by rank from the highest.
        match order {
            1 => arrival.reverse(),
            2 => arrival.sort_by_key(|n| std::cmp::Reverse(panel_rank(n, "m", 2))),
            _ => {}
        }
        let mut view = FleetView::default();
        for n in &arrival {
            view.update(record_of(*n, 1, vec![report(2, 10, 0, 0.2)]), 0);
        }
        let mut held: Vec<NodeId> = view.records().map(|r| r.node).collect();
        held.sort();
        assert_eq!(held, want, "order {order}");
        let s = view.summary("m", 2);
        assert_eq!((s.nodes_reporting, s.pooled.requests), (PANEL_SIZE, 10 * PANEL_SIZE as u64));
        // A node outside the panel is not news (not kept, not forwarded), even with a newer record.
        let outsider = nodes.iter().find(|n| !want.contains(n)).unwrap();
        assert!(!view.would_seat(outsider, "m", 2));
        assert!(!view.update(record_of(*outsider, 9, vec![report(2, 10, 10, 9.0)]), 0));
        assert_eq!(view.summary("m", 2).pooled.errors, 0);
    }
}

#[test]
fn small_fleets_are_counted_exactly_and_large_ones_estimated() {
    let mut view = FleetView::default();
    for i in 0..10 {
        view.update(record_of(many(i), 1, vec![report(2, 1, 0, 0.2)]), 0);
    }
    assert_eq!((view.summary("m", 2).nodes_estimated, view.estimated_nodes()), (10, 10));
    for (n, low, high) in [(500u32, 250, 1000), (5_000, 2_500, 10_000)] {
        let mut view = FleetView::default();
        for i in 0..n {
            view.update(record_of(many(i), 1, vec![report(2, 1, 0, 0.2)]), 0);
        }
        let estimate = view.estimated_nodes();
        assert!((low..=high).contains(&estimate), "{n} nodes estimated as {estimate}");
        assert_eq!(view.len(), PANEL_SIZE, "memory stays one panel");
    }
}

#[test]
fn a_member_that_goes_silent_is_replaced_once_its_record_expires() {
    let nodes: Vec<NodeId> = (0..60).map(many).collect();
    let panel = lowest_ranked(&nodes);
    let mut ranked: Vec<NodeId> = nodes.clone();
    ranked.sort_by_key(|n| panel_rank(n, "m", 2));
    let next = ranked[PANEL_SIZE];
    let mut view = FleetView::default();
    for n in &nodes {
        view.update(record_at(*n, 1, 100, vec![report(2, 10, 0, 0.2)]), 100);
    }
    assert!(!view.would_seat(&next, "m", 2));
    // Every member but the lowest refreshes; the lowest crashed.
    for n in &panel[1..] {
        view.update(record_at(*n, 2, 150, vec![report(2, 20, 0, 0.2)]), 150);
    }
    assert_eq!(view.expire(170, 60), 1);
    assert!(view.would_seat(&next, "m", 2), "the next-ranked node now has a seat");
    assert!(view.update(record_of(next, 1, vec![report(2, 10, 0, 0.2)]), 171));
    assert_eq!(view.summary("m", 2).nodes_reporting, PANEL_SIZE);
}

#[test]
fn made_up_versions_cannot_push_a_real_one_out() {
    let mut view = FleetView::default();
    for i in 0..5 {
        view.update(record_of(many(i), 1, vec![report(2, 10, 0, 0.2)]), 0);
    }
    // One liar reports many versions nobody else has, record after record.
    let liar = many(1_000);
    for seq in 0..(MAX_PANELS as u64 * 2) {
        let fake: Vec<VersionReport> = (0..MAX_VERSIONS_PER_RECORD as u64)
            .map(|k| VersionReport { model: format!("fake{seq}"), version: k, ..report(k, 1, 0, 0.2) })
            .collect();
        view.update(record_of(liar, seq + 1, fake), 0);
    }
    assert_eq!(view.summary("m", 2).nodes_reporting, 5);
    assert!(view.versions().len() <= MAX_PANELS);
    assert!(view.len() <= 6);
}

fn fleet(rates: &[(u64, u64)], version: u64, latency: f64) -> FleetView {
    let mut view = FleetView::default();
    for (i, (req, err)) in rates.iter().enumerate() {
        view.update(record(i as u8 + 1, 1, vec![report(version, *req, *err, latency)]), 0);
    }
    view
}

#[test]
fn gates_wait_for_samples_and_nodes_then_judge() {
    let g = gates();
    let few = fleet(&[(100, 0), (100, 0)], 2, 0.2);
    assert!(matches!(evaluate_gates(&g, &few.summary("m", 2), None), GateVerdict::Pending(_)));
    let small = fleet(&[(5, 0), (5, 0), (5, 0)], 2, 0.2);
    assert!(matches!(evaluate_gates(&g, &small.summary("m", 2), None), GateVerdict::Pending(_)));
    let good = fleet(&[(20, 0), (20, 1), (20, 0)], 2, 0.2);
    assert_eq!(evaluate_gates(&g, &good.summary("m", 2), None), GateVerdict::Pass);
    let bad = fleet(&[(20, 5), (20, 6), (20, 0)], 2, 0.2);
    assert!(matches!(evaluate_gates(&g, &bad.summary("m", 2), None), GateVerdict::Fail(r) if r.contains("error rate")));
}

#[test]
fn ratio_gates_compare_with_the_baseline() {
    let g = gates();
    let mut view = fleet(&[(20, 0), (20, 0), (20, 0)], 1, 0.2);
    for seed in 4..=6 {
        view.update(record(seed, 1, vec![report(2, 20, 0, 0.5)]), 0);
    }
    let baseline = view.baseline("m", 2).unwrap();
    assert_eq!(baseline.pooled.version, 1);
    let verdict = evaluate_gates(&g, &view.summary("m", 2), Some(&baseline));
    assert!(matches!(&verdict, GateVerdict::Fail(r) if r.contains("p95 latency")), "{verdict:?}");
    let mut fine = fleet(&[(20, 0), (20, 0), (20, 0)], 1, 0.2);
    for seed in 4..=6 {
        fine.update(record(seed, 1, vec![report(2, 20, 0, 0.22)]), 0);
    }
    assert_eq!(evaluate_gates(&g, &fine.summary("m", 2), fine.baseline("m", 2).as_ref()), GateVerdict::Pass);
}

#[test]
fn times_below_the_floor_are_not_compared_as_ratios() {
    let g = gates();
    let mut view = fleet(&[(20, 0), (20, 0), (20, 0)], 1, 0.000_02);
    for seed in 4..=6 {
        view.update(record(seed, 1, vec![report(2, 20, 0, 0.003)]), 0);
    }
    assert_eq!(evaluate_gates(&g, &view.summary("m", 2), view.baseline("m", 2).as_ref()), GateVerdict::Pass);
    let mut slow = fleet(&[(20, 0), (20, 0), (20, 0)], 1, 0.000_02);
    for seed in 4..=6 {
        slow.update(record(seed, 1, vec![report(2, 20, 0, 0.5)]), 0);
    }
    assert!(matches!(evaluate_gates(&g, &slow.summary("m", 2), slow.baseline("m", 2).as_ref()), GateVerdict::Fail(_)));
}

#[test]
fn one_lying_node_can_neither_fail_a_good_version_nor_hide_a_bad_one() {
    let g = gates();
    // Three honest nodes see no errors; one claims 10,000 failed requests.
    let good = fleet(&[(20, 0), (20, 0), (20, 0), (10_000, 10_000)], 2, 0.2);
    let s = good.summary("m", 2);
    assert!(s.pooled_error_rate().unwrap() > 0.9, "the pooled rate alone would be fooled");
    assert_eq!(evaluate_gates(&g, &s, None), GateVerdict::Pass);
    // Three honest nodes fail a third of their requests; one claims 10,000 successes.
    let bad = fleet(&[(30, 10), (30, 10), (30, 10), (10_000, 0)], 2, 0.2);
    let s = bad.summary("m", 2);
    assert!(s.pooled_error_rate().unwrap() < 0.02, "the pooled rate alone would hide it");
    assert!(matches!(evaluate_gates(&g, &s, None), GateVerdict::Fail(_)));
}

#[test]
fn with_two_nodes_one_liar_leaves_the_gate_pending_and_agreement_decides() {
    let g = Gates { min_reporting_nodes: 2, ..gates() };
    let liar_fails_it = fleet(&[(20, 0), (20, 20)], 2, 0.2);
    let verdict = evaluate_gates(&g, &liar_fails_it.summary("m", 2), None);
    assert!(matches!(&verdict, GateVerdict::Pending(r) if r.contains("disagree")), "{verdict:?}");
    let both_fail = fleet(&[(20, 8), (20, 10)], 2, 0.2);
    assert!(matches!(evaluate_gates(&g, &both_fail.summary("m", 2), None), GateVerdict::Fail(_)));
    let both_fine = fleet(&[(20, 0), (20, 0)], 2, 0.2);
    assert_eq!(evaluate_gates(&g, &both_fine.summary("m", 2), None), GateVerdict::Pass);
    // Slower on one node of two: no majority for a slowdown either.
    let mut view = fleet(&[(20, 0), (20, 0)], 1, 0.2);
    view.update(record(3, 1, vec![report(2, 20, 0, 0.2)]), 0);
    view.update(record(4, 1, vec![report(2, 20, 0, 0.9)]), 0);
    let verdict = evaluate_gates(&g, &view.summary("m", 2), view.baseline("m", 2).as_ref());
    assert!(matches!(&verdict, GateVerdict::Pending(r) if r.contains("p95 latency")), "{verdict:?}");
}

#[test]
fn a_version_that_fails_to_load_fails_its_gates_by_majority() {
    let g = gates();
    let failed = |seed: u8| {
        let v = VersionReport { model: "m".into(), version: 2, activation_failures: 3, ..Default::default() };
        record(seed, 1, vec![v])
    };
    // One node claims it could not load the version; two serve it: no verdict from that.
    let mut view = fleet(&[(20, 0), (20, 0)], 2, 0.2);
    view.update(failed(9), 0);
    assert!(matches!(evaluate_gates(&g, &view.summary("m", 2), None), GateVerdict::Pending(_)));
    // Two of three could not load it, nobody measured a request: it fails.
    let mut view = FleetView::default();
    view.update(failed(7), 0);
    view.update(failed(8), 0);
    let verdict = evaluate_gates(&g, &view.summary("m", 2), None);
    assert!(matches!(&verdict, GateVerdict::Fail(r) if r.contains("failed to load on 2")), "{verdict:?}");
    // Counts near u64::MAX saturate instead of overflowing.
    let mut total = report(2, 1, 0, 0.2);
    total.add(&VersionReport { requests: u64::MAX, ..Default::default() });
    assert_eq!(total.requests, u64::MAX);
}

#[test]
fn a_record_with_counts_near_u64_max_is_refused_without_a_panic() {
    type Change<'a> = &'a dyn Fn(&mut VersionReport);
    let huge = |f: Change| {
        let mut v = report(2, 10, 0, 0.2);
        f(&mut v);
        SignedMetrics::sign(&record(5, 1, vec![v]), &node(5)).unwrap()
    };
    let cases: [(&str, Change); 4] = [
        ("requests", &|v| v.requests = u64::MAX),
        ("errors and requests", &|v| (v.requests, v.errors) = (u64::MAX, u64::MAX)),
        ("tokens", &|v| v.completion_tokens = u64::MAX),
        ("a sketch", &|v| {
            let mut s = crate::sketch::Sketch::default();
            s.add(0.2);
            let wire = crate::wire::encode(&s).unwrap();
            // The same one-bucket sketch with its count at u64::MAX - 1: valid alone.
            let mut bytes = wire.clone();
            let at = bytes.len() - 8 - 1; // the varint count just before the sum
            bytes.splice(at..at + 1, [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
            bytes[4..12].copy_from_slice(&10u64.to_le_bytes());
            v.latency = crate::wire::decode(&bytes, "sketch").unwrap();
            v.requests = 1 << 39;
        }),
    ];
    for (what, f) in cases {
        let signed = huge(f);
        let err = verify_metrics(&signed, &cert(5), &trust(), DEFAULT_FLEET, 100).expect_err(what).to_string();
        assert!(err.contains("one node can have"), "{what}: {err}");
        // Whatever got through would still not wrap a view's sums.
        let mut view = FleetView::default();
        if let Ok(r) = verify_metrics(&signed, &cert(5), &trust(), DEFAULT_FLEET, 100) {
            view.update(r, 0);
        }
    }
    // An honest record far below the bounds is taken.
    assert!(verify_metrics(&huge(&|v| v.requests = 1 << 30), &cert(5), &trust(), DEFAULT_FLEET, 100).is_ok());
}

fn plan() -> RolloutPlan {
    RolloutPlan {
        waves: vec![
            Wave { fraction: 0.1, soak_secs: 60 },
            Wave { fraction: 0.5, soak_secs: 60 },
            Wave { fraction: 1.0, soak_secs: 0 },
        ],
        ..RolloutPlan::default()
    }
}

#[test]
fn waves_open_after_their_soak_when_gates_pass() {
    let (p, op) = (plan(), OperatorState::default());
    let mut progress = RolloutProgress::default();
    advance(&mut progress, &p, 1000, &GateVerdict::Pending("x".into()), &op, 1000);
    assert_eq!(progress.opened, vec![1000]);
    assert_eq!(decide(&progress, Some(0), false), RolloutDecision::Activate);
    assert!(matches!(decide(&progress, Some(1), false), RolloutDecision::Wait(_)));
    advance(&mut progress, &p, 1000, &GateVerdict::Pass, &op, 1030);
    assert_eq!(progress.opened.len(), 1, "the canary soaks 60 s");
    advance(&mut progress, &p, 1000, &GateVerdict::Pending("x".into()), &op, 1070);
    assert_eq!(progress.opened.len(), 1, "no verdict, no next wave");
    advance(&mut progress, &p, 1000, &GateVerdict::Pass, &op, 1080);
    assert_eq!(progress.opened, vec![1000, 1080]);
    advance(&mut progress, &p, 1000, &GateVerdict::Pass, &op, 1140);
    assert_eq!(progress.opened, vec![1000, 1080, 1140]);
    assert_eq!(decide(&progress, Some(2), false), RolloutDecision::Activate);
    assert!(matches!(decide(&progress, None, false), RolloutDecision::Wait(_)));
}

#[test]
fn a_failing_gate_halts_and_rolls_back_only_active_nodes() {
    let (p, op) = (plan(), OperatorState::default());
    let mut progress = RolloutProgress::default();
    advance(&mut progress, &p, 0, &GateVerdict::Fail("errors".into()), &op, 10);
    assert!(matches!(decide(&progress, Some(0), true), RolloutDecision::RollBack(_)));
    assert!(matches!(decide(&progress, Some(0), false), RolloutDecision::Wait(_)));
    advance(&mut progress, &p, 0, &GateVerdict::Pass, &op, 500);
    assert!(progress.halted.is_some(), "a halt is for good");
}

#[test]
fn operators_pause_resume_promote_and_abort() {
    let p = plan();
    let cmd = |action, at| RolloutCommand {
        model: "m".into(),
        version: 2,
        action,
        issued_at: at,
        fleet: DEFAULT_FLEET.into(),
    };
    let mut progress = RolloutProgress::default();
    let paused = OperatorState::fold(&[cmd(CommandAction::Pause, 5)]);
    advance(&mut progress, &p, 0, &GateVerdict::Pass, &paused, 100);
    assert_eq!(progress.opened.len(), 1, "paused: no new wave");
    // Resume and pause arrive out of order: issued_at decides.
    let resumed = OperatorState::fold(&[cmd(CommandAction::Resume, 7), cmd(CommandAction::Pause, 5)]);
    advance(&mut progress, &p, 0, &GateVerdict::Pass, &resumed, 100);
    assert_eq!(progress.opened, vec![0, 100]);
    let promoted = OperatorState::fold(&[cmd(CommandAction::Promote, 110)]);
    advance(&mut progress, &p, 0, &GateVerdict::Pass, &promoted, 111);
    assert_eq!(progress.opened, vec![0, 100, 111], "promote skips the soak");
    let back = OperatorState::fold(&[cmd(CommandAction::Promote, 1), cmd(CommandAction::RollBackTo { to: 1 }, 2)]);
    assert_eq!(back.roll_back_to, Some(1));
    let mut rolled = RolloutProgress::default();
    advance(&mut rolled, &p, 0, &GateVerdict::Pass, &back, 3);
    assert!(rolled.halted.as_deref().is_some_and(|h| h.contains("version 1")), "{rolled:?}");
    let mut other = RolloutProgress::default();
    let aborted = OperatorState::fold(&[cmd(CommandAction::Abort, 1)]);
    advance(&mut other, &p, 0, &GateVerdict::Pass, &aborted, 2);
    assert!(matches!(decide(&other, Some(0), true), RolloutDecision::RollBack(_)));
}

#[test]
fn the_gates_read_the_same_figures_without_merging_sketches() {
    let view = fleet(&[(100, 2), (50, 0), (80, 9)], 2, 0.3);
    let (full, gates) = (view.summary("m", 2), view.gate_summary("m", 2));
    assert_eq!(full.per_node, gates.per_node);
    assert_eq!((full.pooled.requests, full.pooled.errors), (gates.pooled.requests, gates.pooled.errors));
    assert_eq!(full.pooled.latency.count(), 230);
    assert_eq!(gates.pooled.latency.count(), 0, "no sketch merged");
    let g = gates_for_test();
    assert_eq!(evaluate_gates(&g, &full, None), evaluate_gates(&g, &gates, None));
}

#[test]
fn the_gates_summary_kept_between_ticks_follows_every_change_of_the_view() {
    let mut view = FleetView::with_ttl(60);
    assert!(view.update(record(1, 1, vec![report(2, 10, 0, 0.2)]), 100));
    let first = view.gate_summary("m", 2);
    assert!(std::sync::Arc::ptr_eq(&first, &view.gate_summary("m", 2)), "asked again, unchanged: kept");
    assert_eq!(first.pooled.requests, 10);
    // A newer record, another node, an expiry, a removal: each shows at once.
    assert!(view.update(record(1, 2, vec![report(2, 15, 1, 0.2)]), 101));
    assert_eq!(view.gate_summary("m", 2).pooled.errors, 1);
    assert!(view.update(record(2, 1, vec![report(2, 5, 0, 0.2)]), 101));
    assert_eq!(view.gate_summary("m", 2).nodes_reporting, 2);
    let gone = view.departures();
    assert_eq!(gone, 0, "a record replaced by its node's newer one has not left");
    view.remove(&node(2).public());
    assert_eq!((view.gate_summary("m", 2).nodes_reporting, view.departures()), (1, gone + 1));
    assert_eq!(view.expire(200, 60), 1);
    assert_eq!((view.gate_summary("m", 2).nodes_reporting, view.departures()), (0, gone + 2));
    // A duplicate changes nothing, and counts no departure.
    assert!(view.update(record(3, 1, vec![report(2, 5, 0, 0.2)]), 150));
    assert!(!view.update(record(3, 1, vec![report(2, 5, 0, 0.2)]), 150));
    assert_eq!((view.gate_summary("m", 2).pooled.requests, view.departures()), (5, gone + 2));
}

fn gates_for_test() -> Gates {
    Gates { max_error_rate: 0.05, ..gates() }
}

#[test]
fn a_replayed_old_record_does_not_come_back_and_age_counts_from_issue() {
    let mut view = FleetView::with_ttl(60);
    let n = many(1);
    // Issued 70 s ago, received now: too old, refused (not kept, not forwarded).
    assert!(!view.update(record_at(n, 1, 930, vec![report(2, 10, 0, 0.2)]), 1_000));
    // Issued 50 s ago: taken, and it expires 60 s after it was issued, not received.
    assert!(view.update(record_at(n, 2, 950, vec![report(2, 10, 0, 0.2)]), 1_000));
    assert_eq!(view.expire(1_009, 60), 0);
    assert_eq!(view.expire(1_010, 60), 1);
    // A clock ahead of ours: the age counts from receipt.
    assert!(view.update(record_at(n, 3, 5_000, vec![report(2, 10, 0, 0.2)]), 1_020));
    assert_eq!(view.expire(1_079, 60), 0);
    assert_eq!(view.expire(1_080, 60), 1);
}

/// A view where each node reports `passed` of 10 cases of the suite (and no request).
fn evaluated(passed: &[u32]) -> FleetView {
    let mut view = FleetView::default();
    for (i, p) in passed.iter().enumerate() {
        let eval =
            crate::eval::EvalCounts { cases: 10, passed: *p, checks: 10, checks_passed: *p, previous_passed: None };
        let v = VersionReport { model: "m".into(), version: 2, active: true, eval: Some(eval), ..Default::default() };
        view.update(record(i as u8 + 1, 1, vec![v]), 0);
    }
    view
}

#[test]
fn the_quality_gate_fails_a_version_its_suite_fails_before_any_request_and_one_liar_cannot_decide() {
    let g = Gates { min_eval_pass_rate: Some(0.8), ..gates() };
    // Too few nodes ran the suite: pending, whatever they found.
    let verdict = evaluate_gates(&g, &evaluated(&[0, 0]).summary("m", 2), None);
    assert!(matches!(&verdict, GateVerdict::Pending(r) if r.contains("ran the evaluation suite")), "{verdict:?}");
    // Three of three fail it: a verdict at once, with no request measured.
    let verdict = evaluate_gates(&g, &evaluated(&[1, 2, 0]).summary("m", 2), None);
    assert!(matches!(&verdict, GateVerdict::Fail(r) if r.contains("evaluation suite passed 10%")), "{verdict:?}");
    // One liar claims a perfect score among three that fail: it still fails.
    let verdict = evaluate_gates(&g, &evaluated(&[1, 2, 10, 0]).summary("m", 2), None);
    assert!(matches!(verdict, GateVerdict::Fail(_)), "{verdict:?}");
    // One liar claims a zero score among three that pass: the suite holds, and the
    // traffic gates wait for requests.
    let verdict = evaluate_gates(&g, &evaluated(&[10, 9, 0, 10]).summary("m", 2), None);
    assert!(matches!(&verdict, GateVerdict::Pending(r) if r.contains("node(s) measured")), "{verdict:?}");
    // Without the gate the suite's counts decide nothing.
    let verdict = evaluate_gates(&gates(), &evaluated(&[0, 0, 0]).summary("m", 2), None);
    assert!(matches!(verdict, GateVerdict::Pending(_)), "{verdict:?}");
    // Counts that do not add up (more passed than run) count as no result.
    let mut view = evaluated(&[10, 10]);
    let bogus = crate::eval::EvalCounts { cases: 1, passed: 9, ..Default::default() };
    let v = VersionReport { model: "m".into(), version: 2, active: true, eval: Some(bogus), ..Default::default() };
    view.update(record(9, 1, vec![v]), 0);
    let verdict = evaluate_gates(&g, &view.summary("m", 2), None);
    assert!(matches!(&verdict, GateVerdict::Pending(r) if r.contains("2 node(s) ran")), "{verdict:?}");
}

#[test]
fn a_record_under_a_held_enrollment_counts_only_for_that_node_and_fleet() {
    let enrollment = |seed: u8, fleet: &str| crate::trust::Enrollment {
        node: node(seed).public(),
        tags: Default::default(),
        issued_at: 0,
        expires_at: 1_000,
        fleet: fleet.into(),
    };
    let signed = SignedMetrics::sign(&record(1, 5, vec![report(2, 10, 1, 0.2)]), &node(1)).unwrap();
    assert!(verify_metrics_enrolled(&signed, &enrollment(1, DEFAULT_FLEET), DEFAULT_FLEET).is_ok());
    let err = verify_metrics_enrolled(&signed, &enrollment(2, DEFAULT_FLEET), DEFAULT_FLEET).unwrap_err().to_string();
    assert!(err.contains("not from an enrolled node"), "{err}");
    assert!(verify_metrics_enrolled(&signed, &enrollment(1, "staging"), DEFAULT_FLEET).is_err(), "another fleet");
    let mut lying = record(1, 6, vec![report(2, 10, 1, 0.2)]);
    lying.versions[0].errors = 11;
    let lying = SignedMetrics::sign(&lying, &node(1)).unwrap();
    assert!(
        verify_metrics_enrolled(&lying, &enrollment(1, DEFAULT_FLEET), DEFAULT_FLEET).is_err(),
        "the body's checks"
    );
}

/// A view of version 2 where each node served 40 requests and compared `compared` answers
/// with the previous version, all scoring `score`, beside version 1's figures.
fn compared(nodes: &[(u64, f64)]) -> FleetView {
    let mut view = FleetView::default();
    for (i, (compared, score)) in nodes.iter().enumerate() {
        let mut v = report(2, 40, 0, 0.2);
        if *compared > 0 {
            let mut s = crate::sketch::Sketch::default();
            (0..*compared).for_each(|_| s.add(*score));
            v.agreement = Some(s);
        }
        view.update(record(i as u8 + 1, 1, vec![report(1, 40, 0, 0.2), v]), 0);
    }
    view
}

#[test]
fn the_agreement_gate_fails_a_version_that_answers_unlike_its_baseline_and_one_liar_cannot_decide() {
    let g = Gates { agreement: Some(crate::shadow::AgreementGate { min: 0.5, sample: 0.1 }), ..gates() };
    let verdict_of = |nodes: &[(u64, f64)]| {
        let view = compared(nodes);
        evaluate_gates(&g, &view.summary("m", 2), Some(&view.summary("m", 1)))
    };
    // Too few nodes compared enough answers (two of three, and one with too few): pending.
    let verdict = verdict_of(&[(10, 0.1), (10, 0.1), (2, 0.1)]);
    assert!(matches!(&verdict, GateVerdict::Pending(r) if r.contains("2 node(s) compared")), "{verdict:?}");
    // Three disagree: failed, with the figure.
    let verdict = verdict_of(&[(10, 0.1), (10, 0.12), (5, 0.2)]);
    assert!(
        matches!(&verdict, GateVerdict::Fail(r) if r.contains("agreement with the previous version 0.1")),
        "{verdict:?}"
    );
    // One liar claiming full agreement among three that disagree: still failed.
    assert!(matches!(verdict_of(&[(10, 0.1), (10, 1.0), (5, 0.2), (9, 0.1)]), GateVerdict::Fail(_)));
    // One liar claiming none among three that agree: passes.
    assert_eq!(verdict_of(&[(10, 0.9), (10, 0.0), (5, 0.8), (9, 0.95)]), GateVerdict::Pass);
    // Two of four each way: no majority, pending.
    let verdict = verdict_of(&[(10, 0.9), (10, 0.1), (5, 0.8), (9, 0.1)]);
    assert!(matches!(&verdict, GateVerdict::Pending(r) if r.contains("no majority")), "{verdict:?}");
    // Another gate's failure is not hidden while agreement waits for figures.
    let mut view = compared(&[(10, 0.9)]);
    for i in 5..8 {
        view.update(record(i, 1, vec![report(1, 40, 0, 0.2), report(2, 40, 40, 0.2)]), 0);
    }
    let verdict = evaluate_gates(&g, &view.summary("m", 2), Some(&view.summary("m", 1)));
    assert!(matches!(&verdict, GateVerdict::Fail(r) if r.contains("error rate")), "{verdict:?}");
    // The first version of a model has nothing to be compared with: the gate is skipped.
    let view = compared(&[(0, 0.0), (0, 0.0), (0, 0.0)]);
    assert_eq!(evaluate_gates(&g, &view.summary("m", 2), None), GateVerdict::Pass);
    // Without the gate, scores decide nothing.
    let view = compared(&[(10, 0.0), (10, 0.0), (10, 0.0)]);
    assert_eq!(evaluate_gates(&gates(), &view.summary("m", 2), Some(&view.summary("m", 1))), GateVerdict::Pass);
}

#[test]
fn agreement_sketches_merge_and_are_checked_like_the_others() {
    let mut a = report(2, 10, 0, 0.2);
    let mut s = crate::sketch::Sketch::default();
    (0..4).for_each(|_| s.add(0.5));
    a.agreement = Some(s.clone());
    let mut pooled = report(2, 10, 0, 0.2);
    pooled.add(&a);
    pooled.add(&a);
    assert_eq!(pooled.agreement.as_ref().map(|s| s.count()), Some(8));
    // A record claiming more comparisons than one node can make is refused.
    let mut big = report(2, 10, 0, 0.2);
    let mut lie = crate::sketch::Sketch::default();
    lie.add(0.5);
    for _ in 0..41 {
        let copy = lie.clone();
        lie.merge(&copy);
    }
    big.agreement = Some(lie);
    let signed = SignedMetrics::sign(&record(1, 5, vec![big]), &node(1)).unwrap();
    let err = verify_metrics(&signed, &cert(1), &trust(), DEFAULT_FLEET, 100).unwrap_err().to_string();
    assert!(err.contains("a sketch of more values"), "{err}");
}

#[test]
fn a_suite_that_compares_fails_a_version_that_passes_fewer_cases_than_its_predecessor() {
    let g = Gates { min_eval_pass_rate: Some(0.5), ..gates() };
    let view = |nodes: &[(u32, Option<u32>)]| {
        let mut view = FleetView::default();
        for (i, (passed, previous)) in nodes.iter().enumerate() {
            let eval = crate::eval::EvalCounts {
                cases: 10,
                passed: *passed,
                previous_passed: *previous,
                ..Default::default()
            };
            let v =
                VersionReport { model: "m".into(), version: 2, active: true, eval: Some(eval), ..Default::default() };
            view.update(record(i as u8 + 1, 1, vec![v]), 0);
        }
        view.summary("m", 2)
    };
    // Above the minimum, but two cases fewer than before on every node: failed.
    let verdict = evaluate_gates(&g, &view(&[(7, Some(9)), (7, Some(9)), (8, Some(10))]), None);
    assert!(matches!(&verdict, GateVerdict::Fail(r) if r.contains("2 case(s) fewer than the previous")), "{verdict:?}");
    // As many as before, or one fewer: the suite holds (the traffic gates wait for requests).
    let verdict = evaluate_gates(&g, &view(&[(9, Some(9)), (6, Some(7)), (10, Some(9))]), None);
    assert!(matches!(&verdict, GateVerdict::Pending(r) if r.contains("node(s) measured")), "{verdict:?}");
    // One liar claiming a big drop among nodes that hold: no failure.
    let verdict = evaluate_gates(&g, &view(&[(9, Some(9)), (7, Some(7)), (10, Some(9)), (5, Some(10))]), None);
    assert!(!matches!(verdict, GateVerdict::Fail(_)), "{verdict:?}");
    // Too few nodes compared: only the pass rate counts.
    let verdict = evaluate_gates(&g, &view(&[(7, Some(10)), (7, None), (8, None)]), None);
    assert!(!matches!(verdict, GateVerdict::Fail(_)), "{verdict:?}");
}

#[test]
fn staged_versions_in_a_record_must_be_few_newer_ascending_and_of_a_served_version() {
    type Change<'a> = &'a dyn Fn(&mut VersionReport);
    let with = |f: Change| {
        let mut v = report(2, 10, 0, 0.2);
        f(&mut v);
        verify_metrics(
            &SignedMetrics::sign(&record(5, 1, vec![v]), &node(5)).unwrap(),
            &cert(5),
            &trust(),
            DEFAULT_FLEET,
            100,
        )
    };
    assert!(with(&|v| v.staged_newer = vec![3, 7]).is_ok());
    let cases: [(&str, Change); 6] = [
        ("too many", &|v| v.staged_newer = (3..3 + MAX_STAGED_REPORTED as u64 + 1).collect()),
        ("not newer", &|v| v.staged_newer = vec![2]),
        ("older", &|v| v.staged_newer = vec![1, 3]),
        ("repeated", &|v| v.staged_newer = vec![3, 3]),
        ("descending", &|v| v.staged_newer = vec![4, 3]),
        ("of a version not served", &|v| (v.active, v.staged_newer) = (false, vec![3])),
    ];
    for (what, f) in cases {
        let err = with(f).expect_err(what).to_string();
        assert!(err.contains("staged versions"), "{what}: {err}");
    }
}

fn staging(node: NodeId, seq: u64, serving: u64, staged: Vec<u64>) -> MetricsRecord {
    let mut r = report(serving, 1, 0, 0.2);
    r.staged_newer = staged;
    record_of(node, seq, vec![r])
}

#[test]
fn holders_are_the_panels_nodes_serving_a_version_or_holding_it_staged_each_weighed_by_its_panel() {
    let mut view = FleetView::default();
    // Ten nodes: three serve v2, five serve v1 with v2 staged, two serve v1 only.
    for i in 0..10 {
        let r = match i {
            0..=2 => staging(many(i), 1, 2, vec![]),
            3..=7 => staging(many(i), 1, 1, vec![2, 3]),
            _ => staging(many(i), 1, 1, vec![]),
        };
        view.update(r, 0);
    }
    let holders = view.holders("m", 2);
    let count = |serving: bool| holders.iter().filter(|h| h.serving == serving).count();
    assert_eq!((count(true), count(false)), (3, 5));
    assert!(holders.iter().all(|h| h.weight == 1.0), "panels with room count exactly: {holders:?}");
    assert_eq!(view.holders("m", 3).len(), 5, "v3 is staged on five nodes and served by none");
    // A newer record of a node replaces its old one: it now serves v2, counted once.
    view.update(staging(many(3), 2, 2, vec![3]), 0);
    let holders = view.holders("m", 2);
    assert_eq!((holders.len(), holders.iter().filter(|h| h.serving).count()), (8, 4));
    // Beyond a panel, each member stands for its share of the version's estimated nodes.
    let mut view = FleetView::default();
    for i in 0..400 {
        view.update(staging(many(i), 1, 1, if i % 2 == 0 { vec![2] } else { vec![] }), 0);
    }
    let weight: f64 = view.holders("m", 2).iter().map(|h| h.weight).sum();
    assert!((100.0..=400.0).contains(&weight), "about 200 of 400 nodes hold v2 staged: {weight}");
}

#[test]
fn a_held_record_keeps_its_sketches_compact_and_the_display_merges_them_whole() {
    // Two versions per record, so each report's sketches must come back to its own report.
    let with_agreement = |version: u64, latency: f64, seed: u8| {
        let mut r = report(version, 20, 1, latency);
        let mut agreement = crate::sketch::Sketch::default();
        (0..12).for_each(|k| agreement.add(0.5 + f64::from(k) / 30.0 + f64::from(seed) / 100.0));
        r.agreement = Some(agreement);
        r
    };
    let records: Vec<MetricsRecord> = (1..=3u8)
        .map(|seed| {
            record(
                seed,
                1,
                vec![with_agreement(1, 0.1 * f64::from(seed), seed), with_agreement(2, f64::from(seed), seed)],
            )
        })
        .collect();
    let mut view = FleetView::with_ttl(60);
    for r in &records {
        assert!(view.update(r.clone(), 100));
    }
    for version in [1, 2] {
        let mut expected = VersionReport { model: "m".into(), version, ..Default::default() };
        records.iter().flat_map(|r| &r.versions).filter(|v| v.version == version).for_each(|v| expected.add(v));
        let got = view.summary("m", version).pooled;
        assert_eq!(
            (&got.latency, &got.ttft, &got.tokens_per_sec),
            (&expected.latency, &expected.ttft, &expected.tokens_per_sec)
        );
        assert_eq!(got.agreement, expected.agreement);
        assert_eq!(got.latency.quantile(0.5), expected.latency.quantile(0.5));
    }
    // What the view hands out carries no sketches; its figures are the gates' own.
    let held = view.record(&records[0].node).expect("held");
    assert!(held.versions.iter().all(|v| v.latency.count() == 0 && v.agreement.is_none()));
    let stats = view.gate_summary("m", 2).per_node.clone();
    assert!(stats.iter().all(|s| s.agreement.is_some() && s.p95_latency.is_some()), "{stats:?}");
}

#[test]
fn a_kept_gates_summary_goes_only_when_its_version_changes() {
    let mut view = FleetView::with_ttl(60);
    assert!(view.update(record(1, 1, vec![report(2, 10, 0, 0.2)]), 100));
    assert!(view.update(record(2, 1, vec![report(2, 10, 0, 0.2)]), 100));
    let v2 = view.gate_summary("m", 2);
    // A record about another version leaves version 2's summary as it was.
    assert!(view.update(record(3, 1, (100..355).map(|v| report(v, 1, 0, 0.2)).collect()), 100));
    assert!(std::sync::Arc::ptr_eq(&v2, &view.gate_summary("m", 2)), "kept");
    assert_eq!(view.gate_summary("m", 100).nodes_reporting, 1);
    // 256 panels now. A new version takes the room of the smallest (version 100, whose one
    // member keeps its other seats and its record): that version's summary goes with it.
    assert!(view.update(record(4, 1, vec![report(999, 1, 0, 0.2)]), 100));
    assert!(view.record(&node(3).public()).is_some());
    assert_eq!(view.gate_summary("m", 100).nodes_reporting, 0);
    assert!(std::sync::Arc::ptr_eq(&v2, &view.gate_summary("m", 2)), "still kept");
}
