//! GeGLU with the tanh GELU, `y = gelu_tanh(g) ⊙ u`, as one op with an exact backward (Gemma
//! 3's MLP is `down(gelu_tanh(gate) ⊙ up)`).
//!
//! `gelu_tanh(x) = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))`, PyTorch's
//! `gelu(approximate="tanh")` and candle's `Tensor::gelu`. With `a(x) = 2√(2/π)(x + 0.044715x³)`
//! and `½(1 + tanh(z)) = σ(2z)`, it is `x·s` with `s = σ(a(x)) = 1/(1 + e^(−a))`:
//!
//! ```text
//! forward   y  = g·s·u
//! backward  du = dy·g·s
//!           dg = dy·u·(s + g·s(1 − s)·a'(g)),   a'(x) = 2√(2/π)(1 + 3·0.044715x²)
//! ```
//!
//! with `1 − s = 1/(1 + 1/e)`, `e = e^(−a)`, so both tails stay accurate and free of `0·∞`
//! (`e = 0` gives `s = 1`, `1 − s = 0`; `e = ∞` gives `s = 0`, `1 − s = 1`). `|x| > 100` is
//! clamped to 100 inside `a`: `s` is exactly 0 or 1 from well below there, and `x³` would
//! overflow for `|x| > 10¹³`.
//!
//! Accuracy: within a few ulp of the formula evaluated in f64, except that the rounding of
//! `a(x)` (a few ulp of `|a|`) carries into `s` relatively in the negative tail: up to
//! `~2e-7·|a|` relative, e.g. 3e-6 at `x = −5.3` where `y ≈ −5e-8`. Against candle's f32
//! `Tensor::gelu` (the same formula through libm's `tanh`, whose `1 + tanh` cancels for
//! `x ≲ −3`), the measured gap on `[-12, 12]` is at most `2.3e-7·max(1, |y|)`, two ulp near
//! `y = 1` (`matches_candle_gelu_closely` asserts `3e-7`).
//!
//! Why a kernel: `gate.gelu()? * up` in candle ops is a pass per elementary op each way (the
//! backward of `gelu` alone builds a cube, a tanh and a dozen temporaries); this is one pass
//! forward and one backward. The loops are plain Rust with `fast_exp`'s branch-free `exp`,
//! compiled twice (`simd_kernel!`): baseline x86-64 and AVX2 + FMA, chosen at run time. Other
//! devices and dtypes take `gate.gelu()? * up` in plain (differentiable) candle ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::blocks::{collect_block_pairs, collect_blocks};
use super::fast_exp;
use super::rope::fused;
use super::simd::simd_kernel;
use super::slices::f32_slice;
use crate::error::Result;

/// `2√(2/π)`: `a(x) = A·(x + C·x³)`.
const A: f32 = 1.595_769;
/// The cubic coefficient of the tanh approximation.
const C: f32 = 0.044_715;
/// `|x|` above which `s` is exactly 0 or 1 in f32 (`|a(x)|` is far past `exp`'s range); the
/// argument of `a` is clamped to it so `x³` cannot overflow.
const SATURATED: f32 = 100.0;

/// `(s, 1 − s)` at `x`: `s = σ(a(x))`, each accurate in its own tail.
#[inline(always)]
fn sigmoid_pair(x: f32) -> (f32, f32) {
    let xc = x.clamp(-SATURATED, SATURATED);
    let e = fast_exp::exp(-A * (xc + C * xc * xc * xc));
    (1.0 / (1.0 + e), 1.0 / (1.0 + 1.0 / e))
}

/// `y = gelu_tanh(g)·u` over a block: the body of [`geglu_block`] for every target.
#[inline(always)]
fn geglu_generic(y: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
        let (s, _) = sigmoid_pair(g);
        *y = g * s * u;
    }
}

/// `dg = dy·u·gelu_tanh'(g)`, `du = dy·gelu_tanh(g)` over a block: the body of
/// [`geglu_grad_block`] for every target.
#[inline(always)]
fn geglu_grad_generic(dg: &mut [f32], du: &mut [f32], gate: &[f32], up: &[f32], dy: &[f32]) {
    let blocks = dg
        .iter_mut()
        .zip(du.iter_mut())
        .zip(gate.iter().zip(up).zip(dy));
    for ((dg, du), ((&g, &u), &dy)) in blocks {
        let (s, one_minus_s) = sigmoid_pair(g);
        let gc = g.clamp(-SATURATED, SATURATED);
        let slope = A * (1.0 + 3.0 * C * gc * gc);
        *du = dy * g * s;
        *dg = dy * u * (s + gc * s * one_minus_s * slope);
    }
}

simd_kernel! {
    /// [`geglu_generic`], AVX2 + FMA where the CPU has them.
    fn geglu_block(y: &mut [f32], gate: &[f32], up: &[f32]) {
        geglu_generic(y, gate, up)
    }
}

simd_kernel! {
    /// [`geglu_grad_generic`], AVX2 + FMA where the CPU has them.
    fn geglu_grad_block(dg: &mut [f32], du: &mut [f32], gate: &[f32], up: &[f32], dy: &[f32]) {
        geglu_grad_generic(dg, du, gate, up, dy)
    }
}

struct GeGlu;

impl CustomOp2 for GeGlu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("geglu: gate {:?} vs up {:?}", l1.dims(), l2.dims());
        }
        let gate = f32_slice(self.name(), "gate", s1, l1)?;
        let up = f32_slice(self.name(), "up", s2, l2)?;
        let out = collect_blocks(gate.len(), |start, dst| {
            let end = start + dst.len();
            geglu_block(dst, &gate[start..end], &up[start..end]);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &GeGluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// `(dg, du)` of GeGLU stacked as `[2, ..]`.
struct GeGluGrad;

impl CustomOp3 for GeGluGrad {
    fn name(&self) -> &'static str {
        "geglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            candle_core::bail!(
                "geglu-grad: shapes {:?}, {:?}, {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let gate = f32_slice(self.name(), "gate", s1, l1)?;
        let up = f32_slice(self.name(), "up", s2, l2)?;
        let grad = f32_slice(self.name(), "the gradient", s3, l3)?;
        let out = collect_block_pairs(gate.len(), |start, dgb, dub| {
            let end = start + dgb.len();
            let (gb, ub, dyb) = (&gate[start..end], &up[start..end], &grad[start..end]);
            geglu_grad_block(dgb, dub, gb, ub, dyb);
        });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `gelu_tanh(gate) ⊙ up` (GeGLU with the tanh GELU, as Gemma 3's MLP uses it), differentiable
/// in both. One fused op on the CPU in f32, `gate.gelu()? * up` otherwise; shapes must match.
pub fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !(fused(gate) && fused(up)) {
        return Ok((gate.gelu()? * up)?);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, GeGlu)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::kernels::simd::has_avx2_fma;
    use crate::kernels::test_values::grid_values;

    /// `gelu_tanh(x)` in f64, with `½(1 + tanh z) = 1/(1 + e^(−2z))`: the formula as it
    /// reads cancels in `1 + tanh z` below `x ≈ −6` even in f64 (checked against it in
    /// `the_f64_reference_is_the_formula`).
    fn gelu_f64(x: f64) -> f64 {
        let z = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
        x / (1.0 + (-2.0 * z).exp())
    }

    /// `gelu_tanh'(x)`, differentiated by hand from the tanh form, with `½(1 + t) = s` and
    /// `½(1 − t²) = 2s(1 − s)`, `s = 1/(1 + e^(−2z))`, in f64; and the sum of its two terms'
    /// magnitudes, the scale of f32's rounding (they cancel near the minimum of gelu, x ≈ −0.75).
    fn gelu_grad_f64(x: f64) -> (f64, f64) {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let z = k * (x + 0.044715 * x * x * x);
        let (s, one_minus_s) = (
            1.0 / (1.0 + (-2.0 * z).exp()),
            1.0 / (1.0 + (2.0 * z).exp()),
        );
        let second = x * 2.0 * s * one_minus_s * k * (1.0 + 3.0 * 0.044715 * x * x);
        (s + second, s + second.abs())
    }

    #[test]
    fn the_f64_reference_is_the_formula() {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        for i in -1200..=1200 {
            let x = f64::from(i) * 1e-2;
            let literal = 0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh());
            let diff = (gelu_f64(x) - literal).abs();
            assert!(diff <= 1e-15 * x.abs().max(1.0), "at {x}: {diff}");
        }
    }

    /// Gates covering zero (both signs), the smooth middle, the tails where `tanh` saturates in
    /// f32 (|x| ≳ 5 from below, ≳ 10 from above), past the clamp and near f32's limits.
    fn gates() -> Vec<f32> {
        let mut g = vec![
            0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-4, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 4.5,
            -4.5, 5.0, -5.0, 7.5, -7.5, 10.0, -10.0, 15.0, -15.0, 30.0, -30.0, 99.0, -99.0, 100.0,
            -100.0, 1e4, -1e4, 1e20, -1e20, 3e38, -3e38,
        ];
        g.extend(grid_values(200, 7).iter().map(|x| x * 6.0));
        g
    }

    /// A forward block kernel, `(y, gate, up)`.
    type Forward = fn(&mut [f32], &[f32], &[f32]);
    /// A backward block kernel, `(dg, du, gate, up, dy)`.
    type Backward = fn(&mut [f32], &mut [f32], &[f32], &[f32], &[f32]);

    /// `(y, dg, du)` of one path for `gates()`, `up` and `dy`.
    fn run(fwd: Forward, bwd: Backward, gate: &[f32], up: &[f32], dy: &[f32]) -> [Vec<f32>; 3] {
        let n = gate.len();
        let (mut y, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        fwd(&mut y, gate, up);
        bwd(&mut dg, &mut du, gate, up, dy);
        [y, dg, du]
    }

    #[test]
    fn both_paths_match_the_f64_formula() {
        let gate = gates();
        let n = gate.len();
        let up: Vec<f32> = grid_values(n, 8).iter().map(|u| u + 1.5).collect();
        let dy = grid_values(n, 9);
        // The baseline body, and the dispatched copy (AVX2 + FMA on a CPU that has them).
        println!("AVX2 + FMA: {}", has_avx2_fma());
        for (label, fwd, bwd) in [
            (
                "baseline",
                geglu_generic as Forward,
                geglu_grad_generic as Backward,
            ),
            ("dispatched", geglu_block, geglu_grad_block),
        ] {
            let [y, dg, du] = run(fwd, bwd, &gate, &up, &dy);
            for i in 0..n {
                let (g, u, d) = (f64::from(gate[i]), f64::from(up[i]), f64::from(dy[i]));
                let (gelu, slope) = (gelu_f64(g), gelu_grad_f64(g));
                // A few ulp, plus the rounding of `a(g)` (a few ulp of |a|, up to ~88 where `s`
                // is still a normal f32), which `s = σ(a)` carries over relatively in the
                // negative tail; 1e-36 absolute where `s` leaves f32's normal range.
                let a = 2.0 * (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g);
                let tolerance = 2e-7 * (2.0 + a.abs().min(100.0));
                let cases = [
                    ("y", y[i], gelu * u, gelu * u),
                    ("dg", dg[i], d * u * slope.0, d * u * slope.1),
                    ("du", du[i], d * gelu, d * gelu),
                ];
                for (name, got, want, scale) in cases {
                    if want.is_finite() && want.abs() < f64::from(f32::MAX) {
                        let diff = (f64::from(got) - want).abs();
                        assert!(
                            diff <= tolerance * scale.abs() + 1e-36,
                            "{label} {name} at g = {g}: {got} against {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_gradient_matches_a_central_difference() {
        // dg at up = dy = 1 against (gelu(x + h) − gelu(x − h)) / 2h of the f64 formula: checks
        // the kernel's derivative against the function itself, not a second hand derivation.
        let gate: Vec<f32> = gates().into_iter().filter(|g| g.abs() <= 100.0).collect();
        let n = gate.len();
        let ones = vec![1f32; n];
        let [_, dg, _] = run(geglu_block, geglu_grad_block, &gate, &ones, &ones);
        let h = 1e-5;
        for (&g, &got) in gate.iter().zip(&dg) {
            let x = f64::from(g);
            let fd = (gelu_f64(x + h) - gelu_f64(x - h)) / (2.0 * h);
            let diff = (f64::from(got) - fd).abs();
            assert!(
                diff <= 2e-6 * fd.abs().max(1.0),
                "at {g}: {got} against {fd}"
            );
        }
    }

    #[test]
    fn matches_candle_gelu_closely() {
        // Candle's f32 `gelu` is the same formula through libm's tanh, which loses relative
        // precision for x ≲ −3 (1 + tanh cancels). The gap on [-12, 12], in units of
        // max(1, |gelu|), measured 2.3e-7 (two ulp near gelu = 1); the module docs state it.
        let x: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 * 1e-3).collect();
        let n = x.len();
        let ones = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        let xt = Tensor::from_vec(x.clone(), n, &Device::Cpu).unwrap();
        let xs = x;
        let fused = geglu(&xt, &ones).unwrap();
        let plain = xt.gelu().unwrap();
        let flat = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        let (f, p) = (flat(&fused), flat(&plain));
        let mut worst = (0f32, 0f32, 0f32);
        for ((&a, &b), &x) in f.iter().zip(&p).zip(&xs) {
            let gap = (a - b).abs() / b.abs().max(1.0);
            if gap > worst.0 {
                worst = (gap, x, a - b);
            }
        }
        println!("max |geglu − candle gelu| / max(1, |gelu|) on [-12, 12]: {worst:?}");
        assert!(worst.0 <= 3e-7, "{worst:?}");
    }

    #[test]
    fn backward_matches_the_plain_ops_autograd() {
        // Candle's gelu backward rounds its constants to six digits: agreement to 1e-5 of the
        // largest gradient. Gates up to |x| = 100 (past that candle's x³·(1 − tanh²) is ∞·0).
        let gate: Vec<f32> = gates().into_iter().filter(|g| g.abs() <= 100.0).collect();
        let n = gate.len();
        let g = Var::from_vec(gate, n, &Device::Cpu).unwrap();
        let u = Var::from_vec(grid_values(n, 10), n, &Device::Cpu).unwrap();
        let w = Tensor::from_vec(grid_values(n, 11), n, &Device::Cpu).unwrap();
        let fused = geglu(&g, &u).unwrap();
        let plain = (g.as_tensor().gelu().unwrap() * u.as_tensor()).unwrap();
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
        for (name, v) in [("gate", &g), ("up", &u)] {
            let (a, b) = (
                gf.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
            );
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let gap = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(gap <= 1e-5 * scale, "d{name}: {gap} of {scale}");
        }
    }

    #[test]
    fn other_dtypes_take_the_plain_ops_and_shapes_must_match() {
        let g = Tensor::from_vec(grid_values(24, 12), (4, 6), &Device::Cpu).unwrap();
        let u = Tensor::from_vec(grid_values(24, 13), (4, 6), &Device::Cpu).unwrap();
        let (g64, u64) = (
            g.to_dtype(DType::F64).unwrap(),
            u.to_dtype(DType::F64).unwrap(),
        );
        let out = geglu(&g64, &u64).unwrap();
        assert_eq!(out.dtype(), DType::F64);
        let want = (g64.gelu().unwrap() * &u64).unwrap();
        let same = out
            .eq(&want)
            .unwrap()
            .min_all()
            .unwrap()
            .to_scalar::<u8>()
            .unwrap();
        assert_eq!(same, 1);
        let e = geglu(&g, &u.reshape((6, 4)).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("geglu"), "{e}");
    }
}
