//! The training run's error type: every way `qtrain run` (and the exports that read
//! its checkpoints) can fail, each with the file, key or number the user needs.

use crate::ckpt_io::CkptError;
use crate::models::ModelSourceError;
use std::path::PathBuf;

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
    Peft(#[from] crate::peft::PeftError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("{path}: {msg}")]
    Resume { path: PathBuf, msg: String },
    /// A fresh run pointed at an output directory that holds another run's
    /// checkpoints: continuing or replacing it must be asked for.
    #[error(
        "{dir} already holds checkpoints of a run (newest: {newest}); pass --resume to \
         continue it, --overwrite to replace it, or choose another output directory \
         (--out DIR or checkpoint.output_dir)"
    )]
    OutputInUse { dir: PathBuf, newest: String },
    /// The time budget cannot hold the run's fixed costs, or not even one step.
    #[error("{0}")]
    Budget(String),
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

pub type Result<T> = std::result::Result<T, TrainError>;

/// The error of a data-parallel collective, as the trainer reports it.
pub fn dist(e: qtrain_dist::DistError) -> TrainError {
    TrainError::Other(format!("data parallel: {e}"))
}
