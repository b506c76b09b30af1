//! The one wire encoding: bincode 2 in serde mode with a fixed configuration.
//!
//! Fixed-width integers make the encoding canonical (one value, one byte string), which
//! signatures rely on. Decoding checks the size first, bounds every allocation through
//! bincode's limit, rejects trailing bytes, and never panics.

use crate::error::ProtocolError;
use crate::MAX_MESSAGE_BYTES;
use bincode::config::{Configuration, Fixint, Limit, LittleEndian};
use serde::{de::DeserializeOwned, Serialize};

type WireConfig = Configuration<LittleEndian, Fixint, Limit<MAX_MESSAGE_BYTES>>;

fn config() -> WireConfig {
    bincode::config::standard().with_little_endian().with_fixed_int_encoding().with_limit::<MAX_MESSAGE_BYTES>()
}

/// Canonical bytes of a value.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ProtocolError> {
    let bytes = bincode::serde::encode_to_vec(value, config())
        .map_err(|e| ProtocolError::Malformed { what: "value to encode", reason: e.to_string() })?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::Oversize { len: bytes.len(), max: MAX_MESSAGE_BYTES });
    }
    Ok(bytes)
}

/// Decodes untrusted bytes. `what` names the thing for the error message.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, ProtocolError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::Oversize { len: bytes.len(), max: MAX_MESSAGE_BYTES });
    }
    let (value, used): (T, usize) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| ProtocolError::Malformed { what, reason: e.to_string() })?;
    if used != bytes.len() {
        return Err(ProtocolError::Malformed {
            what,
            reason: format!("{} trailing bytes after the message", bytes.len() - used),
        });
    }
    Ok(value)
}

/// Canonical bytes of an unsigned message, prefixed with the protocol version.
pub fn encode_versioned<T: Serialize>(value: &T) -> Result<Vec<u8>, ProtocolError> {
    encode(&(crate::PROTOCOL_VERSION, value))
}

/// Decodes an unsigned message of untrusted bytes, refusing other protocol versions.
pub fn decode_versioned<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, ProtocolError> {
    let (version, value): (u16, T) = decode(bytes, what)?;
    if version != crate::PROTOCOL_VERSION {
        return Err(ProtocolError::UnknownProtocolVersion { got: version, supported: crate::PROTOCOL_VERSION });
    }
    Ok(value)
}
