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

/// Tells the simulator's allocator to keep the memory it frees instead of returning it to
/// the OS after a second (mimalloc's `purge_delay`): a fleet's heap rises to its peak and
/// stays there, and memory returned was taken back a moment later as fresh pages the
/// kernel zeroes (2 MiB at a time here): a 10,000-node rollout takes 0.91× the time with
/// the same peak (1,591 against 1,589 MiB). Call first in `main`, with `Allocator` set.
pub fn keep_freed_memory() {
    // mimalloc.h (v3, as libmimalloc-sys 0.1.49 builds it): `mi_option_purge_delay` is
    // option 15; -1 never purges.
    const MI_OPTION_PURGE_DELAY: std::os::raw::c_int = 15;
    extern "C" {
        fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
    }
    // SAFETY: a plain setter of mimalloc's option table (libmimalloc-sys links mimalloc
    // into every binary of this crate), valid at any time.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
