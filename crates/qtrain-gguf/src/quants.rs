//! ggml's block quantizers and dequantizers, bit-compatible with the reference C
//! implementation in ggml-quants.c (`quantize_row_*_ref`, what `llama-quantize`
//! runs when no importance matrix is given), written from its description:
//!
//! * Q8_0: blocks of 32, one f16 scale `d = amax / 127`, values `round(x / d)`
//!   (half away from zero, C's `roundf`).
//! * Q5_0: blocks of 32, `d = max / -16` with `max` the value of largest magnitude,
//!   5-bit codes `trunc(x / d + 16.5)` clamped to 31, the fifth bits in `qh`.
//! * Q4_K / Q5_K: super-blocks of 256 = 8 sub-blocks of 32 with an affine code
//!   `x ≈ d·sc·q − dmin·m`; each sub-block's scale and min come from
//!   `make_qkx2_quants` (a weighted least-squares search over 21 resp. 16 candidate
//!   scales), and are themselves quantized to 6 bits against the super-block's
//!   f16 `d` and `dmin`.
//! * Q6_K: super-blocks of 256 = 16 sub-blocks of 16 with a symmetric 6-bit code
//!   `x ≈ d·sc·(q − 32)`; sub-block scales from `make_qx_quants` (rmse type 1:
//!   weights `x²`, a search over 19 candidate scales), quantized to int8.
//!
//! Bit-compatibility needs the same arithmetic in the same order: every operation
//! here is an f32 operation in the order the C code performs it (ggml-base is built
//! without FMA contraction), rounding to integers goes through ggml's
//! `nearest_int` (round half to even via the `1.5·2^23` trick), and f32 → f16 is
//! round-to-nearest-even as `GGML_FP32_TO_FP16`. The fixture test checks the bytes
//! against ggml's own output.
//!
//! Rows are independent blocks, so [`quantize`] splits large tensors across
//! threads without changing a byte.

use crate::types::{GgmlType, QK_K};
use half::{bf16, f16};

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below this is zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round to nearest, ties to even, for |x| < 2^22, by adding
/// 1.5·2^23 so the integer lands in the mantissa.
#[inline]
fn nearest_int(fval: f32) -> i32 {
    debug_assert!(fval.abs() <= 4194303.0, "nearest_int({fval}) out of range");
    let val = fval + 12582912.0;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

#[inline]
fn f16_bits(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[inline]
fn f16_at(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Appends the GGUF bytes of `x` as `ty` to `out`. `x` holds whole rows of
/// `row_len` elements, a multiple of `ty`'s block size. Large inputs are split
/// across threads by rows; the result does not depend on the split.
pub fn quantize(ty: GgmlType, x: &[f32], row_len: usize, out: &mut Vec<u8>) {
    assert!(
        row_len > 0 && x.len().is_multiple_of(row_len),
        "x is not whole rows"
    );
    assert_eq!(
        row_len % ty.block_size(),
        0,
        "row of {row_len} is not a multiple of the {ty} block size {}",
        ty.block_size()
    );
    let rows = x.len() / row_len;
    let row_bytes = ty.row_size(row_len);
    let start = out.len();
    out.resize(start + rows * row_bytes, 0);
    let dst = &mut out[start..];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The k-quants cost ~100 flops per element; threads pay off beyond ~1M elements.
    if threads == 1 || rows < 2 || x.len() < (1 << 20) {
        quantize_rows(ty, x, dst);
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (xs, ds) in x.chunks(per * row_len).zip(dst.chunks_mut(per * row_bytes)) {
            s.spawn(move || quantize_rows(ty, xs, ds));
        }
    });
}

/// Quantizes whole blocks `x` into `dst` (exactly the right size).
fn quantize_rows(ty: GgmlType, x: &[f32], dst: &mut [u8]) {
    let bs = ty.block_size();
    let ts = ty.type_size();
    debug_assert_eq!(x.len() / bs * ts, dst.len());
    let blocks = x.chunks_exact(bs).zip(dst.chunks_exact_mut(ts));
    match ty {
        GgmlType::F32 => {
            for (v, d) in blocks {
                d.copy_from_slice(&v[0].to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (v, d) in blocks {
                d.copy_from_slice(&f16_bits(v[0]));
            }
        }
        GgmlType::BF16 => {
            for (v, d) in blocks {
                d.copy_from_slice(&bf16_bits(v[0]));
            }
        }
        GgmlType::Q8_0 => blocks.for_each(|(v, d)| block_q8_0(v, d)),
        GgmlType::Q5_0 => blocks.for_each(|(v, d)| block_q5_0(v, d)),
        GgmlType::Q4K => blocks.for_each(|(v, d)| block_qk_affine(v, d, 15)),
        GgmlType::Q5K => blocks.for_each(|(v, d)| block_qk_affine(v, d, 31)),
        GgmlType::Q6K => blocks.for_each(|(v, d)| block_q6_k(v, d)),
    }
}

/// ggml's `ggml_compute_fp32_to_bf16`: NaN made quiet, otherwise round to nearest
/// even on the upper 16 bits.
fn bf16_bits(x: f32) -> [u8; 2] {
    let u = x.to_bits();
    let h = if (u & 0x7fff_ffff) > 0x7f80_0000 {
        ((u >> 16) | 64) as u16
    } else {
        ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
    };
    debug_assert!(x.is_nan() || h == bf16::from_f32(x).to_bits());
    h.to_le_bytes()
}

/// `quantize_row_q8_0_ref` for one block of 32.
fn block_q8_0(x: &[f32], y: &mut [u8]) {
    let amax = x
        .iter()
        .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16_bits(d));
    for (q, &v) in y[2..].iter_mut().zip(x) {
        // roundf: half away from zero, as f32::round.
        *q = (v * id).round() as i8 as u8;
    }
}

/// `quantize_row_q5_0_ref` for one block of 32.
fn block_q5_0(x: &[f32], y: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16_bits(d));
    let mut qh = 0u32;
    for j in 0..16 {
        // (int8_t)(x + 16.5f) truncates toward zero.
        let xi0 = ((x[j] * id + 16.5) as i8 as u8).min(31);
        let xi1 = ((x[16 + j] * id + 16.5) as i8 as u8).min(31);
        y[6 + j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// `make_qkx2_quants`: the scale and (negated) min of an affine `nmax`-level code
/// for `x` minimizing the `weights`-weighted squared error, searched over
/// `nstep + 1` candidate scales `(rmin + rdelta·is + nmax) / (max − min)`. Writes
/// the codes to `l`; returns `(scale, -min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let w = weights[i];
            let lf = q as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` from the
/// 12 packed bytes of a Q4_K/Q5_K super-block.
#[inline]
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `quantize_row_q4_K_ref` (`nmax` = 15) and `quantize_row_q5_K_ref` (`nmax` = 31)
/// for one super-block of 256.
fn block_qk_affine(x: &[f32], y: &mut [u8], nmax: i32) {
    let (rmin, nstep) = if nmax == 15 { (-1.0, 20) } else { (-0.5, 15) };
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            xs,
            &weights,
            nmax,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            rmin,
            0.1,
            nstep,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc = [0u8; 12];
    for j in 0..8 {
        // uint8_t ls = nearest_int(...): the int is truncated to 8 bits first.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    y[0..2].copy_from_slice(&f16_bits(max_scale / 63.0));
    y[2..4].copy_from_slice(&f16_bits(max_min / 63.0));
    y[4..16].copy_from_slice(&sc);
    let d_all = f16_at(&y[0..2]);
    let dmin_all = f16_at(&y[2..4]);
    for j in 0..8 {
        let (s, m) = get_scale_min_k4(j, &sc);
        let d = d_all * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax);
            l[32 * j + ii] = q as u8;
        }
    }
    if nmax == 15 {
        let qs = &mut y[16..144];
        for (c, chunk) in qs.chunks_exact_mut(32).enumerate() {
            let j = 64 * c;
            for (i, q) in chunk.iter_mut().enumerate() {
                *q = l[j + i] | (l[j + i + 32] << 4);
            }
        }
    } else {
        let (qh, ql) = y[16..176].split_at_mut(32);
        qh.fill(0);
        let (mut m1, mut m2) = (1u8, 2u8);
        for (c, chunk) in ql.chunks_exact_mut(32).enumerate() {
            let n = 64 * c;
            for j in 0..32 {
                let mut l1 = l[n + j];
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                let mut l2 = l[n + j + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                chunk[j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
    }
}

/// `make_qx_quants` with `rmse_type` 1 and no importance weights (what Q6_K uses):
/// a symmetric code `l ∈ [−nmax, nmax)` for `x` with the scale among 19 candidates
/// that maximizes `(Σ w·x·l)² / Σ w·l²` for `w = x²`. Writes `l + nmax` to `out`;
/// returns the scale.
fn make_qx_quants_rmse1(x: &[f32], nmax: i32, out: &mut [i8]) -> f32 {
    let n = x.len();
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        out[..n].fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -nmaxf / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let l = code(iscale, x[i]);
        out[i] = (l + nmax) as i8;
        let w = x[i] * x[i];
        let lf = l as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let lf = code(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                out[i] = (nmax + code(iscale, x[i])) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `quantize_row_q6_K_ref` for one super-block of 256.
fn block_q6_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants_rmse1(&x[16 * ib..16 * ib + 16], 32, &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.fill(0);
        y[208..210].copy_from_slice(&f16_bits(0.0));
        return;
    }
    let iscale = -128.0 / max_scale;
    y[208..210].copy_from_slice(&f16_bits(1.0 / iscale));
    let d_all = f16_at(&y[208..210]);
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        // MIN(127, nearest_int(...)) stored to int8_t.
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..16 {
        let d = d_all * sc[j] as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    let (ql, rest) = y.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    for (ib, s) in sc.iter().enumerate() {
        rest[ib] = *s as u8;
    }
    for half in 0..2 {
        let j = 128 * half;
        let ql = &mut ql[64 * half..64 * half + 64];
        let qh = &mut qh[32 * half..32 * half + 32];
        for i in 0..32 {
            let q = |k: usize| l[j + i + 32 * k] as u8;
            ql[i] = (q(0) & 0x0f) | ((q(2) & 0x0f) << 4);
            ql[i + 32] = (q(1) & 0x0f) | ((q(3) & 0x0f) << 4);
            qh[i] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
}

/// The values GGUF bytes of type `ty` stand for (ggml's `dequantize_row_*`).
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let ts = ty.type_size();
    assert_eq!(bytes.len() % ts, 0, "not whole {ty} blocks");
    let mut out = Vec::with_capacity(bytes.len() / ts * ty.block_size());
    for b in bytes.chunks_exact(ts) {
        match ty {
            GgmlType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => out.push(f16_at(b)),
            GgmlType::BF16 => out.push(bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            GgmlType::Q8_0 => {
                let d = f16_at(b);
                out.extend(b[2..].iter().map(|&q| q as i8 as f32 * d));
            }
            GgmlType::Q5_0 => {
                let d = f16_at(b);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let mut v = [0f32; 32];
                for j in 0..16 {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    let x0 = ((b[6 + j] & 0x0f) as u32 | h0) as i32 - 16;
                    let x1 = ((b[6 + j] >> 4) as u32 | h1) as i32 - 16;
                    v[j] = x0 as f32 * d;
                    v[j + 16] = x1 as f32 * d;
                }
                out.extend(v);
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let d = f16_at(&b[0..2]);
                let min = f16_at(&b[2..4]);
                let sc = &b[4..16];
                let (qh, qs) = if ty == GgmlType::Q4K {
                    (None, &b[16..144])
                } else {
                    (Some(&b[16..48]), &b[48..176])
                };
                for c in 0..4 {
                    let (s1, m1) = get_scale_min_k4(2 * c, sc);
                    let (s2, m2) = get_scale_min_k4(2 * c + 1, sc);
                    let (d1, mm1) = (d * s1 as f32, min * m1 as f32);
                    let (d2, mm2) = (d * s2 as f32, min * m2 as f32);
                    let q = &qs[32 * c..32 * c + 32];
                    let hi = |i: usize, bit: usize| {
                        qh.map_or(0, |h| if h[i] & (1 << bit) != 0 { 16 } else { 0 })
                    };
                    for (i, &v) in q.iter().enumerate() {
                        out.push(d1 * ((v & 0x0f) + hi(i, 2 * c)) as f32 - mm1);
                    }
                    for (i, &v) in q.iter().enumerate() {
                        out.push(d2 * ((v >> 4) + hi(i, 2 * c + 1)) as f32 - mm2);
                    }
                }
            }
            GgmlType::Q6K => {
                let (ql, rest) = b.split_at(128);
                let (qh, rest) = rest.split_at(64);
                let sc = &rest[..16];
                let d = f16_at(&rest[16..18]);
                let mut v = [0f32; QK_K];
                for half in 0..2 {
                    let ql = &ql[64 * half..];
                    let qh = &qh[32 * half..];
                    let sc = &sc[8 * half..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let o = 128 * half + l;
                        v[o] = d * (sc[is] as i8) as f32 * q1 as f32;
                        v[o + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        v[o + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        v[o + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
                out.extend(v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (x, want) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (-2.49, -2),
            (3.7, 4),
            (-3.7, -4),
            (1000.5, 1000),
            (4194303.0, 4194303),
        ] {
            assert_eq!(nearest_int(x), want, "{x}");
            assert_eq!(nearest_int(x), x.round_ties_even() as i32, "{x}");
        }
    }

    #[test]
    fn bf16_bits_round_to_nearest_even_and_quiet_nan() {
        for x in [
            1.0f32,
            -3.3e-5,
            1.003_906_3,
            1.005_859_4,
            3.4e38,
            -0.0,
            1e-40,
        ] {
            assert_eq!(
                bf16_bits(x),
                bf16::from_f32(x).to_bits().to_le_bytes(),
                "{x}"
            );
        }
        let nan = f32::from_bits(0x7f80_0001);
        let b = u16::from_le_bytes(bf16_bits(nan));
        assert!(bf16::from_bits(b).is_nan() && b & 0x40 != 0);
    }
}
