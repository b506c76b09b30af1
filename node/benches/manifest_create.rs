//! BLAKE3 of the demo GGUF by `slmesh manifest create`, against the `b3sum` tool on the
//! same file in the same run (the baseline). Both read from a warm page cache.
//!
//! Run: `cargo install b3sum && cargo bench -p slmesh --bench manifest_create`
//! (the demo model is fetched by tests/fetch-demo-model.sh, or set SLMESH_DEMO_GGUF).

use std::process::Command;
use std::time::Instant;

fn time_secs(mut cmd: Command) -> f64 {
    let start = Instant::now();
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    start.elapsed().as_secs_f64()
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let gguf = slmesh_e2e::demo_model();
    let size = std::fs::metadata(&gguf).expect("demo model").len();
    if Command::new("b3sum").arg("--version").output().is_err() {
        eprintln!("b3sum is not installed: cargo install b3sum");
        std::process::exit(1);
    }
    let _ = std::fs::read(&gguf); // warm the page cache
                                  // Runs alternate between the two commands, so that drift in the machine's speed
                                  // (seen here: b3sum itself between 14 and 23 ms over an hour) falls on both alike.
    let runs = 21;
    let (mut b3sum_times, mut slmesh_times) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut b3sum = Command::new("b3sum");
        b3sum.arg(&gguf);
        b3sum_times.push(time_secs(b3sum));
        let mut slmesh = Command::new(env!("CARGO_BIN_EXE_slmesh"));
        slmesh.args(["manifest", "create", "--name", "bench", "--version", "1"]).arg(&gguf);
        slmesh_times.push(time_secs(slmesh));
    }
    let (b3sum, slmesh) = (median(b3sum_times), median(slmesh_times));
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
