//! Matrix products `C = alpha · op(A) · op(B) + beta · C` on row-major matrices.
//!
//! On CUDA this is one `cublasGemmEx` call: bf16/f16 operands with f32 accumulation
//! (`CUBLAS_COMPUTE_32F`), or f32 operands on the TF32 tensor cores when
//! [`set_tf32`] allows it (the default, as the brief asks: TF32 for f32 matmuls on
//! Ampere and later). The output may be the operands' type or f32 (LoRA gradients
//! are accumulated in f32 straight from bf16 operands). `beta = 1` accumulates
//! into `C`, which is how residual adds and gradient accumulation are fused into
//! the product.
//!
//! cuBLAS is column-major; a row-major `X[r][c]` with leading dimension `ld` is the
//! column-major `Xᵀ`, so row-major `C = op(A) op(B)` is computed as column-major
//! `Cᵀ = op(B)ᵀ op(A)ᵀ`: the operands swap places and keep their transpose flags.
//!
//! The CPU reference accumulates each dot product in f32 in index order, then
//! applies `alpha`, `beta` and the rounding of the output type; with `beta = 0`
//! the old contents of `C` are never read (as in BLAS, NaN there does not leak).

use crate::device::{check_disjoint, read_mat, write_mat, Dev, Float, Mat};
use crate::error::{ensure, Result};
use std::sync::atomic::{AtomicBool, Ordering};

static TF32: AtomicBool = AtomicBool::new(true);

/// Allows (default) or forbids TF32 tensor cores for f32 products.
pub fn set_tf32(allow: bool) {
    TF32.store(allow, Ordering::Relaxed);
}

pub fn tf32_allowed() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// `op(A)` is `A` or `Aᵀ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

fn dims<T: Float>(m: Mat<'_, T>, op: Op) -> (usize, usize) {
    match op {
        Op::N => (m.rows, m.cols),
        Op::T => (m.cols, m.rows),
    }
}

/// `c = alpha · op(a) · op(b) + beta · c` with `op(a): [m, k]`, `op(b): [k, n]`,
/// `c: [m, n]`. `c` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub fn gemm<TI: Float, TO: Float>(
    dev: &Dev,
    a: Mat<'_, TI>,
    op_a: Op,
    b: Mat<'_, TI>,
    op_b: Op,
    c: Mat<'_, TO>,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let (m, k) = dims(a, op_a);
    let (k2, n) = dims(b, op_b);
    ensure!(
        k == k2 && c.rows == m && c.cols == n,
        "gemm",
        "op(A) is {m}x{k}, op(B) is {k2}x{n}, C is {}x{}",
        c.rows,
        c.cols
    );
    ensure!(
        TO::KIND == TI::KIND || TO::KIND == crate::FloatKind::F32,
        "gemm",
        "output type {} with {} operands",
        TO::NAME,
        TI::NAME
    );
    check_disjoint("gemm", &[c.span()], &[a.span(), b.span()])?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if let Some(cuda) = dev.cuda() {
        return cuda_gemm(cuda, a, op_a, b, op_b, c, (m, n, k), alpha, beta);
    }
    let _ = dev;
    let av = read_mat(a);
    let bv = read_mat(b);
    let cv = if beta != 0.0 {
        read_mat(c)
    } else {
        vec![0.0; m * n]
    };
    let out = gemm_reference(
        &av,
        a.cols,
        op_a,
        &bv,
        b.cols,
        op_b,
        &cv,
        (m, n, k),
        alpha,
        beta,
    );
    write_mat(c, &out);
    Ok(())
}

/// The reference product on dense row-major f32 arrays: `a` has `a_cols` columns
/// as stored (before `op_a`), likewise `b`; returns `c` as a dense `m x n` array.
#[allow(clippy::too_many_arguments)]
pub fn gemm_reference(
    a: &[f32],
    a_cols: usize,
    op_a: Op,
    b: &[f32],
    b_cols: usize,
    op_b: Op,
    c: &[f32],
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> Vec<f32> {
    // Lay op(A) out by rows and op(B) by columns so each dot product is contiguous.
    let a_rows: Vec<f32> = match op_a {
        Op::N => a.to_vec(),
        Op::T => (0..m)
            .flat_map(|i| (0..k).map(move |p| a[p * a_cols + i]))
            .collect(),
    };
    let b_cols_major: Vec<f32> = match op_b {
        Op::N => (0..n)
            .flat_map(|j| (0..k).map(move |p| b[p * b_cols + j]))
            .collect(),
        Op::T => b.to_vec(),
    };
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        let ar = &a_rows[i * k..(i + 1) * k];
        for j in 0..n {
            let bc = &b_cols_major[j * k..(j + 1) * k];
            let mut acc = 0f32;
            for p in 0..k {
                acc += ar[p] * bc[p];
            }
            out[i * n + j] = if beta == 0.0 {
                alpha * acc
            } else {
                alpha * acc + beta * c[i * n + j]
            };
        }
    }
    out
}

#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn cuda_gemm<TI: Float, TO: Float>(
    cuda: &crate::cuda::CudaDev,
    a: Mat<'_, TI>,
    op_a: Op,
    b: Mat<'_, TI>,
    op_b: Op,
    c: Mat<'_, TO>,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> Result<()> {
    use crate::cuda::cuda_err;
    use candle_core::cuda_backend::cudarc::cublas::sys;
    let dt = |k: crate::FloatKind| match k {
        crate::FloatKind::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
        crate::FloatKind::F16 => sys::cudaDataType_t::CUDA_R_16F,
        crate::FloatKind::F32 => sys::cudaDataType_t::CUDA_R_32F,
    };
    let cop = |o: Op| match o {
        Op::N => sys::cublasOperation_t::CUBLAS_OP_N,
        Op::T => sys::cublasOperation_t::CUBLAS_OP_T,
    };
    let compute = if TI::KIND == crate::FloatKind::F32 && tf32_allowed() {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    // A leading dimension must be at least the stored row length, even for 1 row.
    let ld = |x: usize, cols: usize| x.max(cols).max(1) as i32;
    let blas = cuda.blas();
    // SAFETY: dimensions and leading dimensions were checked against the views by
    // the caller; alpha/beta are f32 as CUBLAS_COMPUTE_32F* requires; the handle is
    // bound to our stream.
    let status = unsafe {
        sys::cublasGemmEx(
            *blas.handle(),
            cop(op_b),
            cop(op_a),
            n as i32,
            m as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            b.dptr() as *const _,
            dt(TI::KIND),
            ld(b.ld, b.cols),
            a.dptr() as *const _,
            dt(TI::KIND),
            ld(a.ld, a.cols),
            &beta as *const f32 as *const _,
            c.dptr() as *mut _,
            dt(TO::KIND),
            ld(c.ld, c.cols),
            compute,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    };
    if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(cuda_err("cublasGemmEx", (status, m, n, k)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn all_transpose_combinations_match_naive_products_and_beta_accumulates() {
        let dev = Dev::cpu();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let c0: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let want = |i: usize, j: usize| (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>();
        let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
        for (op_a, op_b) in [
            (Op::N, Op::N),
            (Op::T, Op::N),
            (Op::N, Op::T),
            (Op::T, Op::T),
        ] {
            let (ad, ar, ac) = if op_a == Op::N {
                (&a, m, k)
            } else {
                (&at, k, m)
            };
            let (bd, br, bc) = if op_b == Op::N {
                (&b, k, n)
            } else {
                (&bt, n, k)
            };
            let ab = dev.upload(ad, "a").unwrap();
            let bb = dev.upload(bd, "b").unwrap();
            let cb = dev.upload(&c0, "c").unwrap();
            gemm(
                &dev,
                ab.mat(ar, ac),
                op_a,
                bb.mat(br, bc),
                op_b,
                cb.mat(m, n),
                2.0,
                1.0,
            )
            .unwrap();
            let got = dev.download(cb.all()).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let w = 2.0 * want(i, j) + c0[i * n + j];
                    assert!(
                        (got[i * n + j] - w).abs() < 1e-5,
                        "{op_a:?}{op_b:?} ({i},{j})"
                    );
                }
            }
        }
    }

    #[test]
    fn strided_blocks_and_shape_errors() {
        let dev = Dev::cpu();
        // C is the right 2 columns of a 3x4 buffer; A a 3x2 block of a 3x5 buffer.
        let a = dev
            .upload(&(0..15).map(|x| x as f32).collect::<Vec<_>>(), "a")
            .unwrap();
        let b = dev.upload(&[1.0f32, 0.0, 0.0, 1.0], "b").unwrap();
        let c = dev.upload(&[f32::NAN; 12], "c").unwrap();
        let am = a.mat(3, 5).col_block(1, 2);
        let cm = c.mat(3, 4).col_block(2, 2);
        gemm(&dev, am, Op::N, b.mat(2, 2), Op::N, cm, 1.0, 0.0).unwrap();
        let got = dev.download(c.all()).unwrap();
        assert_eq!(&got[2..4], &[1.0, 2.0]);
        assert_eq!(&got[6..8], &[6.0, 7.0]);
        assert!(got[0].is_nan(), "columns outside the block are untouched");
        let err = gemm(&dev, am, Op::T, b.mat(2, 2), Op::N, cm, 1.0, 0.0).unwrap_err();
        assert!(err.to_string().contains("op(A) is 2x3"), "{err}");
        let err = gemm(
            &dev,
            a.mat(3, 5).col_block(0, 2),
            Op::N,
            b.mat(2, 2),
            Op::N,
            a.mat(3, 5).col_block(1, 2),
            1.0,
            0.0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
    }
}
