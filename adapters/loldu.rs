//! LoLDU: Lower-Diag-Upper low-rank adaptation (Shi et al., 2024, "LoLDU: Low-Rank Adaptation
//! via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning", arXiv:2410.13618;
//! reference code `SKDDJ/LoLDU`).
//!
//! Shapes, for a base weight `W: [out, in]` (linear) or `[out, in_g, kh, kw]` flattened to
//! `[out, in_g·kh·kw]` (conv2d), `k = min` of the two:
//! - init: the LU decomposition of the whole weight with partial (row) pivoting,
//!   `W[perm[i], :] = (L U)[i, :]` (`W = P L U`, `torch.linalg.lu`'s convention; see
//!   [`crate::linalg::lu`]), `D = diag(U)`, `Ū = U / D` row by row, so `W = P L diag(D) Ū`. Keep
//!   the first r pivots (not the r largest): `L_r = L[:, :r]`, `D_r = D[:r]`, `Ū_r = Ū[:r, :]`.
//!   A (numerically) zero pivot among them is an error.
//! - trainable: `z: [r]`, initialised to `D_r`. Frozen: `L_r`, `Ū_r`, `D_r`, `perm`; the scale
//!   `σ = lora_alpha / r` (`lora_alpha = 1` as the reference's `from_linear`).
//! - `ΔW = σ · (P L_r) diag(z − D_r) Ū_r`: exactly 0 at init. The reference instead overwrites the
//!   base with `W − σ P L_r diag(D_r) Ū_r` and adds `σ P L_r diag(z) Ū_r`; the function is the
//!   same, but ours keeps the pristine base, so disabling and unmerging return W.
//! - forward (activation space): `Δ(x) = σ · ((x Ū_rᵀ) ⊙ (z − D_r)) (P L_r)ᵀ`; `P L_r` is `L_r`
//!   with its rows scattered by `perm`, never a dense `P`.
//! - conv2d (an extension: the reference's `from_conv2d` fails on 4-D weights): the flattened
//!   weight as above, applied as a conv with the r filters of `Ū_r`, a per-channel scale and a
//!   1×1 conv with `σ P L_r`.
//!
//! Weight decay on `z` would pull the pivots towards 0 (away from the pretrained weight), so
//! [`Adapter::no_weight_decay`] names it and the trainer's AdamW skips it.
//!
//! File (`peft_type` "LOLDU"), per adapted module: `loldu_z.weight` (`[r]`), `loldu_D.weight`
//! (`D_r`, `[r]`), `loldu_L.weight` (`L_r`, `[out, r]`), `loldu_U.weight` (`Ū_r`, `[r, in_flat]`),
//! all f32, and `loldu_perm.weight` (u32, `[out]`). The reference saves only `z` and redoes the LU
//! on load; storing the factors makes the file independent of the LU's rounding and lets a merge
//! run without the base weight.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::adapter::{
    Adapter, CliSpec, LayerGeometry, Method, MethodSpec, OptionKind, TensorRoles,
};
use crate::adapters::factored::{Factors, f64_precision, precision_or_f64, weight_matrix};
use crate::adapters::support::{flat_dims, option, saved_len, saved_tensor};
use crate::config::{
    CommonFields, ConfigFields, InitContext, LoadContext, MethodConfig, Targeting, peft_json,
};
use crate::error::{PeftError, Result};
use crate::linalg::{self, Precision};

/// LoLDU's registry entry. CLI: `--rank` is r (default 8), `--alpha` is `lora_alpha`
/// (default 1); no dropout.
pub const METHOD: Method = Method::new(&MethodSpec {
    name: "loldu",
    aliases: &[],
    peft_type: "LOLDU",
    summary: "train the diagonal of an LDU decomposition of the weight's top pivots",
    tensors: TensorRoles {
        prefixes: &["loldu_z", "loldu_D", "loldu_L", "loldu_U", "loldu_perm"],
        frozen: &["loldu_D", "loldu_L", "loldu_U", "loldu_perm"],
        rank: Some(Z),
    },
    cli: CliSpec {
        defaults: r#"{"r": 8, "lora_alpha": 1.0}"#,
        rank: Some("r"),
        alpha: Some("lora_alpha"),
        alpha_per_rank: None,
        dropout: None,
        options: &[option(
            "lu_dtype",
            OptionKind::Str,
            "precision of the LU: float64 (default) or float32",
        )],
    },
    needs_calibration: false,
    lora_pro_optimizer: false,
});

const Z: &str = "loldu_z.weight";
const D: &str = "loldu_D.weight";
const L: &str = "loldu_L.weight";
const U: &str = "loldu_U.weight";
const PERM: &str = "loldu_perm.weight";

/// LoLDU's configuration ([`Default`]: `r` 8, `lora_alpha` 1, f64 LU; no `target_modules`,
/// which [`validate`](Self::validate) requires).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct LolduConfig {
    /// Which modules are adapted.
    #[serde(flatten)]
    pub targeting: Targeting,
    /// Pivots kept per module.
    pub r: usize,
    /// `σ = lora_alpha / r`.
    pub lora_alpha: f64,
    /// Precision of the LU (the factors are stored in f32 either way).
    #[serde(default = "f64_precision", deserialize_with = "precision_or_f64")]
    pub lu_dtype: Precision,
    /// `task_type`, `base_model_name_or_path`, `revision`, `inference_mode`.
    #[serde(flatten)]
    pub common: CommonFields,
}

impl Default for LolduConfig {
    /// `r` 8, `lora_alpha` 1 (the reference's), an f64 LU; no `target_modules`.
    fn default() -> Self {
        Self {
            targeting: Targeting::default(),
            r: 8,
            lora_alpha: 1.0,
            lu_dtype: Precision::F64,
            common: CommonFields::default(),
        }
    }
}

impl LolduConfig {
    /// A config targeting `targets` with `r` pivots and `lora_alpha = 1` (σ = 1/r).
    pub fn new<S: AsRef<str>>(targets: &[S], r: usize) -> Self {
        Self {
            targeting: Targeting::new(crate::config::ModuleSelector::list(targets)),
            r,
            ..Self::default()
        }
    }

    /// `σ = lora_alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    /// Checks every field, without looking at a model.
    pub fn validate(&self) -> Result<()> {
        self.targeting.validate()?;
        if self.r == 0 {
            return Err(PeftError::config("r", "rank must be at least 1, got 0"));
        }
        if !self.lora_alpha.is_finite() {
            return Err(PeftError::config("lora_alpha", "must be finite"));
        }
        Ok(())
    }

    /// Reads `adapter_config.json` content.
    pub fn from_peft_json(value: &Value) -> Result<Self> {
        crate::config::from_json(value)
    }

    /// The `adapter_config.json` fields.
    pub fn to_peft_json(&self) -> Result<Value> {
        let fields = json!({
            "lora_alpha": self.lora_alpha,
            "lu_dtype": self.lu_dtype.name(),
            "peft_type": METHOD.peft_type(),
            "r": self.r,
        });
        peft_json(fields, &self.targeting, &self.common)
    }

    /// A fresh adapter on a layer whose weight is `base_weight`.
    pub fn init_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        base_weight: &Tensor,
        device: &Device,
    ) -> Result<LolduAdapter> {
        let w = weight_matrix(module, geometry, base_weight)?;
        let (out, in_flat) = flat_dims(geometry);
        let r = self.r;
        let k = out.min(in_flat);
        if r > k {
            return Err(PeftError::layer(
                module,
                format!("LoLDU rank {r} exceeds min(out, in) = min({out}, {in_flat}) = {k}"),
            ));
        }
        let lu = linalg::lu(&w, self.lu_dtype)?;
        let pivots =
            lu.u.narrow(0, 0, r)?
                .narrow(1, 0, r)?
                .to_dtype(DType::F64)?
                .to_device(&Device::Cpu)?
                .to_vec2::<f64>()?;
        // A pivot at rounding level relative to the weight's scale is a zero pivot: dividing
        // by it would fill Ū with noise of magnitude 1/ε.
        let scale = w
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let tol = scale * k as f64 * self.lu_dtype.epsilon();
        for (j, row) in pivots.iter().enumerate() {
            if row[j].abs() <= tol {
                return Err(PeftError::layer(
                    module,
                    format!(
                        "LoLDU: pivot {j} of the LU of the weight is zero ({:e}, weight scale {scale:e}): \
                         the weight is singular within its first {r} pivots; use a smaller rank \
                         (at most {j}) or another method",
                        row[j]
                    ),
                ));
            }
        }
        let to_f32 = |t: Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?.to_device(device)?.contiguous()?)
        };
        let d = Tensor::from_vec(
            pivots
                .iter()
                .enumerate()
                .map(|(j, row)| row[j])
                .collect::<Vec<f64>>(),
            r,
            &Device::Cpu,
        )?;
        // Ū_r = U[:r, :] / D_r, in the LU's precision before rounding to f32.
        let u_bar =
            lu.u.to_device(&Device::Cpu)?
                .narrow(0, 0, r)?
                .broadcast_div(&d.to_dtype(lu.u.dtype())?.reshape((r, 1))?)?;
        let l = lu.l.narrow(1, 0, r)?;
        let perm = Tensor::from_vec(lu.perm.clone(), out, device)?;
        let d = to_f32(d)?;
        LolduAdapter::new(
            geometry,
            self.scaling(),
            to_f32(l)?,
            to_f32(u_bar)?,
            d.clone(),
            perm,
            Var::from_tensor(&d)?,
        )
    }

    /// The adapter of one module from its saved tensors (the base weight is not needed).
    pub fn load_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        tensors: &BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<LolduAdapter> {
        let (out, in_flat) = flat_dims(geometry);
        let r = saved_len(module, tensors, Z)?;
        if r != self.r {
            return Err(PeftError::layer(
                module,
                format!(
                    "the file holds {r} pivots but the config says r = {}",
                    self.r
                ),
            ));
        }
        if r > out.min(in_flat) {
            return Err(PeftError::layer(
                module,
                format!("the file's rank {r} exceeds min(out, in) = min({out}, {in_flat})"),
            ));
        }
        let get = |name: &str, shape: &[usize], dtype: DType| {
            saved_tensor(module, tensors, name, shape, dtype, device)
        };
        let z = get(Z, &[r], DType::F32)?;
        let d = get(D, &[r], DType::F32)?;
        let l = get(L, &[out, r], DType::F32)?;
        let u_bar = get(U, &[r, in_flat], DType::F32)?;
        let perm = get(PERM, &[out], DType::U32)?;
        check_permutation(module, &perm)?;
        LolduAdapter::new(
            geometry,
            self.scaling(),
            l,
            u_bar,
            d,
            perm,
            Var::from_tensor(&z)?,
        )
    }
}

/// `perm` must hold every row index exactly once.
fn check_permutation(module: &str, perm: &Tensor) -> Result<()> {
    let values = perm.to_device(&Device::Cpu)?.to_vec1::<u32>()?;
    let mut seen = vec![false; values.len()];
    for &p in &values {
        match seen.get_mut(p as usize) {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(PeftError::layer(
                    module,
                    format!(
                        "{PERM} is not a permutation of 0..{} (entry {p})",
                        values.len()
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl ConfigFields for LolduConfig {
    fn fields(&self) -> (&Targeting, &CommonFields) {
        (&self.targeting, &self.common)
    }

    fn fields_mut(&mut self) -> (&mut Targeting, &mut CommonFields) {
        (&mut self.targeting, &mut self.common)
    }
}

impl MethodConfig for LolduConfig {
    fn method(&self) -> Method {
        METHOD
    }

    fn validate(&self) -> Result<()> {
        LolduConfig::validate(self)
    }

    fn to_peft_json(&self) -> Result<Value> {
        LolduConfig::to_peft_json(self)
    }

    fn init_adapter(
        &self,
        ctx: &InitContext<'_>,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(LolduConfig::init_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.base_weight,
            ctx.device,
        )?))
    }

    fn load_adapter(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(LolduConfig::load_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.tensors,
            ctx.device,
        )?))
    }
}

/// One LoLDU adapter on one layer.
#[derive(Debug)]
pub struct LolduAdapter {
    /// `A = Ū_r`, `B = P L_r`.
    factors: Factors,
    scaling: f64,
    l: Tensor,
    d: Tensor,
    perm: Tensor,
    z: Var,
}

impl LolduAdapter {
    fn new(
        geometry: LayerGeometry,
        scaling: f64,
        l: Tensor,
        u_bar: Tensor,
        d: Tensor,
        perm: Tensor,
        z: Var,
    ) -> Result<Self> {
        // (P L_r)[perm[i], :] = L_r[i, :], so row j of P L_r is row inverse[j] of L_r.
        let perm_host = perm.to_device(&Device::Cpu)?.to_vec1::<u32>()?;
        let mut inverse = vec![0u32; perm_host.len()];
        for (i, &p) in perm_host.iter().enumerate() {
            inverse[p as usize] = i as u32;
        }
        let inverse = Tensor::from_vec(inverse, perm_host.len(), l.device())?;
        let pl = l.index_select(&inverse, 0)?;
        Ok(Self {
            factors: Factors::new(geometry, u_bar, pl)?,
            scaling,
            l,
            d,
            perm,
            z,
        })
    }

    /// The rank `r` (number of kept pivots).
    pub fn rank(&self) -> usize {
        self.factors.k()
    }

    /// `σ = lora_alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// `L_r: [out, r]` (unit lower trapezoidal, before the row permutation).
    pub fn l(&self) -> &Tensor {
        &self.l
    }

    /// `P L_r: [out, r]`.
    pub fn permuted_l(&self) -> &Tensor {
        self.factors.b()
    }

    /// `Ū_r: [r, in_flat]` (unit diagonal).
    pub fn u_bar(&self) -> &Tensor {
        self.factors.a()
    }

    /// `D_r`, the first r pivots.
    pub fn pivots(&self) -> &Tensor {
        &self.d
    }

    /// `perm` (u32, `[out]`): row i of `L U` is row `perm[i]` of W.
    pub fn perm(&self) -> &Tensor {
        &self.perm
    }

    /// The trainable pivots `z: [r]` (initialised to `D_r`).
    pub fn z(&self) -> &Var {
        &self.z
    }

    /// `σ (z − D_r)`.
    fn core(&self) -> Result<Tensor> {
        Ok((self.z.as_tensor().sub(&self.d)? * self.scaling)?)
    }
}

impl Adapter for LolduAdapter {
    fn method(&self) -> Method {
        METHOD
    }

    fn forward_delta(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let (h, spatial) = self.factors.project_in(x)?;
        let h = h.broadcast_mul(&self.core()?)?;
        self.factors.project_out(&h, spatial)
    }

    fn delta_weight(&self) -> Result<Tensor> {
        self.factors.dense_diag(&self.core()?)
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![(Z.to_string(), self.z.clone())]
    }

    fn no_weight_decay(&self) -> Vec<String> {
        vec![Z.to_string()]
    }

    fn tensors_to_save(&self) -> Vec<(String, Tensor)> {
        vec![
            (Z.to_string(), self.z.as_tensor().clone()),
            (D.to_string(), self.d.clone()),
            (L.to_string(), self.l.clone()),
            (U.to_string(), self.factors.a().clone()),
            (PERM.to_string(), self.perm.clone()),
        ]
    }
}
