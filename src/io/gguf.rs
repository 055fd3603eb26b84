//! GGUF model files (llama.cpp's format) as Hugging Face models: the metadata becomes a
//! `config.json`, the tensors are dequantised to f32 and renamed, and the tokenizer is rebuilt
//! from the metadata.
//!
//! - Architectures: `llama` (Llama, Mistral, SmolLM2 → `LlamaForCausalLM`), `qwen2`
//!   (`Qwen2ForCausalLM`, q/k/v bias) and `gemma3` (`Gemma3ForCausalLM`; the sliding layers'
//!   RoPE base, `query_pre_attn_scalar` and the 5:1 sliding/full pattern are not in the file and
//!   take transformers' defaults). Anything else is [`PeftError::Unsupported`] naming it.
//! - Names: `token_embd` → `model.embed_tokens`, `output_norm` → `model.norm`, `output` →
//!   `lm_head` (absent: tied embeddings), `blk.N.attn_{q,k,v,output}` →
//!   `model.layers.N.self_attn.{q,k,v,o}_proj`, `blk.N.ffn_{gate,up,down}` →
//!   `model.layers.N.mlp.{gate,up,down}_proj`, `blk.N.attn_norm` → `input_layernorm`,
//!   `blk.N.ffn_norm` → `post_attention_layernorm` (`.weight` and `.bias` alike); Gemma 3's
//!   norms as [`hf_tensor_name_for`] lists them. llama.cpp stores Gemma's norm weights as
//!   `1 + w`: the Hugging Face tensors get `w` back (as transformers' GGUF loader does).
//! - q/k un-permute (`llama` only): llama.cpp's converter reorders the rows of each q/k head from
//!   Hugging Face's half-split RoPE layout to interleaved pairs,
//!   `W.reshape(n_head, 2, d/2, in).swap(1, 2)`; the inverse is
//!   `W.reshape(n_head, d/2, 2, in).swap(1, 2).reshape(out, in)` with `n_head` the query heads
//!   for q and the key/value heads for k. `qwen2` and `gemma3` files keep the Hugging Face
//!   layout.
//! - Tokenizer (`tokenizer.ggml.model = "gpt2"`, byte-level BPE): vocabulary and merges from the
//!   metadata, the pre-tokenizer chosen by `tokenizer.ggml.pre` as in the model's own
//!   `tokenizer.json` (SmolLM2's `smollm`: `Digits(individual)` then
//!   `ByteLevel(add_prefix_space = false)`; candle's `TokenizerFromGguf` falls back to GPT-2's
//!   pre-tokenizer with a leading space there, so "Hello" becomes "ĠHello"), a byte-level
//!   decoder, token type 3 (control) as special tokens and type 4 (user-defined) as added tokens,
//!   and a BOS template when `tokenizer.ggml.add_bos_token` is set.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{PeftError, Result};

mod names;
mod tensors;

pub use names::{hf_tensor_name, hf_tensor_name_for, permute_qk, unpermute_qk};

/// A GGUF architecture this loader maps to a Hugging Face one.
#[derive(Debug)]
struct GgufArch {
    name: &'static str,
    hf_architecture: &'static str,
    model_type: &'static str,
    /// q/k rows permuted for interleaved RoPE by llama.cpp's converter.
    permuted_qk: bool,
}

const GGUF_ARCHS: &[GgufArch] = &[
    GgufArch {
        name: "llama",
        hf_architecture: "LlamaForCausalLM",
        model_type: "llama",
        permuted_qk: true,
    },
    GgufArch {
        name: "qwen2",
        hf_architecture: "Qwen2ForCausalLM",
        model_type: "qwen2",
        permuted_qk: false,
    },
    GgufArch {
        name: "gemma3",
        hf_architecture: "Gemma3ForCausalLM",
        model_type: "gemma3_text",
        permuted_qk: false,
    },
];

/// transformers' `Gemma3TextConfig` defaults for what a `gemma3` GGUF does not store: the RoPE
/// base of the sliding layers, `query_pre_attn_scalar` and the sliding/full layer pattern
/// (every 6th layer full), as transformers' GGUF loader takes them.
const GEMMA3_LOCAL_ROPE_THETA: f64 = 10_000.0;
const GEMMA3_QUERY_PRE_ATTN_SCALAR: u64 = 256;
const GEMMA3_SLIDING_WINDOW_PATTERN: u64 = 6;

/// llama-3's pre-tokenizer split (as in its tokenizer.json).
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer split (single digits).
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// An open GGUF file: its metadata and tensor directory (tensor data is read on demand).
#[derive(Debug)]
pub struct GgufModel {
    path: PathBuf,
    content: Content,
    arch: &'static GgufArch,
}

/// A metadata number as u64 (any integer type).
fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// A metadata float as f64; an f32 is read through its shortest decimal form (1e-5, not
/// 9.99999974e-6), which is what the Hugging Face config it came from said.
fn value_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => x.to_string().parse().ok(),
        Value::F64(x) => Some(x),
        _ => value_u64(v).map(|n| n as f64),
    }
}

impl GgufModel {
    /// Reads the header of `path`. A file that is not GGUF, or whose architecture is not
    /// supported, is [`PeftError::Unsupported`] naming the file (and the architecture).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| PeftError::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            PeftError::Unsupported(format!("{}: not a valid GGUF file: {e}", path.display()))
        })?;
        let name = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(PeftError::config(
                    "general.architecture",
                    format!("missing from the GGUF metadata of {}", path.display()),
                ));
            }
        };
        let arch = GGUF_ARCHS.iter().find(|a| a.name == name).ok_or_else(|| {
            let supported: Vec<&str> = GGUF_ARCHS.iter().map(|a| a.name).collect();
            PeftError::Unsupported(format!(
                "{}: GGUF architecture `{name}` is not supported (supported: {})",
                path.display(),
                supported.join(", ")
            ))
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            arch,
        })
    }

    /// The `.gguf` file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `general.architecture` (`llama`, `qwen2`, `gemma3`).
    pub fn architecture(&self) -> &str {
        self.arch.name
    }

    /// The file's key/value metadata.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The parsed header: metadata, tensor directory and where tensor data starts.
    pub(crate) fn content(&self) -> &Content {
        &self.content
    }

    /// The head count llama.cpp permuted the rows of GGUF tensor `name` with (the query heads
    /// for `attn_q`, the key/value heads for `attn_k`; see the module docs), or `None` when its
    /// rows are in Hugging Face's order.
    pub fn qk_permutation_heads(&self, name: &str) -> Result<Option<usize>> {
        if !self.arch.permuted_qk {
            return Ok(None);
        }
        let heads = || -> Result<usize> { Ok(self.arch_u64("attention.head_count")? as usize) };
        if name.contains(".attn_q.") {
            return heads().map(Some);
        }
        if name.contains(".attn_k.") {
            let key = format!("{}.attention.head_count_kv", self.arch.name);
            return match self.meta_u64(&key)? {
                Some(v) => Ok(Some(v as usize)),
                None => heads().map(Some),
            };
        }
        Ok(None)
    }

    /// The Hugging Face name of GGUF tensor `gguf` for this file's architecture (see
    /// [`hf_tensor_name_for`]), or `None`.
    pub fn hf_tensor_name(&self, gguf: &str) -> Option<String> {
        hf_tensor_name_for(self.arch.name, gguf)
    }

    /// Whether llama.cpp stored the norm weights as `1 + w` (Gemma: its converter adds the
    /// 1 that Gemma's RMSNorm applies; the Hugging Face tensors hold `w`).
    pub(crate) fn norms_offset_by_one(&self) -> bool {
        self.arch.name == "gemma3"
    }

    /// The GGUF tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn bad_meta(&self, key: &str, what: &str) -> PeftError {
        PeftError::config(
            key,
            format!("{what} in the GGUF metadata of {}", self.path.display()),
        )
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => value_u64(v)
                .map(Some)
                .ok_or_else(|| self.bad_meta(key, &format!("expected an integer, got {v:?}"))),
        }
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => value_f64(v)
                .map(Some)
                .ok_or_else(|| self.bad_meta(key, &format!("expected a number, got {v:?}"))),
        }
    }

    fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.bad_meta(key, &format!("expected a string, got {v:?}"))),
        }
    }

    fn meta_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad_meta(key, &format!("expected a bool, got {v:?}"))),
        }
    }

    /// `<arch>.<key>`, required.
    fn arch_u64(&self, key: &str) -> Result<u64> {
        let full = format!("{}.{key}", self.arch.name);
        self.meta_u64(&full)?
            .ok_or_else(|| self.bad_meta(&full, "missing"))
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn string_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.meta(key) else {
            return Ok(None);
        };
        let Value::Array(items) = v else {
            return Err(self.bad_meta(key, "expected an array of strings"));
        };
        items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.bad_meta(key, &format!("non-string entry {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The Hugging Face `config.json` this file's metadata describes.
    pub fn hf_config(&self) -> Result<serde_json::Value> {
        let a = self.arch.name;
        if self.has_tensor("rope_freqs.weight") {
            return Err(PeftError::Unsupported(format!(
                "{}: per-frequency RoPE factors (`rope_freqs.weight`, llama-3.1 scaling) are not \
                 supported for GGUF files; use the Hugging Face folder",
                self.path.display()
            )));
        }
        let heads = self.arch_u64("attention.head_count")?;
        let kv_heads = self
            .meta_u64(&format!("{a}.attention.head_count_kv"))?
            .unwrap_or(heads);
        let eps_key = format!("{a}.attention.layer_norm_rms_epsilon");
        let eps = self
            .meta_f64(&eps_key)?
            .ok_or_else(|| self.bad_meta(&eps_key, "missing"))?;
        let vocab = match self.meta_u64(&format!("{a}.vocab_size"))? {
            Some(v) => v as usize,
            None => match self.string_array("tokenizer.ggml.tokens")? {
                Some(tokens) => tokens.len(),
                None => self
                    .content
                    .tensor_infos
                    .get("token_embd.weight")
                    .map(|t| t.shape.dims()[0])
                    .ok_or_else(|| self.bad_meta(&format!("{a}.vocab_size"), "missing"))?,
            },
        };
        let rope_scaling = match self.meta_str(&format!("{a}.rope.scaling.type"))? {
            None | Some("none") => serde_json::Value::Null,
            Some("linear") => {
                let key = format!("{a}.rope.scaling.factor");
                let factor = self
                    .meta_f64(&key)?
                    .ok_or_else(|| self.bad_meta(&key, "missing for linear scaling"))?;
                json!({"rope_type": "linear", "type": "linear", "factor": factor})
            }
            Some(other) => {
                return Err(PeftError::Unsupported(format!(
                    "{}: RoPE scaling `{other}` is not supported (supported: linear)",
                    self.path.display()
                )));
            }
        };
        let mut cfg = json!({
            "architectures": [self.arch.hf_architecture],
            "model_type": self.arch.model_type,
            "hidden_act": "silu",
            "hidden_size": self.arch_u64("embedding_length")?,
            "intermediate_size": self.arch_u64("feed_forward_length")?,
            "num_hidden_layers": self.arch_u64("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "rms_norm_eps": eps,
            "rope_theta": self.meta_f64(&format!("{a}.rope.freq_base"))?.unwrap_or(10_000.0),
            "rope_scaling": rope_scaling,
            "max_position_embeddings":
                self.meta_u64(&format!("{a}.context_length"))?.unwrap_or(2048),
            "vocab_size": vocab,
            "tie_word_embeddings": !self.has_tensor("output.weight"),
        });
        let obj = cfg
            .as_object_mut()
            .ok_or_else(|| PeftError::config("config.json", "internal: not an object"))?;
        if let Some(d) = self.meta_u64(&format!("{a}.attention.key_length"))? {
            obj.insert("head_dim".into(), json!(d));
        }
        for (hf, gguf) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(id) = self.meta_u64(gguf)? {
                obj.insert(hf.into(), json!(id));
            }
        }
        if self.arch.name == "qwen2" {
            obj.insert("use_sliding_window".into(), json!(false));
        }
        if self.arch.name == "gemma3" {
            obj.remove("hidden_act");
            obj.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            obj.insert(
                "rope_local_base_freq".into(),
                json!(GEMMA3_LOCAL_ROPE_THETA),
            );
            obj.insert(
                "query_pre_attn_scalar".into(),
                json!(GEMMA3_QUERY_PRE_ATTN_SCALAR),
            );
            obj.insert(
                "sliding_window_pattern".into(),
                json!(GEMMA3_SLIDING_WINDOW_PATTERN),
            );
            let key = format!("{a}.attention.sliding_window");
            let window = self
                .meta_u64(&key)?
                .ok_or_else(|| self.bad_meta(&key, "missing"))?;
            obj.insert("sliding_window".into(), json!(window));
        }
        Ok(cfg)
    }

    /// The chat template (`tokenizer.chat_template`), if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        match self.meta("tokenizer.chat_template") {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    /// The tokenizer rebuilt from the metadata (see the module docs). A file without tokenizer
    /// metadata, or with a tokenizer kind this rebuild does not cover, is an error naming it.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let kind = self.meta_str("tokenizer.ggml.model")?.ok_or_else(|| {
            self.bad_meta(
                "tokenizer.ggml.model",
                "no tokenizer (missing `tokenizer.ggml.model`)",
            )
        })?;
        if kind != "gpt2" {
            return Err(PeftError::Unsupported(format!(
                "{}: GGUF tokenizer model `{kind}` is not supported (only byte-level BPE, `gpt2`); \
                 use the Hugging Face folder with its tokenizer.json",
                self.path.display()
            )));
        }
        let tokens = self
            .string_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| self.bad_meta("tokenizer.ggml.tokens", "missing"))?;
        let merges = self
            .string_array("tokenizer.ggml.merges")?
            .ok_or_else(|| self.bad_meta("tokenizer.ggml.merges", "missing"))?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        self.bad_meta("tokenizer.ggml.merges", &format!("bad merge `{m}`"))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let pre = self.meta_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let tok_err = |e: tokenizers::Error| PeftError::config("tokenizer", e.to_string());

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let ignore_merges = match self.meta_bool("tokenizer.ggml.ignore_merges")? {
            Some(v) => v,
            None => matches!(pre, "llama3" | "llama-bpe"),
        };
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(tok_err)?;
        let mut tokenizer = Tokenizer::new(bpe);

        let split = |regex: &str| -> Result<PreTokenizerWrapper> {
            let s = Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tok_err)?;
            Ok(s.into())
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            "default" | "gpt2" | "gpt-2" => ByteLevel::new(false, true, true).into(),
            "llama3" | "llama-bpe" | "smaug-bpe" => Sequence::new(vec![
                split(REGEX_LLAMA3)?,
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
            "qwen2" => {
                tokenizer.with_normalizer(Some(NFC)).map_err(tok_err)?;
                Sequence::new(vec![
                    split(REGEX_QWEN2)?,
                    ByteLevel::new(false, false, false).into(),
                ])
                .into()
            }
            other => {
                return Err(PeftError::Unsupported(format!(
                    "{}: GGUF pre-tokenizer `{other}` is not supported (supported: smollm, gpt2, \
                     llama-bpe, qwen2); use the Hugging Face folder with its tokenizer.json",
                    self.path.display()
                )));
            }
        };
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

        let token_at = |key: &str| -> Result<Option<(u32, String)>> {
            Ok(self
                .meta_u64(key)?
                .and_then(|id| tokens.get(id as usize).map(|t| (id as u32, t.to_string()))))
        };
        let add_bos = self
            .meta_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false);
        match token_at("tokenizer.ggml.bos_token_id")? {
            Some((id, bos)) if add_bos => {
                let template = TemplateProcessing::builder()
                    .try_single(format!("{bos} $A"))
                    .map_err(|e| PeftError::config("tokenizer", e))?
                    .try_pair(format!("{bos} $A {bos} $B:1"))
                    .map_err(|e| PeftError::config("tokenizer", e))?
                    .special_tokens(vec![(bos.clone(), id)])
                    .build()
                    .map_err(|e| PeftError::config("tokenizer", e.to_string()))?;
                tokenizer.with_post_processor(Some(template));
            }
            _ => {
                tokenizer.with_post_processor(Some(
                    tokenizers::processors::byte_level::ByteLevel::new(true, false, true),
                ));
            }
        }

        let mut special = Vec::new();
        let mut added = Vec::new();
        match self.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(types)) => {
                for (id, ty) in types.iter().enumerate() {
                    let Some(token) = tokens.get(id) else { break };
                    match value_u64(ty) {
                        Some(TOKEN_TYPE_CONTROL) => special.push(AddedToken::from(*token, true)),
                        Some(TOKEN_TYPE_USER_DEFINED) => {
                            added.push(AddedToken::from(*token, false))
                        }
                        _ => {}
                    }
                }
            }
            _ => {
                for key in [
                    "tokenizer.ggml.bos_token_id",
                    "tokenizer.ggml.eos_token_id",
                    "tokenizer.ggml.padding_token_id",
                    "tokenizer.ggml.unknown_token_id",
                ] {
                    if let Some((_, t)) = token_at(key)? {
                        special.push(AddedToken::from(t, true));
                    }
                }
            }
        }
        tokenizer.add_special_tokens(special).map_err(tok_err)?;
        tokenizer.add_tokens(added).map_err(tok_err)?;
        Ok(tokenizer)
    }

    /// A `tokenizer_config.json` for the rebuilt tokenizer (special tokens, chat template,
    /// context length), so that transformers' `AutoTokenizer` loads an export.
    pub fn tokenizer_config_json(&self) -> Result<serde_json::Value> {
        let tokens = self
            .string_array("tokenizer.ggml.tokens")?
            .unwrap_or_default();
        let mut obj = serde_json::Map::new();
        obj.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        for (name, key) in [
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ] {
            if let Some(t) = self.meta_u64(key)?.and_then(|id| tokens.get(id as usize)) {
                obj.insert(name.into(), json!(t));
            }
        }
        obj.insert(
            "add_bos_token".into(),
            json!(
                self.meta_bool("tokenizer.ggml.add_bos_token")?
                    .unwrap_or(false)
            ),
        );
        obj.insert(
            "add_eos_token".into(),
            json!(
                self.meta_bool("tokenizer.ggml.add_eos_token")?
                    .unwrap_or(false)
            ),
        );
        obj.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(ctx) = self.meta_u64(&format!("{}.context_length", self.arch.name))? {
            obj.insert("model_max_length".into(), json!(ctx));
        }
        if let Some(t) = self.chat_template() {
            obj.insert("chat_template".into(), json!(t));
        }
        Ok(serde_json::Value::Object(obj))
    }
}
