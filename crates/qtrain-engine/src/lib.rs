//! qtrain's fused training step ("the engine"): the decoder's forward and backward
//! as a fixed sequence of fused kernels ([`qtrain_device`]) and GEMMs over
//! preallocated buffers, the llm.c way. On a GPU this is the fast path; on the CPU
//! the very same sequence runs every kernel's reference, which lets CI check the
//! orchestration against the candle-ops reference `qtrain_reference::forward_backward`.
//!
//! - [`weights`]: the frozen base as device buffers and the dequantization of one
//!   layer's weight groups into reused buffers.
//! - [`lora`]: all adapters, their gradients and a compute-type copy in flat buffers.
//! - [`layout`]: every buffer of the workspace and its size (the memory model's input).
//! - [`step`]: [`Engine`], the training step and the evaluation forward.

pub mod error;
pub mod layout;
pub mod lora;
pub mod step;
pub mod weights;

pub use error::{EngineError, Result};
pub use layout::{
    keeps_lora_z, Component, WorkspaceLayout, WorkspaceShape, ALL_LAYERS, OFFLOAD_RING,
};
pub use lora::{device_lora_bytes, DeviceLora, LoraLayout};
pub use qtrain_device::ops::attention::AttnBackward;
pub use step::{Engine, EngineOptions};
