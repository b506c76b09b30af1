//! The OpenAI-compatible HTTP surface of a node: `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`,
//! `GET /metrics`. Which request parameters are honoured: `request.rs`.
//!
//! Bad input gets a 4xx with OpenAI's error shape and never reaches the model: the body
//! is read with a size limit, parsed by hand (so malformed JSON and invalid UTF-8 get the
//! same JSON error as any other), and checked (roles, empty content, `max_tokens` cap,
//! model name). A bounded number of requests run at once and a bounded number wait; past
//! that the answer is 429, so load never grows an unbounded queue.

pub use crate::guard::HostPolicy;
pub use crate::listener::ConnectionLimits;
use crate::logprobs::{rewrite_choices, TopRecorder};
use crate::request::{build_request, completion_sampling, ChatPlan, ChatRequest, CompletionRequest};
use crate::shadow::ShadowJob;
use crate::tools::{rewrite_as_call, HeldAnswer, ToolPlan};
use crate::{Engine, LoadedModel};
use axum::body::{to_bytes, Body};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mistralrs::{RequestBuilder, Response as EngineResponse, Usage};
use serde_json::json;
use slmesh_protocol::metrics::{NodeMetrics, RequestSample};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::StreamExt;

#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_cap: u32,
    /// Default `max_tokens` when a request gives none.
    pub default_max_tokens: u32,
    /// Requests generating at once.
    pub max_concurrent: usize,
    /// Requests waiting for a turn; one more gets 429.
    pub max_waiting: usize,
    pub request_timeout: Duration,
    /// Test-only fault injection: non-streaming requests answered by this version
    /// (`name@version`) fail with 500 and count as errors, as a broken release would.
    /// The node sets it from `SLMESH_TEST_FAULT`; rollout tests use it.
    pub fault_version: Option<String>,
}

/// Memory from which a node runs four requests at once unless told otherwise.
pub const LARGE_MACHINE_RAM_BYTES: u64 = 8 << 30;

/// Requests generating at once where the operator set none: 4 on a machine with
/// `LARGE_MACHINE_RAM_BYTES` or more, where four requests at once decode about 1.6× the
/// tokens a second of one (two at a time: 1.0–1.35×; BENCHMARKS.md); else 2, because each
/// running request holds an attention cache of up to 180 MiB (the demo model at 4,096
/// tokens), which a gateway with one or two GiB cannot give to four. Unknown memory (0)
/// counts as small.
pub fn default_max_concurrent(ram_bytes: u64) -> usize {
    if ram_bytes >= LARGE_MACHINE_RAM_BYTES {
        4
    } else {
        2
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_body_bytes: 1 << 20,
            max_tokens_cap: 2048,
            default_max_tokens: 256,
            max_concurrent: 2,
            max_waiting: 16,
            request_timeout: Duration::from_secs(120),
            fault_version: None,
        }
    }
}

pub struct HttpState {
    engine: Arc<Engine>,
    limits: HttpLimits,
    bearer_token: Option<String>,
    running: Arc<Semaphore>,
    waiting: AtomicUsize,
    metrics: Mutex<NodeMetrics>,
    rejected: Mutex<BTreeMap<u16, u64>>,
    /// More of `GET /metrics`, from whoever serves this API (a node's fleet figures).
    extra_metrics: std::sync::OnceLock<ExtraMetrics>,
}

/// Text appended to `GET /metrics` (Prometheus text format, families of their own).
pub type ExtraMetrics = Box<dyn Fn() -> String + Send + Sync>;

impl HttpState {
    pub fn new(engine: Arc<Engine>, limits: HttpLimits, bearer_token: Option<String>) -> Arc<Self> {
        Arc::new(HttpState {
            engine,
            running: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            limits,
            bearer_token,
            waiting: AtomicUsize::new(0),
            metrics: Mutex::new(NodeMetrics::default()),
            rejected: Mutex::new(BTreeMap::new()),
            extra_metrics: std::sync::OnceLock::new(),
        })
    }

    /// Adds to `GET /metrics` what `extra` renders at each scrape (set once).
    pub fn add_metrics(&self, extra: ExtraMetrics) {
        let _ = self.extra_metrics.set(extra);
    }

    /// A copy of what this node measured so far, per model version.
    pub fn metrics(&self) -> NodeMetrics {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, model: &LoadedModel, sample: &RequestSample) {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner()).record(&model.spec.name, model.spec.version, sample);
    }

    /// One shadow comparison of an answer of `model@version`, scored in [0, 1].
    pub(crate) fn record_agreement(&self, model: &str, version: u64, score: f64) {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner()).record_agreement(model, version, score);
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn limits(&self) -> &HttpLimits {
        &self.limits
    }

    /// Requests waiting for a turn to generate now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// A generation slot taken when none is waited for, within `wait`: background work
    /// (shadow answers) runs on spare capacity only.
    pub(crate) async fn idle_slot(&self, wait: Duration, poll: Duration) -> Option<OwnedSemaphorePermit> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.waiting() == 0 {
                if let Ok(permit) = self.running.clone().try_acquire_owned() {
                    return Some(permit);
                }
            }
            if tokio::time::Instant::now() + poll > deadline {
                return None;
            }
            tokio::time::sleep(poll).await;
        }
    }

    fn count_rejected(&self, status: StatusCode) {
        *self.rejected.lock().unwrap_or_else(|e| e.into_inner()).entry(status.as_u16()).or_default() += 1;
    }
}

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/metrics", get(metrics))
        .fallback(|| async { api_error(StatusCode::NOT_FOUND, "invalid_request_error", "no such endpoint", None) })
        .with_state(state)
}

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    // Fields are private: build one with `api_error`.
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status.as_u16()}});
        (self.status, Json(body)).into_response()
    }
}

impl ApiError {
    /// The request parameter at fault, if one is.
    pub fn param(&self) -> Option<&'static str> {
        self.param
    }
}

pub fn api_error(
    status: StatusCode,
    kind: &'static str,
    message: impl Into<String>,
    param: Option<&'static str>,
) -> ApiError {
    ApiError { status, kind, message: message.into(), param }
}

pub(crate) fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, "invalid_request_error", message, param)
}

/// Checks the bearer token, if the node has one.
pub fn authorized(state: &HttpState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.bearer_token else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // In constant time: how much of a guess matched must not show in how long the answer
    // takes (only a length differing from the token's returns early).
    if given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.as_bytes()))) {
        Ok(())
    } else {
        Err(api_error(StatusCode::UNAUTHORIZED, "authentication_error", "missing or wrong bearer token", None))
    }
}

async fn health(State(state): State<Arc<HttpState>>) -> Response {
    let active = state.engine.active().map(|m| m.spec.id());
    let status = if active.is_some() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"status": if active.is_some() { "ok" } else { "no model" }, "model": active, "last_error": state.engine.last_error()})))
        .into_response()
}

/// `GET /v1/models/{id}`: the served model by its name (or `name@version`), else 404.
async fn model_by_id(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    authorized(&state, &headers)?;
    let m = model_for(&state, Some(&id))?;
    Ok(Json(json!({"id": m.spec.name, "object": "model", "owned_by": "slmesh", "version": m.spec.version}))
        .into_response())
}

async fn models(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorized(&state, &headers)?;
    let data: Vec<_> = state
        .engine
        .active()
        .map(|m| json!({"id": m.spec.name, "object": "model", "owned_by": "slmesh", "version": m.spec.version}))
        .into_iter()
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn metrics(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorized(&state, &headers)?;
    let active = state.engine.active();
    let rejected = state.rejected.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut text = crate::prometheus::render(
        &state.metrics(),
        &rejected,
        active.as_ref().map(|m| (m.spec.name.as_str(), m.spec.version)),
    );
    if let Some(extra) = state.extra_metrics.get() {
        text.push_str(&extra());
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// Counts a waiting request for as long as it lives, so that a client that gives up
/// while waiting (its future dropped) leaves the count right.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits for a turn to generate, or refuses at once when too many already wait.
async fn take_turn(state: &HttpState) -> Result<OwnedSemaphorePermit, ApiError> {
    if let Ok(permit) = state.running.clone().try_acquire_owned() {
        return Ok(permit);
    }
    let waiting = Waiting(&state.waiting);
    if state.waiting.fetch_add(1, Ordering::SeqCst) >= state.limits.max_waiting {
        drop(waiting);
        return Err(api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "too many requests waiting; retry later",
            None,
        ));
    }
    let permit = state.running.clone().acquire_owned().await;
    drop(waiting);
    permit.map_err(|_| api_error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "shutting down", None))
}

async fn chat_completions(State(state): State<Arc<HttpState>>, headers: HeaderMap, body: Body) -> Response {
    chat_completions_inner(&state, &headers, body).await.unwrap_or_else(|e| refused(&state, e))
}

async fn completions(State(state): State<Arc<HttpState>>, headers: HeaderMap, body: Body) -> Response {
    completions_inner(&state, &headers, body).await.unwrap_or_else(|e| refused(&state, e))
}

async fn completions_inner(state: &Arc<HttpState>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    authorized(state, headers)?;
    let req: CompletionRequest = read_json(state, body, "completion request").await?;
    let model = model_for(state, req.common.model.as_deref())?;
    if req.prompt.trim().is_empty() {
        return Err(bad_request("prompt is empty", Some("prompt")));
    }
    if req.common.stream == Some(true) {
        return Err(bad_request("stream: true is supported on /v1/chat/completions only", Some("stream")));
    }
    let plan = completion_sampling(&req.common, &state.limits)?;
    let start = Instant::now();
    let turn = take_turn(state).await?;
    generate(state, &model, start, turn, model.complete(req.prompt, plan.sampling, plan.processors)).await
}

/// Reads and parses a JSON body within the size limit.
async fn read_json<T: serde::de::DeserializeOwned>(state: &HttpState, body: Body, what: &str) -> Result<T, ApiError> {
    let bytes = to_bytes(body, state.limits.max_body_bytes).await.map_err(|_| {
        api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than {} bytes", state.limits.max_body_bytes),
            None,
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("request body is not a valid {what}: {e}"), None))
}

/// The active model, if the request names it (or names none).
fn model_for(state: &HttpState, requested: Option<&str>) -> Result<Arc<LoadedModel>, ApiError> {
    let model = state.engine.active().ok_or_else(|| {
        api_error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "no model is active on this node yet", None)
    })?;
    if let Some(name) = requested.filter(|n| !n.is_empty()) {
        if name != model.spec.name && name != model.spec.id() {
            return Err(api_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("model {name:?} is not served here (this node serves {})", model.spec.name),
                Some("model"),
            ));
        }
    }
    Ok(model)
}

/// Records a refusal by status and turns it into a response.
fn refused(state: &HttpState, e: ApiError) -> Response {
    if e.status.is_client_error() || e.status == StatusCode::SERVICE_UNAVAILABLE {
        state.count_rejected(e.status);
    }
    e.into_response()
}

async fn chat_completions_inner(state: &Arc<HttpState>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    authorized(state, headers)?;
    let req: ChatRequest = read_json(state, body, "chat completion request").await?;
    let model = model_for(state, req.common.model.as_deref())?;
    let ChatPlan { builder, recorder, tools } = build_request(&req, &state.limits)?;
    // Compared with the previous version (on a canary), if chosen: the same request again.
    let shadow = ShadowJob::choose(state, &model, || build_request(&req, &state.limits).ok().map(|p| p.builder));
    let start = Instant::now();
    let turn = take_turn(state).await?;
    if req.common.stream == Some(true) {
        return stream_chat(state.clone(), model, builder, Extras { recorder, tools, shadow }, turn, start).await;
    }
    let work = async {
        let answer = model.chat(builder).await?;
        if let Some(job) = shadow {
            let text = answer.choices.first().and_then(|c| c.message.content.clone()).unwrap_or_default();
            job.run(state.clone(), text, answer.usage.completion_tokens);
        }
        Ok(ChatAnswer { answer, model: model.clone(), extras: Extras { recorder, tools, shadow: None } })
    };
    generate(state, &model, start, turn, work).await
}

/// What a chat answer needs on its way back beyond the engine's answer.
struct Extras {
    /// Names the alternatives, if the request asked for logprobs.
    recorder: Option<Arc<TopRecorder>>,
    /// The tools offered: an answer that calls one becomes `tool_calls`.
    tools: Option<ToolPlan>,
    /// The request is to be answered again by the previous version, for comparison.
    shadow: Option<ShadowJob>,
}

/// The alternatives of step `k` of a generation, named by the model's vocabulary.
fn alternatives(recorder: &TopRecorder, model: &LoadedModel, k: usize) -> Vec<(String, f64)> {
    recorder.step(k).into_iter().map(|(id, logprob)| (model.vocabulary.text(id), logprob)).collect()
}

/// A non-streaming answer of the engine.
trait Answer {
    fn usage(&self) -> &Usage;
    fn set_model(&mut self, id: String);
    /// The body in OpenAI's shape.
    fn to_json(&self) -> serde_json::Value;
}

/// A chat answer, with what it needs on its way back.
struct ChatAnswer {
    answer: mistralrs::ChatCompletionResponse,
    model: Arc<LoadedModel>,
    extras: Extras,
}

impl Answer for ChatAnswer {
    fn usage(&self) -> &Usage {
        &self.answer.usage
    }
    fn set_model(&mut self, id: String) {
        self.answer.model = id;
    }
    fn to_json(&self) -> serde_json::Value {
        let mut body = serde_json::to_value(&self.answer).unwrap_or_default();
        if let Some(recorder) = &self.extras.recorder {
            rewrite_choices(&mut body, 0, |k| alternatives(recorder, &self.model, k));
        }
        if let Some(tools) = &self.extras.tools {
            let id = crate::tools::call_id(&body);
            for (choice, answer) in body["choices"].as_array_mut().into_iter().flatten().zip(&self.answer.choices) {
                if let Some(call) = answer.message.content.as_deref().and_then(|text| tools.call_in(text)) {
                    rewrite_as_call(choice, "message", &call, &id, false);
                }
            }
        }
        body
    }
}

impl Answer for mistralrs::CompletionResponse {
    fn usage(&self) -> &Usage {
        &self.usage
    }
    fn set_model(&mut self, id: String) {
        self.model = id;
    }
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// How mistral.rs 0.8.1 words a request it refuses before generating.
const ENGINE_REFUSED: &str = "request validation error";

/// How it words a prompt longer than the model's context (`truncate_sequence` is its
/// own request field, not OpenAI's).
const PROMPT_TOO_LONG: &str = "Prompt sequence length is greater than";

/// A request the engine refused, as a 400 that says why in OpenAI's terms.
fn engine_refusal(message: String) -> ApiError {
    match message.split_once(PROMPT_TOO_LONG) {
        Some((_, rest)) => {
            let limit: String = rest.trim_start().chars().take_while(char::is_ascii_digit).collect();
            bad_request(
                format!(
                    "the prompt is longer than this node's context of {limit} tokens (prompt and answer): \
                     shorten the conversation (the node's --context-length sets it)"
                ),
                Some("messages"),
            )
        }
        None => bad_request(message, None),
    }
}

/// Runs one non-streaming generation under the request timeout, holding `turn`,
/// records what it measured, and answers.
async fn generate<R: Answer>(
    state: &HttpState,
    model: &LoadedModel,
    start: Instant,
    turn: OwnedSemaphorePermit,
    work: impl std::future::Future<Output = crate::Result<R>>,
) -> Result<Response, ApiError> {
    let queued = start.elapsed().as_secs_f64();
    if state.limits.fault_version.as_deref() == Some(model.spec.id().as_str()) {
        drop(turn);
        let latency_secs = start.elapsed().as_secs_f64();
        state.record(model, &RequestSample { latency_secs, error: true, ..Default::default() });
        return Err(api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "injected fault (SLMESH_TEST_FAULT)",
            None,
        ));
    }
    let result = tokio::time::timeout(state.limits.request_timeout, work).await;
    drop(turn);
    let latency_secs = start.elapsed().as_secs_f64();
    let failed = |status, message: String| {
        state.record(model, &RequestSample { latency_secs, error: true, ..Default::default() });
        api_error(status, "server_error", message, None)
    };
    match result {
        Ok(Ok(mut answer)) => {
            state.record(model, &sample_from_usage(latency_secs, queued, answer.usage()));
            answer.set_model(model.spec.id());
            Ok(Json(answer.to_json()).into_response())
        }
        // The engine refused the request itself (a JSON schema its grammar compiler
        // cannot take, say): the client's mistake, not a failure of this version.
        Ok(Err(e)) if e.to_string().contains(ENGINE_REFUSED) => Err(engine_refusal(e.to_string())),
        Ok(Err(e)) => Err(failed(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(_) => Err(failed(StatusCode::GATEWAY_TIMEOUT, "generation timed out".into())),
    }
}

fn sample_from_usage(latency_secs: f64, queued_secs: f64, usage: &Usage) -> RequestSample {
    RequestSample {
        latency_secs,
        ttft_secs: (usage.completion_tokens > 0).then(|| queued_secs + f64::from(usage.total_prompt_time_sec)),
        prompt_tokens: usage.prompt_tokens as u64,
        completion_tokens: usage.completion_tokens as u64,
        // mistral.rs reports 0 (or infinity) for answers too short to time: no figure then.
        tokens_per_sec: Some(f64::from(usage.avg_compl_tok_per_sec))
            .filter(|t| usage.completion_tokens > 0 && t.is_finite() && *t > 0.0),
        error: false,
    }
}

/// How long a streamed event may wait for a client that stopped reading before the
/// stream is given up and its generation slot freed.
const STREAM_SEND_STALL: Duration = Duration::from_secs(15);

/// Sends one event; false if the client is gone or has not read for `STREAM_SEND_STALL`.
async fn send_or_give_up(tx: &tokio::sync::mpsc::Sender<Event>, event: Event) -> bool {
    matches!(tokio::time::timeout(STREAM_SEND_STALL, tx.send(event)).await, Ok(Ok(())))
}

/// `stream: true`: server-sent events, one per chunk, the last one with usage, then
/// `data: [DONE]`. A client that goes away, or stops reading for `STREAM_SEND_STALL`,
/// stops the stream and frees its turn. A request the engine refuses before generating
/// (a prompt longer than the context, a schema it cannot compile) gets the same 400 as
/// unstreamed and does not count as a failure of the version: the response starts only
/// once the engine took the request.
async fn stream_chat(
    state: Arc<HttpState>,
    model: Arc<LoadedModel>,
    builder: RequestBuilder,
    extras: Extras,
    turn: OwnedSemaphorePermit,
    start: Instant,
) -> Result<Response, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(32);
    // Told once, before the first event: the engine took the request, or refused it.
    let (started, taken) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let mut started = Some(started);
    // mistral.rs hands out each token through a channel of one: a generation that waited
    // for a client that stopped reading would stop the engine, every other request with
    // it. So generation puts events in a queue that never blocks (at most `max_tokens`
    // of them), and a forwarder gives them to the client, giving up (and so ending the
    // generation and freeing its turn) once the client has not read for
    // `STREAM_SEND_STALL`.
    let (queue, mut queued) = tokio::sync::mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        while let Some(event) = queued.recv().await {
            if !send_or_give_up(&tx, event).await {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let _turn = turn;
        let mut first_token = None;
        // Tokens with logprobs streamed so far: the recorder's steps, in order.
        let mut streamed_tokens = 0;
        // The answer held back while tools are offered.
        let mut held = HeldAnswer::default();
        let mut usage = None;
        let mut error = None;
        // The answer's text, for a shadow comparison.
        let mut text = String::new();
        let mut extras = extras;
        // The client went away or stopped reading (the forwarder gave up): nothing more
        // is generated or sent.
        let mut gone = false;
        let deadline = tokio::time::Instant::now() + state.limits.request_timeout;
        // The engine's refusal of the request, before it generated anything.
        let mut refusal = None;
        match model.model().stream_chat_request(builder).await {
            Err(e) if e.to_string().contains(ENGINE_REFUSED) => refusal = Some(e.to_string()),
            Err(e) => error = Some(e.to_string()),
            Ok(mut stream) => loop {
                let next = match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(next)) => next,
                    Ok(None) => break,
                    Err(_) => {
                        error = Some("generation timed out".into());
                        break;
                    }
                };
                match next {
                    EngineResponse::Chunk(mut chunk) => {
                        if first_token.is_none() && chunk.choices.iter().any(|c| c.delta.content.is_some()) {
                            first_token = Some(start.elapsed().as_secs_f64());
                        }
                        chunk.model = model.spec.id();
                        if extras.shadow.is_some() {
                            text.extend(chunk.choices.first().and_then(|c| c.delta.content.as_deref()));
                        }
                        let last = chunk.usage.is_some();
                        usage = chunk.usage.clone().or(usage);
                        let mut body = serde_json::to_value(&chunk).unwrap_or_default();
                        if let Some(r) = &extras.recorder {
                            streamed_tokens +=
                                rewrite_choices(&mut body, streamed_tokens, |k| alternatives(r, &model, k));
                        }
                        if let Some(tools) = &extras.tools {
                            if !held.take(&mut body, last, tools) {
                                continue;
                            }
                        }
                        let data = body.to_string();
                        if let Some(s) = started.take() {
                            let _ = s.send(Ok(()));
                        }
                        if queue.send(Event::default().data(data)).is_err() {
                            gone = true;
                            break;
                        }
                        if last {
                            break;
                        }
                    }
                    EngineResponse::Done(_) => break,
                    EngineResponse::ModelError(e, _) => {
                        error = Some(e);
                        break;
                    }
                    EngineResponse::ValidationError(e) if started.is_some() => {
                        refusal = Some(e.to_string());
                        break;
                    }
                    EngineResponse::InternalError(e) | EngineResponse::ValidationError(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                    _ => {}
                }
            },
        }
        if let Some(s) = started.take() {
            if let Some(why) = refusal {
                // Answered as a 400 by the handler; nothing to record or send here.
                let _ = s.send(Err(why));
                return;
            }
            let _ = s.send(Ok(()));
        }
        if let (Some(e), false) = (&error, gone) {
            let body = json!({"error": {"message": e, "type": "server_error", "param": null, "code": 500}});
            gone = queue.send(Event::default().data(body.to_string())).is_err();
        }
        if !gone {
            let _ = queue.send(Event::default().data("[DONE]"));
        }
        if let (Some(job), Some(u), None, false) = (extras.shadow.take(), &usage, &error, gone) {
            job.run(state.clone(), text, u.completion_tokens);
        }
        drop(queue);
        let latency_secs = start.elapsed().as_secs_f64();
        let mut sample = match (&usage, &error) {
            (Some(u), None) => sample_from_usage(latency_secs, 0.0, u),
            _ => RequestSample { latency_secs, error: error.is_some(), ..Default::default() },
        };
        sample.ttft_secs = first_token.or(sample.ttft_secs);
        state.record(&model, &sample);
    });
    if let Ok(Err(why)) = taken.await {
        return Err(engine_refusal(why));
    }
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>)).into_response())
}

/// Serves the routes on `listener` until `shutdown` completes; requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    hosts: HostPolicy,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_router(listener, router(state), hosts, shutdown).await
}

/// Serves any router (the inference routes merged with others) the same way, every
/// route behind the browser guard (`guard`: Host, Origin, Content-Type).
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    hosts: HostPolicy,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_router_with(listener, router, hosts, ConnectionLimits::default(), shutdown).await
}

/// As `serve_router`, with other connection limits.
pub async fn serve_router_with(
    listener: tokio::net::TcpListener,
    router: Router,
    hosts: HostPolicy,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let hosts = Arc::new(hosts);
    let router =
        router.layer(axum::middleware::from_fn(move |req, next| crate::guard::guard(hosts.clone(), req, next)));
    crate::listener::serve_connections(listener, router, limits, shutdown).await
}
