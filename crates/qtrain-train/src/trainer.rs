//! The training loop of `qtrain run`: one straight loop from loading the model to
//! the exported adapter.
//!
//! ```text
//! load base (NF4, through the quantized cache) ─ tokenizer ─ data stream
//! LoRA init (or checkpoint) ─ optimizer (or checkpoint) ─ planner (budget)
//! loop until the planner says stop:
//!     grad_accum micro-batches → forward_backward (loss normalized by the step's
//!     valid tokens) → clip → AdamW → planner → metrics, eval, checkpoint, signals
//! final checkpoint → PEFT adapter → eval loss and sample answers
//! ```
//!
//! The LoRA weights' master copy lives on the host in f32 (the optimizer's slices);
//! after each update it is written back to the device tensors the model reads.
//!
//! A step's data batches are cut into micro-batches of the rows that fit
//! ([`crate::micro`]: `data.batch_size = "auto"` sizes them with the memory model,
//! an out-of-memory halves them and retries the same rows), and on fp16 GPUs the
//! loss is scaled dynamically ([`crate::loss_scale`]).

use crate::backend::{Backend, EngineChoice, HostOptimizer};
use crate::ckpt_io::{self, CkptError};
use crate::config::RunConfig;
use crate::loss_scale::{LossScaler, ScaleUpdate};
use crate::metrics::{MetricsSink, Record};
use crate::micro::{self, StepShape};
use crate::models::{self, ModelSourceError};
use crate::peft::{self, PeftDtype, PeftSettings};
use crate::planner::{Budget, Clock, Plan, Planner, PlannerState};
use qtrain_data::{BatchStream, DataCursor, DatasetConfig, Encoder, EvalStream, Sample};
use qtrain_dist::{agreed_loss_denominator, Collective, StepSharding};
use qtrain_model::{BaseModel, LoadOptions, Proj};
use qtrain_optim::{
    AdamW32, AdamW8bit, AdamWConfig, LrSchedule, PagingPolicy, ParamSpec, ScheduleKind,
};
use qtrain_step::{HostTensor, LoraConfig, LoraWeights};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Source(#[from] ModelSourceError),
    #[error(transparent)]
    Model(#[from] qtrain_model::ModelError),
    #[error(transparent)]
    Reference(#[from] qtrain_reference::ReferenceError),
    #[error(transparent)]
    Step(#[from] qtrain_step::StepError),
    #[error(transparent)]
    Data(#[from] qtrain_data::DataError),
    #[error(transparent)]
    Optim(#[from] qtrain_optim::OptimError),
    #[error(transparent)]
    Checkpoint(#[from] CkptError),
    #[error(transparent)]
    Peft(#[from] peft::PeftError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("{path}: {msg}")]
    Resume { path: PathBuf, msg: String },
    #[error("the dataset ran dry: no batch could be made (is it empty?)")]
    NoData,
    #[error(
        "stopped after {count} optimizer steps in a row with a non-finite loss or gradient \
         (last at step {step}); a checkpoint of the last good state is in {checkpoint}. \
         Lower optimizer.lr or check the data."
    )]
    NonFinite {
        count: usize,
        step: u64,
        checkpoint: PathBuf,
    },
    /// The device ran out of memory (recoverable: see [`crate::micro`]).
    #[error("{0}")]
    OutOfMemory(String),
    /// The run stopped on an out-of-memory, with a checkpoint and what to lower.
    #[error("{0}")]
    OutOfMemoryStop(String),
    #[error("{0}")]
    Other(String),
}

type Result<T> = std::result::Result<T, TrainError>;

/// Where to resume from.
#[derive(Debug, Clone)]
pub enum Resume {
    /// The newest checkpoint in the run's output directory.
    Latest,
    Dir(PathBuf),
}

/// Everything `run` needs besides the config.
pub struct RunOptions {
    pub config: RunConfig,
    pub resume: Option<Resume>,
    pub clock: Box<dyn Clock>,
    /// Set by SIGINT/SIGTERM: checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Stop (with a checkpoint) once this step is done, without changing the plan:
    /// for preemptible machines, and how the resume test interrupts a run.
    pub halt_at_step: Option<u64>,
    /// Where `builtin:` models and the quantized cache live.
    pub cache_root: PathBuf,
    /// The data-parallel group this process trains in (`SingleProcess` alone).
    /// Rank 0 decides (planner, stop), writes checkpoints, metrics and exports;
    /// every rank trains on its share of each optimizer step's micro-batches.
    pub collective: Arc<dyn Collective>,
    /// Caps the bytes the fused engine's own buffers may hold (past it they fail
    /// like an out-of-memory, and `data.batch_size = "auto"` sizes against it): for
    /// tests of the recovery path and for emulating a smaller GPU. `None` normally.
    pub engine_memory_limit: Option<usize>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: u64,
    pub tokens: u64,
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
}

const ADAPTER_FILE: &str = "adapter.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";

fn lora_config(cfg: &RunConfig) -> Result<LoraConfig> {
    let targets = cfg
        .lora
        .targets
        .iter()
        .map(|t| {
            Proj::from_name(t)
                .ok_or_else(|| TrainError::Other(format!("lora.targets: unknown `{t}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(LoraConfig {
        rank: cfg.lora.rank,
        alpha: cfg.lora.alpha,
        dropout: cfg.lora.dropout,
        targets,
        rslora: cfg.lora.rslora,
        seed: cfg.lora.seed,
    })
}

fn schedule(cfg: &RunConfig) -> LrSchedule {
    let o = &cfg.optimizer;
    LrSchedule {
        kind: match o.schedule.as_str() {
            "constant" => ScheduleKind::Constant,
            "linear" => ScheduleKind::Linear,
            _ => ScheduleKind::Cosine,
        },
        peak_lr: o.lr,
        warmup_steps: o.warmup_steps,
        min_lr_ratio: o.min_lr_ratio,
    }
}

fn adamw_config(cfg: &RunConfig) -> AdamWConfig {
    let o = &cfg.optimizer;
    AdamWConfig {
        betas: (o.betas[0], o.betas[1]),
        eps: o.eps,
        weight_decay: o.weight_decay,
        paging: match o.paged.as_str() {
            "always" => PagingPolicy::Always,
            "never" => PagingPolicy::Never,
            _ => PagingPolicy::default(),
        },
        ..AdamWConfig::default()
    }
}

fn make_optimizer(
    cfg: &RunConfig,
    specs: &[ParamSpec],
    from: Option<&Path>,
) -> Result<HostOptimizer> {
    let c = adamw_config(cfg);
    Ok(match (cfg.optimizer.kind.as_str(), from) {
        ("adamw32", None) => HostOptimizer::AdamW32(AdamW32::new(c, specs)?),
        ("adamw32", Some(p)) => HostOptimizer::AdamW32(AdamW32::load_state_for(p, specs)?),
        (_, None) => HostOptimizer::AdamW8bit(AdamW8bit::new(c, specs)?),
        (_, Some(p)) => HostOptimizer::AdamW8bit(AdamW8bit::load_state_for(p, specs)?),
    })
}

/// Writes LoRA tensors (qtrain names, f32) as safetensors.
fn save_lora(path: &Path, params: &[HostTensor]) -> Result<()> {
    use qtrain_model::safetensors_io::{f32_to_le_bytes, StreamingWriter, TensorSpec};
    let specs = params
        .iter()
        .map(|(n, _, s)| TensorSpec::new(n.clone(), safetensors::Dtype::F32, s))
        .collect();
    let mut w = StreamingWriter::create(path, specs, None)?;
    for (_, v, _) in params {
        w.write_next(&f32_to_le_bytes(v))?;
    }
    Ok(w.finish()?)
}

fn load_lora(path: &Path, expected: &[HostTensor]) -> Result<Vec<HostTensor>> {
    let st = qtrain_model::safetensors_io::ShardedTensors::open(&[path.to_path_buf()])?;
    expected
        .iter()
        .map(|(name, _, shape)| {
            let t = st.get(name)?;
            t.expect_shape(shape)?;
            Ok((name.clone(), t.to_f32_vec()?, shape.clone()))
        })
        .collect()
}

/// Mean eval loss over the held-out split (at most `max_batches` batches, each cut
/// into micro-batches of `micro_rows` rows).
fn evaluate(
    backend: &mut Backend,
    base: &BaseModel,
    data: &DatasetConfig,
    enc: &Arc<Encoder>,
    max_batches: usize,
    micro_rows: usize,
) -> Result<Option<f64>> {
    let stream = EvalStream::new(data, enc.clone())?;
    let (mut sum, mut n) = (0.0, 0usize);
    for (i, b) in stream.enumerate() {
        if max_batches > 0 && i >= max_batches {
            break;
        }
        for part in micro::split_rows(&b?, micro_rows)? {
            let l = backend.eval_loss(base, &part)?;
            sum += l.loss_sum;
            n += l.valid_tokens;
        }
    }
    Ok((n > 0).then(|| sum / n as f64))
}

/// [`evaluate`], halving the micro-batch on an out-of-memory when `train.oom =
/// "retry"` allows it.
fn evaluate_fitting(
    backend: &mut Backend,
    base: &BaseModel,
    cfg: &RunConfig,
    data: &DatasetConfig,
    enc: &Arc<Encoder>,
    shape: &mut StepShape,
) -> Result<Option<f64>> {
    loop {
        match evaluate(
            backend,
            base,
            data,
            enc,
            cfg.eval.max_batches,
            shape.micro_rows,
        ) {
            Err(e) if micro::is_oom(&e) => match micro::give_back_memory(backend, shape, cfg) {
                r @ (micro::Relief::MlpActivations | micro::Relief::Residuals) => tracing::warn!(
                    "evaluation ran out of GPU memory ({e}); {}",
                    r.describe()
                ),
                micro::Relief::HalvedMicroBatch => tracing::warn!(
                    "evaluation ran out of GPU memory ({e}); continuing with micro-batches of {} rows",
                    shape.micro_rows
                ),
                micro::Relief::None => return Err(e),
            },
            r => return r,
        }
    }
}

/// Greedy answers to held-out prompts.
fn answer(
    base: &BaseModel,
    lora: Option<&LoraWeights>,
    enc: &Encoder,
    prompts: &[(Vec<qtrain_data::Message>, String)],
    max_new: usize,
) -> Result<Vec<String>> {
    prompts
        .iter()
        .map(|(msgs, _)| {
            let ids = enc.encode_prompt(msgs)?;
            let out = crate::generate::greedy(base, lora, &ids, max_new, enc.eos_id())?;
            Ok(enc.decode(&out, true)?.trim().to_string())
        })
        .collect()
}

/// Held-out chat prompts (all turns but the last assistant one) with the reference answer.
fn sample_prompts(
    data: &DatasetConfig,
    n: usize,
) -> Result<Vec<(Vec<qtrain_data::Message>, String)>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(qtrain_data::eval_samples(data, n)?
        .into_iter()
        .filter_map(|s| match s {
            Sample::Chat(mut msgs) if msgs.last().is_some_and(|m| m.is_assistant()) => {
                let reference = msgs.pop().expect("non-empty").content;
                Some((msgs, reference))
            }
            _ => None,
        })
        .collect())
}

fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
}

fn announce(plan: &Plan, tokens_per_step: u64) {
    match plan.step_seconds {
        Some(s) => tracing::info!(
            "plan: {} optimizer steps ({} done), {:.2}s/step, {} tokens/step, {:.1}M tokens in all, ETA {}",
            plan.total_steps,
            plan.steps_done,
            s,
            tokens_per_step,
            plan.tokens_planned as f64 / 1e6,
            format_duration(plan.eta)
        ),
        None => tracing::info!("plan: {} optimizer steps (provisional until step time is measured)", plan.total_steps),
    }
}

/// Runs (or resumes) a training run to the end of its budget.
pub fn run(opts: RunOptions) -> Result<RunSummary> {
    let RunOptions {
        config: cfg,
        resume,
        clock,
        stop,
        halt_at_step,
        cache_root,
        collective: coll,
        engine_memory_limit,
    } = opts;
    let root = coll.is_root();
    let dist = |e: qtrain_dist::DistError| TrainError::Other(format!("data parallel: {e}"));
    let out_dir = cfg.checkpoint.output_dir.clone();
    let ckpt_root = out_dir.join("checkpoints");
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| TrainError::Other(format!("{}: {e}", out_dir.display())))?;

    // ---- resume: read the checkpoint's state first; it decides the model and data position.
    let resume_dir = match &resume {
        None => None,
        Some(Resume::Latest) => Some(ckpt_io::latest(&ckpt_root)?),
        Some(Resume::Dir(d)) => Some(d.clone()),
    };
    let resumed: Option<TrainerState> = match &resume_dir {
        None => None,
        Some(dir) => {
            let (st, old) = read_checkpoint_state(dir)?;
            if old.lora != cfg.lora
                || old.model.path != cfg.model.path
                || old.data != cfg.data
                || old.train.grad_accum != cfg.train.grad_accum
                || old.train.effective_batch != cfg.train.effective_batch
            {
                return Err(TrainError::Resume {
                    path: dir.clone(),
                    msg: "the checkpoint was made with a different [model].path, [lora], [data], train.grad_accum \
                          or train.effective_batch; resume with the config it was made with (its config is in \
                          trainer_state.json)"
                        .into(),
                });
            }
            Some(st)
        }
    };

    // ---- model
    let device = models::device(&cfg.model.device)?;
    let (dtype, gpu) = models::resolve_dtype(&cfg.model.dtype, &device)?;
    let model_dir = models::resolve(&cfg.model.path, &cache_root)?;
    let load = LoadOptions {
        device: device.clone(),
        dtype,
        quantization: cfg.model.quantization_spec(),
        threads: 0,
    };
    let t_load = Instant::now();
    let base = if cfg.model.quantized_cache {
        let (m, outcome) =
            qtrain_model::bnb::load_cached(&model_dir, &load, &cache_root.join("nf4"))?;
        tracing::info!("quantized cache: {outcome:?}");
        m
    } else {
        BaseModel::load(&model_dir, &load)?
    };
    tracing::info!(
        "loaded {} ({} layers, {:.1} MB frozen) on {:?} as {:?} in {:.1}s",
        model_dir.display(),
        base.config.num_hidden_layers,
        base.storage_bytes() as f64 / 1e6,
        device,
        dtype,
        t_load.elapsed().as_secs_f64()
    );
    let encoder = Arc::new(Encoder::from_model_dir(
        &model_dir,
        &cfg.data.chat_template,
    )?);

    // ---- adapters, optimizer, data
    let lcfg = lora_config(&cfg)?;
    let mut lora = LoraWeights::init(&lcfg, &base.config, &device)?;
    let params = lora.to_host()?;
    let specs: Vec<ParamSpec> = params
        .iter()
        .map(|(n, v, _)| ParamSpec::new(n.clone(), v.len()))
        .collect();
    let opt = make_optimizer(
        &cfg,
        &specs,
        resume_dir
            .as_ref()
            .map(|d| d.join(OPTIMIZER_FILE))
            .as_deref(),
    )?;
    if let Some(dir) = &resume_dir {
        lora.update_from_host(&load_lora(&dir.join(ADAPTER_FILE), &params)?)?;
    }
    let choice = EngineChoice::parse(&cfg.train.engine).unwrap_or(EngineChoice::Auto);
    let mut backend = Backend::new(&base, lora, opt, choice)?;
    backend.set_memory_limit(engine_memory_limit);
    let mut shape = micro::resolve_step_shape(
        &cfg,
        &base,
        &backend,
        gpu.as_ref(),
        engine_memory_limit,
        resumed.as_ref().and_then(|s| s.micro_batch),
    )?;
    let data_cfg = shape.data_config(&cfg.data);
    let kept = micro::kept_activations(
        &cfg,
        &base,
        &backend,
        gpu.as_ref(),
        engine_memory_limit,
        &shape,
    );
    backend.set_kept_activations(kept);
    if kept.attention_residuals {
        tracing::info!(
            "keeping each layer's attention residual (train.keep_attention_residuals = {}): \
             the backward skips recomputing the o projection",
            cfg.train.keep_attention_residuals
        );
    }
    if kept.mlp {
        tracing::info!(
            "keeping each layer's gate/up output (train.keep_mlp_activations = {}): the \
             backward skips recomputing the gate/up product",
            cfg.train.keep_mlp_activations
        );
    }
    // Every rank starts from rank 0's adapters and must read the same data.
    backend.broadcast_params(&*coll)?;
    // An optimizer step's data batches are split over the ranks (so a resume on
    // another number of GPUs trains the same steps); each rank cuts its own into
    // micro-batches.
    let sharding = StepSharding::new(shape.data_batches, coll.world_size()).map_err(|e| {
        TrainError::Other(format!(
            "data parallel: {e}{}",
            if cfg.data.batch_size_is_auto() {
                " (data.batch_size = \"auto\" makes one data batch per step: with several GPUs \
                 set data.batch_size and train.grad_accum instead)"
            } else {
                ""
            }
        ))
    })?;
    let mut stream = match &resumed {
        Some(st) => BatchStream::resume(&data_cfg, encoder.clone(), &st.data_cursor)?,
        None => BatchStream::new(&data_cfg, encoder.clone())?,
    };
    let sched = schedule(&cfg);
    let tokens_per_step = (shape.rows_per_step() * cfg.data.seq_len) as u64;
    // fp16 (7.x GPUs) trains with a dynamic loss scale, resumed with the run.
    let mut scaler = (dtype == candle_core::DType::F16).then(|| {
        resumed
            .as_ref()
            .and_then(|s| s.loss_scaler.clone())
            .unwrap_or_default()
    });

    // ---- planner
    let budget = cfg.budget_kind().unwrap_or(Budget::Steps(100));
    let reserve = Duration::from_secs_f64(cfg.budget.reserve_seconds.unwrap_or(5.0));
    let mut planner = match &resumed {
        Some(st) => Planner::resume(budget, clock, reserve, tokens_per_step, &st.planner),
        None => Planner::new(budget, clock, reserve, tokens_per_step),
    };
    let mut step = resumed.as_ref().map_or(0, |s| s.step);
    let mut tokens_seen = resumed.as_ref().map_or(0, |s| s.tokens_seen);
    let mut nonfinite = resumed.as_ref().map_or(0, |s| s.nonfinite_in_a_row);
    tracing::info!(
        "LoRA r={} alpha={} on {} ({:.2}M trainable parameters), {} optimizer, {:.1} MB state, {} step",
        lcfg.rank,
        lcfg.alpha,
        cfg.lora.targets.join(","),
        backend.num_parameters() as f64 / 1e6,
        cfg.optimizer.kind,
        backend.optimizer_state().0 as f64 / 1e6,
        backend.name()
    );
    if step > 0 {
        tracing::info!(
            "resumed at step {step} from {}",
            resume_dir.as_ref().expect("resumed").display()
        );
    }

    let mut sink =
        MetricsSink::create(&out_dir, cfg.log.jsonl && root, cfg.log.tensorboard && root)?;
    let prompts = if root {
        sample_prompts(&cfg.data, cfg.eval.samples)?
    } else {
        Vec::new()
    };
    let before = if resumed.is_none() {
        answer(
            &base,
            Some(backend.lora_weights()?),
            &encoder,
            &prompts,
            cfg.eval.max_new_tokens,
        )?
    } else {
        vec![String::new(); prompts.len()]
    };
    let first_eval_loss = match &resumed {
        Some(st) => st.first_eval_loss,
        None if !root => None,
        None => {
            let l = evaluate_fitting(&mut backend, &base, &cfg, &data_cfg, &encoder, &mut shape)
                .map_err(|e| match e {
                    e if micro::is_oom(&e) => TrainError::OutOfMemoryStop(micro::oom_stop_message(
                        &format!("evaluating before training: {e}"),
                        &shape,
                        cfg.data.seq_len,
                        step,
                        None,
                        &cfg.train.oom,
                    )),
                    e => e,
                })?;
            if let Some(l) = l {
                tracing::info!("eval loss before training: {l:.4}");
                sink.log(&Record {
                    step,
                    eval_loss: Some(l),
                    elapsed_s: 0.0,
                    ..Record::default()
                })?;
            }
            l
        }
    };
    announce(&planner.plan(), tokens_per_step);

    // The adapter and optimizer state come from the backend (downloaded from the
    // device on the fused path), written into the checkpoint's temporary directory.
    let save = |dir_step: u64, backend: &Backend, state: TrainerState| -> Result<PathBuf> {
        let elapsed = state.planner.elapsed_secs;
        let params = backend.params()?;
        Ok(ckpt_io::save(
            &ckpt_root,
            dir_step,
            elapsed,
            cfg.checkpoint.keep_last,
            |d| {
                save_lora(&d.join(ADAPTER_FILE), &params).map_err(|e| e.to_string())?;
                backend
                    .save_optimizer(&d.join(OPTIMIZER_FILE))
                    .map_err(|e| e.to_string())?;
                std::fs::write(
                    d.join(STATE_FILE),
                    serde_json::to_string_pretty(&state).map_err(|e| e.to_string())?,
                )?;
                std::fs::write(d.join("config.toml"), &state.config_toml)?;
                Ok(())
            },
        )?)
    };
    // `cursor`: where the data stands after the step (the stream's cursor, or the
    // one from before the step's batches when the step did not complete).
    let state_now = |step: u64,
                     tokens: u64,
                     planner: &Planner,
                     cursor: DataCursor,
                     nonfinite: usize,
                     micro_batch: usize,
                     scaler: &Option<LossScaler>| TrainerState {
        step,
        tokens_seen: tokens,
        planner: planner.state(),
        data_cursor: cursor,
        nonfinite_in_a_row: nonfinite,
        first_eval_loss,
        config_toml: cfg.to_toml(),
        model_dir: model_dir.clone(),
        micro_batch: Some(micro_batch),
        loss_scaler: scaler.clone(),
    };

    let bar = progress_bar(&cfg, &planner.plan());
    let mut last_ckpt_at = planner.elapsed();
    let mut last_loss = None;
    let mut last_checkpoint = resume_dir.clone();
    let mut stopped_by_signal = false;
    let mut measured_reserve = cfg.budget.reserve_seconds.is_some();
    let mut window_tokens = 0u64;
    let mut window_start = Instant::now();

    loop {
        // Rank 0's planner decides; a signal on any rank stops all of them.
        if coll
            .broadcast_u64(planner.should_stop() as u64)
            .map_err(dist)?
            != 0
        {
            break;
        }
        if coll.any(stop.load(Ordering::SeqCst)).map_err(dist)? {
            stopped_by_signal = true;
            break;
        }
        let t0 = Instant::now();
        let cursor_before = stream.cursor();
        let share = sharding.take_step(
            coll.rank(),
            || -> Result<qtrain_step::TokenBatch> {
                stream.next().ok_or(TrainError::NoData)?.map_err(Into::into)
            },
            |b| b.valid_targets() as u64,
        )?;
        let valid = agreed_loss_denominator(&*coll, &share).map_err(dist)? as usize;
        if valid == 0 {
            // Reported, never trained on: the data crate counts such documents too.
            tracing::warn!(
                "step {step}: every label of this optimizer step is masked; skipping it"
            );
            continue;
        }
        let denominator = scaler
            .as_ref()
            .map_or(valid as f64, |s| s.loss_denominator(valid as f64));
        let loss_sum = loop {
            let passes = micro::step_passes(
                &mut backend,
                &base,
                &share,
                &sharding,
                &shape,
                step,
                &cfg,
                denominator,
            );
            // Every rank learns whether any ran out of memory, so all retry (or stop)
            // together instead of waiting on a collective the failed one never joins.
            let oom_here = matches!(&passes, Err(e) if micro::is_oom(e));
            let any_oom = coll.any(oom_here).map_err(dist)?;
            let passes = match passes {
                Ok(_) if any_oom => Err(TrainError::OutOfMemory(
                    "another rank ran out of GPU memory".into(),
                )),
                p => p,
            };
            match passes {
                Ok(l) => break l,
                Err(e) if micro::is_oom(&e) => {
                    // Checkpoint the last completed step (data from before this one),
                    // with the micro-batch a resume should use.
                    let failed = shape;
                    let relief = micro::give_back_memory(&mut backend, &mut shape, &cfg);
                    if relief.keeps_micro_batch() {
                        bar.suspend(|| {
                            tracing::warn!(
                                "step {step}: out of GPU memory ({e}); {}, retrying the step",
                                relief.describe()
                            )
                        });
                        continue;
                    }
                    let retry = relief == micro::Relief::HalvedMicroBatch;
                    let st = state_now(
                        step,
                        tokens_seen,
                        &planner,
                        cursor_before.clone(),
                        nonfinite,
                        shape.micro_rows,
                        &scaler,
                    );
                    let checkpoint = if root {
                        save(step, &backend, st)?
                    } else {
                        PathBuf::new()
                    };
                    if !retry {
                        return Err(TrainError::OutOfMemoryStop(micro::oom_stop_message(
                            &e.to_string(),
                            &failed,
                            cfg.data.seq_len,
                            step,
                            Some(&checkpoint),
                            &cfg.train.oom,
                        )));
                    }
                    bar.suspend(|| {
                        tracing::warn!(
                            "step {step}: out of GPU memory with micro-batches of {} x {} ({e}); \
                             checkpoint in {}; retrying with {} rows per pass, {} passes per step \
                             (the same {} rows per optimizer step)",
                            failed.micro_rows,
                            cfg.data.seq_len,
                            checkpoint.display(),
                            shape.micro_rows,
                            shape.passes_per_step(),
                            shape.rows_per_step()
                        )
                    });
                }
                Err(e) => return Err(e),
            }
        };
        let mut loss_sum = [loss_sum];
        coll.all_reduce_sum_f64(&mut loss_sum).map_err(dist)?;
        let loss = loss_sum[0] / valid as f64;
        let unscale = scaler.as_ref().map_or(1.0, LossScaler::inv_scale);
        let grad_norm = backend.reduce_and_clip(&*coll, cfg.train.max_grad_norm, unscale)?;
        if let Some(s) = scaler.as_mut() {
            if loss.is_finite() && !grad_norm.is_finite() && s.can_back_off() {
                // The scale overflowed fp16, not the model: skip, halve, go on.
                if let ScaleUpdate::Skip { new_scale } = s.update(false) {
                    tracing::info!(
                        "step {step}: fp16 gradients overflowed; skipping the update, loss scale now {new_scale}"
                    );
                }
                continue;
            }
        }
        if !loss.is_finite() || !grad_norm.is_finite() {
            nonfinite += 1;
            tracing::warn!("step {step}: loss {loss}, grad norm {grad_norm}: skipping the update ({nonfinite} in a row)");
            if nonfinite >= cfg.train.max_nonfinite_steps {
                let st = state_now(
                    step,
                    tokens_seen,
                    &planner,
                    stream.cursor(),
                    nonfinite,
                    shape.micro_rows,
                    &scaler,
                );
                let checkpoint = if root {
                    save(step, &backend, st)?
                } else {
                    PathBuf::new()
                };
                return Err(TrainError::NonFinite {
                    count: nonfinite,
                    step,
                    checkpoint,
                });
            }
            continue;
        }
        nonfinite = 0;
        if let Some(s) = scaler.as_mut() {
            s.update(true);
        }
        let total_steps = coll
            .broadcast_u64(planner.plan().total_steps)
            .map_err(dist)?;
        let lr = sched.lr_at(step, total_steps);
        backend.update(lr)?;
        step += 1;
        // Micro-batches are packed to a fixed [batch, seq]: every step has the same
        // token count, whichever rank holds which micro-batch.
        let step_tokens = tokens_per_step;
        tokens_seen += step_tokens;
        window_tokens += step_tokens;
        last_loss = Some(loss);
        if let Some(plan) = planner.record_step(t0.elapsed()) {
            announce(&plan, tokens_per_step);
            bar.set_length(plan.total_steps);
        }
        bar.set_position(step);

        if step.is_multiple_of(cfg.log.every_steps) {
            let secs = window_start.elapsed().as_secs_f64();
            let tps = window_tokens as f64 / secs.max(1e-9);
            window_tokens = 0;
            window_start = Instant::now();
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
            sink.log(&Record {
                step,
                loss: Some(loss),
                lr: Some(lr as f64),
                tokens_per_s: Some(tps),
                grad_norm: Some(grad_norm as f64),
                elapsed_s: planner.elapsed().as_secs_f64(),
                ..Record::default()
            })?;
        }
        if root && cfg.eval.every_steps > 0 && step.is_multiple_of(cfg.eval.every_steps) {
            let t = Instant::now();
            let eval = match evaluate_fitting(
                &mut backend,
                &base,
                &cfg,
                &data_cfg,
                &encoder,
                &mut shape,
            ) {
                Err(e) if micro::is_oom(&e) => {
                    let st = state_now(
                        step,
                        tokens_seen,
                        &planner,
                        stream.cursor(),
                        0,
                        shape.micro_rows,
                        &scaler,
                    );
                    let checkpoint = save(step, &backend, st)?;
                    return Err(TrainError::OutOfMemoryStop(micro::oom_stop_message(
                        &format!("during evaluation: {e}"),
                        &shape,
                        cfg.data.seq_len,
                        step,
                        Some(&checkpoint),
                        &cfg.train.oom,
                    )));
                }
                r => r?,
            };
            if let Some(l) = eval {
                bar.suspend(|| {
                    tracing::info!("step {step}: train loss {loss:.4}, eval loss {l:.4}")
                });
                sink.log(&Record {
                    step,
                    eval_loss: Some(l),
                    elapsed_s: planner.elapsed().as_secs_f64(),
                    ..Record::default()
                })?;
            }
            planner.record_overhead(t.elapsed());
        }
        let minutes_since = (planner.elapsed() - last_ckpt_at).as_secs_f64() / 60.0;
        let periodic = (cfg.checkpoint.every_steps > 0 && step.is_multiple_of(cfg.checkpoint.every_steps))
            || (cfg.checkpoint.every_minutes > 0.0 && minutes_since >= cfg.checkpoint.every_minutes)
            // Measure what a checkpoint costs early, so the final one is planned for.
            || !measured_reserve;
        if periodic && root {
            let t = Instant::now();
            last_checkpoint = Some(save(
                step,
                &backend,
                state_now(
                    step,
                    tokens_seen,
                    &planner,
                    stream.cursor(),
                    0,
                    shape.micro_rows,
                    &scaler,
                ),
            )?);
            let took = t.elapsed();
            planner.record_overhead(took);
            if !measured_reserve {
                // Final checkpoint + adapter export + final eval, with margin.
                planner.set_reserve(took.mul_f64(3.0) + Duration::from_secs(2));
                measured_reserve = true;
            }
            last_ckpt_at = planner.elapsed();
        }
        if halt_at_step == Some(step) {
            break;
        }
    }
    bar.finish_and_clear();

    // ---- final checkpoint, adapter, evaluation (rank 0; the others learn where
    // the checkpoint went and leave)
    let adapter_dir = out_dir.join("adapter");
    if !root {
        let mut path = Vec::new();
        coll.broadcast_bytes(&mut path).map_err(dist)?;
        return Ok(RunSummary {
            steps: step,
            tokens: tokens_seen,
            elapsed: planner.elapsed(),
            last_train_loss: last_loss,
            first_eval_loss,
            final_eval_loss: None,
            checkpoint: PathBuf::from(String::from_utf8_lossy(&path).into_owned()),
            adapter_dir,
            samples: Vec::new(),
            stopped_by_signal,
        });
    }
    let checkpoint = save(
        step,
        &backend,
        state_now(
            step,
            tokens_seen,
            &planner,
            stream.cursor(),
            nonfinite,
            shape.micro_rows,
            &scaler,
        ),
    )?;
    coll.broadcast_bytes(&mut checkpoint.to_string_lossy().into_owned().into_bytes())
        .map_err(dist)?;
    last_checkpoint.replace(checkpoint.clone());
    peft::write_peft_adapter(
        &adapter_dir,
        &backend.params()?,
        &PeftSettings {
            rank: lcfg.rank,
            alpha: lcfg.alpha,
            dropout: lcfg.dropout,
            targets: lcfg.targets.clone(),
            rslora: lcfg.rslora,
            base_model: cfg.model.path.clone(),
        },
        PeftDtype::F32,
    )?;
    let final_eval_loss = if stopped_by_signal || halt_at_step == Some(step) {
        None
    } else {
        evaluate_fitting(&mut backend, &base, &cfg, &data_cfg, &encoder, &mut shape).map_err(
            |e| match e {
                e if micro::is_oom(&e) => TrainError::OutOfMemoryStop(micro::oom_stop_message(
                    &format!("in the final evaluation: {e}"),
                    &shape,
                    cfg.data.seq_len,
                    step,
                    Some(&checkpoint),
                    &cfg.train.oom,
                )),
                e => e,
            },
        )?
    };
    if let Some(l) = final_eval_loss {
        sink.log(&Record {
            step,
            eval_loss: Some(l),
            elapsed_s: planner.elapsed().as_secs_f64(),
            ..Record::default()
        })?;
    }
    let after = if stopped_by_signal {
        Vec::new()
    } else {
        answer(
            &base,
            Some(backend.lora_weights()?),
            &encoder,
            &prompts,
            cfg.eval.max_new_tokens,
        )?
    };
    let samples = prompts
        .iter()
        .zip(before)
        .zip(after)
        .map(|(((msgs, reference), before), after)| SampleAnswer {
            prompt: msgs.last().map(|m| m.content.clone()).unwrap_or_default(),
            reference: reference.clone(),
            before,
            after,
        })
        .collect();
    Ok(RunSummary {
        steps: step,
        tokens: tokens_seen,
        elapsed: planner.elapsed(),
        last_train_loss: last_loss,
        first_eval_loss,
        final_eval_loss,
        checkpoint,
        adapter_dir,
        samples,
        stopped_by_signal,
    })
}

fn progress_bar(cfg: &RunConfig, plan: &Plan) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = ProgressBar::new(plan.total_steps);
    if !cfg.log.progress_bar {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps, ETA {eta} | {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Verifies a checkpoint against its manifest and reads its trainer state and the
/// config its run started with.
fn read_checkpoint_state(dir: &Path) -> Result<(TrainerState, RunConfig)> {
    ckpt_io::verify(dir)?;
    let p = dir.join(STATE_FILE);
    let err = |msg: String| TrainError::Resume {
        path: p.clone(),
        msg,
    };
    let text = std::fs::read_to_string(&p).map_err(|e| err(e.to_string()))?;
    let st: TrainerState = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let cfg: RunConfig =
        toml::from_str(&st.config_toml).map_err(|e| err(format!("stored config: {e}")))?;
    Ok((st, cfg))
}

/// The adapter of a qtrain checkpoint as PEFT tensors and settings, and the model
/// path its run trained on (for `qtrain export`).
pub fn adapter_from_checkpoint(dir: &Path) -> Result<(peft::PeftAdapter, String)> {
    let (_, cfg) = read_checkpoint_state(dir)?;
    let lcfg = lora_config(&cfg)?;
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
        peft::PeftAdapter {
            settings: PeftSettings {
                rank: lcfg.rank,
                alpha: lcfg.alpha,
                dropout: lcfg.dropout,
                targets: lcfg.targets,
                rslora: lcfg.rslora,
                base_model: cfg.model.path.clone(),
            },
            tensors: params,
        },
        cfg.model.path,
    ))
}
