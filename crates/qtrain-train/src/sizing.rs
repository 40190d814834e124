//! Sizing a run before it starts, `qtrain plan`'s report: what a config needs on a
//! GPU. The model's shape comes from its `config.json` alone ([`model_shape`]: a
//! local directory, the hub cache, or a built-in preset's shape; the weights are
//! never loaded or downloaded); [`memory_report`] puts the memory model's
//! breakdown ([`crate::memory`]) against the GPU's memory with headroom and finds
//! the largest micro-batch and sequence length that fit; [`time_estimate`] gives
//! the throughput ([`crate::throughput`]) and the wall time of the budget, or of a
//! number of epochs of the dataset counted by [`count_epoch`].

use crate::backend::EngineKind;
use crate::gpu::{self, GpuInfo};
use crate::memory::{self, mib, MemorySpec};
use crate::micro::StepShape;
use crate::models::ModelSourceError;
use crate::trainer::TrainError;
use crate::{Budget, RunConfig};
use qtrain_model::ModelConfig;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a run could not be sized.
#[derive(Debug, thiserror::Error)]
pub enum SizingError {
    #[error(
        "model.path `{path}`: not a local directory and not in the hub cache ({}); qtrain \
         plan needs only its config.json: download that (e.g. `huggingface-cli download \
         {path} config.json tokenizer.json tokenizer_config.json`) or point model.path at \
         a directory holding it",
        cache.display()
    )]
    ModelNotFound { path: String, cache: PathBuf },
    #[error(
        "no GPU detected ({why}); pass --gpu NAME (one of {})",
        gpu::GPUS.iter().map(|g| g.key).collect::<Vec<_>>().join(", ")
    )]
    NoGpu { why: String },
    #[error(
        "train.engine = \"fused\" computes in bf16 or fp16 on GPUs; {gpu} trains in {dtype:?} \
         here: use train.engine = \"auto\" or \"reference\""
    )]
    FusedNeedsHalf {
        gpu: String,
        dtype: candle_core::DType,
    },
    /// `train.engine = "fused"` for a model whose math the fused engine lacks.
    #[error("{0}")]
    FusedLacks(String),
    #[error(
        "--epochs needs the dataset's token count (drop --no-data; the model's tokenizer \
         must be local)"
    )]
    EpochsNeedData,
    /// `train.offload_checkpoints = "on"` with too little host memory.
    #[error("train.offload_checkpoints = \"on\": {0}")]
    HostMemory(#[from] memory::HostMemoryShort),
    #[error(transparent)]
    Source(#[from] ModelSourceError),
    #[error(transparent)]
    Model(#[from] qtrain_model::ModelError),
    #[error(transparent)]
    Gpu(#[from] gpu::GpuError),
    #[error(transparent)]
    Data(#[from] qtrain_data::DataError),
    /// The step shape could not be resolved (boxed: a `TrainError` is large).
    #[error(transparent)]
    Train(Box<TrainError>),
}

/// The model's shape and where it came from.
pub struct ModelShape {
    pub config: ModelConfig,
    /// A directory with the tokenizer, when one is available locally.
    pub dir: Option<PathBuf>,
    pub source: String,
}

/// `model.path` as `config.json` only: a directory, a hub-cache snapshot, or a
/// preset of the same name (`mistralai/Mistral-7B-Instruct-v0.3` is
/// `mistral-7b-v0.3`'s shape). Never downloads, never generates a large model.
pub fn model_shape(path: &str, cache_root: &Path) -> Result<ModelShape, SizingError> {
    if let Some(spec) = path.strip_prefix("builtin:") {
        let preset = spec.split_once('@').map_or(spec, |(p, _)| p);
        let vocab = qtrain_data::tiny_tokenizer::build_tiny_tokenizer().get_vocab_size(true);
        let config = ModelConfig::preset(preset, vocab)?;
        // The tiny presets are generated in a moment (and carry the tokenizer);
        // the 7B ones only if they already exist.
        let dir = if preset.starts_with("tiny") {
            Some(crate::models::resolve(path, cache_root)?)
        } else {
            let seed = spec.split_once('@').map_or("0", |(_, s)| s);
            let d = cache_root
                .join("builtin")
                .join(format!("{preset}-seed{seed}"));
            d.join("tokenizer.json").exists().then_some(d)
        };
        return Ok(ModelShape {
            config,
            dir,
            source: format!("built-in preset {preset}"),
        });
    }
    let as_dir = Path::new(path);
    let local = if as_dir.join("config.json").exists() {
        Some(as_dir.to_path_buf())
    } else {
        qtrain_model::hub::find_in_cache(&qtrain_model::hub::hub_cache_dir(), "models", path)
            .filter(|d| d.join("config.json").exists())
    };
    if let Some(dir) = local {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let has_tokenizer = dir.join("tokenizer.json").exists();
        return Ok(ModelShape {
            config,
            source: format!("{}/config.json", dir.display()),
            dir: has_tokenizer.then_some(dir),
        });
    }
    match preset_for_id(path) {
        Some(preset) => Ok(ModelShape {
            config: ModelConfig::preset(preset, 0)?,
            dir: None,
            source: format!("shape of the {preset} preset; not in the local hub cache"),
        }),
        None => Err(SizingError::ModelNotFound {
            path: path.to_string(),
            cache: qtrain_model::hub::hub_cache_dir(),
        }),
    }
}

/// The preset whose shape a hub id has, by its name.
pub fn preset_for_id(id: &str) -> Option<&'static str> {
    let name = id
        .split('@')
        .next()?
        .rsplit('/')
        .next()?
        .to_ascii_lowercase();
    let mut n = name.replace("-instruct", "");
    for suffix in ["-hf", "-base"] {
        if let Some(s) = n.strip_suffix(suffix) {
            n = s.to_string();
        }
    }
    let n = n.strip_prefix("meta-").unwrap_or(&n);
    // Unbabel's Tower models are Llama 2 fine-tunes of the same shapes (their
    // vocabulary adds a handful of chat tokens: a few MiB of embeddings).
    for (prefix, preset) in [
        ("towerinstruct-13b", "llama-2-13b"),
        ("towerbase-13b", "llama-2-13b"),
        ("towerinstruct-7b", "llama-2-7b"),
        ("towerbase-7b", "llama-2-7b"),
    ] {
        if n.starts_with(prefix) {
            return Some(preset);
        }
    }
    qtrain_model::PRESETS.iter().copied().find(|p| *p == n)
}

/// Tokens the trainer processes in one epoch of the training split (rows x
/// seq_len, padding included, as tokens/s counts them) and the trained ones.
pub struct EpochTokens {
    pub tokens: u64,
    pub trained: u64,
    pub took: Duration,
}

/// Counts [`EpochTokens`] by streaming the training split once with the model's
/// tokenizer in `dir`.
pub fn count_epoch(
    cfg: &RunConfig,
    shape: &StepShape,
    dir: &Path,
) -> Result<EpochTokens, SizingError> {
    let t = Instant::now();
    let data = shape.data_config(&cfg.data);
    let enc = std::sync::Arc::new(qtrain_data::Encoder::from_model_dir(
        dir,
        &cfg.data.chat_template,
    )?);
    let mut stream = qtrain_data::BatchStream::new(&data, enc)?;
    let (mut tokens, mut trained) = (0u64, 0u64);
    while let Some(b) = stream.next() {
        let b = b?;
        // The first batch made of the second epoch's data ends the count.
        if stream.epoch() > 0 {
            break;
        }
        tokens += (b.batch_size * b.seq_len) as u64;
        trained += b.valid_targets() as u64;
    }
    Ok(EpochTokens {
        tokens,
        trained,
        took: t.elapsed(),
    })
}

/// The GPU this machine has (`model.device`'s ordinal), for sizing a run on it.
pub fn detect_gpu(cfg: &RunConfig) -> Result<GpuInfo, SizingError> {
    let no_gpu = |why: String| SizingError::NoGpu { why };
    if !candle_core::utils::cuda_is_available() {
        return Err(no_gpu("this qtrain was built without CUDA".into()));
    }
    let spec = if cfg.model.device.starts_with("cuda") {
        cfg.model.device.as_str()
    } else {
        "cuda"
    };
    let device = crate::models::device(spec).map_err(|e| no_gpu(e.to_string()))?;
    gpu::detect(&device)?.ok_or_else(|| no_gpu("no CUDA device".into()))
}

/// The memory part of `qtrain plan`'s report, and what the time estimate needs.
pub struct MemoryReport {
    pub text: String,
    pub shape: StepShape,
    pub spec: MemorySpec,
    pub gpu: GpuInfo,
}

/// Everything `qtrain plan` prints about memory, for `cfg` (read from `label`) on
/// `gpu` with `headroom` (the share of its memory a run may use): the precision,
/// the step shape (the largest micro-batch that fits for `data.batch_size =
/// "auto"`), the kept activations, the predicted breakdown and total, and the
/// largest micro-batch and sequence length that fit.
pub fn memory_report(
    cfg: &RunConfig,
    label: &str,
    gpu: &GpuInfo,
    model: &ModelShape,
    headroom: f64,
) -> Result<MemoryReport, SizingError> {
    // A GPU qtrain refuses says so first.
    gpu.precision()?;
    let dtype = gpu::dtype_for(&cfg.model.dtype, gpu)?;
    let engine = EngineKind::for_model(&cfg.train.engine, true, dtype, &model.config)
        .map_err(SizingError::FusedLacks)?;
    if engine == EngineKind::Fused
        && !matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16)
    {
        return Err(SizingError::FusedNeedsHalf {
            gpu: gpu.name.clone(),
            dtype,
        });
    }
    let usable = memory::usable(gpu.total_bytes, headroom);
    let seq = cfg.data.seq_len;
    let cc = Some(gpu.compute_capability);
    let spec0 = MemorySpec::for_run(cfg, &model.config, dtype, engine, 1, seq, cc);
    // As the trainer: checkpoints offloaded for the search with `on`, or with `auto`
    // where not even one row fits otherwise.
    let policy = &cfg.train.offload_checkpoints;
    let spec0 = memory::search_spec(policy, &spec0, |s| s.predict().fits(usable));
    let fits_rows = |m: usize| spec0.with_shape(m, seq).predict().fits(usable);
    let shape = match StepShape::resolve(cfg, None, |max| memory::largest_fitting(max, fits_rows)) {
        Ok(s) => s,
        // Nothing fits: report the one-row shape so the table shows why.
        Err(_) if cfg.data.batch_size_is_auto() => StepShape {
            data_rows: cfg.train.effective_batch.unwrap_or(1),
            data_batches: 1,
            micro_rows: 1,
        },
        Err(e) => return Err(SizingError::Train(Box::new(e))),
    };
    let mut spec = memory::with_offload(&spec0.with_shape(shape.micro_rows, seq), false);
    let host_available = memory::host_memory_available();
    let offload = memory::offload_checkpoints(
        policy,
        memory::KeepPolicy::of(&cfg.train),
        &spec,
        Some(usable),
        None,
        host_available,
        gpu.spec,
    )?;
    spec.engine_options.offload_layer_inputs = offload;
    // What train.keep_attention_residuals and train.keep_mlp_activations decide for
    // this micro-batch (the trainer decides through the same function).
    let kept = memory::kept_activations(
        memory::KeepPolicy::of(&cfg.train),
        &spec,
        Some(usable),
        None,
        host_available,
    );
    // The searches keep the micro-batch first, as `auto` does (nothing kept); the
    // report's spec is the run's, with the activations it keeps.
    let mut searched = largest_shapes(cfg, &spec, &shape, usable, &model.config);
    if let Some(w) = context_warning(cfg.data.seq_len, &model.config) {
        searched += &format!("warning: {w}\n");
    }
    kept.apply(&mut spec.engine_options);
    let predicted = spec.predict();
    let mut t = run_summary(cfg, label, gpu, model, &spec, &shape, kept, &predicted)?;
    if spec.engine == EngineKind::Fused {
        let link = memory::host_link_bytes_per_s(gpu.spec);
        t += &offload_summary(cfg, &spec, &predicted, usable, host_available, link);
    }
    t += "\n";
    t += &predicted.table();
    let total = predicted.total();
    t += &format!(
        "\n{:.0} MiB of {:.0} MiB usable ({:.0}% of {:.0} MiB): {}\n",
        mib(total),
        mib(usable),
        100.0 * headroom,
        mib(gpu.total_bytes),
        if total <= usable {
            format!("fits, {:.0} MiB to spare", mib(usable - total))
        } else {
            format!("DOES NOT FIT, {:.0} MiB over", mib(total - usable))
        }
    );
    for w in &predicted.warnings {
        t += &format!("warning: {w}\n");
    }
    t += &searched;
    Ok(MemoryReport {
        text: t,
        shape,
        spec,
        gpu: gpu.clone(),
    })
}

/// The report's head: the GPU and its precision, the model, the run's settings,
/// the step shape and, for the fused engine, what the backward recomputes.
#[allow(clippy::too_many_arguments)]
fn run_summary(
    cfg: &RunConfig,
    label: &str,
    gpu: &GpuInfo,
    model: &ModelShape,
    spec: &MemorySpec,
    shape: &StepShape,
    kept: memory::KeptActivations,
    predicted: &memory::MemoryBreakdown,
) -> Result<String, SizingError> {
    let precision = gpu.precision()?;
    let (dtype, seq, auto) = (spec.dtype, spec.seq, cfg.data.batch_size_is_auto());
    let fused = spec.engine == EngineKind::Fused;
    let mut t = String::new();
    let (major, minor) = gpu.compute_capability;
    t += &format!("qtrain plan: {label}\n");
    t += &format!(
        "GPU:   {} ({:.0} MiB, compute capability {major}.{minor}{}): {}\n",
        gpu.name,
        mib(gpu.total_bytes),
        gpu.spec.map_or(String::new(), |s| format!(
            ", {:.0} TFLOP/s dense {}, {:.0} GB/s",
            s.tensor_tflops,
            if major >= 8 { "bf16" } else { "fp16" },
            s.bandwidth_gbs
        )),
        if cfg.model.dtype == "auto" {
            precision.describe().to_string()
        } else {
            format!("model.dtype = {}", cfg.model.dtype)
        }
    );
    let c = &model.config;
    t += &format!(
        "model: {} ({}): {} layers, hidden {}, intermediate {}, vocab {}\n",
        cfg.model.path,
        model.source,
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size
    );
    t += &format!(
        "run:   {} base, {} compute, {} engine; LoRA r{} on {} ({:.2}M parameters); \
         {} AdamW\n",
        if cfg.model.quantization == "none" {
            "unquantized"
        } else if cfg.model.double_quant {
            "NF4 double-quant"
        } else {
            "NF4"
        },
        format!("{dtype:?}").to_lowercase(),
        if fused { "fused" } else { "reference" },
        cfg.lora.rank,
        cfg.lora.targets.join(","),
        predicted.lora_params as f64 / 1e6,
        if spec.eight_bit { "8-bit" } else { "f32" },
    );
    t += &format!(
        "step:  micro-batch {} x {seq}{}, {} per optimizer step of {} rows ({} tokens)\n",
        shape.micro_rows,
        if auto {
            " (data.batch_size = \"auto\": the largest that fits)"
        } else {
            ""
        },
        match shape.passes_per_step() {
            1 => "1 pass".to_string(),
            n => format!("{n} passes"),
        },
        shape.rows_per_step(),
        shape.rows_per_step() * seq
    );
    if fused {
        t += &format!(
            "recompute: {}; {}; {} (train.keep_attention_residuals = {}, train.keep_mlp_activations = {}, \
             train.keep_dequantized_base = {})\n",
            if kept.attention_residuals {
                "attention half kept, no q/k/v or o projection, RoPE or attention forward"
            } else {
                "the whole attention half"
            },
            kept.mlp_words(c.num_hidden_layers),
            if kept.dequantized_base {
                "frozen base kept dequantized, no NF4 dequantization after the first step"
            } else {
                "NF4 weights dequantized as used"
            },
            cfg.train.keep_attention_residuals,
            cfg.train.keep_mlp_activations,
            cfg.train.keep_dequantized_base
        );
    }
    if cfg.model.device == "cpu" {
        t +=
            "note:  model.device = \"cpu\" in this config; the plan is for running it on the GPU\n";
    }
    Ok(t)
}

/// Where the gradient checkpoints live: on the GPU, or offloaded with the device
/// bytes saved, the pinned host bytes needed (against what the host has), and the
/// host-link traffic per pass with its estimated time over a link of `link` bytes/s.
fn offload_summary(
    cfg: &RunConfig,
    spec: &MemorySpec,
    predicted: &memory::MemoryBreakdown,
    usable: u64,
    host_available: Option<u64>,
    link: f64,
) -> String {
    let policy = &cfg.train.offload_checkpoints;
    if !spec.engine_options.offload_layer_inputs {
        return format!("checkpoints: on the GPU (train.offload_checkpoints = {policy})\n");
    }
    let on_gpu = memory::with_offload(spec, false).predict();
    // Why `auto` offloads: the run does not fit otherwise even keeping nothing, or
    // it is what lets more activations be kept (a kept attention half travels too).
    let bare = memory::with_offload(spec, false).keeping(memory::KeptActivations::default());
    let why = match policy.as_str() {
        "auto" if bare.predict().fits(usable) => {
            ", to keep more of the activations than fit beside the checkpoints on the GPU"
        }
        "auto" => ", as the run does not fit the GPU otherwise",
        _ => "",
    };
    let saved = on_gpu.total() - predicted.total();
    format!(
        "checkpoints: offloaded to pinned host memory (train.offload_checkpoints = {policy}{why}): \
         {:.0} MiB less on the GPU, {:.0} MiB pinned on the host ({} available); {:.0} MiB \
         over the host link per pass, ~{:.2} s at an assumed {:.0} GB/s (an estimate; the \
         copies overlap the compute on a side stream)\n",
        mib(saved),
        mib(predicted.host_bytes),
        host_available.map_or("host memory unknown".to_string(), |a| format!(
            "{:.0} MiB",
            mib(a)
        )),
        mib(predicted.transfer_bytes),
        predicted.transfer_seconds_at(link),
        link / 1e9
    )
}

/// A warning when `data.seq_len` runs past the context the model was trained for
/// ([`ModelConfig::trained_context`]): nothing breaks (RoPE is defined at every
/// position), but positions the base never saw make a fine-tune that learns the
/// extrapolation instead of the task, which users rarely mean. Said by `qtrain plan`
/// and logged by `qtrain run`, never refused: extending the context is a use too.
pub fn context_warning(seq_len: usize, c: &ModelConfig) -> Option<String> {
    let trained = c.trained_context()?;
    (seq_len > trained).then(|| {
        format!(
            "data.seq_len = {seq_len} is past the {trained} positions the model was trained \
             for (config.json: max_position_embeddings = {}{}): rows longer than that train \
             on positions the base never saw; to extend the context, give the model a \
             rope_scaling block (e.g. yarn) first",
            c.max_position_embeddings,
            match c.rope().map(|r| r.scaling.name()) {
                Ok("default") | Err(_) => String::new(),
                Ok(name) => format!(", rope_scaling {name}"),
            }
        )
    })
}

/// The largest micro-batch at the configured `seq_len` and the largest `seq_len` at
/// the micro-batch of `shape` that fit `usable` bytes, with nothing kept.
fn largest_shapes(
    cfg: &RunConfig,
    spec: &MemorySpec,
    shape: &StepShape,
    usable: u64,
    c: &ModelConfig,
) -> String {
    let (seq, auto) = (spec.seq, cfg.data.batch_size_is_auto());
    let mut t = String::new();
    let max_rows = 1 << 16;
    match memory::largest_batch(spec, usable, max_rows) {
        Some(b) => {
            t += &format!(
                "largest micro-batch at seq_len {seq}: {}{b} rows{}\n",
                if b == max_rows { "at least " } else { "" },
                if auto {
                    String::new()
                } else {
                    format!(" (data.batch_size = {})", cfg.data.batch_size)
                }
            )
        }
        None => {
            t += &format!(
                "not even one row of {seq} tokens fits: lower data.seq_len or lora.targets\n"
            )
        }
    }
    let max_seq = c.max_position_embeddings.max(2);
    match memory::largest_seq(spec, usable, max_seq) {
        Some(s) => {
            t += &format!(
                "largest seq_len at {} rows: {s} tokens{}\n",
                shape.micro_rows,
                if s == max_seq {
                    " (the model's max_position_embeddings)"
                } else {
                    ""
                }
            )
        }
        None => {
            t += &format!(
                "no seq_len fits at {} rows: lower data.batch_size or lora.targets\n",
                shape.micro_rows
            )
        }
    }
    t
}

fn hours(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// The throughput estimate and the wall time of the budget (or of `epochs` epochs,
/// which needs the `epoch` count).
pub fn time_estimate(
    cfg: &RunConfig,
    r: &MemoryReport,
    epoch: Option<&EpochTokens>,
    epochs: Option<f64>,
) -> Result<String, SizingError> {
    let mut t = String::new();
    let Some(spec) = r.gpu.spec else {
        t += "throughput: no estimate (this GPU is not in qtrain's table)\n";
        return Ok(t);
    };
    let e = memory::throughput_estimate(&r.spec, spec);
    let tps = e.tokens_per_s;
    t += &format!("throughput: ~{tps:.0} tokens/s ({})\n", e.basis);
    let predicted = r.spec.predict();
    if predicted.transfer_bytes > 0 {
        // The copies run beside the compute; only what the compute cannot hide
        // costs time (estimated per pass, as both scale with the layers).
        let compute = (r.shape.micro_rows * r.spec.seq) as f64 / tps;
        let rate = memory::host_link_bytes_per_s(Some(spec));
        let link = predicted.transfer_seconds_at(rate);
        t += &format!(
            "offload: ~{link:.2} s of host-link copies per pass against ~{compute:.2} s of \
             compute: {} (estimate, {:.0} GB/s assumed for the {})\n",
            if link <= compute {
                "hidden behind the compute".to_string()
            } else {
                format!("~{:.2} s exposed per pass", link - compute)
            },
            rate / 1e9,
            spec.key
        );
    }
    if r.spec.model.num_parameters() < 1_000_000_000 {
        t += "note:  the estimate scales by FLOPs; a model this small is bound by kernel \
              launches and host work instead: expect far less\n";
    }
    let per_step = (r.shape.rows_per_step() * r.spec.seq) as f64;
    if let Some(ep) = epoch {
        t += &format!(
            "dataset: {:.2}M tokens per epoch ({:.2}M trained; counted in {:.1}s)\n",
            ep.tokens as f64 / 1e6,
            ep.trained as f64 / 1e6,
            ep.took.as_secs_f64()
        );
    }
    let epochs_of = |tokens: f64| match epoch {
        Some(ep) if ep.tokens > 0 => format!(", {:.2} epochs", tokens / ep.tokens as f64),
        _ => String::new(),
    };
    if let Some(n) = epochs {
        let Some(ep) = epoch else {
            return Err(SizingError::EpochsNeedData);
        };
        let tokens = n * ep.tokens as f64;
        t += &format!(
            "{n} epochs: {:.2}M tokens, ~{:.0} optimizer steps, ~{}\n",
            tokens / 1e6,
            tokens / per_step,
            hours(tokens / tps)
        );
        return Ok(t);
    }
    match cfg.budget_kind() {
        Some(Budget::Steps(s)) => {
            let tokens = s as f64 * per_step;
            t += &format!(
                "budget: {s} optimizer steps = {:.2}M tokens{}, ~{}\n",
                tokens / 1e6,
                epochs_of(tokens),
                hours(tokens / tps)
            );
        }
        Some(Budget::Time(d)) => {
            let tokens = tps * d.as_secs_f64();
            t += &format!(
                "budget: {} -> ~{:.2}M tokens, ~{:.0} optimizer steps{}\n",
                hours(d.as_secs_f64()),
                tokens / 1e6,
                tokens / per_step,
                epochs_of(tokens)
            );
        }
        None => t += "budget: none set (qtrain run defaults to 100 steps)\n",
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, sets: &[&str]) -> RunConfig {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../configs")
            .join(name);
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::load(&p, &sets).unwrap()
    }

    fn shape_of(preset: &str) -> ModelShape {
        ModelShape {
            config: ModelConfig::preset(preset, 0).unwrap(),
            dir: None,
            source: "test".into(),
        }
    }

    #[test]
    fn hub_ids_map_to_preset_shapes() {
        assert_eq!(
            preset_for_id("mistralai/Mistral-7B-v0.3"),
            Some("mistral-7b-v0.3")
        );
        assert_eq!(
            preset_for_id("mistralai/Mistral-7B-Instruct-v0.3@main"),
            Some("mistral-7b-v0.3")
        );
        assert_eq!(
            preset_for_id("meta-llama/Llama-2-7b-hf"),
            Some("llama-2-7b")
        );
        assert_eq!(
            preset_for_id("meta-llama/Meta-Llama-3-8B"),
            Some("llama-3-8b")
        );
        assert_eq!(
            preset_for_id("Unbabel/TowerInstruct-13B-v0.1"),
            Some("llama-2-13b")
        );
        assert_eq!(
            preset_for_id("Unbabel/TowerInstruct-7B-v0.2"),
            Some("llama-2-7b")
        );
        assert_eq!(
            preset_for_id("Qwen/Qwen2.5-7B-Instruct"),
            Some("qwen2.5-7b")
        );
        assert_eq!(
            preset_for_id("meta-llama/Llama-3.1-8B-Instruct"),
            Some("llama-3.1-8b")
        );
        assert_eq!(preset_for_id("someone/other-model"), None);
    }

    #[test]
    fn a10_plan_of_the_shipped_config() {
        let cfg = config("a10.toml", &[]);
        let g = GpuInfo::from_preset(gpu::preset("a10").unwrap());
        let r = memory_report(
            &cfg,
            "configs/a10.toml",
            &g,
            &shape_of("mistral-7b-v0.3"),
            0.9,
        )
        .unwrap();
        assert!(r.text.contains("fits"), "{}", r.text);
        assert!(
            r.text.contains("workspace: gradient checkpoints"),
            "{}",
            r.text
        );
        assert!(
            r.text.contains("largest micro-batch at seq_len 512"),
            "{}",
            r.text
        );
        assert_eq!(r.shape.micro_rows, 8);
        assert_eq!(r.shape.rows_per_step(), 32);
        let time = time_estimate(&cfg, &r, None, None).unwrap();
        assert!(
            time.contains("throughput") && time.contains("budget: 8h00m"),
            "{time}"
        );
        // A T4 trains the same config in fp16 with the fused engine: bf16 is refused.
        let t4 = GpuInfo::from_preset(gpu::preset("t4").unwrap());
        let e = memory_report(&cfg, "a10.toml", &t4, &shape_of("mistral-7b-v0.3"), 0.9)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("model.dtype") && e.contains("T4"), "{e}");
        let auto = config("a10.toml", &["model.dtype=auto"]);
        let r = memory_report(&auto, "a10.toml", &t4, &shape_of("mistral-7b-v0.3"), 0.9).unwrap();
        assert!(
            r.text.contains("fp16 with dynamic loss scaling"),
            "{}",
            r.text
        );
        assert!(
            r.text.contains("workspace: gradient checkpoints")
                && !r.text.contains("warning: the reference"),
            "{}",
            r.text
        );
        assert_eq!(r.spec.dtype, candle_core::DType::F16);
        let p100 = GpuInfo::from_preset(gpu::preset("p100").unwrap());
        let e = memory_report(&auto, "a10.toml", &p100, &shape_of("mistral-7b-v0.3"), 0.9)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not supported") && e.contains("P100"), "{e}");
    }

    /// The shipped T4 config: fp16 with the fused engine, and it fits 16 GB.
    #[test]
    fn plan_warns_when_rows_run_past_the_trained_context() {
        let g = GpuInfo::from_preset(gpu::preset("h100").unwrap());
        let plan = |seq: &str, preset: &str| {
            let cfg = config(
                "a10.toml",
                &[&format!("data.seq_len={seq}"), "data.batch_size=1"],
            );
            memory_report(&cfg, "configs/a10.toml", &g, &shape_of(preset), 0.9)
                .unwrap()
                .text
        };
        let long = plan("65536", "mistral-7b-v0.3");
        assert!(
            long.contains("warning: data.seq_len = 65536 is past the 32768 positions"),
            "{long}"
        );
        assert!(!plan("32768", "mistral-7b-v0.3").contains("warning: data.seq_len"));
        // Llama 3.1's 128k context covers 64k rows.
        assert!(!plan("65536", "llama-3.1-8b").contains("warning: data.seq_len"));
    }

    #[test]
    fn t4_plan_of_the_shipped_config() {
        let cfg = config("t4.toml", &[]);
        let t4 = GpuInfo::from_preset(gpu::preset("t4").unwrap());
        let r = memory_report(
            &cfg,
            "configs/t4.toml",
            &t4,
            &shape_of("mistral-7b-v0.3"),
            0.9,
        )
        .unwrap();
        assert_eq!(r.spec.dtype, candle_core::DType::F16);
        assert_eq!(r.spec.engine, EngineKind::Fused);
        assert!(
            r.text.contains("fits") && !r.text.contains("DOES NOT FIT"),
            "{}",
            r.text
        );
        assert!(
            r.text.contains("fp16 with dynamic loss scaling"),
            "{}",
            r.text
        );
        assert_eq!(r.shape.rows_per_step(), 32);
    }

    #[test]
    fn auto_batch_takes_the_largest_micro_batch_that_fits() {
        let cfg = config(
            "a10.toml",
            &[
                "data.batch_size=\"auto\"",
                "train.grad_accum=1",
                "train.effective_batch=256",
            ],
        );
        let m7 = shape_of("mistral-7b-v0.3");
        let a10 = GpuInfo::from_preset(gpu::preset("a10").unwrap());
        let h200 = GpuInfo::from_preset(gpu::preset("h200").unwrap());
        let small = memory_report(&cfg, "a10", &a10, &m7, 0.9).unwrap().shape;
        let big = memory_report(&cfg, "h200", &h200, &m7, 0.9).unwrap().shape;
        assert_eq!((small.rows_per_step(), big.rows_per_step()), (256, 256));
        // The A10 takes 8 x 512 and more, but not all 256 rows at once; the H200 does.
        assert!(
            small.micro_rows >= 8 && small.passes_per_step() > 1,
            "{small:?}"
        );
        assert_eq!((big.micro_rows, big.passes_per_step()), (256, 1), "{big:?}");
        // The chosen micro-batch fits, one more row would not (searched keeping
        // nothing, with the checkpoints on the GPU); the run's spec, which then
        // keeps what fits (offloading the checkpoints where that keeps more), fits.
        let a10_usable = memory::usable(a10.total_bytes, 0.9);
        let r = memory_report(&cfg, "a10", &a10, &m7, 0.9).unwrap();
        assert!(r.spec.predict().fits(a10_usable));
        let mut searched = memory::with_offload(&r.spec, false);
        memory::KeptActivations::default().apply(&mut searched.engine_options);
        assert!(searched.predict().fits(a10_usable));
        assert!(!searched
            .with_shape(small.micro_rows + 1, 512)
            .predict()
            .fits(a10_usable));
    }
}
