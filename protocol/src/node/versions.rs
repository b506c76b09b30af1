//! Model versions on one node: accepting manifests, fetching and staging their files,
//! loading them (with bounded, backed-off retries), keeping what may be needed again,
//! and telling the fleet what this node holds and measures.

use super::{Activation, FetchRetry, Level, Node, Output, Persist, Restored, UploadView, VersionKey, VersionRecord};
use crate::eval::EvalCounts;
use crate::hex32::Hex32;
use crate::history::HistoryKind;
use crate::identity::NodeId;
use crate::manifest::{FileRole, SignedManifest, Variant, VerifiedManifest};
use crate::mesh::{rank_providers, HaveRecord, ProviderInfo, SignedHave, MAX_BLOBS_PER_HAVE, TOPIC_MANIFESTS};
use crate::rollout::RolloutPhase;
use crate::select::{select_variant, NodeFacts};
use crate::ProtocolError;
use std::collections::BTreeSet;

impl Node {
    pub(super) fn verify(&self, signed: SignedManifest) -> Result<VerifiedManifest, ProtocolError> {
        let models = &self.models;
        let verified = crate::manifest::verify_signed_manifest(signed, &self.trust, |name| {
            models.get(name).map(|m| m.latest_known).filter(|v| *v > 0)
        })?;
        crate::trust::same_fleet("the manifest", &verified.manifest.fleet, &self.fleet_id)?;
        Ok(verified)
    }

    fn facts(&self) -> NodeFacts {
        NodeFacts { tags: self.tags.clone(), ..self.cfg.facts.clone() }
    }

    /// The variant this node takes of a version it holds the manifest of.
    pub(super) fn chosen_variant(&self, name: &str, version: u64) -> Option<Variant> {
        let m = self.manifests.get(&(name.to_string(), version))?;
        select_variant(&m.manifest, &self.facts()).ok().cloned()
    }

    fn chosen_files(&self, name: &str, version: u64) -> Vec<Hex32> {
        self.chosen_variant(name, version).map(|v| v.files.iter().map(|f| f.blake3).collect()).unwrap_or_default()
    }

    pub(super) fn restore(&mut self, restored: Restored, now: u64) {
        for signed in restored.manifests {
            match crate::manifest::verify_signed_manifest(signed, &self.trust, |_| None) {
                Ok(v) => {
                    self.manifests.insert((v.manifest.name.clone(), v.manifest.version), v);
                }
                Err(e) => self.event(None, Level::Warn, format!("a stored manifest no longer verifies: {e}")),
            }
        }
        self.restore_revocations(restored.revocations);
        self.models = restored.models.into_iter().collect();
        self.versions = restored.versions.into_iter().collect();
        for signed in restored.commands {
            if let Ok((c, _)) = self.trust.open(&signed) {
                self.commands.entry((c.model, c.version)).or_default().push(signed);
            }
        }
        self.known = restored.peers.into_iter().take(super::peers::MAX_KNOWN_PEERS).collect();
        self.known_cohorts.get_mut().clear();
        self.complete = restored.complete_blobs.into_iter().collect();
        self.originated = restored.originated.into_iter().collect();
        let models: Vec<(String, super::ModelState)> =
            self.models.iter().map(|(n, m)| (n.clone(), m.clone())).collect();
        for (name, state) in models {
            if let Some(active) = state.active {
                self.start_activation(&name, active, Activation::Restore);
            }
            let latest = state.latest_known;
            if latest > 0 && !state.staged.contains(&latest) {
                if let Some(v) = self.manifests.get(&(name.clone(), latest)).cloned() {
                    self.want(&v);
                }
            }
            for v in &state.staged {
                let files = self.chosen_files(&name, *v);
                self.complete.extend(files);
            }
        }
        self.delete_unlisted_versions(&restored.on_disk);
        self.fetch_check = true;
        let _ = now;
    }

    /// Deletes the version folders on disk that no model state lists as staged and no
    /// fetch is about to fill: left by a garbage collection cut short, they would hold a
    /// model's size of disk for nothing.
    fn delete_unlisted_versions(&mut self, on_disk: &[(String, u64)]) {
        for (name, version) in on_disk {
            let staged = self.models.get(name).is_some_and(|m| m.staged.contains(version));
            let key = (name.clone(), *version);
            if staged || self.wanted.contains_key(&key) || self.fetching.contains_key(&key) {
                continue;
            }
            self.version_event(name, *version, Level::Info, "deleting files no state lists (an interrupted clean-up)");
            self.outputs.push_back(Output::DeleteVersion { model: name.clone(), version: *version });
        }
    }

    /// A verified manifest newer than anything held: record it, choose a variant, fetch.
    pub(super) fn accept(&mut self, now: u64, verified: VerifiedManifest) {
        let (name, version) = (verified.manifest.name.clone(), verified.manifest.version);
        let state = self.models.entry(name.clone()).or_default();
        if version <= state.latest_known {
            return;
        }
        state.latest_known = version;
        let key = (name.clone(), version);
        self.persist(Persist::Manifest { name: name.clone(), version, signed: verified.signed.clone() });
        self.persist_model(&name);
        self.versions.entry(key.clone()).or_insert_with(|| VersionRecord::new(now / 1000));
        self.persist_version(&key);
        let text = format!("accepted manifest, signed by {}", verified.publisher_name);
        self.version_event(&name, version, Level::Info, text);
        self.want(&verified);
        self.manifests.insert(key, verified);
        self.fetch_check = true;
    }

    fn want(&mut self, verified: &VerifiedManifest) {
        let m = &verified.manifest;
        match select_variant(m, &self.facts()) {
            Ok(variant) => {
                // A newer version supersedes an unfinished older one.
                self.wanted.retain(|(n, v), _| n != &m.name || *v > m.version);
                self.wanted.insert((m.name.clone(), m.version), variant.clone());
            }
            Err(e) => {
                let (name, version) = (m.name.clone(), m.version);
                self.note(&name, format!("version {version}: {e}"));
            }
        }
    }

    /// Peers that hold `blob` or are fetching it, ranked (same site, then RTT).
    fn providers_of(&self, blob: &Hex32) -> Vec<NodeId> {
        let mut nodes = self.directory.holders(blob);
        nodes.extend(self.directory.partial_holders(blob));
        nodes.sort();
        nodes.dedup();
        let candidates = nodes
            .into_iter()
            .filter_map(|n| self.peers.get(&n).map(|p| (n, p)))
            .map(|(node, p)| ProviderInfo { node, site: p.tags.get("site").cloned(), rtt_micros: p.rtt_micros })
            .collect();
        rank_providers(candidates, self.tags.get("site").map(String::as_str))
    }

    /// Running fetches learn of providers announced since they started; waiting ones may
    /// start now.
    pub(super) fn update_providers(&mut self) {
        let mut changes = vec![];
        for files in self.fetching.values() {
            for (blob, held) in files {
                let now = self.providers_of(blob);
                if *held != now {
                    changes.push((*blob, now));
                }
            }
        }
        for (blob, providers) in changes {
            for files in self.fetching.values_mut() {
                if let Some(held) = files.get_mut(&blob) {
                    *held = providers.clone();
                }
            }
            self.outputs.push_back(Output::Providers { blob, providers });
        }
        self.fetch_check = true;
    }

    /// Starts a fetch for every wanted version whose files all have a provider (or are
    /// here already), unless it is backing off after a failure.
    pub(super) fn try_fetches(&mut self, now: u64) {
        let candidates: Vec<(VersionKey, Variant)> = self
            .wanted
            .iter()
            .filter(|(k, _)| !self.fetching.contains_key(*k) && self.fetch_retry.get(*k).is_none_or(|r| r.at <= now))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, variant) in candidates {
            let mut files = vec![];
            let mut ready = true;
            for file in &variant.files {
                let providers = self.providers_of(&file.blake3);
                if !self.complete.contains(&file.blake3) && providers.is_empty() {
                    ready = false;
                    break;
                }
                files.push((file.clone(), providers));
            }
            if !ready {
                continue;
            }
            if let Some(r) = self.fetch_retry.get_mut(&key) {
                r.at = u64::MAX; // no timer while it runs
            }
            self.fetching.insert(key.clone(), files.iter().map(|(f, p)| (f.blake3, p.clone())).collect());
            self.set_phase(now, &key, RolloutPhase::Fetching, "");
            self.outputs.push_back(Output::Fetch { model: key.0.clone(), version: key.1, files });
            // Peers may fetch from us what we have verified so far.
            self.have_dirty = true;
        }
    }

    pub(super) fn set_phase(&mut self, now: u64, key: &VersionKey, phase: RolloutPhase, reason: &str) {
        let record = self.versions.entry(key.clone()).or_insert_with(|| VersionRecord::new(now / 1000));
        if record.phase == phase && record.reason == reason {
            return;
        }
        record.phase = phase;
        record.reason = reason.to_string();
        record.updated_at = now / 1000;
        self.persist_version(key);
    }

    pub(super) fn on_fetch_finished(&mut self, now: u64, name: String, version: u64, result: Result<(), String>) {
        let key = (name.clone(), version);
        if self.fetching.remove(&key).is_none() {
            return;
        }
        self.have_dirty = true;
        match result {
            Ok(()) => {
                self.fetch_retry.remove(&key);
                self.on_staged(now, &name, version);
            }
            Err(e) => {
                let retry = self.fetch_retry.entry(key).or_insert(FetchRetry { failures: 0, at: 0 });
                retry.failures = retry.failures.saturating_add(1);
                let wait = self
                    .cfg
                    .fetch_retry_ms
                    .saturating_mul(1 << (retry.failures - 1).min(16))
                    .min(self.cfg.fetch_retry_max_ms);
                retry.at = now.saturating_add(wait);
                self.note(&name, format!("fetch of version {version} failed, will retry in {} s: {e}", wait / 1000));
            }
        }
    }

    fn on_staged(&mut self, now: u64, name: &str, version: u64) {
        let key = (name.to_string(), version);
        self.wanted.remove(&key);
        let files = self.chosen_files(name, version);
        self.complete.extend(files);
        self.models.entry(name.to_string()).or_default().staged.insert(version);
        self.persist_model(name);
        self.set_phase(now, &key, RolloutPhase::Staged, "");
        self.version_event(name, version, Level::Info, "staged");
        self.have_dirty = true;
        // The rollout engine decides when this node's wave opens (or a pin does).
        self.rollout_tick(now);
        self.collect_garbage();
    }

    pub(super) fn start_activation(&mut self, name: &str, version: u64, why: Activation) {
        if self.activating.contains_key(name) {
            return;
        }
        let weights = self
            .chosen_variant(name, version)
            .and_then(|v| v.files.iter().find(|f| f.role == FileRole::Weights).map(|f| f.name.clone()));
        let Some(weights) = weights else {
            return self.note(name, format!("version {version}: no weights file in the chosen variant"));
        };
        let key = (name.to_string(), version);
        let evaluated = self.versions.get(&key).is_some_and(|r| r.eval.is_some());
        let eval = match why {
            Activation::Rollout if !evaluated => self.manifests.get(&key).and_then(|m| m.manifest.eval.clone()),
            _ => None,
        };
        self.activating.insert(name.to_string(), (version, why));
        self.outputs.push_back(Output::Activate { model: name.to_string(), version, weights, why, eval });
    }

    pub(super) fn on_activation_finished(
        &mut self,
        now: u64,
        name: String,
        version: u64,
        result: Result<(), String>,
        eval: Option<EvalCounts>,
    ) {
        let Some((v, why)) = self.activating.get(&name).copied() else { return };
        if v != version {
            return;
        }
        self.activating.remove(&name);
        let key = (name.clone(), version);
        let secs = now / 1000;
        if let (Ok(()), Some(counts)) = (&result, eval) {
            self.versions.entry(key.clone()).or_insert_with(|| VersionRecord::new(secs)).eval = Some(counts);
            let (passed, cases) = (counts.passed, counts.cases);
            let previous = match counts.previous_passed {
                Some(p) => format!(" (the version served before: {p})"),
                None => String::new(),
            };
            let text = format!("evaluation suite: {passed} of {cases} case(s) passed{previous}");
            self.history(now, &name, version, Level::Info, HistoryKind::Evaluated { passed, cases }, text);
        }
        match result {
            Ok(()) => {
                self.serving.insert(name.clone(), version);
                let state = self.models.entry(name.clone()).or_default();
                let old = state.active;
                if old != Some(version) {
                    // Going back from a halted version: it is not kept as the previous one.
                    state.previous = match why {
                        Activation::RollBack { .. } => state.previous.filter(|p| *p != version),
                        _ => old,
                    };
                    state.active = Some(version);
                }
                if let (Activation::RollBack { from }, Some(bad)) = (why, old) {
                    let reason = format!("rolled back to version {version}");
                    self.set_phase(now, &(name.clone(), bad), RolloutPhase::RolledBack, &reason);
                    let text = format!("rolled back from version {from}");
                    self.history(now, &name, version, Level::Warn, HistoryKind::RolledBack { from }, text);
                }
                self.persist_model(&name);
                self.active_since.insert(key.clone(), secs);
                // Measured now: its turn in the version's panel counts from here (a turn
                // of another report still waiting comes due again at the next sample).
                self.report_turn_at = Some(now);
                if let Some(r) = self.versions.get_mut(&key) {
                    r.retry_activation_at = None;
                }
                self.set_phase(now, &key, RolloutPhase::Active, "");
                self.notes.remove(&name);
                self.history(now, &name, version, Level::Info, HistoryKind::Activated, "serving");
                self.collect_garbage();
            }
            Err(e) => {
                let max = self.cfg.max_activation_attempts;
                let base = self.cfg.activation_retry_ms;
                let record = self.versions.entry(key.clone()).or_insert_with(|| VersionRecord::new(secs));
                record.activation_failures = record.activation_failures.saturating_add(1);
                record.last_activation_error = Some(e.clone());
                let failures = record.activation_failures;
                let kind = HistoryKind::ActivationFailed { reason: e.clone() };
                // Logged by the note below.
                self.keep_history(
                    now,
                    &name,
                    version,
                    kind,
                    format!("failed to load (attempt {failures} of {max}): {e}"),
                );
                let record = self.versions.entry(key.clone()).or_insert_with(|| VersionRecord::new(secs));
                if failures >= max {
                    record.retry_activation_at = None;
                    let reason = format!("failed to load {failures} time(s): {e}");
                    self.set_phase(now, &key, RolloutPhase::Failed, &reason);
                    self.note(&name, format!("version {version} {reason}; not tried again"));
                } else {
                    let wait = base.saturating_mul(1 << (failures - 1).min(16)) / 1000;
                    record.retry_activation_at = Some(secs.saturating_add(wait.max(1)));
                    self.persist_version(&key);
                    self.note(
                        &name,
                        format!("version {version} was refused at activation, will retry in {wait} s: {e}"),
                    );
                }
                // Whatever served before goes on serving (the engine kept it loaded).
                self.rollout_tick(now);
            }
        }
    }

    /// Keeps the active, previous and pinned version of each model, a version being
    /// loaded, and a newer staged one still waiting for its wave; deletes the rest.
    pub(super) fn collect_garbage(&mut self) {
        let mut keep_blobs: BTreeSet<Hex32> = BTreeSet::new();
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in names {
            let Some(state) = self.models.get(&name).cloned() else { continue };
            let mut keep = state.keep();
            let waiting = state.staged.iter().filter(|v| {
                state.active.is_none_or(|a| **v > a)
                    && self.versions.get(&(name.clone(), **v)).is_none_or(|r| r.halted.is_none() && !r.failed())
            });
            keep.extend(waiting);
            if let Some((v, _)) = self.activating.get(&name) {
                keep.insert(*v);
            }
            let gone: Vec<u64> = state.staged.iter().filter(|v| !keep.contains(v)).copied().collect();
            // The store forgets the versions before their files go: a crash in between
            // leaves files nobody needs, never a version marked staged without its files.
            if !gone.is_empty() {
                if let Some(s) = self.models.get_mut(&name) {
                    s.staged.retain(|v| !gone.contains(v));
                }
                self.persist_model(&name);
            }
            for version in &gone {
                self.version_event(&name, *version, Level::Info, "deleting an old version's files");
                self.outputs.push_back(Output::DeleteVersion { model: name.clone(), version: *version });
            }
            for version in keep {
                keep_blobs.extend(self.chosen_files(&name, version));
            }
        }
        for variant in self.wanted.values() {
            keep_blobs.extend(variant.files.iter().map(|f| f.blake3));
        }
        // What this node published stays until a newer version replaces it.
        keep_blobs.extend(self.originated.iter().copied());
        let before = self.complete.len();
        self.complete.retain(|b| keep_blobs.contains(b));
        if self.complete.len() != before {
            self.have_dirty = true;
        }
        self.outputs.push_back(Output::ReleaseBlobs { keep: keep_blobs.into_iter().collect() });
    }

    /// Signs the blobs this node holds complete and those it is fetching, and sends the
    /// record to every admitted peer.
    pub(super) fn announce_have(&mut self, now: u64) {
        let mut blobs: BTreeSet<Hex32> = self.complete.clone();
        blobs.extend(self.originated.iter().copied());
        let partial: BTreeSet<Hex32> =
            self.fetching.values().flat_map(|f| f.keys().copied()).filter(|b| !blobs.contains(b)).collect();
        let mut blobs: Vec<Hex32> = blobs.into_iter().collect();
        blobs.truncate(MAX_BLOBS_PER_HAVE);
        let mut partial: Vec<Hex32> = partial.into_iter().collect();
        partial.truncate(MAX_BLOBS_PER_HAVE - blobs.len());
        self.have_seq = now.max(self.have_seq + 1);
        let mut blob_addrs = self.blob_addrs.clone();
        blob_addrs.truncate(crate::mesh::MAX_ADDRS);
        let record = HaveRecord { node: self.me, seq: self.have_seq, blobs, blob_addrs, partial };
        match SignedHave::sign(&record, &self.secret) {
            Ok(signed) => {
                self.my_have = Some(signed);
                let peers: Vec<NodeId> = self.peers.keys().copied().collect();
                for peer in peers {
                    self.send_have(peer);
                }
            }
            Err(e) => self.event(None, Level::Warn, format!("cannot sign the have record: {e}")),
        }
    }

    pub(super) fn on_publish(
        &mut self,
        now: u64,
        signed: SignedManifest,
        imported: &[Hex32],
    ) -> Result<String, String> {
        let data = signed.to_bytes().map_err(|e| e.to_string())?;
        let verified = self.verify(signed).map_err(|e| format!("the manifest is not accepted here: {e}"))?;
        let m = &verified.manifest;
        if !m.variants.iter().any(|v| v.files.iter().all(|f| imported.contains(&f.blake3))) {
            return Err(format!("the folder holds the files of no variant of {}", m.name));
        }
        let (name, version) = (m.name.clone(), m.version);
        let count = m.variants.iter().flat_map(|v| &v.files).filter(|f| imported.contains(&f.blake3)).count();
        self.complete.extend(imported.iter().copied());
        self.originated.extend(imported.iter().copied());
        self.persist(Persist::Originated(self.originated.iter().copied().collect()));
        self.accept(now, verified);
        self.outputs.push_back(Output::Gossip { topic: TOPIC_MANIFESTS, data });
        self.have_dirty = true;
        Ok(format!(
            "published {name}@{version}: {count} file(s) added, sent to the mesh (peers that miss it get it by anti-entropy)"
        ))
    }

    pub(super) fn upload_view(&self) -> UploadView {
        let admitted: BTreeSet<NodeId> = self.peers.keys().copied().collect();
        let holders = self
            .originated
            .iter()
            .map(|b| (*b, self.directory.holders(b).into_iter().filter(|n| admitted.contains(n)).collect()))
            .collect();
        UploadView { originated: self.originated.clone(), holders, admitted }
    }
}
