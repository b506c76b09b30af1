//! Helpers for tests that run real parts: the demo model, and a plain HTTP/1.1 client
//! (std only) that can send what a well-behaved client would not.

pub mod damage;
pub mod fleet;
pub mod rollout_rig;
pub mod serve;
mod tiny_gguf;

pub use tiny_gguf::tiny_llama_gguf;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The API token of every node the test fleets make (`slmesh init --bearer-token`); the
/// HTTP helpers below send it unless a test gives its own `Authorization` header, and
/// the fleet's `slmesh` commands get it as `SLMESH_BEARER_TOKEN`.
pub const TEST_TOKEN: &str = "slmesh-test-token-0123456789";

/// A file of this repository by its path from the top (`tests/eval/smollm2-basic.jsonl`):
/// found from the package whose test or bench cargo runs (`CARGO_MANIFEST_DIR` at run
/// time), else from where this crate was compiled. A build folder shared by two checkouts
/// can hold a test compiled in the other one, whose compile-time paths may be gone.
pub fn repo_file(path: &str) -> PathBuf {
    let compiled = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    let running = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    let found = running.iter().flat_map(|dir| dir.ancestors()).map(|dir| dir.join(path)).find(|p| p.exists());
    found.unwrap_or(compiled)
}

/// The demo model's GGUF (SmolLM2-135M-Instruct, Q4_1), fetched once into the cache by
/// `tests/fetch-demo-model.sh`, or `$SLMESH_DEMO_GGUF`.
pub fn demo_model() -> PathBuf {
    if let Ok(p) = std::env::var("SLMESH_DEMO_GGUF") {
        return p.into();
    }
    let script = repo_file("tests/fetch-demo-model.sh");
    let out = std::process::Command::new(script).output().expect("run tests/fetch-demo-model.sh");
    assert!(out.status.success(), "fetch-demo-model.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Installs Debian's `package` (with apt, as root) when `command --version` does not run.
pub fn need_debian_package(command: &str, package: &str) {
    if std::process::Command::new(command).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return;
    }
    let status = std::process::Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .expect("run apt-get");
    assert!(status.success(), "cannot install Debian's {package} package");
}

/// One HTTP/1.1 exchange over a fresh connection: (status, body). Write errors are
/// ignored, since a server may answer before it has read a huge body.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, String) {
    http_as(addr, addr, method, path, headers, body)
}

/// As `http`, sending `host` as the Host header (what a browser sends for the page's
/// own name when that name was made to point at the node).
pub fn http_as(
    addr: &str,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("authorization")) {
        head.push_str(&format!("Authorization: Bearer {TEST_TOKEN}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("write head");
    let mut writer = stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        for chunk in body.chunks(1 << 16) {
            if writer.write_all(chunk).is_err() {
                break;
            }
        }
    });
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let _ = sender.join();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// POSTs JSON to `path` and parses the JSON answer.
pub fn post_json(addr: &str, path: &str, body: impl Into<Vec<u8>>) -> (u16, serde_json::Value) {
    let (status, body) = http(addr, "POST", path, &[("Content-Type", "application/json")], body.into());
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}")))
}
