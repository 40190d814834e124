//! Behaviour of the training step: checkpointing on/off, gradient accumulation,
//! the frozen base, packing, dropout determinism, overfitting a few samples, and
//! the host-side parameter API the optimizer uses.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use qtrain_model::{BaseModel, Proj, PROJECTIONS};
use qtrain_reference::{
    forward_backward, forward_logits, forward_loss, forward_loss_train, ReferenceError,
};
use qtrain_step::{LoraConfig, LoraGrads, LoraWeights, StepError, StepOptions, TokenBatch};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 40;

fn opts(checkpointing: bool, micro_step: u64) -> StepOptions {
    StepOptions {
        checkpointing,
        dropout_seed: 1234,
        micro_step,
    }
}

fn grads_of(
    base: &BaseModel,
    lora: &LoraWeights,
    batch: &TokenBatch,
    o: &StepOptions,
    denom: f64,
) -> LoraGrads {
    let mut g = LoraGrads::zeros_like(lora).unwrap();
    forward_backward(base, lora, batch, o, denom, &mut g).unwrap();
    g
}

/// Largest `|a - b|` over all tensors, and the largest `|b|`.
fn compare(a: &LoraGrads, b: &LoraGrads) -> (f64, f64) {
    let mut diff = 0.0f64;
    let mut scale = 0.0f64;
    for ((na, ta), (nb, tb)) in a.tensors().into_iter().zip(b.tensors()) {
        assert_eq!(na, nb);
        diff = diff.max(max_abs_diff(ta, tb));
        scale = scale.max(max_abs(tb));
    }
    (diff, scale)
}

#[test]
fn checkpointing_on_and_off_give_identical_gradients_with_dropout() {
    let cfg = small_config(VOCAB, Some(5));
    let (base, _) = random_base(&cfg, 1, DType::F32);
    let lora = random_lora(&cfg, &all_targets_config(0.1), 2, DType::F32);
    let batch = packed_batch(VOCAB, 16, 3);
    let denom = batch.valid_targets() as f64;
    let on = grads_of(&base, &lora, &batch, &opts(true, 7), denom);
    let off = grads_of(&base, &lora, &batch, &opts(false, 7), denom);
    let (diff, scale) = compare(&on, &off);
    eprintln!("checkpointing on vs off: max abs diff {diff:e} (max |grad| {scale:.3e})");
    assert!(scale > 0.0);
    assert_eq!(
        diff, 0.0,
        "recomputation must reproduce the forward exactly"
    );
    // And dropout really is on: another micro-step draws other masks.
    let other = grads_of(&base, &lora, &batch, &opts(true, 8), denom);
    assert!(compare(&on, &other).0 > 1e-6 * scale);
}

#[test]
fn accumulating_4_micro_batches_of_2_equals_one_batch_of_8() {
    let cfg = small_config(VOCAB, None);
    let (base, _) = random_base(&cfg, 4, DType::F32);
    let lora = random_lora(&cfg, &all_targets_config(0.0), 5, DType::F32);
    let mut big = random_rows(VOCAB, 8, 10, 6);
    // Uneven label masks, so per-micro-batch normalization would be wrong.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for r in 0..8 {
        for t in 0..rng.random_range(0..8) {
            big.labels[r * 10 + t] = -100;
        }
    }
    let denom = big.valid_targets() as f64;
    let full = grads_of(&base, &lora, &big, &opts(true, 0), denom);

    let mut acc = LoraGrads::zeros_like(&lora).unwrap();
    let mut loss_sum = 0.0;
    let mut valid = 0;
    for m in 0..4 {
        let rows = m * 20..(m + 1) * 20;
        let micro = TokenBatch::new(
            big.input_ids[rows.clone()].to_vec(),
            big.labels[rows.clone()].to_vec(),
            big.position_ids[rows.clone()].to_vec(),
            big.segment_ids[rows].to_vec(),
            2,
            10,
        )
        .unwrap();
        let l = forward_backward(
            &base,
            &lora,
            &micro,
            &opts(m % 2 == 0, m as u64),
            denom,
            &mut acc,
        )
        .unwrap();
        loss_sum += l.loss_sum;
        valid += l.valid_tokens;
    }
    let big_loss = forward_loss(&base, Some(&lora), &big).unwrap();
    assert_eq!(valid, big_loss.valid_tokens);
    assert!((loss_sum - big_loss.loss_sum).abs() < 1e-4 * big_loss.loss_sum);
    let (diff, scale) = compare(&acc, &full);
    eprintln!(
        "accumulation 4x2 vs batch 8: max abs diff {diff:.2e}, rel {:.2e}",
        diff / scale
    );
    assert!(diff <= 1e-5 * scale, "{diff:e} vs scale {scale:e}");
}

/// A packed row of two documents trains exactly like the two documents on their
/// own rows: segment mask, restarting positions and the boundary target.
#[test]
fn packed_documents_equal_separate_rows() {
    let cfg = small_config(VOCAB, None);
    let (base, _) = random_base(&cfg, 21, DType::F64);
    let lora = random_lora(&cfg, &all_targets_config(0.0), 22, DType::F64);
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let doc_a: Vec<u32> = (0..6).map(|_| rng.random_range(0..VOCAB as u32)).collect();
    let doc_b: Vec<u32> = (0..6).map(|_| rng.random_range(0..VOCAB as u32)).collect();
    let packed = TokenBatch::new(
        [doc_a.clone(), doc_b.clone()].concat(),
        [doc_a.clone(), doc_b.clone()]
            .concat()
            .iter()
            .map(|&t| t as i64)
            .collect(),
        (0..6).chain(0..6).collect(),
        [vec![0; 6], vec![1; 6]].concat(),
        1,
        12,
    )
    .unwrap();
    let separate = TokenBatch::from_rows(&[doc_a, doc_b]).unwrap();
    assert_eq!(packed.valid_targets(), 10);
    assert_eq!(separate.valid_targets(), 10);
    let o = opts(true, 0);
    let gp = grads_of(&base, &lora, &packed, &o, 10.0);
    let gs = grads_of(&base, &lora, &separate, &o, 10.0);
    let (diff, scale) = compare(&gp, &gs);
    assert!(diff < 1e-12 * scale, "{diff:e}");
    let lp = forward_loss(&base, Some(&lora), &packed).unwrap().loss_sum;
    let ls = forward_loss(&base, Some(&lora), &separate)
        .unwrap()
        .loss_sum;
    assert!((lp - ls).abs() < 1e-12 * ls.abs());
}

fn snapshot(base: &BaseModel) -> Vec<Vec<u8>> {
    let bytes = |t: &Tensor| -> Vec<u8> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    };
    let mut scratch = Vec::new();
    let mut out = vec![
        bytes(&base.embed_tokens),
        bytes(&base.norm),
        bytes(&base.lm_head),
    ];
    for layer in &base.layers {
        out.push(bytes(&layer.input_layernorm));
        out.push(bytes(&layer.post_attention_layernorm));
        for p in PROJECTIONS {
            let w = layer
                .proj(p)
                .weight(DType::F32, &Device::Cpu, &mut scratch)
                .unwrap();
            out.push(bytes(&w));
        }
    }
    out
}

/// A minimal Adam on host f32 slices, as the optimizer crate will see them.
struct Adam {
    lr: f32,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    t: i32,
}

impl Adam {
    fn new(lr: f32) -> Self {
        Self {
            lr,
            m: Vec::new(),
            v: Vec::new(),
            t: 0,
        }
    }

    fn step(&mut self, lora: &mut LoraWeights, grads: &LoraGrads) {
        let mut params = lora.to_host().unwrap();
        let grads = grads.to_host().unwrap();
        if self.m.is_empty() {
            self.m = params.iter().map(|p| vec![0.0; p.1.len()]).collect();
            self.v = self.m.clone();
        }
        self.t += 1;
        let (b1, b2) = (0.9f32, 0.999f32);
        for (k, ((pn, p, _), (gn, g, _))) in params.iter_mut().zip(&grads).enumerate() {
            assert_eq!(pn, gn);
            for i in 0..p.len() {
                self.m[k][i] = b1 * self.m[k][i] + (1.0 - b1) * g[i];
                self.v[k][i] = b2 * self.v[k][i] + (1.0 - b2) * g[i] * g[i];
                let mh = self.m[k][i] / (1.0 - b1.powi(self.t));
                let vh = self.v[k][i] / (1.0 - b2.powi(self.t));
                p[i] -= self.lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        lora.update_from_host(&params).unwrap();
    }
}

fn train(
    base: &BaseModel,
    lora: &mut LoraWeights,
    batch: &TokenBatch,
    steps: usize,
    lr: f32,
) -> Vec<f64> {
    let mut adam = Adam::new(lr);
    let mut grads = LoraGrads::zeros_like(lora).unwrap();
    let denom = batch.valid_targets() as f64;
    let mut losses = Vec::new();
    for step in 0..steps {
        grads.zero().unwrap();
        let l = forward_backward(
            base,
            lora,
            batch,
            &opts(step % 2 == 0, step as u64),
            denom,
            &mut grads,
        )
        .unwrap();
        losses.push(l.loss_sum / denom);
        adam.step(lora, &grads);
    }
    losses
}

#[test]
fn frozen_weights_are_bit_identical_after_training_steps() {
    let cfg = small_config(VOCAB, None);
    let (base, _) = random_base(&cfg, 31, DType::F32);
    let mut lora = LoraWeights::init(&all_targets_config(0.05), &cfg, &Device::Cpu).unwrap();
    let before_base = snapshot(&base);
    let before_lora = lora.to_host().unwrap();
    let batch = random_rows(VOCAB, 2, 12, 32);
    train(&base, &mut lora, &batch, 3, 1e-2);
    assert_eq!(before_base, snapshot(&base), "the frozen base changed");
    // Not vacuous: every adapter tensor moved (B leaves zero after the first step).
    for ((n, a, _), (_, b, _)) in before_lora.iter().zip(lora.to_host().unwrap()) {
        assert_ne!(a, &b, "{n} did not train");
    }
}

#[test]
fn loss_decreases_when_overfitting_a_few_samples() {
    let cfg = small_config(VOCAB, None);
    let (base, _) = random_base(&cfg, 41, DType::F32);
    let lcfg = LoraConfig {
        rank: 8,
        alpha: 16.0,
        ..LoraConfig::default()
    };
    let mut lora = LoraWeights::init(&lcfg, &cfg, &Device::Cpu).unwrap();
    let batch = random_rows(VOCAB, 2, 16, 42);
    let losses = train(&base, &mut lora, &batch, 40, 2e-2);
    let eval = forward_loss(&base, Some(&lora), &batch).unwrap().mean();
    eprintln!(
        "overfit: loss {:.3} -> {:.3} (eval without dropout {:.3})",
        losses[0],
        losses[losses.len() - 1],
        eval
    );
    assert!(eval < 0.5 * losses[0], "{losses:?}");
}

#[test]
fn fresh_adapters_leave_the_base_unchanged_and_init_like_peft() {
    let cfg = small_config(VOCAB, Some(3));
    let (base, _) = random_base(&cfg, 51, DType::F32);
    let lcfg = LoraConfig::default();
    let lora = LoraWeights::init(&lcfg, &cfg, &Device::Cpu).unwrap();
    let batch = packed_batch(VOCAB, 9, 52);
    let with = forward_logits(&base, Some(&lora), &batch).unwrap();
    let without = forward_logits(&base, None, &batch).unwrap();
    assert_eq!(max_abs_diff(&with, &without), 0.0);
    assert_eq!(lora.pairs().len(), 4 * cfg.num_hidden_layers);
    for p in lora.pairs() {
        let bound = 1.0 / (p.a.dim(1).unwrap() as f64).sqrt();
        let a = max_abs(&p.a);
        assert!(a <= bound && a > 0.8 * bound, "{a} vs bound {bound}");
        assert_eq!(max_abs(&p.b), 0.0);
        assert_eq!(p.a.dims(), &[16, cfg.proj_shape(p.proj)[1]]);
        assert_eq!(p.b.dims(), &[cfg.proj_shape(p.proj)[0], 16]);
    }
    // Seeded: same seed, same A; another seed, another A.
    let again = LoraWeights::init(&lcfg, &cfg, &Device::Cpu).unwrap();
    assert_eq!(lora.to_host().unwrap(), again.to_host().unwrap());
    let other = LoraWeights::init(
        &LoraConfig {
            seed: 1,
            ..lcfg.clone()
        },
        &cfg,
        &Device::Cpu,
    )
    .unwrap();
    assert_ne!(lora.to_host().unwrap(), other.to_host().unwrap());
    assert_eq!(lcfg.scale(), 2.0);
    assert_eq!(
        LoraConfig {
            rslora: true,
            ..lcfg
        }
        .scale(),
        8.0
    );
}

#[test]
fn eval_has_no_dropout_and_train_loss_does() {
    let cfg = small_config(VOCAB, None);
    let (base, _) = random_base(&cfg, 61, DType::F32);
    let batch = random_rows(VOCAB, 2, 8, 62);
    let with_dropout = random_lora(&cfg, &all_targets_config(0.3), 63, DType::F32);
    let mut no_dropout = with_dropout.clone();
    for (n, v, _) in with_dropout.to_host().unwrap() {
        no_dropout.set_from_host(&n, &v).unwrap();
    }
    let eval = forward_loss(&base, Some(&with_dropout), &batch)
        .unwrap()
        .loss_sum;
    let train = forward_loss_train(&base, &with_dropout, &batch, &opts(false, 0))
        .unwrap()
        .loss_sum;
    let train_again = forward_loss_train(&base, &with_dropout, &batch, &opts(true, 0))
        .unwrap()
        .loss_sum;
    assert_ne!(eval, train);
    assert_eq!(
        train, train_again,
        "dropout masks are a pure function of their key"
    );
    // forward_backward reports the loss it differentiates.
    let mut g = LoraGrads::zeros_like(&with_dropout).unwrap();
    let l = forward_backward(&base, &with_dropout, &batch, &opts(true, 0), 1.0, &mut g).unwrap();
    assert!((l.loss_sum - train).abs() < 1e-5 * train);
}

#[test]
fn dropout_masks_have_the_right_rate_and_are_keyed() {
    use qtrain_step::{dropout_mask, DropoutKey};
    let key = DropoutKey {
        seed: 3,
        micro_step: 4,
        layer: 1,
        proj: Proj::V,
    };
    let m = dropout_mask(0.25, key, 200, 100, DType::F32, &Device::Cpu)
        .unwrap()
        .unwrap();
    let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
    let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
    assert!((dropped - 0.25).abs() < 0.02, "{dropped}");
    assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
    let same = dropout_mask(0.25, key, 200, 100, DType::F32, &Device::Cpu)
        .unwrap()
        .unwrap();
    assert_eq!(max_abs_diff(&m, &same), 0.0);
    for other in [
        DropoutKey {
            proj: Proj::K,
            ..key
        },
        DropoutKey {
            micro_step: 5,
            ..key
        },
        DropoutKey { layer: 0, ..key },
        DropoutKey { seed: 4, ..key },
    ] {
        let o = dropout_mask(0.25, other, 200, 100, DType::F32, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert!(max_abs_diff(&m, &o) > 0.0, "{other:?}");
    }
    assert!(dropout_mask(0.0, key, 2, 2, DType::F32, &Device::Cpu)
        .unwrap()
        .is_none());
}

#[test]
fn logits_and_chunked_loss_agree() {
    let cfg = small_config(VOCAB, None);
    let (base, _) = random_base(&cfg, 71, DType::F64);
    let lora = random_lora(&cfg, &all_targets_config(0.0), 72, DType::F64);
    let batch = packed_batch(VOCAB, 10, 73);
    let logits = forward_logits(&base, Some(&lora), &batch).unwrap();
    assert_eq!(logits.dims(), &[2, 10, VOCAB]);
    let logits: Vec<Vec<Vec<f64>>> = logits.to_vec3().unwrap();
    let targets = batch.shifted_targets();
    let mut sum = 0.0;
    for (i, &t) in targets.iter().enumerate() {
        if t == -100 {
            continue;
        }
        let row = &logits[i / 10][i % 10];
        let m = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        sum += lse - row[t as usize];
    }
    let l = forward_loss(&base, Some(&lora), &batch).unwrap();
    assert_eq!(l.valid_tokens, batch.valid_targets());
    assert!((l.loss_sum - sum).abs() < 1e-12 * sum);
}

#[test]
fn shifted_targets_follow_hf_and_stop_at_document_boundaries() {
    let b = TokenBatch::new(
        vec![5, 6, 7, 8, 9, 10],
        vec![5, 6, -100, 8, 9, 10],
        vec![0, 1, 2, 0, 1, 2],
        vec![0, 0, 0, 1, 1, 1],
        1,
        6,
    )
    .unwrap();
    assert_eq!(b.shifted_targets(), vec![6, -100, -100, 9, 10, -100]);
    assert_eq!(b.valid_targets(), 3);
}

#[test]
fn host_round_trip_and_errors_name_what_is_wrong() {
    let cfg = small_config(VOCAB, None);
    let lcfg = LoraConfig {
        targets: LoraConfig::parse_targets("q_proj, down_proj").unwrap(),
        ..LoraConfig::default()
    };
    let mut lora = LoraWeights::init(&lcfg, &cfg, &Device::Cpu).unwrap();
    let host = lora.to_host().unwrap();
    let names: Vec<&str> = host.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "layers.0.q_proj.lora_A",
            "layers.0.q_proj.lora_B",
            "layers.0.down_proj.lora_A",
            "layers.0.down_proj.lora_B",
            "layers.1.q_proj.lora_A",
            "layers.1.q_proj.lora_B",
            "layers.1.down_proj.lora_A",
            "layers.1.down_proj.lora_B",
        ]
    );
    assert_eq!(host[2].2, vec![16, cfg.intermediate_size]);
    let mut changed = host.clone();
    for (_, v, _) in &mut changed {
        v.iter_mut().for_each(|x| *x += 0.5);
    }
    lora.update_from_host(&changed).unwrap();
    assert_eq!(lora.to_host().unwrap(), changed);
    assert_eq!(
        lora.num_parameters(),
        host.iter().map(|h| h.1.len()).sum::<usize>()
    );

    let err = lora
        .set_from_host("layers.0.k_proj.lora_A", &[0.0])
        .unwrap_err();
    assert!(
        matches!(err, StepError::UnknownTensor { .. })
            && err.to_string().contains("layers.0.k_proj.lora_A")
    );
    let err = lora
        .set_from_host("layers.0.q_proj.lora_B", &[0.0; 3])
        .unwrap_err();
    assert!(err.to_string().contains("layers.0.q_proj.lora_B"), "{err}");
    let err = LoraConfig::parse_targets("q_proj,qkv").unwrap_err();
    assert!(err.to_string().contains("qkv"), "{err}");
    let err = TokenBatch::new(vec![1; 6], vec![1; 5], vec![0; 6], vec![0; 6], 2, 3).unwrap_err();
    assert!(
        err.to_string().contains("labels") && err.to_string().contains("5"),
        "{err}"
    );

    let (base, _) = random_base(&cfg, 81, DType::F32);
    let bad = TokenBatch::from_rows(&[vec![1, 2, VOCAB as u32]]).unwrap();
    let err = forward_loss(&base, Some(&lora), &bad).unwrap_err();
    assert!(
        matches!(
            err,
            ReferenceError::Step(StepError::TokenOutOfRange { index: 2, .. })
        ),
        "{err}"
    );
    let mut g = LoraGrads::zeros_like(&lora).unwrap();
    let ok = TokenBatch::from_rows(&[vec![1, 2, 3]]).unwrap();
    let err = forward_backward(&base, &lora, &ok, &opts(true, 0), 0.0, &mut g).unwrap_err();
    assert!(matches!(err, ReferenceError::LossDenominator(_)));
}

#[test]
fn gradient_norm_and_scaling() {
    let cfg = small_config(VOCAB, None);
    let (base, _) = random_base(&cfg, 91, DType::F32);
    let lora = random_lora(&cfg, &all_targets_config(0.0), 92, DType::F32);
    let batch = random_rows(VOCAB, 1, 6, 93);
    let mut g = grads_of(&base, &lora, &batch, &opts(true, 0), 5.0);
    let n = g.global_norm().unwrap();
    let by_hand: f64 = g
        .to_host()
        .unwrap()
        .iter()
        .flat_map(|(_, v, _)| v.iter().map(|&x| (x as f64) * (x as f64)))
        .sum::<f64>()
        .sqrt();
    assert!(n > 0.0 && (n - by_hand).abs() < 1e-6 * n);
    g.scale(0.5).unwrap();
    assert!((g.global_norm().unwrap() - 0.5 * n).abs() < 1e-6 * n);
    // Accumulating the same micro-batch twice doubles the gradient.
    let once = grads_of(&base, &lora, &batch, &opts(true, 0), 5.0);
    let mut twice = once.clone();
    forward_backward(&base, &lora, &batch, &opts(true, 0), 5.0, &mut twice).unwrap();
    let t = twice.tensor("layers.1.up_proj.lora_A").unwrap();
    let o = (once.tensor("layers.1.up_proj.lora_A").unwrap() * 2.0).unwrap();
    assert!(max_abs_diff(t, &o) <= 1e-6 * max_abs(&o));
}

/// The GPU configuration: a bf16 base with f32 adapters. Its gradients are those of
/// the f32 model up to bf16 rounding of the activations.
#[test]
fn bf16_base_with_f32_adapters_tracks_the_f32_gradients() {
    let cfg = small_config(VOCAB, Some(6));
    let weights = random_weights(&cfg, 101, DType::F32);
    let base32 = base_from_weights(&cfg, &weights, DType::F32);
    let w16 = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).unwrap()))
        .collect();
    let base16 = base_from_weights(&cfg, &w16, DType::BF16);
    let lora = random_lora(&cfg, &all_targets_config(0.1), 102, DType::F32);
    let batch = packed_batch(VOCAB, 16, 103);
    let denom = batch.valid_targets() as f64;
    let g32 = grads_of(&base32, &lora, &batch, &opts(true, 1), denom);
    let g16 = grads_of(&base16, &lora, &batch, &opts(true, 1), denom);
    for (_, t) in g16.tensors() {
        assert_eq!(
            t.dtype(),
            DType::F32,
            "gradients accumulate in the adapters' dtype"
        );
    }
    let mut diff_sq = 0.0;
    for ((_, a), (_, b)) in g16.tensors().into_iter().zip(g32.tensors()) {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
        diff_sq += d.to_scalar::<f32>().unwrap() as f64;
    }
    let rel = diff_sq.sqrt() / g32.global_norm().unwrap();
    let l16 = forward_loss(&base16, Some(&lora), &batch).unwrap().mean();
    let l32 = forward_loss(&base32, Some(&lora), &batch).unwrap().mean();
    eprintln!("bf16 base vs f32: gradient rel L2 {rel:.2e}, loss {l16:.4} vs {l32:.4}");
    assert!(rel < 5e-2, "{rel}");
    assert!((l16 - l32).abs() < 2e-2 * l32);
    let logits = forward_logits(&base16, Some(&lora), &batch).unwrap();
    assert_eq!(logits.dtype(), DType::F32);
}
