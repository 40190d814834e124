//! The optimizer side of qtrain: AdamW with bitsandbytes-style 8-bit blockwise state
//! ([`AdamW8bit`]) and its f32 reference ([`AdamW32`]), learning-rate schedules
//! ([`LrSchedule`]), global-norm gradient clipping ([`clip_grad_norm`]), the state
//! placement policy for paged optimizer state ([`PagingPolicy`]), and state
//! checkpoints in safetensors with bit-exact resume. [`device`] runs the same optimizer
//! on a `qtrain_device::Dev` over the fused engine's flat parameter buffer (a fused
//! CUDA kernel with the `cuda` feature), bit-identical to the host one.
//!
//! Parameters of the host optimizers are plain f32 slices: the trainer owns f32 master
//! copies of the LoRA weights and copies them to and from candle tensors. This crate is the CPU
//! implementation and the numerical oracle for the fused CUDA update kernel; the design
//! and its reasons are written up in `docs/optimizer.md`.
//!
//! A training step, in order:
//!
//! ```
//! use qtrain_optim::{clip_grad_norm, AdamW8bit, AdamWConfig, LrSchedule, ParamSpec, ScheduleKind};
//!
//! let mut w = vec![0.5f32; 8192];
//! let mut g = vec![0.1f32; 8192];
//! let mut opt = AdamW8bit::new(AdamWConfig::default(), &[ParamSpec::new("w", w.len())])?;
//! let sched = LrSchedule { kind: ScheduleKind::Cosine, peak_lr: 1e-3, warmup_steps: 10, min_lr_ratio: 0.1 };
//! let total_steps = 100; // from the step planner; may change between steps
//!
//! let norm = clip_grad_norm(&mut [&mut g[..]], 1.0);
//! if norm.is_finite() {
//!     let lr = sched.lr_at(opt.step_count(), total_steps);
//!     opt.step(&mut [&mut w[..]], &[&g[..]], lr)?;
//! }
//! assert_eq!(opt.step_count(), 1);
//! # Ok::<(), qtrain_optim::OptimError>(())
//! ```

mod adamw;
pub mod checkpoint;
mod clip;
pub mod device;
mod error;
pub mod paging;
mod schedule;

pub use adamw::{
    AdamW32, AdamW8bit, AdamWConfig, Optimizer, ParamSpec, ParamState, StateFormat, StateStorage,
    StepStats, BLOCKSIZE, DEFAULT_MIN_8BIT_SIZE,
};
pub use clip::clip_grad_norm;
pub use device::{DeviceAdamW32, DeviceAdamW8bit, DeviceOptimizer};
pub use error::{OptimError, Result};
pub use paging::{PagingPolicy, StatePlacement};
pub use schedule::{LrSchedule, ScheduleKind};
