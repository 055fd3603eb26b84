//! FLoRA: a Tucker-structured low-rank update for N-D weights (Si et al., 2024, "Maintaining
//! Structural Integrity in Parameter Spaces for Parameter Efficient Fine-tuning", first titled
//! "FLoRA: Low-Rank Core Space for N-dimension", arXiv:2405.14739, ICLR 2025). Reference
//! implementation: SJTU-DeepVisionLab/FLoRA. `peft_type` "FLORA" (PEFT has no FLoRA; the format
//! is ours).
//!
//! Modes, in the reference's order `[in, out, spatial…]` (input first, not PyTorch's order):
//! - linear (N = 2): `dims = [in, out]`, ranks `[r0, r1]`;
//! - conv2d (N = 4): `dims = [in/g, out, kh, kw]`, ranks `[r0, r1, r2, r3]`. The mode-0 size is
//!   `in/groups` (the reference uses `in` and so breaks on grouped and depthwise convs).
//!
//! Trainable, all of them: core `G: [r0, …, r_{N−1}]` and one factor `P_i: [d_i, r_i]` per mode;
//! `Σ d_i·r_i + Π r_i` scalars. `r` in the config is one int (linear `[r, r]`; conv2d
//! `[r, r, min(r, kh), min(r, kw)]`: a spatial rank above the kernel size adds nothing) or the
//! per-mode list (`[16, 16, 2, 2]`), whose length must be the weight's order.
//!
//! Init: `P_i ~ N(0, 1/(2·r_i))` (the reference's `kaiming_normal_(a=√3)` with fan-in `r_i`),
//! drawn from a seeded ChaCha RNG in mode order; `G = 0`, so `Δ = 0` exactly and at step 1 only
//! `G` has a non-zero gradient. `init_weights = false` draws `G ~ N(0, 1)` (for tests).
//!
//! `ΔW = s · G ×₁ P0 ×₂ P1 ×₃ P2 ×₄ P3` with modes 0 and 1 swapped back to PyTorch's order:
//! `ΔW[o, i, h, w] = s Σ G[a, b, c, d] P0[i, a] P1[o, b] P2[h, c] P3[w, d]`; linear
//! `ΔW = s · P1 Gᵀ P0ᵀ`. `s = scale` is a plain multiplier (no `/r`).
//!
//! Forward (activation space, `x̂ = dropout(x)`):
//! - linear: `Δ(x) = s · ((x̂ P0) G) P1ᵀ`;
//! - conv2d, groups = 1: three convs, a 1×1 `in → r0` with `P0ᵀ`, a `kh×kw` `r0 → r1` with the
//!   core kernel `K[b, a, h, w] = Σ_{c,d} G[a, b, c, d] P2[h, c] P3[w, d]` and the base's stride,
//!   padding and dilation, and a 1×1 `r1 → out` with `P1`. Exact: zero padding commutes with
//!   bias-free 1×1 channel mixes.
//! - conv2d, groups > 1: `conv2d(x̂, ΔW, groups)` with the dense `ΔW: [out, in/g, kh, kw]`.
//!
//! File: per module `flora_layer.param_G` and `flora_layer.param_0 … param_{N−1}` (the
//! reference's parameter names); the config holds `r`, `scale`, `flora_dropout`. No base weight is
//! needed to load or merge.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::adapter::{
    Adapter, CliSpec, LayerGeometry, Method, MethodSpec, OptionKind, OptionSpec, TensorRoles,
};
use crate::adapters::support::saved_tensor;
use crate::config::{
    CommonFields, ConfigFields, InitContext, LoadContext, MethodConfig, OneOrMany, Targeting,
    peft_json, to_json,
};
use crate::error::{PeftError, Result};
use crate::init::{self, Dropout};
use crate::kernels::frozen::conv2d_trainable;

const PREFIX: &str = "flora_layer";

/// `flora_layer.param_G`.
pub fn core_name() -> String {
    format!("{PREFIX}.param_G")
}

/// `flora_layer.param_<mode>`.
pub fn factor_name(mode: usize) -> String {
    format!("{PREFIX}.param_{mode}")
}

/// The mode sizes FLoRA factorises: `[in, out]` or `[in/groups, out, kh, kw]`.
pub fn mode_sizes(geometry: LayerGeometry) -> Vec<usize> {
    let shape = geometry.weight_shape();
    let mut dims = vec![shape[1], shape[0]];
    dims.extend_from_slice(&shape[2..]);
    dims
}

/// `Σ d_i·r_i + Π r_i`: trainable scalars of one FLoRA adapter.
pub fn trainable_parameters(dims: &[usize], ranks: &[usize]) -> usize {
    let factors: usize = dims.iter().zip(ranks).map(|(d, r)| d * r).sum();
    factors + ranks.iter().product::<usize>()
}

/// FLoRA's registry entry. CLI: `--rank` (default 8) for every mode, `--alpha` as the plain
/// `scale` (default 1); `--opt r=16,16,2,2` sets per-mode ranks.
pub const METHOD: Method = Method::new(&MethodSpec {
    name: "flora",
    aliases: &[],
    peft_type: "FLORA",
    summary: "Tucker-factored update: a small core tensor and one factor per weight mode",
    tensors: TensorRoles {
        prefixes: &[PREFIX],
        frozen: &[],
        rank: None,
    },
    cli: CliSpec {
        defaults: r#"{"r": 8, "scale": 1.0, "flora_dropout": 0.0}"#,
        rank: Some("r"),
        alpha: Some("scale"),
        alpha_per_rank: None,
        dropout: Some("flora_dropout"),
        options: &[
            OptionSpec {
                key: "r",
                path: "r",
                kind: OptionKind::IntList,
                help: "one rank per mode: 2 for linear ([in, out]), 4 for conv2d",
                excludes: Some("--rank"),
            },
            OptionSpec {
                key: "init_weights",
                path: "init_weights",
                kind: OptionKind::Bool,
                help: "false: core random, not the identity (for tests)",
                excludes: None,
            },
        ],
    },
    needs_calibration: false,
    lora_pro_optimizer: false,
});

/// FLoRA's config ([`Default`]: `r` 8 for every mode, `scale` 1, no `target_modules`;
/// [`validate`](Self::validate) requires them).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct FloraConfig {
    /// Which modules are adapted.
    #[serde(flatten)]
    pub targeting: Targeting,
    /// One rank for every mode, or one per mode (`[r0, r1]` linear, `[r0, r1, r2, r3]` conv2d).
    pub r: OneOrMany<usize>,
    /// `s`, a plain multiplier of `ΔW`.
    pub scale: f64,
    /// Dropout on the adapter's input (the reference's `drop_rate`).
    #[serde(alias = "drop_rate")]
    pub flora_dropout: f64,
    /// `false` draws `G ~ N(0, 1)`: not the identity (for tests).
    pub init_weights: bool,
    /// `task_type`, `base_model_name_or_path`, `revision`, `inference_mode`.
    #[serde(flatten)]
    pub common: CommonFields,
}

impl Default for FloraConfig {
    /// Rank 8 for every mode, `scale` 1, no dropout, `G = 0`; no `target_modules`.
    fn default() -> Self {
        Self {
            targeting: Targeting::default(),
            r: OneOrMany::One(8),
            scale: 1.0,
            flora_dropout: 0.0,
            init_weights: true,
            common: CommonFields::default(),
        }
    }
}

impl FloraConfig {
    /// A config targeting `targets` with ranks `r` (one int or per mode) and scale `scale`, the
    /// rest [`Default`].
    pub fn new<S: AsRef<str>>(targets: &[S], r: OneOrMany<usize>, scale: f64) -> Self {
        Self {
            targeting: Targeting::new(crate::config::ModuleSelector::list(targets)),
            r,
            scale,
            ..Self::default()
        }
    }

    /// Checks every field, without looking at a model.
    pub fn validate(&self) -> Result<()> {
        self.targeting.validate()?;
        let ranks = self.r.to_vec();
        if let OneOrMany::Many(list) = &self.r
            && !matches!(list.len(), 2 | 4)
        {
            return Err(PeftError::config(
                "r",
                format!(
                    "{list:?} has {} entries; FLoRA takes one rank per mode: 2 for a linear \
                         layer ([in, out]), 4 for a conv2d ([in, out, kh, kw])",
                    list.len()
                ),
            ));
        }
        if let Some(i) = ranks.iter().position(|&r| r == 0) {
            return Err(PeftError::config(
                "r",
                format!(
                    "rank of mode {i} is 0 in {:?}; every rank must be at least 1",
                    ranks
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.flora_dropout) {
            return Err(PeftError::config(
                "flora_dropout",
                format!("must be in [0, 1), got {}", self.flora_dropout),
            ));
        }
        if !self.scale.is_finite() {
            return Err(PeftError::config("scale", "must be finite"));
        }
        Ok(())
    }

    /// The per-mode ranks for a layer; a list must have one entry per mode of the weight.
    pub fn ranks_for(&self, module: &str, geometry: LayerGeometry) -> Result<Vec<usize>> {
        let dims = mode_sizes(geometry);
        let ranks = match &self.r {
            OneOrMany::One(r) => {
                let mut v = vec![*r, *r];
                v.extend(dims[2..].iter().map(|&d| d.min(*r)));
                v
            }
            OneOrMany::Many(list) => {
                if list.len() != dims.len() {
                    let kind = match geometry {
                        LayerGeometry::Linear { .. } => "linear weight has 2 modes [in, out]",
                        LayerGeometry::Conv2d { .. } => {
                            "conv2d weight has 4 modes [in/groups, out, kh, kw]"
                        }
                    };
                    return Err(PeftError::layer(
                        module,
                        format!(
                            "FLoRA rank list {list:?} has {} entries but the {kind} = {dims:?}",
                            list.len()
                        ),
                    ));
                }
                list.clone()
            }
        };
        if let Some(i) = ranks.iter().position(|&r| r == 0) {
            return Err(PeftError::layer(
                module,
                format!("FLoRA rank of mode {i} is 0 in {ranks:?}"),
            ));
        }
        Ok(ranks)
    }

    /// Reads `adapter_config.json` content.
    pub fn from_peft_json(value: &Value) -> Result<Self> {
        crate::config::from_json(value)
    }

    /// The `adapter_config.json` fields.
    pub fn to_peft_json(&self) -> Result<Value> {
        let fields = json!({
            "flora_dropout": self.flora_dropout,
            "init_weights": self.init_weights,
            "peft_type": "FLORA",
            "r": to_json(&self.r)?,
            "scale": self.scale,
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
    ) -> Result<FloraAdapter> {
        let ranks = self.ranks_for(module, geometry)?;
        let dims = mode_sizes(geometry);
        let mut factors = Vec::with_capacity(dims.len());
        for (&d, &r) in dims.iter().zip(&ranks) {
            let std = (1.0 / (2.0 * r as f64)).sqrt() as f32;
            let v = init::normal(rng, d * r, std);
            factors.push(Var::from_tensor(&Tensor::from_vec(v, (d, r), device)?)?);
        }
        let core_numel: usize = ranks.iter().product();
        let core = if self.init_weights {
            vec![0f32; core_numel]
        } else {
            init::normal(rng, core_numel, 1.0)
        };
        let core = Var::from_tensor(&Tensor::from_vec(core, ranks.as_slice(), device)?)?;
        Ok(FloraAdapter::new(
            geometry,
            ranks,
            self,
            core,
            factors,
            rng.random(),
        ))
    }

    /// The adapter for `module` from saved tensors (`flora_layer.param_G`, `param_0`, …).
    pub fn load_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        tensors: &BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<FloraAdapter> {
        let ranks = self.ranks_for(module, geometry)?;
        let dims = mode_sizes(geometry);
        let fetch = |name: &str, shape: &[usize]| -> Result<Var> {
            let t = saved_tensor(module, tensors, name, shape, DType::F32, device)?;
            Ok(Var::from_tensor(&t)?)
        };
        let core = fetch(&core_name(), &ranks)?;
        let factors = dims
            .iter()
            .zip(&ranks)
            .enumerate()
            .map(|(i, (&d, &r))| fetch(&factor_name(i), &[d, r]))
            .collect::<Result<Vec<_>>>()?;
        Ok(FloraAdapter::new(
            geometry,
            ranks,
            self,
            core,
            factors,
            init::seed_from_name(module),
        ))
    }
}

impl ConfigFields for FloraConfig {
    fn fields(&self) -> (&Targeting, &CommonFields) {
        (&self.targeting, &self.common)
    }

    fn fields_mut(&mut self) -> (&mut Targeting, &mut CommonFields) {
        (&mut self.targeting, &mut self.common)
    }
}

impl MethodConfig for FloraConfig {
    fn method(&self) -> Method {
        METHOD
    }

    fn validate(&self) -> Result<()> {
        FloraConfig::validate(self)
    }

    fn to_peft_json(&self) -> Result<Value> {
        FloraConfig::to_peft_json(self)
    }

    fn init_adapter(
        &self,
        ctx: &InitContext<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(FloraConfig::init_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.device,
            rng,
        )?))
    }

    fn load_adapter(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(FloraConfig::load_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.tensors,
            ctx.device,
        )?))
    }
}

/// One FLoRA adapter on one layer.
#[derive(Debug)]
pub struct FloraAdapter {
    geometry: LayerGeometry,
    ranks: Vec<usize>,
    scale: f64,
    dropout: Dropout,
    core: Var,
    /// `P_i: [d_i, r_i]` in mode order `[in, out, kh, kw]`.
    factors: Vec<Var>,
}

impl FloraAdapter {
    fn new(
        geometry: LayerGeometry,
        ranks: Vec<usize>,
        config: &FloraConfig,
        core: Var,
        factors: Vec<Var>,
        dropout_seed: u64,
    ) -> Self {
        Self {
            geometry,
            ranks,
            scale: config.scale,
            dropout: Dropout::new(config.flora_dropout as f32, dropout_seed),
            core,
            factors,
        }
    }

    /// Per-mode ranks.
    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }

    /// The plain multiplier `s` (`scale`, no `/r`).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The trainable core tensor `G`.
    pub fn core(&self) -> &Var {
        &self.core
    }

    /// `P_i`, in mode order `[in, out, kh, kw]`.
    pub fn factors(&self) -> &[Var] {
        &self.factors
    }

    fn factor(&self, mode: usize) -> Result<&Tensor> {
        self.factors
            .get(mode)
            .map(Var::as_tensor)
            .ok_or_else(|| PeftError::Unsupported(format!("FLoRA has no factor for mode {mode}")))
    }

    /// The conv core kernel `K[b, a, h, w] = Σ_{c,d} G[a, b, c, d] P2[h, c] P3[w, d]`:
    /// `[r1, r0, kh, kw]`, unscaled.
    fn core_kernel(&self) -> Result<Tensor> {
        let [r0, r1, r2, r3] = self.ranks[..] else {
            return Err(PeftError::Unsupported(
                "FLoRA core kernel needs a 4-mode adapter".into(),
            ));
        };
        let p2 = self.factor(2)?;
        let p3 = self.factor(3)?;
        let (kh, kw) = (p2.dim(0)?, p3.dim(0)?);
        let g = self.core.as_tensor();
        // Contract d with P3, then c with P2.
        let t = g.reshape((r0 * r1 * r2, r3))?.matmul(&p3.t()?)?; // [r0 r1 r2, kw]
        let t = t
            .reshape((r0 * r1, r2, kw))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((r0 * r1 * kw, r2))?
            .matmul(&p2.t()?)?; // [r0 r1 kw, kh]
        Ok(t.reshape((r0, r1, kw, kh))?
            .permute((1, 0, 3, 2))?
            .contiguous()?)
    }

    /// Scaled `ΔW` in the base weight's shape, differentiable in every parameter.
    fn dense_delta(&self) -> Result<Tensor> {
        let p0 = self.factor(0)?;
        let p1 = self.factor(1)?;
        let delta = match self.geometry {
            LayerGeometry::Linear { .. } => {
                // s · P1 Gᵀ P0ᵀ
                p1.matmul(&self.core.as_tensor().t()?)?.matmul(&p0.t()?)?
            }
            LayerGeometry::Conv2d { .. } => {
                let (r0, r1) = (self.ranks[0], self.ranks[1]);
                let kernel = self.core_kernel()?; // [r1, r0, kh, kw]
                let (_, _, kh, kw) = kernel.dims4()?;
                let (in_g, out) = (p0.dim(0)?, p1.dim(0)?);
                // Σ_b P1[o, b] K[b, a, h, w] → [out, r0, kh, kw]
                let t = p1.matmul(&kernel.reshape((r1, r0 * kh * kw))?)?;
                // Σ_a (·)[o, a, h, w] P0[i, a] → [out, kh, kw, in_g] → [out, in_g, kh, kw]
                let t = t
                    .reshape((out, r0, kh * kw))?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((out * kh * kw, r0))?
                    .matmul(&p0.t()?)?;
                t.reshape((out, kh, kw, in_g))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?
            }
        };
        Ok((delta * self.scale)?)
    }
}

impl Adapter for FloraAdapter {
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
            LayerGeometry::Linear {
                in_features,
                out_features,
            } => {
                let mut out_dims = x.dims().to_vec();
                let Some(last) = out_dims.last_mut() else {
                    return Err(PeftError::Unsupported("FLoRA input is a scalar".into()));
                };
                *last = out_features;
                let h = x.reshape(((), in_features))?.matmul(self.factor(0)?)?;
                let h = h.matmul(self.core.as_tensor())?;
                let y = h.matmul(&self.factor(1)?.t()?)?;
                Ok((y * self.scale)?.reshape(out_dims)?)
            }
            LayerGeometry::Conv2d {
                in_channels,
                out_channels,
                params,
                ..
            } => {
                if params.groups != 1 {
                    return Ok(conv2d_trainable(
                        &x,
                        &self.dense_delta()?,
                        params.padding,
                        params.stride,
                        params.dilation,
                        params.groups,
                    )?);
                }
                let (r0, r1) = (self.ranks[0], self.ranks[1]);
                let w1 = self.factor(0)?.t()?.reshape((r0, in_channels, 1, 1))?;
                let h = conv2d_trainable(&x, &w1, 0, 1, 1, 1)?;
                let h = conv2d_trainable(
                    &h,
                    &self.core_kernel()?,
                    params.padding,
                    params.stride,
                    params.dilation,
                    1,
                )?;
                let w3 = self.factor(1)?.reshape((out_channels, r1, 1, 1))?;
                let y = conv2d_trainable(&h, &w3, 0, 1, 1, 1)?;
                Ok((y * self.scale)?)
            }
        }
    }

    fn delta_weight(&self) -> Result<Tensor> {
        self.dense_delta()
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut vars = vec![(core_name(), self.core.clone())];
        vars.extend(
            self.factors
                .iter()
                .enumerate()
                .map(|(i, p)| (factor_name(i), p.clone())),
        );
        vars
    }

    fn tensors_to_save(&self) -> Vec<(String, Tensor)> {
        self.trainable_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }
}
