//! Sliding-window attention in every family, against transformers (tests/fixtures/gemma3,
//! written by scripts/fixtures/gemma3.py): seeded random tiny Gemma 3, Mistral and Qwen2 models
//! with a window of 4 run on 12-token rows. Logits match transformers' eager forward within
//! 1e-4 (f32, the same ops in a different order; logits are O(1)); greedy decoding through the
//! KV cache (a sliding layer keeps only its last window − 1 keys) equals transformers' greedy
//! tokens, and cached forwards fed in chunks equal the full forward.
mod common;

use candle_core::{Device, Tensor};
use candle_peft::{
    GenerationConfig, LayerAttention, LlamaForCausalLM, generate, generate_uncached,
};
use common::max_abs_diff;
use serde_json::Value;

fn tiny_fixture() -> Value {
    let path = common::fixture("gemma3/tiny_logits.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn load(dir: &str) -> candle_peft::models::Pretrained<LlamaForCausalLM, candle_peft::LlamaConfig> {
    let path = common::fixture(&format!("gemma3/{dir}"));
    LlamaForCausalLM::from_pretrained(path.to_str().unwrap(), &Device::Cpu).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(items) => items.iter().for_each(|x| walk(x, out)),
            x => out.push(x.as_f64().unwrap() as f32),
        }
    }
    walk(v, &mut out);
    out
}

/// The fixture's rows as a `[2, 12]` batch and transformers' logits `[2, 12, 256]`.
fn rows_and_logits(case: &Value) -> (Tensor, Tensor) {
    let rows: Vec<Vec<u32>> = case["rows"].as_array().unwrap().iter().map(u32s).collect();
    let (b, t) = (rows.len(), rows[0].len());
    let flat: Vec<u32> = rows.concat();
    let ids = Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap();
    let expected = Tensor::from_vec(f32s(&case["logits"]), (b, t, 256), &Device::Cpu).unwrap();
    (ids, expected)
}

fn check_model(name: &str, dir: &str) {
    let fixture = tiny_fixture();
    let case = &fixture[name];
    let pre = load(dir);
    let model = pre.model.model();
    let (ids, expected) = rows_and_logits(case);
    let logits = model.forward(&ids, None).unwrap();
    let diff = max_abs_diff(&logits, &expected);
    assert!(
        diff < 1e-4,
        "{name}: logits differ from transformers by {diff}"
    );

    let prompt = u32s(&case["prompt"]);
    let greedy = GenerationConfig {
        max_new_tokens: 10,
        ..Default::default()
    };
    let cached = generate(model, &prompt, &greedy).unwrap();
    assert_eq!(cached, u32s(&case["greedy"]), "{name}: cached greedy");
    let uncached = generate_uncached(model, &prompt, &greedy).unwrap();
    assert_eq!(uncached, cached, "{name}: uncached greedy");

    // Cached forwards in chunks of 5, 1, 6 tokens (the first longer than the window) equal the
    // full forward of the first row.
    let row = ids.narrow(0, 0, 1).unwrap();
    let full = model.forward(&row, None).unwrap();
    let mut cache = model.new_cache();
    let mut parts = Vec::new();
    for (start, len) in [(0, 5), (5, 1), (6, 6)] {
        let chunk = row.narrow(1, start, len).unwrap();
        parts.push(model.forward_cached(&chunk, &mut cache).unwrap());
    }
    let chunked = Tensor::cat(&parts, 1).unwrap();
    let diff = max_abs_diff(&chunked, &full);
    assert!(
        diff < 1e-4,
        "{name}: chunked cached forward differs by {diff}"
    );
}

#[test]
fn gemma3_tiny_matches_transformers() {
    check_model("gemma3", "tiny-gemma3");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check_model("mistral", "tiny-mistral-swa");
}

#[test]
fn qwen2_sliding_window_matches_transformers() {
    check_model("qwen2", "tiny-qwen2-swa");
}

#[test]
fn layer_types_follow_the_configs() {
    use LayerAttention::{Full, Sliding};
    let g = load("tiny-gemma3").config;
    assert_eq!(g.sliding_window, Some(4));
    assert_eq!(
        g.layer_types,
        vec![Sliding, Sliding, Full, Sliding, Sliding, Full]
    );
    assert_eq!(g.rope_theta, 1e6);
    assert_eq!(g.rope_local_theta, Some(1e4));
    assert_eq!(g.query_pre_attn_scalar, Some(24.0));
    assert_eq!(
        load("tiny-mistral-swa").config.layer_types,
        vec![Sliding; 2]
    );
    assert_eq!(
        load("tiny-qwen2-swa").config.layer_types,
        vec![Full, Sliding]
    );
}
