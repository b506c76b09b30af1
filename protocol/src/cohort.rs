//! Cohorts: where a node stands in the rollout order of one model version.
//!
//! A node's cohort is BLAKE3(node id, model name, version) mapped to [0, 1): stable,
//! uniform, different for each version (so the same nodes are not always the canaries),
//! and needing no coordination. A node is in wave `i` when its cohort is below wave
//! `i`'s cumulative fraction and not below wave `i-1`'s.

use crate::identity::NodeId;
use crate::rollout::RolloutPlan;
use crate::trust::Tags;

pub fn cohort(node: &NodeId, model: &str, version: u64) -> f64 {
    let mut h = blake3::Hasher::new_derive_key("slmesh cohort v1");
    h.update(node.as_bytes());
    h.update(&(model.len() as u64).to_le_bytes());
    h.update(model.as_bytes());
    h.update(&version.to_le_bytes());
    let bytes = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    // The top 53 bits fill an f64 mantissa exactly: the result is in [0, 1).
    (u64::from_le_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The wave (0-based) a cohort value falls in, or `None` when it is beyond the plan's
/// last fraction (a plan that stops short of 100%).
pub fn wave_of(plan: &RolloutPlan, cohort: f64) -> Option<usize> {
    plan.waves.iter().position(|w| cohort < w.fraction)
}

/// Where a node stands in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// The selector excludes the node: the rollout is not for it.
    NotEligible,
    /// Eligible, but beyond the last wave.
    BeyondLastWave,
    /// In this wave (0-based).
    Wave(usize),
}

pub fn membership(plan: &RolloutPlan, node: &NodeId, tags: &Tags, model: &str, version: u64) -> Membership {
    if !plan.selector.matches(tags) {
        return Membership::NotEligible;
    }
    match wave_of(plan, cohort(node, model, version)) {
        Some(i) => Membership::Wave(i),
        None => Membership::BeyondLastWave,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Gates, TagSelector, Wave};
    use rand::{RngCore, SeedableRng};

    fn plan(fractions: &[f64]) -> RolloutPlan {
        RolloutPlan {
            waves: fractions.iter().map(|&f| Wave { fraction: f, soak_secs: 60 }).collect(),
            selector: TagSelector::default(),
            gates: Gates::default(),
        }
    }

    fn random_ids(n: usize, seed: u64) -> Vec<NodeId> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let mut b = [0u8; 32];
                rng.fill_bytes(&mut b);
                NodeId::from_bytes(b)
            })
            .collect()
    }

    #[test]
    fn ten_thousand_nodes_split_into_waves_within_two_percent() {
        let plan = plan(&[0.05, 0.25, 1.0]);
        let ids = random_ids(10_000, 42);
        for version in [1u64, 2, 3] {
            let mut counts = [0usize; 3];
            for id in &ids {
                counts[wave_of(&plan, cohort(id, "smollm2", version)).unwrap()] += 1;
            }
            let mut cumulative = 0;
            for (i, w) in plan.waves.iter().enumerate() {
                cumulative += counts[i];
                let got = cumulative as f64 / ids.len() as f64;
                assert!((got - w.fraction).abs() <= 0.02, "version {version} wave {i}: {got} vs {}", w.fraction);
            }
        }
    }

    #[test]
    fn cohort_is_stable_and_in_range() {
        for id in random_ids(1000, 7) {
            let c = cohort(&id, "m", 9);
            assert!((0.0..1.0).contains(&c));
            assert_eq!(c, cohort(&id, "m", 9));
        }
    }

    #[test]
    fn canaries_change_between_versions() {
        let plan = plan(&[0.1, 1.0]);
        let ids = random_ids(2000, 3);
        let canaries = |v| ids.iter().filter(|id| wave_of(&plan, cohort(id, "m", v)) == Some(0)).count();
        let both = ids
            .iter()
            .filter(|id| wave_of(&plan, cohort(id, "m", 1)) == Some(0) && wave_of(&plan, cohort(id, "m", 2)) == Some(0))
            .count();
        // Independent draws: about 1% of nodes are canaries twice, not 10%.
        assert!(canaries(1) > 150 && canaries(2) > 150);
        assert!(both < 60, "{both} nodes were canaries for both versions");
    }

    #[test]
    fn selector_and_partial_plans() {
        let mut p = plan(&[0.5]);
        p.selector.require.insert("site".into(), vec!["a".into(), "b".into()]);
        let id = random_ids(1, 1)[0];
        let tags_a: Tags = [("site".to_string(), "a".to_string())].into();
        let tags_c: Tags = [("site".to_string(), "c".to_string())].into();
        assert_eq!(membership(&p, &id, &tags_c, "m", 1), Membership::NotEligible);
        assert_eq!(membership(&p, &id, &Tags::new(), "m", 1), Membership::NotEligible);
        let c = cohort(&id, "m", 1);
        let expected = if c < 0.5 { Membership::Wave(0) } else { Membership::BeyondLastWave };
        assert_eq!(membership(&p, &id, &tags_a, "m", 1), expected);
    }
}
