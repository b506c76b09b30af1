//! `slmesh publish --wait`: follows a rollout through a node's API, with progress bars,
//! until it completes (every wave open and the last one soaked), halts, or times out.

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use slmesh_protocol::node::WaveProgress;
use slmesh_protocol::rollout::RolloutPlan;
use std::time::{Duration, Instant};

/// How a followed rollout ended; the process exits with `code()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Completed,
    Halted(String),
    TimedOut,
}

impl Ending {
    pub fn code(&self) -> i32 {
        match self {
            Ending::Completed => 0,
            Ending::Halted(_) => 2,
            Ending::TimedOut => 3,
        }
    }
}

/// One look at the rollout through the node's API.
struct Seen {
    waves_open: usize,
    opened_at: Vec<u64>,
    verdict: String,
    halted: Option<String>,
    paused: bool,
    /// Per wave: nodes known in it, and the estimate of nodes staged and serving.
    known_per_wave: Vec<u64>,
    per_wave: Vec<WaveProgress>,
}

fn look(addr: &str, token: &Option<String>, model: &str, version: u64) -> Result<Option<Seen>> {
    let rollouts = crate::client::get(addr, token, "/v1/rollouts")?;
    let Some(r) = rollouts["rollouts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["model"] == model && r["version"].as_u64() == Some(version))
    else {
        return Ok(None);
    };
    let verdict = match (r["verdict"]["verdict"].as_str(), r["verdict"]["reason"].as_str()) {
        (Some(v), Some(why)) => format!("{v}: {why}"),
        (Some(v), None) => v.to_string(),
        _ => String::new(),
    };
    Ok(Some(Seen {
        waves_open: r["waves_open"].as_u64().unwrap_or(0) as usize,
        opened_at: r["opened_at"].as_array().into_iter().flatten().filter_map(|t| t.as_u64()).collect(),
        verdict,
        halted: r["halted"].as_str().map(String::from),
        paused: r["paused"].as_bool().unwrap_or(false),
        known_per_wave: r["known_per_wave"].as_array().into_iter().flatten().filter_map(|n| n.as_u64()).collect(),
        per_wave: serde_json::from_value(r["per_wave"].clone()).unwrap_or_default(),
    }))
}

/// Follows `model@version` on the node at `addr` until it completes, halts or `timeout`
/// passes. Progress goes to standard error (bars on a terminal, nothing otherwise); the
/// ending is printed to standard output.
pub fn follow(
    addr: &str,
    token: &Option<String>,
    model: &str,
    version: u64,
    plan: &RolloutPlan,
    timeout: Duration,
) -> Result<Ending> {
    let start = Instant::now();
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
        .context("progress bar template")?
        .progress_chars("=> ");
    let waves = bars.add(ProgressBar::new(plan.waves.len() as u64).with_style(style.clone()).with_prefix("waves"));
    // One bar per wave: nodes serving the version out of the nodes known in the wave
    // (or the estimate, when larger), with the staged ones beside.
    let per_wave: Vec<ProgressBar> = (1..=plan.waves.len())
        .map(|w| bars.add(ProgressBar::new(0).with_style(style.clone()).with_prefix(format!("wave {w}"))))
        .collect();
    // Bytes this node has sent to fetchers since the publish: the origin's share of the
    // spread (peers fetch from each other too, which no single node sees).
    let sent = bars.add(
        ProgressBar::new(0)
            .with_style(ProgressStyle::with_template("{prefix:>8} {msg}").context("progress bar template")?)
            .with_prefix("sent"),
    );
    let uploaded = |addr: &str| -> Option<u64> {
        crate::client::get(addr, token, "/v1/status").ok().and_then(|s| s["uploaded_bytes"].as_u64())
    };
    let uploaded_at_start = uploaded(addr).unwrap_or(0);
    let last_soak = plan.waves.last().map_or(0, |w| w.soak_secs);
    let ending = loop {
        if start.elapsed() >= timeout {
            break Ending::TimedOut;
        }
        match look(addr, token, model, version) {
            Ok(Some(seen)) => {
                let now = crate::keys::unix_now()?;
                waves.set_position(seen.waves_open as u64);
                let soak = match (seen.opened_at.last(), plan.waves.get(seen.waves_open.saturating_sub(1))) {
                    (Some(at), Some(w)) => {
                        let left = at.saturating_add(w.soak_secs).saturating_sub(now);
                        if left > 0 {
                            format!(", wave {} soaking {left} s more", seen.waves_open)
                        } else {
                            String::new()
                        }
                    }
                    _ => String::new(),
                };
                let paused = if seen.paused { " (paused)" } else { "" };
                waves.set_message(format!("gates {}{soak}{paused}", seen.verdict));
                for (i, bar) in per_wave.iter().enumerate() {
                    let progress = seen.per_wave.get(i).copied().unwrap_or_default();
                    let known = seen.known_per_wave.get(i).copied().unwrap_or(0);
                    bar.set_length(known.max(progress.staged.saturating_add(progress.serving)));
                    bar.set_position(progress.serving);
                    bar.set_message(format!("serving, {} staged", progress.staged));
                }
                if let Some(now_sent) = uploaded(addr) {
                    let bytes = indicatif::HumanBytes(now_sent.saturating_sub(uploaded_at_start));
                    sent.set_message(format!("{bytes} uploaded by this node to its peers since publishing"));
                }
                if let Some(why) = seen.halted {
                    break Ending::Halted(why);
                }
                let all_open = seen.waves_open >= plan.waves.len();
                let soaked = seen.opened_at.last().is_some_and(|t| now >= t.saturating_add(last_soak));
                if all_open && soaked {
                    break Ending::Completed;
                }
            }
            Ok(None) => waves.set_message("waiting for the node to take the manifest"),
            Err(e) => waves.set_message(format!("cannot reach the node: {e:#}")),
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    waves.finish();
    per_wave.iter().for_each(ProgressBar::finish);
    sent.finish();
    match &ending {
        Ending::Completed => println!("{model}@{version}: rollout completed, every wave open and soaked"),
        Ending::Halted(why) => println!("{model}@{version}: rollout HALTED: {why}"),
        Ending::TimedOut => println!("{model}@{version}: still rolling out after {} s (--timeout)", timeout.as_secs()),
    }
    Ok(ending)
}
