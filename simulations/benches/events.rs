//! Simulator speed and the distribution figures of the shipped scenarios.
//!
//! Run: `cargo bench -p slmesh-sim --bench events`
//!
//! Each scenario runs three times; the wall time is the best of the three (this machine's
//! speed varies by a third from run to run), and the three reports must be identical.

use std::time::Instant;

fn main() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios");
    let names = [
        "good-1000-3-sites",
        "good-1000-whole-files",
        "good-10000",
        "bad-version-canary",
        "partition-heals",
        "churn-30",
    ];
    for name in names {
        let text = std::fs::read_to_string(format!("{dir}/{name}.toml")).expect("scenario");
        let sc = slmesh_sim::Scenario::parse(&text).expect("valid scenario");
        let mut best = f64::INFINITY;
        let mut reports = vec![];
        for _ in 0..3 {
            let started = Instant::now();
            reports.push(slmesh_sim::run(sc.clone()));
            best = best.min(started.elapsed().as_secs_f64());
        }
        let json: Vec<String> = reports.iter().map(|r| serde_json::to_string(r).expect("json")).collect();
        assert!(json.windows(2).all(|w| w[0] == w[1]), "{name}: runs differ");
        let r = &reports[0];
        println!(
            "{name:<22} {:>6} nodes {:>9} events in {best:>6.2} s = {:>9.0} events/s  distribution {} s (bound {:.1} s, {}x)  origin {:.2}x/site  gossip B/s/node: manifests {:.0}, metrics {:.0}  ever active {:.1}%{}",
            r.nodes,
            r.events,
            r.events as f64 / best,
            r.distribution_secs.map_or("-".into(), |d| format!("{d:.1}")),
            r.kumar_ross_secs,
            r.distribution_over_bound.map_or("-".into(), |x| format!("{x:.2}")),
            r.origin_egress_per_site,
            r.manifest_gossip_bytes_per_node_per_sec,
            r.metrics_gossip_bytes_per_node_per_sec,
            r.ever_activated_fraction * 100.0,
            r.halted.as_ref().map(|h| format!("  halted: {h}")).unwrap_or_default(),
        );
    }
}
