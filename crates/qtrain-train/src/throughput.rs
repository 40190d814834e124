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
    /// The fused engine kept every layer's gate/up output (no gate/up recompute,
    /// `train.keep_mlp_activations`).
    pub mlp_kept: bool,
    /// Where the figure is written down.
    pub source: &'static str,
}

/// Every measured figure the estimates start from: the tables of docs/perf.md
/// ("Training-step throughput"), which name the commands that produced them. When
/// that doc gets new measurements (fused engine, other GPUs), copy them here.
pub const MEASURED: &[MeasuredThroughput] = &[
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 8,
        seq: 512,
        tokens_per_s: 19335.0,
        mlp_kept: true,
        source: "docs/perf.md v13 (same call as TRL + Liger and Unsloth, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 4,
        seq: 2048,
        tokens_per_s: 18189.0,
        mlp_kept: true,
        source: "docs/perf.md v13 (same call as TRL + Liger and Unsloth, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 8192,
        tokens_per_s: 14067.0,
        mlp_kept: true,
        source: "docs/perf.md v13 (same call as TRL + Liger and Unsloth, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 32768,
        tokens_per_s: 7464.0,
        mlp_kept: true,
        source: "docs/perf.md v13 (same call as TRL + Liger and Unsloth, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 8,
        seq: 512,
        tokens_per_s: 17573.0,
        mlp_kept: true,
        source: "docs/perf.md v13 (same call as TRL + Liger and Unsloth, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 4,
        seq: 2048,
        tokens_per_s: 16751.0,
        mlp_kept: true,
        source: "docs/perf.md v13 (same call as TRL + Liger and Unsloth, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 8192,
        tokens_per_s: 13223.0,
        mlp_kept: true,
        source: "docs/perf.md v13 (same call as TRL + Liger and Unsloth, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 32768,
        tokens_per_s: 7233.0,
        mlp_kept: true,
        source: "docs/perf.md v13 (same call as TRL + Liger and Unsloth, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 8,
        seq: 512,
        tokens_per_s: 13927.0,
        mlp_kept: false,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 4,
        seq: 2048,
        tokens_per_s: 13413.0,
        mlp_kept: false,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 8192,
        tokens_per_s: 10623.0,
        mlp_kept: false,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 8,
        seq: 512,
        tokens_per_s: 12881.0,
        mlp_kept: false,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 4,
        seq: 2048,
        tokens_per_s: 12477.0,
        mlp_kept: false,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 8192,
        tokens_per_s: 9979.0,
        mlp_kept: false,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::Attention,
        batch: 1,
        seq: 32768,
        tokens_per_s: 5791.0,
        mlp_kept: false,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h200",
        engine: EngineKind::Fused,
        targets: TargetSet::All,
        batch: 1,
        seq: 32768,
        tokens_per_s: 5616.0,
        mlp_kept: false,
        source: "docs/perf.md v13 (memory-saving: nothing kept, inputs offloaded; same call as the peers, 2026-12-06)",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Reference,
        targets: TargetSet::Attention,
        batch: 8,
        seq: 512,
        tokens_per_s: 1892.0,
        mlp_kept: false,
        source: "docs/perf.md v2",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Reference,
        targets: TargetSet::Attention,
        batch: 4,
        seq: 2048,
        tokens_per_s: 1052.0,
        mlp_kept: false,
        source: "docs/perf.md v2",
    },
    MeasuredThroughput {
        gpu: "h100",
        engine: EngineKind::Reference,
        targets: TargetSet::All,
        batch: 8,
        seq: 512,
        tokens_per_s: 1459.0,
        mlp_kept: false,
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
/// `seq` on `gpu`, keeping the gate/up outputs or not (`mlp_kept`).
pub fn estimate(
    model: &ModelConfig,
    targets: &[Proj],
    engine: EngineKind,
    seq: usize,
    mlp_kept: bool,
    gpu: &GpuSpec,
) -> Estimate {
    estimate_from(MEASURED, model, targets, engine, seq, mlp_kept, gpu)
}

/// [`estimate`] from the measurements `measured` (without one of `engine`: an
/// assumed utilization, said so in the basis).
pub fn estimate_from(
    measured: &[MeasuredThroughput],
    model: &ModelConfig,
    targets: &[Proj],
    engine: EngineKind,
    seq: usize,
    mlp_kept: bool,
    gpu: &GpuSpec,
) -> Estimate {
    let set = TargetSet::of(targets);
    let want = flops_per_token(model, seq);
    // The measurement of this engine closest to the configuration: the same
    // recomputation first, then the same targets, then the nearest sequence length
    // (attention's share grows with it).
    let best = measured
        .iter()
        .filter(|m| m.engine == engine)
        .min_by(|a, b| {
            let key = |m: &MeasuredThroughput| {
                (
                    (m.mlp_kept != mlp_kept) as u8,
                    (m.targets != set) as u8,
                    ((m.seq as f64) / (seq as f64)).ln().abs(),
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
                    if m.mlp_kept { ", gate/up kept" } else { "" },
                    m.source,
                    gpu.tensor_tflops,
                    measured_gpu.tensor_tflops,
                    if m.targets == set && m.seq == seq {
                        String::new()
                    } else {
                        ", scaled by FLOPs per token".into()
                    },
                    match (m.mlp_kept, mlp_kept) {
                        (false, true) => "; this run keeps the gate/up outputs (14-23% faster on the H200)",
                        (true, false) => "; this run recomputes the gate/up product (14-23% slower on the H200)",
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
        let e = estimate(&m7, &qkvo, EngineKind::Reference, 512, false, h100);
        assert!((e.tokens_per_s - 1892.0).abs() < 1e-6, "{e:?}");
        let a10 = gpu::preset("a10").unwrap();
        let slow = estimate(&m7, &qkvo, EngineKind::Reference, 512, false, a10);
        assert!((slow.tokens_per_s - 1892.0 * 125.0 / 989.4).abs() < 1e-6);
        assert!(slow.basis.contains("h100"), "{}", slow.basis);
        // Longer rows cost more attention per token.
        let long = estimate(&m7, &qkvo, EngineKind::Reference, 4096, false, h100);
        assert!(long.tokens_per_s < 1052.0, "{long:?}");
        // The fused engine's figure comes from the H200 (same dense TFLOP/s as the H100).
        let h200 = gpu::preset("h200").unwrap();
        let f = estimate(&m7, &qkvo, EngineKind::Fused, 512, false, h100);
        let want = 13927.0 * h100.tensor_tflops / h200.tensor_tflops;
        assert!((f.tokens_per_s - want).abs() < 1e-6, "{f:?}");
        assert!(f.basis.contains("h200"), "{}", f.basis);
        // Keeping the gate/up outputs picks the measurement that kept them.
        let k = estimate(&m7, &qkvo, EngineKind::Fused, 512, true, h100);
        let want = 19335.0 * h100.tensor_tflops / h200.tensor_tflops;
        assert!((k.tokens_per_s - want).abs() < 1e-6, "{k:?}");
        assert!(
            k.basis.contains("gate/up kept") && k.basis.contains("v13"),
            "{}",
            k.basis
        );
        // Between two measured lengths: the nearest one, scaled by FLOPs per token.
        let long = estimate(&m7, &qkvo, EngineKind::Fused, 24576, true, h100);
        assert!(
            long.basis.contains("1x32768") && long.basis.contains("scaled"),
            "{}",
            long.basis
        );
        assert!(
            long.tokens_per_s > 7464.0 && long.tokens_per_s < 14067.0,
            "{long:?}"
        );
        // Without a measurement of the engine the assumption is spelled out.
        let f = estimate_from(&[], &m7, &qkvo, EngineKind::Fused, 512, false, h100);
        assert!(f.basis.contains("assumes"), "{}", f.basis);
        let mfu = f.tokens_per_s * flops_per_token(&m7, 512) / (989.4e12);
        assert!((mfu - ASSUMED_MFU).abs() < 1e-9);
    }
}
