//! What the pre-activation evaluation suite adds to an activation: the demo model's Q4_0
//! variant activated without a suite and with `tests/eval/smollm2-basic.jsonl`, in
//! interleaved rounds, as seconds and as a ratio against the plain activation measured in
//! the same run.
//!
//! Run: `cargo bench --workspace --bench eval_cost --profile dev` (the dev profile builds
//! dependencies optimised; a release build of mistral.rs takes about 40 minutes here).

use slmesh_inference::quantize::{quantize_gguf, QuantType};
use slmesh_inference::{Engine, ModelSpec};
use slmesh_protocol::eval::EvalSuite;
use std::time::Instant;

const ROUNDS: usize = 3;
const SUITE: &str = include_str!("../../../tests/eval/smollm2-basic.jsonl");

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let suite = EvalSuite::parse_jsonl(SUITE).expect("the suite");
    let dir = tempfile::tempdir().expect("tmp");
    let gguf = dir.path().join("demo.q4_0.gguf");
    quantize_gguf(&slmesh_e2e::demo_model(), &gguf, QuantType::Q4_0).expect("quantize");
    let (mut plain, mut evaluated) = (vec![], vec![]);
    let mut version = 0;
    for _ in 0..ROUNDS {
        for with_suite in [false, true] {
            version += 1;
            // A fresh engine each time: an activation loads beside nothing.
            let engine = Engine::new();
            let spec = ModelSpec { name: "demo".into(), version, gguf: gguf.clone() };
            let start = Instant::now();
            let counts = engine.activate_evaluated(spec, with_suite.then_some(&suite)).await.expect("activate");
            let secs = start.elapsed().as_secs_f64();
            if with_suite {
                let c = counts.expect("counts");
                assert_eq!(c.cases as usize, suite.cases.len());
                evaluated.push(secs);
            } else {
                plain.push(secs);
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (p, e) = (mean(&plain), mean(&evaluated));
    println!("activation of the demo model's Q4_0 variant, {ROUNDS} interleaved rounds:");
    println!("  load + smoke test                      {p:>6.2} s");
    println!(
        "  load + smoke test + suite ({} cases)    {e:>6.2} s  ({:.2}x; the suite adds {:.2} s, {:.2} s a case)",
        suite.cases.len(),
        e / p,
        e - p,
        (e - p) / suite.cases.len() as f64
    );
}
