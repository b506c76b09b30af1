//! Scenario files (TOML): the fleet's shape, its links, the model, the rollout plan, the
//! faults, and whether the new version is bad. Every node runs the node's own state
//! machine (`run`), so what a node decides (piece transfers, gossip, gates) is not set
//! here: only what is modelled around it.

use serde::Deserialize;
use slmesh_protocol::rollout::{Gates, RolloutPlan, Wave};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub seed: u64,
    /// Simulated seconds to run at most.
    pub duration_secs: f64,
    pub sites: Vec<Site>,
    /// One-way latency between sites in ms: `latency_ms[a][b]`.
    pub latency_ms: Vec<Vec<f64>>,
    #[serde(default)]
    pub jitter_ms: f64,
    /// Fraction of gossip messages lost (blob transfers retransmit, so they are not).
    #[serde(default)]
    pub loss: f64,
    pub model: Model,
    pub rollout: Rollout,
    #[serde(default)]
    pub gossip: Gossip,
    #[serde(default)]
    pub faults: Faults,
    #[serde(default)]
    pub node: NodeSettings,
}

/// The settings of `slmesh node run` that a scenario may change, and the modelled engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSettings {
    /// Seconds between anti-entropy rounds (`[network] sync_interval_secs`).
    pub sync_interval_secs: u64,
    /// Metrics records not renewed for this long stop counting (`[fleet] metrics_ttl_secs`).
    pub metrics_ttl_secs: u64,
    /// Seconds the modelled engine takes to load a version.
    pub load_secs: f64,
    /// Connected peers each node keeps, its gossip mesh among them (crates/mesh keeps 12);
    /// a node admits, syncs with and fetches from these.
    pub peers: usize,
}

impl Default for NodeSettings {
    fn default() -> Self {
        // The node's defaults (node/src/config.rs); a load of the demo model takes about 2 s.
        NodeSettings { sync_interval_secs: 30, metrics_ttl_secs: 180, load_secs: 2.0, peers: 12 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: String,
    pub nodes: usize,
    pub uplink_mbps: f64,
    pub downlink_mbps: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// The weights file's size (the node fetches it in 512 KiB pieces).
    pub size_mb: f64,
    /// Requests per second per node.
    pub request_rate: f64,
    /// The baseline (running) and the new version's behaviour.
    pub baseline: Behaviour,
    pub candidate: Behaviour,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Behaviour {
    pub latency_median_secs: f64,
    pub ttft_median_secs: f64,
    pub tokens_per_sec: f64,
    pub error_rate: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub publish_at_secs: f64,
    /// (fraction, soak seconds) per wave.
    pub waves: Vec<(f64, u64)>,
    #[serde(default)]
    pub gates: GatesSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatesSpec {
    pub max_error_rate: f64,
    pub max_p95_latency_ratio: f64,
    pub max_p95_ttft_ratio: f64,
    pub min_tokens_per_sec_ratio: f64,
    pub min_samples: u64,
    pub min_reporting_nodes: u32,
}

impl Default for GatesSpec {
    fn default() -> Self {
        let g = Gates::default();
        GatesSpec {
            max_error_rate: g.max_error_rate,
            max_p95_latency_ratio: g.max_p95_latency_ratio,
            max_p95_ttft_ratio: g.max_p95_ttft_ratio,
            min_tokens_per_sec_ratio: g.min_tokens_per_sec_ratio,
            min_samples: g.min_samples,
            min_reporting_nodes: g.min_reporting_nodes,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gossip {
    /// Mesh degree: each node's gossip peers (gossipsub's D), among its connected peers.
    pub degree: usize,
    /// How often a node measures itself and may send its metrics record
    /// (`[fleet] metrics_interval_secs`).
    pub metrics_interval_secs: f64,
}

impl Default for Gossip {
    fn default() -> Self {
        // The node's gossipsub mesh degree (crates/mesh) and metrics interval.
        Gossip { degree: 4, metrics_interval_secs: 10.0 }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Partitions: sites on one side, from and until (simulated seconds).
    pub partitions: Vec<PartitionSpec>,
    /// Fraction of nodes (distinct, never the origin) that crash at a random time in the
    /// churn window after publication and come back 30-120 s later.
    pub churn: f64,
    /// Fraction of nodes that are not there at the start and join in the churn window.
    pub joins: f64,
    /// Fraction of nodes that leave in the churn window for good.
    pub leaves: f64,
    /// Seconds after publication in which the crashes fall (default 300: during the
    /// rollout, not after it).
    pub churn_window_secs: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    pub sites: Vec<String>,
    pub from_secs: f64,
    pub until_secs: f64,
}

/// Nodes a scenario may have: each runs the node's state machine, about 250 KB of state
/// (100,000 nodes: about 25 GiB).
pub const MAX_NODES: usize = 100_000;

fn positive(x: f64) -> bool {
    x > 0.0 && x.is_finite()
}

impl Scenario {
    /// The folder of the shipped scenario files (`simulations/scenarios`): found from the
    /// package cargo runs a test or bench of (`CARGO_MANIFEST_DIR` at run time), else from
    /// where this crate was compiled (a build folder shared by two checkouts can hold a
    /// binary compiled in the other one, whose compile-time paths may be gone).
    pub fn shipped_dir() -> String {
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()) + "/scenarios"
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        let n = s.sites.len();
        if n == 0 || s.latency_ms.len() != n || s.latency_ms.iter().any(|r| r.len() != n) {
            return Err(format!("latency_ms must be a {n}x{n} matrix, one row per site"));
        }
        if s.sites.iter().any(|x| !positive(x.uplink_mbps) || !positive(x.downlink_mbps)) {
            return Err("every site needs positive uplink and downlink bandwidth".into());
        }
        if s.latency_ms.iter().flatten().chain([&s.jitter_ms]).any(|x| !x.is_finite() || *x < 0.0) {
            return Err("latencies and jitter are milliseconds, 0 or more".into());
        }
        if !(0.0..=1.0).contains(&s.loss) {
            return Err("loss is a fraction of gossip messages, from 0 to 1".into());
        }
        if !positive(s.duration_secs) || !positive(s.model.size_mb) {
            return Err("duration_secs and model.size_mb must be positive".into());
        }
        if !s.model.request_rate.is_finite() || s.model.request_rate < 0.0 || s.model.request_rate > 1000.0 {
            return Err("model.request_rate is requests per second per node, from 0 to 1000".into());
        }
        if s.gossip.degree == 0 || s.node.peers < s.gossip.degree {
            return Err("gossip.degree must be at least 1, and node.peers at least gossip.degree".into());
        }
        for p in &s.faults.partitions {
            if let Some(name) = p.sites.iter().find(|name| !s.sites.iter().any(|x| &x.name == *name)) {
                return Err(format!("a partition names site {name:?}, which the scenario does not have"));
            }
            if !p.from_secs.is_finite() || !p.until_secs.is_finite() || p.from_secs >= p.until_secs {
                return Err(format!("a partition of {:?} must heal after it starts", p.sites));
            }
        }
        if s.model.size_mb > 1e6 {
            return Err("model.size_mb is at most a million (a terabyte)".into());
        }
        if !(1.0..=3600.0).contains(&s.gossip.metrics_interval_secs) {
            return Err("gossip.metrics_interval_secs is seconds, from 1 to 3600".into());
        }
        let n = &s.node;
        if n.sync_interval_secs == 0 || n.metrics_ttl_secs == 0 || !(0.0..=3600.0).contains(&n.load_secs) {
            return Err(
                "node.sync_interval_secs and node.metrics_ttl_secs must be at least 1, node.load_secs 0 to 3600".into(),
            );
        }
        let f = &s.faults;
        if [f.churn, f.joins, f.leaves].iter().any(|x| !(0.0..=1.0).contains(x)) || f.churn + f.joins + f.leaves > 1.0 {
            return Err("faults.churn, joins and leaves are fractions of the nodes that add up to 1 at most".into());
        }
        let nodes = s.sites.iter().map(|x| x.nodes).sum::<usize>();
        if !(2..=MAX_NODES).contains(&nodes) {
            return Err(format!("a fleet has 2 to {MAX_NODES} nodes, this one {nodes}"));
        }
        s.plan().validate().map_err(|e| e.to_string())?;
        Ok(s)
    }

    /// The rollout plan, in the protocol core's own type.
    pub fn plan(&self) -> RolloutPlan {
        let g = &self.rollout.gates;
        RolloutPlan {
            waves: self.rollout.waves.iter().map(|(f, s)| Wave { fraction: *f, soak_secs: *s }).collect(),
            selector: Default::default(),
            gates: Gates {
                max_error_rate: g.max_error_rate,
                max_p95_latency_ratio: g.max_p95_latency_ratio,
                max_p95_ttft_ratio: g.max_p95_ttft_ratio,
                min_tokens_per_sec_ratio: g.min_tokens_per_sec_ratio,
                min_samples: g.min_samples,
                min_reporting_nodes: g.min_reporting_nodes,
                min_eval_pass_rate: None,
                agreement: None,
            },
        }
    }

    pub fn nodes(&self) -> usize {
        self.sites.iter().map(|s| s.nodes).sum()
    }
}
