//! The fuzzers' seed corpus (`protocol/fuzz/seeds/<decoder>/seed-*`, kept in the repository): real messages of
//! each kind that `slmesh_protocol::decoders::ALL` decodes, taken from a simulated fleet
//! running the node's own state machine (a rollout, metrics, an operator command, a
//! revocation), so that the fuzzers start from inputs that reach deep into each decoder.
//!
//! `SLMESH_WRITE_FUZZ_SEEDS=1 cargo test --workspace --test fuzz_seeds` writes them again
//! (after a wire format change). Without it, the test checks that every decoder has seeds
//! and that each seed still decodes: a format change that leaves the corpus stale fails here.

use slmesh_protocol::decoders;
use slmesh_protocol::fleet::CommandAction;
use slmesh_protocol::gguf::{GgufWriter, MetaValue};
use slmesh_protocol::manifest::SignedManifest;
use slmesh_protocol::mesh::{PeerRequest, TOPIC_COMMANDS, TOPIC_MANIFESTS, TOPIC_METRICS, TOPIC_REVOCATIONS};
use slmesh_sim::fleet::{FleetSpec, NodeFleet};
use std::collections::BTreeMap;
use std::path::PathBuf;

const SECOND: u64 = 1_000_000;
/// Seeds kept per decoder: distinct messages, the smallest first.
const PER_DECODER: usize = 3;

/// Decoders whose answer needs a trust store or a valid signature over other bytes
/// (fuzzed with an empty trust store, they refuse every input after decoding it).
const NEED_TRUST: &[&str] = &["verify_manifest", "signed_metrics", "signed_revocation"];

fn fuzz_dir() -> PathBuf {
    slmesh_e2e::repo_file("protocol/fuzz")
}

/// Messages of each decoder's kind, from a simulated fleet's traffic.
fn messages() -> BTreeMap<&'static str, Vec<Vec<u8>>> {
    let mut f = NodeFleet::new(FleetSpec::lan(3));
    f.wire_log = Some(vec![]);
    f.start_all();
    f.run_for(SECOND);
    // With an evaluation suite and its gate, and an agreement gate: the manifest and
    // metrics decoders see them.
    let suite = slmesh_protocol::eval::EvalSuite::parse_jsonl(
        "{\"prompt\": \"2 + 2?\", \"regex\": \"\\\\b4\\\\b\", \"max_chars\": 40}\n\
         {\"prompt\": \"JSON?\", \"json_schema\": {\"type\": \"object\"}, \"contains_any\": [\"{\"]}",
    )
    .expect("suite");
    let suite = slmesh_protocol::eval::EvalSuite { compare_with_previous: true, ..suite };
    let gates = slmesh_protocol::rollout::Gates {
        min_eval_pass_rate: Some(0.8),
        agreement: Some(slmesh_protocol::shadow::AgreementGate { min: 0.3, sample: 0.2 }),
        ..NodeFleet::quick_gates(1)
    };
    let m = f.manifest_with_suite(1, &[(0.34, 60), (1.0, 0)], gates, Some(suite));
    f.publish(0, m).expect("publish");
    f.run_for(20 * SECOND);
    f.command(0, 1, CommandAction::Pause).expect("pause");
    f.run_for(2 * SECOND);
    f.revoke(0, 2, "fuzz seed").expect("revoke");
    f.run_for(20 * SECOND);
    let log = f.wire_log.take().expect("logged");

    let mut out: BTreeMap<&'static str, Vec<Vec<u8>>> = BTreeMap::new();
    let mut add = |name: &'static str, bytes: Vec<u8>| out.entry(name).or_default().push(bytes);
    for (what, bytes) in log {
        match what.strip_prefix("gossip ") {
            Some(TOPIC_MANIFESTS) => {
                let signed = SignedManifest::from_bytes(&bytes).expect("a manifest");
                add("manifest_body", signed.body.clone());
                for name in ["signed_manifest", "verify_manifest", "signed_open"] {
                    add(name, bytes.clone());
                }
            }
            Some(TOPIC_METRICS) => add("signed_metrics", bytes),
            Some(TOPIC_COMMANDS) => add("signed_command", bytes),
            Some(TOPIC_REVOCATIONS) => add("signed_revocation", bytes),
            Some(other) => panic!("gossip on an unknown topic {other}"),
            None if what == "request" => {
                match PeerRequest::from_bytes(&bytes).expect("a request") {
                    PeerRequest::Hello(h) => {
                        add("enrollment_certificate", h.certificate.to_bytes().expect("bytes"));
                        add("enrollment_body", h.certificate.body.clone());
                        add("hello", h.to_bytes().expect("bytes"));
                    }
                    PeerRequest::Sync(d) => add("manifest_digest", d.to_bytes().expect("bytes")),
                    PeerRequest::Have(h) => add("signed_have", h.to_bytes().expect("bytes")),
                }
                add("peer_request", bytes);
            }
            None => add("peer_response", bytes),
        }
    }
    // A small header: a little metadata and one tensor.
    let gguf = GgufWriter::new()
        .meta("general.architecture", MetaValue::Str("llama".into()))
        .meta("general.file_type", MetaValue::U32(2))
        .meta("llama.context_length", MetaValue::U32(256))
        .tensor("token_embd.weight", &[8, 4], vec![0.25; 32])
        .to_bytes();
    add("gguf_header", gguf);
    let text = format!("# a node key\nslmesh-node-secret-key-v1 {}\n", "07".repeat(32));
    add("key_file", text.into_bytes());
    // Distinct messages, the smallest first (each kind of request and response is in
    // the log many times).
    for seeds in out.values_mut() {
        seeds.sort_by_key(|s| (s.len(), s.clone()));
        seeds.dedup();
        let mut kept: Vec<Vec<u8>> = vec![];
        // One per first byte (a request's or response's variant) before any second one.
        for s in seeds.iter() {
            if kept.len() < PER_DECODER && !kept.iter().any(|k| k.first() == s.first()) {
                kept.push(s.clone());
            }
        }
        for s in seeds.iter() {
            if kept.len() < PER_DECODER && !kept.contains(s) {
                kept.push(s.clone());
            }
        }
        *seeds = kept;
    }
    out
}

#[test]
fn every_decoder_has_seeds_that_still_decode() {
    let dir = fuzz_dir().join("seeds");
    if std::env::var_os("SLMESH_WRITE_FUZZ_SEEDS").is_some() {
        let messages = messages();
        for (name, seeds) in &messages {
            let d = dir.join(name);
            std::fs::create_dir_all(&d).expect("corpus folder");
            for old in std::fs::read_dir(&d).expect("list").flatten() {
                if old.file_name().to_string_lossy().starts_with("seed-") {
                    std::fs::remove_file(old.path()).expect("remove an old seed");
                }
            }
            for s in seeds {
                let hash = blake3::hash(s).to_hex();
                std::fs::write(d.join(format!("seed-{}", &hash[..16])), s).expect("write a seed");
            }
        }
    }
    for (name, decode) in decoders::ALL {
        let target = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        assert!(target.exists(), "decoder {name} has no fuzz target {}", target.display());
        let d = dir.join(name);
        let seeds: Vec<PathBuf> = std::fs::read_dir(&d)
            .unwrap_or_else(|e| {
                panic!("no corpus for decoder {name} in {} ({e}): write it, see this file", d.display())
            })
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seed-")))
            .collect();
        assert!(!seeds.is_empty(), "decoder {name} has no seeds in {}", d.display());
        for seed in seeds {
            let bytes = std::fs::read(&seed).expect("read a seed");
            let decoded = decode(&bytes);
            assert!(decoded || NEED_TRUST.contains(name), "{} no longer decodes: the corpus is stale", seed.display());
        }
    }
}
