//! The HTTP API's handle on the running node: what it reads (a snapshot the driver keeps
//! current) and what it asks (publish, operator commands) over a channel.

use super::status::{FetchStatus, FleetVersionView, ModelStatus, NodeStatus, PeerStatus, RolloutView};
use slmesh_blobs::BlobNode;
use slmesh_inference::Engine;
use slmesh_protocol::fleet::SignedCommand;
use slmesh_protocol::manifest::SignedManifest;
use slmesh_protocol::revocation::SignedRevocation;
use slmesh_protocol::trust::Tags;
use slmesh_protocol::NodeId;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// What the HTTP API reads while the loop runs, refreshed after every batch of work.
#[derive(Default)]
pub(super) struct Shared {
    pub peers: Vec<PeerStatus>,
    pub models: Vec<ModelStatus>,
    pub fetches: BTreeMap<(String, u64, String), FetchStatus>,
    pub listen: Vec<String>,
    pub blob_addrs: Vec<String>,
    pub refused: Vec<(String, String)>,
    pub revoked: Vec<(String, String)>,
    pub rollouts: Vec<RolloutView>,
    pub fleet: Vec<FleetVersionView>,
    /// The rollout history, oldest first (the newest `MAX_EVENTS`, as the store keeps).
    pub events: std::collections::VecDeque<slmesh_protocol::history::HistoryEvent>,
}

pub(super) fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) enum ControlMsg {
    Publish { signed: SignedManifest, files_dir: PathBuf, reply: oneshot::Sender<Result<String, String>> },
    Command { signed: SignedCommand, reply: oneshot::Sender<Result<String, String>> },
    Revoke { signed: SignedRevocation, reply: oneshot::Sender<Result<String, String>> },
}

#[derive(Clone)]
pub(crate) struct Control {
    pub(super) me: NodeId,
    pub(super) fleet: String,
    pub(super) tags: Tags,
    pub(super) tx: mpsc::Sender<ControlMsg>,
    pub(super) shared: Arc<Mutex<Shared>>,
    pub(super) blobs: Arc<BlobNode>,
    pub(super) engine: Arc<Engine>,
    pub(super) mesh: slmesh_mesh::MeshHandle,
}

const STOPPING: &str = "the node is shutting down";

impl Control {
    pub fn me(&self) -> NodeId {
        self.me
    }

    pub async fn publish(&self, signed: SignedManifest, files_dir: PathBuf) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(ControlMsg::Publish { signed, files_dir, reply }).await.map_err(|_| STOPPING.to_string())?;
        rx.await.map_err(|_| STOPPING.to_string())?
    }

    pub async fn command(&self, signed: SignedCommand) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(ControlMsg::Command { signed, reply }).await.map_err(|_| STOPPING.to_string())?;
        rx.await.map_err(|_| STOPPING.to_string())?
    }

    pub async fn revoke(&self, signed: SignedRevocation) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(ControlMsg::Revoke { signed, reply }).await.map_err(|_| STOPPING.to_string())?;
        rx.await.map_err(|_| STOPPING.to_string())?
    }

    pub fn rollouts(&self) -> Vec<RolloutView> {
        lock(&self.shared).rollouts.clone()
    }

    pub fn fleet(&self) -> Vec<FleetVersionView> {
        lock(&self.shared).fleet.clone()
    }

    /// The fleet's part of `GET /metrics`, as this node sees it.
    pub fn fleet_metrics_text(&self) -> String {
        let shared = lock(&self.shared);
        super::metrics::fleet_text(&shared.fleet, &shared.rollouts, shared.peers.len())
    }

    /// The newest `limit` events of the history about `model` (and `version`), oldest first.
    pub fn events(
        &self,
        model: Option<&str>,
        version: Option<u64>,
        limit: usize,
    ) -> Vec<slmesh_protocol::history::HistoryEvent> {
        let shared = lock(&self.shared);
        let wanted = |e: &&slmesh_protocol::history::HistoryEvent| {
            model.is_none_or(|m| e.model == m) && version.is_none_or(|v| e.version == v)
        };
        let mut events: Vec<_> = shared.events.iter().rev().filter(wanted).take(limit).cloned().collect();
        events.reverse();
        events
    }

    pub fn status(&self) -> NodeStatus {
        let shared = lock(&self.shared);
        let counters = self.blobs.counters();
        NodeStatus {
            node_id: self.me.to_string(),
            fleet: self.fleet.clone(),
            peer_id: self.me.peer_id().map(|p| p.to_string()).unwrap_or_default(),
            tags: self.tags.clone(),
            listen: shared.listen.clone(),
            blob_addrs: shared.blob_addrs.clone(),
            peers: shared.peers.clone(),
            models: shared.models.clone(),
            fetches: shared.fetches.values().cloned().collect(),
            serving: self.engine.active().map(|m| m.spec.id()),
            uploaded_bytes: counters.uploaded.load(Ordering::Relaxed),
            downloaded_bytes: counters.downloaded.load(Ordering::Relaxed),
            refused_fetches: counters.refused.load(Ordering::Relaxed),
            held_fetches: counters.held.load(Ordering::Relaxed),
            stalled_uploads: counters.stalled.load(Ordering::Relaxed),
            refused_peers: shared.refused.clone(),
            revoked: shared.revoked.clone(),
            gossip: self.mesh.gossip_bytes(),
        }
    }
}
