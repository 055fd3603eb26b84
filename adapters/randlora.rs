//! RandLoRA: full-rank updates from shared random bases (Albert et al., 2025, "RandLoRA:
//! Full-rank parameter-efficient fine-tuning of large models", arXiv:2502.00987, ICLR 2025), with
//! Hugging Face PEFT's semantics and file format (`peft_type` "RANDLORA").
//!
//! Per adapted weight `W: [out, in]`: `k = min(in, out)`, `K = max(in, out)`, `n = ⌈k/r⌉`.
//! - Shared, frozen, one pair per adapter (model level): `A: [r, 1, k_g]`, `B: [K_g, n_g, r]`,
//!   sized from the element-wise largest `(out, in)` over the targeted layers:
//!   `K_g = max(O_max, I_max)`, `k_g = min(O_max, I_max)`, `n_g = ⌈k_g/r⌉`. A layer uses the slices
//!   `A_l = A[:, 0, :k]: [r, k]` and `B_l = B[:K, :n, :]: [K, n, r]`.
//! - Trainable, per layer: `Λ = randlora_lambda: [r, n]` and `Γ = randlora_gamma: [n, k]`.
//! - Scaling `s = randlora_alpha / r`.
//!
//! Init. Bases (PEFT's `_init_randlora_A_randlora_B`): `A ~ U(−1/√k_g, 1/√k_g)`, then the `n_g`
//! chunks `B[:, b, :] ~ U(−1/√r, 1/√r)` in order b = 0…n_g−1; each tensor is then divided by its
//! own (unbiased) std. `sparse` / `very_sparse`: `A` then `B` drawn `U(0, 1)` and mapped to
//! −1 (u < 1/(2σ)), +1 (u > 1 − 1/(2σ)) or 0, with σ = 3 or √k_g, then divided by their std.
//! The draws come from a ChaCha8 generator seeded with `projection_prng_key`: same distributions
//! and normalisation as PEFT, **not** bit-identical to torch's Mersenne Twister (nor to PEFT's
//! bf16/fp16 quantisation of the dense bases). This is why the bases are always saved
//! (`save_projection` is written as `true`), and why a PEFT file without bases cannot be loaded.
//! Per layer: `Λ = 0`, `Γ = 1/k` (PEFT's `reset_randlora_parameters`), so `Δ = 0` exactly;
//! `init_weights = false` gives `Λ ~ N(0, 1)`, `Γ = 1/K` (PEFT's constructor values, for tests).
//!
//! Forward, pairing by flat position exactly as PEFT does (its `get_scaled_bases`):
//! `Ã = (Λ[:, :, None] · A_l[:, None, :] · Γ[None]).reshape(r·n, k)`, so row `q = kk·n + b`;
//! `B̃ = B_l.reshape(K, n·r)`, so column `q = b·r + kk`; `S = B̃ Ã: [K, k]`. Row and column are
//! paired by `q` alone, which is a fixed permutation of the paper's `Σ_b B_b Λ_b A Γ_b`:
//! statistically the same, numerically different, and what PEFT checkpoints need.
//! - `in ≤ out`: `Δ(x) = s · (x̂ Ãᵀ) B̃ᵀ`, `ΔW = s · S`;
//! - `in > out`: `Δ(x) = s · (x̂ B̃) Ã`, `ΔW = s · Sᵀ`;
//!
//! with `x̂ = dropout(x)`. The product with the frozen `B̃` goes through `ops::frozen_matmul`, so
//! backward computes no gradient for it. At `Λ = 0` the gradient of `Γ` is exactly 0: step 1
//! moves `Λ` only. With random non-zero `Λ`, `Γ`, `rank(ΔW) = k`: the update is full rank.
//!
//! Conv2d (our extension; PEFT adapts only linear layers): the kernel is flattened row-major to
//! `W_flat: [out, in/g · kh · kw]` and treated as the linear weight above. For groups = 1 the
//! forward is two convolutions: with `in_flat ≤ out`, `Ã` as a `[r·n, in, kh, kw]` kernel with
//! the base's stride, padding and dilation, then `B̃` as a 1×1 kernel; otherwise `B̃ᵀ` as the
//! `k×k` kernel and `Ãᵀ` as the 1×1. Grouped convs use the dense `ΔW` (the shared bottleneck
//! mixes groups).
//!
//! File (PEFT's, verified against peft 0.21.2): `base_model.randlora_A`, `base_model.randlora_B`
//! (model level) and per layer `randlora_lambda`, `randlora_gamma`, plus per-layer duplicates
//! `randlora_A`, `randlora_B` of the full bases (PEFT writes them, and loads without warnings only
//! when they are there). The reader takes the model-level bases, or a layer's duplicates when a
//! file has no model-level ones.
//!
//! Several adapters: each has its own bases (sized from its own `r` and targets), so adapters
//! with different `r` coexist on one model. PEFT shares one pair per model and refuses that;
//! each of our files still loads in PEFT on its own.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::adapter::{
    Adapter, CliSpec, LayerGeometry, Method, MethodSpec, OptionKind, TensorRoles,
};
use crate::adapters::support::{option, saved_tensor};
use crate::config::{
    CommonFields, ConfigFields, InitContext, LoadContext, MethodConfig, Targeting, json_number,
    peft_json,
};
use crate::error::{PeftError, Result};
use crate::init::{self, Dropout};
use crate::kernels::frozen::conv2d_trainable;
use crate::kernels::frozen_basis::{frozen_basis_conv2d, frozen_basis_linear};

/// File key of the shared basis `A: [r, 1, k_g]`.
pub const SHARED_A_KEY: &str = "base_model.randlora_A";
/// File key of the shared basis `B: [K_g, n_g, r]`.
pub const SHARED_B_KEY: &str = "base_model.randlora_B";

const LAMBDA: &str = "randlora_lambda";
const GAMMA: &str = "randlora_gamma";
const BASIS_A: &str = "randlora_A";
const BASIS_B: &str = "randlora_B";

/// RandLoRA's registry entry. CLI: r 32 and α = 20·r (PEFT's defaults) unless given.
pub const METHOD: Method = Method::new(&MethodSpec {
    name: "randlora",
    aliases: &[],
    peft_type: "RANDLORA",
    summary: "full-rank update from shared random bases with trained diagonal scalings",
    tensors: TensorRoles {
        prefixes: &[LAMBDA, GAMMA, BASIS_A, BASIS_B],
        frozen: &[BASIS_A, BASIS_B],
        rank: None,
    },
    cli: CliSpec {
        defaults: r#"{"r": 32, "randlora_dropout": 0.0}"#,
        rank: Some("r"),
        alpha: Some("randlora_alpha"),
        alpha_per_rank: Some(20),
        dropout: Some("randlora_dropout"),
        options: &[
            option(
                "sparse",
                OptionKind::Bool,
                "ternary bases, P(±1) = 1/6 each",
            ),
            option(
                "very_sparse",
                OptionKind::Bool,
                "ternary bases, P(±1) = 1/(2√k) each",
            ),
            option("projection_prng_key", OptionKind::Int, "seed of the bases"),
            option(
                "init_weights",
                OptionKind::Bool,
                "false: Λ random, not the identity (for tests)",
            ),
        ],
    },
    needs_calibration: false,
    lora_pro_optimizer: false,
});

/// `RandLoraConfig`, with PEFT's field names and defaults ([`Default`]: `r` 32,
/// `randlora_alpha` 640, no `target_modules`; [`validate`](Self::validate) requires them).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct RandLoraConfig {
    /// Which modules are adapted.
    #[serde(flatten)]
    pub targeting: Targeting,
    /// Rank of each random basis. Fewer trainable parameters as `r` grows (`n = ⌈k/r⌉`).
    pub r: usize,
    /// `α` of the scaling `α/r`.
    pub randlora_alpha: f64,
    /// Dropout on the adapter's input, in training.
    pub randlora_dropout: f64,
    /// Seed of the ChaCha generator that draws new bases.
    pub projection_prng_key: u64,
    /// Ternary bases with P(±1) = 1/6 each.
    pub sparse: bool,
    /// Ternary bases with P(±1) = 1/(2√k_g) each; wins over `sparse`, as in PEFT.
    pub very_sparse: bool,
    /// Kept so a file round-trips; layers built by `PeftBuilder` are `[out, in]` (see LoRA).
    pub fan_in_fan_out: bool,
    /// `false` draws `Λ ~ N(0, 1)` and sets `Γ = 1/K`: not the identity (for tests).
    pub init_weights: bool,
    /// `task_type`, `base_model_name_or_path`, `revision`, `inference_mode`.
    #[serde(flatten)]
    pub common: CommonFields,
}

impl Default for RandLoraConfig {
    /// PEFT's defaults; no `target_modules`.
    fn default() -> Self {
        Self {
            targeting: Targeting::default(),
            r: 32,
            randlora_alpha: 640.0,
            randlora_dropout: 0.0,
            projection_prng_key: 0,
            sparse: false,
            very_sparse: false,
            fan_in_fan_out: false,
            init_weights: true,
            common: CommonFields::default(),
        }
    }
}

/// `(out, in)` of the weight RandLoRA adapts: a conv kernel counts as `[out, in/g·kh·kw]`.
pub use crate::adapters::support::flat_dims;

/// PEFT's number of bases `n = ⌈k/r⌉`.
pub fn num_bases(k: usize, r: usize) -> usize {
    k.div_ceil(r)
}

/// Trainable scalars of a RandLoRA adapter of rank `r` on layers of these shapes,
/// `Σ r·n + n·k`, from the geometry alone (no weights are needed).
pub fn trainable_parameters(r: usize, layers: &[LayerGeometry]) -> Result<usize> {
    if r == 0 {
        return Err(PeftError::config("r", "rank must be at least 1, got 0"));
    }
    Ok(layers
        .iter()
        .map(|&g| {
            let (out, inp) = flat_dims(g);
            let k = out.min(inp);
            let n = num_bases(k, r);
            r * n + n * k
        })
        .sum())
}

impl RandLoraConfig {
    /// A config targeting `targets` with basis rank `r` and `randlora_alpha`, the rest
    /// [`Default`] (PEFT's).
    pub fn new<S: AsRef<str>>(targets: &[S], r: usize, randlora_alpha: f64) -> Self {
        Self {
            targeting: Targeting::new(crate::config::ModuleSelector::list(targets)),
            r,
            randlora_alpha,
            ..Self::default()
        }
    }

    /// `s = randlora_alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.randlora_alpha / self.r as f64
    }

    /// Checks every field, without looking at a model.
    pub fn validate(&self) -> Result<()> {
        self.targeting.validate()?;
        if self.r == 0 {
            return Err(PeftError::config("r", "rank must be at least 1, got 0"));
        }
        if !(0.0..1.0).contains(&self.randlora_dropout) {
            return Err(PeftError::config(
                "randlora_dropout",
                format!("must be in [0, 1), got {}", self.randlora_dropout),
            ));
        }
        if !self.randlora_alpha.is_finite() {
            return Err(PeftError::config("randlora_alpha", "must be finite"));
        }
        Ok(())
    }

    /// Reads `adapter_config.json` content; a `bias` other than `"none"` is refused.
    pub fn from_peft_json(value: &Value) -> Result<Self> {
        #[derive(Deserialize)]
        struct Unsupported {
            #[serde(default)]
            bias: Option<String>,
        }
        let config: Self = crate::config::from_json(value)?;
        let unsupported: Unsupported = crate::config::from_json(value)?;
        if let Some(bias) = unsupported.bias.as_deref().filter(|b| *b != "none") {
            return Err(PeftError::config(
                "bias",
                format!("`{bias}` is not supported (only \"none\")"),
            ));
        }
        Ok(config)
    }

    /// Every field PEFT 0.21's `RandLoraConfig` writes. `save_projection` is always `true`:
    /// the bases are always in the file (see the module docs).
    pub fn to_peft_json(&self) -> Result<Value> {
        let fields = json!({
            "auto_mapping": null,
            "bias": "none",
            "fan_in_fan_out": self.fan_in_fan_out,
            "init_weights": self.init_weights,
            "peft_type": "RANDLORA",
            "projection_prng_key": self.projection_prng_key,
            "r": self.r,
            "randlora_alpha": json_number(self.randlora_alpha),
            "randlora_dropout": self.randlora_dropout,
            "save_projection": true,
            "sparse": self.sparse,
            "very_sparse": self.very_sparse,
        });
        let mut value = peft_json(fields, &self.targeting, &self.common)?;
        // PEFT's RandLoraConfig has no `exclude_modules`; write it only when it is used.
        if let (None, Some(obj)) = (&self.targeting.exclude_modules, value.as_object_mut()) {
            obj.shift_remove("exclude_modules");
        }
        Ok(value)
    }

    /// The shared bases for layers of these shapes, under their file keys.
    pub fn make_bases(
        &self,
        layers: &[LayerGeometry],
        device: &Device,
    ) -> Result<BTreeMap<String, Tensor>> {
        if self.r == 0 {
            return Err(PeftError::config("r", "rank must be at least 1, got 0"));
        }
        let (o_max, i_max) = layers
            .iter()
            .map(|&g| flat_dims(g))
            .fold((0, 0), |(o, i), (go, gi)| (o.max(go), i.max(gi)));
        if o_max == 0 || i_max == 0 {
            return Err(PeftError::config(
                "target_modules",
                "RandLoRA needs at least one targeted layer with a non-empty weight",
            ));
        }
        let (big, small) = (o_max.max(i_max), o_max.min(i_max));
        let sparsity = if self.very_sparse {
            Some((small as f64).sqrt())
        } else if self.sparse {
            Some(3.0)
        } else {
            None
        };
        let (a, b) = init::basis::make_bases(
            self.projection_prng_key,
            self.r,
            (small, big),
            sparsity,
            (SHARED_A_KEY, SHARED_B_KEY),
            device,
        )?;
        Ok(BTreeMap::from([
            (SHARED_A_KEY.to_string(), a),
            (SHARED_B_KEY.to_string(), b),
        ]))
    }

    fn layer_shape(&self, module: &str, geometry: LayerGeometry) -> Result<LayerShape> {
        let (out, inp) = flat_dims(geometry);
        if out == 0 || inp == 0 {
            return Err(PeftError::layer(
                module,
                "RandLoRA needs a non-empty weight",
            ));
        }
        let k = out.min(inp);
        Ok(LayerShape {
            r: self.r,
            n: num_bases(k, self.r),
            k,
            big: out.max(inp),
            in_is_small: inp <= out,
        })
    }

    /// A fresh adapter for `module`, using the bases in `shared` (from [`Self::make_bases`]).
    pub fn init_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        shared: &BTreeMap<String, Tensor>,
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<RandLoraAdapter> {
        let shape = self.layer_shape(module, geometry)?;
        let location =
            format!("the shared tensors of the adapter on `{module}` (init_shared did not run)");
        let bases = find_bases(shared, &BTreeMap::new(), &location)?;
        let (r, n, k) = (shape.r, shape.n, shape.k);
        let (lambda, gamma) = if self.init_weights {
            (vec![0f32; r * n], vec![1.0 / k.max(n) as f32; n * k])
        } else {
            (
                init::normal(rng, r * n, 1.0),
                vec![1.0 / shape.big as f32; n * k],
            )
        };
        let lambda = Var::from_tensor(&Tensor::from_vec(lambda, (r, n), device)?)?;
        let gamma = Var::from_tensor(&Tensor::from_vec(gamma, (n, k), device)?)?;
        RandLoraAdapter::new(
            module,
            geometry,
            shape,
            self,
            lambda,
            gamma,
            bases,
            device,
            rng.random(),
        )
    }

    /// The adapter for `module` from saved tensors: `randlora_lambda`, `randlora_gamma`, and the
    /// bases from `shared` (model level) or, failing that, the layer's own duplicates.
    pub fn load_adapter(
        &self,
        module: &str,
        geometry: LayerGeometry,
        tensors: &BTreeMap<String, Tensor>,
        shared: &BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<RandLoraAdapter> {
        let shape = self.layer_shape(module, geometry)?;
        let fetch = |name: &str, dims: &[usize]| -> Result<Var> {
            let t = saved_tensor(module, tensors, name, dims, DType::F32, device)?;
            Ok(Var::from_tensor(&t)?)
        };
        let lambda = fetch(LAMBDA, &[shape.r, shape.n])?;
        let gamma = fetch(GAMMA, &[shape.n, shape.k])?;
        let location = "the adapter file (the file has neither model-level nor per-layer \
                        bases; files saved with save_projection=false cannot be loaded \
                        (torch's generator cannot be reproduced))";
        let bases = find_bases(shared, tensors, location)?;
        RandLoraAdapter::new(
            module,
            geometry,
            shape,
            self,
            lambda,
            gamma,
            bases,
            device,
            init::seed_from_name(module),
        )
    }
}

/// The bases `(A, B)`: the model-level ones in `shared`, or else a layer's own duplicates in
/// `local`; `location` says in the error where they were looked for.
fn find_bases(
    shared: &BTreeMap<String, Tensor>,
    local: &BTreeMap<String, Tensor>,
    location: &str,
) -> Result<(Tensor, Tensor)> {
    let find = |key: &str, local_name: &str| match shared.get(key).or(local.get(local_name)) {
        Some(t) => Ok(t.clone()),
        None => Err(PeftError::MissingTensor {
            key: key.to_string(),
            location: location.to_string(),
        }),
    };
    Ok((find(SHARED_A_KEY, BASIS_A)?, find(SHARED_B_KEY, BASIS_B)?))
}

impl ConfigFields for RandLoraConfig {
    fn fields(&self) -> (&Targeting, &CommonFields) {
        (&self.targeting, &self.common)
    }

    fn fields_mut(&mut self) -> (&mut Targeting, &mut CommonFields) {
        (&mut self.targeting, &mut self.common)
    }
}

impl MethodConfig for RandLoraConfig {
    fn method(&self) -> Method {
        METHOD
    }

    fn validate(&self) -> Result<()> {
        RandLoraConfig::validate(self)
    }

    fn to_peft_json(&self) -> Result<Value> {
        RandLoraConfig::to_peft_json(self)
    }

    fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }

    fn init_shared(
        &self,
        layers: &[(String, LayerGeometry)],
        device: &Device,
        _rng: &mut ChaCha8Rng,
    ) -> Result<BTreeMap<String, Tensor>> {
        let geometries: Vec<LayerGeometry> = layers.iter().map(|(_, g)| *g).collect();
        self.make_bases(&geometries, device)
    }

    fn init_adapter(
        &self,
        ctx: &InitContext<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(RandLoraConfig::init_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.shared,
            ctx.device,
            rng,
        )?))
    }

    fn load_adapter(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(RandLoraConfig::load_adapter(
            self,
            ctx.module,
            ctx.geometry,
            ctx.tensors,
            ctx.shared,
            ctx.device,
        )?))
    }
}

/// Sizes of one adapted layer.
#[derive(Clone, Copy, Debug)]
struct LayerShape {
    r: usize,
    n: usize,
    /// `min(in, out)` (flattened for conv).
    k: usize,
    /// `max(in, out)`.
    big: usize,
    /// `in ≤ out`: the trainable side `Ã` acts on the input.
    in_is_small: bool,
}

/// One RandLoRA adapter on one layer.
#[derive(Debug)]
pub struct RandLoraAdapter {
    geometry: LayerGeometry,
    shape: LayerShape,
    alpha: f64,
    scaling: f64,
    dropout: Dropout,
    lambda: Var,
    gamma: Var,
    /// The adapter's full shared bases (saved as the per-layer duplicates PEFT writes).
    basis_a: Tensor,
    basis_b: Tensor,
    /// `A_l = A[:, :, :k]: [r, 1, k]`.
    a_slice: Tensor,
}

impl RandLoraAdapter {
    #[allow(clippy::too_many_arguments)]
    fn new(
        module: &str,
        geometry: LayerGeometry,
        shape: LayerShape,
        config: &RandLoraConfig,
        lambda: Var,
        gamma: Var,
        (basis_a, basis_b): (Tensor, Tensor),
        device: &Device,
        dropout_seed: u64,
    ) -> Result<Self> {
        let basis_a = basis_a.to_dtype(DType::F32)?.to_device(device)?;
        let basis_b = basis_b.to_dtype(DType::F32)?.to_device(device)?;
        let (r, n, k, big) = (shape.r, shape.n, shape.k, shape.big);
        init::basis::check_covers(module, (&basis_a, &basis_b), r, n, (k, big))?;
        let a_slice = basis_a.narrow(2, 0, k)?.contiguous()?;
        Ok(Self {
            geometry,
            shape,
            alpha: config.randlora_alpha,
            scaling: config.scaling(),
            dropout: Dropout::new(config.randlora_dropout as f32, dropout_seed),
            lambda,
            gamma,
            basis_a,
            basis_b,
            a_slice,
        })
    }

    /// The rank `r` of each basis.
    pub fn rank(&self) -> usize {
        self.shape.r
    }

    /// `n = ⌈k/r⌉`.
    pub fn num_bases(&self) -> usize {
        self.shape.n
    }

    /// `randlora_alpha`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// `s = randlora_alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// The trainable `Λ: [r, n]`.
    pub fn lambda(&self) -> &Var {
        &self.lambda
    }

    /// The trainable `Γ: [n, k]`.
    pub fn gamma(&self) -> &Var {
        &self.gamma
    }

    /// The full shared bases `(A, B)` this adapter slices.
    pub fn bases(&self) -> (&Tensor, &Tensor) {
        (&self.basis_a, &self.basis_b)
    }

    /// `Ã: [r·n, k]`, row `q = kk·n + b`; differentiable in `Λ` and `Γ`.
    pub fn scaled_a(&self) -> Result<Tensor> {
        let LayerShape { r, n, k, .. } = self.shape;
        let lambda = self.lambda.as_tensor().reshape((r, n, 1))?;
        let gamma = self.gamma.as_tensor().reshape((1, n, k))?;
        let a = lambda.broadcast_mul(&self.a_slice)?.broadcast_mul(&gamma)?;
        Ok(a.reshape((r * n, k))?)
    }

    /// `B̃ = B[:K, :n, :].reshape(K, n·r)`, column `q = b·r + kk`; frozen. A view of the shared
    /// basis when this layer uses all of it, a copy otherwise (as in PEFT).
    pub fn flat_b(&self) -> Result<Tensor> {
        let LayerShape { r, n, big, .. } = self.shape;
        let b = self.basis_b.narrow(0, 0, big)?.narrow(1, 0, n)?;
        Ok(b.contiguous()?.reshape((big, n * r))?)
    }

    /// `ΔW` as a function of the trainables (scaled), in the base weight's shape.
    fn dense_delta(&self) -> Result<Tensor> {
        let s = self.flat_b()?.matmul(&self.scaled_a()?)?;
        let flat = if self.shape.in_is_small { s } else { s.t()? };
        Ok((flat * self.scaling)?.reshape(self.geometry.weight_shape())?)
    }

    fn linear_delta(&self, x: &Tensor, in_features: usize, out_features: usize) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let Some(last) = out_dims.last_mut() else {
            return Err(PeftError::Unsupported("RandLoRA input is a scalar".into()));
        };
        *last = out_features;
        let x2 = x.reshape(((), in_features))?;
        let a = self.scaled_a()?;
        let b = self.flat_b()?;
        let y = frozen_basis_linear(&x2, &a, &b, self.shape.in_is_small)?;
        Ok((y * self.scaling)?.reshape(out_dims)?)
    }

    fn conv_delta(&self, x: &Tensor) -> Result<Tensor> {
        let LayerGeometry::Conv2d {
            in_channels,
            out_channels,
            kernel: (kh, kw),
            params,
        } = self.geometry
        else {
            return Err(PeftError::Unsupported(
                "RandLoRA conv path on a linear layer".into(),
            ));
        };
        if params.groups != 1 {
            let delta = self.dense_delta()?;
            return Ok(conv2d_trainable(
                x,
                &delta,
                params.padding,
                params.stride,
                params.dilation,
                params.groups,
            )?);
        }
        let a = self.scaled_a()?;
        let b = self.flat_b()?;
        let y = frozen_basis_conv2d(
            x,
            &a,
            &b,
            self.shape.in_is_small,
            (in_channels, out_channels),
            (kh, kw),
            params,
        )?;
        Ok((y * self.scaling)?)
    }
}

impl Adapter for RandLoraAdapter {
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
            } => self.linear_delta(&x, in_features, out_features),
            LayerGeometry::Conv2d { .. } => self.conv_delta(&x),
        }
    }

    fn delta_weight(&self) -> Result<Tensor> {
        self.dense_delta()
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![
            (LAMBDA.to_string(), self.lambda.clone()),
            (GAMMA.to_string(), self.gamma.clone()),
        ]
    }

    fn tensors_to_save(&self) -> Vec<(String, Tensor)> {
        vec![
            (LAMBDA.to_string(), self.lambda.as_tensor().clone()),
            (GAMMA.to_string(), self.gamma.as_tensor().clone()),
            (BASIS_A.to_string(), self.basis_a.clone()),
            (BASIS_B.to_string(), self.basis_b.clone()),
        ]
    }
}
