//! SVFit: train the top-r singular values of the pretrained weight (Sun et al., 2024, "SVFit:
//! Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
//! arXiv:2409.05926). No reference code is public; this follows the paper's description.
//!
//! Shapes, for a base weight `W: [out, in]` (linear) or `[out, in_g, kh, kw]` flattened to
//! `[out, in_g·kh·kw]` (conv2d), `k = min` of the two:
//! - init: the thin SVD `W = U diag(σ) Vᵀ` (canonical signs, see [`crate::linalg`]); keep the top
//!   r triplets `U_r: [out, r]`, `σ_r: [r]`, `V_rᵀ: [r, in]`. The rank is `r` when given,
//!   otherwise the smallest r with `Σ_{i≤r} σᵢ² ≥ energy · ‖W‖_F²` (`energy` 0.99 by default).
//! - trainable: `σ' : [r]`, initialised to `σ_r`. Frozen: `U_r`, `V_r`, `σ_r`.
//! - `ΔW = U_r diag(σ' − σ_r) V_rᵀ`: exactly 0 at init, so `W + ΔW` is the pretrained layer and
//!   the base weight is never modified (the paper's residual form `W_e + U_r diag(σ') V_rᵀ` is
//!   the same function).
//! - forward (activation space): `Δ(x) = ((x V_r) ⊙ (σ' − σ_r)) U_rᵀ`; conv2d: a conv with the
//!   r filters of `V_rᵀ`, a per-channel scale, a 1×1 conv with `U_r`.
//! - gradient: `∂L/∂σ'ᵢ = u_iᵀ G v_i`, the diagonal of `U_rᵀ G V_r` with `G = ∂L/∂W`.
//!
//! Weight decay must not touch `σ'`: it would shrink the principal spectrum of W towards 0.
//! [`Adapter::no_weight_decay`] names it, and the trainer's AdamW skips it.
//!
//! File (`peft_type` "SVFIT"), per adapted module: `svfit_S.weight` (`σ'`, `[r]`),
//! `svfit_S0.weight` (`σ_r`, `[r]`), `svfit_U.weight` (`[out, r]`), `svfit_Vh.weight`
//! (`[r, in_flat]`), all f32. The bases are stored because a new SVD of W need not reproduce the
//! same vectors (ties, rounding), and the merge needs no base weight to rebuild them.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::adapter::{
    Adapter, CliSpec, LayerGeometry, Method, MethodSpec, OptionKind, OptionSpec, TensorRoles,
};
use crate::adapters::factored::{
    Factors, SVD_DTYPE, f64_precision, precision_or_f64, weight_matrix,
};
use crate::adapters::support::{flat_dims, saved_len, saved_tensor};
use crate::config::{
    CommonFields, ConfigFields, InitContext, LoadContext, MethodConfig, Targeting, peft_json,
};
use crate::error::{PeftError, Result};
use crate::linalg::{self, Precision, RankRule, TruncatedSvdOptions};

/// SVFit's registry entry. CLI: `--rank` fixes r; otherwise `--opt energy=…` (default 0.99)
/// picks it. No alpha, no dropout.
pub const METHOD: Method = Method::new(&MethodSpec {
    name: "svfit",
    aliases: &[],
    peft_type: "SVFIT",
    summary: "train the top-r singular values of the weight",
    tensors: TensorRoles {
        prefixes: &["svfit_S", "svfit_S0", "svfit_U", "svfit_Vh"],
        frozen: &["svfit_S0", "svfit_U", "svfit_Vh"],
        rank: Some(SIGMA),
    },
    cli: CliSpec {
        defaults: "{}",
        rank: Some("r"),
        alpha: None,
        alpha_per_rank: None,
        dropout: None,
        options: &[
            OptionSpec {
                key: "energy",
                path: "energy",
                kind: OptionKind::Float,
                help: "share of ‖W‖² the kept singular values hold, picks r per layer (0.99)",
                excludes: Some("--rank"),
            },
            SVD_DTYPE,
        ],
    },
    needs_calibration: false,
    lora_pro_optimizer: false,
});

/// The sign rule recorded in the config (see [`crate::linalg`]).
pub const SVD_SIGN_RULE: &str = "max_abs_entry_of_u_positive";

const SIGMA: &str = "svfit_S.weight";
const SIGMA0: &str = "svfit_S0.weight";
const U: &str = "svfit_U.weight";
const VH: &str = "svfit_Vh.weight";

/// SVFit's configuration ([`Default`]: rank by `energy` 0.99, f64 SVD; no `target_modules`,
/// which [`validate`](Self::validate) requires).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct SvfitConfig {
    /// Which modules are adapted.
    #[serde(flatten)]
    pub targeting: Targeting,
    /// A fixed rank for every module; `None` picks it per module by `energy`.
    pub r: Option<usize>,
    /// Share of `‖W‖_F²` the kept singular values must hold, in (0, 1] (when `r` is `None`).
    pub energy: f64,
    /// Precision of the SVD, f64 by default (the factors are stored in f32 either way; see
    /// [`linalg::top_svd`] for the method each precision uses).
    #[serde(default = "f64_precision", deserialize_with = "precision_or_f64")]
    pub svd_dtype: Precision,
    /// `task_type`, `base_model_name_or_path`, `revision`, `inference_mode`.
    #[serde(flatten)]
    pub common: CommonFields,
}

impl Default for SvfitConfig {
    /// The rank from the energy rule (0.99), an f64 SVD; no `target_modules`.
    fn default() -> Self {
        Self {
            targeting: Targeting::default(),
            r: None,
            energy: 0.99,
            svd_dtype: Precision::F64,
            common: CommonFields::default(),
        }
    }
}

impl SvfitConfig {
    /// A config targeting `targets` whose rank comes from the energy rule (0.99).
    pub fn new<S: AsRef<str>>(targets: &[S]) -> Self {
        Self {
            targeting: Targeting::new(crate::config::ModuleSelector::list(targets)),
            ..Self::default()
        }
    }

    /// A config with a fixed rank `r`.
    pub fn with_rank<S: AsRef<str>>(targets: &[S], r: usize) -> Self {
        Self {
            r: Some(r),
            ..Self::new(targets)
        }
    }

    /// Checks every field, without looking at a model.
    pub fn validate(&self) -> Result<()> {
        self.targeting.validate()?;
        if self.r == Some(0) {
            return Err(PeftError::config("r", "rank must be at least 1, got 0"));
        }
        if !(self.energy > 0.0 && self.energy <= 1.0) {
            return Err(PeftError::config(
                "energy",
                format!("must be in (0, 1], got {}", self.energy),
            ));
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
            "energy": self.energy,
            "peft_type": METHOD.peft_type(),
            "r": self.r,
            "svd_dtype": self.svd_dtype.name(),
            "svd_sign_rule": SVD_SIGN_RULE,
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
    ) -> Result<SvfitAdapter> {
        let w = weight_matrix(module, geometry, base_weight)?;
        let (out, in_flat) = flat_dims(geometry);
        let k = out.min(in_flat);
        let rule = match self.r {
            Some(r) if r > k => {
                return Err(PeftError::layer(
                    module,
                    format!("SVFit rank {r} exceeds min(out, in) = min({out}, {in_flat}) = {k}"),
                ));
            }
            Some(r) => RankRule::Fixed(r),
            None => RankRule::Energy(self.energy),
        };
        if matches!(rule, RankRule::Energy(_)) && w.sqr()?.sum_all()?.to_scalar::<f32>()? == 0.0 {
            return Err(PeftError::layer(
                module,
                "the base weight is all zeros: it has no singular directions to train",
            ));
        }
        let opts = TruncatedSvdOptions {
            precision: self.svd_dtype,
            seed: crate::init::seed_from_name(module),
            ..TruncatedSvdOptions::default()
        };
        let svd = linalg::top_svd(&w, rule, &opts)?;
        let to_f32 = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?.to_device(device)?.contiguous()?)
        };
        let u = to_f32(&svd.u)?;
        let vh = to_f32(&svd.v.t()?)?;
        let s = to_f32(&svd.s)?;
        SvfitAdapter::new(geometry, u, vh, s.clone(), Var::from_tensor(&s)?)
    }

    /// The adapter of one module from its saved tensors (the base weight is not needed).
    pub fn load_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        tensors: &BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<SvfitAdapter> {
        let (out, in_flat) = flat_dims(geometry);
        let r = saved_len(module, tensors, SIGMA)?;
        if self.r.is_some_and(|want| want != r) {
            return Err(PeftError::layer(
                module,
                format!(
                    "the file holds rank {r} but the config says r = {:?}",
                    self.r
                ),
            ));
        }
        if r == 0 || r > out.min(in_flat) {
            return Err(PeftError::layer(
                module,
                format!("the file's rank {r} is not in 1..=min(out, in) = min({out}, {in_flat})"),
            ));
        }
        let get = |name: &str, shape: &[usize]| {
            saved_tensor(module, tensors, name, shape, DType::F32, device)
        };
        let sigma = get(SIGMA, &[r])?;
        let sigma0 = get(SIGMA0, &[r])?;
        let u = get(U, &[out, r])?;
        let vh = get(VH, &[r, in_flat])?;
        SvfitAdapter::new(geometry, u, vh, sigma0, Var::from_tensor(&sigma)?)
    }
}

impl ConfigFields for SvfitConfig {
    fn fields(&self) -> (&Targeting, &CommonFields) {
        (&self.targeting, &self.common)
    }

    fn fields_mut(&mut self) -> (&mut Targeting, &mut CommonFields) {
        (&mut self.targeting, &mut self.common)
    }
}

impl MethodConfig for SvfitConfig {
    fn method(&self) -> Method {
        METHOD
    }

    fn validate(&self) -> Result<()> {
        SvfitConfig::validate(self)
    }

    fn to_peft_json(&self) -> Result<Value> {
        SvfitConfig::to_peft_json(self)
    }

    fn init_adapter(
        &self,
        ctx: &InitContext<'_>,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(SvfitConfig::init_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.base_weight,
            ctx.device,
        )?))
    }

    fn load_adapter(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(SvfitConfig::load_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.tensors,
            ctx.device,
        )?))
    }
}

/// One SVFit adapter on one layer.
#[derive(Debug)]
pub struct SvfitAdapter {
    /// `A = V_rᵀ`, `B = U_r`.
    factors: Factors,
    sigma0: Tensor,
    sigma: Var,
}

impl SvfitAdapter {
    fn new(
        geometry: LayerGeometry,
        u: Tensor,
        vh: Tensor,
        sigma0: Tensor,
        sigma: Var,
    ) -> Result<Self> {
        Ok(Self {
            factors: Factors::new(geometry, vh, u)?,
            sigma0,
            sigma,
        })
    }

    /// The number of kept singular values `r`.
    pub fn rank(&self) -> usize {
        self.factors.k()
    }

    /// `U_r: [out, r]`.
    pub fn u(&self) -> &Tensor {
        self.factors.b()
    }

    /// `V_rᵀ: [r, in_flat]`.
    pub fn vh(&self) -> &Tensor {
        self.factors.a()
    }

    /// `σ_r`, the pretrained singular values.
    pub fn sigma0(&self) -> &Tensor {
        &self.sigma0
    }

    /// `σ'`, the trained singular values.
    pub fn sigma(&self) -> &Var {
        &self.sigma
    }

    fn shift(&self) -> Result<Tensor> {
        Ok(self.sigma.as_tensor().sub(&self.sigma0)?)
    }
}

impl Adapter for SvfitAdapter {
    fn method(&self) -> Method {
        METHOD
    }

    fn forward_delta(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let (h, spatial) = self.factors.project_in(x)?;
        let h = h.broadcast_mul(&self.shift()?)?;
        self.factors.project_out(&h, spatial)
    }

    fn delta_weight(&self) -> Result<Tensor> {
        self.factors.dense_diag(&self.shift()?)
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![(SIGMA.to_string(), self.sigma.clone())]
    }

    fn no_weight_decay(&self) -> Vec<String> {
        vec![SIGMA.to_string()]
    }

    fn tensors_to_save(&self) -> Vec<(String, Tensor)> {
        vec![
            (SIGMA.to_string(), self.sigma.as_tensor().clone()),
            (SIGMA0.to_string(), self.sigma0.clone()),
            (U.to_string(), self.factors.b().clone()),
            (VH.to_string(), self.factors.a().clone()),
        ]
    }
}
