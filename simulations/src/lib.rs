//! The slmesh network simulator: N instances of the node's own state machine
//! (`slmesh_protocol::node::Node`) over simulated links.
//!
//! - `fleet::NodeFleet`: one state machine per simulated node; every decision
//!   (admission, gossip, when and from whom to fetch each piece, waves with the canary
//!   floor, gates, activation, rollback) is the node's. It is also the in-memory
//!   multi-node test bed of the state machine.
//! - `run`: a scenario file (`scenario::Scenario`: sites, links, faults, the plan) run on
//!   a `NodeFleet`, with its report (`report::Report`).
//!
//! Simulated time, links, bandwidth, loss, partitions and churn. Same seed, same report,
//! byte for byte.

pub mod engine;
pub mod fleet;
pub mod net;
pub mod plot;
pub mod report;
pub mod run;
pub mod scenario;

pub use report::{CoverageSample, Report};
pub use run::{run, run_with_progress};
pub use scenario::Scenario;

/// The allocator of the simulator's own binaries (`#[global_allocator] static A:
/// slmesh_sim::Allocator = slmesh_sim::Allocator;`): thousands of state machines decode,
/// clone and drop small values all the time, and glibc's malloc and free were a quarter
/// of a 3,000-node run's time. Not set here, since the node links this crate too.
pub use mimalloc::MiMalloc as Allocator;
