//! `candle-peft`: the command-line interface. Each subcommand lives in `cli/<name>.rs`; this file
//! only parses the arguments and reports errors as `error: …` with exit status 1.

mod cli;

// Training allocates and frees activation-sized buffers at every op. glibc's malloc hands large
// ones back to the kernel, so each step page-faults them in again; mimalloc keeps them
// (measured on minilm-lora-train: ~15% faster steps).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

/// Runtime settings read from the environment, set here unless the user set them:
/// - mimalloc reads its options the first time it needs them, which for these two comes after
///   this point. Purging freed pages (by default 10 ms after a free) makes every training step
///   fault and zero its activation buffers again; transparent huge pages (madvise) cut the faults
///   that remain.
/// - candle runs element-wise ops on its own spinning thread pool beside the rayon pool gemm
///   uses. On two cores the two pools take turns spinning on each other's core; keeping
///   element-wise ops on the calling thread is faster there (minilm-lora-train, 2 cores: ~5%).
fn tune_runtime() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut settings = vec![
        ("MIMALLOC_PURGE_DELAY", "-1"),
        ("MIMALLOC_LARGE_OS_PAGES", "1"),
    ];
    if cores <= 2 {
        settings.push(("CANDLE_NUM_THREADS", "1"));
    }
    for (name, value) in settings {
        if std::env::var_os(name).is_none() {
            // SAFETY: called first thing in main, before any other thread exists.
            unsafe { std::env::set_var(name, value) };
        }
    }
}

fn main() {
    tune_runtime();
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
