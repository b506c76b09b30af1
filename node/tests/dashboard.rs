//! The dashboard at `/`, in headless Chromium (Debian's `chromium` package, installed
//! here if missing): a four-node mesh halts a bad version in its canary, and the page of
//! a canary node shows the fleet's versions, the rollout's waves, its gates beside their
//! limits and its verdicts, the peers and the events, with no error in the page or its
//! console. Without the token the page shows nothing but a form asking for it.
//! Screenshots go under the test's output folder (`target/tmp/dashboard/`).

use slmesh_e2e::rollout_rig::{mesh_on_v1, nodes_by_cohort, publish_v2_and_wait, waves_for, LENIENT_RATIOS};
use slmesh_e2e::{http, TEST_TOKEN};
use std::path::{Path, PathBuf};
use std::process::Command;

fn chromium() -> &'static str {
    slmesh_e2e::need_debian_package("chromium", "chromium");
    "chromium"
}

/// What headless Chromium made of `url` after the page ran for a few (virtual) seconds:
/// the DOM (or nothing, when `screenshot` is given) and its log (console messages
/// included).
fn chromium_run(profile: &Path, url: &str, screenshot: Option<&Path>) -> (String, String) {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1440,1800",
        "--virtual-time-budget=6000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).output().expect("run chromium");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "chromium failed: {log}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), log)
}

/// The page's console messages, from Chromium's log (which logs every level as INFO).
/// The page writes none of its own, so each one is an error: an uncaught exception, a
/// resource the policy refused, a failed request.
fn console_messages(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(":CONSOLE")).collect()
}

fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).expect("output folder");
    dir
}

#[test]
fn the_dashboard_shows_versions_waves_gates_and_verdicts_in_a_browser() {
    let fleet = slmesh_e2e::fleet::Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let dirs = nodes_by_cohort(&fleet, 4, 2);
    let waves = waves_for(&dirs, &[2, 4], "3s");
    let mesh = mesh_on_v1(fleet, &dirs, |_| vec![("SLMESH_TEST_FAULT", "tiny@2")]);
    let mut gates = vec!["--min-samples", "10", "--min-reporting-nodes", "2", "--max-error-rate", "0.1"];
    gates.extend(LENIENT_RATIOS);
    let (code, out) = publish_v2_and_wait(&mesh, &waves, &gates, "3m");
    assert_eq!(code, Some(2), "the bad version should halt: {out}");
    let canary = &mesh.nodes[0];

    // The page and its files are the node's own; the data behind them needs the token.
    let (code, page) = http(&canary.http, "GET", "/", &[("Authorization", "Bearer nothing")], vec![]);
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("/dashboard.js"), "{page}");
    for path in ["/dashboard.js", "/dashboard.css"] {
        assert_eq!(http(&canary.http, "GET", path, &[], vec![]).0, 200, "{path}");
    }
    assert_eq!(http(&canary.http, "GET", "/v1/rollouts", &[("Authorization", "Bearer nothing")], vec![]).0, 401);

    let out_dir = output_dir();
    let profile = tempfile::tempdir().expect("profile");
    let base = format!("http://{}/", canary.http);

    // Without the token: the form, and none of the node's data.
    let (dom, log) = chromium_run(profile.path(), &base, None);
    assert!(dom.contains("bearer token needed"), "{dom}");
    assert!(!dom.contains("id=\"token-form\" hidden"), "the token form is hidden:\n{dom}");
    assert!(!dom.contains("tiny@"), "data shown without the token:\n{dom}");
    assert!(!dom.contains("data-page-errors"), "{dom}");
    // The node's 401s are what Chromium logs; nothing else may be.
    let problems: Vec<&str> = console_messages(&log).into_iter().filter(|l| !l.contains("status of 401")).collect();
    assert!(problems.is_empty(), "console: {problems:#?}");

    // With it (in the fragment, which the browser does not send).
    let url = format!("{base}#token={TEST_TOKEN}");
    let profile = tempfile::tempdir().expect("profile");
    let (dom, log) = chromium_run(profile.path(), &url, None);
    std::fs::write(out_dir.join("dashboard.html"), &dom).expect("save the DOM");
    assert!(dom.contains("data-loaded=\"1\""), "the page never drew the node's data:\n{dom}");
    assert!(!dom.contains("data-page-errors"), "errors in the page:\n{dom}");
    let problems = console_messages(&log);
    assert!(problems.is_empty(), "console: {problems:#?}");
    let want = [
        // The fleet per version.
        "tiny@1",
        "tiny@2",
        // The rollout, its two waves (the canary open, the rest waiting), its halt.
        "data-rollout=\"tiny@2\"",
        "data-wave=\"1\"",
        "data-wave=\"2\"",
        "wave 1 · open",
        "wave 2 · waiting",
        // Each wave's nodes staged and serving (the counts depend on the rollback's timing).
        "class=\"progress\"",
        " staged · ",
        "halted",
        // Gates beside their limits, and the verdicts.
        "error rate (median node)",
        "≤ 10.0%",
        "beyond",
        "Verdict history",
        "gate failed",
        // Peers and events.
        &canary_peer_short(canary),
        "wave opened",
        "rolled back",
    ];
    for w in want {
        assert!(dom.contains(w), "no {w:?} in the dashboard:\n{dom}");
    }

    let shot = out_dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().expect("profile");
    chromium_run(profile.path(), &url, Some(&shot));
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "screenshot of {} bytes", png.len());
    eprintln!("dashboard screenshot: {}", shot.display());
}

/// The first twelve characters of one of the canary node's peers, as the page shows them.
fn canary_peer_short(canary: &slmesh_e2e::fleet::Running) -> String {
    let status = canary.status();
    let peer = status["peers"][0]["node_id"].as_str().expect("a peer").to_string();
    peer[..12].to_string()
}
