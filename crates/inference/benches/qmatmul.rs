//! The quantised matrix product alone (crates/vendor/README.md, candle-core: 4-bit weights
//! in tiles), on the demo model's shapes: its four weight shapes and its output layer, one
//! row (decoding one request), four (four decoded together) and 52 (a short prompt).
//! Each kind and shape runs in two child processes of this bench, the vendored kernel and
//! `CANDLE_MATMUL_TILES=0` (the product as this repository patched it before), so that
//! both are measured in the same run; the figure is multiply-adds per second.
//!
//! Run: `cargo bench --workspace --bench qmatmul --profile dev`.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::time::Instant;

/// (k, n): attention q and o, the MLP's gate and up, its down, the output layer.
const SHAPES: &[(usize, usize)] = &[(576, 576), (576, 1536), (1536, 576), (576, 49_152)];
const ROWS: &[usize] = &[1, 4, 52];
const KINDS: &[(&str, GgmlDType)] = &[("Q4_0", GgmlDType::Q4_0), ("Q4_1", GgmlDType::Q4_1), ("Q8_0", GgmlDType::Q8_0)];

/// Multiply-adds per second of `m` rows through a (k, n) weight of `kind`.
fn measure(kind: GgmlDType, m: usize, k: usize, n: usize) -> f64 {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev).expect("weights");
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev).expect("input");
    let q = QMatMul::from_qtensor(QTensor::quantize(&w, kind).expect("quantize")).expect("qmatmul");
    // About 0.3 s of work a measurement, after a warm-up.
    let reps = (2_000_000_000 / (m * k * n)).clamp(3, 20_000);
    q.forward(&x).expect("warm up");
    let start = Instant::now();
    for _ in 0..reps {
        q.forward(&x).expect("forward");
    }
    (reps * m * k * n) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if let Ok(which) = std::env::var("QMATMUL_CHILD") {
        let (kind, m, k, n) = {
            let p: Vec<&str> = which.split(',').collect();
            let kind = KINDS.iter().find(|(name, _)| *name == p[0]).expect("kind").1;
            (kind, p[1].parse().expect("m"), p[2].parse().expect("k"), p[3].parse().expect("n"))
        };
        println!("{}", measure(kind, m, k, n));
        return;
    }
    let me = std::env::current_exe().expect("this bench");
    let run = |tiles: &str, which: &str| -> f64 {
        let out = std::process::Command::new(&me)
            .env("QMATMUL_CHILD", which)
            .env("CANDLE_MATMUL_TILES", tiles)
            .output()
            .expect("child");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("a figure")
    };
    println!("| kind | rows | k x n | before (GMAC/s) | tiles (GMAC/s) | tiles / before |");
    println!("|---|---:|---|---:|---:|---:|");
    for (name, _) in KINDS {
        for &m in ROWS {
            for &(k, n) in SHAPES {
                let which = format!("{name},{m},{k},{n}");
                let before = run("0", &which) / 1e9;
                let tiles = run("1", &which) / 1e9;
                println!("| {name} | {m} | {k} x {n} | {before:.1} | {tiles:.1} | {:.2}x |", tiles / before);
            }
        }
    }
}
