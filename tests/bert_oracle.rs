//! Our BERT (no adapters) against candle-transformers' `BertModel` on all-MiniLM-L6-v2.
mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_peft::models::bert::{BertConfig, BertModel, mean_pool};
use candle_transformers::models::bert as oracle;

fn inputs() -> (Tensor, Tensor) {
    let path = common::fixture("peft-lora-minilm").join("inputs.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    (t["input_ids"].clone(), t["attention_mask"].clone())
}

use common::max_abs_diff;

fn oracle_model(dir: &std::path::Path) -> oracle::BertModel {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg: oracle::Config = serde_json::from_str(&text).unwrap();
    let weights = dir.join("model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
        .unwrap();
    oracle::BertModel::load(vb, &cfg).unwrap()
}

/// candle-transformers builds the additive mask exactly as transformers does
/// (`(1 - mask) * f32::MIN`, broadcast over heads and query positions), and so do we, so every
/// position is compared, padded ones included: a padded query row still attends to the
/// unpadded keys in both models, so its output is defined and must agree too.
#[test]
fn matches_candle_transformers_with_padding() {
    let dir = common::minilm_dir();
    let (ids, mask) = inputs();
    assert_eq!(ids.dims(), &[3, 12]);
    assert_eq!(ids.dtype(), DType::I64);
    // The fixture has padding: otherwise this would not test the mask.
    let real: i64 = mask.sum_all().unwrap().to_scalar().unwrap();
    assert!(real < 36, "fixture inputs have no padding");

    let (peft, cfg) = BertModel::from_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(cfg.hidden_size, 384);
    assert_eq!(peft.model().prefix(), "");
    assert!(peft.model().pooler().is_some());
    // 6 layers × 6 linears + the pooler.
    assert_eq!(peft.layer_names().len(), 37);

    let ours = peft.model().forward(&ids, None, Some(&mask)).unwrap();
    let theirs = oracle_model(&dir)
        .forward(&ids, &ids.zeros_like().unwrap(), Some(&mask))
        .unwrap();
    assert_eq!(ours.dims(), &[3, 12, 384]);
    let d = max_abs_diff(&ours, &theirs);
    println!("max |ours - candle-transformers| with mask = {d:e}");
    assert!(d <= 1e-4, "max abs diff {d}");

    // Explicit zero token types are the same as the default.
    let with_tt = peft
        .model()
        .forward(&ids, Some(&ids.zeros_like().unwrap()), Some(&mask))
        .unwrap();
    assert_eq!(max_abs_diff(&ours, &with_tt), 0.0);
}

#[test]
fn matches_candle_transformers_without_mask() {
    let dir = common::minilm_dir();
    let (ids, _) = inputs();
    let ids = ids.to_dtype(DType::U32).unwrap();
    let (peft, _) = BertModel::from_dir(&dir, &Device::Cpu).unwrap();
    let ours = peft.model().forward(&ids, None, None).unwrap();
    let theirs = oracle_model(&dir)
        .forward(&ids, &ids.zeros_like().unwrap(), None)
        .unwrap();
    let d = max_abs_diff(&ours, &theirs);
    println!("max |ours - candle-transformers| no mask = {d:e}");
    assert!(d <= 1e-4, "max abs diff {d}");
}

/// The published sentence-transformers example: cosine 0.7553 between the two sentences.
#[test]
fn sentence_similarity() {
    let dir = common::minilm_dir();
    let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.with_padding(Some(tokenizers::PaddingParams::default()));
    let enc = tok
        .encode_batch(
            vec!["A man is eating food.", "A man is eating a piece of bread."],
            true,
        )
        .unwrap();
    let ids: Vec<Vec<u32>> = enc.iter().map(|e| e.get_ids().to_vec()).collect();
    let mask: Vec<Vec<u32>> = enc
        .iter()
        .map(|e| e.get_attention_mask().to_vec())
        .collect();
    let ids = Tensor::new(ids, &Device::Cpu).unwrap();
    let mask = Tensor::new(mask, &Device::Cpu).unwrap();
    let (peft, _) = BertModel::from_dir(&dir, &Device::Cpu).unwrap();
    let h = peft.model().forward(&ids, None, Some(&mask)).unwrap();
    let e = mean_pool(&h, Some(&mask)).unwrap();
    let e = e
        .broadcast_div(&e.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap())
        .unwrap();
    let v = e.to_vec2::<f32>().unwrap();
    let cos: f32 = v[0].iter().zip(&v[1]).map(|(a, b)| a * b).sum();
    println!("cosine = {cos}");
    assert!((cos - 0.7553).abs() < 5e-4, "cosine {cos}");
}

#[test]
fn config_parses_minilm() {
    let cfg = BertConfig::from_file(common::minilm_dir().join("config.json")).unwrap();
    assert_eq!(cfg.num_hidden_layers, 6);
    assert_eq!(cfg.num_attention_heads, 12);
    assert_eq!(cfg.intermediate_size, 1536);
    assert_eq!(cfg.layer_norm_eps, 1e-12);
    assert_eq!(cfg.head_dim(), 32);
}

/// A checkpoint saved from a task model has a `bert.` prefix: it loads, and layer names keep it.
#[test]
fn bert_prefix_is_detected() {
    let dir = common::minilm_dir();
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let prefixed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (format!("bert.{k}"), v))
        .collect();
    let cfg = BertConfig::from_file(dir.join("config.json")).unwrap();
    let vb = VarBuilder::from_tensors(prefixed, DType::F32, &Device::Cpu);
    let b = candle_peft::PeftBuilder::new(vb);
    let model = BertModel::load(&b, &cfg).unwrap();
    assert_eq!(model.prefix(), "bert");
    let peft = candle_peft::PeftModel::new(model, &b);
    assert_eq!(
        peft.layer_names()[0],
        "bert.encoder.layer.0.attention.self.query"
    );
    let (plain, _) = BertModel::from_dir(&dir, &Device::Cpu).unwrap();
    let (ids, mask) = inputs();
    let a = peft.model().forward(&ids, None, Some(&mask)).unwrap();
    let b = plain.model().forward(&ids, None, Some(&mask)).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// The self-attention (one fused op for its core) against the same attention written in plain
/// candle ops (two matmuls, the scaling, the mask and candle-nn's softmax), with padding: the
/// same context and the same input gradient.
#[test]
fn attention_core_matches_plain_candle_ops() {
    use candle_core::{D, Var};
    use candle_peft::models::bert::extended_attention_mask;
    let dir = common::minilm_dir();
    let (ids, mask) = inputs();
    let (peft, cfg) = BertModel::from_dir(&dir, &Device::Cpu).unwrap();
    let model = peft.model();
    let hidden = model.embeddings().forward(&ids, None).unwrap();
    let x = Var::from_tensor(&hidden).unwrap();
    let additive = extended_attention_mask(&mask, ids.dims(), DType::F32).unwrap();
    let (b, t) = ids.dims2().unwrap();
    let (heads, d) = (cfg.num_attention_heads, cfg.head_dim());
    let attention = &model.layers()[0].attention;
    let plain = |x: &Tensor| {
        let to_heads = |y: Tensor| {
            y.reshape((b, t, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let q = to_heads(attention.query.forward_peft(x).unwrap());
        let k = to_heads(attention.key.forward_peft(x).unwrap());
        let v = to_heads(attention.value.forward_peft(x).unwrap());
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let probs =
            candle_nn::ops::softmax(&scores.broadcast_add(&additive).unwrap(), D::Minus1).unwrap();
        probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, heads * d))
            .unwrap()
    };
    // A loss that weighs every output differently, so a swapped or misplaced gradient shows.
    let weights = Tensor::arange(0f32, (b * t * heads * d) as f32, &Device::Cpu)
        .unwrap()
        .reshape((b, t, heads * d))
        .unwrap()
        .affine(1e-3, -0.5)
        .unwrap()
        .sin()
        .unwrap();
    let run = |c: Tensor| {
        let loss = (&c * &weights).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        (c, g)
    };
    let (ours, ours_grad) = run(attention.forward(x.as_tensor(), Some(&additive)).unwrap());
    let (theirs, theirs_grad) = run(plain(x.as_tensor()));
    assert_eq!(ours.dims(), &[b, t, heads * d]);
    let scale = common::tensors::max_abs(&theirs);
    let dc = max_abs_diff(&ours, &theirs);
    assert!(
        dc <= 1e-5 * scale.max(1.0),
        "context differs by {dc} (max |c| {scale})"
    );
    let gscale = common::tensors::max_abs(&theirs_grad);
    let dg = max_abs_diff(&ours_grad, &theirs_grad);
    assert!(gscale > 0.0);
    assert!(dg <= 1e-5 * gscale, "dL/dx differs by {dg} (max {gscale})");
    println!("attention core vs plain ops: context {dc:e}, dL/dx {dg:e} (max {gscale:e})");

    // One mask for the whole batch broadcasts over its rows.
    let row = additive.narrow(0, 1, 1).unwrap();
    let one = attention.forward(x.as_tensor(), Some(&row)).unwrap();
    let each = attention
        .forward(x.as_tensor(), Some(&row.repeat((b, 1, 1, 1)).unwrap()))
        .unwrap();
    assert_eq!(max_abs_diff(&one, &each), 0.0);
    // A per-head mask is not a shape the model takes: an error naming it, not a wrong result.
    let per_head = additive.repeat((1, heads, 1, 1)).unwrap();
    let err = attention
        .forward(x.as_tensor(), Some(&per_head))
        .unwrap_err();
    assert!(err.to_string().contains("mask"), "{err}");
}
