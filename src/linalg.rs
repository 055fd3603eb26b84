//! Dense linear algebra on candle tensors, through faer: thin and truncated SVD, LU with partial
//! pivoting, QR, symmetric eigendecomposition, solve and inverse.
//!
//! candle has no decompositions, so every function here copies its 2-D input to the CPU, runs
//! faer in the requested [`Precision`] (f32 or f64, whatever the input's dtype), and returns
//! tensors of that precision on the input's device. These are one-off steps (adapter init, merge
//! analysis), never part of a differentiable path: the results carry no gradient.
//!
//! Conventions, for `A: [m, n]` and `k = min(m, n)`:
//! - [`thin_svd`]: `A = U diag(S) Vᵀ`, `U: [m, k]`, `S: [k]` non-negative and non-increasing,
//!   `V: [n, k]`, both with orthonormal columns.
//! - [`truncated_svd`]: the top `r` triplets of the same decomposition, by randomised subspace
//!   iteration (Halko, Martinsson & Tropp, 2011) when `r` is small and the iteration converges,
//!   exactly otherwise. [`top_svd`] picks `r` by a fixed rank or an energy share, and in f64
//!   goes through the Gram matrix's eigendecomposition when every singular value is needed.
//! - [`lu`]: partial (row) pivoting, `A[perm[i], :] = (L U)[i, :]`, i.e. `A = P L U` with
//!   `P[perm[i], i] = 1` (`torch.linalg.lu`'s convention). `L: [m, k]` unit lower trapezoidal,
//!   `U: [k, n]` upper trapezoidal; the pivot is the entry of largest magnitude in the column
//!   (LAPACK's rule). The permutation is a `u32` vector, never a dense matrix.
//! - [`qr`]: `A = Q R`, `Q: [m, k]` with orthonormal columns, `R: [k, n]` upper trapezoidal with
//!   a non-negative diagonal.
//! - [`symmetric_eigen`]: `A = Q diag(λ) Qᵀ` for symmetric `A` (only the lower triangle is read),
//!   eigenvalues in non-increasing order.
//!
//! **Sign rule.** Singular vectors are unique only up to a simultaneous sign flip of `uᵢ` and
//! `vᵢ` (eigenvectors up to the sign of `qᵢ`). Every decomposition here returns them in one
//! canonical form: in each column of `U` (of `Q` for the eigendecomposition), the entry of
//! largest magnitude is positive, the first such entry when several tie; `vᵢ` is flipped with
//! `uᵢ`. A decomposition of the same matrix thus gives the same vectors, whichever sign the
//! solver produced, and a factor that has been flipped can be put back with
//! [`canonicalize_svd_signs`]. Vectors of repeated singular values are not unique beyond sign;
//! no rule fixes them.

use candle_core::{DType, Device, Tensor, WithDType};
use faer::linalg::solvers::{DenseSolveCore, Solve};
use faer::traits::RealField;
use faer::{Mat, MatRef, Side};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{PeftError, Result};

/// The floating-point precision a decomposition runs in (and returns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    F32,
    #[default]
    F64,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F64 => DType::F64,
        }
    }

    /// The name written to adapter configs (`float32`, `float64`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "float32",
            Precision::F64 => "float64",
        }
    }

    /// Parses `float32`/`f32`/`fp32` or `float64`/`f64`/`fp64`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" => Some(Precision::F32),
            "float64" | "f64" | "fp64" => Some(Precision::F64),
            _ => None,
        }
    }

    /// Machine epsilon of this precision.
    pub fn epsilon(self) -> f64 {
        match self {
            Precision::F32 => f64::from(f32::EPSILON),
            Precision::F64 => f64::EPSILON,
        }
    }
}

/// How an [`Svd`] was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvdMethod {
    /// faer's thin SVD.
    Exact,
    /// The eigendecomposition of the Gram matrix (see [`top_svd`]).
    Gram,
    /// Randomised subspace iteration that converged after this many power iterations.
    Randomized { power_iters: usize },
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
    pub method: SvdMethod,
}

/// `A[perm[i], :] = (L U)[i, :]`.
#[derive(Clone, Debug)]
pub struct Lu {
    /// `[m, k]`, unit lower trapezoidal.
    pub l: Tensor,
    /// `[k, n]`, upper trapezoidal; its diagonal holds the pivots.
    pub u: Tensor,
    /// Length `m`: row `i` of `L U` is row `perm[i]` of `A`.
    pub perm: Vec<u32>,
}

/// `A = Q R`.
#[derive(Clone, Debug)]
pub struct Qr {
    /// `[m, k]`, orthonormal columns.
    pub q: Tensor,
    /// `[k, n]`, upper trapezoidal, non-negative diagonal.
    pub r: Tensor,
}

/// `A = Q diag(λ) Qᵀ` for a symmetric `A`.
#[derive(Clone, Debug)]
pub struct SymmetricEigen {
    /// `[n]`, non-increasing.
    pub values: Tensor,
    /// `[n, n]`, column `i` is the eigenvector of `values[i]`.
    pub vectors: Tensor,
}

/// Settings of the randomised [`truncated_svd`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TruncatedSvdOptions {
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

/// The float types faer runs in here.
trait Real: RealField + WithDType + Copy {}
impl Real for f32 {}
impl Real for f64 {}

fn dims2(a: &Tensor, what: &str) -> Result<(usize, usize)> {
    match *a.dims() {
        [m, n] => Ok((m, n)),
        _ => Err(PeftError::Unsupported(format!(
            "{what} needs a 2-D matrix, got shape {:?}",
            a.dims()
        ))),
    }
}

/// The first non-finite entry of `a`, as `(flat index, value)`.
pub fn first_non_finite(a: &Tensor) -> Result<Option<(usize, f64)>> {
    let flat = a.to_device(&Device::Cpu)?.flatten_all()?;
    // f32 weights are scanned as they are: this runs on every weight an adapter decomposes.
    Ok(match flat.dtype() {
        DType::F32 => {
            let v = flat.to_vec1::<f32>()?;
            v.iter()
                .position(|x| !x.is_finite())
                .map(|i| (i, f64::from(v[i])))
        }
        _ => {
            let v = flat.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i]))
        }
    })
}

fn ensure_finite(a: &Tensor, what: &str) -> Result<()> {
    if let Some((i, v)) = first_non_finite(a)? {
        let n = a.dims().last().copied().unwrap_or(1).max(1);
        return Err(PeftError::Unsupported(format!(
            "{what}: the matrix has a non-finite entry ({v} at row {}, column {})",
            i / n,
            i % n
        )));
    }
    Ok(())
}

/// A 2-D tensor as a faer matrix of `T` (copied to the CPU).
fn to_mat<T: Real>(a: &Tensor) -> Result<Mat<T>> {
    let (m, n) = dims2(a, "linalg")?;
    let data = a
        .to_device(&Device::Cpu)?
        .to_dtype(T::DTYPE)?
        .flatten_all()?
        .to_vec1::<T>()?;
    Ok(MatRef::from_row_major_slice(&data, m, n).to_owned())
}

/// A faer matrix as a row-major tensor on `device`.
fn from_mat<T: Real>(m: MatRef<'_, T>, device: &Device) -> Result<Tensor> {
    let (rows, cols) = (m.nrows(), m.ncols());
    let mut data = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            data.push(m[(i, j)]);
        }
    }
    Ok(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?.to_device(device)?)
}

fn from_vec<T: Real>(v: Vec<T>, device: &Device) -> Result<Tensor> {
    let n = v.len();
    Ok(Tensor::from_vec(v, n, &Device::Cpu)?.to_device(device)?)
}

/// Index of the entry of largest magnitude in column `j` (the first on ties).
fn argmax_abs<T: Real>(m: MatRef<'_, T>, j: usize) -> usize {
    let mut best = 0;
    let mut best_abs = -1.0f64;
    for i in 0..m.nrows() {
        let a = m[(i, j)].to_f64().abs();
        if a > best_abs {
            best = i;
            best_abs = a;
        }
    }
    best
}

fn negate_col<T: Real>(m: &mut Mat<T>, j: usize) {
    for i in 0..m.nrows() {
        m[(i, j)] = T::from_f64(-m[(i, j)].to_f64());
    }
}

/// Applies the sign rule to `(U, V)` in place: the entry of largest magnitude of each column of
/// `U` becomes positive, flipping the column of `V` with it.
fn canonical_signs<T: Real>(u: &mut Mat<T>, mut v: Option<&mut Mat<T>>) {
    for j in 0..u.ncols() {
        let i = argmax_abs(u.as_ref(), j);
        if u[(i, j)].to_f64() < 0.0 {
            negate_col(u, j);
            if let Some(v) = v.as_deref_mut() {
                negate_col(v, j);
            }
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

/// Re-applies the sign rule to an SVD whose vector pairs may have been flipped: returns `(U, V)`
/// with the entry of largest magnitude of each column of `U` positive (`V` flipped with `U`).
/// `u: [m, k]`, `v: [n, k]`; the output keeps their dtype and device.
pub fn canonicalize_svd_signs(u: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, k) = dims2(u, "canonicalize_svd_signs")?;
    let (_, kv) = dims2(v, "canonicalize_svd_signs")?;
    if k != kv {
        return Err(PeftError::Unsupported(format!(
            "canonicalize_svd_signs: U has {k} columns and V has {kv}"
        )));
    }
    let uv = u.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let rows = uv.to_vec2::<f64>()?;
    let mut signs = vec![1f64; k];
    for (j, sign) in signs.iter_mut().enumerate() {
        let mut best = 0f64;
        let mut best_abs = -1f64;
        for row in &rows {
            if row[j].abs() > best_abs {
                best_abs = row[j].abs();
                best = row[j];
            }
        }
        if best < 0.0 {
            *sign = -1.0;
        }
    }
    let signs = Tensor::from_vec(signs, (1, k), &Device::Cpu)?;
    let flip = |t: &Tensor| -> Result<Tensor> {
        let s = signs.to_dtype(t.dtype())?.to_device(t.device())?;
        Ok(t.broadcast_mul(&s)?)
    };
    Ok((flip(u)?, flip(v)?))
}

fn lu_impl<T: Real>(a: &Tensor) -> Result<Lu> {
    let device = a.device();
    let mat = to_mat::<T>(a)?;
    let lu = mat.partial_piv_lu();
    let (forward, _) = lu.P().arrays();
    let perm = forward
        .iter()
        .map(|&i| {
            u32::try_from(i).map_err(|_| {
                PeftError::Unsupported(format!("lu: row index {i} does not fit in u32"))
            })
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok(Lu {
        l: from_mat(lu.L(), device)?,
        u: from_mat(lu.U(), device)?,
        perm,
    })
}

/// The LU decomposition with partial pivoting, `A[perm[i], :] = (L U)[i, :]`. A zero pivot is
/// not an error here (`U` then has a zero on its diagonal); callers that divide by pivots check.
pub fn lu(a: &Tensor, precision: Precision) -> Result<Lu> {
    ensure_finite(a, "lu")?;
    match precision {
        Precision::F32 => lu_impl::<f32>(a),
        Precision::F64 => lu_impl::<f64>(a),
    }
}

fn qr_impl<T: Real>(a: &Tensor) -> Result<Qr> {
    let device = a.device();
    let mat = to_mat::<T>(a)?;
    let qr = mat.qr();
    let mut q = qr.compute_thin_Q();
    let mut r = qr.thin_R().to_owned();
    // A non-negative diagonal of R makes the factorisation unique for full-rank A.
    for j in 0..r.nrows().min(r.ncols()) {
        if r[(j, j)].to_f64() < 0.0 {
            negate_col(&mut q, j);
            for c in 0..r.ncols() {
                r[(j, c)] = T::from_f64(-r[(j, c)].to_f64());
            }
        }
    }
    Ok(Qr {
        q: from_mat(q.as_ref(), device)?,
        r: from_mat(r.as_ref(), device)?,
    })
}

/// The thin QR decomposition `A = Q R`, with `R`'s diagonal non-negative.
pub fn qr(a: &Tensor, precision: Precision) -> Result<Qr> {
    ensure_finite(a, "qr")?;
    match precision {
        Precision::F32 => qr_impl::<f32>(a),
        Precision::F64 => qr_impl::<f64>(a),
    }
}

fn symmetric_eigen_impl<T: Real>(a: &Tensor) -> Result<SymmetricEigen> {
    let device = a.device();
    let mat = to_mat::<T>(a)?;
    let evd = mat.self_adjoint_eigen(Side::Lower).map_err(|e| {
        PeftError::Unsupported(format!(
            "symmetric_eigen: the eigendecomposition did not converge ({e:?})"
        ))
    })?;
    let n = mat.nrows();
    // faer sorts eigenvalues in non-decreasing order; reverse to match the SVD's order.
    let values: Vec<T> = evd.S().column_vector().iter().rev().copied().collect();
    let ascending = evd.U();
    let mut vectors = Mat::<T>::from_fn(n, n, |i, j| ascending[(i, n - 1 - j)]);
    canonical_signs(&mut vectors, None);
    Ok(SymmetricEigen {
        values: from_vec(values, device)?,
        vectors: from_mat(vectors.as_ref(), device)?,
    })
}

/// The eigendecomposition of a symmetric matrix (only its lower triangle is read), eigenvalues
/// non-increasing, eigenvectors with canonical signs.
pub fn symmetric_eigen(a: &Tensor, precision: Precision) -> Result<SymmetricEigen> {
    ensure_finite(a, "symmetric_eigen")?;
    let (m, n) = dims2(a, "symmetric_eigen")?;
    if m != n {
        return Err(PeftError::Unsupported(format!(
            "symmetric_eigen needs a square matrix, got [{m}, {n}]"
        )));
    }
    match precision {
        Precision::F32 => symmetric_eigen_impl::<f32>(a),
        Precision::F64 => symmetric_eigen_impl::<f64>(a),
    }
}

/// Checks that `a` is square and its LU has no (numerically) zero pivot.
fn checked_lu<T: Real>(a: &Tensor, what: &str) -> Result<faer::linalg::solvers::PartialPivLu<T>> {
    let (m, n) = dims2(a, what)?;
    if m != n {
        return Err(PeftError::Unsupported(format!(
            "{what} needs a square matrix, got [{m}, {n}]"
        )));
    }
    let mat = to_mat::<T>(a)?;
    let scale = (0..n)
        .flat_map(|j| (0..n).map(move |i| (i, j)))
        .fold(0f64, |acc, (i, j)| acc.max(mat[(i, j)].to_f64().abs()));
    let lu = mat.partial_piv_lu();
    let tol = scale * n as f64 * epsilon_of::<T>();
    let u = lu.U();
    if let Some(j) = (0..n).find(|&j| u[(j, j)].to_f64().abs() <= tol) {
        return Err(PeftError::Unsupported(format!(
            "{what}: the matrix is singular (pivot {j} of its LU is {})",
            u[(j, j)].to_f64()
        )));
    }
    Ok(lu)
}

fn epsilon_of<T: Real>() -> f64 {
    if T::DTYPE == DType::F32 {
        f64::from(f32::EPSILON)
    } else {
        f64::EPSILON
    }
}

/// Solves `A X = B` for square `A: [n, n]` and `B: [n, p]` (or `[n]`) by LU with partial
/// pivoting. A singular `A` is an error.
pub fn solve(a: &Tensor, b: &Tensor, precision: Precision) -> Result<Tensor> {
    ensure_finite(a, "solve")?;
    ensure_finite(b, "solve")?;
    fn imp<T: Real>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let lu = checked_lu::<T>(a, "solve")?;
        let n = a.dims()[0];
        let b2 = match b.rank() {
            1 => b.reshape((b.dims()[0], 1))?,
            _ => b.clone(),
        };
        let (bm, _) = dims2(&b2, "solve")?;
        if bm != n {
            return Err(PeftError::Unsupported(format!(
                "solve: A is [{n}, {n}] but B has {bm} rows"
            )));
        }
        let x = lu.solve(to_mat::<T>(&b2)?);
        let x = from_mat(x.as_ref(), a.device())?;
        Ok(if b.rank() == 1 { x.flatten_all()? } else { x })
    }
    match precision {
        Precision::F32 => imp::<f32>(a, b),
        Precision::F64 => imp::<f64>(a, b),
    }
}

/// The inverse of a square, non-singular matrix.
pub fn inverse(a: &Tensor, precision: Precision) -> Result<Tensor> {
    ensure_finite(a, "inverse")?;
    fn imp<T: Real>(a: &Tensor) -> Result<Tensor> {
        let lu = checked_lu::<T>(a, "inverse")?;
        from_mat(lu.inverse().as_ref(), a.device())
    }
    match precision {
        Precision::F32 => imp::<f32>(a),
        Precision::F64 => imp::<f64>(a),
    }
}
