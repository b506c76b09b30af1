//! Completion tokens/s and time to first token through the HTTP endpoint (streaming SSE
//! over loopback) against direct mistral.rs library calls (streaming) on the same loaded
//! model, prompts and settings, at concurrency 1 and 4. Also the resident memory of this
//! process once the demo model serves.
//!
//! Run: `cargo bench -p slmesh-inference --bench http_vs_direct`

use mistralrs::{RequestBuilder, Response, TextMessageRole, TextMessages};
use slmesh_inference::http::{self, HttpLimits, HttpState};
use slmesh_inference::{Engine, LoadedModel, ModelSpec};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

const PROMPTS: &[&str] = &[
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "List three uses of a paperclip.",
    "What is the capital of Italy, and what is it known for?",
];
const MAX_TOKENS: usize = 48;
const REQUESTS: usize = 16;

#[derive(Default, Clone, Copy)]
struct Run {
    tokens: usize,
    ttft_sum: f64,
    /// Prompt processing time as the engine reports it: TTFT minus this is what the path
    /// itself adds before the first token.
    prompt_time_sum: f64,
    requests: usize,
}

impl Run {
    fn add(&mut self, o: Run) {
        self.tokens += o.tokens;
        self.ttft_sum += o.ttft_sum;
        self.prompt_time_sum += o.prompt_time_sum;
        self.requests += o.requests;
    }
}

fn request(prompt: &str) -> RequestBuilder {
    RequestBuilder::from(TextMessages::new().add_message(TextMessageRole::User, prompt))
        .set_deterministic_sampler()
        .set_sampler_max_len(MAX_TOKENS)
}

async fn direct_one(model: &LoadedModel, prompt: &str) -> Run {
    let start = Instant::now();
    let mut stream = model.model().stream_chat_request(request(prompt)).await.expect("stream");
    let (mut ttft, mut tokens, mut prompt_time) = (None, 0, 0.0);
    while let Some(r) = stream.next().await {
        match r {
            Response::Chunk(c) => {
                if ttft.is_none() && c.choices.iter().any(|ch| ch.delta.content.is_some()) {
                    ttft = Some(start.elapsed().as_secs_f64());
                }
                if let Some(u) = c.usage {
                    tokens = u.completion_tokens;
                    prompt_time = f64::from(u.total_prompt_time_sec);
                    break;
                }
            }
            Response::Done(_) => break,
            _ => panic!("generation failed"),
        }
    }
    Run { tokens, ttft_sum: ttft.unwrap_or(0.0), prompt_time_sum: prompt_time, requests: 1 }
}

fn http_one(addr: &str, prompt: &str) -> Run {
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "stream": true
    })
    .to_string();
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    // One write: several small ones would meet Nagle's algorithm and delayed ACKs.
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).expect("write");
    let (mut ttft, mut tokens, mut prompt_time) = (None, 0, 0.0);
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { break };
        let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(data).expect("chunk");
        if ttft.is_none() && chunk["choices"][0]["delta"]["content"].is_string() {
            ttft = Some(start.elapsed().as_secs_f64());
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
            prompt_time = chunk["usage"]["total_prompt_time_sec"].as_f64().unwrap_or(0.0);
        }
    }
    Run { tokens, ttft_sum: ttft.unwrap_or(0.0), prompt_time_sum: prompt_time, requests: 1 }
}

fn report(label: &str, run: Run, secs: f64) -> (f64, f64) {
    let tps = run.tokens as f64 / secs;
    let ttft = run.ttft_sum / run.requests as f64 * 1e3;
    let added = (run.ttft_sum - run.prompt_time_sum) / run.requests as f64 * 1e3;
    println!(
        "{label:<28} {:>5} tokens in {secs:>6.2} s = {tps:>6.1} tok/s, mean TTFT {ttft:>7.1} ms (of which not prompt processing {added:>6.1} ms)",
        run.tokens
    );
    (tps, ttft)
}

fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The same prompts through llama.cpp, if a Python with llama_cpp is at hand
/// ($SLMESH_LLAMA_CPP_PYTHON, or the venv that BENCHMARKS.md describes): (tok/s, TTFT ms).
fn llama_cpp() -> Option<(f64, f64)> {
    let python = std::env::var("SLMESH_LLAMA_CPP_PYTHON").unwrap_or_else(|_| {
        format!("{}/.cache/slmesh-tools/llamacpp/bin/python", std::env::var("HOME").unwrap_or_default())
    });
    let script = slmesh_e2e::repo_file("crates/inference/benches/llama_cpp_reference.py");
    let out = std::process::Command::new(&python).arg(script).arg(slmesh_e2e::demo_model()).output().ok()?;
    if !out.status.success() {
        println!("llama.cpp: not measured ({python} with llama_cpp is not available)");
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((v["tokens"].as_f64()? / v["secs"].as_f64()?, v["mean_ttft_ms"].as_f64()?))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let (rss_before, _) = rss_mib();
        let engine = Arc::new(Engine::new());
        let gguf = slmesh_e2e::demo_model();
        engine.activate(ModelSpec { name: "smollm2".into(), version: 1, gguf }).await.expect("load");
        let model = engine.active().expect("active");
        let limits = HttpLimits { max_concurrent: 4, ..HttpLimits::default() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(http::serve(
            listener,
            HttpState::new(engine.clone(), limits, None),
            Default::default(),
            std::future::pending(),
        ));
        // Warm up both paths.
        direct_one(&model, PROMPTS[0]).await;
        let a = addr.clone();
        tokio::task::spawn_blocking(move || http_one(&a, PROMPTS[0])).await.expect("warm");

        let mut direct_c1: Option<(f64, f64)> = None;
        println!("demo model, {REQUESTS} requests of up to {MAX_TOKENS} tokens per run, deterministic sampling");
        // Each round runs both paths (one request per worker each), so that drift in the
        // engine's own speed over the run falls on both alike.
        for concurrency in [1usize, 4] {
            let (mut direct, mut over_http) = (Run::default(), Run::default());
            let (mut direct_secs, mut http_secs) = (0.0, 0.0);
            for round in 0..REQUESTS / concurrency {
                let prompt = move |w: usize| PROMPTS[(w + round) % PROMPTS.len()];
                // mistral.rs answers a prompt it has just seen more slowly (measured: its
                // prompt time grows), so the path that goes second is at a disadvantage:
                // alternate which one goes first.
                let order = if round % 2 == 0 { [true, false] } else { [false, true] };
                for direct_path in order {
                    let start = Instant::now();
                    if direct_path {
                        let handles: Vec<_> = (0..concurrency)
                            .map(|w| {
                                let model = model.clone();
                                tokio::spawn(async move { direct_one(&model, prompt(w)).await })
                            })
                            .collect();
                        for h in handles {
                            direct.add(h.await.expect("worker"));
                        }
                        direct_secs += start.elapsed().as_secs_f64();
                    } else {
                        let handles: Vec<_> = (0..concurrency)
                            .map(|w| {
                                let addr = addr.clone();
                                tokio::task::spawn_blocking(move || http_one(&addr, prompt(w)))
                            })
                            .collect();
                        for h in handles {
                            over_http.add(h.await.expect("worker"));
                        }
                        http_secs += start.elapsed().as_secs_f64();
                    }
                }
            }
            let (d_tps, d_ttft) = report(&format!("direct, concurrency {concurrency}"), direct, direct_secs);
            if concurrency == 1 {
                direct_c1 = Some((d_tps, d_ttft));
            }
            let (h_tps, h_ttft) = report(&format!("HTTP, concurrency {concurrency}"), over_http, http_secs);
            println!(
                "ratio HTTP/direct at concurrency {concurrency}: tokens/s {:.3} (goal >= 0.97), TTFT {:.3}",
                h_tps / d_tps,
                h_ttft / d_ttft
            );
        }
        if let Some((tps, ttft)) = llama_cpp() {
            let (d_tps, d_ttft) = direct_c1.expect("measured");
            println!("llama.cpp (llama-cpp-python), concurrency 1: {tps:.1} tok/s, mean TTFT {ttft:.1} ms");
            println!(
                "ratio slmesh direct/llama.cpp at concurrency 1: tokens/s {:.3}, TTFT {:.3}",
                d_tps / tps,
                d_ttft / ttft
            );
        }
        let (rss, peak) = rss_mib();
        println!("resident memory: {rss_before:.0} MiB before loading, {rss:.0} MiB serving (peak {peak:.0} MiB)");
    });
}
