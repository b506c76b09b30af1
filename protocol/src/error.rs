//! Typed errors of the protocol core. Each says what was wrong, and where it helps, what
//! to do about it.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    Oversize { len: usize, max: usize },

    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },

    #[error("unknown protocol version {got} (this node speaks version {supported})")]
    UnknownProtocolVersion { got: u16, supported: u16 },

    #[error(
        "signed by unknown key {key}: add it under [trust] publishers in the config if it is an operator of this fleet"
    )]
    UnknownKey { key: String },

    #[error("bad signature on {what}: the signed bytes were altered or signed by another key")]
    BadSignature { what: &'static str },

    #[error("manifest {name} version {offered} is not newer than version {held} already held (replay or downgrade)")]
    NotNewer { name: String, offered: u64, held: u64 },

    #[error("certificate for node {node} expired at unix time {expires_at} (now {now}): enroll the node again")]
    CertificateExpired { node: String, expires_at: u64, now: u64 },

    #[error("certificate for node {node} is not valid before unix time {not_before} (now {now}): check the clocks")]
    CertificateNotYetValid { node: String, not_before: u64, now: u64 },

    #[error("certificate is for node {certified}, but was presented by node {presented}")]
    CertificateSubjectMismatch { certified: String, presented: String },

    #[error("no variant of {name} fits this node: {reasons}")]
    NoVariantFits { name: String, reasons: String },

    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },

    #[error("{what} is for fleet {theirs:?}, this node is in fleet {mine:?}")]
    OtherFleet { what: &'static str, theirs: String, mine: String },
}

impl ProtocolError {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        ProtocolError::Invalid { what, reason: reason.into() }
    }
}
