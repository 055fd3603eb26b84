//! LU with partial pivoting, QR, the symmetric eigendecomposition, and LU-based solve and
//! inverse.

use candle_core::{DType, Tensor};
use faer::linalg::solvers::{DenseSolveCore, Solve};
use faer::{Mat, Side};

use super::{
    Precision, Real, canonical_signs, dims2, ensure_finite, from_mat, from_vec, negate_col, to_mat,
};
use crate::error::{PeftError, Result};

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
