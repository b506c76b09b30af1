//! Variant selection: the first variant (publishers list them best first) that fits the
//! node's memory, CPU architecture and tags.

use crate::error::ProtocolError;
use crate::manifest::{ModelManifest, Variant};
use crate::trust::Tags;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    pub ram_bytes: u64,
    /// As Rust names it: `x86_64`, `aarch64`, ...
    pub cpu_arch: String,
    pub tags: Tags,
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
    for v in &manifest.variants {
        match misfit(v, facts) {
            None => return Ok(v),
            Some(why) => reasons.push(format!("{}: {why}", v.id)),
        }
    }
    Err(ProtocolError::NoVariantFits { name: manifest.name.clone(), reasons: reasons.join("; ") })
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
