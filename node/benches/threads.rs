//! Inference threads: `slmesh serve --threads N` on the demo model (Q4_1) and its Q4_0
//! variant, on an idle machine and with one core kept busy by another thread (what a
//! gateway's other software does): decode tokens/s and prompt time as the engine
//! reports them (`usage`), medians over the same prompts, each against `--threads` =
//! every CPU in the same run.
//!
//! Run: `cargo bench --workspace --bench threads --profile dev` (the dev profile builds
//! the dependencies optimised, as a node's debug build does).

use slmesh_e2e::damage::demo_q4_0;
use slmesh_e2e::post_json;
use slmesh_e2e::serve::{serve_file, Served};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const PROMPTS: &[&str] = &[
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a child.",
    "List some facts about the planet Mars.",
    "Describe a walk through a forest in autumn.",
];
const ROUNDS: usize = 2;

fn serve(model: &Path, threads: usize) -> Served {
    serve_file(env!("CARGO_BIN_EXE_slmesh").as_ref(), model, &["--threads", &threads.to_string()], "serving ")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median decode tokens/s and prompt seconds over the prompts.
fn measure(addr: &str) -> (f64, f64) {
    let (mut rates, mut prompt) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        for p in PROMPTS {
            let body = serde_json::json!({
                "messages": [{"role": "user", "content": p}], "max_tokens": 48, "temperature": 0
            });
            let (status, v) = post_json(addr, "/v1/chat/completions", body.to_string());
            assert_eq!(status, 200, "{v}");
            rates.push(v["usage"]["avg_compl_tok_per_sec"].as_f64().unwrap_or(0.0));
            prompt.push(v["usage"]["total_prompt_time_sec"].as_f64().unwrap_or(0.0));
        }
    }
    (median(rates), median(prompt))
}

/// Keeps one core busy until dropped.
struct Busy(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Busy {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spin = std::thread::spawn(move || {
            let mut x = 0u64;
            while !flag.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
        Busy(stop, Some(spin))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

fn main() {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let dir = tempfile::tempdir().expect("temp dir");
    let (q4_1, q4_0) = demo_q4_0(env!("CARGO_BIN_EXE_slmesh").as_ref(), dir.path());
    println!("{cpus} CPUs; medians of {} requests of up to 48 tokens each", ROUNDS * PROMPTS.len());
    println!(
        "{:<6} {:<10} {:>8} {:>12} {:>8} {:>13} {:>8}",
        "file", "machine", "threads", "decode tok/s", "ratio", "prompt time", "ratio"
    );
    for (name, file) in [("Q4_1", q4_1.as_path()), ("Q4_0", q4_0.as_path())] {
        for busy in [false, true] {
            let mut baseline = None;
            for threads in [cpus, 1] {
                let server = serve(file, threads);
                let _load = busy.then(Busy::start);
                let (rate, prompt) = measure(&server.addr);
                let (base_rate, base_prompt) = *baseline.get_or_insert((rate, prompt));
                println!(
                    "{:<6} {:<10} {:>8} {:>12.1} {:>7.2}x {:>10.0} ms {:>7.2}x",
                    name,
                    if busy { "1 core busy" } else { "idle" },
                    threads,
                    rate,
                    rate / base_rate,
                    prompt * 1000.0,
                    prompt / base_prompt
                );
            }
        }
    }
}
