//! `qtrain run`: train LoRA adapters within a time budget.

use anyhow::{bail, Context, Result};
use qtrain_dist::{DeviceSelection, LaunchSpec};
use qtrain_train::config::{BudgetFlag, MAX_BUDGET_HOURS};
use qtrain_train::trainer::{self, Resume, RunOptions, RunSummary};
use qtrain_train::RunConfig;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    #[arg(long, group = "budget", allow_negative_numbers = true)]
    hours: Option<f64>,
    /// Wall-clock budget in minutes.
    #[arg(long, group = "budget", allow_negative_numbers = true)]
    minutes: Option<f64>,
    /// A fixed number of optimizer steps instead of a time budget.
    #[arg(long, group = "budget")]
    steps: Option<u64>,
    /// Output directory (checkpoints, metrics, adapter); overrides
    /// checkpoint.output_dir.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue from a checkpoint: the newest complete one in the output directory,
    /// or DIR.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CKPT_DIR")]
    resume: Option<String>,
    /// Start a new run in an output directory that holds an earlier run's
    /// checkpoints, removing them (and its metrics and adapter).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Resume although the data files changed since the checkpoint (the run then
    /// continues on the changed data).
    #[arg(long)]
    allow_data_change: bool,
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

/// Trains; returns the process's exit status (0, or 128 + the signal that stopped
/// the run).
pub fn run(a: Args, started: Instant) -> Result<i32> {
    let budget = budget_flag(&a)?;
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
    if let Some(out) = &a.out {
        overrides.push(format!(
            "checkpoint.output_dir={}",
            toml::Value::String(out.to_string_lossy().into_owned())
        ));
    }
    let cfg = match &a.config {
        Some(path) => load_config(path, None, &overrides, budget)?,
        None => load_config(
            Path::new("configs/tiny-cpu.toml (built in)"),
            Some(DEFAULT_CONFIG),
            &overrides,
            budget,
        )?,
    };
    if supervise {
        // The config is checked once here, before any worker starts.
        supervise_workers(selection.as_ref().expect("selection"))?;
        return Ok(0);
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
        resume,
        clock: Box::new(qtrain_train::SystemClock::since(started)),
        stop: stop.flag(),
        halt_at_step: a.stop_at_step,
        collective,
        overwrite: a.overwrite,
        allow_data_change: a.allow_data_change,
        ..RunOptions::new(cfg, qtrain_model::bnb::default_cache_root())
    })?;
    if summary.already_finished {
        println!(
            "nothing to do: {} is the last checkpoint of a finished run (step {}, {:.0}s); its \
             adapter is in {}. To train further, resume with a larger budget (--steps, \
             --minutes or --hours).",
            summary.checkpoint.display(),
            summary.steps,
            summary.elapsed.as_secs_f64(),
            summary.adapter_dir.display()
        );
        return Ok(0);
    }
    report(&summary, &out_dir);
    // SIGTERM when the stop came from elsewhere (another rank's signal).
    let signal = summary
        .stopped_by_signal
        .then(|| qtrain_train::signals::received().unwrap_or(15));
    if signal.is_some() || a.stop_at_step == Some(summary.steps) {
        println!("resume with:  {}", resume_command());
    }
    Ok(signal.map_or(0, qtrain_train::signals::exit_code))
}

/// What the run did, on stdout.
fn report(summary: &RunSummary, out_dir: &Path) {
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
    if let Some(t) = &summary.step_timing {
        println!(
            "step time:    {:.4}s/step, {:.0} tokens/s over {} steps (the first excluded); per \
             step {:.1} ms waiting for data, {:.1} ms of logging",
            t.step_s,
            t.tokens_per_s,
            t.steps,
            t.data_wait_s * 1e3,
            t.bookkeeping_s * 1e3
        );
    }
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
    println!("time:         {}", summary.budget_report);
    println!("checkpoint:   {}", summary.checkpoint.display());
    println!("PEFT adapter: {}", summary.adapter_dir.display());
    println!("metrics:      {}", out_dir.join("metrics.jsonl").display());
}

/// This process's command line with `--resume` (the newest checkpoint) in place of
/// any `--resume [DIR]` or `--overwrite`, quoted for a POSIX shell.
fn resume_command() -> String {
    let args: Vec<String> = std::env::args().collect();
    resume_command_of(&args)
}

fn resume_command_of(args: &[String]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        if a == "--overwrite" || a.starts_with("--resume=") {
            continue;
        }
        if a == "--resume" {
            if it.peek().is_some_and(|n| !n.starts_with('-')) {
                it.next();
            }
            continue;
        }
        out.push(a.clone());
    }
    out.push("--resume".into());
    out.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The budget flag, checked before anything is read: a number a run can use.
fn budget_flag(a: &Args) -> Result<Option<BudgetFlag>> {
    let check = |flag: &str, v: f64, unit: &str, per_hour: f64| -> Result<f64> {
        if v.is_nan() {
            bail!("{flag} {v}: not a number of {unit} (e.g. {flag} 30)");
        }
        if !(v.is_finite() && v > 0.0) {
            bail!("{flag} {v}: the budget must be a positive number of {unit}");
        }
        if v / per_hour > MAX_BUDGET_HOURS {
            bail!(
                "{flag} {v}: longer than a year ({MAX_BUDGET_HOURS} hours); give the time the \
                 run may really take"
            );
        }
        Ok(v)
    };
    Ok(match (a.hours, a.minutes, a.steps) {
        (Some(h), _, _) => Some(BudgetFlag::Hours(check("--hours", h, "hours", 1.0)?)),
        (_, Some(m), _) => Some(BudgetFlag::Minutes(check("--minutes", m, "minutes", 60.0)?)),
        (_, _, Some(0)) => bail!("--steps 0: a run needs at least one step"),
        (_, _, Some(s)) => Some(BudgetFlag::Steps(s)),
        _ => None,
    })
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

/// Reads the config (file or embedded text) with `--set` and the budget flag
/// applied. Errors point into the user's file; a budget flag replaces the file's
/// budget (and any `--set budget.hours/minutes/steps`).
fn load_config(
    path: &Path,
    text: Option<&str>,
    sets: &[String],
    budget: Option<BudgetFlag>,
) -> Result<RunConfig> {
    let mut overrides = sets.to_vec();
    if budget.is_some() {
        overrides.retain(|o| {
            !["budget.hours", "budget.minutes", "budget.steps"]
                .iter()
                .any(|b| o.starts_with(b))
        });
    }
    let text = match text {
        Some(t) => t.to_string(),
        None => std::fs::read_to_string(path)
            .with_context(|| format!("reading the config {}", path.display()))?,
    };
    Ok(RunConfig::from_toml_str_with_budget(
        &text, path, &overrides, budget,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resume_command_is_the_same_command_resuming() {
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(
            resume_command_of(&args("qtrain run --config a.toml --minutes 30 --overwrite")),
            "qtrain run --config a.toml --minutes 30 --resume"
        );
        assert_eq!(
            resume_command_of(&args(
                "qtrain run --resume runs/x/checkpoints/step-00000004 --steps 9"
            )),
            "qtrain run --steps 9 --resume"
        );
        assert_eq!(
            resume_command_of(&["q".into(), "--set".into(), "data.path=my file.jsonl".into()]),
            "q --set 'data.path=my file.jsonl' --resume"
        );
    }
}
