//! Thin, truncated and top-k SVD: faer's exact decomposition, randomised subspace iteration,
//! and the Gram-matrix route for energy rules.

use candle_core::{DType, Tensor};
use faer::{Mat, MatRef, Side};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Precision, Real, canonical_signs, dims2, ensure_finite, from_mat, from_vec, to_mat};
use crate::error::{PeftError, Result};

/// How an [`Svd`] was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvdMethod {
    /// faer's thin SVD.
    Exact,
    /// The eigendecomposition of the Gram matrix (see [`top_svd`]).
    Gram,
    /// Randomised subspace iteration that converged after this many power iterations.
    Randomized {
        /// Power iterations run.
        power_iters: usize,
    },
}

/// `A = U diag(S) Vᵀ` (see the module docs for shapes and the sign rule).
#[derive(Clone, Debug)]
pub struct Svd {
    /// `[m, k]`, orthonormal columns.
    pub u: Tensor,
    /// `[k]`, non-negative, non-increasing.
    pub s: Tensor,
    /// `[n, k]`, orthonormal columns.
    pub v: Tensor,
    /// The algorithm that produced it.
    pub method: SvdMethod,
}

/// Settings of the randomised [`truncated_svd`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TruncatedSvdOptions {
    /// The precision the decomposition runs in.
    pub precision: Precision,
    /// Extra random directions beyond the rank (Halko et al.'s `p`): the subspace has
    /// `l = max(rank + oversample, 2·rank)` columns (capped at `k`).
    pub oversample: usize,
    /// Most power (subspace) iterations. The iteration stops once the top singular values
    /// change by less than `tolerance` (relative to `σ₁`) from one iteration to the next;
    /// without convergence the exact decomposition is used.
    pub power_iters: usize,
    /// Convergence tolerance of the randomised iteration; `None` takes `10⁻¹⁰` in f64 and
    /// `10⁻⁵` in f32.
    pub tolerance: Option<f64>,
    /// Seed of the Gaussian test matrix: the result is deterministic.
    pub seed: u64,
    /// Use the randomised method only when the subspace has at most `k · max_fraction` columns;
    /// above that the exact decomposition is about as fast, and is used instead.
    pub max_fraction: f64,
}

impl Default for TruncatedSvdOptions {
    fn default() -> Self {
        Self {
            precision: Precision::F64,
            oversample: 10,
            power_iters: 24,
            tolerance: None,
            seed: 0,
            max_fraction: 0.125,
        }
    }
}

fn svd_error(what: &str, e: impl std::fmt::Debug) -> PeftError {
    PeftError::Unsupported(format!("{what}: the SVD did not converge ({e:?})"))
}

/// The exact thin SVD of a faer matrix, canonical signs, `(U, S, V)`.
fn thin_svd_mat<T: Real>(a: MatRef<'_, T>) -> Result<(Mat<T>, Vec<T>, Mat<T>)> {
    let svd = a.thin_svd().map_err(|e| svd_error("thin_svd", e))?;
    let mut u = svd.U().to_owned();
    let mut v = svd.V().to_owned();
    let s: Vec<T> = svd.S().column_vector().iter().copied().collect();
    canonical_signs(&mut u, Some(&mut v));
    Ok((u, s, v))
}

fn thin_svd_impl<T: Real>(a: &Tensor) -> Result<Svd> {
    let device = a.device();
    let (u, s, v) = thin_svd_mat(to_mat::<T>(a)?.as_ref())?;
    Ok(Svd {
        u: from_mat(u.as_ref(), device)?,
        s: from_vec(s, device)?,
        v: from_mat(v.as_ref(), device)?,
        method: SvdMethod::Exact,
    })
}

/// The thin SVD `A = U diag(S) Vᵀ` of a 2-D tensor, with canonical signs.
pub fn thin_svd(a: &Tensor, precision: Precision) -> Result<Svd> {
    ensure_finite(a, "thin_svd")?;
    match precision {
        Precision::F32 => thin_svd_impl::<f32>(a),
        Precision::F64 => thin_svd_impl::<f64>(a),
    }
}

/// The singular values of a 2-D tensor, non-increasing (cheaper than [`thin_svd`]).
pub fn singular_values(a: &Tensor, precision: Precision) -> Result<Tensor> {
    ensure_finite(a, "singular_values")?;
    fn imp<T: Real>(a: &Tensor) -> Result<Tensor> {
        let s = to_mat::<T>(a)?
            .singular_values()
            .map_err(|e| svd_error("singular_values", e))?;
        from_vec(s, a.device())
    }
    match precision {
        Precision::F32 => imp::<f32>(a),
        Precision::F64 => imp::<f64>(a),
    }
}

/// The thin `Q` of a faer matrix with orthonormalised columns.
fn orthonormal_basis<T: Real>(a: MatRef<'_, T>) -> Mat<T> {
    a.qr().compute_thin_Q()
}

/// Columns of the randomised subspace for `rank` triplets: trained weights have flat spectra,
/// and twice the rank converges in far fewer iterations than `rank + 10`.
fn subspace_size(rank: usize, opts: &TruncatedSvdOptions) -> usize {
    (rank + opts.oversample).max(2 * rank)
}

/// The exact thin SVD cut to its first `r` triplets.
fn exact_top<T: Real>(a: MatRef<'_, T>, r: usize) -> Result<(Mat<T>, Vec<T>, Mat<T>)> {
    let (u, s, v) = thin_svd_mat(a)?;
    Ok((
        u.subcols(0, r).to_owned(),
        s[..r].to_vec(),
        v.subcols(0, r).to_owned(),
    ))
}

/// Randomised top-`rank` SVD of `a: [m, n]` by subspace iteration with Rayleigh–Ritz
/// (Halko, Martinsson & Tropp, 2011, algorithms 4.4 and 5.1), or `None` when the top singular
/// values have not converged within `opts.power_iters` iterations (flat spectra).
#[allow(clippy::type_complexity)]
fn randomized_svd_mat<T: Real>(
    a: MatRef<'_, T>,
    rank: usize,
    opts: &TruncatedSvdOptions,
) -> Result<Option<(Mat<T>, Vec<T>, Mat<T>, usize)>> {
    let (m, n) = (a.nrows(), a.ncols());
    let l = subspace_size(rank, opts).min(m.min(n));
    let tol = opts
        .tolerance
        .unwrap_or(if T::DTYPE == DType::F64 { 1e-10 } else { 1e-5 });
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let omega = crate::init::normal(&mut rng, n * l, 1.0);
    let omega = Mat::<T>::from_fn(n, l, |i, j| T::from_f64(f64::from(omega[i * l + j])));
    // Re-orthonormalising after every product keeps the smaller directions from being lost
    // to rounding.
    let mut q = orthonormal_basis((a * &omega).as_ref());
    let mut previous: Option<Vec<f64>> = None;
    for iteration in 0..=opts.power_iters {
        if iteration > 0 {
            let z = orthonormal_basis((a.transpose() * &q).as_ref());
            q = orthonormal_basis((a * &z).as_ref());
        }
        // A ≈ Q (Qᵀ A): the small l × n matrix carries the top triplets.
        let b = q.transpose() * a;
        let values: Vec<f64> = b
            .singular_values()
            .map_err(|e| svd_error("truncated_svd", e))?
            .iter()
            .take(rank)
            .map(|x| x.to_f64())
            .collect();
        let converged = previous.as_ref().is_some_and(|p| {
            let top = values[0].max(f64::MIN_POSITIVE);
            values
                .iter()
                .zip(p)
                .all(|(x, y)| (x - y).abs() <= tol * top)
        });
        if converged {
            let (ub, s, v) = thin_svd_mat(b.as_ref())?;
            let mut u = &q * &ub;
            let mut v = v;
            canonical_signs(&mut u, Some(&mut v));
            return Ok(Some((
                u.subcols(0, rank).to_owned(),
                s[..rank].to_vec(),
                v.subcols(0, rank).to_owned(),
                iteration,
            )));
        }
        previous = Some(values);
    }
    Ok(None)
}

/// The top `rank` triplets, randomised when that is worth trying, exact otherwise.
#[allow(clippy::type_complexity)]
fn top_fixed<T: Real>(
    a: MatRef<'_, T>,
    rank: usize,
    opts: &TruncatedSvdOptions,
) -> Result<Option<(Mat<T>, Vec<T>, Mat<T>, SvdMethod)>> {
    let k = a.nrows().min(a.ncols());
    if subspace_size(rank, opts) as f64 > k as f64 * opts.max_fraction {
        return Ok(None);
    }
    Ok(randomized_svd_mat(a, rank, opts)?
        .map(|(u, s, v, power_iters)| (u, s, v, SvdMethod::Randomized { power_iters })))
}

fn truncated_svd_impl<T: Real>(a: &Tensor, rank: usize, opts: &TruncatedSvdOptions) -> Result<Svd> {
    let device = a.device();
    let mat = to_mat::<T>(a)?;
    let (u, s, v, method) = match top_fixed(mat.as_ref(), rank, opts)? {
        Some(found) => found,
        None => {
            let (u, s, v) = exact_top(mat.as_ref(), rank)?;
            (u, s, v, SvdMethod::Exact)
        }
    };
    Ok(Svd {
        u: from_mat(u.as_ref(), device)?,
        s: from_vec(s, device)?,
        v: from_mat(v.as_ref(), device)?,
        method,
    })
}

/// The top-`rank` SVD triplets of a 2-D tensor (`U: [m, rank]`, `S: [rank]`, `V: [n, rank]`),
/// canonical signs. Randomised subspace iteration when `rank` is small against `min(m, n)`
/// (see [`TruncatedSvdOptions::max_fraction`]) and the iteration converges, the exact thin SVD
/// otherwise; [`Svd::method`] says which.
///
/// Accuracy of the randomised path: `U` and `V` have orthonormal columns to rounding, every
/// returned `S[i]` is at most the exact `σᵢ`, and the iteration stops only when the top `rank`
/// values have settled to `tolerance · σ₁` (their error falls as `(σ_{l+1}/σᵢ)^(2q)` with `l`
/// subspace columns after `q` iterations).
pub fn truncated_svd(a: &Tensor, rank: usize, opts: &TruncatedSvdOptions) -> Result<Svd> {
    ensure_finite(a, "truncated_svd")?;
    let (m, n) = dims2(a, "truncated_svd")?;
    if rank == 0 || rank > m.min(n) {
        return Err(PeftError::Unsupported(format!(
            "truncated_svd: rank {rank} must be in 1..=min({m}, {n})"
        )));
    }
    match opts.precision {
        Precision::F32 => truncated_svd_impl::<f32>(a, rank, opts),
        Precision::F64 => truncated_svd_impl::<f64>(a, rank, opts),
    }
}

/// How many singular triplets [`top_svd`] keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RankRule {
    /// Exactly `r` (`1 ≤ r ≤ min(m, n)`).
    Fixed(usize),
    /// The smallest `r` whose triplets hold at least this share (in `(0, 1]`) of the squared
    /// Frobenius norm: `Σ_{i≤r} σᵢ² ≥ energy · Σ_i σᵢ²`.
    Energy(f64),
}

/// The smallest `r ≥ 1` with `Σ_{i≤r} σᵢ² ≥ energy · total` for singular values `s` in
/// non-increasing order (`s.len()` when none reaches it, e.g. through rounding at energy 1).
pub fn rank_for_energy(s: &[f64], total: f64, energy: f64) -> usize {
    let target = energy * total;
    let mut acc = 0f64;
    for (i, v) in s.iter().enumerate() {
        acc += v * v;
        // A relative slack of a few ulps lets energy = 1 stop at the last non-zero σ.
        if acc >= target * (1.0 - 4.0 * f64::EPSILON) {
            return i + 1;
        }
    }
    s.len().max(1)
}

/// The top singular triplets of a 2-D tensor chosen by `rule`, canonical signs.
///
/// Method, by cost ([`Svd::method`] says which was used): a fixed rank small against `k` tries
/// the randomised iteration of [`truncated_svd`]. Otherwise (an energy rule needs every singular value) in f64 the
/// eigendecomposition of the `k × k` Gram matrix (`A Aᵀ` or `Aᵀ A`) gives `σ²` and one side's
/// vectors, and the other side is `Aᵀ u / σ` (or `A v / σ`), formed for the kept triplets only.
/// Squaring doubles the relative error of the small singular values, harmless in f64 for the
/// kept ones: when `σ_r < 10⁻⁴ σ₁` the exact thin SVD is used instead. In f32 the Gram matrix
/// would lose too much, so f32 always takes the exact thin SVD.
pub fn top_svd(a: &Tensor, rule: RankRule, opts: &TruncatedSvdOptions) -> Result<Svd> {
    ensure_finite(a, "top_svd")?;
    let (m, n) = dims2(a, "top_svd")?;
    match rule {
        RankRule::Fixed(r) if r == 0 || r > m.min(n) => {
            return Err(PeftError::Unsupported(format!(
                "top_svd: rank {r} must be in 1..=min({m}, {n})"
            )));
        }
        RankRule::Energy(e) if !(e > 0.0 && e <= 1.0) => {
            return Err(PeftError::Unsupported(format!(
                "top_svd: energy must be in (0, 1], got {e}"
            )));
        }
        _ => {}
    }
    match opts.precision {
        Precision::F32 => top_svd_impl::<f32>(a, rule, opts),
        Precision::F64 => top_svd_impl::<f64>(a, rule, opts),
    }
}

/// Smallest kept `σ_r / σ₁` for which the Gram route is accurate (in f64, the vectors' error
/// is about `ε (σ₁/σ_r)²`, 10⁻⁸ at this bound).
const GRAM_MIN_RATIO: f64 = 1e-4;

fn top_svd_impl<T: Real>(a: &Tensor, rule: RankRule, opts: &TruncatedSvdOptions) -> Result<Svd> {
    let device = a.device();
    let mat = to_mat::<T>(a)?;
    let randomized = match rule {
        RankRule::Fixed(r) => top_fixed(mat.as_ref(), r, opts)?,
        RankRule::Energy(_) => None,
    };
    let gram = match randomized {
        Some(found) => Some(found),
        None if T::DTYPE == DType::F64 => {
            gram_top_svd(mat.as_ref(), rule)?.map(|(u, s, v)| (u, s, v, SvdMethod::Gram))
        }
        None => None,
    };
    let (u, s, v, method) = match gram {
        Some(found) => found,
        None => {
            let (u, s, v) = thin_svd_mat(mat.as_ref())?;
            let r = match rule {
                RankRule::Fixed(r) => r,
                RankRule::Energy(e) => {
                    let s64: Vec<f64> = s.iter().map(|x| x.to_f64()).collect();
                    let total = s64.iter().map(|x| x * x).sum();
                    rank_for_energy(&s64, total, e)
                }
            };
            (
                u.subcols(0, r).to_owned(),
                s[..r].to_vec(),
                v.subcols(0, r).to_owned(),
                SvdMethod::Exact,
            )
        }
    };
    Ok(Svd {
        u: from_mat(u.as_ref(), device)?,
        s: from_vec(s, device)?,
        v: from_mat(v.as_ref(), device)?,
        method,
    })
}

/// The top triplets through the Gram matrix's eigendecomposition, or `None` when the kept
/// singular values are too small against `σ₁` for that to be accurate.
#[allow(clippy::type_complexity)]
fn gram_top_svd<T: Real>(
    a: MatRef<'_, T>,
    rule: RankRule,
) -> Result<Option<(Mat<T>, Vec<T>, Mat<T>)>> {
    let (m, n) = (a.nrows(), a.ncols());
    // Wide: A Aᵀ (m × m) has U as eigenvectors; tall: Aᵀ A (n × n) has V.
    let wide = m <= n;
    let gram = if wide {
        a * a.transpose()
    } else {
        a.transpose() * a
    };
    let k = gram.nrows();
    let evd = gram.self_adjoint_eigen(Side::Lower).map_err(|e| {
        PeftError::Unsupported(format!(
            "top_svd: the eigendecomposition did not converge ({e:?})"
        ))
    })?;
    // Eigenvalues come in non-decreasing order: σᵢ² is eigenvalue k − 1 − i.
    let lambdas: Vec<f64> = evd.S().column_vector().iter().map(|x| x.to_f64()).collect();
    let sigma: Vec<f64> = lambdas.iter().rev().map(|l| l.max(0.0).sqrt()).collect();
    let r = match rule {
        RankRule::Fixed(r) => r,
        // ‖A‖_F² = trace of the Gram matrix = Σ σᵢ².
        RankRule::Energy(e) => rank_for_energy(&sigma, lambdas.iter().sum(), e),
    };
    let top = sigma[0];
    if top == 0.0 || sigma[r - 1] < GRAM_MIN_RATIO * top {
        return Ok(None);
    }
    let q = evd.U();
    let mut side = Mat::<T>::from_fn(k, r, |i, j| q[(i, k - 1 - j)]);
    // The other side: Aᵀ u / σ (wide) or A v / σ (tall), for the kept triplets only.
    let mut other = if wide {
        a.transpose() * &side
    } else {
        a * &side
    };
    for j in 0..r {
        let inv = 1.0 / sigma[j];
        for i in 0..other.nrows() {
            other[(i, j)] = T::from_f64(other[(i, j)].to_f64() * inv);
        }
    }
    let s: Vec<T> = sigma[..r].iter().map(|&x| T::from_f64(x)).collect();
    let (u, v) = if wide {
        canonical_signs(&mut side, Some(&mut other));
        (side, other)
    } else {
        let (mut u, mut v) = (other, side);
        canonical_signs(&mut u, Some(&mut v));
        (u, v)
    };
    Ok(Some((u, s, v)))
}
