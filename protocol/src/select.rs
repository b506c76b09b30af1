//! Variant selection: the first variant (publishers list them best first) that fits the
//! node's memory, CPU architecture and tags; on a CPU with the SIMD this engine's fast
//! kernels use, the first fitting variant whose quantisation has such kernels goes before
//! the others. candle 0.10.2 (under mistral.rs 0.8.1) has AVX2 and NEON kernels for Q4_0,
//! Q8_0 and the K-quants and only scalar ones for Q4_1, Q5_0 and Q5_1: the demo model as
//! Q4_1 decodes at 0.68× its Q4_0 re-quantisation here (BENCHMARKS.md).
//!
//! Better than that table: a node that has measured its kernels (`NodeFacts::kernel_ps_per_weight`,
//! a short calibration it runs once per kind and remembers) takes the first fitting
//! variant whose kernel is within `CALIBRATED_SLACK` of the fastest fitting one's, so the
//! publisher's order (quality first) decides among those that run about as fast here.

use crate::error::ProtocolError;
use crate::manifest::{ModelManifest, Variant};
use crate::trust::Tags;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    pub ram_bytes: u64,
    /// As Rust names it: `x86_64`, `aarch64`, ...
    pub cpu_arch: String,
    pub tags: Tags,
    /// The CPU has the SIMD the engine's fast kernels use (AVX2 on x86_64, NEON on aarch64).
    pub simd: bool,
    /// Measured on this node: picoseconds per weight of one quantised matrix-vector
    /// product (what decoding a token does for every weight), by kernel kind
    /// (`kernel_kind`). Empty: not measured; the table of fast kernels decides.
    pub kernel_ps_per_weight: BTreeMap<String, u32>,
}

/// A variant whose measured kernel is within this factor of the fastest fitting one's
/// counts as fast as it: 1.25 (the publisher's first choice may be up to 25% slower).
pub const CALIBRATED_SLACK: f64 = 1.25;

/// The kernel a quantisation (as the GGUF header or a manifest names it) runs on:
/// upper case, a K-quant's size suffix dropped (`q4_k_m` -> `Q4_K`).
pub fn kernel_kind(quantization: &str) -> String {
    let q = quantization.to_ascii_uppercase();
    match q.find("_K") {
        Some(i) => q[..i + 2].to_string(),
        None => q,
    }
}

/// Whether this engine runs a quantisation (as the GGUF header names it) with SIMD kernels.
pub fn has_fast_kernels(quantization: &str) -> bool {
    let q = quantization.to_ascii_uppercase();
    q == "Q4_0" || q == "Q8_0" || ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"].iter().any(|k| q.starts_with(k))
}

/// Why a variant does not fit, or `None` if it does.
pub fn misfit(variant: &Variant, facts: &NodeFacts) -> Option<String> {
    if variant.min_ram_bytes > facts.ram_bytes {
        return Some(format!(
            "needs {} MiB of RAM, node has {} MiB",
            variant.min_ram_bytes >> 20,
            facts.ram_bytes >> 20
        ));
    }
    if !variant.cpu_archs.is_empty() && !variant.cpu_archs.iter().any(|a| a == &facts.cpu_arch) {
        return Some(format!("built for {:?}, node is {}", variant.cpu_archs, facts.cpu_arch));
    }
    variant.selector.explain_mismatch(&facts.tags)
}

pub fn select_variant<'a>(manifest: &'a ModelManifest, facts: &NodeFacts) -> Result<&'a Variant, ProtocolError> {
    let mut reasons = Vec::new();
    let mut fitting = Vec::new();
    for v in &manifest.variants {
        match misfit(v, facts) {
            None => fitting.push(v),
            Some(why) => reasons.push(format!("{}: {why}", v.id)),
        }
    }
    if let Some(chosen) = calibrated_choice(&fitting, facts) {
        return Ok(chosen);
    }
    let fast = fitting.iter().find(|v| facts.simd && has_fast_kernels(&v.quantization));
    fast.or(fitting.first())
        .copied()
        .ok_or_else(|| ProtocolError::NoVariantFits { name: manifest.name.clone(), reasons: reasons.join("; ") })
}

/// By measurement: the first of `fitting` whose kernel is within `CALIBRATED_SLACK` of the
/// fastest. `None` unless every fitting variant's kernel was measured.
fn calibrated_choice<'a>(fitting: &[&'a Variant], facts: &NodeFacts) -> Option<&'a Variant> {
    let cost = |v: &Variant| facts.kernel_ps_per_weight.get(&kernel_kind(&v.quantization)).copied();
    let costs: Vec<u32> = fitting.iter().map(|v| cost(v)).collect::<Option<_>>()?;
    let fastest = f64::from(*costs.iter().min()?);
    fitting.iter().zip(&costs).find(|(_, c)| f64::from(**c) <= fastest * CALIBRATED_SLACK).map(|(v, _)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample_manifest;

    fn facts(ram_mib: u64, arch: &str, tags: &[(&str, &str)]) -> NodeFacts {
        NodeFacts {
            ram_bytes: ram_mib << 20,
            cpu_arch: arch.into(),
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            simd: false,
            kernel_ps_per_weight: BTreeMap::new(),
        }
    }

    fn two_variants() -> ModelManifest {
        let mut m = sample_manifest(1);
        let mut big = m.variants[0].clone();
        big.id = "q8_0".into();
        big.min_ram_bytes = 4096 << 20;
        big.selector.require.insert("class".into(), vec!["workstation".into()]);
        let mut small = m.variants[0].clone();
        small.cpu_archs = vec!["x86_64".into(), "aarch64".into()];
        m.variants = vec![big, small];
        m
    }

    #[test]
    fn best_fitting_variant_is_chosen() {
        let m = two_variants();
        assert_eq!(select_variant(&m, &facts(8192, "x86_64", &[("class", "workstation")])).unwrap().id, "q8_0");
        assert_eq!(select_variant(&m, &facts(8192, "x86_64", &[("class", "gateway")])).unwrap().id, "q4_1");
        assert_eq!(select_variant(&m, &facts(1024, "aarch64", &[("class", "workstation")])).unwrap().id, "q4_1");
    }

    #[test]
    fn a_cpu_with_simd_takes_the_first_fitting_variant_with_fast_kernels() {
        let mut m = sample_manifest(1);
        let q4_1 = m.variants[0].clone();
        let mut q4_0 = q4_1.clone();
        (q4_0.id, q4_0.quantization) = ("q4_0".into(), "Q4_0".into());
        let mut big = q4_1.clone();
        (big.id, big.quantization, big.min_ram_bytes) = ("q8_0".into(), "Q8_0".into(), 4096 << 20);
        m.variants = vec![big, q4_1, q4_0];
        let mut f = facts(1024, "x86_64", &[]);
        assert_eq!(select_variant(&m, &f).unwrap().id, "q4_1", "no SIMD: the publisher's order");
        f.simd = true;
        assert_eq!(select_variant(&m, &f).unwrap().id, "q4_0", "Q4_1 runs on scalar kernels");
        f.ram_bytes = 8192 << 20;
        assert_eq!(select_variant(&m, &f).unwrap().id, "q8_0", "the first fast one that fits");
        m.variants.retain(|v| v.id == "q4_1");
        assert_eq!(select_variant(&m, &f).unwrap().id, "q4_1", "a slow one rather than none");
        assert!(has_fast_kernels("Q4_K_M") && has_fast_kernels("q6_k") && !has_fast_kernels("Q5_1"));
    }

    #[test]
    fn a_node_that_measured_its_kernels_takes_the_first_variant_about_as_fast_as_the_fastest() {
        let mut m = sample_manifest(1);
        let base = m.variants[0].clone();
        let variant = |id: &str, q: &str| Variant { id: id.into(), quantization: q.into(), ..base.clone() };
        m.variants = vec![variant("q8_0", "Q8_0"), variant("q4_k_m", "Q4_K_M"), variant("q4_0", "Q4_0")];
        let mut f = facts(8192, "x86_64", &[]);
        f.simd = true;
        let measured = |pairs: &[(&str, u32)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        // Q8_0 within 25% of the fastest: the publisher's first choice stays.
        f.kernel_ps_per_weight = measured(&[("Q8_0", 240), ("Q4_K", 260), ("Q4_0", 200)]);
        assert_eq!(select_variant(&m, &f).unwrap().id, "q8_0");
        // Q8_0 slow on this CPU (memory-bound, say): the next one that keeps up.
        f.kernel_ps_per_weight = measured(&[("Q8_0", 400), ("Q4_K", 240), ("Q4_0", 200)]);
        assert_eq!(select_variant(&m, &f).unwrap().id, "q4_k_m");
        f.kernel_ps_per_weight = measured(&[("Q8_0", 400), ("Q4_K", 300), ("Q4_0", 200)]);
        assert_eq!(select_variant(&m, &f).unwrap().id, "q4_0");
        // The measurement beats the table: Q4_1 measured fast here is taken first.
        m.variants = vec![variant("q4_1", "Q4_1"), variant("q4_0", "Q4_0")];
        f.kernel_ps_per_weight = measured(&[("Q4_1", 210), ("Q4_0", 200)]);
        assert_eq!(select_variant(&m, &f).unwrap().id, "q4_1");
        f.kernel_ps_per_weight = measured(&[("Q4_1", 400), ("Q4_0", 200)]);
        assert_eq!(select_variant(&m, &f).unwrap().id, "q4_0");
        // A kind not measured: the table decides (Q4_0 has fast kernels, Q4_1 not).
        f.kernel_ps_per_weight = measured(&[("Q4_0", 200)]);
        assert_eq!(select_variant(&m, &f).unwrap().id, "q4_0");
        // Only variants that fit are compared.
        m.variants[1].min_ram_bytes = 1 << 40;
        f.kernel_ps_per_weight = measured(&[("Q4_1", 400), ("Q4_0", 200)]);
        assert_eq!(select_variant(&m, &f).unwrap().id, "q4_1");
        assert_eq!(kernel_kind("q4_k_s"), "Q4_K");
        assert_eq!(kernel_kind("Q8_0"), "Q8_0");
    }

    #[test]
    fn nothing_fits_says_why() {
        let m = two_variants();
        let err = select_variant(&m, &facts(256, "riscv64", &[])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("q8_0: needs 4096 MiB"), "{text}");
        assert!(text.contains("q4_1: needs 512 MiB"), "{text}");
        let err = select_variant(&m, &facts(1024, "riscv64", &[])).unwrap_err().to_string();
        assert!(err.contains("built for"), "{err}");
    }
}
