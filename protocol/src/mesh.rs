//! What nodes say to each other, and the pure decisions around it: admission of a peer,
//! which blobs a peer holds, which providers to fetch from first, and what a peer has
//! that this node lacks (anti-entropy). The mesh crate carries these bytes over libp2p;
//! the simulator carries them over its simulated links.

use crate::error::ProtocolError;
use crate::hex32::Hex32;
use crate::identity::NodeId;
use crate::signed::{Signed, SignedKind};
use crate::trust::{verify_certificate, Enrollment, EnrollmentCertificate, TrustStore};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Sent first on every new connection (over request-response): a peer that cannot show a
/// valid certificate for its own key is disconnected and nothing it sent is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub certificate: EnrollmentCertificate,
    /// Where this node's iroh endpoint listens (socket addresses), for blob transfers.
    pub blob_addrs: Vec<String>,
}

pub const MAX_ADDRS: usize = 16;

/// The addresses of a blob endpoint worth dialing (or announcing): the loopback ones only
/// when there is no other. A loopback address names the dialer's own host: from another
/// machine or network namespace it reaches whatever listens on that port there, which on
/// a fleet's common port is the dialer's own endpoint; its key fails the handshake, and
/// iroh gives up the whole connection instead of trying the other paths.
pub fn dialable_addrs(addrs: Vec<std::net::SocketAddr>) -> Vec<std::net::SocketAddr> {
    if addrs.iter().all(|a| a.ip().is_loopback()) {
        return addrs;
    }
    addrs.into_iter().filter(|a| !a.ip().is_loopback()).collect()
}

/// The addresses a node announces for its blob endpoint: each socket it is bound to, one
/// bound to an unspecified address (`0.0.0.0`, `::`) once for each address of its family
/// the mesh listens on (peers cannot dial "any address"); of those the dialable ones
/// (`dialable_addrs`), at most `MAX_ADDRS`.
pub fn announced_blob_addrs(
    bound: &[std::net::SocketAddr],
    listen_ips: &std::collections::BTreeSet<std::net::IpAddr>,
) -> Vec<std::net::SocketAddr> {
    let mut out = vec![];
    for bound in bound {
        if bound.ip().is_unspecified() {
            let same_family = listen_ips.iter().filter(|ip| ip.is_ipv4() == bound.is_ipv4());
            out.extend(same_family.map(|ip| std::net::SocketAddr::new(*ip, bound.port())));
        } else {
            out.push(*bound);
        }
    }
    let mut out = dialable_addrs(out);
    out.truncate(MAX_ADDRS);
    out
}
pub const MAX_BLOBS_PER_HAVE: usize = 4096;
pub const MAX_DIGEST_ENTRIES: usize = 4096;

impl Hello {
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        crate::wire::encode_versioned(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let hello: Hello = crate::wire::decode_versioned(bytes, "hello")?;
        if hello.blob_addrs.len() > MAX_ADDRS {
            return Err(ProtocolError::invalid(
                "hello",
                format!("{} addresses, at most {MAX_ADDRS}", hello.blob_addrs.len()),
            ));
        }
        Ok(hello)
    }
}

/// Admits the peer whose transport identity is `peer` if its hello carries a valid
/// certificate for that very key. Returns what the operator certified (its tags).
pub fn admit(hello: &Hello, peer: &NodeId, trust: &TrustStore, now: u64) -> Result<Enrollment, ProtocolError> {
    verify_certificate(&hello.certificate, trust, peer, now)
}

/// A node's announcement of the blobs it holds complete and can serve. Signed by the
/// node itself; receivers accept it only from admitted peers, and keep the highest `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveRecord {
    pub node: NodeId,
    /// Grows with every announcement of this node: a replayed older one is ignored.
    pub seq: u64,
    pub blobs: Vec<Hex32>,
    pub blob_addrs: Vec<String>,
    /// Blobs it is fetching: it serves the pieces it has verified already (fetchers ask
    /// it which, over iroh-blobs).
    pub partial: Vec<Hex32>,
}

impl SignedKind for HaveRecord {
    const DOMAIN: &'static [u8] = b"slmesh/have";
    const WHAT: &'static str = "have record";
}

pub type SignedHave = Signed<HaveRecord>;

/// Checks a have record: self-signed by the node it names, within limits.
pub fn verify_have(signed: &SignedHave) -> Result<HaveRecord, ProtocolError> {
    let have = signed.verify_self_signed()?;
    if have.node != signed.signer {
        return Err(ProtocolError::invalid("have record", "signed by another node than the one it names"));
    }
    if have.blobs.len() + have.partial.len() > MAX_BLOBS_PER_HAVE || have.blob_addrs.len() > MAX_ADDRS {
        return Err(ProtocolError::invalid("have record", "too many blobs or addresses"));
    }
    Ok(have)
}

/// Who holds which blob, from the newest have record of each admitted peer.
#[derive(Debug, Clone, Default)]
pub struct BlobDirectory {
    records: BTreeMap<NodeId, HaveRecord>,
}

impl BlobDirectory {
    /// Takes a verified record; returns whether it was news (not older than what we hold).
    pub fn update(&mut self, have: HaveRecord) -> bool {
        match self.records.get(&have.node) {
            Some(held) if held.seq >= have.seq => false,
            _ => {
                self.records.insert(have.node, have);
                true
            }
        }
    }

    pub fn forget(&mut self, node: &NodeId) {
        self.records.remove(node);
    }

    /// Every node that announced `blob`.
    pub fn holders(&self, blob: &Hex32) -> Vec<NodeId> {
        self.records.values().filter(|r| r.blobs.contains(blob)).map(|r| r.node).collect()
    }

    /// Every node that announced it is fetching `blob` (and serves what it has of it).
    pub fn partial_holders(&self, blob: &Hex32) -> Vec<NodeId> {
        self.records.values().filter(|r| r.partial.contains(blob)).map(|r| r.node).collect()
    }

    pub fn record(&self, node: &NodeId) -> Option<&HaveRecord> {
        self.records.get(node)
    }
}

/// What this node knows of a candidate provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderInfo {
    pub node: NodeId,
    pub site: Option<String>,
    /// Measured round-trip time (libp2p ping), if any.
    pub rtt_micros: Option<u64>,
}

/// Orders providers: same site first, then by measured round-trip time (unmeasured
/// last), then by node id so that the order is deterministic.
pub fn rank_providers(mut candidates: Vec<ProviderInfo>, my_site: Option<&str>) -> Vec<NodeId> {
    candidates.sort_by_key(|p| {
        let other_site = !(my_site.is_some() && p.site.as_deref() == my_site);
        (other_site, p.rtt_micros.unwrap_or(u64::MAX), p.node)
    });
    candidates.into_iter().map(|p| p.node).collect()
}

/// A summary of what a node holds: the newest manifest version per model name, a hash
/// of the nodes it knows to be revoked, and the metrics records it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDigest {
    pub latest: BTreeMap<String, u64>,
    /// `RevocationList::digest` of the asker: a peer whose list differs sends its own.
    pub revocations: [u8; 32],
    /// The metrics records the asker holds (`MetricsMark`, at most `MAX_SYNC_METRICS`):
    /// a peer sends only records it holds newer, not every record every round.
    pub metrics: Vec<MetricsMark>,
}

/// A metrics record in a digest: the first 8 bytes of its node's id and its sequence
/// number (17 bytes on the wire instead of a record's 700). Two nodes sharing a prefix
/// (one in 2^64 a pair) only cost the asker a record until a later round or gossip.
pub type MetricsMark = ([u8; 8], u64);

/// `MetricsMark` of a node's record.
pub fn metrics_mark(node: &crate::identity::NodeId, seq: u64) -> MetricsMark {
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&node.as_bytes()[..8]);
    (prefix, seq)
}

impl ManifestDigest {
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        crate::wire::encode_versioned(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let digest: ManifestDigest = crate::wire::decode_versioned(bytes, "manifest digest")?;
        digest.check()?;
        Ok(digest)
    }

    fn check(&self) -> Result<(), ProtocolError> {
        if self.latest.len() > MAX_DIGEST_ENTRIES {
            return Err(ProtocolError::invalid("manifest digest", "too many entries"));
        }
        if self.metrics.len() > MAX_SYNC_METRICS {
            return Err(ProtocolError::invalid(
                "manifest digest",
                format!("{} metrics records, at most {MAX_SYNC_METRICS}", self.metrics.len()),
            ));
        }
        Ok(())
    }

    /// The sequence number of the newest record of `node`'s the digest lists (by prefix).
    pub fn metrics_held(&self) -> BTreeMap<[u8; 8], u64> {
        let mut held = BTreeMap::new();
        for (prefix, seq) in &self.metrics {
            let e = held.entry(*prefix).or_insert(*seq);
            *e = (*e).max(*seq);
        }
        held
    }

    /// The model names for which `self` (a peer's digest) holds a newer version than
    /// `mine`: what to ask that peer for.
    pub fn newer_than(&self, mine: &ManifestDigest) -> Vec<(String, u64)> {
        self.latest
            .iter()
            .filter(|(name, v)| mine.latest.get(*name).is_none_or(|held| held < *v))
            .map(|(n, v)| (n.clone(), *v))
            .collect()
    }
}

/// Gossipsub topics. The version suffix changes with an incompatible message format.
pub const TOPIC_MANIFESTS: &str = "slmesh/manifests/1";
/// 2: records carry their node's enrollment certificate. 3: sketches at 2% accuracy
/// (a node of another accuracy would merge buckets that mean other values). 4: the
/// record's body is encoded compactly (`wire::Encoding::Compact`) and the certificate
/// goes beside it, only sometimes (`fleet::MetricsMessage`).
pub const TOPIC_METRICS: &str = "slmesh/metrics/5";
pub const TOPIC_COMMANDS: &str = "slmesh/commands/1";
pub const TOPIC_REVOCATIONS: &str = "slmesh/revocations/1";

/// Gossipsub mesh degree of every topic but metrics (gossipsub's default is 6): each
/// message reaches a node from about D mesh peers and each node forwards it to D - 1.
pub const GOSSIP_MESH_DEGREE: usize = 4;
/// Mesh degree of the metrics topic. Its records make most of a node's gossip during a
/// rollout, and none is urgent to the second: gates read them once per metrics
/// interval, and anti-entropy repairs what a thin mesh misses. A random mesh of degree
/// 3 is still connected; each node handles each record about four times instead of
/// five to six.
pub const METRICS_MESH_DEGREE: usize = 3;

pub const MAX_SYNC_MANIFESTS: usize = 64;
pub const MAX_SYNC_HAVES: usize = 1024;
pub const MAX_SYNC_METRICS: usize = 256;
pub const MAX_SYNC_COMMANDS: usize = 256;
pub const MAX_SYNC_REVOCATIONS: usize = 256;

/// A request from one peer to another over the mesh's request-response protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// The admission handshake: sent by both sides right after connecting.
    Hello(Hello),
    /// Anti-entropy: "this is what I hold; send me what is newer, and who holds what".
    Sync(ManifestDigest),
    /// The sender's own have record, sent to each admitted peer when it changes. Have
    /// records go only to direct peers (the only ones a node fetches from), never to the
    /// whole fleet: what a node receives grows with its connections, not the fleet.
    Have(SignedHave),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerResponse {
    Hello(Hello),
    Sync(SyncReply),
    /// A have record was taken.
    Taken,
    /// The peer will not answer (for example: the asker is not admitted).
    Refused(String),
}

/// What a peer sends back to a `Sync`: the newest manifest of each model the asker lacks,
/// the peer's own have record, and the metrics records it holds newer than the asker. The asker verifies every one as if it were gossiped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncReply {
    pub manifests: Vec<crate::manifest::SignedManifest>,
    pub haves: Vec<SignedHave>,
    /// The metrics records the peer holds and the asker's digest lacks (or lists older),
    /// so a late node sees the fleet at once; with the certificate of each node whose
    /// record the digest does not list.
    pub metrics: Vec<crate::fleet::MetricsMessage>,
    /// Operator commands about rollouts (pause, promote, ...).
    pub commands: Vec<crate::fleet::SignedCommand>,
    /// Revocations, when the asker's digest says its list differs (the newest first).
    pub revocations: Vec<crate::revocation::SignedRevocation>,
}

fn check_hello(hello: &Hello) -> Result<(), ProtocolError> {
    if hello.blob_addrs.len() > MAX_ADDRS {
        return Err(ProtocolError::invalid(
            "hello",
            format!("{} addresses, at most {MAX_ADDRS}", hello.blob_addrs.len()),
        ));
    }
    Ok(())
}

impl PeerRequest {
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        crate::wire::encode_versioned(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let request: PeerRequest = crate::wire::decode_versioned(bytes, "peer request")?;
        match &request {
            PeerRequest::Hello(h) => check_hello(h)?,
            PeerRequest::Sync(d) => d.check()?,
            PeerRequest::Have(_) => {}
        }
        Ok(request)
    }
}

impl PeerResponse {
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        crate::wire::encode_versioned(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let response: PeerResponse = crate::wire::decode_versioned(bytes, "peer response")?;
        match &response {
            PeerResponse::Hello(h) => check_hello(h)?,
            PeerResponse::Sync(r)
                if r.manifests.len() > MAX_SYNC_MANIFESTS
                    || r.haves.len() > MAX_SYNC_HAVES
                    || r.metrics.len() > MAX_SYNC_METRICS
                    || r.commands.len() > MAX_SYNC_COMMANDS
                    || r.revocations.len() > MAX_SYNC_REVOCATIONS =>
            {
                return Err(ProtocolError::invalid("sync reply", "too many manifests, records or commands"))
            }
            _ => {}
        }
        Ok(response)
    }
}

/// How a node answers a gossiped message, which gossipsub turns into forwarding (accept)
/// or a peer-score penalty for the peer that forwarded it (reject).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipVerdict {
    Accept,
    /// Not forwarded, no penalty: valid but stale, or from a peer whose handshake is not
    /// finished yet.
    Ignore(String),
    /// Not forwarded, and the forwarding peer is penalised.
    Reject(String),
}

/// The verdict for a manifest that failed verification: a replay of an older version is
/// merely stale; anything else (bad signature, unknown key, garbage) is an attack or a bug.
pub fn manifest_verdict(result: &Result<(), ProtocolError>) -> GossipVerdict {
    match result {
        Ok(()) => GossipVerdict::Accept,
        Err(e @ ProtocolError::NotNewer { .. }) => GossipVerdict::Ignore(e.to_string()),
        Err(e) => GossipVerdict::Reject(e.to_string()),
    }
}

/// How a provider shares its uplink. Seeding from the origin (the node that published a
/// version) is the bottleneck of a fan-out: once enough peers hold a copy, the origin
/// stops serving that blob and the mesh spreads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadPolicy {
    /// Transfers of one blob at a time at most; more fetchers wait for a slot (below) or
    /// are refused and try another holder. 0: this node uploads nothing (a metered link,
    /// say).
    pub slots_per_blob: usize,
    /// A blob's transfers start one at a time: another starts beside a running one only
    /// once that one has run this long (a slow fetcher or link), up to `slots_per_blob`.
    /// One at a time, each piece leaves at the uplink's full speed and its fetcher passes
    /// it on sooner, where two at once each take half of it; a slow fetcher still holds
    /// no other back for longer than this. 0: `slots_per_blob` at once.
    pub stalled_after_ms: u64,
    /// The origin serves a blob only while fewer than this many admitted peers hold it
    /// (0: no limit).
    pub origin_copies: usize,
    /// Piece requests of one blob held while every slot is busy, each started as a slot
    /// frees: the uplink goes on to the next piece at once, where a refusal would leave
    /// it idle for the fetcher's round trip and back-off. More are refused.
    pub waiting_per_blob: usize,
    /// A held request is refused after waiting this long (a transfer that hangs holds its
    /// slot; the fetcher asks another provider).
    pub max_wait_ms: u64,
}

impl Default for UploadPolicy {
    fn default() -> Self {
        UploadPolicy {
            slots_per_blob: 2,
            stalled_after_ms: 250,
            origin_copies: 2,
            waiting_per_blob: 4,
            max_wait_ms: 2_000,
        }
    }
}

/// Whether to serve one more fetcher of a blob. `other_holders`: admitted peers that
/// announced the whole blob.
pub fn upload_decision(
    policy: &UploadPolicy,
    uploading: usize,
    originated: bool,
    other_holders: usize,
) -> Result<(), String> {
    if policy.slots_per_blob == 0 {
        return Err("this node does not upload to peers".into());
    }
    if uploading >= policy.slots_per_blob {
        return Err(format!("all {} upload slots of this blob are busy", policy.slots_per_blob));
    }
    if originated && policy.origin_copies > 0 && other_holders >= policy.origin_copies {
        return Err(format!("{other_holders} peers hold this blob: fetch it from them"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{KeyKind, SecretKey};

    #[test]
    fn a_node_announces_where_peers_can_dial_its_blob_endpoint() {
        let sock = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let ips = |list: &[&str]| list.iter().map(|s| s.parse().unwrap()).collect();
        // Bound to every address: once per listened address of the family, loopback dropped
        // beside another, IPv6 addresses not given to an IPv4 socket.
        let listening = ips(&["127.0.0.1", "10.0.0.2", "192.168.1.5", "::1"]);
        assert_eq!(
            announced_blob_addrs(&[sock("0.0.0.0:4919")], &listening),
            vec![sock("10.0.0.2:4919"), sock("192.168.1.5:4919")]
        );
        assert_eq!(announced_blob_addrs(&[sock("[::]:4919")], &listening), vec![sock("[::1]:4919")]);
        // Bound to one address: that one, whatever the mesh listens on.
        assert_eq!(announced_blob_addrs(&[sock("10.0.0.9:1")], &listening), vec![sock("10.0.0.9:1")]);
        // Loopback alone (a test mesh on one host) is kept.
        assert_eq!(announced_blob_addrs(&[sock("0.0.0.0:7")], &ips(&["127.0.0.1"])), vec![sock("127.0.0.1:7")]);
        // Nothing listened on yet: nothing to announce for an unspecified socket.
        assert!(announced_blob_addrs(&[sock("0.0.0.0:7")], &ips(&[])).is_empty());
        // At most MAX_ADDRS, as a hello may carry.
        let many: std::collections::BTreeSet<std::net::IpAddr> =
            (1..=40u8).map(|i| std::net::IpAddr::from([10, 0, 0, i])).collect();
        assert_eq!(announced_blob_addrs(&[sock("0.0.0.0:7")], &many).len(), MAX_ADDRS);
    }

    fn node(seed: u8) -> SecretKey {
        SecretKey::from_seed(KeyKind::Node, [seed; 32])
    }

    #[test]
    fn loopback_addresses_are_dialed_only_when_a_peer_has_no_other() {
        let addrs = |list: &[&str]| list.iter().map(|a| a.parse().unwrap()).collect::<Vec<std::net::SocketAddr>>();
        let both = addrs(&["127.0.0.1:4002", "10.77.3.1:4002", "[::1]:4002", "[fd00::1]:4002"]);
        assert_eq!(dialable_addrs(both), addrs(&["10.77.3.1:4002", "[fd00::1]:4002"]));
        let local = addrs(&["127.0.0.1:4002", "[::1]:4002"]);
        assert_eq!(dialable_addrs(local.clone()), local);
        assert!(dialable_addrs(vec![]).is_empty());
    }

    #[test]
    fn admission_needs_a_certificate_for_the_peer_itself() {
        let operator = SecretKey::from_seed(KeyKind::Publisher, [1; 32]);
        let mut trust = TrustStore::new();
        trust.add("ops", operator.public()).unwrap();
        let a = node(2);
        let enrollment = Enrollment {
            node: a.public(),
            tags: Default::default(),
            issued_at: 10,
            expires_at: 100,
            fleet: crate::trust::default_fleet(),
        };
        let hello =
            Hello { certificate: enrollment.sign(&operator).unwrap(), blob_addrs: vec!["127.0.0.1:4002".into()] };
        let hello = Hello::from_bytes(&hello.to_bytes().unwrap()).unwrap();
        assert!(admit(&hello, &a.public(), &trust, 50).is_ok());
        // Someone replaying a's hello from another key is refused.
        assert!(matches!(
            admit(&hello, &node(3).public(), &trust, 50),
            Err(ProtocolError::CertificateSubjectMismatch { .. })
        ));
        // A self-made certificate is refused.
        let forged = Hello { certificate: enrollment.sign(&a).unwrap(), blob_addrs: vec![] };
        assert!(matches!(admit(&forged, &a.public(), &trust, 50), Err(ProtocolError::UnknownKey { .. })));
        assert!(matches!(admit(&hello, &a.public(), &trust, 100), Err(ProtocolError::CertificateExpired { .. })));
    }

    #[test]
    fn have_records_are_self_signed_and_newest_wins() {
        let a = node(4);
        let blob = Hex32([7; 32]);
        let record =
            |seq, blobs: Vec<Hex32>| HaveRecord { node: a.public(), seq, blobs, blob_addrs: vec![], partial: vec![] };
        let signed = SignedHave::sign(&record(2, vec![blob]), &a).unwrap();
        let have = verify_have(&SignedHave::from_bytes(&signed.to_bytes().unwrap()).unwrap()).unwrap();
        let mut dir = BlobDirectory::default();
        assert!(dir.update(have));
        assert_eq!(dir.holders(&blob), vec![a.public()]);
        assert!(!dir.update(record(1, vec![])), "an older record must not replace a newer one");
        assert!(!dir.update(record(2, vec![])), "a replay must not count");
        assert_eq!(dir.holders(&blob), vec![a.public()]);
        assert!(dir.update(record(3, vec![])));
        assert!(dir.holders(&blob).is_empty());
        // Speaking for another node is refused.
        let b = node(5);
        let lie = SignedHave::sign(&record(9, vec![blob]), &b).unwrap();
        assert!(verify_have(&lie).is_err());
    }

    #[test]
    fn providers_rank_same_site_then_rtt() {
        let p = |seed, site: Option<&str>, rtt| ProviderInfo {
            node: node(seed).public(),
            site: site.map(str::to_string),
            rtt_micros: rtt,
        };
        let ranked = rank_providers(
            vec![
                p(10, Some("b"), Some(100)),
                p(11, Some("a"), Some(9_000)),
                p(12, None, None),
                p(13, Some("a"), Some(500)),
                p(14, Some("b"), Some(50)),
            ],
            Some("a"),
        );
        let want: Vec<_> = [13, 11, 14, 10, 12].iter().map(|s| node(*s).public()).collect();
        assert_eq!(ranked, want);
    }

    #[test]
    fn a_metrics_digest_keeps_each_node_prefix_at_its_newest_record() {
        let a = node(4).public();
        let digest = ManifestDigest {
            metrics: vec![metrics_mark(&a, 9), metrics_mark(&a, 3), metrics_mark(&node(5).public(), 1)],
            ..Default::default()
        };
        let held = digest.metrics_held();
        assert_eq!(held.len(), 2);
        assert_eq!(held.get(&metrics_mark(&a, 0).0), Some(&9));
    }

    #[test]
    fn anti_entropy_asks_for_what_is_newer() {
        let mine = ManifestDigest { latest: [("a".to_string(), 3), ("b".to_string(), 5)].into(), ..Default::default() };
        let latest = [("a".to_string(), 4), ("b".to_string(), 5), ("c".to_string(), 1)].into();
        let theirs = ManifestDigest { latest, ..Default::default() };
        let theirs = ManifestDigest::from_bytes(&theirs.to_bytes().unwrap()).unwrap();
        let mut other_version = theirs.to_bytes().unwrap();
        other_version[0] = 9;
        assert!(matches!(
            ManifestDigest::from_bytes(&other_version),
            Err(ProtocolError::UnknownProtocolVersion { got: 9, .. })
        ));
        assert_eq!(theirs.newer_than(&mine), vec![("a".to_string(), 4), ("c".to_string(), 1)]);
        assert!(mine.newer_than(&theirs).is_empty());
    }

    #[test]
    fn peer_requests_round_trip_and_refuse_oversized_lists() {
        let operator = SecretKey::from_seed(KeyKind::Publisher, [1; 32]);
        let enrollment = Enrollment {
            node: node(2).public(),
            tags: Default::default(),
            issued_at: 1,
            expires_at: 9,
            fleet: crate::trust::default_fleet(),
        };
        let hello =
            Hello { certificate: enrollment.sign(&operator).unwrap(), blob_addrs: vec!["10.0.0.1:4002".into()] };
        for request in [PeerRequest::Hello(hello.clone()), PeerRequest::Sync(ManifestDigest::default())] {
            assert_eq!(PeerRequest::from_bytes(&request.to_bytes().unwrap()).unwrap(), request);
        }
        let too_many = Hello { blob_addrs: vec!["10.0.0.1:1".into(); MAX_ADDRS + 1], ..hello.clone() };
        assert!(PeerRequest::from_bytes(&PeerRequest::Hello(too_many.clone()).to_bytes().unwrap()).is_err());
        assert!(PeerResponse::from_bytes(&PeerResponse::Hello(too_many).to_bytes().unwrap()).is_err());
        let marks = ManifestDigest { metrics: vec![([1; 8], 2); MAX_SYNC_METRICS + 1], ..Default::default() };
        let err = PeerRequest::from_bytes(&PeerRequest::Sync(marks.clone()).to_bytes().unwrap()).unwrap_err();
        assert!(err.to_string().contains("metrics records"), "{err}");
        assert!(ManifestDigest::from_bytes(&marks.to_bytes().unwrap()).is_err());
        let reply = PeerResponse::Sync(SyncReply::default());
        assert_eq!(PeerResponse::from_bytes(&reply.to_bytes().unwrap()).unwrap(), reply);
        assert!(PeerResponse::from_bytes(b"\x01\x00\x07").is_err());
    }

    #[test]
    fn stale_manifests_are_ignored_and_forgeries_rejected() {
        assert_eq!(manifest_verdict(&Ok(())), GossipVerdict::Accept);
        let stale = Err(ProtocolError::NotNewer { name: "m".into(), offered: 1, held: 2 });
        assert!(matches!(manifest_verdict(&stale), GossipVerdict::Ignore(_)));
        let forged = Err(ProtocolError::BadSignature { what: "manifest" });
        assert!(matches!(manifest_verdict(&forged), GossipVerdict::Reject(_)));
    }

    #[test]
    fn the_origin_stops_seeding_once_peers_hold_copies() {
        let policy = UploadPolicy { slots_per_blob: 2, origin_copies: 2, ..UploadPolicy::default() };
        assert!(upload_decision(&policy, 0, true, 0).is_ok());
        assert!(upload_decision(&policy, 1, true, 1).is_ok());
        assert!(upload_decision(&policy, 2, false, 0).is_err(), "slots are full");
        assert!(upload_decision(&policy, 0, true, 2).is_err(), "two copies exist: the origin steps back");
        assert!(upload_decision(&policy, 0, false, 9).is_ok(), "other holders keep serving");
        let unlimited = UploadPolicy { slots_per_blob: usize::MAX, origin_copies: 0, ..UploadPolicy::default() };
        assert!(upload_decision(&unlimited, 100, true, 100).is_ok());
        let leech = UploadPolicy { slots_per_blob: 0, origin_copies: 0, ..UploadPolicy::default() };
        assert!(upload_decision(&leech, 0, false, 0).is_err());
    }
}
