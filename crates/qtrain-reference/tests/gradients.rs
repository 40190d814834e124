//! Gradient correctness of `forward_backward` on a tiny f64 model with adapters on
//! all seven projections, GQA, packed documents, masked labels, a sliding window
//! and dropout: against central finite differences of `forward_loss_train` and
//! against candle's autograd through a naive implementation (tests/common).

mod common;

use candle_core::{DType, Tensor};
use common::*;
use qtrain_model::{BaseModel, PROJECTIONS};
use qtrain_reference::{forward_backward, forward_loss_train};
use qtrain_step::{LoraGrads, LoraWeights, StepOptions, TokenBatch};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 40;

struct Setup {
    base: BaseModel,
    weights: std::collections::HashMap<String, Tensor>,
    lora: LoraWeights,
    batch: TokenBatch,
    opts: StepOptions,
    denom: f64,
}

fn setup(window: Option<usize>, dropout: f64, checkpointing: bool) -> Setup {
    let cfg = small_config(VOCAB, window);
    let (base, weights) = random_base(&cfg, 11, DType::F64);
    let lora = random_lora(&cfg, &all_targets_config(dropout), 12, DType::F64);
    let batch = packed_batch(VOCAB, 12, 13);
    let denom = batch.valid_targets() as f64;
    let opts = StepOptions {
        checkpointing,
        dropout_seed: 99,
        micro_step: 3,
    };
    Setup {
        base,
        weights,
        lora,
        batch,
        opts,
        denom,
    }
}

fn analytic(s: &Setup) -> LoraGrads {
    let mut grads = LoraGrads::zeros_like(&s.lora).unwrap();
    let loss = forward_backward(&s.base, &s.lora, &s.batch, &s.opts, s.denom, &mut grads).unwrap();
    assert_eq!(loss.valid_tokens, s.batch.valid_targets());
    grads
}

/// Central differences on a few entries of every A and B; returns the worst
/// `|fd - analytic| / (|analytic| + 1e-6)` and the worst absolute error.
fn finite_difference_check(s: &mut Setup, per_tensor: usize) -> (f64, f64) {
    let grads = analytic(s);
    let eps = 1e-5;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let names: Vec<String> = s.lora.tensors().into_iter().map(|(n, _)| n).collect();
    let (mut worst_rel, mut worst_abs) = (0.0f64, 0.0f64);
    let mut checked = 0;
    for name in names {
        let orig = s.lora.tensor(&name).unwrap().clone();
        let dims = orig.dims().to_vec();
        let flat: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f64> = grads
            .tensor(&name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for _ in 0..per_tensor {
            let i = rng.random_range(0..flat.len());
            let mut eval = |delta: f64| {
                let mut v = flat.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, dims.as_slice(), &candle_core::Device::Cpu).unwrap();
                s.lora.set_tensor(&name, &t).unwrap();
                forward_loss_train(&s.base, &s.lora, &s.batch, &s.opts)
                    .unwrap()
                    .loss_sum
                    / s.denom
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            let err = (fd - g[i]).abs();
            assert!(
                err <= 1e-7 + 1e-5 * g[i].abs(),
                "{name}[{i}]: finite difference {fd:e} vs analytic {:e}",
                g[i]
            );
            worst_abs = worst_abs.max(err);
            worst_rel = worst_rel.max(err / (g[i].abs() + 1e-6));
            checked += 1;
        }
        s.lora.set_tensor(&name, &orig).unwrap();
    }
    assert_eq!(
        checked,
        per_tensor * 2 * PROJECTIONS.len() * s.base.layers.len()
    );
    (worst_rel, worst_abs)
}

#[test]
fn finite_differences_all_targets_with_dropout_and_window() {
    let mut s = setup(Some(4), 0.2, true);
    let (rel, abs) = finite_difference_check(&mut s, 3);
    eprintln!("finite differences (window 4, dropout 0.2): max rel {rel:.2e}, max abs {abs:.2e}");
}

#[test]
fn finite_differences_full_causal_no_dropout() {
    let mut s = setup(None, 0.0, false);
    let (rel, abs) = finite_difference_check(&mut s, 3);
    eprintln!("finite differences (causal, no dropout): max rel {rel:.2e}, max abs {abs:.2e}");
}

/// Every entry of every gradient against candle autograd of the naive model.
fn autograd_check(window: Option<usize>, dropout: f64, checkpointing: bool) -> f64 {
    let s = setup(window, dropout, checkpointing);
    let grads = analytic(&s);
    let mut naive = Naive::new(&s.base.config, &s.weights, Some(&s.lora));
    if dropout > 0.0 {
        naive.dropout = Some((dropout, s.opts.dropout_seed, s.opts.micro_step));
    }
    let loss = naive.loss(&s.batch, s.denom).unwrap();
    // The losses agree too.
    let ours = forward_loss_train(&s.base, &s.lora, &s.batch, &s.opts)
        .unwrap()
        .loss_sum
        / s.denom;
    let theirs = loss.to_scalar::<f64>().unwrap();
    assert!(
        (ours - theirs).abs() < 1e-12 * theirs.abs(),
        "loss {ours} vs naive {theirs}"
    );
    let store = loss.backward().unwrap();
    let mut worst = 0.0f64;
    for ((layer, proj), (a, b)) in &naive.lora {
        let pair = grads.get(*layer, *proj).unwrap();
        for (var, ours, part) in [(a, &pair.a, "A"), (b, &pair.b, "B")] {
            let reference = store
                .get(var.as_tensor())
                .expect("autograd reached the adapter");
            let scale = max_abs(reference);
            assert!(
                scale > 0.0,
                "layer {layer} {proj:?} {part}: zero reference gradient"
            );
            let rel = max_abs_diff(ours, reference) / scale;
            assert!(
                rel < 1e-10,
                "layer {layer} {proj:?} {part}: relative error {rel:e}"
            );
            worst = worst.max(rel);
        }
    }
    assert_eq!(naive.lora.len(), 2 * PROJECTIONS.len());
    worst
}

#[test]
fn autograd_all_targets_window_dropout_checkpointing() {
    let worst = autograd_check(Some(4), 0.2, true);
    eprintln!("autograd (window 4, dropout 0.2, checkpointing): max rel {worst:.2e}");
}

#[test]
fn autograd_all_targets_causal_keep_activations() {
    let worst = autograd_check(None, 0.0, false);
    eprintln!("autograd (causal, no dropout, activations kept): max rel {worst:.2e}");
}
