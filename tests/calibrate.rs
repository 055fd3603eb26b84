//! The calibration pass: layers that see one tensor share one statistic fed once per batch,
//! only the rows of counted tokens reach it, a one-row-per-sequence input takes the sequences
//! with a counted token, adapters are off while it runs, observers go away with the calibrator
//! (also after an error), and a layer the forward never calls, or an input that does not match
//! the batch, is an error naming the layer. On all-MiniLM-L6-v2: q/k/v of a block form a group and
//! each batch gives exactly its non-padding tokens.
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_peft::adapters::lora::InitLoraWeights;
use candle_peft::data::load_tokenizer;
use candle_peft::data_init::{
    self as calibrate, CalibrationBatch, CalibrationOptions, Calibrator, InputGroup, RowStatistic,
};
use candle_peft::{BertModel, LayerHandle, LoraConfig, PeftBuilder, PeftLinear, PeftModel, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use common::max_abs_diff;

/// Keeps every batch of rows it is given (in a list the test also holds).
struct Recorder {
    seen: Arc<Mutex<Vec<Tensor>>>,
}

impl RowStatistic for Recorder {
    fn update(&mut self, rows: &Tensor) -> Result<()> {
        self.seen.lock().unwrap().push(rows.clone());
        Ok(())
    }
}

type Seen = Arc<Mutex<Vec<Tensor>>>;

/// A recorder per group, with the lists by leader name.
#[allow(clippy::type_complexity)]
fn recorders() -> (
    Arc<Mutex<HashMap<String, Seen>>>,
    impl FnMut(&InputGroup, &[LayerHandle]) -> Result<Recorder>,
) {
    let lists: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
    let by_name = lists.clone();
    let make = move |g: &InputGroup, layers: &[LayerHandle]| {
        let seen: Seen = Arc::default();
        by_name
            .lock()
            .unwrap()
            .insert(layers[g.leader].name(), seen.clone());
        Ok(Recorder { seen })
    };
    (lists, make)
}

fn randn(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(candle_peft::init::normal(rng, n, 1.0), shape, &Device::Cpu).unwrap()
}

/// `a` and `c` read the input, `b` reads `a`'s output, `p` reads the first position (`[B, d]`).
struct Toy {
    a: PeftLinear,
    b: PeftLinear,
    c: PeftLinear,
    p: PeftLinear,
}

impl Toy {
    fn forward(&self, x: &Tensor, with_pooler: bool) -> Result<Tensor> {
        let ya = self.a.forward_peft(x)?;
        let yc = self.c.forward_peft(x)?;
        let yb = self.b.forward_peft(&ya)?;
        let mut y = (yb + yc)?;
        if with_pooler {
            let first = y.narrow(1, 0, 1)?.squeeze(1)?;
            let pooled = self.p.forward_peft(&first)?.unsqueeze(1)?;
            y = y.broadcast_add(&pooled)?;
        }
        Ok(y)
    }
}

fn toy(d: usize) -> PeftModel<Toy> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut w = HashMap::new();
    for name in ["a", "b", "c", "p"] {
        w.insert(
            format!("{name}.weight"),
            (randn(&mut rng, &[d, d]) * 0.3).unwrap(),
        );
    }
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let b = PeftBuilder::new(vb);
    let model = Toy {
        a: b.linear(d, d, false, "a").unwrap(),
        b: b.linear(d, d, false, "b").unwrap(),
        c: b.linear(d, d, false, "c").unwrap(),
        p: b.linear(d, d, false, "p").unwrap(),
    };
    PeftModel::new(model, &b)
}

fn layers(model: &PeftModel<Toy>, names: &[&str]) -> Vec<LayerHandle> {
    names
        .iter()
        .map(|n| model.layer(n).unwrap().clone())
        .collect()
}

/// The rows of `x: [B, T, d]` where `mask: [B, T]` is non-zero, in order.
fn masked_rows(x: &Tensor, mask: &[u32]) -> Tensor {
    let (b, t, d) = x.dims3().unwrap();
    let idx: Vec<u32> = (0..b * t)
        .filter(|&i| mask[i] != 0)
        .map(|i| i as u32)
        .collect();
    let n = idx.len();
    x.reshape((b * t, d))
        .unwrap()
        .index_select(&Tensor::from_vec(idx, n, &Device::Cpu).unwrap(), 0)
        .unwrap()
}

#[test]
fn shared_inputs_one_statistic_and_only_counted_rows() {
    let d = 6;
    let model = toy(d);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let masks: Vec<Vec<u32>> = vec![
        vec![1, 1, 1, 0, 1, 1, 0, 0],
        vec![1, 0, 0, 0, 1, 1, 1, 1],
        vec![0, 0, 0, 0, 1, 0, 0, 0],
    ];
    let batches: Vec<CalibrationBatch> = masks
        .iter()
        .map(|m| {
            CalibrationBatch::new(
                randn(&mut rng, &[2, 4, d]),
                Tensor::from_vec(m.clone(), (2, 4), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let (lists, make) = recorders();
    let groups = calibrate::collect(
        layers(&model, &["a", "b", "c", "p"]),
        &batches,
        |b| model.model().forward(&b.input_ids, true).map(|_| ()),
        make,
        &CalibrationOptions { quiet: true },
        "test",
    )
    .unwrap();
    let summary: Vec<(Vec<usize>, usize)> = groups
        .iter()
        .map(|(g, _, rows)| (g.members.clone(), *rows))
        .collect();
    // a and c share one tensor: one group led by a; b and p alone. Rows: counted tokens, and for
    // the one-row-per-sequence input p, the sequences with a counted token (2 + 2 + 1).
    assert_eq!(summary, vec![(vec![0, 2], 11), (vec![1], 11), (vec![3], 5)]);
    let lists = lists.lock().unwrap();
    let a_rows = lists["a"].lock().unwrap();
    assert_eq!(
        a_rows.len(),
        3,
        "one update per batch for the group, not one per member"
    );
    for ((rows, batch), mask) in a_rows.iter().zip(&batches).zip(&masks) {
        let want = masked_rows(&batch.input_ids, mask);
        assert_eq!(max_abs_diff(rows, &want), 0.0);
    }
    let p_rows = lists["p"].lock().unwrap();
    assert_eq!(
        p_rows.iter().map(|t| t.dim(0).unwrap()).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    // The third batch's only counted token is in sequence 1: p sees that sequence's row.
    let y = model.model().a.forward_peft(&batches[2].input_ids).unwrap();
    let yb = model.model().b.forward_peft(&y).unwrap();
    let yc = model.model().c.forward_peft(&batches[2].input_ids).unwrap();
    let first = (yb + yc)
        .unwrap()
        .narrow(1, 0, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    assert_eq!(
        max_abs_diff(&p_rows[2], &first.narrow(0, 1, 1).unwrap()),
        0.0
    );
}

#[test]
fn adapters_are_off_during_calibration() {
    let d = 5;
    let mut model = toy(d);
    let mut config = LoraConfig::new(&["a"], 2, 4.0);
    config.init_lora_weights = InitLoraWeights::Bool(false);
    model.add_adapter("default", config).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = randn(&mut rng, &[1, 3, d]);
    let batch = CalibrationBatch::new(
        x.clone(),
        Tensor::ones((1, 3), DType::U32, &Device::Cpu).unwrap(),
    );
    let adapted_a = model.model().a.forward_peft(&x).unwrap();
    let (lists, make) = recorders();
    let b_layer = layers(&model, &["b"]);
    calibrate::with_base_model(&mut model, |m| {
        calibrate::collect(
            b_layer,
            std::slice::from_ref(&batch),
            |b| m.model().forward(&b.input_ids, false).map(|_| ()),
            make,
            &CalibrationOptions { quiet: true },
            "test",
        )
    })
    .unwrap();
    // b's input is the base output of a, not the adapted one; the adapter is back on after.
    model.disable().unwrap();
    let base_a = model.model().a.forward_peft(&x).unwrap();
    model.enable().unwrap();
    let seen = lists.lock().unwrap()["b"].lock().unwrap()[0].clone();
    assert_eq!(max_abs_diff(&seen, &base_a.squeeze(0).unwrap()), 0.0);
    assert!(max_abs_diff(&base_a, &adapted_a) > 1e-3);
    assert_eq!(
        max_abs_diff(&model.model().a.forward_peft(&x).unwrap(), &adapted_a),
        0.0
    );
}

#[test]
fn observers_are_removed_and_errors_name_the_layer() {
    let d = 4;
    let model = toy(d);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let batch = CalibrationBatch::new(
        randn(&mut rng, &[2, 3, d]),
        Tensor::ones((2, 3), DType::U32, &Device::Cpu).unwrap(),
    );
    let fwd = |b: &CalibrationBatch| model.model().forward(&b.input_ids, false).map(|_| ());

    // p is not called without the pooler.
    let (_, make) = recorders();
    let err = Calibrator::new(layers(&model, &["a", "p"]), &batch, fwd, make)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("module `p`:") && err.contains("never called"),
        "{err}"
    );

    // A statistic that fails aborts the forward with its own error.
    struct Failing;
    impl RowStatistic for Failing {
        fn update(&mut self, _: &Tensor) -> Result<()> {
            Err(candle_peft::PeftError::Unsupported(
                "failing statistic".into(),
            ))
        }
    }
    let calibrator =
        Calibrator::new(layers(&model, &["b"]), &batch, fwd, |_, _| Ok(Failing)).unwrap();
    let err = calibrator.run_batch(&batch, fwd).unwrap_err().to_string();
    assert_eq!(err, "failing statistic");

    // A layer input that does not match the batch's [B, T].
    let other = CalibrationBatch::new(
        batch.input_ids.clone(),
        Tensor::ones((2, 3), DType::U32, &Device::Cpu).unwrap(),
    );
    let (_, make) = recorders();
    let calibrator = Calibrator::new(layers(&model, &["b"]), &other, fwd, make).unwrap();
    let wrong = randn(&mut rng, &[5, 7, d]);
    let err = calibrator
        .run_batch(&other, |_| model.model().forward(&wrong, false).map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("module `b`:") && err.contains("[5, 7, 4]"),
        "{err}"
    );

    // Once the calibrator is gone, forwards no longer reach the statistics.
    let (lists, make) = recorders();
    let calibrator = Calibrator::new(layers(&model, &["a"]), &batch, fwd, make).unwrap();
    calibrator.run_batch(&batch, fwd).unwrap();
    drop(calibrator);
    fwd(&batch).unwrap();
    assert_eq!(lists.lock().unwrap()["a"].lock().unwrap().len(), 1);
}

#[test]
fn minilm_groups_and_token_rows() {
    let dir = common::minilm_dir();
    let (model, _) = BertModel::from_dir(&dir, &Device::Cpu).unwrap();
    let tok = load_tokenizer(dir.join("tokenizer.json"), 32).unwrap();
    let texts = [
        "a gripping , funny film",
        "it is not",
        "the plot goes nowhere and the actors seem to know it",
        "ok",
    ];
    let batches = calibrate::text_batches(&tok, &texts, 2, 10, 32, &Device::Cpu).unwrap();
    assert_eq!(batches.len(), 2);
    let tokens: usize = batches.iter().map(|b| b.usable_tokens().unwrap()).sum();
    let (targets, _) = calibrate::target_layers(
        &model,
        &candle_peft::Targeting::new(candle_peft::ModuleSelector::list(&[
            "query",
            "key",
            "value",
            "intermediate.dense",
        ])),
    )
    .unwrap();
    assert_eq!(targets.len(), 24);
    let (_, make) = recorders();
    let groups = calibrate::collect(
        targets,
        &batches,
        |b| {
            model
                .model()
                .forward(&b.input_ids, None, Some(&b.attention_mask))
                .map(|_| ())
        },
        make,
        &CalibrationOptions { quiet: true },
        "test",
    )
    .unwrap();
    assert_eq!(groups.len(), 12);
    for (g, _, rows) in &groups {
        assert_eq!(*rows, tokens);
        assert!(g.members.len() == 3 || g.members.len() == 1);
    }
    let mask_sum: f32 = batches
        .iter()
        .map(|b| {
            b.attention_mask
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert_eq!(tokens, mask_sum as usize);
}
