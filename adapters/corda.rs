//! CorDA: context-oriented decomposition adaptation (Yang et al., 2024, "CorDA: Context-Oriented
//! Decomposition Adaptation of Large Language Models for Task-Aware Parameter-Efficient
//! Fine-tuning", arXiv:2406.05223, NeurIPS 2024), with Hugging Face PEFT's semantics
//! (`init_lora_weights="corda"`, `peft/tuners/lora/corda.py`) on an unmodified base.
//!
//! For a linear layer `W: [out, in]`, rank `r`, scaling `s = α/r` (or `α/√r` with rsLoRA):
//!
//! 1. **Covariance** of the layer's inputs over the calibration batches (rows of non-padding
//!    tokens only, see `crate::calibrate`; PEFT and the reference take every token, which is the
//!    same for unpadded batch-size-1 calibration and wrong otherwise). Per batch `X: [N, in]`:
//!    `X ← X / |max(X)|` (the signed maximum, then its magnitude, as the reference does),
//!    `C += Xᵀ X`; at the end `C /= number of batches`. Accumulated in f32 on the model's device,
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
//! **Conversion** ([`convert_to_peft_lora`], `candle-peft convert --to peft-lora`): PEFT's
//! `path_initial_model_for_weight_conversion`: `ΔW = s·[B | −B₀]·[A ; A₀]`, a PEFT LoRA of rank
//! `2r` with `α' = 2α` (rsLoRA: `√2·α`) so that `s` is unchanged, `rank_pattern` and
//! `alpha_pattern` values doubled likewise; it applies to the original base. rsLoRA together
//! with `rank_pattern` / `alpha_pattern` is refused, as PEFT refuses it.
//!
//! Linear layers only (the oriented SVD needs a weight matrix and an input covariance). Layers fed the same tensor (q/k/v) share one covariance and
//! one damped inverse; each gets its own SVD.

use std::collections::BTreeMap;
use std::path::Path;
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
// `AdapterConfig` is used only by the CorDA → PEFT LoRA conversion below, which moves to the
// data-init layer; after that this file imports nothing above the core layers.
use crate::adapters::AdapterConfig;
use crate::calibrate::{self, CalibrationBatch, CalibrationOptions, RowStatistic};
use crate::config::{
    CommonFields, InitContext, LoadContext, MethodConfig, Targeting, json_number, peft_json,
};
use crate::error::{PeftError, Result};
use crate::init;
use crate::config::KEY_PREFIX;
use crate::io::peft_format;
use crate::layer::LayerHandle;
use crate::linalg::{self, Precision};
use crate::model::PeftModel;

const LORA_A: &str = "lora_A.weight";
const LORA_B: &str = "lora_B.weight";
const INIT_A: &str = "corda_A0.weight";
const INIT_B: &str = "corda_B0.weight";

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
    pub a: Tensor,
    pub b: Tensor,
}

/// Init factors handed to [`CordaConfig`] for [`PeftModel::add_adapter`]; not configuration
/// (never saved, ignored by equality).
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
/// they are written as `"corda"`, absent and `false`.
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
    #[serde(skip)]
    init: CordaInit,
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

    /// A config targeting `targets` (names or suffixes) with rank `r`, `α = lora_alpha`, IPM.
    pub fn new<S: AsRef<str>>(targets: &[S], r: usize, lora_alpha: f64) -> Self {
        let mut lora = LoraConfig::new(targets, r, lora_alpha);
        lora.init_lora_weights = corda_init();
        Self {
            lora,
            corda_method: CordaMethod::Ipm,
            init: CordaInit::default(),
        }
    }

    /// This config carrying the init factors of a calibration ([`corda_factors`]), so that
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
                    "CorDA needs the factors of a calibration pass first \
                     (adapters::corda::add_corda_adapter, or `candle-peft train --method corda`)",
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
        let fetch = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let key = format!("{KEY_PREFIX}{module}.{name}");
            let t = tensors.get(name).ok_or_else(|| PeftError::MissingTensor {
                key: key.clone(),
                location: "the adapter file".into(),
            })?;
            if t.dims() != shape {
                return Err(PeftError::ShapeMismatch {
                    key,
                    expected: shape.to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            Ok(t.to_dtype(DType::F32)?.to_device(device)?)
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

impl MethodConfig for CordaConfig {
    fn method(&self) -> Method {
        METHOD
    }

    fn targeting(&self) -> &Targeting {
        &self.lora.targeting
    }

    fn targeting_mut(&mut self) -> &mut Targeting {
        &mut self.lora.targeting
    }

    fn common(&self) -> &CommonFields {
        &self.lora.common
    }

    fn common_mut(&mut self) -> &mut CommonFields {
        &mut self.lora.common
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

    fn forward_delta(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let geometry = self.lora.geometry();
        let mut out_dims = x.dims().to_vec();
        let Some(last) = out_dims.last_mut() else {
            return Err(PeftError::Unsupported("CorDA input is a scalar".into()));
        };
        *last = geometry.out_features();
        let x2 = x.reshape(((), geometry.in_features()))?;
        let xd = if train && self.lora.dropout() > 0.0 {
            self.lora.apply_dropout(&x2)?
        } else {
            x2.clone()
        };
        let trained = xd
            .matmul(&self.lora_a().as_tensor().t()?)?
            .matmul(&self.lora_b().as_tensor().t()?)?;
        // The same products on the frozen copies: identical numbers at init, so Δ = 0 exactly.
        let initial = x2.matmul(&self.a0.t()?)?.matmul(&self.b0.t()?)?;
        Ok(((trained - initial)? * self.scaling())?.reshape(out_dims)?)
    }

    fn delta_weight(&self) -> Result<Tensor> {
        let trained = self.lora_b().as_tensor().matmul(self.lora_a().as_tensor())?;
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

/// Covariance of one input group's rows with the reference normalisation (step 1).
#[derive(Debug)]
pub struct CovarianceStatistic {
    layer: String,
    sum: Option<Tensor>,
    batches: usize,
}

impl CovarianceStatistic {
    /// `layer` names the group in errors.
    pub fn new(layer: impl Into<String>) -> Self {
        Self {
            layer: layer.into(),
            sum: None,
            batches: 0,
        }
    }

    /// Batches accumulated.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// `C = Σ_batches (X/|max X|)ᵀ (X/|max X|) / batches`, `[in, in]` f64 on the CPU.
    pub fn covariance(&self) -> Result<Tensor> {
        match &self.sum {
            Some(sum) if self.batches > 0 => {
                let c = (sum.to_device(&Device::Cpu)?.to_dtype(DType::F64)? / self.batches as f64)?;
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
    fn update(&mut self, rows: &Tensor) -> Result<()> {
        let max = rows
            .max_keepdim(0)?
            .max_keepdim(1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let max = f64::from(max.first().copied().unwrap_or(0.0));
        let scale = max.abs();
        if !(scale.is_finite() && scale > 0.0) {
            return Err(PeftError::layer(
                &self.layer,
                format!(
                    "CorDA: the largest entry of a calibration batch's inputs is {max}; the \
                     reference normalisation divides by |max(X)| and cannot use it"
                ),
            ));
        }
        let x = (rows / scale)?;
        let xtx = x.t()?.matmul(&x)?;
        self.sum = Some(match self.sum.take() {
            Some(s) => (s + xtx)?,
            None => xtx,
        });
        self.batches += 1;
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
    pub u: Tensor,
    pub s: Tensor,
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
    pub calibration: CalibrationOptions,
}

/// What the calibration produced, per targeted layer.
#[derive(Clone, Debug)]
pub struct CordaState {
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
    let (linear, other) = calibrate::target_layers(model, &config.targeting)?;
    if let Some(layer) = other.first() {
        return Err(PeftError::layer(
            layer.name(),
            "CorDA adapts linear layers only (this one is a conv2d)",
        ));
    }
    let names: Vec<String> = linear.iter().map(LayerHandle::name).collect();
    let collected = calibrate::with_base_model(model, |model| {
        let inner = model.model();
        calibrate::collect(
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
            let dec = oriented_svd(&linear[m].weight(), &damped)?;
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

fn group_label(g: &calibrate::InputGroup, layers: &[LayerHandle]) -> String {
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

/// What [`convert_to_peft_lora`] wrote.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    /// Modules converted to rank-2r LoRA pairs.
    pub modules: Vec<String>,
    /// Whole-module tensors carried over (`modules_to_save`).
    pub copied_tensors: Vec<String>,
    /// The LoRA config written.
    pub config: LoraConfig,
}

/// The PEFT LoRA equivalent of a CorDA adapter on the original base (see the module docs): its
/// tensors under PEFT's file keys, and the report holding its config.
pub fn to_peft_lora(
    config: &CordaConfig,
    tensors: BTreeMap<String, Tensor>,
) -> Result<(Vec<(String, Tensor)>, ConvertReport)> {
    if config.use_rslora && (!config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty()) {
        return Err(PeftError::Unsupported(
            "converting a CorDA adapter with use_rslora and rank_pattern/alpha_pattern to PEFT \
             LoRA is not supported (PEFT refuses it too: the doubled rank changes the scaling)"
                .into(),
        ));
    }
    let factor = if config.use_rslora {
        std::f64::consts::SQRT_2
    } else {
        2.0
    };
    let mut lora = LoraConfig::new::<&str>(&[], 2 * config.r, config.lora_alpha * factor);
    lora.targeting = config.targeting.clone();
    lora.lora_dropout = config.lora_dropout;
    lora.use_rslora = config.use_rslora;
    lora.init_lora_weights = InitLoraWeights::Bool(true);
    lora.rank_pattern = config
        .rank_pattern
        .iter()
        .map(|(k, v)| (k.clone(), 2 * v))
        .collect();
    lora.alpha_pattern = config
        .alpha_pattern
        .iter()
        .map(|(k, v)| (k.clone(), v * factor))
        .collect();
    lora.common = CommonFields {
        inference_mode: false,
        ..config.common.clone()
    };

    let (shared, per_module) = peft_format::split_shared(tensors);
    if let Some(key) = shared.keys().next() {
        return Err(PeftError::UnexpectedTensor {
            key: key.clone(),
            location: "a CorDA adapter (it has no model-level tensors)".into(),
        });
    }
    let by_module = peft_format::group_by_module(per_module, CordaConfig::TENSOR_PREFIXES);
    let mut out = Vec::new();
    let mut modules = Vec::new();
    let mut copied = Vec::new();
    for (module, mut t) in by_module {
        let has_corda = t.keys().any(|k| {
            k.split('.')
                .next()
                .is_some_and(|h| CordaConfig::TENSOR_PREFIXES.contains(&h))
        });
        if !has_corda {
            for (local, tensor) in t {
                let key = format!("{KEY_PREFIX}{module}.{local}");
                copied.push(key.clone());
                out.push((key, tensor));
            }
            continue;
        }
        let mut take = |name: &str| -> Result<Tensor> {
            let t = t.remove(name).ok_or_else(|| PeftError::MissingTensor {
                key: format!("{KEY_PREFIX}{module}.{name}"),
                location: "the CorDA adapter".into(),
            })?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let (a, b, a0, b0) = (take(LORA_A)?, take(LORA_B)?, take(INIT_A)?, take(INIT_B)?);
        if let Some(extra) = t.keys().next() {
            return Err(PeftError::UnexpectedTensor {
                key: format!("{KEY_PREFIX}{module}.{extra}"),
                location: "the CorDA adapter".into(),
            });
        }
        let r = a.dim(0)?;
        for (name, tensor, expected) in [
            (LORA_B, &b, [b.dim(0)?, r]),
            (INIT_A, &a0, [r, a.dim(1)?]),
            (INIT_B, &b0, [b.dim(0)?, r]),
        ] {
            if tensor.dims() != expected {
                return Err(PeftError::ShapeMismatch {
                    key: format!("{KEY_PREFIX}{module}.{name}"),
                    expected: expected.to_vec(),
                    got: tensor.dims().to_vec(),
                });
            }
        }
        let lora_a = Tensor::cat(&[&a, &a0], 0)?;
        let lora_b = Tensor::cat(&[&b, &b0.neg()?], 1)?;
        out.push((format!("{KEY_PREFIX}{module}.{LORA_A}"), lora_a));
        out.push((format!("{KEY_PREFIX}{module}.{LORA_B}"), lora_b));
        modules.push(module);
    }
    if modules.is_empty() {
        return Err(PeftError::config(
            "adapter",
            "the CorDA adapter has no lora_A / lora_B tensors",
        ));
    }
    let report = ConvertReport {
        modules,
        copied_tensors: copied,
        config: lora,
    };
    Ok((out, report))
}

/// `candle-peft convert <adapter> --to peft-lora --base <model> --out <dir>`: reads a CorDA
/// adapter directory, checks every module against the base model's weights (name and shape;
/// a safetensors base, whose names may lack a task model's leading prefix such as `bert.`), and
/// writes the rank-2r PEFT LoRA to `out` (plus the adapter's `labels.json`, if any).
pub fn convert_to_peft_lora(adapter_dir: &Path, base: &Path, out: &Path) -> Result<ConvertReport> {
    let file = peft_format::read_adapter_dir(adapter_dir)?;
    let config = match file.config {
        AdapterConfig::Corda(c) => c,
        other => {
            return Err(PeftError::Unsupported(format!(
                "{}: only CorDA adapters convert to PEFT LoRA (this one is {})",
                adapter_dir.display(),
                other.method()
            )));
        }
    };
    let (tensors, report) = to_peft_lora(&config, file.tensors)?;
    check_against_base(base, &tensors)?;
    let lora_config = AdapterConfig::Lora(report.config.clone());
    lora_config.validate()?;
    peft_format::write_adapter_dir(out, &lora_config, &tensors)?;
    let labels = adapter_dir.join(crate::tasks::classify::LABELS_FILE);
    if labels.is_file() {
        let bytes = std::fs::read(&labels).map_err(|e| PeftError::io(&labels, e))?;
        peft_format::write_atomic(&out.join(crate::tasks::classify::LABELS_FILE), &bytes)?;
    }
    Ok(report)
}

/// Every converted module `P` must find a base weight `P.weight` (or `Q.weight` with `P` =
/// `prefix.Q`) of shape `[out, in]` matching its LoRA pair.
fn check_against_base(base: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let source = crate::io::source::resolve_local(base)?;
    if source.kind == crate::io::source::SourceKind::Gguf {
        // GGUF names differ from the HF names adapters use; the Llama loader maps them, this
        // check does not.
        return Ok(());
    }
    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for path in &source.weights {
        for (name, info) in crate::io::export::read_safetensors_header(path)?.tensors {
            shapes.insert(name, info.shape.clone());
        }
    }
    let mut a_shapes: BTreeMap<&str, &[usize]> = BTreeMap::new();
    let mut b_shapes: BTreeMap<&str, &[usize]> = BTreeMap::new();
    for (key, t) in tensors {
        if let Some(m) = key
            .strip_prefix(KEY_PREFIX)
            .and_then(|k| k.strip_suffix(&format!(".{LORA_A}")))
        {
            a_shapes.insert(m, t.dims());
        } else if let Some(m) = key
            .strip_prefix(KEY_PREFIX)
            .and_then(|k| k.strip_suffix(&format!(".{LORA_B}")))
        {
            b_shapes.insert(m, t.dims());
        }
    }
    for (module, a) in &a_shapes {
        let Some(b) = b_shapes.get(module) else {
            continue;
        };
        let expected = vec![b[0], a[1]];
        let wanted = format!("{module}.weight");
        let found = shapes.get(&wanted).or_else(|| {
            shapes
                .iter()
                .filter(|(name, _)| crate::config::suffix_match(&wanted, name))
                .max_by_key(|(name, _)| name.len())
                .map(|(_, s)| s)
        });
        match found {
            None => {
                return Err(PeftError::MissingTensor {
                    key: wanted,
                    location: format!("the base model {}", base.display()),
                });
            }
            Some(shape) if *shape != expected => {
                return Err(PeftError::ShapeMismatch {
                    key: format!("{wanted} (base model {})", base.display()),
                    expected,
                    got: shape.clone(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}
