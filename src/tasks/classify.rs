//! Sequence classification: transformers' `BertForSequenceClassification` fine-tuned with an
//! adapter on its trunk and the classifier trained whole (`modules_to_save`), as HF PEFT does for
//! `task_type="SEQ_CLS"`.
//!
//! ```text
//! batch      = tokenizer(texts) with [CLS]/[SEP], ≤ max_len tokens, padded to the batch's
//!              longest sequence (dynamic padding; the tokenizer file's own padding is removed)
//! logits     = model(input_ids, attention_mask)                         [B, num_labels]
//! loss       = mean_i −log softmax(logits_i)[y_i]                       (training: cross-entropy)
//! prediction = argmax_c logits_i[c]
//! ```
//!
//! [`ClassifyTask`] implements [`TrainTask`] over [`LabeledText`] examples (from
//! [`crate::data::read_tsv`]): `loss` is the mean cross-entropy of the batch and counts its real
//! (non-padding) tokens; `evaluate` runs in eval mode (no dropout) in batches of
//! [`DEFAULT_EVAL_BATCH`] and reports the mean per-example loss and the metrics `accuracy` and
//! `examples`; `save_adapter` writes the active adapter in PEFT's format plus [`LABELS_FILE`].
//!
//! Labels: the model's classes are named by a label list (`labels[id]`). It is written next to the
//! adapter as `labels.json` (`{"id2label": {"0": name, …}, "label2id": {name: 0, …}}`; PEFT
//! ignores the file) and into a merged export's `config.json` (`id2label` / `label2id`), so a
//! reloaded adapter or merged model predicts the same label names. The task hands the file to its
//! [`PeftModel`] ([`PeftModel::set_adapter_file`]), so the task's `save_adapter` and the model's
//! write the same files. [`model_labels`] reads the names back from a classification export,
//! [`read_labels`] from an adapter folder, and [`known_labels`] from either.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::adapters::AdapterConfig;
use crate::data::{LabeledText, encode_batch, label_tensor, load_tokenizer};
use crate::error::{PeftError, Result};
use crate::io::export::read_safetensors_header;
use crate::io::peft_format::{WEIGHTS_NAME, write_atomic};
use crate::io::source::{self, ModelSource, TOKENIZER_FILE};
use crate::model::{DEFAULT_ADAPTER, PeftModel};
use crate::models::heads::{
    ARCHITECTURE, BertForSequenceClassification, labels_from_config, predictions,
};
use crate::tasks::{TaskOptions, export_source, save_active};
use crate::train::{EvalReport, TrainTask};

/// PEFT's `task_type` for sequence classification.
pub const TASK_TYPE: &str = "SEQ_CLS";
/// The modules a classification adapter targets unless told otherwise (the command line's
/// default, and PEFT's for BERT): every attention `query` and `value` projection.
pub const DEFAULT_TARGET_MODULES: [&str; 2] = ["query", "value"];
/// The head trained whole and saved with the adapter (`modules_to_save`).
pub const CLASSIFIER_MODULE: &str = "classifier";
/// The label names written next to the adapter files.
pub const LABELS_FILE: &str = "labels.json";

/// The name of the classifier dropout's RNG state in checkpoints.
const HEAD_DROPOUT: &str = "classifier.dropout";
/// Examples per forward pass in evaluation and prediction.
pub const DEFAULT_EVAL_BATCH: usize = 64;

/// The model being classified with.
pub type ClassifierModel = PeftModel<BertForSequenceClassification>;

/// A `BertForSequenceClassification` with its tokenizer and label names, as a trainable task.
pub struct ClassifyTask {
    model: ClassifierModel,
    tokenizer: Tokenizer,
    max_len: usize,
    device: Device,
    labels: Vec<String>,
    eval_batch: usize,
    /// Where the model came from (`None` for a task built with [`ClassifyTask::new`]).
    source: Option<ModelSource>,
}

/// The outcome of [`ClassifyTask::evaluate_full`].
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifyEval {
    /// `correct / examples`.
    pub accuracy: f64,
    /// Mean cross-entropy over the examples.
    pub loss: f64,
    /// Examples evaluated.
    pub examples: usize,
    /// Examples whose predicted label is the true one.
    pub correct: usize,
    /// Predicted label id of each example, in order.
    pub predictions: Vec<usize>,
}

impl ClassifyEval {
    /// As an [`EvalReport`]: `loss`, and the metrics `accuracy` and `examples`.
    pub fn report(&self) -> EvalReport {
        EvalReport {
            loss: self.loss,
            metrics: BTreeMap::from([
                ("accuracy".to_string(), self.accuracy),
                ("examples".to_string(), self.examples as f64),
            ]),
        }
    }
}

impl std::fmt::Debug for ClassifyTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassifyTask")
            .field("model", &self.model)
            .field("max_len", &self.max_len)
            .field("labels", &self.labels)
            .field("eval_batch", &self.eval_batch)
            .finish()
    }
}

impl ClassifyTask {
    /// Wraps a loaded model. `labels` name its classes (`labels[id]`) and must number as many as
    /// the classifier has outputs; `tokenizer` should come from [`load_tokenizer`] (no padding of
    /// its own); sequences are cut to `max_len` tokens. Every adapter the model saves from now on
    /// carries [`LABELS_FILE`].
    pub fn new(
        mut model: ClassifierModel,
        tokenizer: Tokenizer,
        max_len: usize,
        labels: Vec<String>,
        device: Device,
    ) -> Result<Self> {
        let n = model.model().num_labels();
        if labels.len() != n {
            return Err(PeftError::config(
                "labels",
                format!(
                    "{} label names for a classifier with {n} outputs",
                    labels.len()
                ),
            ));
        }
        if max_len == 0 {
            return Err(PeftError::config("max_len", "must be at least 1, got 0"));
        }
        crate::data::check_max_len(max_len, model.model().config().max_position_embeddings)?;
        model.set_adapter_file(LABELS_FILE, labels_json(&labels)?)?;
        Ok(Self {
            model,
            tokenizer,
            max_len,
            device,
            labels,
            eval_batch: DEFAULT_EVAL_BATCH,
            source: None,
        })
    }

    /// Loads `spec` (a hub id or a folder; see [`source::resolve`]): a bare `BertModel` such as
    /// all-MiniLM-L6-v2, or a `BertForSequenceClassification` export, in f32 with a classifier
    /// for `labels` (`labels[id]` names class `id`), and its `tokenizer.json`. `opts.seq_len`
    /// cuts the examples; `opts.seed` draws a classifier the checkpoint lacks and seeds the
    /// adapters added later ([`PeftModel::set_seed`]).
    pub fn from_pretrained<L: Into<String>>(
        spec: &str,
        labels: impl IntoIterator<Item = L>,
        opts: TaskOptions,
    ) -> Result<Self> {
        Self::from_source(source::resolve(spec)?, labels, opts)
    }

    /// [`from_pretrained`](Self::from_pretrained) for a source resolved already.
    pub fn from_source<L: Into<String>>(
        source: ModelSource,
        labels: impl IntoIterator<Item = L>,
        opts: TaskOptions,
    ) -> Result<Self> {
        let labels: Vec<String> = labels.into_iter().map(Into::into).collect();
        if labels.is_empty() {
            return Err(PeftError::config("labels", "no label names"));
        }
        require_bert_folder(&source)?;
        let tokenizer_path = source
            .tokenizer
            .clone()
            .unwrap_or_else(|| source.dir.join(TOKENIZER_FILE));
        let tokenizer = load_tokenizer(&tokenizer_path, opts.seq_len)?;
        let (mut model, _) = BertForSequenceClassification::from_source(
            &source,
            labels.len(),
            opts.seed,
            opts.load_options(),
        )?;
        model.set_seed(opts.seed);
        let mut task = Self::new(model, tokenizer, opts.seq_len, labels, opts.device)?;
        if let Some(n) = opts.eval_batch {
            task = task.with_eval_batch(n);
        }
        task.source = Some(source);
        Ok(task)
    }

    /// Examples per forward pass in [`evaluate_full`](Self::evaluate_full) and
    /// [`predict`](Self::predict) (at least 1).
    pub fn with_eval_batch(mut self, eval_batch: usize) -> Self {
        self.eval_batch = eval_batch.max(1);
        self
    }

    /// The model (encoder, adapters and classifier).
    pub fn model(&self) -> &ClassifierModel {
        &self.model
    }

    /// The model, mutably (to add or switch adapters).
    pub fn model_mut(&mut self) -> &mut ClassifierModel {
        &mut self.model
    }

    /// The wrapped model.
    pub fn into_model(self) -> ClassifierModel {
        self.model
    }

    /// Where the model came from; `None` for a task built with [`new`](Self::new).
    pub fn source(&self) -> Option<&ModelSource> {
        self.source.as_ref()
    }

    /// Writes the active adapter to `dir` in PEFT's format plus [`LABELS_FILE`]: the same files
    /// as `model().save_adapter(dir, active)` (several active adapters: one folder each,
    /// `dir/<name>/`). The [`crate::Trainer`]'s checkpoints write the same.
    pub fn save_adapter(&self, dir: impl AsRef<Path>) -> Result<()> {
        save_active(&self.model, dir.as_ref())
    }

    /// Merges the active adapters (and the trained classifier) into the weights, removes every
    /// adapter and writes a transformers `BertForSequenceClassification` folder to `out_dir`,
    /// labels in its `config.json` (see [`BertForSequenceClassification::save_pretrained`]).
    /// A task built with [`new`](Self::new) has no source to read the base tensors from: that is
    /// an error.
    pub fn export_merged(self, out_dir: impl AsRef<Path>) -> Result<()> {
        let source = export_source(self.source, "ClassifyTask", "BertForSequenceClassification")?;
        BertForSequenceClassification::export_merged(self.model, &source, out_dir, &self.labels)?;
        Ok(())
    }

    /// Label names; `labels()[id]` names label id `id`.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The tokenizer the examples are encoded with.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Maximum tokens per example, special tokens included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Adds a fresh adapter `name` made for classification by [`for_classification`] (the
    /// classifier becomes a `modules_to_save` module).
    pub fn add_adapter(&mut self, name: &str, config: impl Into<AdapterConfig>) -> Result<()> {
        self.model.add_adapter(name, for_classification(config))
    }

    /// Loads a PEFT adapter folder as adapter `name` (its saved classifier replaces the model's).
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        self.model.load_adapter(dir, name)
    }

    /// Logits `[B, num_labels]` of `texts` in one batch (the model's current mode).
    pub fn logits(&self, texts: &[&str]) -> Result<Tensor> {
        let batch = encode_batch(&self.tokenizer, texts, self.max_len, &self.device)?;
        self.model
            .model()
            .forward(&batch.input_ids, &batch.attention_mask)
    }

    /// Predicted label ids of `texts`, in eval mode, in batches.
    pub fn predict(&self, texts: &[&str]) -> Result<Vec<usize>> {
        let _mode = EvalMode::enter(&self.model);
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.eval_batch) {
            out.extend(predictions(&self.logits(chunk)?.detach())?);
        }
        Ok(out)
    }

    /// Accuracy, mean loss and predictions over `examples`, in eval mode, in batches. An empty
    /// `examples` is an error; a label id outside the classifier's range too.
    pub fn evaluate_full(&self, examples: &[LabeledText]) -> Result<ClassifyEval> {
        if examples.is_empty() {
            return Err(PeftError::config("eval examples", "none were given"));
        }
        let n_labels = self.labels.len();
        if let Some(e) = examples.iter().find(|e| e.label >= n_labels) {
            return Err(PeftError::config(
                "labels",
                format!(
                    "label id {} of `{}` is outside the classifier's {n_labels} labels",
                    e.label, e.text
                ),
            ));
        }
        let _mode = EvalMode::enter(&self.model);
        let mut loss_sum = 0.0f64;
        let mut correct = 0usize;
        let mut preds = Vec::with_capacity(examples.len());
        for chunk in examples.chunks(self.eval_batch) {
            let texts: Vec<&str> = chunk.iter().map(|e| e.text.as_str()).collect();
            let ids: Vec<usize> = chunk.iter().map(|e| e.label).collect();
            let logits = self.logits(&texts)?.detach();
            let targets = label_tensor(&ids, &self.device)?;
            // Per-example −log p(y): log-softmax, then the target column.
            let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?;
            loss_sum -= picked.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            let p = predictions(&logits)?;
            correct += p.iter().zip(&ids).filter(|(a, b)| a == b).count();
            preds.extend(p);
        }
        let n = examples.len();
        Ok(ClassifyEval {
            accuracy: correct as f64 / n as f64,
            loss: loss_sum / n as f64,
            examples: n,
            correct,
            predictions: preds,
        })
    }
}

/// Eval mode for as long as it lives; the previous mode comes back on drop.
struct EvalMode<'a> {
    model: &'a ClassifierModel,
    was_training: bool,
}

impl<'a> EvalMode<'a> {
    fn enter(model: &'a ClassifierModel) -> Self {
        let was_training = model.is_training();
        model.eval();
        Self {
            model,
            was_training,
        }
    }
}

impl Drop for EvalMode<'_> {
    fn drop(&mut self) {
        if self.was_training {
            self.model.train();
        }
    }
}

impl TrainTask for ClassifyTask {
    type Example = LabeledText;

    fn loss(&self, batch: &[&LabeledText]) -> Result<(Tensor, usize)> {
        let texts: Vec<&str> = batch.iter().map(|e| e.text.as_str()).collect();
        let ids: Vec<usize> = batch.iter().map(|e| e.label).collect();
        let encoded = encode_batch(&self.tokenizer, &texts, self.max_len, &self.device)?;
        let logits = self
            .model
            .model()
            .forward(&encoded.input_ids, &encoded.attention_mask)?;
        let targets = label_tensor(&ids, &self.device)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        Ok((loss, encoded.tokens))
    }

    fn evaluate(&self, examples: &[LabeledText]) -> Result<EvalReport> {
        Ok(self.evaluate_full(examples)?.report())
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.model.trainable_vars()
    }

    /// The active adapter in PEFT's format, plus [`LABELS_FILE`] (see
    /// [`ClassifyTask::save_adapter`]).
    fn save_adapter(&self, dir: &Path) -> Result<()> {
        save_active(&self.model, dir)
    }

    fn check_trainable(&self) -> Result<()> {
        self.model.check_trainable()
    }

    fn set_training(&self, training: bool) {
        if training {
            self.model.train()
        } else {
            self.model.eval()
        }
    }

    /// The adapters' dropout RNGs and the classifier dropout's (`classifier.dropout`).
    fn rng_states(&self) -> BTreeMap<String, String> {
        let mut states = crate::train::adapter_rng_states(&self.model);
        let head = crate::train::encode_rng(&self.model.model().dropout_rng());
        states.insert(HEAD_DROPOUT.to_string(), head);
        states
    }

    fn restore_rng_states(&self, states: &BTreeMap<String, String>) -> Result<()> {
        crate::train::restore_adapter_rng_states(&self.model, states)?;
        if let Some(v) = states.get(HEAD_DROPOUT) {
            let rng = crate::train::decode_rng(HEAD_DROPOUT, v)?;
            self.model.model().set_dropout_rng(rng);
        }
        Ok(())
    }

    fn lora_pairs(&self) -> Result<Vec<crate::optim::LoraPair>> {
        crate::optim::lora_pairs(&self.model)
    }

    fn no_weight_decay_vars(&self) -> Vec<String> {
        self.model.no_weight_decay_vars()
    }

    fn regularization_loss(&self) -> Result<Option<Tensor>> {
        self.model.regularization_loss()
    }
}

/// `config` made for sequence classification: [`CLASSIFIER_MODULE`] added to `modules_to_save`
/// (unless an entry already names it) and `task_type` set to [`TASK_TYPE`].
pub fn for_classification(config: impl Into<AdapterConfig>) -> AdapterConfig {
    let mut config = config.into();
    {
        let to_save = config
            .targeting_mut()
            .modules_to_save
            .get_or_insert_with(Vec::new);
        if !to_save.iter().any(|m| m == CLASSIFIER_MODULE) {
            to_save.push(CLASSIFIER_MODULE.to_string());
        }
        config
            .inner_mut()
            .set_task_type(Some(TASK_TYPE.to_string()));
    }
    config
}

/// The label names of a classification export (`config.json` whose `architectures` lists
/// `BertForSequenceClassification` and that has `id2label`), or `None` for any other model
/// (e.g. a bare `BertModel`, whose classifier is created fresh). transformers' placeholder names
/// (`LABEL_0`, `LABEL_1`, … in id order) carry no meaning and are read as the integer labels
/// `0`, `1`, …, so data labelled by id matches them.
pub fn model_labels(source: &ModelSource) -> Result<Option<Vec<String>>> {
    require_bert_folder(source)?;
    let path = &source.config;
    let value: Value = crate::io::read_json(path)?;
    let is_classifier = value
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(ARCHITECTURE)));
    if !is_classifier {
        return Ok(None);
    }
    let labels = labels_from_config(path)?;
    Ok(labels.map(|labels| {
        let placeholders = labels
            .iter()
            .enumerate()
            .all(|(i, l)| *l == format!("LABEL_{i}"));
        if placeholders {
            (0..labels.len()).map(|i| i.to_string()).collect()
        } else {
            labels
        }
    }))
}

/// A classification model comes as a Hugging Face folder: a GGUF file (a llama.cpp causal LM)
/// is refused with a message saying so, instead of failing to read it as JSON.
fn require_bert_folder(source: &ModelSource) -> Result<()> {
    if source.kind == crate::io::source::SourceKind::Gguf {
        return Err(PeftError::Unsupported(format!(
            "{} is a GGUF file (a llama.cpp causal language model), not a BERT classification \
             model; classification needs a Hugging Face folder with config.json, \
             model.safetensors and tokenizer.json (e.g. sentence-transformers/all-MiniLM-L6-v2)",
            source.spec
        )));
    }
    Ok(())
}

/// The text of [`LABELS_FILE`]: `{"id2label": {"0": name, …}, "label2id": {…}}`, pretty-printed.
pub fn labels_json(labels: &[String]) -> Result<String> {
    let (id2label, label2id) = crate::models::heads::label_maps(labels);
    let mut value = serde_json::json!({ "id2label": id2label, "label2id": label2id });
    crate::config::sort_keys(&mut value, &[]);
    let text = serde_json::to_string_pretty(&value)
        .map_err(|e| PeftError::config(LABELS_FILE, e.to_string()))?;
    Ok(format!("{text}\n"))
}

/// Writes `dir/labels.json` (atomically): [`labels_json`].
pub fn write_labels(dir: &Path, labels: &[String]) -> Result<()> {
    let text = labels_json(labels)?;
    fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    write_atomic(&dir.join(LABELS_FILE), text.as_bytes())
}

/// The label names saved next to an adapter (`dir/labels.json`), or `None` when the folder has
/// no such file (e.g. an adapter written by Python PEFT).
pub fn read_labels(dir: &Path) -> Result<Option<Vec<String>>> {
    let path = dir.join(LABELS_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let labels = labels_from_config(&path)?;
    if let Some(l) = &labels {
        crate::data::check_label2id(&path, l)?;
    }
    Ok(labels)
}

/// The label names a model brings, for reading data against them: the adapter's
/// [`LABELS_FILE`] when `adapter` is given and has one, else the `id2label` of `model` when it
/// is a classification export ([`model_labels`]), else `None` (the data defines them).
pub fn known_labels(model: &str, adapter: Option<&Path>) -> Result<Option<Vec<String>>> {
    if let Some(labels) = adapter.map(read_labels).transpose()?.flatten() {
        return Ok(Some(labels));
    }
    model_labels(&source::resolve(model)?)
}

/// Output rows of the classifier saved in the adapter folder `dir` (read from the safetensors
/// header, no tensor loaded), or `None` when the adapter saved no classifier.
pub fn adapter_num_labels(dir: &Path) -> Result<Option<usize>> {
    let header = read_safetensors_header(&dir.join(WEIGHTS_NAME))?;
    let suffixes = [
        format!(".{CLASSIFIER_MODULE}.weight"),
        format!(".{CLASSIFIER_MODULE}.modules_to_save.{DEFAULT_ADAPTER}.weight"),
    ];
    Ok(header
        .tensors
        .iter()
        .find(|(k, _)| suffixes.iter().any(|s| k.ends_with(s.as_str())))
        .and_then(|(_, info)| info.shape.first().copied()))
}
