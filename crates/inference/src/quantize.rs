//! Variants made for this engine: re-quantises a GGUF file to a type candle 0.10.2 (under
//! mistral.rs 0.8.1) runs with SIMD kernels. It has AVX2 kernels for Q4_0, Q8_0 and the
//! K-quants and only scalar ones for Q4_1, Q5_0 and Q5_1: the demo model re-quantised
//! from Q4_1 to Q4_0 decodes about 1.5 times as fast here (BENCHMARKS.md).
//!
//! Each quantised weight is dequantised and quantised again with candle's own quantiser,
//! one tensor at a time; 1-D tensors (norms) and float tensors stay as they are. A tensor
//! whose rows do not split into the target's blocks (K-quants need 256 values a row)
//! falls back to Q8_0, or stays as it is. The metadata (tokenizer, chat template) is
//! copied, with `general.file_type` set to the new type. The output is written to a
//! temporary file, synced and checked, then renamed into place: a crash leaves no half
//! file under the name asked for.

use crate::{check_gguf, InferenceError};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Input(#[from] InferenceError),
    #[error("{path}: {reason}")]
    Candle { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} exists already: remove it or choose another output")]
    Exists(PathBuf),
    #[error("the output {0} is the input")]
    SameFile(PathBuf),
}

/// The types a variant can be re-quantised to: those with SIMD kernels in this engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Q4_0,
    Q8_0,
    Q4K,
    Q6K,
}

impl QuantType {
    pub const ALL: [QuantType; 4] = [QuantType::Q4_0, QuantType::Q8_0, QuantType::Q4K, QuantType::Q6K];

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q4_0 => "q4_0",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4K => "q4_k",
            QuantType::Q6K => "q6_k",
        }
    }

    fn dtype(self) -> GgmlDType {
        match self {
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4K => GgmlDType::Q4K,
            QuantType::Q6K => GgmlDType::Q6K,
        }
    }

    /// llama.cpp's `general.file_type` for a file mostly of this type.
    fn file_type(self) -> u32 {
        match self {
            QuantType::Q4_0 => 2,
            QuantType::Q8_0 => 7,
            QuantType::Q4K => 15,
            QuantType::Q6K => 18,
        }
    }
}

impl FromStr for QuantType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let wanted = s.trim().to_ascii_lowercase().replace('-', "_");
        QuantType::ALL.into_iter().find(|q| q.name() == wanted).ok_or_else(|| {
            let names: Vec<&str> = QuantType::ALL.iter().map(|q| q.name()).collect();
            format!("{s:?} is not a type this engine runs fast; one of {}", names.join(", "))
        })
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a re-quantisation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizeReport {
    /// Tensors written, by their type in the output (e.g. "Q4_0" → 210).
    pub by_type: BTreeMap<String, usize>,
    /// Tensors that could not take the target type and fell back (to Q8_0) or stayed.
    pub fell_back: Vec<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The type one tensor gets: floats and 1-D tensors stay; a row that does not split into
/// the target's blocks falls back to Q8_0 (32 a block), else stays.
fn target_for(dtype: GgmlDType, dims: &[usize], to: GgmlDType) -> Option<GgmlDType> {
    let row = *dims.last()?;
    if dims.len() < 2 || matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
        return None;
    }
    [to, GgmlDType::Q8_0].into_iter().find(|t| row.is_multiple_of(t.block_size()))
}

/// Re-quantises `input` to `to` and writes `output` (which must not exist).
pub fn quantize_gguf(input: &Path, output: &Path, to: QuantType) -> Result<QuantizeReport, QuantizeError> {
    let candle = |path: &Path| {
        let path = path.to_path_buf();
        move |e: candle_core::Error| QuantizeError::Candle { path: path.clone(), reason: e.to_string() }
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| QuantizeError::Io { path: path.clone(), source }
    };
    // Our own header reader first: bounded, and it refuses what mistral.rs cannot load.
    check_gguf(input)?;
    if output.exists() {
        let same = std::fs::canonicalize(input).ok() == std::fs::canonicalize(output).ok();
        return Err(if same { QuantizeError::SameFile(output.into()) } else { QuantizeError::Exists(output.into()) });
    }
    let mut reader = BufReader::new(File::open(input).map_err(io(input))?);
    let content = gguf_file::Content::read(&mut reader).map_err(candle(input))?;
    let mut names: Vec<(&String, &gguf_file::TensorInfo)> = content.tensor_infos.iter().collect();
    names.sort_by_key(|(_, info)| info.offset);

    let mut by_type = BTreeMap::new();
    let mut fell_back = vec![];
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for (name, info) in names {
        let tensor = content.tensor(&mut reader, name, &Device::Cpu).map_err(candle(input))?;
        let dims = info.shape.dims().to_vec();
        let tensor = match target_for(info.ggml_dtype, &dims, to.dtype()) {
            None => tensor,
            Some(t) if t == info.ggml_dtype => tensor,
            Some(t) => {
                if t != to.dtype() {
                    fell_back.push(format!("{name} {dims:?}: {t:?}"));
                }
                let values = tensor.dequantize(&Device::Cpu).map_err(candle(input))?;
                QTensor::quantize(&values, t).map_err(candle(input))?
            }
        };
        *by_type.entry(format!("{:?}", tensor.dtype())).or_default() += 1;
        tensors.push((name.clone(), tensor));
    }

    let mut metadata: Vec<(&str, gguf_file::Value)> =
        content.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    metadata.retain(|(k, _)| *k != "general.file_type");
    metadata.push(("general.file_type", gguf_file::Value::U32(to.file_type())));
    // HashMap order is random: sorted keys make the same input give the same bytes.
    metadata.sort_by(|a, b| a.0.cmp(b.0));

    let tmp = output.with_extension("gguf.partial");
    let written = (|| {
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let mut writer = BufWriter::new(file);
        let meta: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut writer, &meta, &refs).map_err(candle(&tmp))?;
        writer.flush().map_err(io(&tmp))?;
        writer.get_ref().sync_all().map_err(io(&tmp))?;
        check_gguf(&tmp)?;
        std::fs::rename(&tmp, output).map_err(io(output))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).map_err(io(p));
    Ok(QuantizeReport { by_type, fell_back, bytes_in: len(input)?, bytes_out: len(output)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_parse_by_their_llama_cpp_names_and_others_are_refused_with_the_list() {
        assert_eq!("q4_0".parse::<QuantType>().unwrap(), QuantType::Q4_0);
        assert_eq!("Q8_0".parse::<QuantType>().unwrap(), QuantType::Q8_0);
        assert_eq!("q4-k".parse::<QuantType>().unwrap(), QuantType::Q4K);
        let err = "q4_1".parse::<QuantType>().unwrap_err();
        assert!(err.contains("q4_0, q8_0, q4_k, q6_k"), "{err}");
    }

    #[test]
    fn norms_and_floats_stay_and_rows_that_do_not_split_into_blocks_fall_back() {
        let q4 = GgmlDType::Q4_0;
        assert_eq!(target_for(GgmlDType::Q4_1, &[49152, 576], q4), Some(q4));
        assert_eq!(target_for(GgmlDType::F32, &[576], q4), None, "a norm");
        assert_eq!(target_for(GgmlDType::F16, &[64, 64], q4), None, "a float tensor");
        assert_eq!(target_for(GgmlDType::Q4_1, &[576, 576], GgmlDType::Q4K), Some(GgmlDType::Q8_0), "576 % 256 != 0");
        assert_eq!(target_for(GgmlDType::Q4_1, &[1536, 512], GgmlDType::Q4K), Some(GgmlDType::Q4K));
        assert_eq!(target_for(GgmlDType::Q4_1, &[10, 33], q4), None, "33 splits into no block");
    }
}
