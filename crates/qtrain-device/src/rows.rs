//! Small data-movement and elementwise kernels (`kernels/rows.cu`): row gathers and
//! scatters (embedding lookup, compacting the rows that carry a loss), dtype casts,
//! in-place scaling, the sum of squares behind gradient-norm clipping, and the LoRA
//! dropout mask applied on the device.
//!
//! The dropout mask is the counter-based hash of `qtrain_step::dropout_mask`
//! (`splitmix64(base + row · cols + col)`, kept when the top 53 bits are at least
//! `p · 2⁵³`), so GPU and CPU drop exactly the same elements and recomputation in
//! the backward regenerates the same mask.

use crate::device::{
    check_disjoint, read_f32, read_mat, read_view, write_f32, write_mat, Dev, Float, Mat, View,
};
use crate::error::{ensure, Result};

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
        return crate::launch::gather_rows(c, table, ids, out, false);
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
        return crate::launch::gather_rows(c, src, ids, out, true);
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
        return crate::launch::cast(c, src, dst, scale);
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
        return crate::launch::scale(c, v, s);
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
        return crate::launch::sum_squares(c, v);
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

/// The integer form of "drop when `u < p`" for `u = (h >> 11) · 2⁻⁵³`: drop when
/// `h >> 11 < threshold`. Exact, because `(h >> 11) · 2⁻⁵³` is exact in f64.
pub fn dropout_threshold(p: f64) -> u64 {
    (p * (1u64 << 53) as f64).ceil() as u64
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
            if splitmix64(base.wrapping_add(idx)) >> 11 < thr {
                0.0
            } else {
                v * keep
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
        return crate::launch::dropout(c, x, out, base, row_offset, p);
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
        return crate::launch::add_into(c, src, dst);
    }
    let _ = dev;
    let s = read_mat(src);
    let d: Vec<f32> = read_mat(dst).iter().zip(&s).map(|(a, b)| a + b).collect();
    write_mat(dst, &d);
    Ok(())
}
