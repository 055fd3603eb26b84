//! The fused attention core of the Llama forward (`attention_core`) against the composition of
//! candle ops and `masked_softmax` it replaces: output and the gradients of q, k and v, with a
//! causal + padding mask (fully masked rows included), a broadcast padding-only mask and no mask;
//! the masked-key skipping (query tiles of 32 positions) with lengths off the tile size, left and
//! right padding, more keys than queries, and an additive bias with mixed masked values that
//! must not change any result; sliding-window masks (windows of 1 to past T, with padding,
//! grouped heads, one head per group, cached keys) whose keys before the window are skipped
//! (never read, so NaN there changes nothing); the plain-ops fallback for other dtypes; and
//! errors naming the operand of a bad shape. Timing probe at the end (ignored).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::ops::attention_core;
use candle_peft::ops::masked_softmax;
use common::tensors::flat;

/// The allocator the binaries use, so the timing probe below sees their allocation costs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const B: usize = 2;
const NH: usize = 6;
const NKV: usize = 2;
const T: usize = 7;
const D_HEAD: usize = 8;

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005) ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn var(dims: &[usize], seed: u64, scale: f32) -> Var {
    let n = dims.iter().product();
    let v: Vec<f32> = values(n, seed).iter().map(|x| x * scale).collect();
    Var::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// The composition `LlamaAttention::forward` used before the fused op (and still uses with a KV
/// cache): `v` transposed to `[B, n_kv, T_k, d]`, the group's query heads as the rows of one
/// matrix, `masked_softmax`, and the context transposed back to `[B, T, n_h·d]`.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, nkv: usize) -> Tensor {
    let (b, nh, t, d) = q.dims4().unwrap();
    let tk = k.dim(2).unwrap();
    let groups = nh / nkv;
    let v = v.transpose(1, 2).unwrap().contiguous().unwrap();
    let q = q.reshape((b, nkv, groups * t, d)).unwrap();
    let scores = q
        .matmul(&k.t().unwrap())
        .unwrap()
        .reshape((b, nh, t, tk))
        .unwrap();
    let probs = masked_softmax(&scores, mask).unwrap();
    probs
        .reshape((b, nkv, groups * t, tk))
        .unwrap()
        .matmul(&v)
        .unwrap()
        .reshape((b, nh, t, d))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, nh * d))
        .unwrap()
}

/// Causal, and batch row 1 left-padded by two keys: its queries 0 and 1 see no key at all.
fn causal_padding_mask() -> Tensor {
    let pad = [[1f32; T], [0., 0., 1., 1., 1., 1., 1.]];
    let mut m = vec![0f32; B * T * T];
    for b in 0..B {
        for i in 0..T {
            for j in 0..T {
                if j > i || pad[b][j] == 0.0 {
                    m[(b * T + i) * T + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(m, (B, 1, T, T), &Device::Cpu).unwrap()
}

/// Padding only, broadcast over the queries: batch row 0 pads its last key.
fn broadcast_padding_mask() -> Tensor {
    let mut m = vec![0f32; B * T];
    m[T - 1] = f32::MIN;
    Tensor::from_vec(m, (B, 1, 1, T), &Device::Cpu).unwrap()
}

/// `max |a − b| / max |b|`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (flat(a), flat(b));
    let scale = b
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// The sizes of one case: `[B, n_h, T, d]` queries over `[B, n_kv, T_k, d]` keys.
#[derive(Clone, Copy)]
struct Sizes {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    tk: usize,
    d: usize,
}

const SMALL: Sizes = Sizes {
    b: B,
    nh: NH,
    nkv: NKV,
    t: T,
    tk: T,
    d: D_HEAD,
};

/// The fused op's context and `(dq, dk, dv)` against the reference's, within `1e-5` of the
/// largest reference value; returns the fused gradients.
fn check_sizes(s: Sizes, mask: Option<&Tensor>, label: &str) -> [Tensor; 3] {
    // q already scaled by 1/√d in the model; a larger scale here makes the softmax non-trivial.
    let q = var(&[s.b, s.nh, s.t, s.d], 1, 1.5);
    let k = var(&[s.b, s.nkv, s.tk, s.d], 2, 1.5);
    let v = var(&[s.b, s.tk, s.nkv, s.d], 3, 1.0);
    let fused = attention_core(&q, &k, &v, mask, s.nkv).unwrap();
    let plain = reference(&q, &k, &v, mask, s.nkv);
    assert_eq!(fused.dims(), &[s.b, s.t, s.nh * s.d]);
    let d = rel_diff(&fused, &plain);
    assert!(d <= 1e-5, "{label}: context differs by {d}");
    assert!(flat(&fused).iter().all(|x| x.is_finite()), "{label}");

    let w = Tensor::from_vec(values(fused.elem_count(), 4), fused.shape(), &Device::Cpu).unwrap();
    let gf = (&fused * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gp = (&plain * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    [("q", &q), ("k", &k), ("v", &v)].map(|(name, x)| {
        let a = gf.get(x.as_tensor()).unwrap();
        let b = gp.get(x.as_tensor()).unwrap();
        let d = rel_diff(a, b);
        assert!(d <= 1e-5, "{label}: d{name} differs by {d}");
        // Gradients are plain data: no graph of this step hangs off them.
        assert!(!a.track_op(), "{label}: d{name} is tracked");
        a.clone()
    })
}

fn check_against_reference(mask: Option<&Tensor>, label: &str) {
    check_sizes(SMALL, mask, label);
}

/// `[b, 1, t, tk]`: query `i` (position `tk − t + i`) sees key `j` when `j ≤ tk − t + i`, `j`
/// is at or after batch row `b`'s `left[b]` and before its `tk − right[b]`.
fn padded_causal_mask(s: Sizes, left: &[usize], right: &[usize]) -> Tensor {
    let offset = s.tk - s.t;
    let mut m = vec![0f32; s.b * s.t * s.tk];
    for b in 0..s.b {
        for i in 0..s.t {
            for j in 0..s.tk {
                if j > offset + i || j < left[b] || j >= s.tk - right[b] {
                    m[(b * s.t + i) * s.tk + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(m, (s.b, 1, s.t, s.tk), &Device::Cpu).unwrap()
}

/// `[b, 1, t, tk]`: query `i` (position `p = tk − t + i`) sees key `j` when `j ≤ p`,
/// `p − j < window` (a sliding window, as Mistral's and Gemma 3's local layers use), `j` is at
/// or after batch row `b`'s `left[b]` and before its `tk − right[b]`.
fn windowed_mask(s: Sizes, window: usize, left: &[usize], right: &[usize]) -> Tensor {
    let offset = s.tk - s.t;
    let mut m = vec![0f32; s.b * s.t * s.tk];
    for b in 0..s.b {
        for i in 0..s.t {
            let p = offset + i;
            for j in 0..s.tk {
                if j > p || p - j >= window || j < left[b] || j >= s.tk - right[b] {
                    m[(b * s.t + i) * s.tk + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(m, (s.b, 1, s.t, s.tk), &Device::Cpu).unwrap()
}

#[test]
fn sliding_windows_match_for_windows_and_lengths_off_the_tile_size() {
    // Windows of one key, shorter than, equal to and just around a tile of 32, and at least T
    // (plain causal); batch row 1 left-padded by 4 (its first 4 queries see nothing, and under a
    // window of w its queries up to 3 + w start at the padding), row 0 right-padded by 3.
    for t in [37, 70] {
        let s = Sizes {
            t,
            tk: t,
            d: 16,
            ..SMALL
        };
        for window in [1, 2, 7, 31, 32, 33, t, t + 5] {
            check_sizes(
                s,
                Some(&windowed_mask(s, window, &[0, 4], &[3, 0])),
                &format!("window {window}, T={t}"),
            );
        }
    }
}

#[test]
fn sliding_windows_match_with_one_head_per_group_and_long_left_padding() {
    // G = 1 (a tile's rows are contiguous in q), and batch row 1 left-padded by 35 keys: its
    // fully masked queries cross a tile boundary, and the next ones start at key 35.
    let s = Sizes {
        nh: 2,
        nkv: 2,
        t: 70,
        tk: 70,
        d: 16,
        ..SMALL
    };
    for window in [1, 5, 20, 40] {
        check_sizes(
            s,
            Some(&windowed_mask(s, window, &[0, 35], &[9, 4])),
            &format!("G = 1, window {window}"),
        );
    }
}

#[test]
fn sliding_windows_match_with_cached_keys() {
    // 20 queries at positions 25..45 over 45 keys under a window of 8: keys before 18 are read by
    // no query, so their gradients are exactly zero (in the reference too).
    let s = Sizes {
        t: 20,
        tk: 45,
        d: 16,
        ..SMALL
    };
    let (window, first) = (8, 18);
    let mask = windowed_mask(s, window, &[0, 20], &[0, 0]);
    let [_, dk, dv] = check_sizes(s, Some(&mask), "window 8, T_k > T");
    let dk0 = dk.narrow(2, 0, first).unwrap();
    let dv0 = dv.narrow(1, 0, first).unwrap();
    assert!(flat(&dk0).iter().chain(&flat(&dv0)).all(|&x| x == 0.0));
    // One query (a decoding step) over the cache, with and without padding.
    let one = Sizes { t: 1, ..s };
    for window in [1, 8, 45, 60] {
        check_sizes(
            one,
            Some(&windowed_mask(one, window, &[0, 41], &[0, 0])),
            &format!("one query, window {window}"),
        );
    }
}

#[test]
fn keys_before_every_window_are_never_read() {
    // NaN in the keys and values no query sees (the first 18 of 45 under a window of 8 at
    // positions 25..45) leaves the fused op's context and gradients exactly as with finite
    // values there: the products skip those keys rather than zeroing their terms (0 · NaN is NaN).
    let s = Sizes {
        t: 20,
        tk: 45,
        d: 16,
        ..SMALL
    };
    let first = 18;
    let mask = windowed_mask(s, 8, &[0, 0], &[0, 0]);
    let run = |poison: bool| {
        let q = var(&[s.b, s.nh, s.t, s.d], 1, 1.5);
        let k = var(&[s.b, s.nkv, s.tk, s.d], 2, 1.5);
        let v = var(&[s.b, s.tk, s.nkv, s.d], 3, 1.0);
        if poison {
            let nan_k = Tensor::full(f32::NAN, (s.b, s.nkv, first, s.d), &Device::Cpu).unwrap();
            let nan_v = Tensor::full(f32::NAN, (s.b, first, s.nkv, s.d), &Device::Cpu).unwrap();
            k.set(
                &k.slice_assign(&[0..s.b, 0..s.nkv, 0..first, 0..s.d], &nan_k)
                    .unwrap(),
            )
            .unwrap();
            v.set(
                &v.slice_assign(&[0..s.b, 0..first, 0..s.nkv, 0..s.d], &nan_v)
                    .unwrap(),
            )
            .unwrap();
        }
        let out = attention_core(&q, &k, &v, Some(&mask), s.nkv).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        let dq = grads.get(q.as_tensor()).unwrap().clone();
        let dk = grads.get(k.as_tensor()).unwrap().clone();
        (flat(&out), flat(&dq), flat(&dk))
    };
    let (clean, poisoned) = (run(false), run(true));
    assert!(poisoned.0.iter().all(|x| x.is_finite()));
    assert_eq!(clean, poisoned);
}

#[test]
fn broadcast_masks_with_left_padding_match() {
    // One mask row for every query (no window can be expressed so): batch row 0 right-padded
    // by 5 keys, row 1 left-padded by 7, so its queries read keys from 7 on.
    let s = Sizes {
        t: 20,
        tk: 45,
        d: 16,
        ..SMALL
    };
    let mut m = vec![0f32; s.b * s.tk];
    m[s.tk - 5..s.tk].fill(f32::MIN);
    m[s.tk..s.tk + 7].fill(f32::MIN);
    let broadcast = Tensor::from_vec(m, (s.b, 1, 1, s.tk), &Device::Cpu).unwrap();
    check_sizes(s, Some(&broadcast), "broadcast left and right padding");
}

#[test]
fn causal_tiles_match_for_lengths_off_the_tile_size() {
    // Row tiles of 32 query positions: lengths that leave a partial last tile, or are shorter
    // than one tile.
    for t in [1, 5, 31, 33, 37, 64, 70] {
        let s = Sizes {
            t,
            tk: t,
            d: 16,
            ..SMALL
        };
        check_sizes(
            s,
            Some(&padded_causal_mask(s, &[0, 0], &[0, 0])),
            &format!("causal T={t}"),
        );
    }
}

#[test]
fn causal_tiles_match_with_left_and_right_padding() {
    // Batch row 0 right-padded by 9 keys, row 1 left-padded by 35 (its first 35 queries see
    // nothing and are uniform, across a tile boundary) and right-padded by 4.
    let s = Sizes {
        t: 70,
        tk: 70,
        d: 16,
        ..SMALL
    };
    let (left, right) = ([0, 35], [9, 4]);
    let [_, dk, dv] = check_sizes(
        s,
        Some(&padded_causal_mask(s, &left, &right)),
        "causal + left/right padding",
    );
    // Batch row 0's padded keys are never read: their gradients are exactly zero (in the
    // reference too, as their probabilities are exactly zero).
    let dk0 = dk
        .get(0)
        .unwrap()
        .narrow(1, s.tk - right[0], right[0])
        .unwrap();
    let dv0 = dv
        .get(0)
        .unwrap()
        .narrow(0, s.tk - right[0], right[0])
        .unwrap();
    assert!(flat(&dk0).iter().chain(&flat(&dv0)).all(|&x| x == 0.0));
}

#[test]
fn causal_tiles_match_with_more_keys_than_queries() {
    // 20 queries at positions 25..45 over 45 keys (a cached prefix), with padding.
    let s = Sizes {
        t: 20,
        tk: 45,
        d: 16,
        ..SMALL
    };
    check_sizes(
        s,
        Some(&padded_causal_mask(s, &[0, 3], &[6, 0])),
        "causal, T_k > T",
    );
    let mut m = vec![0f32; s.b * s.tk];
    m[s.tk - 5..s.tk].fill(f32::MIN);
    let broadcast = Tensor::from_vec(m, (s.b, 1, 1, s.tk), &Device::Cpu).unwrap();
    check_sizes(s, Some(&broadcast), "broadcast padding, T_k > T");
    check_sizes(s, None, "no mask, T_k > T");
}

#[test]
fn key_skipping_is_exact_for_masks_with_finite_values() {
    // An additive bias in [-4, 4) on a band (query i sees keys up to i + 5, so the visible ends
    // are not the causal ones), masked tails holding a mix of -1e30, f32::MIN and -inf, a visible
    // entry of -1e20 at the end of some rows (its probability underflows to 0 but it is not
    // masked), and in batch row 1 a fully masked row 40 of -1e30 and f32::MIN entries (it is
    // uniform over its -1e30 keys), which the fused op must treat as reading every key.
    let s = Sizes {
        t: 70,
        tk: 70,
        d: 16,
        ..SMALL
    };
    let bias = values(s.b * s.t * s.tk, 21);
    let pick = values(s.b * s.t * s.tk, 22);
    let mut m = vec![0f32; s.b * s.t * s.tk];
    for b in 0..s.b {
        for i in 0..s.t {
            for j in 0..s.tk {
                let at = (b * s.t + i) * s.tk + j;
                m[at] = if j <= i + 5 {
                    if j == i + 5 && i % 3 == 0 {
                        -1e20
                    } else {
                        bias[at] * 4.0
                    }
                } else if pick[at] < -0.3 {
                    -1e30
                } else if pick[at] < 0.3 {
                    f32::MIN
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
    }
    let row = &mut m[(s.t + 40) * s.tk..(s.t + 41) * s.tk];
    for (j, x) in row.iter_mut().enumerate() {
        *x = if j % 4 == 1 { -1e30 } else { f32::MIN };
    }
    let mask = Tensor::from_vec(m, (s.b, 1, s.t, s.tk), &Device::Cpu).unwrap();
    check_sizes(s, Some(&mask), "banded bias");
}

#[test]
fn fused_attention_matches_the_candle_ops_with_causal_and_padding_mask() {
    check_against_reference(Some(&causal_padding_mask()), "causal + padding");
}

#[test]
fn fused_attention_matches_the_candle_ops_with_broadcast_mask() {
    check_against_reference(Some(&broadcast_padding_mask()), "broadcast padding");
}

#[test]
fn fused_attention_matches_the_candle_ops_without_mask() {
    check_against_reference(None, "no mask");
}

#[test]
fn fully_masked_rows_are_uniform_as_in_masked_softmax() {
    // Batch row 1's queries 0 and 1 see no key: as in masked_softmax, every key weighs 1/T_k,
    // so the context is the mean of v over keys for each head.
    let q = var(&[B, NH, T, D_HEAD], 5, 1.0);
    let k = var(&[B, NKV, T, D_HEAD], 6, 1.0);
    let v = var(&[B, T, NKV, D_HEAD], 7, 1.0);
    let out = attention_core(&q, &k, &v, Some(&causal_padding_mask()), NKV).unwrap();
    let out = out.reshape((B, T, NH, D_HEAD)).unwrap();
    let mean_v = v.as_tensor().mean_keepdim(1).unwrap(); // [B, 1, n_kv, d]
    for h in 0..NH {
        let g = h / (NH / NKV);
        for t in 0..2 {
            let got = out.get(1).unwrap().get(t).unwrap().get(h).unwrap();
            let want = mean_v.get(1).unwrap().get(0).unwrap().get(g).unwrap();
            assert!(rel_diff(&got, &want) < 1e-5, "head {h} query {t}");
        }
    }
}

#[test]
fn other_dtypes_take_the_plain_ops() {
    let q = var(&[B, NH, T, D_HEAD], 8, 1.0);
    let k = var(&[B, NKV, T, D_HEAD], 9, 1.0);
    let v = var(&[B, T, NKV, D_HEAD], 10, 1.0);
    let mask = causal_padding_mask();
    let f32_out = attention_core(&q, &k, &v, Some(&mask), NKV).unwrap();
    let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let f64_out = attention_core(
        &to64(&q),
        &to64(&k),
        &to64(&v),
        Some(&mask.to_dtype(DType::F64).unwrap()),
        NKV,
    )
    .unwrap();
    assert_eq!(f64_out.dtype(), DType::F64);
    assert!(rel_diff(&f64_out.to_dtype(DType::F32).unwrap(), &f32_out) < 1e-5);
}

#[test]
fn non_contiguous_inputs_are_accepted() {
    // q given as a transposed view of [B, T, n_h, d], the layout RoPE's input has.
    let q_btd = var(&[B, T, NH, D_HEAD], 11, 1.0);
    let q = q_btd.as_tensor().transpose(1, 2).unwrap();
    let k = var(&[B, NKV, T, D_HEAD], 12, 1.0);
    let v = var(&[B, T, NKV, D_HEAD], 13, 1.0);
    let fused = attention_core(&q, &k, &v, None, NKV).unwrap();
    let plain = reference(&q.contiguous().unwrap(), &k, &v, None, NKV);
    assert!(rel_diff(&fused, &plain) <= 1e-5);
    let sum_f = fused.sum_all().unwrap().backward().unwrap();
    let sum_p = plain.sum_all().unwrap().backward().unwrap();
    let d = rel_diff(
        sum_f.get(q_btd.as_tensor()).unwrap(),
        sum_p.get(q_btd.as_tensor()).unwrap(),
    );
    assert!(d <= 1e-5, "dq through the transpose differs by {d}");
}

#[test]
fn bad_shapes_are_errors_naming_the_operand() {
    let z = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let (q, k, v) = (
        z(&[B, NH, T, D_HEAD]),
        z(&[B, NKV, T, D_HEAD]),
        z(&[B, T, NKV, D_HEAD]),
    );
    let err = |q: &Tensor, k: &Tensor, v: &Tensor, m: Option<&Tensor>, nkv: usize| {
        attention_core(q, k, v, m, nkv).unwrap_err().to_string()
    };
    let e = err(&z(&[B, T, NH * D_HEAD]), &k, &v, None, NKV);
    assert!(e.contains("q must be"), "{e}");
    let e = err(&q, &k, &v, None, 4);
    assert!(e.contains("not a multiple"), "{e}");
    let e = err(&q, &z(&[B, NKV, T, D_HEAD + 1]), &v, None, NKV);
    assert!(e.contains("k "), "{e}");
    // v in the transposed layout [B, n_kv, T_k, d] is refused, not misread.
    let e = err(&q, &k, &z(&[B, NKV, T, D_HEAD]), None, NKV);
    assert!(e.contains("v must be"), "{e}");
    let e = err(&q, &k, &v, Some(&z(&[B, 1, T, T + 1])), NKV);
    assert!(e.contains("mask must be"), "{e}");
    let e = err(&q, &k, &v, Some(&z(&[B, NH, T, T])), NKV);
    assert!(e.contains("mask must be"), "{e}");
    // The same checks guard the plain-ops path.
    let e = err(
        &q.to_dtype(DType::F64).unwrap(),
        &k.to_dtype(DType::F64).unwrap(),
        &z(&[B, NKV, T, D_HEAD]).to_dtype(DType::F64).unwrap(),
        None,
        NKV,
    );
    assert!(e.contains("v must be"), "{e}");
    // Sanity: the shapes above are otherwise fine.
    assert!(attention_core(&q, &k, &v, None, NKV).is_ok());
}

/// Timing probe (ignored, no assertion on time): forward + backward of the SmolLM2-135M shape
/// with the causal mask, under the settings `candle-peft`'s `tune_cpu_runtime` makes:
/// `MIMALLOC_PURGE_DELAY=-1 RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=1 cargo test --release
/// --test llama_attention attention_core_timing -- --ignored --nocapture` (add `CPU_CLOCK=1`
/// and `RAYON_NUM_THREADS=1` to compare work on a busy machine).
#[test]
#[ignore]
fn attention_core_timing() {
    let (b, nh, nkv, t, d) = (4, 9, 3, 128, 64);
    let q = var(&[b, nh, t, d], 31, 0.125);
    let k = var(&[b, nkv, t, d], 32, 1.0);
    let v = var(&[b, t, nkv, d], 33, 1.0);
    let mut m = vec![0f32; b * t * t];
    for (i, row) in m.chunks_exact_mut(t).enumerate() {
        row[i % t + 1..].fill(f32::MIN);
    }
    let mask = Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu).unwrap();
    let w = Tensor::from_vec(values(b * t * nh * d, 34), (b, t, nh * d), &Device::Cpu).unwrap();
    // The loss's own backward (the product with `w`, the sum, the gradient store), timed on a
    // leaf of the context's shape, is taken off the backward's time.
    let leaf = var(&[b, t, nh * d], 35, 1.0);
    // With `CPU_CLOCK` set, the process's CPU time instead of the wall clock: with one rayon
    // thread (no spinning workers) it is the work done, whatever else the machine runs.
    let cpu_clock = std::env::var_os("CPU_CLOCK").is_some();
    let cpu_ms = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
    };
    let time = |f: &dyn Fn()| {
        if cpu_clock {
            let c0 = cpu_ms();
            f();
            return cpu_ms() - c0;
        }
        let t0 = std::time::Instant::now();
        f();
        t0.elapsed().as_secs_f64() * 1e3
    };
    let fwd = || {
        time(&|| {
            attention_core(&q, &k, &v, Some(&mask), nkv).unwrap();
        })
    };
    let bwd = |x: &Tensor| {
        let loss = (x * &w).unwrap().sum_all().unwrap();
        time(&|| {
            loss.backward().unwrap();
        })
    };
    let out = attention_core(&q, &k, &v, Some(&mask), nkv).unwrap();
    let n = 100;
    let sample = |f: &dyn Fn() -> f64| {
        (0..5).for_each(|_| {
            f();
        });
        let mut ms: Vec<f64> = (0..n).map(|_| f()).collect();
        ms.sort_by(f64::total_cmp);
        (ms[0], ms[n / 4], ms[n / 2])
    };
    let f = sample(&fwd);
    let b_all = sample(&|| bwd(&out));
    let b_loss = sample(&|| bwd(leaf.as_tensor()));
    println!(
        "attention_core B={b} n_h={nh} n_kv={nkv} T={t} d={d} causal, {} threads, {} (min / lower quartile / median): forward {:.3} / {:.3} / {:.3} ms, backward {:.3} / {:.3} / {:.3} ms (of which the loss's own {:.3} / {:.3} / {:.3})",
        candle_core::utils::get_num_threads(),
        if cpu_clock { "CPU time" } else { "wall" },
        f.0,
        f.1,
        f.2,
        b_all.0,
        b_all.1,
        b_all.2,
        b_loss.0,
        b_loss.1,
        b_loss.2,
    );
}
