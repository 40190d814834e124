//! qtrain's reference decoder: the decoder with LoRA adapters on the frozen (NF4)
//! base written in candle ops, with the explicit forward and hand-written backward
//! of every op, gradient checkpointing and the chunked next-token cross-entropy;
//! and KV-cached decoding for generation. It is the readable oracle of the fused
//! engine (`qtrain-engine`, its sibling above the shared step types of
//! `qtrain-step`) and the training step on the CPU and `train.engine = "reference"`.
//!
//! - [`ops`]: one module per op, `forward`/`backward` on candle tensors.
//! - [`model`]: the training step ([`forward_backward`]) and eval forwards.
//! - [`decode`]: incremental decoding with a KV cache ([`Decoder`]), for generation.
//!
//! Candle's graph autograd is not used for training: it would compute gradients of
//! the frozen operands and loses them through fused ops.

pub mod decode;
pub mod error;
pub mod model;
pub mod ops;

pub use decode::{Decoder, KvCache, DEFAULT_KEEP_WEIGHTS_BYTES};
pub use error::{ReferenceError, Result};
pub use model::{forward_backward, forward_logits, forward_loss, forward_loss_train};
