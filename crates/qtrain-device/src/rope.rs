//! Rotary position embedding, forward and backward, in place (`kernels/rope.cu`).
//!
//! `x: [n, heads · d]` holds one row per token (a column block of the fused q/k/v
//! buffer). Each head's vector is rotated in pairs `(x[i], x[i + d/2])` by the
//! angle `pos · θ^(−2i/d)` (Hugging Face's `rotate_half` convention):
//! `y₁ = x₁ cos − x₂ sin`, `y₂ = x₂ cos + x₁ sin`. The backward is the inverse
//! rotation (the transpose of a rotation), `inverse = true`.
//!
//! The cos/sin tables (`[n, d/2]` f32) are made on the host by [`rope_tables`] with
//! the same f32 arithmetic as `qtrain_reference::ops::rope::tables`, so both paths rotate
//! by identical angles.

use crate::device::{read_f32, read_mat, write_mat, Dev, Float, Mat, View};
use crate::error::{ensure, Result};

/// `(cos, sin)`, each `[n, head_dim / 2]`, for the given positions.
pub fn rope_tables(position_ids: &[u32], head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(position_ids.len() * half);
    let mut sin = Vec::with_capacity(position_ids.len() * half);
    for &p in position_ids {
        for &f in &inv_freq {
            let angle = (p as f32 * f) as f64;
            let (s, c) = angle.sin_cos();
            cos.push(c as f32);
            sin.push(s as f32);
        }
    }
    (cos, sin)
}

/// CPU reference on a dense `[n, heads * d]` array.
pub fn rope_ref(
    x: &[f32],
    n: usize,
    heads: usize,
    d: usize,
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) -> Vec<f32> {
    let half = d / 2;
    let mut y = x.to_vec();
    for t in 0..n {
        for h in 0..heads {
            let base = t * heads * d + h * d;
            for i in 0..half {
                let (c, s) = (cos[t * half + i], sin[t * half + i]);
                let s = if inverse { -s } else { s };
                let (x1, x2) = (x[base + i], x[base + i + half]);
                y[base + i] = x1 * c - x2 * s;
                y[base + i + half] = x2 * c + x1 * s;
            }
        }
    }
    y
}

/// Rotates every head of `x` in place; `inverse` for the backward.
pub fn rope<T: Float>(
    dev: &Dev,
    x: Mat<'_, T>,
    head_dim: usize,
    cos: View<'_, f32>,
    sin: View<'_, f32>,
    inverse: bool,
) -> Result<()> {
    ensure!(
        head_dim.is_multiple_of(2) && head_dim > 0 && x.cols.is_multiple_of(head_dim),
        "rope",
        "row length {} is not a whole number of heads of (even) dim {head_dim}",
        x.cols
    );
    let half = head_dim / 2;
    ensure!(
        cos.len() == x.rows * half && sin.len() == x.rows * half,
        "rope",
        "tables have {} / {} entries, need {} rows x {half}",
        cos.len(),
        sin.len(),
        x.rows
    );
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return crate::launch::rope(c, x, head_dim, cos, sin, inverse);
    }
    let _ = dev;
    let y = rope_ref(
        &read_mat(x),
        x.rows,
        x.cols / head_dim,
        head_dim,
        &read_f32(cos),
        &read_f32(sin),
        inverse,
    );
    write_mat(x, &y);
    Ok(())
}
