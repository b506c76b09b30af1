//! When a node tells the fleet what it measured: its signed metrics record goes out when
//! a gate needs it, not every interval.
//!
//! Gates read cumulative figures, so a record replaces the one before it, and most of a
//! rollout's records would only repeat what the gates already conclude. A panel member
//! sends its record when
//!
//! - a report is new, starts or stops serving, measures its first request, or fails to
//!   load (what `min_reporting_nodes` and the failed-load gate count). That a newer
//!   version replaced an older one here is not a reason: the older one's figures stay
//!   the newer one's baseline as they were, and it rides with the next record;
//! - its own figures are beyond a gate's limit, or were at the last record: an alarm goes
//!   every interval, and so does the all-clear, once the gate has its `min_samples`
//!   requests or, as this node projects the panel's counts, is about to (`alarm_due`);
//!   before, no verdict can move. Since every gate reads the median across nodes of each
//!   node's figures against a limit, this alone keeps every verdict but "waiting for
//!   samples" current;
//! - a wave's soak is about to end and the gate, as this node sees it, still waits for
//!   nodes or requests: one fresh record within the last interval before the end; and
//!   every interval after it while the next wave waits on the gate (too few samples,
//!   nodes split), unless an operator paused the rollout;
//! - `METRICS_REFRESH_INTERVALS` intervals passed since its last record, so that peers do
//!   not expire it.
//!
//! For a version whose rollout halted, a changed report is none of these: its gates
//! decide nothing more (a halt is final), so its last figures, that this node rolled
//! back from it, and that it serves the version before again, ride with the next record.
//!
//! Only a record that holds a seat in its version's panel goes, and a report new to this
//! node first waits for its turn (`report_turn`): in the order of the nodes' ranks, a
//! panel's worth of ranks per interval, from the moment this node first had the report,
//! which for a version it serves is when it started serving it (a sample is taken then).
//! A wave's nodes, whose fetches end at about one time, so report lowest rank first, and
//! the rest find the seats taken instead of each taking one for a record or two. A record
//! sent at a turn, off the node's phase of the interval, moves the phase to it: the next
//! records go an interval later, so an alarm still goes once an interval, and a refresh
//! `METRICS_REFRESH_INTERVALS` after the record before (within the receivers' lifetime
//! of it, not an interval later).
//!
//! Its enrollment certificate goes with the record (`fleet::MetricsMessage`) only when
//! receivers may not hold it: with the first record, when the record's versions change
//! (a new panel seat, or reporting again after a pause), and every
//! `CERTIFICATE_REFRESH_INTERVALS`. Receivers that missed it get it by anti-entropy.

use super::{HeldMetrics, Node};
use super::{Level, Output};
use crate::fleet::{
    evaluate_gates, node_beyond_limits, node_stat, panel_rank, rank_fraction, GateVerdict, MetricsMessage,
    MetricsRecord, SignedMetrics, VersionReport, MAX_STAGED_REPORTED, MAX_VERSIONS_PER_RECORD, PANEL_SIZE,
};
use crate::mesh::TOPIC_METRICS;
use crate::rollout::Gates;

/// A node gossips its metrics record again after this many intervals, changed or not, so
/// that peers do not expire it.
pub(super) const METRICS_REFRESH_INTERVALS: u64 = 5;
/// A node sends its certificate with its record again after this many intervals.
const CERTIFICATE_REFRESH_INTERVALS: u64 = 30;
/// The longest a new report waits for its turn in the metrics panel, in intervals.
const MAX_REPORT_WAIT_INTERVALS: u64 = 6;

impl Node {
    /// Signs this node's cumulative figures per model version and gossips them when a
    /// gate needs them (`record_due`), else every few intervals (so that peers do not
    /// expire this node). Versions that failed to load here are reported too.
    pub(super) fn on_local_metrics(&mut self, now: u64, mut reports: Vec<VersionReport>) {
        let secs = now / 1000;
        let turn = std::mem::take(&mut self.turn_sample);
        for r in &mut reports {
            r.active = self.serving(&r.model) == Some(r.version);
            r.active_since = self.active_since.get(&(r.model.clone(), r.version)).copied();
        }
        for name in self.models.keys() {
            if let Some(v) = self.serving(name) {
                if !reports.iter().any(|r| &r.model == name && r.version == v) {
                    reports.push(VersionReport {
                        model: name.clone(),
                        version: v,
                        active: true,
                        active_since: self.active_since.get(&(name.clone(), v)).copied(),
                        ..Default::default()
                    });
                }
            }
        }
        // Newer versions held ready go with the served version's report, for the
        // rollout's progress. Not a reason to send a record (`report_due`): they ride
        // with the next one, at most `METRICS_REFRESH_INTERVALS` intervals later.
        for r in reports.iter_mut().filter(|r| r.active) {
            let staged = self.models.get(&r.model).map(|s| &s.staged);
            let newer = staged.into_iter().flat_map(|s| s.range(r.version.saturating_add(1)..));
            r.staged_newer = newer.copied().take(MAX_STAGED_REPORTED).collect();
        }
        // The suite's counts go with the version's report (served now or not: a canary
        // that rolled back still tells why), for versions no older than the one before
        // the active one: a long-lived node does not report every release it ever ran.
        for ((name, version), record) in &self.versions {
            let Some(eval) = record.eval else { continue };
            let state = self.models.get(name);
            let oldest = state.and_then(|s| s.previous.or(s.active));
            if oldest.is_some_and(|o| *version < o) {
                continue;
            }
            match reports.iter_mut().find(|r| &r.model == name && r.version == *version) {
                Some(r) => r.eval = Some(eval),
                None => reports.push(VersionReport {
                    model: name.clone(),
                    version: *version,
                    eval: Some(eval),
                    ..Default::default()
                }),
            }
        }
        for ((name, version), record) in &self.versions {
            if record.activation_failures == 0 || self.serving(name) == Some(*version) {
                continue;
            }
            match reports.iter_mut().find(|r| &r.model == name && r.version == *version) {
                Some(r) => r.activation_failures = record.activation_failures,
                None => reports.push(VersionReport {
                    model: name.clone(),
                    version: *version,
                    activation_failures: record.activation_failures,
                    ..Default::default()
                }),
            }
        }
        reports.sort_by(|a, b| (&a.model, a.version).cmp(&(&b.model, b.version)));
        reports.truncate(MAX_VERSIONS_PER_RECORD);
        self.keep_panel_reports(now, &mut reports);
        if reports.is_empty() {
            self.last_reports = None;
            return;
        }
        if !self.record_due(now, &reports) {
            return;
        }
        self.metrics_seq = now.max(self.metrics_seq + 1);
        let record = MetricsRecord { node: self.me, seq: self.metrics_seq, issued_at: secs, versions: reports.clone() };
        let signed = match SignedMetrics::sign(&record, &self.secret) {
            Ok(s) => s,
            Err(e) => return self.event(None, Level::Warn, format!("cannot sign the metrics record: {e}")),
        };
        let with_certificate = self.certificate_due(now, &reports);
        let message =
            MetricsMessage { record: signed, certificate: with_certificate.then(|| self.certificate.clone()) };
        let data = match message.to_bytes() {
            Ok(d) => d,
            Err(e) => return self.event(None, Level::Warn, format!("cannot encode the metrics record: {e}")),
        };
        // Held for anti-entropy only while the view holds it (it has a seat).
        if self.fleet.update(record, secs) {
            let held = HeldMetrics { signed: message.record, certificate: self.certificate.clone() };
            self.signed_metrics.insert(self.me, held);
        }
        self.last_reports = Some(reports);
        self.metrics_sent_at = Some(now);
        if turn {
            // The records after this one go an interval apart from it, not at the old
            // phase (an alarm goes once an interval).
            self.metrics_phase = now % self.cfg.metrics_interval_ms.max(1);
            self.next_metrics = now.saturating_add(self.cfg.metrics_interval_ms);
        }
        if with_certificate {
            self.certificate_sent_at = Some(now);
        }
        self.outputs.push_back(Output::Gossip { topic: TOPIC_METRICS, data });
    }

    /// Keeps the reports that hold a seat in their version's metrics panel (the others
    /// would not count, so they are not sent). A report new to this node first waits for
    /// its turn (`report_turn`); one still waiting sets the timer that samples again at
    /// its turn (`report_turn_at`).
    fn keep_panel_reports(&mut self, now: u64, reports: &mut Vec<VersionReport>) {
        self.reporting_since.retain(|(m, v), _| reports.iter().any(|r| &r.model == m && r.version == *v));
        for r in reports.iter() {
            self.reporting_since.entry((r.model.clone(), r.version)).or_insert(now);
        }
        let fleet = self.fleet_size() as f64;
        let turns: Vec<u64> = reports.iter().map(|r| self.report_turn(now, fleet, r)).collect();
        self.report_turn_at = turns.iter().copied().filter(|t| *t > now).min();
        let mut turns = turns.into_iter();
        reports
            .retain(|r| turns.next().is_some_and(|t| t <= now) && self.fleet.would_seat(&self.me, &r.model, r.version));
    }

    /// When a report may take its seat in its version's metrics panel: after a wait in
    /// proportion to its rank among the nodes that report the version (the share of the
    /// fleet in its open waves), a panel's worth of ranks per interval, counted from this
    /// node's first report of it (sampled when it starts serving it). When a wave's
    /// nodes start serving at about one time (their fetches end together), they report
    /// in the order of their ranks, whatever their own phase of the interval, so the
    /// lowest take the seats and the rest find them taken instead of taking one each for
    /// a record or two.
    fn report_turn(&self, now: u64, fleet: f64, r: &VersionReport) -> u64 {
        let interval = self.cfg.metrics_interval_ms as f64;
        // Ranks are spread over the nodes that report the version: in a canary of 5%,
        // the lowest rank among them is 20 times the fleet's.
        let reporters = fleet * self.reporting_share(&r.model, r.version);
        let rank = rank_fraction(panel_rank(&self.me, &r.model, r.version));
        let turns = (rank * reporters / PANEL_SIZE as f64).min(MAX_REPORT_WAIT_INTERVALS as f64);
        let key = (r.model.clone(), r.version);
        let since = self.reporting_since.get(&key).copied().unwrap_or(now);
        since.saturating_add((turns * interval) as u64)
    }

    /// The share of the fleet that reports a version: that of its open waves while its
    /// rollout is under way, else all of it.
    fn reporting_share(&self, model: &str, version: u64) -> f64 {
        let key = (model.to_string(), version);
        let (Some(record), Some(m)) = (self.versions.get(&key), self.manifests.get(&key)) else { return 1.0 };
        let waves = &m.manifest.rollout.waves;
        match record.opened.len().checked_sub(1).and_then(|k| waves.get(k)) {
            Some(wave) if record.opened.len() < waves.len() => wave.fraction.clamp(0.0, 1.0),
            _ => 1.0,
        }
    }

    /// Whether this node's record goes out now (the rules are in this module's docs).
    fn record_due(&self, now: u64, reports: &[VersionReport]) -> bool {
        let Some(sent_at) = self.metrics_sent_at else { return true };
        let refresh = self.cfg.metrics_interval_ms.saturating_mul(METRICS_REFRESH_INTERVALS);
        if now.saturating_sub(sent_at) >= refresh {
            return true;
        }
        let last = self.last_reports.as_deref().unwrap_or_default();
        if last == reports {
            return false;
        }
        if !same_versions(last, reports) {
            return true;
        }
        reports.iter().zip(last).any(|(r, l)| self.report_due(now, sent_at, r, l))
    }

    /// Whether this node's certificate goes with the record now (see the module's docs).
    fn certificate_due(&self, now: u64, reports: &[VersionReport]) -> bool {
        let Some(sent_at) = self.certificate_sent_at else { return true };
        let refresh = self.cfg.metrics_interval_ms.saturating_mul(CERTIFICATE_REFRESH_INTERVALS);
        now.saturating_sub(sent_at) >= refresh
            || !same_versions(self.last_reports.as_deref().unwrap_or_default(), reports)
    }

    fn report_due(&self, now: u64, sent_at: u64, report: &VersionReport, last: &VersionReport) -> bool {
        if report == last {
            return false;
        }
        // A halted version's gates decide nothing more (a halt is final): its last
        // figures, and that this node rolled back from it, ride with the next record.
        let key = (report.model.clone(), report.version);
        if self.versions.get(&key).is_some_and(|r| r.halted.is_some()) {
            return false;
        }
        // A version a newer one replaced here no longer counts in any gate (its baseline
        // figures stay as they were): that it stopped rides with the next record.
        let superseded =
            last.active && !report.active && self.serving(&report.model).is_some_and(|v| v > report.version);
        // Nor does one served again after a newer one halted and this node rolled back:
        // the halted version's gates decide nothing more, and this one's figures stay its
        // baseline as they were.
        let restored = report.active && !last.active && self.newer_halted(&report.model, report.version);
        if (report.active != last.active && !superseded && !restored)
            || report.activation_failures != last.activation_failures
            || report.eval != last.eval
            || (report.requests == 0) != (last.requests == 0)
        {
            return true;
        }
        let Some(plan) = self.manifests.get(&key).map(|m| &m.manifest.rollout) else { return false };
        let baseline = self.fleet.gate_baseline(&report.model, report.version);
        let beyond = |r: &VersionReport| node_beyond_limits(&plan.gates, &node_stat(self.me, r), baseline.as_deref());
        if (beyond(report) || beyond(last)) && self.alarm_due(now, &key, report, &plan.gates) {
            return true;
        }
        self.gate_checkpoint_due(now, sent_at, &key)
    }

    /// Whether an alarm (or its all-clear) goes now: every interval once the panel, as
    /// this node sees it, holds the gate's `min_samples` requests. Before that no verdict
    /// can move, since the gate waits for requests whatever each node's figures say; so
    /// the alarm waits until the panel's requests reach them, projected: each member's
    /// count as last heard, grown at this node's own rate since, and half an interval
    /// ahead (the members' alarms go at their phases over the next interval). A bad
    /// canary's members then send about when the gate can read them, instead of once an
    /// interval from their first error on; the halt comes about when it did.
    ///
    /// Only the timing of this node's own records rests on the projection, never a
    /// verdict: a member that claims many requests makes the others' alarms go sooner
    /// (as they all did before), and one that claims none can hold them back by its share
    /// of the panel's requests at most; the refresh goes every
    /// `METRICS_REFRESH_INTERVALS` regardless.
    fn alarm_due(&self, now: u64, key: &(String, u64), report: &VersionReport, gates: &Gates) -> bool {
        let summary = self.fleet.gate_summary(&key.0, key.1);
        if summary.pooled.requests >= gates.min_samples {
            return true;
        }
        let since = self.reporting_since.get(key).copied().unwrap_or(now);
        let per_ms = report.requests as f64 / now.saturating_sub(since).max(1) as f64;
        let ahead = self.cfg.metrics_interval_ms as f64 / 2.0;
        let secs = now / 1000;
        let others = self.fleet.panel_requests(&key.0, key.1).into_iter().filter(|(node, _, _)| *node != self.me);
        let mut projected = report.requests as f64 + per_ms * ahead;
        for (_, requests, heard_at) in others {
            projected += requests as f64 + per_ms * (secs.saturating_sub(heard_at) as f64 * 1000.0 + ahead);
        }
        projected >= gates.min_samples as f64
    }

    /// Whether the rollout of a version of `model` newer than `version` halted.
    fn newer_halted(&self, model: &str, version: u64) -> bool {
        let newer = (model.to_string(), version.saturating_add(1))..;
        self.versions.range(newer).take_while(|((m, _), _)| m == model).any(|(_, r)| r.halted.is_some())
    }

    /// Whether the gate that opens a version's next wave needs fresh figures: within the
    /// last interval before the open wave's soak ends (once) if it still waits for
    /// samples as this node sees it, and every interval after it while the next wave
    /// stays shut and no operator paused the rollout.
    ///
    /// A gate compares each node's figures with its limits and takes the median across
    /// nodes, so its verdict moves only when a node crosses a limit, which sends a record
    /// at once (`report_due`). Fresher figures within the limits change nothing but the
    /// counts: the gate needs them only while it waits for enough nodes or requests.
    fn gate_checkpoint_due(&self, now: u64, sent_at: u64, key: &(String, u64)) -> bool {
        let (Some(record), Some(m)) = (self.versions.get(key), self.manifests.get(key)) else { return false };
        let waves = &m.manifest.rollout.waves;
        let (Some(k), Some(&opened)) = (record.opened.len().checked_sub(1), record.opened.last()) else { return false };
        if record.halted.is_some() || k + 1 >= waves.len() {
            return false;
        }
        let soak_end = opened.saturating_add(waves[k].soak_secs).saturating_mul(1000);
        let window = soak_end.saturating_sub(self.cfg.metrics_interval_ms);
        if now < window {
            return false;
        }
        if now >= soak_end {
            return !self.operator_state(key).paused;
        }
        sent_at < window && self.gate_waits_for_samples(key, &m.manifest.rollout.gates)
    }

    /// Whether a version's gates, read on this node's view, wait for more reporting nodes
    /// or requests (`GateVerdict::Pending`).
    fn gate_waits_for_samples(&self, key: &(String, u64), gates: &Gates) -> bool {
        let summary = self.fleet.gate_summary(&key.0, key.1);
        let baseline = self.fleet.gate_baseline(&key.0, key.1);
        matches!(evaluate_gates(gates, &summary, baseline.as_deref()), GateVerdict::Pending(_))
    }
}

/// Whether two lists of reports are of the same model versions.
fn same_versions(a: &[VersionReport], b: &[VersionReport]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (&x.model, x.version) == (&y.model, y.version))
}
