//! Forward and backward of every op of the decoder, written with candle's primitive
//! tensor ops (matmul, broadcasting arithmetic, exp, reductions, gathers).
//!
//! These are the readable reference implementations: they run on CPU and CUDA
//! alike, and the fused CUDA kernels that replace them later keep the same
//! signatures. None of them uses candle's graph autograd: each `backward` is the
//! hand-derived adjoint of its `forward`, documented next to the code, and frozen
//! operands (norm weights, projections, lm_head) never get a gradient.
//!
//! Precision: inputs arrive in the model's compute dtype (bf16 on the GPU, f32 or
//! f64 on the CPU); reductions (norm statistics, softmax, log-sum-exp, the loss)
//! run in [`acc_dtype`], at least f32.

pub mod attention;
pub mod cross_entropy;
pub mod linear;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

use candle_core::DType;

/// The dtype reductions accumulate in: f64 stays f64 (the finite-difference tests
/// run the whole model in f64), everything else is promoted to f32.
pub fn acc_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
