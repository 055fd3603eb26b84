//! What the fused decoder-layer blocks (`attn_block`, `mlp_block`) share: the layers' frozen
//! operands with their LoRA factors packed into one operand, and RMSNorm on rows of values.
//!
//! A block op has two inputs, the hidden state and the pack: the flattened factors
//! `A₀, B₀, A₁, B₁, …` of the layers that have a LoRA delta, concatenated (candle's `cat`
//! splits the pack's gradient back onto the vars). A block without any delta gets a one-value
//! placeholder that tracks no gradient.
//!
//! RMSNorm over rows of width `H` with weight `γ`: `r = 1/√(mean(x²) + ε)`, `n = x r γ`;
//! backward `dx = r (g' − x̂ mean(g' ⊙ x̂))`, `g' = dn ⊙ γ`, `x̂ = x r` (as `norm`'s RMS norm,
//! whose accumulation in f64 it shares so the fused and separate paths agree).

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use super::blocks::zeros;
use super::frozen_weight::FrozenWeight;
use super::linear_lora::{LinearValues, LoraValues};
use super::slices::f32_slice;
use crate::error::Result;

/// Rows per rayon task in the element-wise passes: small inputs stay on one thread.
pub(crate) const ROWS_PER_TASK: usize = 16;

/// A linear layer's operands for a fused op: what `LayerHandle::fused_parts` gathers.
#[derive(Clone, Debug)]
pub(crate) struct FusedLinearParts {
    /// `W: [out, in]`, frozen, in its stored type.
    pub(crate) weight: FrozenWeight,
    /// `b: [out]`, frozen.
    pub(crate) bias: Option<Tensor>,
    /// `(A: [r, in], B: [out, r], s)`, the trainable vars and the scaling.
    pub(crate) lora: Option<(Tensor, Tensor, f64)>,
}

/// Where one layer's factors sit in the pack.
#[derive(Clone, Copy, Debug)]
struct PackSlot {
    a_start: usize,
    b_start: usize,
    rank: usize,
    scaling: f32,
}

/// A layer of a block: its frozen operands and its slot in the pack.
struct BlockLinear {
    name: &'static str,
    weight: FrozenWeight,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
    slot: Option<PackSlot>,
}

/// A block's layers, in pack order.
pub(crate) struct BlockLayers {
    op: &'static str,
    layers: Vec<BlockLinear>,
    pack_len: usize,
}

impl BlockLayers {
    /// The layers (`(name, parts)`, each `W: [out, in]`) and their pack, or `None` when a
    /// layer's operands do not fit its `(out, in)`; the separate ops then report the mismatch
    /// with the layer's name.
    pub(crate) fn new(
        op: &'static str,
        parts: Vec<(&'static str, FusedLinearParts, (usize, usize))>,
        device: &candle_core::Device,
    ) -> Result<Option<(Self, Tensor)>> {
        let mut layers = Vec::with_capacity(parts.len());
        let mut pieces = Vec::new();
        let mut offset = 0;
        for (name, p, (out_features, in_features)) in parts {
            if p.weight.dims() != [out_features, in_features]
                || p.bias.as_ref().is_some_and(|b| b.dims() != [out_features])
            {
                return Ok(None);
            }
            let slot = match &p.lora {
                Some((a, b, scaling)) => {
                    let rank = a.dim(0)?;
                    if a.dims() != [rank, in_features] || b.dims() != [out_features, rank] {
                        return Ok(None);
                    }
                    let slot = PackSlot {
                        a_start: offset,
                        b_start: offset + a.elem_count(),
                        rank,
                        scaling: *scaling as f32,
                    };
                    offset += a.elem_count() + b.elem_count();
                    pieces.push(a.flatten_all()?);
                    pieces.push(b.flatten_all()?);
                    Some(slot)
                }
                None => None,
            };
            layers.push(BlockLinear {
                name,
                weight: match p.weight {
                    FrozenWeight::Dense(w) => FrozenWeight::Dense(w.contiguous()?.detach()),
                    quantized => quantized,
                },
                bias: p
                    .bias
                    .map(|b| b.contiguous().map(|b| b.detach()))
                    .transpose()?,
                out_features,
                in_features,
                slot,
            });
        }
        let pack = if pieces.is_empty() {
            Tensor::zeros(1, DType::F32, device)?
        } else {
            Tensor::cat(&pieces, 0)?
        };
        Ok(Some((
            Self {
                op,
                layers,
                pack_len: offset,
            },
            pack,
        )))
    }

    /// Whether the block has trainable factors (else the pack is a placeholder).
    pub(crate) fn has_factors(&self) -> bool {
        self.pack_len > 0
    }

    /// Checks the pack operand's length.
    pub(crate) fn check_pack(&self, pack: &[f32]) -> candle_core::Result<()> {
        if pack.len() != self.pack_len.max(1) {
            candle_core::bail!(
                "{}: LoRA pack of {} values, expected {}",
                self.op,
                pack.len(),
                self.pack_len
            );
        }
        Ok(())
    }

    /// Runs `f` with the layers as values, their factors read from `pack`.
    pub(crate) fn with_linears<R>(
        &self,
        pack: &[f32],
        f: impl FnOnce(&[LinearValues<'_>]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        self.check_pack(pack)?;
        let weights = self
            .layers
            .iter()
            .map(|l| l.weight.values())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let biases: Vec<_> = self
            .layers
            .iter()
            .map(|l| l.bias.as_ref().map(|b| b.storage_and_layout()))
            .collect();
        let mut linears = Vec::with_capacity(self.layers.len());
        for ((layer, w_values), bias) in self.layers.iter().zip(&weights).zip(&biases) {
            let bias = match bias {
                Some((b_storage, b_layout)) => {
                    let Storage::Cpu(b) = &**b_storage else {
                        candle_core::bail!("{}: {} bias is not on the CPU", self.op, layer.name);
                    };
                    Some(f32_slice(self.op, layer.name, b, b_layout)?)
                }
                None => None,
            };
            let (out_f, in_f) = (layer.out_features, layer.in_features);
            linears.push(LinearValues {
                weight: w_values.matrix(self.op, layer.name, (out_f, in_f))?,
                out_features: out_f,
                in_features: in_f,
                bias,
                lora: layer.slot.map(|slot| LoraValues {
                    a: &pack[slot.a_start..slot.a_start + slot.rank * in_f],
                    b: &pack[slot.b_start..slot.b_start + out_f * slot.rank],
                    rank: slot.rank,
                    scaling: slot.scaling,
                }),
            });
        }
        f(&linears)
    }

    /// Writes layer `index`'s factor gradients (if it has factors) into the pack's gradient.
    pub(crate) fn put_grads(
        &self,
        dpack: &mut [f32],
        index: usize,
        grads: Option<(Vec<f32>, Vec<f32>)>,
    ) -> candle_core::Result<()> {
        let slot = self.layers.get(index).and_then(|l| l.slot);
        if let (Some(slot), Some((ga, gb))) = (slot, grads) {
            let (a_end, b_end) = (slot.a_start + ga.len(), slot.b_start + gb.len());
            if a_end > dpack.len() || b_end > dpack.len() {
                candle_core::bail!("{}: factor gradients overrun the pack", self.op);
            }
            dpack[slot.a_start..a_end].copy_from_slice(&ga);
            dpack[slot.b_start..b_end].copy_from_slice(&gb);
        }
        Ok(())
    }

    /// `dL/d(input)` of the layers that all read `input` (the block's normed hidden state), from
    /// each one's output gradient as `(index, dL/dy)`; their factor gradients go into `dpack`.
    /// Without `need_input` only the factor gradients are computed (the products `g W` that
    /// only `dL/d(input)` needs are skipped) and the returned vector is empty.
    pub(crate) fn shared_input_backward(
        &self,
        linears: &[LinearValues<'_>],
        dpack: &mut [f32],
        input: &[f32],
        rows: usize,
        output_grads: &[(usize, &[f32])],
        need_input: bool,
    ) -> candle_core::Result<Vec<f32>> {
        let mut dinput = if need_input {
            zeros(input.len())
        } else {
            Vec::new()
        };
        for (n, &(index, dout)) in output_grads.iter().enumerate() {
            let Some(layer) = linears.get(index) else {
                candle_core::bail!("{}: no layer {index}", self.op);
            };
            let grads = if need_input {
                layer.backward(input, dout, rows, &mut dinput, n > 0)?
            } else {
                layer.factor_grads(input, dout, rows)?
            };
            self.put_grads(dpack, index, grads)?;
        }
        Ok(dinput)
    }

    /// The pack's gradient as a tensor shaped like `pack`, or none for a placeholder.
    pub(crate) fn pack_grad(
        &self,
        dpack: Vec<f32>,
        pack: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.has_factors()
            .then(|| Tensor::from_vec(dpack, pack.shape(), pack.device()))
            .transpose()
    }
}

/// RMSNorm of the rows of `x` (width `gamma.len()`): `(n, r)`.
pub(crate) fn rms_forward(x: &[f32], gamma: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    let width = gamma.len().max(1);
    let mut normed = vec![0f32; x.len()];
    let mut inv_rms = vec![0f32; x.len() / width];
    normed
        .par_chunks_exact_mut(width)
        .zip(inv_rms.par_iter_mut())
        .zip(x.par_chunks_exact(width))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((dst, r), row)| {
            let mean_sq = row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                / width as f64;
            *r = (1.0 / (mean_sq + eps).sqrt()) as f32;
            for ((d, &v), &g) in dst.iter_mut().zip(row).zip(gamma) {
                *d = v * *r * g;
            }
        });
    (normed, inv_rms)
}

/// The RMSNorm backward plus a residual gradient: `dn` (the normed rows' gradient) becomes
/// `dresidual + dL/dx` in place.
pub(crate) fn rms_backward_into(
    dn: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    inv_rms: &[f32],
    dresidual: &[f32],
) {
    let width = gamma.len().max(1);
    dn.par_chunks_exact_mut(width)
        .zip(x.par_chunks_exact(width))
        .zip(dresidual.par_chunks_exact(width))
        .zip(inv_rms.par_iter())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(((dn, row), dres), &r)| {
            let proj = dn
                .iter()
                .zip(row)
                .zip(gamma)
                .map(|((&d, &x), &g)| f64::from(d * g) * f64::from(x * r))
                .sum::<f64>()
                / width as f64;
            let proj = proj as f32;
            for (((d, &x), &g), &o) in dn.iter_mut().zip(row).zip(gamma).zip(dres) {
                *d = o + r * (*d * g - x * r * proj);
            }
        });
}

/// `y += x`, elementwise, on rayon's threads.
pub(crate) fn add_into(y: &mut [f32], x: &[f32]) {
    const CHUNK: usize = 16 * 1024;
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y += x));
}
