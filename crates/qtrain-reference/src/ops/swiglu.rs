//! The SwiGLU gate of the MLP: `m = silu(g) * u` with `silu(g) = g σ(g)`.
//!
//! Computed in the accumulation dtype from primitive ops (`σ(g) = 1/(1 + e^{-g})`;
//! for very negative `g`, `e^{-g}` overflows to +inf and `σ` correctly becomes 0).

use super::acc_dtype;
use candle_core::{Result, Tensor};

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// `g, u: [n, intermediate]` in the compute dtype; returns `silu(g) * u` in it.
pub fn forward(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let dtype = g.dtype();
    let acc = acc_dtype(dtype);
    let gf = g.to_dtype(acc)?;
    let silu = (&gf * sigmoid(&gf)?)?;
    (silu * u.to_dtype(acc)?)?.to_dtype(dtype)
}

/// `du = dm silu(g)` and `dg = dm u silu'(g)` with
/// `silu'(g) = σ(g) + g σ(g)(1 - σ(g)) = σ(g) (1 + g (1 - σ(g)))`.
pub fn backward(g: &Tensor, u: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
    let dtype = g.dtype();
    let acc = acc_dtype(dtype);
    let gf = g.to_dtype(acc)?;
    let uf = u.to_dtype(acc)?;
    let dmf = dm.to_dtype(acc)?;
    let s = sigmoid(&gf)?;
    let silu = (&gf * &s)?;
    let one_minus_s = s.affine(-1.0, 1.0)?;
    let dsilu = (&s * ((&gf * one_minus_s)? + 1.0)?)?;
    let du = (&dmf * silu)?;
    let dg = ((dmf * uf)? * dsilu)?;
    Ok((dg.to_dtype(dtype)?, du.to_dtype(dtype)?))
}
