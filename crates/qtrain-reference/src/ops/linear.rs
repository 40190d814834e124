//! A frozen linear map with an optional LoRA branch (PEFT's `lora.Linear`):
//! `y = x W^T + s · (dropout(x) A^T) B^T` with `W: [out, in]` frozen,
//! `A: [r, in]`, `B: [out, r]` trainable and `s` the LoRA scale.
//!
//! The frozen weight is passed in by the caller, who dequantizes it just before and
//! drops it right after; it never gets a gradient. The LoRA branch runs in the
//! adapters' dtype (f32, or f64 in the finite-difference tests) regardless of the
//! compute dtype, so its gradients are accumulated at full precision.

use candle_core::{Result, Tensor};

/// The trainable side of one projection.
pub struct LoraBranch<'a> {
    /// `[r, in]`
    pub a: &'a Tensor,
    /// `[out, r]`
    pub b: &'a Tensor,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// Inverted-dropout mask `[n, in]` in the adapters' dtype (0 or `1/(1-p)`);
    /// `None` when dropout is off.
    pub dropout_mask: Option<Tensor>,
}

impl LoraBranch<'_> {
    /// `dropout(x)` in the adapters' dtype.
    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(self.a.dtype())?;
        match &self.dropout_mask {
            Some(m) => xf * m,
            None => Ok(xf),
        }
    }
}

/// `x: [n, in]`, `w: [out, in]`. Returns `y: [n, out]` in the dtype of `x` and, when
/// there is a LoRA branch, `z = dropout(x) A^T: [n, r]`, saved for the backward.
pub fn forward(
    x: &Tensor,
    w: &Tensor,
    lora: Option<&LoraBranch>,
) -> Result<(Tensor, Option<Tensor>)> {
    let y = x.matmul(&w.t()?)?;
    match lora {
        None => Ok((y, None)),
        Some(l) => {
            let z = l.dropped(x)?.matmul(&l.a.t()?)?;
            let yl = (z.matmul(&l.b.t()?)? * l.scale)?.to_dtype(y.dtype())?;
            Ok(((y + yl)?, Some(z)))
        }
    }
}

/// What the backward of one projection produces.
pub struct LinearGrads {
    /// `∂L/∂x`, present when the frozen weight was passed (i.e. it was asked for).
    pub dx: Option<Tensor>,
    /// `(∂L/∂A, ∂L/∂B)` in the adapters' dtype, when there is a LoRA branch.
    pub lora: Option<(Tensor, Tensor)>,
}

/// Backward of [`forward`] given `dy = ∂L/∂y: [n, out]`.
///
/// Frozen path: `dx = dy W`. LoRA path with `x_d = dropout(x)` and `z = x_d A^T`:
/// `y_l = s z B^T`, so `dB = s dy^T z`, `dz = s dy B`, `dA = dz^T x_d`, and
/// `dx += dz A` passed back through the same dropout mask (the mask is a
/// per-element scale, hence self-adjoint). `w = None` skips `dx` entirely (the
/// first layer's input needs none: the embedding is frozen), which also spares the
/// caller a dequantization.
pub fn backward(
    x: &Tensor,
    w: Option<&Tensor>,
    lora: Option<&LoraBranch>,
    z: Option<&Tensor>,
    dy: &Tensor,
) -> Result<LinearGrads> {
    let mut dx = match w {
        Some(w) => Some(dy.matmul(w)?),
        None => None,
    };
    let mut grads = None;
    if let Some(l) = lora {
        let z = z.expect("LoRA forward saves z");
        let dyf = dy.to_dtype(l.a.dtype())?;
        let db = (dyf.t()?.matmul(z)? * l.scale)?;
        let dz = (dyf.matmul(l.b)? * l.scale)?;
        let da = dz.t()?.matmul(&l.dropped(x)?)?;
        if let Some(d) = dx.as_mut() {
            let mut dxl = dz.matmul(l.a)?;
            if let Some(m) = &l.dropout_mask {
                dxl = (dxl * m)?;
            }
            *d = (&*d + dxl.to_dtype(d.dtype())?)?;
        }
        grads = Some((da, db));
    }
    Ok(LinearGrads { dx, lora: grads })
}
