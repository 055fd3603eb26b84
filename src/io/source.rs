//! Where a model comes from: a local Hugging Face folder, a hub id resolved through the hf-hub
//! cache, or a GGUF file.
//!
//! - A local folder holds `config.json`, the weights (`model.safetensors`, or the shards listed in
//!   `model.safetensors.index.json`) and, optionally, `tokenizer.json`. A path to a single
//!   `.safetensors` file resolves to that file with the `config.json` beside it.
//! - A hub id (`org/name`) is looked up in the hub cache first (`$HF_HOME/hub`, default
//!   `~/.cache/huggingface/hub`; the layout Python's `huggingface_hub` writes), with no network.
//!   On a cache miss the file is downloaded with hf-hub, unless `HF_HUB_OFFLINE` is set: hf-hub
//!   0.5 does not read that variable, so it is honoured here, and a miss is then
//!   [`PeftError::ModelNotFound`] naming `scripts/fetch-models.sh`.
//! - A `.gguf` file resolves to itself ([`SourceKind::Gguf`]): its header is read to check that
//!   it is GGUF and that its architecture is one `crate::io::gguf` maps (otherwise
//!   [`PeftError::Unsupported`] naming it). The config and the tokenizer live in its metadata, so
//!   `config` and `weights[0]` are the file itself and `tokenizer` is `None`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{PeftError, Result};

/// The model config of a Hugging Face folder.
pub const CONFIG_FILE: &str = "config.json";
/// The single-file weights of a Hugging Face folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The shard index of a Hugging Face folder with sharded weights.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// The fast-tokenizer file of a Hugging Face folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The script that fills the offline model folder and the hub cache; error messages name it.
pub const FETCH_SCRIPT: &str = "scripts/fetch-models.sh";

/// Where a resolved model came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// A folder (or a `.safetensors` file) on disk.
    Local,
    /// A hub repository, resolved through the hub cache (and downloaded on a miss when online).
    Hub {
        /// `owner/name`.
        repo_id: String,
        /// The branch, tag or commit asked for.
        revision: String,
    },
    /// A GGUF file (llama.cpp): config, weights and tokenizer in one file.
    Gguf,
}

/// A model's files on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSource {
    /// What the caller asked for (a path or a hub id).
    pub spec: String,
    /// Where the files came from.
    pub kind: SourceKind,
    /// The folder holding `config.json` (for a hub id: the cache snapshot folder).
    pub dir: PathBuf,
    /// `config.json` (for a GGUF source: the `.gguf` file, which holds the config).
    pub config: PathBuf,
    /// `model.safetensors`, or the shards of `model.safetensors.index.json` in sorted order.
    pub weights: Vec<PathBuf>,
    /// `model.safetensors.index.json`, when the weights are sharded.
    pub weights_index: Option<PathBuf>,
    /// `tokenizer.json`, when the folder has one.
    pub tokenizer: Option<PathBuf>,
}

/// How hub ids are resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache root (`$HF_HOME/hub`), holding `models--org--name` folders.
    pub cache_dir: PathBuf,
    /// Cache only: a miss is an error, never a download.
    pub offline: bool,
    /// The hub endpoint for downloads; `None` is `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Branch, tag or commit (`main` by default).
    pub revision: String,
}

impl HubOptions {
    /// Options for the cache at `cache_dir` (the `hub` folder itself), online, revision `main`.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            offline: false,
            endpoint: None,
            revision: "main".to_string(),
        }
    }

    /// From the environment, as Python's `huggingface_hub` reads it: the cache is
    /// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE`
    /// (`1`, `true`, `yes`, `on`) means cache only; `HF_ENDPOINT` replaces the endpoint.
    pub fn from_env() -> Self {
        let cache_dir = match std::env::var_os("HF_HUB_CACHE") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => Cache::from_env().path().clone(),
        };
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| env_flag(&v))
            .unwrap_or(false);
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty());
        Self {
            cache_dir,
            offline,
            endpoint,
            revision: "main".to_string(),
        }
    }

    /// Cache only (`true`) or download on a cache miss (`false`).
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// The hub URL to download from instead of the default.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// The branch, tag or commit to resolve (default `main`).
    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = revision.into();
        self
    }
}

/// `huggingface_hub`'s truthy values for boolean environment variables.
fn env_flag(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Resolves `spec` (a local path or a hub id) with hub options from the environment.
pub fn resolve(spec: &str) -> Result<ModelSource> {
    resolve_with(spec, &HubOptions::from_env())
}

/// Resolves `spec`: a `.gguf` path is a GGUF source; another existing path is local; anything
/// else shaped like a hub id (`name` or `org/name`) goes through the hub cache.
pub fn resolve_with(spec: &str, options: &HubOptions) -> Result<ModelSource> {
    let path = Path::new(spec);
    if is_gguf(path) {
        return resolve_gguf(path);
    }
    if path.exists() {
        return resolve_local(path);
    }
    if looks_like_hub_id(spec) {
        return resolve_hub(spec, options);
    }
    Err(PeftError::ModelNotFound {
        id: spec.to_string(),
        reason: "no such file or directory, and not a hub id (`org/name`)".to_string(),
    })
}

fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// A `.gguf` file, after checking its header (GGUF magic, a supported architecture).
pub fn resolve_gguf(path: &Path) -> Result<ModelSource> {
    let spec = path.display().to_string();
    if !path.is_file() {
        return Err(PeftError::ModelNotFound {
            id: spec,
            reason: "no such GGUF file".to_string(),
        });
    }
    crate::io::gguf::GgufModel::open(path)?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(ModelSource {
        spec,
        kind: SourceKind::Gguf,
        dir,
        config: path.to_path_buf(),
        weights: vec![path.to_path_buf()],
        weights_index: None,
        tokenizer: None,
    })
}

/// `name` or `org/name`, each part made of ASCII letters, digits, `-`, `_` and `.`, not starting
/// with `.` (a relative path like `./model` or `../x` is not an id).
pub fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    if parts.is_empty() || parts.len() > 2 {
        return false;
    }
    parts.iter().all(|p| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    })
}

/// A local model folder, a single `.safetensors` file with `config.json` beside it, or a
/// `.gguf` file.
pub fn resolve_local(path: &Path) -> Result<ModelSource> {
    let spec = path.display().to_string();
    if is_gguf(path) {
        return resolve_gguf(path);
    }
    if path.is_file() {
        let is_safetensors = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        if !is_safetensors {
            return Err(PeftError::Unsupported(format!(
                "{spec}: expected a model folder, a .safetensors file or a hub id"
            )));
        }
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let config = required_local(&spec, &dir, CONFIG_FILE)?;
        return Ok(ModelSource {
            spec,
            kind: SourceKind::Local,
            tokenizer: optional_local(&dir, TOKENIZER_FILE),
            dir,
            config,
            weights: vec![path.to_path_buf()],
            weights_index: None,
        });
    }
    if !path.is_dir() {
        return Err(PeftError::ModelNotFound {
            id: spec,
            reason: "no such file or directory".to_string(),
        });
    }
    let dir = path.to_path_buf();
    let config = required_local(&spec, &dir, CONFIG_FILE)?;
    let (weights, weights_index) = if let Some(single) = optional_local(&dir, WEIGHTS_FILE) {
        (vec![single], None)
    } else if let Some(index) = optional_local(&dir, WEIGHTS_INDEX_FILE) {
        let mut shards = Vec::new();
        for name in shard_names(&index)? {
            shards.push(required_local(&spec, &dir, &name)?);
        }
        (shards, Some(index))
    } else {
        return Err(no_safetensors(&spec, &dir));
    };
    Ok(ModelSource {
        spec,
        kind: SourceKind::Local,
        tokenizer: optional_local(&dir, TOKENIZER_FILE),
        dir,
        config,
        weights,
        weights_index,
    })
}

fn optional_local(dir: &Path, name: &str) -> Option<PathBuf> {
    let p = dir.join(name);
    p.is_file().then_some(p)
}

fn required_local(spec: &str, dir: &Path, name: &str) -> Result<PathBuf> {
    optional_local(dir, name).ok_or_else(|| PeftError::ModelNotFound {
        id: spec.to_string(),
        reason: format!("missing {}", dir.join(name).display()),
    })
}

fn no_safetensors(spec: &str, dir: &Path) -> PeftError {
    if dir.join("pytorch_model.bin").is_file() {
        return PeftError::Unsupported(format!(
            "{spec}: only safetensors weights are supported, found pytorch_model.bin"
        ));
    }
    PeftError::ModelNotFound {
        id: spec.to_string(),
        reason: format!(
            "no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {}",
            dir.display()
        ),
    }
}

/// The `weight_map` of a `model.safetensors.index.json`: (tensor name, shard file name) pairs in
/// the index's order. Every file must be a plain file name in the index's folder.
pub fn weight_map(index: &Path) -> Result<Vec<(String, String)>> {
    let value: serde_json::Value = crate::io::read_json(index)?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            PeftError::config(
                "weight_map",
                format!("missing or not an object in {}", index.display()),
            )
        })?;
    let mut pairs = Vec::with_capacity(map.len());
    for (key, file) in map {
        let file = file.as_str().ok_or_else(|| {
            PeftError::config(
                format!("weight_map.{key}"),
                format!("not a file name in {}", index.display()),
            )
        })?;
        if file.is_empty() || file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(PeftError::config(
                format!("weight_map.{key}"),
                format!("`{file}` is not a plain file name (in {})", index.display()),
            ));
        }
        pairs.push((key.clone(), file.to_string()));
    }
    if pairs.is_empty() {
        return Err(PeftError::config(
            "weight_map",
            format!("is empty in {}", index.display()),
        ));
    }
    Ok(pairs)
}

/// The distinct shard file names of a `model.safetensors.index.json`, sorted.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let names: BTreeSet<String> = weight_map(index)?.into_iter().map(|(_, f)| f).collect();
    Ok(names.into_iter().collect())
}

/// The cache folder of a model repo: `<cache>/models--org--name`.
pub fn repo_cache_dir(cache_dir: &Path, repo_id: &str) -> PathBuf {
    cache_dir.join(Repo::model(repo_id.to_string()).folder_name())
}

/// A file of `repo_id` at `revision` in the hub cache, without any network access. Unlike
/// hf-hub 0.5's `CacheRepo::get`, a ref file with a trailing newline is accepted, and a commit
/// hash revision is looked up in `snapshots/` directly.
pub fn cached_file(
    cache_dir: &Path,
    repo_id: &str,
    revision: &str,
    filename: &str,
) -> Option<PathBuf> {
    let repo = repo_cache_dir(cache_dir, repo_id);
    let snapshots = repo.join("snapshots");
    let commit = if is_commit_hash(revision) && snapshots.join(revision).is_dir() {
        revision.to_string()
    } else {
        fs::read_to_string(repo.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    if commit.is_empty() {
        return None;
    }
    let path = snapshots.join(commit).join(filename);
    // `is_file` follows the snapshot's symlink to its blob: a dangling link is a miss.
    path.is_file().then_some(path)
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// A hub repo's files: from the cache when present, else downloaded (unless offline).
pub fn resolve_hub(repo_id: &str, options: &HubOptions) -> Result<ModelSource> {
    let hub = HubFetcher::new(repo_id, options);
    let config = hub.required(CONFIG_FILE)?;
    let (weights, weights_index) = if let Some(single) = hub.cached(WEIGHTS_FILE) {
        (vec![single], None)
    } else if let Some(index) = hub.cached(WEIGHTS_INDEX_FILE) {
        (hub.shards(&index)?, Some(index))
    } else if options.offline {
        return Err(hub.offline_miss(&format!("{WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE})")));
    } else {
        match hub.download(WEIGHTS_FILE) {
            Ok(single) => (vec![single], None),
            Err(single_err) => match hub.download(WEIGHTS_INDEX_FILE) {
                Ok(index) => (hub.shards(&index)?, Some(index)),
                Err(_) => return Err(single_err),
            },
        }
    };
    let tokenizer = hub.optional(TOKENIZER_FILE);
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| options.cache_dir.clone());
    Ok(ModelSource {
        spec: repo_id.to_string(),
        kind: SourceKind::Hub {
            repo_id: repo_id.to_string(),
            revision: options.revision.clone(),
        },
        dir,
        config,
        weights,
        weights_index,
        tokenizer,
    })
}

/// Cache-first file access for one hub repo.
struct HubFetcher<'a> {
    repo_id: &'a str,
    options: &'a HubOptions,
}

impl<'a> HubFetcher<'a> {
    fn new(repo_id: &'a str, options: &'a HubOptions) -> Self {
        Self { repo_id, options }
    }

    fn cached(&self, filename: &str) -> Option<PathBuf> {
        cached_file(
            &self.options.cache_dir,
            self.repo_id,
            &self.options.revision,
            filename,
        )
    }

    fn offline_miss(&self, what: &str) -> PeftError {
        PeftError::ModelNotFound {
            id: self.repo_id.to_string(),
            reason: format!(
                "HF_HUB_OFFLINE is set and {what} is not in the hub cache at {} \
                 (revision `{}`); run {FETCH_SCRIPT} to fill the cache for the test models, \
                 or unset HF_HUB_OFFLINE to download",
                repo_cache_dir(&self.options.cache_dir, self.repo_id).display(),
                self.options.revision
            ),
        }
    }

    fn download(&self, filename: &str) -> Result<PathBuf> {
        let mut builder =
            ApiBuilder::from_cache(Cache::new(self.options.cache_dir.clone())).with_progress(false);
        if let Some(endpoint) = &self.options.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let api = builder.build().map_err(|e| PeftError::ModelNotFound {
            id: self.repo_id.to_string(),
            reason: format!("cannot start the hub client: {e}"),
        })?;
        let repo = Repo::with_revision(
            self.repo_id.to_string(),
            RepoType::Model,
            self.options.revision.clone(),
        );
        api.repo(repo)
            .get(filename)
            .map_err(|e| PeftError::ModelNotFound {
                id: self.repo_id.to_string(),
                reason: format!(
                    "{filename} is not in the hub cache at {} and the download failed: {e} \
                     (for offline use, run {FETCH_SCRIPT} first)",
                    repo_cache_dir(&self.options.cache_dir, self.repo_id).display()
                ),
            })
    }

    fn required(&self, filename: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(filename) {
            return Ok(p);
        }
        if self.options.offline {
            return Err(self.offline_miss(filename));
        }
        self.download(filename)
    }

    /// A file the model can do without: a miss (or, online, a failed download) is `None`.
    fn optional(&self, filename: &str) -> Option<PathBuf> {
        if let Some(p) = self.cached(filename) {
            return Some(p);
        }
        if self.options.offline {
            return None;
        }
        self.download(filename).ok()
    }

    fn shards(&self, index: &Path) -> Result<Vec<PathBuf>> {
        shard_names(index)?
            .iter()
            .map(|name| self.required(name))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(looks_like_hub_id("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(looks_like_hub_id("gpt2"));
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_hub_id("./model"));
        assert!(!looks_like_hub_id("../model"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("a//b"));
        assert!(!looks_like_hub_id("org/na me"));
    }

    #[test]
    fn offline_flag_values() {
        for v in ["1", "true", "TRUE", "yes", "On"] {
            assert!(env_flag(v), "{v}");
        }
        for v in ["0", "false", "", "no", "off"] {
            assert!(!env_flag(v), "{v}");
        }
    }
}
