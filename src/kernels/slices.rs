//! Access to a tensor's values as f32 slices, for the kernels.
//!
//! The fused kernels read CPU f32 operands in place: [`f32_slice`] on the storage a custom op
//! is given, [`with_values`] on a tensor it holds (the storage stays read-locked while `f`
//! runs). The element-wise ops also take other dtypes, converting them with [`f32_input`] and
//! converting the result back with [`output_storage`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Storage, Tensor};

/// The contiguous f32 values of a CPU storage under `layout`, or an error naming the op and the
/// operand (`what`).
pub(crate) fn f32_slice<'a>(
    op: &str,
    what: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("{op}: {what} must be f32, got {:?}", storage.dtype());
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// Runs `f` on the values of a contiguous CPU f32 tensor.
pub(crate) fn with_values<R>(
    op: &str,
    what: &str,
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: {what} is not on the CPU");
    };
    f(f32_slice(op, what, cpu, layout)?)
}

/// [`with_values`] for an optional tensor.
pub(crate) fn with_optional_values<R>(
    op: &str,
    what: &str,
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&[f32]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match t {
        Some(t) => with_values(op, what, t, |v| f(Some(v))),
        None => f(None),
    }
}

/// Runs `f` on the `len` f32 values of a (1-D) CPU weight, borrowed when it is contiguous f32
/// already (the usual case: no copy per call), converted otherwise.
pub(crate) fn with_f32_values<R>(
    op: &str,
    t: &Tensor,
    len: usize,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    if t.elem_count() != len {
        candle_core::bail!(
            "{op}: weight has {} elements, input rows {len}",
            t.elem_count()
        );
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return f(&v[start..end]);
        }
    }
    let values = t
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    f(&values)
}

/// [`with_f32_values`] for an optional weight.
pub(crate) fn with_optional_f32_values<R>(
    op: &str,
    t: Option<&Tensor>,
    len: usize,
    f: impl FnOnce(Option<&[f32]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match t {
        Some(t) => with_f32_values(op, t, len, |v| f(Some(v))),
        None => f(None),
    }
}

/// The input as contiguous f32 values: borrowed when it already is, converted otherwise.
pub(crate) fn f32_input<'a>(
    x: &'a CpuStorage,
    layout: &Layout,
    converted: &'a mut Option<CpuStorage>,
) -> candle_core::Result<&'a [f32]> {
    if let (CpuStorage::F32(data), Some((start, end))) = (x, layout.contiguous_offsets()) {
        return Ok(&data[start..end]);
    }
    let c = converted.insert(x.to_dtype(layout, DType::F32)?);
    match c {
        CpuStorage::F32(data) => Ok(data.as_slice()),
        _ => candle_core::bail!("fused op: conversion to f32 failed"),
    }
}

/// A backward's two operands as f32 slices: the tensor the forward saved (`saved`, its input or
/// output) and the incoming gradient `g`, which must have the saved tensor's shape (the shape is
/// returned). `cs`/`cg` hold conversions for operands that are not contiguous f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn grad_operands<'a>(
    op: &str,
    saved: &'a CpuStorage,
    saved_layout: &Layout,
    g: &'a CpuStorage,
    g_layout: &Layout,
    cs: &'a mut Option<CpuStorage>,
    cg: &'a mut Option<CpuStorage>,
) -> candle_core::Result<(Shape, &'a [f32], &'a [f32])> {
    let shape = saved_layout.shape().clone();
    if g_layout.shape() != &shape {
        candle_core::bail!("{op}: gradient {:?} vs {:?}", g_layout.shape(), shape);
    }
    Ok((
        shape,
        f32_input(saved, saved_layout, cs)?,
        f32_input(g, g_layout, cg)?,
    ))
}

/// The f32 result in the input's dtype.
pub(crate) fn output_storage(
    out: Vec<f32>,
    shape: &Shape,
    dtype: DType,
) -> candle_core::Result<CpuStorage> {
    let out = CpuStorage::F32(out);
    if dtype == DType::F32 {
        return Ok(out);
    }
    out.to_dtype(&Layout::contiguous(shape), dtype)
}
