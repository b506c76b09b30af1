//! Manifest verification throughput on one core, against the bare ed25519 verification
//! it contains (the baseline, measured in the same run).
//!
//! Run: `cargo bench -p slmesh-protocol --bench verify`

use slmesh_protocol::identity::{KeyKind, SecretKey};
use slmesh_protocol::manifest::{
    verify_manifest, FileEntry, FileRole, InferenceDefaults, ModelFormat, ModelManifest, SignedManifest, Variant,
};
use slmesh_protocol::rollout::{RolloutPlan, TagSelector};
use slmesh_protocol::{Hex32, TrustStore};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn manifest() -> ModelManifest {
    let variant = |id: &str, q: &str| Variant {
        id: id.into(),
        format: ModelFormat::Gguf,
        quantization: q.into(),
        architecture: "llama".into(),
        cpu_archs: vec![],
        min_ram_bytes: 512 << 20,
        selector: TagSelector::default(),
        files: vec![FileEntry {
            role: FileRole::Weights,
            name: format!("model-{id}.gguf"),
            blake3: Hex32([7; 32]),
            size: 98_000_000,
        }],
    };
    ModelManifest {
        name: "smollm2-135m-instruct".into(),
        version: 2,
        created_at: 1_700_000_000,
        description: "SmolLM2 135M instruct, demo model".into(),
        variants: vec![variant("q8_0", "Q8_0"), variant("q4_1", "Q4_1")],
        inference: InferenceDefaults::default(),
        rollout: RolloutPlan::default(),
        fleet: "default".into(),
        eval: None,
    }
}

fn rate(label: &str, min: Duration, mut f: impl FnMut()) -> f64 {
    // Warm up, then run whole batches until `min` has passed.
    for _ in 0..200 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < min {
        for _ in 0..500 {
            f();
        }
        n += 500;
    }
    let per_sec = n as f64 / start.elapsed().as_secs_f64();
    println!("{label:<48} {per_sec:>12.0} /s  ({:.2} µs each)", 1e6 / per_sec);
    per_sec
}

fn main() {
    let publisher = SecretKey::generate(KeyKind::Publisher);
    let mut trust = TrustStore::new();
    trust.add("release", publisher.public()).expect("valid key");
    let signed = SignedManifest::sign(&manifest(), &publisher).expect("sign");
    let bytes = signed.to_bytes().expect("encode");
    println!("signed manifest: {} bytes, 2 variants", bytes.len());

    let vk = publisher.public().verifying_key().expect("key");
    let sig = ed25519_dalek::Signature::from_slice(&signed.signature).expect("sig");
    let mut message = b"slmesh/model-manifest\0\x01\0".to_vec();
    message.extend_from_slice(&signed.body);
    let min = Duration::from_secs(3);
    let baseline = rate("baseline: ed25519 verify_strict of the same bytes", min, || {
        black_box(vk.verify_strict(black_box(&message), &sig)).expect("valid");
    });
    let full = rate("verify_manifest (decode, trust, sig, validate)", min, || {
        black_box(verify_manifest(black_box(&bytes), &trust, |_| Some(1))).expect("valid");
    });
    println!(
        "ratio full / baseline: {:.2}   goal: >= 20000 /s -> {}",
        full / baseline,
        if full >= 20_000.0 { "met" } else { "NOT met" }
    );
}
