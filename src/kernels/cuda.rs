//! The CUDA side of the element-wise ops: they run candle's tensor ops inside the op on
//! contiguous copies of their operands.

use candle_core::backend::BackendStorage;
use candle_core::{Layout, Shape, Tensor};

/// A contiguous copy, at offset 0, of the elements `layout` selects.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_contiguous(
    x: &candle_core::CudaStorage,
    layout: &Layout,
) -> candle_core::Result<candle_core::CudaStorage> {
    use candle_core::backend::BackendDevice;
    // SAFETY: every element of the fresh buffer is written by copy_strided_src below.
    let mut dst = unsafe { x.device().alloc_uninit(layout.shape(), x.dtype())? };
    x.copy_strided_src(&mut dst, 0, layout)?;
    Ok(dst)
}

#[cfg(feature = "cuda")]
pub(crate) fn cuda_tensor(
    x: &candle_core::CudaStorage,
    layout: &Layout,
) -> candle_core::Result<Tensor> {
    Ok(Tensor::from_storage(
        candle_core::Storage::Cuda(cuda_contiguous(x, layout)?),
        layout.shape().clone(),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

#[cfg(feature = "cuda")]
pub(crate) fn into_cuda(t: Tensor) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    let shape = t.shape().clone();
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        candle_core::bail!("fused op: result left the GPU");
    };
    Ok((cuda_contiguous(s, layout)?, shape))
}
