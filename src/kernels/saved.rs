//! A two-input CPU f32 op that keeps the activations its backward reads.
//!
//! The fused decoder blocks (`attn_block`, `mlp_block`) each take the hidden state and one
//! packed operand (see `block_layers`), and their backward needs intermediate activations of the
//! forward. Recomputing them would repeat most of the forward; the graph would hold them anyway
//! as the inputs of separate ops. So the forward hands them to the op, the first backward takes
//! them (freeing them as it goes), and any later backward over the same graph recomputes them.
//!
//! A block implements [`SavingKernel`] on values; [`SavingOp`] is the candle op around it: the
//! slice access, the saved-activation slot and the gradient tensors.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::block_layers::BlockLayers;
use super::slices::{f32_slice, with_values};

/// The math of a two-input op on CPU f32 values: input `x` (the output has its shape) and a
/// second operand `pack`.
pub(crate) trait SavingKernel: Send + Sync {
    /// What the forward keeps for the backward.
    type Saved: Send;

    /// The op's name, for candle and for errors.
    const NAME: &'static str;

    /// The output for `x` and `pack`, and what the backward needs.
    fn forward(&self, x: &[f32], pack: &[f32]) -> candle_core::Result<(Vec<f32>, Self::Saved)>;

    /// `(dL/dx, dL/dpack)` for the output gradient `dout`, from the kept activations. Without
    /// `need_dx` (`x` tracks no gradient: the first layer's input) the kernel may skip the
    /// products that only `dL/dx` needs and return any `dL/dx`; it is dropped.
    fn backward(
        &self,
        x: &[f32],
        pack: &[f32],
        dout: &[f32],
        saved: Self::Saved,
        need_dx: bool,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>)>;

    /// The layers whose operands `pack` holds (they shape the pack's gradient).
    fn layers(&self) -> &BlockLayers;
}

/// The candle op of a [`SavingKernel`]: the forward's activations wait here for the backward.
pub(crate) struct SavingOp<K: SavingKernel> {
    kernel: K,
    saved: Mutex<Option<K::Saved>>,
}

impl<K: SavingKernel> SavingOp<K> {
    /// The op of `kernel`, with nothing saved yet.
    pub(crate) fn new(kernel: K) -> Self {
        Self {
            kernel,
            saved: Mutex::new(None),
        }
    }
}

impl<K: SavingKernel> CustomOp2 for SavingOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(K::NAME, "the input", xs, xl)?;
        let pack = f32_slice(K::NAME, "the LoRA pack", ps, pl)?;
        let (out, saved) = self.kernel.forward(x, pack)?;
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some(saved);
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        pack: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let need_dx = x.track_op();
        let (x, pack) = (x.detach().contiguous()?, pack.detach().contiguous()?);
        let grad = grad.detach().contiguous()?;
        let kept = self.saved.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (dx, dpack) = with_values(K::NAME, "the input", &x, |xv| {
            with_values(K::NAME, "the LoRA pack", &pack, |pv| {
                with_values(K::NAME, "the output gradient", &grad, |gv| {
                    let saved = match kept {
                        Some(saved) => saved,
                        None => self.kernel.forward(xv, pv)?.1,
                    };
                    self.kernel.backward(xv, pv, gv, saved, need_dx)
                })
            })
        })?;
        let dx = need_dx
            .then(|| Tensor::from_vec(dx, x.shape(), x.device()))
            .transpose()?;
        Ok((dx, self.kernel.layers().pack_grad(dpack, &pack)?))
    }
}
