//! A model whose weights were damaged before signing: it loads, passes the smoke test and
//! answers at full speed, but wrongly. The attention query and key weights of a Q4_0
//! GGUF get random 4-bit values (their block scales stay, so nothing becomes NaN).

use candle_core::quantized::{gguf_file, GgmlDType};
use std::path::{Path, PathBuf};

/// Writes `output`: `input` (Q4_0) with the nibbles of every attention query and key
/// weight replaced by pseudo-random ones (seeded: the same input gives the same bytes).
pub fn damage_attention(input: &Path, output: &Path) {
    let mut file = std::fs::File::open(input).expect("open the GGUF");
    let content = gguf_file::Content::read(&mut file).expect("read the GGUF");
    let mut bytes = std::fs::read(input).expect("read the GGUF");
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as u8
    };
    let mut damaged = 0;
    for (name, info) in &content.tensor_infos {
        if !(name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight")) {
            continue;
        }
        assert_eq!(info.ggml_dtype, GgmlDType::Q4_0, "{name}: only Q4_0 is damaged here");
        // A Q4_0 block: an f16 scale, then 16 bytes holding 32 4-bit values.
        let start = (content.tensor_data_offset + info.offset) as usize;
        for block in 0..info.shape.elem_count() / 32 {
            let at = start + block * 18 + 2;
            for b in &mut bytes[at..at + 16] {
                *b = next();
            }
        }
        damaged += 1;
    }
    assert!(damaged > 0, "no attention weight in {}", input.display());
    std::fs::write(output, bytes).expect("write the damaged GGUF");
}

/// The demo file and its Q4_0 re-quantisation (`slmesh model quantize`, by the `slmesh`
/// binary given), in `dir`: (Q4_1, Q4_0).
pub fn demo_q4_0(slmesh: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let q4_1 = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::copy(crate::demo_model(), &q4_1).expect("copy the demo model");
    let out = std::process::Command::new(slmesh)
        .current_dir(dir)
        .args(["model", "quantize", q4_1.to_str().expect("path"), "--to", "q4_0"])
        .output()
        .expect("run slmesh");
    assert!(out.status.success(), "quantize: {}", String::from_utf8_lossy(&out.stderr));
    (q4_1, dir.join("SmolLM2-135M-Instruct.Q4_0.gguf"))
}

/// The demo file, its Q4_0 re-quantisation (`demo_q4_0`) and a damaged copy of that, in
/// `dir`: (Q4_1, Q4_0, damaged Q4_0).
pub fn demo_variants(slmesh: &Path, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (q4_1, q4_0) = demo_q4_0(slmesh, dir);
    let damaged = dir.join("damaged.Q4_0.gguf");
    damage_attention(&q4_0, &damaged);
    (q4_1, q4_0, damaged)
}
