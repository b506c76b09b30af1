//! The driver of the node state machine (`slmesh_protocol::node::Node`): it turns mesh
//! events, finished fetches and activations, operator requests and the clock into the
//! machine's inputs, and its outputs into libp2p, iroh-blobs, sled and mistral.rs calls.
//! Nothing here decides; a line that would belongs in the protocol core.

use super::control::{lock, Control, ControlMsg, Shared};
use super::fetch::FetchJob;
use super::status::{FleetVersionView, ModelStatus, PeerStatus};
use super::Parts;
use anyhow::Result;
use slmesh_blobs::BlobNode;
use slmesh_inference::ModelSpec;
use slmesh_mesh::{Acceptance, MeshEvent, MeshHandle, PeerId};
use slmesh_protocol::fleet::VersionReport;
use slmesh_protocol::mesh::GossipVerdict;
use slmesh_protocol::node::{
    Activation, Input, Level, Node, NodeConfig, NodeIdentity, Output, Persist, RequestKind, Restored,
};
use slmesh_protocol::select::NodeFacts;
use slmesh_protocol::trust::Enrollment;
use slmesh_protocol::{Hex32, NodeId, TrustStore};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};

pub fn unix_now() -> u64 {
    unix_millis() / 1000
}

pub(super) fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Work the driver started off the loop, reporting back.
enum Internal {
    FetchDone {
        name: String,
        version: u64,
        blobs: Vec<Hex32>,
        result: Result<PathBuf, String>,
    },
    Activated {
        name: String,
        version: u64,
        result: Result<(), String>,
        eval: Option<slmesh_protocol::eval::EvalCounts>,
    },
}

pub(crate) struct Driver {
    parts: Parts,
    node: Node,
    mesh: MeshHandle,
    shared: Arc<Mutex<Shared>>,
    peer_ids: HashMap<NodeId, PeerId>,
    conn_addrs: HashMap<PeerId, String>,
    rtts: HashMap<PeerId, Duration>,
    listen_ips: BTreeSet<IpAddr>,
    /// Requests sent, by token: what they were.
    pending: HashMap<u64, RequestKind>,
    next_token: u64,
    /// Per blob being fetched, its providers (best first): a running fetch picks up new ones.
    fetch_providers: HashMap<Hex32, watch::Sender<Vec<NodeId>>>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    control_rx: mpsc::Receiver<ControlMsg>,
    fleet_refreshed: Option<Instant>,
}

/// The fleet table costs a merge of every record: refreshed at most this often.
const FLEET_REFRESH: Duration = Duration::from_millis(500);

impl Driver {
    /// Reads back what the store holds and starts the state machine on it.
    pub async fn start(
        parts: Parts,
        trust: TrustStore,
        enrollment: Enrollment,
        mesh: MeshHandle,
    ) -> Result<(Self, Control)> {
        let store = &parts.store;
        let (manifests, damaged) = store.manifests()?;
        for d in damaged {
            tracing::warn!("a stored manifest is damaged and skipped: {d}");
        }
        let mut complete_blobs = vec![];
        for blob in Restored::files_named(&manifests) {
            if parts.blobs.is_complete(&blob).await.unwrap_or(false) {
                complete_blobs.push(blob);
            }
        }
        let restored = Restored {
            manifests,
            models: store.models()?,
            versions: store.versions()?,
            commands: store.commands()?,
            revocations: store.revocations()?,
            peers: store.peers()?.into_iter().map(|p| (p.node, p.tags)).collect(),
            complete_blobs,
            originated: store.originated()?,
            on_disk: version_folders(&parts.config.data_dir.join("models")),
        };
        // Measured once (about 2 s), then read back: how fast each quantised kind
        // runs here, which decides among a manifest's variants.
        let data_dir = parts.config.data_dir.clone();
        let kernels = tokio::task::spawn_blocking(move || crate::kernels::remembered_or_measured(&data_dir))
            .await
            .unwrap_or_default();
        let cfg = NodeConfig {
            metrics_interval_ms: parts.config.fleet.metrics_interval_secs.saturating_mul(1000),
            metrics_ttl_secs: parts.config.fleet.metrics_ttl_secs,
            sync_interval_ms: parts.config.network.sync_interval_secs.saturating_mul(1000),
            shadow_max_weights_bytes: parts.config.fleet.shadow_max_weights_mib.saturating_mul(1 << 20),
            facts: NodeFacts {
                ram_bytes: parts.ram_bytes,
                cpu_arch: std::env::consts::ARCH.to_string(),
                tags: enrollment.tags.clone(),
                simd: crate::machine::cpu_has_simd(),
                kernel_ps_per_weight: kernels,
            },
            ..NodeConfig::default()
        };
        let identity = NodeIdentity {
            secret: parts.secret.clone(),
            certificate: parts.certificate.clone(),
            tags: enrollment.tags.clone(),
            fleet: enrollment.fleet.clone(),
        };
        let node = Node::new(cfg, identity, trust, restored, unix_millis());
        let (internal_tx, internal_rx) = mpsc::channel(256);
        let (control_tx, control_rx) = mpsc::channel(16);
        let (events, unreadable) =
            parts.store.events().map_err(|e| anyhow::anyhow!("cannot read the rollout history: {e}"))?;
        if unreadable > 0 {
            tracing::warn!(
                "{unreadable} event(s) of the rollout history were written by another version and are skipped"
            );
        }
        let shared = Arc::new(Mutex::new(Shared { events: events.into(), ..Shared::default() }));
        let control = Control {
            me: node.id(),
            fleet: enrollment.fleet,
            tags: enrollment.tags,
            tx: control_tx,
            shared: shared.clone(),
            blobs: parts.blobs.clone(),
            engine: parts.engine.clone(),
            mesh: mesh.clone(),
        };
        let driver = Driver {
            parts,
            node,
            mesh,
            shared,
            peer_ids: HashMap::new(),
            conn_addrs: HashMap::new(),
            rtts: HashMap::new(),
            listen_ips: BTreeSet::new(),
            pending: HashMap::new(),
            next_token: 0,
            fetch_providers: HashMap::new(),
            internal_tx,
            internal_rx,
            control_rx,
            fleet_refreshed: None,
        };
        Ok((driver, control))
    }

    /// Runs until `shutdown` completes; returns the blob node so the caller can close it.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<MeshEvent>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<Arc<BlobNode>> {
        self.drain();
        tokio::pin!(shutdown);
        loop {
            let wait = Duration::from_millis(self.node.poll_timeout().saturating_sub(unix_millis()));
            tokio::select! {
                _ = &mut shutdown => break,
                Some(event) = events.recv() => self.on_mesh_event(event),
                Some(msg) = self.internal_rx.recv() => self.on_internal(msg),
                Some(msg) = self.control_rx.recv() => self.on_control(msg).await,
                _ = tokio::time::sleep(wait) => self.node.handle_timeout(unix_millis()),
            }
            self.drain();
        }
        tracing::info!("shutting down");
        if let Err(e) = self.parts.store.flush() {
            tracing::error!("cannot flush the state database: {e}");
        }
        Ok(self.parts.blobs.clone())
    }

    fn staging_dir(&self, name: &str, version: u64) -> PathBuf {
        self.parts.config.data_dir.join("models").join(name).join(version.to_string())
    }

    fn node_of(&self, peer: &PeerId) -> Option<NodeId> {
        NodeId::from_peer_id(peer).ok()
    }

    fn on_mesh_event(&mut self, event: MeshEvent) {
        let now = unix_millis();
        match event {
            MeshEvent::Listening(addr) => {
                tracing::info!(%addr, "listening");
                if let Some(ip) = ip_of(&addr) {
                    self.listen_ips.insert(ip);
                }
                let addrs: Vec<String> = self.blob_addrs().iter().map(|a| a.to_string()).collect();
                {
                    let mut shared = lock(&self.shared);
                    shared.listen.push(addr.to_string());
                    shared.blob_addrs = addrs.clone();
                }
                self.node.handle(now, Input::BlobAddrs(addrs));
            }
            MeshEvent::Connected { peer, addr } => {
                tracing::debug!(%peer, %addr, "connected");
                self.conn_addrs.insert(peer, addr.to_string());
                match NodeId::from_peer_id(&peer) {
                    Ok(node) => {
                        self.peer_ids.insert(node, peer);
                        self.node.handle(now, Input::PeerConnected { peer: node });
                    }
                    Err(e) => self.refuse(peer, format!("peer id is not an ed25519 key: {e}")),
                }
            }
            MeshEvent::Disconnected { peer } => {
                tracing::info!(%peer, "disconnected");
                self.conn_addrs.remove(&peer);
                self.rtts.remove(&peer);
                if let Some(node) = self.node_of(&peer) {
                    self.peer_ids.remove(&node);
                    self.node.handle(now, Input::PeerDisconnected { peer: node });
                }
            }
            MeshEvent::Rtt { peer, rtt } => {
                self.rtts.insert(peer, rtt);
                if let Some(node) = self.node_of(&peer) {
                    self.node.handle(now, Input::Rtt { peer: node, micros: rtt.as_micros() as u64 });
                }
            }
            MeshEvent::Message { id, propagation_source, topic, data, .. } => {
                let verdict = match self.node_of(&propagation_source) {
                    Some(from) => self.node.handle_gossip(now, from, &topic, &data),
                    None => GossipVerdict::Reject("from a peer id that is not an ed25519 key".into()),
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
                self.mesh.report(id, propagation_source, acceptance);
            }
            MeshEvent::Request { peer, id, data } => {
                let response = match self.node_of(&peer) {
                    Some(from) => self.node.handle_request(now, from, &data),
                    None => slmesh_protocol::mesh::PeerResponse::Refused("not an ed25519 peer id".into()),
                };
                match response.to_bytes() {
                    Ok(bytes) => self.mesh.respond(id, bytes),
                    Err(e) => tracing::error!("cannot encode an answer: {e}"),
                }
            }
            MeshEvent::Response { peer, token, result } => {
                if let (Some(kind), Some(node)) = (self.pending.remove(&token), self.node_of(&peer)) {
                    self.node.handle(now, Input::Response { peer: node, kind, result });
                }
            }
        }
    }

    fn on_internal(&mut self, msg: Internal) {
        let now = unix_millis();
        match msg {
            Internal::FetchDone { name, version, blobs, result } => {
                for blob in &blobs {
                    self.fetch_providers.remove(blob);
                }
                lock(&self.shared).fetches.retain(|(n, v, _), _| *n != name || *v != version);
                let result = result.map(|_| ());
                self.node.handle(now, Input::FetchFinished { model: name, version, result });
            }
            Internal::Activated { name, version, result, eval } => {
                self.node.handle(now, Input::ActivationFinished { model: name, version, result, eval });
            }
        }
    }

    async fn on_control(&mut self, msg: ControlMsg) {
        match msg {
            ControlMsg::Publish { signed, files_dir, reply } => {
                let answer = match self.node.files_to_publish(&signed) {
                    Err(e) => Err(e),
                    Ok(files) => {
                        let mut imported = vec![];
                        let mut failed = None;
                        for file in files {
                            let path = files_dir.join(&file.name);
                            if !path.is_file() {
                                continue;
                            }
                            match self.parts.blobs.import(&path, &file.blake3).await {
                                Ok(_) => imported.push(file.blake3),
                                Err(e) => {
                                    failed = Some(format!("cannot add {}: {e}", path.display()));
                                    break;
                                }
                            }
                        }
                        match failed {
                            Some(e) => Err(e),
                            None => self.node.publish(unix_millis(), signed, &imported),
                        }
                    }
                };
                let _ = reply.send(answer);
            }
            ControlMsg::Command { signed, reply } => {
                let _ = reply.send(self.node.command(unix_millis(), signed));
            }
            ControlMsg::Revoke { signed, reply } => {
                let _ = reply.send(self.node.revoke(unix_millis(), signed));
            }
        }
    }

    /// Acts on every output the state machine has queued, then refreshes what the HTTP
    /// API shows.
    fn drain(&mut self) {
        while let Some(output) = self.node.poll_output() {
            self.act(output);
        }
        self.refresh_shared();
    }

    fn act(&mut self, output: Output) {
        match output {
            Output::Gossip { topic, data } => self.mesh.publish(topic, data),
            Output::Request { peer, kind, data } => match self.peer_ids.get(&peer).copied().or(peer.peer_id().ok()) {
                Some(peer_id) => {
                    self.next_token += 1;
                    self.pending.insert(self.next_token, kind);
                    self.mesh.request(peer_id, data, self.next_token);
                }
                None => tracing::warn!(peer = %peer.short(), "no libp2p peer id for this node"),
            },
            Output::Refuse { peer, reason } => {
                if let Some(peer_id) = self.peer_ids.get(&peer).copied().or(peer.peer_id().ok()) {
                    self.refuse(peer_id, reason);
                }
            }
            Output::Admitted { peer } => {
                if let Some(peer_id) = self.peer_ids.get(&peer).copied() {
                    self.mesh.admit(peer_id);
                }
            }
            Output::LearnAddrs { node, addrs } => {
                let addrs =
                    slmesh_protocol::mesh::dialable_addrs(addrs.iter().filter_map(|a| a.parse().ok()).collect());
                if !addrs.is_empty() {
                    self.parts.blobs.learn(node, addrs);
                }
            }
            Output::Fetch { model, version, files } => self.start_fetch(model, version, files),
            Output::Providers { blob, providers } => {
                if let Some(tx) = self.fetch_providers.get(&blob) {
                    tx.send_if_modified(|held| {
                        let changed = *held != providers;
                        *held = providers;
                        changed
                    });
                }
            }
            Output::Activate { model, version, weights, why, eval } => {
                let gguf = self.staging_dir(&model, version).join(weights);
                match why {
                    Activation::RollBack { from } => tracing::warn!(model = %model, from, to = version, "rolling back"),
                    Activation::Restore => tracing::info!(model = %model, version, "loading the active version again"),
                    Activation::Rollout => tracing::info!(model = %model, version, "loading"),
                }
                let engine = self.parts.engine.clone();
                let tx = self.internal_tx.clone();
                let spec = ModelSpec { name: model.clone(), version, gguf };
                tokio::spawn(async move {
                    let (result, eval) = match engine.activate_evaluated(spec, eval.as_ref()).await {
                        Ok(counts) => (Ok(()), counts),
                        Err(e) => (Err(e.to_string()), None),
                    };
                    let _ = tx.send(Internal::Activated { name: model, version, result, eval }).await;
                });
            }
            Output::Shadow { model, plan } => self.shadow(model, plan),
            Output::DeleteVersion { model, version } => {
                let dir = self.staging_dir(&model, version);
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!("cannot delete {}: {e}", dir.display());
                    }
                }
            }
            Output::ReleaseBlobs { keep } => {
                let blobs = self.parts.blobs.clone();
                tokio::spawn(async move {
                    match blobs.release_all_but(&keep).await {
                        Ok(released) if !released.is_empty() => {
                            tracing::info!(count = released.len(), "released blobs for garbage collection")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!("garbage collection: {e}"),
                    }
                });
            }
            Output::Persist(p) => self.persist(p),
            Output::SampleMetrics => {
                let reports = self.local_reports();
                self.node.handle(unix_millis(), Input::LocalMetrics(reports));
            }
            Output::Uploads(view) => self.parts.gate.update(&view),
            Output::History(event) => {
                if let Err(e) = self.parts.store.put_event(&event) {
                    tracing::warn!("cannot keep an event of the rollout history: {e}");
                }
                slmesh_protocol::history::remember(&mut lock(&self.shared).events, event);
            }
            Output::Event { model, version, level, text } => {
                let model = model.unwrap_or_default();
                match (level, version) {
                    (Level::Info, Some(version)) => tracing::info!(model, version, "{text}"),
                    (Level::Info, None) => tracing::info!(model, "{text}"),
                    (Level::Warn, Some(version)) => tracing::warn!(model, version, "{text}"),
                    (Level::Warn, None) => tracing::warn!(model, "{text}"),
                }
            }
        }
    }

    fn refuse(&mut self, peer: PeerId, reason: String) {
        tracing::warn!(%peer, "refused peer: {reason}");
        {
            let mut shared = lock(&self.shared);
            shared.refused.push((peer.to_string(), reason));
            let excess = shared.refused.len().saturating_sub(32);
            shared.refused.drain(..excess);
        }
        self.mesh.refuse(peer);
    }

    fn persist(&mut self, p: Persist) {
        let store = &self.parts.store;
        let result = match &p {
            Persist::Manifest { name, version, signed } => store.put_signed_manifest(name, *version, signed),
            Persist::Model { name, state } => store.put_model(name, state),
            Persist::Version { name, version, record } => store.put_version(name, *version, record),
            Persist::Command(signed) => store.put_command(signed),
            Persist::Revocation(signed) => store.put_revocation(signed),
            Persist::Originated(blobs) => store.put_originated(blobs),
            Persist::ForgetPeer(node) => store.remove_peer(node),
            Persist::Peer { node, tags, addrs } => store.upsert_peer(&slmesh_store::PeerRecord {
                node: *node,
                addrs: addrs.clone(),
                tags: tags.clone(),
                last_seen: unix_now(),
                rtt_micros: None,
            }),
        };
        // What the state machine decided is kept in memory either way; a write that
        // fails is lost only if the node restarts before the next one succeeds.
        if let Err(e) = result.and_then(|_| store.flush()) {
            tracing::error!("cannot persist node state: {e}");
        }
    }

    /// What this node measured of each version, as the state machine reports it.
    fn local_reports(&self) -> Vec<VersionReport> {
        let mut reports: Vec<VersionReport> = self
            .parts
            .http
            .metrics()
            .iter()
            .map(|(model, version, m)| VersionReport::from_metrics(model, version, m))
            .collect();
        if std::env::var_os("SLMESH_TEST_LIE_METRICS").is_some() {
            // Test-only: a node that reports every request of every version as failed.
            for v in &mut reports {
                v.requests = v.requests.max(1000);
                v.errors = v.requests;
            }
        }
        reports
    }

    /// Starts or stops shadow comparison as the state machine asks: the baseline loads
    /// in the background (a newer order supersedes a load under way).
    fn shadow(&mut self, model: String, plan: Option<slmesh_protocol::shadow::ShadowPlan>) {
        let engine = self.parts.engine.clone();
        let Some(plan) = plan else {
            engine.stop_shadow();
            return;
        };
        let ticket = engine.shadow_ticket();
        let gguf = self.staging_dir(&model, plan.baseline).join(&plan.baseline_weights);
        let spec = ModelSpec { name: model.clone(), version: plan.baseline, gguf };
        tokio::spawn(async move {
            if let Err(e) = engine.start_shadow(ticket, plan.candidate, spec, plan.sample).await {
                tracing::warn!(model, baseline = plan.baseline, "no shadow comparison: {e}");
            }
        });
    }

    fn start_fetch(
        &mut self,
        name: String,
        version: u64,
        files: Vec<(slmesh_protocol::manifest::FileEntry, Vec<NodeId>)>,
    ) {
        let blobs: Vec<Hex32> = files.iter().map(|(f, _)| f.blake3).collect();
        let plan = files
            .into_iter()
            .map(|(file, providers)| {
                let rx = match self.fetch_providers.get(&file.blake3) {
                    Some(tx) => {
                        tx.send_replace(providers);
                        tx.subscribe()
                    }
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
            name: name.clone(),
            version,
            plan,
            dir: self.staging_dir(&name, version),
            blobs: self.parts.blobs.clone(),
            shared: self.shared.clone(),
        };
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = job.run().await;
            let _ = tx.send(Internal::FetchDone { name, version, blobs, result }).await;
        });
    }

    /// Where peers reach this node's blob endpoint, as the protocol core chooses it from
    /// the bound sockets and the addresses libp2p listens on.
    fn blob_addrs(&self) -> Vec<SocketAddr> {
        slmesh_protocol::mesh::announced_blob_addrs(&self.parts.blobs.bound_addrs(), &self.listen_ips)
    }

    fn refresh_shared(&mut self) {
        let peers = self
            .node
            .admitted()
            .map(|(node, tags)| {
                let peer_id = self.peer_ids.get(node).copied();
                PeerStatus {
                    node_id: node.to_string(),
                    peer_id: peer_id.map(|p| p.to_string()).unwrap_or_default(),
                    site: tags.get("site").cloned(),
                    rtt_ms: peer_id.and_then(|p| self.rtts.get(&p)).map(|r| r.as_secs_f64() * 1000.0),
                    addr: peer_id.and_then(|p| self.conn_addrs.get(&p)).cloned().unwrap_or_default(),
                }
            })
            .collect();
        let models = self
            .node
            .models()
            .iter()
            .map(|(name, m)| ModelStatus {
                note: self.node.note_of(name).map(String::from),
                active_variant: m.active.and_then(|v| self.node.variant_of(name, v)),
                name: name.clone(),
                latest_known: m.latest_known,
                staged: m.staged.iter().copied().collect(),
                active: m.active,
                previous: m.previous,
                pinned: m.pinned,
            })
            .collect();
        let fleet = if self.fleet_refreshed.is_none_or(|t| t.elapsed() >= FLEET_REFRESH) {
            self.fleet_refreshed = Some(Instant::now());
            let view = self.node.fleet();
            Some(
                view.versions()
                    .into_iter()
                    .map(|(m, v)| FleetVersionView::from_summary(&view.summary(&m, v)))
                    .collect(),
            )
        } else {
            None
        };
        let mut shared = lock(&self.shared);
        shared.peers = peers;
        shared.models = models;
        shared.rollouts = self.node.rollouts_with_progress();
        // Revocations are never taken back: a new one changes the count.
        if shared.revoked.len() != self.node.revoked().len() {
            shared.revoked = self.node.revoked().map(|r| (r.node.to_string(), r.reason.clone())).collect();
        }
        if let Some(fleet) = fleet {
            shared.fleet = fleet;
        }
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

/// The version folders under `models/` (`models/NAME/VERSION`), for the node to check
/// against what its state lists.
fn version_folders(models: &std::path::Path) -> Vec<(String, u64)> {
    let mut out = vec![];
    for model in std::fs::read_dir(models).into_iter().flatten().flatten() {
        let Some(name) = model.file_name().to_str().map(str::to_string) else { continue };
        for version in std::fs::read_dir(model.path()).into_iter().flatten().flatten() {
            let is_dir = version.file_type().is_ok_and(|t| t.is_dir());
            if let (true, Some(v)) = (is_dir, version.file_name().to_str().and_then(|v| v.parse::<u64>().ok())) {
                out.push((name.clone(), v));
            }
        }
    }
    out
}
