//! Errors of the step types. Every variant names the batch field, tensor name or
//! shape involved, so a caller can tell what is wrong without a debugger.

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("invalid LoRA config: {0}")]
    Config(String),
    #[error("unknown LoRA target `{name}` (allowed: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")]
    UnknownTarget { name: String },
    #[error("batch field `{field}` has {found} entries, expected {expected} (batch_size {batch_size} x seq_len {seq_len})")]
    BatchShape {
        field: &'static str,
        found: usize,
        expected: usize,
        batch_size: usize,
        seq_len: usize,
    },
    #[error("batch: token id {id} at flat index {index} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { index: usize, id: u32, vocab: usize },
    #[error(
        "batch: label {label} at flat index {index} is neither -100 nor a token id below {vocab}"
    )]
    LabelOutOfRange {
        index: usize,
        label: i64,
        vocab: usize,
    },
    #[error("unknown LoRA tensor `{name}`")]
    UnknownTensor { name: String },
    #[error("LoRA tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, StepError>;
