//! Calibration batches and the selection of the rows of their counted tokens.

use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::data::encode_batch;
use crate::error::{PeftError, Result};

/// One calibration batch.
#[derive(Clone, Debug)]
pub struct CalibrationBatch {
    /// `[B, T]` token ids (or `[B, T, …]` inputs of a model that takes features).
    pub input_ids: Tensor,
    /// `[B, T]`, 1 = token, 0 = padding (any dtype).
    pub attention_mask: Tensor,
    /// `[B, T]`: the tokens whose activations count, when narrower than the attention mask
    /// (e.g. PEFT's label mask: `attention_mask ∧ labels ≠ −100`). Default: the attention mask.
    pub token_mask: Option<Tensor>,
}

impl CalibrationBatch {
    /// A batch whose counted tokens are those of the attention mask.
    pub fn new(input_ids: Tensor, attention_mask: Tensor) -> Self {
        Self {
            input_ids,
            attention_mask,
            token_mask: None,
        }
    }

    /// Restricts the counted tokens to `mask` (`[B, T]`, non-zero = counted).
    pub fn with_token_mask(mut self, mask: Tensor) -> Self {
        self.token_mask = Some(mask);
        self
    }

    /// Number of counted tokens.
    pub fn usable_tokens(&self) -> Result<usize> {
        Ok(self.selection()?.tokens)
    }

    pub(super) fn selection(&self) -> Result<RowSelection> {
        let mask = self.token_mask.as_ref().unwrap_or(&self.attention_mask);
        let (b, t) = mask.dims2().map_err(|_| PeftError::ShapeMismatch {
            key: "calibration token mask".into(),
            expected: self.input_ids.dims().to_vec(),
            got: mask.dims().to_vec(),
        })?;
        if self.input_ids.dims().get(..2) != Some(&[b, t][..]) {
            return Err(PeftError::ShapeMismatch {
                key: "calibration token mask".into(),
                expected: self.input_ids.dims().to_vec(),
                got: mask.dims().to_vec(),
            });
        }
        let flags = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let tokens: Vec<u32> = (0..flags.len())
            .filter(|&i| flags[i] != 0.0)
            .map(|i| i as u32)
            .collect();
        let token_lengths: Vec<usize> = (0..b)
            .map(|s| {
                flags[s * t..(s + 1) * t]
                    .iter()
                    .filter(|&&f| f != 0.0)
                    .count()
            })
            .filter(|&n| n > 0)
            .collect();
        let sequences: Vec<u32> = (0..b)
            .filter(|&s| flags[s * t..(s + 1) * t].iter().any(|&f| f != 0.0))
            .map(|s| s as u32)
            .collect();
        let device = self.input_ids.device();
        Ok(RowSelection {
            batch: b,
            seq: t,
            tokens: tokens.len(),
            sequences: sequences.len(),
            token_index: Tensor::from_vec(tokens.clone(), tokens.len(), device)?,
            sequence_index: Tensor::from_vec(sequences.clone(), sequences.len(), device)?,
            token_lengths,
            sequence_lengths: vec![1; sequences.len()],
        })
    }
}

/// Which rows of a layer input belong to counted tokens, for the batch being run.
pub(super) struct RowSelection {
    batch: usize,
    seq: usize,
    tokens: usize,
    sequences: usize,
    token_index: Tensor,
    sequence_index: Tensor,
    /// Counted tokens of each sequence that has one, in batch order.
    token_lengths: Vec<usize>,
    /// One row for each sequence that has a counted token (inputs of one row per sequence).
    sequence_lengths: Vec<usize>,
}

impl RowSelection {
    /// The counted rows of `x` as `[N, in]` f32, sequence after sequence, and the rows of each
    /// sequence; `None` when there are none.
    pub(super) fn rows(&self, x: &Tensor, layer: &str) -> Result<Option<(Tensor, &[usize])>> {
        let dims = x.dims();
        let (flat, index, n, lengths) = match *dims {
            [b, t, d] if b == self.batch && t == self.seq => (
                x.reshape((b * t, d))?,
                &self.token_index,
                self.tokens,
                &self.token_lengths,
            ),
            [n, _] if n == self.batch * self.seq => (
                x.clone(),
                &self.token_index,
                self.tokens,
                &self.token_lengths,
            ),
            [n, _] if n == self.batch => (
                x.clone(),
                &self.sequence_index,
                self.sequences,
                &self.sequence_lengths,
            ),
            _ => {
                return Err(PeftError::layer(
                    layer,
                    format!(
                        "calibration: input of shape {dims:?} does not match the batch \
                         [B, T] = [{}, {}] (expected [B, T, in], [B·T, in] or [B, in])",
                        self.batch, self.seq
                    ),
                ));
            }
        };
        if n == 0 {
            return Ok(None);
        }
        Ok(Some((
            flat.contiguous()?
                .index_select(index, 0)?
                .to_dtype(DType::F32)?,
            lengths.as_slice(),
        )))
    }
}

/// Tokenised calibration batches: `texts` in order, `batch_size` per batch, at most
/// `max_batches` batches, each cut to `max_len` tokens and padded to its longest sequence.
pub fn text_batches(
    tokenizer: &Tokenizer,
    texts: &[&str],
    batch_size: usize,
    max_batches: usize,
    max_len: usize,
    device: &Device,
) -> Result<Vec<CalibrationBatch>> {
    if batch_size == 0 || max_batches == 0 {
        return Err(PeftError::config(
            "calibration batches",
            format!(
                "batch size and batch count must be at least 1 (got {batch_size} and {max_batches})"
            ),
        ));
    }
    if texts.is_empty() {
        return Err(PeftError::config("calibration data", "no texts"));
    }
    texts
        .chunks(batch_size)
        .take(max_batches)
        .map(|chunk| {
            let b = encode_batch(tokenizer, chunk, max_len, device)?;
            Ok(CalibrationBatch::new(b.input_ids, b.attention_mask))
        })
        .collect()
}
