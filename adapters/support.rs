//! What several method files share that is not a method of its own: the flattened shape of a
//! layer's weight, a layer's saved tensors read with their shapes checked, and the constructor
//! of a plain `--opt` option.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::adapter::{LayerGeometry, OptionKind, OptionSpec};
use crate::config::KEY_PREFIX;
use crate::error::{PeftError, Result};

/// `(out, in_flat)` of a layer's weight, a conv kernel flattened to `[out, in/g·kh·kw]`.
pub fn flat_dims(geometry: LayerGeometry) -> (usize, usize) {
    let shape = geometry.weight_shape();
    (shape[0], shape[1..].iter().product())
}

/// A saved tensor of one layer, checked against `shape` and moved to `device` as `dtype`. The
/// errors name the tensor by its file key (`base_model.model.<module>.<name>`).
pub(crate) fn saved_tensor(
    module: &str,
    tensors: &BTreeMap<String, Tensor>,
    name: &str,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
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
    Ok(t.to_dtype(dtype)?.to_device(device)?)
}

/// The length of a saved 1-D tensor (how a loader learns a layer's rank).
pub(crate) fn saved_len(
    module: &str,
    tensors: &BTreeMap<String, Tensor>,
    name: &str,
) -> Result<usize> {
    let key = format!("{KEY_PREFIX}{module}.{name}");
    let t = tensors.get(name).ok_or_else(|| PeftError::MissingTensor {
        key: key.clone(),
        location: "the adapter file".into(),
    })?;
    match *t.dims() {
        [n] => Ok(n),
        _ => Err(PeftError::ShapeMismatch {
            key,
            expected: vec![t.elem_count()],
            got: t.dims().to_vec(),
        }),
    }
}

/// `--opt key=value` setting the config key of the same name, excluding nothing.
pub(crate) const fn option(key: &'static str, kind: OptionKind, help: &'static str) -> OptionSpec {
    OptionSpec {
        key,
        path: key,
        kind,
        help,
        excludes: None,
    }
}
