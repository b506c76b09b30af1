//! The report as Markdown and as an SVG plot of coverage over time.

use crate::world::Report;
use std::fmt::Write;

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
        "- gossip per node: manifests {:.1} B/s, metrics {:.1} B/s, have records {:.1} B/s",
        r.manifest_gossip_bytes_per_node_per_sec,
        r.metrics_gossip_bytes_per_node_per_sec,
        r.have_bytes_per_node_per_sec
    );
    let _ = writeln!(s, "- nodes that ever activated the new version: {:.1}%", r.ever_activated_fraction * 100.0);
    if let Some(h) = &r.halted {
        let _ = writeln!(s, "- rollout halted: {h}");
    }
    let _ = writeln!(s, "\nGate decisions (as the origin saw them):\n");
    for (t, d) in &r.gate_decisions {
        let _ = writeln!(s, "- {t:.0} s: {d}");
    }
    s
}

/// Coverage over time: fraction of nodes with the file staged, and active on the new
/// version.
pub fn coverage_svg(r: &Report) -> String {
    let (w, h, pad) = (640.0, 320.0, 40.0);
    let t_max = r.coverage.last().map_or(1.0, |c| c.0).max(1.0);
    let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
    let y = |f: f64| h - pad - (h - 2.0 * pad) * f;
    let line = |pick: fn(&(f64, f64, f64)) -> f64| {
        r.coverage.iter().map(|c| format!("{:.1},{:.1}", x(c.0), y(pick(c)))).collect::<Vec<_>>().join(" ")
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    );
    let _ = writeln!(s, "<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>",
        h - pad,
        w - pad,
        h - pad,
        h - pad
    );
    let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>", line(|c| c.1));
    let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\" points=\"{}\"/>", line(|c| c.2));
    let _ =
        writeln!(s, "<text x=\"{pad}\" y=\"20\">{}: staged (blue), active on the new version (red)</text>", r.scenario);
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\">{t_max:.0} s</text>", w - pad - 30.0, h - 10.0);
    let _ = writeln!(s, "<text x=\"5\" y=\"{}\">100%</text>", pad + 4.0);
    s.push_str("</svg>\n");
    s
}
