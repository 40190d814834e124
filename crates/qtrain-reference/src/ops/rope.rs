//! Rotary position embedding in Hugging Face's `rotate_half` convention: the pair
//! rotated together is `(x_i, x_{i + d/2})`, by the angle `pos * theta^(-2i/d)`.
//!
//! Positions come from the batch's `position_ids`, so packed documents restart at
//! zero. The backward of a rotation is the rotation by the opposite angle, i.e. the
//! forward with `-sin`.

use super::acc_dtype;
use candle_core::{DType, Device, Result, Tensor, D};

/// `cos` and `sin` tables `[batch, 1, seq, head_dim]` for the given positions
/// (`position_ids` is `[batch * seq]`, row-major), in `dtype` on `device`.
///
/// For f32/bf16 the angles are computed the way Hugging Face does (inverse
/// frequencies and `inv_freq * pos` rounded to f32, then cos/sin), so a model
/// trained with `transformers` sees the same rotations; for f64 everything is f64.
pub fn tables(
    position_ids: &[u32],
    batch: usize,
    seq: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let f64_path = acc_dtype(dtype) == DType::F64;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| {
            if f64_path {
                1.0 / theta.powf((2 * i) as f64 / head_dim as f64)
            } else {
                let e = (2 * i) as f32 / head_dim as f32;
                (1.0f32 / (theta as f32).powf(e)) as f64
            }
        })
        .collect();
    let n = batch * seq;
    let mut cos = vec![0f64; n * head_dim];
    let mut sin = vec![0f64; n * head_dim];
    for (t, &p) in position_ids.iter().enumerate().take(n) {
        for (i, &f) in inv_freq.iter().enumerate() {
            let angle = if f64_path {
                p as f64 * f
            } else {
                (p as f32 * f as f32) as f64
            };
            let (s, c) = angle.sin_cos();
            let row = t * head_dim;
            cos[row + i] = c;
            cos[row + i + half] = c;
            sin[row + i] = s;
            sin[row + i + half] = s;
        }
    }
    let shape = (batch, 1, seq, head_dim);
    let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// `rotate_half(x) = cat(-x[.., d/2..], x[.., ..d/2])`.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// `x: [batch, heads, seq, head_dim]`; `y = x cos + rotate_half(x) sin`.
pub fn forward(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// Per pair the forward is `R(θ) = [[c, -s], [s, c]]`; its adjoint is
/// `R(θ)^T = R(-θ)`, so `dx = dy cos - rotate_half(dy) sin`.
pub fn backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    dy.broadcast_mul(cos)? - rotate_half(dy)?.broadcast_mul(sin)?
}
