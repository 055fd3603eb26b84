//! `HF_HOME` and `HF_HUB_OFFLINE` from the environment. Environment variables are process-wide,
//! so this file holds a single test function.
mod common;

use std::path::Path;

use candle_core::Device;
use candle_peft::PeftError;
use candle_peft::io::source::{self, HubOptions};
use candle_peft::models::bert::BertModel;

const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";
const COMMIT: &str = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf";

fn fill_hub_cache(hub: &Path, src: &Path) {
    let repo = source::repo_cache_dir(hub, MINILM);
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        let blob = repo.join("blobs").join(format!("etag-{f}"));
        std::os::unix::fs::symlink(src.join(f).canonicalize().unwrap(), &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/etag-{f}"), snap.join(f)).unwrap();
    }
}

fn set(key: &str, value: impl AsRef<std::ffi::OsStr>) {
    // SAFETY: this test binary runs one test function, on one thread; nothing else reads the
    // environment while it changes.
    unsafe { std::env::set_var(key, value) }
}

#[test]
fn hf_home_and_hf_hub_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("hf");
    fill_hub_cache(&hf_home.join("hub"), &common::minilm_dir());
    set("HF_HOME", &hf_home);
    set("HF_HUB_OFFLINE", "1");
    set("HF_ENDPOINT", "http://127.0.0.1:9");
    // SAFETY: as in `set`.
    unsafe { std::env::remove_var("HF_HUB_CACHE") };

    let opts = HubOptions::from_env();
    assert_eq!(opts.cache_dir, hf_home.join("hub"));
    assert!(opts.offline);
    assert_eq!(opts.endpoint.as_deref(), Some("http://127.0.0.1:9"));

    // The hub id resolves from $HF_HOME/hub with no network.
    let src = source::resolve(MINILM).unwrap();
    assert!(src.config.starts_with(hf_home.join("hub")), "{src:?}");
    let loaded = BertModel::from_pretrained(MINILM, &Device::Cpu).unwrap();
    assert_eq!(loaded.config.hidden_size, 384);
    assert_eq!(loaded.model.layer_names().len(), 37);
    assert_eq!(loaded.source, src);

    // A repo that is not cached is a typed error naming the script, without a download try.
    let err = source::resolve("nobody/not-cached").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PeftError::ModelNotFound { .. }), "{msg}");
    assert!(msg.contains("scripts/fetch-models.sh"), "{msg}");
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
    // (PeftModel has no Debug impl, so no unwrap_err here.)
    let Err(err) = BertModel::from_pretrained("nobody/not-cached", &Device::Cpu) else {
        panic!("an uncached model loaded with HF_HUB_OFFLINE=1");
    };
    assert!(err.to_string().contains("scripts/fetch-models.sh"), "{err}");

    // HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub.
    set("HF_HUB_CACHE", tmp.path().join("elsewhere"));
    assert_eq!(
        HubOptions::from_env().cache_dir,
        tmp.path().join("elsewhere")
    );
    let err = source::resolve(MINILM).unwrap_err();
    assert!(err.to_string().contains("scripts/fetch-models.sh"), "{err}");
    // SAFETY: as in `set`.
    unsafe { std::env::remove_var("HF_HUB_CACHE") };

    // HF_HUB_OFFLINE=0: a miss goes to the (closed) endpoint and fails with a clear error.
    set("HF_HUB_OFFLINE", "0");
    assert!(!HubOptions::from_env().offline);
    let msg = source::resolve("nobody/not-cached")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("download failed"), "{msg}");
    // …while a cached model still resolves without the network.
    assert_eq!(source::resolve(MINILM).unwrap(), src);
}
