//! The slmesh network simulator: the protocol core's rollout machinery (cohorts and waves,
//! provider ranking, the upload policy, fleet metrics, gates, the rollout engine) driven
//! over thousands of simulated nodes, with simulated time, links, bandwidth, loss,
//! partitions and churn. Same seed, same report, byte for byte.

pub mod engine;
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
