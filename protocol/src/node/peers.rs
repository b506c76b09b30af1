//! Peers: the admission handshake, anti-entropy, and what gossip and requests bring in.

use super::{HeldMetrics, HelloRetry, Level, Node, Output, Peer, Persist, RequestKind};
use crate::fleet::{
    verify_metrics, verify_metrics_enrolled, CommandAction, MetricsMessage, RolloutCommand, SignedCommand,
};
use crate::history::HistoryKind;
use crate::identity::NodeId;
use crate::manifest::SignedManifest;
use crate::mesh::{
    admit, manifest_verdict, metrics_mark, verify_have, GossipVerdict, Hello, ManifestDigest, PeerRequest,
    PeerResponse, SignedHave, SyncReply, MAX_SYNC_COMMANDS, MAX_SYNC_HAVES, MAX_SYNC_MANIFESTS, MAX_SYNC_METRICS,
    MAX_SYNC_REVOCATIONS, TOPIC_COMMANDS, TOPIC_MANIFESTS, TOPIC_METRICS, TOPIC_REVOCATIONS,
};
use crate::trust::{same_fleet, verify_certificate};

/// Peers asked per anti-entropy round.
const SYNC_FANOUT: usize = 3;
/// Transport connections this node tracks at most (it never admits the rest); each
/// holds a little state here until it is admitted or dropped.
pub const MAX_CONNECTED: usize = 1024;
/// Peers the peer book holds at most (the canary floor counts them; memory stays flat).
pub const MAX_KNOWN_PEERS: usize = 4096;
/// Operator commands held per rollout (aborts and roll-backs may take as many again).
const MAX_COMMANDS_PER_VERSION: usize = 64;
/// How far ahead of this node's clock a command's `issued_at` may be.
pub const MAX_COMMAND_CLOCK_SKEW_SECS: u64 = 300;

impl Node {
    /// The answer to a peer's hello, once its certificate checked out: with the blob
    /// addresses.
    fn my_hello(&self) -> Hello {
        Hello { certificate: self.certificate.clone(), blob_addrs: self.blob_addrs.clone() }
    }

    fn request(&mut self, peer: NodeId, kind: RequestKind, request: PeerRequest) {
        match request.to_bytes() {
            Ok(data) => self.outputs.push_back(Output::Request { peer, kind, data }),
            Err(e) => self.event(None, Level::Warn, format!("cannot encode a peer request: {e}")),
        }
    }

    pub(super) fn ask_hello(&mut self, peer: NodeId) {
        if self.peers.contains_key(&peer) || !self.hello_asked.insert(peer) {
            return;
        }
        // Sent before the peer is verified: no blob addresses. It learns them from the
        // have record this node sends once it has admitted the peer in turn.
        let hello = Hello { certificate: self.certificate.clone(), blob_addrs: vec![] };
        self.request(peer, RequestKind::Hello, PeerRequest::Hello(hello));
    }

    pub(super) fn on_disconnected(&mut self, peer: NodeId) {
        self.connected.remove(&peer);
        self.hello_asked.remove(&peer);
        self.hello_retry.remove(&peer);
        self.unadmit(peer);
    }

    /// No longer admitted: a fetch no longer lists it, and what it holds is heard again
    /// if it is admitted again.
    fn unadmit(&mut self, peer: NodeId) {
        if self.peers.remove(&peer).is_some() {
            self.directory.forget(&peer);
            self.update_providers();
        }
    }

    /// Admits `peer` if `hello` carries a valid certificate for its own key.
    fn on_hello(&mut self, now: u64, peer: NodeId, hello: &Hello) -> Result<(), String> {
        if let Some(why) = self.revoked_because(&peer) {
            return Err(why);
        }
        let enrollment = admit(hello, &peer, &self.trust, now / 1000).map_err(|e| e.to_string())?;
        same_fleet("its certificate", &enrollment.fleet, &self.fleet_id).map_err(|e| e.to_string())?;
        if self.peers.contains_key(&peer) {
            // Hellos that crossed: the answer to ours carries the blob addresses its
            // request left out.
            if !hello.blob_addrs.is_empty() {
                self.outputs.push_back(Output::LearnAddrs { node: peer, addrs: hello.blob_addrs.clone() });
            }
            return Ok(());
        }
        let site = enrollment.tags.get("site").cloned().unwrap_or_else(|| "-".into());
        self.event(None, Level::Info, format!("admitted peer {} (site {site})", peer.short()));
        if !hello.blob_addrs.is_empty() {
            self.outputs.push_back(Output::LearnAddrs { node: peer, addrs: hello.blob_addrs.clone() });
        }
        self.persist(Persist::Peer { node: peer, tags: enrollment.tags.clone(), addrs: hello.blob_addrs.clone() });
        self.remember(peer, enrollment.tags.clone());
        self.peers.insert(peer, Peer { tags: enrollment.tags, rtt_micros: None, expires_at: enrollment.expires_at });
        self.hello_retry.remove(&peer);
        self.outputs.push_back(Output::Admitted { peer });
        self.update_providers();
        self.send_have(peer);
        self.ask_sync(peer);
        Ok(())
    }

    /// Adds an admitted peer to the peer book. A full book forgets a peer that is not
    /// admitted now (the lowest id: deterministic), so the book stays bounded however many
    /// nodes come and go.
    fn remember(&mut self, peer: NodeId, tags: crate::trust::Tags) {
        if !self.known.contains_key(&peer) && self.known.len() >= MAX_KNOWN_PEERS {
            let admitted = &self.peers;
            if let Some(old) = self.known.keys().find(|n| !admitted.contains_key(n)).copied() {
                self.known.remove(&old);
                self.known_cohorts.get_mut().clear();
                self.persist(Persist::ForgetPeer(old));
            }
        }
        if self.known.get(&peer) != Some(&tags) {
            self.known.insert(peer, tags);
            self.known_cohorts.get_mut().clear();
        }
    }

    /// Admitted peers whose certificates have expired since their handshake are refused
    /// like a peer that presents an expired one (checked every rollout tick).
    pub(super) fn drop_expired_peers(&mut self, now: u64) {
        let secs = now / 1000;
        let expired: Vec<(NodeId, u64)> =
            self.peers.iter().filter(|(_, p)| p.expires_at <= secs).map(|(n, p)| (*n, p.expires_at)).collect();
        for (peer, at) in expired {
            self.refuse(peer, format!("its certificate expired {} s ago", secs.saturating_sub(at)));
        }
    }

    /// When the first connected peer not admitted yet runs out of time.
    pub(super) fn next_admission_deadline(&self) -> Option<u64> {
        self.admission_deadlines().map(|(_, at)| at).min()
    }

    /// Connected peers not admitted yet, with when their time to be admitted runs out.
    fn admission_deadlines(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        let deadline = self.cfg.admission_deadline_ms;
        let waiting = self.connected.iter().filter(|(n, _)| !self.peers.contains_key(n));
        waiting.map(move |(n, at)| (*n, at.saturating_add(deadline)))
    }

    /// Refuses connected peers that have not been admitted within the deadline: a peer
    /// that connects and stays silent (or keeps failing its hello) holds a connection
    /// slot for a bounded time only.
    pub(super) fn refuse_late_peers(&mut self, now: u64) {
        let late: Vec<NodeId> = self.admission_deadlines().filter(|(_, at)| *at <= now).map(|(n, _)| n).collect();
        let secs = self.cfg.admission_deadline_ms / 1000;
        for peer in late {
            self.refuse(peer, format!("not admitted within {secs} s of connecting"));
        }
    }

    pub(super) fn refuse(&mut self, peer: NodeId, reason: String) {
        // The driver disconnects it; if it connects again (after the cool-down), its
        // admission deadline starts afresh.
        self.connected.remove(&peer);
        self.unadmit(peer);
        self.hello_retry.remove(&peer);
        self.outputs.push_back(Output::Refuse { peer, reason });
    }

    pub(super) fn on_request(&mut self, now: u64, peer: NodeId, data: &[u8]) -> PeerResponse {
        let request = match PeerRequest::from_bytes(data) {
            Ok(r) => r,
            Err(e) => return PeerResponse::Refused(format!("bad request: {e}")),
        };
        match request {
            PeerRequest::Hello(hello) => match self.on_hello(now, peer, &hello) {
                Ok(()) => PeerResponse::Hello(self.my_hello()),
                Err(reason) => {
                    let answer = PeerResponse::Refused(format!("not admitted: {reason}"));
                    self.refuse(peer, reason);
                    answer
                }
            },
            // Anything else from a peer not admitted yet (its sync may overtake our hello)
            // is only declined.
            PeerRequest::Sync(_) if !self.peers.contains_key(&peer) => PeerResponse::Refused("not admitted".into()),
            PeerRequest::Sync(digest) => PeerResponse::Sync(self.sync_reply(&digest)),
            PeerRequest::Have(signed) => match self.take_have(peer, signed) {
                Ok(()) => PeerResponse::Taken,
                Err(why) => PeerResponse::Refused(why),
            },
        }
    }

    pub(super) fn on_response(&mut self, now: u64, peer: NodeId, kind: RequestKind, result: Result<Vec<u8>, String>) {
        let answer = result.and_then(|b| PeerResponse::from_bytes(&b).map_err(|e| e.to_string()));
        match (kind, answer) {
            (RequestKind::Hello, Ok(PeerResponse::Hello(hello))) => {
                if let Err(reason) = self.on_hello(now, peer, &hello) {
                    self.refuse(peer, reason);
                }
            }
            // A have record refused or lost (a peer that has not finished admitting us yet)
            // reaches it with the sync that follows its admission: nothing to report.
            (RequestKind::Have, _) => {}
            (_, Ok(PeerResponse::Refused(reason))) => {
                self.event(None, Level::Warn, format!("peer {} refused us: {reason}", peer.short()))
            }
            (RequestKind::Hello, Ok(_)) => self.refuse(peer, "answered hello with something else".into()),
            (RequestKind::Hello, Err(e)) => {
                // A connection that lost a dial race, or a busy peer: ask again shortly
                // while the peer stays connected.
                self.hello_asked.remove(&peer);
                let retry = self.hello_retry.entry(peer).or_insert(HelloRetry { attempts: 0, at: None });
                retry.attempts += 1;
                if retry.attempts <= self.cfg.hello_attempts {
                    retry.at = Some(now + self.cfg.hello_retry_ms);
                } else {
                    // A peer that stays connected and never presents a certificate would
                    // otherwise keep a connection slot, and the gossip libp2p sends to
                    // every connected subscriber, for as long as it likes.
                    let attempts = retry.attempts - 1;
                    self.refuse(peer, format!("no hello after {attempts} attempts: {e}"));
                }
            }
            (RequestKind::Sync, Ok(PeerResponse::Sync(reply))) => self.on_sync_reply(now, peer, reply),
            (RequestKind::Sync, Ok(_)) => {}
            (RequestKind::Sync, Err(_)) => {}
        }
    }

    fn digest(&self) -> ManifestDigest {
        let latest = self.models.iter().filter(|(_, m)| m.latest_known > 0).map(|(n, m)| (n.clone(), m.latest_known));
        let metrics = self.fleet.records().map(|r| metrics_mark(&r.node, r.seq)).take(MAX_SYNC_METRICS).collect();
        ManifestDigest { latest: latest.collect(), revocations: self.revoked.digest(), metrics }
    }

    fn sync_reply(&self, theirs: &ManifestDigest) -> SyncReply {
        let manifests = self
            .digest()
            .newer_than(theirs)
            .into_iter()
            .filter_map(|key| self.manifests.get(&key).map(|m| m.signed.clone()))
            .take(MAX_SYNC_MANIFESTS)
            .collect();
        let haves = self.my_have.iter().take(MAX_SYNC_HAVES).cloned().collect();
        let held = theirs.metrics_held();
        // The certificate goes with the record of a node the asker holds nothing of.
        let metrics = self
            .fleet
            .records()
            .filter_map(|r| {
                let (prefix, seq) = metrics_mark(&r.node, r.seq);
                let theirs = held.get(&prefix);
                if theirs.is_some_and(|theirs| *theirs >= seq) {
                    return None;
                }
                let mine = self.signed_metrics.get(&r.node)?;
                Some(MetricsMessage {
                    record: mine.signed.clone(),
                    certificate: theirs.is_none().then(|| mine.certificate.clone()),
                })
            })
            .take(MAX_SYNC_METRICS)
            .collect();
        let commands = self.commands.values().flatten().take(MAX_SYNC_COMMANDS).cloned().collect();
        let revocations = if theirs.revocations == self.revoked.digest() {
            vec![]
        } else {
            self.revoked.for_sync(MAX_SYNC_REVOCATIONS)
        };
        SyncReply { manifests, haves, metrics, commands, revocations }
    }

    fn ask_sync(&mut self, peer: NodeId) {
        let digest = self.digest();
        self.request(peer, RequestKind::Sync, PeerRequest::Sync(digest));
    }

    /// Anti-entropy: ask a few admitted peers (a different few each round) what they
    /// hold that this node lacks.
    pub(super) fn sync_round(&mut self) {
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        if peers.is_empty() {
            return;
        }
        for k in 0..SYNC_FANOUT.min(peers.len()) {
            let peer = peers[(self.sync_cursor + k) % peers.len()];
            self.ask_sync(peer);
        }
        self.sync_cursor = (self.sync_cursor + SYNC_FANOUT) % peers.len();
    }

    fn on_sync_reply(&mut self, now: u64, peer: NodeId, reply: SyncReply) {
        // Revocations first: what the rest brings from a revoked node then counts for nothing.
        for r in reply.revocations {
            if let Err(why) = self.take_revocation(r) {
                self.event(None, Level::Warn, format!("peer {} sent a bad revocation: {why}", peer.short()));
            }
        }
        for have in reply.haves {
            if let Err(why) = self.take_have(peer, have) {
                self.event(None, Level::Warn, format!("peer {} sent a bad have record: {why}", peer.short()));
            }
        }
        for m in reply.metrics {
            self.take_metrics(now, m);
        }
        for c in reply.commands {
            // A refused one (issued ahead of this node's clock) comes again with a later sync.
            let _ = self.take_command(now, c);
        }
        for manifest in reply.manifests {
            if let GossipVerdict::Reject(why) = self.take_manifest(now, manifest) {
                self.event(None, Level::Warn, format!("peer {} sent a bad manifest: {why}", peer.short()));
            }
        }
    }

    pub(super) fn on_gossip(&mut self, now: u64, topic: &str, data: &[u8]) -> GossipVerdict {
        match topic {
            TOPIC_MANIFESTS => match SignedManifest::from_bytes(data) {
                Ok(m) => self.take_manifest(now, m),
                Err(e) => GossipVerdict::Reject(e.to_string()),
            },
            TOPIC_METRICS => match MetricsMessage::from_bytes(data) {
                Ok(m) => self.take_metrics(now, m),
                Err(e) => GossipVerdict::Reject(e.to_string()),
            },
            TOPIC_COMMANDS => match SignedCommand::from_bytes(data) {
                Ok(c) => match self.trust.open(&c) {
                    Err(e) => GossipVerdict::Reject(e.to_string()),
                    Ok(_) => match self.take_command(now, c) {
                        Ok((_, true)) => GossipVerdict::Accept,
                        Ok((_, false)) => GossipVerdict::Ignore("already held".into()),
                        // Signed by a trusted publisher: not the forwarder's fault.
                        Err(why) => GossipVerdict::Ignore(why),
                    },
                },
                Err(e) => GossipVerdict::Reject(e.to_string()),
            },
            TOPIC_REVOCATIONS => self.on_revocation_gossip(data),
            other => GossipVerdict::Reject(format!("unknown topic {other}")),
        }
    }

    pub(super) fn take_manifest(&mut self, now: u64, signed: SignedManifest) -> GossipVerdict {
        let result = self.verify(signed);
        let verdict = manifest_verdict(&result.as_ref().map(|_| ()).map_err(Clone::clone));
        if let Ok(verified) = result {
            self.accept(now, verified);
        }
        verdict
    }

    /// Takes an admitted peer's own have record (a record it relays for another node
    /// is refused: each node hears of its direct peers' blobs from them).
    fn take_have(&mut self, peer: NodeId, signed: SignedHave) -> Result<(), String> {
        if !self.peers.contains_key(&peer) {
            return Err("not admitted".into());
        }
        let have = verify_have(&signed).map_err(|e| e.to_string())?;
        if have.node != peer {
            return Err(format!("a have record of {} relayed by {}", have.node.short(), peer.short()));
        }
        let addrs = have.blob_addrs.clone();
        if self.directory.update(have) {
            if !addrs.is_empty() {
                self.outputs.push_back(Output::LearnAddrs { node: peer, addrs });
            }
            self.update_providers();
        }
        Ok(())
    }

    /// Sends this node's have record to one admitted peer.
    pub(super) fn send_have(&mut self, peer: NodeId) {
        if let Some(signed) = self.my_have.clone() {
            self.request(peer, RequestKind::Have, PeerRequest::Have(signed));
        }
    }

    /// Keeps the newest record per node; an older or repeated one changes nothing. A
    /// record without its certificate counts under the one held with the node's last
    /// record, and is ignored from a node this one holds nothing of.
    fn take_metrics(&mut self, now: u64, message: MetricsMessage) -> GossipVerdict {
        let MetricsMessage { record: signed, certificate } = message;
        let verified = match certificate {
            Some(c) => verify_metrics(&signed, &c, &self.trust, &self.fleet_id, now / 1000).map(|r| (r, c)),
            None => {
                // Not the forwarder's fault: it may hold the node's certificate.
                let Some(held) = self.signed_metrics.get(&signed.signer) else {
                    return GossipVerdict::Ignore("no certificate with the record, and none held for its node".into());
                };
                // Lapsed since: not the forwarder's fault either, it may hold the node's
                // renewed certificate (the node's next one comes within
                // `CERTIFICATE_REFRESH_INTERVALS`, or by anti-entropy once the record
                // held here expires).
                let enrollment = match verify_certificate(&held.certificate, &self.trust, &signed.signer, now / 1000) {
                    Ok(e) => e,
                    Err(e) => {
                        return GossipVerdict::Ignore(format!(
                            "no certificate with the record, and the one held for its node is no longer valid: {e}"
                        ))
                    }
                };
                verify_metrics_enrolled(&signed, &enrollment, &self.fleet_id).map(|r| (r, held.certificate.clone()))
            }
        };
        let (record, certificate) = match verified {
            Ok(v) => v,
            Err(e) => return GossipVerdict::Reject(e.to_string()),
        };
        if record.node == self.me {
            return GossipVerdict::Ignore("my own record".into());
        }
        // Not the forwarder's fault: it may not hold the revocation yet.
        if let Some(why) = self.revoked_because(&record.node) {
            return GossipVerdict::Ignore(why);
        }
        let node = record.node;
        if !self.fleet.update(record, now / 1000) {
            return GossipVerdict::Ignore("not newer than the record held, or outside the metrics panel".into());
        }
        self.signed_metrics.insert(node, HeldMetrics { signed, certificate });
        // Records the view let go of (its bound, seats taken) are not kept either.
        self.drop_signed_metrics_not_in_view();
        GossipVerdict::Accept
    }

    /// Keeps the signed copy (for anti-entropy) only of records the fleet view holds:
    /// pruned when records left the view since the last time.
    pub(super) fn drop_signed_metrics_not_in_view(&mut self) {
        if self.fleet.departures() == self.fleet_departures_seen {
            return;
        }
        self.fleet_departures_seen = self.fleet.departures();
        let fleet = &self.fleet;
        self.signed_metrics.retain(|n, _| fleet.record(n).is_some());
    }

    /// Takes a command signed by a trusted publisher, returned with whether it is new. Refused: one
    /// issued more than `MAX_COMMAND_CLOCK_SKEW_SECS` ahead of this node's clock (it would
    /// outrank every later command for as long as that clock lags; anti-entropy offers it
    /// again), and, once a version holds `MAX_COMMANDS_PER_VERSION`, any but an abort or
    /// a roll-back (which end the rollout, so they must always get in).
    pub(super) fn take_command(&mut self, now: u64, signed: SignedCommand) -> Result<(RolloutCommand, bool), String> {
        let (command, publisher) = self.trust.open(&signed).map_err(|e| e.to_string())?;
        same_fleet("the command", &command.fleet, &self.fleet_id).map_err(|e| e.to_string())?;
        let ahead = command.issued_at.saturating_sub(now / 1000);
        if ahead > MAX_COMMAND_CLOCK_SKEW_SECS {
            return Err(format!(
                "issued {ahead} s ahead of this node's clock (at most {MAX_COMMAND_CLOCK_SKEW_SECS} s)"
            ));
        }
        let ends = matches!(command.action, CommandAction::Abort | CommandAction::RollBackTo { .. });
        let held = self.commands.entry((command.model.clone(), command.version)).or_default();
        if held.contains(&signed) {
            return Ok((command, false));
        }
        let cap = if ends { 2 * MAX_COMMANDS_PER_VERSION } else { MAX_COMMANDS_PER_VERSION };
        if held.len() >= cap {
            let why = format!("{} commands are held for {}@{} already", held.len(), command.model, command.version);
            self.event(Some(&command.model), Level::Warn, format!("operator command dropped: {why}"));
            return Err(why);
        }
        held.push(signed.clone());
        self.persist(Persist::Command(signed));
        let text = format!("operator command {:?} signed by {publisher}", command.action).to_lowercase();
        let kind = HistoryKind::Command {
            action: command.action,
            signer: publisher.to_string(),
            issued_at: command.issued_at,
        };
        self.history(now, &command.model, command.version, Level::Info, kind, text);
        Ok((command, true))
    }

    pub(super) fn on_command(&mut self, now: u64, signed: SignedCommand) -> Result<String, String> {
        let (c, _) =
            self.take_command(now, signed.clone()).map_err(|e| format!("the command is not accepted here: {e}"))?;
        match signed.to_bytes() {
            Ok(data) => self.outputs.push_back(Output::Gossip { topic: TOPIC_COMMANDS, data }),
            Err(e) => return Err(format!("cannot encode the command: {e}")),
        }
        self.rollout_tick(now);
        Ok(format!(
            "{:?} {}@{}: sent to the mesh (peers that miss it get it by anti-entropy)",
            c.action, c.model, c.version
        )
        .to_lowercase())
    }
}
