//! A fleet that already serves a version when it starts: scenarios begin with the
//! baseline running everywhere. What each node holds is what a real node persisted after
//! serving that version: a two-node twin of the fleet rolls it out through the node's own
//! code, and the serving node's store and pieces are copied into every node.

use super::{NodeFleet, MODEL};
use crate::engine::SECOND;
use crate::fleet::FleetSpec;

/// Simulated seconds the twin may take to serve the version before it is a bug.
const TWIN_LIMIT_SECS: u32 = 3_600;

impl NodeFleet {
    /// `spec`'s fleet, none of its nodes started, each of them holding `version` as its
    /// active version; its clock starts where the twin's rollout ended.
    pub fn serving_from_start(spec: FleetSpec, version: u64) -> Self {
        let mut twin_spec = spec.clone();
        twin_spec.sites = vec![2];
        twin_spec.latency_ms = vec![vec![1.0]];
        twin_spec.mesh_degree = 0;
        let mut twin = NodeFleet::new(twin_spec);
        twin.start_all();
        twin.run_for(SECOND);
        let manifest = twin.manifest(version, &[(1.0, 0)], NodeFleet::quick_gates(1));
        if let Err(e) = twin.publish(0, manifest) {
            panic!("the baseline does not publish: {e}");
        }
        let mut waited = 0;
        while twin.serving(1) != Some(version) || twin.active(1) != Some(version) {
            assert!(waited < TWIN_LIMIT_SECS, "the twin never served v{version}: {:?}", twin.events_of(1));
            twin.run_for(SECOND);
            waited += 1;
        }
        let source = &twin.nodes[1];
        let mut store = source.store.clone();
        store.peers.clear();
        assert!(store.models.get(MODEL).is_some_and(|m| m.active == Some(version)));
        let mut fleet = NodeFleet::new(spec);
        fleet.q.advance_to(twin.now());
        for node in &mut fleet.nodes {
            node.store = store.clone();
            node.blobs = source.blobs.clone();
            node.pieces = source.pieces.clone();
        }
        fleet
    }
}
