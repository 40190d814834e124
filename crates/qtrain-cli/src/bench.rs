//! `qtrain bench`: training-step throughput on a model of real shape.
//!
//! Generates the model when absent (random weights, e.g. Mistral-7B's shapes),
//! loads it NF4-quantized, and times full optimizer steps (forward, backward with
//! checkpointing, 8-bit AdamW update) on a fixed random batch after warm-up steps.
//! Prints one JSON object per case: tokens/s, step time and its phases, the loss of
//! each step (it must fall on a repeated batch), peak device memory (the whole
//! device as the driver reports it, and qtrain's own buffers), and model FLOPs
//! utilization against the bf16 dense peak given with --peak-tflops; then a table.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use qtrain_engine::{Engine, EngineOptions};
use qtrain_model::BaseModel;
use qtrain_optim::{AdamW8bit, AdamWConfig, DeviceAdamW8bit, ParamSpec};
use qtrain_reference::forward_backward;
use qtrain_step::{HostTensor, LoraConfig, LoraGrads, LoraWeights, StepOptions, TokenBatch};
use qtrain_train::memory::{MemorySpec, OptimizerPlace};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory; generated from --preset when it does not exist.
    #[arg(long, default_value = "models/mistral-7b-v0.3-random")]
    model: PathBuf,
    #[arg(long, default_value = "mistral-7b-v0.3")]
    preset: String,
    /// Cases as BATCHxSEQ, comma separated.
    #[arg(long, default_value = "8x512,4x2048")]
    cases: String,
    /// LoRA targets, comma separated, or `qkvo` / `all`.
    #[arg(long, default_value = "qkvo")]
    targets: String,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// `fused` (the default on GPUs) or `reference` (candle ops).
    #[arg(long, default_value = "auto")]
    engine: String,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Compute type: `auto` (the GPU's precision policy: bf16 from compute capability
    /// 8.0, fp16 on 7.x; f32 on the CPU), `bf16`, `f16` or `f32`. fp16 steps scale
    /// the loss by a fixed 4096 and divide the gradients back before the update.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Dense bf16 peak of the GPU in TFLOP/s, for MFU (H100/H200 SXM: ~790 measured
    /// with cuBLAS on random data, 989 on the datasheet).
    #[arg(long, default_value_t = 0.0)]
    peak_tflops: f64,
    /// Write the JSON lines here too.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Keep every layer's attention residual so the backward skips the o
    /// projection: `on`, `off`, or `auto` (on when the memory model says it fits in
    /// 90% of this GPU's memory; off on the CPU), as `train.keep_attention_residuals`.
    #[arg(long, default_value = "auto")]
    keep_residuals: String,
    /// Keep every layer's gate/up output so the backward skips the gate/up product:
    /// `on`, `off`, or `auto` (beside the residuals, when the memory model says it
    /// fits), as `train.keep_mlp_activations`.
    #[arg(long, default_value = "auto")]
    keep_mlp: String,
    /// After the timed steps, run one more with CUDA events around every kind of
    /// work in the fused engine, and print where the step's GPU time goes.
    #[arg(long)]
    profile: bool,
}

fn targets(spec: &str) -> Result<String> {
    Ok(match spec {
        "qkvo" => "q_proj,k_proj,v_proj,o_proj".into(),
        "all" => "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".into(),
        other => other.into(),
    })
}

/// The step being timed, on either backend.
// One per bench case, built in place and never moved: the size gap costs nothing.
#[allow(clippy::large_enum_variant)]
enum Stepper {
    Reference {
        lora: LoraWeights,
        grads: LoraGrads,
        params: Vec<HostTensor>,
        opt: Box<AdamW8bit>,
    },
    FusedBf16(Box<Engine<half::bf16>>, Box<DeviceAdamW8bit>),
    FusedF16(Box<Engine<half::f16>>, Box<DeviceAdamW8bit>),
    FusedF32(Box<Engine<f32>>, Box<DeviceAdamW8bit>),
}

macro_rules! fused {
    ($s:expr, $e:ident, $o:ident => $body:expr) => {
        match $s {
            Stepper::FusedBf16($e, $o) => Some($body),
            Stepper::FusedF16($e, $o) => Some($body),
            Stepper::FusedF32($e, $o) => Some($body),
            Stepper::Reference { .. } => None,
        }
    };
}

impl Stepper {
    fn micro(
        &mut self,
        base: &BaseModel,
        batch: &TokenBatch,
        so: &StepOptions,
        denom: f64,
    ) -> Result<f64> {
        if let Stepper::Reference { lora, grads, .. } = self {
            grads.zero()?;
            return Ok(forward_backward(base, lora, batch, so, denom, grads)?.loss_sum);
        }
        Ok(fused!(self, e, _o => {
            e.lora().zero_grads(e.device())?;
            e.forward_backward(batch, so, denom)?.loss_sum
        })
        .expect("fused"))
    }

    /// The 8-bit AdamW update: on the device for the fused engine (state resident),
    /// through the host for the reference path (download, update, upload). The
    /// gradients are multiplied by `unscale` first (the inverse loss scale of fp16).
    fn update(&mut self, lr: f32, unscale: f32) -> Result<()> {
        if let Stepper::Reference {
            lora,
            grads,
            params,
            opt,
        } = self
        {
            let mut g = grads.to_host()?;
            if unscale != 1.0 {
                g.iter_mut()
                    .for_each(|t| t.1.iter_mut().for_each(|x| *x *= unscale));
            }
            let mut p: Vec<&mut [f32]> = params.iter_mut().map(|p| p.1.as_mut_slice()).collect();
            let gs: Vec<&[f32]> = g.iter().map(|g| g.1.as_slice()).collect();
            opt.step(&mut p, &gs, lr)?;
            lora.update_from_host(params)?;
            return Ok(());
        }
        fused!(self, e, o => {
            let l = e.lora();
            if unscale != 1.0 {
                qtrain_device::rows::scale_in_place(e.device(), l.grads.all(), unscale)?;
            }
            o.step(l.params.all(), l.grads.all(), lr)
        })
        .expect("fused")?;
        Ok(())
    }

    /// Bytes held by the fused engine's own buffers at their peak.
    fn engine_peak(&self) -> Option<usize> {
        fused!(self, e, _o => e.device().peak_bytes())
    }

    /// The fused engine's options (the defaults for the reference path).
    fn engine_options(&self) -> EngineOptions {
        fused!(self, e, _o => e.options()).unwrap_or_default()
    }

    /// Where the optimizer state lives, as the memory model counts it.
    fn optimizer_place(&self) -> OptimizerPlace {
        fused!(self, _e, o => o.placement().into()).unwrap_or(OptimizerPlace::Host)
    }
}

/// Device memory in use (total − free), as nvidia-smi would show it.
fn device_used(device: &Device) -> Option<u64> {
    if !device.is_cuda() {
        return None;
    }
    let dev = qtrain_device::Dev::from_candle(device).ok()?;
    let (free, total) = dev.mem_info().ok()??;
    Some((total - free) as u64)
}

pub fn run(a: Args) -> Result<()> {
    if !a.model.join("config.json").exists() {
        let t = Instant::now();
        qtrain_train::models::write_random(&a.preset, &a.model, 0, 5_000_000_000)?;
        eprintln!(
            "generated {} in {:.1}s",
            a.model.display(),
            t.elapsed().as_secs_f64()
        );
    }
    let device = qtrain_train::models::device(&a.device)?;
    // Before anything is loaded: the CUDA context and cuBLAS (memory::CONTEXT_BYTES).
    let baseline_used = device_used(&device);
    // The GPU and the compute type its precision policy gives (TF32 set as the trainer sets it).
    let (dtype, gpu) = qtrain_train::models::resolve_dtype(&a.dtype, &device)?;
    // fp16 has 5 exponent bits: the gradients flowing back are scaled clear of its
    // underflow (a fixed scale here; the trainer adjusts it dynamically).
    let loss_scale = if dtype == DType::F16 { 4096.0 } else { 1.0 };
    let t = Instant::now();
    let (base, outcome) = qtrain_model::bnb::load_cached(
        &a.model,
        &qtrain_model::LoadOptions {
            device: device.clone(),
            dtype,
            quantization: qtrain_model::Quantization::default(),
            threads: 0,
        },
        &qtrain_model::bnb::default_cache_root().join("nf4"),
    )?;
    device.synchronize()?;
    let load_s = t.elapsed().as_secs_f64();
    let loaded_used = device_used(&device);
    eprintln!(
        "loaded in {load_s:.1}s ({outcome:?}): {:.2} GB frozen on {:?}; device memory in use {}",
        base.storage_bytes() as f64 / 1e9,
        device,
        loaded_used.map_or("n/a".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0))
    );
    let target_list = targets(&a.targets)?;
    let target_projs = LoraConfig::parse_targets(&target_list)?;
    let fused = match a.engine.as_str() {
        "auto" => device.is_cuda(),
        "fused" => true,
        "reference" => false,
        other => bail!("--engine: `{other}` (expected auto, fused or reference)"),
    };
    let cfg = &base.config;
    // Model FLOPs per token, the convention of the issue: 2P forward and 2P backward
    // (frozen weights need dX only, no dW; LoRA adds little) = 4P, plus 2P for the
    // recomputed forward with checkpointing = 6P; P counts every matmul weight.
    // Causal attention adds 2 x 2 x seq/2 x (heads x head_dim) per layer forward.
    let matmul_params: f64 = (qtrain_model::PROJECTIONS
        .iter()
        .map(|&p| cfg.proj_shape(p).iter().product::<usize>())
        .sum::<usize>()
        * cfg.num_hidden_layers
        + cfg.vocab_size * cfg.hidden_size) as f64;
    // The memory model of a case, with the optimizer state where it lives.
    let spec_for =
        |b: usize, s: usize, optimizer: OptimizerPlace, opts: EngineOptions| MemorySpec {
            model: cfg.clone(),
            quantization: base.quantization,
            dtype: base.dtype,
            rank: a.rank,
            targets: target_projs.clone(),
            dropout: false,
            batch: b,
            seq: s,
            checkpointing: true,
            eight_bit: true,
            optimizer,
            engine: if fused {
                qtrain_train::memory::EngineKind::Fused
            } else {
                qtrain_train::memory::EngineKind::Reference
            },
            engine_options: opts,
            compute_capability: gpu.as_ref().map(|g| g.compute_capability),
        };
    for (flag, v) in [
        ("--keep-residuals", &a.keep_residuals),
        ("--keep-mlp", &a.keep_mlp),
    ] {
        if !["auto", "on", "off"].contains(&v.as_str()) {
            bail!("{flag}: `{v}` (expected auto, on or off)");
        }
    }
    // As the trainer decides: on the memory model of the case, against 90% of the GPU.
    let kept_for = |b: usize, s: usize, optimizer: OptimizerPlace| {
        qtrain_train::memory::kept_activations(
            &a.keep_residuals,
            &a.keep_mlp,
            &spec_for(b, s, optimizer, EngineOptions::default()),
            gpu.as_ref().map(|g| {
                qtrain_train::memory::usable(g.total_bytes, qtrain_train::memory::DEFAULT_HEADROOM)
            }),
            None,
        )
    };
    let mut rows_out = Vec::new();
    let mut json_lines = Vec::new();
    for case in a.cases.split(',') {
        let (b, s) = case
            .split_once('x')
            .and_then(|(b, s)| {
                Some((
                    b.trim().parse::<usize>().ok()?,
                    s.trim().parse::<usize>().ok()?,
                ))
            })
            .with_context(|| format!("--cases: `{case}` is not BATCHxSEQ"))?;
        let lcfg = LoraConfig {
            rank: a.rank,
            alpha: 2.0 * a.rank as f64,
            dropout: 0.0,
            targets: target_projs.clone(),
            rslora: false,
            seed: 0,
        };
        let lora = LoraWeights::init(&lcfg, cfg, &device)?;
        let params = lora.to_host()?;
        let specs: Vec<ParamSpec> = params
            .iter()
            .map(|(n, v, _)| ParamSpec::new(n.clone(), v.len()))
            .collect();
        let trainable: usize = specs.iter().map(|s| s.numel).sum();
        let opt = AdamW8bit::new(AdamWConfig::default(), &specs)?;
        let mut stepper = if !fused {
            Stepper::Reference {
                grads: LoraGrads::zeros_like(&lora)?,
                lora,
                params,
                opt: Box::new(opt),
            }
        } else {
            let kdev = qtrain_device::Dev::from_candle(&device)?;
            let dopt = Box::new(DeviceAdamW8bit::from_host(&opt, &kdev)?);
            let mut engine_opts = EngineOptions::default();
            kept_for(b, s, dopt.placement().into()).apply(&mut engine_opts);
            match base.dtype {
                DType::BF16 => {
                    Stepper::FusedBf16(Box::new(Engine::new(&base, &lora, engine_opts)?), dopt)
                }
                DType::F16 => {
                    Stepper::FusedF16(Box::new(Engine::new(&base, &lora, engine_opts)?), dopt)
                }
                _ => Stepper::FusedF32(Box::new(Engine::new(&base, &lora, engine_opts)?), dopt),
            }
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let rows: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                (0..s)
                    .map(|_| rng.random_range(3..cfg.vocab_size as u32))
                    .collect()
            })
            .collect();
        let batch = TokenBatch::from_rows(&rows)?;
        let valid = batch.valid_targets() as f64;
        let mut losses = Vec::new();
        let mut times = Vec::new();
        let mut peak_used = device_used(&device).unwrap_or(0);
        // Per-phase seconds of the timed steps: forward+backward, optimizer update.
        let mut phases = [0f64; 2];
        for i in 0..a.warmup + a.steps {
            device.synchronize()?;
            let t = Instant::now();
            let so = StepOptions {
                checkpointing: true,
                dropout_seed: 0,
                micro_step: i as u64,
            };
            let loss = stepper.micro(&base, &batch, &so, valid / loss_scale)?;
            device.synchronize()?;
            let t1 = t.elapsed().as_secs_f64();
            peak_used = peak_used.max(device_used(&device).unwrap_or(0));
            stepper.update(1e-3, (1.0 / loss_scale) as f32)?;
            device.synchronize()?;
            let t2 = t.elapsed().as_secs_f64();
            if i >= a.warmup {
                for (acc, d) in phases.iter_mut().zip([t1, t2 - t1]) {
                    *acc += d / a.steps as f64;
                }
                times.push(t2);
            }
            losses.push(loss / valid);
        }
        let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
        let engine_dev = fused!(&stepper, e, _o => e.device().clone());
        let profile = match engine_dev.filter(|_| a.profile) {
            Some(dev) => Some(profile_step(&dev, || {
                let so = StepOptions {
                    checkpointing: true,
                    dropout_seed: 0,
                    micro_step: (a.warmup + a.steps) as u64,
                };
                stepper.micro(&base, &batch, &so, valid / loss_scale)
            })?),
            None => None,
        };
        if let Some(p) = &profile {
            eprintln!(
                "profile of one step, case {}:\n{}",
                case.trim(),
                profile_table(p)
            );
        }
        // The memory model's prediction for this case (fused: the 8-bit AdamW state on
        // the GPU as the host optimizer's placement policy decides; reference: on the host),
        // next to what was measured: the numbers the runtime constants are calibrated on.
        let predicted = spec_for(b, s, stepper.optimizer_place(), stepper.engine_options()).plan();
        eprintln!(
            "memory, case {}:\n{}",
            case.trim(),
            qtrain_train::memory::compare(
                &predicted,
                &qtrain_train::memory::Measured {
                    baseline_used,
                    loaded_used,
                    peak_used: (peak_used > 0).then_some(peak_used),
                    engine_peak: stepper.engine_peak().map(|b| b as u64),
                },
            )
        );
        let tokens = (b * s) as f64;
        let attn =
            2.0 * (cfg.num_hidden_layers * s * cfg.num_attention_heads * cfg.head_dim()) as f64;
        let flops_per_token = 3.0 * 2.0 * matmul_params + 4.0 * attn;
        let tflops = flops_per_token * tokens / mean / 1e12;
        let falls = losses.windows(2).all(|w| w[1] < w[0]);
        let json = serde_json::json!({
            "case": case.trim(),
            "targets": a.targets,
            "rank": a.rank,
            "engine": if fused { "fused" } else { "reference" },
            "dtype": format!("{:?}", base.dtype).to_lowercase(),
            "step_s": mean,
            "tokens_per_s": tokens / mean,
            "achieved_tflops": tflops,
            "mfu": if a.peak_tflops > 0.0 { serde_json::json!(tflops / a.peak_tflops) } else { serde_json::Value::Null },
            "losses": losses,
            "loss_falls": falls,
            "phase_s": {
                "forward_backward": phases[0],
                "optimizer": phases[1],
            },
            "peak_device_mem_used_mib": peak_used as f64 / 1048576.0,
            "engine_buffers_peak_mib": stepper.engine_peak().map(|b| b as f64 / 1048576.0),
            "frozen_mib": base.storage_bytes() as f64 / 1048576.0,
            "device_used_after_load_mib": loaded_used.map(|b| b as f64 / 1048576.0),
            "engine_workspace_plan_mib":
                fused!(&stepper, e, _o => e.plan_for(b, s).total_bytes() as f64 / 1048576.0),
            "trainable_params": trainable,
            "load_s": load_s,
            "profile_ms": profile.as_ref().map(|p| p
                .iter()
                .map(|r| (r.name.to_string(), serde_json::json!({"ms": r.ms, "calls": r.calls})))
                .collect::<serde_json::Map<_, _>>()),
            "attention_residuals_kept": stepper.engine_options().save_attention_residual,
            "mlp_activations_kept": stepper.engine_options().save_mlp_activations,
            "baseline_used_mib": baseline_used.map(|b| b as f64 / 1048576.0),
            "predicted_peak_mib": predicted.total() as f64 / 1048576.0,
            "predicted_engine_mib": predicted.engine_bytes as f64 / 1048576.0,
        });
        println!("{json}");
        json_lines.push(json.to_string());
        rows_out.push(format!(
            "{:>8} {:>6} {:>9.0} {:>8.3} {:>7.1} {:>10.0} {}",
            case.trim(),
            a.targets,
            tokens / mean,
            mean,
            tflops,
            peak_used as f64 / 1048576.0,
            if falls { "falls" } else { "DOES NOT FALL" }
        ));
    }
    if let Some(p) = &a.json_out {
        std::fs::write(p, json_lines.join("\n") + "\n").with_context(|| p.display().to_string())?;
    }
    eprintln!("    case targets  tokens/s   step s  TFLOP/s  peak MiB  loss");
    for r in rows_out {
        eprintln!("{r}");
    }
    Ok(())
}

/// Runs `step` once with region timing on (`Dev::region` in the engine) and returns
/// the regions, plus `[step]`: the whole step's device time.
fn profile_step(
    dev: &qtrain_device::Dev,
    step: impl FnOnce() -> Result<f64>,
) -> Result<Vec<qtrain_device::RegionTime>> {
    let dev = dev.clone();
    dev.take_profile()?;
    dev.set_profiling(true);
    let r = {
        let _all = dev.region("[step]");
        step()
    };
    dev.set_profiling(false);
    r?;
    Ok(dev.take_profile()?)
}

/// The profile as a table: regions by time, with their share of the step and the
/// step time no region covers (launch gaps, small kernels, host waits).
fn profile_table(p: &[qtrain_device::RegionTime]) -> String {
    let step = p.iter().find(|r| r.name == "[step]").map_or(0.0, |r| r.ms);
    let mut leaves: Vec<_> = p.iter().filter(|r| !r.name.starts_with('[')).collect();
    leaves.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    let mut out = format!(
        "{:<42} {:>7} {:>10} {:>7}\n",
        "region", "calls", "ms", "share"
    );
    let mut row = |name: &str, calls: String, ms: f64| {
        out.push_str(&format!(
            "{name:<42} {calls:>7} {ms:>10.2} {:>6.1}%\n",
            if step > 0.0 { 100.0 * ms / step } else { 0.0 }
        ));
    };
    for r in p.iter().filter(|r| r.name.starts_with('[')) {
        row(r.name, r.calls.to_string(), r.ms);
    }
    let covered: f64 = leaves.iter().map(|r| r.ms).sum();
    for r in leaves {
        row(r.name, r.calls.to_string(), r.ms);
    }
    row("(not in any region)", String::new(), step - covered);
    out
}
