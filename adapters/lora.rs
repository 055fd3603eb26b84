//! LoRA: low-rank adaptation (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language
//! Models", arXiv:2106.09685), with Hugging Face PEFT's semantics.
//!
//! Shapes, for a base weight `W: [out, in]` (linear) or `[out, in/g, kh, kw]` (conv2d, g groups):
//! - linear: `A: [r, in]`, `B: [out, r]`, any `r ≥ 1` (`r > min(in, out)` too, as in PEFT; the
//!   update's rank is then still at most `min(in, out)`);
//! - conv2d: `A: [r, in, kh, kw]` (a conv with the base's kernel, stride, padding and dilation,
//!   no bias), `B: [out, r/g, 1, 1]` (a 1×1 conv with the base's groups).
//!
//! Init (PEFT's `init_lora_weights`): `true` gives `A ~ U(−1/√fan_in, 1/√fan_in)` with
//! `fan_in = in·kh·kw` (PEFT's `kaiming_uniform_(a=√5)`), `B = 0`; `"gaussian"` gives
//! `A ~ N(0, 1/r)`, `B = 0`; `false` also draws `B ~ U(−1/√r, 1/√r)`, so the adapter is not the
//! identity (for tests). All draws come from a seeded ChaCha RNG.
//!
//! Scaling `s = α/r`, or `α/√r` with rsLoRA; `r` and `α` per module from `rank_pattern` and
//! `alpha_pattern`.
//!
//! Forward (activation space): `Δ(x) = s · B(A(dropout(x)))`; dropout touches only the adapter's
//! input, and only in training.
//!
//! Merge: `ΔW = s · B·A` (linear); `ΔW[o,i,:,:] = s · Σ_k B[o,k] A[k,i,:,:]` (conv2d, groups = 1;
//! grouped convs cannot merge, as in PEFT). Dilation is copied to `A`, which PEFT omits; the two
//! agree for dilation 1 and ours keeps the shapes right otherwise.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::adapter::{
    Adapter, CliSpec, LayerGeometry, Method, MethodSpec, OptionKind, OptionSpec, TensorRoles,
};
use crate::adapters::support::saved_tensor;
pub use crate::config::EvaConfig;
use crate::config::{
    CommonFields, ConfigFields, InitContext, LoadContext, MethodConfig, PatternMap, Targeting,
    json_number, pattern_value, peft_json, to_json,
};
use crate::error::{PeftError, Result};
use crate::init::{self, Dropout};
use crate::ops::FrozenWeight;

/// PEFT's `init_lora_weights`: a bool or a named scheme.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true`: Kaiming-uniform `A`, `B = 0`; `false`: `B` random too (not the identity).
    Bool(bool),
    /// A named scheme: `gaussian`, `eva`, `corda`.
    Named(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Bool(true)
    }
}

/// LoRA's registry entry.
pub const METHOD: Method = Method::new(&MethodSpec {
    name: "lora",
    aliases: &[],
    peft_type: "LORA",
    summary: "low-rank adaptation: ΔW = (α/r)·B·A, B = 0 at init",
    tensors: LORA_TENSORS,
    cli: LORA_CLI,
    needs_calibration: false,
    lora_pro_optimizer: false,
});

/// The per-layer tensors of a LoRA file (shared by the methods that write LoRA files).
pub const LORA_TENSORS: TensorRoles = TensorRoles {
    prefixes: &[
        "lora_A",
        "lora_B",
        "lora_magnitude_vector",
        "lora_embedding_A",
        "lora_embedding_B",
    ],
    frozen: &[],
    rank: Some("lora_A.weight"),
};

/// The CLI mapping of LoRA (and of LoRA-Pro, which trains the same adapter): r 8, α 16,
/// dropout 0 unless given.
pub const LORA_CLI: CliSpec = CliSpec {
    defaults: r#"{"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0}"#,
    rank: Some("r"),
    alpha: Some("lora_alpha"),
    alpha_per_rank: None,
    dropout: Some("lora_dropout"),
    options: &[USE_RSLORA, INIT_LORA_WEIGHTS],
};

/// `--opt use_rslora=true`: scaling α/√r.
pub const USE_RSLORA: OptionSpec = OptionSpec {
    key: "use_rslora",
    path: "use_rslora",
    kind: OptionKind::Bool,
    help: "scale by α/√r instead of α/r (rsLoRA)",
    excludes: None,
};

const INIT_LORA_WEIGHTS: OptionSpec = OptionSpec {
    key: "init_lora_weights",
    path: "init_lora_weights",
    kind: OptionKind::BoolOrStr,
    help: "true (Kaiming-uniform A), gaussian, or false (B random too: not the identity)",
    excludes: None,
};

/// `LoraConfig`, with PEFT's field names and defaults ([`Default`]: `r` 8, `lora_alpha` 8,
/// Kaiming-uniform `A` and `B = 0`, no `target_modules`). Build one with struct update:
/// `LoraConfig { targeting: Targeting::new(ModuleSelector::list(&["q_proj"])), r: 16,
/// ..Default::default() }`. [`validate`](Self::validate) requires `target_modules`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Which modules are adapted.
    #[serde(flatten)]
    pub targeting: Targeting,
    /// The rank (PEFT's default 8).
    pub r: usize,
    /// `α` of the scaling `α/r` (PEFT's default 8).
    pub lora_alpha: f64,
    /// Dropout on the adapter's input, in training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Scaling `α/√r` instead of `α/r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// The base weight is stored `[in, out]` (GPT-2's `Conv1D`). Layers built by `PeftBuilder` are
    /// `[out, in]`, so, as PEFT does for `nn.Linear`, it is ignored there; it is kept so a file
    /// round-trips, and `candle-peft merge` honours it for checkpoints that store `[in, out]`.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// How `A` and `B` start.
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// Per-module ranks (keys matched as PEFT matches them: the first, in order, wins).
    #[serde(default, deserialize_with = "crate::config::whole_rank_pattern")]
    pub rank_pattern: PatternMap<usize>,
    /// Per-module `α` (matched as `rank_pattern`).
    #[serde(default, deserialize_with = "crate::config::null_as_empty")]
    pub alpha_pattern: PatternMap<f64>,
    /// PEFT's `eva_config`, for adapters made by EVA.
    #[serde(default)]
    pub eva_config: Option<EvaConfig>,
    /// `task_type`, `base_model_name_or_path`, `revision`, `inference_mode`.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// PEFT `LoraConfig` variants this crate does not implement; read only to refuse them by name.
#[derive(Deserialize)]
struct Unsupported {
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    layer_replication: Option<Value>,
    #[serde(default)]
    alora_invocation_tokens: Option<Value>,
}

impl Unsupported {
    fn refuse(&self) -> Result<()> {
        if self.use_dora {
            return Err(PeftError::config("use_dora", "DoRA is not supported"));
        }
        if self.lora_bias {
            return Err(PeftError::config(
                "lora_bias",
                "a bias on lora_B is not supported",
            ));
        }
        if let Some(bias) = self.bias.as_deref().filter(|b| *b != "none") {
            return Err(PeftError::config(
                "bias",
                format!("`{bias}` is not supported (only \"none\")"),
            ));
        }
        if self
            .layer_replication
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return Err(PeftError::config("layer_replication", "is not supported"));
        }
        if self
            .alora_invocation_tokens
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return Err(PeftError::config(
                "alora_invocation_tokens",
                "aLoRA is not supported",
            ));
        }
        Ok(())
    }
}

impl Default for LoraConfig {
    /// PEFT's defaults; no `target_modules` (set them before [`LoraConfig::validate`]).
    fn default() -> Self {
        Self {
            targeting: Targeting::default(),
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            use_rslora: false,
            fan_in_fan_out: false,
            init_lora_weights: InitLoraWeights::Bool(true),
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            eva_config: None,
            common: CommonFields::default(),
        }
    }
}

impl LoraConfig {
    /// A config targeting `targets` (names or suffixes) with rank `r` and `α = lora_alpha`, the
    /// rest [`Default`].
    pub fn new<S: AsRef<str>>(targets: &[S], r: usize, lora_alpha: f64) -> Self {
        Self {
            targeting: Targeting::new(crate::config::ModuleSelector::list(targets)),
            r,
            lora_alpha,
            ..Self::default()
        }
    }

    /// Checks every field, without looking at a model.
    pub fn validate(&self) -> Result<()> {
        self.validate_shape()?;
        if !self.lora_alpha.is_finite() {
            return Err(PeftError::config("lora_alpha", "must be finite"));
        }
        match &self.init_lora_weights {
            InitLoraWeights::Bool(_) => {}
            InitLoraWeights::Named(n) if n == "gaussian" || n == "eva" => {}
            InitLoraWeights::Named(n) => {
                return Err(PeftError::config(
                    "init_lora_weights",
                    format!(
                        "`{n}` is not supported (supported: true, false, \"gaussian\", \"eva\")"
                    ),
                ));
            }
        }
        if let Some(eva) = &self.eva_config {
            eva.validate()?;
        }
        Ok(())
    }

    /// The checks every LoRA-shaped config shares (CorDA's too): targets, ranks, dropout.
    pub(crate) fn validate_shape(&self) -> Result<()> {
        self.targeting.validate()?;
        if self.r == 0 {
            return Err(PeftError::config("r", "rank must be at least 1, got 0"));
        }
        for (key, &r) in &self.rank_pattern {
            if r == 0 {
                return Err(PeftError::config(
                    format!("rank_pattern.{key}"),
                    "rank must be at least 1, got 0",
                ));
            }
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::config(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            ));
        }
        Ok(())
    }

    /// `(r, α, s)` for one module, after `rank_pattern` / `alpha_pattern`.
    pub fn resolve(&self, module: &str) -> Result<(usize, f64, f64)> {
        let r = pattern_value(&self.rank_pattern, module, "rank_pattern")?.unwrap_or(self.r);
        let alpha =
            pattern_value(&self.alpha_pattern, module, "alpha_pattern")?.unwrap_or(self.lora_alpha);
        let scaling = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        Ok((r, alpha, scaling))
    }

    /// Reads `adapter_config.json` content (any `peft_type`; the caller dispatches on it).
    pub fn from_peft_json(value: &Value) -> Result<Self> {
        let config: Self = crate::config::from_json(value)?;
        crate::config::from_json::<Unsupported>(value)?.refuse()?;
        Ok(config)
    }

    /// Every field PEFT 0.21's `LoraConfig` writes, so Python PEFT loads the file as it is.
    pub fn to_peft_json(&self) -> Result<Value> {
        let alpha_pattern: serde_json::Map<String, Value> = self
            .alpha_pattern
            .iter()
            .map(|(k, v)| (k.clone(), json_number(*v)))
            .collect();
        let fields = json!({
            "alora_invocation_tokens": null,
            "alpha_pattern": alpha_pattern,
            "arrow_config": null,
            "auto_mapping": null,
            "bias": "none",
            "corda_config": null,
            "ensure_weight_tying": false,
            "eva_config": to_json(&self.eva_config)?,
            "fan_in_fan_out": self.fan_in_fan_out,
            "init_lora_weights": to_json(&self.init_lora_weights)?,
            "kasa_config": null,
            "layer_replication": null,
            "loftq_config": {},
            "lora_alpha": json_number(self.lora_alpha),
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "lora_ga_config": null,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "monteclora_config": null,
            "peft_type": "LORA",
            "qalora_group_size": 16,
            "r": self.r,
            "rank_pattern": self.rank_pattern,
            "target_parameters": null,
            "trainable_token_indices": null,
            "use_bdlora": null,
            "use_dora": false,
            "use_qalora": false,
            "use_rslora": self.use_rslora,
            "velora_config": null,
        });
        peft_json(fields, &self.targeting, &self.common)
    }

    /// A fresh adapter for `module`, drawn from `rng`.
    pub fn init_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<LoraAdapter> {
        let (r, alpha, scaling) = self.resolve(module)?;
        let (a_shape, b_shape) = lora_shapes(module, geometry, r)?;
        let a_fan_in: usize = a_shape[1..].iter().product();
        let a_numel: usize = a_shape.iter().product();
        let b_numel: usize = b_shape.iter().product();
        let a = match &self.init_lora_weights {
            InitLoraWeights::Named(n) if n == "gaussian" => {
                init::normal(rng, a_numel, 1.0 / r as f32)
            }
            _ => {
                let bound = 1.0 / (a_fan_in as f32).sqrt();
                init::uniform(rng, a_numel, -bound, bound)
            }
        };
        let b = match &self.init_lora_weights {
            InitLoraWeights::Bool(false) => {
                let b_fan_in: usize = b_shape[1..].iter().product();
                let bound = 1.0 / (b_fan_in as f32).sqrt();
                init::uniform(rng, b_numel, -bound, bound)
            }
            _ => vec![0f32; b_numel],
        };
        let a = Var::from_tensor(&Tensor::from_vec(a, a_shape, device)?)?;
        let b = Var::from_tensor(&Tensor::from_vec(b, b_shape, device)?)?;
        Ok(LoraAdapter::new(
            geometry,
            r,
            alpha,
            scaling,
            self.lora_dropout as f32,
            a,
            b,
            rng.random(),
        ))
    }

    /// The adapter for `module` from saved tensors (`lora_A.weight`, `lora_B.weight`).
    pub fn load_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        tensors: &BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<LoraAdapter> {
        let (r, alpha, scaling) = self.resolve(module)?;
        let (a_shape, b_shape) = lora_shapes(module, geometry, r)?;
        let fetch = |name: &str, shape: &[usize]| -> Result<Var> {
            let t = saved_tensor(module, tensors, name, shape, DType::F32, device)?;
            Ok(Var::from_tensor(&t)?)
        };
        let a = fetch("lora_A.weight", &a_shape)?;
        let b = fetch("lora_B.weight", &b_shape)?;
        Ok(LoraAdapter::new(
            geometry,
            r,
            alpha,
            scaling,
            self.lora_dropout as f32,
            a,
            b,
            init::seed_from_name(module),
        ))
    }
}

impl ConfigFields for LoraConfig {
    fn fields(&self) -> (&Targeting, &CommonFields) {
        (&self.targeting, &self.common)
    }

    fn fields_mut(&mut self) -> (&mut Targeting, &mut CommonFields) {
        (&mut self.targeting, &mut self.common)
    }
}

impl MethodConfig for LoraConfig {
    fn method(&self) -> Method {
        METHOD
    }

    fn validate(&self) -> Result<()> {
        LoraConfig::validate(self)
    }

    fn to_peft_json(&self) -> Result<Value> {
        LoraConfig::to_peft_json(self)
    }

    fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }

    fn init_adapter(
        &self,
        ctx: &InitContext<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(LoraConfig::init_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.device,
            rng,
        )?))
    }

    fn load_adapter(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(LoraConfig::load_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.tensors,
            ctx.device,
        )?))
    }
}

/// Shapes of A and B for a layer, after checking the rank fits a conv's groups. Any rank fits a
/// linear layer, `r > min(in, out)` included (as in PEFT: the update's rank is still at most
/// `min(in, out)`).
fn lora_shapes(
    module: &str,
    geometry: LayerGeometry,
    r: usize,
) -> Result<(Vec<usize>, Vec<usize>)> {
    match geometry {
        LayerGeometry::Linear {
            in_features,
            out_features,
        } => Ok((vec![r, in_features], vec![out_features, r])),
        LayerGeometry::Conv2d {
            in_channels,
            out_channels,
            kernel,
            params,
        } => {
            if !r.is_multiple_of(params.groups) {
                return Err(PeftError::layer(
                    module,
                    format!(
                        "LoRA rank {r} must be divisible by the conv's groups ({})",
                        params.groups
                    ),
                ));
            }
            Ok((
                vec![r, in_channels, kernel.0, kernel.1],
                vec![out_channels, r / params.groups, 1, 1],
            ))
        }
    }
}

/// One LoRA adapter on one layer.
#[derive(Debug)]
pub struct LoraAdapter {
    geometry: LayerGeometry,
    rank: usize,
    alpha: f64,
    scaling: f64,
    dropout: Dropout,
    a: Var,
    b: Var,
}

impl LoraAdapter {
    /// An adapter with factors `a`, `b` and scaling `s`; `dropout_seed` seeds its dropout masks.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        geometry: LayerGeometry,
        rank: usize,
        alpha: f64,
        scaling: f64,
        dropout: f32,
        a: Var,
        b: Var,
        dropout_seed: u64,
    ) -> Self {
        Self {
            geometry,
            rank,
            alpha,
            scaling,
            dropout: Dropout::new(dropout, dropout_seed),
            a,
            b,
        }
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// `α`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// `s`: α/r, or α/√r with rsLoRA.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// `A`.
    pub fn lora_a(&self) -> &Var {
        &self.a
    }

    /// `B`.
    pub fn lora_b(&self) -> &Var {
        &self.b
    }

    /// The layer's shape.
    pub fn geometry(&self) -> LayerGeometry {
        self.geometry
    }

    /// The adapter's input dropout.
    pub(crate) fn dropout(&self) -> &Dropout {
        &self.dropout
    }
}

impl Adapter for LoraAdapter {
    fn method(&self) -> Method {
        METHOD
    }

    fn dropout_rng(&self) -> Option<ChaCha8Rng> {
        Some(self.dropout.rng_state())
    }

    fn set_dropout_rng(&self, rng: ChaCha8Rng) {
        self.dropout.set_rng_state(rng);
    }

    fn forward_delta(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.dropout.apply(x.to_dtype(DType::F32)?, train)?;
        match self.geometry {
            LayerGeometry::Linear { in_features, .. } => {
                let mut out_dims = x.dims().to_vec();
                let Some(last) = out_dims.last_mut() else {
                    return Err(PeftError::Unsupported("LoRA input is a scalar".into()));
                };
                *last = self.geometry.out_features();
                let x2 = x.reshape(((), in_features))?;
                // Scaling the rank-r intermediate costs r/out of scaling the output.
                let h = (x2.matmul(&self.a.as_tensor().t()?)? * self.scaling)?;
                let y = h.matmul(&self.b.as_tensor().t()?)?;
                Ok(y.reshape(out_dims)?)
            }
            LayerGeometry::Conv2d { params, .. } => {
                let h = crate::kernels::frozen::conv2d_trainable(
                    &x,
                    self.a.as_tensor(),
                    params.padding,
                    params.stride,
                    params.dilation,
                    1,
                )?;
                let y = h.conv2d(self.b.as_tensor(), 0, 1, 1, params.groups)?;
                Ok((y * self.scaling)?)
            }
        }
    }

    fn fused_linear_forward(
        &self,
        x: &Tensor,
        weight: &FrozenWeight,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Option<Result<Tensor>> {
        let cpu_f32 = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        let eligible = matches!(self.geometry, LayerGeometry::Linear { .. })
            && !self.dropout.is_active(train)
            && cpu_f32(x)
            && weight.is_cpu_matrix()
            && bias.is_none_or(cpu_f32);
        eligible.then(|| {
            Ok(crate::ops::frozen_linear_lora_weight(
                x,
                weight,
                bias,
                self.a.as_tensor(),
                self.b.as_tensor(),
                self.scaling,
            )?)
        })
    }

    fn fused_lora_factors(&self, train: bool) -> Option<(Tensor, Tensor, f64)> {
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        let cpu_f32 = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        let eligible = matches!(self.geometry, LayerGeometry::Linear { .. })
            && !self.dropout.is_active(train)
            && cpu_f32(a)
            && cpu_f32(b);
        eligible.then(|| (a.clone(), b.clone(), self.scaling))
    }

    fn delta_weight(&self) -> Result<Tensor> {
        let a = self.a.as_tensor();
        let b = self.b.as_tensor();
        let delta = match self.geometry {
            LayerGeometry::Linear { .. } => b.matmul(a)?,
            LayerGeometry::Conv2d { params, .. } => {
                if params.groups != 1 {
                    return Err(PeftError::Unsupported(
                        "merging LoRA into a conv2d with groups > 1 is not supported (as in PEFT)"
                            .into(),
                    ));
                }
                let out = self.geometry.out_features();
                let b2 = b.reshape((out, self.rank))?;
                let a2 = a.reshape((self.rank, ()))?;
                b2.matmul(&a2)?.reshape(self.geometry.weight_shape())?
            }
        };
        Ok((delta * self.scaling)?)
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_A.weight".to_string(), self.a.clone()),
            ("lora_B.weight".to_string(), self.b.clone()),
        ]
    }

    fn tensors_to_save(&self) -> Vec<(String, Tensor)> {
        vec![
            ("lora_A.weight".to_string(), self.a.as_tensor().clone()),
            ("lora_B.weight".to_string(), self.b.as_tensor().clone()),
        ]
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
