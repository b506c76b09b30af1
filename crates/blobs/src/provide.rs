//! The provider's side of the blob endpoint: answers iroh-blobs' questions (admit a
//! connection, an observe stream, a get request; when to send each 16 KiB chunk) as the
//! upload gate decides, holds piece requests for a busy slot and starts them as slots
//! free, counts uploaded bytes and, with a cap, paces chunks to stay under it.

use crate::{hex_of, swarm, Counters, UploadGate, MAX_SENT_ENTRIES};
use iroh_blobs::api::blobs::BlobStatus;
use iroh_blobs::protocol::GetRequest;
use iroh_blobs::provider::events::{
    AbortReason, EventResult, ProviderMessage, RequestUpdate, TransferAborted, TransferCompleted,
};
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::Hash;
use slmesh_protocol::node::PieceAdmission;
use slmesh_protocol::swarm::Refusal;
use slmesh_protocol::NodeId;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

type Answer = irpc::channel::oneshot::Sender<EventResult>;
type Updates = irpc::channel::mpsc::Receiver<RequestUpdate>;

/// A request held for a slot: the piece it starts in, and how to wake it.
struct Held {
    piece: Option<u32>,
    wake: oneshot::Sender<Wake>,
}

/// Why a held request is woken.
#[derive(Debug, PartialEq, Eq)]
enum Wake {
    /// A slot freed, or a running transfer stalled: ask the gate again.
    Turn,
    /// A request for a rarer piece took its place in the full queue: refused as busy.
    Displaced,
}

/// Transfers running and requests held, per blob, under one lock: the gate decides on
/// them, and they move in the same step.
#[derive(Default)]
struct Slots {
    /// Each running transfer of a blob: its number and when it started.
    running: HashMap<Hash, Vec<(u64, Instant)>>,
    /// The next transfer's number, to tell which one ended or stalled.
    next_transfer: u64,
    /// Held requests, oldest first: each is woken once, when a slot frees for it.
    held: HashMap<Hash, VecDeque<Held>>,
}

impl Slots {
    /// The piece of each request of `hash` still waiting, oldest first (those that gave
    /// up are dropped).
    fn waiting(&mut self, hash: &Hash) -> Vec<Option<u32>> {
        let Some(queue) = self.held.get_mut(hash) else { return vec![] };
        queue.retain(|h| !h.wake.is_closed());
        let pieces: Vec<Option<u32>> = queue.iter().map(|h| h.piece).collect();
        if pieces.is_empty() {
            self.held.remove(hash);
        }
        pieces
    }

    /// Holds a request for `piece` of `hash`: at the back, or at the front for one that
    /// waited already. Its wake.
    fn hold(&mut self, hash: Hash, piece: Option<u32>, front: bool) -> oneshot::Receiver<Wake> {
        let (tx, rx) = oneshot::channel();
        let queue = self.held.entry(hash).or_default();
        let entry = Held { piece, wake: tx };
        if front {
            queue.push_front(entry);
        } else {
            queue.push_back(entry);
        }
        rx
    }

    /// The held request of `hash` at `k` (of `waiting`) loses its place: it is refused.
    fn displace(&mut self, hash: &Hash, k: usize) {
        if let Some(h) = self.held.get_mut(hash).and_then(|q| q.remove(k)) {
            h.wake.send(Wake::Displaced).ok();
        }
    }

    /// How long each running transfer of `hash` has run, in milliseconds.
    fn running_ms(&self, hash: &Hash) -> Vec<u64> {
        let running = self.running.get(hash).map_or(&[][..], Vec::as_slice);
        running.iter().map(|(_, at)| u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX)).collect()
    }

    /// A transfer of `hash` starts: its number.
    fn start(&mut self, hash: Hash) -> u64 {
        let transfer = self.next_transfer;
        self.next_transfer = self.next_transfer.wrapping_add(1);
        self.running.entry(hash).or_default().push((transfer, Instant::now()));
        transfer
    }

    /// Wakes the held request of `hash`, among those that still wait, that the gate
    /// picks (`UploadGate::next_held`); false if none waits.
    fn wake(&mut self, hash: &Hash, gate: &dyn UploadGate) -> bool {
        let Some(queue) = self.held.get_mut(hash) else { return false };
        queue.retain(|h| !h.wake.is_closed());
        let mut woken = false;
        while !queue.is_empty() && !woken {
            let pieces: Vec<Option<u32>> = queue.iter().map(|h| h.piece).collect();
            let k = gate.next_held(&hex_of(hash), &pieces).min(queue.len() - 1);
            // One that gave up since is passed over.
            woken = queue.remove(k).is_some_and(|h| h.wake.send(Wake::Turn).is_ok());
        }
        if queue.is_empty() {
            self.held.remove(hash);
        }
        woken
    }

    /// Transfer `transfer` of `hash` ended: its slot goes to a held request.
    fn release(&mut self, hash: &Hash, transfer: u64, gate: &dyn UploadGate) {
        if let Some(running) = self.running.get_mut(hash) {
            running.retain(|(t, _)| *t != transfer);
            if running.is_empty() {
                self.running.remove(hash);
            }
        }
        self.wake(hash, gate);
    }

    /// Transfer `transfer` of `hash` has run `UploadGate::stalled_after_ms`: if it still
    /// runs, a held request is asked again, and may start beside it (true if one was).
    fn stalled(&mut self, hash: &Hash, transfer: u64, gate: &dyn UploadGate) -> bool {
        self.running.get(hash).is_some_and(|r| r.iter().any(|(t, _)| *t == transfer)) && self.wake(hash, gate)
    }
}

/// The gate's answer to a request, with what it took: a running transfer's number, or
/// the wake of a held request.
enum Decided {
    Send(u64),
    Wait(oneshot::Receiver<Wake>),
    Refuse(Refusal),
}

/// What every request's handling shares.
#[derive(Clone)]
struct Provider {
    gate: Arc<dyn UploadGate>,
    counters: Arc<Counters>,
    store: FsStore,
    slots: Arc<Mutex<Slots>>,
    /// Bytes of each blob sent to each client, over all its (piece) transfers.
    sent: Arc<Mutex<HashMap<(NodeId, Hash), u64>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One get request: what it asks for and who asks.
struct Request {
    hash: Hash,
    client: Option<NodeId>,
    piece: Option<u32>,
}

impl Provider {
    /// The gate's answer, taking a slot if it says send; a request it holds is queued in
    /// the same step (`held`: one that waited already, asked again as a slot freed or a
    /// transfer stalled, goes back to the head of the queue).
    fn decide(&self, request: &Request, held: bool) -> Decided {
        let mut slots = lock(&self.slots);
        let running = slots.running_ms(&request.hash);
        let waiting = if held { vec![] } else { slots.waiting(&request.hash) };
        let admission = match self.gate.admit(request.client) {
            Err(reason) => PieceAdmission::Refuse(Refusal::Busy(reason)),
            Ok(()) => self.gate.allow_piece(&hex_of(&request.hash), &running, &waiting, request.client, request.piece),
        };
        match admission {
            PieceAdmission::Send => Decided::Send(slots.start(request.hash)),
            PieceAdmission::Wait => Decided::Wait(slots.hold(request.hash, request.piece, held)),
            PieceAdmission::WaitInstead(k) => {
                slots.displace(&request.hash, k);
                Decided::Wait(slots.hold(request.hash, request.piece, held))
            }
            // A woken request that does not take the slot passes it on.
            PieceAdmission::Refuse(refusal) => {
                if held {
                    slots.wake(&request.hash, self.gate.as_ref());
                }
                Decided::Refuse(refusal)
            }
        }
    }

    /// Answers a get request now, or holds it for a slot (in a task of its own, so that
    /// the provider's other questions are answered meanwhile).
    async fn get_request(&self, request: Request, answer: Answer, updates: Updates) {
        match self.decide(&request, false) {
            Decided::Send(transfer) => self.serve(request, transfer, answer, updates).await,
            Decided::Wait(wake) => {
                self.counters.held.fetch_add(1, Ordering::Relaxed);
                let provider = self.clone();
                tokio::spawn(async move { provider.hold(request, answer, updates, wake).await });
            }
            Decided::Refuse(refusal) => self.refuse(&request, answer, refusal).await,
        }
    }

    /// Waits for a slot, at most as long as the gate allows, then sends or refuses.
    async fn hold(&self, request: Request, answer: Answer, updates: Updates, mut wake: oneshot::Receiver<Wake>) {
        let max_wait = Duration::from_millis(self.gate.max_wait_ms());
        let deadline = tokio::time::Instant::now() + max_wait;
        loop {
            match tokio::time::timeout_at(deadline, &mut wake).await {
                Ok(Ok(Wake::Turn)) => {}
                Ok(Ok(Wake::Displaced)) => {
                    let reason = "a request for a piece sent less often took its place in the queue";
                    return self.refuse(&request, answer, Refusal::Busy(reason.into())).await;
                }
                _ => {
                    // A turn that came with the deadline goes to the next in line.
                    if wake.try_recv() == Ok(Wake::Turn) {
                        lock(&self.slots).wake(&request.hash, self.gate.as_ref());
                    }
                    let reason = format!("no upload slot freed within {} ms", max_wait.as_millis());
                    return self.refuse(&request, answer, Refusal::Busy(reason)).await;
                }
            }
            match self.decide(&request, true) {
                Decided::Send(transfer) => return self.serve(request, transfer, answer, updates).await,
                Decided::Wait(next) => wake = next,
                Decided::Refuse(refusal) => return self.refuse(&request, answer, refusal).await,
            }
        }
    }

    async fn refuse(&self, request: &Request, answer: Answer, refusal: Refusal) {
        tracing::debug!(blob = %request.hash, reason = %refusal, "refused a fetch");
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        let code = match refusal {
            Refusal::Elsewhere(_) => AbortReason::Permission,
            Refusal::Busy(_) => AbortReason::RateLimited,
        };
        answer.send(Err(code)).await.ok();
    }

    /// Sends: the request holds a slot until its transfer ends (its updates end with
    /// Completed or Aborted, or the channel closes); once it has run the gate's
    /// `stalled_after_ms`, a held request is asked again and may start beside it.
    async fn serve(&self, request: Request, transfer: u64, answer: Answer, mut updates: Updates) {
        answer.send(Ok(())).await.ok();
        if let Some(ms) = self.gate.stalled_after_ms() {
            let (provider, hash) = (self.clone(), request.hash);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if lock(&provider.slots).stalled(&hash, transfer, provider.gate.as_ref()) {
                    provider.counters.stalled.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let provider = self.clone();
        tokio::spawn(async move {
            // Counted when the transfer ends: its stats are exact, while progress events
            // may be dropped under load.
            while let Ok(Some(update)) = updates.recv().await {
                match update {
                    RequestUpdate::Completed(TransferCompleted { stats }) => {
                        provider.counters.uploaded.fetch_add(stats.payload_bytes_sent, Ordering::Relaxed);
                        provider.credit(&request, stats.payload_bytes_sent).await;
                        break;
                    }
                    RequestUpdate::Aborted(TransferAborted { stats }) => {
                        provider.counters.uploaded.fetch_add(stats.payload_bytes_sent, Ordering::Relaxed);
                        break;
                    }
                    _ => {}
                }
            }
            lock(&provider.slots).release(&request.hash, transfer, provider.gate.as_ref());
        });
    }

    /// Fetchers ask only for what they miss: once the blob's size has gone to one client,
    /// it holds the blob.
    async fn credit(&self, request: &Request, bytes: u64) {
        let Some(to) = request.client else { return };
        let total = {
            let mut sent = lock(&self.sent);
            let t = sent.entry((to, request.hash)).or_default();
            *t += bytes;
            *t
        };
        let size = match self.store.blobs().status(request.hash).await {
            Ok(BlobStatus::Complete { size }) => size,
            _ => u64::MAX,
        };
        if total >= size {
            self.gate.served(&hex_of(&request.hash), to);
        }
    }
}

/// The piece a get request starts in: piece requests ask for part of one.
fn first_piece(request: &GetRequest) -> Option<u32> {
    let first_chunk = request
        .ranges
        .iter_non_empty_infinite()
        .next()
        .and_then(|(offset, ranges)| (offset == 0).then(|| ranges.boundaries().first().map(|c| c.0)).flatten());
    first_chunk.map(|c| (c / swarm::PIECE_CHUNKS) as u32)
}

/// Answers the provider's questions: whether to admit a connection, an observe stream or
/// a get request (the upload gate, given how many transfers of that blob run and wait
/// now), and, per 16 KiB chunk, when to send it.
pub(crate) async fn provider_events(
    mut rx: tokio::sync::mpsc::Receiver<ProviderMessage>,
    counters: Arc<Counters>,
    max_bytes_per_sec: Option<u64>,
    gate: Arc<dyn UploadGate>,
    store: FsStore,
) {
    let provider = Provider { gate, counters, store, slots: Default::default(), sent: Default::default() };
    // Who is at the other end of each connection, to credit completed transfers.
    let mut clients: HashMap<u64, NodeId> = HashMap::new();
    // The uplink is free again at `next_free`: a token bucket without burst credit.
    let mut next_free = Instant::now();
    while let Some(msg) = rx.recv().await {
        match msg {
            ProviderMessage::Throttle(msg) => {
                if let Some(cap) = max_bytes_per_sec.filter(|c| *c > 0) {
                    let now = Instant::now();
                    next_free = next_free.max(now) + Duration::from_secs_f64(msg.inner.size as f64 / cap as f64);
                    tokio::time::sleep_until(next_free.into()).await;
                }
                msg.tx.send(Ok(())).await.ok();
            }
            ProviderMessage::ClientConnected(msg) => {
                let client = msg.inner.endpoint_id.map(|id| NodeId::from_endpoint_id(&id));
                match provider.gate.admit(client) {
                    Ok(()) => {
                        if let Some(id) = client {
                            clients.insert(msg.inner.connection_id, id);
                        }
                        msg.tx.send(Ok(())).await.ok();
                    }
                    Err(reason) => {
                        tracing::info!(client = %client.map_or("unknown".into(), |c| c.short()), %reason, "refused a blob connection");
                        provider.counters.refused.fetch_add(1, Ordering::Relaxed);
                        msg.tx.send(Err(AbortReason::Permission)).await.ok();
                    }
                }
            }
            ProviderMessage::ObserveRequestReceived(msg) => {
                let client = clients.get(&msg.inner.connection_id).copied();
                let answer = provider.gate.admit(client).map_err(|reason| {
                    tracing::debug!(%reason, "refused an observe request");
                    AbortReason::Permission
                });
                msg.tx.send(answer).await.ok();
            }
            ProviderMessage::ConnectionClosed(msg) => {
                clients.remove(&msg.inner.connection_id);
                // Bytes sent count towards "holds the whole blob" across a client's
                // connections; past the bound, only connected clients' counts stay.
                let mut sent = lock(&provider.sent);
                if sent.len() > MAX_SENT_ENTRIES {
                    let connected: std::collections::HashSet<NodeId> = clients.values().copied().collect();
                    sent.retain(|(client, _), _| connected.contains(client));
                }
            }
            ProviderMessage::GetRequestReceived(msg) => {
                let request = Request {
                    hash: msg.inner.request.hash,
                    client: clients.get(&msg.inner.connection_id).copied(),
                    piece: first_piece(&msg.inner.request),
                };
                provider.get_request(request, msg.tx, msg.rx).await;
            }
            // Only connections, throttle, get and observe are intercepted; the rest need
            // no answer.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServeAll;
    use slmesh_protocol::Hex32;

    /// Holds one request per piece of `pieces`, oldest first.
    fn hold_all(slots: &mut Slots, hash: Hash, pieces: &[Option<u32>]) -> Vec<oneshot::Receiver<Wake>> {
        pieces.iter().map(|piece| slots.hold(hash, *piece, false)).collect()
    }

    fn turn(rx: &mut oneshot::Receiver<Wake>) -> bool {
        rx.try_recv() == Ok(Wake::Turn)
    }

    #[test]
    fn a_freed_slot_wakes_the_oldest_request_still_waiting() {
        let hash = Hash::from([7u8; 32]);
        let mut slots = Slots::default();
        let (first, second) = (slots.start(hash), slots.start(hash));
        assert_eq!(slots.running_ms(&hash).len(), 2);
        let mut rxs = hold_all(&mut slots, hash, &[Some(0), Some(1), Some(2)]);
        // The oldest gave up waiting (its deadline passed): skipped, and not counted.
        drop(rxs.remove(0));
        assert_eq!(slots.waiting(&hash), vec![Some(1), Some(2)]);
        slots.release(&hash, first, &ServeAll);
        assert_eq!(slots.running[&hash].iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![second]);
        assert!(turn(&mut rxs[0]), "the oldest still waiting is woken");
        assert!(rxs[1].try_recv().is_err(), "one slot, one wake");
        slots.release(&hash, second, &ServeAll);
        assert!(turn(&mut rxs[1]));
        assert!(slots.running.is_empty() && slots.held.is_empty(), "nothing left behind");
        slots.release(&hash, second, &ServeAll);
        assert!(slots.running.is_empty(), "a release too many changes nothing");
    }

    #[test]
    fn a_stalled_transfer_wakes_a_held_request_only_while_it_runs() {
        let hash = Hash::from([7u8; 32]);
        let mut slots = Slots::default();
        let (first, second) = (slots.start(hash), slots.start(hash));
        assert_ne!(first, second);
        let mut rxs = hold_all(&mut slots, hash, &[Some(0), Some(1)]);
        assert!(slots.stalled(&hash, first, &ServeAll));
        assert!(turn(&mut rxs[0]), "the oldest is asked again");
        assert!(rxs[1].try_recv().is_err());
        assert_eq!(slots.running_ms(&hash).len(), 2, "a stalled transfer still holds its slot");
        slots.release(&hash, second, &ServeAll);
        assert!(turn(&mut rxs[1]), "an ended transfer frees its slot");
        let mut late = hold_all(&mut slots, hash, &[Some(2)]);
        assert!(!slots.stalled(&hash, second, &ServeAll));
        assert!(late[0].try_recv().is_err(), "a transfer that ended before it stalled wakes nobody");
        assert!(slots.stalled(&hash, first, &ServeAll));
        assert!(turn(&mut late[0]));
        assert!(!slots.stalled(&hash, first, &ServeAll), "none waits: nobody to wake");
    }

    #[test]
    fn a_displaced_request_is_told_so_and_leaves_the_queue() {
        let hash = Hash::from([7u8; 32]);
        let mut slots = Slots::default();
        let mut rxs = hold_all(&mut slots, hash, &[Some(0), Some(1), Some(2)]);
        slots.displace(&hash, 1);
        assert_eq!(rxs[1].try_recv(), Ok(Wake::Displaced));
        assert!(rxs[0].try_recv().is_err() && rxs[2].try_recv().is_err(), "the others keep waiting");
        assert_eq!(slots.waiting(&hash), vec![Some(0), Some(2)]);
        slots.displace(&hash, 5);
        assert_eq!(slots.waiting(&hash), vec![Some(0), Some(2)], "past the end: nobody");
        let front = slots.hold(hash, Some(9), true);
        assert_eq!(slots.waiting(&hash), vec![Some(9), Some(0), Some(2)], "one that waited already goes first");
        drop(front);
    }

    /// A gate that starts the held request for the highest piece first, and says which
    /// pieces it was shown.
    struct HighestFirst(Mutex<Vec<Vec<Option<u32>>>>);

    impl UploadGate for HighestFirst {
        fn admit(&self, _: Option<NodeId>) -> Result<(), String> {
            Ok(())
        }

        fn allow(&self, _: &Hex32, _: usize) -> Result<(), String> {
            Ok(())
        }

        fn next_held(&self, _: &Hex32, pieces: &[Option<u32>]) -> usize {
            lock(&self.0).push(pieces.to_vec());
            (0..pieces.len()).max_by_key(|k| pieces[*k]).unwrap_or(0)
        }
    }

    #[test]
    fn the_gate_picks_which_held_request_a_freed_slot_wakes() {
        let hash = Hash::from([7u8; 32]);
        let gate = HighestFirst(Mutex::new(vec![]));
        let mut slots = Slots::default();
        let mut rxs = hold_all(&mut slots, hash, &[Some(1), Some(5), Some(3), Some(4)]);
        slots.release(&hash, 0, &gate);
        assert!(turn(&mut rxs[1]), "piece 5 first");
        assert!(rxs.iter_mut().enumerate().all(|(k, rx)| k == 1 || rx.try_recv().is_err()), "one wake");
        // The one the gate would pick next (4) gave up meanwhile: the gate is not shown
        // it, and the slot goes to 3.
        drop(rxs.remove(3));
        slots.release(&hash, 0, &gate);
        assert!(turn(&mut rxs[2]), "piece 3, after 4 gave up");
        assert!(rxs[0].try_recv().is_err());
        let asked = lock(&gate.0).clone();
        assert_eq!(asked[0], vec![Some(1), Some(5), Some(3), Some(4)]);
        assert_eq!(asked.last(), Some(&vec![Some(1), Some(3)]), "only those still waiting are shown");
        // A gate that answers past the end wakes the newest rather than nobody.
        struct PastTheEnd;
        impl UploadGate for PastTheEnd {
            fn admit(&self, _: Option<NodeId>) -> Result<(), String> {
                Ok(())
            }
            fn allow(&self, _: &Hex32, _: usize) -> Result<(), String> {
                Ok(())
            }
            fn next_held(&self, _: &Hex32, _: &[Option<u32>]) -> usize {
                usize::MAX
            }
        }
        slots.release(&hash, 0, &PastTheEnd);
        assert!(turn(&mut rxs[0]));
        assert!(slots.held.is_empty());
    }
}
