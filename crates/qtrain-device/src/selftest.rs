//! Checks of every kernel against its CPU reference on random data, for
//! `qtrain doctor` on a GPU machine: each check runs the op on the given device
//! and on the CPU over the same random inputs (outputs poisoned with NaN first, so
//! an element the kernel never writes fails), and reports the relative error
//! `max |gpu − cpu| / max |cpu|` and, where it means something, a speed.
//!
//! The functions take any [`Dev`]: on the CPU both sides are the reference, which
//! is how CI keeps this code itself tested.

use crate::device::{to_f32_vec, DBuf, Dev, Float, Mat};
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

/// Seconds per call of `f` (after one warm-up call): on CUDA between two events on
/// the stream (the GPU's time, without the launch of the first call or the final
/// synchronization), on the CPU by the host clock.
pub fn time_it(dev: &Dev, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        let start = c.event()?;
        for _ in 0..iters {
            f()?;
        }
        let end = c.event()?;
        dev.synchronize()?;
        let ms = crate::cuda::CudaDev::elapsed_ms(&start, &end)?;
        return Ok(ms * 1e-3 / iters as f64);
    }
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
    // The vectorized kernel (head_dim/2 and ld divisible by 4) and the scalar one.
    add(
        "rope",
        rope_check::<half::bf16>(dev, (300, 6, 128, 6 * 128 + 256), 1e-2).map(|c| vec![c]),
    );
    add(
        "rope",
        rope_check::<half::bf16>(dev, (37, 5, 12, 5 * 12 + 3), 1e-2).map(|c| vec![c]),
    );
    add(
        "rope",
        rope_check::<f32>(dev, (64, 4, 16, 4 * 16 + 2), 1e-6).map(|c| vec![c]),
    );
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
    add("attention", attention_checks(dev, full));
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

/// Flash attention forward and backward against the CPU reference on random data, for
/// the shapes the engine runs (q/k/v as column blocks of one fused buffer, dq/dk/dv of
/// another), ragged sequence ends, sliding windows, packed segments, batch > 1 and head
/// dims 16..128; the backward also must leave the fused buffer's padding untouched and
/// be bit-identical across two runs. With `full` on a GPU: a 1500-token Mistral-sized
/// check, and forward/backward TFLOP/s at 1 x 8192 (see [`attention_speed`]).
pub fn attention_checks(dev: &Dev, full: bool) -> Result<Vec<Check>> {
    use crate::attention::AttnShape;
    let shape = |batch, seq, heads, kv_heads, head_dim, window| AttnShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
        window,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    let docs = |batch: usize, seq: usize, lens: &[usize]| -> Vec<u32> {
        // Documents of the given lengths, cycled, numbered on from 3 in every batch row.
        let mut ids = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            let (mut id, mut left, mut k) = (3u32, lens[0], 0);
            for _ in 0..seq {
                if left == 0 {
                    k += 1;
                    id += 1;
                    left = lens[k % lens.len()];
                }
                left -= 1;
                ids.push(id);
            }
        }
        ids
    };
    // bf16: operands and outputs carry 2^-9 relative rounding, P and dS are rounded for
    // the tensor cores; the gradients sum up to seq such terms, but their errors are
    // independent, so relative to max |ref| they stay at a few 2^-9 (the CPU emulation of
    // these kernels shows 3-4e-3). f16 has 3 more mantissa bits.
    let (bf_fwd, bf_bwd, hf) = (1e-2, 2e-2, 5e-3);
    let mut out = Vec::new();
    type Bf = half::bf16;
    out.extend(attention_case::<Bf>(
        dev,
        "tiny model",
        shape(2, 77, 4, 2, 32, None),
        None,
        bf_fwd,
        bf_bwd,
    )?);
    out.extend(attention_case::<Bf>(
        dev,
        "window 40 + segments",
        shape(1, 150, 2, 1, 64, Some(40)),
        Some(docs(1, 150, &[37, 70, 5, 90])),
        bf_fwd,
        bf_bwd,
    )?);
    out.extend(attention_case::<Bf>(
        dev,
        "d16 segments",
        shape(2, 70, 2, 2, 16, None),
        Some(docs(2, 70, &[1, 40, 9])),
        bf_fwd,
        bf_bwd,
    )?);
    let mistral_seq = if full && dev.is_cuda() { 1500 } else { 130 };
    out.extend(attention_case::<Bf>(
        dev,
        "Mistral heads",
        shape(1, mistral_seq, 32, 8, 128, None),
        None,
        bf_fwd,
        bf_bwd,
    )?);
    out.extend(attention_case::<half::f16>(
        dev,
        "window 70 + segments",
        shape(2, 100, 2, 2, 64, Some(70)),
        Some(docs(2, 100, &[60, 25])),
        hf,
        hf,
    )?);
    if full && dev.is_cuda() {
        out.push(attention_speed(dev)?);
    }
    Ok(out)
}

/// Columns `[a, b)` of each of `rows` rows of a dense `[rows, ld]` array.
fn cols(data: &[f32], rows: usize, ld: usize, a: usize, b: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| data[r * ld + a..r * ld + b].iter().copied())
        .collect()
}

/// The forward with `warps` per CTA on a GPU (the launcher's tuning variants); on the
/// CPU there is one implementation, the reference.
#[allow(clippy::too_many_arguments)]
fn attention_fwd_variant<T: Float>(
    dev: &Dev,
    s: &crate::attention::AttnShape,
    q: Mat<'_, T>,
    k: Mat<'_, T>,
    v: Mat<'_, T>,
    seg: Option<crate::device::View<'_, u32>>,
    o: Mat<'_, T>,
    lse: crate::device::View<'_, f32>,
    warps: usize,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return crate::launch::attention_fwd_warps(c, s, q, k, v, seg, o, lse, warps);
    }
    let _ = warps;
    crate::attention::attention_fwd(dev, s, q, k, v, seg, o, lse)
}

/// The q, k, v (or dq, dk, dv) column blocks of a fused `[n, ld]` buffer.
fn fused_blocks<T: Float>(
    b: &DBuf<T>,
    n: usize,
    ld: usize,
    qc: usize,
    kc: usize,
) -> (Mat<'_, T>, Mat<'_, T>, Mat<'_, T>) {
    let m = b.all().mat(n, qc + 2 * kc, ld);
    (
        m.col_block(0, qc),
        m.col_block(qc, kc),
        m.col_block(qc + kc, kc),
    )
}

fn attention_case<T: Float>(
    dev: &Dev,
    label: &str,
    s: crate::attention::AttnShape,
    seg: Option<Vec<u32>>,
    tol_fwd: f64,
    tol_bwd: f64,
) -> Result<Vec<Check>> {
    use crate::attention::{attention_bwd, attention_fwd};
    let cpu = Dev::cpu();
    let (n, d) = (s.tokens(), s.head_dim);
    let (qc, kc) = (s.heads * d, s.kv_heads * d);
    let width = qc + 2 * kc;
    let ld = width + 8; // padded, so the blocks really are strided
    let seed = (s.seq * 31 + d) as u64;
    // Larger q/k than unit scale so the softmax is peaked and the running max matters.
    let qkv = random(n * ld, 2.5, seed);
    let dout = random(n * qc, 1.0, seed + 1);
    let segs = |dv: &Dev| -> Result<Option<DBuf<u32>>> {
        seg.as_ref()
            .map(|g| dv.upload(g, "segment ids"))
            .transpose()
    };
    let fwd = |dv: &Dev, warps: usize| -> Result<(Vec<f32>, Vec<f32>)> {
        let buf = upload::<T>(dv, &qkv)?;
        let (q, k, v) = fused_blocks(&buf, n, ld, qc, kc);
        let sg = segs(dv)?;
        let o = poisoned::<T>(dv, n * qc)?;
        let lse = poisoned::<f32>(dv, s.stats_len())?;
        let seg_view = sg.as_ref().map(|b| b.all());
        if warps == 4 {
            attention_fwd(dv, &s, q, k, v, seg_view, o.mat(n, qc), lse.all())?;
        } else {
            attention_fwd_variant(dv, &s, q, k, v, seg_view, o.mat(n, qc), lse.all(), warps)?;
        }
        Ok((to_f32_vec(dv, o.all())?, to_f32_vec(dv, lse.all())?))
    };
    let (o, lse) = fwd(dev, 4)?;
    let (o_ref, lse_ref) = fwd(&cpu, 4)?;
    let (eo, el) = (rel_err(&o, &o_ref), rel_err(&lse, &lse_ref));
    // The 8-warp forward variant at head dim 128 (GPU only; see attention_speed).
    let e8 = if dev.is_cuda() && d == 128 {
        let (o8, l8) = fwd(dev, 8)?;
        Some(rel_err(&o8, &o_ref).max(rel_err(&l8, &lse_ref)))
    } else {
        None
    };

    // The backward of both devices starts from the reference's (rounded) O and lse, so
    // it is checked on its own.
    let bwd = |dv: &Dev| -> Result<Vec<f32>> {
        let buf = upload::<T>(dv, &qkv)?;
        let (q, k, v) = fused_blocks(&buf, n, ld, qc, kc);
        let sg = segs(dv)?;
        let (ob, dob) = (upload::<T>(dv, &o_ref)?, upload::<T>(dv, &dout)?);
        let lb = dv.upload(&lse_ref, "lse")?;
        let g = poisoned::<T>(dv, n * ld)?;
        let (dq, dk, dv_) = fused_blocks(&g, n, ld, qc, kc);
        let scratch = poisoned::<f32>(dv, s.stats_len())?;
        attention_bwd(
            dv,
            &s,
            q,
            k,
            v,
            ob.mat(n, qc),
            dob.mat(n, qc),
            lb.all(),
            sg.as_ref().map(|b| b.all()),
            dq,
            dk,
            dv_,
            scratch.all(),
        )?;
        to_f32_vec(dv, g.all())
    };
    let (g, g2, g_ref) = (bwd(dev)?, bwd(dev)?, bwd(&cpu)?);
    let same = g.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits());
    let pad_kept = cols(&g, n, ld, width, ld).iter().all(|x| x.is_nan());
    let err = |a: usize, b: usize| rel_err(&cols(&g, n, ld, a, b), &cols(&g_ref, n, ld, a, b));
    let (eq, ek, ev) = (err(0, qc), err(qc, qc + kc), err(qc + kc, width));
    let worst = if same && pad_kept {
        eq.max(ek).max(ev)
    } else {
        f64::INFINITY
    };
    let t = T::NAME;
    let what = format!(
        "{label}: b{} s{} h{}/{} d{}{}{}",
        s.batch,
        s.seq,
        s.heads,
        s.kv_heads,
        d,
        s.window.map_or(String::new(), |w| format!(" window {w}")),
        if seg.is_some() { " segments" } else { "" }
    );
    Ok(vec![
        check(
            format!("attention fwd {t} {what}"),
            eo.max(el).max(e8.unwrap_or(0.0)),
            tol_fwd,
            &format!(
                " (o {eo:.1e}, lse {el:.1e}{})",
                e8.map_or(String::new(), |e| format!(", 8-warp variant {e:.1e}"))
            ),
        ),
        check(
            format!("attention bwd {t} {what}"),
            worst,
            tol_bwd,
            &format!(
                " (dq {eq:.1e}, dk {ek:.1e}, dv {ev:.1e}{}{})",
                if same { "" } else { ", NOT deterministic" },
                if pad_kept {
                    ""
                } else {
                    ", wrote outside dq/dk/dv"
                }
            ),
        ),
    ])
}

/// Forward and backward time at batch 1 x 8192 tokens, 32 query / 8 KV heads of 128
/// (Mistral 7B), causal, in bf16. FLOPs count the causal half of the score matrix:
/// forward `2 · 2 · b · h · (s²/2) · d` (QKᵀ and PV), backward 2.5 times that (the five
/// matmuls of FlashAttention-2's count; qtrain's deterministic backward really does
/// seven, recomputing S and dP in the dQ kernel, so its hardware rate is 1.4x what is
/// printed). The forward is timed in both CTA shapes of the launcher (4 warps x 16
/// queries, the default, and 8 warps). The check fails only on non-finite outputs.
pub fn attention_speed(dev: &Dev) -> Result<Check> {
    use crate::attention::{attention_bwd, AttnShape};
    type T = half::bf16;
    let s = AttnShape {
        batch: 1,
        seq: 8192,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        window: None,
        scale: 1.0 / (128f32).sqrt(),
    };
    let (n, d) = (s.tokens(), s.head_dim);
    let (qc, kc) = (s.heads * d, s.kv_heads * d);
    let width = qc + 2 * kc;
    let qkv = upload::<T>(dev, &random(n * width, 2.0, 41))?;
    let m = qkv.mat(n, width);
    let (q, k, v) = (
        m.col_block(0, qc),
        m.col_block(qc, kc),
        m.col_block(qc + kc, kc),
    );
    let o = poisoned::<T>(dev, n * qc)?;
    let lse = poisoned::<f32>(dev, s.stats_len())?;
    let dout = upload::<T>(dev, &random(n * qc, 1.0, 42))?;
    let g = poisoned::<T>(dev, n * width)?;
    let gm = g.mat(n, width);
    let (dq, dk, dv) = (
        gm.col_block(0, qc),
        gm.col_block(qc, kc),
        gm.col_block(qc + kc, kc),
    );
    let scratch = poisoned::<f32>(dev, s.stats_len())?;
    let fwd = |warps| {
        time_it(dev, 10, || {
            attention_fwd_variant(dev, &s, q, k, v, None, o.mat(n, qc), lse.all(), warps)
        })
    };
    let (t_fwd8, t_fwd) = (fwd(8)?, fwd(4)?);
    let bwd = || {
        attention_bwd(
            dev,
            &s,
            q,
            k,
            v,
            o.mat(n, qc),
            dout.mat(n, qc),
            lse.all(),
            None,
            dq,
            dk,
            dv,
            scratch.all(),
        )
    };
    let t_bwd = time_it(dev, 5, bwd)?;
    let flops = 4.0 * (s.batch * s.heads) as f64 * (s.seq as f64).powi(2) / 2.0 * d as f64;
    let finite = to_f32_vec(dev, o.all())?.iter().all(|x| x.is_finite())
        && to_f32_vec(dev, g.all())?.iter().all(|x| x.is_finite());
    Ok(Check {
        name: "attention speed bf16 b1 s8192 h32/8 d128 causal".into(),
        ok: finite,
        detail: format!(
            "fwd {:.2} ms {:.0} TFLOP/s (8-warp variant {:.2} ms {:.0}), bwd {:.2} ms {:.0} \
             TFLOP/s (2.5x fwd FLOPs){}",
            t_fwd * 1e3,
            flops / t_fwd / 1e12,
            t_fwd8 * 1e3,
            flops / t_fwd8 / 1e12,
            t_bwd * 1e3,
            2.5 * flops / t_bwd / 1e12,
            if finite { "" } else { ", NON-FINITE outputs" }
        ),
    })
}

fn norm_checks<T: Float>(dev: &Dev, rows: usize, cols: usize, tol: f64) -> Result<Vec<Check>> {
    let cpu = Dev::cpu();
    let x = random(rows * cols, 2.0, 1);
    let w = random(cols, 1.5, 2);
    let dy = random(rows * cols, 1.0, 3);
    let old = random(rows * cols, 1.0, 4);
    type Outs = (Vec<f32>, Vec<f32>, Vec<f32>, f64);
    let run = |d: &Dev| -> Result<Outs> {
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

fn rope_check<T: Float>(
    dev: &Dev,
    (n, heads, d, ld): (usize, usize, usize, usize),
    tol: f64,
) -> Result<Check> {
    let cpu = Dev::cpu();
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
        format!(
            "rope fwd + partial inverse {}, {n} x {heads} heads of {d}, ld {ld}",
            T::NAME
        ),
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
