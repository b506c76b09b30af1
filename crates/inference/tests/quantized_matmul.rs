//! The quantised matrix product the engine runs every weight through, as patched in the
//! vendored candle (crates/vendor/README.md: 4-bit weights in tiles): for each shape a
//! model gives it (one row when decoding, a prompt's rows, widths that are not a multiple
//! of a tile), the result is the product of the dequantised weights with the input as the
//! kernel sees it (rounded to 8 bits), up to float rounding. And a row decoded alone gets
//! the same bits as in a batch, so an answer does not depend on what else is decoded.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// `tolerance`: float rounding, and for Q4_1 the input block sums its kernel reads as
/// stored (f16, as `vec_dot` reads them too).
fn check(kind: GgmlDType, tolerance: f32) {
    let dev = Device::Cpu;
    let k = 576; // the demo model's width: 18 blocks
    for (m, n) in [(1, 576), (1, 6), (2, 9), (3, 1), (4, 10), (5, 7), (6, 11), (7, 13), (13, 192), (40, 33)] {
        let w = Tensor::from_vec(values(n * k, n as u32), (n, k), &dev).expect("weights");
        let x = Tensor::from_vec(values(m * k, 7 + m as u32), (m, k), &dev).expect("input");
        // The input as the kernel takes it: 8-bit blocks (Q8_1 rounds as Q8_0 does).
        let x8 = QTensor::quantize(&x, GgmlDType::Q8_0).and_then(|q| q.dequantize(&dev)).expect("x8");
        let q = QTensor::quantize(&w, kind).expect("quantize");
        let want = x8.matmul(&q.dequantize(&dev).expect("dequantize").t().expect("t")).expect("matmul");
        let got = QMatMul::from_qtensor(q).expect("qmatmul").forward(&x).expect("forward");
        let want: Vec<Vec<f32>> = want.to_vec2().expect("want");
        let got: Vec<Vec<f32>> = got.to_vec2().expect("got");
        for i in 0..m {
            for j in 0..n {
                // Sums of 576 products of values in [-1, 1], about 8 in size: a wrong offset,
                // row or column moves one by units.
                let (e, g) = (want[i][j], got[i][j]);
                assert!((e - g).abs() < tolerance, "{kind:?} {m}x{n}: row {i}, column {j}: {g} against {e}");
            }
        }
    }
}

#[test]
fn q4_0_products_match_the_dequantised_weights() {
    check(GgmlDType::Q4_0, 1e-3);
}

#[test]
fn q4_1_products_match_the_dequantised_weights() {
    check(GgmlDType::Q4_1, 0.05);
}

#[test]
fn q8_0_products_match_the_dequantised_weights() {
    check(GgmlDType::Q8_0, 1e-3);
}

/// Each row of a batch of two, three or seven, decoded alone (one row: the kernel's
/// decoding path), equals the same row in the batch (two and three: rows in pairs, then
/// one; seven: four in a tile, then one at a time), bit for bit.
fn one_row_alone_as_in_a_batch(kind: GgmlDType) {
    let dev = Device::Cpu;
    let (k, n) = (576, 23);
    let w = Tensor::from_vec(values(n * k, 3), (n, k), &dev).expect("weights");
    let q = QMatMul::from_qtensor(QTensor::quantize(&w, kind).expect("quantize")).expect("qmatmul");
    for m in [2, 3, 7] {
        let x = Tensor::from_vec(values(m * k, 4), (m, k), &dev).expect("input");
        let batch: Vec<Vec<f32>> = q.forward(&x).and_then(|t| t.to_vec2()).expect("batch");
        for (i, in_batch) in batch.iter().enumerate() {
            let row = x.narrow(0, i, 1).expect("row");
            let alone: Vec<Vec<f32>> = q.forward(&row).and_then(|t| t.to_vec2()).expect("alone");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&alone[0]), bits(in_batch), "{kind:?}: row {i} of {m}");
        }
    }
}

#[test]
fn q4_0_one_row_alone_as_in_a_batch() {
    one_row_alone_as_in_a_batch(GgmlDType::Q4_0);
}

#[test]
fn q4_1_one_row_alone_as_in_a_batch() {
    one_row_alone_as_in_a_batch(GgmlDType::Q4_1);
}

/// Q8_0 goes through the tiles where the CPU has VNNI, through `vec_dot` elsewhere.
#[test]
fn q8_0_one_row_alone_as_in_a_batch() {
    one_row_alone_as_in_a_batch(GgmlDType::Q8_0);
}

/// Products of every kernel path (one row, two and three, four and more) as bits.
fn product_bits() -> Vec<u32> {
    let dev = Device::Cpu;
    let (k, n) = (576, 23);
    let mut bits = Vec::new();
    for kind in [GgmlDType::Q4_0, GgmlDType::Q4_1] {
        let w = Tensor::from_vec(values(n * k, 5), (n, k), &dev).expect("weights");
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, kind).expect("quantize")).expect("qmatmul");
        for m in [1, 2, 3, 4, 7] {
            let x = Tensor::from_vec(values(m * k, 6), (m, k), &dev).expect("input");
            let out: Vec<Vec<f32>> = q.forward(&x).and_then(|t| t.to_vec2()).expect("product");
            bits.extend(out.iter().flatten().map(|v| v.to_bits()));
        }
    }
    bits
}

/// Where the CPU has VNNI, the kernels take each block's integer dot product in one
/// instruction instead of AVX2's two; the sums are the same, so the results must be too,
/// bit for bit. This test runs itself again with `CANDLE_MATMUL_VNNI=0` and compares (on
/// a CPU without VNNI both runs take AVX2's path, and agree as they must).
#[test]
fn vnni_gives_the_bits_of_avx2() {
    const CHILD: &str = "QUANTIZED_MATMUL_AVX2_CHILD";
    let bits = product_bits();
    let line: String = bits.iter().map(|b| format!("{b:08x}")).collect::<Vec<_>>().join(",");
    if std::env::var_os(CHILD).is_some() {
        println!("bits {line}");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("this test"))
        .args(["--exact", "vnni_gives_the_bits_of_avx2", "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .env("CANDLE_MATMUL_VNNI", "0")
        .output()
        .expect("the test again, without VNNI");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest prints the test's name on the same line before it.
    let avx2 = stdout.lines().find_map(|l| l.split_once("bits ").map(|(_, b)| b)).expect("the child's products");
    #[cfg(target_arch = "x86_64")]
    eprintln!("this CPU has AVX-VNNI: {}", std::arch::is_x86_feature_detected!("avxvnni"));
    assert_eq!(avx2.len(), line.len(), "as many products");
    assert!(avx2 == line, "the products with VNNI differ from AVX2's");
}

/// Before a product, its input is quantised to 8-bit blocks: Q8_0 for Q4_0 and Q8_0
/// weights, Q8_1 for Q4_1. The vendored candle does it without `f32::round`, which kept
/// the loop scalar (crates/vendor/README.md). The bytes must still be those of
/// `f32::round`, including ties (a fraction of exactly one half), which go away from zero.
fn input_rounds_as_f32_round(kind: GgmlDType, header: usize) {
    let mut xs = values(32 * 40, 11);
    // A block whose largest magnitude is 127, so that its scale is exactly 1 and its values
    // are rounded as they are: ties of both signs, and the floats next to them.
    let ties = [
        127.0,
        2.5,
        -3.5,
        0.5,
        -0.5,
        1.5,
        -1.5,
        126.5,
        -126.5,
        0.499_999_97,
        -0.499_999_97,
        2.500_000_2,
        -7.499_999_5,
        0.0,
        -0.0,
        64.5,
    ];
    xs[..ties.len()].copy_from_slice(&ties);
    let t = Tensor::from_vec(xs.clone(), (40, 32), &Device::Cpu).expect("input");
    let q = QTensor::quantize(&t, kind).expect("quantize");
    let bytes = q.data().expect("bytes");
    // A block: its scale (and for Q8_1 its sum times the scale), f16, then 32 signed bytes.
    let block = header + 32;
    assert_eq!(bytes.len(), 40 * block);
    for (i, (xs, got)) in xs.chunks_exact(32).zip(bytes.chunks_exact(block)).enumerate() {
        let amax = xs.iter().fold(0f32, |a, x| a.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let want: Vec<u8> = xs.iter().map(|x| (x * id).round() as i8 as u8).collect();
        assert_eq!(&got[header..], &want[..], "{kind:?}, block {i}");
    }
}

#[test]
fn q8_0_input_rounds_as_f32_round() {
    input_rounds_as_f32_round(GgmlDType::Q8_0, 2);
}

#[test]
fn q8_1_input_rounds_as_f32_round() {
    input_rounds_as_f32_round(GgmlDType::Q8_1, 4);
}
