//! Errors of the fused engine.

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Device(#[from] qtrain_device::DeviceError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Step(#[from] qtrain_step::StepError),
    /// The model or adapters are in a dtype this engine instance does not compute in.
    #[error("dtype: {0}")]
    Dtype(String),
    /// The model or batch has a shape the engine does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("loss denominator must be finite and > 0, got {0}")]
    LossDenominator(f64),
    #[error("adapter tensor {name}: {msg}")]
    Adapter { name: String, msg: String },
}

pub type Result<T> = std::result::Result<T, EngineError>;
