//! The fleet as one node sees it: the newest metrics record of each node heard from.

use super::gates::{NodeStat, VersionSummary};
use super::record::{MetricsRecord, VersionReport};
use crate::identity::NodeId;
use std::collections::BTreeMap;

/// Records held at most; the ones heard from longest ago go first.
pub const MAX_FLEET_NODES: usize = 100_000;

struct Held {
    record: MetricsRecord,
    received_at: u64,
}

/// The newest record of every node heard from, bounded in number and age.
#[derive(Default)]
pub struct FleetView {
    records: BTreeMap<NodeId, Held>,
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
