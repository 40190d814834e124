//! qtrain's device layer: the device the fused training step runs on (the CPU, or
//! one CUDA GPU with the `cuda` feature), its buffers and streams, memory
//! accounting and the profiler, the GEMM, and every fused op of the decoder, each
//! in one home with its CUDA kernel, launcher, CPU reference and self-test. Tests
//! and `qtrain doctor` check every kernel against its CPU reference on random data.
//!
//! - [`device`]: the device ([`Dev`]: CPU or one GPU), buffers ([`DBuf`]), views
//!   and row-major matrices ([`View`], [`Mat`]), memory accounting, the profiler.
//! - [`cuda`] (feature `cuda`): raw allocations, streams, events, pinned memory and
//!   kernel launching on candle's CUDA context.
//! - [`gemm`]: matrix products (cuBLAS on the GPU, TF32 for f32).
//! - [`ops`]: the fused ops, one module per op (RMSNorm, RoPE, SwiGLU, attention,
//!   cross-entropy, row kernels, NF4 dequantization and quantization).
//! - [`selftest`]: the self-test harness and [`selftest::run_basic`].
//! - [`stage`]: host memory with asynchronous copies to and from device buffers
//!   on a side stream ([`HostStage`]: the engine's offloaded checkpoints).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod gemm;
pub mod ops;
pub mod selftest;
pub mod stage;

pub use device::{to_f32_vec, DBuf, Dev, Elem, Float, FloatKind, Mat, Region, RegionTime, View};
pub use error::{DeviceError, Result};
pub use gemm::{gemm, Op};
pub use ops::nf4::Nf4Device;
pub use ops::nf4_quant::Nf4QuantizeError;
pub use stage::HostStage;
