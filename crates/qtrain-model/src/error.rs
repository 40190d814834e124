//! Errors of model loading, quantization and writing. Every variant names the file
//! and, where there is one, the key or tensor, so a user can find what is wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON for a model config: {msg}")]
    ConfigParse { path: PathBuf, msg: String },
    #[error("{path}: key `{key}`: {msg}")]
    ConfigField {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("{path}: model_type `{model_type}` is not supported (qtrain trains: mistral, llama)")]
    UnsupportedArchitecture { path: PathBuf, model_type: String },
    #[error("unknown preset `{name}` (known: {known})")]
    UnknownPreset { name: String, known: String },
    #[error("{dir}: no model found: {msg}")]
    ModelNotFound { dir: PathBuf, msg: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {found}, expected {expected}")]
    DtypeMismatch {
        path: PathBuf,
        name: String,
        found: String,
        expected: String,
    },
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{path}: tensor `{name}`: {source}")]
    Quant {
        path: PathBuf,
        name: String,
        #[source]
        source: qtrain_quant::QuantError,
    },
    #[error("hub: {0}")]
    Hub(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Device(#[from] qtrain_device::DeviceError),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
