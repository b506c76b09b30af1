//! The fleet's part of `GET /metrics` (Prometheus text format), after the node's own
//! request counters and histograms: per version, the metrics panel's nodes, requests,
//! errors and quantiles as this node sees them; per rollout, its waves, open waves,
//! pause, halt and the gates' verdict; the node's admitted peers.

use super::status::{FleetVersionView, RolloutView};
use slmesh_inference::prometheus::{escape, header};
use slmesh_protocol::history::Outcome;
use std::fmt::Write;

/// A gauge per version: name, help text, and its value.
type VersionGauge = (&'static str, &'static str, fn(&FleetVersionView) -> f64);
/// A quantile per version: name, help text (empty: the family's header was written),
/// the quantile, and its value.
type VersionQuantile = (&'static str, &'static str, &'static str, fn(&FleetVersionView) -> Option<f64>);

fn labels(model: &str, version: u64) -> String {
    format!("model=\"{}\",version=\"{version}\"", escape(model))
}

/// One gauge family: its header, then one sample per (labels, value).
fn gauge(out: &mut String, name: &str, help: &str, samples: impl IntoIterator<Item = (String, f64)>) {
    header(out, name, "gauge", help);
    for (l, v) in samples {
        let _ = writeln!(out, "{name}{{{l}}} {v}");
    }
}

pub fn fleet_text(fleet: &[FleetVersionView], rollouts: &[RolloutView], peers: usize) -> String {
    let mut out = String::new();
    let per_version = |f: fn(&FleetVersionView) -> f64| -> Vec<(String, f64)> {
        fleet.iter().map(|v| (labels(&v.model, v.version), f(v))).collect()
    };
    let families: [VersionGauge; 5] = [
        ("slmesh_fleet_nodes_active", "Nodes of the version's metrics panel serving it.", |v| v.nodes_active as f64),
        ("slmesh_fleet_nodes_reporting", "Nodes of the version's metrics panel reporting it.", |v| {
            v.nodes_reporting as f64
        }),
        ("slmesh_fleet_nodes_estimated", "About how many nodes of the fleet report the version.", |v| {
            v.nodes_estimated as f64
        }),
        ("slmesh_fleet_requests", "Requests the version's metrics panel measured (cumulative).", |v| v.requests as f64),
        ("slmesh_fleet_errors", "Failed requests the version's metrics panel measured (cumulative).", |v| {
            v.errors as f64
        }),
    ];
    for (name, help, f) in families {
        gauge(&mut out, name, help, per_version(f));
    }
    let quantiles: [VersionQuantile; 4] = [
        ("slmesh_fleet_latency_seconds", "Request latency across the panel.", "0.5", |v| v.p50_latency_secs),
        ("slmesh_fleet_latency_seconds", "", "0.95", |v| v.p95_latency_secs),
        ("slmesh_fleet_ttft_seconds", "Time to first token across the panel.", "0.95", |v| v.p95_ttft_secs),
        ("slmesh_fleet_tokens_per_second", "Decode speed across the panel.", "0.5", |v| v.p50_tokens_per_sec),
    ];
    for (name, help, q, f) in quantiles {
        if !help.is_empty() {
            // Quantiles of a distribution: a summary (without _sum and _count, which the
            // panel's figures do not give).
            header(&mut out, name, "summary", help);
        }
        for v in fleet {
            if let Some(x) = f(v) {
                let _ = writeln!(out, "{name}{{{},quantile=\"{q}\"}} {x}", labels(&v.model, v.version));
            }
        }
    }
    let per_rollout = |f: fn(&RolloutView) -> f64| -> Vec<(String, f64)> {
        rollouts.iter().map(|r| (labels(&r.model, r.version), f(r))).collect()
    };
    gauge(&mut out, "slmesh_rollout_waves", "Waves in the version's rollout plan.", per_rollout(|r| r.waves as f64));
    gauge(
        &mut out,
        "slmesh_rollout_waves_open",
        "Waves of the rollout open, as this node sees it.",
        per_rollout(|r| r.waves_open as f64),
    );
    gauge(
        &mut out,
        "slmesh_rollout_paused",
        "1 while an operator holds the rollout paused.",
        per_rollout(|r| f64::from(u8::from(r.paused))),
    );
    gauge(
        &mut out,
        "slmesh_rollout_halted",
        "1 once the rollout halted (a gate failed, an abort).",
        per_rollout(|r| f64::from(u8::from(r.halted.is_some()))),
    );
    let verdicts = rollouts.iter().flat_map(|r| {
        let now = Outcome::of(&r.verdict).0;
        [Outcome::Pass, Outcome::Pending, Outcome::Fail].map(|kind| {
            let l = format!("{},verdict=\"{}\"", labels(&r.model, r.version), kind.as_str());
            (l, f64::from(u8::from(kind == now)))
        })
    });
    gauge(&mut out, "slmesh_rollout_verdict", "1 for the gates' current verdict (pass, pending, fail).", verdicts);
    let per_wave = rollouts.iter().flat_map(|r| {
        r.per_wave.iter().enumerate().flat_map(move |(i, w)| {
            [("staged", w.staged), ("serving", w.serving)].map(|(state, n)| {
                (format!("{},wave=\"{}\",state=\"{state}\"", labels(&r.model, r.version), i + 1), n as f64)
            })
        })
    });
    gauge(
        &mut out,
        "slmesh_rollout_wave_nodes",
        "Nodes of each wave serving the version or holding it staged (estimated from the metrics panels).",
        per_wave,
    );
    header(&mut out, "slmesh_node_peers", "gauge", "Peers this node admitted and is connected to.");
    let _ = writeln!(out, "slmesh_node_peers {peers}");
    out
}
