//! The base model of a merge: the safetensors headers of one file or of the shards of an
//! index, with every tensor located by name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorInfo;

use crate::error::{PeftError, Result};
use crate::io::peft_format::WEIGHTS_NAME;
use crate::io::safetensors_header::{read_safetensors_header, st_error};
use crate::io::source::{WEIGHTS_FILE as SINGLE_FILE_NAME, WEIGHTS_INDEX_FILE as INDEX_NAME};

pub(super) struct BaseFile {
    pub(super) path: PathBuf,
    pub(super) data_start: u64,
}

pub(super) struct BaseTensor {
    pub(super) name: String,
    pub(super) file: usize,
    pub(super) info: TensorInfo,
}

pub(super) struct BaseModel {
    /// Where the base's config and tokenizer live.
    pub(super) dir: PathBuf,
    pub(super) files: Vec<BaseFile>,
    /// In output order: file order, then offset order within a file.
    pub(super) tensors: Vec<BaseTensor>,
    pub(super) by_name: HashMap<String, usize>,
    /// How the base was given, for messages.
    pub(super) label: String,
}

impl BaseModel {
    pub(super) fn open(base: &Path) -> Result<Self> {
        let not_found = |reason: String| PeftError::ModelNotFound {
            id: base.display().to_string(),
            reason,
        };
        let (dir, files) = if base.is_file() {
            let dir = base
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let name = base
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.ends_with(".index.json") {
                let files = read_index(base, &dir)?;
                (dir, files)
            } else {
                (dir, vec![base.to_path_buf()])
            }
        } else if base.is_dir() {
            let index = base.join(INDEX_NAME);
            let single = base.join(SINGLE_FILE_NAME);
            // transformers' order: the single file wins over an index.
            if single.is_file() {
                (base.to_path_buf(), vec![single])
            } else if index.is_file() {
                (base.to_path_buf(), read_index(&index, base)?)
            } else {
                let (weights, indexes) = list_weight_files(base)?;
                match (weights.as_slice(), indexes.as_slice()) {
                    (_, [index]) => (base.to_path_buf(), read_index(index, base)?),
                    ([one], []) => (base.to_path_buf(), vec![one.clone()]),
                    _ => {
                        let found: Vec<String> = weights
                            .iter()
                            .chain(indexes.iter())
                            .filter_map(|p| p.file_name())
                            .map(|n| n.to_string_lossy().into_owned())
                            .collect();
                        return Err(not_found(format!(
                            "no {SINGLE_FILE_NAME} or {INDEX_NAME} in the folder (safetensors files found: {})",
                            if found.is_empty() {
                                "none".to_string()
                            } else {
                                found.join(", ")
                            }
                        )));
                    }
                }
            }
        } else {
            return Err(not_found("no such file or directory".into()));
        };

        let mut model = BaseModel {
            dir,
            files: Vec::new(),
            tensors: Vec::new(),
            by_name: HashMap::new(),
            label: base.display().to_string(),
        };
        for path in files {
            let header = read_safetensors_header(&path)?;
            let file = model.files.len();
            for (name, info) in header.tensors {
                if let Some(&other) = model.by_name.get(&name) {
                    let first = &model.files[model.tensors[other].file].path;
                    return Err(st_error(
                        &path,
                        format!(
                            "tensor `{name}` is also in {}: a tensor must be in one shard",
                            first.display()
                        ),
                    ));
                }
                model.by_name.insert(name.clone(), model.tensors.len());
                model.tensors.push(BaseTensor { name, file, info });
            }
            model.files.push(BaseFile {
                path,
                data_start: header.data_start,
            });
        }
        if model.tensors.is_empty() {
            return Err(not_found("the weight files hold no tensors".into()));
        }
        Ok(model)
    }
}

/// `*.safetensors` and `*.safetensors.index.json` files of a folder, sorted.
fn list_weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut weights = Vec::new();
    let mut indexes = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| PeftError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| PeftError::io(dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !path.is_file() || name.starts_with('.') {
            continue;
        }
        if name.ends_with(".safetensors.index.json") {
            indexes.push(path);
        } else if name.ends_with(".safetensors") && name != WEIGHTS_NAME {
            weights.push(path);
        }
    }
    weights.sort();
    indexes.sort();
    Ok((weights, indexes))
}

/// The shard files of a Hugging Face index, in sorted order; checks that each listed tensor is in
/// the file the index names.
fn read_index(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, file) in crate::io::source::weight_map(index)? {
        by_file.entry(file).or_default().push(name);
    }
    let mut files = Vec::with_capacity(by_file.len());
    for (file, names) in by_file {
        let path = dir.join(&file);
        let header = read_safetensors_header(&path)?;
        let present: BTreeSet<&str> = header.tensors.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(name) = names.iter().find(|n| !present.contains(n.as_str())) {
            return Err(PeftError::MissingTensor {
                key: name.clone(),
                location: format!("{} (as {} says)", path.display(), index.display()),
            });
        }
        files.push(path);
    }
    Ok(files)
}
