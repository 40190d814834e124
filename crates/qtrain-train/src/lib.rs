//! The training run: its configuration, the time-budget planner, the training loop
//! with checkpoints and exact resume, metrics, and the exports (PEFT adapter, merged
//! model, GGUF). The math lives in `qtrain-reference`, the data in `qtrain-data`, the
//! optimizer
//! in `qtrain-optim`; this crate wires them into one straight loop.
//!
//! Sizing: [`memory`] predicts a run's peak GPU memory (`qtrain plan`), [`gpu`]
//! knows the GPUs and their precision policy, [`throughput`] estimates tokens/s,
//! [`micro`] cuts steps into micro-batches that fit and recovers from
//! out-of-memory, [`loss_scale`] scales fp16 losses.

pub mod backend;
pub mod ckpt_io;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod gpu;
pub mod loss_scale;
pub mod memory;
pub mod merge;
pub mod metrics;
pub mod micro;
pub mod models;
pub mod peft;
pub mod planner;
pub mod signals;
pub mod tensorboard;
pub mod throughput;
pub mod trainer;

pub use config::{ConfigError, RunConfig};
pub use planner::{Budget, Clock, Plan, Planner, SimClock, SystemClock};
