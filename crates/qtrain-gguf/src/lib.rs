//! GGUF export: qtrain writes the files llama.cpp, Ollama and LM Studio load, in
//! GGUF v3, without llama.cpp's converter or `llama-quantize`.
//!
//! - [`writer`]: the container (header, typed metadata, tensor infos, aligned data),
//!   streamed tensor by tensor.
//! - [`quants`]: ggml's reference block quantizers (Q8_0, Q5_0, Q4_K, Q5_K, Q6_K)
//!   and f16/bf16, bit-compatible with ggml-quants.c, and their dequantizers.
//! - [`types`]: ggml tensor types and the file types `--gguf` offers.
//! - [`arch`]: the llama.cpp architecture of a Hugging Face config, its metadata,
//!   tensor names and the q/k permutation.
//! - [`mix`]: each tensor's type (the converter's rules, llama-quantize's Q4_K_M).
//! - [`tokenizer`]: `tokenizer.ggml.*` from `tokenizer.json` and its config.
//! - [`modelfile`]: Ollama's Modelfile with the chat template translated to Go.
//! - [`export`]: one export, streaming from a [`TensorSource`].

pub mod arch;
pub mod error;
pub mod export;
pub mod mix;
pub mod modelfile;
pub mod quants;
pub mod tokenizer;
pub mod types;
pub mod writer;

pub use error::GgufError;
pub use export::{export_gguf, gguf_file_name, ExportOptions, ExportSummary, TensorSource};
pub use modelfile::ChatRenderer;
pub use types::{FileType, GgmlType, QK_K};
pub use writer::{GgufWriter, Metadata, TensorInfo, Value};
