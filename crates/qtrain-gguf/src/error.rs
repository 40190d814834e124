//! Errors of GGUF export; each names the file, key or tensor it is about.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("{path}: key `{key}`: {msg}")]
    Field {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    /// A model family or feature llama.cpp cannot run from what qtrain would write.
    #[error("{path}: cannot export to GGUF: {msg}")]
    Unsupported { path: PathBuf, msg: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// The source of the weights (the merge) failed.
    #[error(transparent)]
    Source(Box<dyn std::error::Error + Send + Sync>),
}

impl GgufError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        GgufError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
