//! `qtrain doctor`: checks an install on a GPU machine. Reports the device, runs
//! each CUDA kernel against its CPU reference on random data (max error and
//! achieved bandwidth), and runs one training step of a tiny model on the GPU and
//! on the CPU, comparing the loss and every LoRA gradient. Exits non-zero on any
//! mismatch. This is also how qtrain is tested on GPU machines without a Rust
//! toolchain: build elsewhere, copy the binary, run `qtrain doctor`.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use qtrain_model::{LoadOptions, Quantization};
use qtrain_quant::Nf4Tensor;
use qtrain_reference::forward_backward;
use qtrain_step::{LoraConfig, LoraGrads, LoraWeights, StepOptions, TokenBatch};
use rand::{Rng, SeedableRng};

#[derive(clap::Args)]
pub struct Args {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
}

/// One fused-engine training pass in compute type `T` over `batch` with `opts`: the
/// summed loss and the LoRA gradients.
fn engine_step<T: qtrain_device::Float + candle_core::WithDType>(
    base: &qtrain_model::BaseModel,
    lora: &LoraWeights,
    batch: &qtrain_step::TokenBatch,
    so: &StepOptions,
    denominator: f64,
    opts: qtrain_engine::EngineOptions,
) -> Result<(f64, Vec<qtrain_step::HostTensor>)> {
    let mut engine = qtrain_engine::Engine::<T>::new(base, lora, opts)?;
    let loss = engine.forward_backward(batch, so, denominator)?.loss_sum;
    Ok((loss, engine.lora().grads_to_host(engine.device())?))
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f64 {
    let scale = a
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()))
        / scale
}

pub fn run(a: Args) -> Result<()> {
    if !candle_core::utils::cuda_is_available() {
        bail!("this qtrain was built without CUDA: rebuild with `cargo build --release --features cuda`");
    }
    let gpu = Device::new_cuda(a.gpu)?;
    let mut failures = Vec::new();
    // ---- What this GPU is, and how qtrain will train on it.
    let kdev = qtrain_device::Dev::from_candle(&gpu)?;
    #[cfg(feature = "cuda")]
    if let Some(c) = kdev.cuda() {
        let (maj, min) = c.compute_capability()?;
        let (free, total) = kdev.mem_info()?.unwrap_or((0, 0));
        let (dmaj, dmin) = c.driver_version()?;
        println!(
            "GPU: {} (compute capability {maj}.{min}, {} multiprocessors), driver for CUDA {dmaj}.{dmin}, {:.1} GiB, {:.1} GiB free",
            c.name()?,
            c.sm_count()?,
            total as f64 / 1073741824.0,
            free as f64 / 1073741824.0
        );
    }
    match qtrain_train::gpu::detect(&gpu) {
        Ok(Some(info)) => match info.precision() {
            Ok(p) => println!(
                "precision policy: {} (fused engine; {})",
                p.describe(),
                info.spec
                    .map_or("not in qtrain's GPU table".to_string(), |s| format!(
                        "`qtrain plan --gpu {}`",
                        s.key
                    ))
            ),
            Err(e) => {
                println!("precision policy: {e}");
                failures.push("unsupported GPU".to_string());
            }
        },
        Ok(None) => {}
        Err(e) => println!("GPU detection: {e}"),
    }

    // ---- NF4 dequantization: bit-exact against the CPU reference, and bandwidth.
    let (rows, cols) = (4096usize, 14336usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-0.05f32..0.05))
        .collect();
    let q = Nf4Tensor::quantize(&w, &[rows, cols], 64, true)?;
    let want = q.dequantize_to_vec();
    let dq = qtrain_device::Nf4Device::from_host(&q, &gpu)?;
    // The ceiling a memory-bound kernel works against: a device-to-device copy of
    // 1 GiB, counting the bytes read plus the bytes written.
    let copy_gbs = {
        let kd = &kdev;
        let n = 1 << 28;
        let (a, b) = (
            kd.zeros::<f32>(n, "copy src")?,
            kd.zeros::<f32>(n, "copy dst")?,
        );
        let secs = qtrain_device::selftest::time_it(kd, 10, || {
            kd.copy(a.all(), b.all())?;
            Ok(())
        })?;
        let gbs = 2.0 * (n * 4) as f64 / secs / 1e9;
        println!("device copy bandwidth (read + write, 1 GiB): {gbs:.0} GB/s");
        gbs
    };
    use qtrain_device::nf4::DequantKernel;
    let chosen = qtrain_device::nf4::dequant_kernel();
    // The CPU reference rounded to the output type: every kernel must match it bit
    // for bit (the same f32 multiply, then round-to-nearest-even).
    let rounded = |v: &[f32], dtype: DType| -> Result<Vec<f32>> {
        Ok(Tensor::from_slice(v, v.len(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)?
            .to_vec1()?)
    };
    // Odd shapes first (a partial last tile, the smallest and a large blocksize, no
    // double quantization), then the 7B shape, timed.
    let odd: [(usize, usize, usize, bool); 4] = [
        (3, 4160, 64, true),
        (7, 1168, 32, true),
        (9, 1024, 128, false),
        (33, 256, 1024, true),
    ];
    let mut odd_cases = Vec::new();
    for &(r, c, bs, dq) in &odd {
        let w: Vec<f32> = (0..r * c)
            .map(|_| rng.random_range(-0.05f32..0.05))
            .collect();
        let q = Nf4Tensor::quantize(&w, &[r, c], bs, dq)?;
        let want = q.dequantize_to_vec();
        let on_gpu = qtrain_device::Nf4Device::from_host(&q, &gpu)?;
        odd_cases.push((r, c, bs, dq, on_gpu, want));
    }
    let mut best_bf16: Option<(f64, DequantKernel)> = None;
    for (dtype, kernel) in [
        (DType::F32, DequantKernel::Tile),
        (DType::F32, DequantKernel::Chunk8),
        (DType::BF16, DequantKernel::Tile),
        (DType::BF16, DequantKernel::Chunk8),
        (DType::F16, DequantKernel::Tile),
        (DType::F16, DequantKernel::Chunk8),
    ] {
        qtrain_device::nf4::set_dequant_kernel(kernel);
        for (r, c, bs, dq, dev_q, want) in &odd_cases {
            let out = Tensor::zeros((*r, *c), dtype, &gpu)?;
            dev_q.dequantize_into(&out)?;
            let got: Vec<f32> = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if got != rounded(want, dtype)? {
                println!(
                    "nf4 dequantize {r}x{c} blocksize {bs} double quant {dq} -> {dtype:?} ({kernel:?}): MISMATCH against the CPU reference"
                );
                failures.push(format!("nf4 dequantize {dtype:?} {kernel:?} {r}x{c}"));
            }
        }
        let out = Tensor::zeros((rows, cols), dtype, &gpu)?;
        dq.dequantize_into(&out)?;
        let got: Vec<f32> = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let exact = got == rounded(&want, dtype)?;
        let secs = qtrain_device::selftest::time_it(&kdev, 50, || {
            dq.dequantize_into(&out)
                .map_err(qtrain_device::DeviceError::from)
        })?;
        let bytes = dq.storage_bytes() as f64 + (rows * cols * dtype.size_in_bytes()) as f64;
        println!(
            "nf4 dequantize {rows}x{cols} -> {dtype:?} ({kernel:?}): {} against the CPU reference (and {} odd shapes), {:.1} us, {:.0} GB/s ({:.0}% of the copy bandwidth)",
            if exact { "bit-exact" } else { "MISMATCH" },
            odd_cases.len(),
            secs * 1e6,
            bytes / secs / 1e9,
            100.0 * bytes / secs / 1e9 / copy_gbs
        );
        if !exact {
            failures.push(format!("nf4 dequantize {dtype:?} {kernel:?}"));
        }
        if dtype == DType::BF16 && best_bf16.is_none_or(|(s, _)| secs < s) {
            best_bf16 = Some((secs, kernel));
        }
    }
    qtrain_device::nf4::set_dequant_kernel(chosen);
    if let Some((_, k)) = best_bf16 {
        println!(
            "fastest bf16 dequantization here: {k:?}; training uses {chosen:?} \
             (QTRAIN_NF4_KERNEL=tile|chunk8 chooses)"
        );
    }

    // ---- Every fused kernel against its CPU reference (bf16 on the GPU).
    for c in qtrain_device::selftest::run_basic(&kdev, true)? {
        println!(
            "{}: {} {}",
            c.name,
            c.detail,
            if c.ok { "ok" } else { "MISMATCH" }
        );
        if !c.ok {
            failures.push(c.name);
        }
    }

    // ---- NF4 quantization on the GPU (how the loader quantizes): byte for byte against
    // the CPU quantizer, and its speed on the largest Mistral-7B projection.
    #[cfg(feature = "cuda")]
    for (name, ok, detail) in qtrain_device::nf4_quant::selftest(&gpu) {
        println!(
            "nf4 quantize {name}: {} {detail}",
            if ok { "ok" } else { "MISMATCH" }
        );
        if !ok {
            failures.push(format!("nf4 quantize {name}"));
        }
    }

    // ---- Fused 8-bit AdamW on the GPU vs the CPU optimizer (bit-exact), and its speed.
    for c in qtrain_optim::device::selftest(&kdev) {
        let verdict = if c.ok { "ok" } else { "MISMATCH" };
        println!("{}: {} {verdict}", c.name, c.detail);
        if !c.ok {
            failures.push(c.name);
        }
    }

    // ---- One training step of a tiny model: GPU vs CPU.
    let dir = tempdir()?;
    qtrain_train::models::write_random("tiny", &dir, 3, usize::MAX)?;
    let rows_tok: Vec<Vec<u32>> = (0..4)
        .map(|_| (0..64).map(|_| rng.random_range(3..300u32)).collect())
        .collect();
    let batch = TokenBatch::from_rows(&rows_tok)?;
    let lcfg = LoraConfig {
        dropout: 0.0,
        targets: qtrain_model::PROJECTIONS.to_vec(),
        ..LoraConfig::default()
    };
    // The tiny model on `device` in `dtype` with non-zero B adapters (so that every
    // gradient is non-trivial): what both the reference steps and the engine run.
    let model_and_adapters = |device: &Device, dtype: DType| -> Result<_> {
        let base = qtrain_model::BaseModel::load(
            &dir,
            &LoadOptions {
                device: device.clone(),
                dtype,
                quantization: Quantization::default(),
                threads: 0,
            },
        )?;
        let mut lora = LoraWeights::init(&lcfg, &base.config, device)?;
        let mut host = lora.to_host()?;
        for (i, (_, v, _)) in host.iter_mut().enumerate() {
            for (j, x) in v.iter_mut().enumerate() {
                if *x == 0.0 {
                    *x = (((i * 31 + j * 17) % 97) as f32 - 48.0) * 1e-3;
                }
            }
        }
        lora.update_from_host(&host)?;
        Ok((base, lora))
    };
    let valid = batch.valid_targets() as f64;
    let so = StepOptions {
        checkpointing: true,
        dropout_seed: 0,
        micro_step: 0,
    };
    let step = |device: &Device, dtype: DType| -> Result<(f64, Vec<qtrain_step::HostTensor>)> {
        let (base, lora) = model_and_adapters(device, dtype)?;
        let mut grads = LoraGrads::zeros_like(&lora)?;
        let l = forward_backward(&base, &lora, &batch, &so, valid, &mut grads)?;
        Ok((l.loss_sum / valid, grads.to_host()?))
    };
    let (cpu_loss, cpu_grads) = step(&Device::Cpu, DType::F32)?;
    // The fused engine on the GPU (bf16, and fp16 as 7.x GPUs train: the loss scaled,
    // the gradients divided back) against the reference step on the CPU.
    let engine_check = |dtype: DType| -> Result<()> {
        let (base, lora) = model_and_adapters(&gpu, dtype)?;
        let scale = if dtype == DType::F16 { 4096.0 } else { 1.0 };
        let step_with = |opts: qtrain_engine::EngineOptions| match dtype {
            DType::F16 => engine_step::<half::f16>(&base, &lora, &batch, &so, valid / scale, opts),
            _ => engine_step::<half::bf16>(&base, &lora, &batch, &so, valid / scale, opts),
        };
        let (loss_sum, mut g) = step_with(Default::default())?;
        // Keeping activations from the forward (selective recomputation) must change
        // no bit of the loss or the gradients.
        let kept = step_with(qtrain_engine::EngineOptions {
            save_attention_residual: true,
            save_mlp_activations: true,
            ..Default::default()
        })?;
        let kept_same = kept.0 == loss_sum && kept.1 == g;
        for t in &mut g {
            t.1.iter_mut().for_each(|x| *x = (*x as f64 / scale) as f32);
        }
        let l = loss_sum / valid;
        let loss_err = (l - cpu_loss).abs() / cpu_loss.abs();
        let grad_err = cpu_grads
            .iter()
            .zip(&g)
            .map(|(a, b)| max_rel_err(&a.1, &b.1))
            .fold(0f64, f64::max);
        let ok = loss_err <= 2e-2 && grad_err <= 6e-2 && kept_same;
        println!(
            "tiny training step, fused engine on GPU ({}{}) vs reference on CPU (f32): loss {l:.5} vs {cpu_loss:.5} \
             (rel {loss_err:.1e}), max rel gradient error {grad_err:.1e} over {} tensors; kept activations {} {}",
            format!("{dtype:?}").to_lowercase(),
            if scale != 1.0 {
                format!(", loss scale {scale}")
            } else {
                String::new()
            },
            g.len(),
            if kept_same {
                "bit-identical"
            } else {
                "DIFFER"
            },
            if ok { "ok" } else { "MISMATCH" }
        );
        anyhow::ensure!(ok, "loss or gradients differ");
        Ok(())
    };
    // KV-cached decoding on the GPU against the full forward (generation's fast path).
    let decode_check = || -> Result<f64> {
        let base = qtrain_model::BaseModel::load(
            &dir,
            &LoadOptions {
                device: gpu.clone(),
                dtype: DType::BF16,
                quantization: Quantization::default(),
                threads: 0,
            },
        )?;
        let tokens: Vec<u32> = (0..48u32).map(|i| 3 + (i * 37) % 290).collect();
        Ok(qtrain_reference::decode::max_rel_error_vs_full_forward(
            &base, None, &tokens, 20,
        )?)
    };
    match decode_check() {
        Ok(e) => {
            let ok = e <= 3e-2;
            println!(
                "KV-cached decoding on GPU (bf16) vs full forward: max rel logit error {e:.1e} (tol 3e-2) {}",
                if ok { "ok" } else { "MISMATCH" }
            );
            if !ok {
                failures.push("kv-cache decode".into());
            }
        }
        Err(e) => {
            println!("KV-cached decoding on GPU: FAILED: {e:#}");
            failures.push("kv-cache decode".into());
        }
    }
    for dtype in [DType::BF16, DType::F16] {
        if let Err(e) = engine_check(dtype) {
            println!("fused engine step ({dtype:?}): FAILED: {e:#}");
            failures.push(format!("fused engine step {dtype:?}"));
        }
    }
    for (dtype, tol_loss, tol_grad) in [(DType::F32, 1e-4, 1e-3), (DType::BF16, 2e-2, 6e-2)] {
        let (l, g) = step(&gpu, dtype)?;
        let loss_err = (l - cpu_loss).abs() / cpu_loss.abs();
        let grad_err = cpu_grads
            .iter()
            .zip(&g)
            .map(|(a, b)| max_rel_err(&a.1, &b.1))
            .fold(0f64, f64::max);
        let ok = loss_err <= tol_loss && grad_err <= tol_grad;
        println!(
            "tiny training step on GPU ({dtype:?}) vs CPU (f32): loss {l:.5} vs {cpu_loss:.5} (rel {loss_err:.1e}), \
             max rel gradient error {grad_err:.1e} over {} tensors {}",
            g.len(),
            if ok { "ok" } else { "MISMATCH" }
        );
        if !ok {
            failures.push(format!("training step {dtype:?}"));
        }
    }
    // ---- The loader quantizes on the GPU: every projection must equal the CPU loader's.
    let load = |device: &Device, dtype: DType| {
        qtrain_model::BaseModel::load(
            &dir,
            &LoadOptions {
                device: device.clone(),
                dtype,
                quantization: Quantization::default(),
                threads: 0,
            },
        )
    };
    let (cpu_base, gpu_base) = (load(&Device::Cpu, DType::F32)?, load(&gpu, DType::BF16)?);
    let projs: Vec<_> = cpu_base.layers.iter().flat_map(|l| &l.projs).collect();
    let gpu_projs: Vec<_> = gpu_base.layers.iter().flat_map(|l| &l.projs).collect();
    let differ = projs
        .iter()
        .zip(&gpu_projs)
        .filter(|(c, g)| c.nf4().is_none() || c.nf4() != g.nf4())
        .count();
    let ok = differ == 0 && projs.len() == gpu_projs.len();
    println!(
        "tiny model loaded on GPU vs CPU: {differ} of {} NF4 projections differ {}",
        projs.len(),
        if ok { "ok" } else { "MISMATCH" }
    );
    if !ok {
        failures.push("GPU loader quantization".into());
    }
    let _ = std::fs::remove_dir_all(&dir);
    if failures.is_empty() {
        println!("all checks passed");
        Ok(())
    } else {
        bail!("checks failed: {}", failures.join(", "))
    }
}

fn tempdir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("qtrain-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
