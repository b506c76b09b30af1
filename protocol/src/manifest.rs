//! Model manifests: what a model version is made of, how to run it, and how to roll it
//! out. Signed by a publisher key; verified by every node before anything else happens.

use crate::error::ProtocolError;
use crate::hex32::Hex32;
use crate::identity::PublicKey;
use crate::rollout::{RolloutPlan, TagSelector};
use crate::signed::{Signed, SignedKind};
use crate::trust::TrustStore;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// Model name, e.g. `smollm2-135m-instruct`: 1-64 of a-z, 0-9, `-`, `_`, `.`.
    pub name: String,
    /// Grows with every release of this name; a node never accepts a version not newer
    /// than one it holds.
    pub version: u64,
    /// Unix seconds, set by the publisher.
    pub created_at: u64,
    #[serde(default)]
    pub description: String,
    /// The variants, best first: a node takes the first one that fits it.
    pub variants: Vec<Variant>,
    pub inference: InferenceDefaults,
    pub rollout: RolloutPlan,
    /// The fleet it is published to (`trust::DEFAULT_FLEET` unless given).
    #[serde(default = "crate::trust::default_fleet")]
    pub fleet: String,
    /// Prompts with checks a node runs on this version before serving it; only the
    /// counts of checks passed leave the node (`crate::eval`).
    #[serde(default)]
    pub eval: Option<crate::eval::EvalSuite>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    /// Unique within the manifest, e.g. `q4_1`.
    pub id: String,
    pub format: ModelFormat,
    /// Quantisation, as the GGUF header names it (`Q4_1`, `Q8_0`, `F16`, ...).
    pub quantization: String,
    /// Model architecture from the GGUF header (`llama`, `qwen2`, ...).
    pub architecture: String,
    /// CPU architectures this variant runs on (`x86_64`, `aarch64`); empty means any.
    #[serde(default)]
    pub cpu_archs: Vec<String>,
    /// Memory a node needs to serve it.
    pub min_ram_bytes: u64,
    /// Node tags this variant needs (e.g. `class=gpu`); empty means any node.
    #[serde(default)]
    pub selector: TagSelector,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    Gguf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub role: FileRole,
    /// A plain file name (no folders), used when the file is staged on disk.
    pub name: String,
    pub blake3: Hex32,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileRole {
    Weights,
    Tokenizer,
    ChatTemplate,
    Config,
    Other,
}

impl std::str::FromStr for FileRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "weights" => FileRole::Weights,
            "tokenizer" => FileRole::Tokenizer,
            "chat_template" | "chat-template" => FileRole::ChatTemplate,
            "config" => FileRole::Config,
            "other" => FileRole::Other,
            _ => {
                return Err(format!("unknown file role {s:?}: use weights, tokenizer, chat_template, config or other"))
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceDefaults {
    pub temperature: f64,
    pub top_p: f64,
    /// Default and cap for `max_tokens` of one request.
    pub max_tokens: u32,
    pub context_length: u32,
    // No `skip_serializing_if` on wire types: bincode is not self-describing.
    #[serde(default)]
    pub system_prompt: Option<String>,
}

impl Default for InferenceDefaults {
    fn default() -> Self {
        InferenceDefaults { temperature: 0.7, top_p: 0.95, max_tokens: 256, context_length: 2048, system_prompt: None }
    }
}

impl SignedKind for ModelManifest {
    const DOMAIN: &'static [u8] = b"slmesh/model-manifest";
    const WHAT: &'static str = "model manifest";
}

pub type SignedManifest = Signed<ModelManifest>;

pub const MAX_VARIANTS: usize = 16;
pub const MAX_FILES_PER_VARIANT: usize = 16;
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_FILE_NAME_LEN: usize = 128;
pub const MAX_TEXT_LEN: usize = 4096;

fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// A file name that is safe to join to a staging folder: no separators, no `..`, no
/// hidden files, nothing unprintable.
pub fn is_safe_file_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_FILE_NAME_LEN
        && !s.starts_with('.')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
}

impl ModelManifest {
    /// Semantic checks beyond the signature: names, files, plan.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |r: String| Err(ProtocolError::invalid("manifest", r));
        if !is_name(&self.name, MAX_NAME_LEN) {
            return bad(format!(
                "model name {:?}: use 1-{MAX_NAME_LEN} of a-z, 0-9, - _ . starting with a letter or digit",
                self.name
            ));
        }
        if self.version == 0 {
            return bad("version must be at least 1".into());
        }
        crate::trust::validate_fleet(&self.fleet)?;
        if self.description.len() > MAX_TEXT_LEN {
            return bad(format!("description is longer than {MAX_TEXT_LEN} bytes"));
        }
        if self.variants.is_empty() || self.variants.len() > MAX_VARIANTS {
            return bad(format!("needs 1 to {MAX_VARIANTS} variants, has {}", self.variants.len()));
        }
        let mut ids = HashSet::new();
        for v in &self.variants {
            if !is_name(&v.id, MAX_NAME_LEN) {
                return bad(format!("variant id {:?} is not a valid name", v.id));
            }
            if !ids.insert(v.id.as_str()) {
                return bad(format!("variant id {:?} appears twice", v.id));
            }
            if v.quantization.len() > MAX_NAME_LEN || v.architecture.is_empty() || v.architecture.len() > MAX_NAME_LEN {
                return bad(format!("variant {}: quantization or architecture missing or too long", v.id));
            }
            if v.files.is_empty() || v.files.len() > MAX_FILES_PER_VARIANT {
                return bad(format!("variant {}: needs 1 to {MAX_FILES_PER_VARIANT} files", v.id));
            }
            let weights = v.files.iter().filter(|f| f.role == FileRole::Weights).count();
            if weights != 1 {
                return bad(format!("variant {}: needs exactly one weights file, has {weights}", v.id));
            }
            let mut names = HashSet::new();
            for f in &v.files {
                if !is_safe_file_name(&f.name) {
                    return bad(format!("variant {}: file name {:?} is not a plain file name", v.id, f.name));
                }
                if !names.insert(f.name.as_str()) {
                    return bad(format!("variant {}: file {:?} appears twice", v.id, f.name));
                }
                if f.size == 0 {
                    return bad(format!("variant {}: file {} is empty", v.id, f.name));
                }
            }
        }
        let inf = &self.inference;
        if !(inf.temperature.is_finite() && (0.0..=2.0).contains(&inf.temperature)) {
            return bad(format!("temperature {} is not in [0, 2]", inf.temperature));
        }
        if !(inf.top_p > 0.0 && inf.top_p <= 1.0) {
            return bad(format!("top_p {} is not in (0, 1]", inf.top_p));
        }
        if inf.max_tokens == 0 || inf.context_length == 0 {
            return bad("max_tokens and context_length must be at least 1".into());
        }
        if inf.system_prompt.as_ref().is_some_and(|p| p.len() > MAX_TEXT_LEN) {
            return bad(format!("system prompt is longer than {MAX_TEXT_LEN} bytes"));
        }
        if let Some(suite) = &self.eval {
            suite.validate().map_err(|e| ProtocolError::invalid("manifest", format!("evaluation suite: {e}")))?;
        }
        if self.rollout.gates.min_eval_pass_rate.is_some() && self.eval.is_none() {
            return bad("the plan gates on an evaluation suite's pass rate, and the manifest carries none".into());
        }
        self.rollout.validate()
    }

    pub fn variant(&self, id: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.id == id)
    }
}

impl Variant {
    pub fn weights(&self) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.role == FileRole::Weights)
    }

    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A manifest that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    pub manifest: ModelManifest,
    pub signed: SignedManifest,
    pub publisher: PublicKey,
    pub publisher_name: String,
}

/// Everything a node checks before it accepts a manifest from the wire, in order of
/// cost: size, envelope, protocol version, trusted signer, signature, body, semantics,
/// and that it is newer than the version `held` for that name (no replay, no downgrade).
pub fn verify_manifest(
    bytes: &[u8],
    trust: &TrustStore,
    held: impl FnOnce(&str) -> Option<u64>,
) -> Result<VerifiedManifest, ProtocolError> {
    let signed = SignedManifest::from_bytes(bytes)?;
    verify_signed_manifest(signed, trust, held)
}

pub fn verify_signed_manifest(
    signed: SignedManifest,
    trust: &TrustStore,
    held: impl FnOnce(&str) -> Option<u64>,
) -> Result<VerifiedManifest, ProtocolError> {
    let (manifest, publisher_name) = trust.open(&signed)?;
    manifest.validate()?;
    if let Some(held) = held(&manifest.name) {
        if manifest.version <= held {
            return Err(ProtocolError::NotNewer { name: manifest.name, offered: manifest.version, held });
        }
    }
    Ok(VerifiedManifest { manifest, publisher: signed.signer, signed, publisher_name })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::identity::{KeyKind, SecretKey};

    pub fn sample_manifest(version: u64) -> ModelManifest {
        ModelManifest {
            name: "smollm2-135m-instruct".into(),
            version,
            created_at: 1_700_000_000,
            description: "demo".into(),
            variants: vec![Variant {
                id: "q4_1".into(),
                format: ModelFormat::Gguf,
                quantization: "Q4_1".into(),
                architecture: "llama".into(),
                cpu_archs: vec![],
                min_ram_bytes: 512 << 20,
                selector: TagSelector::default(),
                files: vec![FileEntry {
                    role: FileRole::Weights,
                    name: "model.gguf".into(),
                    blake3: Hex32([9; 32]),
                    size: 98_000_000,
                }],
            }],
            inference: InferenceDefaults::default(),
            rollout: RolloutPlan::default(),
            fleet: crate::trust::default_fleet(),
            eval: None,
        }
    }

    fn setup() -> (SecretKey, TrustStore) {
        let publisher = SecretKey::generate(KeyKind::Publisher);
        let mut trust = TrustStore::new();
        trust.add("release", publisher.public()).unwrap();
        (publisher, trust)
    }

    #[test]
    fn signed_manifest_verifies() {
        let (publisher, trust) = setup();
        let bytes = SignedManifest::sign(&sample_manifest(3), &publisher).unwrap().to_bytes().unwrap();
        let v = verify_manifest(&bytes, &trust, |_| Some(2)).unwrap();
        assert_eq!(v.manifest, sample_manifest(3));
        assert_eq!(v.publisher_name, "release");
    }

    #[test]
    fn a_manifest_carries_its_evaluation_suite_and_a_quality_gate_needs_one() {
        let (publisher, trust) = setup();
        let suite = crate::eval::EvalSuite::parse_jsonl(
            "{\"prompt\": \"2 + 2?\", \"regex\": \"4\"}\n{\"prompt\": \"JSON?\", \"json_schema\": {\"type\": \"object\"}}",
        )
        .unwrap();
        let mut m = sample_manifest(3);
        m.eval = Some(suite.clone());
        m.rollout.gates.min_eval_pass_rate = Some(0.8);
        let bytes = SignedManifest::sign(&m, &publisher).unwrap().to_bytes().unwrap();
        let v = verify_manifest(&bytes, &trust, |_| Some(2)).unwrap();
        assert_eq!(v.manifest.eval, Some(suite.clone()));
        // A gate with no suite to read, a rate out of range, a suite that does not
        // validate (a signed manifest is checked like a file): refused.
        let mut no_suite = m.clone();
        no_suite.eval = None;
        assert!(no_suite.validate().unwrap_err().to_string().contains("carries none"));
        let mut rate = m.clone();
        rate.rollout.gates.min_eval_pass_rate = Some(1.5);
        assert!(rate.validate().unwrap_err().to_string().contains("min_eval_pass_rate"));
        let mut bad = m.clone();
        if let Some(s) = bad.eval.as_mut() {
            s.cases[0].checks.regex = Some("(".into());
        }
        assert!(bad.validate().unwrap_err().to_string().contains("does not compile"));
        let mut empty = m;
        empty.eval = Some(crate::eval::EvalSuite::default());
        assert!(empty.validate().unwrap_err().to_string().contains("1 to"));
    }

    #[test]
    fn signature_over_other_bytes_is_refused() {
        let (publisher, trust) = setup();
        let mut signed = SignedManifest::sign(&sample_manifest(3), &publisher).unwrap();
        // Swap in the body of another manifest, keeping the signature.
        signed.body = crate::wire::encode(&sample_manifest(4)).unwrap();
        let bytes = signed.to_bytes().unwrap();
        assert!(matches!(verify_manifest(&bytes, &trust, |_| None), Err(ProtocolError::BadSignature { .. })));
        // Flip one bit of the body.
        let mut signed = SignedManifest::sign(&sample_manifest(3), &publisher).unwrap();
        let last = signed.body.len() - 1;
        signed.body[last] ^= 1;
        assert!(matches!(verify_signed_manifest(signed, &trust, |_| None), Err(ProtocolError::BadSignature { .. })));
    }

    #[test]
    fn signature_of_another_record_kind_is_refused() {
        // The same body bytes signed as a certificate are not a manifest signature.
        let (publisher, trust) = setup();
        let mut signed = SignedManifest::sign(&sample_manifest(3), &publisher).unwrap();
        let as_cert = crate::trust::EnrollmentCertificate::sign(
            &crate::trust::Enrollment {
                node: publisher.public(),
                tags: Default::default(),
                issued_at: 0,
                expires_at: 1,
                fleet: crate::trust::default_fleet(),
            },
            &publisher,
        )
        .unwrap();
        signed.signature = as_cert.signature;
        assert!(matches!(verify_signed_manifest(signed, &trust, |_| None), Err(ProtocolError::BadSignature { .. })));
    }

    #[test]
    fn untrusted_publisher_is_refused() {
        let (_publisher, trust) = setup();
        let stranger = SecretKey::generate(KeyKind::Publisher);
        let bytes = SignedManifest::sign(&sample_manifest(3), &stranger).unwrap().to_bytes().unwrap();
        let err = verify_manifest(&bytes, &trust, |_| None).unwrap_err();
        assert!(matches!(err, ProtocolError::UnknownKey { .. }), "{err}");
        assert!(err.to_string().contains("[trust] publishers"));
    }

    #[test]
    fn replay_and_downgrade_are_refused() {
        let (publisher, trust) = setup();
        let bytes = SignedManifest::sign(&sample_manifest(3), &publisher).unwrap().to_bytes().unwrap();
        for held in [3, 4, 100] {
            assert_eq!(
                verify_manifest(&bytes, &trust, |_| Some(held)).unwrap_err(),
                ProtocolError::NotNewer { name: "smollm2-135m-instruct".into(), offered: 3, held }
            );
        }
        assert!(verify_manifest(&bytes, &trust, |n| (n == "other").then_some(9)).is_ok());
    }

    #[test]
    fn unknown_protocol_version_is_refused() {
        let (publisher, trust) = setup();
        let mut signed = SignedManifest::sign(&sample_manifest(3), &publisher).unwrap();
        signed.protocol_version = 99;
        let err = verify_manifest(&signed.to_bytes().unwrap(), &trust, |_| None).unwrap_err();
        assert_eq!(err, ProtocolError::UnknownProtocolVersion { got: 99, supported: crate::PROTOCOL_VERSION });
    }

    #[test]
    fn oversize_and_malformed_bytes_are_refused() {
        let (_publisher, trust) = setup();
        let huge = vec![0u8; crate::MAX_MESSAGE_BYTES + 1];
        assert!(matches!(verify_manifest(&huge, &trust, |_| None), Err(ProtocolError::Oversize { .. })));
        for bytes in [&b""[..], b"\x01", b"not a manifest at all", &[0xff; 64]] {
            assert!(matches!(
                verify_manifest(bytes, &trust, |_| None),
                Err(ProtocolError::Malformed { .. }) | Err(ProtocolError::UnknownProtocolVersion { .. })
            ));
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let (publisher, trust) = setup();
        let mut bytes = SignedManifest::sign(&sample_manifest(3), &publisher).unwrap().to_bytes().unwrap();
        bytes.push(0);
        assert!(matches!(verify_manifest(&bytes, &trust, |_| None), Err(ProtocolError::Malformed { .. })));
    }

    type Mutation = Box<dyn Fn(&mut ModelManifest)>;

    #[test]
    fn semantic_checks() {
        let (publisher, trust) = setup();
        let cases: Vec<(&str, Mutation)> = vec![
            ("path in file name", Box::new(|m| m.variants[0].files[0].name = "../../etc/passwd".into())),
            ("bad model name", Box::new(|m| m.name = "Bad Name".into())),
            ("version zero", Box::new(|m| m.version = 0)),
            ("no variants", Box::new(|m| m.variants.clear())),
            ("no weights", Box::new(|m| m.variants[0].files[0].role = FileRole::Tokenizer)),
            ("waves decreasing", Box::new(|m| m.rollout.waves[1].fraction = 0.01)),
            ("wave above one", Box::new(|m| m.rollout.waves[2].fraction = 1.5)),
            ("nan gate", Box::new(|m| m.rollout.gates.max_p95_latency_ratio = f64::NAN)),
            ("nan temperature", Box::new(|m| m.inference.temperature = f64::NAN)),
        ];
        for (what, mutate) in cases {
            let mut m = sample_manifest(1);
            mutate(&mut m);
            let bytes = SignedManifest::sign(&m, &publisher).unwrap().to_bytes().unwrap();
            let err = verify_manifest(&bytes, &trust, |_| None).unwrap_err();
            assert!(matches!(err, ProtocolError::Invalid { .. }), "{what}: {err}");
        }
    }

    #[test]
    fn toml_round_trip_of_unsigned_manifest() {
        let m = sample_manifest(5);
        let text = toml::to_string(&m).unwrap();
        assert!(text.contains(&"09".repeat(32)), "hashes are hex in TOML");
        let back: ModelManifest = toml::from_str(&text).unwrap();
        assert_eq!(back, m);
    }
}
