//! Every family against an independent float64 forward written here in plain Rust
//! (loops over `Vec<f64>`, no candle, no code shared with the reference decoder):
//! Mistral with its window, Llama 2, Llama 3 with Llama 3.1's RoPE scaling and tied
//! embeddings, Llama with `attention_bias`/`mlp_bias`, Qwen 2.5 with q/k/v biases
//! (and a YaRN block), Qwen 3 with its q/k norms. The RoPE frequencies here follow
//! the published formulas (Meta's `apply_scaling` for Llama 3.1, the YaRN paper as
//! transformers applies it), not `qtrain_model::rope`.
//!
//! Also: the Llama 3.1 block changes the loss (it used to be ignored), and the
//! KV-cached decoder of each family matches its full forward.

mod common;
mod family_configs;

use candle_core::{DType, Tensor};
use common::*;
use family_configs::small_family_config;
use qtrain_model::{qk_norm_names, ModelConfig, Proj};
use qtrain_reference::decode::max_rel_error_vs_full_forward;
use qtrain_reference::{forward_logits, forward_loss};
use qtrain_step::TokenBatch;
use std::collections::HashMap;
use std::f64::consts::PI;

const VOCAB: usize = 48;

/// A tensor's values, row-major.
fn host(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The rotary inverse frequencies and the factor on cos/sin, from the papers.
fn frequencies(cfg: &ModelConfig, seq_len: usize) -> (Vec<f64>, f64) {
    let d = cfg.head_dim();
    let theta = cfg.rope_theta;
    let plain = |base: f64| -> Vec<f64> {
        (0..d / 2)
            .map(|i| 1.0 / base.powf(2.0 * i as f64 / d as f64))
            .collect()
    };
    let Some(block) = &cfg.rope_scaling else {
        return (plain(theta), 1.0);
    };
    let num = |k: &str| block.get(k).and_then(|v| v.as_f64());
    let kind = block
        .get("rope_type")
        .or(block.get("type"))
        .and_then(|v| v.as_str())
        .unwrap();
    let factor = num("factor").unwrap();
    match kind {
        "linear" => (plain(theta).iter().map(|f| f / factor).collect(), 1.0),
        // Meta's llama-models `apply_scaling`.
        "llama3" => {
            let (lo, hi) = (
                num("low_freq_factor").unwrap(),
                num("high_freq_factor").unwrap(),
            );
            let old = num("original_max_position_embeddings").unwrap();
            let freqs = plain(theta)
                .into_iter()
                .map(|freq| {
                    let wavelen = 2.0 * PI / freq;
                    if wavelen < old / hi {
                        freq
                    } else if wavelen > old / lo {
                        freq / factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect();
            (freqs, 1.0)
        }
        // YaRN: a linear ramp over the dimensions whose number of rotations over the
        // original context lies between beta_slow (1) and beta_fast (32), rounded
        // outwards; attention temperature 0.1 ln(s) + 1 on cos and sin.
        "yarn" => {
            let orig = num("original_max_position_embeddings").unwrap();
            let dim_for = |rotations: f64| {
                d as f64 * (orig / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln())
            };
            let low = dim_for(32.0).floor().max(0.0);
            let high = dim_for(1.0).ceil().min(d as f64 - 1.0);
            let freqs = (0..d / 2)
                .map(|i| {
                    let f = 1.0 / theta.powf(2.0 * i as f64 / d as f64);
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    f * (1.0 - ramp) + f / factor * ramp
                })
                .collect();
            (freqs, 0.1 * factor.ln() + 1.0)
        }
        "dynamic" => {
            let max = cfg.max_position_embeddings as f64;
            let len = (seq_len as f64).max(max);
            let base =
                theta * (factor * len / max - (factor - 1.0)).powf(d as f64 / (d as f64 - 2.0));
            (plain(base), 1.0)
        }
        other => panic!("{other}"),
    }
}

/// The whole model on `batch` in f64: logits `[batch * seq][vocab]`.
fn independent_logits(
    cfg: &ModelConfig,
    w: &HashMap<String, Tensor>,
    batch: &TokenBatch,
) -> Vec<Vec<f64>> {
    let get = |n: &str| host(&w[n]);
    let (h, d) = (cfg.hidden_size, cfg.head_dim());
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
    let eps = cfg.rms_norm_eps;
    let (b, t) = (batch.batch_size, batch.seq_len);
    let n = b * t;
    let rms = |x: &[f64], weight: &[f64]| -> Vec<f64> {
        let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
        x.iter().zip(weight).map(|(v, w)| v * r * w).collect()
    };
    // y = x W^T (+ b), W: [out, in]
    let linear = |x: &[f64], l: usize, p: Proj| -> Vec<f64> {
        let [out, inp] = cfg.proj_shape(p);
        let wt = get(&p.weight_name(l));
        let bias = cfg.proj_has_bias(p).then(|| get(&p.bias_name(l)));
        (0..out)
            .map(|o| {
                let dot: f64 = (0..inp).map(|i| wt[o * inp + i] * x[i]).sum();
                dot + bias.as_ref().map_or(0.0, |b| b[o])
            })
            .collect()
    };
    let max_pos = batch
        .position_ids
        .iter()
        .max()
        .map_or(0, |&p| p as usize + 1);
    let (inv_freq, att) = frequencies(cfg, max_pos);
    let rotate = |v: &mut [f64], pos: u32| {
        for i in 0..d / 2 {
            let a = pos as f64 * inv_freq[i];
            let (c, s) = (a.cos() * att, a.sin() * att);
            let (x1, x2) = (v[i], v[i + d / 2]);
            v[i] = x1 * c - x2 * s;
            v[i + d / 2] = x2 * c + x1 * s;
        }
    };
    let embed = get("model.embed_tokens.weight");
    let mut x: Vec<Vec<f64>> = batch
        .input_ids
        .iter()
        .map(|&id| embed[id as usize * h..(id as usize + 1) * h].to_vec())
        .collect();
    for l in 0..cfg.num_hidden_layers {
        let ln1 = get(&format!("model.layers.{l}.input_layernorm.weight"));
        let norms = cfg.has_qk_norm().then(|| qk_norm_names(l).map(|n| get(&n)));
        let mut q = Vec::with_capacity(n);
        let mut k = Vec::with_capacity(n);
        let mut v = Vec::with_capacity(n);
        for (tok, xi) in x.iter().enumerate() {
            let hn = rms(xi, &ln1);
            let (mut qi, mut ki) = (linear(&hn, l, Proj::Q), linear(&hn, l, Proj::K));
            for (heads, vec, which) in [(nh, &mut qi, 0), (nkv, &mut ki, 1)] {
                for head in 0..heads {
                    let s = &mut vec[head * d..(head + 1) * d];
                    if let Some(nw) = &norms {
                        let normed = rms(s, &nw[which]);
                        s.copy_from_slice(&normed);
                    }
                    rotate(s, batch.position_ids[tok]);
                }
            }
            q.push(qi);
            k.push(ki);
            v.push(linear(&hn, l, Proj::V));
        }
        let mut attn = vec![vec![0.0; nh * d]; n];
        for row in 0..b {
            for i in 0..t {
                let qi = row * t + i;
                for head in 0..nh {
                    let kvh = head / (nh / nkv);
                    let keys: Vec<usize> = (0..=i)
                        .filter(|&j| {
                            batch.segment_ids[row * t + j] == batch.segment_ids[qi]
                                && cfg.sliding_window.is_none_or(|wdw| i - j < wdw)
                        })
                        .map(|j| row * t + j)
                        .collect();
                    let scores: Vec<f64> = keys
                        .iter()
                        .map(|&kj| {
                            (0..d)
                                .map(|e| q[qi][head * d + e] * k[kj][kvh * d + e])
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    for (&kj, s) in keys.iter().zip(&scores) {
                        let p = (s - m).exp() / z;
                        for e in 0..d {
                            attn[qi][head * d + e] += p * v[kj][kvh * d + e];
                        }
                    }
                }
            }
        }
        let ln2 = get(&format!("model.layers.{l}.post_attention_layernorm.weight"));
        for tok in 0..n {
            let o = linear(&attn[tok], l, Proj::O);
            let x2: Vec<f64> = x[tok].iter().zip(&o).map(|(a, b)| a + b).collect();
            let hn = rms(&x2, &ln2);
            let (g, u) = (linear(&hn, l, Proj::Gate), linear(&hn, l, Proj::Up));
            let m: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let dn = linear(&m, l, Proj::Down);
            x[tok] = x2.iter().zip(&dn).map(|(a, b)| a + b).collect();
        }
    }
    let norm = get("model.norm.weight");
    let head = get(lm_head_name(cfg));
    x.iter()
        .map(|xi| {
            let hn = rms(xi, &norm);
            (0..cfg.vocab_size)
                .map(|v| (0..h).map(|e| head[v * h + e] * hn[e]).sum())
                .collect()
        })
        .collect()
}

/// Summed next-token loss of `logits` with the batch's shifted targets.
fn independent_loss(logits: &[Vec<f64>], batch: &TokenBatch) -> f64 {
    batch
        .shifted_targets()
        .iter()
        .zip(logits)
        .filter(|(&t, _)| t >= 0)
        .map(|(&t, row)| {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            lse - row[t as usize]
        })
        .sum()
}

fn compare(cfg: &ModelConfig, what: &str) {
    let (base, weights) = random_base(cfg, 31, DType::F64);
    let batch = packed_batch(cfg.vocab_size, 14, 5);
    let ours = host(&forward_logits(&base, None, &batch).unwrap());
    let theirs: Vec<f64> = independent_logits(cfg, &weights, &batch).concat();
    let scale = theirs.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = ours
        .iter()
        .zip(&theirs)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    eprintln!("{what}: max rel logit error vs independent f64 forward {err:.1e}");
    assert!(scale > 1.0, "{what}: logits too small to compare ({scale})");
    assert!(err < 1e-12, "{what}: {err:e}");
}

/// A tiny preset of a family with the test vocabulary, read back through config.json.
fn preset(name: &str) -> ModelConfig {
    let c = ModelConfig::preset(name, VOCAB).unwrap();
    let text = serde_json::to_string(&c.to_json()).unwrap();
    ModelConfig::from_json_str(&text, std::path::Path::new("preset/config.json")).unwrap()
}

#[test]
fn every_family_matches_an_independent_f64_forward() {
    let mut window = preset("tiny-window");
    window.num_hidden_layers = 1;
    compare(&window, "mistral, window 8");
    for name in ["tiny-llama2", "tiny-llama3", "tiny-qwen2", "tiny-qwen3"] {
        compare(&preset(name), name);
    }
    for family in ["llama3", "llama-bias", "qwen2", "qwen3", "yarn"] {
        compare(&small_family_config(VOCAB, family), family);
    }
    // Linear and dynamic (past max_position_embeddings = 8) scaling.
    for block in [
        serde_json::json!({"type": "linear", "factor": 3.0}),
        serde_json::json!({"type": "dynamic", "factor": 2.0}),
    ] {
        let mut c = small_config(VOCAB, None);
        c.model_type = "llama".into();
        c.max_position_embeddings = 8;
        c.rope_theta = 100.0;
        c.rope_scaling = Some(block.clone());
        compare(&c, &format!("llama, {block}"));
    }
}

/// Llama 3.1's block used to be read and ignored: the loss with and without it was
/// the same. Now it differs, and equals the independent computation either way.
#[test]
fn llama3_rope_block_changes_the_loss_as_computed_independently() {
    let with = preset("tiny-llama3");
    assert!(with.rope_scaling.is_some());
    let mut without = with.clone();
    without.rope_scaling = None;
    let (base, weights) = random_base(&with, 77, DType::F64);
    let (base_plain, _) = random_base(&without, 77, DType::F64);
    // Long enough that the scaled low frequencies turn by a visible angle.
    let batch = random_rows(VOCAB, 1, 48, 3);
    let mut losses = Vec::new();
    for (cfg, base) in [(&with, &base), (&without, &base_plain)] {
        let ours = forward_loss(base, None, &batch).unwrap().loss_sum;
        let theirs = independent_loss(&independent_logits(cfg, &weights, &batch), &batch);
        assert!(
            (ours - theirs).abs() < 1e-11 * theirs.abs(),
            "{ours} vs {theirs}"
        );
        losses.push(ours);
    }
    let gap = (losses[0] - losses[1]).abs() / losses[1];
    eprintln!(
        "llama3 RoPE block: loss {} vs {} without (rel gap {gap:.1e})",
        losses[0], losses[1]
    );
    assert!(gap > 1e-6, "the RoPE block made no difference: {losses:?}");
}

/// The KV-cached decoder of every family equals the full forward at every step.
#[test]
fn cached_decoding_matches_the_full_forward_per_family() {
    for name in ["tiny-llama3", "tiny-qwen2", "tiny-qwen3", "tiny-llama2"] {
        let cfg = preset(name);
        let (base, _) = random_base(&cfg, 9, DType::F64);
        let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
        let err = max_rel_error_vs_full_forward(&base, None, &tokens, 5).unwrap();
        eprintln!("{name}: cached vs full rel {err:.1e}");
        assert!(err < 1e-12, "{name}: {err:e}");
    }
}
