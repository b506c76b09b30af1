//! Revoked nodes: taken from the operator (through this node's API), from gossip and from
//! sync replies; enforced at once on the connection, the peer book and the fleet view.

use super::{Level, Node, Output, Persist};
use crate::identity::NodeId;
use crate::mesh::{GossipVerdict, TOPIC_REVOCATIONS};
use crate::revocation::{verify_revocation, Revocation, SignedRevocation};

impl Node {
    /// An operator's revocation given to this node directly (it gossips it on).
    pub fn revoke(&mut self, now: u64, signed: SignedRevocation) -> Result<String, String> {
        let answer = self.on_revoke(signed);
        self.finish(now);
        answer
    }

    fn on_revoke(&mut self, signed: SignedRevocation) -> Result<String, String> {
        let data = signed.to_bytes().map_err(|e| format!("cannot encode the revocation: {e}"))?;
        let (revocation, news) =
            self.take_revocation(signed).map_err(|e| format!("the revocation is not accepted here: {e}"))?;
        self.outputs.push_back(Output::Gossip { topic: TOPIC_REVOCATIONS, data });
        let node = revocation.node.short();
        Ok(if news {
            format!("revoked {node}: sent to the mesh (peers that miss it get it by anti-entropy)")
        } else {
            format!("{node} was revoked already: sent to the mesh again")
        })
    }

    pub(super) fn on_revocation_gossip(&mut self, data: &[u8]) -> GossipVerdict {
        let signed = match SignedRevocation::from_bytes(data) {
            Ok(s) => s,
            Err(e) => return GossipVerdict::Reject(e.to_string()),
        };
        match self.take_revocation(signed) {
            Ok((_, true)) => GossipVerdict::Accept,
            Ok((_, false)) => GossipVerdict::Ignore("held already".into()),
            Err(why) => GossipVerdict::Reject(why),
        }
    }

    /// Takes a revocation signed by a trusted publisher, returned with whether it is news;
    /// if it is, the revoked node is dropped and forgotten here.
    pub(super) fn take_revocation(&mut self, signed: SignedRevocation) -> Result<(Revocation, bool), String> {
        let (revocation, publisher) = verify_revocation(&signed, &self.trust).map_err(|e| e.to_string())?;
        crate::trust::same_fleet("the revocation", &revocation.fleet, &self.fleet_id).map_err(|e| e.to_string())?;
        if !self.revoked.insert(revocation.clone(), signed.clone()).map_err(|why| {
            self.event(None, Level::Warn, format!("a revocation was dropped: {why}"));
            why
        })? {
            return Ok((revocation, false));
        }
        self.persist(Persist::Revocation(signed));
        self.enforce(&revocation, &publisher);
        Ok((revocation, true))
    }

    /// Restores revocations taken before a restart (no event, no persist).
    pub(super) fn restore_revocations(&mut self, revocations: Vec<SignedRevocation>) {
        for signed in revocations {
            match verify_revocation(&signed, &self.trust) {
                Ok((revocation, _)) => {
                    let _ = self.revoked.insert(revocation, signed);
                }
                Err(e) => self.event(None, Level::Warn, format!("a stored revocation no longer verifies: {e}")),
            }
        }
    }

    fn enforce(&mut self, revocation: &Revocation, publisher: &str) {
        let node = revocation.node;
        let why = format!("revoked by {publisher}: {}", revocation.reason);
        if node == self.me {
            self.event(None, Level::Warn, format!("this node's enrollment was revoked ({why}): peers refuse it"));
            return;
        }
        self.event(None, Level::Warn, format!("node {} {why}", node.short()));
        if self.connected.contains_key(&node) || self.peers.contains_key(&node) {
            self.refuse(node, why);
        }
        self.fleet.remove(&node);
        self.signed_metrics.remove(&node);
        if self.known.remove(&node).is_some() {
            self.known_cohorts.get_mut().clear();
            self.persist(Persist::ForgetPeer(node));
        }
    }

    /// Why `node` may not take part, if it was revoked.
    pub(super) fn revoked_because(&self, node: &NodeId) -> Option<String> {
        self.revoked.get(node).map(|r| format!("its enrollment was revoked: {}", r.reason))
    }

    /// Revoked nodes, for status.
    pub fn revoked(&self) -> impl ExactSizeIterator<Item = &Revocation> {
        self.revoked.iter()
    }
}
