//! Property tests over the wire types: every type round-trips, and no decoder panics
//! on any input.

use proptest::prelude::*;
use slmesh_protocol::hex32::Hex32;
use slmesh_protocol::identity::{KeyKind, PublicKey, SecretKey};
use slmesh_protocol::manifest::{
    FileEntry, FileRole, InferenceDefaults, ModelFormat, ModelManifest, SignedManifest, Variant,
};
use slmesh_protocol::mesh::{verify_have, HaveRecord, Hello, ManifestDigest, SignedHave};
use slmesh_protocol::rollout::{Gates, RolloutPlan, TagSelector, Wave};
use slmesh_protocol::trust::{Enrollment, EnrollmentCertificate};
use slmesh_protocol::{decoders, wire};

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,20}"
}

fn hex32() -> impl Strategy<Value = Hex32> {
    any::<[u8; 32]>().prop_map(Hex32)
}

fn finite() -> impl Strategy<Value = f64> {
    -1e9f64..1e9
}

fn selector() -> impl Strategy<Value = TagSelector> {
    prop::collection::btree_map(name(), prop::collection::vec(name(), 0..3), 0..3)
        .prop_map(|require| TagSelector { require })
}

fn role() -> impl Strategy<Value = FileRole> {
    prop_oneof![
        Just(FileRole::Weights),
        Just(FileRole::Tokenizer),
        Just(FileRole::ChatTemplate),
        Just(FileRole::Config),
        Just(FileRole::Other)
    ]
}

fn variant() -> impl Strategy<Value = Variant> {
    (
        name(),
        name(),
        name(),
        prop::collection::vec(name(), 0..3),
        any::<u64>(),
        selector(),
        prop::collection::vec((role(), name(), hex32(), any::<u64>()), 0..4),
    )
        .prop_map(|(id, quantization, architecture, cpu_archs, min_ram_bytes, selector, files)| Variant {
            id,
            format: ModelFormat::Gguf,
            quantization,
            architecture,
            cpu_archs,
            min_ram_bytes,
            selector,
            files: files.into_iter().map(|(role, name, blake3, size)| FileEntry { role, name, blake3, size }).collect(),
        })
}

fn manifest() -> impl Strategy<Value = ModelManifest> {
    (
        name(),
        any::<u64>(),
        any::<u64>(),
        ".{0,40}",
        prop::collection::vec(variant(), 0..3),
        (finite(), finite(), any::<u32>(), any::<u32>(), prop::option::of(".{0,30}")),
        prop::collection::vec((finite(), any::<u64>()), 0..4),
        selector(),
        (finite(), finite(), finite(), finite(), any::<u64>(), any::<u32>()),
    )
        .prop_map(|(name, version, created_at, description, variants, inf, waves, selector, g)| ModelManifest {
            name,
            version,
            created_at,
            description,
            variants,
            inference: InferenceDefaults {
                temperature: inf.0,
                top_p: inf.1,
                max_tokens: inf.2,
                context_length: inf.3,
                system_prompt: inf.4,
            },
            rollout: RolloutPlan {
                waves: waves.into_iter().map(|(fraction, soak_secs)| Wave { fraction, soak_secs }).collect(),
                selector,
                gates: Gates {
                    max_error_rate: g.0,
                    max_p95_latency_ratio: g.1,
                    max_p95_ttft_ratio: g.2,
                    min_tokens_per_sec_ratio: g.3,
                    min_samples: g.4,
                    min_reporting_nodes: g.5,
                    min_eval_pass_rate: None,
                    agreement: None,
                },
            },
            fleet: format!("fleet-{}", version % 7),
            eval: None,
        })
}

fn enrollment() -> impl Strategy<Value = Enrollment> {
    (any::<[u8; 32]>(), prop::collection::btree_map(name(), ".{0,10}", 0..4), any::<u64>(), any::<u64>()).prop_map(
        |(node, tags, issued_at, expires_at)| Enrollment {
            node: PublicKey::from_bytes(node),
            tags,
            issued_at,
            expires_at,
            fleet: format!("f{}", issued_at % 5),
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn manifest_body_round_trips(m in manifest()) {
        let bytes = wire::encode(&m).unwrap();
        let back: ModelManifest = wire::decode(&bytes, "manifest").unwrap();
        prop_assert_eq!(&back, &m);
        // Canonical: encoding again gives the same bytes.
        prop_assert_eq!(wire::encode(&back).unwrap(), bytes);
    }

    #[test]
    fn signed_manifest_round_trips(m in manifest(), seed in any::<[u8; 32]>()) {
        let key = SecretKey::from_seed(KeyKind::Publisher, seed);
        let signed = SignedManifest::sign(&m, &key).unwrap();
        let back = SignedManifest::from_bytes(&signed.to_bytes().unwrap()).unwrap();
        prop_assert_eq!(&back, &signed);
        prop_assert_eq!(back.verify_self_signed().unwrap(), m);
    }

    #[test]
    fn enrollment_round_trips(e in enrollment(), seed in any::<[u8; 32]>()) {
        let bytes = wire::encode(&e).unwrap();
        prop_assert_eq!(&wire::decode::<Enrollment>(&bytes, "enrollment").unwrap(), &e);
        let key = SecretKey::from_seed(KeyKind::Publisher, seed);
        let cert = EnrollmentCertificate::sign(&e, &key).unwrap();
        let back = EnrollmentCertificate::from_bytes(&cert.to_bytes().unwrap()).unwrap();
        prop_assert_eq!(back.verify_self_signed().unwrap(), e);
    }

    #[test]
    fn mesh_messages_round_trip(
        e in enrollment(),
        seed in any::<[u8; 32]>(),
        addrs in prop::collection::vec("[0-9.:]{1,21}", 0..4),
        blobs in prop::collection::vec(hex32(), 0..8),
        seq in any::<u64>(),
        latest in prop::collection::btree_map(name(), any::<u64>(), 0..8),
    ) {
        let operator = SecretKey::from_seed(KeyKind::Publisher, seed);
        let hello = Hello { certificate: EnrollmentCertificate::sign(&e, &operator).unwrap(), blob_addrs: addrs.clone() };
        prop_assert_eq!(Hello::from_bytes(&hello.to_bytes().unwrap()).unwrap(), hello);
        let node = SecretKey::from_seed(KeyKind::Node, seed);
        let have = HaveRecord { node: node.public(), seq, blobs: blobs.clone(), blob_addrs: addrs, partial: blobs };
        let signed = SignedHave::sign(&have, &node).unwrap();
        prop_assert_eq!(verify_have(&SignedHave::from_bytes(&signed.to_bytes().unwrap()).unwrap()).unwrap(), have);
        let digest = ManifestDigest { latest, revocations: seed, metrics: vec![(seed[..8].try_into().unwrap(), seq)] };
        prop_assert_eq!(ManifestDigest::from_bytes(&digest.to_bytes().unwrap()).unwrap(), digest);
    }

    #[test]
    fn hex32_round_trips_as_text(h in hex32()) {
        prop_assert_eq!(h.to_hex().parse::<Hex32>().unwrap(), h);
    }

    #[test]
    fn no_decoder_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        for (_, decode) in decoders::ALL {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn no_decoder_panics_on_mutated_valid_messages(m in manifest(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let key = SecretKey::from_seed(KeyKind::Publisher, [1; 32]);
        let mut bytes = SignedManifest::sign(&m, &key).unwrap().to_bytes().unwrap();
        for (i, x) in flips {
            let n = bytes.len();
            bytes[i % n] ^= x;
        }
        let cut = cut % (bytes.len() + 1);
        for (_, decode) in decoders::ALL {
            let _ = decode(&bytes);
            let _ = decode(&bytes[..cut]);
        }
    }
}

#[test]
fn ten_megabytes_of_random_bytes_to_every_decoder() {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut bytes = vec![0u8; 10 << 20];
    rng.fill_bytes(&mut bytes);
    for (name, decode) in decoders::ALL {
        assert!(!decode(&bytes), "{name} accepted 10 MB of random bytes");
    }
    // Random bytes behind a valid GGUF magic and version are refused too.
    bytes[..4].copy_from_slice(b"GGUF");
    bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
    assert!(slmesh_protocol::gguf::read_header_from_slice(&bytes).is_err());
}
