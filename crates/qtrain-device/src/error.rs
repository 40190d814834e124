//! Errors of the kernel layer: a bad argument (shape, length, overlap, dtype) is
//! reported with the op's name and the numbers that disagree; a CUDA failure with
//! the call that failed.

/// What can go wrong in a kernel call.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Arguments that do not fit together (lengths, shapes, strides).
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    /// A combination the kernels do not implement (e.g. a head dimension).
    #[error("{op}: unsupported: {msg}")]
    Unsupported { op: &'static str, msg: String },
    /// A CUDA driver or cuBLAS call failed.
    #[error("CUDA error in {op}: {msg}")]
    Cuda { op: &'static str, msg: String },
    /// The device ran out of memory while allocating `bytes`.
    #[error(
        "out of GPU memory allocating {:.1} MiB for {what} ({:.1} MiB already held by qtrain's buffers)",
        *bytes as f64 / 1048576.0, *held as f64 / 1048576.0
    )]
    OutOfMemory {
        what: String,
        bytes: usize,
        held: usize,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DeviceError>;

pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> DeviceError {
    DeviceError::Shape {
        op,
        msg: msg.into(),
    }
}

/// Returns a [`DeviceError::Shape`] unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $op:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::error::shape_err($op, format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;
