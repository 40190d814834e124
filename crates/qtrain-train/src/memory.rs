//! The memory model: predicted peak GPU memory of a training run, as a breakdown by
//! what holds the bytes, and the searches built on it (the largest micro-batch and
//! sequence length that fit a GPU).
//!
//! What the model adds up (`n` = batch x seq tokens of one micro-batch):
//!
//! - **Frozen base**: each projection's NF4 codes (`numel/2` bytes), 8-bit absmax
//!   codes (`numel/64`) and f32 nested statistics (double quant; f32 absmax
//!   otherwise), or the dense weight when unquantized; embeddings, lm_head (unless
//!   tied) and norms in the compute dtype. The same arithmetic as
//!   `BaseModel::storage_bytes` (a test checks the two agree).
//! - **LoRA**: the fused engine's flat f32 master weights, f32 gradients and
//!   compute-type copy ([`qtrain_engine::device_lora_bytes`]). (The trainer's candle
//!   copy of the adapters waits on the host; generation copies it to the device only
//!   while it runs, outside the step.)
//! - **Optimizer state** on the device: resident 8-bit AdamW state (2 bytes per
//!   parameter + two f32 absmax per 256-block, f32 state below 4096 elements; the
//!   formula of `qtrain_optim::StateFormat::bytes`), or, paged, two staging buffers
//!   the size of the largest tensor's state; or nothing for today's host optimizer.
//! - **The engine's workspace**: every buffer of [`qtrain_engine::WorkspaceLayout`] by
//!   [`qtrain_engine::Component`] (the engine allocates exactly that layout). With
//!   offloaded gradient checkpoints (`train.offload_checkpoints`) only a ring of
//!   [`qtrain_engine::OFFLOAD_RING`] layer inputs (and of kept attention halves) is
//!   on the device; the rest is pinned host memory ([`MemoryBreakdown::host_bytes`], not in the total) crossing
//!   the host link twice per pass ([`MemoryBreakdown::transfer_bytes`]).
//! - **Runtime**: the CUDA context, the cuBLAS workspace and the allocator's slack,
//!   as named constants to be calibrated on a GPU (`qtrain bench` prints predicted
//!   against measured memory, see [`compare`]).
//!
//! Only the fused engine is modeled exactly. The reference (candle-ops) path
//! allocates temporaries per op; for it the model gives a rough upper bound from the
//! tensors it saves and the attention scores it materializes, with a warning.

use crate::config::RunConfig;
use crate::gpu::GpuSpec;
use candle_core::DType;
use qtrain_engine::{Component, EngineOptions, WorkspaceLayout, WorkspaceShape};
use qtrain_model::{ModelConfig, Proj, Quantization, PROJECTIONS};
use qtrain_optim::{AdamWConfig, PagingPolicy, StateFormat, StatePlacement};

pub const MIB: u64 = 1 << 20;

/// Device memory the CUDA context takes once created (driver state, loaded modules:
/// candle's and qtrain's PTX, with lazy loading). Calibrated on the GPU: the device's
/// used memory right after the device is opened, before the model is loaded
/// (`qtrain bench` reports it as `baseline_used_mib`): 594.8 MiB on an H200 with
/// driver 580 (CUDA 13.0), of which `CUBLAS_WORKSPACE_BYTES_SM90` is counted apart.
pub const CONTEXT_BYTES: u64 = 563 * MIB;

/// cuBLAS's own workspace on compute capability 9.x (the cuBLAS 12 default there is
/// 32 MiB). CALIBRATE with the other runtime constants.
pub const CUBLAS_WORKSPACE_BYTES_SM90: u64 = 32 * MIB;

/// cuBLAS's workspace on older GPUs (4 MiB by default before Hopper).
pub const CUBLAS_WORKSPACE_BYTES: u64 = 4 * MIB;

/// Share of the allocated bytes lost to the stream-ordered pool (cuMemAllocAsync):
/// rounding of each allocation and memory the pool keeps after frees. CALIBRATE:
/// `(measured peak - context - everything predicted) / predicted allocations`.
pub const ALLOCATOR_SLACK_FRACTION: f64 = 0.02;

/// The smallest slack assumed, whatever the size of the run.
pub const ALLOCATOR_SLACK_MIN_BYTES: u64 = 64 * MIB;

/// Share of a GPU's memory a run may use by default; the rest is headroom for what
/// the model does not see (another process, a display, fragmentation).
pub const DEFAULT_HEADROOM: f64 = 0.90;

/// Host-to-device bandwidth assumed for the offloaded checkpoints' copies where the
/// GPU is not known (PCIe 4.0 x16 moves ~25 GB/s, 5.0 ~50 GB/s; pinned copies reach
/// most of it); a GPU of the table has its own ([`GpuSpec::host_link_gbs`]).
pub const HOST_LINK_BYTES_PER_S: f64 = 20e9;

/// The host link's rate assumed on `gpu` (bytes/s), or [`HOST_LINK_BYTES_PER_S`].
pub fn host_link_bytes_per_s(gpu: Option<&GpuSpec>) -> f64 {
    gpu.map_or(HOST_LINK_BYTES_PER_S, |g| g.host_link_gbs * 1e9)
}

/// The reference path's rough bound multiplies the tensors it counts by this, for
/// the temporaries of candle's ops (dtype casts, broadcasts, contiguous copies).
const REFERENCE_TEMPORARIES_FACTOR: f64 = 1.5;

/// Where the optimizer's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerPlace {
    /// On the GPU for the whole run.
    Resident,
    /// In pinned host memory, streamed through two device staging buffers.
    Paged,
    /// On the host, updated by the CPU (today's optimizer, and `qtrain bench`'s).
    Host,
}

/// Which step implementation the run uses (defined with the backend that switches
/// between them; the memory model sizes either).
pub use crate::backend::EngineKind;

/// Everything the prediction depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct MemorySpec {
    pub model: ModelConfig,
    pub quantization: Quantization,
    /// The compute dtype (bf16 or fp16 on GPUs).
    pub dtype: DType,
    pub rank: usize,
    pub targets: Vec<Proj>,
    /// Rows of the micro-batch (one forward/backward pass).
    pub batch: usize,
    pub seq: usize,
    /// Only the reference path can keep every layer's activations; the fused engine
    /// always recomputes from the saved layer inputs.
    pub checkpointing: bool,
    /// 8-bit AdamW state (else f32 AdamW).
    pub eight_bit: bool,
    pub optimizer: OptimizerPlace,
    pub engine: EngineKind,
    pub engine_options: EngineOptions,
    /// Of the GPU (sizes the cuBLAS workspace); `None` for a 9.x-sized one.
    pub compute_capability: Option<(u32, u32)>,
}

/// What a line of the breakdown accounts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    Frozen,
    Lora,
    Gradients,
    Optimizer,
    /// A part of the fused engine's workspace.
    Workspace(Component),
    /// The reference path's activations (rough).
    ReferenceActivations,
    /// CUDA context, cuBLAS workspace, allocator slack (calibrated constants).
    Runtime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryLine {
    pub category: Category,
    pub label: String,
    pub bytes: u64,
}

/// A predicted breakdown.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryBreakdown {
    pub lines: Vec<MemoryLine>,
    /// Bytes the fused engine's own `Dev` holds after a step (its adapters'
    /// buffers and workspace; `Dev::held_bytes`). Zero on the reference path.
    pub engine_bytes: u64,
    /// Trainable parameters.
    pub lora_params: usize,
    /// Caveats to print with the table (e.g. the reference path is a rough bound).
    pub warnings: Vec<String>,
    /// Pinned host memory of the offloaded gradient checkpoints (not device memory,
    /// not in [`MemoryBreakdown::total`]); 0 without offloading.
    pub host_bytes: u64,
    /// Bytes crossing the host link per micro-batch pass (the offloaded checkpoints
    /// out in the forward and back in the backward).
    pub transfer_bytes: u64,
}

impl MemoryBreakdown {
    pub fn total(&self) -> u64 {
        self.lines.iter().map(|l| l.bytes).sum()
    }

    /// The bytes of the lines of one category.
    pub fn bytes_of(&self, f: impl Fn(Category) -> bool) -> u64 {
        self.lines
            .iter()
            .filter(|l| f(l.category))
            .map(|l| l.bytes)
            .sum()
    }

    /// Whether the predicted total fits in `usable` bytes.
    pub fn fits(&self, usable: u64) -> bool {
        self.total() <= usable
    }

    /// Seconds the offloaded checkpoints' copies take per pass over a host link of
    /// `bytes_per_s` ([`host_link_bytes_per_s`]; an estimate: they run on a side
    /// stream beside the compute, so only what a layer's compute cannot hide costs
    /// time).
    pub fn transfer_seconds_at(&self, bytes_per_s: f64) -> f64 {
        self.transfer_bytes as f64 / bytes_per_s
    }

    /// The breakdown as a table (component, MiB), with the total.
    pub fn table(&self) -> String {
        let width = self
            .lines
            .iter()
            .map(|l| l.label.len())
            .max()
            .unwrap_or(0)
            .max(20);
        let mut s = format!("{:<width$}  {:>10}\n", "component", "MiB");
        for l in &self.lines {
            s += &format!("{:<width$}  {:>10.1}\n", l.label, mib(l.bytes));
        }
        s += &format!("{:<width$}  {:>10.1}\n", "total", mib(self.total()));
        s
    }
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn elem_size(dtype: DType) -> usize {
    dtype.size_in_bytes()
}

/// Bytes of the frozen base's projections and of its dense tensors (embeddings,
/// lm_head unless tied, norms) for `quantization`, computing in `dtype`.
pub fn frozen_bytes(cfg: &ModelConfig, quantization: Quantization, dtype: DType) -> (u64, u64) {
    let e = elem_size(dtype) as u64;
    let proj: u64 = PROJECTIONS
        .iter()
        .map(|&p| {
            let [o, i] = cfg.proj_shape(p);
            projection_bytes(o * i, quantization, e)
        })
        .sum::<u64>()
        * cfg.num_hidden_layers as u64;
    let h = cfg.hidden_size as u64;
    let embed = cfg.vocab_size as u64 * h * e;
    let head = if cfg.tie_word_embeddings { 0 } else { embed };
    let norms = (2 * cfg.num_hidden_layers as u64 + 1) * h * e;
    (proj, embed + head + norms)
}

/// One projection of `numel` weights as stored (see `Nf4Device::storage_bytes`).
fn projection_bytes(numel: usize, quantization: Quantization, elem: u64) -> u64 {
    match quantization {
        Quantization::None => numel as u64 * elem,
        Quantization::Nf4 {
            blocksize,
            double_quant,
        } => {
            let codes = numel.div_ceil(2) as u64;
            let blocks = numel.div_ceil(blocksize) as u64;
            if double_quant {
                let nested = blocks.div_ceil(qtrain_quant::nf4::NESTED_BLOCKSIZE as u64);
                // u8 absmax codes; f32 offset, 256-entry code table, nested absmax.
                codes + blocks + 4 * (1 + 256 + nested)
            } else {
                codes + 4 * blocks
            }
        }
    }
}

/// Element counts of the adapters' tensors in the trainer's order (per layer, per
/// projection in `PROJECTIONS` order: A `[r, in]`, then B `[out, r]`).
pub fn lora_tensor_numels(cfg: &ModelConfig, targets: &[Proj], rank: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for _ in 0..cfg.num_hidden_layers {
        for &p in PROJECTIONS.iter().filter(|p| targets.contains(p)) {
            let [o, i] = cfg.proj_shape(p);
            out.push(rank * i);
            out.push(o * rank);
        }
    }
    out
}

/// Optimizer state bytes of the tensors `numels`: their sum, and the largest one's.
pub fn optimizer_state_bytes(numels: &[usize], eight_bit: bool) -> (u64, u64) {
    let cfg = AdamWConfig::default();
    let each = numels
        .iter()
        .map(|&n| StateFormat::for_param(eight_bit, n, &cfg).bytes(n));
    each.fold((0, 0), |(sum, max), b| (sum + b, max.max(b)))
}

/// Where `optimizer.paged` (`auto`, `always`, `never`) puts state of `state_bytes`
/// (the policy of `qtrain_optim::PagingPolicy`).
pub fn placement_for(paged: &str, state_bytes: u64) -> OptimizerPlace {
    let policy = match paged {
        "always" => PagingPolicy::Always,
        "never" => PagingPolicy::Never,
        _ => PagingPolicy::default(),
    };
    policy.placement(state_bytes).into()
}

/// Where a device optimizer keeps its state, as the model counts it.
impl From<StatePlacement> for OptimizerPlace {
    fn from(p: StatePlacement) -> Self {
        match p {
            StatePlacement::Resident => OptimizerPlace::Resident,
            StatePlacement::Paged => OptimizerPlace::Paged,
        }
    }
}

impl MemorySpec {
    /// The spec of a run of `cfg` on a model of shape `model` computing in `dtype`
    /// with `engine`, for micro-batches of `batch x seq`, on a GPU of compute
    /// capability `cc`. The optimizer state is placed as `optimizer.paged` decides
    /// (resident or paged on the GPU: the device optimizer's placement).
    pub fn for_run(
        cfg: &RunConfig,
        model: &ModelConfig,
        dtype: DType,
        engine: EngineKind,
        batch: usize,
        seq: usize,
        cc: Option<(u32, u32)>,
    ) -> Self {
        let targets: Vec<Proj> = cfg
            .lora
            .targets
            .iter()
            .filter_map(|t| Proj::from_name(t))
            .collect();
        let eight_bit = cfg.optimizer.kind != "adamw32";
        let numels = lora_tensor_numels(model, &targets, cfg.lora.rank);
        let (state, _) = optimizer_state_bytes(&numels, eight_bit);
        MemorySpec {
            model: model.clone(),
            quantization: cfg.model.quantization_spec(),
            dtype,
            rank: cfg.lora.rank,
            targets,
            batch,
            seq,
            checkpointing: cfg.train.gradient_checkpointing,
            eight_bit,
            // The fused engine runs the device optimizer; the reference path the host one.
            optimizer: match engine {
                EngineKind::Fused => placement_for(&cfg.optimizer.paged, state),
                EngineKind::Reference => OptimizerPlace::Host,
            },
            engine,
            engine_options: EngineOptions {
                fp8_base: cfg.train.precision == "fp8",
                mlp_chunk: cfg.train.mlp_chunk_tokens,
                ce_chunk: cfg.train.loss_chunk_tokens,
                // Validated with the config; the default where it was not.
                attention_backward: qtrain_engine::AttnBackward::parse(
                    &cfg.train.attention_backward,
                )
                .unwrap_or_default(),
                ..EngineOptions::default()
            },
            compute_capability: cc,
        }
    }

    /// The fused engine's workspace layout for this micro-batch.
    pub fn workspace_layout(&self) -> WorkspaceLayout {
        WorkspaceLayout::new(
            &self.model,
            WorkspaceShape::for_micro_batch(
                &self.engine_options,
                self.rank,
                elem_size(self.dtype),
                self.batch,
                self.seq,
            ),
        )
    }

    /// The same spec with another micro-batch shape.
    pub fn with_shape(&self, batch: usize, seq: usize) -> Self {
        Self {
            batch,
            seq,
            ..self.clone()
        }
    }

    /// This spec keeping what `kept` says (the engine options it sets).
    pub fn keeping(&self, kept: KeptActivations) -> MemorySpec {
        let mut s = self.clone();
        kept.apply(&mut s.engine_options);
        s
    }

    /// The predicted breakdown.
    pub fn predict(&self) -> MemoryBreakdown {
        let cfg = &self.model;
        let e = elem_size(self.dtype);
        let dt = format!("{:?}", self.dtype).to_lowercase();
        let mut lines = Vec::new();
        fn push(lines: &mut Vec<MemoryLine>, category: Category, label: String, bytes: u64) {
            lines.push(MemoryLine {
                category,
                label,
                bytes,
            })
        }
        let (proj, dense) = frozen_bytes(cfg, self.quantization, self.dtype);
        let proj_label = match self.quantization {
            Quantization::Nf4 {
                double_quant: true, ..
            } => "frozen: NF4 projections (codes, 8-bit absmax, nested stats)".to_string(),
            Quantization::Nf4 { .. } => "frozen: NF4 projections (codes, f32 absmax)".into(),
            Quantization::None => format!("frozen: projections ({dt}, unquantized)"),
        };
        push(&mut lines, Category::Frozen, proj_label, proj);
        push(
            &mut lines,
            Category::Frozen,
            format!("frozen: embeddings, lm_head, norms ({dt})"),
            dense,
        );

        let numels = lora_tensor_numels(cfg, &self.targets, self.rank);
        let numel: usize = numels.iter().sum();
        let n4 = 4 * numel as u64;
        let (mut engine_bytes, mut host_bytes, mut transfer_bytes) = (0u64, 0u64, 0u64);
        let mut warnings = Vec::new();
        match self.engine {
            EngineKind::Fused => {
                let lora = qtrain_engine::device_lora_bytes(numel, e) as u64;
                push(
                    &mut lines,
                    Category::Lora,
                    "LoRA: master weights (f32)".into(),
                    n4,
                );
                push(
                    &mut lines,
                    Category::Lora,
                    format!("LoRA: compute copy ({dt})"),
                    lora - 2 * n4,
                );
                push(
                    &mut lines,
                    Category::Gradients,
                    "LoRA: gradients (f32)".into(),
                    n4,
                );
                let layout = self.workspace_layout();
                for (c, bytes) in layout.by_component() {
                    let what = match c {
                        Component::LayerInputs if layout.host_bytes() > 0 => format!(
                            "gradient checkpoints (ring of {} layers' {}; the rest offloaded)",
                            qtrain_engine::OFFLOAD_RING,
                            offloaded_checkpoints(self.engine_options.save_attention_residual)
                        ),
                        c => c.describe().to_string(),
                    };
                    push(
                        &mut lines,
                        Category::Workspace(c),
                        format!("workspace: {what}"),
                        bytes as u64,
                    );
                }
                engine_bytes = lora + layout.total_bytes() as u64;
                host_bytes = layout.host_bytes() as u64;
                transfer_bytes = layout.transfer_bytes() as u64;
            }
            EngineKind::Reference => {
                push(
                    &mut lines,
                    Category::Lora,
                    "LoRA: weights (f32, candle)".into(),
                    n4,
                );
                push(
                    &mut lines,
                    Category::Gradients,
                    "LoRA: gradients (f32, candle)".into(),
                    n4,
                );
                push(
                    &mut lines,
                    Category::ReferenceActivations,
                    format!(
                        "activations, reference path (rough bound{})",
                        if self.checkpointing {
                            ", checkpointing"
                        } else {
                            ", every layer kept"
                        }
                    ),
                    self.reference_activation_bound(),
                );
                warnings.push(
                    "the reference (candle-ops) step is modeled only roughly: an upper bound \
                     from the tensors it saves and the attention scores it materializes; the \
                     fused engine (train.engine = \"fused\", bf16 and fp16 GPUs) is modeled exactly"
                        .into(),
                );
            }
        }

        lines.push(self.optimizer_line(&numels));
        let allocated: u64 = lines.iter().map(|l| l.bytes).sum();
        lines.extend(self.runtime_lines(allocated));
        MemoryBreakdown {
            lines,
            engine_bytes,
            lora_params: numel,
            warnings,
            host_bytes,
            transfer_bytes,
        }
    }

    /// The optimizer state on the GPU: all of it (resident), two staging buffers
    /// (paged), or nothing (on the host).
    fn optimizer_line(&self, numels: &[usize]) -> MemoryLine {
        let (state, largest) = optimizer_state_bytes(numels, self.eight_bit);
        let kind = if self.eight_bit { "8-bit" } else { "f32" };
        let (label, bytes) = match self.optimizer {
            OptimizerPlace::Resident => {
                (format!("optimizer state ({kind} AdamW, on the GPU)"), state)
            }
            OptimizerPlace::Paged => (
                format!("optimizer staging (paged {kind} AdamW: 2 x largest tensor)"),
                2 * largest,
            ),
            OptimizerPlace::Host => (format!("optimizer state ({kind} AdamW, on the host)"), 0),
        };
        MemoryLine {
            category: Category::Optimizer,
            label,
            bytes,
        }
    }

    /// The runtime's share (calibrated constants): the CUDA context, the cuBLAS
    /// workspace and the allocator's slack on `allocated` bytes.
    fn runtime_lines(&self, allocated: u64) -> Vec<MemoryLine> {
        let cublas = match self.compute_capability {
            Some((major, _)) if major < 9 => CUBLAS_WORKSPACE_BYTES,
            _ => CUBLAS_WORKSPACE_BYTES_SM90,
        };
        [
            (
                "CUDA context (calibrated constant)".to_string(),
                CONTEXT_BYTES,
            ),
            ("cuBLAS workspace (calibrated constant)".to_string(), cublas),
            (
                format!(
                    "allocator slack ({:.0}% of allocations, calibrated)",
                    100.0 * ALLOCATOR_SLACK_FRACTION
                ),
                slack(allocated),
            ),
        ]
        .into_iter()
        .map(|(label, bytes)| MemoryLine {
            category: Category::Runtime,
            label,
            bytes,
        })
        .collect()
    }

    /// A rough upper bound of the reference step's activations: the saved layer
    /// inputs (checkpointing) or every layer's saved tensors, one layer's gradients,
    /// the materialized attention scores (scores, probabilities and their gradients
    /// in f32, the mask), one dequantized weight and its transposed copy, and the
    /// cross-entropy chunk; times [`REFERENCE_TEMPORARIES_FACTOR`].
    fn reference_activation_bound(&self) -> u64 {
        let c = &self.model;
        let (b, s) = (self.batch as u64, self.seq as u64);
        let n = b * s;
        let e = elem_size(self.dtype) as u64;
        let (h, inter) = (c.hidden_size as u64, c.intermediate_size as u64);
        let d = c.head_dim() as u64;
        let heads = c.num_attention_heads as u64;
        let qcols = heads * d;
        let qc = (heads + 2 * c.num_kv_heads() as u64) * d;
        let layers = c.num_hidden_layers as u64;
        let r = self.rank as u64;
        // x, h1, x2, h2; q, k, v; attention output and its flat copy; gate, up, SwiGLU;
        // LoRA z of each target; f32 norms' statistics and attention log-sum-exp.
        let saved = e * n * (4 * h + qc + 2 * qcols + 3 * inter + self.targets.len() as u64 * r)
            + 8 * n
            + 4 * b * heads * s;
        let kept = if self.checkpointing {
            layers * n * h * e + saved
        } else {
            layers * saved
        };
        let grads = saved;
        let scores = 4 * 4 * b * heads * s * s + 4 * b * s * s;
        let largest_proj = PROJECTIONS
            .iter()
            .map(|&p| c.proj_shape(p).iter().product::<usize>())
            .max()
            .unwrap_or(0) as u64;
        let weight = 2 * e * largest_proj;
        let ce_rows = n.min(1024);
        let ce = ce_rows * c.vocab_size as u64 * (8 + e);
        ((kept + grads + scores + weight + ce) as f64 * REFERENCE_TEMPORARIES_FACTOR) as u64
    }
}

fn slack(allocated: u64) -> u64 {
    ((allocated as f64 * ALLOCATOR_SLACK_FRACTION) as u64).max(ALLOCATOR_SLACK_MIN_BYTES)
}

/// Which activations the fused engine keeps from the forward so that its backward
/// recomputes less (selective recomputation; gradients are identical either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeptActivations {
    /// What each layer's attention half leaves for the backward
    /// (`train.keep_attention_residuals`): q/k/v after RoPE (`L·n·qc` elements),
    /// the residual after attention (`L·n·h`) and the attention output with its
    /// log-sum-exp (`L·n·heads·d` and `L·b·heads·seq` f32), and (with either
    /// half kept) every layer's adapter products `z`; the recomputation is then
    /// only the input norm: no q/k/v product, RoPE, attention forward or o
    /// projection.
    pub attention_residuals: bool,
    /// How many layers (the first ones) keep their gate/up output
    /// (`train.keep_mlp_activations`): `n·2I` elements each, which save that layer's
    /// gate/up product, the costliest GEMM recomputed. From the model's layer count
    /// up (or [`qtrain_engine::ALL_LAYERS`]), every layer's.
    pub mlp_layers: usize,
    /// Every layer's frozen weights stay dequantized in the compute type
    /// (`train.keep_dequantized_base`, `EngineOptions::keep_dequantized_base`):
    /// `L·` a layer's weights (13 GiB for Mistral-7B in bf16) in place of one
    /// shared layer's buffer; no NF4 dequantization after the first step. Not an
    /// activation, but decided, kept and given back the same way, last.
    pub dequantized_base: bool,
}

impl KeptActivations {
    pub fn apply(self, opts: &mut EngineOptions) {
        opts.save_attention_residual = self.attention_residuals;
        opts.kept_mlp_layers = self.mlp_layers;
        opts.keep_dequantized_base = self.dequantized_base;
    }

    pub fn of(opts: &EngineOptions) -> Self {
        Self {
            attention_residuals: opts.save_attention_residual,
            mlp_layers: opts.kept_mlp_layers,
            dequantized_base: opts.keep_dequantized_base,
        }
    }

    /// Whether every one of `layers` layers keeps its gate/up output.
    pub fn mlp_all(&self, layers: usize) -> bool {
        self.mlp_layers >= layers
    }

    /// The gate/up outputs kept, in words, for a model of `layers` layers.
    pub fn mlp_words(&self, layers: usize) -> String {
        match self.mlp_layers.min(layers) {
            0 => "the gate/up product".into(),
            k if k == layers => "gate/up outputs kept, no gate/up product".into(),
            k => format!(
                "gate/up outputs kept for {k} of {layers} layers, the gate/up product of the others"
            ),
        }
    }
}

/// Where a run must fit: the GPU's usable bytes (None: nothing to size against,
/// so nothing fits), the engine's own buffers' limit and the host's available
/// memory for pinned checkpoints (each None: unbounded). One test for every
/// memory decision below.
#[derive(Debug, Clone, Copy)]
struct Room {
    usable: Option<u64>,
    engine_limit: Option<u64>,
    host_available: Option<u64>,
}

impl Room {
    /// The room for what is pinned for speed only: [`OPTIONAL_PIN_SHARE`] of the
    /// host's available memory.
    fn for_speed(self) -> Room {
        Room {
            host_available: self
                .host_available
                .map(|a| (a as f64 * OPTIONAL_PIN_SHARE) as u64),
            ..self
        }
    }

    fn holds(&self, p: &MemoryBreakdown) -> bool {
        self.usable.is_some_and(|u| p.fits(u))
            && self.engine_limit.is_none_or(|l| p.engine_bytes <= l)
            && self.host_available.is_none_or(|a| p.host_bytes <= a)
    }
}

/// What `keep` (`train.keep_attention_residuals`, `train.keep_mlp_activations`,
/// `train.keep_dequantized_base`: `on`, `off` or `auto` each) decides for a run
/// sized by `spec`: nothing on the reference engine; with `auto`, the attention
/// residuals first (more time saved per byte), then the gate/up outputs beside
/// them, of every layer or else of as many layers as fit (each layer's saves the
/// same product), then the dequantized base (the least time per byte: ~3% of a
/// step for 13 GiB on Mistral-7B), each kept when the prediction with it fits `usable` bytes and, when
/// given, the engine's own buffers fit `engine_limit` and the pinned host memory
/// fits [`OPTIONAL_PIN_SHARE`] of `host_available` (with offloaded checkpoints a
/// kept attention half travels to the host with its layer's input); without a GPU
/// to size against (`usable` None) `auto` keeps nothing. The trainer, `qtrain plan` and `qtrain bench` all
/// decide through this.
pub fn kept_activations(
    keep: KeepPolicy,
    spec: &MemorySpec,
    usable: Option<u64>,
    engine_limit: Option<u64>,
    host_available: Option<u64>,
) -> KeptActivations {
    let mut kept = KeptActivations::default();
    if spec.engine != EngineKind::Fused {
        return kept;
    }
    // Everything kept is kept for speed: with offloaded checkpoints, what travels
    // with them (the attention half) pins at most the share of the host's memory
    // that speed may take.
    let room = Room {
        usable,
        engine_limit,
        host_available,
    }
    .for_speed();
    let fits = |k: KeptActivations| room.holds(&spec.keeping(k).predict());
    kept.attention_residuals = match keep.residuals {
        "on" => true,
        "off" => false,
        _ => fits(KeptActivations {
            attention_residuals: true,
            ..kept
        }),
    };
    let layers = spec.model.num_hidden_layers;
    let with_mlp = |k| KeptActivations {
        mlp_layers: k,
        ..kept
    };
    kept.mlp_layers = match keep.mlp {
        "on" => layers,
        "off" => 0,
        _ if fits(with_mlp(layers)) => layers,
        _ => largest_fitting(layers - 1, |k| fits(with_mlp(k))).unwrap_or(0),
    };
    // FP8 products quantize a layer's weights again at each use: nothing to keep.
    kept.dequantized_base = !spec.engine_options.fp8_base
        && match keep.base {
            "on" => true,
            "off" => false,
            _ => fits(KeptActivations {
                dequantized_base: true,
                ..kept
            }),
        };
    kept
}

/// Offloading the gradient checkpoints needs more pinned host memory than the
/// host has available.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "offloading the gradient checkpoints needs {:.0} MiB of pinned host memory; the host has \
     {:.0} MiB available (MemAvailable in /proc/meminfo, or less under a memory cgroup's \
     limit)",
    mib(*needed), mib(*available)
)]
pub struct HostMemoryShort {
    pub needed: u64,
    pub available: u64,
}

/// What an offloaded layer's checkpoints are, in words: its input, and its
/// attention half when that is kept (`save_attention_residual`), which travels too.
pub fn offloaded_checkpoints(attention_half_kept: bool) -> &'static str {
    if attention_half_kept {
        "inputs and attention halves"
    } else {
        "inputs"
    }
}

/// The same spec with the gradient checkpoints offloaded or not.
pub fn with_offload(spec: &MemorySpec, offload: bool) -> MemorySpec {
    let mut s = spec.clone();
    s.engine_options.offload_layer_inputs = offload;
    s
}

/// `train.keep_attention_residuals`, `train.keep_mlp_activations` and
/// `train.keep_dequantized_base` (`on`, `off` or `auto` each), as
/// [`kept_activations`] takes them; the offload decision sizes with what they
/// would keep.
#[derive(Debug, Clone, Copy)]
pub struct KeepPolicy<'a> {
    pub residuals: &'a str,
    pub mlp: &'a str,
    pub base: &'a str,
}

impl<'a> KeepPolicy<'a> {
    /// The policies of a run's `train` table.
    pub fn of(train: &'a crate::config::TrainSection) -> Self {
        KeepPolicy {
            residuals: &train.keep_attention_residuals,
            mlp: &train.keep_mlp_activations,
            base: &train.keep_dequantized_base,
        }
    }
}

/// What `train.offload_checkpoints = policy` (`on`, `off` or `auto`) decides for a
/// run sized by `spec`: nothing on the reference engine; `on` is on (an error when
/// the pinned host memory it needs is more than `host_available`); `auto` is on
/// when the prediction without offloading does not fit `usable` bytes (or the
/// engine's own buffers `engine_limit`) and the one with it does, with its host
/// memory available, or when offloading is what lets more activations be kept
/// under `keep` ([`offload_keeps_more`]; `gpu` gives the compute its copies must
/// hide behind). Without a GPU to size against (`usable` None) `auto` is off.
/// Decided before [`kept_activations`] (which then sizes with the checkpoints
/// where they are); the trainer, `qtrain plan` and `qtrain bench` all decide
/// through this.
pub fn offload_checkpoints(
    policy: &str,
    keep: KeepPolicy,
    spec: &MemorySpec,
    usable: Option<u64>,
    engine_limit: Option<u64>,
    host_available: Option<u64>,
    gpu: Option<&GpuSpec>,
) -> Result<bool, HostMemoryShort> {
    if spec.engine != EngineKind::Fused {
        return Ok(false);
    }
    let with = with_offload(spec, true).predict();
    let host_ok = host_available.is_none_or(|a| with.host_bytes <= a);
    match policy {
        "on" if !host_ok => Err(HostMemoryShort {
            needed: with.host_bytes,
            available: host_available.unwrap_or(0),
        }),
        "on" => Ok(true),
        "off" => Ok(false),
        _ => {
            // Without offloading nothing is pinned, so the host test is moot there.
            let room = Room {
                usable,
                engine_limit,
                host_available,
            };
            let without = with_offload(spec, false).predict();
            Ok((!room.holds(&without) && room.holds(&with))
                || offload_keeps_more(keep, spec, usable, engine_limit, host_available, gpu))
        }
    }
}

/// The share of the host's available memory that what is pinned for speed only may
/// take: offloading not needed to fit (only to keep more), and a kept attention
/// half travelling with offloaded checkpoints.
pub const OPTIONAL_PIN_SHARE: f64 = 0.75;

/// `auto`'s second reason to offload the checkpoints: with them offloaded, `keep`
/// keeps more than without ([`kept_activations`] both ways; more is the attention
/// half where it was not kept, else more layers' gate/up outputs, the order in
/// which `auto` keeps them). A kept attention half travels with its layer's input
/// and the GPU holds a ring of two layers' (`EngineOptions::save_attention_residual`
/// with `offload_layer_inputs`), which leaves the room for the half or for more
/// gate/up outputs. Only where three quarters of the host's available memory hold
/// the pinned bytes ([`OPTIONAL_PIN_SHARE`]) and the copies, at
/// `gpu`'s assumed host link rate ([`GpuSpec::host_link_gbs`]), take no longer than
/// the estimated compute of the pass with what is then kept ([`pass_seconds`] on
/// `gpu`; no GPU, no offload): the test `qtrain plan` prints as "hidden behind the
/// compute". Measured: on an H100 under a 24 GiB cap at 1 x 32768 (docs/perf.md
/// v16) the half travelling gave 6 697 tok/s in 11.1 GiB against 5 690 tok/s in
/// 17.3 GiB keeping nothing on the GPU; on an H200 under a 24 GiB cap (docs/perf.md
/// v18) every layer's gate/up output with the checkpoints offloaded gave 18 290
/// tok/s at 4 x 2048 against 16 841 keeping 18 of 32 layers' on the GPU.
pub fn offload_keeps_more(
    keep: KeepPolicy,
    spec: &MemorySpec,
    usable: Option<u64>,
    engine_limit: Option<u64>,
    host_available: Option<u64>,
    gpu: Option<&GpuSpec>,
) -> bool {
    let room = Room {
        usable,
        engine_limit,
        host_available,
    };
    gpu.is_some_and(|g| {
        let link = host_link_bytes_per_s(Some(g));
        keeps_more_with_copies_hidden(keep, spec, room, link, |s| pass_seconds(s, g))
    })
}

/// [`offload_keeps_more`] over a host link of `link` bytes/s, with the pass's
/// compute time given by `compute` (of the spec with the checkpoints offloaded and
/// what is then kept). Also true where what
/// `keep` keeps is the same both ways but fits only with the checkpoints offloaded
/// (an `on` policy: the half kept whatever the room).
fn keeps_more_with_copies_hidden(
    keep: KeepPolicy,
    spec: &MemorySpec,
    room: Room,
    link: f64,
    compute: impl Fn(&MemorySpec) -> f64,
) -> bool {
    if spec.engine != EngineKind::Fused {
        return false;
    }
    let kept = |offload| {
        let bare = with_offload(spec, offload);
        let k = kept_activations(
            keep,
            &bare,
            room.usable,
            room.engine_limit,
            room.host_available,
        );
        let s = bare.keeping(k);
        let p = s.predict();
        (k, s, p)
    };
    let ((on_gpu, _, p_gpu), (travelling, with, p)) = (kept(false), kept(true));
    let order = |k: KeptActivations| (k.attention_residuals, k.mlp_layers);
    let more = order(travelling) > order(on_gpu)
        || (order(travelling) == order(on_gpu) && !room.holds(&p_gpu));
    // Offloading for speed, unlike offloading to fit at all, leaves a quarter of
    // the host's available memory to the rest of the machine (the data pipeline,
    // other processes, the page cache): pinned memory cannot be swapped out.
    more && room.for_speed().holds(&p) && p.transfer_seconds_at(link) <= compute(&with)
}

/// The share of the copy bandwidth the NF4 dequantization kernel reaches (v5 in
/// docs/perf.md: 86-87% on the H200).
pub const DEQUANT_BANDWIDTH_SHARE: f64 = 0.87;

/// The time one forward/backward pass of `spec` spends dequantizing the frozen
/// base on `gpu` when the base is not kept dequantized: the fused engine
/// dequantizes each layer's four weight groups in the forward and again in the
/// backward (all but the last layer's last group, which the backward finds still in
/// the shared buffer), each reading the stored NF4 bytes and writing the compute
/// type. Zero for the reference engine, an unquantized base and FP8 products (which
/// quantize the weights again per use: nothing a kept base would save).
pub fn dequantization_seconds_per_pass(spec: &MemorySpec, gpu: &GpuSpec) -> f64 {
    if spec.engine != EngineKind::Fused
        || spec.quantization == Quantization::None
        || spec.engine_options.fp8_base
    {
        return 0.0;
    }
    let cfg = &spec.model;
    let layers = cfg.num_hidden_layers as f64;
    let (stored, _) = frozen_bytes(cfg, spec.quantization, spec.dtype);
    let written = (cfg.num_hidden_layers
        * qtrain_engine::layout::layer_weight_elems(cfg)
        * elem_size(spec.dtype)) as f64;
    // 8L - 1 group dequantizations of the 4L groups per pass.
    let uses = (8.0 * layers - 1.0) / (4.0 * layers);
    (stored as f64 + written) * uses / (gpu.bandwidth_gbs * 1e9 * DEQUANT_BANDWIDTH_SHARE)
}

/// The estimated training throughput of `spec` on `gpu`
/// ([`crate::throughput::estimate`], with the attention half kept or not as the
/// spec says). A partial gate/up keep (K of L layers) saves
/// the same product in each kept layer, so its time per token is taken K/L of the
/// way from the estimate recomputing every layer's to the one keeping them all. A
/// kept dequantized base takes [`dequantization_seconds_per_pass`] off each pass
/// (the measured figures dequantize every pass).
pub fn throughput_estimate(spec: &MemorySpec, gpu: &GpuSpec) -> crate::throughput::Estimate {
    let est = activation_throughput_estimate(spec, gpu);
    if !spec.engine_options.keep_dequantized_base {
        return est;
    }
    let saved = dequantization_seconds_per_pass(spec, gpu);
    let tokens = (spec.batch * spec.seq) as f64;
    let pass = tokens / est.tokens_per_s;
    if saved <= 0.0 || saved >= pass {
        return est;
    }
    crate::throughput::Estimate {
        tokens_per_s: tokens / (pass - saved),
        basis: format!(
            "{}; the frozen base kept dequantized saves ~{:.1} ms of NF4 dequantization per \
             pass",
            est.basis,
            saved * 1e3
        ),
    }
}

/// [`throughput_estimate`] without the kept dequantized base.
fn activation_throughput_estimate(spec: &MemorySpec, gpu: &GpuSpec) -> crate::throughput::Estimate {
    let layers = spec.model.num_hidden_layers;
    let attention_half_kept = spec.engine_options.save_attention_residual;
    let est = |mlp_kept| {
        let kept = crate::throughput::Recompute {
            attention_half_kept,
            mlp_kept,
        };
        crate::throughput::estimate(&spec.model, &spec.targets, spec.engine, spec.seq, kept, gpu)
    };
    match KeptActivations::of(&spec.engine_options)
        .mlp_layers
        .min(layers)
    {
        0 => est(false),
        k if k == layers => est(true),
        k => {
            let (none, all) = (est(false), est(true));
            let f = k as f64 / layers as f64;
            crate::throughput::Estimate {
                tokens_per_s: 1.0 / ((1.0 - f) / none.tokens_per_s + f / all.tokens_per_s),
                basis: format!(
                    "gate/up outputs of {k} of {layers} layers kept: the time per token {k}/{layers} \
                     of the way from ~{:.0} tokens/s recomputing them ({}) to ~{:.0} keeping all \
                     ({})",
                    none.tokens_per_s, none.basis, all.tokens_per_s, all.basis
                ),
            }
        }
    }
}

/// The estimated compute time of one forward/backward pass of `spec`'s
/// micro-batch on `gpu` ([`throughput_estimate`]).
pub fn pass_seconds(spec: &MemorySpec, gpu: &GpuSpec) -> f64 {
    (spec.batch * spec.seq) as f64 / throughput_estimate(spec, gpu).tokens_per_s
}

/// The spec the micro-batch search sizes with under `train.offload_checkpoints =
/// policy`: offloaded for `on`; for `auto` only when not even one row fits
/// without (`fits_one_row` of the spec of one row), so that short contexts keep
/// their micro-batch search as before and long ones can start at all.
pub fn search_spec(
    policy: &str,
    spec: &MemorySpec,
    fits_one_row: impl Fn(&MemorySpec) -> bool,
) -> MemorySpec {
    let fused = spec.engine == EngineKind::Fused;
    let off = with_offload(spec, false);
    let offload = match policy {
        "on" => fused,
        "off" => false,
        _ => fused && !fits_one_row(&off.with_shape(1, spec.seq)),
    };
    with_offload(spec, offload)
}

/// What the host can give this process without swapping, in bytes: `MemAvailable`,
/// or a memory cgroup's headroom where that is less (a container's limit;
/// [`crate::host_memory::available`]); None where neither can be read.
pub fn host_memory_available() -> Option<u64> {
    crate::host_memory::available()
}

/// A size as people write it: plain bytes (`25769803776`), or a number with a
/// binary (`KiB`, `MiB`, `GiB`, `TiB`) or decimal (`KB`, `MB`, `GB`, `TB`) unit,
/// case-insensitive, e.g. `24GiB`, `24000MiB`, `1.5 GiB`. The error says what is
/// accepted.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => 0,
    };
    let value: Option<f64> = num.parse().ok();
    match value {
        Some(v)
            if scale > 0 && v.is_finite() && v > 0.0 && (v * scale as f64) < u64::MAX as f64 =>
        {
            Ok((v * scale as f64).round() as u64)
        }
        _ => Err(format!(
            "`{text}` is not a size: give bytes, or a positive number with KiB, MiB, GiB, \
             TiB, KB, MB, GB or TB (e.g. 24GiB)"
        )),
    }
}

/// The bytes a run may use on a GPU of `total` bytes with `headroom` (a share).
pub fn usable(total: u64, headroom: f64) -> u64 {
    (total as f64 * headroom) as u64
}

/// The largest value in `1..=max` for which `fits` holds, assuming it is monotone
/// (true up to some value, false after); `None` when not even 1 fits.
pub fn largest_fitting(max: usize, fits: impl Fn(usize) -> bool) -> Option<usize> {
    if max == 0 || !fits(1) {
        return None;
    }
    // Grow to a value that does not fit (or max), then bisect.
    let (mut lo, mut hi) = (1usize, 2usize);
    while hi <= max && fits(hi) {
        lo = hi;
        hi = hi.saturating_mul(2);
    }
    let mut hi = hi.min(max + 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// The largest micro-batch (rows of `spec.seq` tokens, at most `max`) whose prediction
/// fits in `usable` bytes.
pub fn largest_batch(spec: &MemorySpec, usable: u64, max: usize) -> Option<usize> {
    largest_fitting(max, |b| spec.with_shape(b, spec.seq).predict().fits(usable))
}

/// The largest sequence length (of `spec.batch` rows, at most `max`) that fits.
pub fn largest_seq(spec: &MemorySpec, usable: u64, max: usize) -> Option<usize> {
    largest_fitting(max, |s| {
        spec.with_shape(spec.batch, s).predict().fits(usable)
    })
}

/// What `qtrain bench` measured for one case, to put next to the prediction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Measured {
    /// Device memory in use (total - free) right after the device was opened.
    pub baseline_used: Option<u64>,
    /// Device memory in use after the model was loaded.
    pub loaded_used: Option<u64>,
    /// The peak device memory in use during the steps.
    pub peak_used: Option<u64>,
    /// `Dev::peak_bytes` of the fused engine.
    pub engine_peak: Option<u64>,
}

/// Predicted against measured, one line per quantity the bench can measure, for
/// calibrating the runtime constants (the lead fills docs/memory.md from these).
pub fn compare(predicted: &MemoryBreakdown, m: &Measured) -> String {
    let frozen = predicted.bytes_of(|c| c == Category::Frozen);
    let runtime_fixed: u64 = predicted
        .lines
        .iter()
        .filter(|l| l.category == Category::Runtime && !l.label.starts_with("allocator"))
        .map(|l| l.bytes)
        .sum();
    let mut rows = vec![(
        "context + cuBLAS (used before loading)",
        runtime_fixed,
        m.baseline_used,
    )];
    rows.push((
        "frozen base (loaded - baseline)",
        frozen,
        m.loaded_used
            .zip(m.baseline_used)
            .map(|(l, b)| l.saturating_sub(b)),
    ));
    if predicted.engine_bytes > 0 {
        rows.push((
            "fused engine's own buffers (Dev peak)",
            predicted.engine_bytes,
            m.engine_peak,
        ));
    }
    rows.push((
        "whole device at peak (used)",
        predicted.total(),
        m.peak_used,
    ));
    let mut s = format!(
        "{:<40} {:>12} {:>12} {:>8}\n",
        "memory", "predicted MiB", "measured MiB", "error"
    );
    for (what, p, meas) in rows {
        let (mm, err) = match meas {
            Some(x) => (
                format!("{:.1}", mib(x)),
                format!(
                    "{:+.1}%",
                    100.0 * (p as f64 - x as f64) / (x as f64).max(1.0)
                ),
            ),
            None => ("-".into(), "-".into()),
        };
        s += &format!("{what:<40} {:>12.1} {mm:>12} {err:>8}\n", mib(p));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use qtrain_engine::AttnBackward;

    /// The residual and gate/up policies, the dequantized base off (the tests of
    /// the activations keep it out of the way).
    fn keep<'a>(residuals: &'a str, mlp: &'a str) -> KeepPolicy<'a> {
        KeepPolicy {
            residuals,
            mlp,
            base: "off",
        }
    }

    fn mistral(batch: usize, seq: usize) -> MemorySpec {
        MemorySpec {
            model: ModelConfig::preset("mistral-7b-v0.3", 0).unwrap(),
            quantization: Quantization::default(),
            dtype: DType::BF16,
            rank: 16,
            targets: vec![Proj::Q, Proj::K, Proj::V, Proj::O],
            batch,
            seq,
            checkpointing: true,
            eight_bit: true,
            optimizer: OptimizerPlace::Resident,
            engine: EngineKind::Fused,
            engine_options: EngineOptions::default(),
            compute_capability: Some((8, 6)),
        }
    }

    #[test]
    fn mistral_7b_breakdown_is_plausible() {
        let predicted = mistral(8, 512).predict();
        let frozen = predicted.bytes_of(|c| c == Category::Frozen);
        // 6.98B projection weights in NF4 at ~4.13 bits, 0.27B in bf16: the 4.14 GB
        // docs/perf.md reports for the loaded model on the GPU.
        assert!((4.1e9..4.2e9).contains(&(frozen as f64)), "frozen {frozen}");
        // r16 on q,k,v,o of Mistral-7B: 13.6M parameters.
        assert_eq!(predicted.lora_params, 13_631_488);
        let state = predicted.bytes_of(|c| c == Category::Optimizer);
        assert!((27e6..28e6).contains(&(state as f64)), "state {state}");
        let ws = predicted.bytes_of(|c| matches!(c, Category::Workspace(_)));
        // Checkpoints: 32 layers x 4096 tokens x 4096 x 2 bytes = 1 GiB, the largest part.
        let ckpt = predicted.bytes_of(|c| c == Category::Workspace(Component::LayerInputs));
        assert_eq!(ckpt, 1 << 30);
        assert!(ws > ckpt && ws < 3 * ckpt, "workspace {ws}");
        let total = predicted.total();
        assert!((5.5e9..9e9).contains(&(total as f64)), "total {total}");
        assert!(predicted.fits(usable(23028 * MIB, DEFAULT_HEADROOM)));
        assert!(predicted.warnings.is_empty());
        assert!(
            predicted.table().contains("gradient checkpoints"),
            "{}",
            predicted.table()
        );
    }

    #[test]
    fn searches_are_monotone_and_consistent() {
        let spec = mistral(8, 512);
        let a10 = usable(23028 * MIB, DEFAULT_HEADROOM);
        let b = largest_batch(&spec, a10, 4096).unwrap();
        assert!(b >= 8, "batch {b}");
        assert!(spec.with_shape(b, 512).predict().fits(a10));
        assert!(!spec.with_shape(b + 1, 512).predict().fits(a10));
        // More memory never allows less; totals grow with batch and sequence.
        let h100 = usable(81559 * MIB, DEFAULT_HEADROOM);
        assert!(largest_batch(&spec, h100, 4096).unwrap() > b);
        let mut last = 0;
        for bb in 1..40 {
            let t = spec.with_shape(bb, 512).predict().total();
            assert!(t > last);
            last = t;
        }
        let s = largest_seq(&spec, a10, 1 << 20).unwrap();
        assert!(s >= 512 && spec.with_shape(8, s).predict().fits(a10));
        assert!(!spec.with_shape(8, s + 1).predict().fits(a10));
        // Nothing fits in 1 GiB: the frozen base alone is larger.
        assert_eq!(largest_batch(&spec, 1 << 30, 4096), None);
        // The search respects its cap.
        assert_eq!(largest_fitting(5, |_| true), Some(5));
        assert_eq!(largest_fitting(1000, |x| x <= 37), Some(37));
    }

    #[test]
    fn paging_and_reference_lines() {
        let mut spec = mistral(4, 256);
        spec.optimizer = OptimizerPlace::Paged;
        let paged = spec.predict().bytes_of(|c| c == Category::Optimizer);
        // Largest tensor: B of o_proj or A of q_proj, 4096 x 16 = 65536 elements.
        assert_eq!(paged, 2 * (2 * 65536 + 8 * 256));
        spec.engine = EngineKind::Reference;
        let predicted = spec.predict();
        assert_eq!(predicted.engine_bytes, 0);
        assert_eq!(predicted.warnings.len(), 1);
        assert!(predicted.bytes_of(|c| c == Category::ReferenceActivations) > 0);
        assert_eq!(placement_for("never", u64::MAX), OptimizerPlace::Resident);
        assert_eq!(placement_for("always", 0), OptimizerPlace::Paged);
        assert_eq!(placement_for("auto", 1 << 20), OptimizerPlace::Resident);
    }

    #[test]
    fn compare_lists_predicted_and_measured() {
        let predicted = mistral(8, 512).predict();
        let m = Measured {
            baseline_used: Some(500 * MIB),
            loaded_used: Some(4500 * MIB),
            peak_used: Some(predicted.total()),
            engine_peak: Some(predicted.engine_bytes),
        };
        let s = compare(&predicted, &m);
        assert!(s.contains("whole device") && s.contains("+0.0%"), "{s}");
        assert!(s.lines().count() == 5, "{s}");
    }

    /// `auto` keeps the attention residuals first, then the gate/up outputs beside
    /// them, each only where it fits; `on`/`off` are taken as said; the reference
    /// engine and a run with no GPU to size against keep nothing on `auto`.
    #[test]
    fn kept_activations_residuals_first_then_mlp() {
        let spec = mistral(8, 512);
        let predicted = |k: KeptActivations| spec.keeping(k).predict();
        let total = |k| predicted(k).total();
        let engine = |k| predicted(k).engine_bytes;
        let none = KeptActivations::default();
        let res = KeptActivations {
            attention_residuals: true,
            mlp_layers: 0,
            dequantized_base: false,
        };
        let with_mlp = |k| KeptActivations {
            attention_residuals: true,
            mlp_layers: k,
            dequantized_base: false,
        };
        let both = with_mlp(32);
        // Mistral-7B at 4096 tokens: 1 GiB of residuals, 1.5 GiB of q/k/v and 1 GiB
        // of attention outputs (with 16 MiB of f32 log-sum-exp; one layer's of each
        // was there already) and 28 MiB of the adapters' z (all seven projections'
        // slots, r16), 7 GiB of gate/up outputs (in place of the one chunk buffer).
        let attn_layer = 4096 * 4096 * 2 + 4096 * 6144 * 2 + 4096 * 4096 * 2 + 8 * 32 * 512 * 4;
        let z_layer = 7 * 4096 * 16 * 2;
        assert_eq!(engine(res) - engine(none), 31 * (attn_layer + z_layer));
        let gu_chunk = 4096 * 2 * 14336 * 2;
        assert_eq!(
            engine(both) - engine(res),
            32 * 4096 * 2 * 14336 * 2 - gu_chunk
        );
        // Some layers' gate/up outputs: each 224 MiB beside the chunk buffer.
        assert_eq!(engine(with_mlp(5)) - engine(res), 5 * gu_chunk);
        let auto = |usable| kept_activations(keep("auto", "auto"), &spec, Some(usable), None, None);
        assert_eq!(auto(total(none)), none);
        assert_eq!(auto(total(res)), res);
        // Between the attention half alone and every layer's gate/up outputs: as
        // many layers' as fit, the first ones.
        let usable = (total(res) + total(both)) / 2;
        let some = auto(usable);
        assert!(some.attention_residuals && some.mlp_layers > 0 && some.mlp_layers < 32);
        assert!(total(some) <= usable && total(with_mlp(some.mlp_layers + 1)) > usable);
        assert_eq!(auto(total(both)), both);
        // `on` keeps every layer's, `off` none, whatever the room.
        assert_eq!(
            kept_activations(keep("on", "off"), &spec, Some(usable), None, None),
            res
        );
        assert_eq!(
            kept_activations(keep("auto", "auto"), &spec, None, None, None),
            none
        );
        assert_eq!(
            kept_activations(keep("off", "on"), &spec, None, None, None),
            KeptActivations {
                attention_residuals: false,
                mlp_layers: 32,
                dequantized_base: false,
            }
        );
        // The engine limit counts too.
        assert_eq!(
            kept_activations(
                keep("auto", "auto"),
                &spec,
                Some(u64::MAX),
                Some(engine(res)),
                None
            ),
            res
        );
        let mut reference = spec.clone();
        reference.engine = EngineKind::Reference;
        assert_eq!(
            kept_activations(keep("on", "on"), &reference, Some(u64::MAX), None, None),
            none
        );
    }

    /// The dequantized base is kept last: `auto` keeps it only beside every other
    /// kept activation, where the prediction with it fits; it costs every layer's
    /// four weight groups in place of the shared buffer (13 GiB more on Mistral-7B
    /// in bf16); `on`/`off` as said; with FP8 products it would cost nothing and
    /// is not kept even with `on`.
    #[test]
    fn the_dequantized_base_is_kept_last_where_it_fits() {
        let spec = mistral(4, 2048);
        let with = |k: KeptActivations| spec.keeping(k).predict();
        let all = KeptActivations {
            attention_residuals: true,
            mlp_layers: 32,
            dequantized_base: false,
        };
        let based = KeptActivations {
            dequantized_base: true,
            ..all
        };
        let layer = 4096 * 6144 + 4096 * 4096 + 2 * 14336 * 4096 + 4096 * 14336;
        let shared = 2 * 14336 * 4096 + 4096 * 14336;
        assert_eq!(
            with(based).engine_bytes - with(all).engine_bytes,
            (32 * layer - shared) * 2
        );
        assert!(with(based).table().contains("frozen base kept dequantized"));
        let policy = |base| KeepPolicy {
            residuals: "auto",
            mlp: "auto",
            base,
        };
        let auto = |usable| kept_activations(policy("auto"), &spec, Some(usable), None, None);
        assert_eq!(auto(with(based).total()), based);
        assert_eq!(auto(with(based).total() - 1), all);
        // Not before the activations: with room for the base beside 22 layers'
        // gate/up outputs (448 MiB each at 8192 tokens) but not beside all 32, every
        // layer's gate/up output comes first.
        let gu_layer = 8192 * 2 * 14336 * 2;
        assert_eq!(auto(with(based).total() - 10 * gu_layer), all);
        assert!(kept_activations(policy("on"), &spec, None, None, None).dequantized_base);
        assert!(
            !kept_activations(policy("off"), &spec, Some(u64::MAX), None, None).dequantized_base
        );
        let mut fp8 = spec.clone();
        fp8.engine_options.fp8_base = true;
        assert_eq!(
            fp8.keeping(based).predict().engine_bytes,
            fp8.keeping(all).predict().engine_bytes
        );
        let fp8_on = kept_activations(policy("on"), &fp8, None, None, None);
        assert!(!fp8_on.dequantized_base);
    }

    /// `train.attention_backward = "stored-ds"` is sized (the attention scratch grows by the
    /// dS store) and the keep decisions make room for it.
    #[test]
    fn a_named_stored_ds_backward_is_sized_and_kept_beside() {
        let mut spec = mistral(1, 8192);
        spec.compute_capability = Some((9, 0));
        let mut named = spec.clone();
        named.engine_options.attention_backward = AttnBackward::StoredDs;
        let half = KeptActivations {
            attention_residuals: true,
            ..KeptActivations::default()
        };
        // The store is the attention scratch's growth: 2.16 GB at 1 x 8192.
        let stored = named.keeping(half).predict();
        assert_eq!(
            stored.engine_bytes - spec.keeping(half).predict().engine_bytes,
            32 * (128 * 129 / 2) * 8192
        );
        // Keeping activations leaves the named backward as it is.
        assert_eq!(
            named.keeping(half).engine_options.attention_backward,
            AttnBackward::StoredDs
        );
        let auto =
            |usable| kept_activations(keep("auto", "auto"), &named, Some(usable), None, None);
        let k = auto(u64::MAX);
        assert!(k.attention_residuals && k.mlp_layers == 32, "{k:?}");
        // With room for the attention half beside the store only, the gate/up outputs
        // make way.
        let tight = auto(stored.total());
        assert!(
            tight.attention_residuals && tight.mlp_layers == 0,
            "{tight:?}"
        );
    }

    /// With offloaded checkpoints a kept attention half travels with its layer's
    /// input: Mistral-7B at 1 x 32768 keeps q/k/v, x2, the attention output and
    /// its log-sum-exp of a ring of two layers on the device (in place of one
    /// layer's q/k/v, output and lse) and the other 30 layers' in pinned host
    /// memory, crossing the link twice; `auto` keeps it under 24 GiB when the host
    /// holds it, and not when it does not.
    #[test]
    fn a_kept_attention_half_travels_with_offloaded_checkpoints() {
        let spec = with_offload(&mistral(1, 32768), true);
        let mut kept_spec = spec.clone();
        let res = KeptActivations {
            attention_residuals: true,
            mlp_layers: 0,
            dequantized_base: false,
        };
        res.apply(&mut kept_spec.engine_options);
        let (none, kept) = (spec.predict(), kept_spec.predict());
        let n = 32768u64;
        // q/k/v (6144 columns), x2 and the output (4096 each), lse (32 heads, f32).
        let per_layer = n * 6144 * 2 + 2 * n * 4096 * 2 + 32 * n * 4;
        let travelling = 32 - qtrain_engine::OFFLOAD_RING as u64;
        assert_eq!(kept.host_bytes - none.host_bytes, travelling * per_layer);
        assert_eq!(kept.transfer_bytes, 2 * kept.host_bytes);
        // The ring of two replaces one layer's buffers; every layer's adapter z is
        // kept (seven projections' slots, r16).
        let z = 7 * n * 16 * 2;
        assert_eq!(kept.engine_bytes - none.engine_bytes, per_layer + 31 * z);
        assert!(
            kept.table()
                .contains("ring of 2 layers' inputs and attention halves"),
            "{}",
            kept.table()
        );
        let cap = 24 * 1024 * MIB;
        let auto = |host| kept_activations(keep("auto", "off"), &spec, Some(cap), None, host);
        assert_eq!(auto(None), res);
        // Kept for speed, it may pin OPTIONAL_PIN_SHARE of what the host has.
        let least = (kept.host_bytes as f64 / OPTIONAL_PIN_SHARE).ceil() as u64 + 1;
        assert_eq!(auto(Some(least)), res);
        assert_eq!(auto(Some(kept.host_bytes)), KeptActivations::default());
        // What the cap leaves then goes to the first layers' gate/up outputs (1.75
        // GiB each at 32768 tokens).
        let filled = kept_activations(keep("auto", "auto"), &spec, Some(cap), None, None);
        assert!(filled.attention_residuals && (1..32).contains(&filled.mlp_layers));
    }

    /// `auto` also offloads where that is what lets the attention half be kept:
    /// Mistral-7B at 1 x 32768 under 24 GiB fits without offloading only keeping
    /// nothing, and keeps the half with it (a ring of two layers' on the GPU); not
    /// where the half fits on the GPU anyway (1 x 4096), nor with the half not to
    /// be kept, the host short of the pinned bytes, the copies longer than the
    /// compute, or no GPU to estimate the compute; with a GPU of the table the
    /// estimate comes from its throughput. With the half `on` (kept whatever the
    /// room) offloading is what makes it fit.
    #[test]
    fn offload_is_picked_to_keep_the_attention_half() {
        let cap = 24 * 1024 * MIB;
        let long = mistral(1, 32768);
        let mut half = long.clone();
        half.engine_options.save_attention_residual = true;
        let travelling = with_offload(&half, true).predict();
        assert!(with_offload(&long, false).predict().fits(cap));
        assert!(!with_offload(&half, false).predict().fits(cap));
        assert!(travelling.fits(cap), "{}", travelling.table());
        let link = travelling.transfer_seconds_at(HOST_LINK_BYTES_PER_S);
        let keeps = |residuals, spec: &MemorySpec, usable, host, compute: f64| {
            let room = Room {
                usable: Some(usable),
                engine_limit: None,
                host_available: host,
            };
            keeps_more_with_copies_hidden(
                keep(residuals, "off"),
                spec,
                room,
                HOST_LINK_BYTES_PER_S,
                |_| compute,
            )
        };
        assert!(keeps("auto", &long, cap, None, link));
        // The host must have the pinned bytes within the share speed may take.
        let least = (travelling.host_bytes as f64 / OPTIONAL_PIN_SHARE).ceil() as u64 + 1;
        assert!(keeps("on", &long, cap, Some(least), link));
        assert!(!keeps("on", &long, cap, Some(travelling.host_bytes), link));
        assert!(!keeps("off", &long, cap, None, link));
        assert!(!keeps("auto", &long, cap, None, link * 0.99));
        assert!(!keeps(
            "auto",
            &long,
            cap,
            Some(travelling.host_bytes),
            link
        ));
        assert!(!keeps("auto", &long, u64::MAX, None, link));
        assert!(!keeps("auto", &mistral(1, 4096), cap, None, 1e9));
        // Too little memory even with the half travelling.
        assert!(!keeps("auto", &long, 6 * 1024 * MIB, None, 1e9));
        // Through the policy: `auto` with the H100's estimate (a 32k pass takes
        // seconds, the copies ~3.6 s at 20 GB/s), then the half is kept; no GPU to
        // estimate with, no offload.
        let h100 = crate::gpu::preset("h100").expect("h100 in the table");
        assert!(
            pass_seconds(&long, h100) >= link,
            "{}",
            pass_seconds(&long, h100)
        );
        let decide = |policy, residuals, gpu| {
            offload_checkpoints(
                policy,
                keep(residuals, "off"),
                &long,
                Some(cap),
                None,
                None,
                gpu,
            )
        };
        assert_eq!(decide("auto", "auto", Some(h100)), Ok(true));
        assert_eq!(decide("auto", "auto", None), Ok(false));
        assert_eq!(decide("auto", "off", Some(h100)), Ok(false));
        assert_eq!(decide("off", "auto", Some(h100)), Ok(false));
        let offloaded = with_offload(&long, true);
        assert_eq!(
            kept_activations(keep("auto", "off"), &offloaded, Some(cap), None, None),
            KeptActivations {
                attention_residuals: true,
                mlp_layers: 0,
                dequantized_base: false,
            }
        );
    }

    /// A partial gate/up keep's estimate lies between none kept and all kept, at
    /// K/L of the way in time per token (each layer's saves the same product).
    #[test]
    fn a_partial_gate_up_keep_is_estimated_between_none_and_all() {
        let h100 = crate::gpu::preset("h100").expect("h100 in the table");
        let with = |k| {
            let mut s = mistral(4, 2048);
            s.engine_options.kept_mlp_layers = k;
            throughput_estimate(&s, h100)
        };
        let (none, all, some) = (with(0), with(32), with(8));
        assert!(none.tokens_per_s < some.tokens_per_s && some.tokens_per_s < all.tokens_per_s);
        let per_token = 0.75 / none.tokens_per_s + 0.25 / all.tokens_per_s;
        assert!((1.0 / some.tokens_per_s - per_token).abs() < 1e-12);
        assert!(some.basis.contains("8 of 32 layers"), "{}", some.basis);
        assert_eq!(with(qtrain_engine::ALL_LAYERS), all);
        assert!((pass_seconds(&mistral(4, 2048), h100) - 8192.0 / none.tokens_per_s).abs() < 1e-12);
    }

    /// The kept dequantized base's estimate: each pass saves its dequantizations,
    /// ~34.9 GB of NF4 reads and bf16 writes for Mistral-7B, ~12 ms at 87% of an
    /// H100's 3.35 TB/s. Measured on an H100 (docs/perf.md v19, q,k,v,o, all kept):
    /// 18 761 -> 20 064 tokens/s at 8 x 512 (+6.9%), 17 723 -> 18 388 at 4 x 2048
    /// (+3.8%), 13 777 -> 14 110 at 1 x 8192 (+2.4%).
    #[test]
    fn a_kept_dequantized_base_is_estimated_faster_by_its_dequantizations() {
        let h100 = crate::gpu::preset("h100").expect("h100 in the table");
        for (batch, seq, lo, hi) in [
            (8, 512, 1.04, 1.09),
            (4, 2048, 1.02, 1.05),
            (1, 8192, 1.01, 1.04),
        ] {
            let mut s = mistral(batch, seq);
            s.engine_options.save_attention_residual = true;
            s.engine_options.kept_mlp_layers = 32;
            let saved = dequantization_seconds_per_pass(&s, h100);
            assert!((0.011..0.013).contains(&saved), "{saved}");
            let without = throughput_estimate(&s, h100);
            s.engine_options.keep_dequantized_base = true;
            let with = throughput_estimate(&s, h100);
            let tokens = (batch * seq) as f64;
            let pass = tokens / without.tokens_per_s - saved;
            assert!((with.tokens_per_s - tokens / pass).abs() < 1e-6);
            let gain = with.tokens_per_s / without.tokens_per_s;
            assert!((lo..hi).contains(&gain), "{batch}x{seq}: {gain}");
            assert!(with.basis.contains("kept dequantized"), "{}", with.basis);
            // FP8 products quantize the weights again per use: no saving to claim.
            s.engine_options.fp8_base = true;
            assert_eq!(dequantization_seconds_per_pass(&s, h100), 0.0);
        }
        // Twice the bandwidth, half the time.
        let mut s = mistral(8, 512);
        let mut fast = *h100;
        fast.bandwidth_gbs *= 2.0;
        let h = dequantization_seconds_per_pass(&s, h100);
        assert!((dequantization_seconds_per_pass(&s, &fast) - h / 2.0).abs() < 1e-12);
        s.engine = EngineKind::Reference;
        assert_eq!(dequantization_seconds_per_pass(&s, h100), 0.0);
    }

    /// `auto` offloads where that leaves the room for more layers' gate/up outputs:
    /// Mistral-7B at 4 x 2048 on an RTX 4090 keeps the attention half and 12 of 32
    /// layers' gate/up outputs with the checkpoints on the GPU, and every layer's
    /// with them (and the halves) on the host; the 4090's pass (~2.7 s estimated)
    /// hides the copies (~0.9 s at 20 GB/s), the H100's (~0.45 s) under the same cap
    /// hides them over its own link and would not over the 4090's; with
    /// `train.keep_mlp_activations = "off"` nothing more is kept, so nothing travels.
    #[test]
    fn offload_is_picked_to_keep_more_gate_up_outputs() {
        let rtx4090 = crate::gpu::preset("rtx4090").expect("rtx4090 in the table");
        let h100 = crate::gpu::preset("h100").expect("h100 in the table");
        let usable = super::usable(rtx4090.memory_bytes, DEFAULT_HEADROOM);
        let spec = mistral(4, 2048);
        let kept = |offload| {
            kept_activations(
                keep("auto", "auto"),
                &with_offload(&spec, offload),
                Some(usable),
                None,
                None,
            )
        };
        let (on_gpu, travelling) = (kept(false), kept(true));
        assert!(on_gpu.attention_residuals && (1..32).contains(&on_gpu.mlp_layers));
        assert_eq!(
            travelling,
            KeptActivations {
                attention_residuals: true,
                mlp_layers: 32,
                dequantized_base: false,
            }
        );
        let decide = |mlp, gpu| {
            offload_checkpoints(
                "auto",
                keep("auto", mlp),
                &spec,
                Some(usable),
                None,
                None,
                Some(gpu),
            )
        };
        assert_eq!(decide("auto", rtx4090), Ok(true));
        assert_eq!(decide("auto", h100), Ok(true));
        assert_eq!(decide("off", rtx4090), Ok(false));
        // The H100's pass (~0.45 s) hides the copies over its PCIe 5.0 link (50 GB/s
        // assumed: ~0.36 s), not over a 20 GB/s one (~0.9 s).
        let room = Room {
            usable: Some(usable),
            engine_limit: None,
            host_available: None,
        };
        let auto = keep("auto", "auto");
        let over = |link| {
            keeps_more_with_copies_hidden(auto, &spec, room, link, |s| pass_seconds(s, h100))
        };
        assert!(over(h100.host_link_gbs * 1e9) && !over(20e9));
        // The host must hold the travelling checkpoints and halves.
        let host = with_offload(&spec, true)
            .keeping(travelling)
            .predict()
            .host_bytes;
        let with_host = |h| {
            offload_checkpoints(
                "auto",
                auto,
                &spec,
                Some(usable),
                None,
                Some(h),
                Some(rtx4090),
            )
        };
        // Offloading only to keep more pins at most 3/4 of what the host has. Less
        // than that: the halves cannot travel, and every layer's gate/up output
        // without the half ranks below the half with 12 layers' on the GPU (the
        // order in which `auto` keeps them), so the checkpoints stay on the GPU.
        let least = (host as f64 / OPTIONAL_PIN_SHARE).ceil() as u64 + 1;
        assert_eq!(with_host(least), Ok(true));
        assert_eq!(with_host(host), Ok(false));
    }

    /// `auto` offloads the checkpoints exactly where the run does not fit without
    /// and does with: Mistral-7B at 1 x 65536 under 24 GiB (16 GiB of checkpoints),
    /// not at 1 x 4096; the device saves (L - ring)·n·h·2 bytes, the host takes
    /// them, the link moves them twice; `on` needs the host memory; the reference
    /// engine and a run with nothing to size against never offload on `auto`.
    #[test]
    fn offload_is_picked_where_it_is_needed() {
        let cap = 24 * 1024 * MIB;
        let long = mistral(1, 65536);
        let (off, on) = (
            with_offload(&long, false).predict(),
            with_offload(&long, true).predict(),
        );
        let moved = (32 - qtrain_engine::OFFLOAD_RING as u64) * 65536 * 4096 * 2;
        assert_eq!(off.engine_bytes - on.engine_bytes, moved);
        assert_eq!((off.host_bytes, on.host_bytes), (0, moved));
        assert_eq!(on.transfer_bytes, 2 * moved);
        assert!(
            (on.transfer_seconds_at(HOST_LINK_BYTES_PER_S) - 2.0 * moved as f64 / 20e9).abs()
                < 1e-9
        );
        assert!(!off.fits(cap) && on.fits(cap), "{}", on.table());
        assert!(
            on.table().contains("ring of 2 layers' inputs;"),
            "{}",
            on.table()
        );
        let keep = KeepPolicy {
            residuals: "off",
            mlp: "off",
            base: "off",
        };
        let decide = |policy, spec: &MemorySpec, usable, host| {
            offload_checkpoints(policy, keep, spec, usable, None, host, None)
        };
        assert_eq!(decide("auto", &long, Some(cap), None), Ok(true));
        assert_eq!(
            decide("auto", &mistral(1, 4096), Some(cap), None),
            Ok(false)
        );
        assert_eq!(decide("off", &long, Some(cap), None), Ok(false));
        assert_eq!(decide("auto", &long, None, None), Ok(false));
        // Too little memory even offloaded: auto stays off.
        assert_eq!(decide("auto", &long, Some(8 * 1024 * MIB), None), Ok(false));
        // The host must hold the checkpoints: auto stays off, on is an error.
        assert_eq!(decide("auto", &long, Some(cap), Some(moved - 1)), Ok(false));
        let err = decide("on", &long, Some(cap), Some(moved - 1)).unwrap_err();
        assert_eq!(err.needed, moved);
        assert!(err.to_string().contains("MemAvailable"), "{err}");
        assert_eq!(decide("on", &mistral(1, 512), None, Some(moved)), Ok(true));
        // The engine limit counts as in kept_activations.
        let limit = Some(on.engine_bytes);
        assert_eq!(
            offload_checkpoints("auto", keep, &long, Some(u64::MAX), limit, None, None),
            Ok(true)
        );
        let mut reference = long.clone();
        reference.engine = EngineKind::Reference;
        assert_eq!(decide("on", &reference, Some(cap), None), Ok(false));
        // The micro-batch search offloads for `on`, and for `auto` only when one row
        // does not fit without.
        let fits = |s: &MemorySpec| s.predict().fits(cap);
        let opts = |policy, spec: &MemorySpec| {
            search_spec(policy, spec, fits)
                .engine_options
                .offload_layer_inputs
        };
        assert!(opts("auto", &long) && opts("on", &mistral(1, 512)));
        assert!(!opts("auto", &mistral(1, 512)) && !opts("off", &long));
    }

    #[test]
    fn sizes_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_bytes("24GiB"), Ok(24 << 30));
        assert_eq!(parse_bytes("16gib"), Ok(16 << 30));
        assert_eq!(parse_bytes("24000MiB"), Ok(24000 << 20));
        assert_eq!(parse_bytes("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("24GB"), Ok(24_000_000_000));
        assert_eq!(parse_bytes("25769803776"), Ok(25769803776));
        assert_eq!(parse_bytes(" 512 KiB "), Ok(512 << 10));
        for bad in ["", "GiB", "24 GiBs", "-3GiB", "0", "24XB", "1.2.3MiB"] {
            let e = parse_bytes(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")) && e.contains("GiB"), "{e}");
        }
    }
}
