//! Whole scenarios: determinism, and the blast radius of a bad version.

fn scenario(name: &str, nodes_scale: f64) -> slmesh_sim::Scenario {
    let path = format!("{}/{name}.toml", slmesh_sim::Scenario::shipped_dir());
    let mut sc = slmesh_sim::Scenario::parse(&std::fs::read_to_string(path).expect("scenario")).expect("valid");
    for s in &mut sc.sites {
        s.nodes = ((s.nodes as f64 * nodes_scale) as usize).max(2);
    }
    sc
}

#[test]
fn the_same_seed_gives_the_same_report_byte_for_byte() {
    let a = serde_json::to_string(&slmesh_sim::run(scenario("churn-30", 0.05))).expect("json");
    let b = serde_json::to_string(&slmesh_sim::run(scenario("churn-30", 0.05))).expect("json");
    assert_eq!(a, b);
    let mut other = scenario("churn-30", 0.05);
    other.seed = 2;
    let c = serde_json::to_string(&slmesh_sim::run(other)).expect("json");
    assert_ne!(a, c, "another seed should change something");
}

#[test]
fn a_bad_version_stays_within_its_canary() {
    let sc = scenario("bad-version-canary", 0.04);
    let canary = sc.rollout.waves[0].0;
    let publish_at_secs = sc.rollout.publish_at_secs;
    let r = slmesh_sim::run(sc);
    assert!(r.halted.is_some(), "the rollout was not halted: {:?}", r.gate_decisions);
    assert!(
        r.ever_activated_fraction <= canary + 0.01,
        "{:.3} of the nodes ran the bad version, the canary is {canary}",
        r.ever_activated_fraction
    );
    assert!(r.waves[1].p50_secs.is_none(), "wave 2 opened");
    // Metrics gossip, split at publication: the start-up (the baseline's first records)
    // and the rollout add up to the whole run.
    let whole = r.metrics_gossip_bytes_per_node_per_sec * r.simulated_secs;
    let rollout_secs = r.simulated_secs - publish_at_secs;
    let parts = r.metrics_gossip_start_bytes_per_node + r.metrics_gossip_rollout_bytes_per_node_per_sec * rollout_secs;
    assert!(r.metrics_gossip_start_bytes_per_node > 0.0, "no start-up records");
    assert!((whole - parts).abs() <= whole * 1e-6 + 1.0, "whole run {whole} B per node, parts {parts}");
    // The report's charts (plotters) have their axes, legends and the failing verdict.
    let gates = slmesh_sim::report::gates_svg(&r).expect("gates chart");
    for text in ["gate verdicts", "seconds after the start", "pending", "fail"] {
        assert!(gates.contains(text), "no {text:?} in the gates chart");
    }
    assert!(gates.matches("fill=\"#D62728\"").count() >= 2, "a failing span and its legend entry");
    let coverage = slmesh_sim::report::coverage_svg(&r).expect("coverage chart");
    for text in ["coverage over time", "fraction of nodes", "wave 1 active", "staged (all nodes)"] {
        assert!(coverage.contains(text), "no {text:?} in the coverage chart");
    }
    assert!(slmesh_sim::report::origin_svg(&r).expect("origin chart").contains("MB"));
}

#[test]
fn a_good_version_reaches_every_node_and_a_partition_heals() {
    for name in ["good-1000-3-sites", "partition-heals"] {
        let r = slmesh_sim::run(scenario(name, 0.1));
        assert!(r.halted.is_none(), "{name}: {:?}", r.halted);
        assert!(r.waves.iter().all(|w| w.p100_secs.is_some()), "{name}: {:?}", r.waves);
        assert!(r.distribution_over_bound.is_some_and(|x| x >= 1.0), "{name}: faster than the lower bound?");
    }
}

#[test]
fn a_fetch_reaches_peers_beyond_its_first_providers() {
    // Each node keeps more peers than a fetch runs providers at once (16): the first to
    // announce took every slot, and a piece the origin seeded to a peer announced later
    // reached nobody until it was seeded again 20 s later (28-62 s at 1,000 nodes).
    let mut sc = scenario("good-1000-3-sites", 0.1);
    sc.node.peers = 24;
    let r = slmesh_sim::run(sc);
    let x = r.distribution_over_bound.expect("every node fetched the version");
    assert!(x < 2.0, "distribution took {x:.2}x the bound");
}

fn small_fleet(loss: f64, sync_interval_secs: u64) -> slmesh_sim::Scenario {
    let text = format!(
        r#"
name = "small"
seed = 3
duration_secs = 300
latency_ms = [[1, 30], [30, 1]]
loss = {loss}
[[sites]]
name = "a"
nodes = 36
uplink_mbps = 100
downlink_mbps = 400
[[sites]]
name = "b"
nodes = 24
uplink_mbps = 50
downlink_mbps = 200
[model]
size_mb = 20
request_rate = 0.5
baseline = {{ latency_median_secs = 1.0, ttft_median_secs = 0.2, tokens_per_sec = 30, error_rate = 0.002 }}
candidate = {{ latency_median_secs = 1.0, ttft_median_secs = 0.2, tokens_per_sec = 30, error_rate = 0.002 }}
[rollout]
publish_at_secs = 5
waves = [[1.0, 0]]
gates = {{ min_samples = 10, min_reporting_nodes = 3 }}
[node]
sync_interval_secs = {sync_interval_secs}
"#
    );
    slmesh_sim::Scenario::parse(&text).expect("valid")
}

#[test]
fn pieces_are_seeded_once_and_peers_serve_them_on_before_they_are_whole() {
    let r = slmesh_sim::run(small_fleet(0.0, 30));
    // The origin sends each piece once, to either site: peers, most of them still
    // fetching, do the rest, across sites too.
    let origin_copies = r.origin_egress_bytes as f64 / r.model_bytes as f64;
    assert!(origin_copies <= 1.1, "the origin sent {origin_copies:.2} copies");
    let ratio = r.distribution_over_bound.expect("every node got the file");
    assert!((1.0..2.4).contains(&ratio), "distribution {:?} s, {ratio:.2}x the bound", r.distribution_secs);
}

#[test]
fn anti_entropy_repairs_what_a_lossy_mesh_drops() {
    // Half the gossip messages lost: with D = 4 some nodes lose every copy of the manifest;
    // the node's anti-entropy sync still reaches them.
    let r = slmesh_sim::run(small_fleet(0.5, 30));
    assert!(r.distribution_secs.is_some(), "some node never got the manifest: {:?}", r.coverage.last());
    let without = slmesh_sim::run(small_fleet(0.5, 100_000));
    assert!(without.distribution_secs.is_none(), "this seed should strand a node without anti-entropy");
}

#[test]
fn under_churn_every_node_still_there_ends_on_the_new_version() {
    let sc = scenario("churn-30", 0.1);
    let (leaves, duration) = (sc.faults.leaves, sc.duration_secs);
    let r = slmesh_sim::run(sc);
    assert!(r.halted.is_none(), "{:?}", r.halted);
    // The run stops early only once every live node (joiners and restarted nodes
    // included) is active on the new version.
    assert!(r.simulated_secs < duration, "never settled: {:?}", r.coverage.last());
    assert!(r.ever_activated_fraction >= 1.0 - leaves - 0.02, "{}", r.ever_activated_fraction);
}

#[test]
fn bad_scenarios_are_refused_with_a_reason() {
    let good = std::fs::read_to_string(format!("{}/good-1000-3-sites.toml", slmesh_sim::Scenario::shipped_dir()))
        .expect("scenario");
    let cases = [
        ("nodes = 400", "nodes = 4000000", "2 to 100000 nodes"),
        ("nodes = 400", "nodes = \"many\"", "invalid type"),
        ("size_mb = 98", "size_mb = 0", "must be positive"),
        ("request_rate = 0.5", "request_rate = 0.5\nchunk_mb = 4", "unknown field"),
        ("loss = 0.001", "loss = 2", "loss is a fraction"),
        ("jitter_ms = 2", "jitter_ms = -1", "0 or more"),
        ("latency_ms = [[1, 20, 80], [20, 1, 60], [80, 60, 1]]", "latency_ms = [[1, 20], [20, 1]]", "3x3 matrix"),
        ("uplink_mbps = 50", "uplink_mbps = 0", "positive uplink"),
        ("request_rate = 0.5", "request_rate = -1", "request_rate"),
        ("waves = [[0.05, 120], [0.25, 120], [1.0, 0]]", "waves = [[0.5, 10], [0.25, 10]]", "wave"),
        ("seed = 1", "seed = 1\nunknown_knob = 3", "unknown field"),
        ("[rollout]", "[node]\nsync_interval_secs = 0\n[rollout]", "at least 1"),
        ("[rollout]", "[gossip]\nmetrics_interval_secs = 0.1\n[rollout]", "from 1 to 3600"),
    ];
    for (from, to, expected) in cases {
        assert!(good.contains(from), "{from}");
        let err = slmesh_sim::Scenario::parse(&good.replacen(from, to, 1)).err().unwrap_or_default();
        assert!(err.contains(expected), "{to}: {err}");
    }
    let partition =
        format!("{good}\n[faults]\npartitions = [{{ sites = [\"mars\"], from_secs = 1, until_secs = 2 }}]\n");
    let err = slmesh_sim::Scenario::parse(&partition).err().unwrap_or_default();
    assert!(err.contains("\"mars\""), "{err}");
    let backwards =
        format!("{good}\n[faults]\npartitions = [{{ sites = [\"tokyo\"], from_secs = 9, until_secs = 2 }}]\n");
    let err = slmesh_sim::Scenario::parse(&backwards).err().unwrap_or_default();
    assert!(err.contains("heal after it starts"), "{err}");
    assert!(slmesh_sim::Scenario::parse("not toml at all [").is_err());
}
