//! NF4 ("4-bit NormalFloat", QLoRA paper) blockwise quantization, bit-compatible
//! with bitsandbytes' `quantize_4bit(quant_type="nf4")`, with optional double
//! quantization of the per-block absmax values (`compress_statistics=True`).
//!
//! Layout (bitsandbytes'): values are split into blocks of `blocksize` (64 by
//! default); each block stores its absolute maximum; each value is replaced by the
//! 4-bit index of the nearest NF4 code to `value * (1/absmax)`; two codes share a
//! byte, the first element in the high nibble. With double quantization the f32
//! absmax values lose their mean (kept as `offset`) and are quantized to 8 bits with
//! the signed dynamic map in blocks of 256, which cuts their cost from 0.5 to about
//! 0.127 bits per weight.

use crate::blockwise::{dequantize_blockwise, quantize_blockwise};
use crate::dynamic_map::signed_dynamic_map;
use crate::error::QuantError;

/// The 16 NF4 values (bitsandbytes `get_4bit_type("nf4")`), sorted.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// Block sizes bitsandbytes accepts for 4-bit quantization.
pub const NF4_BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Block size of the second-level (absmax) quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The NF4 code of a normalized value, by bitsandbytes' decision tree
/// (`dQuantizeNF4` in csrc/kernels.cu). The thresholds are the midpoints between
/// adjacent codes as bitsandbytes computed them; using the same constants and the
/// same strict `>` comparisons makes ties and NaN (an all-zero block: 0 * inf)
/// land where bitsandbytes puts them.
#[allow(clippy::excessive_precision)]
pub fn quantize_nf4_value(x: f32) -> u8 {
    if x > 0.03979014977812767 {
        if x > 0.3893125355243683 {
            if x > 0.6427869200706482 {
                if x > 0.8614784181118011 {
                    0b1111
                } else {
                    0b1110
                }
            } else if x > 0.5016634166240692 {
                0b1101
            } else {
                0b1100
            }
        } else if x > 0.2035212516784668 {
            if x > 0.2920137718319893 {
                0b1011
            } else {
                0b1010
            }
        } else if x > 0.1202552504837513 {
            0b1001
        } else {
            0b1000
        }
    } else if x > -0.33967943489551544 {
        if x > -0.13791173323988914 {
            if x > -0.045525018125772476 {
                0b0111
            } else {
                0b0110
            }
        } else if x > -0.23460740596055984 {
            0b0101
        } else {
            0b0100
        }
    } else if x > -0.6106329262256622 {
        if x > -0.4599952697753906 {
            0b0011
        } else {
            0b0010
        }
    } else if x > -0.8480964004993439 {
        0b0001
    } else {
        0b0000
    }
}

/// Double-quantized absmax values.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuantAbsmax {
    /// One 8-bit code per NF4 block.
    pub quantized: Vec<u8>,
    /// One f32 per `nested_blocksize` NF4 blocks.
    pub nested_absmax: Vec<f32>,
    /// The 256-entry code used (the signed dynamic map).
    pub nested_code: Vec<f32>,
    /// Mean of the original absmax values, subtracted before quantizing.
    pub offset: f32,
    pub nested_blocksize: usize,
}

/// The per-block scales of an NF4 tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    F32(Vec<f32>),
    DoubleQuant(DoubleQuantAbsmax),
}

/// An NF4-quantized tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Logical shape, e.g. `[out_features, in_features]`.
    pub shape: Vec<usize>,
    pub blocksize: usize,
    /// `ceil(numel / 2)` bytes, first element of each pair in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl Nf4Tensor {
    /// Quantizes `data` (row-major, `shape`) like bitsandbytes `quantize_4bit`.
    pub fn quantize(
        data: &[f32],
        shape: &[usize],
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self, QuantError> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(QuantError::ShapeMismatch {
                shape: shape.to_vec(),
                len: data.len(),
            });
        }
        if !NF4_BLOCKSIZES.contains(&blocksize) {
            return Err(QuantError::BadBlocksize(blocksize));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite { index: i });
        }
        let n_blocks = numel.div_ceil(blocksize);
        let mut absmax = vec![0f32; n_blocks];
        let mut packed = vec![0u8; numel.div_ceil(2)];
        for (b, block) in data.chunks(blocksize).enumerate() {
            let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax[b] = m;
            let inv = 1.0 / m;
            // blocksize is even, so a block starts on a byte boundary.
            let out = &mut packed[b * blocksize / 2..];
            for (j, pair) in block.chunks(2).enumerate() {
                let hi = quantize_nf4_value(pair[0] * inv);
                // bitsandbytes pads a partial final block with zeros before
                // quantizing, so an odd tail's low nibble holds the code of 0.0.
                let lo = quantize_nf4_value(pair.get(1).copied().unwrap_or(0.0) * inv);
                out[j] = (hi << 4) | lo;
            }
        }
        let absmax = if double_quant {
            Absmax::DoubleQuant(double_quantize(&absmax))
        } else {
            Absmax::F32(absmax)
        };
        Ok(Self {
            shape: shape.to_vec(),
            blocksize,
            packed,
            absmax,
        })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of quantized storage (codes, absmax, nested statistics).
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::F32(a) => 4 * a.len(),
                Absmax::DoubleQuant(d) => {
                    d.quantized.len() + 4 * d.nested_absmax.len() + 4 * 256 + 4
                }
            }
    }

    /// The f32 absmax of every block (undoing double quantization:
    /// `code[q] * nested_absmax + offset`, as bitsandbytes' `dequantize_4bit` does).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::F32(a) => a.clone(),
            Absmax::DoubleQuant(d) => {
                let mut out = vec![0f32; d.quantized.len()];
                dequantize_blockwise(
                    &d.quantized,
                    &d.nested_absmax,
                    &d.nested_code,
                    d.nested_blocksize,
                    &mut out,
                );
                for v in &mut out {
                    *v += d.offset;
                }
                out
            }
        }
    }

    /// Writes the dequantized values (`NF4_CODE[nibble] * absmax`) into `out`.
    /// This is the readable CPU reference of the CUDA dequantization kernel.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        let numel = self.numel();
        assert_eq!(out.len(), numel, "output length must equal numel");
        let absmax = self.absmax_f32();
        for (b, block) in out.chunks_mut(self.blocksize).enumerate() {
            let m = absmax[b];
            let bytes = &self.packed[b * self.blocksize / 2..];
            for (j, o) in block.iter_mut().enumerate() {
                let byte = bytes[j / 2];
                let nibble = if j % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                *o = NF4_CODE[nibble as usize] * m;
            }
        }
    }

    pub fn dequantize_to_vec(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.numel()];
        self.dequantize_into(&mut v);
        v
    }

    /// Dequantizes straight to bf16 (round to nearest even), the GPU compute dtype.
    pub fn dequantize_bf16_into(&self, out: &mut [half::bf16]) {
        let v = self.dequantize_to_vec();
        for (o, x) in out.iter_mut().zip(v) {
            *o = half::bf16::from_f32(x);
        }
    }
}

/// Mean of the absmax values as torch's `Tensor.mean()` computes it for f32: the
/// sum accumulated in higher precision and divided by the count, rounded to f32.
/// (torch's cascade summation agrees with an f64 sum rounded once except in rare
/// last-ulp cases; the bitsandbytes fixture test checks real data.)
fn mean_f32(v: &[f32]) -> f32 {
    let s: f64 = v.iter().map(|&x| x as f64).sum();
    (s / v.len() as f64) as f32
}

fn double_quantize(absmax: &[f32]) -> DoubleQuantAbsmax {
    let offset = mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let code = signed_dynamic_map();
    let mut quantized = vec![0u8; centered.len()];
    let mut nested_absmax = vec![0f32; centered.len().div_ceil(NESTED_BLOCKSIZE)];
    quantize_blockwise(
        &centered,
        code,
        NESTED_BLOCKSIZE,
        &mut quantized,
        &mut nested_absmax,
    );
    DoubleQuantAbsmax {
        quantized,
        nested_absmax,
        nested_code: code.to_vec(),
        offset,
        nested_blocksize: NESTED_BLOCKSIZE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codebook_is_sorted_symmetric_ends() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]), (-1.0, 0.0, 1.0));
    }

    #[test]
    fn decision_tree_thresholds_are_midpoints() {
        // Each threshold sits between adjacent codes; values just either side of
        // the midpoint go to the neighbouring codes.
        for i in 0..15 {
            let mid = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
            assert_eq!(
                quantize_nf4_value(mid - 1e-4) as usize,
                i,
                "below midpoint {i}"
            );
            assert_eq!(
                quantize_nf4_value(mid + 1e-4) as usize,
                i + 1,
                "above midpoint {i}"
            );
        }
        for (i, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(quantize_nf4_value(c) as usize, i);
        }
        // NaN (all-zero block) falls through every comparison to code 0.
        assert_eq!(quantize_nf4_value(f32::NAN), 0);
    }

    #[test]
    fn packing_order_and_absmax_by_hand() {
        // One block of 4 values would not be a valid blocksize; use 32 with a
        // recognisable head and zero tail.
        let mut x = vec![0f32; 32];
        x[0] = 1.0; // -> code 15 (high nibble of byte 0)
        x[1] = -1.0; // -> code 0 (low nibble of byte 0)
        x[2] = 0.0; // -> code 7
        x[3] = -0.5; // -> nearest -0.525 -> code 2
        x[4] = 0.25; // -> nearest 0.2461 -> code 10
        let q = Nf4Tensor::quantize(&x, &[32], 32, false).unwrap();
        assert_eq!(q.packed[0], 0xF0);
        assert_eq!(q.packed[1], 0x72);
        assert_eq!(q.packed[2] >> 4, 10);
        assert_eq!(q.absmax, Absmax::F32(vec![1.0]));
        let back = q.dequantize_to_vec();
        assert_eq!(&back[..5], &[1.0, -1.0, 0.0, NF4_CODE[2], NF4_CODE[10]]);
    }

    #[test]
    fn odd_tail_pads_low_nibble_with_code_of_zero() {
        let x: Vec<f32> = (0..65).map(|i| (i as f32 - 30.0) / 40.0).collect();
        let q = Nf4Tensor::quantize(&x, &[65], 64, false).unwrap();
        assert_eq!(q.packed.len(), 33);
        assert_eq!(q.packed[32] & 0x0f, 7);
        // The tail block's absmax is its single value.
        let Absmax::F32(a) = &q.absmax else { panic!() };
        assert_eq!(a[1], x[64].abs());
        assert_eq!(q.dequantize_to_vec()[64], x[64]);
    }

    #[test]
    fn double_quant_by_hand() {
        // Four blocks with absmax 1, 2, 3, 4: mean 2.5, centred [-1.5, -0.5, 0.5, 1.5],
        // nested absmax 1.5, normalized [-1, -1/3, 1/3, 1].
        let mut x = vec![0f32; 256];
        for b in 0..4 {
            x[b * 64] = (b + 1) as f32;
        }
        let q = Nf4Tensor::quantize(&x, &[4, 64], 64, true).unwrap();
        let Absmax::DoubleQuant(d) = &q.absmax else {
            panic!()
        };
        assert_eq!(d.offset, 2.5);
        assert_eq!(d.nested_absmax, vec![1.5]);
        let code = signed_dynamic_map();
        assert_eq!(code[d.quantized[0] as usize], -0.992_968_75);
        assert_eq!(code[d.quantized[3] as usize], 1.0);
        let got = q.absmax_f32();
        assert_eq!(got[3], 4.0);
        for (g, w) in got.iter().zip([1.0f32, 2.0, 3.0, 4.0]) {
            assert!((g - w).abs() < 0.02, "{g} vs {w}");
        }
    }

    #[test]
    fn round_trip_error_within_codebook_bound() {
        // Half the widest gap between adjacent codes (between -1 and -0.696).
        let half_gap = NF4_CODE
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0f32, f32::max)
            / 2.0;
        let mut s = 12345u64;
        let x: Vec<f32> = (0..64 * 300)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect();
        for dq in [false, true] {
            let q = Nf4Tensor::quantize(&x, &[300, 64], 64, dq).unwrap();
            let back = q.dequantize_to_vec();
            let absmax = q.absmax_f32();
            for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                // Double quant perturbs the absmax by at most half a dynamic-map gap
                // of the nested scale; allow for it on top of the NF4 bound.
                let m = absmax[i / 64];
                let slack = if dq { 0.01 * m } else { 1e-7 };
                assert!((a - b).abs() <= half_gap * m + slack, "i={i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            Nf4Tensor::quantize(&[0.0; 10], &[3, 4], 64, false),
            Err(QuantError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            Nf4Tensor::quantize(&[0.0; 48], &[48], 48, false),
            Err(QuantError::BadBlocksize(48))
        ));
        assert!(matches!(
            Nf4Tensor::quantize(&[0.0, f32::NAN], &[2], 64, false),
            Err(QuantError::NonFinite { index: 1 })
        ));
    }
}
