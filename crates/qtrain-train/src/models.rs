//! Where the base model comes from: a directory, a hub id, or `builtin:<preset>`,
//! a seeded random model (with the built-in tokenizer) generated on first use into
//! the qtrain cache. Also the device and dtype the run computes in.

use candle_core::{DType, Device};
use qtrain_model::{ModelConfig, PRESETS};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelSourceError {
    #[error(transparent)]
    Model(#[from] qtrain_model::ModelError),
    #[error("the built-in tokenizer: {0}")]
    Tokenizer(String),
    #[error("model.device = `{0}`: {1}")]
    Device(String, String),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
}

/// Writes a random model of `preset` with the built-in tokenizer into `out`.
pub fn write_random(
    preset: &str,
    out: &Path,
    seed: u64,
    max_shard_bytes: usize,
) -> Result<ModelConfig, ModelSourceError> {
    let tokenizer = qtrain_data::tiny_tokenizer::build_tiny_tokenizer();
    let vocab = tokenizer.get_vocab_size(true);
    let cfg = ModelConfig::preset(preset, vocab)?;
    let json = tokenizer
        .to_string(true)
        .map_err(|e| ModelSourceError::Tokenizer(e.to_string()))?;
    qtrain_model::random::write_random_model(
        out,
        &cfg,
        seed,
        max_shard_bytes,
        &json,
        &qtrain_data::tiny_tokenizer::tiny_tokenizer_config(),
    )?;
    Ok(cfg)
}

/// Resolves `model.path`: `builtin:<preset>[@seed]` (generated once under
/// `cache_root/builtin/`), a directory, or a hub id.
pub fn resolve(path: &str, cache_root: &Path) -> Result<PathBuf, ModelSourceError> {
    if let Some(spec) = path.strip_prefix("builtin:") {
        let (preset, seed) = match spec.split_once('@') {
            Some((p, s)) => (p, s.parse::<u64>().unwrap_or(0)),
            None => (spec, 0),
        };
        if !PRESETS.contains(&preset) {
            return Err(qtrain_model::ModelError::UnknownPreset {
                name: preset.to_string(),
                known: PRESETS.join(", "),
            }
            .into());
        }
        let dir = cache_root
            .join("builtin")
            .join(format!("{preset}-seed{seed}"));
        if !dir.join("config.json").exists() {
            tracing::info!(
                "generating the built-in {preset} model in {}",
                dir.display()
            );
            write_random(preset, &dir, seed, 5_000_000_000)?;
        }
        return Ok(dir);
    }
    Ok(qtrain_model::hub::resolve_model(path)?)
}

/// The device named by `model.device` (`auto` takes CUDA when built with it and a GPU
/// is present).
pub fn device(spec: &str) -> Result<Device, ModelSourceError> {
    let err = |m: String| ModelSourceError::Device(spec.to_string(), m);
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if candle_core::utils::cuda_is_available() {
            Device::new_cuda(0).map_err(|e| err(e.to_string()))?
        } else {
            Device::Cpu
        }),
        s => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| err("expected cuda or cuda:N".into()))?,
                None => return Err(err("expected auto, cpu, cuda or cuda:N".into())),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(err(
                    "this qtrain was built without CUDA (cargo build --features cuda)".into(),
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| err(e.to_string()))
        }
    }
}

/// The compute dtype named by `model.dtype` on `device`, without the GPU policy
/// (`auto` is bf16 on any GPU); the trainer uses [`resolve_dtype`].
pub fn dtype(spec: &str, device: &Device) -> DType {
    match spec {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        _ if device.is_cuda() => DType::BF16,
        _ => DType::F32,
    }
}

/// The compute dtype of `model.dtype = spec` on `device` with the GPU policy of
/// [`crate::gpu`] applied: on a GPU, `auto` is bf16 (+ TF32) from compute capability
/// 8.0 and fp16 (with loss scaling) on 7.x, bf16 is refused on 7.x and anything
/// older than 7.0 is refused. Also returns the detected GPU.
pub fn resolve_dtype(
    spec: &str,
    device: &Device,
) -> Result<(DType, Option<crate::gpu::GpuInfo>), ModelSourceError> {
    let Some(g) = crate::gpu::detect(device)? else {
        return Ok((dtype(spec, device), None));
    };
    let dt = crate::gpu::dtype_for(spec, &g)?;
    let precision = g.precision()?;
    crate::gpu::apply_precision(precision);
    tracing::info!(
        "GPU: {} (compute capability {}.{}, {:.0} MiB): {}",
        g.name,
        g.compute_capability.0,
        g.compute_capability.1,
        g.total_bytes as f64 / 1048576.0,
        if spec == "auto" {
            precision.describe().to_string()
        } else {
            format!("model.dtype = {spec}")
        }
    );
    Ok((dt, Some(g)))
}

/// Loads a base model for evaluation or generation: `path` as in `model.path`,
/// NF4 through the quantized cache unless `quantization` is `none`.
pub fn load_base(
    path: &str,
    quantization: &str,
    device_spec: &str,
    dtype_spec: &str,
    cache_root: &Path,
) -> Result<(qtrain_model::BaseModel, PathBuf), ModelSourceError> {
    let device = device(device_spec)?;
    let (dtype, _) = resolve_dtype(dtype_spec, &device)?;
    let dir = resolve(path, cache_root)?;
    let opts = qtrain_model::LoadOptions {
        device,
        dtype,
        quantization: if quantization == "none" {
            qtrain_model::Quantization::None
        } else {
            qtrain_model::Quantization::default()
        },
        threads: 0,
    };
    let (base, _) = qtrain_model::bnb::load_cached(&dir, &opts, &cache_root.join("nf4"))?;
    Ok((base, dir))
}

/// LoRA weights on `base`'s device holding a PEFT adapter's tensors.
pub fn lora_from_peft(
    adapter: &crate::peft::PeftAdapter,
    base: &qtrain_model::BaseModel,
) -> Result<qtrain_step::LoraWeights, qtrain_step::StepError> {
    let s = &adapter.settings;
    let cfg = qtrain_step::LoraConfig {
        rank: s.rank,
        alpha: s.alpha,
        dropout: s.dropout,
        targets: s.targets.clone(),
        rslora: s.rslora,
        seed: 0,
    };
    let mut lora = qtrain_step::LoraWeights::init(&cfg, &base.config, &base.device)?;
    lora.update_from_host(&adapter.tensors)?;
    Ok(lora)
}
