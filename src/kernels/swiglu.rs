//! SwiGLU, `y = silu(g) ⊙ u`, as one op with an exact backward:
//! `dg = dy ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)))`, `du = dy ⊙ silu(g)`, both in one pass.
//!
//! `silu(g) * u` in candle ops takes a dozen passes through backward; this takes one each way.
//! Other devices and dtypes use the same math in plain (differentiable) candle ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::blocks::{collect_block_pairs, collect_blocks};
use super::rope::fused;
use super::simd::simd_kernel;
use super::slices::f32_slice;
use crate::error::Result;

/// `dst = e^(−g)` for a block of gates, by the vectorised `exp`.
fn exp_neg_block(gate: &[f32], dst: &mut [f32]) {
    for (d, &g) in dst.iter_mut().zip(gate) {
        *d = -g;
    }
    super::fast_exp::exp_shifted_in_place(dst, 0.0);
}

// With `e = e^(−g)`, `σ(g) = 1/(1 + e)`: `e = +∞` gives 0 and `e = 0` gives 1, so saturated
// gates need no branch.

simd_kernel! {
    /// `y = g·u·σ(g)` over a block, `y` holding `e^(−g)` on entry.
    fn swiglu_block(y: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
            *y = g * u / (1.0 + *y);
        }
    }
}

simd_kernel! {
    /// `dg = dy·u·σ(1 + g(1 − σ))`, `du = dy·g·σ` over a block, `dg` holding `e^(−g)` on entry.
    fn swiglu_grad_block(dg: &mut [f32], du: &mut [f32], gate: &[f32], up: &[f32], dy: &[f32]) {
        let blocks = dg.iter_mut().zip(du.iter_mut()).zip(gate.iter().zip(up).zip(dy));
        for ((dg, du), ((&g, &u), &dy)) in blocks {
            let sigmoid = 1.0 / (1.0 + *dg);
            let silu = g * sigmoid;
            *du = dy * silu;
            *dg = dy * u * (sigmoid + silu * (1.0 - sigmoid));
        }
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "llama-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("llama-swiglu: gate {:?} vs up {:?}", l1.dims(), l2.dims());
        }
        let gate = f32_slice(self.name(), "gate", s1, l1)?;
        let up = f32_slice(self.name(), "up", s2, l2)?;
        let out = collect_blocks(gate.len(), |start, dst| {
            let end = start + dst.len();
            let (gb, ub) = (&gate[start..end], &up[start..end]);
            exp_neg_block(gb, dst);
            swiglu_block(dst, gb, ub);
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
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// `(dg, du)` of SwiGLU stacked as `[2, ..]`.
struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "llama-swiglu-grad"
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
                "llama-swiglu-grad: shapes {:?}, {:?}, {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let gate = f32_slice(self.name(), "gate", s1, l1)?;
        let up = f32_slice(self.name(), "up", s2, l2)?;
        let grad = f32_slice(self.name(), "the gradient", s3, l3)?;
        let n = gate.len();
        let out = collect_block_pairs(n, |start, dgb, dub| {
            let end = start + dgb.len();
            let (gb, ub, dyb) = (&gate[start..end], &up[start..end], &grad[start..end]);
            exp_neg_block(gb, dgb);
            swiglu_grad_block(dgb, dub, gb, ub, dyb);
        });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `silu(gate) ⊙ up`, differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !(fused(gate) && fused(up)) {
        return Ok((gate.silu()? * up)?);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::kernels::test_values::{grid_values as values, max_diff};

    #[test]
    fn swiglu_matches_the_plain_ops_forward_and_backward() {
        let shape = (3, 4, 10);
        let gate = Var::from_vec(values(120, 3), shape, &Device::Cpu).unwrap();
        let up = Var::from_vec(values(120, 4), shape, &Device::Cpu).unwrap();
        let fused = swiglu(&gate, &up).unwrap();
        let plain = (gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-6);
        let w = Tensor::from_vec(values(120, 5), shape, &Device::Cpu).unwrap();
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
        for v in [&gate, &up] {
            let d = max_diff(
                gf.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-6, "{d}");
        }
    }

    /// SwiGLU timings (ignored): `CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=2 cargo test --release
    /// --lib kernels::swiglu::tests::swiglu_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn swiglu_timing() {
        let shape = (512, 1536);
        let n = 512 * 1536;
        let gate = Tensor::from_vec(values(n, 6), shape, &Device::Cpu).unwrap();
        let gate = (gate * 4.0).unwrap();
        let up = Tensor::from_vec(values(n, 7), shape, &Device::Cpu).unwrap();
        let dy = Tensor::from_vec(values(n, 8), shape, &Device::Cpu).unwrap();
        let best_of = |f: &dyn Fn()| {
            (0..50)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed()
                })
                .min()
                .unwrap()
        };
        let y = gate.apply_op2_no_bwd(&up, &SwiGlu).unwrap();
        let fwd = best_of(&|| {
            std::hint::black_box(gate.apply_op2_no_bwd(&up, &SwiGlu).unwrap());
        });
        let bwd = best_of(&|| {
            std::hint::black_box(SwiGlu.bwd(&gate, &up, &y, &dy).unwrap());
        });
        println!("SwiGLU [512, 1536]: forward {fwd:?}, backward {bwd:?}");
    }
}
