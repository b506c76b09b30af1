//! Simulator fidelity: the same small rollout (6 nodes, waves of 2/4/6 nodes, 4 s soak,
//! the same gates) run as real `slmesh node run` processes on loopback and on the
//! simulator's fleet of node state machines (the same decision code in both); prints when
//! each wave was fully active on the new version in both.
//!
//! Run: `cargo bench --workspace --profile dev --bench sim_fidelity`

use slmesh_e2e::fleet::{model_field, Fleet};
use slmesh_e2e::rollout_rig::{mesh_on_v1, nodes_by_cohort, publish_v2, waves_for, LENIENT_RATIOS, MODEL};
use slmesh_protocol::cohort::cohort;
use slmesh_protocol::rollout::Gates;
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

/// The same rollout on the simulator's fleet of node state machines: the same plan and
/// gates, decided by the same code; only links, transfers, loads and requests are modelled
/// (0.1 ms loopback links, a 300 ms load, 8 requests/s per node as the rig sends).
fn simulated() -> Vec<f64> {
    use slmesh_sim::engine::SECOND;
    use slmesh_sim::fleet::{FleetSpec, NodeFleet};
    let mut spec = FleetSpec::lan(6);
    spec.latency_ms = vec![vec![0.1]];
    spec.load_ms = 300;
    spec.request_rate = 8.0;
    spec.model_bytes = 100_000;
    spec.node_config.metrics_ttl_secs = 600;
    spec.node_config.sync_interval_ms = 30_000;
    let mut f = NodeFleet::on_v1(spec);
    // Wave fractions that put 2/4/6 of the simulated nodes in waves, like the real run.
    let mut order: Vec<(f64, usize)> = (0..6).map(|i| (cohort(&f.id(i), slmesh_sim::fleet::MODEL, 2), i)).collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let cut = |k: usize| (order[k - 1].0 + order[k].0) / 2.0;
    let waves = [(cut(2), SOAK), (cut(4), SOAK), (1.0, 0)];
    let gates = Gates {
        min_samples: 10,
        min_reporting_nodes: 2,
        max_p95_latency_ratio: 10.0,
        max_p95_ttft_ratio: 10.0,
        min_tokens_per_sec_ratio: 0.1,
        ..Gates::default()
    };
    let m = f.manifest(2, &waves, gates);
    let published = f.now();
    f.publish(0, m).expect("publish v2");
    f.run_for(120 * SECOND);
    let first = f.first_served(2, published);
    let at = |k: usize| first[order[k].1].unwrap_or(f64::NAN);
    (0..3).map(|w| at(2 * w).max(at(2 * w + 1))).collect()
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
