//! Incremental PCA: sklearn's `IncrementalPCA.partial_fit` as Hugging Face PEFT ports it for
//! EVA, in f64 on the CPU, with PEFT's randomised `svd_lowrank` or the exact SVD.
//!
//! Per batch `X: [N, in]`: running mean `μ` and variance `σ²` (Chan's parallel update), then the
//! SVD of `X − μ` (first batch) or of `[diag(S)·Vᵀ; X − mean(X); √(n·N/(n+N))·(μ_old − mean(X))]`;
//! `components = Vᵀ[:k]` with each row's largest-magnitude entry positive (sklearn's `svd_flip`),
//! `explained_variance_ratio = S² / Σ_j σ²_j·n`.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Precision, canonicalize_svd_signs, qr, thin_svd};
use crate::error::{PeftError, Result};

/// How [`IncrementalPca`] computes each SVD.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PcaSvd {
    /// The exact thin SVD.
    Exact,
    /// PEFT's `svd_lowrank`: `oversample` extra random directions (PEFT: q = 2k, i.e. k),
    /// `power_iters` subspace iterations (PEFT: 4), seeded; the exact SVD when `k + oversample`
    /// reaches the smaller side of the matrix.
    LowRank {
        /// Random directions beyond the `k` components.
        oversample: usize,
        /// Subspace iterations after the first product.
        power_iters: usize,
        /// Seed of the Gaussian test matrix (the same matrix on every call).
        seed: u64,
    },
}

impl PcaSvd {
    /// PEFT's settings for `k` components.
    pub fn peft(k: usize) -> Self {
        PcaSvd::LowRank {
            oversample: k,
            power_iters: 4,
            seed: 42,
        }
    }
}

/// Incremental PCA (sklearn's `IncrementalPCA.partial_fit`, as PEFT ports it), in f64 on the CPU.
#[derive(Clone, Debug)]
pub struct IncrementalPca {
    n_components: usize,
    n_features: usize,
    svd: PcaSvd,
    n_seen: usize,
    mean: Option<Tensor>,
    var: Option<Tensor>,
    components: Option<Tensor>,
    singular_values: Option<Tensor>,
    explained_variance_ratio: Option<Tensor>,
}

impl IncrementalPca {
    /// `n_components ≤ n_features`.
    pub fn new(n_components: usize, n_features: usize, svd: PcaSvd) -> Result<Self> {
        if n_components == 0 || n_components > n_features {
            return Err(PeftError::config(
                "n_components",
                format!("must be in 1..={n_features} (the input features), got {n_components}"),
            ));
        }
        Ok(Self {
            n_components,
            n_features,
            svd,
            n_seen: 0,
            mean: None,
            var: None,
            components: None,
            singular_values: None,
            explained_variance_ratio: None,
        })
    }

    /// The components kept, `k`.
    pub fn n_components(&self) -> usize {
        self.n_components
    }

    /// The width of the input rows, `in`.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Rows fitted so far, over every batch.
    pub fn n_samples_seen(&self) -> usize {
        self.n_seen
    }

    /// `[k, in]` f64: the principal directions, one per row, strongest first.
    pub fn components(&self) -> Option<&Tensor> {
        self.components.as_ref()
    }

    /// `[k]` f64.
    pub fn singular_values(&self) -> Option<&Tensor> {
        self.singular_values.as_ref()
    }

    /// `[k]` f64: each component's share of the total variance.
    pub fn explained_variance_ratio(&self) -> Option<&Tensor> {
        self.explained_variance_ratio.as_ref()
    }

    /// `[in]` f64: the mean of every row seen.
    pub fn mean(&self) -> Option<&Tensor> {
        self.mean.as_ref()
    }

    /// Updates the fit with the rows of `x: [N, in]` (any float dtype and device), `N ≥ k`.
    pub fn partial_fit(&mut self, x: &Tensor) -> Result<()> {
        let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let (n, d) = x.dims2()?;
        if d != self.n_features {
            return Err(PeftError::ShapeMismatch {
                key: "incremental PCA batch".into(),
                expected: vec![n, self.n_features],
                got: vec![n, d],
            });
        }
        if n < self.n_components {
            return Err(PeftError::config(
                "incremental PCA batch",
                format!(
                    "{n} rows is fewer than the {} components",
                    self.n_components
                ),
            ));
        }
        let seen = self.n_seen as f64;
        let total = seen + n as f64;
        let nf = n as f64;
        // Chan et al.'s parallel update of the mean and the (biased) variance.
        let new_sum = x.sum(0)?;
        let last_sum = match &self.mean {
            Some(m) => (m * seen)?,
            None => Tensor::zeros(d, DType::F64, &Device::Cpu)?,
        };
        let mean = ((&last_sum + &new_sum)? / total)?;
        let batch_mean = (&new_sum / nf)?;
        let centred = x.broadcast_sub(&batch_mean)?;
        let new_unnormalized = centred.sqr()?.sum(0)?;
        let var = match &self.var {
            None => (new_unnormalized / total)?,
            Some(v) => {
                let last_over_new = seen / nf;
                let cross = ((&last_sum / last_over_new)? - &new_sum)?.sqr()?;
                let updated = ((v * seen)? + new_unnormalized)?;
                ((updated + (cross * (last_over_new / total))?)? / total)?
            }
        };
        let stacked = match (&self.components, &self.singular_values, &self.mean) {
            (Some(c), Some(s), Some(old_mean)) => {
                let scaled = c.broadcast_mul(&s.unsqueeze(1)?)?;
                let correction = ((old_mean - &batch_mean)? * (seen * nf / total).sqrt())?;
                Tensor::cat(&[scaled, centred, correction.unsqueeze(0)?], 0)?
            }
            _ => x.broadcast_sub(&mean)?,
        };
        let k = self.n_components;
        let (s, v) = match self.svd {
            PcaSvd::Exact => {
                let svd = thin_svd(&stacked, Precision::F64)?;
                (svd.s, svd.v)
            }
            PcaSvd::LowRank {
                oversample,
                power_iters,
                seed,
            } => svd_lowrank(&stacked, k + oversample, power_iters, seed)?,
        };
        // sklearn's svd_flip on V: the largest-magnitude entry of each component is positive,
        // which keeps a component's sign stable from batch to batch (U's rows are the batch's).
        let (v, _) = canonicalize_svd_signs(&v, &v)?;
        let components = v.narrow(1, 0, k)?.t()?.contiguous()?;
        let s = s.narrow(0, 0, k)?;
        let total_var = (&var * total)?.sum_all()?.to_scalar::<f64>()?;
        let ratio = if total_var > 0.0 {
            (s.sqr()? / total_var)?
        } else {
            s.zeros_like()?
        };
        self.n_seen += n;
        self.mean = Some(mean);
        self.var = Some(var);
        self.components = Some(components);
        self.singular_values = Some(s);
        self.explained_variance_ratio = Some(ratio);
        Ok(())
    }
}

/// torch's `svd_lowrank(a, q, niter)` as PEFT's IPCA calls it: a Gaussian test matrix (seeded,
/// so every call draws the same one, as PEFT's `fork_rng` + `manual_seed` does), `niter` subspace
/// iterations re-orthonormalised after every product, then the SVD of the small `Qᵀ a`. A fixed
/// amount of work, approximate for the trailing triplets; [`super::truncated_svd`] instead
/// iterates to convergence or falls back to the exact SVD, which on the flat spectra of layer
/// inputs costs more than the exact SVD alone. Returns `(S [q], V [n, q])`; the exact thin SVD
/// when `q` reaches `min(m, n)`.
fn svd_lowrank(a: &Tensor, q: usize, niter: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let (m, n) = a.dims2()?;
    if q >= m.min(n) {
        let svd = thin_svd(a, Precision::F64)?;
        return Ok((svd.s, svd.v));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let omega: Vec<f64> = crate::init::normal(&mut rng, n * q, 1.0)
        .into_iter()
        .map(f64::from)
        .collect();
    let omega = Tensor::from_vec(omega, (n, q), a.device())?;
    let orthonormal = |x: Tensor| -> Result<Tensor> { Ok(qr(&x, Precision::F64)?.q) };
    let mut basis = orthonormal(a.matmul(&omega)?)?;
    for _ in 0..niter {
        let z = orthonormal(a.t()?.matmul(&basis)?)?;
        basis = orthonormal(a.matmul(&z)?)?;
    }
    let small = basis.t()?.matmul(a)?;
    let svd = thin_svd(&small, Precision::F64)?;
    Ok((svd.s, svd.v))
}
