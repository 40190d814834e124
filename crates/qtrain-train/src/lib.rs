//! The training run: its configuration, the time-budget planner, the training loop
//! with checkpoints and exact resume, metrics, and the exports (PEFT adapter, merged
//! model, GGUF). The step's math lives in `qtrain-reference` and `qtrain-engine` (over the
//! shared types of `qtrain-step`; [`backend`] switches between them), the data in
//! `qtrain-data`, the optimizer in `qtrain-optim`; this crate wires them into one
//! straight loop.
//!
//! The run is a recipe ([`trainer`]): setup, evaluate, train steps, finish; the
//! whole process keeps to the time budget ([`budget`], [`planner`]), checkpoints
//! are atomic and pruned within their run's lineage ([`ckpt_io`]).
//!
//! Sizing: [`memory`] predicts a run's peak GPU memory, [`gpu`] knows the GPUs and
//! their precision policy, [`throughput`] estimates tokens/s, [`sizing`] puts them
//! together into `qtrain plan`'s report, [`micro`] cuts steps into micro-batches
//! that fit and recovers from out-of-memory, [`loss_scale`] scales fp16 losses.
//!
//! Checks: [`bench`] times training steps (`qtrain bench`), [`selftest`] checks a
//! tiny model's training step on a device against the CPU (`qtrain doctor`).
// `qtrain bench`'s JSON line (bench::CaseResult::record) is one serde_json::json!
// literal with more keys than the macro's default recursion limit expands.
#![recursion_limit = "256"]

pub mod backend;
pub mod bench;
pub mod budget;
pub mod ckpt_io;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod gpu;
pub mod host_memory;
pub mod loss_scale;
pub mod memory;
pub mod merge;
pub mod metrics;
pub mod micro;
pub mod models;
pub mod peft;
pub mod planner;
pub mod selftest;
pub mod signals;
pub mod sizing;
pub mod tensorboard;
pub mod throughput;
pub mod trainer;

pub use config::{ConfigError, RunConfig};
pub use error::TrainError;
pub use planner::{Budget, Clock, Plan, Planner, SimClock, SystemClock};
