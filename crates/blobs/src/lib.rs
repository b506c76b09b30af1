//! The node's blob side: an iroh endpoint for closed networks (no relays, no n0 lookups,
//! no portmapper; peers' addresses come from the libp2p mesh) and an iroh-blobs FsStore
//! in the data folder. Serves the blobs it holds (also the verified pieces of those it is
//! still fetching), counts (and optionally paces) what it uploads, and fetches a blob in
//! pieces from several ranked providers at once (`swarm`): BLAKE3-verified as they stream,
//! resumed from what is already on disk, dropping a provider that fails or sends bytes
//! that do not verify.

use iroh::endpoint::{presets, PortmapperConfig};
use iroh::protocol::Router;
use iroh::{Endpoint, EndpointAddr, RelayMode};
use iroh_blobs::api::blobs::{BlobStatus, ExportMode, ExportOptions};
use iroh_blobs::provider::events::{ConnectMode, EventMask, EventSender, ObserveMode, RequestMode, ThrottleMode};
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::store::GcConfig;
use iroh_blobs::{BlobsProtocol, Hash};
use n0_future::StreamExt;
use slmesh_protocol::node::PieceAdmission;
use slmesh_protocol::swarm::Refusal;
use slmesh_protocol::{Hex32, NodeId, SecretKey};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

mod provide;
pub mod swarm;

#[derive(Debug, Error)]
pub enum BlobError {
    #[error("cannot bind the blob endpoint to {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("cannot open the blob store in {path}: {reason}")]
    Store { path: String, reason: String },
    #[error("blob store: {0}")]
    StoreOp(String),
    #[error("cannot add {path} to the blob store: {reason}")]
    Import { path: String, reason: String },
    #[error("{path} hashes to {got}, the manifest says {want}")]
    HashMismatch { path: String, got: String, want: String },
    #[error("not enough free disk space in {path}: blob {hash} needs {needed} more bytes, {available} are free")]
    DiskFull { path: String, hash: String, needed: u64, available: u64 },
    #[error("not enough free disk space in {path}: this version needs {needed} bytes (its files and the copies staged from them), {available} are free and {reserved} are set aside for other fetches")]
    NoRoom { path: String, needed: u64, available: u64, reserved: u64 },
    #[error("no provider is known for blob {hash}")]
    NoProvider { hash: String },
    #[error("every provider of blob {hash} failed: {failures}")]
    AllProvidersFailed { hash: String, failures: String },
    #[error("cannot export blob {hash} to {path}: {reason}")]
    Export { hash: String, path: String, reason: String },
}

pub type Result<T, E = BlobError> = std::result::Result<T, E>;

pub struct BlobConfig {
    /// The node's key: its iroh EndpointId is the same key as its libp2p PeerId.
    pub secret: SecretKey,
    /// UDP address to bind (port 0 picks one).
    pub bind: SocketAddr,
    /// Folder of the FsStore.
    pub store_dir: PathBuf,
    /// Caps what this node uploads to peers, in bytes per second (None: no cap).
    pub max_upload_bytes_per_sec: Option<u64>,
    /// How often the store deletes blobs no tag protects.
    pub gc_interval: Duration,
    /// Decides whether to serve one more fetcher of a blob.
    pub gate: Arc<dyn UploadGate>,
}

/// The provider's admission of a connection and of each request on it: `uploading` is
/// how many transfers of that blob run now. Refused fetchers try their next provider.
pub trait UploadGate: Send + Sync {
    /// Whether `client` (None: the endpoint could not tell who it is) may talk to the
    /// blob endpoint at all: fetch, probe sizes or observe what this node holds. Asked
    /// when it connects and again on every request (admission can end meanwhile).
    fn admit(&self, client: Option<NodeId>) -> Result<(), String>;

    fn allow(&self, blob: &Hex32, uploading: usize) -> Result<(), String>;

    /// As `allow`, knowing who asks (if known) and which piece (`swarm::PIECE_CHUNKS`
    /// chunks) the request starts in, how long each running transfer of the blob has run
    /// (`running_ms`), and the piece of each request of the blob held for a slot already
    /// (`held`, oldest first; none for a held one asked again as a slot frees or a
    /// transfer stalls): send now, hold for a slot (perhaps in place of a held one), or
    /// refuse. `Refusal::Elsewhere` goes to the fetcher as
    /// iroh-blobs' permission error (1), anything else as its limit error (2), so that the
    /// fetcher can tell "not this piece" from "not now".
    fn allow_piece(
        &self,
        blob: &Hex32,
        running_ms: &[u64],
        _held: &[Option<u32>],
        _client: Option<NodeId>,
        _piece: Option<u32>,
    ) -> PieceAdmission {
        match self.allow(blob, running_ms.len()) {
            Ok(()) => PieceAdmission::Send,
            Err(reason) => PieceAdmission::Refuse(Refusal::Busy(reason)),
        }
    }

    /// After how long a running transfer lets a held request start beside it (None:
    /// only when a transfer ends): the endpoint asks again for one then.
    fn stalled_after_ms(&self) -> Option<u64> {
        None
    }

    /// How long a held request may wait for a slot before it is refused.
    fn max_wait_ms(&self) -> u64 {
        2_000
    }

    /// Which of `blob`'s held requests takes a freed slot, as an index into `pieces` (the
    /// piece each one starts in, oldest first). Oldest first unless the gate says otherwise.
    fn next_held(&self, _blob: &Hex32, _pieces: &[Option<u32>]) -> usize {
        0
    }

    /// `to` has been sent the whole blob (in one transfer or in pieces): it holds a
    /// verified copy now, even before its announcement arrives.
    fn served(&self, _blob: &Hex32, _to: NodeId) {}
}

/// Serves everyone (tests and tools on a trusted host only).
pub struct ServeAll;

impl UploadGate for ServeAll {
    fn admit(&self, _: Option<NodeId>) -> Result<(), String> {
        Ok(())
    }

    fn allow(&self, _: &Hex32, _: usize) -> Result<(), String> {
        Ok(())
    }
}

/// Payload bytes moved, for status and benchmarks.
#[derive(Debug, Default)]
pub struct Counters {
    pub uploaded: AtomicU64,
    pub downloaded: AtomicU64,
    /// Fetch requests this node refused (its upload gate said no).
    pub refused: AtomicU64,
    /// Piece requests held for a busy upload slot (started as one freed, or refused
    /// after waiting too long).
    pub held: AtomicU64,
    /// Uploads that ran past the gate's `stalled_after_ms` while requests waited: each let
    /// one of them be asked again, to start beside it.
    pub stalled: AtomicU64,
}

/// Progress of one fetch, for `slmesh status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchProgress {
    pub hash: Hex32,
    pub size: u64,
    /// Bytes on disk already when the fetch started (resumed).
    pub had: u64,
    /// Bytes received in this fetch so far.
    pub received: u64,
    pub provider: NodeId,
}

/// How one successful fetch went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    pub had: u64,
    pub received: u64,
    /// The provider that sent the most of it.
    pub provider: Option<NodeId>,
    /// Providers that failed first, with the reason.
    pub failed: Vec<(NodeId, String)>,
    pub elapsed: Duration,
}

pub struct BlobNode {
    endpoint: Endpoint,
    router: Router,
    store: FsStore,
    store_dir: PathBuf,
    /// Where the store keeps each complete blob's bytes (its own layout, from its options).
    paths: iroh_blobs::store::fs::options::PathOptions,
    addrs: Mutex<HashMap<NodeId, Vec<SocketAddr>>>,
    counters: Arc<Counters>,
    /// Bytes that running fetches will still write (`reserve_space`).
    reserved: Arc<AtomicU64>,
}

/// How `BlobNode::stage` put a blob in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staged {
    /// A hard link to the store's own file: no second copy on disk.
    Linked,
    Copied,
}

/// The BLAKE3 hash of a file's bytes (read in large blocks, hashed on every core).
fn file_hash(path: &Path) -> std::io::Result<Hex32> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update_rayon(&buf[..n]);
    }
    Ok(Hex32(*hasher.finalize().as_bytes()))
}

/// Disk space set aside for one version's fetch and staging while it runs, so that two
/// fetches at once do not both count the same free bytes. Given back on drop.
pub struct Reservation {
    reserved: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

const TAG_PREFIX: &str = "slmesh/";
/// Peers whose blob addresses are kept (the node's peer book holds as many), and
/// addresses per peer (as a have record carries at most).
pub const MAX_ADDR_BOOK: usize = 4096;
pub const MAX_ADDRS_PER_PEER: usize = slmesh_protocol::mesh::MAX_ADDRS;
/// Clients whose bytes sent are counted per blob before the count of clients no longer
/// connected is dropped.
const MAX_SENT_ENTRIES: usize = 16_384;

/// Bounded: a full book forgets one peer (the lowest id, deterministic) for a new one,
/// and keeps at most `MAX_ADDRS_PER_PEER` addresses each.
fn remember_addrs(map: &mut HashMap<NodeId, Vec<SocketAddr>>, node: NodeId, mut addrs: Vec<SocketAddr>) {
    addrs.truncate(MAX_ADDRS_PER_PEER);
    if !map.contains_key(&node) && map.len() >= MAX_ADDR_BOOK {
        if let Some(old) = map.keys().min().copied() {
            map.remove(&old);
        }
    }
    map.insert(node, addrs);
}

fn hash_of(h: &Hex32) -> Hash {
    Hash::from_bytes(h.0)
}

fn hex_of(h: &Hash) -> Hex32 {
    Hex32(*h.as_bytes())
}

fn tag_for(h: &Hex32) -> String {
    format!("{TAG_PREFIX}{}", h.to_hex())
}

impl BlobNode {
    pub async fn start(config: BlobConfig) -> Result<Self> {
        let bind_err = |reason: String| BlobError::Bind { addr: config.bind, reason };
        let endpoint = Endpoint::builder(presets::Minimal)
            .secret_key(config.secret.iroh_secret_key())
            .relay_mode(RelayMode::Disabled)
            .portmapper_config(PortmapperConfig::Disabled)
            .clear_address_lookup()
            .clear_ip_transports()
            .bind_addr(config.bind)
            .map_err(|e| bind_err(e.to_string()))?
            .alpns(vec![iroh_blobs::ALPN.to_vec()])
            .bind()
            .await
            .map_err(|e| bind_err(e.to_string()))?;
        std::fs::create_dir_all(&config.store_dir)
            .map_err(|e| BlobError::Store { path: config.store_dir.display().to_string(), reason: e.to_string() })?;
        let db_path = config.store_dir.join("blobs.db");
        let mut options = iroh_blobs::store::fs::options::Options::new(&config.store_dir);
        options.gc = Some(GcConfig { interval: config.gc_interval, add_protected: None });
        let paths = options.path.clone();
        let store = FsStore::load_with_opts(db_path, options)
            .await
            .map_err(|e| BlobError::Store { path: config.store_dir.display().to_string(), reason: e.to_string() })?;
        let counters = Arc::new(Counters::default());
        // Pacing asks about every 16 KiB chunk: only with a cap.
        let throttle =
            if config.max_upload_bytes_per_sec.is_some() { ThrottleMode::Intercept } else { ThrottleMode::None };
        // Every connection and every request kind is put to the gate; the node fetches
        // with `get` and `observe` only, so `get_many` (and `push`) are refused outright.
        let mask = EventMask {
            throttle,
            get: RequestMode::InterceptLog,
            get_many: RequestMode::Disabled,
            push: RequestMode::Disabled,
            observe: ObserveMode::Intercept,
            connected: ConnectMode::Intercept,
        };
        let (events, rx) = EventSender::channel(64, mask);
        tokio::spawn(provide::provider_events(
            rx,
            counters.clone(),
            config.max_upload_bytes_per_sec,
            config.gate,
            store.clone(),
        ));
        let router = Router::builder(endpoint.clone())
            .accept(iroh_blobs::ALPN, BlobsProtocol::new(&store, Some(events)))
            .spawn();
        Ok(BlobNode {
            endpoint,
            router,
            store,
            store_dir: config.store_dir,
            paths,
            addrs: Mutex::new(HashMap::new()),
            counters,
            reserved: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn id(&self) -> NodeId {
        NodeId::from_endpoint_id(&self.endpoint.id())
    }

    /// The sockets the endpoint listens on, as peers should dial them. An unspecified
    /// bind address (0.0.0.0) is not dialable; the caller replaces it with the addresses
    /// it knows for this host.
    pub fn bound_addrs(&self) -> Vec<SocketAddr> {
        self.endpoint.bound_sockets()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Remembers where a peer's blob endpoint listens (learned over the mesh).
    pub fn learn(&self, node: NodeId, addrs: Vec<SocketAddr>) {
        if let Ok(mut map) = self.addrs.lock() {
            remember_addrs(&mut map, node, addrs);
        }
    }

    /// Adds a local file to the store (protected from GC by a tag) and checks that its
    /// BLAKE3 hash is the expected one.
    pub async fn import(&self, path: &Path, expected: &Hex32) -> Result<()> {
        let import_err = |reason: String| BlobError::Import { path: path.display().to_string(), reason };
        self.protect(expected).await?;
        let tag = self.store.add_path(path).temp_tag().await.map_err(|e| import_err(e.to_string()))?;
        let got = hex_of(&tag.hash());
        if &got != expected {
            return Err(BlobError::HashMismatch {
                path: path.display().to_string(),
                got: got.to_hex(),
                want: expected.to_hex(),
            });
        }
        Ok(())
    }

    /// Tags a blob so that garbage collection keeps it (also while it is being fetched).
    pub async fn protect(&self, hash: &Hex32) -> Result<()> {
        self.store.tags().set(tag_for(hash), hash_of(hash)).await.map_err(|e| BlobError::StoreOp(e.to_string()))
    }

    /// Removes the protection of every blob not in `keep`; the store's GC deletes them.
    /// Returns the blobs released.
    pub async fn release_all_but(&self, keep: &[Hex32]) -> Result<Vec<Hex32>> {
        let tags = self.store.tags().list_prefix(TAG_PREFIX).await.map_err(|e| BlobError::StoreOp(e.to_string()))?;
        let tags: Vec<_> = tags.collect::<Vec<_>>().await;
        let mut released = vec![];
        for tag in tags {
            let tag = tag.map_err(|e| BlobError::StoreOp(e.to_string()))?;
            let hash = hex_of(&tag.hash);
            if !keep.contains(&hash) {
                self.store.tags().delete(&tag.name).await.map_err(|e| BlobError::StoreOp(e.to_string()))?;
                released.push(hash);
            }
        }
        Ok(released)
    }

    pub async fn is_complete(&self, hash: &Hex32) -> Result<bool> {
        let status = self.store.blobs().status(hash_of(hash)).await.map_err(|e| BlobError::StoreOp(e.to_string()))?;
        Ok(matches!(status, BlobStatus::Complete { .. }))
    }

    /// Bytes of `hash` held locally and verified.
    pub async fn local_bytes(&self, hash: &Hex32) -> Result<u64> {
        let local = self.store.remote().local(hash_of(hash)).await.map_err(|e| BlobError::StoreOp(e.to_string()))?;
        Ok(local.local_bytes())
    }

    /// A blob connection to a peer whose address was learned over the mesh.
    async fn connect_to(&self, provider: &NodeId) -> Result<iroh::endpoint::Connection, String> {
        let id = provider.endpoint_id().map_err(|e| e.to_string())?;
        let addrs = self.addrs.lock().map_err(|_| "address book poisoned".to_string())?.get(provider).cloned();
        let addrs = addrs.ok_or_else(|| "its blob address is not known yet".to_string())?;
        let addr = addrs.into_iter().fold(EndpointAddr::new(id), |a, s| a.with_ip_addr(s));
        tokio::time::timeout(Duration::from_secs(10), self.endpoint.connect(addr, iroh_blobs::ALPN))
            .await
            .map_err(|_| "connection timed out".to_string())?
            .map_err(|e| format!("cannot connect: {e}"))
    }

    /// Sets aside the disk space a version needs: what its blobs still miss in the store,
    /// plus a staged copy of each (`files`: hash and size) unless staging into
    /// `stage_dir` can link to the store's files (same file system), on top of what other
    /// running fetches have set aside. Refuses, before any byte is fetched, when it does
    /// not fit.
    pub async fn reserve_space(&self, files: &[(Hex32, u64)], stage_dir: &Path) -> Result<Reservation> {
        let copies = !self.can_link_into(stage_dir);
        let mut needed: u64 = 0;
        for (hash, size) in files {
            let missing = size.saturating_sub(self.local_bytes(hash).await?);
            // The outboard (about 1/256 of the data), and the staged copy if there is one.
            let copy = if copies { *size } else { 0 };
            needed = needed.saturating_add(missing.saturating_add(missing / 128)).saturating_add(copy);
        }
        let available = fs2::available_space(&self.store_dir).map_err(|e| BlobError::StoreOp(e.to_string()))?;
        // The database and logs keep a margin.
        let with_margin = needed.saturating_add(16 << 20);
        // Conservative: what other fetches wrote already is both gone from `available`
        // and still in their reservations.
        let reserved = self.reserved.fetch_add(needed, Ordering::SeqCst);
        let reservation = Reservation { reserved: self.reserved.clone(), bytes: needed };
        if available.saturating_sub(reserved) < with_margin {
            return Err(BlobError::NoRoom {
                path: self.store_dir.display().to_string(),
                needed: with_margin,
                available,
                reserved,
            });
        }
        Ok(reservation)
    }

    fn check_disk_space(&self, hash: &Hex32, needed: u64) -> Result<()> {
        let available = fs2::available_space(&self.store_dir).map_err(|e| BlobError::StoreOp(e.to_string()))?;
        // Keep a margin for the outboard (about 1/256 of the data) and the database.
        let needed_with_margin = needed + needed / 128 + (16 << 20);
        if available < needed_with_margin {
            return Err(BlobError::DiskFull {
                path: self.store_dir.display().to_string(),
                hash: hash.to_hex(),
                needed: needed_with_margin,
                available,
            });
        }
        Ok(())
    }

    /// Whether files staged into `dir` can be hard links to the store's own files: the
    /// same file system (and a store whose data folder exists).
    pub fn can_link_into(&self, dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        // The folder may not exist yet: its nearest existing ancestor decides.
        let existing = dir.ancestors().find(|a| a.exists());
        let device = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        match (existing.and_then(device), device(&self.paths.data_path)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }

    /// Puts a complete blob's bytes at `target` (which must not exist): a hard link to the
    /// file the store keeps them in where it can, so the model is on disk once (the store
    /// serves from it and the engine loads it, and either may delete its name without
    /// harming the other: the store's complete files are never written again); else a
    /// copy. A link is checked against the hash before it is kept.
    pub async fn stage(&self, hash: &Hex32, size: u64, target: &Path) -> Result<Staged> {
        let source = self.paths.data_path(&hash_of(hash));
        let same_size = std::fs::metadata(&source).is_ok_and(|m| m.len() == size);
        if same_size && std::fs::hard_link(&source, target).is_ok() {
            let (check, expected) = (target.to_path_buf(), *hash);
            let matches = tokio::task::spawn_blocking(move || file_hash(&check).is_ok_and(|h| h == expected))
                .await
                .unwrap_or(false);
            if matches {
                return Ok(Staged::Linked);
            }
            tracing::warn!(hash = %hash.to_hex(), "the store's file does not hold the blob's bytes; copying instead");
            let _ = std::fs::remove_file(target);
        }
        self.export(hash, target).await?;
        Ok(Staged::Copied)
    }

    /// Writes a complete blob to `target` as a copy.
    pub async fn export(&self, hash: &Hex32, target: &Path) -> Result<()> {
        let export_err =
            |reason: String| BlobError::Export { hash: hash.to_hex(), path: target.display().to_string(), reason };
        // The store refuses relative targets.
        let target = std::path::absolute(target).map_err(|e| export_err(e.to_string()))?;
        self.store
            .blobs()
            .export_with_opts(ExportOptions { hash: hash_of(hash), mode: ExportMode::Copy, target })
            .finish()
            .await
            .map_err(|e| export_err(e.to_string()))?;
        Ok(())
    }

    /// Stops serving and closes the store (the router's shutdown closes both), so that
    /// what the store holds is on disk. Other holders of the node (fetch jobs, the HTTP
    /// API) may still exist: later calls fail cleanly, the store is closed either way.
    pub async fn shutdown(&self) {
        if let Err(e) = self.router.shutdown().await {
            tracing::warn!("blob endpoint shutdown: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slmesh_protocol::identity::{KeyKind, SecretKey};

    #[test]
    fn the_address_book_is_bounded_in_peers_and_addresses() {
        let mut map = HashMap::new();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for i in 0..(MAX_ADDR_BOOK + 10) as u64 {
            let mut seed = [1u8; 32];
            seed[..8].copy_from_slice(&i.to_le_bytes());
            let node = SecretKey::from_seed(KeyKind::Node, seed).public();
            remember_addrs(&mut map, node, vec![addr; 100]);
            assert!(map.len() <= MAX_ADDR_BOOK);
            assert!(map[&node].len() <= MAX_ADDRS_PER_PEER, "the newest peer is kept, its addresses capped");
        }
        assert_eq!(map.len(), MAX_ADDR_BOOK);
    }
}
