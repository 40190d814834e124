//! NF4 dequantization on the device against the CPU reference, bit for bit, and its
//! bandwidth against a plain device copy's, for `qtrain doctor` ([`self_test`]).

use super::{dequant_kernel, set_dequant_kernel, DequantKernel, Nf4Device};
use crate::selftest::{random, time_it, Check};
use crate::Dev;
use candle_core::{DType, Device, Tensor};
use qtrain_quant::Nf4Tensor;

/// `v` rounded to `dtype` and back: what a kernel writing `dtype` must produce from
/// the CPU reference's f32 values (the same f32 multiply, then round-to-nearest-even).
fn rounded(v: &[f32], dtype: DType) -> candle_core::Result<Vec<f32>> {
    Tensor::from_slice(v, v.len(), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?
        .to_vec1()
}

/// Dequantizes `q` on `device` into `dtype` and compares with the CPU reference.
fn exact(q: &Nf4Device, want: &[f32], dtype: DType, device: &Device) -> crate::Result<bool> {
    let out = Tensor::zeros(q.shape.as_slice(), dtype, device)?;
    q.dequantize_into(&out)?;
    let got: Vec<f32> = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(got == rounded(want, dtype)?)
}

/// Every dequantization kernel ([`DequantKernel::ALL`]) into f32, bf16 and f16 on
/// `device` against the CPU reference, bit for bit: odd shapes first (a partial last
/// tile, the smallest and a large blocksize, no double quantization), then a
/// weight of Mistral-7B's largest projection (4096 x 14336; a small one unless
/// `full`), timed, with its bandwidth as a share of a plain device copy's. Ends
/// with which kernel is fastest in bf16 here. The kernel in use is restored.
pub fn self_test(device: &Device, full: bool) -> crate::Result<Vec<Check>> {
    let dev = Dev::from_candle(device)?;
    let (rows, cols) = if full { (4096, 14336) } else { (64, 1024) };
    let w = random(rows * cols, 0.05, 7);
    let q = Nf4Tensor::quantize(&w, &[rows, cols], 64, true).map_err(candle_core::Error::wrap)?;
    let want = q.dequantize_to_vec();
    let dq = Nf4Device::from_host(&q, device)?;
    let mut out = Vec::new();
    // The ceiling a memory-bound kernel works against: a device-to-device copy of
    // 1 GiB (a small one unless `full`), counting the bytes read plus the bytes written.
    let n = if full { 1 << 28 } else { 1 << 16 };
    let (a, b) = (
        dev.zeros::<f32>(n, "copy src")?,
        dev.zeros::<f32>(n, "copy dst")?,
    );
    let secs = time_it(&dev, 10, || dev.copy(a.all(), b.all()))?;
    let copy_gbs = 2.0 * (n * 4) as f64 / secs / 1e9;
    out.push(Check {
        name: format!(
            "device copy bandwidth (read + write, {} MiB)",
            (n * 4) >> 20
        ),
        ok: true,
        detail: format!("{copy_gbs:.0} GB/s"),
    });
    drop((a, b));
    let odd: [(usize, usize, usize, bool); 4] = [
        (3, 4160, 64, true),
        (7, 1168, 32, true),
        (9, 1024, 128, false),
        (33, 256, 1024, true),
    ];
    let mut odd_cases = Vec::new();
    for (i, &(r, c, bs, dq)) in odd.iter().enumerate() {
        let w = random(r * c, 0.05, 8 + i as u64);
        let q = Nf4Tensor::quantize(&w, &[r, c], bs, dq).map_err(candle_core::Error::wrap)?;
        let want = q.dequantize_to_vec();
        odd_cases.push((r, c, bs, dq, Nf4Device::from_host(&q, device)?, want));
    }
    let chosen = dequant_kernel();
    let mut best_bf16: Option<(f64, DequantKernel)> = None;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for kernel in DequantKernel::ALL {
            set_dequant_kernel(kernel);
            for (r, c, bs, dq, dev_q, want) in &odd_cases {
                if !exact(dev_q, want, dtype, device)? {
                    out.push(Check {
                        name: format!(
                            "nf4 dequantize {r}x{c} blocksize {bs} double quant {dq} -> {dtype:?} ({kernel:?})"
                        ),
                        ok: false,
                        detail: "differs from the CPU reference".into(),
                    });
                }
            }
            let ok = exact(&dq, &want, dtype, device)?;
            let target = Tensor::zeros((rows, cols), dtype, device)?;
            let secs = time_it(&dev, 50, || Ok(dq.dequantize_into(&target)?))?;
            let bytes = dq.storage_bytes() as f64 + (rows * cols * dtype.size_in_bytes()) as f64;
            out.push(Check {
                name: format!("nf4 dequantize {rows}x{cols} -> {dtype:?} ({kernel:?})"),
                ok,
                detail: format!(
                    "{} against the CPU reference (and {} odd shapes), {:.1} us, {:.0} GB/s ({:.0}% of the copy bandwidth)",
                    if ok { "bit-exact" } else { "DIFFERS" },
                    odd_cases.len(),
                    secs * 1e6,
                    bytes / secs / 1e9,
                    100.0 * bytes / secs / 1e9 / copy_gbs
                ),
            });
            if dtype == DType::BF16 && best_bf16.is_none_or(|(s, _)| secs < s) {
                best_bf16 = Some((secs, kernel));
            }
        }
    }
    set_dequant_kernel(chosen);
    if let Some((_, k)) = best_bf16 {
        out.push(Check {
            name: "fastest bf16 dequantization here".into(),
            ok: true,
            detail: format!(
                "{k:?}; training uses {chosen:?} (QTRAIN_NF4_KERNEL=tile|chunk8 chooses)"
            ),
        });
    }
    Ok(out)
}
