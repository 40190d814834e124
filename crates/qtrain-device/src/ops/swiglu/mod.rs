//! The SwiGLU activation of the MLP, forward and backward: the kernel
//! (`swiglu.cu`), its launcher, its CPU reference ([`reference`], which is also the
//! reference decoder's SwiGLU) and its self-test.
//!
//! Forward: `m = silu(g) · u` with `silu(g) = g · σ(g)`, in f32, rounded once.
//! Backward, in place: with `s = σ(g)`, `silu'(g) = s · (1 + g · (1 − s))`,
//! `du = dm · silu(g)` and `dg = dm · u · silu'(g)` overwrite `u` and `g` (each
//! element is read before it is written by the same thread, and `g`/`u` are not
//! needed after the backward), which saves a `[n, 2I]` buffer.
//! `g` and `u` are usually the two column blocks of the fused gate/up product.

use super::{host_tensor, tensor_values};
use crate::device::{check_disjoint, read_mat, write_mat, Dev, Float, Mat};
use crate::error::{ensure, Result};
use crate::selftest::{check, poisoned, random, rel_err, time_it, upload, Check};
use crate::to_f32_vec;

/// The CPU reference in candle ops, on any device and in any float dtype: what the
/// reference decoder trains with and what the kernels are checked against.
/// Computed in the accumulation dtype from primitive ops (`σ(g) = 1/(1 + e^{-g})`;
/// for very negative `g`, `e^{-g}` overflows to +inf and `σ` correctly becomes 0).
pub mod reference {
    use super::super::acc_dtype;
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
        return cuda::swiglu(c, "swiglu_fwd", g, u, m);
    }
    let _ = dev;
    let (rows, cols) = (g.rows, g.cols);
    let mt = reference::forward(
        &host_tensor::<T>(read_mat(g), rows, cols)?,
        &host_tensor::<T>(read_mat(u), rows, cols)?,
    )?;
    write_mat(m, &tensor_values(&mt)?);
    Ok(())
}

/// In place: `g ← dg`, `u ← du` from `dm`.
pub fn swiglu_bwd<T: Float>(dev: &Dev, g: Mat<'_, T>, u: Mat<'_, T>, dm: Mat<'_, T>) -> Result<()> {
    same_shape("swiglu_bwd", g, u)?;
    same_shape("swiglu_bwd", g, dm)?;
    check_disjoint("swiglu_bwd", &[g.span(), u.span()], &[dm.span()])?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::swiglu(c, "swiglu_bwd", g, u, dm);
    }
    let _ = dev;
    let (rows, cols) = (g.rows, g.cols);
    let (dg, du) = reference::backward(
        &host_tensor::<T>(read_mat(g), rows, cols)?,
        &host_tensor::<T>(read_mat(u), rows, cols)?,
        &host_tensor::<T>(read_mat(dm), rows, cols)?,
    )?;
    write_mat(g, &tensor_values(&dg)?);
    write_mat(u, &tensor_values(&du)?);
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::{grid_1d, kernel_name, launch, vec8, CudaDev, PushKernelArg};
    use crate::device::{Float, Mat};
    use crate::error::Result;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));

    /// `swiglu_fwd_*` (`m` = the output) or `swiglu_bwd_*` (`m` = the incoming
    /// gradient): the same arguments.
    pub(super) fn swiglu<T: Float>(
        c: &CudaDev,
        base: &'static str,
        g: Mat<'_, T>,
        u: Mat<'_, T>,
        m: Mat<'_, T>,
    ) -> Result<()> {
        if g.rows * g.cols == 0 {
            return Ok(());
        }
        let vec = vec8::<T>(&[
            (g.dptr(), g.cols, g.ld),
            (u.dptr(), u.cols, u.ld),
            (m.dptr(), m.cols, m.ld),
        ]);
        let per_thread = if vec { 8 } else { 1 };
        let f = c.func("qtrain_swiglu", PTX, kernel_name::<T>(base))?;
        let mut b = c.builder(&f);
        let (gp, ldg, up, ldu, mp, ldm) = (
            g.dptr(),
            g.ld as u64,
            u.dptr(),
            u.ld as u64,
            m.dptr(),
            m.ld as u64,
        );
        let (rows, cols, v) = (g.rows as u32, g.cols as u32, vec as u32);
        b.arg(&gp)
            .arg(&ldg)
            .arg(&up)
            .arg(&ldu)
            .arg(&mp)
            .arg(&ldm)
            .arg(&rows)
            .arg(&cols)
            .arg(&v);
        // SAFETY: arguments match `swiglu_*`; the kernel bounds-checks its index.
        unsafe { launch(base, b, grid_1d(g.rows * g.cols / per_thread, 256)) }
    }
}

/// Forward then the in-place backward on `dev` against the CPU reference, on the
/// two column blocks of one gate/up buffer, and the forward's bandwidth.
pub fn self_test<T: Float>(dev: &Dev, rows: usize, inter: usize, tol: f64) -> Result<Check> {
    let cpu = Dev::cpu();
    let gu = random(rows * 2 * inter, 4.0, 6);
    let dm = random(rows * inter, 1.0, 7);
    let run = |d: &Dev| -> Result<(Vec<f32>, Vec<f32>, f64)> {
        let gub = upload::<T>(d, &gu)?;
        let dmb = upload::<T>(d, &dm)?;
        let m = poisoned::<T>(d, rows * inter)?;
        let full = gub.mat(rows, 2 * inter);
        let (g, u) = (full.col_block(0, inter), full.col_block(inter, inter));
        swiglu_fwd(d, g, u, m.mat(rows, inter))?;
        let secs = time_it(d, 5, || swiglu_fwd(d, g, u, m.mat(rows, inter)))?;
        swiglu_bwd(d, g, u, dmb.mat(rows, inter))?;
        Ok((to_f32_vec(d, m.all())?, to_f32_vec(d, gub.all())?, secs))
    };
    let (m, g, secs) = run(dev)?;
    let (mr, gr, _) = run(&cpu)?;
    let gbs = (rows * inter * 3 * std::mem::size_of::<T>()) as f64 / secs / 1e9;
    Ok(check(
        format!("swiglu fwd+bwd {} {rows}x{inter}", T::NAME),
        rel_err(&m, &mr).max(rel_err(&g, &gr)),
        tol,
        &format!(", fwd {gbs:.0} GB/s"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selftest::random;

    /// The tensor reference computes the kernel's formula bit for bit (f32): what
    /// lets the decoder and the kernels share it.
    #[test]
    fn reference_is_the_kernel_formula_bit_for_bit() {
        let (g, u, dm) = (
            random(4096, 8.0, 1),
            random(4096, 2.0, 2),
            random(4096, 1.0, 3),
        );
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let t = |v: &[f32]| host_tensor::<f32>(v.to_vec(), 64, 64).unwrap();
        let m = tensor_values(&reference::forward(&t(&g), &t(&u)).unwrap()).unwrap();
        let want: Vec<f32> = (0..g.len()).map(|i| g[i] * sigmoid(g[i]) * u[i]).collect();
        assert_eq!(bits(&m), bits(&want));
        let (dg, du) = reference::backward(&t(&g), &t(&u), &t(&dm)).unwrap();
        let (mut want_dg, mut want_du) = (Vec::new(), Vec::new());
        for i in 0..g.len() {
            let s = sigmoid(g[i]);
            want_du.push(dm[i] * (g[i] * s));
            want_dg.push(dm[i] * u[i] * (s * (1.0 + g[i] * (1.0 - s))));
        }
        assert_eq!(bits(&tensor_values(&dg).unwrap()), bits(&want_dg));
        assert_eq!(bits(&tensor_values(&du).unwrap()), bits(&want_du));
    }
}
