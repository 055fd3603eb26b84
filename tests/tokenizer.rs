//! The causal-LM tokenizer: SmolLM2's rebuilt from its GGUF metadata (no leading space, single
//! digits, ChatML markers as single special tokens), round trips on fixed strings, the chat
//! template, and folder tokenizers (present or missing).
mod common;

use candle_peft::io::gguf::GgufModel;
use candle_peft::io::source::{ModelSource, SourceKind};
use candle_peft::load_causal_tokenizer;
use common::llama::*;
use tokenizers::Tokenizer;

fn smollm2_tokenizer() -> Tokenizer {
    load_causal_tokenizer(&smollm2_source()).unwrap()
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

#[test]
fn smollm2_ids_on_fixed_strings() {
    let tok = smollm2_tokenizer();
    // No leading space: "Hello" is one token, not "ĠHello" (38699).
    assert_eq!(encode(&tok, "Hello"), vec![19556]);
    assert_eq!(tok.token_to_id("ĠHello"), Some(38699));
    assert_eq!(encode(&tok, " Hello"), vec![38699]);
    // Digits one by one.
    assert_eq!(encode(&tok, "2024"), vec![34, 32, 34, 36]);
    assert_eq!(
        encode(
            &tok,
            "<|im_start|>user\nWhat is the capital of France? 2024<|im_end|>"
        ),
        SMOLLM2_PROMPT.to_vec()
    );
    assert_eq!(tok.get_vocab_size(true), 49152);
}

#[test]
fn smollm2_round_trips() {
    let tok = smollm2_tokenizer();
    for text in [
        "Hello, world!",
        "  leading spaces and trailing  ",
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
        "naïve café — 東京 🚀 3.14159",
        "tabs\tand\r\nwindows newlines",
        "<|im_start|>assistant\nThe answer is 42.<|im_end|>\n",
    ] {
        let ids = encode(&tok, text);
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{ids:?}");
    }
}

#[test]
fn special_tokens_and_chat_template() {
    let tok = smollm2_tokenizer();
    for (marker, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)] {
        assert_eq!(tok.token_to_id(marker), Some(id));
        assert_eq!(encode(&tok, marker), vec![id], "{marker}");
    }
    let gguf = GgufModel::open(&common::smollm2_gguf()).unwrap();
    let template = gguf.chat_template().expect("SmolLM2 ships a chat template");
    assert!(template.contains("<|im_start|>") && template.contains("<|im_end|>"));

    // A rendered ChatML conversation: every marker is one special token, the text between them
    // is ordinary text, and skipping special tokens removes exactly the markers.
    let chat = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
                <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n";
    let ids = encode(&tok, chat);
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);
    assert_eq!(ids[0], 1);
    assert_eq!(&ids[1..3], &encode(&tok, "system\n")[..]);
    let plain = tok.decode(&ids, true).unwrap();
    assert_eq!(
        plain,
        "system\nYou are a helpful assistant.\nuser\nHi there\nassistant\n"
    );
    // Marker text inside ordinary words is not split out.
    assert!(!encode(&tok, "im_start").contains(&1));
}

#[test]
fn folder_tokenizer_present_or_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokenizer.json");
    std::fs::write(&path, smollm2_tokenizer().to_string(false).unwrap()).unwrap();
    let mut src = ModelSource {
        spec: "local-model".into(),
        kind: SourceKind::Local,
        dir: tmp.path().to_path_buf(),
        config: tmp.path().join("config.json"),
        weights: Vec::new(),
        weights_index: None,
        tokenizer: Some(path.clone()),
    };
    let tok = load_causal_tokenizer(&src).unwrap();
    assert_eq!(
        encode(&tok, "Hello 2024"),
        encode(&smollm2_tokenizer(), "Hello 2024")
    );

    src.tokenizer = None;
    let err = load_causal_tokenizer(&src).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("local-model"),
        "{err}"
    );

    std::fs::write(&path, "{not json").unwrap();
    src.tokenizer = Some(path);
    let err = load_causal_tokenizer(&src).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}
