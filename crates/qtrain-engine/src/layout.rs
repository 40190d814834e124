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
//! | `layer_inputs` | `L·n·h` | gradient checkpoints: each layer's input |
//! | `attn_residuals` | `L·n·h` | with `save_attention_residual`: each layer's residual after attention |
//! | `h1 x2 h2 dres dh` | `n·h` each | norms' outputs, the residual after attention, gradients |
//! | `qkv dqkv` | `n·qc` each | fused q/k/v (after RoPE; with q/k norms, before them) and their gradients |
//! | `qk_normed qk_inv` | `n·(heads + kv)·d`, `n·(heads + kv)` | with q/k norms (Qwen 3): q and k after the per-head norm and RoPE (what attention reads), each head's inverse RMS |
//! | `attn dattn` | `n·heads·d` each | attention output and its gradient |
//! | `gu m dm` | `c·2I`, `c·I`, `c·I` | the MLP of one chunk of `c` tokens (`gu` only without `mlp_activations`) |
//! | `mlp_activations` | `L·n·2I` | with `save_mlp_activations`: each layer's gate/up output (after its LoRA) |
//! | `w_qkv w_o w_gu w_down` | one layer's weight groups | dequantized weights, reused by every layer |
//! | `logits dlogits` | `cc·V` | one cross-entropy chunk of `cc` rows (f32, compute type) |
//! | `rope_table_cos rope_table_sin` | `seq·d/2` each | RoPE of positions `0..seq`, computed once per workspace; a batch's per-token tables `rope_cos rope_sin` are gathered from them by `positions` |

use crate::step::EngineOptions;
use qtrain_model::ModelConfig;

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
    /// Adapters carry dropout (the masked-input scratch buffers exist).
    pub dropout: bool,
    /// Bytes per element of the compute type.
    pub elem: usize,
    /// Every layer's residual after attention is kept (`EngineOptions`).
    pub save_attention_residual: bool,
    /// Every layer's gate/up output is kept (`EngineOptions`).
    pub save_mlp_activations: bool,
}

impl WorkspaceShape {
    /// The shape of a `batch x seq` micro-batch under `opts` with rank-`rank`
    /// adapters (`dropout`: they carry dropout) in a compute type of `elem` bytes:
    /// what [`crate::Engine`] allocates its workspace for, and what the memory model
    /// of `qtrain plan` sizes without building an engine.
    pub fn for_micro_batch(
        opts: &EngineOptions,
        rank: usize,
        dropout: bool,
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
            dropout,
            elem,
            save_attention_residual: opts.save_attention_residual,
            save_mlp_activations: opts.save_mlp_activations,
        }
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
    /// One cross-entropy chunk: logits and their gradient.
    Logits,
    /// LoRA intermediates (`z = x Aᵀ`, dropout scratch).
    LoraScratch,
    /// The uploaded batch: ids, rotary tables, segments, targets.
    BatchInputs,
    /// Every layer's gate/up output, kept from the forward.
    MlpActivations,
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
            Component::Logits => "cross-entropy chunk (f32 logits + gradient)",
            Component::LoraScratch => "LoRA intermediates",
            Component::BatchInputs => "batch inputs (ids, RoPE tables, targets)",
            Component::MlpActivations => "kept gate/up outputs (no MLP recomputation)",
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
    pub buffers: Vec<BufferSpec>,
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
        let max_in = (n * h.max(qcols)).max(c * inter);
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
                cfg.num_hidden_layers * n * h,
                e,
            ),
            b("final_hidden", LayerActivations, n * h, e),
            b("h1", LayerActivations, n * h, e),
            b("inv1", LayerActivations, n, 4),
            b("qkv", LayerActivations, n * qc, e),
            b("attn", LayerActivations, n * qcols, e),
            b("lse", LayerActivations, stats, 4),
            b("x2", LayerActivations, n * h, e),
            b("inv2", LayerActivations, n, 4),
            b("h2", LayerActivations, n * h, e),
            b("dres", LayerActivations, n * h, e),
            b("dh", LayerActivations, n * h, e),
            b("dattn", LayerActivations, n * qcols, e),
            b("dqkv", LayerActivations, n * qc, e),
            b("attn_scratch", LayerActivations, stats, 4),
            b("m", MlpChunk, c * inter, e),
            b("dm", MlpChunk, c * inter, e),
            b("w_qkv", DequantWeights, qc * h, e),
            b("w_o", DequantWeights, h * qcols, e),
            b("w_gu", DequantWeights, 2 * inter * h, e),
            b("w_down", DequantWeights, h * inter, e),
            b("ce_hidden", Logits, cc * h, e),
            b("logits", Logits, cc * cfg.vocab_size, 4),
            b("dlogits", Logits, cc * cfg.vocab_size, e),
            b("ce_dhidden", Logits, cc * h, e),
            b("z", LoraScratch, qtrain_model::PROJECTIONS.len() * n * r, e),
            b("dz", LoraScratch, n * r, e),
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
        if cfg.has_qk_norm() {
            // Qwen 3: the norm's input stays in `qkv` for the backward, its
            // rotated output goes here; recomputed with the rest of the attention
            // half, so one layer's worth.
            let qk = (cfg.num_attention_heads + cfg.num_kv_heads()) * d;
            buffers.push(b("qk_normed", LayerActivations, n * qk, e));
            buffers.push(b("qk_inv", LayerActivations, n * qk / d, 4));
        }
        if shape.save_attention_residual {
            buffers.push(b(
                "attn_residuals",
                LayerInputs,
                cfg.num_hidden_layers * n * h,
                e,
            ));
        }
        if shape.save_mlp_activations {
            buffers.push(b(
                "mlp_activations",
                MlpActivations,
                cfg.num_hidden_layers * n * 2 * inter,
                e,
            ));
        } else {
            buffers.push(b("gu", MlpChunk, c * 2 * inter, e));
        }
        if shape.dropout {
            buffers.push(b("dropped_input", LoraScratch, max_in, e));
            buffers.push(b("lora_dx", LoraScratch, max_in, e));
        }
        Self { shape, buffers }
    }

    pub fn elems(&self, name: &str) -> usize {
        self.buffers
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no buffer {name} in the layout"))
            .elems
    }

    pub fn total_bytes(&self) -> usize {
        self.buffers.iter().map(BufferSpec::bytes).sum()
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
