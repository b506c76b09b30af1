//! The node's kernel calibration (`slmesh_inference::calibrate`): measured once, then
//! remembered in `data_dir/kernels.json` for as long as the CPU, the engine's thread
//! count and this build stay the same.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

const FILE: &str = "kernels.json";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Remembered {
    /// What the figures hold for (`measured_on`): another CPU, thread count or build
    /// measures again.
    measured_on: String,
    ps_per_weight: BTreeMap<String, u32>,
}

/// This machine as the figures depend on it: the CPU's model, the engine's threads, this
/// build.
fn measured_on() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|t| t.parse::<usize>().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    format!("{cpu}; {threads} threads; slmesh {}", env!("CARGO_PKG_VERSION"))
}

/// The figures in `data_dir`, or measured now (about 2 s) and written there. Empty
/// if they cannot be measured: the table of fast kernels then decides.
pub fn remembered_or_measured(data_dir: &Path) -> BTreeMap<String, u32> {
    let path = data_dir.join(FILE);
    let on = measured_on();
    let kept = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Remembered>(&b).ok());
    if let Some(r) = kept.filter(|r| r.measured_on == on && !r.ps_per_weight.is_empty()) {
        return r.ps_per_weight;
    }
    let started = std::time::Instant::now();
    let ps_per_weight = slmesh_inference::calibrate::kernel_ps_per_weight();
    give_back_freed_memory();
    tracing::info!(
        secs = started.elapsed().as_secs_f64(), figures = ?ps_per_weight,
        "measured this CPU's kernels (picoseconds per weight), to choose among variants"
    );
    let record = Remembered { measured_on: on, ps_per_weight };
    let tmp = path.with_extension("json.tmp");
    let written = serde_json::to_vec_pretty(&record)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(file = %path.display(), "cannot remember the kernel figures (measured again next start): {e}");
    }
    record.ps_per_weight
}

/// The measurement allocates and frees 64 MiB a kind in blocks of a few MiB; glibc keeps
/// such freed blocks in its heap, which left an idle node about 70 MiB larger (116 MiB
/// against 44 in `tests/demo.sh`). Hand them back to the system.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns memory the allocator holds free; it touches no live
    // allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_measured_once_and_read_back_while_the_machine_is_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let first = remembered_or_measured(dir.path());
        assert!(first.contains_key("Q4_0"), "{first:?}");
        // Read back, not measured again: a figure changed in the file comes back as is.
        let path = dir.path().join(FILE);
        let mut kept: Remembered = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        kept.ps_per_weight.insert("Q4_0".into(), 7);
        std::fs::write(&path, serde_json::to_vec(&kept).unwrap()).unwrap();
        assert_eq!(remembered_or_measured(dir.path())["Q4_0"], 7);
        // Measured on another machine, or damaged: measured again.
        kept.measured_on = "another CPU".into();
        std::fs::write(&path, serde_json::to_vec(&kept).unwrap()).unwrap();
        assert_ne!(remembered_or_measured(dir.path())["Q4_0"], 7);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(remembered_or_measured(dir.path()).contains_key("Q4_0"));
    }
}
