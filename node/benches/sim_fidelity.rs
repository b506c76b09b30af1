//! Simulator fidelity: the same small rollout (6 nodes, waves of 2/4/6 nodes, 4 s soak,
//! the same gates) run as real `slmesh node run` processes on loopback and in the
//! simulator; prints when each wave was fully active on the new version in both.
//!
//! Run: `cargo bench --workspace --profile dev --bench sim_fidelity`

use slmesh_e2e::fleet::{model_field, Fleet};
use slmesh_e2e::rollout_rig::{mesh_on_v1, nodes_by_cohort, publish_v2, waves_for, LENIENT_RATIOS, MODEL};
use slmesh_protocol::cohort::cohort;
use std::time::{Duration, Instant};

const SOAK: u64 = 4;

fn real() -> Vec<f64> {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let dirs = nodes_by_cohort(&fleet, 6, 2);
    let waves = waves_for(&dirs, &[2, 4, 6], &format!("{SOAK}s"));
    let mesh = mesh_on_v1(fleet, &dirs, |_| vec![]);
    let mut gates = vec!["--min-samples", "10", "--min-reporting-nodes", "2"];
    gates.extend(LENIENT_RATIOS);
    let start = Instant::now();
    publish_v2(&mesh, &waves, &gates);
    let mut active_at = [None::<f64>; 6];
    while active_at.iter().any(Option::is_none) && start.elapsed() < Duration::from_secs(180) {
        for (i, node) in mesh.nodes.iter().enumerate() {
            if active_at[i].is_none() && model_field(&node.status(), MODEL, "active") == Some(2) {
                active_at[i] = Some(start.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nodes are in cohort order: two per wave.
    if active_at.iter().any(Option::is_none) {
        let last = &mesh.nodes[5];
        eprintln!("{}", mesh.fleet.slmesh(&["rollout", "status", "--node", &last.http]));
        eprintln!("{}", mesh.fleet.slmesh(&["fleet", "--node", &last.http]));
    }
    let both = |a: Option<f64>, b: Option<f64>| a.zip(b).map_or(f64::NAN, |(a, b)| a.max(b));
    (0..3).map(|w| both(active_at[2 * w], active_at[2 * w + 1])).collect()
}

fn simulated() -> Vec<f64> {
    // Wave fractions that put simulated nodes 2/4/6 in waves, like the real run.
    let mut cohorts: Vec<f64> = (0..6).map(|i| cohort(&slmesh_sim::world::node_id(i), "model", 2)).collect();
    cohorts.sort_by(f64::total_cmp);
    let fractions = [(cohorts[1] + cohorts[2]) / 2.0, (cohorts[3] + cohorts[4]) / 2.0];
    let text = format!(
        r#"
name = "fidelity-6"
seed = 1
duration_secs = 300
latency_ms = [[0.1]]
[[sites]]
name = "loopback"
nodes = 6
uplink_mbps = 900
downlink_mbps = 900
[model]
size_mb = 0.02
chunk_mb = 0.5
transfer = "pieces"
request_rate = 4
baseline = {{ latency_median_secs = 0.02, ttft_median_secs = 0.01, tokens_per_sec = 200, error_rate = 0.0 }}
candidate = {{ latency_median_secs = 0.02, ttft_median_secs = 0.01, tokens_per_sec = 200, error_rate = 0.0 }}
[rollout]
publish_at_secs = 10
waves = [[{}, {SOAK}], [{}, {SOAK}], [1.0, 0]]
gates = {{ min_samples = 10, min_reporting_nodes = 1, max_p95_latency_ratio = 10, max_p95_ttft_ratio = 10, min_tokens_per_sec_ratio = 0.1 }}
[gossip]
degree = 5
metrics_interval_secs = 1
manifest_bytes = 2000
have_bytes = 300
metrics_record_bytes = 1400
"#,
        fractions[0], fractions[1]
    );
    let sc = slmesh_sim::Scenario::parse(&text).expect("scenario");
    let r = slmesh_sim::run(sc);
    r.waves.iter().map(|w| w.p100_secs.unwrap_or(f64::NAN)).collect()
}

fn main() {
    let real = real();
    let sim = simulated();
    println!("wave fully active on the new version, seconds after publication (6 nodes, 2 per wave, {SOAK} s soak):");
    println!("{:>5} {:>10} {:>10} {:>8}", "wave", "real", "simulated", "sim-real");
    for w in 0..3 {
        println!("{:>5} {:>10.2} {:>10.2} {:>+8.2}", w + 1, real[w], sim[w], sim[w] - real[w]);
    }
}
