//! Piece-level swarming: a blob cut into fixed-size pieces, fetched from several providers
//! at once, each verified piece served again as soon as it has arrived (a node that is
//! still fetching is already a provider). Rarest piece first spreads every piece early;
//! the origin seeds each piece once and leaves the rest to peers.
//!
//! Decisions only: which piece to ask a provider for, and whether the origin sends a
//! piece once more. The fetcher's side of one blob is a state machine (`PieceFetch`:
//! which providers, which piece, refusals, failures, stalls) that `crates/blobs` and the
//! simulator drive alike. A provider's side is its upload gate (`node::Uploads`): it sends
//! a piece request now, holds it for a slot, or refuses it (a refused fetcher retries or
//! asks another provider). A blob's uploads start one at a time, a second beside one
//! only once that has run `mesh::UploadPolicy::stalled_after_ms` (a slow fetcher), so that
//! each piece leaves at the uplink's full speed; a freed slot goes to the held request for
//! the piece this node has sent least often (the rarest around it), and with the queue
//! full a request for a rarer piece takes the place of the most-sent one. The blob
//! endpoint and the simulator keep the queue; the gate orders it.

mod fetch;
pub use fetch::{AfterPiece, FetchPolicy, FetchState, Next, PieceFetch, PieceOutcome};

/// Which pieces of a blob a node holds (or has asked for): a fixed-length bit set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PieceSet {
    words: Vec<u64>,
    len: u32,
    count: u32,
}

impl PieceSet {
    /// An empty set of `len` pieces.
    pub fn new(len: u32) -> Self {
        PieceSet { words: vec![0; (len as usize).div_ceil(64)], len, count: 0 }
    }

    /// Every one of `len` pieces.
    pub fn full(len: u32) -> Self {
        let mut s = PieceSet::new(len);
        for i in 0..len {
            s.insert(i);
        }
        s
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// How many pieces are in the set.
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    pub fn contains(&self, piece: u32) -> bool {
        piece < self.len && self.words[(piece / 64) as usize] & (1 << (piece % 64)) != 0
    }

    /// Adds a piece; false if it was there already or is out of range.
    pub fn insert(&mut self, piece: u32) -> bool {
        if piece >= self.len || self.contains(piece) {
            return false;
        }
        self.words[(piece / 64) as usize] |= 1 << (piece % 64);
        self.count += 1;
        true
    }

    /// Removes a piece; false if it was not there.
    pub fn remove(&mut self, piece: u32) -> bool {
        if !self.contains(piece) {
            return false;
        }
        self.words[(piece / 64) as usize] &= !(1 << (piece % 64));
        self.count -= 1;
        true
    }

    /// Adds every piece of `other` (of this one's length).
    pub fn union_with(&mut self, other: &PieceSet) {
        for (w, word) in self.words.iter_mut().enumerate() {
            *word |= other.word(w);
        }
        self.count = self.words.iter().map(|w| w.count_ones()).sum();
    }

    /// The `w`-th 64 pieces as bits (0 past the end).
    fn word(&self, w: usize) -> u64 {
        self.words.get(w).copied().unwrap_or(0)
    }

    /// The pieces in both sets (of this one's length).
    pub fn intersection(&self, other: &PieceSet) -> PieceSet {
        let words: Vec<u64> = self.words.iter().enumerate().map(|(w, a)| a & other.word(w)).collect();
        let count = words.iter().map(|w| w.count_ones()).sum();
        PieceSet { words, len: self.len, count }
    }

    /// The pieces in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                Some(w as u32 * 64 + b)
            })
        })
    }
}

/// Why a provider does not send a piece now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not now: its upload slots are busy, enough peers hold the blob, or the client is
    /// not admitted. Ask again later, or another provider.
    Busy(String),
    /// Not this piece: it went to another peer already (the origin seeds each piece
    /// once), and another piece would be sent. Ask for another one at once.
    Elsewhere(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Busy(reason) | Refusal::Elsewhere(reason) => f.write_str(reason),
        }
    }
}

/// How a node seeds what it originated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwarmPolicy {
    /// The origin serves a piece only while fewer than this many other nodes hold it or
    /// are being sent it (1: it seeds each piece once, peers do the rest; a piece is
    /// seeded again after `node::uploads::RESEED_AFTER_MS`, in case its peer left or is
    /// cut off from the others by a partition).
    pub origin_copies_per_piece: u32,
}

impl Default for SwarmPolicy {
    fn default() -> Self {
        SwarmPolicy { origin_copies_per_piece: 1 }
    }
}

/// The piece to ask `provider` for: one it holds that we neither hold nor asked for, the
/// rarest by `copies` (copies known in the fleet, counting those on their way), ties
/// broken by distance from `start` so that fetchers with different starts spread out.
/// None if the provider has nothing for us.
pub fn pick_piece(
    mine: &PieceSet,
    requested: &PieceSet,
    provider: &PieceSet,
    copies: &[u32],
    start: u32,
) -> Option<u32> {
    let len = mine.len.min(provider.len).min(requested.len);
    let mut best: Option<(u32, u32, u32)> = None;
    for w in 0..(len as usize).div_ceil(64) {
        let mut bits = provider.words[w] & !mine.words[w] & !requested.words[w];
        while bits != 0 {
            let piece = w as u32 * 64 + bits.trailing_zeros();
            bits &= bits - 1;
            if piece >= len {
                break;
            }
            let rarity = copies.get(piece as usize).copied().unwrap_or(0);
            let distance = (piece + len - start % len.max(1)) % len.max(1);
            if best.is_none_or(|(r, d, _)| (rarity, distance) < (r, d)) {
                best = Some((rarity, distance, piece));
            }
        }
    }
    best.map(|(_, _, piece)| piece)
}

/// Whether the origin sends this piece once more: `copies_elsewhere` is how many other
/// nodes hold it or are being sent it.
pub fn origin_piece_decision(policy: &SwarmPolicy, copies_elsewhere: u32) -> Result<(), Refusal> {
    if policy.origin_copies_per_piece > 0 && copies_elsewhere >= policy.origin_copies_per_piece {
        return Err(Refusal::Elsewhere(format!(
            "{copies_elsewhere} peers hold this piece or are fetching it: ask them"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(len: u32, pieces: &[u32]) -> PieceSet {
        let mut s = PieceSet::new(len);
        for p in pieces {
            s.insert(*p);
        }
        s
    }

    #[test]
    fn a_piece_set_counts_what_it_holds() {
        let mut s = PieceSet::new(130);
        assert!(s.insert(0) && s.insert(64) && s.insert(129));
        assert!(!s.insert(64), "twice");
        assert!(!s.insert(130), "out of range");
        assert_eq!(s.count(), 3);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert!(s.remove(64) && !s.remove(64));
        assert_eq!(s.count(), 2);
        assert!(PieceSet::full(130).is_full() && !s.is_full());
        assert!(!s.contains(500));
        let other = set(130, &[1, 129]);
        assert_eq!(s.intersection(&other).iter().collect::<Vec<_>>(), vec![129]);
        s.union_with(&other);
        assert_eq!((s.iter().collect::<Vec<_>>(), s.count()), (vec![0, 1, 129], 3));
    }

    #[test]
    fn the_rarest_piece_the_provider_has_is_picked() {
        let mine = set(8, &[0]);
        let requested = set(8, &[1]);
        let provider = set(8, &[0, 1, 2, 3, 4]);
        let copies = [9, 0, 5, 2, 2, 0, 0, 0];
        // 0 is ours, 1 is asked for already, 5..7 the provider lacks: 3 and 4 tie at 2.
        assert_eq!(pick_piece(&mine, &requested, &provider, &copies, 0), Some(3));
        assert_eq!(pick_piece(&mine, &requested, &provider, &copies, 4), Some(4), "ties go from start");
        assert_eq!(pick_piece(&set(8, &[0, 2, 3, 4]), &requested, &provider, &copies, 0), None, "nothing new");
    }

    #[test]
    fn the_origin_seeds_each_piece_once() {
        let p = SwarmPolicy::default();
        assert!(origin_piece_decision(&p, 0).is_ok(), "sent to nobody yet");
        assert!(origin_piece_decision(&p, 1).is_err(), "sent already: ask the peer");
        let always = SwarmPolicy { origin_copies_per_piece: 0 };
        assert!(origin_piece_decision(&always, 7).is_ok(), "0: no limit");
    }

    proptest! {
        #[test]
        fn a_picked_piece_is_one_the_provider_has_and_we_lack(
            len in 1u32..300,
            mine in proptest::collection::vec(any::<u16>(), 0..64),
            provider in proptest::collection::vec(any::<u16>(), 0..64),
            copies in proptest::collection::vec(0u32..5, 300),
            start in any::<u32>(),
        ) {
            let mine = set(len, &mine.iter().map(|x| *x as u32 % len).collect::<Vec<_>>());
            let provider = set(len, &provider.iter().map(|x| *x as u32 % len).collect::<Vec<_>>());
            let picked = pick_piece(&mine, &PieceSet::new(len), &provider, &copies, start);
            let wanted: Vec<u32> = provider.iter().filter(|p| !mine.contains(*p)).collect();
            match picked {
                None => prop_assert!(wanted.is_empty()),
                Some(p) => {
                    prop_assert!(wanted.contains(&p));
                    let rarest = wanted.iter().map(|w| copies[*w as usize]).min().unwrap_or(0);
                    prop_assert_eq!(copies[p as usize], rarest);
                }
            }
        }
    }
}
