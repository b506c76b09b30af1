//! The fetcher's side of one blob's swarm as a state machine: which providers to ask,
//! which piece to ask each for, what a refusal, a failure or a stall means, and when the
//! fetch is over. `crates/blobs` drives it over iroh-blobs (observe streams, get
//! requests); time is milliseconds passed in.

use super::{pick_piece, PieceSet};
use crate::identity::NodeId;
use std::collections::{BTreeMap, BTreeSet};

/// How a fetcher takes part in a swarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPolicy {
    /// Providers asked at once.
    pub max_providers: usize,
    /// Piece requests open at once to one provider ("lanes"): a second one streams while
    /// the first one's last bytes are verified and stored.
    pub requests_per_provider: u32,
    /// A provider that refuses (its upload slots are busy) is asked again after this long;
    /// after `max_refusals` in a row on one lane it is given up for this fetch.
    pub refused_retry_ms: u64,
    pub max_refusals: u32,
    /// With no provider left to ask and no piece for this long, the fetch gives up (the
    /// node retries it later).
    pub stalled_after_ms: u64,
    /// A piece request that receives no byte for this long fails, and its provider is
    /// dropped (`PieceOutcome::Failed`): a provider that keeps the connection open and
    /// sends nothing would otherwise hold the pieces it was asked for forever. The driver
    /// runs the timer (it sees the bytes arrive).
    pub piece_stall_ms: u64,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            max_providers: 8,
            requests_per_provider: 2,
            refused_retry_ms: 300,
            max_refusals: 100,
            stalled_after_ms: 30_000,
            // A 512 KiB piece takes 4 s at 1 Mbit/s: 20 s of silence is not a slow link.
            piece_stall_ms: 20_000,
        }
    }
}

/// What a lane does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Ask this provider for this piece (claimed until `outcome` or `release`).
    Ask(u32),
    /// Nothing to ask this provider for now: wait for news (it gains a piece, a request
    /// elsewhere fails).
    Wait,
    /// Every piece is here.
    Done,
}

/// How a piece request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PieceOutcome {
    /// Verified and stored.
    Received,
    /// The provider's upload slots were busy.
    Refused,
    /// Bad data, a reset, a closed connection: the provider is dropped.
    Failed(String),
}

/// What the lane does after a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterPiece {
    Continue,
    RetryAfter(u64),
    /// Drop this provider for the rest of the fetch.
    Drop(String),
}

/// Where the fetch stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchState {
    Complete,
    Running,
    /// No provider left to ask and nothing arrived for a while.
    NoProvider,
    /// Every provider asked failed, with why.
    Failed(Vec<(NodeId, String)>),
}

pub struct PieceFetch {
    policy: FetchPolicy,
    mine: PieceSet,
    requested: PieceSet,
    theirs: BTreeMap<NodeId, PieceSet>,
    /// Per piece, how many running providers offer it: kept as offers change, since
    /// every `next` reads it (computing it there was two thirds of a simulated fleet's
    /// time).
    copies: Vec<u32>,
    /// Providers asked during this fetch (each once), and those still running.
    asked: BTreeSet<NodeId>,
    running: BTreeSet<NodeId>,
    refusals: BTreeMap<(NodeId, u32), u32>,
    /// Pieces each provider refused since it last sent one: asked of it again only once
    /// it has refused everything else it offers. A refusal cannot say why (iroh-blobs
    /// resets the stream with one code), and an origin that seeded a piece into this
    /// site already refuses that piece however often it is asked, while it would send
    /// another.
    refused: BTreeMap<NodeId, PieceSet>,
    failed: Vec<(NodeId, String)>,
    progressed_at: u64,
}

impl PieceFetch {
    /// A fetch that holds `mine` already (a resumed fetch never asks for those again).
    pub fn new(policy: FetchPolicy, mine: PieceSet, now: u64) -> Self {
        let n = mine.len();
        PieceFetch {
            policy,
            mine,
            requested: PieceSet::new(n),
            theirs: BTreeMap::new(),
            copies: vec![0; n as usize],
            asked: BTreeSet::new(),
            running: BTreeSet::new(),
            refusals: BTreeMap::new(),
            refused: BTreeMap::new(),
            failed: vec![],
            progressed_at: now,
        }
    }

    pub fn policy(&self) -> &FetchPolicy {
        &self.policy
    }

    pub fn mine(&self) -> &PieceSet {
        &self.mine
    }

    /// Providers to start now from the node's ranked list (best first): those not asked
    /// yet during this fetch, while fewer than `max_providers` run.
    pub fn providers_to_start(&mut self, ranked: &[NodeId], me: &NodeId) -> Vec<NodeId> {
        let mut out = vec![];
        for p in ranked {
            if self.running.len() >= self.policy.max_providers {
                break;
            }
            if p != me && self.asked.insert(*p) {
                self.running.insert(*p);
                out.push(*p);
            }
        }
        out
    }

    /// Which pieces `provider` offers now (it may still be fetching them itself).
    pub fn offered(&mut self, provider: NodeId, pieces: PieceSet) {
        if self.running.contains(&provider) && pieces.len() == self.mine.len() {
            let old = self.theirs.insert(provider, pieces);
            self.count_offer(provider, old.as_ref());
        }
    }

    /// The next piece one lane of `provider` asks for: the rarest it offers that is
    /// neither here nor asked for; fetchers with different starts break ties differently
    /// and spread out.
    pub fn next(&mut self, provider: &NodeId, lane: u32) -> Next {
        if self.mine.is_full() {
            return Next::Done;
        }
        let Some(offered) = self.theirs.get(provider).filter(|o| !o.is_empty()) else { return Next::Wait };
        let start = u32::from_le_bytes([provider.as_bytes()[0], provider.as_bytes()[1], 0, 0])
            .wrapping_add(lane.wrapping_mul(7));
        let copies = &self.copies;
        let mut skip = self.requested.clone();
        if let Some(refused) = self.refused.get(provider) {
            for p in refused.iter() {
                skip.insert(p);
            }
        }
        let mut pick = pick_piece(&self.mine, &skip, offered, copies, start);
        if pick.is_none() && self.refused.remove(provider).is_some() {
            // Everything else it offers was refused too: ask again from the start.
            pick = pick_piece(&self.mine, &self.requested, offered, copies, start);
        }
        match pick {
            Some(p) => {
                self.requested.insert(p);
                Next::Ask(p)
            }
            None => Next::Wait,
        }
    }

    /// Moves `copies` from `old` (the provider's previous offer) to its current one.
    fn count_offer(&mut self, provider: NodeId, old: Option<&PieceSet>) {
        let empty = PieceSet::new(self.mine.len());
        let old = old.unwrap_or(&empty);
        let new = self.theirs.get(&provider).unwrap_or(&empty);
        for (w, (o, n)) in old.words.iter().zip(&new.words).enumerate() {
            let (mut gained, mut lost) = (n & !o, o & !n);
            while gained != 0 {
                let piece = w * 64 + gained.trailing_zeros() as usize;
                gained &= gained - 1;
                if let Some(c) = self.copies.get_mut(piece) {
                    *c = c.saturating_add(1);
                }
            }
            while lost != 0 {
                let piece = w * 64 + lost.trailing_zeros() as usize;
                lost &= lost - 1;
                if let Some(c) = self.copies.get_mut(piece) {
                    *c = c.saturating_sub(1);
                }
            }
        }
    }

    /// A claimed piece whose request ended without an outcome (its lane was dropped).
    pub fn release(&mut self, piece: u32) {
        self.requested.remove(piece);
    }

    pub fn outcome(&mut self, provider: &NodeId, lane: u32, piece: u32, outcome: PieceOutcome, now: u64) -> AfterPiece {
        self.requested.remove(piece);
        match outcome {
            PieceOutcome::Received => {
                self.mine.insert(piece);
                self.progressed_at = now;
                self.refusals.remove(&(*provider, lane));
                self.refused.remove(provider);
                AfterPiece::Continue
            }
            PieceOutcome::Refused => {
                let n = self.mine.len();
                self.refused.entry(*provider).or_insert_with(|| PieceSet::new(n)).insert(piece);
                let refusals = self.refusals.entry((*provider, lane)).or_default();
                *refusals += 1;
                if *refusals > self.policy.max_refusals {
                    AfterPiece::Drop(format!("refused {} times in a row", self.policy.max_refusals))
                } else {
                    AfterPiece::RetryAfter(self.policy.refused_retry_ms)
                }
            }
            PieceOutcome::Failed(reason) => AfterPiece::Drop(reason),
        }
    }

    /// `provider`'s share ended: done, or dropped with a reason. Its offer no longer counts.
    pub fn provider_ended(&mut self, provider: &NodeId, result: Result<(), String>) {
        self.running.remove(provider);
        if let Some(old) = self.theirs.remove(provider) {
            self.count_offer(*provider, Some(&old));
        }
        self.refused.remove(provider);
        self.refusals.retain(|(p, _), _| p != provider);
        if let Err(reason) = result {
            self.failed.push((*provider, reason));
        }
    }

    pub fn failures(&self) -> &[(NodeId, String)] {
        &self.failed
    }

    /// Where the fetch stands. It runs while a piece arrived lately, a request is open, or
    /// a running provider offers a piece this node lacks; a provider that offers nothing
    /// (a peer still fetching, itself stuck) does not keep it alive, or two such peers
    /// would wait on each other forever while the providers that went away and came
    /// back are never asked again (the simulator found this after a partition healed).
    pub fn state(&self, now: u64) -> FetchState {
        if self.mine.is_full() {
            return FetchState::Complete;
        }
        let recent = now.saturating_sub(self.progressed_at) <= self.policy.stalled_after_ms;
        let useful = || self.theirs.values().any(|o| o.iter().any(|p| !self.mine.contains(p)));
        if recent || self.requested.count() > 0 || useful() {
            return FetchState::Running;
        }
        if self.failed.is_empty() {
            FetchState::NoProvider
        } else {
            FetchState::Failed(self.failed.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{KeyKind, SecretKey};

    fn node(seed: u8) -> NodeId {
        SecretKey::from_seed(KeyKind::Node, [seed; 32]).public()
    }

    #[test]
    fn a_fetch_asks_each_provider_once_for_pieces_it_offers_and_completes() {
        let (me, a, b) = (node(1), node(2), node(3));
        let mut f = PieceFetch::new(FetchPolicy { max_providers: 1, ..FetchPolicy::default() }, PieceSet::new(3), 0);
        assert_eq!(f.providers_to_start(&[me, a, b], &me), vec![a], "one at a time, never itself");
        assert_eq!(f.next(&a, 0), Next::Wait, "a has not said what it holds");
        f.offered(a, PieceSet::full(3));
        let Next::Ask(p) = f.next(&a, 0) else { panic!("a offers pieces") };
        let Next::Ask(q) = f.next(&a, 1) else { panic!("a second lane") };
        assert_ne!(p, q, "two lanes never ask for the same piece");
        assert_eq!(f.outcome(&a, 0, p, PieceOutcome::Received, 5), AfterPiece::Continue);
        f.release(q);
        assert_eq!(f.providers_to_start(&[a, b], &me), vec![], "a still runs");
        f.provider_ended(&a, Ok(()));
        assert_eq!(f.providers_to_start(&[a, b], &me), vec![b], "a was asked already");
        f.offered(b, PieceSet::full(3));
        while let Next::Ask(p) = f.next(&b, 0) {
            f.outcome(&b, 0, p, PieceOutcome::Received, 6);
        }
        assert_eq!(f.state(7), FetchState::Complete);
        assert_eq!(f.next(&b, 0), Next::Done);
    }

    #[test]
    fn refusals_back_off_then_drop_and_a_stall_ends_the_fetch() {
        let (me, a) = (node(1), node(2));
        let policy = FetchPolicy { max_refusals: 2, stalled_after_ms: 1000, ..FetchPolicy::default() };
        let mut f = PieceFetch::new(policy, PieceSet::new(2), 0);
        f.providers_to_start(&[a], &me);
        f.offered(a, PieceSet::full(2));
        for _ in 0..2 {
            let Next::Ask(p) = f.next(&a, 0) else { panic!() };
            assert_eq!(f.outcome(&a, 0, p, PieceOutcome::Refused, 10), AfterPiece::RetryAfter(300));
        }
        let Next::Ask(p) = f.next(&a, 0) else { panic!() };
        assert!(matches!(f.outcome(&a, 0, p, PieceOutcome::Refused, 10), AfterPiece::Drop(_)));
        f.provider_ended(&a, Err("refused".into()));
        assert_eq!(f.state(500), FetchState::Running, "not stalled yet");
        assert!(matches!(f.state(2000), FetchState::Failed(v) if v.len() == 1));
        let idle = PieceFetch::new(FetchPolicy::default(), PieceSet::new(1), 0);
        assert_eq!(idle.state(60_000), FetchState::NoProvider);
        let resumed = PieceFetch::new(FetchPolicy::default(), PieceSet::full(4), 0);
        assert_eq!(resumed.state(0), FetchState::Complete, "a resumed fetch with every piece is done");
    }

    #[test]
    fn a_refused_piece_is_asked_of_that_provider_again_only_once_the_others_were() {
        // An origin that seeded piece p into this site already refuses p, and would send
        // another piece: the lane asks for another one next.
        let (me, a) = (node(1), node(2));
        let mut f = PieceFetch::new(FetchPolicy::default(), PieceSet::new(3), 0);
        f.providers_to_start(&[a], &me);
        f.offered(a, PieceSet::full(3));
        let Next::Ask(p) = f.next(&a, 0) else { panic!("a offers pieces") };
        assert_eq!(f.outcome(&a, 0, p, PieceOutcome::Refused, 1), AfterPiece::RetryAfter(300));
        let Next::Ask(q) = f.next(&a, 0) else { panic!("a offers other pieces") };
        assert_ne!(q, p, "the refused piece is not asked again first");
        assert_eq!(f.outcome(&a, 0, q, PieceOutcome::Refused, 2), AfterPiece::RetryAfter(300));
        let Next::Ask(r) = f.next(&a, 0) else { panic!("one piece left that a has not refused") };
        assert!(r != p && r != q);
        assert_eq!(f.outcome(&a, 0, r, PieceOutcome::Refused, 3), AfterPiece::RetryAfter(300));
        // Everything it offers was refused: start over rather than wait forever.
        assert!(matches!(f.next(&a, 0), Next::Ask(_)));
    }

    #[test]
    fn piece_copies_follow_offers_as_they_change_and_end() {
        // Offers grow, shrink, are replaced and end, in a fixed pseudo-random order; the
        // kept counts always equal a count from scratch.
        let me = node(1);
        let providers: Vec<NodeId> = (2..8).map(node).collect();
        let mut f = PieceFetch::new(FetchPolicy::default(), PieceSet::new(130), 0);
        f.providers_to_start(&providers, &me);
        let mut x = 12345u64;
        for step in 0..400 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let p = providers[(x >> 33) as usize % providers.len()];
            if step % 97 == 96 {
                f.provider_ended(&p, Ok(()));
            } else {
                let mut offer = PieceSet::new(130);
                for k in 0..130 {
                    if (x >> (k % 60)) & 3 == 0 {
                        offer.insert(k);
                    }
                }
                f.offered(p, offer);
            }
            let mut expected = vec![0u32; 130];
            for set in f.theirs.values() {
                for piece in set.iter() {
                    expected[piece as usize] += 1;
                }
            }
            assert_eq!(f.copies, expected, "step {step}");
        }
    }

    #[test]
    fn a_provider_that_offers_nothing_does_not_keep_a_stalled_fetch_alive() {
        let (me, a, b) = (node(1), node(2), node(3));
        let policy = FetchPolicy { stalled_after_ms: 1000, ..FetchPolicy::default() };
        let mut f = PieceFetch::new(policy, PieceSet::new(2), 0);
        f.providers_to_start(&[a, b], &me);
        f.offered(a, PieceSet::new(2));
        f.provider_ended(&b, Err("partitioned".into()));
        assert_eq!(f.next(&a, 0), Next::Wait);
        assert_eq!(f.state(500), FetchState::Running, "not stalled yet");
        assert!(matches!(f.state(2000), FetchState::Failed(v) if v.len() == 1), "a offers nothing: stalled");
        // An open request, or an offer of a piece this node lacks, keeps it running.
        let mut pieces = PieceSet::new(2);
        pieces.insert(1);
        f.offered(a, pieces);
        assert_eq!(f.state(2000), FetchState::Running);
        let Next::Ask(p) = f.next(&a, 0) else { panic!("a offers piece 1") };
        f.offered(a, PieceSet::new(2));
        assert_eq!(f.state(2000), FetchState::Running, "the request for piece {p} is open");
    }

    #[test]
    fn an_offer_of_the_wrong_length_or_from_a_provider_not_asked_is_ignored() {
        let (me, a, b) = (node(1), node(2), node(3));
        let mut f = PieceFetch::new(FetchPolicy::default(), PieceSet::new(4), 0);
        f.providers_to_start(&[a], &me);
        f.offered(a, PieceSet::full(9));
        f.offered(b, PieceSet::full(4));
        assert_eq!(f.next(&a, 0), Next::Wait);
        assert_eq!(f.next(&b, 0), Next::Wait);
    }
}
