//! Forward and backward of every op of the decoder, written with candle's primitive
//! tensor ops (matmul, broadcasting arithmetic, exp, reductions, gathers).
//!
//! These are the readable reference implementations: they run on CPU and CUDA
//! alike. RMSNorm and SwiGLU live beside their kernels in `qtrain-device` (one CPU
//! reference per op where the math is the same) and are re-exported here. None of
//! them uses candle's graph autograd: each `backward` is the hand-derived adjoint
//! of its `forward`, documented next to the code, and frozen operands (norm
//! weights, projections, lm_head) never get a gradient.
//!
//! Precision: inputs arrive in the model's compute dtype (bf16 on the GPU, f32 or
//! f64 on the CPU); reductions (norm statistics, softmax, log-sum-exp, the loss)
//! run in [`acc_dtype`], at least f32.

pub mod attention;
pub mod cross_entropy;
pub mod linear;
pub mod rope;

pub use qtrain_device::ops::acc_dtype;
/// RMSNorm and SwiGLU compute exactly what their kernels compute, so they have one
/// implementation, beside the kernels in qtrain-device: the kernels' CPU reference.
pub use qtrain_device::ops::{rmsnorm::reference as rmsnorm, swiglu::reference as swiglu};
