//! A node's settings: its timers and limits, and the check that makes them safe to run
//! (`NodeConfig::checked`, which `Node::new` applies).

use super::reporting;
use crate::select::NodeFacts;
use crate::trust::Tags;

/// The largest weights file a node keeps loaded a second time for shadow comparison,
/// unless configured otherwise: a small model's, on a gateway with a few GiB.
pub const DEFAULT_SHADOW_MAX_WEIGHTS_BYTES: u64 = 1 << 30;

/// Settings of a node's timers and limits.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// How often the node measures itself and gossips its metrics record.
    pub metrics_interval_ms: u64,
    /// Records of nodes not heard from for this long stop counting.
    pub metrics_ttl_secs: u64,
    /// Anti-entropy: how often to ask a few peers what they hold.
    pub sync_interval_ms: u64,
    /// How often the rollout engine looks at every version.
    pub rollout_tick_ms: u64,
    /// A version that fails to load is tried this many times in all, then given up.
    pub max_activation_attempts: u32,
    /// The wait after the first failed activation; it doubles with each failure.
    pub activation_retry_ms: u64,
    /// The wait after a failed fetch; it doubles with each failure, up to `fetch_retry_max_ms`.
    pub fetch_retry_ms: u64,
    pub fetch_retry_max_ms: u64,
    /// Admission handshakes that fail in transport are asked again this often, this many times.
    pub hello_retry_ms: u64,
    pub hello_attempts: u32,
    /// A connected peer not admitted this long after it connected is refused, however
    /// its hellos fare: until then it gets no gossip and nothing it sends counts.
    pub admission_deadline_ms: u64,
    /// What variant selection needs of this machine.
    pub facts: NodeFacts,
    /// Shadow comparison keeps the previous version loaded during a canary's soak: this
    /// node does so only for weights files up to this size (0: never).
    pub shadow_max_weights_bytes: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            metrics_interval_ms: 5_000,
            metrics_ttl_secs: 60,
            sync_interval_ms: 15_000,
            rollout_tick_ms: 1_000,
            max_activation_attempts: 3,
            activation_retry_ms: 30_000,
            fetch_retry_ms: 1_000,
            fetch_retry_max_ms: 60_000,
            hello_retry_ms: 1_000,
            hello_attempts: 5,
            admission_deadline_ms: 20_000,
            facts: NodeFacts {
                ram_bytes: 0,
                cpu_arch: String::new(),
                tags: Tags::new(),
                simd: false,
                kernel_ps_per_weight: Default::default(),
            },
            shadow_max_weights_bytes: DEFAULT_SHADOW_MAX_WEIGHTS_BYTES,
        }
    }
}

/// The shortest period a node's timers run at: a zero (a config typed wrong) would wake
/// the node again at once, for ever.
pub const MIN_TIMER_MS: u64 = 100;

impl NodeConfig {
    /// The settings as the node runs them, and a sentence for each that was changed or
    /// looks wrong (the node says so as a warning).
    pub fn checked(mut self) -> (Self, Vec<String>) {
        let mut said = vec![];
        let periods: [(&str, &mut u64); 5] = [
            ("the metrics interval", &mut self.metrics_interval_ms),
            ("the anti-entropy interval", &mut self.sync_interval_ms),
            ("the rollout tick", &mut self.rollout_tick_ms),
            ("the hello retry", &mut self.hello_retry_ms),
            ("the fetch retry", &mut self.fetch_retry_ms),
        ];
        for (what, ms) in periods {
            if *ms < MIN_TIMER_MS {
                said.push(format!("{what} of {ms} ms is too short: {MIN_TIMER_MS} ms is used"));
                *ms = MIN_TIMER_MS;
            }
        }
        if self.fetch_retry_max_ms < self.fetch_retry_ms {
            said.push(format!(
                "the longest fetch back-off ({} ms) is below the first ({} ms): {} ms is used",
                self.fetch_retry_max_ms, self.fetch_retry_ms, self.fetch_retry_ms
            ));
            self.fetch_retry_max_ms = self.fetch_retry_ms;
        }
        if self.metrics_ttl_secs == 0 {
            said.push("a metrics record lifetime of 0 s would count nobody: 1 s is used".into());
            self.metrics_ttl_secs = 1;
        }
        // An unchanged record is sent again every few intervals: one that expires sooner
        // drops its node out of metrics panels and back in.
        let refresh = reporting::METRICS_REFRESH_INTERVALS;
        if self.metrics_ttl_secs.saturating_mul(1000) <= self.metrics_interval_ms.saturating_mul(refresh) {
            said.push(format!(
                "metrics records live {} s, not more than the {refresh} metrics intervals of {} ms after which an \
                 unchanged one is sent again: nodes will drop out of metrics panels between their records \
                 (raise fleet.metrics_ttl_secs)",
                self.metrics_ttl_secs, self.metrics_interval_ms
            ));
        }
        if self.max_activation_attempts == 0 {
            said.push("0 activation attempts would never load a version: 1 is used".into());
            self.max_activation_attempts = 1;
        }
        (self, said)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{KeyKind, SecretKey};
    use crate::node::{Level, Node, NodeIdentity, Output, Restored};
    use crate::trust::{Enrollment, TrustStore, DEFAULT_FLEET};

    /// A node of its own one-node fleet, started at `now` with `cfg`.
    fn lone_node(cfg: NodeConfig, now: u64) -> Node {
        let publisher = SecretKey::from_seed(KeyKind::Publisher, [3; 32]);
        let mut trust = TrustStore::new();
        trust.add("ops", publisher.public()).unwrap();
        let secret = SecretKey::from_seed(KeyKind::Node, [4; 32]);
        let enrollment = Enrollment {
            node: secret.public(),
            tags: Tags::new(),
            issued_at: now / 1000,
            expires_at: now / 1000 + 86_400,
            fleet: DEFAULT_FLEET.into(),
        };
        let certificate = enrollment.sign(&publisher).unwrap();
        let identity = NodeIdentity { secret, certificate, tags: Tags::new(), fleet: DEFAULT_FLEET.into() };
        Node::new(cfg, identity, trust, Restored::default(), now)
    }

    fn warnings(node: &mut Node) -> Vec<String> {
        std::iter::from_fn(|| node.poll_output())
            .filter_map(|o| match o {
                Output::Event { level: Level::Warn, text, .. } => Some(text),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_default_settings_are_taken_as_they_are() {
        let (cfg, said) = NodeConfig::default().checked();
        assert_eq!(cfg, NodeConfig::default());
        assert!(said.is_empty(), "{said:?}");
        assert!(warnings(&mut lone_node(NodeConfig::default(), 1_000_000)).is_empty());
    }

    #[test]
    fn zero_periods_run_at_the_floor_and_the_node_says_so_instead_of_waking_in_a_loop() {
        let zero = NodeConfig {
            metrics_interval_ms: 0,
            metrics_ttl_secs: 0,
            sync_interval_ms: 0,
            rollout_tick_ms: 0,
            hello_retry_ms: 0,
            fetch_retry_ms: 0,
            fetch_retry_max_ms: 0,
            max_activation_attempts: 0,
            ..NodeConfig::default()
        };
        let (cfg, said) = zero.clone().checked();
        for ms in [cfg.metrics_interval_ms, cfg.sync_interval_ms, cfg.rollout_tick_ms, cfg.hello_retry_ms] {
            assert_eq!(ms, MIN_TIMER_MS);
        }
        assert_eq!((cfg.fetch_retry_ms, cfg.fetch_retry_max_ms), (MIN_TIMER_MS, MIN_TIMER_MS));
        assert_eq!((cfg.metrics_ttl_secs, cfg.max_activation_attempts), (1, 1));
        // Five periods, the back-off cap, the lifetime, and the attempts.
        assert_eq!(said.len(), 8, "{said:?}");
        let mut node = lone_node(zero, 1_000_000);
        let warned = warnings(&mut node);
        assert!(warned.iter().any(|w| w.contains("metrics interval of 0 ms is too short")), "{warned:?}");
        // Every wake-up is later than the one before: no timer fires again at the same instant.
        // Over one second, every wake-up is later than the one before, and the node
        // measures itself at most once per floor period.
        // (The rollout engine first looks at once.)
        let (mut now, mut samples) = (1_000_000, 0);
        node.handle_timeout(now);
        while now < 1_001_000 {
            let next = node.poll_timeout();
            assert!(next > now, "woken at {next}, now {now}");
            now = next;
            node.handle_timeout(now);
            samples += std::iter::from_fn(|| node.poll_output()).filter(|o| matches!(o, Output::SampleMetrics)).count();
        }
        assert!((5..=11).contains(&samples), "{samples} samples in a second");
    }

    #[test]
    fn a_metrics_lifetime_within_the_refresh_of_unchanged_records_is_reported_and_kept() {
        let cfg = NodeConfig { metrics_interval_ms: 10_000, metrics_ttl_secs: 50, ..NodeConfig::default() };
        let (checked, said) = cfg.clone().checked();
        assert_eq!(checked, cfg, "a lifetime is the operator's choice: only said, not changed");
        assert_eq!(said.len(), 1);
        assert!(said[0].contains("fleet.metrics_ttl_secs"), "{}", said[0]);
        let (_, said) = NodeConfig { metrics_ttl_secs: 51, ..cfg }.checked();
        assert!(said.is_empty(), "{said:?}");
        // Settings near the end of time do not overflow (a debug build panics if they do).
        let huge = NodeConfig { metrics_interval_ms: 1 << 60, metrics_ttl_secs: u64::MAX, ..NodeConfig::default() };
        assert!(huge.checked().1.is_empty());
        let huge = NodeConfig { metrics_interval_ms: u64::MAX, metrics_ttl_secs: 1, ..NodeConfig::default() };
        assert_eq!(huge.checked().1.len(), 1);
    }
}
