//! Gemma 3's SentencePiece tokenizer rebuilt from the GGUF metadata: ids equal transformers' on
//! every case of tests/fixtures/gemma3/ (made by scripts/fixtures/gemma_tokenizer.py and
//! scripts/fixtures/gemma3.py), decoding gives transformers' text back, special tokens are
//! single ids.
mod common;

use std::path::PathBuf;
use std::time::Instant;

use candle_peft::io::gguf::GgufMetadata;
use serde_json::Value;
use tokenizers::Tokenizer;

/// The Gemma 3 270M Q4_K_M GGUF file.
fn gemma3_270m_gguf() -> PathBuf {
    let path = common::models_dir().join("gemma-3-270m-q4_k_m.gguf");
    assert!(
        path.is_file(),
        "Gemma 3 270M is missing at {}: run scripts/fetch-models.sh first",
        path.display()
    );
    path
}

fn gemma_tokenizer() -> Tokenizer {
    GgufMetadata::open(&gemma3_270m_gguf())
        .unwrap()
        .tokenizer()
        .unwrap()
}

fn fixture(name: &str) -> Value {
    let path = common::fixture("gemma3").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn encode(tok: &Tokenizer, text: &str, special: bool) -> Vec<u32> {
    tok.encode(text, special).unwrap().get_ids().to_vec()
}

#[test]
fn ids_and_decoding_match_transformers() {
    let start = Instant::now();
    let tok = gemma_tokenizer();
    let took = start.elapsed();
    eprintln!("262144-token tokenizer built in {took:?}");
    let cases = fixture("tokenizer_cases.json");
    assert_eq!(
        tok.get_vocab_size(true) as u64,
        cases["vocab_size"].as_u64().unwrap()
    );
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(encode(&tok, text, true), ids(&case["ids"]), "{text:?}");
        let plain = ids(&case["ids_no_special"]);
        assert_eq!(encode(&tok, text, false), plain, "{text:?}");
        assert_eq!(
            tok.decode(&plain, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
        assert_eq!(
            tok.decode(&ids(&case["ids"]), true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "{text:?}"
        );
        checked += 1;
    }
    assert!(checked >= 30, "{checked} cases");
    // The first fixture, recorded with the model: ids with BOS.
    for case in fixture("tokenizer_ids.json")["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(encode(&tok, text, true), ids(&case["ids"]), "{text:?}");
    }
}

#[test]
fn special_tokens_are_single_ids_and_text_round_trips() {
    let tok = gemma_tokenizer();
    let special = fixture("tokenizer_cases.json")["special"].clone();
    for (name, id) in special.as_object().unwrap() {
        assert_eq!(
            tok.token_to_id(name),
            Some(id.as_u64().unwrap() as u32),
            "{name:?}"
        );
    }
    assert_eq!(tok.token_to_id("<bos>"), Some(2));
    assert_eq!(tok.token_to_id("<start_of_turn>"), Some(105));
    assert_eq!(tok.token_to_id("<end_of_turn>"), Some(106));
    let chat = "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n";
    assert_eq!(
        encode(&tok, chat, false),
        vec![105, 2364, 107, 2202, 106, 107, 105, 4368, 107]
    );
    // BOS from tokenizer.ggml.add_bos_token, no EOS.
    assert_eq!(encode(&tok, "Hello world", true), vec![2, 9259, 1902]);
    // Text without control tokens decodes to itself (byte fallback included).
    for text in [
        "  two  spaces\tand\ttabs\n\nnewlines   end ",
        "naïve café — 東京 🚀 3.14159 \u{1F9EC}",
        "x = [1, 22, 333]; def f(): return 12345\n\tif x:\n\t\tpass",
    ] {
        let ids = encode(&tok, text, false);
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{ids:?}");
    }
}

#[test]
fn metadata_reader_takes_any_architecture() {
    let meta = GgufMetadata::open(&gemma3_270m_gguf()).unwrap();
    assert_eq!(meta.chat_template(), None);
    let cfg = meta.tokenizer_config_json().unwrap();
    assert_eq!(cfg["bos_token"], "<bos>");
    assert_eq!(cfg["eos_token"], "<eos>");
    assert_eq!(cfg["pad_token"], "<pad>");
    assert_eq!(cfg["unk_token"], "<unk>");
    assert_eq!(cfg["add_bos_token"], true);
    assert_eq!(cfg["add_eos_token"], false);
    assert!(cfg.get("chat_template").is_none());
}

/// The files a merged export of a GGUF source writes (tokenizer.json, tokenizer_config.json)
/// load back with the same ids. With `GEMMA_TOKENIZER_EXPORT_DIR` set they are also written
/// there, for checking them with transformers' `AutoTokenizer.from_pretrained(dir)`.
#[test]
fn exported_files_load_with_the_same_ids() {
    let meta = GgufMetadata::open(&gemma3_270m_gguf()).unwrap();
    let tok = meta.tokenizer().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs = vec![tmp.path().to_path_buf()];
    if let Some(d) = std::env::var_os("GEMMA_TOKENIZER_EXPORT_DIR") {
        dirs.push(PathBuf::from(d));
    }
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), tok.to_string(false).unwrap()).unwrap();
        let cfg = meta.tokenizer_config_json().unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&cfg).unwrap(),
        )
        .unwrap();
    }
    let back = Tokenizer::from_file(tmp.path().join("tokenizer.json")).unwrap();
    for case in fixture("tokenizer_cases.json")["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(encode(&back, text, true), ids(&case["ids"]), "{text:?}");
    }
}

/// The non-Gemma SentencePiece path (transformers' LlamaTokenizer: Metaspace prepending `▁` to
/// the first word, merges ranked by score, byte fallback, BOS by default) on a tiny GGUF made by
/// scripts/fixtures/tiny_spm_tokenizer.py.
#[test]
fn tiny_llama_sentencepiece_matches_transformers() {
    let dir = common::fixture("tiny-spm");
    let tok = GgufMetadata::open(&dir.join("tiny-spm.gguf"))
        .unwrap()
        .tokenizer()
        .unwrap();
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(encode(&tok, text, true), ids(&case["ids"]), "{text:?}");
        let plain = ids(&case["ids_no_special"]);
        assert_eq!(encode(&tok, text, false), plain, "{text:?}");
        assert_eq!(
            tok.decode(&plain, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
}
