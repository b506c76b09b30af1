//! Per-request measurements and their aggregation per model version.
//!
//! Quantiles come from DDSketch (`crate::sketch`) at one relative accuracy for the whole
//! fleet, so that sketches from different nodes merge exactly; Prometheus
//! histograms use fixed bucket bounds. Only numbers are kept: never a prompt or an output.

pub use crate::sketch::{Sketch, RELATIVE_ACCURACY};
use std::collections::BTreeMap;

/// Bucket upper bounds, in seconds, of the latency and time-to-first-token histograms.
pub const LATENCY_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// What one request measured.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RequestSample {
    pub latency_secs: f64,
    /// Time to first token, when any token came.
    pub ttft_secs: Option<f64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Decode speed, when tokens were generated.
    pub tokens_per_sec: Option<f64>,
    /// The request failed on the model's side.
    pub error: bool,
}

/// A Prometheus-style histogram with fixed bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub bounds: &'static [f64],
    /// Per bucket (not cumulative); one more than `bounds` for +Inf.
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    pub fn observe(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let i = self.bounds.iter().position(|b| v <= *b).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// (upper bound, cumulative count) pairs, ending with +Inf.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        self.bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.counts)
            .map(|(b, c)| {
                total += c;
                (b, total)
            })
            .collect()
    }
}

/// Everything measured about one model version on one node.
#[derive(Debug, Clone)]
pub struct VersionMetrics {
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency: Sketch,
    pub ttft: Sketch,
    pub tokens_per_sec: Sketch,
    pub latency_histogram: Histogram,
    pub ttft_histogram: Histogram,
    /// Shadow comparison scores of this version's answers against the previous version's
    /// (`crate::shadow::agreement`), one per compared request.
    pub agreement: Sketch,
}

impl Default for VersionMetrics {
    fn default() -> Self {
        VersionMetrics {
            requests: 0,
            errors: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            latency: Sketch::default(),
            ttft: Sketch::default(),
            tokens_per_sec: Sketch::default(),
            latency_histogram: Histogram::new(LATENCY_BUCKETS),
            ttft_histogram: Histogram::new(LATENCY_BUCKETS),
            agreement: Sketch::default(),
        }
    }
}

impl VersionMetrics {
    pub fn record(&mut self, s: &RequestSample) {
        self.requests += 1;
        if s.error {
            self.errors += 1;
        }
        self.prompt_tokens += s.prompt_tokens;
        self.completion_tokens += s.completion_tokens;
        self.latency.add(s.latency_secs);
        self.latency_histogram.observe(s.latency_secs);
        if let Some(t) = s.ttft_secs {
            self.ttft.add(t);
            self.ttft_histogram.observe(t);
        }
        if let Some(t) = s.tokens_per_sec {
            self.tokens_per_sec.add(t);
        }
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// A node's measurements, per (model name, version).
#[derive(Debug, Clone, Default)]
pub struct NodeMetrics {
    versions: BTreeMap<(String, u64), VersionMetrics>,
}

impl NodeMetrics {
    pub fn record(&mut self, model: &str, version: u64, sample: &RequestSample) {
        self.versions.entry((model.to_string(), version)).or_default().record(sample);
    }

    /// One shadow comparison of an answer of `model@version`, scored in [0, 1].
    pub fn record_agreement(&mut self, model: &str, version: u64, score: f64) {
        self.versions.entry((model.to_string(), version)).or_default().agreement.add(score);
    }

    pub fn get(&self, model: &str, version: u64) -> Option<&VersionMetrics> {
        self.versions.get(&(model.to_string(), version))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64, &VersionMetrics)> {
        self.versions.iter().map(|((m, v), x)| (m.as_str(), *v, x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_counters_sketches_and_histograms() {
        let mut m = NodeMetrics::default();
        for i in 1..=100 {
            m.record(
                "m",
                2,
                &RequestSample {
                    latency_secs: i as f64 / 100.0,
                    ttft_secs: Some(0.01),
                    prompt_tokens: 10,
                    completion_tokens: 5,
                    tokens_per_sec: Some(50.0),
                    error: i % 10 == 0,
                },
            );
        }
        let v = m.get("m", 2).unwrap();
        assert_eq!((v.requests, v.errors, v.prompt_tokens, v.completion_tokens), (100, 10, 1000, 500));
        assert!((v.error_rate() - 0.1).abs() < 1e-12);
        let p95 = v.latency.quantile(0.95).unwrap();
        assert!((p95 - 0.95).abs() <= 0.95 * RELATIVE_ACCURACY * 1.01, "p95 {p95}");
        let cumulative = v.latency_histogram.cumulative();
        assert_eq!(cumulative.last().unwrap().1, 100);
        assert_eq!(cumulative[0], (0.05, 5)); // 0.01..=0.05
        assert!(m.get("m", 1).is_none());
    }

    #[test]
    fn odd_values_do_not_poison_the_sketch() {
        let mut s = Sketch::default();
        for v in [f64::NAN, f64::INFINITY, -1.0, 0.0, 2.0] {
            s.add(v);
        }
        assert_eq!(s.count(), 3);
        assert!(s.quantile(1.0).unwrap() <= 2.0 * (1.0 + RELATIVE_ACCURACY));
    }
}
