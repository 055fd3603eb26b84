//! SALT: Singular-value Adaptation with Low-rank Transformation (Elsayed et al., 2025, "SALT:
//! Parameter-Efficient Fine-Tuning via Singular Value Adaptation with Low-Rank
//! Transformation", arXiv:2503.16055; reference code `BioMedIA-MBZUAI/SALT`, the SAM2 variant).
//!
//! Shapes, for a base weight `W: [out, in]` (linear) or `[out, in_g, kh, kw]` flattened to
//! `[out, in_g·kh·kw]` (conv2d), `k = min` of the two:
//! - init: the full thin SVD `W = U diag(σ) Vᵀ` with canonical signs (see [`crate::linalg`]),
//!   split at `r_t` into the top block (`U_t`, `σ_t`, `V_t`) and the rest (`U_s`, `σ_s`, `V_s`,
//!   size `k − r_t`). `r_t` is given, or `max(1, ⌊k · ratio_salt⌋)` (ratio 0.1).
//! - trainable: scale `α: [r_t]` (ones), shift `β: [r_t]` (zeros), `X: [k − r_t, r_lora]`
//!   (`U(±√(6/r_lora))`, Kaiming-uniform for ReLU), `Y: [r_lora, k − r_t]` (zeros). `r_lora` is
//!   used as given, above `k − r_t` too, as in the reference. Trainable count
//!   `2 r_t + 2 (k − r_t) r_lora`.
//! - the reference's effective weight is `U ReLU(S_new) Vᵀ` with
//!   `S_new = blockdiag(diag(α ⊙ σ_t + β), diag(σ_s) + X Y)`, the ReLU on every entry (so off-
//!   diagonal entries of `X Y` are clipped too). Relative to the pristine W:
//!   `ΔW = U_t diag(ReLU(α ⊙ σ_t + β) − σ_t) V_tᵀ + U_s (ReLU(diag(σ_s) + X Y) − diag(σ_s)) V_sᵀ`,
//!   exactly 0 at init (`σ ≥ 0`, `Y = 0`), while `U ReLU(S_new) Vᵀ` would carry the SVD's
//!   reconstruction error.
//! - ReLU has zero gradient at 0, as in PyTorch (candle's `relu` passes it): at init the
//!   off-diagonal entries of the residual block are exactly 0, and this decides whether `Y`'s
//!   first gradient reaches them.
//! - forward (activation space): `h = x V` (`[.., k]`), `h_t ← h_t ⊙ (ReLU(α⊙σ_t+β) − σ_t)`,
//!   `h_s ← h_s Mᵀ` with `M = ReLU(diag(σ_s) + X Y) − diag(σ_s)`, `Δ(x) = [h_t, h_s] Uᵀ`;
//!   conv2d: a conv with the k filters of `Vᵀ`, the same mixing per pixel, a 1×1 conv with `U`.
//! - regulariser (the reference returns it with every forward; here a separate term, see
//!   [`SaltAdapter::regularizer`] and
//!   [`PeftModel::adapter_regularizer`](crate::PeftModel::adapter_regularizer)):
//!   `‖α ⊙ σ_t + β − σ_t‖₂ + ‖X Y‖_F` per layer. With `reg_weight = λ > 0` in the config
//!   (`--opt reg_weight=λ`; default 0, and configs written without the field load as 0) the
//!   trainer minimises `task loss + λ · Σ_layers reg` ([`crate::PeftModel::regularization_loss`]):
//!   the reported training loss includes the term, evaluation losses do not. It is 0 at init
//!   (`α = 1`, `β = 0`, `Y = 0`), so it only starts to count once the adapter has moved.
//! - weight decay: `α` is exempt ([`Adapter::no_weight_decay`]): decaying it towards 0 shrinks
//!   `α ⊙ σ_t`, i.e. removes the top singular values from the pretrained layer even with a zero
//!   gradient. `β`, `X` and `Y` decay as usual: `β = 0` and `X Y = 0` are the pristine layer
//!   (at `α = 1`), so decay pulls them towards the base, like LoRA's factors.
//!
//! Differences from the reference (`SALTLinear` of the SAM2 variant, and its training script):
//! - `ΔW` is relative to the pristine `W` (above); the reference replaces `W` by
//!   `U ReLU(S_new) Vᵀ`, which carries the SVD's reconstruction error.
//! - `α` is exempt from weight decay; the reference's AdamW (weight decay 0.01 in its config)
//!   decays every parameter, `α` included.
//! - `reg_weight` defaults to 0, as the reference's config (`reg_multiplier: 0`, which its main
//!   script passes over its training function's own default of 0.01).
//! - conv2d follows the linear recipe (`r_t` from `ratio_salt`, `Y = 0`); the reference's
//!   `SALTConv2d` takes a fixed rank and draws `X`, `Y ~ N(0, 0.01²)`, so it is not the identity
//!   at init.
//! - the SVD runs in f64 by default (the reference: f32) with canonical signs (the reference:
//!   torch's); `X` comes from a seeded ChaCha RNG, not torch's.
//! - the CLI's default `r_lora` is 8, `SALTLinear`'s default; the reference's SAM2 runs use 256
//!   with `ratio_salt` 0.1.
//!
//! Signs: the residual block is not diagonal and the ReLU is sign-sensitive, so flipping one
//! residual pair `(u_j, v_j) → (−u_j, −v_j)` leaves W unchanged but changes the adapted layer.
//! Init therefore puts the factors in canonical form (entry of largest magnitude of each `u_j`
//! positive, decided on the SVD's own precision before the f32 cast), and stored factors are
//! then the adapter: load and merge use them exactly as stored, never re-canonicalised (the rule
//! re-applied to the f32 factors can flip a pair whose two largest entries round to the same
//! magnitude, which would change the adapted layer). Without stored factors the load redoes
//! init's SVD. Repeated singular values leave the vectors undetermined beyond sign; a warning
//! names the layer when the spectrum has near-ties.
//!
//! File (`peft_type` "SALT"), per adapted module: `salt_scale.weight` (α), `salt_shift.weight`
//! (β), `salt_X.weight`, `salt_Y.weight` (absent when `k = r_t`), and with `store_factors`
//! (default true) the frozen factors `salt_U.weight` (`[out, k]`), `salt_S.weight` (`[k]`),
//! `salt_Vh.weight` (`[k, in_flat]`), all f32. Without them the file is small, but loading
//! needs the pristine base weight to redo the SVD (a merge without model code cannot).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::adapter::{
    Adapter, CliSpec, LayerGeometry, Method, MethodSpec, OptionKind, OptionSpec, TensorRoles,
};
use crate::adapters::factored::{
    Factors, SVD_DTYPE, f64_precision, precision_or_f64, relu_zero_grad, safe_norm, weight_matrix,
};
use crate::adapters::support::{flat_dims, option, saved_len, saved_tensor};
use crate::config::{
    CommonFields, ConfigFields, InitContext, LoadContext, MethodConfig, Targeting, peft_json,
};
use crate::error::{PeftError, Result};
use crate::linalg::{self, Precision};

/// SALT's registry entry. CLI: `--rank` is `r_lora` (default 8); no alpha, no dropout.
pub const METHOD: Method = Method::new(&MethodSpec {
    name: "salt",
    aliases: &[],
    peft_type: "SALT",
    summary: "scale and shift the top singular values, low-rank update of the rest (α exempt \
              from weight decay, unlike the reference)",
    tensors: TensorRoles {
        prefixes: &[
            "salt_scale",
            "salt_shift",
            "salt_X",
            "salt_Y",
            "salt_U",
            "salt_S",
            "salt_Vh",
        ],
        frozen: &["salt_U", "salt_S", "salt_Vh"],
        rank: None,
    },
    cli: CliSpec {
        defaults: r#"{"r_lora": 8}"#,
        rank: Some("r_lora"),
        alpha: None,
        alpha_per_rank: None,
        dropout: None,
        options: &[
            option(
                "r_t",
                OptionKind::Int,
                "singular values that get scale and shift",
            ),
            OptionSpec {
                excludes: Some("r_t"),
                ..option(
                    "ratio_salt",
                    OptionKind::Float,
                    "r_t as a share of min(out, in) when r_t is not given (0.1)",
                )
            },
            option(
                "store_factors",
                OptionKind::Bool,
                "save U, σ, Vᵀ in the file (true; false needs the base weight to load)",
            ),
            SVD_DTYPE,
            option(
                "reg_weight",
                OptionKind::Float,
                "weight of the regulariser in the loss (0, as the reference's config)",
            ),
        ],
    },
    needs_calibration: false,
    lora_pro_optimizer: false,
});

/// The sign rule recorded in the config (see [`crate::linalg`]).
pub const SVD_SIGN_RULE: &str = "max_abs_entry_of_u_positive";

const SCALE: &str = "salt_scale.weight";
const SHIFT: &str = "salt_shift.weight";
const X: &str = "salt_X.weight";
const Y: &str = "salt_Y.weight";
const U: &str = "salt_U.weight";
const SIGMA: &str = "salt_S.weight";
const VH: &str = "salt_Vh.weight";

/// Relative gap below which two singular values count as tied (their vectors are then not
/// unique, and a new SVD may rotate them).
const TIE_TOLERANCE: f64 = 1e-6;

/// SALT's configuration ([`Default`]: `r_t` from `ratio_salt` 0.1, `r_lora` 8, stored factors,
/// f64 SVD, `reg_weight` 0; no `target_modules`, which [`validate`](Self::validate) requires).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct SaltConfig {
    /// Which modules are adapted.
    #[serde(flatten)]
    pub targeting: Targeting,
    /// Singular values that get scale and shift; `None` takes `max(1, ⌊k · ratio_salt⌋)`.
    pub r_t: Option<usize>,
    /// The share of `k` that gets scale and shift when `r_t` is not given.
    pub ratio_salt: f64,
    /// Rank of `X Y` inside the residual block (any; as the reference, not limited to `k − r_t`).
    pub r_lora: usize,
    /// Save `U`, `σ`, `Vᵀ` in the adapter file.
    pub store_factors: bool,
    /// Precision of the SVD (the factors are stored in f32 either way).
    #[serde(default = "f64_precision", deserialize_with = "precision_or_f64")]
    pub svd_dtype: Precision,
    /// Weight `λ` of the regulariser in the training loss (0: not added).
    pub reg_weight: f64,
    /// `task_type`, `base_model_name_or_path`, `revision`, `inference_mode`.
    #[serde(flatten)]
    pub common: CommonFields,
}

impl Default for SaltConfig {
    /// The reference's `ratio_salt` 0.1 and `SALTLinear`'s `r_lora` 8; no `target_modules`.
    fn default() -> Self {
        Self {
            targeting: Targeting::default(),
            r_t: None,
            ratio_salt: 0.1,
            r_lora: 8,
            store_factors: true,
            svd_dtype: Precision::F64,
            reg_weight: 0.0,
            common: CommonFields::default(),
        }
    }
}

impl SaltConfig {
    /// A config targeting `targets` with the given `r_lora`, the rest [`Default`] (`r_t` from
    /// `ratio_salt = 0.1`, stored factors).
    pub fn new<S: AsRef<str>>(targets: &[S], r_lora: usize) -> Self {
        Self {
            targeting: Targeting::new(crate::config::ModuleSelector::list(targets)),
            r_lora,
            ..Self::default()
        }
    }

    /// Checks every field, without looking at a model.
    pub fn validate(&self) -> Result<()> {
        self.targeting.validate()?;
        if self.r_t == Some(0) {
            return Err(PeftError::config("r_t", "must be at least 1, got 0"));
        }
        if !(self.ratio_salt > 0.0 && self.ratio_salt <= 1.0) {
            return Err(PeftError::config(
                "ratio_salt",
                format!("must be in (0, 1], got {}", self.ratio_salt),
            ));
        }
        if self.r_lora == 0 {
            return Err(PeftError::config("r_lora", "must be at least 1, got 0"));
        }
        if !(self.reg_weight.is_finite() && self.reg_weight >= 0.0) {
            return Err(PeftError::config(
                "reg_weight",
                format!("must be finite and ≥ 0, got {}", self.reg_weight),
            ));
        }
        Ok(())
    }

    /// `(r_t, r_lora)` for a layer with `k = min(out, in_flat)` (`r_lora` is 0 when `r_t = k`).
    pub fn ranks(&self, module: &str, out: usize, in_flat: usize) -> Result<(usize, usize)> {
        let k = out.min(in_flat);
        let r_t = match self.r_t {
            Some(r) if r > k => {
                return Err(PeftError::layer(
                    module,
                    format!("SALT r_t = {r} exceeds min(out, in) = min({out}, {in_flat}) = {k}"),
                ));
            }
            Some(r) => r,
            None => ((k as f64 * self.ratio_salt).floor() as usize).clamp(1, k),
        };
        // As the reference: r_lora as given, above k − r_t too; 0 when the residual block is empty.
        let r_lora = if r_t == k { 0 } else { self.r_lora };
        Ok((r_t, r_lora))
    }

    /// Reads `adapter_config.json` content.
    pub fn from_peft_json(value: &Value) -> Result<Self> {
        crate::config::from_json(value)
    }

    /// The `adapter_config.json` fields.
    pub fn to_peft_json(&self) -> Result<Value> {
        let fields = json!({
            "peft_type": METHOD.peft_type(),
            "r_lora": self.r_lora,
            "r_t": self.r_t,
            "ratio_salt": self.ratio_salt,
            "reg_weight": self.reg_weight,
            "relu": "full",
            "store_factors": self.store_factors,
            "svd_dtype": self.svd_dtype.name(),
            "svd_sign_rule": SVD_SIGN_RULE,
        });
        peft_json(fields, &self.targeting, &self.common)
    }

    /// The canonical SVD factors `(U [out, k], σ [k], Vᵀ [k, in_flat])` of a base weight, f32 on
    /// `device`.
    fn factors_of(
        &self,
        module: &str,
        geometry: LayerGeometry,
        base_weight: &Tensor,
        device: &Device,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let w = weight_matrix(module, geometry, base_weight)?;
        let svd = linalg::thin_svd(&w, self.svd_dtype)?;
        warn_on_ties(module, &svd.s)?;
        let to_f32 = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?.to_device(device)?.contiguous()?)
        };
        Ok((to_f32(&svd.u)?, to_f32(&svd.s)?, to_f32(&svd.v.t()?)?))
    }

    /// A fresh adapter on a layer whose weight is `base_weight`; `X` is drawn from `rng`.
    pub fn init_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        base_weight: &Tensor,
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<SaltAdapter> {
        let (out, in_flat) = flat_dims(geometry);
        let (r_t, r_lora) = self.ranks(module, out, in_flat)?;
        let (u, s, vh) = self.factors_of(module, geometry, base_weight, device)?;
        let rest = out.min(in_flat) - r_t;
        let scale = Var::from_tensor(&Tensor::ones(r_t, DType::F32, device)?)?;
        let shift = Var::from_tensor(&Tensor::zeros(r_t, DType::F32, device)?)?;
        let lora = if r_lora > 0 {
            let bound = (6.0 / r_lora as f32).sqrt();
            let x = crate::init::uniform(rng, rest * r_lora, -bound, bound);
            let x = Var::from_tensor(&Tensor::from_vec(x, (rest, r_lora), device)?)?;
            let y = Var::from_tensor(&Tensor::zeros((r_lora, rest), DType::F32, device)?)?;
            Some((x, y))
        } else {
            None
        };
        SaltAdapter::new(
            geometry,
            u,
            s,
            vh,
            r_t,
            scale,
            shift,
            lora,
            self.store_factors,
        )
    }

    /// The adapter of one module from its saved tensors. Without stored factors the SVD of
    /// `base_weight` (the pristine weight) is redone; without either it is an error.
    pub fn load_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        tensors: &BTreeMap<String, Tensor>,
        base_weight: Option<&Tensor>,
        device: &Device,
    ) -> Result<SaltAdapter> {
        let (out, in_flat) = flat_dims(geometry);
        let k = out.min(in_flat);
        let get = |name: &str, shape: &[usize]| {
            saved_tensor(module, tensors, name, shape, DType::F32, device)
        };
        let r_t = saved_len(module, tensors, SCALE)?;
        if self.r_t.is_some_and(|want| want != r_t) {
            return Err(PeftError::layer(
                module,
                format!(
                    "the file holds r_t = {r_t} but the config says {:?}",
                    self.r_t
                ),
            ));
        }
        if r_t == 0 || r_t > k {
            return Err(PeftError::layer(
                module,
                format!(
                    "the file's r_t = {r_t} is not in 1..=min(out, in) = min({out}, {in_flat})"
                ),
            ));
        }
        let rest = k - r_t;
        let scale = Var::from_tensor(&get(SCALE, &[r_t])?)?;
        let shift = Var::from_tensor(&get(SHIFT, &[r_t])?)?;
        let lora = if rest > 0 {
            let r_lora = match tensors.get(X).map(|x| x.dims()) {
                Some(&[_, r]) => r,
                _ => self.r_lora,
            };
            let x = get(X, &[rest, r_lora])?;
            let y = get(Y, &[r_lora, rest])?;
            Some((Var::from_tensor(&x)?, Var::from_tensor(&y)?))
        } else {
            None
        };
        let (u, s, vh) = if tensors.contains_key(U) {
            // Used exactly as stored: the adapter's meaning depends on these signs.
            (
                get(U, &[out, k])?,
                get(SIGMA, &[k])?,
                get(VH, &[k, in_flat])?,
            )
        } else {
            let Some(w) = base_weight else {
                return Err(PeftError::layer(
                    module,
                    "this SALT adapter was saved with store_factors = false, so its SVD \
                     factors must be recomputed from the pristine base weight, which this \
                     loader does not have (a merge without model code); load it with \
                     PeftModel::load_adapter on the base model, or save it with \
                     store_factors = true",
                ));
            };
            self.factors_of(module, geometry, w, device)?
        };
        SaltAdapter::new(
            geometry,
            u,
            s,
            vh,
            r_t,
            scale,
            shift,
            lora,
            self.store_factors,
        )
    }
}

/// Warns when the spectrum has near-tied non-zero singular values.
fn warn_on_ties(module: &str, s: &Tensor) -> Result<()> {
    let ties = linalg::near_ties(s, TIE_TOLERANCE)?;
    if ties > 0 {
        eprintln!(
            "warning: SALT on `{module}`: {ties} pair(s) of singular values are tied within \
             {TIE_TOLERANCE:e}·σ₁; their singular vectors are not unique, so a new SVD of this \
             weight may not reproduce the adapter (keep store_factors = true)"
        );
    }
    Ok(())
}

impl ConfigFields for SaltConfig {
    fn fields(&self) -> (&Targeting, &CommonFields) {
        (&self.targeting, &self.common)
    }

    fn fields_mut(&mut self) -> (&mut Targeting, &mut CommonFields) {
        (&mut self.targeting, &mut self.common)
    }
}

impl MethodConfig for SaltConfig {
    fn method(&self) -> Method {
        METHOD
    }

    fn validate(&self) -> Result<()> {
        SaltConfig::validate(self)
    }

    fn to_peft_json(&self) -> Result<Value> {
        SaltConfig::to_peft_json(self)
    }

    fn regularizer_weight(&self) -> f64 {
        self.reg_weight
    }

    fn init_adapter(
        &self,
        ctx: &InitContext<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(SaltConfig::init_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.base_weight,
            ctx.device,
            rng,
        )?))
    }

    fn load_adapter(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(SaltConfig::load_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.tensors,
            ctx.base_weight,
            ctx.device,
        )?))
    }
}

/// One SALT adapter on one layer.
#[derive(Debug)]
pub struct SaltAdapter {
    /// `A = Vᵀ` (all k rows), `B = U`.
    factors: Factors,
    sigma: Tensor,
    r_t: usize,
    scale: Var,
    shift: Var,
    /// `(X, Y)`; `None` when the residual block is empty (`r_t = k`) or `r_lora` is 0.
    lora: Option<(Var, Var)>,
    store_factors: bool,
}

impl SaltAdapter {
    #[allow(clippy::too_many_arguments)]
    fn new(
        geometry: LayerGeometry,
        u: Tensor,
        sigma: Tensor,
        vh: Tensor,
        r_t: usize,
        scale: Var,
        shift: Var,
        lora: Option<(Var, Var)>,
        store_factors: bool,
    ) -> Result<Self> {
        Ok(Self {
            factors: Factors::new(geometry, vh, u)?,
            sigma,
            r_t,
            scale,
            shift,
            lora,
            store_factors,
        })
    }

    /// `k = min(out, in_flat)`.
    pub fn k(&self) -> usize {
        self.factors.k()
    }

    /// `r_t`, the number of top singular values that get scale and shift.
    pub fn r_t(&self) -> usize {
        self.r_t
    }

    /// The LoRA rank inside the residual block (0 when there is none).
    pub fn r_lora(&self) -> usize {
        self.lora.as_ref().map_or(0, |(x, _)| x.dims()[1])
    }

    /// `U: [out, k]`.
    pub fn u(&self) -> &Tensor {
        self.factors.b()
    }

    /// `σ: [k]`.
    pub fn sigma(&self) -> &Tensor {
        &self.sigma
    }

    /// `Vᵀ: [k, in_flat]`.
    pub fn vh(&self) -> &Tensor {
        self.factors.a()
    }

    fn sigma_top(&self) -> Result<Tensor> {
        Ok(self.sigma.narrow(0, 0, self.r_t)?)
    }

    fn rest(&self) -> usize {
        self.k() - self.r_t
    }

    /// `α ⊙ σ_t + β`.
    fn top_values(&self) -> Result<Tensor> {
        Ok(self
            .scale
            .as_tensor()
            .mul(&self.sigma_top()?)?
            .add(self.shift.as_tensor())?)
    }

    /// `ReLU(α ⊙ σ_t + β) − σ_t`.
    fn top_delta(&self) -> Result<Tensor> {
        Ok(relu_zero_grad(&self.top_values()?)?.sub(&self.sigma_top()?)?)
    }

    /// `M = ReLU(diag(σ_s) + X Y) − diag(σ_s)`, `[k − r_t, k − r_t]`; `None` without `X, Y`.
    fn rest_delta(&self) -> Result<Option<Tensor>> {
        let Some((x, y)) = &self.lora else {
            return Ok(None);
        };
        let diag = Tensor::eye(self.rest(), DType::F32, self.sigma.device())?.broadcast_mul(
            &self
                .sigma
                .narrow(0, self.r_t, self.rest())?
                .reshape((1, self.rest()))?,
        )?;
        let xy = x.as_tensor().matmul(y.as_tensor())?;
        Ok(Some(relu_zero_grad(&diag.add(&xy)?)?.sub(&diag)?))
    }

    /// `‖α ⊙ σ_t + β − σ_t‖₂ + ‖X Y‖_F`, differentiable in the trainables. Its gradient at a zero
    /// norm is 0 (the subgradient PyTorch's `norm` takes), never NaN.
    pub fn regularizer(&self) -> Result<Tensor> {
        let top = self.top_values()?.sub(&self.sigma_top()?)?;
        let mut reg = safe_norm(&top)?;
        if let Some((x, y)) = &self.lora {
            reg = reg.add(&safe_norm(&x.as_tensor().matmul(y.as_tensor())?)?)?;
        }
        Ok(reg)
    }

    /// The `k × k` core `blockdiag(diag(top), M)`.
    fn core(&self) -> Result<Tensor> {
        let k = self.k();
        let top = self.top_delta()?;
        let top_block = Tensor::eye(self.r_t, DType::F32, self.sigma.device())?
            .broadcast_mul(&top.reshape((1, self.r_t))?)?;
        let top_rows = top_block.pad_with_zeros(1, 0, k - self.r_t)?;
        match self.rest_delta()? {
            None => Ok(top_rows.pad_with_zeros(0, 0, k - self.r_t)?),
            Some(m) => {
                let rest_rows = m.pad_with_zeros(1, self.r_t, 0)?;
                Ok(Tensor::cat(&[top_rows, rest_rows], 0)?)
            }
        }
    }
}

impl Adapter for SaltAdapter {
    fn method(&self) -> Method {
        METHOD
    }

    fn forward_delta(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let (h, spatial) = self.factors.project_in(x)?;
        let last = h.rank() - 1;
        let top = h
            .narrow(last, 0, self.r_t)?
            .broadcast_mul(&self.top_delta()?)?;
        let h = match self.rest_delta()? {
            None => top,
            Some(m) => {
                let rest = h.narrow(last, self.r_t, self.rest())?;
                let rest = rest.broadcast_matmul(&m.t()?)?;
                Tensor::cat(&[top, rest], last)?
            }
        };
        self.factors.project_out(&h, spatial)
    }

    fn delta_weight(&self) -> Result<Tensor> {
        self.factors.dense(&self.core()?)
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut vars = vec![
            (SCALE.to_string(), self.scale.clone()),
            (SHIFT.to_string(), self.shift.clone()),
        ];
        if let Some((x, y)) = &self.lora {
            vars.push((X.to_string(), x.clone()));
            vars.push((Y.to_string(), y.clone()));
        }
        vars
    }

    fn tensors_to_save(&self) -> Vec<(String, Tensor)> {
        let mut tensors: Vec<(String, Tensor)> = self
            .trainable_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        if self.store_factors {
            tensors.push((U.to_string(), self.factors.b().clone()));
            tensors.push((SIGMA.to_string(), self.sigma.clone()));
            tensors.push((VH.to_string(), self.factors.a().clone()));
        }
        tensors
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn no_weight_decay(&self) -> Vec<String> {
        vec![SCALE.to_string()]
    }

    fn regularizer_loss(&self) -> Option<Result<Tensor>> {
        Some(SaltAdapter::regularizer(self))
    }
}
