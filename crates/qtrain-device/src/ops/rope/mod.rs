//! Rotary position embedding, forward and backward, in place: the kernel
//! (`rope.cu`), its launcher, its CPU reference ([`rope_ref`]) and its self-test.
//!
//! `x: [n, heads · d]` holds one row per token (a column block of the fused q/k/v
//! buffer). Each head's vector is rotated in pairs `(x[i], x[i + d/2])` by the
//! angle `pos · θ^(−2i/d)` (Hugging Face's `rotate_half` convention):
//! `y₁ = x₁ cos − x₂ sin`, `y₂ = x₂ cos + x₁ sin`. The backward is the inverse
//! rotation (the transpose of a rotation), `inverse = true`.
//!
//! The cos/sin tables (`[n, d/2]` f32) are made on the host: the engine takes them
//! from the model's RoPE variant (`qtrain_model::rope`, as the reference decoder
//! does, so both paths rotate by identical angles); [`rope_tables`] gives the
//! default variant's, for the self-test.

use crate::device::{read_f32, read_mat, write_mat, Dev, Float, Mat, View};
use crate::error::{ensure, Result};
use crate::selftest::{check, random, rel_err, upload, Check};
use crate::to_f32_vec;

/// `(cos, sin)` of every position's angles `pos · θ^(−2i/d)`, each `[n, head_dim / 2]`,
/// computed the way Hugging Face does (inverse frequencies and `inv_freq · pos`
/// rounded to f32, then cos/sin in f64), so a model trained with `transformers`
/// sees the same rotations (the default variant; equal to `qtrain_model::rope`'s).
pub fn rope_angles(position_ids: &[u32], head_dim: usize, theta: f64) -> (Vec<f64>, Vec<f64>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(position_ids.len() * half);
    let mut sin = Vec::with_capacity(position_ids.len() * half);
    for &p in position_ids {
        for &f in &inv_freq {
            let angle = (p as f32 * f) as f64;
            let (s, c) = angle.sin_cos();
            cos.push(c);
            sin.push(s);
        }
    }
    (cos, sin)
}

/// `(cos, sin)`, each `[n, head_dim / 2]` f32, for the given positions.
pub fn rope_tables(position_ids: &[u32], head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let (cos, sin) = rope_angles(position_ids, head_dim, theta);
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (f32s(cos), f32s(sin))
}

/// CPU reference on a dense `[n, heads * d]` array.
pub fn rope_ref(
    x: &[f32],
    n: usize,
    heads: usize,
    d: usize,
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) -> Vec<f32> {
    let half = d / 2;
    let mut y = x.to_vec();
    for t in 0..n {
        for h in 0..heads {
            let base = t * heads * d + h * d;
            for i in 0..half {
                let (c, s) = (cos[t * half + i], sin[t * half + i]);
                let s = if inverse { -s } else { s };
                let (x1, x2) = (x[base + i], x[base + i + half]);
                y[base + i] = x1 * c - x2 * s;
                y[base + i + half] = x2 * c + x1 * s;
            }
        }
    }
    y
}

/// Rotates every head of `x` in place; `inverse` for the backward.
pub fn rope<T: Float>(
    dev: &Dev,
    x: Mat<'_, T>,
    head_dim: usize,
    cos: View<'_, f32>,
    sin: View<'_, f32>,
    inverse: bool,
) -> Result<()> {
    ensure!(
        head_dim.is_multiple_of(2) && head_dim > 0 && x.cols.is_multiple_of(head_dim),
        "rope",
        "row length {} is not a whole number of heads of (even) dim {head_dim}",
        x.cols
    );
    let half = head_dim / 2;
    ensure!(
        cos.len() == x.rows * half && sin.len() == x.rows * half,
        "rope",
        "tables have {} / {} entries, need {} rows x {half}",
        cos.len(),
        sin.len(),
        x.rows
    );
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::rope(c, x, head_dim, cos, sin, inverse);
    }
    let _ = dev;
    let y = rope_ref(
        &read_mat(x),
        x.rows,
        x.cols / head_dim,
        head_dim,
        &read_f32(cos),
        &read_f32(sin),
        inverse,
    );
    write_mat(x, &y);
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::{grid_1d, kernel_name, launch, CudaDev, PushKernelArg};
    use crate::device::{Float, Mat, View};
    use crate::error::Result;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));

    pub(super) fn rope<T: Float>(
        c: &CudaDev,
        x: Mat<'_, T>,
        head_dim: usize,
        cos: View<'_, f32>,
        sin: View<'_, f32>,
        inverse: bool,
    ) -> Result<()> {
        let total = x.rows * x.cols / 2;
        if total == 0 {
            return Ok(());
        }
        let (xp, rows) = (x.dptr(), x.rows as u32);
        let (heads, hd) = ((x.cols / head_dim) as u32, head_dim as u32);
        let (cp, sp, inv) = (cos.dptr(), sin.dptr(), inverse as u32);
        let esize = std::mem::size_of::<T>() as u64;
        // Four pairs per thread where every vector access is aligned.
        let quads = (total / 4) as u64;
        if (head_dim / 2).is_multiple_of(4)
            && x.ld.is_multiple_of(4)
            && x.ld <= u32::MAX as usize
            && xp.is_multiple_of(4 * esize)
            && cp.is_multiple_of(16)
            && sp.is_multiple_of(16)
            && quads <= u32::MAX as u64
        {
            let f = c.func("qtrain_rope", PTX, kernel_name::<T>("rope4"))?;
            let mut b = c.builder(&f);
            let ld = x.ld as u32;
            b.arg(&xp)
                .arg(&ld)
                .arg(&rows)
                .arg(&heads)
                .arg(&hd)
                .arg(&cp)
                .arg(&sp)
                .arg(&inv);
            // SAFETY: arguments match `rope4_*`; one thread per four pairs, bounds-checked
            // in the kernel; alignment checked above.
            return unsafe { launch("rope", b, grid_1d(quads as usize, 256)) };
        }
        let f = c.func("qtrain_rope", PTX, kernel_name::<T>("rope"))?;
        let mut b = c.builder(&f);
        let ld = x.ld as u64;
        b.arg(&xp)
            .arg(&ld)
            .arg(&rows)
            .arg(&heads)
            .arg(&hd)
            .arg(&cp)
            .arg(&sp)
            .arg(&inv);
        // SAFETY: arguments match `rope_*`; one thread per pair, bounds-checked in the kernel.
        unsafe { launch("rope", b, grid_1d(total, 256)) }
    }
}

/// The rotation and a partial inverse on `dev` against the CPU reference, on a
/// strided `[n, heads · d]` block with leading dimension `ld`.
pub fn self_test<T: Float>(
    dev: &Dev,
    (n, heads, d, ld): (usize, usize, usize, usize),
    tol: f64,
) -> Result<Check> {
    let cpu = Dev::cpu();
    let x = random(n * ld, 1.0, 5);
    let pos: Vec<u32> = (0..n as u32).map(|i| (i * 7) % 1000).collect();
    let (c, s) = rope_tables(&pos, d, 1e6);
    let run = |dv: &Dev| -> Result<Vec<f32>> {
        let xb = upload::<T>(dv, &x)?;
        let (cb, sb) = (dv.upload(&c, "cos")?, dv.upload(&s, "sin")?);
        let m = xb.all().mat(n, heads * d, ld);
        rope(dv, m, d, cb.all(), sb.all(), false)?;
        rope(dv, m.col_block(0, 2 * d), d, cb.all(), sb.all(), true)?;
        to_f32_vec(dv, xb.all())
    };
    Ok(check(
        format!(
            "rope fwd + partial inverse {}, {n} x {heads} heads of {d}, ld {ld}",
            T::NAME
        ),
        rel_err(&run(dev)?, &run(&cpu)?),
        tol,
        "",
    ))
}
