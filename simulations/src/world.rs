//! The simulated fleet: nodes that receive a manifest by gossip, fetch the model in chunks
//! from ranked providers, measure their requests, and roll the new version out by the
//! same protocol code the node runs (`cohort::membership`, `mesh::rank_providers`,
//! `mesh::upload_decision`, `fleet::{FleetView, evaluate_gates, advance, decide}`).
//!
//! Simplifications, stated so the report can be read right: have records are not
//! simulated message by message (a finished node is a known provider at once; their bytes
//! are counted); metrics are summarised per site (each node's record goes to its site's
//! aggregator, which gossips one merged record per site), so gates compare medians across
//! sites rather than nodes.

use crate::engine::{Micros, Queue, Rng, SECOND};
use crate::net::{Links, Partition};
use crate::scenario::{Behaviour, Scenario, Transfer};
use rustc_hash::FxHashMap;
use serde::Serialize;
use slmesh_protocol::cohort::{membership, Membership};
use slmesh_protocol::fleet::{
    advance, decide, evaluate_gates, FleetView, GateVerdict, MetricsRecord, OperatorState, RolloutDecision,
    RolloutProgress, VersionReport,
};
use slmesh_protocol::mesh::{rank_providers, upload_decision, ProviderInfo, UploadPolicy};
use slmesh_protocol::rollout::RolloutPlan;
use slmesh_protocol::swarm::{next_to_serve, pick_piece, piece_upload_decision, PieceSet, SwarmPolicy};
use slmesh_protocol::NodeId;
use std::collections::HashMap;
use std::rc::Rc;

const MODEL: &str = "model";
const CANDIDATE: u64 = 2;
const BASELINE: u64 = 1;
const ROLLOUT_TICK: Micros = 2 * SECOND;
const SAMPLE_EVERY: Micros = 5 * SECOND;
/// How often a fetching node refreshes the providers it knows (in the node, have records
/// bring them); a fetcher with nothing to ask for refreshes at once.
const KNOWN_REFRESH: Micros = SECOND / 4;
/// How long a fetcher with nothing to ask for waits before it looks again. After 8 such
/// looks in a row (a partition, say) the wait doubles with each, up to 32 times this.
const FETCH_RETRY: Micros = SECOND / 20;

#[derive(Debug, Clone, Copy)]
enum Msg {
    Manifest,
    SiteMetrics { site: u32, seq: u64 },
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    Publish,
    Gossip { to: u32, from: u32, msg: Msg },
    Chunk { to: u32, from: u32 },
    Piece { to: u32, from: u32, piece: u32 },
    SlotFree { node: u32 },
    Heartbeat { node: u32 },
    IHave { to: u32, from: u32, msg: Msg },
    TryFetch { node: u32 },
    MetricsTick { node: u32 },
    SiteRecord { site: u32 },
    RolloutTick { node: u32 },
    Crash { node: u32 },
    Restart { node: u32 },
    Sample,
}

struct Node {
    id: NodeId,
    site: usize,
    alive: bool,
    mesh: Vec<u32>,
    manifest_at: Option<Micros>,
    /// Pieces held (whole-file transfers fill them in order).
    pieces: PieceSet,
    /// Whole-file transfer: the one provider.
    fetching: Option<u32>,
    /// Piece transfers: pieces asked for, and of whom.
    requested: PieceSet,
    in_flight: Vec<(u32, u32)>,
    /// Providers this fetcher knows, best first, and when it last looked.
    known: Vec<u32>,
    known_at: Option<Micros>,
    /// Looks in a row that found nothing to ask for.
    idle_looks: u32,
    staged_at: Option<Micros>,
    active: u64,
    active_v2_at: Option<Micros>,
    ever_v2: bool,
    uploads: usize,
    /// Piece requests waiting for an upload slot: (fetcher, piece).
    upload_queue: Vec<(u32, u32)>,
    wave: Option<usize>,
    progress: RolloutProgress,
}

#[derive(Debug, Clone, Serialize)]
pub struct CoverageSample {
    pub secs: f64,
    /// Fraction of all nodes with the file staged.
    pub staged: f64,
    /// Fraction of all nodes active on the new version.
    pub active: f64,
    /// Per wave: fraction of its members active on the new version.
    pub waves_active: Vec<f64>,
    /// Bytes the origin has uploaded so far.
    pub origin_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WaveReport {
    pub wave: usize,
    pub members: usize,
    /// Seconds after publication until 50/90/99/100% of the wave's members were active on
    /// the new version (None: never reached).
    pub p50_secs: Option<f64>,
    pub p90_secs: Option<f64>,
    pub p99_secs: Option<f64>,
    pub p100_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub nodes: usize,
    pub sites: usize,
    pub events: u64,
    pub simulated_secs: f64,
    pub model_bytes: u64,
    pub waves: Vec<WaveReport>,
    /// Seconds from publication until every live node had the file staged.
    pub distribution_secs: Option<f64>,
    /// The Kumar-Ross lower bound max(F/u_s, F/d_min, N F / (u_s + sum u_i)), seconds.
    pub kumar_ross_secs: f64,
    pub distribution_over_bound: Option<f64>,
    pub origin_egress_bytes: u64,
    pub origin_egress_per_site: f64,
    pub cross_site_bytes: u64,
    pub partition_drops: u64,
    pub manifest_propagation_p50_secs: Option<f64>,
    pub manifest_propagation_p99_secs: Option<f64>,
    pub manifest_gossip_bytes_per_node_per_sec: f64,
    pub metrics_gossip_bytes_per_node_per_sec: f64,
    pub have_bytes_per_node_per_sec: f64,
    /// Fraction of nodes that ever activated the new version.
    pub ever_activated_fraction: f64,
    pub halted: Option<String>,
    /// Every 5 simulated seconds.
    pub coverage: Vec<CoverageSample>,
    /// (seconds, verdict) whenever the origin's view of the gates changed.
    pub gate_decisions: Vec<(f64, String)>,
}

/// Per piece, the live nodes (the origin aside) that hold it or are being sent it, in all
/// and per site.
struct Copies {
    all: Vec<u32>,
    per_site: Vec<u32>,
}

impl Copies {
    fn new(pieces: u32, sites: usize) -> Self {
        Copies { all: vec![0; pieces as usize], per_site: vec![0; pieces as usize * sites] }
    }

    fn add(&mut self, site: usize, piece: u32) {
        self.all[piece as usize] += 1;
        self.per_site[site * self.all.len() + piece as usize] += 1;
    }

    fn remove(&mut self, site: usize, piece: u32) {
        self.all[piece as usize] -= 1;
        self.per_site[site * self.all.len() + piece as usize] -= 1;
    }

    fn in_site(&self, site: usize, piece: u32) -> u32 {
        self.per_site[site * self.all.len() + piece as usize]
    }
}

pub struct World {
    sc: Scenario,
    plan: RolloutPlan,
    q: Queue<Ev>,
    rng: Rng,
    links: Links,
    nodes: Vec<Node>,
    chunks_total: u32,
    chunk_bytes: u64,
    /// Whole-file transfers: nodes holding the whole file.
    holders: Vec<u32>,
    /// Piece transfers: nodes holding at least one piece, and per piece the live nodes
    /// (the origin aside) that hold it or are being sent it.
    sources: Vec<u32>,
    copies: Copies,
    origin: u32,
    policy: UploadPolicy,
    swarm: SwarmPolicy,
    have_bytes_total: u64,
    /// Restarts and joins still to come: the run is not settled before they happened.
    returns_pending: usize,
    site_members: Vec<Vec<u32>>,
    site_ids: Vec<NodeId>,
    site_records: Vec<Vec<Rc<MetricsRecord>>>,
    /// Per site, the merged measurements of its members (baseline, candidate): what its
    /// aggregator holds from their records, kept until they expire as the node keeps them.
    site_totals: Vec<[VersionReport; 2]>,
    verdicts: FxHashMap<Vec<u64>, GateVerdict>,
    /// Reused buffers of the hot paths (no allocation per event).
    scratch_held: Vec<u32>,
    scratch_view: Vec<u64>,
    /// Per node and site (`node * sites + site`): the newest site record seen and when it
    /// arrived. Dense, apart from the nodes: the heartbeat reads it for every node.
    view_seq: Vec<u64>,
    view_at: Vec<Micros>,
    scratch_ids: Vec<Msg>,
    publish_at: Micros,
    manifest_bytes_total: u64,
    metrics_bytes_total: u64,
    coverage: Vec<CoverageSample>,
    gate_decisions: Vec<(f64, String)>,
    end: Micros,
}

/// The id of simulated node `i`: cohorts (and so waves) follow from it.
pub fn node_id(i: u64) -> NodeId {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&i.to_le_bytes());
    // Spread the ids: cohorts hash them anyway, but keep them distinct from site ids.
    b[31] = 1;
    NodeId::from_bytes(b)
}

fn secs(t: Micros) -> f64 {
    t as f64 / SECOND as f64
}

impl World {
    pub fn new(sc: Scenario) -> Self {
        let mut rng = Rng::new(sc.seed);
        let plan = sc.plan();
        let mut site = vec![];
        let (mut up, mut down) = (vec![], vec![]);
        let mut site_members = vec![vec![]; sc.sites.len()];
        for (s, spec) in sc.sites.iter().enumerate() {
            for _ in 0..spec.nodes {
                site_members[s].push(site.len() as u32);
                site.push(s);
                up.push(spec.uplink_mbps * 125_000.0);
                down.push(spec.downlink_mbps * 125_000.0);
            }
        }
        let n = site.len();
        let chunk_bytes = ((sc.model.chunk_mb * 1e6) as u64).max(1);
        let model_bytes = (sc.model.size_mb * 1e6) as u64;
        let chunks_total = model_bytes.div_ceil(chunk_bytes) as u32;
        let mut links = Links::new(site.clone(), up, down, sc.latency_ms.clone(), sc.jitter_ms, sc.loss);
        for p in &sc.faults.partitions {
            let side = p.sites.iter().filter_map(|name| sc.sites.iter().position(|s| &s.name == name)).collect();
            links.partitions.push(Partition {
                from: (p.from_secs * SECOND as f64) as Micros,
                until: (p.until_secs * SECOND as f64) as Micros,
                side,
            });
        }
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| {
                let id = node_id(i as u64);
                let wave = match membership(&plan, &id, &Default::default(), MODEL, CANDIDATE) {
                    Membership::Wave(w) => Some(w),
                    _ => None,
                };
                Node {
                    id,
                    site: site[i],
                    alive: true,
                    mesh: vec![],
                    manifest_at: None,
                    pieces: PieceSet::new(chunks_total),
                    fetching: None,
                    requested: PieceSet::new(chunks_total),
                    in_flight: vec![],
                    known: vec![],
                    known_at: None,
                    idle_looks: 0,
                    staged_at: None,
                    active: BASELINE,
                    active_v2_at: None,
                    ever_v2: false,
                    uploads: 0,
                    upload_queue: vec![],
                    wave,
                    progress: RolloutProgress::default(),
                }
            })
            .collect();
        // A gossip mesh shaped like gossipsub's: links both ways, every node with about D
        // mesh peers (gossipsub keeps the degree near D by grafting and pruning).
        let d = sc.gossip.degree.min(n - 1);
        for i in 0..n {
            let mut tries = 0;
            while nodes[i].mesh.len() < d && tries < 100 {
                tries += 1;
                let j = rng.below(n);
                if j != i && nodes[j].mesh.len() < d && !nodes[i].mesh.contains(&(j as u32)) {
                    nodes[i].mesh.push(j as u32);
                    nodes[j].mesh.push(i as u32);
                }
            }
        }
        let site_ids = (0..sc.sites.len()).map(|s| node_id(u64::MAX - s as u64)).collect();
        let publish_at = (sc.rollout.publish_at_secs * SECOND as f64) as Micros;
        let end = (sc.duration_secs * SECOND as f64) as Micros;
        let mut w = World {
            plan,
            q: Queue::default(),
            rng,
            links,
            nodes,
            chunks_total,
            chunk_bytes,
            holders: vec![],
            sources: vec![],
            copies: Copies::new(chunks_total, sc.sites.len()),
            origin: 0,
            policy: UploadPolicy::default(),
            swarm: sc.swarm.clone(),
            have_bytes_total: 0,
            returns_pending: 0,
            site_members,
            site_ids,
            site_records: vec![vec![]; sc.sites.len()],
            site_totals: vec![
                [
                    VersionReport { model: MODEL.into(), version: BASELINE, ..Default::default() },
                    VersionReport { model: MODEL.into(), version: CANDIDATE, ..Default::default() },
                ];
                sc.sites.len()
            ],
            verdicts: FxHashMap::default(),
            scratch_held: vec![],
            scratch_view: vec![],
            view_seq: vec![0; n * sc.sites.len()],
            view_at: vec![0; n * sc.sites.len()],
            scratch_ids: vec![],
            publish_at,
            manifest_bytes_total: 0,
            metrics_bytes_total: 0,
            coverage: vec![],
            gate_decisions: vec![],
            end,
            sc,
        };
        w.q.at(publish_at, Ev::Publish);
        w.q.at(0, Ev::Sample);
        let interval = (w.sc.gossip.metrics_interval_secs * SECOND as f64) as Micros;
        for i in 0..n as u32 {
            // Spread the periodic work of the nodes over the interval.
            let offset = w.rng.below(interval.max(1) as usize) as Micros;
            w.q.at(offset, Ev::MetricsTick { node: i });
            w.q.at(publish_at + offset % ROLLOUT_TICK, Ev::RolloutTick { node: i });
        }
        let heartbeat = (w.sc.gossip.heartbeat_secs * SECOND as f64) as Micros;
        for i in 0..n as u32 {
            let offset = w.rng.below(heartbeat.max(1) as usize) as Micros;
            w.q.at(offset, Ev::Heartbeat { node: i });
        }
        for s in 0..w.sc.sites.len() as u32 {
            w.q.at(interval / 2 + s as Micros, Ev::SiteRecord { site: s });
        }
        // Churners, joiners and leavers: distinct nodes, never the origin (node 0), drawn
        // by a partial Fisher-Yates shuffle.
        let faults = &w.sc.faults;
        let count = |fraction: f64| (fraction * n as f64) as usize;
        let (churners, joiners, leavers) = (count(faults.churn), count(faults.joins), count(faults.leaves));
        let window = faults.churn_window_secs.unwrap_or(300.0) * SECOND as f64;
        let mut pool: Vec<u32> = (1..n as u32).collect();
        for k in 0..(churners + joiners + leavers).min(n - 1) {
            let pick = k + w.rng.below(pool.len() - k);
            pool.swap(k, pick);
            let node = pool[k];
            let at = publish_at + (w.rng.unit() * window) as Micros;
            if k < churners {
                let back = at + (30.0 + 90.0 * w.rng.unit()) as Micros * SECOND;
                w.q.at(at, Ev::Crash { node });
                w.q.at(back, Ev::Restart { node });
                w.returns_pending += 1;
            } else if k < churners + joiners {
                // Not there at the start: it joins (starts for the first time) at `at`.
                w.nodes[node as usize].alive = false;
                w.q.at(at, Ev::Restart { node });
                w.returns_pending += 1;
            } else {
                w.q.at(at, Ev::Crash { node }); // and never comes back
            }
        }
        w
    }

    pub fn run(self) -> Report {
        self.run_with_progress(|_, _| {})
    }

    /// Runs, calling `progress(simulated seconds, events)` every million events.
    pub fn run_with_progress(mut self, mut progress: impl FnMut(f64, u64)) -> Report {
        while let Some((t, ev)) = self.q.pop() {
            if self.q.processed().is_multiple_of(1_000_000) {
                progress(secs(t), self.q.processed());
            }
            if t > self.end {
                break;
            }
            let sampling = matches!(ev, Ev::Sample);
            self.step(ev);
            // Checked at each coverage sample (every 5 simulated seconds): a scan of the
            // fleet after every event would cost more than the events.
            if sampling && self.done() {
                break;
            }
        }
        self.report()
    }

    /// Every live node settled: all active on the new version, or the rollout halted and
    /// no node runs it; and no node is still to come back or join.
    fn done(&self) -> bool {
        if self.returns_pending > 0 {
            return false;
        }
        let live = self.nodes.iter().filter(|n| n.alive);
        let all_v2 = live.clone().all(|n| n.active == CANDIDATE && n.staged_at.is_some());
        let halted_and_clean = self.nodes[self.origin as usize].progress.halted.is_some()
            && live.clone().all(|n| n.active == BASELINE && n.fetching.is_none() && n.in_flight.is_empty());
        all_v2 || halted_and_clean
    }

    fn step(&mut self, ev: Ev) {
        let now = self.q.now();
        match ev {
            Ev::Publish => {
                let o = self.origin as usize;
                self.nodes[o].manifest_at = Some(now);
                self.nodes[o].pieces = PieceSet::full(self.chunks_total);
                self.nodes[o].staged_at = Some(now);
                self.holders.push(self.origin);
                self.sources.push(self.origin);
                self.flood(self.origin, None, Msg::Manifest);
            }
            Ev::Gossip { to, from, msg } => self.on_gossip(to, from, msg),
            Ev::Chunk { to, from } => self.on_chunk(to, from),
            Ev::Piece { to, from, piece } => self.on_piece(to, from, piece),
            Ev::SlotFree { node } => {
                let n = &mut self.nodes[node as usize];
                n.uploads = n.uploads.saturating_sub(1);
                if n.alive {
                    self.serve(node);
                }
            }
            Ev::Heartbeat { node } => {
                self.heartbeat(node);
                self.q.after((self.sc.gossip.heartbeat_secs * SECOND as f64) as Micros, Ev::Heartbeat { node });
            }
            Ev::IHave { to, from, msg } => self.on_ihave(to, from, msg),
            Ev::TryFetch { node } => self.try_fetch(node),
            Ev::MetricsTick { node } => self.metrics_tick(node),
            Ev::SiteRecord { site } => self.site_record(site),
            Ev::RolloutTick { node } => {
                self.rollout_tick(node);
                self.q.after(ROLLOUT_TICK, Ev::RolloutTick { node });
            }
            Ev::Crash { node } => {
                let n = &mut self.nodes[node as usize];
                if !n.alive {
                    return;
                }
                n.alive = false;
                n.fetching = None;
                // What it held or was being sent is no longer on offer.
                for p in n.pieces.iter().chain(n.in_flight.iter().map(|(p, _)| *p)) {
                    self.copies.remove(n.site, p);
                }
                n.in_flight.clear();
                n.requested = PieceSet::new(self.chunks_total);
                n.known_at = None;
                // Requests waiting here go elsewhere.
                for (fetcher, piece) in std::mem::take(&mut n.upload_queue) {
                    if self.drop_claim(fetcher, node, piece) {
                        self.q.after(0, Ev::TryFetch { node: fetcher });
                    }
                }
                self.holders.retain(|h| *h != node);
            }
            Ev::Restart { node } => {
                self.returns_pending = self.returns_pending.saturating_sub(1);
                let n = &mut self.nodes[node as usize];
                if n.alive {
                    return;
                }
                n.alive = true;
                n.uploads = 0;
                for p in n.pieces.iter() {
                    self.copies.add(n.site, p);
                }
                if n.pieces.is_full() {
                    self.holders.push(node);
                }
                // Back online, it asks a peer for what it lacks (anti-entropy).
                if n.manifest_at.is_some() || self.nodes[self.origin as usize].manifest_at.is_some() {
                    self.nodes[node as usize].manifest_at.get_or_insert(now);
                    self.q.after(SECOND, Ev::TryFetch { node });
                }
            }
            Ev::Sample => {
                self.sample();
                self.q.after(SAMPLE_EVERY, Ev::Sample);
            }
        }
    }

    fn sample(&mut self) {
        let n = self.nodes.len() as f64;
        let staged = self.nodes.iter().filter(|x| x.staged_at.is_some()).count() as f64 / n;
        let active = self.nodes.iter().filter(|x| x.active == CANDIDATE).count() as f64 / n;
        let waves_active = (0..self.plan.waves.len())
            .map(|w| {
                let members = self.nodes.iter().filter(|x| x.wave == Some(w));
                let (total, on) =
                    members.fold((0usize, 0usize), |(t, a), x| (t + 1, a + usize::from(x.active == CANDIDATE)));
                if total == 0 {
                    0.0
                } else {
                    on as f64 / total as f64
                }
            })
            .collect();
        self.coverage.push(CoverageSample {
            secs: secs(self.q.now()),
            staged,
            active,
            waves_active,
            origin_bytes: self.links.sent[self.origin as usize],
        });
    }

    fn message_bytes(&self, msg: Msg) -> u64 {
        match msg {
            Msg::Manifest => self.sc.gossip.manifest_bytes,
            Msg::SiteMetrics { .. } => self.sc.gossip.metrics_record_bytes,
        }
    }

    fn count_gossip_bytes(&mut self, msg: Msg, bytes: u64) {
        match msg {
            Msg::Manifest => self.manifest_bytes_total += bytes,
            Msg::SiteMetrics { .. } => self.metrics_bytes_total += bytes,
        }
    }

    fn view_index(&self, node: u32, site: u32) -> usize {
        node as usize * self.sc.sites.len() + site as usize
    }

    /// Whether `node` lacks `msg` (for a site record: this one or a newer one).
    fn lacks(&self, node: u32, msg: Msg) -> bool {
        match msg {
            Msg::Manifest => self.nodes[node as usize].manifest_at.is_none(),
            Msg::SiteMetrics { site, seq } => self.view_seq[self.view_index(node, site)] < seq,
        }
    }

    /// When `node` received `msg`, if it holds it (for a site record: this very one).
    fn received_at(&self, node: u32, msg: Msg) -> Option<Micros> {
        let n = &self.nodes[node as usize];
        match msg {
            Msg::Manifest => n.manifest_at,
            Msg::SiteMetrics { site, seq } => {
                let i = self.view_index(node, site);
                (self.view_seq[i] == seq).then_some(self.view_at[i])
            }
        }
    }

    fn latency(&self, a: u32, b: u32) -> Micros {
        let (sa, sb) = (self.nodes[a as usize].site, self.nodes[b as usize].site);
        (self.sc.latency_ms[sa][sb] * 1000.0) as Micros
    }

    /// Sends `msg` to every mesh peer of `from` but the one it came from and those whose
    /// IDONTWANT for it has arrived (gossipsub 1.2, for messages over the threshold).
    fn flood(&mut self, from: u32, came_from: Option<u32>, msg: Msg) {
        let bytes = self.message_bytes(msg);
        let idontwant = bytes > self.sc.gossip.idontwant_threshold_bytes;
        let now = self.q.now();
        for i in 0..self.nodes[from as usize].mesh.len() {
            let to = self.nodes[from as usize].mesh[i];
            if !self.nodes[to as usize].alive || Some(to) == came_from {
                continue;
            }
            if idontwant && self.received_at(to, msg).is_some_and(|t| t + self.latency(to, from) <= now) {
                continue;
            }
            self.count_gossip_bytes(msg, bytes);
            if let Some(at) = self.links.send(now, from as usize, to as usize, bytes, true, &mut self.rng) {
                self.q.at(at, Ev::Gossip { to, from, msg });
            }
        }
    }

    fn on_gossip(&mut self, to: u32, from: u32, msg: Msg) {
        let now = self.q.now();
        if !self.nodes[to as usize].alive {
            return;
        }
        // gossipsub 1.2 tells its other mesh peers IDONTWANT on every copy that arrives,
        // before it checks for a duplicate.
        if self.message_bytes(msg) > self.sc.gossip.idontwant_threshold_bytes {
            let peers = self.nodes[to as usize].mesh.len().saturating_sub(1) as u64;
            let frame = self.sc.gossip.control_bytes + self.sc.gossip.message_id_bytes;
            self.count_gossip_bytes(msg, peers * frame);
        }
        let node = &mut self.nodes[to as usize];
        match msg {
            Msg::Manifest => {
                if node.manifest_at.is_some() {
                    return;
                }
                node.manifest_at = Some(now);
                self.flood(to, Some(from), msg);
                self.try_fetch(to);
            }
            Msg::SiteMetrics { site, seq } => {
                let i = self.view_index(to, site);
                if self.view_seq[i] >= seq {
                    return;
                }
                self.view_seq[i] = seq;
                self.view_at[i] = now;
                self.flood(to, Some(from), msg);
            }
        }
    }

    /// gossipsub's heartbeat: IHAVE with the ids of the messages of the last few
    /// heartbeats to a few peers outside the mesh. Those that lack one ask IWANT.
    fn heartbeat(&mut self, node: u32) {
        if !self.nodes[node as usize].alive {
            return;
        }
        let now = self.q.now();
        let window = (self.sc.gossip.history_gossip as f64 * self.sc.gossip.heartbeat_secs * SECOND as f64) as Micros;
        let recent = |t: Micros| t + window > now;
        let n = &self.nodes[node as usize];
        let mut ids = std::mem::take(&mut self.scratch_ids);
        ids.clear();
        if n.manifest_at.is_some_and(recent) {
            ids.push(Msg::Manifest);
        }
        let sites = self.sc.sites.len();
        let views = node as usize * sites..(node as usize + 1) * sites;
        for (site, (&seq, &at)) in self.view_seq[views.clone()].iter().zip(&self.view_at[views]).enumerate() {
            if seq > 0 && recent(at) {
                ids.push(Msg::SiteMetrics { site: site as u32, seq });
            }
        }
        if ids.is_empty() {
            self.scratch_ids = ids;
            return;
        }
        let total = self.nodes.len();
        let (control, id_bytes) = (self.sc.gossip.control_bytes, self.sc.gossip.message_id_bytes);
        for _ in 0..self.sc.gossip.lazy_degree.min(total - 1) {
            let to = self.rng.below(total) as u32;
            if to == node || self.nodes[node as usize].mesh.contains(&to) || !self.nodes[to as usize].alive {
                continue;
            }
            let frame_share = control / ids.len() as u64;
            for &msg in &ids {
                self.count_gossip_bytes(msg, frame_share + id_bytes);
                // A peer that holds the message already drops the id; only the others
                // make an event.
                if self.lacks(to, msg) {
                    let bytes = control + id_bytes;
                    if let Some(at) = self.links.send(now, node as usize, to as usize, bytes, true, &mut self.rng) {
                        self.q.at(at, Ev::IHave { to, from: node, msg });
                    }
                }
            }
        }
        self.scratch_ids = ids;
    }

    /// An IHAVE arrived: ask IWANT if the message is still missing; the peer sends it.
    fn on_ihave(&mut self, to: u32, from: u32, msg: Msg) {
        if !self.nodes[to as usize].alive || !self.lacks(to, msg) || !self.nodes[from as usize].alive {
            return;
        }
        let now = self.q.now();
        let want = self.sc.gossip.control_bytes + self.sc.gossip.message_id_bytes;
        self.count_gossip_bytes(msg, want);
        let Some(asked) = self.links.send(now, to as usize, from as usize, want, true, &mut self.rng) else { return };
        let bytes = self.message_bytes(msg);
        self.count_gossip_bytes(msg, bytes);
        if let Some(at) = self.links.send(asked, from as usize, to as usize, bytes, true, &mut self.rng) {
            self.q.at(at, Ev::Gossip { to, from, msg });
        }
    }

    fn try_fetch(&mut self, node: u32) {
        match self.sc.model.transfer {
            Transfer::Whole => self.fetch_whole(node),
            Transfer::Pieces => self.fetch_pieces(node),
        }
    }

    /// Up to 8 holders in the node's site and 8 elsewhere, from `pool` (scanned from a
    /// random point, at most 512 entries, so large fleets stay fast), reachable now. A
    /// node knows a handful of holders, not all.
    fn sample_holders(&mut self, node: u32, pool: &[u32]) -> (Vec<u32>, Vec<u32>) {
        let now = self.q.now();
        let my_site = self.nodes[node as usize].site;
        let (mut same, mut other) = (vec![], vec![]);
        let total = pool.len();
        let start = self.rng.below(total.max(1));
        for k in 0..total.min(512) {
            let h = pool[(start + k) % total];
            if h == node || !self.nodes[h as usize].alive || self.links.partitioned(now, h as usize, node as usize) {
                continue;
            }
            let list = if self.nodes[h as usize].site == my_site { &mut same } else { &mut other };
            if list.len() < 8 {
                list.push(h);
            }
            if same.len() == 8 && other.len() == 8 {
                break;
            }
        }
        (same, other)
    }

    /// `holders` in the protocol core's provider order (same site, then RTT, then id).
    fn ranked(&self, node: u32, holders: Vec<u32>) -> Vec<u32> {
        let my_site_index = self.nodes[node as usize].site;
        let my_site = &self.sc.sites[my_site_index].name;
        let candidates: Vec<ProviderInfo> = holders
            .iter()
            .map(|h| {
                let p = &self.nodes[*h as usize];
                ProviderInfo {
                    node: p.id,
                    site: Some(self.sc.sites[p.site].name.clone()),
                    rtt_micros: Some((2000.0 * self.sc.latency_ms[my_site_index][p.site]) as u64),
                }
            })
            .collect();
        let by_id: HashMap<NodeId, u32> = holders.iter().map(|h| (self.nodes[*h as usize].id, *h)).collect();
        rank_providers(candidates, Some(my_site)).into_iter().map(|id| by_id[&id]).collect()
    }

    /// Piece transfers: keep up to `requests_in_flight` pieces coming, one per provider,
    /// the rarest each provider has that this node lacks.
    fn fetch_pieces(&mut self, node: u32) {
        let now = self.q.now();
        let me = &self.nodes[node as usize];
        if !me.alive || me.manifest_at.is_none() || me.pieces.is_full() {
            return;
        }
        if me.known_at.is_none_or(|t| t + KNOWN_REFRESH <= now) {
            let sources = std::mem::take(&mut self.sources);
            let (mut same, other) = self.sample_holders(node, &sources);
            self.sources = sources;
            same.extend(other);
            let origin = self.origin;
            if origin != node && !same.contains(&origin) && self.nodes[origin as usize].alive {
                same.push(origin); // the manifest names where it came from
            }
            let known = self.ranked(node, same);
            let me = &mut self.nodes[node as usize];
            me.known = known;
            me.known_at = Some(now);
        }
        // Rarest first across providers: ask for the rarest piece anyone known offers
        // (the origin's unseeded pieces before all), and among equally rare pieces ask
        // the provider that should answer soonest: queued work over its uplink plus the
        // way there (the node would go by measured rates).
        let known = std::mem::take(&mut self.nodes[node as usize].known);
        let start = (node as u64 * 7919 % self.chunks_total.max(1) as u64) as u32;
        let mut offers: Vec<(u32, Micros, u32, u32)> = vec![];
        let full = self.swarm.upload_slots + self.swarm.upload_queue;
        for &p in &known {
            let (me, provider) = (&self.nodes[node as usize], &self.nodes[p as usize]);
            if !provider.alive
                || provider.uploads + provider.upload_queue.len() >= full
                || me.in_flight.iter().any(|(_, from)| *from == p)
                || self.links.partitioned(now, p as usize, node as usize)
            {
                continue;
            }
            let Some(piece) = pick_piece(&me.pieces, &me.requested, &provider.pieces, &self.copies.all, start) else {
                continue;
            };
            let queued = (provider.uploads + provider.upload_queue.len() + 1) as f64 * self.chunk_bytes as f64;
            let wait = (queued / self.links.uplink(p as usize) * SECOND as f64) as Micros + self.latency(p, node);
            offers.push((self.copies.all[piece as usize], wait, p, piece));
        }
        offers.sort_unstable();
        let mut asked = false;
        for (_, _, p, offered) in offers {
            let me = &self.nodes[node as usize];
            if me.in_flight.len() >= self.swarm.requests_in_flight {
                break;
            }
            let provider = &self.nodes[p as usize];
            // Picked again once a request of this round may have taken the offered piece.
            let piece = if asked {
                match pick_piece(&me.pieces, &me.requested, &provider.pieces, &self.copies.all, start) {
                    Some(piece) => piece,
                    None => continue,
                }
            } else {
                offered
            };
            // The origin seeds a piece once per site: a copy across a partition is no copy.
            let copies = self.copies.in_site(me.site, piece);
            let pending = provider.uploads + provider.upload_queue.len();
            if piece_upload_decision(&self.swarm, pending, p == self.origin, copies).is_err() {
                continue;
            }
            asked = true;
            self.nodes[node as usize].idle_looks = 0;
            self.copies.add(self.nodes[node as usize].site, piece);
            let me = &mut self.nodes[node as usize];
            me.requested.insert(piece);
            me.in_flight.push((piece, p));
            self.nodes[p as usize].upload_queue.push((node, piece));
            self.serve(p);
        }
        let me = &mut self.nodes[node as usize];
        me.known = known;
        if me.in_flight.is_empty() {
            me.known_at = None; // look for other providers next time
            let wait = FETCH_RETRY << me.idle_looks.saturating_sub(8).min(5);
            me.idle_looks += 1;
            self.q.after(wait, Ev::TryFetch { node });
        }
    }

    /// Free upload slots take the waiting request of the fetcher furthest behind.
    fn serve(&mut self, provider: u32) {
        let now = self.q.now();
        while self.nodes[provider as usize].uploads < self.swarm.upload_slots {
            let mut held = std::mem::take(&mut self.scratch_held);
            held.clear();
            let queue = &self.nodes[provider as usize].upload_queue;
            held.extend(queue.iter().map(|(f, _)| self.nodes[*f as usize].pieces.count()));
            let next = next_to_serve(&held);
            self.scratch_held = held;
            let Some(i) = next else { return };
            let (fetcher, piece) = self.nodes[provider as usize].upload_queue.remove(i);
            // A fetcher that crashed since it asked has forgotten the request.
            if !self.nodes[fetcher as usize].in_flight.contains(&(piece, provider)) {
                continue;
            }
            // The slot frees when the last byte has left: the next request goes out while
            // this one is still on its way.
            self.nodes[provider as usize].uploads += 1;
            let (sent, arrives) =
                self.links.send_timed(now, provider as usize, fetcher as usize, self.chunk_bytes, false, &mut self.rng);
            self.q.at(sent, Ev::SlotFree { node: provider });
            match arrives {
                Some(at) => self.q.at(at, Ev::Piece { to: fetcher, from: provider, piece }),
                None => {
                    self.drop_claim(fetcher, provider, piece);
                    self.q.after(0, Ev::TryFetch { node: fetcher });
                }
            }
        }
    }

    /// A piece request ended without the piece: the fetcher's claim goes back. False if
    /// the fetcher had forgotten it already.
    fn drop_claim(&mut self, to: u32, from: u32, piece: u32) -> bool {
        let me = &mut self.nodes[to as usize];
        let Some(i) = me.in_flight.iter().position(|x| *x == (piece, from)) else { return false };
        me.in_flight.swap_remove(i);
        me.requested.remove(piece);
        self.copies.remove(me.site, piece);
        true
    }

    fn on_piece(&mut self, to: u32, from: u32, piece: u32) {
        let me = &self.nodes[to as usize];
        let expected = me.in_flight.contains(&(piece, from));
        if !expected || !me.alive || !self.nodes[from as usize].alive {
            // A crash on either side lost it (a crashed fetcher's claims are gone already).
            if self.drop_claim(to, from, piece) {
                self.fetch_pieces(to);
            }
            return;
        }
        let me = &mut self.nodes[to as usize];
        if let Some(i) = me.in_flight.iter().position(|x| *x == (piece, from)) {
            me.in_flight.swap_remove(i);
        }
        me.requested.remove(piece);
        me.pieces.insert(piece); // its claim in `copies` now counts a copy held
        let first = me.pieces.count() == 1;
        let full = me.pieces.is_full();
        // Peers learn the new piece from a have update to the providers it knows.
        self.have_bytes_total += me.known.len() as u64 * (self.sc.gossip.control_bytes + 8);
        if first {
            self.sources.push(to);
        }
        if full {
            self.nodes[to as usize].staged_at = Some(self.q.now());
            self.holders.push(to);
            self.rollout_tick(to);
        } else {
            self.fetch_pieces(to);
        }
    }

    /// Whole-file transfers, as the node does them: the best-ranked holder with a free
    /// upload slot sends the whole file.
    fn fetch_whole(&mut self, node: u32) {
        let me = &self.nodes[node as usize];
        if !me.alive || me.manifest_at.is_none() || me.staged_at.is_some() || me.fetching.is_some() {
            return;
        }
        let holders = std::mem::take(&mut self.holders);
        let (mut same, other) = self.sample_holders(node, &holders);
        self.holders = holders;
        same.extend(other);
        let origin = self.origin;
        let origin_holds = self.nodes[origin as usize].alive && self.nodes[origin as usize].pieces.is_full();
        if origin != node && !same.contains(&origin) && origin_holds {
            same.push(origin); // the manifest names where it came from
        }
        let others = self.holders.len().saturating_sub(1);
        for p in self.ranked(node, same) {
            let provider = &self.nodes[p as usize];
            if upload_decision(&self.policy, provider.uploads, p == self.origin, others).is_ok() {
                self.nodes[p as usize].uploads += 1;
                self.nodes[node as usize].fetching = Some(p);
                self.send_chunk(p, node);
                return;
            }
        }
        self.q.after(SECOND, Ev::TryFetch { node });
    }

    fn send_chunk(&mut self, from: u32, to: u32) {
        let now = self.q.now();
        match self.links.send(now, from as usize, to as usize, self.chunk_bytes, false, &mut self.rng) {
            Some(at) => self.q.at(at, Ev::Chunk { to, from }),
            None => self.abort_fetch(to, from),
        }
    }

    fn abort_fetch(&mut self, to: u32, from: u32) {
        let p = &mut self.nodes[from as usize];
        p.uploads = p.uploads.saturating_sub(1);
        self.nodes[to as usize].fetching = None;
        self.q.after(SECOND, Ev::TryFetch { node: to });
    }

    fn on_chunk(&mut self, to: u32, from: u32) {
        if self.nodes[to as usize].fetching != Some(from) {
            return;
        }
        if !self.nodes[to as usize].alive || !self.nodes[from as usize].alive {
            return self.abort_fetch(to, from);
        }
        let node = &mut self.nodes[to as usize];
        node.pieces.insert(node.pieces.count());
        if !node.pieces.is_full() {
            return self.send_chunk(from, to);
        }
        node.staged_at = Some(self.q.now());
        node.fetching = None;
        let p = &mut self.nodes[from as usize];
        p.uploads = p.uploads.saturating_sub(1);
        self.holders.push(to);
        self.rollout_tick(to);
    }

    fn behaviour(&self, version: u64) -> Behaviour {
        if version == CANDIDATE {
            self.sc.model.candidate.clone()
        } else {
            self.sc.model.baseline.clone()
        }
    }

    /// A node's requests since the last tick (measured as the node would), then its
    /// record goes to its site's aggregator.
    fn metrics_tick(&mut self, node: u32) {
        let interval_secs = self.sc.gossip.metrics_interval_secs;
        self.q.after((interval_secs * SECOND as f64) as Micros, Ev::MetricsTick { node });
        if !self.nodes[node as usize].alive {
            return;
        }
        let version = self.nodes[node as usize].active;
        let b = self.behaviour(version);
        let requests = (self.sc.model.request_rate * interval_secs).round() as u64;
        let slot = usize::from(version == CANDIDATE);
        let site = self.nodes[node as usize].site;
        for _ in 0..requests {
            let error = self.rng.unit() < b.error_rate;
            let latency = self.rng.lognormal(b.latency_median_secs, 0.3);
            let ttft = self.rng.lognormal(b.ttft_median_secs, 0.3);
            let tps = self.rng.lognormal(b.tokens_per_sec, 0.1);
            let m = &mut self.site_totals[site][slot];
            m.requests += 1;
            m.errors += u64::from(error);
            m.latency.add(latency);
            m.ttft.add(ttft);
            m.tokens_per_sec.add(tps);
        }
        let aggregator = self.site_members[self.nodes[node as usize].site][0];
        if aggregator != node {
            let now = self.q.now();
            let bytes = self.sc.gossip.metrics_record_bytes;
            self.metrics_bytes_total += bytes;
            let _ = self.links.send(now, node as usize, aggregator as usize, bytes, false, &mut self.rng);
        }
    }

    /// The site's aggregator merges its members' records into one and gossips it.
    fn site_record(&mut self, site: u32) {
        let interval = (self.sc.gossip.metrics_interval_secs * SECOND as f64) as Micros;
        self.q.after(interval, Ev::SiteRecord { site });
        let members = &self.site_members[site as usize];
        let Some(&aggregator) = members.iter().find(|m| self.nodes[**m as usize].alive) else { return };
        let mut merged = self.site_totals[site as usize].clone();
        for (total, version) in merged.iter_mut().zip([BASELINE, CANDIDATE]) {
            total.active =
                members.iter().any(|m| self.nodes[*m as usize].alive && self.nodes[*m as usize].active == version);
        }
        let seq = self.q.now() + 1;
        let versions = merged.into_iter().filter(|v| v.requests > 0 || v.active).collect();
        let record = MetricsRecord { node: self.site_ids[site as usize], seq, issued_at: secs(seq) as u64, versions };
        // Old records are kept only as long as some node may still hold them.
        let history = &mut self.site_records[site as usize];
        history.push(Rc::new(record));
        if history.len() > 64 {
            history.remove(0);
        }
        let i = self.view_index(aggregator, site);
        self.view_seq[i] = seq;
        self.view_at[i] = self.q.now();
        self.flood(aggregator, None, Msg::SiteMetrics { site, seq });
    }

    /// The gate verdict for a view (one seq per site); views repeat, so verdicts are cached.
    fn verdict(&mut self, view: &[u64]) -> GateVerdict {
        if let Some(v) = self.verdicts.get(view) {
            return v.clone();
        }
        let mut fleet = FleetView::default();
        for (site, seq) in view.iter().enumerate() {
            if let Some(r) = self.site_records[site].iter().find(|r| r.seq == *seq) {
                fleet.update((**r).clone(), 0);
            }
        }
        let summary = fleet.summary(MODEL, CANDIDATE);
        let baseline = fleet.baseline(MODEL, CANDIDATE);
        let verdict = evaluate_gates(&self.plan.gates, &summary, baseline.as_ref());
        if self.verdicts.len() > 4096 {
            self.verdicts.clear();
        }
        self.verdicts.insert(view.to_vec(), verdict.clone());
        verdict
    }

    fn rollout_tick(&mut self, node: u32) {
        let n = &self.nodes[node as usize];
        if !n.alive || n.manifest_at.is_none() {
            return;
        }
        let now = self.q.now();
        // Lent out and put back: no copy of the view or the plan on this hot path.
        let sites = self.sc.sites.len();
        let mut view = std::mem::take(&mut self.scratch_view);
        view.clear();
        view.extend_from_slice(&self.view_seq[node as usize * sites..(node as usize + 1) * sites]);
        let verdict = self.verdict(&view);
        self.scratch_view = view;
        let published = secs(self.publish_at) as u64;
        let progress = &mut self.nodes[node as usize].progress;
        advance(progress, &self.plan, published, &verdict, &OperatorState::default(), secs(now) as u64);
        if node == self.origin {
            let text = match &verdict {
                GateVerdict::Pass => "pass".to_string(),
                GateVerdict::Pending(r) => format!("pending: {r}"),
                GateVerdict::Fail(r) => format!("fail: {r}"),
            };
            if self.gate_decisions.last().is_none_or(|(_, last)| *last != text) {
                self.gate_decisions.push((secs(now), text));
            }
        }
        let n = &mut self.nodes[node as usize];
        if n.staged_at.is_none() {
            return;
        }
        match decide(&n.progress, n.wave, n.active == CANDIDATE) {
            RolloutDecision::Activate if n.active != CANDIDATE => {
                n.active = CANDIDATE;
                n.ever_v2 = true;
                n.active_v2_at.get_or_insert(now);
            }
            RolloutDecision::RollBack(_) => n.active = BASELINE,
            _ => {}
        }
    }

    fn report(&self) -> Report {
        let n = self.nodes.len();
        let after = |t: Micros| secs(t.saturating_sub(self.publish_at));
        let waves = (0..self.plan.waves.len())
            .map(|w| {
                let mut times: Vec<f64> = self
                    .nodes
                    .iter()
                    .filter(|x| x.wave == Some(w))
                    .map(|x| x.active_v2_at.map_or(f64::INFINITY, after))
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
        let staged: Vec<Micros> = self.nodes.iter().filter(|x| x.alive).filter_map(|x| x.staged_at).collect();
        let all_staged = self.nodes.iter().filter(|x| x.alive).all(|x| x.staged_at.is_some());
        let distribution_secs = all_staged.then(|| staged.iter().map(|t| after(*t)).fold(0.0, f64::max));
        let f = (self.chunks_total as u64 * self.chunk_bytes) as f64;
        let u_s = self.sc.sites[self.nodes[self.origin as usize].site].uplink_mbps * 125_000.0;
        let d_min = self.sc.sites.iter().map(|s| s.downlink_mbps * 125_000.0).fold(f64::INFINITY, f64::min);
        let sum_u: f64 = self.sc.sites.iter().map(|s| s.nodes as f64 * s.uplink_mbps * 125_000.0).sum();
        let receivers = (n - 1) as f64;
        let bound = (f / u_s).max(f / d_min).max(receivers * f / sum_u);
        let mut prop: Vec<f64> = self.nodes.iter().filter_map(|x| x.manifest_at).map(after).collect();
        prop.sort_by(f64::total_cmp);
        let q = |v: &[f64], q: f64| (!v.is_empty()).then(|| v[((q * v.len() as f64) as usize).min(v.len() - 1)]);
        let span = secs(self.q.now()).max(1e-9);
        let origin_egress = self.links.sent[self.origin as usize];
        Report {
            scenario: self.sc.name.clone(),
            seed: self.sc.seed,
            nodes: n,
            sites: self.sc.sites.len(),
            events: self.q.processed(),
            simulated_secs: secs(self.q.now()),
            model_bytes: f as u64,
            waves,
            distribution_secs,
            kumar_ross_secs: bound,
            distribution_over_bound: distribution_secs.map(|d| d / bound),
            origin_egress_bytes: origin_egress,
            origin_egress_per_site: origin_egress as f64 / f / self.sc.sites.len() as f64,
            cross_site_bytes: self.links.cross_site,
            partition_drops: self.links.partition_drops,
            manifest_propagation_p50_secs: q(&prop, 0.5),
            manifest_propagation_p99_secs: q(&prop, 0.99),
            manifest_gossip_bytes_per_node_per_sec: self.manifest_bytes_total as f64 / n as f64 / span,
            metrics_gossip_bytes_per_node_per_sec: self.metrics_bytes_total as f64 / n as f64 / span,
            // Every have record of a whole-file holder floods the mesh; piece updates go
            // to the providers a fetcher knows.
            have_bytes_per_node_per_sec: (self.holders.len() as f64
                * self.sc.gossip.have_bytes as f64
                * self.sc.gossip.degree as f64
                + self.have_bytes_total as f64 / n as f64)
                / span,
            ever_activated_fraction: self.nodes.iter().filter(|x| x.ever_v2).count() as f64 / n as f64,
            halted: self.nodes[self.origin as usize].progress.halted.clone(),
            coverage: self.coverage.clone(),
            gate_decisions: self.gate_decisions.clone(),
        }
    }
}
