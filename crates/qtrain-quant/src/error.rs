//! Errors of quantization and of reading bitsandbytes' serialized state.

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("shape {shape:?} does not match {len} values")]
    ShapeMismatch { shape: Vec<usize>, len: usize },
    #[error("blocksize {0} is not one bitsandbytes supports (32, 64, ..., 4096)")]
    BadBlocksize(usize),
    #[error("value at index {index} is not finite; a weight with NaN/Inf cannot be quantized")]
    NonFinite { index: usize },
    #[error("bitsandbytes state: missing entry `{0}`")]
    MissingEntry(String),
    #[error("bitsandbytes state: entry `{key}`: {msg}")]
    BadEntry { key: String, msg: String },
}
