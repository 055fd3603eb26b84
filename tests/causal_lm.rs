//! The causal-LM task: the loss is the mean next-token cross-entropy over exactly the target
//! positions (padding and masked prompt tokens excluded), instruction pairs mask their prompt,
//! JSONL errors name the line, and a short LoRA run on SmolLM2 lowers held-out perplexity.
mod common;

use std::io::Write;

use candle_core::{D, DType, Device, Tensor};
use candle_peft::data::{PromptResponse, read_jsonl_pairs};
use candle_peft::io::source;
use candle_peft::models::llama::load_causal_tokenizer;
use candle_peft::tasks::TaskOptions;
use candle_peft::tasks::causal_lm::{CausalLmTask, LmExample};
use candle_peft::{DEFAULT_ADAPTER, LoraConfig, Schedule, TrainConfig, TrainTask, Trainer, Warmup};
use common::llama::{tiny, tiny_llama_json};

fn smollm2_tokenizer() -> tokenizers::Tokenizer {
    let src = source::resolve(common::smollm2_gguf().to_str().unwrap()).unwrap();
    load_causal_tokenizer(&src).unwrap()
}

fn tiny_task(seq_len: usize) -> CausalLmTask {
    let (model, cfg) = tiny(&tiny_llama_json(true), 3);
    CausalLmTask::new(model, cfg, smollm2_tokenizer(), seq_len, Device::Cpu).unwrap()
}

/// `−log softmax(logits[b, t−1])[ids[b, t]]` for one position, from a full forward of one
/// unpadded sequence.
fn token_nll(task: &CausalLmTask, ids: &[u32], pos: usize) -> f64 {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = task.model().model().forward(&input, None).unwrap();
    let row = logits.get(0).unwrap().get(pos - 1).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&row, D::Minus1).unwrap();
    -log_probs
        .get(ids[pos] as usize)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn loss_is_the_mean_over_target_tokens_only() {
    let task = tiny_task(32);
    let a = LmExample {
        ids: vec![5, 17, 33, 2, 64, 80, 11, 9],
        loss_from: 0,
    };
    // A prompt of 3 tokens: targets are positions 3.. only.
    let b = LmExample {
        ids: vec![40, 41, 42, 43, 44],
        loss_from: 3,
    };
    let (loss, n) = task.batch_loss(&[&a, &b]).unwrap();
    assert_eq!(n, 7 + 2);
    assert_eq!(a.targets() + b.targets(), n);
    let mut expected = 0.0;
    for pos in 1..a.ids.len() {
        expected += token_nll(&task, &a.ids, pos);
    }
    for pos in 3..b.ids.len() {
        expected += token_nll(&task, &b.ids, pos);
    }
    expected /= n as f64;
    let got = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
}

#[test]
fn loss_gradient_reaches_every_adapter_var_and_ignores_padding() {
    let mut task = tiny_task(32);
    let mut lora = LoraConfig::new(
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        4,
        8.0,
    );
    lora.init_lora_weights = candle_peft::adapters::lora::InitLoraWeights::Bool(false);
    task.add_adapter(DEFAULT_ADAPTER, lora).unwrap();
    let short = LmExample {
        ids: vec![7, 8, 9, 10],
        loss_from: 0,
    };
    let long = LmExample {
        ids: (20..40).collect(),
        loss_from: 0,
    };
    // The short sequence's loss alone equals its share when padded next to a longer one.
    let (alone, n_alone) = task.batch_loss(&[&short]).unwrap();
    let (both, n_both) = task.batch_loss(&[&short, &long]).unwrap();
    let (long_only, n_long) = task.batch_loss(&[&long]).unwrap();
    let s = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let combined = (s(&alone) * n_alone as f64 + s(&long_only) * n_long as f64) / n_both as f64;
    assert!(
        (s(&both) - combined).abs() < 1e-5,
        "{} vs {combined}",
        s(&both)
    );

    let grads = both.backward().unwrap();
    let vars = task.trainable_vars();
    assert_eq!(vars.len(), 2 * 7 * 2);
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "zero gradient for {name}");
    }
}

#[test]
fn instruction_pairs_mask_the_prompt_and_end_with_eos() {
    let task = tiny_task(24);
    let pairs = vec![PromptResponse {
        prompt: "Question: what is two plus two?\nAnswer:".into(),
        response: " four".into(),
    }];
    let examples = task.pair_examples(&pairs).unwrap();
    let prompt_ids = task.encode(&pairs[0].prompt).unwrap();
    let response_ids = task.encode(&pairs[0].response).unwrap();
    let e = &examples[0];
    assert_eq!(e.loss_from, prompt_ids.len());
    assert_eq!(&e.ids[..prompt_ids.len()], prompt_ids.as_slice());
    assert_eq!(
        &e.ids[prompt_ids.len()..prompt_ids.len() + response_ids.len()],
        response_ids.as_slice()
    );
    assert_eq!(e.ids.last().copied(), Some(2), "the tiny config's eos is 2");
    assert_eq!(e.targets(), response_ids.len() + 1);

    let long_prompt = vec![PromptResponse {
        prompt: "word ".repeat(40),
        response: "x".into(),
    }];
    let err = task.pair_examples(&long_prompt).unwrap_err().to_string();
    assert!(err.contains("pair 1") && err.contains("no room"), "{err}");
}

#[test]
fn jsonl_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::File::create(&p)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        p
    };
    let good = write(
        "good.jsonl",
        "{\"prompt\": \"a\", \"response\": \"b\", \"id\": 1}\n\n{\"prompt\": \"\", \"response\": \"c\"}\n",
    );
    let pairs = read_jsonl_pairs(&good).unwrap();
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[1].response, "c");
    for (text, line, reason) in [
        ("{\"prompt\": \"a\"}\n", 1, "missing field `response`"),
        (
            "{\"prompt\": \"a\", \"response\": \"b\"}\nnot json\n",
            2,
            "invalid JSON",
        ),
        ("[1, 2]\n", 1, "not a JSON object"),
        ("{\"prompt\": 3, \"response\": \"b\"}\n", 1, "not a string"),
        (
            "{\"prompt\": \"a\", \"response\": \"\"}\n",
            1,
            "empty `response`",
        ),
    ] {
        let p = write("bad.jsonl", text);
        let err = read_jsonl_pairs(&p).unwrap_err().to_string();
        assert!(
            err.contains(&format!(":{line}")) && err.contains(reason),
            "{text:?}: {err}"
        );
    }
}

#[test]
fn a_short_lora_run_lowers_smollm2_held_out_perplexity() {
    let opts = TaskOptions {
        seq_len: 64,
        seed: 7,
        ..TaskOptions::default()
    };
    let mut task =
        CausalLmTask::from_pretrained(common::smollm2_gguf().to_str().unwrap(), opts).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let train = task
        .read_examples(&root.join("data/shakespeare/train.txt"), false)
        .unwrap();
    let valid = task
        .read_examples(&root.join("data/shakespeare/valid.txt"), true)
        .unwrap();
    let valid = &valid[..6];
    let before = task.evaluate_lm(valid).unwrap();
    task.add_adapter(
        DEFAULT_ADAPTER,
        LoraConfig::new(&["q_proj", "v_proj", "o_proj", "down_proj"], 8, 16.0),
    )
    .unwrap();
    let config = TrainConfig {
        steps: 8,
        batch_size: 2,
        lr: 2e-3,
        schedule: Schedule::Constant,
        warmup: Warmup::Steps(0),
        seed: 7,
        quiet: true,
        ..TrainConfig::default()
    };
    Trainer::new(config)
        .unwrap()
        .run(&task, &train[..16], None)
        .unwrap();
    let after = task.evaluate_lm(valid).unwrap();
    assert_eq!(before.tokens, after.tokens);
    assert!(
        after.perplexity < 0.97 * before.perplexity,
        "held-out perplexity {:.3} → {:.3}",
        before.perplexity,
        after.perplexity
    );
    assert!((after.perplexity - after.loss.exp()).abs() < 1e-9 * after.perplexity);
}
