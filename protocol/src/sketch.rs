//! A DDSketch (Masson, Rim, Lee: "DDSketch: a fast and fully-mergeable quantile sketch
//! with relative-error guarantees", VLDB 2019) with a wire form that can be checked.
//!
//! Why not the `sketches-ddsketch` crate, which slmesh used for local quantiles first: its
//! serde form is its internal store (offsets, bin vectors, counts) and nothing checks on
//! decode that those agree, while a metrics record comes from the network. Here a sketch
//! is a sorted list of (bucket index, count) with bounded length: every decoded value is
//! a valid sketch, and merging is adding counts per bucket, exactly as in the paper.

use crate::error::ProtocolError;
use serde::{Deserialize, Serialize};

/// Relative accuracy of every quantile sketch in the fleet (2%: the gates compare p95s
/// against limits of 1.5x, and 2% takes a metrics record from about 707 to 607 bytes
/// against 1%). One value fleet-wide, so that sketches from different nodes merge
/// exactly: changing it changes the metrics topic (`mesh::TOPIC_METRICS`).
pub const RELATIVE_ACCURACY: f64 = 0.02;
/// Values are clamped into [MIN_VALUE, MAX_VALUE] (seconds, tokens/s): a log scale cannot
/// hold zero, and the bound keeps the number of buckets bounded.
pub const MIN_VALUE: f64 = 1e-6;
pub const MAX_VALUE: f64 = 1e6;
/// ln(MAX/MIN) / ln(gamma) is about 700 buckets at 2%: the most a sketch can have.
pub const MAX_BUCKETS: usize = 2048;

fn gamma() -> f64 {
    (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)
}

fn index_of(v: f64) -> i32 {
    (v.clamp(MIN_VALUE, MAX_VALUE).ln() / gamma().ln()).ceil() as i32
}

/// The value a bucket stands for: within RELATIVE_ACCURACY of every value in it.
fn value_of(index: i32) -> f64 {
    let g = gamma();
    2.0 * g.powi(index) / (g + 1.0)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "SketchWire", try_from = "SketchWire")]
pub struct Sketch {
    /// The bucket index of `counts[0]`. Dense counts (the value range holds about 1,400
    /// buckets at most) rather than a map: decoding a record's sketches is on the path of
    /// every gossiped metrics record. Kept trimmed: empty with `first` 0, or its first
    /// and last counts non-zero, so that equal sketches are equal values.
    first: i32,
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Sketch {
    pub fn add(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let v = v.clamp(MIN_VALUE, MAX_VALUE);
        self.add_to(index_of(v), 1);
        self.count = self.count.saturating_add(1);
        self.sum += v;
    }

    /// Makes room for buckets `lo..=hi` (both in the value range).
    fn cover(&mut self, lo: i32, hi: i32) {
        if self.counts.is_empty() {
            self.first = lo;
        }
        if lo < self.first {
            let grow = (self.first - lo) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.first = lo;
        }
        let len = (hi - self.first + 1) as usize;
        if len > self.counts.len() {
            self.counts.resize(len, 0);
        }
    }

    fn add_to(&mut self, index: i32, c: u64) {
        if c == 0 {
            return;
        }
        self.cover(index, index);
        let slot = &mut self.counts[(index - self.first) as usize];
        *slot = slot.saturating_add(c);
    }

    fn last(&self) -> Option<i32> {
        (!self.counts.is_empty()).then(|| self.first + self.counts.len() as i32 - 1)
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// The `q` quantile (0..=1) within RELATIVE_ACCURACY, if the sketch holds any value.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        // The rank of the value wanted, as in the paper: floor(q * (n - 1)).
        let rank = (q * (self.count - 1) as f64).floor() as u64;
        let mut seen = 0u64;
        for (k, count) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(*count);
            if seen > rank {
                return Some(value_of(self.first + k as i32));
            }
        }
        self.last().map(value_of)
    }

    /// Adds `other`'s counts. Order does not matter: merging is per-bucket addition.
    /// Counts come from the network: each sketch is valid alone, but two with counts near
    /// `u64::MAX` would overflow, so sums saturate (a saturated sketch still answers
    /// quantiles, skewed towards the other sketch's values, and never panics).
    pub fn merge(&mut self, other: &Sketch) {
        if let Some(last) = other.last() {
            self.cover(other.first, last);
            let offset = (other.first - self.first) as usize;
            for (slot, c) in self.counts[offset..].iter_mut().zip(&other.counts) {
                *slot = slot.saturating_add(*c);
            }
        }
        self.count = self.count.saturating_add(other.count);
        self.sum = (self.sum + other.sum).min(f64::MAX);
    }

    /// Checks a sketch decoded from the network: bounded, consistent, finite.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |r: &str| Err(ProtocolError::invalid("sketch", r));
        if self.counts.len() > MAX_BUCKETS {
            return bad("too many buckets");
        }
        let (lo, hi) = (index_of(MIN_VALUE), index_of(MAX_VALUE));
        if let Some(last) = self.last() {
            if self.first < lo || last > hi {
                return bad("a bucket outside the value range");
            }
            if self.counts[0] == 0 || self.counts[self.counts.len() - 1] == 0 {
                return bad("empty buckets at an end");
            }
        } else if self.first != 0 {
            return bad("an empty sketch with a first bucket");
        }
        let total = self.counts.iter().try_fold(0u64, |a, c| a.checked_add(*c));
        if total != Some(self.count) {
            return bad("bucket counts do not add up to the count");
        }
        if !self.sum.is_finite() || self.sum < 0.0 {
            return bad("sum is not a finite non-negative number");
        }
        Ok(())
    }
}

/// The wire form: the counts of consecutive buckets from `first`, each as a LEB128
/// varint (most are a byte or two), a run of empty buckets as a zero followed by the
/// run's length (a varint), and the sum. The total count is the sum of the counts, so it
/// cannot disagree with them. Real latencies spread over a hundred buckets with a few
/// dozen samples: the runs keep such a sketch near two bytes per measured bucket.
#[derive(Serialize, Deserialize)]
struct SketchWire {
    first: i32,
    #[serde(with = "serde_bytes")]
    counts: Vec<u8>,
    sum: f64,
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Reads one LEB128 varint from the front of `bytes`.
fn take_varint(bytes: &mut &[u8]) -> Result<u64, String> {
    let (mut value, mut shift) = (0u64, 0u32);
    loop {
        let Some((&byte, rest)) = bytes.split_first() else { return Err("the last bucket count is cut short".into()) };
        *bytes = rest;
        if shift > 63 || (shift == 63 && byte > 1) {
            return Err("a bucket count overflows 64 bits".into());
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
    }
}

impl From<Sketch> for SketchWire {
    fn from(s: Sketch) -> Self {
        let mut counts = Vec::with_capacity(s.counts.len() * 2);
        let mut k = 0;
        while k < s.counts.len() {
            let run = s.counts[k..].iter().take_while(|c| **c == 0).count();
            if run > 0 {
                counts.push(0);
                push_varint(&mut counts, run as u64);
                k += run;
            } else {
                push_varint(&mut counts, s.counts[k]);
                k += 1;
            }
        }
        SketchWire { first: s.first, counts, sum: s.sum }
    }
}

impl TryFrom<SketchWire> for Sketch {
    type Error = String;

    fn try_from(w: SketchWire) -> Result<Self, String> {
        let (lo, hi) = (index_of(MIN_VALUE), index_of(MAX_VALUE));
        let mut sketch = Sketch::default();
        let mut count = 0u64;
        let mut index = w.first;
        let mut bytes = w.counts.as_slice();
        while !bytes.is_empty() {
            let value = take_varint(&mut bytes)?;
            if value == 0 {
                // A run of empty buckets: it cannot reach past the value range.
                let run = take_varint(&mut bytes)?;
                if run == 0 || run > (hi - lo + 1) as u64 {
                    return Err(format!("a run of {run} empty buckets"));
                }
                index = index.checked_add(run as i32).ok_or("bucket index overflows")?;
                continue;
            }
            if index < lo || index > hi {
                return Err(format!("bucket {index} is outside the value range"));
            }
            // In range, so the dense counts stay within the range's buckets.
            sketch.add_to(index, value);
            count = count.checked_add(value).ok_or("the total count overflows")?;
            index = index.checked_add(1).ok_or("bucket index overflows")?;
        }
        sketch.count = count;
        sketch.sum = w.sum;
        sketch.validate().map_err(|e| e.to_string())?;
        Ok(sketch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact_quantile(values: &mut [f64], q: f64) -> f64 {
        values.sort_by(f64::total_cmp);
        values[(q * (values.len() - 1) as f64).floor() as usize]
    }

    proptest! {
        #[test]
        fn quantiles_are_within_the_relative_accuracy(
            values in proptest::collection::vec(1e-3f64..1e3, 1..400),
            q in 0.0f64..=1.0,
        ) {
            let mut s = Sketch::default();
            for v in &values {
                s.add(*v);
            }
            let mut v = values.clone();
            let exact = exact_quantile(&mut v, q);
            let got = s.quantile(q).unwrap();
            prop_assert!((got - exact).abs() <= RELATIVE_ACCURACY * exact * 1.0001, "q={q} exact={exact} got={got}");
        }

        #[test]
        fn merging_is_order_independent_and_matches_the_pooled_samples(
            parts in proptest::collection::vec(proptest::collection::vec(1e-3f64..1e3, 0..50), 1..6),
            q in 0.0f64..=1.0,
        ) {
            let sketches: Vec<Sketch> = parts.iter().map(|p| {
                let mut s = Sketch::default();
                p.iter().for_each(|v| s.add(*v));
                s
            }).collect();
            let mut forward = Sketch::default();
            sketches.iter().for_each(|s| forward.merge(s));
            let mut backward = Sketch::default();
            sketches.iter().rev().for_each(|s| backward.merge(s));
            prop_assert_eq!((forward.first, &forward.counts), (backward.first, &backward.counts));
            prop_assert_eq!(forward.count, backward.count);
            let mut pooled: Vec<f64> = parts.concat();
            if !pooled.is_empty() {
                let exact = exact_quantile(&mut pooled, q);
                let got = forward.quantile(q).unwrap();
                prop_assert!((got - exact).abs() <= RELATIVE_ACCURACY * exact * 1.0001);
            }
        }
    }

    proptest! {
        #[test]
        fn the_wire_form_round_trips(values in proptest::collection::vec(1e-7f64..1e7, 0..300)) {
            let mut s = Sketch::default();
            values.iter().for_each(|v| s.add(*v));
            let bytes = crate::wire::encode(&s).unwrap();
            prop_assert_eq!(crate::wire::decode::<Sketch>(&bytes, "sketch").unwrap(), s);
        }

        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = crate::wire::decode::<Sketch>(&bytes, "sketch");
        }
    }

    #[test]
    fn a_malformed_wire_form_is_refused() {
        let decode = |first: i32, counts: Vec<u8>, sum: f64| {
            let bytes = crate::wire::encode(&(first, counts, sum)).unwrap();
            crate::wire::decode::<Sketch>(&bytes, "sketch")
        };
        let three_gap_two = decode(0, vec![3, 0, 4, 2], 1.0).expect("3, four empty buckets, 2");
        assert_eq!((three_gap_two.first, three_gap_two.counts.as_slice()), (0, &[3, 0, 0, 0, 0, 2][..]));
        assert!(decode(i32::MAX, vec![1], 1.0).is_err(), "out of range");
        assert!(decode(0, vec![0x80], 1.0).is_err(), "cut short");
        assert!(decode(0, vec![1, 0], 1.0).is_err(), "a run without its length");
        assert!(decode(0, vec![1, 0, 0, 1], 1.0).is_err(), "a run of no buckets");
        assert!(decode(0, vec![1, 0, 0xff, 0xff, 0x03, 1], 1.0).is_err(), "a run past the value range");
        assert!(decode(0, vec![0xff; 11], 1.0).is_err(), "overflow");
        assert!(decode(0, vec![1], f64::NAN).is_err(), "sum");
        assert!(decode(i32::MAX - 1, vec![0, 5, 1], 0.0).is_err(), "index overflow");
    }

    #[test]
    fn a_sparse_sketch_costs_its_measured_buckets_not_its_span() {
        // 40 latencies spread from 1 ms to 100 ms: about 117 buckets at 2%, most empty.
        let mut s = Sketch::default();
        (0..40).for_each(|k| s.add(1e-3 * 100f64.powf(k as f64 / 39.0)));
        let measured = s.counts.iter().filter(|c| **c > 0).count();
        let wire = SketchWire::from(s.clone());
        assert!(s.counts.len() > 100, "{} buckets", s.counts.len());
        assert!(wire.counts.len() <= 3 * measured, "{} bytes for {measured} measured buckets", wire.counts.len());
        assert_eq!(Sketch::try_from(wire).expect("decodes"), s);
    }

    #[test]
    fn inconsistent_sketches_are_refused() {
        let mut s = Sketch::default();
        s.add(0.5);
        assert!(s.validate().is_ok());
        let mut lying = s.clone();
        lying.count = 99;
        assert!(lying.validate().is_err());
        let far = Sketch { first: index_of(MAX_VALUE) + 1, counts: vec![1], count: 1, sum: 1.0 };
        assert!(far.validate().is_err());
        let padded = Sketch { first: 0, counts: vec![1, 0], count: 1, sum: 1.0 };
        assert!(padded.validate().is_err(), "not trimmed: would compare unequal to its equal");
        let mut nan = s;
        nan.sum = f64::NAN;
        assert!(nan.validate().is_err());
        assert_eq!(Sketch::default().quantile(0.5), None);
    }

    #[test]
    fn merging_sketches_with_counts_near_u64_max_saturates_without_a_panic() {
        // Each valid alone (a remote record's sketch), together past u64::MAX.
        let huge = Sketch { first: index_of(0.5), counts: vec![u64::MAX - 1], count: u64::MAX - 1, sum: 1e300 };
        assert!(huge.validate().is_ok());
        let mut merged = huge.clone();
        merged.merge(&huge);
        merged.merge(&huge);
        assert_eq!(merged.count(), u64::MAX);
        assert!(merged.sum().is_finite());
        assert!(merged.quantile(0.99).is_some_and(|v| (v - 0.5).abs() < 0.01));
        let mut other = Sketch::default();
        other.add(2.0);
        other.merge(&huge);
        assert!(other.quantile(1.0).is_some());
    }
}
