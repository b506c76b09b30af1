//! Fleet metrics: the size of one signed metrics record, what receiving one costs (verify
//! it and the enrollment certificate it carries, and keep it, then merge it into a version summary), against the bare ed25519
//! verification of the same record (the baseline, same run), and the gossip bytes per node
//! per second these sizes imply at the default interval.
//!
//! Run: `cargo bench -p slmesh-protocol --bench fleet`

use slmesh_protocol::fleet::{verify_metrics, FleetView, MetricsMessage, MetricsRecord, SignedMetrics, VersionReport};
use slmesh_protocol::identity::{KeyKind, SecretKey};
use slmesh_protocol::trust::{Enrollment, TrustStore, DEFAULT_FLEET};
use std::hint::black_box;
use std::time::Instant;

/// A node that served `requests` requests of one version, with spread-out latencies.
fn report(version: u64, requests: u64, seed: u64) -> VersionReport {
    let mut r = VersionReport { model: "smollm2-135m-instruct".into(), version, active: true, ..Default::default() };
    let mut x = seed | 1;
    for _ in 0..requests {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let u = (x >> 11) as f64 / (1u64 << 53) as f64;
        let latency = 0.2 * (4.0 * u).exp(); // 0.2 s .. 11 s, log-uniform
        r.requests += 1;
        r.latency.add(latency);
        r.ttft.add(latency / 5.0);
        r.tokens_per_sec.add(20.0 + 40.0 * u);
        r.prompt_tokens += 40;
        r.completion_tokens += 48;
    }
    r
}

fn main() {
    let operator = SecretKey::from_seed(KeyKind::Publisher, [9; 32]);
    let mut trust = TrustStore::new();
    trust.add("ops", operator.public()).expect("operator key");
    let nodes: Vec<SecretKey> = (0..1000u32)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            SecretKey::from_seed(KeyKind::Node, seed)
        })
        .collect();
    let signed: Vec<Vec<u8>> = nodes
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let tags = [("site".to_string(), format!("site-{}", i % 3))].into();
            let enrollment =
                Enrollment { node: k.public(), tags, issued_at: 0, expires_at: 1 << 40, fleet: DEFAULT_FLEET.into() };
            let record = MetricsRecord {
                node: k.public(),
                seq: 1,
                issued_at: 0,
                versions: vec![report(6, 10_000, i as u64 + 1), report(7, 2_000, i as u64 + 7)],
            };
            // With its certificate, as a node's first record goes.
            let certificate = Some(enrollment.sign(&operator).expect("enroll"));
            let record = SignedMetrics::sign(&record, k).expect("sign");
            MetricsMessage { record, certificate }.to_bytes().expect("encode")
        })
        .collect();
    let sizes: Vec<usize> = signed.iter().map(Vec::len).collect();
    let mean_size = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    let max_size = *sizes.iter().max().expect("records");

    // Baseline: the ed25519 verification inside each record.
    let decoded: Vec<SignedMetrics> =
        signed.iter().map(|b| MetricsMessage::from_bytes(b).expect("decode").record).collect();
    let start = Instant::now();
    for s in &decoded {
        black_box(s.verify_self_signed().expect("verify"));
    }
    let verify_only = start.elapsed().as_secs_f64() / decoded.len() as f64;

    // Receiving: decode, verify, check, keep.
    let start = Instant::now();
    let mut view = FleetView::default();
    for b in &signed {
        let m = MetricsMessage::from_bytes(b).expect("decode");
        let certificate = m.certificate.expect("sent with it");
        view.update(verify_metrics(&m.record, &certificate, &trust, DEFAULT_FLEET, 0).expect("valid"), 0);
    }
    let receive = start.elapsed().as_secs_f64() / signed.len() as f64;

    // Merging: the summary of one version over every record held.
    let rounds = 20;
    let start = Instant::now();
    for _ in 0..rounds {
        black_box(view.summary("smollm2-135m-instruct", 7));
    }
    let merge = start.elapsed().as_secs_f64() / (rounds * signed.len()) as f64;

    println!(
        "metrics record, 2 versions, 10,000 + 2,000 requests' sketches: {mean_size:.0} bytes mean, {max_size} max"
    );
    println!("ed25519 verification (baseline)  {:>8.1} us per record", verify_only * 1e6);
    println!(
        "receive (decode, verify, check, keep) {:>5.1} us per record  {:.2}x the baseline",
        receive * 1e6,
        receive / verify_only
    );
    println!(
        "merge into a version summary     {:>8.1} us per record  {:.2}x the baseline",
        merge * 1e6,
        merge / verify_only
    );
    let interval = 10.0;
    println!("gossip at the default interval ({interval} s), every node's record reaching every node:");
    for n in [10usize, 100, 1_000, 10_000] {
        // Each node receives every other node's record once, and forwards it to its
        // gossipsub mesh peers (D = 4, crates/mesh) when it is new: the upper bound sent
        // per node.
        let received = (n - 1) as f64 * mean_size / interval;
        println!(
            "  {n:>6} nodes: {:>10.0} B/s received per node, up to {:>10.0} B/s forwarded",
            received,
            received * 4.0
        );
    }
}
