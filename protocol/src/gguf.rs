//! A reader of GGUF headers (metadata and tensor table), enough to describe a model file
//! in a manifest and to refuse what mistral.rs cannot load before it tries.
//!
//! The input is untrusted: every length is checked against the bytes that can still
//! follow, every count against a limit, and nothing panics. Reading the tensor table also
//! tells how long the file must be, so a truncated file is caught without reading the
//! weights.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use thiserror::Error;

pub const MAGIC: &[u8; 4] = b"GGUF";
const MAX_STRING: u64 = 16 << 20;
const MAX_KV: u64 = 1 << 20;
const MAX_TENSORS: u64 = 1 << 20;
const MAX_DIMS: u32 = 8;
const MAX_DEPTH: u32 = 4;

#[derive(Debug, Error)]
pub enum GgufError {
    #[error("not a GGUF file (it starts with {found:02x?}, a GGUF file starts with \"GGUF\")")]
    NotGguf { found: Vec<u8> },
    #[error("GGUF version {0} is not supported (versions 2 and 3 are)")]
    UnsupportedVersion(u32),
    #[error("GGUF file is truncated: it needs at least {needed} bytes but has {have}")]
    Truncated { needed: u64, have: u64 },
    #[error("malformed GGUF header: {0}")]
    Malformed(String),
    #[error("cannot read GGUF file: {0}")]
    Io(#[from] io::Error),
}

/// What slmesh needs to know about a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufInfo {
    pub version: u32,
    /// `general.architecture`, e.g. `llama`.
    pub architecture: String,
    /// `general.name`, if present.
    pub name: Option<String>,
    /// Quantisation, from `general.file_type` or else the most common tensor type.
    pub quantization: String,
    pub context_length: Option<u64>,
    pub tensor_count: u64,
    /// Where the tensor data starts.
    pub data_offset: u64,
    /// The least file length that holds every tensor.
    pub required_len: u64,
}

/// Architectures that mistral.rs 0.8.1's GGUF loader accepts; any other panics inside it.
pub const MISTRALRS_GGUF_ARCHITECTURES: &[&str] =
    &["llama", "phi2", "phi3", "starcoder2", "qwen2", "qwen3", "qwen3moe"];

/// Where header bytes come from: a reader, or a slice (which skips without copying).
trait Source {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()>;
    fn skip(&mut self, n: u64) -> io::Result<u64>;
}

struct ReaderSource<R>(R);

impl<R: Read> Source for ReaderSource<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact(buf)
    }
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        io::copy(&mut (&mut self.0).take(n), &mut io::sink())
    }
}

struct SliceSource<'a>(&'a [u8]);

impl Source for SliceSource<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        Read::read_exact(&mut self.0, buf)
    }
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let n = usize::try_from(n).unwrap_or(usize::MAX).min(self.0.len());
        self.0 = &self.0[n..];
        Ok(n as u64)
    }
}

struct Cursor<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Source> Cursor<R> {
    fn truncated(&self, n: u64) -> GgufError {
        GgufError::Truncated { needed: self.pos.saturating_add(n), have: self.len }
    }

    fn ensure(&self, n: u64) -> Result<(), GgufError> {
        if self.len.saturating_sub(self.pos) < n {
            return Err(self.truncated(n));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        self.ensure(N as u64)?;
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => self.truncated(N as u64),
            _ => GgufError::Io(e),
        })?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn skip(&mut self, n: u64) -> Result<(), GgufError> {
        self.ensure(n)?;
        let copied = self.inner.skip(n)?;
        if copied != n {
            return Err(self.truncated(n));
        }
        self.pos += n;
        Ok(())
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return Err(GgufError::Malformed(format!("string of {n} bytes")));
        }
        self.ensure(n)?;
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => self.truncated(n),
            _ => GgufError::Io(e),
        })?;
        self.pos += n;
        String::from_utf8(buf).map_err(|_| GgufError::Malformed("string is not UTF-8".into()))
    }

    fn skip_string(&mut self) -> Result<(), GgufError> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return Err(GgufError::Malformed(format!("string of {n} bytes")));
        }
        self.skip(n)
    }
}

/// A metadata value we keep (scalars and strings); arrays are skipped.
#[derive(Debug, Clone)]
enum Scalar {
    Int(i128),
    Str(String),
    Other,
}

fn fixed_size(value_type: u32) -> Option<u64> {
    match value_type {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn read_value<R: Source>(c: &mut Cursor<R>, value_type: u32, depth: u32) -> Result<Scalar, GgufError> {
    Ok(match value_type {
        0 => Scalar::Int(u8::from_le_bytes(c.bytes()?) as i128),
        1 => Scalar::Int(i8::from_le_bytes(c.bytes()?) as i128),
        2 => Scalar::Int(u16::from_le_bytes(c.bytes()?) as i128),
        3 => Scalar::Int(i16::from_le_bytes(c.bytes()?) as i128),
        4 => Scalar::Int(c.u32()? as i128),
        5 => Scalar::Int(i32::from_le_bytes(c.bytes()?) as i128),
        10 => Scalar::Int(c.u64()? as i128),
        11 => Scalar::Int(i64::from_le_bytes(c.bytes()?) as i128),
        6 | 12 | 7 => {
            c.skip(fixed_size(value_type).unwrap_or(0))?;
            Scalar::Other
        }
        8 => Scalar::Str(c.string()?),
        9 => {
            if depth >= MAX_DEPTH {
                return Err(GgufError::Malformed("arrays nested too deep".into()));
            }
            let item_type = c.u32()?;
            let count = c.u64()?;
            match fixed_size(item_type) {
                Some(size) => {
                    let total =
                        count.checked_mul(size).ok_or_else(|| GgufError::Malformed("array too large".into()))?;
                    c.skip(total)?;
                }
                None => {
                    // Every string or array item takes at least 8 bytes: a count that
                    // cannot fit in what is left is a truncated (or lying) file.
                    c.ensure(count.saturating_mul(8))?;
                    for _ in 0..count {
                        match item_type {
                            8 => c.skip_string()?,
                            9 => {
                                read_value(c, 9, depth + 1)?;
                            }
                            t => return Err(GgufError::Malformed(format!("unknown array item type {t}"))),
                        }
                    }
                }
            }
            Scalar::Other
        }
        t => return Err(GgufError::Malformed(format!("unknown metadata value type {t}"))),
    })
}

/// Name and (elements per block, bytes per block) of a ggml tensor type.
fn ggml_type(t: u32) -> (&'static str, Option<(u64, u64)>) {
    match t {
        0 => ("F32", Some((1, 4))),
        1 => ("F16", Some((1, 2))),
        2 => ("Q4_0", Some((32, 18))),
        3 => ("Q4_1", Some((32, 20))),
        6 => ("Q5_0", Some((32, 22))),
        7 => ("Q5_1", Some((32, 24))),
        8 => ("Q8_0", Some((32, 34))),
        9 => ("Q8_1", Some((32, 36))),
        10 => ("Q2_K", Some((256, 84))),
        11 => ("Q3_K", Some((256, 110))),
        12 => ("Q4_K", Some((256, 144))),
        13 => ("Q5_K", Some((256, 176))),
        14 => ("Q6_K", Some((256, 210))),
        15 => ("Q8_K", Some((256, 292))),
        20 => ("IQ4_NL", Some((32, 18))),
        23 => ("IQ4_XS", Some((256, 136))),
        24 => ("I8", Some((1, 1))),
        25 => ("I16", Some((1, 2))),
        26 => ("I32", Some((1, 4))),
        27 => ("I64", Some((1, 8))),
        28 => ("F64", Some((1, 8))),
        30 => ("BF16", Some((1, 2))),
        _ => ("unknown", None),
    }
}

/// llama.cpp's `general.file_type` names.
fn file_type_name(ft: i128) -> String {
    match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return format!("FTYPE_{ft}"),
    }
    .to_string()
}

/// Reads the header of a GGUF file of `file_len` bytes from `reader` (positioned at its
/// start; buffer it).
pub fn read_header<R: Read>(reader: R, file_len: u64) -> Result<GgufInfo, GgufError> {
    parse(Cursor { inner: ReaderSource(reader), pos: 0, len: file_len })
}

/// Reads the header of a GGUF file in memory (or memory-mapped).
pub fn read_header_from_slice(bytes: &[u8]) -> Result<GgufInfo, GgufError> {
    parse(Cursor { inner: SliceSource(bytes), pos: 0, len: bytes.len() as u64 })
}

fn parse<R: Source>(mut c: Cursor<R>) -> Result<GgufInfo, GgufError> {
    let file_len = c.len;
    let magic: [u8; 4] = match c.bytes() {
        Ok(m) => m,
        Err(GgufError::Truncated { .. }) if file_len < 4 => {
            return Err(GgufError::NotGguf { found: Vec::new() });
        }
        Err(e) => return Err(e),
    };
    if &magic != MAGIC {
        return Err(GgufError::NotGguf { found: magic.to_vec() });
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let tensor_count = c.u64()?;
    let kv_count = c.u64()?;
    if tensor_count > MAX_TENSORS || kv_count > MAX_KV {
        return Err(GgufError::Malformed(format!("{tensor_count} tensors and {kv_count} metadata entries")));
    }
    let mut kept: HashMap<String, Scalar> = HashMap::new();
    for _ in 0..kv_count {
        let key = c.string()?;
        let value_type = c.u32()?;
        let value = read_value(&mut c, value_type, 0)?;
        if key.starts_with("general.") || key.ends_with(".context_length") {
            kept.insert(key, value);
        }
    }
    let architecture = match kept.get("general.architecture") {
        Some(Scalar::Str(s)) if !s.is_empty() => s.clone(),
        _ => return Err(GgufError::Malformed("no general.architecture".into())),
    };
    let alignment = match kept.get("general.alignment") {
        Some(Scalar::Int(a)) if *a > 0 && *a <= 1 << 20 && (*a as u64).is_power_of_two() => *a as u64,
        Some(_) => return Err(GgufError::Malformed("general.alignment is not a power of two".into())),
        None => 32,
    };

    let mut elements_by_type: HashMap<u32, u64> = HashMap::new();
    let mut data_end: u64 = 0;
    for _ in 0..tensor_count {
        let name_len = c.u64()?;
        if name_len > 1 << 16 {
            return Err(GgufError::Malformed(format!("tensor name of {name_len} bytes")));
        }
        c.skip(name_len)?;
        let n_dims = c.u32()?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::Malformed(format!("tensor with {n_dims} dimensions")));
        }
        let mut elements: u64 = 1;
        for _ in 0..n_dims {
            elements =
                elements.checked_mul(c.u64()?).ok_or_else(|| GgufError::Malformed("tensor size overflows".into()))?;
        }
        let tensor_type = c.u32()?;
        let offset = c.u64()?;
        let (_, block) = ggml_type(tensor_type);
        let size = match block {
            Some((per_block, bytes)) => elements.div_ceil(per_block).saturating_mul(bytes),
            None => 0,
        };
        data_end = data_end.max(offset.saturating_add(size));
        if n_dims >= 2 {
            *elements_by_type.entry(tensor_type).or_default() += elements;
        }
    }
    let data_offset = c.pos.div_ceil(alignment).saturating_mul(alignment);
    let required_len = data_offset.saturating_add(data_end);
    if required_len > file_len {
        return Err(GgufError::Truncated { needed: required_len, have: file_len });
    }

    let quantization = match kept.get("general.file_type") {
        Some(Scalar::Int(ft)) => file_type_name(*ft),
        _ => elements_by_type
            .iter()
            .max_by_key(|(t, n)| (**n, std::cmp::Reverse(**t)))
            .map(|(t, _)| ggml_type(*t).0.to_string())
            .unwrap_or_else(|| "unknown".into()),
    };
    let context_length = match kept.get(&format!("{architecture}.context_length")) {
        Some(Scalar::Int(n)) if *n > 0 => u64::try_from(*n).ok(),
        _ => None,
    };
    let name = match kept.get("general.name") {
        Some(Scalar::Str(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(GgufInfo { version, architecture, name, quantization, context_length, tensor_count, data_offset, required_len })
}

/// A metadata value for [`GgufWriter`].
#[derive(Debug, Clone)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
}

/// Writes small GGUF v3 files with F32 tensors: for tests that need a real model file
/// (random weights, a tiny vocabulary) without downloading one.
#[derive(Debug, Default, Clone)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, Vec<f32>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(mut self, key: &str, value: MetaValue) -> Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds an F32 tensor. `dims` are in GGUF order (innermost first).
    pub fn tensor(mut self, name: &str, dims: &[u64], data: Vec<f32>) -> Self {
        self.tensors.push((name.to_string(), dims.to_vec(), data));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    pub fn write<W: Write>(&self, w: &mut W) -> io::Result<()> {
        fn string<W: Write>(w: &mut W, s: &str) -> io::Result<()> {
            w.write_all(&(s.len() as u64).to_le_bytes())?;
            w.write_all(s.as_bytes())
        }
        let mut out = Vec::new();
        out.write_all(MAGIC)?;
        out.write_all(&3u32.to_le_bytes())?;
        out.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        out.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
        for (key, value) in &self.metadata {
            string(&mut out, key)?;
            match value {
                MetaValue::U32(v) => {
                    out.write_all(&4u32.to_le_bytes())?;
                    out.write_all(&v.to_le_bytes())?;
                }
                MetaValue::I32(v) => {
                    out.write_all(&5u32.to_le_bytes())?;
                    out.write_all(&v.to_le_bytes())?;
                }
                MetaValue::F32(v) => {
                    out.write_all(&6u32.to_le_bytes())?;
                    out.write_all(&v.to_le_bytes())?;
                }
                MetaValue::Bool(v) => {
                    out.write_all(&7u32.to_le_bytes())?;
                    out.write_all(&[*v as u8])?;
                }
                MetaValue::Str(s) => {
                    out.write_all(&8u32.to_le_bytes())?;
                    string(&mut out, s)?;
                }
                MetaValue::StrArray(items) => {
                    out.write_all(&9u32.to_le_bytes())?;
                    out.write_all(&8u32.to_le_bytes())?;
                    out.write_all(&(items.len() as u64).to_le_bytes())?;
                    for s in items {
                        string(&mut out, s)?;
                    }
                }
                MetaValue::I32Array(items) => {
                    out.write_all(&9u32.to_le_bytes())?;
                    out.write_all(&5u32.to_le_bytes())?;
                    out.write_all(&(items.len() as u64).to_le_bytes())?;
                    for v in items {
                        out.write_all(&v.to_le_bytes())?;
                    }
                }
                MetaValue::F32Array(items) => {
                    out.write_all(&9u32.to_le_bytes())?;
                    out.write_all(&6u32.to_le_bytes())?;
                    out.write_all(&(items.len() as u64).to_le_bytes())?;
                    for v in items {
                        out.write_all(&v.to_le_bytes())?;
                    }
                }
            }
        }
        const ALIGN: u64 = 32;
        let mut offset = 0u64;
        for (name, dims, data) in &self.tensors {
            string(&mut out, name)?;
            out.write_all(&(dims.len() as u32).to_le_bytes())?;
            for d in dims {
                out.write_all(&d.to_le_bytes())?;
            }
            out.write_all(&0u32.to_le_bytes())?; // F32
            out.write_all(&offset.to_le_bytes())?;
            offset += (data.len() as u64 * 4).div_ceil(ALIGN) * ALIGN;
        }
        while !(out.len() as u64).is_multiple_of(ALIGN) {
            out.push(0);
        }
        for (i, (_, _, data)) in self.tensors.iter().enumerate() {
            let start = out.len();
            for v in data {
                out.write_all(&v.to_le_bytes())?;
            }
            // Pad between tensors, not after the last: the file ends where the data does.
            while i + 1 < self.tensors.len() && !((out.len() - start) as u64).is_multiple_of(ALIGN) {
                out.push(0);
            }
        }
        w.write_all(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> GgufWriter {
        GgufWriter::new()
            .meta("general.architecture", MetaValue::Str("llama".into()))
            .meta("general.name", MetaValue::Str("tiny".into()))
            .meta("llama.context_length", MetaValue::U32(128))
            .meta("tokenizer.ggml.tokens", MetaValue::StrArray(vec!["a".into(), "b".into()]))
            .meta("tokenizer.ggml.scores", MetaValue::F32Array(vec![0.0, 1.0]))
            .tensor("token_embd.weight", &[4, 2], vec![0.5; 8])
            .tensor("output_norm.weight", &[4], vec![1.0; 4])
    }

    #[test]
    fn reads_what_it_wrote() {
        let bytes = tiny().to_bytes();
        let info = read_header_from_slice(&bytes).unwrap();
        assert_eq!(info.architecture, "llama");
        assert_eq!(info.name.as_deref(), Some("tiny"));
        assert_eq!(info.context_length, Some(128));
        assert_eq!(info.quantization, "F32");
        assert_eq!(info.tensor_count, 2);
        assert_eq!(info.required_len, bytes.len() as u64);
    }

    #[test]
    fn file_type_names_quantisation() {
        let bytes = tiny().meta("general.file_type", MetaValue::U32(3)).to_bytes();
        assert_eq!(read_header_from_slice(&bytes).unwrap().quantization, "Q4_1");
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = tiny().to_bytes();
        for cut in 0..bytes.len() {
            let err = read_header_from_slice(&bytes[..cut]).unwrap_err();
            assert!(matches!(err, GgufError::Truncated { .. } | GgufError::NotGguf { .. }), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn png_is_not_gguf() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";
        let err = read_header_from_slice(png).unwrap_err();
        assert!(matches!(err, GgufError::NotGguf { .. }));
        assert!(err.to_string().contains("not a GGUF file"));
    }

    #[test]
    fn lying_counts_do_not_allocate_or_panic() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&4u64.to_le_bytes());
        bytes.extend_from_slice(b"keyy");
        bytes.extend_from_slice(&9u32.to_le_bytes()); // array
        bytes.extend_from_slice(&8u32.to_le_bytes()); // of strings
        bytes.extend_from_slice(&u64::MAX.to_le_bytes()); // "so many"
        assert!(read_header_from_slice(&bytes).is_err());
        let mut s = Vec::new();
        s.extend_from_slice(MAGIC);
        s.extend_from_slice(&3u32.to_le_bytes());
        s.extend_from_slice(&0u64.to_le_bytes());
        s.extend_from_slice(&1u64.to_le_bytes());
        s.extend_from_slice(&u64::MAX.to_le_bytes()); // key length
        assert!(read_header_from_slice(&s).is_err());
    }

    #[test]
    fn missing_architecture_and_old_versions_are_refused() {
        let bytes = GgufWriter::new().tensor("x", &[1], vec![0.0]).to_bytes();
        assert!(matches!(read_header_from_slice(&bytes), Err(GgufError::Malformed(_))));
        let mut v1 = tiny().to_bytes();
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(read_header_from_slice(&v1), Err(GgufError::UnsupportedVersion(1))));
    }
}
