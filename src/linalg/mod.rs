//! Dense linear algebra on candle tensors, through faer: thin and truncated SVD, LU with partial
//! pivoting, QR, symmetric eigendecomposition, solve and inverse, and an incremental PCA.
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
//! - [`IncrementalPca`]: sklearn's incremental PCA over batches of rows (EVA's initialisation).
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
use faer::traits::RealField;
use faer::{Mat, MatRef};

use crate::error::{PeftError, Result};

mod decompositions;
mod pca;
mod svd;

pub use decompositions::{Lu, Qr, SymmetricEigen, inverse, lu, qr, solve, symmetric_eigen};
pub use pca::{IncrementalPca, PcaSvd};
pub use svd::{
    RankRule, Svd, SvdMethod, TruncatedSvdOptions, rank_for_energy, singular_values, thin_svd,
    top_svd, truncated_svd,
};

/// The floating-point precision a decomposition runs in (and returns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Single precision.
    F32,
    /// Double precision.
    #[default]
    F64,
}

impl Precision {
    /// The candle dtype of this precision.
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

/// The number of adjacent pairs of non-zero singular values (`s` in non-increasing order) tied
/// within `tolerance · s₀`: their singular vectors are not unique, so another SVD of the same
/// matrix may rotate them.
pub fn near_ties(s: &Tensor, tolerance: f64) -> Result<usize> {
    let s = s
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f64>()?;
    let Some(&top) = s.first() else {
        return Ok(0);
    };
    let tol = tolerance * top;
    Ok(s.windows(2)
        .filter(|p| p[1] > tol && p[0] - p[1] <= tol)
        .count())
}

/// Re-applies the sign rule to an SVD whose vector pairs may have been flipped: returns `(U, V)`
/// with the entry of largest magnitude of each column of `U` positive (`V` flipped with `U`).
/// `u: [m, k]`, `v: [n, k]`; the output keeps their dtype and device.
///
/// Not for factors an adapter has stored: applied to factors rounded after the rule chose their
/// signs (f64 → f32), it can choose differently where a column's two largest magnitudes round to
/// the same value, flipping that pair. Stored factors are used as stored.
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
