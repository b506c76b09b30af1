//! The `slmesh` binary, run as an operator would: keys, enrollment, manifests, config.

use slmesh_protocol::gguf::{GgufWriter, MetaValue};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn slmesh(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slmesh"))
        .current_dir(dir)
        .args(args)
        .env_remove("SLMESH_CONFIG")
        .output()
        .expect("run slmesh")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = slmesh(dir, args);
    assert!(
        out.status.success(),
        "slmesh {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail, and returns its error text.
fn fails(dir: &Path, args: &[&str]) -> String {
    let out = slmesh(dir, args);
    assert!(!out.status.success(), "slmesh {args:?} should have failed");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.starts_with("error: "), "no clear error: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

fn tiny_gguf(arch: &str, file_type: u32) -> Vec<u8> {
    GgufWriter::new()
        .meta("general.architecture", MetaValue::Str(arch.into()))
        .meta("general.file_type", MetaValue::U32(file_type))
        .meta(&format!("{arch}.context_length"), MetaValue::U32(256))
        .tensor("token_embd.weight", &[8, 4], vec![0.25; 32])
        .to_bytes()
}

fn value_after<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines().find_map(|l| l.strip_prefix(label)).map(str::trim).unwrap_or_else(|| panic!("no {label} in {text}"))
}

struct Fleet {
    dir: tempfile::TempDir,
    publisher_pub: String,
}

impl Fleet {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = ok(dir.path(), &["publisher", "keygen", "--out", "ops.key"]);
        let publisher_pub = value_after(&out, "publisher key:").to_string();
        Fleet { dir, publisher_pub }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

#[test]
fn operator_workflow_end_to_end() {
    let f = Fleet::new();
    let d = f.path();
    assert_eq!(std::fs::read_to_string(d.join("ops.key.pub")).unwrap().trim(), f.publisher_pub);

    // A node: config, key, enrollment.
    ok(
        d,
        &[
            "init",
            "--config",
            "node1/slmesh.toml",
            "--tag",
            "site=berlin",
            "--trust",
            &format!("ops={}", f.publisher_pub),
        ],
    );
    // The dashboard's address carries the config's token in its fragment.
    let config = std::fs::read_to_string(d.join("node1/slmesh.toml")).unwrap();
    let token = config.lines().find_map(|l| l.strip_prefix("bearer_token = ")).expect("a token").trim_matches('"');
    let url = ok(d, &["dashboard", "--config", "node1/slmesh.toml"]);
    assert_eq!(url.trim(), format!("http://127.0.0.1:8080/#token={token}"));
    let out = ok(d, &["keygen", "--config", "node1/slmesh.toml"]);
    let node_id = value_after(&out, "node id:").to_string();
    let peer_id = value_after(&out, "peer id:").to_string();
    assert!(d.join("node1/slmesh-data/node.key").exists());
    ok(d, &["enroll", "--publisher-key", "ops.key", "--node", &node_id, "--tag", "site=berlin", "--out", "node1.cert"]);
    // A peer id names the same node.
    ok(
        d,
        &["enroll", "--publisher-key", "ops.key", "--node", &peer_id, "--tag", "site=berlin", "--out", "node1b.cert"],
    );
    // A second keygen never overwrites the key.
    assert!(fails(d, &["keygen", "--config", "node1/slmesh.toml"]).contains("already exists"));

    // A manifest from a GGUF file: create, sign, verify, inspect.
    f.write("model-q4_1.gguf", &tiny_gguf("llama", 3));
    f.write("model-q8_0.gguf", &tiny_gguf("llama", 7));
    ok(
        d,
        &[
            "manifest",
            "create",
            "--name",
            "tiny",
            "--version",
            "2",
            "--wave",
            "0.1:5m",
            "--wave",
            "1:0",
            "model-q8_0.gguf",
            "model-q4_1.gguf",
            "--out",
            "tiny.toml",
        ],
    );
    let toml_text = std::fs::read_to_string(d.join("tiny.toml")).unwrap();
    assert!(toml_text.contains("quantization = \"Q8_0\""), "{toml_text}");
    let expected_hash = blake3::hash(&tiny_gguf("llama", 3)).to_hex().to_string();
    assert!(toml_text.contains(&expected_hash), "{toml_text}");
    assert!(toml_text.contains("soak_secs = 300"));
    ok(d, &["manifest", "sign", "--key", "ops.key", "tiny.toml", "--out", "tiny.slm"]);
    let out = ok(d, &["manifest", "verify", "--config", "node1/slmesh.toml", "tiny.slm", "--files", "."]);
    assert!(out.contains("ok: tiny version 2 signed by ops"), "{out}");
    assert!(out.contains("2 file(s)"), "{out}");
    let out = ok(d, &["manifest", "inspect", "tiny.slm", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["manifest"]["variants"][1]["quantization"], "Q4_1");
    assert_eq!(v["signed_by"], f.publisher_pub.as_str());
    let out = ok(d, &["manifest", "inspect", "tiny.toml"]);
    assert!(out.contains("unsigned"), "{out}");

    // A changed file no longer matches.
    f.write("model-q4_1.gguf", &tiny_gguf("llama", 2));
    assert!(fails(d, &["manifest", "verify", "--trust", &f.publisher_pub, "tiny.slm", "--files", "."])
        .contains("does not match"));
}

#[test]
fn truncated_gguf_is_refused() {
    let f = Fleet::new();
    let bytes = tiny_gguf("llama", 3);
    f.write("cut.gguf", &bytes[..bytes.len() - 7]);
    let err = fails(f.path(), &["manifest", "create", "--name", "m", "--version", "1", "cut.gguf"]);
    assert!(err.contains("truncated"), "{err}");
    f.write("cut2.gguf", &bytes[..40]);
    let err = fails(f.path(), &["manifest", "create", "--name", "m", "--version", "1", "cut2.gguf"]);
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn png_renamed_gguf_is_refused() {
    let f = Fleet::new();
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x06\0\0\0".to_vec();
    png.extend(std::iter::repeat_n(0u8, 200));
    f.write("photo.gguf", &png);
    let err = fails(f.path(), &["manifest", "create", "--name", "m", "--version", "1", "photo.gguf"]);
    assert!(err.contains("not a GGUF file"), "{err}");
}

#[test]
fn unsupported_architecture_is_refused_unless_allowed() {
    let f = Fleet::new();
    f.write("gemma.gguf", &tiny_gguf("gemma3", 1));
    let err = fails(f.path(), &["manifest", "create", "--name", "m", "--version", "1", "gemma.gguf"]);
    assert!(err.contains("gemma3") && err.contains("mistral.rs"), "{err}");
    ok(
        f.path(),
        &["manifest", "create", "--name", "m", "--version", "1", "gemma.gguf", "--allow-unsupported-architecture"],
    );
}

#[test]
fn manifest_signed_by_untrusted_key_does_not_verify() {
    let f = Fleet::new();
    let d = f.path();
    ok(d, &["publisher", "keygen", "--out", "stranger.key"]);
    f.write("m.gguf", &tiny_gguf("llama", 3));
    ok(d, &["manifest", "create", "--name", "m", "--version", "1", "m.gguf", "--out", "m.toml"]);
    ok(d, &["manifest", "sign", "--key", "stranger.key", "m.toml", "--out", "m.slm"]);
    let err = fails(d, &["manifest", "verify", "--trust", &f.publisher_pub, "m.slm"]);
    assert!(err.contains("unknown key"), "{err}");
    // Tampered bytes: flip one byte in the body.
    ok(d, &["manifest", "sign", "--key", "ops.key", "m.toml", "--out", "good.slm"]);
    let mut bytes = std::fs::read(d.join("good.slm")).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x20;
    f.write("bad.slm", &bytes);
    let err = fails(d, &["manifest", "verify", "--trust", &f.publisher_pub, "bad.slm"]);
    assert!(err.contains("does not verify") || err.contains("not a signed manifest"), "{err}");
    // Random bytes are neither signed nor TOML.
    f.write("noise.slm", &[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]);
    assert!(fails(d, &["manifest", "inspect", "noise.slm"]).contains("is not a manifest"));
}

#[cfg(unix)]
#[test]
fn key_with_mode_0644_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fleet::new();
    let d = f.path();
    std::fs::set_permissions(d.join("ops.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = fails(d, &["enroll", "--publisher-key", "ops.key", "--node", &"11".repeat(32), "--out", "x.cert"]);
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn bad_arguments_get_clear_errors() {
    let f = Fleet::new();
    let d = f.path();
    let err = fails(d, &["enroll", "--publisher-key", "ops.key", "--node", "not-a-node", "--out", "x.cert"]);
    assert!(err.contains("neither a node id"), "{err}");
    // A node key is not a publisher key.
    ok(d, &["keygen", "--out", "node.key"]);
    let err = fails(d, &["enroll", "--publisher-key", "node.key", "--node", &"11".repeat(32), "--out", "x.cert"]);
    assert!(err.contains("node key"), "{err}");
    let err = fails(d, &["keygen"]);
    assert!(err.contains("slmesh init"), "{err}");
    let out = slmesh(d, &["manifest", "create", "--name", "m", "--version", "1", "x.gguf", "--wave", "half"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FRACTION:SOAK"));
    // A soak whose seconds overflow is refused, not wrapped (nor a panic).
    let out =
        slmesh(d, &["manifest", "create", "--name", "m", "--version", "1", "x.gguf", "--wave", "1:9999999999999999d"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a duration"));
    let err = fails(d, &["publish", "--manifest", "x.slm", "--wait", "--timeout", "forever"]);
    assert!(err.contains("is not a duration"), "{err}");
    ok(d, &["init"]);
    assert!(fails(d, &["init"]).contains("--force"));
    // The API needs a token by default: init makes a fresh one.
    let config = std::fs::read_to_string(d.join("slmesh.toml")).unwrap();
    let token = config.lines().find_map(|l| l.strip_prefix("bearer_token = ")).expect("a bearer token");
    let token = token.trim_matches('"');
    assert!(token.len() == 64 && token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
    let err = fails(d, &["init", "--config", "short.toml", "--bearer-token", "abc"]);
    assert!(err.contains("at least 16"), "{err}");
    // The config may hold the API's bearer token: only its owner may read it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let config = std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.path().extension().is_some_and(|x| x == "toml"))
            .expect("init wrote a .toml config");
        let mode = config.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is mode {mode:o}", config.path().display());
    }
}

#[test]
fn model_quantize_derives_a_variant_and_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().expect("tmp");
    let demo = slmesh_e2e::demo_model();
    let input = dir.path().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::copy(&demo, &input).expect("copy the demo model");
    let input = input.to_str().expect("path");
    let said = ok(dir.path(), &["model", "quantize", input, "--to", "q8_0"]);
    assert!(said.contains("SmolLM2-135M-Instruct.Q8_0.gguf") && said.contains("Q8_0"), "{said}");
    ok(
        dir.path(),
        &["manifest", "create", "--name", "m", "--version", "1", "SmolLM2-135M-Instruct.Q8_0.gguf", "--out", "m.toml"],
    );
    let toml = std::fs::read_to_string(dir.path().join("m.toml")).expect("manifest");
    assert!(toml.contains("Q8_0"), "the manifest names the variant's quantisation: {toml}");

    let err = fails(dir.path(), &["model", "quantize", input, "--to", "q4_1"]);
    assert!(err.contains("q4_0, q8_0, q4_k, q6_k"), "{err}");
    let err = fails(dir.path(), &["model", "quantize", input, "--to", "q8_0"]);
    assert!(err.contains("exists already"), "{err}");
    std::fs::write(dir.path().join("half.gguf"), &std::fs::read(&demo).expect("demo")[..1 << 20]).expect("write");
    let err = fails(dir.path(), &["model", "quantize", "half.gguf", "--to", "q4_0"]);
    assert!(err.contains("half.gguf"), "{err}");
    assert!(!dir.path().join("half.Q4_0.gguf").exists());
}
