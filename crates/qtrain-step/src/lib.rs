//! The types one training step is made of, shared by the two implementations of
//! the step (the candle-ops reference decoder `qtrain-reference` and the fused
//! engine `qtrain-engine`, which are siblings above this crate) and by the data
//! pipeline that produces the batches.
//!
//! - [`batch`]: [`TokenBatch`], a micro-batch of packed token rows, and
//!   [`IGNORE_INDEX`], the label that takes no loss.
//! - [`step`]: [`StepOptions`] (checkpointing, dropout key) and [`StepLoss`].
//! - [`lora`]: the adapters ([`LoraConfig`], [`LoraWeights`], [`LoraGrads`]), their
//!   stable tensor names, the host layout the optimizer sees ([`HostTensor`]) and
//!   the counter-based dropout masks both implementations draw identically.

pub mod batch;
pub mod error;
pub mod lora;
pub mod step;

pub use batch::{TokenBatch, IGNORE_INDEX};
pub use error::{Result, StepError};
pub use lora::{
    dropout_base, dropout_mask, tensor_name, DropoutKey, HostTensor, LoraConfig, LoraGrads,
    LoraPair, LoraPart, LoraWeights,
};
pub use step::{StepLoss, StepOptions};
