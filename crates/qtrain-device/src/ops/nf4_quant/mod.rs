//! NF4 quantization (with optional double quantization) of a weight already on the
//! compute device, bit-exact with `qtrain_quant::Nf4Tensor::quantize`: the kernels
//! (`nf4_quant.cu`), their launches (`cuda.rs`), the CPU path (qtrain-quant's
//! quantizer, the reference) and the self-test (`selftest.rs`).
//!
//! [`quantize`] takes a bf16, f16 or f32 tensor and returns both forms the loader keeps:
//! the host [`Nf4Tensor`] (for the bitsandbytes cache) and the [`Nf4Device`] the training
//! step dequantizes from. On the CPU it *is* the reference: it calls qtrain-quant. On CUDA
//! the kernels of `nf4_quant.cu` do all the per-weight work (absmax of every block,
//! the 4-bit codes, the packing) and the nested 8-bit quantization of the absmax values;
//! the host computes one number, the double-quantization offset, because its torch-exact
//! value is a compensated f64 sum ([`qtrain_quant::torch_cuda_mean_f32`]) over one f32
//! per 64 weights, and downloads the quantized result once for the host copy.
//!
//! [`self_test`] (run by `qtrain doctor`) checks the device path byte for byte against
//! the CPU quantizer on random matrices and times it.

use crate::Nf4Device;
use candle_core::{DType, Tensor};
use qtrain_quant::{Nf4Tensor, QuantError, NF4_BLOCKSIZES};

#[cfg(feature = "cuda")]
mod cuda;
mod selftest;

pub use selftest::self_test;

/// Grid cap of the kernels; they loop over the remaining blocks (a 4096 x 14336
/// matrix at blocksize 64 needs 28,672 CTAs, far below it). The self-test lowers it
/// to make the loops run.
const MAX_GRID: usize = 1 << 20;

/// Why a tensor could not be quantized.
#[derive(Debug, thiserror::Error)]
pub enum Nf4QuantizeError {
    /// Bad blocksize or a NaN/Inf weight (with its index), as the CPU quantizer reports.
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("nf4 quantize: dtype {0:?} is not a float type the quantizer reads (bf16, f16, f32)")]
    Dtype(DType),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Quantizes `x` (any shape, row-major order) like bitsandbytes' `quantize_4bit`, on the
/// device `x` lives on. The result's shape is `x`'s.
pub fn quantize(
    x: &Tensor,
    blocksize: usize,
    double_quant: bool,
) -> Result<(Nf4Tensor, Nf4Device), Nf4QuantizeError> {
    quantize_with_grid(x, blocksize, double_quant, MAX_GRID)
}

/// [`quantize`] with the kernels' grid capped at `max_grid` CTAs (ignored on the CPU).
fn quantize_with_grid(
    x: &Tensor,
    blocksize: usize,
    double_quant: bool,
    max_grid: usize,
) -> Result<(Nf4Tensor, Nf4Device), Nf4QuantizeError> {
    if !matches!(x.dtype(), DType::BF16 | DType::F16 | DType::F32) {
        return Err(Nf4QuantizeError::Dtype(x.dtype()));
    }
    if !NF4_BLOCKSIZES.contains(&blocksize) {
        return Err(QuantError::BadBlocksize(blocksize).into());
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.elem_count() > 0 {
        return cuda::quantize(x, blocksize, double_quant, max_grid);
    }
    let _ = max_grid;
    quantize_reference(x, blocksize, double_quant)
}

/// The CPU path and the oracle of the kernels: widen to f32 on the host (exact for bf16
/// and f16) and run qtrain-quant's quantizer.
fn quantize_reference(
    x: &Tensor,
    blocksize: usize,
    double_quant: bool,
) -> Result<(Nf4Tensor, Nf4Device), Nf4QuantizeError> {
    let data: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let q = Nf4Tensor::quantize(&data, x.dims(), blocksize, double_quant)?;
    drop(data);
    let d = Nf4Device::from_host(&q, x.device())?;
    Ok((q, d))
}

/// The 15 NF4 thresholds as written in nf4_quant.cu (parsed like Rust parses
/// f32 literals); tests check them against the CPU decision tree.
fn kernel_thresholds() -> Vec<f32> {
    let src = include_str!("nf4_quant.cu");
    let key = "NF4_THRESHOLDS[15] = {";
    let start = src.find(key).expect("thresholds in nf4_quant.cu") + key.len();
    let end = start + src[start..].find("};").expect("end of the thresholds");
    src[start..end]
        .split(',')
        .map(|s| {
            s.trim()
                .trim_end_matches('f')
                .parse::<f32>()
                .expect("a float literal")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use qtrain_quant::quantize_nf4_value;
    use rand::{Rng, SeedableRng};

    /// Random values of mixed scales, rounded to `dtype` so the f32 copy is exact.
    fn data(n: usize, dtype: DType, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let v = rng.random_range(-1.0f32..1.0) * [0.05f32, 2.0, 1e-3][i % 3];
                match dtype {
                    DType::BF16 => half::bf16::from_f32(v).to_f32(),
                    DType::F16 => half::f16::from_f32(v).to_f32(),
                    _ => v,
                }
            })
            .collect()
    }

    fn buffers(d: &Nf4Device) -> (Vec<u8>, Vec<u32>) {
        let stats: Vec<f32> = d.stats.to_vec1().unwrap();
        (
            d.codes.to_vec1().unwrap(),
            stats.iter().map(|x| x.to_bits()).collect(),
        )
    }

    #[test]
    fn cpu_path_equals_quantizer_for_every_dtype() {
        let shapes: [&[usize]; 4] = [&[7, 9], &[33, 64], &[1001, 37], &[3, 5, 64]];
        for (k, dtype) in [DType::F32, DType::BF16, DType::F16]
            .into_iter()
            .enumerate()
        {
            for (s, shape) in shapes.iter().enumerate() {
                let n: usize = shape.iter().product();
                let v = data(n, dtype, (k * 10 + s) as u64);
                let x = Tensor::from_slice(&v, *shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                for (bs, dq) in [(64, true), (64, false), (32, true), (256, false)] {
                    let (q, d) = quantize(&x, bs, dq).unwrap();
                    let want = Nf4Tensor::quantize(&v, shape, bs, dq).unwrap();
                    assert_eq!(q, want, "{dtype:?} {shape:?} bs {bs} dq {dq}");
                    let want_d = Nf4Device::from_host(&want, &Device::Cpu).unwrap();
                    assert_eq!(buffers(&d), buffers(&want_d));
                    assert_eq!(
                        (&d.shape, d.blocksize, d.nested_blocksize, d.double_quant),
                        (
                            &want_d.shape,
                            want_d.blocksize,
                            want_d.nested_blocksize,
                            want_d.double_quant
                        )
                    );
                }
            }
        }
    }

    #[test]
    fn non_contiguous_input_is_quantized_in_logical_order() {
        let v = data(48 * 80, DType::F32, 5);
        let x = Tensor::from_slice(&v, (48, 80), &Device::Cpu).unwrap();
        let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!xt.is_contiguous());
        let (q, _) = quantize(&xt, 64, true).unwrap();
        assert_eq!(q, Nf4Tensor::quantize(&v, &[48, 80], 64, true).unwrap());
    }

    #[test]
    fn bad_inputs_get_clear_errors() {
        let x = Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap();
        let Err(e) = quantize(&x, 48, true) else {
            panic!("accepted a bad input")
        };
        assert!(
            matches!(e, Nf4QuantizeError::Quant(QuantError::BadBlocksize(48))),
            "{e}"
        );
        assert!(e.to_string().contains("blocksize 48"), "{e}");
        let Err(e) = quantize(&x.to_dtype(DType::U8).unwrap(), 64, true) else {
            panic!("accepted a bad input")
        };
        assert!(matches!(e, Nf4QuantizeError::Dtype(DType::U8)), "{e}");
        assert!(
            e.to_string().contains("U8") && e.to_string().contains("bf16"),
            "{e}"
        );
        let mut v = data(256, DType::BF16, 1);
        v[77] = f32::NAN;
        v[200] = f32::INFINITY;
        let x = Tensor::from_slice(&v, (4, 64), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let Err(e) = quantize(&x, 64, false) else {
            panic!("accepted a bad input")
        };
        assert!(
            matches!(
                e,
                Nf4QuantizeError::Quant(QuantError::NonFinite { index: 77 })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("index 77"), "{e}");
    }

    /// The kernel counts the thresholds below x; they must be exactly the decision
    /// tree's constants: each one goes to the lower code, the next f32 up to the higher.
    #[test]
    fn kernel_thresholds_equal_the_decision_tree() {
        let t = kernel_thresholds();
        assert_eq!(t.len(), 15);
        for (k, &t) in t.iter().enumerate() {
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

    /// nvcc must have rounded the decimals to the same f32 values (the PTX stores the
    /// constant table as bytes). Needs only the PTX, not a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn ptx_thresholds_are_the_same_f32_bits() {
        let ptx = cuda::PTX;
        let start = ptx.find("NF4_THRESHOLDS[60] = {").expect("table in PTX") + 22;
        let end = start + ptx[start..].find('}').unwrap();
        let bytes: Vec<u8> = ptx[start..end]
            .split(',')
            .map(|s| s.trim().parse().unwrap())
            .collect();
        let got: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let want: Vec<u32> = kernel_thresholds().iter().map(|t| t.to_bits()).collect();
        assert_eq!(got, want);
    }
}
