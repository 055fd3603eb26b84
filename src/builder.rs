//! `PeftBuilder`: builds a model's layers from a `VarBuilder` and records every adaptable layer
//! under its HF module path, so that `PeftModel` can find layers by name and model code carries
//! no adapter code. A user's own candle model adopts the library by calling `b.linear(..)` /
//! `b.conv2d(..)` here instead of `candle_nn::linear` / `candle_nn::conv2d`:
//!
//! | candle-nn | `PeftBuilder` |
//! |---|---|
//! | `linear(i, o, vb.pp("fc"))` | `b.linear(i, o, true, "fc")` |
//! | `linear_no_bias(i, o, vb.pp("fc"))` | `b.linear(i, o, false, "fc")` |
//! | `linear_b(i, o, bias, vb.pp("fc"))` | `b.linear(i, o, bias, "fc")` |
//! | `conv2d(ci, co, k, cfg, vb.pp("c"))` | `b.conv2d(ci, co, (k, k), cfg, true, "c")` |
//! | `conv2d_no_bias(ci, co, k, cfg, vb.pp("c"))` | `b.conv2d(ci, co, (k, k), cfg, false, "c")` |
//!
//! The weights come from the same `VarBuilder` keys (`fc.weight`, `fc.bias`) and, when the
//! `VarBuilder` creates them (`VarBuilder::from_varmap` on an empty `VarMap`), with the same init
//! hints as candle-nn's: weight Kaiming-normal (fan in, ReLU gain: `N(0, 2 / fan_in)`), bias
//! `U(−1/√in, 1/√in)` with `in` the input features or input channels. A loaded checkpoint
//! ignores the hints.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::adapter::{Conv2dParams, LayerGeometry};
use crate::error::{PeftError, Result};
use crate::layer::{LayerHandle, PeftConv2d, PeftLinear};
use crate::ops::{BaseDType, FrozenWeight};

/// What the builder has seen: adaptable layers in build order, and the size of every base tensor.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) layers: Vec<LayerHandle>,
    pub(crate) base_tensors: BTreeMap<String, usize>,
}

/// Builds a model's layers from a `VarBuilder`, recording every adaptable layer under its module
/// path; clones (and [`pp`](Self::pp)) share the record.
#[derive(Clone)]
pub struct PeftBuilder<'a> {
    vb: VarBuilder<'a>,
    registry: Arc<Mutex<Registry>>,
    training: Arc<AtomicBool>,
    base_dtype: BaseDType,
    /// Linear weights already in their stored type, by full tensor path (a GGUF's blocks under
    /// `--base-dtype gguf`); the `VarBuilder` does not hold them.
    stored: Arc<HashMap<String, FrozenWeight>>,
}

impl<'a> PeftBuilder<'a> {
    /// A builder at `vb`'s root with an empty record and the training flag off.
    pub fn new(vb: VarBuilder<'a>) -> Self {
        Self {
            vb,
            registry: Arc::new(Mutex::new(Registry::default())),
            training: Arc::new(AtomicBool::new(false)),
            base_dtype: BaseDType::F32,
            stored: Arc::new(HashMap::new()),
        }
    }

    /// Keeps the linear layers' weights in `base_dtype` (see [`BaseDType`]); convolutions,
    /// biases and the tensors of [`get`](Self::get) keep the `VarBuilder`'s dtype.
    pub fn with_base_dtype(mut self, base_dtype: BaseDType) -> Self {
        self.base_dtype = base_dtype;
        self
    }

    /// The type linear weights are kept in.
    pub fn base_dtype(&self) -> BaseDType {
        self.base_dtype
    }

    /// Linear weights given in their stored type, by full tensor path
    /// (`model.layers.0.mlp.up_proj.weight`): a layer finds its weight here before asking the
    /// `VarBuilder`.
    pub(crate) fn with_stored_weights(mut self, stored: HashMap<String, FrozenWeight>) -> Self {
        self.stored = Arc::new(stored);
        self
    }

    /// A builder one path segment deeper, sharing this one's registry.
    pub fn pp<S: ToString>(&self, segment: S) -> Self {
        Self {
            vb: self.vb.pp(segment),
            registry: self.registry.clone(),
            training: self.training.clone(),
            base_dtype: self.base_dtype,
            stored: self.stored.clone(),
        }
    }

    /// The current module path (`encoder.layer.0`).
    pub fn prefix(&self) -> String {
        self.vb.prefix()
    }

    /// The device tensors are loaded to.
    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    /// The dtype tensors are loaded as.
    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    /// The shared training flag (`PeftModel::train` / `eval` set it), for model code that has
    /// train-only behaviour such as dropout.
    pub fn training_flag(&self) -> Arc<AtomicBool> {
        self.training.clone()
    }

    /// The underlying `VarBuilder`, for code that needs candle-nn directly.
    pub fn vb(&self) -> &VarBuilder<'a> {
        &self.vb
    }

    /// Whether the weights have tensor `name` under the current path.
    pub fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    fn path(&self, name: &str) -> String {
        let prefix = self.prefix();
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A frozen (non-adaptable) base tensor, e.g. a norm weight or an embedding table. A
    /// `VarBuilder` that creates missing tensors (`from_varmap`) makes this one all zeros, as
    /// `VarBuilder::get` does: use [`get_with_hints`](Self::get_with_hints) to choose its init.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        self.get_with_hints(shape, name, Init::Const(0.))
    }

    /// A frozen base tensor as [`get`](Self::get), created with `init` when the `VarBuilder`
    /// creates missing tensors (e.g. `Init::Const(1.)` for a fresh norm weight).
    pub fn get_with_hints<S: Into<Shape>>(
        &self,
        shape: S,
        name: &str,
        init: Init,
    ) -> Result<Tensor> {
        let path = self.path(name);
        let t = self
            .vb
            .get_with_hints(shape, name, init)
            .map_err(|e| PeftError::layer(&path, e.to_string()))?
            .detach();
        self.registry().base_tensors.insert(path, t.elem_count());
        Ok(t)
    }

    /// An adaptable linear layer `name` with weight `[out, in]` (and bias `[out]`): the layer
    /// `candle_nn::linear_b(in, out, bias, vb.pp(name))` builds, with candle-nn's init hints for
    /// weights the `VarBuilder` creates (see the module doc).
    pub fn linear(
        &self,
        in_features: usize,
        out_features: usize,
        bias: bool,
        name: &str,
    ) -> Result<PeftLinear> {
        let geometry = LayerGeometry::Linear {
            in_features,
            out_features,
        };
        Ok(PeftLinear::new(self.layer(name, geometry, bias)?))
    }

    /// An adaptable 2-D convolution `name` with kernel `[out, in/groups, kh, kw]`. `params` is a
    /// [`Conv2dParams`] or a `candle_nn::Conv2dConfig`; with a square kernel this is the layer
    /// `candle_nn::conv2d` (or `conv2d_no_bias`) builds, with candle-nn's init hints for weights
    /// the `VarBuilder` creates (see the module doc).
    pub fn conv2d(
        &self,
        in_channels: usize,
        out_channels: usize,
        kernel: (usize, usize),
        params: impl Into<Conv2dParams>,
        bias: bool,
        name: &str,
    ) -> Result<PeftConv2d> {
        let params = params.into();
        let path = self.path(name);
        if params.groups == 0
            || !in_channels.is_multiple_of(params.groups)
            || !out_channels.is_multiple_of(params.groups)
        {
            return Err(PeftError::layer(
                path,
                format!(
                    "groups {} must divide in_channels {in_channels} and out_channels {out_channels}",
                    params.groups
                ),
            ));
        }
        let geometry = LayerGeometry::Conv2d {
            in_channels,
            out_channels,
            kernel,
            params,
        };
        Ok(PeftConv2d::new(self.layer(name, geometry, bias)?))
    }

    /// Like [`linear`](Self::linear), but a layer the checkpoint does not have (a new task head)
    /// is created instead: weight `N(0, std²)` drawn from `rng` (HF initialises heads with
    /// `std = initializer_range`, 0.02 for BERT), bias zero. Its tensors then count as base
    /// tensors: train them through `modules_to_save`.
    pub fn linear_or_init(
        &self,
        in_features: usize,
        out_features: usize,
        bias: bool,
        name: &str,
        std: f32,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> Result<PeftLinear> {
        if self.contains(&format!("{name}.weight")) {
            return self.linear(in_features, out_features, bias, name);
        }
        let geometry = LayerGeometry::Linear {
            in_features,
            out_features,
        };
        let weight = crate::init::normal(rng, in_features * out_features, std);
        let weight = Tensor::from_vec(weight, (out_features, in_features), self.device())?
            .to_dtype(self.dtype())?;
        let bias = if bias {
            Some(Tensor::zeros(out_features, self.dtype(), self.device())?)
        } else {
            None
        };
        let path = self.path(name);
        {
            let mut registry = self.registry();
            registry
                .base_tensors
                .insert(format!("{path}.weight"), in_features * out_features);
            if bias.is_some() {
                registry
                    .base_tensors
                    .insert(format!("{path}.bias"), out_features);
            }
        }
        let weight = self.base_dtype.store(&format!("{path}.weight"), &weight)?;
        let handle = LayerHandle::new(path, geometry, weight, bias, self.training.clone())?;
        self.registry().layers.push(handle.clone());
        Ok(PeftLinear::new(handle))
    }

    fn layer(&self, name: &str, geometry: LayerGeometry, bias: bool) -> Result<LayerHandle> {
        let layer_vb = self.pp(name);
        let (weight_init, bias_init) = candle_nn_hints(geometry);
        let weight_path = format!("{}.weight", self.path(name));
        let weight = match (self.stored.get(&weight_path), geometry) {
            (Some(stored), _) => {
                let expected = geometry.weight_shape();
                if stored.dims() != expected.as_slice() {
                    return Err(PeftError::ShapeMismatch {
                        key: weight_path,
                        expected,
                        got: stored.dims().to_vec(),
                    });
                }
                self.registry()
                    .base_tensors
                    .insert(weight_path, expected.iter().product());
                stored.clone()
            }
            (None, LayerGeometry::Linear { .. }) => {
                let w = layer_vb.get_with_hints(geometry.weight_shape(), "weight", weight_init)?;
                self.base_dtype.store(&weight_path, &w)?
            }
            (None, LayerGeometry::Conv2d { .. }) => FrozenWeight::Dense(layer_vb.get_with_hints(
                geometry.weight_shape(),
                "weight",
                weight_init,
            )?),
        };
        let bias = if bias {
            Some(layer_vb.get_with_hints(geometry.out_features(), "bias", bias_init)?)
        } else {
            None
        };
        let handle = LayerHandle::new(
            self.path(name),
            geometry,
            weight,
            bias,
            self.training.clone(),
        )?;
        self.registry().layers.push(handle.clone());
        Ok(handle)
    }

    pub(crate) fn take_registry(
        &self,
    ) -> (Vec<LayerHandle>, BTreeMap<String, usize>, Arc<AtomicBool>) {
        let r = self.registry();
        (
            r.layers.clone(),
            r.base_tensors.clone(),
            self.training.clone(),
        )
    }
}

/// The init hints `candle_nn::linear` and `candle_nn::conv2d` give for a layer of `geometry`:
/// weight Kaiming-normal (fan in, ReLU gain), bias `U(−1/√in, 1/√in)`, where `in` is the
/// input features or, as candle-nn has it for a conv, the input channels (not channels × kernel).
fn candle_nn_hints(geometry: LayerGeometry) -> (Init, Init) {
    let fan_in = match geometry {
        LayerGeometry::Linear { in_features, .. } => in_features,
        LayerGeometry::Conv2d { in_channels, .. } => in_channels,
    };
    let bound = 1. / (fan_in as f64).sqrt();
    (
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )
}
