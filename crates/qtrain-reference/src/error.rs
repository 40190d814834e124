//! Errors of the reference decoder. Every variant names the batch field, tensor
//! name or shape involved, so a caller can tell what is wrong without a debugger;
//! errors of the step types (batch, adapters) come through [`ReferenceError::Step`].

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Step(#[from] qtrain_step::StepError),
    #[error("LoRA weights were made for {found} layers, the base model has {expected}")]
    LayerCount { found: usize, expected: usize },
    #[error("decode: {0}")]
    Decode(String),
    #[error("loss denominator must be a positive token count, got {0}")]
    LossDenominator(f64),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] qtrain_model::ModelError),
}

pub type Result<T> = std::result::Result<T, ReferenceError>;
