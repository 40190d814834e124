//! The self-test harness: what every op's self-test (beside the op, in
//! `crate::ops`, `crate::gemm`) is built from, and [`run_basic`], which runs them.
//! Each check runs the op on the given device and on the CPU over the same random
//! inputs (outputs poisoned with NaN first, so an element the kernel never writes
//! fails), and reports the relative error `max |gpu − cpu| / max |cpu|` and, where
//! it means something, a speed; `qtrain doctor` prints the [`Check`]s.
//!
//! The functions take any [`Dev`]: on the CPU both sides are the reference, which
//! is how CI keeps this code itself tested.

use crate::device::{DBuf, Dev, Float};
use crate::error::Result;
use rand::{Rng, SeedableRng};

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The self-tests' random generator, seeded.
pub fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

/// Random values in `[-scale, scale)`, seeded.
pub fn random(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = rng(seed);
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
        crate::ops::rmsnorm::self_test::<half::bf16>(dev, rows, h, 1e-2),
    );
    add(
        "rmsnorm f32",
        crate::ops::rmsnorm::self_test::<f32>(dev, 257, 300, 1e-5),
    );
    // The vectorized kernel (head_dim/2 and ld divisible by 4) and the scalar one.
    add(
        "rope",
        crate::ops::rope::self_test::<half::bf16>(dev, (300, 6, 128, 6 * 128 + 256), 1e-2)
            .map(|c| vec![c]),
    );
    add(
        "rope",
        crate::ops::rope::self_test::<half::bf16>(dev, (37, 5, 12, 5 * 12 + 3), 1e-2)
            .map(|c| vec![c]),
    );
    add(
        "rope",
        crate::ops::rope::self_test::<f32>(dev, (64, 4, 16, 4 * 16 + 2), 1e-6).map(|c| vec![c]),
    );
    add(
        "swiglu",
        crate::ops::swiglu::self_test::<half::bf16>(dev, rows, inter, 1e-2).map(|c| vec![c]),
    );
    // Heads of 128 at a 16-byte-aligned offset (the vector path), and of 12 at an
    // odd one (the scalar path).
    add(
        "head rmsnorm",
        crate::ops::head_norm::self_test::<half::bf16>(dev, (300, 6, 128, 8 * 128), 1e-2)
            .map(|c| vec![c]),
    );
    add(
        "head rmsnorm",
        crate::ops::head_norm::self_test::<half::bf16>(dev, (37, 5, 12, 5 * 12 + 3), 1e-2)
            .map(|c| vec![c]),
    );
    add(
        "head rmsnorm",
        crate::ops::head_norm::self_test::<f32>(dev, (64, 4, 16, 4 * 16 + 8), 1e-5)
            .map(|c| vec![c]),
    );
    add(
        "bias add",
        crate::ops::bias::self_test::<half::bf16>(dev, rows, h, 1e-2).map(|c| vec![c]),
    );
    add(
        "bias add",
        crate::ops::bias::self_test::<f32>(dev, 37, 72, 1e-6).map(|c| vec![c]),
    );
    add(
        "cross-entropy",
        crate::ops::xent::self_test::<half::bf16>(dev, 1e-2).map(|c| vec![c]),
    );
    add(
        "row kernels",
        crate::ops::rows::self_test::<half::bf16>(dev).map(|c| vec![c]),
    );
    // The fused LoRA dropout products: dense and aligned (the vector loads; 7B rows
    // with `full`), and odd sizes in strided, unaligned blocks; bf16 and fp16 (the
    // tensor-core path on 8.0+), f32 (the FMA path every type takes below 8.0); and
    // the mask itself, bit for bit.
    use crate::ops::lora_dropout::{mask_test, self_test as lora_dropout_test, Case};
    add(
        "lora dropout bf16",
        lora_dropout_test::<half::bf16>(dev, Case::dense(rows, h, 16), 1e-2),
    );
    add(
        "lora dropout bf16",
        lora_dropout_test::<half::bf16>(dev, Case::odd(), 1e-2),
    );
    add(
        "lora dropout f16",
        lora_dropout_test::<half::f16>(dev, Case::dense(100, 136, 40), 5e-3),
    );
    add(
        "lora dropout f32",
        lora_dropout_test::<f32>(dev, Case::dense(100, 136, 64), 1e-5),
    );
    add(
        "lora dropout f32",
        lora_dropout_test::<f32>(dev, Case::odd(), 1e-5),
    );
    add(
        "lora dropout mask",
        mask_test::<half::bf16>(dev, 300, 264).map(|c| vec![c]),
    );
    add(
        "lora dropout mask",
        mask_test::<f32>(dev, 37, 75).map(|c| vec![c]),
    );
    add(
        "gemm bf16",
        crate::gemm::self_test::<half::bf16>(dev, 1e-2).map(|c| vec![c]),
    );
    add(
        "gemm f32",
        crate::gemm::self_test::<f32>(dev, 2e-3).map(|c| vec![c]),
    );
    add("attention", crate::ops::attention::self_test(dev, full));
    add(
        "fp8 quantize",
        crate::ops::fp8::self_test_quant::<half::bf16>(dev, rows, h).map(|c| vec![c]),
    );
    add(
        "fp8 quantize",
        crate::ops::fp8::self_test_quant::<f32>(dev, 37, 72).map(|c| vec![c]),
    );
    // The FP8 GEMM only where the tensor cores have FP8 (the CPU runs the reference).
    let fp8 = crate::ops::fp8::support(dev).is_ok();
    if fp8 {
        add(
            "gemm fp8",
            crate::ops::fp8::self_test_gemm::<half::bf16>(dev, 1e-2).map(|c| vec![c]),
        );
    }
    if full {
        add("gemm speed", crate::gemm::speed(dev));
        if fp8 {
            add("gemm fp8 speed", crate::ops::fp8::speed(dev));
        }
    }
    Ok(out)
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

    #[test]
    fn nf4_checks_pass_on_the_cpu_against_themselves() {
        let cpu = candle_core::Device::Cpu;
        let dequant = crate::ops::nf4::self_test(&cpu, false).unwrap();
        // Copy bandwidth, six dtype x kernel cases, the fastest kernel.
        assert_eq!(dequant.len(), 8, "{dequant:?}");
        let quant = crate::ops::nf4_quant::self_test(&cpu, false);
        assert!(quant.len() >= 20, "{quant:?}");
        for c in dequant.iter().chain(&quant) {
            assert!(c.ok, "{}: {}", c.name, c.detail);
        }
    }
}
