//! The upload gate the blob endpoint asks before it serves a fetcher. The decisions are
//! the protocol core's (`slmesh_protocol::node::Uploads`); this only shares it between
//! the node loop, which keeps it current, and the endpoint's threads, which ask it.

use slmesh_blobs::UploadGate;
use slmesh_protocol::mesh::UploadPolicy;
use slmesh_protocol::node::{PieceAdmission, UploadView, Uploads};
use slmesh_protocol::{Hex32, NodeId};
use std::sync::{Mutex, MutexGuard};

pub(crate) struct GateState(Mutex<Uploads>);

impl GateState {
    pub fn new(policy: UploadPolicy) -> Self {
        GateState(Mutex::new(Uploads::new(policy)))
    }

    fn lock(&self) -> MutexGuard<'_, Uploads> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes what the node state machine says about published blobs and admitted peers.
    pub fn update(&self, view: &UploadView) {
        self.lock().update(view.clone());
    }
}

impl UploadGate for GateState {
    fn admit(&self, client: Option<NodeId>) -> Result<(), String> {
        self.lock().admit(client)
    }

    fn allow(&self, blob: &Hex32, uploading: usize) -> Result<(), String> {
        self.lock().allow(blob, uploading)
    }

    fn allow_piece(
        &self,
        blob: &Hex32,
        running_ms: &[u64],
        held: &[Option<u32>],
        client: Option<NodeId>,
        piece: Option<u32>,
    ) -> PieceAdmission {
        self.lock().allow_piece(super::core::unix_millis(), blob, running_ms, held, client, piece)
    }

    fn stalled_after_ms(&self) -> Option<u64> {
        self.lock().stalled_after_ms()
    }

    fn max_wait_ms(&self) -> u64 {
        self.lock().max_wait_ms()
    }

    fn next_held(&self, blob: &Hex32, pieces: &[Option<u32>]) -> usize {
        self.lock().next_held(blob, pieces)
    }

    fn served(&self, blob: &Hex32, to: NodeId) {
        self.lock().served(blob, to);
    }
}
