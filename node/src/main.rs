//! `slmesh`: one binary for every node of the mesh and for its operators.

mod client;
mod config;
mod daemon;
mod eval_cmd;
mod follow;
mod kernels;
mod keys;
mod machine;
mod manifest_cmd;
mod model_cmd;
mod serve;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "slmesh",
    version,
    about = "Serve small language models on a fleet of edge machines, with no central server.",
    long_about = "Serve small language models on a fleet of edge machines, with no central server.\n\n\
        Operators create a publisher key, enroll nodes, and publish signed model manifests; \
        nodes gossip the manifests, fetch the weights from each other and serve them locally.\n\n\
        First steps on a node:\n  slmesh init --tag site=berlin\n  slmesh keygen\n\
        and on the operator's machine:\n  slmesh publisher keygen --out ops.key\n  \
        slmesh enroll --publisher-key ops.key --node <node id> --tag site=berlin --out node.cert"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads the inference engine computes on (default: every CPU). On a machine that
    /// runs other work too, fewer can be faster: the engine splits each matrix product
    /// across all its threads and waits for the slowest, so one thread that shares its
    /// core stalls the others (measured in BENCHMARKS.md, "Inference threads").
    #[arg(long, global = true, env = "SLMESH_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Finished conversations whose attention cache the engine keeps, so that a request
    /// that starts the same way (a shared system prompt, a conversation's earlier turns)
    /// skips that part of its prompt; 0 turns it off. Each costs memory in proportion to
    /// its length (about 10 MiB for a short conversation with the demo model); without
    /// it, such prompts take several times longer (BENCHMARKS.md, "Memory over many
    /// conversations").
    #[arg(long, global = true, env = "SLMESH_PREFIX_CACHE", default_value_t = slmesh_inference::DEFAULT_PREFIX_CACHE as u16)]
    prefix_cache: u16,
    /// Tokens of context (prompt and answer together) a conversation may take at most;
    /// 0: as many as the GGUF file allows (often 8,192 or more). Each request running and
    /// each conversation the prefix cache keeps holds an attention cache that grows with
    /// its length up to this: 45 KiB a token for the demo model, 180 MiB at 4,096. A
    /// longer prompt gets a 400; an answer that reaches it ends ("length").
    #[arg(long, global = true, env = "SLMESH_CONTEXT_LENGTH", default_value_t = slmesh_inference::DEFAULT_CONTEXT_LENGTH as u32)]
    context_length: u32,
}

#[derive(Subcommand)]
enum Command {
    /// Write a documented node configuration file with sensible defaults.
    Init(config_cmd::InitArgs),
    /// Create this node's identity key (ed25519; its libp2p PeerId and iroh EndpointId).
    Keygen(keys::KeygenArgs),
    /// Publisher (operator) keys, which sign manifests and certificates.
    #[command(subcommand)]
    Publisher(keys::PublisherCommand),
    /// Sign an enrollment certificate that admits a node to the fleet (operator).
    Enroll(keys::EnrollArgs),
    /// Create, sign, verify and inspect model manifests.
    #[command(subcommand)]
    Manifest(manifest_cmd::ManifestCommand),
    /// Work on GGUF files before publishing them: derive variants for this engine.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Serve one local GGUF file over the OpenAI-compatible API (a single machine, no mesh).
    Serve(serve::ServeArgs),
    /// Run an evaluation suite (prompts with checks on the answers) on a GGUF file here,
    /// before publishing it: a readable report, exit 1 below the pass rate.
    #[command(long_about = eval_cmd::SUITE_FORMAT)]
    Eval(eval_cmd::EvalArgs),
    /// Run this machine's node: join the mesh, fetch and serve the models it is given.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Publish a signed manifest through a running node: its files go into the node's
    /// blob store and the manifest is gossiped to the mesh.
    Publish(client::PublishArgs),
    /// Show a running node's id, peers (RTT, site), models and fetches in progress.
    Status(client::StatusArgs),
    /// Print the address of a running node's dashboard (a page in the browser: fleet,
    /// rollouts with their gates, peers, fetches, events), with its API token in the
    /// address's fragment, which the browser keeps to itself.
    Dashboard(client::DashboardArgs),
    /// Per model version across the fleet: nodes active, requests, error rate, latency,
    /// time to first token, tokens/s (from the signed metrics records nodes gossip).
    Fleet(client::FleetArgs),
    /// Staged rollouts: status, and signed operator commands (pause, resume, promote,
    /// abort, rollback).
    #[command(subcommand)]
    Rollout(client::RolloutCommandArgs),
    /// Revoke a node's enrollment fleet-wide (a stolen key, a retired machine): signed
    /// with a publisher key and given to a running node, which gossips it. Every node that
    /// holds it drops the revoked node, keeps it out after restarts, and counts nothing it
    /// reports. There is no undo: enroll the machine again with a new node key.
    Revoke(client::RevokeArgs),
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Start the node from its config and run until SIGINT or SIGTERM.
    Run(daemon::RunArgs),
}

/// Logs go to stderr: text by default, JSON lines with `--log-json`. `RUST_LOG` filters.
pub(crate) fn init_logging(json: bool) {
    let filter =
        // Kademlia warns about every bootstrap attempt before the first peer is known.
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,libp2p_kad=error,mistralrs_core=error,slmesh=info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi).with_env_filter(filter);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// iroh brings rustls with ring, libp2p-tls with aws-lc-rs: with both in the binary,
/// rustls has no process default, and any library asking for one would panic. Ring it is.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

mod config_cmd {
    use super::*;
    use crate::config::{Config, TrustedPublisher};
    use anyhow::{bail, Context};
    use slmesh_protocol::trust::parse_tag;

    #[derive(clap::Args)]
    pub struct InitArgs {
        /// Where to write the configuration.
        #[arg(long, short, default_value = "slmesh.toml", env = "SLMESH_CONFIG")]
        pub config: PathBuf,
        /// Data folder, relative to the config file's folder.
        #[arg(long, default_value = "slmesh-data")]
        pub data_dir: PathBuf,
        /// A tag of this node, as key=value (repeatable): e.g. --tag site=berlin --tag class=gateway.
        #[arg(long = "tag", value_parser = parse_tag)]
        pub tags: Vec<(String, String)>,
        /// A trusted publisher key, as name=HEX or HEX (repeatable).
        #[arg(long = "trust")]
        pub trust: Vec<String>,
        /// Address of the HTTP API.
        #[arg(long, default_value = "127.0.0.1:8080")]
        pub http_bind: String,
        /// The token every API request must carry (`Authorization: Bearer <token>`; an
        /// OpenAI client's API key). Default: a fresh random one, written to the config.
        #[arg(long)]
        pub bearer_token: Option<String>,
        /// libp2p listen addresses (repeatable); default TCP and QUIC on port 4001.
        #[arg(long = "listen")]
        pub listen: Vec<String>,
        /// A bootstrap peer's libp2p address (repeatable).
        #[arg(long = "bootstrap")]
        pub bootstrap: Vec<String>,
        /// UDP address of the iroh blob endpoint.
        #[arg(long)]
        pub blobs_bind: Option<String>,
        /// Turn mDNS discovery off.
        #[arg(long)]
        pub no_mdns: bool,
        /// After publishing, serve a file only while fewer than this many peers hold it (0: always).
        #[arg(long)]
        pub origin_copies: Option<usize>,
        /// Transfers of one model file served at a time; up to 4 more requests wait for a
        /// slot, at most 2 s (0: upload nothing).
        #[arg(long)]
        pub upload_slots_per_blob: Option<usize>,
        /// Uploads of a model file start one at a time: another starts beside a running
        /// one only once that has run this many milliseconds (a slow fetcher), up to the
        /// slots (default 250; 0: all the slots at once).
        #[arg(long)]
        pub upload_stalled_after_ms: Option<u64>,
        /// Cap on upload bandwidth to peers, bytes per second.
        #[arg(long)]
        pub max_upload_bytes_per_sec: Option<u64>,
        /// Seconds between this node's metrics records.
        #[arg(long)]
        pub metrics_interval_secs: Option<u64>,
        /// Seconds a refused peer (no valid certificate) stays blocked before it may try
        /// again (default 600).
        #[arg(long)]
        pub refusal_cooldown_secs: Option<u64>,
        /// Replace an existing configuration file.
        #[arg(long)]
        pub force: bool,
    }

    pub fn init(args: InitArgs) -> Result<()> {
        if args.config.exists() && !args.force {
            bail!("{} already exists: pass --force to replace it", args.config.display());
        }
        let mut config = Config::new(args.data_dir);
        config.tags = args.tags.into_iter().collect();
        for (i, t) in args.trust.iter().enumerate() {
            let (name, key) = match t.split_once('=') {
                Some((n, k)) => (n.to_string(), k.to_string()),
                None => (format!("publisher-{}", i + 1), t.clone()),
            };
            config.trust.publishers.push(TrustedPublisher { name, key });
        }
        config.http.bind = args.http_bind;
        config.http.bearer_token = Some(args.bearer_token.unwrap_or_else(crate::config::new_api_token));
        if !args.listen.is_empty() {
            config.network.listen = args.listen;
        }
        config.network.bootstrap = args.bootstrap;
        if let Some(b) = args.blobs_bind {
            config.network.blobs_bind = b;
        }
        config.network.mdns = !args.no_mdns;
        if let Some(n) = args.origin_copies {
            config.network.origin_copies = n;
        }
        if let Some(n) = args.upload_slots_per_blob {
            config.network.upload_slots_per_blob = n;
        }
        if let Some(ms) = args.upload_stalled_after_ms {
            config.network.upload_stalled_after_ms = ms;
        }
        config.network.max_upload_bytes_per_sec = args.max_upload_bytes_per_sec;
        if let Some(n) = args.metrics_interval_secs {
            config.fleet.metrics_interval_secs = n.max(1);
        }
        if let Some(n) = args.refusal_cooldown_secs {
            config.network.refusal_cooldown_secs = n;
        }
        config.validate()?;
        let text = config.to_documented_toml()?;
        if let Some(parent) = args.config.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        super::write_private(&args.config, &text).with_context(|| format!("cannot write {}", args.config.display()))?;
        println!("wrote {}", args.config.display());
        if config.trust.publishers.is_empty() {
            println!("note: no trusted publisher yet; add one under [trust] before the node can accept manifests");
        }
        println!("next: slmesh keygen --config {}", args.config.display());
        Ok(())
    }
}

/// Writes a file only its owner may read or write (a config may hold the API's bearer
/// token), whatever the umask.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    #[cfg(unix)]
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

fn run(cli: Cli) -> Result<()> {
    let engine = slmesh_inference::LoadOptions {
        prefix_cache: cli.prefix_cache.into(),
        context_length: (cli.context_length > 0).then_some(cli.context_length as usize),
    };
    match cli.command {
        Command::Init(a) => config_cmd::init(a),
        Command::Keygen(a) => keys::keygen(a),
        Command::Publisher(c) => keys::publisher(c),
        Command::Enroll(a) => keys::enroll(a),
        Command::Manifest(c) => manifest_cmd::run(c),
        Command::Model(c) => model_cmd::run(c),
        Command::Serve(a) => serve::run(a, engine),
        Command::Eval(a) => eval_cmd::run(a, engine),
        Command::Node(NodeCommand::Run(a)) => daemon::run(a, engine),
        Command::Publish(a) => client::publish(a),
        Command::Status(a) => client::status(a),
        Command::Dashboard(a) => client::dashboard(a),
        Command::Fleet(a) => client::fleet(a),
        Command::Rollout(c) => client::rollout(c),
        Command::Revoke(a) => client::revoke(a),
    }
}

fn main() -> ExitCode {
    // Library backtraces (std's `Backtrace::capture`, which candle and anyhow call for the
    // errors they make) follow RUST_BACKTRACE unless RUST_LIB_BACKTRACE says otherwise:
    // with RUST_BACKTRACE=1, a node serving the demo model held 813 MiB instead of 331 MiB
    // (symbolised backtraces of errors mistral.rs makes and drops while loading). Panics
    // keep their backtraces. Set while the process has one thread.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    // candle and rayon read RAYON_NUM_THREADS (rayon once, when its pool starts): set
    // while the process has one thread, before any of them runs.
    if let Some(n) = cli.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
