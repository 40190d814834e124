//! `qtrain run`: train LoRA adapters within a time budget.

use anyhow::{bail, Context, Result};
use qtrain_dist::{DeviceSelection, LaunchSpec};
use qtrain_train::trainer::{self, Resume, RunOptions};
use qtrain_train::RunConfig;
use std::path::{Path, PathBuf};

/// The embedded default: the tiny CPU demo, so `qtrain run` works on a fresh machine.
const DEFAULT_CONFIG: &str = include_str!("../../../configs/tiny-cpu.toml");

#[derive(clap::Args)]
pub struct Args {
    /// Run config (TOML; see configs/). Without it: the built-in tiny CPU demo
    /// (configs/tiny-cpu.toml, embedded in the binary).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Wall-clock budget in hours: the planner fits the steps (and the LR schedule)
    /// into it, ending with a checkpoint and the exported adapter.
    #[arg(long, group = "budget")]
    hours: Option<f64>,
    /// Wall-clock budget in minutes.
    #[arg(long, group = "budget")]
    minutes: Option<f64>,
    /// A fixed number of optimizer steps instead of a time budget.
    #[arg(long, group = "budget")]
    steps: Option<u64>,
    /// Continue from a checkpoint: the newest one in the output directory, or DIR.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CKPT_DIR")]
    resume: Option<String>,
    /// Override a config value, e.g. `--set optimizer.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Save a checkpoint and stop after this step without changing the plan
    /// (for preemptible machines; resume with --resume).
    #[arg(long, value_name = "STEP")]
    stop_at_step: Option<u64>,
    /// Train data-parallel on the first N GPUs: one worker process per GPU, started
    /// and supervised by this one (needs the CUDA build). Ignored in a worker
    /// started by a launcher (RANK set, as torchrun does).
    #[arg(long, value_name = "N", conflicts_with = "devices")]
    gpus: Option<usize>,
    /// Like --gpus, on these devices (numbered as CUDA numbers them, i.e. within
    /// CUDA_VISIBLE_DEVICES if set), e.g. `--devices 0,2`. One device: train on it.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    devices: Option<Vec<usize>>,
}

/// The data-parallel group of this process: NCCL between the workers a launcher
/// started (rank 0 serves the NCCL id at MASTER_ADDR:MASTER_PORT), or this process
/// alone.
fn collective(
    world: Option<&qtrain_dist::WorldEnv>,
    cfg: &RunConfig,
) -> Result<std::sync::Arc<dyn qtrain_dist::Collective>> {
    let Some(w) = world.filter(|w| w.is_distributed()) else {
        return Ok(std::sync::Arc::new(qtrain_dist::SingleProcess));
    };
    #[cfg(feature = "cuda")]
    {
        let device = qtrain_train::models::device(&cfg.model.device)?;
        let stream = device
            .as_cuda_device()
            .context("data-parallel workers compute on a CUDA device")?
            .cuda_stream();
        let nccl = qtrain_dist::Nccl::init(w, stream, &qtrain_dist::NcclOptions::default())
            .with_context(|| format!("rank {} of {}: NCCL init", w.rank, w.world_size))?;
        Ok(std::sync::Arc::new(nccl))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = cfg;
        bail!(
            "rank {} of {}: data-parallel workers need the CUDA build (NCCL); this qtrain was built for the CPU",
            w.rank,
            w.world_size
        )
    }
}

pub fn run(a: Args) -> Result<()> {
    // A launcher's variables (RANK, WORLD_SIZE, ...) make this process a worker;
    // without them, --gpus/--devices > 1 make it the supervisor of the workers.
    let world = qtrain_dist::WorldEnv::from_env()?;
    let selection = match (a.gpus, &a.devices) {
        (Some(n), _) => Some(DeviceSelection::Count(n)),
        (None, Some(list)) => Some(DeviceSelection::List(list.clone())),
        (None, None) => None,
    };
    if selection.as_ref().is_some_and(DeviceSelection::is_empty) {
        bail!("--gpus must be at least 1 and --devices must list a device");
    }
    let supervise = world.is_none() && selection.as_ref().is_some_and(|s| s.len() > 1);
    if supervise && !cfg!(feature = "cuda") {
        bail!(
            "multi-GPU training needs the CUDA build (cargo build --release --features cuda); \
             this qtrain was built for the CPU"
        );
    }
    let mut overrides = a.set.clone();
    match (&world, &selection) {
        // A worker computes on cuda:LOCAL_RANK (see qtrain_dist::env).
        (Some(w), _) if w.is_distributed() => {
            overrides.push(format!("model.device=cuda:{}", w.cuda_ordinal()))
        }
        (None, Some(DeviceSelection::List(list))) if list.len() == 1 => {
            overrides.push(format!("model.device=cuda:{}", list[0]))
        }
        _ => {}
    }
    let cfg = match &a.config {
        Some(path) => load_with_budget(path, None, &overrides, &a)?,
        None => load_with_budget(
            Path::new("configs/tiny-cpu.toml (built in)"),
            Some(DEFAULT_CONFIG),
            &overrides,
            &a,
        )?,
    };
    if supervise {
        // The config is checked once here, before any worker starts.
        return supervise_workers(selection.as_ref().expect("selection"));
    }
    let collective = collective(world.as_ref(), &cfg)?;
    let stop = qtrain_train::signals::install_handler()
        .context("installing the SIGINT/SIGTERM handler")?;
    let resume = a.resume.as_deref().map(|r| match r {
        "latest" => Resume::Latest,
        dir => Resume::Dir(PathBuf::from(dir)),
    });
    let out_dir = cfg.checkpoint.output_dir.clone();
    let summary = trainer::run(RunOptions {
        config: cfg,
        resume,
        clock: Box::new(qtrain_train::SystemClock::new()),
        stop: stop.flag(),
        halt_at_step: a.stop_at_step,
        cache_root: qtrain_model::bnb::default_cache_root(),
        collective,
        engine_memory_limit: None,
    })?;

    println!();
    println!(
        "trained {} steps ({:.2}M tokens) in {:.0}s{}",
        summary.steps,
        summary.tokens as f64 / 1e6,
        summary.elapsed.as_secs_f64(),
        if summary.stopped_by_signal {
            " (stopped by signal)"
        } else {
            ""
        }
    );
    if let (Some(a), Some(b)) = (summary.first_eval_loss, summary.final_eval_loss) {
        println!("eval loss: {a:.4} before training -> {b:.4} after");
    }
    if !summary.samples.is_empty() && summary.samples.iter().any(|s| !s.after.is_empty()) {
        let right = summary
            .samples
            .iter()
            .filter(|s| s.after == s.reference.trim())
            .count();
        println!(
            "held-out answers ({right}/{} right after training):",
            summary.samples.len()
        );
        for s in &summary.samples {
            println!("  prompt:    {}", s.prompt.replace('\n', " "));
            println!("  reference: {}", s.reference);
            if !s.before.is_empty() {
                println!("  before:    {}", s.before);
            }
            println!("  after:     {}", s.after);
        }
    }
    println!("checkpoint:   {}", summary.checkpoint.display());
    println!("PEFT adapter: {}", summary.adapter_dir.display());
    println!("metrics:      {}", out_dir.join("metrics.jsonl").display());
    Ok(())
}

/// Starts one worker per selected GPU (this binary, same arguments, with the
/// launcher variables set) and waits for them; see `qtrain_dist::launch`.
fn supervise_workers(selection: &DeviceSelection) -> Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let spec = LaunchSpec::current_exe(args, selection)?;
    let report = qtrain_dist::launch_local(&spec)?;
    match report.forwarded_signal {
        Some(sig) => println!(
            "{} workers stopped after signal {sig}",
            report.statuses.len()
        ),
        None => println!("{} workers finished", report.statuses.len()),
    }
    Ok(())
}

/// Reads the config (file or embedded text) with the CLI's budget flags applied.
fn load_with_budget(
    path: &Path,
    text: Option<&str>,
    sets: &[String],
    a: &Args,
) -> Result<RunConfig> {
    let mut overrides = sets.to_vec();
    // A budget flag replaces whatever budget the file sets.
    let budget = if let Some(h) = a.hours {
        Some(format!("hours={h}"))
    } else if let Some(m) = a.minutes {
        Some(format!("minutes={m}"))
    } else {
        a.steps.map(|s| format!("steps={s}"))
    };
    let text = match text {
        Some(t) => t.to_string(),
        None => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
    };
    let text = match &budget {
        Some(b) => {
            let mut table: toml::Table =
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            let section = table
                .entry("budget")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .with_context(|| format!("{}: `budget` must be a table", path.display()))?;
            for k in ["hours", "minutes", "steps"] {
                section.remove(k);
            }
            let (k, v) = b.split_once('=').expect("key=value");
            section.insert(
                k.into(),
                toml::from_str::<toml::Table>(&format!("v = {v}"))?
                    .remove("v")
                    .expect("v"),
            );
            overrides.retain(|o| {
                !["budget.hours", "budget.minutes", "budget.steps"]
                    .iter()
                    .any(|b| o.starts_with(b))
            });
            toml::to_string(&table)?
        }
        None => text,
    };
    Ok(RunConfig::from_toml_str(&text, path, &overrides)?)
}
