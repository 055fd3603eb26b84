//! Data-parallel training: `W` ranks (one process per GPU, or threads for a CPU run) each hold
//! the whole model and run their share of every optimiser step's micro-batches; then they sum
//! their gradients, so every rank applies the same update to the same adapters and the adapters
//! stay identical without ever being sent.
//!
//! ```text
//! micro-batches of step s, from the one seeded stream all ranks draw alike:
//!     b_0, b_1, …, b_{W·A−1}          (A = grad_accum; every rank draws all of them)
//! rank r trains on b_j for j ≡ r (mod W):   G_r = (1/A) Σ_{j≡r} ∇L(b_j),  ℓ_r = Σ_{j≡r} L(b_j)
//! all-reduce (sum, in the trainer's fixed var order):
//!     G = (1/W) Σ_r G_r,   loss(s) = (1/(W·A)) Σ_r ℓ_r,   tokens = Σ_r tokens_r
//! ```
//!
//! `G` is the mean gradient over `W·A` micro-batches, so `W` ranks with batch `b` train exactly
//! as one rank with batch `W·b` (when a micro-batch's loss is a mean over equally many terms, as
//! for classification; a causal-LM micro-batch's loss is a mean over its own target tokens, and
//! ranks are weighted equally, as PyTorch's DDP weights them). Clipping, AdamW and LoRA-Pro then
//! see the global `G` on every rank.
//!
//! The gradients travel as one flat f32 buffer (vars in order, a var without a gradient as zeros)
//! and the bookkeeping as one f64 buffer (which vars had a gradient on any rank, the loss sum and
//! the token count): two all-reduces per step, since at adapter sizes a collective costs its
//! latency more than its bytes. A var gets a gradient when any rank produced one.
//!
//! Only rank 0 evaluates, checkpoints and reports progress; the others wait for it at the next
//! all-reduce. [`ThreadGroup`] runs ranks as threads of one process (the CPU reference the tests
//! check against a single rank); `train::nccl` runs them as processes over NCCL (feature `nccl`).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{PeftError, Result};

/// How the ranks of a data-parallel run add up their numbers.
pub trait Collective {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// The element-wise sum of `t` over all ranks. Every rank calls it in the same order with a
    /// tensor of the same shape and dtype; the result is on `t`'s device.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Tells the other ranks that this one stopped with an error, so that their next (or
    /// current) all-reduce returns an error instead of waiting for it forever. The default does
    /// nothing: for process groups whose launcher stops every rank when one fails (as
    /// `candle-peft train --world-size` does for NCCL).
    fn abort(&self) {}
}

/// Ranks as threads of one process: [`ThreadGroup::ranks`] hands out one [`ThreadRank`] per
/// thread. The sum is taken in rank order, so every rank gets the same bits.
#[derive(Debug)]
pub struct ThreadGroup;

impl ThreadGroup {
    /// `world_size` ranks, `ranks[r]` for the thread that runs rank `r`.
    pub fn ranks(world_size: usize) -> Result<Vec<ThreadRank>> {
        if world_size == 0 {
            return Err(PeftError::config("world_size", "must be ≥ 1"));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                slots: vec![None; world_size],
                arrived: 0,
                generation: 0,
                aborted_by: None,
            }),
            turn: Condvar::new(),
        });
        Ok((0..world_size)
            .map(|rank| ThreadRank {
                rank,
                world_size,
                shared: Arc::clone(&shared),
            })
            .collect())
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    turn: Condvar,
}

/// What the ranks share: each rank's tensor, and a barrier that a failed rank can break
/// (`std::sync::Barrier` cannot be, so one failed rank would leave the others waiting forever).
#[derive(Debug)]
struct State {
    slots: Vec<Option<Tensor>>,
    /// Ranks waiting at the barrier of this generation.
    arrived: usize,
    /// How many times every rank has arrived.
    generation: u64,
    /// The rank that stopped with an error, if one did.
    aborted_by: Option<usize>,
}

/// One rank of a [`ThreadGroup`].
#[derive(Debug, Clone)]
pub struct ThreadRank {
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
}

impl ThreadRank {
    fn state(&self) -> Result<MutexGuard<'_, State>> {
        self.shared
            .state
            .lock()
            .map_err(|_| PeftError::Unsupported("a rank of the thread group panicked".into()))
    }

    fn aborted(rank: usize) -> PeftError {
        PeftError::Unsupported(format!("all-reduce: rank {rank} stopped with an error"))
    }

    /// Waits until every rank has arrived, or fails when a rank aborted first.
    fn barrier(&self) -> Result<()> {
        let mut state = self.state()?;
        if let Some(r) = state.aborted_by {
            return Err(Self::aborted(r));
        }
        state.arrived += 1;
        if state.arrived == self.world_size {
            state.arrived = 0;
            state.generation += 1;
            self.shared.turn.notify_all();
            return Ok(());
        }
        let generation = state.generation;
        while state.generation == generation {
            if let Some(r) = state.aborted_by {
                return Err(Self::aborted(r));
            }
            state = self.shared.turn.wait(state).map_err(|_| {
                PeftError::Unsupported("a rank of the thread group panicked".into())
            })?;
        }
        Ok(())
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.state()?.slots[self.rank] = Some(t.detach());
        self.barrier()?;
        let sum = self.sum_slots(t);
        // Nobody may overwrite a slot before every rank has read them all, failed or not.
        self.barrier()?;
        sum
    }

    fn abort(&self) {
        // A poisoned lock means a rank panicked: the waiting ranks fail on the lock already.
        if let Ok(mut state) = self.shared.state.lock() {
            state.aborted_by.get_or_insert(self.rank);
            self.shared.turn.notify_all();
        }
    }
}

impl ThreadRank {
    /// The slots' sum in rank order, checked against this rank's `t`.
    fn sum_slots(&self, t: &Tensor) -> Result<Tensor> {
        let state = self.state()?;
        let mut sum: Option<Tensor> = None;
        for (r, slot) in state.slots.iter().enumerate() {
            let x = slot.as_ref().ok_or_else(|| {
                PeftError::Unsupported(format!("rank {r} left no tensor in the all-reduce"))
            })?;
            if x.shape() != t.shape() || x.dtype() != t.dtype() {
                return Err(PeftError::ShapeMismatch {
                    key: format!("all-reduce: rank {r}'s tensor ({:?})", x.dtype()),
                    expected: t.dims().to_vec(),
                    got: x.dims().to_vec(),
                });
            }
            let x = x.to_device(t.device())?;
            sum = Some(match sum {
                Some(s) => (s + x)?,
                None => x,
            });
        }
        sum.ok_or_else(|| PeftError::config("world_size", "must be ≥ 1"))
    }
}

/// Sets every rank's `vars` to rank 0's (a sum in which the other ranks add zeros, exact in
/// f32): ranks whose adapters were initialised apart, by a seed or a calibration pass that is
/// not bit-reproducible across devices, start the same.
pub(super) fn broadcast_from_rank0(ranks: &dyn Collective, vars: &[(String, Var)]) -> Result<()> {
    if vars.is_empty() {
        return Ok(());
    }
    let flat = vars
        .iter()
        .map(|(_, v)| {
            let t = v.as_tensor().to_dtype(DType::F32)?.flatten_all()?;
            Ok(if ranks.rank() == 0 {
                t
            } else {
                t.zeros_like()?
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let flat = ranks.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
    let mut offset = 0;
    for (_, var) in vars {
        let n = var.as_tensor().elem_count();
        let value = flat
            .narrow(0, offset, n)?
            .reshape(var.as_tensor().shape())?
            .to_dtype(var.dtype())?;
        var.set(&value)?;
        offset += n;
    }
    Ok(())
}

/// One step's gradients and bookkeeping after the all-reduce: `(G, loss sum, tokens)` as the
/// module docs define them, with the loss sum over `W·A` micro-batches divided by `W`.
pub(super) fn all_reduce_step(
    ranks: &dyn Collective,
    vars: &[(String, Var)],
    mut grads: GradStore,
    loss_sum: f64,
    tokens: usize,
) -> Result<(GradStore, f64, usize)> {
    let world = ranks.world_size() as f64;
    let device = match vars.first() {
        Some((_, v)) => v.device().clone(),
        None => return Ok((grads, loss_sum, tokens)),
    };
    let mut flat = Vec::with_capacity(vars.len());
    let mut book = Vec::with_capacity(vars.len() + 2);
    for (_, var) in vars {
        let g = match grads.get(var.as_tensor()) {
            Some(g) => {
                book.push(1.0);
                g.to_dtype(DType::F32)?
            }
            None => {
                book.push(0.0);
                var.as_tensor().zeros_like()?.to_dtype(DType::F32)?
            }
        };
        flat.push(g.flatten_all()?);
    }
    book.push(loss_sum);
    book.push(tokens as f64);
    let flat = ranks.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
    let book = ranks
        .all_reduce_sum(&Tensor::new(book.as_slice(), &device)?)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let mut offset = 0;
    for (i, (_, var)) in vars.iter().enumerate() {
        let n = var.as_tensor().elem_count();
        if book[i] > 0.0 {
            let g = (flat
                .narrow(0, offset, n)?
                .reshape(var.as_tensor().shape())?
                / world)?
                .to_dtype(var.dtype())?;
            grads.insert(var.as_tensor(), g);
        } else {
            grads.remove(var.as_tensor());
        }
        offset += n;
    }
    let n = vars.len();
    Ok((grads, book[n] / world, book[n + 1].round() as usize))
}
