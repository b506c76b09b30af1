//! A rollout test rig: enrolled nodes ordered by their cohort for a version, a running
//! mesh with version 1 everywhere and a trickle of requests, and version 2 published with
//! chosen waves and gates. Shared by the rollout tests and the simulator fidelity bench.

use crate::fleet::{model_field, Fleet, NodeDir, Running};
use crate::{post_json, tiny_llama_gguf};
use slmesh_protocol::cohort::cohort;
use slmesh_protocol::NodeId;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const MODEL: &str = "tiny";
pub const WAIT: Duration = Duration::from_secs(120);

/// A running mesh on version 1 of the tiny model, with a trickle of chat requests to
/// every node (stopped when dropped).
pub struct Mesh {
    pub fleet: Fleet,
    pub nodes: Vec<Running>,
    stop_load: Arc<AtomicBool>,
    load: Option<std::thread::JoinHandle<()>>,
}

impl Mesh {
    /// Stops the chat requests to every node (before a test stops a node of its own).
    pub fn stop_load(&mut self) {
        self.stop_load.store(true, Ordering::Relaxed);
        if let Some(l) = self.load.take() {
            let _ = l.join();
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop_load();
    }
}

/// Node dirs (keys made) for `n` nodes, ordered by their cohort for `version`: the first
/// ones fall in the earliest waves. They send metrics every second (gates decide quickly).
pub fn nodes_by_cohort(fleet: &Fleet, n: usize, version: u64) -> Vec<(NodeDir, f64)> {
    nodes_by_cohort_with(fleet, n, version, &["--metrics-interval-secs", "1"])
}

/// As `nodes_by_cohort`, with other `slmesh init` arguments.
pub fn nodes_by_cohort_with(fleet: &Fleet, n: usize, version: u64, init_args: &[&str]) -> Vec<(NodeDir, f64)> {
    let mut dirs: Vec<(NodeDir, f64)> = (0..n)
        .map(|i| {
            let dir = fleet.node(&format!("n{i}"), "a", init_args);
            let id: NodeId = dir.node_id.parse().expect("node id");
            let c = cohort(&id, MODEL, version);
            (dir, c)
        })
        .collect();
    dirs.sort_by(|a, b| a.1.total_cmp(&b.1));
    dirs
}

/// Starts the nodes (the first as bootstrap of the others), rolls version 1 out to all,
/// and keeps a trickle of chat requests going to every node. Versions 1 and 2 are the
/// tiny model unless the test wrote `v1.gguf` or `v2.gguf` into the fleet's folder.
pub fn mesh_on_v1(
    fleet: Fleet,
    dirs: &[(NodeDir, f64)],
    env: impl Fn(usize) -> Vec<(&'static str, &'static str)>,
) -> Mesh {
    for (file, seed) in [("v1.gguf", 1000), ("v2.gguf", 2000)] {
        if !fleet.path(file).exists() {
            std::fs::write(fleet.path(file), tiny_llama_gguf(1, seed)).expect("write");
        }
    }
    let first = dirs[0].0.start_with_env(&env(0));
    let boot = first.bootstrap_addr();
    let mut nodes = vec![first];
    for (i, (dir, _)) in dirs.iter().enumerate().skip(1) {
        // Bootstrap is a config setting: add it before starting.
        let text = std::fs::read_to_string(&dir.config).expect("config");
        let text = text.replace("bootstrap = []", &format!("bootstrap = [\"{boot}\"]"));
        std::fs::write(&dir.config, text).expect("config");
        nodes.push(dir.start_with_env(&env(i)));
    }
    let n = nodes.len();
    nodes[0].wait_status("all peers", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == n - 1));
    std::thread::sleep(Duration::from_secs(2));
    // Gates that no single node can decide: a test may run a node that lies from the
    // start, about version 1 too.
    let slm = fleet.signed_manifest_with(MODEL, 1, "v1.gguf", &["--wave", "1:0", "--min-reporting-nodes", "3"]);
    fleet.slmesh(&["publish", "--node", &nodes[0].http, "--manifest", slm.to_str().expect("path")]);
    for node in &nodes {
        node.wait_status("v1 active", WAIT, |s| model_field(s, MODEL, "active") == Some(1));
    }
    let stop_load = Arc::new(AtomicBool::new(false));
    let addrs: Vec<String> = nodes.iter().map(|n| n.http.clone()).collect();
    let stop = stop_load.clone();
    let load = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for a in &addrs {
                let _ = post_json(
                    a,
                    "/v1/chat/completions",
                    r#"{"model":"tiny","max_tokens":4,"messages":[{"role":"user","content":"hello"}]}"#,
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    Mesh { fleet, nodes, stop_load, load: Some(load) }
}

/// Wave fractions that put exactly `counts` (cumulative) of the cohort-sorted nodes in
/// each wave: halfway between the last cohort inside and the first outside.
pub fn waves_for(dirs: &[(NodeDir, f64)], counts: &[usize], soak: &str) -> Vec<String> {
    counts
        .iter()
        .map(|&k| {
            let f = if k >= dirs.len() { 1.0 } else { (dirs[k - 1].1 + dirs[k].1) / 2.0 };
            format!("{f}:{soak}")
        })
        .collect()
}

pub fn publish_v2(mesh: &Mesh, waves: &[String], gates: &[&str]) {
    let slm = signed_v2(mesh, waves, gates);
    mesh.fleet.slmesh(&["publish", "--node", &mesh.nodes[0].http, "--manifest", slm.to_str().expect("path")]);
}

fn signed_v2(mesh: &Mesh, waves: &[String], gates: &[&str]) -> std::path::PathBuf {
    let mut args: Vec<&str> = vec![];
    for w in waves {
        args.extend(["--wave", w]);
    }
    args.extend(gates);
    mesh.fleet.signed_manifest_with(MODEL, 2, "v2.gguf", &args)
}

/// Publishes version 2 with `slmesh publish --wait --timeout TIMEOUT`: its exit code and
/// what it printed, once the rollout completed, halted or timed out.
pub fn publish_v2_and_wait(mesh: &Mesh, waves: &[String], gates: &[&str], timeout: &str) -> (Option<i32>, String) {
    let slm = signed_v2(mesh, waves, gates);
    let node = &mesh.nodes[0].http;
    let path = slm.to_str().expect("path");
    mesh.fleet.slmesh_code(&["publish", "--node", node, "--manifest", path, "--wait", "--timeout", timeout])
}

pub const LENIENT_RATIOS: [&str; 6] =
    ["--max-p95-latency-ratio", "10", "--max-p95-ttft-ratio", "10", "--min-tokens-per-sec-ratio", "0.1"];
