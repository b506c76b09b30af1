//! The official `openai` Python client (PyPI) against `slmesh serve` with the demo model:
//! chat, streaming with usage, stop sequences, completions, models, and the 400s for
//! what the node does not support. The client is installed once into a venv under
//! `~/.cache/slmesh-tools`.

use slmesh_e2e::serve::serve_demo;
use std::path::PathBuf;
use std::process::Command;

const OPENAI_VERSION: &str = "3.57.0";

/// A Python with the pinned `openai` package.
fn python_with_openai() -> PathBuf {
    let home = std::env::var("HOME").expect("HOME");
    let venv = PathBuf::from(home).join(format!(".cache/slmesh-tools/openai-{OPENAI_VERSION}"));
    let python = venv.join("bin/python");
    let has_it = || Command::new(&python).args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if !has_it() {
        let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().expect("python3 -m venv");
        assert!(made.success(), "cannot make a venv at {}", venv.display());
        let pip = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", &format!("openai=={OPENAI_VERSION}")])
            .status()
            .expect("pip");
        assert!(pip.success(), "cannot install openai {OPENAI_VERSION} from PyPI");
    }
    assert!(has_it(), "openai does not import in {}", venv.display());
    python
}

#[test]
fn the_official_openai_client_gets_what_it_asks_for_or_a_clear_400() {
    let python = python_with_openai();
    let node = serve_demo(env!("CARGO_BIN_EXE_slmesh").as_ref(), &[]);
    let script = slmesh_e2e::repo_file("tests/openai_client.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(format!("http://{}/v1", node.addr))
        .arg("smollm2")
        .output()
        .expect("python");
    drop(node);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.trim() == "ok", "{said}\n{}", String::from_utf8_lossy(&out.stderr));
}
