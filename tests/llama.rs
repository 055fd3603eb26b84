//! The Llama-family model against candle-transformers (SmolLM2, tiny Llama/Mistral/Qwen2),
//! the padding mask, gradients through LoRA on all seven projections (every var, and a
//! directional finite difference), folder/sharded loading, merged export, and bad configs.
mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarBuilder;
use candle_peft::adapters::lora::InitLoraWeights;
use candle_peft::io::source::{self, SourceKind};
use candle_peft::models::llama::LLAMA_TARGET_MODULES as SEVEN;
use candle_peft::models::llama::{LlamaArch, LlamaConfig, LlamaForCausalLM, RopeScaling};
use candle_peft::{LoraConfig, PeftError, PeftModel};
use common::llama::*;
use serde_json::json;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(a, b)
}

// ---------------------------------------------------------------------------------------------
// Oracles.

/// candle-transformers' Llama on the same weights and config (its forward returns the last
/// position's logits).
fn candle_llama_last_logits(
    cfg_json: &serde_json::Value,
    weights: HashMap<String, Tensor>,
    tokens: &[u32],
) -> Tensor {
    use candle_transformers::models::llama as ct;
    let cfg: ct::LlamaConfig = serde_json::from_value(cfg_json.clone()).unwrap();
    let cfg = cfg.into_config(false);
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let model = ct::Llama::load(vb, &cfg).unwrap();
    let mut cache = ct::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
    model.forward(&ids(tokens), 0, &mut cache).unwrap()
}

#[test]
fn smollm2_matches_candle_transformers() {
    let (weights, cfg) = smollm2_tensors();
    assert_eq!(cfg.architecture, LlamaArch::Llama);
    assert!(cfg.tie_word_embeddings);
    let peft = build(&cfg, &weights);
    let ours = last_position(&peft.model().forward(&ids(SMOLLM2_PROMPT), None).unwrap());
    let theirs = candle_llama_last_logits(&cfg.to_hf_json(), weights, SMOLLM2_PROMPT);
    let d = max_diff(&ours, &theirs);
    assert!(d <= 1e-4, "max |Δlogit| = {d}");
    // Not a degenerate comparison: the logits spread over several units.
    let v = flat(&ours);
    let spread =
        v.iter().fold(f32::MIN, |m, &x| m.max(x)) - v.iter().fold(f32::MAX, |m, &x| m.min(x));
    assert!(spread > 5.0, "spread {spread}");
}

#[test]
fn tiny_llama_gqa_untied_and_tied_match_candle_transformers() {
    for tied in [false, true] {
        let json = tiny_llama_json(tied);
        let cfg = config(&json);
        let weights = random_weights(&cfg, 11);
        let tokens = token_ids(9, cfg.vocab_size, 3);
        let ours = last_position(
            &build(&cfg, &weights)
                .model()
                .forward(&ids(&tokens), None)
                .unwrap(),
        );
        let theirs = candle_llama_last_logits(&json, weights, &tokens);
        let d = max_diff(&ours, &theirs);
        assert!(d <= 1e-4, "tied={tied}: max |Δlogit| = {d}");
    }
}

#[test]
fn tiny_mistral_matches_candle_transformers() {
    use candle_transformers::models::mistral as ct;
    let json = tiny_mistral_json();
    let cfg = config(&json);
    assert_eq!(cfg.head_dim, 16);
    assert_eq!(cfg.sliding_window, Some(64));
    let weights = random_weights(&cfg, 5);
    let tokens = token_ids(11, cfg.vocab_size, 4);
    let ours = last_position(
        &build(&cfg, &weights)
            .model()
            .forward(&ids(&tokens), None)
            .unwrap(),
    );
    let ct_cfg: ct::Config = serde_json::from_value(json).unwrap();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let mut model = ct::Model::new(&ct_cfg, vb).unwrap();
    let theirs = model.forward(&ids(&tokens), 0).unwrap().squeeze(1).unwrap();
    let d = max_diff(&ours, &theirs);
    assert!(d <= 1e-4, "max |Δlogit| = {d}");
}

#[test]
fn tiny_qwen2_with_qkv_bias_matches_candle_transformers() {
    use candle_transformers::models::qwen2 as ct;
    let json = tiny_qwen2_json();
    let cfg = config(&json);
    assert!(cfg.qkv_bias && !cfg.o_bias && cfg.tie_word_embeddings);
    let weights = random_weights(&cfg, 8);
    let tokens = token_ids(10, cfg.vocab_size, 9);
    let peft = build(&cfg, &weights);
    let names = peft.layer_names();
    assert!(names.contains(&"model.layers.1.self_attn.k_proj".to_string()));
    assert!(
        peft.layer("model.layers.0.self_attn.q_proj")
            .unwrap()
            .bias()
            .is_some()
    );
    assert!(
        peft.layer("model.layers.0.self_attn.o_proj")
            .unwrap()
            .bias()
            .is_none()
    );
    let ours = last_position(&peft.model().forward(&ids(&tokens), None).unwrap());
    let ct_cfg: ct::Config = serde_json::from_value(json).unwrap();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let mut model = ct::ModelForCausalLM::new(&ct_cfg, vb).unwrap();
    let theirs = model.forward(&ids(&tokens), 0).unwrap().squeeze(1).unwrap();
    let d = max_diff(&ours, &theirs);
    assert!(d <= 1e-4, "max |Δlogit| = {d}");
}

// ---------------------------------------------------------------------------------------------
// Masks.

#[test]
fn causal_and_padding_masks() {
    let (peft, cfg) = tiny(&tiny_llama_json(false), 21);
    let model = peft.model();
    let long = token_ids(7, cfg.vocab_size, 1);
    let short = token_ids(4, cfg.vocab_size, 2);

    // Causal: changing the last token leaves every earlier position's logits unchanged.
    let mut changed = long.clone();
    changed[6] = (changed[6] + 1) % cfg.vocab_size as u32;
    let a = model.forward(&ids(&long), None).unwrap();
    let b = model.forward(&ids(&changed), None).unwrap();
    assert_eq!(
        max_diff(&a.narrow(1, 0, 6).unwrap(), &b.narrow(1, 0, 6).unwrap()),
        0.0
    );
    assert!(max_diff(&a.narrow(1, 6, 1).unwrap(), &b.narrow(1, 6, 1).unwrap()) > 1e-3);

    // Padding: a right-padded row gives its unpadded logits; the other row is unaffected.
    let mut padded = short.clone();
    padded.extend([5, 6, 7]);
    let batch = Tensor::from_vec([long.clone(), padded].concat(), (2, 7), &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32; 7], [1, 1, 1, 1, 0, 0, 0]], &Device::Cpu).unwrap();
    let both = model.forward(&batch, Some(&mask)).unwrap();
    let alone = model.forward(&ids(&short), None).unwrap();
    let d = max_diff(&both.i((1..2, 0..4)).unwrap(), &alone);
    assert!(d <= 1e-5, "padded row differs by {d}");
    let d = max_diff(&both.i(0..1).unwrap(), &a);
    assert!(d <= 1e-5, "full row differs by {d}");
    // Every logit is finite, pad positions included.
    assert!(flat(&both).iter().all(|v| v.is_finite()));
    // A left-padded row (a pad key before real tokens) is masked too: its real queries never
    // see the pad token's value.
    let left = Tensor::new(&[[9u32, 3, 4, 5]], &Device::Cpu).unwrap();
    let left_mask = Tensor::new(&[[0u32, 1, 1, 1]], &Device::Cpu).unwrap();
    let other = Tensor::new(&[[10u32, 3, 4, 5]], &Device::Cpu).unwrap();
    let x = model.forward(&left, Some(&left_mask)).unwrap();
    let y = model.forward(&other, Some(&left_mask)).unwrap();
    assert_eq!(
        max_diff(&x.narrow(1, 1, 3).unwrap(), &y.narrow(1, 1, 3).unwrap()),
        0.0
    );

    let bad = Tensor::new(&[[1u32, 1]], &Device::Cpu).unwrap();
    let err = model.forward(&ids(&long), Some(&bad)).unwrap_err();
    assert!(matches!(err, PeftError::ShapeMismatch { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Gradients.

fn with_lora_on_seven(peft: &mut PeftModel<LlamaForCausalLM>, r: usize) {
    let mut lora = LoraConfig::new(&SEVEN, r, 2.0 * r as f64);
    // Random B as well as A: with B = 0, dL/dA is exactly zero at the first step.
    lora.init_lora_weights = InitLoraWeights::Bool(false);
    peft.add_adapter("default", lora).unwrap();
    peft.train();
}

/// Mean next-token cross-entropy over the sequence.
fn next_token_loss(model: &LlamaForCausalLM, tokens: &[u32]) -> Tensor {
    let t = tokens.len();
    let logits = model.forward(&ids(&tokens[..t - 1]), None).unwrap();
    let targets = Tensor::new(&tokens[1..], &Device::Cpu).unwrap();
    candle_nn::loss::cross_entropy(&logits.squeeze(0).unwrap(), &targets).unwrap()
}

fn check_every_var_has_gradient(peft: &PeftModel<LlamaForCausalLM>, layers: usize, loss: &Tensor) {
    let grads = loss.backward().unwrap();
    let vars = peft.trainable_vars();
    assert_eq!(vars.len(), layers * 7 * 2);
    let mut modules = std::collections::BTreeSet::new();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let s = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(s > 0.0 && s.is_finite(), "{name}: |grad| sum {s}");
        modules.insert(name.split(".lora_").next().unwrap().to_string());
    }
    for l in 0..layers {
        for p in SEVEN {
            let group = if ["gate_proj", "up_proj", "down_proj"].contains(&p) {
                "mlp"
            } else {
                "self_attn"
            };
            let name = format!("base_model.model.model.layers.{l}.{group}.{p}");
            assert!(modules.contains(&name), "{name} has no LoRA var");
        }
    }
}

#[test]
fn lora_on_seven_projections_gradients_tiny() {
    let (mut peft, cfg) = tiny(&tiny_llama_json(true), 31);
    with_lora_on_seven(&mut peft, 4);
    let tokens = token_ids(12, cfg.vocab_size, 6);
    let loss = next_token_loss(peft.model(), &tokens);
    check_every_var_has_gradient(&peft, cfg.num_hidden_layers, &loss);

    // Directional derivative: Σ g·d against (L(θ + εd) − L(θ − εd)) / 2ε, d random.
    let grads = loss.backward().unwrap();
    let vars: Vec<Var> = peft.trainable_vars().into_iter().map(|(_, v)| v).collect();
    let dirs: Vec<Tensor> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let n = v.as_tensor().elem_count();
            let vals: Vec<f32> = token_ids(n, 2001, 17 + i as u64)
                .iter()
                .map(|&x| x as f32 / 1000.0 - 1.0)
                .collect();
            Tensor::from_vec(vals, v.as_tensor().shape(), &Device::Cpu).unwrap()
        })
        .collect();
    let analytic: f64 = vars
        .iter()
        .zip(&dirs)
        .map(|(v, d)| {
            let g = grads.get(v.as_tensor()).unwrap();
            (g * d)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .sum();
    let originals: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let eps = 1e-3;
    let loss_at = |step: f64| -> f64 {
        for ((v, o), d) in vars.iter().zip(&originals).zip(&dirs) {
            v.set(&(o + (d * step).unwrap()).unwrap()).unwrap();
        }
        next_token_loss(peft.model(), &tokens)
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
    loss_at(0.0);
    let rel = (numeric - analytic).abs() / analytic.abs().max(1e-3);
    assert!(
        rel < 0.02,
        "analytic {analytic} vs finite difference {numeric}"
    );
}

#[test]
fn lora_on_seven_projections_gradients_smollm2() {
    let candle_peft::models::Pretrained {
        model: mut peft,
        config: cfg,
        ..
    } = LlamaForCausalLM::from_pretrained(common::smollm2_gguf().to_str().unwrap(), &Device::Cpu)
        .unwrap();
    with_lora_on_seven(&mut peft, 2);
    let loss = next_token_loss(peft.model(), &SMOLLM2_PROMPT[..8]);
    check_every_var_has_gradient(&peft, cfg.num_hidden_layers, &loss);
}

// ---------------------------------------------------------------------------------------------
// Sources and exports.

/// Writes a tiny model as a Hugging Face folder: config.json and either one bf16
/// `model.safetensors` or two f32 shards with an index.
fn write_folder(
    dir: &std::path::Path,
    json: &serde_json::Value,
    weights: &HashMap<String, Tensor>,
    sharded: bool,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(json).unwrap(),
    )
    .unwrap();
    if !sharded {
        let bf16: HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).unwrap()))
            .collect();
        candle_core::safetensors::save(&bf16, dir.join("model.safetensors")).unwrap();
        return;
    }
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|k| ((*k).clone(), weights[*k].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.join(file)).unwrap();
        for k in part {
            map.insert((*k).clone(), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn folder_hub_and_sharded_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tiny_llama_json(false);
    let cfg = config(&json);
    let weights = random_weights(&cfg, 41);
    let tokens = token_ids(6, cfg.vocab_size, 2);
    let reference = build(&cfg, &weights)
        .model()
        .forward(&ids(&tokens), None)
        .unwrap();

    let sharded = tmp.path().join("sharded");
    write_folder(&sharded, &json, &weights, true);
    let src = source::resolve_local(&sharded).unwrap();
    assert_eq!(src.weights.len(), 2);
    let (peft, _) = LlamaForCausalLM::from_source(&src, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(
            &peft.model().forward(&ids(&tokens), None).unwrap(),
            &reference
        ),
        0.0
    );

    // The same folder as a hub snapshot, resolved offline from the cache.
    let hub = tmp.path().join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = hub.join("models--tiny--llama");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(&sharded).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, snapshot.join(path.file_name().unwrap())).unwrap();
    }
    let opts = source::HubOptions::new(&hub).offline(true);
    let src = source::resolve_with("tiny/llama", &opts).unwrap();
    assert!(matches!(src.kind, SourceKind::Hub { .. }));
    let (peft, _) = LlamaForCausalLM::from_source(&src, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(
            &peft.model().forward(&ids(&tokens), None).unwrap(),
            &reference
        ),
        0.0
    );

    // bf16 on disk, loaded as f32: the weights are bf16-rounded, the logits close.
    let single = tmp.path().join("single");
    write_folder(&single, &json, &weights, false);
    let src = source::resolve_local(&single).unwrap();
    let (peft, _) = LlamaForCausalLM::from_source(&src, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(peft.model().dtype(), DType::F32);
    let d = max_diff(
        &peft.model().forward(&ids(&tokens), None).unwrap(),
        &reference,
    );
    assert!(d > 0.0 && d < 0.1, "bf16 weights: max |Δlogit| {d}");
}

#[test]
fn tiny_export_round_trip_and_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tiny_qwen2_json();
    let cfg = config(&json);
    let weights = random_weights(&cfg, 51);
    let base = tmp.path().join("base");
    write_folder(&base, &json, &weights, true);
    std::fs::write(base.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(
        base.join("generation_config.json"),
        r#"{"eos_token_id": 2}"#,
    )
    .unwrap();
    let src = source::resolve_local(&base).unwrap();
    let (mut peft, _) = LlamaForCausalLM::from_source(&src, DType::F32, &Device::Cpu).unwrap();
    with_lora_on_seven(&mut peft, 2);
    peft.eval();
    let tokens = token_ids(7, cfg.vocab_size, 3);
    let adapted = peft.model().forward(&ids(&tokens), None).unwrap();

    // Exporting with an unmerged adapter is refused; exporting into the base folder too.
    let err = peft
        .model()
        .save_pretrained(&src, &tmp.path().join("x"), DType::F32)
        .unwrap_err();
    assert!(err.to_string().contains("not merged"), "{err}");

    let out = tmp.path().join("merged");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("model-00001-of-00009.safetensors"), b"stale").unwrap();
    LlamaForCausalLM::export_merged(peft, &src, &out, DType::F32).unwrap();
    assert!(!out.join("model-00001-of-00009.safetensors").exists());
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let exported = source::resolve_local(&out).unwrap();
    let (merged, merged_cfg) =
        LlamaForCausalLM::from_source(&exported, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(merged_cfg.architecture, LlamaArch::Qwen2);
    assert_eq!(merged_cfg.torch_dtype.as_deref(), Some("float32"));
    let d = max_diff(
        &merged.model().forward(&ids(&tokens), None).unwrap(),
        &adapted,
    );
    assert!(d <= 1e-4, "merged export differs by {d}");

    // bf16 export: every tensor stored as bf16, config says so.
    let (peft, _) = LlamaForCausalLM::from_source(&src, DType::F32, &Device::Cpu).unwrap();
    let out16 = tmp.path().join("bf16");
    LlamaForCausalLM::export_merged(peft, &src, &out16, DType::BF16).unwrap();
    let st = candle_core::safetensors::load(out16.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(st.len(), weights.len());
    assert!(st.values().all(|t| t.dtype() == DType::BF16));
    let cfg16 = LlamaConfig::from_file(out16.join("config.json")).unwrap();
    assert_eq!(cfg16.torch_dtype.as_deref(), Some("bfloat16"));

    let (peft, _) = LlamaForCausalLM::from_source(&src, DType::F32, &Device::Cpu).unwrap();
    let err = LlamaForCausalLM::export_merged(peft, &src, &base, DType::F32).unwrap_err();
    assert!(err.to_string().contains("base model folder"), "{err}");
    let (peft, _) = LlamaForCausalLM::from_source(&src, DType::F32, &Device::Cpu).unwrap();
    assert!(LlamaForCausalLM::export_merged(peft, &src, &out, DType::U32).is_err());

    // An untied model (Mistral, head_dim ≠ hidden/heads) writes lm_head.weight and reloads.
    let json = tiny_mistral_json();
    let cfg = config(&json);
    let base = tmp.path().join("mistral");
    write_folder(&base, &json, &random_weights(&cfg, 52), false);
    let src = source::resolve_local(&base).unwrap();
    let (mut peft, _) = LlamaForCausalLM::from_source(&src, DType::F32, &Device::Cpu).unwrap();
    with_lora_on_seven(&mut peft, 2);
    peft.eval();
    let tokens = token_ids(5, cfg.vocab_size, 1);
    let adapted = peft.model().forward(&ids(&tokens), None).unwrap();
    let out = tmp.path().join("mistral-merged");
    LlamaForCausalLM::export_merged(peft, &src, &out, DType::F32).unwrap();
    let st = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        st["lm_head.weight"].dims(),
        &[cfg.vocab_size, cfg.hidden_size]
    );
    let exported = source::resolve_local(&out).unwrap();
    let (merged, merged_cfg) =
        LlamaForCausalLM::from_source(&exported, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        (merged_cfg.head_dim, merged_cfg.sliding_window),
        (16, Some(64))
    );
    let d = max_diff(
        &merged.model().forward(&ids(&tokens), None).unwrap(),
        &adapted,
    );
    assert!(d <= 1e-4, "merged Mistral export differs by {d}");
}

#[test]
fn smollm2_merged_export_loads_in_candle_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let src = smollm2_source();
    assert_eq!(src.kind, SourceKind::Gguf);
    let (mut peft, _) = LlamaForCausalLM::from_source(&src, DType::F32, &Device::Cpu).unwrap();
    with_lora_on_seven(&mut peft, 4);
    peft.eval();
    let tokens = &SMOLLM2_PROMPT[..10];
    let adapted = last_position(&peft.model().forward(&ids(tokens), None).unwrap());
    let base = {
        peft.disable().unwrap();
        let b = last_position(&peft.model().forward(&ids(tokens), None).unwrap());
        peft.enable().unwrap();
        b
    };
    // The adapter changes the logits measurably, so the export check below means something.
    assert!(max_diff(&adapted, &base) > 1e-2);

    let out = tmp.path().join("merged");
    LlamaForCausalLM::export_merged(peft, &src, &out, DType::F32).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg_json["tie_word_embeddings"], true);
    let weights =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!weights.contains_key("lm_head.weight"));
    assert_eq!(weights.len(), 1 + 30 * 9 + 1);
    let theirs = candle_llama_last_logits(&cfg_json, weights, tokens);
    let d = max_diff(&adapted, &theirs);
    assert!(
        d <= 1e-3,
        "candle-transformers on the export: max |Δlogit| = {d}"
    );

    // The exported tokenizer.json encodes as the GGUF tokenizer does.
    let from_json = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let from_gguf = candle_peft::load_causal_tokenizer(&src).unwrap();
    let text = "<|im_start|>user\nHello 2024 wörld!<|im_end|>";
    assert_eq!(
        from_json.encode(text, false).unwrap().get_ids(),
        from_gguf.encode(text, false).unwrap().get_ids()
    );
}

// ---------------------------------------------------------------------------------------------
// Configs and bad input.

#[test]
fn config_parsing() {
    let cfg = config(&tiny_llama_json(false));
    assert_eq!(
        (cfg.num_key_value_heads, cfg.head_dim, cfg.num_kv_groups()),
        (2, 8, 2)
    );
    assert_eq!(cfg.eos_token_ids, vec![2]);
    // The config survives its own export.
    let again = LlamaConfig::from_json(&cfg.to_hf_json()).unwrap();
    assert_eq!(
        LlamaConfig {
            source_json: Default::default(),
            ..again
        },
        LlamaConfig {
            source_json: Default::default(),
            ..cfg.clone()
        }
    );

    // model_type alone is enough; defaults follow transformers.
    let mut j = tiny_llama_json(false);
    j.as_object_mut().unwrap().remove("architectures");
    j["model_type"] = json!("mistral");
    assert_eq!(config(&j).architecture, LlamaArch::Mistral);
    let mut j = tiny_llama_json(false);
    for key in [
        "num_key_value_heads",
        "rope_theta",
        "rms_norm_eps",
        "max_position_embeddings",
    ] {
        j.as_object_mut().unwrap().remove(key);
    }
    let d = config(&j);
    assert_eq!(
        (d.num_key_value_heads, d.max_position_embeddings),
        (4, 2048)
    );
    assert_eq!((d.rope_theta, d.rms_norm_eps), (10000.0, 1e-6));

    // eos as a list; llama3 scaling lowers only the low frequencies.
    let mut j = tiny_llama_json(false);
    j["eos_token_id"] = json!([2, 7]);
    j["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024});
    let l3 = config(&j);
    assert_eq!(l3.eos_token_ids, vec![2, 7]);
    let plain = cfg.rope_frequencies();
    let scaled = l3.rope_frequencies();
    // Wavelengths 2π/ω: 6.3 and 63 (< 1024/4: kept), 628 (between: smoothed), 6283 (> 1024:
    // divided by the factor).
    assert_eq!(&scaled[..2], &plain[..2]);
    assert!(scaled[2] < plain[2] && scaled[2] > plain[2] / 8.0);
    assert!((scaled[3] - plain[3] / 8.0).abs() < 1e-9);
    assert!(matches!(l3.rope_scaling, Some(RopeScaling::Llama3 { .. })));
    j["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    let lin = config(&j);
    assert!((lin.rope_frequencies()[1] - plain[1] / 2.0).abs() < 1e-9);
}

#[test]
fn bad_configs_are_clear_errors() {
    let mut j = tiny_llama_json(false);
    j["architectures"] = json!(["GPT2LMHeadModel"]);
    let err = LlamaConfig::from_json(&j).unwrap_err();
    assert!(matches!(err, PeftError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");

    // Through a folder source too.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&tiny_llama_json(false));
    write_folder(tmp.path(), &j, &random_weights(&cfg, 1), false);
    let src = source::resolve_local(tmp.path()).unwrap();
    let err = LlamaForCausalLM::from_source(&src, DType::F32, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");

    let mut j = tiny_llama_json(false);
    j.as_object_mut().unwrap().remove("architectures");
    j["model_type"] = json!("gemma");
    assert!(
        LlamaConfig::from_json(&j)
            .unwrap_err()
            .to_string()
            .contains("gemma")
    );

    for (key, value, needle) in [
        ("hidden_act", json!("gelu"), "gelu"),
        (
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 4.0}),
            "yarn",
        ),
        ("num_key_value_heads", json!(3), "num_key_value_heads"),
        ("hidden_size", json!("big"), "hidden_size"),
    ] {
        let mut j = tiny_llama_json(false);
        j[key] = value;
        let err = LlamaConfig::from_json(&j).unwrap_err().to_string();
        assert!(err.contains(needle), "{key}: {err}");
    }
    let mut j = tiny_llama_json(false);
    j.as_object_mut().unwrap().remove("vocab_size");
    assert!(
        LlamaConfig::from_json(&j)
            .unwrap_err()
            .to_string()
            .contains("vocab_size")
    );

    // A checkpoint missing a tensor names it.
    let mut weights = random_weights(&cfg, 2);
    weights.remove("model.layers.1.mlp.up_proj.weight");
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let err = LlamaForCausalLM::new(&cfg, &candle_peft::PeftBuilder::new(vb)).unwrap_err();
    assert!(
        err.to_string().contains("model.layers.1.mlp.up_proj"),
        "{err}"
    );
}

#[test]
fn sequence_beyond_context_is_refused_beyond_window_is_not() {
    let (peft, cfg) = tiny(&tiny_llama_json(false), 3);
    let too_long = token_ids(cfg.max_position_embeddings + 1, cfg.vocab_size, 1);
    let err = peft
        .model()
        .forward(&ids(&too_long), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("65") && err.contains("64"), "{err}");

    // Past the window, Mistral attends over the last `sliding_window` keys (the values are
    // checked against transformers in tests/sliding_window.rs).
    let (peft, cfg) = tiny(&tiny_mistral_json(), 3);
    let beyond_window = token_ids(cfg.sliding_window.unwrap() + 1, cfg.vocab_size, 1);
    let logits = peft.model().forward(&ids(&beyond_window), None).unwrap();
    assert_eq!(logits.dims(), &[1, beyond_window.len(), cfg.vocab_size]);
}
