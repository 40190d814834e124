//! The equivalence on the CPU, with ranks as threads: data-parallel
//! training with the global loss denominator and summed gradients is one process
//! training on the global batch.
//!
//! The model is the `tiny` preset (random weights, NF4 double-quantized as in a
//! real run); the batches are packed rows with masked prompts, so the ranks'
//! valid-token counts differ and a per-rank mean would give a different gradient
//! (checked, so the comparison has teeth).
//!
//! Tolerances (measured values on this fixture in parentheses). Gradients: the
//! ranks' matmuls run over 4 rows instead of 8 and their partial sums are added
//! afterwards, so the f32 rounding differs throughout forward and backward. Per
//! tensor, the relative L2 difference must be at most 1e-6 (3e-7) and every
//! element within 4e-6 of the tensor's largest gradient (9e-7); normalizing by
//! per-rank counts instead of the global denominator is off by ~1e-1, and
//! rank-local dropout keys by more than 1e-2 (both checked). Adapter after 3
//! AdamW8bit steps: AdamW divides by `sqrt(v)`, which passes the relative gradient
//! noise through, and the 8-bit blockwise state can round a moment to the
//! neighbouring code when it sits on a rounding boundary, changing that element's
//! update by a fraction of one step's size `lr`. So every parameter must agree
//! within `lr / 20` (1.1e-5 with lr = 2e-3, and ~60% of the parameters are
//! bit-identical), while training on only half of each step's rows moves the
//! adapter by more than that (checked), and the two ranks' adapters must be
//! bit-identical.

use candle_core::{DType, Device};
use qtrain_dist::{agreed_loss_denominator, Collective, SingleProcess, StepSharding, ThreadGroup};
use qtrain_model::{BaseModel, LoadOptions, Quantization, PROJECTIONS};
use qtrain_optim::{clip_grad_norm, AdamW8bit, AdamWConfig, ParamSpec};
use qtrain_reference::forward_backward;
use qtrain_step::{
    HostTensor, LoraConfig, LoraGrads, LoraWeights, StepOptions, TokenBatch, IGNORE_INDEX,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEQ: usize = 32;
const LR: f32 = 2e-3;

struct Fixture {
    _dir: tempfile::TempDir,
    base: BaseModel,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    qtrain_train::models::write_random("tiny", dir.path(), 3, 1 << 30).unwrap();
    let base = BaseModel::load(
        dir.path(),
        &LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            quantization: Quantization::Nf4 {
                blocksize: 64,
                double_quant: true,
            },
            threads: 1,
        },
    )
    .unwrap();
    Fixture { _dir: dir, base }
}

/// Adapters on every projection. PEFT starts with `B = 0`, which makes every `A`
/// gradient zero; a small random `B` checks both halves from the first step.
fn adapters(base: &BaseModel, dropout: f64, seed: u64) -> LoraWeights {
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout,
        targets: PROJECTIONS.to_vec(),
        rslora: false,
        seed,
    };
    let mut lora = LoraWeights::init(&cfg, &base.config, &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb);
    let host: Vec<HostTensor> = lora
        .to_host()
        .unwrap()
        .into_iter()
        .map(|(n, mut v, s)| {
            if n.ends_with("lora_B") {
                v.iter_mut()
                    .for_each(|x| *x = rng.random_range(-0.05f32..0.05));
            }
            (n, v, s)
        })
        .collect();
    lora.update_from_host(&host).unwrap();
    lora
}

/// One packed row: two documents, each with a masked prompt of random length.
fn row(rng: &mut ChaCha8Rng, vocab: usize) -> TokenBatch {
    let split = rng.random_range(8..SEQ - 8);
    let mut ids = Vec::with_capacity(SEQ);
    let mut labels = Vec::with_capacity(SEQ);
    let mut pos = Vec::with_capacity(SEQ);
    let mut seg = Vec::with_capacity(SEQ);
    for (s, range) in [(0u32, 0..split), (1, split..SEQ)] {
        let prompt = rng.random_range(1..range.len() - 1);
        for (k, _) in range.enumerate() {
            let id = rng.random_range(0..vocab as u32);
            ids.push(id);
            labels.push(if k < prompt { IGNORE_INDEX } else { id as i64 });
            pos.push(k as u32);
            seg.push(s);
        }
    }
    TokenBatch::new(ids, labels, pos, seg, 1, SEQ).unwrap()
}

fn rows(base: &BaseModel, n: usize, seed: u64) -> Vec<TokenBatch> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| row(&mut rng, base.config.vocab_size))
        .collect()
}

/// Rows stacked into one micro-batch.
fn stack(rows: &[TokenBatch]) -> TokenBatch {
    TokenBatch::new(
        rows.iter().flat_map(|r| r.input_ids.clone()).collect(),
        rows.iter().flat_map(|r| r.labels.clone()).collect(),
        rows.iter().flat_map(|r| r.position_ids.clone()).collect(),
        rows.iter().flat_map(|r| r.segment_ids.clone()).collect(),
        rows.len(),
        SEQ,
    )
    .unwrap()
}

fn flat(h: &[HostTensor]) -> Vec<f32> {
    h.iter().flat_map(|t| t.1.iter().copied()).collect()
}

fn unflat(v: &[f32], like: &[HostTensor]) -> Vec<HostTensor> {
    let mut at = 0;
    like.iter()
        .map(|(n, old, s)| {
            let t = (n.clone(), v[at..at + old.len()].to_vec(), s.clone());
            at += old.len();
            t
        })
        .collect()
}

fn opts(micro_step: u64) -> StepOptions {
    StepOptions {
        checkpointing: false,
        dropout_seed: 17,
        micro_step,
    }
}

/// One data-parallel step's gradient on any collective: this rank's share of the
/// global micro-batches, the agreed denominator, summed gradients. Returns
/// (denominator, flat summed gradient, summed loss).
fn dp_gradient(
    coll: &dyn Collective,
    base: &BaseModel,
    lora: &LoraWeights,
    global: &[TokenBatch],
    step: u64,
) -> (u64, Vec<f32>, f64) {
    let shard = StepSharding::new(global.len(), coll.world_size()).unwrap();
    let mut source = global.iter().cloned();
    let share = shard
        .take_step(
            coll.rank(),
            || source.next().ok_or("ran dry"),
            |b| b.valid_targets() as u64,
        )
        .unwrap();
    let denom = agreed_loss_denominator(coll, &share).unwrap();
    let mut grads = LoraGrads::zeros_like(lora).unwrap();
    let mut loss = 0.0;
    for (i, b) in share.indexed() {
        loss += forward_backward(
            base,
            lora,
            b,
            &opts(shard.micro_step(step, i)),
            denom as f64,
            &mut grads,
        )
        .unwrap()
        .loss_sum;
    }
    let mut g = flat(&grads.to_host().unwrap());
    coll.all_reduce_sum_f32(&mut g).unwrap();
    let mut l = [loss];
    coll.all_reduce_sum_f64(&mut l).unwrap();
    (denom, g, l[0])
}

/// How far `a` is from `b`, tensor by tensor (the layout of `like`): the worst
/// `||a - b|| / ||b||` (L2), and the worst `|a_i - b_i| / max|b|`.
fn relative_error(a: &[f32], b: &[f32], like: &[HostTensor]) -> (f64, f64) {
    let mut at = 0;
    let (mut l2, mut elem) = (0f64, 0f64);
    for (name, v, _) in like {
        let (sa, sb) = (&a[at..at + v.len()], &b[at..at + v.len()]);
        at += v.len();
        let norm = sb.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
        let scale = sb.iter().fold(0f64, |m, &y| m.max((y as f64).abs()));
        assert!(scale > 0.0, "{name}: an all-zero gradient tests nothing");
        let diff = sa
            .iter()
            .zip(sb)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let worst = sa
            .iter()
            .zip(sb)
            .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
        l2 = l2.max(diff / norm);
        elem = elem.max(worst / scale);
    }
    (l2, elem)
}

/// The gradient tolerance of the module docs.
fn assert_same_gradient(a: &[f32], b: &[f32], like: &[HostTensor], what: &str) {
    let (l2, elem) = relative_error(a, b, like);
    eprintln!("{what}: gradients differ by {l2:.1e} (L2, relative), {elem:.1e} (worst element)");
    assert!(
        l2 <= 1e-6 && elem <= 4e-6,
        "{what}: {l2:e} (L2), {elem:e} (element)"
    );
}

#[test]
fn two_ranks_of_batch_4_give_the_gradient_of_one_rank_of_batch_8() {
    let fx = fixture();
    let lora = adapters(&fx.base, 0.0, 1);
    let layout = lora.to_host().unwrap();
    let rows = rows(&fx.base, 8, 7);

    // One process, one micro-batch of 8 rows: the reference, no collectives at all.
    let big = stack(&rows);
    let denom = big.valid_targets();
    let mut g1 = LoraGrads::zeros_like(&lora).unwrap();
    let loss1 = forward_backward(&fx.base, &lora, &big, &opts(0), denom as f64, &mut g1)
        .unwrap()
        .loss_sum;
    let single = flat(&g1.to_host().unwrap());

    // Two ranks: the global step is two micro-batches of 4 rows.
    let global: Vec<TokenBatch> = rows.chunks(4).map(stack).collect();
    let halves: Vec<usize> = global.iter().map(|b| b.valid_targets()).collect();
    assert_ne!(
        halves[0], halves[1],
        "unequal shares make the denominator matter"
    );
    let out = ThreadGroup::run(2, |c| dp_gradient(&c, &fx.base, &lora, &global, 0)).unwrap();

    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&out[0].1),
        bits(&out[1].1),
        "every rank holds the same gradient"
    );
    for (d, g, l) in &out {
        assert_eq!(*d as usize, denom, "the global denominator");
        // The loss sums are f32 sums of per-token losses, in two orders.
        assert!(
            (l - loss1).abs() <= 1e-6 * loss1.abs(),
            "loss {l} vs {loss1}"
        );
        assert_same_gradient(g, &single, &layout, "2 ranks x 4 rows vs 1 x 8");
    }

    // The test has teeth: normalizing each rank by its own count (a mean of
    // per-rank means) is measurably different.
    let mut wrong = vec![0f32; single.len()];
    for b in &global {
        let mut g = LoraGrads::zeros_like(&lora).unwrap();
        forward_backward(
            &fx.base,
            &lora,
            b,
            &opts(0),
            b.valid_targets() as f64,
            &mut g,
        )
        .unwrap();
        for (w, x) in wrong.iter_mut().zip(flat(&g.to_host().unwrap())) {
            *w += x / 2.0;
        }
    }
    assert!(relative_error(&wrong, &single, &layout).0 > 1e-2);
}

/// Dropout masks are keyed by the global micro-batch index, so with dropout on
/// the step's gradient is the same on 1, 2 or 4 ranks.
#[test]
fn with_dropout_the_gradient_is_independent_of_the_world_size() {
    let fx = fixture();
    let lora = adapters(&fx.base, 0.1, 2);
    let layout = lora.to_host().unwrap();
    let global: Vec<TokenBatch> = rows(&fx.base, 8, 8).chunks(2).map(stack).collect();
    let step = 5;
    let (d1, single, _) = dp_gradient(&SingleProcess, &fx.base, &lora, &global, step);
    for world in [2, 4] {
        let out =
            ThreadGroup::run(world, |c| dp_gradient(&c, &fx.base, &lora, &global, step)).unwrap();
        for (d, g, _) in &out {
            assert_eq!(*d, d1);
            assert_same_gradient(g, &single, &layout, &format!("dropout, {world} ranks vs 1"));
        }
    }
    // A rank-local micro-step counter (0, 1 on each rank) would draw other masks.
    let (_, local_keys, _) = {
        let mut g = LoraGrads::zeros_like(&lora).unwrap();
        let denom: usize = global.iter().map(|b| b.valid_targets()).sum();
        for (i, b) in global.iter().enumerate() {
            let local = (i % 2) as u64;
            forward_backward(&fx.base, &lora, b, &opts(local), denom as f64, &mut g).unwrap();
        }
        (0, flat(&g.to_host().unwrap()), 0.0)
    };
    assert!(relative_error(&local_keys, &single, &layout).0 > 1e-2);
}

/// `steps` optimizer steps of AdamW8bit on the global micro-batches of each step;
/// ranks other than 0 start from another adapter and get rank 0's by broadcast.
fn train(
    coll: &dyn Collective,
    base: &BaseModel,
    init: &LoraWeights,
    steps: &[Vec<TokenBatch>],
) -> Vec<f32> {
    let mut lora = if coll.rank() == 0 {
        init.clone()
    } else {
        adapters(base, 0.0, 99)
    };
    let mut params = lora.to_host().unwrap();
    let mut p = flat(&params);
    coll.broadcast_f32(&mut p).unwrap();
    params = unflat(&p, &params);
    lora.update_from_host(&params).unwrap();
    let specs: Vec<ParamSpec> = params
        .iter()
        .map(|(n, v, _)| ParamSpec::new(n.clone(), v.len()))
        .collect();
    let mut opt = AdamW8bit::new(
        AdamWConfig {
            // Every tensor in 8-bit state, as on the 7B model.
            min_8bit_size: 0,
            ..AdamWConfig::default()
        },
        &specs,
    )
    .unwrap();
    for (step, global) in steps.iter().enumerate() {
        let (_, g, _) = dp_gradient(coll, base, &lora, global, step as u64);
        let mut grads = unflat(&g, &params);
        let mut gs: Vec<&mut [f32]> = grads.iter_mut().map(|t| t.1.as_mut_slice()).collect();
        let norm = clip_grad_norm(&mut gs, 1.0);
        assert!(norm.is_finite());
        let mut ps: Vec<&mut [f32]> = params.iter_mut().map(|t| t.1.as_mut_slice()).collect();
        let gr: Vec<&[f32]> = grads.iter().map(|t| t.1.as_slice()).collect();
        opt.step(&mut ps, &gr, LR).unwrap();
        lora.update_from_host(&params).unwrap();
    }
    flat(&params)
}

#[test]
fn two_ranks_of_batch_4_train_the_adapter_of_one_rank_of_batch_8() {
    let fx = fixture();
    let init = adapters(&fx.base, 0.0, 3);
    let start = flat(&init.to_host().unwrap());
    let rows_per_step: Vec<Vec<TokenBatch>> = (0..3).map(|s| rows(&fx.base, 8, 100 + s)).collect();
    let single_steps: Vec<Vec<TokenBatch>> = rows_per_step.iter().map(|r| vec![stack(r)]).collect();
    let dp_steps: Vec<Vec<TokenBatch>> = rows_per_step
        .iter()
        .map(|r| r.chunks(4).map(stack).collect())
        .collect();

    let single = train(&SingleProcess, &fx.base, &init, &single_steps);
    let out = ThreadGroup::run(2, |c| train(&c, &fx.base, &init, &dp_steps)).unwrap();

    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&out[0]),
        bits(&out[1]),
        "the ranks' adapters stay identical"
    );
    let moved = single
        .iter()
        .zip(&start)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > LR, "training moved the adapter ({moved})");
    let worst = out[0]
        .iter()
        .zip(&single)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let same = out[0].iter().zip(&single).filter(|(a, b)| a == b).count();
    eprintln!(
        "after 3 steps: adapters differ by at most {worst:e} (lr {LR}); {same} of {} parameters bit-identical",
        single.len()
    );
    assert!(worst <= LR / 20.0, "adapters differ by {worst} (lr {LR})");

    // The tolerance has teeth: losing one micro-batch of each step is caught.
    let half_steps: Vec<Vec<TokenBatch>> =
        rows_per_step.iter().map(|r| vec![stack(&r[..4])]).collect();
    let half = train(&SingleProcess, &fx.base, &init, &half_steps);
    let lost = half
        .iter()
        .zip(&single)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        lost > LR / 20.0,
        "half the data moved the adapter by only {lost}"
    );
}
