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
            max_providers: 16,
            requests_per_provider: 2,
            refused_retry_ms: 100,
            max_refusals: 300,
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
    /// The provider did not send it now (`Refusal::Busy`: its upload slots were busy,
    /// say): ask it again after a while.
    Refused,
    /// The provider will not send this piece, having sent it to another peer
    /// (`Refusal::Elsewhere`), and would send another: ask it for another at once.
    Declined,
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
    /// Pieces each provider refused (busy) since it last sent one, and pieces it declined
    /// during this fetch (an origin that seeded them to other peers): asked of it again
    /// only once it has turned down everything else it offers, and then only those no
    /// other provider offers. Otherwise its lanes would claim a piece again and again
    /// while a provider that would send it waits (a straggler in the simulator waited 20
    /// s for its last piece so).
    refused: BTreeMap<NodeId, PieceSet>,
    declined: BTreeMap<NodeId, PieceSet>,
    failed: Vec<(NodeId, String)>,
    progressed_at: u64,
    /// This node, and where its piece picks start (from its id): fetchers that see the
    /// same offers ask for different pieces, so that an origin that sends each piece
    /// once is not asked by all of them for the same one.
    me: NodeId,
    spread: u32,
}

impl PieceFetch {
    /// A fetch that holds `mine` already (a resumed fetch never asks for those again).
    pub fn new(policy: FetchPolicy, mine: PieceSet, me: NodeId, now: u64) -> Self {
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
            declined: BTreeMap::new(),
            failed: vec![],
            progressed_at: now,
            me,
            spread: u32::from_le_bytes([me.as_bytes()[0], me.as_bytes()[1], me.as_bytes()[2], me.as_bytes()[3]]),
        }
    }

    pub fn policy(&self) -> &FetchPolicy {
        &self.policy
    }

    pub fn mine(&self) -> &PieceSet {
        &self.mine
    }

    /// Providers to start now from the node's ranked list (best first): those not asked
    /// yet during this fetch, while fewer than `max_providers` useful ones run. A running
    /// provider that offers nothing this node lacks does not count (up to twice
    /// `max_providers` in all): a fetch whose slots were all taken by the first peers to
    /// announce never asked a peer that announced later, and a piece the origin seeded to
    /// such a peer reached nobody until the origin sent it again 20 s later (the
    /// simulator, 1,000 nodes with 20 peers each: 28–62 s against 12 s).
    pub fn providers_to_start(&mut self, ranked: &[NodeId]) -> Vec<NodeId> {
        // Counted once a provider not asked yet turns up: called on every piece received,
        // and most calls have nobody new to start.
        let mut useful: Option<usize> = None;
        let mut out = vec![];
        for p in ranked {
            if *p == self.me || self.asked.contains(p) {
                continue;
            }
            let n = *useful.get_or_insert_with(|| self.running.iter().filter(|q| self.may_help(q)).count());
            if n >= self.policy.max_providers || self.running.len() >= 2 * self.policy.max_providers {
                break;
            }
            self.asked.insert(*p);
            self.running.insert(*p);
            out.push(*p);
            useful = Some(n + 1);
        }
        out
    }

    /// Whether a running provider may send this node something: it has not said what it
    /// offers yet, or it offers a piece this node lacks.
    fn may_help(&self, provider: &NodeId) -> bool {
        self.theirs.get(provider).is_none_or(|offer| self.lacks_any_of(offer))
    }

    /// Whether `offer` holds a piece this node lacks.
    fn lacks_any_of(&self, offer: &PieceSet) -> bool {
        offer.words.iter().zip(&self.mine.words).any(|(o, m)| o & !m != 0)
    }

    /// Which pieces `provider` offers now (it may still be fetching them itself).
    pub fn offered(&mut self, provider: NodeId, pieces: PieceSet) {
        if self.running.contains(&provider) && pieces.len() == self.mine.len() {
            let old = self.theirs.insert(provider, pieces);
            self.count_offer(provider, old.as_ref());
        }
    }

    /// The next piece one lane of `provider` asks for: the rarest it offers that is
    /// neither here nor asked for; ties start from a point set by this node, the provider
    /// and the lane, so that fetchers and lanes spread out.
    pub fn next(&mut self, provider: &NodeId, lane: u32) -> Next {
        if self.mine.is_full() {
            return Next::Done;
        }
        let Some(offered) = self.theirs.get(provider).filter(|o| !o.is_empty()) else { return Next::Wait };
        // Each piece it declined moves the start by a step of the golden ratio (of 2^32): an
        // origin seeds runs of pieces from each fetcher's start, and the next piece after a
        // declined one is likely in the same run, declined too.
        let (refused, declined) = (self.refused.get(provider), self.declined.get(provider));
        let start = u32::from_le_bytes([provider.as_bytes()[0], provider.as_bytes()[1], 0, 0])
            .wrapping_add(lane.wrapping_mul(7))
            .wrapping_add(self.spread)
            .wrapping_add(declined.map_or(0, PieceSet::count).wrapping_mul(0x9E37_79B9));
        let turned_down = refused.is_some() || declined.is_some();
        // On the path of every idle lane polled: the skip set is built only when there is
        // something to add to what was asked for.
        let mut pick = if turned_down {
            let mut skip = self.requested.clone();
            for turned in refused.into_iter().chain(declined) {
                skip.union_with(turned);
            }
            pick_piece(&self.mine, &skip, offered, &self.copies, start)
        } else {
            pick_piece(&self.mine, &self.requested, offered, &self.copies, start)
        };
        if pick.is_none() && turned_down {
            // It turned down everything else it offers: ask it again for what no other
            // provider offers without having turned it down; the rest wait for those.
            let elsewhere = self.offered_elsewhere(provider);
            let refused = refused.map_or_else(|| PieceSet::new(self.mine.len()), |r| r.intersection(&elsewhere));
            let declined = declined.map_or_else(|| PieceSet::new(self.mine.len()), |d| d.intersection(&elsewhere));
            let mut skip = self.requested.clone();
            skip.union_with(&refused);
            skip.union_with(&declined);
            pick = pick_piece(&self.mine, &skip, offered, &self.copies, start);
            for (map, kept) in [(&mut self.refused, refused), (&mut self.declined, declined)] {
                if kept.is_empty() {
                    map.remove(provider);
                } else {
                    map.insert(*provider, kept);
                }
            }
        }
        match pick {
            Some(p) => {
                self.requested.insert(p);
                Next::Ask(p)
            }
            None => Next::Wait,
        }
    }

    /// Whether `provider` offers a piece this node lacks, has not asked for and it has
    /// not turned down.
    fn more_to_ask(&self, provider: &NodeId) -> bool {
        let Some(offered) = self.theirs.get(provider) else { return false };
        let (refused, declined) = (self.refused.get(provider), self.declined.get(provider));
        let word = |s: Option<&PieceSet>, w: usize| s.map_or(0, |s| s.word(w));
        offered.words.iter().enumerate().any(|(w, bits)| {
            bits & !self.mine.word(w) & !self.requested.word(w) & !word(refused, w) & !word(declined, w) != 0
        })
    }

    /// The pieces some running provider other than `provider` offers and has not turned
    /// down.
    fn offered_elsewhere(&self, provider: &NodeId) -> PieceSet {
        let mut out = PieceSet::new(self.mine.len());
        for (q, offer) in self.theirs.iter().filter(|(q, _)| *q != provider) {
            let (refused, declined) = (self.refused.get(q), self.declined.get(q));
            for (w, word) in out.words.iter_mut().enumerate() {
                let turned_down = |s: Option<&PieceSet>| s.map_or(0, |s| s.word(w));
                *word |= offer.word(w) & !turned_down(refused) & !turned_down(declined);
            }
        }
        out.count = out.words.iter().map(|w| w.count_ones()).sum();
        out
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
            PieceOutcome::Declined => {
                let n = self.mine.len();
                self.declined.entry(*provider).or_insert_with(|| PieceSet::new(n)).insert(piece);
                // Another piece at once, unless it turned down all it offers (it has sent
                // them to peers that will pass them on).
                if self.more_to_ask(provider) {
                    AfterPiece::Continue
                } else {
                    AfterPiece::RetryAfter(self.policy.refused_retry_ms)
                }
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
        self.declined.remove(provider);
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
        let useful = || self.theirs.values().any(|o| self.lacks_any_of(o));
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
        let mut f =
            PieceFetch::new(FetchPolicy { max_providers: 1, ..FetchPolicy::default() }, PieceSet::new(3), me, 0);
        assert_eq!(f.providers_to_start(&[me, a, b]), vec![a], "one at a time, never itself");
        assert_eq!(f.next(&a, 0), Next::Wait, "a has not said what it holds");
        f.offered(a, PieceSet::full(3));
        let Next::Ask(p) = f.next(&a, 0) else { panic!("a offers pieces") };
        let Next::Ask(q) = f.next(&a, 1) else { panic!("a second lane") };
        assert_ne!(p, q, "two lanes never ask for the same piece");
        assert_eq!(f.outcome(&a, 0, p, PieceOutcome::Received, 5), AfterPiece::Continue);
        f.release(q);
        assert_eq!(f.providers_to_start(&[a, b]), vec![], "a still runs");
        f.provider_ended(&a, Ok(()));
        assert_eq!(f.providers_to_start(&[a, b]), vec![b], "a was asked already");
        f.offered(b, PieceSet::full(3));
        while let Next::Ask(p) = f.next(&b, 0) {
            f.outcome(&b, 0, p, PieceOutcome::Received, 6);
        }
        assert_eq!(f.state(7), FetchState::Complete);
        assert_eq!(f.next(&b, 0), Next::Done);
    }

    #[test]
    fn a_provider_announced_late_is_started_when_the_running_ones_offer_nothing_new() {
        // Two slots, both taken by providers that have nothing this node lacks: a third
        // that announced later (holding a piece only it has) is started all the same.
        let me = node(1);
        let (a, b, c, d, e) = (node(2), node(3), node(4), node(5), node(6));
        let mut f =
            PieceFetch::new(FetchPolicy { max_providers: 2, ..FetchPolicy::default() }, PieceSet::new(4), me, 0);
        assert_eq!(f.providers_to_start(&[a, b]), vec![a, b]);
        assert_eq!(f.providers_to_start(&[a, b, c]), vec![], "a and b have not said what they offer");
        f.offered(a, PieceSet::new(4));
        f.offered(b, PieceSet::new(4));
        assert_eq!(f.providers_to_start(&[a, b, c]), vec![c], "a and b offer nothing: c is asked");
        let mut one = PieceSet::new(4);
        one.insert(3);
        f.offered(c, one);
        assert_eq!(f.providers_to_start(&[a, b, c, d]), vec![d], "one useful provider of two");
        assert_eq!(f.providers_to_start(&[a, b, c, d, e]), vec![], "d has not said: two may help");
        f.offered(d, PieceSet::new(4));
        assert_eq!(f.providers_to_start(&[a, b, c, d, e]), vec![], "four run: twice the limit");
    }

    #[test]
    fn refusals_back_off_then_drop_and_a_stall_ends_the_fetch() {
        let (me, a) = (node(1), node(2));
        let policy = FetchPolicy { max_refusals: 2, stalled_after_ms: 1000, ..FetchPolicy::default() };
        let mut f = PieceFetch::new(policy, PieceSet::new(2), me, 0);
        f.providers_to_start(&[a]);
        f.offered(a, PieceSet::full(2));
        for _ in 0..2 {
            let Next::Ask(p) = f.next(&a, 0) else { panic!() };
            assert_eq!(f.outcome(&a, 0, p, PieceOutcome::Refused, 10), AfterPiece::RetryAfter(100));
        }
        let Next::Ask(p) = f.next(&a, 0) else { panic!() };
        assert!(matches!(f.outcome(&a, 0, p, PieceOutcome::Refused, 10), AfterPiece::Drop(_)));
        f.provider_ended(&a, Err("refused".into()));
        assert_eq!(f.state(500), FetchState::Running, "not stalled yet");
        assert!(matches!(f.state(2000), FetchState::Failed(v) if v.len() == 1));
        let idle = PieceFetch::new(FetchPolicy::default(), PieceSet::new(1), me, 0);
        assert_eq!(idle.state(60_000), FetchState::NoProvider);
        let resumed = PieceFetch::new(FetchPolicy::default(), PieceSet::full(4), me, 0);
        assert_eq!(resumed.state(0), FetchState::Complete, "a resumed fetch with every piece is done");
    }

    #[test]
    fn a_refused_piece_is_asked_of_that_provider_again_only_once_the_others_were() {
        // An origin that seeded piece p already refuses p, and would send another piece:
        // the lane asks for another one next.
        let (me, a) = (node(1), node(2));
        let mut f = PieceFetch::new(FetchPolicy::default(), PieceSet::new(3), me, 0);
        f.providers_to_start(&[a]);
        f.offered(a, PieceSet::full(3));
        let Next::Ask(p) = f.next(&a, 0) else { panic!("a offers pieces") };
        assert_eq!(f.outcome(&a, 0, p, PieceOutcome::Refused, 1), AfterPiece::RetryAfter(100));
        let Next::Ask(q) = f.next(&a, 0) else { panic!("a offers other pieces") };
        assert_ne!(q, p, "the refused piece is not asked again first");
        assert_eq!(f.outcome(&a, 0, q, PieceOutcome::Refused, 2), AfterPiece::RetryAfter(100));
        let Next::Ask(r) = f.next(&a, 0) else { panic!("one piece left that a has not refused") };
        assert!(r != p && r != q);
        assert_eq!(f.outcome(&a, 0, r, PieceOutcome::Refused, 3), AfterPiece::RetryAfter(100));
        // Everything it offers was refused and nobody else offers it: start over rather
        // than wait forever.
        assert!(matches!(f.next(&a, 0), Next::Ask(_)));
    }

    #[test]
    fn a_piece_one_provider_refused_goes_to_another_that_offers_it() {
        // The last piece, refused by a (an origin whose peers hold the blob, say): a's
        // lanes must not keep claiming it, or b's lanes, which would be sent it, wait
        // behind them for as long as a refuses.
        let (me, a, b) = (node(1), node(2), node(3));
        let mut f = PieceFetch::new(FetchPolicy::default(), PieceSet::new(1), me, 0);
        f.providers_to_start(&[a, b]);
        f.offered(a, PieceSet::full(1));
        assert_eq!(f.next(&a, 0), Next::Ask(0));
        assert_eq!(f.next(&b, 0), Next::Wait, "claimed by a's lane");
        f.offered(b, PieceSet::full(1));
        assert_eq!(f.outcome(&a, 0, 0, PieceOutcome::Refused, 1), AfterPiece::RetryAfter(100));
        assert_eq!(f.next(&a, 0), Next::Wait, "b offers it and has not refused it");
        assert_eq!(f.next(&a, 1), Next::Wait);
        assert_eq!(f.next(&b, 0), Next::Ask(0));
        // b refuses it too: now a may be asked again (both refused: one of them will
        // have a free slot first).
        assert_eq!(f.outcome(&b, 0, 0, PieceOutcome::Refused, 2), AfterPiece::RetryAfter(100));
        assert_eq!(f.next(&a, 0), Next::Ask(0));
    }

    #[test]
    fn a_declined_piece_is_passed_over_at_once_and_stays_passed_over_after_a_piece_arrives() {
        // An origin that sent pieces to other peers declines them ("not this piece"),
        // where busy slots refuse ("not now"): the lane asks for another piece at once,
        // and a piece arriving from it does not bring the declined ones back.
        let (me, origin, peer) = (node(1), node(2), node(3));
        let mut f = PieceFetch::new(FetchPolicy::default(), PieceSet::new(3), me, 0);
        f.providers_to_start(&[origin, peer]);
        f.offered(origin, PieceSet::full(3));
        let Next::Ask(p) = f.next(&origin, 0) else { panic!("the origin offers pieces") };
        assert_eq!(f.outcome(&origin, 0, p, PieceOutcome::Declined, 1), AfterPiece::Continue, "others to ask for");
        let Next::Ask(q) = f.next(&origin, 0) else { panic!("two pieces left") };
        assert_ne!(q, p);
        assert_eq!(f.outcome(&origin, 0, q, PieceOutcome::Received, 2), AfterPiece::Continue);
        let Next::Ask(r) = f.next(&origin, 0) else { panic!("one piece the origin did not decline") };
        assert!(r != p && r != q, "{p} was declined: not asked again while another is left");
        assert_eq!(f.outcome(&origin, 0, r, PieceOutcome::Declined, 3), AfterPiece::RetryAfter(100), "all declined");
        // Declined pieces count no refusals: a busy provider is dropped after
        // max_refusals, one that sent pieces on is not.
        let mut pieces = PieceSet::new(3);
        pieces.insert(p);
        f.offered(peer, pieces);
        assert_eq!(f.next(&origin, 0), Next::Ask(r), "p is offered elsewhere, r is not: the origin is asked for r");
        assert_eq!(f.next(&peer, 0), Next::Ask(p));
    }

    #[test]
    fn after_a_declined_piece_the_next_ask_is_elsewhere_in_the_blob() {
        // The origin seeds runs of pieces, each from a fetcher's start: the piece after a
        // declined one is likely declined too. A fetcher asked for it, and the one after,
        // one round trip each; now each decline moves its start.
        let (me, origin) = (node(1), node(2));
        let mut f = PieceFetch::new(FetchPolicy::default(), PieceSet::new(400), me, 0);
        f.providers_to_start(&[origin]);
        f.offered(origin, PieceSet::full(400));
        let mut asked = vec![];
        for t in 1..=8 {
            let Next::Ask(p) = f.next(&origin, 0) else { panic!("the origin offers pieces") };
            asked.push(p);
            assert_eq!(f.outcome(&origin, 0, p, PieceOutcome::Declined, t), AfterPiece::Continue);
        }
        for pair in asked.windows(2) {
            let gap = pair[1].abs_diff(pair[0]).min(400 - pair[1].abs_diff(pair[0]));
            assert!(gap > 8, "asked {asked:?}: a run walked piece by piece");
        }
    }

    #[test]
    fn fetchers_that_see_the_same_offers_start_at_different_pieces() {
        // Every fetcher asked the origin for the same first piece once: with the origin
        // sending each piece once, all but one were refused, over and over.
        let origin = node(2);
        let firsts: BTreeSet<u32> = (10..30u8)
            .map(|k| {
                let mut f = PieceFetch::new(FetchPolicy::default(), PieceSet::new(200), node(k), 0);
                f.providers_to_start(&[origin]);
                f.offered(origin, PieceSet::full(200));
                let Next::Ask(p) = f.next(&origin, 0) else { panic!("the origin offers every piece") };
                p
            })
            .collect();
        assert!(firsts.len() >= 15, "20 fetchers, {} distinct first pieces", firsts.len());
    }

    #[test]
    fn piece_copies_follow_offers_as_they_change_and_end() {
        // Offers grow, shrink, are replaced and end, in a fixed pseudo-random order; the
        // kept counts always equal a count from scratch.
        let me = node(1);
        let providers: Vec<NodeId> = (2..8).map(node).collect();
        let mut f = PieceFetch::new(FetchPolicy::default(), PieceSet::new(130), me, 0);
        f.providers_to_start(&providers);
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
        let mut f = PieceFetch::new(policy, PieceSet::new(2), me, 0);
        f.providers_to_start(&[a, b]);
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
        let mut f = PieceFetch::new(FetchPolicy::default(), PieceSet::new(4), me, 0);
        f.providers_to_start(&[a]);
        f.offered(a, PieceSet::full(9));
        f.offered(b, PieceSet::full(4));
        assert_eq!(f.next(&a, 0), Next::Wait);
        assert_eq!(f.next(&b, 0), Next::Wait);
    }
}
