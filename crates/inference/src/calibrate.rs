//! Kernel calibration: how fast this engine multiplies by a weight of each quantised kind
//! on this CPU, so that a node can choose among a manifest's variants by measurement
//! rather than by a table (`slmesh_protocol::select`).
//!
//! Decoding a token multiplies one vector by every weight matrix, so the time per weight
//! of one quantised matrix-vector product is what decides a variant's tokens/s (prompt
//! processing here is the same product row by row). Each kind is timed through candle's
//! `QMatMul`, the kernels mistral.rs 0.8.1 runs, on the engine's thread pool, over copies
//! of one 1,536 x 2,048 matrix of made-up weights that fill `WORKING_SET`: more than a
//! CPU's caches, as a model's weights are, so that what the kind saves in memory traffic
//! counts as it does when decoding (one matrix alone stays in cache, where Q8_0 measured
//! faster than Q4_0 here although it decodes the demo model more slowly). About 0.2 s a
//! kind, the fastest of several passes counting.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The kinds measured, by the names `slmesh_protocol::select::kernel_kind` gives them.
pub const KINDS: [(&str, GgmlDType); 10] = [
    ("Q4_0", GgmlDType::Q4_0),
    ("Q4_1", GgmlDType::Q4_1),
    ("Q5_0", GgmlDType::Q5_0),
    ("Q5_1", GgmlDType::Q5_1),
    ("Q8_0", GgmlDType::Q8_0),
    ("Q2_K", GgmlDType::Q2K),
    ("Q3_K", GgmlDType::Q3K),
    ("Q4_K", GgmlDType::Q4K),
    ("Q5_K", GgmlDType::Q5K),
    ("Q6_K", GgmlDType::Q6K),
];

const ROWS: usize = 1536;
/// A multiple of 256, the K-quants' block.
const COLS: usize = 2048;
/// The bytes of weights multiplied by in turn: beyond the last-level cache (32 MiB on
/// this repository's machines).
const WORKING_SET: usize = 64 << 20;
/// Each kind makes at least this many passes over the working set, for at least
/// `MIN_TIME`, after a warm-up pass; the fastest pass counts.
const MIN_PASSES: usize = 3;
const MIN_TIME: Duration = Duration::from_millis(30);

/// Picoseconds per weight of one matrix-vector product, by kind; a kind candle cannot
/// quantise to or multiply by is left out.
pub fn kernel_ps_per_weight() -> BTreeMap<String, u32> {
    let device = Device::Cpu;
    // Made-up weights spread like a trained layer's, the same on every run.
    let weights: Vec<f32> = (0..ROWS * COLS).map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 0.1).collect();
    let Ok(weights) = Tensor::from_vec(weights, (ROWS, COLS), &device) else { return BTreeMap::new() };
    let Ok(input) = Tensor::ones((1, COLS), candle_core::DType::F32, &device) else { return BTreeMap::new() };
    KINDS
        .iter()
        .filter_map(|(name, dtype)| {
            let ps = time_kind(&weights, &input, *dtype)
                .map_err(|e| tracing::warn!(kind = name, "kernel not measured: {e}"))
                .ok()?;
            Some((name.to_string(), ps))
        })
        .collect()
}

fn time_kind(weights: &Tensor, input: &Tensor, dtype: GgmlDType) -> candle_core::Result<u32> {
    let one = QTensor::quantize(weights, dtype)?;
    let bytes = one.data()?.into_owned();
    let dims = one.shape().dims().to_vec();
    // Copies in memory of their own, multiplied by in turn.
    let copies = WORKING_SET.div_ceil(bytes.len().max(1));
    let matrices = (0..copies)
        .map(|_| QMatMul::from_qtensor(qtensor_from_ggml(dtype, &bytes, dims.clone(), &Device::Cpu)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    for m in &matrices {
        m.forward(input)?;
    }
    // The fastest of several passes over the working set: whatever else ran on the
    // machine only ever slows a pass down.
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut passes = 0;
    while passes < MIN_PASSES || start.elapsed() < MIN_TIME {
        let pass = Instant::now();
        for m in &matrices {
            m.forward(input)?;
        }
        best = best.min(pass.elapsed().as_secs_f64());
        passes += 1;
    }
    let ps = best * 1e12 / (copies as f64 * (ROWS * COLS) as f64);
    Ok(ps.round().clamp(1.0, f64::from(u32::MAX)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_measured_and_the_4_bit_tiles_beat_a_scalar_kernel_on_a_simd_cpu() {
        let measured = kernel_ps_per_weight();
        assert_eq!(measured.len(), KINDS.len(), "{measured:?}");
        assert!(measured.values().all(|ps| *ps >= 1), "{measured:?}");
        // The vendored candle runs Q4_0 and Q4_1 through AVX2 tiles (about as fast as each
        // other: 41-43 ps per weight here) and Q5_1 on its scalar kernel (83 ps).
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            let tiled = measured["Q4_0"].min(measured["Q4_1"]);
            assert!(tiled < measured["Q5_1"], "{measured:?}");
        }
    }
}
