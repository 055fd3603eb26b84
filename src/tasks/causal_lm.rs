//! Causal language modelling: next-token loss on packed text, or on the responses of
//! instruction pairs, for the Llama family.
//!
//! ```text
//! text data  : the whole file tokenised once (no special tokens), cut into sequences of seq_len
//!              (HF run_clm's group_texts); every token after the first is a target. With a
//!              tokenizer that adds BOS (Gemma): [bos] ++ seq_len − 1 text tokens each, and
//!              every text token is a target
//! JSONL data : one `{"prompt": …, "response": …}` object per line;
//!              ids = [bos] ++ tokens(prompt) ++ tokens(response) ++ [eos], cut to seq_len
//!              (bos only when the tokenizer adds one); only the response's tokens (and the
//!              eos) are targets: the prompt's labels are masked
//! chat data  : the same pairs rendered by the model's chat template as a user turn and an
//!              assistant turn; ids = tokens(user turn + assistant opening) ++ tokens(rest),
//!              special tokens only as the template writes them; the targets are the
//!              assistant's content and the template's end-of-turn text
//! logits     = model(ids[.., :T], attention_mask)                          [B, T, V]
//! loss       = mean over target positions t of −log softmax(logits[b, t−1])[ids[b, t]]
//! perplexity = exp(total loss / total targets) over a data set
//! ```
//!
//! The mean is over the batch's target tokens (HF's token-level mean), so padded positions and
//! masked prompt tokens add nothing. Batches are right-padded to their longest sequence.

use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use tokenizers::Tokenizer;

use crate::adapters::AdapterConfig;
use crate::chat::ChatTemplate;
use crate::data::{PromptResponse, read_jsonl_pairs, read_text, tokenize_and_chunk};
use crate::error::{PeftError, Result};
use crate::generate::{GenerationConfig, generate};
use crate::io::source::{self, ModelSource};
use crate::model::PeftModel;
use crate::models::llama::{LlamaConfig, LlamaForCausalLM, load_causal_tokenizer};
use crate::tasks::{TaskOptions, export_source, save_active};
use crate::train::{EvalReport, TrainTask};

/// PEFT's `task_type` for causal language modelling.
pub const TASK_TYPE: &str = "CAUSAL_LM";
/// The modules a causal-LM adapter targets unless told otherwise (the command line's default):
/// the seven projections of every decoder layer.
pub const DEFAULT_TARGET_MODULES: [&str; 7] = crate::models::llama::LLAMA_TARGET_MODULES;
/// Sequences per forward pass in evaluation.
pub const DEFAULT_EVAL_BATCH: usize = 4;

/// The model being trained.
pub type CausalModel = PeftModel<LlamaForCausalLM>;

/// One training sequence: its token ids and the first position whose token is a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LmExample {
    /// Token ids of the whole sequence.
    pub ids: Vec<u32>,
    /// Tokens at positions `≥ loss_from` (and ≥ 1) are predicted; earlier ones are context only.
    pub loss_from: usize,
}

impl LmExample {
    /// Hugging Face's labels for the sequence: the id where the token is a target, −100 (the
    /// ignored index) where it is context only.
    pub fn labels(&self) -> Vec<i64> {
        self.ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if i < self.loss_from {
                    -100
                } else {
                    i64::from(id)
                }
            })
            .collect()
    }

    /// Number of target tokens.
    pub fn targets(&self) -> usize {
        self.ids.len().saturating_sub(self.loss_from.max(1))
    }
}

/// The outcome of an evaluation: mean loss per target token, its exponential, and the count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LmEval {
    /// Mean cross-entropy per target token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Target tokens evaluated.
    pub tokens: usize,
}

impl LmEval {
    /// As an [`EvalReport`]: `loss`, and the metrics `perplexity` and `tokens`.
    pub fn report(&self) -> EvalReport {
        EvalReport {
            loss: self.loss,
            metrics: [
                ("perplexity".to_string(), self.perplexity),
                ("tokens".to_string(), self.tokens as f64),
            ]
            .into_iter()
            .collect(),
        }
    }
}

/// A Llama-family model with its tokenizer, as a trainable task.
pub struct CausalLmTask {
    model: CausalModel,
    config: LlamaConfig,
    tokenizer: Tokenizer,
    seq_len: usize,
    pad_id: u32,
    /// The special ids the tokenizer puts before a text (its BOS, when it adds one).
    prefix_ids: Vec<u32>,
    device: Device,
    eval_batch: usize,
    /// Where the model came from (`None` for a task built with [`CausalLmTask::new`]).
    source: Option<ModelSource>,
}

impl std::fmt::Debug for CausalLmTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLmTask")
            .field("model", &self.model)
            .field("seq_len", &self.seq_len)
            .finish()
    }
}

impl CausalLmTask {
    /// Loads `spec` (a hub id, an HF folder or a `.gguf` file; see [`source::resolve`]) in f32
    /// with its tokenizer (`tokenizer.json`, or the GGUF file's own). Sequences are cut to
    /// `opts.seq_len` tokens; `opts.seed` seeds the adapters added later.
    pub fn from_pretrained(spec: &str, opts: TaskOptions) -> Result<Self> {
        Self::from_source(source::resolve(spec)?, opts)
    }

    /// [`from_pretrained`](Self::from_pretrained) for a source resolved already.
    pub fn from_source(source: ModelSource, opts: TaskOptions) -> Result<Self> {
        let tokenizer = load_causal_tokenizer(&source)?;
        let (mut model, config) =
            LlamaForCausalLM::from_source(&source, DType::F32, opts.load_options())?;
        model.set_seed(opts.seed);
        let mut task = Self::new(model, config, tokenizer, opts.seq_len, opts.device)?;
        if let Some(n) = opts.eval_batch {
            task = task.with_eval_batch(n);
        }
        task.source = Some(source);
        Ok(task)
    }

    /// A task over `model` (built with `config`) and `tokenizer`: sequences of at most
    /// `seq_len` tokens, on `device`.
    pub fn new(
        model: CausalModel,
        config: LlamaConfig,
        tokenizer: Tokenizer,
        seq_len: usize,
        device: Device,
    ) -> Result<Self> {
        if seq_len < 2 {
            return Err(PeftError::config(
                "seq_len",
                format!("must be at least 2 (one context and one target token), got {seq_len}"),
            ));
        }
        if seq_len > config.max_position_embeddings {
            return Err(PeftError::config(
                "seq_len",
                format!(
                    "{seq_len} is longer than the model's context ({} positions)",
                    config.max_position_embeddings
                ),
            ));
        }
        let pad_id = config
            .pad_token_id
            .or(config.eos_token_ids.first().copied())
            .unwrap_or_else(|| crate::data::pad_id(&tokenizer));
        let probe = tokenizer
            .encode("a", true)
            .map_err(|e| PeftError::config("tokenizer", e.to_string()))?;
        let prefix_ids = probe
            .get_ids()
            .iter()
            .zip(probe.get_special_tokens_mask())
            .take_while(|(_, special)| **special == 1)
            .map(|(id, _)| *id)
            .collect();
        Ok(Self {
            model,
            config,
            tokenizer,
            seq_len,
            pad_id,
            prefix_ids,
            device,
            eval_batch: DEFAULT_EVAL_BATCH,
            source: None,
        })
    }

    /// Sequences per forward pass in evaluation (at least 1).
    pub fn with_eval_batch(mut self, eval_batch: usize) -> Self {
        self.eval_batch = eval_batch.max(1);
        self
    }

    /// The model with its adapters.
    pub fn model(&self) -> &CausalModel {
        &self.model
    }

    /// The model, mutably (to add or switch adapters).
    pub fn model_mut(&mut self) -> &mut CausalModel {
        &mut self.model
    }

    /// The wrapped model.
    pub fn into_model(self) -> CausalModel {
        self.model
    }

    /// Where the model came from; `None` for a task built with [`new`](Self::new).
    pub fn source(&self) -> Option<&ModelSource> {
        self.source.as_ref()
    }

    /// Writes the active adapter to `dir` in PEFT's format, the same files as
    /// `model().save_adapter(dir, active)` (several active adapters: one folder each,
    /// `dir/<name>/`). The [`crate::Trainer`]'s checkpoints write the same.
    pub fn save_adapter(&self, dir: impl AsRef<Path>) -> Result<()> {
        save_active(&self.model, dir.as_ref())
    }

    /// Merges the active adapters into the weights, removes every adapter and writes the merged
    /// model to `out_dir` as a Hugging Face Llama folder in the model's dtype (see
    /// [`LlamaForCausalLM::save_pretrained`]; a GGUF source gets its tokenizer files rebuilt
    /// from the metadata). A task built with [`new`](Self::new) has no source to read the
    /// tokenizer files from: that is an error.
    pub fn export_merged(self, out_dir: impl AsRef<Path>) -> Result<()> {
        let source = export_source(self.source, "CausalLmTask", "LlamaForCausalLM")?;
        let dtype = self.model.model().dtype();
        LlamaForCausalLM::export_merged(self.model, &source, out_dir.as_ref(), dtype)
    }

    /// The model's architecture settings.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Maximum tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Adds a fresh adapter with `task_type` CAUSAL_LM.
    pub fn add_adapter(&mut self, name: &str, config: impl Into<AdapterConfig>) -> Result<()> {
        let mut config = config.into();
        config
            .inner_mut()
            .set_task_type(Some(TASK_TYPE.to_string()));
        self.model.add_adapter(name, config)
    }

    /// Loads a saved PEFT adapter from `dir` as `name`.
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        self.model.load_adapter(dir, name)
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| PeftError::config("tokenizer", e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| PeftError::config("tokenizer", e.to_string()))
    }

    /// Packed sequences of `seq_len` from a text; `keep_partial` keeps the shorter last piece
    /// (for evaluation, so no held-out token is dropped).
    ///
    /// When the tokenizer starts its inputs with BOS (Gemma, Llama 2), every sequence starts
    /// with it and holds `seq_len − 1` text tokens: these models only ever saw text after BOS,
    /// and without it Gemma 3's perplexity on plain English is in the thousands. BOS is context
    /// only, and every text token is a target (the first one predicted from BOS alone).
    /// A tokenizer without BOS (SmolLM2, GPT-2) packs the text as HF's `group_texts` does.
    pub fn text_examples(&self, text: &str, keep_partial: bool) -> Result<Vec<LmExample>> {
        let prefix = &self.prefix_ids;
        let body = self.seq_len.saturating_sub(prefix.len());
        if body == 0 {
            return Err(PeftError::config(
                "seq_len",
                format!(
                    "{} leaves no room for text after the tokenizer's {} leading special token(s)",
                    self.seq_len,
                    prefix.len()
                ),
            ));
        }
        let chunks = tokenize_and_chunk(&self.tokenizer, text, body, keep_partial)?;
        Ok(chunks
            .into_iter()
            .map(|chunk| [prefix.as_slice(), &chunk].concat())
            .filter(|ids| ids.len() >= 2)
            .map(|ids| LmExample { ids, loss_from: 0 })
            .collect())
    }

    /// The ids of a plain prompt as the model is fed it: the tokenizer's leading special
    /// tokens (BOS, when it adds one, as transformers' `tokenizer(prompt)` does), then the text.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = self.prefix_ids.clone();
        ids.extend(self.encode(prompt)?);
        Ok(ids)
    }

    /// The model's own chat template (see [`ChatTemplate::for_source`]). A model without one,
    /// or a task built with [`new`](Self::new) (no source to read it from), is an error naming
    /// the model.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        match &self.source {
            Some(src) => ChatTemplate::for_source(src),
            None => Err(PeftError::Unsupported(
                "this CausalLmTask was built with CausalLmTask::new and has no model source to \
                 read a chat template from"
                    .into(),
            )),
        }
    }

    /// The ids of `prompt` asked as a user turn through `template`, with the generation prompt
    /// (the assistant turn's opening): the rendered text tokenized without added special
    /// tokens, as transformers' `apply_chat_template(…, tokenize=True)` does.
    pub fn chat_prompt_ids(&self, template: &ChatTemplate, prompt: &str) -> Result<Vec<u32>> {
        self.encode(&template.render_prompt(prompt)?)
    }

    /// One example per pair: prompt then response then eos, the prompt masked. A prompt that
    /// leaves no room for a response token within `seq_len` is an error naming the pair.
    pub fn pair_examples(&self, pairs: &[PromptResponse]) -> Result<Vec<LmExample>> {
        let mut out = Vec::with_capacity(pairs.len());
        for (i, pair) in pairs.iter().enumerate() {
            let mut ids = self.prompt_ids(&pair.prompt)?;
            let loss_from = ids.len().max(1);
            if loss_from >= self.seq_len {
                return Err(PeftError::config(
                    "seq_len",
                    format!(
                        "pair {} has a prompt of {} tokens: no room for the response in {} tokens",
                        i + 1,
                        ids.len(),
                        self.seq_len
                    ),
                ));
            }
            ids.extend(self.encode(&pair.response)?);
            if let Some(&eos) = self.config.eos_token_ids.first() {
                ids.push(eos);
            }
            ids.truncate(self.seq_len);
            out.push(LmExample { ids, loss_from });
        }
        Ok(out)
    }

    /// One example per pair rendered by `template` as a user turn and an assistant turn (see
    /// [`ChatTemplate::render_pair`]): the user turn and the assistant turn's opening are
    /// masked, the assistant's content and the template's end of turn are the targets. No eos
    /// is appended: the template writes its own end of turn. A prompt that leaves no room for a
    /// response token within `seq_len` is an error naming the pair.
    pub fn chat_pair_examples(
        &self,
        pairs: &[PromptResponse],
        template: &ChatTemplate,
    ) -> Result<Vec<LmExample>> {
        let mut out = Vec::with_capacity(pairs.len());
        for (i, pair) in pairs.iter().enumerate() {
            let (head, tail) = template.render_pair(&pair.prompt, &pair.response)?;
            let mut ids = self.encode(&head)?;
            let loss_from = ids.len().max(1);
            if loss_from >= self.seq_len {
                return Err(PeftError::config(
                    "seq_len",
                    format!(
                        "pair {} renders to a prompt of {} tokens: no room for the response in \
                         {} tokens",
                        i + 1,
                        ids.len(),
                        self.seq_len
                    ),
                ));
            }
            ids.extend(self.encode(&tail)?);
            ids.truncate(self.seq_len);
            out.push(LmExample { ids, loss_from });
        }
        Ok(out)
    }

    /// Reads a prompt/response JSONL file ([`read_jsonl_pairs`]) as chat examples
    /// ([`chat_pair_examples`](Self::chat_pair_examples)), whatever its extension.
    pub fn read_chat_examples(
        &self,
        path: &Path,
        template: &ChatTemplate,
    ) -> Result<Vec<LmExample>> {
        self.chat_pair_examples(&read_jsonl_pairs(path)?, template)
    }

    /// Reads training or evaluation data: `.jsonl` as prompt/response pairs, anything else as
    /// plain text packed into sequences.
    pub fn read_examples(&self, path: &Path, keep_partial: bool) -> Result<Vec<LmExample>> {
        let is_jsonl = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
        if is_jsonl {
            self.pair_examples(&read_jsonl_pairs(path)?)
        } else {
            self.text_examples(&read_text(path)?, keep_partial)
        }
    }

    /// Input ids, attention mask, flat target-row indices into `[B·T]` and their target ids.
    fn batch_tensors(&self, batch: &[&LmExample]) -> Result<(Tensor, Tensor, Tensor, Vec<u32>)> {
        let t = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        if t < 2 {
            return Err(PeftError::config(
                "batch",
                "every sequence is shorter than 2 tokens",
            ));
        }
        let b = batch.len();
        let mut ids = vec![self.pad_id; b * t];
        let mut mask = vec![0u32; b * t];
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (i, e) in batch.iter().enumerate() {
            ids[i * t..i * t + e.ids.len()].copy_from_slice(&e.ids);
            mask[i * t..i * t + e.ids.len()].fill(1);
            for pos in e.loss_from.max(1)..e.ids.len() {
                // The logits at pos − 1 predict the token at pos.
                rows.push((i * t + pos - 1) as u32);
                targets.push(e.ids[pos]);
            }
        }
        if rows.is_empty() {
            return Err(PeftError::config("batch", "the batch has no target tokens"));
        }
        let n = rows.len();
        Ok((
            Tensor::from_vec(ids, (b, t), &self.device)?,
            Tensor::from_vec(mask, (b, t), &self.device)?,
            Tensor::from_vec(rows, n, &self.device)?,
            targets,
        ))
    }

    /// Mean next-token loss over the batch's targets, and the number of targets.
    pub fn batch_loss(&self, batch: &[&LmExample]) -> Result<(Tensor, usize)> {
        let (ids, mask, rows, targets) = self.batch_tensors(batch)?;
        let model = self.model.model();
        let hidden = model.forward_hidden(&ids, Some(&mask))?;
        let (b, t, h) = hidden.dims3()?;
        // The head runs only on positions that predict a target: padding, masked prompt tokens
        // and each sequence's last position never reach the [rows, vocab] product.
        let picked = hidden.reshape((b * t, h))?.index_select(&rows, 0)?;
        let loss = model.token_losses(&picked, &targets)?.mean_all()?;
        Ok((loss, targets.len()))
    }

    /// Loss and perplexity over `examples`, in eval mode, in batches.
    pub fn evaluate_lm(&self, examples: &[LmExample]) -> Result<LmEval> {
        let was_training = self.model.is_training();
        self.model.eval();
        let result = (|| -> Result<LmEval> {
            let mut total = 0f64;
            let mut tokens = 0usize;
            for chunk in examples.chunks(self.eval_batch) {
                let refs: Vec<&LmExample> = chunk.iter().collect();
                let (loss, n) = self.batch_loss(&refs)?;
                total += loss.detach().to_dtype(DType::F64)?.to_scalar::<f64>()? * n as f64;
                tokens += n;
            }
            if tokens == 0 {
                return Err(PeftError::config(
                    "eval data",
                    "no target tokens to evaluate",
                ));
            }
            let loss = total / tokens as f64;
            Ok(LmEval {
                loss,
                perplexity: loss.exp(),
                tokens,
            })
        })();
        if was_training {
            self.model.train();
        }
        result
    }

    /// Generates a continuation of `prompt` ([`prompt_ids`](Self::prompt_ids)) with the active
    /// adapters (eval mode); returns the new text only.
    pub fn generate_text(&self, prompt: &str, config: &GenerationConfig) -> Result<String> {
        let ids = self.generate_ids(&self.prompt_ids(prompt)?, config)?;
        self.decode(&ids)
    }

    /// Generates up to `config.max_new_tokens` ids after `prompt_ids` with the active adapters
    /// (eval mode); returns the new ids only (a stop token ends generation and is not included).
    pub fn generate_ids(&self, prompt_ids: &[u32], config: &GenerationConfig) -> Result<Vec<u32>> {
        let was_training = self.model.is_training();
        self.model.eval();
        let result = generate(self.model.model(), prompt_ids, config);
        if was_training {
            self.model.train();
        }
        result
    }

    /// The model's end-of-sequence tokens (generation stops at any of them).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.config.eos_token_ids
    }

    /// Logits `[B, T, V]` for a batch of id sequences (right-padded, masked).
    pub fn logits(&self, seqs: &[Vec<u32>]) -> Result<Tensor> {
        let examples: Vec<LmExample> = seqs
            .iter()
            .map(|ids| LmExample {
                ids: ids.clone(),
                loss_from: 0,
            })
            .collect();
        let refs: Vec<&LmExample> = examples.iter().collect();
        let (ids, mask, _, _) = self.batch_tensors(&refs)?;
        self.model.model().forward(&ids, Some(&mask))
    }
}

impl TrainTask for CausalLmTask {
    type Example = LmExample;

    fn loss(&self, batch: &[&LmExample]) -> Result<(Tensor, usize)> {
        self.batch_loss(batch)
    }

    fn evaluate(&self, examples: &[LmExample]) -> Result<EvalReport> {
        Ok(self.evaluate_lm(examples)?.report())
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.model.trainable_vars()
    }

    /// The active adapter (see [`CausalLmTask::save_adapter`]).
    fn save_adapter(&self, dir: &Path) -> Result<()> {
        save_active(&self.model, dir)
    }

    fn check_trainable(&self) -> Result<()> {
        self.model.check_trainable()
    }

    fn set_training(&self, training: bool) {
        if training {
            self.model.train();
        } else {
            self.model.eval();
        }
    }

    fn rng_states(&self) -> std::collections::BTreeMap<String, String> {
        crate::train::adapter_rng_states(&self.model)
    }

    fn restore_rng_states(
        &self,
        states: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        crate::train::restore_adapter_rng_states(&self.model, states)
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

/// Index of the largest logit in each row of `[N, V]` logits.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}
