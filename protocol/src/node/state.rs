//! What a node keeps across restarts: the state machine emits these as `Persist`
//! outputs, the driver stores them, and hands them back in `Restored` on start.

use crate::fleet::SignedCommand;
use crate::hex32::Hex32;
use crate::identity::NodeId;
use crate::manifest::SignedManifest;
use crate::revocation::SignedRevocation;
use crate::rollout::RolloutPhase;
use crate::trust::Tags;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// What a node holds of one model name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelState {
    /// Highest version whose manifest was accepted.
    pub latest_known: u64,
    /// Versions whose verified files are on disk.
    pub staged: BTreeSet<u64>,
    pub active: Option<u64>,
    /// The version active before `active`: kept on disk for an instant rollback.
    pub previous: Option<u64>,
    /// A version pinned by local config, if any.
    pub pinned: Option<u64>,
}

impl ModelState {
    /// Versions whose files must stay on disk.
    pub fn keep(&self) -> BTreeSet<u64> {
        self.active.iter().chain(self.previous.iter()).chain(self.pinned.iter()).copied().collect()
    }
}

/// One model version on one node: where it stands, and the rollout as this node saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Unix seconds at which this node first accepted the manifest: the canary's soak
    /// counts from here (a manifest's `created_at` is when it was written, which may be
    /// long before it was published).
    pub first_seen: u64,
    pub phase: RolloutPhase,
    /// Why it is in this phase, when that is worth telling an operator.
    pub reason: String,
    /// Unix seconds of the last change.
    pub updated_at: u64,
    /// Unix seconds at which waves 0, 1, ... opened.
    pub opened: Vec<u64>,
    pub halted: Option<String>,
    /// This node's wave, fixed when it first activated the version: a node that learns of
    /// more nodes later does not leave a wave it is already serving in.
    pub my_wave: Option<u32>,
    pub activation_failures: u32,
    pub last_activation_error: Option<String>,
    /// Unix seconds before which a failed activation is not tried again.
    pub retry_activation_at: Option<u64>,
    /// This node's results of the manifest's evaluation suite on the version.
    pub eval: Option<crate::eval::EvalCounts>,
}

impl VersionRecord {
    pub fn new(first_seen: u64) -> Self {
        VersionRecord {
            first_seen,
            phase: RolloutPhase::Announced,
            reason: String::new(),
            updated_at: first_seen,
            opened: vec![],
            halted: None,
            my_wave: None,
            activation_failures: 0,
            last_activation_error: None,
            retry_activation_at: None,
            eval: None,
        }
    }

    /// Gave up loading it after the bounded number of attempts.
    pub fn failed(&self) -> bool {
        self.phase == RolloutPhase::Failed
    }
}

/// One change to persist, in the order the state machine made them.
#[derive(Debug, Clone, PartialEq)]
pub enum Persist {
    /// A verified manifest, newer than any held for its name.
    Manifest {
        name: String,
        version: u64,
        signed: SignedManifest,
    },
    Model {
        name: String,
        state: ModelState,
    },
    Version {
        name: String,
        version: u64,
        record: VersionRecord,
    },
    /// An operator command (already checked against the trust store).
    Command(SignedCommand),
    /// An admitted peer and what its certificate says, for the peer book.
    Peer {
        node: NodeId,
        tags: Tags,
        addrs: Vec<String>,
    },
    /// Every blob this node published (it seeds them as the origin).
    Originated(Vec<Hex32>),
    /// A peer dropped from the peer book (it is full, and the peer is not connected).
    ForgetPeer(NodeId),
    /// A node the operator revoked (already checked against the trust store).
    Revocation(SignedRevocation),
}

/// What the driver read back from its store on start.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    pub manifests: Vec<SignedManifest>,
    pub models: Vec<(String, ModelState)>,
    pub versions: Vec<((String, u64), VersionRecord)>,
    pub commands: Vec<SignedCommand>,
    /// The peer book: nodes admitted before, with their certified tags.
    pub peers: Vec<(NodeId, Tags)>,
    /// Blobs complete in the local store (the driver checked).
    pub complete_blobs: Vec<Hex32>,
    /// The blobs this node published.
    pub originated: Vec<Hex32>,
    /// Revocations taken before.
    pub revocations: Vec<SignedRevocation>,
    /// The version folders the driver found on disk (model, version). One that no model
    /// state lists as staged (a crash between garbage collection's update of the store
    /// and its deletion of the files) is deleted.
    pub on_disk: Vec<(String, u64)>,
}

impl Restored {
    /// The files the stored manifests name, each once: the blobs the driver checks for
    /// completeness before the node starts (the node checks the manifests' signatures).
    pub fn files_named(manifests: &[SignedManifest]) -> BTreeSet<Hex32> {
        manifests
            .iter()
            .filter_map(|s| crate::wire::decode::<crate::manifest::ModelManifest>(&s.body, "manifest").ok())
            .flat_map(|m| m.variants.into_iter().flat_map(|v| v.files.into_iter().map(|f| f.blake3)))
            .collect()
    }
}
