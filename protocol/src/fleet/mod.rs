//! Fleet metrics and the rollout engine, with no central server.
//!
//! Each node signs a `MetricsRecord` (cumulative counters and sketches per model version
//! it served) and gossips it. Receivers keep the newest record per node (`FleetView`);
//! because records are cumulative and replace each other, a repeated or reordered record
//! never double-counts. Summaries merge the records; gates compare a candidate version
//! with its baseline using per-node statistics (medians across nodes; a verdict needs a
//! majority, so with an even count the lower median must fail and the upper one pass),
//! so one node that lies can neither force a rollback nor hide a failing version once
//! three or more nodes report. The rollout engine
//! (`advance`, `decide`) turns the plan, the gate verdict, operator commands and the
//! clock into what this node does: activate, wait, or roll back.

mod engine;
mod gates;
mod record;
mod view;

pub use engine::{
    advance, decide, CommandAction, OperatorState, RolloutCommand, RolloutDecision, RolloutProgress, SignedCommand,
};
pub use gates::{evaluate_gates, GateVerdict, NodeStat, VersionSummary, TIME_RATIO_FLOOR_SECS};
pub use record::{verify_metrics, MetricsRecord, SignedMetrics, VersionReport, MAX_VERSIONS_PER_RECORD};
pub use view::{FleetView, MAX_FLEET_NODES};

#[cfg(test)]
mod tests;
