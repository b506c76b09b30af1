//! A network partition during a rollout, with real `slmesh node run` processes in two
//! network namespaces joined by a veth pair: the link goes down during the canary's
//! soak, the operator aborts the version on one side only, each side goes its own way,
//! and once the link is back the whole fleet comes to the one decision (the abort).

use slmesh_e2e::fleet::{linked_namespaces, model_field, Fleet, NodeDir, Running};
use slmesh_e2e::tiny_llama_gguf;
use slmesh_protocol::cohort::cohort;
use slmesh_protocol::NodeId;
use std::time::Duration;

const MODEL: &str = "tiny";
const WAIT: Duration = Duration::from_secs(120);

/// The rollout of `version` as the node sees it (`slmesh rollout status --json`).
fn rollout(fleet: &Fleet, node: &Running, version: u64) -> serde_json::Value {
    let out = fleet.slmesh_in(node.netns(), &["rollout", "status", "--json", "--node", &node.http]);
    let all: serde_json::Value = serde_json::from_str(&out).expect("rollouts JSON");
    all["rollouts"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["model"] == MODEL && r["version"] == version))
        .cloned()
        .unwrap_or_default()
}

fn halted(fleet: &Fleet, node: &Running, version: u64) -> bool {
    rollout(fleet, node, version)["halted"].is_string()
}

#[test]
fn a_rollout_split_by_a_partition_during_its_canary_heals_to_one_decision() {
    let tag = format!("p{}", std::process::id() % 10_000);
    let (ns_a, ns_b) = match linked_namespaces(&tag, 2) {
        Ok(pair) => pair,
        Err(why) => {
            eprintln!("SKIPPED: cannot create network namespaces here ({why})");
            return;
        }
    };
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    std::fs::write(fleet.path("v1.gguf"), tiny_llama_gguf(1, 1000)).expect("write");
    std::fs::write(fleet.path("v2.gguf"), tiny_llama_gguf(1, 2000)).expect("write");

    // Four nodes, each with its own ports. Sorted by their cohort for version 2, the 1st
    // and 3rd go to namespace a and the 2nd and 4th to b, so that the canary (the two
    // lowest cohorts) has one node on each side.
    let mut dirs: Vec<(NodeDir, f64, u16)> = (0..4u16)
        .map(|i| {
            let port = 4101 + 2 * i;
            let listen = format!("/ip4/0.0.0.0/tcp/{port}");
            let blobs = format!("0.0.0.0:{}", port + 1);
            let network = ["--http-bind", "127.0.0.1:0", "--listen", &listen, "--blobs-bind", &blobs, "--no-mdns"];
            let dir = fleet.node_with_network(&format!("n{i}"), "x", &network);
            let id: NodeId = dir.node_id.parse().expect("node id");
            (dir, cohort(&id, MODEL, 2), port)
        })
        .collect();
    dirs.sort_by(|a, b| a.1.total_cmp(&b.1));
    let side = |k: usize| if k.is_multiple_of(2) { (&ns_a, "10.77.2.1") } else { (&ns_b, "10.77.2.2") };

    // Every node bootstraps from the first node of each side (a node that is one of them
    // skips itself).
    let peer_ids: Vec<String> = dirs.iter().map(|(d, _, _)| d.peer_id()).collect();
    let boot: Vec<String> =
        [0usize, 1].iter().map(|&k| format!("/ip4/{}/tcp/{}/p2p/{}", side(k).1, dirs[k].2, peer_ids[k])).collect();
    let mut nodes = vec![];
    for (k, (dir, _, _)) in dirs.iter().enumerate() {
        let mine: Vec<String> =
            boot.iter().filter(|b| !b.ends_with(&peer_ids[k])).map(|b| format!("\"{b}\"")).collect();
        let text = std::fs::read_to_string(&dir.config).expect("config");
        std::fs::write(&dir.config, text.replace("bootstrap = []", &format!("bootstrap = [{}]", mine.join(", "))))
            .expect("config");
        nodes.push(dir.start_in(Some(&side(k).0.name)));
    }
    for node in &nodes {
        node.wait_status("all three peers", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 3));
    }

    let publish = |version: u64, extra: &[&str]| {
        let file = format!("v{version}.gguf");
        let slm = fleet.signed_manifest_with(MODEL, version, &file, extra);
        let slm = slm.to_str().expect("path");
        fleet.slmesh_in(nodes[0].netns(), &["publish", "--node", &nodes[0].http, "--manifest", slm]);
    };
    publish(1, &["--wave", "1:0"]);
    for node in &nodes {
        node.wait_status("v1 active", WAIT, |s| model_field(s, MODEL, "active") == Some(1));
    }
    // Version 2: a canary of the two lowest cohorts that soaks for ten minutes.
    let canary = format!("{}:10m", (dirs[1].1 + dirs[2].1) / 2.0);
    publish(2, &["--wave", &canary, "--wave", "1:0", "--min-reporting-nodes", "2"]);
    for node in &nodes[..2] {
        node.wait_status("v2 active in the canary", WAIT, |s| model_field(s, MODEL, "active") == Some(2));
    }

    // The link goes down during the soak; the operator, on side a, aborts version 2.
    ns_a.exec(&["ip", "link", "set", &format!("sa{tag}"), "down"]).expect("cut the link");
    let key = fleet.path("ops.key");
    let key = key.to_str().expect("path");
    let abort = [
        "rollout",
        "abort",
        "--node",
        &nodes[2].http,
        "--publisher-key",
        key,
        "--model",
        MODEL,
        "--model-version",
        "2",
    ];
    fleet.slmesh_in(nodes[2].netns(), &abort);
    for node in [&nodes[0], &nodes[2]] {
        slmesh_e2e::fleet::wait_for(&format!("{}: v2 halted on side a", node.node.name), WAIT, || {
            halted(&fleet, node, 2).then_some(())
        });
    }
    nodes[0].wait_status("the canary on side a back on v1", WAIT, |s| model_field(s, MODEL, "active") == Some(1));
    // Each side notices the other is gone (its pings fail) and closes those connections,
    // so that healing takes reconnection and anti-entropy, not only TCP retransmits.
    for node in &nodes {
        node.wait_status("the other side's peers dropped", WAIT, |s| {
            s["peers"].as_array().is_some_and(|p| p.len() == 1)
        });
    }
    // Side b has not heard of the abort: its canary node still serves version 2.
    for node in [&nodes[1], &nodes[3]] {
        assert!(!halted(&fleet, node, 2), "{} heard of the abort across the partition", node.node.name);
    }
    assert_eq!(nodes[1].active(MODEL), Some(2), "side b's canary node left version 2 during the partition");

    // The link comes back: side b learns of the abort (gossip, or anti-entropy once the
    // nodes have met again), and every node ends on the same decision.
    ns_a.exec(&["ip", "link", "set", &format!("sa{tag}"), "up"]).expect("heal the link");
    ns_b.exec(&["ip", "link", "set", &format!("sb{tag}"), "up"]).expect("heal the link");
    for node in &nodes {
        slmesh_e2e::fleet::wait_for(&format!("{}: one decision after the partition", node.node.name), WAIT, || {
            (halted(&fleet, node, 2) && node.active(MODEL) == Some(1)).then_some(())
        });
    }
    let reason = rollout(&fleet, &nodes[3], 2)["halted"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("abort"), "{reason}");
    drop(nodes);
}
