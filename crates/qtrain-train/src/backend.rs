//! Where the trainable state lives and how a training step is computed: the one
//! switch between qtrain's two step implementations, so the training loop is the
//! same straight loop for both.
//!
//! - [`Backend::Reference`]: the candle-ops decoder of `qtrain_reference` (explicit
//!   forward/backward) with the adapters as candle tensors and the optimizer on the
//!   host. It runs anywhere candle runs, in any dtype (the CPU demo in f32; f16 on
//!   GPUs without bf16).
//! - [`Backend::Fused`]: the fused engine of `qtrain_engine` (hand-written kernels and
//!   GEMMs over preallocated buffers; bf16 on GPUs). The adapters' master weights and
//!   gradients live in flat device buffers.
//!
//! The reference path keeps the master weights on the host and runs the host
//! optimizer; the fused path keeps them, the gradients and the 8-bit optimizer state
//! on the device (`qtrain_optim::device`, bit-exact with the host optimizer) and only
//! downloads for checkpoints and exports. Both write the same files (named tensors in
//! the order of `LoraWeights::to_host`, the host optimizer's state format), so a run
//! can resume on either.

use crate::memory::{KeptActivations, OptimizerPlace};
use crate::trainer::TrainError;
use candle_core::Device;
use qtrain_dist::Collective;
use qtrain_engine::{Engine, EngineOptions, WorkspaceLayout};
use qtrain_model::BaseModel;
use qtrain_optim::{
    clip_grad_norm, AdamW32, AdamW8bit, DeviceAdamW32, DeviceAdamW8bit, DeviceOptimizer, Optimizer,
    StatePlacement,
};
use qtrain_reference::{forward_backward, forward_loss};
use qtrain_step::{HostTensor, LoraGrads, LoraWeights, StepLoss, StepOptions, TokenBatch};
use std::path::Path;

type Result<T> = std::result::Result<T, TrainError>;

impl From<qtrain_device::DeviceError> for TrainError {
    fn from(e: qtrain_device::DeviceError) -> Self {
        TrainError::Other(format!("device: {e}"))
    }
}

impl From<qtrain_engine::EngineError> for TrainError {
    fn from(e: qtrain_engine::EngineError) -> Self {
        use qtrain_device::DeviceError::OutOfMemory;
        use qtrain_engine::EngineError::Device;
        match e {
            // Kept apart: the trainer recovers from it (crate::micro).
            Device(OutOfMemory { .. }) => TrainError::OutOfMemory(format!("fused engine: {e}")),
            e => TrainError::Other(format!("fused engine: {e}")),
        }
    }
}

/// The device all-reduce of a gradient buffer when the collective has one (NCCL).
fn device_all_reduce(
    coll: &dyn Collective,
    dev: &qtrain_device::Dev,
    grads: qtrain_device::View<'_, f32>,
) -> std::result::Result<bool, qtrain_dist::DistError> {
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        let stream = c.stream().cu_stream() as *mut std::ffi::c_void;
        // SAFETY: `grads` is a live device buffer of this GPU written only by the
        // engine's stream, which is the stream the reduction is enqueued on.
        return unsafe { coll.device_all_reduce_sum_f32(grads.dptr(), grads.len(), stream) };
    }
    let _ = (coll, dev, grads);
    Ok(false)
}

/// Which implementation computes the training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// The fused engine (`qtrain_engine`).
    Fused,
    /// The candle-ops reference decoder (`qtrain_reference`).
    Reference,
}

impl EngineKind {
    /// The values `train.engine` (and `qtrain bench --engine`) accept.
    pub const SETTINGS: [&'static str; 3] = ["auto", "fused", "reference"];

    /// What the setting `setting` (one of [`EngineKind::SETTINGS`]; the config
    /// rejects others, which count as `auto` here) runs for a model in `dtype`, on a
    /// GPU or not: `auto` is the fused engine on GPUs computing in bf16 (Ampere and
    /// later) or fp16 (7.x, with loss scaling), the reference elsewhere (f32 models
    /// on a GPU are test setups).
    pub fn resolve(setting: &str, on_gpu: bool, dtype: candle_core::DType) -> Self {
        match setting {
            "fused" => EngineKind::Fused,
            "reference" => EngineKind::Reference,
            _ if on_gpu && matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16) => {
                EngineKind::Fused
            }
            _ => EngineKind::Reference,
        }
    }

    /// [`EngineKind::resolve`] for this model: where the fused engine does not
    /// implement the model's math ([`fused_engine_gap`]), `auto` takes the reference
    /// (logged with the reason) and an explicit `fused` is an error saying why.
    pub fn for_model(
        setting: &str,
        on_gpu: bool,
        dtype: candle_core::DType,
        model: &qtrain_model::ModelConfig,
    ) -> std::result::Result<Self, String> {
        let kind = Self::resolve(setting, on_gpu, dtype);
        match (kind, fused_engine_gap(model)) {
            (EngineKind::Fused, Some(gap)) if setting == "fused" => Err(format!(
                "train.engine = \"fused\": {gap}; use train.engine = \"auto\" or \"reference\""
            )),
            (EngineKind::Fused, Some(gap)) => {
                tracing::info!("train.engine = auto: the reference engine, because {gap}");
                Ok(EngineKind::Reference)
            }
            (kind, _) => Ok(kind),
        }
    }

    /// `"fused"` or `"reference"`.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Fused => "fused",
            EngineKind::Reference => "reference",
        }
    }
}

/// What the fused engine does not implement yet for this model, if anything: then
/// `train.engine = auto` takes the reference engine (with a log line saying why) and
/// `train.engine = fused` is refused, never run with math the model does not have.
pub fn fused_engine_gap(cfg: &qtrain_model::ModelConfig) -> Option<String> {
    let mut gaps = Vec::new();
    // The engine's RoPE tables come from the model's variant (`qtrain_model::rope`),
    // made once per workspace for positions `0..seq`; `dynamic` changes frequencies
    // with each batch's longest position, which those tables cannot follow.
    match cfg.rope() {
        Ok(r) if matches!(r.scaling, qtrain_model::RopeScaling::Dynamic { .. }) => {
            gaps.push("dynamic RoPE scaling".to_string())
        }
        Ok(_) => {}
        Err(e) => gaps.push(e.to_string()),
    }
    (!gaps.is_empty()).then(|| {
        format!(
            "the fused engine does not implement {} (model_type {}) yet",
            gaps.join(", "),
            cfg.model_type
        )
    })
}

/// The optimizer a run starts with (fresh or read from a checkpoint), before it is
/// placed on the backend's device.
pub enum HostOptimizer {
    AdamW8bit(AdamW8bit),
    AdamW32(AdamW32),
}

impl HostOptimizer {
    fn boxed(self) -> Box<dyn Optimizer> {
        match self {
            HostOptimizer::AdamW8bit(o) => Box::new(o),
            HostOptimizer::AdamW32(o) => Box::new(o),
        }
    }
}

/// The fused engine in the model's compute type.
enum AnyEngine {
    Bf16(Engine<half::bf16>),
    F16(Engine<half::f16>),
    F32(Engine<f32>),
}

macro_rules! with_engine {
    ($e:expr, $x:ident => $body:expr) => {
        match $e {
            AnyEngine::Bf16($x) => $body,
            AnyEngine::F16($x) => $body,
            AnyEngine::F32($x) => $body,
        }
    };
}

/// The trainable state and the step.
pub struct Backend {
    kind: Kind,
    /// Candle adapters for generation (and the whole reference path); on the host
    /// with the fused engine, whose own buffers train.
    lora: LoraWeights,
    /// `lora` is behind the device's master weights (fused path).
    lora_stale: bool,
}

enum Kind {
    Reference {
        grads: LoraGrads,
        /// Master weights as the host optimizer sees them (f32, `to_host` order).
        params: Vec<HostTensor>,
        /// The step's gradients after clipping, valid between `clip` and `update`.
        host_grads: Vec<HostTensor>,
        opt: Box<dyn Optimizer>,
    },
    Fused {
        engine: Box<AnyEngine>,
        opt: Box<dyn DeviceOptimizer>,
    },
}

impl Backend {
    /// Builds the backend of `engine` for `base`, starting from `lora` (whose values
    /// are the run's initial or resumed adapters) and `opt`.
    pub fn new(
        base: &BaseModel,
        mut lora: LoraWeights,
        opt: HostOptimizer,
        engine: EngineKind,
    ) -> Result<Self> {
        let kind = if engine == EngineKind::Fused {
            let opts = EngineOptions::default();
            let engine = match base.dtype {
                candle_core::DType::BF16 => AnyEngine::Bf16(Engine::new(base, &lora, opts)?),
                candle_core::DType::F16 => AnyEngine::F16(Engine::new(base, &lora, opts)?),
                candle_core::DType::F32 => AnyEngine::F32(Engine::new(base, &lora, opts)?),
                other => {
                    return Err(TrainError::Other(format!(
                        "train.engine = \"fused\" needs a bf16 or f16 (GPU) or f32 (CPU) model, not {other:?}; \
                         use train.engine = \"reference\""
                    )))
                }
            };
            let dev = with_engine!(&engine, e => e.device().clone());
            let opt: Box<dyn DeviceOptimizer> = match opt {
                HostOptimizer::AdamW8bit(o) => Box::new(DeviceAdamW8bit::from_host(&o, &dev)?),
                HostOptimizer::AdamW32(o) => Box::new(DeviceAdamW32::from_host(&o, &dev)?),
            };
            // The engine holds its own copy of the adapters on the device; the candle
            // copy (only generation reads it) waits on the host (52 MiB of GPU memory
            // on Mistral-7B q/k/v/o r16).
            lora = lora.to_device(&Device::Cpu)?;
            Kind::Fused {
                engine: Box::new(engine),
                opt,
            }
        } else {
            Kind::Reference {
                grads: LoraGrads::zeros_like(&lora)?,
                params: lora.to_host()?,
                host_grads: Vec::new(),
                opt: opt.boxed(),
            }
        };
        Ok(Self {
            kind,
            lora,
            lora_stale: false,
        })
    }

    /// The master weights on the host (what checkpoints and exports write).
    pub fn params(&self) -> Result<Vec<HostTensor>> {
        Ok(match &self.kind {
            Kind::Reference { params, .. } => params.clone(),
            Kind::Fused { engine, .. } => {
                with_engine!(engine.as_ref(), e => e.lora().params_to_host(e.device())?)
            }
        })
    }

    /// Which activations the fused engine keeps from the forward
    /// (`EngineOptions::save_attention_residual`, `kept_mlp_layers`); none on
    /// the reference path.
    pub fn kept_activations(&self) -> KeptActivations {
        KeptActivations::of(&self.engine_options())
    }

    /// Sets [`Backend::kept_activations`] (ignored on the reference path); the
    /// workspace is sized anew at the next pass.
    pub fn set_kept_activations(&mut self, kept: KeptActivations) {
        if let Kind::Fused { engine, .. } = &mut self.kind {
            with_engine!(engine.as_mut(), e => {
                let mut opts = e.options();
                kept.apply(&mut opts);
                e.set_options(opts);
            });
        }
    }

    /// Whether the fused engine keeps its gradient checkpoints in pinned host
    /// memory (`EngineOptions::offload_layer_inputs`); false on the reference path.
    pub fn offload_checkpoints(&self) -> bool {
        self.engine_options().offload_layer_inputs
    }

    /// Sets [`Backend::offload_checkpoints`] (ignored on the reference path); the
    /// workspace is sized anew at the next pass.
    pub fn set_offload_checkpoints(&mut self, offload: bool) {
        if let Kind::Fused { engine, .. } = &mut self.kind {
            with_engine!(engine.as_mut(), e => {
                let mut opts = e.options();
                opts.offload_layer_inputs = offload;
                e.set_options(opts);
            });
        }
    }

    /// Sets the fused engine's tokens per MLP chunk and rows per cross-entropy chunk
    /// (`EngineOptions::mlp_chunk` / `ce_chunk`, `train.mlp_chunk_tokens` /
    /// `train.loss_chunk_tokens`; ignored on the reference path); the workspace is
    /// sized anew at the next pass.
    pub fn set_chunks(&mut self, mlp_tokens: usize, loss_rows: usize) {
        if let Kind::Fused { engine, .. } = &mut self.kind {
            with_engine!(engine.as_mut(), e => {
                let mut opts = e.options();
                opts.mlp_chunk = mlp_tokens.max(1);
                opts.ce_chunk = loss_rows.max(1);
                e.set_options(opts);
            });
        }
    }

    /// Picks the fused engine's attention backward kernels
    /// (`EngineOptions::attention_backward`, `train.attention_backward`; ignored on the
    /// reference path, which is exact); the workspace is sized anew at the next pass.
    pub fn set_attention_backward(&mut self, mode: qtrain_engine::AttnBackward) {
        if let Kind::Fused { engine, .. } = &mut self.kind {
            with_engine!(engine.as_mut(), e => {
                let mut opts = e.options();
                opts.attention_backward = mode;
                e.set_options(opts);
            });
        }
    }

    /// Runs the frozen base's products in FP8 (`EngineOptions::fp8_base`; fused
    /// engine only: the reference path refuses it). The workspace is sized anew at
    /// the next pass, where a GPU without FP8 tensor cores is refused.
    pub fn set_fp8_base(&mut self, on: bool) -> Result<()> {
        match &mut self.kind {
            Kind::Fused { engine, .. } => {
                with_engine!(engine.as_mut(), e => {
                    let mut opts = e.options();
                    opts.fp8_base = on;
                    e.set_options(opts);
                });
                Ok(())
            }
            Kind::Reference { .. } if on => Err(TrainError::Other(
                "train.precision = \"fp8\" runs on the fused engine; this run uses the \
                 reference engine (set train.engine = \"fused\", or see the log for why \
                 auto chose the reference engine)"
                    .into(),
            )),
            Kind::Reference { .. } => Ok(()),
        }
    }

    /// The fused engine's device (`None` on the reference path): its memory
    /// accounting and profiler.
    pub fn engine_device(&self) -> Option<qtrain_device::Dev> {
        match &self.kind {
            Kind::Fused { engine, .. } => {
                Some(with_engine!(engine.as_ref(), e => e.device().clone()))
            }
            Kind::Reference { .. } => None,
        }
    }

    /// The fused engine's options (the defaults on the reference path).
    pub fn engine_options(&self) -> EngineOptions {
        match &self.kind {
            Kind::Fused { engine, .. } => with_engine!(engine.as_ref(), e => e.options()),
            Kind::Reference { .. } => EngineOptions::default(),
        }
    }

    /// Bytes the fused engine's own buffers (adapters and workspace) held at their
    /// peak: its device's peak less the device optimizer's bytes, which it holds from
    /// construction on. `None` on the reference path.
    pub fn engine_peak_bytes(&self) -> Option<usize> {
        match &self.kind {
            Kind::Fused { engine, opt } => {
                let peak = with_engine!(engine.as_ref(), e => e.device().peak_bytes());
                Some(peak.saturating_sub(opt.device_bytes() as usize))
            }
            Kind::Reference { .. } => None,
        }
    }

    /// The fused engine's workspace for micro-batches of `batch x seq` (`None` on
    /// the reference path).
    pub fn workspace_layout(&self, batch: usize, seq: usize) -> Option<WorkspaceLayout> {
        match &self.kind {
            Kind::Fused { engine, .. } => {
                Some(with_engine!(engine.as_ref(), e => e.workspace_layout(batch, seq)))
            }
            Kind::Reference { .. } => None,
        }
    }

    /// Where the optimizer state lives, as the memory model counts it.
    pub fn optimizer_place(&self) -> OptimizerPlace {
        match &self.kind {
            Kind::Fused { opt, .. } => opt.placement().into(),
            Kind::Reference { .. } => OptimizerPlace::Host,
        }
    }

    /// Which engine runs the steps.
    pub fn engine(&self) -> EngineKind {
        match self.kind {
            Kind::Reference { .. } => EngineKind::Reference,
            Kind::Fused { .. } => EngineKind::Fused,
        }
    }

    /// Which engine runs the steps: "fused" or "reference".
    pub fn name(&self) -> &'static str {
        self.engine().name()
    }

    pub fn num_parameters(&self) -> usize {
        self.lora.num_parameters()
    }

    /// Bytes of optimizer state, and where it lives.
    pub fn optimizer_state(&self) -> (u64, StatePlacement) {
        match &self.kind {
            Kind::Reference { opt, .. } => (opt.state_bytes(), opt.placement()),
            Kind::Fused { opt, .. } => (opt.state_bytes(), opt.placement()),
        }
    }

    /// Writes the optimizer state (the host format, whichever device holds it).
    pub fn save_optimizer(&self, path: &Path) -> Result<()> {
        match &self.kind {
            Kind::Reference { opt, .. } => opt.save_state(path)?,
            Kind::Fused { opt, .. } => opt.save_state(path)?,
        }
        Ok(())
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        match &mut self.kind {
            Kind::Reference { grads, .. } => grads.zero()?,
            Kind::Fused { engine, .. } => {
                with_engine!(engine.as_ref(), e => e.lora().zero_grads(e.device())?)
            }
        }
        Ok(())
    }

    /// The accumulated LoRA gradients on the host (before clipping).
    pub fn grads_to_host(&self) -> Result<Vec<qtrain_step::HostTensor>> {
        Ok(match &self.kind {
            Kind::Reference { grads, .. } => grads.to_host()?,
            Kind::Fused { engine, .. } => {
                with_engine!(engine.as_ref(), e => e.lora().grads_to_host(e.device())?)
            }
        })
    }

    /// One micro-batch: adds its gradient (of `loss_sum / loss_denominator`).
    pub fn micro_step(
        &mut self,
        base: &BaseModel,
        batch: &TokenBatch,
        opts: &StepOptions,
        loss_denominator: f64,
    ) -> Result<StepLoss> {
        Ok(match &mut self.kind {
            Kind::Reference { grads, .. } => {
                forward_backward(base, &self.lora, batch, opts, loss_denominator, grads)?
            }
            Kind::Fused { engine, .. } => {
                with_engine!(engine.as_mut(), e => e.forward_backward(batch, opts, loss_denominator)?)
            }
        })
    }

    /// Caps the bytes the fused engine's own buffers may hold (`Dev::set_memory_limit`:
    /// past it an allocation fails like an out-of-memory). For tests of the
    /// recovery path and for emulating a smaller GPU; the reference path has no
    /// such accounting and ignores it (with a warning).
    pub fn set_memory_limit(&self, bytes: Option<usize>) {
        match &self.kind {
            Kind::Fused { engine, .. } => {
                with_engine!(engine.as_ref(), e => e.device().set_memory_limit(bytes))
            }
            Kind::Reference { .. } => {
                if bytes.is_some() {
                    tracing::warn!("the engine memory limit applies to the fused engine only");
                }
            }
        }
    }

    /// Sums the accumulated gradients over the ranks of `coll` (data parallelism;
    /// nothing to do for one process), then clips them to `max_norm` (0: no
    /// clipping) and returns their norm before clipping (non-finite when any
    /// gradient is). Every rank ends with the same gradients, hence the same norm
    /// and the same update. `unscale` multiplies the summed gradients first (the
    /// inverse of the fp16 loss scale, so clipping and the update see the true
    /// gradients; 1 otherwise).
    pub fn reduce_and_clip(
        &mut self,
        coll: &dyn Collective,
        max_norm: f32,
        unscale: f32,
    ) -> Result<f32> {
        let dist = |e: qtrain_dist::DistError| TrainError::Other(format!("data parallel: {e}"));
        match &mut self.kind {
            Kind::Reference {
                grads, host_grads, ..
            } => {
                *host_grads = grads.to_host()?;
                if coll.world_size() > 1 {
                    let mut flat: Vec<f32> = host_grads
                        .iter()
                        .flat_map(|g| g.1.iter().copied())
                        .collect();
                    coll.all_reduce_sum_f32(&mut flat).map_err(dist)?;
                    let mut off = 0;
                    for g in host_grads.iter_mut() {
                        let n = g.1.len();
                        g.1.copy_from_slice(&flat[off..off + n]);
                        off += n;
                    }
                }
                if unscale != 1.0 {
                    for g in host_grads.iter_mut() {
                        g.1.iter_mut().for_each(|v| *v *= unscale);
                    }
                }
                let mut slices: Vec<&mut [f32]> =
                    host_grads.iter_mut().map(|g| g.1.as_mut_slice()).collect();
                Ok(clip_grad_norm(&mut slices, max_norm))
            }
            Kind::Fused { engine, .. } => Ok(with_engine!(engine.as_ref(), e => {
                let dev = e.device();
                let grads = e.lora().grads.all();
                if coll.world_size() > 1 && !device_all_reduce(coll, dev, grads).map_err(dist)? {
                    // No device path (e.g. ranks as threads): stage through the host.
                    let mut flat = dev.download(grads)?;
                    coll.all_reduce_sum_f32(&mut flat).map_err(dist)?;
                    dev.write(grads, &flat)?;
                }
                if unscale != 1.0 {
                    qtrain_device::ops::rows::scale_in_place(dev, grads, unscale)?;
                }
                qtrain_optim::device::clip_grad_norm(dev, grads, max_norm)?
            })),
        }
    }

    /// Makes every rank start from rank 0's adapters (initial or resumed).
    pub fn broadcast_params(&mut self, coll: &dyn Collective) -> Result<()> {
        if coll.world_size() == 1 {
            return Ok(());
        }
        let dist = |e: qtrain_dist::DistError| TrainError::Other(format!("data parallel: {e}"));
        let mut params = self.params()?;
        let mut flat: Vec<f32> = params.iter().flat_map(|p| p.1.iter().copied()).collect();
        coll.broadcast_f32(&mut flat).map_err(dist)?;
        let mut off = 0;
        for p in params.iter_mut() {
            let n = p.1.len();
            p.1.copy_from_slice(&flat[off..off + n]);
            off += n;
        }
        match &mut self.kind {
            Kind::Reference { params: mine, .. } => {
                *mine = params;
                self.lora.update_from_host(mine)?;
            }
            Kind::Fused { engine, .. } => {
                with_engine!(engine.as_ref(), e => e.lora().params_from_host(e.device(), &params)?);
                self.lora_stale = true;
            }
        }
        Ok(())
    }

    /// The optimizer update with learning rate `lr`, from the clipped gradients.
    pub fn update(&mut self, lr: f32) -> Result<()> {
        match &mut self.kind {
            Kind::Reference {
                params,
                host_grads,
                opt,
                ..
            } => {
                {
                    let mut p: Vec<&mut [f32]> =
                        params.iter_mut().map(|p| p.1.as_mut_slice()).collect();
                    let g: Vec<&[f32]> = host_grads.iter().map(|g| g.1.as_slice()).collect();
                    opt.step(&mut p, &g, lr)?;
                }
                self.lora.update_from_host(params)?;
            }
            Kind::Fused { engine, opt } => {
                with_engine!(engine.as_ref(), e => {
                    let l = e.lora();
                    opt.step(l.params.all(), l.grads.all(), lr)?
                });
                self.lora_stale = true;
            }
        }
        Ok(())
    }

    /// Evaluation loss of one batch (no dropout, no gradients).
    pub fn eval_loss(&mut self, base: &BaseModel, batch: &TokenBatch) -> Result<StepLoss> {
        Ok(match &mut self.kind {
            Kind::Reference { .. } => forward_loss(base, Some(&self.lora), batch)?,
            Kind::Fused { engine, .. } => {
                with_engine!(engine.as_mut(), e => e.forward_loss(batch)?)
            }
        })
    }

    /// The adapters as candle tensors on `device` (the base model's), current (for
    /// generation). The fused path keeps its candle copy on the host (the engine's
    /// buffers are what trains), so this device copy exists only while it is used.
    pub fn lora_weights(&mut self, device: &Device) -> Result<LoraWeights> {
        if self.lora_stale {
            let p = self.params()?;
            self.lora.update_from_host(&p)?;
            self.lora_stale = false;
        }
        Ok(self.lora.to_device(device)?)
    }
}
