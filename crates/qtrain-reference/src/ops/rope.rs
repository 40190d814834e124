//! Rotary position embedding in Hugging Face's `rotate_half` convention: the pair
//! rotated together is `(x_i, x_{i + d/2})`, by the angle `pos * inv_freq[i]`
//! (`theta^(-2i/d)` for the default variant; scaled variants in `qtrain_model::rope`),
//! with `cos` and `sin` multiplied by the variant's attention scaling (yarn).
//!
//! Positions come from the batch's `position_ids`, so packed documents restart at
//! zero. The backward of a rotation is the rotation by the opposite angle, i.e. the
//! forward with `-sin`.

use super::acc_dtype;
use candle_core::{DType, Device, Result, Tensor, D};
use qtrain_model::{RopePrecision, RopeSpec};

/// `cos` and `sin` tables `[batch, 1, seq, head_dim]` for the given positions
/// (`position_ids` is `[batch * seq]`, row-major), in `dtype` on `device`, with the
/// model's RoPE variant and attention scaling (`qtrain_model::rope`, the one place
/// frequencies are computed; `dynamic` sees the largest position of the batch, as
/// transformers' `max(position_ids) + 1`).
///
/// For f32/bf16 the angles are computed the way Hugging Face does (inverse
/// frequencies and `inv_freq * pos` rounded to f32, then cos/sin), as the fused
/// engine's tables are (both come from `RopeSpec::tables`), so a model trained with
/// `transformers` sees the same rotations; for f64 everything is f64.
pub fn tables(
    rope: &RopeSpec,
    position_ids: &[u32],
    batch: usize,
    seq: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let precision = if acc_dtype(dtype) == DType::F64 {
        RopePrecision::F64
    } else {
        RopePrecision::F32
    };
    let n = batch * seq;
    let t = rope.tables(&position_ids[..n], precision);
    let shape = (batch, 1, seq, rope.head_dim);
    let cos = Tensor::from_vec(t.cos, shape, device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(t.sin, shape, device)?.to_dtype(dtype)?;
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
