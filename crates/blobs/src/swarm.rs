//! Fetching one blob in pieces from several providers at once, driving the protocol
//! core's `swarm::PieceFetch` (which providers, which piece, what a refusal, a failure or
//! a stall means): each provider tells which pieces it holds (an iroh-blobs observe
//! stream, so a provider that is still fetching offers what it has verified so far), and
//! each of its lanes asks for the piece the state machine picks. Every piece is
//! BLAKE3-verified as it streams into the store, which also makes a fetch resumable: a
//! piece already on disk is never asked for again.

use crate::{hash_of, BlobError, BlobNode, FetchProgress, FetchReport, Result};
use iroh::endpoint::Connection;
use iroh_blobs::api::proto::Bitfield;
use iroh_blobs::api::remote::GetProgressItem;
use iroh_blobs::protocol::{ChunkRanges, ChunkRangesExt, GetRequest, ObserveRequest};
use n0_future::StreamExt;
use slmesh_protocol::swarm::{AfterPiece, FetchPolicy, FetchState, Next, PieceFetch, PieceOutcome, PieceSet};
use slmesh_protocol::{Hex32, NodeId};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// 512 KiB: 512 BLAKE3 chunks, 32 of iroh's 16 KiB verification groups.
pub const PIECE_CHUNKS: u64 = 512;

pub fn piece_count(size: u64) -> u32 {
    size.div_ceil(1024).div_ceil(PIECE_CHUNKS).max(1) as u32
}

fn piece_ranges(piece: u32, size: u64) -> ChunkRanges {
    let chunks = size.div_ceil(1024).max(1);
    let start = piece as u64 * PIECE_CHUNKS;
    ChunkRanges::chunks(start..(start + PIECE_CHUNKS).min(chunks))
}

/// The pieces wholly inside `ranges`.
fn pieces_in(ranges: &ChunkRanges, size: u64) -> PieceSet {
    let n = piece_count(size);
    let mut set = PieceSet::new(n);
    for p in 0..n {
        if ranges.is_superset(&piece_ranges(p, size)) {
            set.insert(p);
        }
    }
    set
}

/// The protocol core's piece fetch, and what only the driver counts (bytes).
struct State {
    fetch: PieceFetch,
    received: u64,
    /// Bytes each provider delivered.
    delivered: HashMap<NodeId, u64>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Milliseconds since the fetch started: the piece fetch's clock.
fn millis(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64
}

/// A piece asked for: the claim goes back when the request ends, also when its lane is
/// dropped mid-request (another lane of the provider failed, or the fetch finished).
struct Claim<'a> {
    state: &'a Mutex<State>,
    piece: Option<u32>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.piece {
            lock(self.state).fetch.release(p);
        }
    }
}

impl BlobNode {
    /// Fetches `hash` (of `size` bytes) in pieces from the providers `providers` names
    /// (ranked, best first; the list may grow while the fetch runs, as peers announce
    /// that they hold or are fetching the blob). Pieces on disk already are not fetched
    /// again. `progress` sees the bytes as they arrive.
    pub async fn fetch(
        self: &Arc<Self>,
        hash: &Hex32,
        size: u64,
        mut providers: watch::Receiver<Vec<NodeId>>,
        mut progress: impl FnMut(&FetchProgress),
    ) -> Result<FetchReport> {
        let started = Instant::now();
        let had = self.local_bytes(hash).await?;
        if self.is_complete(hash).await? {
            return Ok(FetchReport { had, received: 0, provider: None, failed: vec![], elapsed: started.elapsed() });
        }
        self.check_disk_space(hash, size.saturating_sub(had))?;
        self.protect(hash).await?;
        let local = self.store.blobs().observe(hash_of(hash)).await.map_err(|e| BlobError::StoreOp(e.to_string()))?;
        let fetch = PieceFetch::new(FetchPolicy::default(), pieces_in(&local.ranges, size), self.id(), 0);
        let state = Arc::new(Mutex::new(State { fetch, received: 0, delivered: HashMap::new() }));
        let notify = Arc::new(Notify::new());
        let mut workers = tokio::task::JoinSet::new();
        let mut last_provider = None;
        let mut list_closed = false;
        loop {
            let to_start = {
                let mut s = lock(&state);
                match s.fetch.state(millis(started)) {
                    FetchState::Complete => break,
                    FetchState::Running => {}
                    FetchState::NoProvider => return Err(BlobError::NoProvider { hash: hash.to_hex() }),
                    FetchState::Failed(failed) => {
                        let failures = failed.iter().map(|(p, r)| format!("{}: {r}", p.short())).collect::<Vec<_>>();
                        return Err(BlobError::AllProvidersFailed {
                            hash: hash.to_hex(),
                            failures: failures.join("; "),
                        });
                    }
                }
                let report = FetchProgress {
                    hash: *hash,
                    size,
                    had,
                    received: s.received,
                    provider: last_provider.unwrap_or_else(|| self.id()),
                };
                progress(&report);
                let ranked: Vec<NodeId> = providers.borrow().clone();
                s.fetch.providers_to_start(&ranked)
            };
            for provider in to_start {
                last_provider.get_or_insert(provider);
                let (node, state, notify, hash) = (self.clone(), state.clone(), notify.clone(), *hash);
                workers.spawn(async move {
                    let result = node.fetch_from_provider(&hash, size, provider, &state, &notify, started).await;
                    if let Err(reason) = &result {
                        tracing::warn!(blob = %hash.to_hex(), provider = %provider.short(), %reason, "provider failed, the others go on");
                    }
                    lock(&state).fetch.provider_ended(&provider, result);
                    notify.notify_waiters();
                });
            }
            tokio::select! {
                _ = notify.notified() => {}
                changed = providers.changed(), if !list_closed => {
                    // The node stopped updating the list (shutting down): go on with
                    // the providers at hand.
                    list_closed = changed.is_err();
                }
                Some(_) = workers.join_next(), if !workers.is_empty() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        workers.abort_all();
        if !self.is_complete(hash).await? {
            return Err(BlobError::StoreOp(format!("blob {} has every piece but is not complete", hash.to_hex())));
        }
        let s = lock(&state);
        let most = s.delivered.iter().max_by_key(|(node, bytes)| (**bytes, **node)).map(|(node, _)| *node);
        Ok(FetchReport {
            had,
            received: s.received,
            provider: most,
            failed: s.fetch.failures().to_vec(),
            elapsed: started.elapsed(),
        })
    }

    /// One provider's share: learn which pieces it offers, then ask it for pieces (as
    /// many lanes as the policy says) until this node has them all. An error drops the
    /// provider (bad data, gone).
    async fn fetch_from_provider(
        &self,
        hash: &Hex32,
        size: u64,
        provider: NodeId,
        state: &Arc<Mutex<State>>,
        notify: &Arc<Notify>,
        started: Instant,
    ) -> Result<(), String> {
        let conn = self.connect_to(&provider).await?;
        let observer = {
            let (conn, state, notify, store) = (conn.clone(), state.clone(), notify.clone(), self.store.clone());
            let hash = hash_of(hash);
            tokio::spawn(async move {
                let mut stream = std::pin::pin!(store.remote().observe(conn, ObserveRequest::new(hash)));
                let mut bitfield = Bitfield::empty();
                while let Some(Ok(update)) = stream.next().await {
                    bitfield.update(&update);
                    let offered = pieces_in(&bitfield.ranges, size);
                    lock(&state).fetch.offered(provider, offered);
                    notify.notify_waiters();
                }
            })
        };
        let lanes_count = lock(state).fetch.policy().requests_per_provider;
        let lanes =
            (0..lanes_count).map(|lane| self.ask_for_pieces(hash, size, provider, lane, &conn, state, notify, started));
        // The first lane to fail drops the provider; the others stop with it.
        let result = n0_future::try_join_all(lanes).await.map(|_| ());
        observer.abort();
        conn.close(0u32.into(), b"done");
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn ask_for_pieces(
        &self,
        hash: &Hex32,
        size: u64,
        provider: NodeId,
        lane: u32,
        conn: &Connection,
        state: &Arc<Mutex<State>>,
        notify: &Arc<Notify>,
        started: Instant,
    ) -> Result<(), String> {
        loop {
            let waiting = notify.notified();
            let next = lock(state).fetch.next(&provider, lane);
            let piece = match next {
                Next::Done => return Ok(()),
                Next::Ask(p) => p,
                Next::Wait => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), waiting).await;
                    continue;
                }
            };
            let mut claim = Claim { state, piece: Some(piece) };
            let result = self.get_piece(hash, size, piece, provider, conn, state).await;
            // The provider's gate reset the stream: with iroh-blobs' ERR_LIMIT (2) when
            // it is busy, with ERR_PERMISSION (1) when it sent this piece to another
            // peer and would send another. Other resets (3: it failed to read its own
            // data) and bad data drop the provider.
            let outcome = match result {
                Ok(()) => PieceOutcome::Received,
                Err(reason) if reason.ends_with("reset by peer: error 2") => PieceOutcome::Refused,
                Err(reason) if reason.ends_with("reset by peer: error 1") => PieceOutcome::Declined,
                Err(reason) => PieceOutcome::Failed(reason),
            };
            claim.piece = None;
            let after = lock(state).fetch.outcome(&provider, lane, piece, outcome, millis(started));
            notify.notify_waiters();
            match after {
                AfterPiece::Continue => {}
                AfterPiece::RetryAfter(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                AfterPiece::Drop(reason) => return Err(reason),
            }
        }
    }

    /// Asks for what is missing of one piece; verified as it streams into the store.
    async fn get_piece(
        &self,
        hash: &Hex32,
        size: u64,
        piece: u32,
        provider: NodeId,
        conn: &Connection,
        state: &Arc<Mutex<State>>,
    ) -> Result<(), String> {
        let request = GetRequest::builder().root(piece_ranges(piece, size)).build(hash_of(hash));
        let local = self.store.remote().local_for_request(request).await.map_err(|e| e.to_string())?;
        if local.is_complete() {
            return Ok(());
        }
        let mut stream = self.store.remote().execute_get(conn.clone(), local.missing()).stream();
        let mut last = 0u64;
        let stall = Duration::from_millis(lock(state).fetch.policy().piece_stall_ms);
        loop {
            let Ok(item) = tokio::time::timeout(stall, stream.next()).await else {
                return Err(format!("no data for {} s", stall.as_secs()));
            };
            match item {
                Some(GetProgressItem::Progress(n)) => {
                    let delta = n.saturating_sub(last);
                    last = n;
                    self.counters.downloaded.fetch_add(delta, Ordering::Relaxed);
                    let mut s = lock(state);
                    s.received += delta;
                    *s.delivered.entry(provider).or_default() += delta;
                }
                Some(GetProgressItem::Done(_)) => return Ok(()),
                Some(GetProgressItem::Error(e)) => return Err(format!("{e}")),
                None => return Err("transfer ended without a result".to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_blob_and_only_whole_pieces_count() {
        let size = 3 * 512 * 1024 + 100;
        assert_eq!(piece_count(size), 4);
        assert_eq!(piece_count(1), 1);
        assert_eq!(piece_ranges(3, size), ChunkRanges::chunks(1536..1537));
        let held = ChunkRanges::chunks(0..700);
        assert_eq!(pieces_in(&held, size).iter().collect::<Vec<_>>(), vec![0]);
        assert!(pieces_in(&ChunkRanges::all(), size).is_full());
    }
}
