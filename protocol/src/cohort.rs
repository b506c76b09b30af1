//! Cohorts: where a node stands in the rollout order of one model version.
//!
//! A node's cohort is BLAKE3(node id, model name, version) mapped to [0, 1): stable,
//! uniform, different for each version (so the same nodes are not always the canaries),
//! and needing no coordination. A node is in wave `i` when its cohort is below wave
//! `i`'s cumulative fraction and not below wave `i-1`'s.
//!
//! Hashes alone can leave the canary empty in a small fleet (a 30% canary of 4 nodes is
//! empty about a quarter of the time), and a canary smaller than the gates' minimum of
//! reporting nodes never gets a verdict. So the canary has a floor: the eligible nodes
//! with the lowest cohorts among those a node knows are in wave 0 too, as many as the
//! gates need (`min_reporting_nodes`, at least one). The floor applies only while the
//! fleet a node has evidence of is too small for the hash to fill the canary twice over,
//! so in a large fleet the canary stays the plan's fraction.
//!
//! A node that knows only part of the fleet (its direct peers, in a mesh) cannot know its
//! rank, and counting itself among the lowest of the few it knows would make most of a
//! sparse mesh canaries (60% of a 100-node fleet of degree 4, as the simulator found). So
//! such a node joins by the floor only if, besides being among the lowest it knows, its
//! cohort puts it among the lowest `2 x floor` nodes expected in a fleet of the size it
//! has evidence of (`cohort x size < 2 x floor`): about twice the floor join, the truly
//! lowest node almost surely among them (it misses the bound with probability about
//! e^(-2 x floor), 0.25% for a floor of 3). A node that knows the whole fleet uses its
//! exact rank.

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
    crate::panel::rank_fraction(u64::from_le_bytes(first))
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

/// How many nodes the canary holds at least.
pub fn canary_floor(plan: &RolloutPlan) -> usize {
    plan.gates.min_reporting_nodes.max(1) as usize
}

/// Whether the floor applies for a fleet of about `fleet_size` nodes: the hash alone is
/// expected to put fewer than twice the floor in the canary.
fn floor_applies(plan: &RolloutPlan, fleet_size: usize) -> bool {
    let first = plan.waves.first().map_or(1.0, |w| w.fraction);
    first * (fleet_size as f64) < 2.0 * canary_floor(plan) as f64
}

/// `membership`, with the canary floor. `known`: the other nodes this node knows, with
/// their certified tags; `fleet_size`: the largest count of nodes it has evidence of
/// (itself included), for example from metrics records.
pub fn membership_with_floor<'a>(
    plan: &RolloutPlan,
    node: &NodeId,
    tags: &Tags,
    model: &str,
    version: u64,
    known: impl IntoIterator<Item = (&'a NodeId, &'a Tags)>,
    fleet_size: usize,
) -> Membership {
    let others = sorted_cohorts(plan, known.into_iter().filter(|(other, _)| *other != node), model, version);
    membership_among(plan, node, tags, model, version, &others, fleet_size)
}

/// `membership_with_floor`, given the other known nodes as `sorted_cohorts` gives them.
pub fn membership_among(
    plan: &RolloutPlan,
    node: &NodeId,
    tags: &Tags,
    model: &str,
    version: u64,
    others: &[f64],
    fleet_size: usize,
) -> Membership {
    let by_hash = membership(plan, node, tags, model, version);
    if !matches!(by_hash, Membership::Wave(w) if w > 0) && by_hash != Membership::BeyondLastWave {
        return by_hash;
    }
    let mine = cohort(node, model, version);
    let eligible = 1 + others.len();
    let lower = others.partition_point(|c| *c < mine);
    let (size, floor) = (eligible.max(fleet_size), canary_floor(plan));
    let knows_all = eligible >= size;
    let low_enough = knows_all || mine * (size as f64) < 2.0 * floor as f64;
    if floor_applies(plan, size) && lower < floor && low_enough {
        Membership::Wave(0)
    } else {
        by_hash
    }
}

/// The cohort values of those of `nodes` the plan selects, ascending: what
/// `membership_among` and `wave_counts_among` count over. A node keeps them per version
/// while the nodes it knows stay the same (hashing every known node at every rollout
/// tick was about a tenth of a simulated fleet's time).
pub fn sorted_cohorts<'a>(
    plan: &RolloutPlan,
    nodes: impl IntoIterator<Item = (&'a NodeId, &'a Tags)>,
    model: &str,
    version: u64,
) -> Vec<f64> {
    let mut cohorts: Vec<f64> =
        nodes.into_iter().filter(|(_, t)| plan.selector.matches(t)).map(|(n, _)| cohort(n, model, version)).collect();
    cohorts.sort_by(f64::total_cmp);
    cohorts
}

/// How many of `nodes` (each with its tags; the counting node included) fall in each
/// wave with the canary floor applied, as a node that knows exactly these nodes sees it.
pub fn wave_counts<'a>(
    plan: &RolloutPlan,
    nodes: impl IntoIterator<Item = (&'a NodeId, &'a Tags)>,
    model: &str,
    version: u64,
    fleet_size: usize,
) -> Vec<usize> {
    let sorted = sorted_cohorts(plan, nodes, model, version);
    wave_counts_among(plan, sorted.len(), sorted.iter().copied(), fleet_size)
}

/// `wave_counts`, given the `count` nodes' cohort values in ascending order (as
/// `sorted_cohorts` gives them).
pub fn wave_counts_among(
    plan: &RolloutPlan,
    count: usize,
    sorted: impl Iterator<Item = f64>,
    fleet_size: usize,
) -> Vec<usize> {
    let mut counts = vec![0; plan.waves.len()];
    for wave in waves_in_order(plan, count, sorted, fleet_size) {
        if let Some(n) = wave.and_then(|w| counts.get_mut(w)) {
            *n += 1;
        }
    }
    counts
}

/// The wave of each of `count` cohort values given in ascending order, the canary floor
/// applied: the lowest `floor` go in the canary whatever their value says.
fn waves_in_order<'p>(
    plan: &'p RolloutPlan,
    count: usize,
    sorted: impl Iterator<Item = f64> + 'p,
    fleet_size: usize,
) -> impl Iterator<Item = Option<usize>> + 'p {
    let floor = if floor_applies(plan, count.max(fleet_size)) { canary_floor(plan) } else { 0 };
    sorted.enumerate().map(move |(rank, c)| if rank < floor { Some(0) } else { wave_of(plan, c) })
}

/// The wave of each of `nodes` (eligible ones, each with a payload), the canary floor
/// applied as in `wave_counts`; `None` beyond the plan's last wave.
pub fn waves_with_floor<'a, T>(
    plan: &RolloutPlan,
    nodes: impl IntoIterator<Item = (&'a NodeId, T)>,
    model: &str,
    version: u64,
    fleet_size: usize,
) -> Vec<(Option<usize>, T)> {
    let mut cohorts: Vec<(f64, T)> = nodes.into_iter().map(|(n, t)| (cohort(n, model, version), t)).collect();
    cohorts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let waves: Vec<Option<usize>> =
        waves_in_order(plan, cohorts.len(), cohorts.iter().map(|(c, _)| *c), fleet_size).collect();
    waves.into_iter().zip(cohorts.into_iter().map(|(_, t)| t)).collect()
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
    fn membership_over_sorted_cohorts_matches_counting_each_node() {
        // What membership_with_floor did before it took sorted cohorts: one pass, a hash each.
        let by_counting = |p: &RolloutPlan, me: &NodeId, others: &[NodeId], fleet_size: usize| {
            let by_hash = membership(p, me, &Tags::default(), "m", 7);
            if !matches!(by_hash, Membership::Wave(w) if w > 0) && by_hash != Membership::BeyondLastWave {
                return by_hash;
            }
            let mine = cohort(me, "m", 7);
            let lower = others.iter().filter(|o| cohort(o, "m", 7) < mine).count();
            let (size, floor) = ((1 + others.len()).max(fleet_size), canary_floor(p));
            let low_enough = 1 + others.len() >= size || mine * (size as f64) < 2.0 * floor as f64;
            if floor_applies(p, size) && lower < floor && low_enough {
                Membership::Wave(0)
            } else {
                by_hash
            }
        };
        let mut p = plan(&[0.05, 0.3, 1.0]);
        p.gates.min_reporting_nodes = 3;
        let tags = Tags::default();
        for (n, fleet_size) in [(1, 1), (5, 5), (20, 20), (20, 200), (60, 60), (300, 1000)] {
            let ids = random_ids(n, n as u64);
            for me in &ids {
                let others: Vec<NodeId> = ids.iter().filter(|o| *o != me).copied().collect();
                let sorted = sorted_cohorts(&p, others.iter().map(|o| (o, &tags)), "m", 7);
                let got = membership_among(&p, me, &tags, "m", 7, &sorted, fleet_size);
                assert_eq!(got, by_counting(&p, me, &others, fleet_size), "{n} nodes, fleet of {fleet_size}");
            }
            // And the counts over all of them agree with each node's own placement while
            // every node knows every other.
            let all = sorted_cohorts(&p, ids.iter().map(|o| (o, &tags)), "m", 7);
            let mut each = vec![0; p.waves.len()];
            for me in &ids {
                let others: Vec<NodeId> = ids.iter().filter(|o| *o != me).copied().collect();
                if let Membership::Wave(w) = by_counting(&p, me, &others, n) {
                    each[w] += 1;
                }
            }
            assert_eq!(wave_counts_among(&p, all.len(), all.iter().copied(), n), each, "{n} nodes");
        }
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
    fn the_canary_is_never_empty_and_holds_what_the_gates_need() {
        // A 30% canary on 4 nodes, gates needing 1 node, then 3: over many versions
        // (each a fresh draw of cohorts), every node deciding from what it knows.
        let ids = random_ids(4, 11);
        let tags = Tags::new();
        for need in [1u32, 3] {
            let mut p = plan(&[0.3, 1.0]);
            p.gates.min_reporting_nodes = need;
            let mut empty_by_hash = 0;
            for version in 0..200u64 {
                let known: Vec<(&NodeId, &Tags)> = ids.iter().map(|i| (i, &tags)).collect();
                let canaries = ids
                    .iter()
                    .filter(|id| {
                        membership_with_floor(&p, id, &tags, "m", version, known.iter().copied(), 4)
                            == Membership::Wave(0)
                    })
                    .count();
                assert!(canaries >= need as usize, "version {version}: {canaries} canaries, need {need}");
                assert_eq!(wave_counts(&p, known.iter().copied(), "m", version, 4)[0], canaries);
                empty_by_hash += usize::from(ids.iter().all(|id| wave_of(&p, cohort(id, "m", version)) != Some(0)));
            }
            assert!(empty_by_hash > 20, "the hash alone leaves the canary empty often ({empty_by_hash}/200)");
        }
    }

    #[test]
    fn in_a_large_fleet_the_canary_is_the_plans_fraction() {
        let p = plan(&[0.05, 1.0]);
        let ids = random_ids(2000, 5);
        let tags = Tags::new();
        // Each node knows only 8 others, but has heard of the whole fleet.
        let canaries = ids
            .iter()
            .enumerate()
            .filter(|(i, id)| {
                let known: Vec<(&NodeId, &Tags)> = (1..=8).map(|k| (&ids[(i + k) % ids.len()], &tags)).collect();
                membership_with_floor(&p, id, &tags, "m", 1, known, ids.len()) == Membership::Wave(0)
            })
            .count();
        assert!((70..130).contains(&canaries), "{canaries} of 2000 in a 5% canary");
    }

    #[test]
    fn a_node_that_knows_few_of_a_small_fleet_does_not_make_itself_a_canary() {
        // 100 nodes, a 5% canary, gates needing 3 nodes (so the floor applies), each node
        // knowing only its 4 mesh peers: about twice the floor are canaries, never none.
        let mut p = plan(&[0.05, 1.0]);
        p.gates.min_reporting_nodes = 3;
        let tags = Tags::new();
        let (mut total, mut fewest, mut most) = (0, usize::MAX, 0);
        for seed in 0..50u64 {
            let ids = random_ids(100, 100 + seed);
            let canaries = ids
                .iter()
                .enumerate()
                .filter(|(i, id)| {
                    let known: Vec<(&NodeId, &Tags)> = (1..=4).map(|k| (&ids[(i + 25 * k) % 100], &tags)).collect();
                    membership_with_floor(&p, id, &tags, "m", 1, known, ids.len()) == Membership::Wave(0)
                })
                .count();
            total += canaries;
            fewest = fewest.min(canaries);
            most = most.max(canaries);
        }
        assert!(fewest >= 1, "a canary was empty");
        assert!(most <= 15, "{most} of 100 nodes in a 5% canary");
        assert!((150..=400).contains(&total), "{total} canaries in 50 fleets of 100: about 6 each expected");
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
