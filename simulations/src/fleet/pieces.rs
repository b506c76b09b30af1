//! Piece transfers in the node fleet, decided as the node decides them: the fetcher runs
//! the protocol core's `swarm::PieceFetch` (which providers, which piece per lane,
//! refusal back-off, dropped providers, stalls), as `crates/blobs` does over iroh-blobs,
//! and each provider answers with the node state machine's `Uploads` (upload slots, the
//! origin's copies, per-site seeding), refusing what it will not send. Modelled: the
//! request and the piece's bytes on the links, a provider's offer updated as it gains
//! pieces (iroh-blobs' observe stream), and pieces kept on disk across a restart.

use super::{Ev, NodeFleet};
use crate::engine::{Micros, SECOND};
use slmesh_protocol::hex32::Hex32;
use slmesh_protocol::manifest::FileEntry;
use slmesh_protocol::node::{Input, PieceAdmission};
use slmesh_protocol::swarm::{AfterPiece, FetchPolicy, FetchState, Next, PieceFetch, PieceOutcome, PieceSet, Refusal};
use slmesh_protocol::NodeId;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A piece request a provider holds until one of its upload slots frees.
#[derive(Debug, Clone, Copy)]
pub(super) struct HeldRequest {
    from: usize,
    piece: u32,
    lane: u32,
    incarnation: u32,
}

/// The node's piece: 512 BLAKE3 chunks of 1 KiB.
pub const PIECE_BYTES: u64 = 512 * 1024;

pub fn piece_count(size: u64) -> u32 {
    size.div_ceil(PIECE_BYTES).max(1) as u32
}

fn piece_bytes(size: u64, piece: u32) -> u64 {
    let start = piece as u64 * PIECE_BYTES;
    size.saturating_sub(start).min(PIECE_BYTES)
}

/// One blob being fetched by one node.
pub(super) struct BlobFetch {
    model: String,
    version: u64,
    size: u64,
    fetch: PieceFetch,
    ranked: Vec<NodeId>,
    /// Lanes with nothing to ask for now, polled again on news: (provider, lane).
    parked: BTreeSet<(usize, u32)>,
    /// Providers whose offers this fetch watches.
    watching: BTreeSet<usize>,
    /// Piece requests sent and not answered yet: (provider, lane) -> the piece, and when
    /// the driver's stall timer gives up on it (µs).
    open: BTreeMap<(usize, u32), (u32, u64)>,
    /// Lanes with a stall timer event queued. One per lane, moved on to the deadline of
    /// its open request when it fires early, rather than one per request: the same
    /// timeouts for 15% fewer events at 1,000 nodes.
    timed: BTreeSet<(usize, u32)>,
}

impl NodeFleet {
    /// `Output::Fetch` in piece mode: a `PieceFetch` per missing file.
    pub(super) fn fetch_pieces(&mut self, i: usize, model: String, version: u64, files: Vec<(FileEntry, Vec<NodeId>)>) {
        let now = self.now_ms();
        let mut pending = BTreeSet::new();
        for (file, providers) in files {
            if self.nodes[i].blobs.contains(&file.blake3) || self.nodes[i].fetches.contains_key(&file.blake3) {
                continue;
            }
            let n = piece_count(file.size);
            let mine = self.nodes[i].pieces.entry(file.blake3).or_insert_with(|| PieceSet::new(n)).clone();
            let fetch = PieceFetch::new(FetchPolicy::default(), mine, self.id(i), now);
            let bf = BlobFetch {
                model: model.clone(),
                version,
                size: file.size,
                fetch,
                ranked: providers,
                parked: BTreeSet::new(),
                watching: BTreeSet::new(),
                open: BTreeMap::new(),
                timed: BTreeSet::new(),
            };
            self.nodes[i].fetches.insert(file.blake3, bf);
            pending.insert(file.blake3);
        }
        let inc = self.incarnation[i];
        if pending.is_empty() {
            let at = self.q.now() + 1000;
            self.q.at(at, Ev::VersionFetched { node: i, model, version, result: Ok(()), incarnation: inc });
            return;
        }
        for blob in &pending {
            self.q.after(SECOND, Ev::FetchCheck { node: i, blob: *blob, incarnation: inc });
        }
        self.nodes[i].version_fetches.insert((model, version), pending.clone());
        for blob in pending {
            self.pump(i, blob);
        }
    }

    /// What provider `j` offers of `blob` now.
    fn offer(&self, j: usize, blob: &Hex32, n: u32) -> PieceSet {
        if self.nodes[j].blobs.contains(blob) {
            return PieceSet::full(n);
        }
        self.nodes[j].pieces.get(blob).cloned().unwrap_or_else(|| PieceSet::new(n))
    }

    /// Starts the providers the state machine picks, then polls the parked lanes.
    pub(super) fn pump(&mut self, i: usize, blob: Hex32) {
        let lanes = FetchPolicy::default().requests_per_provider;
        let Some(bf) = self.nodes[i].fetches.get_mut(&blob) else { return };
        let started = bf.fetch.providers_to_start(&bf.ranked);
        let n = bf.fetch.mine().len();
        for p in started {
            let Some(&j) = self.ids.get(&p) else { continue };
            if !self.linked(i, j) {
                if let Some(bf) = self.nodes[i].fetches.get_mut(&blob) {
                    bf.fetch.provider_ended(&p, Err("cannot connect".into()));
                }
                continue;
            }
            let offer = self.offer(j, &blob, n);
            self.nodes[j].watchers.insert((i, blob));
            if let Some(bf) = self.nodes[i].fetches.get_mut(&blob) {
                bf.fetch.offered(p, offer);
                bf.watching.insert(j);
                bf.parked.extend((0..lanes).map(|lane| (j, lane)));
            }
        }
        let parked = match self.nodes[i].fetches.get_mut(&blob) {
            Some(bf) => std::mem::take(&mut bf.parked),
            None => return,
        };
        for (j, lane) in parked {
            self.lane(i, blob, j, lane);
        }
    }

    fn lane(&mut self, i: usize, blob: Hex32, j: usize, lane: u32) {
        let p = self.id(j);
        let Some(bf) = self.nodes[i].fetches.get_mut(&blob) else { return };
        if !bf.watching.contains(&j) {
            return; // the provider was dropped
        }
        match bf.fetch.next(&p, lane) {
            Next::Done => {}
            Next::Wait => {
                bf.parked.insert((j, lane));
            }
            Next::Ask(piece) => {
                let inc = self.incarnation[i];
                let stalls_at = self.q.now() + bf.fetch.policy().piece_stall_ms * 1000;
                bf.open.insert((j, lane), (piece, stalls_at));
                if bf.timed.insert((j, lane)) {
                    self.q.at(stalls_at, Ev::PieceStall { node: i, blob, provider: j, lane, incarnation: inc });
                }
                match self.send_control(i, j) {
                    Some(at) => self.q.at(at, Ev::PieceRequest { to: j, from: i, blob, piece, lane, incarnation: inc }),
                    None => {
                        let at = self.q.now() + SECOND;
                        let outcome = PieceOutcome::Failed("request lost".into());
                        self.q.at(at, Ev::PieceAnswer { to: i, from: j, blob, piece, lane, outcome, incarnation: inc });
                    }
                }
            }
        }
    }

    /// A provider takes a piece request: sends the piece, holds it for a slot, or refuses
    /// it, as its gate says.
    pub(super) fn on_piece_request(&mut self, j: usize, i: usize, blob: Hex32, piece: u32, lane: u32, inc: u32) {
        let held = self.nodes[j].held.get(&blob);
        let waiting: Vec<Option<u32>> = held.map_or(vec![], |h| h.iter().map(|r| Some(r.piece)).collect());
        let request = HeldRequest { from: i, piece, lane, incarnation: inc };
        if self.admit_piece(j, blob, &request, &waiting) == PieceAdmission::Wait {
            self.nodes[j].held.entry(blob).or_default().push_back(request);
        }
    }

    /// Sends the piece, or answers a refusal, unless the gate holds the request (`Wait`:
    /// the caller keeps it; one it displaces is refused here). `waiting`: the piece of
    /// each request of the blob held already, oldest first.
    fn admit_piece(&mut self, j: usize, blob: Hex32, request: &HeldRequest, waiting: &[Option<u32>]) -> PieceAdmission {
        let HeldRequest { from: i, piece, lane, incarnation: inc } = *request;
        let now = self.now_ms();
        let client = self.id(i);
        let answer = |outcome| Ev::PieceAnswer { to: i, from: j, blob, piece, lane, outcome, incarnation: inc };
        let size = self.nodes[i].fetches.get(&blob).map(|b| b.size);
        let (Some(size), true) = (size, self.linked(i, j)) else {
            let at = self.q.now() + SECOND;
            let reason = "connection lost";
            self.q.at(at, answer(PieceOutcome::Failed(reason.into())));
            return PieceAdmission::Refuse(Refusal::Busy(reason.into()));
        };
        if self.nodes[j].stalls {
            // The request is taken and never answered.
            return PieceAdmission::Refuse(Refusal::Busy("stalls".into()));
        }
        let holds =
            self.nodes[j].blobs.contains(&blob) || self.nodes[j].pieces.get(&blob).is_some_and(|s| s.contains(piece));
        if !holds {
            let at = self.send_control(j, i).unwrap_or(self.q.now() + SECOND);
            self.q.at(at, answer(PieceOutcome::Failed("the provider does not hold the piece".into())));
            return PieceAdmission::Refuse(Refusal::Busy("does not hold the piece".into()));
        }
        let now_us = self.q.now();
        let running = self.nodes[j].uploading.get(&blob).map_or(&[][..], Vec::as_slice);
        let running_ms: Vec<u64> = running.iter().map(|(_, at)| now_us.saturating_sub(*at) / 1000).collect();
        let mut admission =
            self.nodes[j].uploads.allow_piece(now, &blob, &running_ms, waiting, Some(client), Some(piece));
        match &admission {
            PieceAdmission::Wait => {}
            &PieceAdmission::WaitInstead(k) => {
                if let Some(out) = self.nodes[j].held.get_mut(&blob).and_then(|h| h.remove(k)) {
                    let at = self.send_control(j, out.from).unwrap_or(self.q.now() + SECOND);
                    self.answer_held(j, blob, out, PieceOutcome::Refused, at);
                }
                admission = PieceAdmission::Wait;
            }
            PieceAdmission::Refuse(refusal) => {
                let outcome = match refusal {
                    Refusal::Busy(_) => PieceOutcome::Refused,
                    Refusal::Elsewhere(_) => PieceOutcome::Declined,
                };
                let at = self.send_control(j, i).unwrap_or(self.q.now() + SECOND);
                self.q.at(at, answer(outcome));
            }
            PieceAdmission::Send => {
                let node = &mut self.nodes[j];
                let transfer = node.next_transfer;
                node.next_transfer = transfer.wrapping_add(1);
                node.uploading.entry(blob).or_default().push((transfer, now_us));
                let bytes = piece_bytes(size, piece) + self.spec.overhead_bytes;
                node.piece_bytes_sent += bytes;
                let stalls_at =
                    node.uploads.stalled_after_ms().map(|ms| now_us.saturating_add(ms.saturating_mul(1000)));
                let (sent, arrives) = self.links.send_timed(now_us, j, i, bytes, false, &mut self.rng);
                let provider_inc = self.incarnation[j];
                self.q.at(sent, Ev::SlotFree { node: j, blob, transfer, incarnation: provider_inc });
                // Known in advance here: whether it runs long enough to stall.
                if let Some(at) = stalls_at.filter(|at| *at < sent) {
                    self.q.at(at, Ev::SlotStalled { node: j, blob, incarnation: provider_inc });
                }
                match arrives {
                    Some(at) => self.q.at(at, answer(PieceOutcome::Received)),
                    None => self.q.at(sent, answer(PieceOutcome::Failed("partitioned".into()))),
                }
            }
        }
        admission
    }

    /// A transfer ended (`ended`), or stalled (None): the held request the gate picks is
    /// asked again and may take the slot (those it refuses meanwhile are answered), as
    /// `crates/blobs` wakes them.
    pub(super) fn on_slot_free(&mut self, j: usize, blob: Hex32, ended: Option<u32>, inc: u32) {
        if inc != self.incarnation[j] {
            return;
        }
        if let (Some(transfer), Some(running)) = (ended, self.nodes[j].uploading.get_mut(&blob)) {
            running.retain(|(t, _)| *t != transfer);
            if running.is_empty() {
                self.nodes[j].uploading.remove(&blob);
            }
        }
        while let Some(request) = self.next_held(j, &blob) {
            match self.admit_piece(j, blob, &request, &[]) {
                PieceAdmission::Send => break,
                PieceAdmission::Wait | PieceAdmission::WaitInstead(_) => {
                    self.nodes[j].held.entry(blob).or_default().push_front(request);
                    break;
                }
                PieceAdmission::Refuse(_) => {}
            }
        }
        if self.nodes[j].held.get(&blob).is_some_and(VecDeque::is_empty) {
            self.nodes[j].held.remove(&blob);
        }
    }

    /// Takes the held request of `blob` that provider `j`'s gate would start next.
    fn next_held(&mut self, j: usize, blob: &Hex32) -> Option<HeldRequest> {
        let node = &mut self.nodes[j];
        let held = node.held.get_mut(blob)?;
        let pieces: Vec<Option<u32>> = held.iter().map(|r| Some(r.piece)).collect();
        let k = node.uploads.next_held(blob, &pieces);
        held.remove(k).or_else(|| held.pop_front())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_piece_answer(
        &mut self,
        i: usize,
        j: usize,
        blob: Hex32,
        piece: u32,
        lane: u32,
        outcome: PieceOutcome,
        inc: u32,
    ) {
        if inc != self.incarnation[i] || self.nodes[i].node.is_none() {
            return;
        }
        // An answer the stall timer already gave up on changes nothing.
        match self.nodes[i].fetches.get_mut(&blob) {
            Some(bf) if bf.open.get(&(j, lane)).map(|(p, _)| *p) == Some(piece) => {
                bf.open.remove(&(j, lane));
            }
            Some(_) => return,
            None => {}
        }
        self.piece_outcome(i, j, blob, piece, lane, outcome, inc)
    }

    /// The stall timer of a lane: its open request, if its time is up, failed; a later
    /// request's deadline moves the timer on.
    pub(super) fn on_piece_stall(&mut self, i: usize, blob: Hex32, j: usize, lane: u32, inc: u32) {
        if inc != self.incarnation[i] {
            return;
        }
        let now = self.q.now();
        let Some(bf) = self.nodes[i].fetches.get_mut(&blob) else { return };
        let piece = match bf.open.get(&(j, lane)) {
            // A later request: the lane's timer stays armed, for its deadline.
            Some(&(_, at)) if at > now => {
                self.q.at(at, Ev::PieceStall { node: i, blob, provider: j, lane, incarnation: inc });
                return;
            }
            Some(&(piece, _)) => piece,
            None => {
                bf.timed.remove(&(j, lane)); // answered, and nothing asked since
                return;
            }
        };
        bf.timed.remove(&(j, lane));
        bf.open.remove(&(j, lane));
        let secs = bf.fetch.policy().piece_stall_ms / 1000;
        self.piece_outcome(i, j, blob, piece, lane, PieceOutcome::Failed(format!("no data for {secs} s")), inc)
    }

    #[allow(clippy::too_many_arguments)]
    fn piece_outcome(
        &mut self,
        i: usize,
        j: usize,
        blob: Hex32,
        piece: u32,
        lane: u32,
        outcome: PieceOutcome,
        inc: u32,
    ) {
        let now = self.now_ms();
        let p = self.id(j);
        // The bytes of a provider that went away before the last one arrived are lost.
        let outcome = match outcome {
            PieceOutcome::Received if !self.linked(i, j) => PieceOutcome::Failed("the provider went away".into()),
            o => o,
        };
        let received = outcome == PieceOutcome::Received;
        let Some(bf) = self.nodes[i].fetches.get_mut(&blob) else { return };
        if !bf.watching.contains(&j) {
            bf.fetch.release(piece);
            return;
        }
        let after = bf.fetch.outcome(&p, lane, piece, outcome, now);
        let full = bf.fetch.mine().is_full();
        if received {
            let n = bf.fetch.mine().len();
            self.nodes[i].pieces.entry(blob).or_insert_with(|| PieceSet::new(n)).insert(piece);
            self.tell_watchers(i, blob);
        }
        if full {
            return self.blob_complete(i, blob);
        }
        match after {
            AfterPiece::Continue => self.lane(i, blob, j, lane),
            AfterPiece::RetryAfter(ms) => {
                self.q.after(ms * 1000, Ev::LaneRetry { node: i, blob, provider: j, lane, incarnation: inc })
            }
            AfterPiece::Drop(reason) => {
                if let Some(bf) = self.nodes[i].fetches.get_mut(&blob) {
                    bf.fetch.provider_ended(&p, Err(reason));
                    bf.watching.remove(&j);
                    bf.parked.retain(|(k, _)| *k != j);
                }
                self.nodes[j].watchers.remove(&(i, blob));
            }
        }
        self.pump(i, blob);
    }

    pub(super) fn on_lane_retry(&mut self, i: usize, blob: Hex32, j: usize, lane: u32, inc: u32) {
        if inc == self.incarnation[i] {
            self.lane(i, blob, j, lane);
        }
    }

    /// Node `i` gained a piece of `blob`: fetchers watching it see the new offer.
    fn tell_watchers(&mut self, i: usize, blob: Hex32) {
        let me = self.id(i);
        let watchers: Vec<usize> = self.nodes[i].watchers.iter().filter(|(_, b)| *b == blob).map(|(w, _)| *w).collect();
        for w in watchers {
            let Some(n) = self.nodes[w].fetches.get(&blob).map(|bf| bf.fetch.mine().len()) else { continue };
            let offer = self.offer(i, &blob, n);
            let Some(bf) = self.nodes[w].fetches.get_mut(&blob) else { continue };
            bf.fetch.offered(me, offer);
            // Only the lanes parked on `i` can find something new to ask for: a gain
            // elsewhere leaves another provider's lane as it was, and cannot make room
            // for one more provider (`providers_to_start`).
            let lanes: Vec<(usize, u32)> = bf.parked.range((i, 0)..=(i, u32::MAX)).copied().collect();
            for key in &lanes {
                bf.parked.remove(key);
            }
            for (j, lane) in lanes {
                self.lane(w, blob, j, lane);
            }
        }
    }

    fn blob_complete(&mut self, i: usize, blob: Hex32) {
        let Some(bf) = self.nodes[i].fetches.remove(&blob) else { return };
        for j in &bf.watching {
            self.nodes[*j].watchers.remove(&(i, blob));
        }
        self.nodes[i].blobs.insert(blob);
        let now = self.q.now();
        self.nodes[i].completed.push((now, blob));
        self.tell_watchers(i, blob);
        let key = (bf.model.clone(), bf.version);
        let done = match self.nodes[i].version_fetches.get_mut(&key) {
            Some(pending) => {
                pending.remove(&blob);
                pending.is_empty()
            }
            None => false,
        };
        if done {
            self.nodes[i].version_fetches.remove(&key);
            self.input(i, Input::FetchFinished { model: bf.model, version: bf.version, result: Ok(()) });
        }
    }

    /// Once a second per running blob fetch: new providers, and whether it stalled.
    pub(super) fn on_fetch_check(&mut self, i: usize, blob: Hex32, inc: u32) {
        if inc != self.incarnation[i] {
            return;
        }
        let now = self.now_ms();
        let Some(state) = self.nodes[i].fetches.get(&blob).map(|bf| bf.fetch.state(now)) else { return };
        match state {
            FetchState::Running => {
                self.q.after(SECOND, Ev::FetchCheck { node: i, blob, incarnation: inc });
                self.pump(i, blob);
            }
            FetchState::Complete => self.blob_complete(i, blob),
            FetchState::NoProvider | FetchState::Failed(_) => self.fail_version_fetch(i, blob, state),
        }
    }

    fn fail_version_fetch(&mut self, i: usize, blob: Hex32, state: FetchState) {
        let Some(bf) = self.nodes[i].fetches.get(&blob) else { return };
        let key = (bf.model.clone(), bf.version);
        let blobs: Vec<Hex32> = self.nodes[i].version_fetches.remove(&key).into_iter().flatten().collect();
        for b in blobs.iter().chain(std::iter::once(&blob)) {
            if let Some(bf) = self.nodes[i].fetches.remove(b) {
                for j in &bf.watching {
                    self.nodes[*j].watchers.remove(&(i, *b));
                }
            }
        }
        let reason = match state {
            FetchState::Failed(f) => format!("every provider failed ({} of them)", f.len()),
            _ => "no provider to fetch from".to_string(),
        };
        self.input(i, Input::FetchFinished { model: key.0, version: key.1, result: Err(reason) });
    }

    /// `Output::Providers`: a running fetch learns of more providers.
    pub(super) fn update_providers(&mut self, i: usize, blob: Hex32, providers: Vec<NodeId>) {
        if let Some(bf) = self.nodes[i].fetches.get_mut(&blob) {
            bf.ranked = providers;
            self.pump(i, blob);
        }
    }

    /// What a node loses when it stops: fetches under way, upload slots, watchers.
    pub(super) fn forget_transfers(&mut self, i: usize) {
        let fetches = std::mem::take(&mut self.nodes[i].fetches);
        for (blob, bf) in fetches {
            for j in bf.watching {
                self.nodes[j].watchers.remove(&(i, blob));
            }
        }
        self.nodes[i].version_fetches.clear();
        self.nodes[i].uploading.clear();
        self.nodes[i].watchers.clear();
        // Requests it held: their connections close.
        let at = self.q.now() + SECOND;
        for (blob, held) in std::mem::take(&mut self.nodes[i].held) {
            for request in held {
                self.answer_held(i, blob, request, PieceOutcome::Failed("the provider went away".into()), at);
            }
        }
    }

    /// Provider `j` answers a request it held (without the piece) at `at`.
    fn answer_held(&mut self, j: usize, blob: Hex32, request: HeldRequest, outcome: PieceOutcome, at: Micros) {
        let HeldRequest { from, piece, lane, incarnation } = request;
        self.q.at(at, Ev::PieceAnswer { to: from, from: j, blob, piece, lane, outcome, incarnation });
    }
}
