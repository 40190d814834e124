//! The crate's error type: every fallible call in `qtrain-optim` returns [`OptimError`].
//!
//! File errors carry the path, and tensor errors the safetensors key, because a resume
//! failure is only actionable when it says which file and which parameter is wrong.

use std::path::PathBuf;

/// Everything that can go wrong in the optimizer crate.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// `step` got a different number of parameters or gradients than the optimizer holds.
    #[error(
        "parameter count mismatch: the optimizer holds {expected} parameters, \
         step got {params} parameters and {grads} gradients"
    )]
    ParamCount {
        expected: usize,
        params: usize,
        grads: usize,
    },

    /// A flat parameter or gradient buffer of the device optimizer has the wrong length.
    #[error(
        "the flat {what} buffer has {found} elements, the optimizer's parameters total {expected}"
    )]
    FlatLen {
        /// "parameter" or "gradient".
        what: &'static str,
        expected: usize,
        found: usize,
    },

    /// A device operation of the device optimizer failed (allocation, copy, launch).
    #[error("optimizer on the device: {0}")]
    Device(#[from] qtrain_device::DeviceError),

    /// A parameter or gradient slice has the wrong length.
    #[error("parameter '{name}': {what} has {found} elements, the optimizer expects {expected}")]
    ParamLen {
        name: String,
        /// "parameter" or "gradient".
        what: &'static str,
        expected: usize,
        found: usize,
    },

    /// Two parameters share a name; names are safetensors keys, so they must be unique.
    #[error("duplicate parameter name '{0}'")]
    DuplicateName(String),

    /// A learning rate that is negative or not finite.
    #[error("invalid learning rate {0} (must be finite and >= 0)")]
    InvalidLr(f32),

    /// A configuration value out of its domain.
    #[error("invalid optimizer configuration: {0}")]
    InvalidConfig(String),

    /// Reading or writing a state file failed at the OS level.
    #[error("{}: I/O error: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not a readable safetensors file or its metadata is malformed.
    #[error("{}: corrupt optimizer state file: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },

    /// The file was written by the other optimizer type (e.g. 8-bit state loaded as f32).
    #[error("{}: holds '{found}' state, expected '{expected}'", .path.display())]
    WrongOptimizer {
        path: PathBuf,
        expected: String,
        found: String,
    },

    /// A tensor the parameter list requires is absent from the file.
    #[error("{}: missing tensor '{key}'", .path.display())]
    MissingTensor { path: PathBuf, key: String },

    /// A tensor exists but its dtype or shape does not fit the parameter.
    #[error("{}: tensor '{key}' is {found}, expected {expected}", .path.display())]
    TensorMismatch {
        path: PathBuf,
        key: String,
        /// dtype and shape, e.g. `F32 [8192]`.
        expected: String,
        found: String,
    },

    /// The file holds state for a parameter the caller did not list.
    #[error("{}: unexpected tensor '{key}' (no such parameter)", .path.display())]
    UnexpectedTensor { path: PathBuf, key: String },
}

/// `Result` with [`OptimError`].
pub type Result<T> = std::result::Result<T, OptimError>;
