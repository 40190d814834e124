//! Small data-movement and elementwise kernels (`rows.cu`, with their launchers,
//! CPU references and self-test here): row gathers and scatters (embedding lookup,
//! compacting the rows that carry a loss), dtype casts, in-place scaling, the sum of
//! squares behind gradient-norm clipping, and the LoRA dropout mask applied on the
//! device.
//!
//! The dropout mask is the counter-based hash of `qtrain_step::dropout_mask` (element
//! `i = row · cols + col` is kept when the 16-bit lane `i % 4` of
//! `splitmix64(base + i / 4)` is at least `ceil(p · 2¹⁶)`), so GPU and CPU drop exactly
//! the same elements and recomputation in the backward regenerates the same mask.

use crate::device::{
    check_disjoint, read_f32, read_mat, read_view, write_f32, write_mat, Dev, Float, Mat, View,
};
use crate::error::{ensure, Result};
use crate::selftest::{check, poisoned, random, rel_err, upload, Check};
use crate::to_f32_vec;

/// `out[i] = table[ids[i]]` for every row `i` of `out`.
pub fn gather_rows<T: Float>(
    dev: &Dev,
    table: Mat<'_, T>,
    ids: View<'_, u32>,
    out: Mat<'_, T>,
) -> Result<()> {
    ensure!(
        ids.len() == out.rows && table.cols == out.cols,
        "gather_rows",
        "{} ids for {} output rows; table rows have {} columns, output {}",
        ids.len(),
        out.rows,
        table.cols,
        out.cols
    );
    check_disjoint("gather_rows", &[out.span()], &[table.span(), ids.span()])?;
    let idx = dev_ids(dev, ids)?;
    if let Some(&bad) = idx.iter().find(|&&i| i as usize >= table.rows) {
        return Err(crate::error::shape_err(
            "gather_rows",
            format!(
                "row id {bad} out of range for a table of {} rows",
                table.rows
            ),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::gather_rows(c, table, ids, out, false);
    }
    let t = read_mat(table);
    let c = table.cols;
    let v: Vec<f32> = idx
        .iter()
        .flat_map(|&i| t[i as usize * c..(i as usize + 1) * c].to_vec())
        .collect();
    write_mat(out, &v);
    Ok(())
}

/// `out[ids[i]] = src[i]` for every row `i` of `src` (ids must be distinct); the
/// other rows of `out` are left as they are.
pub fn scatter_rows<T: Float>(
    dev: &Dev,
    src: Mat<'_, T>,
    ids: View<'_, u32>,
    out: Mat<'_, T>,
) -> Result<()> {
    ensure!(
        ids.len() == src.rows && src.cols == out.cols,
        "scatter_rows",
        "{} ids for {} source rows; source rows have {} columns, output {}",
        ids.len(),
        src.rows,
        src.cols,
        out.cols
    );
    check_disjoint("scatter_rows", &[out.span()], &[src.span(), ids.span()])?;
    let idx = dev_ids(dev, ids)?;
    let mut seen = vec![false; out.rows];
    for &i in &idx {
        ensure!(
            (i as usize) < out.rows && !seen[i as usize],
            "scatter_rows",
            "row id {i} repeated or out of range for {} rows",
            out.rows
        );
        seen[i as usize] = true;
    }
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::gather_rows(c, src, ids, out, true);
    }
    let s = read_mat(src);
    for (r, &i) in idx.iter().enumerate() {
        write_mat(
            out.row_block(i as usize, 1),
            &s[r * src.cols..(r + 1) * src.cols],
        );
    }
    Ok(())
}

/// Row ids are small host-made index lists; reading them back on the GPU costs a
/// transfer, so the range checks above only run on the CPU path.
fn dev_ids(dev: &Dev, ids: View<'_, u32>) -> Result<Vec<u32>> {
    if dev.is_cuda() {
        Ok(Vec::new())
    } else {
        Ok(read_view(ids))
    }
}

/// `dst = D(src · scale)`, elementwise.
pub fn cast<S: Float, D: Float>(
    dev: &Dev,
    src: View<'_, S>,
    dst: View<'_, D>,
    scale: f32,
) -> Result<()> {
    ensure!(
        src.len() == dst.len(),
        "cast",
        "{} elements into {}",
        src.len(),
        dst.len()
    );
    check_disjoint("cast", &[dst.span()], &[src.span()])?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::cast(c, src, dst, scale);
    }
    let _ = dev;
    let v: Vec<f32> = read_f32(src).into_iter().map(|x| x * scale).collect();
    write_f32(dst, &v);
    Ok(())
}

/// `v *= s` in place.
pub fn scale_in_place(dev: &Dev, v: View<'_, f32>, s: f32) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::scale(c, v, s);
    }
    let _ = dev;
    let x: Vec<f32> = read_f32(v).into_iter().map(|x| x * s).collect();
    write_f32(v, &x);
    Ok(())
}

/// `Σ v²` accumulated in f64 (in a fixed order on each device, so repeatable).
pub fn sum_squares(dev: &Dev, v: View<'_, f32>) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::sum_squares(c, v);
    }
    let _ = dev;
    Ok(read_f32(v).iter().map(|&x| x as f64 * x as f64).sum())
}

/// `splitmix64`, as in `qtrain_step::lora`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The mask's threshold for probability `p`: an element whose 16-bit hash lane is below
/// it is dropped, so `p` is rounded up to a multiple of 2⁻¹⁶ (`qtrain_step::dropout_mask`).
pub fn dropout_threshold(p: f64) -> u64 {
    (p * 65536.0).ceil().clamp(0.0, 65536.0) as u64
}

/// Whether element `idx` of the mask with hash base `base` is kept: the 16-bit lane
/// `idx % 4` of `splitmix64(base + idx / 4)` is at least `threshold` (one hash serves
/// four elements; the kernels are bound by the hash).
pub fn dropout_kept(base: u64, idx: u64, threshold: u64) -> bool {
    let w = splitmix64(base.wrapping_add(idx >> 2));
    (w >> (16 * (idx & 3))) & 0xffff >= threshold
}

/// CPU reference: `x · mask` for rows `row_offset..` of a `[rows, cols]` mask with
/// hash base `base` (see the module docs).
pub fn dropout_ref(x: &[f32], cols: usize, row_offset: usize, base: u64, p: f64) -> Vec<f32> {
    let thr = dropout_threshold(p);
    let keep = (1.0 / (1.0 - p)) as f32;
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let idx = (row_offset * cols + i) as u64;
            if dropout_kept(base, idx, thr) {
                v * keep
            } else {
                0.0
            }
        })
        .collect()
}

/// `out = x · mask` (inverted dropout with probability `p`); `x` holds rows
/// `row_offset..row_offset + x.rows` of the mask's row space.
pub fn dropout<T: Float>(
    dev: &Dev,
    x: Mat<'_, T>,
    out: Mat<'_, T>,
    base: u64,
    row_offset: usize,
    p: f64,
) -> Result<()> {
    ensure!(
        x.rows == out.rows && x.cols == out.cols,
        "dropout",
        "{}x{} into {}x{}",
        x.rows,
        x.cols,
        out.rows,
        out.cols
    );
    ensure!(
        (0.0..1.0).contains(&p),
        "dropout",
        "p = {p} must be in [0, 1)"
    );
    check_disjoint("dropout", &[out.span()], &[x.span()])?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::dropout(c, x, out, base, row_offset, p);
    }
    let _ = dev;
    write_mat(out, &dropout_ref(&read_mat(x), x.cols, row_offset, base, p));
    Ok(())
}

/// `dst += src`, elementwise over two matrices of one shape.
pub fn add_into<T: Float>(dev: &Dev, src: Mat<'_, T>, dst: Mat<'_, T>) -> Result<()> {
    ensure!(
        src.rows == dst.rows && src.cols == dst.cols,
        "add_into",
        "{}x{} into {}x{}",
        src.rows,
        src.cols,
        dst.rows,
        dst.cols
    );
    check_disjoint("add_into", &[dst.span()], &[src.span()])?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::add_into(c, src, dst);
    }
    let _ = dev;
    let s = read_mat(src);
    let d: Vec<f32> = read_mat(dst).iter().zip(&s).map(|(a, b)| a + b).collect();
    write_mat(dst, &d);
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::{grid_1d, kernel_name, launch, rows_cfg, CudaDev, PushKernelArg};
    use crate::device::{Float, FloatKind, Mat, View};
    use crate::error::{DeviceError, Result};
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rows.ptx"));

    pub(super) fn gather_rows<T: Float>(
        c: &CudaDev,
        src: Mat<'_, T>,
        ids: View<'_, u32>,
        out: Mat<'_, T>,
        scatter: bool,
    ) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let f = c.func("qtrain_rows", PTX, kernel_name::<T>("gather_rows"))?;
        let mut b = c.builder(&f);
        let (sp, lds, ip, op, ldo) = (
            src.dptr(),
            src.ld as u64,
            ids.dptr(),
            out.dptr(),
            out.ld as u64,
        );
        let (cols, sc) = (src.cols as u32, scatter as u32);
        b.arg(&sp)
            .arg(&lds)
            .arg(&ip)
            .arg(&op)
            .arg(&ldo)
            .arg(&cols)
            .arg(&sc);
        // SAFETY: arguments match `gather_rows_*`; ids were range-checked by the caller's
        // construction (the engine builds them from the batch).
        unsafe { launch("gather_rows", b, rows_cfg(ids.len(), 128)) }
    }

    pub(super) fn cast<S: Float, D: Float>(
        c: &CudaDev,
        src: View<'_, S>,
        dst: View<'_, D>,
        scale: f32,
    ) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let kname: &'static str = match (S::KIND, D::KIND) {
            (FloatKind::F32, FloatKind::Bf16) => "cast_f32_bf16",
            (FloatKind::F32, FloatKind::F16) => "cast_f32_f16",
            (FloatKind::F32, FloatKind::F32) => "cast_f32_f32",
            (FloatKind::Bf16, FloatKind::F32) => "cast_bf16_f32",
            (FloatKind::F16, FloatKind::F32) => "cast_f16_f32",
            (FloatKind::Bf16, FloatKind::Bf16) => "cast_bf16_bf16",
            (FloatKind::F16, FloatKind::F16) => "cast_f16_f16",
            (s, d) => {
                return Err(DeviceError::Unsupported {
                    op: "cast",
                    msg: format!("{s:?} -> {d:?}"),
                })
            }
        };
        let f = c.func("qtrain_rows", PTX, kname)?;
        let mut b = c.builder(&f);
        let (sp, dp, n) = (src.dptr(), dst.dptr(), src.len() as u64);
        b.arg(&sp).arg(&dp).arg(&n).arg(&scale);
        // SAFETY: arguments match `cast_*`; bounds-checked in the kernel.
        unsafe { launch("cast", b, grid_1d(src.len(), 256)) }
    }

    pub(super) fn scale(c: &CudaDev, v: View<'_, f32>, s: f32) -> Result<()> {
        if v.is_empty() {
            return Ok(());
        }
        let f = c.func("qtrain_rows", PTX, "scale_f32")?;
        let mut b = c.builder(&f);
        let (p, n) = (v.dptr(), v.len() as u64);
        b.arg(&p).arg(&n).arg(&s);
        // SAFETY: arguments match `scale_f32`; bounds-checked in the kernel.
        unsafe { launch("scale", b, grid_1d(v.len(), 256)) }
    }

    pub(super) fn sum_squares(c: &CudaDev, v: View<'_, f32>) -> Result<f64> {
        const BLOCKS: usize = 256;
        if v.is_empty() {
            return Ok(0.0);
        }
        let partial = c.alloc_zeroed(BLOCKS * 8, "sum of squares partials", 0)?;
        let f = c.func("qtrain_rows", PTX, "sum_squares_f32")?;
        let mut b = c.builder(&f);
        let (p, n, out) = (v.dptr(), v.len() as u64, partial.ptr());
        b.arg(&p).arg(&n).arg(&out);
        let cfg = LaunchConfig {
            grid_dim: (BLOCKS as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match `sum_squares_f32`; `partial` holds one f64 per block.
        unsafe { launch("sum_squares", b, cfg)? };
        let parts: Vec<f64> = c.dtoh(partial.ptr(), BLOCKS)?;
        Ok(parts.iter().sum())
    }

    pub(super) fn dropout<T: Float>(
        c: &CudaDev,
        x: Mat<'_, T>,
        out: Mat<'_, T>,
        base: u64,
        row_offset: usize,
        p: f64,
    ) -> Result<()> {
        if x.rows * x.cols == 0 {
            return Ok(());
        }
        let f = c.func("qtrain_rows", PTX, kernel_name::<T>("dropout"))?;
        let mut b = c.builder(&f);
        let (xp, ldx, op, ldo) = (x.dptr(), x.ld as u64, out.dptr(), out.ld as u64);
        let (rows, cols, ro) = (x.rows as u32, x.cols as u32, row_offset as u64);
        let thr = super::dropout_threshold(p);
        let keep = (1.0 / (1.0 - p)) as f32;
        b.arg(&xp)
            .arg(&ldx)
            .arg(&op)
            .arg(&ldo)
            .arg(&rows)
            .arg(&cols)
            .arg(&base)
            .arg(&ro)
            .arg(&thr)
            .arg(&keep);
        // SAFETY: arguments match `dropout_*`; bounds-checked in the kernel.
        unsafe { launch("dropout", b, grid_1d(x.rows * x.cols, 256)) }
    }

    pub(super) fn add_into<T: Float>(c: &CudaDev, src: Mat<'_, T>, dst: Mat<'_, T>) -> Result<()> {
        if src.rows * src.cols == 0 {
            return Ok(());
        }
        let f = c.func("qtrain_rows", PTX, kernel_name::<T>("add_into"))?;
        let mut b = c.builder(&f);
        let (sp, lds, dp, ldd) = (src.dptr(), src.ld as u64, dst.dptr(), dst.ld as u64);
        let (rows, cols) = (src.rows as u32, src.cols as u32);
        b.arg(&sp)
            .arg(&lds)
            .arg(&dp)
            .arg(&ldd)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: arguments match `add_into_*`; bounds-checked in the kernel.
        unsafe { launch("add_into", b, grid_1d(src.rows * src.cols, 256)) }
    }
}

/// Gather, scatter, dropout, add, cast, scaling and the sum of squares on `dev`
/// against the CPU references, chained on one set of random rows.
pub fn self_test<T: Float>(dev: &Dev) -> Result<Check> {
    let cpu = Dev::cpu();
    let (v, h, n) = (500, 96, 77);
    let table = random(v * h, 1.0, 9);
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % v as u32).collect();
    let x = random(n * h, 1.0, 10);
    let run = |d: &Dev| -> Result<Vec<f32>> {
        let tb = upload::<T>(d, &table)?;
        let ib = d.upload(&ids, "ids")?;
        let out = poisoned::<T>(d, n * h)?;
        gather_rows(d, tb.mat(v, h), ib.all(), out.mat(n, h))?;
        // Scatter back into a copy of the table, drop out, add, cast.
        let t2 = upload::<T>(d, &table)?;
        scatter_rows(d, out.mat(n, h), ib.all(), t2.mat(v, h))?;
        let xb = upload::<T>(d, &x)?;
        let xd = poisoned::<T>(d, n * h)?;
        dropout(d, xb.mat(n, h), xd.mat(n, h), 0x1234_5678, 3, 0.3)?;
        add_into(d, xd.mat(n, h), out.mat(n, h))?;
        let f = poisoned::<f32>(d, n * h)?;
        cast(d, out.all(), f.all(), 2.0)?;
        scale_in_place(d, f.all(), 0.5)?;
        let ss = sum_squares(d, f.all())?;
        let mut r = to_f32_vec(d, f.all())?;
        r.extend(to_f32_vec(d, t2.all())?);
        r.push(ss as f32);
        Ok(r)
    };
    Ok(check(
        format!("gather/scatter/dropout/add/cast/sum-of-squares {}", T::NAME),
        rel_err(&run(dev)?, &run(&cpu)?),
        1e-5,
        "",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask's definition, pinned: the first 64 keep flags (and a row-offset slice)
    /// of the mask with hash base 12345 at p = 0.3, from an independent model of the
    /// 16-bit-lane rule (Python). common.cuh and `qtrain_step::dropout_mask` draw the
    /// same elements; `qtrain doctor` compares the GPU's mask with this reference.
    #[test]
    fn dropout_mask_matches_its_definition() {
        assert_eq!(dropout_threshold(0.3), 19661);
        let flags = |x: &[f32]| -> String {
            x.iter()
                .map(|&v| if v != 0.0 { '1' } else { '0' })
                .collect()
        };
        let ones = vec![1.0f32; 64];
        assert_eq!(
            flags(&dropout_ref(&ones, 64, 0, 12345, 0.3)),
            "0110110111110001001001111001011110101101111111100011001111111111"
        );
        // Rows 3 and 4 of a 10-column mask: elements 30..50.
        assert_eq!(
            flags(&dropout_ref(&ones[..20], 10, 3, 12345, 0.3)),
            "11101011011111111000"
        );
        let kept = dropout_ref(&ones, 64, 0, 12345, 0.3);
        assert!(kept.iter().all(|&v| v == 0.0 || v == (1.0 / 0.7f64) as f32));
    }
}
