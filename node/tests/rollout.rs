//! Staged rollouts with real `slmesh node run` processes on 127.0.0.1, gated on the fleet
//! metrics the nodes gossip: a good version goes through three waves; a bad one (the
//! test-only fault flag `SLMESH_TEST_FAULT` makes its requests fail) halts in its canary
//! wave and rolls back; pause holds a rollout and resume continues it; an operator's
//! rollback sends every node back to a named version; one node that reports fabricated
//! failures cannot stop a good version.

use slmesh_e2e::fleet::{model_field, Fleet, Running};
use slmesh_e2e::rollout_rig::{
    mesh_on_v1, nodes_by_cohort, publish_v2, publish_v2_and_wait, waves_for, LENIENT_RATIOS, MODEL, WAIT,
};
use std::time::Duration;

fn served_v2(node: &Running) -> bool {
    node.log_text().lines().any(|l| l.contains("serving") && l.contains("version=2"))
}

#[test]
fn a_good_version_goes_through_three_waves_and_pause_holds_it() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let dirs = nodes_by_cohort(&fleet, 6, 2);
    let waves = waves_for(&dirs, &[2, 4, 6], "4s");
    let mesh = mesh_on_v1(fleet, &dirs, |_| vec![]);
    let mut gates = vec!["--min-samples", "10", "--min-reporting-nodes", "2"];
    gates.extend(LENIENT_RATIOS);
    publish_v2(&mesh, &waves, &gates);
    // The canary (two nodes) goes first.
    for node in &mesh.nodes[..2] {
        node.wait_status("v2 active in the canary", WAIT, |s| model_field(s, MODEL, "active") == Some(2));
    }
    // Pause before the canary's soak ends: wave 2 must not open.
    let key = mesh.fleet.path("ops.key");
    let args = |verb: &str| {
        vec![
            "rollout".to_string(),
            verb.to_string(),
            "--node".into(),
            mesh.nodes[0].http.clone(),
            "--publisher-key".into(),
            key.to_string_lossy().into_owned(),
            "--model".into(),
            MODEL.into(),
            "--model-version".into(),
            "2".into(),
        ]
    };
    let pause = args("pause");
    mesh.fleet.slmesh(&pause.iter().map(String::as_str).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_secs(10));
    for node in &mesh.nodes[2..] {
        assert_eq!(node.active(MODEL), Some(1), "{} activated v2 while the rollout was paused", node.node.name);
    }
    let status = mesh.fleet.slmesh(&["rollout", "status", "--node", &mesh.nodes[3].http]);
    assert!(status.contains("paused"), "{status}");
    // Every node counts the nodes per wave from the metrics records: the canary serves
    // v2, the four others hold it staged (it rides with records at most five intervals
    // late). Six nodes fit in a panel, so the counts are exact.
    for node in &mesh.nodes {
        slmesh_e2e::fleet::wait_for(
            &format!("{} to count staged and serving nodes per wave", node.node.name),
            WAIT,
            || {
                let text = mesh.fleet.slmesh(&["rollout", "status", "--node", &node.http]);
                text.contains("staged/serving per wave (metrics panels' estimate): 0/2  2/0  2/0").then_some(())
            },
        );
    }
    let (_, metrics) = slmesh_e2e::http(&mesh.nodes[4].http, "GET", "/metrics", &[], vec![]);
    assert!(
        metrics.contains(r#"slmesh_rollout_wave_nodes{model="tiny",version="2",wave="2",state="staged"} 2"#),
        "{metrics}"
    );
    let resume = args("resume");
    mesh.fleet.slmesh(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    // Waves 2 and 3 follow, each after its soak, while the gates pass.
    for node in &mesh.nodes[2..] {
        node.wait_status("v2 active everywhere", WAIT, |s| model_field(s, MODEL, "active") == Some(2));
    }
    let fleet_view = mesh.fleet.slmesh(&["fleet", "--node", &mesh.nodes[5].http]);
    assert!(fleet_view.contains("tiny@2"), "{fleet_view}");
    let rollouts = mesh.fleet.slmesh(&["rollout", "status", "--node", &mesh.nodes[5].http]);
    assert!(rollouts.contains("waves open 3/3"), "{rollouts}");
    // An operator sends the whole fleet back to version 1 (kept on disk as the previous).
    let mut back = args("rollback");
    back.extend(["--to".to_string(), "1".to_string()]);
    mesh.fleet.slmesh(&back.iter().map(String::as_str).collect::<Vec<_>>());
    for node in &mesh.nodes {
        node.wait_status("back on v1", WAIT, |s| model_field(s, MODEL, "active") == Some(1));
    }
    let rollouts = mesh.fleet.slmesh(&["rollout", "status", "--node", &mesh.nodes[2].http]);
    assert!(rollouts.contains("rolled back to version 1"), "{rollouts}");
}

#[test]
fn a_bad_version_halts_in_its_canary_and_rolls_back() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let dirs = nodes_by_cohort(&fleet, 6, 2);
    let waves = waves_for(&dirs, &[2, 4, 6], "3s");
    // Every node would fail version 2's requests; only the canary ever runs it.
    let mesh = mesh_on_v1(fleet, &dirs, |_| vec![("SLMESH_TEST_FAULT", "tiny@2")]);
    let mut gates = vec!["--min-samples", "10", "--min-reporting-nodes", "2", "--max-error-rate", "0.1"];
    gates.extend(LENIENT_RATIOS);
    // The publisher follows the rollout until it halts, and says so in its exit code.
    let (code, out) = publish_v2_and_wait(&mesh, &waves, &gates, "3m");
    assert_eq!(code, Some(2), "publish --wait on a halted rollout: {out}");
    assert!(out.contains("HALTED") && out.contains("error rate"), "{out}");
    for node in &mesh.nodes[..2] {
        slmesh_e2e::fleet::wait_for(&format!("{} to run v2, then roll back", node.node.name), WAIT, || {
            // The log says so just before the status does.
            (served_v2(node) && node.log_text().contains("rolled back") && node.active(MODEL) == Some(1)).then_some(())
        });
    }
    std::thread::sleep(Duration::from_secs(8));
    for node in &mesh.nodes {
        assert_eq!(node.active(MODEL), Some(1), "{} is not on v1", node.node.name);
    }
    for node in &mesh.nodes[2..] {
        assert!(!served_v2(node), "{} outside the canary activated the bad version", node.node.name);
    }
    let rollouts = mesh.fleet.slmesh(&["rollout", "status", "--node", &mesh.nodes[4].http]);
    assert!(rollouts.contains("halted") && rollouts.contains("error rate"), "{rollouts}");
    // Each gate's figure beside its limit, against the baseline.
    assert!(rollouts.contains("error rate 100.0% (max 10.0%)") && rollouts.contains("against version 1"), "{rollouts}");
    // A canary node's history says what it decided and on which figures, and keeps it
    // across a restart.
    let canary = &mesh.nodes[0];
    let history = mesh.fleet.slmesh(&["rollout", "history", "--node", &canary.http, "--model", MODEL]);
    for want in ["wave opened", "gate verdict", "activated", "HALTED", "rolled back", "error rate", "request(s)"] {
        assert!(history.contains(want), "no {want:?} in:\n{history}");
    }
    let (code, body) = slmesh_e2e::http(&canary.http, "GET", "/v1/events?version=two", &[], vec![]);
    assert_eq!(code, 400, "{body}");
    let mut mesh = mesh;
    mesh.stop_load();
    let canary = mesh.nodes.remove(0).stop().start_with_env(&[("SLMESH_TEST_FAULT", "tiny@2")]);
    let args = ["rollout", "history", "--node", &canary.http, "--model", MODEL, "--model-version", "2", "--json"];
    let after: serde_json::Value = serde_json::from_str(&mesh.fleet.slmesh(&args)).expect("history JSON");
    let kinds: Vec<String> = after["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            e["kind"].as_object().and_then(|k| k.keys().next().cloned()).or(e["kind"].as_str().map(String::from))
        })
        .collect();
    for want in ["wave_opened", "activated", "verdict", "halted"] {
        assert!(kinds.iter().any(|k| k == want), "no {want} after a restart: {kinds:?}");
    }
}

#[test]
fn one_node_reporting_fabricated_failures_cannot_stop_a_good_version() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let dirs = nodes_by_cohort(&fleet, 5, 2);
    // A canary of three, one of which lies; then everyone.
    let waves = waves_for(&dirs, &[3, 5], "3s");
    let mesh = mesh_on_v1(fleet, &dirs, |i| if i == 1 { vec![("SLMESH_TEST_LIE_METRICS", "1")] } else { vec![] });
    let mut gates = vec!["--min-samples", "10", "--min-reporting-nodes", "3", "--max-error-rate", "0.1"];
    gates.extend(LENIENT_RATIOS);
    let (code, out) = publish_v2_and_wait(&mesh, &waves, &gates, "3m");
    assert_eq!(code, Some(0), "publish --wait on a rollout that completes: {out}");
    assert!(out.contains("rollout completed"), "{out}");
    for node in &mesh.nodes {
        node.wait_status("v2 active everywhere despite the liar", WAIT, |s| model_field(s, MODEL, "active") == Some(2));
    }
    let fleet_json = mesh.fleet.slmesh(&["fleet", "--json", "--node", &mesh.nodes[4].http]);
    let v: serde_json::Value = serde_json::from_str(&fleet_json).expect("json");
    let v2 = v["versions"].as_array().and_then(|a| a.iter().find(|x| x["version"] == 2)).cloned().expect("v2 in fleet");
    assert!(v2["error_rate"].as_f64().unwrap_or(0.0) > 0.5, "the liar's figures should dominate the pooled rate: {v2}");
}

#[test]
fn a_version_that_does_not_load_halts_its_rollout_instead_of_loading_forever() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let dirs = nodes_by_cohort(&fleet, 3, 2);
    let mesh = mesh_on_v1(fleet, &dirs, |_| vec![]);
    // Version 2 passes the header checks, but its tokenizer's BOS id is out of range:
    // mistral.rs refuses it at load.
    std::fs::write(mesh.fleet.path("v2.gguf"), slmesh_e2e::tiny_llama_gguf(99_999, 2000)).expect("write");
    publish_v2(&mesh, &["1:0".to_string()], &["--min-reporting-nodes", "3"]);
    for node in &mesh.nodes {
        slmesh_e2e::fleet::wait_for(&format!("{} to see the rollout halt", node.node.name), WAIT, || {
            let text = mesh.fleet.slmesh(&["rollout", "status", "--node", &node.http]);
            (text.contains("halted") && text.contains("failed to load")).then_some(())
        });
    }
    std::thread::sleep(Duration::from_secs(10));
    for node in &mesh.nodes {
        assert_eq!(node.active(MODEL), Some(1), "{} left version 1", node.node.name);
        let loads = node
            .log_text()
            .lines()
            .filter(|l| l.contains("loading") && l.contains("version=2") && !l.contains("again"))
            .count();
        assert!((1..=3).contains(&loads), "{} loaded version 2 {loads} times", node.node.name);
    }
}

#[test]
fn publish_wait_gives_up_after_its_timeout_with_exit_code_3() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let dirs = nodes_by_cohort(&fleet, 1, 2);
    let mesh = mesh_on_v1(fleet, &dirs, |_| vec![]);
    // One wave that soaks for ten minutes: the rollout cannot complete within 5 s.
    let (code, out) = publish_v2_and_wait(&mesh, &["1:10m".to_string()], &["--min-reporting-nodes", "1"], "5s");
    assert_eq!(code, Some(3), "publish --wait past its timeout: {out}");
    assert!(out.contains("still rolling out after 5 s"), "{out}");
    // It gave up following; the rollout itself goes on.
    mesh.nodes[0].wait_status("v2 active", WAIT, |s| model_field(s, MODEL, "active") == Some(2));
}
