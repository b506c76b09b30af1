//! What `GET /v1/status` answers and `slmesh status` prints.

use serde::{Deserialize, Serialize};
use slmesh_protocol::fleet::{GateVerdict, VersionSummary};
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: String,
    /// The fleet its certificate names.
    #[serde(default)]
    pub fleet: String,
    pub peer_id: String,
    pub tags: BTreeMap<String, String>,
    pub listen: Vec<String>,
    pub blob_addrs: Vec<String>,
    pub peers: Vec<PeerStatus>,
    pub models: Vec<ModelStatus>,
    pub fetches: Vec<FetchStatus>,
    /// The version the HTTP endpoint serves, as `name@version`.
    pub serving: Option<String>,
    pub uploaded_bytes: u64,
    pub downloaded_bytes: u64,
    pub refused_fetches: u64,
    /// Piece requests held for a busy upload slot (most are then sent).
    #[serde(default)]
    pub held_fetches: u64,
    /// Uploads that ran past `network.upload_stalled_after_ms` while requests waited, so
    /// that one started beside them (many: slow fetchers, or a threshold too short for
    /// this uplink).
    #[serde(default)]
    pub stalled_uploads: u64,
    /// Peers refused at admission since start, with the reason.
    pub refused_peers: Vec<(String, String)>,
    /// Nodes the operator revoked (node id, reason), as this node holds them.
    #[serde(default)]
    pub revoked: Vec<(String, String)>,
    /// Gossip bytes sent (published and forwarded) and received per topic since start.
    #[serde(default)]
    pub gossip: Vec<slmesh_mesh::GossipBytes>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node_id: String,
    pub peer_id: String,
    pub site: Option<String>,
    pub rtt_ms: Option<f64>,
    pub addr: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModelStatus {
    pub name: String,
    pub latest_known: u64,
    pub staged: Vec<u64>,
    pub active: Option<u64>,
    pub previous: Option<u64>,
    pub pinned: Option<u64>,
    /// The variant of the active version this node took (by its facts and measured
    /// kernels), e.g. `q4_0`.
    #[serde(default)]
    pub active_variant: Option<String>,
    /// The latest problem with this model, if any (no fitting variant, a failed fetch or
    /// activation).
    pub note: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FetchStatus {
    pub model: String,
    pub version: u64,
    pub file: String,
    pub size: u64,
    /// Bytes on disk before this fetch (resumed).
    pub had: u64,
    pub received: u64,
    pub provider: String,
    /// Seconds since this file's fetch began (`received / secs` is its rate).
    #[serde(default)]
    pub secs: f64,
}

impl FetchStatus {
    /// Bytes per second received since the fetch began.
    pub fn rate(&self) -> Option<f64> {
        (self.secs > 0.0).then(|| self.received as f64 / self.secs)
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl NodeStatus {
    /// The text `slmesh status` prints.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let tags: Vec<String> = self.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "node     {}", self.node_id);
        let _ = writeln!(out, "fleet    {}", self.fleet);
        let _ = writeln!(out, "peer id  {}", self.peer_id);
        let _ = writeln!(out, "tags     {}", if tags.is_empty() { "-".into() } else { tags.join(" ") });
        let _ = writeln!(out, "serving  {}", self.serving.as_deref().unwrap_or("nothing yet"));
        let _ = writeln!(
            out,
            "blobs    uploaded {}, downloaded {}, refused {} fetch(es), held {} for a slot, {} upload(s) stalled",
            human_bytes(self.uploaded_bytes),
            human_bytes(self.downloaded_bytes),
            self.refused_fetches,
            self.held_fetches,
            self.stalled_uploads
        );
        let _ = writeln!(out, "\npeers ({})", self.peers.len());
        for p in &self.peers {
            let rtt = p.rtt_ms.map(|r| format!("{r:.2} ms")).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "  {}  site={}  rtt={rtt}  {}",
                short(&p.node_id),
                p.site.as_deref().unwrap_or("-"),
                p.addr
            );
        }
        for (peer, reason) in &self.refused_peers {
            let _ = writeln!(out, "  refused {peer}: {reason}");
        }
        if !self.revoked.is_empty() {
            let _ = writeln!(out, "\nrevoked ({})", self.revoked.len());
            for (node, reason) in &self.revoked {
                let _ = writeln!(out, "  {}  {reason}", short(node));
            }
        }
        let _ = writeln!(out, "\nmodels ({})", self.models.len());
        for m in &self.models {
            let v = |x: Option<u64>| x.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            let staged: Vec<String> = m.staged.iter().map(u64::to_string).collect();
            let _ = writeln!(
                out,
                "  {}  active={}{} previous={} latest={} staged=[{}]{}",
                m.name,
                v(m.active),
                m.active_variant.as_ref().map(|id| format!(" ({id})")).unwrap_or_default(),
                v(m.previous),
                m.latest_known,
                staged.join(","),
                m.pinned.map(|p| format!(" pinned={p}")).unwrap_or_default()
            );
            if let Some(note) = &m.note {
                let _ = writeln!(out, "    note: {note}");
            }
        }
        let _ = writeln!(out, "\nfetches in progress ({})", self.fetches.len());
        for f in &self.fetches {
            let done = f.had + f.received;
            let pct = if f.size == 0 { 100.0 } else { 100.0 * done as f64 / f.size as f64 };
            let rate = f.rate().map(|r| format!("{}/s", human_bytes(r as u64))).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "  {}@{} {}  {} / {} ({pct:.0}%)  {rate}  from {}",
                f.model,
                f.version,
                f.file,
                human_bytes(done),
                human_bytes(f.size),
                short(&f.provider)
            );
        }
        out
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// One rollout as this node sees it (`GET /v1/rollouts`): the state machine's own view.
pub use slmesh_protocol::node::RolloutView;

/// One version across the fleet (`GET /v1/fleet`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetVersionView {
    pub model: String,
    pub version: u64,
    /// Members of the version's metrics panel that report it (at most 16): the figures
    /// here are theirs.
    pub nodes_reporting: usize,
    pub nodes_active: usize,
    /// About how many nodes of the fleet report the version (exact up to 16).
    pub nodes_estimated: usize,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: Option<f64>,
    pub median_node_error_rate: Option<f64>,
    pub p50_latency_secs: Option<f64>,
    pub p95_latency_secs: Option<f64>,
    pub p95_ttft_secs: Option<f64>,
    pub p50_tokens_per_sec: Option<f64>,
    /// The median node's share of the evaluation suite passed, and how many nodes ran it.
    #[serde(default)]
    pub median_eval_pass_rate: Option<f64>,
    #[serde(default)]
    pub nodes_evaluated: usize,
    /// The median node's agreement with the previous version (shadow comparison), and
    /// how many nodes compared enough answers.
    #[serde(default)]
    pub median_agreement: Option<f64>,
    #[serde(default)]
    pub nodes_compared: usize,
}

impl FleetVersionView {
    pub fn from_summary(s: &VersionSummary) -> Self {
        let p = &s.pooled;
        FleetVersionView {
            model: p.model.clone(),
            version: p.version,
            nodes_reporting: s.nodes_reporting,
            nodes_active: s.nodes_active,
            nodes_estimated: s.nodes_estimated,
            requests: p.requests,
            errors: p.errors,
            error_rate: s.pooled_error_rate(),
            median_node_error_rate: s.median_node_error_rate(),
            p50_latency_secs: p.latency.quantile(0.5),
            p95_latency_secs: p.latency.quantile(0.95),
            p95_ttft_secs: p.ttft.quantile(0.95),
            p50_tokens_per_sec: p.tokens_per_sec.quantile(0.5),
            median_eval_pass_rate: s.median_node_eval_pass_rate(),
            nodes_evaluated: s.nodes_evaluated(),
            median_agreement: s.median_node_agreement(),
            nodes_compared: s.nodes_compared(),
        }
    }
}

fn opt(v: Option<f64>, scale: f64, unit: &str) -> String {
    v.map(|v| format!("{:.1}{unit}", v * scale)).unwrap_or_else(|| "-".into())
}

/// The table `slmesh fleet` prints.
pub fn fleet_text(versions: &[FleetVersionView]) -> String {
    let mut out = format!(
        "{:<28} {:>7} {:>6} {:>7} {:>9} {:>7} {:>9} {:>9} {:>9} {:>8} {:>7} {:>6}\n",
        "model@version",
        "active",
        "nodes",
        "≈fleet",
        "requests",
        "errors",
        "p50 lat",
        "p95 lat",
        "p95 ttft",
        "tok/s",
        "suite",
        "agree"
    );
    for v in versions {
        let _ = writeln!(
            out,
            "{:<28} {:>7} {:>6} {:>7} {:>9} {:>7} {:>9} {:>9} {:>9} {:>8} {:>7} {:>6}",
            format!("{}@{}", v.model, v.version),
            v.nodes_active,
            v.nodes_reporting,
            v.nodes_estimated,
            v.requests,
            opt(v.error_rate, 100.0, "%"),
            opt(v.p50_latency_secs, 1000.0, "ms"),
            opt(v.p95_latency_secs, 1000.0, "ms"),
            opt(v.p95_ttft_secs, 1000.0, "ms"),
            opt(v.p50_tokens_per_sec, 1.0, ""),
            opt(v.median_eval_pass_rate, 100.0, "%"),
            v.median_agreement.map(|a| format!("{a:.2}")).unwrap_or_else(|| "-".into()),
        );
    }
    if versions.iter().any(|v| v.nodes_estimated > v.nodes_reporting) {
        out.push_str("(figures of each version's metrics panel of 16 nodes; ≈fleet: nodes estimated to report it)\n");
    }
    if versions.iter().any(|v| v.nodes_evaluated > 0) {
        out.push_str("(suite: the median node's share of the version's evaluation suite passed)\n");
    }
    if versions.iter().any(|v| v.nodes_compared > 0) {
        out.push_str("(agree: the median node's agreement of its answers with the previous version's, 0 to 1)\n");
    }
    out
}

/// The text `slmesh rollout status` prints.
pub fn rollouts_text(rollouts: &[RolloutView]) -> String {
    let mut out = String::new();
    if rollouts.is_empty() {
        out.push_str("no rollout in progress on this node\n");
    }
    for r in rollouts {
        let verdict = match &r.verdict {
            GateVerdict::Pass => "pass".to_string(),
            GateVerdict::Pending(why) => format!("pending ({why})"),
            GateVerdict::Fail(why) => format!("FAIL ({why})"),
        };
        let _ = writeln!(
            out,
            "{}@{}  waves open {}/{}{}  this node: wave {}  {}\n  gates: {verdict}{}",
            r.model,
            r.version,
            r.waves_open,
            r.waves,
            if r.paused { " (paused)" } else { "" },
            r.my_wave.map(|w| w.to_string()).unwrap_or_else(|| "-".into()),
            r.decision,
            r.halted.as_ref().map(|h| format!("\n  halted: {h}")).unwrap_or_default(),
        );
        let _ = writeln!(out, "  {}", gate_figures_text(r));
        if !r.known_per_wave.is_empty() {
            let counts: Vec<String> = r.known_per_wave.iter().map(usize::to_string).collect();
            let _ = writeln!(out, "  nodes known per wave: {}", counts.join(" / "));
        }
        if !r.per_wave.is_empty() {
            let counts: Vec<String> = r.per_wave.iter().map(|w| format!("{}/{}", w.staged, w.serving)).collect();
            let _ = writeln!(out, "  staged/serving per wave (metrics panels' estimate): {}", counts.join("  "));
        }
        if r.activation_failures > 0 {
            let _ = writeln!(
                out,
                "  failed to load here {} time(s): {}",
                r.activation_failures,
                r.activation_error.as_deref().unwrap_or("-")
            );
        }
    }
    out
}

/// The figures the gates read, each beside its limit.
fn gate_figures_text(r: &RolloutView) -> String {
    let (f, g) = (&r.figures, &r.gates);
    let ratio = |v: Option<f64>| v.map(|v| format!("{v:.2}x")).unwrap_or_else(|| "-".into());
    let mut text = format!(
        "figures: {} node(s), {} request(s) (needs {} and {}); error rate {} (max {:.1}%)",
        f.nodes_measured,
        f.requests,
        g.min_reporting_nodes,
        g.min_samples,
        opt(f.median_error_rate, 100.0, "%"),
        g.max_error_rate * 100.0
    );
    if let Some(min) = g.min_eval_pass_rate {
        let _ = write!(
            text,
            "; evaluation suite passed {} on {} node(s) (min {:.0}%)",
            opt(f.median_eval_pass_rate, 100.0, "%"),
            f.nodes_evaluated,
            min * 100.0
        );
    }
    if let Some(a) = &g.agreement {
        let _ = write!(
            text,
            "; agreement with the previous version {} on {} node(s) (min {:.2}, {:.0}% of requests compared)",
            f.median_agreement.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into()),
            f.nodes_compared,
            a.min,
            a.sample * 100.0
        );
    }
    match &r.baseline {
        Some(b) => {
            let _ = write!(
                text,
                "; against version {}: p95 latency {} (max {:.2}x), p95 TTFT {} (max {:.2}x), tokens/s {} (min {:.2}x)",
                b.version,
                ratio(b.ratios.p95_latency),
                g.max_p95_latency_ratio,
                ratio(b.ratios.p95_ttft),
                g.max_p95_ttft_ratio,
                ratio(b.ratios.tokens_per_sec),
                g.min_tokens_per_sec_ratio
            );
        }
        None => text.push_str("; no baseline version to compare with"),
    }
    text
}

/// The quality figures (evaluation suite, agreement with the previous version), when
/// nodes have them.
fn quality_text(f: &slmesh_protocol::history::GateFigures) -> String {
    let mut text = String::new();
    if let Some(rate) = f.median_eval_pass_rate {
        let _ = write!(text, "evaluation suite passed {:.0}% on {} node(s), ", rate * 100.0, f.nodes_evaluated);
    }
    if let Some(a) = f.median_agreement {
        let _ = write!(text, "agreement with the previous version {a:.2} on {} node(s), ", f.nodes_compared);
    }
    text
}

/// The rollout history as `slmesh rollout history` prints it: one line per event, oldest
/// first, with the gates' figures under each verdict.
pub fn history_text(events: &[slmesh_protocol::history::HistoryEvent]) -> String {
    use slmesh_protocol::history::HistoryKind;
    let mut out = String::new();
    if events.is_empty() {
        out.push_str("no rollout event on this node yet\n");
    }
    for e in events {
        let when = httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.at));
        let what = match &e.kind {
            HistoryKind::WaveOpened { .. } => "wave opened",
            HistoryKind::Verdict { .. } => "gate verdict",
            HistoryKind::Halted { .. } => "HALTED",
            HistoryKind::Activated => "activated",
            HistoryKind::RolledBack { .. } => "rolled back",
            HistoryKind::ActivationFailed { .. } => "LOAD FAILED",
            HistoryKind::Command { .. } => "operator",
            HistoryKind::Evaluated { .. } => "evaluated",
        };
        let _ = writeln!(out, "{when}  {}@{}  {what:<12}  {}", e.model, e.version, e.text);
        if let HistoryKind::Verdict { figures: f, .. } = &e.kind {
            let _ = writeln!(
                out,
                "    on {} node(s), {} request(s): {}error rate {}, p95 latency {}, p95 TTFT {}, tokens/s {}",
                f.nodes_measured,
                f.requests,
                quality_text(f),
                f.median_error_rate.map(|r| format!("{:.1}%", r * 100.0)).unwrap_or_else(|| "-".into()),
                opt(f.median_p95_latency_secs, 1000.0, " ms"),
                opt(f.median_p95_ttft_secs, 1000.0, " ms"),
                opt(f.median_tokens_per_sec, 1.0, ""),
            );
        }
    }
    out
}
