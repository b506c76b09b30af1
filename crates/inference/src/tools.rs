//! `tools` and `tool_choice`: function calling, whatever the model's chat template.
//!
//! Small models' templates (SmolLM2's among them) have no place for tools, and
//! mistral.rs 0.8.1 finds calls in an answer only in the formats of the models it knows.
//! So the node does it itself, the same way for every model:
//!
//! - the tools are described to the model in a system message, with the one form a
//!   call takes: a JSON object `{"name": .., "arguments": {..}}`;
//! - `tool_choice` `required`, or naming a function, holds the answer to that form with
//!   the engine's constrained decoding (the arguments to the function's own schema);
//! - `auto` (the default with tools) lets the model choose: an answer that is such an
//!   object, naming one of the tools, becomes `tool_calls`; any other answer is text;
//! - `none` leaves the tools out.
//!
//! An answer with a call has `content` null, `tool_calls` with one call, and
//! `finish_reason` `tool_calls`, as OpenAI's. The results come back as `tool` messages,
//! and the assistant's earlier calls are shown to the model in the same JSON form.

use crate::http::{bad_request, ApiError};
use serde_json::{json, Value};

/// Most tools one request may offer.
pub const MAX_TOOLS: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON Schema object for the arguments (any object if none was given).
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    Required,
    Named(String),
}

/// The tools a request offers and how the model may use them; `None` from `parse` when
/// it offers none, or `tool_choice` is `none`.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPlan {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments, as the JSON text OpenAI's `function.arguments` carries.
    pub arguments: String,
}

fn bad(param: &'static str, m: impl Into<String>) -> ApiError {
    bad_request(format!("{param}: {}", m.into()), Some(param))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn tool(i: usize, t: &Value) -> Result<Tool, ApiError> {
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad("tools", format!("tools[{i}].type must be \"function\"")));
    }
    let f = t.get("function").ok_or_else(|| bad("tools", format!("tools[{i}] has no function")))?;
    let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
    if !valid_name(name) {
        return Err(bad("tools", format!("tools[{i}].function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -")));
    }
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object"}),
        Some(p) if p.is_object() => p.clone(),
        Some(_) => return Err(bad("tools", format!("tools[{i}].function.parameters must be a JSON Schema object"))),
    };
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => return Err(bad("tools", format!("tools[{i}].function.description must be text"))),
    };
    Ok(Tool { name: name.to_string(), description, parameters })
}

/// Checks `tools` and `tool_choice`.
pub fn parse(tools: Option<&Value>, choice: Option<&Value>) -> Result<Option<ToolPlan>, ApiError> {
    let tools = match tools.filter(|v| !v.is_null()) {
        None => vec![],
        Some(Value::Array(list)) if list.len() <= MAX_TOOLS => {
            list.iter().enumerate().map(|(i, t)| tool(i, t)).collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => return Err(bad("tools", format!("must be a list of at most {MAX_TOOLS} functions"))),
    };
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|u| u.name == t.name) {
            return Err(bad("tools", format!("two tools are named {:?}", t.name)));
        }
    }
    let choice = match choice.filter(|v| !v.is_null()) {
        None => (!tools.is_empty()).then_some(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => None,
            "auto" => Some(ToolChoice::Auto),
            "required" => Some(ToolChoice::Required),
            other => return Err(bad("tool_choice", format!("{other:?} is not one of none, auto, required"))),
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad(
                        "tool_choice",
                        "must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ..}}",
                    )
                })?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(bad("tool_choice", format!("names {name:?}, which is not among the tools")));
            }
            Some(ToolChoice::Named(name.to_string()))
        }
    };
    match choice {
        Some(_) if tools.is_empty() => Err(bad("tool_choice", "needs tools")),
        Some(choice) => Ok(Some(ToolPlan { tools, choice })),
        None => Ok(None),
    }
}

impl ToolPlan {
    /// The system message that describes the tools to the model.
    pub fn system_text(&self) -> String {
        let listed: Vec<Value> = self
            .offered()
            .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters}))
            .collect();
        let when = match &self.choice {
            ToolChoice::Auto => "If one of them helps to answer, answer with only a JSON object that calls it; otherwise answer as usual.",
            ToolChoice::Required | ToolChoice::Named(_) => "Answer with only a JSON object that calls one of them.",
        };
        format!(
            "You can call these functions:\n{}\n{when} A call is {{\"name\": <function name>, \"arguments\": {{<arguments>}}}}.",
            serde_json::to_string(&listed).unwrap_or_default()
        )
    }

    /// The tools the model may call.
    fn offered(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(|t| match &self.choice {
            ToolChoice::Named(n) => &t.name == n,
            _ => true,
        })
    }

    /// The JSON Schema an answer must follow, when the model must call a tool.
    pub fn schema(&self) -> Option<Value> {
        if self.choice == ToolChoice::Auto {
            return None;
        }
        let calls: Vec<Value> = self
            .offered()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        Some(if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) })
    }

    /// The call an answer makes, if it is one: a JSON object naming an offered tool,
    /// with object arguments (text around it, as in a code fence, is allowed).
    pub fn call_in(&self, answer: &str) -> Option<ToolCall> {
        let trimmed = answer.trim();
        let start = trimmed.find('{')?;
        let end = trimmed.rfind('}')?;
        let v: Value = serde_json::from_str(trimmed.get(start..=end)?).ok()?;
        let name = v.get("name")?.as_str()?;
        let arguments = v.get("arguments").or_else(|| v.get("parameters"))?;
        if !arguments.is_object() || !self.offered().any(|t| t.name == name) {
            return None;
        }
        Some(ToolCall { name: name.to_string(), arguments: arguments.to_string() })
    }
}

/// An assistant message's earlier calls, in the form the model is told to use.
pub fn calls_as_text(i: usize, tool_calls: &Value) -> Result<String, ApiError> {
    let list =
        tool_calls.as_array().ok_or_else(|| bad("messages", format!("messages[{i}].tool_calls must be a list")))?;
    let calls = list
        .iter()
        .map(|c| {
            let f = c.get("function")?;
            let name = f.get("name")?.as_str()?;
            // OpenAI's arguments are JSON text; shown to the model as the object.
            let arguments = f.get("arguments")?.as_str().and_then(|a| serde_json::from_str::<Value>(a).ok())?;
            Some(json!({"name": name, "arguments": arguments}).to_string())
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            bad(
                "messages",
                format!("messages[{i}].tool_calls: each needs function.name and function.arguments (JSON text)"),
            )
        })?;
    Ok(calls.join("\n"))
}

/// Rewrites an answer (a chat completion, or a streamed chunk's delta) whose text is a
/// call: `content` null, `tool_calls` with the call, `finish_reason` `tool_calls`.
pub fn rewrite_as_call(choice: &mut Value, field: &str, call: &ToolCall, id: &str, streamed: bool) {
    let mut entry = json!({"id": id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}});
    if streamed {
        entry["index"] = json!(0);
    }
    if let Some(message) = choice.get_mut(field) {
        message["content"] = Value::Null;
        message["tool_calls"] = json!([entry]);
    }
    choice["finish_reason"] = json!("tool_calls");
}

/// The id of a call: unique per answer (the engine numbers its answers per start).
pub fn call_id(body: &Value) -> String {
    format!("call_{}_{}", body["created"], body["id"].as_str().unwrap_or_default())
}

/// A streamed answer held back while tools are offered: it may turn out to be a call,
/// which goes as one `tool_calls` delta, so the text goes in the last chunk.
#[derive(Debug, Default)]
pub struct HeldAnswer {
    text: String,
    /// The held chunks' logprobs entries (already in OpenAI's shape).
    logprobs: Vec<Value>,
}

impl HeldAnswer {
    /// Takes one chunk (serialised); whether to send it: false while the answer goes on,
    /// true for its last chunk, which then carries the whole answer.
    pub fn take(&mut self, chunk: &mut Value, last: bool, plan: &ToolPlan) -> bool {
        let finished = chunk["choices"].as_array().is_some_and(|c| c.iter().any(|c| !c["finish_reason"].is_null()));
        if let Some(choice) = chunk["choices"].get(0) {
            self.text.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
            self.logprobs.extend(choice["logprobs"]["content"].as_array().into_iter().flatten().cloned());
        }
        if !finished && !last {
            return false;
        }
        let id = call_id(chunk);
        if let Some(choice) = chunk["choices"].get_mut(0) {
            match plan.call_in(&self.text) {
                Some(call) => rewrite_as_call(choice, "delta", &call, &id, true),
                None => choice["delta"]["content"] = json!(std::mem::take(&mut self.text)),
            }
            if !self.logprobs.is_empty() {
                choice["logprobs"] = json!({"content": std::mem::take(&mut self.logprobs), "refusal": null});
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {
            "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}])
    }

    #[test]
    fn tools_and_choices_are_checked_and_named_in_the_error() {
        let plan = parse(Some(&weather()), None).unwrap().unwrap();
        assert_eq!((plan.tools.len(), &plan.choice), (2, &ToolChoice::Auto));
        assert_eq!(plan.tools[1].parameters, json!({"type": "object"}));
        assert_eq!(parse(Some(&weather()), Some(&json!("none"))).unwrap(), None);
        assert_eq!(parse(None, None).unwrap(), None);
        let named = json!({"type": "function", "function": {"name": "get_time"}});
        assert_eq!(
            parse(Some(&weather()), Some(&named)).unwrap().unwrap().choice,
            ToolChoice::Named("get_time".into())
        );
        for (tools, choice, param) in [
            (json!([{"type": "retrieval"}]), Value::Null, "tools"),
            (json!([{"type": "function", "function": {"name": "has space"}}]), Value::Null, "tools"),
            (json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]), Value::Null, "tools"),
            (
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
                Value::Null,
                "tools",
            ),
            (json!({"type": "function"}), Value::Null, "tools"),
            (weather(), json!("sometimes"), "tool_choice"),
            (weather(), json!({"type": "function", "function": {"name": "get_stock"}}), "tool_choice"),
            (Value::Null, json!("required"), "tool_choice"),
        ] {
            let e = parse(Some(&tools), Some(&choice)).unwrap_err();
            assert_eq!(e.param(), Some(param), "{tools} {choice}");
        }
        let many = Value::Array(vec![json!({"type": "function", "function": {"name": "f"}}); MAX_TOOLS + 1]);
        assert!(parse(Some(&many), None).is_err());
    }

    #[test]
    fn a_call_is_found_only_for_an_offered_tool_with_object_arguments() {
        let plan = parse(Some(&weather()), None).unwrap().unwrap();
        let call =
            plan.call_in("```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n```").unwrap();
        assert_eq!(call, ToolCall { name: "get_weather".into(), arguments: r#"{"city":"Paris"}"#.into() });
        assert!(plan.call_in("The weather in Paris is mild.").is_none());
        assert!(plan.call_in(r#"{"name": "get_stock", "arguments": {}}"#).is_none());
        assert!(plan.call_in(r#"{"name": "get_weather", "arguments": "Paris"}"#).is_none());
        assert!(plan.call_in(r#"{"name": "get_weather", "arguments": {"#).is_none());
        let named = parse(Some(&weather()), Some(&json!({"type": "function", "function": {"name": "get_time"}})))
            .unwrap()
            .unwrap();
        assert!(named.call_in(r#"{"name": "get_weather", "arguments": {}}"#).is_none(), "not the named tool");
    }

    #[test]
    fn required_and_named_choices_hold_the_answer_to_a_call_schema() {
        assert_eq!(parse(Some(&weather()), None).unwrap().unwrap().schema(), None);
        let required = parse(Some(&weather()), Some(&json!("required"))).unwrap().unwrap();
        let schema = required.schema().unwrap();
        assert_eq!(schema["anyOf"].as_array().map(Vec::len), Some(2));
        assert_eq!(schema["anyOf"][0]["properties"]["arguments"]["required"], json!(["city"]));
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let one = parse(Some(&weather()), Some(&named)).unwrap().unwrap();
        assert_eq!(one.schema().unwrap()["properties"]["name"]["const"], "get_weather");
        assert!(one.system_text().contains("get_weather") && !one.system_text().contains("get_time"));
    }

    #[test]
    fn earlier_calls_are_shown_as_the_model_would_write_them() {
        let calls = json!([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]);
        assert_eq!(calls_as_text(2, &calls).unwrap(), r#"{"name":"f","arguments":{"a":1}}"#);
        let bad_args = json!([{"function": {"name": "f", "arguments": "{not json"}}]);
        assert_eq!(calls_as_text(2, &bad_args).unwrap_err().param(), Some("messages"));
    }

    #[test]
    fn a_streamed_answer_is_held_and_sent_whole_in_its_last_chunk() {
        let plan = parse(Some(&weather()), None).unwrap().unwrap();
        let chunk = |text: &str, finish: Value| {
            json!({"id": "9", "created": 5, "choices": [{"index": 0, "finish_reason": finish,
                "delta": {"role": "assistant", "content": text},
                "logprobs": {"content": [{"token": text}], "refusal": null}}]})
        };
        let mut held = HeldAnswer::default();
        for part in [r#"{"name": "get_weather", "#, r#""arguments": {"city": "#] {
            assert!(!held.take(&mut chunk(part, Value::Null), false, &plan));
        }
        let mut end = chunk(r#""Paris"}}"#, json!("stop"));
        assert!(held.take(&mut end, false, &plan));
        let choice = &end["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["delta"]["tool_calls"][0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(choice["delta"]["tool_calls"][0]["id"], "call_5_9");
        assert_eq!(choice["logprobs"]["content"].as_array().map(Vec::len), Some(3), "every held token's entry");
        // Text that is not a call goes whole, as text.
        let mut held = HeldAnswer::default();
        assert!(!held.take(&mut chunk("It is ", Value::Null), false, &plan));
        let mut end = chunk("sunny.", Value::Null);
        assert!(held.take(&mut end, true, &plan));
        assert_eq!(end["choices"][0]["delta"]["content"], "It is sunny.");
    }

    #[test]
    fn an_answer_that_calls_becomes_tool_calls() {
        let mut choice =
            json!({"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "{..}"}});
        let call = ToolCall { name: "f".into(), arguments: "{}".into() };
        rewrite_as_call(&mut choice, "message", &call, "call_1", false);
        assert!(choice["message"]["content"].is_null());
        assert_eq!(choice["message"]["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(choice["message"]["tool_calls"][0]["id"], "call_1");
        assert_eq!(choice["finish_reason"], "tool_calls");
        let mut chunk = json!({"index": 0, "finish_reason": "stop", "delta": {"content": "x"}});
        rewrite_as_call(&mut chunk, "delta", &call, "call_2", true);
        assert_eq!(chunk["delta"]["tool_calls"][0]["index"], 0);
    }
}
