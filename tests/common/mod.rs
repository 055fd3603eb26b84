//! The helpers every test target shares (each test file declares `mod common;`): where the
//! offline test models live (a missing model fails the test with a message naming the script
//! that fetches it; tests never skip), and the submodules below.
#![allow(dead_code, unused_imports)]

pub mod cli;
pub mod decomp;
pub mod grad;
pub mod llama;
pub mod tensors;
pub mod tiny;

pub use cli::{bin, run_err, run_ok};
pub use tensors::max_abs_diff;

use std::path::{Path, PathBuf};

/// `models/` at the repository root, or `$CANDLE_PEFT_MODELS`.
pub fn models_dir() -> PathBuf {
    match std::env::var_os("CANDLE_PEFT_MODELS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"),
    }
}

/// The all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer.json).
pub fn minilm_dir() -> PathBuf {
    let dir = models_dir().join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "MiniLM is missing at {}: run scripts/fetch-models.sh first",
        dir.display()
    );
    dir
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF file.
pub fn smollm2_gguf() -> PathBuf {
    let path = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "SmolLM2 is missing at {}: run scripts/fetch-models.sh first",
        path.display()
    );
    path
}

/// The Gemma 3 270M Q4_K_M GGUF file.
pub fn gemma3_gguf() -> PathBuf {
    let path = models_dir().join("gemma-3-270m-q4_k_m.gguf");
    assert!(
        path.is_file(),
        "Gemma 3 270M is missing at {}: run scripts/fetch-models.sh first",
        path.display()
    );
    path
}

/// A fixture folder under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The header line and the first `rows` examples of `data/sst2/<file>`, written to `dir/<file>`.
pub fn sst2_subset(dir: &Path, file: &str, rows: usize) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/sst2")
        .join(file);
    let text = std::fs::read_to_string(&source).unwrap();
    let lines: Vec<&str> = text.lines().take(rows + 1).collect();
    let path = dir.join(file);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}
