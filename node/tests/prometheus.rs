//! Prometheus scrapes real nodes: `GET /metrics` passes `promtool check metrics`, and a
//! real Prometheus server (Debian's `prometheus` package, installed here if missing)
//! scraping two nodes through the bearer token answers a query for the active version's
//! request rate.

use slmesh_e2e::rollout_rig::{mesh_on_v1, nodes_by_cohort, MODEL};
use slmesh_e2e::{fleet::Fleet, http, TEST_TOKEN};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's `prometheus` package: the server and promtool.
fn need_prometheus() {
    slmesh_e2e::need_debian_package("promtool", "prometheus");
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_two_nodes_and_answers_the_active_versions_request_rate() {
    need_prometheus();
    let fleet = Fleet::new(env!("CARGO_BIN_EXE_slmesh").as_ref());
    let dirs = nodes_by_cohort(&fleet, 2, 2);
    let mesh = mesh_on_v1(fleet, &dirs, |_| vec![]);
    let node = &mesh.nodes[0];

    // The exposition: refused without the token, valid for promtool with it.
    let (code, _) = http(&node.http, "GET", "/metrics", &[("Authorization", "Bearer wrong-token-1234")], vec![]);
    assert_eq!(code, 401);
    std::thread::sleep(Duration::from_secs(3));
    let (code, text) = http(&node.http, "GET", "/metrics", &[], vec![]);
    assert_eq!(code, 200, "{text}");
    for want in
        ["slmesh_requests_total{", "slmesh_fleet_requests{", "slmesh_rollout_waves_open{", "slmesh_node_peers 1"]
    {
        assert!(text.contains(want), "no {want:?} in /metrics:\n{text}");
    }
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    check.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real server scraping both nodes every second.
    let dir = tempfile::tempdir().expect("tempdir");
    let targets: Vec<String> = mesh.nodes.iter().map(|n| format!("'{}'", n.http)).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: slmesh\n    authorization:\n      credentials: \
         {TEST_TOKEN}\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).expect("config");
    let web = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
    let _server = Server(
        Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );
    let query = format!("sum by (instance) (rate(slmesh_fleet_requests{{model=\"{MODEL}\",version=\"1\"}}[10s]))");
    let path = format!("/api/v1/query?query={}", urlencode(&query));
    let start = Instant::now();
    let answer = loop {
        let answer = std::net::TcpStream::connect(&web).ok().map(|_| http(&web, "GET", &path, &[], vec![]));
        if let Some((200, body)) = &answer {
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let results = v["data"]["result"].as_array().cloned().unwrap_or_default();
            let rates: Vec<f64> =
                results.iter().filter_map(|r| r["value"][1].as_str().and_then(|x| x.parse().ok())).collect();
            if rates.len() == 2 && rates.iter().all(|r| *r > 0.0) {
                break v;
            }
        }
        let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
        assert!(start.elapsed() < Duration::from_secs(90), "no request rate from both nodes: {answer:?}\n{log}");
        std::thread::sleep(Duration::from_secs(1));
    };
    eprintln!("prometheus: {answer}");

    // Every query of the Grafana dashboard in the repository is valid PromQL over these
    // series, and the request rate panel has data.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../grafana/slmesh-fleet.json")).expect("dashboard JSON");
    let exprs: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            p["targets"].as_array().cloned().unwrap_or_default().into_iter().map(move |t| (title.clone(), t))
        })
        .filter_map(|(title, t)| Some((title, t["expr"].as_str()?.to_string())))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for (title, expr) in &exprs {
        let (code, body) = http(&web, "GET", &format!("/api/v1/query?query={}", urlencode(expr)), &[], vec![]);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert!(code == 200 && v["status"] == "success", "panel {title:?}: {expr}: {body}");
        if title.starts_with("Requests per second") {
            assert!(v["data"]["result"].as_array().is_some_and(|r| !r.is_empty()), "no data for {title:?}: {body}");
        }
    }
}
