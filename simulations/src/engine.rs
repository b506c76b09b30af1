//! The discrete-event core: a binary heap of timed events over a simulated clock, and a
//! seeded random generator. Single-threaded and deterministic: the same seed gives the
//! same order of events, byte for byte.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Simulated time in microseconds.
pub type Micros = u64;

pub const SECOND: Micros = 1_000_000;

/// Events ordered by time, then by the order they were scheduled (FIFO among equals), so
/// that no tie is broken by anything but the program's own order.
pub struct Queue<E> {
    heap: BinaryHeap<Reverse<(Micros, u64, usize)>>,
    events: Vec<Option<E>>,
    free: Vec<usize>,
    seq: u64,
    now: Micros,
    processed: u64,
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Queue { heap: BinaryHeap::new(), events: vec![], free: vec![], seq: 0, now: 0, processed: 0 }
    }
}

impl<E> Queue<E> {
    pub fn now(&self) -> Micros {
        self.now
    }

    pub fn processed(&self) -> u64 {
        self.processed
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Schedules `event` at `at` (never before now).
    pub fn at(&mut self, at: Micros, event: E) {
        let slot = match self.free.pop() {
            Some(i) => {
                self.events[i] = Some(event);
                i
            }
            None => {
                self.events.push(Some(event));
                self.events.len() - 1
            }
        };
        self.heap.push(Reverse((at.max(self.now), self.seq, slot)));
        self.seq += 1;
    }

    pub fn after(&mut self, delay: Micros, event: E) {
        self.at(self.now + delay, event);
    }

    /// The next event, advancing the clock to its time.
    pub fn pop(&mut self) -> Option<(Micros, E)> {
        let Reverse((t, _, slot)) = self.heap.pop()?;
        self.now = t;
        self.processed += 1;
        let event = self.events[slot].take()?;
        self.free.push(slot);
        Some((t, event))
    }
}

/// SplitMix64: small, fast, and the same sequence on every platform and Rust version.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }

    /// Log-normal with the given median and spread (sigma of the underlying normal).
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        // Box-Muller.
        let (u1, u2) = (self.unit().max(1e-12), self.unit());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        median * (sigma * z).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_in_time_order_and_fifo_among_equals() {
        let mut q = Queue::default();
        q.at(30, "c");
        q.at(10, "a");
        q.at(20, "b1");
        q.at(20, "b2");
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, vec![(10, "a"), (20, "b1"), (20, "b2"), (30, "c")]);
        assert_eq!(q.now(), 30);
        q.at(5, "late");
        assert_eq!(q.pop(), Some((30, "late")), "nothing is scheduled in the past");
    }

    #[test]
    fn the_generator_is_deterministic() {
        let a: Vec<u64> = (0..5).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..5).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        let mut r = Rng::new(1);
        assert!((0..1000).map(|_| r.unit()).all(|u| (0.0..1.0).contains(&u)));
    }
}
