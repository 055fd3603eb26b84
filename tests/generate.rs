//! Generation: KV-cached decoding equals uncached decoding token for token (SmolLM2, greedy;
//! tiny model, sampling), chunked cached forwards equal the full forward, and stop tokens,
//! seeds and the context limit behave.
mod common;

use candle_core::{Device, Tensor};
use candle_peft::{GenerationConfig, LlamaForCausalLM, generate, generate_uncached};
use common::llama::*;

#[test]
fn smollm2_cached_equals_uncached_greedy() {
    let candle_peft::models::Pretrained {
        model: peft,
        config: cfg,
        source: src,
    } = LlamaForCausalLM::from_pretrained(common::smollm2_gguf().to_str().unwrap(), &Device::Cpu)
        .unwrap();
    let tok = candle_peft::load_causal_tokenizer(&src).unwrap();
    let prompt = tok
        .encode(
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .unwrap()
        .get_ids()
        .to_vec();
    let gen_cfg = GenerationConfig {
        max_new_tokens: 8,
        stop_tokens: cfg.eos_token_ids.clone(),
        ..Default::default()
    };
    let cached = generate(peft.model(), &prompt, &gen_cfg).unwrap();
    let uncached = generate_uncached(peft.model(), &prompt, &gen_cfg).unwrap();
    assert_eq!(cached, uncached);
    assert!(!cached.is_empty());
    let text = tok.decode(&cached, true).unwrap();
    assert!(!text.trim().is_empty(), "{cached:?}");
}

#[test]
fn chunked_cached_forward_equals_full_forward() {
    let (peft, cfg) = tiny(&tiny_qwen2_json(), 4);
    let model = peft.model();
    let tokens = token_ids(9, cfg.vocab_size, 2);
    let full = model.forward(&ids(&tokens), None).unwrap();
    let mut cache = model.new_cache();
    let mut parts = Vec::new();
    for chunk in [&tokens[..5], &tokens[5..6], &tokens[6..]] {
        parts.push(model.forward_cached(&ids(chunk), &mut cache).unwrap());
    }
    assert_eq!(cache.len(), 9);
    let cached = Tensor::cat(&parts, 1).unwrap();
    let d = common::max_abs_diff(&cached, &full);
    assert!(d <= 1e-5, "max |Δlogit| = {d}");
    cache.clear();
    assert!(cache.is_empty());
}

#[test]
fn sampling_is_seeded_and_cache_independent() {
    let (peft, cfg) = tiny(&tiny_llama_json(true), 9);
    let prompt = token_ids(5, cfg.vocab_size, 3);
    let sample = |seed| GenerationConfig {
        max_new_tokens: 12,
        temperature: 1.5,
        top_p: 0.9,
        seed,
        stop_tokens: Vec::new(),
    };
    let a = generate(peft.model(), &prompt, &sample(1)).unwrap();
    assert_eq!(a.len(), 12);
    assert_eq!(a, generate(peft.model(), &prompt, &sample(1)).unwrap());
    assert_eq!(
        a,
        generate_uncached(peft.model(), &prompt, &sample(1)).unwrap()
    );
    assert_ne!(a, generate(peft.model(), &prompt, &sample(2)).unwrap());

    // Greedy: the uncached path agrees, and a stop token ends generation before it is emitted.
    let greedy = GenerationConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    let g = generate(peft.model(), &prompt, &greedy).unwrap();
    assert_eq!(
        g,
        generate_uncached(peft.model(), &prompt, &greedy).unwrap()
    );
    let stop_at_second = GenerationConfig {
        stop_tokens: vec![g[1]],
        ..greedy.clone()
    };
    let cut = generate(peft.model(), &prompt, &stop_at_second).unwrap();
    assert_eq!(
        cut,
        g[..g.iter().position(|&t| t == g[1]).unwrap()].to_vec()
    );
}

#[test]
fn context_limits() {
    let (peft, cfg) = tiny(&tiny_llama_json(false), 5);
    let ctx = cfg.max_position_embeddings;
    let greedy = GenerationConfig {
        max_new_tokens: 10,
        ..Default::default()
    };
    let too_long = token_ids(ctx + 1, cfg.vocab_size, 1);
    for err in [
        generate(peft.model(), &too_long, &greedy).unwrap_err(),
        generate_uncached(peft.model(), &too_long, &greedy).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(msg.contains("65") && msg.contains("64"), "{msg}");
    }
    // Generation stops when the sequence fills the context.
    let near = token_ids(ctx - 3, cfg.vocab_size, 2);
    assert_eq!(generate(peft.model(), &near, &greedy).unwrap().len(), 3);
    // The cache refuses positions past the context as well.
    let mut cache = peft.model().new_cache();
    peft.model()
        .forward_cached(&ids(&near), &mut cache)
        .unwrap();
    let err = peft
        .model()
        .forward_cached(&ids(&[1, 2, 3, 4]), &mut cache)
        .unwrap_err();
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");

    assert!(generate(peft.model(), &[], &greedy).is_err());
    let bad = GenerationConfig {
        top_p: 1.5,
        ..greedy
    };
    assert!(
        generate(peft.model(), &near, &bad)
            .unwrap_err()
            .to_string()
            .contains("top_p")
    );
}
