//! RMSNorm forward and backward (`kernels/norm.cu`).
//!
//! Forward, per row of `x: [n, h]`: `inv = 1 / sqrt(mean(x²) + eps)` in f32 and
//! `y = round(round(x · inv) · w)`: the normalized row is rounded to the storage
//! type before the weight multiplies it, exactly as Hugging Face's Mistral/Llama
//! RMSNorm does (`weight * hidden.to(input_dtype)`), so a bf16 model sees the
//! numbers it was trained with. `inv` is saved for the backward.
//!
//! Backward with `g = dy · w` and `x̂ = x · inv` (f32):
//! `dx = inv · (g − x̂ · mean(g · x̂))`; with `accumulate` the result is added to
//! what `dx` holds (the residual branch's gradient), rounded once.

use crate::device::{
    check_disjoint, read_f32, read_mat, write_f32, write_mat, Dev, Float, Mat, View,
};
use crate::error::{ensure, Result};

/// CPU reference of the forward on dense rows: returns `(y, inv_rms)`.
pub fn rmsnorm_fwd_ref<T: Float>(
    x: &[f32],
    cols: usize,
    w: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / cols;
    let mut y = vec![0f32; x.len()];
    let mut inv = vec![0f32; rows];
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let iv = 1.0 / (ss / cols as f32 + eps).sqrt();
        inv[r] = iv;
        for c in 0..cols {
            y[r * cols + c] = T::round(T::round(xr[c] * iv) * w[c]);
        }
    }
    (y, inv)
}

/// CPU reference of the backward: `dx` for dense rows (before accumulation).
pub fn rmsnorm_bwd_ref(x: &[f32], cols: usize, inv: &[f32], w: &[f32], dy: &[f32]) -> Vec<f32> {
    let rows = x.len() / cols;
    let mut dx = vec![0f32; x.len()];
    for r in 0..rows {
        let iv = inv[r];
        let (xr, dyr) = (&x[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
        let dot: f32 = (0..cols).map(|c| dyr[c] * w[c] * (xr[c] * iv)).sum();
        let mean = dot / cols as f32;
        for c in 0..cols {
            let g = dyr[c] * w[c];
            dx[r * cols + c] = iv * (g - xr[c] * iv * mean);
        }
    }
    dx
}

fn check<T: Float>(
    op: &'static str,
    x: Mat<'_, T>,
    w: View<'_, T>,
    other: Mat<'_, T>,
    inv: View<'_, f32>,
) -> Result<()> {
    ensure!(
        w.len() == x.cols,
        op,
        "weight has {} elements, rows have {}",
        w.len(),
        x.cols
    );
    ensure!(
        other.rows == x.rows && other.cols == x.cols,
        op,
        "x is {}x{}, the other matrix {}x{}",
        x.rows,
        x.cols,
        other.rows,
        other.cols
    );
    ensure!(
        inv.len() == x.rows,
        op,
        "inv_rms has {} entries for {} rows",
        inv.len(),
        x.rows
    );
    Ok(())
}

/// `y = rmsnorm(x) · w`, saving `inv_rms: [n]`.
pub fn rmsnorm_fwd<T: Float>(
    dev: &Dev,
    x: Mat<'_, T>,
    w: View<'_, T>,
    eps: f32,
    y: Mat<'_, T>,
    inv_rms: View<'_, f32>,
) -> Result<()> {
    check("rmsnorm_fwd", x, w, y, inv_rms)?;
    check_disjoint(
        "rmsnorm_fwd",
        &[y.span(), inv_rms.span()],
        &[x.span(), w.span()],
    )?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return crate::launch::rmsnorm_fwd(c, x, w, eps, y, inv_rms);
    }
    let _ = dev;
    let (yv, inv) = rmsnorm_fwd_ref::<T>(&read_mat(x), x.cols, &read_f32(w), eps);
    write_mat(y, &yv);
    write_f32(inv_rms, &inv);
    Ok(())
}

/// `dx (+)= rmsnorm_backward(x, inv_rms, w, dy)`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd<T: Float>(
    dev: &Dev,
    x: Mat<'_, T>,
    inv_rms: View<'_, f32>,
    w: View<'_, T>,
    dy: Mat<'_, T>,
    dx: Mat<'_, T>,
    accumulate: bool,
) -> Result<()> {
    check("rmsnorm_bwd", x, w, dy, inv_rms)?;
    check("rmsnorm_bwd", x, w, dx, inv_rms)?;
    check_disjoint(
        "rmsnorm_bwd",
        &[dx.span()],
        &[x.span(), w.span(), dy.span(), inv_rms.span()],
    )?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return crate::launch::rmsnorm_bwd(c, x, inv_rms, w, dy, dx, accumulate);
    }
    let _ = dev;
    let mut d = rmsnorm_bwd_ref(
        &read_mat(x),
        x.cols,
        &read_f32(inv_rms),
        &read_f32(w),
        &read_mat(dy),
    );
    if accumulate {
        for (v, old) in d.iter_mut().zip(read_mat(dx)) {
            *v += old;
        }
    }
    write_mat(dx, &d);
    Ok(())
}
