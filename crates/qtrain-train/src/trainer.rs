//! The training run of `qtrain run`, as a recipe: [`run`] reads top to bottom,
//! each stage a method of [`Trainer`] in its own module.
//!
//! ```text
//! setup            inputs checked, budget forecast, base loaded (NF4, through the
//!                  quantized cache), tokenizer, LoRA, optimizer, data, planner
//!                  (resume: the checkpoint's state, what changed, whether it is done)
//! evaluate         eval loss and sample answers before training (fresh runs)
//! loop until the planner (budget), a signal or --stop-at-step says stop:
//!   train_step     grad_accum micro-batches → forward_backward (loss normalized by
//!                  the step's valid tokens) → clip → AdamW
//!   after_step     metrics, periodic evaluation and checkpoint
//! finish           final checkpoint → PEFT adapter → eval loss and sample answers
//!                  → budget accounting
//! ```
//!
//! The LoRA weights' master copy lives on the host in f32 (reference path) or in a
//! flat device buffer (fused path); checkpoints and exports download it.
//!
//! A step's data batches are cut into micro-batches of the rows that fit
//! ([`crate::micro`]: `data.batch_size = "auto"` sizes them with the memory model,
//! an out-of-memory halves them and retries the same rows), and on fp16 GPUs the
//! loss is scaled dynamically ([`crate::loss_scale`]). The whole process keeps to
//! the time budget ([`crate::budget`], [`crate::planner`]).

mod checkpoint;
mod evaluate;
mod finish;
mod resume;
mod setup;
mod step;

pub use crate::error::TrainError;
pub use resume::FileIdentity;

use crate::backend::Backend;
use crate::budget::{Accounting, PhaseCosts, Sizes};
use crate::config::RunConfig;
use crate::error::Result;
use crate::loss_scale::LossScaler;
use crate::metrics::MetricsSink;
use crate::micro::StepShape;
use crate::planner::{Clock, Planner, PlannerState};
use qtrain_data::{BatchStream, DataCursor, DatasetConfig, Encoder};
use qtrain_dist::{Collective, StepSharding};
use qtrain_model::BaseModel;
use qtrain_optim::LrSchedule;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Where to resume from.
#[derive(Debug, Clone)]
pub enum Resume {
    /// The newest complete checkpoint in the run's output directory.
    Latest,
    Dir(PathBuf),
}

/// Everything `run` needs besides the config.
pub struct RunOptions {
    pub config: RunConfig,
    pub resume: Option<Resume>,
    /// Time since the process started (the budget covers the whole process).
    pub clock: Box<dyn Clock>,
    /// Set by SIGINT/SIGTERM: checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Stop (with a checkpoint) once this step is done, without changing the plan:
    /// for preemptible machines, and how the resume test interrupts a run.
    pub halt_at_step: Option<u64>,
    /// Where `builtin:` models, the quantized cache and the timing history live.
    pub cache_root: PathBuf,
    /// The data-parallel group this process trains in (`SingleProcess` alone).
    /// Rank 0 decides (planner, stop), writes checkpoints, metrics and exports;
    /// every rank trains on its share of each optimizer step's micro-batches.
    pub collective: Arc<dyn Collective>,
    /// Caps the bytes the fused engine's own buffers may hold (past it they fail
    /// like an out-of-memory, and `data.batch_size = "auto"` sizes against it): for
    /// tests of the recovery path and for emulating a smaller GPU. `None` normally.
    pub engine_memory_limit: Option<usize>,
    /// A fresh run may replace the checkpoints of an earlier run in its output
    /// directory (`--overwrite`); without it, it refuses.
    pub overwrite: bool,
    /// Resume although the data files changed since the checkpoint
    /// (`--allow-data-change`).
    pub allow_data_change: bool,
    /// Fails checkpoint and adapter writes past this many bytes as a full disk would:
    /// the test hook of the disk-full path. `None` normally.
    pub write_quota: Option<u64>,
}

impl RunOptions {
    /// A single-process run of `config` with a real clock, no resume, no limits.
    pub fn new(config: RunConfig, cache_root: PathBuf) -> Self {
        Self {
            config,
            resume: None,
            clock: Box::new(crate::planner::SystemClock::new()),
            stop: Arc::new(AtomicBool::new(false)),
            halt_at_step: None,
            cache_root,
            collective: Arc::new(qtrain_dist::SingleProcess),
            engine_memory_limit: None,
            overwrite: false,
            allow_data_change: false,
            write_quota: None,
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: u64,
    pub tokens: u64,
    /// Time of the whole run (earlier processes of a resumed run included).
    pub elapsed: Duration,
    pub last_train_loss: Option<f64>,
    /// Eval loss before training and at the end.
    pub first_eval_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub checkpoint: PathBuf,
    pub adapter_dir: PathBuf,
    /// (prompt, reference answer, generated answer) before and after training.
    pub samples: Vec<SampleAnswer>,
    pub stopped_by_signal: bool,
    /// The resumed checkpoint was of a run that had already finished its budget:
    /// nothing was trained, evaluated or written.
    pub already_finished: bool,
    /// Where the process's time went (`budget ..., process wall time ...: load ...`).
    pub budget_report: String,
    /// Training-step timing of this process, comparable with `qtrain bench`.
    pub step_timing: Option<StepTiming>,
}

/// Mean time of this process's optimizer steps (the first, which pays one-off
/// costs, excluded), and what part of it the step waited for data or did host
/// bookkeeping (metrics, progress): where a gap to `qtrain bench` would come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTiming {
    pub steps: u64,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub data_wait_s: f64,
    pub bookkeeping_s: f64,
}

#[derive(Debug, Clone)]
pub struct SampleAnswer {
    pub prompt: String,
    pub reference: String,
    pub before: String,
    pub after: String,
}

/// The non-tensor state of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub tokens_seen: u64,
    pub planner: PlannerState,
    pub data_cursor: DataCursor,
    pub nonfinite_in_a_row: usize,
    pub first_eval_loss: Option<f64>,
    /// The config the run started with (TOML), so a resume can check compatibility.
    pub config_toml: String,
    pub model_dir: PathBuf,
    /// Rows per forward/backward pass when written (after any out-of-memory
    /// retries); a resume continues with it.
    #[serde(default)]
    pub micro_batch: Option<usize>,
    /// The fp16 loss scaler's state (GPUs of compute capability 7.x).
    #[serde(default)]
    pub loss_scaler: Option<LossScaler>,
    /// The run's lineage: kept by resumes, the only checkpoints this run prunes.
    #[serde(default)]
    pub run_id: String,
    /// Written at the natural end of the run's budget (not by a signal, a
    /// `--stop-at-step` or an error): resuming it has nothing left to do.
    #[serde(default)]
    pub finished: bool,
    /// The data files the run read (size, modification time, head and tail hash),
    /// so a resume notices data replaced under the same path.
    #[serde(default)]
    pub data_files: Vec<FileIdentity>,
    /// What evaluations, samples and checkpoints cost, for the resumed run's plan.
    #[serde(default)]
    pub phase_costs: PhaseCosts,
}

pub(crate) const ADAPTER_FILE: &str = "adapter.safetensors";
pub(crate) const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub(crate) const STATE_FILE: &str = "trainer_state.json";

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The budget is spent (the planned steps are done).
    Planned,
    /// SIGINT/SIGTERM.
    Signal,
    /// `--stop-at-step`.
    Halt,
}

/// The run's position: what a checkpoint records besides tensors.
#[derive(Debug, Clone, Default)]
struct Position {
    step: u64,
    tokens_seen: u64,
    nonfinite: usize,
    last_loss: Option<f64>,
}

/// Step timing of this process (see [`StepTiming`]) and the current log window.
#[derive(Debug, Clone, Default)]
struct Timing {
    steps: u64,
    step_s: f64,
    data_wait_s: f64,
    bookkeeping_s: f64,
    window_tokens: u64,
    window_step_s: f64,
}

/// The run: everything `setup` builds and the loop advances.
pub struct Trainer {
    cfg: RunConfig,
    clock: Arc<dyn Clock>,
    coll: Arc<dyn Collective>,
    root: bool,
    stop: Arc<AtomicBool>,
    halt_at_step: Option<u64>,
    cache_root: PathBuf,
    write_quota: Option<u64>,

    out_dir: PathBuf,
    ckpt_root: PathBuf,
    model_dir: PathBuf,
    run_id: String,
    resumed_from: Option<PathBuf>,
    last_checkpoint: Option<PathBuf>,
    data_files: Vec<FileIdentity>,

    base: BaseModel,
    encoder: Arc<Encoder>,
    backend: Backend,
    shape: StepShape,
    data_cfg: DatasetConfig,
    stream: BatchStream,
    sharding: StepSharding,
    sched: LrSchedule,
    scaler: Option<LossScaler>,
    tokens_per_step: u64,

    planner: Planner,
    costs: PhaseCosts,
    sizes: Sizes,
    accounting: Accounting,
    /// The measuring checkpoint after the first step is still to be written (time
    /// budgets without `budget.reserve_seconds`).
    measure_checkpoint: bool,
    last_ckpt_at: Duration,
    /// Whether the first step of this process has been checked against the budget.
    first_step_checked: bool,

    sink: MetricsSink,
    bar: indicatif::ProgressBar,
    pos: Position,
    timing: Timing,
    first_eval_loss: Option<f64>,
    prompts: Vec<(Vec<qtrain_data::Message>, String)>,
    before: Vec<String>,
}

/// What `setup` found: a run to train, or a resumed run that is already done.
enum Setup {
    Train(Box<Trainer>),
    Finished(Box<RunSummary>),
}

/// Runs (or resumes) a training run to the end of its budget.
pub fn run(opts: RunOptions) -> Result<RunSummary> {
    let mut t = match Trainer::setup(opts)? {
        Setup::Train(t) => t,
        Setup::Finished(summary) => return Ok(*summary),
    };
    t.evaluate_before_training()?;
    let stop = loop {
        if let Some(stop) = t.should_stop()? {
            break stop;
        }
        let Some(done) = t.train_step()? else {
            continue;
        };
        t.after_step(&done)?;
        if t.halt_at_step == Some(t.pos.step) {
            break Stop::Halt;
        }
    };
    t.finish(stop)
}

/// The adapter of a qtrain checkpoint as PEFT tensors and settings, and the model
/// path its run trained on (for `qtrain export`).
pub fn adapter_from_checkpoint(dir: &Path) -> Result<(crate::peft::PeftAdapter, String)> {
    let (_, cfg) = resume::read_state(dir)?;
    let lcfg = setup::lora_config(&cfg)?;
    let st_file = dir.join(ADAPTER_FILE);
    let tensors = qtrain_model::safetensors_io::ShardedTensors::open(&[st_file])?;
    let params = tensors
        .names()
        .into_iter()
        .map(|n| {
            let t = tensors.get(n)?;
            Ok((n.to_string(), t.to_f32_vec()?, t.shape.to_vec()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((
        crate::peft::PeftAdapter {
            settings: setup::peft_settings(&lcfg, &cfg.model.path),
            tensors: params,
        },
        cfg.model.path,
    ))
}
