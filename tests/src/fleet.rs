//! A fleet of real `slmesh` processes on 127.0.0.1 for end-to-end tests: one operator
//! key, enrolled nodes with their own configs and data folders, and helpers to start,
//! kill, query and wait on nodes.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Fleet {
    /// Kept (and its logs printed) when a test fails.
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub ops_pub: String,
}

/// A node's folder and identity, started or not.
#[derive(Clone)]
pub struct NodeDir {
    pub name: String,
    pub config: PathBuf,
    pub data: PathBuf,
    pub node_id: String,
    bin: PathBuf,
}

/// A running `slmesh node run`; killed when dropped.
pub struct Running {
    pub node: NodeDir,
    pub http: String,
    child: Child,
    log: PathBuf,
    netns: Option<String>,
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `slmesh ARGS` run inside network namespace `ns`, with the test fleets' API token.
fn slmesh_in_netns(bin: &Path, ns: &str, args: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command.env("SLMESH_BEARER_TOKEN", crate::TEST_TOKEN).args(["netns", "exec", ns]).arg(bin).args(args);
    command
}

/// Polls `check` until it returns Some, or panics after `timeout` saying what was awaited.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Fleet {
    pub fn new(bin: &Path) -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        run_ok(Command::new(bin).current_dir(dir.path()).args(["publisher", "keygen", "--out", "ops.key"]));
        let ops_pub = std::fs::read_to_string(dir.path().join("ops.key.pub")).expect("ops.key.pub").trim().to_string();
        Fleet { dir, bin: bin.to_path_buf(), ops_pub }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `slmesh ARGS` in the fleet folder; panics on failure; returns stdout.
    pub fn slmesh(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(&self.bin)
                .current_dir(self.dir.path())
                .env("SLMESH_BEARER_TOKEN", crate::TEST_TOKEN)
                .args(args),
        )
    }

    /// Runs `slmesh ARGS` in the fleet folder; returns its exit code and stdout, whatever
    /// the code.
    pub fn slmesh_code(&self, args: &[&str]) -> (Option<i32>, String) {
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(self.dir.path()).env("SLMESH_BEARER_TOKEN", crate::TEST_TOKEN).args(args);
        let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// As `slmesh`, inside a network namespace (where a node there can be reached), or here.
    pub fn slmesh_in(&self, netns: Option<&str>, args: &[&str]) -> String {
        let Some(ns) = netns else { return self.slmesh(args) };
        run_ok(slmesh_in_netns(&self.bin, ns, args).current_dir(self.dir.path()))
    }

    /// An enrolled node (loopback only, mDNS off) with `extra` `slmesh init` arguments.
    pub fn node(&self, name: &str, site: &str, extra: &[&str]) -> NodeDir {
        self.node_signed_by(name, site, extra, "ops.key", &[])
    }

    /// An enrolled node whose network settings are all in `network_args`.
    pub fn node_with_network(&self, name: &str, site: &str, network_args: &[&str]) -> NodeDir {
        self.make_node(name, site, network_args, "ops.key", &[])
    }

    /// A node whose certificate `publisher_key` signed, trusting `ops` plus `also_trust`.
    pub fn node_signed_by(
        &self,
        name: &str,
        site: &str,
        extra: &[&str],
        publisher_key: &str,
        also_trust: &[&str],
    ) -> NodeDir {
        let mut network = LOOPBACK.to_vec();
        network.extend(extra);
        self.make_node(name, site, &network, publisher_key, also_trust)
    }

    fn make_node(&self, name: &str, site: &str, network: &[&str], publisher_key: &str, also_trust: &[&str]) -> NodeDir {
        let config = self.path(&format!("{name}/slmesh.toml"));
        let config_s = config.to_string_lossy().to_string();
        let site_tag = format!("site={site}");
        let trust = format!("ops={}", self.ops_pub);
        let mut args = vec!["init", "--config", &config_s, "--tag", &site_tag, "--trust", &trust];
        args.extend(["--bearer-token", crate::TEST_TOKEN]);
        args.extend(also_trust.iter().flat_map(|t| ["--trust", t]));
        args.extend(network);
        self.slmesh(&args);
        let out = self.slmesh(&["keygen", "--config", &config_s]);
        let node_id = out
            .lines()
            .find_map(|l| l.strip_prefix("node id:"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| panic!("no node id in {out:?}"));
        let data = self.path(&format!("{name}/slmesh-data"));
        let cert = data.join("node.cert").to_string_lossy().to_string();
        self.slmesh(&[
            "enroll",
            "--publisher-key",
            publisher_key,
            "--node",
            &node_id,
            "--tag",
            &site_tag,
            "--out",
            &cert,
        ]);
        NodeDir { name: name.to_string(), config, data, node_id, bin: self.bin.clone() }
    }

    /// Writes a manifest for `file` (in the fleet folder), rolled out to every node at
    /// once, and signs it with the operator key.
    pub fn signed_manifest(&self, model: &str, version: u64, file: &str) -> PathBuf {
        self.signed_manifest_with(model, version, file, &["--wave", "1:0"])
    }

    /// The same with other `slmesh manifest create` arguments (waves, gates).
    pub fn signed_manifest_with(&self, model: &str, version: u64, file: &str, extra: &[&str]) -> PathBuf {
        let toml = format!("{model}-{version}.toml");
        let slm = format!("{model}-{version}.slm");
        let v = version.to_string();
        let mut args = vec!["manifest", "create", "--name", model, "--version", &v, file, "--out", &toml];
        args.extend(extra);
        self.slmesh(&args);
        self.slmesh(&["manifest", "sign", "--key", "ops.key", &toml, "--out", &slm]);
        self.path(&slm)
    }
}

/// Loopback only, ports picked by the system, mDNS off.
const LOOPBACK: [&str; 7] =
    ["--http-bind", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0", "--blobs-bind", "127.0.0.1:0", "--no-mdns"];

impl NodeDir {
    /// The node's libp2p peer id.
    pub fn peer_id(&self) -> String {
        let id: slmesh_protocol::NodeId = self.node_id.parse().expect("node id");
        id.peer_id().expect("an ed25519 key").to_string()
    }

    pub fn start(&self) -> Running {
        self.start_in(None)
    }

    /// Starts the node with extra environment variables (test-only fault flags).
    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Running {
        self.start_full(None, env)
    }

    /// Starts the node inside a network namespace (`ip netns exec`), or in this one.
    pub fn start_in(&self, netns: Option<&str>) -> Running {
        self.start_full(netns, &[])
    }

    fn start_full(&self, netns: Option<&str>, env: &[(&str, &str)]) -> Running {
        let out_path = self.data.with_file_name(format!("{}.out", self.name));
        let log = self.data.with_file_name(format!("{}.log", self.name));
        let stdout = std::fs::File::create(&out_path).expect("stdout file");
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = command
            .args(["node", "run", "--config"])
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("SLMESH_TEST_LOG")
                    .unwrap_or_else(|_| "warn,libp2p_kad=error,mistralrs_core=error,slmesh=debug".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("start slmesh node run");
        let mut running =
            Running { node: self.clone(), http: String::new(), child, log, netns: netns.map(str::to_string) };
        let log_path = running.log.clone();
        running.http = wait_for(&format!("{} to start", self.name), Duration::from_secs(60), || {
            if let Ok(Some(status)) = running.child.try_wait() {
                panic!(
                    "{} exited with {status}: {}",
                    self.name,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            let text = std::fs::read_to_string(&out_path).ok()?;
            text.lines().find_map(|l| l.split("serving http://").nth(1)).map(|s| s.trim().to_string())
        });
        running
    }
}

impl Running {
    /// The network namespace the node runs in, if not this one.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    pub fn status(&self) -> Value {
        if let Some(ns) = &self.netns {
            // The node's loopback is its namespace's: ask from inside it.
            let out = run_ok(&mut slmesh_in_netns(&self.node.bin, ns, &["status", "--json", "--node", &self.http]));
            return serde_json::from_str(&out).expect("status JSON");
        }
        let (code, body) = crate::http(&self.http, "GET", "/v1/status", &[], vec![]);
        assert_eq!(code, 200, "status of {}: {body}", self.node.name);
        serde_json::from_str(&body).expect("status JSON")
    }

    /// This node's libp2p address, for other nodes' `--bootstrap`.
    pub fn bootstrap_addr(&self) -> String {
        let s = self.status();
        format!("{}/p2p/{}", s["listen"][0].as_str().expect("listen address"), s["peer_id"].as_str().expect("peer id"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the status satisfies `check`.
    pub fn wait_status(&self, what: &str, timeout: Duration, check: impl Fn(&Value) -> bool) -> Value {
        wait_for(&format!("{}: {what}", self.node.name), timeout, || {
            let s = self.status();
            check(&s).then_some(s)
        })
    }

    /// The active version of `model`, if any.
    pub fn active(&self, model: &str) -> Option<u64> {
        model_field(&self.status(), model, "active")
    }

    pub fn kill9(mut self) -> NodeDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.node.clone()
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> NodeDir {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "{} did not stop cleanly: {status}\n{}", self.node.name, self.log_text());
        self.node.clone()
    }
}

/// A field of one model in a status document.
pub fn model_field(status: &Value, model: &str, field: &str) -> Option<u64> {
    status["models"].as_array()?.iter().find(|m| m["name"] == model).and_then(|m| m[field].as_u64())
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let dir = self.dir.path().to_path_buf();
        eprintln!("test failed: keeping {}", dir.display());
        let nodes = std::fs::read_dir(&dir).into_iter().flatten().filter_map(Result::ok);
        let files = nodes.flat_map(|n| std::fs::read_dir(n.path()).into_iter().flatten().filter_map(Result::ok));
        {
            for e in files.filter(|e| e.path().extension().is_some_and(|x| x == "log")) {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- {} (last 40 lines)", e.path().display());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        // Leak the folder on purpose so it can be inspected.
        let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        let _ = kept.keep();
    }
}

/// A network namespace, deleted when dropped. `None` where the kernel or the user may not
/// make one (not root, no `ip`), so that the caller can skip with a message.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Netns, String> {
        let out = Command::new("ip").args(["netns", "add", name]).output().map_err(|e| format!("no `ip`: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let ns = Netns { name: name.to_string() };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn exec(&self, args: &[&str]) -> Result<(), String> {
        let out =
            Command::new("ip").args(["netns", "exec", &self.name]).args(args).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("{args:?} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Two namespaces joined by a veth pair, `10.77.x.1/24` and `10.77.x.2/24`.
pub fn linked_namespaces(tag: &str, subnet: u8) -> Result<(Netns, Netns), String> {
    let a = Netns::create(&format!("slmesh-{tag}-a"))?;
    let b = Netns::create(&format!("slmesh-{tag}-b"))?;
    let (va, vb) = (format!("sa{tag}"), format!("sb{tag}"));
    let out = Command::new("ip")
        .args(["link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    a.exec(&["ip", "addr", "add", &format!("10.77.{subnet}.1/24"), "dev", &va])?;
    b.exec(&["ip", "addr", "add", &format!("10.77.{subnet}.2/24"), "dev", &vb])?;
    a.exec(&["ip", "link", "set", &va, "up"])?;
    b.exec(&["ip", "link", "set", &vb, "up"])?;
    Ok((a, b))
}
