//! Rollout gates: a candidate version against its baseline, on per-node statistics.

use super::record::VersionReport;
use super::view::PANEL_SIZE;
use crate::identity::NodeId;
use crate::rollout::Gates;
use serde::{Deserialize, Serialize};

/// One node's figures for one version, for per-node statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStat {
    pub node: NodeId,
    pub active: bool,
    pub requests: u64,
    pub errors: u64,
    pub p95_latency: Option<f64>,
    pub p95_ttft: Option<f64>,
    pub p50_tokens_per_sec: Option<f64>,
    /// The node failed to load the version and does not serve it.
    pub failed_activation: bool,
    /// The share of the evaluation suite's cases this node's answers passed.
    #[serde(default)]
    pub eval_pass_rate: Option<f64>,
    /// With a suite that compares: its cases passed minus the previous version's on
    /// this node (negative: fewer than before).
    #[serde(default)]
    pub eval_margin: Option<f64>,
    /// The node's median agreement with the previous version in its shadow comparisons,
    /// once it compared `shadow::MIN_NODE_COMPARISONS` answers.
    #[serde(default)]
    pub agreement: Option<f64>,
}

/// One version across the fleet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionSummary {
    /// Panel members reporting the version (all reporters, up to `PANEL_SIZE`).
    pub nodes_reporting: usize,
    pub nodes_active: usize,
    /// About how many nodes of the fleet report it (the panel's count while it has room).
    pub nodes_estimated: usize,
    /// Every panel member's report merged (model and version included; `active` if any node is).
    pub pooled: VersionReport,
    pub per_node: Vec<NodeStat>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// The lower and upper median (equal for an odd count). A gate fails on the lower one and
/// passes on the upper one, so either verdict needs a strict majority of nodes: with two
/// nodes, one liar leaves the gate pending rather than deciding it.
fn median_bounds(mut v: Vec<f64>) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some((v[(n - 1) / 2], v[n / 2]))
}

impl VersionSummary {
    pub fn pooled_error_rate(&self) -> Option<f64> {
        let p = &self.pooled;
        (p.requests > 0).then(|| p.errors as f64 / p.requests as f64)
    }

    /// Nodes that served at least one request of this version.
    fn measured(&self) -> impl Iterator<Item = &NodeStat> {
        self.per_node.iter().filter(|n| n.requests > 0)
    }

    pub fn nodes_measured(&self) -> usize {
        self.measured().count()
    }

    /// The median across nodes of each node's error rate.
    pub fn median_node_error_rate(&self) -> Option<f64> {
        median(self.measured().map(|n| n.errors as f64 / n.requests as f64).collect())
    }

    pub fn median_node_p95_latency(&self) -> Option<f64> {
        median(self.measured().filter_map(|n| n.p95_latency).collect())
    }

    pub fn median_node_p95_ttft(&self) -> Option<f64> {
        median(self.measured().filter_map(|n| n.p95_ttft).collect())
    }

    pub fn median_node_tokens_per_sec(&self) -> Option<f64> {
        median(self.measured().filter_map(|n| n.p50_tokens_per_sec).collect())
    }

    /// Each reporting node's share of the evaluation suite passed (nodes that ran it).
    fn eval_pass_rates(&self) -> Vec<f64> {
        self.per_node.iter().filter_map(|n| n.eval_pass_rate).collect()
    }

    /// Reporting nodes that ran the evaluation suite.
    pub fn nodes_evaluated(&self) -> usize {
        self.per_node.iter().filter(|n| n.eval_pass_rate.is_some()).count()
    }

    /// The median across nodes of each node's share of the evaluation suite passed.
    pub fn median_node_eval_pass_rate(&self) -> Option<f64> {
        median(self.eval_pass_rates())
    }

    /// Each node's median agreement with the previous version (nodes that compared enough).
    fn agreements(&self) -> Vec<f64> {
        self.per_node.iter().filter_map(|n| n.agreement).collect()
    }

    /// Reporting nodes whose shadow comparisons count in the agreement gate.
    pub fn nodes_compared(&self) -> usize {
        self.per_node.iter().filter(|n| n.agreement.is_some()).count()
    }

    /// The median across nodes of each node's median agreement with the previous version.
    pub fn median_node_agreement(&self) -> Option<f64> {
        median(self.agreements())
    }

    fn error_rate_bounds(&self) -> Option<(f64, f64)> {
        median_bounds(self.measured().map(|n| n.errors as f64 / n.requests as f64).collect())
    }

    fn p95_latency_bounds(&self) -> Option<(f64, f64)> {
        median_bounds(self.measured().filter_map(|n| n.p95_latency).collect())
    }

    fn p95_ttft_bounds(&self) -> Option<(f64, f64)> {
        median_bounds(self.measured().filter_map(|n| n.p95_ttft).collect())
    }

    fn tokens_per_sec_bounds(&self) -> Option<(f64, f64)> {
        median_bounds(self.measured().filter_map(|n| n.p50_tokens_per_sec).collect())
    }
}

/// One gate's reading: failed by a majority, passed by a majority, split, or short of
/// figures.
enum Reading {
    Fail(String),
    Split(String),
    Wait(String),
    Pass,
}

/// A gate on a figure where higher is worse: fails if the lower median is above `limit`,
/// passes if the upper median is within it.
fn at_most(bounds: Option<(f64, f64)>, limit: f64, what: impl Fn(f64) -> String) -> Reading {
    match bounds {
        Some((low, _)) if low > limit => Reading::Fail(what(low)),
        Some((_, high)) if high > limit => Reading::Split(what(high)),
        _ => Reading::Pass,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict", content = "reason")]
pub enum GateVerdict {
    /// Not enough data for a verdict yet.
    Pending(String),
    Pass,
    Fail(String),
}

/// Latency and TTFT ratios compare times of at least this many seconds.
pub const TIME_RATIO_FLOOR_SECS: f64 = 0.01;

/// The gates of a rollout plan against the fleet's figures. Every comparison uses the
/// median across nodes, so that one node's figures (true or not) cannot decide alone;
/// ratio gates need a baseline with figures of its own, and are skipped without one.
pub fn evaluate_gates(gates: &Gates, candidate: &VersionSummary, baseline: Option<&VersionSummary>) -> GateVerdict {
    // A version that does not load: fail once the nodes that could not load it outnumber
    // those that serve it and make a majority of the reporting minimum (so with the
    // minimum at 3, one node's claim does not decide).
    // The counts are the panel's: a plan asking for more nodes than a panel holds asks
    // for a full panel.
    let min_nodes = (gates.min_reporting_nodes as usize).clamp(1, PANEL_SIZE);
    let failed = candidate.per_node.iter().filter(|n| n.failed_activation).count();
    let serving = candidate.nodes_active;
    if failed > serving && failed * 2 > min_nodes {
        return GateVerdict::Fail(format!("the version failed to load on {failed} node(s), {serving} serve it"));
    }
    // The quality gate reads the suite's results, which nodes report before serving a
    // request: it may fail before the traffic gates have figures.
    let mut readings = vec![];
    if let Some(min_rate) = gates.min_eval_pass_rate {
        let rates = candidate.eval_pass_rates();
        if rates.len() < min_nodes {
            return GateVerdict::Pending(format!(
                "{} node(s) ran the evaluation suite, {min_nodes} needed",
                rates.len()
            ));
        }
        let reading = at_most(median_bounds(rates).map(|(low, high)| (-high, -low)), -min_rate, |r| {
            format!("evaluation suite passed {:.0}% (median across nodes), below {:.0}%", -r * 100.0, min_rate * 100.0)
        });
        if let Reading::Fail(why) = reading {
            return GateVerdict::Fail(why);
        }
        readings.push(reading);
        // A suite that compares: hardly fewer cases than the previous version, by majority.
        let margins: Vec<f64> = candidate.per_node.iter().filter_map(|n| n.eval_margin).collect();
        if margins.len() >= min_nodes {
            let lost = crate::eval::MAX_CASES_LOST;
            let reading = at_most(median_bounds(margins).map(|(low, high)| (-high, -low)), lost, |m| {
                format!(
                    "evaluation suite passed {m:.0} case(s) fewer than the previous version (median across nodes), more than {lost:.0}"
                )
            });
            if let Reading::Fail(why) = reading {
                return GateVerdict::Fail(why);
            }
            readings.push(reading);
        }
    }
    let nodes = candidate.nodes_measured();
    if nodes < min_nodes {
        return GateVerdict::Pending(format!("{nodes} node(s) measured, {min_nodes} needed"));
    }
    let requests = candidate.pooled.requests;
    if requests < gates.min_samples {
        return GateVerdict::Pending(format!("{requests} requests measured, {} needed", gates.min_samples));
    }
    readings.push(at_most(candidate.error_rate_bounds(), gates.max_error_rate, |rate| {
        format!("error rate {:.1}% (median across nodes) above {:.1}%", rate * 100.0, gates.max_error_rate * 100.0)
    }));
    let base = baseline.filter(|b| b.nodes_measured() > 0);
    if let Some(b) = base {
        // Candidate medians over the baseline's median; below TIME_RATIO_FLOOR_SECS a time
        // is noise (timer resolution, scheduling): 3 ms against 0.02 ms is not a 150x
        // slowdown.
        let over = |c: Option<(f64, f64)>, b: Option<f64>, floor: f64| match (c, b) {
            (Some((low, high)), Some(b)) if b.max(floor) > 0.0 => {
                Some((low.max(floor) / b.max(floor), high.max(floor) / b.max(floor)))
            }
            _ => None,
        };
        let floor = TIME_RATIO_FLOOR_SECS;
        readings.push(at_most(
            over(candidate.p95_latency_bounds(), b.median_node_p95_latency(), floor),
            gates.max_p95_latency_ratio,
            |r| format!("p95 latency {r:.2}x the baseline's, above {:.2}x", gates.max_p95_latency_ratio),
        ));
        readings.push(at_most(
            over(candidate.p95_ttft_bounds(), b.median_node_p95_ttft(), floor),
            gates.max_p95_ttft_ratio,
            |r| format!("p95 TTFT {r:.2}x the baseline's, above {:.2}x", gates.max_p95_ttft_ratio),
        ));
        // Lower is worse for tokens/s: compare the negated ratios.
        let tps = over(candidate.tokens_per_sec_bounds(), b.median_node_tokens_per_sec(), 0.0);
        readings.push(at_most(tps.map(|(low, high)| (-high, -low)), -gates.min_tokens_per_sec_ratio, |r| {
            format!("tokens/s {:.2}x the baseline's, below {:.2}x", -r, gates.min_tokens_per_sec_ratio)
        }));
        // Agreement needs a baseline to have been compared with: the first version of a
        // model has none, and passes it.
        if let Some(gate) = &gates.agreement {
            let agreements = candidate.agreements();
            if agreements.len() < min_nodes {
                // Not yet: but another gate's failure is still a failure.
                readings.push(Reading::Wait(format!(
                    "{} node(s) compared answers with the previous version, {min_nodes} needed",
                    agreements.len()
                )));
            } else {
                readings.push(at_most(median_bounds(agreements).map(|(low, high)| (-high, -low)), -gate.min, |r| {
                    format!(
                        "agreement with the previous version {:.2} (median across nodes), below {:.2}",
                        -r, gate.min
                    )
                }));
            }
        }
    }
    let failures: Vec<String> =
        readings.iter().filter_map(|r| if let Reading::Fail(why) = r { Some(why.clone()) } else { None }).collect();
    if !failures.is_empty() {
        return GateVerdict::Fail(failures.join("; "));
    }
    if let Some(why) = readings.iter().find_map(|r| if let Reading::Wait(why) = r { Some(why) } else { None }) {
        return GateVerdict::Pending(why.clone());
    }
    let splits: Vec<String> =
        readings.iter().filter_map(|r| if let Reading::Split(why) = r { Some(why.clone()) } else { None }).collect();
    if !splits.is_empty() {
        return GateVerdict::Pending(format!("nodes disagree, no majority either way: {}", splits.join("; ")));
    }
    GateVerdict::Pass
}

/// Whether one node's own figures are beyond a gate's limit (against the baseline's
/// medians): what makes its report urgent. Not a verdict: one node decides nothing.
pub fn node_beyond_limits(gates: &Gates, stat: &NodeStat, baseline: Option<&VersionSummary>) -> bool {
    if !stat.failed_activation && stat.requests == 0 {
        return false;
    }
    let alone = VersionSummary {
        nodes_reporting: 1,
        nodes_active: usize::from(stat.active),
        nodes_estimated: 1,
        pooled: VersionReport { requests: stat.requests, errors: stat.errors, ..Default::default() },
        per_node: vec![stat.clone()],
    };
    let gates = Gates { min_reporting_nodes: 1, min_samples: 0, ..gates.clone() };
    matches!(evaluate_gates(&gates, &alone, baseline), GateVerdict::Fail(_))
}
