//! What a training step takes besides the batch and the weights, and what it
//! returns: the same contract for the reference decoder and the fused engine.

/// Per-micro-batch settings of a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOptions {
    /// Keep only each layer's input in the forward and recompute the layer in the
    /// backward (less memory); `false` keeps all activations (faster).
    pub checkpointing: bool,
    /// Seed of the LoRA dropout masks.
    pub dropout_seed: u64,
    /// A counter unique to this micro-batch within the run (e.g.
    /// `optimizer_step * accumulation + micro`); it selects the dropout masks.
    pub micro_step: u64,
}

/// The summed loss of a batch and the number of targets it was summed over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLoss {
    pub loss_sum: f64,
    pub valid_tokens: usize,
}

impl StepLoss {
    /// Mean loss per valid token (NaN when there is none).
    pub fn mean(&self) -> f64 {
        self.loss_sum / self.valid_tokens as f64
    }
}
