//! Quantization for qtrain, the CPU reference of every quantization kernel,
//! bit-compatible with bitsandbytes:
//!
//! - [`nf4`]: 4-bit NormalFloat blockwise quantization with double quantization.
//! - [`blockwise`]: 8-bit blockwise quantization with a 256-entry code.
//! - [`dynamic_map`]: bitsandbytes' signed and unsigned dynamic 8-bit maps.
//! - [`fp8`]: FP8 E4M3 and the per-row scaling of `train.precision = "fp8"`.
//! - [`bnb_format`]: bitsandbytes' serialized quant state (safetensors entries).
//!
//! Pure Rust on slices, no tensor library: the CUDA kernels (qtrain-device's `ops`, qtrain-optim's AdamW) are
//! tested against these functions.

pub mod blockwise;
pub mod bnb_format;
pub mod dynamic_map;
pub mod error;
pub mod fp8;
pub mod nf4;

pub use blockwise::{dequantize_blockwise, quantize_blockwise, quantize_one};
pub use bnb_format::{SerDtype, SerializedTensor};
pub use dynamic_map::{create_dynamic_map, signed_dynamic_map, unsigned_dynamic_map};
pub use error::QuantError;
pub use nf4::{
    double_quantize, quantize_nf4_value, torch_cuda_mean_f32, Absmax, DoubleQuantAbsmax, Nf4Tensor,
    NESTED_BLOCKSIZE, NF4_BLOCKSIZES, NF4_CODE,
};
