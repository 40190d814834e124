//! The SwiGLU activation of the MLP, forward and backward (`kernels/swiglu.cu`).
//!
//! Forward: `m = silu(g) · u` with `silu(g) = g · σ(g)`, in f32, rounded once.
//! Backward, in place: with `s = σ(g)`, `silu'(g) = s · (1 + g · (1 − s))`,
//! `du = dm · silu(g)` and `dg = dm · u · silu'(g)` overwrite `u` and `g` (each
//! element is read before it is written by the same thread, and `g`/`u` are not
//! needed after the backward), which saves a `[n, 2I]` buffer.
//! `g` and `u` are usually the two column blocks of the fused gate/up product.

use crate::device::{check_disjoint, read_mat, write_mat, Dev, Float, Mat};
use crate::error::{ensure, Result};

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// CPU reference: `m` for dense `g`, `u`.
pub fn swiglu_fwd_ref(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter().zip(u).map(|(&g, &u)| g * sigmoid(g) * u).collect()
}

/// CPU reference: `(dg, du)`.
pub fn swiglu_bwd_ref(g: &[f32], u: &[f32], dm: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = Vec::with_capacity(g.len());
    let mut du = Vec::with_capacity(g.len());
    for i in 0..g.len() {
        let s = sigmoid(g[i]);
        let silu = g[i] * s;
        let dsilu = s * (1.0 + g[i] * (1.0 - s));
        du.push(dm[i] * silu);
        dg.push(dm[i] * u[i] * dsilu);
    }
    (dg, du)
}

fn same_shape<T: Float>(op: &'static str, a: Mat<'_, T>, b: Mat<'_, T>) -> Result<()> {
    ensure!(
        a.rows == b.rows && a.cols == b.cols,
        op,
        "{}x{} vs {}x{}",
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
    Ok(())
}

/// `m = silu(g) · u`.
pub fn swiglu_fwd<T: Float>(dev: &Dev, g: Mat<'_, T>, u: Mat<'_, T>, m: Mat<'_, T>) -> Result<()> {
    same_shape("swiglu_fwd", g, u)?;
    same_shape("swiglu_fwd", g, m)?;
    check_disjoint("swiglu_fwd", &[m.span()], &[g.span(), u.span()])?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return crate::launch::swiglu_fwd(c, g, u, m);
    }
    let _ = dev;
    write_mat(m, &swiglu_fwd_ref(&read_mat(g), &read_mat(u)));
    Ok(())
}

/// In place: `g ← dg`, `u ← du` from `dm`.
pub fn swiglu_bwd<T: Float>(dev: &Dev, g: Mat<'_, T>, u: Mat<'_, T>, dm: Mat<'_, T>) -> Result<()> {
    same_shape("swiglu_bwd", g, u)?;
    same_shape("swiglu_bwd", g, dm)?;
    check_disjoint("swiglu_bwd", &[g.span(), u.span()], &[dm.span()])?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return crate::launch::swiglu_bwd(c, g, u, dm);
    }
    let _ = dev;
    let (dg, du) = swiglu_bwd_ref(&read_mat(g), &read_mat(u), &read_mat(dm));
    write_mat(g, &dg);
    write_mat(u, &du);
    Ok(())
}
