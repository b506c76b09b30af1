//! slmesh patch: the engine's thread computes as one of the threads of a rayon pool.
//!
//! Every tensor operation on a CPU (each quantised product, each attention) splits its
//! work over rayon's pool. Called from the engine's thread, outside the pool, each one
//! handed its work to the pool's threads and slept until they finished: a few hundred
//! hand-overs and wake-ups per generated token, and on a two-core machine three threads
//! (the engine's and the pool's two) taking turns on two cores. As a thread of the pool,
//! the engine's thread works on its own share of each operation and the other threads
//! take the rest; the pool has as many threads in all as the global one (`--threads`).

/// Unless `MISTRALRS_ENGINE_IN_POOL` is "0", which restores the released behaviour (the
/// engine's thread outside the pool, flash attention in a pool of its own) so that
/// benchmarks compare the two in one run.
pub(crate) fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("MISTRALRS_ENGINE_IN_POOL").map_or(true, |v| v != "0"))
}

/// A pool of which the calling thread is one thread (the others are started); every
/// parallel operation this thread runs afterwards goes to it. Keep it for as long as the
/// thread computes. `None` (the operations go to the global pool as before) if rayon
/// cannot start the threads or it is turned off. Rayon leaks such a pool's bookkeeping
/// when it is dropped (a few KiB per engine started).
pub(crate) fn pool_with_this_thread() -> Option<rayon::ThreadPool> {
    if !enabled() {
        return None;
    }
    let threads = rayon::current_num_threads();
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .use_current_thread()
        .thread_name(|i| format!("mistralrs-engine-{i}"))
        .build()
    {
        Ok(pool) => Some(pool),
        Err(e) => {
            tracing::warn!("the engine computes in the global rayon pool: {e}");
            None
        }
    }
}
