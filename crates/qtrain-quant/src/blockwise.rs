//! 8-bit blockwise quantization with a 256-entry code (bitsandbytes'
//! `quantize_blockwise` / `dequantize_blockwise`): each block of `blocksize` values
//! stores its absolute maximum as f32 and every value as the index of the nearest
//! code entry to `value / absmax`. Used for double quantization of NF4 absmax values
//! and for the 8-bit Adam state.

/// Index of the code entry nearest to `x`, exactly as bitsandbytes' CUDA
/// `dQuantize<0>` finds it: a 7-step binary search from pivot 127 over the sorted
/// code, then a comparison with the midpoint to the neighbour on the side of `x`.
/// (Ties and the asymmetric end handling follow the kernel, which matters for
/// bit-compatibility: e.g. a value exactly on a midpoint goes to the lower index
/// when above the pivot.)
pub fn quantize_one(code: &[f32], x: f32) -> u8 {
    debug_assert_eq!(code.len(), 256);
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint {
            upper_pivot as u8
        } else {
            pivot as u8
        }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint {
            lower_pivot as u8
        } else {
            pivot as u8
        }
    }
}

/// Quantizes `x` blockwise: `q_out[i]` codes, `absmax_out[b]` per block. The last
/// block may be partial. Values are scaled by the f32 reciprocal of the absmax, as
/// the kernel does (`x * (1/absmax)`, not `x / absmax`), so codes match bit for bit.
pub fn quantize_blockwise(
    x: &[f32],
    code: &[f32],
    blocksize: usize,
    q_out: &mut [u8],
    absmax_out: &mut [f32],
) {
    assert!(blocksize > 0, "blocksize must be positive");
    assert_eq!(q_out.len(), x.len(), "one code per value");
    assert_eq!(
        absmax_out.len(),
        x.len().div_ceil(blocksize),
        "one absmax per block"
    );
    for ((block, q), absmax) in x
        .chunks(blocksize)
        .zip(q_out.chunks_mut(blocksize))
        .zip(absmax_out.iter_mut())
    {
        let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        *absmax = m;
        let inv = 1.0 / m;
        for (qi, &v) in q.iter_mut().zip(block) {
            *qi = quantize_one(code, v * inv);
        }
    }
}

/// `out[i] = code[q[i]] * absmax[i / blocksize]`.
pub fn dequantize_blockwise(
    q: &[u8],
    absmax: &[f32],
    code: &[f32],
    blocksize: usize,
    out: &mut [f32],
) {
    assert_eq!(q.len(), out.len(), "one output per code");
    assert_eq!(
        absmax.len(),
        q.len().div_ceil(blocksize),
        "one absmax per block"
    );
    for ((qb, ob), &m) in q
        .chunks(blocksize)
        .zip(out.chunks_mut(blocksize))
        .zip(absmax)
    {
        for (o, &c) in ob.iter_mut().zip(qb) {
            *o = code[c as usize] * m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamic_map::{signed_dynamic_map, unsigned_dynamic_map};

    #[test]
    fn exact_code_values_map_to_themselves() {
        let code = signed_dynamic_map();
        for (i, &c) in code.iter().enumerate() {
            assert_eq!(code[quantize_one(code, c) as usize], c, "entry {i}");
        }
    }

    #[test]
    fn picks_nearest_entry() {
        let code = signed_dynamic_map();
        for k in 0..2000 {
            let x = -1.0 + 2.0 * (k as f32 + 0.37) / 2000.0;
            let got = code[quantize_one(code, x) as usize];
            let best = code.iter().fold(f32::MAX, |b, &c| b.min((c - x).abs()));
            assert!(
                (got - x).abs() <= best + 1e-7,
                "x={x} got {got} best dist {best}"
            );
        }
    }

    #[test]
    fn round_trip_error_bound() {
        let code = unsigned_dynamic_map();
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 + 1e-4)
            .collect();
        let mut q = vec![0u8; x.len()];
        let mut absmax = vec![0f32; x.len().div_ceil(256)];
        quantize_blockwise(&x, code, 256, &mut q, &mut absmax);
        assert_eq!(absmax.len(), 4);
        let mut back = vec![0f32; x.len()];
        dequantize_blockwise(&q, &absmax, code, 256, &mut back);
        // The widest gap of the unsigned map is in its top decade: 0.9/128 wide,
        // so the error is at most half of that times the block absmax.
        for (b, (xs, ys)) in x.chunks(256).zip(back.chunks(256)).enumerate() {
            for (a, c) in xs.iter().zip(ys) {
                assert!(
                    (a - c).abs() <= 0.5 * 0.9 / 128.0 * absmax[b] + 1e-7,
                    "{a} vs {c}"
                );
            }
        }
    }

    #[test]
    fn partial_last_block() {
        let code = signed_dynamic_map();
        let x = [0.5f32, -0.25, 1.0, 3.0, -6.0];
        let mut q = [0u8; 5];
        let mut absmax = [0f32; 2];
        quantize_blockwise(&x, code, 3, &mut q, &mut absmax);
        assert_eq!(absmax, [1.0, 6.0]);
        assert_eq!(code[q[2] as usize], 1.0);
        assert_eq!(code[q[4] as usize], -0.992_968_75);
    }
}
