//! The tasks as a library user meets them: one loading shape (`from_pretrained(spec, …,
//! TaskOptions)`, every model's `from_pretrained` returning a `Pretrained`), a merged export
//! that needs nothing but the output folder and reproduces the adapted model, and the adapter
//! files a task saves: the active adapter, whatever its name, from `save_adapter` and from the
//! trainer's checkpoints alike, and the same files as its model's `save_adapter`.
mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_peft::data::read_tsv;
use candle_peft::io::peft_format::{WEIGHTS_NAME, read_safetensors};
use candle_peft::models::Pretrained;
use candle_peft::models::llama::load_causal_tokenizer;
use candle_peft::tasks::classify;
use candle_peft::tasks::{CausalLmTask, ClassifyTask, LmExample, TaskOptions};
use candle_peft::train::ADAPTER_DIR;
use candle_peft::{BertModel, LlamaForCausalLM, LoraConfig, PeftError, TrainConfig, Trainer};
use common::llama::{config, random_weights, tiny, tiny_llama_json, token_ids};
use common::max_abs_diff;
use common::tiny::lora_random_b;

fn opts(seq_len: usize, seed: u64) -> TaskOptions {
    TaskOptions {
        seq_len,
        seed,
        ..TaskOptions::default()
    }
}

/// A tiny Llama folder: config.json, f32 model.safetensors and SmolLM2's tokenizer.json (its ids
/// exceed the tiny vocabulary; the tests feed ids directly).
fn tiny_llama_folder(dir: &Path, seed: u64) {
    let json = tiny_llama_json(false);
    let weights: HashMap<String, Tensor> = random_weights(&config(&json), seed);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    let gguf = candle_peft::io::source::resolve(common::smollm2_gguf().to_str().unwrap()).unwrap();
    let tokenizer = load_causal_tokenizer(&gguf).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        tokenizer.to_string(false).unwrap(),
    )
    .unwrap();
}

fn sst2_texts(n: usize) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sst2");
    let valid = read_tsv(root.join("valid.tsv")).unwrap();
    valid.examples.into_iter().take(n).map(|e| e.text).collect()
}

#[test]
fn task_options_default_to_the_command_line_defaults() {
    let o = TaskOptions::default();
    assert_eq!((o.seq_len, o.seed, o.eval_batch), (128, 42, None));
    assert!(o.device.is_cpu());
}

#[test]
fn every_model_from_pretrained_returns_model_config_and_source() {
    let minilm = common::minilm_dir();
    let Pretrained {
        model,
        config,
        source,
    } = BertModel::from_pretrained(minilm.to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(config.hidden_size, 384);
    assert_eq!(model.layer_names().len(), 37);
    assert_eq!(source.dir, minilm);

    let tmp = tempfile::tempdir().unwrap();
    tiny_llama_folder(tmp.path(), 3);
    let Pretrained {
        model,
        config,
        source,
    } = LlamaForCausalLM::from_pretrained(tmp.path().to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!((config.hidden_size, config.num_hidden_layers), (32, 2));
    assert_eq!(model.layer_names().len(), 2 * 7 + 1); // seven projections per layer, lm_head
    assert_eq!(source.dir, tmp.path());
}

#[test]
fn classify_task_exports_merged_from_its_own_source() {
    let minilm = common::minilm_dir();
    let labels = ["neg", "pos"];
    let mut task = ClassifyTask::from_pretrained(minilm.to_str().unwrap(), labels, opts(32, 5))
        .unwrap()
        .with_eval_batch(3);
    assert_eq!(task.source().unwrap().dir, minilm);
    assert_eq!(task.labels(), ["neg", "pos"]);
    task.add_adapter("default", lora_random_b(&["query", "value"], 4, 8.0))
        .unwrap();
    let texts = sst2_texts(6);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    task.model().eval();
    let adapted = task.logits(&refs).unwrap();
    let predicted = task.predict(&refs).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    task.export_merged(&out).unwrap();
    let spec = out.to_str().unwrap();
    // The export's config carries the label names; another seed proves the head is read back.
    let known = classify::known_labels(spec, None).unwrap().unwrap();
    assert_eq!(known, ["neg", "pos"]);
    let merged = ClassifyTask::from_pretrained(spec, known, opts(32, 99)).unwrap();
    assert!(merged.model().adapter_names().is_empty());
    let d = max_abs_diff(&merged.logits(&refs).unwrap(), &adapted);
    assert!(
        d < 1e-4,
        "merged export differs from the adapted model by {d}"
    );
    assert_eq!(merged.predict(&refs).unwrap(), predicted);
}

#[test]
fn causal_task_exports_merged_from_its_own_source() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    tiny_llama_folder(&base, 7);
    let mut task = CausalLmTask::from_pretrained(base.to_str().unwrap(), opts(16, 5)).unwrap();
    assert_eq!(task.source().unwrap().dir, base);
    task.add_adapter("default", lora_random_b(&["q_proj", "down_proj"], 2, 4.0))
        .unwrap();
    task.model().eval();
    let ids = vec![vec![5u32, 17, 42, 3, 88, 9]];
    let adapted = task.logits(&ids).unwrap();
    let base_logits = {
        let plain = CausalLmTask::from_pretrained(base.to_str().unwrap(), opts(16, 5)).unwrap();
        plain.logits(&ids).unwrap()
    };
    assert!(
        max_abs_diff(&adapted, &base_logits) > 1e-3,
        "the adapter changes nothing"
    );

    let out = tmp.path().join("merged");
    task.export_merged(&out).unwrap();
    let merged = CausalLmTask::from_pretrained(out.to_str().unwrap(), opts(16, 5)).unwrap();
    assert_eq!(merged.model().model().dtype(), DType::F32);
    let d = max_abs_diff(&merged.logits(&ids).unwrap(), &adapted);
    assert!(
        d < 1e-4,
        "merged export differs from the adapted model by {d}"
    );
}

/// A causal-LM task over the tiny random Llama (tied head), built with `new`.
fn tiny_causal_task() -> CausalLmTask {
    let (model, cfg) = tiny(&tiny_llama_json(true), 3);
    let gguf = candle_peft::io::source::resolve(common::smollm2_gguf().to_str().unwrap()).unwrap();
    let tokenizer = load_causal_tokenizer(&gguf).unwrap();
    CausalLmTask::new(model, cfg, tokenizer, 8, Device::Cpu).unwrap()
}

/// The tensors of a saved adapter folder, by file key.
fn saved(dir: &Path) -> HashMap<String, Tensor> {
    read_safetensors(&dir.join(WEIGHTS_NAME), &Device::Cpu).unwrap()
}

/// `saved(dir)` equals the model's current tensors of adapter `name`, bit for bit.
fn assert_saved_is(task: &CausalLmTask, dir: &Path, name: &str) {
    let on_disk = saved(dir);
    let in_memory = task.model().adapter_tensors(name).unwrap();
    assert_eq!(on_disk.len(), in_memory.len(), "{}", dir.display());
    for (key, t) in in_memory {
        let d = max_abs_diff(&on_disk[&key], &t);
        assert_eq!(
            d,
            0.0,
            "{key} in {} is not adapter `{name}`'s",
            dir.display()
        );
    }
}

#[test]
fn a_run_checkpoints_and_saves_the_active_adapter_whatever_its_name() {
    let mut task = tiny_causal_task();
    task.add_adapter("mine", LoraConfig::new(&["q_proj", "v_proj"], 2, 4.0))
        .unwrap();
    let examples: Vec<LmExample> = (0..4)
        .map(|i| LmExample {
            ids: token_ids(8, 97, i),
            loss_from: 0,
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let run = |task: &CausalLmTask, out: &str| {
        let config = TrainConfig {
            steps: 3,
            batch_size: 2,
            lr: 1e-2,
            out_dir: Some(tmp.path().join(out)),
            quiet: true,
            ..TrainConfig::default()
        };
        Trainer::new(config)
            .unwrap()
            .run(task, &examples, None)
            .unwrap()
    };
    let report = run(&task, "one");
    assert_eq!(report.global_step, 3);
    let [checkpoint] = report.checkpoints.as_slice() else {
        panic!("expected one checkpoint, got {:?}", report.checkpoints);
    };
    assert_saved_is(&task, &checkpoint.join(ADAPTER_DIR), "mine");
    // Trained: the checkpoint's lora_B moved off its zero init.
    let moved = saved(&checkpoint.join(ADAPTER_DIR))
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .map(|(_, t)| common::tensors::max_abs(t))
        .fold(0f32, f32::max);
    assert!(moved > 0.0, "lora_B did not move");
    let dir = tmp.path().join("saved");
    task.save_adapter(&dir).unwrap();
    assert_saved_is(&task, &dir, "mine");

    // A second adapter, made the active one: the checkpoint holds it, not the first.
    task.add_adapter("other", LoraConfig::new(&["k_proj"], 2, 4.0))
        .unwrap();
    task.model_mut().set_adapter("other").unwrap();
    let report = run(&task, "two");
    assert_saved_is(&task, &report.checkpoints[0].join(ADAPTER_DIR), "other");

    // Both active: one folder per adapter.
    task.model_mut().set_active(&["mine", "other"]).unwrap();
    let both = tmp.path().join("both");
    task.save_adapter(&both).unwrap();
    assert_saved_is(&task, &both.join("mine"), "mine");
    assert_saved_is(&task, &both.join("other"), "other");

    // None active: an error that names the adapters there are.
    task.model_mut().set_active(&[]).unwrap();
    let err = task.save_adapter(tmp.path().join("none")).unwrap_err();
    assert!(err.to_string().contains("mine, other"), "{err}");
}

#[test]
fn a_task_built_with_new_has_no_source_to_export() {
    let task = tiny_causal_task();
    assert!(task.source().is_none());
    let tmp = tempfile::tempdir().unwrap();
    let err = task.export_merged(tmp.path().join("out")).unwrap_err();
    assert!(matches!(err, PeftError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("from_pretrained"), "{err}");
    assert!(!tmp.path().join("out").exists());
}

/// Every file of `dir` with its bytes, by name.
fn folder(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect()
}

#[test]
fn the_task_and_its_model_save_identical_folders() {
    let minilm = common::minilm_dir();
    let mut task =
        ClassifyTask::from_pretrained(minilm.to_str().unwrap(), ["neg", "pos"], opts(32, 5))
            .unwrap();
    task.add_adapter("mine", lora_random_b(&["query"], 2, 4.0))
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (by_task, by_model, by_unwrapped) = (
        tmp.path().join("task"),
        tmp.path().join("model"),
        tmp.path().join("unwrapped"),
    );
    task.save_adapter(&by_task).unwrap();
    task.model().save_adapter(&by_model, "mine").unwrap();
    let files = folder(&by_task);
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            classify::LABELS_FILE
        ]
    );
    assert!(
        files == folder(&by_model),
        "the task and the model wrote different files"
    );
    assert_eq!(
        classify::read_labels(&by_model).unwrap().unwrap(),
        ["neg", "pos"]
    );
    // The model keeps the file once out of the task.
    let model = task.into_model();
    model.save_adapter(&by_unwrapped, "mine").unwrap();
    assert!(files == folder(&by_unwrapped));
}

#[test]
fn an_adapter_file_is_a_plain_name_beside_the_adapter_files() {
    let (mut model, _) = tiny(&tiny_llama_json(true), 3);
    for bad in [
        "../labels.json",
        "sub/labels.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "",
    ] {
        let err = model.set_adapter_file(bad, "x").unwrap_err();
        assert!(err.to_string().contains("plain file name"), "{bad}: {err}");
    }
    model.set_adapter_file("notes.txt", "one").unwrap();
    model.set_adapter_file("notes.txt", "two").unwrap();
    model
        .add_adapter("default", LoraConfig::new(&["q_proj"], 2, 4.0))
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    model.save_adapter(tmp.path(), "default").unwrap();
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("notes.txt")).unwrap(),
        "two"
    );
}
