//! The rollout engine on one node: for every version it holds, open waves after their
//! soak while the gates pass, halt when they fail or an operator says so, and choose the
//! one version of each model this node serves.

use super::{Activation, BaselineFigures, Level, Node, RolloutView, VersionKey, VersionRecord, WaveProgress};
use crate::cohort::{cohort, membership_among, sorted_cohorts, wave_counts_among, waves_with_floor, Membership};
use crate::fleet::{advance, evaluate_gates, GateVerdict, OperatorState, RolloutCommand, RolloutProgress};
use crate::history::{verdict_changed, GateFigures, HistoryKind, Outcome};
use crate::identity::NodeId;
use crate::rollout::RolloutPhase;
use crate::trust::Tags;
use std::sync::{Arc, Weak};

/// The gates' verdict on a version, and the figures it rests on.
struct GateReading<'a> {
    verdict: &'a GateVerdict,
    figures: GateFigures,
    baseline: Option<BaselineFigures>,
}

/// The last gate reading of a version, with what it was read from: the view keeps a
/// version's summary (the same `Arc`) until a record of that version changes it, so many
/// ticks read the gates of summaries they read before (evaluating them and their figures
/// again every tick was 7% of a simulated fleet's time at 1,000 nodes). Weak references:
/// the memo keeps no summary alive that the view dropped (a simulated fleet holds one
/// memo per node and version), and while it holds one, the allocation cannot be reused
/// for another summary at the same address.
pub(super) struct GateMemo {
    summary: Weak<crate::fleet::VersionSummary>,
    baseline: Option<Weak<crate::fleet::VersionSummary>>,
    gates: crate::rollout::Gates,
    verdict: GateVerdict,
    figures: GateFigures,
    baseline_figures: Option<BaselineFigures>,
}

impl GateMemo {
    fn reads(
        &self,
        summary: &Arc<crate::fleet::VersionSummary>,
        baseline: &Option<Arc<crate::fleet::VersionSummary>>,
        gates: &crate::rollout::Gates,
    ) -> bool {
        let same_baseline = match (&self.baseline, baseline) {
            (Some(a), Some(b)) => std::ptr::eq(a.as_ptr(), Arc::as_ptr(b)),
            (None, None) => true,
            _ => false,
        };
        std::ptr::eq(self.summary.as_ptr(), Arc::as_ptr(summary)) && same_baseline && self.gates == *gates
    }
}

/// How one version stands on this node after a tick.
struct Standing {
    version: u64,
    /// This node may serve it now.
    ok: bool,
    /// Ordered back to this version by an operator.
    roll_back_to: Option<u64>,
    wave: Option<usize>,
}

impl Node {
    pub(super) fn operator_state(&self, key: &VersionKey) -> OperatorState {
        let commands: Vec<RolloutCommand> = self
            .commands
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|s| self.trust.open(s).ok().map(|(c, _)| c))
            .collect();
        OperatorState::fold(&commands)
    }

    /// About how many nodes the fleet has, by the metrics panels' estimate or the peers
    /// this node knows (itself included), whichever is more.
    /// Nodes staged and serving in each wave of `model@version`'s rollout: the metrics
    /// panels' holders (`FleetView::holders`), each in the wave this node would place
    /// it (the canary floor over the nodes it knows and the holders), each counted with
    /// the number of nodes it stands for. Staged counts lag: they ride with records sent
    /// for other reasons, at most `METRICS_REFRESH_INTERVALS` intervals late.
    pub fn wave_progress(&self, model: &str, version: u64) -> Vec<WaveProgress> {
        let Some(plan) = self.manifests.get(&(model.to_string(), version)).map(|m| &m.manifest.rollout) else {
            return vec![];
        };
        let holders: std::collections::BTreeMap<NodeId, crate::fleet::Holder> =
            self.fleet.holders(model, version).into_iter().map(|h| (h.node, h)).collect();
        let me: (&NodeId, &Tags) = (&self.me, &self.tags);
        // Every node this node knows that the plan selects, and every holder (which took
        // the version, so the plan selected it).
        let known = self.known.iter().chain(std::iter::once(me));
        let known = known.filter(|(n, t)| plan.selector.matches(t) || holders.contains_key(n)).map(|(n, _)| n);
        let unknown = holders.keys().filter(|n| **n != self.me && !self.known.contains_key(n));
        let nodes = known.chain(unknown).map(|n| (n, holders.get(n)));
        let mut sums = vec![(0.0f64, 0.0f64); plan.waves.len()];
        for (wave, holder) in waves_with_floor(plan, nodes, model, version, self.fleet_size()) {
            if let (Some(w), Some(h)) = (wave, holder) {
                let (staged, serving) = &mut sums[w];
                *if h.serving { serving } else { staged } += h.weight;
            }
        }
        sums.into_iter()
            .map(|(staged, serving)| WaveProgress { staged: staged.round() as u64, serving: serving.round() as u64 })
            .collect()
    }

    pub(super) fn fleet_size(&self) -> usize {
        self.fleet.estimated_nodes().max(self.known.len() + 1)
    }

    /// Puts a change in the kind of a version's verdict into the history, with the figures
    /// it was reached on, while its rollout is under way or a failure would halt it (a
    /// settled version's verdict moves as records expire, and decides nothing).
    fn note_verdict(
        &mut self,
        now: u64,
        key: &VersionKey,
        plan: &crate::rollout::RolloutPlan,
        record: &VersionRecord,
        verdict: &GateVerdict,
        figures: &GateFigures,
    ) {
        let waves_left = record.opened.len() < plan.waves.len();
        if record.halted.is_some() || !(waves_left || matches!(verdict, GateVerdict::Fail(_))) {
            self.verdicts.remove(key);
            return;
        }
        if !verdict_changed(self.verdicts.get(key), verdict) {
            return;
        }
        self.verdicts.insert(key.clone(), verdict.clone());
        let figures = figures.clone();
        let text = match verdict {
            GateVerdict::Pending(why) => format!("gates pending: {why}"),
            GateVerdict::Pass => {
                format!("gates pass ({} nodes, {} requests)", figures.nodes_measured, figures.requests)
            }
            GateVerdict::Fail(why) => format!("gate failed: {why}"),
        };
        let level = if matches!(verdict, GateVerdict::Fail(_)) { Level::Warn } else { Level::Info };
        let (outcome, reason) = Outcome::of(verdict);
        let kind = HistoryKind::Verdict { outcome, reason, figures };
        self.history(now, &key.0, key.1, level, kind, text);
    }

    fn my_wave(&self, key: &VersionKey, record: &VersionRecord) -> Option<usize> {
        if let Some(w) = record.my_wave {
            return Some(w as usize);
        }
        let plan = &self.manifests.get(key)?.manifest.rollout;
        let others = self.known_cohorts(key, plan);
        match membership_among(plan, &self.me, &self.tags, &key.0, key.1, &others, self.fleet_size()) {
            Membership::Wave(w) => Some(w),
            _ => None,
        }
    }

    /// The sorted cohort values of the other nodes this node knows that `key`'s plan
    /// selects, kept until the nodes it knows change.
    fn known_cohorts(&self, key: &VersionKey, plan: &crate::rollout::RolloutPlan) -> Arc<Vec<f64>> {
        if let Some(c) = self.known_cohorts.borrow().get(key) {
            return c.clone();
        }
        let others = self.known.iter().filter(|(n, _)| **n != self.me);
        let c = Arc::new(sorted_cohorts(plan, others, &key.0, key.1));
        let mut kept = self.known_cohorts.borrow_mut();
        // Versions whose manifests went do not keep theirs.
        kept.retain(|k, _| self.manifests.contains_key(k));
        kept.insert(key.clone(), c.clone());
        c
    }

    /// The gates' verdict on a version as this node's view reads it now, with the figures
    /// it rests on (the version's, and its baseline's), from the memo while the view's
    /// summaries are those it was read from.
    fn read_gates(
        &mut self,
        key: &VersionKey,
        gates: &crate::rollout::Gates,
    ) -> (GateVerdict, GateFigures, Option<BaselineFigures>) {
        let summary = self.fleet.gate_summary(&key.0, key.1);
        let baseline = self.fleet.gate_baseline(&key.0, key.1);
        let memo = self.gate_memos.iter().find(|(k, _)| k == key).map(|(_, m)| m);
        if let Some(m) = memo.filter(|m| m.reads(&summary, &baseline, gates)) {
            return (m.verdict.clone(), m.figures.clone(), m.baseline_figures.clone());
        }
        let verdict = evaluate_gates(gates, &summary, baseline.as_deref());
        let figures = GateFigures::of(&summary);
        let baseline_figures = baseline.as_ref().map(|b| {
            let base = GateFigures::of(b);
            BaselineFigures { version: b.pooled.version, ratios: figures.ratios_to(&base), figures: base }
        });
        let reading = (verdict.clone(), figures.clone(), baseline_figures.clone());
        let gates = gates.clone();
        let (summary, baseline) = (Arc::downgrade(&summary), baseline.as_ref().map(Arc::downgrade));
        let memo = GateMemo { summary, baseline, gates, verdict, figures, baseline_figures };
        match self.gate_memos.iter_mut().find(|(k, _)| k == key) {
            Some((_, m)) => *m = memo,
            None => self.gate_memos.push((key.clone(), memo)),
        }
        reading
    }

    /// Runs the engine for every model: advance each version's rollout, then serve the
    /// best version this node may serve.
    pub(super) fn rollout_tick(&mut self, now: u64) {
        let secs = now / 1000;
        self.fleet.expire(secs, self.cfg.metrics_ttl_secs);
        self.drop_signed_metrics_not_in_view();
        let names: Vec<String> = self.models.keys().cloned().collect();
        let mut views = vec![];
        for name in names {
            self.tick_model(now, &name, &mut views);
        }
        self.views = views;
        // One memo per version the node holds a manifest of, as the ticks read them.
        let manifests = &self.manifests;
        self.gate_memos.retain(|(key, _)| manifests.contains_key(key));
        self.fetch_check = true;
    }

    fn tick_model(&mut self, now: u64, name: &str, views: &mut Vec<RolloutView>) {
        let secs = now / 1000;
        let Some(state) = self.models.get(name).cloned() else { return };
        let active = state.active;
        let versions: Vec<u64> = self
            .manifests
            .range((name.to_string(), 0)..=(name.to_string(), u64::MAX))
            .map(|(k, _)| k.1)
            .filter(|v| active.is_none_or(|a| *v >= a) || state.staged.contains(v))
            .collect();
        let mut standings = vec![];
        for version in versions {
            let key = (name.to_string(), version);
            let Some(plan) = self.manifests.get(&key).map(|m| m.manifest.rollout.clone()) else { continue };
            let (verdict, figures, baseline) = self.read_gates(&key, &plan.gates);
            let operator = self.operator_state(&key);
            let record = self.versions.entry(key.clone()).or_insert_with(|| VersionRecord::new(secs)).clone();
            let mut progress =
                RolloutProgress { opened: record.opened.clone(), halted: record.halted.clone(), verdict: None };
            advance(&mut progress, &plan, record.first_seen, &verdict, &operator, secs);
            self.note_verdict(now, &key, &plan, &record, &verdict, &figures);
            if progress.opened != record.opened || progress.halted != record.halted {
                let waves = plan.waves.len() as u32;
                for k in record.opened.len()..progress.opened.len() {
                    let text = format!("wave {} of {waves} opened", k + 1);
                    self.history(
                        now,
                        name,
                        version,
                        Level::Info,
                        HistoryKind::WaveOpened { wave: k as u32 + 1, waves },
                        text,
                    );
                }
                if let (None, Some(reason)) = (&record.halted, &progress.halted) {
                    let kind = HistoryKind::Halted { reason: reason.clone() };
                    self.history(now, name, version, Level::Warn, kind, format!("rollout halted: {reason}"));
                }
                if let Some(r) = self.versions.get_mut(&key) {
                    r.opened = progress.opened.clone();
                    r.halted = progress.halted.clone();
                    r.updated_at = secs;
                }
                if progress.halted.is_some() && active != Some(version) && !record.failed() {
                    let reason = progress.halted.clone().unwrap_or_default();
                    self.set_phase(now, &key, RolloutPhase::Halted, &reason);
                }
                self.persist_version(&key);
            }
            let record = self.versions.get(&key).cloned().unwrap_or(record);
            let wave = self.my_wave(&key, &record);
            let staged = state.staged.contains(&version);
            let healthy = progress.halted.is_none() && !operator.aborted && !record.failed();
            let retry_due = record.retry_activation_at.is_none_or(|t| t <= secs);
            let loaded = self.serving.get(name) == Some(&version);
            let ok = match active {
                // Kept while healthy; a load of it that failed (after a restart) is tried
                // again when its back-off is over.
                Some(a) if version == a => healthy && (loaded || retry_due),
                Some(a) if version < a => staged && healthy,
                _ => staged && healthy && wave.is_some_and(|w| w < progress.opened.len()) && retry_due,
            };
            standings.push(Standing { version, ok, roll_back_to: operator.roll_back_to, wave });
            if active.is_none_or(|a| version >= a) {
                let reading = GateReading { verdict: &verdict, figures, baseline };
                views.push(self.view(name, version, &plan, &progress, &operator, wave, reading, &record));
            }
        }
        self.choose(now, name, &standings);
        self.shadow_tick(now, name);
    }

    /// Serves the best version this node may serve: a pin first, then a version operators
    /// ordered every node back to, then the newest one whose wave is open and healthy.
    fn choose(&mut self, now: u64, name: &str, standings: &[Standing]) {
        let Some(state) = self.models.get(name).cloned() else { return };
        // An order back to an older version stands until a newer version is published.
        let newest = standings.iter().map(|s| s.version).max();
        let back_to = standings.iter().filter(|s| Some(s.version) == newest).find_map(|s| s.roll_back_to);
        let target = if let Some(pin) = state.pinned {
            Some(pin).filter(|p| state.staged.contains(p))
        } else if let Some(to) = back_to {
            if !state.staged.contains(&to) && state.active != Some(to) {
                let text = format!("ordered back to version {to}, whose files are not on this node");
                if self.notes.get(name) != Some(&text) {
                    self.note(name, text);
                }
            }
            Some(to).filter(|to| state.staged.contains(to) || state.active == Some(*to))
        } else {
            standings.iter().filter(|s| s.ok).map(|s| s.version).max()
        };
        let Some(target) = target else { return };
        if self.serving.get(name) == Some(&target) || self.activating.contains_key(name) {
            return;
        }
        // A version given up, or backing off after a failed load, is not loaded now,
        // whoever asks for it (a pin, an operator).
        let held_back = self
            .versions
            .get(&(name.to_string(), target))
            .is_some_and(|r| r.failed() || r.retry_activation_at.is_some_and(|t| t > now / 1000));
        if held_back {
            return;
        }
        let why = match state.active {
            Some(a) if a == target => Activation::Restore,
            Some(a) if target < a => Activation::RollBack { from: a },
            _ => Activation::Rollout,
        };
        if why == Activation::Rollout {
            // The wave it joins in is fixed from now on.
            let key = (name.to_string(), target);
            let wave = standings.iter().find(|s| s.version == target).and_then(|s| s.wave);
            if let Some(r) = self.versions.get_mut(&key) {
                if r.my_wave.is_none() {
                    r.my_wave = wave.map(|w| w as u32);
                    self.persist_version(&key);
                }
            }
        }
        self.start_activation(name, target, why);
    }

    #[allow(clippy::too_many_arguments)]
    fn view(
        &self,
        name: &str,
        version: u64,
        plan: &crate::rollout::RolloutPlan,
        progress: &RolloutProgress,
        operator: &OperatorState,
        wave: Option<usize>,
        gates: GateReading,
        record: &VersionRecord,
    ) -> RolloutView {
        let state = self.models.get(name).cloned().unwrap_or_default();
        let active_here = self.serving.get(name) == Some(&version);
        // The nodes this node knows, itself included in its place.
        let others = self.known_cohorts(&(name.to_string(), version), plan);
        let mine = plan.selector.matches(&self.tags).then(|| cohort(&self.me, name, version));
        let at = mine.map_or(others.len(), |m| others.partition_point(|c| *c < m));
        let nodes = others[..at].iter().copied().chain(mine).chain(others[at..].iter().copied());
        let count = others.len() + usize::from(mine.is_some());
        let known_per_wave = wave_counts_among(plan, count, nodes, self.fleet_size());
        let empty: Vec<String> =
            known_per_wave.iter().enumerate().filter(|(_, c)| **c == 0).map(|(w, _)| (w + 1).to_string()).collect();
        let decision = if state.pinned.is_some() {
            "waiting: pinned by local config".to_string()
        } else if let Some(reason) = &progress.halted {
            if active_here {
                format!("rolling back: {reason}")
            } else {
                format!("halted: {reason}")
            }
        } else if record.failed() {
            format!("failed here: {}", record.reason)
        } else {
            match wave {
                None => "waiting: the plan's selector leaves this node out".into(),
                Some(_) if active_here => "active".into(),
                Some(w) if w < progress.opened.len() && state.staged.contains(&version) => "activating".into(),
                Some(w) if w < progress.opened.len() => "fetching".into(),
                Some(w) => format!("waiting: in wave {} of the plan; {} wave(s) open", w + 1, progress.opened.len()),
            }
        };
        let decision = if empty.is_empty() {
            decision
        } else {
            format!("{decision}; wave(s) {} hold no node this node knows of", empty.join(", "))
        };
        RolloutView {
            model: name.to_string(),
            version,
            waves: plan.waves.len(),
            waves_open: progress.opened.len(),
            opened_at: progress.opened.clone(),
            my_wave: wave.map(|w| w + 1),
            known_per_wave,
            active_here,
            decision,
            verdict: gates.verdict.clone(),
            halted: progress.halted.clone(),
            paused: operator.paused,
            activation_failures: record.activation_failures,
            activation_error: record.last_activation_error.clone(),
            plan_waves: plan.waves.clone(),
            gates: plan.gates.clone(),
            figures: gates.figures,
            baseline: gates.baseline,
            per_wave: vec![],
        }
    }
}
