//! The fused ops of the decoder's forward and backward, one module per op, each the
//! op's single home (the llm.c layout): its CUDA kernel (`NAME.cu`, compiled to PTX
//! by `build.rs` with the `cuda` feature), the launcher that pushes the kernel's
//! arguments (`mod cuda`), the wrapper that checks shapes and overlaps and runs the
//! kernel on a GPU or the CPU reference on the CPU, that CPU reference, and the
//! self-test that `qtrain doctor` runs against it on random data.
//!
//! - [`swiglu`]: its CPU reference is the candle-ops implementation the reference
//!   decoder (`qtrain-reference`) trains with (bit for bit the kernel's formula), so
//!   the decoder and the kernels are checked against one piece of code.
//! - [`rmsnorm`]: the kernel's row loop and the decoder's tensor form side by side
//!   (they differ in the order of the f32 sums; see there why both stay).
//! - [`rope`], [`attention`], [`xent`], [`rows`]: plain-Rust references on host
//!   slices (the reference decoder computes these differently: rotations on full
//!   cos/sin tables, a materialized attention mask, chunked candle cross-entropy).
//! - [`bias`]: a frozen projection bias added in place to a GEMM output (its
//!   reference is the decoder's broadcast add, bit for bit).
//! - [`head_norm`]: RMSNorm over each head of q and k (Qwen 3), whose CPU reference
//!   is [`rmsnorm`]'s row loop over the heads.
//! - [`fp8`]: FP8 E4M3 quantization with per-row scales and the scaled FP8 GEMM
//!   (cuBLASLt) of `train.precision = "fp8"`, against `qtrain_quant::fp8`.
//! - [`lora_dropout`]: the LoRA A-side products with the dropout mask generated in
//!   the kernel (`z = dropout(x) Aᵀ`, `dA += dzᵀ dropout(x)`, `dx += (dz A) ∘ mask`),
//!   whose CPU references are [`rows`]' dropout and the GEMM reference composed.
//! - [`nf4`]: NF4 dequantization into a reused buffer; [`nf4_quant`]: NF4 (double)
//!   quantization on the device, bit-exact with `qtrain_quant`.
//!
//! `common.cuh` holds the kernels' shared device helpers (conversions, vector
//! loads, reductions, the 8-bit code search `quantize_one`, the LoRA dropout mask's
//! hash); qtrain-optim's AdamW kernel includes it too.

pub mod attention;
pub mod bias;
pub mod fp8;
pub mod head_norm;
pub mod lora_dropout;
pub mod nf4;
pub mod nf4_quant;
pub mod rmsnorm;
pub mod rope;
pub mod rows;
pub mod swiglu;
pub mod xent;

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

/// A host candle tensor `[rows, cols]` of `T`'s dtype holding `values` (already
/// representable in `T`), for the CPU references built on candle ops.
fn host_tensor<T: crate::Float>(
    values: Vec<f32>,
    rows: usize,
    cols: usize,
) -> candle_core::Result<candle_core::Tensor> {
    candle_core::Tensor::from_vec(values, (rows, cols), &candle_core::Device::Cpu)?
        .to_dtype(T::KIND.dtype())
}

/// The values of a host tensor as f32, row-major.
fn tensor_values(t: &candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}
