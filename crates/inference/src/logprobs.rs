//! Token log-probabilities in OpenAI's shape.
//!
//! mistral.rs 0.8.1 reports them differently from OpenAI, and the clients (the official
//! `openai` packages among them) parse OpenAI's shape:
//!
//! - base-10 logarithms, where OpenAI gives natural ones;
//! - the alternatives (`top_logprobs`) name their token by id;
//! - a streamed chunk carries one entry, not `{"content": [..]}`;
//! - its greedy decoding is top-k 1, which zeroes every alternative before they are
//!   listed, so `top_logprobs` with temperature 0 (this node's default) came back empty.
//!
//! So the chosen token's figure comes from the engine (converted), and the alternatives
//! from `TopRecorder`, a logits processor that sees the same logits the sampler does
//! and keeps the most likely tokens of each step, named through the model's own
//! vocabulary (`Vocabulary`, read from the GGUF file). Both are of the distribution the
//! token was drawn from: after penalties and temperature (temperature 0 reads as 1).

use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// Most alternatives a request may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// `ln(x) = log10(x) * ln(10)`; a missing or non-finite figure reads as impossible.
fn natural(log10: Option<&Value>) -> f64 {
    let v = log10.and_then(Value::as_f64).unwrap_or(f64::NEG_INFINITY) * std::f64::consts::LN_10;
    if v.is_finite() {
        v
    } else {
        // JSON has no infinity; OpenAI clients expect a number.
        -9999.0
    }
}

fn text(v: Option<&Value>) -> String {
    v.and_then(Value::as_str).unwrap_or_default().to_string()
}

/// One generated token's entry as mistral.rs serialises it (`token` text, base-10
/// `logprob`), in OpenAI's shape, with the alternatives given (text and natural
/// logarithm, most likely first).
pub fn openai_token(entry: &Value, alternatives: Vec<(String, f64)>) -> Value {
    let token = text(entry.get("token"));
    json!({
        "bytes": token.as_bytes(),
        "token": token,
        "logprob": natural(entry.get("logprob")),
        "top_logprobs": alternatives
            .into_iter()
            .map(|(t, lp)| json!({"bytes": t.as_bytes(), "token": t, "logprob": lp}))
            .collect::<Vec<_>>(),
    })
}

/// Rewrites each choice's `logprobs` of a serialised answer or chunk in OpenAI's shape,
/// `{"content": [..], "refusal": null}`: from `{"content": [..]}` (an answer) or from one
/// entry (a streamed chunk). `alternatives(k)` gives the k-th entry's alternatives, `k`
/// counting from `first` (the entries streamed before). A choice without logprobs keeps
/// `null`. Returns how many entries there were.
pub fn rewrite_choices(body: &mut Value, first: usize, alternatives: impl Fn(usize) -> Vec<(String, f64)>) -> usize {
    let Some(choices) = body.get_mut("choices").and_then(Value::as_array_mut) else { return 0 };
    let mut k = first;
    for choice in choices {
        let Some(slot) = choice.get_mut("logprobs").filter(|l| !l.is_null()) else { continue };
        let raw: Vec<Value> = match slot.get("content") {
            Some(Value::Array(list)) => list.clone(),
            Some(_) => vec![],
            None => vec![slot.clone()],
        };
        let entries: Vec<Value> = raw
            .iter()
            .map(|e| {
                k += 1;
                openai_token(e, alternatives(k - 1))
            })
            .collect();
        *slot = json!({ "content": entries, "refusal": null });
    }
    k - first
}

/// The text of each token id of a model, read from its GGUF file (`tokenizer.ggml.*`).
#[derive(Debug, Default)]
pub struct Vocabulary {
    tokens: Vec<String>,
    /// GPT-2's byte-level tokens (`tokenizer.ggml.model` "gpt2"): each character stands
    /// for one byte. Else SentencePiece's: "▁" for a space, `<0xNN>` for a byte.
    byte_level: bool,
}

impl Vocabulary {
    /// Reads the token list of a GGUF file (metadata only, not the weights).
    pub fn read(path: &Path) -> Result<Self, String> {
        let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| e.to_string())?;
        let meta = |key: &str| content.metadata.get(key);
        let tokens = meta("tokenizer.ggml.tokens")
            .ok_or("no tokenizer.ggml.tokens in the file")?
            .to_vec()
            .map_err(|e| e.to_string())?
            .iter()
            .map(|t| t.to_string().cloned().unwrap_or_default())
            .collect();
        let byte_level = meta("tokenizer.ggml.model").and_then(|m| m.to_string().ok()).is_some_and(|m| m == "gpt2");
        Ok(Vocabulary { tokens, byte_level })
    }

    /// The text a token stands for (bytes that are not UTF-8 on their own, as U+FFFD).
    pub fn text(&self, id: u32) -> String {
        let Some(token) = self.tokens.get(id as usize) else { return String::new() };
        if self.byte_level {
            let bytes: Option<Vec<u8>> = token.chars().map(gpt2_byte).collect();
            return bytes.map_or_else(|| token.clone(), |b| String::from_utf8_lossy(&b).into_owned());
        }
        if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return String::from_utf8_lossy(&[b]).into_owned();
            }
        }
        token.replace('\u{2581}', " ")
    }
}

/// The byte a character of a GPT-2 byte-level token stands for: printable Latin-1
/// stands for itself, the other 68 bytes were moved to U+0100 onwards, in order.
fn gpt2_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let c = c as u32;
    if printable(c) {
        return u8::try_from(c).ok();
    }
    let k = c.checked_sub(0x100)?;
    (0u32..=255).filter(|b| !printable(*b)).nth(k as usize).and_then(|b| u8::try_from(b).ok())
}

/// The `top` most likely tokens of each step of one generation, as the sampler saw
/// them: a logits processor that changes nothing.
pub struct TopRecorder {
    top: usize,
    temperature: f64,
    /// By context length: a step sampled again (a token a grammar refused) replaces
    /// its first record.
    steps: Mutex<BTreeMap<usize, Vec<(u32, f64)>>>,
}

impl TopRecorder {
    pub fn new(top: usize, temperature: Option<f64>) -> Self {
        let temperature = temperature.filter(|t| *t > 0.0).unwrap_or(1.0);
        TopRecorder { top, temperature, steps: Mutex::default() }
    }

    /// Step `k`'s alternatives (token id, natural logarithm), most likely first.
    pub fn step(&self, k: usize) -> Vec<(u32, f64)> {
        self.steps.lock().unwrap_or_else(|e| e.into_inner()).values().nth(k).cloned().unwrap_or_default()
    }

    fn record(&self, logits: &[f32], context_len: usize) {
        if self.top == 0 || logits.is_empty() {
            return;
        }
        let t = self.temperature;
        let scaled = |x: f32| f64::from(x) / t;
        let max = logits.iter().map(|x| scaled(*x)).fold(f64::NEG_INFINITY, f64::max);
        let lse = max + logits.iter().map(|x| (scaled(*x) - max).exp()).sum::<f64>().ln();
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let n = self.top.min(ids.len());
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        ids.select_nth_unstable_by(n - 1, by_logit);
        ids.truncate(n);
        ids.sort_by(by_logit);
        let top = ids.into_iter().map(|id| (id, scaled(logits[id as usize]) - lse)).collect();
        self.steps.lock().unwrap_or_else(|e| e.into_inner()).insert(context_len, top);
    }
}

impl mistralrs::CustomLogitsProcessor for TopRecorder {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        let values: Vec<f32> = logits.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        self.record(&values, context.len());
        Ok(logits.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry as mistral.rs 0.8.1 serialises it.
    fn entry(token: &str, p: f64) -> Value {
        json!({"token": token, "logprob": p.log10(), "bytes": token.as_bytes(), "top_logprobs": []})
    }

    #[test]
    fn base_ten_becomes_natural_and_entries_count_on_across_chunks() {
        let mut answer = json!({"choices": [
            {"index": 0, "logprobs": {"content": [entry(" Paris", 0.75), entry(".", 0.5)]}},
            {"index": 1, "logprobs": null},
        ]});
        let n = rewrite_choices(&mut answer, 0, |k| vec![(format!("alt{k}"), -0.5)]);
        assert_eq!(n, 2);
        let t = &answer["choices"][0]["logprobs"]["content"];
        assert!((t[0]["logprob"].as_f64().unwrap() - 0.75f64.ln()).abs() < 1e-9, "{t}");
        assert_eq!(t[0]["bytes"], json!(b" Paris".to_vec()));
        assert_eq!(t[1]["top_logprobs"][0]["token"], "alt1");
        assert_eq!(t[1]["top_logprobs"][0]["bytes"], json!(b"alt1".to_vec()));
        assert!(answer["choices"][0]["logprobs"]["refusal"].is_null());
        assert!(answer["choices"][1]["logprobs"].is_null());
        let mut chunk = json!({"choices": [{"index": 0, "logprobs": {"token": "b", "logprob": null}}]});
        assert_eq!(rewrite_choices(&mut chunk, 7, |k| vec![(k.to_string(), 0.0)]), 1);
        let t = &chunk["choices"][0]["logprobs"]["content"][0];
        assert_eq!((t["token"].as_str(), t["logprob"].as_f64()), (Some("b"), Some(-9999.0)));
        assert_eq!(t["top_logprobs"][0]["token"], "7");
    }

    #[test]
    fn the_recorder_keeps_the_most_likely_tokens_of_each_step_as_natural_logarithms() {
        let r = TopRecorder::new(2, Some(0.0));
        let logits = [2.0f32, -1.0, 5.0, 0.5];
        r.record(&logits, 10);
        // A step sampled again replaces its record; the next step follows it.
        r.record(&logits, 10);
        r.record(&[0.0, 0.0, 0.0, 1.0], 11);
        let lse = logits.iter().map(|x| f64::from(*x).exp()).sum::<f64>().ln();
        let first = r.step(0);
        assert_eq!(first.iter().map(|a| a.0).collect::<Vec<_>>(), [2, 0]);
        assert!((first[0].1 - (5.0 - lse)).abs() < 1e-9 && (first[1].1 - (2.0 - lse)).abs() < 1e-9);
        assert_eq!(r.step(1)[0].0, 3);
        assert!(r.step(2).is_empty());
        // At temperature 0.5 the distribution is that of the logits doubled.
        let hot = TopRecorder::new(1, Some(0.5));
        hot.record(&[1.0, 0.0], 3);
        let p = (2.0f64).exp() / ((2.0f64).exp() + 1.0);
        assert!((hot.step(0)[0].1 - p.ln()).abs() < 1e-9);
    }

    #[test]
    fn gpt2_byte_level_tokens_decode_to_their_bytes() {
        assert_eq!(gpt2_byte('a'), Some(b'a'));
        assert_eq!(gpt2_byte('\u{120}'), Some(b' '), "Ġ");
        assert_eq!(gpt2_byte('\u{10a}'), Some(b'\n'), "Ċ");
        assert_eq!(gpt2_byte('\u{100}'), Some(0));
        assert_eq!(gpt2_byte('\u{5000}'), None);
        let v = Vocabulary { tokens: vec!["\u{120}Paris".into(), "<|im_end|>".into()], byte_level: true };
        assert_eq!((v.text(0).as_str(), v.text(1).as_str(), v.text(9).as_str()), (" Paris", "<|im_end|>", ""));
        let sp = Vocabulary { tokens: vec!["\u{2581}Paris".into(), "<0x41>".into()], byte_level: false };
        assert_eq!((sp.text(0).as_str(), sp.text(1).as_str()), (" Paris", "A"));
    }
}
