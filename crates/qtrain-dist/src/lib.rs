//! qtrain-dist: data-parallel training for qtrain: collectives, the unique-id
//! rendezvous, the process launcher and deterministic data sharding.
//!
//! # Design
//!
//! **One process per GPU.** `qtrain run --gpus N` starts N worker processes
//! ([`launch`]), each training on its own GPU with the complete model and adapter;
//! the same worker code runs under torchrun or any launcher that sets torchrun's
//! variables ([`env::WorldEnv`]), on one host or several. Processes rather than
//! threads: CUDA contexts, NCCL and candle's per-device state are all happiest
//! with one device per process, a crashing worker is contained, and several hosts
//! work the same way as one.
//!
//! **Rank 0 decides, everyone follows.** Rank 0 owns the checkpoints, metrics, the
//! exported adapter and the time-budget planner. Whatever must be the same on
//! every rank is either computed identically everywhere (the data order, the
//! optimizer step on identical gradients) or decided by rank 0 and broadcast (the
//! planned step count, the resumed state, the stop decision). Control flow never
//! depends on the rank between two collectives, so all ranks issue the same
//! collectives in the same order; [`Collective::any`] turns a local condition (a
//! signal, a non-finite loss) into a decision all ranks share, so they stop at the
//! same step.
//!
//! **A step.** Every rank reads the step's global micro-batches, keeps its share
//! ([`shard::StepSharding`]), all-reduces its valid-token count into the step's
//! loss denominator ([`shard::agreed_loss_denominator`]), runs forward/backward
//! on its micro-batches with that denominator, and all-reduces (sums) the
//! gradients. Every rank then holds the gradient of the mean loss over all valid
//! tokens of the global step, exactly what one process training on the whole
//! global batch computes (up to the order of the float summation), and applies the
//! same clipping and optimizer update, so the adapters stay identical without
//! being broadcast again.
//!
//! **Gradient buckets.** The fused GPU engine keeps every LoRA gradient in one
//! flat f32 device buffer (in the order of `LoraWeights::to_host()`). During the
//! backward of the step's last micro-batch it calls
//! `nccl::Nccl::all_reduce_sum_f32_device` on slices of that buffer (buckets)
//! as soon as the layers that write them are done, on its stream, so the
//! communication overlaps the rest of the backward; one `nccl::Nccl::wait` before
//! the optimizer update. The host-slice [`Collective`] methods serve the small
//! things (counts, losses, decisions, serialized state).
//!
//! **Backends.** [`thread_group::ThreadGroup`]: ranks as threads of one process,
//! std only, with sums in rank order, so CI tests all data-parallel logic on the
//! CPU (the equivalence of 2 ranks x batch 4 with 1 rank x batch 8 is in
//! `tests/equivalence.rs`). `nccl::Nccl` (feature `cuda`): NCCL through cudarc,
//! after a TCP rendezvous for the unique id ([`rendezvous`]), with NVLink
//! multicast off ([`nvls`]). [`SingleProcess`]: the world of one, so a one-GPU run
//! uses the same code path at no cost.
//!
//! **Failures.** No path waits forever: the in-process backend detects departed
//! ranks and mismatched collectives, NCCL waits poll for asynchronous errors with
//! a timeout and abort the communicator, the rendezvous is bounded, and the
//! supervisor tears the run down (SIGTERM, grace period for rank 0's checkpoint,
//! SIGKILL) as soon as one worker fails, naming it.
//!
//! # Trainer integration, in order
//!
//! ```text
//! let world = WorldEnv::from_env()?;                    // None: one process
//! let coll: Box<dyn Collective> = match &world {        // (cuda) Nccl::init(w, stream, &opts)
//!     Some(w) if w.is_distributed() => Box::new(Nccl::init(w, stream, &NcclOptions::default())?),
//!     _ => Box::new(SingleProcess),
//! };
//! // device: cuda:{world.cuda_ordinal()}; only rank 0 logs metrics / writes checkpoints.
//! // start / resume: rank 0 loads; broadcast_f32(flat params), broadcast_bytes(optimizer
//! //   state file, trainer state JSON); check_same("parameter count", n).
//! let shard = StepSharding::new(global_micro_batches, coll.world_size())?;
//! loop {
//!     if coll.any(stop_flag)? { break }                  // signals: everyone stops together
//!     let share = shard.take_step(coll.rank(), || next_batch(), |b| b.valid_tokens as u64)?;
//!     let denom = agreed_loss_denominator(&*coll, &share)?;
//!     if denom == 0 { continue }                         // same decision on every rank
//!     for (i, b) in share.indexed() {                    // micro_step = shard.micro_step(step, i)
//!         forward_backward(.., denom as f64, &mut grads)  // engine: bucket all-reduce on the last
//!     }
//!     coll.all_reduce_sum_f32(&mut flat_grads)?;         // host path; the engine uses the device one
//!     let mut loss = [loss_sum]; coll.all_reduce_sum_f64(&mut loss)?;
//!     clip + optimizer step (identical on all ranks); planner on rank 0:
//!     total_steps = coll.broadcast_u64(planner_total_steps)?;
//!     if coll.is_root() { metrics, periodic checkpoint }
//! }
//! ```

pub mod collective;
pub mod env;
pub mod error;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod nvls;
pub mod rendezvous;
pub mod shard;
pub mod thread_group;

pub use collective::{fingerprint, Collective, SingleProcess};
pub use env::WorldEnv;
pub use error::{DistError, Result};
pub use launch::{launch_local, DeviceSelection, LaunchError, LaunchReport, LaunchSpec};
#[cfg(feature = "cuda")]
pub use nccl::{Nccl, NcclOptions};
pub use rendezvous::{exchange_id, UniqueId};
pub use shard::{agreed_loss_denominator, loss_denominator, StepSharding, StepShare};
pub use thread_group::{ThreadComm, ThreadGroup};
