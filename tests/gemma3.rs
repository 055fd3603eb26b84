//! Gemma 3 against transformers (tests/fixtures/gemma3, from scripts/fixtures/gemma3.py): the
//! 270M Q4_K_M GGUF dequantised (logits on a 600-token input, past the 512-token window, and
//! greedy decoding through the KV cache) and kept in its blocks (`--base-dtype gguf`); on the
//! tiny random Gemma, gradients through LoRA on all seven projections against a central finite
//! difference, the merged Hugging Face export, and a short causal-LM training run. (The tiny
//! model's logits and greedy tokens are checked in tests/sliding_window.rs.)
mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_peft::adapters::lora::InitLoraWeights;
use candle_peft::io::gguf::GgufModel;
use candle_peft::io::source;
use candle_peft::models::llama::LLAMA_TARGET_MODULES as SEVEN;
use candle_peft::tasks::causal_lm::{CausalLmTask, LmExample};
use candle_peft::{
    BaseDType, GenerationConfig, LayerAttention, LlamaArch, LlamaConfig, LlamaForCausalLM,
    LoadOptions, LoraConfig, PeftModel, Schedule, TrainConfig, Trainer, Warmup, generate,
};
use common::llama::{argmax, ids, token_ids};
use common::max_abs_diff;
use serde_json::Value;

fn json(path: &str) -> Value {
    let path = common::fixture(path);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    u32s(v).into_iter().map(|x| x as usize).collect()
}

fn gguf_model(base_dtype: BaseDType) -> PeftModel<LlamaForCausalLM> {
    let opts = LoadOptions {
        device: Device::Cpu,
        base_dtype,
    };
    LlamaForCausalLM::from_pretrained(common::gemma3_gguf().to_str().unwrap(), opts)
        .unwrap()
        .model
}

/// Logits at `positions` of the fixture's 600-token input, `[positions, vocab]`: the hidden
/// states of every position, the head at the chosen ones only (the full logits would be
/// 600 × 262144 floats).
fn logits_at(model: &LlamaForCausalLM, fixture: &Value) -> Tensor {
    let hidden = model
        .forward_hidden(&ids(&u32s(&fixture["ids"])), None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let pos: Vec<u32> = u32s(&fixture["positions"]);
    let idx = Tensor::new(pos.as_slice(), &Device::Cpu).unwrap();
    model
        .logits(&hidden.index_select(&idx, 0).unwrap())
        .unwrap()
}

/// Max |ours − transformers| over the probed vocabulary entries at every position, and the
/// argmax of each position.
fn compare_probes(logits: &Tensor, fixture: &Value) -> (f32, Vec<usize>) {
    let probe = usizes(&fixture["vocab_probe"]);
    let expected = fixture["logits_at"].as_array().unwrap();
    let mut worst = 0f32;
    let mut argmaxes = Vec::new();
    for (p, row) in expected.iter().enumerate() {
        let ours: Vec<f32> = logits.i(p).unwrap().to_vec1().unwrap();
        argmaxes.push(argmax(&ours));
        for (&v, e) in probe.iter().zip(row.as_array().unwrap()) {
            worst = worst.max((ours[v] - e.as_f64().unwrap() as f32).abs());
        }
    }
    (worst, argmaxes)
}

#[test]
fn gguf_270m_matches_transformers() {
    let fixture = json("gemma3/gguf_logits.json");
    let gguf = GgufModel::open(&common::gemma3_gguf()).unwrap();
    assert_eq!(gguf.architecture(), "gemma3");
    let cfg = LlamaConfig::from_json(&gguf.hf_config().unwrap()).unwrap();
    assert_eq!(cfg.architecture, LlamaArch::Gemma3);
    assert_eq!(
        (cfg.num_hidden_layers, cfg.head_dim, cfg.sliding_window),
        (18, 256, Some(512))
    );
    assert_eq!((cfg.rope_theta, cfg.rope_local_theta), (1e6, Some(1e4)));
    let full: Vec<usize> = (0..18)
        .filter(|&i| cfg.layer_types[i] == LayerAttention::Full)
        .collect();
    assert_eq!(full, vec![5, 11, 17]);

    let model = gguf_model(BaseDType::F32);
    let logits = logits_at(model.model(), &fixture);
    let (worst, argmaxes) = compare_probes(&logits, &fixture);
    eprintln!("dense: max logit difference {worst}");
    // Both sides dequantise the same blocks to f32 and run the same f32 ops in a different
    // order (blocked matmuls, fused softmax, 18 layers): measured differences are ~3e-5 on
    // logits of magnitude ~10-30, i.e. f32 rounding accumulated over the layers. 1e-3 leaves
    // room for another summation order (thread count, SIMD width) and is far below any real
    // error: a wrong norm offset, window or RoPE base moves logits by whole units.
    assert!(
        worst < 1e-3,
        "GGUF logits differ from transformers by {worst}"
    );
    assert_eq!(argmaxes, usizes(&fixture["argmax_at"]));

    // The prompt's last position: the top 5 tokens in order, and their logits.
    let prompt = u32s(&fixture["prompt"]);
    let last = model.model().forward(&ids(&prompt), None).unwrap();
    let last: Vec<f32> = last.i((0, prompt.len() - 1)).unwrap().to_vec1().unwrap();
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    assert_eq!(order[..5].to_vec(), usizes(&fixture["prompt_last_top5"]));
    for (&t, e) in order
        .iter()
        .zip(fixture["prompt_last_top5_logits"].as_array().unwrap())
    {
        assert!((last[t] - e.as_f64().unwrap() as f32).abs() < 2e-3);
    }

    // Greedy decoding with the KV cache: transformers' 12 tokens.
    let greedy = GenerationConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    let tokens = generate(model.model(), &prompt, &greedy).unwrap();
    assert_eq!(tokens, u32s(&fixture["greedy"]));
}

#[test]
fn gguf_270m_with_base_dtype_gguf() {
    let fixture = json("gemma3/gguf_logits.json");
    let model = gguf_model(BaseDType::Gguf);
    let logits = logits_at(model.model(), &fixture);
    let (worst, argmaxes) = compare_probes(&logits, &fixture);
    eprintln!("base-dtype gguf: max logit difference {worst}");
    // The kept blocks are multiplied with f32 activations (no activation quantisation), so
    // only the summation order differs from the dense load: the same tolerance (measured ~3e-5).
    assert!(
        worst < 1e-3,
        "kept-block logits differ from transformers by {worst}"
    );
    assert_eq!(argmaxes, usizes(&fixture["argmax_at"]));
}

fn tiny_gemma_source() -> source::ModelSource {
    source::resolve_local(&common::fixture("gemma3/tiny-gemma3")).unwrap()
}

fn tiny_gemma() -> PeftModel<LlamaForCausalLM> {
    LlamaForCausalLM::from_source(&tiny_gemma_source(), DType::F32, &Device::Cpu)
        .unwrap()
        .0
}

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

#[test]
fn tiny_gemma_lora_gradients_match_finite_differences() {
    let mut peft = tiny_gemma();
    with_lora_on_seven(&mut peft, 4);
    // 11 positions: past the window of 4, so sliding and full layers both shape the loss.
    let tokens = token_ids(12, 256, 6);
    let loss = next_token_loss(peft.model(), &tokens);
    let grads = loss.backward().unwrap();
    let named = peft.trainable_vars();
    assert_eq!(named.len(), 6 * 7 * 2);
    for (name, var) in &named {
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
    }

    // Directional derivative: Σ g·d against (L(θ + εd) − L(θ − εd)) / 2ε, d random.
    let vars: Vec<Var> = named.into_iter().map(|(_, v)| v).collect();
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
            let gd = (g * d).unwrap().sum_all().unwrap();
            f64::from(gd.to_scalar::<f32>().unwrap())
        })
        .sum();
    let originals: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let eps = 1e-3;
    let loss_at = |step: f64| -> f64 {
        for ((v, o), d) in vars.iter().zip(&originals).zip(&dirs) {
            v.set(&(o + (d * step).unwrap()).unwrap()).unwrap();
        }
        let l = next_token_loss(peft.model(), &tokens);
        f64::from(l.to_scalar::<f32>().unwrap())
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
fn tiny_gemma_merged_export_reloads_as_transformers_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tiny_gemma_source();
    let fixture_names: std::collections::BTreeSet<String> =
        candle_core::safetensors::load(src.dir.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();

    // Without adapters the export is the fixture: the same names, the same values (norms go
    // through 1 + w and back: within an f32 rounding of 1).
    let plain = tmp.path().join("plain");
    tiny_gemma()
        .model()
        .save_pretrained(&src, &plain, DType::F32)
        .unwrap();
    let original =
        candle_core::safetensors::load(src.dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let exported =
        candle_core::safetensors::load(plain.join("model.safetensors"), &Device::Cpu).unwrap();
    let exported_names: std::collections::BTreeSet<String> = exported.keys().cloned().collect();
    assert_eq!(exported_names, fixture_names);
    for (name, t) in &original {
        let d = max_abs_diff(t, &exported[name]);
        assert!(d <= 1.2e-7, "{name} differs by {d} after export");
    }

    // With LoRA on all seven projections, merged: reloads to the adapted logits.
    let mut peft = tiny_gemma();
    with_lora_on_seven(&mut peft, 2);
    peft.eval();
    let tokens = token_ids(11, 256, 3);
    let adapted = peft.model().forward(&ids(&tokens), None).unwrap();
    let out = tmp.path().join("merged");
    LlamaForCausalLM::export_merged(peft, &src, &out, DType::F32).unwrap();
    let reloaded = source::resolve_local(&out).unwrap();
    let (merged, merged_cfg) =
        LlamaForCausalLM::from_source(&reloaded, DType::F32, &Device::Cpu).unwrap();
    let d = max_abs_diff(
        &merged.model().forward(&ids(&tokens), None).unwrap(),
        &adapted,
    );
    assert!(d <= 1e-4, "merged export differs by {d}");
    let base_cfg = LlamaConfig::from_file(src.dir.join("config.json")).unwrap();
    assert_eq!(
        LlamaConfig {
            source_json: Default::default(),
            torch_dtype: None,
            ..merged_cfg
        },
        LlamaConfig {
            source_json: Default::default(),
            torch_dtype: None,
            ..base_cfg
        }
    );

    // config.json in transformers 5's Gemma3TextConfig form.
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "Gemma3ForCausalLM");
    assert_eq!(cfg["model_type"], "gemma3_text");
    assert_eq!(cfg["hidden_activation"], "gelu_pytorch_tanh");
    assert!(cfg.get("hidden_act").is_none() && cfg.get("rope_theta").is_none());
    // An integer: transformers' strict config refuses 24.0.
    assert_eq!(cfg["query_pre_attn_scalar"].as_u64(), Some(24));
    assert_eq!(cfg["sliding_window"], 4);
    assert_eq!(cfg["layer_types"][2], "full_attention");
    assert_eq!(cfg["rope_parameters"]["full_attention"]["rope_theta"], 1e6);
    assert_eq!(
        cfg["rope_parameters"]["sliding_attention"]["rope_theta"],
        1e4
    );
    let merged_names: std::collections::BTreeSet<String> =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    assert_eq!(merged_names, fixture_names);

    // For a manual check with transformers: keep the folder and the adapted logits.
    if let Some(keep) = std::env::var_os("CANDLE_PEFT_KEEP_GEMMA_EXPORT") {
        let keep = std::path::PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(out.join(f), keep.join(f)).unwrap();
        }
        let logits: Vec<f32> = adapted.flatten_all().unwrap().to_vec1().unwrap();
        let record = serde_json::json!({"ids": tokens, "logits": logits});
        std::fs::write(keep.join("candle_logits.json"), record.to_string()).unwrap();
    }
}

#[test]
fn tiny_gemma_causal_lm_training_lowers_the_loss() {
    let src = source::resolve(common::smollm2_gguf().to_str().unwrap()).unwrap();
    let tokenizer = candle_peft::load_causal_tokenizer(&src).unwrap();
    let (model, cfg) =
        LlamaForCausalLM::from_source(&tiny_gemma_source(), DType::F32, &Device::Cpu).unwrap();
    let mut task = CausalLmTask::new(model, cfg, tokenizer, 12, Device::Cpu).unwrap();
    // Sequences with a fixed stride: learnable from the last few tokens (inside the window).
    let examples: Vec<LmExample> = (0..8u32)
        .map(|k| LmExample {
            ids: (0..12u32).map(|i| (k * 29 + i * 7) % 256).collect(),
            loss_from: 0,
        })
        .collect();
    let before = task.evaluate_lm(&examples).unwrap();
    task.add_adapter(
        candle_peft::DEFAULT_ADAPTER,
        LoraConfig::new(&SEVEN, 4, 8.0),
    )
    .unwrap();
    let config = TrainConfig {
        steps: 12,
        batch_size: 4,
        lr: 1e-2,
        schedule: Schedule::Constant,
        warmup: Warmup::Steps(0),
        seed: 7,
        quiet: true,
        ..TrainConfig::default()
    };
    Trainer::new(config)
        .unwrap()
        .run(&task, &examples, None)
        .unwrap();
    let after = task.evaluate_lm(&examples).unwrap();
    assert!(
        after.loss < 0.9 * before.loss,
        "loss {:.4} → {:.4}",
        before.loss,
        after.loss
    );
}

/// `rms(a − b) / rms(b)`.
fn rel_rms(a: &Tensor, b: &Tensor) -> f64 {
    let sq = |t: &Tensor| -> f64 {
        let s = t
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        f64::from(s).sqrt()
    };
    sq(&(a - b).unwrap()) / sq(b)
}

/// `merge --to gguf` on the 270M file: LoRA on layer 0's q_proj and k_proj. Gemma's q/k rows
/// are not permuted in GGUF, so ΔW is added as is: the merged weights moved by ΔW up to the
/// re-quantisation (a permuted ΔW would be off by ~√2 of its size), and the norms (stored as
/// `1 + w`, copied byte for byte) still load as the base's.
#[test]
fn gguf_270m_merge_to_gguf_adds_unpermuted_deltas() {
    use candle_peft::io::export::merge_adapter_into_gguf;
    use candle_peft::io::peft_format::write_adapter_dir;
    use rand::{Rng, SeedableRng};

    let base = common::gemma3_gguf();
    let tmp = tempfile::tempdir().unwrap();
    let (hidden, rank, alpha) = (640, 4, 8.0);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut random = |shape: &[usize]| {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.3f32..0.3)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut tensors = Vec::new();
    let mut deltas = Vec::new();
    for (proj, out) in [("q_proj", 1024), ("k_proj", 256)] {
        let module = format!("model.layers.0.self_attn.{proj}");
        let a = random(&[rank, hidden]);
        let b = random(&[out, rank]);
        deltas.push((
            format!("{module}.weight"),
            (b.matmul(&a).unwrap() * (alpha / rank as f64)).unwrap(),
        ));
        tensors.push((format!("base_model.model.{module}.lora_A.weight"), a));
        tensors.push((format!("base_model.model.{module}.lora_B.weight"), b));
    }
    let cfg = candle_peft::AdapterConfig::from_json(&serde_json::json!({
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "k_proj"],
        "layers_to_transform": [0],
    }))
    .unwrap();
    let adapter = tmp.path().join("adapter");
    write_adapter_dir(&adapter, &cfg, &tensors).unwrap();
    let out = tmp.path().join("merged.gguf");
    let report = merge_adapter_into_gguf(&base, &adapter, &out).unwrap();
    assert_eq!(report.merged.len(), 2);

    let base_t = GgufModel::open(&base)
        .unwrap()
        .hf_tensors(DType::F32, &Device::Cpu)
        .unwrap();
    let merged = GgufModel::open(&out)
        .unwrap()
        .hf_tensors(DType::F32, &Device::Cpu)
        .unwrap();
    for (key, delta) in &deltas {
        let moved = (&merged[key] - &base_t[key]).unwrap();
        let err = rel_rms(&moved, delta);
        assert!(err < 0.12, "{key}: moved by ΔW up to {err} (relative rms)");
    }
    for name in [
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.post_feedforward_layernorm.weight",
    ] {
        assert_eq!(max_abs_diff(&merged[name], &base_t[name]), 0.0, "{name}");
    }
}

/// Every method that needs no calibration data (EVA and CorDA share the calibration pass of the
/// Llama family, tested in tests/calibrated.rs) on the seven projections of the tiny Gemma:
/// each starts as the identity (the adapted model's loss is the base's) and a few steps of
/// training lower the loss.
#[test]
fn tiny_gemma_trains_with_every_method() {
    use candle_peft::adapters::METHODS;
    use candle_peft::optim::LoraProMode;
    use candle_peft::train::OptimizerKind;
    let src = source::resolve(common::smollm2_gguf().to_str().unwrap()).unwrap();
    let tokenizer = candle_peft::load_causal_tokenizer(&src).unwrap();
    let examples: Vec<LmExample> = (0..8u32)
        .map(|k| LmExample {
            ids: (0..12u32).map(|i| (k * 29 + i * 7) % 256).collect(),
            loss_from: 0,
        })
        .collect();
    let mut tried = Vec::new();
    for method in METHODS.iter().filter(|m| !m.needs_calibration()) {
        let (model, cfg) =
            LlamaForCausalLM::from_source(&tiny_gemma_source(), DType::F32, &Device::Cpu).unwrap();
        let mut task = CausalLmTask::new(model, cfg, tokenizer.clone(), 12, Device::Cpu).unwrap();
        let base = task.evaluate_lm(&examples).unwrap().loss;
        let mut config: Value = serde_json::from_str(method.spec().cli.defaults).unwrap();
        config["peft_type"] = method.peft_type().into();
        config["target_modules"] = serde_json::json!(SEVEN);
        let config = candle_peft::AdapterConfig::from_json(&config).unwrap();
        task.add_adapter(candle_peft::DEFAULT_ADAPTER, config)
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        let start = task.evaluate_lm(&examples).unwrap().loss;
        assert!(
            (start - base).abs() < 1e-4 * base,
            "{method}: starts at loss {start}, the base's is {base}"
        );
        let optimizer = if method.uses_lora_pro() {
            OptimizerKind::LoraPro(LoraProMode::default())
        } else {
            OptimizerKind::AdamW
        };
        let train = TrainConfig {
            steps: 8,
            batch_size: 4,
            lr: 1e-2,
            schedule: Schedule::Constant,
            warmup: Warmup::Steps(0),
            optimizer,
            seed: 7,
            quiet: true,
            ..TrainConfig::default()
        };
        Trainer::new(train)
            .unwrap()
            .run(&task, &examples, None)
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        let after = task.evaluate_lm(&examples).unwrap().loss;
        assert!(after < start, "{method}: loss {start:.4} → {after:.4}");
        tried.push(method.name());
    }
    assert_eq!(tried.len(), METHODS.len() - 2, "{tried:?}");
}

#[test]
fn packed_text_starts_every_gemma_sequence_with_bos() {
    let text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n\
                First Citizen:\nYou are all resolved rather to die than to famish?";
    let opts = |seq_len| candle_peft::TaskOptions {
        seq_len,
        ..Default::default()
    };
    let gemma =
        CausalLmTask::from_pretrained(common::gemma3_gguf().to_str().unwrap(), opts(8)).unwrap();
    let tokens = gemma.encode(text).unwrap();
    assert!(tokens.len() > 14 && tokens[0] != 2, "{tokens:?}");
    let examples = gemma.text_examples(text, true).unwrap();
    // <bos> (id 2) then 7 text tokens each; the text tokens, in order, are the whole text.
    for e in &examples {
        assert_eq!((e.ids[0], e.loss_from), (2, 0), "{e:?}");
        assert!(e.ids.len() <= 8 && e.ids.len() >= 2, "{e:?}");
        assert_eq!(e.targets(), e.ids.len() - 1);
    }
    assert!(
        examples[..examples.len() - 1]
            .iter()
            .all(|e| e.ids.len() == 8)
    );
    let tails: Vec<u32> = examples.iter().flat_map(|e| e.ids[1..].to_vec()).collect();
    assert_eq!(tails, tokens);
    // Training drops the short last piece.
    assert_eq!(
        gemma.text_examples(text, false).unwrap().len(),
        tokens.len() / 7
    );
    // A sequence length with no room after BOS names the field.
    let tiny = CausalLmTask::from_pretrained(common::gemma3_gguf().to_str().unwrap(), opts(1));
    let err = tiny.and_then(|t| t.text_examples(text, true)).unwrap_err();
    assert!(err.to_string().contains("seq_len"), "{err}");

    // SmolLM2's tokenizer adds no BOS: the text is packed as it is.
    let smol =
        CausalLmTask::from_pretrained(common::smollm2_gguf().to_str().unwrap(), opts(8)).unwrap();
    let tokens = smol.encode(text).unwrap();
    let packed: Vec<u32> = smol
        .text_examples(text, true)
        .unwrap()
        .iter()
        .flat_map(|e| e.ids.clone())
        .collect();
    assert_eq!(packed, tokens);
}
