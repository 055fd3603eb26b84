//! `BertForSequenceClassification` on all-MiniLM-L6-v2 (a bare `BertModel` checkpoint: no `bert.`
//! prefix, no classifier): logits against a hand computation on candle-transformers' BERT, the
//! round trip of a LoRA adapter with a `modules_to_save` classifier, and the merged export (keys,
//! config, reload, and candle-transformers loading it).
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_peft::data::{encode_batch, load_tokenizer, read_tsv};
use candle_peft::io::source::{self, ModelSource};
use candle_peft::models::heads::{BertForSequenceClassification, labels_from_config, predictions};
use candle_peft::{LoraConfig, PeftBuilder, PeftError, PeftModel};
use candle_transformers::models::bert as oracle;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Model = PeftModel<BertForSequenceClassification>;

fn minilm() -> ModelSource {
    source::resolve_local(&common::minilm_dir()).unwrap()
}

fn load(seed: u64) -> Model {
    let (m, cfg) =
        BertForSequenceClassification::from_source(&minilm(), 2, seed, &Device::Cpu).unwrap();
    assert_eq!(cfg.hidden_size, 384);
    m
}

use common::max_abs_diff;
use common::tensors::flat;

/// Eight SST-2 validation sentences, tokenised with MiniLM's tokenizer, dynamically padded.
fn batch() -> (Tensor, Tensor) {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sst2");
    let valid = read_tsv(root.join("valid.tsv")).unwrap();
    let texts: Vec<&str> = valid.texts().into_iter().take(8).collect();
    let tok = load_tokenizer(common::minilm_dir().join("tokenizer.json"), 128).unwrap();
    let b = encode_batch(&tok, &texts, 128, &Device::Cpu).unwrap();
    // The batch has padding, so the mask matters.
    let (bsz, t) = b.input_ids.dims2().unwrap();
    assert!(b.tokens < bsz * t, "no padding in the test batch");
    (b.input_ids, b.attention_mask)
}

/// candle-transformers' BERT over the weights at `weights` (bare or `bert.`-prefixed).
fn oracle_hidden(config: &Path, weights: &Path, ids: &Tensor, mask: &Tensor) -> Tensor {
    let text = std::fs::read_to_string(config).unwrap();
    let cfg: oracle::Config = serde_json::from_str(&text).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[weights.to_path_buf()], DType::F32, &Device::Cpu)
    }
    .unwrap();
    let bert = oracle::BertModel::load(vb, &cfg).unwrap();
    bert.forward(ids, &ids.zeros_like().unwrap(), Some(mask))
        .unwrap()
}

/// `classifier(tanh(pooler(h[:, 0])))` by hand.
fn head_by_hand(hidden: &Tensor, wp: &Tensor, bp: &Tensor, wc: &Tensor, bc: &Tensor) -> Tensor {
    let cls = hidden.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let pooled = cls
        .matmul(&wp.t().unwrap())
        .unwrap()
        .broadcast_add(bp)
        .unwrap()
        .tanh()
        .unwrap();
    pooled
        .matmul(&wc.t().unwrap())
        .unwrap()
        .broadcast_add(bc)
        .unwrap()
}

fn read_weights(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn logits_match_hand_computation_on_candle_transformers() {
    let dir = common::minilm_dir();
    let model = load(7);
    let names = model.layer_names();
    assert_eq!(names.len(), 6 * 6 + 2);
    assert_eq!(names[0], "bert.encoder.layer.0.attention.self.query");
    assert_eq!(names[36], "bert.pooler.dense");
    assert_eq!(names[37], "classifier");

    let m = model.model();
    assert_eq!(m.num_labels(), 2);
    // The pooler comes from the checkpoint, the classifier is new: N(0, 0.02²), bias 0.
    let base = read_weights(&dir.join("model.safetensors"));
    let wp = m.pooler().handle().weight().unwrap();
    assert_eq!(max_abs_diff(&wp, &base["pooler.dense.weight"]), 0.0);
    let wc = m.classifier().handle().weight().unwrap();
    let bc = m.classifier().handle().bias().unwrap();
    assert_eq!(wc.dims(), &[2, 384]);
    assert!(flat(&bc).iter().all(|v| *v == 0.0));
    let w = flat(&wc);
    let mean = w.iter().sum::<f32>() / w.len() as f32;
    let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / w.len() as f32).sqrt();
    println!("classifier init: mean {mean:.5}, std {std:.5}");
    assert!((std - 0.02).abs() < 0.002, "std {std}");
    assert!(mean.abs() < 0.003, "mean {mean}");
    // Seeded: the same seed gives the same head, another seed another one.
    assert_eq!(
        flat(&load(7).model().classifier().handle().weight().unwrap()),
        w
    );
    assert_ne!(
        flat(&load(8).model().classifier().handle().weight().unwrap()),
        w
    );

    let (ids, mask) = batch();
    let ours = m.forward(&ids, &mask).unwrap();
    assert_eq!(ours.dims(), &[8, 2]);
    let hidden = oracle_hidden(
        &dir.join("config.json"),
        &dir.join("model.safetensors"),
        &ids,
        &mask,
    );
    let expected = head_by_hand(&hidden, &wp, &base["pooler.dense.bias"], &wc, &bc);
    let d = max_abs_diff(&ours, &expected);
    println!("max |ours - hand computation on candle-transformers| = {d:e}");
    assert!(d <= 1e-4, "max abs diff {d}");
    // Not a degenerate comparison: the logits differ between sentences.
    assert!(max_abs_diff(&ours.get(0).unwrap(), &ours.get(1).unwrap()) > 1e-4);
}

#[test]
fn dropout_only_in_training_and_seeded() {
    let (ids, mask) = batch();
    let a = load(3);
    let b = load(3);
    let eval = a.model().forward(&ids, &mask).unwrap();
    assert!((a.model().dropout_prob() - 0.1).abs() < 1e-7);
    a.train();
    b.train();
    let ta = a.model().forward(&ids, &mask).unwrap();
    let tb = b.model().forward(&ids, &mask).unwrap();
    assert!(max_abs_diff(&ta, &eval) > 1e-4, "no dropout in training");
    assert_eq!(max_abs_diff(&ta, &tb), 0.0, "dropout is seeded");
    a.eval();
    assert_eq!(
        max_abs_diff(&a.model().forward(&ids, &mask).unwrap(), &eval),
        0.0
    );
}

#[test]
fn bare_checkpoint_needs_the_prefix_view() {
    let src = minilm();
    let cfg = candle_peft::BertConfig::from_file(&src.config).unwrap();
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&src.weights, DType::F32, &Device::Cpu) }
        .unwrap();
    let err =
        BertForSequenceClassification::load(&PeftBuilder::new(vb.clone()), &cfg, 2, 0).unwrap_err();
    assert!(matches!(err, PeftError::MissingTensor { .. }), "{err}");
    assert!(err.to_string().contains("with_bert_prefix"), "{err}");
    let b = PeftBuilder::new(BertForSequenceClassification::with_bert_prefix(vb));
    assert!(b.contains("bert.encoder.layer.5.output.dense.weight"));
    assert!(!b.contains("classifier.weight"));
    assert!(BertForSequenceClassification::load(&b, &cfg, 0, 0).is_err());
    let m = BertForSequenceClassification::load(&b, &cfg, 5, 0).unwrap();
    assert_eq!(m.num_labels(), 5);
}

/// LoRA r=8 on query,value with the classifier as `modules_to_save`, every trainable set to
/// seeded random values (LoRA's B starts at zero, which would make the test vacuous).
fn adapted(seed: u64) -> Model {
    let mut model = load(seed);
    let mut cfg = LoraConfig::new(&["query", "value"], 8, 16.0);
    cfg.targeting.modules_to_save = Some(vec!["classifier".to_string()]);
    model.add_adapter("default", cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1234);
    for (_, var) in model.trainable_vars() {
        let t = var.as_tensor();
        let v: Vec<f32> = (0..t.elem_count())
            .map(|_| 0.05 * (2.0 * rng.random::<f32>() - 1.0))
            .collect();
        var.set(&Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    model
}

#[test]
fn adapter_with_classifier_round_trip() {
    let (ids, mask) = batch();
    let model = adapted(7);
    let names: Vec<String> = model.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 6 * 2 * 2 + 2);
    assert!(names.contains(&"base_model.model.classifier.modules_to_save.default.weight".into()));
    assert!(names.contains(
        &"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight".into()
    ));
    let logits = model.model().forward(&ids, &mask).unwrap();

    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path(), "default").unwrap();
    let saved = read_weights(&dir.path().join("adapter_model.safetensors"));
    let keys: Vec<&String> = saved.keys().collect();
    println!("{} adapter tensors", keys.len());
    assert_eq!(saved.len(), 6 * 2 * 2 + 2);
    for key in [
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
        "base_model.model.bert.encoder.layer.5.attention.self.value.lora_B.weight",
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    ] {
        assert!(saved.contains_key(key), "{key} not in {keys:?}");
    }
    assert_eq!(
        saved["base_model.model.classifier.weight"].dims(),
        &[2, 384]
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["modules_to_save"], serde_json::json!(["classifier"]));

    // A fresh model with another head seed predicts differently until the adapter is loaded;
    // the saved classifier then overrides the fresh one and the logits are reproduced exactly.
    for seed in [7, 99] {
        let mut fresh = load(seed);
        let before = fresh.model().forward(&ids, &mask).unwrap();
        assert!(max_abs_diff(&before, &logits) > 1e-3);
        fresh.load_adapter(dir.path(), "default").unwrap();
        let after = fresh.model().forward(&ids, &mask).unwrap();
        let d = max_abs_diff(&after, &logits);
        println!("seed {seed}: reloaded adapter, max |diff| = {d:e}");
        assert_eq!(d, 0.0);
    }
}

#[test]
fn merged_export_loads_everywhere() {
    let (ids, mask) = batch();
    let base = minilm();
    let model = adapted(7);
    // Centre the trained classifier's bias on the median margin, so that both labels are
    // predicted and "same predictions" means something.
    let vars: BTreeMap<String, candle_core::Var> = model.trainable_vars().into_iter().collect();
    let bias = &vars["base_model.model.classifier.modules_to_save.default.bias"];
    let rows = model
        .model()
        .forward(&ids, &mask)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut margins: Vec<f32> = rows.iter().map(|r| r[1] - r[0]).collect();
    margins.sort_by(f32::total_cmp);
    let median = (margins[3] + margins[4]) / 2.0;
    let mut b = bias.as_tensor().to_vec1::<f32>().unwrap();
    b[1] -= median;
    bias.set(&Tensor::new(b, &Device::Cpu).unwrap()).unwrap();
    let logits = model.model().forward(&ids, &mask).unwrap();
    let preds = predictions(&logits).unwrap();
    println!("adapted predictions {preds:?}");
    assert_eq!(preds.iter().filter(|p| **p == 1).count(), 4);

    // Exporting a model that still carries adapters is refused; so is the base folder.
    let labels = vec!["negative".to_string(), "positive".to_string()];
    let out = tempfile::tempdir().unwrap();
    let err = model
        .model()
        .save_pretrained(&base, out.path(), &labels)
        .unwrap_err();
    assert!(err.to_string().contains("not merged"), "{err}");
    assert!(
        model
            .model()
            .save_pretrained(&base, out.path(), &labels[..1])
            .is_err()
    );

    let (merged, report) =
        BertForSequenceClassification::export_merged(model, &base, out.path(), &labels).unwrap();
    assert!(
        merged
            .save_pretrained(&base, &base.dir, &labels)
            .unwrap_err()
            .to_string()
            .contains("base model folder")
    );
    let merged_logits = merged.forward(&ids, &mask).unwrap();
    let d_merged = max_abs_diff(&merged_logits, &logits);
    println!("merged in memory: max |diff| = {d_merged:e}");
    assert!(d_merged <= 1e-4);

    // Keys: every base tensor under `bert.`, plus the classifier.
    let weights = read_weights(&report.weights);
    let base_weights = read_weights(&base.weights[0]);
    assert_eq!(weights.len(), base_weights.len() + 2);
    for key in [
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.LayerNorm.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.0.attention.self.query.bias",
        "bert.pooler.dense.weight",
        "classifier.weight",
        "classifier.bias",
    ] {
        assert!(weights.contains_key(key), "{key} missing");
    }
    assert!(
        weights
            .keys()
            .all(|k| k.starts_with("bert.") || k.starts_with("classifier."))
    );
    // Untouched tensors are copied as they are; adapted ones changed.
    assert_eq!(
        max_abs_diff(
            &weights["bert.embeddings.word_embeddings.weight"],
            &base_weights["embeddings.word_embeddings.weight"]
        ),
        0.0
    );
    assert_eq!(
        max_abs_diff(
            &weights["bert.encoder.layer.0.attention.self.key.weight"],
            &base_weights["encoder.layer.0.attention.self.key.weight"]
        ),
        0.0
    );
    assert!(
        max_abs_diff(
            &weights["bert.encoder.layer.0.attention.self.query.weight"],
            &base_weights["encoder.layer.0.attention.self.query.weight"]
        ) > 1e-4
    );

    // config.json: the base config plus the classification fields.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report.config).unwrap()).unwrap();
    assert_eq!(
        config["architectures"],
        serde_json::json!(["BertForSequenceClassification"])
    );
    assert_eq!(
        config["id2label"],
        serde_json::json!({"0": "negative", "1": "positive"})
    );
    assert_eq!(
        config["label2id"],
        serde_json::json!({"negative": 0, "positive": 1})
    );
    assert_eq!(config["num_labels"], 2);
    assert_eq!(config["problem_type"], "single_label_classification");
    assert_eq!(config["hidden_size"], 384);
    assert_eq!(config["model_type"], "bert");
    assert_eq!(labels_from_config(&report.config).unwrap(), Some(labels));
    assert!(out.path().join("tokenizer.json").is_file());
    assert!(out.path().join("vocab.txt").is_file());
    let copied: BTreeMap<_, _> = report
        .copied_files
        .iter()
        .map(|p| (p.file_name().unwrap().to_owned(), ()))
        .collect();
    assert!(copied.contains_key(std::ffi::OsStr::new("tokenizer_config.json")));

    // Reload the folder: now the checkpoint has the prefix and the classifier, so the head seed
    // does not matter.
    let exported = source::resolve_local(out.path()).unwrap();
    let (reloaded, _) =
        BertForSequenceClassification::from_source(&exported, 2, 555, &Device::Cpu).unwrap();
    assert_eq!(reloaded.layer_names(), load(0).layer_names());
    let reloaded_logits = reloaded.model().forward(&ids, &mask).unwrap();
    let d = max_abs_diff(&reloaded_logits, &logits);
    println!("reloaded export: max |diff| = {d:e}");
    assert!(d <= 1e-4, "max abs diff {d}");
    assert_eq!(predictions(&reloaded_logits).unwrap(), preds);
    // A label count that does not match the saved classifier is an error.
    assert!(BertForSequenceClassification::from_source(&exported, 3, 0, &Device::Cpu).is_err());

    // candle-transformers loads the trunk through its `bert.` fallback; with the exported
    // pooler and classifier it gives the same logits.
    let hidden = oracle_hidden(&report.config, &report.weights, &ids, &mask);
    let by_hand = head_by_hand(
        &hidden,
        &weights["bert.pooler.dense.weight"],
        &weights["bert.pooler.dense.bias"],
        &weights["classifier.weight"],
        &weights["classifier.bias"],
    );
    let d_oracle = max_abs_diff(&by_hand, &logits);
    println!("candle-transformers on the export: max |diff| = {d_oracle:e}");
    assert!(d_oracle <= 1e-4, "max abs diff {d_oracle}");
    assert_eq!(predictions(&by_hand).unwrap(), preds);

    // Exporting the reloaded (prefixed) model again writes the same tensor names.
    let out2 = tempfile::tempdir().unwrap();
    let labels2 = labels_from_config(&report.config).unwrap().unwrap();
    let (_, report2) =
        BertForSequenceClassification::export_merged(reloaded, &exported, out2.path(), &labels2)
            .unwrap();
    assert_eq!(report2.tensor_names, report.tensor_names);
    let again = read_weights(&report2.weights);
    assert_eq!(
        max_abs_diff(&again["classifier.weight"], &weights["classifier.weight"]),
        0.0
    );
}
