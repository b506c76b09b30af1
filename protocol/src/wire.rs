//! The one wire encoding: bincode 2 in serde mode with a fixed configuration.
//!
//! Fixed-width integers make the encoding canonical (one value, one byte string), which
//! signatures rely on. Decoding checks the size first, bounds every allocation through
//! bincode's limit, rejects trailing bytes, and never panics.
//!
//! One kind of signed body is encoded compactly instead (`Encoding::Compact`: bincode's
//! varint, a byte for a number below 251 and for most lengths): the metrics record,
//! the one message every node sends again and again, where fixed-width counters and
//! lengths were about a third of its bytes. A compact body is still one byte string per
//! value when encoded, but decoding also takes a longer form of a small number; that
//! is harmless for a signed body (the signature covers the bytes as received and only
//! the signer can make another form), and envelopes stay fixed-width.

use crate::error::ProtocolError;
use crate::MAX_MESSAGE_BYTES;
use bincode::config::{Config, Configuration, Fixint, Limit, LittleEndian, Varint};
use serde::{de::DeserializeOwned, Serialize};

type WireConfig = Configuration<LittleEndian, Fixint, Limit<MAX_MESSAGE_BYTES>>;
type CompactConfig = Configuration<LittleEndian, Varint, Limit<MAX_MESSAGE_BYTES>>;

fn config() -> WireConfig {
    bincode::config::standard().with_little_endian().with_fixed_int_encoding().with_limit::<MAX_MESSAGE_BYTES>()
}

fn compact_config() -> CompactConfig {
    bincode::config::standard().with_little_endian().with_variable_int_encoding().with_limit::<MAX_MESSAGE_BYTES>()
}

/// How a signed body is encoded (`signed::SignedKind::BODY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Fixed-width integers and lengths: the wire's default, canonical.
    Fixed,
    /// Variable-width integers and lengths, for bodies sent often (metrics records).
    Compact,
}

/// Bytes of a value in the given encoding.
pub fn encode_as<T: Serialize>(value: &T, encoding: Encoding) -> Result<Vec<u8>, ProtocolError> {
    match encoding {
        Encoding::Fixed => encode(value),
        Encoding::Compact => encode_with(value, compact_config()),
    }
}

/// Decodes untrusted bytes in the given encoding.
pub fn decode_as<T: DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
    encoding: Encoding,
) -> Result<T, ProtocolError> {
    match encoding {
        Encoding::Fixed => decode(bytes, what),
        Encoding::Compact => decode_with(bytes, what, compact_config()),
    }
}

/// Canonical bytes of a value.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ProtocolError> {
    encode_with(value, config())
}

fn encode_with<T: Serialize, C: Config>(value: &T, config: C) -> Result<Vec<u8>, ProtocolError> {
    let bytes = bincode::serde::encode_to_vec(value, config)
        .map_err(|e| ProtocolError::Malformed { what: "value to encode", reason: e.to_string() })?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::Oversize { len: bytes.len(), max: MAX_MESSAGE_BYTES });
    }
    Ok(bytes)
}

/// Decodes untrusted bytes. `what` names the thing for the error message.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, ProtocolError> {
    decode_with(bytes, what, config())
}

fn decode_with<T: DeserializeOwned, C: Config>(
    bytes: &[u8],
    what: &'static str,
    config: C,
) -> Result<T, ProtocolError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::Oversize { len: bytes.len(), max: MAX_MESSAGE_BYTES });
    }
    let (value, used): (T, usize) = bincode::serde::decode_from_slice(bytes, config)
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
