//! FP8 for the frozen base's products (`train.precision = "fp8"`): E4M3
//! quantization with one f32 scale per row (`fp8.cu`, its launchers, the CPU
//! reference on `qtrain_quant::fp8`), and the scaled FP8 GEMM (cuBLASLt on the
//! GPU, `lt.rs`; a plain f32 loop over the decoded codes on the CPU), with their
//! self-tests.
//!
//! The scheme: a product `Y = X Wᵀ` of an activation `X [n, k]` and a frozen weight
//! `W [o, k]` becomes `Y[t, j] = sx[t] · sw[j] · Σ qx[t, p] qw[j, p]` with `X`
//! quantized per token (row) and `W` per output channel (row), FP32 accumulation in
//! the tensor cores, and both scales applied in the GEMM's epilogue (cuBLASLt's
//! "outer vector" scaling, CUDA 12.9+; Ada and Hopper, compute capability 8.9+).
//! The input gradient `dX = dY W` is the same form with `dY` per token and `Wᵀ`
//! per input channel ([`quantize_cols_t`] writes the transposed codes). A per-row
//! scale cannot be factored out of a sum over that row's own index, which is why
//! each orientation of the weight has its own quantization.
//!
//! The CPU path computes exactly the same codes and scales (bit for bit, tested on
//! the GPU by `qtrain doctor`) and the product in f32 from the decoded codes, so
//! the fused engine's FP8 mode runs on the CPU as an emulation of the GPU's
//! arithmetic (up to the order of the f32 sums): that is how CI tests the
//! orchestration and how the quality of the scheme is measured on small models.

use crate::device::{check_disjoint, read_mat, read_view, write_mat, Dev, Float, Mat, View};
use crate::error::{ensure, Result};
use crate::selftest::{check, random, rel_err, time_it, upload, Check};
use qtrain_quant::fp8::{amax, e4m3_from_f32, e4m3_to_f32, row_scale};

#[cfg(feature = "cuda")]
mod lt;

/// Whether FP8 products can run on `dev`: the CPU always (the reference
/// arithmetic), a GPU from compute capability 8.9 (Ada, Hopper); `Err` says why not.
pub fn support(dev: &Dev) -> std::result::Result<(), String> {
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        let (major, minor) = c.compute_capability().map_err(|e| e.to_string())?;
        if (major, minor) < (8, 9) {
            return Err(format!(
                "FP8 tensor cores need compute capability 8.9 or newer (Ada: L4, L40S, RTX \
                 40xx; Hopper: H100, H200); {} has {major}.{minor}",
                c.name().unwrap_or_else(|_| "this GPU".into())
            ));
        }
        return Ok(());
    }
    let _ = dev;
    Ok(())
}

fn read_codes(m: Mat<'_, u8>) -> Vec<u8> {
    let all = read_view(m.v);
    (0..m.rows)
        .flat_map(|r| all[r * m.ld..r * m.ld + m.cols].iter().copied())
        .collect()
}

fn write_codes(m: Mat<'_, u8>, codes: &[u8]) {
    assert_eq!(codes.len(), m.rows * m.cols);
    let p = m.v.host_ptr();
    for r in 0..m.rows {
        for c in 0..m.cols {
            // SAFETY: (r, c) lies inside the matrix; outputs are disjoint from inputs.
            unsafe { p.add(r * m.ld + c).write(codes[r * m.cols + c]) };
        }
    }
}

fn write_scales(v: View<'_, f32>, s: &[f32]) {
    let p = v.host_ptr();
    for (i, &x) in s.iter().enumerate() {
        // SAFETY: in bounds (checked by the callers).
        unsafe { p.add(i).write(x) };
    }
}

/// CPU reference of [`quantize_rows`] on a dense `[rows, cols]` array: the codes
/// (dense) and one scale per row.
pub fn quantize_rows_ref(x: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut q = vec![0u8; rows * cols];
    let scales = (0..rows)
        .map(|r| qtrain_quant::fp8::quantize_row(&x[r * cols..(r + 1) * cols], &mut q[r * cols..]))
        .collect();
    (q, scales)
}

/// CPU reference of [`quantize_cols_t`] on a dense `[rows, cols]` array: the codes
/// of the transpose (dense `[cols, rows]`) and one scale per column.
pub fn quantize_cols_t_ref(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut qt = vec![0u8; rows * cols];
    let mut scales = Vec::with_capacity(cols);
    for c in 0..cols {
        let (scale, inv) = row_scale(amax((0..rows).map(|r| w[r * cols + c])));
        for r in 0..rows {
            qt[c * rows + r] = e4m3_from_f32(w[r * cols + c] * inv);
        }
        scales.push(scale);
    }
    (qt, scales)
}

/// `q[r, :] = e4m3(x[r, :] / scale[r])` with `scale[r] = max |x[r, :]| / 448`:
/// activations per token, a weight `[out, in]` per output channel.
pub fn quantize_rows<T: Float>(
    dev: &Dev,
    x: Mat<'_, T>,
    q: Mat<'_, u8>,
    scale: View<'_, f32>,
) -> Result<()> {
    ensure!(
        q.rows == x.rows && q.cols == x.cols && scale.len() == x.rows,
        "fp8 quantize_rows",
        "x is {}x{}, codes {}x{}, {} scales",
        x.rows,
        x.cols,
        q.rows,
        q.cols,
        scale.len()
    );
    if x.rows * x.cols == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::quantize_rows(c, x, q, scale);
    }
    let _ = dev;
    let (codes, s) = quantize_rows_ref(&read_mat(x), x.rows, x.cols);
    write_codes(q, &codes);
    write_scales(scale, &s);
    Ok(())
}

/// `qt[c, :] = e4m3(w[:, c] / scale[c])` with `scale[c] = max |w[:, c]| / 448`: the
/// transpose of a weight `[out, in]` quantized per input channel, for `dX = dY W`.
pub fn quantize_cols_t<T: Float>(
    dev: &Dev,
    w: Mat<'_, T>,
    qt: Mat<'_, u8>,
    scale: View<'_, f32>,
) -> Result<()> {
    ensure!(
        qt.rows == w.cols && qt.cols == w.rows && scale.len() == w.cols,
        "fp8 quantize_cols_t",
        "w is {}x{}, transposed codes {}x{}, {} scales",
        w.rows,
        w.cols,
        qt.rows,
        qt.cols,
        scale.len()
    );
    if w.rows * w.cols == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::quantize_cols_t(c, w, qt, scale);
    }
    let _ = dev;
    let (codes, s) = quantize_cols_t_ref(&read_mat(w), w.rows, w.cols);
    write_codes(qt, &codes);
    write_scales(scale, &s);
    Ok(())
}

/// CPU reference of [`gemm_fp8`] on dense arrays: `c[i, j] = sa[i] · sb[j] ·
/// Σ_p e4m3(a[i, p]) e4m3(b[j, p]) + beta · c[i, j]`, the sum in f32 in index order.
#[allow(clippy::too_many_arguments)]
pub fn gemm_fp8_ref(
    a: &[u8],
    sa: &[f32],
    b: &[u8],
    sb: &[f32],
    c: &[f32],
    (m, n, k): (usize, usize, usize),
    beta: f32,
) -> Vec<f32> {
    let decode = |codes: &[u8]| codes.iter().map(|&q| e4m3_to_f32(q)).collect::<Vec<f32>>();
    let (ad, bd) = (decode(a), decode(b));
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        let ar = &ad[i * k..(i + 1) * k];
        for j in 0..n {
            let br = &bd[j * k..(j + 1) * k];
            let acc: f32 = ar.iter().zip(br).fold(0.0, |s, (x, y)| s + x * y);
            let v = sa[i] * sb[j] * acc;
            out[i * n + j] = if beta == 0.0 {
                v
            } else {
                v + beta * c[i * n + j]
            };
        }
    }
    out
}

/// `c = diag(sa) · A · Bᵀ · diag(sb) + beta · c` with FP8 E4M3 codes `a: [m, k]`,
/// `b: [n, k]` (both row-major, `k` contiguous: what cuBLASLt's FP8 GEMM requires)
/// and f32 accumulation. `fast_accum`: Hopper's faster FP8 accumulation (no periodic
/// promotion to f32 inside the tensor cores; used for the forward products).
#[allow(clippy::too_many_arguments)]
pub fn gemm_fp8<T: Float>(
    dev: &Dev,
    a: Mat<'_, u8>,
    sa: View<'_, f32>,
    b: Mat<'_, u8>,
    sb: View<'_, f32>,
    c: Mat<'_, T>,
    beta: f32,
    fast_accum: bool,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.rows);
    ensure!(
        b.cols == k && c.rows == m && c.cols == n && sa.len() == m && sb.len() == n,
        "gemm_fp8",
        "A is {m}x{k} ({} scales), B is {}x{} ({} scales), C is {}x{}",
        sa.len(),
        b.rows,
        b.cols,
        sb.len(),
        c.rows,
        c.cols
    );
    check_disjoint("gemm_fp8", &[c.span()], &[a.span(), b.span()])?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if let Some(cu) = dev.cuda() {
        return lt::gemm_fp8(cu, a, sa, b, sb, c, beta, fast_accum);
    }
    let _ = (dev, fast_accum);
    let cv = if beta != 0.0 {
        read_mat(c)
    } else {
        vec![0.0; m * n]
    };
    let out = gemm_fp8_ref(
        &read_codes(a),
        &read_view(sa),
        &read_codes(b),
        &read_view(sb),
        &cv,
        (m, n, k),
        beta,
    );
    write_mat(c, &out);
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::{grid_1d, kernel_name, launch, row_threads, rows_cfg, CudaDev};
    use crate::cuda::{LaunchConfig, PushKernelArg};
    use crate::device::{Float, Mat, View};
    use crate::error::Result;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fp8.ptx"));

    pub(super) fn quantize_rows<T: Float>(
        c: &CudaDev,
        x: Mat<'_, T>,
        q: Mat<'_, u8>,
        scale: View<'_, f32>,
    ) -> Result<()> {
        let vec = crate::cuda::vec8::<T>(&[(x.dptr(), x.cols, x.ld)])
            && q.ld.is_multiple_of(8)
            && q.dptr().is_multiple_of(8);
        let f = c.func("qtrain_fp8", PTX, kernel_name::<T>("fp8_quant_rows"))?;
        let mut b = c.builder(&f);
        let (xp, ldx, qp, ldq, sp) = (x.dptr(), x.ld as u64, q.dptr(), q.ld as u64, scale.dptr());
        let (cols, v) = (x.cols as u32, vec as u32);
        b.arg(&xp)
            .arg(&ldx)
            .arg(&qp)
            .arg(&ldq)
            .arg(&sp)
            .arg(&cols)
            .arg(&v);
        // SAFETY: arguments match `fp8_quant_rows_*`; one block per row of `x`.
        unsafe {
            launch(
                "fp8_quant_rows",
                b,
                rows_cfg(x.rows, row_threads(x.cols).min(256)),
            )
        }
    }

    pub(super) fn quantize_cols_t<T: Float>(
        c: &CudaDev,
        w: Mat<'_, T>,
        qt: Mat<'_, u8>,
        scale: View<'_, f32>,
    ) -> Result<()> {
        // The amax accumulates in `scale` (zeroed: atomicMax on non-negative bits).
        c.memset0(scale.dptr(), scale.len() * 4)?;
        let (wp, ldw, sp) = (w.dptr(), w.ld as u64, scale.dptr());
        let (rows, cols) = (w.rows as u32, w.cols as u32);
        const RPB: u32 = 256;
        let f = c.func("qtrain_fp8", PTX, kernel_name::<T>("fp8_col_amax"))?;
        let mut b = c.builder(&f);
        b.arg(&wp)
            .arg(&ldw)
            .arg(&sp)
            .arg(&rows)
            .arg(&cols)
            .arg(&RPB);
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(256), rows.div_ceil(RPB), 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match `fp8_col_amax_*`; threads past `cols` return.
        unsafe { launch("fp8_col_amax", b, cfg)? };
        let f = c.func("qtrain_fp8", PTX, kernel_name::<T>("fp8_quant_cols_t"))?;
        let mut b = c.builder(&f);
        let (qp, ldq) = (qt.dptr(), qt.ld as u64);
        b.arg(&wp)
            .arg(&ldw)
            .arg(&sp)
            .arg(&qp)
            .arg(&ldq)
            .arg(&rows)
            .arg(&cols);
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(32), rows.div_ceil(32), 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match `fp8_quant_cols_t_*`; the kernel bounds-checks.
        unsafe { launch("fp8_quant_cols_t", b, cfg)? };
        let f = c.func("qtrain_fp8", PTX, "fp8_amax_to_scale")?;
        let mut b = c.builder(&f);
        b.arg(&sp).arg(&cols);
        // SAFETY: one thread per scale, bounds-checked.
        unsafe { launch("fp8_amax_to_scale", b, grid_1d(w.cols, 256)) }
    }
}

/// What one device produces in the quantization self-test: row codes and scales,
/// transposed codes and scales, and the seconds one row quantization took.
type QuantRun = (Vec<u8>, Vec<f32>, Vec<u8>, Vec<f32>, f64);

/// Both quantizations on `dev` against the CPU reference, bit for bit (codes and
/// scales), on strided random inputs of mixed magnitudes with an all-zero row and
/// column, in the vector path (`cols` a multiple of 8) and the scalar one.
pub fn self_test_quant<T: Float>(dev: &Dev, rows: usize, cols: usize) -> Result<Check> {
    let cpu = Dev::cpu();
    let mut mismatches = 0usize;
    let mut secs = 0f64;
    for (cols, ld) in [(cols, cols + 8), (cols + 3, cols + 5)] {
        let mut x = random(rows * ld, 1.0, 41);
        for (i, v) in x.iter_mut().enumerate() {
            // Rows of very different sizes, like activations with outlier tokens.
            *v *= [1e-3f32, 0.5, 20.0, 3e3][(i / ld) % 4];
        }
        for c in 0..cols {
            x[ld + c] = 0.0; // row 1 all zero
        }
        for r in 0..rows {
            x[r * ld + 2] = 0.0; // column 2 all zero
        }
        let run = |d: &Dev| -> Result<QuantRun> {
            let xb = upload::<T>(d, &x)?;
            let xm = xb.all().mat(rows, cols, ld);
            let (q, s) = (d.zeros::<u8>(rows * cols, "q")?, d.zeros::<f32>(rows, "s")?);
            let (qt, st) = (
                d.zeros::<u8>(rows * cols, "qt")?,
                d.zeros::<f32>(cols, "st")?,
            );
            quantize_rows(d, xm, q.mat(rows, cols), s.all())?;
            quantize_cols_t(d, xm, qt.mat(cols, rows), st.all())?;
            let secs = time_it(d, 5, || quantize_rows(d, xm, q.mat(rows, cols), s.all()))?;
            Ok((
                d.download(q.all())?,
                d.download(s.all())?,
                d.download(qt.all())?,
                d.download(st.all())?,
                secs,
            ))
        };
        let (q, s, qt, st, t) = run(dev)?;
        let (wq, ws, wqt, wst, _) = run(&cpu)?;
        let differ = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count();
        let differ_f = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count()
        };
        mismatches += differ(&q, &wq) + differ(&qt, &wqt) + differ_f(&s, &ws) + differ_f(&st, &wst);
        secs = secs.max(t);
    }
    let gbs = (rows * cols * (std::mem::size_of::<T>() * 2 + 1)) as f64 / secs / 1e9;
    Ok(check(
        format!("fp8 quantize rows + transposed columns {} {rows}x{cols} (+ unaligned), codes and scales differing", T::NAME),
        mismatches as f64,
        0.0,
        &format!(", rows {gbs:.0} GB/s"),
    ))
}

/// The scaled FP8 GEMM on `dev` against the CPU reference: bf16 output with beta 0
/// and 1 (the fused residual add) into a column block, with and without fast
/// accumulation, on codes quantized from random data.
pub fn self_test_gemm<T: Float>(dev: &Dev, tol: f64) -> Result<Check> {
    let cpu = Dev::cpu();
    let (m, n, k) = (96, 80, 128);
    let a = random(m * k, 2.0, 51);
    let b = random(n * k, 0.05, 52);
    let c0 = random(m * (n + 16), 1.0, 53);
    let mut worst = 0f64;
    for (beta, fast) in [(0.0, true), (1.0, false), (1.0, true)] {
        let run = |d: &Dev| -> Result<Vec<f32>> {
            let (ab, bb) = (upload::<f32>(d, &a)?, upload::<f32>(d, &b)?);
            let (qa, sa) = (d.zeros::<u8>(m * k, "qa")?, d.zeros::<f32>(m, "sa")?);
            let (qb, sb) = (d.zeros::<u8>(n * k, "qb")?, d.zeros::<f32>(n, "sb")?);
            quantize_rows(d, ab.mat(m, k), qa.mat(m, k), sa.all())?;
            quantize_rows(d, bb.mat(n, k), qb.mat(n, k), sb.all())?;
            let c = upload::<T>(d, &c0)?;
            let cm = c.all().mat(m, n + 16, n + 16).col_block(16, n);
            gemm_fp8(
                d,
                qa.mat(m, k),
                sa.all(),
                qb.mat(n, k),
                sb.all(),
                cm,
                beta,
                fast,
            )?;
            crate::to_f32_vec(d, c.all())
        };
        worst = worst.max(rel_err(&run(dev)?, &run(&cpu)?));
    }
    Ok(check(
        format!(
            "gemm fp8 e4m3 -> {} (row/column scales, beta 0 and 1, strided C)",
            T::NAME
        ),
        worst,
        tol,
        "",
    ))
}

/// FP8 GEMM throughput on a Mistral-7B layer's products at 4096 tokens (codes
/// ready, scales applied in the epilogue), beside `gemm::speed`'s bf16 figures.
pub fn speed(dev: &Dev) -> Result<Vec<Check>> {
    let t = 4096;
    let mut out = Vec::new();
    for (name, o, k) in [
        ("qkv fwd", 6144, 4096),
        ("gate/up fwd", 28672, 4096),
        ("down fwd", 4096, 14336),
        ("gate/up dX", 4096, 28672),
    ] {
        let qa = dev.upload(&vec![0x38u8; t * k], "qa")?;
        let qb = dev.upload(&vec![0x30u8; o * k], "qb")?;
        let sa = dev.upload(&vec![1f32; t], "sa")?;
        let sb = dev.upload(&vec![1f32; o], "sb")?;
        let c = dev.zeros::<half::bf16>(t * o, "c")?;
        let secs = time_it(dev, 20, || {
            gemm_fp8(
                dev,
                qa.mat(t, k),
                sa.all(),
                qb.mat(o, k),
                sb.all(),
                c.mat(t, o),
                0.0,
                true,
            )
        })?;
        let tflops = 2.0 * (t * o * k) as f64 / secs / 1e12;
        out.push(Check {
            name: format!("gemm fp8 speed {name} [{t}x{k}]x[{k}x{o}]"),
            ok: true,
            detail: format!("{:.1} us, {tflops:.0} TFLOP/s", secs * 1e6),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_product_is_close_to_the_exact_one() {
        let dev = Dev::cpu();
        let (m, n, k) = (7, 5, 64);
        let a = random(m * k, 3.0, 1);
        let b = random(n * k, 0.1, 2);
        let (ab, bb) = (
            upload::<f32>(&dev, &a).unwrap(),
            upload::<f32>(&dev, &b).unwrap(),
        );
        let (qa, sa) = (
            dev.zeros::<u8>(m * k, "qa").unwrap(),
            dev.zeros::<f32>(m, "sa").unwrap(),
        );
        let (qb, sb) = (
            dev.zeros::<u8>(n * k, "qb").unwrap(),
            dev.zeros::<f32>(n, "sb").unwrap(),
        );
        quantize_rows(&dev, ab.mat(m, k), qa.mat(m, k), sa.all()).unwrap();
        quantize_rows(&dev, bb.mat(n, k), qb.mat(n, k), sb.all()).unwrap();
        let c = dev.upload(&vec![1.0f32; m * n], "c").unwrap();
        gemm_fp8(
            &dev,
            qa.mat(m, k),
            sa.all(),
            qb.mat(n, k),
            sb.all(),
            c.mat(m, n),
            1.0,
            true,
        )
        .unwrap();
        let got = dev.download(c.all()).unwrap();
        let exact = crate::gemm::gemm_reference(
            &a,
            k,
            crate::Op::N,
            &b,
            k,
            crate::Op::T,
            &vec![1.0; m * n],
            (m, n, k),
            1.0,
            1.0,
        );
        // E4M3 keeps 3 mantissa bits: each product term is off by up to ~2⁻³, and
        // over 64 random terms the errors mostly cancel.
        let err = rel_err(&got, &exact);
        assert!(err < 0.03, "relative error {err}");
        assert!(err > 0.0, "the product went through FP8");
    }

    #[test]
    fn transposed_quantization_matches_quantizing_the_transpose_by_rows() {
        let (rows, cols) = (9, 13);
        let w = random(rows * cols, 2.0, 3);
        let wt: Vec<f32> = (0..cols * rows)
            .map(|i| w[(i % rows) * cols + i / rows])
            .collect();
        assert_eq!(
            quantize_cols_t_ref(&w, rows, cols),
            quantize_rows_ref(&wt, cols, rows)
        );
    }

    #[test]
    fn shapes_are_checked() {
        let dev = Dev::cpu();
        let x = dev.zeros::<f32>(12, "x").unwrap();
        let q = dev.zeros::<u8>(12, "q").unwrap();
        let s = dev.zeros::<f32>(4, "s").unwrap();
        let err = quantize_rows(&dev, x.mat(3, 4), q.mat(3, 4), s.all()).unwrap_err();
        assert!(
            err.to_string().contains("3 scales") || err.to_string().contains("4 scales"),
            "{err}"
        );
        let err = quantize_cols_t(&dev, x.mat(3, 4), q.mat(3, 4), s.view(0, 3)).unwrap_err();
        assert!(err.to_string().contains("transposed codes 3x4"), "{err}");
    }

    #[test]
    fn self_tests_pass_on_the_cpu_against_themselves() {
        let dev = Dev::cpu();
        let c = self_test_quant::<f32>(&dev, 13, 40).unwrap();
        assert!(c.ok, "{}: {}", c.name, c.detail);
        let c = self_test_gemm::<half::bf16>(&dev, 1e-6).unwrap();
        assert!(c.ok, "{}: {}", c.name, c.detail);
    }
}
