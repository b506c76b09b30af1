//! The quantised matmul with several rows (crates/vendor/README.md, candle-core): the
//! vendored candle takes every row of a prompt, or of the sequences decoded together,
//! through the weights in one pass; as released it took them one at a time. Both run in
//! the same run: `CANDLE_MATMUL_ROW_BY_ROW=1` gives the released behaviour to one of two
//! `slmesh serve` processes on the same file, measured in turn, round after round.
//!
//! Figures: the time to answer one token to a short (about 60 tokens) and a long (about
//! 500) prompt (the engine reports no prompt time for a one-token answer; this is its
//! prompt processing plus the HTTP round trip), and completion tokens/s over the wall time (prefill included) of four requests
//! one after the other and of the same four at once, each the median of its rounds.
//!
//! Run: `cargo bench --workspace --bench matmul_rows --profile dev` (the dev profile builds
//! the dependencies optimised, as a node's debug build does).

use slmesh_e2e::damage::demo_q4_0;
use slmesh_e2e::post_json;
use slmesh_e2e::serve::{serve_file, Served};
use std::path::Path;
use std::time::Instant;

const ROUNDS: usize = 3;
const SHORT: &str = "You are a helpful assistant. Please explain, in a few friendly sentences, how a bicycle works and why it stays upright.";
const QUESTIONS: &[&str] = &[
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a child.",
    "List some facts about the planet Mars.",
    "Describe a walk through a forest in autumn.",
];

fn serve(model: &Path, row_by_row: bool) -> Served {
    // The child inherits the environment at spawn.
    if row_by_row {
        std::env::set_var("CANDLE_MATMUL_ROW_BY_ROW", "1");
    } else {
        std::env::remove_var("CANDLE_MATMUL_ROW_BY_ROW");
    }
    let args = ["--prefix-cache", "0", "--max-concurrent", "4"];
    let served = serve_file(env!("CARGO_BIN_EXE_slmesh").as_ref(), model, &args, "serving ");
    std::env::remove_var("CANDLE_MATMUL_ROW_BY_ROW");
    served
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ask(addr: &str, prompt: &str, max_tokens: u32) -> serde_json::Value {
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0
    });
    let (status, v) = post_json(addr, "/v1/chat/completions", body.to_string());
    assert_eq!(status, 200, "{v}");
    v
}

#[derive(Default)]
struct Figures {
    short_prompt: Vec<f64>,
    long_prompt: Vec<f64>,
    one_at_a_time: Vec<f64>,
    four_at_once: Vec<f64>,
    long_tokens: u64,
    short_tokens: u64,
}

/// One round of every measurement; `round` varies the prompts (no cache helps anyway).
fn round(addr: &str, round: usize, f: &mut Figures) {
    let start = Instant::now();
    let v = ask(addr, &format!("Round {round}. {SHORT}"), 1);
    f.short_prompt.push(start.elapsed().as_secs_f64());
    f.short_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    let long: String =
        (0..24).map(|i| format!("Note {i} of round {round}: the number {i} is written as {i}. ")).collect();
    let start = Instant::now();
    let v = ask(addr, &long, 1);
    f.long_prompt.push(start.elapsed().as_secs_f64());
    f.long_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    let start = Instant::now();
    let tokens: u64 =
        QUESTIONS.iter().map(|q| ask(addr, q, 64)["usage"]["completion_tokens"].as_u64().unwrap_or(0)).sum();
    f.one_at_a_time.push(tokens as f64 / start.elapsed().as_secs_f64());
    let start = Instant::now();
    let tokens: u64 = std::thread::scope(|s| {
        let running: Vec<_> = QUESTIONS
            .iter()
            .map(|q| s.spawn(move || ask(addr, q, 64)["usage"]["completion_tokens"].as_u64().unwrap_or(0)))
            .collect();
        running.into_iter().map(|r| r.join().unwrap_or(0)).sum()
    });
    f.four_at_once.push(tokens as f64 / start.elapsed().as_secs_f64());
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (q4_1, q4_0) = demo_q4_0(env!("CARGO_BIN_EXE_slmesh").as_ref(), dir.path());
    println!("medians of {ROUNDS} rounds; each pair measured in turn within a round");
    println!(
        "{:<6} {:<12} {:>14} {:>14} {:>14} {:>16} {:>10}",
        "file", "matmul", "short prompt", "long prompt", "1 at a time tok/s", "4 at once tok/s", "4 vs 1"
    );
    for (name, file) in [("Q4_1", q4_1.as_path()), ("Q4_0", q4_0.as_path())] {
        let servers = [serve(file, true), serve(file, false)];
        let mut figures = [Figures::default(), Figures::default()];
        for r in 0..ROUNDS {
            for (server, f) in servers.iter().zip(&mut figures) {
                round(&server.addr, r, f);
            }
        }
        let base = &figures[0];
        let (b_short, b_long, b_one, b_four) = (
            median(base.short_prompt.clone()),
            median(base.long_prompt.clone()),
            median(base.one_at_a_time.clone()),
            median(base.four_at_once.clone()),
        );
        for (label, f) in ["row by row", "all rows"].iter().zip(&figures) {
            let (short, long, one, four) = (
                median(f.short_prompt.clone()),
                median(f.long_prompt.clone()),
                median(f.one_at_a_time.clone()),
                median(f.four_at_once.clone()),
            );
            println!(
                "{name:<6} {label:<12} {:>6.0} ms {:>4.2}x {:>6.0} ms {:>4.2}x {:>8.1} {:>4.2}x {:>10.1} {:>4.2}x {:>9.2}x",
                short * 1e3,
                short / b_short,
                long * 1e3,
                long / b_long,
                one,
                one / b_one,
                four,
                four / b_four,
                four / one,
            );
        }
        println!("  (short prompt {} tokens, long prompt {} tokens)", base.short_tokens, base.long_tokens);
    }
}
