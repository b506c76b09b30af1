//! Node and publisher identity: one ed25519 key each.
//!
//! A node's key is at once its slmesh node id, its libp2p `PeerId` and its iroh
//! `EndpointId`; the conversions live here so that every part of the node agrees.
//! Key files are small text files, readable by their owner only.

use crate::hex32::Hex32;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use thiserror::Error;

pub use libp2p_identity::PeerId;

/// What a secret key is for. Stored in the key file so that a node key is never taken
/// for a publisher key by mistake, or the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Node,
    Publisher,
}

impl KeyKind {
    fn label(self) -> &'static str {
        match self {
            KeyKind::Node => "slmesh-node-secret-key-v1",
            KeyKind::Publisher => "slmesh-publisher-secret-key-v1",
        }
    }
    fn from_label(s: &str) -> Option<Self> {
        [KeyKind::Node, KeyKind::Publisher].into_iter().find(|k| k.label() == s)
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Node => "node",
            KeyKind::Publisher => "publisher",
        })
    }
}

/// An ed25519 public key: a node id or a publisher key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PublicKey(pub Hex32);

/// A node is named by its public key.
pub type NodeId = PublicKey;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a valid ed25519 public key")]
    InvalidPublicKey,
    #[error("cannot convert libp2p peer id {0} to a node id: not an ed25519 identity")]
    NotEd25519PeerId(String),
}

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(Hex32(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0 .0
    }

    /// The first 10 hex characters: enough to tell nodes apart in logs.
    pub fn short(&self) -> String {
        self.0.to_hex()[..10].to_string()
    }

    pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        VerifyingKey::from_bytes(self.as_bytes()).map_err(|_| KeyError::InvalidPublicKey)
    }

    /// The libp2p `PeerId` of this key.
    pub fn peer_id(&self) -> Result<libp2p_identity::PeerId, KeyError> {
        let ed = libp2p_identity::ed25519::PublicKey::try_from_bytes(self.as_bytes())
            .map_err(|_| KeyError::InvalidPublicKey)?;
        Ok(libp2p_identity::PublicKey::from(ed).to_peer_id())
    }

    /// The iroh `EndpointId` of this key.
    pub fn endpoint_id(&self) -> Result<iroh_base::EndpointId, KeyError> {
        iroh_base::PublicKey::from_bytes(self.as_bytes()).map_err(|_| KeyError::InvalidPublicKey)
    }

    /// Recovers the key behind a libp2p `PeerId` (ed25519 peer ids inline the key).
    pub fn from_peer_id(peer: &libp2p_identity::PeerId) -> Result<Self, KeyError> {
        let not_ed = || KeyError::NotEd25519PeerId(peer.to_base58());
        let key = libp2p_identity::PublicKey::try_decode_protobuf(peer.as_ref().digest()).map_err(|_| not_ed())?;
        let ed = key.try_into_ed25519().map_err(|_| not_ed())?;
        Ok(PublicKey::from_bytes(ed.to_bytes()))
    }

    pub fn from_endpoint_id(id: &iroh_base::EndpointId) -> Self {
        PublicKey::from_bytes(*id.as_bytes())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl FromStr for PublicKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let key = PublicKey(Hex32::from_str(s)?);
        key.verifying_key().map_err(|e| e.to_string())?;
        Ok(key)
    }
}

/// A secret key of a node or a publisher.
#[derive(Clone)]
pub struct SecretKey {
    kind: KeyKind,
    key: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, {})", self.kind, self.public().short())
    }
}

#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("key file {path} has mode {mode:04o}, but a secret key must be readable by its owner only: run `chmod 600 {path}`")]
    WrongMode { path: PathBuf, mode: u32 },
    #[error("key file {path} is truncated or damaged: {reason}")]
    Truncated { path: PathBuf, reason: String },
    #[error("{path} is not an slmesh key file (expected a line starting with `slmesh-…-secret-key-v1`)")]
    Foreign { path: PathBuf },
    #[error("{path} holds a {found} key, but a {expected} key is needed here")]
    WrongKind { path: PathBuf, expected: KeyKind, found: KeyKind },
    #[error("key file {path} already exists: refusing to overwrite a key (move it away first)")]
    Exists { path: PathBuf },
    #[error("cannot {action} key file {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
}

/// Longer than any key file we write; a bigger file is not ours.
const MAX_KEY_FILE_BYTES: u64 = 4096;

impl SecretKey {
    pub fn generate(kind: KeyKind) -> Self {
        SecretKey { kind, key: SigningKey::generate(&mut rand_core::OsRng) }
    }

    pub fn from_seed(kind: KeyKind, seed: [u8; 32]) -> Self {
        SecretKey { kind, key: SigningKey::from_bytes(&seed) }
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    pub fn public(&self) -> PublicKey {
        PublicKey::from_bytes(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        self.key.sign(message)
    }

    /// The same key as a libp2p identity.
    pub fn libp2p_keypair(&self) -> libp2p_identity::Keypair {
        // ed25519_from_bytes zeroises its argument: hand it a copy.
        let mut seed = self.key.to_bytes();
        libp2p_identity::Keypair::ed25519_from_bytes(&mut seed).expect("a 32-byte seed is always a valid ed25519 key")
    }

    /// The same key as an iroh endpoint key.
    pub fn iroh_secret_key(&self) -> iroh_base::SecretKey {
        iroh_base::SecretKey::from_bytes(&self.key.to_bytes())
    }

    fn to_file_text(&self) -> String {
        format!(
            "# slmesh {} secret key. Keep it private: mode 0600, never copied off this machine.\n# public key: {}\n{} {}\n",
            self.kind,
            self.public(),
            self.kind.label(),
            hex::encode(self.key.to_bytes())
        )
    }

    /// Parses the text of a key file. `path` is only for error messages.
    pub fn parse_file_text(text: &str, expected: KeyKind, path: &Path) -> Result<Self, KeyFileError> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        let line = lines
            .next()
            .ok_or_else(|| KeyFileError::Truncated { path: path.to_path_buf(), reason: "no key line".into() })?;
        let (label, hex_seed) = line.split_once(' ').unwrap_or((line, ""));
        let found = KeyKind::from_label(label).ok_or_else(|| KeyFileError::Foreign { path: path.to_path_buf() })?;
        if found != expected {
            return Err(KeyFileError::WrongKind { path: path.to_path_buf(), expected, found });
        }
        let hex_seed = hex_seed.trim();
        if hex_seed.len() != 64 {
            return Err(KeyFileError::Truncated {
                path: path.to_path_buf(),
                reason: format!("expected 64 hex characters of key, found {}", hex_seed.len()),
            });
        }
        let mut seed = [0u8; 32];
        hex::decode_to_slice(hex_seed, &mut seed).map_err(|e| KeyFileError::Truncated {
            path: path.to_path_buf(),
            reason: format!("key is not hex: {e}"),
        })?;
        if lines.next().is_some() {
            return Err(KeyFileError::Foreign { path: path.to_path_buf() });
        }
        Ok(SecretKey::from_seed(found, seed))
    }

    /// Writes the key with mode 0600, atomically (temporary file, fsync, rename). Never
    /// overwrites an existing key.
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        let io = |action, source| KeyFileError::Io { action, path: path.to_path_buf(), source };
        if path.exists() {
            return Err(KeyFileError::Exists { path: path.to_path_buf() });
        }
        let tmp = path.with_extension("tmp-key");
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(&tmp).map_err(|e| io("create", e))?;
        file.write_all(self.to_file_text().as_bytes()).map_err(|e| io("write", e))?;
        file.sync_all().map_err(|e| io("sync", e))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| io("rename", e))?;
        Ok(())
    }

    /// Loads a key file, refusing one that others can read or write.
    pub fn load(path: &Path, expected: KeyKind) -> Result<Self, KeyFileError> {
        let io = |action, source| KeyFileError::Io { action, path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(|e| io("open", e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::WrongMode { path: path.to_path_buf(), mode });
            }
        }
        if meta.len() > MAX_KEY_FILE_BYTES {
            return Err(KeyFileError::Foreign { path: path.to_path_buf() });
        }
        let bytes = std::fs::read(path).map_err(|e| io("read", e))?;
        let text = String::from_utf8(bytes).map_err(|_| KeyFileError::Foreign { path: path.to_path_buf() })?;
        Self::parse_file_text(&text, expected, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libp2p_and_iroh_see_the_same_key() {
        let key = SecretKey::generate(KeyKind::Node);
        let id = key.public();
        // libp2p side: the keypair built from our seed has our PeerId.
        let kp = key.libp2p_keypair();
        assert_eq!(kp.public().to_peer_id(), id.peer_id().unwrap());
        // iroh side: the secret key built from our seed has our EndpointId.
        assert_eq!(key.iroh_secret_key().public(), id.endpoint_id().unwrap());
        // And across: PeerId -> node id -> EndpointId round-trips.
        let back = PublicKey::from_peer_id(&kp.public().to_peer_id()).unwrap();
        assert_eq!(back, id);
        assert_eq!(back.endpoint_id().unwrap().as_bytes(), id.as_bytes());
        assert_eq!(PublicKey::from_endpoint_id(&id.endpoint_id().unwrap()), id);
    }

    #[test]
    fn non_ed25519_peer_id_is_refused() {
        // An RSA-era peer id: a SHA-256 multihash, not an inlined ed25519 key.
        let peer: libp2p_identity::PeerId = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N".parse().unwrap();
        assert!(matches!(PublicKey::from_peer_id(&peer), Err(KeyError::NotEd25519PeerId(_))));
    }

    #[test]
    fn save_and_load_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let key = SecretKey::generate(KeyKind::Node);
        key.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let loaded = SecretKey::load(&path, KeyKind::Node).unwrap();
        assert_eq!(loaded.public(), key.public());
        assert!(matches!(key.save(&path), Err(KeyFileError::Exists { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn key_file_with_mode_0644_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        SecretKey::generate(KeyKind::Node).save(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretKey::load(&path, KeyKind::Node).unwrap_err();
        assert!(matches!(err, KeyFileError::WrongMode { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
    }

    fn write_0600(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }

    #[test]
    fn truncated_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let key = SecretKey::generate(KeyKind::Node);
        let text = key.to_file_text();
        write_0600(&path, &text.as_bytes()[..text.len() - 20]);
        assert!(matches!(SecretKey::load(&path, KeyKind::Node), Err(KeyFileError::Truncated { .. })));
        write_0600(&path, b"");
        assert!(matches!(SecretKey::load(&path, KeyKind::Node), Err(KeyFileError::Truncated { .. })));
    }

    #[test]
    fn foreign_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_ed25519");
        write_0600(&path, b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n");
        assert!(matches!(SecretKey::load(&path, KeyKind::Node), Err(KeyFileError::Foreign { .. })));
        write_0600(&path, &[0xff, 0xfe, 0x00, 0x89]);
        assert!(matches!(SecretKey::load(&path, KeyKind::Node), Err(KeyFileError::Foreign { .. })));
        write_0600(&path, &vec![b'a'; 10_000]);
        assert!(matches!(SecretKey::load(&path, KeyKind::Node), Err(KeyFileError::Foreign { .. })));
    }

    #[test]
    fn publisher_key_is_not_a_node_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("publisher.key");
        SecretKey::generate(KeyKind::Publisher).save(&path).unwrap();
        assert!(matches!(
            SecretKey::load(&path, KeyKind::Node),
            Err(KeyFileError::WrongKind { expected: KeyKind::Node, found: KeyKind::Publisher, .. })
        ));
    }
}
