//! Data-driven initialisation as methods of the tasks: EVA and CorDA adapters calibrated on
//! texts, with the task's own tokenizer, batching and forward.
//!
//! ```text
//! task.add_eva_adapter(name, lora_config, texts, &EvaInitOptions::default())
//!     texts → calibration batches (the task's tokenizer, ≤ batch_size sequences each,
//!             ≤ max_batches batches, sequences cut to the task's length)
//!     config → made for the task (classification: the classifier in modules_to_save and
//!              task_type SEQ_CLS; causal LM: task_type CAUSAL_LM), init_lora_weights "eva"
//!     data_init::eva::add_eva_adapter(model, name, config, batches, the task's forward)
//!     → CalibrationReport { ranks, batches, tokens, seconds, config, … }
//! task.add_corda_adapter(name, corda_config, texts, &CordaInitOptions::default())
//!     the same with data_init::corda::add_corda_adapter
//! ```
//!
//! The forward is the task model's: `BertForSequenceClassification::forward(ids, mask)` for
//! [`ClassifyTask`], the Llama trunk's `forward_hidden(ids, mask)` (no LM head: no layer after
//! it is calibrated) for [`CausalLmTask`]. A causal-LM text is tokenised without special tokens
//! and packed into sequences of at most the task's `seq_len` (the last, shorter piece kept);
//! [`CausalLmTask::add_eva_adapter_from_examples`] takes ready examples instead, whose prompt
//! tokens (`loss_from`) EVA leaves out when its `use_label_mask` is on (PEFT's label mask).
//! The adapters are exactly those of the `data_init` drivers on the same batches.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::causal_lm::{CausalLmTask, LmExample, TASK_TYPE as CAUSAL_LM};
use super::classify::{ClassifyTask, for_classification};
use crate::adapters::AdapterConfig;
use crate::adapters::corda::{CordaConfig, CordaMethod};
use crate::adapters::lora::{InitLoraWeights, LoraConfig};
use crate::config::{EvaConfig, MethodConfig};
use crate::data::{pad_batch, pad_id};
use crate::data_init::corda::{self, CordaOptions};
use crate::data_init::eva::{self, EvaOptions};
use crate::data_init::{CalibrationBatch, text_batches};
use crate::error::{PeftError, Result};
use crate::model::PeftModel;

/// Sequences per calibration batch unless set (the CLI's `--batch` default).
pub const DEFAULT_CALIBRATION_BATCH: usize = 16;
/// Calibration batches built at most unless set (the CLI's `--calib-batches` default).
pub const DEFAULT_CALIBRATION_BATCHES: usize = 32;

/// Settings of [`ClassifyTask::add_eva_adapter`] and [`CausalLmTask::add_eva_adapter`].
#[derive(Clone, Debug)]
pub struct EvaInitOptions {
    /// Sequences per calibration batch (default [`DEFAULT_CALIBRATION_BATCH`]).
    pub batch_size: usize,
    /// Most calibration batches built from the texts (default
    /// [`DEFAULT_CALIBRATION_BATCHES`]); EVA cycles them until its components converge.
    pub max_batches: usize,
    /// EVA's settings (ρ, τ, whitening, the label mask, scaling); `None` keeps the config's
    /// `eva_config`, or PEFT's defaults when it has none.
    pub eva_config: Option<EvaConfig>,
    /// The pass: the iteration cap, the PCA's SVD and the progress bar.
    pub pass: EvaOptions,
}

impl Default for EvaInitOptions {
    fn default() -> Self {
        Self {
            batch_size: DEFAULT_CALIBRATION_BATCH,
            max_batches: DEFAULT_CALIBRATION_BATCHES,
            eva_config: None,
            pass: EvaOptions::default(),
        }
    }
}

/// Settings of [`ClassifyTask::add_corda_adapter`] and [`CausalLmTask::add_corda_adapter`].
#[derive(Clone, Debug)]
pub struct CordaInitOptions {
    /// Sequences per calibration batch (default [`DEFAULT_CALIBRATION_BATCH`]).
    pub batch_size: usize,
    /// Most calibration batches built from the texts (default
    /// [`DEFAULT_CALIBRATION_BATCHES`]); each runs once.
    pub max_batches: usize,
    /// IPM or KPM; `None` keeps the config's `corda_method`.
    pub corda_method: Option<CordaMethod>,
    /// The pass: the progress bar.
    pub pass: CordaOptions,
}

impl Default for CordaInitOptions {
    fn default() -> Self {
        Self {
            batch_size: DEFAULT_CALIBRATION_BATCH,
            max_batches: DEFAULT_CALIBRATION_BATCHES,
            corda_method: None,
            pass: CordaOptions::default(),
        }
    }
}

/// What a calibrated initialisation did.
#[derive(Clone, Debug)]
pub struct CalibrationReport {
    /// Every targeted linear layer → its rank (EVA: after the redistribution; 0 = no adapter).
    pub ranks: std::collections::BTreeMap<String, usize>,
    /// EVA: targeted layers it cannot initialise (conv2d), given LoRA's standard init.
    pub fallback: Vec<String>,
    /// The layers of each input group with more than one member (one statistic each).
    pub shared_inputs: Vec<Vec<String>>,
    /// Calibration batches built from the texts.
    pub batches: usize,
    /// Counted tokens in them.
    pub tokens: usize,
    /// Batches run through the model after the grouping forward (EVA cycles the batches until
    /// convergence; CorDA runs each once).
    pub forward_passes: usize,
    /// Wall-clock seconds of the calibration and the adapter's creation.
    pub seconds: f64,
    /// The config the adapter was added with (and is saved with).
    pub config: AdapterConfig,
}

impl ClassifyTask {
    /// Adds adapter `name` with EVA's init from a calibration pass over `texts`: `config` is
    /// made for classification (the classifier becomes a `modules_to_save` module), batched
    /// with the task's tokenizer and length. The model's output is unchanged.
    pub fn add_eva_adapter<S: AsRef<str>>(
        &mut self,
        name: &str,
        config: LoraConfig,
        texts: &[S],
        options: &EvaInitOptions,
    ) -> Result<CalibrationReport> {
        self.calibrate(name, config, texts, options)
    }

    /// Adds adapter `name` initialised by CorDA from a calibration pass over `texts` (see
    /// [`add_eva_adapter`](Self::add_eva_adapter) for the batching). The model's output is
    /// unchanged.
    pub fn add_corda_adapter<S: AsRef<str>>(
        &mut self,
        name: &str,
        config: CordaConfig,
        texts: &[S],
        options: &CordaInitOptions,
    ) -> Result<CalibrationReport> {
        self.calibrate(name, config, texts, options)
    }

    /// `config` made for classification, the calibration batches of `texts`, and `C`'s driver
    /// with the classifier's forward.
    fn calibrate<C: Calibrated, S: AsRef<str>>(
        &mut self,
        name: &str,
        config: C,
        texts: &[S],
        options: &C::Options,
    ) -> Result<CalibrationReport> {
        let config = C::from_adapter_config(for_classification(config))?;
        let (batch_size, max_batches) = C::batching(options);
        let batches = self.text_batches(texts, batch_size, max_batches)?;
        C::run(self.model_mut(), name, config, &batches, options, |m, b| {
            m.forward(&b.input_ids, &b.attention_mask).map(|_| ())
        })
    }

    fn text_batches<S: AsRef<str>>(
        &self,
        texts: &[S],
        batch_size: usize,
        max_batches: usize,
    ) -> Result<Vec<CalibrationBatch>> {
        let refs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        text_batches(
            self.tokenizer(),
            &refs,
            batch_size,
            max_batches,
            self.max_len(),
            self.device(),
        )
    }
}

impl CausalLmTask {
    /// Adds adapter `name` with EVA's init from a calibration pass over `texts`, each packed
    /// into sequences of at most the task's `seq_len` tokens; the config gets `task_type`
    /// CAUSAL_LM. The model's output is unchanged.
    pub fn add_eva_adapter<S: AsRef<str>>(
        &mut self,
        name: &str,
        config: LoraConfig,
        texts: &[S],
        options: &EvaInitOptions,
    ) -> Result<CalibrationReport> {
        let examples = self.calibration_examples(texts)?;
        self.calibrate(name, config, &examples, options)
    }

    /// As [`add_eva_adapter`](Self::add_eva_adapter), from examples: with EVA's
    /// `use_label_mask` (the default) only the tokens from each example's `loss_from` on count.
    pub fn add_eva_adapter_from_examples(
        &mut self,
        name: &str,
        config: LoraConfig,
        examples: &[LmExample],
        options: &EvaInitOptions,
    ) -> Result<CalibrationReport> {
        self.calibrate(name, config, examples, options)
    }

    /// Adds adapter `name` initialised by CorDA from a calibration pass over `texts` (packed
    /// as in [`add_eva_adapter`](Self::add_eva_adapter)). The model's output is unchanged.
    pub fn add_corda_adapter<S: AsRef<str>>(
        &mut self,
        name: &str,
        config: CordaConfig,
        texts: &[S],
        options: &CordaInitOptions,
    ) -> Result<CalibrationReport> {
        let examples = self.calibration_examples(texts)?;
        self.calibrate(name, config, &examples, options)
    }

    /// As [`add_corda_adapter`](Self::add_corda_adapter), from examples; every token counts.
    pub fn add_corda_adapter_from_examples(
        &mut self,
        name: &str,
        config: CordaConfig,
        examples: &[LmExample],
        options: &CordaInitOptions,
    ) -> Result<CalibrationReport> {
        self.calibrate(name, config, examples, options)
    }

    /// `config` with `task_type` CAUSAL_LM, the calibration batches of `examples` (masked to
    /// their targets when `C` asks), and `C`'s driver with the trunk's forward.
    fn calibrate<C: Calibrated>(
        &mut self,
        name: &str,
        mut config: C,
        examples: &[LmExample],
        options: &C::Options,
    ) -> Result<CalibrationReport> {
        config.set_task_type(Some(CAUSAL_LM.to_string()));
        let (batch_size, max_batches) = C::batching(options);
        let label_mask = config.label_mask(options);
        let batches = self.lm_batches(examples, batch_size, max_batches, label_mask)?;
        C::run(self.model_mut(), name, config, &batches, options, |m, b| {
            m.forward_hidden(&b.input_ids, Some(&b.attention_mask))
                .map(|_| ())
        })
    }

    /// Each text packed into sequences of at most `seq_len` tokens (the shorter last one kept).
    fn calibration_examples<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<LmExample>> {
        if texts.is_empty() {
            return Err(PeftError::config("calibration data", "no texts"));
        }
        let mut examples = Vec::new();
        for text in texts {
            examples.extend(self.text_examples(text.as_ref(), true)?);
        }
        Ok(examples)
    }

    /// Right-padded batches of `examples`; with `label_mask`, only positions from `loss_from`
    /// on count.
    fn lm_batches(
        &self,
        examples: &[LmExample],
        batch_size: usize,
        max_batches: usize,
        label_mask: bool,
    ) -> Result<Vec<CalibrationBatch>> {
        if batch_size == 0 || max_batches == 0 {
            return Err(PeftError::config(
                "calibration batches",
                format!(
                    "batch size and batch count must be at least 1 (got {batch_size} and \
                     {max_batches})"
                ),
            ));
        }
        let device = self
            .model()
            .layers()
            .first()
            .map(|l| l.device())
            .unwrap_or(Device::Cpu);
        let pad = pad_id(self.tokenizer());
        let mut out = Vec::new();
        for chunk in examples.chunks(batch_size).take(max_batches) {
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|e| e.ids.clone()).collect();
            let b = pad_batch(&seqs, pad, &device)?;
            let mut calib = CalibrationBatch::new(b.input_ids, b.attention_mask);
            if label_mask {
                let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
                let mut mask = vec![0u32; chunk.len() * t];
                for (i, e) in chunk.iter().enumerate() {
                    for pos in e.loss_from..e.ids.len() {
                        mask[i * t + pos] = 1;
                    }
                }
                calib = calib.with_token_mask(Tensor::from_vec(mask, (chunk.len(), t), &device)?);
            }
            out.push(calib);
        }
        if out.is_empty() {
            return Err(PeftError::config(
                "calibration data",
                "no sequences of at least 2 tokens",
            ));
        }
        Ok(out)
    }
}

/// The EVA settings a run uses: the options', else the config's, else PEFT's defaults.
fn eva_settings(config: &LoraConfig, options: &EvaInitOptions) -> EvaConfig {
    options
        .eva_config
        .clone()
        .or_else(|| config.eva_config.clone())
        .unwrap_or_default()
}

fn usable_tokens(batches: &[CalibrationBatch]) -> Result<usize> {
    batches
        .iter()
        .map(CalibrationBatch::usable_tokens)
        .sum::<Result<usize>>()
}

/// What the tasks' calibrated init needs of a method: the config it initialises, its options
/// and its `data_init` driver (EVA on [`LoraConfig`], CorDA on [`CordaConfig`]).
trait Calibrated: MethodConfig + Into<AdapterConfig> + Sized {
    /// The method's [`EvaInitOptions`] or [`CordaInitOptions`].
    type Options;

    /// The config back from [`for_classification`]'s [`AdapterConfig`].
    fn from_adapter_config(config: AdapterConfig) -> Result<Self>;

    /// Sequences per batch and the most batches.
    fn batching(options: &Self::Options) -> (usize, usize);

    /// Whether only the target tokens of causal-LM examples count (EVA's label mask).
    fn label_mask(&self, options: &Self::Options) -> bool;

    /// Runs the driver over `batches` and adds adapter `name`.
    fn run<M>(
        model: &mut PeftModel<M>,
        name: &str,
        config: Self,
        batches: &[CalibrationBatch],
        options: &Self::Options,
        forward: impl FnMut(&M, &CalibrationBatch) -> Result<()>,
    ) -> Result<CalibrationReport>;
}

impl Calibrated for LoraConfig {
    type Options = EvaInitOptions;

    fn from_adapter_config(config: AdapterConfig) -> Result<Self> {
        match config {
            AdapterConfig::Lora(c) => Ok(c),
            _ => Err(PeftError::config("config", "EVA initialises a LoRA config")),
        }
    }

    fn batching(options: &EvaInitOptions) -> (usize, usize) {
        (options.batch_size, options.max_batches)
    }

    fn label_mask(&self, options: &EvaInitOptions) -> bool {
        eva_settings(self, options).use_label_mask
    }

    fn run<M>(
        model: &mut PeftModel<M>,
        name: &str,
        mut config: Self,
        batches: &[CalibrationBatch],
        options: &EvaInitOptions,
        forward: impl FnMut(&M, &CalibrationBatch) -> Result<()>,
    ) -> Result<CalibrationReport> {
        let start = Instant::now();
        config.eva_config = Some(eva_settings(&config, options));
        config.init_lora_weights = InitLoraWeights::Named("eva".into());
        let tokens = usable_tokens(batches)?;
        let report = eva::add_eva_adapter(model, name, config, batches, forward, &options.pass)?;
        Ok(CalibrationReport {
            ranks: report.state.ranks(),
            fallback: report.state.fallback.clone(),
            shared_inputs: report.state.shared_inputs.clone(),
            batches: batches.len(),
            tokens,
            forward_passes: report.state.iterations,
            seconds: start.elapsed().as_secs_f64(),
            config: report.config.into(),
        })
    }
}

impl Calibrated for CordaConfig {
    type Options = CordaInitOptions;

    fn from_adapter_config(config: AdapterConfig) -> Result<Self> {
        match config {
            AdapterConfig::Corda(c) => Ok(c),
            _ => Err(PeftError::config(
                "config",
                "CorDA initialises a CORDA config",
            )),
        }
    }

    fn batching(options: &CordaInitOptions) -> (usize, usize) {
        (options.batch_size, options.max_batches)
    }

    fn label_mask(&self, _: &CordaInitOptions) -> bool {
        false
    }

    fn run<M>(
        model: &mut PeftModel<M>,
        name: &str,
        mut config: Self,
        batches: &[CalibrationBatch],
        options: &CordaInitOptions,
        forward: impl FnMut(&M, &CalibrationBatch) -> Result<()>,
    ) -> Result<CalibrationReport> {
        let start = Instant::now();
        if let Some(method) = options.corda_method {
            config.corda_method = method;
        }
        let tokens = usable_tokens(batches)?;
        let saved = config.clone();
        let state = corda::add_corda_adapter(model, name, config, batches, forward, &options.pass)?;
        let ranks = state
            .factors
            .iter()
            .map(|(layer, f)| Ok((layer.clone(), f.a.dim(0)?)))
            .collect::<Result<_>>()?;
        Ok(CalibrationReport {
            ranks,
            fallback: Vec::new(),
            shared_inputs: state.shared_inputs,
            batches: batches.len(),
            tokens,
            forward_passes: batches.len(),
            seconds: start.elapsed().as_secs_f64(),
            config: saved.into(),
        })
    }
}
