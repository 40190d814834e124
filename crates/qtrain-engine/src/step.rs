//! The fused training step: forward, loss and backward of the whole decoder as a
//! fixed sequence of kernel launches and GEMMs over the buffers of
//! [`crate::layout::WorkspaceLayout`].
//!
//! ```text
//! embed → for each layer: save its input, run it            (forward, nothing else kept)
//! final norm → chunked cross-entropy (logits never whole) → ∂L/∂(final hidden)
//! for each layer, last first:
//!     recompute the attention half from the saved input       (h1, q/k/v after RoPE, O, lse, x2, h2;
//!                                                              with the half kept only h1 and h2)
//!     per MLP chunk: recompute gate/up (unless kept) and SwiGLU, then its backward
//!     attention backward, RoPE⁻¹, q/k norms⁻¹ (Qwen 3), q/k/v backward, input-norm backward
//! ```
//!
//! Each layer's frozen weights are dequantized into one reused buffer as four
//! groups (`[q;k;v]`, `o`, `[gate;up]`, `down`), so q/k/v and gate/up are each
//! one GEMM; the attention half's groups and the MLP's share the memory
//! ([`crate::layout::weight_group_offsets`]), so the backward dequantizes o and
//! q/k/v a second time after the MLP (a fifth of the layer's weights: ~0.3% of a
//! step) for a buffer of the MLP's size alone (80 MiB less on Mistral-7B). With
//! `keep_dequantized_base` the buffer holds every layer's groups instead, each
//! dequantized the first time the workspace uses it and read as it is afterwards.
//! LoRA runs as two skinny products per adapted projection,
//! `z = dropout(x) Aᵀ` then `y += s · z Bᵀ` (accumulated into the base product);
//! its gradients are accumulated in f32 straight from compute-type operands. `z` is
//! kept per layer whenever either half of the layer is kept (`z_outputs`: 56 MiB at
//! 8192 tokens on Mistral-7B), so only the recomputed projections rebuild it.
//! Without dropout the adapters of projections that share an input run their
//! A-side products stacked (`[A_q; A_k; A_v]`, `[A_gate; A_up]`: one `z` product
//! and one input-gradient product per group, each an `[n, h]` pass, instead of one
//! per adapter). With
//! dropout the A-side products (`z`, `dA += dzᵀ dropout(x)`, `dx += (dz A) ∘ mask`)
//! are the fused kernels of `qtrain_device::ops::lora_dropout`, which draw the mask
//! as they read `x` (nothing materialized); without it they are cuBLAS GEMMs.
//! Residual adds are fused into the GEMMs (`beta = 1`) and into the norms'
//! backward (`accumulate`).
//!
//! The families' extras: frozen projection biases (Qwen 2.5's q/k/v, Llama's
//! `attention_bias`/`mlp_bias`) are added to each fused product right after its
//! GEMM, before the LoRA term (`x Wᵀ + b + s·B A x`, PEFT's order), one add per
//! group; being constants they change no gradient. Qwen 3's per-head RMSNorm of q
//! and k runs between the q/k/v projections and RoPE, out of place (its input
//! stays in `qkv` for the backward, its rotated output goes to `qk_normed`, which
//! attention reads), and its backward runs in place on `dq`/`dk` after RoPE⁻¹.
//!
//! With `offload_layer_inputs` the checkpoints leave the device: a ring of
//! [`OFFLOAD_RING`] layer inputs stays, and each layer's input is copied to
//! page-locked host memory on a side stream while the next layer runs
//! ([`qtrain_device::HostStage`]); in the backward layer `l - 1`'s input comes back
//! while layer `l`'s backward runs. Events order the copies against the main
//! stream: a copy out starts after the input's writer, a slot is overwritten only
//! after its copy out finished, and a layer's backward starts only after its input
//! came back. The inputs of the last `R` layers are still in the ring when the
//! backward starts and never travel. A kept attention half
//! (`save_attention_residual`: q/k/v, x2, the attention output and its
//! log-sum-exp) travels the same way in a ring of its own slots, copied out while
//! the layer's MLP runs: the backward then recomputes only the norms, for
//! `(L - R)·n·(qc + h + heads·d)` more elements over the host link each way.
//!
//! The same code runs on the CPU (f32, each kernel's reference), which is how CI
//! checks the orchestration against `qtrain_reference::forward_backward`; the
//! offload runs there too, through plain copies to the host buffer.

use crate::error::{EngineError, Result};
use crate::layout::{
    layer_weight_elems, weight_group_offsets, weight_group_shapes, WorkspaceLayout, WorkspaceShape,
    FP8_WEIGHTS, OFFLOADED, OFFLOAD_RING, STACKED_ROWS,
};
use crate::lora::{DeviceLora, PairSlot};
use crate::weights::{FrozenWeights, Group};
use qtrain_device::gemm::{gemm, Op};
use qtrain_device::ops::attention::{attention_bwd, attention_fwd, AttnBackward, AttnShape};
use qtrain_device::ops::bias::add_bias;
use qtrain_device::ops::fp8::{gemm_fp8, quantize_cols_t, quantize_rows};
use qtrain_device::ops::head_norm::{head_rmsnorm_bwd, head_rmsnorm_fwd};
use qtrain_device::ops::lora_dropout::{lora_a_fwd_dropout, lora_a_grad_dropout, lora_dx_dropout};
use qtrain_device::ops::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use qtrain_device::ops::rope::rope;
use qtrain_device::ops::rows::{gather_rows, scatter_rows};
use qtrain_device::ops::swiglu::{swiglu_bwd, swiglu_fwd};
use qtrain_device::ops::xent::xent;
use qtrain_device::{DBuf, Dev, Float, HostStage, Mat, View};
use qtrain_model::{BaseModel, ModelConfig, Proj, PROJECTIONS};
use qtrain_step::{
    dropout_base, DropoutKey, LoraWeights, StepLoss, StepOptions, TokenBatch, IGNORE_INDEX,
};
use std::cell::Cell;

/// Whether the FP8 forward products use Hopper's fast accumulation (partial sums
/// kept at reduced precision inside the tensor cores over the whole `k`, instead of
/// promoted to f32 at intervals). Off: on the Mistral-7B shape with it on, one FP8
/// step's LoRA gradients had a cosine similarity of only 0.56 to the bf16 step's
/// (4 x 2048, docs/perf.md); the input gradients never use it.
const FP8_FAST_ACCUM_FORWARD: bool = false;

/// Tuning knobs of the engine (defaults suit 7B models on one GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Tokens per MLP chunk: bounds the `[c, 2I]` gate/up buffer at long contexts.
    pub mlp_chunk: usize,
    /// Rows per cross-entropy chunk: bounds the `[cc, vocab]` f32 logits.
    pub ce_chunk: usize,
    /// Keep what each layer's attention half leaves for the backward: q/k/v after
    /// RoPE (`L·n·qc` elements in place of one layer's; with q/k norms their
    /// outputs and statistics too), the residual after attention (`x2`, `L·n·h`
    /// more) and the attention output with its log-sum-exp (`L·n·heads·d` and
    /// `L·b·heads·seq` f32, in place of one layer's). The backward's recomputation
    /// then runs only the norms and the adapters' `z`: no q/k/v product, RoPE,
    /// attention forward (the costliest part of the recomputation at long rows) or
    /// o projection (selective recomputation, for when memory allows; the results
    /// are identical).
    pub save_attention_residual: bool,
    /// Keep the gate/up output (after its LoRA; `n·2I` elements per layer, the
    /// largest activation of a layer) of the first `kept_mlp_layers` layers
    /// ([`ALL_LAYERS`]: every layer's) from the forward: the backward then does not
    /// recompute their gate/up product, the costliest GEMM of the recomputation
    /// (the results are identical). Between none and all, a GPU with room for some
    /// layers' outputs recomputes only the others'.
    pub kept_mlp_layers: usize,
    /// Keep the gradient checkpoints (each layer's input, `L·n·h` elements: 16 GiB
    /// for a 7B model at 64k tokens) in page-locked host memory instead of on the
    /// device, with a ring of [`OFFLOAD_RING`] layer inputs on the device; the
    /// copies overlap the compute on a side stream (the results are identical).
    pub offload_layer_inputs: bool,
    /// Run the frozen weights' products (forward, recomputation and input
    /// gradients) on the FP8 tensor cores: E4M3 codes with one scale per token of
    /// the input and per output channel of the weight (per input channel for the
    /// input gradient), f32 accumulation, scales applied in the GEMM's epilogue.
    /// LoRA, norms, attention and the loss stay in the compute type. Compute
    /// capability 8.9+ (the CPU runs the same arithmetic as a reference); the
    /// results differ from the compute type's by the FP8 rounding (see
    /// `qtrain_device::ops::fp8`).
    pub fp8_base: bool,
    /// The attention backward's kernels on the GPU ([`AttnBackward`]): the split pair
    /// (default, bit-reproducible), or one fused pass over K/V with dQ summed in a fixed
    /// order (bit-reproducible) or with atomics (not): two products in seven fewer,
    /// `n · (heads + 2 · kv_heads) · head_dim` f32 more memory.
    pub attention_backward: AttnBackward,
    /// Keep every layer's dequantized frozen weights (`L·` a layer's weights in the
    /// compute type: 13 GiB for Mistral-7B in bf16) instead of dequantizing each
    /// group into one shared buffer whenever it is used: after a workspace's first
    /// step no NF4 dequantization runs (the frozen weights never change, so the
    /// results are identical). No effect with `fp8_base`.
    pub keep_dequantized_base: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            mlp_chunk: 8192,
            ce_chunk: 1024,
            save_attention_residual: false,
            kept_mlp_layers: 0,
            offload_layer_inputs: false,
            fp8_base: false,
            attention_backward: AttnBackward::Split,
            keep_dequantized_base: false,
        }
    }
}

/// The preallocated buffers of one micro-batch size.
struct Workspace<T: Float> {
    /// With `offload_layer_inputs`: the host copies of the layer inputs (and of the
    /// kept attention half). Declared first so it is dropped first: its drop waits
    /// for the side streams' copies, which read and write the rings below.
    offload: Option<Offload<T>>,
    layout: WorkspaceLayout,
    /// Every layer's input, or (offloaded) the ring of `OFFLOAD_RING` of them.
    layer_inputs: DBuf<T>,
    final_hidden: DBuf<T>,
    h1: DBuf<T>,
    inv1: DBuf<f32>,
    /// q/k/v (and with q/k norms `qk_normed`, `qk_inv` below), the attention
    /// output and its log-sum-exp: one layer's, or with `save_attention_residual`
    /// every layer's (`qkv_outputs`, ..., `attn_outputs`, `lse_outputs`), kept from
    /// the forward for the backward (`attn_per_layer`).
    qkv: DBuf<T>,
    attn: DBuf<T>,
    lse: DBuf<f32>,
    attn_per_layer: bool,
    /// The residual after attention: one layer's, or with `save_attention_residual`
    /// every layer's (`attn_residuals`), like `attn`.
    x2: DBuf<T>,
    inv2: DBuf<f32>,
    h2: DBuf<T>,
    dres: DBuf<T>,
    dh: DBuf<T>,
    dattn: DBuf<T>,
    dqkv: DBuf<T>,
    attn_scratch: DBuf<f32>,
    gu: GateUp<T>,
    m: DBuf<T>,
    dm: DBuf<T>,
    /// One layer's dequantized weight groups, at [`weight_group_offsets`]; or
    /// every layer's (`keep_dequantized_base`), layer `l`'s at `l · weights_stride`.
    weights: DBuf<T>,
    /// `(offset, out, in)` of each group in a layer's part of `weights`
    /// (`Group::ALL` order).
    weight_groups: [(usize, usize, usize); 4],
    /// Elements between two layers' parts of `weights`: 0 when they share one.
    weights_stride: usize,
    /// With every layer's weights kept: whether layer `l`'s group `g` is in place
    /// yet (index `4·l + g`); empty otherwise.
    weights_kept: Vec<Cell<bool>>,
    ce_hidden: DBuf<T>,
    logits: DBuf<f32>,
    dlogits: DBuf<T>,
    ce_dhidden: DBuf<T>,
    /// The adapters' `z` of one layer, or with either half kept every layer's
    /// (`z_outputs`, `z_per_layer`), kept from the forward for the backward.
    z: DBuf<T>,
    z_per_layer: bool,
    dz: DBuf<T>,
    /// Every layer's stacked `A`s of q/k/v and gate/up (see [`Ctx::stacked`]).
    lora_a_stacks: DBuf<T>,
    ids: DBuf<u32>,
    rope_cos: DBuf<f32>,
    rope_sin: DBuf<f32>,
    positions: DBuf<u32>,
    rope_table_cos: DBuf<f32>,
    rope_table_sin: DBuf<f32>,
    segments: DBuf<u32>,
    ce_rows: DBuf<u32>,
    ce_targets: DBuf<i32>,
    losses: DBuf<f32>,
    /// With q/k norms: q and k after the norm and RoPE, and each head's inverse RMS.
    qk_normed: Option<DBuf<T>>,
    qk_inv: Option<DBuf<f32>>,
    /// With `fp8_base`: the FP8 codes and scales.
    fp8: Option<Fp8Buffers>,
}

/// FP8 codes of one layer's weights (per group, both orientations) and of one
/// product input, with their scales (`qtrain_device::ops::fp8`).
struct Fp8Buffers {
    /// Rows of each group's weight `[out, in]` (forward products).
    w: [DBuf<u8>; 4],
    /// Each group's transposed weight `[in, out]` (input gradients).
    wt: [DBuf<u8>; 4],
    /// Per group: `out` scales of `w`, then `in` scales of `wt`.
    scales: DBuf<f32>,
    /// Offsets of each group's scales in `scales`.
    scale_at: [usize; 4],
    input: DBuf<u8>,
    input_scales: DBuf<f32>,
    /// The layer whose weight group `g` is in `wt[g]` (quantized on the first input
    /// gradient after the group was dequantized; the MLP's chunks reuse it).
    wt_layer: std::cell::Cell<[Option<usize>; 4]>,
}

impl Fp8Buffers {
    fn new(dev: &Dev, p: &WorkspaceLayout, groups: [(usize, usize); 4]) -> Result<Self> {
        let mut scale_at = [0; 4];
        let mut at = 0;
        for (g, (o, i)) in groups.iter().enumerate() {
            scale_at[g] = at;
            at += o + i;
        }
        let named = |name: &str| dev.zeros::<u8>(p.elems(name), "engine buffer (FP8 codes)");
        Ok(Self {
            w: [
                named(FP8_WEIGHTS[0][0])?,
                named(FP8_WEIGHTS[1][0])?,
                named(FP8_WEIGHTS[2][0])?,
                named(FP8_WEIGHTS[3][0])?,
            ],
            wt: [
                named(FP8_WEIGHTS[0][1])?,
                named(FP8_WEIGHTS[1][1])?,
                named(FP8_WEIGHTS[2][1])?,
                named(FP8_WEIGHTS[3][1])?,
            ],
            scales: dev.zeros(
                p.elems("fp8_weight_scales"),
                "engine buffer fp8_weight_scales",
            )?,
            scale_at,
            input: named("fp8_input")?,
            input_scales: dev.zeros(
                p.elems("fp8_input_scales"),
                "engine buffer fp8_input_scales",
            )?,
            wt_layer: std::cell::Cell::new([None; 4]),
        })
    }

    /// Group `g`'s weight codes `[o, i]` (rows) and their `o` scales.
    fn rows(&self, g: Group, o: usize, i: usize) -> (Mat<'_, u8>, View<'_, f32>) {
        let k = g.index();
        (mat(&self.w[k], o, i), self.scales.view(self.scale_at[k], o))
    }

    /// Group `g`'s transposed weight codes `[i, o]` and their `i` scales.
    fn transposed(&self, g: Group, o: usize, i: usize) -> (Mat<'_, u8>, View<'_, f32>) {
        let k = g.index();
        (
            mat(&self.wt[k], i, o),
            self.scales.view(self.scale_at[k] + o, i),
        )
    }

    /// Room for one product input `[rows, cols]` and its `rows` scales.
    fn input(&self, rows: usize, cols: usize) -> (Mat<'_, u8>, View<'_, f32>) {
        (
            mat(&self.input, rows, cols),
            self.input_scales.view(0, rows),
        )
    }

    /// Forgets which layer's transposed codes group `g` holds (its weight buffer
    /// was just rewritten).
    fn invalidate(&self, g: Group) {
        let mut wl = self.wt_layer.get();
        wl[g.index()] = None;
        self.wt_layer.set(wl);
    }
}

/// The host side of the offloaded checkpoints: one [`HostStage`] per buffer of
/// [`OFFLOADED`] that the layout has. The layer inputs travel on their own clock
/// (written by the previous layer); the attention half's buffers (kept with
/// `save_attention_residual`) are written by the layer's own attention half and
/// travel together.
struct Offload<T: Float> {
    inputs: HostStage<T>,
    /// The attention half's compute-type buffers, by device buffer name.
    half: Vec<(&'static str, HostStage<T>)>,
    /// Its f32 statistics (log-sum-exp; Qwen 3's q/k inverse RMS), by name.
    half_stats: Vec<(&'static str, HostStage<f32>)>,
}

impl<T: Float> Offload<T> {
    fn new(dev: &Dev, layout: &WorkspaceLayout) -> Result<Option<Self>> {
        let mut inputs = None;
        let (mut half, mut half_stats) = (Vec::new(), Vec::new());
        for (device, host) in OFFLOADED {
            let Some(b) = layout.host_buffers.iter().find(|b| b.name == host) else {
                continue;
            };
            let what = "offloaded gradient checkpoints";
            match device {
                "layer_inputs" => inputs = Some(HostStage::new(dev, b.elems, OFFLOAD_RING, what)?),
                "lse_outputs" | "qk_inv_outputs" => {
                    half_stats.push((device, HostStage::new(dev, b.elems, OFFLOAD_RING, what)?))
                }
                _ => half.push((device, HostStage::new(dev, b.elems, OFFLOAD_RING, what)?)),
            }
        }
        Ok(inputs.map(|inputs| Self {
            inputs,
            half,
            half_stats,
        }))
    }
}

/// Where the gate/up output lives: the first `layers` layers' kept from the forward
/// (`kept_mlp_layers`; a chunk is then a row block of its layer's), the other
/// layers' in one token chunk's buffer, recomputed in the backward.
struct GateUp<T: Float> {
    /// The first `layers` layers' outputs, kept from the forward.
    kept: Option<DBuf<T>>,
    layers: usize,
    /// One chunk's, for the other layers (recomputed in the backward).
    chunk: Option<DBuf<T>>,
}

impl<T: Float> Workspace<T> {
    fn new(dev: &Dev, cfg: &ModelConfig, layout: WorkspaceLayout) -> Result<Self> {
        let p = &layout;
        macro_rules! buf {
            ($name:literal) => {
                dev.zeros(p.elems($name), concat!("engine buffer ", $name))?
            };
        }
        let has = |name: &str| p.buffers.iter().any(|b| b.name == name);
        // The per-layer buffer when the layout keeps it (`save_attention_residual`),
        // else the one layer's: same role either way.
        macro_rules! kept_or {
            ($kept:literal, $one:literal) => {
                if has($kept) {
                    buf!($kept)
                } else {
                    buf!($one)
                }
            };
        }
        let offload = Offload::new(dev, p)?;
        let keep_base = p.shape.keeps_dequantized_base();
        let fp8 = if p.shape.fp8_base {
            Some(Fp8Buffers::new(dev, p, weight_group_shapes(cfg))?)
        } else {
            None
        };
        Ok(Self {
            offload,
            fp8,
            // With q/k norms only (Qwen 3).
            qk_normed: if cfg.has_qk_norm() {
                Some(kept_or!("qk_normed_outputs", "qk_normed"))
            } else {
                None
            },
            qk_inv: if cfg.has_qk_norm() {
                Some(kept_or!("qk_inv_outputs", "qk_inv"))
            } else {
                None
            },
            layer_inputs: buf!("layer_inputs"),
            final_hidden: buf!("final_hidden"),
            h1: buf!("h1"),
            inv1: buf!("inv1"),
            qkv: kept_or!("qkv_outputs", "qkv"),
            attn: kept_or!("attn_outputs", "attn"),
            lse: kept_or!("lse_outputs", "lse"),
            attn_per_layer: has("attn_outputs"),
            x2: kept_or!("attn_residuals", "x2"),
            inv2: buf!("inv2"),
            h2: buf!("h2"),
            dres: buf!("dres"),
            dh: buf!("dh"),
            dattn: buf!("dattn"),
            dqkv: buf!("dqkv"),
            attn_scratch: buf!("attn_scratch"),
            gu: GateUp {
                kept: if has("mlp_activations") {
                    Some(buf!("mlp_activations"))
                } else {
                    None
                },
                layers: p.shape.kept_mlp_layers(cfg),
                chunk: if has("gu") { Some(buf!("gu")) } else { None },
            },
            m: buf!("m"),
            dm: buf!("dm"),
            weights: buf!("weights"),
            weight_groups: {
                let (offsets, shapes) = (
                    weight_group_offsets(cfg, keep_base),
                    weight_group_shapes(cfg),
                );
                std::array::from_fn(|i| (offsets[i], shapes[i].0, shapes[i].1))
            },
            weights_stride: if keep_base {
                layer_weight_elems(cfg)
            } else {
                0
            },
            weights_kept: if keep_base {
                (0..4 * cfg.num_hidden_layers)
                    .map(|_| Cell::new(false))
                    .collect()
            } else {
                Vec::new()
            },
            ce_hidden: buf!("ce_hidden"),
            logits: buf!("logits"),
            dlogits: buf!("dlogits"),
            ce_dhidden: buf!("ce_dhidden"),
            z: kept_or!("z_outputs", "z"),
            z_per_layer: has("z_outputs"),
            dz: buf!("dz"),
            lora_a_stacks: buf!("lora_a_stacks"),
            ids: buf!("ids"),
            rope_cos: buf!("rope_cos"),
            rope_sin: buf!("rope_sin"),
            positions: buf!("positions"),
            rope_table_cos: buf!("rope_table_cos"),
            rope_table_sin: buf!("rope_table_sin"),
            segments: buf!("segments"),
            ce_rows: buf!("ce_rows"),
            ce_targets: buf!("ce_targets"),
            losses: buf!("losses"),
            layout,
        })
    }
}

/// Shapes of the current micro-batch, derived once.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    h: usize,
    d: usize,
    qcols: usize,
    kvcols: usize,
    qc: usize,
    inter: usize,
    vocab: usize,
    chunk: usize,
    attn: AttnShape,
}

/// The fused forward/backward of one model, for compute type `T` (bf16 on GPUs,
/// f32 on the CPU).
pub struct Engine<T: Float> {
    dev: Dev,
    cfg: ModelConfig,
    frozen: FrozenWeights<T>,
    lora: DeviceLora<T>,
    opts: EngineOptions,
    ws: Option<Workspace<T>>,
    /// `Some((seed, micro_step))` while a training pass with dropout runs.
    dropout_key: Option<(u64, u64)>,
}

impl<T: Float + candle_core::WithDType> Engine<T> {
    /// Builds the engine over `base` (its device and dtype decide where and in what
    /// the engine computes) with the adapters `lora` copied to the device.
    pub fn new(base: &BaseModel, lora: &LoraWeights, opts: EngineOptions) -> Result<Self> {
        let dev = Dev::from_candle(&base.device)?;
        let cfg = base.config.clone();
        if !cfg.head_dim().is_multiple_of(2) {
            return Err(EngineError::Unsupported(format!(
                "odd head_dim {}",
                cfg.head_dim()
            )));
        }
        let frozen = FrozenWeights::from_base(&dev, base)?;
        if let Some(l) = frozen
            .layers
            .iter()
            .position(|l| l.qk_norm.is_some() != cfg.has_qk_norm())
        {
            return Err(EngineError::Unsupported(format!(
                "layer {l}: q/k norm weights {} but model_type {} {} them",
                if cfg.has_qk_norm() {
                    "missing"
                } else {
                    "present"
                },
                cfg.model_type,
                if cfg.has_qk_norm() {
                    "has"
                } else {
                    "does not have"
                },
            )));
        }
        let lora = DeviceLora::new(&dev, lora, &cfg)?;
        Ok(Self {
            dev,
            cfg,
            frozen,
            lora,
            opts,
            ws: None,
            dropout_key: None,
        })
    }
}

impl<T: Float> Engine<T> {
    pub fn device(&self) -> &Dev {
        &self.dev
    }

    pub fn lora(&self) -> &DeviceLora<T> {
        &self.lora
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The workspace layout for a micro-batch of `batch x seq` tokens.
    pub fn options(&self) -> EngineOptions {
        self.opts
    }

    /// Changes the options; the workspace is sized anew (and reallocated if its
    /// buffers change) at the next pass.
    pub fn set_options(&mut self, opts: EngineOptions) {
        self.opts = opts;
    }

    pub fn workspace_layout(&self, batch: usize, seq: usize) -> WorkspaceLayout {
        WorkspaceLayout::new(
            &self.cfg,
            WorkspaceShape::for_micro_batch(
                &self.opts,
                self.lora.layout.rank,
                std::mem::size_of::<T>(),
                batch,
                seq,
            ),
        )
    }

    /// Bytes held by the workspace (0 before the first step).
    pub fn workspace_bytes(&self) -> usize {
        self.ws.as_ref().map_or(0, |w| w.layout.total_bytes())
    }

    fn ensure_workspace(&mut self, batch: usize, seq: usize) -> Result<()> {
        let layout = self.workspace_layout(batch, seq);
        let fits = self.ws.as_ref().is_some_and(|w| {
            w.layout.shape.batch == batch
                && w.layout.shape.seq == seq
                && w.layout.shape == layout.shape
        });
        if !fits {
            if self.opts.fp8_base {
                qtrain_device::ops::fp8::support(&self.dev).map_err(|why| {
                    EngineError::Unsupported(format!("FP8 products of the frozen base: {why}"))
                })?;
            }
            // Free the old buffers before taking the new ones.
            self.ws = None;
            let ws = Workspace::new(&self.dev, &self.cfg, layout)?;
            // RoPE of every position a row of `seq` tokens can hold, once: a batch
            // then only uploads its position ids (computing its tables on the host
            // took milliseconds per step, with the GPU idle).
            let positions: Vec<u32> = (0..seq as u32).collect();
            let (cos, sin) = rope_tables(&self.cfg, &positions)?;
            self.dev.write(ws.rope_table_cos.all(), &cos)?;
            self.dev.write(ws.rope_table_sin.all(), &sin)?;
            self.ws = Some(ws);
        }
        Ok(())
    }

    fn dims(&self, batch: &TokenBatch) -> Dims {
        let c = &self.cfg;
        let d = c.head_dim();
        let (heads, kv) = (c.num_attention_heads, c.num_kv_heads());
        let n = batch.num_tokens();
        Dims {
            n,
            h: c.hidden_size,
            d,
            qcols: heads * d,
            kvcols: kv * d,
            qc: (heads + 2 * kv) * d,
            inter: c.intermediate_size,
            vocab: c.vocab_size,
            chunk: self.opts.mlp_chunk.min(n).max(1),
            attn: AttnShape {
                batch: batch.batch_size,
                seq: batch.seq_len,
                heads,
                kv_heads: kv,
                head_dim: d,
                window: c.sliding_window,
                scale: (1.0 / (d as f64).sqrt()) as f32,
            },
        }
    }

    /// One micro-batch of a training step: adds the LoRA gradients of
    /// `loss_sum / loss_denominator` into the gradient buffer and returns the summed
    /// loss; the same contract as `qtrain_reference::forward_backward`.
    pub fn forward_backward(
        &mut self,
        batch: &TokenBatch,
        opts: &StepOptions,
        loss_denominator: f64,
    ) -> Result<StepLoss> {
        if !(loss_denominator > 0.0 && loss_denominator.is_finite()) {
            return Err(EngineError::LossDenominator(loss_denominator));
        }
        self.dropout_key =
            (self.lora.layout.dropout > 0.0).then_some((opts.dropout_seed, opts.micro_step));
        let r = self.run(batch, Some(1.0 / loss_denominator));
        self.dropout_key = None;
        r
    }

    /// The summed loss without gradients or dropout (evaluation).
    pub fn forward_loss(&mut self, batch: &TokenBatch) -> Result<StepLoss> {
        self.dropout_key = None;
        self.run(batch, None)
    }

    fn run(&mut self, batch: &TokenBatch, grad_scale: Option<f64>) -> Result<StepLoss> {
        batch.validate(self.cfg.vocab_size)?;
        self.ensure_workspace(batch.batch_size, batch.seq_len)?;
        let dims = self.dims(batch);
        let ws = self.ws.as_ref().expect("workspace");
        let has_segments = upload_batch(&self.dev, ws, batch, &self.cfg)?;
        let targets = batch.shifted_targets();
        let rows: Vec<u32> = (0..targets.len() as u32)
            .filter(|&i| targets[i as usize] != IGNORE_INDEX)
            .collect();
        let nv = rows.len();
        let tgt: Vec<i32> = rows.iter().map(|&i| targets[i as usize] as i32).collect();
        if nv > 0 {
            self.dev.write(ws.ce_rows.view(0, nv), &rows)?;
            self.dev.write(ws.ce_targets.view(0, nv), &tgt)?;
        }
        self.lora.refresh(&self.dev)?;
        let ctx = Ctx {
            dev: &self.dev,
            cfg: &self.cfg,
            w: &self.frozen,
            lora: &self.lora,
            ws,
            dims,
            segments: has_segments.then(|| ws.segments.view(0, dims.n)),
            dropout_key: self.dropout_key,
        };
        let train = grad_scale.is_some();
        ctx.fill_a_stacks()?;
        {
            let _r = self.dev.region("[pass] forward");
            ctx.forward(train)?;
        }
        let scale = grad_scale.unwrap_or(0.0) as f32;
        ctx.loss(nv, train.then_some(scale))?;
        if train && nv > 0 {
            let _r = self.dev.region("[pass] backward");
            ctx.backward()?;
        }
        // Read after the backward is queued: the host never waits for the forward
        // (a download synchronizes), so the GPU goes straight on to the backward.
        let losses = self.dev.download(ws.losses.view(0, nv))?;
        Ok(StepLoss {
            loss_sum: losses.iter().map(|&x| x as f64).sum(),
            valid_tokens: nv,
        })
    }
}

/// `(cos, sin)`, each `[positions, head_dim / 2]` f32, of the model's RoPE variant
/// (`qtrain_model::rope`, where the reference decoder's tables come from too, in
/// transformers' f32 arithmetic; yarn's attention scaling is in the values). The
/// kernel rotates the pair `(x_i, x_{i + d/2})` by one angle, so half a row is all
/// it reads.
fn rope_tables(cfg: &ModelConfig, positions: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
    let spec = cfg
        .rope()
        .map_err(|e| EngineError::Unsupported(e.to_string()))?;
    let t = spec.tables(positions, qtrain_model::RopePrecision::F32);
    let (d, half) = (t.head_dim, t.head_dim / 2);
    let first_halves = |v: &[f64]| -> Vec<f32> {
        v.chunks(d)
            .flat_map(|row| row[..half].iter().map(|&x| x as f32))
            .collect()
    };
    Ok((first_halves(&t.cos), first_halves(&t.sin)))
}

/// Uploads ids, RoPE tables and (when a row packs several documents) segment ids.
/// Returns whether segment masking is needed.
fn upload_batch<T: Float>(
    dev: &Dev,
    ws: &Workspace<T>,
    batch: &TokenBatch,
    cfg: &ModelConfig,
) -> Result<bool> {
    let n = batch.num_tokens();
    let d = cfg.head_dim();
    dev.write(ws.ids.view(0, n), &batch.input_ids)?;
    let (cos, sin) = (
        ws.rope_cos.view(0, n * d / 2).mat(n, d / 2, d / 2),
        ws.rope_sin.view(0, n * d / 2).mat(n, d / 2, d / 2),
    );
    let table_rows = ws.layout.shape.seq;
    if batch
        .position_ids
        .iter()
        .all(|&p| (p as usize) < table_rows)
    {
        let pos = ws.positions.view(0, n);
        dev.write(pos, &batch.position_ids)?;
        let half = d / 2;
        let tc = ws.rope_table_cos.view(0, table_rows * half);
        let ts = ws.rope_table_sin.view(0, table_rows * half);
        gather_rows(dev, tc.mat(table_rows, half, half), pos, cos)?;
        gather_rows(dev, ts.mat(table_rows, half, half), pos, sin)?;
    } else {
        // Positions past the row length (position ids given by the caller): the
        // tables of exactly these positions.
        let (c, s) = rope_tables(cfg, &batch.position_ids)?;
        dev.write(cos.v, &c)?;
        dev.write(sin.v, &s)?;
    }
    let rows = || batch.segment_ids.chunks(batch.seq_len.max(1));
    let packed = rows().any(|row| row.iter().any(|&s| s != row[0]));
    // The attention kernels skip the key tiles of other documents by binary search over
    // the ids, which needs each document to be one run with ids rising along the row
    // (as the data pipeline packs them).
    for (r, row) in rows().enumerate() {
        if let Some(t) = row.windows(2).position(|w| w[1] < w[0]) {
            return Err(EngineError::Unsupported(format!(
                "segment ids must not decrease along a row (one run per packed document): \
                 row {r} goes from {} to {} at position {}",
                row[t],
                row[t + 1],
                t + 1
            )));
        }
    }
    if packed {
        dev.write(ws.segments.view(0, n), &batch.segment_ids)?;
    }
    Ok(packed)
}

/// A group of adapters that run as one product over their shared input
/// ([`Ctx::stacked`]).
struct Stacked<'a, T: Float> {
    /// The group's projections in stacking order (adapted or not).
    group: &'static [Proj],
    /// How many of them carry an adapter in this layer.
    count: usize,
    /// The asked projection's place among the adapted ones.
    index: usize,
    /// `[A_p; …]`: `[count·r, h]`.
    a: Mat<'a, T>,
}

/// Everything one pass reads.
struct Ctx<'a, T: Float> {
    dev: &'a Dev,
    cfg: &'a ModelConfig,
    w: &'a FrozenWeights<T>,
    lora: &'a DeviceLora<T>,
    ws: &'a Workspace<T>,
    dims: Dims,
    segments: Option<View<'a, u32>>,
    dropout_key: Option<(u64, u64)>,
}

/// `rows x cols` contiguous matrix at the start of `buf`.
fn mat<T: qtrain_device::Elem>(buf: &DBuf<T>, rows: usize, cols: usize) -> Mat<'_, T> {
    slot_mat(buf, 0, rows, cols)
}

/// Slot `slot` of `buf` seen as consecutive contiguous `rows x cols` matrices (one
/// per layer, or per ring slot).
fn slot_mat<T: qtrain_device::Elem>(
    buf: &DBuf<T>,
    slot: usize,
    rows: usize,
    cols: usize,
) -> Mat<'_, T> {
    buf.view(slot * rows * cols, rows * cols)
        .mat(rows, cols, cols)
}

impl<'a, T: Float> Ctx<'a, T> {
    /// Where layer `l`'s input lives on the device: its own slot, or (offloaded)
    /// slot `l % OFFLOAD_RING` of the ring.
    fn layer_input(&self, l: usize) -> Mat<'a, T> {
        slot_mat(
            &self.ws.layer_inputs,
            self.slot_of(l),
            self.dims.n,
            self.dims.h,
        )
    }

    fn slot_of(&self, l: usize) -> usize {
        match self.ws.offload {
            Some(_) => l % OFFLOAD_RING,
            None => l,
        }
    }

    /// With offloading, whether layer `l`'s checkpoints go through the host: all but
    /// the last `OFFLOAD_RING` layers' (those are still in the ring when the
    /// backward starts). Layer `l`'s host copy of a buffer starts at `l` times the
    /// buffer's elements per layer.
    fn travels(&self, l: usize) -> Option<&'a Offload<T>> {
        let layers = self.cfg.num_hidden_layers;
        self.ws
            .offload
            .as_ref()
            .filter(|_| l + OFFLOAD_RING < layers)
    }

    /// The device ring of an offloaded compute-type buffer of the attention half.
    fn half_ring(&self, name: &str) -> &'a DBuf<T> {
        let ws = self.ws;
        match name {
            "qkv_outputs" => &ws.qkv,
            "attn_outputs" => &ws.attn,
            "attn_residuals" => &ws.x2,
            "qk_normed_outputs" => ws.qk_normed.as_ref().expect("q/k norms"),
            _ => unreachable!("{name} is not an offloaded buffer"),
        }
    }

    /// The device ring of an offloaded f32 buffer of the attention half.
    fn half_stats_ring(&self, name: &str) -> &'a DBuf<f32> {
        let ws = self.ws;
        match name {
            "lse_outputs" => &ws.lse,
            "qk_inv_outputs" => ws.qk_inv.as_ref().expect("q/k norms"),
            _ => unreachable!("{name} is not an offloaded buffer"),
        }
    }

    /// Slot `l`'s part of ring `buf` and the host offset of layer `l`'s copy.
    fn ring_part<U: qtrain_device::Elem>(
        &self,
        buf: &'a DBuf<U>,
        l: usize,
    ) -> (View<'a, U>, usize) {
        let per_layer = buf.len() / OFFLOAD_RING;
        (
            buf.view(self.slot_of(l) * per_layer, per_layer),
            l * per_layer,
        )
    }

    /// Forward, after layer `l`'s input is written: queues its copy to the host.
    fn save_input(&self, l: usize) -> Result<()> {
        if let Some(o) = self.travels(l) {
            let (v, at) = self.ring_part(&self.ws.layer_inputs, l);
            o.inputs.save(v, at, self.slot_of(l))?;
        }
        Ok(())
    }

    /// Forward, after layer `l`'s attention half: queues the copies of what it
    /// keeps (nothing unless `save_attention_residual`).
    fn save_half(&self, l: usize) -> Result<()> {
        if let Some(o) = self.travels(l) {
            for (name, stage) in &o.half {
                let (v, at) = self.ring_part(self.half_ring(name), l);
                stage.save(v, at, self.slot_of(l))?;
            }
            for (name, stage) in &o.half_stats {
                let (v, at) = self.ring_part(self.half_stats_ring(name), l);
                stage.save(v, at, self.slot_of(l))?;
            }
        }
        Ok(())
    }

    /// Forward, before layer `l`'s input is written: the slot's previous layer
    /// (`l - OFFLOAD_RING`) must have finished its copy to the host.
    fn before_writing_input(&self, l: usize) -> Result<()> {
        if let Some(o) = l.checked_sub(OFFLOAD_RING).and_then(|p| self.travels(p)) {
            let _r = self.dev.region("checkpoint offload: wait for the copy out");
            o.inputs.wait_saved(self.slot_of(l))?;
        }
        Ok(())
    }

    /// Forward, before layer `l`'s attention half writes its kept slot: the slot's
    /// previous layer must have finished its copies to the host.
    fn before_writing_half(&self, l: usize) -> Result<()> {
        if let Some(o) = l.checked_sub(OFFLOAD_RING).and_then(|p| self.travels(p)) {
            let _r = self.dev.region("checkpoint offload: wait for the copy out");
            for (_, stage) in &o.half {
                stage.wait_saved(self.slot_of(l))?;
            }
            for (_, stage) in &o.half_stats {
                stage.wait_saved(self.slot_of(l))?;
            }
        }
        Ok(())
    }

    /// Backward, before layer `l`'s: queues the copies of layer `l - 1`'s
    /// checkpoints back into their slots (whose last reader, layer `l - 1 +
    /// OFFLOAD_RING`'s backward, is queued already), to run during layer `l`'s
    /// backward.
    fn prefetch_input(&self, l: usize) -> Result<()> {
        let Some(p) = l.checked_sub(1) else {
            return Ok(());
        };
        if let Some(o) = self.travels(p) {
            let (v, at) = self.ring_part(&self.ws.layer_inputs, p);
            o.inputs.load(v, at, self.slot_of(p))?;
            for (name, stage) in &o.half {
                let (v, at) = self.ring_part(self.half_ring(name), p);
                stage.load(v, at, self.slot_of(p))?;
            }
            for (name, stage) in &o.half_stats {
                let (v, at) = self.ring_part(self.half_stats_ring(name), p);
                stage.load(v, at, self.slot_of(p))?;
            }
        }
        Ok(())
    }

    /// Backward, before layer `l`'s: its checkpoints must be back in their slots.
    fn await_input(&self, l: usize) -> Result<()> {
        if let Some(o) = self.travels(l) {
            let _r = self.dev.region("checkpoint offload: wait for the copy in");
            let slot = self.slot_of(l);
            o.inputs.wait_loaded(slot)?;
            for (_, stage) in &o.half {
                stage.wait_loaded(slot)?;
            }
            for (_, stage) in &o.half_stats {
                stage.wait_loaded(slot)?;
            }
        }
        Ok(())
    }

    /// Where the gate/up output of tokens `c0..c0 + cn` of layer `l` lives: its rows
    /// of the kept activations, or the one chunk buffer (recomputed in the backward).
    fn gu_chunk(&self, l: usize, c0: usize, cn: usize) -> Mat<'a, T> {
        let (n, w) = (self.dims.n, 2 * self.dims.inter);
        let gu = &self.ws.gu;
        match (&gu.kept, &gu.chunk) {
            (Some(b), _) if l < gu.layers => b.view((l * n + c0) * w, cn * w).mat(cn, w, w),
            (_, Some(g)) => mat(g, cn, w),
            _ => unreachable!("layer {l}'s gate/up output has no buffer"),
        }
    }

    /// Whether layer `l`'s gate/up output was kept from the forward.
    fn gu_kept(&self, l: usize) -> bool {
        l < self.ws.gu.layers
    }

    /// The residual after layer `l`'s attention: its kept slot, or the one shared
    /// buffer (recomputed in the backward).
    fn x2(&self, l: usize) -> Mat<'a, T> {
        slot_mat(&self.ws.x2, self.kept_layer(l), self.dims.n, self.dims.h)
    }

    /// The slot of layer `l` in the attention half's buffers: its own (or with
    /// offloading its ring slot, like its input's) when they are kept per layer
    /// (`save_attention_residual`), else 0 (one layer's, recomputed in the
    /// backward).
    fn kept_layer(&self, l: usize) -> usize {
        if self.ws.attn_per_layer {
            self.slot_of(l)
        } else {
            0
        }
    }

    /// Layer `l`'s fused q/k/v `[n, qc]`: its kept slot, or the one shared buffer.
    fn qkv(&self, l: usize) -> Mat<'a, T> {
        slot_mat(&self.ws.qkv, self.kept_layer(l), self.dims.n, self.dims.qc)
    }

    /// Layer `l`'s attention output and log-sum-exp: its kept slots, or the one
    /// shared pair (recomputed in the backward).
    fn attn_out(&self, l: usize) -> (Mat<'a, T>, View<'a, f32>) {
        let d = &self.dims;
        let s = d.attn.stats_len();
        let l = self.kept_layer(l);
        (
            slot_mat(&self.ws.attn, l, d.n, d.qcols),
            self.ws.lse.view(l * s, s),
        )
    }

    /// Output of layer `l`: the next layer's input, or the final hidden state.
    fn layer_output(&self, l: usize) -> Mat<'a, T> {
        if l + 1 < self.cfg.num_hidden_layers {
            self.layer_input(l + 1)
        } else {
            mat(&self.ws.final_hidden, self.dims.n, self.dims.h)
        }
    }

    fn group_sizes(&self, g: Group) -> Vec<usize> {
        g.projs()
            .iter()
            .map(|&p| self.cfg.proj_shape(p).iter().product())
            .collect()
    }

    /// The place of layer `l`'s weight group `g` in the `weights` buffer as
    /// `[out, in]` (whatever it holds now: only [`Ctx::weights`] makes it this
    /// layer's group; every layer shares one place unless the base is kept).
    fn weight_buf(&self, l: usize, g: Group) -> Mat<'a, T> {
        let (offset, rows, cols) = self.ws.weight_groups[g.index()];
        self.ws
            .weights
            .view(l * self.ws.weights_stride + offset, rows * cols)
            .mat(rows, cols, cols)
    }

    /// Dequantizes `group` of layer `l` into its buffer and returns it as `[out, in]`
    /// (with the base kept, only the first time). With FP8 products, the weight's
    /// row codes are written too.
    fn weights(&self, l: usize, g: Group) -> Result<Mat<'a, T>> {
        let w = self.weight_buf(l, g);
        let kept = self.ws.weights_kept.get(4 * l + g.index());
        if kept.is_some_and(Cell::get) {
            return Ok(w);
        }
        {
            let _r = self.dev.region("dequantize NF4");
            self.w
                .materialize(self.dev, l, g, &self.group_sizes(g), w.v)?;
        }
        if let Some(k) = kept {
            k.set(true);
        }
        if let Some(f) = &self.ws.fp8 {
            let _r = self.dev.region("FP8 quantize weights");
            let (q, s) = f.rows(g, w.rows, w.cols);
            quantize_rows(self.dev, w, q, s)?;
            f.invalidate(g);
        }
        Ok(w)
    }

    /// `y = x Wᵀ + beta · y` with weight group `g`'s `w` (`[out, in]`): a GEMM in
    /// the compute type, or with FP8 products `x` quantized per token and the
    /// weight's row codes (written by [`Ctx::weights`]).
    fn base_fwd(
        &self,
        x: Mat<'a, T>,
        g: Group,
        w: Mat<'a, T>,
        y: Mat<'a, T>,
        beta: f32,
    ) -> Result<()> {
        let Some(f) = &self.ws.fp8 else {
            return Ok(gemm(self.dev, x, Op::N, w, Op::T, y, 1.0, beta)?);
        };
        let (qx, sx) = f.input(x.rows, x.cols);
        quantize_rows(self.dev, x, qx, sx)?;
        let (qw, sw) = f.rows(g, w.rows, w.cols);
        Ok(gemm_fp8(
            self.dev,
            qx,
            sx,
            qw,
            sw,
            y,
            beta,
            FP8_FAST_ACCUM_FORWARD,
        )?)
    }

    /// `dx = dy W` with weight group `g`'s `w` (holding layer `l`'s): a GEMM in the
    /// compute type, or with FP8 products `dy` quantized per token and the
    /// transposed weight per input channel (quantized once per layer and group,
    /// on first use).
    fn base_dx(
        &self,
        l: usize,
        dy: Mat<'a, T>,
        g: Group,
        w: Mat<'a, T>,
        dx: Mat<'a, T>,
    ) -> Result<()> {
        let Some(f) = &self.ws.fp8 else {
            return Ok(gemm(self.dev, dy, Op::N, w, Op::N, dx, 1.0, 0.0)?);
        };
        let (qt, st) = f.transposed(g, w.rows, w.cols);
        let mut held = f.wt_layer.get();
        if held[g.index()] != Some(l) {
            let _r = self.dev.region("FP8 quantize weights");
            quantize_cols_t(self.dev, w, qt, st)?;
            held[g.index()] = Some(l);
            f.wt_layer.set(held);
        }
        let (qy, sy) = f.input(dy.rows, dy.cols);
        quantize_rows(self.dev, dy, qy, sy)?;
        // No fast accumulation for gradients (as the usual FP8 training recipes).
        Ok(gemm_fp8(self.dev, qy, sy, qt, st, dx, 0.0, false)?)
    }

    /// Adds the frozen biases of group `g` of layer `l` (if it has any) to its
    /// product `y`, before the LoRA terms, as the reference's `x Wᵀ + b + lora`.
    fn bias(&self, l: usize, g: Group, y: Mat<'a, T>) -> Result<()> {
        if let Some(b) = &self.w.layers[l].biases[g.index()] {
            let _r = self.dev.region("bias add");
            add_bias(self.dev, y, b.all())?;
        }
        Ok(())
    }

    fn slot(&self, l: usize, p: Proj) -> Option<&'a PairSlot> {
        self.lora.layout.get(l, p)
    }

    /// `z` of projection `p` of layer `l` for `rows` rows starting at `row0` (MLP
    /// chunks use a sub-range; the attention projections all `n` rows): the layer's
    /// own slot when every layer's is kept, else the one layer's buffer.
    fn z(&self, l: usize, p: Proj, row0: usize, rows: usize) -> Mat<'a, T> {
        let r = self.lora.layout.rank;
        match self.stacked(l, p) {
            Some(st) => self.z_group(l, &st, row0, rows).col_block(st.index * r, r),
            None => self.z_at(l, p.index(), 1, row0, rows),
        }
    }

    /// The `[rows, g·r]` block of `z` (ld `g·r`) that starts at projection slot
    /// `first` of layer `l`'s `P·n·r` elements: one projection's (`g` = 1) or a
    /// stacked group's, over the slots of its members.
    fn z_at(&self, l: usize, first: usize, g: usize, row0: usize, rows: usize) -> Mat<'a, T> {
        let (n, r) = (self.dims.n, self.lora.layout.rank);
        let slot = if self.ws.z_per_layer { l } else { 0 };
        let at = (slot * PROJECTIONS.len() + first) * n * r + row0 * g * r;
        self.ws.z.view(at, rows * g * r).mat(rows, g * r, g * r)
    }

    /// The `z` of a stacked group's adapters side by side.
    fn z_group(&self, l: usize, st: &Stacked<'a, T>, row0: usize, rows: usize) -> Mat<'a, T> {
        self.z_at(l, st.group[0].index(), st.count, row0, rows)
    }

    /// The stacked group of `p` in layer `l`, when its adapters run as one: q/k/v
    /// share the input norm's output, gate/up the post-attention norm's, so with
    /// two or more of a group adapted and no dropout mask (each projection draws
    /// its own), `[z_p …] = x [A_p; …]ᵀ` reads `x` once instead of once per adapter
    /// and `dx += [dz_p …] [A_p; …]` updates `dx` once (`x` is `[n, h]`, each
    /// `z_p` only `[n, r]`: the products are bound by those reads).
    fn stacked(&self, l: usize, p: Proj) -> Option<Stacked<'a, T>> {
        const QKV: &[Proj] = &[Proj::Q, Proj::K, Proj::V];
        const GATE_UP: &[Proj] = &[Proj::Gate, Proj::Up];
        if self.dropout_key.is_some() {
            return None;
        }
        let (group, row_base) = match p {
            Proj::Q | Proj::K | Proj::V => (QKV, 0),
            Proj::Gate | Proj::Up => (GATE_UP, QKV.len()),
            Proj::O | Proj::Down => return None,
        };
        let adapted = |q: &&Proj| self.slot(l, **q).is_some();
        let count = group.iter().filter(adapted).count();
        if count < 2 || self.slot(l, p).is_none() {
            return None;
        }
        let index = group
            .iter()
            .take_while(|&&q| q != p)
            .filter(adapted)
            .count();
        let (r, h) = (self.lora.layout.rank, self.dims.h);
        let at = (l * STACKED_ROWS + row_base) * r * h;
        Some(Stacked {
            group,
            count,
            index,
            a: self
                .ws
                .lora_a_stacks
                .view(at, count * r * h)
                .mat(count * r, h, h),
        })
    }

    /// Copies each layer's adapted `A`s of a group into its stack (after the
    /// compute copy's refresh; nothing without a stacked group).
    fn fill_a_stacks(&self) -> Result<()> {
        let r = self.lora.layout.rank;
        for l in 0..self.cfg.num_hidden_layers {
            for p in PROJECTIONS {
                if let (Some(st), Some(s)) = (self.stacked(l, p), self.slot(l, p)) {
                    debug_assert_eq!(s.in_features, self.dims.h);
                    let dst = st.a.row_block(st.index * r, r);
                    self.dev.copy(self.lora.a(s).v, dst.v)?;
                }
            }
        }
        Ok(())
    }

    /// The hash base of projection `p`'s dropout mask in layer `l` (one mask per
    /// seed, micro-step, layer and projection), or None without dropout.
    fn dropout_base(&self, l: usize, p: Proj) -> Option<u64> {
        self.dropout_key.map(|(seed, micro_step)| {
            dropout_base(DropoutKey {
                seed,
                micro_step,
                layer: l,
                proj: p,
            })
        })
    }

    /// LoRA forward of `(l, p)`: `z = dropout(x) Aᵀ`, and `y += s z Bᵀ` when `y` is
    /// given (the recomputation of the down projection only needs `z`). `x` holds
    /// rows `row0..` of the dropout mask's rows (MLP chunks).
    fn lora_fwd(
        &self,
        l: usize,
        p: Proj,
        x: Mat<'a, T>,
        y: Option<Mat<'a, T>>,
        row0: usize,
    ) -> Result<()> {
        let Some(s) = self.slot(l, p) else {
            return Ok(());
        };
        let _r = self.dev.region("LoRA forward");
        let z = self.z(l, p, row0, x.rows);
        let a = self.lora.a(s);
        match self.dropout_base(l, p) {
            Some(base) => {
                lora_a_fwd_dropout(self.dev, x, a, z, base, row0, self.lora.layout.dropout)?
            }
            None => gemm(self.dev, x, Op::N, a, Op::T, z, 1.0, 0.0)?,
        }
        if let Some(y) = y {
            self.lora_b_fwd(s, z, y)?;
        }
        Ok(())
    }

    /// The B side of an adapter's forward: `y += s z Bᵀ`.
    fn lora_b_fwd(&self, s: &PairSlot, z: Mat<'a, T>, y: Mat<'a, T>) -> Result<()> {
        let b = self.lora.b(s);
        gemm(self.dev, z, Op::N, b, Op::T, y, self.lora.layout.scale, 1.0)?;
        Ok(())
    }

    /// The B side of an adapter's backward: `dB += s dyᵀ z` and `dz = s dy B`.
    fn lora_b_bwd(
        &self,
        s: &PairSlot,
        dy: Mat<'a, T>,
        z: Mat<'a, T>,
        dz: Mat<'a, T>,
    ) -> Result<()> {
        let sc = self.lora.layout.scale;
        gemm(self.dev, dy, Op::T, z, Op::N, self.lora.grad_b(s), sc, 1.0)?;
        gemm(self.dev, dy, Op::N, self.lora.b(s), Op::N, dz, sc, 0.0)?;
        Ok(())
    }

    /// LoRA backward of `(l, p)` given `dy`: accumulates `dA`, `dB` and, when `dx`
    /// is given, adds the branch's input gradient into it.
    fn lora_bwd(
        &self,
        l: usize,
        p: Proj,
        x: Mat<'a, T>,
        dy: Mat<'a, T>,
        dx: Option<Mat<'a, T>>,
        row0: usize,
    ) -> Result<()> {
        let Some(s) = self.slot(l, p) else {
            return Ok(());
        };
        let _r = self.dev.region("LoRA backward");
        let r = self.lora.layout.rank;
        let z = self.z(l, p, row0, x.rows);
        let dz = self.ws.dz.view(0, x.rows * r).mat(x.rows, r, r);
        self.lora_b_bwd(s, dy, z, dz)?;
        let (a, grad_a) = (self.lora.a(s), self.lora.grad_a(s));
        let prob = self.lora.layout.dropout;
        match self.dropout_base(l, p) {
            Some(base) => {
                // dA += dzᵀ dropout(x) ; dx += (dz A) ∘ mask (the mask is a
                // per-element scale), each one pass with the mask drawn in the kernel.
                lora_a_grad_dropout(self.dev, dz, x, grad_a, base, row0, prob)?;
                if let Some(dx) = dx {
                    lora_dx_dropout(self.dev, dz, a, dx, base, row0, prob)?;
                }
            }
            None => {
                gemm(self.dev, dz, Op::T, x, Op::N, grad_a, 1.0, 1.0)?;
                if let Some(dx) = dx {
                    gemm(self.dev, dz, Op::N, a, Op::N, dx, 1.0, 1.0)?;
                }
            }
        }
        Ok(())
    }

    /// LoRA forward of projections sharing the input `x` (q/k/v, or gate/up), each
    /// with its output: one stacked `z` product where [`Self::stacked`] allows,
    /// else each adapter's own.
    fn lora_fwd_shared(
        &self,
        l: usize,
        x: Mat<'a, T>,
        outs: &[(Proj, Mat<'a, T>)],
        row0: usize,
    ) -> Result<()> {
        let Some(st) = outs.iter().find_map(|&(p, _)| self.stacked(l, p)) else {
            for &(p, y) in outs {
                self.lora_fwd(l, p, x, Some(y), row0)?;
            }
            return Ok(());
        };
        let _r = self.dev.region("LoRA forward");
        let z = self.z_group(l, &st, row0, x.rows);
        gemm(self.dev, x, Op::N, st.a, Op::T, z, 1.0, 0.0)?;
        for &(p, y) in outs {
            if let Some(s) = self.slot(l, p) {
                self.lora_b_fwd(s, self.z(l, p, row0, x.rows), y)?;
            }
        }
        Ok(())
    }

    /// LoRA backward of projections sharing the input `x`, each with its output's
    /// gradient: `dA`, `dB` per adapter, and the input gradient into `dx` (when
    /// given) as one product over the stacked group where [`Self::stacked`] allows.
    fn lora_bwd_shared(
        &self,
        l: usize,
        x: Mat<'a, T>,
        dys: &[(Proj, Mat<'a, T>)],
        dx: Option<Mat<'a, T>>,
        row0: usize,
    ) -> Result<()> {
        let Some(st) = dys.iter().find_map(|&(p, _)| self.stacked(l, p)) else {
            for &(p, dy) in dys {
                self.lora_bwd(l, p, x, dy, dx, row0)?;
            }
            return Ok(());
        };
        let _r = self.dev.region("LoRA backward");
        let (r, rows) = (self.lora.layout.rank, x.rows);
        let g = st.count * r;
        let dz_all = self.ws.dz.view(0, rows * g).mat(rows, g, g);
        for &(p, dy) in dys {
            let (Some(s), Some(sp)) = (self.slot(l, p), self.stacked(l, p)) else {
                continue;
            };
            let z = self.z(l, p, row0, rows);
            let dz = dz_all.col_block(sp.index * r, r);
            self.lora_b_bwd(s, dy, z, dz)?;
            // dA += dzᵀ x
            gemm(self.dev, dz, Op::T, x, Op::N, self.lora.grad_a(s), 1.0, 1.0)?;
        }
        if let Some(dx) = dx {
            // dx += [dz_p …] [A_p; …]: one pass over dx for the group.
            gemm(self.dev, dz_all, Op::N, st.a, Op::N, dx, 1.0, 1.0)?;
        }
        Ok(())
    }

    /// Where attention reads q and k (after RoPE), and the `[q | k]` block that
    /// holds both: in `qkv` itself, or with q/k norms in `qk_normed` (`qkv` then
    /// keeps the norms' inputs for the backward).
    fn attn_qk(&self, l: usize) -> (Mat<'a, T>, Mat<'a, T>, Mat<'a, T>) {
        let d = &self.dims;
        let qk = match &self.ws.qk_normed {
            Some(b) => slot_mat(b, self.kept_layer(l), d.n, d.qcols + d.kvcols),
            None => self.qkv(l).col_block(0, d.qcols + d.kvcols),
        };
        (
            qk.col_block(0, d.qcols),
            qk.col_block(d.qcols, d.kvcols),
            qk,
        )
    }

    /// Layer `l`'s q/k norm weights with the inverse-RMS buffers of q's and of k's
    /// heads (Qwen 3), or None.
    #[allow(clippy::type_complexity)]
    fn qk_norm(
        &self,
        l: usize,
    ) -> Option<(View<'a, T>, View<'a, T>, View<'a, f32>, View<'a, f32>)> {
        let (qn, kn) = self.w.layers[l].qk_norm.as_ref()?;
        let inv = self.ws.qk_inv.as_ref()?;
        let d = &self.dims;
        let (nq, nk) = (d.n * d.attn.heads, d.n * d.attn.kv_heads);
        let at = self.kept_layer(l) * (nq + nk);
        Some((qn.all(), kn.all(), inv.view(at, nq), inv.view(at + nq, nk)))
    }

    fn qkv_blocks(&self, m: Mat<'a, T>) -> (Mat<'a, T>, Mat<'a, T>, Mat<'a, T>) {
        let d = &self.dims;
        (
            m.col_block(0, d.qcols),
            m.col_block(d.qcols, d.kvcols),
            m.col_block(d.qcols + d.kvcols, d.kvcols),
        )
    }

    /// The attention half of layer `l` on input `x`: leaves `h1`, `inv1`, `qkv`
    /// (after RoPE; with q/k norms, q and k before the norm, and `qk_normed`,
    /// `qk_inv`), `attn`, `lse`, `x2`, `inv2`, `h2` (and the q/k/v/o `z`) in the
    /// workspace. `recompute`: the backward's second pass, which with the attention
    /// half kept per layer (`save_attention_residual`) only rebuilds what is not
    /// kept: the norms' outputs and statistics (their buffers hold the last
    /// layer's; the adapters' `z` are kept per layer with the rest).
    fn attention_half(&self, l: usize, x: Mat<'a, T>, recompute: bool) -> Result<()> {
        let d = self.dims;
        let ws = self.ws;
        let kept = recompute && ws.attn_per_layer;
        let eps = self.cfg.rms_norm_eps as f32;
        let lw = &self.w.layers[l];
        let h1 = mat(&ws.h1, d.n, d.h);
        {
            let _r = self.dev.region("RMSNorm forward");
            rmsnorm_fwd(
                self.dev,
                x,
                lw.input_norm.all(),
                eps,
                h1,
                ws.inv1.view(0, d.n),
            )?;
        }
        let (attn, lse) = self.attn_out(l);
        let x2 = self.x2(l);
        // Kept: q/k/v, the attention output, x2 and the adapters' `z` are this
        // layer's slots, filled by the forward; nothing to rebuild but the norms.
        if !kept {
            let wqkv = self.weights(l, Group::Qkv)?;
            let qkv = self.qkv(l);
            {
                let _r = self.dev.region("GEMM q/k/v");
                self.base_fwd(h1, Group::Qkv, wqkv, qkv, 0.0)?;
            }
            self.bias(l, Group::Qkv, qkv)?;
            let (q, k, v) = self.qkv_blocks(qkv);
            self.lora_fwd_shared(l, h1, &[(Proj::Q, q), (Proj::K, k), (Proj::V, v)], 0)?;
            let (qa, ka, qk) = self.attn_qk(l);
            if let Some((qn, kn, q_inv, k_inv)) = self.qk_norm(l) {
                // Qwen 3: each head of q and of k normalized over head_dim, then
                // rotated.
                let _r = self.dev.region("q/k norm forward");
                head_rmsnorm_fwd(self.dev, q, d.d, qn, eps, qa, q_inv)?;
                head_rmsnorm_fwd(self.dev, k, d.d, kn, eps, ka, k_inv)?;
            }
            let (cos, sin) = (
                ws.rope_cos.view(0, d.n * d.d / 2),
                ws.rope_sin.view(0, d.n * d.d / 2),
            );
            {
                // q and k are adjacent column blocks of equal head size: one launch.
                let _r = self.dev.region("RoPE");
                rope(self.dev, qk, d.d, cos, sin, false)?;
            }
            {
                let _r = self.dev.region("attention forward");
                attention_fwd(self.dev, &d.attn, qa, ka, v, self.segments, attn, lse)?;
            }
            // x2 = x + attn Woᵀ (+ LoRA)
            let wo = self.weights(l, Group::O)?;
            {
                let _r = self.dev.region("GEMM o (+ residual copy)");
                self.dev.copy(x.v, x2.v)?;
                self.base_fwd(attn, Group::O, wo, x2, 1.0)?;
            }
            self.bias(l, Group::O, x2)?;
            self.lora_fwd(l, Proj::O, attn, Some(x2), 0)?;
        }
        let h2 = mat(&ws.h2, d.n, d.h);
        let _r = self.dev.region("RMSNorm forward");
        rmsnorm_fwd(
            self.dev,
            x2,
            lw.post_norm.all(),
            eps,
            h2,
            ws.inv2.view(0, d.n),
        )?;
        Ok(())
    }

    /// Gate/up product, its LoRA, and SwiGLU for tokens `c0..c0 + cn`; returns
    /// `(gu, g, u, m)` of the chunk. With `wgu` None the backward takes the gate/up
    /// output kept from the forward (`kept_mlp_layers`) instead of recomputing
    /// it. In the `backward` only what it reads is rebuilt: the SwiGLU output `m`
    /// only when down carries an adapter (down's input gradient and SwiGLU's
    /// backward read the gate/up output, not `m`), so `m` is then left stale.
    #[allow(clippy::type_complexity)]
    fn mlp_up(
        &self,
        l: usize,
        wgu: Option<Mat<'a, T>>,
        c0: usize,
        cn: usize,
        backward: bool,
    ) -> Result<(Mat<'a, T>, Mat<'a, T>, Mat<'a, T>, Mat<'a, T>)> {
        let d = self.dims;
        let h2c = mat(&self.ws.h2, d.n, d.h).row_block(c0, cn);
        let gu = self.gu_chunk(l, c0, cn);
        if let Some(wgu) = wgu {
            let _r = self.dev.region("GEMM gate/up");
            self.base_fwd(h2c, Group::GateUp, wgu, gu, 0.0)?;
            drop(_r);
            self.bias(l, Group::GateUp, gu)?;
        }
        let (g, u) = (gu.col_block(0, d.inter), gu.col_block(d.inter, d.inter));
        // Kept: the output already holds the LoRA term and `z` is kept with it.
        debug_assert!(wgu.is_some() || self.ws.z_per_layer);
        if wgu.is_some() {
            self.lora_fwd_shared(l, h2c, &[(Proj::Gate, g), (Proj::Up, u)], c0)?;
        }
        let m = mat(&self.ws.m, cn, d.inter);
        if !backward || self.slot(l, Proj::Down).is_some() {
            let _r = self.dev.region("SwiGLU forward");
            swiglu_fwd(self.dev, g, u, m)?;
        }
        Ok((gu, g, u, m))
    }

    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> {
        let (n, c) = (self.dims.n, self.dims.chunk);
        (0..n.div_ceil(c)).map(move |i| (i * c, c.min(n - i * c)))
    }

    /// Layer `l`'s forward, writing its output (forward pass only).
    /// `train`: the backward follows, so the kept attention half is copied to the
    /// host when offloaded.
    fn layer_forward(&self, l: usize, train: bool) -> Result<()> {
        self.before_writing_half(l)?;
        self.attention_half(l, self.layer_input(l), false)?;
        if train {
            self.save_half(l)?;
        }
        let wgu = self.weights(l, Group::GateUp)?;
        let wd = self.weights(l, Group::Down)?;
        let out = self.layer_output(l);
        let x2 = self.x2(l);
        for (c0, cn) in self.chunks() {
            let (_, _, _, m) = self.mlp_up(l, Some(wgu), c0, cn, false)?;
            let oc = out.row_block(c0, cn);
            {
                let _r = self.dev.region("GEMM down (+ residual copy)");
                self.dev.copy(x2.row_block(c0, cn).v, oc.v)?;
                self.base_fwd(m, Group::Down, wd, oc, 1.0)?;
            }
            self.bias(l, Group::Down, oc)?;
            self.lora_fwd(l, Proj::Down, m, Some(oc), c0)?;
        }
        Ok(())
    }

    /// The forward; `train`: the backward follows, so offloaded checkpoints are
    /// copied to the host.
    fn forward(&self, train: bool) -> Result<()> {
        let d = self.dims;
        let layers = self.cfg.num_hidden_layers;
        gather_rows(
            self.dev,
            mat(&self.w.embed, d.vocab, d.h),
            self.ws.ids.view(0, d.n),
            self.layer_input(0),
        )?;
        for l in 0..layers {
            if train {
                self.save_input(l)?;
            }
            if l + 1 < layers {
                self.before_writing_input(l + 1)?;
            }
            self.layer_forward(l, train)?;
        }
        Ok(())
    }

    /// Final norm and chunked cross-entropy over the `nv` rows with a target; with
    /// `grad_scale`, also leaves `∂L/∂(final hidden)` in `dres`.
    fn loss(&self, nv: usize, grad_scale: Option<f32>) -> Result<()> {
        let d = self.dims;
        let ws = self.ws;
        let _r = self.dev.region("final norm + cross-entropy (lm_head)");
        let xl = mat(&ws.final_hidden, d.n, d.h);
        let hn = mat(&ws.h1, d.n, d.h);
        let inv = ws.inv1.view(0, d.n);
        rmsnorm_fwd(
            self.dev,
            xl,
            self.w.final_norm.all(),
            self.cfg.rms_norm_eps as f32,
            hn,
            inv,
        )?;
        let dhn = mat(&ws.dh, d.n, d.h);
        if grad_scale.is_some() {
            self.dev.fill_zero(dhn.v)?;
        }
        let lm = mat(&self.w.lm_head, d.vocab, d.h);
        let cc = ws.layout.shape.ce_chunk.min(d.n).max(1);
        let mut c0 = 0;
        while c0 < nv {
            let c = cc.min(nv - c0);
            let rows = ws.ce_rows.view(c0, c);
            let hv = mat(&ws.ce_hidden, c, d.h);
            gather_rows(self.dev, hn, rows, hv)?;
            let logits = mat(&ws.logits, c, d.vocab);
            gemm(self.dev, hv, Op::N, lm, Op::T, logits, 1.0, 0.0)?;
            let dl = grad_scale.map(|_| mat(&ws.dlogits, c, d.vocab));
            xent(
                self.dev,
                logits,
                ws.ce_targets.view(c0, c),
                grad_scale.unwrap_or(0.0),
                ws.losses.view(c0, c),
                dl,
            )?;
            if let Some(dl) = dl {
                let dhv = mat(&ws.ce_dhidden, c, d.h);
                gemm(self.dev, dl, Op::N, lm, Op::N, dhv, 1.0, 0.0)?;
                scatter_rows(self.dev, dhv, rows, dhn)?;
            }
            c0 += c;
        }
        if grad_scale.is_some() {
            rmsnorm_bwd(
                self.dev,
                xl,
                inv,
                self.w.final_norm.all(),
                dhn,
                mat(&ws.dres, d.n, d.h),
                false,
            )?;
        }
        Ok(())
    }

    /// Backward through every layer, last first, recomputing each from its input.
    fn backward(&self) -> Result<()> {
        for l in (0..self.cfg.num_hidden_layers).rev() {
            self.prefetch_input(l)?;
            self.await_input(l)?;
            self.layer_backward(l, l > 0)?;
        }
        Ok(())
    }

    fn layer_backward(&self, l: usize, need_dx: bool) -> Result<()> {
        let d = self.dims;
        let ws = self.ws;
        let lw = &self.w.layers[l];
        let x = self.layer_input(l);
        self.attention_half(l, x, true)?;
        let dres = mat(&ws.dres, d.n, d.h);
        let dh = mat(&ws.dh, d.n, d.h);
        let h2 = mat(&ws.h2, d.n, d.h);
        let x2 = self.x2(l);

        // MLP, one token chunk at a time: recompute up (or take the kept gate/up
        // output), then backward.
        let wgu = self.weights(l, Group::GateUp)?;
        let wd = self.weights(l, Group::Down)?;
        for (c0, cn) in self.chunks() {
            let recompute = (!self.gu_kept(l)).then_some(wgu);
            let (gu, g, u, m) = self.mlp_up(l, recompute, c0, cn, true)?;
            if !ws.z_per_layer {
                self.lora_fwd(l, Proj::Down, m, None, c0)?;
            }
            let dres_c = dres.row_block(c0, cn);
            let dm = mat(&ws.dm, cn, d.inter);
            {
                let _r = self.dev.region("GEMM down backward (dX)");
                self.base_dx(l, dres_c, Group::Down, wd, dm)?;
            }
            self.lora_bwd(l, Proj::Down, m, dres_c, Some(dm), c0)?;
            {
                let _r = self.dev.region("SwiGLU backward");
                swiglu_bwd(self.dev, g, u, dm)?;
            }
            let dh_c = dh.row_block(c0, cn);
            {
                let _r = self.dev.region("GEMM gate/up backward (dX)");
                self.base_dx(l, gu, Group::GateUp, wgu, dh_c)?;
            }
            let h2c = h2.row_block(c0, cn);
            self.lora_bwd_shared(l, h2c, &[(Proj::Gate, g), (Proj::Up, u)], Some(dh_c), c0)?;
            let _r = self.dev.region("RMSNorm backward");
            rmsnorm_bwd(
                self.dev,
                x2.row_block(c0, cn),
                ws.inv2.view(c0, cn),
                lw.post_norm.all(),
                dh_c,
                dres_c,
                true,
            )?;
        }

        // Attention: dres now holds ∂L/∂x2. The MLP's weights took the memory of
        // the attention half's: o and (for dX) q/k/v are dequantized again.
        let wo = self.weights(l, Group::O)?;
        let (attn, lse) = self.attn_out(l);
        let dattn = mat(&ws.dattn, d.n, d.qcols);
        {
            let _r = self.dev.region("GEMM o backward (dX)");
            self.base_dx(l, dres, Group::O, wo, dattn)?;
        }
        self.lora_bwd(l, Proj::O, attn, dres, Some(dattn), 0)?;
        let (q_in, k_in, v) = self.qkv_blocks(self.qkv(l));
        let (q, k, _) = self.attn_qk(l);
        let dqkv = mat(&ws.dqkv, d.n, d.qc);
        let (dq, dk, dv) = self.qkv_blocks(dqkv);
        let r_attn = self.dev.region("attention backward");
        let mode = ws.layout.shape.attention_backward;
        attention_bwd(
            self.dev,
            &d.attn,
            mode,
            q,
            k,
            v,
            attn,
            dattn,
            lse,
            self.segments,
            dq,
            dk,
            dv,
            ws.attn_scratch.view(0, d.attn.bwd_scratch_len(mode)),
        )?;
        drop(r_attn);
        let (cos, sin) = (
            ws.rope_cos.view(0, d.n * d.d / 2),
            ws.rope_sin.view(0, d.n * d.d / 2),
        );
        {
            let _r = self.dev.region("RoPE");
            rope(
                self.dev,
                dqkv.col_block(0, d.qcols + d.kvcols),
                d.d,
                cos,
                sin,
                true,
            )?;
        }
        if let Some((qn, kn, q_inv, k_inv)) = self.qk_norm(l) {
            // Through the q/k norms, in place: dq, dk become the gradients of the
            // projections' outputs (the norms' inputs, kept in qkv).
            let _r = self.dev.region("q/k norm backward");
            head_rmsnorm_bwd(self.dev, q_in, d.d, q_inv, qn, dq)?;
            head_rmsnorm_bwd(self.dev, k_in, d.d, k_inv, kn, dk)?;
        }
        let h1 = mat(&ws.h1, d.n, d.h);
        if need_dx {
            let wqkv = self.weights(l, Group::Qkv)?;
            let _r = self.dev.region("GEMM q/k/v backward (dX)");
            self.base_dx(l, dqkv, Group::Qkv, wqkv, dh)?;
        }
        let dxo = need_dx.then_some(dh);
        self.lora_bwd_shared(
            l,
            h1,
            &[(Proj::Q, dq), (Proj::K, dk), (Proj::V, dv)],
            dxo,
            0,
        )?;
        if need_dx {
            let _r = self.dev.region("RMSNorm backward");
            rmsnorm_bwd(
                self.dev,
                x,
                ws.inv1.view(0, d.n),
                lw.input_norm.all(),
                dh,
                dres,
                true,
            )?;
        }
        Ok(())
    }
}
