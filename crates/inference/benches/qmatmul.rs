//! The quantised matrix product alone (crates/vendor/README.md, candle-core: 4-bit weights
//! in tiles), on the demo model's shapes: its four weight shapes and its output layer, one
//! row (decoding one request), two and four (decoded together) and 52 (a short prompt); and
//! one decoded token's products, all 211 of them with weights of their own (about 80 MB,
//! more than the caches hold, as in a server).
//!
//! Each figure comes from a child process of this bench, one per setting, so that all are
//! measured in the same run: `before` (`CANDLE_MATMUL_TILES=0`: the product as this
//! repository patched it before the tiles), `avx2` (`CANDLE_MATMUL_VNNI=0`: the tiles,
//! each block's integer dot product in two AVX2 instructions) and `tiles` (as built: one
//! VNNI instruction where the CPU has it; the same as `avx2` where it has not), three
//! rounds interleaved. The calling thread is one of the pool's, as the engine's is
//! (`mistralrs-core`'s `in_pool.rs`). The figure is multiply-adds per second.
//!
//! Run: `cargo bench --workspace --bench qmatmul --profile dev [-- FILTER ...]`; a filter
//! keeps the cases whose name (`Q4_1,token`, `Q4_0,4,576,1536`: kind, rows, k, n) holds it.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::time::Instant;

/// (k, n): attention q and o, the MLP's gate and up, its down, the output layer.
const SHAPES: &[(usize, usize)] = &[(576, 576), (576, 1536), (1536, 576), (576, 49_152)];
const ROWS: &[usize] = &[1, 2, 4, 52];
const KINDS: &[(&str, GgmlDType)] = &[("Q4_0", GgmlDType::Q4_0), ("Q4_1", GgmlDType::Q4_1), ("Q8_0", GgmlDType::Q8_0)];
/// One layer's products of the demo model (q, k, v, o, gate, up, down), 30 layers, then
/// the output layer.
const LAYER: &[(usize, usize)] =
    &[(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)];
const LAYERS: usize = 30;
/// The environment of the columns before, avx2 and tiles.
const SETTINGS: [(&str, &str); 3] =
    [("CANDLE_MATMUL_TILES", "0"), ("CANDLE_MATMUL_VNNI", "0"), ("CANDLE_MATMUL_TILES", "1")];
const ROUNDS: usize = 3;

fn qmatmul(kind: GgmlDType, k: usize, n: usize) -> QMatMul {
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).expect("weights");
    QMatMul::from_qtensor(QTensor::quantize(&w, kind).expect("quantize")).expect("qmatmul")
}

/// Multiply-adds per second of `m` rows through a (k, n) weight of `kind`.
fn measure(kind: GgmlDType, m: usize, k: usize, n: usize) -> f64 {
    let q = qmatmul(kind, k, n);
    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).expect("input");
    // About 0.3 s of work a measurement, after a warm-up.
    let reps = (2_000_000_000 / (m * k * n)).clamp(3, 20_000);
    q.forward(&x).expect("warm up");
    let start = Instant::now();
    for _ in 0..reps {
        q.forward(&x).expect("forward");
    }
    (reps * m * k * n) as f64 / start.elapsed().as_secs_f64()
}

/// Multiply-adds per second of one decoded token's products, each weight its own.
fn measure_token(kind: GgmlDType) -> f64 {
    let mut shapes: Vec<(usize, usize)> = (0..LAYERS).flat_map(|_| LAYER.iter().copied()).collect();
    shapes.push((576, 49_152));
    let weights: Vec<QMatMul> = shapes.iter().map(|&(k, n)| qmatmul(kind, k, n)).collect();
    let inputs: Vec<Tensor> =
        [576, 1536].iter().map(|&k| Tensor::randn(0f32, 1.0, (1, k), &Device::Cpu).expect("input")).collect();
    let token = || {
        for (q, &(k, _)) in weights.iter().zip(&shapes) {
            q.forward(&inputs[usize::from(k != 576)]).expect("forward");
        }
    };
    token();
    let reps = 30;
    let start = Instant::now();
    for _ in 0..reps {
        token();
    }
    let macs: usize = shapes.iter().map(|&(k, n)| k * n).sum();
    (reps * macs) as f64 / start.elapsed().as_secs_f64()
}

fn child(which: &str) -> f64 {
    let p: Vec<&str> = which.split(',').collect();
    let kind = KINDS.iter().find(|(name, _)| *name == p[0]).expect("kind").1;
    if p[1] == "token" {
        return measure_token(kind);
    }
    measure(kind, p[1].parse().expect("m"), p[2].parse().expect("k"), p[3].parse().expect("n"))
}

fn main() {
    if let Ok(which) = std::env::var("QMATMUL_CHILD") {
        let pool = rayon::ThreadPoolBuilder::new().use_current_thread().build().expect("pool");
        println!("{}", pool.install(|| child(&which)));
        return;
    }
    let me = std::env::current_exe().expect("this bench");
    let run = |(var, value): (&str, &str), which: &str| -> f64 {
        let out = std::process::Command::new(&me).env("QMATMUL_CHILD", which).env(var, value).output().expect("child");
        String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().expect("a figure") / 1e9
    };
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    println!("multiply-adds per second (G), and each setting against `before`");
    println!("| kind | rows | k x n | before | avx2 | tiles | avx2 / before | tiles / before | tiles / avx2 |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for (name, _) in KINDS {
        let mut cases: Vec<(String, String)> = vec![(format!("{name},token"), "1 (a token)".into())];
        for &m in ROWS {
            for &(k, n) in SHAPES {
                cases.push((format!("{name},{m},{k},{n}"), format!("{m} | {k} x {n}")));
            }
        }
        cases.retain(|(which, _)| filters.is_empty() || filters.iter().any(|f| which.contains(f.as_str())));
        for (which, label) in cases {
            let label = if which.ends_with("token") { format!("{label} | 211 products") } else { label };
            // Rounds interleaved, medians: the figures move by a fifth from run to run here.
            let mut rounds: Vec<[f64; 3]> = (0..ROUNDS).map(|_| SETTINGS.map(|setting| run(setting, &which))).collect();
            let [before, avx2, tiles] = [0, 1, 2].map(|i| {
                rounds.sort_by(|a, b| a[i].total_cmp(&b[i]));
                rounds[ROUNDS / 2][i]
            });
            println!(
                "| {name} | {label} | {before:.1} | {avx2:.1} | {tiles:.1} | {:.2}x | {:.2}x | {:.2}x |",
                avx2 / before,
                tiles / before,
                tiles / avx2
            );
        }
    }
}
