//! GGUF loading: tiny GGUF files written here round-trip to the Hugging Face tensors (q/k
//! un-permuted for `llama`, kept for `qwen2`), SmolLM2's metadata becomes its config, the f32
//! model agrees with candle's quantized model up to quantisation noise, and bad files are clear
//! errors.
mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_peft::io::gguf::{GgufModel, permute_qk};
use candle_peft::io::source::{self, SourceKind};
use candle_peft::models::llama::{LlamaArch, LlamaConfig, LlamaForCausalLM};
use candle_peft::{PeftError, load_causal_tokenizer};
use common::llama::*;

/// The GGUF name of a Hugging Face Llama tensor (the inverse of the loader's mapping).
fn gguf_name(hf: &str) -> String {
    let (stem, kind) = hf.rsplit_once('.').unwrap();
    let top = match stem {
        "model.embed_tokens" => Some("token_embd"),
        "model.norm" => Some("output_norm"),
        "lm_head" => Some("output"),
        _ => None,
    };
    if let Some(top) = top {
        return format!("{top}.{kind}");
    }
    let rest = stem.strip_prefix("model.layers.").unwrap();
    let (layer, module) = rest.split_once('.').unwrap();
    let part = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        other => panic!("unexpected module {other}"),
    };
    format!("blk.{layer}.{part}.{kind}")
}

/// llama.cpp-style metadata for `cfg` under architecture `arch`.
fn metadata(arch: &str, cfg: &LlamaConfig) -> Vec<(String, Value)> {
    let u = |v: usize| Value::U32(v as u32);
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), u(cfg.num_hidden_layers)),
        (format!("{arch}.embedding_length"), u(cfg.hidden_size)),
        (
            format!("{arch}.feed_forward_length"),
            u(cfg.intermediate_size),
        ),
        (
            format!("{arch}.attention.head_count"),
            u(cfg.num_attention_heads),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u(cfg.num_key_value_heads),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{arch}.context_length"),
            u(cfg.max_position_embeddings),
        ),
        (format!("{arch}.vocab_size"), u(cfg.vocab_size)),
    ]
}

/// Writes `weights` (Hugging Face names) as an f32 GGUF file, permuting q/k as llama.cpp does
/// when `permute` is set.
fn write_gguf(
    path: &Path,
    meta: &[(String, Value)],
    weights: &HashMap<String, Tensor>,
    cfg: &LlamaConfig,
    permute: bool,
) {
    let mut tensors = Vec::new();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    for hf in names {
        let mut w = weights[hf].clone();
        if permute && hf.contains("q_proj") {
            w = permute_qk(&w, cfg.num_attention_heads).unwrap();
        } else if permute && hf.contains("k_proj") {
            w = permute_qk(&w, cfg.num_key_value_heads).unwrap();
        }
        tensors.push((
            gguf_name(hf),
            QTensor::quantize(&w, GgmlDType::F32).unwrap(),
        ));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

fn same_core(a: &LlamaConfig, b: &LlamaConfig) {
    assert_eq!(a.architecture, b.architecture);
    assert_eq!(
        (
            a.hidden_size,
            a.intermediate_size,
            a.num_hidden_layers,
            a.vocab_size
        ),
        (
            b.hidden_size,
            b.intermediate_size,
            b.num_hidden_layers,
            b.vocab_size
        )
    );
    assert_eq!(
        (a.num_attention_heads, a.num_key_value_heads, a.head_dim),
        (b.num_attention_heads, b.num_key_value_heads, b.head_dim)
    );
    assert_eq!(
        (a.rms_norm_eps, a.rope_theta),
        (b.rms_norm_eps, b.rope_theta)
    );
    assert_eq!(a.tie_word_embeddings, b.tie_word_embeddings);
    assert_eq!((a.qkv_bias, a.o_bias), (b.qkv_bias, b.o_bias));
    assert_eq!(a.max_position_embeddings, b.max_position_embeddings);
}

/// A tiny model written as GGUF loads back to the same tensors and the same logits.
fn round_trip(arch: &str, json: &serde_json::Value, permute: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(json);
    let weights = random_weights(&cfg, 77);
    let path = tmp.path().join("tiny.gguf");
    write_gguf(&path, &metadata(arch, &cfg), &weights, &cfg, permute);

    let gguf = GgufModel::open(&path).unwrap();
    assert_eq!(gguf.architecture(), arch);
    same_core(
        &LlamaConfig::from_json(&gguf.hf_config().unwrap()).unwrap(),
        &cfg,
    );
    let loaded = gguf.hf_tensors(DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.len(), weights.len());
    for (name, w) in &weights {
        let got = loaded.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(common::max_abs_diff(got, w), 0.0, "{name}");
    }

    let src = source::resolve(path.to_str().unwrap()).unwrap();
    assert_eq!(src.kind, SourceKind::Gguf);
    let (peft, _) = LlamaForCausalLM::from_source(&src, DType::F32, &Device::Cpu).unwrap();
    let tokens = token_ids(8, cfg.vocab_size, 1);
    let ours = peft.model().forward(&ids(&tokens), None).unwrap();
    let reference = build(&cfg, &weights)
        .model()
        .forward(&ids(&tokens), None)
        .unwrap();
    assert_eq!(common::max_abs_diff(&ours, &reference), 0.0);
}

#[test]
fn tiny_llama_gguf_unpermutes_q_and_k() {
    round_trip("llama", &tiny_llama_json(false), true);
}

#[test]
fn tiny_qwen2_gguf_keeps_layout_and_biases() {
    round_trip("qwen2", &tiny_qwen2_json(), false);
}

#[test]
fn smollm2_config_from_metadata() {
    let gguf = GgufModel::open(&common::smollm2_gguf()).unwrap();
    let cfg = LlamaConfig::from_json(&gguf.hf_config().unwrap()).unwrap();
    assert_eq!(cfg.architecture, LlamaArch::Llama);
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size
        ),
        (30, 576, 1536)
    );
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (9, 3, 64)
    );
    assert_eq!((cfg.rope_theta, cfg.rms_norm_eps), (100000.0, 1e-5));
    assert_eq!((cfg.vocab_size, cfg.max_position_embeddings), (49152, 8192));
    assert!(cfg.tie_word_embeddings);
    assert_eq!(
        (
            cfg.bos_token_id,
            cfg.eos_token_ids.clone(),
            cfg.pad_token_id
        ),
        (Some(1), vec![2], Some(2))
    );
    assert_eq!(gguf.tensor_names().len(), 272);
}

/// candle's quantized Llama (interleaved RoPE on the permuted q/k, quantised matmuls) against
/// our f32 model on the dequantised, un-permuted weights: the same argmax and logits that
/// correlate to quantisation noise. Re-permuting q/k (skipping the un-permute) breaks it.
#[test]
fn smollm2_matches_candle_quantized_model() {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let path = common::smollm2_gguf();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut quantized = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let tokens = &SMOLLM2_PROMPT[..12];
    let theirs = flat(&quantized.forward(&ids(tokens), 0).unwrap());

    let (mut weights, cfg) = smollm2_tensors();
    let ours = flat(&last_position(
        &build(&cfg, &weights)
            .model()
            .forward(&ids(tokens), None)
            .unwrap(),
    ));
    assert_eq!(argmax(&ours), argmax(&theirs));
    let r = pearson(&ours, &theirs);
    assert!(r > 0.99, "Pearson r = {r}");

    for l in 0..cfg.num_hidden_layers {
        for (proj, heads) in [("q_proj", 9), ("k_proj", 3)] {
            let name = format!("model.layers.{l}.self_attn.{proj}.weight");
            let permuted = permute_qk(&weights[&name], heads).unwrap();
            weights.insert(name, permuted);
        }
    }
    let wrong = flat(&last_position(
        &build(&cfg, &weights)
            .model()
            .forward(&ids(tokens), None)
            .unwrap(),
    ));
    let r_wrong = pearson(&wrong, &theirs);
    assert!(r_wrong < 0.95, "without the un-permute r = {r_wrong}");
}

#[test]
fn bad_gguf_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&tiny_llama_json(false));
    let weights = random_weights(&cfg, 3);

    // An architecture the loader does not map.
    let path = tmp.path().join("neox.gguf");
    write_gguf(&path, &metadata("gpt-neox", &cfg), &weights, &cfg, false);
    for err in [
        source::resolve(path.to_str().unwrap()).unwrap_err(),
        LlamaForCausalLM::from_pretrained(path.to_str().unwrap(), &Device::Cpu).unwrap_err(),
    ] {
        assert!(matches!(err, PeftError::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("gpt-neox"), "{err}");
    }

    // No tokenizer in the metadata.
    let path = tmp.path().join("notok.gguf");
    write_gguf(&path, &metadata("llama", &cfg), &weights, &cfg, true);
    let src = source::resolve(path.to_str().unwrap()).unwrap();
    let err = load_causal_tokenizer(&src).unwrap_err().to_string();
    assert!(err.contains("tokenizer.ggml.model"), "{err}");

    // A SentencePiece tokenizer without its vocabulary names the missing key.
    let mut meta = metadata("llama", &cfg);
    meta.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
    let path = tmp.path().join("spm.gguf");
    write_gguf(&path, &meta, &weights, &cfg, true);
    let err = GgufModel::open(&path)
        .unwrap()
        .tokenizer()
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.ggml.tokens"), "{err}");

    // A tensor with no Hugging Face name.
    let path = tmp.path().join("extra.gguf");
    let tensors: Vec<(String, QTensor)> = vec![(
        "blk.0.attn_qkv.weight".into(),
        QTensor::quantize(
            &weights["model.layers.0.self_attn.q_proj.weight"],
            GgmlDType::F32,
        )
        .unwrap(),
    )];
    let meta = metadata("llama", &cfg);
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(
        &mut std::fs::File::create(&path).unwrap(),
        &meta_refs,
        &tensor_refs,
    )
    .unwrap();
    let err = GgufModel::open(&path)
        .unwrap()
        .hf_tensors(DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("blk.0.attn_qkv.weight"), "{err}");

    // Not GGUF at all, and a missing file.
    let path = tmp.path().join("junk.gguf");
    std::fs::write(&path, b"not a gguf file at all").unwrap();
    let err = source::resolve(path.to_str().unwrap()).unwrap_err();
    assert!(
        matches!(err, PeftError::Unsupported(_)) && err.to_string().contains("GGUF"),
        "{err}"
    );
    let err = source::resolve(tmp.path().join("absent.gguf").to_str().unwrap()).unwrap_err();
    assert!(matches!(err, PeftError::ModelNotFound { .. }), "{err}");
}
