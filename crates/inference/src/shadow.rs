//! Shadow comparison, the engine's part: the baseline version loaded beside the active
//! one, and the second answers. Which requests, and the score, are the protocol's
//! (`slmesh_protocol::shadow`); the node says when to shadow.
//!
//! A compared request is answered again by the baseline after its live answer is sent,
//! with the same messages and parameters and at most as many tokens as the live answer
//! had, once no live request waits and a generation slot is free (it gives up after
//! `IDLE_WAIT`): comparisons take spare capacity, one at a time. The score is recorded
//! under the live version; the answers are dropped.

use crate::http::HttpState;
use crate::{Engine, InferenceError, LoadedModel, ModelSpec, Result};
use mistralrs::RequestBuilder;
use slmesh_protocol::shadow::{agreement, ShadowSampler};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a comparison waits for the node to have a free slot and no live request
/// waiting before it is given up.
const IDLE_WAIT: Duration = Duration::from_secs(30);
const IDLE_POLL: Duration = Duration::from_millis(50);

/// The baseline version, loaded for comparing the candidate's answers with.
pub struct Shadow {
    /// The version whose answers are compared (name, version).
    candidate: (String, u64),
    baseline: Arc<LoadedModel>,
    sampler: Mutex<ShadowSampler>,
}

impl Shadow {
    /// Which version answers again.
    pub fn baseline(&self) -> &ModelSpec {
        &self.baseline.spec
    }

    /// Comparisons started, and requests that came due but were skipped (one ran, or
    /// live requests waited).
    pub fn counts(&self) -> (u64, u64) {
        let s = self.sampler.lock().unwrap_or_else(|e| e.into_inner());
        (s.started, s.skipped)
    }
}

impl Engine {
    /// A ticket for `start_shadow`: a later ticket (or `stop_shadow`) supersedes it, so a
    /// baseline that finishes loading after it was called off is not kept.
    pub fn shadow_ticket(&self) -> u64 {
        let mut slot = self.shadow.lock().unwrap_or_else(|e| e.into_inner());
        slot.0 += 1;
        slot.0
    }

    /// Loads `baseline` (one load at a time, as activations) and compares the share
    /// `sample` of `candidate`'s answers with it, unless `ticket` was superseded.
    pub async fn start_shadow(&self, ticket: u64, candidate: u64, baseline: ModelSpec, sample: f64) -> Result<()> {
        let name = baseline.name.clone();
        // The baseline loaded already (only the share changed, say) is kept.
        let held = {
            let slot = self.shadow.lock().unwrap_or_else(|e| e.into_inner());
            slot.1.as_ref().filter(|s| s.baseline.spec == baseline).map(|s| s.baseline.clone())
        };
        let loaded = match held {
            Some(loaded) => loaded,
            None => {
                let _one_at_a_time = self.activating.lock().await;
                Arc::new(LoadedModel::load_with(baseline, self.options).await?)
            }
        };
        let mut slot = self.shadow.lock().unwrap_or_else(|e| e.into_inner());
        if slot.0 != ticket {
            return Err(InferenceError::Generation("called off while the baseline loaded".into()));
        }
        tracing::info!(baseline = %loaded.spec.id(), candidate, sample, "shadow comparison started");
        slot.1 = Some(Arc::new(Shadow {
            candidate: (name, candidate),
            baseline: loaded,
            sampler: Mutex::new(ShadowSampler::new(sample)),
        }));
        Ok(())
    }

    /// Stops comparing and unloads the baseline (once comparisons under way end).
    pub fn stop_shadow(&self) {
        let mut slot = self.shadow.lock().unwrap_or_else(|e| e.into_inner());
        slot.0 += 1;
        if let Some(s) = slot.1.take() {
            tracing::info!(baseline = %s.baseline.spec.id(), "shadow comparison stopped");
        }
    }

    /// The shadow comparison running, if any.
    pub fn shadow(&self) -> Option<Arc<Shadow>> {
        self.shadow.lock().unwrap_or_else(|e| e.into_inner()).1.clone()
    }
}

/// One request chosen for comparison: the baseline's request, ready to run once the live
/// answer is in. Dropped unrun (the live answer failed), it frees the sampler.
pub(crate) struct ShadowJob {
    shadow: Arc<Shadow>,
    request: Option<RequestBuilder>,
}

impl Drop for ShadowJob {
    fn drop(&mut self) {
        self.shadow.sampler.lock().unwrap_or_else(|e| e.into_inner()).finished();
    }
}

impl ShadowJob {
    /// Whether to compare a request to `model` (the sampler decides), and if so the job,
    /// with the baseline's copy of the request built by `build`.
    pub(crate) fn choose(
        state: &HttpState,
        model: &LoadedModel,
        build: impl FnOnce() -> Option<RequestBuilder>,
    ) -> Option<ShadowJob> {
        let shadow = state.engine().shadow()?;
        if shadow.candidate.0 != model.spec.name || shadow.candidate.1 != model.spec.version {
            return None;
        }
        if !shadow.sampler.lock().unwrap_or_else(|e| e.into_inner()).offer(state.waiting()) {
            return None;
        }
        let request = build();
        Some(ShadowJob { shadow, request })
    }

    /// Answers the request again with the baseline, in the background, and records how
    /// far `live_answer` (of `live_tokens` tokens) agrees with it.
    pub(crate) fn run(mut self, state: Arc<HttpState>, live_answer: String, live_tokens: usize) {
        let Some(request) = self.request.take() else { return };
        let request = request.set_sampler_max_len(live_tokens.max(1));
        tokio::spawn(async move {
            let Some(_slot) = state.idle_slot(IDLE_WAIT, IDLE_POLL).await else {
                tracing::debug!("shadow comparison given up: the node stayed busy");
                return;
            };
            let answer = tokio::time::timeout(state.limits().request_timeout, self.shadow.baseline.chat(request)).await;
            match answer {
                Ok(Ok(answer)) => {
                    let text = answer.choices.first().and_then(|c| c.message.content.clone()).unwrap_or_default();
                    let score = agreement(&live_answer, &text);
                    let (name, version) = &self.shadow.candidate;
                    state.record_agreement(name, *version, score);
                }
                // The baseline's failure says nothing about the candidate: no score.
                Ok(Err(e)) => tracing::debug!("shadow answer failed: {e}"),
                Err(_) => tracing::debug!("shadow answer timed out"),
            }
        });
    }
}
