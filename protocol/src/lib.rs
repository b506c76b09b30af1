//! The sans-IO core of slmesh.
//!
//! Everything that decides lives here: wire types and their encoding, signatures,
//! identity, trust and enrollment, manifests and their validation, variant choice,
//! cohorts and waves, fleet metrics and the rollout engine, piece swarming, and the GGUF header reader. Nothing here reads a clock or opens
//! a socket: callers pass `now` and bytes in, and get decisions and bytes out. The
//! node and the simulator drive the very same code.

pub mod cohort;
pub mod error;
pub mod eval;
pub mod fleet;
pub mod gguf;
pub mod hex32;
pub mod history;
pub mod identity;
pub mod manifest;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod panel;
pub mod revocation;
pub mod rollout;
pub mod select;
pub mod shadow;
pub mod signed;
pub mod sketch;
pub mod swarm;
pub mod trust;
pub mod wire;

pub use error::ProtocolError;
pub use hex32::Hex32;
pub use identity::{KeyKind, NodeId, SecretKey};
pub use manifest::{ModelManifest, SignedManifest, VerifiedManifest};
pub use trust::{EnrollmentCertificate, TrustStore};

/// The protocol version every wire message carries. A receiver rejects any other.
pub const PROTOCOL_VERSION: u16 = 1;

/// Upper bound on any single wire message. Manifests and certificates are a few KiB;
/// this leaves room for metrics records with sketches, and bounds what a peer can make
/// us allocate.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Every decoder of untrusted bytes in this crate, by name. Tests and fuzz targets run
/// them all, so a new message type is covered as soon as it is listed here.
#[doc(hidden)]
pub mod decoders {
    use crate::{gguf, identity, manifest, signed::Signed, trust};

    pub type Decoder = fn(&[u8]) -> bool;

    pub const ALL: &[(&str, Decoder)] = &[
        ("signed_manifest", |b| manifest::SignedManifest::from_bytes(b).is_ok()),
        ("manifest_body", |b| crate::wire::decode::<manifest::ModelManifest>(b, "manifest").is_ok()),
        ("enrollment_certificate", |b| trust::EnrollmentCertificate::from_bytes(b).is_ok()),
        ("enrollment_body", |b| crate::wire::decode::<trust::Enrollment>(b, "enrollment").is_ok()),
        ("verify_manifest", |b| manifest::verify_manifest(b, &trust::TrustStore::new(), |_| None).is_ok()),
        ("gguf_header", |b| gguf::read_header_from_slice(b).is_ok()),
        ("key_file", |b| {
            let text = String::from_utf8_lossy(b);
            identity::SecretKey::parse_file_text(&text, identity::KeyKind::Node, "fuzz".as_ref()).is_ok()
        }),
        ("hello", |b| crate::mesh::Hello::from_bytes(b).is_ok()),
        ("signed_have", |b| crate::mesh::SignedHave::from_bytes(b).and_then(|s| crate::mesh::verify_have(&s)).is_ok()),
        ("manifest_digest", |b| crate::mesh::ManifestDigest::from_bytes(b).is_ok()),
        ("peer_request", |b| crate::mesh::PeerRequest::from_bytes(b).is_ok()),
        ("peer_response", |b| crate::mesh::PeerResponse::from_bytes(b).is_ok()),
        ("signed_metrics", |b| {
            let trust = trust::TrustStore::new();
            crate::fleet::MetricsMessage::from_bytes(b)
                .and_then(|m| match &m.certificate {
                    Some(c) => crate::fleet::verify_metrics(&m.record, c, &trust, trust::DEFAULT_FLEET, 0).map(|_| ()),
                    // Without one, the record's signature and body are still checked.
                    None => m.record.verify_self_signed().map(|_| ()),
                })
                .is_ok()
        }),
        ("signed_command", |b| crate::fleet::SignedCommand::from_bytes(b).and_then(|s| s.verify_self_signed()).is_ok()),
        ("signed_revocation", |b| {
            let trust = trust::TrustStore::new();
            crate::revocation::SignedRevocation::from_bytes(b)
                .and_then(|s| crate::revocation::verify_revocation(&s, &trust))
                .is_ok()
        }),
        ("signed_open", |b| {
            Signed::<manifest::ModelManifest>::from_bytes(b).and_then(|s| s.verify_self_signed()).is_ok()
        }),
    ];
}
