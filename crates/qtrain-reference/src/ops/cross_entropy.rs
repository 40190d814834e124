//! Cross-entropy of the frozen lm_head's logits, chunked over rows.
//!
//! The `[tokens, vocab]` logits of a batch are never materialized at once (for
//! Mistral, 8 x 4096 tokens x 32768 vocab in f32 would be 4 GiB): rows are processed
//! [`DEFAULT_CHUNK_ROWS`] at a time, each chunk computing its lm_head matmul, its
//! loss and, in training, the gradient with respect to its final hidden states.
//! Rows without a target (ignore index) are skipped entirely: they contribute no
//! loss and get a zero gradient.
//!
//! `targets[i]` is the target of row `i` of `hidden`; the caller does the
//! next-token shift (see `qtrain_step::TokenBatch`).

use super::acc_dtype;
use candle_core::{DType, Result, Tensor, D};
use qtrain_step::IGNORE_INDEX;

/// Rows per lm_head chunk.
pub const DEFAULT_CHUNK_ROWS: usize = 1024;

/// Sum of the per-row losses and the number of rows that had a target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CeSum {
    pub loss_sum: f64,
    pub valid: usize,
}

fn valid_rows(targets: &[i64]) -> Vec<u32> {
    targets
        .iter()
        .enumerate()
        .filter(|(_, &t)| t != IGNORE_INDEX)
        .map(|(i, _)| i as u32)
        .collect()
}

/// Runs `f(row_indices, target_ids, logits)` on each chunk of valid rows, with the
/// chunk's logits `[c, vocab]` in the accumulation dtype.
fn for_each_chunk(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &[i64],
    chunk_rows: usize,
    mut f: impl FnMut(&Tensor, &Tensor, &Tensor) -> Result<()>,
) -> Result<usize> {
    let acc = acc_dtype(hidden.dtype());
    let rows = valid_rows(targets);
    let device = hidden.device();
    for chunk in rows.chunks(chunk_rows.max(1)) {
        let idx = Tensor::from_slice(chunk, chunk.len(), device)?;
        let tgt: Vec<u32> = chunk.iter().map(|&r| targets[r as usize] as u32).collect();
        let tgt = Tensor::from_vec(tgt, (chunk.len(), 1), device)?;
        let logits = hidden
            .index_select(&idx, 0)?
            .matmul(&lm_head.t()?)?
            .to_dtype(acc)?;
        f(&idx, &tgt, &logits)?;
    }
    Ok(rows.len())
}

/// Row-wise `log Σ_v exp(logits_v)`, stabilized by the row max: `[c, 1]`.
fn logsumexp(logits: &Tensor) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?;
    m.clone()
        + logits
            .broadcast_sub(&m)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
}

fn chunk_loss(logits: &Tensor, lse: &Tensor, tgt: &Tensor) -> Result<f64> {
    (lse - logits.gather(tgt, 1)?)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()
}

/// `hidden: [n, h]` (after the final norm), `lm_head: [vocab, h]`, `targets: [n]`.
/// Returns `Σ_i (logsumexp(l_i) - l_i[t_i])` over valid rows, and their count.
pub fn forward(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &[i64],
    chunk_rows: usize,
) -> Result<CeSum> {
    let mut loss_sum = 0.0;
    let valid = for_each_chunk(hidden, lm_head, targets, chunk_rows, |_, tgt, logits| {
        loss_sum += chunk_loss(logits, &logsumexp(logits)?, tgt)?;
        Ok(())
    })?;
    Ok(CeSum { loss_sum, valid })
}

/// Like [`forward`], and also `∂(grad_scale · loss_sum)/∂hidden: [n, h]`.
///
/// Per row, `∂ℓ/∂l = softmax(l) - onehot(t)`; `logits = hidden W^T` with the frozen
/// `W`, so `∂ℓ/∂hidden = (softmax(l) - onehot(t)) W`. `grad_scale` is
/// `1 / (valid tokens of the whole optimizer step)`, applied here once so every
/// upstream gradient is already normalized.
pub fn forward_backward(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &[i64],
    grad_scale: f64,
    chunk_rows: usize,
) -> Result<(CeSum, Tensor)> {
    let dtype = hidden.dtype();
    let vocab = lm_head.dim(0)?;
    let device = hidden.device();
    let vocab_ids = Tensor::arange(0u32, vocab as u32, device)?.unsqueeze(0)?;
    let mut dhidden = hidden.zeros_like()?;
    let mut loss_sum = 0.0;
    let valid = for_each_chunk(hidden, lm_head, targets, chunk_rows, |idx, tgt, logits| {
        let lse = logsumexp(logits)?;
        loss_sum += chunk_loss(logits, &lse, tgt)?;
        let p = logits.broadcast_sub(&lse)?.exp()?;
        let onehot = vocab_ids.broadcast_eq(tgt)?.to_dtype(p.dtype())?;
        let dlogits = ((p - onehot)? * grad_scale)?;
        let dh = dlogits.to_dtype(dtype)?.matmul(lm_head)?;
        dhidden = dhidden.index_add(idx, &dh, 0)?;
        Ok(())
    })?;
    Ok((CeSum { loss_sum, valid }, dhidden))
}
