//! The fleet as one node sees it: the metrics panel of every model version.
//!
//! Flooding one record per node to the whole fleet costs every node bytes in proportion
//! to the fleet's size. Instead, each model version has a *panel*: of the nodes that
//! report the version, the `PANEL_SIZE` with the lowest panel rank (a hash of node id,
//! model and version, like the cohort but independent of it). Only panel members gossip
//! their records, and only their reports count; so every node receives at most
//! `PANEL_SIZE` reports per version and interval, whatever the fleet's size, and every
//! node that hears the same records holds the same panel.
//!
//! - No special role: a panel member is a node like any other, chosen by a hash nobody
//!   controls after enrollment. One that crashes stops refreshing its record, the record
//!   expires after the configured time, and the next-ranked node finds that it now has a
//!   seat and reports at its next interval: replaced within `ttl + interval`.
//! - Reports of nodes without a seat are not news: they are neither kept nor forwarded,
//!   so a node that reports out of turn costs its neighbours one message, not the fleet.
//! - The panel is a uniform sample of the nodes that report a version, so the gates'
//!   medians across nodes are medians across the panel, and the k-th smallest rank
//!   estimates how many nodes report the version (`VersionSummary::nodes_estimated`).
//!   In a fleet of at most `PANEL_SIZE` nodes per version every node has a seat and the
//!   figures are exact.
//! - Records replace each other by sequence number, so a duplicated or reordered record
//!   never double-counts; a version's pooled figures add the panel's reports, each once.

use super::gates::{NodeStat, VersionSummary};
use super::record::{MetricsRecord, VersionReport};
use crate::identity::NodeId;
use crate::panel::Panels;
use crate::sketch::Sketch;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Nodes whose reports count for one model version.
pub const PANEL_SIZE: usize = 16;
/// Model versions with a panel, at most; beyond, the panel with the fewest members goes
/// (a made-up version has one reporter, a real one many).
pub const MAX_PANELS: usize = 256;
/// Records held at most: every held record has a seat in some panel.
pub const MAX_FLEET_NODES: usize = PANEL_SIZE * MAX_PANELS;

type Key = (String, u64);

/// Where a node stands in the metrics panel of one version: lower is earlier.
pub fn panel_rank(node: &NodeId, model: &str, version: u64) -> u64 {
    let mut key = model.as_bytes().to_vec();
    key.extend_from_slice(&version.to_le_bytes());
    crate::panel::rank("slmesh metrics panel v1", node, &key)
}

struct Held {
    /// The record with its reports' sketches taken out (they are in `sketches`).
    record: MetricsRecord,
    /// Each report's per-node figures (quantiles read once, not at every rollout tick).
    stats: Vec<NodeStat>,
    /// Each report's sketches in their wire form: the gates read `stats`, only a display
    /// merges sketches, and decoded (dense counts) they took about 40 KB of a simulated
    /// node's 176 KB at 1,000 nodes, against about 8 KB in this form.
    sketches: Vec<u8>,
    /// When the record was issued by its node's clock, or received if that is earlier
    /// (a clock ahead of ours): its age counts from here, so a replayed old record does
    /// not come back younger.
    heard_at: u64,
}

/// The sketches of one report, as `Held` keeps them.
#[derive(Serialize, Deserialize, Default)]
struct ReportSketches {
    latency: Sketch,
    ttft: Sketch,
    tokens_per_sec: Sketch,
    agreement: Option<Sketch>,
}

/// Takes the sketches out of every report of `record`, in their wire form.
fn pack_sketches(record: &mut MetricsRecord) -> Vec<u8> {
    let sketches: Vec<ReportSketches> = record
        .versions
        .iter_mut()
        .map(|v| ReportSketches {
            latency: std::mem::take(&mut v.latency),
            ttft: std::mem::take(&mut v.ttft),
            tokens_per_sec: std::mem::take(&mut v.tokens_per_sec),
            agreement: v.agreement.take(),
        })
        .collect();
    // Sketches that came through validation always encode; were one not to, the display
    // would lack its quantiles, and the gates (which read `stats`) would not notice.
    crate::wire::encode(&sketches).unwrap_or_default()
}

/// Drops the kept gate summaries of every version `record` reports: only their panels
/// and counted reports change with it.
fn forget_summaries(kept: &mut BTreeMap<Key, Arc<VersionSummary>>, record: &MetricsRecord) {
    if kept.is_empty() {
        return;
    }
    for v in &record.versions {
        kept.retain(|(m, version), _| !(*version == v.version && *m == v.model));
    }
}

/// One node's figures for one version, as the gates read them.
pub fn node_stat(node: NodeId, v: &VersionReport) -> NodeStat {
    NodeStat {
        node,
        active: v.active,
        requests: v.requests,
        errors: v.errors,
        p95_latency: v.latency.quantile(0.95),
        p95_ttft: v.ttft.quantile(0.95),
        p50_tokens_per_sec: v.tokens_per_sec.quantile(0.5),
        failed_activation: v.activation_failures > 0 && !v.active,
        eval_pass_rate: v.eval.and_then(|e| e.pass_rate()),
        eval_margin: v.eval.and_then(|e| e.margin_over_previous()),
        agreement: v
            .agreement
            .as_ref()
            .filter(|s| s.count() >= crate::shadow::MIN_NODE_COMPARISONS)
            .and_then(|s| s.quantile(0.5)),
    }
}

/// A node that holds a version, as `FleetView::holders` finds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    pub node: NodeId,
    /// Serving the version (else holding it staged while serving an older one).
    pub serving: bool,
    /// How many nodes of the fleet it stands for: its panel's estimated reporters over
    /// the panel's members.
    pub weight: f64,
}

/// The newest record of every panel member heard from, bounded in number and age.
pub struct FleetView {
    records: BTreeMap<NodeId, Held>,
    panels: Panels<Key>,
    /// Records older than this (by their issue time) are refused: a replay of a silent
    /// member's last record does not keep its seat.
    max_age_secs: Option<u64>,
    /// `gate_summary` of each version asked for since its panel or reports last changed:
    /// the rollout engine asks for every version (and its baseline) at every tick, while
    /// records change the view about once a second; reading a panel's records touches 16
    /// records scattered in memory, which was a fifth of the simulator's time at 1,000
    /// nodes.
    gate_summaries: RefCell<BTreeMap<Key, Arc<VersionSummary>>>,
    /// Records that left the view so far (see `departures`).
    departures: u64,
    /// No held record was heard before this (a lower bound, exact after each scan):
    /// `expire` runs every tick and scans only when a record may be due.
    oldest_heard_at: u64,
}

impl Default for FleetView {
    fn default() -> Self {
        FleetView {
            records: BTreeMap::new(),
            panels: Panels::new(PANEL_SIZE, MAX_PANELS),
            max_age_secs: None,
            gate_summaries: RefCell::default(),
            departures: 0,
            oldest_heard_at: u64::MAX,
        }
    }
}

impl FleetView {
    /// A view that refuses records issued `ttl_secs` or more before `now` (nodes' clocks
    /// must agree to well within that, as for certificates).
    pub fn with_ttl(ttl_secs: u64) -> Self {
        FleetView { max_age_secs: Some(ttl_secs.max(1)), ..Default::default() }
    }

    /// Takes a verified record; returns whether it was news. A record not newer than the
    /// one held (a duplicate, a replay, a reordering) changes nothing, and neither does
    /// one whose versions all lack a seat.
    pub fn update(&mut self, record: MetricsRecord, now: u64) -> bool {
        let node = record.node;
        if self.records.get(&node).is_some_and(|h| h.record.seq >= record.seq) {
            return false;
        }
        let heard_at = record.issued_at.min(now);
        if self.max_age_secs.is_some_and(|ttl| now - heard_at >= ttl) {
            return false;
        }
        let had_one = self.take_out(&node);
        let mut seated = false;
        for v in &record.versions {
            let (taken, lost) =
                self.panels.seat((v.model.clone(), v.version), panel_rank(&node, &v.model, v.version), node);
            seated |= taken;
            for n in lost.into_iter().filter(|n| *n != node) {
                // A whole panel may have gone to make room: each version the node reports.
                if let Some(held) = self.records.get(&n) {
                    forget_summaries(self.gate_summaries.get_mut(), &held.record);
                }
                if !self.holds_a_seat(&n) && self.records.remove(&n).is_some() {
                    self.departures += 1;
                }
            }
        }
        forget_summaries(self.gate_summaries.get_mut(), &record);
        if seated {
            let mut record = record;
            let stats = record.versions.iter().map(|v| node_stat(node, v)).collect();
            let sketches = pack_sketches(&mut record);
            self.records.insert(node, Held { record, stats, sketches, heard_at });
            self.oldest_heard_at = self.oldest_heard_at.min(heard_at);
        } else if had_one {
            self.departures += 1;
        }
        seated
    }

    /// Whether a report of `node` about this version would hold a seat now: fewer than
    /// `PANEL_SIZE` other nodes with a lower rank hold one.
    pub fn would_seat(&self, node: &NodeId, model: &str, version: u64) -> bool {
        self.panels.would_seat(&(model.to_string(), version), panel_rank(node, model, version), node)
    }

    fn holds_a_seat(&self, node: &NodeId) -> bool {
        let Some(held) = self.records.get(node) else { return false };
        held.record
            .versions
            .iter()
            .any(|v| self.panels.is_seated(&(v.model.clone(), v.version), panel_rank(node, &v.model, v.version), node))
    }

    /// Takes a node's record and its seats out of the view (a revoked node's, say).
    pub fn remove(&mut self, node: &NodeId) {
        if self.take_out(node) {
            self.departures += 1;
        }
    }

    /// Takes a node's record and seats out; whether it had one.
    fn take_out(&mut self, node: &NodeId) -> bool {
        let Some(held) = self.records.remove(node) else { return false };
        forget_summaries(self.gate_summaries.get_mut(), &held.record);
        for v in &held.record.versions {
            self.panels.unseat(&(v.model.clone(), v.version), panel_rank(node, &v.model, v.version), node);
        }
        true
    }

    /// Forgets nodes not heard from for `ttl_secs` (counted from a record's issue time, or
    /// its receipt if that is earlier); returns how many.
    pub fn expire(&mut self, now: u64, ttl_secs: u64) -> usize {
        if now.saturating_sub(self.oldest_heard_at) < ttl_secs {
            return 0;
        }
        let gone: Vec<NodeId> =
            self.records.iter().filter(|(_, h)| now.saturating_sub(h.heard_at) >= ttl_secs).map(|(n, _)| *n).collect();
        for n in &gone {
            self.remove(n);
        }
        self.oldest_heard_at = self.records.values().map(|h| h.heard_at).min().unwrap_or(u64::MAX);
        gone.len()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// How many records have left the view so far (expired, displaced, replaced by a
    /// record without a seat, removed): what holds copies of records beside the view
    /// needs pruning only when this moved.
    pub fn departures(&self) -> u64 {
        self.departures
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

    /// Every (model, version) some panel member reports.
    pub fn versions(&self) -> Vec<(String, u64)> {
        self.panels.keys().cloned().collect()
    }

    /// About how many nodes report this version (exact while its panel has room).
    pub fn estimated_reporters(&self, model: &str, version: u64) -> usize {
        self.panels.estimated_candidates(&(model.to_string(), version))
    }

    /// About how many nodes the fleet has: the most that report any one version.
    pub fn estimated_nodes(&self) -> usize {
        self.panels.keys().map(|(m, v)| self.estimated_reporters(m, *v)).max().unwrap_or(0)
    }

    /// One version across its panel, with every member's sketches merged (for display).
    pub fn summary(&self, model: &str, version: u64) -> VersionSummary {
        self.summarise_key(&(model.to_string(), version), true)
    }

    /// What the gates read: counters and per-node figures, without merging sketches
    /// (the rollout engine asks every tick; kept until the view changes).
    pub fn gate_summary(&self, model: &str, version: u64) -> Arc<VersionSummary> {
        let key = (model.to_string(), version);
        if let Some(s) = self.gate_summaries.borrow().get(&key) {
            return s.clone();
        }
        let s = Arc::new(self.summarise_key(&key, false));
        self.gate_summaries.borrow_mut().insert(key, s.clone());
        s
    }

    fn summarise_key(&self, key: &Key, sketches: bool) -> VersionSummary {
        let (model, version) = (key.0.as_str(), key.1);
        let pooled = VersionReport { model: model.to_string(), version, ..Default::default() };
        let per_node = Vec::with_capacity(PANEL_SIZE);
        let mut s = VersionSummary { pooled, per_node, ..Default::default() };
        for node in self.panels.members(key) {
            let Some(held) = self.records.get(node) else { continue };
            let unpacked: Vec<ReportSketches> = if sketches {
                crate::wire::decode(&held.sketches, "held sketches").unwrap_or_default()
            } else {
                vec![]
            };
            for (k, (v, stat)) in held.record.versions.iter().zip(&held.stats).enumerate() {
                if v.version != version || v.model != model {
                    continue;
                }
                s.nodes_reporting += 1;
                s.nodes_active += usize::from(v.active);
                s.pooled.add_counters(v);
                if let Some(u) = unpacked.get(k) {
                    s.pooled.merge_sketches(&u.latency, &u.ttft, &u.tokens_per_sec, u.agreement.as_ref());
                }
                s.per_node.push(stat.clone());
            }
        }
        s.nodes_estimated = self.panels.estimated_candidates(key);
        s
    }

    /// Each panel member's requests of a version as its record held them, with when the
    /// record was heard (Unix seconds; see `Held::heard_at`): how old each count is.
    pub fn panel_requests(&self, model: &str, version: u64) -> Vec<(NodeId, u64, u64)> {
        let key = (model.to_string(), version);
        let mut counts = Vec::with_capacity(PANEL_SIZE);
        for node in self.panels.members(&key) {
            let Some(held) = self.records.get(node) else { continue };
            if let Some(v) = held.record.versions.iter().find(|v| v.version == version && v.model == model) {
                counts.push((*node, v.requests, held.heard_at));
            }
        }
        counts
    }

    /// The nodes a rollout's progress is estimated from, each standing for `weight`
    /// nodes of the fleet (1 while its panel has room): the members of `version`'s
    /// panel that serve it, and the members of an older version's panel that serve that
    /// one and hold `version` staged (`VersionReport::staged_newer`).
    pub fn holders(&self, model: &str, version: u64) -> Vec<Holder> {
        let mut holders = vec![];
        let older = self.panels.keys().filter(|(m, v)| m == model && *v <= version).map(|(_, v)| *v);
        for panel_version in older.collect::<Vec<_>>() {
            let key = (model.to_string(), panel_version);
            let members: Vec<&NodeId> = self.panels.members(&key).collect();
            let weight = self.estimated_reporters(model, panel_version) as f64 / members.len().max(1) as f64;
            for node in members {
                let Some(held) = self.records.get(node) else { continue };
                let report = held.record.versions.iter().find(|v| v.model == model && v.version == panel_version);
                let Some(report) = report.filter(|r| r.active) else { continue };
                let serving = panel_version == version;
                if serving || report.staged_newer.binary_search(&version).is_ok() {
                    holders.push(Holder { node: *node, serving, weight });
                }
            }
        }
        holders
    }

    /// The version a candidate is compared with: the newest lower version of the model
    /// that some node still reports.
    pub fn baseline(&self, model: &str, candidate: u64) -> Option<VersionSummary> {
        Some(self.summary(model, self.baseline_version(model, candidate)?))
    }

    /// `baseline`, as the gates read it.
    pub fn gate_baseline(&self, model: &str, candidate: u64) -> Option<Arc<VersionSummary>> {
        Some(self.gate_summary(model, self.baseline_version(model, candidate)?))
    }

    fn baseline_version(&self, model: &str, candidate: u64) -> Option<u64> {
        self.panels.keys().filter(|(m, v)| m == model && *v < candidate).map(|(_, v)| *v).max()
    }
}
