//! How an optimizer step is cut into forward/backward passes, and what happens when
//! one does not fit in GPU memory.
//!
//! The **data batch** (`data.batch_size` rows, or `train.effective_batch` rows with
//! `data.batch_size = "auto"`) is the unit the data stream packs and the unit of
//! data order: which documents share a row depends on it, so it never changes
//! during a run. The **micro-batch** is the rows of one forward/backward pass: a data
//! batch is cut into row chunks of that size and their gradients accumulate, so an
//! optimizer step always sees the same rows whatever the micro-batch (the summation
//! order of the gradients is all that changes).
//!
//! - `data.batch_size = N`: data batches of N rows, `train.grad_accum` of them per
//!   step, micro-batch N (cut only after an out-of-memory retry).
//! - `data.batch_size = "auto"`: one data batch of `train.effective_batch` rows per
//!   step, micro-batch = the largest that the memory model fits on the GPU
//!   (`ceil(effective_batch / micro)` passes per step).
//!
//! Out of memory during a step (`train.oom = "retry"`): the trainer checkpoints the
//! last completed step, halves the micro-batch (doubling the passes) and reruns the
//! same data batches; the micro-batch in use is saved in checkpoints, so a resume
//! continues with it.

use crate::backend::Backend;
use crate::config::RunConfig;
use crate::error::TrainError;
use crate::memory::KeptActivations;
use qtrain_data::DatasetConfig;
use qtrain_dist::{StepSharding, StepShare};
use qtrain_model::BaseModel;
use qtrain_step::{StepOptions, TokenBatch};

/// The passes of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    /// Rows of each batch the data stream makes.
    pub data_rows: usize,
    /// Data batches per optimizer step.
    pub data_batches: usize,
    /// Rows per forward/backward pass (at most `data_rows`).
    pub micro_rows: usize,
}

impl StepShape {
    /// The shape `cfg` asks for, with the micro-batch for `"auto"` chosen by
    /// `largest_fitting(max_rows)` (the memory model's search) and `resumed` (the
    /// micro-batch a checkpoint was running with) taking precedence.
    pub fn resolve(
        cfg: &RunConfig,
        resumed: Option<usize>,
        largest_fitting: impl FnOnce(usize) -> Option<usize>,
    ) -> Result<Self, TrainError> {
        let shape = if cfg.data.batch_size_is_auto() {
            let rows = cfg.train.effective_batch.ok_or_else(|| {
                TrainError::Other(
                    "train.effective_batch: required with data.batch_size = \"auto\"".into(),
                )
            })?;
            let micro = match resumed {
                Some(m) => m,
                None => largest_fitting(rows).ok_or_else(|| {
                    TrainError::Other(format!(
                        "data.batch_size = \"auto\": not even one row of {} tokens fits in GPU \
                         memory; lower data.seq_len or lora.targets (see `qtrain plan`)",
                        cfg.data.seq_len
                    ))
                })?,
            };
            StepShape {
                data_rows: rows,
                data_batches: 1,
                micro_rows: micro,
            }
        } else {
            StepShape {
                data_rows: cfg.data.batch_size,
                data_batches: cfg.train.grad_accum,
                micro_rows: resumed.unwrap_or(cfg.data.batch_size),
            }
        };
        Ok(StepShape {
            micro_rows: shape.micro_rows.clamp(1, shape.data_rows),
            ..shape
        })
    }

    /// Rows per optimizer step (the effective batch).
    pub fn rows_per_step(&self) -> usize {
        self.data_rows * self.data_batches
    }

    /// Forward/backward passes per optimizer step.
    pub fn passes_per_step(&self) -> usize {
        self.data_batches * self.data_rows.div_ceil(self.micro_rows)
    }

    /// Halves the micro-batch; `false` when it is already one row.
    pub fn halve(&mut self) -> bool {
        if self.micro_rows <= 1 {
            return false;
        }
        self.micro_rows /= 2;
        true
    }

    /// The data settings the streams are built from: `batch_size` resolved.
    pub fn data_config(&self, data: &DatasetConfig) -> DatasetConfig {
        DatasetConfig {
            batch_size: self.data_rows,
            ..data.clone()
        }
    }
}

/// The step's shape: `data.batch_size = "auto"` gets the largest micro-batch whose
/// predicted memory fits the GPU (90% of it, [`crate::memory::DEFAULT_HEADROOM`])
/// and, when set, the engine memory limit; on the CPU without a limit, the whole
/// effective batch in one pass.
pub fn resolve_step_shape(
    cfg: &RunConfig,
    base: &BaseModel,
    backend: &Backend,
    gpu: Option<&crate::gpu::GpuInfo>,
    engine_limit: Option<usize>,
    resumed_micro: Option<usize>,
) -> Result<StepShape, TrainError> {
    use crate::memory::{self, EngineKind, MemorySpec};
    let engine = if backend.name() == "fused" {
        EngineKind::Fused
    } else {
        EngineKind::Reference
    };
    let seq = cfg.data.seq_len;
    let spec = MemorySpec::for_run(
        cfg,
        &base.config,
        base.dtype,
        engine,
        1,
        seq,
        gpu.map(|g| g.compute_capability),
    );
    let usable = gpu.map(|g| memory::usable(g.total_bytes, memory::DEFAULT_HEADROOM));
    let fits = |s: &MemorySpec| {
        let plan = s.predict();
        usable.is_none_or(|u| plan.fits(u))
            && engine_limit.is_none_or(|l| plan.engine_bytes <= l as u64)
    };
    // With train.offload_checkpoints = "on", or "auto" where not even one row fits
    // otherwise, the search sizes with the checkpoints on the host.
    let spec = memory::search_spec(&cfg.train.offload_checkpoints, &spec, fits);
    let shape = StepShape::resolve(cfg, resumed_micro, |max| {
        memory::largest_fitting(max, |m| fits(&spec.with_shape(m, seq)))
    })?;
    if cfg.data.batch_size_is_auto() || shape.micro_rows < shape.data_rows {
        let plan = spec.with_shape(shape.micro_rows, seq).predict();
        for w in &plan.warnings {
            tracing::warn!("memory model: {w}");
        }
        tracing::info!(
            "micro-batch {} x {seq} ({}; predicted peak {:.0} MiB{}): {} passes per step of {} rows",
            shape.micro_rows,
            if resumed_micro.is_some() {
                "from the checkpoint"
            } else {
                "the largest that fits"
            },
            memory::mib(plan.total()),
            usable.map_or(String::new(), |u| format!(" of {:.0} MiB usable", memory::mib(u))),
            shape.passes_per_step(),
            shape.rows_per_step()
        );
    }
    Ok(shape)
}

/// The memory model's spec of micro-batches of `shape` on the backend as it is
/// set now (its engine, where its checkpoints live).
fn run_spec(
    cfg: &RunConfig,
    base: &BaseModel,
    backend: &Backend,
    gpu: Option<&crate::gpu::GpuInfo>,
    shape: &StepShape,
) -> crate::memory::MemorySpec {
    let mut spec = crate::memory::MemorySpec::for_run(
        cfg,
        &base.config,
        base.dtype,
        backend.engine(),
        shape.micro_rows,
        cfg.data.seq_len,
        gpu.map(|g| g.compute_capability),
    );
    spec.engine_options.offload_layer_inputs = backend.offload_checkpoints();
    spec
}

/// Whether the fused engine should keep its gradient checkpoints in pinned host
/// memory for micro-batches of `shape` on `gpu` (`memory::offload_checkpoints`,
/// sized against the GPU's usable memory, the engine memory limit and the host's
/// available memory; `auto` is off on the CPU). `on` with too little host memory is
/// an error naming the key.
pub fn offload_checkpoints(
    cfg: &RunConfig,
    base: &BaseModel,
    backend: &Backend,
    gpu: Option<&crate::gpu::GpuInfo>,
    engine_limit: Option<usize>,
    shape: &StepShape,
) -> Result<bool, TrainError> {
    use crate::memory;
    let spec = memory::with_offload(&run_spec(cfg, base, backend, gpu, shape), false);
    memory::offload_checkpoints(
        &cfg.train.offload_checkpoints,
        memory::KeepPolicy::of(&cfg.train),
        &spec,
        gpu.map(|g| memory::usable(g.total_bytes, memory::DEFAULT_HEADROOM)),
        engine_limit.map(|l| l as u64),
        memory::host_memory_available(),
        gpu.and_then(|g| g.spec),
    )
    .map_err(|e| TrainError::Other(format!("train.offload_checkpoints = \"on\": {e}")))
}

/// Which activations the fused engine should keep for micro-batches of `shape` on
/// `gpu` (`memory::kept_activations`, sized against the GPU's usable memory and the
/// engine memory limit, with the checkpoints where the backend keeps them; `auto`
/// keeps none on the CPU).
pub fn kept_activations(
    cfg: &RunConfig,
    base: &BaseModel,
    backend: &Backend,
    gpu: Option<&crate::gpu::GpuInfo>,
    engine_limit: Option<usize>,
    shape: &StepShape,
) -> KeptActivations {
    use crate::memory;
    memory::kept_activations(
        memory::KeepPolicy::of(&cfg.train),
        &run_spec(cfg, base, backend, gpu, shape),
        gpu.map(|g| memory::usable(g.total_bytes, memory::DEFAULT_HEADROOM)),
        engine_limit.map(|l| l as u64),
        memory::host_memory_available(),
    )
}

/// One optimizer step's forward/backward passes on this rank: every data batch of
/// `share` (this rank's part of the step, see [`StepSharding`]), cut into
/// `shape.micro_rows`-row micro-batches, gradients of `loss_sum / denominator`
/// accumulated from zero. Returns this rank's summed loss.
#[allow(clippy::too_many_arguments)]
pub fn step_passes(
    backend: &mut Backend,
    base: &BaseModel,
    share: &StepShare<TokenBatch>,
    sharding: &StepSharding,
    shape: &StepShape,
    step: u64,
    cfg: &RunConfig,
    denominator: f64,
) -> Result<f64, TrainError> {
    backend.zero_grads()?;
    let mut loss_sum = 0.0;
    for (i, b) in share.indexed() {
        for (j, part) in split_rows(b, shape.micro_rows)?.iter().enumerate() {
            let so = StepOptions {
                checkpointing: cfg.train.gradient_checkpointing,
                dropout_seed: chunk_seed(cfg.train.seed, j),
                // The global index: dropout masks do not depend on the rank count.
                micro_step: sharding.micro_step(step, i),
            };
            loss_sum += backend.micro_step(base, part, &so, denominator)?.loss_sum;
        }
    }
    Ok(loss_sum)
}

/// `b` cut into micro-batches of at most `rows` rows, in row order (the whole batch
/// when it has no more rows than that).
pub fn split_rows(b: &TokenBatch, rows: usize) -> Result<Vec<TokenBatch>, TrainError> {
    let rows = rows.max(1);
    let s = b.seq_len;
    (0..b.batch_size.div_ceil(rows))
        .map(|i| {
            let r0 = i * rows;
            let n = rows.min(b.batch_size - r0);
            let span = r0 * s..(r0 + n) * s;
            Ok(TokenBatch::new(
                b.input_ids[span.clone()].to_vec(),
                b.labels[span.clone()].to_vec(),
                b.position_ids[span.clone()].to_vec(),
                b.segment_ids[span].to_vec(),
                n,
                s,
            )?)
        })
        .collect()
}

/// Mixed into the dropout seed of the `chunk`-th micro-batch of a data batch, so the
/// chunks of one batch draw different masks (chunk 0 keeps the plain seed: an uncut
/// batch trains exactly as before).
pub fn chunk_seed(seed: u64, chunk: usize) -> u64 {
    seed ^ (chunk as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// What [`give_back_memory`] did after an out-of-memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relief {
    /// The engine no longer keeps the dequantized base (the micro-batch stays).
    DequantizedBase,
    /// The engine no longer keeps the gate/up outputs (the micro-batch stays).
    MlpActivations,
    /// The engine no longer keeps the attention residuals (the micro-batch stays).
    Residuals,
    /// The micro-batch was halved.
    HalvedMicroBatch,
    /// Nothing left to give back (`train.oom = "stop"`, or one-row micro-batches).
    None,
}

impl Relief {
    /// The retry keeps the micro-batch: only kept activations were given back.
    pub fn keeps_micro_batch(self) -> bool {
        matches!(
            self,
            Relief::DequantizedBase | Relief::MlpActivations | Relief::Residuals
        )
    }

    /// What was given back, for the log.
    pub fn describe(self) -> &'static str {
        match self {
            Relief::DequantizedBase => "no longer keeping the frozen base dequantized",
            Relief::MlpActivations => "no longer keeping the gate/up outputs",
            Relief::Residuals => "no longer keeping the attention residuals",
            Relief::HalvedMicroBatch => "halved the micro-batch",
            Relief::None => "nothing left to give back",
        }
    }
}

/// Frees memory for a retry after an out-of-memory, most bytes per lost millisecond
/// first: the dequantized base, then the kept gate/up outputs, then the kept
/// attention residuals, then half the micro-batch (with `train.oom = "retry"`).
/// Training steps and evaluations recover through this one rule.
pub fn give_back_memory(backend: &mut Backend, shape: &mut StepShape, cfg: &RunConfig) -> Relief {
    let kept = backend.kept_activations();
    if cfg.train.oom != "retry" {
        Relief::None
    } else if kept.dequantized_base {
        backend.set_kept_activations(KeptActivations {
            dequantized_base: false,
            ..kept
        });
        Relief::DequantizedBase
    } else if kept.mlp_layers > 0 {
        backend.set_kept_activations(KeptActivations {
            mlp_layers: 0,
            ..kept
        });
        Relief::MlpActivations
    } else if kept.attention_residuals {
        backend.set_kept_activations(KeptActivations::default());
        Relief::Residuals
    } else if shape.halve() {
        Relief::HalvedMicroBatch
    } else {
        Relief::None
    }
}

/// Whether an error is the device running out of memory: the fused engine's
/// allocation failure, or candle's CUDA error.
pub fn is_oom(e: &TrainError) -> bool {
    matches!(e, TrainError::OutOfMemory(_)) || e.to_string().contains("CUDA_ERROR_OUT_OF_MEMORY")
}

/// The message of a run stopped by an out-of-memory: where the checkpoint is (none
/// before the first step) and which setting to lower.
pub fn oom_stop_message(
    detail: &str,
    shape: &StepShape,
    seq: usize,
    step: u64,
    checkpoint: Option<&std::path::Path>,
    policy: &str,
) -> String {
    let what = if shape.micro_rows <= 1 {
        format!(
            "even one row of {seq} tokens does not fit; lower data.seq_len or lora.targets \
             (fewer adapted projections)"
        )
    } else {
        format!(
            "lower data.batch_size (or set data.batch_size = \"auto\"), data.seq_len or \
             lora.targets (fewer adapted projections){}",
            if policy == "stop" {
                ", or set train.oom = \"retry\" to continue with smaller micro-batches"
            } else {
                ""
            }
        )
    };
    let saved = match checkpoint {
        Some(c) => format!(
            "a checkpoint of the last completed step is in {}",
            c.display()
        ),
        None => "nothing was trained yet".to_string(),
    };
    format!(
        "out of GPU memory at step {step} with micro-batches of {} x {seq} tokens ({detail}); \
         {saved}. To continue, {what}; `qtrain plan` shows what fits",
        shape.micro_rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(extra: &str) -> RunConfig {
        RunConfig::from_toml_str(extra, Path::new("t.toml"), &[]).unwrap()
    }

    #[test]
    fn fixed_and_auto_shapes() {
        let c = cfg("[data]\nbatch_size = 8\n[train]\ngrad_accum = 4\n");
        let s = StepShape::resolve(&c, None, |_| unreachable!()).unwrap();
        assert_eq!((s.data_rows, s.data_batches, s.micro_rows), (8, 4, 8));
        assert_eq!((s.rows_per_step(), s.passes_per_step()), (32, 4));
        let mut h = s;
        assert!(h.halve());
        assert_eq!(
            (h.micro_rows, h.passes_per_step(), h.rows_per_step()),
            (4, 8, 32)
        );
        // Resumed after a retry: the checkpoint's micro-batch.
        let r = StepShape::resolve(&c, Some(2), |_| unreachable!()).unwrap();
        assert_eq!(r.micro_rows, 2);

        let a = cfg("[data]\nbatch_size = \"auto\"\n[train]\neffective_batch = 24\n");
        let s = StepShape::resolve(&a, None, |max| {
            assert_eq!(max, 24);
            Some(10)
        })
        .unwrap();
        assert_eq!((s.data_rows, s.data_batches, s.micro_rows), (24, 1, 10));
        assert_eq!(s.passes_per_step(), 3);
        assert_eq!(s.data_config(&a.data).batch_size, 24);
        let e = StepShape::resolve(&a, None, |_| None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.seq_len") && e.contains("lora.targets"),
            "{e}"
        );
        let mut one = StepShape::resolve(&a, Some(1), |_| None).unwrap();
        assert!(!one.halve());
    }

    #[test]
    fn rows_split_in_order_and_cover_the_batch() {
        let rows: Vec<Vec<u32>> = (0..5)
            .map(|r| (0..4).map(|t| r * 10 + t).collect())
            .collect();
        let b = qtrain_data::batch::assemble(
            &rows
                .iter()
                .map(|ids| {
                    vec![qtrain_data::Tokenized {
                        input_ids: ids.clone(),
                        labels: ids.iter().map(|&t| t as i64).collect(),
                    }]
                })
                .collect::<Vec<_>>(),
            4,
            0,
        );
        let parts = split_rows(&b, 2).unwrap();
        assert_eq!(
            parts.iter().map(|p| p.batch_size).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        let ids: Vec<u32> = parts.iter().flat_map(|p| p.input_ids.clone()).collect();
        assert_eq!(ids, b.input_ids);
        let whole = split_rows(&b, 8).unwrap();
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].labels, b.labels);
        assert_eq!(chunk_seed(7, 0), 7);
        assert_ne!(chunk_seed(7, 1), 7);
    }
}
