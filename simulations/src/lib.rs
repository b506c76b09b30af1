//! The slmesh network simulator. Two worlds over the same discrete-event engine and links:
//!
//! - `fleet::NodeFleet`: one instance of the node's own state machine
//!   (`slmesh_protocol::node::Node`) per simulated node; every decision (admission,
//!   gossip, fetch, waves, gates, activation, rollback) is the node's. It is also the
//!   in-memory multi-node test bed of the state machine.
//! - `world::World`: piece-level swarming over thousands of nodes (rarest first, provider
//!   queues, origin seeding) with the protocol core's rollout functions, for distribution
//!   figures; piece scheduling has not moved into the node state machine yet.
//!
//! Simulated time, links, bandwidth, loss, partitions and churn. Same seed, same report,
//! byte for byte.

pub mod engine;
pub mod fleet;
pub mod net;
pub mod report;
pub mod scenario;
pub mod world;

pub use scenario::Scenario;
pub use world::{CoverageSample, Report, World};

/// Runs a scenario to its end.
pub fn run(scenario: Scenario) -> Report {
    World::new(scenario).run()
}
