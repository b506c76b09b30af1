//! `slmesh manifest create | sign | verify | inspect`.

use crate::config::Config;
use crate::keys::unix_now;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use slmesh_protocol::gguf::{self, MISTRALRS_GGUF_ARCHITECTURES};
use slmesh_protocol::identity::{KeyKind, PublicKey, SecretKey};
use slmesh_protocol::manifest::{
    is_safe_file_name, verify_signed_manifest, FileEntry, FileRole, InferenceDefaults, ModelFormat, ModelManifest,
    SignedManifest, Variant,
};
use slmesh_protocol::rollout::{Gates, RolloutPlan, TagSelector, Wave};
use slmesh_protocol::trust::parse_tag;
use slmesh_protocol::{Hex32, TrustStore, MAX_MESSAGE_BYTES};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum ManifestCommand {
    /// Describe GGUF files as an unsigned manifest (TOML, to review and edit before signing).
    Create(Box<CreateArgs>),
    /// Sign a TOML manifest with a publisher key, giving the binary manifest nodes accept.
    Sign(SignArgs),
    /// Check a signed manifest against trusted publisher keys (and optionally its files).
    Verify(VerifyArgs),
    /// Print a manifest (signed or TOML) in readable form.
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// GGUF weight files, one variant each, best first (nodes take the first that fits).
    #[arg(required = true)]
    pub gguf: Vec<PathBuf>,
    /// Model name: 1-64 of a-z, 0-9, - _ .
    #[arg(long)]
    pub name: String,
    /// Model version: must grow with every release of this name.
    #[arg(long = "version")]
    pub model_version: u64,
    #[arg(long, default_value = "")]
    pub description: String,
    /// Another file every variant needs, as ROLE=PATH (roles: tokenizer, chat_template, config, other).
    #[arg(long = "attach")]
    pub attach: Vec<String>,
    /// RAM a node needs for each variant, in MiB (default: 1.25 x the weights + 128 MiB).
    #[arg(long)]
    pub min_ram_mib: Option<u64>,
    /// Restrict every variant to these CPU architectures (repeatable, e.g. x86_64).
    #[arg(long = "cpu-arch")]
    pub cpu_archs: Vec<String>,
    /// A rollout wave as FRACTION:SOAK, e.g. 0.05:10m (repeatable, cumulative, in order).
    /// Default: 0.05:10m 0.25:10m 1:0.
    #[arg(long = "wave", value_parser = parse_wave)]
    pub waves: Vec<Wave>,
    /// Only nodes with this tag take part, as key=value (repeatable; same key = any of).
    #[arg(long = "select", value_parser = parse_tag)]
    pub select: Vec<(String, String)>,
    #[arg(long, default_value_t = Gates::default().max_error_rate)]
    pub max_error_rate: f64,
    #[arg(long, default_value_t = Gates::default().max_p95_latency_ratio)]
    pub max_p95_latency_ratio: f64,
    #[arg(long, default_value_t = Gates::default().max_p95_ttft_ratio)]
    pub max_p95_ttft_ratio: f64,
    #[arg(long, default_value_t = Gates::default().min_tokens_per_sec_ratio)]
    pub min_tokens_per_sec_ratio: f64,
    #[arg(long, default_value_t = Gates::default().min_samples)]
    pub min_samples: u64,
    /// No gate verdict before this many nodes have reported on the version. A verdict
    /// needs a majority of the reporting nodes, so from 3 on (the default) no single node
    /// (misreporting or lying) can halt or pass a rollout alone. The canary wave holds at
    /// least this many eligible nodes, whatever its fraction.
    #[arg(long, default_value_t = Gates::default().min_reporting_nodes)]
    pub min_reporting_nodes: u32,
    #[arg(long, default_value_t = InferenceDefaults::default().max_tokens)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = InferenceDefaults::default().temperature)]
    pub temperature: f64,
    /// The fleet to publish to: nodes of other fleets refuse the manifest (also when the
    /// same publisher key signs for both).
    #[arg(long, default_value = slmesh_protocol::trust::DEFAULT_FLEET)]
    pub fleet: String,
    /// An evaluation suite (JSON Lines, one prompt with its checks per line; `slmesh eval
    /// --help` describes it) that every node runs on the version before serving it. The
    /// rollout then also gates on the share of its cases passed.
    #[arg(long, value_name = "FILE")]
    pub eval: Option<PathBuf>,
    /// With --eval: the lowest acceptable share of the suite's cases passed (median across
    /// nodes), in [0, 1].
    #[arg(long, default_value_t = slmesh_protocol::eval::DEFAULT_MIN_PASS_RATE, requires = "eval")]
    pub min_eval_pass_rate: f64,
    /// Shadow comparison: canary nodes answer a share of live requests again with the
    /// version they served before (kept loaded during the canary's soak) and score how far
    /// the two answers agree (chrF, 0 to 1; only the scores leave a node). The rollout
    /// halts when the median node's median score is below this. Needs a previous version
    /// on the canary nodes.
    #[arg(long, value_name = "SCORE")]
    pub min_agreement: Option<f64>,
    /// With --min-agreement: the share of live requests compared, in (0, 1].
    #[arg(long, default_value_t = slmesh_protocol::shadow::DEFAULT_SAMPLE, requires = "min_agreement")]
    pub shadow_sample: f64,
    /// Accept a GGUF architecture that mistral.rs 0.8.1 cannot load.
    #[arg(long)]
    pub allow_unsupported_architecture: bool,
    /// Where to write the TOML manifest ("-" for standard output).
    #[arg(long, default_value = "-")]
    pub out: PathBuf,
}

/// A duration in seconds: `600`, `90s`, `10m`, `2h`, `1d`.
pub(crate) fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let bad = || format!("{s:?} is not a duration like 600, 10m, 2h");
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)).ok_or_else(bad)
}

fn parse_wave(s: &str) -> Result<Wave, String> {
    let (f, soak) = s.split_once(':').ok_or_else(|| format!("wave {s:?} is not FRACTION:SOAK, e.g. 0.05:10m"))?;
    let fraction: f64 = f.parse().map_err(|_| format!("wave fraction {f:?} is not a number"))?;
    Ok(Wave { fraction, soak_secs: parse_duration_secs(soak)? })
}

/// An evaluation suite file; an error names the file and the line.
pub(crate) fn read_suite(path: &Path) -> Result<slmesh_protocol::eval::EvalSuite> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    slmesh_protocol::eval::EvalSuite::parse_jsonl(&text)
        .map_err(|e| anyhow!("evaluation suite {}: {e}", path.display()))
}

/// A read-only memory map of a file: GGUF header and BLAKE3 read the same pages once.
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the map is read-only and dropped before we return; a file changed under us
    // by another process gives a wrong hash, which verification on every node catches.
    unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot read {}", path.display()))
}

fn blake3_of(bytes: &[u8]) -> Hex32 {
    let mut hasher = blake3::Hasher::new();
    hasher.update_rayon(bytes);
    Hex32(*hasher.finalize().as_bytes())
}

/// Size and BLAKE3 of a file, hashed on every core.
fn hash_file(path: &Path) -> Result<(Hex32, u64)> {
    let map = map_file(path)?;
    Ok((blake3_of(&map), map.len() as u64))
}

fn file_name_of(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| is_safe_file_name(n))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{}: rename the file to a plain name of a-z, 0-9, - _ . +", path.display()))
}

/// The manifest entry of a mapped file: its plain name, size and BLAKE3.
fn entry_of(role: FileRole, path: &Path, map: &[u8]) -> Result<FileEntry> {
    let name = file_name_of(path)?;
    if map.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(FileEntry { role, name, blake3: blake3_of(map), size: map.len() as u64 })
}

fn file_entry(role: FileRole, path: &Path) -> Result<FileEntry> {
    entry_of(role, path, &map_file(path)?)
}

pub fn create(args: &CreateArgs) -> Result<ModelManifest> {
    let attached = args
        .attach
        .iter()
        .map(|a| {
            let (role, path) = a.split_once('=').ok_or_else(|| anyhow!("--attach {a:?} is not ROLE=PATH"))?;
            let role: FileRole = role.parse().map_err(|e: String| anyhow!(e))?;
            if role == FileRole::Weights {
                bail!("--attach {a:?}: weights are the positional GGUF files");
            }
            file_entry(role, Path::new(path))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut variants = Vec::new();
    let mut infos_context = Vec::new();
    for path in &args.gguf {
        // Header first: a file that is not GGUF, or of an architecture nodes cannot load,
        // is refused before 100 MB of it are hashed.
        let map = map_file(path)?;
        let info = gguf::read_header_from_slice(&map)
            .with_context(|| format!("{} cannot be used as model weights", path.display()))?;
        infos_context.extend(info.context_length);
        if !args.allow_unsupported_architecture && !MISTRALRS_GGUF_ARCHITECTURES.contains(&info.architecture.as_str()) {
            bail!(
                "{}: architecture {:?} cannot be served by mistral.rs 0.8.1 (it loads {}); pass --allow-unsupported-architecture to publish it anyway",
                path.display(),
                info.architecture,
                MISTRALRS_GGUF_ARCHITECTURES.join(", ")
            );
        }
        let weights = entry_of(FileRole::Weights, path, &map)?;
        let min_ram_bytes = match args.min_ram_mib {
            Some(mib) => mib << 20,
            None => weights.size + weights.size / 4 + (128 << 20),
        };
        let mut files = vec![weights];
        files.extend(attached.iter().cloned());
        let id = info.quantization.to_ascii_lowercase();
        if variants.iter().any(|v: &Variant| v.id == id) {
            bail!("two GGUF files have quantisation {}: one variant per quantisation", info.quantization);
        }
        variants.push(Variant {
            id,
            format: ModelFormat::Gguf,
            quantization: info.quantization,
            architecture: info.architecture,
            cpu_archs: args.cpu_archs.clone(),
            min_ram_bytes,
            selector: TagSelector::default(),
            files,
        });
    }
    let mut selector = TagSelector::default();
    for (k, v) in &args.select {
        selector.require.entry(k.clone()).or_default().push(v.clone());
    }
    // The context every variant supports, capped by the usual default.
    let context_length = infos_context.iter().copied().min().map_or(InferenceDefaults::default().context_length, |c| {
        u32::try_from(c).unwrap_or(u32::MAX).min(InferenceDefaults::default().context_length)
    });
    let eval = args.eval.as_deref().map(read_suite).transpose()?;
    let defaults = RolloutPlan::default();
    let manifest = ModelManifest {
        name: args.name.clone(),
        version: args.model_version,
        created_at: unix_now()?,
        description: args.description.clone(),
        variants,
        inference: InferenceDefaults {
            max_tokens: args.max_tokens,
            temperature: args.temperature,
            context_length,
            ..Default::default()
        },
        rollout: RolloutPlan {
            waves: if args.waves.is_empty() { defaults.waves } else { args.waves.clone() },
            selector,
            gates: Gates {
                max_error_rate: args.max_error_rate,
                max_p95_latency_ratio: args.max_p95_latency_ratio,
                max_p95_ttft_ratio: args.max_p95_ttft_ratio,
                min_tokens_per_sec_ratio: args.min_tokens_per_sec_ratio,
                min_samples: args.min_samples,
                min_reporting_nodes: args.min_reporting_nodes,
                min_eval_pass_rate: eval.is_some().then_some(args.min_eval_pass_rate),
                agreement: args
                    .min_agreement
                    .map(|min| slmesh_protocol::shadow::AgreementGate { min, sample: args.shadow_sample }),
            },
        },
        fleet: args.fleet.clone(),
        eval,
    };
    manifest.validate()?;
    Ok(manifest)
}

#[derive(Args)]
pub struct SignArgs {
    /// The TOML manifest to sign.
    pub manifest: PathBuf,
    /// The publisher's secret key.
    #[arg(long)]
    pub key: PathBuf,
    /// Where to write the signed manifest.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The signed manifest.
    pub manifest: PathBuf,
    /// A trusted publisher key (64 hex characters; repeatable).
    #[arg(long = "trust")]
    pub trust: Vec<String>,
    /// Take the trusted publishers from this node configuration.
    #[arg(long, short, env = "SLMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Also check every file of every variant that is present in this folder (size and BLAKE3).
    #[arg(long)]
    pub files: Option<PathBuf>,
}

#[derive(Args)]
pub struct InspectArgs {
    /// A signed manifest, or a TOML one.
    pub manifest: PathBuf,
    /// Print JSON instead of TOML.
    #[arg(long)]
    pub json: bool,
}

fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    if len > MAX_MESSAGE_BYTES as u64 {
        bail!("{} is {len} bytes, more than any manifest ({MAX_MESSAGE_BYTES} bytes at most)", path.display());
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn read_toml_manifest(path: &Path) -> Result<ModelManifest> {
    let bytes = read_limited(path)?;
    let text =
        std::str::from_utf8(&bytes).map_err(|_| anyhow!("{} is neither a signed manifest nor TOML", path.display()))?;
    toml::from_str(text).with_context(|| format!("{} is not a valid TOML manifest", path.display()))
}

pub fn run(cmd: ManifestCommand) -> Result<()> {
    match cmd {
        ManifestCommand::Create(args) => {
            let manifest = create(&args)?;
            let text = format!(
                "# slmesh model manifest, unsigned. Review, edit, then: slmesh manifest sign --key KEY FILE --out FILE.slm\n{}",
                toml::to_string_pretty(&manifest)?
            );
            if args.out.as_os_str() == "-" {
                print!("{text}");
            } else {
                std::fs::write(&args.out, text).with_context(|| format!("cannot write {}", args.out.display()))?;
                for v in &manifest.variants {
                    let w = v.weights().ok_or_else(|| anyhow!("variant without weights"))?;
                    eprintln!(
                        "variant {}: {} {} {} bytes blake3 {}",
                        v.id, v.architecture, v.quantization, w.size, w.blake3
                    );
                }
                eprintln!("wrote {}", args.out.display());
            }
            Ok(())
        }
        ManifestCommand::Sign(args) => {
            let manifest = read_toml_manifest(&args.manifest)?;
            manifest.validate().with_context(|| format!("{} cannot be signed", args.manifest.display()))?;
            let key = SecretKey::load(&args.key, KeyKind::Publisher)?;
            let signed = SignedManifest::sign(&manifest, &key)?;
            if args.out.exists() {
                bail!("{} already exists: remove it or choose another --out", args.out.display());
            }
            std::fs::write(&args.out, signed.to_bytes()?)
                .with_context(|| format!("cannot write {}", args.out.display()))?;
            println!(
                "signed {} version {} by {}: {}",
                manifest.name,
                manifest.version,
                key.public(),
                args.out.display()
            );
            Ok(())
        }
        ManifestCommand::Verify(args) => verify(args),
        ManifestCommand::Inspect(args) => inspect(args),
    }
}

fn verify(args: VerifyArgs) -> Result<()> {
    let mut trust = match &args.config {
        Some(c) => Config::load(c)?.trust_store()?,
        None => TrustStore::new(),
    };
    for (i, k) in args.trust.iter().enumerate() {
        let key: PublicKey = k.parse().map_err(|e| anyhow!("--trust {k:?}: {e}"))?;
        trust.add(format!("--trust {}", i + 1), key)?;
    }
    if trust.is_empty() {
        bail!("no trusted publisher keys: pass --trust HEX or --config FILE");
    }
    let bytes = read_limited(&args.manifest)?;
    let signed = SignedManifest::from_bytes(&bytes)
        .with_context(|| format!("{} is not a signed manifest", args.manifest.display()))?;
    let v = verify_signed_manifest(signed, &trust, |_| None)
        .with_context(|| format!("{} does not verify", args.manifest.display()))?;
    println!("ok: {} version {} signed by {} ({})", v.manifest.name, v.manifest.version, v.publisher_name, v.publisher);
    if let Some(dir) = &args.files {
        let mut checked = 0;
        for variant in &v.manifest.variants {
            for f in &variant.files {
                let path = dir.join(&f.name);
                if !path.exists() {
                    continue;
                }
                let (hash, size) = hash_file(&path)?;
                if size != f.size || hash != f.blake3 {
                    bail!(
                        "{} does not match the manifest (size {size} vs {}, blake3 {hash} vs {})",
                        path.display(),
                        f.size,
                        f.blake3
                    );
                }
                checked += 1;
            }
        }
        if checked == 0 {
            bail!("none of the manifest's files are in {}", dir.display());
        }
        println!("ok: {checked} file(s) in {} match", dir.display());
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct Inspected<'a> {
    signed_by: Option<String>,
    protocol_version: Option<u16>,
    signature: &'a str,
    manifest: &'a ModelManifest,
}

fn inspect(args: InspectArgs) -> Result<()> {
    let bytes = read_limited(&args.manifest)?;
    let (manifest, signer, version, signature) = match SignedManifest::from_bytes(&bytes) {
        Ok(signed) => {
            let status = match signed.verify_self_signed() {
                Ok(_) => "valid for the signer's key; run `slmesh manifest verify` to check that key is trusted",
                Err(_) => "INVALID",
            };
            let manifest = slmesh_protocol::wire::decode(&signed.body, "manifest body")
                .with_context(|| format!("{} has a damaged body", args.manifest.display()))?;
            (manifest, Some(signed.signer.to_string()), Some(signed.protocol_version), status)
        }
        Err(signed_err) => match read_toml_manifest(&args.manifest) {
            Ok(m) => (m, None, None, "none (unsigned TOML)"),
            Err(toml_err) => {
                bail!("{} is not a manifest: as signed: {signed_err}; as TOML: {toml_err:#}", args.manifest.display())
            }
        },
    };
    let out = Inspected { signed_by: signer, protocol_version: version, signature, manifest: &manifest };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", toml::to_string_pretty(&out)?);
    }
    Ok(())
}
