//! CPU runtime settings for training processes: the allocator's page retention and candle's
//! element-wise thread pool. Binaries and examples call [`tune_cpu_runtime`] first thing in
//! `main`, before any other thread exists; the library itself never calls it.
//!
//! candle reads its thread counts from `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS` and has no
//! other way to set them, so the thread settings are environment variables. Writing the
//! environment races with any other thread reading it (in Rust or in C), which is why
//! [`tune_cpu_runtime`] is `unsafe`.

/// Applies the settings below, each unless the user chose otherwise through the environment:
///
/// - mimalloc (when it is the global allocator): never purge freed pages and allow large OS
///   pages. A training step frees and reallocates activation-sized buffers at every op; with
///   purging on (mimalloc v3 waits 1 s by default, and a step takes longer), every step faults
///   and zeroes those pages again. mimalloc v3 reads its `MIMALLOC_*` variables before `main`,
///   so they are set through `mi_option_set` here; an explicit `MIMALLOC_PURGE_DELAY` or
///   `MIMALLOC_ALLOW_LARGE_OS_PAGES` in the environment wins.
/// - candle asks for its thread count at every matmul; without `RAYON_NUM_THREADS` it counts
///   physical cores again each time, which on Linux reads `/proc/cpuinfo` (smollm2-lora-train,
///   2 cores: ~10% of the step). Setting it to that count, taken once, gives
///   the same threads.
/// - candle runs element-wise ops on its own spinning thread pool beside the rayon pool gemm
///   uses. On two cores the two pools take turns spinning on each other's core; keeping
///   element-wise ops on the calling thread is faster there (minilm-lora-train: ~5%).
///   `CANDLE_NUM_THREADS` is read once, when that pool starts, so this must run before the
///   first tensor op.
///
/// Setting mimalloc's options is harmless when another allocator is in use: they only change
/// what mimalloc would do.
///
/// # Safety
///
/// No other thread may exist while this runs (it calls [`std::env::set_var`]): call it first
/// thing in `main`, before anything that may start a thread (a tensor op, a rayon or tokio
/// pool, a test harness). A library or a `#[test]` must not call it.
pub unsafe fn tune_cpu_runtime() {
    use libmimalloc_sys::{mi_option_large_os_pages, mi_option_set, mi_option_t};
    // `mi_option_purge_delay` in mimalloc v3's `mi_option_e`; libmimalloc-sys 0.1.49 exports no
    // constant for it.
    const MI_OPTION_PURGE_DELAY: mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set only stores an integer in mimalloc's option table.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    if std::env::var_os("MIMALLOC_ALLOW_LARGE_OS_PAGES").is_none()
        && std::env::var_os("MIMALLOC_LARGE_OS_PAGES").is_none()
    {
        // SAFETY: as above.
        unsafe { mi_option_set(mi_option_large_os_pages, 1) };
    }
    // candle's own count (physical cores unless RAYON_NUM_THREADS says otherwise), taken once.
    let threads = candle_core::utils::get_num_threads();
    let mut settings = vec![("RAYON_NUM_THREADS", threads.to_string())];
    if threads <= 2 {
        settings.push(("CANDLE_NUM_THREADS", "1".to_string()));
    }
    for (name, value) in settings {
        if std::env::var_os(name).is_none() {
            // SAFETY: the caller guarantees that no other thread exists (see `# Safety`).
            unsafe { std::env::set_var(name, value) };
        }
    }
}
