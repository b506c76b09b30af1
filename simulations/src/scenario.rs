//! Scenario files (TOML): the fleet's shape, its links, the model, the rollout plan, the
//! faults, and whether the new version is bad.

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
    pub size_mb: f64,
    /// Transfers are simulated in chunks of this size.
    #[serde(default = "default_chunk_mb")]
    pub chunk_mb: f64,
    /// Requests per second per node.
    pub request_rate: f64,
    /// The baseline (running) and the new version's behaviour.
    pub baseline: Behaviour,
    pub candidate: Behaviour,
}

fn default_chunk_mb() -> f64 {
    4.0
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
            min_reporting_nodes: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gossip {
    /// Mesh degree (gossipsub's D).
    pub degree: usize,
    pub metrics_interval_secs: f64,
    pub manifest_bytes: u64,
    pub have_bytes: u64,
    /// Size of one site's merged metrics record.
    pub metrics_record_bytes: u64,
}

impl Default for Gossip {
    fn default() -> Self {
        Gossip {
            degree: 6,
            metrics_interval_secs: 10.0,
            manifest_bytes: 2_000,
            have_bytes: 300,
            metrics_record_bytes: 1_400,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Partitions: sites on one side, from and until (simulated seconds).
    pub partitions: Vec<PartitionSpec>,
    /// Fraction of nodes that leave (crash) at a random time during the run and come
    /// back 30-120 s later.
    pub churn: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    pub sites: Vec<String>,
    pub from_secs: f64,
    pub until_secs: f64,
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Self, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        let n = s.sites.len();
        if n == 0 || s.latency_ms.len() != n || s.latency_ms.iter().any(|r| r.len() != n) {
            return Err(format!("latency_ms must be a {n}x{n} matrix, one row per site"));
        }
        if s.sites.iter().any(|x| x.uplink_mbps <= 0.0 || x.downlink_mbps <= 0.0) {
            return Err("every site needs positive uplink and downlink bandwidth".into());
        }
        if s.sites.iter().map(|x| x.nodes).sum::<usize>() < 2 {
            return Err("a fleet needs at least 2 nodes".into());
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
            },
        }
    }

    pub fn nodes(&self) -> usize {
        self.sites.iter().map(|s| s.nodes).sum()
    }
}
