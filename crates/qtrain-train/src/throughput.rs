//! Estimated training throughput (tokens/s) of a configuration on a GPU, for the
//! time estimate of `qtrain plan`: a measured figure of the same step
//! implementation (from [`MEASURED`]) scaled by the ratio of the GPUs' dense tensor
//! TFLOP/s and by the ratio of the models' FLOPs per token. This ignores memory
//! bandwidth (the dequantization reads are ~15% of an H100 step, more on GDDR
//! cards), so treat estimates for GPUs far from the measured ones as rough.

use crate::gpu::{self, GpuSpec};
use crate::memory::EngineKind;
use qtrain_model::{ModelConfig, Proj, PROJECTIONS};

/// Which adapters a measurement trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSet {
    /// q, k, v, o.
    Attention,
    /// All seven projections (the MLP's LoRA GEMMs cost noticeably more).
    All,
}

impl TargetSet {
    pub fn of(targets: &[Proj]) -> Self {
        if targets
            .iter()
            .any(|p| matches!(p, Proj::Gate | Proj::Up | Proj::Down))
        {
            TargetSet::All
        } else {
            TargetSet::Attention
        }
    }
}

/// What a step keeps from its forward, as far as the estimates tell steps apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recompute {
    /// Every layer's attention half (`train.keep_attention_residuals`): no q/k/v
    /// product, RoPE or attention forward in the backward.
    pub attention_half_kept: bool,
    /// Every layer's gate/up output (`train.keep_mlp_activations`): no gate/up
    /// product in the backward.
    pub mlp_kept: bool,
}

/// Both halves kept: the fused engine's defaults where they fit.
pub const ALL_KEPT: Recompute = Recompute {
    attention_half_kept: true,
    mlp_kept: true,
};
/// The attention half kept, the gate/up product recomputed (the memory-saving
/// set-up since v16).
pub const HALF_KEPT: Recompute = Recompute {
    attention_half_kept: true,
    mlp_kept: false,
};
/// Nothing kept (v13's memory-saving set-up; the reference engine).
pub const NOTHING_KEPT: Recompute = Recompute {
    attention_half_kept: false,
    mlp_kept: false,
};

/// One measured training throughput on the Mistral-7B v0.3 shape: LoRA r16, 8-bit
/// AdamW, gradient checkpointing, `qtrain bench`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeasuredThroughput {
    /// A `--gpu` key of [`gpu::GPUS`].
    pub gpu: &'static str,
    pub engine: EngineKind,
    pub targets: TargetSet,
    pub batch: usize,
    pub seq: usize,
    pub tokens_per_s: f64,
    /// What the fused engine kept from the forward.
    pub kept: Recompute,
    /// Where the figure is written down.
    pub source: &'static str,
}

/// Every measured figure the estimates start from: the tables of docs/perf.md
/// ("Training-step throughput"), which name the commands that produced them. When
/// that doc gets new measurements (fused engine, other GPUs), copy them here. The
/// fused engine's figures dequantize the frozen base every pass (`--keep-base off`
/// where it would have been kept): `memory::throughput_estimate` takes the counted
/// dequantization off where a run keeps the base. For a GPU without figures of its
/// own, equally close ones of two GPUs resolve to the first listed: the H200's.
pub const MEASURED: &[MeasuredThroughput] = &[
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 8,
        seq: 512,
        tokens_per_s: 19545.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v18 (same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 4,
        seq: 2048,
        tokens_per_s: 18397.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v18 (same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 8192,
        tokens_per_s: 14134.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v18 (same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 32768,
        tokens_per_s: 7444.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v18 (same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 8,
        seq: 512,
        tokens_per_s: 17905.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v18 (same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 4,
        seq: 2048,
        tokens_per_s: 16874.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v18 (same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 8192,
        tokens_per_s: 13312.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v18 (same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 32768,
        tokens_per_s: 7223.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v18 (same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 8,
        seq: 512,
        tokens_per_s: 15613.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v18 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 4,
        seq: 2048,
        tokens_per_s: 14981.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v18 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 8192,
        tokens_per_s: 12099.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v18 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 32768,
        tokens_per_s: 6893.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v18 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 8,
        seq: 512,
        tokens_per_s: 14010.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v18 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 4,
        seq: 2048,
        tokens_per_s: 13704.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v18 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 8192,
        tokens_per_s: 11204.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v18 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 32768,
        tokens_per_s: 6566.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v18 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 8,
        seq: 512,
        tokens_per_s: 13927.0,
        kept: NOTHING_KEPT,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 4,
        seq: 2048,
        tokens_per_s: 13413.0,
        kept: NOTHING_KEPT,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 8192,
        tokens_per_s: 10623.0,
        kept: NOTHING_KEPT,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 32768,
        tokens_per_s: 5791.0,
        kept: NOTHING_KEPT,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 8,
        seq: 512,
        tokens_per_s: 12881.0,
        kept: NOTHING_KEPT,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 4,
        seq: 2048,
        tokens_per_s: 12477.0,
        kept: NOTHING_KEPT,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 8192,
        tokens_per_s: 9979.0,
        kept: NOTHING_KEPT,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 32768,
        tokens_per_s: 5616.0,
        kept: NOTHING_KEPT,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 8,
        seq: 512,
        tokens_per_s: 18761.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v19 (`--keep-base off`; same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 4,
        seq: 2048,
        tokens_per_s: 17723.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v19 (`--keep-base off`; same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 8192,
        tokens_per_s: 13777.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v19 (`--keep-base off`; same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 32768,
        tokens_per_s: 7289.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v19 (`--keep-base off`; same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 32768,
        tokens_per_s: 7072.0,
        kept: ALL_KEPT,
        source: "docs/perf.md v19 (the base not kept at this length; same call as TRL + Liger and Unsloth, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 8,
        seq: 512,
        tokens_per_s: 15032.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v19 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 4,
        seq: 2048,
        tokens_per_s: 14488.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v19 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 8192,
        tokens_per_s: 11787.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v19 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 32768,
        tokens_per_s: 6703.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v19 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 8,
        seq: 512,
        tokens_per_s: 13535.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v19 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 4,
        seq: 2048,
        tokens_per_s: 13126.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v19 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 8192,
        tokens_per_s: 10840.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v19 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 32768,
        tokens_per_s: 6437.0,
        kept: HALF_KEPT,
        source: "docs/perf.md v19 (memory-saving: attention half kept, gate/up recomputed, inputs offloaded; same call as the peers, 2026-12-07)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Reference,
        targets: TargetSet::Attention,
        batch: 8,
        seq: 512,
        tokens_per_s: 1892.0,
        kept: NOTHING_KEPT,
        source: "docs/perf.md v2",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Reference,
        targets: TargetSet::Attention,
        batch: 4,
        seq: 2048,
        tokens_per_s: 1052.0,
        kept: NOTHING_KEPT,
        source: "docs/perf.md v2",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Reference,
        targets: TargetSet::All,
        batch: 8,
        seq: 512,
        tokens_per_s: 1459.0,
        kept: NOTHING_KEPT,
        source: "docs/perf.md v2",
    },
];

/// Model FLOPs utilization assumed for a step implementation with no measured
/// figure yet (labelled as an assumption wherever it is used).
pub const ASSUMED_MFU: f64 = 0.35;

/// Training FLOPs per token with checkpointing: forward, recomputed forward and
/// backward (dX only for the frozen weights) over every matmul weight, 6P, plus
/// causal attention (`qtrain bench`'s convention).
pub fn flops_per_token(cfg: &ModelConfig, seq: usize) -> f64 {
    let matmul: usize = PROJECTIONS
        .iter()
        .map(|&p| cfg.proj_shape(p).iter().product::<usize>())
        .sum::<usize>()
        * cfg.num_hidden_layers
        + cfg.vocab_size * cfg.hidden_size;
    let attn =
        2.0 * (cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim()) as f64;
    6.0 * matmul as f64 + 4.0 * attn
}

/// An estimate and how it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub tokens_per_s: f64,
    pub basis: String,
}

/// Tokens/s of `engine` training `targets` adapters of `model` at sequence length
/// `seq` on `gpu`, keeping what `kept` says.
pub fn estimate(
    model: &ModelConfig,
    targets: &[Proj],
    engine: EngineKind,
    seq: usize,
    kept: Recompute,
    gpu: &GpuSpec,
) -> Estimate {
    estimate_from(MEASURED, model, targets, engine, seq, kept, gpu)
}

/// [`estimate`] from the measurements `measured` (without one of `engine`: an
/// assumed utilization, said so in the basis).
pub fn estimate_from(
    measured: &[MeasuredThroughput],
    model: &ModelConfig,
    targets: &[Proj],
    engine: EngineKind,
    seq: usize,
    kept: Recompute,
    gpu: &GpuSpec,
) -> Estimate {
    let set = TargetSet::of(targets);
    let want = flops_per_token(model, seq);
    // The measurement of this engine closest to the configuration: the same
    // recomputation first (the gate/up product, the larger saving, then the
    // attention half), then the same targets, then the nearest sequence length
    // (attention's share grows with it), then one on the same GPU (an H100 runs
    // ~3% below an H200 of the same dense rate, at its power cap: docs/perf.md v12).
    let best = measured
        .iter()
        .filter(|m| m.engine == engine)
        .min_by(|a, b| {
            let key = |m: &MeasuredThroughput| {
                (
                    (m.kept.mlp_kept != kept.mlp_kept) as u8,
                    (m.kept.attention_half_kept != kept.attention_half_kept) as u8,
                    (m.targets != set) as u8,
                    ((m.seq as f64) / (seq as f64)).ln().abs(),
                    (m.gpu != gpu.key) as u8,
                )
            };
            key(a).partial_cmp(&key(b)).expect("finite keys")
        });
    let name = match engine {
        EngineKind::Fused => "fused",
        EngineKind::Reference => "reference",
    };
    match best.and_then(|m| gpu::preset(m.gpu).ok().map(|g| (m, g))) {
        Some((m, measured_gpu)) => {
            let shape = ModelConfig::preset("mistral-7b-v0.3", 0).expect("preset");
            let tps = m.tokens_per_s
                * (gpu.tensor_tflops / measured_gpu.tensor_tflops)
                * (flops_per_token(&shape, m.seq) / want);
            Estimate {
                tokens_per_s: tps,
                basis: format!(
                    "measured {:.0} tokens/s on {} ({name}, {}x{}, {}{}; {}) x {:.0}/{:.0} TFLOP/s{}{}",
                    m.tokens_per_s,
                    measured_gpu.key,
                    m.batch,
                    m.seq,
                    match m.targets {
                        TargetSet::Attention => "q,k,v,o",
                        TargetSet::All => "all seven",
                    },
                    kept_words(m.kept),
                    m.source,
                    gpu.tensor_tflops,
                    measured_gpu.tensor_tflops,
                    if m.targets == set && m.seq == seq {
                        String::new()
                    } else {
                        ", scaled by FLOPs per token".into()
                    },
                    match (m.kept.mlp_kept, kept.mlp_kept) {
                        (false, true) => "; this run keeps the gate/up outputs (14-23% faster on the H200)",
                        (true, false) => "; this run recomputes the gate/up product (14-23% slower on the H200)",
                        _ if m.kept != kept => "; this run keeps a different attention half",
                        _ => "",
                    }
                ),
            }
        }
        None => Estimate {
            tokens_per_s: ASSUMED_MFU * gpu.tensor_tflops * 1e12 / want,
            basis: format!(
                "no measurement of the {name} engine yet: assumes {:.0}% of the {:.0} TFLOP/s \
                 datasheet peak",
                100.0 * ASSUMED_MFU,
                gpu.tensor_tflops
            ),
        },
    }
}

/// What a measurement kept, for an estimate's basis.
fn kept_words(k: Recompute) -> &'static str {
    match (k.attention_half_kept, k.mlp_kept) {
        (true, true) => ", all kept",
        (true, false) => ", attention half kept",
        (false, true) => ", gate/up kept",
        (false, false) => ", nothing kept",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_measurement_names_a_known_gpu() {
        for m in MEASURED {
            assert!(gpu::preset(m.gpu).is_ok(), "{}", m.gpu);
            assert!(m.tokens_per_s > 0.0 && m.source.contains("docs/"));
        }
    }

    #[test]
    fn estimates_scale_with_the_gpu_and_reproduce_the_measurement() {
        let m7 = ModelConfig::preset("mistral-7b-v0.3", 0).unwrap();
        let qkvo = [Proj::Q, Proj::K, Proj::V, Proj::O];
        let h100 = gpu::preset("h100").unwrap();
        let e = estimate(&m7, &qkvo, EngineKind::Reference, 512, NOTHING_KEPT, h100);
        assert!((e.tokens_per_s - 1892.0).abs() < 1e-6, "{e:?}");
        let a10 = gpu::preset("a10").unwrap();
        let slow = estimate(&m7, &qkvo, EngineKind::Reference, 512, NOTHING_KEPT, a10);
        assert!((slow.tokens_per_s - 1892.0 * 125.0 / 989.4).abs() < 1e-6);
        assert!(slow.basis.contains("h100"), "{}", slow.basis);
        // Longer rows cost more attention per token.
        let long = estimate(&m7, &qkvo, EngineKind::Reference, 4096, NOTHING_KEPT, h100);
        assert!(long.tokens_per_s < 1052.0, "{long:?}");
        // The fused engine on a GPU without its own figures: the H200's, scaled by
        // the dense TFLOP/s, one per recomputation: nothing kept, the attention
        // half, both.
        let h200 = gpu::preset("h200").unwrap();
        let a100 = gpu::preset("a100-80").unwrap();
        let at = |kept, seq| estimate(&m7, &qkvo, EngineKind::Fused, seq, kept, a100);
        let scaled = |tps: f64| tps * a100.tensor_tflops / h200.tensor_tflops;
        for (kept, tps, words) in [
            (NOTHING_KEPT, 13927.0, "nothing kept"),
            (HALF_KEPT, 15613.0, "attention half kept"),
            (ALL_KEPT, 19545.0, "all kept"),
        ] {
            let e = at(kept, 512);
            assert!((e.tokens_per_s - scaled(tps)).abs() < 1e-6, "{e:?}");
            assert!(
                e.basis.contains("h200") && e.basis.contains(words),
                "{}",
                e.basis
            );
        }
        // On a GPU with its own figure of the same case, that one (the H100 runs ~3%
        // below the H200 at its power cap); where it has none (nothing kept), the
        // H200's, scaled.
        let on_h100 = estimate(&m7, &qkvo, EngineKind::Fused, 2048, ALL_KEPT, h100);
        assert!((on_h100.tokens_per_s - 17723.0).abs() < 1e-6, "{on_h100:?}");
        assert!(on_h100.basis.contains("on h100") && on_h100.basis.contains("v19"));
        let none_h100 = estimate(&m7, &qkvo, EngineKind::Fused, 2048, NOTHING_KEPT, h100);
        assert!(
            (none_h100.tokens_per_s - 13413.0).abs() < 1e-6,
            "{none_h100:?}"
        );
        assert!(none_h100.basis.contains("on h200"), "{}", none_h100.basis);
        // The gate/up outputs without the half: the kept gate/up's measurement,
        // said to differ in the half.
        let gate_up = Recompute {
            attention_half_kept: false,
            mlp_kept: true,
        };
        let g = at(gate_up, 512);
        assert!((g.tokens_per_s - scaled(19545.0)).abs() < 1e-6, "{g:?}");
        assert!(g.basis.contains("different attention half"), "{}", g.basis);
        // Between two measured lengths: the nearest one, scaled by FLOPs per token.
        let long = at(ALL_KEPT, 24576);
        assert!(
            long.basis.contains("1x32768") && long.basis.contains("scaled"),
            "{}",
            long.basis
        );
        assert!(
            long.tokens_per_s > scaled(7444.0) && long.tokens_per_s < scaled(14134.0),
            "{long:?}"
        );
        // Without a measurement of the engine the assumption is spelled out.
        let f = estimate_from(&[], &m7, &qkvo, EngineKind::Fused, 512, NOTHING_KEPT, h100);
        assert!(f.basis.contains("assumes"), "{}", f.basis);
        let mfu = f.tokens_per_s * flops_per_token(&m7, 512) / (989.4e12);
        assert!((mfu - ASSUMED_MFU).abs() < 1e-9);
    }
}
