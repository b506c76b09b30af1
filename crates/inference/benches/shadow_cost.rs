//! What shadow comparison costs live traffic on a canary node: the demo model's Q4_0
//! variant serves (the candidate) while the Q4_1 demo file is loaded beside it as the
//! baseline, and the same sequential chat requests (concurrency 1, through HTTP) run with
//! 0%, 10% and 50% of them compared, in interleaved rounds. Live tokens/s per share, as a
//! ratio against 0% measured in the same run, and how many comparisons ran or were
//! skipped (a comparison runs only on a free slot with no live request waiting); and the
//! resident memory the second model adds.
//!
//! Run: `cargo bench --workspace --bench shadow_cost --profile dev` (the dev profile
//! builds dependencies optimised; a release build of mistral.rs takes about 40 minutes).

use slmesh_inference::http::{self, HttpLimits, HttpState};
use slmesh_inference::quantize::{quantize_gguf, QuantType};
use slmesh_inference::{Engine, ModelSpec};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "List three uses of a paperclip.",
    "What do bees make?",
    "Name the largest planet in the solar system.",
];
const MAX_TOKENS: u32 = 48;
const REQUESTS: usize = 20;
const ROUNDS: usize = 3;
const SHARES: [f64; 3] = [0.0, 0.1, 0.5];

/// One non-streaming chat request: completion tokens.
fn chat(addr: &str, prompt: &str) -> u64 {
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0,
    });
    let (status, v) = slmesh_e2e::post_json(addr, "/v1/chat/completions", body.to_string());
    assert_eq!(status, 200, "{v}");
    v["usage"]["completion_tokens"].as_u64().expect("usage")
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok());
    kib.unwrap_or(0.0) / 1024.0
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tmp");
        let q4_0 = dir.path().join("demo.q4_0.gguf");
        quantize_gguf(&slmesh_e2e::demo_model(), &q4_0, QuantType::Q4_0).expect("quantize");
        let engine = Arc::new(Engine::new());
        engine.activate(ModelSpec { name: "demo".into(), version: 2, gguf: q4_0 }).await.expect("load");
        let baseline = ModelSpec { name: "demo".into(), version: 1, gguf: slmesh_e2e::demo_model() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let state = HttpState::new(engine.clone(), HttpLimits::default(), None);
        tokio::spawn(http::serve(listener, state.clone(), Default::default(), std::future::pending()));
        let a = addr.clone();
        tokio::task::spawn_blocking(move || chat(&a, PROMPTS[0])).await.expect("warm up");

        let rss_alone = rss_mib();
        engine.start_shadow(engine.shadow_ticket(), 2, baseline.clone(), 0.0).await.expect("shadow");
        let rss_both = rss_mib();
        let mut tokens = [0u64; SHARES.len()];
        let mut secs = [0f64; SHARES.len()];
        let mut counts = [(0u64, 0u64); SHARES.len()];
        for round in 0..ROUNDS {
            // A different order each round, so that drift in the engine's speed falls on
            // every share alike.
            for k in (0..SHARES.len()).map(|j| (j + round) % SHARES.len()) {
                let share = &SHARES[k];
                // The baseline loads once and stays; only the share changes.
                engine.start_shadow(engine.shadow_ticket(), 2, baseline.clone(), *share).await.expect("shadow");
                let a = addr.clone();
                let start = Instant::now();
                let n = tokio::task::spawn_blocking(move || {
                    (0..REQUESTS).map(|i| chat(&a, PROMPTS[(i + round) % PROMPTS.len()])).sum::<u64>()
                })
                .await
                .expect("live traffic");
                secs[k] += start.elapsed().as_secs_f64();
                tokens[k] += n;
                let shadow = engine.shadow().expect("shadowing");
                let (started, skipped) = shadow.counts();
                counts[k].0 += started;
                counts[k].1 += skipped;
                // Let the last comparison finish before the next share runs.
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
        }
        let compared = state.metrics().get("demo", 2).map(|m| m.agreement.count()).unwrap_or(0);
        println!(
            "live chat requests (concurrency 1, up to {MAX_TOKENS} tokens, greedy) on the demo model's Q4_0 variant,"
        );
        println!(
            "the Q4_1 demo file loaded beside it as the baseline; {ROUNDS} interleaved rounds of {REQUESTS} requests:"
        );
        let base = tokens[0] as f64 / secs[0];
        for (k, share) in SHARES.iter().enumerate() {
            let tps = tokens[k] as f64 / secs[k];
            println!(
                "  {:>3.0}% compared: {tps:>6.1} tok/s live ({:.2}x of 0%); comparisons started {}, skipped {}",
                share * 100.0,
                tps / base,
                counts[k].0,
                counts[k].1
            );
        }
        let mean = state.metrics().get("demo", 2).map(|m| m.agreement.sum() / compared.max(1) as f64);
        println!("  {compared} comparison(s) scored, mean agreement {:.2}", mean.unwrap_or(0.0));
        println!(
            "resident memory: {rss_alone:.0} MiB serving the candidate alone, {rss_both:.0} MiB with the baseline loaded beside it"
        );
    });
}
