//! `qtrain plan`: what a run config needs on a GPU, before renting one. The flags
//! and the printing; the report is [`qtrain_train::sizing`]'s: the memory model's
//! breakdown against the GPU's memory with headroom, the largest micro-batch and
//! sequence length that fit, and the estimated throughput and wall time.
//!
//! Only `config.json` of the model is read (from a local directory, the hub cache,
//! or a built-in preset's shape); the weights are never loaded or downloaded. The
//! dataset is tokenized once to count its tokens per epoch when the model's
//! tokenizer is available locally (`--no-data` skips it).

use anyhow::{bail, Result};
use qtrain_train::gpu::{self, GpuInfo};
use qtrain_train::memory;
use qtrain_train::{sizing, RunConfig};
use std::path::{Path, PathBuf};

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
    /// Share of the GPU's memory the run may use (the rest is headroom).
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
        None => sizing::detect_gpu(&cfg)?,
    };
    let cache = qtrain_model::bnb::default_cache_root();
    let model = sizing::model_shape(&cfg.model.path, &cache)?;
    let report = sizing::memory_report(&cfg, &label, &gpu, &model, a.headroom)?;
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
        (Some(dir), false) => match sizing::count_epoch(&cfg, &report.shape, dir) {
            Ok(e) => Some(e),
            Err(e) => {
                println!("dataset: not counted ({e:#})");
                None
            }
        },
    };
    print!(
        "{}",
        sizing::time_estimate(&cfg, &report, epoch.as_ref(), a.epochs)?
    );
    Ok(())
}
