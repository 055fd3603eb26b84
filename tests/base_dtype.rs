//! Low-precision and quantized base weights (`--base-dtype`): the frozen ops against an f64
//! reference on the dequantised weights, gradients per storage type, training on a GGUF kept
//! quantized against the same weights widened to f32, bf16 against f32, merges, and the errors.

mod common;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{D, DType, Device, Tensor, Var};
use candle_peft::ops::{
    frozen_linear_cross_entropy_weight, frozen_linear_lora_weight, frozen_matmul_weight,
};
use candle_peft::{
    BaseDType, DEFAULT_ADAPTER, FrozenWeight, LlamaForCausalLM, LoadOptions, LoraConfig,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Every storage a frozen weight can have, with the relative tolerance of a product against the
/// f64 reference on the same (dequantised) weight. Quantized and f16/f32 weights are read
/// exactly and only the f32 summation differs (≤ 1e-4 of Σ|x||w| for these sizes); bf16 may
/// round the activation to bf16 per tile, as PyTorch's autocast does (≤ 2⁻⁸ of Σ|x||w|).
fn storages(w: &Tensor) -> Vec<(String, FrozenWeight, f64)> {
    let mut out = vec![
        ("f32".to_string(), FrozenWeight::Dense(w.clone()), 1e-4),
        (
            "f16".to_string(),
            FrozenWeight::Dense(w.to_dtype(DType::F16).unwrap()),
            1e-4,
        ),
        (
            "bf16".to_string(),
            FrozenWeight::Dense(w.to_dtype(DType::BF16).unwrap()),
            1.0 / 256.0,
        ),
    ];
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let q = QTensor::quantize(w, dtype).unwrap();
        out.push((
            format!("{dtype:?}"),
            FrozenWeight::Quantized(Arc::new(q)),
            1e-4,
        ));
    }
    out
}

/// `|got − want| ≤ tol · Σ_k |a_ik||b_kj| + 1e-6` elementwise, where `scale` holds the sums.
fn assert_close(what: &str, got: &[f64], want: &[f64], scale: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
        assert!(
            (g - w).abs() <= tol * s + 1e-6,
            "{what}[{i}]: got {g}, want {w} (bound {})",
            tol * s + 1e-6
        );
    }
}

/// `a · b` and `Σ_l |a_il b_lj|` in f64 for `a: [m, l]`, `b: [l, n]` (a contiguous copy).
fn reference_product(a: &Tensor, b: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let (m, l) = a.dims2().unwrap();
    let n = b.dim(1).unwrap();
    let (av, bv) = (to_f64(a), to_f64(&b.contiguous().unwrap()));
    let mut y = vec![0f64; m * n];
    let mut s = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for t in 0..l {
                let p = av[i * l + t] * bv[t * n + j];
                y[i * n + j] += p;
                s[i * n + j] += p.abs();
            }
        }
    }
    (y, s)
}

/// `x Wᵀ` for `x: [m, k]`, `W: [n, k]`.
fn reference_xwt(x: &Tensor, w: &Tensor) -> (Vec<f64>, Vec<f64>) {
    reference_product(x, &w.t().unwrap())
}

/// `g W` for `g: [m, n]`, `W: [n, k]`.
fn reference_gw(g: &Tensor, w: &Tensor) -> (Vec<f64>, Vec<f64>) {
    reference_product(g, w)
}

#[test]
fn frozen_matmul_reads_every_storage_type() {
    // Rows of 256 values: whole blocks of every ggml type, k-quants included.
    let (m, n, k) = (7, 70, 256);
    let w = random(&[n, k], 1, 0.5);
    let x = random(&[m, k], 2, 1.0);
    let c = random(&[m, n], 3, 1.0);
    let bias = random(&[n], 4, 0.1);
    for (name, stored, tol) in storages(&w) {
        let deq = stored.to_f32().unwrap();
        let (want, scale) = reference_xwt(&x, &deq);
        let want: Vec<f64> = want
            .iter()
            .enumerate()
            .map(|(i, y)| y + f64::from(bias.to_vec1::<f32>().unwrap()[i % n]))
            .collect();
        let xv = Var::from_tensor(&x).unwrap();
        let y = frozen_matmul_weight(xv.as_tensor(), &stored, Some(&bias)).unwrap();
        assert_eq!(y.dtype(), DType::F32, "{name}: output dtype");
        assert_close(&format!("{name} forward"), &to_f64(&y), &want, &scale, tol);
        // d(Σ c ⊙ y)/dx = c · W.
        let grads = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(xv.as_tensor()).unwrap();
        let (want, scale) = reference_gw(&c, &deq);
        assert_close(&format!("{name} dL/dx"), &to_f64(gx), &want, &scale, tol);
    }
}

#[test]
fn fused_lora_and_head_read_every_storage_type() {
    let (m, n, k, r) = (5, 40, 256, 4);
    let w = random(&[n, k], 11, 0.5);
    let x = random(&[m, k], 12, 1.0);
    let a = Var::from_tensor(&random(&[r, k], 13, 0.1)).unwrap();
    let b = Var::from_tensor(&random(&[n, r], 14, 0.1)).unwrap();
    let targets: Vec<u32> = (0..m as u32).map(|i| (i * 7) % n as u32).collect();
    for (name, stored, tol) in storages(&w) {
        let deq = stored.to_f32().unwrap();
        // The fused LoRA linear against the same op on the dequantised weight, in f32.
        let xv = Var::from_tensor(&x).unwrap();
        let y = frozen_linear_lora_weight(xv.as_tensor(), &stored, None, &a, &b, 2.0).unwrap();
        let dense = FrozenWeight::Dense(deq.clone());
        let x2 = Var::from_tensor(&x).unwrap();
        let y_ref = frozen_linear_lora_weight(x2.as_tensor(), &dense, None, &a, &b, 2.0).unwrap();
        let (_, scale) = reference_xwt(&x, &deq);
        assert_close(
            &format!("{name} lora forward"),
            &to_f64(&y),
            &to_f64(&y_ref),
            &scale,
            tol,
        );
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = y_ref.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (what, t) in [
            ("x", xv.as_tensor()),
            ("A", a.as_tensor()),
            ("B", b.as_tensor()),
        ] {
            let got = g.get(t).unwrap();
            let want = g_ref
                .get(if what == "x" { x2.as_tensor() } else { t })
                .unwrap();
            let d = common::max_abs_diff(got, want);
            let norm = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                d <= 20.0 * tol as f32 * norm.max(1.0),
                "{name} lora dL/d{what}: {d}"
            );
        }
        // The fused head: per-row cross-entropy equals the composition on the dequantised
        // weight.
        let losses = frozen_linear_cross_entropy_weight(&x, &stored, None, &targets).unwrap();
        let logits = x.matmul(&deq.t().unwrap()).unwrap();
        let lse = logits
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap();
        let picked = logits
            .gather(
                &Tensor::new(targets.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(1)
                    .unwrap(),
                1,
            )
            .unwrap();
        let want = (lse - picked).unwrap().flatten_all().unwrap();
        let d = common::max_abs_diff(&losses, &want);
        assert!(d <= 1e-3 + 50.0 * tol as f32, "{name} head loss: {d}");
    }
}

#[test]
fn base_dtype_names_and_errors() {
    for name in ["f32", "f16", "bf16", "q8_0", "q4_k", "gguf"] {
        let d: BaseDType = name.parse().unwrap();
        assert_eq!(d.name(), name);
    }
    let err = "q3_k".parse::<BaseDType>().unwrap_err().to_string();
    assert!(err.contains("q3_k") && err.contains("q4_k"), "{err}");
    // q8_0 needs rows of whole 32-value blocks: the error names the tensor.
    let w = random(&[4, 40], 5, 1.0);
    let err = BaseDType::Q8_0
        .store("enc.fc.weight", &w)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("enc.fc.weight") && err.contains("Q8_0"),
        "{err}"
    );
    // q4_k on rows of 384 (not whole 256-blocks) takes q5_0, as llama.cpp's quantiser does.
    let w = random(&[8, 384], 6, 1.0);
    let stored = BaseDType::Q4K.store("enc.fc.weight", &w).unwrap();
    assert_eq!(stored.type_name(), "q5_0");
    let w = random(&[8, 512], 6, 1.0);
    let stored = BaseDType::Q4K.store("enc.fc.weight", &w).unwrap();
    assert_eq!(stored.type_name(), "q4_k");
    // bf16 storage rounds to nearest even.
    let stored = BaseDType::Bf16.store("w", &w).unwrap();
    let want = w
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(common::max_abs_diff(&stored.to_f32().unwrap(), &want), 0.0);
    // gguf keeps a GGUF's own types: any other source is refused, naming the tensor.
    let err = BaseDType::Gguf
        .store("enc.fc.weight", &w)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("enc.fc.weight") && err.contains("GGUF"),
        "{err}"
    );
}

/// One next-token loss of SmolLM2 with a LoRA adapter (B perturbed so it contributes), and the
/// gradients of the adapter's vars, for the base kept in `base_dtype`.
fn smollm2_step(base_dtype: BaseDType) -> (f32, Vec<(String, Tensor)>, Vec<String>) {
    let src = common::llama::smollm2_source();
    let opts = LoadOptions {
        device: Device::Cpu,
        base_dtype,
    };
    let (mut model, cfg) = LlamaForCausalLM::from_source(&src, DType::F32, opts).unwrap();
    let types: Vec<String> = model
        .layers()
        .iter()
        .map(|l| l.frozen_weight().type_name())
        .collect();
    model.set_seed(3);
    model
        .add_adapter(
            DEFAULT_ADAPTER,
            LoraConfig::new(&["q_proj", "v_proj", "down_proj"], 4, 8.0),
        )
        .unwrap();
    let vars = model.trainable_vars();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (name, v) in &vars {
        if name.contains("lora_B") {
            let n = v.elem_count();
            let vals: Vec<f32> = (0..n).map(|_| rng.random_range(-0.01..0.01)).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    model.train();
    let tokens = common::llama::token_ids(2 * 33, cfg.vocab_size, 4);
    let ids = Tensor::from_vec(tokens.clone(), (2, 33), &Device::Cpu).unwrap();
    let inputs = ids.narrow(1, 0, 32).unwrap().contiguous().unwrap();
    let targets: Vec<u32> = ids
        .narrow(1, 1, 32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let hidden = model.model().forward_hidden(&inputs, None).unwrap();
    let hidden = hidden.reshape((64, cfg.hidden_size)).unwrap();
    let loss = model
        .model()
        .token_losses(&hidden, &targets)
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = vars
        .iter()
        .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (loss.to_scalar::<f32>().unwrap(), g, types)
}

#[test]
fn gguf_base_kept_quantized_trains_as_the_widened_base() {
    let (loss_f32, grads_f32, types_f32) = smollm2_step(BaseDType::F32);
    let (loss_q, grads_q, types_q) = smollm2_step(BaseDType::Gguf);
    assert!(types_f32.iter().all(|t| t == "f32"), "{types_f32:?}");
    // SmolLM2's file is Q4_1 (a few tensors may be stored otherwise): the projections stay
    // ggml blocks, none widened.
    assert!(types_q.iter().all(|t| t.starts_with('q')), "{types_q:?}");
    assert!(types_q.iter().any(|t| t == "q4_1"), "{types_q:?}");
    let rel = ((loss_q - loss_f32) / loss_f32).abs();
    assert!(rel < 1e-3, "first-step loss {loss_q} vs {loss_f32}: {rel}");
    for ((name, gq), (_, gf)) in grads_q.iter().zip(&grads_f32) {
        let d = common::max_abs_diff(gq, gf);
        let norm = gf
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            d <= 1e-2 * norm + 1e-7,
            "{name}: gradient differs by {d} (max {norm})"
        );
    }
}

#[test]
fn merge_into_a_quantized_base_is_f32_and_unmerge_restores_the_blocks() {
    let src = common::llama::smollm2_source();
    let opts = LoadOptions {
        device: Device::Cpu,
        base_dtype: BaseDType::Gguf,
    };
    let (mut model, _) = LlamaForCausalLM::from_source(&src, DType::F32, opts).unwrap();
    let mut config = LoraConfig::new(&["model.layers.0.self_attn.q_proj"], 4, 8.0);
    config.init_lora_weights = candle_peft::InitLoraWeights::Bool(false);
    model.add_adapter(DEFAULT_ADAPTER, config).unwrap();
    let layer = model
        .layers()
        .iter()
        .find(|l| l.name() == "model.layers.0.self_attn.q_proj")
        .unwrap()
        .clone();
    let FrozenWeight::Quantized(before) = layer.frozen_weight() else {
        panic!("q_proj is not quantized");
    };
    let bytes_before = before.data().unwrap().to_vec();
    let base = layer.weight().unwrap();
    let delta = layer
        .with_adapter(DEFAULT_ADAPTER, |a| a.delta_weight().unwrap())
        .unwrap();
    model.merge().unwrap();
    let merged = layer.frozen_weight();
    assert_eq!(merged.type_name(), "f32");
    let want = (base + delta).unwrap();
    assert!(common::max_abs_diff(&merged.to_f32().unwrap(), &want) < 1e-6);
    model.unmerge().unwrap();
    let FrozenWeight::Quantized(after) = layer.frozen_weight() else {
        panic!("unmerge did not restore the blocks");
    };
    assert_eq!(after.data().unwrap().to_vec(), bytes_before);
}

#[test]
fn bf16_base_trains_close_to_f32() {
    // Tolerance: a bf16 weight carries a relative rounding of at most 2⁻⁹ per value, and the
    // native path rounds activations the same way; over a 6-layer MiniLM that moves the loss by
    // well under 1%, so 2% of the loss bounds it, and the loss must fall in both.
    let dir = common::minilm_dir();
    let run = |base_dtype: BaseDType| -> Vec<f32> {
        let opts = LoadOptions {
            device: Device::Cpu,
            base_dtype,
        };
        let pre = candle_peft::BertModel::from_pretrained(dir.to_str().unwrap(), opts).unwrap();
        let mut model = pre.model;
        model.set_seed(0);
        model
            .add_adapter(
                DEFAULT_ADAPTER,
                LoraConfig::new(&["query", "value"], 8, 16.0),
            )
            .unwrap();
        model.train();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let ids: Vec<u32> = (0..4 * 16).map(|_| rng.random_range(1000..30000)).collect();
        let ids = Tensor::from_vec(ids, (4, 16), &Device::Cpu).unwrap();
        let mut opt =
            candle_peft::AdamW::new(model.trainable_vars(), candle_peft::AdamWConfig::default())
                .unwrap();
        (0..5)
            .map(|_| {
                let hidden = model.model().forward(&ids, None, None).unwrap();
                let loss = hidden.sqr().unwrap().mean_all().unwrap();
                let grads = loss.backward().unwrap();
                opt.step(&grads, 1e-3).unwrap();
                loss.to_scalar::<f32>().unwrap()
            })
            .collect()
    };
    let f32_losses = run(BaseDType::F32);
    let bf16_losses = run(BaseDType::Bf16);
    for (i, (b, f)) in bf16_losses.iter().zip(&f32_losses).enumerate() {
        assert!(((b - f) / f).abs() < 0.02, "step {i}: bf16 {b} vs f32 {f}");
    }
    assert!(bf16_losses[4] < bf16_losses[0], "{bf16_losses:?}");
    assert!(f32_losses[4] < f32_losses[0], "{f32_losses:?}");
}

fn json_line(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().expect("a JSON line on stdout");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn cli_trains_and_evaluates_on_a_gguf_base_kept_quantized() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = common::smollm2_gguf().display().to_string();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare/valid.txt");
    let text = std::fs::read_to_string(&data).unwrap();
    let small = dir.path().join("small.txt");
    std::fs::write(&small, &text[..text.char_indices().nth(1500).unwrap().0]).unwrap();
    let small = small.display().to_string();
    let train = |base_dtype: &str| -> serde_json::Value {
        let out = dir.path().join(format!("run-{base_dtype}"));
        json_line(&common::run_ok(common::bin().args([
            "train",
            "--task",
            "causal-lm",
            "--model",
            &gguf,
            "--base-dtype",
            base_dtype,
            "--data",
            &small,
            "--method",
            "lora",
            "--targets",
            "q_proj,v_proj",
            "--rank",
            "4",
            "--steps",
            "2",
            "--batch",
            "2",
            "--seq",
            "32",
            "--out",
            out.to_str().unwrap(),
            "--json",
            "--quiet",
        ])))
    };
    let widened = train("f32");
    let kept = train("gguf");
    // The same weights, read as blocks or widened: the losses agree to float rounding.
    let losses = |v: &serde_json::Value| -> Vec<f64> {
        v["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_f64().unwrap())
            .collect()
    };
    for (q, f) in losses(&kept).iter().zip(losses(&widened)) {
        assert!(((q - f) / f).abs() < 1e-3, "gguf loss {q} vs f32 {f}");
    }
    // eval reads the adapter onto the quantized base.
    let eval = json_line(&common::run_ok(common::bin().args([
        "eval",
        "--task",
        "causal-lm",
        "--model",
        &gguf,
        "--base-dtype",
        "gguf",
        "--adapter",
        dir.path().join("run-gguf/adapter").to_str().unwrap(),
        "--data",
        &small,
        "--seq",
        "32",
        "--json",
    ])));
    assert!(eval["perplexity"].as_f64().unwrap().is_finite(), "{eval}");
    // A bad name, and gguf on a folder model, are named errors.
    // clap refuses the name (a usage error, exit status 2) with the list of choices.
    let out = common::bin()
        .args([
            "eval",
            "--model",
            "m",
            "--base-dtype",
            "q3",
            "--data",
            &small,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("q3") && err.contains("q4_k|gguf"), "{err}");
    let tsv = dir.path().join("tiny.tsv");
    std::fs::write(&tsv, "1\tgood film\n0\tbad film\n").unwrap();
    // (eval first notes that the bare MiniLM has no classifier, then fails.)
    let out = common::bin()
        .args(["eval", "--model", common::minilm_dir().to_str().unwrap()])
        .args(["--base-dtype", "gguf", "--data", tsv.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("error: ") && err.contains("GGUF") && err.contains("query.weight"),
        "{err}"
    );
}
