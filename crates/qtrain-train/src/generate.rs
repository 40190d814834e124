//! Decoding from base + adapter, for showing what training did (the end of
//! `qtrain run`, and `qtrain generate`): greedy, or temperature + top-p (nucleus)
//! sampling with a seeded RNG. Each new token re-runs the whole sequence through
//! the model (no KV cache yet): fine for short answers and tiny models, slow for
//! long generations on 7B models.

use candle_core::{IndexOp, D};
use qtrain_lora::{forward_logits, LoraWeights, TokenBatch};
use qtrain_model::BaseModel;
use rand::{Rng, SeedableRng};

/// Sampling settings; `None` in [`generate`] means greedy.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

/// Appends up to `max_new` greedily chosen tokens to `prompt`, stopping at `eos`.
/// Returns only the new tokens.
pub fn greedy(
    base: &BaseModel,
    lora: Option<&LoraWeights>,
    prompt: &[u32],
    max_new: usize,
    eos: Option<u32>,
) -> qtrain_lora::Result<Vec<u32>> {
    generate(base, lora, prompt, max_new, eos, None)
}

/// Generates up to `max_new` tokens after `prompt` (greedy when `sampling` is None).
pub fn generate(
    base: &BaseModel,
    lora: Option<&LoraWeights>,
    prompt: &[u32],
    max_new: usize,
    eos: Option<u32>,
    sampling: Option<Sampling>,
) -> qtrain_lora::Result<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.map_or(0, |s| s.seed));
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let batch = TokenBatch::from_rows(std::slice::from_ref(&ids))?;
        let logits = forward_logits(base, lora, &batch)?;
        let last = logits.i((0, ids.len() - 1))?;
        let next = match sampling {
            None => last.argmax(D::Minus1)?.to_scalar::<u32>()?,
            Some(s) => {
                let v: Vec<f32> = last.to_dtype(candle_core::DType::F32)?.to_vec1()?;
                top_p_sample(&v, s.temperature, s.top_p, rng.random::<f64>())
            }
        };
        if Some(next) == eos {
            break;
        }
        ids.push(next);
        out.push(next);
    }
    Ok(out)
}

/// Nucleus sampling: the smallest set of tokens whose probability (at
/// `temperature`) reaches `top_p`, sampled with the uniform draw `u` in [0, 1).
pub fn top_p_sample(logits: &[f32], temperature: f64, top_p: f64, u: f64) -> u32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, ((x as f64 - max) / temperature).exp()))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut n = 0;
    for p in &probs {
        kept += p.1 / z;
        n += 1;
        if kept >= top_p {
            break;
        }
    }
    let mut target = u * kept;
    for p in &probs[..n] {
        target -= p.1 / z;
        if target < 0.0 {
            return p.0;
        }
    }
    probs[n - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03] at temperature 1.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        // top_p 0.7 keeps the first two tokens only, whatever the draw.
        for k in 0..100 {
            let t = top_p_sample(&logits, 1.0, 0.7, k as f64 / 100.0);
            assert!(t == 0 || t == 1, "{t}");
        }
        // A draw in the lower 0.64/0.88 share picks the most likely token.
        assert_eq!(top_p_sample(&logits, 1.0, 0.7, 0.5), 0);
        assert_eq!(top_p_sample(&logits, 1.0, 0.7, 0.99), 1);
        // top_p 1.0 can reach the least likely token.
        assert_eq!(top_p_sample(&logits, 1.0, 1.0, 0.9999), 3);
        // A tiny temperature is greedy.
        assert_eq!(top_p_sample(&logits, 1e-3, 0.9, 0.999), 0);
    }
}
