//! Shadow comparison with the demo model (SmolLM2-135M-Instruct) on a real four-node
//! mesh, no evaluation suite: the canary answers live requests a second time with the
//! version it served before and gossips only the agreement scores. A copy whose attention
//! weights were damaged (it loads and answers at full speed, wrongly) is halted in its
//! canary by the agreement gate and rolled back; the good Q4_0 re-quantisation of the
//! same model passes it and goes everywhere; the shadow ends with the canary's soak.

use slmesh_e2e::damage::demo_variants;
use slmesh_e2e::fleet::{model_field, Fleet};
use slmesh_e2e::post_json;
use slmesh_e2e::rollout_rig::{mesh_on_v1, nodes_by_cohort, waves_for, LENIENT_RATIOS, MODEL, WAIT};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Live traffic: short questions with one right answer, greedy.
const PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "How many legs does a dog have?",
    "What color is the sky on a clear day?",
    "What is 2 + 2?",
    "Name the largest planet in the solar system.",
    "What do bees make?",
];

/// Sends the prompts round after round to every node until `stop`.
fn traffic(nodes: Vec<String>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for round in 0.. {
            for node in &nodes {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let prompt = PROMPTS[round % PROMPTS.len()];
                let body = serde_json::json!({
                    "model": MODEL, "max_tokens": 24, "temperature": 0,
                    "messages": [{"role": "user", "content": prompt}],
                });
                let _ = post_json(node, "/v1/chat/completions", body.to_string());
            }
        }
    })
}

#[test]
fn a_version_that_answers_wrongly_is_halted_in_its_canary_by_shadow_comparison() {
    let bin = env!("CARGO_BIN_EXE_slmesh");
    let fleet = Fleet::new(bin.as_ref());
    let (q4_1, q4_0, damaged) = demo_variants(bin.as_ref(), &fleet.path(""));
    std::fs::rename(&q4_1, fleet.path("v1.gguf")).expect("v1");
    std::fs::rename(&damaged, fleet.path("v2.gguf")).expect("v2");
    std::fs::rename(&q4_0, fleet.path("v3.gguf")).expect("v3");
    let dirs = nodes_by_cohort(&fleet, 4, 2);
    let waves = waves_for(&dirs, &[2, 4], "10s");
    let mut mesh = mesh_on_v1(fleet, &dirs, |_| vec![]);
    // This test's traffic only: varied questions, long enough answers to compare.
    mesh.stop_load();
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(mesh.nodes.iter().map(|n| n.http.clone()).collect(), stop.clone());
    let node = mesh.nodes[0].http.clone();
    // Greedy answers of 24 tokens: the Q4_0 re-quantisation words them differently from the
    // Q4_1 file (chrF about 0.3 at the median, 0.14 at worst for one prompt), the damaged copy answers with
    // commas (0.0). A threshold between the two, measured beforehand, as an operator would.
    let mut args = vec!["--min-agreement", "0.15", "--shadow-sample", "1", "--min-samples", "10"];
    args.extend(["--min-reporting-nodes", "2"]);
    args.extend(LENIENT_RATIOS);
    let publish_and_wait = |version: u64, file: &str| {
        let mut create: Vec<&str> = vec![];
        for w in &waves {
            create.extend(["--wave", w.as_str()]);
        }
        create.extend(args.iter().copied());
        let slm = mesh.fleet.signed_manifest_with(MODEL, version, file, &create);
        let slm = slm.to_str().expect("path").to_string();
        mesh.fleet.slmesh_code(&["publish", "--node", &node, "--manifest", &slm, "--wait", "--timeout", "5m"])
    };
    let agreement_of = |version: u64| -> Option<f64> {
        let (_, fleet) = slmesh_e2e::http(&node, "GET", "/v1/fleet", &[], vec![]);
        let fleet: serde_json::Value = serde_json::from_str(&fleet).expect("fleet JSON");
        fleet["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["version"] == version)
            .and_then(|v| v["median_agreement"].as_f64())
    };

    // The damaged version loads and serves at full speed; its answers disagree.
    let (code, out) = publish_and_wait(2, "v2.gguf");
    assert_eq!(code, Some(2), "the damaged version was not halted: {out}");
    assert!(out.contains("agreement with the previous version"), "{out}");
    for n in &mesh.nodes {
        n.wait_status("back on version 1", WAIT, |s| model_field(s, MODEL, "active") == Some(1));
    }
    let damaged_agreement = agreement_of(2);
    let canary = &mesh.nodes[0];
    let log = canary.log_text();
    assert!(log.contains("shadow comparison: 100% of requests answered again by version 1"), "{log}");
    assert!(log.contains("shadow comparison started") && log.contains("shadow comparison stopped"), "{log}");
    let history = mesh.fleet.slmesh(&["rollout", "history", "--node", &canary.http, "--model", MODEL]);
    assert!(history.contains("HALTED") && history.contains("agreement with the previous version"), "{history}");
    for n in &mesh.nodes[2..] {
        let log = n.log_text();
        let served = log.lines().any(|l| l.contains("serving") && l.contains("version=2"));
        assert!(!served, "{} outside the canary served the damaged version", n.node.name);
        assert!(!log.contains("shadow comparison"), "{} outside the canary shadowed", n.node.name);
    }

    // The good re-quantised version agrees with the demo file and goes everywhere.
    let (code, out) = publish_and_wait(3, "v3.gguf");
    assert_eq!(code, Some(0), "the good version did not complete: {out}");
    for n in &mesh.nodes {
        n.wait_status("version 3", WAIT, |s| model_field(s, MODEL, "active") == Some(3));
    }
    let good_agreement = agreement_of(3);
    stop.store(true, Ordering::Relaxed);
    let _ = load.join();
    eprintln!("median agreement with version 1: damaged {damaged_agreement:?}, Q4_0 {good_agreement:?}");
    assert!(damaged_agreement.is_some_and(|a| a < 0.15), "damaged: {damaged_agreement:?}");
    assert!(good_agreement.is_some_and(|a| a >= 0.15), "Q4_0: {good_agreement:?}");
    let rollouts = mesh.fleet.slmesh(&["rollout", "status", "--node", &node]);
    assert!(rollouts.contains("(min 0.15, 100% of requests compared)"), "{rollouts}");
    let fleet = mesh.fleet.slmesh(&["fleet", "--node", &node]);
    assert!(fleet.contains("agree"), "{fleet}");
    // Every shadow ended with its canary's soak: no node keeps a second model loaded.
    std::thread::sleep(Duration::from_secs(3));
    for n in &mesh.nodes {
        let log = n.log_text();
        assert_eq!(
            log.matches("shadow comparison started").count(),
            log.matches("shadow comparison stopped").count(),
            "{}: {log}",
            n.node.name
        );
    }
}
