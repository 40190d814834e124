//! LoRA fine-tuning math for qtrain: adapters on the frozen (NF4) base, explicit
//! forward and hand-written backward of every decoder op, gradient checkpointing,
//! and the chunked next-token cross-entropy.
//!
//! - [`ops`]: one module per op, `forward`/`backward` on candle tensors.
//! - [`lora`]: adapter config, weights, gradients, deterministic dropout.
//! - [`model`]: the training step ([`forward_backward`]) and eval/generation forwards.
//!
//! Candle's graph autograd is not used for training: it would compute gradients of
//! the frozen operands and loses them through fused ops.

pub mod error;
pub mod lora;
pub mod model;
pub mod ops;

pub use error::{LoraError, Result};
pub use lora::{
    dropout_base, dropout_mask, tensor_name, DropoutKey, HostTensor, LoraConfig, LoraGrads,
    LoraPair, LoraPart, LoraWeights,
};
pub use model::{
    forward_backward, forward_logits, forward_loss, forward_loss_train, StepLoss, StepOptions,
    TokenBatch, IGNORE_INDEX,
};
