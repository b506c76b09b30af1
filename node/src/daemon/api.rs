//! The node's own HTTP routes, beside the OpenAI-compatible ones: status and publish.
//! Bound where the inference API is (loopback by default) and behind the same bearer token.

use super::control::Control;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use slmesh_inference::http::{api_error, authorized, ApiError, HttpState};
use slmesh_protocol::fleet::SignedCommand;
use slmesh_protocol::manifest::SignedManifest;
use slmesh_protocol::revocation::SignedRevocation;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone)]
struct ApiState {
    control: Control,
    http: Arc<HttpState>,
}

/// `POST /v1/publish`: a signed manifest, and the folder on this machine holding its files.
#[derive(Debug, Serialize, Deserialize)]
pub struct PublishRequest {
    /// The signed manifest (`slmesh manifest sign` output), hex-encoded.
    pub manifest_hex: String,
    /// Absolute path of the folder with the files the manifest names.
    pub files_dir: PathBuf,
}

pub(super) fn router(control: Control, http: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/publish", post(publish))
        .route("/v1/fleet", get(fleet))
        .route("/v1/rollouts", get(rollouts))
        .route("/v1/rollouts/command", post(command))
        .route("/v1/events", get(events))
        .route("/v1/revocations", post(revoke))
        .layer(DefaultBodyLimit::max(4 << 20))
        .with_state(ApiState { control, http })
}

fn invalid(message: impl Into<String>) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, "invalid_request_error", message, None)
}

async fn status(State(s): State<ApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorized(&s.http, &headers)?;
    Ok(Json(s.control.status()).into_response())
}

async fn publish(State(s): State<ApiState>, headers: HeaderMap, body: axum::body::Bytes) -> Result<Response, ApiError> {
    authorized(&s.http, &headers)?;
    let request: PublishRequest =
        serde_json::from_slice(&body).map_err(|e| invalid(format!("body is not a publish request: {e}")))?;
    let bytes = hex::decode(request.manifest_hex.trim()).map_err(|e| invalid(format!("manifest_hex: {e}")))?;
    let signed = SignedManifest::from_bytes(&bytes).map_err(|e| invalid(format!("manifest: {e}")))?;
    if !request.files_dir.is_absolute() {
        return Err(invalid("files_dir must be an absolute path on the node's machine"));
    }
    match s.control.publish(signed, request.files_dir).await {
        Ok(message) => Ok(Json(serde_json::json!({ "published": true, "message": message })).into_response()),
        Err(message) => Err(api_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", message, None)),
    }
}

async fn fleet(State(s): State<ApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorized(&s.http, &headers)?;
    Ok(Json(serde_json::json!({ "versions": s.control.fleet() })).into_response())
}

/// `GET /v1/events`: the rollout history, oldest first; `model`, `version` and `limit`
/// (default 200) narrow it.
#[derive(Debug, Deserialize)]
struct EventsQuery {
    model: Option<String>,
    version: Option<u64>,
    limit: Option<usize>,
}

async fn events(
    State(s): State<ApiState>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authorized(&s.http, &headers)?;
    let axum::extract::Query(q) = query.map_err(|e| invalid(format!("bad query: {e}")))?;
    let limit = q.limit.unwrap_or(200).min(slmesh_protocol::history::MAX_EVENTS);
    let events = s.control.events(q.model.as_deref(), q.version, limit);
    Ok(Json(serde_json::json!({ "events": events })).into_response())
}

async fn rollouts(State(s): State<ApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorized(&s.http, &headers)?;
    Ok(Json(serde_json::json!({ "rollouts": s.control.rollouts() })).into_response())
}

/// `POST /v1/rollouts/command`: `{"command_hex": ...}`, a rollout command signed by a
/// trusted publisher key (`slmesh rollout pause|resume|promote|abort` makes one).
#[derive(Debug, Serialize, Deserialize)]
pub struct CommandRequest {
    pub command_hex: String,
}

/// `POST /v1/revocations`: `{"revocation_hex": ...}`, a node's revocation signed by a
/// trusted publisher key (`slmesh revoke` makes one).
#[derive(Debug, Serialize, Deserialize)]
pub struct RevocationRequest {
    pub revocation_hex: String,
}

async fn revoke(State(s): State<ApiState>, headers: HeaderMap, body: axum::body::Bytes) -> Result<Response, ApiError> {
    authorized(&s.http, &headers)?;
    let request: RevocationRequest =
        serde_json::from_slice(&body).map_err(|e| invalid(format!("body is not a revocation request: {e}")))?;
    let signed = from_hex(&request.revocation_hex, "revocation", SignedRevocation::from_bytes)?;
    answered(s.control.revoke(signed).await)
}

async fn command(State(s): State<ApiState>, headers: HeaderMap, body: axum::body::Bytes) -> Result<Response, ApiError> {
    authorized(&s.http, &headers)?;
    let request: CommandRequest =
        serde_json::from_slice(&body).map_err(|e| invalid(format!("body is not a command request: {e}")))?;
    let signed = from_hex(&request.command_hex, "command", SignedCommand::from_bytes)?;
    answered(s.control.command(signed).await)
}

/// Signed bytes sent as hex, decoded.
fn from_hex<T>(
    text: &str,
    what: &str,
    decode: impl FnOnce(&[u8]) -> Result<T, slmesh_protocol::ProtocolError>,
) -> Result<T, ApiError> {
    let bytes = hex::decode(text.trim()).map_err(|e| invalid(format!("{what}_hex: {e}")))?;
    decode(&bytes).map_err(|e| invalid(format!("{what}: {e}")))
}

/// The node's answer to an operator's signed order.
fn answered(result: Result<String, String>) -> Result<Response, ApiError> {
    match result {
        Ok(message) => Ok(Json(serde_json::json!({ "accepted": true, "message": message })).into_response()),
        Err(message) => Err(api_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", message, None)),
    }
}
