//! What the fleet's operator and publisher do to a simulated fleet: sign and publish a
//! manifest from its origin, issue rollout commands and revocations through a node's
//! API, and the small fleets and gates the tests start from.

use super::{FleetSpec, NodeFleet, MODEL, T0_MS};
use crate::engine::SECOND;
use slmesh_protocol::fleet::{CommandAction, RolloutCommand, SignedCommand};
use slmesh_protocol::hex32::Hex32;
use slmesh_protocol::manifest::{
    FileEntry, FileRole, InferenceDefaults, ModelFormat, ModelManifest, SignedManifest, Variant,
};
use slmesh_protocol::rollout::{Gates, RolloutPlan, TagSelector, Wave};
use slmesh_protocol::trust::DEFAULT_FLEET;

impl NodeFleet {
    /// A manifest of `version` (one weights file of `model_bytes`) with the given waves
    /// (fraction, soak seconds) and gates.
    pub fn manifest(&self, version: u64, waves: &[(f64, u64)], gates: Gates) -> SignedManifest {
        self.manifest_with_suite(version, waves, gates, None)
    }

    /// As `manifest`, carrying an evaluation suite (which nodes run before serving).
    pub fn manifest_with_suite(
        &self,
        version: u64,
        waves: &[(f64, u64)],
        gates: Gates,
        eval: Option<slmesh_protocol::eval::EvalSuite>,
    ) -> SignedManifest {
        let manifest = ModelManifest {
            name: MODEL.into(),
            version,
            // Written a day before it is published.
            created_at: (T0_MS / 1000).saturating_sub(86_400),
            description: String::new(),
            variants: vec![Variant {
                id: "q4_0".into(),
                format: ModelFormat::Gguf,
                quantization: "Q4_0".into(),
                architecture: "llama".into(),
                cpu_archs: vec![],
                min_ram_bytes: 0,
                selector: TagSelector::default(),
                files: vec![FileEntry {
                    role: FileRole::Weights,
                    name: format!("v{version}.gguf"),
                    blake3: Self::weights_blob(version),
                    size: self.spec.model_bytes.max(1),
                }],
            }],
            inference: InferenceDefaults::default(),
            rollout: RolloutPlan {
                waves: waves.iter().map(|(f, s)| Wave { fraction: *f, soak_secs: *s }).collect(),
                selector: TagSelector::default(),
                gates,
            },
            fleet: DEFAULT_FLEET.into(),
            eval,
        };
        SignedManifest::sign(&manifest, &self.publisher).expect("a valid manifest signs")
    }

    /// The hash standing for the weights of `version` in `manifest` (the bytes are not
    /// simulated, only their size).
    pub fn weights_blob(version: u64) -> Hex32 {
        let mut blake = [0u8; 32];
        blake[..8].copy_from_slice(&version.to_le_bytes());
        Hex32(blake)
    }

    /// Publishes from node `origin`, which holds the files.
    pub fn publish(&mut self, origin: usize, signed: SignedManifest) -> Result<String, String> {
        let now = self.now_ms();
        let node = self.nodes[origin].node.as_mut().ok_or("the origin is down")?;
        let files: Vec<Hex32> = node.files_to_publish(&signed)?.iter().map(|f| f.blake3).collect();
        self.nodes[origin].blobs.extend(files.iter().copied());
        if let Ok(m) = slmesh_protocol::wire::decode::<ModelManifest>(&signed.body, "manifest") {
            self.nodes[origin].on_disk.insert((m.name, m.version));
        }
        let node = self.nodes[origin].node.as_mut().ok_or("the origin is down")?;
        let answer = node.publish(now, signed, &files);
        self.drain(origin);
        answer
    }

    /// An operator command, signed by the fleet's publisher key, given to node `at`.
    pub fn command(&mut self, at: usize, version: u64, action: CommandAction) -> Result<String, String> {
        let issued_at = self.now_ms() / 1000;
        self.command_issued(at, version, action, issued_at)
    }

    /// As `command`, dated `issued_at` (Unix seconds) by the publisher's clock.
    pub fn command_issued(
        &mut self,
        at: usize,
        version: u64,
        action: CommandAction,
        issued_at: u64,
    ) -> Result<String, String> {
        let now = self.now_ms();
        let c = RolloutCommand { model: MODEL.into(), version, action, issued_at, fleet: DEFAULT_FLEET.into() };
        let signed = SignedCommand::sign(&c, &self.publisher).map_err(|e| e.to_string())?;
        let node = self.nodes[at].node.as_mut().ok_or("the node is down")?;
        let answer = node.command(now, signed);
        self.drain(at);
        answer
    }

    /// The operator revokes node `revoked` through node `at`'s API.
    pub fn revoke(&mut self, at: usize, revoked: usize, reason: &str) -> Result<String, String> {
        use slmesh_protocol::revocation::{Revocation, SignedRevocation};
        let now = self.now_ms();
        let r = Revocation {
            node: self.id(revoked),
            issued_at: now / 1000,
            reason: reason.into(),
            fleet: DEFAULT_FLEET.into(),
        };
        let signed = SignedRevocation::sign(&r, &self.publisher).map_err(|e| e.to_string())?;
        let node = self.nodes[at].node.as_mut().ok_or("the node is down")?;
        let answer = node.revoke(now, signed);
        self.drain(at);
        answer
    }

    /// Gates that pass on healthy figures within seconds, with `min_nodes` reporting.
    pub fn quick_gates(min_nodes: u32) -> Gates {
        Gates {
            max_error_rate: 0.1,
            min_samples: 10,
            min_reporting_nodes: min_nodes,
            max_p95_latency_ratio: 10.0,
            max_p95_ttft_ratio: 10.0,
            min_tokens_per_sec_ratio: 0.1,
            min_eval_pass_rate: None,
            agreement: None,
        }
    }

    /// Every node started and serving version 1 (one wave, published by node 0).
    pub fn on_v1(spec: FleetSpec) -> Self {
        let mut f = NodeFleet::new(spec);
        f.start_all();
        f.run_for(SECOND);
        let m = f.manifest(1, &[(1.0, 0)], NodeFleet::quick_gates(1));
        if let Err(e) = f.publish(0, m) {
            panic!("version 1 does not publish: {e}");
        }
        f.run_for(10 * SECOND);
        f
    }
}
