//! CorDA's calibration and decomposition (steps 1–5 of [`crate::adapters::corda`]): the
//! normalised covariance of each input group, the damped inverse, the covariance-oriented SVD of
//! every targeted weight, and the split into the initial factors `A`, `B`.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::batch::CalibrationBatch;
use super::calibrator::{InputGroup, RowStatistic};
use super::pass::{CalibrationOptions, collect, target_layers, with_base_model};
use crate::adapters::corda::{CordaConfig, CordaFactors, CordaMethod};
use crate::error::{PeftError, Result};
use crate::layer::LayerHandle;
use crate::linalg::{self, Precision};
use crate::model::PeftModel;

/// Covariance of one input group's rows with the reference normalisation (step 1): each
/// sequence divided by the magnitude of its own largest entry, as PEFT's hook does with one
/// sequence per forward.
#[derive(Debug)]
pub struct CovarianceStatistic {
    layer: String,
    sum: Option<Tensor>,
    sequences: usize,
}

impl CovarianceStatistic {
    /// `layer` names the group in errors.
    pub fn new(layer: impl Into<String>) -> Self {
        Self {
            layer: layer.into(),
            sum: None,
            sequences: 0,
        }
    }

    /// Sequences accumulated (those with at least one counted token).
    pub fn sequences(&self) -> usize {
        self.sequences
    }

    /// `C = Σ_sequences (X/|max X|)ᵀ (X/|max X|) / sequences`, `[in, in]` f64 on the CPU, with
    /// `X` a sequence's counted rows.
    pub fn covariance(&self) -> Result<Tensor> {
        match &self.sum {
            Some(sum) if self.sequences > 0 => {
                let c =
                    (sum.to_device(&Device::Cpu)?.to_dtype(DType::F64)? / self.sequences as f64)?;
                // A non-finite input entry reaches the sum, so one check at the end finds it.
                if let Some((i, v)) = linalg::first_non_finite(&c)? {
                    let n = c.dim(0)?;
                    return Err(PeftError::layer(
                        &self.layer,
                        format!(
                            "CorDA: the covariance has a non-finite entry ({v} at [{}, {}]): \
                             the calibration inputs are not finite",
                            i / n,
                            i % n
                        ),
                    ));
                }
                Ok(c)
            }
            _ => Err(PeftError::layer(
                &self.layer,
                "CorDA: no calibration rows were accumulated",
            )),
        }
    }
}

impl RowStatistic for CovarianceStatistic {
    /// `rows` as one sequence.
    fn update(&mut self, rows: &Tensor) -> Result<()> {
        let n = rows.dim(0)?;
        self.update_sequences(rows, &[n])
    }

    /// Each sequence's rows divided by `|max|` of its own entries (the signed maximum, then its
    /// magnitude, as the reference), then `C += Σ Xᵀ X` in one product.
    fn update_sequences(&mut self, rows: &Tensor, lengths: &[usize]) -> Result<()> {
        let n = rows.dim(0)?;
        if lengths.iter().sum::<usize>() != n {
            return Err(PeftError::layer(
                &self.layer,
                format!(
                    "CorDA: {n} calibration rows do not split into sequences of {lengths:?} rows"
                ),
            ));
        }
        let row_max = rows.max_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
        let mut scales = Vec::with_capacity(n);
        let mut start = 0;
        for (s, &len) in lengths.iter().enumerate() {
            let max =
                row_max[start..start + len]
                    .iter()
                    .copied()
                    .fold(
                        f32::NEG_INFINITY,
                        |a, b| if b > a || b.is_nan() { b } else { a },
                    );
            let scale = max.abs();
            if !(scale.is_finite() && scale > 0.0) {
                return Err(PeftError::layer(
                    &self.layer,
                    format!(
                        "CorDA: the largest entry of calibration sequence {s} of a batch is \
                         {max}; the reference normalisation divides by |max(X)| and cannot use it"
                    ),
                ));
            }
            scales.extend(std::iter::repeat_n(scale, len));
            start += len;
        }
        let scales = Tensor::from_vec(scales, (n, 1), rows.device())?;
        let x = rows.broadcast_div(&scales)?;
        let xtx = x.t()?.matmul(&x)?;
        self.sum = Some(match self.sum.take() {
            Some(s) => (s + xtx)?,
            None => xtx,
        });
        self.sequences += lengths.len();
        Ok(())
    }
}

/// `Ĉ = C + damp·mean(diag C)·I` and its inverse, from the damping loop of step 2.
#[derive(Clone, Debug)]
pub struct DampedInverse {
    /// `Ĉ`, `[in, in]` f64.
    pub damped: Tensor,
    /// `Ĉ⁻¹`, `[in, in]` f64.
    pub inverse: Tensor,
    /// The final `damp`.
    pub damp: f64,
    /// `‖Ĉ Ĉ⁻¹ − I‖_F` (< 0.05).
    pub inverse_error: f64,
}

/// Doublings of `damp` tried before giving up (0.01 · 2⁶⁰ is far beyond any useful damping).
const MAX_DAMPING_STEPS: usize = 60;

/// PEFT's damping loop (step 2) on `c: [in, in]`, in f64; `layer` names the layer in errors.
pub fn damped_inverse(c: &Tensor, layer: &str) -> Result<DampedInverse> {
    let c = c.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let (n, m) = c.dims2()?;
    if n != m {
        return Err(PeftError::layer(
            layer,
            format!("CorDA: the covariance must be square, got [{n}, {m}]"),
        ));
    }
    let mean_diag = c
        .to_vec2::<f64>()?
        .iter()
        .enumerate()
        .map(|(i, row)| row[i])
        .sum::<f64>()
        / n as f64;
    if !(mean_diag.is_finite() && mean_diag > 0.0) {
        return Err(PeftError::layer(
            layer,
            format!(
                "CorDA: the covariance has mean diagonal {mean_diag}; the calibration inputs \
                 carry no signal"
            ),
        ));
    }
    let eye = Tensor::eye(n, DType::F64, &Device::Cpu)?;
    let mut damp = 0.01;
    for _ in 0..MAX_DAMPING_STEPS {
        let damped = (&c + (&eye * (damp * mean_diag))?)?;
        if let Ok(inverse) = linalg::inverse(&damped, Precision::F64) {
            let residual = (damped.matmul(&inverse)? - &eye)?;
            let err = residual.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
            if err < 0.05 {
                return Ok(DampedInverse {
                    damped,
                    inverse,
                    damp,
                    inverse_error: err,
                });
            }
        }
        damp *= 2.0;
    }
    Err(PeftError::layer(
        layer,
        format!("CorDA: the damped covariance could not be inverted (damp reached {damp:e})"),
    ))
}

/// The covariance-oriented decomposition of step 3: `W = U diag(S) Vᵀ` with `U: [out, k]`
/// orthonormal, `S: [k]` non-increasing, `V = (Vh Ĉ⁻¹)ᵀ: [in, k]`, all f64 on the CPU.
#[derive(Clone, Debug)]
pub struct CordaDecomposition {
    /// `[out, k]`, orthonormal columns.
    pub u: Tensor,
    /// `[k]`, non-increasing.
    pub s: Tensor,
    /// `[in, k]`, `(Vh Ĉ⁻¹)ᵀ` (not orthonormal).
    pub v: Tensor,
}

/// Step 3 for `w: [out, in]` (any dtype) and the damped covariance.
pub fn oriented_svd(w: &Tensor, c: &DampedInverse) -> Result<CordaDecomposition> {
    let w = w.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let wc = w.matmul(&c.damped)?;
    let svd = linalg::thin_svd(&wc, Precision::F64)?;
    // V = (Vh Ĉ⁻¹)ᵀ = Ĉ⁻ᵀ Vhᵀ, and Vhᵀ is linalg's V.
    let v = c.inverse.t()?.matmul(&svd.v)?;
    Ok(CordaDecomposition {
        u: svd.u,
        s: svd.s,
        v,
    })
}

/// Steps 4–5: the `r` components `method` picks, split with scaling `s`: `(A [r, in], B [out, r])`
/// in f32 with `s·B A = U_r diag(S_r) V_rᵀ`.
pub fn split_factors(
    dec: &CordaDecomposition,
    r: usize,
    method: CordaMethod,
    scaling: f64,
    layer: &str,
) -> Result<CordaFactors> {
    let k = dec.s.dim(0)?;
    if r == 0 || r > k {
        return Err(PeftError::layer(
            layer,
            format!("CorDA rank {r} must be in 1..=min(in, out) = {k}"),
        ));
    }
    let start = match method {
        CordaMethod::Ipm => 0,
        CordaMethod::Kpm => k - r,
    };
    let u = dec.u.narrow(1, start, r)?;
    let s = dec.s.narrow(0, start, r)?;
    let v = dec.v.narrow(1, start, r)?;
    let root = (s / scaling)?.sqrt()?;
    let a = v.t()?.broadcast_mul(&root.unsqueeze(1)?)?;
    let b = u.broadcast_mul(&root.unsqueeze(0)?)?;
    Ok(CordaFactors {
        a: a.to_dtype(DType::F32)?.contiguous()?,
        b: b.to_dtype(DType::F32)?.contiguous()?,
    })
}

/// Settings of a CorDA calibration.
#[derive(Clone, Debug, Default)]
pub struct CordaOptions {
    /// Progress reporting of the calibration pass.
    pub calibration: CalibrationOptions,
}

/// What the calibration produced, per targeted layer.
#[derive(Clone, Debug)]
pub struct CordaState {
    /// Layer → its initial factors.
    pub factors: BTreeMap<String, CordaFactors>,
    /// Layer → (usable calibration rows, final damp).
    pub layers: BTreeMap<String, (usize, f64)>,
    /// Names of the layers of each input group with more than one member.
    pub shared_inputs: Vec<Vec<String>>,
}

/// Runs CorDA's calibration and decomposition (steps 1–5) on `model`'s base model: each of
/// `batches` once, `forward(model, batch)` running one forward. A layer whose group saw fewer
/// usable rows than its rank is an error naming it.
pub fn corda_factors<M>(
    model: &mut PeftModel<M>,
    config: &CordaConfig,
    batches: &[CalibrationBatch],
    mut forward: impl FnMut(&M, &CalibrationBatch) -> Result<()>,
    options: &CordaOptions,
) -> Result<CordaState> {
    config.validate()?;
    let (linear, other) = target_layers(model, &config.targeting)?;
    if let Some(layer) = other.first() {
        return Err(PeftError::layer(
            layer.name(),
            "CorDA adapts linear layers only (this one is a conv2d)",
        ));
    }
    let names: Vec<String> = linear.iter().map(LayerHandle::name).collect();
    let collected = with_base_model(model, |model| {
        let inner = model.model();
        collect(
            linear.clone(),
            batches,
            |b| forward(inner, b),
            |g, layers| Ok(CovarianceStatistic::new(group_label(g, layers))),
            &options.calibration,
            "CorDA",
        )
    })?;
    let mut factors = BTreeMap::new();
    let mut layers = BTreeMap::new();
    let mut shared_inputs = Vec::new();
    for (group, stat, rows) in collected {
        if group.members.len() > 1 {
            shared_inputs.push(group.members.iter().map(|&m| names[m].clone()).collect());
        }
        for &m in &group.members {
            let (r, _, _) = config.resolve(&names[m])?;
            if rows < r {
                return Err(PeftError::layer(
                    &names[m],
                    format!(
                        "CorDA: the calibration data gives {rows} usable rows (tokens) for this \
                         layer, fewer than its rank {r}; use more calibration data or a smaller rank"
                    ),
                ));
            }
        }
        let c = stat.covariance()?;
        drop(stat);
        let damped = damped_inverse(&c, &names[group.leader])?;
        drop(c);
        for &m in &group.members {
            let name = &names[m];
            let (r, _, scaling) = config.resolve(name)?;
            let dec = oriented_svd(&linear[m].frozen_weight().to_f32()?, &damped)?;
            factors.insert(
                name.clone(),
                split_factors(&dec, r, config.corda_method, scaling, name)?,
            );
            layers.insert(name.clone(), (rows, damped.damp));
        }
    }
    Ok(CordaState {
        factors,
        layers,
        shared_inputs,
    })
}

fn group_label(g: &InputGroup, layers: &[LayerHandle]) -> String {
    g.members
        .iter()
        .map(|&m| layers[m].name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Calibrates, then adds adapter `name` initialised by CorDA. The model's output is unchanged.
pub fn add_corda_adapter<M>(
    model: &mut PeftModel<M>,
    name: &str,
    config: CordaConfig,
    batches: &[CalibrationBatch],
    forward: impl FnMut(&M, &CalibrationBatch) -> Result<()>,
    options: &CordaOptions,
) -> Result<CordaState> {
    if model.adapter_names().iter().any(|n| n == name) {
        return Err(PeftError::DuplicateAdapter(name.to_string()));
    }
    let state = corda_factors(model, &config, batches, forward, options)?;
    model.add_adapter(name, config.with_init(state.factors.clone()))?;
    Ok(state)
}
