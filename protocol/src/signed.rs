//! Signed envelopes: every signed record on the wire has this shape.
//!
//! The signature covers a domain-separation prefix (so a signature over one kind of
//! record is never valid for another, nor for libp2p's or iroh's own signatures with the
//! same key), the protocol version and the canonical body bytes. The body stays as the
//! signed bytes, so verification never re-encodes.

use crate::error::ProtocolError;
use crate::identity::{PublicKey, SecretKey};
use crate::{wire, PROTOCOL_VERSION};
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::marker::PhantomData;

/// Signatures this thread found valid, remembered by BLAKE3 of the signer, the signature
/// and the signed bytes: a node checks the same bytes again and again (anti-entropy sends
/// the same records each round; in the simulator every node checks the same gossip), and
/// a hash costs about a hundredth of an ed25519 check. Only successes are kept, and the
/// key covers everything the check covered, so a hit means these very bytes verified.
const VERIFIED_MEMO: usize = 8192;

/// The remembered keys, and the order they came in (the oldest goes first).
type Memo = (HashSet<[u8; 32]>, VecDeque<[u8; 32]>);

thread_local! {
    static VERIFIED: RefCell<Memo> = RefCell::new(Default::default());
}

fn memo_key(signer: &PublicKey, signature: &[u8], message: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("slmesh verified signature v1");
    h.update(signer.as_bytes());
    h.update(signature);
    h.update(message);
    *h.finalize().as_bytes()
}

fn already_verified(key: &[u8; 32]) -> bool {
    VERIFIED.with(|m| m.borrow().0.contains(key))
}

fn remember_verified(key: [u8; 32]) {
    VERIFIED.with(|m| {
        let (set, order) = &mut *m.borrow_mut();
        if set.insert(key) {
            order.push_back(key);
            if order.len() > VERIFIED_MEMO {
                if let Some(old) = order.pop_front() {
                    set.remove(&old);
                }
            }
        }
    });
}

/// A record type that travels signed.
pub trait SignedKind: Serialize + DeserializeOwned {
    /// Domain-separation prefix of the signature.
    const DOMAIN: &'static [u8];
    /// Name used in error messages.
    const WHAT: &'static str;
    /// How the body is encoded (the envelope is always `wire::Encoding::Fixed`).
    const BODY: wire::Encoding = wire::Encoding::Fixed;
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(bound = "")]
pub struct Signed<T> {
    pub protocol_version: u16,
    pub signer: PublicKey,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    #[serde(skip)]
    _kind: PhantomData<fn() -> T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Signed {
            protocol_version: self.protocol_version,
            signer: self.signer,
            body: self.body.clone(),
            signature: self.signature.clone(),
            _kind: PhantomData,
        }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.protocol_version == other.protocol_version
            && self.signer == other.signer
            && self.body == other.body
            && self.signature == other.signature
    }
}
impl<T> Eq for Signed<T> {}

fn signed_bytes(domain: &[u8], version: u16, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(domain.len() + 3 + body.len());
    msg.extend_from_slice(domain);
    msg.push(0);
    msg.extend_from_slice(&version.to_le_bytes());
    msg.extend_from_slice(body);
    msg
}

impl<T: SignedKind> Signed<T> {
    pub fn sign(value: &T, key: &SecretKey) -> Result<Self, ProtocolError> {
        let body = wire::encode_as(value, T::BODY)?;
        let signature = key.sign(&signed_bytes(T::DOMAIN, PROTOCOL_VERSION, &body));
        Ok(Signed {
            protocol_version: PROTOCOL_VERSION,
            signer: key.public(),
            body,
            signature: signature.to_bytes().to_vec(),
            _kind: PhantomData,
        })
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        wire::encode(self)
    }

    /// Decodes the envelope of untrusted bytes and checks its protocol version. The
    /// signature is not checked yet: see [`Signed::verify_with`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let env: Self = wire::decode(bytes, T::WHAT)?;
        env.check_version()?;
        Ok(env)
    }

    /// Refuses an envelope of another protocol version (one decoded inside another
    /// message, which `from_bytes` did not see).
    pub fn check_version(&self) -> Result<(), ProtocolError> {
        if self.protocol_version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnknownProtocolVersion {
                got: self.protocol_version,
                supported: PROTOCOL_VERSION,
            });
        }
        Ok(())
    }

    /// Checks the signature with the signer's (already trusted) key and decodes the body.
    pub fn verify_with(&self, key: &VerifyingKey) -> Result<T, ProtocolError> {
        if key.as_bytes() != self.signer.as_bytes() {
            return Err(ProtocolError::BadSignature { what: T::WHAT });
        }
        self.verify_memoised(|| Ok(*key))
    }

    /// Checks the signature with the key the envelope names, whoever that is. Only for
    /// self-certifying records (a node's own record); trust is the caller's business.
    pub fn verify_self_signed(&self) -> Result<T, ProtocolError> {
        self.verify_memoised(|| {
            self.signer
                .verifying_key()
                .map_err(|_| ProtocolError::Malformed { what: T::WHAT, reason: "signer is not an ed25519 key".into() })
        })
    }

    /// The memo first: bytes that verified before under the same signer bytes need
    /// neither the key decompressed (`key`, a square root on the curve) nor ed25519.
    fn verify_memoised(&self, key: impl FnOnce() -> Result<VerifyingKey, ProtocolError>) -> Result<T, ProtocolError> {
        let sig_bytes: [u8; 64] = self
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| ProtocolError::Malformed { what: T::WHAT, reason: "signature is not 64 bytes".into() })?;
        let message = signed_bytes(T::DOMAIN, self.protocol_version, &self.body);
        let memo = memo_key(&self.signer, &sig_bytes, &message);
        if !already_verified(&memo) {
            key()?
                .verify_strict(&message, &Signature::from_bytes(&sig_bytes))
                .map_err(|_| ProtocolError::BadSignature { what: T::WHAT })?;
            remember_verified(memo);
        }
        wire::decode_as(&self.body, T::WHAT, T::BODY)
    }

    /// BLAKE3 of the envelope bytes: a stable id for deduplication.
    pub fn id(&self) -> Result<[u8; 32], ProtocolError> {
        Ok(*blake3::hash(&self.to_bytes()?).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use crate::fleet::{MetricsRecord, SignedMetrics};
    use crate::identity::{KeyKind, SecretKey};

    #[test]
    fn byte_strings_are_the_same_bytes_on_the_wire_as_before() {
        // serde_bytes only changes how they are decoded: the bytes a peer of an older
        // build sends or expects are these.
        #[derive(serde::Serialize)]
        struct Plain {
            protocol_version: u16,
            signer: crate::identity::PublicKey,
            body: Vec<u8>,
            signature: Vec<u8>,
        }
        let key = SecretKey::from_seed(KeyKind::Node, [4; 32]);
        let record = MetricsRecord { node: key.public(), seq: 1, issued_at: 5, versions: vec![] };
        let signed = SignedMetrics::sign(&record, &key).unwrap();
        let plain = Plain {
            protocol_version: signed.protocol_version,
            signer: signed.signer,
            body: signed.body.clone(),
            signature: signed.signature.clone(),
        };
        assert_eq!(crate::wire::encode(&signed).unwrap(), crate::wire::encode(&plain).unwrap());
        let back: SignedMetrics = crate::wire::decode(&crate::wire::encode(&plain).unwrap(), "metrics").unwrap();
        assert_eq!(back.body, signed.body);
    }

    #[test]
    fn a_metrics_body_is_compact_and_a_fixed_width_one_is_refused() {
        use crate::fleet::VersionReport;
        let key = SecretKey::from_seed(KeyKind::Node, [4; 32]);
        let report = |version: u64, requests: u64| {
            let mut r =
                VersionReport { model: "smollm2".into(), version, active: true, requests, ..Default::default() };
            for k in 0..requests {
                r.latency.add(0.2 + k as f64 / 100.0);
                r.ttft.add(0.05);
                r.tokens_per_sec.add(40.0);
            }
            r
        };
        let record =
            MetricsRecord { node: key.public(), seq: 7, issued_at: 5, versions: vec![report(1, 300), report(2, 12)] };
        let signed = SignedMetrics::sign(&record, &key).unwrap();
        let fixed = crate::wire::encode(&record).unwrap();
        assert!(
            signed.body.len() * 4 < fixed.len() * 3,
            "compact body {} B against fixed-width {} B",
            signed.body.len(),
            fixed.len()
        );
        let back = SignedMetrics::from_bytes(&signed.to_bytes().unwrap()).unwrap();
        assert_eq!(back.verify_self_signed().unwrap(), record);
        // A body in the fixed-width form of an older build, signed by its own node, is
        // refused with an error, not misread.
        let mut old = signed.clone();
        old.signature =
            key.sign(&super::signed_bytes(b"slmesh/metrics", old.protocol_version, &fixed)).to_bytes().to_vec();
        old.body = fixed;
        let err = old.verify_self_signed().unwrap_err().to_string();
        assert!(err.contains("metrics record"), "{err}");
    }

    #[test]
    fn a_remembered_signature_never_vouches_for_other_bytes() {
        let key = SecretKey::from_seed(KeyKind::Node, [4; 32]);
        let record = MetricsRecord { node: key.public(), seq: 1, issued_at: 5, versions: vec![] };
        let signed = SignedMetrics::sign(&record, &key).unwrap();
        assert!(signed.verify_self_signed().is_ok());
        assert!(signed.verify_self_signed().is_ok(), "the second check (remembered) agrees");
        let mut body = signed.clone();
        let last = body.body.len() - 1;
        body.body[last] ^= 1;
        assert!(body.verify_self_signed().is_err(), "a changed body");
        let mut sig = signed.clone();
        sig.signature[0] ^= 1;
        assert!(sig.verify_self_signed().is_err(), "a changed signature");
        let other = SecretKey::from_seed(KeyKind::Node, [5; 32]);
        let mut signer = signed.clone();
        signer.signer = other.public();
        assert!(signer.verify_self_signed().is_err(), "another signer");
    }
}
