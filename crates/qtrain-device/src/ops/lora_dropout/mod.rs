//! The A-side products of a LoRA adapter with dropout on its input, fused with the
//! mask (`lora_dropout.cu`, with its launchers, CPU references and self-test here):
//!
//! - [`lora_a_fwd_dropout`]: `z = dropout(x) Aᵀ`,
//! - [`lora_a_grad_dropout`]: `grad_a += dzᵀ dropout(x)` (the f32 gradient),
//! - [`lora_dx_dropout`]: `dx += (dz A) ∘ mask`.
//!
//! `dropout` is the mask of [`crate::ops::rows::dropout`] (the counter-based hash of
//! `qtrain_step::dropout_mask`, element `(row, col)` of an `[n, h]` input being
//! element `(row0 + row)·h + col` of the mask with hash base `base`), so these draw
//! exactly the elements the unfused path (`dropout` into a scratch buffer, then a
//! GEMM) draws, and the backward regenerates the forward's mask. The kernels generate
//! the mask on the fly instead of materializing `dropout(x)`: each reads `x` once (or
//! reads and writes `dx` once); see the `.cu` header for how they are parallelized.
//!
//! Rounding, identical to the unfused path up to the order of the f32 sums: the
//! dropped input `dropout(x)` is rounded to `T` (what the `dropout` op stores, and a
//! 16-bit operand of the tensor-core products), the products accumulate in f32 and
//! are rounded once when stored; `dx`'s increment `(dz A)·keep` is added in f32 and
//! the sum rounded once (the unfused path also rounds `dz A` and its masked copy to
//! `T` first: in bf16 the fused result is the more accurate one, in f32 they agree).
//!
//! The CPU references are that composition, written out: [`dropout_ref`] and
//! [`gemm_reference`].

use crate::device::{check_disjoint, read_mat, write_mat, Dev, Float, Mat};
use crate::error::{ensure, Result};
use crate::gemm::{gemm_reference, Op};
use crate::ops::rows::dropout_ref;
use crate::selftest::{check, poisoned, random, rel_err, time_it, upload, Check};
use crate::to_f32_vec;

/// The largest rank the kernels take.
pub const MAX_RANK: usize = 64;

/// `dropout(x)` of a dense `[rows, cols]` f32 array holding rows `row0..` of the
/// mask, rounded to `T` as the `dropout` op stores it.
fn dropped_input<T: Float>(x: &[f32], cols: usize, row0: usize, base: u64, p: f64) -> Vec<f32> {
    dropout_ref(x, cols, row0, base, p)
        .into_iter()
        .map(T::round)
        .collect()
}

/// CPU reference of [`lora_a_fwd_dropout`] on dense arrays (`x: [n, h]`, `a: [r, h]`):
/// `z = round_T(dropout(x)) · Aᵀ`, `[n, r]`, in f32 (the caller rounds the store).
pub fn lora_a_fwd_dropout_ref<T: Float>(
    x: &[f32],
    a: &[f32],
    (n, h, r): (usize, usize, usize),
    base: u64,
    row0: usize,
    p: f64,
) -> Vec<f32> {
    let xd = dropped_input::<T>(x, h, row0, base, p);
    gemm_reference(&xd, h, Op::N, a, h, Op::T, &[], (n, r, h), 1.0, 0.0)
}

/// CPU reference of [`lora_a_grad_dropout`] on dense arrays (`dz: [n, r]`,
/// `x: [n, h]`, `grad_a: [r, h]`): `grad_a + dzᵀ · round_T(dropout(x))`.
pub fn lora_a_grad_dropout_ref<T: Float>(
    dz: &[f32],
    x: &[f32],
    grad_a: &[f32],
    (n, h, r): (usize, usize, usize),
    base: u64,
    row0: usize,
    p: f64,
) -> Vec<f32> {
    let xd = dropped_input::<T>(x, h, row0, base, p);
    gemm_reference(dz, r, Op::T, &xd, h, Op::N, grad_a, (r, h, n), 1.0, 1.0)
}

/// CPU reference of [`lora_dx_dropout`] on dense arrays (`dz: [n, r]`, `a: [r, h]`,
/// `dx: [n, h]`): `dx + dropout(dz · A)`, in f32 (the caller rounds the store).
pub fn lora_dx_dropout_ref(
    dz: &[f32],
    a: &[f32],
    dx: &[f32],
    (n, h, r): (usize, usize, usize),
    base: u64,
    row0: usize,
    p: f64,
) -> Vec<f32> {
    let t = gemm_reference(dz, r, Op::N, a, h, Op::N, &[], (n, h, r), 1.0, 0.0);
    let masked = dropout_ref(&t, h, row0, base, p);
    dx.iter().zip(&masked).map(|(d, m)| d + m).collect()
}

fn check_p(op: &'static str, p: f64) -> Result<()> {
    ensure!((0.0..1.0).contains(&p), op, "p = {p} must be in [0, 1)");
    Ok(())
}

fn check_rank(op: &'static str, r: usize) -> Result<()> {
    ensure!(
        r <= MAX_RANK,
        op,
        "rank {r} is above the kernels' limit of {MAX_RANK}"
    );
    Ok(())
}

/// `z = dropout(x) Aᵀ` with `x: [n, h]` (rows `row0..` of the mask of hash base
/// `base`, probability `p`), `a: [r, h]`, `z: [n, r]`; `r <= MAX_RANK`.
pub fn lora_a_fwd_dropout<T: Float>(
    dev: &Dev,
    x: Mat<'_, T>,
    a: Mat<'_, T>,
    z: Mat<'_, T>,
    base: u64,
    row0: usize,
    p: f64,
) -> Result<()> {
    let op = "lora_a_fwd_dropout";
    ensure!(
        a.cols == x.cols && z.rows == x.rows && z.cols == a.rows,
        op,
        "x {}x{}, A {}x{}, z {}x{}",
        x.rows,
        x.cols,
        a.rows,
        a.cols,
        z.rows,
        z.cols
    );
    check_rank(op, a.rows)?;
    check_p(op, p)?;
    check_disjoint(op, &[z.span()], &[x.span(), a.span()])?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::fwd(c, x, a, z, base, row0, p);
    }
    let _ = dev;
    let shape = (x.rows, x.cols, a.rows);
    let zv = lora_a_fwd_dropout_ref::<T>(&read_mat(x), &read_mat(a), shape, base, row0, p);
    write_mat(z, &zv);
    Ok(())
}

/// `grad_a += dzᵀ dropout(x)` with `dz: [n, r]`, `x: [n, h]` (rows `row0..` of the
/// mask), `grad_a: [r, h]` in f32; `r <= MAX_RANK`.
pub fn lora_a_grad_dropout<T: Float>(
    dev: &Dev,
    dz: Mat<'_, T>,
    x: Mat<'_, T>,
    grad_a: Mat<'_, f32>,
    base: u64,
    row0: usize,
    p: f64,
) -> Result<()> {
    let op = "lora_a_grad_dropout";
    ensure!(
        dz.rows == x.rows && grad_a.rows == dz.cols && grad_a.cols == x.cols,
        op,
        "dz {}x{}, x {}x{}, grad_a {}x{}",
        dz.rows,
        dz.cols,
        x.rows,
        x.cols,
        grad_a.rows,
        grad_a.cols
    );
    check_rank(op, dz.cols)?;
    check_p(op, p)?;
    check_disjoint(op, &[grad_a.span()], &[dz.span(), x.span()])?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::grad(c, dz, x, grad_a, base, row0, p);
    }
    let _ = dev;
    let shape = (x.rows, x.cols, dz.cols);
    let g = lora_a_grad_dropout_ref::<T>(
        &read_mat(dz),
        &read_mat(x),
        &read_mat(grad_a),
        shape,
        base,
        row0,
        p,
    );
    write_mat(grad_a, &g);
    Ok(())
}

/// `dx += (dz A) ∘ mask` with `dz: [n, r]`, `a: [r, h]`, `dx: [n, h]` (rows `row0..`
/// of the mask), in place; `r <= MAX_RANK`.
pub fn lora_dx_dropout<T: Float>(
    dev: &Dev,
    dz: Mat<'_, T>,
    a: Mat<'_, T>,
    dx: Mat<'_, T>,
    base: u64,
    row0: usize,
    p: f64,
) -> Result<()> {
    let op = "lora_dx_dropout";
    ensure!(
        dz.cols == a.rows && dx.rows == dz.rows && dx.cols == a.cols,
        op,
        "dz {}x{}, A {}x{}, dx {}x{}",
        dz.rows,
        dz.cols,
        a.rows,
        a.cols,
        dx.rows,
        dx.cols
    );
    check_rank(op, a.rows)?;
    check_p(op, p)?;
    check_disjoint(op, &[dx.span()], &[dz.span(), a.span()])?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return cuda::dx(c, dz, a, dx, base, row0, p);
    }
    let _ = dev;
    let shape = (dx.rows, dx.cols, a.rows);
    let d = lora_dx_dropout_ref(
        &read_mat(dz),
        &read_mat(a),
        &read_mat(dx),
        shape,
        base,
        row0,
        p,
    );
    write_mat(dx, &d);
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::{kernel_name, launch, vec8, CudaDev, LaunchConfig, PushKernelArg};
    use crate::device::{Float, Mat};
    use crate::error::Result;
    use crate::ops::rows::dropout_threshold;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora_dropout.ptx"));

    // The kernels' geometry (lora_dropout.cu).
    const FWD_ROWS: usize = 32;
    const FWD_THREADS: u32 = 256;
    const GRAD_COLS: usize = 32;
    /// `grad_threads(RP)` in lora_dropout.cu: 16 warps at rank 16 (the grid is only
    /// h / 32 blocks), 8 above.
    fn grad_threads(r: usize) -> u32 {
        if r <= 16 {
            512
        } else {
            256
        }
    }
    const DX_COLS: usize = 64;
    const DX_TOKENS: usize = 512;
    const DX_THREADS: u32 = 128;

    /// The instantiation for rank `r`: ranks are padded to 16, 32 or 64.
    fn name<T: Float>(op: &'static str, r: usize) -> &'static str {
        let base: &'static str = match (op, r) {
            ("fwd", 0..=16) => "lora_a_fwd_dropout_r16",
            ("fwd", 17..=32) => "lora_a_fwd_dropout_r32",
            ("fwd", _) => "lora_a_fwd_dropout_r64",
            ("grad", 0..=16) => "lora_a_grad_dropout_r16",
            ("grad", 17..=32) => "lora_a_grad_dropout_r32",
            ("grad", _) => "lora_a_grad_dropout_r64",
            (_, 0..=16) => "lora_dx_dropout_r16",
            (_, 17..=32) => "lora_dx_dropout_r32",
            (_, _) => "lora_dx_dropout_r64",
        };
        kernel_name::<T>(base)
    }

    /// Hash threshold and keep scale of probability `p`, as the `dropout` kernel's.
    fn mask_args(p: f64) -> (u64, f32) {
        (dropout_threshold(p), (1.0 / (1.0 - p)) as f32)
    }

    fn cfg(grid: (usize, usize), threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid.0.max(1) as u32, grid.1.max(1) as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn fwd<T: Float>(
        c: &CudaDev,
        x: Mat<'_, T>,
        a: Mat<'_, T>,
        z: Mat<'_, T>,
        base: u64,
        row0: usize,
        p: f64,
    ) -> Result<()> {
        if x.rows == 0 || a.rows == 0 {
            return Ok(());
        }
        let f = c.func("qtrain_lora_dropout", PTX, name::<T>("fwd", a.rows))?;
        let mut b = c.builder(&f);
        let vec = vec8::<T>(&[(x.dptr(), x.cols, x.ld), (a.dptr(), a.cols, a.ld)]) as u32;
        let (xp, ldx, ap, lda, zp, ldz) = (
            x.dptr(),
            x.ld as u64,
            a.dptr(),
            a.ld as u64,
            z.dptr(),
            z.ld as u64,
        );
        let (n, h, r) = (x.rows as u32, x.cols as u32, a.rows as u32);
        let (thr, keep) = mask_args(p);
        let row0 = row0 as u64;
        b.arg(&xp)
            .arg(&ldx)
            .arg(&ap)
            .arg(&lda)
            .arg(&zp)
            .arg(&ldz)
            .arg(&n)
            .arg(&h)
            .arg(&r)
            .arg(&vec)
            .arg(&base)
            .arg(&row0)
            .arg(&thr)
            .arg(&keep);
        // SAFETY: arguments match `lora_a_fwd_dropout_r*_*`; the kernel bounds-checks
        // rows, columns and ranks, and reads 8 at a time only where `vec` allows.
        unsafe {
            launch(
                "lora_a_fwd_dropout",
                b,
                cfg((x.rows.div_ceil(FWD_ROWS), 1), FWD_THREADS),
            )
        }
    }

    pub(super) fn grad<T: Float>(
        c: &CudaDev,
        dz: Mat<'_, T>,
        x: Mat<'_, T>,
        ga: Mat<'_, f32>,
        base: u64,
        row0: usize,
        p: f64,
    ) -> Result<()> {
        if x.rows == 0 || x.cols == 0 || dz.cols == 0 {
            return Ok(());
        }
        let f = c.func("qtrain_lora_dropout", PTX, name::<T>("grad", dz.cols))?;
        let mut b = c.builder(&f);
        let vec = vec8::<T>(&[(x.dptr(), x.cols, x.ld)]) as u32;
        let (dzp, lddz, xp, ldx, gp, ldg) = (
            dz.dptr(),
            dz.ld as u64,
            x.dptr(),
            x.ld as u64,
            ga.dptr(),
            ga.ld as u64,
        );
        let (n, h, r) = (x.rows as u32, x.cols as u32, dz.cols as u32);
        let (thr, keep) = mask_args(p);
        let row0 = row0 as u64;
        b.arg(&dzp)
            .arg(&lddz)
            .arg(&xp)
            .arg(&ldx)
            .arg(&gp)
            .arg(&ldg)
            .arg(&n)
            .arg(&h)
            .arg(&r)
            .arg(&vec)
            .arg(&base)
            .arg(&row0)
            .arg(&thr)
            .arg(&keep);
        // SAFETY: arguments match `lora_a_grad_dropout_r*_*`; the kernel bounds-checks
        // tokens, columns and ranks; each element of grad_a has one writer.
        unsafe {
            launch(
                "lora_a_grad_dropout",
                b,
                cfg((x.cols.div_ceil(GRAD_COLS), 1), grad_threads(dz.cols)),
            )
        }
    }

    pub(super) fn dx<T: Float>(
        c: &CudaDev,
        dz: Mat<'_, T>,
        a: Mat<'_, T>,
        dx: Mat<'_, T>,
        base: u64,
        row0: usize,
        p: f64,
    ) -> Result<()> {
        if dx.rows == 0 || dx.cols == 0 || a.rows == 0 {
            return Ok(());
        }
        let f = c.func("qtrain_lora_dropout", PTX, name::<T>("dx", a.rows))?;
        let mut b = c.builder(&f);
        let vec = vec8::<T>(&[(dx.dptr(), dx.cols, dx.ld)]) as u32;
        let (dzp, lddz, ap, lda, dxp, lddx) = (
            dz.dptr(),
            dz.ld as u64,
            a.dptr(),
            a.ld as u64,
            dx.dptr(),
            dx.ld as u64,
        );
        let (n, h, r) = (dx.rows as u32, dx.cols as u32, a.rows as u32);
        let (thr, keep) = mask_args(p);
        let row0 = row0 as u64;
        b.arg(&dzp)
            .arg(&lddz)
            .arg(&ap)
            .arg(&lda)
            .arg(&dxp)
            .arg(&lddx)
            .arg(&n)
            .arg(&h)
            .arg(&r)
            .arg(&vec)
            .arg(&base)
            .arg(&row0)
            .arg(&thr)
            .arg(&keep);
        let grid = (dx.cols.div_ceil(DX_COLS), dx.rows.div_ceil(DX_TOKENS));
        // SAFETY: arguments match `lora_dx_dropout_r*_*`; the kernel bounds-checks
        // tokens, columns and ranks; each element of dx has one writer.
        unsafe { launch("lora_dx_dropout", b, cfg(grid, DX_THREADS)) }
    }
}

/// One case of the self-test: `n` tokens of `h` columns at leading dimension `ld`
/// (x and dx are column blocks starting at `col0` of wider matrices, A a block of a
/// wider one too), rank `r`, mask rows from `row0`.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub n: usize,
    pub h: usize,
    pub ld: usize,
    pub col0: usize,
    pub r: usize,
    pub row0: usize,
}

impl Case {
    /// Dense and aligned (the kernels' vector path).
    pub fn dense(n: usize, h: usize, r: usize) -> Self {
        Case {
            n,
            h,
            ld: h,
            col0: 0,
            r,
            row0: 5,
        }
    }

    /// Odd sizes in unaligned strided blocks (the scalar path).
    pub fn odd() -> Self {
        Case {
            n: 37,
            h: 75,
            ld: 83,
            col0: 3,
            r: 5,
            row0: 11,
        }
    }
}

const SELF_TEST_BASE: u64 = 0x5eed_0fd8_0b0a_7e11;
const SELF_TEST_P: f64 = 0.3;

/// The three fused kernels on `dev` against their CPU references on random inputs
/// (outputs poisoned first; the columns of `dx`'s wider matrix outside the block are
/// compared too, so a stray write shows), each with its speed for the dense case.
pub fn self_test<T: Float>(dev: &Dev, case: Case, tol: f64) -> Result<Vec<Check>> {
    let cpu = Dev::cpu();
    let Case {
        n,
        h,
        ld,
        col0,
        r,
        row0,
    } = case;
    let (base, p) = (SELF_TEST_BASE, SELF_TEST_P);
    // A is a block of a wider matrix too, at the same offset (aligned when dense).
    let alda = h + 2 * col0;
    let x = random(n * ld, 1.0, 41);
    let a = random(r * alda, 1.0, 42);
    let dz = random(n * r, 1.0, 43);
    let g0 = random(r * h, 1.0, 44);
    let dx0 = random(n * ld, 1.0, 45);
    type Out = (Vec<f32>, f64);
    // Timed on the device under test only (the CPU reference at 7B rows is slow).
    let run = |d: &Dev, timed: bool| -> Result<[Out; 3]> {
        let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            if timed {
                time_it(d, 3, f)
            } else {
                Ok(f64::NAN)
            }
        };
        let xb = upload::<T>(d, &x)?;
        let xm = xb.all().mat(n, ld, ld).col_block(col0, h);
        let ab = upload::<T>(d, &a)?;
        let am = ab.all().mat(r, alda, alda).col_block(col0, h);
        let dzb = upload::<T>(d, &dz)?;
        let zb = poisoned::<T>(d, n * r)?;
        lora_a_fwd_dropout(d, xm, am, zb.mat(n, r), base, row0, p)?;
        let z = to_f32_vec(d, zb.all())?;
        let fwd_s = time(&|| lora_a_fwd_dropout(d, xm, am, zb.mat(n, r), base, row0, p))?;
        let gb = d.upload(&g0, "grad_a")?;
        lora_a_grad_dropout(d, dzb.mat(n, r), xm, gb.mat(r, h), base, row0, p)?;
        let g = to_f32_vec(d, gb.all())?;
        let grad_s =
            time(&|| lora_a_grad_dropout(d, dzb.mat(n, r), xm, gb.mat(r, h), base, row0, p))?;
        let dxb = upload::<T>(d, &dx0)?;
        let dxm = dxb.all().mat(n, ld, ld).col_block(col0, h);
        lora_dx_dropout(d, dzb.mat(n, r), am, dxm, base, row0, p)?;
        let dxv = to_f32_vec(d, dxb.all())?;
        let dx_s = time(&|| lora_dx_dropout(d, dzb.mat(n, r), am, dxm, base, row0, p))?;
        Ok([(z, fwd_s), (g, grad_s), (dxv, dx_s)])
    };
    let got = run(dev, true)?;
    let want = run(&cpu, false)?;
    let bytes = (n * h * std::mem::size_of::<T>()) as f64;
    let names = [
        ("lora A fwd + dropout", bytes),
        ("lora A grad + dropout", bytes),
        ("lora dx + dropout", 2.0 * bytes),
    ];
    Ok(names
        .iter()
        .zip(got.iter().zip(&want))
        .map(|(&(name, bytes), ((g, secs), (w, _)))| {
            check(
                format!("{name} {} {n}x{h} r{r} (ld {ld}, row0 {row0})", T::NAME),
                rel_err(g, w),
                tol,
                &format!(", {:.0} GB/s", bytes / secs / 1e9),
            )
        })
        .collect())
}

/// The mask itself, exactly: products whose every output is one masked element
/// times one, so the kernels must match the CPU bit for bit (tolerance 0), on every
/// element of an `[n, h]` mask for `dx` (one-hot `dz`) and of rows or columns of it
/// for the A products (`A` or `dz` the identity).
pub fn mask_test<T: Float>(dev: &Dev, n: usize, h: usize) -> Result<Check> {
    let cpu = Dev::cpu();
    let (base, p, row0) = (SELF_TEST_BASE ^ 0x77, SELF_TEST_P, 3);
    let r = 16;
    let x = random(n * h, 1.0, 51);
    let a = random(r * h, 1.0, 52);
    // dz[i][k] = 1 when k = i mod r: dx's row i gets row (i mod r) of A, masked.
    let onehot: Vec<f32> = (0..n * r)
        .map(|e| ((e / r) % r == e % r) as u8 as f32)
        .collect();
    let eye: Vec<f32> = (0..r * r).map(|e| (e / r == e % r) as u8 as f32).collect();
    let run = |d: &Dev| -> Result<Vec<f32>> {
        // fwd with A = I (x has r columns here): z = dropout(x).
        let xs = upload::<T>(d, &x[..n * r])?;
        let ib = upload::<T>(d, &eye)?;
        let zb = poisoned::<T>(d, n * r)?;
        lora_a_fwd_dropout(d, xs.mat(n, r), ib.mat(r, r), zb.mat(n, r), base, row0, p)?;
        let mut out = to_f32_vec(d, zb.all())?;
        // grad with dz = I over r tokens: grad_a = dropout(x[..r]).
        let xr = upload::<T>(d, &x[..r * h])?;
        let gb = d.zeros::<f32>(r * h, "grad_a")?;
        lora_a_grad_dropout(d, ib.mat(r, r), xr.mat(r, h), gb.mat(r, h), base, row0, p)?;
        out.extend(to_f32_vec(d, gb.all())?);
        // dx with one-hot dz into zeros: dx = A[i mod r] ∘ mask.
        let ab = upload::<T>(d, &a)?;
        let db = upload::<T>(d, &onehot)?;
        let dxb = d.zeros::<T>(n * h, "dx")?;
        lora_dx_dropout(d, db.mat(n, r), ab.mat(r, h), dxb.mat(n, h), base, row0, p)?;
        out.extend(to_f32_vec(d, dxb.all())?);
        Ok(out)
    };
    let (got, want) = (run(dev)?, run(&cpu)?);
    let differ = got
        .iter()
        .zip(&want)
        .filter(|(g, w)| g.to_bits() != w.to_bits() && !(**g == 0.0 && **w == 0.0))
        .count();
    Ok(Check {
        name: format!("lora dropout mask {} {n}x{h} (fused kernels)", T::NAME),
        ok: differ == 0 && got.len() == want.len(),
        detail: format!("{differ} of {} elements differ from the CPU", want.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::gemm;
    use crate::ops::rows::{add_into, dropout};

    const BASE: u64 = 0x0123_4567_89ab_cdef;
    const P: f64 = 0.4;

    /// Random inputs, never zero (a zero would hide a dropped element).
    fn nonzero(len: usize, seed: u64) -> Vec<f32> {
        random(len, 1.0, seed)
            .into_iter()
            .map(|v| if v.abs() < 1e-3 { 0.5 } else { v })
            .collect()
    }

    /// The shapes the tests run on: (n, h, r, row0, strided).
    const SHAPES: [(usize, usize, usize, usize, bool); 4] = [
        (37, 75, 5, 11, true),
        (16, 64, 16, 0, false),
        (9, 130, 64, 1000, true),
        (70, 3, 1, 7, false),
    ];

    /// A `[rows, cols]` matrix inside a wider one (leading dimension `cols + 7`,
    /// starting at column 3) when `strided`, else dense, holding `v`.
    fn place(dev: &Dev, v: &[f32], rows: usize, cols: usize, strided: bool) -> crate::DBuf<f32> {
        let (ld, c0) = if strided { (cols + 7, 3) } else { (cols, 0) };
        let mut data = vec![f32::NAN; rows * ld];
        for r in 0..rows {
            data[r * ld + c0..r * ld + c0 + cols].copy_from_slice(&v[r * cols..(r + 1) * cols]);
        }
        upload::<f32>(dev, &data).unwrap()
    }

    fn view(buf: &crate::DBuf<f32>, rows: usize, cols: usize, strided: bool) -> Mat<'_, f32> {
        let (ld, c0) = if strided { (cols + 7, 3) } else { (cols, 0) };
        buf.all().mat(rows, ld, ld).col_block(c0, cols)
    }

    fn read(dev: &Dev, m: Mat<'_, f32>) -> Vec<f32> {
        let all = to_f32_vec(dev, m.v).unwrap();
        (0..m.rows)
            .flat_map(|r| all[r * m.ld..r * m.ld + m.cols].to_vec())
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        let err = rel_err(got, want);
        assert!(err <= 1e-5, "{what}: rel err {err:e}");
    }

    /// Each fused op on the CPU equals the unfused path it replaces (the `dropout`
    /// op into a scratch buffer, then `gemm`, and `add_into` for dx), in f32, on odd
    /// shapes, strided views and nonzero mask row offsets.
    #[test]
    fn fused_ops_equal_dropout_then_gemm() {
        let dev = Dev::cpu();
        for (i, &(n, h, r, row0, strided)) in SHAPES.iter().enumerate() {
            let seed = 10 * i as u64;
            let (x, a) = (nonzero(n * h, seed), nonzero(r * h, seed + 1));
            let (dz, g0, dx0) = (
                nonzero(n * r, seed + 2),
                nonzero(r * h, seed + 3),
                nonzero(n * h, seed + 4),
            );
            let what = format!("n {n} h {h} r {r} row0 {row0} strided {strided}");
            let xb = place(&dev, &x, n, h, strided);
            let ab = place(&dev, &a, r, h, strided);
            let dzb = place(&dev, &dz, n, r, strided);
            let (xm, am, dzm) = (
                view(&xb, n, h, strided),
                view(&ab, r, h, strided),
                view(&dzb, n, r, strided),
            );
            // The unfused path: dropout(x) materialized.
            let xd = dev.zeros::<f32>(n * h, "xd").unwrap();
            dropout(&dev, xm, xd.mat(n, h), BASE, row0, P).unwrap();

            let zb = place(&dev, &vec![f32::NAN; n * r], n, r, strided);
            lora_a_fwd_dropout(&dev, xm, am, view(&zb, n, r, strided), BASE, row0, P).unwrap();
            let want = dev.zeros::<f32>(n * r, "z").unwrap();
            gemm(
                &dev,
                xd.mat(n, h),
                Op::N,
                am,
                Op::T,
                want.mat(n, r),
                1.0,
                0.0,
            )
            .unwrap();
            assert_close(
                &read(&dev, view(&zb, n, r, strided)),
                &read(&dev, want.mat(n, r)),
                &format!("fwd {what}"),
            );

            let gb = place(&dev, &g0, r, h, strided);
            lora_a_grad_dropout(&dev, dzm, xm, view(&gb, r, h, strided), BASE, row0, P).unwrap();
            let want = upload::<f32>(&dev, &g0).unwrap();
            gemm(
                &dev,
                dzm,
                Op::T,
                xd.mat(n, h),
                Op::N,
                want.mat(r, h),
                1.0,
                1.0,
            )
            .unwrap();
            assert_close(
                &read(&dev, view(&gb, r, h, strided)),
                &read(&dev, want.mat(r, h)),
                &format!("grad {what}"),
            );

            let dxb = place(&dev, &dx0, n, h, strided);
            lora_dx_dropout(&dev, dzm, am, view(&dxb, n, h, strided), BASE, row0, P).unwrap();
            let (t, masked) = (
                dev.zeros::<f32>(n * h, "t").unwrap(),
                dev.zeros::<f32>(n * h, "masked").unwrap(),
            );
            gemm(&dev, dzm, Op::N, am, Op::N, t.mat(n, h), 1.0, 0.0).unwrap();
            dropout(&dev, t.mat(n, h), masked.mat(n, h), BASE, row0, P).unwrap();
            let want = upload::<f32>(&dev, &dx0).unwrap();
            add_into(&dev, masked.mat(n, h), want.mat(n, h)).unwrap();
            assert_close(
                &read(&dev, view(&dxb, n, h, strided)),
                &read(&dev, want.mat(n, h)),
                &format!("dx {what}"),
            );
            // The columns around the strided blocks are untouched.
            if strided {
                for (buf, rows, cols) in [(&zb, n, r), (&gb, r, h), (&dxb, n, h)] {
                    let all = to_f32_vec(&dev, buf.all()).unwrap();
                    for row in 0..rows {
                        let ld = cols + 7;
                        for c in (0..3).chain(3 + cols..ld) {
                            assert!(
                                all[row * ld + c].is_nan(),
                                "{what}: wrote outside the block"
                            );
                        }
                    }
                }
            }
        }
    }

    /// With selections for A (and dz), each output is one dropped element: the fused
    /// ops then draw exactly the `dropout` op's mask, element for element.
    #[test]
    fn fused_ops_draw_the_dropout_ops_mask() {
        let dev = Dev::cpu();
        let (n, h, row0) = (23, 40, 6);
        let x = nonzero(n * h, 7);
        let xb = upload::<f32>(&dev, &x).unwrap();
        let xd = dev.zeros::<f32>(n * h, "xd").unwrap();
        dropout(&dev, xb.mat(n, h), xd.mat(n, h), BASE, row0, P).unwrap();
        let mask = to_f32_vec(&dev, xd.all()).unwrap();
        let dropped = mask.iter().filter(|&&v| v == 0.0).count();
        assert!(
            dropped > 0 && dropped < n * h,
            "{dropped} of {} dropped",
            n * h
        );

        // fwd, A selecting columns: z[i][k] = dropout(x)[i][sel[k]].
        let sel = [0, 7, 13, 39, 20];
        let r = sel.len();
        let a: Vec<f32> = (0..r * h)
            .map(|e| (e % h == sel[e / h]) as u8 as f32)
            .collect();
        let ab = upload::<f32>(&dev, &a).unwrap();
        let zb = dev.zeros::<f32>(n * r, "z").unwrap();
        lora_a_fwd_dropout(
            &dev,
            xb.mat(n, h),
            ab.mat(r, h),
            zb.mat(n, r),
            BASE,
            row0,
            P,
        )
        .unwrap();
        let z = to_f32_vec(&dev, zb.all()).unwrap();
        for i in 0..n {
            for (k, &c) in sel.iter().enumerate() {
                assert_eq!(z[i * r + k], mask[i * h + c], "fwd ({i}, {c})");
            }
        }

        // grad, dz selecting tokens: grad_a[k][c] = dropout(x)[tok[k]][c].
        let tok = [0, 5, 22];
        let r = tok.len();
        let dz: Vec<f32> = (0..n * r)
            .map(|e| (e / r == tok[e % r]) as u8 as f32)
            .collect();
        let dzb = upload::<f32>(&dev, &dz).unwrap();
        let gb = dev.zeros::<f32>(r * h, "g").unwrap();
        lora_a_grad_dropout(
            &dev,
            dzb.mat(n, r),
            xb.mat(n, h),
            gb.mat(r, h),
            BASE,
            row0,
            P,
        )
        .unwrap();
        let g = to_f32_vec(&dev, gb.all()).unwrap();
        for (k, &t) in tok.iter().enumerate() {
            assert_eq!(
                &g[k * h..(k + 1) * h],
                &mask[t * h..(t + 1) * h],
                "grad {t}"
            );
        }

        // dx, dz = e_0 on every token and A's row 0 = x's row: dx = mask of each row.
        let r = 2;
        let dz: Vec<f32> = (0..n * r).map(|e| (e % r == 0) as u8 as f32).collect();
        let dzb = upload::<f32>(&dev, &dz).unwrap();
        for i in [0, 9, 22] {
            let mut a = x[i * h..(i + 1) * h].to_vec();
            a.extend(nonzero(h, 99));
            let ab = upload::<f32>(&dev, &a).unwrap();
            let dxb = dev.zeros::<f32>(n * h, "dx").unwrap();
            lora_dx_dropout(
                &dev,
                dzb.mat(n, r),
                ab.mat(r, h),
                dxb.mat(n, h),
                BASE,
                row0,
                P,
            )
            .unwrap();
            let d = to_f32_vec(&dev, dxb.all()).unwrap();
            assert_eq!(
                &d[i * h..(i + 1) * h],
                &mask[i * h..(i + 1) * h],
                "dx row {i}"
            );
        }
    }

    /// In bf16 the dropped input is rounded to bf16 before the product (the unfused
    /// path's scratch buffer), and the output once more when stored.
    #[test]
    fn bf16_rounds_the_dropped_input_like_the_unfused_path() {
        type B = half::bf16;
        let dev = Dev::cpu();
        let (n, h, r, row0) = (11, 33, 3, 2);
        let (x, a) = (nonzero(n * h, 3), nonzero(r * h, 4));
        let (xb, ab) = (
            upload::<B>(&dev, &x).unwrap(),
            upload::<B>(&dev, &a).unwrap(),
        );
        let zb = dev.zeros::<B>(n * r, "z").unwrap();
        lora_a_fwd_dropout(
            &dev,
            xb.mat(n, h),
            ab.mat(r, h),
            zb.mat(n, r),
            BASE,
            row0,
            P,
        )
        .unwrap();
        let xd = dev.zeros::<B>(n * h, "xd").unwrap();
        dropout(&dev, xb.mat(n, h), xd.mat(n, h), BASE, row0, P).unwrap();
        let want = dev.zeros::<B>(n * r, "want").unwrap();
        gemm(
            &dev,
            xd.mat(n, h),
            Op::N,
            ab.mat(r, h),
            Op::T,
            want.mat(n, r),
            1.0,
            0.0,
        )
        .unwrap();
        assert_eq!(
            to_f32_vec(&dev, zb.all()).unwrap(),
            to_f32_vec(&dev, want.all()).unwrap()
        );
    }

    #[test]
    fn refuses_bad_shapes_ranks_and_probabilities() {
        let dev = Dev::cpu();
        let x = dev.zeros::<f32>(4 * 80, "x").unwrap();
        let a = dev.zeros::<f32>(65 * 80, "a").unwrap();
        let z = dev.zeros::<f32>(4 * 65, "z").unwrap();
        let err = lora_a_fwd_dropout(&dev, x.mat(4, 80), a.mat(65, 80), z.mat(4, 65), 0, 0, 0.1)
            .unwrap_err();
        assert!(err.to_string().contains("rank 65"), "{err}");
        let err = lora_a_fwd_dropout(
            &dev,
            x.mat(4, 80),
            a.view(0, 16 * 80).mat(16, 80, 80),
            z.view(0, 4 * 16).mat(4, 16, 16),
            0,
            0,
            1.0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("p = 1"), "{err}");
        let err = lora_dx_dropout(
            &dev,
            z.view(0, 4 * 16).mat(4, 16, 16),
            a.view(0, 16 * 80).mat(16, 80, 80),
            x.view(0, 4 * 79).mat(4, 79, 79),
            0,
            0,
            0.1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("dx 4x79"), "{err}");
    }

    /// The self-tests pass on the CPU against themselves (this exercises their
    /// harness: shapes, strides, poisoning).
    #[test]
    fn self_tests_run_on_the_cpu() {
        let dev = Dev::cpu();
        let mut checks = self_test::<f32>(&dev, Case::odd(), 1e-6).unwrap();
        checks.extend(self_test::<half::bf16>(&dev, Case::dense(40, 64, 16), 1e-2).unwrap());
        checks.push(mask_test::<half::bf16>(&dev, 50, 72).unwrap());
        for c in checks {
            assert!(c.ok, "{}: {}", c.name, c.detail);
        }
    }
}
