//! `GET /metrics` in the Prometheus text format: request and error counters, token
//! counters, latency and time-to-first-token histograms and tokens/s quantiles, labelled
//! by model and version.

use slmesh_protocol::metrics::{Histogram, NodeMetrics, VersionMetrics};
use std::collections::BTreeMap;
use std::fmt::Write;

/// A label value, escaped for the text format.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Name, help text, and the counter's value.
type Counter = (&'static str, &'static str, fn(&VersionMetrics) -> u64);

/// A metric family's `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    for (bound, count) in h.cumulative() {
        let le = if bound.is_infinite() { "+Inf".to_string() } else { bound.to_string() };
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count());
}

/// Renders node metrics, requests refused before reaching a model (by HTTP status), and
/// the active version.
pub fn render(metrics: &NodeMetrics, rejected: &BTreeMap<u16, u64>, active: Option<(&str, u64)>) -> String {
    let mut out = String::new();
    let rows: Vec<(String, &VersionMetrics)> = metrics
        .iter()
        .map(|(model, version, m)| (format!("model=\"{}\",version=\"{version}\"", escape(model)), m))
        .collect();
    let counters: [Counter; 4] = [
        ("slmesh_requests_total", "Requests that reached a model.", |m| m.requests),
        ("slmesh_request_errors_total", "Requests that failed on the model's side.", |m| m.errors),
        ("slmesh_prompt_tokens_total", "Prompt tokens processed.", |m| m.prompt_tokens),
        ("slmesh_completion_tokens_total", "Completion tokens generated.", |m| m.completion_tokens),
    ];
    for (name, help, get) in counters {
        header(&mut out, name, "counter", help);
        for (labels, m) in &rows {
            let _ = writeln!(out, "{name}{{{labels}}} {}", get(m));
        }
    }
    header(&mut out, "slmesh_request_latency_seconds", "histogram", "Whole-request latency, queueing included.");
    for (labels, m) in &rows {
        histogram(&mut out, "slmesh_request_latency_seconds", labels, &m.latency_histogram);
    }
    header(&mut out, "slmesh_time_to_first_token_seconds", "histogram", "Time to the first generated token.");
    for (labels, m) in &rows {
        histogram(&mut out, "slmesh_time_to_first_token_seconds", labels, &m.ttft_histogram);
    }
    header(&mut out, "slmesh_tokens_per_second", "summary", "Decode speed per request.");
    for (labels, m) in &rows {
        for q in [0.5, 0.95] {
            if let Some(v) = m.tokens_per_sec.quantile(q) {
                let _ = writeln!(out, "slmesh_tokens_per_second{{{labels},quantile=\"{q}\"}} {v}");
            }
        }
        let _ = writeln!(out, "slmesh_tokens_per_second_sum{{{labels}}} {}", m.tokens_per_sec.sum());
        let _ = writeln!(out, "slmesh_tokens_per_second_count{{{labels}}} {}", m.tokens_per_sec.count());
    }
    header(&mut out, "slmesh_http_rejected_total", "counter", "Requests refused before reaching a model, by status.");
    for (code, n) in rejected {
        let _ = writeln!(out, "slmesh_http_rejected_total{{code=\"{code}\"}} {n}");
    }
    header(&mut out, "slmesh_active_model", "gauge", "1 for the version this node serves.");
    if let Some((model, version)) = active {
        let _ = writeln!(out, "slmesh_active_model{{model=\"{}\",version=\"{version}\"}} 1", escape(model));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use slmesh_protocol::metrics::RequestSample;

    #[test]
    fn renders_prometheus_text() {
        let mut m = NodeMetrics::default();
        m.record(
            "smol\"lm",
            3,
            &RequestSample {
                latency_secs: 0.2,
                ttft_secs: Some(0.04),
                prompt_tokens: 7,
                completion_tokens: 9,
                tokens_per_sec: Some(40.0),
                error: false,
            },
        );
        let text = render(&m, &[(400u16, 2u64)].into(), Some(("smol\"lm", 3)));
        let labels = "model=\"smol\\\"lm\",version=\"3\"";
        assert!(text.contains(&format!("slmesh_requests_total{{{labels}}} 1")), "{text}");
        assert!(text.contains(&format!("slmesh_completion_tokens_total{{{labels}}} 9")));
        assert!(text.contains(&format!("slmesh_request_latency_seconds_bucket{{{labels},le=\"0.25\"}} 1")));
        assert!(text.contains(&format!("slmesh_request_latency_seconds_bucket{{{labels},le=\"0.1\"}} 0")));
        assert!(text.contains(&format!("slmesh_time_to_first_token_seconds_bucket{{{labels},le=\"0.05\"}} 1")));
        assert!(text.contains("slmesh_http_rejected_total{code=\"400\"} 2"));
        assert!(text.contains("# TYPE slmesh_request_latency_seconds histogram"));
    }
}
