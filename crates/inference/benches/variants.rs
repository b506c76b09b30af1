//! Variants made for this engine: the demo model (Q4_1) against its re-quantisations
//! (`slmesh model quantize`) to Q4_0 and Q8_0, loaded side by side, the same prompts in
//! interleaved rounds: decode tokens/s and time to first token, as ratios against the
//! Q4_1 file measured in the same run.
//!
//! Run: `cargo bench --workspace --bench variants --profile dev` (the dev profile builds
//! dependencies optimised; a release build of mistral.rs takes about 40 minutes here).

use mistralrs::{RequestBuilder, Response, TextMessageRole, TextMessages};
use slmesh_inference::quantize::{quantize_gguf, QuantType};
use slmesh_inference::{LoadedModel, ModelSpec};
use std::time::Instant;

const PROMPTS: &[&str] = &[
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "List three uses of a paperclip.",
    "What is the capital of Italy, and what is it known for?",
];
const MAX_TOKENS: usize = 48;
const ROUNDS: usize = 3;

#[derive(Default)]
struct Figures {
    tokens: usize,
    decode_secs: f64,
    ttft_secs: f64,
    requests: usize,
}

async fn one(model: &LoadedModel, prompt: &str, f: &mut Figures) {
    let request = RequestBuilder::from(TextMessages::new().add_message(TextMessageRole::User, prompt))
        .set_deterministic_sampler()
        .set_sampler_max_len(MAX_TOKENS);
    let start = Instant::now();
    let mut stream = model.model().stream_chat_request(request).await.expect("stream");
    let mut first = None;
    while let Some(r) = stream.next().await {
        match r {
            Response::Chunk(c) => {
                if first.is_none() && c.choices.iter().any(|ch| ch.delta.content.is_some()) {
                    first = Some(start.elapsed().as_secs_f64());
                }
                if let Some(u) = c.usage {
                    let first = first.unwrap_or(0.0);
                    f.tokens += u.completion_tokens;
                    f.ttft_secs += first;
                    f.decode_secs += start.elapsed().as_secs_f64() - first;
                    f.requests += 1;
                    break;
                }
            }
            Response::Done(_) => break,
            _ => panic!("generation failed"),
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let demo = slmesh_e2e::demo_model();
    let dir = tempfile::tempdir().expect("tmp");
    let mut files = vec![("Q4_1 (demo file)".to_string(), demo.clone())];
    for to in [QuantType::Q4_0, QuantType::Q8_0] {
        let out = dir.path().join(format!("demo.{to}.gguf"));
        let start = Instant::now();
        let report = quantize_gguf(&demo, &out, to).expect("quantize");
        println!(
            "slmesh model quantize --to {to}: {:.1} s, {:.1} MB -> {:.1} MB",
            start.elapsed().as_secs_f64(),
            report.bytes_in as f64 / 1e6,
            report.bytes_out as f64 / 1e6
        );
        files.push((to.name().to_ascii_uppercase(), out));
    }
    let mut models = vec![];
    for (i, (label, gguf)) in files.iter().enumerate() {
        let spec = ModelSpec { name: label.clone(), version: i as u64 + 1, gguf: gguf.clone() };
        models.push(LoadedModel::load(spec).await.expect("load"));
    }
    let mut figures: Vec<Figures> = models.iter().map(|_| Figures::default()).collect();
    for _ in 0..ROUNDS {
        for prompt in PROMPTS {
            for (model, f) in models.iter().zip(figures.iter_mut()) {
                one(model, prompt, f).await;
            }
        }
    }
    let rate = |f: &Figures| f.tokens as f64 / f.decode_secs;
    let ttft = |f: &Figures| f.ttft_secs / f.requests as f64 * 1e3;
    let (base_rate, base_ttft) = (rate(&figures[0]), ttft(&figures[0]));
    println!("{} rounds x {} prompts, {MAX_TOKENS} tokens each, deterministic:", ROUNDS, PROMPTS.len());
    for ((label, _), f) in files.iter().zip(&figures) {
        println!(
            "  {label:<18} decode {:>6.1} tok/s ({:.2}x Q4_1)   TTFT {:>7.1} ms ({:.2}x Q4_1)",
            rate(f),
            rate(f) / base_rate,
            ttft(f),
            ttft(f) / base_ttft
        );
    }
}
