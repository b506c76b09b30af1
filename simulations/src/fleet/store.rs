//! A simulated node's store: the `Persist` outputs of its state machine, kept and handed
//! back when it restarts.

use slmesh_protocol::fleet::SignedCommand;
use slmesh_protocol::hex32::Hex32;
use slmesh_protocol::identity::NodeId;
use slmesh_protocol::manifest::SignedManifest;
use slmesh_protocol::node::{ModelState, Persist, Restored, VersionRecord};
use slmesh_protocol::trust::Tags;
use std::collections::{BTreeMap, BTreeSet};

/// A node's store: what it persisted, handed back when it restarts.
#[derive(Default, Clone)]
pub struct FakeStore {
    pub(super) manifests: BTreeMap<(String, u64), SignedManifest>,
    pub(super) models: BTreeMap<String, ModelState>,
    pub(super) versions: BTreeMap<(String, u64), VersionRecord>,
    pub(super) commands: Vec<SignedCommand>,
    pub(super) revocations: Vec<slmesh_protocol::revocation::SignedRevocation>,
    pub(super) peers: BTreeMap<NodeId, Tags>,
    pub(super) originated: Vec<Hex32>,
}

impl FakeStore {
    /// A model's state as persisted.
    pub fn model(&self, name: &str) -> Option<&ModelState> {
        self.models.get(name)
    }

    pub(super) fn apply(&mut self, p: Persist) {
        match p {
            Persist::Manifest { name, version, signed } => {
                self.manifests.insert((name, version), signed);
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
            Persist::Originated(blobs) => self.originated = blobs,
            Persist::ForgetPeer(node) => {
                self.peers.remove(&node);
            }
            Persist::Revocation(r) => self.revocations.push(r),
        }
    }

    pub(super) fn restored(&self, blobs: &BTreeSet<Hex32>, on_disk: &BTreeSet<(String, u64)>) -> Restored {
        Restored {
            on_disk: on_disk.iter().cloned().collect(),
            manifests: self.manifests.values().cloned().collect(),
            models: self.models.clone().into_iter().collect(),
            versions: self.versions.clone().into_iter().collect(),
            commands: self.commands.clone(),
            revocations: self.revocations.clone(),
            peers: self.peers.clone().into_iter().collect(),
            complete_blobs: blobs.iter().copied().collect(),
            originated: self.originated.clone(),
        }
    }
}
