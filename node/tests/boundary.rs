//! The fleet boundary with a real `slmesh node run` process: an outsider that knows the
//! node's blob address and a model's hash, and dials with the stock iroh-blobs client and
//! its own fresh key, gets no byte of the model, no size and no bitfield.

use iroh::endpoint::{presets, PortmapperConfig};
use iroh::{Endpoint, EndpointAddr, RelayMode, SecretKey};
use iroh_blobs::protocol::{ChunkRangesSeq, GetManyRequest, ObserveRequest};
use iroh_blobs::store::mem::MemStore;
use iroh_blobs::Hash;
use n0_future::StreamExt;
use slmesh_e2e::fleet::{model_field, Fleet};
use slmesh_e2e::tiny_llama_gguf;
use std::net::SocketAddr;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

/// What each of an outsider's requests got: `Ok` says what it learnt.
async fn outsider_asks(
    node: iroh::PublicKey,
    addrs: &[SocketAddr],
    hash: Hash,
) -> Vec<(&'static str, Result<String, String>)> {
    let endpoint = Endpoint::builder(presets::Minimal)
        .secret_key(SecretKey::from_bytes(&rand_seed()))
        .relay_mode(RelayMode::Disabled)
        .portmapper_config(PortmapperConfig::Disabled)
        .clear_address_lookup()
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0".parse::<SocketAddr>().expect("addr"))
        .expect("bind address")
        .bind()
        .await
        .expect("outsider endpoint");
    let addr = addrs.iter().fold(EndpointAddr::new(node), |a, s| a.with_ip_addr(*s));
    let connect = || async {
        tokio::time::timeout(Duration::from_secs(10), endpoint.connect(addr.clone(), iroh_blobs::ALPN))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))
    };
    let store = MemStore::new();
    let mut answers = vec![];
    let got = match connect().await {
        Ok(conn) => iroh_blobs::get::request::get_blob(conn, hash)
            .bytes()
            .await
            .map(|b| format!("{} bytes", b.len()))
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    answers.push(("get", got));
    let size = match connect().await {
        Ok(conn) => iroh_blobs::get::request::get_verified_size(&conn, &hash)
            .await
            .map(|(s, _)| format!("size {s}"))
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    answers.push(("size probe", size));
    let many = match connect().await {
        Ok(conn) => store
            .remote()
            .execute_get_many(conn, GetManyRequest::new(vec![hash], ChunkRangesSeq::all()))
            .await
            .map(|s| format!("{} bytes", s.payload_bytes_read))
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    answers.push(("get_many", many));
    let observed = match connect().await {
        Ok(conn) => {
            let mut stream = std::pin::pin!(store.remote().observe(conn, ObserveRequest::new(hash)));
            match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                Ok(Some(Ok(bitfield))) => Ok(format!("bitfield of size {}", bitfield.size())),
                Ok(Some(Err(e))) => Err(e.to_string()),
                Ok(None) => Err("no answer".into()),
                Err(_) => Err("no answer in 10 s".into()),
            }
        }
        Err(e) => Err(e),
    };
    answers.push(("observe", observed));
    endpoint.close().await;
    answers
}

fn rand_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos());
    seed[..16].copy_from_slice(&nanos.to_le_bytes());
    seed[16..20].copy_from_slice(&std::process::id().to_le_bytes());
    seed
}

#[test]
fn an_outsider_with_its_own_key_gets_nothing_from_the_blob_endpoint() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let model = tiny_llama_gguf(1, 1 << 18);
    std::fs::write(fleet.path("tiny.gguf"), &model).expect("write model");
    let node = fleet.node("a", "a", &[]).start();
    let slm = fleet.signed_manifest("tiny", 1, "tiny.gguf");
    fleet.slmesh(&["publish", "--node", &node.http, "--manifest", slm.to_str().expect("path")]);
    node.wait_status("tiny@1 active", WAIT, |s| model_field(s, "tiny", "active") == Some(1));

    let status = node.status();
    let addrs: Vec<SocketAddr> = status["blob_addrs"]
        .as_array()
        .expect("blob addresses")
        .iter()
        .filter_map(|a| a.as_str()?.parse().ok())
        .collect();
    assert!(!addrs.is_empty(), "no dialable blob address in {status}");
    let key: [u8; 32] = hex::decode(&node.node.node_id).expect("hex id").try_into().expect("32 bytes");
    let id = iroh::PublicKey::from_bytes(&key).expect("node key");
    let hash = Hash::new(&model);
    let refused_before = status["refused_fetches"].as_u64().unwrap_or(0);

    let answers = tokio::runtime::Runtime::new().expect("runtime").block_on(outsider_asks(id, &addrs, hash));
    for (what, answer) in &answers {
        assert!(answer.is_err(), "the outsider's {what} was answered: {answer:?}");
    }
    // Refused by the node (not lost on the way): it counted the outsider's connections.
    let refused = node.status()["refused_fetches"].as_u64().unwrap_or(0);
    assert!(refused >= refused_before + answers.len() as u64, "refused {refused_before} -> {refused}: {answers:?}");
    assert!(node.log_text().contains("refused a blob connection"), "{}", node.log_text());
}

/// A TCP port free on loopback now (for a node that must come back at the same address).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

#[test]
fn a_revoked_node_is_dropped_by_every_peer_and_kept_out_after_a_restart() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let a = fleet.node("a", "a", &[]).start();
    let boot_a = a.bootstrap_addr();
    // b comes back at the same address after its restart, so that c dials it again.
    let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let network = ["--http-bind", "127.0.0.1:0", "--listen", &listen, "--blobs-bind", "127.0.0.1:0", "--no-mdns"];
    let mut b_args = network.to_vec();
    b_args.extend(["--bootstrap", &boot_a, "--refusal-cooldown-secs", "2"]);
    let b = fleet.node_with_network("b", "a", &b_args).start();
    let boot_b = b.bootstrap_addr();
    let c = fleet.node("c", "a", &["--bootstrap", &boot_a, "--bootstrap", &boot_b]).start();
    let c_id = c.node.node_id.clone();
    let c_peer = c.status()["peer_id"].as_str().expect("peer id").to_string();
    let admits_c =
        |s: &serde_json::Value| s["peers"].as_array().is_some_and(|p| p.iter().any(|p| p["node_id"] == c_id.as_str()));
    a.wait_status("c admitted", WAIT, admits_c);
    b.wait_status("c admitted", WAIT, admits_c);

    // The stolen key's copy is offline when the operator revokes it: it learns nothing.
    let c = c.stop();
    let said =
        fleet.slmesh(&["revoke", &c_id, "--publisher-key", "ops.key", "--reason", "key stolen", "--node", &a.http]);
    assert!(said.contains("revoked"), "{said}");
    let revoked_c = |s: &serde_json::Value| {
        s["revoked"].as_array().is_some_and(|r| r.iter().any(|r| r[0] == c_id.as_str() && r[1] == "key stolen"))
    };
    for n in [&a, &b] {
        n.wait_status("the revocation", Duration::from_secs(20), |s| !admits_c(s) && revoked_c(s));
    }

    // b restarts with no other peer to learn the revocation from again, and c comes back:
    // b refuses c's handshake from what it persisted.
    a.stop();
    let b = b.stop().start();
    let c = c.start();
    let refused_c = |s: &serde_json::Value| {
        s["refused_peers"].as_array().is_some_and(|r| {
            r.iter().any(|r| r[0] == c_peer.as_str() && r[1].as_str().is_some_and(|w| w.contains("revoked")))
        })
    };
    let status = b.wait_status("c refused after the restart", Duration::from_secs(40), refused_c);
    assert!(!admits_c(&status) && revoked_c(&status), "{status}");
    assert_eq!(c.status()["peers"].as_array().map(Vec::len), Some(0), "c has no peer");
}

#[test]
fn a_node_and_a_manifest_of_another_fleet_with_the_same_key_are_refused() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let model = tiny_llama_gguf(1, 0);
    std::fs::write(fleet.path("tiny.gguf"), &model).expect("write model");
    let prod = fleet.node("prod", "a", &[]).start();
    // Same operator key, enrolled in the staging fleet.
    let staging = fleet.node("staging", "a", &["--bootstrap", &prod.bootstrap_addr()]);
    let cert = staging.data.join("node.cert");
    std::fs::remove_file(&cert).expect("old certificate");
    let cert = cert.to_str().expect("path");
    fleet.slmesh(&[
        "enroll",
        "--publisher-key",
        "ops.key",
        "--node",
        &staging.node_id,
        "--tag",
        "site=a",
        "--fleet",
        "staging",
        "--out",
        cert,
    ]);
    let staging = staging.start();
    assert_eq!(staging.status()["fleet"], "staging");
    // Whichever checks the other's certificate first refuses it, and disconnects.
    let refused_for = |s: &serde_json::Value, other: &str| {
        s["refused_peers"].as_array().is_some_and(|r| {
            r.iter().any(|p| p[1].as_str().is_some_and(|w| w.contains(&format!("this node is in fleet \"{other}\""))))
        })
    };
    slmesh_e2e::fleet::wait_for("one of them to refuse the other", WAIT, || {
        (refused_for(&prod.status(), "default") || refused_for(&staging.status(), "staging")).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    for n in [&prod, &staging] {
        let s = n.status();
        assert!(s["peers"].as_array().is_some_and(Vec::is_empty), "admitted across fleets: {s}");
    }

    // A manifest signed for staging is refused by a production node.
    let toml = fleet.path("staging.toml");
    let slm = fleet.path("staging.slm");
    fleet.slmesh(&[
        "manifest",
        "create",
        "--name",
        "tiny",
        "--version",
        "1",
        "--fleet",
        "staging",
        "tiny.gguf",
        "--out",
        toml.to_str().expect("path"),
    ]);
    fleet.slmesh(&[
        "manifest",
        "sign",
        "--key",
        "ops.key",
        toml.to_str().expect("path"),
        "--out",
        slm.to_str().expect("path"),
    ]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_slmesh"))
        .current_dir(fleet.path(""))
        .env("SLMESH_BEARER_TOKEN", slmesh_e2e::TEST_TOKEN)
        .args(["publish", "--node", &prod.http, "--manifest", slm.to_str().expect("path")])
        .output()
        .expect("run publish");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("fleet \"staging\""), "{err}");
    assert!(prod.status()["models"].as_array().is_some_and(Vec::is_empty));
}

/// What an unenrolled libp2p peer that connects and never says hello got.
struct SilentOutsider {
    /// Gossip messages it was sent.
    messages: usize,
    /// Seconds from its connection until the node disconnected it (None: never).
    dropped_after: Option<f64>,
}

/// Joins the node's mesh with a fresh key, subscribes to every slmesh topic, answers no
/// request, and watches for `watch` (or until the node drops it).
async fn silent_outsider(bootstrap: &str, watch: Duration, publish: impl FnOnce()) -> SilentOutsider {
    use slmesh_mesh::{MeshConfig, MeshEvent};
    use slmesh_protocol::mesh::{TOPIC_COMMANDS, TOPIC_MANIFESTS, TOPIC_METRICS, TOPIC_REVOCATIONS};
    let config = MeshConfig {
        keypair: libp2p_identity::Keypair::generate_ed25519(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        bootstrap: vec![bootstrap.parse().expect("bootstrap address")],
        mdns: false,
        topics: [TOPIC_MANIFESTS, TOPIC_METRICS, TOPIC_COMMANDS, TOPIC_REVOCATIONS].map(String::from).to_vec(),
        refusal_cooldown: Duration::from_secs(600),
        discovery_interval: Duration::from_secs(60),
        wire_log: None,
    };
    let (mesh, mut events) = slmesh_mesh::start(config).expect("outsider mesh");
    let mut connected_at = None;
    let mut publish = Some(publish);
    let mut out = SilentOutsider { messages: 0, dropped_after: None };
    let end = tokio::time::Instant::now() + watch;
    while let Ok(Some(event)) = tokio::time::timeout_at(end, events.recv()).await {
        match event {
            MeshEvent::Connected { .. } => {
                connected_at = Some(std::time::Instant::now());
                if let Some(p) = publish.take() {
                    tokio::task::block_in_place(p);
                }
            }
            MeshEvent::Message { .. } => out.messages += 1,
            MeshEvent::Disconnected { .. } => {
                out.dropped_after = connected_at.map(|t| t.elapsed().as_secs_f64());
                break;
            }
            _ => {}
        }
    }
    mesh.shutdown().await;
    out
}

#[test]
fn an_unenrolled_peer_that_stays_silent_gets_no_gossip_and_is_dropped_within_the_deadline() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let model = tiny_llama_gguf(1, 0);
    std::fs::write(fleet.path("tiny.gguf"), &model).expect("write model");
    let node = fleet.node("a", "a", &[]).start();
    let slm = fleet.signed_manifest("tiny", 1, "tiny.gguf");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    // Once the outsider is connected, the node publishes a manifest and gossips its metrics
    // (every 5 s): flood publishing would send both to every connected subscriber.
    let publish = || {
        fleet.slmesh(&["publish", "--node", &node.http, "--manifest", slm.to_str().expect("path")]);
    };
    let seen = runtime.block_on(silent_outsider(&node.bootstrap_addr(), Duration::from_secs(60), publish));
    node.wait_status("tiny@1 active", WAIT, |s| model_field(s, "tiny", "active") == Some(1));
    assert_eq!(seen.messages, 0, "the outsider was sent gossip");
    let after = seen.dropped_after.expect("the silent outsider was never dropped");
    // The deadline is 20 s; the node looks at it with its next timer.
    assert!((19.0..30.0).contains(&after), "dropped {after:.1} s after connecting");
    let status = node.status();
    let refused = status["refused_peers"].as_array().expect("refused peers");
    assert!(refused.iter().any(|r| r[1].as_str().is_some_and(|w| w.contains("not admitted within 20 s"))), "{status}");
}

#[test]
fn a_node_whose_config_sets_no_token_makes_one_and_requires_it() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let dir = fleet.node("a", "a", &[]);
    // A config from before tokens were the default: no bearer_token line.
    let text = std::fs::read_to_string(&dir.config).expect("config");
    let without: String = text.lines().filter(|l| !l.starts_with("bearer_token")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&dir.config, without).expect("config");
    let node = dir.start();
    let path = dir.data.join("api-token");
    let token = std::fs::read_to_string(&path).expect("the node made data_dir/api-token").trim().to_string();
    assert_eq!(token.len(), 64, "{token}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("token file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "api-token is mode {mode:o}");
    }
    let auth = format!("Bearer {token}");
    // JSON, so that the browser guard (which looks before the token) lets the POSTs by.
    let json = ("Content-Type", "application/json");
    for (path, method) in
        [("/v1/status", "GET"), ("/v1/models", "GET"), ("/v1/publish", "POST"), ("/v1/revocations", "POST")]
    {
        let (code, _) =
            slmesh_e2e::http(&node.http, method, path, &[("Authorization", "Bearer wrong-token-000000"), json], vec![]);
        assert_eq!(code, 401, "{method} {path} without the token");
        let (code, _) = slmesh_e2e::http(&node.http, method, path, &[("Authorization", ""), json], vec![]);
        assert_eq!(code, 401, "{method} {path} with an empty Authorization");
    }
    let (code, _) = slmesh_e2e::http(&node.http, "GET", "/v1/status", &[("Authorization", &auth)], vec![]);
    assert_eq!(code, 200);
    // The operator's commands on the node's machine find the token by its config (the
    // address too, but this test's config binds port 0).
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_slmesh"))
            .env_remove("SLMESH_BEARER_TOKEN")
            .args(args)
            .output()
            .expect("run slmesh")
    };
    let config = dir.config.to_str().expect("path");
    let out = run(&["status", "--node", &node.http, "--config", config, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // --watch prints the status again every interval until it is stopped.
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_slmesh"))
        .env_remove("SLMESH_BEARER_TOKEN")
        .args(["status", "--node", &node.http, "--config", config, "--watch", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run slmesh status --watch");
    std::thread::sleep(Duration::from_millis(2_500));
    let _ = watch.kill();
    let watched = String::from_utf8_lossy(&watch.wait_with_output().expect("output").stdout).into_owned();
    assert!(watched.matches("(every 1 s; Ctrl-C stops)").count() >= 2, "{watched}");
    let line = format!("node     {}", node.node.node_id);
    assert!(watched.matches(&line).count() >= 2, "{watched}");
    let out = run(&["status", "--node", &node.http, "--config", "/nonexistent.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("401") && err.contains("--bearer-token"), "{err}");
    // A restart keeps the token.
    let node = node.stop().start();
    assert_eq!(std::fs::read_to_string(&path).expect("token").trim(), token);
    let (code, _) = slmesh_e2e::http(&node.http, "GET", "/v1/status", &[("Authorization", &auth)], vec![]);
    assert_eq!(code, 200);
}
