//! Running the `candle-peft` binary from a test.

use std::process::Command;

/// The `candle-peft` binary, with the hub offline (tests never reach the network).
/// `$CANDLE_PEFT_BIN` overrides the binary cargo built (e.g. a copy taken right after the
/// build, when several checkouts share one target folder).
pub fn bin() -> Command {
    let exe = std::env::var_os("CANDLE_PEFT_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_candle-peft").into());
    let mut cmd = Command::new(exe);
    cmd.env("HF_HUB_OFFLINE", "1");
    cmd
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
