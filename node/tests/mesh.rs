//! The mesh with real `slmesh node run` processes on 127.0.0.1: publish and fan-out,
//! anti-entropy for a late node, a provider serving corrupt bytes, kill -9 during a
//! fetch, and a node without a valid certificate.

use slmesh_e2e::fleet::{model_field, Fleet, Running};
use slmesh_e2e::{post_json, tiny_llama_gguf};
use std::time::Duration;

const MODEL: &str = "tiny";
const WAIT: Duration = Duration::from_secs(120);

fn fleet_with_model(padding_floats: usize) -> (Fleet, Vec<u8>) {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let bytes = tiny_llama_gguf(1, padding_floats);
    std::fs::write(fleet.path("tiny.gguf"), &bytes).expect("write model");
    (fleet, bytes)
}

fn publish(fleet: &Fleet, node: &Running, version: u64) -> String {
    let slm = fleet.signed_manifest(MODEL, version, "tiny.gguf");
    fleet.slmesh(&["publish", "--node", &node.http, "--manifest", slm.to_str().expect("path")])
}

fn wait_active(node: &Running, version: u64) {
    node.wait_status(&format!("{MODEL}@{version} active"), WAIT, |s| model_field(s, MODEL, "active") == Some(version));
}

fn staged_file(node: &Running, version: u64) -> Vec<u8> {
    std::fs::read(node.node.data.join(format!("models/{MODEL}/{version}/tiny.gguf"))).expect("staged file")
}

fn peers(node: &Running) -> usize {
    node.status()["peers"].as_array().map_or(0, Vec::len)
}

fn uploaded(node: &Running) -> u64 {
    node.status()["uploaded_bytes"].as_u64().unwrap_or(0)
}

#[test]
fn six_nodes_share_a_model_and_a_late_node_catches_up() {
    let (fleet, model) = fleet_with_model(6 << 20); // about 24 MiB
    let size = model.len() as u64;
    let publisher = fleet.node("p", "a", &[]).start();
    let boot = publisher.bootstrap_addr();
    let nodes: Vec<Running> =
        (1..=4).map(|i| fleet.node(&format!("n{i}"), "a", &["--bootstrap", &boot]).start()).collect();
    publisher.wait_status("4 peers", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 4));
    // Let gossipsub exchange subscriptions so the publish is gossiped rather than synced.
    std::thread::sleep(Duration::from_secs(2));
    let said = publish(&fleet, &publisher, 1);
    assert!(said.contains("published tiny@1"), "{said}");
    wait_active(&publisher, 1);
    for n in &nodes {
        wait_active(n, 1);
    }
    // Started after the publish, with nothing new gossiped: it catches up by anti-entropy.
    let late = fleet.node("late", "a", &["--bootstrap", &boot]).start();
    wait_active(&late, 1);
    assert!(late.log_text().contains("accepted manifest"), "the late node never accepted the manifest");
    for n in nodes.iter().chain([&late]) {
        assert!(staged_file(n, 1) == model, "{} staged different bytes", n.node.name);
    }
    let up = uploaded(&publisher);
    eprintln!("publisher uploaded {up} bytes for a {size}-byte file to 5 nodes ({:.2}x)", up as f64 / size as f64);
    assert!(up <= 2 * size + (1 << 20), "the publisher uploaded {up} bytes, more than 2x the file ({size})");
    let received_from_peers: u64 =
        nodes.iter().chain([&late]).map(|n| n.status()["downloaded_bytes"].as_u64().unwrap_or(0)).sum();
    assert!(received_from_peers >= 5 * size, "nodes received {received_from_peers} bytes in all");
    // The late node serves what it fetched.
    let (code, answer) = post_json(
        &late.http,
        "/v1/chat/completions",
        r#"{"model":"tiny","max_tokens":4,"messages":[{"role":"user","content":"hello world"}]}"#,
    );
    assert_eq!(code, 200, "{answer}");
}

/// Flips bytes in the middle of the only `.data` file of a node's blob store.
fn corrupt_blob_store(data_dir: &std::path::Path) {
    let dir = data_dir.join("blobs/data");
    let file = std::fs::read_dir(&dir)
        .expect("blob data folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "data"))
        .expect("a .data file in the blob store");
    let mut bytes = std::fs::read(&file).expect("read blob");
    // Damage every 256 KiB, so that whichever piece a fetcher asks this node for is bad.
    for start in (0..bytes.len()).step_by(256 << 10) {
        let end = (start + 4096).min(bytes.len());
        for b in &mut bytes[start..end] {
            *b ^= 0x5a;
        }
    }
    std::fs::write(&file, bytes).expect("write blob");
}

#[test]
fn nodes_serve_pieces_of_a_file_they_are_still_fetching() {
    let (fleet, model) = fleet_with_model(4 << 20);
    let size = model.len() as u64;
    // A slow publisher: the fetchers have most of the time to swap pieces. One upload
    // slot for three fetchers of two lanes each: requests wait for it in turn.
    let publisher =
        fleet.node("p", "a", &["--max-upload-bytes-per-sec", "3000000", "--upload-slots-per-blob", "1"]).start();
    let boot = publisher.bootstrap_addr();
    let fetchers: Vec<Running> =
        ["f1", "f2", "f3"].iter().map(|n| fleet.node(n, "a", &["--bootstrap", &boot]).start()).collect();
    publisher.wait_status("3 peers", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 3));
    for f in &fetchers {
        f.wait_status("3 peers", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 3));
    }
    publish(&fleet, &publisher, 1);
    // Watch for a node that uploads while its own fetch is still running.
    let mut served_while_fetching = None;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        let statuses: Vec<_> = fetchers.iter().map(Running::status).collect();
        for (f, s) in fetchers.iter().zip(&statuses) {
            let fetching = s["fetches"].as_array().is_some_and(|a| !a.is_empty());
            if fetching && s["uploaded_bytes"].as_u64().unwrap_or(0) > 0 {
                served_while_fetching.get_or_insert(f.node.name.clone());
            }
        }
        if statuses.iter().all(|s| model_field(s, MODEL, "active") == Some(1)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for f in &fetchers {
        wait_active(f, 1);
        assert!(staged_file(f, 1) == model, "{} staged different bytes", f.node.name);
    }
    assert!(served_while_fetching.is_some(), "no node served pieces before it had the whole file");
    let up = uploaded(&publisher);
    let from_peers: u64 = fetchers.iter().map(uploaded).sum();
    eprintln!("publisher uploaded {up} bytes ({:.2}x the file), fetchers {from_peers}", up as f64 / size as f64);
    assert!(up < 2 * size, "the publisher uploaded {up} bytes for a {size}-byte file: peers should carry most");
    assert!(from_peers > size, "the fetchers uploaded only {from_peers} bytes to each other");
    // The publisher sends each piece once and declines it after ("not this piece", the
    // permission code): a fetcher asks for another, and must not drop the publisher.
    let status = publisher.status();
    let turned_down = status["refused_fetches"].as_u64().unwrap_or(0);
    let held = status["held_fetches"].as_u64().unwrap_or(0);
    eprintln!("the publisher turned down {turned_down} piece requests and held {held} for its slot");
    assert!(held > 0, "the publisher's one slot was never waited for: {status}");
    for f in &fetchers {
        let log = f.log_text();
        assert!(!log.contains("error 1"), "{} took a declined piece for a failed provider:\n{log}", f.node.name);
    }
}

#[test]
fn a_slow_upload_lets_a_held_request_start_beside_it() {
    let (fleet, model) = fleet_with_model(1 << 20);
    // A publisher whose uplink sends a piece (512 KiB) in half a second, with the default
    // two slots, started one at a time: a request held behind a transfer is asked again
    // once that has run 250 ms, and starts beside it.
    let publisher = fleet.node("p", "a", &["--max-upload-bytes-per-sec", "1000000"]).start();
    let boot = publisher.bootstrap_addr();
    let fetchers: Vec<Running> =
        ["f1", "f2"].iter().map(|n| fleet.node(n, "a", &["--bootstrap", &boot]).start()).collect();
    publisher.wait_status("2 peers", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 2));
    for f in &fetchers {
        f.wait_status("2 peers", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 2));
    }
    publish(&fleet, &publisher, 1);
    for f in &fetchers {
        wait_active(f, 1);
        assert!(staged_file(f, 1) == model, "{} staged different bytes", f.node.name);
    }
    let status = publisher.status();
    let stalled = status["stalled_uploads"].as_u64().unwrap_or(0);
    let held = status["held_fetches"].as_u64().unwrap_or(0);
    eprintln!("the publisher held {held} piece requests; {stalled} uploads stalled and let one start beside them");
    assert!(held > 0, "no request waited for the publisher's slots: {status}");
    assert!(stalled > 0, "no upload ran past 250 ms with requests waiting: {status}");
    let text = fleet.slmesh(&["status", "--node", &publisher.http]);
    assert!(text.contains(" upload(s) stalled"), "slmesh status does not say how many uploads stalled:\n{text}");
}

#[test]
fn a_corrupt_provider_is_detected_and_the_fetch_completes_from_another() {
    let (fleet, model) = fleet_with_model(2 << 20);
    let publisher = fleet.node("p", "a", &[]).start();
    let boot = publisher.bootstrap_addr();
    let bad = fleet.node("bad", "b", &["--bootstrap", &boot]).start();
    let good = fleet.node("good", "c", &["--bootstrap", &boot]).start();
    publisher.wait_status("2 peers", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 2));
    publish(&fleet, &publisher, 1);
    wait_active(&bad, 1);
    wait_active(&good, 1);
    let bad_dir = bad.stop();
    corrupt_blob_store(&bad_dir.data);
    let bad = bad_dir.start();
    let bad_addr = bad.bootstrap_addr();
    // Same site as the corrupt node, and bootstrapped through it: it is asked first.
    let fetcher = fleet.node("fetcher", "b", &["--bootstrap", &bad_addr]).start();
    wait_active(&fetcher, 1);
    assert!(staged_file(&fetcher, 1) == model, "corrupt bytes were staged");
    let log = fetcher.log_text();
    let bad_short = &bad.node.node_id[..10];
    assert!(
        log.lines().any(|l| l.contains("provider failed") && l.contains(bad_short)),
        "the fetcher never saw the corrupt provider fail:\n{log}"
    );
}

#[test]
fn a_fetch_killed_with_sigkill_resumes_without_refetching() {
    let (fleet, model) = fleet_with_model(6 << 20);
    let size = model.len() as u64;
    // A slow uplink, so that the fetch is still running when it is killed.
    let publisher = fleet.node("p", "a", &["--max-upload-bytes-per-sec", "4000000"]).start();
    let boot = publisher.bootstrap_addr();
    let fetcher = fleet.node("f", "a", &["--bootstrap", &boot]).start();
    publisher.wait_status("1 peer", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 1));
    publish(&fleet, &publisher, 1);
    fetcher.wait_status("a third of the file", WAIT, |s| {
        s["fetches"]
            .as_array()
            .and_then(|f| f.first())
            .is_some_and(|f| f["received"].as_u64().unwrap_or(0) + f["had"].as_u64().unwrap_or(0) > size / 3)
    });
    let dir = fetcher.kill9();
    let fetcher = dir.start();
    wait_active(&fetcher, 1);
    assert!(staged_file(&fetcher, 1) == model);
    let log = fetcher.log_text();
    let resumed_line = log.lines().rfind(|l| l.contains(" fetched ")).expect("a fetched line");
    let had: u64 = resumed_line
        .split("had=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("had= in the fetched line");
    assert!(had > 0, "the restarted fetch started from zero: {resumed_line}");
    let up = uploaded(&publisher);
    eprintln!(
        "resumed with {had} bytes on disk; the publisher sent {up} bytes for {size} ({:.3}x)",
        up as f64 / size as f64
    );
    assert!(up * 10 < size * 11, "{up} bytes sent for a {size}-byte file: more than 1.1x");
}

/// Starts a node whose certificate is signed by a key the fleet does not trust (its own
/// config trusts that key, so it starts), bootstrapped to `honest`, and waits until
/// `honest` has refused it.
fn start_refused_node(fleet: &Fleet, honest: &Running, name: &str) -> Running {
    let key = format!("{name}.key");
    fleet.slmesh(&["publisher", "keygen", "--out", &key]);
    let public = std::fs::read_to_string(fleet.path(&format!("{key}.pub"))).expect("key").trim().to_string();
    let boot = honest.bootstrap_addr();
    let node = fleet.node_signed_by(name, "a", &["--bootstrap", &boot], &key, &[&format!("{name}={public}")]).start();
    let peer = node.status()["peer_id"].as_str().expect("peer id").to_string();
    honest.wait_status("the node refused", WAIT, |s| {
        s["refused_peers"].as_array().is_some_and(|r| r.iter().any(|p| p[0] == peer.as_str()))
    });
    node
}

#[test]
fn a_node_without_a_valid_certificate_is_refused_and_nothing_it_sends_is_accepted() {
    let (fleet, _) = fleet_with_model(0);
    let honest = fleet.node("honest", "a", &[]).start();
    // It holds a manifest validly signed by the real operator.
    let rogue = start_refused_node(&fleet, &honest, "rogue");
    let said = publish(&fleet, &rogue, 1);
    assert!(said.contains("published"), "{said}");
    // Give gossip, redials and anti-entropy time to try.
    std::thread::sleep(Duration::from_secs(12));
    let status = honest.status();
    assert!(status["models"].as_array().is_some_and(Vec::is_empty), "the honest node accepted something: {status}");
    assert_eq!(peers(&honest), 0, "the rogue is still a peer: {status}");
    rogue.wait_status("no peers left", Duration::from_secs(20), |s| s["peers"].as_array().is_some_and(Vec::is_empty));
    let reason = status["refused_peers"][0][1].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("unknown key"), "refusal reason: {reason}");
}

#[test]
fn a_refused_node_enrolled_afterwards_is_admitted_once_the_cool_down_is_over() {
    let (fleet, _) = fleet_with_model(0);
    let honest = fleet.node("honest", "a", &["--refusal-cooldown-secs", "6"]).start();
    let late = start_refused_node(&fleet, &honest, "late");
    // The operator enrolls it properly; it restarts with the new certificate (same key).
    let late = late.stop();
    let cert = late.data.join("node.cert");
    std::fs::remove_file(&cert).expect("old certificate");
    let cert = cert.to_str().expect("path");
    fleet.slmesh(&["enroll", "--publisher-key", "ops.key", "--node", &late.node_id, "--tag", "site=a", "--out", cert]);
    let late = late.start();
    honest.wait_status("admitted once the cool-down is over", WAIT, |s| {
        s["peers"].as_array().is_some_and(|p| p.iter().any(|p| p["node_id"] == late.node.node_id.as_str()))
    });
    assert!(honest.log_text().contains("may connect again"), "{}", honest.log_text());
}

#[test]
fn two_nodes_in_separate_network_namespaces_find_each_other_by_mdns_alone() {
    let tag = format!("{}", std::process::id() % 10_000);
    let (ns_a, ns_b) = match slmesh_e2e::fleet::linked_namespaces(&tag, 1) {
        Ok(pair) => pair,
        Err(why) => {
            eprintln!("SKIPPED: cannot create network namespaces here ({why})");
            return;
        }
    };
    let (fleet, _) = fleet_with_model(0);
    // No bootstrap peers: mDNS is the only way to meet.
    let network = ["--http-bind", "127.0.0.1:0", "--listen", "/ip4/0.0.0.0/tcp/4001", "--blobs-bind", "0.0.0.0:4002"];
    let a = fleet.node_with_network("a", "a", &network).start_in(Some(&ns_a.name));
    let b = fleet.node_with_network("b", "a", &network).start_in(Some(&ns_b.name));
    let want_b = b.status()["node_id"].as_str().expect("node id").to_string();
    a.wait_status("b found by mDNS and admitted", WAIT, |s| {
        s["peers"].as_array().is_some_and(|p| p.iter().any(|p| p["node_id"] == want_b.as_str()))
    });
    let want_a = a.status()["node_id"].as_str().expect("node id").to_string();
    b.wait_status("a admitted", WAIT, |s| {
        s["peers"].as_array().is_some_and(|p| p.iter().any(|p| p["node_id"] == want_a.as_str()))
    });
    assert!(a.log_text().contains("found a peer by mDNS"), "{}", a.log_text());
    drop((a, b));
}

#[test]
fn a_slow_fetch_says_in_the_log_how_far_it_is() {
    let tag = format!("s{}", std::process::id() % 10_000);
    let (ns_a, ns_b) = match slmesh_e2e::fleet::linked_namespaces(&tag, 3) {
        Ok(pair) => pair,
        Err(why) => {
            eprintln!("SKIPPED: cannot create network namespaces here ({why})");
            return;
        }
    };
    // About 6 MiB over a 2 Mbit/s link: some 25 s, so the fetch's progress line (every
    // 10 s) comes at least twice.
    let (fleet, bytes) = fleet_with_model(1_500_000);
    let network = ["--http-bind", "127.0.0.1:0", "--listen", "/ip4/0.0.0.0/tcp/4001", "--blobs-bind", "0.0.0.0:4002"];
    let a = fleet.node_with_network("a", "a", &network).start_in(Some(&ns_a.name));
    let b = fleet.node_with_network("b", "a", &network).start_in(Some(&ns_b.name));
    a.wait_status("b found by mDNS and admitted", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 1));
    let rate = ["tc", "qdisc", "add", "dev", &format!("sa{tag}"), "root", "tbf", "rate", "2mbit", "burst", "32kb"];
    if let Err(why) = ns_a.exec(&[&rate[..], &["latency", "1s"]].concat()) {
        eprintln!("SKIPPED: cannot limit the link's rate here ({why})");
        return;
    }
    let slm = fleet.signed_manifest(MODEL, 1, "tiny.gguf");
    fleet.slmesh_in(a.netns(), &["publish", "--node", &a.http, "--manifest", slm.to_str().expect("path")]);
    wait_active(&b, 1);
    assert_eq!(staged_file(&b, 1), bytes);
    let log = b.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("fetching:") && l.contains("MiB/s")).collect();
    let size = format!("of {:.1} MiB", bytes.len() as f64 / (1024.0 * 1024.0));
    assert!(lines.len() >= 2 && lines.iter().all(|l| l.contains(&size)), "progress lines: {lines:#?}\n{log}");
    // The rate it names is the link's (2 Mbit/s is 0.24 MiB/s), not a made-up figure.
    let rates: Vec<f64> =
        lines.iter().filter_map(|l| l.split(" MiB/s").next()?.rsplit(' ').next()?.parse().ok()).collect();
    assert!(rates.iter().all(|r| (0.1..=0.4).contains(r)), "rates {rates:?} in {lines:#?}");
    drop((a, b));
}

#[test]
fn old_versions_are_garbage_collected_keeping_active_and_previous() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let publisher = fleet.node("p", "a", &[]).start();
    let boot = publisher.bootstrap_addr();
    let node = fleet.node("n", "a", &["--bootstrap", &boot]).start();
    publisher.wait_status("1 peer", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 1));
    for version in 1..=3u64 {
        // Each version is a different file (different padding), so a different blob.
        std::fs::write(fleet.path("tiny.gguf"), tiny_llama_gguf(1, 1000 * version as usize)).expect("write");
        publish(&fleet, &publisher, version);
        wait_active(&node, version);
    }
    let status = node.wait_status("version 1 collected", WAIT, |s| {
        s["models"][0]["staged"].as_array().is_some_and(|v| v.len() == 2)
    });
    let model = &status["models"][0];
    assert_eq!(model["active"], 3);
    assert_eq!(model["previous"], 2);
    assert_eq!(model["staged"], serde_json::json!([2, 3]));
    let models = node.node.data.join("models/tiny");
    assert!(!models.join("1").exists(), "version 1's files are still on disk");
    assert!(models.join("2/tiny.gguf").exists() && models.join("3/tiny.gguf").exists());
    assert!(node.log_text().contains("deleting an old version's files"));

    // A crash after the store forgot version 1 and before its files went would leave
    // them behind: the node deletes version folders no state lists when it starts.
    let node = node.stop();
    std::fs::create_dir_all(models.join("1")).expect("folder");
    std::fs::write(models.join("1/tiny.gguf"), tiny_llama_gguf(1, 1000)).expect("left-over file");
    let node = node.start();
    wait_active(&node, 3);
    slmesh_e2e::fleet::wait_for("the left-over folder deleted", WAIT, || (!models.join("1").exists()).then_some(()));
    assert!(models.join("2/tiny.gguf").exists() && models.join("3/tiny.gguf").exists());
    assert!(node.log_text().contains("an interrupted clean-up"), "{}", node.log_text());
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A node whose data folder is a tmpfs of `size` ("24m"), bootstrapped to `boot`; None
/// where a tmpfs cannot be mounted (not root).
fn node_on_a_small_disk(fleet: &Fleet, boot: &str, size: &str) -> Option<(Running, Unmount)> {
    let small = fleet.node("small", "a", &["--bootstrap", boot]);
    std::fs::create_dir_all(&small.data).expect("data dir");
    let cert = std::fs::read(small.data.join("node.cert")).expect("cert");
    let key = std::fs::read(small.config.with_file_name("slmesh-data/node.key")).expect("key");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&small.data)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a small tmpfs here (not root?)");
        return None;
    }
    let unmount = Unmount(small.data.clone());
    std::fs::write(small.data.join("node.cert"), cert).expect("cert");
    let key_path = small.data.join("node.key");
    std::fs::write(&key_path, key).expect("key");
    std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    Some((small.start(), unmount))
}

/// Publishes a 32 MiB model to a node on a disk of `size`: it must refuse with a clear
/// note before it fetches a byte.
fn refused_for_lack_of_space(size: &str) {
    let (fleet, _) = fleet_with_model(8 << 20); // about 32 MiB
    let publisher = fleet.node("p", "a", &[]).start();
    let Some((node, _unmount)) = node_on_a_small_disk(&fleet, &publisher.bootstrap_addr(), size) else { return };
    publisher.wait_status("1 peer", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 1));
    publish(&fleet, &publisher, 1);
    let status = node.wait_status("a disk space note", WAIT, |s| {
        s["models"][0]["note"].as_str().is_some_and(|n| n.contains("not enough free disk space"))
    });
    assert_eq!(model_field(&status, MODEL, "active"), None);
    assert_eq!(node.status()["downloaded_bytes"], 0, "it fetched although the file cannot fit");
}

#[test]
fn a_fetch_that_does_not_fit_on_disk_is_refused_with_a_clear_error() {
    refused_for_lack_of_space("24m");
}

#[test]
fn a_version_needs_its_size_on_disk_once_not_twice() {
    // A 32 MiB model on a 64 MiB disk: it fits once, not twice. The staged file is a hard
    // link to the blob store's own file, so the node fetches, stages and serves it.
    let (fleet, _) = fleet_with_model(8 << 20);
    let size = std::fs::metadata(fleet.path("tiny.gguf")).expect("model").len();
    let publisher = fleet.node("p", "a", &[]).start();
    let Some((node, _unmount)) = node_on_a_small_disk(&fleet, &publisher.bootstrap_addr(), "64m") else { return };
    publisher.wait_status("1 peer", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 1));
    publish(&fleet, &publisher, 1);
    wait_active(&node, 1);
    let staged = node.node.data.join("models/tiny/1/tiny.gguf");
    let meta = std::fs::metadata(&staged).expect("staged file");
    assert_eq!(meta.len(), size);
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&meta), 2, "the staged file is not the store's file");
    // du counts a file with two names once.
    let du = std::process::Command::new("du").arg("-sb").arg(&node.node.data).output().expect("du");
    let used: u64 =
        String::from_utf8_lossy(&du.stdout).split_whitespace().next().and_then(|n| n.parse().ok()).expect("du");
    assert!(used < size + size / 2, "{used} bytes in the data folder for a {size}-byte model");
}
