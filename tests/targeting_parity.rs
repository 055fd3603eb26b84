//! Targeting against HF PEFT 0.21 itself: `tests/fixtures/peft_targeting.json` (made by
//! `scripts/fixtures/peft_targeting.py`) records, for each LoraConfig applied with
//! `get_peft_model` to tiny transformers models, which modules PEFT adapts with which `r` and
//! `scaling`, which it trains whole, and what `target_modules` became; or that PEFT refused the
//! config. Each config dict is read here through the `adapter_config.json` path
//! (`AdapterConfig::from_json`, key order kept) and added to our model with the same module
//! names; the outcome must be the same. The streaming merge applies the same rules.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_peft::io::export::{MergeOptions, merge_adapter_into_base};
use candle_peft::models::heads::BertForSequenceClassification;
use candle_peft::{
    AdapterConfig, BertConfig, BertModel, LoraAdapter, ModuleSelector, PeftBuilder, PeftError,
    PeftModel,
};
use serde_json::{Value, json};

use common::llama;

const ADAPTER: &str = "default";

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_targeting.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/fixtures/peft_targeting.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

/// The script's BertConfig: 3 layers, hidden 8, MiniLM's module names.
fn bert_config() -> BertConfig {
    BertConfig::from_json_str(
        r#"{"vocab_size": 64, "hidden_size": 8, "num_hidden_layers": 3,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}"#,
    )
    .unwrap()
}

/// A model of the fixture's kinds (zero weights for BERT: only names and shapes matter here),
/// with its adaptable layers' names.
enum Model {
    BertCls(PeftModel<BertForSequenceClassification>),
    Bert(PeftModel<BertModel>),
    Llama(PeftModel<candle_peft::LlamaForCausalLM>),
}

impl Model {
    fn new(kind: &str) -> Self {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        match kind {
            "bert_cls" => {
                let b = PeftBuilder::new(vb);
                let m = BertForSequenceClassification::load(&b, &bert_config(), 3, 0).unwrap();
                Model::BertCls(PeftModel::new(m, &b))
            }
            "bert" => {
                let b = PeftBuilder::new(vb);
                let m = BertModel::load(&b, &bert_config()).unwrap();
                Model::Bert(PeftModel::new(m, &b))
            }
            "llama" => Model::Llama(llama::tiny(&llama::tiny_llama_json(false), 7).0),
            "llama_tied" => Model::Llama(llama::tiny(&llama::tiny_llama_json(true), 7).0),
            other => panic!("unknown fixture model {other}"),
        }
    }

    fn add(&mut self, config: AdapterConfig) -> candle_peft::Result<()> {
        match self {
            Model::BertCls(m) => m.add_adapter(ADAPTER, config),
            Model::Bert(m) => m.add_adapter(ADAPTER, config),
            Model::Llama(m) => m.add_adapter(ADAPTER, config),
        }
    }

    fn layers(&self) -> &[candle_peft::LayerHandle] {
        match self {
            Model::BertCls(m) => m.layers(),
            Model::Bert(m) => m.layers(),
            Model::Llama(m) => m.layers(),
        }
    }

    fn config(&self) -> &AdapterConfig {
        match self {
            Model::BertCls(m) => m.adapter_config(ADAPTER).unwrap(),
            Model::Bert(m) => m.adapter_config(ADAPTER).unwrap(),
            Model::Llama(m) => m.adapter_config(ADAPTER).unwrap(),
        }
    }

    /// `module → (r, scaling)` of every LoRA adapter, and the modules trained whole.
    fn adapted(&self) -> (BTreeMap<String, (usize, f64)>, Vec<String>) {
        let mut lora = BTreeMap::new();
        let mut whole = Vec::new();
        for layer in self.layers() {
            let found = layer.with_adapter(ADAPTER, |a| {
                a.as_any()
                    .and_then(|x| x.downcast_ref::<LoraAdapter>())
                    .map(|l| (l.rank(), l.scaling()))
            });
            match found {
                Some(Some(rs)) => {
                    lora.insert(layer.name(), rs);
                }
                Some(None) => panic!("{}: not a LoRA adapter", layer.name()),
                None if layer.has_adapter(ADAPTER) => whole.push(layer.name()),
                None => {}
            }
        }
        whole.sort();
        (lora, whole)
    }
}

/// The case's LoraConfig dict as an `adapter_config.json` (key order kept). For `SEQ_CLS`,
/// PEFT's `PeftModelForSequenceClassification` adds `classifier` and `score` to
/// `modules_to_save` before adding the adapter; its saved file has them, so ours gets them too.
fn config_json(case: &Value) -> Value {
    let mut value = case["config"].clone();
    let obj = value.as_object_mut().unwrap();
    obj.insert("peft_type".into(), json!("LORA"));
    if obj.get("task_type") == Some(&json!("SEQ_CLS")) {
        let mut to_save = obj
            .get("modules_to_save")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        to_save.extend([json!("classifier"), json!("score")]);
        obj.insert("modules_to_save".into(), Value::Array(to_save));
    }
    value
}

/// Our outcome for one case: the adapted modules, or the error.
fn run(case: &Value) -> (Model, candle_peft::Result<()>) {
    let mut model = Model::new(case["model"].as_str().unwrap());
    let result = AdapterConfig::from_json(&config_json(case)).and_then(|c| model.add(c));
    (model, result)
}

#[test]
fn our_models_have_peft_s_linear_layers() {
    let fx = fixture();
    for (kind, names) in fx["linear_layers"].as_object().unwrap() {
        // Tied Llama: transformers keeps an `lm_head` module over the embedding; ours reads the
        // embedding directly and has no such layer. "all-linear" leaves it out either way.
        let mut want: Vec<&str> = names
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .filter(|n| !(kind == "llama_tied" && *n == "lm_head"))
            .collect();
        let model = Model::new(kind);
        let mut have: Vec<String> = model.layers().iter().map(|l| l.name()).collect();
        want.sort();
        have.sort();
        assert_eq!(have, want, "{kind}");
    }
}

#[test]
fn same_modules_ranks_and_scalings_as_peft() {
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        if case.get("error").is_some() {
            continue;
        }
        let (model, result) = run(case);
        result.unwrap_or_else(|e| panic!("{name}: PEFT accepts it, we fail: {e}"));
        let want = &case["result"];
        let (lora, whole) = model.adapted();
        let want_lora: BTreeMap<String, (usize, f64)> = want["modules"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let r = v["r"].as_u64().unwrap() as usize;
                (k.clone(), (r, v["scaling"].as_f64().unwrap()))
            })
            .collect();
        assert_eq!(
            lora.keys().collect::<Vec<_>>(),
            want_lora.keys().collect::<Vec<_>>(),
            "{name}: adapted modules"
        );
        for (module, &(r, s)) in &want_lora {
            let (our_r, our_s) = lora[module];
            assert_eq!(our_r, r, "{name}: r of {module}");
            assert!(
                (our_s - s).abs() <= 1e-12 * s.abs(),
                "{name}: scaling of {module}: {our_s} vs {s}"
            );
        }
        let want_whole: Vec<String> = want["modules_to_save"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(whole, want_whole, "{name}: modules to save");
        // "all-linear" is kept as PEFT keeps it after adding the adapter: the names it chose.
        let all_linear = case["config"]["target_modules"]
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case("all-linear"));
        if all_linear {
            let after: Vec<String> = want["target_modules_after"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            assert_eq!(
                model.config().targeting().target_modules,
                Some(ModuleSelector::List(after)),
                "{name}: target_modules after"
            );
        }
    }
}

#[test]
fn we_refuse_what_peft_refuses_naming_the_field() {
    let fx = fixture();
    let mut seen = 0;
    for case in fx["cases"].as_array().unwrap() {
        let Some(peft_error) = case.get("error") else {
            continue;
        };
        seen += 1;
        let name = case["name"].as_str().unwrap();
        let (_, result) = run(case);
        let err = result.expect_err(&format!(
            "{name}: PEFT refuses it ({peft_error}), we accept it"
        ));
        let msg = err.to_string();
        // Which field we blame, and a piece of the message.
        let (field, text): (Option<&str>, &str) = match name {
            "list_partial_segment_is_not_a_suffix" => (None, "did you mean `query` for `uery`?"),
            "regex_partial_is_no_match" => (None, "query, key, value, dense, classifier"),
            "error_no_match_typo" => (None, "did you mean `q_proj` for `q_prj`?"),
            "layers_pattern_no_match" => (Some("layers_pattern"), "finds no layer index"),
            "layers_to_transform_out_of_range" => (
                Some("layers_to_transform"),
                "no layer has index 100: the modules target_modules [\"query\"] matches are in \
                 layers 0, 1, 2",
            ),
            "error_all_excluded" => (Some("exclude_modules"), "removes every module"),
            "error_regex_with_layers_to_transform" => (Some("layers_to_transform"), "a string"),
            "error_layers_pattern_without_layers" => {
                (Some("layers_pattern"), "requires layers_to_transform")
            }
            other => panic!("{other}: add the expected error to this test"),
        };
        match (&err, field) {
            (PeftError::InvalidConfig { field: f, .. }, Some(want)) => {
                assert_eq!(f, want, "{name}: {msg}")
            }
            (PeftError::NoTargetMatch { .. }, None) => {}
            _ => panic!("{name}: unexpected error {err:?}"),
        }
        assert!(msg.contains(text), "{name}: {msg}");
        println!("{name}: {msg}");
    }
    assert!(seen >= 5);
}

#[test]
fn pattern_key_order_survives_a_save() {
    let fx = fixture();
    let case = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "rank_and_alpha_pattern_unsorted_overlapping")
        .unwrap();
    let (model, result) = run(case);
    result.unwrap();
    let Model::Llama(pm) = model else {
        panic!("a Llama case")
    };
    let dir = tempfile::tempdir().unwrap();
    pm.save_adapter(dir.path(), ADAPTER).unwrap();
    let text = fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let saved: Value = serde_json::from_str(&text).unwrap();
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    // The pattern maps keep the order they were given in (PEFT matches in that order) …
    assert_eq!(
        keys(&saved["rank_pattern"]),
        keys(&case["config"]["rank_pattern"])
    );
    assert_eq!(
        keys(&saved["alpha_pattern"]),
        keys(&case["config"]["alpha_pattern"])
    );
    // … and every other object is sorted, as PEFT writes the file.
    let top = keys(&saved);
    let mut sorted = top.clone();
    sorted.sort();
    assert_eq!(top, sorted);
    // Loading the file gives every layer the same rank and scaling again.
    let (cfg_json, _) = (llama::tiny_llama_json(false), ());
    let (mut again, _) = llama::tiny(&cfg_json, 7);
    again.load_adapter(dir.path(), ADAPTER).unwrap();
    let reloaded = Model::Llama(again).adapted().0;
    let original = Model::Llama(pm).adapted().0;
    assert_eq!(reloaded, original);
}

#[test]
fn config_errors_name_the_key_and_the_expected_type() {
    let err = |extra: Value| {
        let mut v = json!({"peft_type": "LORA", "target_modules": ["q_proj"], "r": 4});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        match AdapterConfig::from_json(&v) {
            Err(PeftError::InvalidConfig { field, reason }) => (field, reason),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    };
    assert_eq!(
        err(json!({"lora_alpha": "16"})),
        (
            "lora_alpha".into(),
            "expected a number, got string \"16\"".into()
        )
    );
    assert_eq!(
        err(json!({"target_modules": 5})),
        (
            "target_modules".into(),
            "expected a list of module names or a regex string, got integer 5".into()
        )
    );
    assert_eq!(
        err(json!({"target_modules": ["q_proj", 3]})),
        (
            "target_modules[1]".into(),
            "expected module names as strings, got integer 3".into()
        )
    );
    assert_eq!(
        err(json!({"layers_to_transform": "0"})),
        (
            "layers_to_transform".into(),
            "expected an integer or a list of integers, got string \"0\"".into()
        )
    );
    assert_eq!(
        err(json!({"r": -1})),
        (
            "r".into(),
            "expected a whole number >= 0, got integer -1".into()
        )
    );
    assert_eq!(
        err(json!({"rank_pattern": {"q_proj": "2"}})),
        (
            "rank_pattern.q_proj".into(),
            "expected a number, got string \"2\"".into()
        )
    );
}

/// The base folder of a tiny untied Llama (random weights) for the merge.
fn llama_base(dir: &Path) -> candle_peft::LlamaConfig {
    let json = llama::tiny_llama_json(false);
    let cfg = llama::config(&json);
    let weights = llama::random_weights(&cfg, 7);
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    fs::write(dir.join("config.json"), json.to_string()).unwrap();
    cfg
}

#[test]
fn merge_applies_the_same_targeting() {
    let fx = fixture();
    let case = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "layers_to_transform_int")
        .unwrap();
    let base = tempfile::tempdir().unwrap();
    let cfg = llama_base(base.path());
    let weights = llama::random_weights(&cfg, 7);
    let mut pm = llama::build(&cfg, &weights);
    pm.add_adapter(
        ADAPTER,
        AdapterConfig::from_json(&config_json(case)).unwrap(),
    )
    .unwrap();
    let adapter = tempfile::tempdir().unwrap();
    pm.save_adapter(adapter.path(), ADAPTER).unwrap();
    let out = tempfile::tempdir().unwrap();
    let report = merge_adapter_into_base(
        base.path(),
        adapter.path(),
        out.path(),
        MergeOptions::default(),
    )
    .unwrap();
    let want: Vec<&String> = case["result"]["modules"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    let mut merged: Vec<&String> = report.merged_modules.iter().collect();
    merged.sort();
    assert_eq!(merged, want);

    // The same file under a config that selects nothing, or something else, is refused.
    let config_path = adapter.path().join("adapter_config.json");
    let saved: Value = serde_json::from_str(&fs::read_to_string(&config_path).unwrap()).unwrap();
    let merge_with = |change: Value| {
        let mut v = saved.clone();
        for (k, x) in change.as_object().unwrap() {
            v[k] = x.clone();
        }
        fs::write(&config_path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
        let out = tempfile::tempdir().unwrap();
        merge_adapter_into_base(
            base.path(),
            adapter.path(),
            out.path(),
            MergeOptions::default(),
        )
        .expect_err("the merge must refuse this config")
    };
    let err = merge_with(json!({"target_modules": ["q_prj", "down_proj"]}));
    assert!(
        err.to_string()
            .contains("`model.layers.1.self_attn.q_proj`, which target_modules"),
        "{err}"
    );
    let err = merge_with(json!({"target_modules": ["q_prj"]}));
    assert!(matches!(err, PeftError::NoTargetMatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("did you mean `q_proj` for `q_prj`?"),
        "{err}"
    );
    let err = merge_with(json!({"layers_to_transform": [100]}));
    assert!(err.to_string().contains("no layer has index 100"), "{err}");
    assert!(
        matches!(&err, PeftError::InvalidConfig { field, .. } if field == "layers_to_transform")
    );
    let err = merge_with(json!({"layers_to_transform": [0, 1]}));
    assert!(matches!(err, PeftError::MissingTensor { .. }), "{err}");
    let err = merge_with(json!({"modules_to_save": ["nothing_here"]}));
    assert!(
        matches!(&err, PeftError::InvalidConfig { field, .. } if field == "modules_to_save"),
        "{err}"
    );
}
