//! Turning tokenized documents into fixed-shape [`TokenBatch`]es: packing several
//! documents per row (first-fit into the batch's rows, never splitting a document
//! across rows) or one document per row with length bucketing. Also the length
//! policy for documents longer than a row.
//!
//! Packed rows carry `position_ids` restarting at 0 for each document and
//! `segment_ids` numbering the documents of the row, so the model builds a
//! block-diagonal causal mask; padding gets a segment of its own, label -100.

use crate::config::Truncation;
use crate::encode::Tokenized;
use crate::util::hash_all;
use qtrain_step::{TokenBatch, IGNORE_INDEX};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Rows padded with padding: with bucketing, rows are only as long as the longest
/// document of the batch, rounded up to this.
const PAD_MULTIPLE: usize = 8;
/// Padding mode sorts this many batches' worth of documents by length at a time.
const BUCKET_BATCHES: usize = 8;

/// Documents waiting to be batched; saved in the cursor so a resume loses nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Packing: the rows being filled.
    pub rows: Vec<Vec<Tokenized>>,
    /// Padding: documents waiting for a bucket.
    pub window: Vec<Tokenized>,
    /// Complete batches (rows of documents) not yet emitted.
    pub ready: VecDeque<Vec<Vec<Tokenized>>>,
    /// Buckets formed so far (seeds their order).
    pub buckets: u64,
}

impl Pending {
    pub fn tokens(&self) -> usize {
        let rows: usize = self.rows.iter().flatten().map(Tokenized::len).sum();
        let window: usize = self.window.iter().map(Tokenized::len).sum();
        let ready: usize = self
            .ready
            .iter()
            .flatten()
            .flatten()
            .map(Tokenized::len)
            .sum();
        rows + window + ready
    }
}

#[derive(Debug, Clone)]
pub struct Batcher {
    pub seq_len: usize,
    pub batch_size: usize,
    pub packing: bool,
    pub pad_id: u32,
    pub seed: u64,
    pub pending: Pending,
}

impl Batcher {
    pub fn push(&mut self, doc: Tokenized) {
        debug_assert!(!doc.is_empty() && doc.len() <= self.seq_len);
        let p = &mut self.pending;
        if self.packing {
            let fits = p.rows.iter().position(|row| {
                row.iter().map(Tokenized::len).sum::<usize>() + doc.len() <= self.seq_len
            });
            match fits {
                Some(r) => p.rows[r].push(doc),
                None if p.rows.len() < self.batch_size => p.rows.push(vec![doc]),
                None => {
                    let full = std::mem::replace(&mut p.rows, vec![vec![doc]]);
                    p.ready.push_back(full);
                }
            }
        } else {
            p.window.push(doc);
            if p.window.len() >= self.batch_size * BUCKET_BATCHES {
                self.bucket(false);
            }
        }
    }

    /// Sorts the window by length and cuts it into batches, emitted in a seeded
    /// random order (so batch lengths do not ramp up monotonically).
    fn bucket(&mut self, partial_ok: bool) {
        let p = &mut self.pending;
        let mut docs = std::mem::take(&mut p.window);
        docs.sort_by_key(Tokenized::len);
        let mut batches: Vec<Vec<Vec<Tokenized>>> = Vec::new();
        let mut it = docs.into_iter().peekable();
        while it.peek().is_some() {
            let b: Vec<Vec<Tokenized>> =
                it.by_ref().take(self.batch_size).map(|d| vec![d]).collect();
            if b.len() < self.batch_size && !partial_ok {
                p.window = b.into_iter().flatten().collect();
                break;
            }
            batches.push(b);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(hash_all(&[self.seed, 0xb0c4e7, p.buckets]));
        batches.shuffle(&mut rng);
        p.buckets += 1;
        p.ready.extend(batches);
    }

    /// End of a finite stream: whatever is pending becomes (possibly partial)
    /// batches.
    pub fn flush(&mut self) {
        if self.packing {
            if !self.pending.rows.is_empty() {
                let rows = std::mem::take(&mut self.pending.rows);
                self.pending.ready.push_back(rows);
            }
        } else if !self.pending.window.is_empty() {
            self.bucket(true);
        }
    }

    pub fn pop(&mut self) -> Option<TokenBatch> {
        let rows = self.pending.ready.pop_front()?;
        let width = if self.packing {
            self.seq_len
        } else {
            let longest = rows.iter().flatten().map(Tokenized::len).max().unwrap_or(1);
            longest
                .div_ceil(PAD_MULTIPLE)
                .saturating_mul(PAD_MULTIPLE)
                .min(self.seq_len)
        };
        Some(assemble(&rows, width, self.pad_id))
    }
}

/// Lays out rows of documents: ids, labels, per-document positions and segments,
/// then padding (its own segment, label -100).
pub fn assemble(rows: &[Vec<Tokenized>], seq_len: usize, pad_id: u32) -> TokenBatch {
    let n = rows.len() * seq_len;
    let mut b = TokenBatch {
        input_ids: Vec::with_capacity(n),
        labels: Vec::with_capacity(n),
        position_ids: Vec::with_capacity(n),
        segment_ids: Vec::with_capacity(n),
        batch_size: rows.len(),
        seq_len,
    };
    for row in rows {
        let mut used = 0;
        for (seg, doc) in row.iter().enumerate() {
            b.input_ids.extend_from_slice(&doc.input_ids);
            b.labels.extend_from_slice(&doc.labels);
            b.position_ids.extend(0..doc.len() as u32);
            b.segment_ids
                .extend(std::iter::repeat_n(seg as u32, doc.len()));
            used += doc.len();
        }
        assert!(
            used <= seq_len,
            "row holds {used} tokens, more than {seq_len}"
        );
        let pad = seq_len - used;
        b.input_ids.extend(std::iter::repeat_n(pad_id, pad));
        b.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        b.position_ids.extend(0..pad as u32);
        b.segment_ids
            .extend(std::iter::repeat_n(row.len() as u32, pad));
    }
    b
}

/// What [`fit`] did to a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    Whole,
    Split(usize),
    Truncated,
    Dropped,
}

/// Applies the length policy to a document longer than `seq_len`. Split pieces are
/// documents of their own: positions restart and the first label is -100 (it cannot
/// be predicted from inside the piece).
pub fn fit(doc: Tokenized, seq_len: usize, policy: Truncation) -> (Vec<Tokenized>, Fit) {
    if doc.len() <= seq_len {
        return (vec![doc], Fit::Whole);
    }
    match policy {
        Truncation::Drop => (Vec::new(), Fit::Dropped),
        Truncation::Truncate => {
            let mut d = doc;
            d.input_ids.truncate(seq_len);
            d.labels.truncate(seq_len);
            (vec![d], Fit::Truncated)
        }
        Truncation::Split => {
            let pieces: Vec<Tokenized> = doc
                .input_ids
                .chunks(seq_len)
                .zip(doc.labels.chunks(seq_len))
                .map(|(ids, labels)| {
                    let mut labels = labels.to_vec();
                    labels[0] = IGNORE_INDEX;
                    Tokenized {
                        input_ids: ids.to_vec(),
                        labels,
                    }
                })
                .collect();
            let n = pieces.len();
            (pieces, Fit::Split(n))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(start: u32, len: usize, trained_from: usize) -> Tokenized {
        let input_ids: Vec<u32> = (start..start + len as u32).collect();
        let labels = input_ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if i == 0 || i < trained_from {
                    IGNORE_INDEX
                } else {
                    t as i64
                }
            })
            .collect();
        Tokenized { input_ids, labels }
    }

    fn batcher(packing: bool) -> Batcher {
        Batcher {
            seq_len: 8,
            batch_size: 2,
            packing,
            pad_id: 0,
            seed: 1,
            pending: Pending::default(),
        }
    }

    #[test]
    fn packing_respects_document_boundaries() {
        let mut b = batcher(true);
        for d in [
            doc(10, 5, 2),
            doc(20, 3, 1),
            doc(30, 6, 0),
            doc(40, 2, 0),
            doc(50, 4, 0),
        ] {
            b.push(d);
        }
        // Row 0: docs 10 (5) + 20 (3); row 1: 30 (6) + 40 (2); 50 doesn't fit: batch out.
        let batch = b.pop().expect("one full batch");
        assert!(b.pop().is_none());
        assert_eq!((batch.batch_size, batch.seq_len), (2, 8));
        assert_eq!(
            batch.input_ids,
            [10, 11, 12, 13, 14, 20, 21, 22, 30, 31, 32, 33, 34, 35, 40, 41]
        );
        assert_eq!(
            batch.position_ids,
            [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1]
        );
        assert_eq!(
            batch.segment_ids,
            [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
        );
        let m = IGNORE_INDEX;
        assert_eq!(
            batch.labels,
            [m, m, 12, 13, 14, m, 21, 22, m, 31, 32, 33, 34, 35, m, 41]
        );
        assert_eq!(batch.valid_targets(), 11);
        // The document that did not fit waits for the next batch.
        assert_eq!(b.pending.rows, vec![vec![doc(50, 4, 0)]]);
        b.flush();
        let last = b.pop().unwrap();
        assert_eq!(last.batch_size, 1);
        assert_eq!(last.input_ids, [50, 51, 52, 53, 0, 0, 0, 0]);
        assert_eq!(last.segment_ids, [0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(last.labels[4..], [m, m, m, m]);
    }

    #[test]
    fn padding_buckets_by_length() {
        let mut b = batcher(false);
        let lens = [3, 7, 2, 8, 1, 5, 4, 6, 2, 3, 7, 1, 5, 2, 8, 4];
        for (i, &l) in lens.iter().enumerate() {
            b.push(doc(100 * i as u32 + 1, l, 0));
        }
        let mut seen = 0;
        while let Some(batch) = b.pop() {
            seen += 1;
            assert_eq!(batch.batch_size, 2);
            let row_lens: Vec<usize> = (0..2)
                .map(|r| {
                    batch.labels[r * batch.seq_len..(r + 1) * batch.seq_len]
                        .iter()
                        .zip(&batch.segment_ids[r * batch.seq_len..])
                        .filter(|(_, &s)| s == 0)
                        .count()
                })
                .collect();
            // Sorted buckets: the two rows differ by at most one length step.
            assert!(row_lens[0].abs_diff(row_lens[1]) <= 1, "{row_lens:?}");
            assert_eq!(
                batch.seq_len, 8,
                "padded to a multiple of 8, capped at seq_len"
            );
        }
        assert_eq!(seen, 8);
    }

    #[test]
    fn split_truncate_drop() {
        let d = doc(1, 20, 3);
        let (pieces, fit_) = fit(d.clone(), 8, Truncation::Split);
        assert_eq!(fit_, Fit::Split(3));
        assert_eq!(
            pieces.iter().map(Tokenized::len).collect::<Vec<_>>(),
            [8, 8, 4]
        );
        for p in &pieces {
            assert_eq!(p.labels[0], IGNORE_INDEX);
        }
        assert_eq!(pieces[1].input_ids[0], 9);
        let (t, f) = fit(d.clone(), 8, Truncation::Truncate);
        assert_eq!((t[0].len(), f), (8, Fit::Truncated));
        let (none, f) = fit(d, 8, Truncation::Drop);
        assert!(none.is_empty());
        assert_eq!(f, Fit::Dropped);
    }
}
