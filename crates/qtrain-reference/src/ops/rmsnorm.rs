//! RMSNorm, `y = w * x / sqrt(mean(x^2) + eps)`, with a frozen weight `w`.
//!
//! Like Hugging Face's `MistralRMSNorm`, the statistics are computed in f32 (or
//! f64) and the normalized value is cast back to the compute dtype before the
//! multiplication by the weight.

use super::acc_dtype;
use candle_core::{Result, Tensor, D};

/// `x: [.., h]`, `weight: [h]`. Returns `y` (dtype of `x`) and the saved inverse
/// RMS `r = 1/sqrt(mean(x^2) + eps)` with shape `[.., 1]` in the accumulation dtype.
pub fn forward(x: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let dtype = x.dtype();
    let xf = x.to_dtype(acc_dtype(dtype))?;
    let inv_rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let y = xf
        .broadcast_mul(&inv_rms)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)?;
    Ok((y, inv_rms))
}

/// Gradient with respect to `x` only (the weight is frozen).
///
/// With `g = dy * w` and `x̂ = x r`, `y_i = w_i x_i r` and `∂r/∂x_j = -r^3 x_j / h`,
/// so `dx_j = r g_j - r^3 x_j Σ_i g_i x_i / h = r (g_j - x̂_j · mean(g ∘ x̂))`.
pub fn backward(x: &Tensor, inv_rms: &Tensor, weight: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let acc = acc_dtype(dtype);
    let g = dy.to_dtype(acc)?.broadcast_mul(&weight.to_dtype(acc)?)?;
    let xhat = x.to_dtype(acc)?.broadcast_mul(inv_rms)?;
    let c = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (g - xhat.broadcast_mul(&c)?)?.broadcast_mul(inv_rms)?;
    dx.to_dtype(dtype)
}
