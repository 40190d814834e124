//! NF4 quantization on the device against the CPU quantizer, byte for byte, for
//! `qtrain doctor` ([`self_test`]); also times the kernels on Mistral-7B's largest
//! projection.

use super::{kernel_thresholds, quantize_with_grid, Nf4QuantizeError, MAX_GRID};
use crate::selftest::{rng, Check};
use crate::Nf4Device;
use candle_core::{DType, Device, Tensor};
use qtrain_quant::{Absmax, Nf4Tensor, QuantError};
use rand::Rng;

#[derive(Clone, Copy, PartialEq)]
enum Input {
    /// Random rows of very different scales, with some exact zeros.
    Random,
    /// Random, with block 3 and the (partial) last block all zero.
    ZeroBlocks,
    /// +-0.5 everywhere: every absmax equals the offset, so every nested block is
    /// all zero (the NaN path of the 8-bit search).
    Constant,
    /// A view starting 3 elements into its buffer (unaligned: the scalar loads).
    Unaligned,
    /// A transposed (non-contiguous) view.
    Transposed,
    /// Blocks whose absmax is a power of two and whose other values are the NF4
    /// thresholds times it and their f32 neighbours: normalized values land exactly
    /// on the thresholds, where only strict `>` gives the CPU's codes (f32 only).
    Ties,
}

struct Case {
    rows: usize,
    cols: usize,
    dtype: DType,
    blocksize: usize,
    double_quant: bool,
    input: Input,
    max_grid: usize,
}

/// `rows x cols` values, already rounded to `dtype` (so the f32 host copy is exactly
/// what the device holds).
fn make_data(rows: usize, cols: usize, dtype: DType, input: Input, seed: u64) -> Vec<f32> {
    let mut rng = rng(seed);
    // 1e-30 underflows to zero in f16 (all-zero blocks); 1e-39 is subnormal in f32 and
    // bf16, so 1/absmax overflows to inf (denormals must not be flushed).
    let scales = [0.02f32, 1.0, 3e-3, 40.0, 1e-30, 1e-39];
    let mut v: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let r = i / cols;
            if input == Input::Constant {
                if rng.random::<bool>() {
                    0.5
                } else {
                    -0.5
                }
            } else if rng.random_ratio(1, 97) {
                0.0
            } else {
                rng.random_range(-1.0f32..1.0) * scales[r % scales.len()]
            }
        })
        .collect();
    if input == Input::Ties {
        let t = kernel_thresholds();
        for (b, block) in v.chunks_mut(64).enumerate() {
            let scale = [1.0f32, 0.5, 1.0 / 1024.0, 8.0][b % 4];
            for (j, x) in block.iter_mut().enumerate().skip(1) {
                let t = t[(j - 1) / 3 % 15];
                let t = match (j - 1) % 3 {
                    0 => t,
                    1 => f32::from_bits(t.to_bits() + 1),
                    _ => f32::from_bits(t.to_bits() - 1),
                };
                *x = t * scale;
            }
            block[0] = scale;
        }
    }
    if input == Input::ZeroBlocks {
        let bs = 64.min(v.len());
        v[3 * bs..4 * bs].fill(0.0);
        let last = (v.len() - 1) / bs * bs;
        v[last..].fill(0.0);
    }
    round_to(&mut v, dtype);
    v
}

fn round_to(v: &mut [f32], dtype: DType) {
    match dtype {
        DType::BF16 => v
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        DType::F16 => v
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        _ => {}
    }
}

/// The device tensor holding `data` as `dtype`, laid out as `input` asks. The dtype
/// conversion happens on the host (exact: `data` is already rounded to `dtype`), so
/// the device holds exactly the CPU oracle's input.
fn upload(
    data: &[f32],
    rows: usize,
    cols: usize,
    dtype: DType,
    input: Input,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let host = |v: &[f32]| -> candle_core::Result<Tensor> {
        Tensor::from_slice(v, v.len(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    };
    match input {
        Input::Unaligned => {
            let mut padded = vec![0.25f32; 3];
            padded.extend_from_slice(data);
            host(&padded)?
                .narrow(0, 3, data.len())?
                .reshape((rows, cols))
        }
        Input::Transposed => host(data)?.reshape((rows, cols))?.t()?.contiguous()?.t(),
        _ => host(data)?.reshape((rows, cols)),
    }
}

/// The first difference between two byte/bit sequences, if any.
fn first_diff<T: PartialEq + std::fmt::Debug>(what: &str, a: &[T], b: &[T]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!(
            "{what}: {} entries vs {} on the CPU",
            a.len(),
            b.len()
        ));
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .map(|i| format!("{what}[{i}]: gpu {:?} vs cpu {:?}", a[i], b[i]))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Compares the GPU result with the CPU quantizer's, field by field and byte for
/// byte, then the device buffers with those `Nf4Device::from_host` builds, then the
/// GPU dequantization of the result with the CPU's.
fn compare(gpu: &(Nf4Tensor, Nf4Device), cpu: &Nf4Tensor) -> candle_core::Result<Option<String>> {
    let (g, d) = gpu;
    if g.shape != cpu.shape || g.blocksize != cpu.blocksize {
        return Ok(Some(format!(
            "shape/blocksize {:?}/{} vs {:?}/{}",
            g.shape, g.blocksize, cpu.shape, cpu.blocksize
        )));
    }
    if let Some(e) = first_diff("packed", &g.packed, &cpu.packed) {
        return Ok(Some(e));
    }
    let e = match (&g.absmax, &cpu.absmax) {
        (Absmax::F32(a), Absmax::F32(b)) => first_diff("absmax bits", &bits(a), &bits(b)),
        (Absmax::DoubleQuant(a), Absmax::DoubleQuant(b)) => {
            if a.offset.to_bits() != b.offset.to_bits() {
                Some(format!("offset: gpu {:e} vs cpu {:e}", a.offset, b.offset))
            } else if a.nested_blocksize != b.nested_blocksize {
                Some("nested blocksize differs".to_string())
            } else {
                first_diff("quantized absmax", &a.quantized, &b.quantized)
                    .or_else(|| {
                        first_diff(
                            "nested absmax bits",
                            &bits(&a.nested_absmax),
                            &bits(&b.nested_absmax),
                        )
                    })
                    .or_else(|| {
                        first_diff(
                            "nested code bits",
                            &bits(&a.nested_code),
                            &bits(&b.nested_code),
                        )
                    })
            }
        }
        _ => Some("absmax kind differs (double quant vs plain)".to_string()),
    };
    if e.is_some() {
        return Ok(e);
    }
    let want = Nf4Device::from_host(cpu, &Device::Cpu)?;
    if (
        d.shape.as_slice(),
        d.blocksize,
        d.nested_blocksize,
        d.double_quant,
    ) != (
        want.shape.as_slice(),
        want.blocksize,
        want.nested_blocksize,
        want.double_quant,
    ) {
        return Ok(Some(
            "device descriptor differs from from_host's".to_string(),
        ));
    }
    let e = first_diff(
        "device codes",
        &d.codes.to_vec1::<u8>()?,
        &want.codes.to_vec1::<u8>()?,
    )
    .or(first_diff(
        "device stats bits",
        &bits(&d.stats.to_vec1::<f32>()?),
        &bits(&want.stats.to_vec1::<f32>()?),
    ));
    if e.is_some() {
        return Ok(e);
    }
    let back: Vec<f32> = d.dequantize(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(first_diff(
        "gpu dequantized bits",
        &bits(&back),
        &bits(&cpu.dequantize_to_vec()),
    ))
}

fn run_case(device: &Device, c: &Case, seed: u64) -> candle_core::Result<(bool, String)> {
    let data = make_data(c.rows, c.cols, c.dtype, c.input, seed);
    let cpu = Nf4Tensor::quantize(&data, &[c.rows, c.cols], c.blocksize, c.double_quant)
        .map_err(candle_core::Error::wrap)?;
    let x = upload(&data, c.rows, c.cols, c.dtype, c.input, device)?;
    let gpu = quantize_with_grid(&x, c.blocksize, c.double_quant, c.max_grid)
        .map_err(candle_core::Error::wrap)?;
    Ok(match compare(&gpu, &cpu)? {
        None => (
            true,
            format!(
                "identical ({} weights, {} code bytes, {} blocks)",
                data.len(),
                cpu.packed.len(),
                data.len().div_ceil(c.blocksize)
            ),
        ),
        Some(e) => (false, e),
    })
}

/// A NaN/Inf weight must be refused with the CPU's error (the first bad index).
fn run_non_finite(
    device: &Device,
    dtype: DType,
    bad: &[(usize, f32)],
) -> candle_core::Result<(bool, String)> {
    let (rows, cols) = (37, 101);
    let mut data = make_data(rows, cols, dtype, Input::Random, 99);
    for &(i, v) in bad {
        data[i] = v;
    }
    let want = match Nf4Tensor::quantize(&data, &[rows, cols], 64, true) {
        Err(QuantError::NonFinite { index }) => index,
        other => candle_core::bail!("CPU quantizer did not refuse: {:?}", other.map(|_| ())),
    };
    let x = upload(&data, rows, cols, dtype, Input::Random, device)?;
    Ok(match quantize_with_grid(&x, 64, true, MAX_GRID) {
        Err(Nf4QuantizeError::Quant(QuantError::NonFinite { index })) if index == want => (
            true,
            format!("refused, first bad index {index} as on the CPU"),
        ),
        Err(e) => (false, format!("wrong error: {e} (cpu: index {want})")),
        Ok(_) => (
            false,
            format!("accepted a tensor with a non-finite value at {want}"),
        ),
    })
}

/// Quantizes a 4096 x 14336 bf16 matrix (Mistral-7B's largest projection) on the GPU
/// and the CPU, compares, and times the GPU: the per-weight kernel alone (GB/s over
/// the bytes it must move) and the whole `quantize` call with its downloads.
#[cfg(feature = "cuda")]
fn run_large(device: &Device, double_quant: bool) -> candle_core::Result<(bool, String)> {
    let (rows, cols, bs) = (4096usize, 14336usize, 64usize);
    let data = make_data(rows, cols, DType::BF16, Input::Random, 4096);
    let t = std::time::Instant::now();
    let cpu = Nf4Tensor::quantize(&data, &[rows, cols], bs, double_quant)
        .map_err(candle_core::Error::wrap)?;
    let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
    let x = upload(&data, rows, cols, DType::BF16, Input::Random, device)?;
    drop(data);
    let gpu =
        quantize_with_grid(&x, bs, double_quant, MAX_GRID).map_err(candle_core::Error::wrap)?;
    let mismatch = compare(&gpu, &cpu)?;
    drop(gpu);
    let numel = rows * cols;
    let iters = 20;
    let mut outputs = super::cuda::stage1(&x, bs, 0, MAX_GRID)?;
    device.synchronize()?;
    let t = std::time::Instant::now();
    for _ in 0..iters {
        super::cuda::run_stage1(&x, bs, MAX_GRID, &mut outputs)?;
    }
    device.synchronize()?;
    drop(outputs);
    let kernel_s = t.elapsed().as_secs_f64() / iters as f64;
    let moved = (2 * numel + numel.div_ceil(2) + 4 * numel.div_ceil(bs)) as f64;
    let t = std::time::Instant::now();
    for _ in 0..5 {
        drop(quantize_with_grid(&x, bs, double_quant, MAX_GRID).map_err(candle_core::Error::wrap)?);
    }
    device.synchronize()?;
    let full_ms = t.elapsed().as_secs_f64() * 1e3 / 5.0;
    let timing = format!(
        "kernel {:.1} us ({:.0} GB/s), whole quantize with downloads {full_ms:.2} ms, CPU quantizer {cpu_ms:.0} ms",
        kernel_s * 1e6,
        moved / kernel_s / 1e9
    );
    Ok(match mismatch {
        None => (true, format!("identical; {timing}")),
        Some(e) => (false, format!("{e}; {timing}")),
    })
}

/// NF4 quantization on `device` against the CPU quantizer, byte for byte: random
/// matrices of odd and even sizes in bf16, f16 and f32, every blocksize with and
/// without double quantization, zero blocks, constant input, unaligned and
/// transposed views, a grid small enough to make the kernels loop, NaN/Inf refusal,
/// and with `full` on a GPU the timed 4096 x 14336 case. On the CPU both sides are
/// the reference, which is how CI keeps this harness tested.
pub fn self_test(device: &Device, full: bool) -> Vec<Check> {
    use Input::*;
    let case = |rows, cols, dtype, blocksize, double_quant, input| Case {
        rows,
        cols,
        dtype,
        blocksize,
        double_quant,
        input,
        max_grid: MAX_GRID,
    };
    let mut cases = vec![
        case(7, 9, DType::F32, 64, true, Random),
        case(1001, 37, DType::F16, 64, false, Random),
        case(1001, 37, DType::BF16, 64, true, Random),
        case(257, 4096, DType::BF16, 64, true, Random),
        case(1024, 1024, DType::BF16, 64, false, Random),
        case(65, 129, DType::F32, 64, true, ZeroBlocks),
        case(65, 129, DType::BF16, 64, false, ZeroBlocks),
        case(64, 64, DType::BF16, 64, true, Constant),
        case(333, 77, DType::BF16, 64, true, Unaligned),
        case(333, 77, DType::F32, 128, false, Unaligned),
        case(300, 200, DType::F16, 64, true, Transposed),
        case(129, 65, DType::F32, 64, true, Ties),
        case(129, 65, DType::F32, 64, false, Ties),
    ];
    for (k, &bs) in qtrain_quant::NF4_BLOCKSIZES.iter().enumerate() {
        cases.push(case(333, 77, DType::F32, bs, k % 2 == 0, Random));
        cases.push(case(129, 515, DType::BF16, bs, k % 2 == 1, Random));
    }
    cases.push(Case {
        max_grid: 3,
        ..case(1000, 77, DType::F32, 32, true, Random)
    });
    cases.push(Case {
        max_grid: 2,
        ..case(999, 555, DType::BF16, 1024, false, Random)
    });
    let mut out = Vec::new();
    let report = |out: &mut Vec<Check>, name: String, r: candle_core::Result<(bool, String)>| {
        let (ok, detail) = r.unwrap_or_else(|e| (false, format!("error: {e}")));
        out.push(Check {
            name: format!("nf4 quantize {name}"),
            ok,
            detail,
        });
    };
    for (i, c) in cases.iter().enumerate() {
        let name = format!(
            "{}x{} {:?} blocksize {} {}{}{}",
            c.rows,
            c.cols,
            c.dtype,
            c.blocksize,
            if c.double_quant {
                "double-quant"
            } else {
                "plain"
            },
            match c.input {
                Random => "",
                ZeroBlocks => ", zero blocks",
                Constant => ", constant",
                Unaligned => ", unaligned view",
                Transposed => ", transposed view",
                Ties => ", values on the thresholds",
            },
            if c.max_grid < MAX_GRID {
                format!(", grid capped at {}", c.max_grid)
            } else {
                String::new()
            }
        );
        report(&mut out, name, run_case(device, c, i as u64 + 1));
    }
    report(
        &mut out,
        "NaN/Inf refused (bf16)".into(),
        run_non_finite(
            device,
            DType::BF16,
            &[(2000, f32::INFINITY), (1234, f32::NAN)],
        ),
    );
    report(
        &mut out,
        "Inf in the last element refused (f32)".into(),
        run_non_finite(device, DType::F32, &[(37 * 101 - 1, f32::NEG_INFINITY)]),
    );
    #[cfg(feature = "cuda")]
    for dq in [true, false]
        .into_iter()
        .filter(|_| full && device.is_cuda())
    {
        report(
            &mut out,
            format!(
                "4096x14336 BF16 blocksize 64 {}",
                if dq { "double-quant" } else { "plain" }
            ),
            run_large(device, dq),
        );
    }
    let _ = full;
    out
}
