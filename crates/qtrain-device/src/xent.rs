//! Cross-entropy of one chunk of logit rows, with its gradient (`kernels/xent.cu`).
//!
//! The caller computes `logits = hidden_chunk · lm_headᵀ` in f32 for a chunk of
//! rows (never the whole batch: 8 x 4096 tokens x 32768 in f32 would be 4 GiB),
//! then this op, per row with target `t`: `lse = log Σ exp(l)` (max-stabilized),
//! `loss = lse − l[t]`, and optionally `dlogits = (softmax(l) − onehot(t)) · scale`
//! in the compute type for the product with the lm_head. A negative target means
//! "no loss": the row's loss and gradient are zero.

use crate::device::{
    check_disjoint, read_mat, read_view, write_f32, write_mat, Dev, Float, Mat, View,
};
use crate::error::{ensure, Result};

/// CPU reference: per-row losses, and the gradient rows when `want_grad`.
pub fn xent_ref(
    logits: &[f32],
    vocab: usize,
    targets: &[i32],
    scale: f32,
    want_grad: bool,
) -> (Vec<f32>, Vec<f32>) {
    let rows = targets.len();
    let mut loss = vec![0f32; rows];
    let mut grad = if want_grad {
        vec![0f32; rows * vocab]
    } else {
        Vec::new()
    };
    for r in 0..rows {
        let t = targets[r];
        if t < 0 {
            continue;
        }
        let l = &logits[r * vocab..(r + 1) * vocab];
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = l.iter().map(|&v| (v - m).exp()).sum();
        let lse = m + sum.ln();
        loss[r] = lse - l[t as usize];
        if want_grad {
            for (j, &v) in l.iter().enumerate() {
                let onehot = if j == t as usize { 1.0 } else { 0.0 };
                grad[r * vocab + j] = ((v - lse).exp() - onehot) * scale;
            }
        }
    }
    (loss, grad)
}

/// Losses (and gradients) of `logits: [c, vocab]` for `targets: [c]`.
pub fn xent<T: Float>(
    dev: &Dev,
    logits: Mat<'_, f32>,
    targets: View<'_, i32>,
    scale: f32,
    loss: View<'_, f32>,
    dlogits: Option<Mat<'_, T>>,
) -> Result<()> {
    ensure!(
        targets.len() == logits.rows && loss.len() == logits.rows,
        "xent",
        "{} logit rows, {} targets, {} loss slots",
        logits.rows,
        targets.len(),
        loss.len()
    );
    if let Some(d) = dlogits {
        ensure!(
            d.rows == logits.rows && d.cols == logits.cols,
            "xent",
            "gradient is {}x{}, logits {}x{}",
            d.rows,
            d.cols,
            logits.rows,
            logits.cols
        );
        check_disjoint(
            "xent",
            &[loss.span(), d.span()],
            &[logits.span(), targets.span()],
        )?;
    } else {
        check_disjoint("xent", &[loss.span()], &[logits.span(), targets.span()])?;
    }
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return crate::launch::xent(c, logits, targets, scale, loss, dlogits);
    }
    let _ = dev;
    let (l, g) = xent_ref(
        &read_mat(logits),
        logits.cols,
        &read_view(targets),
        scale,
        dlogits.is_some(),
    );
    write_f32(loss, &l);
    if let Some(d) = dlogits {
        write_mat(d, &g);
    }
    Ok(())
}
