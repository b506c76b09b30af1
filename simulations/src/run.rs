//! A scenario run on the node fleet: every simulated node is the node's own state machine
//! (`fleet::NodeFleet`), serving the baseline (v1) from the start; at `publish_at_secs`
//! node 0 publishes the candidate (v2) with the scenario's plan, and the faults happen
//! on schedule. The run ends when every live node serves v2, or the rollout halted and no
//! live node serves it, or at `duration_secs`.
//!
//! Modelled around the nodes: the scenario's links (per-site bandwidth, latency, jitter,
//! loss on gossip), the mesh (each node's connected peers, its gossip peers among them),
//! loads, and the requests each version answers. Decided by the nodes: everything else.

use crate::engine::{Micros, SECOND};
use crate::fleet::{simulated_node_facts, FleetSpec, NodeFleet, MODEL};
use crate::net::Links;
use crate::report::{CoverageSample, Report, WaveReport};
use crate::scenario::Scenario;
use slmesh_protocol::cohort::{membership, Membership};
use slmesh_protocol::fleet::GateVerdict;
use slmesh_protocol::mesh::{TOPIC_MANIFESTS, TOPIC_METRICS};
use slmesh_protocol::node::{NodeConfig, RequestKind, RolloutView};
use slmesh_protocol::rollout::RolloutPlan;

const BASELINE: u64 = 1;
const CANDIDATE: u64 = 2;
const SAMPLE_EVERY_SECS: u64 = 5;
/// Gossip in flight at the end is delivered for this long (it crosses the fleet in
/// well under a second).
const GOSSIP_DRAIN: Micros = 5 * SECOND;

/// A fault, at a simulated time.
#[derive(Debug, Clone)]
enum Fault {
    Crash(usize),
    Start(usize),
    Cut(Vec<usize>, bool),
}

/// Runs a scenario to its end.
pub fn run(sc: Scenario) -> Report {
    run_with_progress(sc, |_, _| {})
}

/// As `run`, calling `progress(simulated seconds, events)` every 5 simulated seconds.
pub fn run_with_progress(sc: Scenario, mut progress: impl FnMut(f64, u64)) -> Report {
    let mut run = Run::new(sc);
    run.go(&mut progress);
    run.report()
}

/// As `run`, and the fleet as the run left it (for what its nodes logged).
pub fn run_keeping_fleet(sc: Scenario) -> (Report, NodeFleet) {
    let mut run = Run::new(sc);
    run.go(&mut |_, _| {});
    (run.report(), run.fleet)
}

fn secs(t: Micros) -> f64 {
    t as f64 / SECOND as f64
}

fn at_secs(x: f64) -> Micros {
    (x * SECOND as f64) as Micros
}

/// The fleet spec a scenario describes (links are set per site after).
fn spec(sc: &Scenario) -> FleetSpec {
    FleetSpec {
        seed: sc.seed,
        sites: sc.sites.iter().map(|s| s.nodes).collect(),
        latency_ms: sc.latency_ms.clone(),
        uplink_bytes_per_sec: sc.sites[0].uplink_mbps * 125_000.0,
        downlink_bytes_per_sec: sc.sites[0].downlink_mbps * 125_000.0,
        mesh_degree: sc.gossip.degree,
        peer_degree: sc.node.peers,
        model_bytes: (sc.model.size_mb * 1e6) as u64,
        load_ms: (sc.node.load_secs * 1000.0) as u64,
        request_rate: sc.model.request_rate,
        latency_spread: 0.3,
        overhead_bytes: 64,
        node_config: NodeConfig {
            metrics_interval_ms: (sc.gossip.metrics_interval_secs * 1000.0) as u64,
            metrics_ttl_secs: sc.node.metrics_ttl_secs,
            sync_interval_ms: sc.node.sync_interval_secs * 1000,
            rollout_tick_ms: 1_000,
            facts: simulated_node_facts(),
            ..NodeConfig::default()
        },
    }
}

struct Run {
    sc: Scenario,
    plan: RolloutPlan,
    fleet: NodeFleet,
    /// When the run started (the baseline served everywhere) and when v2 is published.
    start: Micros,
    publish_at: Micros,
    published: bool,
    /// Metrics gossip bytes sent fleet-wide before publication: the start-up, where each
    /// node reports the baseline unless the records it heard fill the panel first.
    metrics_gossip_at_publish: u64,
    end: Micros,
    /// When the run ended (its report's figures are up to then; the gossip in flight at
    /// that moment is delivered after, and its bytes counted).
    ended_at: Micros,
    faults: Vec<(Micros, Fault)>,
    /// Nodes still to come back or join.
    returns_pending: usize,
    /// Each node's wave by its cohort, before it activates (when its own wave is fixed).
    cohort_wave: Vec<Option<usize>>,
    live_at_publish: Vec<bool>,
    coverage: Vec<CoverageSample>,
    gate_decisions: Vec<(f64, String)>,
    last_view: Option<(usize, String)>,
}

impl Run {
    fn new(sc: Scenario) -> Self {
        let mut fleet = NodeFleet::serving_from_start(spec(&sc), BASELINE);
        let (mut site, mut up, mut down) = (vec![], vec![], vec![]);
        for (s, x) in sc.sites.iter().enumerate() {
            site.extend(std::iter::repeat_n(s, x.nodes));
            up.extend(std::iter::repeat_n(x.uplink_mbps * 125_000.0, x.nodes));
            down.extend(std::iter::repeat_n(x.downlink_mbps * 125_000.0, x.nodes));
        }
        let n = site.len();
        fleet.links = Links::new(site.clone(), up, down, sc.latency_ms.clone(), sc.jitter_ms, sc.loss);
        fleet.behaviour.insert(BASELINE, sc.model.baseline.clone());
        fleet.behaviour.insert(CANDIDATE, sc.model.candidate.clone());
        let start = fleet.now();
        let publish_at = start + at_secs(sc.rollout.publish_at_secs);
        let plan = sc.plan();
        let cohort_wave = (0..n)
            .map(|i| match membership(&plan, &fleet.id(i), &fleet.nodes[i].identity.tags, MODEL, CANDIDATE) {
                Membership::Wave(w) => Some(w),
                _ => None,
            })
            .collect();
        let mut faults = vec![];
        for p in &sc.faults.partitions {
            let sites: Vec<usize> =
                p.sites.iter().filter_map(|name| sc.sites.iter().position(|s| &s.name == name)).collect();
            let side: Vec<usize> = (0..n).filter(|i| sites.contains(&site[*i])).collect();
            faults.push((start + at_secs(p.from_secs), Fault::Cut(side.clone(), true)));
            faults.push((start + at_secs(p.until_secs), Fault::Cut(side, false)));
        }
        // Churners, joiners and leavers: distinct nodes, never the origin (node 0), drawn
        // by a partial Fisher-Yates shuffle from the fleet's seeded source.
        let f = &sc.faults;
        let count = |fraction: f64| (fraction * n as f64) as usize;
        let (churners, joiners, leavers) = (count(f.churn), count(f.joins), count(f.leaves));
        let window = f.churn_window_secs.unwrap_or(300.0);
        let mut pool: Vec<usize> = (1..n).collect();
        let mut joining = vec![];
        let mut returns_pending = 0;
        for k in 0..(churners + joiners + leavers).min(n - 1) {
            let pick = k + fleet.rng.below(pool.len() - k);
            pool.swap(k, pick);
            let node = pool[k];
            let at = publish_at + at_secs(fleet.rng.unit() * window);
            if k < churners {
                let back = at + at_secs(30.0 + 90.0 * fleet.rng.unit());
                faults.push((at, Fault::Crash(node)));
                faults.push((back, Fault::Start(node)));
                returns_pending += 1;
            } else if k < churners + joiners {
                joining.push(node);
                faults.push((at, Fault::Start(node)));
                returns_pending += 1;
            } else {
                faults.push((at, Fault::Crash(node)));
            }
        }
        // Stable: faults at the same time keep the order they were drawn in.
        faults.sort_by_key(|(t, _)| *t);
        for i in 0..n {
            if !joining.contains(&i) {
                fleet.start(i);
            }
        }
        let end = start + at_secs(sc.duration_secs);
        Run {
            plan,
            fleet,
            start,
            publish_at,
            published: false,
            metrics_gossip_at_publish: 0,
            end,
            ended_at: start,
            faults,
            returns_pending,
            cohort_wave,
            live_at_publish: vec![],
            coverage: vec![],
            gate_decisions: vec![],
            last_view: None,
            sc,
        }
    }

    fn go(&mut self, progress: &mut impl FnMut(f64, u64)) {
        let mut t = self.start;
        let mut fault = 0;
        while t < self.end {
            t += SECOND;
            while fault < self.faults.len() && self.faults[fault].0 <= t {
                let (at, what) = self.faults[fault].clone();
                self.fleet.run_until(at);
                self.apply(what);
                fault += 1;
            }
            if !self.published && self.publish_at <= t {
                self.fleet.run_until(self.publish_at);
                self.publish();
            }
            self.fleet.run_until(t);
            if self.published {
                self.note_gates();
            }
            if (t - self.start).is_multiple_of(SAMPLE_EVERY_SECS * SECOND) {
                self.sample();
                progress(secs(t - self.start), self.fleet.events_processed());
                if self.published && self.done() {
                    break;
                }
            }
        }
        self.ended_at = self.fleet.now();
        self.fleet.drain_gossip(GOSSIP_DRAIN);
    }

    fn apply(&mut self, fault: Fault) {
        match fault {
            Fault::Crash(i) => {
                if self.fleet.nodes[i].node.is_some() {
                    self.fleet.crash(i)
                }
            }
            Fault::Start(i) => {
                self.returns_pending = self.returns_pending.saturating_sub(1);
                if self.fleet.nodes[i].node.is_none() {
                    self.fleet.start(i)
                }
            }
            Fault::Cut(side, cut) => self.fleet.partition(&side, cut),
        }
    }

    fn publish(&mut self) {
        let manifest = self.fleet.manifest(CANDIDATE, &self.sc.rollout.waves, self.plan.gates.clone());
        self.live_at_publish = (0..self.fleet.nodes.len()).map(|i| self.fleet.nodes[i].node.is_some()).collect();
        self.metrics_gossip_at_publish = self.fleet.gossip_bytes.get(TOPIC_METRICS).copied().unwrap_or(0);
        if let Err(e) = self.fleet.publish(0, manifest) {
            panic!("the candidate does not publish at the origin: {e}");
        }
        self.published = true;
    }

    /// The origin's view of the rollout, noted when its open waves or verdict change.
    fn note_gates(&mut self) {
        let Some(view) = self.origin_view() else { return };
        let kind = match (&view.halted, &view.verdict) {
            (Some(h), _) => format!("halted: {h}"),
            (None, GateVerdict::Pass) => "pass".into(),
            (None, GateVerdict::Fail(r)) => format!("fail: {r}"),
            (None, GateVerdict::Pending(_)) => "pending".into(),
        };
        let key = (view.waves_open, kind.clone());
        if self.last_view.as_ref() == Some(&key) {
            return;
        }
        let text = match &view.verdict {
            GateVerdict::Pending(r) if view.halted.is_none() => format!("pending: {r}"),
            _ => kind,
        };
        let t = secs(self.fleet.now().saturating_sub(self.publish_at));
        self.gate_decisions.push((t, format!("{text} ({} of {} wave(s) open)", view.waves_open, view.waves)));
        self.last_view = Some(key);
    }

    /// The origin's view of the candidate's rollout (the fleet's, as the report tells it).
    fn origin_view(&self) -> Option<&RolloutView> {
        let origin = self.fleet.nodes[0].node.as_ref()?;
        origin.rollouts().iter().find(|v| v.model == MODEL && v.version == CANDIDATE)
    }

    fn has_candidate(&self, i: usize) -> bool {
        self.fleet.nodes[i].blobs.contains(&NodeFleet::weights_blob(CANDIDATE))
    }

    fn wave_of(&self, i: usize) -> Option<usize> {
        match self.fleet.my_wave(i, CANDIDATE) {
            Some(w) => Some(w as usize),
            None => self.cohort_wave[i],
        }
    }

    fn sample(&mut self) {
        let n = self.fleet.nodes.len();
        let serving = |i: usize| self.fleet.serving(i) == Some(CANDIDATE);
        let staged = (0..n).filter(|i| self.has_candidate(*i)).count();
        let active = (0..n).filter(|i| serving(*i)).count();
        let mut per_wave = vec![(0usize, 0usize); self.plan.waves.len()];
        for i in 0..n {
            if let Some(w) = self.wave_of(i).filter(|w| *w < per_wave.len()) {
                per_wave[w].0 += 1;
                per_wave[w].1 += usize::from(serving(i));
            }
        }
        self.coverage.push(CoverageSample {
            secs: secs(self.fleet.now() - self.start),
            staged: staged as f64 / n as f64,
            active: active as f64 / n as f64,
            waves_active: per_wave.iter().map(|(m, a)| if *m == 0 { 0.0 } else { *a as f64 / *m as f64 }).collect(),
            origin_bytes: self.fleet.nodes[0].piece_bytes_sent,
        });
    }

    /// Every live node settled: all serving v2, or the rollout halted and none serves
    /// it; and no node is still to come back or join.
    fn done(&self) -> bool {
        if self.returns_pending > 0 {
            return false;
        }
        let mut live = self.fleet.live();
        let all_v2 = live.all(|i| self.fleet.serving(i) == Some(CANDIDATE) && self.has_candidate(i));
        let halted = self.origin_view().is_some_and(|v| v.halted.is_some());
        all_v2 || (halted && self.fleet.live().all(|i| self.fleet.serving(i) != Some(CANDIDATE)))
    }

    fn report(&self) -> Report {
        let fleet = &self.fleet;
        let n = fleet.nodes.len();
        let after = |t: Micros| secs(t.saturating_sub(self.publish_at));
        let first_served = fleet.first_served(CANDIDATE, self.publish_at);
        let waves = (0..self.plan.waves.len())
            .map(|w| {
                let mut times: Vec<f64> = (0..n)
                    .filter(|i| self.wave_of(*i) == Some(w))
                    .map(|i| first_served[i].unwrap_or(f64::INFINITY))
                    .collect();
                times.sort_by(f64::total_cmp);
                let members = times.len();
                let at = |q: f64| {
                    if members == 0 {
                        return None;
                    }
                    let i = ((q * members as f64).ceil() as usize).clamp(1, members) - 1;
                    Some(times[i]).filter(|t| t.is_finite())
                };
                WaveReport {
                    wave: w + 1,
                    members,
                    p50_secs: at(0.5),
                    p90_secs: at(0.9),
                    p99_secs: at(0.99),
                    p100_secs: at(1.0),
                }
            })
            .collect();
        let blob = NodeFleet::weights_blob(CANDIDATE);
        let completed_at = |i: usize| fleet.nodes[i].completed.iter().find(|(_, b)| *b == blob).map(|(t, _)| *t);
        // The origin holds the file from the start; the others must fetch it.
        let fetchers: Vec<usize> = fleet.live().filter(|i| *i != 0).collect();
        let distribution_secs =
            fetchers.iter().map(|i| completed_at(*i).map(after)).try_fold(0.0, |max: f64, t| t.map(|t| max.max(t)));
        let f = fleet.spec.model_bytes as f64;
        let u_s = self.sc.sites[0].uplink_mbps * 125_000.0;
        let d_min = self.sc.sites.iter().map(|s| s.downlink_mbps * 125_000.0).fold(f64::INFINITY, f64::min);
        let sum_u: f64 = self.sc.sites.iter().map(|s| s.nodes as f64 * s.uplink_mbps * 125_000.0).sum();
        let bound = (f / u_s).max(f / d_min).max((n - 1) as f64 * f / sum_u);
        let mut prop: Vec<f64> = (0..n)
            .filter(|i| self.live_at_publish.get(*i).copied().unwrap_or(false))
            .map(|i| {
                let learned = fleet.nodes[i].learned.iter().find(|(_, v)| *v >= CANDIDATE);
                learned.map_or(f64::INFINITY, |(t, _)| after(*t))
            })
            .collect();
        prop.sort_by(f64::total_cmp);
        let q = |v: &[f64], q: f64| {
            (!v.is_empty()).then(|| v[((q * v.len() as f64) as usize).min(v.len() - 1)]).filter(|x| x.is_finite())
        };
        let span = secs(self.ended_at - self.start).max(1e-9);
        let origin_egress = fleet.nodes[0].piece_bytes_sent;
        let sent = |topic: &str| fleet.gossip_bytes.get(topic).copied().unwrap_or(0);
        let gossip = |topic: &str| sent(topic) as f64 / n as f64 / span;
        let metrics_total = sent(TOPIC_METRICS);
        // All of it came before publication if the run ended first (`publish_at_secs` past
        // its end).
        let (metrics_before, rollout_secs) = if self.published {
            (self.metrics_gossip_at_publish, secs(self.ended_at.saturating_sub(self.publish_at)))
        } else {
            (metrics_total, 0.0)
        };
        let ever = (0..n).filter(|i| first_served[*i].is_some()).count();
        let halted = self.origin_view().and_then(|v| v.halted.clone());
        Report {
            scenario: self.sc.name.clone(),
            seed: self.sc.seed,
            nodes: n,
            sites: self.sc.sites.len(),
            events: fleet.events_processed(),
            simulated_secs: span,
            model_bytes: fleet.spec.model_bytes,
            waves,
            distribution_secs,
            kumar_ross_secs: bound,
            distribution_over_bound: distribution_secs.map(|d| d / bound),
            origin_egress_bytes: origin_egress,
            origin_egress_per_site: origin_egress as f64 / f / self.sc.sites.len() as f64,
            cross_site_bytes: fleet.links.cross_site,
            partition_drops: fleet.links.partition_drops,
            manifest_propagation_p50_secs: q(&prop, 0.5),
            manifest_propagation_p99_secs: q(&prop, 0.99),
            manifest_gossip_bytes_per_node_per_sec: gossip(TOPIC_MANIFESTS),
            metrics_gossip_bytes_per_node_per_sec: gossip(TOPIC_METRICS),
            metrics_gossip_start_bytes_per_node: metrics_before as f64 / n as f64,
            metrics_gossip_rollout_bytes_per_node_per_sec: metrics_total.saturating_sub(metrics_before) as f64
                / n as f64
                / rollout_secs.max(1e-9),
            have_bytes_per_node: fleet.request_bytes.get(&RequestKind::Have).copied().unwrap_or(0) as f64 / n as f64,
            ever_activated_fraction: ever as f64 / n as f64,
            halted,
            coverage: self.coverage.clone(),
            gate_decisions: self.gate_decisions.clone(),
        }
    }
}
