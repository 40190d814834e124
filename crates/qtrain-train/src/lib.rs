//! The training run: its configuration, the time-budget planner, the training loop
//! with checkpoints and exact resume, metrics, and the exports (PEFT adapter, merged
//! model). The math lives in `qtrain-lora`, the data in `qtrain-data`, the optimizer
//! in `qtrain-optim`; this crate wires them into one straight loop.

pub mod backend;
pub mod ckpt_io;
pub mod config;
pub mod generate;
pub mod merge;
pub mod metrics;
pub mod models;
pub mod peft;
pub mod planner;
pub mod signals;
pub mod tensorboard;
pub mod trainer;

pub use config::{ConfigError, RunConfig};
pub use planner::{Budget, Clock, Plan, Planner, SimClock, SystemClock};
