//! Grouped-query scaled-dot-product attention with causal, sliding-window and
//! segment (packed-document) masking.
//!
//! The forward returns the output and the per-row log-sum-exp of the masked scores
//! instead of the probability matrix; the backward recomputes the probabilities
//! from it (`P = exp(S - lse)`), as FlashAttention does. That makes the saved state
//! O(tokens) instead of O(tokens²) and is exactly the contract a fused kernel needs.
//! This reference path still materializes one layer's `[b, heads, t, t]` scores
//! transiently. All softmax math runs in the accumulation dtype (≥ f32).

use super::acc_dtype;
use candle_core::{DType, Device, Result, Tensor, D};

/// Whether key `j` is visible from query `i` (same row of the batch):
/// causal (`j <= i`), inside the sliding window when there is one (Hugging Face
/// Mistral semantics: `j > i - window`, i.e. the query and the `window - 1`
/// previous tokens; note candle-transformers' Mistral keeps one more), and in the
/// same packed document (`segment[i] == segment[j]`).
pub fn visible(i: usize, j: usize, window: Option<usize>, seg_i: u32, seg_j: u32) -> bool {
    j <= i && window.is_none_or(|w| j + w > i) && seg_i == seg_j
}

/// Additive mask `[batch, 1, seq, seq]`: 0 where visible, -inf elsewhere. The
/// diagonal is always visible, so no softmax row is empty.
pub fn build_mask(
    segment_ids: &[u32],
    batch: usize,
    seq: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut m = vec![f32::NEG_INFINITY; batch * seq * seq];
    for b in 0..batch {
        let seg = &segment_ids[b * seq..(b + 1) * seq];
        for i in 0..seq {
            let row = &mut m[(b * seq + i) * seq..(b * seq + i + 1) * seq];
            for (j, v) in row.iter_mut().enumerate().take(i + 1) {
                if visible(i, j, window, seg[i], seg[j]) {
                    *v = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(m, (batch, 1, seq, seq), device)?.to_dtype(dtype)
}

/// `[b, kv_heads, t, d] -> [b, kv_heads * groups, t, d]`; query head `h` reads KV
/// head `h / groups` (Hugging Face's `repeat_kv`).
fn repeat_kv(x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, groups, t, d))?
        .reshape((b, kv * groups, t, d))
}

/// Adjoint of [`repeat_kv`]: sum the gradients of the query heads sharing a KV head.
fn reduce_kv(dx: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(dx.clone());
    }
    let (b, h, t, d) = dx.dims4()?;
    dx.reshape((b, h / groups, groups, t, d))?.sum(2)
}

/// Masked scores `S = Q K^T * scale + mask` in the accumulation dtype.
fn scores(q: &Tensor, k: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)
}

/// Saved by the forward for the backward: the log-sum-exp of every score row.
pub struct AttnStats {
    /// `[b, heads, t, 1]` in the accumulation dtype.
    pub lse: Tensor,
}

/// `q: [b, heads, t, d]`, `k, v: [b, kv_heads, t, d]` (compute dtype), `mask` from
/// [`build_mask`] in the accumulation dtype. Returns `O = softmax(S) V` in the
/// compute dtype and the row statistics.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<(Tensor, AttnStats)> {
    let dtype = q.dtype();
    let acc = acc_dtype(dtype);
    let groups = q.dim(1)? / k.dim(1)?;
    let qf = q.to_dtype(acc)?;
    let kf = repeat_kv(&k.to_dtype(acc)?, groups)?;
    let vf = repeat_kv(&v.to_dtype(acc)?, groups)?;
    let s = scores(&qf, &kf, mask, scale)?;
    // Subtract the row max before exponentiating; the diagonal keeps it finite.
    let m = s.max_keepdim(D::Minus1)?;
    let e = s.broadcast_sub(&m)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let p = e.broadcast_div(&sum)?;
    let lse = (m + sum.log()?)?;
    let o = p.matmul(&vf)?.to_dtype(dtype)?;
    Ok((o, AttnStats { lse }))
}

/// Gradients `(dq, dk, dv)` from `do = ∂L/∂O`.
///
/// With `P = exp(S - lse)`: `dV = P^T dO`, `dP = dO V^T`, and through the softmax
/// `dS = P ∘ (dP - D)` where `D_i = Σ_j P_ij dP_ij = Σ_d dO_id O_id` (the second
/// form needs only `O`, which the caller has). `S = Q K^T s` gives `dQ = dS K s`
/// and `dK = dS^T Q s`; masked entries have `P = 0` and receive nothing. KV
/// gradients are summed over the query heads of each group.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    stats: &AttnStats,
    d_o: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = q.dtype();
    let acc = acc_dtype(dtype);
    let groups = q.dim(1)? / k.dim(1)?;
    let qf = q.to_dtype(acc)?;
    let kf = repeat_kv(&k.to_dtype(acc)?, groups)?;
    let vf = repeat_kv(&v.to_dtype(acc)?, groups)?;
    let dof = d_o.to_dtype(acc)?;
    let p = scores(&qf, &kf, mask, scale)?
        .broadcast_sub(&stats.lse)?
        .exp()?;
    let dv = p.t()?.matmul(&dof)?;
    let dp = dof.matmul(&vf.t()?)?;
    let delta = (&dof * o.to_dtype(acc)?)?.sum_keepdim(D::Minus1)?;
    let ds = (p * dp.broadcast_sub(&delta)?)?;
    let dq = (ds.matmul(&kf)? * scale)?;
    let dk = (ds.t()?.matmul(&qf)? * scale)?;
    Ok((
        dq.to_dtype(dtype)?,
        reduce_kv(&dk, groups)?.to_dtype(dtype)?,
        reduce_kv(&dv, groups)?.to_dtype(dtype)?,
    ))
}
