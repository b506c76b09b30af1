//! When this node shadows: it serves a version in the canary of a rollout whose plan asks
//! for shadow comparison, the canary still soaks, and the version it replaced is on disk
//! within the node's memory budget. The driver keeps that version loaded while told to
//! (`Output::Shadow`), and stops when told so.

use super::{Level, Node, Output};
use crate::manifest::FileRole;
use crate::shadow::ShadowPlan;

impl Node {
    /// The shadow comparison this node should run for `name` now, if any, and why not
    /// when it is asked for and cannot (for the log).
    fn shadow_wanted(&self, now: u64, name: &str) -> Result<Option<ShadowPlan>, String> {
        let Some(state) = self.models.get(name) else { return Ok(None) };
        let Some(candidate) = self.serving.get(name).copied().filter(|v| state.active == Some(*v)) else {
            return Ok(None);
        };
        let key = (name.to_string(), candidate);
        let Some(manifest) = self.manifests.get(&key) else { return Ok(None) };
        let plan = &manifest.manifest.rollout;
        let Some(gate) = &plan.gates.agreement else { return Ok(None) };
        let Some(record) = self.versions.get(&key) else { return Ok(None) };
        // The canary only, while it soaks: once the next wave opens, its verdict is in.
        let soaking = match (record.opened.as_slice(), plan.waves.first()) {
            ([opened], Some(first)) => plan.waves.len() > 1 || now / 1000 < opened.saturating_add(first.soak_secs),
            _ => false,
        };
        if record.my_wave != Some(0) || record.halted.is_some() || !soaking {
            return Ok(None);
        }
        let Some(baseline) = state.previous.filter(|b| *b < candidate) else { return Ok(None) };
        if !state.staged.contains(&baseline) {
            return Err(format!("version {baseline}'s files are not on this node"));
        }
        let weights = self
            .chosen_variant(name, baseline)
            .and_then(|v| v.files.into_iter().find(|f| f.role == FileRole::Weights))
            .ok_or_else(|| format!("no weights file of version {baseline}"))?;
        let budget = self.cfg.shadow_max_weights_bytes;
        if weights.size > budget {
            return Err(format!(
                "version {baseline}'s weights ({} MiB) exceed this node's shadow budget ({} MiB)",
                weights.size >> 20,
                budget >> 20
            ));
        }
        Ok(Some(ShadowPlan {
            model: name.to_string(),
            candidate,
            baseline,
            baseline_weights: weights.name,
            sample: gate.sample,
        }))
    }

    /// Tells the driver to start, change or stop shadowing `name` when what it should do
    /// changed, and logs why not when the plan asks for it and this node cannot.
    pub(super) fn shadow_tick(&mut self, now: u64, name: &str) {
        let wanted = self.shadow_wanted(now, name).transpose();
        if self.shadowing.get(name) == wanted.as_ref() {
            return;
        }
        let before = self.shadowing.get(name).and_then(|r| r.as_ref().ok()).cloned();
        let after = wanted.as_ref().and_then(|r| r.as_ref().ok()).cloned();
        if let Some(Err(why)) = &wanted {
            self.event(Some(name), Level::Warn, format!("no shadow comparison on this node: {why}"));
        }
        match wanted {
            Some(w) => self.shadowing.insert(name.to_string(), w),
            None => self.shadowing.remove(name),
        };
        if before == after {
            return;
        }
        if let Some(p) = &before {
            let text = format!("shadow comparison with version {} ended", p.baseline);
            self.version_event(name, p.candidate, Level::Info, text);
        }
        if let Some(p) = &after {
            let text = format!(
                "shadow comparison: {:.0}% of requests answered again by version {}",
                p.sample * 100.0,
                p.baseline
            );
            self.version_event(name, p.candidate, Level::Info, text);
        }
        self.outputs.push_back(Output::Shadow { model: name.to_string(), plan: after });
    }
}
