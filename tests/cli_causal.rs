//! `candle-peft train/eval --task causal-lm` and `generate` on SmolLM2 (GGUF): the merged export
//! and base + adapter give the same perplexity, `eval --json` prints perplexity, loss and tokens,
//! JSONL instruction data trains, EVA and CorDA calibrate and train, generation is deterministic
//! and honours the adapter, and bad input fails with a message naming the problem.
mod common;
use common::bin;

use std::path::Path;
use std::process::Output;

use common::{run_err, run_ok};
use serde_json::Value;

fn json_line(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().expect("a JSON line on stdout");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn gguf() -> String {
    common::smollm2_gguf().display().to_string()
}

fn data(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/shakespeare")
        .join(name)
        .display()
        .to_string()
}

/// A held-out file small enough for quick evaluations: the first ~1,500 characters of valid.txt.
fn small_valid(dir: &Path) -> String {
    let text = std::fs::read_to_string(data("valid.txt")).unwrap();
    let cut = text.char_indices().nth(1500).map_or(text.len(), |(i, _)| i);
    let p = dir.join("valid-small.txt");
    std::fs::write(&p, &text[..cut]).unwrap();
    p.display().to_string()
}

fn eval_json(model: &str, adapter: Option<&Path>, data: &str) -> Value {
    let mut cmd = bin();
    cmd.args([
        "eval",
        "--task",
        "causal-lm",
        "--model",
        model,
        "--data",
        data,
        "--seq",
        "64",
        "--json",
    ]);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    json_line(&run_ok(&mut cmd))
}

#[test]
fn train_merge_eval_and_generate_on_smollm2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let valid = small_valid(dir.path());
    let trained = run_ok(bin().args([
        "train",
        "--task",
        "causal-lm",
        "--model",
        &gguf(),
        "--data",
        &data("train.txt"),
        "--method",
        "lora",
        "--targets",
        "q_proj,v_proj",
        "--rank",
        "4",
        "--steps",
        "3",
        "--batch",
        "2",
        "--seq",
        "32",
        "--lr",
        "5e-3",
        "--out",
        out.to_str().unwrap(),
        "--merge",
        "--json",
        "--quiet",
    ]));
    let report = json_line(&trained);
    assert_eq!(report["steps"], 3);
    assert_eq!(report["losses"].as_array().unwrap().len(), 3);
    // 30 layers × (q_proj 576→576 + v_proj 576→192) at r = 4.
    assert_eq!(
        report["trainable_parameters"],
        30 * (4 * (576 + 576) + 4 * (576 + 192))
    );
    let adapter = out.join("adapter");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");

    let base = eval_json(&gguf(), None, &valid);
    let adapted = eval_json(&gguf(), Some(&adapter), &valid);
    let merged = eval_json(&out.join("merged").display().to_string(), None, &valid);
    for v in [&base, &adapted, &merged] {
        let (ppl, loss) = (
            v["perplexity"].as_f64().unwrap(),
            v["loss"].as_f64().unwrap(),
        );
        assert!((ppl - loss.exp()).abs() < 1e-6 * ppl, "{v}");
        assert_eq!(v["tokens"], base["tokens"]);
    }
    let (pa, pm) = (
        adapted["perplexity"].as_f64().unwrap(),
        merged["perplexity"].as_f64().unwrap(),
    );
    assert!((pa - pm).abs() < 1e-3 * pa, "adapted {pa} vs merged {pm}");
    assert_ne!(base["perplexity"], adapted["perplexity"]);

    let generate = |extra: &[&str]| -> String {
        let mut cmd = bin();
        cmd.args([
            "generate",
            "--model",
            &gguf(),
            "--prompt",
            "ROMEO:\n",
            "--max-new-tokens",
            "8",
            "--json",
        ]);
        cmd.args(extra);
        json_line(&run_ok(&mut cmd))["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let greedy = generate(&[]);
    assert!(!greedy.is_empty());
    assert_eq!(greedy, generate(&[]), "greedy decoding is deterministic");
    let sampled = generate(&["--temperature", "0.9", "--top-p", "0.9", "--seed", "3"]);
    assert_eq!(
        sampled,
        generate(&["--temperature", "0.9", "--top-p", "0.9", "--seed", "3"]),
        "sampling with a seed is deterministic"
    );
    let adapter_arg = adapter.display().to_string();
    let with_adapter = generate(&["--adapter", &adapter_arg]);
    let merged_dir = out.join("merged").display().to_string();
    let mut cmd = bin();
    cmd.args([
        "generate",
        "--model",
        &merged_dir,
        "--prompt",
        "ROMEO:\n",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    let from_merged = json_line(&run_ok(&mut cmd))["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(with_adapter, from_merged);
}

#[test]
fn jsonl_instruction_data_trains_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = (0..6)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Q: what is {i} plus {i}?\nA:"),
                "response": format!(" {}", 2 * i),
            })
            .to_string()
        })
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let out = run_ok(bin().args([
        "train",
        "--task",
        "causal-lm",
        "--model",
        &gguf(),
        "--data",
        jsonl.to_str().unwrap(),
        "--eval-data",
        jsonl.to_str().unwrap(),
        "--method",
        "lora",
        "--targets",
        "q_proj,v_proj",
        "--rank",
        "2",
        "--steps",
        "2",
        "--batch",
        "3",
        "--seq",
        "32",
        "--out",
        dir.path().join("run").to_str().unwrap(),
        "--json",
        "--quiet",
    ]));
    let report = json_line(&out);
    assert_eq!(report["train_sequences"], 6);
    let eval = &report["eval"];
    // Each pair's targets: the response's tokens plus the eos.
    assert!(eval["tokens"].as_u64().unwrap() >= 12, "{eval}");
    assert!(eval["perplexity"].as_f64().unwrap().is_finite());
}

/// `train --method eva|corda` on SmolLM2 with a few calibration batches: EVA writes a PEFT LoRA
/// whose ranks spend the whole budget and whose B = 0 leaves the perplexity at the base's; CorDA
/// trains two steps and its merged export equals base + adapter.
#[test]
fn eva_and_corda_calibrate_and_train_on_smollm2_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let valid = small_valid(dir.path());
    let train = |method: &str, steps: &str, extra: &[&str]| {
        let out = dir.path().join(method);
        let mut cmd = bin();
        cmd.args([
            "train",
            "--task",
            "causal-lm",
            "--model",
            &gguf(),
            "--data",
            &data("train.txt"),
            "--method",
            method,
            "--targets",
            "q_proj,v_proj",
            "--rank",
            "4",
            "--steps",
            steps,
            "--batch",
            "2",
            "--seq",
            "32",
            "--calib-batches",
            "3",
            "--lr",
            "5e-3",
            "--out",
            out.to_str().unwrap(),
            "--merge",
            "--json",
            "--quiet",
        ]);
        cmd.args(extra);
        json_line(&run_ok(&mut cmd));
        out
    };
    let base = eval_json(&gguf(), None, &valid)["perplexity"]
        .as_f64()
        .unwrap();

    // τ = 0.5 lets the components of 3 batches × 64 tokens count as converged.
    let eva = train("eva", "0", &["--opt", "tau=0.5"]);
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(eva.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    // target_modules names the adapted layers; rank_pattern lists those whose rank is not r.
    let total: u64 = config["target_modules"]
        .as_array()
        .expect("target_modules")
        .iter()
        .map(|m| {
            config["rank_pattern"][m.as_str().unwrap()]
                .as_u64()
                .unwrap_or(4)
        })
        .sum();
    // The budget is r × the number of targeted layers (30 blocks × q_proj, v_proj).
    assert_eq!(total, 4 * 60, "{config}");
    let eva_ppl = eval_json(&gguf(), Some(&eva.join("adapter")), &valid)["perplexity"]
        .as_f64()
        .unwrap();
    assert!(
        (eva_ppl - base).abs() < 1e-4 * base,
        "EVA at init {eva_ppl} vs base {base}"
    );

    let corda = train("corda", "2", &[]);
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(corda.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "CORDA");
    let adapted = eval_json(&gguf(), Some(&corda.join("adapter")), &valid)["perplexity"]
        .as_f64()
        .unwrap();
    let merged = eval_json(&corda.join("merged").display().to_string(), None, &valid)["perplexity"]
        .as_f64()
        .unwrap();
    assert!(
        (adapted - merged).abs() < 1e-3 * adapted,
        "adapted {adapted} vs merged {merged}"
    );
    assert!(
        (adapted - base).abs() > 1e-6 * base,
        "two CorDA steps changed nothing"
    );
}

#[test]
fn causal_lm_bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let long_prompt = "the ".repeat(9000);
    let e = run_err(bin().args([
        "generate",
        "--model",
        &gguf(),
        "--prompt",
        &long_prompt,
        "--max-new-tokens",
        "1",
    ]));
    assert!(e.contains("context"), "{e}");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\"}\n",
    )
    .unwrap();
    let e = run_err(bin().args([
        "train",
        "--task",
        "causal-lm",
        "--model",
        &gguf(),
        "--data",
        bad.to_str().unwrap(),
        "--method",
        "lora",
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]));
    assert!(e.contains("bad.jsonl:2") && e.contains("response"), "{e}");

    let e = run_err(bin().args([
        "eval",
        "--task",
        "causal-lm",
        "--model",
        &gguf(),
        "--data",
        &data("valid.txt"),
        "--seq",
        "100000",
    ]));
    assert!(e.contains("context"), "{e}");

    // A Llama folder without a tokenizer.
    let folder = dir.path().join("no-tokenizer");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("config.json"),
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": 10, "max_position_embeddings": 16,
            "rms_norm_eps": 1e-5
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(folder.join("model.safetensors"), b"").unwrap();
    let e = run_err(bin().args([
        "eval",
        "--task",
        "causal-lm",
        "--model",
        folder.to_str().unwrap(),
        "--data",
        &data("valid.txt"),
    ]));
    assert!(e.to_lowercase().contains("tokenizer"), "{e}");
}

/// `generate --json` prints the prompt's and the generated token ids; `--chat` renders the prompt
/// with SmolLM2's template (transformers' ids); `train --chat-template` masks the user turn; a
/// model without a template is an error naming it.
#[test]
fn generate_ids_chat_prompts_and_chat_template_training() {
    let tok = candle_peft::load_causal_tokenizer(&common::llama::smollm2_source()).unwrap();
    let generate = |model: &str, prompt: &str, extra: &[&str]| {
        let mut cmd = bin();
        cmd.args([
            "generate",
            "--model",
            model,
            "--prompt",
            prompt,
            "--max-new-tokens",
            "6",
            "--json",
        ]);
        cmd.args(extra);
        cmd
    };
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let plain = json_line(&run_ok(&mut generate(&gguf(), "ROMEO:\n", &[])));
    let expected: Vec<u32> = tok.encode("ROMEO:\n", false).unwrap().get_ids().to_vec();
    assert_eq!(ids(&plain["prompt_ids"]), expected);
    let generated = ids(&plain["ids"]);
    assert!(!generated.is_empty() && generated.len() <= 6, "{plain}");
    assert_eq!(tok.decode(&generated, true).unwrap(), plain["text"]);

    let chat = json_line(&run_ok(&mut generate(&gguf(), "What is 2+2?", &["--chat"])));
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("gemma3").join("smollm2_chat.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        ids(&chat["prompt_ids"]),
        ids(&fixture["user_generation_prompt_ids"])
    );
    assert_eq!(chat["prompt"], "What is 2+2?");
    assert!(
        !ids(&chat["ids"]).contains(&2),
        "<|im_end|> stops generation"
    );

    // A Llama folder without a chat template (the template is looked up before the weights
    // load, so empty weights do).
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base-model");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(
        base.join("config.json"),
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": 10, "max_position_embeddings": 16,
            "rms_norm_eps": 1e-5
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(base.join("model.safetensors"), b"").unwrap();
    let no_template = base.display().to_string();
    let e = run_err(&mut generate(&no_template, "hi", &["--chat"]));
    assert!(
        e.contains("base-model") && e.contains("no chat template"),
        "{e}"
    );

    let jsonl = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = (0..4)
        .map(|i| {
            serde_json::json!({"prompt": format!("What is {i} plus {i}?"), "response": format!("{}", 2 * i)})
                .to_string()
        })
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let train = |model: &str, out: &str| {
        let mut cmd = bin();
        cmd.args([
            "train",
            "--task",
            "causal-lm",
            "--model",
            model,
            "--chat-template",
            "--data",
            jsonl.to_str().unwrap(),
            "--eval-data",
            jsonl.to_str().unwrap(),
            "--method",
            "lora",
            "--targets",
            "q_proj,v_proj",
            "--rank",
            "2",
            "--steps",
            "1",
            "--batch",
            "4",
            "--seq",
            "64",
            "--out",
            dir.path().join(out).to_str().unwrap(),
            "--json",
            "--quiet",
        ]);
        cmd
    };
    let report = json_line(&run_ok(&mut train(&gguf(), "run")));
    assert_eq!(report["train_sequences"], 4);
    // Each pair's targets: the one-digit answer, <|im_end|> and "\n".
    assert_eq!(report["eval"]["tokens"], 12, "{report}");
    // eval --chat-template counts the same targets.
    let eval = json_line(&run_ok(bin().args([
        "eval",
        "--task",
        "causal-lm",
        "--model",
        &gguf(),
        "--chat-template",
        "--data",
        jsonl.to_str().unwrap(),
        "--seq",
        "64",
        "--json",
    ])));
    assert_eq!(eval["tokens"], 12, "{eval}");
    let e = run_err(&mut train(&no_template, "no-template-run"));
    assert!(
        e.contains("base-model") && e.contains("no chat template"),
        "{e}"
    );
}
