//! The tokenizer a GGUF file's metadata describes, rebuilt with the `tokenizers` crate the way
//! transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=…)` builds it, so that ids agree
//! with transformers token for token.
//!
//! - `tokenizer.ggml.model = "gpt2"` (byte-level BPE): vocabulary and merges from the metadata,
//!   the pre-tokenizer chosen by `tokenizer.ggml.pre` as in the model's own `tokenizer.json`
//!   (SmolLM2's `smollm`: `Digits(individual)` then `ByteLevel(add_prefix_space = false)`;
//!   candle's `TokenizerFromGguf` falls back to GPT-2's pre-tokenizer with a leading space
//!   there, so "Hello" becomes "ĠHello"), a byte-level decoder.
//! - `tokenizer.ggml.model = "llama"` (SentencePiece vocabularies: Gemma, Llama 2, Mistral): a
//!   BPE with byte fallback (`<0x..>` tokens) and `fuse_unk`, whose merges are recovered from the
//!   vocabulary (the file stores none): every split of a token into two vocabulary tokens is a
//!   merge, ranked by the token's score, or for Gemma (`general.architecture` `gemma*`) by the
//!   token's position in the file, since Gemma's scores do not follow its merge order.
//!   - Gemma (transformers' `GemmaTokenizer`): tokens made only of whitespace that contain a
//!     space are respelled with `▁` (`"  "` → `"▁▁"`), the normalizer replaces `" "` by `"▁"`,
//!     the pre-tokenizer splits after each `" "`, no space is prepended.
//!   - Others (transformers' `LlamaTokenizer`): `Metaspace` pre-tokenizer prepending `▁` to the
//!     first word, and a decoder that strips it again.
//!   - `tokenizer.ggml.add_space_prefix` overrides either default (transformers ignores the
//!     key and always uses the class default; files say what their class does).
//! - Both: token type 3 (control) as special tokens, type 4 (user-defined, e.g. Gemma's `"\n"`
//!   runs and HTML tags) as non-special added tokens matched whole, the named special tokens
//!   (`bos`/`eos`/`unk`/`pad`) special too; a template post-processor adding BOS (EOS) when
//!   `tokenizer.ggml.add_bos_token` (`add_eos_token`) says so, which for `llama` vocabularies
//!   defaults to true as in llama.cpp and transformers.
//!
//! [`GgufMetadata`] reads only the metadata, so the tokenizer and chat template of a file whose
//! architecture this crate cannot load as a model are still available.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::{GgufModel, value_u64};
use crate::error::{PeftError, Result};

/// llama-3's pre-tokenizer split (as in its tokenizer.json).
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer split (single digits).
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// SentencePiece's word-boundary marker.
const SPIECE_UNDERLINE: char = '▁';

/// The metadata of a GGUF file, whatever its architecture: enough for its tokenizer and chat
/// template (the tensor directory is read but no tensor data).
#[derive(Debug)]
pub struct GgufMetadata {
    path: PathBuf,
    metadata: HashMap<String, Value>,
}

impl GgufMetadata {
    /// Reads the header of `path`. A file that is not GGUF is [`PeftError::Unsupported`]
    /// naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| PeftError::io(path, e))?;
        let content = Content::read(&mut BufReader::new(file)).map_err(|e| {
            PeftError::Unsupported(format!("{}: not a valid GGUF file: {e}", path.display()))
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            metadata: content.metadata,
        })
    }

    /// The `.gguf` file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's key/value metadata.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.metadata
    }

    /// The tokenizer rebuilt from the metadata (see the module docs).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        self.meta().tokenizer()
    }

    /// A `tokenizer_config.json` for the rebuilt tokenizer (see
    /// [`GgufModel::tokenizer_config_json`]).
    pub fn tokenizer_config_json(&self) -> Result<serde_json::Value> {
        self.meta().tokenizer_config_json()
    }

    /// The chat template (`tokenizer.chat_template`), if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        match self.metadata.get("tokenizer.chat_template") {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    fn meta(&self) -> Meta<'_> {
        Meta {
            path: &self.path,
            md: &self.metadata,
        }
    }
}

impl GgufModel {
    /// The tokenizer rebuilt from the metadata (see the module docs of
    /// `io::gguf::tokenizer`). A file without tokenizer metadata, or with a tokenizer kind or
    /// pre-tokenizer this rebuild does not cover, is an error naming it.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        self.tokenizer_meta().tokenizer()
    }

    /// A `tokenizer_config.json` for the rebuilt tokenizer (special tokens, whether BOS/EOS are
    /// added, chat template, context length), so that transformers' `AutoTokenizer` loads an
    /// export with the same ids.
    pub fn tokenizer_config_json(&self) -> Result<serde_json::Value> {
        self.tokenizer_meta().tokenizer_config_json()
    }

    fn tokenizer_meta(&self) -> Meta<'_> {
        Meta {
            path: self.path(),
            md: self.metadata(),
        }
    }
}

/// Typed access to borrowed metadata, with errors naming the key and the file.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn bad(&self, key: &str, what: &str) -> PeftError {
        PeftError::config(
            key,
            format!("{what} in the GGUF metadata of {}", self.path.display()),
        )
    }

    fn u64(&self, key: &str) -> Result<Option<u64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => value_u64(v)
                .map(Some)
                .ok_or_else(|| self.bad(key, &format!("expected an integer, got {v:?}"))),
        }
    }

    fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.bad(key, &format!("expected a string, got {v:?}"))),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(key, &format!("expected a bool, got {v:?}"))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items.as_slice())),
            Some(_) => Err(self.bad(key, "expected an array")),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.bad(key, &format!("entry {i} is not a string: {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// `tokenizer.ggml.scores`, one float per token.
    fn scores(&self, n: usize) -> Result<Vec<f64>> {
        let key = "tokenizer.ggml.scores";
        let items = self
            .array(key)?
            .ok_or_else(|| self.bad(key, "missing (a `llama` vocabulary needs its scores)"))?;
        if items.len() != n {
            return Err(self.bad(key, &format!("{} scores for {n} tokens", items.len())));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match *v {
                Value::F32(x) => Ok(f64::from(x)),
                Value::F64(x) => Ok(x),
                ref other => Err(self.bad(key, &format!("entry {i} is not a float: {other:?}"))),
            })
            .collect()
    }

    /// `tokenizer.ggml.token_type`, or none when absent.
    fn token_types(&self) -> Result<Option<Vec<Option<u64>>>> {
        Ok(self
            .array("tokenizer.ggml.token_type")?
            .map(|items| items.iter().map(value_u64).collect()))
    }

    fn architecture(&self) -> &str {
        match self.md.get("general.architecture") {
            Some(Value::String(s)) => s.as_str(),
            _ => "",
        }
    }

    fn is_gemma(&self) -> bool {
        matches!(self.architecture(), "gemma" | "gemma2" | "gemma3")
    }

    fn tokens(&self) -> Result<Vec<&str>> {
        self.strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| self.bad("tokenizer.ggml.tokens", "missing"))
    }

    /// The token at the id `key` names, if the key is present and in range.
    fn named_token<'t>(&self, tokens: &[&'t str], key: &str) -> Result<Option<(u32, &'t str)>> {
        Ok(self
            .u64(key)?
            .and_then(|id| tokens.get(id as usize).map(|t| (id as u32, *t))))
    }

    /// Whether BOS is added: the metadata, else true for `llama` vocabularies (llama.cpp's and
    /// transformers' default for SentencePiece files), false otherwise.
    fn add_bos(&self) -> Result<bool> {
        let default = self.str("tokenizer.ggml.model")? == Some("llama");
        Ok(self
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default))
    }

    fn add_eos(&self) -> Result<bool> {
        Ok(self.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false))
    }

    fn tokenizer(&self) -> Result<Tokenizer> {
        let kind = self.str("tokenizer.ggml.model")?.ok_or_else(|| {
            self.bad(
                "tokenizer.ggml.model",
                "no tokenizer (missing `tokenizer.ggml.model`)",
            )
        })?;
        let tokens = self.tokens()?;
        let mut tokenizer = match kind {
            "gpt2" => self.byte_level(&tokens)?,
            "llama" => self.sentencepiece(&tokens)?,
            other => {
                return Err(PeftError::Unsupported(format!(
                    "{}: GGUF tokenizer model `{other}` is not supported (supported: gpt2, \
                     llama); use the Hugging Face folder with its tokenizer.json",
                    self.path.display()
                )));
            }
        };
        self.set_post_processor(&mut tokenizer, &tokens, kind)?;
        self.add_special_tokens(&mut tokenizer, &tokens)?;
        Ok(tokenizer)
    }

    /// Byte-level BPE (`gpt2`): vocabulary, merges and the pre-tokenizer `tokenizer.ggml.pre`
    /// names.
    fn byte_level(&self, tokens: &[&str]) -> Result<Tokenizer> {
        let merges = self
            .strings("tokenizer.ggml.merges")?
            .ok_or_else(|| self.bad("tokenizer.ggml.merges", "missing"))?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| self.bad("tokenizer.ggml.merges", &format!("bad merge `{m}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let pre = self.str("tokenizer.ggml.pre")?.unwrap_or("default");
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let ignore_merges = match self.bool("tokenizer.ggml.ignore_merges")? {
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
        Ok(tokenizer)
    }

    /// A SentencePiece vocabulary (`llama`) as a byte-fallback BPE (see the module docs).
    fn sentencepiece(&self, tokens: &[&str]) -> Result<Tokenizer> {
        if self.architecture() == "phi3" {
            // transformers builds Phi-3's differently (prefix space from a normalizer).
            return Err(PeftError::Unsupported(format!(
                "{}: the SentencePiece tokenizer of GGUF architecture `phi3` is not supported; \
                 use the Hugging Face folder with its tokenizer.json",
                self.path.display()
            )));
        }
        let gemma = self.is_gemma();
        let spelled: Vec<String> = if gemma {
            tokens
                .iter()
                .map(|t| {
                    if t.contains(' ') && t.chars().all(py_isspace) {
                        SPIECE_UNDERLINE.to_string().repeat(t.chars().count())
                    } else {
                        t.to_string()
                    }
                })
                .collect()
        } else {
            tokens.iter().map(|t| t.to_string()).collect()
        };
        let ranks: Vec<f64> = if gemma {
            (0..spelled.len()).map(|i| -(i as f64)).collect()
        } else {
            self.scores(spelled.len())?
        };
        let merges = merges_from_vocab(&spelled, &ranks);
        // A later duplicate wins, as in the Python dict transformers builds.
        let vocab: Vocab = spelled
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .fuse_unk(true)
            .byte_fallback(true);
        if gemma {
            // GemmaTokenizer names its unknown token; LlamaTokenizer's BPE has none.
            let unk = self
                .named_token(tokens, "tokenizer.ggml.unknown_token_id")?
                .map_or("<unk>", |(_, t)| t);
            builder = builder.unk_token(unk.to_string());
        }
        let mut tokenizer = Tokenizer::new(builder.build().map_err(tok_err)?);

        let prefix = self.bool("tokenizer.ggml.add_space_prefix")?;
        let replace_space = || Replace::new(" ", SPIECE_UNDERLINE.to_string()).map_err(tok_err);
        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new(SPIECE_UNDERLINE.to_string(), " ")
                .map_err(tok_err)?
                .into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if gemma {
            let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
            if prefix == Some(true) {
                normalizers.push(Prepend::new(SPIECE_UNDERLINE.to_string()).into());
                decoders.push(Strip::new(' ', 1, 0).into());
            }
            normalizers.push(replace_space()?.into());
            // A lone normalizer stays unwrapped, so that tokenizer.json reads as transformers'.
            if normalizers.len() == 1 {
                let only = normalizers.remove(0);
                tokenizer.with_normalizer(Some(only)).map_err(tok_err)?;
            } else {
                tokenizer
                    .with_normalizer(Some(NormalizerSequence::new(normalizers)))
                    .map_err(tok_err)?;
            }
            let split = Split::new(
                SplitPattern::String(" ".into()),
                SplitDelimiterBehavior::MergedWithPrevious,
                false,
            )
            .map_err(tok_err)?;
            tokenizer.with_pre_tokenizer(Some(split));
        } else {
            let prefix = prefix.unwrap_or(true);
            let scheme = if prefix {
                decoders.push(Strip::new(' ', 1, 0).into());
                PrependScheme::First
            } else {
                PrependScheme::Never
            };
            tokenizer.with_pre_tokenizer(Some(Metaspace::new(SPIECE_UNDERLINE, scheme, false)));
        }
        tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tokenizer)
    }

    /// transformers' `update_post_processor`: `<bos> $A <eos>` with each part as the metadata
    /// says. A byte-level vocabulary without BOS keeps the byte-level post-processor instead.
    fn set_post_processor(
        &self,
        tokenizer: &mut Tokenizer,
        tokens: &[&str],
        kind: &str,
    ) -> Result<()> {
        let bos = self
            .named_token(tokens, "tokenizer.ggml.bos_token_id")?
            .filter(|_| self.add_bos().unwrap_or(false));
        let eos = self
            .named_token(tokens, "tokenizer.ggml.eos_token_id")?
            .filter(|_| self.add_eos().unwrap_or(false));
        // Surface a malformed flag as an error rather than as "not set".
        self.add_bos()?;
        self.add_eos()?;
        if kind == "gpt2" && bos.is_none() && eos.is_none() {
            tokenizer.with_post_processor(Some(
                tokenizers::processors::byte_level::ByteLevel::new(true, false, true),
            ));
            return Ok(());
        }
        let template = |type_id: u32, seq: &str| -> Vec<String> {
            let mut parts: Vec<String> =
                bos.iter().map(|(_, b)| format!("{b}:{type_id}")).collect();
            parts.push(format!("${seq}:{type_id}"));
            parts.extend(eos.iter().map(|(_, e)| format!("{e}:{type_id}")));
            parts
        };
        let single = template(0, "A").join(" ");
        let pair = [template(0, "A"), template(1, "B")].concat().join(" ");
        let special: Vec<(String, u32)> = [bos, eos]
            .into_iter()
            .flatten()
            .map(|(id, s)| (s.to_string(), id))
            .collect();
        let template = TemplateProcessing::builder()
            .try_single(single)
            .map_err(|e| PeftError::config("tokenizer", e))?
            .try_pair(pair)
            .map_err(|e| PeftError::config("tokenizer", e))?
            .special_tokens(special)
            .build()
            .map_err(|e| PeftError::config("tokenizer", e.to_string()))?;
        tokenizer.with_post_processor(Some(template));
        Ok(())
    }

    /// Named special tokens, control tokens (special) and user-defined tokens (added, not
    /// special), all matched whole before the model sees the text.
    fn add_special_tokens(&self, tokenizer: &mut Tokenizer, tokens: &[&str]) -> Result<()> {
        let mut special = Vec::new();
        for key in [
            "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.unknown_token_id",
        ] {
            if let Some((_, t)) = self.named_token(tokens, key)? {
                special.push(AddedToken::from(t, true).normalized(false));
            }
        }
        // GemmaTokenizer's default mask token, when the vocabulary has it (transformers would
        // otherwise grow the vocabulary by one, which no Gemma file needs).
        if self.is_gemma() && tokens.contains(&"<mask>") {
            special.push(AddedToken::from("<mask>", true).normalized(false));
        }
        let mut added = Vec::new();
        let vocab = tokenizer.get_vocab(false);
        if let Some(types) = self.token_types()? {
            for (token, ty) in tokens.iter().zip(types) {
                match ty {
                    Some(TOKEN_TYPE_CONTROL) => {
                        special.push(AddedToken::from(*token, true).normalized(false))
                    }
                    // Only tokens the model knows under this spelling (Gemma's respelled space
                    // runs are not added, as in transformers).
                    Some(TOKEN_TYPE_USER_DEFINED) if vocab.contains_key(*token) => {
                        added.push(AddedToken::from(*token, false).normalized(false))
                    }
                    _ => {}
                }
            }
        }
        tokenizer.add_special_tokens(special).map_err(tok_err)?;
        tokenizer.add_tokens(added).map_err(tok_err)?;
        Ok(())
    }

    fn tokenizer_config_json(&self) -> Result<serde_json::Value> {
        let tokens = self.strings("tokenizer.ggml.tokens")?.unwrap_or_default();
        let mut obj = serde_json::Map::new();
        obj.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        for (name, key) in [
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ] {
            if let Some((_, t)) = self.named_token(&tokens, key)? {
                obj.insert(name.into(), json!(t));
            }
        }
        if self.is_gemma() && tokens.contains(&"<mask>") {
            obj.insert("mask_token".into(), json!("<mask>"));
        }
        obj.insert("add_bos_token".into(), json!(self.add_bos()?));
        obj.insert("add_eos_token".into(), json!(self.add_eos()?));
        obj.insert("clean_up_tokenization_spaces".into(), json!(false));
        let ctx_key = format!("{}.context_length", self.architecture());
        if let Some(ctx) = self.u64(&ctx_key)? {
            obj.insert("model_max_length".into(), json!(ctx));
        }
        if let Some(t) = self.str("tokenizer.chat_template")? {
            obj.insert("chat_template".into(), json!(t));
        }
        Ok(serde_json::Value::Object(obj))
    }
}

fn tok_err(e: tokenizers::Error) -> PeftError {
    PeftError::config("tokenizer", e.to_string())
}

/// Python's `str.isspace` for one character (Rust's `is_whitespace` plus the information
/// separators U+001C..U+001F), which transformers' respelling test uses.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The merges a vocabulary without stored merges implies (transformers'
/// `generate_merges(vocab, vocab_scores)`): every split of a token into two tokens of the
/// vocabulary, best token first (highest `ranks` entry), then the longer left piece first; ties
/// keep the vocabulary's order. A token spelled twice counts once, at its last id, as a Python
/// dict keyed by token would keep it (but in the order of its first appearance).
fn merges_from_vocab(tokens: &[String], ranks: &[f64]) -> Vec<(String, String)> {
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if last.insert(t.as_str(), i).is_none() {
            order.push(t.as_str());
        }
    }
    // (rank, left chars, right chars, left, right)
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for token in order {
        let rank = ranks[last[token]];
        let n = token.chars().count();
        let mut local: Vec<(usize, usize, usize, &str, &str)> = Vec::new();
        for (k, (at, _)) in token.char_indices().enumerate().skip(1) {
            let (l, r) = token.split_at(at);
            if let (Some(&li), Some(&ri)) = (last.get(l), last.get(r)) {
                local.push((li, ri, k, l, r));
            }
        }
        local.sort_by_key(|&(li, ri, ..)| (li, ri));
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, k, l, r)| (rank, k, n - k, l, r)),
        );
    }
    // Python's sorted(..., reverse=True) is stable: equal keys keep their order.
    merges.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.1.cmp(&a.1))
            .then(b.2.cmp(&a.2))
    });
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_rank_tokens_then_longer_left_pieces() {
        let tokens: Vec<String> = ["a", "b", "ab", "abb", "bb"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let ranks: Vec<f64> = (0..tokens.len()).map(|i| -(i as f64)).collect();
        let merges = merges_from_vocab(&tokens, &ranks);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![("a", "b"), ("ab", "b"), ("a", "bb"), ("b", "b")]
        );
    }
}
