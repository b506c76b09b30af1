//! Operator commands that talk to a running node over its HTTP API: `slmesh status` and
//! `slmesh publish`.

use crate::config::Config;
use crate::daemon::status::NodeStatus;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct NodeAddrArgs {
    /// The node's configuration; its http.bind says where the node listens.
    #[arg(long, short, default_value = "slmesh.toml", env = "SLMESH_CONFIG")]
    pub config: PathBuf,
    /// The node's HTTP address instead (e.g. 127.0.0.1:8080).
    #[arg(long)]
    pub node: Option<String>,
    /// The node's API token (default: the config's http.bearer_token, else the one the
    /// node made in its data folder, data_dir/api-token).
    #[arg(long, env = "SLMESH_BEARER_TOKEN", hide_env_values = true)]
    pub bearer_token: Option<String>,
}

impl NodeAddrArgs {
    fn resolve(&self) -> Result<(String, Option<String>)> {
        if let Some(addr) = &self.node {
            // Another node's address: its token comes from the flag, or from the config
            // when there is one (the node may be this machine's, on another address).
            let token = match &self.bearer_token {
                Some(t) => Some(t.clone()),
                None => Config::load(&self.config).ok().and_then(|c| c.api_token().ok().flatten()),
            };
            return Ok((addr.clone(), token));
        }
        let config = Config::load(&self.config)?;
        let mut addr = config.http.bind.clone();
        // A node bound to every interface is reached on loopback from its own machine.
        if let Some(port) = addr.strip_prefix("0.0.0.0:") {
            addr = format!("127.0.0.1:{port}");
        }
        let token = match &self.bearer_token {
            Some(t) => Some(t.clone()),
            None => config.api_token()?,
        };
        Ok((addr, token))
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).timeout(Duration::from_secs(600)).build()
}

fn call(req: ureq::Request, token: &Option<String>, body: Option<serde_json::Value>) -> Result<serde_json::Value> {
    let url = req.url().to_string();
    let req = match token {
        Some(t) => req.set("Authorization", &format!("Bearer {t}")),
        None => req,
    };
    let result = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match result {
        Ok(resp) => resp.into_json().with_context(|| format!("{url} did not answer JSON")),
        Err(ureq::Error::Status(code, resp)) => {
            let body: serde_json::Value = resp.into_json().unwrap_or_default();
            let message = body["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| body.to_string());
            if code == 401 {
                bail!(
                    "the node answered 401: {message} (give its API token with --bearer-token or \
                     SLMESH_BEARER_TOKEN; it is the config's http.bearer_token, or data_dir/api-token)"
                )
            }
            bail!("the node answered {code}: {message}")
        }
        Err(e) => Err(anyhow!("cannot reach the node at {url}: {e} (is `slmesh node run` running?)")),
    }
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub node: NodeAddrArgs,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print it again every SECS seconds (2 if not given) until interrupted; a node that
    /// does not answer is said so, and asked again.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<u64>,
}

fn status_text(addr: &str, token: &Option<String>, json: bool) -> Result<String> {
    let value = get(addr, token, "/v1/status")?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&value)?));
    }
    let status: NodeStatus = serde_json::from_value(value).context("unexpected status from the node")?;
    Ok(status.to_text())
}

#[derive(Args)]
pub struct DashboardArgs {
    #[command(flatten)]
    pub node: NodeAddrArgs,
}

/// The dashboard's address; the token after `#` is not sent to the node, the page reads
/// it and keeps it for its tab.
pub fn dashboard(args: DashboardArgs) -> Result<()> {
    let (addr, token) = args.node.resolve()?;
    match token {
        Some(t) => println!("http://{addr}/#token={t}"),
        None => println!("http://{addr}/"),
    }
    Ok(())
}

pub fn status(args: StatusArgs) -> Result<()> {
    let (addr, token) = args.node.resolve()?;
    let Some(every) = args.watch else {
        print!("{}", status_text(&addr, &token, args.json)?);
        return Ok(());
    };
    use std::io::{IsTerminal, Write};
    let every = Duration::from_secs(every.max(1));
    loop {
        let text = status_text(&addr, &token, args.json).unwrap_or_else(|e| format!("{e:#}\n"));
        let mut out = std::io::stdout().lock();
        if out.is_terminal() {
            // Clear the screen and go home: the status replaces the last one.
            write!(out, "\x1b[2J\x1b[H")?;
        }
        let when = httpdate::fmt_http_date(std::time::SystemTime::now());
        write!(out, "{addr} at {when} (every {} s; Ctrl-C stops)\n{text}\n", every.as_secs())?;
        out.flush()?;
        drop(out);
        std::thread::sleep(every);
    }
}

#[derive(Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub node: NodeAddrArgs,
    /// The signed manifest (`slmesh manifest sign` writes it).
    #[arg(long)]
    pub manifest: PathBuf,
    /// Folder holding the files the manifest names (default: the manifest's folder).
    #[arg(long)]
    pub files: Option<PathBuf>,
    /// Then follow the rollout, as this node sees it, with progress bars (waves open,
    /// the gates' verdict, the soak left; per wave, nodes serving the version and nodes
    /// holding it staged, estimated from the metrics panels and exact up to 16 nodes per
    /// version; bytes this node uploaded) until it completes (every wave open and the
    /// last one soaked), halts, or --timeout passes. Exit code: 0 completed, 2 halted,
    /// 3 timed out, 1 an error.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait follows the rollout: 600, 90s, 30m, 2h.
    #[arg(long, default_value = "1h", requires = "wait", value_parser = crate::manifest_cmd::parse_duration_secs)]
    pub timeout: u64,
}

pub fn publish(args: PublishArgs) -> Result<()> {
    let (addr, token) = args.node.resolve()?;
    let bytes = std::fs::read(&args.manifest).with_context(|| format!("cannot read {}", args.manifest.display()))?;
    let dir = match &args.files {
        Some(d) => d.clone(),
        None => match args.manifest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
    };
    let dir = std::fs::canonicalize(&dir).with_context(|| format!("no folder {}", dir.display()))?;
    // What --wait follows: read from the manifest itself (the node checks its signature).
    let manifest = slmesh_protocol::manifest::SignedManifest::from_bytes(&bytes)
        .and_then(|m| m.verify_self_signed())
        .with_context(|| format!("{} is not a signed manifest", args.manifest.display()))?;
    let body = serde_json::json!({ "manifest_hex": hex::encode(&bytes), "files_dir": dir });
    let answer = call(agent().post(&format!("http://{addr}/v1/publish")), &token, Some(body))?;
    println!("{}", answer["message"].as_str().unwrap_or("published"));
    if !args.wait {
        return Ok(());
    }
    let timeout = Duration::from_secs(args.timeout);
    let ending = crate::follow::follow(&addr, &token, &manifest.name, manifest.version, &manifest.rollout, timeout)?;
    if ending != crate::follow::Ending::Completed {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(ending.code());
    }
    Ok(())
}

/// `GET path` on the node's API.
pub(crate) fn get(addr: &str, token: &Option<String>, path: &str) -> Result<serde_json::Value> {
    call(agent().get(&format!("http://{addr}{path}")), token, None)
}

#[derive(Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub node: NodeAddrArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `slmesh fleet`: per version across the fleet, as this node sees it.
pub fn fleet(args: FleetArgs) -> Result<()> {
    let (addr, token) = args.node.resolve()?;
    let value = get(&addr, &token, "/v1/fleet")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let versions: Vec<crate::daemon::status::FleetVersionView> =
        serde_json::from_value(value["versions"].clone()).context("unexpected fleet view from the node")?;
    print!("{}", crate::daemon::status::fleet_text(&versions));
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum RolloutCommandArgs {
    /// Show each rollout this node takes part in: waves open, gate verdict, its decision.
    Status {
        #[command(flatten)]
        node: NodeAddrArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show what this node decided about rollouts, oldest first: waves opened, gate
    /// verdicts with their figures, halts, activations, rollbacks, load failures and
    /// operators' commands with their signer. The node keeps its newest 2,000 events
    /// across restarts.
    History {
        #[command(flatten)]
        node: NodeAddrArgs,
        /// Only this model's events.
        #[arg(long)]
        model: Option<String>,
        /// Only this version's events (with --model).
        #[arg(long = "model-version", requires = "model")]
        version: Option<u64>,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Open no further wave of a rollout.
    Pause(OperatorArgs),
    /// Let a paused rollout continue.
    Resume(OperatorArgs),
    /// Skip the rest of the current wave's soak time.
    Promote(OperatorArgs),
    /// Stop a rollout: every node that activated the version rolls back to its previous one.
    Abort(OperatorArgs),
    /// Stop a rollout and send every node to an older version: `--to N` (default: each
    /// node's previous version, like abort). The version's files must still be on the node.
    Rollback {
        #[command(flatten)]
        args: OperatorArgs,
        /// The version to go back to.
        #[arg(long)]
        to: Option<u64>,
    },
}

#[derive(Args)]
pub struct OperatorArgs {
    #[command(flatten)]
    pub node: NodeAddrArgs,
    /// A trusted publisher key, which signs the command.
    #[arg(long)]
    pub publisher_key: PathBuf,
    #[arg(long)]
    pub model: String,
    /// The version being rolled out.
    #[arg(long = "model-version")]
    pub version: u64,
    /// The fleet the command is for (default: the node's, from its status).
    #[arg(long)]
    pub fleet: Option<String>,
}

pub fn rollout(cmd: RolloutCommandArgs) -> Result<()> {
    use slmesh_protocol::fleet::{CommandAction, RolloutCommand, SignedCommand};
    let (args, action) = match cmd {
        RolloutCommandArgs::Status { node, json } => {
            let (addr, token) = node.resolve()?;
            let value = get(&addr, &token, "/v1/rollouts")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let rollouts: Vec<crate::daemon::status::RolloutView> =
                    serde_json::from_value(value["rollouts"].clone()).context("unexpected rollouts from the node")?;
                print!("{}", crate::daemon::status::rollouts_text(&rollouts));
            }
            return Ok(());
        }
        RolloutCommandArgs::History { node, model, version, limit, json } => {
            let (addr, token) = node.resolve()?;
            let mut request = agent().get(&format!("http://{addr}/v1/events")).query("limit", &limit.to_string());
            if let Some(m) = &model {
                request = request.query("model", m);
            }
            if let Some(v) = version {
                request = request.query("version", &v.to_string());
            }
            let value = call(request, &token, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let events: Vec<slmesh_protocol::history::HistoryEvent> =
                    serde_json::from_value(value["events"].clone()).context("unexpected events from the node")?;
                print!("{}", crate::daemon::status::history_text(&events));
            }
            return Ok(());
        }
        RolloutCommandArgs::Pause(a) => (a, CommandAction::Pause),
        RolloutCommandArgs::Resume(a) => (a, CommandAction::Resume),
        RolloutCommandArgs::Promote(a) => (a, CommandAction::Promote),
        RolloutCommandArgs::Abort(a) | RolloutCommandArgs::Rollback { args: a, to: None } => (a, CommandAction::Abort),
        RolloutCommandArgs::Rollback { args, to: Some(to) } => (args, CommandAction::RollBackTo { to }),
    };
    let op = Operator::new(&args.publisher_key, &args.node, args.fleet)?;
    let command =
        RolloutCommand { model: args.model, version: args.version, action, issued_at: op.now, fleet: op.fleet.clone() };
    let signed = SignedCommand::sign(&command, &op.key)?;
    op.send("/v1/rollouts/command", "command_hex", signed.to_bytes()?)
}

/// What an operator's signed order needs: the publisher key, the node to give it to, the
/// fleet it is for (the node's unless given) and the time.
struct Operator {
    key: slmesh_protocol::SecretKey,
    addr: String,
    token: Option<String>,
    fleet: String,
    now: u64,
}

impl Operator {
    fn new(publisher_key: &std::path::Path, node: &NodeAddrArgs, fleet: Option<String>) -> Result<Self> {
        let key = slmesh_protocol::SecretKey::load(publisher_key, slmesh_protocol::KeyKind::Publisher)
            .with_context(|| format!("cannot load publisher key {}", publisher_key.display()))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let (addr, token) = node.resolve()?;
        let fleet = fleet_or_the_nodes(fleet, &addr, &token)?;
        Ok(Operator { key, addr, token, fleet, now })
    }

    /// Posts the signed bytes as `{field: hex}` and prints the node's answer.
    fn send(&self, path: &str, field: &str, signed: Vec<u8>) -> Result<()> {
        let body = serde_json::json!({ field: hex::encode(signed) });
        let answer = call(agent().post(&format!("http://{}{path}", self.addr)), &self.token, Some(body))?;
        println!("{}", answer["message"].as_str().unwrap_or("accepted"));
        Ok(())
    }
}

#[derive(Args)]
pub struct RevokeArgs {
    /// The node id to revoke (64 hex digits, as `slmesh status` and `slmesh keygen` show it).
    pub node_id: String,
    /// A trusted publisher key, which signs the revocation.
    #[arg(long)]
    pub publisher_key: PathBuf,
    /// Why, for every node's log and status (at most 256 bytes).
    #[arg(long, default_value = "revoked by the operator")]
    pub reason: String,
    /// The fleet the revocation is for (default: the node's, from its status).
    #[arg(long)]
    pub fleet: Option<String>,
    #[command(flatten)]
    pub node: NodeAddrArgs,
}

pub fn revoke(args: RevokeArgs) -> Result<()> {
    use slmesh_protocol::revocation::{Revocation, SignedRevocation, MAX_REASON_BYTES};
    let node: slmesh_protocol::NodeId =
        args.node_id.trim().parse().map_err(|e| anyhow::anyhow!("{:?} is not a node id: {e}", args.node_id))?;
    if args.reason.len() > MAX_REASON_BYTES {
        anyhow::bail!("the reason is {} bytes long, at most {MAX_REASON_BYTES}", args.reason.len());
    }
    let op = Operator::new(&args.publisher_key, &args.node, args.fleet)?;
    let revocation = Revocation { node, issued_at: op.now, reason: args.reason, fleet: op.fleet.clone() };
    let signed = SignedRevocation::sign(&revocation, &op.key)?;
    op.send("/v1/revocations", "revocation_hex", signed.to_bytes()?)
}

/// The fleet given, or else the one the node says it is in.
fn fleet_or_the_nodes(fleet: Option<String>, addr: &str, token: &Option<String>) -> Result<String> {
    if let Some(f) = fleet {
        return Ok(f);
    }
    let status = get(addr, token, "/v1/status")?;
    status["fleet"]
        .as_str()
        .filter(|f| !f.is_empty())
        .map(String::from)
        .ok_or_else(|| anyhow::anyhow!("the node at {addr} did not say which fleet it is in: give --fleet"))
}
