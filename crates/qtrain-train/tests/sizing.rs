//! The memory model against what the engine really allocates, and the trainer's
//! micro-batch sizing and out-of-memory recovery, on the tiny CPU model. The
//! out-of-memory is real allocation failure: the fused engine's `Dev` gets a byte
//! cap (`RunOptions::engine_memory_limit`) between the needs of two micro-batches.

use candle_core::DType;
use qtrain_engine::{Engine, EngineOptions};
use qtrain_model::Proj;
use qtrain_optim::{AdamW8bit, AdamWConfig, ParamSpec};
use qtrain_step::{LoraConfig, LoraWeights, StepOptions, TokenBatch};
use qtrain_train::config::RunConfig;
use qtrain_train::memory::{Category, EngineKind, MemorySpec, OptimizerPlace};
use qtrain_train::trainer::{run, RunOptions, RunSummary, TrainError, TrainerState};
use qtrain_train::SimClock;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn config(out: &Path, steps: u64, extra: &str) -> RunConfig {
    let text = format!(
        r#"
[model]
path = "builtin:tiny"
device = "cpu"
[lora]
targets = ["q_proj", "v_proj", "down_proj"]
dropout = 0.1
[data]
seq_len = 48
eval_samples = 2
{extra}
[optimizer]
lr = 3e-3
warmup_steps = 2
[budget]
steps = {steps}
[checkpoint]
output_dir = "{}"
every_steps = 1
every_minutes = 0.0
keep_last = 20
[eval]
every_steps = 0
max_batches = 1
samples = 0
[log]
progress_bar = false
"#,
        out.display()
    );
    RunConfig::from_toml_str(&text, Path::new("test.toml"), &[]).unwrap()
}

// The trainer's error carries its context inline; boxing it for a test buys nothing.
#[allow(clippy::result_large_err)]
fn go(cfg: RunConfig, cache: &Path, limit: Option<usize>) -> Result<RunSummary, TrainError> {
    run(RunOptions {
        engine_memory_limit: limit,
        ..opts(cfg, cache)
    })
}

fn tiny_config(cache: &Path) -> qtrain_model::ModelConfig {
    let dir = qtrain_train::models::resolve("builtin:tiny", cache).unwrap();
    qtrain_model::ModelConfig::from_file(&dir.join("config.json")).unwrap()
}

/// The engine bytes the memory model predicts for `cfg` at micro-batch `rows`.
fn engine_bytes(cfg: &RunConfig, cache: &Path, rows: usize) -> u64 {
    let model = tiny_config(cache);
    MemorySpec::for_run(
        cfg,
        &model,
        DType::F32,
        EngineKind::Fused,
        rows,
        cfg.data.seq_len,
        None,
    )
    .predict()
    .engine_bytes
}

fn state(summary_dir: &Path, step: u64) -> TrainerState {
    let p = summary_dir
        .join("checkpoints")
        .join(qtrain_train::ckpt_io::step_dir_name(step))
        .join("trainer_state.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v.get("loss")?.as_f64()
        })
        .collect()
}

/// The model's prediction is exactly what the engine holds on the CPU after a step,
/// and its frozen and optimizer lines are what the loaded model and the optimizer
/// report.
#[test]
fn memory_model_matches_the_engine_the_model_and_the_optimizer() {
    let cache = tempfile::tempdir().unwrap();
    let (base, _) =
        qtrain_train::models::load_base("builtin:tiny", "nf4", "cpu", "auto", cache.path())
            .unwrap();
    let out = tempfile::tempdir().unwrap();
    for (rows, dropout) in [(3usize, 0.1), (1, 0.0)] {
        let mut cfg = config(out.path(), 1, "batch_size = 4");
        cfg.lora.dropout = dropout;
        let spec = MemorySpec::for_run(
            &cfg,
            &base.config,
            DType::F32,
            EngineKind::Fused,
            rows,
            48,
            None,
        );
        let plan = spec.predict();
        let lcfg = LoraConfig {
            rank: cfg.lora.rank,
            alpha: cfg.lora.alpha,
            dropout,
            targets: vec![Proj::Q, Proj::V, Proj::Down],
            rslora: false,
            seed: 0,
        };
        let lora = LoraWeights::init(&lcfg, &base.config, &base.device).unwrap();
        let mut engine = Engine::<f32>::new(&base, &lora, EngineOptions::default()).unwrap();
        let ids: Vec<Vec<u32>> = (0..rows)
            .map(|r| {
                (0..48)
                    .map(|t| 3 + ((r * 48 + t) * 7 % 300) as u32)
                    .collect()
            })
            .collect();
        let batch = TokenBatch::from_rows(&ids).unwrap();
        let so = StepOptions {
            checkpointing: true,
            dropout_seed: 1,
            micro_step: 0,
        };
        engine.forward_backward(&batch, &so, 100.0).unwrap();
        // Exactly: the adapters' buffers plus the workspace's WorkspaceLayout.
        let ws = spec.workspace_layout().total_bytes() as u64;
        let numel: usize = lora.to_host().unwrap().iter().map(|t| t.1.len()).sum();
        assert_eq!(plan.lora_params, numel);
        assert_eq!(
            plan.engine_bytes,
            ws + qtrain_engine::device_lora_bytes(numel, 4) as u64
        );
        assert_eq!(engine.device().held_bytes() as u64, plan.engine_bytes);
        assert_eq!(engine.device().peak_bytes() as u64, plan.engine_bytes);
        assert_eq!(
            plan.bytes_of(|c| matches!(c, Category::Workspace(_))),
            ws,
            "{}",
            plan.table()
        );
        // The frozen lines are the loaded model's storage, the optimizer line the
        // 8-bit AdamW's state.
        assert_eq!(
            plan.bytes_of(|c| c == Category::Frozen),
            base.storage_bytes() as u64
        );
        assert_eq!(spec.optimizer, OptimizerPlace::Resident);
        let specs: Vec<ParamSpec> = lora
            .to_host()
            .unwrap()
            .iter()
            .map(|(n, v, _)| ParamSpec::new(n.clone(), v.len()))
            .collect();
        let opt = AdamW8bit::new(AdamWConfig::default(), &specs).unwrap();
        assert_eq!(
            plan.bytes_of(|c| c == Category::Optimizer),
            opt.state_bytes()
        );
    }
}

/// An allocation failure in the middle of a run: with `train.oom = "retry"` the
/// trainer checkpoints, halves the micro-batch and trains on exactly the same rows
/// per step as a run that never ran out of memory.
#[test]
fn out_of_memory_retry_keeps_the_effective_batch_and_the_data_order() {
    let cache = tempfile::tempdir().unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = "batch_size = 4\n[train]\ngrad_accum = 2\nengine = \"fused\"";
    let steps = 4;
    // Without dropout: the cut batches then compute the very same function (with
    // dropout, the second micro-batch of a cut batch draws its own masks).
    let cfg_for = |out: &Path| {
        let mut c = config(out, steps, extra);
        c.lora.dropout = 0.0;
        c
    };
    let cfg = cfg_for(a.path());
    let (two, four) = (
        engine_bytes(&cfg, cache.path(), 2),
        engine_bytes(&cfg, cache.path(), 4),
    );
    assert!(two < four);
    let limit = ((two + four) / 2) as usize;
    let plain = go(cfg, cache.path(), None).unwrap();
    let retried = go(cfg_for(b.path()), cache.path(), Some(limit)).unwrap();
    assert_eq!((plain.steps, retried.steps), (steps, steps));
    assert_eq!(plain.tokens, retried.tokens);
    // The out-of-memory checkpoint of the last completed step (none yet: step 0),
    // already holding the halved micro-batch.
    let at_oom = state(b.path(), 0);
    assert_eq!(at_oom.micro_batch, Some(2));
    assert_eq!(at_oom.step, 0);
    for step in 1..=steps {
        let (x, y) = (state(a.path(), step), state(b.path(), step));
        // The same batches consumed, step by step: identical data cursors.
        assert_eq!(x.data_cursor, y.data_cursor, "step {step}");
        assert_eq!(x.tokens_seen, y.tokens_seen);
        assert_eq!((x.micro_batch, y.micro_batch), (Some(4), Some(2)));
    }
    // The same rows give the same losses (up to the order of the gradient sums).
    let (la, lb) = (losses(a.path()), losses(b.path()));
    assert_eq!(la.len(), steps as usize);
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-4 * x.abs(), "{la:?} vs {lb:?}");
    }
}

/// With `train.oom = "stop"` the run ends with a checkpoint and names what to lower.
#[test]
fn out_of_memory_stop_checkpoints_and_names_the_settings() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let extra = "batch_size = 4\n[train]\nengine = \"fused\"\noom = \"stop\"";
    let cfg = config(out.path(), 3, extra);
    let limit =
        ((engine_bytes(&cfg, cache.path(), 2) + engine_bytes(&cfg, cache.path(), 4)) / 2) as usize;
    let e = go(cfg, cache.path(), Some(limit)).unwrap_err();
    let TrainError::OutOfMemoryStop(msg) = &e else {
        panic!("{e}")
    };
    for needle in [
        "out of GPU memory at step 0",
        "4 x 48",
        "data.batch_size",
        "data.seq_len",
        "lora.targets",
        "train.oom = \"retry\"",
    ] {
        assert!(msg.contains(needle), "{needle} missing: {msg}");
    }
    let ckpt = out.path().join("checkpoints").join("step-00000000");
    assert!(msg.contains(&ckpt.display().to_string()), "{msg}");
    qtrain_train::ckpt_io::verify(&ckpt).unwrap();
    assert_eq!(state(out.path(), 0).micro_batch, Some(4));
}

/// An out-of-memory in the evaluation before the first step: retried with smaller
/// micro-batches (which training then keeps), or stopped with nothing to save.
#[test]
fn out_of_memory_in_the_first_evaluation() {
    let cache = tempfile::tempdir().unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with = |out: &Path, oom: &str| {
        let extra = format!("batch_size = 4\n[train]\nengine = \"fused\"\noom = \"{oom}\"");
        let mut c = config(out, 2, &extra);
        // Enough held-out records for evaluation batches of 4 rows.
        c.data.eval_samples = Some(40);
        c
    };
    let cfg = with(a.path(), "retry");
    let limit =
        ((engine_bytes(&cfg, cache.path(), 2) + engine_bytes(&cfg, cache.path(), 4)) / 2) as usize;
    let s = go(cfg, cache.path(), Some(limit)).unwrap();
    assert_eq!(s.steps, 2);
    assert!(s.first_eval_loss.is_some());
    assert_eq!(state(a.path(), 2).micro_batch, Some(2));
    let e = go(with(b.path(), "stop"), cache.path(), Some(limit))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("evaluating before training") && e.contains("nothing was trained yet"),
        "{e}"
    );
    assert!(!b.path().join("checkpoints").exists());
}

/// `data.batch_size = "auto"` picks the largest micro-batch the memory model fits
/// under the limit (no out-of-memory happens) and trains on the same rows as the
/// unlimited run, in more passes.
#[test]
fn auto_batch_size_fits_the_limit_and_keeps_the_data() {
    let cache = tempfile::tempdir().unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = "batch_size = \"auto\"\n[train]\neffective_batch = 8\nengine = \"fused\"";
    let cfg = config(a.path(), 2, extra);
    let (three, four) = (
        engine_bytes(&cfg, cache.path(), 3),
        engine_bytes(&cfg, cache.path(), 4),
    );
    let whole = go(cfg, cache.path(), None).unwrap();
    let fitted = go(
        config(b.path(), 2, extra),
        cache.path(),
        Some(((three + four) / 2) as usize),
    )
    .unwrap();
    assert_eq!(whole.tokens, fitted.tokens);
    assert_eq!(whole.tokens, 2 * 8 * 48);
    for step in 1..=2 {
        let (x, y) = (state(a.path(), step), state(b.path(), step));
        assert_eq!((x.micro_batch, y.micro_batch), (Some(8), Some(3)));
        assert_eq!(x.data_cursor, y.data_cursor);
    }
    // No out-of-memory checkpoint: the first checkpoint is step 1's.
    assert!(!b.path().join("checkpoints").join("step-00000000").exists());
}

/// fp16 (what 7.x GPUs train in) with the dynamic loss scaler, on the reference
/// step: the run trains, the scaler's state is in every checkpoint, and a resume
/// continues it exactly.
#[test]
fn fp16_runs_with_a_checkpointed_loss_scaler() {
    fp16_run_with_scaler("reference");
}

/// The same with the fused engine in fp16 (what `train.engine = "auto"` picks on a
/// 7.x GPU), here on the CPU kernels.
#[test]
fn fp16_fused_engine_runs_with_a_checkpointed_loss_scaler() {
    fp16_run_with_scaler("fused");
}

fn fp16_run_with_scaler(engine: &str) {
    let cache = tempfile::tempdir().unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = format!("batch_size = 4\n[train]\nengine = \"{engine}\"");
    let cfg_for = |out: &Path| {
        let mut c = config(out, 4, &extra);
        c.model.dtype = "f16".into();
        c
    };
    let full = go(cfg_for(a.path()), cache.path(), None).unwrap();
    assert_eq!(full.steps, 4);
    assert!(full.last_train_loss.unwrap().is_finite());
    let st = state(a.path(), 4);
    let scaler = st
        .loss_scaler
        .clone()
        .expect("fp16 runs carry a loss scaler");
    assert!(
        scaler.scale() >= 1.0 && scaler.scale() <= 65536.0,
        "{scaler:?}"
    );
    // f32 runs carry none.
    assert!(state_of_f32(cache.path()).loss_scaler.is_none());
    // Interrupted after 2 steps and resumed: the same adapter as the full run.
    run(RunOptions {
        halt_at_step: Some(2),
        ..opts(cfg_for(b.path()), cache.path())
    })
    .unwrap();
    let rest = run(RunOptions {
        resume: Some(qtrain_train::trainer::Resume::Latest),
        ..opts(cfg_for(b.path()), cache.path())
    })
    .unwrap();
    assert_eq!(rest.steps, 4);
    assert_eq!(state(b.path(), 4).loss_scaler, st.loss_scaler);
    let read =
        |s: &RunSummary| std::fs::read(s.adapter_dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(read(&full), read(&rest));
}

fn opts(cfg: RunConfig, cache: &Path) -> RunOptions {
    RunOptions {
        config: cfg,
        resume: None,
        clock: Box::new(SimClock::default()),
        stop: Arc::new(AtomicBool::new(false)),
        halt_at_step: None,
        cache_root: cache.to_path_buf(),
        engine_memory_limit: None,
        overwrite: false,
        allow_data_change: false,
        write_quota: None,
        collective: std::sync::Arc::new(qtrain_dist::SingleProcess),
    }
}

fn state_of_f32(cache: &Path) -> TrainerState {
    let out = tempfile::tempdir().unwrap();
    go(config(out.path(), 1, "batch_size = 2"), cache, None).unwrap();
    state(out.path(), 1)
}

/// Kept attention residuals that do not fit are the first memory given back: the run
/// keeps its micro-batch and trains bit for bit what a run without them trains.
#[test]
fn out_of_memory_gives_back_the_attention_residuals_first() {
    gives_back_kept_activations(false, false);
}

/// With the gate/up outputs kept too and room for the residuals only, the gate/up
/// outputs go first and the run still trains bit for bit the same, at the same
/// micro-batch.
#[test]
fn out_of_memory_gives_back_the_mlp_activations_before_the_residuals() {
    gives_back_kept_activations(true, false);
}

/// With the dequantized base kept too and room for the activations only, the base
/// goes first and the run still trains bit for bit the same, at the same
/// micro-batch.
#[test]
fn out_of_memory_gives_back_the_dequantized_base_before_the_activations() {
    gives_back_kept_activations(true, true);
}

fn gives_back_kept_activations(mlp: bool, base: bool) {
    let cache = tempfile::tempdir().unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = 3;
    let cfg_for = |out: &Path, keep: &str| {
        let mut c = config(out, steps, "batch_size = 4\n[train]\nengine = \"fused\"");
        c.train.keep_attention_residuals = keep.into();
        c.train.keep_mlp_activations = if mlp { keep.into() } else { "off".into() };
        c.train.keep_dequantized_base = if base { keep.into() } else { "off".into() };
        // Rows long enough that the residuals (layers x tokens x hidden) outweigh the
        // few small buffers a step allocates beside the plan on the CPU.
        c.data.seq_len = 192;
        c
    };
    let off = cfg_for(a.path(), "off");
    let engine_with = |residuals: bool, mlp: bool, base: bool| {
        let mut spec = MemorySpec::for_run(
            &off,
            &tiny_config(cache.path()),
            DType::F32,
            EngineKind::Fused,
            4,
            off.data.seq_len,
            None,
        );
        spec.engine_options.save_attention_residual = residuals;
        spec.engine_options.kept_mlp_layers = if mlp { qtrain_engine::ALL_LAYERS } else { 0 };
        spec.engine_options.keep_dequantized_base = base;
        spec.predict().engine_bytes
    };
    let without = engine_bytes(&off, cache.path(), 4);
    assert_eq!(without, engine_with(false, false, false));
    let (with, both) = (
        engine_with(true, false, false),
        engine_with(true, true, false),
    );
    let all = engine_with(true, true, true);
    assert!(without < with && with < both && both < all);
    let plain = go(off, cache.path(), None).unwrap();
    // Room for the activations, not for the base (base) / for the residuals, not
    // for the gate/up outputs (mlp) / not for the residuals (residuals only).
    let limit = if base {
        ((both + all) / 2) as usize
    } else if mlp {
        ((with + both) / 2) as usize
    } else {
        ((without + with) / 2) as usize
    };
    let kept = go(cfg_for(b.path(), "on"), cache.path(), Some(limit)).unwrap();
    assert_eq!((plain.steps, kept.steps), (steps, steps));
    for step in 1..=steps {
        assert_eq!(state(b.path(), step).micro_batch, Some(4), "step {step}");
    }
    let read =
        |s: &RunSummary| std::fs::read(s.adapter_dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(read(&plain), read(&kept));
    assert_eq!(losses(a.path()), losses(b.path()));
}

/// `train.offload_checkpoints = "on"` trains the fused engine exactly as `off`: the
/// tiny model's first two layer inputs go through host memory and back every
/// pass, and the losses and the adapters come out bit-identical.
#[test]
fn offloaded_checkpoints_train_the_same_adapters() {
    let cache = tempfile::tempdir().unwrap();
    let run_with = |policy: &str| {
        let out = tempfile::tempdir().unwrap();
        let extra = format!(
            "batch_size = 2\n[train]\nengine = \"fused\"\noffload_checkpoints = \"{policy}\""
        );
        let summary = go(config(out.path(), 3, &extra), cache.path(), None).unwrap();
        let adapter = qtrain_train::peft::read_peft_adapter(&summary.adapter_dir)
            .unwrap()
            .tensors;
        (losses(out.path()), adapter)
    };
    let (on, off) = (run_with("on"), run_with("off"));
    assert_eq!(on.0.len(), 3, "{:?}", on.0);
    assert_eq!(on.0, off.0);
    assert_eq!(on.1, off.1);
}

/// `qtrain bench`'s memory limit on the CPU: the cap covers the frozen base and the
/// engine's buffers; with offloading on the case runs inside it and reports it,
/// and a cap below what the case needs fails as an out-of-memory.
#[test]
fn bench_memory_limit_caps_the_engine_and_reports_offload() {
    use qtrain_train::bench::{run_case, BenchModel, BenchOptions};
    let cache = tempfile::tempdir().unwrap();
    let (base, _) =
        qtrain_train::models::load_base("builtin:tiny", "nf4", "cpu", "auto", cache.path())
            .unwrap();
    let frozen = base.storage_bytes() as u64;
    let model = BenchModel {
        base,
        gpu: None,
        baseline_used: None,
        loaded_used: None,
        load_s: 0.0,
        cache: "test".into(),
    };
    let opts = |offload: &str, limit: Option<u64>| BenchOptions {
        targets: vec![Proj::Q, Proj::V],
        rank: 4,
        engine: "fused".into(),
        keep_residuals: "off".into(),
        keep_mlp: "off".into(),
        keep_base: "off".into(),
        offload: offload.into(),
        memory_limit: limit,
        warmup: 1,
        steps: 1,
        profile: false,
        precision: "auto".into(),
        mlp_chunk: 8192,
        loss_chunk: 1024,
        attention_backward: Default::default(),
    };
    let free = run_case(&model, &opts("on", None), 2, 32).unwrap();
    assert!(free.offload && free.memory_limit.is_none() && free.capped_peak.is_none());
    let host = free.host_bytes.unwrap();
    // 4 layers, ring of 2: two [64 tokens, 128] f32 inputs on the host.
    assert_eq!(host, 2 * 64 * 128 * 4);
    let need = frozen + free.engine_peak.unwrap() as u64 + 64 * 1024 * 1024;
    let capped = run_case(&model, &opts("on", Some(need)), 2, 32).unwrap();
    assert!(capped.offload);
    let peak = capped.capped_peak.unwrap();
    assert!(peak > frozen && peak <= need, "peak {peak} of {need}");
    let json = capped.record(&model, "2x32", "qv", 0.0);
    assert_eq!(json["offload_checkpoints"], true);
    assert_eq!(json["within_memory_limit"], true);
    assert!(json["memory_limit_mib"].as_f64().unwrap() > 0.0);
    // On the CPU there is no GPU to size `auto` against: the predicted whole-device
    // total (context included) does not fit a cap this small, so auto stays off.
    let auto = run_case(&model, &opts("auto", Some(need)), 2, 32);
    assert!(!auto.unwrap().offload);
    let e = run_case(&model, &opts("off", Some(frozen + 1024)), 2, 32)
        .err()
        .expect("a 1 KiB engine cap cannot hold the case")
        .to_string();
    assert!(e.contains("out of GPU memory"), "{e}");
}

/// `qtrain bench --precision fp8` on the CPU (the FP8 kernels' references): the case
/// trains, its memory prediction includes the FP8 buffers exactly, and it reports
/// the step against the compute type's: a small loss difference and gradients
/// pointing the same way (the bounds of the engine's FP8 tests).
#[test]
fn bench_fp8_reports_its_quality_against_the_compute_type() {
    use qtrain_train::bench::{run_case, BenchModel, BenchOptions};
    let cache = tempfile::tempdir().unwrap();
    let (base, _) =
        qtrain_train::models::load_base("builtin:tiny", "nf4", "cpu", "auto", cache.path())
            .unwrap();
    let model = BenchModel {
        base,
        gpu: None,
        baseline_used: None,
        loaded_used: None,
        load_s: 0.0,
        cache: "test".into(),
    };
    let opts = BenchOptions {
        targets: vec![Proj::Q, Proj::K, Proj::V, Proj::O],
        rank: 4,
        engine: "fused".into(),
        keep_residuals: "off".into(),
        keep_mlp: "off".into(),
        keep_base: "off".into(),
        offload: "off".into(),
        memory_limit: None,
        warmup: 1,
        steps: 2,
        profile: false,
        precision: "fp8".into(),
        mlp_chunk: 8192,
        loss_chunk: 1024,
        attention_backward: Default::default(),
    };
    let r = run_case(&model, &opts, 2, 32).unwrap();
    assert!(r.loss_falls(), "{:?}", r.losses);
    let q = r.fp8_quality.clone().expect("fp8 quality");
    assert!(q.loss_rel > 0.0 && q.loss_rel < 1.5e-2, "{q:?}");
    assert!(q.all_cosine > 0.97 && q.min_cosine > 0.9, "{q:?}");
    assert_eq!(
        r.predicted.engine_bytes as usize,
        r.engine_peak.unwrap(),
        "the memory model counts the FP8 buffers"
    );
    let json = r.record(&model, "2x32", "qkvo", 0.0);
    assert_eq!(json["fp8_base"], true);
    assert!(
        json["fp8_vs_compute_type"]["all_grad_cosine"]
            .as_f64()
            .unwrap()
            > 0.97
    );
}

/// `qtrain bench --mlp-chunk` / `train.mlp_chunk_tokens` and `--loss-chunk` /
/// `train.loss_chunk_tokens`: smaller MLP and cross-entropy chunks train the same
/// (identical losses: the chunks split the rows, not a reduction) in less memory, and
/// the memory model predicts the engine's buffers exactly either way.
#[test]
fn bench_smaller_chunks_train_the_same_in_less_memory() {
    use qtrain_train::bench::{run_case, BenchModel, BenchOptions};
    let cache = tempfile::tempdir().unwrap();
    let (base, _) =
        qtrain_train::models::load_base("builtin:tiny", "nf4", "cpu", "auto", cache.path())
            .unwrap();
    let (h, inter, vocab) = (
        base.config.hidden_size,
        base.config.intermediate_size,
        base.config.vocab_size,
    );
    let model = BenchModel {
        base,
        gpu: None,
        baseline_used: None,
        loaded_used: None,
        load_s: 0.0,
        cache: "test".into(),
    };
    let opts = |mlp_chunk, loss_chunk| BenchOptions {
        targets: vec![Proj::Q, Proj::K, Proj::V, Proj::O],
        rank: 4,
        engine: "fused".into(),
        keep_residuals: "off".into(),
        keep_mlp: "off".into(),
        keep_base: "off".into(),
        offload: "off".into(),
        memory_limit: None,
        warmup: 1,
        steps: 2,
        profile: false,
        precision: "auto".into(),
        mlp_chunk,
        loss_chunk,
        attention_backward: Default::default(),
    };
    let whole = run_case(&model, &opts(8192, 1024), 2, 32).unwrap();
    let mlp = run_case(&model, &opts(16, 1024), 2, 32).unwrap();
    let loss = run_case(&model, &opts(8192, 8), 2, 32).unwrap();
    assert_eq!(whole.losses, mlp.losses);
    assert_eq!(whole.losses, loss.losses);
    assert_eq!((whole.mlp_chunk, mlp.mlp_chunk), (8192, 16));
    assert_eq!((whole.loss_chunk, loss.loss_chunk), (1024, 8));
    for r in [&whole, &mlp, &loss] {
        assert_eq!(r.predicted.engine_bytes as usize, r.engine_peak.unwrap());
    }
    // 64 tokens against 16 per MLP chunk: the gate/up output (2I), the SwiGLU output
    // and its gradient (I each) for 48 tokens fewer, f32 on the CPU.
    let peak = |r: &qtrain_train::bench::CaseResult| r.engine_peak.unwrap();
    assert_eq!(peak(&whole) - peak(&mlp), 48 * 4 * inter * 4);
    // 64 rows against 8 per loss chunk: the logits and their gradient (V each) and the
    // gathered hidden rows and their gradient (h each) for 56 rows fewer.
    assert_eq!(peak(&whole) - peak(&loss), 56 * (2 * vocab + 2 * h) * 4);
    let record = mlp.record(&model, "2x32", "qkvo", 0.0);
    assert_eq!(record["mlp_chunk_tokens"], 16);
    assert_eq!(record["loss_chunk_tokens"], 1024);
    assert_eq!(
        loss.record(&model, "2x32", "qkvo", 0.0)["loss_chunk_tokens"],
        8
    );
}

/// The executed-FLOPs count of `qtrain bench` (`executed_tflops`) on the Mistral-7B
/// shape, against figures worked out by hand: 4P for the base, the recomputed
/// products by what is kept, attention 5.5 or 4.5 forwards (3.5 with the dS stored),
/// LoRA's four passes.
#[test]
fn executed_flops_count_what_the_step_runs() {
    use qtrain_train::bench::executed_flops_per_token;
    use qtrain_train::memory::KeptActivations;
    let split = qtrain_engine::AttnBackward::Split;
    let cfg = qtrain_model::ModelConfig::preset("mistral-7b-v0.3", 0).unwrap();
    let (l, h, kv, i, v) = (32.0, 4096.0, 1024.0, 14336.0, 32768.0);
    let (q, k, o, gu, down) = (h * h, kv * h, h * h, 2.0 * i * h, i * h);
    let p = l * (q + 2.0 * k + o + gu + down) + v * h;
    let qkvo = [Proj::Q, Proj::K, Proj::V, Proj::O];
    let none = executed_flops_per_token(&cfg, 2048, &qkvo, 16, KeptActivations::default(), split);
    let both = KeptActivations {
        attention_residuals: true,
        mlp_layers: 32,
        dequantized_base: false,
    };
    let kept = executed_flops_per_token(&cfg, 2048, &qkvo, 16, both, split);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    assert!(close(none.base, 4.0 * p) && close(kept.base, 4.0 * p));
    assert!(close(none.recompute, 2.0 * l * (q + 2.0 * k + o + gu)));
    assert!(close(kept.recompute, 0.0));
    // +0.0, not the -0.0 of an empty f64 sum (the bench JSON prints it)
    assert!(kept.recompute.is_sign_positive());
    // one causal forward per layer: 2 products x 2 FLOPs x 1024 keys x 4096 columns
    let fwd = l * 4.0 * 1024.0 * h;
    assert!(close(none.attention, 5.5 * fwd) && close(kept.attention, 4.5 * fwd));
    // With the dS stored, dQ runs one product per tile pair instead of three: one
    // forward's worth less, nothing else changes.
    let stored = executed_flops_per_token(
        &cfg,
        2048,
        &qkvo,
        16,
        both,
        qtrain_engine::AttnBackward::StoredDs,
    );
    assert!(close(stored.attention, 3.5 * fwd));
    assert!(close(stored.base, kept.base) && close(stored.lora, kept.lora));
    // r16 on q (4096+4096), k and v (1024+4096), o (4096+4096): forward, dX, dW;
    // recomputed: all of it, or with the attention half kept nothing (every
    // layer's z = x Aᵀ is kept too)
    let three = 3.0 * (2.0 * 8192.0 + 2.0 * 5120.0);
    let lora = |again: f64| l * 2.0 * 16.0 * (three + again);
    assert!(close(none.lora, lora(2.0 * 8192.0 + 2.0 * 5120.0)));
    assert!(close(kept.lora, lora(0.0)));
    // All seven, nothing kept: gate/up recomputed whole, down's z alone (its
    // output is the next layer's input, never recomputed); with the MLP kept,
    // down's z is kept too and only the attention half's adapters run again.
    let all = qtrain_model::PROJECTIONS;
    let mlp_only = KeptActivations {
        attention_residuals: false,
        mlp_layers: 32,
        dequantized_base: false,
    };
    let all_none =
        executed_flops_per_token(&cfg, 2048, &all, 16, KeptActivations::default(), split);
    let all_mlp = executed_flops_per_token(&cfg, 2048, &all, 16, mlp_only, split);
    let mlp_three = 3.0 * (2.0 * (4096.0 + 14336.0) + (14336.0 + 4096.0));
    let lora7 = |again: f64| l * 2.0 * 16.0 * (three + mlp_three + again);
    let attn_again = 2.0 * 8192.0 + 2.0 * 5120.0;
    assert!(close(
        all_none.lora,
        lora7(attn_again + 2.0 * (4096.0 + 14336.0) + 14336.0)
    ));
    assert!(close(all_mlp.lora, lora7(attn_again)));
    // A quarter of the layers keep their gate/up output: the others (24 of 32)
    // recompute its product and its adapters' z and B products; every layer's z is
    // kept (with a half kept), so the kept layers run no adapter again.
    let quarter = executed_flops_per_token(
        &cfg,
        2048,
        &all,
        16,
        KeptActivations {
            attention_residuals: true,
            mlp_layers: 8,
            dequantized_base: false,
        },
        split,
    );
    assert!(close(quarter.recompute, 2.0 * 24.0 * gu));
    assert!(close(
        quarter.lora,
        lora7(0.0) + 24.0 * 2.0 * 16.0 * 2.0 * (4096.0 + 14336.0)
    ));
    assert!(close(
        none.total(),
        none.base + none.recompute + none.attention + none.lora
    ));
}

/// `qtrain bench --attn-bwd` / `train.attention_backward`: the fused backwards add the
/// f32 accumulators (dQ: batch x whole 64-row tiles x heads x head_dim; with GQA the group's dK/dV: tokens x
/// kv_heads x 2 head_dim) and their turn counters to the attention scratch; the memory model predicts the engine exactly in every mode, and
/// the CPU (whose reference backward is exact in every mode) trains the same.
#[test]
fn bench_fused_attention_backward_is_sized_by_the_memory_model() {
    use qtrain_engine::AttnBackward;
    use qtrain_train::bench::{run_case, BenchModel, BenchOptions};
    let cache = tempfile::tempdir().unwrap();
    let (base, _) =
        qtrain_train::models::load_base("builtin:tiny", "nf4", "cpu", "auto", cache.path())
            .unwrap();
    let (heads, kv, d) = (
        base.config.num_attention_heads,
        base.config.num_kv_heads(),
        base.config.head_dim(),
    );
    let model = BenchModel {
        base,
        gpu: None,
        baseline_used: None,
        loaded_used: None,
        load_s: 0.0,
        cache: "test".into(),
    };
    let opts = |attention_backward| BenchOptions {
        targets: vec![Proj::Q, Proj::K, Proj::V, Proj::O],
        rank: 4,
        engine: "fused".into(),
        keep_residuals: "off".into(),
        keep_mlp: "off".into(),
        keep_base: "off".into(),
        offload: "off".into(),
        memory_limit: None,
        warmup: 1,
        steps: 2,
        profile: false,
        precision: "auto".into(),
        mlp_chunk: 8192,
        loss_chunk: 1024,
        attention_backward,
    };
    let runs: Vec<_> = AttnBackward::ALL
        .into_iter()
        .map(|m| run_case(&model, &opts(m), 2, 40).unwrap())
        .collect();
    for (r, m) in runs.iter().zip(AttnBackward::ALL) {
        assert_eq!(r.attention_backward, m);
        assert_eq!(r.losses, runs[0].losses);
        assert_eq!(r.predicted.engine_bytes as usize, r.engine_peak.unwrap());
        let rec = r.record(&model, "2x40", "qkvo", 0.0);
        assert_eq!(rec["attention_backward"], m.name());
        // The attention kernels the engine ran are recorded: on the CPU, the reference.
        assert_eq!(rec["attention_forward_kernel"], "reference");
        assert_eq!(rec["attention_split_kernels"], "reference");
    }
    // 80 tokens: the D terms (2 x heads x 40) rounded up to 16 bytes, 2 x heads x 2
    // dQ counters (one 64-query tile of two steps per row) and 2 x kv_heads dK/dV
    // counters (one key tile per row), then the dQ accumulator (whole 64-query tiles:
    // 2 x 64 rows) and, with GQA, the group's dK/dV accumulator.
    let stats = 2 * heads * 40;
    let turns = 2 * heads * 2 + 2 * kv;
    let kv_acc = if heads > kv { 80 * kv * 2 * d } else { 0 };
    let acc = 2 * 64 * heads * d + kv_acc;
    let fused_scratch = (stats.next_multiple_of(4) + turns).next_multiple_of(4) + acc;
    for (r, m) in runs.iter().zip(AttnBackward::ALL).skip(1) {
        let grown = r.engine_peak.unwrap() - runs[0].engine_peak.unwrap();
        if m == AttnBackward::StoredDs {
            // The D terms, then one 64 x 64 bf16 dS blob per (row, head): 40 tokens are
            // one tile, one causal pair.
            let blobs = 2 * heads * 64 * 64 * 2;
            assert_eq!(grown, 4 * (stats.next_multiple_of(4) - stats) + blobs);
        } else {
            assert_eq!(grown, 4 * (fused_scratch - stats));
        }
    }
}
