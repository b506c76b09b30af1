//! Shadow comparison: on canary nodes, during the canary's soak, a sample of live requests
//! is answered a second time by the version the node served before, and the two answers
//! are scored for agreement (chrF, below). Prompts and answers stay on the node: what it
//! shares is, per version, a sketch of the scores (`VersionReport::agreement`), which the
//! gates read as each node's median (`Gates::agreement`).
//!
//! Decided here: when a node shadows (`Node` emits `Output::Shadow`: its wave is the
//! canary, the canary still soaks, the plan asks for it, the baseline's weights fit the
//! node's budget), which requests (`ShadowSampler`: a fixed share, at most one comparison
//! at a time, none while live requests wait) and the score (`agreement`). The driver
//! loads the baseline, runs the second answer and hands the score back.

use serde::{Deserialize, Serialize};

/// The shadow comparison a rollout plan asks of its canary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgreementGate {
    /// Lowest acceptable agreement with the previous version (the median across nodes of
    /// each node's median score), in [0, 1].
    pub min: f64,
    /// The share of live requests a canary node answers a second time, in (0, 1].
    pub sample: f64,
}

/// The share of live requests compared when the publisher names none.
pub const DEFAULT_SAMPLE: f64 = 0.1;
/// A node's agreement counts in the gate once it compared this many answers: its median
/// then rests on several prompts, not on one that a good version happens to word otherwise.
pub const MIN_NODE_COMPARISONS: u64 = 5;
/// Each answer is scored on at most this many characters: the score's cost is bounded
/// whatever a client asked for.
pub const MAX_SCORED_CHARS: usize = 4096;
/// chrF's character n-gram orders, and the weight of recall over precision (chrF2).
const MAX_ORDER: usize = 6;
const BETA: f64 = 2.0;

/// A canary node's shadowing of one version: what the driver loads beside it and how
/// much of the traffic it compares.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowPlan {
    pub model: String,
    /// The version served, whose answers are scored.
    pub candidate: u64,
    /// The version it replaced on this node, which answers again.
    pub baseline: u64,
    /// The baseline's weights file, under its version's folder.
    pub baseline_weights: String,
    pub sample: f64,
}

/// How much two answers to the same request agree: chrF2 (Popović, "chrF: character
/// n-gram F-score for automatic MT evaluation", WMT 2015) on the texts with whitespace
/// removed: the F-score (recall weighted twice) of character n-grams of orders 1 to 6,
/// averaged over the orders either text is long enough for. 1 for equal texts, near 0
/// for unrelated ones; symmetric in neither's favour except for the recall weight, so
/// `reference` is the baseline's answer. Two empty answers agree fully.
pub fn agreement(candidate: &str, reference: &str) -> f64 {
    let chars = |s: &str| -> Vec<char> { s.chars().filter(|c| !c.is_whitespace()).take(MAX_SCORED_CHARS).collect() };
    let (hyp, refr) = (chars(candidate), chars(reference));
    if hyp.is_empty() && refr.is_empty() {
        return 1.0;
    }
    let mut total = 0.0;
    let mut orders = 0;
    for n in 1..=MAX_ORDER {
        if hyp.len() < n && refr.len() < n {
            break;
        }
        let (h, r) = (ngrams(&hyp, n), ngrams(&refr, n));
        let matched: usize = h.iter().map(|(g, c)| (*c).min(r.get(g).copied().unwrap_or(0))).sum();
        let (hc, rc) = (h.values().sum::<usize>(), r.values().sum::<usize>());
        let precision = if hc == 0 { 0.0 } else { matched as f64 / hc as f64 };
        let recall = if rc == 0 { 0.0 } else { matched as f64 / rc as f64 };
        let b2 = BETA * BETA;
        let f =
            if precision + recall == 0.0 { 0.0 } else { (1.0 + b2) * precision * recall / (b2 * precision + recall) };
        total += f;
        orders += 1;
    }
    if orders == 0 {
        0.0
    } else {
        (total / orders as f64).clamp(0.0, 1.0)
    }
}

fn ngrams(chars: &[char], n: usize) -> std::collections::HashMap<&[char], usize> {
    let mut counts = std::collections::HashMap::new();
    if chars.len() >= n {
        for g in chars.windows(n) {
            *counts.entry(g).or_insert(0) += 1;
        }
    }
    counts
}

/// Which answered requests a node compares: a fixed share of them (by credit, not by
/// chance: `sample` 0.1 is exactly every tenth), at most one comparison at a time, and
/// none while live requests wait for a turn. A request that comes due while a comparison
/// runs, or while others wait, is skipped (counted), not queued: the comparison yields to
/// live traffic.
const PPM: u64 = 1_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct ShadowSampler {
    /// The share, in millionths: whole numbers, so that ten offers at 0.1 make exactly one
    /// (ten additions of 0.1 in floating point fall short of 1).
    share_ppm: u64,
    credit_ppm: u64,
    running: bool,
    pub started: u64,
    pub skipped: u64,
}

impl ShadowSampler {
    pub fn new(sample: f64) -> Self {
        let sample = if sample.is_finite() { sample.clamp(0.0, 1.0) } else { 0.0 };
        let share_ppm = (sample * PPM as f64).round() as u64;
        ShadowSampler { share_ppm, credit_ppm: 0, running: false, started: 0, skipped: 0 }
    }

    /// A live request was answered (`waiting`: live requests waiting for a turn now):
    /// whether to compare it. A true answer must be followed by `finished`.
    pub fn offer(&mut self, waiting: usize) -> bool {
        self.credit_ppm += self.share_ppm;
        if self.credit_ppm < PPM {
            return false;
        }
        self.credit_ppm -= PPM;
        if self.running || waiting > 0 {
            self.skipped += 1;
            return false;
        }
        self.running = true;
        self.started += 1;
        true
    }

    /// The comparison `offer` started ended (scored or not).
    pub fn finished(&mut self) {
        self.running = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_answers_agree_fully_and_unrelated_ones_hardly() {
        let a = "The capital of France is Paris.";
        assert_eq!(agreement(a, a), 1.0);
        assert_eq!(agreement("", ""), 1.0);
        assert_eq!(agreement("", a), 0.0);
        assert_eq!(agreement(a, ""), 0.0);
        // Whitespace does not count.
        assert_eq!(agreement("The capital  of\nFrance is Paris.", a), 1.0);
        let close = agreement("The capital of France is Paris!", a);
        assert!(close > 0.85 && close < 1.0, "{close}");
        let unrelated = agreement("qzx vvk 12 ;; lorem", a);
        assert!(unrelated < 0.1, "{unrelated}");
        let other_sentence = agreement("Dogs have four legs and a tail.", a);
        assert!(other_sentence < 0.3, "{other_sentence}");
        // Short texts: only the orders they are long enough for.
        assert!(agreement("ab", "ab") == 1.0 && agreement("a", "b") == 0.0);
    }

    #[test]
    fn scores_stay_in_range_on_any_text() {
        for (x, y) in [("é😀", "😀é"), ("a", "aaaaaaaaaaaaaaaaa"), ("\u{0}", "\u{0}\u{0}"), ("   ", "x")] {
            let s = agreement(x, y);
            assert!((0.0..=1.0).contains(&s), "{x:?} {y:?}: {s}");
        }
        // Long answers cost a bounded amount: only the first MAX_SCORED_CHARS count.
        let long = "x".repeat(1 << 20);
        let longer = format!("{long}different tail");
        assert_eq!(agreement(&long, &longer), 1.0);
    }

    #[test]
    fn the_sampler_takes_its_share_one_at_a_time_and_yields_to_waiting_requests() {
        let mut s = ShadowSampler::new(0.25);
        let taken: Vec<bool> = (0..8)
            .map(|_| {
                let t = s.offer(0);
                if t {
                    s.finished();
                }
                t
            })
            .collect();
        assert_eq!(taken, [false, false, false, true, false, false, false, true]);
        // A tenth is exactly one in ten, every ten.
        let mut s = ShadowSampler::new(0.1);
        let taken = (0..100)
            .filter(|_| {
                s.offer(0) && {
                    s.finished();
                    true
                }
            })
            .count();
        assert_eq!(taken, 10);
        let mut s = ShadowSampler::new(0.1);
        assert!((0..9).all(|_| !s.offer(0)) && s.offer(0));
        // One at a time: a due request while one runs is skipped, not queued.
        let mut s = ShadowSampler::new(1.0);
        assert!(s.offer(0));
        assert!(!s.offer(0));
        s.finished();
        // Live requests waiting: skipped.
        assert!(!s.offer(2));
        assert!(s.offer(0));
        assert_eq!((s.started, s.skipped), (2, 2));
        // Nonsense shares take nothing or everything, never panic.
        assert!(!ShadowSampler::new(f64::NAN).offer(0));
        assert!(!ShadowSampler::new(-3.0).offer(0));
        assert!(ShadowSampler::new(7.0).offer(0));
    }
}
