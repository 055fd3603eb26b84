//! Task heads on our BERT: transformers' `BertForSequenceClassification`.
//!
//! ```text
//! logits = classifier(dropout(tanh(bert.pooler.dense(h[:, 0]))))      h = bert(input_ids, mask)
//! ```
//!
//! Module paths (and so PEFT adapter keys) are transformers' names for this architecture: the
//! trunk lives under `bert.` (`bert.encoder.layer.0.attention.self.query`, `bert.pooler.dense`)
//! and the head is `classifier`. A checkpoint of a bare `BertModel` (all-MiniLM-L6-v2: no prefix,
//! no classifier) is read through [`BertForSequenceClassification::with_bert_prefix`], a
//! `VarBuilder` rename that maps `bert.X` to `X`; a checkpoint saved from this model (the merged
//! export) has the prefix and is read as it is. A classifier (or pooler) the checkpoint lacks is
//! created as transformers creates it: weight `N(0, initializer_range²)`, bias 0, drawn from a
//! ChaCha RNG seeded with `seed` (pooler first, when missing, then the classifier). Train it as a
//! `modules_to_save` module: it is then saved whole with the adapter
//! (`base_model.model.classifier.weight` / `.bias`) and a loaded adapter's copy overrides the
//! freshly initialised one.
//!
//! Dropout: in training mode ([`crate::PeftModel::train`]) the pooled output goes through
//! dropout with `classifier_dropout`, or `hidden_dropout_prob` when that is unset, as in
//! transformers; the mask comes from a ChaCha RNG seeded from `seed`, so runs are reproducible.
//! The trunk itself applies no dropout (see [`crate::models::bert`]). In eval mode the forward is
//! transformers' `eval()` forward.
//!
//! Merged export ([`BertForSequenceClassification::export_merged`]): the name-based streaming
//! merge cannot produce this model from a bare base checkpoint (it has neither the `bert.`
//! prefix nor a classifier), so the export is written from the merged model: the adaptable
//! layers' merged weights from the model, every other trunk tensor (embeddings, LayerNorms, …)
//! read by name from the base safetensors (memory-mapped) and renamed `bert.…`, plus
//! `classifier.*`; the base tensors keep their dtype. `config.json` is the base config with
//! `architectures: ["BertForSequenceClassification"]`, `num_labels`, `id2label`, `label2id` and
//! `problem_type: "single_label_classification"`; the tokenizer files are copied verbatim.
//! Python's `AutoModelForSequenceClassification` and candle-transformers' `BertModel` (through its
//! `bert.` prefix fallback) load the folder. Every file is written to a temporary and renamed into
//! place, the weights last. The tensors are assembled in memory (the model is there already), so
//! peak memory is about twice the model, not one tensor as in `io::export`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use crate::builder::PeftBuilder;
use crate::error::{PeftError, Result};
use crate::init::{dropout, seed_from_name};
use crate::io::hf_folder::{
    TOKENIZER_FILES, copy_present_files, same_dir, stage_tensors, write_json,
};
use crate::io::source::{CONFIG_FILE, ModelSource, WEIGHTS_FILE};
use crate::layer::PeftLinear;
use crate::model::PeftModel;
use crate::models::bert::{BertConfig, BertModel};
use crate::models::{LoadOptions, Pretrained};

/// The architecture name written to `config.json`.
pub const ARCHITECTURE: &str = "BertForSequenceClassification";
/// Tensor probed to tell a prefixed checkpoint from a bare one.
const PROBE: &str = "embeddings.word_embeddings.weight";

/// transformers' `BertForSequenceClassification`: BERT, pooler, dropout, classifier.
#[derive(Clone, Debug)]
pub struct BertForSequenceClassification {
    bert: BertModel,
    pooler: PeftLinear,
    classifier: PeftLinear,
    num_labels: usize,
    dropout: f32,
    training: Arc<AtomicBool>,
    dropout_rng: Arc<Mutex<ChaCha8Rng>>,
    config: BertConfig,
}

/// What [`BertForSequenceClassification::save_pretrained`] wrote.
#[derive(Clone, Debug)]
pub struct ClassifierExport {
    /// `model.safetensors`.
    pub weights: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// Tokenizer files copied from the base folder.
    pub copied_files: Vec<PathBuf>,
    /// Tensor names written, sorted.
    pub tensor_names: Vec<String>,
}

impl BertForSequenceClassification {
    /// `vb` unchanged when its checkpoint has `bert.`-prefixed names (or is not a BERT
    /// checkpoint at all); for a bare `BertModel` checkpoint, a renaming view in which `bert.X`
    /// reads tensor `X`, so the trunk can be built under `bert.` either way.
    pub fn with_bert_prefix(vb: VarBuilder<'_>) -> VarBuilder<'_> {
        if vb.contains_tensor(&format!("bert.{PROBE}")) || !vb.contains_tensor(PROBE) {
            return vb;
        }
        vb.rename_f(|name: &str| name.strip_prefix("bert.").unwrap_or(name).to_string())
    }

    /// Builds the model from `b`, whose weights must have `bert.`-prefixed names (wrap a bare
    /// checkpoint's `VarBuilder` with [`with_bert_prefix`](Self::with_bert_prefix) first). A
    /// missing pooler or classifier is initialised from `seed` (see the module docs).
    pub fn load(
        b: &PeftBuilder<'_>,
        cfg: &BertConfig,
        num_labels: usize,
        seed: u64,
    ) -> Result<Self> {
        if num_labels == 0 {
            return Err(PeftError::config("num_labels", "must be at least 1, got 0"));
        }
        let probe = format!("bert.{PROBE}");
        if !b.contains(&probe) {
            return Err(PeftError::MissingTensor {
                key: probe,
                location: "the model weights (a bare BertModel checkpoint must be read through \
                           BertForSequenceClassification::with_bert_prefix)"
                    .to_string(),
            });
        }
        let bert_b = b.pp("bert");
        let bert = BertModel::load(&bert_b, cfg)?;
        let h = cfg.hidden_size;
        let std = cfg.initializer_range as f32;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let pooler = match bert.pooler() {
            Some(p) => p.clone(),
            None => bert_b
                .pp("pooler")
                .linear_or_init(h, h, true, "dense", std, &mut rng)?,
        };
        let classifier = b.linear_or_init(h, num_labels, true, "classifier", std, &mut rng)?;
        let p = cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob);
        if !(0.0..1.0).contains(&p) {
            return Err(PeftError::config(
                "classifier_dropout",
                format!("dropout probability must be in [0, 1), got {p}"),
            ));
        }
        let dropout_seed = seed ^ seed_from_name("classifier.dropout");
        Ok(Self {
            bert,
            pooler,
            classifier,
            num_labels,
            dropout: p as f32,
            training: b.training_flag(),
            dropout_rng: Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(dropout_seed))),
            config: cfg.clone(),
        })
    }

    /// Loads a resolved model (bare `BertModel` or this model's own export) in f32 on `device`,
    /// wrapped in a [`PeftModel`] with no adapters yet.
    pub fn from_source(
        source: &ModelSource,
        num_labels: usize,
        seed: u64,
        opts: impl Into<LoadOptions>,
    ) -> Result<(PeftModel<Self>, BertConfig)> {
        let LoadOptions { device, base_dtype } = opts.into();
        let device = &device;
        let cfg = BertConfig::from_file(&source.config)?;
        // SAFETY: the weight files are memory-mapped only while the model is built; every tensor
        // is copied out of the map by `VarBuilder::get` (as in `BertModel::from_source`).
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&source.weights, DType::F32, device) }
                .map_err(|e| PeftError::Safetensors {
                    path: source.weights.first().cloned().unwrap_or_default(),
                    reason: e.to_string(),
                })?;
        let b = PeftBuilder::new(Self::with_bert_prefix(vb)).with_base_dtype(base_dtype);
        let model = Self::load(&b, &cfg, num_labels, seed)?;
        Ok((PeftModel::new(model, &b), cfg))
    }

    /// Resolves `spec` (a folder or a hub id) and loads it as [`from_source`](Self::from_source)
    /// does.
    pub fn from_pretrained(
        spec: &str,
        num_labels: usize,
        seed: u64,
        opts: impl Into<LoadOptions>,
    ) -> Result<Pretrained<Self, BertConfig>> {
        let source = crate::io::source::resolve(spec)?;
        let (model, config) = Self::from_source(&source, num_labels, seed, opts)?;
        Ok(Pretrained {
            model,
            config,
            source,
        })
    }

    /// The BERT trunk (`bert.`).
    pub fn bert(&self) -> &BertModel {
        &self.bert
    }

    /// `bert.pooler.dense`.
    pub fn pooler(&self) -> &PeftLinear {
        &self.pooler
    }

    /// `classifier`.
    pub fn classifier(&self) -> &PeftLinear {
        &self.classifier
    }

    /// Number of classes.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// The trunk's config.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The dropout probability applied before the classifier in training mode.
    pub fn dropout_prob(&self) -> f32 {
        self.dropout
    }

    /// A copy of the classifier dropout's RNG, for checkpoints.
    pub fn dropout_rng(&self) -> ChaCha8Rng {
        self.dropout_rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the classifier dropout's RNG (with one [`dropout_rng`](Self::dropout_rng)
    /// returned).
    pub fn set_dropout_rng(&self, rng: ChaCha8Rng) {
        *self.dropout_rng.lock().unwrap_or_else(|p| p.into_inner()) = rng;
    }

    /// `logits: [B, num_labels]` for `input_ids: [B, T]` and `attention_mask: [B, T]`
    /// (1 = token, 0 = padding); token types are all 0.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.forward_with(input_ids, None, Some(attention_mask))
    }

    /// [`forward`](Self::forward) with optional token types and mask.
    pub fn forward_with(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden = self
            .bert
            .forward(input_ids, token_type_ids, attention_mask)?;
        let pooled = self.pooled(&hidden)?;
        let pooled = if self.training.load(Ordering::Relaxed) && self.dropout > 0.0 {
            let mut rng = self.dropout_rng.lock().unwrap_or_else(|p| p.into_inner());
            dropout(&pooled, self.dropout, &mut rng)?
        } else {
            pooled
        };
        self.classifier.forward_peft(&pooled)
    }

    /// transformers' pooler: `tanh(dense(hidden[:, 0]))`, `[B, H]`.
    pub fn pooled(&self, hidden: &Tensor) -> Result<Tensor> {
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.pooler.forward_peft(&first)?.tanh()?)
    }

    /// Every adaptable layer (trunk, pooler, classifier), deduplicated, in build order.
    fn all_linears(&self) -> Vec<&PeftLinear> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for l in self
            .bert
            .linears()
            .into_iter()
            .chain([&self.pooler, &self.classifier])
        {
            if seen.insert(l.handle().name()) {
                out.push(l);
            }
        }
        out
    }

    /// Merges the active adapters (and the trained `modules_to_save` copies) into the weights,
    /// removes every adapter, and writes the merged classification model to `out_dir` (see the
    /// module docs); `labels` name the classes (`labels[id]`). Returns the merged model.
    pub fn export_merged(
        model: PeftModel<Self>,
        base: &ModelSource,
        out_dir: impl AsRef<Path>,
        labels: &[String],
    ) -> Result<(Self, ClassifierExport)> {
        let merged = model.merge_and_unload()?;
        let report = merged.save_pretrained(base, out_dir, labels)?;
        Ok((merged, report))
    }

    /// Writes this model's current weights as a transformers `BertForSequenceClassification`
    /// folder (see the module docs). `base` is the checkpoint the model was loaded from: its
    /// non-adaptable tensors, `config.json` and tokenizer files are read from there. A layer
    /// that still carries an adapter that is not merged (or a `modules_to_save` copy) is an
    /// error: use [`export_merged`](Self::export_merged). `out_dir` must not be `base`'s folder.
    pub fn save_pretrained(
        &self,
        base: &ModelSource,
        out_dir: impl AsRef<Path>,
        labels: &[String],
    ) -> Result<ClassifierExport> {
        let out_dir = out_dir.as_ref();
        check_labels(labels, self.num_labels)?;
        self.check_no_pending_adapters()?;
        if same_dir(&base.dir, out_dir) {
            return Err(PeftError::Unsupported(format!(
                "refusing to export into the base model folder {}",
                base.dir.display()
            )));
        }

        // The adaptable layers' current weights, by output key.
        let mut layer_tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for l in self.all_linears() {
            let h = l.handle();
            let name = h.name();
            layer_tensors.insert(format!("{name}.weight"), h.weight()?);
            if let Some(b) = h.bias() {
                layer_tensors.insert(format!("{name}.bias"), b);
            }
        }

        // SAFETY: the base files are only read while the export is assembled; every tensor is
        // copied out of the map by `load` before the map is dropped.
        let st = unsafe { MmapedSafetensors::multi(&base.weights) }.map_err(|e| {
            PeftError::Safetensors {
                path: base.weights.first().cloned().unwrap_or_default(),
                reason: e.to_string(),
            }
        })?;
        let base_names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        let prefixed = base_names.iter().any(|n| n == &format!("bert.{PROBE}"));
        if !prefixed && !base_names.iter().any(|n| n == PROBE) {
            return Err(PeftError::MissingTensor {
                key: PROBE.to_string(),
                location: format!("{} (not a BERT checkpoint)", base.spec),
            });
        }
        let new_dtype = st
            .load(
                &if prefixed {
                    format!("bert.{PROBE}")
                } else {
                    PROBE.to_string()
                },
                &Device::Cpu,
            )
            .map(|t| t.dtype())
            .unwrap_or(DType::F32);

        let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
        for name in &base_names {
            let key = if prefixed {
                name.clone()
            } else {
                format!("bert.{name}")
            };
            let stored = st
                .load(name, &Device::Cpu)
                .map_err(|e| PeftError::Safetensors {
                    path: base.weights.first().cloned().unwrap_or_default(),
                    reason: format!("`{name}`: {e}"),
                })?;
            let tensor = match layer_tensors.remove(&key) {
                Some(t) => {
                    if t.dims() != stored.dims() {
                        return Err(PeftError::ShapeMismatch {
                            key,
                            expected: stored.dims().to_vec(),
                            got: t.dims().to_vec(),
                        });
                    }
                    t.to_device(&Device::Cpu)?.to_dtype(stored.dtype())?
                }
                None => stored,
            };
            out.insert(key, tensor);
        }
        // Tensors the base lacks: the classifier (and a pooler it did not have).
        for (key, t) in layer_tensors {
            out.insert(key, t.to_device(&Device::Cpu)?.to_dtype(new_dtype)?);
        }
        drop(st);

        fs::create_dir_all(out_dir).map_err(|e| PeftError::io(out_dir, e))?;
        let tensors: Vec<(String, Tensor)> = out.into_iter().collect();
        let tensor_names = tensors.iter().map(|(n, _)| n.clone()).collect();
        // The weights are renamed into place last, once every other file is written.
        let staged = stage_tensors(out_dir, &tensors, None)?;
        let copied_files = copy_present_files(&base.dir, out_dir, TOKENIZER_FILES.iter().copied())?
            .into_iter()
            .map(|name| out_dir.join(name))
            .collect();
        let config = out_dir.join(CONFIG_FILE);
        write_classification_config(&base.config, &config, labels)?;
        let weights = out_dir.join(WEIGHTS_FILE);
        staged.commit()?;
        Ok(ClassifierExport {
            weights,
            config,
            copied_files,
            tensor_names,
        })
    }

    fn check_no_pending_adapters(&self) -> Result<()> {
        let linears = self.all_linears();
        let names: BTreeSet<String> = linears
            .iter()
            .flat_map(|l| l.handle().adapter_names())
            .collect();
        for l in linears {
            let h = l.handle();
            let adapters = h.adapter_names();
            let merged = h.merged_adapters();
            for n in &names {
                if h.has_adapter(n) && !(adapters.contains(n) && merged.contains(n)) {
                    return Err(PeftError::Unsupported(format!(
                        "`{}` carries adapter `{n}` that is not merged into its weight; export \
                         with BertForSequenceClassification::export_merged (merge_and_unload)",
                        h.name()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Predicted label ids: the argmax of `logits: [B, num_labels]` over the labels.
pub fn predictions(logits: &Tensor) -> Result<Vec<usize>> {
    Ok(logits
        .argmax(D::Minus1)?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|v| v as usize)
        .collect())
}

fn check_labels(labels: &[String], num_labels: usize) -> Result<()> {
    if labels.len() != num_labels {
        return Err(PeftError::config(
            "id2label",
            format!(
                "{} label names for a classifier with {num_labels} labels",
                labels.len()
            ),
        ));
    }
    let unique: BTreeSet<&String> = labels.iter().collect();
    if unique.len() != labels.len() {
        return Err(PeftError::config(
            "label2id",
            format!("label names are not unique: {}", labels.join(", ")),
        ));
    }
    Ok(())
}

/// Writes `out` (atomically): the base `config.json` with `architectures:
/// ["BertForSequenceClassification"]`, `num_labels`, `id2label` (`{"0": name, …}`), `label2id`
/// and `problem_type: "single_label_classification"`; every other field is kept.
pub fn write_classification_config(
    base_config: &Path,
    out: &Path,
    labels: &[String],
) -> Result<()> {
    check_labels(labels, labels.len())?;
    if labels.is_empty() {
        return Err(PeftError::config("id2label", "no label names"));
    }
    let mut value: Value = crate::io::read_json(base_config)?;
    let obj = value.as_object_mut().ok_or_else(|| {
        PeftError::config(
            "config.json",
            format!("{} is not a JSON object", base_config.display()),
        )
    })?;
    let (id2label, label2id) = label_maps(labels);
    obj.insert("architectures".into(), Value::from(vec![ARCHITECTURE]));
    obj.insert("num_labels".into(), Value::from(labels.len()));
    obj.insert("id2label".into(), Value::Object(id2label));
    obj.insert("label2id".into(), Value::Object(label2id));
    obj.insert(
        "problem_type".into(),
        Value::from("single_label_classification"),
    );
    write_json(out, &value)
}

/// transformers' `id2label` (`{"0": name, …}`) and `label2id` (`{name: 0, …}`) for `labels`.
pub fn label_maps(labels: &[String]) -> (Map<String, Value>, Map<String, Value>) {
    let id2label = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), Value::from(l.as_str())))
        .collect();
    let label2id = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), Value::from(i)))
        .collect();
    (id2label, label2id)
}

/// The label names of a classification `config.json` (`id2label`, ordered by id), or `None`
/// when it has none. Ids must be `0..n`.
pub fn labels_from_config(path: &Path) -> Result<Option<Vec<String>>> {
    let value: Value = crate::io::read_json(path)?;
    let Some(map) = value.get("id2label").and_then(Value::as_object) else {
        return Ok(None);
    };
    let mut by_id = BTreeMap::new();
    for (k, v) in map {
        let id: usize = k.parse().map_err(|_| {
            PeftError::config(
                format!("id2label.{k}"),
                format!("not an integer id (in {})", path.display()),
            )
        })?;
        let name = v.as_str().ok_or_else(|| {
            PeftError::config(
                format!("id2label.{k}"),
                format!("not a string (in {})", path.display()),
            )
        })?;
        by_id.insert(id, name.to_string());
    }
    if by_id.keys().copied().ne(0..by_id.len()) {
        return Err(PeftError::config(
            "id2label",
            format!("ids are not 0..{} (in {})", by_id.len(), path.display()),
        ));
    }
    Ok(Some(by_id.into_values().collect()))
}
