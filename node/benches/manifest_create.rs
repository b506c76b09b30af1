//! BLAKE3 of the demo GGUF by `slmesh manifest create`, against the `b3sum` tool on the
//! same file in the same run (the baseline). Both read from a warm page cache.
//!
//! Run: `cargo install b3sum && cargo bench -p slmesh --bench manifest_create`
//! (the demo model is fetched by tests/fetch-demo-model.sh, or set SLMESH_DEMO_GGUF).

use std::process::Command;
use std::time::Instant;

fn median_secs(mut cmd: impl FnMut() -> Command, runs: usize) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let out = cmd().output().expect("run");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn main() {
    let gguf = slmesh_e2e::demo_model();
    let size = std::fs::metadata(&gguf).expect("demo model").len();
    if Command::new("b3sum").arg("--version").output().is_err() {
        eprintln!("b3sum is not installed: cargo install b3sum");
        std::process::exit(1);
    }
    let _ = std::fs::read(&gguf); // warm the page cache
    let runs = 9;
    let b3sum = median_secs(
        || {
            let mut c = Command::new("b3sum");
            c.arg(&gguf);
            c
        },
        runs,
    );
    let slmesh = median_secs(
        || {
            let mut c = Command::new(env!("CARGO_BIN_EXE_slmesh"));
            c.args(["manifest", "create", "--name", "bench", "--version", "1"]).arg(&gguf);
            c
        },
        runs,
    );
    let mb = size as f64 / 1e6;
    println!("file: {} ({mb:.1} MB), median of {runs} runs each", gguf.display());
    println!("baseline b3sum:              {:>8.1} ms  ({:.0} MB/s)", b3sum * 1e3, mb / b3sum);
    println!("slmesh manifest create:      {:>8.1} ms  ({:.0} MB/s)", slmesh * 1e3, mb / slmesh);
    println!(
        "ratio slmesh / b3sum:        {:>8.2}    goal: <= 1.2 -> {}",
        slmesh / b3sum,
        if slmesh / b3sum <= 1.2 { "met" } else { "NOT met" }
    );
}
