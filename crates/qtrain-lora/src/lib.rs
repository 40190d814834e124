//! LoRA fine-tuning math for qtrain: adapters on the frozen (NF4) base, explicit
//! forward and hand-written backward of every decoder op, gradient checkpointing,
//! and the chunked next-token cross-entropy.
//!
//! - [`ops`]: one module per op, `forward`/`backward` on candle tensors.
//! - [`lora`]: adapter config, weights, gradients, deterministic dropout.
//! - [`model`]: the training step ([`forward_backward`]) and eval forwards.
//! - [`decode`]: incremental decoding with a KV cache ([`Decoder`]), for generation.
//!
//! Candle's graph autograd is not used for training: it would compute gradients of
//! the frozen operands and loses them through fused ops.

pub mod decode;
pub mod error;
pub mod lora;
pub mod model;
pub mod ops;

pub use decode::{Decoder, KvCache, DEFAULT_KEEP_WEIGHTS_BYTES};
pub use error::{LoraError, Result};
pub use lora::{
    dropout_base, dropout_mask, tensor_name, DropoutKey, HostTensor, LoraConfig, LoraGrads,
    LoraPair, LoraPart, LoraWeights,
};
pub use model::{
    forward_backward, forward_logits, forward_loss, forward_loss_train, StepLoss, StepOptions,
    TokenBatch, IGNORE_INDEX,
};
