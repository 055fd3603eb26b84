//! Training and evaluation data: labelled TSV for classification, plain text for causal LM, and
//! tokenised batches with dynamic padding.
//!
//! **TSV** ([`read_tsv`], [`read_tsv_with_labels`]): one example per line, `label<TAB>text`
//! (the text is everything after the first tab, so it may itself contain tabs; surrounding
//! whitespace is trimmed; `\r\n` line ends are accepted; blank lines are skipped). The first line
//! is a *header* and skipped when
//! - it reads `sentence<TAB>label` or `text<TAB>label` (GLUE's column order): then every row is
//!   `text<TAB>label`, split at the *last* tab; or
//! - its label field cannot be a label of this file: it is not in the given label set, occurs as
//!   the label of no other line, and either is a header word (`label`, `labels`, `target`,
//!   `class`, `category`, `y`, `sentiment`, `polarity`, `gold_label`; any case) or is not an
//!   integer while every label (the given ones, or those of the other lines) is one.
//!
//! Labels map to ids through a label list (id = index). [`read_tsv`] infers it: when every label
//! is a non-negative integer the labels are used as ids as they are (names `"0"`, `"1"`, …,
//! `"max"`); otherwise the list is the sorted unique label strings. [`read_tsv_with_labels`] takes
//! the list (e.g. the training set's, for eval data): a label that is not in it is an error.
//!
//! Every bad row is a [`PeftError::Data`] naming the file and the 1-based line: no tab
//! (`label<TAB>text` expected), an empty label, an empty text, an unknown label, invalid UTF-8.
//! A file without examples is an error too (line 0 stands for the file as a whole).
//!
//! **Causal LM** ([`read_text`], [`tokenize_and_chunk`], [`chunk_ids`]): the whole file is one
//! text; it is tokenised at once *without* special tokens and without truncation, and the ids
//! are cut into consecutive sequences of `seq_len` (HF `run_clm`'s `group_texts`). The last,
//! shorter piece is dropped unless `keep_partial` is set; a text too short for even one sequence
//! is then an error rather than an empty data set.
//!
//! **Instruction data** ([`read_jsonl_pairs`]): JSON Lines, one object per line with string
//! fields `prompt` and `response` (other fields are ignored; blank lines are skipped). A line
//! that is not a JSON object, lacks either field, or has an empty `response` is an error naming
//! the line; so is a file without pairs.
//!
//! **Batches** ([`load_tokenizer`], [`encode_batch`], [`pad_batch`]): a tokenizer loaded with
//! [`load_tokenizer`] has its file's padding removed (all-MiniLM-L6-v2's `tokenizer.json` ships
//! `padding: Fixed(128)`) and truncation set to `max_len`. [`encode_batch`] pads each batch only
//! to its longest sequence (right padding, with the tokenizer's pad id) and returns the attention
//! mask (1 = token, 0 = padding). It does not depend on the tokenizer's own settings: tokenizer
//! padding is stripped through the tokenizer's mask, and a sequence longer than `max_len` is cut
//! keeping its trailing special tokens (`[SEP]`), as tokenizers' own truncation does.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::{PostProcessor, Tokenizer, TruncationParams};

use crate::error::{PeftError, Result};

/// One classification example: a label id and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabeledText {
    /// Label id (an index into the data set's label names).
    pub label: usize,
    /// The example's text.
    pub text: String,
}

/// A labelled data set: the examples in file order and the label names (id = index).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabeledDataset {
    /// The examples, in file order.
    pub examples: Vec<LabeledText>,
    /// Label names; `labels[id]` is the name of id `id`.
    pub labels: Vec<String>,
    /// Whether the first line was a header (and skipped).
    pub header: bool,
}

impl LabeledDataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Number of label names.
    pub fn num_labels(&self) -> usize {
        self.labels.len()
    }

    /// The texts, borrowed, in example order (for [`encode_batch`]).
    pub fn texts(&self) -> Vec<&str> {
        self.examples.iter().map(|e| e.text.as_str()).collect()
    }

    /// The label ids, in example order.
    pub fn label_ids(&self) -> Vec<usize> {
        self.examples.iter().map(|e| e.label).collect()
    }
}

fn data_error(path: &Path, line: usize, reason: impl Into<String>) -> PeftError {
    PeftError::Data {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

/// Header words for the label column (compared case-insensitively).
const LABEL_HEADERS: &[&str] = &[
    "label",
    "labels",
    "target",
    "class",
    "category",
    "y",
    "sentiment",
    "polarity",
    "gold_label",
];
/// Header words for the text column.
const TEXT_HEADERS: &[&str] = &["sentence", "text", "sentence1", "review", "content"];

fn is_header_word(field: &str, words: &[&str]) -> bool {
    words.iter().any(|w| field.eq_ignore_ascii_case(w))
}

fn is_integer(field: &str) -> bool {
    !field.is_empty() && field.bytes().all(|b| b.is_ascii_digit())
}

/// The non-blank lines of a file: `(1-based line number, content without the line end)`.
fn read_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let bytes = std::fs::read(path).map_err(|e| PeftError::io(path, e))?;
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = std::str::from_utf8(raw).map_err(|e| {
            data_error(
                path,
                i + 1,
                format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
            )
        })?;
        // A byte-order mark on the first line is not part of the label.
        let line = if i == 0 {
            line.strip_prefix('\u{feff}').unwrap_or(line)
        } else {
            line
        };
        if !line.trim().is_empty() {
            out.push((i + 1, line.to_string()));
        }
    }
    Ok(out)
}

/// Column order of a TSV file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Columns {
    /// `label<TAB>text`, split at the first tab.
    LabelFirst,
    /// `text<TAB>label`, split at the last tab.
    LabelLast,
}

/// `(label, text)` of a row, both trimmed, or the reason the row is bad.
fn split_row(line: &str, columns: Columns) -> std::result::Result<(&str, &str), String> {
    let split = match columns {
        Columns::LabelFirst => line.split_once('\t'),
        Columns::LabelLast => line.rsplit_once('\t').map(|(t, l)| (l, t)),
    };
    let Some((label, text)) = split else {
        return Err(match columns {
            Columns::LabelFirst => "expected `label<TAB>text`, found no tab (missing label?)",
            Columns::LabelLast => "expected `text<TAB>label`, found no tab (missing label?)",
        }
        .to_string());
    };
    let (label, text) = (label.trim(), text.trim());
    if label.is_empty() {
        return Err("missing label (the label field is empty)".to_string());
    }
    if text.is_empty() {
        return Err(format!("empty text (label `{label}`)"));
    }
    Ok((label, text))
}

/// Label id of `name` in `labels` (also `7` for `"07"` when the labels are integers).
fn resolve_label(labels: &[String], name: &str) -> Option<usize> {
    if let Some(i) = labels.iter().position(|l| l == name) {
        return Some(i);
    }
    if is_integer(name) {
        let n: usize = name.parse().ok()?;
        return labels
            .iter()
            .position(|l| is_integer(l) && l.parse::<usize>().ok() == Some(n));
    }
    None
}

/// Decides whether the first line is a header, and the column order.
fn detect_header(lines: &[(usize, String)], given: Option<&[String]>) -> (bool, Columns) {
    let Some((_, first)) = lines.first() else {
        return (false, Columns::LabelFirst);
    };
    // GLUE's `sentence<TAB>label`.
    if let Some((text, label)) = first.rsplit_once('\t') {
        let text_head = text.split('\t').next().unwrap_or(text).trim();
        if is_header_word(label.trim(), LABEL_HEADERS) && is_header_word(text_head, TEXT_HEADERS) {
            return (true, Columns::LabelLast);
        }
    }
    let Some((field, _)) = first.split_once('\t') else {
        return (false, Columns::LabelFirst);
    };
    let field = field.trim();
    if field.is_empty() {
        return (false, Columns::LabelFirst);
    }
    let others: Vec<&str> = lines[1..]
        .iter()
        .filter_map(|(_, l)| l.split_once('\t').map(|(label, _)| label.trim()))
        .collect();
    if others.contains(&field) {
        return (false, Columns::LabelFirst);
    }
    let header = match given {
        Some(labels) => {
            resolve_label(labels, field).is_none()
                && (is_header_word(field, LABEL_HEADERS)
                    || (!is_integer(field) && labels.iter().all(|l| is_integer(l))))
        }
        None => {
            is_header_word(field, LABEL_HEADERS)
                || (!is_integer(field)
                    && !others.is_empty()
                    && others.iter().all(|l| is_integer(l)))
        }
    };
    (header, Columns::LabelFirst)
}

/// Reads a labelled TSV file, inferring the label list (see the module docs).
pub fn read_tsv(path: impl AsRef<Path>) -> Result<LabeledDataset> {
    read_tsv_impl(path.as_ref(), None)
}

/// Reads a labelled TSV file whose labels must be in `labels` (id = index); e.g. eval data with
/// the training set's label list. A label outside the list is an error naming file and line.
pub fn read_tsv_with_labels(path: impl AsRef<Path>, labels: &[String]) -> Result<LabeledDataset> {
    let path = path.as_ref();
    if labels.is_empty() {
        return Err(data_error(path, 0, "the given label list is empty"));
    }
    read_tsv_impl(path, Some(labels))
}

fn read_tsv_impl(path: &Path, given: Option<&[String]>) -> Result<LabeledDataset> {
    let lines = read_lines(path)?;
    if lines.is_empty() {
        return Err(data_error(path, 0, "no examples: the file is empty"));
    }
    let (header, columns) = detect_header(&lines, given);
    let rows_from = usize::from(header);
    let mut rows: Vec<(usize, &str, &str)> = Vec::with_capacity(lines.len());
    for (line_no, line) in &lines[rows_from..] {
        let (label, text) = split_row(line, columns).map_err(|r| data_error(path, *line_no, r))?;
        rows.push((*line_no, label, text));
    }
    if rows.is_empty() {
        return Err(data_error(
            path,
            lines[0].0,
            "no examples: the file has only a header line",
        ));
    }
    let labels: Vec<String> = match given {
        Some(labels) => labels.to_vec(),
        None => infer_labels(&rows),
    };
    let mut examples = Vec::with_capacity(rows.len());
    for (line_no, label, text) in rows {
        let id = resolve_label(&labels, label).ok_or_else(|| {
            data_error(
                path,
                line_no,
                format!(
                    "unknown label `{label}` (known labels: {})",
                    labels.join(", ")
                ),
            )
        })?;
        examples.push(LabeledText {
            label: id,
            text: text.to_string(),
        });
    }
    Ok(LabeledDataset {
        examples,
        labels,
        header,
    })
}

/// Integer labels as they are (`0..=max`), else the sorted unique label strings.
fn infer_labels(rows: &[(usize, &str, &str)]) -> Vec<String> {
    let ints: Option<Vec<usize>> = rows
        .iter()
        .map(|(_, l, _)| {
            if is_integer(l) {
                l.parse::<usize>().ok()
            } else {
                None
            }
        })
        .collect();
    match ints.and_then(|v| v.into_iter().max()) {
        Some(max) => (0..=max).map(|i| i.to_string()).collect(),
        None => rows
            .iter()
            .map(|(_, l, _)| l.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    }
}

/// Checks a labels file's `label2id` (when it has one) against the label names its `id2label`
/// gives (`labels[id]`): every name maps back to its id, and both maps name the same labels.
/// The error names the file and the label that disagrees.
pub fn check_label2id(path: &Path, labels: &[String]) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| PeftError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    let Some(label2id) = value.get("label2id") else {
        return Ok(());
    };
    let bad = |label: &str, reason: String| {
        PeftError::config(
            format!("label2id.{label}"),
            format!("{reason} (in {})", path.display()),
        )
    };
    let map = label2id
        .as_object()
        .ok_or_else(|| bad("", "label2id is not an object".into()))?;
    for (name, id) in map {
        let id = id
            .as_u64()
            .or_else(|| id.as_str().and_then(|s| s.parse().ok()))
            .ok_or_else(|| bad(name, format!("`{id}` is not an integer id")))?;
        match labels.get(id as usize) {
            Some(n) if n == name => {}
            Some(n) => {
                return Err(bad(
                    name,
                    format!("label2id maps `{name}` to {id}, but id2label names id {id} `{n}`"),
                ));
            }
            None => {
                return Err(bad(
                    name,
                    format!(
                        "label2id maps `{name}` to {id}, but id2label has ids 0..{} only",
                        labels.len()
                    ),
                ));
            }
        }
    }
    if let Some(missing) = labels.iter().find(|l| !map.contains_key(l.as_str())) {
        return Err(bad(
            missing,
            format!("id2label names `{missing}`, which label2id lacks"),
        ));
    }
    Ok(())
}

/// `max_len` tokens per example (special tokens included) must fit the model's
/// `max_position_embeddings`; the error (field `seq_len`, the CLI's `--seq`) names both.
pub fn check_max_len(max_len: usize, max_positions: usize) -> Result<()> {
    if max_len > max_positions {
        return Err(PeftError::config(
            "seq_len",
            format!("{max_len} is longer than the model's context ({max_positions} positions)"),
        ));
    }
    Ok(())
}

/// Reads a UTF-8 text file for causal-LM training. A file with no text (empty or whitespace
/// only) is an error; invalid UTF-8 is an error naming the line.
pub fn read_text(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| PeftError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|b| **b == b'\n').count() + 1;
        data_error(path, line, "invalid UTF-8")
    })?;
    if text.trim().is_empty() {
        return Err(data_error(path, 0, "no text: the file is empty"));
    }
    Ok(text)
}

/// One instruction example: the loss covers only the response's tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptResponse {
    /// The instruction; context only, never a target.
    pub prompt: String,
    /// The answer; its tokens are the targets.
    pub response: String,
}

/// Reads a JSONL file of `{"prompt": …, "response": …}` objects.
pub fn read_jsonl_pairs(path: impl AsRef<Path>) -> Result<Vec<PromptResponse>> {
    let path = path.as_ref();
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| data_error(path, line_no, format!("invalid JSON: {e}")))?;
        let field = |name: &str| -> Result<String> {
            match value.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(data_error(
                    path,
                    line_no,
                    format!("field `{name}` is not a string"),
                )),
                None => Err(data_error(
                    path,
                    line_no,
                    format!("missing field `{name}` (each line needs `prompt` and `response`)"),
                )),
            }
        };
        if !value.is_object() {
            return Err(data_error(path, line_no, "not a JSON object"));
        }
        let prompt = field("prompt")?;
        let response = field("response")?;
        if response.is_empty() {
            return Err(data_error(path, line_no, "empty `response`"));
        }
        out.push(PromptResponse { prompt, response });
    }
    if out.is_empty() {
        return Err(data_error(path, 0, "no prompt/response pairs in the file"));
    }
    Ok(out)
}

/// Cuts `ids` into consecutive sequences of `seq_len`. The last, shorter piece is kept only with
/// `keep_partial`. `seq_len` 0 gives no sequences.
pub fn chunk_ids(ids: &[u32], seq_len: usize, keep_partial: bool) -> Vec<Vec<u32>> {
    if seq_len == 0 {
        return Vec::new();
    }
    ids.chunks(seq_len)
        .filter(|c| keep_partial || c.len() == seq_len)
        .map(<[u32]>::to_vec)
        .collect()
}

/// Tokenises the whole `text` (no special tokens, no truncation, no padding, whatever the
/// tokenizer's settings) and cuts the ids into sequences of `seq_len` ([`chunk_ids`]). No
/// sequence at all (a text shorter than `seq_len` tokens without `keep_partial`) is an error.
pub fn tokenize_and_chunk(
    tokenizer: &Tokenizer,
    text: &str,
    seq_len: usize,
    keep_partial: bool,
) -> Result<Vec<Vec<u32>>> {
    if seq_len == 0 {
        return Err(PeftError::config("seq_len", "must be at least 1, got 0"));
    }
    let mut tok = tokenizer.clone();
    tok.with_padding(None);
    tok.with_truncation(None).map_err(tokenizer_error)?;
    let encoding = tok.encode(text, false).map_err(tokenizer_error)?;
    let ids = encoding.get_ids();
    let chunks = chunk_ids(ids, seq_len, keep_partial);
    if chunks.is_empty() {
        return Err(PeftError::config(
            "seq_len",
            format!(
                "the text has {} tokens, fewer than one sequence of {seq_len}",
                ids.len()
            ),
        ));
    }
    Ok(chunks)
}

fn tokenizer_error(e: tokenizers::Error) -> PeftError {
    PeftError::config("tokenizer", e.to_string())
}

/// Loads `tokenizer.json` for batching: its own padding is removed (batches are padded
/// dynamically by [`encode_batch`]) and truncation is set to `max_len` tokens, special tokens
/// included. `max_len` must leave room for at least one token besides the special tokens.
pub fn load_tokenizer(path: impl AsRef<Path>, max_len: usize) -> Result<Tokenizer> {
    let path = path.as_ref();
    if !path.is_file() {
        return Err(PeftError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such tokenizer file"),
        ));
    }
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(|e| data_error(path, 0, format!("not a valid tokenizer.json: {e}")))?;
    let special = num_special_tokens(&tokenizer);
    if max_len <= special {
        return Err(PeftError::config(
            "max_len",
            format!(
                "{max_len} leaves no room for text next to the tokenizer's {special} special tokens"
            ),
        ));
    }
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_len,
            ..TruncationParams::default()
        }))
        .map_err(|e| data_error(path, 0, format!("cannot set truncation: {e}")))?;
    Ok(tokenizer)
}

/// Special tokens the tokenizer adds to a single sequence (`[CLS]` and `[SEP]` for BERT: 2).
pub fn num_special_tokens(tokenizer: &Tokenizer) -> usize {
    tokenizer
        .get_post_processor()
        .map_or(0, |p| p.added_tokens(false))
}

/// The id used for padding: the tokenizer's padding id when it has padding settings, else the
/// id of `[PAD]`, `<pad>` or `<|pad|>` when the vocabulary has one, else 0. Padded positions are
/// masked, so the value only matters to models that look at it.
pub fn pad_id(tokenizer: &Tokenizer) -> u32 {
    if let Some(p) = tokenizer.get_padding() {
        return p.pad_id;
    }
    ["[PAD]", "<pad>", "<|pad|>"]
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
        .unwrap_or(0)
}

/// A padded batch of token sequences.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[B, T]` u32, right-padded to the longest sequence of the batch.
    pub input_ids: Tensor,
    /// `[B, T]` u32: 1 for a token, 0 for padding.
    pub attention_mask: Tensor,
    /// Number of real (non-padding) tokens in the batch.
    pub tokens: usize,
}

/// Tokenises `texts` with special tokens, at most `max_len` tokens each, and pads the batch to
/// its longest sequence (dynamic padding; see the module docs). An empty `texts` or `max_len` 0
/// is an error.
pub fn encode_batch(
    tokenizer: &Tokenizer,
    texts: &[&str],
    max_len: usize,
    device: &Device,
) -> Result<Batch> {
    if max_len == 0 {
        return Err(PeftError::config("max_len", "must be at least 1, got 0"));
    }
    let encodings = tokenizer
        .encode_batch(texts.to_vec(), true)
        .map_err(tokenizer_error)?;
    let mut seqs = Vec::with_capacity(encodings.len());
    for enc in &encodings {
        // Drop any padding the tokenizer itself added (left or right).
        let kept: Vec<(u32, bool)> = enc
            .get_ids()
            .iter()
            .zip(enc.get_attention_mask())
            .zip(enc.get_special_tokens_mask())
            .filter(|((_, m), _)| **m != 0)
            .map(|((id, _), s)| (*id, *s != 0))
            .collect();
        seqs.push(truncate_keeping_trailing_special(&kept, max_len));
    }
    pad_batch(&seqs, pad_id(tokenizer), device)
}

/// The first `max_len` tokens, except that trailing special tokens (`[SEP]`) stay at the end.
fn truncate_keeping_trailing_special(tokens: &[(u32, bool)], max_len: usize) -> Vec<u32> {
    if tokens.len() <= max_len {
        return tokens.iter().map(|(id, _)| *id).collect();
    }
    let trailing = tokens.iter().rev().take_while(|(_, s)| *s).count();
    let trailing = if trailing >= max_len { 0 } else { trailing };
    let head = max_len - trailing;
    tokens[..head]
        .iter()
        .chain(&tokens[tokens.len() - trailing..])
        .map(|(id, _)| *id)
        .collect()
}

/// Right-pads `seqs` with `pad_id` to the longest one: `input_ids` and `attention_mask`, both
/// `[B, T]` u32. An empty batch, or one whose sequences are all empty, is an error.
pub fn pad_batch(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Batch> {
    let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
    if longest == 0 {
        return Err(PeftError::config(
            "batch",
            if seqs.is_empty() {
                "no sequences to batch"
            } else {
                "every sequence is empty"
            },
        ));
    }
    let mut ids = Vec::with_capacity(seqs.len() * longest);
    let mut mask = Vec::with_capacity(seqs.len() * longest);
    let mut tokens = 0;
    for s in seqs {
        ids.extend_from_slice(s);
        ids.extend(std::iter::repeat_n(pad_id, longest - s.len()));
        mask.extend(std::iter::repeat_n(1u32, s.len()));
        mask.extend(std::iter::repeat_n(0u32, longest - s.len()));
        tokens += s.len();
    }
    let shape = (seqs.len(), longest);
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, shape, device)?,
        attention_mask: Tensor::from_vec(mask, shape, device)?,
        tokens,
    })
}

/// Label ids as a `[B]` u32 tensor (the target of a cross-entropy loss).
pub fn label_tensor(labels: &[usize], device: &Device) -> Result<Tensor> {
    let v: Vec<u32> = labels
        .iter()
        .map(|&l| {
            u32::try_from(l).map_err(|_| PeftError::config("labels", format!("label id {l} ≥ 2³²")))
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::from_vec(v, labels.len(), device)?)
}
