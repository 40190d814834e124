//! The attention kernels against the CPU reference on random data, for `qtrain
//! doctor` ([`self_test`]), and their speed at Mistral-7B's shape ([`speed`]).

use super::{attention_bwd, attention_fwd, AttnBackward, AttnShape, FwdKernel, SplitKernels};
use crate::device::{to_f32_vec, DBuf, Dev, Float, Mat, View};
use crate::error::Result;
use crate::selftest::{check, poisoned, random, rel_err, time_it, upload, Check};

/// Flash attention forward and backward against the CPU reference on random data, for
/// the shapes the engine runs (q/k/v as column blocks of one fused buffer, dq/dk/dv of
/// another), ragged sequence ends, sliding windows, packed segments, batch > 1 and head
/// dims 16..128; the backward also must leave the fused buffer's padding untouched and
/// be bit-identical across two runs. With `full` on a GPU: a 1500-token Mistral-sized
/// check, and forward/backward TFLOP/s at 1 x 8192 (see [`speed`]).
pub fn self_test(dev: &Dev, full: bool) -> Result<Vec<Check>> {
    let mut out = cases(dev, full, Pass::Mma)?;
    // The wgmma kernels last, each shape again: on their first run on a GPU a fault
    // (which ends the CUDA context) then leaves every mma.sync result reported.
    if dev.is_cuda() {
        out.extend(cases(dev, full, Pass::Wgmma)?);
    }
    if full && dev.is_cuda() {
        out.push(speed(dev)?);
    }
    Ok(out)
}

/// Which kernels a pass over the shapes checks: the default path and the mma.sync
/// variants with every backward mode, or only the Hopper (wgmma) kernels.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Mma,
    Wgmma,
}

fn cases(dev: &Dev, full: bool, pass: Pass) -> Result<Vec<Check>> {
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
        pass,
    )?);
    out.extend(attention_case::<Bf>(
        dev,
        "window 40 + segments",
        shape(1, 150, 2, 1, 64, Some(40)),
        Some(docs(1, 150, &[37, 70, 5, 90])),
        bf_fwd,
        bf_bwd,
        pass,
    )?);
    out.extend(attention_case::<Bf>(
        dev,
        "d16 segments",
        shape(2, 70, 2, 2, 16, None),
        Some(docs(2, 70, &[1, 40, 9])),
        bf_fwd,
        bf_bwd,
        pass,
    )?);
    out.extend(attention_case::<Bf>(
        dev,
        "packed short documents (tiles of other documents skipped)",
        shape(2, 400, 2, 1, 64, None),
        Some(docs(2, 400, &[70, 150, 3, 64, 100])),
        bf_fwd,
        bf_bwd,
        pass,
    )?);
    let mistral_seq = if full && dev.is_cuda() { 1500 } else { 130 };
    out.extend(attention_case::<Bf>(
        dev,
        "Mistral heads",
        shape(1, mistral_seq, 32, 8, 128, None),
        None,
        bf_fwd,
        bf_bwd,
        pass,
    )?);
    out.extend(attention_case::<half::f16>(
        dev,
        "window 70 + segments",
        shape(2, 100, 2, 2, 64, Some(70)),
        Some(docs(2, 100, &[60, 25])),
        hf,
        hf,
        pass,
    )?);
    Ok(out)
}

/// Columns `[a, b)` of each of `rows` rows of a dense `[rows, ld]` array.
fn cols(data: &[f32], rows: usize, ld: usize, a: usize, b: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| data[r * ld + a..r * ld + b].iter().copied())
        .collect()
}

/// The forward kernels this device runs at `head_dim`, besides the default path: on a
/// GPU every [`FwdKernel`] it supports; on the CPU none (it has one implementation, the
/// reference).
fn fwd_kernels(dev: &Dev, head_dim: usize) -> Result<Vec<FwdKernel>> {
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        let cc = c.compute_capability()?;
        return Ok(FwdKernel::ALL
            .into_iter()
            .filter(|k| k.unsupported(cc, head_dim).is_none())
            .collect());
    }
    let _ = (dev, head_dim);
    Ok(Vec::new())
}

/// The backward runs to check and time on this device: every mode on a GPU, the split
/// one also with each other kernel set that runs here (`None`: the launcher's choice,
/// [`default_kernels`], which is not listed again); on the CPU the reference.
fn bwd_runs(dev: &Dev, head_dim: usize) -> Result<Vec<(AttnBackward, Option<SplitKernels>)>> {
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        let cc = c.compute_capability()?;
        let default = default_kernels(dev, head_dim).map(|k| k.1);
        let here = |k: &SplitKernels| k.unsupported(cc, head_dim).is_none() && Some(*k) != default;
        let split = |k: &SplitKernels| (AttnBackward::Split, Some(*k));
        let mut runs = vec![(AttnBackward::Split, None)];
        let kerns = SplitKernels::ALL.iter().filter(|k| here(k));
        runs.extend(kerns.clone().filter(|k| !k.is_wgmma()).map(split));
        // fused-atomic runs a wgmma kernel on 9.0 at head dim 128.
        let atomic_wg = super::cuda::fused_wgmma_here(c, head_dim)?;
        runs.push((AttnBackward::Fused, None));
        if !atomic_wg {
            runs.push((AttnBackward::FusedAtomic, None));
        }
        // The wgmma kernels last (see self_test).
        runs.extend(kerns.filter(|k| k.is_wgmma()).map(split));
        if atomic_wg {
            runs.push((AttnBackward::FusedAtomic, Some(SplitKernels::Wgmma)));
        }
        // stored-ds: wgmma kernels only.
        if super::cuda::stored_ds_unsupported(c, head_dim)?.is_none() {
            runs.push((AttnBackward::StoredDs, Some(SplitKernels::Wgmma)));
        }
        return Ok(runs);
    }
    let _ = (dev, head_dim);
    Ok(vec![(AttnBackward::Split, None)])
}

/// The kernels the launchers pick on this device at `head_dim` (`None` on the CPU, or
/// when the environment names an unknown kernel: the explicit variants then still get
/// checked, and the default path reports the error).
fn default_kernels(dev: &Dev, head_dim: usize) -> Option<(FwdKernel, SplitKernels)> {
    super::kernels_for(dev, head_dim).ok().flatten()
}

/// `name (split, wgmma)` for a run of [`bwd_runs`] (`fused-atomic, wgmma`: its Hopper
/// kernel, which the launcher picks by itself).
fn bwd_label(mode: AttnBackward, split: Option<SplitKernels>) -> String {
    match split {
        Some(k) => format!("{mode}, {}", k.label()),
        None => mode.to_string(),
    }
}

/// The backward with the given split kernels on a GPU (`None`: the launcher's choice);
/// on the CPU, the reference.
#[allow(clippy::too_many_arguments)]
fn attention_bwd_variant<T: Float>(
    dev: &Dev,
    s: &AttnShape,
    mode: AttnBackward,
    split: Option<SplitKernels>,
    q: Mat<'_, T>,
    k: Mat<'_, T>,
    v: Mat<'_, T>,
    o: Mat<'_, T>,
    d_o: Mat<'_, T>,
    lse: View<'_, f32>,
    seg: Option<View<'_, u32>>,
    dq: Mat<'_, T>,
    dk: Mat<'_, T>,
    dv: Mat<'_, T>,
    scratch: View<'_, f32>,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let (Some(c), Some(split)) = (dev.cuda(), split) {
        return super::cuda::attention_bwd_kernels(
            c, s, mode, split, q, k, v, o, d_o, lse, seg, dq, dk, dv, scratch,
        );
    }
    let _ = split;
    attention_bwd(dev, s, mode, q, k, v, o, d_o, lse, seg, dq, dk, dv, scratch)
}

/// The forward with the given kernel on a GPU; on the CPU, the reference.
#[allow(clippy::too_many_arguments)]
fn attention_fwd_variant<T: Float>(
    dev: &Dev,
    s: &AttnShape,
    q: Mat<'_, T>,
    k: Mat<'_, T>,
    v: Mat<'_, T>,
    seg: Option<View<'_, u32>>,
    o: Mat<'_, T>,
    lse: View<'_, f32>,
    kern: FwdKernel,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return super::cuda::attention_fwd_kernel(c, s, q, k, v, seg, o, lse, kern);
    }
    let _ = kern;
    attention_fwd(dev, s, q, k, v, seg, o, lse)
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

#[allow(clippy::too_many_arguments)]
fn attention_case<T: Float>(
    dev: &Dev,
    label: &str,
    s: AttnShape,
    seg: Option<Vec<u32>>,
    tol_fwd: f64,
    tol_bwd: f64,
    pass: Pass,
) -> Result<Vec<Check>> {
    let wgmma_pass = pass == Pass::Wgmma;
    // The launchers' own choices run as the default paths (`None` below), in the pass of
    // their kind, and not again as explicit variants.
    let defaults = default_kernels(dev, s.head_dim);
    let (default_fwd, default_split) = (defaults.map(|k| k.0), defaults.map(|k| k.1));
    let fwd_default_here = default_fwd.is_some_and(|k| k.is_wgmma()) == wgmma_pass;
    let fwd_kerns: Vec<_> = fwd_kernels(dev, s.head_dim)?
        .into_iter()
        .filter(|&k| k.is_wgmma() == wgmma_pass && Some(k) != default_fwd)
        .collect();
    let bwd_kerns: Vec<_> = bwd_runs(dev, s.head_dim)?
        .into_iter()
        .filter(|r| match r {
            (AttnBackward::Split, None) => default_split.is_some_and(|k| k.is_wgmma()),
            (_, k) => k.is_some_and(|k| k.is_wgmma()),
        } == wgmma_pass)
        .collect();
    if !fwd_default_here && fwd_kerns.is_empty() && bwd_kerns.is_empty() {
        return Ok(Vec::new()); // no wgmma kernel at this head dim or on this GPU
    }
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
    // `None`: the default path (`attention_fwd`); `Some`: that kernel.
    let fwd = |dv: &Dev, kern: Option<FwdKernel>| -> Result<(Vec<f32>, Vec<f32>)> {
        let buf = upload::<T>(dv, &qkv)?;
        let (q, k, v) = fused_blocks(&buf, n, ld, qc, kc);
        let sg = segs(dv)?;
        let o = poisoned::<T>(dv, n * qc)?;
        let lse = poisoned::<f32>(dv, s.stats_len())?;
        let seg_view = sg.as_ref().map(|b| b.all());
        match kern {
            None => attention_fwd(dv, &s, q, k, v, seg_view, o.mat(n, qc), lse.all())?,
            Some(kern) => {
                attention_fwd_variant(dv, &s, q, k, v, seg_view, o.mat(n, qc), lse.all(), kern)?
            }
        }
        Ok((to_f32_vec(dv, o.all())?, to_f32_vec(dv, lse.all())?))
    };
    let (o_ref, lse_ref) = fwd(&cpu, None)?;
    // The default path, in the pass of its kernel's kind.
    // Each kernel's outputs (o, lse), for the bit-identity of the pipelined forwards below.
    type Outputs = (Vec<f32>, Vec<f32>);
    let mut outputs: Vec<(FwdKernel, Outputs)> = Vec::new();
    let (eo, el) = if fwd_default_here {
        let (o, lse) = fwd(dev, None)?;
        let errs = (rel_err(&o, &o_ref), rel_err(&lse, &lse_ref));
        if let Some(k) = default_fwd {
            outputs.push((k, (o, lse)));
        }
        errs
    } else {
        (0.0, 0.0)
    };
    // Every forward kernel of this pass the GPU runs at this head dim (see speed).
    let mut variants = Vec::new();
    for kern in fwd_kerns {
        let (ov, lv) = fwd(dev, Some(kern))?;
        variants.push((kern, rel_err(&ov, &o_ref).max(rel_err(&lv, &lse_ref))));
        outputs.push((kern, (ov, lv)));
    }
    // A pipelined wgmma forward runs the same operations on O in the same order as its
    // unpipelined kernel: any bit that differs is a fault (a product reading registers or
    // shared memory that changed under it), however small.
    let of = |k: FwdKernel| outputs.iter().find(|o| o.0 == k).map(|o| &o.1);
    let bits = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    let pipelined: Vec<(FwdKernel, FwdKernel, bool)> = [
        (FwdKernel::Wgmma4, FwdKernel::Wgmma4P),
        (FwdKernel::Wgmma8, FwdKernel::Wgmma8P),
    ]
    .into_iter()
    .filter_map(|(plain, piped)| {
        let (a, b) = (of(plain)?, of(piped)?);
        Some((plain, piped, bits(&a.0, &b.0) && bits(&a.1, &b.1)))
    })
    .collect();
    let pipelined_same = pipelined.iter().all(|p| p.2);
    let worst_variant = variants
        .iter()
        .map(|v| v.1)
        .fold(0.0, f64::max)
        .max(if !pipelined_same { f64::INFINITY } else { 0.0 });

    // The backward of both devices starts from the reference's (rounded) O and lse, so
    // it is checked on its own.
    let bwd = |dv: &Dev, mode: AttnBackward, split: Option<SplitKernels>| -> Result<Vec<f32>> {
        let buf = upload::<T>(dv, &qkv)?;
        let (q, k, v) = fused_blocks(&buf, n, ld, qc, kc);
        let sg = segs(dv)?;
        let (ob, dob) = (upload::<T>(dv, &o_ref)?, upload::<T>(dv, &dout)?);
        let lb = dv.upload(&lse_ref, "lse")?;
        let g = poisoned::<T>(dv, n * ld)?;
        let (dq, dk, dv_) = fused_blocks(&g, n, ld, qc, kc);
        let scratch = poisoned::<f32>(dv, s.bwd_scratch_len(mode))?;
        attention_bwd_variant(
            dv,
            &s,
            mode,
            split,
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
    let g_ref = bwd(&cpu, AttnBackward::Split, None)?;
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
    let tag = if wgmma_pass { " (wgmma)" } else { "" };
    let mut out = Vec::new();
    // A check only where a forward ran in this pass.
    if fwd_default_here || !variants.is_empty() {
        let default = fwd_default_here.then(|| {
            let kern = default_fwd.map_or(String::new(), |k| format!("{}: ", k.label()));
            format!("{kern}o {eo:.1e}, lse {el:.1e}")
        });
        let detail = default
            .into_iter()
            .chain(
                variants
                    .iter()
                    .map(|(k, e)| format!("{} {e:.1e}", k.label())),
            )
            .chain(pipelined.iter().map(|(plain, piped, same)| {
                let how = if *same {
                    "bit-identical to"
                } else {
                    "DIFFERS from"
                };
                format!("{} {how} {}", piped.label(), plain.label())
            }))
            .collect::<Vec<_>>()
            .join(", ");
        out.push(check(
            format!("attention fwd{tag} {t} {what}"),
            eo.max(el).max(worst_variant),
            tol_fwd,
            &format!(" ({detail})"),
        ));
    }
    // Every backward mode on a GPU (the CPU has one: the reference); the reproducible
    // ones must also be bit-identical across two runs.
    for (mode, split) in bwd_kerns {
        let g = bwd(dev, mode, split)?;
        let same = !mode.reproducible()
            || g.iter()
                .zip(&bwd(dev, mode, split)?)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        let pad_kept = cols(&g, n, ld, width, ld).iter().all(|x| x.is_nan());
        let err = |a: usize, b: usize| rel_err(&cols(&g, n, ld, a, b), &cols(&g_ref, n, ld, a, b));
        let (eq, ek, ev) = (err(0, qc), err(qc, qc + kc), err(qc + kc, width));
        let worst = if same && pad_kept {
            eq.max(ek).max(ev)
        } else {
            f64::INFINITY
        };
        let name = match (mode, split) {
            (AttnBackward::Split, None) => format!("attention bwd{tag} {t} {what}"),
            (m, k) => format!("attention bwd ({}) {t} {what}", bwd_label(m, k)),
        };
        // The default path's kernels, named.
        let kernels = match (mode, split, default_split) {
            (AttnBackward::Split, None, Some(k)) => format!("split {}: ", k.label()),
            _ => String::new(),
        };
        out.push(check(
            name,
            worst,
            tol_bwd,
            &format!(
                " ({kernels}dq {eq:.1e}, dk {ek:.1e}, dv {ev:.1e}{}{})",
                if same { "" } else { ", NOT deterministic" },
                if pad_kept {
                    ""
                } else {
                    ", wrote outside dq/dk/dv"
                }
            ),
        ));
    }
    Ok(out)
}

/// Forward and backward time at batch 1 x 8192 tokens, 32 query / 8 KV heads of 128
/// (Mistral 7B), causal, in bf16. FLOPs count the causal half of the score matrix:
/// forward `2 · 2 · b · h · (s²/2) · d` (QKᵀ and PV), backward 2.5 times that (the five
/// matmuls of FlashAttention-2's count; the split backward really does seven,
/// recomputing S and dP in the dQ kernel, so its hardware rate is 1.4x what is printed;
/// the fused ones do five). Every backward mode is timed, and every forward kernel the GPU
/// runs ([`FwdKernel`]: mma.sync with 4 warps, the default, or 8; wgmma with one or two
/// warpgroups on 9.0). The check fails only on non-finite outputs.
pub fn speed(dev: &Dev) -> Result<Check> {
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
    // Scratch for the hungriest mode this GPU runs (the stored dS on Hopper: 2.16 GB).
    let runs = bwd_runs(dev, d)?;
    let scratch_len = runs
        .iter()
        .map(|&(m, _)| s.bwd_scratch_len(m))
        .max()
        .unwrap_or(0);
    let scratch = poisoned::<f32>(dev, scratch_len)?;
    let mut t_fwd = Vec::new();
    for kern in fwd_kernels(dev, d)? {
        let t = time_it(dev, 10, || {
            attention_fwd_variant(dev, &s, q, k, v, None, o.mat(n, qc), lse.all(), kern)
        })?;
        t_fwd.push((kern, t));
    }
    let bwd = |mode, split| {
        attention_bwd_variant(
            dev,
            &s,
            mode,
            split,
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
    let mut t_bwd = Vec::new();
    let default_split = default_kernels(dev, d).map(|k| k.1);
    for (mode, split) in runs {
        // The default split backward is labelled with the kernels it runs.
        let named = match (mode, split) {
            (AttnBackward::Split, None) => default_split,
            _ => split,
        };
        t_bwd.push((
            bwd_label(mode, named),
            time_it(dev, 5, || bwd(mode, split))?,
        ));
    }
    let flops = 4.0 * (s.batch * s.heads) as f64 * (s.seq as f64).powi(2) / 2.0 * d as f64;
    let finite = to_f32_vec(dev, o.all())?.iter().all(|x| x.is_finite())
        && to_f32_vec(dev, g.all())?.iter().all(|x| x.is_finite());
    Ok(Check {
        name: "attention speed bf16 b1 s8192 h32/8 d128 causal".into(),
        ok: finite,
        detail: format!(
            "fwd {} (ms, TFLOP/s), bwd {} (TFLOP/s counted as 2.5x fwd FLOPs){}",
            t_fwd
                .iter()
                .map(|(k, t)| format!("{} {:.2} ms {:.0}", k.label(), t * 1e3, flops / t / 1e12))
                .collect::<Vec<_>>()
                .join(", "),
            t_bwd
                .iter()
                .map(|(m, t)| format!("{m} {:.2} ms {:.0}", t * 1e3, 2.5 * flops / t / 1e12))
                .collect::<Vec<_>>()
                .join(", "),
            if finite { "" } else { ", NON-FINITE outputs" }
        ),
    })
}
