//! Bad input: every failure is a typed `PeftError` whose message names the thing at fault, and a
//! failed operation leaves the model (or the adapter on disk) as it was.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_peft::adapters::lora::InitLoraWeights;
use candle_peft::config::{ModuleSelector, OneOrMany};
use candle_peft::io::peft_format;
use candle_peft::{Conv2dParams, LoraConfig, PeftBuilder, PeftError, PeftModel};
use common::tiny::*;

const ADAPTER: &str = "default";

/// A tiny model with a saved LoRA adapter (q, v, conv; r = 2) in `dir/adapter`.
fn saved_adapter(dir: &Path) -> (PathBuf, PeftModel<Tiny>) {
    let mut pm = tiny_model(1, 2);
    pm.add_adapter(ADAPTER, lora_random_b(&["q", "v", "conv"], 2, 4.0))
        .unwrap();
    let out = dir.join("adapter");
    pm.save_adapter(&out, ADAPTER).unwrap();
    (out, pm)
}

fn weights_path(dir: &Path) -> PathBuf {
    dir.join("adapter_model.safetensors")
}

fn config_path(dir: &Path) -> PathBuf {
    dir.join("adapter_config.json")
}

fn read_config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(config_path(dir)).unwrap()).unwrap()
}

fn write_config(dir: &Path, v: &serde_json::Value) {
    fs::write(config_path(dir), serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// Loads `dir` into a fresh tiny model and returns the error, checking that the failed load left
/// the model without a trace of the adapter.
fn load_err(dir: &Path) -> PeftError {
    let mut pm = tiny_model(1, 3);
    let before = outputs_bits(&pm);
    let err = pm
        .load_adapter(dir, ADAPTER)
        .expect_err("loading should fail");
    assert!(
        pm.adapter_names().is_empty(),
        "a failed load registered the adapter"
    );
    assert!(
        pm.layers().iter().all(|l| !l.has_adapter(ADAPTER)),
        "a failed load left an adapter on a layer"
    );
    assert_eq!(outputs_bits(&pm), before);
    err
}

fn outputs_bits(pm: &PeftModel<Tiny>) -> (Vec<u32>, Vec<u32>) {
    (
        bits(&pm.model().forward(&tiny_input(100)).unwrap()),
        bits(&pm.model().conv_forward(&tiny_image(101)).unwrap()),
    )
}

/// `add_adapter` must fail and leave the model unchanged.
fn add_err(config: LoraConfig) -> PeftError {
    let mut pm = tiny_model(1, 2);
    let before = outputs_bits(&pm);
    let err = pm
        .add_adapter(ADAPTER, config)
        .expect_err("add_adapter should fail");
    assert!(pm.adapter_names().is_empty());
    assert!(pm.layers().iter().all(|l| !l.has_adapter(ADAPTER)));
    assert_eq!(outputs_bits(&pm), before);
    err
}

// =============================================================================================
// Configs
// =============================================================================================

#[test]
fn target_that_matches_no_layer() {
    let err = add_err(LoraConfig::new(&["query", "value"], 2, 4.0));
    let msg = err.to_string();
    // The distinct last segments, not every path, and one example path.
    match &err {
        PeftError::NoTargetMatch { targets, found } => {
            assert!(
                targets.contains("query") && targets.contains("value"),
                "{targets}"
            );
            assert!(
                found.starts_with(
                    "q, v, xq, conv, head (the last segments of 9 layer paths such as \
                     `model.blocks.0.q`)"
                ),
                "{found}"
            );
            assert_eq!(TINY_LAYERS.len(), 9);
        }
        other => panic!("expected NoTargetMatch, got {other:?}"),
    }
    println!("{msg}");
    // A typo gets the closest name.
    let err = add_err(LoraConfig::new(&["xg", "blocks.0.vv"], 2, 4.0));
    let msg = err.to_string();
    assert!(msg.contains("did you mean `xq` for `xg`?"), "{msg}");
    assert!(
        msg.contains("did you mean `blocks.0.v` for `blocks.0.vv`?"),
        "{msg}"
    );
}

#[test]
fn rank_zero() {
    let err = add_err(LoraConfig::new(&["q"], 0, 4.0));
    match &err {
        PeftError::InvalidConfig { field, .. } => assert_eq!(field, "r"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert!(err.to_string().contains("`r`"), "{err}");
    // A zero rank in rank_pattern names the pattern.
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.rank_pattern.insert("blocks.0.q".into(), 0);
    match add_err(c) {
        PeftError::InvalidConfig { field, .. } => assert_eq!(field, "rank_pattern.blocks.0.q"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn conv_rank_not_divisible_by_groups() {
    // (A rank above min(in, out) is not bad input: PEFT allows it; tests/lora_rank_above_min.rs.)
    // A conv rank that the conv's groups don't divide.
    let mut w = HashMap::new();
    let mut r = rng(4);
    w.insert("lin.weight".to_string(), rand_tensor(&mut r, &[4, 4], 0.5));
    w.insert(
        "conv.weight".to_string(),
        rand_tensor(&mut r, &[4, 2, 3, 3], 0.5),
    );
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let b = PeftBuilder::new(vb);
    let lin = b.linear(4, 4, false, "lin").unwrap();
    let params = Conv2dParams {
        groups: 2,
        ..Conv2dParams::default()
    };
    let conv = b.conv2d(4, 4, (3, 3), params, false, "conv").unwrap();
    let mut pm = PeftModel::new((lin, conv), &b);
    match pm.add_adapter(ADAPTER, LoraConfig::new(&["conv"], 3, 3.0)) {
        Err(PeftError::InvalidLayer { module, reason }) => {
            assert_eq!(module, "conv");
            assert!(reason.contains("groups"), "{reason}");
        }
        other => panic!("expected InvalidLayer, got {other:?}"),
    }
}

#[test]
fn invalid_regex_in_target_modules() {
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.targeting.target_modules = Some(ModuleSelector::Regex(r"model\.blocks\.(\d+".into()));
    let err = add_err(c);
    match &err {
        PeftError::InvalidConfig { field, reason } => {
            assert_eq!(field, "target_modules");
            assert!(reason.contains(r"model\\.blocks\\.(\\d+"), "{reason}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    println!("{err}");
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.targeting.exclude_modules = Some(ModuleSelector::Regex("[".into()));
    match add_err(c) {
        PeftError::InvalidConfig { field, .. } => assert_eq!(field, "exclude_modules"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.rank_pattern.insert("q(".into(), 3);
    match add_err(c) {
        PeftError::InvalidConfig { field, reason } => {
            assert_eq!(field, "rank_pattern");
            assert!(reason.contains("q("), "{reason}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    // From a file: the error names the field.
    let dir = tempfile::tempdir().unwrap();
    let (adapter, _) = saved_adapter(dir.path());
    let mut json = read_config(&adapter);
    json["target_modules"] = serde_json::json!("(q|v");
    write_config(&adapter, &json);
    match load_err(&adapter) {
        PeftError::InvalidConfig { field, reason } => {
            assert_eq!(field, "target_modules");
            assert!(reason.contains("adapter_config.json"), "{reason}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn other_invalid_configs() {
    let field_of = |e: PeftError| match e {
        PeftError::InvalidConfig { field, .. } => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.lora_dropout = 1.0;
    assert_eq!(field_of(add_err(c)), "lora_dropout");
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.init_lora_weights = InitLoraWeights::Named("pissa".into());
    assert_eq!(field_of(add_err(c)), "init_lora_weights");
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.targeting.layers_pattern = Some(OneOrMany::One("blocks".into()));
    assert_eq!(field_of(add_err(c)), "layers_pattern");
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.targeting.target_modules = Some(ModuleSelector::Regex(".*q".into()));
    c.targeting.layers_to_transform = Some(OneOrMany::One(0));
    assert_eq!(field_of(add_err(c)), "layers_to_transform");
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.targeting.target_modules = Some(ModuleSelector::List(vec![]));
    assert_eq!(field_of(add_err(c)), "target_modules");
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.targeting.modules_to_save = Some(vec!["classifier".into()]);
    let err = add_err(c);
    let msg = err.to_string();
    assert_eq!(field_of(err), "modules_to_save");
    assert!(msg.contains("classifier"), "{msg}");
    // `ks.0.q` ends `model.blocks.0.q` (PEFT's `endswith` picks modules to save), but is not a
    // whole segment, so PEFT's target guard (`(^|.*\.)ks.0.q($|\..*)`) does not exclude it:
    // the layer would be both.
    let mut c = LoraConfig::new(&["q"], 2, 4.0);
    c.targeting.modules_to_save = Some(vec!["ks.0.q".into()]);
    let err = add_err(c);
    assert!(
        err.to_string()
            .contains("both a target and a module to save"),
        "{err}"
    );
    assert_eq!(field_of(err), "modules_to_save");
}

// =============================================================================================
// Adapter files
// =============================================================================================

#[test]
fn adapter_tensor_with_the_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (adapter, _) = saved_adapter(dir.path());
    let mut tensors = candle_core::safetensors::load(weights_path(&adapter), &Device::Cpu).unwrap();
    let key = "base_model.model.model.blocks.1.v.lora_A.weight";
    assert_eq!(tensors[key].dims(), &[2, HIDDEN]);
    tensors.insert(
        key.to_string(),
        Tensor::zeros((3, HIDDEN), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, weights_path(&adapter)).unwrap();
    let err = load_err(&adapter);
    let msg = err.to_string();
    match err {
        PeftError::ShapeMismatch {
            key: k,
            expected,
            got,
        } => {
            assert_eq!(k, key);
            assert_eq!(expected, vec![2, HIDDEN]);
            assert_eq!(got, vec![3, HIDDEN]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    assert!(
        msg.contains(key) && msg.contains("[2, 6]") && msg.contains("[3, 6]"),
        "{msg}"
    );
    println!("{msg}");
    // The conv's B with a wrong rank.
    let (adapter, _) = saved_adapter(&dir.path().join("conv"));
    let mut tensors = candle_core::safetensors::load(weights_path(&adapter), &Device::Cpu).unwrap();
    let key = "base_model.model.model.conv.lora_B.weight";
    tensors.insert(
        key.to_string(),
        Tensor::zeros((OUT_CH, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, weights_path(&adapter)).unwrap();
    match load_err(&adapter) {
        PeftError::ShapeMismatch {
            key: k,
            expected,
            got,
        } => {
            assert_eq!(k, key);
            assert_eq!(expected, vec![OUT_CH, 2, 1, 1]);
            assert_eq!(got, vec![OUT_CH, 2]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let (adapter, _) = saved_adapter(dir.path());
    let path = weights_path(&adapter);
    let bytes = fs::read(&path).unwrap();
    for len in [bytes.len() - 7, bytes.len() / 2, 5, 0] {
        fs::write(&path, &bytes[..len]).unwrap();
        let err = load_err(&adapter);
        let msg = err.to_string();
        match &err {
            PeftError::Safetensors { path: p, .. } => assert_eq!(p, &path),
            other => panic!("truncated to {len}: expected Safetensors, got {other:?}"),
        }
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        println!("truncated to {len}: {msg}");
    }
    // Garbage of the right length is no better.
    fs::write(&path, vec![0xffu8; bytes.len()]).unwrap();
    assert!(matches!(load_err(&adapter), PeftError::Safetensors { .. }));
    // A missing weights file is an I/O error naming it.
    fs::remove_file(&path).unwrap();
    match load_err(&adapter) {
        PeftError::Io { path: p, .. } => assert_eq!(p, path),
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn unknown_peft_type() {
    let dir = tempfile::tempdir().unwrap();
    let (adapter, _) = saved_adapter(dir.path());
    let mut json = read_config(&adapter);
    json["peft_type"] = serde_json::json!("IA3");
    write_config(&adapter, &json);
    let err = load_err(&adapter);
    match &err {
        PeftError::UnknownPeftType(t) => assert_eq!(t, "IA3"),
        other => panic!("expected UnknownPeftType, got {other:?}"),
    }
    assert!(err.to_string().contains("IA3"));
    // No peft_type at all.
    json.as_object_mut().unwrap().remove("peft_type");
    write_config(&adapter, &json);
    match load_err(&adapter) {
        PeftError::InvalidConfig { field, .. } => assert_eq!(field, "peft_type"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    // Unsupported LoRA variants are refused by name.
    let mut json = read_config(&dir.path().join("adapter"));
    json["peft_type"] = serde_json::json!("LORA");
    json["use_dora"] = serde_json::json!(true);
    write_config(&adapter, &json);
    match load_err(&adapter) {
        PeftError::InvalidConfig { field, .. } => assert_eq!(field, "use_dora"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    // Not JSON at all.
    fs::write(config_path(&adapter), "{ \"peft_type\": ").unwrap();
    match load_err(&adapter) {
        PeftError::Json { path, .. } => assert_eq!(path, config_path(&adapter)),
        other => panic!("expected Json, got {other:?}"),
    }
}

#[test]
fn missing_adapter_config() {
    let dir = tempfile::tempdir().unwrap();
    let (adapter, _) = saved_adapter(dir.path());
    fs::remove_file(config_path(&adapter)).unwrap();
    let err = load_err(&adapter);
    let msg = err.to_string();
    match err {
        PeftError::MissingAdapterConfig { dir: d } => assert_eq!(d, adapter),
        other => panic!("expected MissingAdapterConfig, got {other:?}"),
    }
    assert!(msg.contains(&adapter.display().to_string()) && msg.contains("adapter_config.json"));
    // A directory that does not exist.
    match load_err(&dir.path().join("nowhere")) {
        PeftError::MissingAdapterConfig { .. } => {}
        other => panic!("expected MissingAdapterConfig, got {other:?}"),
    }
}

#[test]
fn unexpected_extra_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (adapter, _) = saved_adapter(dir.path());
    let original = candle_core::safetensors::load(weights_path(&adapter), &Device::Cpu).unwrap();
    // A LoRA tensor for a layer the config does not target, and one for a module that does not
    // exist.
    for key in [
        "base_model.model.model.blocks.0.xq.lora_A.weight",
        "base_model.model.model.nowhere.lora_B.weight",
        "base_model.model.model.blocks.0.q.lora_C.weight",
    ] {
        let mut tensors = original.clone();
        tensors.insert(
            key.to_string(),
            Tensor::zeros((2, HIDDEN), DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&tensors, weights_path(&adapter)).unwrap();
        let err = load_err(&adapter);
        let msg = err.to_string();
        match &err {
            PeftError::UnexpectedTensor { key: k, location } => {
                assert_eq!(k, key);
                assert!(
                    location.contains(&adapter.display().to_string()),
                    "{location}"
                );
            }
            other => panic!("{key}: expected UnexpectedTensor, got {other:?}"),
        }
        assert!(msg.contains(key), "{msg}");
        println!("{msg}");
    }
}

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (adapter, _) = saved_adapter(dir.path());
    let mut tensors = candle_core::safetensors::load(weights_path(&adapter), &Device::Cpu).unwrap();
    let key = "base_model.model.model.blocks.1.q.lora_B.weight";
    tensors.remove(key).unwrap();
    candle_core::safetensors::save(&tensors, weights_path(&adapter)).unwrap();
    let err = load_err(&adapter);
    match &err {
        PeftError::MissingTensor { key: k, .. } => assert_eq!(k, key),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    assert!(err.to_string().contains(key));
    // Every tensor of a module gone.
    tensors.remove("base_model.model.model.blocks.1.q.lora_A.weight");
    candle_core::safetensors::save(&tensors, weights_path(&adapter)).unwrap();
    match load_err(&adapter) {
        PeftError::MissingTensor { key, .. } => {
            assert!(key.contains("model.blocks.1.q"), "{key}")
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

// =============================================================================================
// Model state
// =============================================================================================

#[test]
fn merging_twice() {
    let mut pm = tiny_model(5, 6);
    pm.add_adapter(ADAPTER, lora_random_b(&["q", "conv"], 2, 4.0))
        .unwrap();
    pm.merge().unwrap();
    let weights: Vec<Vec<u32>> = pm
        .layer_weights()
        .unwrap()
        .iter()
        .map(|(_, t)| bits(t))
        .collect();
    let err = pm.merge().expect_err("second merge");
    let msg = err.to_string();
    match &err {
        PeftError::AlreadyMerged { module, adapter } => {
            assert_eq!(adapter, ADAPTER);
            assert_eq!(module, "model.blocks.0.q", "the first merged layer");
        }
        other => panic!("expected AlreadyMerged, got {other:?}"),
    }
    assert!(
        msg.contains("`default`") && msg.contains("`model.blocks.0.q`"),
        "{msg}"
    );
    // Nothing was merged a second time.
    let after: Vec<Vec<u32>> = pm
        .layer_weights()
        .unwrap()
        .iter()
        .map(|(_, t)| bits(t))
        .collect();
    assert_eq!(after, weights);
    pm.unmerge().unwrap();
    match pm.unmerge() {
        Err(PeftError::NotMerged { .. }) => {}
        other => panic!("expected NotMerged, got {other:?}"),
    }
}

#[test]
fn unknown_and_duplicate_adapter_names() {
    let dir = tempfile::tempdir().unwrap();
    let (adapter, mut pm) = saved_adapter(dir.path());
    match pm.set_active(&[ADAPTER, "nope"]) {
        Err(PeftError::UnknownAdapter { adapter, .. }) => assert_eq!(adapter, "nope"),
        other => panic!("expected UnknownAdapter, got {other:?}"),
    }
    assert_eq!(pm.active_adapters(), &[ADAPTER.to_string()]);
    match pm.load_adapter(&adapter, ADAPTER) {
        Err(PeftError::DuplicateAdapter(n)) => assert_eq!(n, ADAPTER),
        other => panic!("expected DuplicateAdapter, got {other:?}"),
    }
    assert!(matches!(
        pm.save_adapter(dir.path().join("x"), "nope"),
        Err(PeftError::UnknownAdapter { .. })
    ));
    assert!(!dir.path().join("x").exists());
    assert!(matches!(
        pm.layer("model.nope"),
        Err(PeftError::UnknownModule(_))
    ));
}

/// A merge that fails on one layer (LoRA cannot merge into a grouped conv, as in PEFT) reports
/// the reason; the layers merged before it stay merged (as in PEFT), the state says so, the
/// model's outputs are unchanged, and `unmerge` restores the base.
#[test]
fn failed_merge_keeps_outputs_and_can_be_undone() {
    let mut r = rng(7);
    let w = HashMap::from([
        ("lin.weight".to_string(), rand_tensor(&mut r, &[4, 4], 0.5)),
        (
            "conv.weight".to_string(),
            rand_tensor(&mut r, &[4, 2, 3, 3], 0.5),
        ),
    ]);
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let b = PeftBuilder::new(vb);
    let lin = b.linear(4, 4, false, "lin").unwrap();
    let params = Conv2dParams {
        groups: 2,
        padding: 1,
        ..Conv2dParams::default()
    };
    let conv = b.conv2d(4, 4, (3, 3), params, false, "conv").unwrap();
    let mut pm = PeftModel::new((lin, conv), &b);
    pm.add_adapter(ADAPTER, lora_random_b(&["lin", "conv"], 2, 4.0))
        .unwrap();
    let x = rand_tensor(&mut rng(8), &[3, 4], 1.0);
    let img = rand_tensor(&mut rng(9), &[1, 4, 5, 5], 1.0);
    let run = |pm: &PeftModel<(candle_peft::PeftLinear, candle_peft::PeftConv2d)>| {
        let (lin, conv) = pm.model();
        (
            candle_core::Module::forward(lin, &x).unwrap(),
            candle_core::Module::forward(conv, &img).unwrap(),
        )
    };
    let (y0, c0) = run(&pm);
    let w0: Vec<Tensor> = pm
        .layer_weights()
        .unwrap()
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let err = pm.merge().expect_err("grouped conv merge");
    assert!(matches!(err, PeftError::Unsupported(_)), "{err:?}");
    assert!(err.to_string().contains("groups"), "{err}");
    let lin_layer = pm.layer("lin").unwrap();
    let conv_layer = pm.layer("conv").unwrap();
    assert_eq!(conv_layer.merged_adapters(), Vec::<String>::new());
    assert_eq!(bits(&conv_layer.weight().unwrap()), bits(&w0[1]));
    if !lin_layer.merged_adapters().is_empty() {
        assert!(max_abs_diff(&lin_layer.weight().unwrap(), &w0[0]) > 1e-3);
    }
    let (y1, c1) = run(&pm);
    assert!(max_abs_diff(&y0, &y1) < 1e-5);
    assert_eq!(bits(&c0), bits(&c1));
    if !lin_layer.merged_adapters().is_empty() {
        pm.unmerge().unwrap();
    }
    assert!(max_abs_diff(&pm.layer("lin").unwrap().weight().unwrap(), &w0[0]) < 1e-6);
    // The adapter still runs in activation space on the grouped conv.
    pm.disable().unwrap();
    let (_, c_off) = run(&pm);
    assert!(max_abs_diff(&c0, &c_off) > 1e-3);
}

// =============================================================================================
// Atomic saves
// =============================================================================================

fn snapshot(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        fs::read(weights_path(dir)).unwrap(),
        fs::read(config_path(dir)).unwrap(),
    )
}

#[test]
fn failed_save_leaves_previous_adapter_intact() {
    let dir = tempfile::tempdir().unwrap();
    // A folder name of 251 bytes: its temporary sibling `.<name>.tmp` (256 bytes) cannot be
    // created, so the save fails before anything is swapped in.
    let (saved, mut pm) = saved_adapter(dir.path());
    let adapter = dir.path().join("a".repeat(251));
    fs::rename(&saved, &adapter).unwrap();
    let before = snapshot(&adapter);
    // A different adapter (other rank and targets) saved over the same directory.
    pm.add_adapter("bigger", lora_random_b(&["q", "xq"], 4, 8.0))
        .unwrap();
    let err = pm
        .save_adapter(&adapter, "bigger")
        .expect_err("save should fail");
    match &err {
        PeftError::Io { path, .. } => {
            assert!(path.starts_with(dir.path()), "{}", path.display());
        }
        other => panic!("expected Io, got {other:?}"),
    }
    println!("temporary blocked: {err}");
    let after = snapshot(&adapter);
    assert!(after.0 == before.0, "a failed save replaced the weights");
    assert!(after.1 == before.1, "a failed save replaced the config");
    // The adapter on disk still loads and is the original one.
    let mut fresh = tiny_model(1, 9);
    fresh.load_adapter(&adapter, ADAPTER).unwrap();
    assert_eq!(outputs_bits(&fresh), outputs_bits(&pm));
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&adapter).len(), 2, "{:?}", names(&adapter));
    assert_eq!(names(dir.path()), ["a".repeat(251)], "no stray temporary");

    // Under a name that fits, the save goes through.
    let short = dir.path().join("adapter");
    fs::rename(&adapter, &short).unwrap();
    pm.save_adapter(&short, "bigger").unwrap();
    assert!(snapshot(&short) != before);
    assert_eq!(read_config(&short)["r"], serde_json::json!(4));
}

/// The adapter folder is replaced as one: a new folder is swapped in (the old one is never
/// written file by file), the files are those a fresh save writes byte for byte, other files
/// of the folder are kept, and no temporary is left. A failure inside the write leaves the old
/// folder as it was.
#[test]
fn adapter_save_swaps_the_whole_folder() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (adapter, mut pm) = saved_adapter(dir.path());
    fs::write(adapter.join("README.md"), "notes").unwrap();
    let inode = fs::metadata(&adapter).unwrap().ino();
    let old_weights_inode = fs::metadata(weights_path(&adapter)).unwrap().ino();
    pm.add_adapter("bigger", lora_random_b(&["q", "xq"], 4, 8.0))
        .unwrap();
    pm.save_adapter(&adapter, "bigger").unwrap();
    assert_ne!(
        fs::metadata(&adapter).unwrap().ino(),
        inode,
        "the folder was written in place, not swapped"
    );
    assert_ne!(
        fs::metadata(weights_path(&adapter)).unwrap().ino(),
        old_weights_inode
    );
    assert_eq!(
        fs::read_to_string(adapter.join("README.md")).unwrap(),
        "notes"
    );
    let fresh = dir.path().join("fresh");
    pm.save_adapter(&fresh, "bigger").unwrap();
    assert!(
        snapshot(&adapter) == snapshot(&fresh),
        "files differ from a fresh save"
    );
    let mut top: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["adapter", "fresh"]);

    // A write that fails half-way (one file written, then an error) changes nothing.
    let before = snapshot(&adapter);
    let err = candle_peft::io::atomic::write_dir_atomic(&adapter, |tmp| {
        fs::write(tmp.join("adapter_model.safetensors"), b"half").unwrap();
        Err(PeftError::Unsupported("killed mid-save".into()))
    })
    .unwrap_err();
    assert!(err.to_string().contains("killed mid-save"));
    assert!(snapshot(&adapter) == before);
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        2,
        "temporary left"
    );
}

/// Integer tensors where floats belong and NaN or infinite weights are refused at load (and so
/// by `merge` and `eval`), naming the file and the tensor.
#[test]
fn integer_and_non_finite_adapter_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = "base_model.model.model.blocks.1.v.lora_A.weight";
    let cases: [(&str, Tensor, &str); 4] = [
        (
            "i32",
            Tensor::ones((2, HIDDEN), DType::I32, &Device::Cpu).unwrap(),
            "is I32; adapter weights must be floating point",
        ),
        (
            "u8",
            Tensor::ones((2, HIDDEN), DType::U8, &Device::Cpu).unwrap(),
            "is U8",
        ),
        ("nan", poisoned(f32::NAN, 7), "holds NaN at flat index 7"),
        (
            "inf",
            poisoned(f32::NEG_INFINITY, 0),
            "holds -inf at flat index 0",
        ),
    ];
    for (name, t, expected) in cases {
        let (adapter, _) = saved_adapter(&dir.path().join(name));
        let mut tensors =
            candle_core::safetensors::load(weights_path(&adapter), &Device::Cpu).unwrap();
        tensors.insert(key.to_string(), t);
        candle_core::safetensors::save(&tensors, weights_path(&adapter)).unwrap();
        let msg = load_err(&adapter).to_string();
        println!("{name}: {msg}");
        assert!(msg.contains(key), "{msg}");
        assert!(msg.contains(expected), "{msg}");
        assert!(
            msg.contains(&weights_path(&adapter).display().to_string()),
            "{msg}"
        );
        let e = peft_format::check_adapter_file(&weights_path(&adapter)).unwrap_err();
        assert_eq!(e.to_string(), msg);
    }
}

/// A `[2, HIDDEN]` f32 tensor of ones with `value` at flat index `at`.
fn poisoned(value: f32, at: usize) -> Tensor {
    let mut v = vec![1f32; 2 * HIDDEN];
    v[at] = value;
    Tensor::from_vec(v, (2, HIDDEN), &Device::Cpu).unwrap()
}
