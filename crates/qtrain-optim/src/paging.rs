//! Where optimizer state lives: the [`StatePlacement`] decision and the [`PagingPolicy`]
//! that makes it.
//!
//! # Design
//!
//! *Paged* state lives in pinned (page-locked) host memory. Before the update of
//! parameter `i` runs on the GPU, the state of parameter `i + 1` is copied to a device
//! staging buffer by `cudaMemcpyAsync` on a side stream (ordered against the compute
//! stream with events), and the updated state of parameter `i - 1` is copied back the
//! same way. The GPU therefore holds at most two staging buffers the size of the largest
//! parameter's state, and the copies overlap the update kernels. (As built, the unit is
//! a chunk of consecutive parameters rather than one: see "What exists today".)
//! *Resident* state simply lives in device memory for the whole run.
//!
//! We do this rather than what bitsandbytes' paged optimizers do (CUDA unified memory,
//! `cudaMallocManaged`, evicted to host by the driver under memory pressure) because:
//!
//! * **Predictable step time.** Unified memory migrates on page fault, in 4 KiB to 2 MiB
//!   pieces, each fault a round trip through the driver; when the device is
//!   oversubscribed the driver decides what to evict and when, so step time jitters with
//!   the driver's heuristics. The step planner turns a wall-clock budget into a step
//!   count from measured step times, so it needs steps that cost the same every time.
//!   The optimizer's access pattern is fully known in advance (every parameter once per
//!   step, in a fixed order), which is exactly the case where explicit bulk prefetch beats
//!   demand paging: whole tensors move at PCIe bandwidth, overlapped with compute.
//! * **A bounded, known GPU footprint.** Paged state costs exactly two staging buffers of
//!   GPU memory, a number the memory planner can subtract up front. With managed memory
//!   the resident share is whatever the driver left there.
//! * **Portability.** On Windows and WSL unified memory has no on-demand paging, so
//!   managed allocations cannot oversubscribe the device (the very thing paging is for),
//!   and NVIDIA vGPU disables unified memory unless an administrator enables it. Pinned
//!   host memory and async copies work everywhere CUDA does.
//! * **It fits candle.** candle's CUDA backend allocates with plain device allocations
//!   through cudarc and has no managed-memory storage; pinned host buffers, streams,
//!   events and async copies are all available through cudarc without touching candle.
//!
//! The cost is code we own (the double-buffered copy pipeline) and PCIe traffic of
//! about 2 bytes per parameter each way per step for 8-bit state, which for a rank-16
//! Mistral-7B LoRA (about 42 M parameters, 85 MB of state) is a few milliseconds,
//! hidden behind the update kernels.
//!
//! # What exists today
//!
//! * The host optimizers ([`crate::AdamW8bit`], [`crate::AdamW32`]): on the CPU "host
//!   memory" is the state's home, so paged and resident state are the same plain
//!   `Vec`s and the placement is a recorded decision with no effect.
//! * The device optimizers ([`crate::device::DeviceAdamW8bit`],
//!   [`crate::device::DeviceAdamW32`]) implement both placements. Resident: the state
//!   arena is one device buffer. Paged: the arena is page-locked host memory
//!   (`cuMemHostAlloc`, portable, not write-combined because checkpoints read it back),
//!   streamed through two device staging buffers on a side stream of our own (raw
//!   driver stream and events, so candle's shared context stays in single-stream mode).
//!   The unit of transfer is a *chunk* of consecutive tensors of at most
//!   [`crate::device::PAGED_CHUNK_BYTES`] (4 MiB; a larger tensor is a chunk of its
//!   own) rather than one parameter: LoRA tensors are ~130 KB of state each, too small
//!   for a copy to reach PCIe bandwidth. While chunk `k` is updated on the main stream,
//!   the side stream writes back chunk `k - 1` (after waiting for its update's event)
//!   and uploads chunk `k + 1` into the freed buffer; the update of `k + 1` waits for
//!   that upload's event, and the main stream waits for the last write-back at the end
//!   of the step. The GPU therefore holds two staging buffers of the largest chunk.
//!   On the CPU device the same schedule runs with immediate copies, and checks its own
//!   invariants, so CI covers it.

use serde::{Deserialize, Serialize};

/// Where an optimizer's state lives during a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StatePlacement {
    /// In the memory of the device that runs the update (on the CPU: host memory).
    Resident,
    /// In pinned host memory, streamed to the GPU ahead of each parameter's update.
    /// On the CPU this is identical to `Resident`.
    Paged,
}

/// How [`StatePlacement`] is chosen.
///
/// In TOML: `paging = "always"`, `paging = "never"` or
/// `paging = { auto = { threshold-bytes = 1073741824 } }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PagingPolicy {
    /// Page when the optimizer's total state exceeds `threshold_bytes`. The trainer's
    /// memory planner lowers the threshold when GPU memory is tight.
    Auto {
        #[serde(rename = "threshold-bytes")]
        threshold_bytes: u64,
    },
    /// Always page.
    Always,
    /// Never page.
    Never,
}

impl PagingPolicy {
    /// The default `Auto` threshold: 1 GiB. A rank-16 LoRA of Mistral-7B has about 85 MB
    /// of 8-bit state and stays resident; paging is for far larger trainable sets.
    pub const DEFAULT_THRESHOLD_BYTES: u64 = 1 << 30;

    /// The placement for an optimizer whose state totals `state_bytes`. The whole
    /// optimizer gets one placement: the prefetch pipeline walks all parameters in
    /// order, so mixing placements would buy nothing but a second code path.
    pub fn placement(&self, state_bytes: u64) -> StatePlacement {
        match *self {
            PagingPolicy::Auto { threshold_bytes } if state_bytes > threshold_bytes => {
                StatePlacement::Paged
            }
            PagingPolicy::Auto { .. } => StatePlacement::Resident,
            PagingPolicy::Always => StatePlacement::Paged,
            PagingPolicy::Never => StatePlacement::Resident,
        }
    }
}

impl Default for PagingPolicy {
    fn default() -> Self {
        PagingPolicy::Auto {
            threshold_bytes: Self::DEFAULT_THRESHOLD_BYTES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pages_strictly_above_threshold() {
        let p = PagingPolicy::Auto {
            threshold_bytes: 1000,
        };
        assert_eq!(p.placement(0), StatePlacement::Resident);
        assert_eq!(p.placement(1000), StatePlacement::Resident);
        assert_eq!(p.placement(1001), StatePlacement::Paged);
    }

    #[test]
    fn always_and_never_ignore_size() {
        assert_eq!(PagingPolicy::Always.placement(0), StatePlacement::Paged);
        assert_eq!(
            PagingPolicy::Never.placement(u64::MAX),
            StatePlacement::Resident
        );
        assert_eq!(
            PagingPolicy::default().placement(PagingPolicy::DEFAULT_THRESHOLD_BYTES + 1),
            StatePlacement::Paged
        );
    }
}
