//! Speed of the simulator's fleet of node state machines (`fleet::NodeFleet`): one real
//! `slmesh_protocol::node::Node` per simulated node, signatures and all.
//!
//! Run: `cargo bench --workspace --bench nodes -- [NODES...] [interval=SECS]` (default:
//! 30 100 300, metrics every 10 s)
//!
//! A good three-wave rollout (5% / 25% / 100%, 30 s soaks, gates needing 3 nodes and 50
//! requests) over three sites (1 / 20 / 40 ms apart), 100 Mbit/s links, a gossip mesh of
//! degree 4, a 20 MB model, metrics every 10 s (the node's default). Prints the
//! wall time, events per second, the simulated time until every node served the new
//! version, and per node during the rollout: metrics gossip received and forwarded per
//! simulated second, have-record bytes received (they go to direct peers only), and
//! manifest gossip received and forwarded per second; then metrics gossip per node once the
//! fleet has settled (200 s after the last wave soaked).

use slmesh_protocol::node::RequestKind;
use slmesh_protocol::rollout::Gates;
use slmesh_sim::engine::SECOND;
use slmesh_sim::fleet::NodeFleet;
use std::time::Instant;

mod common;

/// Runs until every live node serves `version`, or `cap` simulated seconds pass; the
/// simulated seconds it took.
fn until_all(f: &mut NodeFleet, version: u64, cap: u64) -> Option<f64> {
    let start = f.now();
    while f.now() - start < cap * SECOND {
        f.run_for(SECOND);
        if f.live().all(|i| f.serving(i) == Some(version)) {
            return Some((f.now() - start) as f64 / 1e6);
        }
    }
    None
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![30, 100, 300] } else { sizes };
    let interval_secs: u64 =
        args.iter().find_map(|a| a.strip_prefix("interval=")).and_then(|s| s.parse().ok()).unwrap_or(10).max(1);
    println!(
        "{:>6} {:>9} {:>11} {:>10} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "nodes",
        "wall s",
        "events",
        "events/s",
        "rollout s",
        "metrics B/s",
        "records/s",
        "haves B/ver",
        "manifest B/s",
        "settled B/s"
    );
    for n in sizes {
        let started = Instant::now();
        let mut f = NodeFleet::new(common::fleet_spec(n, interval_secs, 20_000_000));
        f.start_all();
        f.run_for(SECOND);
        let v1 = f.manifest(1, &[(1.0, 0)], NodeFleet::quick_gates(1));
        f.publish(0, v1).expect("publish v1");
        until_all(&mut f, 1, 600).expect("version 1 everywhere");
        // The very first version of the first model: no panel exists yet to tell a node
        // how large the fleet is, so every node reports it once. Measured apart; the
        // rollout below starts once that has settled.
        let (first, _) = f.gossip_originated.get(slmesh_protocol::mesh::TOPIC_METRICS).copied().unwrap_or_default();
        f.run_for(30 * SECOND);
        let (settled, _) = f.gossip_originated.get(slmesh_protocol::mesh::TOPIC_METRICS).copied().unwrap_or_default();
        eprintln!(
            "{n} nodes: {} metrics records in the 30 s after the first version reached every node",
            settled - first
        );
        let gates = Gates { min_samples: 50, min_reporting_nodes: 3, ..NodeFleet::quick_gates(3) };
        let v2 = f.manifest(2, &[(0.05, 30), (0.25, 30), (1.0, 0)], gates);
        let sim_before = f.now();
        let gossip_before = f.gossip_bytes.clone();
        let originated_before = f.gossip_originated.clone();
        let haves_before = f.request_bytes.get(&RequestKind::Have).copied().unwrap_or(0);
        f.publish(0, v2).expect("publish v2");
        let rollout = until_all(&mut f, 2, 900);
        let wall = started.elapsed().as_secs_f64();
        let span = (f.now() - sim_before) as f64 / 1e6;
        // Received + forwarded: every byte one node sends is one another receives (the
        // links lose nothing here), so per node it is twice what nodes send on average.
        let per_node = |after: &std::collections::BTreeMap<&str, u64>,
                        before: &std::collections::BTreeMap<&str, u64>,
                        topic: &str,
                        span: f64| {
            let sent = after.get(topic).copied().unwrap_or(0) - before.get(topic).copied().unwrap_or(0);
            2.0 * sent as f64 / n as f64 / span
        };
        let (metrics_topic, manifests_topic) =
            (slmesh_protocol::mesh::TOPIC_METRICS, slmesh_protocol::mesh::TOPIC_MANIFESTS);
        let metrics = per_node(&f.gossip_bytes, &gossip_before, metrics_topic, span);
        let manifests = per_node(&f.gossip_bytes, &gossip_before, manifests_topic, span);
        let haves = f.request_bytes.get(&RequestKind::Have).copied().unwrap_or(0) - haves_before;
        let events = f.events_processed();
        // Metrics records originated fleet-wide per simulated second, and their mean size.
        let (count, bytes) = f.gossip_originated.get(metrics_topic).copied().unwrap_or_default();
        let (count0, bytes0) = originated_before.get(metrics_topic).copied().unwrap_or_default();
        let records = format!(
            "{:.1}x{:.0}B",
            (count - count0) as f64 / span,
            (bytes - bytes0) as f64 / (count - count0).max(1) as f64
        );
        // Settled: once the last wave has soaked, metrics go at the refresh pace (50 s).
        f.run_for(60 * SECOND);
        let (settled_before, settled_from) = (f.gossip_bytes.clone(), f.now());
        f.run_for(200 * SECOND);
        let settled = per_node(&f.gossip_bytes, &settled_before, metrics_topic, (f.now() - settled_from) as f64 / 1e6);
        println!(
            "{:>6} {:>9.2} {:>11} {:>10.0} {:>10} {:>12.0} {:>12} {:>12.0} {:>12.0} {:>12.0}",
            n,
            wall,
            events,
            events as f64 / wall,
            rollout.map_or("never".to_string(), |s| format!("{s:.0}")),
            metrics,
            records,
            haves as f64 / n as f64,
            manifests,
            settled,
        );
    }
}
