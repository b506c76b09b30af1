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

use crate::error::ProtocolError;
use crate::identity::NodeId;
use crate::rollout::{Gates, RolloutPlan};
use crate::signed::{Signed, SignedKind};
use crate::sketch::Sketch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const MAX_VERSIONS_PER_RECORD: usize = 64;
/// Records held at most; the ones heard from longest ago go first.
pub const MAX_FLEET_NODES: usize = 100_000;

/// What one node measured of one model version, since it started serving it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionReport {
    pub model: String,
    pub version: u64,
    /// Serving it now.
    pub active: bool,
    /// Unix seconds when this node activated it (if it did).
    pub active_since: Option<u64>,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency: Sketch,
    pub ttft: Sketch,
    pub tokens_per_sec: Sketch,
    /// Times this node failed to load the version (a header that passes, a load that
    /// does not). Reported while the node does not serve it: a failing signal for the
    /// gates even though no request was ever measured.
    pub activation_failures: u32,
}

impl VersionReport {
    /// What a node measured of one version, as it reports it.
    pub fn from_metrics(model: &str, version: u64, m: &crate::metrics::VersionMetrics) -> Self {
        VersionReport {
            model: model.to_string(),
            version,
            active: false,
            active_since: None,
            requests: m.requests,
            errors: m.errors,
            prompt_tokens: m.prompt_tokens,
            completion_tokens: m.completion_tokens,
            latency: m.latency.clone(),
            ttft: m.ttft.clone(),
            tokens_per_sec: m.tokens_per_sec.clone(),
            activation_failures: 0,
        }
    }

    /// Adds another report of the same version: counters summed, sketches merged.
    pub fn add(&mut self, other: &VersionReport) {
        self.active |= other.active;
        // Remote numbers: saturate rather than overflow.
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(other.completion_tokens);
        self.activation_failures = self.activation_failures.saturating_add(other.activation_failures);
        self.latency.merge(&other.latency);
        self.ttft.merge(&other.ttft);
        self.tokens_per_sec.merge(&other.tokens_per_sec);
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    pub node: NodeId,
    /// Grows with every record of this node: an older one never replaces a newer one.
    pub seq: u64,
    /// Unix seconds, by the node's clock.
    pub issued_at: u64,
    pub versions: Vec<VersionReport>,
}

impl SignedKind for MetricsRecord {
    const DOMAIN: &'static [u8] = b"slmesh/metrics";
    const WHAT: &'static str = "metrics record";
}

pub type SignedMetrics = Signed<MetricsRecord>;

/// Checks a metrics record: self-signed by the node it names, within limits, consistent.
pub fn verify_metrics(signed: &SignedMetrics) -> Result<MetricsRecord, ProtocolError> {
    let record = signed.verify_self_signed()?;
    let bad = |r: String| Err(ProtocolError::invalid("metrics record", r));
    if record.node != signed.signer {
        return bad("signed by another node than the one it names".into());
    }
    if record.versions.len() > MAX_VERSIONS_PER_RECORD {
        return bad(format!("{} versions, at most {MAX_VERSIONS_PER_RECORD}", record.versions.len()));
    }
    for v in &record.versions {
        if v.errors > v.requests {
            return bad(format!("{}@{}: more errors than requests", v.model, v.version));
        }
        for s in [&v.latency, &v.ttft, &v.tokens_per_sec] {
            s.validate()?;
        }
    }
    Ok(record)
}

struct Held {
    record: MetricsRecord,
    received_at: u64,
}

/// The newest record of every node heard from, bounded in number and age.
#[derive(Default)]
pub struct FleetView {
    records: BTreeMap<NodeId, Held>,
}

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
}

/// One version across the fleet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionSummary {
    pub nodes_reporting: usize,
    pub nodes_active: usize,
    /// Every node's report merged (model and version included; `active` if any node is).
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

/// One gate's reading: failed by a majority, passed by a majority, or split.
enum Reading {
    Fail(String),
    Split(String),
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

impl FleetView {
    /// Takes a verified record; returns whether it was news. A record not newer than the
    /// one held (a duplicate, a replay, a reordering) changes nothing.
    pub fn update(&mut self, record: MetricsRecord, now: u64) -> bool {
        if self.records.get(&record.node).is_some_and(|h| h.record.seq >= record.seq) {
            return false;
        }
        if !self.records.contains_key(&record.node) && self.records.len() >= MAX_FLEET_NODES {
            let oldest = self.records.iter().min_by_key(|(_, h)| h.received_at).map(|(n, _)| *n);
            if let Some(n) = oldest {
                self.records.remove(&n);
            }
        }
        self.records.insert(record.node, Held { record, received_at: now });
        true
    }

    /// Forgets nodes not heard from for `ttl_secs`; returns how many.
    pub fn expire(&mut self, now: u64, ttl_secs: u64) -> usize {
        let before = self.records.len();
        self.records.retain(|_, h| now.saturating_sub(h.received_at) < ttl_secs);
        before - self.records.len()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn record(&self, node: &NodeId) -> Option<&MetricsRecord> {
        self.records.get(node).map(|h| &h.record)
    }

    pub fn records(&self) -> impl Iterator<Item = &MetricsRecord> {
        self.records.values().map(|h| &h.record)
    }

    /// Every (model, version) some node reports.
    pub fn versions(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> =
            self.records().flat_map(|r| r.versions.iter().map(|v| (v.model.clone(), v.version))).collect();
        out.sort();
        out.dedup();
        out
    }

    pub fn summary(&self, model: &str, version: u64) -> VersionSummary {
        let pooled = VersionReport { model: model.to_string(), version, ..Default::default() };
        let mut s = VersionSummary { pooled, ..Default::default() };
        for record in self.records() {
            for v in record.versions.iter().filter(|v| v.model == model && v.version == version) {
                s.nodes_reporting += 1;
                s.nodes_active += usize::from(v.active);
                s.pooled.add(v);
                s.per_node.push(NodeStat {
                    node: record.node,
                    active: v.active,
                    requests: v.requests,
                    errors: v.errors,
                    p95_latency: v.latency.quantile(0.95),
                    p95_ttft: v.ttft.quantile(0.95),
                    p50_tokens_per_sec: v.tokens_per_sec.quantile(0.5),
                    failed_activation: v.activation_failures > 0 && !v.active,
                });
            }
        }
        s
    }

    /// The version a candidate is compared with: the newest lower version of the model
    /// that some node still reports.
    pub fn baseline(&self, model: &str, candidate: u64) -> Option<VersionSummary> {
        let best = self.versions().into_iter().filter(|(m, v)| m == model && *v < candidate).map(|(_, v)| v).max()?;
        Some(self.summary(model, best))
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
    let failed = candidate.per_node.iter().filter(|n| n.failed_activation).count();
    let serving = candidate.nodes_active;
    if failed > serving && failed * 2 > gates.min_reporting_nodes as usize {
        return GateVerdict::Fail(format!("the version failed to load on {failed} node(s), {serving} serve it"));
    }
    let nodes = candidate.nodes_measured();
    if nodes < gates.min_reporting_nodes.max(1) as usize {
        return GateVerdict::Pending(format!("{nodes} node(s) measured, {} needed", gates.min_reporting_nodes.max(1)));
    }
    let requests = candidate.pooled.requests;
    if requests < gates.min_samples {
        return GateVerdict::Pending(format!("{requests} requests measured, {} needed", gates.min_samples));
    }
    let mut readings = vec![at_most(candidate.error_rate_bounds(), gates.max_error_rate, |rate| {
        format!("error rate {:.1}% (median across nodes) above {:.1}%", rate * 100.0, gates.max_error_rate * 100.0)
    })];
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
    }
    let failures: Vec<String> =
        readings.iter().filter_map(|r| if let Reading::Fail(why) = r { Some(why.clone()) } else { None }).collect();
    if !failures.is_empty() {
        return GateVerdict::Fail(failures.join("; "));
    }
    let splits: Vec<String> =
        readings.iter().filter_map(|r| if let Reading::Split(why) = r { Some(why.clone()) } else { None }).collect();
    if !splits.is_empty() {
        return GateVerdict::Pending(format!("nodes disagree, no majority either way: {}", splits.join("; ")));
    }
    GateVerdict::Pass
}

/// An operator's order about one rollout, signed by a trusted publisher key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutCommand {
    pub model: String,
    pub version: u64,
    pub action: CommandAction,
    /// Unix seconds; also orders the commands of one rollout.
    pub issued_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandAction {
    /// Open no further wave.
    Pause,
    Resume,
    /// Skip the rest of the current wave's soak.
    Promote,
    /// Stop the rollout; nodes that activated the version roll back.
    Abort,
    /// Stop the rollout, and every node goes to version `to` (if it still has its files).
    RollBackTo {
        to: u64,
    },
}

impl SignedKind for RolloutCommand {
    const DOMAIN: &'static [u8] = b"slmesh/rollout-command";
    const WHAT: &'static str = "rollout command";
}

pub type SignedCommand = Signed<RolloutCommand>;

/// What the operators said about one rollout, folded in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorState {
    pub paused: bool,
    pub aborted: bool,
    /// When each promote was issued.
    pub promotions: Vec<u64>,
    /// The version operators ordered every node back to, if they did.
    pub roll_back_to: Option<u64>,
}

impl OperatorState {
    pub fn fold<'a>(commands: impl IntoIterator<Item = &'a RolloutCommand>) -> Self {
        let mut sorted: Vec<&RolloutCommand> = commands.into_iter().collect();
        sorted.sort_by_key(|c| c.issued_at);
        let mut s = OperatorState::default();
        for c in sorted {
            match c.action {
                CommandAction::Pause => s.paused = true,
                CommandAction::Resume => s.paused = false,
                CommandAction::Promote => s.promotions.push(c.issued_at),
                CommandAction::Abort => s.aborted = true,
                CommandAction::RollBackTo { to } => {
                    s.aborted = true;
                    s.roll_back_to = Some(to);
                }
            }
        }
        s
    }
}

/// A rollout's progress as this node sees it: when each wave opened, or why it halted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutProgress {
    /// Unix seconds at which waves 0, 1, ... opened.
    pub opened: Vec<u64>,
    pub halted: Option<String>,
    pub verdict: Option<GateVerdict>,
}

/// One step of the rollout engine. Wave 0 (the canary) opens when the version is
/// published; wave k opens once wave k-1 has soaked (or an operator promoted it) and the
/// gates pass. A failing gate or an abort halts the rollout for good.
pub fn advance(
    progress: &mut RolloutProgress,
    plan: &RolloutPlan,
    published_at: u64,
    verdict: &GateVerdict,
    operator: &OperatorState,
    now: u64,
) {
    progress.verdict = Some(verdict.clone());
    if progress.halted.is_some() {
        return;
    }
    if operator.aborted {
        progress.halted = Some(match operator.roll_back_to {
            Some(to) => format!("an operator rolled back to version {to}"),
            None => "aborted by an operator".into(),
        });
        return;
    }
    if let GateVerdict::Fail(reason) = verdict {
        progress.halted = Some(format!("gate failed: {reason}"));
        return;
    }
    if progress.opened.is_empty() {
        progress.opened.push(published_at.min(now));
    }
    while progress.opened.len() < plan.waves.len() && !operator.paused {
        let k = progress.opened.len();
        let previous_opened = progress.opened[k - 1];
        let soaked = now >= previous_opened.saturating_add(plan.waves[k - 1].soak_secs);
        let promoted = operator.promotions.iter().any(|t| *t >= previous_opened);
        if (soaked || promoted) && *verdict == GateVerdict::Pass {
            progress.opened.push(now);
        } else {
            break;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutDecision {
    Activate,
    Wait(String),
    RollBack(String),
}

/// What this node does about a staged version, given its wave (None: the plan's selector
/// leaves it out) and whether it serves the version now.
pub fn decide(progress: &RolloutProgress, my_wave: Option<usize>, active_here: bool) -> RolloutDecision {
    if let Some(reason) = &progress.halted {
        return if active_here {
            RolloutDecision::RollBack(reason.clone())
        } else {
            RolloutDecision::Wait(format!("halted: {reason}"))
        };
    }
    match my_wave {
        None => RolloutDecision::Wait("the plan's selector leaves this node out".into()),
        Some(w) if w < progress.opened.len() => RolloutDecision::Activate,
        Some(w) => {
            RolloutDecision::Wait(format!("in wave {} of the plan; {} wave(s) open", w + 1, progress.opened.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{KeyKind, SecretKey};
    use crate::rollout::Wave;

    fn node(seed: u8) -> SecretKey {
        SecretKey::from_seed(KeyKind::Node, [seed; 32])
    }

    fn report(version: u64, requests: u64, errors: u64, latency: f64) -> VersionReport {
        let mut r = VersionReport { model: "m".into(), version, active: true, requests, errors, ..Default::default() };
        for _ in 0..requests {
            r.latency.add(latency);
            r.ttft.add(latency / 4.0);
            r.tokens_per_sec.add(50.0);
        }
        r
    }

    fn record(seed: u8, seq: u64, versions: Vec<VersionReport>) -> MetricsRecord {
        MetricsRecord { node: node(seed).public(), seq, issued_at: 100, versions }
    }

    fn gates() -> Gates {
        Gates { min_samples: 30, min_reporting_nodes: 3, ..Gates::default() }
    }

    #[test]
    fn records_are_self_signed_and_checked() {
        let r = record(1, 5, vec![report(2, 10, 1, 0.2)]);
        let signed = SignedMetrics::sign(&r, &node(1)).unwrap();
        let back = SignedMetrics::from_bytes(&signed.to_bytes().unwrap()).unwrap();
        assert_eq!(verify_metrics(&back).unwrap(), r);
        assert!(verify_metrics(&SignedMetrics::sign(&r, &node(2)).unwrap()).is_err(), "speaking for another node");
        let mut lying = r.clone();
        lying.versions[0].errors = 11;
        assert!(verify_metrics(&SignedMetrics::sign(&lying, &node(1)).unwrap()).is_err());
    }

    #[test]
    fn reports_of_one_version_add_up() {
        let mut total = report(2, 10, 1, 0.2);
        total.active = false;
        total.add(&report(2, 5, 2, 0.4));
        assert_eq!((total.requests, total.errors, total.latency.count()), (15, 3, 15));
        assert!(total.active);
    }

    #[test]
    fn a_repeated_or_reordered_record_never_double_counts() {
        let mut view = FleetView::default();
        let new = record(1, 2, vec![report(2, 20, 0, 0.2)]);
        let old = record(1, 1, vec![report(2, 10, 0, 0.2)]);
        assert!(view.update(new.clone(), 10));
        assert!(!view.update(new.clone(), 11), "a duplicate is not news");
        assert!(!view.update(old, 12), "an older record does not replace a newer one");
        assert!(view.update(record(2, 1, vec![report(2, 5, 0, 0.2)]), 12));
        let s = view.summary("m", 2);
        assert_eq!((s.pooled.requests, s.nodes_reporting), (25, 2));
        assert_eq!(view.expire(100, 89), 1, "node 1 was last heard at 10");
        assert_eq!(view.summary("m", 2).pooled.requests, 5);
    }

    fn fleet(rates: &[(u64, u64)], version: u64, latency: f64) -> FleetView {
        let mut view = FleetView::default();
        for (i, (req, err)) in rates.iter().enumerate() {
            view.update(record(i as u8 + 1, 1, vec![report(version, *req, *err, latency)]), 0);
        }
        view
    }

    #[test]
    fn gates_wait_for_samples_and_nodes_then_judge() {
        let g = gates();
        let few = fleet(&[(100, 0), (100, 0)], 2, 0.2);
        assert!(matches!(evaluate_gates(&g, &few.summary("m", 2), None), GateVerdict::Pending(_)));
        let small = fleet(&[(5, 0), (5, 0), (5, 0)], 2, 0.2);
        assert!(matches!(evaluate_gates(&g, &small.summary("m", 2), None), GateVerdict::Pending(_)));
        let good = fleet(&[(20, 0), (20, 1), (20, 0)], 2, 0.2);
        assert_eq!(evaluate_gates(&g, &good.summary("m", 2), None), GateVerdict::Pass);
        let bad = fleet(&[(20, 5), (20, 6), (20, 0)], 2, 0.2);
        assert!(
            matches!(evaluate_gates(&g, &bad.summary("m", 2), None), GateVerdict::Fail(r) if r.contains("error rate"))
        );
    }

    #[test]
    fn ratio_gates_compare_with_the_baseline() {
        let g = gates();
        let mut view = fleet(&[(20, 0), (20, 0), (20, 0)], 1, 0.2);
        for seed in 4..=6 {
            view.update(record(seed, 1, vec![report(2, 20, 0, 0.5)]), 0);
        }
        let baseline = view.baseline("m", 2).unwrap();
        assert_eq!(baseline.pooled.version, 1);
        let verdict = evaluate_gates(&g, &view.summary("m", 2), Some(&baseline));
        assert!(matches!(&verdict, GateVerdict::Fail(r) if r.contains("p95 latency")), "{verdict:?}");
        let mut fine = fleet(&[(20, 0), (20, 0), (20, 0)], 1, 0.2);
        for seed in 4..=6 {
            fine.update(record(seed, 1, vec![report(2, 20, 0, 0.22)]), 0);
        }
        assert_eq!(evaluate_gates(&g, &fine.summary("m", 2), fine.baseline("m", 2).as_ref()), GateVerdict::Pass);
    }

    #[test]
    fn times_below_the_floor_are_not_compared_as_ratios() {
        let g = gates();
        let mut view = fleet(&[(20, 0), (20, 0), (20, 0)], 1, 0.000_02);
        for seed in 4..=6 {
            view.update(record(seed, 1, vec![report(2, 20, 0, 0.003)]), 0);
        }
        assert_eq!(evaluate_gates(&g, &view.summary("m", 2), view.baseline("m", 2).as_ref()), GateVerdict::Pass);
        let mut slow = fleet(&[(20, 0), (20, 0), (20, 0)], 1, 0.000_02);
        for seed in 4..=6 {
            slow.update(record(seed, 1, vec![report(2, 20, 0, 0.5)]), 0);
        }
        assert!(matches!(
            evaluate_gates(&g, &slow.summary("m", 2), slow.baseline("m", 2).as_ref()),
            GateVerdict::Fail(_)
        ));
    }

    #[test]
    fn one_lying_node_can_neither_fail_a_good_version_nor_hide_a_bad_one() {
        let g = gates();
        // Three honest nodes see no errors; one claims 10,000 failed requests.
        let good = fleet(&[(20, 0), (20, 0), (20, 0), (10_000, 10_000)], 2, 0.2);
        let s = good.summary("m", 2);
        assert!(s.pooled_error_rate().unwrap() > 0.9, "the pooled rate alone would be fooled");
        assert_eq!(evaluate_gates(&g, &s, None), GateVerdict::Pass);
        // Three honest nodes fail a third of their requests; one claims 10,000 successes.
        let bad = fleet(&[(30, 10), (30, 10), (30, 10), (10_000, 0)], 2, 0.2);
        let s = bad.summary("m", 2);
        assert!(s.pooled_error_rate().unwrap() < 0.02, "the pooled rate alone would hide it");
        assert!(matches!(evaluate_gates(&g, &s, None), GateVerdict::Fail(_)));
    }

    #[test]
    fn with_two_nodes_one_liar_leaves_the_gate_pending_and_agreement_decides() {
        let g = Gates { min_reporting_nodes: 2, ..gates() };
        let liar_fails_it = fleet(&[(20, 0), (20, 20)], 2, 0.2);
        let verdict = evaluate_gates(&g, &liar_fails_it.summary("m", 2), None);
        assert!(matches!(&verdict, GateVerdict::Pending(r) if r.contains("disagree")), "{verdict:?}");
        let both_fail = fleet(&[(20, 8), (20, 10)], 2, 0.2);
        assert!(matches!(evaluate_gates(&g, &both_fail.summary("m", 2), None), GateVerdict::Fail(_)));
        let both_fine = fleet(&[(20, 0), (20, 0)], 2, 0.2);
        assert_eq!(evaluate_gates(&g, &both_fine.summary("m", 2), None), GateVerdict::Pass);
        // Slower on one node of two: no majority for a slowdown either.
        let mut view = fleet(&[(20, 0), (20, 0)], 1, 0.2);
        view.update(record(3, 1, vec![report(2, 20, 0, 0.2)]), 0);
        view.update(record(4, 1, vec![report(2, 20, 0, 0.9)]), 0);
        let verdict = evaluate_gates(&g, &view.summary("m", 2), view.baseline("m", 2).as_ref());
        assert!(matches!(&verdict, GateVerdict::Pending(r) if r.contains("p95 latency")), "{verdict:?}");
    }

    #[test]
    fn a_version_that_fails_to_load_fails_its_gates_by_majority() {
        let g = gates();
        let failed = |seed: u8| {
            let v = VersionReport { model: "m".into(), version: 2, activation_failures: 3, ..Default::default() };
            record(seed, 1, vec![v])
        };
        // One node claims it could not load the version; two serve it: no verdict from that.
        let mut view = fleet(&[(20, 0), (20, 0)], 2, 0.2);
        view.update(failed(9), 0);
        assert!(matches!(evaluate_gates(&g, &view.summary("m", 2), None), GateVerdict::Pending(_)));
        // Two of three could not load it, nobody measured a request: it fails.
        let mut view = FleetView::default();
        view.update(failed(7), 0);
        view.update(failed(8), 0);
        let verdict = evaluate_gates(&g, &view.summary("m", 2), None);
        assert!(matches!(&verdict, GateVerdict::Fail(r) if r.contains("failed to load on 2")), "{verdict:?}");
        // Counts near u64::MAX saturate instead of overflowing.
        let mut total = report(2, 1, 0, 0.2);
        total.add(&VersionReport { requests: u64::MAX, ..Default::default() });
        assert_eq!(total.requests, u64::MAX);
    }

    fn plan() -> RolloutPlan {
        RolloutPlan {
            waves: vec![
                Wave { fraction: 0.1, soak_secs: 60 },
                Wave { fraction: 0.5, soak_secs: 60 },
                Wave { fraction: 1.0, soak_secs: 0 },
            ],
            ..RolloutPlan::default()
        }
    }

    #[test]
    fn waves_open_after_their_soak_when_gates_pass() {
        let (p, op) = (plan(), OperatorState::default());
        let mut progress = RolloutProgress::default();
        advance(&mut progress, &p, 1000, &GateVerdict::Pending("x".into()), &op, 1000);
        assert_eq!(progress.opened, vec![1000]);
        assert_eq!(decide(&progress, Some(0), false), RolloutDecision::Activate);
        assert!(matches!(decide(&progress, Some(1), false), RolloutDecision::Wait(_)));
        advance(&mut progress, &p, 1000, &GateVerdict::Pass, &op, 1030);
        assert_eq!(progress.opened.len(), 1, "the canary soaks 60 s");
        advance(&mut progress, &p, 1000, &GateVerdict::Pending("x".into()), &op, 1070);
        assert_eq!(progress.opened.len(), 1, "no verdict, no next wave");
        advance(&mut progress, &p, 1000, &GateVerdict::Pass, &op, 1080);
        assert_eq!(progress.opened, vec![1000, 1080]);
        advance(&mut progress, &p, 1000, &GateVerdict::Pass, &op, 1140);
        assert_eq!(progress.opened, vec![1000, 1080, 1140]);
        assert_eq!(decide(&progress, Some(2), false), RolloutDecision::Activate);
        assert!(matches!(decide(&progress, None, false), RolloutDecision::Wait(_)));
    }

    #[test]
    fn a_failing_gate_halts_and_rolls_back_only_active_nodes() {
        let (p, op) = (plan(), OperatorState::default());
        let mut progress = RolloutProgress::default();
        advance(&mut progress, &p, 0, &GateVerdict::Fail("errors".into()), &op, 10);
        assert!(matches!(decide(&progress, Some(0), true), RolloutDecision::RollBack(_)));
        assert!(matches!(decide(&progress, Some(0), false), RolloutDecision::Wait(_)));
        advance(&mut progress, &p, 0, &GateVerdict::Pass, &op, 500);
        assert!(progress.halted.is_some(), "a halt is for good");
    }

    #[test]
    fn operators_pause_resume_promote_and_abort() {
        let p = plan();
        let cmd = |action, at| RolloutCommand { model: "m".into(), version: 2, action, issued_at: at };
        let mut progress = RolloutProgress::default();
        let paused = OperatorState::fold(&[cmd(CommandAction::Pause, 5)]);
        advance(&mut progress, &p, 0, &GateVerdict::Pass, &paused, 100);
        assert_eq!(progress.opened.len(), 1, "paused: no new wave");
        // Resume and pause arrive out of order: issued_at decides.
        let resumed = OperatorState::fold(&[cmd(CommandAction::Resume, 7), cmd(CommandAction::Pause, 5)]);
        advance(&mut progress, &p, 0, &GateVerdict::Pass, &resumed, 100);
        assert_eq!(progress.opened, vec![0, 100]);
        let promoted = OperatorState::fold(&[cmd(CommandAction::Promote, 110)]);
        advance(&mut progress, &p, 0, &GateVerdict::Pass, &promoted, 111);
        assert_eq!(progress.opened, vec![0, 100, 111], "promote skips the soak");
        let back = OperatorState::fold(&[cmd(CommandAction::Promote, 1), cmd(CommandAction::RollBackTo { to: 1 }, 2)]);
        assert_eq!(back.roll_back_to, Some(1));
        let mut rolled = RolloutProgress::default();
        advance(&mut rolled, &p, 0, &GateVerdict::Pass, &back, 3);
        assert!(rolled.halted.as_deref().is_some_and(|h| h.contains("version 1")), "{rolled:?}");
        let mut other = RolloutProgress::default();
        let aborted = OperatorState::fold(&[cmd(CommandAction::Abort, 1)]);
        advance(&mut other, &p, 0, &GateVerdict::Pass, &aborted, 2);
        assert!(matches!(decide(&other, Some(0), true), RolloutDecision::RollBack(_)));
    }
}
