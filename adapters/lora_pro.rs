//! LoRA-Pro: the gradient adjustment that makes a LoRA update approximate full fine-tuning
//! (Wang & Liang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025,
//! arXiv:2407.18242).
//!
//! LoRA-Pro changes only the optimisation step: the adapter, its forward, merge and file format
//! are plain LoRA ([`crate::adapters::lora`]). This file holds the registry entry and the math
//! of one adapted matrix; the optimiser that applies it each step sits in the optimiser layer
//! above the model, which imports this file (never the other way round).
//!
//! Shapes: `A: [r, in]`, `B: [out, r]`, scaling `s` (the layer's own α/r or α/√r), effective
//! weight `W + s·B·A`. A conv2d LoRA is the same math on its flattened factors
//! `A: [r, in·kh·kw]`, `B: [out, r]` (groups = 1). With `G = ∂L/∂W` the full gradient, the LoRA
//! gradients are `g_A = s·Bᵀ·G` and `g_B = s·G·Aᵀ`; LoRA-Pro never forms `G`.
//!
//! With `M_B = BᵀB + δI`, `M_A = AAᵀ + δI` (`δ`: damping) and any `X ∈ R^{r×r}`, the adjusted
//! gradients (Theorem 2.1) are
//!
//! ```text
//! g^A = (1/s²)·M_B⁻¹·g_A + X·A                                        [r, in]
//! g^B = (1/s²)·(I − B·M_B⁻¹·Bᵀ)·g_B·M_A⁻¹ − B·X                       [out, r]
//! ```
//!
//! and the equivalent gradient `g̃ = s·B·g^A + s·g^B·A = P_B·G + G·P_A − P_B·G·P_A` (projectors
//! `P_B = B(BᵀB)⁻¹Bᵀ`, `P_A = Aᵀ(AAᵀ)⁻¹A`) does not depend on X. It is computed here as
//!
//! ```text
//! g̃ = (1/s)·[ B·M_B⁻¹·g_A + (g_B − B·M_B⁻¹·(Bᵀ·g_B))·M_A⁻¹·A ]       [out, in]
//! ```
//!
//! X is the solution of the Sylvester equation (Theorem 2.3) that keeps `(g^A, g^B)` closest to
//! `(g_A, g_B)`:
//!
//! ```text
//! (BᵀB)·X + X·(AAᵀ) = −(1/s²)·M_B⁻¹·g_A·Aᵀ
//! ```
//!
//! solved in closed form from the symmetric eigendecompositions `BᵀB = Q_b·diag(λ)·Q_bᵀ`,
//! `AAᵀ = Q_a·diag(μ)·Q_aᵀ`: `X = Q_b·[(Q_bᵀ·C·Q_a)_ij / (λ_i + μ_j)]·Q_aᵀ`.
//!
//! Numerics. Every r×r quantity (Gram matrices, inverses, X) is computed in f64 on the CPU from
//! a cyclic Jacobi eigendecomposition, whatever the factors' dtype and device; only the products
//! with `[out, r]` / `[r, in]` / `[out, in]` tensors run in the factors' dtype on their device.
//! Guards:
//! - `B = 0` (the first step after PEFT's init): `g_A = s·Bᵀ·G = 0` exactly and `P_B = 0`, so the
//!   `M_B⁻¹` terms are dropped instead of multiplying zeros by `1/δ`. Then `g^A = X·A` with
//!   `X = 0`, and `s·g^B·A = G·P_A`.
//! - Ill-conditioned `BᵀB` (B is tiny after the first steps): inverses are taken through the
//!   eigendecomposition, and eigenvalues of `M` below `10⁻¹²·λ_max` ([`RELATIVE_CUTOFF`]) are
//!   treated as zero (a pseudo-inverse) rather than inverted into rounding noise. The same
//!   cut-off applies to the Sylvester denominators `λ_i + μ_j`.
//!
//! The reference code's bugs that this implementation does not reproduce (see the optimiser):
//! a hard-coded `s = 2`, an Adam step count off by one, bf16 second moments, pairing A with B by
//! position, and clipping applied to the final update instead of the raw gradients.

use candle_core::{DType, Device, Tensor};

use crate::adapter::{Method, MethodSpec};
use crate::adapters::lora::{LORA_CLI, LORA_TENSORS};
use crate::error::{PeftError, Result};

/// LoRA-Pro's registry entry: LoRA's adapter, file and CLI mapping, trained with the LoRA-Pro
/// optimiser.
pub const METHOD: Method = Method::new(&MethodSpec {
    name: "lora-pro",
    aliases: &["lora_pro"],
    peft_type: "LORA",
    summary: "LoRA trained with gradients adjusted to approximate full fine-tuning",
    tensors: LORA_TENSORS,
    cli: LORA_CLI,
    needs_calibration: false,
    lora_pro_optimizer: true,
});

/// The reference implementation's damping `δ` of `BᵀB` and `AAᵀ` before inversion.
pub const DEFAULT_DAMPING: f64 = 1e-8;

/// Jacobi sweeps before giving up (convergence is quadratic; a few sweeps suffice in practice).
const MAX_JACOBI_SWEEPS: usize = 100;

/// Eigenvalues of a Gram matrix below this fraction of the largest are rounding noise (an f64
/// Gram matrix carries errors of a few hundred ε relative to its norm): they are treated as 0,
/// which is the pseudo-inverse and the minimum-norm Sylvester solution there. It corresponds
/// to a factor with condition number above 10⁶.
pub const RELATIVE_CUTOFF: f64 = 1e-12;

/// A small dense f64 matrix, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct SmallMatrix {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

impl SmallMatrix {
    /// The `rows × cols` zero matrix.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// The `n × n` identity.
    pub fn identity(n: usize) -> Self {
        let mut m = Self::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// A matrix from row-major values; `data.len()` must be `rows·cols`.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f64>) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(PeftError::ShapeMismatch {
                key: "matrix data".into(),
                expected: vec![rows, cols],
                got: vec![data.len()],
            });
        }
        Ok(Self { rows, cols, data })
    }

    /// A 2-D tensor's values, in f64 on the CPU.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        let data = t
            .to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        Ok(Self { rows, cols, data })
    }

    /// As a tensor of `dtype` on `device`.
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(
            Tensor::from_vec(self.data.clone(), (self.rows, self.cols), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?,
        )
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f64] {
        &self.data
    }

    /// The entry at row `i`, column `j`.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    fn set(&mut self, i: usize, j: usize, v: f64) {
        self.data[i * self.cols + j] = v;
    }

    /// `selfᵀ`.
    pub fn transpose(&self) -> Self {
        let mut out = Self::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                out.set(j, i, self.get(i, j));
            }
        }
        out
    }

    /// `self · rhs`; the inner dimensions must agree.
    pub fn matmul(&self, rhs: &Self) -> Result<Self> {
        if self.cols != rhs.rows {
            return Err(PeftError::ShapeMismatch {
                key: "matrix product".into(),
                expected: vec![self.cols, rhs.cols],
                got: vec![rhs.rows, rhs.cols],
            });
        }
        let mut out = Self::zeros(self.rows, rhs.cols);
        for i in 0..self.rows {
            for k in 0..self.cols {
                let a = self.get(i, k);
                if a == 0.0 {
                    continue;
                }
                let row = &rhs.data[k * rhs.cols..(k + 1) * rhs.cols];
                let dst = &mut out.data[i * rhs.cols..(i + 1) * rhs.cols];
                for (d, b) in dst.iter_mut().zip(row) {
                    *d += a * b;
                }
            }
        }
        Ok(out)
    }

    /// `factor · self`.
    pub fn scale(&self, factor: f64) -> Self {
        Self {
            rows: self.rows,
            cols: self.cols,
            data: self.data.iter().map(|v| v * factor).collect(),
        }
    }

    /// `self + rhs` (same shape).
    pub fn add(&self, rhs: &Self) -> Result<Self> {
        self.zip(rhs, |a, b| a + b)
    }

    /// `self − rhs` (same shape).
    pub fn sub(&self, rhs: &Self) -> Result<Self> {
        self.zip(rhs, |a, b| a - b)
    }

    fn zip(&self, rhs: &Self, f: impl Fn(f64, f64) -> f64) -> Result<Self> {
        if (self.rows, self.cols) != (rhs.rows, rhs.cols) {
            return Err(PeftError::ShapeMismatch {
                key: "matrix sum".into(),
                expected: vec![self.rows, self.cols],
                got: vec![rhs.rows, rhs.cols],
            });
        }
        Ok(Self {
            rows: self.rows,
            cols: self.cols,
            data: self
                .data
                .iter()
                .zip(&rhs.data)
                .map(|(a, b)| f(*a, *b))
                .collect(),
        })
    }

    /// `max |m_ij|` (0 for an empty matrix).
    pub fn max_abs(&self) -> f64 {
        self.data.iter().fold(0.0, |m, v| m.max(v.abs()))
    }

    /// The Frobenius norm `√(Σ m_ij²)`.
    pub fn frobenius(&self) -> f64 {
        self.data.iter().map(|v| v * v).sum::<f64>().sqrt()
    }
}

/// `M = Q·diag(values)·Qᵀ` for a symmetric `M`; the columns of `vectors` (Q) are orthonormal
/// eigenvectors, `values` ascend.
#[derive(Clone, Debug)]
pub struct SymmetricEigen {
    /// The eigenvalues, ascending.
    pub values: Vec<f64>,
    /// The orthonormal eigenvectors `Q`, one per column, in the order of `values`.
    pub vectors: SmallMatrix,
}

impl SymmetricEigen {
    /// `Q·diag(f(λ))·Qᵀ`.
    pub fn reconstruct(&self, f: impl Fn(f64) -> f64) -> SmallMatrix {
        let n = self.values.len();
        let fl: Vec<f64> = self.values.iter().map(|&l| f(l)).collect();
        let mut out = SmallMatrix::zeros(n, n);
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n)
                    .map(|k| self.vectors.get(i, k) * fl[k] * self.vectors.get(j, k))
                    .sum();
                out.set(i, j, v);
            }
        }
        out
    }

    /// The largest eigenvalue (0 for an empty matrix).
    pub fn max_value(&self) -> f64 {
        self.values.iter().copied().fold(0.0, f64::max)
    }

    /// `(M + δI)⁻¹` through the eigendecomposition, with eigenvalues of `M + δI` at or below
    /// [`RELATIVE_CUTOFF`]` · max(λ + δ)` treated as zero (the pseudo-inverse there).
    pub fn damped_inverse(&self, damping: f64) -> SmallMatrix {
        let cutoff = (self.max_value() + damping).max(0.0) * RELATIVE_CUTOFF;
        self.reconstruct(|l| {
            let d = l + damping;
            if d > cutoff { 1.0 / d } else { 0.0 }
        })
    }
}

/// The eigendecomposition of the symmetric matrix `m` by cyclic Jacobi rotations (the symmetric
/// part `(m + mᵀ)/2` is used). Accurate to a few ε·‖m‖ in every eigenvalue.
pub fn symmetric_eigen(m: &SmallMatrix) -> Result<SymmetricEigen> {
    if m.rows != m.cols {
        return Err(PeftError::ShapeMismatch {
            key: "symmetric eigendecomposition".into(),
            expected: vec![m.rows, m.rows],
            got: vec![m.rows, m.cols],
        });
    }
    let n = m.rows;
    if m.data.iter().any(|v| !v.is_finite()) {
        return Err(PeftError::Unsupported(
            "symmetric eigendecomposition of a matrix with NaN or infinite entries".into(),
        ));
    }
    let mut a = m.add(&m.transpose())?.scale(0.5);
    let mut v = SmallMatrix::identity(n);
    let norm = a.frobenius();
    let tol = f64::EPSILON * norm;
    let mut converged = norm == 0.0;
    for _ in 0..MAX_JACOBI_SWEEPS {
        if converged {
            break;
        }
        let off: f64 = (0..n)
            .flat_map(|p| (p + 1..n).map(move |q| (p, q)))
            .map(|(p, q)| a.get(p, q).powi(2))
            .sum::<f64>()
            .sqrt();
        if off <= tol {
            converged = true;
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a.get(p, q);
                if apq == 0.0 {
                    continue;
                }
                let theta = (a.get(q, q) - a.get(p, p)) / (2.0 * apq);
                // The smaller root of t² + 2θt − 1 = 0, so the rotation angle is at most π/4.
                let t = if theta.abs() > 1e150 {
                    0.5 / theta
                } else {
                    theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt())
                };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a.get(k, p), a.get(k, q));
                    a.set(k, p, c * akp - s * akq);
                    a.set(k, q, s * akp + c * akq);
                }
                for k in 0..n {
                    let (apk, aqk) = (a.get(p, k), a.get(q, k));
                    a.set(p, k, c * apk - s * aqk);
                    a.set(q, k, s * apk + c * aqk);
                }
                for k in 0..n {
                    let (vkp, vkq) = (v.get(k, p), v.get(k, q));
                    v.set(k, p, c * vkp - s * vkq);
                    v.set(k, q, s * vkp + c * vkq);
                }
            }
        }
    }
    if !converged {
        return Err(PeftError::Unsupported(format!(
            "Jacobi eigendecomposition of a {n}×{n} matrix did not converge in \
             {MAX_JACOBI_SWEEPS} sweeps"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a.get(i, i).total_cmp(&a.get(j, j)));
    let values = order.iter().map(|&i| a.get(i, i)).collect();
    let mut vectors = SmallMatrix::zeros(n, n);
    for (new, &old) in order.iter().enumerate() {
        for k in 0..n {
            vectors.set(k, new, v.get(k, old));
        }
    }
    Ok(SymmetricEigen { values, vectors })
}

/// Solves `P·X + X·Q = C` for symmetric `P` (r×r) and `Q` (c×c) given their
/// eigendecompositions: `X = Q_p·[(Q_pᵀ·C·Q_q)_ij / (λ_i + μ_j)]·Q_qᵀ`. Where
/// `|λ_i + μ_j| ≤ `[`RELATIVE_CUTOFF`]`·(max|λ| + max|μ|)` the equation does not determine that
/// component (to working precision) and it is set to 0 (the minimum-norm choice).
pub fn solve_sylvester(
    p: &SymmetricEigen,
    q: &SymmetricEigen,
    c: &SmallMatrix,
) -> Result<SmallMatrix> {
    let (r, k) = (p.values.len(), q.values.len());
    if (c.rows, c.cols) != (r, k) {
        return Err(PeftError::ShapeMismatch {
            key: "Sylvester right-hand side".into(),
            expected: vec![r, k],
            got: vec![c.rows, c.cols],
        });
    }
    let scale = p.values.iter().fold(0.0f64, |m, v| m.max(v.abs()))
        + q.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let cutoff = RELATIVE_CUTOFF * scale;
    let mut y = p.vectors.transpose().matmul(c)?.matmul(&q.vectors)?;
    for i in 0..r {
        for j in 0..k {
            let d = p.values[i] + q.values[j];
            let v = if d.abs() > cutoff {
                y.get(i, j) / d
            } else {
                0.0
            };
            y.set(i, j, v);
        }
    }
    p.vectors.matmul(&y)?.matmul(&q.vectors.transpose())
}

/// `lhs · rhs` in f64, returned as a small CPU matrix (for products that are r×r).
fn product_f64(lhs: &Tensor, rhs: &Tensor) -> Result<SmallMatrix> {
    let l = lhs.to_dtype(DType::F64)?;
    let r = rhs.to_dtype(DType::F64)?;
    SmallMatrix::from_tensor(&l.matmul(&r)?)
}

/// The r×r algebra of one adapted matrix at one step: `A`, `B`, `s`, the eigendecompositions
/// of `BᵀB` and `AAᵀ` and the damped inverses `M_B⁻¹`, `M_A⁻¹` (see the module docs).
#[derive(Clone, Debug)]
pub struct LoraProFactors {
    a: Tensor,
    b: Tensor,
    scaling: f64,
    btb: SymmetricEigen,
    aat: SymmetricEigen,
    /// `None` when `B = 0`: then `P_B = 0` and every `M_B⁻¹` term vanishes.
    mb_inv: Option<SmallMatrix>,
    ma_inv: SmallMatrix,
}

impl LoraProFactors {
    /// `a: [r, in]`, `b: [out, r]` (same dtype and device), the layer's scaling `s ≠ 0` and the
    /// damping `δ ≥ 0` of the inverses.
    pub fn new(a: &Tensor, b: &Tensor, scaling: f64, damping: f64) -> Result<Self> {
        let (r, _) = a.dims2()?;
        let (_, rb) = b.dims2()?;
        if rb != r {
            return Err(PeftError::ShapeMismatch {
                key: "lora_B".into(),
                expected: vec![b.dim(0)?, r],
                got: b.dims().to_vec(),
            });
        }
        if a.dtype() != b.dtype() {
            return Err(PeftError::Unsupported(format!(
                "LoRA-Pro: lora_A is {:?} but lora_B is {:?}",
                a.dtype(),
                b.dtype()
            )));
        }
        if !(scaling.is_finite() && scaling != 0.0) {
            return Err(PeftError::config(
                "scaling",
                format!("LoRA-Pro needs a finite, non-zero scaling s, got {scaling}"),
            ));
        }
        if !(damping.is_finite() && damping >= 0.0) {
            return Err(PeftError::config(
                "damping",
                format!("must be finite and ≥ 0, got {damping}"),
            ));
        }
        let btb_m = product_f64(&b.t()?, b)?;
        let aat_m = product_f64(a, &a.t()?)?;
        let btb = symmetric_eigen(&btb_m)?;
        let aat = symmetric_eigen(&aat_m)?;
        // trace(BᵀB) = ‖B‖²_F is 0 exactly when every entry of B is 0.
        let b_is_zero = (0..r).all(|i| btb_m.get(i, i) == 0.0);
        let mb_inv = (!b_is_zero).then(|| btb.damped_inverse(damping));
        let ma_inv = aat.damped_inverse(damping);
        Ok(Self {
            a: a.clone(),
            b: b.clone(),
            scaling,
            btb,
            aat,
            mb_inv,
            ma_inv,
        })
    }

    /// The LoRA rank `r`.
    pub fn rank(&self) -> usize {
        self.ma_inv.rows
    }

    /// The layer's scaling `s`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// Whether `B = 0` exactly (the first step from PEFT's init).
    pub fn b_is_zero(&self) -> bool {
        self.mb_inv.is_none()
    }

    fn small(&self, m: &SmallMatrix) -> Result<Tensor> {
        m.to_tensor(self.a.dtype(), self.a.device())
    }

    fn check_grads(&self, g_a: &Tensor, g_b: &Tensor) -> Result<()> {
        for (key, g, want) in [("lora_A", g_a, &self.a), ("lora_B", g_b, &self.b)] {
            if g.dims() != want.dims() {
                return Err(PeftError::ShapeMismatch {
                    key: format!("gradient of {key}"),
                    expected: want.dims().to_vec(),
                    got: g.dims().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// `M_B⁻¹`, or the zero matrix when `B = 0`.
    fn mb_inv(&self) -> SmallMatrix {
        let r = self.rank();
        self.mb_inv
            .clone()
            .unwrap_or_else(|| SmallMatrix::zeros(r, r))
    }

    /// The LoRA gradients a full gradient `G: [out, in]` induces: `(s·Bᵀ·G, s·G·Aᵀ)`.
    pub fn lora_gradients(&self, g_full: &Tensor) -> Result<(Tensor, Tensor)> {
        let g = g_full.to_dtype(self.a.dtype())?;
        let g_a = (self.b.t()?.matmul(&g)? * self.scaling)?;
        let g_b = (g.matmul(&self.a.t()?)? * self.scaling)?;
        Ok((g_a, g_b))
    }

    /// The equivalent gradient `g̃ = s·B·g^A + s·g^B·A` `[out, in]` from the LoRA gradients,
    /// without forming `G`.
    pub fn equivalent_gradient(&self, g_a: &Tensor, g_b: &Tensor) -> Result<Tensor> {
        self.check_grads(g_a, g_b)?;
        let inv_s = 1.0 / self.scaling;
        let k = self.mb_inv();
        let bt_gb = product_f64(&self.b.t()?, g_b)?;
        // g̃ = [B | g_B] · [ (1/s)K·g_A − (1/s)K(Bᵀg_B)M_A⁻¹·A ; (1/s)M_A⁻¹·A ]
        let t1 = self.small(&k.scale(inv_s))?;
        let t2 = self.small(&k.matmul(&bt_gb)?.matmul(&self.ma_inv)?.scale(-inv_s))?;
        let t3 = self.small(&self.ma_inv.scale(inv_s))?;
        let top = Tensor::cat(&[&t1, &t2], 1)?.matmul(&Tensor::cat(&[g_a, &self.a], 0)?)?;
        let bottom = t3.matmul(&self.a)?;
        let left = Tensor::cat(&[&self.b, g_b], 1)?;
        Ok(left.matmul(&Tensor::cat(&[&top, &bottom], 0)?)?)
    }

    /// X of Theorem 2.3: the solution of `(BᵀB)·X + X·(AAᵀ) = −(1/s²)·M_B⁻¹·g_A·Aᵀ`.
    pub fn sylvester_x(&self, g_a: &Tensor) -> Result<SmallMatrix> {
        let r = self.rank();
        let Some(k) = &self.mb_inv else {
            // B = 0: the right-hand side is 0, and so is X.
            return Ok(SmallMatrix::zeros(r, r));
        };
        let ga_at = product_f64(g_a, &self.a.t()?)?;
        let c = k
            .matmul(&ga_at)?
            .scale(-1.0 / (self.scaling * self.scaling));
        solve_sylvester(&self.btb, &self.aat, &c)
    }

    /// The adjusted gradients `(g^A, g^B)` of Theorem 2.1 for a given `X` (r×r).
    pub fn adjusted_gradients(
        &self,
        g_a: &Tensor,
        g_b: &Tensor,
        x: &SmallMatrix,
    ) -> Result<(Tensor, Tensor)> {
        self.check_grads(g_a, g_b)?;
        let r = self.rank();
        if (x.rows, x.cols) != (r, r) {
            return Err(PeftError::ShapeMismatch {
                key: "X".into(),
                expected: vec![r, r],
                got: vec![x.rows, x.cols],
            });
        }
        let inv_s2 = 1.0 / (self.scaling * self.scaling);
        let k = self.mb_inv();
        // g^A = [(1/s²)K | X] · [g_A ; A]
        let left_a = Tensor::cat(&[&self.small(&k.scale(inv_s2))?, &self.small(x)?], 1)?;
        let g_a_adj = left_a.matmul(&Tensor::cat(&[g_a, &self.a], 0)?)?;
        // g^B = [g_B | B] · [(1/s²)M_A⁻¹ ; −(1/s²)K(Bᵀg_B)M_A⁻¹ − X]
        let bt_gb = product_f64(&self.b.t()?, g_b)?;
        let lower = k
            .matmul(&bt_gb)?
            .matmul(&self.ma_inv)?
            .scale(-inv_s2)
            .sub(x)?;
        let right_b = Tensor::cat(
            &[
                &self.small(&self.ma_inv.scale(inv_s2))?,
                &self.small(&lower)?,
            ],
            0,
        )?;
        let g_b_adj = Tensor::cat(&[g_b, &self.b], 1)?.matmul(&right_b)?;
        Ok((g_a_adj, g_b_adj))
    }

    /// The adjusted gradients with X from the Sylvester equation on `g_A` (the paper's choice).
    pub fn adjust(&self, g_a: &Tensor, g_b: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.sylvester_x(g_a)?;
        self.adjusted_gradients(g_a, g_b, &x)
    }
}
