//! What an OpenAI-style request asks for, checked and turned into the engine's request.
//!
//! Supported: `messages` (or `prompt`), `max_tokens` / `max_completion_tokens`,
//! `temperature`, `top_p`, `stop` (a string or up to 4), `frequency_penalty`,
//! `presence_penalty`, `n` = 1, `seed` (with a `temperature` above 0 the request is
//! sampled with a generator of its own, seeded with it: `seeded.rs`; at temperature 0
//! answers repeat anyway), `response_format` (`text`, `json_object`, `json_schema`: constrained decoding,
//! chat only), `logprobs` with `top_logprobs` up to 20 (chat only; natural logarithms of
//! the distribution sampled from, after penalties and temperature), `stream` and
//! `stream_options.include_usage` (the last chunk always carries usage), `user`.
//! `tools` and `tool_choice` (chat only: `tools`), `tool` messages and assistant
//! messages with `tool_calls`. Anything else a client may rely on (`n` > 1, the
//! deprecated `functions`) gets a 400 in OpenAI's error shape naming
//! the parameter, rather than being ignored silently.

use crate::http::{bad_request, ApiError, HttpLimits};
use crate::logprobs::{TopRecorder, MAX_TOP_LOGPROBS};
use crate::seeded::SeededSampler;
use crate::tools::{calls_as_text, ToolPlan};
use mistralrs::{
    Constraint, CustomLogitsProcessor, RequestBuilder, SamplingParams, StopTokens, TextMessageRole, TextMessages,
};
use serde::Deserialize;
use std::sync::Arc;

/// Stop sequences a request may give, at most (OpenAI's limit).
const MAX_STOP_SEQUENCES: usize = 4;

/// The fields that chat and plain completion requests share.
#[derive(Debug, Deserialize)]
pub(crate) struct CommonParams {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    max_tokens: Option<serde_json::Number>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    stop: Option<serde_json::Value>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    n: Option<serde_json::Value>,
    #[serde(default)]
    seed: Option<serde_json::Value>,
    #[serde(default)]
    response_format: Option<serde_json::Value>,
    #[serde(default)]
    logprobs: Option<serde_json::Value>,
    #[serde(default)]
    top_logprobs: Option<serde_json::Value>,
    #[serde(default)]
    tools: Option<serde_json::Value>,
    #[serde(default)]
    tool_choice: Option<serde_json::Value>,
    #[serde(default)]
    functions: Option<serde_json::Value>,
    #[serde(default)]
    function_call: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_completion_tokens: Option<serde_json::Number>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<serde_json::Value>,
    /// An assistant message's calls (content null then).
    #[serde(default)]
    tool_calls: Option<serde_json::Value>,
}

/// What the engine is asked, and what the answer needs on its way back.
pub(crate) struct ChatPlan {
    pub builder: RequestBuilder,
    /// Records the alternatives, if the request asked for logprobs.
    pub recorder: Option<Arc<TopRecorder>>,
    /// The tools offered, if any (an answer that calls one becomes `tool_calls`).
    pub tools: Option<ToolPlan>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    pub prompt: String,
    #[serde(flatten)]
    pub common: CommonParams,
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

/// The checked sampling settings of a request.
struct Sampling {
    max_tokens: u32,
    temperature: Option<f64>,
    top_p: Option<f64>,
    stop: Vec<String>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    /// Token log-probabilities asked for, with this many alternatives per token.
    logprobs: Option<usize>,
    constraint: Constraint,
    /// Samples with a generator of the request's own (a seed and a temperature above 0).
    seeded: Option<Arc<SeededSampler>>,
}

fn sampling(
    common: &CommonParams,
    max_tokens: Option<&serde_json::Number>,
    limits: &HttpLimits,
) -> Result<Sampling, ApiError> {
    refuse_unsupported(common)?;
    if common.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(bad_request("temperature must be in [0, 2]", Some("temperature")));
    }
    if common.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(bad_request("top_p must be in (0, 1]", Some("top_p")));
    }
    let penalty = |v: Option<f64>, name: &'static str| match v {
        Some(p) if !(-2.0..=2.0).contains(&p) => Err(bad_request(format!("{name} must be in [-2, 2]"), Some(name))),
        v => Ok(v.map(|p| p as f32)),
    };
    let seeded = match (seed(common.seed.as_ref())?, common.temperature) {
        (Some(seed), Some(t)) if t > 0.0 => Some(Arc::new(SeededSampler::new(seed, t, common.top_p))),
        _ => None,
    };
    Ok(Sampling {
        seeded,
        max_tokens: self::max_tokens(max_tokens.or(common.max_tokens.as_ref()), limits)?,
        temperature: common.temperature,
        top_p: common.top_p,
        stop: stop_sequences(common.stop.as_ref())?,
        frequency_penalty: penalty(common.frequency_penalty, "frequency_penalty")?,
        presence_penalty: penalty(common.presence_penalty, "presence_penalty")?,
        logprobs: logprobs(common)?,
        constraint: constraint(common.response_format.as_ref())?,
    })
}

/// `seed`: a whole number (a negative one counts by its 64 bits).
fn seed(seed: Option<&serde_json::Value>) -> Result<Option<u64>, ApiError> {
    match seed.filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|i| i as u64))
            .map(Some)
            .ok_or_else(|| bad_request(format!("seed {v} must be a whole number"), Some("seed"))),
    }
}

/// `logprobs` (true or false) and `top_logprobs` (0 to 20, only with `logprobs`).
fn logprobs(c: &CommonParams) -> Result<Option<usize>, ApiError> {
    let wanted = match &c.logprobs {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
        Some(serde_json::Value::Bool(true)) => true,
        Some(_) => return Err(bad_request("logprobs must be true or false", Some("logprobs"))),
    };
    let top = match c.top_logprobs.as_ref().filter(|v| !v.is_null()) {
        None => 0,
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_TOP_LOGPROBS as u64 => n as usize,
            _ => {
                return Err(bad_request(
                    format!("top_logprobs must be a whole number from 0 to {MAX_TOP_LOGPROBS}"),
                    Some("top_logprobs"),
                ))
            }
        },
    };
    if !wanted && c.top_logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(bad_request("top_logprobs needs logprobs set to true", Some("top_logprobs")));
    }
    Ok(wanted.then_some(top))
}

/// `response_format`: `text`, `json_object` (any JSON object) or `json_schema` (an
/// object matching `json_schema.schema`), enforced by the engine's constrained decoding.
fn constraint(format: Option<&serde_json::Value>) -> Result<Constraint, ApiError> {
    let Some(format) = format.filter(|v| !v.is_null()) else { return Ok(Constraint::None) };
    let bad = |m: &str| bad_request(format!("response_format: {m}"), Some("response_format"));
    match format.get("type").and_then(|t| t.as_str()) {
        Some("text") => Ok(Constraint::None),
        Some("json_object") => Ok(Constraint::JsonSchema(serde_json::json!({"type": "object"}))),
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| bad("json_schema needs {\"json_schema\": {\"name\": .., \"schema\": {..}}}"))?;
            if !schema.is_object() {
                return Err(bad("json_schema.schema must be a JSON Schema object"));
            }
            Ok(Constraint::JsonSchema(schema.clone()))
        }
        Some(other) => Err(bad(&format!("type {other:?} is not one of text, json_object, json_schema"))),
        None => Err(bad("needs a type: text, json_object or json_schema")),
    }
}

/// Parameters a client relies on that this node does not do: a clear 400, not silence.
fn refuse_unsupported(c: &CommonParams) -> Result<(), ApiError> {
    let present = |v: &Option<serde_json::Value>| v.as_ref().is_some_and(|v| !v.is_null());
    for (name, value) in [("functions", &c.functions), ("function_call", &c.function_call)] {
        if present(value) {
            return Err(bad_request(format!("{name} (deprecated by OpenAI) is not supported: use tools"), Some(name)));
        }
    }
    if let Some(n) = c.n.as_ref().filter(|v| !v.is_null()) {
        if n.as_u64() != Some(1) {
            return Err(bad_request(format!("n = {n}: this node answers with one choice (n = 1)"), Some("n")));
        }
    }
    Ok(())
}

fn stop_sequences(stop: Option<&serde_json::Value>) -> Result<Vec<String>, ApiError> {
    let bad =
        || bad_request(format!("stop must be a string or a list of up to {MAX_STOP_SEQUENCES} strings"), Some("stop"));
    let stops = match stop {
        None | Some(serde_json::Value::Null) => vec![],
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(items)) => {
            items.iter().map(|i| i.as_str().map(String::from).ok_or_else(bad)).collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => return Err(bad()),
    };
    if stops.len() > MAX_STOP_SEQUENCES || stops.iter().any(String::is_empty) {
        return Err(bad());
    }
    // mistral.rs 0.8.1 matches a stop sequence that is one token as that token only, so
    // "Paris" would not stop " Paris" (another token): the variant with a leading space
    // is given too.
    let spaced =
        stops.iter().filter(|s| !s.starts_with(char::is_whitespace)).map(|s| format!(" {s}")).collect::<Vec<_>>();
    Ok(stops.into_iter().chain(spaced).collect())
}

fn max_tokens(requested: Option<&serde_json::Number>, limits: &HttpLimits) -> Result<u32, ApiError> {
    match requested {
        None => Ok(limits.default_max_tokens),
        Some(n) => match n.as_u64() {
            Some(n) if n >= 1 && n <= limits.max_tokens_cap as u64 => Ok(n as u32),
            _ => Err(bad_request(
                format!("max_tokens {n} must be a whole number from 1 to {}", limits.max_tokens_cap),
                Some("max_tokens"),
            )),
        },
    }
}

pub(crate) fn build_request(req: &ChatRequest, limits: &HttpLimits) -> Result<ChatPlan, ApiError> {
    if req.messages.is_empty() {
        return Err(bad_request("messages must not be empty", Some("messages")));
    }
    let tools = crate::tools::parse(req.common.tools.as_ref(), req.common.tool_choice.as_ref())?;
    // The tools are described in a system message: the first one, if the request has one.
    let mut tool_text = tools.as_ref().map(ToolPlan::system_text);
    let mut messages = TextMessages::new();
    if !matches!(req.messages[0].role.as_str(), "system" | "developer") {
        if let Some(text) = tool_text.take() {
            messages = messages.add_message(TextMessageRole::System, text);
        }
    }
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => TextMessageRole::System,
            "user" => TextMessageRole::User,
            "assistant" => TextMessageRole::Assistant,
            "tool" => TextMessageRole::Tool,
            other => {
                return Err(bad_request(
                    format!("messages[{i}].role {other:?} is not one of system, developer, user, assistant, tool"),
                    Some("messages"),
                ))
            }
        };
        let calls = match (&role, m.tool_calls.as_ref().filter(|c| !c.is_null())) {
            (TextMessageRole::Assistant, Some(calls)) => Some(calls_as_text(i, calls)?),
            (_, Some(_)) => {
                return Err(bad_request(
                    format!("messages[{i}]: only an assistant message has tool_calls"),
                    Some("messages"),
                ))
            }
            (_, None) => None,
        };
        let content = m.content.as_ref().filter(|c| !c.is_null());
        let text = match (content.map(message_text), calls) {
            (Some(None), _) => {
                return Err(bad_request(format!("messages[{i}].content must be text"), Some("messages")))
            }
            (Some(Some(text)), None) => text,
            (Some(Some(text)), Some(calls)) => format!("{text}\n{calls}"),
            (None, Some(calls)) => calls,
            (None, None) => String::new(),
        };
        if text.trim().is_empty() {
            return Err(bad_request(format!("messages[{i}].content is empty"), Some("messages")));
        }
        let text = match tool_text.take() {
            Some(tools) => format!("{text}\n\n{tools}"),
            None => text,
        };
        messages = messages.add_message(role, text);
    }
    let mut s = sampling(&req.common, req.max_completion_tokens.as_ref(), limits)?;
    if let Some(schema) = tools.as_ref().and_then(ToolPlan::schema) {
        if !matches!(s.constraint, Constraint::None) {
            return Err(bad_request(
                "response_format JSON and a tool_choice that requires a call cannot both shape the answer",
                Some("response_format"),
            ));
        }
        s.constraint = Constraint::JsonSchema(schema);
    }
    let mut builder = RequestBuilder::from(messages);
    match s.temperature {
        // The seeded sampler draws; the engine takes its token greedily.
        _ if s.seeded.is_some() => builder = builder.set_deterministic_sampler(),
        Some(0.0) => builder = builder.set_deterministic_sampler(),
        Some(t) => builder = builder.set_sampler_temperature(t),
        None => {}
    }
    if let Some(p) = s.top_p.filter(|_| s.seeded.is_none()) {
        builder = builder.set_sampler_topp(p);
    }
    if !s.stop.is_empty() {
        builder = builder.set_sampler_stop_toks(StopTokens::Seqs(s.stop));
    }
    if let Some(p) = s.frequency_penalty {
        builder = builder.set_sampler_frequency_penalty(p);
    }
    if let Some(p) = s.presence_penalty {
        builder = builder.set_sampler_presence_penalty(p);
    }
    // The engine gives the chosen token's figure; the alternatives come from the
    // recorder (its own come back empty with greedy decoding: see `logprobs`).
    let recorder = s.logprobs.map(|top| Arc::new(TopRecorder::new(top, s.temperature)));
    if let Some(r) = &recorder {
        builder = builder.return_logprobs(true).add_logits_processor(r.clone());
    }
    // After the recorder, which lists the alternatives before the draw.
    if let Some(seeded) = s.seeded {
        builder = builder.add_logits_processor(seeded);
    }
    builder = builder.set_constraint(s.constraint);
    // After set_deterministic_sampler, which resets the length.
    Ok(ChatPlan { builder: builder.set_sampler_max_len(s.max_tokens as usize), recorder, tools })
}

/// What the engine is asked for a plain completion.
pub(crate) struct CompletionPlan {
    pub sampling: SamplingParams,
    /// The seeded sampler, if the request has a seed and samples.
    pub processors: Option<Vec<Arc<dyn CustomLogitsProcessor>>>,
}

/// The engine's sampling settings for a plain completion.
pub(crate) fn completion_sampling(common: &CommonParams, limits: &HttpLimits) -> Result<CompletionPlan, ApiError> {
    let only_chat =
        |name: &'static str| bad_request(format!("{name} is supported on /v1/chat/completions only"), Some(name));
    for (name, value) in [("tools", &common.tools), ("tool_choice", &common.tool_choice)] {
        if value.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(only_chat(name));
        }
    }
    // The legacy endpoint's `logprobs` is a number and its answer another shape.
    if common.logprobs.as_ref().is_some_and(|v| !v.is_null() && v != &serde_json::Value::Bool(false)) {
        return Err(only_chat("logprobs"));
    }
    let s = sampling(common, None, limits)?;
    if !matches!(s.constraint, Constraint::None) {
        return Err(only_chat("response_format"));
    }
    let mut params = SamplingParams::deterministic();
    params.max_len = Some(s.max_tokens as usize);
    if s.seeded.is_none() {
        params.temperature = s.temperature.filter(|t| *t > 0.0);
        params.top_p = s.top_p;
    }
    params.stop_toks = (!s.stop.is_empty()).then_some(StopTokens::Seqs(s.stop));
    params.frequency_penalty = s.frequency_penalty;
    params.presence_penalty = s.presence_penalty;
    let processors = s.seeded.map(|p| vec![p as Arc<dyn CustomLogitsProcessor>]);
    Ok(CompletionPlan { sampling: params, processors })
}
