//! An in-memory fleet of node state machines: a fake clock, a fake network that floods
//! gossip like gossipsub (each node forwards what it accepted), requests with replies,
//! fetches that succeed when a provider holds the blob, activations that fail for
//! versions marked broken, a store per node that applies `Persist` outputs and gives them
//! back on restart, and requests measured per served version. Deterministic: no threads,
//! no real clock, a seeded order.

#![allow(dead_code)]

use slmesh_protocol::fleet::{CommandAction, RolloutCommand, SignedCommand, VersionReport};
use slmesh_protocol::hex32::Hex32;
use slmesh_protocol::identity::{KeyKind, NodeId, SecretKey};
use slmesh_protocol::manifest::{
    FileEntry, FileRole, InferenceDefaults, ModelFormat, ModelManifest, SignedManifest, Variant,
};
use slmesh_protocol::mesh::GossipVerdict;
use slmesh_protocol::node::{
    Input, ModelState, Node, NodeConfig, NodeIdentity, Output, Persist, RequestKind, Restored, VersionRecord,
};
use slmesh_protocol::rollout::{Gates, RolloutPlan, TagSelector, Wave};
use slmesh_protocol::select::NodeFacts;
use slmesh_protocol::trust::{Enrollment, Tags};
use slmesh_protocol::TrustStore;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashSet};

pub const MODEL: &str = "m";
/// One-way latency of every link, milliseconds.
pub const LATENCY: u64 = 20;
pub const FETCH_MS: u64 = 500;
pub const LOAD_MS: u64 = 200;
/// Requests per second each node serves.
pub const REQUEST_RATE: u64 = 4;

#[derive(Default, Clone)]
pub struct FakeStore {
    manifests: BTreeMap<(String, u64), SignedManifest>,
    models: BTreeMap<String, ModelState>,
    versions: BTreeMap<(String, u64), VersionRecord>,
    commands: Vec<SignedCommand>,
    peers: BTreeMap<NodeId, Tags>,
}

impl FakeStore {
    fn apply(&mut self, p: Persist) {
        match p {
            Persist::Manifest(m) => {
                if let Ok(body) = m.verify_self_signed() {
                    self.manifests.insert((body.name, body.version), m);
                }
            }
            Persist::Model { name, state } => {
                self.models.insert(name, state);
            }
            Persist::Version { name, version, record } => {
                self.versions.insert((name, version), record);
            }
            Persist::Command(c) => {
                if !self.commands.contains(&c) {
                    self.commands.push(c)
                }
            }
            Persist::Peer { node, tags, .. } => {
                self.peers.insert(node, tags);
            }
        }
    }

    fn restored(&self, blobs: &BTreeSet<Hex32>) -> Restored {
        Restored {
            manifests: self.manifests.values().cloned().collect(),
            models: self.models.clone().into_iter().collect(),
            versions: self.versions.clone().into_iter().collect(),
            commands: self.commands.clone(),
            peers: self.peers.clone().into_iter().collect(),
            complete_blobs: blobs.iter().copied().collect(),
        }
    }
}

/// What a node's requests of one version measure.
#[derive(Clone, Copy)]
pub struct Behaviour {
    pub error_rate: f64,
    pub latency: f64,
}

pub struct SimNode {
    pub node: Option<Node>,
    pub identity: NodeIdentity,
    pub store: FakeStore,
    pub blobs: BTreeSet<Hex32>,
    /// What the inference engine serves.
    pub serving: Option<u64>,
    /// Reports the engine's measurements per version (cumulative).
    pub measured: BTreeMap<u64, VersionReport>,
    pub loads: BTreeMap<u64, u32>,
    pub liar: bool,
    /// Every (time, version) this node started serving.
    pub served: Vec<(u64, u64)>,
    seen: HashSet<Vec<u8>>,
}

enum Ev {
    Gossip { to: usize, from: usize, topic: &'static str, data: Vec<u8> },
    Request { to: usize, from: usize, kind: RequestKind, data: Vec<u8> },
    Response { to: usize, from: usize, kind: RequestKind, result: Result<Vec<u8>, String> },
    FetchDone { node: usize, model: String, version: u64, blobs: Vec<Hex32>, incarnation: u32 },
    Loaded { node: usize, model: String, version: u64, incarnation: u32 },
}

struct Timed {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

pub struct Fleet {
    pub now: u64,
    pub publisher: SecretKey,
    pub trust: TrustStore,
    pub nodes: Vec<SimNode>,
    pub cfg: NodeConfig,
    /// Versions whose weights do not load.
    pub broken: BTreeSet<u64>,
    pub behaviour: BTreeMap<u64, Behaviour>,
    /// Node pairs cut off from each other.
    pub cut: BTreeSet<(usize, usize)>,
    /// Per node, its incarnation (restarts make older events stale).
    incarnation: Vec<u32>,
    queue: BinaryHeap<Timed>,
    seq: u64,
    /// Every refusal seen, for assertions.
    pub refusals: Vec<(usize, String)>,
    pub events: Vec<(u64, usize, String)>,
}

pub fn config() -> NodeConfig {
    NodeConfig {
        metrics_interval_ms: 1_000,
        metrics_ttl_secs: 30,
        sync_interval_ms: 3_000,
        rollout_tick_ms: 1_000,
        facts: NodeFacts { ram_bytes: 8 << 30, cpu_arch: "x86_64".into(), tags: Tags::new() },
        ..NodeConfig::default()
    }
}

/// The start of the fake clock: a plausible Unix time, in milliseconds.
pub const T0: u64 = 1_800_000_000_000;

pub fn node_key(i: usize) -> SecretKey {
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    SecretKey::from_seed(KeyKind::Node, seed)
}

impl Fleet {
    /// `n` enrolled nodes, all connected to each other, none started yet.
    pub fn new(n: usize) -> Self {
        let publisher = SecretKey::from_seed(KeyKind::Publisher, [3; 32]);
        let mut trust = TrustStore::new();
        trust.add("ops", publisher.public()).expect("trust");
        let nodes = (0..n)
            .map(|i| {
                let secret = node_key(i);
                let tags: Tags = [("site".to_string(), "a".to_string())].into();
                let certificate = Enrollment {
                    node: secret.public(),
                    tags: tags.clone(),
                    issued_at: T0 / 1000 - 10,
                    expires_at: T0 / 1000 + 365 * 86_400,
                }
                .sign(&publisher)
                .expect("enroll");
                SimNode {
                    node: None,
                    identity: NodeIdentity { secret, certificate, tags },
                    store: FakeStore::default(),
                    blobs: BTreeSet::new(),
                    serving: None,
                    measured: BTreeMap::new(),
                    loads: BTreeMap::new(),
                    liar: false,
                    served: vec![],
                    seen: HashSet::new(),
                }
            })
            .collect();
        Fleet {
            now: T0,
            publisher,
            trust,
            nodes,
            cfg: config(),
            broken: BTreeSet::new(),
            behaviour: BTreeMap::new(),
            cut: BTreeSet::new(),
            incarnation: vec![0; n],
            queue: BinaryHeap::new(),
            seq: 0,
            refusals: vec![],
            events: vec![],
        }
    }

    pub fn id(&self, i: usize) -> NodeId {
        self.nodes[i].identity.secret.public()
    }

    fn index_of(&self, id: &NodeId) -> Option<usize> {
        (0..self.nodes.len()).find(|i| self.id(*i) == *id)
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Timed { at, seq: self.seq, ev });
    }

    pub fn linked(&self, a: usize, b: usize) -> bool {
        a != b
            && self.nodes[a].node.is_some()
            && self.nodes[b].node.is_some()
            && !self.cut.contains(&(a.min(b), a.max(b)))
    }

    /// Starts (or restarts) node `i` from its store, and connects it to every live peer.
    pub fn start(&mut self, i: usize) {
        self.incarnation[i] += 1;
        let sim = &mut self.nodes[i];
        let restored = sim.store.restored(&sim.blobs);
        sim.serving = None;
        sim.seen.clear();
        let node = Node::new(self.cfg.clone(), sim.identity.clone(), self.trust.clone(), restored, self.now);
        sim.node = Some(node);
        self.drain(i);
        for j in 0..self.nodes.len() {
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

    /// Stops node `i` as a crash would: what it did not persist is lost.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].node = None;
        self.nodes[i].serving = None;
        for j in 0..self.nodes.len() {
            if j != i && self.nodes[j].node.is_some() {
                let peer = self.id(i);
                self.input(j, Input::PeerDisconnected { peer });
            }
        }
    }

    /// Cuts the links between the two groups (or heals them).
    pub fn partition(&mut self, side: &[usize], cut: bool) {
        for &a in side {
            for b in 0..self.nodes.len() {
                if side.contains(&b) {
                    continue;
                }
                let key = (a.min(b), a.max(b));
                if cut {
                    if self.cut.insert(key) && self.nodes[a].node.is_some() && self.nodes[b].node.is_some() {
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
        let now = self.now;
        if let Some(node) = self.nodes[i].node.as_mut() {
            node.handle(now, input);
            self.drain(i);
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i].node.as_ref().expect("node is running")
    }

    fn drain(&mut self, i: usize) {
        loop {
            let Some(out) = self.nodes[i].node.as_mut().and_then(|n| n.poll_output()) else { break };
            self.on_output(i, out);
        }
    }

    fn on_output(&mut self, i: usize, out: Output) {
        let now = self.now;
        match out {
            Output::Gossip { topic, data } => self.flood(i, None, topic, data),
            Output::Request { peer, kind, data } => {
                if let Some(j) = self.index_of(&peer) {
                    self.push(now + LATENCY, Ev::Request { to: j, from: i, kind, data });
                }
            }
            Output::Refuse { peer, reason } => {
                self.refusals.push((i, reason));
                if let Some(j) = self.index_of(&peer) {
                    let me = self.id(i);
                    if self.nodes[j].node.is_some() {
                        self.input(j, Input::PeerDisconnected { peer: me });
                    }
                    self.input(i, Input::PeerDisconnected { peer });
                }
            }
            Output::LearnAddrs { .. } | Output::Providers { .. } | Output::Uploads(_) => {}
            Output::Fetch { model, version, files } => {
                let mut got = vec![];
                let mut ok = true;
                for (file, providers) in &files {
                    let here = self.nodes[i].blobs.contains(&file.blake3);
                    let from_peer = providers
                        .iter()
                        .filter_map(|p| self.index_of(p))
                        .any(|j| self.linked(i, j) && self.nodes[j].blobs.contains(&file.blake3));
                    ok &= here || from_peer;
                    got.push(file.blake3);
                }
                let incarnation = self.incarnation[i];
                let blobs = if ok { got } else { vec![] };
                self.push(now + FETCH_MS, Ev::FetchDone { node: i, model, version, blobs, incarnation });
            }
            Output::Activate { model, version, .. } => {
                *self.nodes[i].loads.entry(version).or_default() += 1;
                let incarnation = self.incarnation[i];
                self.push(now + LOAD_MS, Ev::Loaded { node: i, model, version, incarnation });
            }
            Output::DeleteVersion { .. } => {}
            Output::ReleaseBlobs { keep } => self.nodes[i].blobs.retain(|b| keep.contains(b)),
            Output::Persist(p) => self.nodes[i].store.apply(p),
            Output::SampleMetrics => {
                let reports = self.measure(i);
                self.input(i, Input::LocalMetrics(reports));
            }
            Output::Event { text, .. } => self.events.push((now, i, text)),
        }
    }

    /// Gossip as gossipsub floods it: to every linked peer but the sender; a peer that
    /// accepts a message it had not seen forwards it.
    fn flood(&mut self, from: usize, skip: Option<usize>, topic: &'static str, data: Vec<u8>) {
        self.nodes[from].seen.insert(data.clone());
        for j in 0..self.nodes.len() {
            if Some(j) != skip && self.linked(from, j) {
                self.push(self.now + LATENCY, Ev::Gossip { to: j, from, topic, data: data.clone() });
            }
        }
    }

    fn measure(&mut self, i: usize) -> Vec<VersionReport> {
        let sim = &mut self.nodes[i];
        if let Some(v) = sim.serving {
            let b = self.behaviour.get(&v).copied().unwrap_or(Behaviour { error_rate: 0.0, latency: 0.2 });
            let r = sim.measured.entry(v).or_insert_with(|| VersionReport {
                model: MODEL.into(),
                version: v,
                ..Default::default()
            });
            let per_tick = REQUEST_RATE * self.cfg.metrics_interval_ms / 1000;
            for k in 0..per_tick {
                r.requests += 1;
                // Deterministic error pattern at the behaviour's rate.
                if ((r.requests * 7919 + k) % 1000) as f64 / 1000.0 < b.error_rate {
                    r.errors += 1;
                }
                r.latency.add(b.latency);
                r.ttft.add(b.latency / 4.0);
                r.tokens_per_sec.add(50.0);
            }
        }
        let mut out: Vec<VersionReport> = sim.measured.values().cloned().collect();
        if sim.liar {
            for r in &mut out {
                r.requests = r.requests.max(1000);
                r.errors = r.requests;
            }
        }
        out
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Gossip { to, from, topic, data } => {
                if !self.linked(from, to) || self.nodes[to].seen.contains(&data) {
                    return;
                }
                self.nodes[to].seen.insert(data.clone());
                let (now, peer) = (self.now, self.id(from));
                let Some(node) = self.nodes[to].node.as_mut() else { return };
                let verdict = node.handle_gossip(now, peer, topic, &data);
                self.drain(to);
                if verdict == GossipVerdict::Accept {
                    self.flood(to, Some(from), topic, data);
                }
            }
            Ev::Request { to, from, kind, data } => {
                if !self.linked(from, to) {
                    let at = self.now + LATENCY;
                    self.push(at, Ev::Response { to: from, from: to, kind, result: Err("not connected".into()) });
                    return;
                }
                let (now, peer) = (self.now, self.id(from));
                let Some(node) = self.nodes[to].node.as_mut() else { return };
                let answer = node.handle_request(now, peer, &data);
                self.drain(to);
                let result = answer.to_bytes().map_err(|e| e.to_string());
                self.push(self.now + LATENCY, Ev::Response { to: from, from: to, kind, result });
            }
            Ev::Response { to, from, kind, result } => {
                let peer = self.id(from);
                self.input(to, Input::Response { peer, kind, result });
            }
            Ev::FetchDone { node, model, version, blobs, incarnation } => {
                if incarnation != self.incarnation[node] {
                    return;
                }
                let result = if blobs.is_empty() { Err("no provider had the blob".to_string()) } else { Ok(()) };
                self.nodes[node].blobs.extend(blobs);
                self.input(node, Input::FetchFinished { model, version, result });
            }
            Ev::Loaded { node, model, version, incarnation } => {
                if incarnation != self.incarnation[node] {
                    return;
                }
                let result = if self.broken.contains(&version) {
                    Err("tokenizer.ggml.bos_token_id 99999 is out of range".to_string())
                } else {
                    self.nodes[node].serving = Some(version);
                    self.nodes[node].served.push((self.now, version));
                    Ok(())
                };
                self.input(node, Input::ActivationFinished { model, version, result });
            }
        }
    }

    /// Runs the fleet until `until` (fake milliseconds since T0).
    pub fn run_until(&mut self, until: u64) {
        let end = T0 + until;
        loop {
            let timer =
                (0..self.nodes.len()).filter_map(|i| self.nodes[i].node.as_ref().map(|n| (n.poll_timeout(), i))).min();
            let event_at = self.queue.peek().map(|t| t.at);
            let next = match (timer, event_at) {
                (Some((t, _)), Some(e)) => t.min(e),
                (Some((t, _)), None) => t,
                (None, Some(e)) => e,
                (None, None) => break,
            };
            if next > end {
                break;
            }
            self.now = self.now.max(next);
            if event_at == Some(next) {
                let ev = self.queue.pop().expect("peeked").ev;
                self.step(ev);
            } else if let Some((_, i)) = timer {
                let now = self.now;
                if let Some(n) = self.nodes[i].node.as_mut() {
                    n.handle_timeout(now);
                }
                self.drain(i);
            }
        }
        self.now = self.now.max(end);
    }

    pub fn run_for(&mut self, ms: u64) {
        let t = self.now - T0 + ms;
        self.run_until(t);
    }

    /// A manifest of `version` with the given waves (fraction, soak seconds) and gates.
    pub fn manifest(&self, version: u64, waves: &[(f64, u64)], gates: Gates) -> SignedManifest {
        let mut blake = [0u8; 32];
        blake[..8].copy_from_slice(&version.to_le_bytes());
        let manifest = ModelManifest {
            name: MODEL.into(),
            version,
            created_at: T0 / 1000 - 86_400,
            description: String::new(),
            variants: vec![Variant {
                id: "q4_0".into(),
                format: ModelFormat::Gguf,
                quantization: "Q4_0".into(),
                architecture: "llama".into(),
                cpu_archs: vec![],
                min_ram_bytes: 0,
                selector: TagSelector::default(),
                files: vec![FileEntry {
                    role: FileRole::Weights,
                    name: format!("v{version}.gguf"),
                    blake3: Hex32(blake),
                    size: 1000,
                }],
            }],
            inference: InferenceDefaults::default(),
            rollout: RolloutPlan {
                waves: waves.iter().map(|(f, s)| Wave { fraction: *f, soak_secs: *s }).collect(),
                selector: TagSelector::default(),
                gates,
            },
        };
        SignedManifest::sign(&manifest, &self.publisher).expect("sign")
    }

    /// Publishes from node `origin`, which holds the files.
    pub fn publish(&mut self, origin: usize, signed: SignedManifest) -> Result<String, String> {
        let now = self.now;
        let node = self.nodes[origin].node.as_mut().expect("running");
        let files: Vec<Hex32> = node.files_to_publish(&signed)?.iter().map(|f| f.blake3).collect();
        self.nodes[origin].blobs.extend(files.iter().copied());
        let node = self.nodes[origin].node.as_mut().expect("running");
        let answer = node.publish(now, signed, &files);
        self.drain(origin);
        answer
    }

    pub fn command(&mut self, at: usize, version: u64, action: CommandAction) -> Result<String, String> {
        let c = RolloutCommand { model: MODEL.into(), version, action, issued_at: self.now / 1000 };
        let signed = SignedCommand::sign(&c, &self.publisher).expect("sign");
        let now = self.now;
        let node = self.nodes[at].node.as_mut().expect("running");
        let answer = node.command(now, signed);
        self.drain(at);
        answer
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

    /// Gates that pass on healthy figures within seconds, with `min_nodes` reporting.
    pub fn gates(min_nodes: u32) -> Gates {
        Gates {
            max_error_rate: 0.1,
            min_samples: 10,
            min_reporting_nodes: min_nodes,
            max_p95_latency_ratio: 10.0,
            max_p95_ttft_ratio: 10.0,
            min_tokens_per_sec_ratio: 0.1,
        }
    }

    /// Version 1 everywhere (one wave), every node serving it.
    pub fn on_v1(n: usize) -> Self {
        let mut f = Fleet::new(n);
        f.start_all();
        f.run_for(1_000);
        let m = f.manifest(1, &[(1.0, 0)], Fleet::gates(1));
        f.publish(0, m).expect("publish v1");
        f.run_for(10_000);
        for i in 0..n {
            assert_eq!(f.active(i), Some(1), "node {i} is not on v1: {:?}", f.events_of(i));
        }
        f
    }

    pub fn events_of(&self, i: usize) -> Vec<String> {
        self.events.iter().filter(|(_, n, _)| *n == i).map(|(t, _, e)| format!("{}: {e}", (t - T0) / 1000)).collect()
    }
}
