//! The discrete-event core: a heap of timed events over a simulated clock, and a
//! seeded random generator. Single-threaded and deterministic: the same seed gives the
//! same order of events, byte for byte.

use dary_heap::QuaternaryHeap;

/// Simulated time in microseconds.
pub type Micros = u64;

pub const SECOND: Micros = 1_000_000;

/// An event with its time and its place in the order of scheduling. Ordered so that the
/// heap (a max-heap) pops the earliest first, FIFO among equal times.
struct Entry<E> {
    at: Micros,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<E> Eq for Entry<E> {}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Events ordered by time, then by the order they were scheduled (FIFO among equals), so
/// that no tie is broken by anything but the program's own order. Events live in the heap
/// itself: no second lookup on the hot pop path.
pub struct Queue<E> {
    heap: QuaternaryHeap<Entry<E>>,
    seq: u64,
    now: Micros,
    processed: u64,
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Queue { heap: QuaternaryHeap::new(), seq: 0, now: 0, processed: 0 }
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
        self.heap.push(Entry { at: at.max(self.now), seq: self.seq, event });
        self.seq += 1;
    }

    pub fn after(&mut self, delay: Micros, event: E) {
        self.at(self.now + delay, event);
    }

    /// When the next event is due, if any.
    pub fn peek_time(&self) -> Option<Micros> {
        self.heap.peek().map(|e| e.at)
    }

    /// Moves the clock forward to `t` (never back) with no event.
    pub fn advance_to(&mut self, t: Micros) {
        self.now = self.now.max(t);
    }

    /// The next event, advancing the clock to its time.
    pub fn pop(&mut self) -> Option<(Micros, E)> {
        let Entry { at, event, .. } = self.heap.pop()?;
        self.now = at;
        self.processed += 1;
        Some((at, event))
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
