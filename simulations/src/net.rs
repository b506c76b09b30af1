//! The simulated network: per-node uplink and downlink bandwidth with queueing (a sender's
//! uplink is busy while it sends; a receiver's downlink while it receives), latency from a
//! site matrix plus jitter, loss, and scheduled partitions between groups of sites.

use crate::engine::{Micros, Rng, SECOND};

#[derive(Debug, Clone)]
pub struct Partition {
    pub from: Micros,
    pub until: Micros,
    /// Sites on one side; every other site is on the other.
    pub side: Vec<usize>,
}

pub struct Links {
    pub site: Vec<usize>,
    up_bytes_per_sec: Vec<f64>,
    down_bytes_per_sec: Vec<f64>,
    up_free: Vec<Micros>,
    down_free: Vec<Micros>,
    latency_ms: Vec<Vec<f64>>,
    jitter_ms: f64,
    loss: f64,
    pub partitions: Vec<Partition>,
    /// Bytes each node put on its uplink.
    pub sent: Vec<u64>,
    /// Bytes that crossed from one site to another.
    pub cross_site: u64,
    /// Messages a partition dropped.
    pub partition_drops: u64,
}

impl Links {
    pub fn new(
        site: Vec<usize>,
        up_bytes_per_sec: Vec<f64>,
        down_bytes_per_sec: Vec<f64>,
        latency_ms: Vec<Vec<f64>>,
        jitter_ms: f64,
        loss: f64,
    ) -> Self {
        let n = site.len();
        Links {
            site,
            up_bytes_per_sec,
            down_bytes_per_sec,
            up_free: vec![0; n],
            down_free: vec![0; n],
            latency_ms,
            jitter_ms,
            loss,
            partitions: vec![],
            sent: vec![0; n],
            cross_site: 0,
            partition_drops: 0,
        }
    }

    /// A node's uplink, bytes per second.
    pub fn uplink(&self, node: usize) -> f64 {
        self.up_bytes_per_sec[node]
    }

    pub fn partitioned(&self, now: Micros, a: usize, b: usize) -> bool {
        let (sa, sb) = (self.site[a], self.site[b]);
        self.partitions.iter().any(|p| now >= p.from && now < p.until && p.side.contains(&sa) != p.side.contains(&sb))
    }

    /// Sends `bytes` from `from` to `to` at `now`; returns when the last byte arrives, or
    /// None if a partition or (for `lossy` messages) loss drops it. The sender's uplink is
    /// busy either way: the bytes left.
    pub fn send(
        &mut self,
        now: Micros,
        from: usize,
        to: usize,
        bytes: u64,
        lossy: bool,
        rng: &mut Rng,
    ) -> Option<Micros> {
        self.send_timed(now, from, to, bytes, lossy, rng).1
    }

    /// As `send`, and also when the last byte leaves the sender (its uplink is free for
    /// the next message then, whether or not this one arrives).
    pub fn send_timed(
        &mut self,
        now: Micros,
        from: usize,
        to: usize,
        bytes: u64,
        lossy: bool,
        rng: &mut Rng,
    ) -> (Micros, Option<Micros>) {
        let tx = (bytes as f64 / self.up_bytes_per_sec[from] * SECOND as f64) as Micros;
        let start = now.max(self.up_free[from]);
        let sent = start + tx;
        self.up_free[from] = sent;
        self.sent[from] += bytes;
        if self.partitioned(now, from, to) {
            self.partition_drops += 1;
            return (sent, None);
        }
        if lossy && self.loss > 0.0 && rng.unit() < self.loss {
            return (sent, None);
        }
        let (sa, sb) = (self.site[from], self.site[to]);
        if sa != sb {
            self.cross_site += bytes;
        }
        let latency = self.latency_ms[sa][sb] + self.jitter_ms * rng.unit();
        let latency = (latency * 1000.0) as Micros;
        let rx = (bytes as f64 / self.down_bytes_per_sec[to] * SECOND as f64) as Micros;
        // The last byte leaves at `sent` and lands a latency later, unless the
        // receiver's downlink is still busy with earlier arrivals.
        let done = (sent + latency).max(self.down_free[to] + rx);
        self.down_free[to] = done;
        (sent, Some(done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_sites() -> Links {
        // 3 nodes: 0 and 1 in site 0, 2 in site 1. 1 MB/s up, 2 MB/s down, 10 ms across.
        Links::new(vec![0, 0, 1], vec![1e6; 3], vec![2e6; 3], vec![vec![1.0, 10.0], vec![10.0, 1.0]], 0.0, 0.0)
    }

    #[test]
    fn a_senders_uplink_queues_its_messages() {
        let (mut l, mut rng) = (two_sites(), Rng::new(1));
        // 1 MB at 1 MB/s takes 1 s, then 1 ms of latency.
        assert_eq!(l.send(0, 0, 1, 1_000_000, false, &mut rng), Some(1_001_000));
        // The second message waits for the first to leave: 2 s + 10 ms.
        assert_eq!(l.send(0, 0, 2, 1_000_000, false, &mut rng), Some(2_010_000));
        assert_eq!(l.sent[0], 2_000_000);
        assert_eq!(l.cross_site, 1_000_000);
    }

    #[test]
    fn a_receivers_downlink_queues_arrivals_from_several_senders() {
        let (mut l, mut rng) = (two_sites(), Rng::new(1));
        // Node 2 receives 1 MB from 0 and 1 MB from 1 at once: each sender needs 1 s, the
        // 2 MB/s downlink needs 0.5 s per message, so the second lands 0.5 s after the first.
        let a = l.send(0, 0, 2, 1_000_000, false, &mut rng).unwrap();
        let b = l.send(0, 1, 2, 1_000_000, false, &mut rng).unwrap();
        assert_eq!(a, 1_010_000);
        assert_eq!(b, 1_510_000);
    }

    #[test]
    fn the_uplink_is_free_when_the_last_byte_has_left_not_when_it_lands() {
        let (mut l, mut rng) = (two_sites(), Rng::new(1));
        // 1 MB to the other site: leaves by 1 s, lands 10 ms later.
        assert_eq!(l.send_timed(0, 0, 2, 1_000_000, false, &mut rng), (1_000_000, Some(1_010_000)));
        // The next message starts at 1 s, while the first is still on its way.
        assert_eq!(l.send_timed(0, 0, 1, 1_000_000, false, &mut rng), (2_000_000, Some(2_001_000)));
    }

    #[test]
    fn partitions_drop_messages_between_sides_until_they_heal() {
        let (mut l, mut rng) = (two_sites(), Rng::new(1));
        l.partitions.push(Partition { from: 100, until: 200, side: vec![1] });
        assert!(l.send(150, 0, 2, 10, false, &mut rng).is_none(), "across the partition");
        assert!(l.send(150, 0, 1, 10, false, &mut rng).is_some(), "same side");
        assert!(l.send(250, 0, 2, 10, false, &mut rng).is_some(), "healed");
        assert!(l.send(50, 2, 0, 10, false, &mut rng).is_some(), "not yet partitioned");
    }
}
