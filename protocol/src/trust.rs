//! Trust: the publisher (operator) keys a node accepts, and enrollment certificates that
//! admit a node to the fleet.

use crate::error::ProtocolError;
use crate::identity::{NodeId, PublicKey};
use crate::signed::{Signed, SignedKind};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The operator keys this node trusts, with a name for each (for logs and errors).
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    keys: HashMap<PublicKey, (String, VerifyingKey)>,
}

impl TrustStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, name: impl Into<String>, key: PublicKey) -> Result<(), ProtocolError> {
        let vk = key
            .verifying_key()
            .map_err(|_| ProtocolError::invalid("publisher key", format!("{key} is not an ed25519 public key")))?;
        self.keys.insert(key, (name.into(), vk));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn name_of(&self, key: &PublicKey) -> Option<&str> {
        self.keys.get(key).map(|(n, _)| n.as_str())
    }

    /// Verifies a signed record: the signer must be trusted and the signature good.
    /// Returns the body and the name of the publisher that signed it.
    pub fn open<T: SignedKind>(&self, signed: &Signed<T>) -> Result<(T, String), ProtocolError> {
        let (name, vk) = self
            .keys
            .get(&signed.signer)
            .ok_or_else(|| ProtocolError::UnknownKey { key: signed.signer.to_string() })?;
        Ok((signed.verify_with(vk)?, name.clone()))
    }
}

/// Node tags, such as `site=berlin-1` and `class=gateway`. Sorted, so canonical.
pub type Tags = BTreeMap<String, String>;

/// What an operator certifies about a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub node: NodeId,
    pub tags: Tags,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; the certificate is invalid from this instant on.
    pub expires_at: u64,
    /// The fleet the node belongs to: a node admits only peers of its own fleet, and
    /// takes only manifests, commands and revocations addressed to it, so that one
    /// publisher key can serve several fleets (staging and production, say) without a
    /// message of one being valid in the other.
    #[serde(default = "default_fleet")]
    pub fleet: String,
}

/// The fleet of certificates, manifests and commands made without `--fleet`.
pub const DEFAULT_FLEET: &str = "default";

pub fn default_fleet() -> String {
    DEFAULT_FLEET.to_string()
}

/// Checks a fleet id: 1-64 of a-z, A-Z, 0-9, `-`, `_`, `.`.
pub fn validate_fleet(fleet: &str) -> Result<(), ProtocolError> {
    let ok =
        !fleet.is_empty() && fleet.len() <= 64 && fleet.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        return Err(ProtocolError::invalid("fleet id", format!("{fleet:?}: use 1-64 of a-z, A-Z, 0-9, - _ .")));
    }
    Ok(())
}

/// Checks that something addressed to fleet `theirs` may count in fleet `mine`.
pub fn same_fleet(what: &'static str, theirs: &str, mine: &str) -> Result<(), ProtocolError> {
    if theirs != mine {
        return Err(ProtocolError::OtherFleet { what, theirs: theirs.to_string(), mine: mine.to_string() });
    }
    Ok(())
}

impl SignedKind for Enrollment {
    const DOMAIN: &'static [u8] = b"slmesh/enrollment-certificate";
    const WHAT: &'static str = "enrollment certificate";
}

/// An operator's signature over a node's key and tags.
pub type EnrollmentCertificate = Signed<Enrollment>;

pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_LEN: usize = 128;

/// Checks tag keys and values: short, printable, no `=` in keys.
pub fn validate_tags(tags: &Tags) -> Result<(), ProtocolError> {
    if tags.len() > MAX_TAGS {
        return Err(ProtocolError::invalid("tags", format!("{} tags, at most {MAX_TAGS}", tags.len())));
    }
    for (k, v) in tags {
        validate_tag(k, v)?;
    }
    Ok(())
}

/// Checks one tag (or selector entry).
pub fn validate_tag(k: &str, v: &str) -> Result<(), ProtocolError> {
    let ok_key =
        !k.is_empty() && k.len() <= MAX_TAG_LEN && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok_key {
        return Err(ProtocolError::invalid("tags", format!("tag key {k:?}: use 1-{MAX_TAG_LEN} of a-z, 0-9, - _ .")));
    }
    if v.len() > MAX_TAG_LEN || v.chars().any(|c| c.is_control()) {
        return Err(ProtocolError::invalid(
            "tags",
            format!("tag value of {k:?} is too long or has control characters"),
        ));
    }
    Ok(())
}

/// Parses `key=value`.
pub fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("tag {s:?} is not of the form key=value"))?;
    Ok((k.trim().to_string(), v.trim().to_string()))
}

impl Enrollment {
    pub fn sign(&self, operator: &crate::identity::SecretKey) -> Result<EnrollmentCertificate, ProtocolError> {
        validate_tags(&self.tags)?;
        validate_fleet(&self.fleet)?;
        if self.expires_at <= self.issued_at {
            return Err(ProtocolError::invalid("enrollment", "expiry must come after issue time"));
        }
        Signed::sign(self, operator)
    }
}

/// Verifies a certificate presented by `presenter` at unix time `now`: signed by a
/// trusted operator, for that node, and in its validity window.
pub fn verify_certificate(
    cert: &EnrollmentCertificate,
    trust: &TrustStore,
    presenter: &NodeId,
    now: u64,
) -> Result<Enrollment, ProtocolError> {
    let (enrollment, _operator) = trust.open(cert)?;
    if &enrollment.node != presenter {
        return Err(ProtocolError::CertificateSubjectMismatch {
            certified: enrollment.node.short(),
            presented: presenter.short(),
        });
    }
    if now >= enrollment.expires_at {
        return Err(ProtocolError::CertificateExpired {
            node: enrollment.node.short(),
            expires_at: enrollment.expires_at,
            now,
        });
    }
    if now < enrollment.issued_at {
        return Err(ProtocolError::CertificateNotYetValid {
            node: enrollment.node.short(),
            not_before: enrollment.issued_at,
            now,
        });
    }
    validate_tags(&enrollment.tags)?;
    Ok(enrollment)
}

/// A certificate for `node` by `operator`, valid from 0 to 10^10 (tests).
#[cfg(test)]
pub(crate) fn test_certificate(
    node: &crate::identity::SecretKey,
    operator: &crate::identity::SecretKey,
) -> EnrollmentCertificate {
    let tags = [("site".to_string(), "a".to_string())].into();
    Enrollment { node: node.public(), tags, issued_at: 0, expires_at: 10_000_000_000, fleet: default_fleet() }
        .sign(operator)
        .expect("sign")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{KeyKind, SecretKey};

    fn setup() -> (SecretKey, TrustStore, SecretKey, Enrollment) {
        let operator = SecretKey::generate(KeyKind::Publisher);
        let mut trust = TrustStore::new();
        trust.add("ops", operator.public()).unwrap();
        let node = SecretKey::generate(KeyKind::Node);
        let enrollment = Enrollment {
            node: node.public(),
            tags: [("site".to_string(), "berlin".to_string()), ("class".into(), "gateway".into())].into(),
            issued_at: 1_000,
            expires_at: 2_000,
            fleet: default_fleet(),
        };
        (operator, trust, node, enrollment)
    }

    #[test]
    fn valid_certificate_is_accepted() {
        let (operator, trust, node, enrollment) = setup();
        let cert = enrollment.sign(&operator).unwrap();
        let bytes = cert.to_bytes().unwrap();
        let cert = EnrollmentCertificate::from_bytes(&bytes).unwrap();
        assert_eq!(verify_certificate(&cert, &trust, &node.public(), 1_500).unwrap(), enrollment);
    }

    #[test]
    fn certificate_signed_by_non_operator_is_refused() {
        let (_operator, trust, node, enrollment) = setup();
        let stranger = SecretKey::generate(KeyKind::Publisher);
        let cert = enrollment.sign(&stranger).unwrap();
        assert!(matches!(
            verify_certificate(&cert, &trust, &node.public(), 1_500),
            Err(ProtocolError::UnknownKey { .. })
        ));
        // A node signing its own certificate is no better.
        let cert = Signed::sign(&enrollment, &SecretKey::from_seed(KeyKind::Publisher, [7; 32])).unwrap();
        assert!(verify_certificate(&cert, &trust, &node.public(), 1_500).is_err());
    }

    #[test]
    fn forged_signer_field_is_refused() {
        // Signed by a stranger, but claiming to be from the operator.
        let (operator, trust, node, enrollment) = setup();
        let stranger = SecretKey::generate(KeyKind::Publisher);
        let mut cert = enrollment.sign(&stranger).unwrap();
        cert.signer = operator.public();
        assert!(matches!(
            verify_certificate(&cert, &trust, &node.public(), 1_500),
            Err(ProtocolError::BadSignature { .. })
        ));
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_are_refused() {
        let (operator, trust, node, enrollment) = setup();
        let cert = enrollment.sign(&operator).unwrap();
        let err = verify_certificate(&cert, &trust, &node.public(), 2_000).unwrap_err();
        assert!(matches!(err, ProtocolError::CertificateExpired { .. }), "{err}");
        assert!(err.to_string().contains("enroll the node again"));
        assert!(matches!(
            verify_certificate(&cert, &trust, &node.public(), 999),
            Err(ProtocolError::CertificateNotYetValid { .. })
        ));
    }

    #[test]
    fn certificate_of_another_node_is_refused() {
        let (operator, trust, _node, enrollment) = setup();
        let cert = enrollment.sign(&operator).unwrap();
        let other = SecretKey::generate(KeyKind::Node).public();
        assert!(matches!(
            verify_certificate(&cert, &trust, &other, 1_500),
            Err(ProtocolError::CertificateSubjectMismatch { .. })
        ));
    }

    #[test]
    fn bad_tags_are_refused_at_signing() {
        let (operator, _trust, _node, mut enrollment) = setup();
        enrollment.tags.insert("bad key".into(), "x".into());
        assert!(enrollment.sign(&operator).is_err());
    }
}
