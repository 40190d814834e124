//! qtrain's device kernels. Each op has a plain CPU implementation (the readable
//! reference, run by CI) and, with the `cuda` feature, a CUDA kernel from the
//! workspace's `kernels/` directory compiled to PTX by `build.rs`; tests and
//! `qtrain doctor` check every kernel against its CPU reference on random data.
//!
//! - [`device`]: the device ([`Dev`]: CPU or one GPU), buffers ([`DBuf`]), views
//!   and row-major matrices ([`View`], [`Mat`]).
//! - [`gemm`]: matrix products (cuBLAS on the GPU, TF32 for f32).
//! - [`nf4`]: NF4 dequantization into a reused buffer.
//! - [`norm`], [`rope`], [`swiglu`], [`attention`], [`xent`], [`rows`]: the fused
//!   ops of the decoder's forward and backward.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod gemm;
#[cfg(feature = "cuda")]
mod launch;
pub mod nf4;
pub mod nf4_quant;
pub mod norm;
pub mod rope;
pub mod rows;
pub mod selftest;
pub mod swiglu;
pub mod xent;

pub use device::{to_f32_vec, DBuf, Dev, Elem, Float, FloatKind, Mat, Region, RegionTime, View};
pub use error::{DeviceError, Result};
pub use gemm::{gemm, Op};
pub use nf4::Nf4Device;
pub use nf4_quant::Nf4QuantizeError;

/// PTX of the CUDA kernels, one module per `kernels/*.cu` file.
#[cfg(feature = "cuda")]
pub mod ptx {
    pub const ATTENTION: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    pub const NF4: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));
    pub const NF4_QUANT: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4_quant.ptx"));
    pub const NORM: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
    pub const ROPE: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));
    pub const SWIGLU: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));
    pub const XENT: &str = include_str!(concat!(env!("OUT_DIR"), "/xent.ptx"));
    pub const ROWS: &str = include_str!(concat!(env!("OUT_DIR"), "/rows.ptx"));
    /// The fused AdamW update (launched by `qtrain_optim::device`).
    pub const ADAMW8BIT: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw8bit.ptx"));
}
