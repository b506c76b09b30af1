//! Fleet metrics and the rollout engine, with no central server.
//!
//! Each node signs a `MetricsRecord` (cumulative counters and sketches per model version
//! it served). Receivers keep the newest record per node (`FleetView`); because records
//! are cumulative and replace each other by sequence number, a repeated or reordered
//! record never double-counts. Gates compare a candidate version with its baseline using
//! per-node statistics (medians across nodes; a verdict needs a majority, so with an even
//! count the lower median must fail and the upper one pass). The rollout engine
//! (`advance`, `decide`) turns the plan, the gate verdict, operator commands and the
//! clock into what this node does: activate, wait, or roll back.
//!
//! # Metrics that scale: the panel
//!
//! Not every node's record travels. For each model version, the `PANEL_SIZE` nodes
//! with the lowest *panel rank* among those that report it (BLAKE3 of node id, model
//! and version, independent of the cohort) hold its seats; only they gossip a report of
//! it, and receivers keep and forward only reports that hold a seat (`view`). Every node
//! therefore receives at most `PANEL_SIZE` reports per version and metrics interval,
//! whatever the fleet's size, and holds at most `MAX_PANELS` panels: gossip and memory
//! per node are flat in the fleet's size. Since ranks are uniform and independent of the
//! figures, the panel is a uniform sample of the nodes that report the version: the
//! gates' medians across nodes are medians across it, `min_samples` counts its requests,
//! and `min_reporting_nodes` is capped at `PANEL_SIZE`. The largest rank in a full panel
//! estimates how many nodes report the version (the k-th minimum value estimator,
//! about ±27% at k = 16), which sizes the canary floor. A fleet with at most
//! `PANEL_SIZE` nodes reporting a version gives every one of them a seat: the figures are
//! exact, as before the panel.
//!
//! There is no special role and so no new single point: seats follow from hashes every
//! node computes the same way. A member that crashes or goes silent stops refreshing its
//! record; `FleetView::expire` drops it after the configured time (`metrics_ttl_secs`),
//! the next-ranked node then finds a free seat and reports at its next interval. A seat
//! is refilled within `metrics_ttl_secs + metrics_interval` plus gossip's propagation
//! (190 s with `slmesh node run`'s defaults of 180 s and 10 s), and the gates read the
//! panel as it stands meanwhile. A record's age counts from its issue time (or its
//! receipt, if that is earlier), and a record already older than the TTL is refused: a
//! replay of a silent member's last record cannot keep its seat (nodes' clocks must agree
//! to well within the TTL, as they must for certificates).
//! Members send a record when a gate needs it, not every interval (`node::reporting`):
//! a report that is new, starts or stops serving (not when a newer version replaced it
//! here, nor when it serves again after a newer one halted), measures its first request
//! or fails to load; figures beyond a gate's limit (every interval, and the all-clear
//! after them) once the gate has its `min_samples` requests or, as the member projects
//! the panel's counts from their age and its own rate, is about to: before, no verdict
//! can move, so a bad canary's members send their alarms when the gate can read them
//! rather than every interval from their first error (the halt comes about as soon); one
//! record in the last interval before a wave's soak ends if the gate still waits for
//! nodes or requests, and every interval after it while the next wave waits on the gate;
//! and every fifth interval regardless, so that peers do not expire them. Since a gate
//! takes the median across nodes of each node's figures against a limit, its verdict
//! moves only when some node crosses a limit, and that node sends at once (once the gate
//! has its samples): fresher figures within the limits would change only the counts. (A
//! liar that claims many requests can make honest members skip that last record; their
//! figures then count as they last sent them, within the limits, which decides the
//! same.) During a
//! three-wave rollout that is about a fifth of the records of sending every interval,
//! and the waves open as early (BENCHMARKS.md). Nodes sample their figures at a phase of
//! the interval their id picks, so that a fleet started at one moment still spreads its
//! records (a record sent at a panel turn, below, moves the phase to it), and gossip them
//! over a mesh thinner than other topics'
//! (`mesh::METRICS_MESH_DEGREE`). Anti-entropy sends a peer only the records it
//! lacks or holds older: a sync request lists the asker's records by the first 8 bytes of
//! their node's id and their sequence number (`mesh::MetricsMark`). A record counts only
//! under its node's enrollment certificate, which travels beside it only now and then
//! (`MetricsMessage`: about 200 of a record's 500 bytes): receivers keep the certificate
//! with the record they hold and check later records against it. A record's body is
//! encoded compactly (`wire::Encoding::Compact`).
//! A report new to a node waits for its turn in proportion to its rank among the nodes
//! that report the version (the share of the fleet in its open waves, a panel's worth of
//! ranks per interval; at most six intervals), counted from when the node started
//! serving it and taken at that moment, not at the node's next sample: a wave's nodes
//! start serving at about one time, so they report lowest rank first and the rest find
//! the seats taken, while a canary no larger than a panel reports within an interval.
//!
//! # What k lying nodes can and cannot do
//!
//! (Enrolled nodes. A record counts only under its node's enrollment certificate, so an
//! insider cannot make up node ids to grind ranks: it has the one rank it was enrolled
//! with.)
//!
//! - They cannot choose seats: a rank is fixed by the node's enrolled id and the
//!   version, which the publisher picks after enrollment. A liar with a seat is one vote
//!   among the panel's measured members, and a liar without one is not counted, not kept
//!   and not forwarded (it costs its direct neighbours one message each).
//! - They cannot force a verdict unless they are more than half of the panel's measured
//!   members: a gate fails only when a strict majority of them is beyond its limit, and
//!   passes only when a strict majority is within it. Short of that, k liars can hold a
//!   gate pending where honest members are split closely enough (within k of a tie).
//! - They cannot push honest nodes out of a panel (a seat needs a lower rank), speak for
//!   another node (records are signed by the node they name), or count twice (one
//!   record per node, newest wins).
//! - A version that fails to load fails its gates when failed members outnumber serving
//!   ones and are a majority of `min_reporting_nodes`: k liars claiming failures decide
//!   this only when k exceeds both.
//! - Reports of made-up versions fill at most `MAX_PANELS` panels; the panels with the
//!   fewest members are dropped first, so a real version with several reporters stays.
//! - They can go silent: their seats are refilled as for a crash.
//! - They can move when honest members' alarms go, not what they say or what counts:
//!   claiming many requests makes the alarms go sooner (every interval, as without the
//!   projection), claiming none holds them back by the liars' share of the panel's
//!   requests at most, and the refresh goes every fifth interval regardless.

mod engine;
mod gates;
mod record;
mod view;

pub use crate::panel::rank_fraction;
pub use engine::{
    advance, decide, CommandAction, OperatorState, RolloutCommand, RolloutDecision, RolloutProgress, SignedCommand,
};
pub use gates::{evaluate_gates, node_beyond_limits, GateVerdict, NodeStat, VersionSummary, TIME_RATIO_FLOOR_SECS};
pub use record::{
    verify_metrics, verify_metrics_enrolled, MetricsMessage, MetricsRecord, SignedMetrics, VersionReport,
    MAX_STAGED_REPORTED, MAX_VERSIONS_PER_RECORD,
};
pub use view::{node_stat, panel_rank, FleetView, Holder, MAX_FLEET_NODES, MAX_PANELS, PANEL_SIZE};

#[cfg(test)]
mod tests;
