//! The OpenAI-compatible HTTP surface of a node: `POST /v1/chat/completions`,
//! `GET /v1/models`, `GET /health`.
//!
//! Bad input gets a 4xx with OpenAI's error shape and never reaches the model: the body
//! is read with a size limit, parsed by hand (so malformed JSON and invalid UTF-8 get the
//! same JSON error as any other), and checked (roles, empty content, `max_tokens` cap,
//! model name). A bounded number of requests run at once and a bounded number wait; past
//! that the answer is 429, so load never grows an unbounded queue.

use crate::Engine;
use axum::body::{to_bytes, Body};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mistralrs::{RequestBuilder, TextMessageRole, TextMessages};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

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
        }
    }
}

pub struct HttpState {
    engine: Arc<Engine>,
    limits: HttpLimits,
    bearer_token: Option<String>,
    running: Semaphore,
    waiting: AtomicUsize,
}

impl HttpState {
    pub fn new(engine: Arc<Engine>, limits: HttpLimits, bearer_token: Option<String>) -> Arc<Self> {
        Arc::new(HttpState {
            engine,
            running: Semaphore::new(limits.max_concurrent.max(1)),
            limits,
            bearer_token,
            waiting: AtomicUsize::new(0),
        })
    }
}

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async { api_error(StatusCode::NOT_FOUND, "invalid_request_error", "no such endpoint", None) })
        .with_state(state)
}

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
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

pub fn api_error(
    status: StatusCode,
    kind: &'static str,
    message: impl Into<String>,
    param: Option<&'static str>,
) -> ApiError {
    ApiError { status, kind, message: message.into(), param }
}

fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, "invalid_request_error", message, param)
}

fn authorized(state: &HttpState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.bearer_token else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(token.as_str()) {
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

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<serde_json::Number>,
    #[serde(default)]
    max_completion_tokens: Option<serde_json::Number>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    stream: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<serde_json::Value>,
}

/// The text of a message: a string, or OpenAI's list of `{"type": "text", "text": ..}` parts.
fn message_text(content: &serde_json::Value) -> Option<String> {
    match content {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(parts) => parts
            .iter()
            .map(|p| (p.get("type")?.as_str()? == "text").then(|| p.get("text")?.as_str().map(str::to_string))?)
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat()),
        _ => None,
    }
}

fn build_request(req: &ChatRequest, limits: &HttpLimits) -> Result<RequestBuilder, ApiError> {
    if req.messages.is_empty() {
        return Err(bad_request("messages must not be empty", Some("messages")));
    }
    let mut messages = TextMessages::new();
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => TextMessageRole::System,
            "user" => TextMessageRole::User,
            "assistant" => TextMessageRole::Assistant,
            other => {
                return Err(bad_request(
                    format!("messages[{i}].role {other:?} is not one of system, developer, user, assistant"),
                    Some("messages"),
                ))
            }
        };
        let text = m
            .content
            .as_ref()
            .and_then(message_text)
            .ok_or_else(|| bad_request(format!("messages[{i}].content must be text"), Some("messages")))?;
        if text.trim().is_empty() {
            return Err(bad_request(format!("messages[{i}].content is empty"), Some("messages")));
        }
        messages = messages.add_message(role, text);
    }
    let max_tokens = match req.max_completion_tokens.as_ref().or(req.max_tokens.as_ref()) {
        None => limits.default_max_tokens,
        Some(n) => match n.as_u64() {
            Some(n) if n >= 1 && n <= limits.max_tokens_cap as u64 => n as u32,
            _ => {
                return Err(bad_request(
                    format!("max_tokens {n} must be a whole number from 1 to {}", limits.max_tokens_cap),
                    Some("max_tokens"),
                ))
            }
        },
    };
    let mut builder = RequestBuilder::from(messages);
    if let Some(t) = req.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(bad_request("temperature must be in [0, 2]", Some("temperature")));
        }
        builder = if t == 0.0 { builder.set_deterministic_sampler() } else { builder.set_sampler_temperature(t) };
    }
    if let Some(p) = req.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(bad_request("top_p must be in (0, 1]", Some("top_p")));
        }
        builder = builder.set_sampler_topp(p);
    }
    // After set_deterministic_sampler, which resets the length.
    Ok(builder.set_sampler_max_len(max_tokens as usize))
}

/// Waits for a turn to generate, or refuses at once when too many already wait.
async fn take_turn(state: &HttpState) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
    if let Ok(permit) = state.running.try_acquire() {
        return Ok(permit);
    }
    if state.waiting.fetch_add(1, Ordering::SeqCst) >= state.limits.max_waiting {
        state.waiting.fetch_sub(1, Ordering::SeqCst);
        return Err(api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "too many requests waiting; retry later",
            None,
        ));
    }
    let permit = state.running.acquire().await;
    state.waiting.fetch_sub(1, Ordering::SeqCst);
    permit.map_err(|_| api_error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "shutting down", None))
}

async fn chat_completions(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorized(&state, &headers)?;
    let bytes = to_bytes(body, state.limits.max_body_bytes).await.map_err(|_| {
        api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than {} bytes", state.limits.max_body_bytes),
            None,
        )
    })?;
    let req: ChatRequest = serde_json::from_slice(&bytes)
        .map_err(|e| bad_request(format!("request body is not a valid chat completion request: {e}"), None))?;
    if req.stream == Some(true) {
        return Err(bad_request("stream: true is not supported yet", Some("stream")));
    }
    let model = state.engine.active().ok_or_else(|| {
        api_error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "no model is active on this node yet", None)
    })?;
    if let Some(name) = req.model.as_deref().filter(|n| !n.is_empty()) {
        if name != model.spec.name && name != model.spec.id() {
            return Err(api_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("model {name:?} is not served here (this node serves {})", model.spec.name),
                Some("model"),
            ));
        }
    }
    let builder = build_request(&req, &state.limits)?;
    let _turn = take_turn(&state).await?;
    match tokio::time::timeout(state.limits.request_timeout, model.chat(builder)).await {
        Err(_) => Err(api_error(StatusCode::GATEWAY_TIMEOUT, "server_error", "generation timed out", None)),
        Ok(Err(e)) => Err(api_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string(), None)),
        Ok(Ok(mut response)) => {
            response.model = model.spec.id();
            Ok(Json(response).into_response())
        }
    }
}

/// Serves the routes on `listener` until `shutdown` completes; requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}
