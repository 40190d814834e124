//! `qtrain run`: train LoRA adapters within a time budget.

use anyhow::{Context, Result};
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
}

pub fn run(a: Args) -> Result<()> {
    let overrides = a.set.clone();
    let cfg = match &a.config {
        Some(path) => load_with_budget(path, None, &overrides, &a)?,
        None => load_with_budget(
            Path::new("configs/tiny-cpu.toml (built in)"),
            Some(DEFAULT_CONFIG),
            &overrides,
            &a,
        )?,
    };
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
