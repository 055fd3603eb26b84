//! `PeftLinear` and `PeftConv2d`: a frozen base layer plus named adapters.
//!
//! The base weight is a plain tensor, never a `Var`, and goes through the frozen ops
//! (`crate::ops::{frozen_matmul, frozen_conv2d}`), so backward computes no weight gradient for
//! it. Adapters add `Δ(x)` to the base output. A layer is a cheap handle (`Arc<RwLock<..>>`):
//! the model holds one copy for its forward and the `PeftModel` registry holds another to add,
//! merge and remove adapters after the model is built.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::{DType, Module, Tensor, Var};

use crate::adapter::{Adapter, LayerGeometry};
use crate::error::{PeftError, Result};
use crate::kernels::frozen::{conv2d_trainable, frozen_conv2d, frozen_matmul_weight};
use crate::kernels::frozen_weight::FrozenWeight;

/// A trainable full copy of a layer (PEFT's `modules_to_save`).
#[derive(Debug)]
pub struct TrainableCopy {
    /// The trainable weight, initialised from the base layer's weight.
    pub weight: Var,
    /// The trainable bias, when the base layer has one.
    pub bias: Option<Var>,
}

#[derive(Debug)]
struct LayerState {
    name: String,
    geometry: LayerGeometry,
    weight: FrozenWeight,
    /// The quantized weight a merge replaced with its dense sum (a sum of ggml blocks and a
    /// delta is no longer ggml blocks); unmerging everything puts it back exactly.
    unmerged_quantized: Option<FrozenWeight>,
    bias: Option<Tensor>,
    adapters: Vec<(String, Box<dyn Adapter>)>,
    copies: Vec<(String, TrainableCopy)>,
    active: Vec<String>,
    enabled: bool,
    /// Adapters merged into `weight`, in merge order (unmerged last-in, first-out).
    merged: Vec<String>,
    training: Arc<AtomicBool>,
    observer: Option<ObserverSlot>,
}

/// Sees a layer's input at the start of every forward (calibration passes read activations
/// through it). An error aborts the forward.
pub type InputObserver = Arc<dyn Fn(&Tensor) -> Result<()> + Send + Sync>;

struct ObserverSlot(InputObserver);

impl std::fmt::Debug for ObserverSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InputObserver")
    }
}

/// A layer's merge and switch state, saved by a disable guard (see
/// [`LayerHandle::switch_state`]).
#[derive(Debug)]
pub(crate) struct SwitchState {
    weight: FrozenWeight,
    unmerged_quantized: Option<FrozenWeight>,
    merged: Vec<String>,
    enabled: bool,
    active: Vec<String>,
}

/// A shared handle on one adaptable layer.
#[derive(Clone, Debug)]
pub struct LayerHandle(Arc<RwLock<LayerState>>);

impl LayerHandle {
    pub(crate) fn new(
        name: String,
        geometry: LayerGeometry,
        weight: FrozenWeight,
        bias: Option<Tensor>,
        training: Arc<AtomicBool>,
    ) -> Result<Self> {
        if weight.dims() != geometry.weight_shape().as_slice() {
            return Err(PeftError::ShapeMismatch {
                key: format!("{name}.weight"),
                expected: geometry.weight_shape(),
                got: weight.dims().to_vec(),
            });
        }
        Ok(Self(Arc::new(RwLock::new(LayerState {
            name,
            geometry,
            weight: match weight {
                FrozenWeight::Dense(w) => FrozenWeight::Dense(w.detach()),
                quantized => quantized,
            },
            unmerged_quantized: None,
            bias: bias.map(|b| b.detach()),
            adapters: Vec::new(),
            copies: Vec::new(),
            active: Vec::new(),
            enabled: true,
            merged: Vec::new(),
            training,
            observer: None,
        }))))
    }

    fn read(&self) -> RwLockReadGuard<'_, LayerState> {
        // A panic elsewhere cannot leave the state half-written: every mutation below assigns
        // whole fields after all fallible work is done.
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, LayerState> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The HF module path (`encoder.layer.0.attention.self.query`).
    pub fn name(&self) -> String {
        self.read().name.clone()
    }

    /// The layer's kind and dimensions (linear features or conv channels/kernel).
    pub fn geometry(&self) -> LayerGeometry {
        self.read().geometry
    }

    /// The current base weight (with merged adapters folded in, if any) as a dense tensor: in
    /// its own dtype when dense, dequantised to f32 when quantized (which widens it; see
    /// [`frozen_weight`](Self::frozen_weight) for the stored form).
    pub fn weight(&self) -> Result<Tensor> {
        Ok(match &self.read().weight {
            FrozenWeight::Dense(t) => t.clone(),
            quantized => quantized.to_f32()?,
        })
    }

    /// Where the layer's base weight lives.
    pub fn device(&self) -> candle_core::Device {
        self.read().weight.device()
    }

    /// The current base weight in its stored type (f32, f16, bf16 or ggml blocks).
    pub fn frozen_weight(&self) -> FrozenWeight {
        self.read().weight.clone()
    }

    /// The current base bias, if the layer has one.
    pub fn bias(&self) -> Option<Tensor> {
        self.read().bias.clone()
    }

    /// Names of the adapters attached to this layer, in attach order (trainable copies excluded).
    pub fn adapter_names(&self) -> Vec<String> {
        self.read()
            .adapters
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether this layer holds an adapter or a trainable copy (`modules_to_save`) named `name`.
    pub fn has_adapter(&self, name: &str) -> bool {
        let s = self.read();
        s.adapters.iter().any(|(n, _)| n == name) || s.copies.iter().any(|(n, _)| n == name)
    }

    /// Adapters currently folded into the base weight, in merge order.
    pub fn merged_adapters(&self) -> Vec<String> {
        self.read().merged.clone()
    }

    /// Whether this layer's adapters are switched on (see [`set_enabled`](Self::set_enabled)).
    pub fn is_enabled(&self) -> bool {
        self.read().enabled
    }

    /// The adapters active on this layer (those it has or not, as last set).
    pub fn active_adapters(&self) -> Vec<String> {
        self.read().active.clone()
    }

    /// What a disable guard puts back: the current weight (merged deltas included), which
    /// adapters are merged into it, the on/off switch and the active set.
    pub(crate) fn switch_state(&self) -> SwitchState {
        let s = self.read();
        SwitchState {
            weight: s.weight.clone(),
            unmerged_quantized: s.unmerged_quantized.clone(),
            merged: s.merged.clone(),
            enabled: s.enabled,
            active: s.active.clone(),
        }
    }

    /// Puts back a [`switch_state`](Self::switch_state) exactly (the saved weight itself, no
    /// delta recomputed), so it cannot fail.
    pub(crate) fn restore_switch_state(&self, saved: SwitchState) {
        let mut s = self.write();
        s.weight = saved.weight;
        s.unmerged_quantized = saved.unmerged_quantized;
        s.merged = saved.merged;
        s.enabled = saved.enabled;
        s.active = saved.active;
    }

    /// Attaches `adapter` under `name`. It becomes active only through `set_active`.
    pub fn add_adapter(&self, name: &str, adapter: Box<dyn Adapter>) -> Result<()> {
        let mut s = self.write();
        if s.adapters.iter().any(|(n, _)| n == name) {
            return Err(PeftError::DuplicateAdapter(format!(
                "{name} (on `{}`)",
                s.name
            )));
        }
        s.adapters.push((name.to_string(), adapter));
        Ok(())
    }

    /// Makes a trainable copy of the base weight and bias for adapter `name` (`modules_to_save`).
    /// `saved` replaces the copied values (weight, bias) when loading a saved adapter.
    pub fn add_trainable_copy(
        &self,
        name: &str,
        saved: Option<(Tensor, Option<Tensor>)>,
    ) -> Result<()> {
        let mut s = self.write();
        if s.copies.iter().any(|(n, _)| n == name) {
            return Err(PeftError::DuplicateAdapter(format!(
                "{name} (on `{}`)",
                s.name
            )));
        }
        let (weight, bias) = match saved {
            Some((w, b)) => (w, b),
            None => (s.weight.to_f32()?, s.bias.clone()),
        };
        let expected = s.geometry.weight_shape();
        if weight.dims() != expected.as_slice() {
            return Err(PeftError::ShapeMismatch {
                key: format!("{}.weight", s.name),
                expected,
                got: weight.dims().to_vec(),
            });
        }
        let as_var = |t: &Tensor| -> Result<Var> {
            Ok(Var::from_tensor(
                &t.to_dtype(DType::F32)?.to_device(&s.weight.device())?,
            )?)
        };
        let copy = TrainableCopy {
            weight: as_var(&weight)?,
            bias: match &bias {
                Some(b) => Some(as_var(b)?),
                None => None,
            },
        };
        s.copies.push((name.to_string(), copy));
        Ok(())
    }

    /// Sets the active adapters (those this layer does not have are ignored).
    pub fn set_active(&self, names: &[String]) {
        self.write().active = names.to_vec();
    }

    /// Turns the adapters off (the layer computes the pristine base) or back on. Turning off
    /// unmerges any merged adapter first, so a disabled layer never carries a merged delta.
    pub fn set_enabled(&self, enabled: bool) -> Result<()> {
        if !enabled && !self.read().merged.is_empty() {
            self.unmerge()?;
        }
        self.write().enabled = enabled;
        Ok(())
    }

    /// Removes adapter `name`. A merged adapter must be unmerged first.
    pub fn delete(&self, name: &str) -> Result<()> {
        let mut s = self.write();
        if s.merged.iter().any(|n| n == name) {
            return Err(PeftError::AlreadyMerged {
                module: s.name.clone(),
                adapter: name.to_string(),
            });
        }
        s.adapters.retain(|(n, _)| n != name);
        s.copies.retain(|(n, _)| n != name);
        s.active.retain(|n| n != name);
        Ok(())
    }

    /// Folds the deltas of `names` (those this layer has) into the base weight. A dense weight
    /// stays in its dtype: each delta is rounded to it and added there, as PEFT merges a bf16
    /// base. A quantized weight is dequantised to f32 (exactly) and the sum kept in f32; the
    /// ggml blocks come back when every adapter is unmerged.
    pub fn merge(&self, names: &[String]) -> Result<()> {
        let mut s = self.write();
        let pristine = s.weight.clone();
        let mut weight = match &s.weight {
            FrozenWeight::Dense(t) => t.clone(),
            quantized => quantized.to_f32()?,
        };
        let mut newly_merged = Vec::new();
        for name in names {
            let Some((_, adapter)) = s.adapters.iter().find(|(n, _)| n == name) else {
                continue;
            };
            if s.merged.contains(name) {
                return Err(PeftError::AlreadyMerged {
                    module: s.name.clone(),
                    adapter: name.clone(),
                });
            }
            let delta = adapter.delta_weight()?.to_dtype(weight.dtype())?;
            let delta = delta.to_device(weight.device())?;
            weight = (weight + delta)?;
            newly_merged.push(name.clone());
        }
        if newly_merged.is_empty() {
            return Ok(());
        }
        if matches!(pristine, FrozenWeight::Quantized(_)) {
            s.unmerged_quantized = Some(pristine);
        }
        s.weight = FrozenWeight::Dense(weight);
        s.merged.extend(newly_merged);
        Ok(())
    }

    /// Subtracts every merged delta, last merged first.
    pub fn unmerge(&self) -> Result<()> {
        let mut s = self.write();
        if s.merged.is_empty() {
            return Err(PeftError::NotMerged {
                module: s.name.clone(),
            });
        }
        if let Some(quantized) = s.unmerged_quantized.take() {
            s.weight = quantized;
            s.merged.clear();
            return Ok(());
        }
        let mut weight = s.weight.to_f32()?.to_dtype(dense_dtype(&s.weight))?;
        for name in s.merged.iter().rev() {
            let Some((_, adapter)) = s.adapters.iter().find(|(n, _)| n == name) else {
                return Err(PeftError::UnknownAdapter {
                    adapter: name.clone(),
                    module: s.name.clone(),
                });
            };
            let delta = adapter.delta_weight()?.to_dtype(weight.dtype())?;
            let delta = delta.to_device(weight.device())?;
            weight = (weight - delta)?;
        }
        s.weight = FrozenWeight::Dense(weight);
        s.merged.clear();
        Ok(())
    }

    /// Removes every adapter, first merging the active ones (and taking an active trainable
    /// copy as the new base) when `merge` is set.
    pub fn unload(&self, merge: bool) -> Result<()> {
        let active = self.read().active.clone();
        if merge {
            let not_merged: Vec<String> = {
                let s = self.read();
                active
                    .iter()
                    .filter(|n| !s.merged.contains(n))
                    .cloned()
                    .collect()
            };
            self.merge(&not_merged)?;
        } else if !self.read().merged.is_empty() {
            self.unmerge()?;
        }
        let mut s = self.write();
        if merge {
            let copy = s.copies.iter().find(|(n, _)| active.contains(n));
            if let Some((_, copy)) = copy {
                let weight = copy
                    .weight
                    .as_tensor()
                    .detach()
                    .to_dtype(dense_dtype(&s.weight))?;
                let bias = match (&copy.bias, &s.bias) {
                    (Some(b), Some(old)) => Some(b.as_tensor().detach().to_dtype(old.dtype())?),
                    _ => s.bias.clone(),
                };
                s.weight = FrozenWeight::Dense(weight);
                s.unmerged_quantized = None;
                s.bias = bias;
            }
        }
        s.adapters.clear();
        s.copies.clear();
        s.active.clear();
        s.merged.clear();
        s.unmerged_quantized = None;
        s.enabled = true;
        Ok(())
    }

    /// Trainable vars of adapter `name` on this layer, names relative to the layer
    /// (`lora_A.weight`; `weight`/`bias` for a trainable copy).
    pub fn trainable_vars(&self, name: &str) -> Vec<(String, Var)> {
        let s = self.read();
        let mut vars = Vec::new();
        if let Some((_, a)) = s.adapters.iter().find(|(n, _)| n == name) {
            vars.extend(a.trainable_vars());
        }
        if let Some((_, c)) = s.copies.iter().find(|(n, _)| n == name) {
            vars.push(("weight".to_string(), c.weight.clone()));
            if let Some(b) = &c.bias {
                vars.push(("bias".to_string(), b.clone()));
            }
        }
        vars
    }

    /// What adapter `name` saves for this layer, names relative to the layer.
    pub fn tensors_to_save(&self, name: &str) -> Vec<(String, Tensor)> {
        let s = self.read();
        let mut tensors = Vec::new();
        if let Some((_, a)) = s.adapters.iter().find(|(n, _)| n == name) {
            tensors.extend(a.tensors_to_save());
        }
        if let Some((_, c)) = s.copies.iter().find(|(n, _)| n == name) {
            tensors.push(("weight".to_string(), c.weight.as_tensor().clone()));
            if let Some(b) = &c.bias {
                tensors.push(("bias".to_string(), b.as_tensor().clone()));
            }
        }
        tensors
    }

    /// Installs (or, with `None`, removes) the observer called with this layer's input at the
    /// start of every forward.
    pub fn set_input_observer(&self, observer: Option<InputObserver>) {
        self.write().observer = observer.map(ObserverSlot);
    }

    /// Runs `f` on adapter `name`, if this layer has it.
    pub fn with_adapter<R>(&self, name: &str, f: impl FnOnce(&dyn Adapter) -> R) -> Option<R> {
        let s = self.read();
        s.adapters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| f(a.as_ref()))
    }

    /// The layer as plain operands for a fused multi-layer op: its frozen weight and bias and
    /// the factors of its one live LoRA-form adapter (or none), when the forward is exactly
    /// `x Wᵀ + b [+ s (x Aᵀ) Bᵀ]` on the CPU with f32 values (the weight in any type the frozen
    /// kernels read). `None` when anything else is in play: an input observer, a trainable
    /// copy, several live adapters, another method, dropout in training, a conv layer, another
    /// dtype or device.
    pub(crate) fn fused_parts(&self) -> Option<FusedLinearParts> {
        let s = self.read();
        let cpu_f32 = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        if s.observer.is_some()
            || !matches!(s.geometry, LayerGeometry::Linear { .. })
            || !s.weight.is_cpu_matrix()
            || s.bias.as_ref().is_some_and(|b| !cpu_f32(b))
        {
            return None;
        }
        let mut lora = None;
        if s.enabled {
            if s.copies.iter().any(|(n, _)| s.active.contains(n)) {
                return None;
            }
            let train = s.training.load(Ordering::Relaxed);
            let mut live = s
                .adapters
                .iter()
                .filter(|(n, _)| s.active.contains(n) && !s.merged.contains(n));
            match (live.next(), live.next()) {
                (None, _) => {}
                (Some((_, adapter)), None) => lora = Some(adapter.fused_lora_factors(train)?),
                _ => return None,
            }
        }
        Some(FusedLinearParts {
            weight: s.weight.clone(),
            bias: s.bias.clone(),
            lora,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.read();
        if let Some(observer) = &s.observer {
            (observer.0)(x)?;
        }
        let train = s.training.load(Ordering::Relaxed);
        let copy = if s.enabled {
            s.copies
                .iter()
                .find(|(n, _)| s.active.contains(n))
                .map(|(_, c)| c)
        } else {
            None
        };
        if copy.is_none() && s.enabled && matches!(s.geometry, LayerGeometry::Linear { .. }) {
            let mut live = s
                .adapters
                .iter()
                .filter(|(n, _)| s.active.contains(n) && !s.merged.contains(n));
            if let (Some((_, adapter)), None) = (live.next(), live.next())
                && let Some(y) = adapter.fused_linear_forward(x, &s.weight, s.bias.as_ref(), train)
            {
                return y;
            }
        }
        let mut y = match copy {
            Some(copy) => trainable_forward(&s, x, copy)?,
            None => base_forward(&s, x)?,
        };
        if s.enabled {
            for (name, adapter) in &s.adapters {
                if s.active.contains(name) && !s.merged.contains(name) {
                    let delta = adapter.forward_delta(x, train)?.to_dtype(y.dtype())?;
                    y = (y + delta)?;
                }
            }
        }
        Ok(y)
    }
}

/// A linear layer's operands for a fused op (see [`LayerHandle::fused_parts`]).
pub(crate) use crate::kernels::block_layers::FusedLinearParts;

/// The dtype a dense weight is kept in: its own, or f32 for ggml blocks.
fn dense_dtype(w: &FrozenWeight) -> DType {
    w.dense().map_or(DType::F32, |t| t.dtype())
}

/// The frozen base: `x Wᵀ + b` (the weight read in its stored type, see
/// [`frozen_matmul_weight`]) or `conv2d(x, W) + b` (in the weight's dtype), returned in the
/// input's dtype.
fn base_forward(s: &LayerState, x: &Tensor) -> Result<Tensor> {
    let LayerGeometry::Conv2d { params, .. } = s.geometry else {
        return Ok(frozen_matmul_weight(x, &s.weight, s.bias.as_ref())?);
    };
    let Some(kernel) = s.weight.dense() else {
        return Err(PeftError::layer(
            &s.name,
            format!(
                "a {} conv kernel: convolutions read dense kernels",
                s.weight.type_name()
            ),
        ));
    };
    let in_dtype = x.dtype();
    let x = x.to_dtype(kernel.dtype())?;
    let y = frozen_conv2d(
        &x,
        kernel,
        s.bias.as_ref(),
        params.padding,
        params.stride,
        params.dilation,
        params.groups,
    )?;
    Ok(y.to_dtype(in_dtype)?)
}

/// A trainable copy's forward, with ordinary (differentiable) ops.
fn trainable_forward(s: &LayerState, x: &Tensor, copy: &TrainableCopy) -> Result<Tensor> {
    let in_dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let w = copy.weight.as_tensor();
    let y = match s.geometry {
        LayerGeometry::Linear { .. } => x.broadcast_matmul(&w.t()?)?,
        LayerGeometry::Conv2d { params, .. } => conv2d_trainable(
            &x,
            w,
            params.padding,
            params.stride,
            params.dilation,
            params.groups,
        )?,
    };
    let bias = copy.bias.as_ref().map(|b| b.as_tensor().clone());
    let y = add_bias(s.geometry, y, bias.as_ref())?;
    Ok(y.to_dtype(in_dtype)?)
}

fn add_bias(geometry: LayerGeometry, y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let Some(b) = bias else { return Ok(y) };
    let b = b.to_dtype(y.dtype())?;
    Ok(match geometry {
        LayerGeometry::Linear { .. } => y.broadcast_add(&b)?,
        LayerGeometry::Conv2d { out_channels, .. } => {
            y.broadcast_add(&b.reshape((1, out_channels, 1, 1))?)?
        }
    })
}

/// An adaptable linear layer: `y = x Wᵀ + b + Σ Δ(x)`, `x: [.., in]`.
#[derive(Clone, Debug)]
pub struct PeftLinear(LayerHandle);

impl PeftLinear {
    pub(crate) fn new(handle: LayerHandle) -> Self {
        Self(handle)
    }

    /// The shared handle for inspecting or adapting this layer.
    pub fn handle(&self) -> &LayerHandle {
        &self.0
    }

    /// The forward with the library's error type.
    pub fn forward_peft(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
}

impl Module for PeftLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(x).map_err(into_candle)
    }
}

/// An adaptable 2-D convolution: `y = conv2d(x, W) + b + Σ Δ(x)`, `x: [N, C, H, W]`.
#[derive(Clone, Debug)]
pub struct PeftConv2d(LayerHandle);

impl PeftConv2d {
    pub(crate) fn new(handle: LayerHandle) -> Self {
        Self(handle)
    }

    /// The shared handle for inspecting or adapting this layer.
    pub fn handle(&self) -> &LayerHandle {
        &self.0
    }

    /// The forward with the library's error type.
    pub fn forward_peft(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
}

impl Module for PeftConv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(x).map_err(into_candle)
    }
}

/// `Module::forward` must return candle's error: keep ours as its message source.
fn into_candle(e: PeftError) -> candle_core::Error {
    match e {
        PeftError::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}
