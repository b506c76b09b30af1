use super::*;
use libp2p::identity::Keypair;

const TOPIC: &str = "test/1";

fn config(keypair: Keypair, bootstrap: Vec<Multiaddr>) -> MeshConfig {
    MeshConfig {
        keypair,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        bootstrap,
        mdns: false,
        topics: vec![TOPIC.into()],
        refusal_cooldown: Duration::from_secs(60),
        discovery_interval: Duration::from_secs(1),
        wire_log: None,
    }
}

async fn next_listen(events: &mut mpsc::Receiver<MeshEvent>) -> Multiaddr {
    loop {
        if let Some(MeshEvent::Listening(addr)) = events.recv().await {
            return addr;
        }
    }
}

/// Messages `events` brings whose data is `want`, or any message when `want` is None,
/// up to `count`; false if the channel closed first.
async fn wait_messages(events: &mut mpsc::Receiver<MeshEvent>, want: Option<&[u8]>, count: usize) -> usize {
    let mut seen = 0;
    while seen < count {
        match events.recv().await {
            Some(MeshEvent::Message { data, .. }) if want.is_none_or(|w| w == data.as_slice()) => seen += 1,
            Some(_) => {}
            None => break,
        }
    }
    seen
}

/// Mesh a, and mesh b bootstrapped from it (each with its events).
async fn two_meshes() -> (MeshHandle, mpsc::Receiver<MeshEvent>, MeshHandle, mpsc::Receiver<MeshEvent>) {
    let (a, mut a_events) = start(config(Keypair::generate_ed25519(), vec![])).expect("mesh a");
    let a_peer = a.info().await.expect("info").peer_id.expect("peer id");
    let addr = next_listen(&mut a_events).await.with(multiaddr::Protocol::P2p(a_peer));
    let (b, b_events) = start(config(Keypair::generate_ed25519(), vec![addr])).expect("mesh b");
    (a, a_events, b, b_events)
}

/// Waits until each mesh reports the other connected, and admits it (what the node does
/// once the peer's certificate checked out).
async fn admit_each_other(
    a: (&MeshHandle, &mut mpsc::Receiver<MeshEvent>),
    b: (&MeshHandle, &mut mpsc::Receiver<MeshEvent>),
) {
    for (mesh, events) in [a, b] {
        loop {
            if let Some(MeshEvent::Connected { peer, .. }) = events.recv().await {
                mesh.admit(peer);
                break;
            }
        }
    }
}

/// A connected peer gets no gossip until the node admits it, then gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_not_admitted_gets_no_gossip() {
    let run = async {
        let (a, mut a_events, b, mut b_events) = two_meshes().await;
        let b_peer = loop {
            if let Some(MeshEvent::Connected { peer, .. }) = a_events.recv().await {
                break peer;
            }
        };
        // b admits a (b's node checked a's certificate); a has not admitted b.
        loop {
            if let Some(MeshEvent::Connected { peer, .. }) = b_events.recv().await {
                b.admit(peer);
                break;
            }
        }
        for n in 0..20 {
            a.publish(TOPIC, format!("before {n}").into_bytes());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let got = tokio::time::timeout(Duration::from_secs(2), wait_messages(&mut b_events, None, 1)).await;
        assert!(got.is_err(), "a peer a did not admit got a's gossip");
        // Nor does what b publishes reach a's node.
        b.publish(TOPIC, b"from b".to_vec());
        let got = tokio::time::timeout(Duration::from_secs(2), wait_messages(&mut a_events, None, 1)).await;
        assert!(got.is_err(), "gossip from a peer not admitted reached the node");
        a.admit(b_peer);
        for n in 0.. {
            a.publish(TOPIC, format!("after {n}").into_bytes());
            let first = tokio::time::timeout(Duration::from_millis(300), wait_messages(&mut b_events, None, 1));
            if first.await.is_ok() {
                break;
            }
        }
        // gossipsub counted what a sent and b received on the topic.
        let count = |m: &MeshHandle| m.gossip_bytes().into_iter().find(|g| g.topic == TOPIC).unwrap_or_default();
        let (sent, received) = (count(&a).sent, count(&b).received);
        assert!(sent > 0 && received > 0 && received <= sent, "sent {sent}, received {received}");
        let (published, messages) = (count(&a).published, count(&b).received_messages);
        assert!(
            published >= 1 && messages >= 1 && count(&a).sent_messages >= messages,
            "{:?} {:?}",
            count(&a),
            count(&b)
        );
        a.shutdown().await;
        b.shutdown().await;
    };
    tokio::time::timeout(Duration::from_secs(60), run).await.expect("the admitted peer never got gossip");
}

/// The node of mesh `b` does not read its events while the swarm delivers more than the
/// queue holds, and meanwhile keeps giving the mesh commands (gossip to publish, verdicts
/// to report), as a node busy with an event does. Before, each command waited for the
/// swarm task while that task waited for the node: both stopped for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_event_queue_stalls_neither_the_node_nor_the_swarm() {
    let run = async {
        let (a, mut a_events, b, mut b_events) = two_meshes().await;
        admit_each_other((&a, &mut a_events), (&b, &mut b_events)).await;
        // Both subscribed and meshed: a's gossip reaches b.
        for n in 0.. {
            a.publish(TOPIC, format!("ping {n}").into_bytes());
            let first = tokio::time::timeout(Duration::from_millis(300), wait_messages(&mut b_events, None, 1));
            if first.await.is_ok() {
                break;
            }
        }
        // b's node stops reading; a sends more than b's queue holds.
        let total = EVENT_QUEUE + 200;
        for i in 0..total {
            a.publish(TOPIC, format!("m{i}").into_bytes());
            if i % 64 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The node, still not reading, gossips and reports: none of this may wait.
        for i in 0..500 {
            b.publish(TOPIC, format!("from b {i}").into_bytes());
        }
        b.publish(TOPIC, b"from b".to_vec());
        // Now it reads: more than a queue's worth arrives, so the swarm kept going.
        let got = wait_messages(&mut b_events, None, EVENT_QUEUE + 1).await;
        assert_eq!(got, EVENT_QUEUE + 1);
        // And what b published while its queue was full reached a.
        assert_eq!(wait_messages(&mut a_events, Some(b"from b"), 1).await, 1);
        a.shutdown().await;
        b.shutdown().await;
    };
    tokio::time::timeout(Duration::from_secs(60), run).await.expect("the mesh stalled");
}
