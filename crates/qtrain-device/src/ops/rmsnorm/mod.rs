//! RMSNorm, `y = w · x / sqrt(mean(x²) + eps)` with a frozen weight `w`: the kernel
//! (`rmsnorm.cu`), its launcher, its CPU reference ([`rmsnorm_fwd_ref`],
//! [`rmsnorm_bwd_ref`]), the reference decoder's RMSNorm in tensor ops
//! ([`reference`]) and the self-test.
//!
//! The math has two forms here, on purpose: the kernel's oracle is the kernel's f32
//! row loop (sums in index order, as CI's engine-on-CPU runs it), while the
//! reference decoder needs the same formula as candle tensor ops (it runs on GPUs
//! too, and in f64 for its finite-difference tests). The two differ only in the
//! order of the f32 sums (candle's are vectorized), a test checks they agree to
//! that rounding, and neither is allowed to drift: the engine's end-to-end
//! comparison with the decoder (`qtrain-train`'s tests) is sensitive to the last
//! bits of its ops.
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
use crate::selftest::{check, poisoned, random, rel_err, time_it, upload, Check};
use crate::to_f32_vec;

/// The reference decoder's RMSNorm in candle ops, on any device and in any float
/// dtype (f64 for its finite-difference tests); equal to the kernel's reference up
/// to the order of the f32 sums (see the module docs).
pub mod reference {
    use super::super::acc_dtype;
    use candle_core::{Result, Tensor, D};

    /// `x: [.., h]`, `weight: [h]`. Returns `y` (dtype of `x`) and the saved inverse
    /// RMS `r = 1/sqrt(mean(x^2) + eps)` with shape `[.., 1]` in the accumulation
    /// dtype. Like Hugging Face's `MistralRMSNorm`, the statistics are computed in
    /// f32 (or f64) and the normalized value is cast back to the compute dtype
    /// before the multiplication by the weight.
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
}

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

fn check_args<T: Float>(
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
    check_args("rmsnorm_fwd", x, w, y, inv_rms)?;
    check_disjoint(
        "rmsnorm_fwd",
        &[y.span(), inv_rms.span()],
        &[x.span(), w.span()],
    )?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::rmsnorm_fwd(c, x, w, eps, y, inv_rms);
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
    check_args("rmsnorm_bwd", x, w, dy, inv_rms)?;
    check_args("rmsnorm_bwd", x, w, dx, inv_rms)?;
    check_disjoint(
        "rmsnorm_bwd",
        &[dx.span()],
        &[x.span(), w.span(), dy.span(), inv_rms.span()],
    )?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::rmsnorm_bwd(c, x, inv_rms, w, dy, dx, accumulate);
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

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::{kernel_name, launch, row_threads, rows_cfg, CudaDev, PushKernelArg};
    use crate::device::{Float, Mat, View};
    use crate::error::Result;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rmsnorm.ptx"));

    pub(super) fn rmsnorm_fwd<T: Float>(
        c: &CudaDev,
        x: Mat<'_, T>,
        w: View<'_, T>,
        eps: f32,
        y: Mat<'_, T>,
        inv: View<'_, f32>,
    ) -> Result<()> {
        if x.rows == 0 {
            return Ok(());
        }
        let f = c.func("qtrain_norm", PTX, kernel_name::<T>("rmsnorm_fwd"))?;
        let mut b = c.builder(&f);
        let (xp, ldx, wp, yp, ldy, ip) = (
            x.dptr(),
            x.ld as u64,
            w.dptr(),
            y.dptr(),
            y.ld as u64,
            inv.dptr(),
        );
        let cols = x.cols as u32;
        b.arg(&xp)
            .arg(&ldx)
            .arg(&wp)
            .arg(&yp)
            .arg(&ldy)
            .arg(&ip)
            .arg(&cols)
            .arg(&eps);
        // SAFETY: arguments match `rmsnorm_fwd_*`; one block per row of checked matrices.
        unsafe { launch("rmsnorm_fwd", b, rows_cfg(x.rows, row_threads(x.cols))) }
    }

    pub(super) fn rmsnorm_bwd<T: Float>(
        c: &CudaDev,
        x: Mat<'_, T>,
        inv: View<'_, f32>,
        w: View<'_, T>,
        dy: Mat<'_, T>,
        dx: Mat<'_, T>,
        accumulate: bool,
    ) -> Result<()> {
        if x.rows == 0 {
            return Ok(());
        }
        let f = c.func("qtrain_norm", PTX, kernel_name::<T>("rmsnorm_bwd"))?;
        let mut b = c.builder(&f);
        let (xp, ldx, ip, wp) = (x.dptr(), x.ld as u64, inv.dptr(), w.dptr());
        let (dyp, lddy, dxp, lddx) = (dy.dptr(), dy.ld as u64, dx.dptr(), dx.ld as u64);
        let (cols, acc) = (x.cols as u32, accumulate as u32);
        b.arg(&xp)
            .arg(&ldx)
            .arg(&ip)
            .arg(&wp)
            .arg(&dyp)
            .arg(&lddy)
            .arg(&dxp)
            .arg(&lddx)
            .arg(&cols)
            .arg(&acc);
        // SAFETY: arguments match `rmsnorm_bwd_*`; one block per row.
        unsafe { launch("rmsnorm_bwd", b, rows_cfg(x.rows, row_threads(x.cols))) }
    }
}

/// The forward and the accumulating backward on `dev` against the CPU reference on
/// random rows, and the forward's bandwidth.
pub fn self_test<T: Float>(dev: &Dev, rows: usize, cols: usize, tol: f64) -> Result<Vec<Check>> {
    let cpu = Dev::cpu();
    let x = random(rows * cols, 2.0, 1);
    let w = random(cols, 1.5, 2);
    let dy = random(rows * cols, 1.0, 3);
    let old = random(rows * cols, 1.0, 4);
    type Outs = (Vec<f32>, Vec<f32>, Vec<f32>, f64);
    let run = |d: &Dev| -> Result<Outs> {
        let (xb, wb, dyb) = (
            upload::<T>(d, &x)?,
            upload::<T>(d, &w)?,
            upload::<T>(d, &dy)?,
        );
        let y = poisoned::<T>(d, rows * cols)?;
        let inv = poisoned::<f32>(d, rows)?;
        rmsnorm_fwd(
            d,
            xb.mat(rows, cols),
            wb.all(),
            1e-5,
            y.mat(rows, cols),
            inv.all(),
        )?;
        let dx = upload::<T>(d, &old)?;
        rmsnorm_bwd(
            d,
            xb.mat(rows, cols),
            inv.all(),
            wb.all(),
            dyb.mat(rows, cols),
            dx.mat(rows, cols),
            true,
        )?;
        let secs = time_it(d, 10, || {
            rmsnorm_fwd(
                d,
                xb.mat(rows, cols),
                wb.all(),
                1e-5,
                y.mat(rows, cols),
                inv.all(),
            )
        })?;
        Ok((
            to_f32_vec(d, y.all())?,
            to_f32_vec(d, inv.all())?,
            to_f32_vec(d, dx.all())?,
            secs,
        ))
    };
    let (y, inv, dx, secs) = run(dev)?;
    let (yr, invr, dxr, _) = run(&cpu)?;
    let gbs = (rows * cols * 2 * std::mem::size_of::<T>()) as f64 / secs / 1e9;
    let t = T::NAME;
    Ok(vec![
        check(
            format!("rmsnorm fwd {t} {rows}x{cols}"),
            rel_err(&y, &yr).max(rel_err(&inv, &invr)),
            tol,
            &format!(", {gbs:.0} GB/s"),
        ),
        check(
            format!("rmsnorm bwd (accumulate) {t} {rows}x{cols}"),
            rel_err(&dx, &dxr),
            tol,
            "",
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selftest::{random, rel_err};
    use candle_core::{Device, Tensor};

    /// The decoder's tensor form and the kernel's row loop compute the same
    /// function: forward, inverse RMS and backward agree to f32 rounding of the sums.
    #[test]
    fn tensor_form_agrees_with_the_kernel_reference() {
        for (rows, cols) in [(37, 64), (5, 4096)] {
            let x = random(rows * cols, 2.0, 1);
            let w = random(cols, 1.5, 2);
            let dy = random(rows * cols, 1.0, 3);
            let (y, inv) = rmsnorm_fwd_ref::<f32>(&x, cols, &w, 1e-5);
            let dx = rmsnorm_bwd_ref(&x, cols, &inv, &w, &dy);
            let t = |v: &[f32], shape: (usize, usize)| {
                Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
            };
            let (xt, wt) = (t(&x, (rows, cols)), t(&w, (1, cols)).flatten_all().unwrap());
            let (yt, invt) = reference::forward(&xt, &wt, 1e-5).unwrap();
            let dxt = reference::backward(&xt, &invt, &wt, &t(&dy, (rows, cols))).unwrap();
            let values = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let (ey, ei, ed) = (
                rel_err(&values(yt), &y),
                rel_err(&values(invt), &inv),
                rel_err(&values(dxt), &dx),
            );
            assert!(
                ey < 1e-5 && ei < 1e-5 && ed < 1e-5,
                "{rows}x{cols}: {ey:e} {ei:e} {ed:e}"
            );
        }
    }
}
