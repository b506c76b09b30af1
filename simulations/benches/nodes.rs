//! Speed of the simulator's fleet of node state machines (`fleet::NodeFleet`): one real
//! `slmesh_protocol::node::Node` per simulated node, signatures and all.
//!
//! Run: `cargo bench --workspace --bench nodes -- [NODES...] [interval=SECS] [plot=FILE.svg]
//! [settled=no]` (default: 30 100 300, metrics every 10 s)
//!
//! A good three-wave rollout (5% / 25% / 100%, 30 s soaks, gates needing 3 nodes and 50
//! requests) over three sites (1 / 20 / 40 ms apart), 100 Mbit/s links, a gossip mesh of
//! degree 4 (3 for metrics), a 20 MB model, metrics every 10 s (the node's default). Prints the
//! wall time, events per second, the simulated time until every node served the new
//! version, and per node during the rollout: metrics gossip received and forwarded per
//! simulated second, have-record bytes received (they go to direct peers only), and
//! manifest gossip received and forwarded per second; then metrics gossip per node once the
//! fleet has settled (200 s after the last wave soaked; `settled=no` skips it, which at
//! 100,000 nodes saves as much time again as the rollout took), and the process's peak
//! resident memory so far (`VmHWM`: with sizes in ascending order, that of the largest
//! fleet yet). Then, per node and simulated
//! second during the rollout, each term of what a node receives and sends (gossip by
//! topic, and requests with their answers by kind) and which one dominates; `plot=`
//! draws them against the fleet's size (log-log).

use slmesh_protocol::mesh::{TOPIC_COMMANDS, TOPIC_MANIFESTS, TOPIC_METRICS, TOPIC_REVOCATIONS};
use slmesh_protocol::node::RequestKind;
use slmesh_protocol::rollout::Gates;
use slmesh_sim::engine::SECOND;
use slmesh_sim::fleet::NodeFleet;
use slmesh_sim::plot::{line_chart, Chart, Series};
use std::collections::BTreeMap;
use std::time::Instant;

/// The terms of a node's traffic, received + sent per simulated second.
const TERMS: [&str; 5] =
    ["metrics gossip", "manifest, command and revocation gossip", "have records", "anti-entropy", "hellos"];

/// Bytes moved fleet-wide per term between two snapshots of the fleet's counters.
fn terms(
    f: &NodeFleet,
    gossip: &BTreeMap<&str, u64>,
    requests: &BTreeMap<RequestKind, u64>,
    responses: &BTreeMap<RequestKind, u64>,
) -> [u64; 5] {
    let g = |t: &str| f.gossip_bytes.get(t).copied().unwrap_or(0) - gossip.get(t).copied().unwrap_or(0);
    let r = |k: RequestKind| {
        let req = f.request_bytes.get(&k).copied().unwrap_or(0) - requests.get(&k).copied().unwrap_or(0);
        let resp = f.response_bytes.get(&k).copied().unwrap_or(0) - responses.get(&k).copied().unwrap_or(0);
        req + resp
    };
    [
        g(TOPIC_METRICS),
        g(TOPIC_MANIFESTS) + g(TOPIC_COMMANDS) + g(TOPIC_REVOCATIONS),
        r(RequestKind::Have),
        r(RequestKind::Sync),
        r(RequestKind::Hello),
    ]
}

mod common;

/// The process's peak resident memory so far, from Linux's `/proc/self/status`.
fn peak_resident_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

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
    slmesh_sim::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![30, 100, 300] } else { sizes };
    let interval_secs: u64 =
        args.iter().find_map(|a| a.strip_prefix("interval=")).and_then(|s| s.parse().ok()).unwrap_or(10).max(1);
    let plot = args.iter().find_map(|a| a.strip_prefix("plot="));
    let measure_settled = !args.iter().any(|a| a == "settled=no");
    // Per fleet size: each term, received + sent per node per simulated second.
    let mut by_term: Vec<(usize, [f64; 5])> = vec![];
    println!(
        "{:>6} {:>9} {:>11} {:>10} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>9}",
        "nodes",
        "wall s",
        "events",
        "events/s",
        "rollout s",
        "metrics B/s",
        "records/s",
        "haves B/ver",
        "manifest B/s",
        "settled B/s",
        "peak MiB"
    );
    for n in sizes {
        let started = Instant::now();
        let mut f = NodeFleet::new(common::fleet_spec(n, interval_secs, 20_000_000));
        f.start_all();
        f.run_for(SECOND);
        let v1 = f.manifest(1, &[(1.0, 0)], NodeFleet::quick_gates(1));
        f.publish(0, v1).expect("publish v1");
        if until_all(&mut f, 1, 600).is_none() {
            let serving = f.live().filter(|i| f.serving(*i) == Some(1)).count();
            let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
            for (_, why) in &f.refusals {
                *reasons.entry(why.chars().take(60).collect()).or_default() += 1;
            }
            let missing: Vec<String> = f
                .live()
                .filter(|i| f.serving(*i) != Some(1))
                .take(5)
                .map(|i| {
                    let admitted = f.node(i).admitted().count();
                    format!(
                        "node {i}: {} peers, {} gossip peers, {admitted} admitted",
                        f.nodes[i].peers.len(),
                        f.nodes[i].mesh.len()
                    )
                })
                .collect();
            panic!("version 1 reached {serving} of {n} nodes in 600 s ({missing:?}); refusals: {reasons:?}");
        }
        // The very first version of the first model: no panel exists yet to tell a node
        // how large the fleet is, so each node reports it unless the records it heard fill
        // the panel with lower ranks first. Measured apart; the
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
        let (requests_before, responses_before) = (f.request_bytes.clone(), f.response_bytes.clone());
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
        // Each byte a node sends is one another receives: received + sent per node is twice
        // the fleet's bytes over the nodes.
        let moved = terms(&f, &gossip_before, &requests_before, &responses_before);
        by_term.push((n, moved.map(|b| 2.0 * b as f64 / n as f64 / span)));
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
        let settled = if measure_settled {
            f.run_for(60 * SECOND);
            let (settled_before, settled_from) = (f.gossip_bytes.clone(), f.now());
            f.run_for(200 * SECOND);
            let span = (f.now() - settled_from) as f64 / 1e6;
            format!("{:.0}", per_node(&f.gossip_bytes, &settled_before, metrics_topic, span))
        } else {
            "-".to_string()
        };
        println!(
            "{:>6} {:>9.2} {:>11} {:>10.0} {:>10} {:>12.0} {:>12} {:>12.0} {:>12.0} {:>12} {:>9}",
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
            peak_resident_mib().map_or("-".to_string(), |m| m.to_string()),
        );
    }
    println!();
    println!("per node, received + sent, B/s during the rollout:");
    print!("{:>6}", "nodes");
    for t in TERMS {
        print!(" | {t}");
    }
    println!(" | dominant");
    for (n, values) in &by_term {
        print!("{n:>6}");
        for v in values {
            print!(" | {v:.0}");
        }
        let top = values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
        println!(" | {}", TERMS[top]);
    }
    if let Some(path) = plot {
        let series: Vec<Series> = TERMS
            .iter()
            .enumerate()
            .map(|(i, t)| Series {
                name: t.to_string(),
                points: by_term.iter().map(|(n, v)| (*n as f64, v[i].max(0.1))).collect(),
            })
            .collect();
        let chart = Chart {
            title: "What a node receives and sends during a rollout, by fleet size (simulated)",
            x_label: "nodes in the fleet",
            y_label: "bytes per second per node (received + sent)",
            log_x: true,
            log_y: true,
        };
        match line_chart(&chart, &series) {
            Ok(svg) => match std::fs::write(path, svg) {
                Ok(()) => println!("wrote {path}"),
                Err(e) => eprintln!("cannot write {path}: {e}"),
            },
            Err(e) => eprintln!("cannot draw the chart: {e}"),
        }
    }
}
