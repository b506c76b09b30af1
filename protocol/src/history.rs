//! The rollout history: every decision a node makes about a rollout, with what it was
//! based on, for operators (`slmesh rollout history`, `GET /v1/events`). The node's state
//! machine decides and stamps each event; the daemon keeps the newest `MAX_EVENTS`.

use crate::fleet::{CommandAction, GateVerdict, VersionSummary};
use serde::{Deserialize, Serialize};

/// How many events a node keeps (the oldest go first).
pub const MAX_EVENTS: usize = 2_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// Unix seconds, by this node's clock.
    pub at: u64,
    pub model: String,
    pub version: u64,
    pub kind: HistoryKind,
    /// What happened, in words (as the log says it).
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryKind {
    /// Wave `wave` (from 1) of `waves` opened.
    WaveOpened { wave: u32, waves: u32 },
    /// The gates' verdict changed (pending, pass, fail), on these figures. (Not a
    /// `GateVerdict`, whose tagged form the store's encoding cannot read back.)
    Verdict { outcome: Outcome, reason: String, figures: GateFigures },
    /// The rollout stopped for good.
    Halted { reason: String },
    /// This node began serving the version.
    Activated,
    /// This node went back to this version from `from`.
    RolledBack { from: u64 },
    /// This node could not load the version.
    ActivationFailed { reason: String },
    /// An operator's command was taken, signed by `signer` (a publisher key).
    Command { action: CommandAction, signer: String, issued_at: u64 },
    /// This node ran the manifest's evaluation suite on the version: `passed` of `cases`.
    Evaluated { passed: u32, cases: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pending,
    Pass,
    Fail,
}

impl Outcome {
    /// Its name, as it is serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
        }
    }

    /// A verdict's outcome and its reason.
    pub fn of(verdict: &GateVerdict) -> (Self, String) {
        match verdict {
            GateVerdict::Pending(why) => (Outcome::Pending, why.clone()),
            GateVerdict::Pass => (Outcome::Pass, String::new()),
            GateVerdict::Fail(why) => (Outcome::Fail, why.clone()),
        }
    }
}

/// The figures a verdict was reached on: the candidate's, as the gates read them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GateFigures {
    pub nodes_measured: usize,
    pub requests: u64,
    pub median_error_rate: Option<f64>,
    pub median_p95_latency_secs: Option<f64>,
    pub median_p95_ttft_secs: Option<f64>,
    pub median_tokens_per_sec: Option<f64>,
    /// The median node's share of the evaluation suite passed.
    pub median_eval_pass_rate: Option<f64>,
    /// Nodes that ran the suite.
    pub nodes_evaluated: usize,
    /// The median node's agreement with the previous version (shadow comparison).
    #[serde(default)]
    pub median_agreement: Option<f64>,
    /// Nodes that compared enough answers for the agreement gate.
    #[serde(default)]
    pub nodes_compared: usize,
}

impl GateFigures {
    pub fn of(s: &VersionSummary) -> Self {
        GateFigures {
            nodes_measured: s.nodes_measured(),
            requests: s.pooled.requests,
            median_error_rate: s.median_node_error_rate(),
            median_p95_latency_secs: s.median_node_p95_latency(),
            median_p95_ttft_secs: s.median_node_p95_ttft(),
            median_tokens_per_sec: s.median_node_tokens_per_sec(),
            median_eval_pass_rate: s.median_node_eval_pass_rate(),
            nodes_evaluated: s.nodes_evaluated(),
            median_agreement: s.median_node_agreement(),
            nodes_compared: s.nodes_compared(),
        }
    }
}

/// The candidate's medians over its baseline's, as the ratio gates compare them (times
/// under `TIME_RATIO_FLOOR_SECS` count as that floor). For people to read: the gates
/// themselves also weigh how the nodes split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GateRatios {
    pub p95_latency: Option<f64>,
    pub p95_ttft: Option<f64>,
    pub tokens_per_sec: Option<f64>,
}

impl GateFigures {
    pub fn ratios_to(&self, baseline: &GateFigures) -> GateRatios {
        let floor = crate::fleet::TIME_RATIO_FLOOR_SECS;
        let over = |c: Option<f64>, b: Option<f64>, floor: f64| match (c, b) {
            (Some(c), Some(b)) if b.max(floor) > 0.0 => Some(c.max(floor) / b.max(floor)),
            _ => None,
        };
        GateRatios {
            p95_latency: over(self.median_p95_latency_secs, baseline.median_p95_latency_secs, floor),
            p95_ttft: over(self.median_p95_ttft_secs, baseline.median_p95_ttft_secs, floor),
            tokens_per_sec: over(self.median_tokens_per_sec, baseline.median_tokens_per_sec, 0.0),
        }
    }
}

/// Appends `event` to a history kept in memory, dropping the oldest beyond `MAX_EVENTS`.
pub fn remember(history: &mut std::collections::VecDeque<HistoryEvent>, event: HistoryEvent) {
    while history.len() >= MAX_EVENTS {
        history.pop_front();
    }
    history.push_back(event);
}

/// Whether two verdicts differ in kind (a pending verdict's reason changes as figures
/// arrive; only a change of kind is an event).
pub fn verdict_changed(before: Option<&GateVerdict>, now: &GateVerdict) -> bool {
    before.is_none_or(|b| std::mem::discriminant(b) != std::mem::discriminant(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_to_the_baseline_floor_tiny_times_and_need_both_figures() {
        let f = |lat, ttft, tps| GateFigures {
            median_p95_latency_secs: lat,
            median_p95_ttft_secs: ttft,
            median_tokens_per_sec: tps,
            ..Default::default()
        };
        let r = f(Some(0.3), Some(0.001), Some(20.0)).ratios_to(&f(Some(0.2), Some(0.0001), Some(40.0)));
        assert!((r.p95_latency.unwrap() - 1.5).abs() < 1e-9);
        // 1 ms against 0.1 ms is noise: both count as the 10 ms floor.
        assert_eq!(r.p95_ttft, Some(1.0));
        assert_eq!(r.tokens_per_sec, Some(0.5));
        let none = f(None, Some(0.5), Some(1.0)).ratios_to(&f(Some(0.2), None, Some(0.0)));
        assert_eq!(none, GateRatios::default());
    }

    #[test]
    fn only_a_change_of_kind_is_a_new_verdict_and_events_round_trip() {
        let pending = GateVerdict::Pending("2 nodes".into());
        assert!(verdict_changed(None, &pending));
        assert!(!verdict_changed(Some(&pending), &GateVerdict::Pending("3 nodes".into())));
        assert!(verdict_changed(Some(&pending), &GateVerdict::Pass));
        let e = HistoryEvent {
            at: 7,
            model: "m".into(),
            version: 2,
            kind: HistoryKind::Verdict {
                outcome: Outcome::of(&GateVerdict::Fail("error rate".into())).0,
                reason: "error rate".into(),
                figures: GateFigures { median_error_rate: Some(0.5), ..Default::default() },
            },
            text: "gate failed".into(),
        };
        assert_eq!(crate::wire::decode::<HistoryEvent>(&crate::wire::encode(&e).unwrap(), "event").unwrap(), e);
    }
}
