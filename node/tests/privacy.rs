//! No prompt and no answer leaves a node: a three-node mesh (the demo model) serves chat
//! requests whose prompts carry a unique marker while a rollout with an evaluation suite
//! and shadow comparison (each request answered again by the previous version) runs, and every
//! byte each node hands to the mesh (gossip it publishes, requests it sends, answers it
//! gives peers: `SLMESH_TEST_WIRE_LOG`, recorded before encryption) is searched for the
//! marker and for the answers the nodes gave.

use slmesh_e2e::fleet::{model_field, wait_for};
use slmesh_e2e::post_json;
use slmesh_e2e::rollout_rig::{mesh_on_v1, nodes_by_cohort, LENIENT_RATIOS, MODEL, WAIT};
use std::time::Duration;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_prompt_or_answer_is_in_any_byte_a_node_sends_its_peers() {
    let fleet = slmesh_e2e::fleet::Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    // The demo model, whose answers are sentences worth searching for; version 2 is the
    // same file again.
    for v in ["v1.gguf", "v2.gguf"] {
        std::fs::copy(slmesh_e2e::demo_model(), fleet.path(v)).expect("copy the demo model");
    }
    let dirs = nodes_by_cohort(&fleet, 3, 2);
    let logs: Vec<std::path::PathBuf> = (0..3).map(|i| fleet.path(&format!("wire-{i}.log"))).collect();
    let leaked = logs.clone();
    let mut mesh = mesh_on_v1(fleet, &dirs, move |i| {
        let path: &'static str = Box::leak(leaked[i].to_string_lossy().into_owned().into_boxed_str());
        vec![("SLMESH_TEST_WIRE_LOG", path)]
    });
    // Only this test's requests: three nodes of the real model share two cores.
    mesh.stop_load();
    // A version with a suite and shadow comparison rolls out, so that evaluation counts
    // and agreement scores travel too: every node is in its one wave, which soaks long
    // enough for the requests below to be compared with version 1's answers.
    let suite = mesh.fleet.path("suite.jsonl");
    std::fs::write(&suite, "{\"prompt\": \"Say something.\", \"max_chars\": 100000}\n").expect("suite");
    let mut args = vec!["--wave", "1:10m", "--eval", suite.to_str().expect("path"), "--min-samples", "5"];
    args.extend(["--min-agreement", "0.01", "--shadow-sample", "1"]);
    args.extend(LENIENT_RATIOS);
    let slm = mesh.fleet.signed_manifest_with(MODEL, 2, "v2.gguf", &args);
    mesh.fleet.slmesh(&["publish", "--node", &mesh.nodes[0].http, "--manifest", slm.to_str().expect("path")]);
    for node in &mesh.nodes {
        node.wait_status("version 2", WAIT, |s| model_field(s, MODEL, "active") == Some(2));
        wait_for("the shadow comparison", WAIT, || node.log_text().contains("shadow comparison started").then_some(()));
    }

    let marker = "slmesh-privacy-marker-7f3a9c2e5b";
    let mut answers = vec![];
    for round in 0..5 {
        for node in &mesh.nodes {
            let body = format!(
                r#"{{"model":"tiny","max_tokens":24,"messages":[{{"role":"user","content":"{marker} round {round}"}}]}}"#
            );
            let (code, v) = post_json(&node.http, "/v1/chat/completions", body);
            assert_eq!(code, 200, "{v}");
            let answer = v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
            if answer.trim().len() >= 12 {
                answers.push(answer.trim().to_string());
            }
        }
    }
    // Agreement scores reach the fleet view (a node counts once it compared three answers).
    let compared = wait_for("agreement scores in the fleet view", WAIT, || {
        let (_, fleet) = slmesh_e2e::http(&mesh.nodes[0].http, "GET", "/v1/fleet", &[], vec![]);
        let fleet: serde_json::Value = serde_json::from_str(&fleet).ok()?;
        let v2 = fleet["versions"].as_array()?.iter().find(|v| v["version"] == 2)?.clone();
        v2["nodes_compared"].as_u64().filter(|n| *n >= 1).map(|n| (n, v2["median_agreement"].clone()))
    });
    eprintln!("{} node(s) compared answers, median agreement {}", compared.0, compared.1);
    // Metrics go out every second here: let several records carry the requests' figures.
    std::thread::sleep(Duration::from_secs(6));
    assert!(!answers.is_empty(), "no answer long enough to search for");
    eprintln!("{} answers searched for, e.g. {:?}", answers.len(), answers[0]);
    for (i, log) in logs.iter().enumerate() {
        let bytes = std::fs::read(log).unwrap_or_else(|e| panic!("node {i} wrote no wire log {}: {e}", log.display()));
        // The log holds what the node really sends: its metrics records name the model.
        assert!(bytes.len() > 1000 && contains(&bytes, MODEL.as_bytes()), "node {i}: {} bytes", bytes.len());
        if i == 0 {
            // Text that does leave a node is found: the suite's prompt, in the manifest
            // the publishing node gossips.
            assert!(contains(&bytes, b"Say something."), "the wire log misses the published manifest");
        }
        assert!(!contains(&bytes, marker.as_bytes()), "node {i} sent a prompt to its peers");
        for a in &answers {
            assert!(!contains(&bytes, a.as_bytes()), "node {i} sent an answer to its peers: {a:?}");
        }
    }
}
