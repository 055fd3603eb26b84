//! EVA and CorDA as task methods (`tasks::calibrated`): `add_eva_adapter` / `add_corda_adapter`
//! on MiniLM classification and SmolLM2 causal LM give, bit for bit, the adapter of the path the
//! CLI took before (the `data_init` drivers on batches built by hand, the config made for the
//! task by hand), with the same seed; the report counts what ran.
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use candle_peft::adapters::corda::{CordaConfig, CordaMethod};
use candle_peft::adapters::eva::EvaConfig;
use candle_peft::adapters::lora::InitLoraWeights;
use candle_peft::data::{pad_batch, pad_id, read_tsv};
use candle_peft::data_init::corda::CordaOptions;
use candle_peft::data_init::eva::EvaOptions;
use candle_peft::data_init::{self, CalibrationBatch, CalibrationOptions, text_batches};
use candle_peft::io::source;
use candle_peft::tasks::calibrated::{CordaInitOptions, EvaInitOptions};
use candle_peft::tasks::causal_lm::{CausalLmTask, LmExample};
use candle_peft::tasks::classify::{ClassifyTask, for_classification};
use candle_peft::{AdapterConfig, DEFAULT_ADAPTER, LoraConfig, PeftModel};

use common::tensors::bits;

const SEED: u64 = 11;

fn quiet() -> CalibrationOptions {
    CalibrationOptions { quiet: true }
}

/// Every trainable var of the model, by name, as bits.
fn trainables<M>(model: &PeftModel<M>) -> BTreeMap<String, (Vec<usize>, Vec<u32>)> {
    model
        .trainable_vars()
        .into_iter()
        .map(|(n, v)| (n, (v.dims().to_vec(), bits(v.as_tensor()))))
        .collect()
}

/// The adapter files of `name` (config JSON and tensors) as written.
fn saved<M>(model: &PeftModel<M>) -> (serde_json::Value, BTreeMap<String, Vec<u32>>) {
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path(), DEFAULT_ADAPTER).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let tensors = candle_peft::io::peft_format::read_safetensors(
        &dir.path().join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(k, t)| (k, bits(&t)))
    .collect();
    (config, tensors)
}

fn assert_same<M>(new: &PeftModel<M>, old: &PeftModel<M>) {
    let (a, b) = (trainables(new), trainables(old));
    assert!(!a.is_empty());
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "trainable names"
    );
    for (name, value) in &a {
        assert!(value == &b[name], "{name} differs");
    }
    assert_eq!(saved(new), saved(old), "the saved adapter");
}

// ---------------------------------------------------------------------------------------------
// MiniLM classification

fn sst2_texts(n: usize) -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sst2/train.tsv");
    read_tsv(&path)
        .unwrap()
        .examples
        .into_iter()
        .take(n)
        .map(|e| e.text)
        .collect()
}

fn minilm_task() -> ClassifyTask {
    let src = source::resolve_local(&common::minilm_dir()).unwrap();
    let labels = vec!["0".to_string(), "1".to_string()];
    let opts = candle_peft::tasks::TaskOptions {
        seq_len: 48,
        seed: SEED,
        ..Default::default()
    };
    ClassifyTask::from_source(src, labels, opts).unwrap()
}

/// The batches the CLI built for classification: `text_batches` with the task's tokenizer.
fn classify_batches(
    task: &ClassifyTask,
    texts: &[String],
    batch: usize,
    n: usize,
) -> Vec<CalibrationBatch> {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    text_batches(
        task.tokenizer(),
        &refs,
        batch,
        n,
        task.max_len(),
        task.device(),
    )
    .unwrap()
}

fn bert_forward(
    m: &candle_peft::models::heads::BertForSequenceClassification,
    b: &CalibrationBatch,
) -> candle_peft::Result<()> {
    m.forward(&b.input_ids, &b.attention_mask).map(|_| ())
}

#[test]
fn classify_eva_and_corda_methods_equal_the_driver_path() {
    let texts = sst2_texts(40);
    let (batch, n) = (8, 4);

    // EVA: r = 4 on query/value, ρ = 2, τ = 0.9.
    let eva = EvaConfig {
        tau: 0.9,
        ..EvaConfig::default()
    };
    let lora = LoraConfig::new(&["query", "value"], 4, 8.0);
    let options = EvaInitOptions {
        batch_size: batch,
        max_batches: n,
        eva_config: Some(eva.clone()),
        pass: EvaOptions {
            max_iterations: Some(200),
            calibration: quiet(),
            ..EvaOptions::default()
        },
    };
    let mut new = minilm_task();
    let report = new
        .add_eva_adapter(DEFAULT_ADAPTER, lora.clone(), &texts, &options)
        .unwrap();

    let mut old = minilm_task();
    let AdapterConfig::Lora(mut c) = for_classification(lora) else {
        unreachable!()
    };
    c.init_lora_weights = InitLoraWeights::Named("eva".into());
    c.eva_config = Some(eva);
    let batches = classify_batches(&old, &texts, batch, n);
    let state = data_init::eva::add_eva_adapter(
        old.model_mut(),
        DEFAULT_ADAPTER,
        c,
        &batches,
        bert_forward,
        &options.pass,
    )
    .unwrap();
    assert_same(new.model(), old.model());

    assert_eq!(report.ranks, state.state.ranks());
    assert_eq!(report.ranks.len(), 12);
    assert_eq!(report.ranks.values().sum::<usize>(), 12 * 4, "the budget");
    assert_eq!(report.batches, n);
    let tokens: usize = batches.iter().map(|b| b.usable_tokens().unwrap()).sum();
    assert_eq!(report.tokens, tokens);
    assert_eq!(report.forward_passes, state.state.iterations);
    assert_eq!(
        report.shared_inputs.len(),
        6,
        "query and value of each block"
    );
    match &report.config {
        AdapterConfig::Lora(c) => {
            assert_eq!(
                c.targeting.modules_to_save,
                Some(vec!["classifier".to_string()])
            );
            assert_eq!(c.init_lora_weights, InitLoraWeights::Named("eva".into()));
        }
        other => panic!("{other:?}"),
    }

    // CorDA: r = 4 on query/value, KPM through the options.
    let corda = CordaConfig::new(&["query", "value"], 4, 8.0);
    let options = CordaInitOptions {
        batch_size: batch,
        max_batches: n,
        corda_method: Some(CordaMethod::Kpm),
        pass: CordaOptions {
            calibration: quiet(),
        },
    };
    let mut new = minilm_task();
    let report = new
        .add_corda_adapter(DEFAULT_ADAPTER, corda.clone(), &texts, &options)
        .unwrap();
    let mut old = minilm_task();
    let AdapterConfig::Corda(mut c) = for_classification(corda) else {
        unreachable!()
    };
    c.corda_method = CordaMethod::Kpm;
    let batches = classify_batches(&old, &texts, batch, n);
    data_init::corda::add_corda_adapter(
        old.model_mut(),
        DEFAULT_ADAPTER,
        c,
        &batches,
        bert_forward,
        &options.pass,
    )
    .unwrap();
    assert_same(new.model(), old.model());
    assert_eq!(report.ranks.len(), 12);
    assert!(report.ranks.values().all(|&r| r == 4));
    assert_eq!(report.forward_passes, n);
    assert_eq!(saved(new.model()).0["corda_config"]["corda_method"], "kpm");
}

// ---------------------------------------------------------------------------------------------
// SmolLM2 causal LM

fn smollm2_task() -> CausalLmTask {
    let src = source::resolve(common::smollm2_gguf().to_str().unwrap()).unwrap();
    let opts = candle_peft::tasks::TaskOptions {
        seq_len: 32,
        seed: SEED,
        ..Default::default()
    };
    CausalLmTask::from_source(src, opts).unwrap()
}

/// The batches the CLI built for causal LM: right-padded with the tokenizer's pad id; with
/// `label_mask`, only positions from `loss_from` on count.
fn lm_batches(
    task: &CausalLmTask,
    examples: &[LmExample],
    batch: usize,
    n: usize,
    label_mask: bool,
) -> Vec<CalibrationBatch> {
    let pad = pad_id(task.tokenizer());
    examples
        .chunks(batch)
        .take(n)
        .map(|chunk| {
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|e| e.ids.clone()).collect();
            let b = pad_batch(&seqs, pad, &Device::Cpu).unwrap();
            let calib = CalibrationBatch::new(b.input_ids, b.attention_mask);
            if !label_mask {
                return calib;
            }
            let t = seqs.iter().map(Vec::len).max().unwrap();
            let mut mask = vec![0u32; chunk.len() * t];
            for (i, e) in chunk.iter().enumerate() {
                for pos in e.loss_from..e.ids.len() {
                    mask[i * t + pos] = 1;
                }
            }
            calib.with_token_mask(Tensor::from_vec(mask, (chunk.len(), t), &Device::Cpu).unwrap())
        })
        .collect()
}

fn llama_forward(
    m: &candle_peft::models::llama::LlamaForCausalLM,
    b: &CalibrationBatch,
) -> candle_peft::Result<()> {
    m.forward_hidden(&b.input_ids, Some(&b.attention_mask))
        .map(|_| ())
}

#[test]
fn causal_lm_eva_and_corda_methods_equal_the_driver_path() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare/train.txt"),
    )
    .unwrap();
    // Two texts (packed separately), cut to keep the pass short.
    let texts = [&text[..2000], &text[2000..4000]];
    let targets = [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.2.mlp.down_proj",
    ];
    let (batch, n) = (2, 3);
    let probe = smollm2_task();
    let examples: Vec<LmExample> = texts
        .iter()
        .flat_map(|t| probe.text_examples(t, true).unwrap())
        .collect();
    drop(probe);

    // EVA through the texts, against the driver on the CLI's batches.
    let eva = EvaConfig {
        tau: 0.5,
        ..EvaConfig::default()
    };
    let lora = LoraConfig::new(&targets, 4, 8.0);
    let options = EvaInitOptions {
        batch_size: batch,
        max_batches: n,
        eva_config: Some(eva.clone()),
        pass: EvaOptions {
            max_iterations: Some(60),
            calibration: quiet(),
            ..EvaOptions::default()
        },
    };
    let mut new = smollm2_task();
    let report = new
        .add_eva_adapter(DEFAULT_ADAPTER, lora.clone(), &texts, &options)
        .unwrap();
    let mut old = smollm2_task();
    let mut c = lora;
    c.common.task_type = Some("CAUSAL_LM".into());
    c.init_lora_weights = InitLoraWeights::Named("eva".into());
    c.eva_config = Some(eva);
    let batches = lm_batches(&old, &examples, batch, n, true);
    data_init::eva::add_eva_adapter(
        old.model_mut(),
        DEFAULT_ADAPTER,
        c,
        &batches,
        llama_forward,
        &options.pass,
    )
    .unwrap();
    assert_same(new.model(), old.model());
    assert_eq!(report.batches, n);
    assert_eq!(report.tokens, batch * n * 32, "full sequences of 32 tokens");
    assert_eq!(report.ranks.values().sum::<usize>(), 3 * 4, "the budget");
    let shared: Vec<String> = targets[..2].iter().map(|t| t.to_string()).collect();
    assert_eq!(report.shared_inputs, vec![shared]);
    assert_eq!(saved(new.model()).0["task_type"], "CAUSAL_LM");

    // CorDA from examples with a masked prompt: every token counts all the same.
    let examples: Vec<LmExample> = examples
        .into_iter()
        .map(|e| LmExample { loss_from: 5, ..e })
        .collect();
    let corda = CordaConfig::new(&targets, 4, 8.0);
    let options = CordaInitOptions {
        batch_size: batch,
        max_batches: n,
        corda_method: None,
        pass: CordaOptions {
            calibration: quiet(),
        },
    };
    let mut new = smollm2_task();
    let report = new
        .add_corda_adapter_from_examples(DEFAULT_ADAPTER, corda.clone(), &examples, &options)
        .unwrap();
    let mut old = smollm2_task();
    let mut c = corda;
    c.common.task_type = Some("CAUSAL_LM".into());
    let batches = lm_batches(&old, &examples, batch, n, false);
    data_init::corda::add_corda_adapter(
        old.model_mut(),
        DEFAULT_ADAPTER,
        c,
        &batches,
        llama_forward,
        &options.pass,
    )
    .unwrap();
    assert_same(new.model(), old.model());
    assert_eq!(report.tokens, batch * n * 32);
    assert_eq!(
        report.ranks,
        targets.iter().map(|t| (t.to_string(), 4)).collect()
    );
}
