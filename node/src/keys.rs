//! Keys and enrollment: `slmesh keygen`, `slmesh publisher keygen`, `slmesh enroll`.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use slmesh_protocol::identity::{KeyKind, NodeId, PeerId, PublicKey, SecretKey};
use slmesh_protocol::trust::{parse_tag, Enrollment};
use std::path::PathBuf;

#[derive(Args)]
pub struct KeygenArgs {
    /// The node's configuration; the key goes to <data_dir>/node.key.
    #[arg(long, short, default_value = "slmesh.toml", env = "SLMESH_CONFIG")]
    pub config: PathBuf,
    /// Write the key here instead of into the configured data folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn keygen(args: KeygenArgs) -> Result<()> {
    let (path, cert_path) = match args.out {
        Some(p) => (p, None),
        None => {
            let config = Config::load(&args.config)?;
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("cannot create data folder {}", config.data_dir.display()))?;
            (config.key_path(), Some(config.certificate_path()))
        }
    };
    let key = SecretKey::generate(KeyKind::Node);
    key.save(&path)?;
    print_node_ids(&key.public())?;
    println!("key:         {}", path.display());
    println!("next: have an operator enroll this node id (slmesh enroll --node {} ...)", key.public());
    if let Some(cert) = cert_path {
        println!("      and put the certificate at {}", cert.display());
    }
    Ok(())
}

fn print_node_ids(id: &NodeId) -> Result<()> {
    println!("node id:     {id}");
    println!("peer id:     {}", id.peer_id()?);
    println!("endpoint id: {}", id.endpoint_id()?);
    Ok(())
}

#[derive(Subcommand)]
pub enum PublisherCommand {
    /// Create a publisher key. Keep the secret file offline; give the public key to nodes.
    Keygen {
        /// Where to write the secret key (mode 0600). The public key goes to <out>.pub.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn publisher(cmd: PublisherCommand) -> Result<()> {
    match cmd {
        PublisherCommand::Keygen { out } => {
            let key = SecretKey::generate(KeyKind::Publisher);
            key.save(&out)?;
            let pub_path = PathBuf::from(format!("{}.pub", out.display()));
            std::fs::write(&pub_path, format!("{}\n", key.public()))
                .with_context(|| format!("cannot write {}", pub_path.display()))?;
            println!("publisher key: {}", key.public());
            println!("secret:        {}", out.display());
            println!("public:        {}", pub_path.display());
            println!("nodes trust it with: slmesh init --trust name={}", key.public());
            Ok(())
        }
    }
}

#[derive(Args)]
pub struct EnrollArgs {
    /// The operator's publisher secret key.
    #[arg(long)]
    pub publisher_key: PathBuf,
    /// The node to admit: its node id (64 hex characters) or its libp2p peer id.
    #[arg(long)]
    pub node: String,
    /// A tag of the node, as key=value (repeatable). Must match the node's config.
    #[arg(long = "tag", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// How long the certificate is valid.
    #[arg(long, default_value_t = 365)]
    pub valid_days: u64,
    /// The fleet the node joins: it admits only peers of this fleet and takes only
    /// manifests, commands and revocations addressed to it. Give each fleet that shares
    /// a publisher key (staging, production) its own.
    #[arg(long, default_value = slmesh_protocol::trust::DEFAULT_FLEET)]
    pub fleet: String,
    /// Where to write the certificate (copy it to the node's data folder as node.cert).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn parse_node_id(s: &str) -> Result<NodeId> {
    if let Ok(id) = s.parse::<PublicKey>() {
        return Ok(id);
    }
    match s.parse::<PeerId>() {
        Ok(peer) => Ok(PublicKey::from_peer_id(&peer)?),
        Err(_) => bail!("{s:?} is neither a node id (64 hex characters) nor a libp2p peer id"),
    }
}

pub fn unix_now() -> Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock is before 1970")?
        .as_secs())
}

pub fn enroll(args: EnrollArgs) -> Result<()> {
    let operator = SecretKey::load(&args.publisher_key, KeyKind::Publisher)?;
    let node = parse_node_id(&args.node)?;
    if args.valid_days == 0 {
        bail!("--valid-days must be at least 1");
    }
    let issued_at = unix_now()?;
    let enrollment = Enrollment {
        node,
        tags: args.tags.into_iter().collect(),
        issued_at,
        expires_at: issued_at.saturating_add(args.valid_days.saturating_mul(86_400)),
        fleet: args.fleet.clone(),
    };
    let cert = enrollment.sign(&operator)?;
    if args.out.exists() {
        bail!("{} already exists: remove it or choose another --out", args.out.display());
    }
    std::fs::write(&args.out, cert.to_bytes()?).with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("enrolled node {} in fleet {:?} with tags {:?}", node, enrollment.fleet, enrollment.tags);
    println!("valid for {} days; certificate: {}", args.valid_days, args.out.display());
    Ok(())
}
