//! The libp2p side of a node: TCP (noise, yamux) and QUIC transports; gossipsub with
//! signed messages, strict validation and manual acceptance, and peer scoring that
//! penalises peers forwarding rejected messages; identify; Kademlia (server mode, so a
//! closed network without confirmed external addresses still answers); mDNS (optional);
//! ping (its round-trip times feed provider ranking); and a request-response protocol
//! that carries the admission handshake and anti-entropy.
//!
//! A connected peer is outside the fleet until the node says it is admitted
//! (`MeshHandle::admit`): until then its gossipsub score sits below the graylist
//! threshold, so it is sent no publication, no IHAVE and no mesh slot, and what it sends
//! is dropped; Kademlia neither lists it in the routing table (so no other peer learns of
//! it here) nor stores a record for anyone. The node refuses it if it is not admitted
//! within its deadline.
//!
//! This crate moves bytes and reports events; it decides nothing. The node reads every
//! message through the protocol core and tells the mesh what to accept, whom to refuse
//! and what to send.

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity, MessageId, ValidationMode};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, identify, identity::Keypair, kad, mdns, noise, ping, request_response, tcp, yamux,
    StreamProtocol, Swarm,
};
use slmesh_protocol::mesh::{GOSSIP_MESH_DEGREE, METRICS_MESH_DEGREE, TOPIC_METRICS};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

pub use libp2p::gossipsub::MessageId as GossipMessageId;
pub use libp2p::{multiaddr, Multiaddr, PeerId};

/// Largest request or response on the request-response protocol.
pub const MAX_RPC_BYTES: usize = 4 << 20;
/// Largest gossip message.
pub const MAX_GOSSIP_BYTES: usize = 1 << 20;
/// Connected peers the node tries to keep; more are found through Kademlia.
pub const TARGET_PEERS: usize = 12;
/// Events waiting for the node. When it is full the swarm waits for the node, which
/// never waits for the swarm (see `MeshHandle`).
pub const EVENT_QUEUE: usize = 1024;

#[derive(Debug, Error)]
pub enum MeshError {
    #[error("invalid listen address {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("cannot build the libp2p swarm: {0}")]
    Build(String),
    #[error("cannot open the wire log {path}: {reason}")]
    WireLog { path: String, reason: String },
    #[error("the mesh task has stopped")]
    Stopped,
}

pub struct MeshConfig {
    pub keypair: Keypair,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    pub topics: Vec<String>,
    /// How long a refused peer stays blocked. Then it may connect and present its
    /// certificate again (an operator may have enrolled it since).
    pub refusal_cooldown: Duration,
    /// How often to look for more peers through Kademlia and redial bootstrap peers.
    pub discovery_interval: Duration,
    /// Tests only: append every payload this node hands the mesh (gossip it publishes,
    /// requests, answers) to this file, before encryption, so a test can search what the
    /// node tells its peers.
    pub wire_log: Option<std::path::PathBuf>,
}

/// What a gossip receiver decided about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acceptance {
    Accept,
    Ignore,
    Reject,
}

#[derive(Debug)]
pub enum MeshEvent {
    Listening(Multiaddr),
    Connected {
        peer: PeerId,
        addr: Multiaddr,
    },
    Disconnected {
        peer: PeerId,
    },
    /// A gossip message waiting for a verdict: answer with `MeshHandle::report`.
    Message {
        id: MessageId,
        /// The peer it came from (who gets penalised if it is rejected).
        propagation_source: PeerId,
        topic: String,
        data: Vec<u8>,
    },
    /// A request from a peer: answer with `MeshHandle::respond`.
    Request {
        peer: PeerId,
        id: u64,
        data: Vec<u8>,
    },
    Rtt {
        peer: PeerId,
        rtt: Duration,
    },
    /// The answer to `MeshHandle::request` with this token (or why there is none).
    Response {
        peer: PeerId,
        token: u64,
        result: Result<Vec<u8>, String>,
    },
}

enum Command {
    Publish { topic: String, data: Vec<u8> },
    Report { id: MessageId, source: PeerId, acceptance: Acceptance },
    Request { peer: PeerId, data: Vec<u8>, token: u64 },
    Respond { id: u64, data: Vec<u8> },
    Refuse { peer: PeerId },
    Admit { peer: PeerId },
    Dial { addr: Multiaddr },
    Info { done: oneshot::Sender<MeshInfo> },
    Shutdown { done: oneshot::Sender<()> },
}

/// A snapshot for status pages.
#[derive(Debug, Clone, Default)]
pub struct MeshInfo {
    pub peer_id: Option<PeerId>,
    pub listen: Vec<Multiaddr>,
    pub connected: Vec<(PeerId, Vec<Multiaddr>)>,
    pub gossip_peers: usize,
}

/// Talks to the mesh task. Cheap to clone. Nothing here waits for the swarm: commands
/// queue (the caller's own rate bounds the queue) and answers come back as events, so a
/// node that is busy handling an event can never stall the task that polls the swarm,
/// however full the event channel is.
#[derive(Clone)]
pub struct MeshHandle {
    tx: mpsc::UnboundedSender<Command>,
    /// gossipsub's counters (it updates them; they are read on demand).
    metrics: Arc<std::sync::Mutex<prometheus_client::registry::Registry>>,
    wire_log: Option<Arc<std::sync::Mutex<std::fs::File>>>,
}

/// Gossip bytes of one topic since the start: messages this node published or forwarded,
/// and messages it received (duplicates included), as gossipsub counts them (the
/// messages' encoded size; control messages such as IHAVE not included).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GossipBytes {
    pub topic: String,
    pub sent: u64,
    pub received: u64,
    /// Messages sent (published or forwarded), and received (duplicates included).
    pub sent_messages: u64,
    pub received_messages: u64,
    /// Messages this node published itself.
    pub published: u64,
}

impl MeshHandle {
    fn send(&self, c: Command) {
        if let (
            Some(log),
            Command::Publish { data, .. } | Command::Request { data, .. } | Command::Respond { data, .. },
        ) = (&self.wire_log, &c)
        {
            use std::io::Write;
            let mut file = log.lock().unwrap_or_else(|e| e.into_inner());
            let _ = file.write_all(data).and_then(|_| file.write_all(b"\n"));
        }
        // The task is gone only when the node is shutting down.
        let _ = self.tx.send(c);
    }

    /// Gossips `data` on `topic`. When no peer listens yet, the message is dropped (and
    /// logged); anti-entropy delivers it later.
    pub fn publish(&self, topic: &str, data: Vec<u8>) {
        self.send(Command::Publish { topic: topic.into(), data });
    }

    /// Gossip bytes per topic since the start.
    pub fn gossip_bytes(&self) -> Vec<GossipBytes> {
        let mut text = String::new();
        if let Ok(registry) = self.metrics.lock() {
            if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
                return vec![];
            }
        }
        parse_gossip_bytes(&text)
    }

    pub fn report(&self, id: MessageId, source: PeerId, acceptance: Acceptance) {
        self.send(Command::Report { id, source, acceptance });
    }

    /// Sends a request; its answer (or a timeout, or the peer going away) comes back as
    /// `MeshEvent::Response` with the same `token`.
    pub fn request(&self, peer: PeerId, data: Vec<u8>, token: u64) {
        self.send(Command::Request { peer, data, token });
    }

    pub fn respond(&self, id: u64, data: Vec<u8>) {
        self.send(Command::Respond { id, data });
    }

    /// The node admitted this peer: gossip flows to and from it, and Kademlia may list it.
    pub fn admit(&self, peer: PeerId) {
        self.send(Command::Admit { peer });
    }

    /// Disconnects a peer and refuses its connections and gossip from now on.
    pub fn refuse(&self, peer: PeerId) {
        self.send(Command::Refuse { peer });
    }

    pub fn dial(&self, addr: Multiaddr) {
        self.send(Command::Dial { addr });
    }

    pub async fn info(&self) -> Result<MeshInfo, MeshError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Info { done }).map_err(|_| MeshError::Stopped)?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// Closes every connection and stops the task.
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown { done }).is_ok() {
            let _ = rx.await;
        }
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    ping: ping::Behaviour,
    rpc: request_response::Behaviour<BytesCodec>,
}

/// Starts the swarm on the current tokio runtime. Events arrive on the returned receiver;
/// if nobody reads them the mesh slows down rather than dropping anything.
pub fn start(config: MeshConfig) -> Result<(MeshHandle, mpsc::Receiver<MeshEvent>), MeshError> {
    let wire_log = match &config.wire_log {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| MeshError::WireLog { path: path.display().to_string(), reason: e.to_string() })?;
            Some(Arc::new(std::sync::Mutex::new(file)))
        }
        None => None,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let mut swarm = build_swarm(&config, &mut registry)?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| MeshError::Listen { addr: addr.to_string(), reason: e.to_string() })?;
    }
    for topic in &config.topics {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&IdentTopic::new(topic))
            .map_err(|e| MeshError::Build(format!("subscribe {topic}: {e}")))?;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    let driver = Driver {
        swarm,
        events: events_tx,
        commands: rx,
        bootstrap: config.bootstrap.clone(),
        discovery_interval: config.discovery_interval,
        pending_requests: HashMap::new(),
        inbound: HashMap::new(),
        next_inbound: 0,
        refused: HashMap::new(),
        refusal_cooldown: config.refusal_cooldown,
        local_peers: HashMap::new(),
        admitted: HashSet::new(),
        ping_failures: HashMap::new(),
        listen_addrs: HashMap::new(),
    };
    tokio::spawn(driver.run());
    Ok((MeshHandle { tx, metrics: Arc::new(std::sync::Mutex::new(registry)), wire_log }, events))
}

/// The per-topic byte counters out of gossipsub's metrics in the Prometheus text format
/// (`..._topic_msg_sent_bytes_total{hash="TOPIC"} N`; an `IdentTopic`'s hash is its name).
fn parse_gossip_bytes(text: &str) -> Vec<GossipBytes> {
    let mut by_topic: std::collections::BTreeMap<String, GossipBytes> = Default::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else { continue };
        let name = name.strip_suffix("_total").unwrap_or(name);
        let Some(topic) = rest.split("hash=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        let entry = by_topic
            .entry(topic.to_string())
            .or_insert_with(|| GossipBytes { topic: topic.into(), ..Default::default() });
        let field = match () {
            _ if name.ends_with("topic_msg_sent_bytes") => &mut entry.sent,
            _ if name.ends_with("topic_msg_recv_bytes") => &mut entry.received,
            _ if name.ends_with("topic_msg_sent_counts") => &mut entry.sent_messages,
            _ if name.ends_with("topic_msg_recv_counts_unfiltered") => &mut entry.received_messages,
            _ if name.ends_with("topic_msg_published") => &mut entry.published,
            _ => continue,
        };
        *field = value as u64;
    }
    by_topic.into_values().collect()
}

fn build_swarm(
    config: &MeshConfig,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Swarm<Behaviour>, MeshError> {
    let build = |e: &dyn std::fmt::Display| MeshError::Build(e.to_string());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| build(&e))?
        .with_quic()
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let gossipsub =
                gossip_behaviour(&config.topics)?.with_metrics(registry, gossipsub::MetricsConfig::default());
            let mut kad_config = kad::Config::new(StreamProtocol::new("/slmesh/kad/1.0.0"));
            // Only admitted peers enter the routing table (`Command::Admit`), and the
            // DHT stores nothing a peer puts (the node uses it to find peers only).
            kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
            kad_config.set_record_filtering(kad::StoreInserts::FilterBoth);
            let mut kad = kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
            kad.set_mode(Some(kad::Mode::Server));
            let mdns =
                if config.mdns { Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)?) } else { None };
            Ok(Behaviour {
                blocked: Default::default(),
                gossipsub,
                identify: identify::Behaviour::new(
                    identify::Config::new("/slmesh/1.0.0".into(), key.public()).with_push_listen_addr_updates(true),
                ),
                kad,
                mdns: mdns.into(),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(5)).with_timeout(PING_TIMEOUT),
                ),
                rpc: request_response::Behaviour::new(
                    [(StreamProtocol::new("/slmesh/peer/1"), request_response::ProtocolSupport::Full)],
                    request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
                ),
            })
        })
        .map_err(|e| build(&e))?
        // Gossip and pings keep connections busy; a long idle timeout keeps a quiet mesh
        // from falling apart between rollouts.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    Ok(swarm)
}

/// The default value of a setter's argument type, for types a crate uses in its API but
/// does not export.
fn default_argument<T: Default>(
    _setter: fn(&mut gossipsub::ConfigBuilder, gossipsub::TopicHash, T) -> &mut gossipsub::ConfigBuilder,
) -> T {
    T::default()
}

fn gossip_behaviour(topics: &[String]) -> Result<gossipsub::Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let mut builder = gossipsub::ConfigBuilder::default();
    // The metrics topic's mesh is thinner still (`METRICS_MESH_DEGREE`): its records are
    // most of a rollout's gossip and none is urgent to the second.
    // gossipsub 0.49 takes a `TopicMeshConfig` but does not export the type: its default
    // value is had through the method's own signature.
    let mut metrics_mesh = default_argument(gossipsub::ConfigBuilder::set_topic_config);
    metrics_mesh.mesh_n = METRICS_MESH_DEGREE;
    metrics_mesh.mesh_n_low = METRICS_MESH_DEGREE - 1;
    metrics_mesh.mesh_n_high = METRICS_MESH_DEGREE + 1;
    metrics_mesh.mesh_outbound_min = 1;
    builder.set_topic_config(IdentTopic::new(TOPIC_METRICS).hash(), metrics_mesh);
    let config = builder
        // Every payload is signed by its author (a publisher, an operator, a node) and
        // checked by the protocol core, so gossipsub's own author, sequence number and
        // signature (116 of every message's bytes) would only sign it twice.
        .validation_mode(ValidationMode::Anonymous)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .heartbeat_interval(Duration::from_millis(700))
        // Each message reaches a node from about D mesh peers, and each node forwards it
        // to D - 1: D = 4 (gossipsub's default is 6) keeps the bytes down while IHAVE
        // gossip to peers outside the mesh still repairs what a thin mesh misses. A mesh
        // may grow to 5 (not gossipsub's 12, nor the 8 used before): with 8, grafts from
        // peers pushed meshes in a 24-node fleet well past 4, and the metrics gossip a
        // node handled with them (benches/gossip_bytes).
        .mesh_n(GOSSIP_MESH_DEGREE)
        .mesh_n_low(GOSSIP_MESH_DEGREE - 1)
        .mesh_n_high(GOSSIP_MESH_DEGREE + 1)
        // A node's own messages go to its mesh peers (and gossip) like any other, not to
        // every connected subscriber: flooding them to its 12 connections doubled the
        // metrics gossip a node sends and receives (24 real nodes, benches/gossip_bytes),
        // and anti-entropy delivers whatever a thin mesh misses.
        .flood_publish(false)
        // Content addressing: the same record forwarded twice is one message. The raw
        // 32-byte hash, not its hex: ids travel in every IHAVE, IWANT and IDONTWANT.
        .message_id_fn(|m: &gossipsub::Message| MessageId::new(blake3::hash(&m.data).as_bytes()))
        .build()?;
    let mut behaviour = gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, config)?;
    let mut params = gossipsub::PeerScoreParams {
        // Peers are admitted by certificate, not told apart by address: many nodes of a
        // site share one address behind NAT, and tests run whole fleets on loopback.
        ip_colocation_factor_weight: 0.0,
        ..Default::default()
    };
    for topic in topics {
        let t = gossipsub::TopicScoreParams {
            // A rejected message (forged, unsigned by a trusted key, garbage) costs much
            // more than anything a well-behaved peer earns, so such a peer drops out.
            invalid_message_deliveries_weight: -100.0,
            invalid_message_deliveries_decay: 0.9,
            topic_weight: 1.0,
            // Manifests and have records are rare: expecting a steady delivery rate from
            // mesh peers (P3) would penalise every honest peer of a quiet fleet.
            mesh_message_deliveries_weight: 0.0,
            mesh_failure_penalty_weight: 0.0,
            ..Default::default()
        };
        params.topics.insert(IdentTopic::new(topic).hash(), t);
    }
    let thresholds = gossipsub::PeerScoreThresholds::default();
    behaviour.with_peer_score(params, thresholds)?;
    Ok(behaviour)
}

struct Driver {
    swarm: Swarm<Behaviour>,
    events: mpsc::Sender<MeshEvent>,
    commands: mpsc::UnboundedReceiver<Command>,
    bootstrap: Vec<Multiaddr>,
    discovery_interval: Duration,
    /// Outbound requests in flight: whom to, and the caller's token.
    pending_requests: HashMap<request_response::OutboundRequestId, (PeerId, u64)>,
    inbound: HashMap<u64, request_response::ResponseChannel<Vec<u8>>>,
    next_inbound: u64,
    /// Refused peers and when: blocked until the cool-down has passed.
    refused: HashMap<PeerId, Instant>,
    refusal_cooldown: Duration,
    /// Peers mDNS saw on the local network, redialled at each discovery tick while
    /// not connected: mDNS reports a peer once, and that first dial can fail.
    local_peers: HashMap<PeerId, Multiaddr>,
    /// Connected peers the node has admitted.
    admitted: HashSet<PeerId>,
    /// Pings in a row that failed, per connected peer.
    ping_failures: HashMap<PeerId, u32>,
    /// The listen addresses connected peers announced (identify), for Kademlia once
    /// they are admitted.
    listen_addrs: HashMap<PeerId, Vec<Multiaddr>>,
}

/// The application score (times gossipsub's default weight of 10) of a connected peer
/// not admitted yet: below the graylist threshold (-80), so below the publish (-50) and
/// gossip (-10) thresholds too.
const UNADMITTED_SCORE: f64 = -100.0;
/// A ping unanswered this long failed; this many failures in a row close the peer's
/// connections (a peer gone without a word is noticed within about half a minute).
const PING_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_PING_FAILURES: u32 = 2;
/// Peers found by mDNS that are remembered for redialling (anyone on the local network
/// can answer mDNS).
const MAX_LOCAL_PEERS: usize = 256;
/// Listen addresses kept per peer (identify lets a peer announce any number).
const MAX_LISTEN_ADDRS: usize = 8;

/// Dials a known peer from a fresh local port. Reusing the listen port lets two nodes
/// that find each other at the same instant (mDNS) open one TCP connection from both
/// ends at once; both then act as the noise initiator and the connection dies.
fn dial_peer_opts(peer: PeerId, addresses: Vec<Multiaddr>) -> libp2p::swarm::dial_opts::DialOpts {
    libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(addresses).allocate_new_port().build()
}

impl Driver {
    async fn run(mut self) {
        self.dial_bootstrap();
        let mut discovery = tokio::time::interval(self.discovery_interval);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => {
                    if !self.on_swarm_event(event).await {
                        return;
                    }
                }
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { done }) => {
                        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                        for p in peers {
                            let _ = self.swarm.disconnect_peer_id(p);
                        }
                        let _ = done.send(());
                        return;
                    }
                    Some(c) => self.on_command(c),
                    None => return,
                },
                _ = discovery.tick() => self.discover(),
            }
        }
    }

    fn dial_bootstrap(&mut self) {
        for addr in self.bootstrap.clone() {
            if let Some(peer) = peer_of(&addr) {
                if self.swarm.is_connected(&peer) || self.refused.contains_key(&peer) {
                    continue;
                }
                self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            }
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, "cannot dial bootstrap peer: {e}");
            }
        }
    }

    fn discover(&mut self) {
        self.forgive_refused();
        self.dial_bootstrap();
        let unconnected: Vec<(PeerId, Multiaddr)> = self
            .local_peers
            .iter()
            .filter(|(p, _)| !self.swarm.is_connected(p) && !self.refused.contains_key(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (peer, addr) in unconnected {
            if let Err(e) = self.swarm.dial(dial_peer_opts(peer, vec![addr])) {
                tracing::debug!(%peer, "cannot redial a peer found by mDNS: {e}");
            }
        }
        if self.swarm.connected_peers().count() > 0 {
            // Finding our own id walks the DHT and fills the routing table with peers
            // near us; RoutingUpdated then dials them while we have room.
            let me = *self.swarm.local_peer_id();
            self.swarm.behaviour_mut().kad.get_closest_peers(me);
        }
    }

    /// Unblocks peers refused longer than the cool-down ago: they may connect and
    /// present a certificate again, and are refused again if it is still not valid.
    fn forgive_refused(&mut self) {
        let cooldown = self.refusal_cooldown;
        let expired: Vec<PeerId> =
            self.refused.iter().filter(|(_, at)| at.elapsed() >= cooldown).map(|(p, _)| *p).collect();
        for peer in expired {
            self.refused.remove(&peer);
            let b = self.swarm.behaviour_mut();
            b.blocked.unblock_peer(peer);
            b.gossipsub.remove_blacklisted_peer(&peer);
            tracing::info!(%peer, "a refused peer may connect again (cool-down over)");
        }
    }

    fn on_command(&mut self, command: Command) {
        let b = self.swarm.behaviour_mut();
        match command {
            Command::Publish { topic, data } => {
                if let Err(e) = b.gossipsub.publish(IdentTopic::new(&topic), data) {
                    tracing::debug!(%topic, "not gossiped ({e}); peers get it by anti-entropy");
                }
            }
            Command::Report { id, source, acceptance } => {
                let a = match acceptance {
                    Acceptance::Accept => MessageAcceptance::Accept,
                    Acceptance::Ignore => MessageAcceptance::Ignore,
                    Acceptance::Reject => MessageAcceptance::Reject,
                };
                b.gossipsub.report_message_validation_result(&id, &source, a);
            }
            Command::Request { peer, data, token } => {
                let id = b.rpc.send_request(&peer, data);
                self.pending_requests.insert(id, (peer, token));
            }
            Command::Respond { id, data } => {
                if let Some(channel) = self.inbound.remove(&id) {
                    if b.rpc.send_response(channel, data).is_err() {
                        tracing::debug!("a peer went away before its answer was sent");
                    }
                }
            }
            Command::Admit { peer } => {
                if self.swarm.is_connected(&peer) && self.admitted.insert(peer) {
                    let b = self.swarm.behaviour_mut();
                    b.gossipsub.set_application_score(&peer, 0.0);
                    for addr in self.listen_addrs.get(&peer).into_iter().flatten() {
                        b.kad.add_address(&peer, addr.clone());
                    }
                }
            }
            Command::Refuse { peer } => {
                self.admitted.remove(&peer);
                self.refused.insert(peer, Instant::now());
                b.blocked.block_peer(peer);
                b.gossipsub.blacklist_peer(&peer);
                b.kad.remove_peer(&peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Dial { addr } => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::debug!(%addr, "cannot dial: {e}");
                }
            }
            Command::Info { done } => {
                let gossip_peers = b.gossipsub.all_peers().count();
                let connected = self.swarm.connected_peers().map(|p| (*p, vec![])).collect();
                let info = MeshInfo {
                    peer_id: Some(*self.swarm.local_peer_id()),
                    listen: self.swarm.listeners().cloned().collect(),
                    connected,
                    gossip_peers,
                };
                let _ = done.send(info);
            }
            Command::Shutdown { .. } => unreachable!("handled by the loop"),
        }
    }

    // Takes `&mut self` although it only reads: a `&Driver` held across an await would
    // need the swarm to be `Sync`, which it is not.
    async fn emit(&mut self, event: MeshEvent) -> bool {
        let events = self.events.clone();
        events.send(event).await.is_ok()
    }

    /// Returns false when the node stopped listening (the node is shutting down).
    async fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) -> bool {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => return self.emit(MeshEvent::Listening(address)).await,
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, num_established, .. }
                if num_established.get() == 1 =>
            {
                // Before gossipsub is polled again: nothing is published to it meanwhile.
                self.swarm.behaviour_mut().gossipsub.set_application_score(&peer_id, UNADMITTED_SCORE);
                let addr = endpoint.get_remote_address().clone();
                return self.emit(MeshEvent::Connected { peer: peer_id, addr }).await;
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, "outgoing connection failed: {error}");
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                self.admitted.remove(&peer_id);
                self.listen_addrs.remove(&peer_id);
                self.ping_failures.remove(&peer_id);
                return self.emit(MeshEvent::Disconnected { peer: peer_id }).await;
            }
            SwarmEvent::Behaviour(event) => return self.on_behaviour_event(event).await,
            _ => {}
        }
        true
    }

    async fn on_behaviour_event(&mut self, event: BehaviourEvent) -> bool {
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message { propagation_source, message_id, message }) => {
                if self.refused.contains_key(&propagation_source) {
                    self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        MessageAcceptance::Reject,
                    );
                    return true;
                }
                let event = MeshEvent::Message {
                    id: message_id,
                    propagation_source,
                    topic: message.topic.into_string(),
                    data: message.data,
                };
                return self.emit(event).await;
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, mut info, .. })
                if !self.refused.contains_key(&peer_id) && self.swarm.is_connected(&peer_id) =>
            {
                info.listen_addrs.truncate(MAX_LISTEN_ADDRS);
                if self.admitted.contains(&peer_id) {
                    for addr in &info.listen_addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr.clone());
                    }
                }
                self.listen_addrs.insert(peer_id, info.listen_addrs);
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, addresses, .. }) => {
                let room = self.swarm.connected_peers().count() < TARGET_PEERS;
                if room && !self.swarm.is_connected(&peer) && !self.refused.contains_key(&peer) {
                    if let Err(e) = self.swarm.dial(dial_peer_opts(peer, addresses.into_vec())) {
                        tracing::debug!(%peer, "cannot dial a peer found in the DHT: {e}");
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    let full = self.local_peers.len() >= MAX_LOCAL_PEERS && !self.local_peers.contains_key(&peer);
                    if self.refused.contains_key(&peer) || full {
                        continue;
                    }
                    self.local_peers.insert(peer, addr.clone());
                    if self.swarm.is_connected(&peer) {
                        continue;
                    }
                    // Dialled, not listed in Kademlia: anyone on the local network can
                    // answer mDNS, and only admitted peers are listed.
                    tracing::info!(%peer, %addr, "found a peer by mDNS");
                    if let Err(e) = self.swarm.dial(dial_peer_opts(peer, vec![addr])) {
                        tracing::debug!(%peer, "cannot dial a peer found by mDNS: {e}");
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(gone)) => {
                for (peer, addr) in gone {
                    if self.local_peers.get(&peer) == Some(&addr) {
                        self.local_peers.remove(&peer);
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. }) => {
                self.ping_failures.remove(&peer);
                return self.emit(MeshEvent::Rtt { peer, rtt }).await;
            }
            BehaviourEvent::Ping(ping::Event { peer, result: Err(e), .. }) => {
                // A peer behind a cut link keeps its TCP connection for many minutes (the
                // kernel retransmits in silence): close it, so that it is dialled afresh,
                // and caught up by anti-entropy, once the network is back.
                let failures = self.ping_failures.entry(peer).or_default();
                *failures += 1;
                if *failures >= MAX_PING_FAILURES {
                    tracing::info!(%peer, "peer unreachable ({failures} pings failed: {e}); closing its connections");
                    self.ping_failures.remove(&peer);
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
            BehaviourEvent::Rpc(request_response::Event::Message { peer, message, .. }) => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let id = self.next_inbound;
                    self.next_inbound += 1;
                    self.inbound.insert(id, channel);
                    return self.emit(MeshEvent::Request { peer, id, data: request }).await;
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some((peer, token)) = self.pending_requests.remove(&request_id) {
                        return self.emit(MeshEvent::Response { peer, token, result: Ok(response) }).await;
                    }
                }
            },
            BehaviourEvent::Rpc(request_response::Event::OutboundFailure { request_id, error, .. }) => {
                if let Some((peer, token)) = self.pending_requests.remove(&request_id) {
                    let result = Err(error.to_string());
                    return self.emit(MeshEvent::Response { peer, token, result }).await;
                }
            }
            BehaviourEvent::Rpc(request_response::Event::InboundFailure { peer, error, .. }) => {
                tracing::debug!(%peer, "inbound request failed: {error}");
                // The channel of a failed inbound request is gone; forget it.
                self.inbound.retain(|_, c| c.is_open());
            }
            _ => {}
        }
        true
    }
}

/// The peer id at the end of a `/p2p/<id>` address, if any.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// Length-prefixed bytes with a size cap: the request-response wire. The contents are the
/// protocol core's versioned messages.
#[derive(Clone, Default)]
struct BytesCodec;

async fn read_frame<T: futures::AsyncRead + Unpin + Send>(io: &mut T) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_RPC_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {len} bytes, at most {MAX_RPC_BYTES}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: futures::AsyncWrite + Unpin + Send>(io: &mut T, data: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(data.len())
        .ok()
        .filter(|l| *l as usize <= MAX_RPC_BYTES)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "message too large to send"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(data).await?;
    io.close().await
}

#[async_trait::async_trait]
impl request_response::Codec for BytesCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Vec<u8>) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: Vec<u8>) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}

#[cfg(test)]
mod tests;
