//! Chat templates: SmolLM2-Instruct's template (from its GGUF metadata) renders exactly as
//! transformers' `apply_chat_template` (tests/fixtures/gemma3/smollm2_chat.json), the rendered
//! prompt tokenizes to transformers' ids, and prompt/response pairs (chat or plain) mask exactly
//! the prompt's label positions.
mod common;

use candle_core::Device;
use candle_peft::chat::{ChatMessage, ChatTemplate};
use candle_peft::data::PromptResponse;
use candle_peft::io::gguf::GgufMetadata;
use candle_peft::io::source::{ModelSource, SourceKind};
use candle_peft::load_causal_tokenizer;
use candle_peft::tasks::causal_lm::CausalLmTask;
use common::llama::{smollm2_source, tiny, tiny_llama_json};
use serde_json::Value;

fn fixture() -> Value {
    let path = common::fixture("gemma3").join("smollm2_chat.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn smollm2_template() -> ChatTemplate {
    let meta = GgufMetadata::open(&common::smollm2_gguf()).unwrap();
    ChatTemplate::from_gguf(&meta)
        .unwrap()
        .expect("SmolLM2-Instruct ships a chat template")
}

/// A tiny random Llama with SmolLM2's tokenizer: the ids are real, the model is fast.
fn tiny_task(seq_len: usize) -> CausalLmTask {
    let (model, cfg) = tiny(&tiny_llama_json(true), 3);
    let tokenizer = load_causal_tokenizer(&smollm2_source()).unwrap();
    CausalLmTask::new(model, cfg, tokenizer, seq_len, Device::Cpu).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn smollm2_template_renders_as_transformers() {
    let f = fixture();
    let t = smollm2_template();
    assert_eq!(t.source(), f["template"].as_str().unwrap());
    let user = [ChatMessage::new("user", "What is 2+2?")];
    let pair = [
        ChatMessage::new("user", "What is 2+2?"),
        ChatMessage::new("assistant", "4"),
    ];
    let sys_pair = [
        ChatMessage::new("system", "Be brief."),
        pair[0].clone(),
        pair[1].clone(),
    ];
    assert_eq!(
        t.render(&user, true).unwrap(),
        f["user_generation_prompt"].as_str().unwrap()
    );
    assert_eq!(
        t.render_prompt("What is 2+2?").unwrap(),
        f["user_generation_prompt"]
    );
    assert_eq!(
        t.render(&pair, false).unwrap(),
        f["user_assistant"].as_str().unwrap()
    );
    assert_eq!(
        t.render(&sys_pair, false).unwrap(),
        f["system_user_assistant"].as_str().unwrap()
    );
}

#[test]
fn chat_prompt_ids_match_transformers() {
    let task = tiny_task(64);
    let got = task
        .chat_prompt_ids(&smollm2_template(), "What is 2+2?")
        .unwrap();
    assert_eq!(got, ids(&fixture()["user_generation_prompt_ids"]));
    // SmolLM2's tokenizer adds no BOS: a plain prompt is its text's ids.
    assert_eq!(
        task.prompt_ids("What is 2+2?").unwrap(),
        task.encode("What is 2+2?").unwrap()
    );
}

#[test]
fn chat_pairs_mask_the_user_turn_and_generation_prompt() {
    let task = tiny_task(64);
    let pairs = [PromptResponse {
        prompt: "What is 2+2?".into(),
        response: "4".into(),
    }];
    let examples = task
        .chat_pair_examples(&pairs, &smollm2_template())
        .unwrap();
    let e = &examples[0];
    let prompt = ids(&fixture()["user_generation_prompt_ids"]);
    assert_eq!(prompt.len(), 37);
    // transformers' apply_chat_template(pair, tokenize=True): the prompt's 37 ids, then
    // "4" (36), <|im_end|> (2), "\n" (198).
    let mut expected = prompt.clone();
    expected.extend([36, 2, 198]);
    assert_eq!(e.ids, expected);
    assert_eq!(e.loss_from, 37);
    let mut labels = vec![-100i64; 37];
    labels.extend([36, 2, 198]);
    assert_eq!(e.labels(), labels);
    assert_eq!(e.targets(), 3);

    // No room for the response: an error naming the pair.
    let err = tiny_task(30)
        .chat_pair_examples(&pairs, &smollm2_template())
        .unwrap_err()
        .to_string();
    assert!(err.contains("pair 1") && err.contains("no room"), "{err}");
}

#[test]
fn plain_pairs_mask_the_prompt() {
    let task = tiny_task(64);
    let pairs = [PromptResponse {
        prompt: "Review: a gripping, funny film. Sentiment:".into(),
        response: " positive".into(),
    }];
    let e = &task.pair_examples(&pairs).unwrap()[0];
    // transformers' ids for the prompt and " positive" (2731), then the tiny config's eos (2).
    let prompt = [21465, 42, 253, 35913, 28, 17025, 4771, 30, 18279, 2572, 42];
    let mut expected = prompt.to_vec();
    expected.extend([2731, 2]);
    assert_eq!(e.ids, expected);
    let mut labels = vec![-100i64; prompt.len()];
    labels.extend([2731, 2]);
    assert_eq!(e.labels(), labels);
}

#[test]
fn templates_from_folders_and_missing_ones() {
    let dir = tempfile::tempdir().unwrap();
    // No template anywhere: None, and for a source an error naming the model.
    assert!(ChatTemplate::from_folder(dir.path()).unwrap().is_none());
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_folder(dir.path()).unwrap().unwrap();
    assert_eq!(
        t.render(&[ChatMessage::new("user", "hi")], false).unwrap(),
        "<s>hi</s>"
    );
    // chat_template.jinja wins over the config's field.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "[{{ messages[0].content }}]\n",
    )
    .unwrap();
    let t = ChatTemplate::from_folder(dir.path()).unwrap().unwrap();
    assert_eq!(
        t.render(&[ChatMessage::new("user", "hi")], false).unwrap(),
        "[hi]"
    );

    let gemma = common::models_dir().join("gemma-3-270m-q4_k_m.gguf");
    assert!(
        gemma.is_file(),
        "{} missing: run scripts/fetch-models.sh",
        gemma.display()
    );
    // Built by hand: resolving checks the architecture, and the template does not need it.
    let src = ModelSource {
        spec: gemma.display().to_string(),
        kind: SourceKind::Gguf,
        dir: gemma.parent().unwrap().to_path_buf(),
        config: gemma.clone(),
        weights: vec![gemma.clone()],
        weights_index: None,
        tokenizer: None,
    };
    let err = ChatTemplate::for_source(&src).unwrap_err().to_string();
    assert!(
        err.contains("gemma-3-270m-q4_k_m.gguf") && err.contains("no chat template"),
        "{err}"
    );
}
