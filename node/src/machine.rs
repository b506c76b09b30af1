//! What this machine has, as the node reads it at start: memory and the SIMD that
//! the engine's fast kernels use.

/// Physical memory, from /proc/meminfo (0 where unknown: variants with a RAM minimum
/// then do not fit, and the serving defaults are those of a small machine, which is the
/// safe side).
pub fn total_ram_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo").ok().map_or(0, |t| mem_total_bytes(&t))
}

/// `MemTotal` of a /proc/meminfo text, in bytes (0 if absent or unreadable).
fn mem_total_bytes(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb.saturating_mul(1024))
}

/// Whether this CPU has the SIMD candle's fast quantised kernels use.
pub fn cpu_has_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx2");
    #[cfg(target_arch = "aarch64")]
    return true; // NEON is part of every aarch64 CPU.
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return false;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_from_meminfo_and_unknown_is_zero() {
        assert_eq!(mem_total_bytes("MemTotal:       24576000 kB\nMemFree: 1 kB\n"), 24_576_000 * 1024);
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), 0);
        assert_eq!(mem_total_bytes("MemTotal: lots kB\n"), 0);
        assert_eq!(mem_total_bytes(&format!("MemTotal: {} kB\n", u64::MAX)), u64::MAX);
        assert!(total_ram_bytes() > 0, "this machine has a /proc/meminfo");
    }
}
