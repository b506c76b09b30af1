//! What a scenario run reports, as JSON (serde), Markdown and SVG plots over time.

use crate::plot::{line_chart, timeline, Chart, Series, Span};
use plotters::style::RGBColor;
use serde::Serialize;
use std::fmt::Write;

#[derive(Debug, Clone, Serialize)]
pub struct CoverageSample {
    pub secs: f64,
    /// Fraction of all nodes with the new version's file complete.
    pub staged: f64,
    /// Fraction of all nodes serving the new version.
    pub active: f64,
    /// Per wave: fraction of its members serving the new version.
    pub waves_active: Vec<f64>,
    /// Bytes of pieces the origin has uploaded so far.
    pub origin_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WaveReport {
    pub wave: usize,
    pub members: usize,
    /// Seconds after publication until 50/90/99/100% of the wave's members served the
    /// new version (None: never reached).
    pub p50_secs: Option<f64>,
    pub p90_secs: Option<f64>,
    pub p99_secs: Option<f64>,
    pub p100_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub nodes: usize,
    pub sites: usize,
    pub events: u64,
    /// Simulated seconds from the start (the baseline already served) to the end.
    pub simulated_secs: f64,
    pub model_bytes: u64,
    pub waves: Vec<WaveReport>,
    /// Seconds from publication until every live node had the new version's file.
    pub distribution_secs: Option<f64>,
    /// The Kumar-Ross lower bound max(F/u_s, F/d_min, N F / (u_s + sum u_i)), seconds.
    pub kumar_ross_secs: f64,
    pub distribution_over_bound: Option<f64>,
    /// Bytes of pieces the origin uploaded, and that over (model size x sites).
    pub origin_egress_bytes: u64,
    pub origin_egress_per_site: f64,
    pub cross_site_bytes: u64,
    pub partition_drops: u64,
    /// Seconds after publication until 50% and 99% of the nodes live at publication
    /// knew the new version (gossip or anti-entropy).
    pub manifest_propagation_p50_secs: Option<f64>,
    pub manifest_propagation_p99_secs: Option<f64>,
    /// Gossip bytes sent (originated and forwarded) per node per second, by topic.
    pub manifest_gossip_bytes_per_node_per_sec: f64,
    pub metrics_gossip_bytes_per_node_per_sec: f64,
    /// Of it: the bytes per node before publication (the start-up, once: each node reports
    /// the baseline unless the records it heard fill the panel first), and per node per
    /// second from publication to the end (the rollout, which the scale goal of 2 KB/s is
    /// about).
    pub metrics_gossip_start_bytes_per_node: f64,
    pub metrics_gossip_rollout_bytes_per_node_per_sec: f64,
    /// Have-record bytes per node over the run (sent to direct peers).
    pub have_bytes_per_node: f64,
    /// Fraction of nodes that ever served the new version.
    pub ever_activated_fraction: f64,
    pub halted: Option<String>,
    /// Every 5 simulated seconds.
    pub coverage: Vec<CoverageSample>,
    /// (seconds, verdict) whenever the origin's view of the rollout changed.
    pub gate_decisions: Vec<(f64, String)>,
}

fn opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "never".into())
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Simulation: {}\n", r.scenario);
    let _ = writeln!(
        s,
        "{} nodes in {} sites, seed {}, {:.1} MB model; {} events over {:.0} simulated seconds.\n",
        r.nodes,
        r.sites,
        r.seed,
        r.model_bytes as f64 / 1e6,
        r.events,
        r.simulated_secs
    );
    let _ = writeln!(s, "| wave | nodes | 50% | 90% | 99% | 100% (seconds after publication) |");
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|");
    for w in &r.waves {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            w.wave,
            w.members,
            opt(w.p50_secs),
            opt(w.p90_secs),
            opt(w.p99_secs),
            opt(w.p100_secs)
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "- distribution to every live node: {} s", opt(r.distribution_secs));
    let _ = writeln!(
        s,
        "- Kumar–Ross lower bound: {:.1} s; ratio {}",
        r.kumar_ross_secs,
        r.distribution_over_bound.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        s,
        "- origin egress: {:.1} MB ({:.2}x the model per site)",
        r.origin_egress_bytes as f64 / 1e6,
        r.origin_egress_per_site
    );
    let _ = writeln!(s, "- bytes across sites: {:.1} MB", r.cross_site_bytes as f64 / 1e6);
    let _ = writeln!(
        s,
        "- manifest propagation: p50 {} s, p99 {} s",
        r.manifest_propagation_p50_secs.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into()),
        r.manifest_propagation_p99_secs.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        s,
        "- gossip per node: manifests {:.1} B/s, metrics {:.1} B/s; have records {:.1} KB per node",
        r.manifest_gossip_bytes_per_node_per_sec,
        r.metrics_gossip_bytes_per_node_per_sec,
        r.have_bytes_per_node / 1e3
    );
    let _ = writeln!(
        s,
        "- metrics gossip per node: {:.1} KB at start-up (before publication, once), {:.1} B/s from publication on",
        r.metrics_gossip_start_bytes_per_node / 1e3,
        r.metrics_gossip_rollout_bytes_per_node_per_sec
    );
    let _ = writeln!(s, "- nodes that ever served the new version: {:.1}%", r.ever_activated_fraction * 100.0);
    if let Some(h) = &r.halted {
        let _ = writeln!(s, "- rollout halted: {h}");
    }
    let _ = writeln!(s, "\nGate decisions (as the origin saw them):\n");
    for (t, d) in &r.gate_decisions {
        let _ = writeln!(s, "- {t:.0} s: {d}");
    }
    s
}

/// Coverage over time: per wave, the fraction of its members active on the new version;
/// and the fraction of all nodes with the file staged.
pub fn coverage_svg(r: &Report) -> Result<String, String> {
    let mut series = vec![Series {
        name: "staged (all nodes)".into(),
        points: r.coverage.iter().map(|c| (c.secs, c.staged)).collect(),
    }];
    for w in 0..r.waves.len() {
        let points = r.coverage.iter().map(|c| (c.secs, c.waves_active.get(w).copied().unwrap_or(0.0))).collect();
        series.push(Series { name: format!("wave {} active", w + 1), points });
    }
    let title = format!("{}: coverage over time", r.scenario);
    let chart = Chart {
        title: &title,
        x_label: "seconds after the start",
        y_label: "fraction of nodes",
        log_x: false,
        log_y: false,
    };
    line_chart(&chart, &series)
}

/// Bytes uploaded by the origin over time, in MB.
pub fn origin_svg(r: &Report) -> Result<String, String> {
    let points: Vec<(f64, f64)> = r.coverage.iter().map(|c| (c.secs, c.origin_bytes as f64 / 1e6)).collect();
    let title = format!("{}: bytes uploaded by the origin", r.scenario);
    let chart = Chart { title: &title, x_label: "seconds after the start", y_label: "MB", log_x: false, log_y: false };
    line_chart(&chart, &[Series { name: "origin".into(), points }])
}

/// Gate verdicts over time as the origin saw them: spans coloured by verdict (a halt
/// counts as failed).
pub fn gates_svg(r: &Report) -> Result<String, String> {
    let t_max = r.coverage.last().map_or(1.0, |c| c.secs).max(1.0);
    let kinds =
        [("pending", RGBColor(187, 187, 187)), ("pass", RGBColor(44, 160, 44)), ("fail", RGBColor(214, 39, 40))];
    let spans: Vec<Span> = r
        .gate_decisions
        .iter()
        .enumerate()
        .map(|(i, (t, verdict))| Span {
            from: *t,
            to: r.gate_decisions.get(i + 1).map_or(t_max, |n| n.0),
            kind: if verdict.starts_with("pass") {
                1
            } else if verdict.starts_with("fail") || verdict.starts_with("halted") {
                2
            } else {
                0
            },
        })
        .collect();
    let title = format!("{}: gate verdicts", r.scenario);
    timeline(&title, "seconds after the start", t_max, &kinds, &spans)
}
