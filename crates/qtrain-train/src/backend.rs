//! Where the trainable state lives and how a training step is computed: the one
//! switch between qtrain's two step implementations, so the training loop is the
//! same straight loop for both.
//!
//! - [`Backend::Reference`]: the candle-ops decoder of `qtrain_lora` (explicit
//!   forward/backward) with the adapters as candle tensors and the optimizer on the
//!   host. It runs anywhere candle runs, in any dtype (the CPU demo in f32; f16 on
//!   GPUs without bf16).
//! - [`Backend::Fused`]: the fused engine of `qtrain_engine` (hand-written kernels and
//!   GEMMs over preallocated buffers; bf16 on GPUs). The adapters' master weights and
//!   gradients live in flat device buffers.
//!
//! Both keep the optimizer's view of the parameters as named host tensors in the
//! order of `LoraWeights::to_host`, so checkpoints, resume and exports are the same
//! files whichever backend wrote them.

use crate::trainer::TrainError;
use qtrain_engine::{Engine, EngineOptions};
use qtrain_lora::lora::HostTensor;
use qtrain_lora::{forward_backward, forward_loss, LoraGrads, LoraWeights, StepLoss, StepOptions, TokenBatch};
use qtrain_model::BaseModel;
use qtrain_optim::{clip_grad_norm, Optimizer};

type Result<T> = std::result::Result<T, TrainError>;

impl From<qtrain_engine::EngineError> for TrainError {
    fn from(e: qtrain_engine::EngineError) -> Self {
        use qtrain_engine::EngineError::Kernel;
        use qtrain_kernels::KernelError::OutOfMemory;
        match e {
            // Kept apart: the trainer recovers from it (crate::micro).
            Kernel(OutOfMemory { .. }) => TrainError::OutOfMemory(format!("fused engine: {e}")),
            e => TrainError::Other(format!("fused engine: {e}")),
        }
    }
}

/// Which step implementation `train.engine` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// Fused on GPUs with bf16, reference elsewhere.
    Auto,
    Fused,
    Reference,
}

impl EngineChoice {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "fused" => Some(Self::Fused),
            "reference" => Some(Self::Reference),
            _ => None,
        }
    }

    /// Whether this choice runs the fused engine for a model in `dtype`, on a GPU or
    /// not (what [`Backend::new`] decides; the memory model asks the same question).
    pub fn is_fused(self, on_gpu: bool, dtype: candle_core::DType) -> bool {
        match self {
            EngineChoice::Reference => false,
            EngineChoice::Fused => true,
            EngineChoice::Auto => on_gpu && dtype == candle_core::DType::BF16,
        }
    }
}

/// The fused engine in the model's compute type.
enum AnyEngine {
    Bf16(Engine<half::bf16>),
    F32(Engine<f32>),
}

macro_rules! with_engine {
    ($e:expr, $x:ident => $body:expr) => {
        match $e {
            AnyEngine::Bf16($x) => $body,
            AnyEngine::F32($x) => $body,
        }
    };
}

/// The trainable state and the step.
pub struct Backend {
    kind: Kind,
    /// Master weights as the optimizer sees them (host, f32, `to_host` order).
    params: Vec<HostTensor>,
    /// The step's gradients after clipping (host), valid between `clip` and `update`.
    host_grads: Vec<HostTensor>,
    opt: Box<dyn Optimizer>,
    /// Candle adapters for generation (and the whole reference path).
    lora: LoraWeights,
    /// `lora` is behind `params` (the fused path updates it only when asked).
    lora_stale: bool,
}

enum Kind {
    Reference { grads: LoraGrads },
    Fused(Box<AnyEngine>),
}

impl Backend {
    /// Builds the backend `choice` resolves to for `base`, starting from `lora`
    /// (whose values are the run's initial or resumed adapters) and `opt`.
    pub fn new(base: &BaseModel, lora: LoraWeights, opt: Box<dyn Optimizer>, choice: EngineChoice) -> Result<Self> {
        let fused = choice.is_fused(base.device.is_cuda(), base.dtype);
        let params = lora.to_host()?;
        let kind = if fused {
            let opts = EngineOptions::default();
            let engine = match base.dtype {
                candle_core::DType::BF16 => AnyEngine::Bf16(Engine::new(base, &lora, opts)?),
                candle_core::DType::F32 => AnyEngine::F32(Engine::new(base, &lora, opts)?),
                other => {
                    return Err(TrainError::Other(format!(
                        "train.engine = \"fused\" needs a bf16 (GPU) or f32 (CPU) model, not {other:?}; \
                         use train.engine = \"reference\""
                    )))
                }
            };
            Kind::Fused(Box::new(engine))
        } else {
            Kind::Reference {
                grads: LoraGrads::zeros_like(&lora)?,
            }
        };
        Ok(Self {
            kind,
            params,
            host_grads: Vec::new(),
            opt,
            lora,
            lora_stale: false,
        })
    }

    /// Caps the bytes the fused engine's own buffers may hold (`Dev::set_memory_limit`:
    /// past it an allocation fails like an out-of-memory). For tests of the
    /// recovery path and for emulating a smaller GPU; the reference path has no
    /// such accounting and ignores it (with a warning).
    pub fn set_memory_limit(&self, bytes: Option<usize>) {
        match &self.kind {
            Kind::Fused(e) => with_engine!(e.as_ref(), e => e.device().set_memory_limit(bytes)),
            Kind::Reference { .. } => {
                if bytes.is_some() {
                    tracing::warn!("the engine memory limit applies to the fused engine only");
                }
            }
        }
    }

    /// `"fused"` or `"reference"`, for the log.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Reference { .. } => "reference",
            Kind::Fused(_) => "fused",
        }
    }

    pub fn optimizer(&self) -> &dyn Optimizer {
        self.opt.as_ref()
    }

    /// The master weights (host copy, what checkpoints and exports write).
    pub fn params(&self) -> &[HostTensor] {
        &self.params
    }

    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|p| p.1.len()).sum()
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        match &mut self.kind {
            Kind::Reference { grads } => grads.zero()?,
            Kind::Fused(e) => with_engine!(e.as_ref(), e => e.lora().zero_grads(e.device())?),
        }
        Ok(())
    }

    /// One micro-batch: adds its gradient (of `loss_sum / loss_denominator`).
    pub fn micro_step(&mut self, base: &BaseModel, batch: &TokenBatch, opts: &StepOptions, loss_denominator: f64) -> Result<StepLoss> {
        Ok(match &mut self.kind {
            Kind::Reference { grads } => forward_backward(base, &self.lora, batch, opts, loss_denominator, grads)?,
            Kind::Fused(e) => with_engine!(e.as_mut(), e => e.forward_backward(batch, opts, loss_denominator)?),
        })
    }

    /// Clips the accumulated gradients to `max_norm` (0: no clipping) and returns
    /// their norm before clipping (non-finite when any gradient is).
    pub fn clip(&mut self, max_norm: f32) -> Result<f32> {
        self.clip_unscaled(max_norm, 1.0)
    }

    /// [`Backend::clip`] after multiplying the gradients by `unscale` (the inverse
    /// of the fp16 loss scale: clipping and the update see the true gradients).
    pub fn clip_unscaled(&mut self, max_norm: f32, unscale: f32) -> Result<f32> {
        self.host_grads = match &self.kind {
            Kind::Reference { grads } => grads.to_host()?,
            Kind::Fused(e) => with_engine!(e.as_ref(), e => e.lora().grads_to_host(e.device())?),
        };
        if unscale != 1.0 {
            for g in &mut self.host_grads {
                g.1.iter_mut().for_each(|v| *v *= unscale);
            }
        }
        let mut slices: Vec<&mut [f32]> = self.host_grads.iter_mut().map(|g| g.1.as_mut_slice()).collect();
        Ok(clip_grad_norm(&mut slices, max_norm))
    }

    /// The optimizer update with learning rate `lr`, from the clipped gradients.
    pub fn update(&mut self, lr: f32) -> Result<()> {
        {
            let mut p: Vec<&mut [f32]> = self.params.iter_mut().map(|p| p.1.as_mut_slice()).collect();
            let g: Vec<&[f32]> = self.host_grads.iter().map(|g| g.1.as_slice()).collect();
            self.opt.step(&mut p, &g, lr)?;
        }
        match &self.kind {
            Kind::Reference { .. } => self.lora.update_from_host(&self.params)?,
            Kind::Fused(e) => {
                with_engine!(e.as_ref(), e => e.lora().params_from_host(e.device(), &self.params)?);
                self.lora_stale = true;
            }
        }
        Ok(())
    }

    /// Evaluation loss of one batch (no dropout, no gradients).
    pub fn eval_loss(&mut self, base: &BaseModel, batch: &TokenBatch) -> Result<StepLoss> {
        Ok(match &mut self.kind {
            Kind::Reference { .. } => forward_loss(base, Some(&self.lora), batch)?,
            Kind::Fused(e) => with_engine!(e.as_mut(), e => e.forward_loss(batch)?),
        })
    }

    /// The adapters as candle tensors, current (for generation).
    pub fn lora_weights(&mut self) -> Result<&LoraWeights> {
        if self.lora_stale {
            self.lora.update_from_host(&self.params)?;
            self.lora_stale = false;
        }
        Ok(&self.lora)
    }
}
