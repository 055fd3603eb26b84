//! Ranks as processes, one per GPU, summing through NCCL (candle's `nccl` feature, cudarc's
//! bindings): the [`super::Collective`] a multi-GPU run uses.
//!
//! Rank 0 makes a [`NcclId`] and hands it to the others out of band (the CLI passes it in an
//! environment variable to the processes it spawns); every rank then calls [`NcclRank::join`]
//! with its CUDA device, which blocks until all `world_size` ranks have joined. The all-reduce
//! runs on candle's own stream of that device, so it is ordered after the backward pass that
//! produced the gradients without an extra synchronisation.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CudaStorage, Device, InplaceOp1, Layout, Tensor};

use super::parallel::Collective;
use crate::error::{PeftError, Result};

/// NCCL's rendezvous token: 128 bytes that rank 0 makes and every rank joins with.
#[derive(Debug, Clone, Copy)]
pub struct NcclId(Id);

impl NcclId {
    /// A fresh id (rank 0 makes it once per run).
    pub fn new() -> Result<Self> {
        Id::new()
            .map(Self)
            .map_err(|e| PeftError::Unsupported(format!("NCCL: creating the unique id: {e:?}")))
    }

    /// The id as 256 hex digits, to pass to the other ranks.
    pub fn to_hex(&self) -> String {
        self.0
            .internal()
            .iter()
            .map(|&b| format!("{:02x}", b as u8))
            .collect()
    }

    /// The id back from [`NcclId::to_hex`]; the error names what is wrong with `hex`.
    pub fn from_hex(hex: &str) -> Result<Self> {
        let hex = hex.trim();
        if hex.len() != 256 {
            return Err(PeftError::config(
                "nccl id",
                format!("expected 256 hex digits, got {}", hex.len()),
            ));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (i, byte) in internal.iter_mut().enumerate() {
            let digits = &hex[2 * i..2 * i + 2];
            *byte = u8::from_str_radix(digits, 16).map_err(|_| {
                PeftError::config("nccl id", format!("`{digits}` at {} is not hex", 2 * i))
            })? as std::ffi::c_char;
        }
        Ok(Self(Id::uninit(internal)))
    }
}

/// This process's rank in an NCCL group.
#[derive(Debug)]
pub struct NcclRank {
    comm: Comm,
}

impl NcclRank {
    /// Joins the group of `world_size` ranks that `id` names as `rank`, on `device` (a CUDA
    /// device; each rank its own GPU). Blocks until every rank has joined.
    pub fn join(device: &Device, rank: usize, world_size: usize, id: NcclId) -> Result<Self> {
        if rank >= world_size {
            return Err(PeftError::config(
                "rank",
                format!("{rank} is not below the world size {world_size}"),
            ));
        }
        let Device::Cuda(cuda) = device else {
            return Err(PeftError::Unsupported(format!(
                "NCCL needs a CUDA device, got {device:?}"
            )));
        };
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world_size, id.0).map_err(|e| {
            PeftError::Unsupported(format!(
                "NCCL: rank {rank} of {world_size} could not join: {e:?}"
            ))
        })?;
        Ok(Self { comm })
    }
}

impl Collective for NcclRank {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        // A fresh contiguous copy: the sum is taken in place in it.
        let out = t.detach().copy()?;
        out.inplace_op1(&SumInPlace { comm: &self.comm })?;
        Ok(out)
    }
}

/// NCCL's in-place sum over a contiguous CUDA buffer.
struct SumInPlace<'a> {
    comm: &'a Comm,
}

impl InplaceOp1 for SumInPlace<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("the NCCL all-reduce needs a CUDA tensor, got a CPU one")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor")
        };
        let failed = |e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}"));
        match storage.dtype() {
            candle_core::DType::F32 => {
                let slice = storage.as_cuda_slice_mut::<f32>()?;
                let mut view = slice.slice_mut(start..end);
                self.comm
                    .all_reduce_in_place(&mut view, &ReduceOp::Sum)
                    .map_err(failed)?;
            }
            candle_core::DType::F64 => {
                let slice = storage.as_cuda_slice_mut::<f64>()?;
                let mut view = slice.slice_mut(start..end);
                self.comm
                    .all_reduce_in_place(&mut view, &ReduceOp::Sum)
                    .map_err(failed)?;
            }
            other => candle_core::bail!("the NCCL all-reduce sums f32 and f64, not {other:?}"),
        }
        Ok(())
    }
}
