//! The shipped scenarios on the node fleet (every node the node's own state machine):
//! simulator speed, distribution against the Kumar-Ross bound, origin egress, gossip.
//!
//! Run: `cargo bench --workspace --locked --bench events -- [SCENARIO[@SEED] ...]` (all of
//! them by default; `good-10000` takes minutes). Same seed, same report: the test
//! `the_same_seed_gives_the_same_report_byte_for_byte` checks it. `NAME@SEED` runs the
//! scenario with another seed (another peer graph, jitter and loss): a distribution time
//! moves by ±10% with the seed alone, so compare changes over several.

use std::time::Instant;

#[global_allocator]
static ALLOCATOR: slmesh_sim::Allocator = slmesh_sim::Allocator;

const SCENARIOS: [&str; 5] = ["good-1000-3-sites", "bad-version-canary", "partition-heals", "churn-30", "good-10000"];

fn main() {
    slmesh_sim::keep_freed_memory();
    let dir = slmesh_sim::Scenario::shipped_dir();
    let asked: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let names: Vec<String> = if asked.is_empty() { SCENARIOS.iter().map(|s| s.to_string()).collect() } else { asked };
    for name in names {
        let (file, seed) = match name.split_once('@') {
            Some((file, seed)) => (file, Some(seed.parse::<u64>().expect("a seed is a number"))),
            None => (name.as_str(), None),
        };
        let text = std::fs::read_to_string(format!("{dir}/{file}.toml")).expect("scenario");
        let mut sc = slmesh_sim::Scenario::parse(&text).expect("valid scenario");
        if let Some(seed) = seed {
            sc.seed = seed;
        }
        let started = Instant::now();
        let r = slmesh_sim::run(sc);
        let wall = started.elapsed().as_secs_f64();
        println!(
            "{name:<20} {:>6} nodes {:>11} events in {wall:>7.1} s = {:>9.0} events/s  distribution {} s (bound {:.1} s, {}x)  origin {:.2}x/site  manifest p50/p99 {}/{} s  gossip B/s/node: manifests {:.0}, metrics {:.0} (from publication {:.0}; start-up {:.1} KB/node)  haves {:.1} KB/node  ever active {:.1}%{}",
            r.nodes,
            r.events,
            r.events as f64 / wall,
            r.distribution_secs.map_or("-".into(), |d| format!("{d:.1}")),
            r.kumar_ross_secs,
            r.distribution_over_bound.map_or("-".into(), |x| format!("{x:.2}")),
            r.origin_egress_per_site,
            r.manifest_propagation_p50_secs.map_or("-".into(), |x| format!("{x:.2}")),
            r.manifest_propagation_p99_secs.map_or("-".into(), |x| format!("{x:.2}")),
            r.manifest_gossip_bytes_per_node_per_sec,
            r.metrics_gossip_bytes_per_node_per_sec,
            r.metrics_gossip_rollout_bytes_per_node_per_sec,
            r.metrics_gossip_start_bytes_per_node / 1e3,
            r.have_bytes_per_node / 1e3,
            r.ever_activated_fraction * 100.0,
            r.halted.as_ref().map(|h| format!("  halted: {h}")).unwrap_or_default(),
        );
        for w in &r.waves {
            println!(
                "    wave {} ({} nodes): 50% {} s, 100% {} s",
                w.wave,
                w.members,
                w.p50_secs.map_or("-".into(), |x| format!("{x:.1}")),
                w.p100_secs.map_or("-".into(), |x| format!("{x:.1}"))
            );
        }
    }
}
