//! [`TokenBatch`]: a micro-batch of packed token rows, as the data pipeline emits
//! it and both implementations of the training step consume it.
//!
//! Labels follow Hugging Face: `labels` is a copy of `input_ids` with
//! [`IGNORE_INDEX`] where no loss is wanted, unshifted; the step trains position
//! `t` to predict `labels[t + 1]` of the same row. A target is also ignored when
//! position `t + 1` belongs to another packed document (`segment_ids` differ), so a
//! document never learns to predict the start of the next one.
//! [`TokenBatch::valid_targets`] counts the targets exactly as the loss does; the
//! trainer sums it over the micro-batches of a step to get the loss denominator.

use crate::error::{Result, StepError};

/// Labels equal to this take no loss (PyTorch's and Hugging Face's convention).
pub const IGNORE_INDEX: i64 = -100;

/// `batch_size` rows of `seq_len` tokens, every field a host vector of
/// `batch_size * seq_len` entries in row-major order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    pub input_ids: Vec<u32>,
    /// `input_ids` with [`IGNORE_INDEX`] where no loss is wanted (unshifted).
    pub labels: Vec<i64>,
    /// Position of each token inside its document (restarts at 0 per document).
    pub position_ids: Vec<u32>,
    /// Which packed document each token belongs to; attention never crosses them.
    pub segment_ids: Vec<u32>,
    pub batch_size: usize,
    pub seq_len: usize,
}

impl TokenBatch {
    /// Checks the lengths of every field.
    pub fn new(
        input_ids: Vec<u32>,
        labels: Vec<i64>,
        position_ids: Vec<u32>,
        segment_ids: Vec<u32>,
        batch_size: usize,
        seq_len: usize,
    ) -> Result<Self> {
        let b = Self {
            input_ids,
            labels,
            position_ids,
            segment_ids,
            batch_size,
            seq_len,
        };
        b.check_lengths()?;
        Ok(b)
    }

    /// Unpacked rows of equal length: one document per row, positions `0..seq_len`,
    /// labels equal to the inputs.
    pub fn from_rows(rows: &[Vec<u32>]) -> Result<Self> {
        let batch_size = rows.len();
        let seq_len = rows.first().map_or(0, Vec::len);
        let input_ids: Vec<u32> = rows.iter().flatten().copied().collect();
        let labels = input_ids.iter().map(|&t| t as i64).collect();
        let position_ids = (0..batch_size).flat_map(|_| 0..seq_len as u32).collect();
        let segment_ids = vec![0; batch_size * seq_len];
        Self::new(
            input_ids,
            labels,
            position_ids,
            segment_ids,
            batch_size,
            seq_len,
        )
    }

    pub fn num_tokens(&self) -> usize {
        self.batch_size * self.seq_len
    }

    fn check_lengths(&self) -> Result<()> {
        let expected = self.num_tokens();
        for (field, found) in [
            ("input_ids", self.input_ids.len()),
            ("labels", self.labels.len()),
            ("position_ids", self.position_ids.len()),
            ("segment_ids", self.segment_ids.len()),
        ] {
            if found != expected {
                return Err(StepError::BatchShape {
                    field,
                    found,
                    expected,
                    batch_size: self.batch_size,
                    seq_len: self.seq_len,
                });
            }
        }
        Ok(())
    }

    /// Checks lengths, token ids and labels against the vocabulary.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        self.check_lengths()?;
        if let Some((index, &id)) = self
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= vocab)
        {
            return Err(StepError::TokenOutOfRange { index, id, vocab });
        }
        if let Some((index, &label)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l != IGNORE_INDEX && !(0..vocab as i64).contains(&l))
        {
            return Err(StepError::LabelOutOfRange {
                index,
                label,
                vocab,
            });
        }
        Ok(())
    }

    /// The shifted per-position targets: `targets[t] = labels[t + 1]` within a row
    /// and a document, [`IGNORE_INDEX`] at the last position of a row or document.
    pub fn shifted_targets(&self) -> Vec<i64> {
        let (b, t) = (self.batch_size, self.seq_len);
        let mut out = vec![IGNORE_INDEX; b * t];
        for row in 0..b {
            for pos in 0..t.saturating_sub(1) {
                let i = row * t + pos;
                if self.segment_ids[i] == self.segment_ids[i + 1] {
                    out[i] = self.labels[i + 1];
                }
            }
        }
        out
    }

    /// How many positions carry a loss (the per-batch share of the loss
    /// denominator). For the data pipeline's batches this is also the number of
    /// labels other than [`IGNORE_INDEX`], since every document's first label is.
    pub fn valid_targets(&self) -> usize {
        self.shifted_targets()
            .iter()
            .filter(|&&t| t != IGNORE_INDEX)
            .count()
    }
}
