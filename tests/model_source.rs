//! Model resolution: local folders (single file and shards) and hub ids through a hub cache the
//! test fills itself, with explicit options (no environment variables; see hub_env.rs for those).
mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_peft::PeftError;
use candle_peft::io::source::{self, HubOptions, SourceKind};
use candle_peft::models::bert::BertModel;

const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Fills `<hub>/models--org--name` the way huggingface_hub does: refs/main → commit,
/// snapshots/<commit>/<file> → ../../blobs/<etag> (symlinks), blobs linking to the real files.
fn fill_hub_cache(hub: &Path, repo_id: &str, src: &Path, files: &[&str], ref_text: &str) {
    let repo = source::repo_cache_dir(hub, repo_id);
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(repo.join("refs/main"), ref_text).unwrap();
    for f in files {
        let blob = repo.join("blobs").join(format!("etag-{f}"));
        std::os::unix::fs::symlink(src.join(f).canonicalize().unwrap(), &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/etag-{f}"), snap.join(f)).unwrap();
    }
}

fn minilm_hub(ref_text: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    fill_hub_cache(
        &hub,
        MINILM,
        &common::minilm_dir(),
        &["config.json", "tokenizer.json", "model.safetensors"],
        ref_text,
    );
    (tmp, hub)
}

/// An endpoint nothing listens on: any download attempt fails at once.
const CLOSED: &str = "http://127.0.0.1:9";

fn inputs() -> (Tensor, Tensor) {
    let path = common::fixture("peft-lora-minilm").join("inputs.safetensors");
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    (t["input_ids"].clone(), t["attention_mask"].clone())
}

use common::max_abs_diff;

#[test]
fn hub_id_resolves_offline_from_the_cache() {
    let (_tmp, hub) = minilm_hub(COMMIT);
    let opts = HubOptions::new(&hub).offline(true).with_endpoint(CLOSED);
    let src = source::resolve_with(MINILM, &opts).unwrap();
    assert_eq!(
        src.kind,
        SourceKind::Hub {
            repo_id: MINILM.into(),
            revision: "main".into()
        }
    );
    let snap = source::repo_cache_dir(&hub, MINILM)
        .join("snapshots")
        .join(COMMIT);
    assert_eq!(src.dir, snap);
    assert_eq!(src.config, snap.join("config.json"));
    assert_eq!(src.weights, vec![snap.join("model.safetensors")]);
    assert_eq!(src.weights_index, None);
    assert_eq!(src.tokenizer, Some(snap.join("tokenizer.json")));

    // The model loads from the cache and computes what the local folder computes.
    let (ids, mask) = inputs();
    let (from_hub, cfg) =
        BertModel::from_source(&src, candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(cfg.num_hidden_layers, 6);
    let (local, _) = BertModel::from_dir(common::minilm_dir(), &Device::Cpu).unwrap();
    let a = from_hub.model().forward(&ids, None, Some(&mask)).unwrap();
    let b = local.model().forward(&ids, None, Some(&mask)).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);

    // Online, a cache hit makes no network call either (the endpoint is closed).
    let online = HubOptions::new(&hub).with_endpoint(CLOSED);
    assert_eq!(source::resolve_with(MINILM, &online).unwrap(), src);
}

#[test]
fn ref_with_trailing_newline_and_commit_revision() {
    let (_tmp, hub) = minilm_hub(&format!("{COMMIT}\n"));
    let opts = HubOptions::new(&hub).offline(true);
    let src = source::resolve_with(MINILM, &opts).unwrap();
    assert!(src.config.ends_with(format!("{COMMIT}/config.json")));
    let by_commit = source::resolve_with(MINILM, &opts.clone().with_revision(COMMIT)).unwrap();
    assert_eq!(by_commit.config, src.config);
    let err = source::resolve_with(MINILM, &opts.with_revision("v2")).unwrap_err();
    assert!(matches!(err, PeftError::ModelNotFound { .. }), "{err}");
}

#[test]
fn offline_miss_names_the_fetch_script() {
    let (_tmp, hub) = minilm_hub(COMMIT);
    let opts = HubOptions::new(&hub).offline(true).with_endpoint(CLOSED);
    let err = source::resolve_with("nobody/no-such-model", &opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PeftError::ModelNotFound { .. }), "{msg}");
    assert!(msg.contains("scripts/fetch-models.sh"), "{msg}");
    assert!(msg.contains("nobody/no-such-model"), "{msg}");
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");

    // A cached config without weights is a miss for the weights.
    let partial = hub.parent().unwrap().join("partial");
    fill_hub_cache(
        &partial,
        "org/config-only",
        &common::minilm_dir(),
        &["config.json"],
        COMMIT,
    );
    let err = source::resolve_with("org/config-only", &HubOptions::new(&partial).offline(true))
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(msg.contains("scripts/fetch-models.sh"), "{msg}");
}

#[test]
fn online_miss_tries_the_network_and_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = HubOptions::new(tmp.path().join("hub")).with_endpoint(CLOSED);
    let err = source::resolve_with("nobody/no-such-model", &opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PeftError::ModelNotFound { .. }), "{msg}");
    assert!(msg.contains("download failed"), "{msg}");
    assert!(msg.contains("scripts/fetch-models.sh"), "{msg}");
}

#[test]
fn local_folder_and_file() {
    let dir = common::minilm_dir();
    let src =
        source::resolve_with(dir.to_str().unwrap(), &HubOptions::new("/nonexistent")).unwrap();
    assert_eq!(src.kind, SourceKind::Local);
    assert_eq!(src.config, dir.join("config.json"));
    assert_eq!(src.weights, vec![dir.join("model.safetensors")]);
    assert_eq!(src.tokenizer, Some(dir.join("tokenizer.json")));

    let file = source::resolve_local(&dir.join("model.safetensors")).unwrap();
    assert_eq!(file.weights, src.weights);
    assert_eq!(file.config, src.config);
}

#[test]
fn sharded_weights_load_like_the_single_file() {
    let dir = common::minilm_dir();
    let tmp = tempfile::tempdir().unwrap();
    let sharded = tmp.path();
    std::fs::copy(dir.join("config.json"), sharded.join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let shard_files = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    for (part, file) in [first, second].iter().zip(shard_files) {
        let part: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|k| ((*k).clone(), tensors[*k].clone()))
            .collect();
        for k in part.keys() {
            weight_map.insert(k.clone(), serde_json::Value::String(file.into()));
        }
        candle_core::safetensors::save(&part, sharded.join(file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::to_string(&index).unwrap(),
    )
    .unwrap();

    let src = source::resolve_local(sharded).unwrap();
    assert_eq!(
        src.weights,
        shard_files.map(|f| sharded.join(f)).to_vec(),
        "shards in order"
    );
    assert_eq!(
        src.weights_index,
        Some(sharded.join("model.safetensors.index.json"))
    );
    assert_eq!(src.tokenizer, None);

    let (ids, mask) = inputs();
    let (a, _) = BertModel::from_dir(sharded, &Device::Cpu).unwrap();
    let (b, _) = BertModel::from_dir(&dir, &Device::Cpu).unwrap();
    let d = max_abs_diff(
        &a.model().forward(&ids, None, Some(&mask)).unwrap(),
        &b.model().forward(&ids, None, Some(&mask)).unwrap(),
    );
    assert_eq!(d, 0.0);

    // A shard listed in the index but missing on disk is an error naming it.
    std::fs::remove_file(sharded.join(shard_files[1])).unwrap();
    let msg = source::resolve_local(sharded).unwrap_err().to_string();
    assert!(msg.contains(shard_files[1]), "{msg}");
}

#[test]
fn bad_local_inputs_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = HubOptions::new(tmp.path().join("hub")).offline(true);

    let gguf = tmp.path().join("model.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let err = source::resolve_with(gguf.to_str().unwrap(), &opts).unwrap_err();
    assert!(matches!(err, PeftError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("GGUF"), "{err}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = source::resolve_local(&empty).unwrap_err();
    assert!(matches!(err, PeftError::ModelNotFound { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    std::fs::write(empty.join("config.json"), "{}").unwrap();
    let err = source::resolve_local(&empty).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    std::fs::write(empty.join("pytorch_model.bin"), b"").unwrap();
    let err = source::resolve_local(&empty).unwrap_err();
    assert!(matches!(err, PeftError::Unsupported(_)), "{err}");

    let err = source::resolve_with("./no/such/dir", &opts).unwrap_err();
    assert!(matches!(err, PeftError::ModelNotFound { .. }), "{err}");
}
