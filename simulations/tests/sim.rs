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
