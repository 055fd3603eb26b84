//! Shared test helpers: where the offline test models live. A missing model fails the test with
//! a message naming the script that fetches it; tests never skip.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

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

/// A fixture folder copied from shared/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `max |a − b|` over all elements (as f32); the shapes must agree.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a.to_dtype(candle_core::DType::F32).unwrap()
        - b.to_dtype(candle_core::DType::F32).unwrap())
    .unwrap();
    d.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs the binary expecting success; on failure the assertion shows both output streams.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().expect("run candle-peft");
    assert!(
        out.status.success(),
        "candle-peft failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the binary expecting a clean failure: exit 1, `error: …` on stderr, no panic.
pub fn run_err(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("run candle-peft");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    stderr
}

/// The `candle-peft` binary, with the hub offline (tests never reach the network).
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_candle-peft"));
    cmd.env("HF_HUB_OFFLINE", "1");
    cmd
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
