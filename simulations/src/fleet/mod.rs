//! A fleet of the node's own state machines (`slmesh_protocol::node::Node`), one per
//! simulated node, over simulated links: the decisions are the node's, only the network,
//! the bytes of transfers, the store and inference are modelled.
//!
//! - Network: the simulator's `Links` (per-site latency, per-node uplink and downlink);
//!   gossip floods a random mesh of degree D (every peer when D is 0; metrics a mesh
//!   thinned to `METRICS_MESH_DEGREE`), each node forwarding what it accepted, as
//!   gossipsub does; requests and replies are messages.
//! - Transfers: in 512 KiB pieces from several providers at once, decided by the protocol
//!   core's `swarm::PieceFetch` on the fetcher's side and the node's `Uploads` gate on the
//!   provider's (`pieces.rs`), as `crates/blobs` drives them.
//! - Store: each node's `Persist` outputs are kept and handed back on restart.
//! - Inference: a load takes `load_ms` and fails for versions marked broken; a version
//!   marked as answering wrongly passes only part of its evaluation suite; requests are
//!   drawn per served version from a `Behaviour`.
//!
//! Deterministic: one seeded random source, one event queue, no threads.

mod installed;
mod links;
mod operator;
mod pieces;
mod store;

use links::{random_links, thin_links};
pub use store::FakeStore;

use crate::engine::{Micros, Queue, Rng, SECOND};
use crate::net::Links;
use crate::scenario::Behaviour;
use slmesh_protocol::fleet::VersionReport;
use slmesh_protocol::hex32::Hex32;
use slmesh_protocol::identity::{KeyKind, NodeId, SecretKey};
use slmesh_protocol::mesh::{GossipVerdict, METRICS_MESH_DEGREE, TOPIC_MANIFESTS, TOPIC_METRICS};
use slmesh_protocol::node::{Input, Node, NodeConfig, NodeIdentity, Output, RequestKind};
use slmesh_protocol::select::NodeFacts;
use slmesh_protocol::trust::{Enrollment, EnrollmentCertificate, Tags, DEFAULT_FLEET};
use slmesh_protocol::TrustStore;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

pub const MODEL: &str = "m";
/// How long a peer request waits for its answer (crates/mesh's request-response timeout).
const REQUEST_TIMEOUT: Micros = 30 * SECOND;
/// The fake clock starts at a plausible Unix time (milliseconds): certificates and
/// rollouts count in Unix seconds.
pub const T0_MS: u64 = 1_800_000_000_000;

/// What gossipsub adds to each message's data, as it counts a message's size (its
/// protobuf encoding): the data's tag and length (3) and the topic (2 + its name). Nodes
/// publish anonymously (`crates/mesh`): no author, sequence number or signature, since
/// every payload carries its author's signature.
pub fn gossip_envelope_bytes(topic: &str) -> u64 {
    3 + 2 + topic.len() as u64
}

/// Where a simulated crash cuts a deletion of a version's files short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    BeforeFiles,
    AfterFiles,
}

/// One simulated node: its state machine (None while it is down) and what is modelled
/// around it.
pub struct SimNode {
    pub node: Option<Node>,
    pub identity: NodeIdentity,
    pub store: FakeStore,
    pub blobs: BTreeSet<Hex32>,
    /// The version the modelled inference engine serves.
    pub serving: Option<u64>,
    /// The engine's cumulative measurements per version.
    pub measured: BTreeMap<u64, VersionReport>,
    /// When the engine was last sampled (ms) and the fraction of a request due since.
    pub sampled: Option<(u64, f64)>,
    /// Loads asked for, per version.
    pub loads: BTreeMap<u64, u32>,
    /// The shadow comparison its node asked for (`Output::Shadow`).
    pub shadowing: Option<slmesh_protocol::shadow::ShadowPlan>,
    /// Reports every request of every version as failed (and every answer as disagreeing).
    pub liar: bool,
    /// Reports every version as flawless: no request failed, every answer agreed.
    pub flatterer: bool,
    /// Takes piece requests and never answers them (a provider that keeps the connection
    /// open and sends nothing).
    pub stalls: bool,
    /// Stays connected and answers no peer request (an unenrolled peer that never sends a
    /// hello, say): its peers' requests time out.
    pub silent: bool,
    /// (time, version) each time this node started serving a version.
    pub served: Vec<(Micros, u64)>,
    /// The node's rollout history, as its daemon would keep it (the newest `MAX_EVENTS`).
    pub history: std::collections::VecDeque<slmesh_protocol::history::HistoryEvent>,
    /// Gossip peers (indices), for a mesh of degree D.
    pub mesh: Vec<usize>,
    /// Gossip peers for the metrics topic: the mesh thinned to
    /// `mesh::METRICS_MESH_DEGREE` (gossipsub keeps a mesh per topic).
    pub metrics_mesh: Vec<usize>,
    /// Connected peers (indices): the gossip peers and more; the node admits, syncs with
    /// and fetches from these.
    pub peers: Vec<usize>,
    /// (time, version) each time this node's highest known version of the model rose
    /// (by gossip or anti-entropy).
    pub learned: Vec<(Micros, u64)>,
    /// (time, blob) each time this node finished fetching a blob.
    pub completed: Vec<(Micros, Hex32)>,
    /// Bytes of pieces this node uploaded.
    pub piece_bytes_sent: u64,
    /// Gossip messages delivered to this node (duplicates included).
    pub gossip_received: u64,
    /// The version folders on its disk (staged files; they survive a crash).
    pub on_disk: BTreeSet<(String, u64)>,
    /// The node crashes at the next deletion of a version's files: before or after they
    /// go (once).
    pub crash_at_delete: Option<CrashPoint>,
    seen: HashSet<u64>,
    timer_at: Option<u64>,
    /// Piece transfers: pieces held (on disk, kept across a restart), fetches under way,
    /// uploads per blob, fetchers watching this node's offer, and its upload gate.
    pub pieces: BTreeMap<Hex32, slmesh_protocol::swarm::PieceSet>,
    fetches: BTreeMap<Hex32, pieces::BlobFetch>,
    version_fetches: BTreeMap<(String, u64), BTreeSet<Hex32>>,
    /// Per blob, each running upload: its number and when it started (µs).
    uploading: BTreeMap<Hex32, Vec<(u32, u64)>>,
    next_transfer: u32,
    watchers: BTreeSet<(usize, Hex32)>,
    uploads: slmesh_protocol::node::Uploads,
    /// Piece requests it holds for a busy slot, per blob, oldest first.
    held: BTreeMap<Hex32, std::collections::VecDeque<pieces::HeldRequest>>,
}

#[derive(Debug)]
enum Ev {
    Gossip {
        to: usize,
        from: usize,
        topic: &'static str,
        data: std::rc::Rc<Vec<u8>>,
    },
    Request {
        to: usize,
        from: usize,
        kind: RequestKind,
        data: Vec<u8>,
    },
    Response {
        to: usize,
        from: usize,
        kind: RequestKind,
        result: Result<Vec<u8>, String>,
    },
    Loaded {
        node: usize,
        model: String,
        version: u64,
        incarnation: u32,
        /// Cases of the evaluation suite the node was asked to run, and whether on the
        /// version it served before too.
        eval_cases: Option<(u32, bool)>,
    },
    Timer {
        node: usize,
        at: u64,
    },
    VersionFetched {
        node: usize,
        model: String,
        version: u64,
        result: Result<(), String>,
        incarnation: u32,
    },
    FetchCheck {
        node: usize,
        blob: Hex32,
        incarnation: u32,
    },
    PieceRequest {
        to: usize,
        from: usize,
        blob: Hex32,
        piece: u32,
        lane: u32,
        incarnation: u32,
    },
    PieceAnswer {
        to: usize,
        from: usize,
        blob: Hex32,
        piece: u32,
        lane: u32,
        outcome: slmesh_protocol::swarm::PieceOutcome,
        incarnation: u32,
    },
    SlotFree {
        node: usize,
        blob: Hex32,
        transfer: u32,
        incarnation: u32,
    },
    /// An upload has run `Uploads::stalled_after_ms` and still runs.
    SlotStalled {
        node: usize,
        blob: Hex32,
        incarnation: u32,
    },
    /// The driver's timer on a lane's piece requests (`FetchPolicy::piece_stall_ms`).
    PieceStall {
        node: usize,
        blob: Hex32,
        provider: usize,
        lane: u32,
        incarnation: u32,
    },
    LaneRetry {
        node: usize,
        blob: Hex32,
        provider: usize,
        lane: u32,
        incarnation: u32,
    },
}

/// The shape of a simulated fleet.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub seed: u64,
    /// Per site, its node count (site names are `s0`, `s1`, ...).
    pub sites: Vec<usize>,
    /// One-way latency between sites, milliseconds.
    pub latency_ms: Vec<Vec<f64>>,
    pub uplink_bytes_per_sec: f64,
    pub downlink_bytes_per_sec: f64,
    /// Gossip mesh degree (0: every node is every node's gossip peer).
    pub mesh_degree: usize,
    /// Connected peers per node, the gossip peers among them (no more than the mesh
    /// degree: the connections are the gossip mesh).
    pub peer_degree: usize,
    /// Bytes of each version's weights file.
    pub model_bytes: u64,
    /// How long a load takes.
    pub load_ms: u64,
    /// Requests per second each node serves.
    pub request_rate: f64,
    /// The spread of measured latencies and TTFTs: sigma of their log-normal (0.3; what
    /// real nodes measure can be much wider, and a wider spread fills more of a metrics
    /// record's sketch buckets).
    pub latency_spread: f64,
    /// Bytes on the wire a request or reply takes beyond its payload (framing).
    pub overhead_bytes: u64,
    pub node_config: NodeConfig,
}

impl FleetSpec {
    /// `n` nodes on one site, 20 ms apart, fast links, a full gossip mesh.
    pub fn lan(n: usize) -> Self {
        FleetSpec {
            seed: 1,
            sites: vec![n],
            latency_ms: vec![vec![20.0]],
            uplink_bytes_per_sec: 100e6,
            downlink_bytes_per_sec: 100e6,
            mesh_degree: 0,
            peer_degree: 0,
            model_bytes: 1_000_000,
            load_ms: 200,
            request_rate: 4.0,
            latency_spread: 0.3,
            overhead_bytes: 64,
            node_config: NodeConfig {
                metrics_interval_ms: 1_000,
                metrics_ttl_secs: 30,
                sync_interval_ms: 3_000,
                rollout_tick_ms: 1_000,
                facts: simulated_node_facts(),
                ..NodeConfig::default()
            },
        }
    }
}

pub struct NodeFleet {
    pub spec: FleetSpec,
    pub publisher: SecretKey,
    pub trust: TrustStore,
    pub nodes: Vec<SimNode>,
    /// Versions whose weights do not load.
    pub broken: BTreeSet<u64>,
    /// Versions that load and answer at full speed, but wrongly: each passes this share
    /// of its evaluation suite's cases (every other version passes all of them).
    pub wrong_answers: BTreeMap<u64, f64>,
    /// How requests of each version behave (a default one for versions not listed).
    pub behaviour: BTreeMap<u64, Behaviour>,
    /// Node pairs cut off from each other (beside the links' own partitions).
    pub cut: BTreeSet<(usize, usize)>,
    pub links: Links,
    pub rng: Rng,
    q: Queue<Ev>,
    incarnation: Vec<u32>,
    ids: HashMap<NodeId, usize>,
    /// Each node's id, by index.
    node_ids: Vec<NodeId>,
    /// When set, every message the nodes send, as (what, bytes): `gossip <topic>`,
    /// `request`, `response` (the fuzzers' seed corpus is made from it).
    pub wire_log: Option<Vec<(String, Vec<u8>)>>,
    /// Every refusal, and every event the nodes logged, for reports and assertions.
    pub refusals: Vec<(usize, String)>,
    pub events: Vec<(Micros, usize, String)>,
    /// Gossip bytes sent over links (originated and forwarded), by topic.
    pub gossip_bytes: BTreeMap<&'static str, u64>,
    /// Gossip messages nodes originated, and their bytes, by topic.
    pub gossip_originated: BTreeMap<&'static str, (u64, u64)>,
    /// Set by `drain_gossip`: the run is over, and nothing new is sent.
    draining: bool,
    /// Bytes of peer requests sent (have records, syncs, hellos), by kind.
    pub request_bytes: BTreeMap<RequestKind, u64>,
    /// Bytes of the answers to requests, per kind of request.
    pub response_bytes: BTreeMap<RequestKind, u64>,
}

/// The publisher's enrollment of a node key in `fleet`, valid from just before the
/// simulation's start until `expires_at` (Unix seconds).
fn enroll(
    publisher: &SecretKey,
    secret: &SecretKey,
    tags: &Tags,
    expires_at: u64,
    fleet: &str,
) -> EnrollmentCertificate {
    Enrollment {
        node: secret.public(),
        tags: tags.clone(),
        issued_at: T0_MS / 1000 - 10,
        expires_at,
        fleet: fleet.into(),
    }
    .sign(publisher)
    .expect("valid tags")
}

/// The key of simulated node `i`.
pub fn node_key(i: usize) -> SecretKey {
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    SecretKey::from_seed(KeyKind::Node, seed)
}

/// A sketch of `count` equal values, as a lying node reports its comparisons.
fn constant_sketch(count: u64, value: f64) -> slmesh_protocol::sketch::Sketch {
    let mut s = slmesh_protocol::sketch::Sketch::default();
    for _ in 0..count {
        s.add(value);
    }
    s
}

/// A gossip message's id for duplicate suppression (gossipsub uses a content hash too).
fn message_id(data: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same ids on every run.
    let mut h = std::hash::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

impl NodeFleet {
    /// The fleet, enrolled, none of its nodes started yet.
    pub fn new(spec: FleetSpec) -> Self {
        let publisher = SecretKey::from_seed(KeyKind::Publisher, [3; 32]);
        let mut trust = TrustStore::new();
        trust.add("ops", publisher.public()).expect("a fresh key is a valid key");
        let mut rng = Rng::new(spec.seed);
        let site_of: Vec<usize> = spec.sites.iter().enumerate().flat_map(|(s, n)| std::iter::repeat_n(s, *n)).collect();
        let n = site_of.len();
        let mut nodes: Vec<SimNode> = (0..n)
            .map(|i| {
                let secret = node_key(i);
                let tags: Tags = [("site".to_string(), format!("s{}", site_of[i]))].into();
                let certificate = enroll(&publisher, &secret, &tags, T0_MS / 1000 + 365 * 86_400, DEFAULT_FLEET);
                SimNode {
                    node: None,
                    identity: NodeIdentity { secret, certificate, tags, fleet: DEFAULT_FLEET.into() },
                    store: FakeStore::default(),
                    blobs: BTreeSet::new(),
                    serving: None,
                    measured: BTreeMap::new(),
                    sampled: None,
                    loads: BTreeMap::new(),
                    shadowing: None,
                    liar: false,
                    flatterer: false,
                    stalls: false,
                    silent: false,
                    served: vec![],
                    history: Default::default(),
                    mesh: vec![],
                    metrics_mesh: vec![],
                    peers: vec![],
                    learned: vec![],
                    completed: vec![],
                    piece_bytes_sent: 0,
                    gossip_received: 0,
                    on_disk: BTreeSet::new(),
                    crash_at_delete: None,
                    seen: HashSet::new(),
                    timer_at: None,
                    pieces: BTreeMap::new(),
                    fetches: BTreeMap::new(),
                    version_fetches: BTreeMap::new(),
                    uploading: BTreeMap::new(),
                    next_transfer: 0,
                    held: BTreeMap::new(),
                    watchers: BTreeSet::new(),
                    uploads: slmesh_protocol::node::Uploads::new(Default::default()),
                }
            })
            .collect();
        let d = spec.mesh_degree.min(n.saturating_sub(1));
        if d > 0 {
            // Gossip peers first; then more connections up to `peer_degree` (a node keeps
            // more connected peers than its gossipsub mesh: crates/mesh's TARGET_PEERS).
            random_links(&mut nodes, d, &mut rng, |node| &mut node.mesh);
            for node in &mut nodes {
                node.peers = node.mesh.clone();
            }
            let c = spec.peer_degree.min(n - 1);
            if c > d {
                random_links(&mut nodes, c, &mut rng, |node| &mut node.peers);
            }
        } else {
            for (i, node) in nodes.iter_mut().enumerate() {
                node.mesh = (0..n).filter(|j| *j != i).collect();
                node.peers = node.mesh.clone();
            }
        }
        for node in &mut nodes {
            node.metrics_mesh = node.mesh.clone();
        }
        if d > METRICS_MESH_DEGREE {
            thin_links(&mut nodes, METRICS_MESH_DEGREE, |node| &mut node.metrics_mesh);
        }
        let links = Links::new(
            site_of,
            vec![spec.uplink_bytes_per_sec; n],
            vec![spec.downlink_bytes_per_sec; n],
            spec.latency_ms.clone(),
            0.0,
            0.0,
        );
        let node_ids: Vec<NodeId> = nodes.iter().map(|s| s.identity.secret.public()).collect();
        let ids = node_ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        NodeFleet {
            spec,
            publisher,
            trust,
            nodes,
            broken: BTreeSet::new(),
            wrong_answers: BTreeMap::new(),
            behaviour: BTreeMap::new(),
            cut: BTreeSet::new(),
            links,
            rng,
            q: Queue::default(),
            incarnation: vec![0; n],
            ids,
            node_ids,
            wire_log: None,
            refusals: vec![],
            events: vec![],
            gossip_bytes: BTreeMap::new(),
            request_bytes: BTreeMap::new(),
            response_bytes: BTreeMap::new(),
            gossip_originated: BTreeMap::new(),
            draining: false,
        }
    }

    /// Simulated time, microseconds since the start.
    pub fn now(&self) -> Micros {
        self.q.now()
    }

    /// The nodes' clock: Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        T0_MS + self.q.now() / 1000
    }

    /// Simulated time `t` on the nodes' clock, in Unix seconds.
    pub fn unix_secs(t: Micros) -> u64 {
        (T0_MS + t / 1000) / 1000
    }

    pub fn events_processed(&self) -> u64 {
        self.q.processed()
    }

    pub fn id(&self, i: usize) -> NodeId {
        self.node_ids[i]
    }

    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i].node.as_ref().expect("node is running")
    }

    pub fn linked(&self, a: usize, b: usize) -> bool {
        a != b
            && self.nodes[a].node.is_some()
            && self.nodes[b].node.is_some()
            && !self.cut.contains(&(a.min(b), a.max(b)))
            && !self.links.partitioned(self.q.now(), a, b)
    }

    /// The nodes `a` is connected to: its gossip peers and more, up to the spec's
    /// `peer_degree` (everyone, when the mesh degree is 0).
    fn neighbours(&self, a: usize) -> Vec<usize> {
        self.nodes[a].peers.clone()
    }

    /// Starts (or restarts) node `i` from its store, and connects it to its live peers.
    pub fn start(&mut self, i: usize) {
        self.forget_transfers(i);
        self.incarnation[i] += 1;
        let now = self.now_ms();
        let sim = &mut self.nodes[i];
        let restored = sim.store.restored(&sim.blobs, &sim.on_disk);
        sim.serving = None;
        sim.seen.clear();
        sim.timer_at = None;
        sim.node =
            Some(Node::new(self.spec.node_config.clone(), sim.identity.clone(), self.trust.clone(), restored, now));
        self.drain(i);
        for j in self.neighbours(i) {
            if self.linked(i, j) {
                self.connect(i, j);
            }
        }
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    fn connect(&mut self, i: usize, j: usize) {
        let (a, b) = (self.id(i), self.id(j));
        self.input(i, Input::PeerConnected { peer: b });
        self.input(j, Input::PeerConnected { peer: a });
    }

    /// Pins node `i` to `version` in its store, as its config would (takes effect when
    /// it next starts).
    pub fn pin(&mut self, i: usize, version: Option<u64>) {
        self.nodes[i].store.models.entry(MODEL.to_string()).or_default().pinned = version;
    }

    /// Stops node `i` as a crash would: what it did not persist is lost.
    pub fn crash(&mut self, i: usize) {
        self.forget_transfers(i);
        self.incarnation[i] += 1;
        self.nodes[i].node = None;
        self.nodes[i].serving = None;
        let peer = self.id(i);
        for j in self.neighbours(i) {
            if self.nodes[j].node.is_some() {
                self.input(j, Input::PeerDisconnected { peer });
            }
        }
    }

    /// Gives node `i` a new certificate for its key and tags, in `fleet`, expiring at
    /// `expires_at` (Unix seconds); it presents it from its next start.
    pub fn reenroll(&mut self, i: usize, expires_at: u64, fleet: &str) {
        let identity = &mut self.nodes[i].identity;
        identity.certificate = enroll(&self.publisher, &identity.secret, &identity.tags, expires_at, fleet);
        identity.fleet = fleet.into();
    }

    /// Cuts (or heals) the links between `side` and every other node.
    pub fn partition(&mut self, side: &[usize], cut: bool) {
        for &a in side {
            for b in self.neighbours(a) {
                if side.contains(&b) {
                    continue;
                }
                let key = (a.min(b), a.max(b));
                if cut {
                    let was_linked = self.linked(a, b);
                    if self.cut.insert(key) && was_linked {
                        let (ia, ib) = (self.id(a), self.id(b));
                        self.input(a, Input::PeerDisconnected { peer: ib });
                        self.input(b, Input::PeerDisconnected { peer: ia });
                    }
                } else if self.cut.remove(&key) && self.linked(a, b) {
                    self.connect(a, b);
                }
            }
        }
    }

    pub fn input(&mut self, i: usize, input: Input) {
        let now = self.now_ms();
        if let Input::FetchFinished { model, version, result: Ok(()) } = &input {
            self.nodes[i].on_disk.insert((model.clone(), *version));
        }
        if let Some(node) = self.nodes[i].node.as_mut() {
            node.handle(now, input);
            self.drain(i);
        }
    }

    fn drain(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].node.as_mut().and_then(|n| n.poll_output()) {
            self.on_output(i, out);
        }
        let Some(t) = self.nodes[i].node.as_ref().map(|n| n.poll_timeout()) else { return };
        if self.nodes[i].timer_at != Some(t) {
            self.nodes[i].timer_at = Some(t);
            let at = t.saturating_sub(T0_MS).saturating_mul(1000).max(self.q.now());
            self.q.at(at, Ev::Timer { node: i, at: t });
        }
    }

    /// Sends `bytes` over the simulated link (a reliable stream); the delivery time, or
    /// None if a partition drops it.
    fn send(&mut self, from: usize, to: usize, bytes: u64) -> Option<Micros> {
        self.transmit(from, to, bytes, false)
    }

    /// A piece request or a refusal (a small message of the blob protocol).
    fn send_control(&mut self, from: usize, to: usize) -> Option<Micros> {
        self.send(from, to, 64)
    }

    /// `bytes` plus framing over the link; `lossy`: the links' loss applies.
    fn transmit(&mut self, from: usize, to: usize, bytes: u64, lossy: bool) -> Option<Micros> {
        let now = self.q.now();
        self.links.send(now, from, to, bytes + self.spec.overhead_bytes, lossy, &mut self.rng)
    }

    fn on_output(&mut self, i: usize, out: Output) {
        // A silent node sends nothing, and holds on to its connections; once the run is
        // over, nothing new goes out while the gossip in flight drains.
        if (self.nodes[i].silent || self.draining)
            && matches!(out, Output::Gossip { .. } | Output::Request { .. } | Output::Refuse { .. })
        {
            return;
        }
        match out {
            Output::Gossip { topic, data } => {
                self.log_wire(|| format!("gossip {topic}"), &data);
                self.nodes[i].seen.insert(message_id(&data));
                let origin = self.gossip_originated.entry(topic).or_default();
                *origin = (origin.0 + 1, origin.1 + data.len() as u64);
                self.flood(i, None, topic, std::rc::Rc::new(data));
            }
            Output::Request { peer, kind, data } => {
                self.log_wire(|| "request".into(), &data);
                let Some(&j) = self.ids.get(&peer) else { return };
                *self.request_bytes.entry(kind).or_default() += data.len() as u64;
                match self.send(i, j, data.len() as u64) {
                    Some(at) => self.q.at(at, Ev::Request { to: j, from: i, kind, data }),
                    None => {
                        let at = self.q.now() + SECOND;
                        self.q.at(at, Ev::Response { to: i, from: j, kind, result: Err("lost".into()) })
                    }
                }
            }
            Output::Refuse { peer, reason } => {
                self.refusals.push((i, reason));
                if let Some(&j) = self.ids.get(&peer) {
                    let me = self.id(i);
                    if self.nodes[j].node.is_some() {
                        self.input(j, Input::PeerDisconnected { peer: me });
                    }
                    self.input(i, Input::PeerDisconnected { peer });
                }
            }
            // Gossip goes to admitted peers only (`flood` asks the node).
            Output::Admitted { .. } | Output::LearnAddrs { .. } => {}
            Output::DeleteVersion { model, version } => {
                let crash = self.nodes[i].crash_at_delete.take();
                if crash == Some(CrashPoint::BeforeFiles) {
                    return self.crash(i);
                }
                self.nodes[i].on_disk.remove(&(model, version));
                if crash == Some(CrashPoint::AfterFiles) {
                    self.crash(i);
                }
            }
            Output::Fetch { model, version, files } => self.fetch_pieces(i, model, version, files),
            Output::Providers { blob, providers } => self.update_providers(i, blob, providers),
            Output::Uploads(view) => self.nodes[i].uploads.update(view),
            Output::Activate { model, version, eval, .. } => {
                *self.nodes[i].loads.entry(version).or_default() += 1;
                let (incarnation, at) = (self.incarnation[i], self.q.now() + self.spec.load_ms * 1000);
                let eval_cases = eval.map(|s| (s.cases.len() as u32, s.compare_with_previous));
                self.q.at(at, Ev::Loaded { node: i, model, version, incarnation, eval_cases });
            }
            Output::Shadow { plan, .. } => self.nodes[i].shadowing = plan,
            Output::ReleaseBlobs { keep } => self.nodes[i].blobs.retain(|b| keep.contains(b)),
            Output::Persist(p) => self.nodes[i].store.apply(p),
            Output::SampleMetrics => {
                let reports = self.measure(i);
                self.input(i, Input::LocalMetrics(reports));
            }
            Output::History(event) => slmesh_protocol::history::remember(&mut self.nodes[i].history, event),
            Output::Event { text, version, .. } => {
                let text = match version {
                    Some(v) => format!("v{v}: {text}"),
                    None => text,
                };
                self.events.push((self.q.now(), i, text))
            }
        }
    }

    fn log_wire(&mut self, what: impl FnOnce() -> String, data: &[u8]) {
        if let Some(log) = &mut self.wire_log {
            log.push((what(), data.to_vec()));
        }
    }

    /// Gossip as gossipsub floods it: to every linked gossip peer but the sender that the
    /// node has admitted (crates/mesh scores a peer below gossipsub's publish and gossip
    /// thresholds until its node admits it).
    fn flood(&mut self, from: usize, skip: Option<usize>, topic: &'static str, data: std::rc::Rc<Vec<u8>>) {
        let bytes = data.len() as u64 + gossip_envelope_bytes(topic);
        // By index: this is the hot path, and the mesh does not change while it runs.
        let metrics = topic == TOPIC_METRICS;
        let degree = if metrics { self.nodes[from].metrics_mesh.len() } else { self.nodes[from].mesh.len() };
        for k in 0..degree {
            let j = if metrics { self.nodes[from].metrics_mesh[k] } else { self.nodes[from].mesh[k] };
            let admitted = self.nodes[from].node.as_ref().is_some_and(|n| n.is_admitted(&self.node_ids[j]));
            if Some(j) != skip && admitted && self.linked(from, j) {
                *self.gossip_bytes.entry(topic).or_default() += bytes;
                // Gossip is the one traffic the links' loss applies to: the mesh repairs
                // it (anti-entropy), where streams retransmit.
                if let Some(at) = self.transmit(from, j, bytes, true) {
                    self.q.at(at, Ev::Gossip { to: j, from, topic, data: data.clone() });
                }
            }
        }
    }

    /// The modelled engine's cumulative figures: those since the last sample (at most an
    /// interval's) added. A node samples once an interval, and again when it starts
    /// serving a version and at its turn in a metrics panel.
    fn measure(&mut self, i: usize) -> Vec<VersionReport> {
        self.accrue(i);
        let mut out: Vec<VersionReport> = self.nodes[i].measured.values().cloned().collect();
        if self.nodes[i].liar {
            for r in &mut out {
                r.requests = r.requests.max(1000);
                r.errors = r.requests;
                r.agreement = r.agreement.as_ref().map(|a| constant_sketch(a.count(), 0.0));
            }
        }
        if self.nodes[i].flatterer {
            for r in &mut out {
                r.errors = 0;
                r.agreement = r.agreement.as_ref().map(|a| constant_sketch(a.count(), 1.0));
            }
        }
        out
    }

    /// Adds what the modelled engine served since the last sample (at most an interval's)
    /// to the version it serves: a version that starts serving starts from nothing.
    fn accrue(&mut self, i: usize) {
        let interval = self.spec.node_config.metrics_interval_ms;
        let now = self.now_ms();
        let (elapsed, carry) = match self.nodes[i].sampled {
            Some((at, carry)) => (now.saturating_sub(at).min(interval), carry),
            None => (interval, 0.0),
        };
        let due = self.spec.request_rate * elapsed as f64 / 1000.0 + carry;
        let requests = (due + 1e-9).floor() as u64; // 0.3 × 10 is 2.999…
        let carry = if self.nodes[i].serving.is_some() { due - requests as f64 } else { 0.0 };
        self.nodes[i].sampled = Some((now, carry));
        if let Some(v) = self.nodes[i].serving {
            let b = self.behaviour.get(&v).cloned().unwrap_or(Behaviour {
                latency_median_secs: 0.2,
                ttft_median_secs: 0.05,
                tokens_per_sec: 50.0,
                error_rate: 0.0,
            });
            let shadow_sample = self.nodes[i].shadowing.as_ref().filter(|p| p.candidate == v).map(|p| p.sample);
            let mut r = self.nodes[i].measured.remove(&v).unwrap_or_else(|| VersionReport {
                model: MODEL.into(),
                version: v,
                ..Default::default()
            });
            for _ in 0..requests {
                r.requests += 1;
                r.errors += u64::from(self.rng.unit() < b.error_rate);
                let spread = self.spec.latency_spread;
                r.latency.add(self.rng.lognormal(b.latency_median_secs, spread));
                r.ttft.add(self.rng.lognormal(b.ttft_median_secs, spread));
                r.tokens_per_sec.add(self.rng.lognormal(b.tokens_per_sec, 0.1));
            }
            // Shadow comparison: a right answer agrees with the baseline's, a wrong one not.
            if let Some(sample) = shadow_sample {
                let right = self.wrong_answers.get(&v).copied().unwrap_or(1.0);
                let compared = (requests as f64 * sample).round() as u64;
                for _ in 0..compared {
                    let score = if self.rng.unit() < right { 0.9 } else { 0.1 };
                    r.agreement.get_or_insert_with(Default::default).add(score);
                }
            }
            self.nodes[i].measured.insert(v, r);
        }
    }

    fn step(&mut self, ev: Ev) {
        let now = self.now_ms();
        match ev {
            Ev::Gossip { to, from, topic, data } => {
                let id = message_id(&data);
                if !self.linked(from, to) {
                    return;
                }
                self.nodes[to].gossip_received += 1;
                if !self.nodes[to].seen.insert(id) {
                    return;
                }
                let peer = self.id(from);
                let Some(node) = self.nodes[to].node.as_mut() else { return };
                let verdict = node.handle_gossip(now, peer, topic, &data);
                if topic == TOPIC_MANIFESTS {
                    self.note_learned(to);
                }
                self.drain(to);
                if verdict == GossipVerdict::Accept {
                    self.flood(to, Some(from), topic, data);
                }
            }
            Ev::Request { to, from, kind, data } => {
                if self.nodes[to].silent {
                    // The requester's transport gives up (crates/mesh: 30 s).
                    let at = self.q.now() + REQUEST_TIMEOUT;
                    self.q.at(at, Ev::Response { to: from, from: to, kind, result: Err("request timed out".into()) });
                    return;
                }
                let result = if self.linked(from, to) {
                    let peer = self.id(from);
                    let Some(node) = self.nodes[to].node.as_mut() else { return };
                    let answer = node.handle_request(now, peer, &data);
                    self.drain(to);
                    let bytes = answer.to_bytes().map_err(|e| e.to_string());
                    if let Ok(b) = &bytes {
                        self.log_wire(|| "response".into(), b);
                    }
                    bytes
                } else {
                    Err("not connected".into())
                };
                let bytes = result.as_ref().map_or(0, |b| b.len() as u64);
                *self.response_bytes.entry(kind).or_default() += bytes;
                let at = self.send(to, from, bytes).unwrap_or(self.q.now() + SECOND);
                self.q.at(at, Ev::Response { to: from, from: to, kind, result });
            }
            Ev::Response { to, from, kind, result } => {
                let peer = self.id(from);
                self.input(to, Input::Response { peer, kind, result });
                self.note_learned(to);
            }
            Ev::Loaded { node, model, version, incarnation, eval_cases } => {
                if incarnation != self.incarnation[node] {
                    return;
                }
                let before = self.nodes[node].serving;
                self.accrue(node);
                let result = if self.broken.contains(&version) {
                    Err("tokenizer.ggml.bos_token_id 99999 is out of range".to_string())
                } else {
                    self.nodes[node].serving = Some(version);
                    self.nodes[node].served.push((self.q.now(), version));
                    Ok(())
                };
                // The modelled suite: each version passes its share of right answers.
                let passed_by = |v: u64, cases: u32| {
                    let share = self.wrong_answers.get(&v).copied().unwrap_or(1.0);
                    ((cases as f64 * share).round() as u32).min(cases)
                };
                let eval = eval_cases.filter(|_| result.is_ok()).map(|(cases, compare)| {
                    let passed = passed_by(version, cases);
                    let previous_passed = before.filter(|_| compare).map(|b| passed_by(b, cases));
                    let checks_passed = passed;
                    slmesh_protocol::eval::EvalCounts { cases, passed, checks: cases, checks_passed, previous_passed }
                });
                self.input(node, Input::ActivationFinished { model, version, result, eval });
            }
            Ev::VersionFetched { node, model, version, result, incarnation } => {
                if incarnation == self.incarnation[node] {
                    self.input(node, Input::FetchFinished { model, version, result });
                }
            }
            Ev::FetchCheck { node, blob, incarnation } => self.on_fetch_check(node, blob, incarnation),
            Ev::PieceRequest { to, from, blob, piece, lane, incarnation } => {
                self.on_piece_request(to, from, blob, piece, lane, incarnation)
            }
            Ev::PieceAnswer { to, from, blob, piece, lane, outcome, incarnation } => {
                self.on_piece_answer(to, from, blob, piece, lane, outcome, incarnation)
            }
            Ev::SlotFree { node, blob, transfer, incarnation } => {
                self.on_slot_free(node, blob, Some(transfer), incarnation)
            }
            Ev::SlotStalled { node, blob, incarnation } => self.on_slot_free(node, blob, None, incarnation),
            Ev::PieceStall { node, blob, provider, lane, incarnation } => {
                self.on_piece_stall(node, blob, provider, lane, incarnation)
            }
            Ev::LaneRetry { node, blob, provider, lane, incarnation } => {
                self.on_lane_retry(node, blob, provider, lane, incarnation)
            }
            Ev::Timer { node, at } => {
                if self.nodes[node].timer_at != Some(at) {
                    return; // superseded by an earlier or later timeout
                }
                self.nodes[node].timer_at = None;
                if let Some(n) = self.nodes[node].node.as_mut() {
                    n.handle_timeout(now);
                    // A node that, its timers run, asks to be woken at once again would
                    // spin its driver at full CPU: a bug in the state machine.
                    let next = n.poll_timeout();
                    assert!(next > now, "node {node} asks to be woken at {next} right after its timeout at {now}");
                }
                self.drain(node);
            }
        }
    }

    /// Ends a run: delivers the gossip in flight for at most `within` (forwarding it and
    /// counting its bytes in `gossip_bytes`), and nothing else: nothing new is sent (no
    /// gossip, request or refusal, as for a silent node), and every other event is
    /// dropped, so the fleet runs no further. Otherwise a message originated at the run's
    /// last instant would count its first hop only, and a per-second figure over a short
    /// window would depend on whether a burst fell just before the end or at it.
    pub fn drain_gossip(&mut self, within: Micros) {
        let end = self.q.now();
        self.draining = true;
        while let Some(at) = self.q.peek_time() {
            if at > end + within {
                break;
            }
            let Some((_, ev)) = self.q.pop() else { break };
            if matches!(ev, Ev::Gossip { .. }) {
                self.step(ev);
            }
        }
    }

    /// Runs until simulated time `until` (microseconds since the start).
    pub fn run_until(&mut self, until: Micros) {
        while let Some(at) = self.q.peek_time() {
            if at > until {
                break;
            }
            let Some((_, ev)) = self.q.pop() else { break };
            self.step(ev);
        }
        self.q.advance_to(until);
    }

    pub fn run_for(&mut self, micros: Micros) {
        self.run_until(self.q.now() + micros);
    }

    /// Records when node `i`'s highest known version of the model rose.
    fn note_learned(&mut self, i: usize) {
        let Some(latest) = self.nodes[i].node.as_ref().and_then(|n| n.model(MODEL)).map(|m| m.latest_known) else {
            return;
        };
        if self.nodes[i].learned.last().is_none_or(|(_, v)| *v < latest) {
            let now = self.q.now();
            self.nodes[i].learned.push((now, latest));
        }
    }

    /// Node `i`'s wave (0-based) in the rollout of `version`, as it last persisted it: set
    /// once it activated the version.
    pub fn my_wave(&self, i: usize, version: u64) -> Option<u32> {
        self.nodes[i].store.versions.get(&(MODEL.to_string(), version)).and_then(|r| r.my_wave)
    }

    pub fn active(&self, i: usize) -> Option<u64> {
        self.nodes[i].node.as_ref().and_then(|n| n.active(MODEL))
    }

    pub fn serving(&self, i: usize) -> Option<u64> {
        self.nodes[i].serving
    }

    pub fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].node.is_some())
    }

    /// What node `i` logged, with simulated seconds.
    pub fn events_of(&self, i: usize) -> Vec<String> {
        self.events.iter().filter(|(_, n, _)| *n == i).map(|(t, _, e)| format!("{:.1}: {e}", *t as f64 / 1e6)).collect()
    }

    /// Seconds after `since` (simulated) at which each node first served `version`.
    pub fn first_served(&self, version: u64, since: Micros) -> Vec<Option<f64>> {
        self.nodes
            .iter()
            .map(|n| n.served.iter().find(|(_, v)| *v == version).map(|(t, _)| t.saturating_sub(since) as f64 / 1e6))
            .collect()
    }
}

/// What variant selection sees of every simulated node: 8 GiB, x86_64 with AVX2, no tags
/// (the node adds its own), kernels not measured (the table of fast kernels decides).
pub fn simulated_node_facts() -> NodeFacts {
    NodeFacts {
        ram_bytes: 8 << 30,
        cpu_arch: "x86_64".into(),
        tags: Tags::new(),
        simd: true,
        kernel_ps_per_weight: Default::default(),
    }
}
