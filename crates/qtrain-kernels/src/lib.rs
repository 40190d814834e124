//! qtrain's device kernels as candle ops. Each op has a plain CPU implementation
//! (the readable reference, run by CI) and, with the `cuda` feature, a CUDA kernel
//! from the workspace's `kernels/` directory compiled to PTX by `build.rs`; tests and
//! `qtrain doctor` check every kernel against its CPU reference on random data.

pub mod nf4;
pub mod nf4_quant;

pub use nf4::Nf4Device;
pub use nf4_quant::Nf4QuantizeError;

/// PTX of the CUDA kernels, one module per `kernels/*.cu` file.
#[cfg(feature = "cuda")]
pub mod ptx {
    pub const NF4: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));
    pub const NF4_QUANT: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4_quant.ptx"));
}
