//! Streaming merged export (`candle_peft::io::export`) and the `merge` / `inspect` subcommands:
//! PEFT's own merged weights as the oracle on MiniLM, a sharded synthetic round trip checked
//! against `W + s·B·A` computed by hand, dtype conversion, and bad inputs.
mod common;
use common::bin;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_peft::io::export::{MergeOptions, merge_adapter_into_base, parse_size};
use candle_peft::io::peft_format::{write_adapter_dir, write_safetensors};
use candle_peft::{AdapterConfig, LoraConfig, PeftError};
use safetensors::tensor::Dtype;

const MERGED_KEYS: [&str; 4] = [
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.attention.self.value.weight",
    "encoder.layer.5.attention.self.query.weight",
    "encoder.layer.5.attention.self.value.weight",
];

fn fixture() -> PathBuf {
    common::fixture("peft-lora-minilm")
}

fn adapter_dir() -> PathBuf {
    fixture().join("adapter")
}

use common::{run_err, run_ok};

/// Every tensor of a safetensors file: name → (dtype, shape, raw bytes).
fn raw(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| (name, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn format_metadata(path: &Path) -> Option<String> {
    let bytes = fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().as_ref()?.get("format").cloned()
}

fn load(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

use common::max_abs_diff;

/// The MiniLM merge checks shared by the library and binary tests.
fn check_minilm_merge(out: &Path) {
    let base_path = common::minilm_dir().join("model.safetensors");
    let out_path = out.join("model.safetensors");
    assert!(out_path.is_file());
    assert!(!out.join("model.safetensors.index.json").exists());
    assert_eq!(format_metadata(&out_path).as_deref(), Some("pt"));

    let expected = load(&fixture().join("merged_subset.safetensors"));
    let merged = load(&out_path);
    for key in MERGED_KEYS {
        let d = max_abs_diff(&merged[key], &expected[key]);
        assert!(d < 1e-5, "{key}: max |diff| vs PEFT = {d}");
    }

    let base = raw(&base_path);
    let got = raw(&out_path);
    assert_eq!(
        base.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    let adapted: BTreeSet<String> = (0..6)
        .flat_map(|l| {
            ["query", "value"].map(|m| format!("encoder.layer.{l}.attention.self.{m}.weight"))
        })
        .collect();
    for (name, (dtype, shape, bytes)) in &base {
        let (gd, gs, gb) = &got[name];
        assert_eq!((dtype, shape), (gd, gs), "{name}");
        if adapted.contains(name) {
            assert_ne!(bytes, gb, "{name} should carry the adapter");
        } else {
            assert!(bytes == gb, "{name} changed but is not adapted");
        }
    }

    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "modules.json",
        "1_Pooling/config.json",
    ] {
        let src = common::minilm_dir().join(f);
        assert_eq!(
            fs::read(&src).unwrap(),
            fs::read(out.join(f)).unwrap(),
            "{f} not copied as is"
        );
    }
    // No temporary files left behind.
    for entry in fs::read_dir(out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "left over {name}");
    }
}

#[test]
fn library_merge_matches_peft_and_leaves_the_rest_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let report = merge_adapter_into_base(
        &common::minilm_dir(),
        &adapter_dir(),
        &out,
        MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(report.merged_modules.len(), 12);
    assert!(report.replaced_tensors.is_empty());
    assert_eq!(report.weight_files, vec![out.join("model.safetensors")]);
    assert!(report.index_file.is_none());
    assert_eq!(report.num_tensors, 104);
    check_minilm_merge(&out);

    // The single base file works as well as the folder.
    let out2 = tmp.path().join("merged-from-file");
    merge_adapter_into_base(
        &common::minilm_dir().join("model.safetensors"),
        &adapter_dir(),
        &out2,
        MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(
        fs::read(out.join("model.safetensors")).unwrap(),
        fs::read(out2.join("model.safetensors")).unwrap()
    );
}

#[test]
fn binary_merge_matches_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let o = run_ok(
        bin()
            .arg("merge")
            .arg("--base")
            .arg(common::minilm_dir())
            .arg("--adapter")
            .arg(adapter_dir())
            .arg("--out")
            .arg(&out),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("merged 12 adapter modules"), "{stdout}");
    check_minilm_merge(&out);

    // --json: the same merge as one line, with the process's own peak memory.
    let json_out = tmp.path().join("merged-json");
    let o = run_ok(
        bin()
            .arg("merge")
            .arg("--base")
            .arg(common::minilm_dir())
            .arg("--adapter")
            .arg(adapter_dir())
            .arg("--out")
            .arg(&json_out)
            .arg("--json"),
    );
    let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(line["merged_modules"], 12, "{line}");
    assert_eq!(line["replaced_tensors"], 0, "{line}");
    let peak = line["peak_rss_mb"].as_f64().unwrap();
    // Above the binary itself, below the 91 MB model plus a streaming merge's working set.
    assert!(peak > 1.0 && peak < 200.0, "{line}");
    check_minilm_merge(&json_out);
}

#[test]
fn binary_merge_to_f16() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged-f16");
    run_ok(
        bin()
            .arg("merge")
            .arg("--base")
            .arg(common::minilm_dir())
            .arg("--adapter")
            .arg(adapter_dir())
            .arg("--out")
            .arg(&out)
            .args(["--dtype", "f16"]),
    );
    let out_path = out.join("model.safetensors");
    let base = raw(&common::minilm_dir().join("model.safetensors"));
    let got = raw(&out_path);
    for (name, (dtype, shape, bytes)) in &base {
        let (gd, gs, gb) = &got[name];
        assert_eq!(shape, gs, "{name}");
        if *dtype == Dtype::F32 {
            assert_eq!(*gd, Dtype::F16, "{name}");
        } else {
            // position_ids (I64) are copied unchanged.
            assert_eq!((dtype, bytes), (gd, gb), "{name}");
        }
    }

    let merged = load(&out_path);
    let base_t = load(&common::minilm_dir().join("model.safetensors"));
    let expected = load(&fixture().join("merged_subset.safetensors"));
    let close = |name: &str, a: &Tensor, b: &Tensor| {
        for (x, y) in to_f32_vec(a).iter().zip(to_f32_vec(b)) {
            assert!(
                (x - y).abs() <= 1e-3 * y.abs() + 1e-6,
                "{name}: {x} vs {y} (f16)"
            );
        }
    };
    for key in MERGED_KEYS {
        assert_eq!(merged[key].dtype(), DType::F16);
        close(key, &merged[key], &expected[key]);
    }
    for key in [
        "embeddings.word_embeddings.weight",
        "encoder.layer.3.output.dense.weight",
    ] {
        close(key, &merged[key], &base_t[key]);
    }

    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float16");
    assert_eq!(config["model_type"], "bert");
}

#[test]
fn binary_inspect_json() {
    let o = run_ok(bin().arg("inspect").arg(adapter_dir()).arg("--json"));
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert_eq!(stdout.trim_end().lines().count(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["peft_type"], "LORA");
    assert_eq!(v["r"], 8);
    assert_eq!(v["lora_alpha"], 16);
    assert_eq!(v["scaling"], 2.0);
    assert_eq!(v["num_tensors"], 24);
    assert_eq!(v["tensors"].as_array().unwrap().len(), 24);
    assert_eq!(v["trainable_params"], 24 * 8 * 384);
    assert_eq!(v["num_modules"], 12);
    assert_eq!(v["ranks"]["8"], 12);
    assert_eq!(v["target_modules"], serde_json::json!(["query", "value"]));
    let t0 = &v["tensors"][0];
    assert_eq!(t0["dtype"], "F32");
    assert_eq!(t0["shape"], serde_json::json!([8, 384]));
    assert!(
        t0["key"]
            .as_str()
            .unwrap()
            .starts_with("base_model.model.encoder.")
    );

    // Text mode names the same facts.
    let o = run_ok(bin().arg("inspect").arg(adapter_dir()));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("LORA"), "{text}");
    assert!(text.contains("73728"), "{text}");
    assert!(text.contains("lora_B.weight"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Synthetic sharded round trip.

/// Deterministic values in [-1, 1).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(seed: u64, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(values(seed, n), shape, &Device::Cpu).unwrap()
}

/// `W + s · B·A` for a linear weight `[out, in]`, or for a conv weight with `A: [r, in, kh, kw]`,
/// `B: [out, r, 1, 1]`, computed with loops in f64.
fn expected_merge(w: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Vec<f32> {
    let w = to_f32_vec(w);
    let out = b.dims()[0];
    let r = a.dims()[0];
    let k: usize = a.dims()[1..].iter().product();
    let (a, b) = (to_f32_vec(a), to_f32_vec(b));
    let mut res = w.clone();
    for o in 0..out {
        for j in 0..k {
            let mut acc = 0f64;
            for q in 0..r {
                acc += b[o * r + q] as f64 * a[q * k + j] as f64;
            }
            res[o * k + j] = (w[o * k + j] as f64 + s * acc) as f32;
        }
    }
    res
}

struct Synthetic {
    base: PathBuf,
    adapter: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    lora: BTreeMap<String, (Tensor, Tensor, f64)>,
    head: (Tensor, Tensor),
}

fn synthetic(root: &Path) -> Synthetic {
    let base = root.join("base");
    fs::create_dir_all(&base).unwrap();
    let mut tensors = BTreeMap::new();
    tensors.insert("embed.weight".to_string(), tensor(1, &[10, 4]));
    tensors.insert("layers.0.q_proj.weight".to_string(), tensor(2, &[6, 4]));
    tensors.insert("layers.0.v_proj.weight".to_string(), tensor(3, &[6, 4]));
    tensors.insert("layers.1.q_proj.weight".to_string(), tensor(4, &[6, 4]));
    tensors.insert(
        "layers.1.v_proj.weight".to_string(),
        tensor(5, &[6, 4]).to_dtype(DType::BF16).unwrap(),
    );
    tensors.insert("conv.weight".to_string(), tensor(6, &[3, 2, 3, 3]));
    tensors.insert("head.weight".to_string(), tensor(7, &[2, 4]));
    tensors.insert("head.bias".to_string(), tensor(8, &[2]));
    tensors.insert(
        "position_ids".to_string(),
        Tensor::arange(0i64, 8, &Device::Cpu)
            .unwrap()
            .reshape((1, 8))
            .unwrap(),
    );
    let shard1 = [
        "embed.weight",
        "layers.0.q_proj.weight",
        "layers.0.v_proj.weight",
    ];
    let files = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    let mut parts: [Vec<(String, Tensor)>; 2] = [Vec::new(), Vec::new()];
    for (name, t) in &tensors {
        let i = usize::from(!shard1.contains(&name.as_str()));
        parts[i].push((name.clone(), t.clone()));
        weight_map.insert(name.clone(), files[i].into());
    }
    for (part, file) in parts.iter().zip(files) {
        write_safetensors(&base.join(file), part).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    fs::write(
        base.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    fs::write(
        base.join("config.json"),
        r#"{"model_type": "toy", "torch_dtype": "float32"}"#,
    )
    .unwrap();
    fs::write(base.join("tokenizer.json"), "{}").unwrap();

    // LoRA r=2, alpha=4 on q/v/conv; layers.1.v_proj gets r=1 from rank_pattern; head saved whole.
    let mut cfg = LoraConfig::new(&["q_proj", "v_proj", "conv"], 2, 4.0);
    cfg.rank_pattern.insert("layers.1.v_proj".into(), 1);
    cfg.targeting.modules_to_save = Some(vec!["head".into()]);
    let mut lora = BTreeMap::new();
    let mut file = Vec::new();
    let mut seed = 100;
    for (module, a_shape, b_shape, s) in [
        ("layers.0.q_proj", vec![2, 4], vec![6, 2], 2.0),
        ("layers.0.v_proj", vec![2, 4], vec![6, 2], 2.0),
        ("layers.1.q_proj", vec![2, 4], vec![6, 2], 2.0),
        ("layers.1.v_proj", vec![1, 4], vec![6, 1], 4.0),
        ("conv", vec![2, 2, 3, 3], vec![3, 2, 1, 1], 2.0),
    ] {
        let a = tensor(seed, &a_shape);
        let b = tensor(seed + 1, &b_shape);
        seed += 2;
        file.push((
            format!("base_model.model.{module}.lora_A.weight"),
            a.clone(),
        ));
        file.push((
            format!("base_model.model.{module}.lora_B.weight"),
            b.clone(),
        ));
        lora.insert(module.to_string(), (a, b, s));
    }
    let head = (tensor(50, &[2, 4]), tensor(51, &[2]));
    file.push(("base_model.model.head.weight".into(), head.0.clone()));
    file.push(("base_model.model.head.bias".into(), head.1.clone()));
    let adapter = root.join("adapter");
    write_adapter_dir(&adapter, &AdapterConfig::from(cfg), &file).unwrap();
    Synthetic {
        base,
        adapter,
        tensors,
        lora,
        head,
    }
}

/// Reads a merged folder, sharded or not, checking the index against the shards.
fn read_merged(out: &Path) -> BTreeMap<String, Tensor> {
    let index_path = out.join("model.safetensors.index.json");
    if !index_path.exists() {
        return load(&out.join("model.safetensors"));
    }
    assert!(!out.join("model.safetensors").exists());
    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let files: BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    let n = files.len();
    let mut total = 0u64;
    let mut all = BTreeMap::new();
    for (i, file) in files.iter().enumerate() {
        assert_eq!(*file, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        let path = out.join(file);
        assert_eq!(format_metadata(&path).as_deref(), Some("pt"));
        for (name, (_, _, bytes)) in raw(&path) {
            assert_eq!(map[&name], *file, "{name} is in {file}, index disagrees");
            total += bytes.len() as u64;
        }
        for (name, t) in load(&path) {
            assert!(all.insert(name, t).is_none());
        }
    }
    assert_eq!(index["metadata"]["total_size"], total);
    assert_eq!(map.len(), all.len());
    all
}

fn check_synthetic(s: &Synthetic, merged: &BTreeMap<String, Tensor>) {
    assert_eq!(
        merged.keys().collect::<Vec<_>>(),
        s.tensors.keys().collect::<Vec<_>>()
    );
    for (module, (a, b, scale)) in &s.lora {
        let key = format!("{module}.weight");
        let w = &s.tensors[&key];
        let got = &merged[&key];
        assert_eq!(got.dtype(), w.dtype(), "{key} keeps its dtype");
        assert_eq!(got.dims(), w.dims());
        let want = expected_merge(w, a, b, *scale);
        let tol = if w.dtype() == DType::BF16 { 1e-2 } else { 1e-5 };
        for (x, y) in to_f32_vec(got).iter().zip(&want) {
            assert!((x - y).abs() <= tol * y.abs().max(1.0), "{key}: {x} vs {y}");
        }
    }
    assert_eq!(max_abs_diff(&merged["head.weight"], &s.head.0), 0.0);
    assert_eq!(max_abs_diff(&merged["head.bias"], &s.head.1), 0.0);
    assert_eq!(
        max_abs_diff(&merged["embed.weight"], &s.tensors["embed.weight"]),
        0.0
    );
    assert_eq!(
        merged["position_ids"].to_vec2::<i64>().unwrap(),
        s.tensors["position_ids"].to_vec2::<i64>().unwrap()
    );
}

#[test]
fn sharded_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let s = synthetic(tmp.path());
    let out = tmp.path().join("merged");
    let max = 200;
    let report = merge_adapter_into_base(
        &s.base,
        &s.adapter,
        &out,
        MergeOptions {
            dtype: None,
            max_shard_bytes: max,
        },
    )
    .unwrap();
    assert!(report.weight_files.len() >= 2, "{report:?}");
    assert_eq!(
        report.index_file,
        Some(out.join("model.safetensors.index.json"))
    );
    assert_eq!(report.merged_modules.len(), 5);
    assert_eq!(report.replaced_tensors, vec!["head.bias", "head.weight"]);
    assert_eq!(report.num_tensors, s.tensors.len());
    // Every shard keeps to the limit unless it holds one oversize tensor.
    for f in &report.weight_files {
        let tensors = raw(f);
        let bytes: usize = tensors.values().map(|(_, _, b)| b.len()).sum();
        assert!(bytes as u64 <= max || tensors.len() == 1, "{}", f.display());
    }
    let merged = read_merged(&out);
    check_synthetic(&s, &merged);
    assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());

    // The same through the CLI with a unit size, into the same folder: a single file replaces
    // the shards and the index.
    run_ok(
        bin()
            .arg("merge")
            .arg("--base")
            .arg(&s.base)
            .arg("--adapter")
            .arg(&s.adapter)
            .arg("--out")
            .arg(&out)
            .args(["--max-shard-size", "1MB"]),
    );
    let names: BTreeSet<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["config.json", "model.safetensors", "tokenizer.json"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    check_synthetic(&s, &read_merged(&out));

    // inspect reads the per-module ranks off the tensors.
    let o = run_ok(bin().arg("inspect").arg(&s.adapter).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ranks"]["2"], 4);
    assert_eq!(v["ranks"]["1"], 1);
    assert_eq!(v["saved_modules"], serde_json::json!(["head"]));
}

#[test]
fn fan_in_fan_out_weights_take_the_transposed_delta() {
    // GPT-2 style Conv1D weight stored [in, out]; PEFT merges (B·A)ᵀ.
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    fs::create_dir_all(&base).unwrap();
    let w = tensor(1, &[4, 6]);
    let key = "h.0.attn.c_attn.weight";
    write_safetensors(&base.join("model.safetensors"), &[(key.into(), w.clone())]).unwrap();
    let (a, b) = (tensor(2, &[2, 4]), tensor(3, &[6, 2]));
    let adapter = tmp.path().join("adapter");
    write_adapter_dir(
        &adapter,
        &AdapterConfig::from(LoraConfig::new(&["c_attn"], 2, 4.0)),
        &[
            (
                "base_model.model.h.0.attn.c_attn.lora_A.weight".into(),
                a.clone(),
            ),
            (
                "base_model.model.h.0.attn.c_attn.lora_B.weight".into(),
                b.clone(),
            ),
        ],
    )
    .unwrap();
    let cfg_path = adapter.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["fan_in_fan_out"] = true.into();
    fs::write(&cfg_path, cfg.to_string()).unwrap();

    let out = tmp.path().join("out");
    merge_adapter_into_base(&base, &adapter, &out, MergeOptions::default()).unwrap();
    let merged = load(&out.join("model.safetensors"));
    let want = expected_merge(&w.t().unwrap().contiguous().unwrap(), &a, &b, 2.0);
    let want = Tensor::from_vec(want, (6, 4), &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    assert!(max_abs_diff(&merged[key], &want) < 1e-6);
}

#[test]
fn sizes_parse_like_hugging_face() {
    assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
    assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
    assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
    assert_eq!(parse_size("1.5kb").unwrap(), 1500);
    assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
    assert!(parse_size("lots").is_err());
    assert!(parse_size("5XB").is_err());
    assert!(parse_size("0").is_err());
}

// ---------------------------------------------------------------------------------------------
// Bad inputs: typed errors, nothing written, no panics.

fn merge_err(adapter: &Path, out: &Path) -> PeftError {
    merge_adapter_into_base(&common::minilm_dir(), adapter, out, MergeOptions::default())
        .unwrap_err()
}

fn merge_cmd(adapter: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.arg("merge")
        .arg("--base")
        .arg(common::minilm_dir())
        .arg("--adapter")
        .arg(adapter)
        .arg("--out")
        .arg(out);
    c
}

#[test]
fn adapter_without_config_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    fs::create_dir_all(&adapter).unwrap();
    fs::copy(
        adapter_dir().join("adapter_model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let err = merge_err(&adapter, &out);
    assert!(
        matches!(err, PeftError::MissingAdapterConfig { .. }),
        "{err:?}"
    );
    assert!(!out.join("model.safetensors").exists());
    let stderr = run_err(&mut merge_cmd(&adapter, &out));
    assert!(stderr.contains("adapter_config.json"), "{stderr}");
    let stderr = run_err(bin().arg("inspect").arg(&adapter));
    assert!(stderr.contains("adapter_config.json"), "{stderr}");
}

#[test]
fn module_without_base_tensor_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    let module = "encoder.layer.0.attention.self.nonexistent";
    let cfg = LoraConfig::new(&["nonexistent"], 2, 4.0);
    write_adapter_dir(
        &adapter,
        &AdapterConfig::from(cfg),
        &[
            (
                format!("base_model.model.{module}.lora_A.weight"),
                tensor(1, &[2, 384]),
            ),
            (
                format!("base_model.model.{module}.lora_B.weight"),
                tensor(2, &[384, 2]),
            ),
        ],
    )
    .unwrap();
    let out = tmp.path().join("out");
    let err = merge_err(&adapter, &out);
    let msg = err.to_string();
    assert!(matches!(err, PeftError::InvalidLayer { .. }), "{err:?}");
    assert!(msg.contains(module), "{msg}");
    assert!(
        msg.contains("encoder.layer.0.attention.self.query.weight"),
        "nearby keys missing: {msg}"
    );
    assert!(!out.join("model.safetensors").exists());
    let stderr = run_err(&mut merge_cmd(&adapter, &out));
    assert!(stderr.contains(module), "{stderr}");
}

#[test]
fn truncated_adapter_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    fs::create_dir_all(&adapter).unwrap();
    fs::copy(
        adapter_dir().join("adapter_config.json"),
        adapter.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = fs::read(adapter_dir().join("adapter_model.safetensors")).unwrap();
    fs::write(
        adapter.join("adapter_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let out = tmp.path().join("out");
    let err = merge_err(&adapter, &out);
    assert!(matches!(err, PeftError::Safetensors { .. }), "{err:?}");
    assert!(
        err.to_string().contains("adapter_model.safetensors"),
        "{err}"
    );
    let stderr = run_err(&mut merge_cmd(&adapter, &out));
    assert!(stderr.contains("adapter_model.safetensors"), "{stderr}");
    let stderr = run_err(bin().arg("inspect").arg(&adapter).arg("--json"));
    assert!(stderr.contains("adapter_model.safetensors"), "{stderr}");
}

#[test]
fn bad_bases_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // A missing base.
    let err = merge_adapter_into_base(
        &tmp.path().join("nope"),
        &adapter_dir(),
        &out,
        MergeOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, PeftError::ModelNotFound { .. }), "{err:?}");
    // A truncated base file is named.
    let base = tmp.path().join("base");
    fs::create_dir_all(&base).unwrap();
    let bytes = fs::read(common::minilm_dir().join("model.safetensors")).unwrap();
    fs::write(base.join("model.safetensors"), &bytes[..bytes.len() - 10]).unwrap();
    let err =
        merge_adapter_into_base(&base, &adapter_dir(), &out, MergeOptions::default()).unwrap_err();
    assert!(matches!(err, PeftError::Safetensors { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // Writing into the base folder is refused.
    let err = merge_adapter_into_base(
        &common::minilm_dir(),
        &adapter_dir(),
        &common::minilm_dir(),
        MergeOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, PeftError::InvalidConfig { .. }), "{err:?}");
    // A shape that does not fit: the adapter's rank-8 A on a base with other widths.
    let small = tmp.path().join("small");
    fs::create_dir_all(&small).unwrap();
    write_safetensors(
        &small.join("model.safetensors"),
        &[(
            "encoder.layer.0.attention.self.query.weight".into(),
            tensor(1, &[16, 16]),
        )],
    )
    .unwrap();
    let err =
        merge_adapter_into_base(&small, &adapter_dir(), &out, MergeOptions::default()).unwrap_err();
    assert!(!err.to_string().is_empty());
    assert!(!out.join("model.safetensors").exists());
}
