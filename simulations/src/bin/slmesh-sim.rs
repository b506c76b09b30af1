//! `slmesh-sim run SCENARIO.toml`: runs a scenario and writes its report (JSON, Markdown,
//! SVG) next to it or into `--out`.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Instant;

#[global_allocator]
static ALLOCATOR: slmesh_sim::Allocator = slmesh_sim::Allocator;

#[derive(Parser)]
#[command(
    name = "slmesh-sim",
    version,
    about = "Try a rollout plan on thousands of simulated nodes before a real fleet sees it."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario file; the same seed gives a byte-identical report.
    Run {
        scenario: PathBuf,
        /// Folder for report.json, report.md, coverage.svg, origin.svg and gates.svg
        /// (default: next to the scenario, named after it).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    slmesh_sim::keep_freed_memory();
    let Command::Run { scenario, out } = Cli::parse().command;
    let text = std::fs::read_to_string(&scenario).with_context(|| format!("cannot read {}", scenario.display()))?;
    let sc = slmesh_sim::Scenario::parse(&text)
        .map_err(|e| anyhow::anyhow!("{} is not a valid scenario: {e}", scenario.display()))?;
    let out = out.unwrap_or_else(|| scenario.with_extension("report"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    eprintln!("running {} ({} nodes) ...", sc.name, sc.nodes());
    let started = Instant::now();
    let report = slmesh_sim::run_with_progress(sc, |t, events| {
        eprint!(
            "\r  simulated {t:>7.1} s, {events:>10} events, {:>6.1} s of wall time",
            started.elapsed().as_secs_f64()
        );
    });
    eprintln!();
    let wall = started.elapsed().as_secs_f64();
    eprintln!("{} events in {wall:.2} s ({:.0} events/s)", report.events, report.events as f64 / wall);
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    let md = slmesh_sim::report::markdown(&report);
    std::fs::write(out.join("report.md"), &md)?;
    std::fs::write(out.join("coverage.svg"), slmesh_sim::report::coverage_svg(&report).map_err(anyhow::Error::msg)?)?;
    std::fs::write(out.join("origin.svg"), slmesh_sim::report::origin_svg(&report).map_err(anyhow::Error::msg)?)?;
    std::fs::write(out.join("gates.svg"), slmesh_sim::report::gates_svg(&report).map_err(anyhow::Error::msg)?)?;
    print!("{md}");
    println!("\nwritten to {}", out.display());
    Ok(())
}
