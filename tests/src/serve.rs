//! `slmesh serve` with the demo model as a real process, stopped when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct Served {
    pub child: Child,
    /// `host:port` of its HTTP API.
    pub addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin serve` on the demo model, named `smollm2`, on a free loopback port, with
/// `extra` arguments; returns once it serves.
pub fn serve_demo(bin: &Path, extra: &[&str]) -> Served {
    let model = crate::demo_model();
    let mut child = Command::new(bin)
        .args(["serve", "--model", model.to_str().expect("UTF-8 path"), "--name", "smollm2"])
        .args(["--http-bind", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start slmesh serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    let addr = line.trim().rsplit("http://").next().unwrap_or_default().to_string();
    assert!(line.starts_with("serving smollm2@1"), "unexpected: {line:?}");
    Served { child, addr }
}
