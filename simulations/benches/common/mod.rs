//! The fleet the node-fleet benches share: three sites (1 / 20 / 40 ms apart), 100 Mbit/s
//! links, a gossip mesh of degree 4 (3 for metrics, as `crates/mesh` keeps), anti-entropy
//! every 30 s.

use slmesh_sim::fleet::FleetSpec;

#[global_allocator]
static ALLOCATOR: slmesh_sim::Allocator = slmesh_sim::Allocator;

pub fn fleet_spec(n: usize, interval_secs: u64, model_bytes: u64) -> FleetSpec {
    let mut spec = FleetSpec::lan(n);
    let third = n / 3;
    spec.sites = vec![third, third, n - 2 * third];
    spec.latency_ms = vec![vec![1.0, 20.0, 40.0], vec![20.0, 1.0, 30.0], vec![40.0, 30.0, 1.0]];
    spec.uplink_bytes_per_sec = 12.5e6;
    spec.downlink_bytes_per_sec = 12.5e6;
    spec.mesh_degree = slmesh_protocol::mesh::GOSSIP_MESH_DEGREE;
    spec.model_bytes = model_bytes;
    spec.node_config.metrics_interval_ms = interval_secs.max(1) * 1000;
    // Above the five intervals after which an unchanged record is sent again.
    spec.node_config.metrics_ttl_secs = (12 * interval_secs).max(120);
    spec.node_config.sync_interval_ms = 30_000;
    spec
}
