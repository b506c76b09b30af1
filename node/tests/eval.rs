//! Quality gates with the demo model (SmolLM2-135M-Instruct) and a real evaluation suite
//! (`tests/eval/smollm2-basic.jsonl`):
//! - `slmesh eval` passes the demo file and its Q4_0 re-quantisation, and fails a copy
//!   whose attention weights were damaged (it loads and answers at full speed, wrongly);
//!   a bad suite file gets an error naming its line, here and in `manifest create --eval`;
//! - on a real four-node mesh, the damaged version is halted in its canary by the suite
//!   and rolled back, and the good Q4_0 version published after it goes everywhere; the
//!   suite asks for a comparison, so each node runs it on the version it serves too.

use slmesh_e2e::damage::demo_variants;
use slmesh_e2e::fleet::{model_field, Fleet};
use slmesh_e2e::rollout_rig::{mesh_on_v1, nodes_by_cohort, waves_for, LENIENT_RATIOS, MODEL, WAIT};
use std::path::{Path, PathBuf};
use std::process::Command;

fn suite() -> String {
    slmesh_e2e::repo_file("tests/eval/smollm2-basic.jsonl").to_string_lossy().into_owned()
}

/// The demo file, its Q4_0 re-quantisation and a damaged copy of that, in `dir`.
fn models(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    demo_variants(env!("CARGO_BIN_EXE_slmesh").as_ref(), dir)
}

fn slmesh(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slmesh")).current_dir(dir).args(args).output().expect("run slmesh")
}

fn eval(dir: &Path, model: &Path, extra: &[&str]) -> (bool, String, String) {
    let suite = suite();
    let mut args = vec!["eval", "--model", model.to_str().expect("path"), "--suite", &suite];
    args.extend(extra);
    let out = slmesh(dir, &args);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn slmesh_eval_passes_sound_weights_and_fails_damaged_ones() {
    let dir = tempfile::tempdir().expect("tmp");
    let (q4_1, q4_0, damaged) = models(dir.path());
    let q4_1_path = q4_1.to_str().expect("path");
    let compare = ["--compare-with", q4_1_path, "--min-agreement", "0.15"];
    // The re-quantisation's answers agree with the demo file's; the damaged copy's do not.
    for (good, extra) in [(&q4_1, &[][..]), (&q4_0, &compare[..])] {
        let (ok, out, err) = eval(dir.path(), good, extra);
        assert!(ok, "{} should pass:\n{out}\n{err}", good.display());
        // Sound weights pass the suite's 80%, not always every case: a model this small
        // answers a few of them right or wrong on the order of its float additions alone.
        assert!(out.contains("of 12 case(s) passed") && out.contains("needs 80%"), "{out}");
        if good == &q4_0 {
            assert!(out.contains("agreement with the other model's answer:"), "{out}");
            let summary = format!("agreement with {q4_1_path}: median 0.");
            assert!(out.contains(&summary) && out.ends_with("PASS\n"), "{out}");
        }
    }
    let mut args = vec!["--json"];
    args.extend(compare);
    let (ok, out, err) = eval(dir.path(), &damaged, &args);
    assert!(!ok, "the damaged model passed:\n{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("a JSON report");
    let rate = report["pass_rate"].as_f64().expect("pass_rate");
    assert!(rate < 0.5, "the damaged model passed {rate} of the suite:\n{out}");
    assert_eq!(report["results"].as_array().map(Vec::len), Some(12), "{out}");
    let agreement = report["agreement"]["median"].as_f64().expect("agreement");
    assert!(agreement < 0.15, "the damaged model agrees {agreement}:\n{out}");
    assert_eq!(report["agreement"]["per_case"].as_array().map(Vec::len), Some(12), "{out}");
    assert!(err.contains("below 0.15"), "{err}");

    // The format is in the command's help.
    let help = String::from_utf8_lossy(&slmesh(dir.path(), &["eval", "--help"]).stdout).into_owned();
    assert!(help.contains("JSON Lines: one case per line") && help.contains("min_score"), "{help}");

    // A bad suite: the error names the file and the line, and nothing is loaded.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"fine\", \"exact\": \"ok\"}\n{\"prompt\": \"x\", \"regex\": \"(\"}\n").unwrap();
    let out = slmesh(dir.path(), &["eval", "--model", "nowhere.gguf", "--suite", bad.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.jsonl: line 2:") && err.contains("regex"), "{err}");

    // The suite travels in the manifest, and its gate with it.
    let q4_0_name = "SmolLM2-135M-Instruct.Q4_0.gguf";
    let create = |suite: &str| {
        slmesh(dir.path(), &["manifest", "create", "--name", "m", "--version", "1", q4_0_name, "--eval", suite])
    };
    let out = create(bad.to_str().expect("path"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 2"), "{err}");
    let out = create(&suite());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let toml = String::from_utf8_lossy(&out.stdout);
    assert!(toml.contains("min_eval_pass_rate = 0.8") && toml.contains("[[eval.cases]]"), "{toml}");
    assert!(toml.contains("How many legs does a dog have"), "{toml}");
}

#[test]
fn a_version_that_answers_wrongly_is_halted_in_its_canary_by_the_suite() {
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let (q4_1, q4_0, damaged) = models(&fleet.path(""));
    std::fs::rename(&q4_1, fleet.path("v1.gguf")).expect("v1");
    std::fs::rename(&damaged, fleet.path("v2.gguf")).expect("v2");
    std::fs::rename(&q4_0, fleet.path("v3.gguf")).expect("v3");
    let dirs = nodes_by_cohort(&fleet, 4, 2);
    let waves = waves_for(&dirs, &[2, 4], "3s");
    let mesh = mesh_on_v1(fleet, &dirs, |_| vec![]);
    let node = mesh.nodes[0].http.clone();
    // The suite asks each node to run it on the version it serves too, to compare.
    let comparing = mesh.fleet.path("comparing.jsonl");
    let text = std::fs::read_to_string(suite()).expect("suite");
    std::fs::write(&comparing, format!("{{\"compare_with_previous\": true}}\n{text}")).expect("suite");
    let comparing = comparing.to_str().expect("path").to_string();
    let mut args = vec!["--eval", comparing.as_str(), "--min-samples", "10", "--min-reporting-nodes", "2"];
    args.extend(LENIENT_RATIOS);
    let publish_and_wait = |version: u64, file: &str| {
        let mut create: Vec<&str> = vec![];
        for w in &waves {
            create.extend(["--wave", w.as_str()]);
        }
        create.extend(args.iter().copied());
        let slm = mesh.fleet.signed_manifest_with(MODEL, version, file, &create);
        let slm = slm.to_str().expect("path").to_string();
        mesh.fleet.slmesh_code(&["publish", "--node", &node, "--manifest", &slm, "--wait", "--timeout", "4m"])
    };

    // The damaged version loads and serves at full speed; its suite fails on the canary.
    let (code, out) = publish_and_wait(2, "v2.gguf");
    assert_eq!(code, Some(2), "the damaged version was not halted: {out}");
    assert!(out.contains("evaluation suite passed"), "{out}");
    for n in &mesh.nodes {
        n.wait_status("back on version 1", WAIT, |s| model_field(s, MODEL, "active") == Some(1));
    }
    let canary = &mesh.nodes[0];
    let history = mesh.fleet.slmesh(&["rollout", "history", "--node", &canary.http, "--model", MODEL]);
    assert!(history.contains("evaluated") && history.contains("of 12 case(s) passed"), "{history}");
    assert!(history.contains("(the version served before: "), "{history}");
    for n in &mesh.nodes[2..] {
        let served = n.log_text().lines().any(|l| l.contains("serving") && l.contains("version=2"));
        assert!(!served, "{} outside the canary served the damaged version", n.node.name);
    }

    // The good re-quantised version passes the same suite and goes everywhere.
    let (code, out) = publish_and_wait(3, "v3.gguf");
    assert_eq!(code, Some(0), "the good version did not complete: {out}");
    for n in &mesh.nodes {
        n.wait_status("version 3", WAIT, |s| model_field(s, MODEL, "active") == Some(3));
    }
    let rollouts = mesh.fleet.slmesh(&["rollout", "status", "--node", &canary.http]);
    assert!(rollouts.contains("evaluation suite passed 100.0% on"), "{rollouts}");
    let history = mesh.fleet.slmesh(&["rollout", "history", "--node", &canary.http, "--model", MODEL]);
    assert!(history.contains("of 12 case(s) passed (the version served before: "), "{history}");
    // The fleet view shows each version's suite figure beside the others.
    let fleet = mesh.fleet.slmesh(&["fleet", "--node", &canary.http]);
    let line =
        |v: &str| fleet.lines().find(|l| l.starts_with(&format!("{MODEL}@{v} "))).unwrap_or_default().to_string();
    // The suite's column, before the agreement's (no shadow comparison here: "-").
    let suite = |v: &str| line(v).split_whitespace().rev().take(2).collect::<Vec<_>>().join(" ");
    assert!(suite("3") == "- 100.0%" && suite("2").starts_with("- ") && suite("2").ends_with('%'), "{fleet}");
    assert!(fleet.contains("evaluation suite passed"), "{fleet}");
}
