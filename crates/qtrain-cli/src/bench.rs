//! `qtrain bench`: training-step throughput on a model of real shape.
//!
//! Generates the model when absent (random weights, e.g. Mistral-7B's shapes),
//! loads it NF4-quantized, and times full optimizer steps (forward, backward with
//! checkpointing, 8-bit AdamW update) on a fixed random batch after warm-up steps.
//! Prints one JSON object per case: tokens/s, step time, the loss of each step (it
//! must fall on a repeated batch), peak device memory seen by the allocator, and
//! model FLOPs utilization against the bf16 dense peak given with --peak-tflops.

use anyhow::{Context, Result};
use candle_core::Device;
use qtrain_lora::{forward_backward, LoraConfig, LoraGrads, LoraWeights, StepOptions, TokenBatch};
use qtrain_optim::{AdamW8bit, AdamWConfig, ParamSpec};
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
    /// LoRA targets, comma separated.
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj")]
    targets: String,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Keep activations instead of recomputing each layer in backward.
    #[arg(long)]
    no_checkpointing: bool,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Dense bf16 peak of the GPU in TFLOP/s, for MFU (H100 SXM: ~989 spec, ~700 measured).
    #[arg(long, default_value_t = 0.0)]
    peak_tflops: f64,
}

fn sync(d: &Device) -> Result<()> {
    d.synchronize()?;
    Ok(())
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
    let dtype = qtrain_train::models::dtype("auto", &device);
    let t = Instant::now();
    let (base, _) = qtrain_model::bnb::load_cached(
        &a.model,
        &qtrain_model::LoadOptions {
            device: device.clone(),
            dtype,
            quantization: qtrain_model::Quantization::default(),
            threads: 0,
        },
        &qtrain_model::bnb::default_cache_root().join("nf4"),
    )?;
    sync(&device)?;
    eprintln!(
        "loaded in {:.1}s: {:.2} GB frozen on {:?}",
        t.elapsed().as_secs_f64(),
        base.storage_bytes() as f64 / 1e9,
        device
    );
    let targets = LoraConfig::parse_targets(&a.targets)?;
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
            targets: targets.clone(),
            rslora: false,
            seed: 0,
        };
        let mut lora = LoraWeights::init(&lcfg, cfg, &device)?;
        let mut grads = LoraGrads::zeros_like(&lora)?;
        let mut params = lora.to_host()?;
        let specs: Vec<ParamSpec> = params
            .iter()
            .map(|(n, v, _)| ParamSpec::new(n.clone(), v.len()))
            .collect();
        let mut opt = AdamW8bit::new(AdamWConfig::default(), &specs)?;
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
        // Per-phase seconds of the timed steps: forward+backward, gradient download,
        // optimizer update, parameter upload.
        let mut phases = [0f64; 4];
        for i in 0..a.warmup + a.steps {
            sync(&device)?;
            let t = Instant::now();
            grads.zero()?;
            let so = StepOptions {
                checkpointing: !a.no_checkpointing,
                dropout_seed: 0,
                micro_step: i as u64,
            };
            let l = forward_backward(&base, &lora, &batch, &so, valid, &mut grads)?;
            sync(&device)?;
            let t1 = t.elapsed().as_secs_f64();
            let g = grads.to_host()?;
            let t2 = t.elapsed().as_secs_f64();
            {
                let mut p: Vec<&mut [f32]> =
                    params.iter_mut().map(|p| p.1.as_mut_slice()).collect();
                let gs: Vec<&[f32]> = g.iter().map(|g| g.1.as_slice()).collect();
                opt.step(&mut p, &gs, 1e-3)?;
            }
            let t3 = t.elapsed().as_secs_f64();
            lora.update_from_host(&params)?;
            sync(&device)?;
            let t4 = t.elapsed().as_secs_f64();
            if i >= a.warmup {
                for (acc, d) in phases.iter_mut().zip([t1, t2 - t1, t3 - t2, t4 - t3]) {
                    *acc += d / a.steps as f64;
                }
            }
            losses.push(l.loss_sum / valid);
            if i >= a.warmup {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
        let tokens = (b * s) as f64;
        let passes = if a.no_checkpointing { 2.0 } else { 3.0 };
        let attn =
            2.0 * (cfg.num_hidden_layers * s * cfg.num_attention_heads * cfg.head_dim()) as f64;
        let flops_per_token = passes * 2.0 * matmul_params + (passes + 1.0) * attn;
        let tflops = flops_per_token * tokens / mean / 1e12;
        let json = serde_json::json!({
            "case": case.trim(),
            "targets": a.targets,
            "rank": a.rank,
            "checkpointing": !a.no_checkpointing,
            "step_s": mean,
            "tokens_per_s": tokens / mean,
            "achieved_tflops": tflops,
            "mfu": if a.peak_tflops > 0.0 { serde_json::json!(tflops / a.peak_tflops) } else { serde_json::Value::Null },
            "losses": losses,
            "phase_s": {
                "forward_backward": phases[0],
                "grads_to_host": phases[1],
                "optimizer": phases[2],
                "params_to_device": phases[3],
            },
            "trainable_params": lora.num_parameters(),
        });
        println!("{json}");
    }
    Ok(())
}
