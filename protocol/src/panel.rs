//! Panels: for each key (a model version), the few nodes with the lowest rank.
//!
//! A rank is a hash of the node's id and the key, so it is uniform, the same on every
//! node, and fixed once the node is enrolled. Gossip that only a panel's members send and
//! only their messages count has a fleet-wide volume bounded by the panel's size, not the
//! fleet's, and every node that heard the same messages holds the same panel. Used by
//! the metrics panel (`fleet::FleetView`); have records need none, since they go only to
//! direct peers.

use crate::identity::NodeId;
use std::collections::{BTreeMap, BTreeSet};

/// A node's rank for one key, under a domain (`context` names what the panel is for).
pub fn rank(context: &str, node: &NodeId, key: &[u8]) -> u64 {
    let mut h = blake3::Hasher::new_derive_key(context);
    h.update(node.as_bytes());
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// A rank as a fraction of the hash space, in [0, 1): the top 53 bits fill an f64
/// mantissa exactly.
pub fn rank_fraction(rank: u64) -> f64 {
    (rank >> 11) as f64 / (1u64 << 53) as f64
}

/// The seats of every key: (rank, node), at most `size` per key, at most `max_keys` keys.
#[derive(Debug, Clone)]
pub struct Panels<K> {
    size: usize,
    max_keys: usize,
    seats: BTreeMap<K, BTreeSet<(u64, NodeId)>>,
}

impl<K: Ord + Clone> Panels<K> {
    pub fn new(size: usize, max_keys: usize) -> Self {
        Panels { size: size.max(1), max_keys: max_keys.max(1), seats: BTreeMap::new() }
    }

    /// Whether `node` would hold a seat for `key`: fewer than `size` others rank lower.
    pub fn would_seat(&self, key: &K, rank: u64, node: &NodeId) -> bool {
        // Seats are in rank order: those ranked lower come first.
        self.seats
            .get(key)
            .is_none_or(|s| s.iter().take_while(|(r, _)| *r < rank).filter(|(_, n)| n != node).count() < self.size)
    }

    /// Seats `node` if its rank earns a seat; returns whether it did and the nodes that
    /// lost a seat to it (the highest ranked member of a full panel, or every member of
    /// the smallest panel when a new key needs room).
    pub fn seat(&mut self, key: K, rank: u64, node: NodeId) -> (bool, Vec<NodeId>) {
        if !self.would_seat(&key, rank, &node) {
            return (false, Vec::new());
        }
        let mut lost = Vec::new();
        if !self.seats.contains_key(&key) && self.seats.len() >= self.max_keys {
            // A made-up key has one member, a real one many: the smallest goes.
            if let Some(smallest) =
                self.seats.iter().min_by_key(|(k, s)| (s.len(), (*k).clone())).map(|(k, _)| k.clone())
            {
                lost.extend(self.seats.remove(&smallest).into_iter().flatten().map(|(_, n)| n));
            }
        }
        let seats = self.seats.entry(key).or_default();
        seats.insert((rank, node));
        if seats.len() > self.size {
            lost.extend(seats.pop_last().map(|(_, n)| n));
        }
        (true, lost)
    }

    pub fn unseat(&mut self, key: &K, rank: u64, node: &NodeId) {
        if let Some(seats) = self.seats.get_mut(key) {
            seats.remove(&(rank, *node));
            if seats.is_empty() {
                self.seats.remove(key);
            }
        }
    }

    pub fn is_seated(&self, key: &K, rank: u64, node: &NodeId) -> bool {
        self.seats.get(key).is_some_and(|s| s.contains(&(rank, *node)))
    }

    /// The members of a key's panel, lowest rank first.
    pub fn members(&self, key: &K) -> impl Iterator<Item = &NodeId> {
        self.seats.get(key).into_iter().flatten().map(|(_, n)| n)
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.seats.keys()
    }

    /// About how many nodes compete for a key's seats: the panel's count while it has
    /// room, else the k-th minimum value estimate (k - 1) / (k-th smallest rank).
    pub fn estimated_candidates(&self, key: &K) -> usize {
        let Some(seats) = self.seats.get(key) else { return 0 };
        match seats.last() {
            Some((rank, _)) if seats.len() >= self.size && self.size > 1 => {
                let top = rank_fraction(*rank).max(f64::MIN_POSITIVE);
                (((self.size - 1) as f64 / top).round() as usize).max(seats.len())
            }
            _ => seats.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{KeyKind, SecretKey};

    fn node(i: u32) -> NodeId {
        let mut seed = [3u8; 32];
        seed[..4].copy_from_slice(&i.to_le_bytes());
        SecretKey::from_seed(KeyKind::Node, seed).public()
    }

    #[test]
    fn a_panel_keeps_the_lowest_ranks_and_reports_who_lost_a_seat() {
        let mut p: Panels<u8> = Panels::new(3, 2);
        let nodes: Vec<(u64, NodeId)> = (0..10).map(|i| (rank("t", &node(i), b"k"), node(i))).collect();
        let mut lost_total = 0;
        for (r, n) in &nodes {
            let (_, lost) = p.seat(1, *r, *n);
            lost_total += lost.len();
        }
        let mut want = nodes.clone();
        want.sort();
        let members: Vec<NodeId> = p.members(&1).copied().collect();
        assert_eq!(members, want.iter().take(3).map(|(_, n)| *n).collect::<Vec<_>>());
        assert!(lost_total <= 7);
        assert!(!p.would_seat(&1, want[3].0, &want[3].1));
        // A third key evicts the smallest panel, not the full one.
        p.seat(2, 5, node(50));
        p.seat(3, 5, node(51));
        assert_eq!(p.members(&1).count(), 3);
        assert_eq!(p.keys().count(), 2);
    }
}
