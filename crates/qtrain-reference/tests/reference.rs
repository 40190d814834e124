//! The forward of the base model (no adapters) against candle-transformers'
//! Mistral built from the same weights.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::mistral;
use common::*;
use qtrain_model::{ModelConfig, PRESETS};
use qtrain_reference::forward_logits;

const VOCAB: usize = 64;

fn their_config(cfg: &ModelConfig, window: Option<usize>) -> mistral::Config {
    mistral::Config {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        head_dim: Some(cfg.head_dim()),
        num_key_value_heads: cfg.num_kv_heads(),
        hidden_act: candle_nn::Activation::Silu,
        max_position_embeddings: cfg.max_position_embeddings,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta,
        sliding_window: window,
        use_flash_attn: false,
    }
}

/// `max |a - b| / max |b|`
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b) / max_abs(b)
}

#[test]
fn base_logits_match_candle_transformers_mistral_on_tiny() {
    assert!(PRESETS.contains(&"tiny"));
    let cfg = ModelConfig::preset("tiny", VOCAB).unwrap();
    let weights = random_weights(&cfg, 2024, DType::F32);
    let base = base_from_weights(&cfg, &weights, DType::F32);
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    let mut theirs = mistral::Model::new(&their_config(&cfg, None), vb).unwrap();

    let (b, t) = (2, 12);
    let batch = random_rows(VOCAB, b, t, 7);
    let ours = forward_logits(&base, None, &batch).unwrap();
    assert_eq!(ours.dims(), &[b, t, VOCAB]);
    let ids = Tensor::from_slice(&batch.input_ids, (b, t), &Device::Cpu).unwrap();

    // Their forward returns the last position only: the full-sequence pass checks
    // the masked prefill, the token-by-token pass (KV cache) checks every position.
    let last = theirs.forward(&ids, 0).unwrap().squeeze(1).unwrap();
    let e_last = rel(
        &ours.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap(),
        &last,
    );
    theirs.clear_kv_cache();
    let mut steps = Vec::new();
    for pos in 0..t {
        steps.push(
            theirs
                .forward(&ids.narrow(1, pos, 1).unwrap(), pos)
                .unwrap(),
        );
    }
    let all = Tensor::cat(&steps, 1).unwrap();
    let e_all = rel(&ours, &all);
    eprintln!("vs candle-transformers mistral: last position rel {e_last:.2e}, all positions rel {e_all:.2e}");
    assert!(e_last < 1e-4 && e_all < 1e-4, "{e_last:e} {e_all:e}");
    // Not vacuous: the logits vary over positions and tokens.
    assert!(max_abs(&ours) > 1.0);
}

/// Hugging Face's window `w` (key > query - w) is candle-transformers' `w - 1`
/// (it keeps `j + w >= i`); with that shift both agree on a sequence longer than
/// the window.
#[test]
fn sliding_window_matches_candle_transformers_shifted_by_one() {
    let mut cfg = ModelConfig::preset("tiny", VOCAB).unwrap();
    cfg.num_hidden_layers = 2;
    cfg.sliding_window = Some(4);
    let weights = random_weights(&cfg, 99, DType::F32);
    let base = base_from_weights(&cfg, &weights, DType::F32);
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let mut theirs = mistral::Model::new(&their_config(&cfg, Some(3)), vb).unwrap();
    let batch = random_rows(VOCAB, 2, 11, 8);
    let ours = forward_logits(&base, None, &batch)
        .unwrap()
        .narrow(1, 10, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let ids = Tensor::from_slice(&batch.input_ids, (2, 11), &Device::Cpu).unwrap();
    let last = theirs.forward(&ids, 0).unwrap().squeeze(1).unwrap();
    let e = rel(&ours, &last);
    eprintln!("sliding window vs candle-transformers: rel {e:.2e}");
    assert!(e < 1e-4, "{e:e}");
    // And the window matters: without it the last logits differ.
    let mut full = cfg.clone();
    full.sliding_window = None;
    let base_full = base_from_weights(&full, &random_weights(&cfg, 99, DType::F32), DType::F32);
    let no_window = forward_logits(&base_full, None, &batch)
        .unwrap()
        .narrow(1, 10, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    assert!(rel(&no_window, &last) > 1e-3);
}
