//! Node state in sled: accepted manifests, the active and previous version of each
//! model, per-version rollout records, operator commands and revocations, and the peer
//! book. The
//! node state machine (`slmesh_protocol::node`) decides every change; this crate makes
//! it durable and reads it back on start.
//!
//! Each change is one write, flushed by the caller in the order the state machine made
//! them (a manifest before the model state that names its version), so a crash leaves a
//! prefix of them. A schema version is stored on first open and checked
//! on every open after.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use slmesh_protocol::fleet::SignedCommand;
use slmesh_protocol::manifest::SignedManifest;
use slmesh_protocol::node::VersionRecord;
use slmesh_protocol::revocation::SignedRevocation;
use slmesh_protocol::trust::Tags;
use slmesh_protocol::{wire, NodeId, ProtocolError};
use std::path::Path;
use thiserror::Error;

/// Bump when the layout of stored values changes; `open` refuses other versions.
// 2: manifests carry an evaluation suite, version records and reports its counts.
// 3: rollout plans may carry an agreement gate; gate figures hold agreement; suites may
// compare with the previous version, and evaluation counts hold its result.
pub const SCHEMA_VERSION: u32 = 3;
const SCHEMA_KEY: &[u8] = b"schema_version";
const ORIGINATED_KEY: &[u8] = b"originated";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state database: {0}")]
    Sled(#[from] sled::Error),
    #[error("the state database in {path} is locked: is another slmesh node running on this data folder?")]
    Locked { path: String },
    #[error("state database at {path} has schema version {found}, this slmesh needs {expected}: use a matching slmesh, or move the folder away to start afresh")]
    SchemaMismatch { path: String, found: u32, expected: u32 },
    #[error("state database holds a damaged {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Refused(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub use slmesh_protocol::node::ModelState;

/// What a node knows of a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub node: NodeId,
    pub addrs: Vec<String>,
    pub tags: Tags,
    /// Unix seconds.
    pub last_seen: u64,
    pub rtt_micros: Option<u64>,
}

pub struct Store {
    db: sled::Db,
    path: String,
    meta: sled::Tree,
    manifests: sled::Tree,
    models: sled::Tree,
    /// Per version, the state machine's record (rollout progress, activation failures).
    versions: sled::Tree,
    /// Operator commands, keyed by the BLAKE3 of their bytes.
    commands: sled::Tree,
    /// Revocations, keyed by the BLAKE3 of their bytes.
    revocations: sled::Tree,
    peers: sled::Tree,
    /// The rollout history, keyed by a big-endian id that grows with every event.
    events: sled::Tree,
}

fn manifest_key(name: &str, version: u64) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn split_manifest_key(k: &[u8]) -> Option<(String, u64)> {
    let (name, version) = k.split_at_checked(k.len().checked_sub(9)?)?;
    let version: [u8; 8] = version.get(1..)?.try_into().ok()?;
    Some((String::from_utf8(name.to_vec()).ok()?, u64::from_be_bytes(version)))
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T> {
    wire::decode(bytes, what).map_err(|e| StoreError::Corrupt { what, reason: e.to_string() })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    Ok(wire::encode(value)?)
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<StoreError>>;

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn tx_model(models: &TransactionalTree, name: &str) -> TxResult<ModelState> {
    match models.get(name.as_bytes())? {
        Some(b) => decode(&b, "model state").or_else(abort),
        None => Ok(ModelState::default()),
    }
}

fn tx_put<T: Serialize>(tree: &TransactionalTree, key: &[u8], value: &T) -> TxResult<()> {
    let bytes = encode(value).or_else(abort)?;
    tree.insert(key, bytes)?;
    Ok(())
}

fn unwrap_tx<T>(r: std::result::Result<T, TransactionError<StoreError>>) -> Result<T> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    })
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        // sled releases its file lock from a background thread after the last handle is
        // dropped: a store reopened at once (a restart in the same process) may find it
        // still held for a moment. Another process holding it is an error.
        let mut attempts = 0;
        let db = loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => break db,
                // sled 0.34 reports a held lock only in the message of an `Other` error.
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    attempts += 1;
                    if attempts == 40 {
                        return Err(StoreError::Locked { path: path.display().to_string() });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let store = Store {
            path: path.display().to_string(),
            meta: db.open_tree("meta")?,
            manifests: db.open_tree("manifests")?,
            revocations: db.open_tree("revocations")?,
            models: db.open_tree("models")?,
            versions: db.open_tree("versions")?,
            commands: db.open_tree("commands")?,
            peers: db.open_tree("peers")?,
            events: db.open_tree("events")?,
            db,
        };
        store.check_schema()?;
        Ok(store)
    }

    fn check_schema(&self) -> Result<()> {
        let stored =
            self.meta.compare_and_swap(SCHEMA_KEY, None as Option<&[u8]>, Some(&SCHEMA_VERSION.to_le_bytes()[..]))?;
        let found = match stored {
            Ok(()) => {
                self.db.flush()?;
                return Ok(());
            }
            Err(cas) => cas.current.ok_or_else(|| StoreError::Corrupt {
                what: "schema version",
                reason: "vanished while opening".into(),
            })?,
        };
        let found: [u8; 4] = found
            .as_ref()
            .try_into()
            .map_err(|_| StoreError::Corrupt { what: "schema version", reason: format!("{} bytes", found.len()) })?;
        let found = u32::from_le_bytes(found);
        if found != SCHEMA_VERSION {
            return Err(StoreError::SchemaMismatch { path: self.path.clone(), found, expected: SCHEMA_VERSION });
        }
        Ok(())
    }

    /// Makes every change so far durable.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    pub fn model(&self, name: &str) -> Result<Option<ModelState>> {
        self.models.get(name.as_bytes())?.map(|b| decode(&b, "model state")).transpose()
    }

    pub fn models(&self) -> Result<Vec<(String, ModelState)>> {
        self.models
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let name = String::from_utf8(k.to_vec())
                    .map_err(|_| StoreError::Corrupt { what: "model name", reason: "not UTF-8".into() })?;
                Ok((name, decode(&v, "model state")?))
            })
            .collect()
    }

    pub fn manifest(&self, name: &str, version: u64) -> Result<Option<SignedManifest>> {
        self.manifests
            .get(manifest_key(name, version))?
            .map(|b| {
                SignedManifest::from_bytes(&b)
                    .map_err(|e| StoreError::Corrupt { what: "manifest", reason: e.to_string() })
            })
            .transpose()
    }

    /// Every (name, version) with a stored manifest, in order.
    pub fn manifest_versions(&self) -> Result<Vec<(String, u64)>> {
        self.manifests
            .iter()
            .keys()
            .map(|k| {
                split_manifest_key(&k?).ok_or(StoreError::Corrupt { what: "manifest key", reason: "bad layout".into() })
            })
            .collect()
    }

    pub fn set_pin(&self, name: &str, pinned: Option<u64>) -> Result<()> {
        unwrap_tx(self.models.transaction(|models| {
            let mut state = tx_model(models, name)?;
            state.pinned = pinned;
            tx_put(models, name.as_bytes(), &state)
        }))?;
        self.flush()
    }

    /// Records a manifest the state machine accepted (it checked it is newer).
    pub fn put_signed_manifest(&self, name: &str, version: u64, signed: &SignedManifest) -> Result<()> {
        self.manifests.insert(manifest_key(name, version), signed.to_bytes()?)?;
        Ok(())
    }

    /// Every stored manifest; damaged ones are skipped and reported.
    pub fn manifests(&self) -> Result<(Vec<SignedManifest>, Vec<String>)> {
        let (mut good, mut bad) = (vec![], vec![]);
        for kv in self.manifests.iter() {
            let (k, v) = kv?;
            match SignedManifest::from_bytes(&v) {
                Ok(m) => good.push(m),
                Err(e) => bad.push(format!("{:?}: {e}", split_manifest_key(&k))),
            }
        }
        Ok((good, bad))
    }

    pub fn put_model(&self, name: &str, state: &ModelState) -> Result<()> {
        self.models.insert(name.as_bytes(), encode(state)?)?;
        Ok(())
    }

    pub fn put_version(&self, name: &str, version: u64, record: &VersionRecord) -> Result<()> {
        self.versions.insert(manifest_key(name, version), encode(record)?)?;
        Ok(())
    }

    pub fn versions(&self) -> Result<Vec<((String, u64), VersionRecord)>> {
        self.versions
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let key = split_manifest_key(&k)
                    .ok_or(StoreError::Corrupt { what: "version key", reason: "bad layout".into() })?;
                Ok((key, decode(&v, "version record")?))
            })
            .collect()
    }

    pub fn put_command(&self, signed: &SignedCommand) -> Result<()> {
        self.commands.insert(signed.id()?, signed.to_bytes()?)?;
        Ok(())
    }

    pub fn commands(&self) -> Result<Vec<SignedCommand>> {
        self.commands
            .iter()
            .values()
            .map(|v| {
                SignedCommand::from_bytes(&v?)
                    .map_err(|e| StoreError::Corrupt { what: "operator command", reason: e.to_string() })
            })
            .collect()
    }

    /// Appends an event to the rollout history, dropping the oldest beyond `MAX_EVENTS`.
    pub fn put_event(&self, event: &slmesh_protocol::history::HistoryEvent) -> Result<()> {
        let id = self.db.generate_id()?;
        self.events.insert(id.to_be_bytes(), encode(event)?)?;
        while self.events.len() > slmesh_protocol::history::MAX_EVENTS {
            if self.events.pop_min()?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// The history, oldest first, and how many stored events could not be read (written
    /// by another version of slmesh): those are skipped, not an error.
    pub fn events(&self) -> Result<(Vec<slmesh_protocol::history::HistoryEvent>, usize)> {
        let (mut events, mut unreadable) = (Vec::new(), 0);
        for v in self.events.iter().values() {
            match decode(&v?, "history event") {
                Ok(e) => events.push(e),
                Err(_) => unreadable += 1,
            }
        }
        Ok((events, unreadable))
    }

    pub fn put_revocation(&self, signed: &SignedRevocation) -> Result<()> {
        self.revocations.insert(signed.id()?, signed.to_bytes()?)?;
        Ok(())
    }

    pub fn revocations(&self) -> Result<Vec<SignedRevocation>> {
        self.revocations
            .iter()
            .values()
            .map(|v| {
                SignedRevocation::from_bytes(&v?)
                    .map_err(|e| StoreError::Corrupt { what: "revocation", reason: e.to_string() })
            })
            .collect()
    }

    /// The blobs this node published (kept in the meta tree).
    pub fn put_originated(&self, blobs: &[slmesh_protocol::Hex32]) -> Result<()> {
        self.meta.insert(ORIGINATED_KEY, encode(&blobs)?)?;
        Ok(())
    }

    pub fn originated(&self) -> Result<Vec<slmesh_protocol::Hex32>> {
        Ok(self.meta.get(ORIGINATED_KEY)?.map(|b| decode(&b, "published blobs")).transpose()?.unwrap_or_default())
    }

    pub fn upsert_peer(&self, peer: &PeerRecord) -> Result<()> {
        self.peers.insert(peer.node.as_bytes(), encode(peer)?)?;
        Ok(())
    }

    pub fn peers(&self) -> Result<Vec<PeerRecord>> {
        self.peers.iter().values().map(|v| decode(&v?, "peer record")).collect()
    }

    pub fn remove_peer(&self, node: &NodeId) -> Result<()> {
        self.peers.remove(node.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
