//! The optimiser state file, shared by [`AdamW`](super::AdamW) and
//! [`LoraPro`](super::LoraPro): a safetensors file holding, per tracked tensor `<prefix>`,
//! `<prefix>.exp_avg`, `<prefix>.exp_avg_sq` (the Adam moments) and `<prefix>.step` (an i64
//! scalar), and string metadata (`format = pt`, `optimizer`, `step`, the hyper-parameters). It is
//! written atomically. Reading checks every shape and step count and that no tensor is left
//! over, with errors naming the tensor and the file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{PeftError, Result};
use crate::io::peft_format::write_atomic;

/// Suffix of the first-moment tensor of a parameter in the state file.
pub const EXP_AVG: &str = "exp_avg";
/// Suffix of the second-moment tensor of a parameter in the state file.
pub const EXP_AVG_SQ: &str = "exp_avg_sq";
/// Suffix of a parameter's step count in the state file.
pub const STEP: &str = "step";

/// The tensors of a state file being assembled.
#[derive(Default)]
pub(crate) struct StateWriter {
    tensors: Vec<(String, Tensor)>,
}

impl StateWriter {
    /// Adds `<prefix>.exp_avg`, `<prefix>.exp_avg_sq` and `<prefix>.step`; `what` names the
    /// owner in the error of a step count past i64.
    pub(crate) fn moments(
        &mut self,
        prefix: &str,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        step: u64,
        what: &str,
    ) -> Result<()> {
        let step = i64::try_from(step)
            .map_err(|_| PeftError::config("step", format!("step count of {what} exceeds i64")))?;
        self.tensors
            .push((format!("{prefix}.{EXP_AVG}"), exp_avg.contiguous()?));
        self.tensors
            .push((format!("{prefix}.{EXP_AVG_SQ}"), exp_avg_sq.contiguous()?));
        self.tensors.push((
            format!("{prefix}.{STEP}"),
            Tensor::new(step, exp_avg.device())?,
        ));
        Ok(())
    }

    /// Writes the file at `path`, atomically, with metadata `format = pt` and `metadata`.
    pub(crate) fn write(self, path: &Path, metadata: &[(&str, String)]) -> Result<()> {
        let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        meta.extend(metadata.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let bytes = safetensors::tensor::serialize(self.tensors, Some(meta)).map_err(|e| {
            PeftError::Safetensors {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        write_atomic(path, &bytes)
    }
}

/// A state file being read: its metadata at once, its tensors when first taken.
pub(crate) struct StateReader<'p> {
    path: &'p Path,
    bytes: Vec<u8>,
    metadata: BTreeMap<String, String>,
    tensors: Option<HashMap<String, Tensor>>,
}

impl<'p> StateReader<'p> {
    /// Reads the file and its metadata.
    pub(crate) fn open(path: &'p Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| PeftError::io(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(path, e.to_string()))?;
        let metadata = meta
            .metadata()
            .clone()
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        Ok(Self {
            path,
            bytes,
            metadata,
            tensors: None,
        })
    }

    /// A metadata value.
    pub(crate) fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// The metadata `step` (calls to the optimiser's `step`), if present.
    pub(crate) fn step_count(&self) -> Result<Option<u64>> {
        self.metadata("step")
            .map(|s| {
                s.parse::<u64>().map_err(|_| {
                    bad(
                        self.path,
                        format!("metadata `step` is `{s}`, not a step count"),
                    )
                })
            })
            .transpose()
    }

    fn tensors(&mut self) -> Result<&mut HashMap<String, Tensor>> {
        if self.tensors.is_none() {
            let loaded = candle_core::safetensors::load_buffer(&self.bytes, &Device::Cpu)
                .map_err(|e| bad(self.path, e.to_string()))?;
            self.tensors = Some(loaded);
        }
        match self.tensors.as_mut() {
            Some(t) => Ok(t),
            None => Err(bad(self.path, "the tensors could not be read".into())),
        }
    }

    fn take(&mut self, key: String) -> Result<Tensor> {
        let location = self.path.display().to_string();
        self.tensors()?
            .remove(&key)
            .ok_or(PeftError::MissingTensor { key, location })
    }

    /// Takes `<prefix>.exp_avg`, `<prefix>.exp_avg_sq` (each of shape `dims`) and
    /// `<prefix>.step` (a scalar whole number ≥ 0), as stored (CPU, the file's dtype).
    pub(crate) fn take_moments(
        &mut self,
        prefix: &str,
        dims: &[usize],
    ) -> Result<(Tensor, Tensor, u64)> {
        let m = self.take(format!("{prefix}.{EXP_AVG}"))?;
        let v = self.take(format!("{prefix}.{EXP_AVG_SQ}"))?;
        let step = self.take(format!("{prefix}.{STEP}"))?;
        for (suffix, t) in [(EXP_AVG, &m), (EXP_AVG_SQ, &v)] {
            if t.dims() != dims {
                return Err(PeftError::ShapeMismatch {
                    key: format!("{prefix}.{suffix}"),
                    expected: dims.to_vec(),
                    got: t.dims().to_vec(),
                });
            }
        }
        let step = self.read_step(&format!("{prefix}.{STEP}"), &step)?;
        Ok((m, v, step))
    }

    fn read_step(&self, key: &str, t: &Tensor) -> Result<u64> {
        if t.elem_count() != 1 {
            return Err(PeftError::ShapeMismatch {
                key: key.to_string(),
                expected: vec![],
                got: t.dims().to_vec(),
            });
        }
        let step = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
        if !(step.is_finite() && step >= 0.0 && step.fract() == 0.0) {
            return Err(bad(
                self.path,
                format!("`{key}` is {step}, not a step count"),
            ));
        }
        Ok(step as u64)
    }

    /// An error naming the first (by name) tensor no one took.
    pub(crate) fn finish(&mut self) -> Result<()> {
        let location = self.path.display().to_string();
        match self.tensors()?.keys().min() {
            Some(key) => Err(PeftError::UnexpectedTensor {
                key: key.clone(),
                location,
            }),
            None => Ok(()),
        }
    }
}

fn bad(path: &Path, reason: String) -> PeftError {
    PeftError::Safetensors {
        path: path.to_path_buf(),
        reason,
    }
}
