//! `candle-peft train` and `eval` on all-MiniLM-L6-v2 and small SST-2 subsets: the merged export
//! predicts exactly what base + adapter predicts, runs are deterministic, `--steps 0` saves the
//! initial adapter, resume continues a run, and bad input fails with a message naming the
//! problem. Also the library's `ClassifyTask` under the `Trainer`.
mod common;
use common::bin;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use candle_peft::data::{read_tsv, read_tsv_with_labels};
use candle_peft::io::source;
use candle_peft::models::heads::BertForSequenceClassification;
use candle_peft::tasks::classify::{self, ClassifyTask};
use candle_peft::{DEFAULT_ADAPTER, LoraConfig, Schedule, TrainConfig, TrainTask, Trainer, Warmup};
use serde_json::Value;

use common::tensors::flat;
use common::{run_err, run_ok};

/// The one JSON line a `--json` run prints.
fn json_line(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one JSON line on stdout: {stdout}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {}", lines[0]))
}

fn sst2(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/sst2")
        .join(name)
}

/// `per_class` examples of each label of the SST-2 training file, in file order within a label,
/// written to `dir/balanced.tsv` (label 0 first).
fn balanced(dir: &Path, per_class: usize) -> PathBuf {
    let text = fs::read_to_string(sst2("train.tsv")).unwrap();
    let mut lines = vec!["label\tsentence".to_string()];
    for label in ["0\t", "1\t"] {
        lines.extend(
            text.lines()
                .skip(1)
                .filter(|l| l.starts_with(label))
                .take(per_class)
                .map(str::to_string),
        );
    }
    let path = dir.join("balanced.tsv");
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn minilm() -> String {
    common::minilm_dir().display().to_string()
}

/// `train` with the small settings every test here uses, plus `extra`.
fn train_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    train_cmd_on(&minilm(), data, out, extra)
}

fn train_cmd_on(model: &str, data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.args(["train", "--model", model, "--task", "classify", "--data"])
        .arg(data)
        .args(["--method", "lora", "--out"])
        .arg(out)
        .arg("--json");
    // Defaults for the flags `extra` does not give.
    for (flag, value) in [("--batch", "8"), ("--lr", "2e-3"), ("--warmup", "0")] {
        if !extra.contains(&flag) {
            cmd.args([flag, value]);
        }
    }
    cmd.args(extra);
    cmd
}

fn eval_json(model: &str, adapter: Option<&Path>, data: &Path, predictions: &Path) -> Value {
    let mut cmd = bin();
    cmd.args(["eval", "--model", model, "--data"])
        .arg(data)
        .arg("--predictions")
        .arg(predictions)
        .arg("--json");
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    json_line(&run_ok(&mut cmd))
}

fn safetensors(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn merged_export_evaluates_like_base_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    // Enough training that both labels are predicted.
    let train = balanced(tmp.path(), 32);
    let valid = common::sst2_subset(tmp.path(), "valid.tsv", 48);
    let out = tmp.path().join("run");
    let report = json_line(&run_ok(&mut train_cmd(
        &train,
        &out,
        &[
            "--steps",
            "8",
            "--lr",
            "1e-2",
            "--merge",
            "--eval-data",
            valid.to_str().unwrap(),
        ],
    )));
    println!("train: {report}");
    assert_eq!(report["steps"], 8);
    assert_eq!(report["losses"].as_array().unwrap().len(), 8);
    assert!(report["final_loss"].as_f64().unwrap().is_finite());
    assert_eq!(report["labels"], serde_json::json!(["0", "1"]));
    assert_eq!(report["eval"]["examples"], 48);

    let adapter = out.join("adapter");
    let merged = out.join("merged");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
    ] {
        assert!(adapter.join(f).is_file(), "{f} missing");
    }
    let config: Value =
        serde_json::from_str(&fs::read_to_string(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["modules_to_save"], serde_json::json!(["classifier"]));
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["query", "value"])
    );
    let merged_config: Value =
        serde_json::from_str(&fs::read_to_string(merged.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        merged_config["architectures"],
        serde_json::json!(["BertForSequenceClassification"])
    );
    assert_eq!(
        merged_config["id2label"],
        serde_json::json!({"0": "0", "1": "1"})
    );
    assert!(merged.join("tokenizer.json").is_file());

    let p_merged = tmp.path().join("merged.txt");
    let p_adapter = tmp.path().join("adapter.txt");
    let e_merged = eval_json(merged.to_str().unwrap(), None, &valid, &p_merged);
    let e_adapter = eval_json(&minilm(), Some(&adapter), &valid, &p_adapter);
    println!("eval merged: {e_merged}\neval base + adapter: {e_adapter}");
    for e in [&e_merged, &e_adapter] {
        let mut keys: Vec<&String> = e.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["accuracy", "examples", "loss"]);
        assert_eq!(e["examples"], 48);
        let acc = e["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
    assert_eq!(e_merged["accuracy"], e_adapter["accuracy"]);
    let dl = (e_merged["loss"].as_f64().unwrap() - e_adapter["loss"].as_f64().unwrap()).abs();
    assert!(dl <= 1e-4, "loss differs by {dl}");
    // The evaluation after training is the same computation as `eval` of base + adapter.
    assert_eq!(report["eval"]["accuracy"], e_adapter["accuracy"]);
    let preds_merged = fs::read_to_string(&p_merged).unwrap();
    let preds_adapter = fs::read_to_string(&p_adapter).unwrap();
    assert_eq!(preds_merged.lines().count(), 48);
    assert!(preds_merged.lines().all(|l| l == "0" || l == "1"));
    // Both labels are predicted, so "the same predictions" is not a constant.
    assert!(preds_merged.lines().any(|l| l == "0") && preds_merged.lines().any(|l| l == "1"));
    assert_eq!(
        preds_merged, preds_adapter,
        "per-example predictions differ"
    );

    // The merged folder is a base model for another run; its labels come from its config.
    let again = tmp.path().join("again");
    let r2 = json_line(&run_ok(&mut train_cmd_on(
        merged.to_str().unwrap(),
        &train,
        &again,
        &["--steps", "1"],
    )));
    assert_eq!(r2["steps"], 1);
    assert_eq!(r2["labels"], serde_json::json!(["0", "1"]));
}

#[test]
fn same_seed_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let train = common::sst2_subset(tmp.path(), "train.tsv", 32);
    let run = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        let r = json_line(&run_ok(&mut train_cmd(
            &train,
            &out,
            &["--steps", "3", "--batch", "4", "--seed", seed],
        )));
        let weights = safetensors(&out.join("adapter/adapter_model.safetensors"));
        (r, weights)
    };
    let (a, wa) = run("a", "5");
    let (b, wb) = run("b", "5");
    let (c, _) = run("c", "6");
    println!(
        "losses: {} / {} / {}",
        a["losses"], b["losses"], c["losses"]
    );
    assert_eq!(a["losses"], b["losses"]);
    assert_eq!(a["final_loss"], b["final_loss"]);
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    for (k, t) in &wa {
        assert_eq!(flat(t), flat(&wb[k]), "{k} differs between identical runs");
    }
    assert_ne!(a["losses"], c["losses"], "another seed gave the same run");
}

#[test]
fn steps_zero_saves_the_initial_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let train = common::sst2_subset(tmp.path(), "train.tsv", 16);
    let out = tmp.path().join("init");
    let r = json_line(&run_ok(&mut train_cmd(
        &train,
        &out,
        &["--steps", "0", "--seed", "7", "--rank", "4", "--alpha", "8"],
    )));
    assert_eq!(r["steps"], 0);
    assert!(r["final_loss"].is_null());
    assert_eq!(r["losses"], serde_json::json!([]));
    let names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["adapter"], "only the adapter is written");

    let saved = safetensors(&out.join("adapter/adapter_model.safetensors"));
    assert_eq!(saved.len(), 6 * 2 * 2 + 2);
    for (k, t) in &saved {
        if k.contains("lora_B") {
            assert!(flat(t).iter().all(|v| *v == 0.0), "{k} is not zero");
        } else if k.contains("lora_A") {
            assert_eq!(t.dims()[0], 4);
            assert!(flat(t).iter().any(|v| *v != 0.0), "{k} is zero");
        }
    }
    // Exactly the library's initialisation with the same seed.
    let src = source::resolve_local(&common::minilm_dir()).unwrap();
    let mut task = ClassifyTask::from_source(
        src.clone(),
        ["0", "1"],
        candle_peft::tasks::TaskOptions {
            seq_len: 128,
            seed: 7,
            ..Default::default()
        },
    )
    .unwrap();
    task.add_adapter(
        DEFAULT_ADAPTER,
        LoraConfig::new(&["query", "value"], 4, 8.0),
    )
    .unwrap();
    let expected = task.model().adapter_tensors(DEFAULT_ADAPTER).unwrap();
    assert_eq!(expected.len(), saved.len());
    for (k, t) in &expected {
        assert_eq!(flat(t), flat(&saved[k]), "{k} is not the initial value");
    }
    // The classifier is transformers' init for the seed: the one a fresh model draws.
    let (fresh, _) = BertForSequenceClassification::from_source(&src, 2, 7, &Device::Cpu).unwrap();
    assert_eq!(
        flat(&fresh.model().classifier().handle().weight().unwrap()),
        flat(&saved["base_model.model.classifier.weight"])
    );
    assert!(
        flat(&saved["base_model.model.classifier.bias"])
            .iter()
            .all(|v| *v == 0.0)
    );
}

#[test]
fn resume_continues_from_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let train = common::sst2_subset(tmp.path(), "train.tsv", 32);
    let first = tmp.path().join("first");
    let full = json_line(&run_ok(&mut train_cmd(
        &train,
        &first,
        &["--steps", "4", "--batch", "4", "--checkpoint-every", "2"],
    )));
    assert!(first.join("checkpoint-2/trainer_state.json").is_file());
    assert!(first.join("checkpoint-4/trainer_state.json").is_file());
    let second = tmp.path().join("second");
    let resumed = json_line(&run_ok(&mut train_cmd(
        &train,
        &second,
        &[
            "--steps",
            "4",
            "--batch",
            "4",
            "--resume",
            first.join("checkpoint-2").to_str().unwrap(),
        ],
    )));
    assert_eq!(resumed["steps"], 4);
    let (a, b) = (
        full["losses"].as_array().unwrap(),
        resumed["losses"].as_array().unwrap(),
    );
    assert_eq!(b.len(), 4);
    assert_eq!(a[..2], b[..2], "the history before the checkpoint is kept");
    assert!(second.join("adapter/adapter_model.safetensors").is_file());
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let good = common::sst2_subset(tmp.path(), "train.tsv", 16);
    let out = tmp.path().join("out");

    // A line without a tab: the message names file and line.
    let malformed = tmp.path().join("malformed.tsv");
    fs::write(
        &malformed,
        "label\tsentence\n0\ta dull film\nno tab on this line\n1\tfine\n",
    )
    .unwrap();
    let e = run_err(&mut train_cmd(&malformed, &out, &["--steps", "1"]));
    assert!(
        e.contains(&format!("{}:3", malformed.display())),
        "no file:line in {e}"
    );
    assert!(e.contains("tab"), "{e}");

    // Eval data with a label the training data does not have.
    let unknown = tmp.path().join("unknown.tsv");
    fs::write(&unknown, "0\tgood\n7\tbad\n").unwrap();
    let e = run_err(&mut train_cmd(
        &good,
        &out,
        &["--steps", "1", "--eval-data", unknown.to_str().unwrap()],
    ));
    assert!(e.contains(&format!("{}:2", unknown.display())), "{e}");
    assert!(e.contains("unknown label `7`"), "{e}");

    // An empty file, and a header without examples.
    let empty = tmp.path().join("empty.tsv");
    fs::write(&empty, "").unwrap();
    let e = run_err(&mut train_cmd(&empty, &out, &["--steps", "1"]));
    assert!(e.contains(&empty.display().to_string()), "{e}");
    assert!(e.contains("no examples"), "{e}");
    let header_only = tmp.path().join("header.tsv");
    fs::write(&header_only, "label\tsentence\n").unwrap();
    let e = run_err(&mut train_cmd(&header_only, &out, &["--steps", "1"]));
    assert!(e.contains("no examples"), "{e}");

    let e = run_err(&mut train_cmd(
        &good,
        &out,
        &["--steps", "1", "--batch", "0"],
    ));
    assert!(e.contains("--batch must be at least 1"), "{e}");

    let mut cmd = train_cmd(&good, &out, &["--steps", "1"]);
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let i = args.iter().position(|a| a == "--method").unwrap();
    let with_method = |m: &str| {
        let mut a = args.clone();
        a[i + 1] = m.to_string();
        let mut c = bin();
        c.args(&a);
        c
    };
    let e = run_err(&mut with_method("dora"));
    assert!(e.contains("unknown method `dora`"), "{e}");
    assert!(e.contains("lora, lora-pro, eva"), "{e}");
    cmd = bin();
    let mut a = args.clone();
    let t = a.iter().position(|x| x == "--task").unwrap();
    a[t + 1] = "causal-lm".into();
    // A BERT checkpoint is no causal LM: the error names its architecture.
    let e = run_err(cmd.args(&a));
    assert!(e.contains("Bert"), "{e}");

    // --out is an existing file.
    let file = tmp.path().join("a-file");
    fs::write(&file, "not a folder").unwrap();
    let e = run_err(&mut train_cmd(&good, &file, &["--steps", "1"]));
    assert!(e.contains(&file.display().to_string()), "{e}");
    assert!(e.contains("not a directory"), "{e}");
    assert_eq!(fs::read_to_string(&file).unwrap(), "not a folder");

    // eval: bad data and a missing adapter folder.
    let e = run_err(
        bin()
            .args(["eval", "--model", &minilm(), "--data"])
            .arg(&malformed),
    );
    assert!(e.contains(&format!("{}:3", malformed.display())), "{e}");
    let e = run_err(
        bin()
            .args(["eval", "--model", &minilm(), "--adapter"])
            .arg(tmp.path().join("nowhere"))
            .arg("--data")
            .arg(&good),
    );
    assert!(e.contains("nowhere"), "{e}");
}

/// The library path: `ClassifyTask` under the `Trainer` lowers the loss on the rows it trains on,
/// every trainable var gets a gradient, and a saved adapter reloads to the same predictions.
#[test]
fn classify_task_loss_decreases() {
    let train = read_tsv(sst2("train.tsv")).unwrap();
    let rows: Vec<_> = train.examples[..16].to_vec();
    let src = source::resolve_local(&common::minilm_dir()).unwrap();
    let mut task = ClassifyTask::from_source(
        src.clone(),
        &train.labels,
        candle_peft::tasks::TaskOptions {
            seq_len: 64,
            seed: 3,
            ..Default::default()
        },
    )
    .unwrap();
    task.add_adapter(
        DEFAULT_ADAPTER,
        LoraConfig::new(&["query", "value"], 8, 16.0),
    )
    .unwrap();
    assert_eq!(task.trainable_vars().len(), 6 * 2 * 2 + 2);
    let before = task.evaluate_full(&rows).unwrap();
    let report = Trainer::new(TrainConfig {
        steps: 8,
        batch_size: 8,
        lr: 2e-3,
        schedule: Schedule::Constant,
        warmup: Warmup::Steps(0),
        seed: 3,
        quiet: true,
        ..TrainConfig::default()
    })
    .unwrap()
    .run(&task, &rows, None)
    .unwrap();
    assert!(
        report.vars_without_grad.is_empty(),
        "{:?}",
        report.vars_without_grad
    );
    let after = task.evaluate_full(&rows).unwrap();
    println!(
        "loss {:.4} -> {:.4}, accuracy {:.3} -> {:.3}, step losses {:?}",
        before.loss, after.loss, before.accuracy, after.accuracy, report.losses
    );
    assert!(
        after.loss < before.loss - 0.05,
        "{} -> {}",
        before.loss,
        after.loss
    );
    assert!(
        !task.model().is_training(),
        "the trainer leaves eval mode on"
    );

    // Save, reload into a fresh model with another head seed: the same predictions.
    let dir = tempfile::tempdir().unwrap();
    task.save_adapter(dir.path()).unwrap();
    assert_eq!(
        classify::read_labels(dir.path()).unwrap(),
        Some(train.labels.clone())
    );
    let mut fresh = ClassifyTask::from_source(
        src.clone(),
        &train.labels,
        candle_peft::tasks::TaskOptions {
            seq_len: 64,
            seed: 99,
            ..Default::default()
        },
    )
    .unwrap();
    fresh.load_adapter(dir.path(), DEFAULT_ADAPTER).unwrap();
    let texts: Vec<&str> = rows.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(fresh.predict(&texts).unwrap(), after.predictions);

    // Eval data read with the training labels; an out-of-range id is refused.
    let valid = read_tsv_with_labels(sst2("valid.tsv"), &train.labels).unwrap();
    assert_eq!(valid.labels, train.labels);
    let mut bad = rows[..1].to_vec();
    bad[0].label = 5;
    assert!(task.evaluate_full(&bad).is_err());
    assert!(task.evaluate_full(&[]).is_err());
}

/// Which models bring their own labels: a classification export does, a bare `BertModel` does
/// not, and transformers' placeholder names stand for the integer labels.
#[test]
fn model_labels_of_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let with_config = |json: &str| {
        let config = tmp.path().join("config.json");
        fs::write(&config, json).unwrap();
        let src = source::ModelSource {
            spec: "test".into(),
            kind: source::SourceKind::Local,
            dir: tmp.path().to_path_buf(),
            config,
            weights: Vec::new(),
            weights_index: None,
            tokenizer: None,
        };
        classify::model_labels(&src).unwrap()
    };
    assert_eq!(with_config(r#"{"architectures": ["BertModel"]}"#), None);
    assert_eq!(
        with_config(r#"{"architectures": ["BertModel"], "id2label": {"0": "neg", "1": "pos"}}"#),
        None
    );
    assert_eq!(
        with_config(
            r#"{"architectures": ["BertForSequenceClassification"],
                "id2label": {"1": "pos", "0": "neg"}}"#
        ),
        Some(vec!["neg".to_string(), "pos".to_string()])
    );
    assert_eq!(
        with_config(
            r#"{"architectures": ["BertForSequenceClassification"],
                "id2label": {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}}"#
        ),
        Some(vec!["0".to_string(), "1".to_string(), "2".to_string()])
    );
}
