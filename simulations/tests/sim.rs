//! Whole scenarios: determinism, and the blast radius of a bad version.

fn scenario(name: &str, nodes_scale: f64) -> slmesh_sim::Scenario {
    let path = format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let mut sc = slmesh_sim::Scenario::parse(&std::fs::read_to_string(path).expect("scenario")).expect("valid");
    for s in &mut sc.sites {
        s.nodes = ((s.nodes as f64 * nodes_scale) as usize).max(2);
    }
    sc
}

#[test]
fn the_same_seed_gives_the_same_report_byte_for_byte() {
    let a = serde_json::to_string(&slmesh_sim::run(scenario("churn-30", 0.2))).expect("json");
    let b = serde_json::to_string(&slmesh_sim::run(scenario("churn-30", 0.2))).expect("json");
    assert_eq!(a, b);
    let mut other = scenario("churn-30", 0.2);
    other.seed = 2;
    let c = serde_json::to_string(&slmesh_sim::run(other)).expect("json");
    assert_ne!(a, c, "another seed should change something");
}

#[test]
fn a_bad_version_stays_within_its_canary() {
    let sc = scenario("bad-version-canary", 1.0);
    let canary = sc.rollout.waves[0].0;
    let r = slmesh_sim::run(sc);
    assert!(r.halted.is_some(), "the rollout was not halted: {:?}", r.gate_decisions);
    assert!(
        r.ever_activated_fraction <= canary + 0.01,
        "{:.3} of the nodes ran the bad version, the canary is {canary}",
        r.ever_activated_fraction
    );
    assert!(r.waves[1].p50_secs.is_none(), "wave 2 opened");
}

#[test]
fn a_good_version_reaches_every_node_and_a_partition_heals() {
    for name in ["good-1000-3-sites", "partition-heals"] {
        let r = slmesh_sim::run(scenario(name, 0.2));
        assert!(r.halted.is_none(), "{name}: {:?}", r.halted);
        assert!(r.waves.iter().all(|w| w.p100_secs.is_some()), "{name}: {:?}", r.waves);
        assert!(r.distribution_over_bound.is_some_and(|x| x >= 1.0), "{name}: faster than the lower bound?");
    }
}

fn small_fleet(transfer: &str, loss: f64, lazy_degree: usize) -> slmesh_sim::Scenario {
    let text = format!(
        r#"
name = "small"
seed = 3
duration_secs = 900
latency_ms = [[1, 30], [30, 1]]
loss = {loss}
[[sites]]
name = "a"
nodes = 60
uplink_mbps = 100
downlink_mbps = 400
[[sites]]
name = "b"
nodes = 40
uplink_mbps = 50
downlink_mbps = 200
[model]
size_mb = 20
chunk_mb = 0.5
transfer = "{transfer}"
request_rate = 0.5
baseline = {{ latency_median_secs = 1.0, ttft_median_secs = 0.2, tokens_per_sec = 30, error_rate = 0.002 }}
candidate = {{ latency_median_secs = 1.0, ttft_median_secs = 0.2, tokens_per_sec = 30, error_rate = 0.002 }}
[rollout]
publish_at_secs = 5
waves = [[1.0, 0]]
gates = {{ min_samples = 10, min_reporting_nodes = 1 }}
[gossip]
lazy_degree = {lazy_degree}
"#
    );
    slmesh_sim::Scenario::parse(&text).expect("valid")
}

#[test]
fn pieces_are_seeded_once_per_site_and_peers_serve_them_on_before_they_are_whole() {
    let pieces = slmesh_sim::run(small_fleet("pieces", 0.0, 6));
    let whole = slmesh_sim::run(small_fleet("whole", 0.0, 6));
    let (p, w) = (pieces.distribution_secs.expect("pieces done"), whole.distribution_secs.expect("whole done"));
    // The origin sends each piece at most once per site: peers, most of them still
    // fetching, do the rest. Whole files spread in rounds of a full file each.
    assert!(pieces.origin_egress_per_site <= 1.05, "{}", pieces.origin_egress_per_site);
    assert!(p < w / 3.0, "pieces {p:.1} s, whole files {w:.1} s");
    assert!(
        pieces.distribution_over_bound.is_some_and(|x| (1.0..1.5).contains(&x)),
        "{:?}",
        pieces.distribution_over_bound
    );
}

#[test]
fn ihave_gossip_repairs_what_a_lossy_mesh_drops() {
    // 30% of gossip messages lost: with D = 4 some nodes lose every eager copy of the
    // manifest; IHAVE from peers outside the mesh, answered by IWANT, still reaches them.
    let r = slmesh_sim::run(small_fleet("pieces", 0.3, 6));
    assert!(r.distribution_secs.is_some(), "some node never got the manifest: {:?}", r.coverage.last());
    let without = slmesh_sim::run(small_fleet("pieces", 0.3, 0));
    assert!(without.distribution_secs.is_none(), "this seed should strand a node without IHAVE gossip");
}

#[test]
fn under_churn_every_node_still_there_ends_on_the_new_version() {
    let sc = scenario("churn-30", 0.3);
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
    let good = std::fs::read_to_string(format!("{}/scenarios/good-1000-3-sites.toml", env!("CARGO_MANIFEST_DIR")))
        .expect("scenario");
    let cases = [
        ("nodes = 400", "nodes = 4000000", "2 to 1000000 nodes"),
        ("nodes = 400", "nodes = \"many\"", "invalid type"),
        ("chunk_mb = 0.5", "chunk_mb = 0", "chunk_mb must be positive"),
        ("loss = 0.001", "loss = 2", "loss is a fraction"),
        ("jitter_ms = 2", "jitter_ms = -1", "0 or more"),
        ("latency_ms = [[1, 20, 80], [20, 1, 60], [80, 60, 1]]", "latency_ms = [[1, 20], [20, 1]]", "3x3 matrix"),
        ("uplink_mbps = 50", "uplink_mbps = 0", "positive uplink"),
        ("request_rate = 0.5", "request_rate = -1", "request_rate"),
        ("waves = [[0.05, 120], [0.25, 120], [1.0, 0]]", "waves = [[0.5, 10], [0.25, 10]]", "wave"),
        ("seed = 1", "seed = 1\nunknown_knob = 3", "unknown field"),
        ("[rollout]", "[swarm]\nupload_slots = 0\n[rollout]", "at least 1"),
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
