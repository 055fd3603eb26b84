//! The user-facing examples, run with small sizes: each is included as a module and its `run`
//! checked on numbers (loss falls; merge, unmerge, disable and the merged export reproduce what
//! they should).
mod common;

#[allow(dead_code)]
#[path = "../examples/causal_two_adapters.rs"]
mod causal_two_adapters;
#[allow(dead_code)]
#[path = "../examples/classify_eva_export.rs"]
mod classify_eva_export;
#[allow(dead_code)]
#[path = "../examples/method_study.rs"]
mod method_study;
#[allow(dead_code)]
#[path = "../examples/own_model_flora_lora.rs"]
mod own_model_flora_lora;

use std::path::Path;

#[test]
fn causal_two_adapters_switch_disable_merge_unmerge() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare/train.txt");
    let gguf = common::smollm2_gguf();
    let o = causal_two_adapters::run(gguf.to_str().unwrap(), &data, 6).unwrap();
    // Training moved the output; the second adapter gives another one.
    assert!(o.base > 1e-2 && o.switched > 1e-2, "{o:?}");
    // Disabled is the base model; merged and unmerged are the trained adapter.
    assert!(o.disabled_vs_base < 1e-4, "{o:?}");
    assert!(o.merged < 1e-3 && o.unmerged < 1e-4, "{o:?}");
}

#[test]
fn own_model_flora_and_lora_train() {
    // The example's own sizes: it is small. Four classes and fresh, seeded base weights (small
    // logits): about ln 4 at the start, and the adapters learn.
    let losses = own_model_flora_lora::run(256, 60).unwrap();
    assert!((losses[0] - 4f32.ln()).abs() < 0.3, "{losses:?}");
    assert!(losses[59] < 0.7 * losses[0], "{losses:?}");
}

#[test]
fn classify_eva_export_reproduces_the_adapted_model() {
    let tmp = tempfile::tempdir().unwrap();
    let minilm = common::minilm_dir();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sst2");
    let out = tmp.path().join("merged");
    let o = classify_eva_export::run(minilm.to_str().unwrap(), &data, 64, 12, &out).unwrap();
    assert!(o.loss.1 < o.loss.0, "{o:?}");
    assert!(o.merged_vs_adapted < 1e-4, "{o:?}");
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn method_study_quick_runs_resumes_and_counts_parameters() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    common::minilm_dir();
    let out = tempfile::tempdir().unwrap();
    let options = || method_study::Options {
        quick: true,
        out: out.path().to_path_buf(),
        parts: "classify".into(),
        lm_model: String::new(),
        bin: env!("CARGO_BIN_EXE_candle-peft").into(),
        root: root.to_path_buf(),
        // Two at once, as the full study runs: the results come back in method order.
        jobs: 2,
    };
    let summary = method_study::run(options()).unwrap();
    // Quick size: LoRA and SVFit, one rate, one seed: each a dev run, and its adapter scored on
    // the test split (the first seed is not trained twice).
    let mut runs: Vec<_> = std::fs::read_dir(out.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    runs.sort();
    assert_eq!(
        runs,
        [
            "classify-dev-lora-lr1e-3-s1.json",
            "classify-dev-svfit-lr2e-2-s1.json",
            "classify-test-lora-lr1e-3-s1-eval.json",
            "classify-test-svfit-lr2e-2-s1-eval.json",
        ]
    );
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.path().join("runs").join(name)).unwrap())
            .unwrap()
    };
    let lora = read(&runs[0]);
    let scored = read(&runs[2]);
    assert_eq!(scored["examples"], 32);
    // LoRA r = 8 on query and value of 6 layers (384 → 384): 12 · 8 · (384 + 384), plus the
    // classifier PEFT trains with it for SEQ_CLS (modules_to_save `classifier`: 384·2 + 2).
    let head = 384 * 2 + 2;
    assert_eq!(lora["trainable_parameters"], 12 * 8 * 768 + head);
    // The table's test accuracy is the scored adapter's.
    let acc = scored["accuracy"].as_f64().unwrap();
    assert!(
        summary.contains(&format!("| {acc:.3} ± 0.000 |")),
        "{summary}"
    );
    assert!((0.0..=1.0).contains(&acc), "{acc}");
    assert_eq!(lora["losses"].as_array().unwrap().len(), 3);
    assert!(lora["peak_rss_mb"].as_f64().unwrap() > 10.0);
    assert!(
        summary.contains("| lora |") && summary.contains("| svfit |"),
        "{summary}"
    );
    assert!(out.path().join("accuracy_vs_params.png").exists());
    // A second run reads every run from the cache: the same table.
    assert_eq!(method_study::run(options()).unwrap(), summary);
}
