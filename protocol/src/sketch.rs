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
use std::collections::BTreeMap;

/// Relative accuracy of every quantile sketch in the fleet (1%). One value fleet-wide, so
/// that sketches from different nodes merge exactly.
pub const RELATIVE_ACCURACY: f64 = 0.01;
/// Values are clamped into [MIN_VALUE, MAX_VALUE] (seconds, tokens/s): a log scale cannot
/// hold zero, and the bound keeps the number of buckets bounded.
pub const MIN_VALUE: f64 = 1e-6;
pub const MAX_VALUE: f64 = 1e6;
/// ln(MAX/MIN) / ln(gamma) is about 1,400 buckets at 1%: the most a sketch can have.
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
    buckets: BTreeMap<i32, u64>,
    count: u64,
    sum: f64,
}

impl Sketch {
    pub fn add(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let v = v.clamp(MIN_VALUE, MAX_VALUE);
        *self.buckets.entry(index_of(v)).or_default() += 1;
        self.count += 1;
        self.sum += v;
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
        for (index, count) in &self.buckets {
            seen += count;
            if seen > rank {
                return Some(value_of(*index));
            }
        }
        self.buckets.keys().next_back().map(|i| value_of(*i))
    }

    /// Adds `other`'s counts. Order does not matter: merging is per-bucket addition.
    pub fn merge(&mut self, other: &Sketch) {
        for (index, count) in &other.buckets {
            *self.buckets.entry(*index).or_default() += count;
        }
        self.count += other.count;
        self.sum += other.sum;
    }

    /// Checks a sketch decoded from the network: bounded, consistent, finite.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |r: &str| Err(ProtocolError::invalid("sketch", r));
        if self.buckets.len() > MAX_BUCKETS {
            return bad("too many buckets");
        }
        let (lo, hi) = (index_of(MIN_VALUE), index_of(MAX_VALUE));
        if self.buckets.keys().any(|i| *i < lo || *i > hi) {
            return bad("a bucket outside the value range");
        }
        let total = self.buckets.values().try_fold(0u64, |a, c| a.checked_add(*c));
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
/// varint (most are a byte or two), and the sum. The total count is the sum of the counts,
/// so it cannot disagree with them. About a seventh of a fixed-width (index, count) list.
#[derive(Serialize, Deserialize)]
struct SketchWire {
    first: i32,
    counts: Vec<u8>,
    sum: f64,
}

impl From<Sketch> for SketchWire {
    fn from(s: Sketch) -> Self {
        let first = s.buckets.keys().next().copied().unwrap_or(0);
        let last = s.buckets.keys().next_back().copied().unwrap_or(first - 1);
        let mut counts = vec![];
        for index in first..=last {
            let mut c = s.buckets.get(&index).copied().unwrap_or(0);
            loop {
                let byte = (c & 0x7f) as u8;
                c >>= 7;
                if c == 0 {
                    counts.push(byte);
                    break;
                }
                counts.push(byte | 0x80);
            }
        }
        SketchWire { first, counts, sum: s.sum }
    }
}

impl TryFrom<SketchWire> for Sketch {
    type Error = String;

    fn try_from(w: SketchWire) -> Result<Self, String> {
        let (lo, hi) = (index_of(MIN_VALUE), index_of(MAX_VALUE));
        let mut buckets = BTreeMap::new();
        let mut count = 0u64;
        let (mut index, mut value, mut shift) = (w.first, 0u64, 0u32);
        for byte in w.counts {
            if shift > 63 || (shift == 63 && byte > 1) {
                return Err("a bucket count overflows 64 bits".into());
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 != 0 {
                shift += 7;
                continue;
            }
            if value > 0 {
                if index < lo || index > hi {
                    return Err(format!("bucket {index} is outside the value range"));
                }
                buckets.insert(index, value);
                count = count.checked_add(value).ok_or("the total count overflows")?;
            }
            if buckets.len() > MAX_BUCKETS {
                return Err("too many buckets".into());
            }
            index = index.checked_add(1).ok_or("bucket index overflows")?;
            (value, shift) = (0, 0);
        }
        if shift != 0 {
            return Err("the last bucket count is cut short".into());
        }
        let sketch = Sketch { buckets, count, sum: w.sum };
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
            prop_assert_eq!(&forward.buckets, &backward.buckets);
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
        assert!(decode(0, vec![3, 0, 2], 1.0).is_ok());
        assert!(decode(i32::MAX, vec![1], 1.0).is_err(), "out of range");
        assert!(decode(0, vec![0x80], 1.0).is_err(), "cut short");
        assert!(decode(0, vec![0xff; 11], 1.0).is_err(), "overflow");
        assert!(decode(0, vec![1], f64::NAN).is_err(), "sum");
        assert!(decode(i32::MAX, vec![0, 0], 0.0).is_err(), "index overflow");
    }

    #[test]
    fn inconsistent_sketches_are_refused() {
        let mut s = Sketch::default();
        s.add(0.5);
        assert!(s.validate().is_ok());
        let mut lying = s.clone();
        lying.count = 99;
        assert!(lying.validate().is_err());
        let mut far = s.clone();
        far.buckets.insert(i32::MAX, 1);
        far.count += 1;
        assert!(far.validate().is_err());
        let mut nan = s;
        nan.sum = f64::NAN;
        assert!(nan.validate().is_err());
        assert_eq!(Sketch::default().quantile(0.5), None);
    }
}
