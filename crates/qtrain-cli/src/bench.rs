//! `qtrain bench`: training-step throughput on a model of real shape. The flags
//! and the printing; the measurement is [`qtrain_train::bench`]'s.
//!
//! Generates the model when absent (random weights, e.g. Mistral-7B's shapes),
//! loads it NF4-quantized, and times full optimizer steps (forward, backward with
//! checkpointing, 8-bit AdamW update) on a fixed random batch after warm-up steps.
//! Prints one JSON object per case: tokens/s, step time and its phases, the loss of
//! each step (it must fall on a repeated batch), peak device memory (the whole
//! device as the driver reports it, and qtrain's own buffers), and model FLOPs
//! utilization against the bf16 dense peak given with --peak-tflops; then a table.
//!
//! `--memory-limit 24GiB` runs the cases as a GPU of that size would: the memory
//! model picks the offloaded checkpoints and kept activations for the cap, the
//! frozen base and the engine's buffers may hold no more, and each JSON line says
//! whether the checkpoints were offloaded and the peak against the cap.

use anyhow::{bail, Context, Result};
use qtrain_step::LoraConfig;
use qtrain_train::backend::EngineKind;
use qtrain_train::bench::{self, BenchOptions};
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
    /// Keep every layer's q/k/v, attention residual, output and lse so the backward
    /// skips the q/k/v product, RoPE, the attention forward and the o projection:
    /// `on`, `off`, or `auto` (on when the memory model says it fits in 90% of this
    /// GPU's memory; off on the CPU), as `train.keep_attention_residuals`.
    #[arg(long, default_value = "auto")]
    keep_residuals: String,
    /// Keep every layer's gate/up output so the backward skips the gate/up product:
    /// `on`, `off`, or `auto` (beside the residuals, when the memory model says it
    /// fits), as `train.keep_mlp_activations`.
    #[arg(long, default_value = "auto")]
    keep_mlp: String,
    /// Keep every layer's frozen weights dequantized after their first use, so no
    /// NF4 dequantization runs after the first step (13 GiB for Mistral-7B in
    /// bf16): `on`, `off`, or `auto` (after the kept activations, when the memory
    /// model says it fits), as `train.keep_dequantized_base`.
    #[arg(long, default_value = "auto")]
    keep_base: String,
    /// Keep the gradient checkpoints in pinned host memory (a ring of two layers'
    /// inputs on the GPU, copies on a side stream; a kept attention half travels
    /// with them): `on`, `off`, or `auto` (on when the memory model says the case
    /// does not fit without it and does with it, or when it is what lets more
    /// activations be kept with the copies hidden), as `train.offload_checkpoints`.
    #[arg(long, default_value = "auto")]
    offload: String,
    /// Cap on what the frozen base and the engine's buffers may allocate, e.g.
    /// `24GiB`, `16GiB`, `24000MiB` or plain bytes: emulates a GPU of that size
    /// (offload and kept activations are decided for it; past it an allocation
    /// fails as an out-of-memory).
    #[arg(long, value_name = "SIZE")]
    memory_limit: Option<String>,
    /// After the timed steps, run one more with CUDA events around every kind of
    /// work in the fused engine, and print where the step's GPU time goes.
    #[arg(long)]
    profile: bool,
    /// The frozen base's products: `auto` (the compute type) or `fp8` (E4M3 with
    /// per-token and per-channel scales, compute capability 8.9+), as
    /// `train.precision`. With `fp8` each case also runs one step both ways and
    /// reports the loss difference and the gradients' cosine similarity.
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Tokens per MLP chunk (the SwiGLU output, its gradient and, unless kept, the
    /// gate/up output exist for this many tokens at a time), as
    /// `train.mlp_chunk_tokens`; smaller saves memory.
    #[arg(long, default_value_t = qtrain_engine::EngineOptions::default().mlp_chunk)]
    mlp_chunk: usize,
    /// Rows per cross-entropy chunk (the f32 logits and their gradient exist for this
    /// many rows at a time), as `train.loss_chunk_tokens`; smaller saves memory.
    #[arg(long, default_value_t = qtrain_engine::EngineOptions::default().ce_chunk)]
    loss_chunk: usize,
    /// The attention backward's kernels, as `train.attention_backward`: `split`, `fused`
    /// (bit-reproducible), `fused-atomic` or `stored-ds` (H100/H200).
    #[arg(long, default_value = "split")]
    attn_bwd: String,
}

/// `qkvo`, `all`, or a comma-separated list of projections.
fn targets(spec: &str) -> &str {
    match spec {
        "qkvo" => "q_proj,k_proj,v_proj,o_proj",
        "all" => "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        other => other,
    }
}

/// `BATCHxSEQ`.
fn parse_case(case: &str) -> Result<(usize, usize)> {
    case.split_once('x')
        .and_then(|(b, s)| Some((b.trim().parse().ok()?, s.trim().parse().ok()?)))
        .with_context(|| format!("--cases: `{case}` is not BATCHxSEQ"))
}

/// `--memory-limit`'s size in bytes (see `qtrain_train::memory::parse_bytes`).
fn memory_limit(spec: Option<&str>) -> Result<Option<u64>> {
    spec.map(qtrain_train::memory::parse_bytes)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--memory-limit: {e}"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

pub fn run(a: Args) -> Result<()> {
    if !EngineKind::SETTINGS.contains(&a.engine.as_str()) {
        bail!(
            "--engine: `{}` (expected auto, fused or reference)",
            a.engine
        );
    }
    for (flag, v) in [
        ("--keep-residuals", &a.keep_residuals),
        ("--keep-mlp", &a.keep_mlp),
        ("--keep-base", &a.keep_base),
        ("--offload", &a.offload),
    ] {
        if !["auto", "on", "off"].contains(&v.as_str()) {
            bail!("{flag}: `{v}` (expected auto, on or off)");
        }
    }
    if !["auto", "fp8"].contains(&a.precision.as_str()) {
        bail!("--precision: `{}` (expected auto or fp8)", a.precision);
    }
    if a.mlp_chunk == 0 {
        bail!("--mlp-chunk: must be >= 1 (tokens per MLP chunk)");
    }
    if a.loss_chunk == 0 {
        bail!("--loss-chunk: must be >= 1 (rows per cross-entropy chunk)");
    }
    let Some(attn_bwd) = qtrain_engine::AttnBackward::parse(&a.attn_bwd) else {
        bail!(
            "--attn-bwd: `{}` (expected split, fused, fused-atomic or stored-ds)",
            a.attn_bwd
        );
    };
    let memory_limit = memory_limit(a.memory_limit.as_deref())?;
    let cases = a.cases.split(',').map(|c| Ok((c.trim(), parse_case(c)?)));
    let cases: Vec<(&str, (usize, usize))> = cases.collect::<Result<_>>()?;
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
    let model = bench::load_model(&a.model, &device, &a.dtype)?;
    let base = &model.base;
    eprintln!(
        "loaded in {:.1}s ({}): {:.2} GB frozen on {device:?}; device memory in use {}",
        model.load_s,
        model.cache,
        base.storage_bytes() as f64 / 1e9,
        model
            .loaded_used
            .map_or("n/a".into(), |b| format!("{:.0} MiB", mib(b)))
    );
    let opts = BenchOptions {
        targets: LoraConfig::parse_targets(targets(&a.targets))?,
        rank: a.rank,
        engine: a.engine.clone(),
        keep_residuals: a.keep_residuals.clone(),
        keep_mlp: a.keep_mlp.clone(),
        keep_base: a.keep_base.clone(),
        offload: a.offload.clone(),
        memory_limit,
        warmup: a.warmup,
        steps: a.steps,
        profile: a.profile,
        precision: a.precision.clone(),
        mlp_chunk: a.mlp_chunk,
        loss_chunk: a.loss_chunk,
        attention_backward: attn_bwd,
    };
    let (mut rows_out, mut json_lines) = (Vec::new(), Vec::new());
    for (case, (b, s)) in cases {
        let r = bench::run_case(&model, &opts, b, s)?;
        if let Some(p) = &r.profile {
            eprintln!(
                "profile of one step, case {case}:\n{}",
                bench::profile_table(p)
            );
        }
        eprintln!("memory, case {case}:\n{}", r.memory_comparison(&model));
        if let Some(q) = &r.fp8_quality {
            eprintln!(
                "fp8 vs the compute type, case {case}: loss differs by {:.3}%, gradient \
                 cosine {:.5} (all), lowest {:.5} ({})",
                100.0 * q.loss_rel,
                q.all_cosine,
                q.min_cosine,
                q.min_tensor
            );
        }
        if let (Some(limit), Some(peak)) = (r.memory_limit, r.capped_peak) {
            eprintln!(
                "memory limit {:.0} MiB: frozen base + engine buffers peaked at {:.0} MiB; \
                 checkpoints {}",
                mib(limit),
                mib(peak),
                if r.offload {
                    format!(
                        "offloaded ({:.0} MiB pinned on the host)",
                        mib(r.host_bytes.unwrap_or(0) as u64)
                    )
                } else {
                    "on the GPU".to_string()
                }
            );
        }
        let json = r.record(&model, case, &a.targets, a.peak_tflops);
        println!("{json}");
        json_lines.push(json.to_string());
        rows_out.push(format!(
            "{case:>8} {:>6} {:>9.0} {:>8.3} {:>7.1} {:>10.0} {}",
            a.targets,
            r.tokens_per_s(),
            r.step_s,
            r.tflops,
            mib(r.peak_used),
            if r.loss_falls() {
                "falls"
            } else {
                "DOES NOT FALL"
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limit_parses_sizes_and_names_the_flag() {
        assert_eq!(memory_limit(None).unwrap(), None);
        assert_eq!(memory_limit(Some("24GiB")).unwrap(), Some(24 << 30));
        assert_eq!(memory_limit(Some("24000MiB")).unwrap(), Some(24000 << 20));
        let e = memory_limit(Some("24 gigs")).unwrap_err().to_string();
        assert!(
            e.starts_with("--memory-limit: `24 gigs` is not a size") && e.contains("GiB"),
            "{e}"
        );
    }
}
