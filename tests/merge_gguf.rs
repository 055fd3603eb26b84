//! Merging an adapter into a GGUF base (`merge_adapter_into_gguf`, `merge --to gguf`): a tiny
//! llama GGUF of mixed types written here, merged with a LoRA adapter on q/v/up; the output is
//! accepted by candle's reader and our loader, is byte-identical outside the adapted tensors,
//! and each adapted tensor is exactly the re-quantised `W + ΔW` (ΔW in llama.cpp's q/k row
//! order), within its type's quantisation error. Then the CLI on SmolLM2's Q4_1 file, and bad
//! inputs.
mod common;

use std::collections::HashMap;
use std::fs;
use std::io::BufReader;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_peft::io::export::{
    GgufMergeReport, MergeOptions, ggml_type_name, merge_adapter_into_base, merge_adapter_into_gguf,
};
use candle_peft::io::gguf::{GgufModel, hf_tensor_name, permute_qk, unpermute_qk};
use candle_peft::io::peft_format::write_adapter_dir;
use candle_peft::{AdapterConfig, PeftError};
use common::tensors::{bits, flat};
use common::{bin, run_err, run_ok};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const HIDDEN: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 512;
const VOCAB: usize = 32;
const RANK: usize = 4;
const ALPHA: f64 = 8.0;

/// The tiny model's tensors: GGUF name, shape `[out, in]`, type. Every adapted tensor
/// (q_proj, v_proj, up_proj) has its own type, so each of the six is merged once.
fn layout() -> Vec<(String, Vec<usize>, GgmlDType)> {
    use GgmlDType::*;
    let mut t = vec![
        ("token_embd.weight".to_string(), vec![VOCAB, HIDDEN], Q8_0),
        ("output_norm.weight".to_string(), vec![HIDDEN], F32),
        ("output.weight".to_string(), vec![VOCAB, HIDDEN], Q4_0),
    ];
    let kv = KV_HEADS * HEAD_DIM;
    let per_layer = [
        // (q, k, v, o, gate, up, down)
        [Q8_0, Q4_0, Q4_1, Q5_0, Q4K, Q6K, Q4K],
        [Q4K, Q8_0, Q5_0, Q4_1, Q5_0, Q4_0, Q6K],
    ];
    for (l, types) in per_layer.iter().enumerate() {
        let parts = [
            ("attn_q", vec![HIDDEN, HIDDEN]),
            ("attn_k", vec![kv, HIDDEN]),
            ("attn_v", vec![kv, HIDDEN]),
            ("attn_output", vec![HIDDEN, HIDDEN]),
            ("ffn_gate", vec![FFN, HIDDEN]),
            ("ffn_up", vec![FFN, HIDDEN]),
            ("ffn_down", vec![HIDDEN, FFN]),
        ];
        for ((part, shape), ty) in parts.into_iter().zip(types) {
            t.push((format!("blk.{l}.{part}.weight"), shape, *ty));
        }
        t.push((format!("blk.{l}.attn_norm.weight"), vec![HIDDEN], F32));
        t.push((format!("blk.{l}.ffn_norm.weight"), vec![HIDDEN], F32));
    }
    t
}

fn metadata() -> Vec<(String, Value)> {
    let u = |v: usize| Value::U32(v as u32);
    let tokens = (0..VOCAB).map(|i| Value::String(format!("t{i}"))).collect();
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String("tiny merge test".into()),
        ),
        ("llama.block_count".into(), u(2)),
        ("llama.embedding_length".into(), u(HIDDEN)),
        ("llama.feed_forward_length".into(), u(FFN)),
        ("llama.attention.head_count".into(), u(HEADS)),
        ("llama.attention.head_count_kv".into(), u(KV_HEADS)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.context_length".into(), u(128)),
        ("llama.vocab_size".into(), u(VOCAB)),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
    ]
}

fn random(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    common::tensors::random(rng, shape, scale)
}

/// Writes the tiny llama GGUF (weights uniform in ±0.1, norms near 1).
fn write_tiny_gguf(path: &Path) {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let tensors: Vec<(String, QTensor)> = layout()
        .into_iter()
        .map(|(name, shape, ty)| {
            let w = if shape.len() == 1 {
                (random(&mut rng, &shape, 0.1) + 1.0).unwrap()
            } else {
                random(&mut rng, &shape, 0.1)
            };
            (name, QTensor::quantize(&w, ty).unwrap())
        })
        .collect();
    let meta = metadata();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

/// A matrix of multiples of 1/64 in [-1/4, 1/4]: products and sums of a few of them are exact
/// in f32, so ΔW = s·B·A is the same whatever order an implementation multiplies in.
fn dyadic(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-16i32..=16) as f32 / 64.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A LoRA adapter (r = 4, α = 8) on every q_proj, v_proj and up_proj of the tiny model, with
/// nonzero A and B. Returns ΔW = (α/r)·B·A per module, in Hugging Face row order.
fn write_lora(dir: &Path, modules: &[(String, usize, usize)]) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut tensors = Vec::new();
    let mut deltas = HashMap::new();
    for (module, out, inp) in modules {
        let a = dyadic(&mut rng, &[RANK, *inp]);
        let b = dyadic(&mut rng, &[*out, RANK]);
        let delta = (b.matmul(&a).unwrap() * (ALPHA / RANK as f64)).unwrap();
        tensors.push((format!("base_model.model.{module}.lora_A.weight"), a));
        tensors.push((format!("base_model.model.{module}.lora_B.weight"), b));
        deltas.insert(module.clone(), delta);
    }
    let targets: Vec<&str> = ["q_proj", "v_proj", "up_proj"].to_vec();
    let cfg = AdapterConfig::from(candle_peft::LoraConfig::new(&targets, RANK, ALPHA));
    write_adapter_dir(dir, &cfg, &tensors).unwrap();
    deltas
}

fn tiny_modules() -> Vec<(String, usize, usize)> {
    let mut m = Vec::new();
    for l in 0..2 {
        m.push((format!("model.layers.{l}.self_attn.q_proj"), HIDDEN, HIDDEN));
        m.push((
            format!("model.layers.{l}.self_attn.v_proj"),
            KV_HEADS * HEAD_DIM,
            HIDDEN,
        ));
        m.push((format!("model.layers.{l}.mlp.up_proj"), FFN, HIDDEN));
    }
    m
}

struct Gguf {
    bytes: Vec<u8>,
    content: Content,
}

impl Gguf {
    fn read(path: &Path) -> Self {
        let bytes = fs::read(path).unwrap();
        let content = Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        Self { bytes, content }
    }

    fn range(&self, name: &str) -> Range<usize> {
        let info = &self.content.tensor_infos[name];
        let ty = info.ggml_dtype;
        let len = info.shape.elem_count() / ty.block_size() * ty.type_size();
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        start..start + len
    }

    fn tensor(&self, name: &str) -> QTensor {
        self.content
            .tensor(&mut std::io::Cursor::new(&self.bytes), name, &Device::Cpu)
            .unwrap()
    }

    fn dequantized(&self, name: &str) -> Tensor {
        self.tensor(name).dequantize(&Device::Cpu).unwrap()
    }
}

/// The GGUF name of a Hugging Face module of the tiny model.
fn gguf_of(module: &str) -> String {
    let rest = module.strip_prefix("model.layers.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let part = match part {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "mlp.up_proj" => "ffn_up",
        other => panic!("unexpected module {other}"),
    };
    let name = format!("blk.{layer}.{part}.weight");
    assert_eq!(
        hf_tensor_name(&name).as_deref(),
        Some(format!("{module}.weight").as_str())
    );
    name
}

/// ΔW in the GGUF file's row order: llama.cpp's permutation for q (query heads) and k (kv heads).
fn gguf_order(module: &str, delta: &Tensor) -> Tensor {
    if module.ends_with("q_proj") {
        permute_qk(delta, HEADS).unwrap()
    } else if module.ends_with("k_proj") {
        permute_qk(delta, KV_HEADS).unwrap()
    } else {
        delta.clone()
    }
}

/// `rms(a − b) / rms(b)`.
fn rel_rms(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den).sqrt()
}

/// The relative RMS error a re-quantisation of these weights stays under, per type: 1.5–2×
/// what this seeded test measures (Q8_0 0.50%, Q6_K 1.75%, Q5_0 4.0%, Q4_K 7.1%, Q4_1 7.5%,
/// Q4_0 8.1%), which is round-to-nearest's step/√12 over the weights' spread.
fn bound(ty: GgmlDType) -> f64 {
    match ty {
        GgmlDType::Q8_0 => 0.01,
        GgmlDType::Q6K => 0.03,
        GgmlDType::Q5_0 => 0.06,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => 0.12,
        other => panic!("no bound for {other:?}"),
    }
}

struct Tiny {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    adapter: PathBuf,
    out: PathBuf,
    deltas: HashMap<String, Tensor>,
    report: GgufMergeReport,
}

fn merged_tiny() -> Tiny {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&base);
    let adapter = tmp.path().join("adapter");
    let deltas = write_lora(&adapter, &tiny_modules());
    let out = tmp.path().join("out/merged.gguf");
    let report = merge_adapter_into_gguf(&base, &adapter, &out).unwrap();
    Tiny {
        _tmp: tmp,
        base,
        adapter,
        out,
        deltas,
        report,
    }
}

#[test]
fn output_is_a_gguf_our_loader_reads() {
    let t = merged_tiny();
    let model = GgufModel::open(&t.out).unwrap();
    assert_eq!(model.architecture(), "llama");
    let tensors = model.hf_tensors(DType::F32, &Device::Cpu).unwrap();
    assert_eq!(tensors.len(), layout().len());
    let content = Gguf::read(&t.out).content;
    assert_eq!(content.tensor_infos.len(), layout().len());
    for (name, shape, ty) in layout() {
        let info = &content.tensor_infos[&name];
        assert_eq!(info.ggml_dtype, ty, "{name}");
        assert_eq!(info.shape.dims(), shape.as_slice(), "{name}");
    }
    assert!(!t.out.with_file_name(".merged.gguf.tmp").exists());
}

#[test]
fn everything_but_the_adapted_tensors_is_byte_identical() {
    let t = merged_tiny();
    let (src, out) = (Gguf::read(&t.base), Gguf::read(&t.out));
    assert_eq!(src.bytes.len(), out.bytes.len());
    assert_eq!(
        src.content.tensor_data_offset,
        out.content.tensor_data_offset
    );
    let header = src.content.tensor_data_offset as usize;
    assert_eq!(src.bytes[..header], out.bytes[..header], "header differs");

    let adapted: Vec<Range<usize>> = tiny_modules()
        .iter()
        .map(|(m, _, _)| src.range(&gguf_of(m)))
        .collect();
    for r in &adapted {
        assert_ne!(
            src.bytes[r.clone()],
            out.bytes[r.clone()],
            "{r:?} unchanged"
        );
    }
    // Every byte outside the adapted tensors' ranges (other tensors, padding) is the source's.
    let mut mask = vec![false; src.bytes.len()];
    for r in &adapted {
        mask[r.clone()].iter_mut().for_each(|m| *m = true);
    }
    let differing = (0..src.bytes.len())
        .filter(|&i| !mask[i] && src.bytes[i] != out.bytes[i])
        .count();
    assert_eq!(differing, 0);
    for (name, _, _) in layout() {
        if adapted.contains(&src.range(&name)) {
            continue;
        }
        assert_eq!(
            src.bytes[src.range(&name)],
            out.bytes[out.range(&name)],
            "{name}"
        );
    }
}

#[test]
fn adapted_tensors_are_the_requantised_merge() {
    let t = merged_tiny();
    let (src, out) = (Gguf::read(&t.base), Gguf::read(&t.out));
    assert_eq!(t.report.merged.len(), 6);
    assert_eq!(t.report.num_tensors, layout().len());
    assert_eq!(t.report.file_bytes, src.bytes.len() as u64);
    let mut types = Vec::new();
    for (module, _, _) in tiny_modules() {
        let name = gguf_of(&module);
        let ty = src.content.tensor_infos[&name].ggml_dtype;
        let got = out.tensor(&name);
        assert_eq!(got.dtype(), ty, "{name} changed type");
        let target = (src.dequantized(&name) + gguf_order(&module, &t.deltas[&module])).unwrap();
        let expected = QTensor::quantize(&target, ty).unwrap();
        let got = got.dequantize(&Device::Cpu).unwrap();
        assert_eq!(
            bits(&got),
            bits(&expected.dequantize(&Device::Cpu).unwrap()),
            "{name}"
        );
        let err = rel_rms(&got, &target);
        assert!(err < bound(ty), "{name} ({ty:?}): relative RMS error {err}");
        // ΔW is large against that error, so the merge is seen.
        let moved = rel_rms(&src.dequantized(&name), &target);
        assert!(moved > 0.3, "{name}: ΔW moved the weights by only {moved}");

        let r = t.report.merged.iter().find(|r| r.tensor == name).unwrap();
        assert_eq!(r.module, module);
        assert_eq!(r.ggml_type, ty);
        assert_eq!(r.bytes as usize, src.range(&name).len());
        assert!(
            (f64::from(r.rel_rms_error) - err).abs() < 1e-5 * err.max(1e-3),
            "{r:?} vs {err}"
        );
        let diff = flat(&(got - &target).unwrap());
        let max = diff.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!((r.max_abs_error - max).abs() <= 1e-7, "{r:?} vs {max}");
        types.push(ggml_type_name(ty));
    }
    types.sort_unstable();
    assert_eq!(types, ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]);
}

#[test]
fn q_proj_delta_round_trips_through_the_permutation() {
    let t = merged_tiny();
    let base = GgufModel::open(&t.base)
        .unwrap()
        .hf_tensors(DType::F32, &Device::Cpu)
        .unwrap();
    let merged = GgufModel::open(&t.out)
        .unwrap()
        .hf_tensors(DType::F32, &Device::Cpu)
        .unwrap();
    // Layer 0's q_proj is Q8_0: its quantisation error is far below the size of ΔW.
    let q = "model.layers.0.self_attn.q_proj";
    let delta = &t.deltas[q];
    let key = format!("{q}.weight");
    let expected = (&base[&key] + delta).unwrap();
    let err = rel_rms(&merged[&key], &expected);
    assert!(err < 0.01, "q_proj: {err}");
    // ΔW added in the wrong row order would show up as an error of the size of ΔW.
    let unpermuted = (&base[&key] + unpermute_qk(delta, HEADS).unwrap()).unwrap();
    let wrong = rel_rms(&merged[&key], &unpermuted);
    assert!(wrong > 20.0 * err, "wrong order {wrong} vs {err}");
    // Layer 1's q_proj (Q4_K) too, within its bound.
    let q1 = "model.layers.1.self_attn.q_proj.weight";
    let d1 = &t.deltas["model.layers.1.self_attn.q_proj"];
    let err1 = rel_rms(&merged[q1], &(&base[q1] + d1).unwrap());
    assert!(err1 < bound(GgmlDType::Q4K), "{err1}");
    // v_proj is not permuted; k_proj is not adapted and reads back bit for bit.
    let v = "model.layers.0.self_attn.v_proj.weight";
    let dv = &t.deltas["model.layers.0.self_attn.v_proj"];
    let errv = rel_rms(&merged[v], &(&base[v] + dv).unwrap());
    assert!(errv < bound(GgmlDType::Q4_1), "{errv}");
    let k = "model.layers.0.self_attn.k_proj.weight";
    assert_eq!(bits(&merged[k]), bits(&base[k]));
}

#[test]
fn module_missing_from_the_gguf_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&base);
    let adapter = tmp.path().join("adapter");
    let module = "model.layers.0.self_attn.nonexistent";
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let cfg = AdapterConfig::from(candle_peft::LoraConfig::new(&["nonexistent"], 2, 4.0));
    write_adapter_dir(
        &adapter,
        &cfg,
        &[
            (
                format!("base_model.model.{module}.lora_A.weight"),
                dyadic(&mut rng, &[2, HIDDEN]),
            ),
            (
                format!("base_model.model.{module}.lora_B.weight"),
                dyadic(&mut rng, &[HIDDEN, 2]),
            ),
        ],
    )
    .unwrap();
    let out = tmp.path().join("merged.gguf");
    let err = merge_adapter_into_gguf(&base, &adapter, &out).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PeftError::InvalidLayer { .. }), "{err:?}");
    assert!(msg.contains(module), "{msg}");
    assert!(
        msg.contains("model.layers.0.self_attn.q_proj.weight"),
        "nearby names missing: {msg}"
    );
    assert!(!out.exists());
    assert!(!tmp.path().join(".merged.gguf.tmp").exists());
    let stderr = run_err(
        bin()
            .args(["merge", "--to", "gguf", "--base"])
            .arg(&base)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&out),
    );
    assert!(stderr.contains(module), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn bad_bases_and_flags_are_clear_errors() {
    let t = merged_tiny();
    let dir = t.out.parent().unwrap();
    let out = dir.join("again.gguf");
    let cmd = |base: &Path, extra: &[&str]| {
        let mut c = bin();
        c.arg("merge")
            .arg("--base")
            .arg(base)
            .arg("--adapter")
            .arg(&t.adapter)
            .arg("--out")
            .arg(&out)
            .args(extra);
        c
    };
    // A Hugging Face folder, and a file that is not GGUF.
    let stderr = run_err(&mut cmd(&common::minilm_dir(), &["--to", "gguf"]));
    assert!(stderr.contains("--to gguf needs a .gguf file"), "{stderr}");
    let st = common::minilm_dir().join("model.safetensors");
    let stderr = run_err(&mut cmd(&st, &["--to", "gguf"]));
    assert!(stderr.contains("not a GGUF file"), "{stderr}");
    let err = merge_adapter_into_gguf(&st, &t.adapter, &out).unwrap_err();
    assert!(err.to_string().contains("not a valid GGUF file"), "{err}");
    let err = merge_adapter_into_gguf(&common::minilm_dir(), &t.adapter, &out).unwrap_err();
    assert!(err.to_string().contains("is a folder"), "{err}");
    // Flags of the folder output.
    let stderr = run_err(&mut cmd(&t.base, &["--to", "gguf", "--dtype", "f16"]));
    assert!(stderr.contains("--dtype"), "{stderr}");
    let stderr = run_err(&mut cmd(
        &t.base,
        &["--to", "gguf", "--max-shard-size", "1GB"],
    ));
    assert!(stderr.contains("--max-shard-size"), "{stderr}");
    // A GGUF base without --to gguf.
    let stderr = run_err(&mut cmd(&t.base, &[]));
    assert!(stderr.contains("--to gguf"), "{stderr}");
    assert!(!out.exists());
    // The base itself as the output.
    let err = merge_adapter_into_gguf(&t.base, &t.adapter, &t.base).unwrap_err();
    assert!(err.to_string().contains("is the base GGUF file"), "{err}");
    let err = merge_adapter_into_gguf(&t.base, &t.adapter, dir).unwrap_err();
    assert!(err.to_string().contains("is a folder"), "{err}");
    // The folder merge still refuses a GGUF base with its own error.
    assert!(
        merge_adapter_into_base(
            &t.base,
            &t.adapter,
            &dir.join("hf"),
            MergeOptions::default()
        )
        .is_err()
    );
}

/// SmolLM2's Q4_1 file through the binary: a LoRA adapter with random nonzero A and B on
/// layers 0 and 1's q_proj and v_proj, merged to GGUF, then read back with the library.
#[test]
fn binary_merges_smollm2_to_gguf() {
    let base = common::smollm2_gguf();
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    let (hidden, heads, kv) = (576, 9, 192);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut tensors = Vec::new();
    let mut deltas = HashMap::new();
    for l in 0..2 {
        for (proj, out) in [("q_proj", hidden), ("v_proj", kv)] {
            let module = format!("model.layers.{l}.self_attn.{proj}");
            let a = random(&mut rng, &[RANK, hidden], 0.3);
            let b = random(&mut rng, &[out, RANK], 0.3);
            let delta = (b.matmul(&a).unwrap() * (ALPHA / RANK as f64)).unwrap();
            tensors.push((format!("base_model.model.{module}.lora_A.weight"), a));
            tensors.push((format!("base_model.model.{module}.lora_B.weight"), b));
            deltas.insert(format!("{module}.weight"), delta);
        }
    }
    let cfg = AdapterConfig::from_json(&serde_json::json!({
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": ["q_proj", "v_proj"],
        "layers_to_transform": [0, 1],
    }))
    .unwrap();
    write_adapter_dir(&adapter, &cfg, &tensors).unwrap();
    let out = tmp.path().join("merged.gguf");
    let output = run_ok(
        bin()
            .args(["merge", "--to", "gguf", "--json", "--base"])
            .arg(&base)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&out),
    );
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(line["merged_modules"], 4, "{line}");
    let src = Content::read(&mut BufReader::new(fs::File::open(&base).unwrap())).unwrap();
    for m in line["merged"].as_array().unwrap() {
        let name = m["tensor"].as_str().unwrap();
        let ty = src.tensor_infos[name].ggml_dtype;
        assert_eq!(m["type"], ggml_type_name(ty), "{m}");
        assert!(m["rel_rms_error"].as_f64().unwrap() < 0.12, "{m}");
    }
    assert_eq!(line["bytes"], fs::metadata(&base).unwrap().len());

    let merged = GgufModel::open(&out)
        .unwrap()
        .hf_tensors(DType::F32, &Device::Cpu)
        .unwrap();
    let mut file = BufReader::new(fs::File::open(&base).unwrap());
    let mut base_hf = |gguf: &str, heads: Option<usize>| {
        let w = src
            .tensor(&mut file, gguf, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        heads.map_or(w.clone(), |h| unpermute_qk(&w, h).unwrap())
    };
    for (key, delta) in &deltas {
        let layer = &key["model.layers.".len()..key.find(".self_attn").unwrap()];
        let (gguf, permuted) = if key.contains("q_proj") {
            (format!("blk.{layer}.attn_q.weight"), Some(heads))
        } else {
            (format!("blk.{layer}.attn_v.weight"), None)
        };
        let base_w = base_hf(&gguf, permuted);
        let got = &merged[key];
        // The merge moved the weights by ΔW, up to the Q4_1 rounding of the result.
        let moved = (got - &base_w).unwrap();
        let err = rel_rms(&moved, delta);
        assert!(err < 0.5, "{key}: the weights moved {err} off ΔW");
        if let Some(h) = permuted {
            let wrong = rel_rms(&moved, &unpermute_qk(delta, h).unwrap());
            assert!(wrong > 1.2, "{key}: permutation not applied ({wrong})");
        }
    }
    // An unadapted layer reads back bit for bit.
    let key = "model.layers.2.self_attn.q_proj.weight";
    assert_eq!(
        bits(&merged[key]),
        bits(&base_hf("blk.2.attn_q.weight", Some(heads)))
    );
}
