//! CorDA: context-oriented decomposition adaptation (Yang et al., 2024, "CorDA: Context-Oriented
//! Decomposition Adaptation of Large Language Models for Task-Aware Parameter-Efficient
//! Fine-tuning", arXiv:2406.05223, NeurIPS 2024), with Hugging Face PEFT's semantics
//! (`init_lora_weights="corda"`, `peft/tuners/lora/corda.py`) on an unmodified base.
//!
//! For a linear layer `W: [out, in]`, rank `r`, scaling `s = α/r` (or `α/√r` with rsLoRA):
//!
//! 1. **Covariance** of the layer's inputs over the calibration batches (rows of non-padding
//!    tokens only, see [`crate::data_init`]; PEFT and the reference take every token, which is the
//!    same for unpadded sequences and wrong otherwise). Per sequence `X: [n, in]` (its counted
//!    rows): `X ← X / |max(X)|` (the signed maximum, then its magnitude, as the reference does),
//!    `C += Xᵀ X`; at the end `C /= number of sequences`. (PEFT's hook takes one sequence per
//!    forward, so its count of forwards is this count of sequences; a batch of several sequences
//!    gives the same `C` as running them one by one.) Accumulated in f32 on the model's device,
//!    as PEFT does (one `[in, in]` matrix per input group is the pass's memory); the
//!    decomposition then runs in f64.
//! 2. **Damping**: `damp = 0.01`; `Ĉ = C + damp·mean(diag C)·I`, `Ĉ⁻¹ = inv(Ĉ)`; while
//!    `‖Ĉ Ĉ⁻¹ − I‖_F ≥ 0.05` (or `Ĉ` is numerically singular) `damp *= 2`. The damping is always
//!    applied, so a rank-deficient `C` (fewer tokens than `in`) still inverts.
//! 3. **Oriented SVD** (f64): `W Ĉ = U diag(S) Vhᵀ…` i.e. `U, S, Vh = svd(W Ĉ)`, and
//!    `V = (Vh Ĉ⁻¹)ᵀ: [in, k]`, so that `W = U diag(S) Vᵀ` exactly (`V` is not orthonormal;
//!    `Ĉ V = Vhᵀ` is).
//! 4. **Mode**: `ipm` keeps the `r` largest components (`U[:, :r]`, `S[:r]`, `V[:, :r]`), `kpm`
//!    the `r` smallest (`[−r:]`).
//! 5. **Split**: `S' = S_r / s`, `A = diag(√S') V_rᵀ: [r, in]`, `B = U_r diag(√S'): [out, r]`, so
//!    `s·B A = U_r diag(S_r) V_rᵀ`.
//!
//! PEFT then replaces the base by the residual `W − s·B A` and trains `A`, `B` on it. We keep the
//! pristine `W` (no adapter ever rewrites a base weight) and the initial factors `A₀ = A`, `B₀ = B` frozen, and write the
//! method relative to `W`:
//!
//! - forward: `Δ(x) = s·((x̂ Aᵀ) Bᵀ − (x A₀ᵀ) B₀ᵀ)` with `x̂ = dropout(x)`. At init the two
//!   products are the same computation on the same numbers, so `Δ = 0` exactly and the adapted
//!   model is the base model bit for bit; `W + Δ` is PEFT's `W_res + s·B A`.
//! - `ΔW = s·(B A − B₀ A₀)`: merge and unmerge are `W ± ΔW`, disabling gives the pristine model.
//! - Weight decay skips `A` and `B` ([`Adapter::no_weight_decay`]): they start at `B₀`, `A₀`,
//!   which carry r components of W itself, so decaying them shrinks `s·B A` and with it those
//!   components of the adapted weight (`ΔW ≈ −2ηλ·s·B₀ A₀` after one step with zero gradient),
//!   where LoRA's decay pulls towards the base. (PEFT leaves decay to the training script; HF
//!   `Trainer` with `weight_decay > 0` would decay them.)
//!
//! **File** (`peft_type` "CORDA", ours; PEFT has no CorDA file type): the `adapter_config.json`
//! fields of PEFT's `LoraConfig` that apply (`r`, `lora_alpha`, `lora_dropout`, `use_rslora`,
//! targets, `rank_pattern`, `alpha_pattern`, `modules_to_save`, `task_type`, …),
//! `init_lora_weights: "corda"` and `corda_config: {"corda_method": "ipm" | "kpm", …}`; tensors
//! per layer `lora_A.weight [r, in]`, `lora_B.weight [out, r]` (trained) and `corda_A0.weight`,
//! `corda_B0.weight` (the frozen init factors). With them the adapter needs neither the
//! calibration data nor a residual model.
//!
//! **Conversion** ([`convert_to_peft_lora`](crate::data_init::convert::convert_to_peft_lora),
//! `candle-peft convert --to peft-lora`): PEFT's
//! `path_initial_model_for_weight_conversion`: `ΔW = s·[B | −B₀]·[A ; A₀]`, a PEFT LoRA of rank
//! `2r` with `α' = 2α` (rsLoRA: `√2·α`) so that `s` is unchanged, `rank_pattern` and
//! `alpha_pattern` values doubled likewise; it applies to the original base. rsLoRA together
//! with `rank_pattern` / `alpha_pattern` is refused, as PEFT refuses it.
//!
//! Linear layers only (the oriented SVD needs a weight matrix and an input covariance). Layers fed the same tensor (q/k/v) share one covariance and
//! one damped inverse; each gets its own SVD.
//!
//! This file holds the config and the adapter; the calibration runs in
//! [`crate::data_init::corda`] ([`add_corda_adapter`](crate::data_init::corda::add_corda_adapter)).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::adapter::{
    Adapter, CliSpec, LayerGeometry, Method, MethodSpec, OptionKind, OptionSpec, TensorRoles,
};
use crate::adapters::lora::{InitLoraWeights, LoraAdapter, LoraConfig, USE_RSLORA};
use crate::adapters::support::saved_tensor;
use crate::config::{
    CommonFields, ConfigFields, InitContext, LoadContext, MethodConfig, Targeting, json_number,
    peft_json,
};
use crate::error::{PeftError, Result};
use crate::init;

pub(crate) const LORA_A: &str = "lora_A.weight";
pub(crate) const LORA_B: &str = "lora_B.weight";
pub(crate) const INIT_A: &str = "corda_A0.weight";
pub(crate) const INIT_B: &str = "corda_B0.weight";

/// CorDA's registry entry. CLI: r 8, α 16, dropout 0 unless given.
pub const METHOD: Method = Method::new(&MethodSpec {
    name: "corda",
    aliases: &[],
    peft_type: "CORDA",
    summary: "LoRA initialised from a covariance-oriented SVD of the weight on calibration data",
    tensors: TensorRoles {
        prefixes: &["lora_A", "lora_B", "corda_A0", "corda_B0"],
        frozen: &["corda_A0", "corda_B0"],
        rank: Some(LORA_A),
    },
    cli: CliSpec {
        defaults: r#"{"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0}"#,
        rank: Some("r"),
        alpha: Some("lora_alpha"),
        alpha_per_rank: None,
        dropout: Some("lora_dropout"),
        options: &[
            OptionSpec {
                key: "corda_method",
                path: "corda_config.corda_method",
                kind: OptionKind::Str,
                help: "ipm (adapt the r largest components) or kpm (the r smallest)",
                excludes: None,
            },
            USE_RSLORA,
        ],
    },
    needs_calibration: true,
    lora_pro_optimizer: false,
});

/// Which components become the adapter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CordaMethod {
    /// Instruction-previewed: the `r` largest components (fast adaptation).
    #[default]
    Ipm,
    /// Knowledge-preserved: the `r` smallest components (the rest of `W` stays as it was).
    Kpm,
}

// Read through `FromStr`, so a file and the CLI accept the same spellings (any case).
impl<'de> Deserialize<'de> for CordaMethod {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for CordaMethod {
    type Err = PeftError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ipm" => Ok(CordaMethod::Ipm),
            "kpm" => Ok(CordaMethod::Kpm),
            other => Err(PeftError::config(
                "corda_method",
                format!("`{other}` is not a CorDA mode (expected ipm or kpm)"),
            )),
        }
    }
}

impl std::fmt::Display for CordaMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CordaMethod::Ipm => "ipm",
            CordaMethod::Kpm => "kpm",
        })
    }
}

/// The initial factors of one layer, made by the calibration (`A: [r, in]`, `B: [out, r]`, f32).
#[derive(Clone, Debug)]
pub struct CordaFactors {
    /// `A: [r, in]`.
    pub a: Tensor,
    /// `B: [out, r]`.
    pub b: Tensor,
}

/// Init factors handed to [`CordaConfig`] for
/// [`PeftModel::add_adapter`](crate::PeftModel::add_adapter); not configuration (never saved,
/// ignored by equality).
#[derive(Clone, Default)]
pub struct CordaInit(Option<Arc<BTreeMap<String, CordaFactors>>>);

impl std::fmt::Debug for CordaInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(m) => write!(f, "CordaInit({} layers)", m.len()),
            None => f.write_str("CordaInit(none)"),
        }
    }
}

impl PartialEq for CordaInit {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// CorDA's config: PEFT's `LoraConfig` (the fields that apply; reachable through `Deref`) plus
/// `corda_config`. LoRA's `init_lora_weights`, `eva_config` and `fan_in_fan_out` do not apply:
/// they are written as `"corda"`, absent and `false` whatever `lora` holds. [`Default`]: LoRA's
/// defaults (`r` 8, `lora_alpha` 8), IPM, no `target_modules` (which
/// [`validate`](Self::validate) requires), no init factors; struct update works:
/// `CordaConfig { lora: LoraConfig { targeting, r: 16, ..Default::default() },
/// ..Default::default() }`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct CordaConfig {
    /// The LoRA fields: targets, `r`, `lora_alpha`, `lora_dropout`, `use_rslora`, patterns.
    #[serde(flatten)]
    pub lora: LoraConfig,
    /// PEFT's `corda_config.corda_method`.
    #[serde(
        rename = "corda_config",
        default,
        deserialize_with = "corda_method_of_section"
    )]
    pub corda_method: CordaMethod,
    /// The init factors `PeftModel::add_adapter` builds the adapters from (set by
    /// [`with_init`](Self::with_init)); not configuration: never saved, ignored by `==`.
    #[serde(skip)]
    pub init: CordaInit,
}

impl Default for CordaConfig {
    /// LoRA's defaults with `init_lora_weights: "corda"`, IPM, no init factors.
    fn default() -> Self {
        Self {
            lora: LoraConfig {
                init_lora_weights: corda_init(),
                ..LoraConfig::default()
            },
            corda_method: CordaMethod::Ipm,
            init: CordaInit::default(),
        }
    }
}

/// `corda_config` (`null` or absent: IPM) down to its `corda_method`.
fn corda_method_of_section<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<CordaMethod, D::Error> {
    #[derive(Deserialize)]
    struct Section {
        #[serde(default)]
        corda_method: CordaMethod,
    }
    Ok(Option::<Section>::deserialize(d)?
        .map(|s| s.corda_method)
        .unwrap_or_default())
}

/// LoRA's `init_lora_weights` as a CorDA file writes it.
fn corda_init() -> InitLoraWeights {
    InitLoraWeights::Named("corda".into())
}

impl std::ops::Deref for CordaConfig {
    type Target = LoraConfig;

    fn deref(&self) -> &LoraConfig {
        &self.lora
    }
}

impl std::ops::DerefMut for CordaConfig {
    fn deref_mut(&mut self) -> &mut LoraConfig {
        &mut self.lora
    }
}

impl CordaConfig {
    pub(crate) const TENSOR_PREFIXES: &'static [&'static str] = METHOD.spec().tensors.prefixes;

    /// A config targeting `targets` (names or suffixes) with rank `r`, `α = lora_alpha`, the
    /// rest [`Default`] (IPM).
    pub fn new<S: AsRef<str>>(targets: &[S], r: usize, lora_alpha: f64) -> Self {
        let mut config = Self::default();
        config.lora.targeting = Targeting::new(crate::config::ModuleSelector::list(targets));
        config.lora.r = r;
        config.lora.lora_alpha = lora_alpha;
        config
    }

    /// This config carrying the init factors of a calibration
    /// ([`corda_factors`](crate::data_init::corda::corda_factors)), so that
    /// `PeftModel::add_adapter` can build the adapters.
    pub fn with_init(mut self, factors: BTreeMap<String, CordaFactors>) -> Self {
        self.init = CordaInit(Some(Arc::new(factors)));
        self
    }

    /// The same config without init factors (what is kept after the adapter is built).
    pub fn without_init(mut self) -> Self {
        self.init = CordaInit(None);
        self
    }

    /// Checks every field, without looking at a model.
    pub fn validate(&self) -> Result<()> {
        self.lora.validate_shape()?;
        if !self.lora_alpha.is_finite() || self.lora_alpha <= 0.0 {
            return Err(PeftError::config(
                "lora_alpha",
                format!(
                    "must be a finite number > 0 (CorDA divides by s), got {}",
                    self.lora_alpha
                ),
            ));
        }
        for (key, &a) in &self.alpha_pattern {
            if !a.is_finite() || a <= 0.0 {
                return Err(PeftError::config(
                    format!("alpha_pattern.{key}"),
                    format!("must be a finite number > 0, got {a}"),
                ));
            }
        }
        Ok(())
    }

    /// Reads `adapter_config.json` content. The LoRA fields that do not apply are reset (see
    /// the type's docs), so a config read back equals the one written.
    pub fn from_peft_json(value: &Value) -> Result<Self> {
        let mut config: Self = crate::config::from_json(value)?;
        config.lora.init_lora_weights = corda_init();
        config.lora.eva_config = None;
        config.lora.fan_in_fan_out = false;
        Ok(config)
    }

    /// The `adapter_config.json` fields: PEFT `LoraConfig`'s that apply, and `corda_config`.
    pub fn to_peft_json(&self) -> Result<Value> {
        let alpha_pattern: serde_json::Map<String, Value> = self
            .alpha_pattern
            .iter()
            .map(|(k, v)| (k.clone(), json_number(*v)))
            .collect();
        let fields = json!({
            "alpha_pattern": alpha_pattern,
            "auto_mapping": null,
            "bias": "none",
            "corda_config": {
                "cache_file": null,
                "corda_method": self.corda_method,
                "covariance_file": null,
                "prune_temporary_fields": true,
                "use_float16_for_covariance": false,
                "verbose": false,
            },
            "fan_in_fan_out": false,
            "init_lora_weights": "corda",
            "lora_alpha": json_number(self.lora_alpha),
            "lora_dropout": self.lora_dropout,
            "peft_type": "CORDA",
            "r": self.r,
            "rank_pattern": self.rank_pattern,
            "use_rslora": self.use_rslora,
        });
        peft_json(fields, &self.targeting, &self.common)
    }

    fn linear_dims(module: &str, geometry: LayerGeometry) -> Result<(usize, usize)> {
        match geometry {
            LayerGeometry::Linear {
                in_features,
                out_features,
            } => Ok((in_features, out_features)),
            LayerGeometry::Conv2d { .. } => Err(PeftError::layer(
                module,
                "CorDA adapts linear layers only (this one is a conv2d)",
            )),
        }
    }

    /// The adapter for `module` from its init factors.
    pub fn init_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        device: &Device,
        seed: u64,
    ) -> Result<CordaAdapter> {
        let (in_f, out_f) = Self::linear_dims(module, geometry)?;
        let (r, alpha, scaling) = self.resolve(module)?;
        let factors = self
            .init
            .0
            .as_ref()
            .and_then(|m| m.get(module))
            .ok_or_else(|| {
                PeftError::layer(
                    module,
                    "CorDA needs the factors of a calibration pass, which `add_adapter` does not \
                     run: call the task's `add_corda_adapter` (or \
                     `data_init::corda::add_corda_adapter`) instead",
                )
            })?;
        check_shape(module, "A", &factors.a, &[r, in_f])?;
        check_shape(module, "B", &factors.b, &[out_f, r])?;
        let a0 = factors.a.to_dtype(DType::F32)?.to_device(device)?;
        let b0 = factors.b.to_dtype(DType::F32)?.to_device(device)?;
        let lora = LoraAdapter::new(
            geometry,
            r,
            alpha,
            scaling,
            self.lora_dropout as f32,
            Var::from_tensor(&a0)?,
            Var::from_tensor(&b0)?,
            seed,
        );
        Ok(CordaAdapter { lora, a0, b0 })
    }

    /// The adapter for `module` from saved tensors.
    pub fn load_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        tensors: &BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<CordaAdapter> {
        let (in_f, out_f) = Self::linear_dims(module, geometry)?;
        let (r, alpha, scaling) = self.resolve(module)?;
        let fetch = |name: &str, shape: &[usize]| {
            saved_tensor(module, tensors, name, shape, DType::F32, device)
        };
        let a = fetch(LORA_A, &[r, in_f])?;
        let b = fetch(LORA_B, &[out_f, r])?;
        let a0 = fetch(INIT_A, &[r, in_f])?;
        let b0 = fetch(INIT_B, &[out_f, r])?;
        let lora = LoraAdapter::new(
            geometry,
            r,
            alpha,
            scaling,
            self.lora_dropout as f32,
            Var::from_tensor(&a)?,
            Var::from_tensor(&b)?,
            init::seed_from_name(module),
        );
        Ok(CordaAdapter { lora, a0, b0 })
    }
}

fn check_shape(module: &str, what: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(PeftError::ShapeMismatch {
            key: format!("{module} CorDA init factor {what}"),
            expected: expected.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

impl ConfigFields for CordaConfig {
    fn fields(&self) -> (&Targeting, &CommonFields) {
        (&self.lora.targeting, &self.lora.common)
    }

    fn fields_mut(&mut self) -> (&mut Targeting, &mut CommonFields) {
        (&mut self.lora.targeting, &mut self.lora.common)
    }
}

impl MethodConfig for CordaConfig {
    fn method(&self) -> Method {
        METHOD
    }

    fn validate(&self) -> Result<()> {
        CordaConfig::validate(self)
    }

    fn to_peft_json(&self) -> Result<Value> {
        CordaConfig::to_peft_json(self)
    }

    fn init_adapter(
        &self,
        ctx: &InitContext<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(CordaConfig::init_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.device,
            rng.random(),
        )?))
    }

    fn load_adapter(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(CordaConfig::load_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.tensors,
            ctx.device,
        )?))
    }
}

/// One CorDA adapter on one linear layer: LoRA's trained factors and settings, plus the frozen
/// init factors.
#[derive(Debug)]
pub struct CordaAdapter {
    lora: LoraAdapter,
    a0: Tensor,
    b0: Tensor,
}

impl CordaAdapter {
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.lora.rank()
    }

    /// `α`.
    pub fn alpha(&self) -> f64 {
        self.lora.alpha()
    }

    /// `s`: α/r, or α/√r with rsLoRA.
    pub fn scaling(&self) -> f64 {
        self.lora.scaling()
    }

    /// The trained `A`.
    pub fn lora_a(&self) -> &Var {
        self.lora.lora_a()
    }

    /// The trained `B`.
    pub fn lora_b(&self) -> &Var {
        self.lora.lora_b()
    }

    /// The frozen init factors `(A₀, B₀)`.
    pub fn init_factors(&self) -> (&Tensor, &Tensor) {
        (&self.a0, &self.b0)
    }
}

impl Adapter for CordaAdapter {
    fn method(&self) -> Method {
        METHOD
    }

    fn dropout_rng(&self) -> Option<ChaCha8Rng> {
        self.lora.dropout_rng()
    }

    fn set_dropout_rng(&self, rng: ChaCha8Rng) {
        self.lora.set_dropout_rng(rng)
    }

    fn forward_delta(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let geometry = self.lora.geometry();
        let mut out_dims = x.dims().to_vec();
        let Some(last) = out_dims.last_mut() else {
            return Err(PeftError::Unsupported("CorDA input is a scalar".into()));
        };
        *last = geometry.out_features();
        let x2 = x.reshape(((), geometry.in_features()))?;
        let xd = self.lora.dropout().apply(x2.clone(), train)?;
        let trained = xd
            .matmul(&self.lora_a().as_tensor().t()?)?
            .matmul(&self.lora_b().as_tensor().t()?)?;
        // The same products on the frozen copies: identical numbers at init, so Δ = 0 exactly.
        let initial = x2.matmul(&self.a0.t()?)?.matmul(&self.b0.t()?)?;
        Ok(((trained - initial)? * self.scaling())?.reshape(out_dims)?)
    }

    fn delta_weight(&self) -> Result<Tensor> {
        let trained = self
            .lora_b()
            .as_tensor()
            .matmul(self.lora_a().as_tensor())?;
        let initial = self.b0.matmul(&self.a0)?;
        Ok(((trained - initial)? * self.scaling())?)
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.lora.trainable_vars()
    }

    fn tensors_to_save(&self) -> Vec<(String, Tensor)> {
        vec![
            (LORA_A.to_string(), self.lora_a().as_tensor().clone()),
            (LORA_B.to_string(), self.lora_b().as_tensor().clone()),
            (INIT_A.to_string(), self.a0.clone()),
            (INIT_B.to_string(), self.b0.clone()),
        ]
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn no_weight_decay(&self) -> Vec<String> {
        vec![LORA_A.to_string(), LORA_B.to_string()]
    }
}
