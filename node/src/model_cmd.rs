//! `slmesh model`: work on GGUF files before they are published.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use slmesh_inference::quantize::{quantize_gguf, QuantType};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Re-quantise a GGUF file to a type this engine runs with SIMD kernels (q4_0, q8_0,
    /// q4_k, q6_k). candle, under mistral.rs 0.8.1, has only scalar kernels for Q4_1,
    /// Q5_0 and Q5_1: such a file decodes markedly faster as q4_0. Norms stay as they
    /// are; tokenizer and chat template are copied. Publish the result as a variant
    /// (`slmesh manifest create`), after checking its answers.
    Quantize(QuantizeArgs),
    /// Measure how fast this engine multiplies by a weight of each quantised kind on this
    /// CPU (what a node measures once, remembers in data_dir/kernels.json, and chooses
    /// among a manifest's variants by: the first listed whose kind is within 25% of the
    /// fastest that fits). Takes about 2 s; `--threads` applies.
    Kernels,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// The GGUF file to start from.
    pub input: PathBuf,
    /// The type to re-quantise to: q4_0, q8_0, q4_k or q6_k.
    #[arg(long)]
    pub to: QuantType,
    /// Where to write the result (default: beside the input, its quantisation in the
    /// name replaced, e.g. model.Q4_1.gguf -> model.Q4_0.gguf). An existing file is
    /// never overwritten.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Quantize(args) => quantize(args),
        ModelCommand::Kernels => {
            kernels();
            Ok(())
        }
    }
}

fn kernels() {
    let measured = slmesh_inference::calibrate::kernel_ps_per_weight();
    let fastest = measured.values().copied().min().unwrap_or(1).max(1);
    println!("{:<6} {:>14} {:>18}", "kind", "ps per weight", "time vs fastest");
    for (kind, ps) in &measured {
        println!("{kind:<6} {ps:>14} {:>17.2}x", f64::from(*ps) / f64::from(fastest));
    }
}

/// `dir/name.Q4_1.gguf` to `dir/name.Q4_0.gguf` (or `dir/name.Q4_0.gguf` from `dir/name.gguf`).
fn default_output(input: &Path, to: QuantType) -> PathBuf {
    let stem = input.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let base = match stem.rsplit_once('.') {
        Some((base, tag)) if looks_like_quant_tag(tag) => base,
        _ => stem,
    };
    input.with_file_name(format!("{base}.{}.gguf", to.name().to_ascii_uppercase()))
}

fn looks_like_quant_tag(tag: &str) -> bool {
    let t = tag.to_ascii_uppercase();
    (t.starts_with('Q') || t.starts_with("IQ") || t == "F16" || t == "F32" || t == "BF16")
        && t.chars().any(|c| c.is_ascii_digit())
        && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn quantize(args: QuantizeArgs) -> Result<()> {
    let out = args.out.clone().unwrap_or_else(|| default_output(&args.input, args.to));
    let started = Instant::now();
    let report = quantize_gguf(&args.input, &out, args.to)
        .with_context(|| format!("cannot re-quantise {} to {}", args.input.display(), args.to))?;
    let types: Vec<String> = report.by_type.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "wrote {} ({:.1} MB, from {:.1} MB) in {:.1} s: tensors {}",
        out.display(),
        report.bytes_out as f64 / 1e6,
        report.bytes_in as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        types.join(", ")
    );
    if !report.fell_back.is_empty() {
        let n = report.fell_back.len();
        println!("{n} tensor(s) could not take {} (their rows do not split into its blocks), e.g.:", args.to);
        for t in report.fell_back.iter().take(3) {
            println!("  {t}");
        }
    }
    println!("check its answers before you publish it: slmesh serve --model {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_output_replaces_the_quantisation_in_the_name() {
        let q4 = QuantType::Q4_0;
        assert_eq!(default_output(Path::new("m/S.Q4_1.gguf"), q4), PathBuf::from("m/S.Q4_0.gguf"));
        assert_eq!(default_output(Path::new("S-135M.gguf"), q4), PathBuf::from("S-135M.Q4_0.gguf"));
        assert_eq!(default_output(Path::new("a.b.Q5_K_M.gguf"), QuantType::Q8_0), PathBuf::from("a.b.Q8_0.gguf"));
        assert_eq!(default_output(Path::new("v1.2.gguf"), q4), PathBuf::from("v1.2.Q4_0.gguf"), "2 is no quant tag");
    }
}
