//! The node's event loop: mesh events, answers to its own requests, finished fetches and
//! activations, operator commands and timers all arrive here, one at a time, and are
//! decided through the protocol core.

use super::status::{FetchStatus, ModelStatus, NodeStatus, PeerStatus};
use super::Parts;
use anyhow::Result;
use slmesh_blobs::{BlobNode, UploadGate};
use slmesh_inference::{Engine, ModelSpec};
use slmesh_mesh::{Acceptance, MeshEvent, MeshHandle};
use slmesh_protocol::cohort::{membership, Membership};
use slmesh_protocol::fleet::{
    advance, decide, evaluate_gates, verify_metrics, FleetView, GateVerdict, MetricsRecord, OperatorState,
    RolloutCommand, RolloutDecision, RolloutProgress, SignedCommand, SignedMetrics, VersionReport,
};
use slmesh_protocol::manifest::{verify_signed_manifest, FileRole, SignedManifest, Variant, VerifiedManifest};
use slmesh_protocol::mesh::{
    admit, manifest_verdict, on_staged, rank_providers, upload_decision, verify_have, BlobDirectory, GossipVerdict,
    HaveRecord, Hello, ManifestDigest, PeerRequest, PeerResponse, ProviderInfo, SignedHave, StagedDecision, SyncReply,
    UploadPolicy, MAX_SYNC_HAVES, MAX_SYNC_MANIFESTS, TOPIC_HAVES, TOPIC_MANIFESTS,
};
use slmesh_protocol::mesh::{MAX_SYNC_COMMANDS, MAX_SYNC_METRICS, TOPIC_COMMANDS, TOPIC_METRICS};
use slmesh_protocol::rollout::{RolloutPhase, RolloutState};
use slmesh_protocol::select::{select_variant, NodeFacts};
use slmesh_protocol::swarm::{origin_piece_decision, SwarmPolicy};
use slmesh_protocol::trust::{Enrollment, Tags};
use slmesh_protocol::{Hex32, NodeId, ProtocolError, TrustStore};
use slmesh_store::{PeerRecord, Store, StoreError};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

use slmesh_mesh::PeerId;

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What the upload gate needs to know, kept current by the loop: which blobs this node
/// published, and how many admitted peers hold each.
pub(crate) struct GateState {
    policy: UploadPolicy,
    originated: RwLock<HashSet<Hex32>>,
    /// Admitted peers known to hold each blob this node published.
    holders: RwLock<HashMap<Hex32, HashSet<NodeId>>>,
    /// Peers this node sent a whole blob to: holders before they say so.
    served: RwLock<HashMap<Hex32, HashSet<NodeId>>>,
    /// Admitted peers' sites, to seed each piece of a published blob once per site.
    sites: RwLock<HashMap<NodeId, String>>,
    /// When each piece of a published blob was last sent into a site, and to whom.
    seeded: Mutex<HashMap<SeededPiece, (Instant, Option<NodeId>)>>,
}

/// A piece of a published blob sent into a site (None: a peer without a site tag).
type SeededPiece = (Hex32, Option<String>, u32);

/// The origin sends a piece into a site again after this long, in case the peer it went
/// to has left before passing it on.
const RESEED_AFTER: Duration = Duration::from_secs(20);

impl GateState {
    pub fn new(policy: UploadPolicy) -> Self {
        GateState {
            policy,
            originated: Default::default(),
            holders: Default::default(),
            served: Default::default(),
            sites: Default::default(),
            seeded: Default::default(),
        }
    }
}

impl UploadGate for GateState {
    fn allow(&self, blob: &Hex32, uploading: usize) -> Result<(), String> {
        let originated = self.originated.read().map(|o| o.contains(blob)).unwrap_or(false);
        let mut copies = self.holders.read().ok().and_then(|h| h.get(blob).cloned()).unwrap_or_default();
        if let Some(served) = self.served.read().ok().and_then(|s| s.get(blob).cloned()) {
            copies.extend(served);
        }
        upload_decision(&self.policy, uploading, originated, copies.len())
    }

    /// For a published blob, each piece goes into each site once (`swarm::origin_piece_decision`):
    /// the peers of that site pass it on, as they fetch it.
    fn allow_piece(
        &self,
        blob: &Hex32,
        uploading: usize,
        client: Option<NodeId>,
        piece: Option<u32>,
    ) -> Result<(), String> {
        self.allow(blob, uploading)?;
        let originated = self.originated.read().map(|o| o.contains(blob)).unwrap_or(false);
        // origin_copies = 0: the publisher serves everyone everything.
        let Some(piece) = piece.filter(|_| originated && self.policy.origin_copies > 0) else { return Ok(()) };
        let site = client.and_then(|c| self.sites.read().ok().and_then(|s| s.get(&c).cloned()));
        let mut seeded = self.seeded.lock().unwrap_or_else(|e| e.into_inner());
        let key = (*blob, site, piece);
        // The peer it went to asking again lost it (a restart mid-transfer): not a copy.
        let copies = u32::from(seeded.get(&key).is_some_and(|(at, to)| at.elapsed() < RESEED_AFTER && *to != client));
        origin_piece_decision(&SwarmPolicy::default(), copies)?;
        seeded.insert(key, (Instant::now(), client));
        Ok(())
    }

    fn served(&self, blob: &Hex32, to: NodeId) {
        if let Ok(mut s) = self.served.write() {
            s.entry(*blob).or_default().insert(to);
        }
    }
}

/// State the HTTP API reads while the loop runs.
#[derive(Default)]
struct Shared {
    peers: BTreeMap<PeerId, PeerStatus>,
    fetches: BTreeMap<(String, u64, String), FetchStatus>,
    notes: BTreeMap<String, String>,
    listen: Vec<String>,
    blob_addrs: Vec<String>,
    refused: Vec<(String, String)>,
    rollouts: Vec<super::status::RolloutView>,
    fleet: Vec<super::status::FleetVersionView>,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) enum ControlMsg {
    Publish { signed: SignedManifest, files_dir: PathBuf, reply: oneshot::Sender<Result<String, String>> },
    Command { signed: SignedCommand, reply: oneshot::Sender<Result<String, String>> },
}

/// The HTTP API's handle on the node.
#[derive(Clone)]
pub(crate) struct Control {
    me: NodeId,
    tags: Tags,
    tx: mpsc::Sender<ControlMsg>,
    shared: Arc<Mutex<Shared>>,
    store: Arc<Store>,
    blobs: Arc<BlobNode>,
    engine: Arc<Engine>,
}

impl Control {
    pub fn me(&self) -> NodeId {
        self.me
    }

    pub async fn publish(&self, signed: SignedManifest, files_dir: PathBuf) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ControlMsg::Publish { signed, files_dir, reply })
            .await
            .map_err(|_| "the node is shutting down".to_string())?;
        rx.await.map_err(|_| "the node is shutting down".to_string())?
    }

    pub async fn command(&self, signed: SignedCommand) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ControlMsg::Command { signed, reply })
            .await
            .map_err(|_| "the node is shutting down".to_string())?;
        rx.await.map_err(|_| "the node is shutting down".to_string())?
    }

    pub fn rollouts(&self) -> Vec<super::status::RolloutView> {
        lock(&self.shared).rollouts.clone()
    }

    pub fn fleet(&self) -> Vec<super::status::FleetVersionView> {
        lock(&self.shared).fleet.clone()
    }

    pub fn status(&self) -> Result<NodeStatus, StoreError> {
        let shared = lock(&self.shared);
        let models = self
            .store
            .models()?
            .into_iter()
            .map(|(name, m)| ModelStatus {
                note: shared.notes.get(&name).cloned(),
                name,
                latest_known: m.latest_known,
                staged: m.staged.into_iter().collect(),
                active: m.active,
                previous: m.previous,
                pinned: m.pinned,
            })
            .collect();
        let counters = self.blobs.counters();
        Ok(NodeStatus {
            node_id: self.me.to_string(),
            peer_id: self.me.peer_id().map(|p| p.to_string()).unwrap_or_default(),
            tags: self.tags.clone(),
            listen: shared.listen.clone(),
            blob_addrs: shared.blob_addrs.clone(),
            peers: shared.peers.values().cloned().collect(),
            models,
            fetches: shared.fetches.values().cloned().collect(),
            serving: self.engine.active().map(|m| m.spec.id()),
            uploaded_bytes: counters.uploaded.load(Ordering::Relaxed),
            downloaded_bytes: counters.downloaded.load(Ordering::Relaxed),
            refused_fetches: counters.refused.load(Ordering::Relaxed),
            refused_peers: shared.refused.clone(),
        })
    }
}

enum Internal {
    HelloAnswer { peer: PeerId, result: Result<Vec<u8>, String> },
    SyncAnswer { peer: PeerId, result: Result<Vec<u8>, String> },
    RetryHello { peer: PeerId },
    FetchDone { name: String, version: u64, result: Result<PathBuf, String> },
    Activated { name: String, version: u64, result: Result<(), String> },
    RolledBack { name: String, bad: u64, to: u64, result: Result<(), String> },
}

struct Peer {
    node: NodeId,
    tags: Tags,
    rtt: Option<Duration>,
}

type VersionKey = (String, u64);

pub(crate) struct Node {
    parts: Parts,
    trust: TrustStore,
    me: NodeId,
    my_tags: Tags,
    mesh: MeshHandle,
    shared: Arc<Mutex<Shared>>,
    peers: HashMap<PeerId, Peer>,
    asked_hello: HashSet<PeerId>,
    conn_addrs: HashMap<PeerId, String>,
    hello_attempts: HashMap<PeerId, u32>,
    directory: BlobDirectory,
    signed_haves: HashMap<NodeId, SignedHave>,
    my_have: Option<SignedHave>,
    listen_ips: BTreeSet<IpAddr>,
    /// Accepted versions whose files are not all staged yet, with the chosen variant.
    wanted: BTreeMap<VersionKey, Variant>,
    fetching: HashSet<VersionKey>,
    /// Per blob being fetched, its providers (best first), updated as peers announce
    /// that they hold it or are fetching it: a running fetch picks up new ones.
    fetch_providers: HashMap<Hex32, watch::Sender<Vec<NodeId>>>,
    retry_at: HashMap<VersionKey, Instant>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    control_rx: mpsc::Receiver<ControlMsg>,
    fleet: FleetView,
    signed_metrics: HashMap<NodeId, SignedMetrics>,
    my_metrics: Option<SignedMetrics>,
    metrics_sent_at: u64,
    commands: BTreeMap<VersionKey, Vec<SignedCommand>>,
    progress: BTreeMap<VersionKey, RolloutProgress>,
    activating: HashSet<VersionKey>,
    active_since: BTreeMap<VersionKey, u64>,
}

impl Node {
    pub fn new(parts: Parts, trust: TrustStore, enrollment: Enrollment, mesh: MeshHandle) -> (Self, Control) {
        let (internal_tx, internal_rx) = mpsc::channel(256);
        let (control_tx, control_rx) = mpsc::channel(16);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let me = parts.secret.public();
        let control = Control {
            me,
            tags: enrollment.tags.clone(),
            tx: control_tx,
            shared: shared.clone(),
            store: parts.store.clone(),
            blobs: parts.blobs.clone(),
            engine: parts.engine.clone(),
        };
        let node = Node {
            parts,
            trust,
            me,
            my_tags: enrollment.tags,
            mesh,
            shared,
            peers: HashMap::new(),
            asked_hello: HashSet::new(),
            conn_addrs: HashMap::new(),
            hello_attempts: HashMap::new(),
            directory: BlobDirectory::default(),
            signed_haves: HashMap::new(),
            my_have: None,
            listen_ips: BTreeSet::new(),
            wanted: BTreeMap::new(),
            fetching: HashSet::new(),
            fetch_providers: HashMap::new(),
            retry_at: HashMap::new(),
            internal_tx,
            internal_rx,
            control_rx,
            fleet: FleetView::default(),
            signed_metrics: HashMap::new(),
            my_metrics: None,
            metrics_sent_at: 0,
            commands: BTreeMap::new(),
            progress: BTreeMap::new(),
            activating: HashSet::new(),
            active_since: BTreeMap::new(),
        };
        (node, control)
    }

    /// Runs until `shutdown` completes; returns the blob node so the caller can close it.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<MeshEvent>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<Arc<BlobNode>> {
        self.restore().await;
        let mut sync_timer =
            tokio::time::interval(Duration::from_secs(self.parts.config.network.sync_interval_secs.max(1)));
        let mut retry_timer = tokio::time::interval(Duration::from_secs(1));
        let mut metrics_timer =
            tokio::time::interval(Duration::from_secs(self.parts.config.fleet.metrics_interval_secs.max(1)));
        let mut rollout_timer = tokio::time::interval(Duration::from_secs(1));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(event) = events.recv() => self.on_mesh_event(event).await,
                Some(msg) = self.internal_rx.recv() => self.on_internal(msg).await,
                Some(msg) = self.control_rx.recv() => self.on_control(msg).await,
                _ = sync_timer.tick() => self.sync_round(),
                _ = retry_timer.tick() => self.try_fetches().await,
                _ = metrics_timer.tick() => self.publish_metrics().await,
                _ = rollout_timer.tick() => self.rollout_tick().await,
            }
        }
        tracing::info!("shutting down");
        if let Err(e) = self.parts.store.flush() {
            tracing::error!("cannot flush the state database: {e}");
        }
        Ok(self.parts.blobs.clone())
    }

    fn note(&self, model: &str, text: impl Into<String>) {
        let text = text.into();
        tracing::warn!(model, "{text}");
        lock(&self.shared).notes.insert(model.to_string(), text);
    }

    fn facts(&self) -> NodeFacts {
        NodeFacts {
            ram_bytes: total_ram_bytes(),
            cpu_arch: std::env::consts::ARCH.to_string(),
            tags: self.my_tags.clone(),
        }
    }

    fn verify(&self, signed: SignedManifest) -> Result<VerifiedManifest, ProtocolError> {
        let store = &self.parts.store;
        verify_signed_manifest(signed, &self.trust, |name| store.latest_version(name).ok().flatten())
    }

    fn staging_dir(&self, name: &str, version: u64) -> PathBuf {
        self.parts.config.data_dir.join("models").join(name).join(version.to_string())
    }

    /// After a restart: serve the active version again, and resume fetches of versions
    /// accepted but not staged.
    async fn restore(&mut self) {
        let models = match self.parts.store.models() {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("cannot read the state database: {e}");
                return;
            }
        };
        for (name, state) in models {
            if let Some(active) = state.active {
                self.start_activation(&name, active);
            }
            let latest = state.latest_known;
            if latest > 0 && !state.staged.contains(&latest) {
                match self.parts.store.manifest(&name, latest) {
                    Ok(Some(signed)) => match verify_signed_manifest(signed, &self.trust, |_| None) {
                        Ok(v) => self.want(&v),
                        Err(e) => {
                            self.note(&name, format!("stored manifest of version {latest} no longer verifies: {e}"))
                        }
                    },
                    Ok(None) => {}
                    Err(e) => self.note(&name, format!("cannot read the manifest of version {latest}: {e}")),
                }
            }
        }
        self.announce_have().await;
    }

    async fn on_mesh_event(&mut self, event: MeshEvent) {
        match event {
            MeshEvent::Listening(addr) => {
                tracing::info!(%addr, "listening");
                if let Some(ip) = ip_of(&addr) {
                    self.listen_ips.insert(ip);
                }
                lock(&self.shared).listen.push(addr.to_string());
                lock(&self.shared).blob_addrs = self.blob_addrs().iter().map(|a| a.to_string()).collect();
            }
            MeshEvent::Connected { peer, addr } => {
                tracing::debug!(%peer, %addr, "connected");
                self.conn_addrs.insert(peer, addr.to_string());
                self.ask_hello(peer);
            }
            MeshEvent::Disconnected { peer } => {
                tracing::info!(%peer, "disconnected");
                self.asked_hello.remove(&peer);
                self.conn_addrs.remove(&peer);
                self.hello_attempts.remove(&peer);
                self.peers.remove(&peer);
                lock(&self.shared).peers.remove(&peer);
                self.update_gate();
            }
            MeshEvent::Rtt { peer, rtt } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.rtt = Some(rtt);
                    if let Some(s) = lock(&self.shared).peers.get_mut(&peer) {
                        s.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
                    }
                }
            }
            MeshEvent::Message { id, propagation_source, topic, data, .. } => {
                let verdict = if !self.peers.contains_key(&propagation_source) {
                    // Its handshake is not finished (or failed): nothing it sends counts.
                    GossipVerdict::Ignore("from a peer not admitted".into())
                } else if topic == TOPIC_MANIFESTS {
                    self.on_gossip_manifest(&data).await
                } else if topic == TOPIC_HAVES {
                    self.on_gossip_have(&data).await
                } else if topic == TOPIC_METRICS {
                    self.on_gossip_metrics(&data)
                } else if topic == TOPIC_COMMANDS {
                    self.on_gossip_command(&data)
                } else {
                    GossipVerdict::Reject(format!("unknown topic {topic}"))
                };
                let acceptance = match &verdict {
                    GossipVerdict::Accept => Acceptance::Accept,
                    GossipVerdict::Ignore(why) => {
                        tracing::debug!(%propagation_source, %topic, "ignored gossip: {why}");
                        Acceptance::Ignore
                    }
                    GossipVerdict::Reject(why) => {
                        tracing::warn!(%propagation_source, %topic, "rejected gossip: {why}");
                        Acceptance::Reject
                    }
                };
                self.mesh.report(id, propagation_source, acceptance).await;
            }
            MeshEvent::Request { peer, id, data } => {
                // A failed hello refuses the peer inside `on_request`. Anything else from a
                // peer not admitted yet (its sync may overtake our hello) is only declined.
                let response = self.on_request(peer, &data).await;
                match response.to_bytes() {
                    Ok(bytes) => self.mesh.respond(id, bytes).await,
                    Err(e) => tracing::error!("cannot encode an answer: {e}"),
                }
            }
        }
    }

    fn my_hello(&self) -> Hello {
        Hello {
            certificate: self.parts.certificate.clone(),
            blob_addrs: self.blob_addrs().iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Where peers reach this node's blob endpoint: the bound sockets, with an unspecified
    /// address replaced by the addresses libp2p listens on.
    fn blob_addrs(&self) -> Vec<SocketAddr> {
        let mut out = vec![];
        for bound in self.parts.blobs.bound_addrs() {
            if bound.ip().is_unspecified() {
                for ip in self.listen_ips.iter().filter(|ip| ip.is_ipv4() == bound.is_ipv4()) {
                    out.push(SocketAddr::new(*ip, bound.port()));
                }
            } else {
                out.push(bound);
            }
        }
        out.truncate(slmesh_protocol::mesh::MAX_ADDRS);
        out
    }

    fn ask_hello(&mut self, peer: PeerId) {
        if self.peers.contains_key(&peer) || !self.asked_hello.insert(peer) {
            return;
        }
        self.send_request(peer, PeerRequest::Hello(self.my_hello()), |peer, result| Internal::HelloAnswer {
            peer,
            result,
        });
    }

    /// Sends `request` to `peer` off the loop; its answer comes back as an `Internal`.
    fn send_request(
        &self,
        peer: PeerId,
        request: PeerRequest,
        answer: impl FnOnce(PeerId, Result<Vec<u8>, String>) -> Internal + Send + 'static,
    ) {
        let bytes = match request.to_bytes() {
            Ok(b) => b,
            Err(e) => return tracing::error!("cannot encode a peer request: {e}"),
        };
        let mesh = self.mesh.clone();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = mesh.request(peer, bytes).await;
            let _ = tx.send(answer(peer, result)).await;
        });
    }

    /// Admits `peer` if `hello` carries a valid certificate for its own key; otherwise
    /// refuses it (disconnect, block, drop its gossip).
    async fn on_hello(&mut self, peer: PeerId, hello: &Hello) -> Result<(), String> {
        let node = NodeId::from_peer_id(&peer).map_err(|e| format!("peer id is not an ed25519 key: {e}"))?;
        let enrollment = admit(hello, &node, &self.trust, unix_now()).map_err(|e| e.to_string())?;
        if self.peers.contains_key(&peer) {
            return Ok(());
        }
        let addrs: Vec<SocketAddr> = hello.blob_addrs.iter().filter_map(|a| a.parse().ok()).collect();
        self.parts.blobs.learn(node, addrs.clone());
        let site = enrollment.tags.get("site").cloned();
        let addr = self.conn_addrs.get(&peer).cloned().unwrap_or_default();
        tracing::info!(%peer, node = %node.short(), site = site.as_deref().unwrap_or("-"), "admitted peer");
        lock(&self.shared).peers.insert(
            peer,
            PeerStatus { node_id: node.to_string(), peer_id: peer.to_string(), site, rtt_ms: None, addr },
        );
        let record = PeerRecord {
            node,
            addrs: addrs.iter().map(|a| a.to_string()).collect(),
            tags: enrollment.tags.clone(),
            last_seen: unix_now(),
            rtt_micros: None,
        };
        if let Err(e) = self.parts.store.upsert_peer(&record) {
            tracing::warn!("cannot record peer: {e}");
        }
        self.peers.insert(peer, Peer { node, tags: enrollment.tags, rtt: None });
        self.update_gate();
        // Its have record may have come before it was admitted (relayed by another peer).
        self.update_fetch_providers();
        self.ask_sync(peer);
        Ok(())
    }

    async fn refuse(&mut self, peer: PeerId, reason: String) {
        tracing::warn!(%peer, "refused peer: {reason}");
        {
            let mut shared = lock(&self.shared);
            shared.peers.remove(&peer);
            shared.refused.push((peer.to_string(), reason));
            let excess = shared.refused.len().saturating_sub(32);
            shared.refused.drain(..excess);
        }
        self.peers.remove(&peer);
        self.mesh.refuse(peer).await;
    }

    async fn on_request(&mut self, peer: PeerId, data: &[u8]) -> PeerResponse {
        let request = match PeerRequest::from_bytes(data) {
            Ok(r) => r,
            Err(e) => return PeerResponse::Refused(format!("bad request: {e}")),
        };
        match request {
            PeerRequest::Hello(hello) => match self.on_hello(peer, &hello).await {
                Ok(()) => PeerResponse::Hello(self.my_hello()),
                Err(reason) => {
                    let answer = PeerResponse::Refused(format!("not admitted: {reason}"));
                    self.refuse(peer, reason).await;
                    answer
                }
            },
            PeerRequest::Sync(digest) => {
                if !self.peers.contains_key(&peer) {
                    return PeerResponse::Refused("not admitted".into());
                }
                PeerResponse::Sync(self.sync_reply(&digest))
            }
        }
    }

    fn digest(&self) -> ManifestDigest {
        let latest = self
            .parts
            .store
            .models()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, m)| m.latest_known > 0)
            .map(|(n, m)| (n, m.latest_known))
            .collect();
        ManifestDigest { latest }
    }

    fn sync_reply(&self, theirs: &ManifestDigest) -> SyncReply {
        let mut manifests = vec![];
        for (name, version) in self.digest().newer_than(theirs).into_iter().take(MAX_SYNC_MANIFESTS) {
            if let Ok(Some(m)) = self.parts.store.manifest(&name, version) {
                manifests.push(m);
            }
        }
        let haves = self.signed_haves.values().chain(self.my_have.iter()).take(MAX_SYNC_HAVES).cloned().collect();
        let metrics = self
            .fleet
            .records()
            .filter_map(|r| self.signed_metrics.get(&r.node))
            .take(MAX_SYNC_METRICS)
            .cloned()
            .collect();
        let commands = self.commands.values().flatten().take(MAX_SYNC_COMMANDS).cloned().collect();
        SyncReply { manifests, haves, metrics, commands }
    }

    fn ask_sync(&self, peer: PeerId) {
        self.send_request(peer, PeerRequest::Sync(self.digest()), |peer, result| Internal::SyncAnswer { peer, result });
    }

    /// Anti-entropy: ask a few admitted peers what they hold that this node lacks.
    fn sync_round(&self) {
        for peer in self.peers.keys().take(3) {
            self.ask_sync(*peer);
        }
    }

    async fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::HelloAnswer { peer, result } => {
                let answer = result.and_then(|b| PeerResponse::from_bytes(&b).map_err(|e| e.to_string()));
                match answer {
                    Ok(PeerResponse::Hello(hello)) => {
                        if let Err(reason) = self.on_hello(peer, &hello).await {
                            self.refuse(peer, reason).await;
                        }
                    }
                    Ok(PeerResponse::Refused(reason)) => tracing::warn!(%peer, "the peer refused us: {reason}"),
                    Ok(_) => self.refuse(peer, "answered hello with something else".into()).await,
                    Err(e) => {
                        // A connection that lost a dial race, or a busy peer: ask again
                        // shortly while the peer stays connected.
                        tracing::debug!(%peer, "hello failed: {e}");
                        self.asked_hello.remove(&peer);
                        let attempts = self.hello_attempts.entry(peer).or_default();
                        *attempts += 1;
                        if *attempts <= 5 {
                            let tx = self.internal_tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                let _ = tx.send(Internal::RetryHello { peer }).await;
                            });
                        }
                    }
                }
            }
            Internal::RetryHello { peer } => {
                if self.conn_addrs.contains_key(&peer) {
                    self.ask_hello(peer);
                }
            }
            Internal::SyncAnswer { peer, result } => {
                match result.and_then(|b| PeerResponse::from_bytes(&b).map_err(|e| e.to_string())) {
                    Ok(PeerResponse::Sync(reply)) => {
                        for have in reply.haves {
                            self.take_have(have).await;
                        }
                        for m in reply.metrics {
                            self.take_metrics(m);
                        }
                        for c in reply.commands {
                            self.take_command(c);
                        }
                        for manifest in reply.manifests {
                            if let Ok(bytes) = manifest.to_bytes() {
                                if let GossipVerdict::Reject(why) = self.on_gossip_manifest(&bytes).await {
                                    tracing::warn!(%peer, "sync sent a bad manifest: {why}");
                                }
                            }
                        }
                    }
                    Ok(other) => tracing::debug!(%peer, "sync answered {other:?}"),
                    Err(e) => tracing::debug!(%peer, "sync failed: {e}"),
                }
            }
            Internal::FetchDone { name, version, result } => {
                self.fetching.remove(&(name.clone(), version));
                // Blobs no running fetch needs any more stop being announced as partial.
                let needed: HashSet<Hex32> =
                    self.fetching.iter().filter_map(|(n, v)| self.chosen_files(n, *v)).flatten().collect();
                self.fetch_providers.retain(|blob, _| needed.contains(blob));
                lock(&self.shared).fetches.retain(|(n, v, _), _| *n != name || *v != version);
                match result {
                    Ok(_) => self.on_staged(&name, version).await,
                    Err(e) => {
                        self.note(&name, format!("fetch of version {version} failed, will retry: {e}"));
                        self.retry_at.insert((name, version), Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            Internal::RolledBack { name, bad, to, result } => {
                self.activating.remove(&(name.clone(), to));
                match result {
                    Ok(()) => {
                        let state = rollout_state(RolloutPhase::RolledBack, "the rollout halted");
                        match self.parts.store.roll_back(&name, &state) {
                            Ok(v) => tracing::warn!(model = %name, from = bad, to = v, "rolled back"),
                            Err(e) => self.note(&name, format!("cannot record the rollback of {bad}: {e}")),
                        }
                        self.active_since.remove(&(name.clone(), bad));
                        self.active_since.insert((name, to), unix_now());
                    }
                    Err(e) => self.note(&name, format!("rollback from {bad} to {to} failed: {e}")),
                }
            }
            Internal::Activated { name, version, result } => match result {
                Ok(()) => {
                    self.activating.remove(&(name.clone(), version));
                    self.active_since.insert((name.clone(), version), unix_now());
                    let state = rollout_state(RolloutPhase::Active, "");
                    if let Err(e) = self.parts.store.activate(&name, version, &state) {
                        self.note(&name, format!("cannot record activation of {version}: {e}"));
                    } else {
                        tracing::info!(model = %name, version, "serving");
                        lock(&self.shared).notes.remove(&name);
                    }
                    self.collect_garbage().await;
                }
                Err(e) => {
                    self.activating.remove(&(name.clone(), version));
                    self.note(&name, format!("version {version} was refused at activation: {e}"));
                    let _ = self.parts.store.set_rollout(&name, version, &rollout_state(RolloutPhase::Halted, &e));
                }
            },
        }
    }

    async fn on_control(&mut self, msg: ControlMsg) {
        match msg {
            ControlMsg::Publish { signed, files_dir, reply } => {
                let _ = reply.send(self.publish(signed, &files_dir).await);
            }
            ControlMsg::Command { signed, reply } => {
                let answer = match self.trust.open(&signed) {
                    Err(e) => Err(format!("the command is not accepted here: {e}")),
                    Ok((c, _)) => {
                        self.take_command(signed.clone());
                        let gossip = match signed.to_bytes() {
                            Ok(bytes) => match self.mesh.publish(TOPIC_COMMANDS, bytes).await {
                                Ok(()) => "gossiped to the mesh".to_string(),
                                Err(e) => format!("not gossiped yet ({e}); peers get it by anti-entropy"),
                            },
                            Err(e) => format!("not gossiped: {e}"),
                        };
                        self.rollout_tick().await;
                        Ok(format!("{:?} {}@{}: {gossip}", c.action, c.model, c.version).to_lowercase())
                    }
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// Adds the manifest's files from `dir` to the blob store, accepts the manifest here
    /// and gossips it.
    async fn publish(&mut self, signed: SignedManifest, dir: &Path) -> Result<String, String> {
        let bytes = signed.to_bytes().map_err(|e| e.to_string())?;
        let verified = self.verify(signed).map_err(|e| format!("the manifest is not accepted here: {e}"))?;
        let manifest = &verified.manifest;
        let mut imported = 0;
        let mut complete_variant = false;
        for variant in &manifest.variants {
            let mut all = true;
            for file in &variant.files {
                let path = dir.join(&file.name);
                if !path.is_file() {
                    all = false;
                    continue;
                }
                self.parts.blobs.import(&path, &file.blake3).await.map_err(|e| e.to_string())?;
                if let Ok(mut o) = self.parts.gate.originated.write() {
                    o.insert(file.blake3);
                }
                imported += 1;
            }
            complete_variant |= all;
        }
        if !complete_variant {
            return Err(format!("{} holds the files of no variant of {}", dir.display(), manifest.name));
        }
        let (name, version) = (manifest.name.clone(), manifest.version);
        self.accept(verified).await;
        self.announce_have().await;
        let gossip = match self.mesh.publish(TOPIC_MANIFESTS, bytes).await {
            Ok(()) => "gossiped to the mesh".to_string(),
            Err(e) => format!("not gossiped yet ({e}); peers will get it by anti-entropy"),
        };
        Ok(format!("published {name}@{version}: {imported} file(s) added, {gossip}"))
    }

    async fn on_gossip_manifest(&mut self, data: &[u8]) -> GossipVerdict {
        let result = SignedManifest::from_bytes(data).and_then(|s| self.verify(s));
        let verdict = manifest_verdict(&result.as_ref().map(|_| ()).map_err(Clone::clone));
        if let Ok(verified) = result {
            self.accept(verified).await;
        }
        verdict
    }

    /// A verified manifest newer than anything held: record it, choose a variant, fetch.
    async fn accept(&mut self, verified: VerifiedManifest) {
        let (name, version) = (verified.manifest.name.clone(), verified.manifest.version);
        match self.parts.store.put_manifest(&verified) {
            Ok(()) => {}
            Err(StoreError::Protocol(ProtocolError::NotNewer { .. })) => return,
            Err(e) => return self.note(&name, format!("cannot record manifest {version}: {e}")),
        }
        let _ = self.parts.store.set_rollout(&name, version, &rollout_state(RolloutPhase::Announced, ""));
        tracing::info!(model = %name, version, publisher = %verified.publisher_name, "accepted manifest");
        self.want(&verified);
        self.try_fetches().await;
    }

    fn want(&mut self, verified: &VerifiedManifest) {
        let m = &verified.manifest;
        match select_variant(m, &self.facts()) {
            Ok(variant) => {
                // A newer version supersedes an unfinished older one.
                self.wanted.retain(|(n, v), _| n != &m.name || *v > m.version);
                self.wanted.insert((m.name.clone(), m.version), variant.clone());
            }
            Err(e) => self.note(&m.name, format!("version {}: {e}", m.version)),
        }
    }

    async fn on_gossip_have(&mut self, data: &[u8]) -> GossipVerdict {
        match SignedHave::from_bytes(data) {
            Ok(signed) => self.take_have(signed).await,
            Err(e) => GossipVerdict::Reject(e.to_string()),
        }
    }

    async fn take_have(&mut self, signed: SignedHave) -> GossipVerdict {
        let have = match verify_have(&signed) {
            Ok(h) => h,
            Err(e) => return GossipVerdict::Reject(e.to_string()),
        };
        if have.node == self.me {
            return GossipVerdict::Ignore("my own record".into());
        }
        let node = have.node;
        let addrs: Vec<SocketAddr> = have.blob_addrs.iter().filter_map(|a| a.parse().ok()).collect();
        if !self.directory.update(have) {
            return GossipVerdict::Ignore("not newer than the record held".into());
        }
        if !addrs.is_empty() {
            self.parts.blobs.learn(node, addrs);
        }
        self.signed_haves.insert(node, signed);
        self.update_gate();
        self.update_fetch_providers();
        self.try_fetches().await;
        GossipVerdict::Accept
    }

    /// Signs and gossips the list of complete blobs this node holds.
    async fn announce_have(&mut self) {
        let mut blobs = BTreeSet::new();
        for (name, state) in self.parts.store.models().unwrap_or_default() {
            for version in &state.staged {
                if let Some(files) = self.chosen_files(&name, *version) {
                    blobs.extend(files);
                }
            }
        }
        if let Ok(o) = self.parts.gate.originated.read() {
            blobs.extend(o.iter().copied());
        }
        let mut complete = vec![];
        for b in blobs {
            if self.parts.blobs.is_complete(&b).await.unwrap_or(false) {
                complete.push(b);
            }
        }
        let partial: Vec<Hex32> = self.fetch_providers.keys().filter(|b| !complete.contains(b)).copied().collect();
        let seq = unix_millis().max(self.my_have.as_ref().and_then(|h| verify_have(h).ok()).map_or(0, |h| h.seq + 1));
        let record = HaveRecord {
            node: self.me,
            seq,
            blobs: complete,
            blob_addrs: self.blob_addrs().iter().map(|a| a.to_string()).collect(),
            partial,
        };
        let signed = match SignedHave::sign(&record, &self.parts.secret) {
            Ok(s) => s,
            Err(e) => return tracing::error!("cannot sign have record: {e}"),
        };
        self.my_have = Some(signed.clone());
        if let Ok(bytes) = signed.to_bytes() {
            if let Err(e) = self.mesh.publish(TOPIC_HAVES, bytes).await {
                tracing::debug!("have record not gossiped ({e}); peers get it by anti-entropy");
            }
        }
    }

    /// The blobs of the variant this node chose for a stored version.
    fn chosen_files(&self, name: &str, version: u64) -> Option<Vec<Hex32>> {
        Some(self.chosen_variant(name, version)?.files.iter().map(|f| f.blake3).collect())
    }

    /// The variant this node chose for a stored version (its manifest checked again).
    fn chosen_variant(&self, name: &str, version: u64) -> Option<Variant> {
        let signed = self.parts.store.manifest(name, version).ok()??;
        let verified = verify_signed_manifest(signed, &self.trust, |_| None).ok()?;
        select_variant(&verified.manifest, &self.facts()).ok().cloned()
    }

    fn update_gate(&self) {
        let Ok(originated) = self.parts.gate.originated.read() else { return };
        let admitted: HashSet<NodeId> = self.peers.values().map(|p| p.node).collect();
        let holders = originated
            .iter()
            .map(|b| (*b, self.directory.holders(b).into_iter().filter(|n| admitted.contains(n)).collect()))
            .collect();
        if let Ok(mut h) = self.parts.gate.holders.write() {
            *h = holders;
        }
        if let Ok(mut s) = self.parts.gate.sites.write() {
            *s = self.peers.values().filter_map(|p| Some((p.node, p.tags.get("site")?.clone()))).collect();
        }
        // A peer that went away no longer counts as a copy, served or announced.
        if let Ok(mut s) = self.parts.gate.served.write() {
            for peers in s.values_mut() {
                peers.retain(|n| admitted.contains(n));
            }
        }
    }

    /// Starts a fetch for every wanted version whose files all have a provider (or are
    /// here already).
    async fn try_fetches(&mut self) {
        let now = Instant::now();
        let candidates: Vec<(VersionKey, Variant)> = self
            .wanted
            .iter()
            .filter(|(k, _)| !self.fetching.contains(*k) && self.retry_at.get(*k).is_none_or(|t| *t <= now))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut started = false;
        for (key, variant) in candidates {
            let mut plan = vec![];
            let mut ready = true;
            for file in &variant.files {
                let here = self.parts.blobs.is_complete(&file.blake3).await.unwrap_or(false);
                let providers = self.providers_of(&file.blake3);
                if !here && providers.is_empty() {
                    ready = false;
                    break;
                }
                plan.push((file.clone(), providers));
            }
            if !ready {
                continue;
            }
            self.fetching.insert(key.clone());
            let _ = self.parts.store.set_rollout(&key.0, key.1, &rollout_state(RolloutPhase::Fetching, ""));
            let plan = plan
                .into_iter()
                .map(|(file, providers)| {
                    let rx = match self.fetch_providers.get(&file.blake3) {
                        Some(tx) => tx.subscribe(),
                        None => {
                            let (tx, rx) = watch::channel(providers);
                            self.fetch_providers.insert(file.blake3, tx);
                            rx
                        }
                    };
                    (file, rx)
                })
                .collect();
            let job = FetchJob {
                name: key.0.clone(),
                version: key.1,
                plan,
                dir: self.staging_dir(&key.0, key.1),
                blobs: self.parts.blobs.clone(),
                shared: self.shared.clone(),
            };
            let tx = self.internal_tx.clone();
            tokio::spawn(async move {
                let (name, version) = (job.name.clone(), job.version);
                let result = job.run().await;
                let _ = tx.send(Internal::FetchDone { name, version, result }).await;
            });
            started = true;
        }
        if started {
            // Peers may fetch from us what we have verified so far.
            self.announce_have().await;
        }
    }

    /// Peers that hold `blob` or are fetching it, ranked (same site, then RTT).
    fn providers_of(&self, blob: &Hex32) -> Vec<NodeId> {
        let by_node: HashMap<NodeId, &Peer> = self.peers.values().map(|p| (p.node, p)).collect();
        let mut nodes = self.directory.holders(blob);
        nodes.extend(self.directory.partial_holders(blob));
        nodes.sort();
        nodes.dedup();
        let candidates = nodes
            .into_iter()
            .filter_map(|n| by_node.get(&n))
            .map(|p| ProviderInfo {
                node: p.node,
                site: p.tags.get("site").cloned(),
                rtt_micros: p.rtt.map(|r| r.as_micros() as u64),
            })
            .collect();
        rank_providers(candidates, self.my_tags.get("site").map(String::as_str))
    }

    /// Running fetches learn of providers announced since they started.
    fn update_fetch_providers(&self) {
        for (blob, tx) in &self.fetch_providers {
            let providers = self.providers_of(blob);
            tx.send_if_modified(|held| {
                let changed = *held != providers;
                *held = providers;
                changed
            });
        }
    }

    async fn on_staged(&mut self, name: &str, version: u64) {
        self.wanted.remove(&(name.to_string(), version));
        self.retry_at.remove(&(name.to_string(), version));
        if let Err(e) = self.parts.store.mark_staged(name, version, &rollout_state(RolloutPhase::Staged, "")) {
            return self.note(name, format!("cannot record version {version} as staged: {e}"));
        }
        tracing::info!(model = %name, version, "staged");
        self.announce_have().await;
        let state = self.parts.store.model(name).ok().flatten().unwrap_or_default();
        if state.pinned.is_none() {
            // The rollout engine decides when this node's wave opens.
            return self.rollout_tick().await;
        }
        // A local pin overrides the plan.
        match on_staged(version, state.active, state.pinned) {
            StagedDecision::Activate => self.start_activation(name, version),
            StagedDecision::Hold { reason } => {
                tracing::info!(model = %name, version, "not activated: {reason}");
                self.collect_garbage().await;
            }
        }
    }

    fn start_activation(&mut self, name: &str, version: u64) {
        let Some(weights) = self.weights_path(name, version) else {
            return self.note(name, format!("version {version}: no weights file in the chosen variant"));
        };
        if !self.activating.insert((name.to_string(), version)) {
            return;
        }
        let engine = self.parts.engine.clone();
        let tx = self.internal_tx.clone();
        let spec = ModelSpec { name: name.to_string(), version, gguf: weights };
        tokio::spawn(async move {
            let (name, version) = (spec.name.clone(), spec.version);
            let result = engine.activate(spec).await.map_err(|e| e.to_string());
            let _ = tx.send(Internal::Activated { name, version, result }).await;
        });
    }

    fn weights_path(&self, name: &str, version: u64) -> Option<PathBuf> {
        let variant = self.chosen_variant(name, version)?;
        let weights = variant.files.iter().find(|f| f.role == FileRole::Weights)?;
        Some(self.staging_dir(name, version).join(&weights.name))
    }

    /// Keeps the active, previous and pinned version of each model (and a newer staged
    /// one waiting to be activated); deletes the files of the rest.
    async fn collect_garbage(&mut self) {
        let Ok(models) = self.parts.store.models() else { return };
        let mut keep_blobs = vec![];
        for (name, state) in models {
            let mut keep = state.keep();
            keep.extend(state.staged.iter().filter(|v| state.active.is_none_or(|a| **v > a)));
            for version in &state.staged {
                if keep.contains(version) {
                    continue;
                }
                tracing::info!(model = %name, version, "deleting an old version's files");
                if let Err(e) = std::fs::remove_dir_all(self.staging_dir(&name, *version)) {
                    tracing::warn!("cannot delete {name}@{version}: {e}");
                }
                if let Err(e) = self.parts.store.unstage(&name, *version) {
                    tracing::warn!("cannot unstage {name}@{version}: {e}");
                }
            }
            for version in keep {
                keep_blobs.extend(self.chosen_files(&name, version).unwrap_or_default());
            }
        }
        for variant in self.wanted.values() {
            keep_blobs.extend(variant.files.iter().map(|f| f.blake3));
        }
        if let Ok(o) = self.parts.gate.originated.read() {
            // What this node published stays until a newer version replaces it.
            keep_blobs.extend(o.iter().copied());
        }
        match self.parts.blobs.release_all_but(&keep_blobs).await {
            Ok(released) if !released.is_empty() => {
                tracing::info!(count = released.len(), "released blobs for garbage collection");
                if let Ok(mut o) = self.parts.gate.originated.write() {
                    o.retain(|b| !released.contains(b));
                }
                self.announce_have().await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("garbage collection: {e}"),
        }
    }
}

impl Node {
    fn on_gossip_metrics(&mut self, data: &[u8]) -> GossipVerdict {
        match SignedMetrics::from_bytes(data) {
            Ok(signed) => self.take_metrics(signed),
            Err(e) => GossipVerdict::Reject(e.to_string()),
        }
    }

    /// Keeps the newest record per node; an older or repeated one changes nothing.
    fn take_metrics(&mut self, signed: SignedMetrics) -> GossipVerdict {
        let record = match verify_metrics(&signed) {
            Ok(r) => r,
            Err(e) => return GossipVerdict::Reject(e.to_string()),
        };
        if record.node == self.me {
            return GossipVerdict::Ignore("my own record".into());
        }
        let node = record.node;
        if !self.fleet.update(record, unix_now()) {
            return GossipVerdict::Ignore("not newer than the record held".into());
        }
        self.signed_metrics.insert(node, signed);
        GossipVerdict::Accept
    }

    fn on_gossip_command(&mut self, data: &[u8]) -> GossipVerdict {
        let signed = match SignedCommand::from_bytes(data) {
            Ok(s) => s,
            Err(e) => return GossipVerdict::Reject(e.to_string()),
        };
        if let Err(e) = self.trust.open(&signed) {
            return GossipVerdict::Reject(e.to_string());
        }
        if self.take_command(signed) {
            GossipVerdict::Accept
        } else {
            GossipVerdict::Ignore("already held".into())
        }
    }

    /// Records an operator command (signed by a trusted publisher); returns whether it is new.
    fn take_command(&mut self, signed: SignedCommand) -> bool {
        let Ok((command, publisher)) = self.trust.open(&signed) else { return false };
        let held = self.commands.entry((command.model.clone(), command.version)).or_default();
        if held.contains(&signed) || held.len() >= 64 {
            return false;
        }
        tracing::info!(model = %command.model, version = command.version, action = ?command.action, %publisher, "operator command");
        held.push(signed);
        true
    }

    fn operator_state(&self, key: &VersionKey) -> OperatorState {
        let commands: Vec<RolloutCommand> = self
            .commands
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|s| self.trust.open(s).ok().map(|(c, _)| c))
            .collect();
        OperatorState::fold(&commands)
    }

    /// Signs this node's cumulative figures per model version and gossips them: when they
    /// changed, or every fifth interval so that peers do not expire this node.
    async fn publish_metrics(&mut self) {
        let now = unix_now();
        let metrics = self.parts.http.metrics();
        let active = self.parts.engine.active().map(|m| (m.spec.name.clone(), m.spec.version));
        let mut versions: Vec<VersionReport> = metrics
            .iter()
            .map(|(model, version, m)| VersionReport {
                active: active.as_ref().is_some_and(|(n, v)| n == model && *v == version),
                active_since: self.active_since.get(&(model.to_string(), version)).copied(),
                ..VersionReport::from_metrics(model, version, m)
            })
            .collect();
        if let Some((name, version)) = &active {
            if !versions.iter().any(|v| &v.model == name && v.version == *version) {
                versions.push(VersionReport {
                    model: name.clone(),
                    version: *version,
                    active: true,
                    active_since: self.active_since.get(&(name.clone(), *version)).copied(),
                    ..Default::default()
                });
            }
        }
        if std::env::var_os("SLMESH_TEST_LIE_METRICS").is_some() {
            // Test-only: a node that reports every request of every version as failed.
            for v in &mut versions {
                v.requests = v.requests.max(1000);
                v.errors = v.requests;
            }
        }
        versions.truncate(slmesh_protocol::fleet::MAX_VERSIONS_PER_RECORD);
        let previous = self.my_metrics.as_ref().and_then(|m| verify_metrics(m).ok());
        let interval = self.parts.config.fleet.metrics_interval_secs.max(1);
        let unchanged = previous.as_ref().is_some_and(|p| p.versions == versions);
        if unchanged && now.saturating_sub(self.metrics_sent_at) < 5 * interval {
            return;
        }
        let seq = unix_millis().max(previous.map_or(0, |p| p.seq + 1));
        let record = MetricsRecord { node: self.me, seq, issued_at: now, versions };
        let signed = match SignedMetrics::sign(&record, &self.parts.secret) {
            Ok(s) => s,
            Err(e) => return tracing::error!("cannot sign the metrics record: {e}"),
        };
        self.fleet.update(record, now);
        self.signed_metrics.insert(self.me, signed.clone());
        self.my_metrics = Some(signed.clone());
        self.metrics_sent_at = now;
        if let Ok(bytes) = signed.to_bytes() {
            if let Err(e) = self.mesh.publish(TOPIC_METRICS, bytes).await {
                tracing::debug!("metrics record not gossiped ({e})");
            }
        }
    }

    /// Runs the rollout engine for every staged version: open waves, activate this node
    /// when its wave is open, roll back when the rollout halted.
    async fn rollout_tick(&mut self) {
        let now = unix_now();
        self.fleet.expire(now, self.parts.config.fleet.metrics_ttl_secs.max(1));
        let Ok(models) = self.parts.store.models() else { return };
        let mut views = vec![];
        for (name, state) in models {
            let candidates: Vec<u64> =
                state.staged.iter().copied().filter(|v| state.active.is_none_or(|a| *v >= a)).collect();
            for version in candidates {
                let key = (name.clone(), version);
                let Some(verified) = self
                    .parts
                    .store
                    .manifest(&name, version)
                    .ok()
                    .flatten()
                    .and_then(|s| verify_signed_manifest(s, &self.trust, |_| None).ok())
                else {
                    continue;
                };
                let plan = &verified.manifest.rollout;
                let summary = self.fleet.summary(&name, version);
                let baseline = self.fleet.baseline(&name, version);
                let verdict = evaluate_gates(&plan.gates, &summary, baseline.as_ref());
                let operator = self.operator_state(&key);
                let stored = self.parts.store.rollout(&name, version).ok().flatten();
                let progress = self.progress.entry(key.clone()).or_insert_with(|| RolloutProgress {
                    halted: stored
                        .filter(|r| matches!(r.phase, RolloutPhase::Halted | RolloutPhase::RolledBack))
                        .map(|r| r.reason),
                    ..Default::default()
                });
                let was_halted = progress.halted.is_some();
                advance(progress, plan, verified.manifest.created_at, &verdict, &operator, now);
                let progress = progress.clone();
                if let (false, Some(reason)) = (was_halted, &progress.halted) {
                    tracing::warn!(model = %name, version, "rollout halted: {reason}");
                    let _ = self.parts.store.set_rollout(&name, version, &rollout_state(RolloutPhase::Halted, reason));
                }
                let my_wave = match membership(plan, &self.me, &self.my_tags, &name, version) {
                    Membership::Wave(w) => Some(w),
                    _ => None,
                };
                let active_here = state.active == Some(version);
                let decision = if state.pinned.is_some() {
                    RolloutDecision::Wait("pinned by local config".into())
                } else {
                    decide(&progress, my_wave, active_here)
                };
                match (&decision, operator.roll_back_to) {
                    // An operator named the version to go back to: every node goes there.
                    (_, Some(to)) if state.pinned.is_none() && state.active != Some(to) => {
                        if state.staged.contains(&to) {
                            self.start_activation(&name, to);
                        } else {
                            self.note(&name, format!("ordered back to version {to}, whose files are not on this node"));
                        }
                    }
                    (_, Some(_)) => {}
                    (RolloutDecision::Activate, None) if !active_here => self.start_activation(&name, version),
                    (RolloutDecision::RollBack(reason), None) if active_here => {
                        self.start_rollback(&name, version, reason)
                    }
                    _ => {}
                }
                views.push(super::status::RolloutView {
                    model: name.clone(),
                    version,
                    waves: plan.waves.len(),
                    waves_open: progress.opened.len(),
                    my_wave: my_wave.map(|w| w + 1),
                    active_here,
                    decision: match decision {
                        RolloutDecision::Activate => "active".into(),
                        RolloutDecision::Wait(r) => format!("waiting: {r}"),
                        RolloutDecision::RollBack(r) => format!("rolling back: {r}"),
                    },
                    verdict: progress.verdict.clone().unwrap_or(GateVerdict::Pending("no data".into())),
                    halted: progress.halted.clone(),
                    paused: operator.paused,
                });
            }
        }
        let fleet = self
            .fleet
            .versions()
            .into_iter()
            .map(|(m, v)| super::status::FleetVersionView::from_summary(&self.fleet.summary(&m, v)))
            .collect();
        let mut shared = lock(&self.shared);
        shared.rollouts = views;
        shared.fleet = fleet;
    }

    /// Goes back to the previous version (still on disk, so this is a load, not a fetch).
    fn start_rollback(&mut self, name: &str, bad: u64, reason: &str) {
        let Some(previous) = self.parts.store.model(name).ok().flatten().and_then(|m| m.previous) else {
            return self
                .note(name, format!("version {bad} should roll back ({reason}) but no previous version is kept"));
        };
        let Some(weights) = self.weights_path(name, previous) else {
            return self.note(name, format!("the previous version {previous} has no weights file"));
        };
        if !self.activating.insert((name.to_string(), previous)) {
            return;
        }
        tracing::warn!(model = %name, from = bad, to = previous, "rolling back: {reason}");
        let engine = self.parts.engine.clone();
        let tx = self.internal_tx.clone();
        let spec = ModelSpec { name: name.to_string(), version: previous, gguf: weights };
        let name = name.to_string();
        tokio::spawn(async move {
            let result = engine.activate(spec).await.map_err(|e| e.to_string());
            let _ = tx.send(Internal::RolledBack { name, bad, to: previous, result }).await;
        });
    }
}

fn rollout_state(phase: RolloutPhase, reason: &str) -> RolloutState {
    RolloutState { phase, updated_at: unix_now(), reason: reason.to_string() }
}

/// One version's files: fetched one after another from their ranked providers, then
/// copied into the staging folder.
struct FetchJob {
    name: String,
    version: u64,
    plan: Vec<(slmesh_protocol::manifest::FileEntry, watch::Receiver<Vec<NodeId>>)>,
    dir: PathBuf,
    blobs: Arc<BlobNode>,
    shared: Arc<Mutex<Shared>>,
}

impl FetchJob {
    async fn run(self) -> Result<PathBuf, String> {
        for (file, providers) in &self.plan {
            let key = (self.name.clone(), self.version, file.name.clone());
            let report = self
                .blobs
                .fetch(&file.blake3, file.size, providers.clone(), |p| {
                    lock(&self.shared).fetches.insert(
                        key.clone(),
                        FetchStatus {
                            model: self.name.clone(),
                            version: self.version,
                            file: file.name.clone(),
                            size: p.size,
                            had: p.had,
                            received: p.received,
                            provider: p.provider.to_string(),
                        },
                    );
                })
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(
                model = %self.name, version = self.version, file = %file.name, had = report.had,
                received = report.received, provider = ?report.provider.map(|p| p.short()),
                secs = report.elapsed.as_secs_f64(),
                failed_providers = report.failed.len(), "fetched"
            );
            for (provider, reason) in &report.failed {
                tracing::warn!(provider = %provider.short(), "provider failed during this fetch: {reason}");
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        for (file, _) in &self.plan {
            let target = self.dir.join(&file.name);
            if std::fs::metadata(&target).is_ok_and(|m| m.len() == file.size) {
                continue;
            }
            // Written under a temporary name and renamed: a crash never leaves a
            // half-copied file under the real name.
            let partial = self.dir.join(format!(".{}.partial", file.name));
            self.blobs.export(&file.blake3, &partial).await.map_err(|e| e.to_string())?;
            std::fs::rename(&partial, &target).map_err(|e| format!("cannot move {}: {e}", target.display()))?;
        }
        Ok(self.dir)
    }
}

fn ip_of(addr: &slmesh_mesh::Multiaddr) -> Option<IpAddr> {
    use slmesh_mesh::multiaddr::Protocol;
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Physical memory, from /proc/meminfo (0 where unknown: variants with a RAM minimum
/// then do not fit, which is the safe side).
fn total_ram_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
