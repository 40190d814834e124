//! The engine's buffers and their sizes, as a pure function of the model shape,
//! the adapters and the micro-batch. The workspace allocates exactly these buffers
//! (a test checks the bytes it holds against [`WorkspaceLayout::total_bytes`]), so the
//! memory model of `qtrain plan` predicts what the engine really takes.
//!
//! Names and their roles (`n` tokens of the micro-batch, `h` hidden, `qc` fused
//! q/k/v width, `I` intermediate, `V` vocabulary, `L` layers, `r` LoRA rank):
//!
//! | buffer | elements | role |
//! |---|---|---|
//! | `layer_inputs` | `L·n·h` | gradient checkpoints: each layer's input; with `offload_layer_inputs` a ring of [`OFFLOAD_RING`] layers' (`R·n·h`) |
//! | `attn_residuals` | `L·n·h` | with `save_attention_residual`: each layer's residual after attention (in place of one layer's `x2`) |
//! | `attn_outputs lse_outputs` | `L·n·heads·d`, `L·b·heads·seq` | with `save_attention_residual`: each layer's attention output and log-sum-exp (in place of `attn lse`), so the backward does not run the attention forward again |
//! | `qkv_outputs` (`qk_normed_outputs qk_inv_outputs`) | `L·n·qc` (`L·n·(heads + kv)·d`, `L·n·(heads + kv)`) | with `save_attention_residual`: each layer's `qkv` (and q/k norm buffers), in place of one layer's, so the backward does not run the q/k/v product, RoPE or the norms again |
//!
//! With `offload_layer_inputs` every per-layer buffer of [`OFFLOADED`] (the layer
//! inputs, and the kept attention half) holds a ring of `R` layers instead of `L`.
//! | `h1 x2 h2 dres dh` | `n·h` each | norms' outputs, the residual after attention (`x2`: one layer's, unless kept per layer), gradients |
//! | `qkv dqkv` | `n·qc` each | fused q/k/v (after RoPE; with q/k norms, before them) and their gradients |
//! | `qk_normed qk_inv` | `n·(heads + kv)·d`, `n·(heads + kv)` | with q/k norms (Qwen 3): q and k after the per-head norm and RoPE (what attention reads), each head's inverse RMS |
//! | `attn dattn` | `n·heads·d` each | attention output (one layer's, unless kept per layer) and its gradient |
//! | `gu m dm` | `c·2I`, `c·I`, `c·I` | the MLP of one chunk of `c` tokens (`gu` only when some layer's gate/up output is not kept) |
//! | `mlp_activations` | `K·n·2I` | with `kept_mlp_layers` = K > 0: the first K layers' gate/up output (after its LoRA) |
//! | `dz` | `3·n·r` | the adapters' `dz` of one projection, or of a stacked group |
//! | `lora_a_stacks` | `L·5r·h` | without dropout, each layer's `[A_q; A_k; A_v]` and `[A_gate; A_up]` (the adapted ones), so a group sharing an input runs one `z` product and one input-gradient product |
//! | `z` (`z_outputs`) | `P·n·r` (`L·P·n·r`) | the adapters' `z = dropout(x) Aᵀ` of one layer's `P` projections, or with either half kept every layer's, so the backward does not recompute them |
//! | `weights` | `max(qc·h + h·heads·d, 2I·h + h·I)` | one layer's dequantized weights, reused by every layer: `[q;k;v]` and `o` side by side, `[gate;up]` and `down` side by side over the same memory (the attention half and the MLP never need each other's weights at once: the backward dequantizes o and q/k/v again after the MLP); with `keep_dequantized_base` (and not `fp8_base`) every layer's four groups side by side, `L·(qc·h + h·heads·d + 2I·h + h·I)`, dequantized on first use and kept while the workspace lives |
//! | `logits dlogits` | `cc·V` | one cross-entropy chunk of `cc` rows (f32, compute type) |
//! | `fp8_w_* fp8_wt_* fp8_weight_scales` | one layer's weight groups, 1 byte each, twice | with `fp8_base`: E4M3 codes of the weights per output row (forward) and of their transposes per input column (input gradient), and their f32 scales |
//! | `fp8_input fp8_input_scales` | the widest product input (`max(n·qc, c·2I)`), `n` | with `fp8_base`: one product input's E4M3 codes and per-token scales |
//! | `rope_table_cos rope_table_sin` | `seq·d/2` each | RoPE of positions `0..seq`, computed once per workspace; a batch's per-token tables `rope_cos rope_sin` are gathered from them by `positions` |
//!
//! With `offload_layer_inputs` the host copies live in (page-locked) host memory,
//! listed apart ([`WorkspaceLayout::host_buffers`], not in
//! [`WorkspaceLayout::total_bytes`]):
//!
//! | buffer | elements | role |
//! |---|---|---|
//! | `layer_inputs_host` | `(L - R)·n·h` | the inputs of layers `0..L-R`, copied out in the forward and back in the backward (the last `R` layers' stay in the ring) |
//! | `<kept>_host` | `(L - R)·` per layer | with `save_attention_residual`: the same for each kept buffer of the attention half (`qkv_outputs`, `attn_residuals`, `attn_outputs`, `lse_outputs`, with q/k norms `qk_normed_outputs`, `qk_inv_outputs`) |

use crate::step::EngineOptions;
use qtrain_device::ops::attention::{AttnBackward, AttnShape};
use qtrain_model::ModelConfig;

/// Device slots of layer inputs (and of the kept attention half) with
/// `offload_layer_inputs`: layer `l`'s lives in slot `l % R`. Two suffice for full overlap: in the forward a slot's copy
/// to the host runs during the next layer, in the backward the next slot's copy
/// from the host runs during the current layer's backward.
pub const OFFLOAD_RING: usize = 2;

/// The per-layer checkpoint buffers that travel to host memory with
/// `offload_layer_inputs` (device ring, host copy), in the order the engine's
/// stages hold them: the layer inputs always, the attention half's outputs when
/// they are kept (`save_attention_residual`).
pub const OFFLOADED: [(&str, &str); 7] = [
    ("layer_inputs", "layer_inputs_host"),
    ("qkv_outputs", "qkv_outputs_host"),
    ("qk_normed_outputs", "qk_normed_outputs_host"),
    ("attn_residuals", "attn_residuals_host"),
    ("attn_outputs", "attn_outputs_host"),
    ("qk_inv_outputs", "qk_inv_outputs_host"),
    ("lse_outputs", "lse_outputs_host"),
];

/// The FP8 code buffers of the weight groups (in `Group::ALL` order): rows
/// (forward) and transposed (input gradient).
pub const FP8_WEIGHTS: [[&str; 2]; 4] = [
    ["fp8_w_qkv", "fp8_wt_qkv"],
    ["fp8_w_o", "fp8_wt_o"],
    ["fp8_w_gu", "fp8_wt_gu"],
    ["fp8_w_down", "fp8_wt_down"],
];

/// `(out, in)` of each weight group (`[q; k; v]`, `o`, `[gate; up]`, `down`: the
/// engine's `Group::ALL` order).
pub fn weight_group_shapes(cfg: &ModelConfig) -> [(usize, usize); 4] {
    let d = cfg.head_dim();
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let qcols = cfg.num_attention_heads * d;
    let qc = (cfg.num_attention_heads + 2 * cfg.num_kv_heads()) * d;
    [(qc, h), (h, qcols), (2 * inter, h), (h, inter)]
}

/// Offset of each weight group (`Group::ALL` order) in a layer's part of the
/// `weights` buffer. Shared by every layer (`kept` false): the attention half's
/// groups side by side from 0, the MLP's side by side from 0 over the same memory,
/// so a group's weights are in the buffer only until a group of the other half is
/// dequantized. Kept (every layer's, at `l ·` [`layer_weight_elems`]): the four
/// groups side by side.
pub fn weight_group_offsets(cfg: &ModelConfig, kept: bool) -> [usize; 4] {
    let [q, o, gu, _] = weight_group_shapes(cfg).map(|(out, inp)| out * inp);
    if kept {
        [0, q, q + o, q + o + gu]
    } else {
        [0, q, 0, gu]
    }
}

/// Elements of one layer's four weight groups.
pub fn layer_weight_elems(cfg: &ModelConfig) -> usize {
    weight_group_shapes(cfg)
        .map(|(out, inp)| out * inp)
        .iter()
        .sum()
}

/// Elements of the `weights` buffer: the larger half of one layer's groups, shared
/// by every layer; or, kept, every layer's groups.
pub fn weight_buffer_elems(cfg: &ModelConfig, kept: bool) -> usize {
    let [q, o, gu, down] = weight_group_shapes(cfg).map(|(out, inp)| out * inp);
    if kept {
        cfg.num_hidden_layers * layer_weight_elems(cfg)
    } else {
        (q + o).max(gu + down)
    }
}

/// The most adapters one stacked group holds (q/k/v; gate/up is the other group).
pub const STACK_GROUP_MAX: usize = 3;
/// Rank-rows of one layer's stacked `A`s: q/k/v's `3r` then gate/up's `2r`.
pub const STACKED_ROWS: usize = 5;

/// Everything that sizes the buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceShape {
    pub tokens: usize,
    /// Batch rows (attention statistics are `batch · heads · seq`).
    pub batch: usize,
    pub seq: usize,
    /// Tokens per MLP chunk (at most `tokens`).
    pub mlp_chunk: usize,
    /// Rows per cross-entropy chunk.
    pub ce_chunk: usize,
    pub rank: usize,
    /// Bytes per element of the compute type.
    pub elem: usize,
    /// Every layer's residual after attention is kept (`EngineOptions`).
    pub save_attention_residual: bool,
    /// The first this many layers' gate/up outputs are kept (`EngineOptions`;
    /// [`ALL_LAYERS`] or any count from the model's layers up: every layer's).
    pub kept_mlp_layers: usize,
    /// Layer inputs go to host memory, a ring of [`OFFLOAD_RING`] stays on the
    /// device (`EngineOptions`).
    pub offload_layer_inputs: bool,
    /// The frozen products run in FP8 (`EngineOptions::fp8_base`): the code and
    /// scale buffers exist.
    pub fp8_base: bool,
    /// The attention backward's kernels: the fused ones add a dQ accumulator to the
    /// scratch (`EngineOptions::attention_backward`).
    pub attention_backward: AttnBackward,
    /// Every layer's dequantized weights are kept (`EngineOptions`; without effect
    /// with `fp8_base`: see [`WorkspaceShape::keeps_dequantized_base`]).
    pub keep_dequantized_base: bool,
}

/// Whether every layer's LoRA `z` is kept from the forward (`z_outputs`): whenever
/// a half of the layer is kept, since the recomputation then no longer rebuilds `z`
/// as a by-product of the projection it recomputes. The one rule for the layout
/// and for `qtrain bench`'s count of the products the step runs.
pub fn keeps_lora_z(save_attention_residual: bool, kept_mlp_layers: usize) -> bool {
    save_attention_residual || kept_mlp_layers > 0
}

/// `EngineOptions::kept_mlp_layers` for every layer's gate/up output.
pub const ALL_LAYERS: usize = usize::MAX;

impl WorkspaceShape {
    /// [`keeps_lora_z`] of this shape.
    pub fn keeps_lora_z(&self) -> bool {
        keeps_lora_z(self.save_attention_residual, self.kept_mlp_layers)
    }

    /// How many layers of `cfg` keep their gate/up output.
    pub fn kept_mlp_layers(&self, cfg: &ModelConfig) -> usize {
        self.kept_mlp_layers.min(cfg.num_hidden_layers)
    }

    /// Layer inputs on the device for `layers` layers: all of them, or the ring.
    pub fn device_layer_slots(&self, layers: usize) -> usize {
        if self.offload_layer_inputs {
            layers.min(OFFLOAD_RING)
        } else {
            layers
        }
    }
}

impl WorkspaceShape {
    /// The shape of a `batch x seq` micro-batch under `opts` with rank-`rank`
    /// adapters in a compute type of `elem` bytes: what [`crate::Engine`] allocates
    /// its workspace for, and what the memory model of `qtrain plan` sizes without
    /// building an engine. Dropout takes no memory: its mask is drawn inside the
    /// LoRA kernels (`qtrain_device::ops::lora_dropout`).
    pub fn for_micro_batch(
        opts: &EngineOptions,
        rank: usize,
        elem: usize,
        batch: usize,
        seq: usize,
    ) -> Self {
        WorkspaceShape {
            tokens: batch * seq,
            batch,
            seq,
            mlp_chunk: opts.mlp_chunk,
            ce_chunk: opts.ce_chunk,
            rank,
            elem,
            save_attention_residual: opts.save_attention_residual,
            kept_mlp_layers: opts.kept_mlp_layers,
            offload_layer_inputs: opts.offload_layer_inputs,
            fp8_base: opts.fp8_base,
            attention_backward: opts.attention_backward,
            keep_dequantized_base: opts.keep_dequantized_base,
        }
    }

    /// Whether the `weights` buffer holds every layer's dequantized weights: asked
    /// for, and the products are in the compute type (FP8 products quantize a
    /// layer's weights anew each time they are dequantized, so there is nothing to
    /// keep there).
    pub fn keeps_dequantized_base(&self) -> bool {
        self.keep_dequantized_base && !self.fp8_base
    }
}

/// What a buffer is for, for the memory breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    /// Gradient checkpoints (one hidden state per layer and token).
    LayerInputs,
    /// One layer's activations and their gradients (reused by every layer).
    LayerActivations,
    /// The MLP of one token chunk.
    MlpChunk,
    /// Dequantized weights of one layer.
    DequantWeights,
    /// Every layer's dequantized weights, kept.
    KeptBase,
    /// One cross-entropy chunk: logits and their gradient.
    Logits,
    /// LoRA intermediates (`z = dropout(x) Aᵀ` and its gradient).
    LoraScratch,
    /// The uploaded batch: ids, rotary tables, segments, targets.
    BatchInputs,
    /// Every layer's gate/up output, kept from the forward.
    MlpActivations,
    /// FP8 codes and scales of one layer's weights (both orientations) and of one
    /// product's input.
    Fp8Scratch,
}

impl Component {
    pub fn describe(self) -> &'static str {
        match self {
            Component::LayerInputs => {
                "gradient checkpoints (layer inputs; attention residuals if kept)"
            }
            Component::LayerActivations => "one layer's activations and gradients",
            Component::MlpChunk => "MLP chunk (gate/up, SwiGLU, its gradient)",
            Component::DequantWeights => "dequantized weights of one layer",
            Component::KeptBase => "frozen base kept dequantized (every layer; no NF4 dequantization after the first step)",
            Component::Logits => "cross-entropy chunk (f32 logits + gradient)",
            Component::LoraScratch => "LoRA intermediates",
            Component::BatchInputs => "batch inputs (ids, RoPE tables, targets)",
            Component::MlpActivations => "kept gate/up outputs (no MLP recomputation)",
            Component::Fp8Scratch => "FP8 codes and scales (weights, product inputs)",
        }
    }
}

/// One buffer of the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferSpec {
    pub name: &'static str,
    pub component: Component,
    pub elems: usize,
    pub elem_bytes: usize,
}

impl BufferSpec {
    pub fn bytes(&self) -> usize {
        self.elems * self.elem_bytes
    }
}

/// All buffers of the engine's workspace for one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkspaceLayout {
    pub shape: WorkspaceShape,
    /// On the device: what [`WorkspaceLayout::total_bytes`] sums.
    pub buffers: Vec<BufferSpec>,
    /// In page-locked host memory (offloaded checkpoints); empty otherwise.
    pub host_buffers: Vec<BufferSpec>,
}

impl WorkspaceLayout {
    pub fn new(cfg: &ModelConfig, shape: WorkspaceShape) -> Self {
        let n = shape.tokens;
        let h = cfg.hidden_size;
        let d = cfg.head_dim();
        let qcols = cfg.num_attention_heads * d;
        let qc = (cfg.num_attention_heads + 2 * cfg.num_kv_heads()) * d;
        let inter = cfg.intermediate_size;
        let c = shape.mlp_chunk.min(n).max(1);
        let cc = shape.ce_chunk.min(n).max(1);
        let stats = shape.batch * cfg.num_attention_heads * shape.seq;
        let e = shape.elem;
        let r = shape.rank;
        use Component::*;
        let b = |name, component, elems, elem_bytes| BufferSpec {
            name,
            component,
            elems,
            elem_bytes,
        };
        let mut buffers = vec![
            b(
                "layer_inputs",
                LayerInputs,
                shape.device_layer_slots(cfg.num_hidden_layers) * n * h,
                e,
            ),
            b("final_hidden", LayerActivations, n * h, e),
            b("h1", LayerActivations, n * h, e),
            b("inv1", LayerActivations, n, 4),
            b("inv2", LayerActivations, n, 4),
            b("h2", LayerActivations, n * h, e),
            b("dres", LayerActivations, n * h, e),
            b("dh", LayerActivations, n * h, e),
            b("dattn", LayerActivations, n * qcols, e),
            b("dqkv", LayerActivations, n * qc, e),
            b(
                "attn_scratch",
                LayerActivations,
                AttnShape {
                    batch: shape.batch,
                    seq: shape.seq,
                    heads: cfg.num_attention_heads,
                    kv_heads: cfg.num_kv_heads(),
                    head_dim: d,
                    window: None,
                    scale: 1.0,
                }
                .bwd_scratch_len(shape.attention_backward),
                4,
            ),
            b("m", MlpChunk, c * inter, e),
            b("dm", MlpChunk, c * inter, e),
            {
                let kept = shape.keeps_dequantized_base();
                let role = if kept { KeptBase } else { DequantWeights };
                b("weights", role, weight_buffer_elems(cfg, kept), e)
            },
            b("ce_hidden", Logits, cc * h, e),
            b("logits", Logits, cc * cfg.vocab_size, 4),
            b("dlogits", Logits, cc * cfg.vocab_size, e),
            b("ce_dhidden", Logits, cc * h, e),
            // One projection's `dz`, or a stacked group's side by side (q/k/v: 3).
            b("dz", LoraScratch, STACK_GROUP_MAX * n * r, e),
            // Every layer's stacked `A` of q/k/v and of gate/up (`[3r, h]` and
            // `[2r, h]`), refreshed with the compute copy: the group's `z` is one
            // product over its shared input, its input gradient one product too.
            b(
                "lora_a_stacks",
                LoraScratch,
                cfg.num_hidden_layers * STACKED_ROWS * r * h,
                e,
            ),
            b("ids", BatchInputs, n, 4),
            b("rope_cos", BatchInputs, n * d / 2, 4),
            b("rope_sin", BatchInputs, n * d / 2, 4),
            b("positions", BatchInputs, n, 4),
            b("rope_table_cos", BatchInputs, shape.seq * d / 2, 4),
            b("rope_table_sin", BatchInputs, shape.seq * d / 2, 4),
            b("segments", BatchInputs, n, 4),
            b("ce_rows", BatchInputs, n, 4),
            b("ce_targets", BatchInputs, n, 4),
            b("losses", BatchInputs, n, 4),
        ];
        let projections = qtrain_model::PROJECTIONS.len();
        if shape.keeps_lora_z() {
            // Every layer's `z = dropout(x) Aᵀ` stays from the forward: the
            // backward's LoRA products read it and nothing recomputes it (an x-sized
            // read per adapter and layer, ~1% of the step at 4 x 2048 on
            // Mistral-7B, for 56 MiB at 8192 tokens).
            let layers = cfg.num_hidden_layers;
            buffers.push(b("z_outputs", LoraScratch, layers * projections * n * r, e));
        } else {
            buffers.push(b("z", LoraScratch, projections * n * r, e));
        }
        let qk = (cfg.num_attention_heads + cfg.num_kv_heads()) * d;
        // Slots of the per-layer checkpoints on the device: every layer's, or with
        // offloading the ring; the other layers' live in host memory.
        let slots = shape.device_layer_slots(cfg.num_hidden_layers);
        if shape.save_attention_residual {
            // Everything the attention half leaves for the backward, so that its
            // recomputation is only the input norm and the adapters' `z`: q/k/v
            // after RoPE (no q/k/v product, LoRA B products or RoPE: ~5% of the
            // step at 4 x 2048 on Mistral-7B), the residual x2 (no o projection)
            // and the attention output with its log-sum-exp (no attention forward:
            // 8% of the step at 1 x 8192, 14% at 1 x 32768). Qwen 3's q/k norms
            // keep their rotated outputs and statistics per layer too (the norm's
            // input stays in `qkv_outputs`). Offloaded, they travel with the layer
            // input through the same ring of slots.
            buffers.push(b("qkv_outputs", LayerInputs, slots * n * qc, e));
            if cfg.has_qk_norm() {
                buffers.push(b("qk_normed_outputs", LayerInputs, slots * n * qk, e));
                buffers.push(b("qk_inv_outputs", LayerInputs, slots * n * qk / d, 4));
            }
            buffers.push(b("attn_residuals", LayerInputs, slots * n * h, e));
            buffers.push(b("attn_outputs", LayerInputs, slots * n * qcols, e));
            buffers.push(b("lse_outputs", LayerInputs, slots * stats, 4));
        } else {
            buffers.push(b("qkv", LayerActivations, n * qc, e));
            if cfg.has_qk_norm() {
                // Qwen 3: the norm's input stays in `qkv` for the backward, its
                // rotated output goes here; recomputed with the rest of the
                // attention half, so one layer's worth.
                buffers.push(b("qk_normed", LayerActivations, n * qk, e));
                buffers.push(b("qk_inv", LayerActivations, n * qk / d, 4));
            }
            buffers.push(b("x2", LayerActivations, n * h, e));
            buffers.push(b("attn", LayerActivations, n * qcols, e));
            buffers.push(b("lse", LayerActivations, stats, 4));
        }
        // The kept layers' gate/up outputs, and one chunk's for the others.
        let kept_mlp = shape.kept_mlp_layers(cfg);
        if kept_mlp > 0 {
            buffers.push(b(
                "mlp_activations",
                MlpActivations,
                kept_mlp * n * 2 * inter,
                e,
            ));
        }
        if kept_mlp < cfg.num_hidden_layers {
            buffers.push(b("gu", MlpChunk, c * 2 * inter, e));
        }
        if shape.fp8_base {
            // Each weight group twice (rows for the forward, the transpose for the
            // input gradient), scales per row of each; one product input at a time:
            // the widest is the MLP chunk's [c, 2I] gradient (gate/up dX).
            let groups = weight_group_shapes(cfg);
            for (name, (o, i)) in FP8_WEIGHTS.iter().zip(groups) {
                buffers.push(b(name[0], Fp8Scratch, o * i, 1));
                buffers.push(b(name[1], Fp8Scratch, o * i, 1));
            }
            let scales: usize = groups.iter().map(|(o, i)| o + i).sum();
            buffers.push(b("fp8_weight_scales", Fp8Scratch, scales, 4));
            let act = (n * h.max(qcols).max(qc)).max(c * 2 * inter);
            buffers.push(b("fp8_input", Fp8Scratch, act, 1));
            buffers.push(b("fp8_input_scales", Fp8Scratch, n.max(c), 4));
        }
        // Each offloaded checkpoint buffer's host copy: the layers outside the ring.
        let offloaded = cfg.num_hidden_layers - slots;
        let host_buffers = if offloaded > 0 {
            OFFLOADED
                .iter()
                .filter_map(|&(device, host)| {
                    let on_device = buffers.iter().find(|x| x.name == device)?;
                    let per_layer = on_device.elems / slots;
                    Some(b(
                        host,
                        LayerInputs,
                        offloaded * per_layer,
                        on_device.elem_bytes,
                    ))
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            shape,
            buffers,
            host_buffers,
        }
    }

    pub fn elems(&self, name: &str) -> usize {
        self.buffers
            .iter()
            .chain(&self.host_buffers)
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no buffer {name} in the layout"))
            .elems
    }

    /// Bytes on the device.
    pub fn total_bytes(&self) -> usize {
        self.buffers.iter().map(BufferSpec::bytes).sum()
    }

    /// Bytes of page-locked host memory (offloaded checkpoints).
    pub fn host_bytes(&self) -> usize {
        self.host_buffers.iter().map(BufferSpec::bytes).sum()
    }

    /// Bytes crossing the host link per training pass: each offloaded layer input
    /// goes out in the forward and comes back in the backward.
    pub fn transfer_bytes(&self) -> usize {
        2 * self.host_bytes()
    }

    /// Bytes per component, largest first.
    pub fn by_component(&self) -> Vec<(Component, usize)> {
        let mut out: Vec<(Component, usize)> = Vec::new();
        for b in &self.buffers {
            match out.iter_mut().find(|(c, _)| *c == b.component) {
                Some((_, bytes)) => *bytes += b.bytes(),
                None => out.push((b.component, b.bytes())),
            }
        }
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention half's groups and the MLP's each fit the shared buffer side by
    /// side, and the buffer is the larger half, not the sum.
    #[test]
    fn weight_groups_share_one_buffer_of_the_larger_half() {
        let json = r#"{"model_type":"mistral","vocab_size":32768,"hidden_size":4096,
            "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,
            "num_key_value_heads":8,"max_position_embeddings":32768,"rms_norm_eps":1e-5,
            "rope_theta":1e6}"#;
        let cfg = ModelConfig::from_json_str(json, std::path::Path::new("config.json")).unwrap();
        let sizes = weight_group_shapes(&cfg).map(|(o, i)| o * i);
        let offsets = weight_group_offsets(&cfg, false);
        let elems = weight_buffer_elems(&cfg, false);
        assert_eq!(offsets, [0, sizes[0], 0, sizes[2]]);
        assert_eq!(elems, sizes[2] + sizes[3]);
        assert!(sizes[0] + sizes[1] <= elems);
        // 336 MiB of bf16 on Mistral-7B where four buffers took 416.
        assert_eq!((elems * 2) >> 20, 336);
        assert_eq!((sizes.iter().sum::<usize>() * 2) >> 20, 416);
        // Kept: each layer's four groups side by side, 32 layers (13 GiB of bf16).
        let per_layer = sizes.iter().sum::<usize>();
        assert_eq!(layer_weight_elems(&cfg), per_layer);
        assert_eq!(
            weight_group_offsets(&cfg, true),
            [0, sizes[0], sizes[0] + sizes[1], per_layer - sizes[3]]
        );
        assert_eq!(weight_buffer_elems(&cfg, true), 32 * per_layer);
        assert_eq!((32 * per_layer * 2) >> 20, 13312);
    }
}
