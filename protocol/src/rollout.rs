//! The rollout plan a manifest carries: waves, a tag selector, gate thresholds.
//! The engine that acts on it arrives with the rollout issue; the plan and its
//! validation are part of the signed manifest now.

use crate::error::ProtocolError;
use crate::trust::Tags;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutPlan {
    /// Cumulative fractions of the eligible fleet, strictly increasing, each in (0, 1].
    pub waves: Vec<Wave>,
    /// Which nodes the rollout is for at all.
    #[serde(default)]
    pub selector: TagSelector,
    pub gates: Gates,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    /// Cumulative fraction of eligible nodes active once this wave is in, in (0, 1].
    pub fraction: f64,
    /// How long this wave must stay healthy before the next one starts.
    pub soak_secs: u64,
}

/// Tag requirements: for every key, the node's tag value must be one of the listed
/// values. An empty selector matches every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagSelector {
    #[serde(default)]
    pub require: BTreeMap<String, Vec<String>>,
}

impl TagSelector {
    pub fn matches(&self, tags: &Tags) -> bool {
        self.require.iter().all(|(key, allowed)| tags.get(key).is_some_and(|v| allowed.iter().any(|a| a == v)))
    }

    /// Why `tags` do not match, for error messages.
    pub fn explain_mismatch(&self, tags: &Tags) -> Option<String> {
        self.require.iter().find_map(|(key, allowed)| match tags.get(key) {
            Some(v) if allowed.contains(v) => None,
            Some(v) => Some(format!("tag {key}={v} is not one of {allowed:?}")),
            None => Some(format!("node has no tag {key} (needs one of {allowed:?})")),
        })
    }
}

/// Health thresholds against the baseline (previous) version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    /// Highest acceptable fraction of failed requests, in [0, 1].
    pub max_error_rate: f64,
    /// Highest acceptable p95 latency, as a multiple of the baseline's.
    pub max_p95_latency_ratio: f64,
    /// Highest acceptable p95 time to first token, as a multiple of the baseline's.
    pub max_p95_ttft_ratio: f64,
    /// Lowest acceptable tokens/s, as a fraction of the baseline's.
    pub min_tokens_per_sec_ratio: f64,
    /// No verdict before this many requests have been measured fleet-wide.
    pub min_samples: u64,
    /// No verdict before this many nodes have reported. Verdicts need a majority of the
    /// reporting nodes: from 3 on, one node cannot decide alone. The canary wave holds
    /// at least this many eligible nodes (`cohort::membership_with_floor`).
    pub min_reporting_nodes: u32,
    /// Lowest acceptable fraction of the manifest's evaluation suite passed (median
    /// across nodes, each node's share of cases passed), in [0, 1]. None: no quality
    /// gate. Set, it needs `min_reporting_nodes` nodes to have run the suite.
    #[serde(default)]
    pub min_eval_pass_rate: Option<f64>,
    /// Shadow comparison on the canary (`crate::shadow`): lowest acceptable agreement of
    /// the version's answers with the previous version's, and the share of live requests
    /// compared. None: no agreement gate. Set, it needs `min_reporting_nodes` canary
    /// nodes to have compared `shadow::MIN_NODE_COMPARISONS` answers each, when there is
    /// a baseline version to compare with.
    #[serde(default)]
    pub agreement: Option<crate::shadow::AgreementGate>,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            max_error_rate: 0.02,
            max_p95_latency_ratio: 1.5,
            max_p95_ttft_ratio: 1.5,
            min_tokens_per_sec_ratio: 0.7,
            min_samples: 50,
            // Three, so that a majority is two nodes: one node never decides a gate alone.
            min_reporting_nodes: 3,
            min_eval_pass_rate: None,
            agreement: None,
        }
    }
}

impl Default for RolloutPlan {
    /// A canary of 5%, then 25%, then everyone; ten minutes of soak between waves.
    fn default() -> Self {
        RolloutPlan {
            waves: vec![
                Wave { fraction: 0.05, soak_secs: 600 },
                Wave { fraction: 0.25, soak_secs: 600 },
                Wave { fraction: 1.0, soak_secs: 0 },
            ],
            selector: TagSelector::default(),
            gates: Gates::default(),
        }
    }
}

pub const MAX_WAVES: usize = 16;

impl RolloutPlan {
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |r: String| Err(ProtocolError::invalid("rollout plan", r));
        if self.waves.is_empty() || self.waves.len() > MAX_WAVES {
            return bad(format!("needs 1 to {MAX_WAVES} waves, has {}", self.waves.len()));
        }
        let mut prev = 0.0;
        for (i, w) in self.waves.iter().enumerate() {
            if !(w.fraction > prev && w.fraction <= 1.0) {
                return bad(format!(
                    "wave {} has fraction {}: fractions are cumulative, strictly increasing, in (0, 1]",
                    i + 1,
                    w.fraction
                ));
            }
            prev = w.fraction;
        }
        let g = &self.gates;
        if !(0.0..=1.0).contains(&g.max_error_rate) {
            return bad(format!("max_error_rate {} is not in [0, 1]", g.max_error_rate));
        }
        for (name, v) in [
            ("max_p95_latency_ratio", g.max_p95_latency_ratio),
            ("max_p95_ttft_ratio", g.max_p95_ttft_ratio),
            ("min_tokens_per_sec_ratio", g.min_tokens_per_sec_ratio),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} {v} must be a positive number"));
            }
        }
        if let Some(r) = g.min_eval_pass_rate {
            if !(0.0..=1.0).contains(&r) {
                return bad(format!("min_eval_pass_rate {r} is not in [0, 1]"));
            }
        }
        if let Some(a) = &g.agreement {
            if !(0.0..=1.0).contains(&a.min) {
                return bad(format!("the agreement gate's minimum {} is not in [0, 1]", a.min));
            }
            if !(a.sample > 0.0 && a.sample <= 1.0) {
                return bad(format!("the shadow sample {} is not in (0, 1]", a.sample));
            }
        }
        for (key, values) in &self.selector.require {
            for value in values {
                crate::trust::validate_tag(key, value)?;
            }
        }
        Ok(())
    }
}

/// Where one model version stands on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutPhase {
    /// Manifest accepted; nothing fetched yet.
    Announced,
    /// Blobs being fetched.
    Fetching,
    /// Verified files on disk, waiting for this node's wave.
    Staged,
    /// Serving.
    Active,
    /// The rollout of this version stopped (gate failed, or an operator aborted).
    Halted,
    /// Was active here, and was rolled back.
    RolledBack,
    /// Could not be loaded here after the bounded number of attempts; reported to the
    /// fleet as a failed activation.
    Failed,
}
