//! The frozen base model: architecture config, reading Hugging Face model directories
//! (local or through the hub cache), NF4 quantization while loading, the
//! bitsandbytes-format quantized cache, and seeded random models for tests and
//! benchmarks. The math that runs the model lives in `qtrain-reference`.

pub mod base;
pub mod bnb;
pub mod config;
pub mod error;
pub mod hub;
pub mod random;
pub mod safetensors_io;

pub use base::{BaseLayer, BaseModel, FrozenLinear, FrozenStorage, LoadOptions, Quantization};
pub use config::{ModelConfig, Proj, PRESETS, PROJECTIONS};
pub use error::{ModelError, Result};
