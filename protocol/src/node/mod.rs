//! The node state machine: all of one node's protocol state and every decision it makes,
//! with no I/O, in the style of quinn-proto's `Connection`.
//!
//! The driver (the `slmesh` daemon over libp2p, iroh-blobs, sled and mistral.rs; or the
//! simulator and the in-memory tests over fakes) feeds it inputs with `now`
//! (`handle`, `handle_gossip`, `handle_request`, `publish`, `command`), drains its outputs
//! (`poll_output`) and wakes it at `poll_timeout` (`handle_timeout`). It never reads a
//! clock, a file or a socket. Every retry, back-off and soak is one of its timers; what
//! must survive a restart leaves it as `Output::Persist` and comes back in `Restored`.
//!
//! Time is Unix milliseconds (`now`); the rollout engine counts in seconds.
//!
//! What it decides, and where:
//!
//! - `peers`: admission (a hello with a valid certificate for the peer's own key, else
//!   `Output::Refuse`; a peer not admitted within `admission_deadline_ms` of connecting
//!   is refused too), retries of a hello that failed in transport, anti-entropy (a few
//!   admitted peers each round, in turn), and what gossip and sync replies bring in:
//!   manifests verified against the trust store and held versions, have records and
//!   metrics records self-signed by their node and newer than the one held, operator
//!   commands signed by a trusted publisher. Nothing from a peer not admitted counts.
//! - `versions`: the variant a node takes, when a fetch starts (every file has a
//!   provider or is here) and from whom (same site, then RTT), back-off after a failed
//!   fetch (doubling, capped), staging, loading with at most `max_activation_attempts`
//!   tries (30 s, then 60 s apart by default) before the version is given up and reported
//!   to the fleet, what stays on disk, the have record and the metrics record.
//! - `rollout`: per version, waves opened after their soak while the gates pass (wave 0
//!   when this node first accepted the manifest), halts (a failing gate, an abort), and
//!   per model the one version to serve: a pin first, then an operator's order back to a
//!   version (until a newer version is published), then the newest version whose wave is
//!   open for this node and which is healthy; a node whose version halted goes back to the
//!   best healthy older one it holds. The wave a node joins in is fixed when it activates,
//!   so a node that learns of more nodes later never serves outside its wave.
//! - `uploads`: whether to serve a fetcher (slots, origin copies, per-site seeding).
//! - `revocations`: a node the operator revoked is refused at the handshake, dropped
//!   if connected, and nothing it reports counts, on every node that holds the
//!   revocation (gossiped, synced, persisted).
//!
//! What survives a restart (`Persist`): manifests, each model's state (active, previous,
//! staged, pinned), each version's record (first seen, wave open times, halt, this node's
//! wave, failed activations), operator commands, revocations, and the peer book (for the
//! canary floor). Metrics records, have records and connections are rebuilt from the fleet.
//!
//! Piece scheduling within one blob is its own state machine, `swarm::PieceFetch`, which
//! the driver runs for each `Output::Fetch` (crates/blobs over iroh-blobs; the
//! simulator's node fleet over its links).

mod peers;
mod reporting;
mod revocations;
mod rollout;
mod settings;
mod shadow;
pub mod state;
pub mod uploads;
mod versions;

pub use peers::{MAX_CONNECTED, MAX_KNOWN_PEERS};
pub use settings::{NodeConfig, DEFAULT_SHADOW_MAX_WEIGHTS_BYTES, MIN_TIMER_MS};
pub use state::{ModelState, Persist, Restored, VersionRecord};
pub use uploads::{PieceAdmission, Uploads};

use crate::fleet::{FleetView, SignedCommand, SignedMetrics, VersionReport};
use crate::hex32::Hex32;
use crate::history::{HistoryEvent, HistoryKind};
use crate::identity::{NodeId, SecretKey};
use crate::manifest::{FileEntry, Variant, VerifiedManifest};
use crate::mesh::{BlobDirectory, GossipVerdict, SignedHave};
use crate::revocation::RevocationList;
use crate::trust::{EnrollmentCertificate, Tags, TrustStore};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub type VersionKey = (String, u64);

/// Who this node is in its fleet.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub secret: SecretKey,
    pub certificate: EnrollmentCertificate,
    /// The tags its certificate carries.
    pub tags: Tags,
    /// The fleet its certificate names: peers, manifests, commands and revocations of
    /// any other fleet count for nothing here.
    pub fleet: String,
}

/// The request a response answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RequestKind {
    Hello,
    Sync,
    Have,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A transport connection to `peer` is up (not yet admitted).
    PeerConnected {
        peer: NodeId,
    },
    PeerDisconnected {
        peer: NodeId,
    },
    /// A round-trip time measured to a peer.
    Rtt {
        peer: NodeId,
        micros: u64,
    },
    /// The answer (or transport failure) of a request this node sent.
    Response {
        peer: NodeId,
        kind: RequestKind,
        result: Result<Vec<u8>, String>,
    },
    /// Where this node's blob endpoint can be reached, for its hello and have records.
    BlobAddrs(Vec<String>),
    /// A fetch asked for by `Output::Fetch` ended: the files are staged, or not.
    FetchFinished {
        model: String,
        version: u64,
        result: Result<(), String>,
    },
    /// An activation asked for by `Output::Activate` ended; with the evaluation suite's
    /// counts if it asked for a run.
    ActivationFinished {
        model: String,
        version: u64,
        result: Result<(), String>,
        eval: Option<crate::eval::EvalCounts>,
    },
    /// The answer to `Output::SampleMetrics`: this node's cumulative figures per version.
    LocalMetrics(Vec<VersionReport>),
}

/// Why a version is being loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Its wave is open (or a pin names it).
    Rollout,
    /// Going back from a version whose rollout halted, or as an operator ordered.
    RollBack { from: u64 },
    /// Serving again after a restart.
    Restore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Info,
    Warn,
}

/// What the upload gate needs: which blobs this node published, who else holds each,
/// and which peers are admitted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UploadView {
    pub originated: BTreeSet<Hex32>,
    pub holders: BTreeMap<Hex32, BTreeSet<NodeId>>,
    pub admitted: BTreeSet<NodeId>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Gossip {
        topic: &'static str,
        data: Vec<u8>,
    },
    /// Send a request; its answer comes back as `Input::Response`.
    Request {
        peer: NodeId,
        kind: RequestKind,
        data: Vec<u8>,
    },
    /// A peer's certificate checked out: it may now get gossip (until then the driver
    /// sends it none) and be handed to other peers as a contact.
    Admitted {
        peer: NodeId,
    },
    /// Disconnect and block a peer that failed admission.
    Refuse {
        peer: NodeId,
        reason: String,
    },
    /// A peer's blob endpoint addresses.
    LearnAddrs {
        node: NodeId,
        addrs: Vec<String>,
    },
    /// Fetch these files (ranked providers each) and stage them under the version's
    /// folder; report with `Input::FetchFinished`.
    Fetch {
        model: String,
        version: u64,
        files: Vec<(FileEntry, Vec<NodeId>)>,
    },
    /// A running fetch's providers of one blob changed.
    Providers {
        blob: Hex32,
        providers: Vec<NodeId>,
    },
    /// Load the staged version (its weights file under the version's folder) beside the
    /// running one and swap; report with `Input::ActivationFinished`.
    Activate {
        model: String,
        version: u64,
        weights: String,
        why: Activation,
        /// Run this suite on the loaded version before swapping it in (a version rolled
        /// out for the first time whose manifest carries one), and report its counts.
        eval: Option<crate::eval::EvalSuite>,
    },
    /// Keep the plan's baseline version loaded beside the active one (its weights file
    /// under its version's folder) and answer its share of live requests again with it,
    /// recording each agreement score under the candidate; or, with no plan, stop that
    /// and unload it.
    Shadow {
        model: String,
        plan: Option<crate::shadow::ShadowPlan>,
    },
    /// Delete a version's staged files.
    DeleteVersion {
        model: String,
        version: u64,
    },
    /// Release every blob not listed from the blob store.
    ReleaseBlobs {
        keep: Vec<Hex32>,
    },
    Persist(Persist),
    /// Measure: answer with `Input::LocalMetrics`.
    SampleMetrics,
    Uploads(UploadView),
    /// A decision about a rollout, for the node's history (kept by the daemon; also
    /// logged as an `Event`).
    History(crate::history::HistoryEvent),
    /// Something an operator should see in the log (about one version, when `version`).
    Event {
        model: Option<String>,
        version: Option<u64>,
        level: Level,
        text: String,
    },
}

struct Peer {
    tags: Tags,
    rtt_micros: Option<u64>,
    /// When its certificate expires (Unix seconds): it is dropped then, not only refused
    /// at its next handshake.
    expires_at: u64,
}

/// A node's metrics record as held: the signed copy, for anti-entropy, and the
/// certificate it counted under.
struct HeldMetrics {
    signed: SignedMetrics,
    certificate: EnrollmentCertificate,
}

struct HelloRetry {
    attempts: u32,
    at: Option<u64>,
}

struct FetchRetry {
    failures: u32,
    at: u64,
}

/// All of one node's protocol state.
pub struct Node {
    cfg: NodeConfig,
    secret: SecretKey,
    me: NodeId,
    tags: Tags,
    certificate: EnrollmentCertificate,
    /// The fleet this node is in (its certificate's).
    fleet_id: String,
    trust: TrustStore,
    blob_addrs: Vec<String>,
    // Peers.
    /// Transport connections, with when each came up (the admission deadline counts from it).
    connected: BTreeMap<NodeId, u64>,
    hello_asked: BTreeSet<NodeId>,
    hello_retry: BTreeMap<NodeId, HelloRetry>,
    peers: BTreeMap<NodeId, Peer>,
    /// The peer book: every node admitted so far, with its certified tags.
    known: BTreeMap<NodeId, Tags>,
    /// Per version, the cohort values of the nodes in `known` its plan selects
    /// (`cohort::sorted_cohorts`), until `known` changes: every rollout tick places this
    /// node and counts the waves over them.
    known_cohorts: std::cell::RefCell<BTreeMap<VersionKey, std::sync::Arc<Vec<f64>>>>,
    // What the node holds.
    manifests: BTreeMap<VersionKey, VerifiedManifest>,
    models: BTreeMap<String, ModelState>,
    versions: BTreeMap<VersionKey, VersionRecord>,
    commands: BTreeMap<VersionKey, Vec<SignedCommand>>,
    revoked: RevocationList,
    directory: BlobDirectory,
    my_have: Option<SignedHave>,
    have_seq: u64,
    have_dirty: bool,
    /// Something changed that may let a waiting fetch start.
    fetch_check: bool,
    fleet: FleetView,
    /// The signed copy of each record the view holds, for anti-entropy, with the
    /// certificate it counted under (the node's later records may come without one).
    signed_metrics: BTreeMap<NodeId, HeldMetrics>,
    /// `fleet.departures()` when `signed_metrics` was last pruned.
    fleet_departures_seen: u64,
    metrics_seq: u64,
    metrics_sent_at: Option<u64>,
    /// When this node last sent its certificate with its record.
    certificate_sent_at: Option<u64>,
    last_reports: Option<Vec<VersionReport>>,
    /// When this node first had a report of each version (its turn in the panel counts from it).
    reporting_since: BTreeMap<(String, u64), u64>,
    /// The gates' last verdict per version whose rollout is under way (a change of kind
    /// goes into the history).
    verdicts: BTreeMap<VersionKey, crate::fleet::GateVerdict>,
    /// Per version, the gates' last reading and the summaries it was read from. A list: a
    /// node holds a few versions, and a map's node would hold room for eleven memos.
    gate_memos: Vec<(VersionKey, rollout::GateMemo)>,
    originated: BTreeSet<Hex32>,
    complete: BTreeSet<Hex32>,
    // Work under way.
    wanted: BTreeMap<VersionKey, Variant>,
    fetching: BTreeMap<VersionKey, BTreeMap<Hex32, Vec<NodeId>>>,
    fetch_retry: BTreeMap<VersionKey, FetchRetry>,
    /// Per model, the version being loaded.
    activating: BTreeMap<String, (u64, Activation)>,
    /// Per model, the version the engine has loaded since this start (the model state's
    /// `active` may not be loaded yet after a restart, or its load may have failed).
    serving: BTreeMap<String, u64>,
    active_since: BTreeMap<VersionKey, u64>,
    /// Per model, the shadow comparison asked of the driver (or why this node cannot).
    shadowing: BTreeMap<String, Result<crate::shadow::ShadowPlan, String>>,
    uploads: UploadView,
    // Timers.
    next_metrics: u64,
    /// This node's phase of the metrics interval, in ms: from its id, then from the last
    /// record it sent off that phase (`reporting`), so that the records after it keep
    /// their interval.
    metrics_phase: u64,
    /// When a report withheld for its turn in a panel may go, or a version started
    /// serving here: a sample is due then, off this node's phase (`reporting`).
    report_turn_at: Option<u64>,
    /// The sample asked for is `report_turn_at`'s.
    turn_sample: bool,
    next_sync: u64,
    next_rollout: u64,
    sync_cursor: usize,
    outputs: VecDeque<Output>,
    notes: BTreeMap<String, String>,
    views: Vec<RolloutView>,
}

/// One rollout as this node sees it (`GET /v1/rollouts`, `slmesh rollout status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    pub model: String,
    pub version: u64,
    pub waves: usize,
    pub waves_open: usize,
    /// Unix seconds at which each open wave opened.
    #[serde(default)]
    pub opened_at: Vec<u64>,
    /// This node's wave, 1-based (None: the selector leaves it out).
    pub my_wave: Option<usize>,
    /// Nodes this node knows of in each wave (itself included), with the canary floor.
    #[serde(default)]
    pub known_per_wave: Vec<usize>,
    pub active_here: bool,
    pub decision: String,
    pub verdict: crate::fleet::GateVerdict,
    pub halted: Option<String>,
    pub paused: bool,
    /// Failed activations here, and the last error.
    #[serde(default)]
    pub activation_failures: u32,
    #[serde(default)]
    pub activation_error: Option<String>,
    /// The plan's waves (cumulative fraction, soak) and gate thresholds, to show beside
    /// the figures.
    #[serde(default)]
    pub plan_waves: Vec<crate::rollout::Wave>,
    #[serde(default)]
    pub gates: crate::rollout::Gates,
    /// The figures the verdict rests on: the version's, and its baseline's (the previous
    /// version, which the ratio gates compare with).
    #[serde(default)]
    pub figures: crate::history::GateFigures,
    #[serde(default)]
    pub baseline: Option<BaselineFigures>,
    /// Nodes staged and serving per wave, estimated from the metrics panels
    /// (`Node::rollouts_with_progress`; empty in `Node::rollouts`).
    #[serde(default)]
    pub per_wave: Vec<WaveProgress>,
}

/// How far one wave of a rollout has come, as one node estimates it from the metrics
/// panels (`Node::wave_progress`): exact while each panel has room for every node that
/// reports its version, a uniform sample scaled up beyond.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveProgress {
    /// Nodes of the wave that hold the version ready while serving an older one.
    pub staged: u64,
    /// Nodes of the wave that serve the version.
    pub serving: u64,
}

/// The previous version's figures, which a rollout's ratio gates compare with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineFigures {
    pub version: u64,
    pub figures: crate::history::GateFigures,
    /// The version's figures over these.
    pub ratios: crate::history::GateRatios,
}

impl Node {
    /// A node restored from what its driver persisted (`Restored::default()` the first
    /// time). Queues what a restart needs: serving the active versions again, resuming
    /// fetches, announcing what it holds.
    pub fn new(cfg: NodeConfig, identity: NodeIdentity, trust: TrustStore, restored: Restored, now: u64) -> Self {
        let (cfg, said) = cfg.checked();
        let me = identity.secret.public();
        let mut node = Node {
            me,
            secret: identity.secret,
            tags: identity.tags,
            certificate: identity.certificate,
            fleet_id: identity.fleet,
            trust,
            blob_addrs: vec![],
            connected: BTreeMap::new(),
            hello_asked: BTreeSet::new(),
            hello_retry: BTreeMap::new(),
            peers: BTreeMap::new(),
            known: BTreeMap::new(),
            known_cohorts: Default::default(),
            manifests: BTreeMap::new(),
            models: BTreeMap::new(),
            versions: BTreeMap::new(),
            commands: BTreeMap::new(),
            revoked: RevocationList::default(),
            directory: BlobDirectory::default(),
            my_have: None,
            have_seq: 0,
            have_dirty: true,
            fetch_check: true,
            fleet: FleetView::with_ttl(cfg.metrics_ttl_secs),
            signed_metrics: BTreeMap::new(),
            fleet_departures_seen: 0,
            metrics_seq: 0,
            metrics_sent_at: None,
            certificate_sent_at: None,
            last_reports: None,
            reporting_since: BTreeMap::new(),
            verdicts: BTreeMap::new(),
            gate_memos: vec![],
            originated: BTreeSet::new(),
            complete: BTreeSet::new(),
            wanted: BTreeMap::new(),
            fetching: BTreeMap::new(),
            fetch_retry: BTreeMap::new(),
            activating: BTreeMap::new(),
            serving: BTreeMap::new(),
            active_since: BTreeMap::new(),
            shadowing: BTreeMap::new(),
            uploads: UploadView::default(),
            next_metrics: now + cfg.metrics_interval_ms.min(1_000),
            metrics_phase: id_phase(&me, cfg.metrics_interval_ms),
            report_turn_at: None,
            turn_sample: false,
            next_sync: now + cfg.sync_interval_ms,
            next_rollout: now,
            sync_cursor: 0,
            outputs: VecDeque::new(),
            notes: BTreeMap::new(),
            views: vec![],
            cfg,
        };
        for text in said {
            node.event(None, Level::Warn, text);
        }
        node.restore(restored, now);
        node.finish(now);
        node
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    pub fn tags(&self) -> &Tags {
        &self.tags
    }

    /// The next output to act on, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When `handle_timeout` must be called next (Unix milliseconds).
    pub fn poll_timeout(&self) -> u64 {
        let mut t = self.next_metrics.min(self.next_sync).min(self.next_rollout);
        if let Some(at) = self.report_turn_at {
            t = t.min(at);
        }
        for r in self.hello_retry.values() {
            if let Some(at) = r.at {
                t = t.min(at);
            }
        }
        // 0: the back-off is over and the fetch waits for a provider (an input, not a timer).
        for r in self.fetch_retry.values().filter(|r| r.at > 0) {
            t = t.min(r.at);
        }
        if let Some(at) = self.next_admission_deadline() {
            t = t.min(at);
        }
        t
    }

    /// Runs every timer that is due.
    pub fn handle_timeout(&mut self, now: u64) {
        let turn = self.report_turn_at.is_some_and(|at| at <= now);
        if turn {
            self.report_turn_at = None;
        }
        if now >= self.next_metrics {
            self.next_metrics = metrics_phase_after(now, self.cfg.metrics_interval_ms, self.metrics_phase);
            self.outputs.push_back(Output::SampleMetrics);
        } else if turn {
            self.turn_sample = true;
            self.outputs.push_back(Output::SampleMetrics);
        }
        if now >= self.next_sync {
            self.next_sync = now + self.cfg.sync_interval_ms;
            self.sync_round();
        }
        let due: Vec<NodeId> =
            self.hello_retry.iter().filter(|(_, r)| r.at.is_some_and(|at| at <= now)).map(|(n, _)| *n).collect();
        for peer in due {
            if let Some(r) = self.hello_retry.get_mut(&peer) {
                r.at = None;
            }
            if self.connected.contains_key(&peer) {
                self.ask_hello(peer);
            }
        }
        self.refuse_late_peers(now);
        if self.fetch_retry.values().any(|r| r.at > 0 && r.at <= now) {
            self.try_fetches(now);
            // Those that could not start wait for a provider to appear, not for a timer.
            for r in self.fetch_retry.values_mut().filter(|r| r.at <= now) {
                r.at = 0;
            }
        }
        if now >= self.next_rollout {
            self.next_rollout = now + self.cfg.rollout_tick_ms;
            self.drop_expired_peers(now);
            self.rollout_tick(now);
        }
        self.finish(now);
    }

    pub fn handle(&mut self, now: u64, input: Input) {
        match input {
            Input::PeerConnected { peer } => {
                if self.connected.len() >= peers::MAX_CONNECTED && !self.connected.contains_key(&peer) {
                    // Never admitted, so nothing it sends counts; not blocked either, since
                    // being full is no fault of the peer's.
                    let text = format!("ignoring {}: {} connections already", peer.short(), peers::MAX_CONNECTED);
                    self.event(None, Level::Warn, text);
                } else {
                    self.connected.entry(peer).or_insert(now);
                    self.ask_hello(peer);
                }
            }
            Input::PeerDisconnected { peer } => self.on_disconnected(peer),
            Input::Rtt { peer, micros } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.rtt_micros = Some(micros);
                }
            }
            Input::Response { peer, kind, result } => self.on_response(now, peer, kind, result),
            Input::BlobAddrs(addrs) => {
                if addrs != self.blob_addrs {
                    self.blob_addrs = addrs;
                    self.have_dirty = true;
                }
            }
            Input::FetchFinished { model, version, result } => self.on_fetch_finished(now, model, version, result),
            Input::ActivationFinished { model, version, result, eval } => {
                self.on_activation_finished(now, model, version, result, eval)
            }
            Input::LocalMetrics(reports) => self.on_local_metrics(now, reports),
        }
        self.finish(now);
    }

    /// A gossiped message from `from` (the peer that forwarded it): verified, taken in,
    /// and the verdict for gossipsub (forward, drop, or penalise the forwarder).
    pub fn handle_gossip(&mut self, now: u64, from: NodeId, topic: &str, data: &[u8]) -> GossipVerdict {
        let verdict = if !self.peers.contains_key(&from) {
            // Its handshake is not finished (or failed): nothing it sends counts.
            GossipVerdict::Ignore("from a peer not admitted".into())
        } else {
            self.on_gossip(now, topic, data)
        };
        self.finish(now);
        verdict
    }

    /// A request from a peer; the answer to send back.
    pub fn handle_request(&mut self, now: u64, from: NodeId, data: &[u8]) -> crate::mesh::PeerResponse {
        let answer = self.on_request(now, from, data);
        self.finish(now);
        answer
    }

    /// Which files of a manifest to import from a local folder holding `present`: those
    /// of every variant. Checks the manifest first.
    pub fn files_to_publish(&self, signed: &crate::manifest::SignedManifest) -> Result<Vec<FileEntry>, String> {
        let verified = self.verify(signed.clone()).map_err(|e| format!("the manifest is not accepted here: {e}"))?;
        Ok(verified.manifest.variants.iter().flat_map(|v| v.files.iter().cloned()).collect())
    }

    /// Publishes a manifest whose files `imported` this node's blob store now holds.
    pub fn publish(
        &mut self,
        now: u64,
        signed: crate::manifest::SignedManifest,
        imported: &[Hex32],
    ) -> Result<String, String> {
        let answer = self.on_publish(now, signed, imported);
        self.finish(now);
        answer
    }

    /// An operator command given to this node directly (it gossips it on).
    pub fn command(&mut self, now: u64, signed: SignedCommand) -> Result<String, String> {
        let answer = self.on_command(now, signed);
        self.finish(now);
        answer
    }

    /// Work left for the end of every input: a changed have record is signed and
    /// gossiped once, the upload view refreshed.
    fn finish(&mut self, now: u64) {
        if self.fetch_check {
            self.fetch_check = false;
            self.try_fetches(now);
        }
        if self.have_dirty {
            self.have_dirty = false;
            self.announce_have(now);
        }
        let view = self.upload_view();
        if view != self.uploads {
            self.uploads = view.clone();
            self.outputs.push_back(Output::Uploads(view));
        }
    }

    fn event(&mut self, model: Option<&str>, level: Level, text: impl Into<String>) {
        let model = model.map(String::from);
        self.outputs.push_back(Output::Event { model, version: None, level, text: text.into() });
    }

    /// A decision about a rollout: logged, and kept in the node's history.
    fn history(
        &mut self,
        now: u64,
        model: &str,
        version: u64,
        level: Level,
        kind: HistoryKind,
        text: impl Into<String>,
    ) {
        let text = text.into();
        self.version_event(model, version, level, text.clone());
        self.keep_history(now, model, version, kind, text);
    }

    /// Keeps a decision in the node's history without logging it (its caller logs it
    /// its own way).
    fn keep_history(&mut self, now: u64, model: &str, version: u64, kind: HistoryKind, text: String) {
        let event = HistoryEvent { at: now / 1000, model: model.to_string(), version, kind, text };
        self.outputs.push_back(Output::History(event));
    }

    fn version_event(&mut self, model: &str, version: u64, level: Level, text: impl Into<String>) {
        let model = Some(model.to_string());
        self.outputs.push_back(Output::Event { model, version: Some(version), level, text: text.into() });
    }

    /// A problem with a model worth showing in its status, logged too.
    fn note(&mut self, model: &str, text: impl Into<String>) {
        let text = text.into();
        self.notes.insert(model.to_string(), text.clone());
        self.event(Some(model), Level::Warn, text);
    }

    fn persist(&mut self, p: Persist) {
        self.outputs.push_back(Output::Persist(p));
    }

    fn persist_model(&mut self, name: &str) {
        if let Some(state) = self.models.get(name).cloned() {
            self.persist(Persist::Model { name: name.to_string(), state });
        }
    }

    fn persist_version(&mut self, key: &VersionKey) {
        if let Some(record) = self.versions.get(key).cloned() {
            self.persist(Persist::Version { name: key.0.clone(), version: key.1, record });
        }
    }

    // Read-only views for status pages.

    pub fn models(&self) -> &BTreeMap<String, ModelState> {
        &self.models
    }

    pub fn model(&self, name: &str) -> Option<&ModelState> {
        self.models.get(name)
    }

    pub fn version_record(&self, name: &str, version: u64) -> Option<&VersionRecord> {
        self.versions.get(&(name.to_string(), version))
    }

    /// The variant of `model`'s `version` this node takes (by its facts), if it holds
    /// the manifest: its id.
    pub fn variant_of(&self, model: &str, version: u64) -> Option<String> {
        self.chosen_variant(model, version).map(|v| v.id)
    }

    pub fn note_of(&self, model: &str) -> Option<&str> {
        self.notes.get(model).map(String::as_str)
    }

    pub fn rollouts(&self) -> &[RolloutView] {
        &self.views
    }

    /// `rollouts`, each with its progress per wave (for operators; the rollout engine
    /// does not need it, so it is not computed at every tick).
    pub fn rollouts_with_progress(&self) -> Vec<RolloutView> {
        let mut views = self.views.clone();
        for v in &mut views {
            v.per_wave = self.wave_progress(&v.model, v.version);
        }
        views
    }

    pub fn fleet(&self) -> &FleetView {
        &self.fleet
    }

    pub fn admitted(&self) -> impl Iterator<Item = (&NodeId, &Tags)> {
        self.peers.iter().map(|(n, p)| (n, &p.tags))
    }

    /// Peers in the peer book (admitted at some time; bounded by `MAX_KNOWN_PEERS`).
    pub fn known_peers(&self) -> usize {
        self.known.len()
    }

    pub fn is_admitted(&self, node: &NodeId) -> bool {
        self.peers.contains_key(node)
    }

    pub fn blob_addrs(&self) -> &[String] {
        &self.blob_addrs
    }

    /// The version this node serves of `model` (or is loading, when `loading`).
    pub fn active(&self, model: &str) -> Option<u64> {
        self.models.get(model).and_then(|m| m.active)
    }

    pub fn is_activating(&self, model: &str) -> bool {
        self.activating.contains_key(model)
    }

    /// The blobs this node published.
    pub fn originated(&self) -> &BTreeSet<Hex32> {
        &self.originated
    }

    /// The version of `model` loaded and served since this start.
    pub fn serving(&self, model: &str) -> Option<u64> {
        self.serving.get(model).copied()
    }
}

/// A node's first phase of the metrics interval, from its id: a fleet that starts at one
/// moment (a site's power coming back, a simulation) still spreads its records over the
/// interval, and a node deciding whether a panel seat is free hears those sent before it
/// instead of deciding at the same instant.
fn id_phase(me: &NodeId, interval_ms: u64) -> u64 {
    let mut phase = [0u8; 8];
    phase.copy_from_slice(&me.as_bytes()[..8]);
    u64::from_le_bytes(phase) % interval_ms.max(1)
}

/// The next time after `now` at `phase` of the metrics interval.
fn metrics_phase_after(now: u64, interval_ms: u64, phase: u64) -> u64 {
    let interval = interval_ms.max(1);
    let phase = phase % interval;
    let next = (now - now % interval).saturating_add(phase);
    if next > now {
        next
    } else {
        next.saturating_add(interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::KeyKind;
    use crate::manifest::SignedManifest;

    #[test]
    fn the_files_to_check_on_start_are_those_the_stored_manifests_name_each_once() {
        let publisher = SecretKey::from_seed(KeyKind::Publisher, [3; 32]);
        let v1 = crate::manifest::tests::sample_manifest(1);
        let mut v2 = crate::manifest::tests::sample_manifest(2);
        let mut other = v2.variants[0].clone();
        other.id = "q4_0".into();
        other.files[0].blake3 = Hex32([8; 32]);
        v2.variants.push(other);
        let mut damaged = SignedManifest::sign(&v1, &publisher).unwrap();
        damaged.body.truncate(5);
        let stored: Vec<SignedManifest> =
            [&v1, &v2].iter().map(|m| SignedManifest::sign(m, &publisher).unwrap()).chain([damaged]).collect();
        let files = Restored::files_named(&stored);
        assert_eq!(files, [Hex32([8; 32]), Hex32([9; 32])].into());
        assert!(Restored::files_named(&[]).is_empty());
    }

    #[test]
    fn each_node_samples_at_its_own_phase_of_the_interval_whenever_it_started() {
        let interval = 10_000;
        let phases: Vec<u64> = (0..200u8)
            .map(|i| {
                let me = SecretKey::from_seed(KeyKind::Node, [i; 32]).public();
                let phase = id_phase(&me, interval);
                let next = metrics_phase_after(1_000_000, interval, phase);
                assert!(next > 1_000_000 && next <= 1_000_000 + interval, "within one interval: {next}");
                // The same phase from any moment, and one interval later from there.
                assert_eq!(metrics_phase_after(next, interval, phase), next + interval);
                assert_eq!(metrics_phase_after(next - 1, interval, phase), next);
                assert_eq!(metrics_phase_after(1_003_333, interval, phase) % interval, next % interval);
                next % interval
            })
            .collect();
        // Spread over the interval: every tenth of it holds some of 200 nodes.
        for tenth in 0..10 {
            let n = phases.iter().filter(|p| **p / (interval / 10) == tenth).count();
            assert!(n >= 5, "{n} of 200 nodes in tenth {tenth}");
        }
        // No division by zero, no overflow at the end of time.
        let me = SecretKey::from_seed(KeyKind::Node, [1; 32]).public();
        assert!(metrics_phase_after(5, 0, id_phase(&me, 0)) > 5);
        assert!(metrics_phase_after(u64::MAX - 1, interval, id_phase(&me, interval)) >= u64::MAX - 1);
    }
}
