//! Gradients reach every LoRA var in all six MiniLM layers, and the frozen base weights get no
//! gradient at all (the frozen matmul's backward returns only dL/dx).
mod common;

use std::collections::BTreeSet;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use candle_peft::adapters::lora::InitLoraWeights;
use candle_peft::models::bert::{BertModel, mean_pool};
use candle_peft::{LoraConfig, PeftModel};

fn inputs() -> (Tensor, Tensor) {
    let path = common::fixture("peft-lora-minilm").join("inputs.safetensors");
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    (t["input_ids"].clone(), t["attention_mask"].clone())
}

/// MiniLM with LoRA r=8 on query/value. `init_lora_weights: false` draws B as well as A, so
/// both factors get a gradient at the first step (with B = 0, dL/dA = 0).
fn model_with_lora() -> PeftModel<BertModel> {
    let (mut peft, _) = BertModel::from_dir(common::minilm_dir(), &Device::Cpu).unwrap();
    let mut cfg = LoraConfig::new(&["query", "value"], 8, 16.0);
    cfg.init_lora_weights = InitLoraWeights::Bool(false);
    peft.add_adapter("default", cfg).unwrap();
    peft.train();
    peft
}

fn abs_sum(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Every one of the 24 LoRA vars (lora_A and lora_B on 12 modules) has a non-zero gradient.
fn check_every_var(peft: &PeftModel<BertModel>, grads: &GradStore) {
    let vars = peft.trainable_vars();
    assert_eq!(vars.len(), 24);
    let mut modules = BTreeSet::new();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(g.dims(), var.as_tensor().dims(), "{name}");
        let s = abs_sum(g);
        assert!(s > 0.0 && s.is_finite(), "{name}: gradient |sum| = {s}");
        let module = name.split(".lora_").next().unwrap().to_string();
        modules.insert(module);
    }
    assert_eq!(modules.len(), 12, "{modules:?}");
    for layer in 0..6 {
        for m in ["query", "value"] {
            let name = format!("base_model.model.encoder.layer.{layer}.attention.self.{m}");
            assert!(modules.contains(&name), "{name} has no LoRA var");
        }
    }
}

/// The GradStore holds no tensor the size of a base linear weight (384·384 or 1536·384, nor
/// the word embedding table): the frozen weights got no gradient computed.
fn check_frozen(peft: &PeftModel<BertModel>, grads: &GradStore) {
    let mut frozen_sizes = BTreeSet::new();
    for l in peft.model().linears() {
        frozen_sizes.insert(l.handle().weight().unwrap().elem_count());
    }
    assert!(frozen_sizes.contains(&(384 * 384)));
    assert!(frozen_sizes.contains(&(1536 * 384)));
    frozen_sizes.insert(30522 * 384); // word embeddings
    frozen_sizes.insert(512 * 384); // position embeddings
    let lora: usize = peft.num_trainable_parameters();
    let mut total = 0usize;
    for id in grads.get_ids() {
        let g = grads.get_id(*id).unwrap();
        let n = g.elem_count();
        total += n;
        assert!(
            !frozen_sizes.contains(&n),
            "a gradient of shape {:?} ({n} elements) matches a frozen weight's size",
            g.dims()
        );
    }
    println!(
        "GradStore: {} tensors, {total} elements (LoRA parameters: {lora})",
        grads.get_ids().count()
    );
    // Besides the LoRA grads, candle keeps a gradient for every untracked operand of a binary op
    // (frozen biases and norm weights broadcast to the activation's shape, the attention mask):
    // activation-sized, here 1.2 M elements for 3×12 tokens. A full fine-tune would hold every
    // base weight's gradient (11 M elements for the linears alone).
    let base: usize = peft
        .model()
        .linears()
        .iter()
        .map(|l| l.handle().weight().unwrap().elem_count())
        .sum();
    assert!(
        total < base / 4,
        "GradStore holds {total} elements (base linears: {base})"
    );
}

#[test]
fn mean_square_loss_reaches_every_lora_var() {
    let peft = model_with_lora();
    let (ids, mask) = inputs();
    let h = peft.model().forward(&ids, None, Some(&mask)).unwrap();
    let loss = h.sqr().unwrap().mean_all().unwrap();
    println!("loss = {}", loss.to_scalar::<f32>().unwrap());
    let grads = loss.backward().unwrap();
    check_every_var(&peft, &grads);
    check_frozen(&peft, &grads);
}

#[test]
fn pooled_cosine_loss_reaches_every_lora_var() {
    let peft = model_with_lora();
    let (ids, mask) = inputs();
    let h = peft.model().forward(&ids, None, Some(&mask)).unwrap();
    let e = mean_pool(&h, Some(&mask)).unwrap(); // [3, 384]
    let norm = e.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    let e = e.broadcast_div(&norm).unwrap();
    // 1 - cos(e0, e1) + 1 - cos(e0, e2)
    let e0 = e.narrow(0, 0, 1).unwrap();
    let rest = e.narrow(0, 1, 2).unwrap();
    let cos = rest.broadcast_mul(&e0).unwrap().sum(1).unwrap();
    let loss = (1.0 - cos).unwrap().sum_all().unwrap();
    println!("loss = {}", loss.to_scalar::<f32>().unwrap());
    let grads = loss.backward().unwrap();
    check_every_var(&peft, &grads);
    check_frozen(&peft, &grads);
}

/// One SGD step on the LoRA vars lowers the loss: the gradients point the right way.
#[test]
fn one_step_lowers_the_loss() {
    let peft = model_with_lora();
    let (ids, mask) = inputs();
    let loss_of = |p: &PeftModel<BertModel>| {
        let h = p.model().forward(&ids, None, Some(&mask)).unwrap();
        h.sqr().unwrap().mean_all().unwrap()
    };
    let loss = loss_of(&peft);
    let grads = loss.backward().unwrap();
    for (_, var) in peft.trainable_vars() {
        let g = grads.get(var.as_tensor()).unwrap();
        let updated = (var.as_tensor() - (g * 1e-2).unwrap()).unwrap();
        var.set(&updated).unwrap();
    }
    let before = loss.to_scalar::<f32>().unwrap();
    let after = loss_of(&peft).to_scalar::<f32>().unwrap();
    println!("loss {before} → {after}");
    assert!(after < before, "loss went from {before} to {after}");
}
