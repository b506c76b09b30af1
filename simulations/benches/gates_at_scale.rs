//! The gates at scale, on the node fleet (one real `Node` per simulated node): a bad
//! version is halted in its canary, one liar can neither save it nor stop a good one.
//!
//! Run: `cargo bench --workspace --bench gates_at_scale -- [NODES...] [good|bad|flatterer|accuser...]`
//! (default: 1000 nodes, every case)
//!
//! The fleet of `benches/nodes.rs` (three sites, gossip mesh of degree 4, metrics every
//! 10 s), waves of 5% / 25% / 100% with 30 s soaks, gates needing 3 nodes, 50 requests
//! and an error rate of at most 10%. Four cases: a good version; a bad one (half of its
//! requests fail); the bad one with one node of the canary that holds a metrics panel
//! seat and reports it perfect; the good one with one node outside the canary that holds a
//! seat and reports every request failed. Prints whether the rollout completed or halted,
//! when, and the blast radius: the share of nodes that ever served the new version.

use slmesh_protocol::cohort::cohort;
use slmesh_protocol::fleet::panel_rank;
use slmesh_protocol::rollout::Gates;
use slmesh_sim::engine::SECOND;
use slmesh_sim::fleet::{NodeFleet, MODEL};
use slmesh_sim::scenario::Behaviour;
use std::time::Instant;

mod common;

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Good,
    Bad,
    BadWithFlattererInCanary,
    GoodWithAccuserOutside,
}

const CANARY: f64 = 0.05;

/// The node that ranks lowest in version 2's metrics panel among those `pick` allows.
fn lowest_ranked(f: &NodeFleet, n: usize, pick: impl Fn(f64) -> bool) -> usize {
    (1..n)
        .filter(|i| pick(cohort(&f.id(*i), MODEL, 2)))
        .min_by_key(|i| panel_rank(&f.id(*i), MODEL, 2))
        .expect("a node")
}

fn run(n: usize, case: Case) {
    let started = Instant::now();
    let mut f = NodeFleet::new(common::fleet_spec(n, 10, 2_000_000));
    f.start_all();
    f.run_for(SECOND);
    let v1 = f.manifest(1, &[(1.0, 0)], NodeFleet::quick_gates(1));
    f.publish(0, v1).expect("publish v1");
    f.run_for(90 * SECOND);
    let bad = matches!(case, Case::Bad | Case::BadWithFlattererInCanary);
    if bad {
        let b = Behaviour { latency_median_secs: 0.2, ttft_median_secs: 0.05, tokens_per_sec: 50.0, error_rate: 0.5 };
        f.behaviour.insert(2, b);
    }
    let liar = match case {
        Case::BadWithFlattererInCanary => {
            let i = lowest_ranked(&f, n, |c| c < CANARY);
            f.nodes[i].flatterer = true;
            Some(i)
        }
        Case::GoodWithAccuserOutside => {
            let i = lowest_ranked(&f, n, |c| c >= 0.25);
            f.nodes[i].liar = true;
            Some(i)
        }
        _ => None,
    };
    let gates = Gates { min_samples: 50, min_reporting_nodes: 3, ..NodeFleet::quick_gates(3) };
    let v2 = f.manifest(2, &[(CANARY, 30), (0.25, 30), (1.0, 0)], gates);
    let since = f.now();
    f.publish(0, v2).expect("publish v2");
    let mut outcome = "neither, after 600 s".to_string();
    while f.now() - since < 600 * SECOND {
        f.run_for(SECOND);
        let secs = (f.now() - since) as f64 / 1e6;
        if f.live().all(|i| f.serving(i) == Some(2)) {
            outcome = format!("completed at {secs:.0} s");
            break;
        }
        let halted = f.live().all(|i| f.node(i).version_record(MODEL, 2).is_some_and(|r| r.halted.is_some()));
        if halted && f.live().all(|i| f.serving(i) != Some(2)) {
            outcome = format!("halted and rolled back at {secs:.0} s");
            break;
        }
    }
    let ever = (0..n).filter(|i| f.nodes[*i].served.iter().any(|(_, v)| *v == 2)).count();
    let label = match case {
        Case::Good => "good",
        Case::Bad => "bad (50% errors)",
        Case::BadWithFlattererInCanary => "bad, 1 liar in canary says perfect",
        Case::GoodWithAccuserOutside => "good, 1 liar outside says failing",
    };
    println!(
        "{:>6} {:<38} {:<30} {:>8.1}% {:>8} {:>8.1}",
        n,
        label,
        outcome,
        100.0 * ever as f64 / n as f64,
        liar.map_or("-".into(), |i| i.to_string()),
        started.elapsed().as_secs_f64()
    );
}

fn main() {
    slmesh_sim::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![1000] } else { sizes };
    let named = [
        ("good", Case::Good),
        ("bad", Case::Bad),
        ("flatterer", Case::BadWithFlattererInCanary),
        ("accuser", Case::GoodWithAccuserOutside),
    ];
    let mut cases: Vec<Case> =
        named.iter().filter(|(name, _)| args.iter().any(|a| a == name)).map(|(_, c)| *c).collect();
    if cases.is_empty() {
        cases = named.iter().map(|(_, c)| *c).collect();
    }
    println!("{:>6} {:<38} {:<30} {:>9} {:>8} {:>8}", "nodes", "case", "outcome", "blast", "liar", "wall s");
    for n in sizes {
        for case in &cases {
            run(n, *case);
        }
    }
}
