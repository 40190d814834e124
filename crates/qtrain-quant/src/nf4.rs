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

/// The 15 thresholds of [`quantize_nf4_value`]'s tree, ascending.
#[allow(clippy::excessive_precision)]
const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// The same code as [`quantize_nf4_value`], computed without branches: the tree is
/// a binary search over the ascending thresholds with `x > t` going right, so its
/// leaf is the number of thresholds below `x` (NaN is above none: code 0, as in the
/// tree). Branch-free, it vectorizes, which makes quantization several times faster
/// on random weights, where the tree's branches are unpredictable.
#[inline]
fn nf4_code_by_count(x: f32) -> u8 {
    NF4_THRESHOLDS.iter().map(|&t| (x > t) as u8).sum()
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
        let mut codes = vec![0u8; blocksize];
        for ((block, out), a) in data
            .chunks(blocksize)
            // blocksize is even, so every block starts on a byte boundary.
            .zip(packed.chunks_mut(blocksize / 2))
            .zip(absmax.iter_mut())
        {
            let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            *a = m;
            // The kernel multiplies by the f32 reciprocal; x / m would round
            // differently for some values. An all-zero block gives 0 * inf = NaN,
            // which every `>` rejects: code 0 (-1.0), dequantized as -1.0 * 0.
            let inv = 1.0 / m;
            let codes = &mut codes[..block.len()];
            for (c, &x) in codes.iter_mut().zip(block) {
                *c = nf4_code_by_count(x * inv);
            }
            let mut pairs = codes.chunks_exact(2);
            for (pair, o) in (&mut pairs).zip(out.iter_mut()) {
                *o = (pair[0] << 4) | pair[1];
            }
            // bitsandbytes pads a partial final block with zeros before quantizing,
            // so an odd tail's low nibble holds the code of 0.0 (7).
            if let [last] = pairs.remainder() {
                out[out.len() - 1] = (last << 4) | nf4_code_by_count(0.0 * inv);
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

    /// Writes the dequantized values (`NF4_CODE[nibble] * absmax`) into `out`,
    /// one element at a time. This is the readable CPU oracle of the CUDA
    /// dequantization kernel; [`Self::dequantize_into`] computes the same bits faster.
    pub fn dequantize_reference_into(&self, out: &mut [f32]) {
        let numel = self.numel();
        assert_eq!(out.len(), numel, "output length must equal numel");
        let absmax = self.absmax_f32();
        for (i, o) in out.iter_mut().enumerate() {
            let byte = self.packed[i / 2];
            // First element of a pair in the high nibble.
            let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            *o = NF4_CODE[nibble as usize] * absmax[i / self.blocksize];
        }
    }

    /// Writes the dequantized values (`NF4_CODE[nibble] * absmax`) into `out`.
    ///
    /// Bit-identical to [`Self::dequantize_reference_into`]: per block the 16
    /// products `NF4_CODE[k] * absmax` are computed once (the very multiplications
    /// the reference does), then every byte expands to two table entries.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.numel(), "output length must equal numel");
        self.dequantize_with(out, |v| v);
    }

    pub fn dequantize_to_vec(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.numel()];
        self.dequantize_into(&mut v);
        v
    }

    /// Dequantizes straight to bf16: the f32 product rounded to nearest even, as
    /// bitsandbytes' kernel stores `code * absmax` into a bf16 output.
    pub fn dequantize_bf16_into(&self, out: &mut [half::bf16]) {
        assert_eq!(out.len(), self.numel(), "output length must equal numel");
        self.dequantize_with(out, half::bf16::from_f32);
    }

    /// The block loop shared by the f32 and bf16 outputs: `convert` maps each of a
    /// block's 16 products to the output type once, so the inner loop is a table
    /// lookup per element.
    fn dequantize_with<T: Copy + Default>(&self, out: &mut [T], convert: impl Fn(f32) -> T) {
        let absmax = self.absmax_f32();
        // blocksize is even, so every block starts on a byte boundary.
        let half_block = self.blocksize / 2;
        for ((block, bytes), &m) in out
            .chunks_mut(self.blocksize)
            .zip(self.packed.chunks(half_block))
            .zip(&absmax)
        {
            let mut table = [T::default(); 16];
            for (t, &c) in table.iter_mut().zip(&NF4_CODE) {
                *t = convert(c * m);
            }
            let mut pairs = block.chunks_exact_mut(2);
            for (pair, &byte) in (&mut pairs).zip(bytes) {
                pair[0] = table[(byte >> 4) as usize];
                pair[1] = table[(byte & 0x0f) as usize];
            }
            // An odd-length tensor ends with a lone high nibble.
            if let [last] = pairs.into_remainder() {
                *last = table[(bytes[bytes.len() - 1] >> 4) as usize];
            }
        }
    }
}

/// `absmax.mean()` as torch computes it for an f32 CUDA tensor, the way
/// bitsandbytes gets the double-quantization offset.
///
/// torch's CUDA mean (`MeanOps`) is `f32 sum * factor` with `factor = 1.0f / n`
/// computed in f32, the sum accumulated in f32 along the reduction kernel's tree.
/// We take the multiplication by the f32 reciprocal as is (dividing instead differs
/// in the last bit for about 40% of small tensors) and replace the tree sum by the
/// correctly rounded sum (an f64 sum with Neumaier compensation, rounded once).
/// Measured against torch 2.11 on an H100 (50 random tensors each): identical for
/// every tensor of up to 65,536 blocks (4M weights at blocksize 64); from 262,144
/// blocks on, the f32 tree sum itself rounds differently for roughly a quarter of
/// the tensors and the offset differs by 1-2 ulp. Reproducing that exactly would
/// mean modelling torch's launch configuration (which depends on the GPU).
pub fn torch_cuda_mean_f32(v: &[f32]) -> f32 {
    let (mut sum, mut comp) = (0f64, 0f64);
    for &x in v {
        let x = x as f64;
        let t = sum + x;
        comp += if sum.abs() >= x.abs() {
            (sum - t) + x
        } else {
            (x - t) + sum
        };
        sum = t;
    }
    let factor = 1.0f32 / v.len() as f32;
    ((sum + comp) as f32) * factor
}

/// bitsandbytes' double quantization of the per-block absmax values
/// (`quantize_4bit(compress_statistics=True)`): `offset = absmax.mean()`, then
/// `quantize_blockwise(absmax - offset, code=signed dynamic map, blocksize=256)`.
pub fn double_quantize(absmax: &[f32]) -> DoubleQuantAbsmax {
    let offset = torch_cuda_mean_f32(absmax);
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
    fn counting_equals_decision_tree() {
        let mut xs = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0];
        for &t in &NF4_THRESHOLDS {
            // Each threshold and its two f32 neighbours.
            xs.extend([
                t,
                f32::from_bits(t.to_bits() - 1),
                f32::from_bits(t.to_bits() + 1),
            ]);
        }
        xs.extend((0..=20_000).map(|i| -1.0 + i as f32 * 1e-4));
        for x in xs {
            assert_eq!(nf4_code_by_count(x), quantize_nf4_value(x), "x = {x}");
        }
    }

    #[test]
    fn exact_threshold_goes_to_lower_code() {
        // bitsandbytes compares with `>`: a value equal to a threshold (as f32)
        // takes the lower code, the next f32 up the higher one.
        for (k, &t) in NF4_THRESHOLDS.iter().enumerate() {
            assert_eq!(quantize_nf4_value(t) as usize, k, "threshold {k}");
            let up = if t > 0.0 {
                f32::from_bits(t.to_bits() + 1)
            } else {
                f32::from_bits(t.to_bits() - 1)
            };
            assert_eq!(
                quantize_nf4_value(up) as usize,
                k + 1,
                "above threshold {k}"
            );
        }
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
    fn fast_dequantization_equals_reference() {
        // Odd length with a partial last block, several blocksizes, both absmax kinds.
        let x: Vec<f32> = (0..1001)
            .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) * 1e-4)
            .collect();
        for (bs, dq) in [(32, false), (64, true), (128, false), (256, true)] {
            let q = Nf4Tensor::quantize(&x, &[1001], bs, dq).unwrap();
            let mut reference = vec![0f32; 1001];
            q.dequantize_reference_into(&mut reference);
            let fast = q.dequantize_to_vec();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&reference), "blocksize {bs}");
            let mut bf = vec![half::bf16::ZERO; 1001];
            q.dequantize_bf16_into(&mut bf);
            for (b, r) in bf.iter().zip(&reference) {
                assert_eq!(b.to_bits(), half::bf16::from_f32(*r).to_bits());
            }
        }
    }

    #[test]
    fn mean_matches_torch_cuda_on_a_measured_case() {
        // 37 block absmax values (bf16 weights) and the mean torch 2.11 computed for
        // them on an H100: `sum * (1.0f / 37)`, one ulp above the correctly rounded
        // `sum / 37` that an f64 mean would give.
        let bits: [u32; 37] = [
            0x3d590000, 0x3d800000, 0x3d390000, 0x3d880000, 0x3d290000, 0x3d2c0000, 0x3d400000,
            0x3d150000, 0x3d6a0000, 0x3d230000, 0x3d2d0000, 0x3d5e0000, 0x3d590000, 0x3d4f0000,
            0x3d790000, 0x3d540000, 0x3d540000, 0x3d520000, 0x3d420000, 0x3d610000, 0x3d4f0000,
            0x3d370000, 0x3d3b0000, 0x3d420000, 0x3d7e0000, 0x3d710000, 0x3d5f0000, 0x3d510000,
            0x3d610000, 0x3d7b0000, 0x3d650000, 0x3d3d0000, 0x3d310000, 0x3d490000, 0x3d3a0000,
            0x3d300000, 0x3d3a0000,
        ];
        let v: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let torch_cuda = f32::from_bits(0x3d4eb3e5);
        assert_eq!(torch_cuda_mean_f32(&v), torch_cuda);
        let f64_mean = (v.iter().map(|&x| x as f64).sum::<f64>() / 37.0) as f32;
        assert_eq!(f64_mean.to_bits() + 1, torch_cuda.to_bits());
        assert_eq!(torch_cuda_mean_f32(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        // The compensated sum keeps what a plain running f64 sum would drop.
        assert_eq!(
            torch_cuda_mean_f32(&[1e30, 1.0, -1e30]),
            1.0f32 * (1.0 / 3.0)
        );
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
