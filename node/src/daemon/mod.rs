//! `slmesh node run`: the long-running node. One tokio runtime drives the libp2p mesh,
//! the iroh blob endpoint, the inference engine and the HTTP API; every decision goes
//! through the protocol core (admission, manifest verification, variant choice, provider
//! ranking, what to activate).

mod api;
mod control;
mod core;
mod dashboard;
mod fetch;
mod gate;
mod metrics;
pub mod status;

use crate::config::Config;
use anyhow::{bail, Context, Result};
use clap::Args;
use slmesh_blobs::{BlobConfig, BlobNode};
use slmesh_inference::http::{HttpLimits, HttpState};
use slmesh_inference::{Engine, LoadOptions};
use slmesh_protocol::identity::KeyKind;
use slmesh_protocol::mesh::{UploadPolicy, TOPIC_COMMANDS, TOPIC_MANIFESTS, TOPIC_METRICS, TOPIC_REVOCATIONS};
use slmesh_protocol::trust::verify_certificate;
use slmesh_protocol::{EnrollmentCertificate, SecretKey};
use slmesh_store::Store;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct RunArgs {
    /// The node's configuration (written by `slmesh init`).
    #[arg(long, short, default_value = "slmesh.toml", env = "SLMESH_CONFIG")]
    pub config: PathBuf,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
}

pub fn run(args: RunArgs, options: LoadOptions) -> Result<()> {
    crate::init_logging(args.log_json);
    crate::install_crypto_provider();
    let config = Config::load(&args.config)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(run_node(config, options))
}

/// Everything a started node holds; `core::Driver` drives it.
pub(crate) struct Parts {
    pub config: Config,
    pub secret: SecretKey,
    pub certificate: EnrollmentCertificate,
    pub store: Arc<Store>,
    pub blobs: Arc<BlobNode>,
    pub engine: Arc<Engine>,
    pub http: Arc<HttpState>,
    pub gate: Arc<gate::GateState>,
    /// This machine's memory, read once at start.
    pub ram_bytes: u64,
}

async fn run_node(config: Config, options: LoadOptions) -> Result<()> {
    let secret = SecretKey::load(&config.key_path(), KeyKind::Node)
        .with_context(|| format!("no node key (create one with `slmesh keygen`): {}", config.key_path().display()))?;
    let trust = config.trust_store()?;
    if trust.is_empty() {
        bail!("no trusted publisher in the config: add one under [trust] (see `slmesh init --help`)");
    }
    let cert_path = config.certificate_path();
    let cert_bytes = std::fs::read(&cert_path).with_context(|| {
        format!(
            "cannot read this node's enrollment certificate {} (an operator makes one with `slmesh enroll`)",
            cert_path.display()
        )
    })?;
    let certificate = EnrollmentCertificate::from_bytes(&cert_bytes)
        .with_context(|| format!("{} is not an enrollment certificate", cert_path.display()))?;
    let enrollment = verify_certificate(&certificate, &trust, &secret.public(), core::unix_now())
        .with_context(|| format!("this node's certificate {} is not valid here", cert_path.display()))?;
    if enrollment.tags != config.tags {
        tracing::warn!(certified = ?enrollment.tags, configured = ?config.tags,
            "the certificate's tags differ from the config's; peers see the certified ones");
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let store = Arc::new(Store::open(&config.data_dir.join("state")).context("cannot open the state database")?);
    for (name, version) in &config.pins {
        store.set_pin(name, Some(*version))?;
    }
    let policy = UploadPolicy {
        slots_per_blob: config.network.upload_slots_per_blob,
        stalled_after_ms: config.network.upload_stalled_after_ms,
        origin_copies: config.network.origin_copies,
        ..UploadPolicy::default()
    };
    let gate = Arc::new(gate::GateState::new(policy));
    let blobs = BlobNode::start(BlobConfig {
        secret: secret.clone(),
        bind: config.network.blobs_bind.parse().context("network.blobs_bind")?,
        store_dir: config.data_dir.join("blobs"),
        max_upload_bytes_per_sec: config.network.max_upload_bytes_per_sec,
        gc_interval: Duration::from_secs(30),
        gate: gate.clone(),
    })
    .await?;
    let listen = config
        .network
        .listen
        .iter()
        .map(|a| a.parse().with_context(|| format!("network.listen: {a:?} is not a libp2p address")))
        .collect::<Result<Vec<_>>>()?;
    let bootstrap = config
        .network
        .bootstrap
        .iter()
        .map(|a| a.parse().with_context(|| format!("network.bootstrap: {a:?} is not a libp2p address")))
        .collect::<Result<Vec<_>>>()?;
    let (mesh, events) = slmesh_mesh::start(slmesh_mesh::MeshConfig {
        keypair: secret.libp2p_keypair(),
        listen,
        bootstrap,
        mdns: config.network.mdns,
        topics: [TOPIC_MANIFESTS, TOPIC_METRICS, TOPIC_COMMANDS, TOPIC_REVOCATIONS].map(String::from).to_vec(),
        refusal_cooldown: Duration::from_secs(config.network.refusal_cooldown_secs),
        discovery_interval: Duration::from_secs(10),
        wire_log: std::env::var_os("SLMESH_TEST_WIRE_LOG").map(std::path::PathBuf::from),
    })?;
    let http_listener = tokio::net::TcpListener::bind(&config.http.bind)
        .await
        .with_context(|| format!("cannot listen on {} (in use? change http.bind)", config.http.bind))?;
    let http_addr = http_listener.local_addr()?;
    let engine = Arc::new(Engine::with_options(options));
    let ram_bytes = crate::machine::total_ram_bytes();
    let limits = HttpLimits { fault_version: std::env::var("SLMESH_TEST_FAULT").ok(), ..config.http.limits(ram_bytes) };
    if let Some(f) = &limits.fault_version {
        tracing::warn!("SLMESH_TEST_FAULT: requests to {f} will fail (test-only fault injection)");
    }
    let token = api_token(&config)?;
    let http_state = HttpState::new(engine.clone(), limits, Some(token));
    let parts = Parts {
        config: config.clone(),
        secret,
        certificate,
        store,
        blobs: Arc::new(blobs),
        engine: engine.clone(),
        http: http_state.clone(),
        gate,
        ram_bytes,
    };
    let (node, control) = core::Driver::start(parts, trust, enrollment, mesh.clone()).await?;
    let fleet_metrics = control.clone();
    http_state.add_metrics(Box::new(move || fleet_metrics.fleet_metrics_text()));
    let router = api::router(control.clone(), http_state.clone())
        .merge(dashboard::router())
        .merge(slmesh_inference::http::router(http_state));
    let (stop_http_tx, stop_http_rx) = tokio::sync::oneshot::channel::<()>();
    let hosts = slmesh_inference::http::HostPolicy { allowed_hosts: config.http.allowed_hosts.clone() };
    let http = tokio::spawn(slmesh_inference::http::serve_router(http_listener, router, hosts, async move {
        let _ = stop_http_rx.await;
    }));
    tracing::info!(node = %control.me(), http = %http_addr, "node started");
    tracing::info!("dashboard at http://{http_addr}/ (`slmesh dashboard` prints the address with the API token)");
    println!("node {} serving http://{http_addr}", control.me());
    let blobs = node.run(events, crate::serve::shutdown_signal()).await?;
    // Requests in flight finish; then the mesh and blob endpoint close and the store flushes.
    let _ = stop_http_tx.send(());
    if let Ok(Err(e)) = http.await {
        tracing::warn!("http server: {e}");
    }
    mesh.shutdown().await;
    // Not only when this is the last handle (fetch jobs and the API hold one too): a
    // store that is not shut down loses what it wrote last (a blob fetched just before a
    // stop came back incomplete, and the node could no longer serve it).
    blobs.shutdown().await;
    eprintln!("stopped");
    Ok(())
}

/// The token every API request must carry: the config's, else the one this node made
/// in its data folder the first time it ran without one (readable by its owner only).
fn api_token(config: &Config) -> Result<String> {
    if let Some(token) = config.api_token()? {
        return Ok(token);
    }
    let path = config.api_token_path();
    let token = crate::config::new_api_token();
    crate::write_private(&path, &format!("{token}\n")).with_context(|| format!("cannot write {}", path.display()))?;
    tracing::info!(path = %path.display(), "made an API bearer token (http.bearer_token sets one in the config)");
    Ok(token)
}
