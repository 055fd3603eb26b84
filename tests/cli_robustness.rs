//! The CLI under bad input and faults: an oversized batch, a locked or reused `--out`, stale and
//! foreign checkpoints, unwritable outputs, non-finite or integer adapter weights, disagreeing
//! label maps, misleading messages and help texts, resume with dropout, and the data-parallel
//! flags.
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use common::{bin, run_err, run_ok};

const KEY: &str = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight";

fn minilm() -> String {
    common::minilm_dir().display().to_string()
}

fn json_line(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// `train --task classify` on MiniLM with small settings and no progress output, plus `extra`.
fn train(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = train_loud(data, out, extra);
    cmd.arg("--quiet");
    cmd
}

/// [`train`] with its progress output.
fn train_loud(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.args([
        "train",
        "--model",
        &minilm(),
        "--task",
        "classify",
        "--data",
    ])
    .arg(data)
    .args(["--method", "lora", "--out"])
    .arg(out)
    .args(["--json", "--lr", "2e-3", "--warmup", "0"]);
    if !extra.contains(&"--batch") {
        cmd.args(["--batch", "4"]);
    }
    cmd.args(extra);
    cmd
}

/// An adapter written by `train --steps 0` into `dir/adapter`.
fn fresh_adapter(data: &Path, dir: &Path) -> PathBuf {
    run_ok(&mut train(data, dir, &["--steps", "0"]));
    dir.join("adapter")
}

/// Replaces tensor `key` of the adapter's weights file.
fn replace_tensor(adapter: &Path, key: &str, t: Tensor) {
    let path = adapter.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert!(tensors.contains_key(key), "{key} not in {}", path.display());
    tensors.insert(key.to_string(), t);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn batch_larger_than_the_data_is_capped_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::sst2_subset(tmp.path(), "train.tsv", 12);
    let out = run_ok(&mut train_loud(
        &data,
        &tmp.path().join("out"),
        &["--batch", "1000000", "--steps", "2"],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("batch_size 1000000 is larger than the 12 training examples"),
        "{stderr}"
    );
    assert_eq!(json_line(&out)["steps"], 2);
}

#[test]
fn out_is_locked_while_a_run_writes_to_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::sst2_subset(tmp.path(), "train.tsv", 8);
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let lock = out.join(".candle-peft.lock");

    // Held by a live process.
    let mut holder = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = holder.id();
    fs::write(&lock, format!("pid={pid}\nstart=0\nhost={}\n", host_name())).unwrap();
    let e = run_err(&mut train(&data, &out, &["--steps", "1"]));
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(e.contains(&out.display().to_string()), "{e}");
    assert!(
        e.contains(&format!("in use by another run (process {pid}")),
        "{e}"
    );
    assert!(!out.join("adapter").exists(), "the refused run wrote");

    // Left behind by a process that is gone: reclaimed, and removed when the run ends.
    run_ok(&mut train(&data, &out, &["--steps", "1"]));
    assert!(!lock.exists());
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
}

#[test]
fn stale_and_foreign_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::sst2_subset(tmp.path(), "train.tsv", 16);
    let other = tmp.path().join("other.tsv");
    fs::write(&other, fs::read_to_string(&data).unwrap() + "1\tone more\n").unwrap();
    let out = tmp.path().join("out");
    run_ok(&mut train(
        &data,
        &out,
        &["--steps", "2", "--checkpoint-every", "1"],
    ));
    let adapter_before = fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();

    // A fresh run into the folder.
    let e = run_err(&mut train(&data, &out, &["--steps", "3"]));
    assert!(e.contains("holds checkpoints of another run"), "{e}");
    assert!(
        e.contains("checkpoint-1, checkpoint-2") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(
        fs::read(out.join("adapter/adapter_model.safetensors")).unwrap(),
        adapter_before
    );

    // A resume by a run with other data.
    let e = run_err(&mut train(&other, &out, &["--steps", "3", "--resume"]));
    assert!(
        e.contains("`data`") && e.contains("belongs to another run"),
        "{e}"
    );
    // A resume with fewer steps than the checkpoint has done.
    let e = run_err(&mut train(&data, &out, &["--steps", "1", "--resume"]));
    assert!(
        e.contains("`steps`") && e.contains("at step 2, beyond this run's 1 steps"),
        "{e}"
    );

    // An impossible position.
    let state_file = out.join("checkpoint-2/trainer_state.json");
    let mut state: Value = serde_json::from_str(&fs::read_to_string(&state_file).unwrap()).unwrap();
    state["position"] = 999.into();
    fs::write(&state_file, state.to_string()).unwrap();
    let e = run_err(&mut train(&data, &out, &["--steps", "3", "--resume"]));
    assert!(
        e.contains("`position`") && e.contains(&state_file.display().to_string()),
        "{e}"
    );

    // A checkpoint without trainer_state.json, named or found as the latest.
    fs::remove_file(&state_file).unwrap();
    for resume in [out.join("checkpoint-2"), out.clone()] {
        let e = run_err(&mut train(
            &data,
            &out,
            &["--steps", "3", "--resume", resume.to_str().unwrap()],
        ));
        assert!(e.contains(&state_file.display().to_string()), "{e}");
        assert!(e.contains("missing (the checkpoint is incomplete"), "{e}");
    }

    // --overwrite starts afresh and removes the old checkpoints.
    run_ok(&mut train(&data, &out, &["--steps", "1", "--overwrite"]));
    assert!(!out.join("checkpoint-1").exists() && !out.join("checkpoint-2").exists());
}

#[test]
fn world_size_flags_are_checked_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::sst2_subset(tmp.path(), "train.tsv", 8);
    let out = tmp.path().join("run");
    let cases: [(&[&str], &str); 4] = [
        (
            &["--world-size", "0"],
            "--world-size must be at least 1 (got 0)",
        ),
        (
            &["--world-rank", "1"],
            "--world-rank is set by `--world-size`'s launcher",
        ),
        (
            &["--world-size", "2", "--world-rank", "2"],
            "--world-rank 2 is not below --world-size 2",
        ),
        // This suite's binary is the CPU build.
        (
            &["--world-size", "2"],
            "needs a binary built with `--features nccl`",
        ),
    ];
    for (flags, expected) in cases {
        let e = run_err(&mut train(&data, &out, flags));
        assert!(e.contains(expected), "{flags:?}: {e}");
        assert!(!out.exists(), "{flags:?} touched --out");
    }
}

#[test]
fn unwritable_outputs_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::sst2_subset(tmp.path(), "train.tsv", 8);
    let file = tmp.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let under_file = file.join("out");

    let started = std::time::Instant::now();
    let e = run_err(&mut train(&data, &under_file, &["--steps", "1000"]));
    assert!(e.contains(&under_file.display().to_string()), "{e}");
    assert!(e.contains("is a file, not a folder"), "{e}");
    println!("train --out under a file: {e} ({:?})", started.elapsed());

    let e = run_err(
        bin()
            .args(["eval", "--model", &minilm(), "--data"])
            .arg(&data)
            .arg("--predictions")
            .arg(file.join("predictions.txt")),
    );
    assert!(e.contains("--predictions"), "{e}");
    assert!(
        e.contains(&file.join("predictions.txt").display().to_string()),
        "{e}"
    );
    assert!(e.contains("is a file, not a folder"), "{e}");

    let adapter = fresh_adapter(&data, &tmp.path().join("run"));
    let e = run_err(
        bin()
            .args(["merge", "--base", &minilm(), "--adapter"])
            .arg(&adapter)
            .arg("--out")
            .arg(&under_file),
    );
    assert!(
        e.contains("--out") && e.contains("is a file, not a folder"),
        "{e}"
    );
}

#[test]
fn non_finite_and_integer_adapter_weights_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::sst2_subset(tmp.path(), "train.tsv", 8);
    let adapter = fresh_adapter(&data, &tmp.path().join("run"));
    let shape =
        candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap()[KEY]
            .dims()
            .to_vec();
    let n: usize = shape.iter().product();
    let merged = tmp.path().join("merged");
    let cases = [
        (
            "NaN",
            Tensor::from_vec(vec![f32::NAN; n], shape.as_slice(), &Device::Cpu).unwrap(),
        ),
        (
            "inf",
            Tensor::from_vec(vec![f32::INFINITY; n], shape.as_slice(), &Device::Cpu).unwrap(),
        ),
        (
            "I32",
            Tensor::ones(shape.as_slice(), DType::I32, &Device::Cpu).unwrap(),
        ),
    ];
    for (what, t) in cases {
        replace_tensor(&adapter, KEY, t);
        let eval = run_err(
            bin()
                .args(["eval", "--model", &minilm(), "--adapter"])
                .arg(&adapter)
                .arg("--data")
                .arg(&data),
        );
        let merge = run_err(
            bin()
                .args(["merge", "--base", &minilm(), "--adapter"])
                .arg(&adapter)
                .arg("--out")
                .arg(&merged),
        );
        let inspect = run_err(bin().arg("inspect").arg(&adapter));
        for (cmd, e) in [("eval", &eval), ("merge", &merge), ("inspect", &inspect)] {
            println!("{what} {cmd}: {e}");
            assert!(e.contains(KEY) && e.contains(what), "{cmd}: {e}");
        }
        assert!(
            !merged.join("model.safetensors").exists(),
            "merge wrote weights"
        );
    }
}

#[test]
fn labels_json_whose_maps_disagree_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::sst2_subset(tmp.path(), "train.tsv", 8);
    let adapter = fresh_adapter(&data, &tmp.path().join("run"));
    let path = adapter.join("labels.json");
    let mut labels: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(labels["id2label"]["0"], "0");
    labels["label2id"] = serde_json::json!({"0": 1, "1": 0});
    fs::write(&path, labels.to_string()).unwrap();
    let e = run_err(
        bin()
            .args(["eval", "--model", &minilm(), "--adapter"])
            .arg(&adapter)
            .arg("--data")
            .arg(&data),
    );
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(
        e.contains("label2id maps `0` to 1, but id2label names id 1 `1`"),
        "{e}"
    );
}

#[test]
fn messages_and_help_texts_say_the_right_thing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::sst2_subset(tmp.path(), "train.tsv", 8);
    let gguf = common::smollm2_gguf().display().to_string();

    // A GGUF file is no classification model.
    let mut cmd = bin();
    cmd.args(["train", "--model", &gguf, "--task", "classify", "--data"])
        .arg(&data)
        .args(["--method", "lora", "--steps", "1", "--out"])
        .arg(tmp.path().join("gguf-out"));
    let e = run_err(&mut cmd);
    assert!(
        e.contains("is a GGUF file") && e.contains("not a BERT classification model"),
        "{e}"
    );
    assert!(!e.contains("UTF-8"), "{e}");
    let e = run_err(bin().args(["eval", "--model", &gguf, "--data"]).arg(&data));
    assert!(e.contains("is a GGUF file"), "{e}");

    // --seq beyond the model's positions: the same error in train and eval.
    let reason = |e: &str| {
        e[e.find("invalid config").unwrap_or(0)..]
            .trim()
            .to_string()
    };
    let t = run_err(&mut train(
        &data,
        &tmp.path().join("seq-out"),
        &["--steps", "1", "--seq", "100000"],
    ));
    let adapter = fresh_adapter(&data, &tmp.path().join("run"));
    let v = run_err(
        bin()
            .args(["eval", "--model", &minilm(), "--seq", "100000", "--adapter"])
            .arg(&adapter)
            .arg("--data")
            .arg(&data),
    );
    assert!(
        t.contains("100000 is longer than the model's context (512 positions)"),
        "{t}"
    );
    assert_eq!(reason(&t), reason(&v));

    // generate --help names exactly the fields generate --json prints.
    let help =
        String::from_utf8_lossy(&run_ok(bin().args(["generate", "--help"])).stdout).into_owned();
    let out = run_ok(bin().args([
        "generate",
        "--model",
        &gguf,
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "1",
        "--json",
    ]));
    let printed = json_line(&out);
    let mut keys: Vec<&String> = printed.as_object().unwrap().keys().collect();
    keys.sort();
    let promised = help
        .split_once("Print one JSON line: {")
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(fields, _)| fields)
        .unwrap_or_else(|| panic!("no JSON fields in generate --help: {help}"));
    let mut promised: Vec<String> = promised
        .split(',')
        .map(|f| f.trim().trim_matches('"').to_string())
        .collect();
    promised.sort();
    assert_eq!(keys, promised.iter().collect::<Vec<_>>(), "{help}");

    // bench --help lists every workload.
    let help =
        String::from_utf8_lossy(&run_ok(bin().args(["bench", "--help"])).stdout).into_owned();
    for w in [
        "minilm-lora-train",
        "smollm2-lora-train",
        "smollm2-merge",
        "svd-init-smollm2",
        "eva-corda-init-smollm2",
        "eva-init-smollm2",
        "corda-init-smollm2",
    ] {
        assert!(help.contains(w), "{w} missing from bench --help: {help}");
    }
    let e = run_err(bin().args(["bench", "no-such-workload"]));
    assert!(e.contains("corda-init-smollm2"), "{e}");
}

/// LoRA dropout and the classifier's dropout are on; a run resumed from its step-2 checkpoint
/// writes the adapter of the uninterrupted 4-step run byte for byte.
#[test]
fn resume_with_dropout_is_bit_exact_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::sst2_subset(tmp.path(), "train.tsv", 16);
    let full = tmp.path().join("full");
    let flags = ["--steps", "4", "--dropout", "0.1"];
    let mut with_checkpoints = flags.to_vec();
    with_checkpoints.extend(["--checkpoint-every", "2"]);
    run_ok(&mut train(&data, &full, &with_checkpoints));
    let resumed = tmp.path().join("resumed");
    let mut resume = flags.to_vec();
    let from = full.join("checkpoint-2");
    resume.extend(["--resume", from.to_str().unwrap()]);
    let out = run_ok(&mut train(&data, &resumed, &resume));
    assert_eq!(json_line(&out)["steps"], 4);
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "labels.json",
    ] {
        assert!(
            fs::read(full.join("adapter").join(f)).unwrap()
                == fs::read(resumed.join("adapter").join(f)).unwrap(),
            "{f} differs after the resume"
        );
    }
    let state: Value =
        serde_json::from_str(&fs::read_to_string(from.join("trainer_state.json")).unwrap())
            .unwrap();
    assert!(
        state["rng_states"]["classifier.dropout"].is_string(),
        "{state}"
    );
}
