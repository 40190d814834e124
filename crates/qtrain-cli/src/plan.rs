//! `qtrain plan`: what a run config needs on a GPU, before renting one. Prints the
//! memory model's breakdown ([`qtrain_train::memory`]), the total against the GPU's
//! memory with headroom, the largest micro-batch and sequence length that fit, and
//! the estimated throughput and wall time ([`qtrain_train::throughput`]).
//!
//! Only `config.json` of the model is read (from a local directory, the hub cache,
//! or a built-in preset's shape); the weights are never loaded or downloaded. The
//! dataset is tokenized once to count its tokens per epoch when the model's
//! tokenizer is available locally (`--no-data` skips it).

use anyhow::{bail, Context, Result};
use qtrain_model::ModelConfig;
use qtrain_train::backend::EngineChoice;
use qtrain_train::gpu::{self, GpuInfo};
use qtrain_train::memory::{self, mib, EngineKind, MemorySpec};
use qtrain_train::micro::StepShape;
use qtrain_train::{Budget, RunConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The built-in tiny CPU demo, as `qtrain run` uses it without --config.
const DEFAULT_CONFIG: &str = include_str!("../../../configs/tiny-cpu.toml");

#[derive(clap::Args)]
pub struct Args {
    /// Run config (TOML; see configs/). Without it: the built-in tiny CPU demo.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The GPU to plan for: a10, a10g, rtx4080, rtx4090, a100-40, a100-80, h100,
    /// h200, v100-16, v100-32, t4 (p100 shows the refusal). Default: the GPU this
    /// machine has (CUDA builds).
    #[arg(long, value_name = "NAME")]
    gpu: Option<String>,
    /// Override a config value, e.g. `--set data.seq_len=2048` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Share of the GPU's memory the plan may use (the rest is headroom).
    #[arg(long, default_value_t = memory::DEFAULT_HEADROOM)]
    headroom: f64,
    /// Estimate the wall time of this many epochs of the dataset instead of the
    /// configured budget.
    #[arg(long)]
    epochs: Option<f64>,
    /// Do not tokenize the dataset to count its tokens.
    #[arg(long)]
    no_data: bool,
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
pub fn model_shape(path: &str, cache_root: &Path) -> Result<ModelShape> {
    if let Some(spec) = path.strip_prefix("builtin:") {
        let preset = spec.split_once('@').map_or(spec, |(p, _)| p);
        let vocab = qtrain_data::tiny_tokenizer::build_tiny_tokenizer().get_vocab_size(true);
        let config = ModelConfig::preset(preset, vocab)?;
        // The tiny presets are generated in a moment (and carry the tokenizer);
        // the 7B ones only if they already exist.
        let dir = if preset.starts_with("tiny") {
            Some(qtrain_train::models::resolve(path, cache_root)?)
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
        None => bail!(
            "model.path `{path}`: not a local directory and not in the hub cache ({}); qtrain \
             plan needs only its config.json: download that (e.g. `huggingface-cli download \
             {path} config.json tokenizer.json tokenizer_config.json`) or point model.path at \
             a directory holding it",
            qtrain_model::hub::hub_cache_dir().display()
        ),
    }
}

/// The preset whose shape a hub id has, by its name.
fn preset_for_id(id: &str) -> Option<&'static str> {
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
    qtrain_model::PRESETS.iter().copied().find(|p| *p == n)
}

/// Tokens the trainer processes in one epoch of the training split (rows x
/// seq_len, padding included, as tokens/s counts them) and the trained ones.
pub struct EpochTokens {
    pub tokens: u64,
    pub trained: u64,
    pub took: Duration,
}

fn count_epoch(cfg: &RunConfig, shape: &StepShape, dir: &Path) -> Result<EpochTokens> {
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

pub fn run(a: Args) -> Result<()> {
    if !(a.headroom > 0.0 && a.headroom <= 1.0) {
        bail!("--headroom {}: must be in (0, 1]", a.headroom);
    }
    let (label, cfg) = match &a.config {
        Some(p) => (p.display().to_string(), RunConfig::load(p, &a.set)?),
        None => (
            "configs/tiny-cpu.toml (built in)".to_string(),
            RunConfig::from_toml_str(DEFAULT_CONFIG, Path::new("configs/tiny-cpu.toml"), &a.set)?,
        ),
    };
    let gpu = match &a.gpu {
        Some(name) => GpuInfo::from_preset(gpu::preset(name)?),
        None => detect(&cfg)?,
    };
    let cache = qtrain_model::bnb::default_cache_root();
    let model = model_shape(&cfg.model.path, &cache)?;
    let report = report(&cfg, &label, &gpu, &model, a.headroom)?;
    print!("{}", report.text);
    let epoch = match (&model.dir, a.no_data) {
        (_, true) => None,
        (None, false) => {
            println!(
                "dataset: not counted (the model's tokenizer is not available locally; \
                 --epochs needs it)"
            );
            None
        }
        (Some(dir), false) => match count_epoch(&cfg, &report.shape, dir) {
            Ok(e) => Some(e),
            Err(e) => {
                println!("dataset: not counted ({e:#})");
                None
            }
        },
    };
    print!(
        "{}",
        time_estimate(&cfg, &report, epoch.as_ref(), a.epochs)?
    );
    Ok(())
}

/// The GPU this machine has (model.device's ordinal), or the error telling to pass
/// --gpu.
fn detect(cfg: &RunConfig) -> Result<GpuInfo> {
    let hint = format!(
        "pass --gpu NAME (one of {})",
        gpu::GPUS
            .iter()
            .map(|g| g.key)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !candle_core::utils::cuda_is_available() {
        bail!("no GPU detected (this qtrain was built without CUDA); {hint}");
    }
    let spec = if cfg.model.device.starts_with("cuda") {
        cfg.model.device.as_str()
    } else {
        "cuda"
    };
    let device =
        qtrain_train::models::device(spec).with_context(|| format!("no GPU detected; {hint}"))?;
    gpu::detect(&device)?.with_context(|| format!("no GPU detected; {hint}"))
}

/// The memory part of the report, and what the time estimate needs.
pub struct Report {
    pub text: String,
    pub shape: StepShape,
    pub spec: MemorySpec,
    pub gpu: GpuInfo,
}

/// Everything `qtrain plan` prints about memory, for `cfg` on `gpu`.
pub fn report(
    cfg: &RunConfig,
    label: &str,
    gpu: &GpuInfo,
    model: &ModelShape,
    headroom: f64,
) -> Result<Report> {
    let precision = gpu.precision()?;
    let dtype = gpu::dtype_for(&cfg.model.dtype, gpu)?;
    let choice = EngineChoice::parse(&cfg.train.engine).unwrap_or(EngineChoice::Auto);
    let fused = choice.is_fused(true, dtype);
    if fused && !matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16) {
        bail!(
            "train.engine = \"fused\" computes in bf16 or fp16 on GPUs; {} trains in {:?} here: \
             use train.engine = \"auto\" or \"reference\"",
            gpu.name,
            dtype
        );
    }
    let engine = if fused {
        EngineKind::Fused
    } else {
        EngineKind::Reference
    };
    let usable = memory::usable(gpu.total_bytes, headroom);
    let seq = cfg.data.seq_len;
    let cc = Some(gpu.compute_capability);
    let spec0 = MemorySpec::for_run(cfg, &model.config, dtype, engine, 1, seq, cc);
    let fits_rows = |m: usize| spec0.with_shape(m, seq).plan().fits(usable);
    let auto = cfg.data.batch_size_is_auto();
    let shape = match StepShape::resolve(cfg, None, |max| memory::largest_fitting(max, fits_rows)) {
        Ok(s) => s,
        // Nothing fits: report the one-row plan so the table shows why.
        Err(_) if auto => StepShape {
            data_rows: cfg.train.effective_batch.unwrap_or(1),
            data_batches: 1,
            micro_rows: 1,
        },
        Err(e) => return Err(e.into()),
    };
    let mut spec = spec0.with_shape(shape.micro_rows, seq);
    // What train.keep_attention_residuals and train.keep_mlp_activations decide for
    // this micro-batch (the trainer decides through the same function).
    let kept = memory::kept_activations(
        &cfg.train.keep_attention_residuals,
        &cfg.train.keep_mlp_activations,
        &spec,
        Some(usable),
        None,
    );
    kept.apply(&mut spec.engine_options);
    let plan = spec.plan();
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
        plan.lora_params as f64 / 1e6,
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
            "recompute: {}; {} (train.keep_attention_residuals = {}, train.keep_mlp_activations = {})\n",
            if kept.attention_residuals {
                "attention residuals kept, no o projection"
            } else {
                "the whole attention half"
            },
            if kept.mlp {
                "gate/up outputs kept, no gate/up product"
            } else {
                "the gate/up product"
            },
            cfg.train.keep_attention_residuals,
            cfg.train.keep_mlp_activations
        );
    }
    if cfg.model.device == "cpu" {
        t +=
            "note:  model.device = \"cpu\" in this config; the plan is for running it on the GPU\n";
    }
    t += "\n";
    t += &plan.table();
    let total = plan.total();
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
    for w in &plan.warnings {
        t += &format!("warning: {w}\n");
    }
    let max_rows = 1 << 16;
    // The searches keep the micro-batch first, as `auto` does (nothing kept).
    memory::KeptActivations::default().apply(&mut spec.engine_options);
    match memory::largest_batch(&spec, usable, max_rows) {
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
    match memory::largest_seq(&spec, usable, max_seq) {
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
    // The report's spec is the run's: with the activations it keeps.
    kept.apply(&mut spec.engine_options);
    Ok(Report {
        text: t,
        shape,
        spec,
        gpu: gpu.clone(),
    })
}

fn hours(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// The throughput estimate and the wall time of the budget (or of `epochs`).
pub fn time_estimate(
    cfg: &RunConfig,
    r: &Report,
    epoch: Option<&EpochTokens>,
    epochs: Option<f64>,
) -> Result<String> {
    let mut t = String::new();
    let Some(spec) = r.gpu.spec else {
        t += "throughput: no estimate (this GPU is not in qtrain's table)\n";
        return Ok(t);
    };
    let e = qtrain_train::throughput::estimate(
        &r.spec.model,
        &r.spec.targets,
        r.spec.engine,
        r.spec.seq,
        r.spec.engine_options.save_mlp_activations,
        spec,
    );
    let tps = e.tokens_per_s;
    t += &format!("throughput: ~{tps:.0} tokens/s ({})\n", e.basis);
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
            bail!("--epochs needs the dataset's token count (drop --no-data; the model's tokenizer must be local)");
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
        assert_eq!(preset_for_id("someone/other-model"), None);
    }

    #[test]
    fn a10_plan_of_the_shipped_config() {
        let cfg = config("a10.toml", &[]);
        let g = GpuInfo::from_preset(gpu::preset("a10").unwrap());
        let r = report(
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
        let e = report(&cfg, "a10.toml", &t4, &shape_of("mistral-7b-v0.3"), 0.9)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("model.dtype") && e.contains("T4"), "{e}");
        let auto = config("a10.toml", &["model.dtype=auto"]);
        let r = report(&auto, "a10.toml", &t4, &shape_of("mistral-7b-v0.3"), 0.9).unwrap();
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
        let e = report(&auto, "a10.toml", &p100, &shape_of("mistral-7b-v0.3"), 0.9)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not supported") && e.contains("P100"), "{e}");
    }

    /// The shipped T4 config: fp16 with the fused engine, and it fits 16 GB.
    #[test]
    fn t4_plan_of_the_shipped_config() {
        let cfg = config("t4.toml", &[]);
        let t4 = GpuInfo::from_preset(gpu::preset("t4").unwrap());
        let r = report(
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
        let small = report(&cfg, "a10", &a10, &m7, 0.9).unwrap().shape;
        let big = report(&cfg, "h200", &h200, &m7, 0.9).unwrap().shape;
        assert_eq!((small.rows_per_step(), big.rows_per_step()), (256, 256));
        // The A10 takes 8 x 512 and more, but not all 256 rows at once; the H200 does.
        assert!(
            small.micro_rows >= 8 && small.passes_per_step() > 1,
            "{small:?}"
        );
        assert_eq!((big.micro_rows, big.passes_per_step()), (256, 1), "{big:?}");
        // The chosen micro-batch fits, one more row would not.
        let a10_usable = memory::usable(a10.total_bytes, 0.9);
        let r = report(&cfg, "a10", &a10, &m7, 0.9).unwrap();
        assert!(r.spec.plan().fits(a10_usable));
        assert!(!r
            .spec
            .with_shape(small.micro_rows + 1, 512)
            .plan()
            .fits(a10_usable));
    }
}
