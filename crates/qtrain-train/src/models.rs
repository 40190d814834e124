//! Where the base model comes from: a directory, a hub id, or `builtin:<preset>`,
//! a seeded random model (with the built-in tokenizer) generated on first use into
//! the qtrain cache. Also the device and dtype the run computes in.

use candle_core::{DType, Device};
use qtrain_model::{Family, ModelConfig, PRESETS};
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
    #[error(transparent)]
    Step(#[from] qtrain_step::StepError),
    /// An adapter without some of the tensors its own settings call for on this
    /// model: applying it would leave those projections untrained without a word.
    #[error(
        "the adapter lacks {} of the {expected} LoRA tensors its settings need on this \
         model ({} layers): {}{}; it was trained for a model with fewer layers, or \
         tensors were lost",
        missing.len(),
        layers,
        missing.iter().take(6).cloned().collect::<Vec<_>>().join(", "),
        if missing.len() > 6 { format!(" and {} more", missing.len() - 6) } else { String::new() }
    )]
    IncompleteAdapter {
        missing: Vec<String>,
        expected: usize,
        layers: usize,
    },
}

/// The built-in tokenizer a preset's random model gets: the family's (Llama 3's
/// byte-level BPE and header template, Qwen's ChatML) with its special tokens at
/// the ids the preset's config names, or the sentencepiece-style tiny tokenizer of
/// Mistral and Llama 2.
fn builtin_tokenizer_for(
    cfg: &ModelConfig,
) -> Option<(qtrain_data::family_tokenizer::BuiltinTokenizer, u32)> {
    use qtrain_data::family_tokenizer::BuiltinTokenizer as B;
    let base = cfg.bos_token_id.unwrap_or(0);
    match cfg.family() {
        Family::Qwen2 => Some((B::Qwen25, base)),
        Family::Qwen3 => Some((B::Qwen3, base)),
        // Llama 3 (its vocabulary starts its specials at 128000; the tiny one at 0).
        Family::Llama if cfg.vocab_size >= 128000 || cfg.rope_scaling.is_some() => {
            let rope = cfg.rope().ok().map(|r| r.scaling);
            let kind = match rope {
                // Llama 3.2 (factor 32) has its own template.
                Some(qtrain_model::RopeScaling::Llama3 { factor: 32.0, .. }) => B::Llama32,
                _ => B::Llama31,
            };
            Some((kind, base))
        }
        Family::Llama | Family::Mistral => None,
    }
}

/// Writes a random model of `preset` with the built-in tokenizer of its family into
/// `out`.
pub fn write_random(
    preset: &str,
    out: &Path,
    seed: u64,
    max_shard_bytes: usize,
) -> Result<ModelConfig, ModelSourceError> {
    let shape = ModelConfig::preset(preset, 0)?;
    let (tokenizer, tokenizer_config) = match builtin_tokenizer_for(&shape) {
        Some((kind, base)) => (
            qtrain_data::family_tokenizer::build_family_tokenizer(kind, base),
            qtrain_data::family_tokenizer::family_tokenizer_config(kind, base),
        ),
        None => (
            qtrain_data::tiny_tokenizer::build_tiny_tokenizer(),
            qtrain_data::tiny_tokenizer::tiny_tokenizer_config(),
        ),
    };
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
        &tokenizer_config,
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

/// Refuses an adapter that lacks some of the tensors its targets call for on a
/// model of `cfg` (every layer, every target, A and B), naming them (PEFT names).
pub fn check_adapter_complete(
    adapter: &crate::peft::PeftAdapter,
    cfg: &ModelConfig,
) -> Result<(), ModelSourceError> {
    use qtrain_step::{tensor_name, LoraPart};
    let have: std::collections::HashSet<&str> =
        adapter.tensors.iter().map(|t| t.0.as_str()).collect();
    let mut expected = 0;
    let mut missing = Vec::new();
    // In the model's order (layer, then q, k, v, o, gate, up, down), whatever order
    // the adapter's config lists its targets in, so the first names shown are the
    // first the model lacks.
    let targets: Vec<_> = qtrain_model::PROJECTIONS
        .iter()
        .filter(|p| adapter.settings.targets.contains(p))
        .collect();
    for layer in 0..cfg.num_hidden_layers {
        for &&p in &targets {
            for part in [LoraPart::A, LoraPart::B] {
                expected += 1;
                let name = tensor_name(layer, p, part);
                if !have.contains(name.as_str()) {
                    missing.push(crate::peft::to_peft_name(&name).unwrap_or(name));
                }
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ModelSourceError::IncompleteAdapter {
            missing,
            expected,
            layers: cfg.num_hidden_layers,
        })
    }
}

/// LoRA weights on `base`'s device holding a PEFT adapter's tensors; refuses an
/// adapter that lacks some ([`check_adapter_complete`]).
pub fn lora_from_peft(
    adapter: &crate::peft::PeftAdapter,
    base: &qtrain_model::BaseModel,
) -> Result<qtrain_step::LoraWeights, ModelSourceError> {
    check_adapter_complete(adapter, &base.config)?;
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
