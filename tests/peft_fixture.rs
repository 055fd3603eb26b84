//! The HF PEFT 0.21 LoRA fixture on all-MiniLM-L6-v2 (r=8, alpha=16, query/value): our forward,
//! merge and file round trips against what PEFT computed and wrote.
mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use candle_peft::models::bert::BertModel;
use candle_peft::{LoraConfig, PeftModel};

fn fixture() -> PathBuf {
    common::fixture("peft-lora-minilm")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join(name), &Device::Cpu).unwrap()
}

fn inputs() -> (Tensor, Tensor) {
    let t = load("inputs.safetensors");
    (t["input_ids"].clone(), t["attention_mask"].clone())
}

fn minilm() -> PeftModel<BertModel> {
    BertModel::from_dir(common::minilm_dir(), &Device::Cpu)
        .unwrap()
        .0
}

fn forward(model: &BertModel) -> Tensor {
    let (ids, mask) = inputs();
    model.forward(&ids, None, Some(&mask)).unwrap()
}

use common::max_abs_diff;

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn forward_with_peft_adapter_matches_peft() {
    let mut peft = minilm();
    let base = forward(peft.model());
    peft.load_adapter(fixture().join("adapter"), "default")
        .unwrap();
    assert_eq!(peft.trainable_vars().len(), 24);
    let out = forward(peft.model());
    let expected = &load("expected.safetensors")["output"];
    assert_eq!(out.dims(), &[3, 12, 384]);
    let d = max_abs_diff(&out, expected);
    println!("adapter forward: max |ours - PEFT| = {d:e}");
    assert!(d <= 1e-4, "max abs diff {d}");
    // The adapter does change the output (the fixture is not a no-op).
    let moved = max_abs_diff(&out, &base);
    println!("adapter moves the output by up to {moved:e}");
    assert!(moved > 1e-2, "adapter changed the output by only {moved}");
}

#[test]
fn merge_and_unload_matches_peft() {
    let mut peft = minilm();
    peft.load_adapter(fixture().join("adapter"), "default")
        .unwrap();
    let model = peft.merge_and_unload().unwrap();
    let out = forward(&model);
    let expected = &load("expected.safetensors")["merged_output"];
    let d = max_abs_diff(&out, expected);
    println!("merged forward: max |ours - PEFT| = {d:e}");
    assert!(d <= 1e-4, "max abs diff {d}");

    let subset = load("merged_subset.safetensors");
    assert_eq!(subset.len(), 4);
    let weights: HashMap<String, Tensor> = model
        .linears()
        .into_iter()
        .map(|l| {
            (
                format!("{}.weight", l.handle().name()),
                l.handle().weight().unwrap(),
            )
        })
        .collect();
    let mut worst = 0f32;
    for (key, want) in &subset {
        let got = weights
            .get(key)
            .unwrap_or_else(|| panic!("no merged weight {key}"));
        let d = max_abs_diff(got, want);
        worst = worst.max(d);
        assert!(d <= 1e-5, "{key}: max abs diff {d}");
    }
    println!("merged weights: max |ours - PEFT| = {worst:e}");
    // No adapter is left behind.
    assert!(
        model
            .linears()
            .iter()
            .all(|l| l.handle().adapter_names().is_empty())
    );
}

#[test]
fn fresh_lora_is_exactly_the_base() {
    let mut peft = minilm();
    let base = forward(peft.model());
    peft.add_adapter("default", LoraConfig::new(&["query", "value"], 8, 16.0))
        .unwrap();
    assert_eq!(peft.trainable_vars().len(), 24);
    let out = forward(peft.model());
    assert_eq!(max_abs_diff(&out, &base), 0.0);
}

#[test]
fn save_load_save_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));

    let mut a = minilm();
    a.load_adapter(fixture().join("adapter"), "default")
        .unwrap();
    a.save_adapter(&first, "default").unwrap();

    let mut b = minilm();
    b.load_adapter(&first, "default").unwrap();
    b.save_adapter(&second, "default").unwrap();

    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let x = std::fs::read(first.join(f)).unwrap();
        let y = std::fs::read(second.join(f)).unwrap();
        assert!(!x.is_empty());
        assert!(x == y, "{f} differs after save → load → save");
    }
    // And the tensors equal PEFT's file exactly.
    let ours =
        candle_core::safetensors::load(first.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let peft_file = load("adapter/adapter_model.safetensors");
    assert_eq!(ours.len(), peft_file.len());
    for (k, t) in &peft_file {
        assert_eq!(max_abs_diff(&ours[k], t), 0.0, "{k}");
    }
    // A model with the re-saved adapter computes PEFT's output.
    let d = max_abs_diff(&forward(b.model()), &load("expected.safetensors")["output"]);
    assert!(d <= 1e-4, "max abs diff {d}");
}

#[test]
fn merge_then_unmerge_restores_weights() {
    let mut peft = minilm();
    let before: Vec<(String, Tensor)> = peft.layer_weights().unwrap();
    peft.load_adapter(fixture().join("adapter"), "default")
        .unwrap();
    let adapter_out = forward(peft.model());
    peft.merge().unwrap();
    // Merged: same output as the unmerged adapter (within float error) and changed weights.
    let merged_out = forward(peft.model());
    let d = max_abs_diff(&merged_out, &adapter_out);
    assert!(d <= 1e-4, "merged vs unmerged output: {d}");
    let q0 = peft
        .layer("encoder.layer.0.attention.self.query")
        .unwrap()
        .weight()
        .unwrap();
    let q0_before = &before
        .iter()
        .find(|(k, _)| k == "encoder.layer.0.attention.self.query.weight")
        .unwrap()
        .1;
    assert!(max_abs_diff(&q0, q0_before) > 1e-4);
    peft.unmerge().unwrap();
    let after = peft.layer_weights().unwrap();
    assert_eq!(before.len(), after.len());
    let mut worst = 0f32;
    for ((k0, w0), (k1, w1)) in before.iter().zip(&after) {
        assert_eq!(k0, k1);
        // Some tensors are all zeros (MiniLM's pooler bias): they must come back exactly.
        let rel = max_abs_diff(w0, w1) / max_abs(w0).max(f32::MIN_POSITIVE);
        worst = worst.max(rel);
        assert!(rel <= 1e-6, "{k0}: relative error {rel}");
    }
    println!("merge → unmerge: max relative weight error = {worst:e}");
    let d = max_abs_diff(&forward(peft.model()), &adapter_out);
    assert!(d <= 1e-4, "unmerged output: {d}");
}

#[test]
fn disabled_adapter_gives_the_base() {
    let mut peft = minilm();
    let base = forward(peft.model());
    peft.load_adapter(fixture().join("adapter"), "default")
        .unwrap();
    peft.disable().unwrap();
    assert_eq!(max_abs_diff(&forward(peft.model()), &base), 0.0);
    peft.enable().unwrap();
    let d = max_abs_diff(
        &forward(peft.model()),
        &load("expected.safetensors")["output"],
    );
    assert!(d <= 1e-4, "re-enabled: {d}");
    // Disabling a merged model unmerges it and gives the base again.
    peft.merge().unwrap();
    peft.disable().unwrap();
    let d = max_abs_diff(&forward(peft.model()), &base);
    assert!(d <= 1e-5, "disabled after merge: {d}");
}
