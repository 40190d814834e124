//! `Trainer::setup`: every input checked before the expensive work (output
//! directory, checkpoint, device, model files, tokenizer, data files), the budget
//! forecast, then the base model, adapters, optimizer, data stream and planner.

use super::resume::{self, Resumed};
use super::{Position, Resume, RunOptions, RunSummary, Setup, Timing, Trainer};
use super::{ADAPTER_FILE, OPTIMIZER_FILE};
use crate::backend::{Backend, EngineKind, HostOptimizer};
use crate::budget::{self, Accounting, Forecast, History, Phase, Sizes};
use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::metrics::MetricsSink;
use crate::micro;
use crate::models;
use crate::peft::PeftSettings;
use crate::planner::{Budget, Clock, Periodic, Plan, Planner};
use qtrain_data::{BatchStream, Encoder};
use qtrain_dist::StepSharding;
use qtrain_model::{BaseModel, LoadOptions, Proj};
use qtrain_optim::{
    AdamW32, AdamW8bit, AdamWConfig, LrSchedule, PagingPolicy, ParamSpec, ScheduleKind,
};
use qtrain_step::HostTensor;
use qtrain_step::{LoraConfig, LoraWeights};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What the checks before loading found: every input of the run, nothing loaded.
struct Inputs {
    cfg: RunConfig,
    resumed: Option<Resumed>,
    device: candle_core::Device,
    dtype: candle_core::DType,
    gpu: Option<crate::gpu::GpuInfo>,
    model_dir: PathBuf,
    encoder: Arc<Encoder>,
    data_files: Vec<super::FileIdentity>,
    lcfg: LoraConfig,
    sizes: Sizes,
    budget: Budget,
    accounting: Accounting,
}

/// The adapters, optimizer and step of a run, built on the loaded base.
struct Built {
    backend: Backend,
    shape: micro::StepShape,
    data_cfg: qtrain_data::DatasetConfig,
    stream: BatchStream,
    sharding: StepSharding,
    scaler: Option<crate::loss_scale::LossScaler>,
    tokens_per_step: u64,
}

impl Trainer {
    /// Checks every input, forecasts the budget, loads the base and builds the run
    /// (see the module doc); a resumed run that already finished ends here.
    pub(super) fn setup(opts: RunOptions) -> Result<Setup> {
        let RunOptions {
            config: cfg,
            resume,
            clock,
            stop,
            halt_at_step,
            cache_root,
            collective: coll,
            engine_memory_limit,
            overwrite,
            allow_data_change,
            write_quota,
        } = opts;
        let clock: Arc<dyn Clock> = Arc::from(clock);
        let root = coll.is_root();
        let t_setup = clock.now();
        let start = Start {
            resume: resume.as_ref(),
            overwrite,
            allow_data_change,
            write_quota,
            root,
            cache_root: &cache_root,
        };
        let mut inputs = match check_inputs(cfg, &start)? {
            Ok(inputs) => inputs,
            Err(finished) => return Ok(Setup::Finished(Box::new(finished))),
        };
        refuse_budget_before_loading(&inputs, &clock, &cache_root)?;
        inputs
            .accounting
            .add(Phase::Setup, clock.now().saturating_sub(t_setup));

        let t_load = clock.now();
        let base = load_base(
            &inputs.cfg,
            &inputs.model_dir,
            &inputs.device,
            inputs.dtype,
            &cache_root,
        )?;
        inputs
            .accounting
            .add(Phase::Load, clock.now().saturating_sub(t_load));
        tracing::info!(
            "loaded {} ({} layers, {:.1} MB frozen) on {:?} as {:?} in {:.1}s",
            inputs.model_dir.display(),
            base.config.num_hidden_layers,
            base.storage_bytes() as f64 / 1e6,
            inputs.device,
            inputs.dtype,
            inputs.accounting.secs(Phase::Load)
        );
        if let Some(w) = crate::sizing::context_warning(inputs.cfg.data.seq_len, &base.config) {
            tracing::warn!("{w}");
        }
        let built = build(&inputs, &base, &*coll, engine_memory_limit)?;
        let t = Trainer::assemble(inputs, base, built, clock, coll, cache_root)?;
        let t = Trainer {
            stop,
            halt_at_step,
            write_quota,
            ..t
        };
        t.check_budget_after_loading()?;
        Ok(Setup::Train(Box::new(t)))
    }

    /// The trainer of checked inputs and a built run: planner, metrics, position.
    fn assemble(
        inputs: Inputs,
        base: BaseModel,
        built: Built,
        clock: Arc<dyn Clock>,
        coll: Arc<dyn qtrain_dist::Collective>,
        cache_root: PathBuf,
    ) -> Result<Trainer> {
        let Inputs {
            cfg,
            resumed,
            model_dir,
            encoder,
            data_files,
            lcfg,
            mut sizes,
            budget,
            accounting,
            ..
        } = inputs;
        let root = coll.is_root();
        let state = resumed.as_ref().map(|r| &r.state);
        sizes.checkpoint_bytes = sizes.adapter_bytes + built.backend.optimizer_state().0;
        sizes.step_tokens = built.tokens_per_step;
        // The planner: the budget from the process's start.
        let costs = state.map(|s| s.phase_costs.clone()).unwrap_or_default();
        let reserve = match cfg.budget.reserve_seconds {
            Some(r) => Duration::from_secs_f64(r),
            None => reserve_for(budget, &costs, &sizes, None),
        };
        let tokens = built.tokens_per_step;
        let mut planner = match state {
            Some(st) => Planner::resume(
                budget,
                Box::new(clock.clone()),
                reserve,
                tokens,
                &st.planner,
            ),
            None => Planner::new(budget, Box::new(clock.clone()), reserve, tokens),
        };
        planner.set_periodic(periodic(&cfg, &costs, &sizes, planner.step_seconds()));
        let pos = state.map_or_else(Position::default, |s| Position {
            step: s.step,
            tokens_seen: s.tokens_seen,
            nonfinite: s.nonfinite_in_a_row,
            last_loss: None,
        });
        tracing::info!(
            "LoRA r={} alpha={} on {} ({:.2}M trainable parameters), {} optimizer, {:.1} MB state, {} step",
            lcfg.rank,
            lcfg.alpha,
            cfg.lora.targets.join(","),
            built.backend.num_parameters() as f64 / 1e6,
            cfg.optimizer.kind,
            built.backend.optimizer_state().0 as f64 / 1e6,
            built.backend.name()
        );
        let resume_dir = resumed.as_ref().map(|r| r.dir.clone());
        if let Some(dir) = &resume_dir {
            tracing::info!("resumed at step {} from {}", pos.step, dir.display());
        }
        let out_dir = cfg.checkpoint.output_dir.clone();
        let sink =
            MetricsSink::create(&out_dir, cfg.log.jsonl && root, cfg.log.tensorboard && root)?;
        let measure_checkpoint = cfg.budget.reserve_seconds.is_none()
            && matches!(budget, Budget::Time(_))
            && costs.ckpt_s.is_none();
        Ok(Trainer {
            first_eval_loss: state.and_then(|s| s.first_eval_loss),
            run_id: state.map_or_else(crate::ckpt_io::new_run_id, |s| s.run_id.clone()),
            sched: schedule(&cfg),
            bar: progress_bar(&cfg, &planner.plan()),
            last_ckpt_at: planner.elapsed(),
            ckpt_root: out_dir.join("checkpoints"),
            out_dir,
            cfg,
            clock,
            coll,
            root,
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            halt_at_step: None,
            cache_root,
            write_quota: None,
            model_dir,
            resumed_from: resume_dir.clone(),
            last_checkpoint: resume_dir,
            data_files,
            base,
            encoder,
            backend: built.backend,
            shape: built.shape,
            data_cfg: built.data_cfg,
            stream: built.stream,
            sharding: built.sharding,
            scaler: built.scaler,
            tokens_per_step: built.tokens_per_step,
            planner,
            costs,
            sizes,
            accounting,
            measure_checkpoint,
            first_step_checked: false,
            sink,
            pos,
            timing: Timing::default(),
            prompts: Vec::new(),
            before: Vec::new(),
        })
    }

    /// After loading: what is left of a time budget must hold what is still to come
    /// before and after the steps, and at least one step.
    fn check_budget_after_loading(&self) -> Result<()> {
        let Budget::Time(b) = self.planner.budget() else {
            return Ok(());
        };
        let history = History::read(&self.history_path());
        let step_s = history
            .as_ref()
            .map_or(0.0, |h| h.step_s_per_token * self.tokens_per_step as f64);
        let fresh = self.resumed_from.is_none();
        let before = if fresh {
            history.as_ref().map_or(0.0, |h| {
                h.eval_s_per_token * self.sizes.eval_tokens as f64
                    + if self.sizes.samples {
                        h.sample_s_per_token * self.sizes.sample_tokens as f64
                    } else {
                        0.0
                    }
            })
        } else {
            0.0
        };
        let after = budget::final_phases(&self.costs, &self.sizes, Some(step_s));
        let now = self.planner.elapsed().as_secs_f64();
        if now + before + step_s + after > b.as_secs_f64() {
            return Err(TrainError::Budget(format!(
                "the time budget ({}) is spent before training could start: setup and \
                 loading took {now:.1} s, and the evaluation and sample answers before \
                 training (~{before:.1} s), one step (~{step_s:.1} s) and the final \
                 checkpoint, export, evaluation and sample answers (~{after:.1} s) remain. \
                 Give a budget of at least {:.0} s",
                budget_left(b, self.planner.elapsed_before()),
                (now + before + step_s + after + budget::margin(b).as_secs_f64()).ceil()
            )));
        }
        Ok(())
    }

    /// Where this model's timings are kept for the next run's forecast.
    pub(super) fn history_path(&self) -> std::path::PathBuf {
        History::path(&self.cache_root, &self.model_dir, &history_key(&self.cfg))
    }

    /// Re-plans with the latest measured costs: the reserve for what follows the
    /// last step and the periodic evaluations and checkpoints.
    pub(super) fn replan_costs(&mut self) {
        let step_s = self.planner.step_seconds();
        if self.cfg.budget.reserve_seconds.is_none() {
            self.planner.set_reserve(reserve_for(
                self.planner.budget(),
                &self.costs,
                &self.sizes,
                step_s,
            ));
        }
        self.planner
            .set_periodic(periodic(&self.cfg, &self.costs, &self.sizes, step_s));
    }
}

/// How a run starts: the flags that decide what `check_inputs` may do.
struct Start<'a> {
    resume: Option<&'a Resume>,
    overwrite: bool,
    allow_data_change: bool,
    write_quota: Option<u64>,
    root: bool,
    cache_root: &'a Path,
}

/// Every input before anything expensive: the output directory (claimed by a
/// fresh run), the checkpoint (a finished run ends here: `Err(summary)`), the
/// device, the model's files and tokenizer, the data files.
fn check_inputs(
    cfg: RunConfig,
    start: &Start<'_>,
) -> Result<std::result::Result<Inputs, RunSummary>> {
    let out_dir = cfg.checkpoint.output_dir.clone();
    let ckpt_root = out_dir.join("checkpoints");
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| TrainError::Other(format!("{}: {e}", out_dir.display())))?;
    if start.root {
        // An adapter export a kill interrupted (see `ckpt_io::write_dir_atomic`).
        crate::ckpt_io::remove_stale_with_prefix(
            &out_dir,
            &format!("{}adapter-", crate::ckpt_io::TMP_PREFIX),
        )?;
    }
    // The checkpoint first: it decides the data position, and whether anything is
    // left to do.
    let resumed: Option<Resumed> = match start.resume {
        None => {
            resume::claim_output(&out_dir, &ckpt_root, start.overwrite, start.root)?;
            None
        }
        Some(r) => Some(resume::open(&ckpt_root, r, &cfg)?),
    };
    if let Some(r) = &resumed {
        if let Some(summary) = r.finished_summary(&cfg, &out_dir) {
            if start.root {
                // A kill between the final checkpoint and the export would otherwise
                // leave no (or an older) adapter beside a finished run.
                resume::restore_adapter(&r.dir, &summary.adapter_dir, start.write_quota)?;
            }
            return Ok(Err(summary));
        }
        if start.root {
            crate::ckpt_io::remove_stale_temporaries(&ckpt_root)?;
        }
    }
    let device = models::device(&cfg.model.device)?;
    let (dtype, gpu) = models::resolve_dtype(&cfg.model.dtype, &device)?;
    if let (Some(g), "fp8") = (&gpu, cfg.train.precision.as_str()) {
        let (major, minor) = g.compute_capability;
        if (major, minor) < (8, 9) {
            return Err(TrainError::Other(format!(
                "train.precision = \"fp8\": FP8 tensor cores need compute capability 8.9 or \
                 newer (Ada: L4, L40S, RTX 40xx; Hopper: H100, H200); {} has {major}.{minor}. \
                 Use train.precision = \"auto\"",
                g.name
            )));
        }
    }
    let model_dir = models::resolve(&cfg.model.path, start.cache_root)?;
    let model_cfg = qtrain_model::ModelConfig::from_file(&model_dir.join("config.json"))?;
    let encoder = Arc::new(Encoder::from_model_dir(
        &model_dir,
        &cfg.data.chat_template,
    )?);
    let data_files = resume::identify_data(&cfg.data)?;
    if let Some(r) = &resumed {
        resume::check_data_files(r, &data_files, start.allow_data_change)?;
    }
    let lcfg = lora_config(&cfg)?;
    Ok(Ok(Inputs {
        sizes: sizes(&cfg, &model_cfg, &lcfg),
        budget: cfg.budget_kind().unwrap_or(Budget::Steps(100)),
        cfg,
        resumed,
        device,
        dtype,
        gpu,
        model_dir,
        encoder,
        data_files,
        lcfg,
        accounting: Accounting::default(),
    }))
}

/// A time budget the fixed costs do not fit (forecast from the timings of the last
/// run of this model here, else its size) is refused before anything is loaded.
fn refuse_budget_before_loading(
    inputs: &Inputs,
    clock: &Arc<dyn Clock>,
    cache_root: &Path,
) -> Result<()> {
    let Budget::Time(b) = inputs.budget else {
        return Ok(());
    };
    let elapsed_before = inputs.resumed.as_ref().map_or(Duration::ZERO, |r| {
        Duration::from_secs_f64(r.state.planner.elapsed_secs)
    });
    let history_path = History::path(cache_root, &inputs.model_dir, &history_key(&inputs.cfg));
    let forecast = Forecast::new(
        History::read(&history_path).as_ref(),
        &history_path,
        budget::model_bytes(&inputs.model_dir),
        &inputs.sizes,
        inputs.resumed.is_none(),
    );
    let spent = elapsed_before + clock.now();
    let left = b.saturating_sub(spent);
    if forecast.minimum() <= left.as_secs_f64() {
        return Ok(());
    }
    Err(TrainError::Budget(format!(
        "the time budget ({}) cannot hold this run's fixed costs and one step; nothing was \
         loaded. Forecast: {}. Give a budget of at least {:.0} s",
        budget_left(b, elapsed_before),
        forecast.describe(),
        (forecast.minimum() + spent.as_secs_f64() + budget::margin(b).as_secs_f64()).ceil()
    )))
}

/// The adapters (fresh or from the checkpoint), the optimizer, the backend, the
/// step's shape and the data stream, on the loaded base.
fn build(
    inputs: &Inputs,
    base: &BaseModel,
    coll: &dyn qtrain_dist::Collective,
    engine_memory_limit: Option<usize>,
) -> Result<Built> {
    let cfg = &inputs.cfg;
    let mut lora = LoraWeights::init(&inputs.lcfg, &base.config, &inputs.device)?;
    let params = lora.to_host()?;
    let specs: Vec<ParamSpec> = params
        .iter()
        .map(|(n, v, _)| ParamSpec::new(n.clone(), v.len()))
        .collect();
    let resume_dir = inputs.resumed.as_ref().map(|r| r.dir.clone());
    let opt = make_optimizer(
        cfg,
        &specs,
        resume_dir
            .as_ref()
            .map(|d| d.join(OPTIMIZER_FILE))
            .as_deref(),
    )?;
    if let Some(dir) = &resume_dir {
        lora.update_from_host(&load_lora(&dir.join(ADAPTER_FILE), &params)?)?;
    }
    let engine = EngineKind::for_model(
        &cfg.train.engine,
        base.device.is_cuda(),
        base.dtype,
        &base.config,
    )
    .map_err(TrainError::Other)?;
    let mut backend = Backend::new(base, lora, opt, engine)?;
    backend.set_memory_limit(engine_memory_limit);
    backend.set_chunks(cfg.train.mlp_chunk_tokens, cfg.train.loss_chunk_tokens);
    let attn_bwd =
        qtrain_engine::AttnBackward::parse(&cfg.train.attention_backward).unwrap_or_default(); // validated with the config
    backend.set_attention_backward(attn_bwd);
    // The fused engine's device (the reference path runs no attention kernels).
    let unsupported = match backend.engine_device() {
        Some(dev) => qtrain_device::ops::attention::backward_unsupported(
            &dev,
            attn_bwd,
            base.config.head_dim(),
        )?,
        None => None,
    };
    if let Some(why) = unsupported {
        return Err(TrainError::Other(format!(
            "train.attention_backward = {attn_bwd}: {why}; use `split` here"
        )));
    }
    if attn_bwd != qtrain_engine::AttnBackward::Split && base.device.is_cuda() {
        // Measured: correct, but the fused ones' dQ accumulation is latency-bound (v8),
        // and the stored dS's trip through memory costs more than the products it saves
        // (v20).
        tracing::warn!(
            "train.attention_backward = {attn_bwd}: slower than `split` today (the attention \
             backward 3.0x fused, 2.2x fused-atomic on an H100; the step 1.9% slower with \
             stored-ds at 1 x 8192); `split` is the fast choice"
        );
    }
    if !attn_bwd.reproducible() {
        tracing::warn!(
            "train.attention_backward = {attn_bwd}: dQ is summed with atomic adds, so two runs \
             (and a resumed run against an uninterrupted one) differ in the last bits"
        );
    }
    if cfg.train.precision == "fp8" {
        backend.set_fp8_base(true)?;
        tracing::info!(
            "train.precision = fp8: the frozen base's products run in FP8 E4M3 (per-token and \
             per-channel scales); LoRA, norms, attention and the loss in {:?}",
            base.dtype
        );
    }
    let state = inputs.resumed.as_ref().map(|r| &r.state);
    let gpu = inputs.gpu.as_ref();
    let shape = micro::resolve_step_shape(
        cfg,
        base,
        &backend,
        gpu,
        engine_memory_limit,
        state.and_then(|s| s.micro_batch),
    )?;
    let data_cfg = shape.data_config(&cfg.data);
    let offload =
        micro::offload_checkpoints(cfg, base, &backend, gpu, engine_memory_limit, &shape)?;
    backend.set_offload_checkpoints(offload);
    let kept = micro::kept_activations(cfg, base, &backend, gpu, engine_memory_limit, &shape);
    backend.set_kept_activations(kept);
    if offload {
        // Told after the kept activations are decided: a kept attention half
        // travels with its layer's input.
        let layout = backend.workspace_layout(shape.micro_rows, cfg.data.seq_len);
        tracing::info!(
            "offloading the gradient checkpoints to pinned host memory \
             (train.offload_checkpoints = {}): {:.0} MiB on the host, a ring of {} layers' \
             {} on the GPU",
            cfg.train.offload_checkpoints,
            layout.map_or(0.0, |l| crate::memory::mib(l.host_bytes() as u64)),
            qtrain_engine::OFFLOAD_RING,
            crate::memory::offloaded_checkpoints(kept.attention_residuals)
        );
    }
    if kept.attention_residuals {
        tracing::info!(
            "keeping each layer's attention residual (train.keep_attention_residuals = {}): \
             the backward skips recomputing the o projection",
            cfg.train.keep_attention_residuals
        );
    }
    if kept.mlp_layers > 0 {
        let layers = base.config.num_hidden_layers;
        tracing::info!(
            "keeping the gate/up output of {} of {layers} layers (train.keep_mlp_activations = {}): \
             the backward skips recomputing their gate/up product",
            kept.mlp_layers.min(layers),
            cfg.train.keep_mlp_activations
        );
    }
    if kept.dequantized_base {
        tracing::info!(
            "keeping the frozen base dequantized (train.keep_dequantized_base = {}): no NF4 \
             dequantization after the first step",
            cfg.train.keep_dequantized_base
        );
    }
    // Every rank starts from rank 0's adapters and must read the same data.
    backend.broadcast_params(coll)?;
    // An optimizer step's data batches are split over the ranks (so a resume on
    // another number of GPUs trains the same steps); each rank cuts its own into
    // micro-batches.
    let sharding = StepSharding::new(shape.data_batches, coll.world_size()).map_err(|e| {
        TrainError::Other(format!(
            "data parallel: {e}{}",
            if cfg.data.batch_size_is_auto() {
                " (data.batch_size = \"auto\" makes one data batch per step: with several \
                 GPUs set data.batch_size and train.grad_accum instead)"
            } else {
                ""
            }
        ))
    })?;
    let stream = match state {
        Some(st) => BatchStream::resume(&data_cfg, inputs.encoder.clone(), &st.data_cursor)?,
        None => BatchStream::new(&data_cfg, inputs.encoder.clone())?,
    };
    // fp16 (7.x GPUs) trains with a dynamic loss scale, resumed with the run.
    let scaler = (inputs.dtype == candle_core::DType::F16).then(|| {
        state
            .and_then(|s| s.loss_scaler.clone())
            .unwrap_or_default()
    });
    Ok(Built {
        tokens_per_step: (shape.rows_per_step() * cfg.data.seq_len) as u64,
        backend,
        shape,
        data_cfg,
        stream,
        sharding,
        scaler,
    })
}

/// "`240 s`" or "`240 s, 200 s of it spent before this resume`".
pub(super) fn budget_left(b: Duration, before: Duration) -> String {
    if before.is_zero() {
        budget::format_secs(b.as_secs_f64())
    } else {
        format!(
            "{}, {} of it spent before this resume",
            budget::format_secs(b.as_secs_f64()),
            budget::format_secs(before.as_secs_f64())
        )
    }
}

/// The time kept after the last step: the final phases plus the safety margin
/// (time budgets; a step budget needs none).
fn reserve_for(
    budget: Budget,
    costs: &crate::budget::PhaseCosts,
    sizes: &Sizes,
    step_s: Option<f64>,
) -> Duration {
    match budget {
        Budget::Time(b) => {
            Duration::from_secs_f64(budget::final_phases(costs, sizes, step_s)) + budget::margin(b)
        }
        Budget::Steps(_) => Duration::ZERO,
    }
}

/// The periodic evaluations and checkpoints of `cfg` with their measured (else
/// predicted) costs.
fn periodic(
    cfg: &RunConfig,
    costs: &crate::budget::PhaseCosts,
    sizes: &Sizes,
    step_s: Option<f64>,
) -> Periodic {
    let only_eval = Sizes {
        final_eval: true,
        samples: false,
        checkpoint_bytes: 0,
        adapter_bytes: 0,
        ..*sizes
    };
    let eval_costs = crate::budget::PhaseCosts {
        ckpt_s: Some(0.0),
        ..costs.clone()
    };
    Periodic {
        eval_every_steps: cfg.eval.every_steps,
        eval_secs: budget::final_phases(&eval_costs, &only_eval, step_s),
        ckpt_every_steps: cfg.checkpoint.every_steps,
        ckpt_every_secs: cfg.checkpoint.every_minutes * 60.0,
        ckpt_secs: costs
            .ckpt_s
            .unwrap_or(sizes.checkpoint_bytes as f64 / 100e6),
    }
}

/// The sizes the budget's predictions scale with, before anything is loaded (the
/// optimizer's bytes are refined once it exists).
fn sizes(cfg: &RunConfig, model: &qtrain_model::ModelConfig, lcfg: &LoraConfig) -> Sizes {
    let params: u64 = lcfg
        .targets
        .iter()
        .map(|&p| {
            let [out, inp] = model.proj_shape(p);
            (lcfg.rank * (out + inp)) as u64
        })
        .sum::<u64>()
        * model.num_hidden_layers as u64;
    let state_per_param = if cfg.optimizer.kind == "adamw32" {
        8
    } else {
        2
    };
    let rows = if cfg.data.batch_size_is_auto() {
        cfg.train.effective_batch.unwrap_or(1)
    } else {
        cfg.data.batch_size * cfg.train.grad_accum
    };
    let eval_rows = if cfg.data.batch_size_is_auto() {
        cfg.train.effective_batch.unwrap_or(1)
    } else {
        cfg.data.batch_size
    };
    Sizes {
        adapter_bytes: params * 4,
        checkpoint_bytes: params * (4 + state_per_param),
        eval_tokens: (cfg.eval.max_batches * eval_rows * cfg.data.seq_len) as u64,
        step_tokens: (rows * cfg.data.seq_len) as u64,
        sample_tokens: (cfg.eval.samples * cfg.eval.max_new_tokens) as u64,
        final_eval: true,
        samples: cfg.eval.samples > 0,
    }
}

/// What the timing history of a model depends on besides the model.
fn history_key(cfg: &RunConfig) -> String {
    let m = &cfg.model;
    format!(
        "{}|{}|{}|{}|{}",
        m.device, m.dtype, m.quantization, m.double_quant, m.quantized_cache
    )
}

fn load_base(
    cfg: &RunConfig,
    model_dir: &Path,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    cache_root: &Path,
) -> Result<BaseModel> {
    let load = LoadOptions {
        device: device.clone(),
        dtype,
        quantization: cfg.model.quantization_spec(),
        threads: 0,
    };
    Ok(if cfg.model.quantized_cache {
        let (m, outcome) =
            qtrain_model::bnb::load_cached(model_dir, &load, &cache_root.join("nf4"))?;
        tracing::info!("quantized cache: {outcome:?}");
        m
    } else {
        BaseModel::load(model_dir, &load)?
    })
}

pub(super) fn lora_config(cfg: &RunConfig) -> Result<LoraConfig> {
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

/// The PEFT settings of adapters trained with `lcfg` on `base_model`.
pub(super) fn peft_settings(lcfg: &LoraConfig, base_model: &str) -> PeftSettings {
    PeftSettings {
        rank: lcfg.rank,
        alpha: lcfg.alpha,
        dropout: lcfg.dropout,
        targets: lcfg.targets.clone(),
        rslora: lcfg.rslora,
        base_model: base_model.to_string(),
    }
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

pub(super) fn progress_bar(cfg: &RunConfig, plan: &Plan) -> indicatif::ProgressBar {
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
