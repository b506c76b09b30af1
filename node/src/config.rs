//! The node's TOML configuration: what `slmesh init` writes and every command reads.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use slmesh_inference::http::{default_max_concurrent, HttpLimits};
use slmesh_protocol::identity::PublicKey;
use slmesh_protocol::trust::{validate_tags, Tags};
use slmesh_protocol::TrustStore;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The shortest API token a config may set (a made one has 64 hex digits).
const MIN_TOKEN_CHARS: usize = 16;

/// A fresh API token: 32 random bytes, in hex.
pub fn new_api_token() -> String {
    let mut bytes = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    hex::encode(bytes)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Folder for the node's key, certificate, state and model files. A relative path is
    /// relative to the config file's folder.
    pub data_dir: PathBuf,
    #[serde(default)]
    pub tags: Tags,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
    #[serde(default)]
    pub trust: TrustConfig,
    /// Model name -> version this node stays on, whatever rollouts say.
    #[serde(default)]
    pub pins: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// libp2p listen addresses (TCP and QUIC).
    pub listen: Vec<String>,
    /// libp2p addresses of peers to dial at start, with `/p2p/<peer id>`.
    #[serde(default)]
    pub bootstrap: Vec<String>,
    /// Find peers on the local network by mDNS.
    pub mdns: bool,
    /// UDP address of the iroh endpoint that serves and fetches model blobs.
    pub blobs_bind: String,
    /// Transfers of one blob this node serves at a time; up to 4 more piece requests wait
    /// in turn for a slot (at most 2 s), further ones try other peers. 0: this node
    /// uploads nothing.
    #[serde(default = "default_upload_slots")]
    pub upload_slots_per_blob: usize,
    /// A file's uploads start one at a time: another starts beside a running one only once
    /// that has run this many milliseconds (a slow fetcher), up to `upload_slots_per_blob`.
    /// One at a time, each piece leaves at the uplink's full speed and is passed on
    /// sooner. 0: all the slots at once.
    #[serde(default = "default_upload_stalled_after_ms")]
    pub upload_stalled_after_ms: u64,
    /// A node that published a version serves its files only while fewer than this many
    /// peers hold them (0: always), so that peers, not the origin, spread them.
    #[serde(default = "default_origin_copies")]
    pub origin_copies: usize,
    /// Cap on what this node uploads to peers, bytes per second (absent: no cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_upload_bytes_per_sec: Option<u64>,
    /// Seconds between anti-entropy rounds (asking peers for manifests this node lacks).
    #[serde(default = "default_sync_interval")]
    pub sync_interval_secs: u64,
    /// Seconds a refused peer (no valid certificate) stays blocked before it may connect
    /// and present one again: an operator may have enrolled it since.
    #[serde(default = "default_refusal_cooldown")]
    pub refusal_cooldown_secs: u64,
}

fn default_upload_slots() -> usize {
    slmesh_protocol::mesh::UploadPolicy::default().slots_per_blob
}

fn default_upload_stalled_after_ms() -> u64 {
    slmesh_protocol::mesh::UploadPolicy::default().stalled_after_ms
}

fn default_origin_copies() -> usize {
    slmesh_protocol::mesh::UploadPolicy::default().origin_copies
}

fn default_sync_interval() -> u64 {
    30
}

fn default_refusal_cooldown() -> u64 {
    600
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            listen: vec!["/ip4/0.0.0.0/tcp/4001".into(), "/ip4/0.0.0.0/udp/4001/quic-v1".into()],
            bootstrap: vec![],
            mdns: true,
            blobs_bind: "0.0.0.0:4002".into(),
            upload_slots_per_blob: default_upload_slots(),
            upload_stalled_after_ms: default_upload_stalled_after_ms(),
            origin_copies: default_origin_copies(),
            max_upload_bytes_per_sec: None,
            sync_interval_secs: default_sync_interval(),
            refusal_cooldown_secs: default_refusal_cooldown(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Seconds between this node's signed metrics records (counters and sketches, never
    /// prompts or outputs); a changed record goes out at most this often.
    pub metrics_interval_secs: u64,
    /// A node not heard from for this many seconds drops out of the fleet view, and its
    /// seat in a metrics panel goes to the next-ranked node. Keep it above five intervals:
    /// an unchanged record is sent again every five.
    pub metrics_ttl_secs: u64,
    /// Shadow comparison (a rollout plan's agreement gate) keeps the previous version
    /// loaded beside the new one while this node is in a canary's soak: only for weights
    /// files up to this many MiB (0: this node never does).
    #[serde(default = "default_shadow_max_weights_mib")]
    pub shadow_max_weights_mib: u64,
}

fn default_shadow_max_weights_mib() -> u64 {
    slmesh_protocol::node::DEFAULT_SHADOW_MAX_WEIGHTS_BYTES >> 20
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            metrics_interval_secs: 10,
            metrics_ttl_secs: 180,
            shadow_max_weights_mib: default_shadow_max_weights_mib(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where the OpenAI-compatible and operations endpoints listen. Loopback by default:
    /// prompts stay on this machine.
    pub bind: String,
    /// If set, requests need `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<String>,
    /// Host names the API answers for besides IP addresses and localhost; a request with
    /// another `Host` is refused (a web page reaching the node by DNS rebinding).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    /// Requests generating at once (each holds its own attention cache while it runs);
    /// unset: `slmesh_inference::http::default_max_concurrent` of the machine's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<usize>,
    /// Requests waiting for a turn; one more gets 429.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
    /// Largest `max_tokens` a request may ask for.
    #[serde(default = "default_max_tokens_cap")]
    pub max_tokens_cap: u32,
    /// Seconds before a request is answered 504.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
}

fn default_max_waiting() -> usize {
    HttpLimits::default().max_waiting
}

fn default_max_tokens_cap() -> u32 {
    HttpLimits::default().max_tokens_cap
}

fn default_request_timeout_secs() -> u64 {
    HttpLimits::default().request_timeout.as_secs()
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: "127.0.0.1:8080".into(),
            bearer_token: None,
            allowed_hosts: vec![],
            max_concurrent: None,
            max_waiting: default_max_waiting(),
            max_tokens_cap: default_max_tokens_cap(),
            request_timeout_secs: default_request_timeout_secs(),
        }
    }
}

impl HttpConfig {
    /// What the API allows, from these settings, on a machine with `ram_bytes` of memory.
    pub fn limits(&self, ram_bytes: u64) -> HttpLimits {
        HttpLimits {
            max_concurrent: self.max_concurrent.unwrap_or_else(|| default_max_concurrent(ram_bytes)),
            max_waiting: self.max_waiting,
            max_tokens_cap: self.max_tokens_cap,
            default_max_tokens: HttpLimits::default().default_max_tokens.min(self.max_tokens_cap),
            request_timeout: std::time::Duration::from_secs(self.request_timeout_secs),
            ..HttpLimits::default()
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Operator keys trusted to sign manifests, rollout commands and enrollment
    /// certificates.
    #[serde(default)]
    pub publishers: Vec<TrustedPublisher>,
    /// This node's enrollment certificate; relative to `data_dir`.
    #[serde(default = "default_certificate")]
    pub certificate: PathBuf,
}

fn default_certificate() -> PathBuf {
    "node.cert".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedPublisher {
    pub name: String,
    /// The publisher's public key, 64 hex characters (`slmesh publisher keygen` prints it).
    pub key: String,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Self {
        Config {
            data_dir,
            tags: Tags::new(),
            network: NetworkConfig::default(),
            http: HttpConfig::default(),
            fleet: FleetConfig::default(),
            trust: TrustConfig { publishers: vec![], certificate: default_certificate() },
            pins: BTreeMap::new(),
        }
    }

    /// Where `slmesh node run` keeps the API token it made when the config sets none.
    pub fn api_token_path(&self) -> PathBuf {
        self.data_dir.join("api-token")
    }

    /// The API token: the config's, else the one in `api_token_path` (if there is one).
    pub fn api_token(&self) -> Result<Option<String>> {
        if let Some(t) = &self.http.bearer_token {
            return Ok(Some(t.clone()));
        }
        let path = self.api_token_path();
        match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read the API token {}", path.display())),
        }
    }

    /// Reads and checks a config file; relative paths in it become relative to its folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {} (create one with `slmesh init`)", path.display()))?;
        let mut config: Config =
            toml::from_str(&text).with_context(|| format!("config {} is not valid", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.data_dir.is_relative() {
            config.data_dir = base.join(&config.data_dir);
        }
        // Absolute, so that nothing depends on the folder the node was started from.
        config.data_dir = std::path::absolute(&config.data_dir)
            .with_context(|| format!("data_dir {} cannot be made absolute", config.data_dir.display()))?;
        config.validate().with_context(|| format!("config {} is not valid", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        validate_tags(&self.tags)?;
        self.trust_store()?;
        if self.http.bind.parse::<std::net::SocketAddr>().is_err() {
            bail!("http.bind {:?} is not an address like 127.0.0.1:8080", self.http.bind);
        }
        if self.network.blobs_bind.parse::<std::net::SocketAddr>().is_err() {
            bail!("network.blobs_bind {:?} is not an address like 0.0.0.0:4002", self.network.blobs_bind);
        }
        let h = &self.http;
        if h.max_concurrent == Some(0) || h.max_tokens_cap == 0 || h.request_timeout_secs == 0 {
            bail!("http.max_concurrent, http.max_tokens_cap and http.request_timeout_secs must be at least 1");
        }
        // Seconds of the node's timers: a zero would have it gossip or sync without pause
        // (the state machine runs its timers at 100 ms at the least, and says so).
        if self.fleet.metrics_interval_secs == 0
            || self.fleet.metrics_ttl_secs == 0
            || self.network.sync_interval_secs == 0
        {
            bail!(
                "fleet.metrics_interval_secs, fleet.metrics_ttl_secs and network.sync_interval_secs must be at least 1"
            );
        }
        if let Some(t) = &self.http.bearer_token {
            if t.len() < MIN_TOKEN_CHARS || t.chars().any(|c| !c.is_ascii_graphic()) {
                bail!("http.bearer_token must be at least {MIN_TOKEN_CHARS} printable characters without spaces");
            }
        }
        Ok(())
    }

    pub fn trust_store(&self) -> Result<TrustStore> {
        let mut trust = TrustStore::new();
        for p in &self.trust.publishers {
            let key: PublicKey =
                p.key.parse().map_err(|e| anyhow::anyhow!("trusted publisher {:?}: key {:?}: {e}", p.name, p.key))?;
            trust.add(p.name.clone(), key)?;
        }
        Ok(trust)
    }

    pub fn key_path(&self) -> PathBuf {
        self.data_dir.join("node.key")
    }

    pub fn certificate_path(&self) -> PathBuf {
        self.data_dir.join(&self.trust.certificate)
    }

    /// The TOML `slmesh init` writes: every setting, with a comment saying what it does.
    pub fn to_documented_toml(&self) -> Result<String> {
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let list = |v: &[String]| format!("[{}]", v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", "));
        let mut out = String::new();
        out.push_str("# slmesh node configuration, written by `slmesh init`. Every setting is shown with\n");
        out.push_str("# its value; edit and restart the node to change one.\n\n");
        out.push_str("# Folder for this node's key (node.key, mode 0600), enrollment certificate, state\n");
        out.push_str("# database and model files. A relative path is relative to this file's folder.\n");
        out.push_str(&format!("data_dir = {}\n\n", q(&self.data_dir.to_string_lossy())));
        out.push_str("# This node's tags. Rollout plans and variants select nodes by them, and the\n");
        out.push_str("# enrollment certificate must carry the same ones (`slmesh enroll --tag k=v`).\n[tags]\n");
        for (k, v) in &self.tags {
            out.push_str(&format!("{k} = {}\n", q(v)));
        }
        out.push_str("\n[network]\n");
        out.push_str("# libp2p listen addresses: TCP and QUIC. Peers must be able to reach them.\n");
        out.push_str(&format!("listen = {}\n", list(&self.network.listen)));
        out.push_str("# Peers to dial at start, as libp2p addresses ending in /p2p/<peer id>.\n");
        out.push_str(&format!("bootstrap = {}\n", list(&self.network.bootstrap)));
        out.push_str("# Find peers on the local network by multicast DNS.\n");
        out.push_str(&format!("mdns = {}\n", self.network.mdns));
        out.push_str("# UDP address of the iroh endpoint that serves and fetches model files.\n");
        out.push_str(&format!("blobs_bind = {}\n", q(&self.network.blobs_bind)));
        out.push_str("# Transfers of one model file this node serves at a time; more fetchers try other\n");
        out.push_str("# peers. 0: this node uploads nothing.\n");
        out.push_str(&format!("upload_slots_per_blob = {}\n", self.network.upload_slots_per_blob));
        out.push_str("# Uploads of a file start one at a time; another starts beside a running one once\n");
        out.push_str("# that has run this many milliseconds (a slow fetcher). 0: all the slots at once.\n");
        out.push_str(&format!("upload_stalled_after_ms = {}\n", self.network.upload_stalled_after_ms));
        out.push_str("# After publishing, serve a file only while fewer than this many peers hold it\n");
        out.push_str("# (0: always), so that peers rather than the publisher spread it.\n");
        out.push_str(&format!("origin_copies = {}\n", self.network.origin_copies));
        out.push_str("# Cap on upload bandwidth to peers, in bytes per second:\n");
        match self.network.max_upload_bytes_per_sec {
            Some(b) => out.push_str(&format!("max_upload_bytes_per_sec = {b}\n")),
            None => out.push_str("# max_upload_bytes_per_sec = 10000000\n"),
        }
        out.push_str("# Seconds between anti-entropy rounds (asking peers for manifests this node lacks).\n");
        out.push_str(&format!("sync_interval_secs = {}\n", self.network.sync_interval_secs));
        out.push_str("# Seconds a refused peer (no valid certificate) stays blocked before it may try again.\n");
        out.push_str(&format!("refusal_cooldown_secs = {}\n", self.network.refusal_cooldown_secs));
        out.push_str("\n[http]\n");
        out.push_str("# OpenAI-compatible API and operations endpoints. Loopback by default, so\n");
        out.push_str("# prompts never leave this machine; widen it only behind your own access control.\n");
        out.push_str(&format!("bind = {}\n", q(&self.http.bind)));
        out.push_str("# Every request needs `Authorization: Bearer <token>` (OpenAI clients: the API key).\n");
        out.push_str("# Without one here, `slmesh node run` makes one in data_dir/api-token.\n");
        match &self.http.bearer_token {
            Some(t) => out.push_str(&format!("bearer_token = {}\n", q(t))),
            None => out.push_str("# bearer_token = \"...\"\n"),
        }
        out.push_str("# Host names the API answers for besides IP addresses and localhost (other Host\n");
        out.push_str("# headers are refused: a web page cannot reach the node by DNS rebinding):\n");
        if self.http.allowed_hosts.is_empty() {
            out.push_str("# allowed_hosts = [\"gateway-1.lan\"]\n");
        } else {
            let names: Vec<String> = self.http.allowed_hosts.iter().map(|h| q(h)).collect();
            out.push_str(&format!("allowed_hosts = [{}]\n", names.join(", ")));
        }
        out.push_str("# Requests generating at once; each holds its own attention cache while it runs,\n");
        out.push_str("# so this bounds memory as much as it bounds CPU. More wait for a turn. Unset: 4\n");
        out.push_str("# on a machine with 8 GiB of memory or more, else 2.\n");
        match self.http.max_concurrent {
            Some(n) => out.push_str(&format!("max_concurrent = {n}\n")),
            None => out.push_str("# max_concurrent = 2\n"),
        }
        out.push_str("# Requests waiting for a turn; one more gets 429 (Too Many Requests).\n");
        out.push_str(&format!("max_waiting = {}\n", self.http.max_waiting));
        out.push_str("# Largest max_tokens a request may ask for.\n");
        out.push_str(&format!("max_tokens_cap = {}\n", self.http.max_tokens_cap));
        out.push_str("# Seconds before a request is answered 504 (Gateway Timeout).\n");
        out.push_str(&format!("request_timeout_secs = {}\n", self.http.request_timeout_secs));
        out.push_str("\n[fleet]\n");
        out.push_str("# Seconds between this node's signed metrics records (numbers only, never prompts).\n");
        out.push_str(&format!("metrics_interval_secs = {}\n", self.fleet.metrics_interval_secs));
        out.push_str("# A node not heard from for this many seconds drops out of the fleet view (and its\n");
        out.push_str("# seat in a metrics panel goes to the next node); keep it above five intervals.\n");
        out.push_str(&format!("metrics_ttl_secs = {}\n", self.fleet.metrics_ttl_secs));
        out.push_str("# Shadow comparison on a canary keeps the previous version loaded too (about its\n");
        out.push_str("# memory again, and some CPU): only for weights files up to this many MiB; 0: never.\n");
        out.push_str(&format!("shadow_max_weights_mib = {}\n", self.fleet.shadow_max_weights_mib));
        out.push_str("\n[trust]\n");
        out.push_str("# This node's enrollment certificate, relative to data_dir.\n");
        out.push_str(&format!("certificate = {}\n", q(&self.trust.certificate.to_string_lossy())));
        out.push_str("# Operator keys trusted to sign manifests, rollout commands and certificates.\n");
        out.push_str("# Add one with: [[trust.publishers]] name = \"ops\" key = \"<64 hex characters>\"\n");
        for p in &self.trust.publishers {
            out.push_str(&format!("\n[[trust.publishers]]\nname = {}\nkey = {}\n", q(&p.name), q(&p.key)));
        }
        out.push_str("\n# Versions this node stays on whatever rollouts say, by model name:\n[pins]\n");
        out.push_str("# smollm2-135m-instruct = 3\n");
        for (name, v) in &self.pins {
            out.push_str(&format!("{name} = {v}\n"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_toml_parses_back_to_the_same_config() {
        let mut c = Config::new("data".into());
        c.tags.insert("site".into(), "berlin".into());
        c.network.bootstrap.push("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWxyz".into());
        c.trust.publishers.push(TrustedPublisher { name: "ops".into(), key: "ab".repeat(32) });
        c.pins.insert("m".into(), 3);
        c.http.max_concurrent = Some(1);
        c.http.request_timeout_secs = 30;
        let text = c.to_documented_toml().unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        let defaults = Config::new("d".into());
        assert_eq!(toml::from_str::<Config>(&defaults.to_documented_toml().unwrap()).unwrap(), defaults);
    }

    #[test]
    fn unknown_settings_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("data_dir = \"d\"\nlisten_adress = 1\n").is_err());
        let mut c = Config::new("d".into());
        c.http.bind = "localhost".into();
        assert!(c.validate().is_err());
        let mut c = Config::new("d".into());
        c.trust.publishers.push(TrustedPublisher { name: "ops".into(), key: "zz".into() });
        assert!(c.validate().unwrap_err().to_string().contains("ops"));
        let mut c = Config::new("d".into());
        c.http.max_concurrent = Some(0);
        assert!(c.validate().unwrap_err().to_string().contains("max_concurrent"));
        for zero in [
            |c: &mut Config| c.fleet.metrics_interval_secs = 0,
            |c: &mut Config| c.fleet.metrics_ttl_secs = 0,
            |c: &mut Config| c.network.sync_interval_secs = 0,
        ] {
            let mut c = Config::new("d".into());
            assert!(c.validate().is_ok());
            zero(&mut c);
            assert!(c.validate().unwrap_err().to_string().contains("at least 1"));
        }
    }

    #[test]
    fn a_config_from_before_the_serving_limits_gets_the_defaults() {
        let old = "data_dir = \"d\"\n[http]\nbind = \"127.0.0.1:8080\"\n";
        let c: Config = toml::from_str(old).unwrap();
        assert_eq!(c.http, HttpConfig::default());
        // Requests at once follow the machine's memory unless set.
        let small = c.http.limits(2 << 30);
        assert_eq!((small.max_concurrent, small.max_waiting), (2, 16));
        assert_eq!(c.http.limits(0).max_concurrent, 2, "unknown memory counts as small");
        assert_eq!(c.http.limits(16 << 30).max_concurrent, 4);
        let set: Config =
            toml::from_str(&old.replace("8080\"", "8080\"\nmax_concurrent = 1\nmax_tokens_cap = 100")).unwrap();
        let limits = set.http.limits(16 << 30);
        assert_eq!((limits.max_concurrent, limits.default_max_tokens), (1, 100));
    }
}
