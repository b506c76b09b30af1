//! A manifest with two variants of the demo model, as `tests/demo.sh` publishes it: the
//! Q4_1 file listed first and its Q4_0 re-quantisation. Each node measured its kernels
//! when it started (remembered in data_dir/kernels.json) and takes the first variant whose
//! kernel runs within 25% of the fastest: on a CPU with AVX2 and the vendored candle's
//! tiles both run about as fast, and the listed order decides (Q4_1), but measurements
//! move with the machine's load. Each node fetches only the file it chose and serves it.

use slmesh_e2e::damage::demo_q4_0;
use slmesh_e2e::fleet::{model_field, wait_for, Fleet, Running};
use slmesh_e2e::post_json;
use std::time::Duration;

const MODEL: &str = "smollm2";
const WAIT: Duration = Duration::from_secs(300);

#[test]
fn each_node_takes_the_variant_its_measured_kernels_run_fastest() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let (q4_1, q4_0) = demo_q4_0(env!("CARGO_BIN_EXE_slmesh").as_ref(), &fleet.path(""));
    let name = |p: &std::path::Path| p.file_name().and_then(|n| n.to_str()).expect("file name").to_string();
    let (q4_1, q4_0) = (name(&q4_1), name(&q4_0));
    let q4_0_size = std::fs::metadata(fleet.path(&q4_0)).expect("the Q4_0 variant").len();
    let q4_1_size = std::fs::metadata(fleet.path(&q4_1)).expect("the Q4_1 file").len();

    let publisher = fleet.node("p", "a", &[]).start();
    let boot = publisher.bootstrap_addr();
    let node = fleet.node("n1", "a", &["--bootstrap", &boot]).start();
    publisher.wait_status("a peer", WAIT, |s| s["peers"].as_array().is_some_and(|p| p.len() == 1));
    // The variant a node's own measurement (picoseconds per weight, taken when it started)
    // picks: Q4_1 is listed first, the publisher's preference when both run about as fast.
    let expected_on = |n: &Running| {
        let measured: serde_json::Value = wait_for("kernels.json", WAIT, || {
            serde_json::from_slice(&std::fs::read(n.node.data.join("kernels.json")).ok()?).ok()
        });
        eprintln!("measured on {}: {measured}", n.node.name);
        let ps = |kind: &str| measured["ps_per_weight"][kind].as_f64().unwrap_or(0.0);
        assert!(ps("Q4_0") > 0.0 && ps("Q4_1") > 0.0, "{measured}");
        if ps("Q4_1") <= 1.25 * ps("Q4_0") {
            "q4_1"
        } else {
            "q4_0"
        }
    };
    let expected = expected_on(&node);
    let slm = fleet.signed_manifest_with(MODEL, 1, &q4_1, &["--wave", "1:0", &q4_0]);
    fleet.slmesh(&["publish", "--node", &publisher.http, "--manifest", slm.to_str().expect("path")]);
    for n in [&publisher, &node] {
        let expected = expected_on(n);
        let status = n.wait_status("serving version 1", WAIT, |s| model_field(s, MODEL, "active") == Some(1));
        let model = status["models"].as_array().into_iter().flatten().find(|m| m["name"] == MODEL).cloned();
        let variant = model.as_ref().and_then(|m| m["active_variant"].as_str()).unwrap_or_default().to_string();
        assert_eq!(variant, expected, "{} took {variant}: {model:?}", n.node.name);
        let text = fleet.slmesh(&["status", "--node", &n.http]);
        assert!(text.contains(&format!("active=1 ({expected})")), "{text}");
    }
    // Only the chosen file was fetched: about its size, not both.
    let downloaded = node.status()["downloaded_bytes"].as_u64().unwrap_or(0);
    let size = if expected == "q4_0" { q4_0_size } else { q4_1_size };
    assert!(downloaded <= size + (1 << 20), "fetched {downloaded} bytes for a {size}-byte variant");
    let file = if expected == "q4_0" { &q4_0 } else { &q4_1 };
    let staged = node.node.data.join(format!("models/{MODEL}/1/{file}"));
    assert!(staged.exists(), "{} not staged", staged.display());
    let (code, answer) = post_json(
        &node.http,
        "/v1/chat/completions",
        r#"{"model":"smollm2","max_tokens":24,"temperature":0,"messages":[{"role":"user","content":"What is the chemical formula of water?"}]}"#,
    );
    assert_eq!(code, 200, "{answer}");
    // A question both files answer right whichever kernels run them (tests/eval).
    assert!(answer.to_string().contains("H2O"), "{answer}");
}
