//! A GGUF small enough to write in a test, real enough for mistral.rs to load.

use slmesh_protocol::gguf::{GgufWriter, MetaValue};

const VOCAB: usize = 40;
const EMBD: usize = 64;
const HEADS: usize = 4;
const FF: usize = 128;

/// A small deterministic generator (xorshift), so the weights are the same every run.
struct Noise(u64);

impl Noise {
    fn take(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }
}

/// A tiny llama-shaped GGUF with random weights and a 40-token vocabulary: loads through
/// mistral.rs in well under a second. `bos` is the BOS token id (out of range, it makes
/// mistral.rs's tokenizer conversion panic); `padding_floats` adds an unused tensor so
/// that transfer tests have a file of the size they need.
pub fn tiny_llama_gguf(bos: u32, padding_floats: usize) -> Vec<u8> {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    tokens.extend("abcdefghijklmnopqrstuvwxyz".chars().map(|c| format!("▁{c}")));
    tokens.extend(["▁", "▁the", "▁hello", "▁world", ".", ",", "!", "?", "a", "e", "o"].map(String::from));
    assert_eq!(tokens.len(), VOCAB);
    let scores: Vec<f32> = (0..VOCAB).map(|i| -(i as f32)).collect();
    let token_types: Vec<i32> = (0..VOCAB)
        .map(|i| {
            if i == 0 {
                2
            } else if i < 3 {
                3
            } else {
                1
            }
        })
        .collect();
    let mut noise = Noise(0x2545_f491_4f6c_dd1d);
    let w = EMBD as u64;
    let mut g = GgufWriter::new()
        .meta("general.architecture", MetaValue::Str("llama".into()))
        .meta("general.name", MetaValue::Str("tiny-random-llama".into()))
        .meta("llama.context_length", MetaValue::U32(256))
        .meta("llama.embedding_length", MetaValue::U32(EMBD as u32))
        .meta("llama.block_count", MetaValue::U32(1))
        .meta("llama.feed_forward_length", MetaValue::U32(FF as u32))
        .meta("llama.attention.head_count", MetaValue::U32(HEADS as u32))
        .meta("llama.attention.head_count_kv", MetaValue::U32(HEADS as u32))
        .meta("llama.rope.dimension_count", MetaValue::U32((EMBD / HEADS) as u32))
        .meta("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5))
        .meta("tokenizer.ggml.model", MetaValue::Str("llama".into()))
        .meta("tokenizer.ggml.tokens", MetaValue::StrArray(tokens))
        .meta("tokenizer.ggml.scores", MetaValue::F32Array(scores))
        .meta("tokenizer.ggml.token_type", MetaValue::I32Array(token_types))
        .meta("tokenizer.ggml.unknown_token_id", MetaValue::U32(0))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(bos))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
        .meta(
            "tokenizer.chat_template",
            MetaValue::Str(
                "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}".into(),
            ),
        )
        .tensor("token_embd.weight", &[w, VOCAB as u64], noise.take(EMBD * VOCAB, 0.5))
        .tensor("output_norm.weight", &[w], vec![1.0; EMBD])
        .tensor("output.weight", &[w, VOCAB as u64], noise.take(EMBD * VOCAB, 0.5));
    let p = "blk.0";
    g = g.tensor(&format!("{p}.attn_norm.weight"), &[w], vec![1.0; EMBD]).tensor(
        &format!("{p}.ffn_norm.weight"),
        &[w],
        vec![1.0; EMBD],
    );
    for name in ["attn_q", "attn_k", "attn_v", "attn_output"] {
        g = g.tensor(&format!("{p}.{name}.weight"), &[w, w], noise.take(EMBD * EMBD, 0.1));
    }
    if padding_floats > 0 {
        g = g.tensor("slmesh.padding", &[padding_floats as u64], noise.take(padding_floats, 1.0));
    }
    g.tensor(&format!("{p}.ffn_gate.weight"), &[w, FF as u64], noise.take(EMBD * FF, 0.1))
        .tensor(&format!("{p}.ffn_up.weight"), &[w, FF as u64], noise.take(EMBD * FF, 0.1))
        .tensor(&format!("{p}.ffn_down.weight"), &[FF as u64, w], noise.take(EMBD * FF, 0.1))
        .to_bytes()
}
