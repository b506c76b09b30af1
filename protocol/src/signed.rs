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
use std::marker::PhantomData;

/// A record type that travels signed.
pub trait SignedKind: Serialize + DeserializeOwned {
    /// Domain-separation prefix of the signature.
    const DOMAIN: &'static [u8];
    /// Name used in error messages.
    const WHAT: &'static str;
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(bound = "")]
pub struct Signed<T> {
    pub protocol_version: u16,
    pub signer: PublicKey,
    pub body: Vec<u8>,
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
        let body = wire::encode(value)?;
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
        if env.protocol_version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnknownProtocolVersion {
                got: env.protocol_version,
                supported: PROTOCOL_VERSION,
            });
        }
        Ok(env)
    }

    /// Checks the signature with the signer's (already trusted) key and decodes the body.
    pub fn verify_with(&self, key: &VerifyingKey) -> Result<T, ProtocolError> {
        if key.as_bytes() != self.signer.as_bytes() {
            return Err(ProtocolError::BadSignature { what: T::WHAT });
        }
        let sig_bytes: [u8; 64] = self
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| ProtocolError::Malformed { what: T::WHAT, reason: "signature is not 64 bytes".into() })?;
        let sig = Signature::from_bytes(&sig_bytes);
        key.verify_strict(&signed_bytes(T::DOMAIN, self.protocol_version, &self.body), &sig)
            .map_err(|_| ProtocolError::BadSignature { what: T::WHAT })?;
        wire::decode(&self.body, T::WHAT)
    }

    /// Checks the signature with the key the envelope names, whoever that is. Only for
    /// self-certifying records (a node's own record); trust is the caller's business.
    pub fn verify_self_signed(&self) -> Result<T, ProtocolError> {
        let key = self
            .signer
            .verifying_key()
            .map_err(|_| ProtocolError::Malformed { what: T::WHAT, reason: "signer is not an ed25519 key".into() })?;
        self.verify_with(&key)
    }

    /// BLAKE3 of the envelope bytes: a stable id for deduplication.
    pub fn id(&self) -> Result<[u8; 32], ProtocolError> {
        Ok(*blake3::hash(&self.to_bytes()?).as_bytes())
    }
}
