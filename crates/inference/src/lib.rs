//! The mistral.rs engine manager of a node.
//!
//! A model version is loaded from local files only (token source none, CPU, no hub),
//! after its GGUF header was read and checked here: mistral.rs 0.8.1 panics on an
//! architecture it cannot load, so such a file is refused before it gets there, and the
//! loader runs in its own task so that any other panic is an error, not a dead node.
//! Every version must pass a smoke test before it may serve.
//!
//! Hot swap: the new version loads beside the running one; the switch is one pointer
//! swap; requests in flight hold their own reference to the old version and finish on
//! it; the old engine stops when the last of them lets go.

pub mod calibrate;
pub mod eval;
pub mod guard;
pub mod http;
mod listener;
mod logprobs;
pub mod prometheus;
pub mod quantize;
mod request;
mod seeded;
pub mod shadow;
pub mod tools;

use mistralrs::{
    ChatCompletionResponse, CompletionResponse, Constraint, CustomLogitsProcessor, GgufModelBuilder, Model,
    NormalRequest, Request, RequestBuilder, RequestMessage, Response, SamplingParams, TextMessageRole, TextMessages,
    TokenSource,
};
use slmesh_protocol::gguf::{self, GgufError, GgufInfo, MISTRALRS_GGUF_ARCHITECTURES};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum InferenceError {
    #[error("model file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("model file {path} is not loadable: {source}")]
    BadGguf { path: PathBuf, source: GgufError },
    #[error("model file {path} has architecture {architecture:?}, which mistral.rs 0.8.1 cannot load (it loads {supported})")]
    UnsupportedArchitecture { path: PathBuf, architecture: String, supported: String },
    #[error("mistral.rs could not load {path}: {reason}")]
    LoadFailed { path: PathBuf, reason: String },
    #[error("{model} failed its smoke test: {reason}")]
    SmokeTestFailed { model: String, reason: String },
    #[error("no model is active")]
    NoActiveModel,
    #[error("no previous version to roll back to")]
    NoPreviousVersion,
    #[error("generation failed: {0}")]
    Generation(String),
}

pub type Result<T, E = InferenceError> = std::result::Result<T, E>;

/// Which files make up one model version on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub version: u64,
    /// The GGUF weights; tokenizer and chat template come from its metadata.
    pub gguf: PathBuf,
}

impl ModelSpec {
    /// `name@version`: how the endpoint and the metrics name it.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Conversations whose attention cache a model keeps for the next turn (see `LoadOptions`).
pub const DEFAULT_PREFIX_CACHE: usize = 4;

/// Tokens of context (prompt and answer) a model keeps at most, unless told otherwise
/// (see `LoadOptions`).
pub const DEFAULT_CONTEXT_LENGTH: usize = 4096;

/// How the engine holds a model in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Finished conversations whose attention cache is kept so that a later request that
    /// starts the same way (a shared system prompt, the earlier turns) skips that part of
    /// its prompt; 0 turns the cache off. Each costs memory in proportion to its length
    /// (about 10 MiB for a short conversation with the demo model); prompts without a
    /// cached beginning take several times longer (BENCHMARKS.md, "Memory over many
    /// conversations").
    pub prefix_cache: usize,
    /// Tokens of context (prompt and answer together) a conversation may take, if fewer
    /// than the GGUF file allows (`None`: the file's own, often 8,192 or more). A
    /// conversation's attention cache grows with its length up to this, by (layers x
    /// KV heads x head size x 8) bytes a token: 45 KiB for the demo model, so 180 MiB at
    /// 4,096 tokens, for each request running and each conversation the prefix cache
    /// keeps. A longer prompt is refused with a 400; an answer stops at it ("length").
    pub context_length: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { prefix_cache: DEFAULT_PREFIX_CACHE, context_length: Some(DEFAULT_CONTEXT_LENGTH) }
    }
}

/// One model loading at a time in this process: the context cap is a setting of the
/// engine's loader (`mistralrs_core::set_context_length_cap`), read while it loads.
fn loading() -> &'static tokio::sync::Mutex<()> {
    static LOADING: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    LOADING.get_or_init(|| tokio::sync::Mutex::new(()))
}

/// A model version loaded into mistral.rs and smoke-tested.
pub struct LoadedModel {
    pub spec: ModelSpec,
    pub info: GgufInfo,
    /// Token texts, for the alternatives of `top_logprobs`.
    vocabulary: logprobs::Vocabulary,
    model: Model,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("spec", &self.spec).field("info", &self.info).finish()
    }
}

/// Reads and checks a GGUF header without mistral.rs.
pub fn check_gguf(path: &Path) -> Result<GgufInfo> {
    let io = |source| InferenceError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let info = gguf::read_header(std::io::BufReader::with_capacity(1 << 20, file), len)
        .map_err(|source| InferenceError::BadGguf { path: path.to_path_buf(), source })?;
    if !MISTRALRS_GGUF_ARCHITECTURES.contains(&info.architecture.as_str()) {
        return Err(InferenceError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            architecture: info.architecture,
            supported: MISTRALRS_GGUF_ARCHITECTURES.join(", "),
        });
    }
    Ok(info)
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .map_or_else(|| "the loader panicked".into(), |m| format!("the loader panicked: {m}")),
        Err(e) => format!("the loader task ended: {e}"),
    }
}

/// The prompt every version must answer before it serves.
const SMOKE_PROMPT: &str = "Reply with one word: hello.";
const SMOKE_TOKENS: usize = 4;

impl LoadedModel {
    /// Loads a GGUF file through mistral.rs (CPU, local files only) and smoke-tests it.
    pub async fn load(spec: ModelSpec) -> Result<Self> {
        Self::load_with(spec, LoadOptions::default()).await
    }

    /// As `load`, holding the model as `options` say.
    pub async fn load_with(spec: ModelSpec, options: LoadOptions) -> Result<Self> {
        let path = spec.gguf.clone();
        let failed = |reason: String| InferenceError::LoadFailed { path: path.clone(), reason };
        let header_path = path.clone();
        let (info, vocabulary) = tokio::task::spawn_blocking(move || {
            let info = check_gguf(&header_path)?;
            // A file without a token list loads (or not) in mistral.rs; its alternatives
            // then come back without text.
            let vocabulary = logprobs::Vocabulary::read(&header_path).unwrap_or_else(|e| {
                tracing::warn!(file = %header_path.display(), "no token texts for top_logprobs: {e}");
                Default::default()
            });
            Ok::<_, InferenceError>((info, vocabulary))
        })
        .await
        .map_err(|e| failed(panic_text(e)))??;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        // mistral.rs falls through to the hub when the folder does not exist: make sure it does.
        let dir = std::fs::canonicalize(dir).map_err(|e| failed(format!("model folder: {e}")))?;
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .ok_or_else(|| failed("file name is not UTF-8".into()))?
            .to_string();
        let dir_text = dir.to_str().ok_or_else(|| failed("folder name is not UTF-8".into()))?.to_string();
        let _one_load = loading().lock().await;
        mistralrs_core::set_context_length_cap(options.context_length);
        let model = tokio::spawn(async move {
            GgufModelBuilder::new(dir_text, vec![file])
                .with_token_source(TokenSource::None)
                .with_force_cpu()
                .with_prefix_cache_n((options.prefix_cache > 0).then_some(options.prefix_cache))
                .build()
                .await
        })
        .await
        .map_err(|e| failed(panic_text(e)))?
        .map_err(|e| failed(format!("{e:#}")))?;
        let loaded = LoadedModel { spec, info, vocabulary, model };
        loaded.smoke_test().await?;
        Ok(loaded)
    }

    async fn smoke_test(&self) -> Result<()> {
        let fail = |reason: String| InferenceError::SmokeTestFailed { model: self.spec.id(), reason };
        let request = RequestBuilder::from(TextMessages::new().add_message(TextMessageRole::User, SMOKE_PROMPT))
            .set_deterministic_sampler()
            .set_sampler_max_len(SMOKE_TOKENS);
        let response = self.model.send_chat_request(request).await.map_err(|e| fail(e.to_string()))?;
        if response.usage.completion_tokens == 0 {
            return Err(fail("it generated no tokens".into()));
        }
        Ok(())
    }

    /// One chat completion (non-streaming).
    pub async fn chat(&self, request: RequestBuilder) -> Result<ChatCompletionResponse> {
        self.model.send_chat_request(request).await.map_err(|e| InferenceError::Generation(e.to_string()))
    }

    /// One plain-text completion (non-streaming) of `prompt`, with the logits processors
    /// given (the engine's penalties first, then these in order).
    pub async fn complete(
        &self,
        prompt: String,
        sampling: SamplingParams,
        logits_processors: Option<Vec<Arc<dyn CustomLogitsProcessor>>>,
    ) -> Result<CompletionResponse> {
        let fail = |e: String| InferenceError::Generation(e);
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let request = Request::Normal(Box::new(NormalRequest {
            messages: RequestMessage::Completion { text: prompt, echo_prompt: false, best_of: None },
            sampling_params: sampling,
            response: tx,
            return_logprobs: false,
            is_streaming: false,
            id: 0,
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors,
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        let sender = self.model.inner().get_sender(None).map_err(|e| fail(e.to_string()))?;
        sender.send(request).await.map_err(|e| fail(e.to_string()))?;
        match rx.recv().await {
            Some(Response::CompletionDone(r)) => Ok(r),
            Some(Response::CompletionModelError(e, _)) => Err(fail(e)),
            Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => Err(fail(e.to_string())),
            Some(_) => Err(fail("unexpected response kind from the engine".into())),
            None => Err(fail("the engine stopped before answering".into())),
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }
}

/// The node's serving slot: the active version, and what to roll back to.
#[derive(Default)]
pub struct Engine {
    active: RwLock<Option<Arc<LoadedModel>>>,
    previous: RwLock<Option<ModelSpec>>,
    /// One activation at a time: two loads at once would double peak memory for nothing.
    activating: tokio::sync::Mutex<()>,
    last_error: Mutex<Option<String>>,
    /// The shadow comparison's ticket counter and baseline (`shadow.rs`).
    shadow: Mutex<(u64, Option<Arc<shadow::Shadow>>)>,
    options: LoadOptions,
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// An engine that loads every version (and a shadow baseline) as `options` say.
    pub fn with_options(options: LoadOptions) -> Self {
        Self { options, ..Self::default() }
    }

    /// The active version. Hold the `Arc` for the whole request: a swap then cannot
    /// pull the model from under it.
    pub fn active(&self) -> Option<Arc<LoadedModel>> {
        self.active.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn previous(&self) -> Option<ModelSpec> {
        self.previous.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Why the last activation was refused, if it was.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads and smoke-tests `spec` beside the active version, then swaps it in. On any
    /// failure the active version keeps serving and the error says why.
    pub async fn activate(&self, spec: ModelSpec) -> Result<()> {
        self.activate_evaluated(spec, None).await.map(|_| ())
    }

    /// As `activate`, running `suite` on the loaded version before the swap (in the
    /// smoke test's place: nothing is served from it yet): its counts, if given one.
    /// A suite that cannot run (a generation error) refuses the version like a failed
    /// smoke test; answers that fail checks do not, the fleet's gates judge the counts.
    pub async fn activate_evaluated(
        &self,
        spec: ModelSpec,
        suite: Option<&slmesh_protocol::eval::EvalSuite>,
    ) -> Result<Option<slmesh_protocol::eval::EvalCounts>> {
        let _one_at_a_time = self.activating.lock().await;
        let mut result = LoadedModel::load_with(spec, self.options).await;
        let mut counts = None;
        if let (Ok(loaded), Some(suite)) = (&result, suite) {
            match loaded.run_suite(suite).await {
                Ok(run) => {
                    tracing::info!(
                        model = %loaded.spec.id(), passed = run.counts.passed, cases = run.counts.cases,
                        secs = run.secs, "evaluation suite run before the swap"
                    );
                    counts = Some(run.counts);
                }
                Err(e) => result = Err(e),
            }
        }
        // A suite that compares runs on the version serving now too (it keeps serving).
        let comparing = suite.filter(|s| s.compare_with_previous);
        if let (Some(c), Some(suite), Some(old)) = (&mut counts, comparing, self.active()) {
            match old.run_suite(suite).await {
                Ok(run) => {
                    tracing::info!(
                        model = %old.spec.id(), passed = run.counts.passed, cases = run.counts.cases,
                        secs = run.secs, "evaluation suite run on the version serving now, to compare"
                    );
                    c.previous_passed = Some(run.counts.passed);
                }
                // Its failure says nothing about the new version: no comparison then.
                Err(e) => tracing::warn!(model = %old.spec.id(), "the suite could not run on the serving version: {e}"),
            }
        }
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = result.as_ref().err().map(|e| e.to_string());
        let loaded = Arc::new(result?);
        let old = self.active.write().unwrap_or_else(|e| e.into_inner()).replace(loaded);
        if let Some(old) = old {
            *self.previous.write().unwrap_or_else(|e| e.into_inner()) = Some(old.spec.clone());
            tracing::info!(old = %old.spec.id(), "swapped; the old version stops when its last request ends");
        }
        Ok(counts)
    }

    /// Goes back to the previous version (loaded again from its files on disk).
    pub async fn roll_back(&self) -> Result<()> {
        let previous = self.previous().ok_or(InferenceError::NoPreviousVersion)?;
        self.activate(previous).await
    }
}

#[cfg(test)]
mod tests;
