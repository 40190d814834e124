//! The frozen bias of a projection, `y[r, c] += b[c]` in place on the projection's
//! GEMM output (Qwen 2/2.5's q/k/v, Llama's `attention_bias`/`mlp_bias`): the kernel
//! (`bias.cu`), its launcher, its CPU reference ([`add_bias_ref`]) and its self-test.
//!
//! PEFT keeps the bias in the base layer and LoRA adds `s · B A x` beside it, so
//! the bias is frozen: it has no gradient and changes no input gradient; the
//! backward has nothing to do for it. The sum is f32, rounded once to the storage
//! type, which is what the reference decoder's `x Wᵀ + b` (candle's
//! `broadcast_add` of two compute-type tensors) computes. `y` may be a column block
//! of a wider matrix (the fused `[q | k | v]` product), with one concatenated bias.

use crate::device::{read_f32, read_mat, write_mat, Dev, Float, Mat, View};
use crate::error::{ensure, Result};
use crate::selftest::{check, random, rel_err, time_it, upload, Check};
use crate::to_f32_vec;

/// CPU reference on dense rows of `cols` elements: `round(y + b)` per element.
pub fn add_bias_ref<T: Float>(y: &[f32], cols: usize, b: &[f32]) -> Vec<f32> {
    y.iter()
        .enumerate()
        .map(|(i, &v)| T::round(v + b[i % cols]))
        .collect()
}

/// `y[r, c] += b[c]` for every row of `y` (in place; `b` has `y.cols` elements).
pub fn add_bias<T: Float>(dev: &Dev, y: Mat<'_, T>, b: View<'_, T>) -> Result<()> {
    ensure!(
        b.len() == y.cols,
        "add_bias",
        "bias has {} elements, rows have {}",
        b.len(),
        y.cols
    );
    crate::device::check_disjoint("add_bias", &[y.span()], &[b.span()])?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::add_bias(c, y, b);
    }
    let _ = dev;
    write_mat(y, &add_bias_ref::<T>(&read_mat(y), y.cols, &read_f32(b)));
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::{grid_1d, kernel_name, launch, vec8, CudaDev, PushKernelArg};
    use crate::device::{Float, Mat, View};
    use crate::error::Result;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bias.ptx"));

    pub(super) fn add_bias<T: Float>(c: &CudaDev, y: Mat<'_, T>, b: View<'_, T>) -> Result<()> {
        if y.rows * y.cols == 0 {
            return Ok(());
        }
        let vec = vec8::<T>(&[(y.dptr(), y.cols, y.ld), (b.dptr(), y.cols, y.cols)]);
        let per_thread = if vec { 8 } else { 1 };
        let f = c.func("qtrain_bias", PTX, kernel_name::<T>("add_bias"))?;
        let mut args = c.builder(&f);
        let (yp, ldy, bp) = (y.dptr(), y.ld as u64, b.dptr());
        let (rows, cols, v) = (y.rows as u32, y.cols as u32, vec as u32);
        args.arg(&yp)
            .arg(&ldy)
            .arg(&bp)
            .arg(&rows)
            .arg(&cols)
            .arg(&v);
        // SAFETY: arguments match `add_bias_*`; the kernel bounds-checks its index.
        unsafe { launch("add_bias", args, grid_1d(y.rows * y.cols / per_thread, 256)) }
    }
}

/// The bias added on `dev` against the CPU reference, into a column block of a
/// wider random matrix (the columns outside the block must stay as they were, and
/// they are compared too), with `cols` a multiple of 8 (the vector path) and not.
pub fn self_test<T: Float>(dev: &Dev, rows: usize, cols: usize, tol: f64) -> Result<Check> {
    let cpu = Dev::cpu();
    let mut worst = 0f64;
    let mut secs = 0f64;
    for (cols, ld, col0) in [(cols, cols + 16, 8), (cols + 3, cols + 16, 5)] {
        let y0 = random(rows * ld, 3.0, 21);
        let b = random(cols, 1.0, 22);
        let run = |d: &Dev| -> Result<(Vec<f32>, f64)> {
            let (yb, bb) = (upload::<T>(d, &y0)?, upload::<T>(d, &b)?);
            let y = yb.mat(rows, ld).col_block(col0, cols);
            add_bias(d, y, bb.all())?;
            let out = to_f32_vec(d, yb.all())?;
            let secs = time_it(d, 5, || add_bias(d, y, bb.all()))?;
            Ok((out, secs))
        };
        let (got, s) = run(dev)?;
        let (want, _) = run(&cpu)?;
        worst = worst.max(rel_err(&got, &want));
        secs = secs.max(s);
    }
    let gbs = (rows * cols * 2 * std::mem::size_of::<T>()) as f64 / secs / 1e9;
    Ok(check(
        format!("bias add {} {rows}x{cols} (+ unaligned)", T::NAME),
        worst,
        tol,
        &format!(", {gbs:.0} GB/s"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The reference is the reference decoder's `y + b` (candle's broadcast add of
    /// two tensors of the compute type), bit for bit, in f32 and bf16.
    #[test]
    fn reference_is_the_decoders_broadcast_add() {
        let (rows, cols) = (7, 24);
        let y = random(rows * cols, 3.0, 1);
        let b = random(cols, 1.0, 2);
        for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
            let yt = Tensor::from_slice(&y, (rows, cols), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let bt = Tensor::from_slice(&b, cols, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let want: Vec<f32> = yt
                .broadcast_add(&bt)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let values = |t: &Tensor| -> Vec<f32> {
                t.to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let got = if dtype == candle_core::DType::F32 {
                add_bias_ref::<f32>(&values(&yt), cols, &values(&bt))
            } else {
                add_bias_ref::<half::bf16>(&values(&yt), cols, &values(&bt))
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{dtype:?}");
        }
    }

    /// On a column block: every row gets the bias, the other columns are untouched,
    /// and a bias of the wrong length is refused.
    #[test]
    fn adds_to_a_column_block_only() {
        let dev = Dev::cpu();
        let (rows, ld) = (3, 10);
        let y0: Vec<f32> = (0..rows * ld).map(|i| i as f32).collect();
        let yb = upload::<f32>(&dev, &y0).unwrap();
        let bb = upload::<f32>(&dev, &[100.0, 200.0, 300.0]).unwrap();
        add_bias(&dev, yb.mat(rows, ld).col_block(4, 3), bb.all()).unwrap();
        let got = to_f32_vec(&dev, yb.all()).unwrap();
        for r in 0..rows {
            for c in 0..ld {
                let add = match c {
                    4 => 100.0,
                    5 => 200.0,
                    6 => 300.0,
                    _ => 0.0,
                };
                assert_eq!(got[r * ld + c], y0[r * ld + c] + add, "({r}, {c})");
            }
        }
        let err = add_bias(&dev, yb.mat(rows, ld).col_block(0, 4), bb.all()).unwrap_err();
        assert!(err.to_string().contains("bias has 3 elements"), "{err}");
    }
}
