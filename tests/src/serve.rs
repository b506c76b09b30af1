//! `slmesh serve` as a real process (the demo model, or another file), stopped when dropped.

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
    serve_file(bin, &crate::demo_model(), &[&["--name", "smollm2"], extra].concat(), "serving smollm2@1")
}

/// Starts `bin serve` on a GGUF file, on a free loopback port, with `extra` arguments;
/// returns once it serves, its first line starting with `announced`.
pub fn serve_file(bin: &Path, model: &Path, extra: &[&str], announced: &str) -> Served {
    let mut child = Command::new(bin)
        .args(["serve", "--model", model.to_str().expect("UTF-8 path")])
        .args(["--http-bind", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start slmesh serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    let addr = line.trim().rsplit("http://").next().unwrap_or_default().to_string();
    assert!(line.starts_with(announced), "unexpected: {line:?}");
    Served { child, addr }
}
