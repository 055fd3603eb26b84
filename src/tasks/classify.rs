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
//! reloaded adapter or merged model predicts the same label names. [`model_labels`] reads them
//! back from a classification export; [`read_labels`] from an adapter folder.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::adapters::AdapterConfig;
use crate::data::{LabeledText, encode_batch, label_tensor, load_tokenizer};
use crate::error::{PeftError, Result};
use crate::io::peft_format::write_atomic;
use crate::io::source::{ModelSource, TOKENIZER_FILE};
use crate::model::{DEFAULT_ADAPTER, PeftModel};
use crate::models::heads::{
    ARCHITECTURE, BertForSequenceClassification, labels_from_config, predictions,
};
use crate::train::{EvalReport, TrainTask};

/// PEFT's `task_type` for sequence classification.
pub const TASK_TYPE: &str = "SEQ_CLS";
/// The head trained whole and saved with the adapter (`modules_to_save`).
pub const CLASSIFIER_MODULE: &str = "classifier";
/// The label names written next to the adapter files.
pub const LABELS_FILE: &str = "labels.json";
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
    /// its own); sequences are cut to `max_len` tokens.
    pub fn new(
        model: ClassifierModel,
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
        Ok(Self {
            model,
            tokenizer,
            max_len,
            device,
            labels,
            eval_batch: DEFAULT_EVAL_BATCH,
        })
    }

    /// Loads a resolved model (a bare `BertModel` such as all-MiniLM-L6-v2, or a
    /// `BertForSequenceClassification` export) in f32 with a classifier for `labels`, and its
    /// `tokenizer.json`. `seed` draws a classifier the checkpoint lacks and seeds the adapters
    /// added later ([`PeftModel::set_seed`]).
    pub fn from_source(
        source: &ModelSource,
        labels: Vec<String>,
        max_len: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if labels.is_empty() {
            return Err(PeftError::config("labels", "no label names"));
        }
        let tokenizer_path = source
            .tokenizer
            .clone()
            .unwrap_or_else(|| source.dir.join(TOKENIZER_FILE));
        let tokenizer = load_tokenizer(&tokenizer_path, max_len)?;
        let (mut model, _) =
            BertForSequenceClassification::from_source(source, labels.len(), seed, device)?;
        model.set_seed(seed);
        Self::new(model, tokenizer, max_len, labels, device.clone())
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

    /// The wrapped model (e.g. for `BertForSequenceClassification::export_merged`).
    pub fn into_model(self) -> ClassifierModel {
        self.model
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

    /// The name of the adapter that [`save_adapter`](TrainTask::save_adapter) writes: the first
    /// active one.
    fn active_adapter(&self) -> Result<String> {
        self.model
            .active_adapters()
            .first()
            .cloned()
            .ok_or_else(|| PeftError::UnknownAdapter {
                adapter: DEFAULT_ADAPTER.to_string(),
                module: String::new(),
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

    /// The active adapter in PEFT's format, plus [`LABELS_FILE`].
    fn save_adapter(&self, dir: &Path) -> Result<()> {
        let name = self.active_adapter()?;
        self.model.save_adapter(&name, dir)?;
        write_labels(dir, &self.labels)
    }

    fn set_training(&self, training: bool) {
        if training {
            self.model.train()
        } else {
            self.model.eval()
        }
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

/// Writes `dir/labels.json` (atomically): `{"id2label": {"0": name, …}, "label2id": {…}}`.
pub fn write_labels(dir: &Path, labels: &[String]) -> Result<()> {
    let (id2label, label2id) = crate::models::heads::label_maps(labels);
    let mut value = serde_json::json!({ "id2label": id2label, "label2id": label2id });
    crate::config::sort_keys(&mut value, &[]);
    let text = serde_json::to_string_pretty(&value)
        .map_err(|e| PeftError::config(LABELS_FILE, e.to_string()))?;
    fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    write_atomic(&dir.join(LABELS_FILE), format!("{text}\n").as_bytes())
}

/// The label names saved next to an adapter (`dir/labels.json`), or `None` when the folder has
/// no such file (e.g. an adapter written by Python PEFT).
pub fn read_labels(dir: &Path) -> Result<Option<Vec<String>>> {
    let path = dir.join(LABELS_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    labels_from_config(&path)
}
