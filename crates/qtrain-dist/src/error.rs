//! The crate's error types: [`DistError`] for collectives, the rendezvous, the
//! worker environment and sharding; [`crate::launch::LaunchError`] (in its module)
//! for the process supervisor.
//!
//! Every message names what a user can act on: the environment variable, the
//! address, the rank, the collective that the ranks disagreed on.

use std::time::Duration;

/// Everything that can go wrong in a data-parallel worker.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launcher variable is missing or malformed (`RANK`, `WORLD_SIZE`, ...).
    #[error("environment variable {var}: {msg}")]
    Env { var: &'static str, msg: String },

    /// The unique-id exchange at `MASTER_ADDR:MASTER_PORT` failed.
    #[error("rendezvous at {addr}: {msg}")]
    Rendezvous { addr: String, msg: String },

    /// The ranks called different collectives (or the same one with different
    /// lengths) at the same point: a bug in the caller, reported instead of a hang.
    #[error("collective mismatch between ranks: {0}")]
    Mismatch(String),

    /// Another rank of an in-process group went away (its handle was dropped, e.g.
    /// its thread panicked) while this one waited in a collective.
    #[error("rank {rank} left the group while rank {me} waited in {op}")]
    RankLeft {
        rank: usize,
        me: usize,
        op: &'static str,
    },

    /// A collective did not complete in time.
    #[error(
        "{op} on rank {rank} did not complete within {after:?} (is another rank dead or stuck?)"
    )]
    Timeout {
        op: &'static str,
        rank: usize,
        after: Duration,
    },

    /// The ranks hold different values where they must agree (data cursor, step,
    /// loss denominator): their training would silently diverge.
    #[error("ranks disagree on {what}: values range from {min} to {max}")]
    Disagree { what: String, min: u64, max: u64 },

    /// A broadcast buffer of the wrong length, an impossible sharding, ...
    #[error("{0}")]
    Invalid(String),

    /// An NCCL call failed.
    #[error("NCCL {op} on rank {rank}: {msg}")]
    Nccl {
        op: &'static str,
        rank: usize,
        msg: String,
    },

    /// A CUDA driver call around an NCCL operation failed.
    #[error("CUDA ({what}) on rank {rank}: {msg}")]
    Cuda {
        what: &'static str,
        rank: usize,
        msg: String,
    },
}

pub type Result<T> = std::result::Result<T, DistError>;
