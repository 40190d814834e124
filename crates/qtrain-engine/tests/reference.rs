//! The fused engine on the CPU (every kernel's reference) against the candle-ops
//! reference step `qtrain_reference::forward_backward`: the same loss and the same LoRA
//! gradients, with GQA, packed documents, a sliding window, dropout, NF4 weights,
//! MLP and cross-entropy chunking, and accumulation over micro-batches; and every
//! family's extras (biases, Qwen 3's q/k norms, the RoPE variants).

#[path = "../../qtrain-reference/tests/common/mod.rs"]
mod common;
#[path = "../../qtrain-reference/tests/family_configs/mod.rs"]
mod family_configs;

use candle_core::{DType, Device, Tensor};
use common::*;
use family_configs::small_family_config;
use qtrain_engine::{Engine, EngineOptions, WorkspaceLayout, ALL_LAYERS};
use qtrain_model::{BaseModel, FrozenStorage, Proj, PROJECTIONS};
use qtrain_reference::{forward_backward, forward_loss};
use qtrain_step::{HostTensor, LoraConfig, LoraGrads, LoraWeights, StepOptions, TokenBatch};

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = a
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()))
        / scale
}

/// Runs both paths over `batches` (one optimizer step of several micro-batches) and
/// compares the summed loss and every gradient tensor.
fn compare(
    base: &BaseModel,
    lora: &LoraWeights,
    batches: &[TokenBatch],
    opts: EngineOptions,
    tol: f64,
) {
    let denom: f64 = batches.iter().map(|b| b.valid_targets() as f64).sum();
    let mut ref_grads = LoraGrads::zeros_like(lora).unwrap();
    let mut engine = Engine::<f32>::new(base, lora, opts).unwrap();
    let (mut ref_loss, mut eng_loss) = (0.0, 0.0);
    for (i, b) in batches.iter().enumerate() {
        let so = StepOptions {
            checkpointing: true,
            dropout_seed: 11,
            micro_step: i as u64,
        };
        let r = forward_backward(base, lora, b, &so, denom, &mut ref_grads).unwrap();
        let e = engine.forward_backward(b, &so, denom).unwrap();
        assert_eq!(r.valid_tokens, e.valid_tokens);
        ref_loss += r.loss_sum;
        eng_loss += e.loss_sum;
    }
    let rel = (ref_loss - eng_loss).abs() / ref_loss.abs();
    assert!(
        rel < tol,
        "loss {eng_loss} vs reference {ref_loss} (rel {rel:.2e})"
    );
    let want = ref_grads.to_host().unwrap();
    let got = engine.lora().grads_to_host(engine.device()).unwrap();
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w.0, g.0);
        assert_eq!(w.2, g.2);
        let e = max_rel(&w.1, &g.1);
        assert!(
            w.1.iter().any(|&x| x != 0.0),
            "{} has a zero reference gradient",
            w.0
        );
        assert!(e < tol, "{}: max rel error {e:.2e}", w.0);
    }
}

#[test]
fn matches_reference_with_gqa_packing_and_all_targets() {
    let cfg = small_config(61, None);
    let (base, _) = random_base(&cfg, 1, DType::F32);
    let lora = random_lora(&cfg, &all_targets_config(0.0), 2, DType::F32);
    compare(
        &base,
        &lora,
        &[packed_batch(61, 12, 3)],
        EngineOptions::default(),
        2e-5,
    );
}

/// Without dropout the adapters of q/k/v and of gate/up run as stacked groups (one
/// `z` product over the shared input, one input-gradient product): a group that
/// skips a member (q and v, no k), a member alone (up), every target, with both
/// halves kept or recomputed and the MLP in chunks, all match the reference.
#[test]
fn stacked_adapter_groups_match_the_reference() {
    let cfg = small_config(61, None);
    let (base, _) = random_base(&cfg, 8, DType::F32);
    // q/k/v/o: nothing reads the SwiGLU output in the backward, which then leaves it
    // unrecomputed (stale from the forward's last chunk: any reader would be wrong).
    for targets in [
        vec![Proj::Q, Proj::V, Proj::Up, Proj::Down],
        vec![Proj::Q, Proj::K, Proj::V, Proj::O],
        PROJECTIONS.to_vec(),
    ] {
        let lc = LoraConfig {
            targets,
            ..all_targets_config(0.0)
        };
        let lora = random_lora(&cfg, &lc, 9, DType::F32);
        for kept in [false, true] {
            let opts = EngineOptions {
                mlp_chunk: 10,
                save_attention_residual: kept,
                kept_mlp_layers: if kept { ALL_LAYERS } else { 0 },
                ..EngineOptions::default()
            };
            compare(
                &base,
                &lora,
                &[packed_batch(61, 12, 3), random_rows(61, 2, 12, 4)],
                opts,
                2e-5,
            );
        }
    }
}

#[test]
fn matches_reference_with_sliding_window_and_dropout() {
    let cfg = small_config(61, Some(4));
    let (base, _) = random_base(&cfg, 4, DType::F32);
    let lora = random_lora(&cfg, &all_targets_config(0.25), 5, DType::F32);
    compare(
        &base,
        &lora,
        &[packed_batch(61, 13, 6), random_rows(61, 2, 13, 7)],
        EngineOptions::default(),
        2e-5,
    );
}

#[test]
fn segment_ids_that_fall_along_a_row_are_refused() {
    // The attention kernels find the tiles of a packed document by binary search over
    // the ids, so a document must be one run with ids rising along the row.
    let cfg = small_config(61, None);
    let (base, _) = random_base(&cfg, 1, DType::F32);
    let lora = random_lora(&cfg, &all_targets_config(0.0), 2, DType::F32);
    let good = packed_batch(61, 12, 3);
    let mut seg = good.segment_ids.clone();
    seg[12 + 7] = 4; // row 1 holds 5s: 5, .., 5, 4, 5, ..
    let bad = TokenBatch::new(
        good.input_ids.clone(),
        good.labels.clone(),
        good.position_ids.clone(),
        seg,
        2,
        12,
    )
    .unwrap();
    let mut engine = Engine::<f32>::new(&base, &lora, EngineOptions::default()).unwrap();
    let so = StepOptions {
        checkpointing: true,
        dropout_seed: 1,
        micro_step: 0,
    };
    let err = engine
        .forward_backward(&bad, &so, bad.valid_targets() as f64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("segment ids must not decrease")
            && err.contains("row 1 goes from 5 to 4 at position 7"),
        "{err}"
    );
    engine
        .forward_backward(&good, &so, good.valid_targets() as f64)
        .unwrap();
}

#[test]
fn chunked_mlp_and_cross_entropy_match_the_reference() {
    let cfg = small_config(61, None);
    let (base, _) = random_base(&cfg, 8, DType::F32);
    let lcfg = LoraConfig {
        targets: vec![Proj::Q, Proj::V, Proj::Down],
        ..all_targets_config(0.1)
    };
    let lora = random_lora(&cfg, &lcfg, 9, DType::F32);
    let opts = EngineOptions {
        mlp_chunk: 5,
        ce_chunk: 7,
        ..EngineOptions::default()
    };
    compare(&base, &lora, &[random_rows(61, 3, 9, 10)], opts, 2e-5);
}

/// Quantizes every projection of `base` to NF4 (block 64, double quantization), the
/// way the CPU loader stores it.
fn quantize_nf4(base: &mut BaseModel) {
    for layer in &mut base.layers {
        for fl in &mut layer.projs {
            let FrozenStorage::Dense(t) = &fl.storage else {
                unreachable!()
            };
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let q =
                qtrain_quant::Nf4Tensor::quantize(&v, &[fl.out_features, fl.in_features], 64, true)
                    .unwrap();
            fl.storage = FrozenStorage::Nf4(q);
        }
    }
}

#[test]
fn nf4_base_matches_reference() {
    let cfg = small_config(61, None);
    let mut base = random_base(&cfg, 12, DType::F32).0;
    quantize_nf4(&mut base);
    let lora = random_lora(&cfg, &all_targets_config(0.0), 13, DType::F32);
    compare(
        &base,
        &lora,
        &[random_rows(61, 2, 8, 14)],
        EngineOptions::default(),
        2e-5,
    );
}

/// The other families' math in the engine: Qwen 2.5's q/k/v biases (frozen: no
/// gradient of their own, added to the product before the LoRA term), Llama's
/// `attention_bias`/`mlp_bias` on all seven projections (the o and down biases meet
/// the fused residual adds), Qwen 3's per-head q/k norms before RoPE (forward and
/// backward, head_dim 12 not hidden / heads), Llama 3.1's RoPE scaling and Qwen's
/// YaRN (the tables of the model's variant), with GQA, packed documents, dropout
/// and MLP chunks; the same loss and gradients as the reference decoder, with every
/// adapter's gradient non-zero.
#[test]
fn families_match_the_reference() {
    for (i, family) in ["qwen2", "qwen3", "llama-bias", "llama3", "yarn"]
        .into_iter()
        .enumerate()
    {
        let cfg = small_family_config(61, family);
        let seed = 40 + 10 * i as u64;
        let (base, _) = random_base(&cfg, seed, DType::F32);
        let lora = random_lora(&cfg, &all_targets_config(0.1), seed + 1, DType::F32);
        let opts = EngineOptions {
            mlp_chunk: 7,
            ..EngineOptions::default()
        };
        compare(
            &base,
            &lora,
            &[
                packed_batch(61, 12, seed + 2),
                random_rows(61, 2, 12, seed + 3),
            ],
            opts,
            2e-5,
        );
    }
}

/// Qwen 3 with the attention residual and the gate/up output kept (the backward's
/// recomputation then skips the attention and the o projection but still rebuilds
/// the q/k norms):
/// the reference's loss and gradients, and the workspace holds exactly the
/// layout's bytes, q/k norm buffers included.
#[test]
fn qwen3_with_kept_activations_matches_the_reference_and_the_layout() {
    let cfg = small_family_config(61, "qwen3");
    let (base, _) = random_base(&cfg, 91, DType::F32);
    let lora = random_lora(&cfg, &all_targets_config(0.2), 92, DType::F32);
    let opts = EngineOptions {
        save_attention_residual: true,
        kept_mlp_layers: ALL_LAYERS,
        ..EngineOptions::default()
    };
    compare(&base, &lora, &[packed_batch(61, 10, 93)], opts, 2e-5);
    let mut engine = Engine::<f32>::new(&base, &lora, opts).unwrap();
    let before = engine.device().held_bytes();
    engine.forward_loss(&packed_batch(61, 10, 94)).unwrap();
    let layout = engine.workspace_layout(2, 10);
    assert_eq!(engine.device().held_bytes() - before, layout.total_bytes());
    // Kept per layer like q/k/v: the norms' rotated outputs and statistics.
    let (n, d, layers) = (20, cfg.head_dim(), cfg.num_hidden_layers);
    let qk = (cfg.num_attention_heads + cfg.num_kv_heads()) * d;
    assert_eq!(layout.elems("qk_normed_outputs"), layers * n * qk);
    assert_eq!(layout.elems("qk_inv_outputs"), layers * n * qk / d);
    assert!(layout.buffers.iter().all(|b| b.name != "qk_normed"));
    // Recomputing them instead changes no bit.
    let batches = [packed_batch(61, 11, 95), random_rows(61, 2, 11, 96)];
    let recomputed = EngineOptions {
        save_attention_residual: false,
        ..opts
    };
    let (l0, g0, layout0, _) = train_micro_steps(&base, &lora, recomputed, &batches, 2);
    let (l1, g1, _, _) = train_micro_steps(&base, &lora, opts, &batches, 2);
    assert_eq!(layout0.elems("qk_normed"), 22 * qk);
    assert_eq!(layout0.elems("qk_inv"), 22 * qk / d);
    assert_eq!(l0, l1);
    assert_eq!(g0, g1);
}

/// A Qwen 3 base without its q/k norm weights is refused by the engine, never run
/// as a model without norms.
#[test]
fn qwen3_without_norm_weights_is_refused() {
    let cfg = small_family_config(61, "qwen3");
    let (mut base, _) = random_base(&cfg, 95, DType::F32);
    base.layers[1].q_norm = None;
    base.layers[1].k_norm = None;
    let lora = random_lora(&cfg, &all_targets_config(0.0), 96, DType::F32);
    let err = match Engine::<f32>::new(&base, &lora, EngineOptions::default()) {
        Ok(_) => panic!("a Qwen 3 without q/k norms was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("layer 1") && err.contains("q/k norm"), "{err}");
}

/// The bias is really added: dropping the model's biases changes the engine's
/// loss (the comparison above would also pass if both sides ignored them).
#[test]
fn biases_change_the_engine_loss() {
    let cfg = small_family_config(61, "qwen2");
    let (mut base, _) = random_base(&cfg, 71, DType::F32);
    let lora = random_lora(&cfg, &all_targets_config(0.0), 72, DType::F32);
    let batch = random_rows(61, 2, 10, 73);
    let loss = |base: &BaseModel| {
        let mut e = Engine::<f32>::new(base, &lora, EngineOptions::default()).unwrap();
        e.forward_loss(&batch).unwrap().loss_sum
    };
    let with = loss(&base);
    let want = forward_loss(&base, Some(&lora), &batch).unwrap().loss_sum;
    assert!((with - want).abs() / want < 1e-5, "{with} vs {want}");
    for layer in &mut base.layers {
        for p in [Proj::Q, Proj::K, Proj::V] {
            assert!(layer.projs[p.index()].bias.take().is_some());
        }
    }
    let without = loss(&base);
    assert!(
        (with - without).abs() / with > 1e-3,
        "biases did not change the loss: {with} vs {without}"
    );
}

#[test]
fn eval_loss_and_workspace_memory_match_the_plan() {
    let cfg = small_config(61, Some(5));
    let (base, _) = random_base(&cfg, 15, DType::F32);
    let lora = random_lora(&cfg, &all_targets_config(0.1), 16, DType::F32);
    let batch = packed_batch(61, 10, 17);
    let mut engine = Engine::<f32>::new(&base, &lora, EngineOptions::default()).unwrap();
    let before = engine.device().held_bytes();
    let e = engine.forward_loss(&batch).unwrap();
    let r = forward_loss(&base, Some(&lora), &batch).unwrap();
    assert_eq!(e.valid_tokens, r.valid_tokens);
    assert!(
        (e.loss_sum - r.loss_sum).abs() / r.loss_sum < 1e-5,
        "{} vs {}",
        e.loss_sum,
        r.loss_sum
    );
    let layout = engine.workspace_layout(2, 10);
    assert_eq!(engine.device().held_bytes() - before, layout.total_bytes());
    assert_eq!(engine.workspace_bytes(), layout.total_bytes());
    // The breakdown covers every byte.
    assert_eq!(
        layout.by_component().iter().map(|c| c.1).sum::<usize>(),
        layout.total_bytes()
    );
}

#[test]
fn parameters_round_trip_through_the_host_and_bad_tensors_are_refused() {
    let cfg = small_config(61, None);
    let (base, _) = random_base(&cfg, 18, DType::F32);
    let lora = random_lora(&cfg, &all_targets_config(0.0), 19, DType::F32);
    let engine = Engine::<f32>::new(&base, &lora, EngineOptions::default()).unwrap();
    let dev = engine.device();
    let host = engine.lora().params_to_host(dev).unwrap();
    assert_eq!(host, lora.to_host().unwrap());
    let mut changed = host.clone();
    changed[3].1[0] += 1.0;
    engine.lora().params_from_host(dev, &changed).unwrap();
    assert_eq!(engine.lora().params_to_host(dev).unwrap(), changed);
    let mut bad = host.clone();
    bad[0].2 = vec![1, 1];
    let err = engine
        .lora()
        .params_from_host(dev, &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&host[0].0) && err.contains("shape"), "{err}");
    let err = engine
        .lora()
        .params_from_host(dev, &host[1..])
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}

/// Trains `batches` (2 rows of 11 tokens each) as consecutive micro-steps of a fresh
/// engine of `opts`, with checkpointing and dropout seeded by `dropout_seed`: the
/// summed loss, the LoRA gradients, the workspace layout of that shape (which the
/// engine's own count must equal) and the bytes the engine's device took for it.
fn train_micro_steps(
    base: &BaseModel,
    lora: &LoraWeights,
    opts: EngineOptions,
    batches: &[TokenBatch],
    dropout_seed: u64,
) -> (f64, Vec<HostTensor>, WorkspaceLayout, usize) {
    let mut engine = Engine::<f32>::new(base, lora, opts).unwrap();
    let before = engine.device().held_bytes();
    let mut loss = 0.0;
    for (i, b) in batches.iter().enumerate() {
        let so = StepOptions {
            checkpointing: true,
            dropout_seed,
            micro_step: i as u64,
        };
        loss += engine.forward_backward(b, &so, 40.0).unwrap().loss_sum;
    }
    let layout = engine.workspace_layout(2, 11);
    assert_eq!(engine.workspace_bytes(), layout.total_bytes());
    let held = engine.device().held_bytes() - before;
    let grads = engine.lora().grads_to_host(engine.device()).unwrap();
    (loss, grads, layout, held)
}

/// Keeping each layer's attention residual and/or its gate/up output only removes
/// recomputation: the same loss and bit-identical gradients as recomputing them,
/// with dropout on every adapter's input (down's included, whose SwiGLU input the
/// kept path rebuilds), a window, packed documents, MLP chunks, and the workspace the
/// layout says.
#[test]
fn kept_activations_change_no_bit() {
    let cfg = small_config(61, Some(4));
    let (base, _) = random_base(&cfg, 21, DType::F32);
    let lora = random_lora(&cfg, &all_targets_config(0.2), 22, DType::F32);
    let batches = [packed_batch(61, 11, 23), random_rows(61, 2, 11, 24)];
    let run = |residual: bool, mlp: usize, mlp_chunk: usize| {
        let opts = EngineOptions {
            save_attention_residual: residual,
            kept_mlp_layers: mlp,
            mlp_chunk,
            ..EngineOptions::default()
        };
        let (loss, grads, layout, held) = train_micro_steps(&base, &lora, opts, &batches, 3);
        assert!(held >= layout.total_bytes());
        (loss, grads, layout.total_bytes())
    };
    let chunk = EngineOptions::default().mlp_chunk;
    let (n, h, i2) = (2 * 11, cfg.hidden_size, 2 * cfg.intermediate_size);
    // Gate/up outputs of no layer, of the first of the two, or of both.
    for (residual, mlp, mlp_chunk) in [
        (true, 0, chunk),
        (false, ALL_LAYERS, chunk),
        (true, ALL_LAYERS, chunk),
        (false, ALL_LAYERS, 5),
        (false, 1, chunk),
        (true, 1, 5),
    ] {
        // Against recomputing everything with the same chunks (chunking changes the
        // order of the gradient sums).
        let (l0, g0, bytes0) = run(false, 0, mlp_chunk);
        let (l1, g1, bytes1) = run(residual, mlp, mlp_chunk);
        assert_eq!(l0, l1, "residual {residual} mlp {mlp} chunk {mlp_chunk}");
        assert_eq!(g0, g1, "residual {residual} mlp {mlp} chunk {mlp_chunk}");
        // The saved residuals: one [tokens, hidden] f32 matrix per layer in place of
        // one layer's, and q/k/v
        // [tokens, (heads + 2 kv)·d], the attention output [tokens, heads·d] with
        // its log-sum-exp [rows·heads·seq] per layer in place of one layer's; the
        // kept gate/up outputs one [tokens, 2I] per kept layer, in place of the
        // chunk buffer when every layer's is kept (beside it otherwise); with either,
        // the adapters' z [tokens, r] of all seven projections per layer, in place
        // of one layer's.
        if mlp_chunk == chunk {
            let layers = cfg.num_hidden_layers;
            let heads = cfg.num_attention_heads;
            let qkv = n * (heads + 2 * cfg.num_kv_heads()) * cfg.head_dim();
            let attn = qkv + n * heads * cfg.head_dim() + 2 * heads * 11;
            let z = PROJECTIONS.len() * n * 4;
            let kept_mlp = mlp.min(layers);
            let gu = kept_mlp * n * i2 - (kept_mlp == layers) as usize * n * i2;
            let extra = residual as usize * (layers - 1) * (n * h + attn) * 4
                + gu * 4
                + (residual || mlp > 0) as usize * (layers - 1) * z * 4;
            assert_eq!(bytes1 - bytes0, extra, "residual {residual} mlp {mlp}");
        }
    }
    compare(
        &base,
        &lora,
        &batches,
        EngineOptions {
            save_attention_residual: true,
            kept_mlp_layers: ALL_LAYERS,
            ..EngineOptions::default()
        },
        2e-5,
    );
}

/// Keeping every layer's dequantized weights only removes the dequantization after
/// their first use: on an NF4 base, over micro-steps of two shapes (the second
/// workspace dequantizes again into its own buffer) and three passes of the same
/// shape (the later ones read the kept weights), alone and beside the kept
/// activations, the same losses and bit-identical gradients as dequantizing into the
/// shared buffer; the workspace grows by every layer's four weight groups in place
/// of the shared buffer (the larger half of one layer's).
#[test]
fn a_kept_dequantized_base_changes_no_bit() {
    let cfg = small_config(61, Some(4));
    let mut base = random_base(&cfg, 41, DType::F32).0;
    quantize_nf4(&mut base);
    let lora = random_lora(&cfg, &all_targets_config(0.0), 42, DType::F32);
    let batches = [
        random_rows(61, 2, 11, 43),
        random_rows(61, 1, 7, 44),
        packed_batch(61, 11, 45),
        random_rows(61, 2, 11, 46),
    ];
    for (residual, mlp) in [(false, 0), (true, ALL_LAYERS)] {
        let run = |keep: bool| {
            let opts = EngineOptions {
                save_attention_residual: residual,
                kept_mlp_layers: mlp,
                keep_dequantized_base: keep,
                ..EngineOptions::default()
            };
            train_micro_steps(&base, &lora, opts, &batches, 0)
        };
        let (l0, g0, layout0, _) = run(false);
        let (l1, g1, layout1, held1) = run(true);
        assert_eq!(l0, l1, "residual {residual} mlp {mlp}");
        assert_eq!(g0, g1, "residual {residual} mlp {mlp}");
        assert!(held1 >= layout1.total_bytes());
        let sizes = qtrain_engine::layout::weight_group_shapes(&cfg).map(|(o, i)| o * i);
        let shared = (sizes[0] + sizes[1]).max(sizes[2] + sizes[3]);
        let kept = cfg.num_hidden_layers * sizes.iter().sum::<usize>();
        assert_eq!(
            layout1.total_bytes() - layout0.total_bytes(),
            (kept - shared) * 4
        );
    }
}

/// The engine in fp16 (the compute type of 7.x GPUs) on the CPU kernels, with the
/// loss scaled the way the trainer scales it (the denominator divided by the scale,
/// so every gradient flowing back is `scale` times larger and clear of fp16's
/// underflow): the same loss and, divided back, the same gradients as the f32
/// reference within fp16 rounding, with a window, dropout and packed documents.
#[test]
fn fp16_engine_with_a_scaled_loss_matches_the_f32_reference() {
    let cfg = small_config(61, Some(5));
    let (base32, _) = random_base(&cfg, 31, DType::F32);
    let (base16, _) = random_base(&cfg, 31, DType::F16);
    let lora = random_lora(&cfg, &all_targets_config(0.1), 32, DType::F32);
    let batches = [packed_batch(61, 12, 33), random_rows(61, 2, 12, 34)];
    let denom: f64 = batches.iter().map(|b| b.valid_targets() as f64).sum();
    let scale = 4096.0;
    let mut ref_grads = LoraGrads::zeros_like(&lora).unwrap();
    let mut engine = Engine::<half::f16>::new(&base16, &lora, EngineOptions::default()).unwrap();
    let (mut ref_loss, mut eng_loss) = (0.0, 0.0);
    for (i, b) in batches.iter().enumerate() {
        let so = StepOptions {
            checkpointing: true,
            dropout_seed: 5,
            micro_step: i as u64,
        };
        ref_loss += forward_backward(&base32, &lora, b, &so, denom, &mut ref_grads)
            .unwrap()
            .loss_sum;
        eng_loss += engine
            .forward_backward(b, &so, denom / scale)
            .unwrap()
            .loss_sum;
    }
    let rel = (ref_loss - eng_loss).abs() / ref_loss.abs();
    assert!(
        rel < 1e-3,
        "loss {eng_loss} vs reference {ref_loss} (rel {rel:.2e})"
    );
    let want = ref_grads.to_host().unwrap();
    let got = engine.lora().grads_to_host(engine.device()).unwrap();
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(&got) {
        assert_eq!((&w.0, &w.2), (&g.0, &g.2));
        let unscaled: Vec<f32> = g.1.iter().map(|&x| (x as f64 / scale) as f32).collect();
        assert!(w.1.iter().any(|&x| x != 0.0), "{} is all zero", w.0);
        let e = max_rel(&w.1, &unscaled);
        // Measured: at most 4.3e-3 (fp16 keeps 11 bits).
        assert!(e < 1.5e-2, "{}: max rel error {e:.2e}", w.0);
    }
}

/// Offloaded gradient checkpoints (a ring of two layer inputs on the device, the
/// rest copied to the host in the forward and back in the backward) change no
/// bit: the same loss and gradients as keeping every input on the device, for a
/// Mistral-shaped and a Qwen 3 model of five layers (three inputs travel; an odd
/// count so both ring slots wrap), with dropout, packed documents, a window and
/// two micro-batches; the workspace holds exactly the layout's device bytes, which
/// drop by (L - ring)·n·h elements, and that many move to the host. With the
/// attention half kept, it travels too (q/k/v, x2, the attention output and its
/// log-sum-exp; Qwen 3's q/k norm outputs and statistics): again no bit changes
/// against keeping it on the device, and every kept element of the layers outside
/// the ring moves to the host. Also against the reference decoder.
#[test]
fn offloaded_checkpoints_change_no_bit() {
    let families: [(&str, qtrain_model::ModelConfig); 2] = [
        ("mistral", small_config(61, Some(4))),
        ("qwen3", small_family_config(61, "qwen3")),
    ];
    for (i, (family, mut cfg)) in families.into_iter().enumerate() {
        cfg.num_hidden_layers = 5;
        let seed = 120 + 10 * i as u64;
        let (base, _) = random_base(&cfg, seed, DType::F32);
        let lora = random_lora(&cfg, &all_targets_config(0.2), seed + 1, DType::F32);
        let batches = [
            packed_batch(61, 11, seed + 2),
            random_rows(61, 2, 11, seed + 3),
        ];
        let run = |offload: bool, keep: bool| {
            let opts = EngineOptions {
                offload_layer_inputs: offload,
                save_attention_residual: keep,
                mlp_chunk: 7,
                ..EngineOptions::default()
            };
            let (loss, grads, layout, held) = train_micro_steps(&base, &lora, opts, &batches, 5);
            assert_eq!(
                held,
                layout.total_bytes(),
                "{family}: the device holds the layout's bytes"
            );
            (loss, grads, layout)
        };
        let (l0, g0, on_device) = run(false, false);
        let (l1, g1, offloaded) = run(true, false);
        assert_eq!(l0, l1, "{family}: loss");
        assert_eq!(g0, g1, "{family}: gradients");
        assert!(g1.iter().all(|g| g.1.iter().any(|&x| x != 0.0)));
        let travelling = 5 - qtrain_engine::OFFLOAD_RING;
        let (n, h) = (2 * 11, cfg.hidden_size);
        let moved = travelling * n * h * 4;
        assert_eq!(
            on_device.total_bytes() - offloaded.total_bytes(),
            moved,
            "{family}"
        );
        assert_eq!((on_device.host_bytes(), offloaded.host_bytes()), (0, moved));
        assert_eq!(offloaded.transfer_bytes(), 2 * moved);

        // The attention half kept, on the device and offloaded.
        let (l2, g2, kept_on_device) = run(false, true);
        let (l3, g3, kept_offloaded) = run(true, true);
        assert_eq!(l2, l3, "{family}: loss, attention half kept");
        assert_eq!(g2, g3, "{family}: gradients, attention half kept");
        let d = cfg.head_dim();
        let (heads, kv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let qk_norm = if cfg.has_qk_norm() {
            n * (heads + kv) * d + n * (heads + kv)
        } else {
            0
        };
        // Per layer: input, q/k/v, x2, attention output, lse (2 rows x heads x 11).
        let per_layer =
            n * h + n * (heads + 2 * kv) * d + n * h + n * heads * d + 2 * heads * 11 + qk_norm;
        let moved = travelling * per_layer * 4;
        assert_eq!(kept_offloaded.host_bytes(), moved, "{family}");
        assert_eq!(
            kept_on_device.total_bytes() - kept_offloaded.total_bytes(),
            moved,
            "{family}"
        );
        compare(
            &base,
            &lora,
            &batches,
            EngineOptions {
                offload_layer_inputs: true,
                save_attention_residual: true,
                ..EngineOptions::default()
            },
            2e-5,
        );
    }
}

/// With fewer layers than the ring, offloading moves nothing: every input stays
/// on the device and no host memory is taken.
#[test]
fn offload_with_fewer_layers_than_the_ring_keeps_everything() {
    let cfg = small_config(61, None);
    assert!(cfg.num_hidden_layers <= qtrain_engine::OFFLOAD_RING);
    let (base, _) = random_base(&cfg, 140, DType::F32);
    let lora = random_lora(&cfg, &all_targets_config(0.0), 141, DType::F32);
    let opts = EngineOptions {
        offload_layer_inputs: true,
        ..EngineOptions::default()
    };
    let engine = Engine::<f32>::new(&base, &lora, opts).unwrap();
    let layout = engine.workspace_layout(2, 8);
    assert_eq!(layout.host_bytes(), 0);
    assert_eq!(
        layout.elems("layer_inputs"),
        cfg.num_hidden_layers * 16 * cfg.hidden_size
    );
    compare(&base, &lora, &[random_rows(61, 2, 8, 142)], opts, 2e-5);
}
