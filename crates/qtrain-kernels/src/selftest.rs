//! Checks of every kernel against its CPU reference on random data, for
//! `qtrain doctor` on a GPU machine: each check runs the op on the given device
//! and on the CPU over the same random inputs (outputs poisoned with NaN first, so
//! an element the kernel never writes fails), and reports the relative error
//! `max |gpu − cpu| / max |cpu|` and, where it means something, a speed.
//!
//! The functions take any [`Dev`]: on the CPU both sides are the reference, which
//! is how CI keeps this code itself tested.

use crate::device::{to_f32_vec, DBuf, Dev, Float};
use crate::error::Result;
use rand::{Rng, SeedableRng};

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// Random values in `[-scale, scale)`, seeded.
pub fn random(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// `max |a − b| / max |b|` (NaN anywhere gives infinity).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(1e-30);
    let mut worst = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = (x as f64 - y as f64).abs();
        if !d.is_finite() {
            return f64::INFINITY;
        }
        worst = worst.max(d);
    }
    worst / scale
}

/// A buffer of `data` rounded to `T`.
pub fn upload<T: Float>(dev: &Dev, data: &[f32]) -> Result<DBuf<T>> {
    let v: Vec<T> = data.iter().map(|&x| T::from_f32(x)).collect();
    dev.upload(&v, "self-test input")
}

/// A buffer of NaN (outputs start poisoned).
pub fn poisoned<T: Float>(dev: &Dev, n: usize) -> Result<DBuf<T>> {
    upload::<T>(dev, &vec![f32::NAN; n])
}

pub fn check(name: impl Into<String>, err: f64, tol: f64, extra: &str) -> Check {
    Check {
        name: name.into(),
        ok: err <= tol,
        detail: format!("max rel err {err:.2e} (tol {tol:.0e}){extra}"),
    }
}

/// Seconds per call of `f` (after one warm-up call), timed on the device.
pub fn time_it(dev: &Dev, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let t = std::time::Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

/// The elementwise and row kernels and the GEMM wrapper, in bf16 (and f32 where the
/// kernels have an f32 path the engine uses). `full` uses 7B-sized rows (for the
/// bandwidth figures); otherwise small ones.
pub fn run_basic(dev: &Dev, full: bool) -> Result<Vec<Check>> {
    let (rows, h, inter) = if full {
        (4096, 4096, 14336)
    } else {
        (33, 256, 80)
    };
    let mut out = Vec::new();
    // A check that fails to run (a CUDA error) is reported as failed; the rest go on.
    let mut add = |name: &str, r: Result<Vec<Check>>| match r {
        Ok(v) => out.extend(v),
        Err(e) => out.push(Check {
            name: name.to_string(),
            ok: false,
            detail: format!("error: {e}"),
        }),
    };
    add(
        "rmsnorm bf16",
        norm_checks::<half::bf16>(dev, rows, h, 1e-2),
    );
    add("rmsnorm f32", norm_checks::<f32>(dev, 257, 300, 1e-5));
    add("rope", rope_check::<half::bf16>(dev, 1e-2).map(|c| vec![c]));
    add(
        "swiglu",
        swiglu_check::<half::bf16>(dev, rows, inter, 1e-2).map(|c| vec![c]),
    );
    add(
        "cross-entropy",
        xent_check::<half::bf16>(dev, 1e-2).map(|c| vec![c]),
    );
    add(
        "row kernels",
        rows_check::<half::bf16>(dev).map(|c| vec![c]),
    );
    add(
        "gemm bf16",
        gemm_check::<half::bf16>(dev, 1e-2).map(|c| vec![c]),
    );
    add("gemm f32", gemm_check::<f32>(dev, 2e-3).map(|c| vec![c]));
    if full {
        add("gemm speed", gemm_speed(dev));
    }
    Ok(out)
}

/// cuBLAS throughput on the products of a Mistral-7B layer at 4096 tokens (bf16
/// operands, f32 accumulation): the ceiling the engine's GEMMs work against.
fn gemm_speed(dev: &Dev) -> Result<Vec<Check>> {
    use crate::gemm::{gemm, Op};
    type B = half::bf16;
    let n = 4096;
    let mut out = Vec::new();
    // (name, m, k, n_out, op_b): forward y = x Wᵀ (W stored [out, in]) and backward dx = dy W.
    let shapes = [
        ("qkv fwd", n, 4096, 6144, Op::T),
        ("o fwd", n, 4096, 4096, Op::T),
        ("gate/up fwd", n, 4096, 28672, Op::T),
        ("down fwd", n, 14336, 4096, Op::T),
        ("gate/up dX", n, 28672, 4096, Op::N),
        ("qkv dX", n, 6144, 4096, Op::N),
        ("lm_head chunk (f32 out)", 1024, 4096, 32768, Op::T),
    ];
    for (name, m, k, nn, op_b) in shapes {
        let a = upload::<B>(dev, &random(m * k, 1.0, 21))?;
        let w = upload::<B>(dev, &random(k * nn, 0.02, 22))?;
        let wm = if op_b == Op::T {
            w.mat(nn, k)
        } else {
            w.mat(k, nn)
        };
        let secs = if name.contains("f32") {
            let c = dev.zeros::<f32>(m * nn, "gemm out")?;
            time_it(dev, 20, || {
                gemm(dev, a.mat(m, k), Op::N, wm, op_b, c.mat(m, nn), 1.0, 0.0)
            })?
        } else {
            let c = dev.zeros::<B>(m * nn, "gemm out")?;
            time_it(dev, 20, || {
                gemm(dev, a.mat(m, k), Op::N, wm, op_b, c.mat(m, nn), 1.0, 0.0)
            })?
        };
        let tflops = 2.0 * (m * k * nn) as f64 / secs / 1e12;
        out.push(Check {
            name: format!("gemm speed {name} [{m}x{k}]x[{k}x{nn}]"),
            ok: true,
            detail: format!("{:.1} us, {tflops:.0} TFLOP/s", secs * 1e6),
        });
    }
    Ok(out)
}

fn norm_checks<T: Float>(dev: &Dev, rows: usize, cols: usize, tol: f64) -> Result<Vec<Check>> {
    let cpu = Dev::cpu();
    let x = random(rows * cols, 2.0, 1);
    let w = random(cols, 1.5, 2);
    let dy = random(rows * cols, 1.0, 3);
    let old = random(rows * cols, 1.0, 4);
    let run = |d: &Dev| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>, f64)> {
        let (xb, wb, dyb) = (
            upload::<T>(d, &x)?,
            upload::<T>(d, &w)?,
            upload::<T>(d, &dy)?,
        );
        let y = poisoned::<T>(d, rows * cols)?;
        let inv = poisoned::<f32>(d, rows)?;
        crate::norm::rmsnorm_fwd(
            d,
            xb.mat(rows, cols),
            wb.all(),
            1e-5,
            y.mat(rows, cols),
            inv.all(),
        )?;
        let dx = upload::<T>(d, &old)?;
        crate::norm::rmsnorm_bwd(
            d,
            xb.mat(rows, cols),
            inv.all(),
            wb.all(),
            dyb.mat(rows, cols),
            dx.mat(rows, cols),
            true,
        )?;
        let secs = time_it(d, 10, || {
            crate::norm::rmsnorm_fwd(
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

fn rope_check<T: Float>(dev: &Dev, tol: f64) -> Result<Check> {
    let cpu = Dev::cpu();
    let (n, heads, d, ld) = (300, 6, 128, 6 * 128 + 256);
    let x = random(n * ld, 1.0, 5);
    let pos: Vec<u32> = (0..n as u32).map(|i| (i * 7) % 1000).collect();
    let (c, s) = crate::rope::rope_tables(&pos, d, 1e6);
    let run = |dv: &Dev| -> Result<Vec<f32>> {
        let xb = upload::<T>(dv, &x)?;
        let (cb, sb) = (dv.upload(&c, "cos")?, dv.upload(&s, "sin")?);
        let m = xb.all().mat(n, heads * d, ld);
        crate::rope::rope(dv, m, d, cb.all(), sb.all(), false)?;
        crate::rope::rope(dv, m.col_block(0, 2 * d), d, cb.all(), sb.all(), true)?;
        to_f32_vec(dv, xb.all())
    };
    Ok(check(
        format!("rope fwd + partial inverse {}", T::NAME),
        rel_err(&run(dev)?, &run(&cpu)?),
        tol,
        "",
    ))
}

fn swiglu_check<T: Float>(dev: &Dev, rows: usize, inter: usize, tol: f64) -> Result<Check> {
    let cpu = Dev::cpu();
    let gu = random(rows * 2 * inter, 4.0, 6);
    let dm = random(rows * inter, 1.0, 7);
    let run = |d: &Dev| -> Result<(Vec<f32>, Vec<f32>, f64)> {
        let gub = upload::<T>(d, &gu)?;
        let dmb = upload::<T>(d, &dm)?;
        let m = poisoned::<T>(d, rows * inter)?;
        let full = gub.mat(rows, 2 * inter);
        let (g, u) = (full.col_block(0, inter), full.col_block(inter, inter));
        crate::swiglu::swiglu_fwd(d, g, u, m.mat(rows, inter))?;
        let secs = time_it(d, 5, || {
            crate::swiglu::swiglu_fwd(d, g, u, m.mat(rows, inter))
        })?;
        crate::swiglu::swiglu_bwd(d, g, u, dmb.mat(rows, inter))?;
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

fn xent_check<T: Float>(dev: &Dev, tol: f64) -> Result<Check> {
    let cpu = Dev::cpu();
    let (rows, vocab) = (64, 32768);
    let logits = random(rows * vocab, 8.0, 8);
    let tg: Vec<i32> = (0..rows as i32)
        .map(|i| {
            if i % 9 == 4 {
                -1
            } else {
                (i * 977) % vocab as i32
            }
        })
        .collect();
    let run = |d: &Dev| -> Result<(Vec<f32>, Vec<f32>)> {
        let lb = d.upload(&logits, "logits")?;
        let tb = d.upload(&tg, "targets")?;
        let loss = poisoned::<f32>(d, rows)?;
        let dl = poisoned::<T>(d, rows * vocab)?;
        crate::xent::xent(
            d,
            lb.mat(rows, vocab),
            tb.all(),
            0.01,
            loss.all(),
            Some(dl.mat(rows, vocab)),
        )?;
        Ok((to_f32_vec(d, loss.all())?, to_f32_vec(d, dl.all())?))
    };
    let (l, g) = run(dev)?;
    let (lr, gr) = run(&cpu)?;
    Ok(check(
        format!("cross-entropy fwd+bwd {} {rows}x{vocab}", T::NAME),
        rel_err(&l, &lr).max(rel_err(&g, &gr)),
        tol,
        "",
    ))
}

fn rows_check<T: Float>(dev: &Dev) -> Result<Check> {
    let cpu = Dev::cpu();
    let (v, h, n) = (500, 96, 77);
    let table = random(v * h, 1.0, 9);
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % v as u32).collect();
    let x = random(n * h, 1.0, 10);
    let run = |d: &Dev| -> Result<Vec<f32>> {
        let tb = upload::<T>(d, &table)?;
        let ib = d.upload(&ids, "ids")?;
        let out = poisoned::<T>(d, n * h)?;
        crate::rows::gather_rows(d, tb.mat(v, h), ib.all(), out.mat(n, h))?;
        // Scatter back into a copy of the table, drop out, add, cast.
        let t2 = upload::<T>(d, &table)?;
        crate::rows::scatter_rows(d, out.mat(n, h), ib.all(), t2.mat(v, h))?;
        let xb = upload::<T>(d, &x)?;
        let xd = poisoned::<T>(d, n * h)?;
        crate::rows::dropout(d, xb.mat(n, h), xd.mat(n, h), 0x1234_5678, 3, 0.3)?;
        crate::rows::add_into(d, xd.mat(n, h), out.mat(n, h))?;
        let f = poisoned::<f32>(d, n * h)?;
        crate::rows::cast(d, out.all(), f.all(), 2.0)?;
        crate::rows::scale_in_place(d, f.all(), 0.5)?;
        let ss = crate::rows::sum_squares(d, f.all())?;
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

fn gemm_check<T: Float>(dev: &Dev, tol: f64) -> Result<Check> {
    use crate::gemm::{gemm, Op};
    let cpu = Dev::cpu();
    let (m, n, k) = (96, 80, 72);
    let a = random(k * (m + 8), 1.0, 11);
    let b = random(n * k, 1.0, 12);
    let c0 = random(m * n, 1.0, 13);
    let run = |d: &Dev| -> Result<Vec<f32>> {
        let (ab, bb) = (upload::<T>(d, &a)?, upload::<T>(d, &b)?);
        let c = d.upload(&c0, "c")?;
        // op(A) = Aᵀ from a [k, m] block of a wider matrix, op(B) = Bᵀ; f32 output, beta 1.
        let am = ab.all().mat(k, m, m + 8);
        gemm(d, am, Op::T, bb.mat(n, k), Op::T, c.mat(m, n), 0.5, 1.0)?;
        to_f32_vec(d, c.all())
    };
    Ok(check(
        format!("gemm {} (Aᵀ·Bᵀ, strided, f32 out, beta 1)", T::NAME),
        rel_err(&run(dev)?, &run(&cpu)?),
        tol,
        "",
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn checks_pass_on_the_cpu_against_themselves() {
        // Both sides are the reference here: this exercises the harness (shapes,
        // poisoning, strided views) so the GPU run only tests the kernels.
        let dev = super::Dev::cpu();
        for c in super::run_basic(&dev, false).unwrap() {
            assert!(c.ok, "{}: {}", c.name, c.detail);
        }
    }
}
