//! The KV-cache decoder against the full-sequence forward: at every step its logits
//! equal `forward_logits` on the whole sequence so far, for the base alone and with
//! an adapter, with and without a sliding window, whatever the chunking, on dense
//! and NF4 bases, with the dequantized weights kept or not.

mod common;

use candle_core::{DType, IndexOp};
use common::*;
use qtrain_model::{BaseModel, LoadOptions, ModelConfig, Quantization};
use qtrain_reference::decode::max_rel_error_vs_full_forward;
use qtrain_reference::{forward_logits, Decoder, ReferenceError, DEFAULT_KEEP_WEIGHTS_BYTES};
use qtrain_step::{LoraWeights, StepError, TokenBatch};
use rand::{Rng, SeedableRng};

const VOCAB: usize = 96;

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..VOCAB as u32)).collect()
}

/// Feeds `seq` to a fresh decoder in chunks of the given sizes and checks the
/// logits after each chunk against row `end - 1` of the full forward. Returns the
/// largest relative error.
fn check_chunks(
    base: &BaseModel,
    lora: Option<&LoraWeights>,
    seq: &[u32],
    chunks: &[usize],
    keep_weights_bytes: usize,
) -> f64 {
    assert_eq!(chunks.iter().sum::<usize>(), seq.len());
    let full = forward_logits(base, lora, &TokenBatch::from_rows(&[seq.to_vec()]).unwrap())
        .unwrap()
        .i(0)
        .unwrap();
    let mut dec = Decoder::with_weight_budget(base, lora, keep_weights_bytes).unwrap();
    assert_eq!(dec.keeps_weights(), keep_weights_bytes > 0);
    let mut end = 0;
    let mut worst = 0f64;
    for &c in chunks {
        let got = dec.forward(&seq[end..end + c]).unwrap();
        end += c;
        assert_eq!(dec.position(), end);
        assert_eq!(got.dtype(), DType::F32);
        let want = full.i(end - 1).unwrap();
        assert_eq!(got.dims(), want.dims());
        let rel = max_abs_diff(&got, &want) / max_abs(&want);
        assert!(
            rel < 1e-5,
            "position {}: cached logits differ from the full forward by rel {rel:.2e}",
            end - 1
        );
        worst = worst.max(rel);
    }
    worst
}

/// Prompt at once then one token at a time; one token at a time from the start;
/// chunks of 3 (a multi-token chunk over a non-empty, trimmed cache).
fn check_all_chunkings(cfg: &ModelConfig, prompt: usize, total: usize, seed: u64) {
    let (base, _) = random_base(cfg, seed, DType::F32);
    // Dropout in the config must be ignored, as in forward_logits.
    let lora = random_lora(cfg, &all_targets_config(0.1), seed + 1, DType::F32);
    let seq = tokens(total, seed + 2);
    let mut prompt_then_ones = vec![prompt];
    prompt_then_ones.extend(std::iter::repeat_n(1, total - prompt));
    let ones = vec![1; total];
    let mut threes = vec![3; total / 3];
    if !total.is_multiple_of(3) {
        threes.push(total % 3);
    }
    for lora in [None, Some(&lora)] {
        // The self-check `qtrain doctor` can run on a GPU agrees.
        let rel = max_rel_error_vs_full_forward(&base, lora, &seq, prompt).unwrap();
        assert!(rel < 1e-5, "self-check: rel {rel:.2e}");
        for chunks in [&prompt_then_ones, &ones, &threes] {
            let rel = check_chunks(&base, lora, &seq, chunks, DEFAULT_KEEP_WEIGHTS_BYTES);
            eprintln!(
                "window {:?}, adapter {}, {} chunks: max rel {rel:.2e}",
                cfg.sliding_window,
                lora.is_some(),
                chunks.len()
            );
        }
    }
}

#[test]
fn cached_logits_equal_full_forward_tiny() {
    let cfg = ModelConfig::preset("tiny", VOCAB).unwrap();
    assert_eq!(cfg.sliding_window, None);
    check_all_chunkings(&cfg, 11, 24, 10);
}

#[test]
fn cached_logits_equal_full_forward_tiny_window() {
    let cfg = ModelConfig::preset("tiny-window", VOCAB).unwrap();
    let w = cfg.sliding_window.expect("tiny-window has a window");
    assert_eq!(w, 8);
    // The prompt alone is longer than the window, and generation runs well past it.
    check_all_chunkings(&cfg, 13, 30, 20);
}

/// The real `qtrain generate` path: an NF4 base loaded from a model directory.
/// Dequantizing per use and keeping the dequantized weights give identical logits.
#[test]
fn nf4_base_with_and_without_kept_weights() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::preset("tiny-window", VOCAB).unwrap();
    qtrain_model::random::write_random_model(
        dir.path(),
        &cfg,
        11,
        1 << 20,
        "{}",
        &serde_json::json!({}),
    )
    .unwrap();
    let opts = LoadOptions {
        device: candle_core::Device::Cpu,
        dtype: DType::F32,
        quantization: Quantization::default(),
        threads: 1,
    };
    let base = BaseModel::load(dir.path(), &opts).unwrap();
    let lora = random_lora(&cfg, &all_targets_config(0.0), 12, DType::F32);
    let seq = tokens(20, 13);
    let mut chunks = vec![10];
    chunks.extend([1; 10]);
    for budget in [0, DEFAULT_KEEP_WEIGHTS_BYTES] {
        check_chunks(&base, Some(&lora), &seq, &chunks, budget);
    }
    let mut per_use = Decoder::with_weight_budget(&base, Some(&lora), 0).unwrap();
    let mut kept = Decoder::new(&base, Some(&lora)).unwrap();
    assert!(kept.keeps_weights() && !per_use.keeps_weights());
    let (a, b) = (per_use.forward(&seq).unwrap(), kept.forward(&seq).unwrap());
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let (a, b) = (per_use.forward(&[5]).unwrap(), kept.forward(&[5]).unwrap());
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn window_cache_stays_bounded() {
    let cfg = ModelConfig::preset("tiny-window", VOCAB).unwrap();
    let (base, _) = random_base(&cfg, 3, DType::F32);
    let mut dec = Decoder::new(&base, None).unwrap();
    dec.forward(&tokens(13, 4)).unwrap();
    // Next query at 13 sees 6..=13: the cache keeps 6..=12.
    assert_eq!(dec.cache().positions(), &[6, 7, 8, 9, 10, 11, 12]);
    for t in tokens(20, 5) {
        dec.forward(&[t]).unwrap();
        assert_eq!(dec.cache().len(), 7);
    }
    assert_eq!(dec.position(), 33);
    let (k, v) = dec.cache().layer(1).unwrap();
    assert_eq!(k.dims(), &[1, 2, 7, cfg.head_dim()]);
    assert_eq!(v.dims(), k.dims());
    // Without a window everything is kept.
    let cfg = ModelConfig::preset("tiny", VOCAB).unwrap();
    let (base, _) = random_base(&cfg, 3, DType::F32);
    let mut dec = Decoder::new(&base, None).unwrap();
    dec.forward(&tokens(13, 4)).unwrap();
    dec.forward(&[1]).unwrap();
    assert_eq!(dec.cache().len(), 14);
    dec.reset();
    assert_eq!((dec.position(), dec.cache().len()), (0, 0));
}

#[test]
fn reset_starts_a_new_sequence() {
    let cfg = ModelConfig::preset("tiny-window", VOCAB).unwrap();
    let (base, _) = random_base(&cfg, 6, DType::F32);
    let seq = tokens(10, 7);
    let mut dec = Decoder::new(&base, None).unwrap();
    let first = dec.forward(&seq).unwrap();
    dec.forward(&[3, 4]).unwrap();
    dec.reset();
    let again = dec.forward(&seq).unwrap();
    assert_eq!(max_abs_diff(&first, &again), 0.0);
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = ModelConfig::preset("tiny-window", VOCAB).unwrap();
    let (base, _) = random_base(&cfg, 8, DType::F32);
    let mut dec = Decoder::new(&base, None).unwrap();
    assert!(matches!(dec.forward(&[]), Err(ReferenceError::Decode(_))));
    match dec.forward(&[1, VOCAB as u32]) {
        Err(ReferenceError::Step(StepError::TokenOutOfRange { index, id, vocab })) => {
            assert_eq!((index, id as usize, vocab), (1, VOCAB, VOCAB))
        }
        other => panic!("expected TokenOutOfRange, got {other:?}"),
    }
    // A rejected chunk leaves the cache untouched.
    assert_eq!(dec.position(), 0);
    assert!(max_rel_error_vs_full_forward(&base, None, &[1, 2], 0).is_err());
    assert!(max_rel_error_vs_full_forward(&base, None, &[1, 2], 3).is_err());
    let other = small_config(VOCAB, None);
    let lora = random_lora(&other, &all_targets_config(0.0), 1, DType::F32);
    let mut one_layer = other.clone();
    one_layer.num_hidden_layers = 1;
    let (small, _) = random_base(&one_layer, 2, DType::F32);
    assert!(matches!(
        Decoder::new(&small, Some(&lora)),
        Err(ReferenceError::LayerCount {
            found: 2,
            expected: 1
        })
    ));
}
