//! Frozen base-layer ops whose backward returns only `dL/dx`.
//!
//! candle's `matmul` backward always computes the gradient of both operands, so a frozen weight
//! still costs a weight-sized gradient in every backward pass (the whole model's worth for LoRA).
//! These custom ops compute the same forward on candle's backend storage (CPU, and CUDA with
//! `--features cuda`) and give backward only the input gradient.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};

use super::blocks::zeros;
use super::frozen_weight::FrozenWeight;
use super::gemm::Threads;
use super::slices::f32_slice;

/// `(b, m, n, k)` of candle's storage matmul, the layouts of `x` and `Wᵀ`, and the output shape.
type MatmulPlan = ((usize, usize, usize, usize), Layout, Layout, Shape);

/// `y = x · Wᵀ + b` for `x: [.., in]`, `W: [out, in]`, `b: [out]`, with no gradient for `W` or
/// `b`. The bias is added inside the op: as a separate broadcast add, candle's backward would
/// give the frozen bias an activation-sized gradient.
struct FrozenMatmul {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenMatmul {
    /// `(m, n, k)` of the 2-D product and the output shape, for an input laid out as `layout`.
    fn dims(&self, layout: &Layout) -> candle_core::Result<(usize, usize, usize, Shape)> {
        let (out_f, in_f) = self.weight.dims2()?;
        let dims = layout.dims();
        let Some((&last, lead)) = dims.split_last() else {
            candle_core::bail!("frozen-matmul: scalar input");
        };
        if last != in_f {
            candle_core::bail!(
                "frozen-matmul: input has {last} features, the weight expects {in_f}"
            );
        }
        let m: usize = lead.iter().product();
        let mut out_dims = lead.to_vec();
        out_dims.push(out_f);
        Ok((m, out_f, in_f, Shape::from(out_dims)))
    }

    fn layouts(&self, layout: &Layout, weight_layout: &Layout) -> candle_core::Result<MatmulPlan> {
        let (m, n, k, out_shape) = self.dims(layout)?;
        if !layout.is_contiguous() {
            candle_core::bail!("frozen-matmul: input must be contiguous");
        }
        let x_layout = Layout::contiguous_with_offset((m, k), layout.start_offset());
        // Wᵀ as a strided view of W's storage: no copy.
        let wt_layout = weight_layout.transpose(0, 1)?;
        Ok(((1, m, n, k), x_layout, wt_layout, out_shape))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("frozen-matmul: weight is not on the CPU");
        };
        let (bmnk, x_layout, wt_layout, out_shape) = self.layouts(layout, w_layout)?;
        let mut y = x.matmul(w, bmnk, &x_layout, &wt_layout)?;
        if let Some(bias) = &self.bias {
            add_bias_rows(&mut y, bias)?;
        }
        Ok((y, out_shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cuda(w) = &*w_storage else {
            candle_core::bail!("frozen-matmul: weight is not on the GPU");
        };
        let (bmnk, x_layout, wt_layout, out_shape) = self.layouts(layout, w_layout)?;
        let y = x.matmul(w, bmnk, &x_layout, &wt_layout)?;
        let Some(bias) = &self.bias else {
            return Ok((y, out_shape));
        };
        let y = Tensor::from_storage(
            Storage::Cuda(y),
            out_shape.clone(),
            candle_core::op::BackpropOp::none(),
            false,
        )
        .broadcast_add(bias)?;
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cuda(y) = &*storage else {
            candle_core::bail!("frozen-matmul: output left the GPU");
        };
        Ok((crate::kernels::cuda::cuda_contiguous(y, layout)?, out_shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (out_f, _) = self.weight.dims2()?;
        let grad_2d = grad_y.reshape(((), out_f))?;
        let grad_x = grad_2d.matmul(&self.weight)?.reshape(x.shape())?;
        Ok(Some(grad_x))
    }
}

/// `x · Wᵀ (+ b)` with a frozen `W: [out, in]` and `b: [out]`; `x: [.., in]` of the same dtype
/// and device.
pub fn frozen_matmul(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let weight = weight.contiguous()?.detach();
    let bias = match bias {
        Some(b) => Some(b.to_dtype(weight.dtype())?.contiguous()?.detach()),
        None => None,
    };
    x.contiguous()?.apply_op1(FrozenMatmul { weight, bias })
}

/// `x · Wᵀ (+ b)` with `W` in its stored type. A dense weight of the input's dtype takes
/// [`frozen_matmul`]; on the CPU, an f32 input with a bf16, f16 or quantized weight reads the
/// weight tile by tile (`kernels::lowp`) and stays f32, in the forward and in `dL/dx = g·W`.
/// Elsewhere (another device) a dense weight runs in its own dtype, the input converted to it
/// and the output back, and a quantized one is an error naming its type.
pub fn frozen_matmul_weight(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if let FrozenWeight::Dense(w) = weight
        && w.dtype() == x.dtype()
    {
        return frozen_matmul(x, w, bias);
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && weight.is_cpu_matrix() {
        let bias = match bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.contiguous()?.detach()),
            None => None,
        };
        return x.contiguous()?.apply_op1(StoredMatmul {
            weight: weight.clone(),
            bias,
        });
    }
    match weight {
        FrozenWeight::Dense(w) => {
            frozen_matmul(&x.to_dtype(w.dtype())?, w, bias)?.to_dtype(x.dtype())
        }
        FrozenWeight::Quantized(_) => candle_core::bail!(
            "frozen-matmul: a {} weight is read on the CPU with an f32 input, got a {:?} input on {:?}",
            weight.type_name(),
            x.dtype(),
            x.device()
        ),
    }
}

/// `x Wᵀ + b` with `W` read in its stored type: f32 in and out.
struct StoredMatmul {
    weight: FrozenWeight,
    bias: Option<Tensor>,
}

/// `g W` (the input gradient of [`StoredMatmul`]).
struct StoredMatmulGrad {
    weight: FrozenWeight,
}

/// `(rows of x, W's (out, in), the output shape)` for `x: [.., in]`; `out_last` picks the
/// output's last dim (`out` for `x Wᵀ`, `in` for `g W`).
fn stored_plan(
    op: &str,
    weight: &FrozenWeight,
    layout: &Layout,
    transposed: bool,
) -> candle_core::Result<(usize, (usize, usize), Shape)> {
    let &[out_f, in_f] = weight.dims() else {
        candle_core::bail!("{op}: the weight is not 2-D: {:?}", weight.dims());
    };
    let (reduce, keep) = if transposed {
        (in_f, out_f)
    } else {
        (out_f, in_f)
    };
    let dims = layout.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("{op}: scalar input");
    };
    if last != reduce {
        candle_core::bail!("{op}: input has {last} features, the weight expects {reduce}");
    }
    let mut out_dims = lead.to_vec();
    out_dims.push(keep);
    Ok((lead.iter().product(), (out_f, in_f), Shape::from(out_dims)))
}

impl CustomOp1 for StoredMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul-stored"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (m, (out_f, in_f), shape) = stored_plan(op, &self.weight, layout, true)?;
        let x = f32_slice(op, "the input", x, layout)?;
        let mut y = zeros(m * out_f);
        let guard = self.weight.values()?;
        let w = guard.matrix(op, "the weight", (out_f, in_f))?;
        w.xwt(op, &mut y, x, m, 0..out_f, false, Threads::Candle)?;
        let mut y = CpuStorage::F32(y);
        if let Some(bias) = &self.bias {
            add_bias_rows(&mut y, bias)?;
        }
        Ok((y, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_y.detach().contiguous()?.apply_op1(StoredMatmulGrad {
            weight: self.weight.clone(),
        })?;
        Ok(Some(grad))
    }
}

impl CustomOp1 for StoredMatmulGrad {
    fn name(&self) -> &'static str {
        "frozen-matmul-stored-grad"
    }

    fn cpu_fwd(&self, g: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (m, (out_f, in_f), shape) = stored_plan(op, &self.weight, layout, false)?;
        let g = f32_slice(op, "the output gradient", g, layout)?;
        let mut dx = zeros(m * in_f);
        let guard = self.weight.values()?;
        let w = guard.matrix(op, "the weight", (out_f, in_f))?;
        w.gw(op, &mut dx, g, m, 0..out_f, false, Threads::Candle)?;
        Ok((CpuStorage::F32(dx), shape))
    }
}

/// Adds `bias` to every row of the CPU matrix `y`, in place.
fn add_bias_rows(y: &mut CpuStorage, bias: &Tensor) -> candle_core::Result<()> {
    fn add<T: Copy + std::ops::AddAssign>(y: &mut [T], b: &[T]) {
        for row in y.chunks_exact_mut(b.len()) {
            for (v, &c) in row.iter_mut().zip(b) {
                *v += c;
            }
        }
    }
    let (storage, layout) = bias.storage_and_layout();
    let (Storage::Cpu(b), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        candle_core::bail!("frozen-matmul: the bias must be a contiguous CPU tensor");
    };
    match (y, b) {
        (CpuStorage::F32(y), CpuStorage::F32(b)) => add(y, &b[start..end]),
        (CpuStorage::F64(y), CpuStorage::F64(b)) => add(y, &b[start..end]),
        (CpuStorage::F16(y), CpuStorage::F16(b)) => add(y, &b[start..end]),
        (CpuStorage::BF16(y), CpuStorage::BF16(b)) => add(y, &b[start..end]),
        _ => candle_core::bail!("frozen-matmul: the bias dtype differs from the output's"),
    }
    Ok(())
}

/// A 2-D convolution with a frozen kernel: backward gives only `dL/dx`.
struct FrozenConv2d {
    kernel: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
}

impl FrozenConv2d {
    /// The forward on a detached copy of the input: no graph is recorded inside the op.
    fn forward_detached(&self, x: Tensor) -> candle_core::Result<(Storage, Shape)> {
        let y = x.conv2d(
            &self.kernel,
            self.padding,
            self.stride,
            self.dilation,
            self.groups,
        )?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            None => y,
        }
        .contiguous()?;
        let shape = y.shape().clone();
        let (storage, layout) = y.storage_and_layout();
        let offset = layout.start_offset();
        if offset != 0 {
            candle_core::bail!("frozen-conv2d: unexpected output offset {offset}");
        }
        let storage = match &*storage {
            Storage::Cpu(s) => Storage::Cpu(s.clone()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Storage::Cuda(crate::kernels::cuda::cuda_contiguous(s, layout)?),
            _ => candle_core::bail!("frozen-conv2d: unsupported device"),
        };
        Ok((storage, shape))
    }
}

impl CustomOp1 for FrozenConv2d {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = storage_tensor(Storage::Cpu(x.clone()), layout)?;
        match self.forward_detached(x)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("frozen-conv2d: output left the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let x = storage_tensor(
            Storage::Cuda(crate::kernels::cuda::cuda_contiguous(x, layout)?),
            &Layout::contiguous(layout.shape()),
        )?;
        match self.forward_detached(x)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("frozen-conv2d: output left the GPU"),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (_, _, k_h, k_w) = self.kernel.dims4()?;
        let (_, _, in_h, in_w) = x.dims4()?;
        let (_, _, grad_h, grad_w) = grad_y.dims4()?;
        // conv_transpose2d is the adjoint of conv2d; its output_padding (< stride) extends the
        // output to the input's size, and the extra rows get their true gradient (they may be
        // read through the conv's own padding, so they are not necessarily zero). candle takes
        // one output_padding for both axes: use the larger one and cut the other axis back.
        let covered = |g: usize, k: usize| {
            (g - 1) * self.stride + self.dilation * (k - 1) + 1 - 2 * self.padding
        };
        let pad_h = in_h - covered(grad_h, k_h);
        let pad_w = in_w - covered(grad_w, k_w);
        let out_padding = pad_h.max(pad_w);
        let transpose = |g: &Tensor, k: &Tensor| {
            g.contiguous()?.conv_transpose2d(
                &k.contiguous()?,
                self.padding,
                out_padding,
                self.stride,
                self.dilation,
            )
        };
        let grad_x = if self.groups == 1 {
            transpose(grad_y, &self.kernel)?
        } else {
            let grads = grad_y.chunk(self.groups, 1)?;
            let kernels = self.kernel.chunk(self.groups, 0)?;
            let parts = grads
                .iter()
                .zip(kernels.iter())
                .map(|(g, k)| transpose(g, k))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&parts, 1)?
        };
        let grad_x = grad_x.narrow(2, 0, in_h)?.narrow(3, 0, in_w)?;
        Ok(Some(grad_x))
    }
}

/// `conv2d(x, K)` with candle's differentiable op, for trainable kernels (LoRA's `A`, a
/// `modules_to_save` copy). candle's conv2d backward derives one `output_padding` from the
/// height and uses it for both axes, so it fails (shape mismatch) when striding leaves a
/// different remainder on the two axes (e.g. 10×7 input, 3×3 kernel, stride 2, padding 1).
/// Appending zero rows or columns at the bottom or right equalises the remainders without
/// changing the output: the added zeros sit where the conv's own zero padding was, and the
/// output size stays the same because the remainder stays below the stride.
pub fn conv2d_trainable(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, in_h, in_w) = x.dims4()?;
    let (_, _, k_h, k_w) = kernel.dims4()?;
    let remainder = |n: usize, k: usize| {
        (n + 2 * padding)
            .checked_sub(dilation * (k - 1) + 1)
            .map(|v| v % stride)
    };
    let x = match (remainder(in_h, k_h), remainder(in_w, k_w)) {
        (Some(rh), Some(rw)) if rh < rw => x.pad_with_zeros(2, 0, rw - rh)?,
        (Some(rh), Some(rw)) if rw < rh => x.pad_with_zeros(3, 0, rh - rw)?,
        _ => x.clone(),
    };
    x.conv2d(kernel, padding, stride, dilation, groups)
}

/// A graph-free tensor over a contiguous copy of `storage` laid out as `layout`.
fn storage_tensor(storage: Storage, layout: &Layout) -> candle_core::Result<Tensor> {
    let t = Tensor::from_storage(
        storage,
        layout.shape().clone(),
        candle_core::op::BackpropOp::none(),
        false,
    );
    if layout.is_contiguous() && layout.start_offset() == 0 {
        return Ok(t);
    }
    candle_core::bail!("frozen-conv2d: input must be contiguous")
}

/// `conv2d(x, K) (+ b)` with a frozen kernel `K: [out, in/groups, kh, kw]` and bias `b: [out]`.
#[allow(clippy::too_many_arguments)]
pub fn frozen_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    let op = FrozenConv2d {
        kernel: kernel.contiguous()?.detach(),
        bias: match bias {
            Some(b) => Some(b.to_dtype(kernel.dtype())?.detach()),
            None => None,
        },
        padding,
        stride,
        dilation,
        groups,
    };
    // The op reads the input storage from offset 0: give it a tensor of its own.
    let x = if x.is_contiguous() && x.layout().start_offset() == 0 {
        x.clone()
    } else {
        x.force_contiguous()?
    };
    x.apply_op1(op)
}
