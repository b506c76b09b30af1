//! The upload gate the blob endpoint asks before it serves a fetcher: slots per blob,
//! the origin's copies, and each piece of a published blob seeded once per site. The
//! node state machine keeps it current (`Output::Uploads`).

use slmesh_blobs::UploadGate;
use slmesh_protocol::mesh::{upload_decision, UploadPolicy};
use slmesh_protocol::node::UploadView;
use slmesh_protocol::swarm::{origin_piece_decision, SwarmPolicy};
use slmesh_protocol::{Hex32, NodeId};
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

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
    /// Takes what the node state machine says about published blobs and admitted peers.
    pub fn update(&self, view: &UploadView) {
        if let Ok(mut o) = self.originated.write() {
            *o = view.originated.iter().copied().collect();
        }
        if let Ok(mut h) = self.holders.write() {
            *h = view.holders.iter().map(|(b, n)| (*b, n.iter().copied().collect())).collect();
        }
        if let Ok(mut s) = self.sites.write() {
            *s = view.sites.iter().map(|(n, s)| (*n, s.clone())).collect();
        }
        // A peer that went away no longer counts as a copy, served or announced.
        if let Ok(mut s) = self.served.write() {
            for peers in s.values_mut() {
                peers.retain(|n| view.admitted.contains(n));
            }
        }
    }

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
