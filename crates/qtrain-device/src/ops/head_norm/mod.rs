//! RMSNorm over each head of a row, Qwen 3's q/k norms (`q_h = rmsnorm(q_h) · w` over
//! each head's `head_dim`, for every q and k head, before RoPE; the weight `w:
//! [head_dim]` is frozen): the kernel (`head_norm.cu`), its launcher, its CPU
//! reference and its self-test.
//!
//! A row of `x: [n, heads · d]` (a column block of the fused q/k/v product, so with
//! its own leading dimension) holds `heads` segments of `d` elements; each segment
//! is normalized exactly as one row of [`super::rmsnorm`] is (the CPU reference *is*
//! [`rmsnorm_fwd_ref`]/[`rmsnorm_bwd_ref`] over the `[n · heads, d]` rows: a dense
//! `[n, heads · d]` matrix is that, row-major), and its inverse RMS is saved at
//! `inv[row · heads + head]` for the backward. This is the reference decoder's
//! per-head norm (`rmsnorm::reference` over the last axis of `[b, heads, t, d]`).
//!
//! The forward writes out of place (the backward needs the input); the backward
//! works in place, replacing the gradient at the norm's output by the gradient at
//! its input, so the engine's `dq`/`dk` stay where the q/k/v GEMM backward reads
//! them.

use super::rmsnorm::{rmsnorm_bwd_ref, rmsnorm_fwd_ref};
use crate::device::{
    check_disjoint, read_f32, read_mat, write_f32, write_mat, Dev, Float, Mat, View,
};
use crate::error::{ensure, Result};
use crate::selftest::{check, poisoned, random, rel_err, time_it, upload, Check};
use crate::to_f32_vec;

fn check_args<T: Float>(
    op: &'static str,
    x: Mat<'_, T>,
    head_dim: usize,
    w: View<'_, T>,
    other: Mat<'_, T>,
    inv: View<'_, f32>,
) -> Result<()> {
    ensure!(
        head_dim > 0 && x.cols.is_multiple_of(head_dim),
        op,
        "rows of {} elements are not whole heads of {head_dim}",
        x.cols
    );
    ensure!(
        w.len() == head_dim,
        op,
        "weight has {} elements, heads have {head_dim}",
        w.len()
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
        inv.len() == x.rows * (x.cols / head_dim),
        op,
        "inv_rms has {} entries for {} rows of {} heads",
        inv.len(),
        x.rows,
        x.cols / head_dim
    );
    Ok(())
}

/// `y = rmsnorm(x_h) · w` for every head `x_h` (`head_dim` elements) of every row
/// of `x`, saving `inv_rms: [rows · heads]`.
pub fn head_rmsnorm_fwd<T: Float>(
    dev: &Dev,
    x: Mat<'_, T>,
    head_dim: usize,
    w: View<'_, T>,
    eps: f32,
    y: Mat<'_, T>,
    inv_rms: View<'_, f32>,
) -> Result<()> {
    check_args("head_rmsnorm_fwd", x, head_dim, w, y, inv_rms)?;
    check_disjoint(
        "head_rmsnorm_fwd",
        &[y.span(), inv_rms.span()],
        &[x.span(), w.span()],
    )?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::fwd(c, x, head_dim, w, eps, y, inv_rms);
    }
    let _ = dev;
    let (yv, inv) = rmsnorm_fwd_ref::<T>(&read_mat(x), head_dim, &read_f32(w), eps);
    write_mat(y, &yv);
    write_f32(inv_rms, &inv);
    Ok(())
}

/// In place: `g` holds `∂L/∂y` of [`head_rmsnorm_fwd`] and is replaced by `∂L/∂x`
/// (the weight is frozen).
pub fn head_rmsnorm_bwd<T: Float>(
    dev: &Dev,
    x: Mat<'_, T>,
    head_dim: usize,
    inv_rms: View<'_, f32>,
    w: View<'_, T>,
    g: Mat<'_, T>,
) -> Result<()> {
    check_args("head_rmsnorm_bwd", x, head_dim, w, g, inv_rms)?;
    check_disjoint(
        "head_rmsnorm_bwd",
        &[g.span()],
        &[x.span(), w.span(), inv_rms.span()],
    )?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::bwd(c, x, head_dim, inv_rms, w, g);
    }
    let _ = dev;
    let dx = rmsnorm_bwd_ref(
        &read_mat(x),
        head_dim,
        &read_f32(inv_rms),
        &read_f32(w),
        &read_mat(g),
    );
    write_mat(g, &dx);
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::{grid_1d, kernel_name, launch, CudaDev, PushKernelArg};
    use crate::device::{Float, Mat, View};
    use crate::error::Result;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/head_norm.ptx"));

    /// Warps per block: one warp per (row, head) segment.
    const WARPS: usize = 4;

    pub(super) fn fwd<T: Float>(
        c: &CudaDev,
        x: Mat<'_, T>,
        head_dim: usize,
        w: View<'_, T>,
        eps: f32,
        y: Mat<'_, T>,
        inv: View<'_, f32>,
    ) -> Result<()> {
        let segs = x.rows * (x.cols / head_dim);
        if segs == 0 {
            return Ok(());
        }
        let f = c.func(
            "qtrain_head_norm",
            PTX,
            kernel_name::<T>("head_rmsnorm_fwd"),
        )?;
        let mut b = c.builder(&f);
        let (xp, ldx, wp, yp, ldy, ip) = (
            x.dptr(),
            x.ld as u64,
            w.dptr(),
            y.dptr(),
            y.ld as u64,
            inv.dptr(),
        );
        let (rows, heads, d) = (x.rows as u32, (x.cols / head_dim) as u32, head_dim as u32);
        b.arg(&xp)
            .arg(&ldx)
            .arg(&wp)
            .arg(&yp)
            .arg(&ldy)
            .arg(&ip)
            .arg(&rows)
            .arg(&heads)
            .arg(&d)
            .arg(&eps);
        // SAFETY: arguments match `head_rmsnorm_fwd_*`; one warp per checked segment,
        // the kernel skips warps past the last.
        unsafe {
            launch(
                "head_rmsnorm_fwd",
                b,
                grid_1d(segs * 32, (WARPS * 32) as u32),
            )
        }
    }

    pub(super) fn bwd<T: Float>(
        c: &CudaDev,
        x: Mat<'_, T>,
        head_dim: usize,
        inv: View<'_, f32>,
        w: View<'_, T>,
        g: Mat<'_, T>,
    ) -> Result<()> {
        let segs = x.rows * (x.cols / head_dim);
        if segs == 0 {
            return Ok(());
        }
        let f = c.func(
            "qtrain_head_norm",
            PTX,
            kernel_name::<T>("head_rmsnorm_bwd"),
        )?;
        let mut b = c.builder(&f);
        let (xp, ldx, ip, wp, gp, ldg) = (
            x.dptr(),
            x.ld as u64,
            inv.dptr(),
            w.dptr(),
            g.dptr(),
            g.ld as u64,
        );
        let (rows, heads, d) = (x.rows as u32, (x.cols / head_dim) as u32, head_dim as u32);
        b.arg(&xp)
            .arg(&ldx)
            .arg(&ip)
            .arg(&wp)
            .arg(&gp)
            .arg(&ldg)
            .arg(&rows)
            .arg(&heads)
            .arg(&d);
        // SAFETY: arguments match `head_rmsnorm_bwd_*`; as the forward.
        unsafe {
            launch(
                "head_rmsnorm_bwd",
                b,
                grid_1d(segs * 32, (WARPS * 32) as u32),
            )
        }
    }
}

/// Columns `col0..col0 + cols` of `b` viewed as `rows x ld`.
fn block<T: Float>(
    b: &crate::DBuf<T>,
    rows: usize,
    ld: usize,
    col0: usize,
    cols: usize,
) -> Mat<'_, T> {
    b.mat(rows, ld).col_block(col0, cols)
}

/// The forward and the in-place backward on `dev` against the CPU reference, on
/// column blocks of wider matrices (as q and k sit in the fused q/k/v buffer), and
/// the forward's bandwidth. `shape`: `(rows, heads, head_dim, ld)`.
pub fn self_test<T: Float>(
    dev: &Dev,
    (rows, heads, d, ld): (usize, usize, usize, usize),
    tol: f64,
) -> Result<Check> {
    let cpu = Dev::cpu();
    let cols = heads * d;
    assert!(
        ld > cols,
        "the self-test puts the heads at the end of longer rows"
    );
    let x = random(rows * ld, 2.0, 31);
    let w = random(d, 1.5, 32);
    let dy = random(rows * ld, 1.0, 33);
    type Outs = (Vec<f32>, Vec<f32>, Vec<f32>, f64);
    let run = |dv: &Dev| -> Result<Outs> {
        let (xb, wb, gb) = (
            upload::<T>(dv, &x)?,
            upload::<T>(dv, &w)?,
            upload::<T>(dv, &dy)?,
        );
        let y = poisoned::<T>(dv, rows * ld)?;
        let inv = poisoned::<f32>(dv, rows * heads)?;
        // The heads are the last `cols` columns of each row: with `ld - cols` and
        // `d` multiples of 8 the kernel takes its vector path, otherwise the scalar
        // one (`run_basic` runs both).
        let blk = |b| block(b, rows, ld, ld - cols, cols);
        head_rmsnorm_fwd(dv, blk(&xb), d, wb.all(), 1e-6, blk(&y), inv.all())?;
        head_rmsnorm_bwd(dv, blk(&xb), d, inv.all(), wb.all(), blk(&gb))?;
        let secs = time_it(dv, 10, || {
            head_rmsnorm_fwd(dv, blk(&xb), d, wb.all(), 1e-6, blk(&y), inv.all())
        })?;
        Ok((
            to_f32_vec(dv, y.all())?,
            to_f32_vec(dv, inv.all())?,
            to_f32_vec(dv, gb.all())?,
            secs,
        ))
    };
    let (y, inv, dx, secs) = run(dev)?;
    let (yr, invr, dxr, _) = run(&cpu)?;
    // Outside the block y stays NaN on both sides: compare the block only.
    let block =
        |v: &[f32]| -> Vec<f32> { v.chunks(ld).flat_map(|r| r[ld - cols..].to_vec()).collect() };
    let gbs = (rows * cols * 2 * std::mem::size_of::<T>()) as f64 / secs / 1e9;
    let err = rel_err(&block(&y), &block(&yr))
        .max(rel_err(&inv, &invr))
        .max(rel_err(&dx, &dxr));
    Ok(check(
        format!(
            "head rmsnorm fwd+bwd {} {rows}x{heads}x{d} (ld {ld})",
            T::NAME
        ),
        err,
        tol,
        &format!(", fwd {gbs:.0} GB/s"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rmsnorm::reference;
    use candle_core::{Device, Tensor};

    /// On the CPU the op is the reference decoder's per-head norm: the decoder's
    /// tensor form over `[n, heads, d]` gives the same output, inverse RMS (in the
    /// layout `[row · heads + head]`) and input gradient, up to the order of the
    /// f32 sums; the columns around the block are not touched.
    #[test]
    fn matches_the_decoders_per_head_norm_on_a_column_block() {
        let (n, heads, d, ld) = (9, 3, 12, 3 * 12 + 5);
        let dev = Dev::cpu();
        let x = random(n * ld, 2.0, 1);
        let w = random(d, 1.5, 2);
        let dy = random(n * ld, 1.0, 3);
        let (xb, wb, gb) = (
            upload::<f32>(&dev, &x).unwrap(),
            upload::<f32>(&dev, &w).unwrap(),
            upload::<f32>(&dev, &dy).unwrap(),
        );
        let y = upload::<f32>(&dev, &vec![7.0; n * ld]).unwrap();
        let inv = poisoned::<f32>(&dev, n * heads).unwrap();
        let blk = |b| block(b, n, ld, 2, heads * d);
        head_rmsnorm_fwd(&dev, blk(&xb), d, wb.all(), 1e-6, blk(&y), inv.all()).unwrap();
        head_rmsnorm_bwd(&dev, blk(&xb), d, inv.all(), wb.all(), blk(&gb)).unwrap();
        let (y, inv, dx) = (
            to_f32_vec(&dev, y.all()).unwrap(),
            to_f32_vec(&dev, inv.all()).unwrap(),
            to_f32_vec(&dev, gb.all()).unwrap(),
        );
        let block = |v: &[f32]| -> Vec<f32> {
            v.chunks(ld)
                .flat_map(|r| r[2..2 + heads * d].to_vec())
                .collect()
        };
        let outside = |v: &[f32]| -> Vec<f32> {
            v.chunks(ld)
                .flat_map(|r| r[..2].iter().chain(&r[2 + heads * d..]).copied())
                .collect::<Vec<_>>()
        };
        let t = |v: Vec<f32>| Tensor::from_vec(v, (n, heads, d), &Device::Cpu).unwrap();
        let wt = Tensor::from_slice(&w, d, &Device::Cpu).unwrap();
        let (yt, invt) = reference::forward(&t(block(&x)), &wt, 1e-6).unwrap();
        let dxt = reference::backward(&t(block(&x)), &invt, &wt, &t(block(&dy))).unwrap();
        let values = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let (ey, ei, ed) = (
            rel_err(&block(&y), &values(yt)),
            rel_err(&inv, &values(invt)),
            rel_err(&block(&dx), &values(dxt)),
        );
        assert!(ey < 1e-5 && ei < 1e-5 && ed < 1e-5, "{ey:e} {ei:e} {ed:e}");
        assert!(outside(&y).iter().all(|&v| v == 7.0));
        assert_eq!(outside(&dx), outside(&dy));
    }

    /// The backward is the derivative of the forward: central differences of
    /// `L = Σ y · r` (f32, step 1e-2) in random directions agree with `Σ dx · v`.
    #[test]
    fn backward_matches_finite_differences() {
        let (n, heads, d) = (3, 2, 8);
        let dev = Dev::cpu();
        let x = random(n * heads * d, 2.0, 11);
        let w = random(d, 1.5, 12);
        let r = random(n * heads * d, 1.0, 13);
        let loss = |x: &[f32]| -> f64 {
            let (y, _) = rmsnorm_fwd_ref::<f32>(x, d, &w, 1e-6);
            y.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let (xb, wb, gb) = (
            upload::<f32>(&dev, &x).unwrap(),
            upload::<f32>(&dev, &w).unwrap(),
            upload::<f32>(&dev, &r).unwrap(),
        );
        let (y, inv) = (
            poisoned::<f32>(&dev, x.len()).unwrap(),
            poisoned::<f32>(&dev, n * heads).unwrap(),
        );
        let m = |b| block(b, n, heads * d, 0, heads * d);
        head_rmsnorm_fwd(&dev, m(&xb), d, wb.all(), 1e-6, m(&y), inv.all()).unwrap();
        head_rmsnorm_bwd(&dev, m(&xb), d, inv.all(), wb.all(), m(&gb)).unwrap();
        let dx = to_f32_vec(&dev, gb.all()).unwrap();
        for seed in 0..4 {
            let v = random(x.len(), 1.0, 100 + seed);
            let h = 1e-2f32;
            let shifted =
                |s: f32| -> Vec<f32> { x.iter().zip(&v).map(|(a, b)| a + s * b).collect() };
            let fd = (loss(&shifted(h)) - loss(&shifted(-h))) / (2.0 * h as f64);
            let an: f64 = dx.iter().zip(&v).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!(
                (fd - an).abs() <= 2e-3 * an.abs().max(1.0),
                "direction {seed}: finite differences {fd} vs backward {an}"
            );
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        let dev = Dev::cpu();
        let x = upload::<f32>(&dev, &random(40, 1.0, 1)).unwrap();
        let y = poisoned::<f32>(&dev, 40).unwrap();
        let w = upload::<f32>(&dev, &random(8, 1.0, 2)).unwrap();
        let inv = poisoned::<f32>(&dev, 5).unwrap();
        let err = head_rmsnorm_fwd(
            &dev,
            x.mat(4, 10),
            8,
            w.all(),
            1e-6,
            y.mat(4, 10),
            inv.all(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not whole heads"), "{err}");
        let err = head_rmsnorm_fwd(&dev, x.mat(5, 8), 8, w.all(), 1e-6, x.mat(5, 8), inv.all())
            .unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
    }
}
