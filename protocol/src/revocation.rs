//! Revocation: an operator's signed word that a node no longer belongs to the fleet (its
//! key was stolen, the machine was retired), gossiped, held by every node, persisted.
//!
//! A node that holds a revocation refuses the revoked node at the handshake, drops it if
//! it is connected, and counts nothing it reports. Revocations spread like commands: on
//! their own gossip topic, and by anti-entropy (a sync digest carries a hash of the set,
//! so the set travels only to peers that hold another one).
//!
//! The list is bounded (`MAX_REVOCATIONS`): revocations are signed by a trusted publisher
//! only, and one that holds a publisher key can do worse than fill it; a full list
//! refuses new revocations loudly rather than forget old ones (a forgotten revocation
//! would let a stolen key back in).

use crate::error::ProtocolError;
use crate::identity::NodeId;
use crate::signed::{Signed, SignedKind};
use crate::trust::TrustStore;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Revocations a node holds at most.
pub const MAX_REVOCATIONS: usize = 16_384;
/// Longest reason text, in bytes.
pub const MAX_REASON_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub node: NodeId,
    /// Unix seconds, by the publisher's clock.
    pub issued_at: u64,
    /// Why, for the logs of every node.
    pub reason: String,
    /// The fleet it is addressed to.
    pub fleet: String,
}

impl SignedKind for Revocation {
    const DOMAIN: &'static [u8] = b"slmesh/revocation";
    const WHAT: &'static str = "revocation";
}

pub type SignedRevocation = Signed<Revocation>;

/// Checks a revocation: signed by a trusted publisher, a reason of bounded length.
/// Returns it with the publisher's name.
pub fn verify_revocation(signed: &SignedRevocation, trust: &TrustStore) -> Result<(Revocation, String), ProtocolError> {
    let (revocation, publisher) = trust.open(signed)?;
    if revocation.reason.len() > MAX_REASON_BYTES {
        return Err(ProtocolError::invalid(
            "revocation",
            format!("a reason of {} bytes, at most {MAX_REASON_BYTES}", revocation.reason.len()),
        ));
    }
    Ok((revocation, publisher))
}

/// The revoked nodes a node knows of, each with the signed revocation that says so.
#[derive(Debug, Clone, Default)]
pub struct RevocationList {
    held: BTreeMap<NodeId, (Revocation, SignedRevocation)>,
}

impl RevocationList {
    /// Takes a verified revocation: Ok(true) if it is news. A second revocation of a node
    /// already revoked changes nothing (the first one stands).
    pub fn insert(&mut self, revocation: Revocation, signed: SignedRevocation) -> Result<bool, String> {
        if self.held.contains_key(&revocation.node) {
            return Ok(false);
        }
        if self.held.len() >= MAX_REVOCATIONS {
            return Err(format!("{MAX_REVOCATIONS} revocations are held already"));
        }
        self.held.insert(revocation.node, (revocation, signed));
        Ok(true)
    }

    pub fn get(&self, node: &NodeId) -> Option<&Revocation> {
        self.held.get(node).map(|(r, _)| r)
    }

    pub fn contains(&self, node: &NodeId) -> bool {
        self.held.contains_key(node)
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &Revocation> {
        self.held.values().map(|(r, _)| r)
    }

    /// What a sync digest carries: a hash of the revoked ids (all zero for none), so two
    /// nodes see at once whether their lists differ.
    pub fn digest(&self) -> [u8; 32] {
        if self.held.is_empty() {
            return [0; 32];
        }
        let mut h = blake3::Hasher::new_derive_key("slmesh revocation digest v1");
        for node in self.held.keys() {
            h.update(node.as_bytes());
        }
        *h.finalize().as_bytes()
    }

    /// Up to `max` signed revocations for a peer whose list differs, the newest first.
    pub fn for_sync(&self, max: usize) -> Vec<SignedRevocation> {
        let mut all: Vec<&(Revocation, SignedRevocation)> = self.held.values().collect();
        all.sort_by_key(|(r, _)| std::cmp::Reverse(r.issued_at));
        all.into_iter().take(max).map(|(_, s)| s.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{KeyKind, SecretKey};

    fn key(kind: KeyKind, seed: u8) -> SecretKey {
        SecretKey::from_seed(kind, [seed; 32])
    }

    fn trust() -> TrustStore {
        let mut trust = TrustStore::new();
        trust.add("ops", key(KeyKind::Publisher, 1).public()).unwrap();
        trust
    }

    fn revocation(node: u8, at: u64, reason: &str) -> Revocation {
        Revocation {
            node: key(KeyKind::Node, node).public(),
            issued_at: at,
            reason: reason.into(),
            fleet: "default".into(),
        }
    }

    #[test]
    fn only_a_trusted_publisher_revokes_and_reasons_are_bounded() {
        let ops = key(KeyKind::Publisher, 1);
        let r = revocation(5, 10, "key stolen");
        let signed = SignedRevocation::sign(&r, &ops).unwrap();
        let back = SignedRevocation::from_bytes(&signed.to_bytes().unwrap()).unwrap();
        assert_eq!(verify_revocation(&back, &trust()).unwrap(), (r.clone(), "ops".to_string()));
        let by_a_node = SignedRevocation::sign(&r, &key(KeyKind::Node, 9)).unwrap();
        assert!(verify_revocation(&by_a_node, &trust()).is_err(), "a node cannot revoke another");
        let long = SignedRevocation::sign(&revocation(5, 10, &"x".repeat(MAX_REASON_BYTES + 1)), &ops).unwrap();
        assert!(verify_revocation(&long, &trust()).unwrap_err().to_string().contains("at most"));
        let mut tampered = signed.clone();
        tampered.body[0] ^= 1;
        assert!(verify_revocation(&tampered, &trust()).is_err());
    }

    #[test]
    fn the_list_keeps_the_first_revocation_and_its_digest_tells_lists_apart() {
        let ops = key(KeyKind::Publisher, 1);
        let mut a = RevocationList::default();
        let mut b = RevocationList::default();
        assert_eq!(a.digest(), [0; 32]);
        for (n, at) in [(5u8, 10u64), (6, 30), (7, 20)] {
            let r = revocation(n, at, "retired");
            let s = SignedRevocation::sign(&r, &ops).unwrap();
            assert!(a.insert(r.clone(), s.clone()).unwrap());
            assert_ne!(a.digest(), b.digest());
            assert!(b.insert(r, s).unwrap());
            assert_eq!(a.digest(), b.digest(), "the same set, the same digest");
        }
        let again = revocation(5, 99, "again");
        assert!(!a.insert(again.clone(), SignedRevocation::sign(&again, &ops).unwrap()).unwrap());
        assert_eq!(a.get(&again.node).unwrap().issued_at, 10, "the first one stands");
        let newest: Vec<u64> =
            a.for_sync(2).iter().map(|s| verify_revocation(s, &trust()).unwrap().0.issued_at).collect();
        assert_eq!(newest, vec![30, 20]);
    }
}
