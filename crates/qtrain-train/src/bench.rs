//! Timing training steps on a model of real shape, for `qtrain bench`: full
//! optimizer steps (forward, backward with checkpointing, 8-bit AdamW update) of
//! either engine ([`Backend`]) on a fixed random batch after warm-up steps, with
//! the loss of each step (it must fall on a repeated batch), the phases' times,
//! peak device memory (the whole device as the driver reports it, and the engine's
//! own buffers) against the memory model's prediction, and optionally where one
//! step's GPU time goes.
//!
//! With a memory limit ([`BenchOptions::memory_limit`], `--memory-limit 24GiB`) a
//! bigger GPU runs as a smaller one would: the memory model decides the offloaded
//! checkpoints and the kept activations for that many bytes (as `auto` does for a
//! GPU's usable memory), and the frozen base plus the engine's own buffers
//! (adapters, workspace, device optimizer state) may hold at most that much: the
//! engine's device gets the cap less the frozen base's bytes
//! (`Dev::set_memory_limit`), so an allocation past it fails as an out-of-memory.

use crate::backend::{fused_engine_gap, Backend, EngineKind, HostOptimizer};
use crate::gpu::GpuInfo;
use crate::memory::{self, KeptActivations, Measured, MemoryBreakdown, MemorySpec};
use crate::trainer::TrainError;
use candle_core::{DType, Device};
use qtrain_dist::SingleProcess;
use qtrain_engine::{AttnBackward, EngineOptions};
use qtrain_model::{BaseModel, Proj};
use qtrain_optim::{AdamW8bit, AdamWConfig, ParamSpec};
use qtrain_step::{LoraConfig, LoraWeights, StepOptions, TokenBatch};
use rand::{Rng, SeedableRng};
use std::time::Instant;

type Result<T> = std::result::Result<T, TrainError>;

/// Waits for the device's queued work (the timings stop the clock after it).
fn synchronize(device: &Device) -> Result<()> {
    Ok(device
        .synchronize()
        .map_err(qtrain_device::DeviceError::from)?)
}

/// Device memory in use (total − free), as nvidia-smi would show it; `None` on the
/// CPU.
pub fn device_used(device: &Device) -> Option<u64> {
    if !device.is_cuda() {
        return None;
    }
    let dev = qtrain_device::Dev::from_candle(device).ok()?;
    let (free, total) = dev.mem_info().ok()??;
    Some((total - free) as u64)
}

/// The model being benchmarked and what loading it measured.
pub struct BenchModel {
    pub base: BaseModel,
    /// The GPU, when there is one (sizes the memory model).
    pub gpu: Option<GpuInfo>,
    /// Device memory in use before anything was loaded (the CUDA context, cuBLAS).
    pub baseline_used: Option<u64>,
    /// ... and after the frozen base was loaded.
    pub loaded_used: Option<u64>,
    /// Seconds the load took, and whether the quantized cache was read or written.
    pub load_s: f64,
    pub cache: String,
}

impl BenchModel {
    /// fp16 has 5 exponent bits: the gradients flowing back are scaled clear of its
    /// underflow (a fixed scale here; the trainer adjusts it dynamically).
    pub fn loss_scale(&self) -> f64 {
        if self.base.dtype == DType::F16 {
            4096.0
        } else {
            1.0
        }
    }
}

/// What a bench case runs: the adapters, the engine, the kept activations and the
/// number of steps.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub targets: Vec<Proj>,
    pub rank: usize,
    /// `train.engine`'s values; `auto` is the fused engine on any GPU here.
    pub engine: String,
    /// `train.keep_attention_residuals` / `train.keep_mlp_activations` /
    /// `train.keep_dequantized_base` policies.
    pub keep_residuals: String,
    pub keep_mlp: String,
    pub keep_base: String,
    /// `train.offload_checkpoints`' policy (`auto`, `on`, `off`).
    pub offload: String,
    /// Bytes the frozen base and the engine's buffers may hold (emulates a GPU of
    /// this size); `None`: 90% of the GPU, no cap.
    pub memory_limit: Option<u64>,
    pub warmup: usize,
    pub steps: usize,
    /// Time one more step with the engine's regions profiled.
    pub profile: bool,
    /// `train.precision`'s values: `auto` or `fp8` (then the case also reports
    /// [`Fp8Quality`]).
    pub precision: String,
    /// `train.mlp_chunk_tokens`: tokens per MLP chunk of the fused engine.
    pub mlp_chunk: usize,
    /// `train.loss_chunk_tokens`: rows per cross-entropy chunk of the fused engine.
    pub loss_chunk: usize,
    /// `train.attention_backward`: the attention backward's kernels.
    pub attention_backward: AttnBackward,
}

/// One FP8 step against the same step in the compute type, after the timed steps
/// (the adapters trained a little, so every LoRA gradient is non-zero): issue 20's
/// per-step quality gate.
#[derive(Debug, Clone)]
pub struct Fp8Quality {
    /// `|loss_fp8 - loss| / loss`.
    pub loss_rel: f64,
    /// The lowest cosine similarity of one LoRA tensor's gradients, and its name.
    pub min_cosine: f64,
    pub min_tensor: String,
    /// The cosine similarity of all LoRA gradients as one vector.
    pub all_cosine: f64,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Runs `step` with FP8 products off, then on, and compares loss and gradients.
fn fp8_quality(
    backend: &mut Backend,
    mut step: impl FnMut(&mut Backend) -> Result<f64>,
) -> Result<Fp8Quality> {
    let mut run =
        |backend: &mut Backend, fp8: bool| -> Result<(f64, Vec<qtrain_step::HostTensor>)> {
            backend.set_fp8_base(fp8)?;
            backend.zero_grads()?;
            let loss = step(backend)?;
            Ok((loss, backend.grads_to_host()?))
        };
    let (exact_loss, exact) = run(backend, false)?;
    let (loss, got) = run(backend, true)?;
    let (mut min_cosine, mut min_tensor) = (f64::INFINITY, String::new());
    let (mut all_e, mut all_g) = (Vec::new(), Vec::new());
    for (e, g) in exact.iter().zip(&got) {
        let c = cosine(&e.1, &g.1);
        if c < min_cosine {
            (min_cosine, min_tensor) = (c, e.0.clone());
        }
        all_e.extend_from_slice(&e.1);
        all_g.extend_from_slice(&g.1);
    }
    Ok(Fp8Quality {
        loss_rel: (loss - exact_loss).abs() / exact_loss.abs(),
        min_cosine,
        min_tensor,
        all_cosine: cosine(&all_e, &all_g),
    })
}

/// The labels of the attention kernels the fused engine runs on `dev` for this model
/// (`FwdKernel` and `SplitKernels`: the GPU's defaults or the environment's choice):
/// "reference" on the CPU, "-" without the fused engine, the error where the
/// environment names an unknown kernel.
fn attention_kernels(
    dev: Option<&qtrain_device::Dev>,
    cfg: &qtrain_model::ModelConfig,
) -> (String, String) {
    match dev.map(|d| qtrain_device::ops::attention::kernels_for(d, cfg.head_dim())) {
        None => ("-".into(), "-".into()),
        Some(Ok(None)) => ("reference".into(), "reference".into()),
        Some(Ok(Some((f, s)))) => (f.label().into(), s.label().into()),
        Some(Err(e)) => (e.to_string(), e.to_string()),
    }
}

/// One case's measurements.
pub struct CaseResult {
    pub batch: usize,
    pub seq: usize,
    pub engine: EngineKind,
    pub rank: usize,
    /// Mean seconds per timed optimizer step.
    pub step_s: f64,
    /// Mean seconds of the forward/backward and of the optimizer update.
    pub phase_s: [f64; 2],
    /// The mean loss of every step, warm-up included.
    pub losses: Vec<f64>,
    /// Model FLOP/s achieved (see [`flops_per_token`]), in TFLOP/s.
    pub tflops: f64,
    /// What the step executed per token (see [`executed_flops_per_token`]).
    pub executed: ExecutedFlops,
    /// Peak device memory in use during the steps (0 on the CPU).
    pub peak_used: u64,
    pub engine_peak: Option<usize>,
    pub workspace_bytes: Option<usize>,
    pub trainable: usize,
    pub kept: KeptActivations,
    /// The gradient checkpoints were in pinned host memory.
    pub offload: bool,
    /// Tokens per MLP chunk the fused engine ran with.
    pub mlp_chunk: usize,
    /// Rows per cross-entropy chunk the fused engine ran with.
    pub loss_chunk: usize,
    /// The attention backward's kernels it ran with.
    pub attention_backward: qtrain_engine::AttnBackward,
    /// The attention kernels of the fused engine's GPU (forward, split backward; see
    /// [`attention_kernels`]).
    pub attention_kernels: (String, String),
    /// The cap of [`BenchOptions::memory_limit`], and what it covered at its peak:
    /// the frozen base plus the engine device's peak (adapters, workspace, device
    /// optimizer state).
    pub memory_limit: Option<u64>,
    pub capped_peak: Option<u64>,
    /// Pinned host bytes of the offloaded checkpoints.
    pub host_bytes: Option<usize>,
    /// The memory model's prediction for this case.
    pub predicted: MemoryBreakdown,
    /// With [`BenchOptions::profile`]: the regions of one step, `[step]` the whole.
    pub profile: Option<Vec<qtrain_device::RegionTime>>,
    /// With `precision = fp8`: the step against the compute type's.
    pub fp8_quality: Option<Fp8Quality>,
}

impl CaseResult {
    /// Whether the loss fell at every step (on the same batch).
    pub fn loss_falls(&self) -> bool {
        self.losses.windows(2).all(|w| w[1] < w[0])
    }

    pub fn tokens_per_s(&self) -> f64 {
        (self.batch * self.seq) as f64 / self.step_s
    }

    /// FLOP/s the step executed (see [`ExecutedFlops`]), in TFLOP/s.
    pub fn executed_tflops(&self) -> f64 {
        self.executed.total() * self.tokens_per_s() / 1e12
    }

    /// The case as one JSON object, `qtrain bench`'s output line (`case` its
    /// label, `targets` the targets as given; MFU against `peak_tflops` when > 0).
    pub fn record(
        &self,
        model: &BenchModel,
        case: &str,
        targets: &str,
        peak_tflops: f64,
    ) -> serde_json::Value {
        let mib = |b: u64| b as f64 / 1048576.0;
        let base = &model.base;
        // Apart: one json! of everything would pass the macro's recursion limit.
        let executed = serde_json::json!({
            "base": self.executed.base / 1e9,
            "recompute": self.executed.recompute / 1e9,
            "attention": self.executed.attention / 1e9,
            "lora": self.executed.lora / 1e9,
            "total": self.executed.total() / 1e9,
        });
        serde_json::json!({
            "case": case,
            "targets": targets,
            "rank": self.rank,
            "engine": self.engine.name(),
            "dtype": format!("{:?}", base.dtype).to_lowercase(),
            "step_s": self.step_s,
            "tokens_per_s": self.tokens_per_s(),
            "achieved_tflops": self.tflops,
            "mfu": (peak_tflops > 0.0).then(|| self.tflops / peak_tflops),
            "executed_gflop_per_token": executed,
            "executed_tflops": self.executed_tflops(),
            "mfu_executed": (peak_tflops > 0.0).then(|| self.executed_tflops() / peak_tflops),
            "losses": self.losses,
            "loss_falls": self.loss_falls(),
            "phase_s": {"forward_backward": self.phase_s[0], "optimizer": self.phase_s[1]},
            "peak_device_mem_used_mib": mib(self.peak_used),
            "engine_buffers_peak_mib": self.engine_peak.map(|b| mib(b as u64)),
            "frozen_mib": mib(base.storage_bytes() as u64),
            "device_used_after_load_mib": model.loaded_used.map(mib),
            "engine_workspace_plan_mib": self.workspace_bytes.map(|b| mib(b as u64)),
            "trainable_params": self.trainable,
            "load_s": model.load_s,
            "profile_ms": self.profile.as_ref().map(|p| p
                .iter()
                .map(|r| (r.name.to_string(), serde_json::json!({"ms": r.ms, "calls": r.calls})))
                .collect::<serde_json::Map<_, _>>()),
            "attention_residuals_kept": self.kept.attention_residuals,
            "mlp_activations_kept": self.kept.mlp_all(base.config.num_hidden_layers),
            "mlp_layers_kept": self.kept.mlp_layers.min(base.config.num_hidden_layers),
            "dequantized_base_kept": self.kept.dequantized_base,
            "offload_checkpoints": self.offload,
            "mlp_chunk_tokens": self.mlp_chunk,
            "loss_chunk_tokens": self.loss_chunk,
            "attention_backward": self.attention_backward.name(),
            // The attention kernels this run used (the GPU's defaults or QTRAIN_ATTN_FWD /
            // _SPLIT; "reference" on the CPU).
            "attention_forward_kernel": self.attention_kernels.0,
            "attention_split_kernels": self.attention_kernels.1,
            "pinned_host_mib": self.host_bytes.map(|b| mib(b as u64)),
            "memory_limit_mib": self.memory_limit.map(mib),
            "capped_peak_mib": self.capped_peak.map(mib),
            "within_memory_limit": self.memory_limit.zip(self.capped_peak).map(|(l, p)| p <= l),
            "predicted_host_link_s": self
                .predicted
                .transfer_seconds_at(memory::host_link_bytes_per_s(
                    model.gpu.as_ref().and_then(|g| g.spec),
                )),
            "baseline_used_mib": model.baseline_used.map(mib),
            "predicted_peak_mib": mib(self.predicted.total()),
            "predicted_engine_mib": mib(self.predicted.engine_bytes),
            "fp8_base": self.fp8_quality.is_some(),
            "fp8_vs_compute_type": self.fp8_quality.as_ref().map(|q| serde_json::json!({
                "loss_rel": q.loss_rel,
                "min_grad_cosine": q.min_cosine,
                "min_grad_cosine_tensor": q.min_tensor,
                "all_grad_cosine": q.all_cosine,
            })),
        })
    }

    /// The predicted memory next to what was measured.
    pub fn memory_comparison(&self, model: &BenchModel) -> String {
        memory::compare(
            &self.predicted,
            &Measured {
                baseline_used: model.baseline_used,
                loaded_used: model.loaded_used,
                peak_used: (self.peak_used > 0).then_some(self.peak_used),
                engine_peak: self.engine_peak.map(|b| b as u64),
            },
        )
    }
}

/// Loads `dir` NF4-quantized on `device` in the compute type `dtype_spec` resolves
/// to (the GPU's precision policy for `auto`), through the quantized cache.
pub fn load_model(dir: &std::path::Path, device: &Device, dtype_spec: &str) -> Result<BenchModel> {
    // Before anything is loaded: the CUDA context and cuBLAS (memory::CONTEXT_BYTES).
    let baseline_used = device_used(device);
    let (dtype, gpu) = crate::models::resolve_dtype(dtype_spec, device)?;
    let t = Instant::now();
    let (base, outcome) = qtrain_model::bnb::load_cached(
        dir,
        &qtrain_model::LoadOptions {
            device: device.clone(),
            dtype,
            quantization: qtrain_model::Quantization::default(),
            threads: 0,
        },
        &qtrain_model::bnb::default_cache_root().join("nf4"),
    )?;
    synchronize(device)?;
    Ok(BenchModel {
        base,
        gpu,
        baseline_used,
        loaded_used: device_used(device),
        load_s: t.elapsed().as_secs_f64(),
        cache: format!("{outcome:?}"),
    })
}

/// Model FLOPs per token at `seq`, the convention of the throughput figures: 2P
/// forward and 2P backward (frozen weights need dX only, no dW; LoRA adds little)
/// = 4P, plus 2P for the recomputed forward with checkpointing = 6P, P counting
/// every matmul weight; causal attention adds 2 x 2 x seq/2 x (heads x head_dim)
/// per layer forward, four times over.
pub fn flops_per_token(base: &BaseModel, seq: usize) -> f64 {
    let cfg = &base.config;
    let matmul_params = (qtrain_model::PROJECTIONS
        .iter()
        .map(|&p| cfg.proj_shape(p).iter().product::<usize>())
        .sum::<usize>()
        * cfg.num_hidden_layers
        + cfg.vocab_size * cfg.hidden_size) as f64;
    let attn =
        2.0 * (cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim()) as f64;
    3.0 * 2.0 * matmul_params + 4.0 * attn
}

/// FLOPs per token that one fused-engine step executes, by kind: the honest
/// count behind `executed_tflops` (where [`flops_per_token`] is the fixed 6P
/// convention the peers' figures use, whatever is recomputed). Matmul work only;
/// causal attention counts half the keys, as everywhere here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExecutedFlops {
    /// The frozen base's forward and input-gradient products, `lm_head` included
    /// (2P + 2P; frozen weights get no weight gradient).
    pub base: f64,
    /// The frozen products the backward recomputes from each layer's saved input:
    /// q/k/v and o unless the attention half is kept, gate/up unless the gate/up
    /// outputs are kept (down never: its output is the next layer's input).
    pub recompute: f64,
    /// Attention's two forward products, the backward's seven (two kernels,
    /// deterministic: 3.5 forwards) and, unless its output is kept, the
    /// recomputed forward.
    pub attention: f64,
    /// The adapters' forward, input and weight gradients, and their recomputation
    /// where the projection itself is recomputed (`z` and the `B` product); `z`
    /// alone for down when nothing is kept (with either half kept every layer's
    /// `z` is).
    pub lora: f64,
}

impl ExecutedFlops {
    pub fn total(&self) -> f64 {
        self.base + self.recompute + self.attention + self.lora
    }
}

/// [`ExecutedFlops`] of a step at `seq` with adapters of `rank` on `targets`, `kept`
/// activations and the attention backward `attention`.
pub fn executed_flops_per_token(
    cfg: &qtrain_model::ModelConfig,
    seq: usize,
    targets: &[Proj],
    rank: usize,
    kept: KeptActivations,
    attention: AttnBackward,
) -> ExecutedFlops {
    let layers = cfg.num_hidden_layers as f64;
    let weights = |p: Proj| cfg.proj_shape(p).iter().product::<usize>() as f64;
    // The share of the layers that recompute each projection: the attention half's
    // all or none, gate/up those whose outputs are not kept.
    let mlp_kept = kept.mlp_layers.min(cfg.num_hidden_layers) as f64;
    let recomputed = |p: Proj| match p {
        Proj::Q | Proj::K | Proj::V | Proj::O => (!kept.attention_residuals) as u8 as f64,
        Proj::Gate | Proj::Up => 1.0 - mlp_kept / layers,
        Proj::Down => 0.0,
    };
    let all: f64 = qtrain_model::PROJECTIONS.iter().map(|&p| weights(p)).sum();
    let head = (cfg.vocab_size * cfg.hidden_size) as f64;
    let again: f64 = qtrain_model::PROJECTIONS
        .iter()
        // fold from +0.0: f64's `sum` of nothing is -0.0, which the JSON would print
        // when both halves are kept and nothing is recomputed
        .fold(0.0, |a, &p| a + weights(p) * recomputed(p));
    // One forward of causal attention: QK^T and PV, 2 FLOPs per multiply-add,
    // seq/2 keys on average, every query head.
    let attn_fwd =
        2.0 * 2.0 * (seq as f64 / 2.0) * (cfg.num_attention_heads * cfg.head_dim()) as f64;
    // The backward: dK/dV's four products (two forwards) and dQ's three (1.5), or with
    // the dS stored, dQ's one (0.5).
    let backward = if attention == AttnBackward::StoredDs {
        2.5
    } else {
        3.5
    };
    let attn_passes = 1.0 + backward + if kept.attention_residuals { 0.0 } else { 1.0 };
    let lora: f64 = targets
        .iter()
        .map(|&p| {
            let [out, inp] = cfg.proj_shape(p);
            let params = (rank * (out + inp)) as f64;
            // forward, input gradient, weight gradients; where the projection is
            // recomputed, z = x Aᵀ and y += z Bᵀ again; elsewhere z again only
            // when no half is kept (then nothing keeps every layer's z)
            let kept_z = qtrain_engine::keeps_lora_z(kept.attention_residuals, kept.mlp_layers);
            let not_recomputed = if kept_z { 0 } else { rank * inp };
            let f = recomputed(p);
            let again = f * (rank * (inp + out)) as f64 + (1.0 - f) * not_recomputed as f64;
            2.0 * (3.0 * params + again)
        })
        .sum();
    ExecutedFlops {
        base: 4.0 * (layers * all + head),
        recompute: 2.0 * layers * again,
        attention: layers * attn_fwd * attn_passes,
        lora: layers * lora,
    }
}

/// The memory model of a `batch x seq` case with the optimizer state where it
/// lives and the engine's options.
fn spec_for(
    model: &BenchModel,
    o: &BenchOptions,
    engine: EngineKind,
    (batch, seq): (usize, usize),
    optimizer: memory::OptimizerPlace,
    engine_options: EngineOptions,
) -> MemorySpec {
    let base = &model.base;
    MemorySpec {
        model: base.config.clone(),
        quantization: base.quantization,
        dtype: base.dtype,
        rank: o.rank,
        targets: o.targets.clone(),
        batch,
        seq,
        checkpointing: true,
        eight_bit: true,
        optimizer,
        engine,
        engine_options,
        compute_capability: model.gpu.as_ref().map(|g| g.compute_capability),
    }
}

/// With [`BenchOptions::memory_limit`]: caps the engine's device at the limit less
/// the frozen base's bytes (the engine's buffers and the device optimizer count
/// from then on). Returns the limit.
fn cap_engine(model: &BenchModel, o: &BenchOptions, backend: &Backend) -> Result<Option<u64>> {
    let Some(cap) = o.memory_limit else {
        return Ok(None);
    };
    let frozen = model.base.storage_bytes() as u64;
    if frozen >= cap {
        return Err(TrainError::Other(format!(
            "--memory-limit {:.0} MiB: the frozen base alone takes {:.0} MiB",
            memory::mib(cap),
            memory::mib(frozen)
        )));
    }
    if backend.engine() == EngineKind::Reference {
        return Err(TrainError::Other(
            "--memory-limit caps the fused engine's buffers; the reference engine has no \
             such accounting"
                .into(),
        ));
    }
    backend.set_memory_limit(Some((cap - frozen) as usize));
    Ok(Some(cap))
}

/// As the trainer decides, on the memory model of the case: whether the
/// checkpoints are offloaded, then which activations are kept, against the memory
/// limit when set, else 90% of the GPU (nothing to size against on the CPU).
fn decide_memory(
    model: &BenchModel,
    o: &BenchOptions,
    backend: &mut Backend,
    shape: (usize, usize),
) -> Result<()> {
    let usable = o.memory_limit.or(model
        .gpu
        .as_ref()
        .map(|g| memory::usable(g.total_bytes, memory::DEFAULT_HEADROOM)));
    let mut opts = EngineOptions {
        fp8_base: o.precision == "fp8",
        mlp_chunk: o.mlp_chunk,
        ce_chunk: o.loss_chunk,
        attention_backward: o.attention_backward,
        ..EngineOptions::default()
    };
    backend.set_chunks(o.mlp_chunk, o.loss_chunk);
    backend.set_attention_backward(o.attention_backward);
    let spec = |opts| {
        spec_for(
            model,
            o,
            backend.engine(),
            shape,
            backend.optimizer_place(),
            opts,
        )
    };
    opts.offload_layer_inputs = memory::offload_checkpoints(
        &o.offload,
        o.keep_policy(),
        &spec(opts),
        usable,
        None,
        memory::host_memory_available(),
        model.gpu.as_ref().and_then(|g| g.spec),
    )
    .map_err(|e| TrainError::Other(format!("--offload on: {e}")))?;
    let kept = memory::kept_activations(
        o.keep_policy(),
        &spec(opts),
        usable,
        None,
        memory::host_memory_available(),
    );
    backend.set_offload_checkpoints(opts.offload_layer_inputs);
    backend.set_kept_activations(kept);
    Ok(())
}

impl BenchOptions {
    /// The kept-activation policies, as the trainer's `train` table gives them.
    pub fn keep_policy(&self) -> memory::KeepPolicy<'_> {
        memory::KeepPolicy {
            residuals: &self.keep_residuals,
            mlp: &self.keep_mlp,
            base: &self.keep_base,
        }
    }
}

/// Times `warmup + steps` optimizer steps on a random `batch x seq` batch.
pub fn run_case(
    model: &BenchModel,
    o: &BenchOptions,
    batch: usize,
    seq: usize,
) -> Result<CaseResult> {
    let (base, device) = (&model.base, &model.base.device);
    // `auto` runs the fused engine on any GPU (whatever the dtype), unlike a run.
    // (unless the fused engine lacks the model's math: then the reference, said why).
    let engine = match o.engine.as_str() {
        "auto" if device.is_cuda() => match fused_engine_gap(&base.config) {
            None => EngineKind::Fused,
            Some(gap) => {
                eprintln!("--engine auto: the reference engine, because {gap}");
                EngineKind::Reference
            }
        },
        setting => EngineKind::for_model(setting, device.is_cuda(), base.dtype, &base.config)
            .map_err(|e| TrainError::Other(e.replace("train.engine = ", "--engine ")))?,
    };
    let lcfg = LoraConfig {
        rank: o.rank,
        alpha: 2.0 * o.rank as f64,
        dropout: 0.0,
        targets: o.targets.clone(),
        rslora: false,
        seed: 0,
    };
    let lora = LoraWeights::init(&lcfg, &base.config, device)?;
    let specs: Vec<ParamSpec> = lora
        .to_host()?
        .iter()
        .map(|(n, v, _)| ParamSpec::new(n.clone(), v.len()))
        .collect();
    let trainable = specs.iter().map(|s| s.numel).sum();
    let opt = AdamW8bit::new(AdamWConfig::default(), &specs)?;
    let mut backend = Backend::new(base, lora, HostOptimizer::AdamW8bit(opt), engine)?;
    let memory_limit = cap_engine(model, o, &backend)?;
    decide_memory(model, o, &mut backend, (batch, seq))?;
    let fp8 = o.precision == "fp8";
    backend.set_fp8_base(fp8)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let rows: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| rng.random_range(3..base.config.vocab_size as u32))
                .collect()
        })
        .collect();
    let tokens = TokenBatch::from_rows(&rows)?;
    let valid = tokens.valid_targets() as f64;
    let scale = model.loss_scale();
    let options = |i: usize| StepOptions {
        checkpointing: true,
        dropout_seed: 0,
        micro_step: i as u64,
    };
    let (mut losses, mut times, mut phase_s) = (Vec::new(), Vec::new(), [0f64; 2]);
    let mut peak_used = device_used(device).unwrap_or(0);
    for i in 0..o.warmup + o.steps {
        synchronize(device)?;
        let t = Instant::now();
        backend.zero_grads()?;
        let loss = backend
            .micro_step(base, &tokens, &options(i), valid / scale)?
            .loss_sum;
        synchronize(device)?;
        let t1 = t.elapsed().as_secs_f64();
        peak_used = peak_used.max(device_used(device).unwrap_or(0));
        // No clipping (a norm of 0), as the trainer's update otherwise.
        backend.reduce_and_clip(&SingleProcess, 0.0, (1.0 / scale) as f32)?;
        backend.update(1e-3)?;
        synchronize(device)?;
        let t2 = t.elapsed().as_secs_f64();
        if i >= o.warmup {
            for (acc, d) in phase_s.iter_mut().zip([t1, t2 - t1]) {
                *acc += d / o.steps as f64;
            }
            times.push(t2);
        }
        losses.push(loss / valid);
    }
    let profile = match backend.engine_device().filter(|_| o.profile) {
        Some(dev) => Some(profile_step(&dev, || {
            backend.zero_grads()?;
            let so = options(o.warmup + o.steps);
            backend.micro_step(base, &tokens, &so, valid / scale)?;
            Ok(())
        })?),
        None => None,
    };
    let fp8_quality = if fp8 {
        let so = options(o.warmup + o.steps + 1);
        Some(fp8_quality(&mut backend, |b| {
            Ok(b.micro_step(base, &tokens, &so, valid / scale)?.loss_sum)
        })?)
    } else {
        None
    };
    // The memory model's prediction (fused: the 8-bit AdamW state on the GPU as the
    // placement policy decided; reference: on the host), next to what was measured:
    // the numbers the runtime constants are calibrated on.
    let predicted = spec_for(
        model,
        o,
        engine,
        (batch, seq),
        backend.optimizer_place(),
        backend.engine_options(),
    )
    .predict();
    let step_s = times.iter().sum::<f64>() / times.len().max(1) as f64;
    Ok(CaseResult {
        batch,
        seq,
        engine,
        rank: o.rank,
        step_s,
        phase_s,
        losses,
        tflops: flops_per_token(base, seq) * (batch * seq) as f64 / step_s / 1e12,
        executed: executed_flops_per_token(
            &base.config,
            seq,
            &o.targets,
            o.rank,
            backend.kept_activations(),
            backend.engine_options().attention_backward,
        ),
        peak_used,
        engine_peak: backend.engine_peak_bytes(),
        workspace_bytes: backend
            .workspace_layout(batch, seq)
            .map(|l| l.total_bytes()),
        trainable,
        kept: backend.kept_activations(),
        offload: backend.offload_checkpoints(),
        mlp_chunk: backend.engine_options().mlp_chunk,
        loss_chunk: backend.engine_options().ce_chunk,
        attention_backward: backend.engine_options().attention_backward,
        attention_kernels: attention_kernels(backend.engine_device().as_ref(), &base.config),
        memory_limit,
        capped_peak: memory_limit.and(
            backend
                .engine_device()
                .map(|d| (d.peak_bytes() + base.storage_bytes()) as u64),
        ),
        host_bytes: backend.workspace_layout(batch, seq).map(|l| l.host_bytes()),
        predicted,
        profile,
        fp8_quality,
    })
}

/// Runs `step` once with region timing on (`Dev::region` in the engine) and returns
/// the regions, plus `[step]`: the whole step's device time.
fn profile_step(
    dev: &qtrain_device::Dev,
    step: impl FnOnce() -> Result<()>,
) -> Result<Vec<qtrain_device::RegionTime>> {
    dev.take_profile()?;
    dev.set_profiling(true);
    let r = {
        let _all = dev.region("[step]");
        step()
    };
    dev.set_profiling(false);
    r?;
    Ok(dev.take_profile()?)
}

/// A profile as a table: regions by time, with their share of the step and the
/// step time no region covers (launch gaps, small kernels, host waits).
pub fn profile_table(p: &[qtrain_device::RegionTime]) -> String {
    let step = p.iter().find(|r| r.name == "[step]").map_or(0.0, |r| r.ms);
    let mut leaves: Vec<_> = p.iter().filter(|r| !r.name.starts_with('[')).collect();
    leaves.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    let mut out = format!(
        "{:<42} {:>7} {:>10} {:>7}\n",
        "region", "calls", "ms", "share"
    );
    let mut row = |name: &str, calls: String, ms: f64| {
        out.push_str(&format!(
            "{name:<42} {calls:>7} {ms:>10.2} {:>6.1}%\n",
            if step > 0.0 { 100.0 * ms / step } else { 0.0 }
        ));
    };
    for r in p.iter().filter(|r| r.name.starts_with('[')) {
        row(r.name, r.calls.to_string(), r.ms);
    }
    let covered: f64 = leaves.iter().map(|r| r.ms).sum();
    for r in leaves {
        row(r.name, r.calls.to_string(), r.ms);
    }
    row("(not in any region)", String::new(), step - covered);
    out
}
