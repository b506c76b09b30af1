//! `slmesh serve --model FILE`: one machine, one model, the OpenAI-compatible API.

use anyhow::{Context, Result};
use clap::Args;
use slmesh_inference::http::{self, HttpLimits, HttpState};
use slmesh_inference::{Engine, LoadOptions, ModelSpec};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// The GGUF file to serve (architectures: llama, phi2, phi3, starcoder2, qwen2, qwen3, qwen3moe).
    #[arg(long)]
    pub model: PathBuf,
    /// The model name clients use; default: the file name without extension, lowercased.
    #[arg(long)]
    pub name: Option<String>,
    /// The version number to report.
    #[arg(long, default_value_t = 1)]
    pub model_version: u64,
    /// Address of the HTTP API (port 0 picks a free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_bind: String,
    /// Require `Authorization: Bearer <token>`.
    #[arg(long, env = "SLMESH_BEARER_TOKEN")]
    pub bearer_token: Option<String>,
    /// A host name to answer for besides IP addresses and localhost (repeatable): other
    /// `Host` headers are refused, so that a web page cannot reach the node by DNS
    /// rebinding.
    #[arg(long = "allow-host")]
    pub allow_hosts: Vec<String>,
    /// Requests generating at once (default: 4 on a machine with 8 GiB of memory or more,
    /// else 2). Each holds an attention cache while it runs (up to 180 MiB for the demo
    /// model at 4,096 tokens), so this bounds memory as much as CPU; more wait their turn.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent: Option<u16>,
    /// Requests waiting for a turn before new ones get 429.
    #[arg(long, default_value_t = HttpLimits::default().max_waiting)]
    pub max_waiting: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = HttpLimits::default().max_tokens_cap)]
    pub max_tokens_cap: u32,
    /// Seconds before a request is answered 504.
    #[arg(long, default_value_t = HttpLimits::default().request_timeout.as_secs())]
    pub request_timeout_secs: u64,
}

fn default_name(path: &std::path::Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    stem.chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c.to_ascii_lowercase() } else { '-' })
        .collect()
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}

pub fn run(args: ServeArgs, options: LoadOptions) -> Result<()> {
    crate::init_logging(false);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(serve(args, options))
}

async fn serve(args: ServeArgs, options: LoadOptions) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.http_bind)
        .await
        .with_context(|| format!("cannot listen on {} (in use? pass --http-bind)", args.http_bind))?;
    let addr = listener.local_addr()?;
    let name = args.name.clone().unwrap_or_else(|| default_name(&args.model));
    let engine = Arc::new(Engine::with_options(options));
    eprintln!("loading {} ...", args.model.display());
    engine
        .activate(ModelSpec { name: name.clone(), version: args.model_version, gguf: args.model.clone() })
        .await
        .context("the model cannot be served")?;
    let limits = HttpLimits {
        max_concurrent: args
            .max_concurrent
            .map_or_else(|| http::default_max_concurrent(crate::machine::total_ram_bytes()), usize::from),
        max_waiting: args.max_waiting,
        max_tokens_cap: args.max_tokens_cap,
        default_max_tokens: HttpLimits::default().default_max_tokens.min(args.max_tokens_cap),
        request_timeout: Duration::from_secs(args.request_timeout_secs),
        ..HttpLimits::default()
    };
    println!("serving {name}@{} on http://{addr}", args.model_version);
    let hosts = http::HostPolicy { allowed_hosts: args.allow_hosts };
    http::serve(listener, HttpState::new(engine, limits, args.bearer_token), hosts, shutdown_signal()).await?;
    eprintln!("stopped");
    Ok(())
}
