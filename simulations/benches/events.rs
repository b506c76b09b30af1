//! Simulator speed and the distribution figures of the shipped scenarios.
//!
//! Run: `cargo bench -p slmesh-sim --bench events`

use std::time::Instant;

fn main() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios");
    for name in ["good-1000-3-sites", "good-10000", "bad-version-canary", "partition-heals", "churn-30"] {
        let text = std::fs::read_to_string(format!("{dir}/{name}.toml")).expect("scenario");
        let sc = slmesh_sim::Scenario::parse(&text).expect("valid scenario");
        let started = Instant::now();
        let r = slmesh_sim::run(sc);
        let wall = started.elapsed().as_secs_f64();
        println!(
            "{name:<20} {:>6} nodes  {:>9} events in {wall:>6.2} s = {:>9.0} events/s  distribution {} s (bound {:.1} s, {}x)  origin {:.2}x/site  metrics {:.0} B/s/node  ever active {:.1}%{}",
            r.nodes,
            r.events,
            r.events as f64 / wall,
            r.distribution_secs.map_or("-".into(), |d| format!("{d:.1}")),
            r.kumar_ross_secs,
            r.distribution_over_bound.map_or("-".into(), |x| format!("{x:.2}")),
            r.origin_egress_per_site,
            r.metrics_gossip_bytes_per_node_per_sec,
            r.ever_activated_fraction * 100.0,
            r.halted.as_ref().map(|h| format!("  halted: {h}")).unwrap_or_default(),
        );
    }
}
