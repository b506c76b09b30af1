//! Gossip bytes per node, measured on real `slmesh node run` processes and predicted by
//! the simulator for the same fleet shape: 24 nodes on loopback (the tiny test model, a
//! trickle of chat requests to every node), metrics every 10 s (the node's default), a
//! three-wave rollout (2, 6, then all 24 nodes; 20 s soaks). Real figures come from
//! gossipsub's own counters (`/v1/status` `gossip`: messages published or forwarded, and
//! received with duplicates, at their encoded size); the simulator's from its links (each
//! message a node sends is one another receives). Both over the window from publication
//! until every node serves the new version. The simulator is given the spread of the
//! latencies the real nodes measured (it decides how full a record's sketches are).
//!
//! Run: `cargo bench --workspace --profile dev --bench gossip_bytes [-- NODES]`

use slmesh_e2e::fleet::{model_field, Fleet, Running};
use slmesh_e2e::rollout_rig::{mesh_on_v1, nodes_by_cohort_with, publish_v2, waves_for, LENIENT_RATIOS, MODEL};
use slmesh_protocol::cohort::cohort;
use slmesh_protocol::mesh::{TOPIC_MANIFESTS, TOPIC_METRICS};
use slmesh_protocol::rollout::Gates;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const SOAK_SECS: u64 = 20;

/// Per topic, since the node started: [bytes sent + received, messages sent + received,
/// messages it published].
fn gossip_of(node: &Running) -> BTreeMap<String, [u64; 3]> {
    let status = node.status();
    let mut out = BTreeMap::new();
    for g in status["gossip"].as_array().into_iter().flatten() {
        let topic = g["topic"].as_str().unwrap_or_default().to_string();
        let field = |k: &str| g[k].as_u64().unwrap_or(0);
        let counts = [
            field("sent") + field("received"),
            field("sent_messages") + field("received_messages"),
            field("published"),
        ];
        out.insert(topic, counts);
    }
    out
}

/// What a fleet's metrics gossip was made of during the rollout: records published per
/// second fleet-wide, and the mean size of a metrics message.
struct Makeup {
    records_per_sec: f64,
    message_bytes: f64,
}

/// Wave sizes: 2, 6, then everyone (cumulative).
fn wave_counts(n: usize) -> Vec<usize> {
    vec![2, 6.min(n), n]
}

/// Per node: (metrics B/s, manifests B/s), received + sent, during the rollout; the
/// rollout's length in seconds; the metrics gossip's makeup; the spread of the measured
/// latencies (sigma of a log-normal).
fn real(n: usize) -> (Vec<(f64, f64)>, f64, Makeup, f64) {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let dirs = nodes_by_cohort_with(&fleet, n, 2, &[]);
    let waves = waves_for(&dirs, &wave_counts(n), &format!("{SOAK_SECS}s"));
    let mesh = mesh_on_v1(fleet, &dirs, |_| vec![]);
    // The first version of the first model is reported once by every node: let it settle.
    std::thread::sleep(Duration::from_secs(30));
    let mut gates = vec!["--min-samples", "10", "--min-reporting-nodes", "2"];
    gates.extend(LENIENT_RATIOS);
    let before: Vec<BTreeMap<String, [u64; 3]>> = mesh.nodes.iter().map(gossip_of).collect();
    let start = Instant::now();
    publish_v2(&mesh, &waves, &gates);
    while !mesh.nodes.iter().all(|node| model_field(&node.status(), MODEL, "active") == Some(2)) {
        assert!(start.elapsed() < Duration::from_secs(600), "the rollout did not complete");
        std::thread::sleep(Duration::from_millis(500));
    }
    let span = start.elapsed().as_secs_f64();
    // How widely the latencies spread decides how many buckets a record's sketches fill:
    // the simulator is given the spread the real nodes measured of version 2.
    let (_, fleet) = slmesh_e2e::http(&mesh.nodes[0].http, "GET", "/v1/fleet", &[], vec![]);
    let fleet: serde_json::Value = serde_json::from_str(&fleet).unwrap_or_default();
    let v2 = fleet["versions"].as_array().into_iter().flatten().find(|v| v["version"] == 2);
    let quantile = |k: &str| v2.and_then(|v| v[k].as_f64()).filter(|x| *x > 0.0);
    let spread = match (quantile("p50_latency_secs"), quantile("p95_latency_secs")) {
        (Some(p50), Some(p95)) => (p95 / p50).ln().max(0.0) / 1.645,
        _ => 0.3,
    };
    println!(
        "real latencies of version 2: p50 {:.1} ms, p95 {:.1} ms (log-normal sigma {spread:.2})",
        quantile("p50_latency_secs").unwrap_or(0.0) * 1e3,
        quantile("p95_latency_secs").unwrap_or(0.0) * 1e3
    );
    let after: Vec<BTreeMap<String, [u64; 3]>> = mesh.nodes.iter().map(gossip_of).collect();
    let delta = |i: usize, t: &str, k: usize| {
        let get = |m: &BTreeMap<String, [u64; 3]>| m.get(t).map_or(0, |c| c[k]);
        get(&after[i]).saturating_sub(get(&before[i]))
    };
    let per_node = (0..n)
        .map(|i| (delta(i, TOPIC_METRICS, 0) as f64 / span, delta(i, TOPIC_MANIFESTS, 0) as f64 / span))
        .collect();
    let total = |k: usize| (0..n).map(|i| delta(i, TOPIC_METRICS, k)).sum::<u64>() as f64;
    let makeup = Makeup { records_per_sec: total(2) / span, message_bytes: total(0) / total(1).max(1.0) };
    (per_node, span, makeup, spread)
}

/// The same rollout on the simulator's fleet of node state machines.
fn simulated(n: usize, latency_spread: f64) -> ((f64, f64), f64, Makeup) {
    use slmesh_sim::engine::SECOND;
    use slmesh_sim::fleet::{FleetSpec, NodeFleet};
    let mut spec = FleetSpec::lan(n);
    spec.latency_ms = vec![vec![0.1]];
    // As crates/mesh keeps it: 4, and 3 for metrics (the simulated fleet thins it). A node
    // keeps 12 connections (crates/mesh's TARGET_PEERS), its gossip mesh among them.
    spec.mesh_degree = slmesh_protocol::mesh::GOSSIP_MESH_DEGREE;
    spec.peer_degree = 12;
    spec.load_ms = 300;
    // The bench's load loop reaches each node about once a second.
    spec.request_rate = 1.0;
    spec.latency_spread = latency_spread;
    spec.model_bytes = 100_000;
    spec.node_config.metrics_interval_ms = 10_000;
    spec.node_config.metrics_ttl_secs = 180;
    spec.node_config.sync_interval_ms = 30_000;
    let mut f = NodeFleet::on_v1(spec);
    f.run_for(30 * SECOND);
    let mut cohorts: Vec<f64> = (0..n).map(|i| cohort(&f.id(i), slmesh_sim::fleet::MODEL, 2)).collect();
    cohorts.sort_by(f64::total_cmp);
    let waves: Vec<(f64, u64)> = wave_counts(n)
        .iter()
        .map(|&k| (if k >= n { 1.0 } else { (cohorts[k - 1] + cohorts[k]) / 2.0 }, SOAK_SECS))
        .collect();
    let gates = Gates { min_samples: 10, min_reporting_nodes: 2, ..NodeFleet::quick_gates(2) };
    let m = f.manifest(2, &waves, gates);
    let (before, started) = (f.gossip_bytes.clone(), f.now());
    let originated = |f: &NodeFleet| f.gossip_originated.get(TOPIC_METRICS).copied().unwrap_or_default();
    let originated_before = originated(&f);
    f.publish(0, m).expect("publish");
    while !f.live().all(|i| f.serving(i) == Some(2)) {
        assert!(f.now() - started < 600 * SECOND, "the simulated rollout did not complete");
        f.run_for(SECOND / 2);
    }
    let span = (f.now() - started) as f64 / 1e6;
    let rate = |t: &str| {
        let sent = f.gossip_bytes.get(t).copied().unwrap_or(0) - before.get(t).copied().unwrap_or(0);
        2.0 * sent as f64 / n as f64 / span
    };
    let (records, bytes) = originated(&f);
    let (records, bytes) = (records - originated_before.0, bytes - originated_before.1);
    let envelope = slmesh_sim::fleet::gossip_envelope_bytes(TOPIC_METRICS) as f64;
    let message_bytes = bytes as f64 / (records as f64).max(1.0) + envelope;
    (
        (rate(TOPIC_METRICS), rate(TOPIC_MANIFESTS)),
        span,
        Makeup { records_per_sec: records as f64 / span, message_bytes },
    )
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(24);
    let (real_nodes, real_span, real_makeup, spread) = real(n);
    let ((sim_metrics, sim_manifests), sim_span, sim_makeup) = simulated(n, spread);
    let mean = |f: &dyn Fn(&(f64, f64)) -> f64| real_nodes.iter().map(f).sum::<f64>() / real_nodes.len() as f64;
    let (real_metrics, real_manifests) = (mean(&|x| x.0), mean(&|x| x.1));
    let spread = |f: &dyn Fn(&(f64, f64)) -> f64| {
        let v: Vec<f64> = real_nodes.iter().map(f).collect();
        (v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max))
    };
    let (lo, hi) = spread(&|x| x.0);
    println!("{n} nodes, metrics every 10 s, waves of 2 / 6 / {n} nodes, {SOAK_SECS} s soaks");
    println!("rollout: real {real_span:.0} s, simulated {sim_span:.0} s");
    println!(
        "metrics gossip per node, received + sent: real {real_metrics:.0} B/s (nodes {lo:.0} to {hi:.0}), \
         simulated {sim_metrics:.0} B/s, real / simulated {:.2}",
        real_metrics / sim_metrics
    );
    println!(
        "manifest gossip per node: real {real_manifests:.0} B/s, simulated {sim_manifests:.0} B/s, ratio {:.2}",
        real_manifests / sim_manifests.max(1e-9)
    );
    println!(
        "metrics records published fleet-wide: real {:.2}/s, simulated {:.2}/s; mean metrics message: real {:.0} B, \
         simulated {:.0} B",
        real_makeup.records_per_sec, sim_makeup.records_per_sec, real_makeup.message_bytes, sim_makeup.message_bytes
    );
    let within = |r: f64| if (0.7..=1.3).contains(&r) { "within 30%" } else { "NOT within 30%" };
    let per_node_within = real_nodes.iter().filter(|x| (0.7..=1.3).contains(&(x.0 / sim_metrics))).count();
    println!(
        "metrics: mean {}; {per_node_within} of {n} nodes within 30% of the simulated figure",
        within(real_metrics / sim_metrics)
    );
}
