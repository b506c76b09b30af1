//! Model distribution over the mesh, with real `slmesh node run` processes on loopback.
//!
//! 1. One fetch of the demo GGUF (98 MB) from a publisher to one node, from `slmesh
//!    publish` until the file is verified and staged on the fetcher, against `curl` from
//!    a plain HTTP file server (Python's http.server) serving the same file. Runs alternate.
//! 2. Fan-out of a 98 MB model to 8 nodes: wall time until all have it staged, and bytes
//!    uploaded by the publisher, with the mesh's upload policy (origin steps back after 2
//!    copies; peers spread it) against every node downloading from the publisher alone.
//!
//! Run: `cargo bench --workspace --bench mesh_fetch` (add `--profile dev` to skip the
//! release build; the data path is in dependencies, which the dev profile optimises too).

use slmesh_e2e::fleet::{model_field, Fleet, Running};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(600);

fn staged(node: &Running, model: &str) -> bool {
    let s = node.status();
    s["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == model))
        .is_some_and(|m| m["staged"].as_array().is_some_and(|v| v.iter().any(|v| v == 1)))
}

fn wait_staged(nodes: &[&Running], model: &str) {
    let start = Instant::now();
    while !nodes.iter().all(|n| staged(n, model)) {
        assert!(start.elapsed() < WAIT, "nodes did not stage {model} in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

/// Seconds for `curl` to download `file` from a plain HTTP server into `out`.
fn curl_once(dir: &std::path::Path, file: &str, out: &std::path::Path) -> f64 {
    let port = free_port();
    let mut server = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string()])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 http.server");
    let url = format!("http://127.0.0.1:{port}/{file}");
    // Wait for the server to listen.
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    let status = Command::new("curl").args(["-sf", "-o"]).arg(out).arg(&url).status().expect("curl");
    let secs = start.elapsed().as_secs_f64();
    assert!(status.success(), "curl failed");
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_file(out);
    secs
}

/// Seconds from `slmesh publish` on one node until another has verified and staged it,
/// and seconds of the fetch alone (as the fetcher logs it: transfer, verification, store).
fn slmesh_once(gguf: &std::path::Path) -> (f64, f64) {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    std::fs::copy(gguf, fleet.path("model.gguf")).expect("copy model");
    let slm = fleet.signed_manifest("bench", 1, "model.gguf");
    let publisher = fleet.node("p", "a", &[]).start();
    let boot = publisher.bootstrap_addr();
    let fetcher = fleet.node("f", "a", &["--bootstrap", &boot]).start();
    publisher.wait_status("1 peer", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 1));
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    fleet.slmesh(&["publish", "--node", &publisher.http, "--manifest", slm.to_str().expect("path")]);
    wait_staged(&[&fetcher], "bench");
    let total = start.elapsed().as_secs_f64();
    let log = fetcher.log_text();
    let fetch = log
        .lines()
        .find(|l| l.contains(" fetched "))
        .and_then(|l| l.split("secs=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("the fetcher logs the fetch time");
    (total, fetch)
}

struct FanOut {
    secs: f64,
    publisher_uploaded: u64,
}

/// Publishes a `size`-byte model from one node to `n` others; `mesh` chooses the upload
/// policy: the default (peers spread it) or publisher-only.
fn fan_out(n: usize, model: &[u8], mesh: bool, uplink_cap: Option<u64>) -> FanOut {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    std::fs::write(fleet.path("tiny.gguf"), model).expect("write model");
    let slm = fleet.signed_manifest("fan", 1, "tiny.gguf");
    let (mut publisher_args, mut fetcher_args): (Vec<&str>, Vec<&str>) = if mesh {
        (vec![], vec![])
    } else {
        (vec!["--origin-copies", "0", "--upload-slots-per-blob", "1000"], vec!["--upload-slots-per-blob", "0"])
    };
    let cap = uplink_cap.map(|c| c.to_string()).unwrap_or_default();
    if uplink_cap.is_some() {
        publisher_args.extend(["--max-upload-bytes-per-sec", &cap]);
        fetcher_args.extend(["--max-upload-bytes-per-sec", &cap]);
    }
    let publisher = fleet.node("p", "a", &publisher_args).start();
    let boot = publisher.bootstrap_addr();
    let nodes: Vec<Running> = (0..n)
        .map(|i| {
            let mut args = vec!["--bootstrap", &boot];
            args.extend(&fetcher_args);
            fleet.node(&format!("n{i}"), "a", &args).start()
        })
        .collect();
    publisher.wait_status("all peers", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == n));
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    fleet.slmesh(&["publish", "--node", &publisher.http, "--manifest", slm.to_str().expect("path")]);
    let refs: Vec<&Running> = nodes.iter().collect();
    wait_staged(&refs, "fan");
    let secs = start.elapsed().as_secs_f64();
    for node in &nodes {
        assert_eq!(model_field(&node.status(), "fan", "latest_known"), Some(1));
    }
    FanOut { secs, publisher_uploaded: publisher.status()["uploaded_bytes"].as_u64().unwrap_or(0) }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::var("SLMESH_BENCH_ONLY").is_ok_and(|v| v == "fanout") {
        return fan_out_report(98_000_000);
    }
    let gguf = slmesh_e2e::demo_model();
    let size = std::fs::metadata(&gguf).expect("demo model").len();
    let dir = gguf.parent().expect("model folder");
    let file = gguf.file_name().and_then(|f| f.to_str()).expect("file name");
    let scratch = tempfile::tempdir().expect("tempdir");
    let out = scratch.path().join("download");
    let runs = 5;
    let (mut curl, mut mesh, mut fetch) = (vec![], vec![], vec![]);
    for run in 0..runs {
        curl.push(curl_once(dir, file, &out));
        let (total, fetched) = slmesh_once(&gguf);
        mesh.push(total);
        fetch.push(fetched);
        eprintln!("run {run}: curl {:.3} s, slmesh fetch {fetched:.3} s, publish -> staged {total:.3} s", curl[run]);
    }
    let (c, m, f) = (median(curl), median(mesh), median(fetch));
    let mb = size as f64 / 1e6;
    println!("one fetch of {mb:.1} MB on loopback (median of {runs}, alternating):");
    println!("  curl from http.server           {c:.3} s  ({:.0} MB/s)", mb / c);
    println!("  slmesh fetch (verified, stored) {f:.3} s  ({:.0} MB/s)  {:.2}x curl (goal <= 1.5x)", mb / f, f / c);
    println!("  slmesh publish -> staged        {m:.3} s  ({:.0} MB/s)  {:.2}x curl", mb / m, m / c);

    fan_out_report(size);
}

fn fan_out_report(size: u64) {
    let n = 8;
    let model = slmesh_e2e::tiny_llama_gguf(1, size as usize / 4);
    let msize = model.len() as u64;
    // Loopback is not an edge link: the second pair caps every node's uplink at 25 MB/s.
    for cap in [None, Some(25_000_000u64)] {
        let spread = fan_out(n, &model, true, cap);
        let alone = fan_out(n, &model, false, cap);
        let link = cap.map_or("uncapped loopback".to_string(), |c| format!("uplinks capped at {} MB/s", c / 1_000_000));
        println!("fan-out of {:.1} MB to {n} nodes, {link}:", msize as f64 / 1e6);
        for (what, r) in [("publisher alone", &alone), ("mesh (default)", &spread)] {
            println!(
                "  {what:<16} {:.2} s, publisher uploaded {:.2}x the file",
                r.secs,
                r.publisher_uploaded as f64 / msize as f64
            );
        }
        println!(
            "  ratio mesh / alone: time {:.2}x, publisher bytes {:.2}x",
            spread.secs / alone.secs,
            spread.publisher_uploaded as f64 / alone.publisher_uploaded.max(1) as f64
        );
    }
}
