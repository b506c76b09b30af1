//! `seed` with sampling: the same request with the same seed gets the same answer.
//!
//! mistral.rs 0.8.1 draws every sequence's tokens from one random generator per engine,
//! seeded once when it starts, so what a request draws depends on every request before it
//! and on those running beside it. A request with a seed and a temperature above 0 is
//! sampled here instead, by a logits processor with a generator of its own (ChaCha8
//! seeded with the request's seed: the same stream on every platform), and the engine is
//! asked for greedy decoding (top-k 1). The processor sees the logits after the engine's
//! penalties, draws a token from the distribution at the request's temperature and
//! `top_p`, and hands the engine logits that leave that token the most likely one with
//! the probability it was drawn with, so the engine takes it and reports its logprob.
//!
//! Answers repeat as long as the model computes the same logits: same file, same engine
//! settings. A prompt whose beginning is in the prefix cache gives the same logits up to
//! rounding, so, as OpenAI says of its own `seed`, repetition is close to but not exactly
//! guaranteed.

use candle_core::{DType, Tensor};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;

/// Samples one request's tokens with its own seeded generator.
pub struct SeededSampler {
    temperature: f64,
    /// Smallest set of most likely tokens whose probabilities add up to this (1: all).
    top_p: f64,
    rng: Mutex<ChaCha8Rng>,
}

impl SeededSampler {
    /// `temperature` above 0 (0 is greedy and needs no seed); `top_p` in (0, 1].
    pub fn new(seed: u64, temperature: f64, top_p: Option<f64>) -> Self {
        SeededSampler { temperature, top_p: top_p.unwrap_or(1.0), rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)) }
    }

    /// A uniform number in [0, 1).
    fn uniform(&self) -> f64 {
        let bits = self.rng.lock().unwrap_or_else(|e| e.into_inner()).next_u64() >> 11;
        bits as f64 / (1u64 << 53) as f64
    }

    /// Draws a token: its index and its probability at this temperature (before `top_p`
    /// leaves the unlikely tokens out). `None` if no token is possible.
    fn draw(&self, logits: &[f32]) -> Option<(usize, f64)> {
        let scaled: Vec<f64> = logits.iter().map(|x| f64::from(*x) / self.temperature).collect();
        let max = scaled.iter().copied().filter(|x| x.is_finite()).fold(f64::NEG_INFINITY, f64::max);
        if !max.is_finite() {
            return None;
        }
        let weights: Vec<f64> = scaled.iter().map(|x| if x.is_finite() { (x - max).exp() } else { 0.0 }).collect();
        let total: f64 = weights.iter().sum();
        // The nucleus: most likely first, until top_p of the mass is in.
        let mut order: Vec<usize> = (0..weights.len()).filter(|i| weights[*i] > 0.0).collect();
        order.sort_by(|a, b| weights[*b].total_cmp(&weights[*a]).then(a.cmp(b)));
        let mut kept = 0.0;
        let mut nucleus = 0;
        for i in &order {
            kept += weights[*i];
            nucleus += 1;
            if kept >= self.top_p * total {
                break;
            }
        }
        let order = &order[..nucleus];
        let mut target = self.uniform() * kept;
        let chosen = order
            .iter()
            .copied()
            .find(|i| {
                target -= weights[*i];
                target < 0.0
            })
            .or(order.last().copied())?;
        Some((chosen, weights[chosen] / total))
    }

    /// Logits under which the engine's greedy decoding takes `chosen` and its softmax
    /// gives it `p`: every other token shares the rest equally. A token less likely than
    /// one in the vocabulary's size (drawn only at high temperatures) cannot both be the
    /// most likely and keep its probability; the engine then reports it as slightly more
    /// likely than the others.
    fn steer(len: usize, chosen: usize, p: f64) -> Vec<f32> {
        let others = len.saturating_sub(1).max(1) as f64;
        let chosen_logit = p.ln() as f32;
        let rest = ((1.0 - p) / others).ln() as f32;
        // Strictly below, in the precision the engine compares in.
        let rest = if rest < chosen_logit { rest } else { chosen_logit - 1e-3_f32.max(chosen_logit.abs() * 1e-6) };
        let mut out = vec![rest; len];
        out[chosen] = chosen_logit;
        out
    }
}

impl mistralrs::CustomLogitsProcessor for SeededSampler {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> candle_core::Result<Tensor> {
        let values: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let Some((chosen, p)) = self.draw(&values) else { return Ok(logits.clone()) };
        let steered = Self::steer(values.len(), chosen, p);
        Tensor::from_vec(steered, logits.shape(), logits.device())?.to_dtype(logits.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mistralrs::CustomLogitsProcessor;

    fn logits() -> Vec<f32> {
        (0..64).map(|i| ((i * 37) % 11) as f32 * 0.3).collect()
    }

    fn draws(seed: u64, temperature: f64, top_p: Option<f64>, n: usize) -> Vec<usize> {
        let s = SeededSampler::new(seed, temperature, top_p);
        (0..n).filter_map(|_| s.draw(&logits()).map(|(i, _)| i)).collect()
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_another_seed_others() {
        assert_eq!(draws(7, 1.0, None, 50), draws(7, 1.0, None, 50));
        assert_ne!(draws(7, 1.0, None, 50), draws(8, 1.0, None, 50));
    }

    #[test]
    fn draws_follow_the_distribution_at_the_temperature() {
        // Two tokens, logits 0 and ln 3: at temperature 1 the second is drawn 3 times in 4.
        let s = SeededSampler::new(1, 1.0, None);
        let two = [0.0, 3f32.ln()];
        let n = 20_000;
        let second = (0..n).filter(|_| s.draw(&two).map(|(i, _)| i) == Some(1)).count();
        assert!((second as f64 / n as f64 - 0.75).abs() < 0.02, "{second} of {n}");
        // At temperature 0.5 the logits count double: 9 to 1.
        let s = SeededSampler::new(1, 0.5, None);
        let second = (0..n).filter(|_| s.draw(&two).map(|(i, _)| i) == Some(1)).count();
        assert!((second as f64 / n as f64 - 0.9).abs() < 0.02, "{second} of {n}");
    }

    #[test]
    fn top_p_leaves_the_unlikely_tokens_out() {
        // Probabilities 0.7, 0.2, 0.1: top_p 0.75 keeps the first two only.
        let l = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let s = SeededSampler::new(3, 1.0, Some(0.75));
        let drawn: Vec<usize> = (0..2_000).filter_map(|_| s.draw(&l).map(|(i, _)| i)).collect();
        assert!(!drawn.contains(&2));
        assert!(drawn.contains(&1) && drawn.contains(&0));
        // A tiny top_p keeps the most likely only.
        let s = SeededSampler::new(3, 1.0, Some(1e-6));
        assert!((0..100).all(|_| s.draw(&l).map(|(i, _)| i) == Some(0)));
    }

    #[test]
    fn impossible_tokens_are_never_drawn_and_no_possible_token_changes_nothing() {
        let l = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
        let s = SeededSampler::new(5, 1.5, None);
        assert!((0..500).all(|_| matches!(s.draw(&l), Some((1 | 3, _)))));
        assert_eq!(s.draw(&[f32::NEG_INFINITY; 4]), None);
        assert_eq!(s.draw(&[f32::NAN; 4]), None);
        let t = Tensor::new(&[f32::NEG_INFINITY; 4], &candle_core::Device::Cpu).unwrap();
        let out: Vec<f32> = s.apply(&t, &[1]).unwrap().to_vec1().unwrap();
        assert!(out.iter().all(|x| *x == f32::NEG_INFINITY));
    }

    #[test]
    fn the_engine_takes_the_drawn_token_with_the_probability_it_was_drawn_with() {
        let s = SeededSampler::new(11, 0.8, None);
        let values = logits();
        let t = Tensor::new(values.as_slice(), &candle_core::Device::Cpu).unwrap();
        let steered: Vec<f32> = s.apply(&t, &[1]).unwrap().to_vec1().unwrap();
        // What the engine does with temperature 1 and top-k 1: softmax, then the largest.
        let max = steered.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = steered.iter().map(|x| (x - max).exp()).sum();
        let taken = steered.iter().position(|x| *x == max).unwrap();
        assert_eq!(steered.iter().filter(|x| **x == max).count(), 1);
        let again = SeededSampler::new(11, 0.8, None).draw(&values).unwrap();
        assert_eq!(taken, again.0);
        assert!(((1.0 / z) as f64 - again.1).abs() < 1e-4, "{} vs {}", 1.0 / z, again.1);
    }

    #[test]
    fn a_token_less_likely_than_uniform_is_still_the_one_taken() {
        let steered = SeededSampler::steer(10, 4, 0.01);
        let max = steered.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(steered.iter().position(|x| *x == max), Some(4));
        assert_eq!(steered.iter().filter(|x| **x == max).count(), 1);
    }
}
