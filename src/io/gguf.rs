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
//! - Tokenizer: rebuilt from the metadata in `io::gguf::tokenizer` (byte-level BPE and
//!   SentencePiece vocabularies, as transformers builds them); [`GgufMetadata`] reads it from a
//!   file of any architecture.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;

use crate::error::{PeftError, Result};

mod names;
mod tensors;
mod tokenizer;

pub use tokenizer::GgufMetadata;

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
}
