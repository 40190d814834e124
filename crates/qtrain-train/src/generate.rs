//! Decoding from base + adapter, for showing what training did (the end of
//! `qtrain run`, and `qtrain generate`): greedy, or temperature + top-p (nucleus)
//! sampling with a seeded RNG (one uniform draw per sampled token, from a ChaCha8
//! stream seeded with [`Sampling::seed`]).
//!
//! The prompt goes through the model once and each new token costs one position:
//! [`qtrain_reference::Decoder`] keeps the keys and values of every layer (a KV cache,
//! bounded by the sliding window when the model has one) and runs the training
//! forward's ops, so base + adapter generate exactly as they were trained.

use candle_core::{DType, Tensor, D};
use qtrain_model::BaseModel;
use qtrain_reference::Decoder;
use qtrain_step::LoraWeights;
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
) -> qtrain_reference::Result<Vec<u32>> {
    generate(base, lora, prompt, max_new, eos, None)
}

/// Generates up to `max_new` tokens after `prompt` (greedy when `sampling` is None),
/// stopping before `eos` (which is not returned). Returns only the new tokens.
pub fn generate(
    base: &BaseModel,
    lora: Option<&LoraWeights>,
    prompt: &[u32],
    max_new: usize,
    eos: Option<u32>,
    sampling: Option<Sampling>,
) -> qtrain_reference::Result<Vec<u32>> {
    let mut out = Vec::new();
    if max_new == 0 {
        return Ok(out);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.map_or(0, |s| s.seed));
    let mut decoder = Decoder::new(base, lora)?;
    let mut logits = decoder.forward(prompt)?;
    loop {
        let next = pick(&logits, sampling, &mut rng)?;
        if Some(next) == eos {
            break;
        }
        out.push(next);
        if out.len() == max_new {
            break;
        }
        logits = decoder.forward(&[next])?;
    }
    Ok(out)
}

/// The next token from the last position's logits `[vocab]`.
fn pick(
    logits: &Tensor,
    sampling: Option<Sampling>,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> qtrain_reference::Result<u32> {
    Ok(match sampling {
        None => logits.argmax(D::Minus1)?.to_scalar::<u32>()?,
        Some(s) => {
            let v: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
            top_p_sample(&v, s.temperature, s.top_p, rng.random::<f64>())
        }
    })
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
    use candle_core::{Device, IndexOp};
    use qtrain_model::{LoadOptions, Quantization, PROJECTIONS};
    use qtrain_reference::forward_logits;
    use qtrain_step::{LoraConfig, TokenBatch};

    /// The full-recompute decoder (what `generate` did before the KV cache), kept
    /// as the oracle: every step runs the whole sequence through `forward_logits`.
    fn generate_uncached(
        base: &BaseModel,
        lora: Option<&LoraWeights>,
        prompt: &[u32],
        max_new: usize,
        eos: Option<u32>,
        sampling: Option<Sampling>,
    ) -> Vec<u32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.map_or(0, |s| s.seed));
        let mut ids = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..max_new {
            let batch = TokenBatch::from_rows(std::slice::from_ref(&ids)).unwrap();
            let logits = forward_logits(base, lora, &batch).unwrap();
            let last = logits.i((0, ids.len() - 1)).unwrap();
            let next = pick(&last, sampling, &mut rng).unwrap();
            if Some(next) == eos {
                break;
            }
            ids.push(next);
            out.push(next);
        }
        out
    }

    /// A seeded random `preset` model with the built-in tokenizer, NF4 on the CPU
    /// in f32 (the path `qtrain generate` takes without a GPU).
    fn tiny_model(preset: &str, seed: u64) -> BaseModel {
        let dir = tempfile::tempdir().unwrap();
        crate::models::write_random(preset, dir.path(), seed, usize::MAX).unwrap();
        let opts = LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            quantization: Quantization::default(),
            threads: 1,
        };
        BaseModel::load(dir.path(), &opts).unwrap()
    }

    /// Adapters on every projection with a random, non-zero `B` (PEFT's `B = 0`
    /// would make the adapter a no-op).
    fn trained_like_adapter(base: &BaseModel, seed: u64) -> LoraWeights {
        let cfg = LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: PROJECTIONS.to_vec(),
            rslora: false,
            seed,
        };
        let mut lora = LoraWeights::init(&cfg, &base.config, &Device::Cpu).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let bs: Vec<(String, Vec<usize>)> = lora
            .tensors()
            .into_iter()
            .filter(|(n, _)| n.ends_with("lora_B"))
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        for (name, dims) in bs {
            let v: Vec<f32> = (0..dims.iter().product::<usize>())
                .map(|_| rng.random_range(-0.1f32..0.1))
                .collect();
            lora.set_from_host(&name, &v).unwrap();
        }
        lora
    }

    fn prompt(base: &BaseModel, n: usize, seed: u64) -> Vec<u32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let vocab = base.config.vocab_size as u32;
        (0..n).map(|_| rng.random_range(3..vocab)).collect()
    }

    #[test]
    fn cached_greedy_equals_full_recompute() {
        for (preset, prompt_len) in [("tiny", 9), ("tiny-window", 13)] {
            let base = tiny_model(preset, 4);
            let lora = trained_like_adapter(&base, 5);
            let p = prompt(&base, prompt_len, 6);
            for lora in [None, Some(&lora)] {
                let want = generate_uncached(&base, lora, &p, 20, None, None);
                let got = greedy(&base, lora, &p, 20, None).unwrap();
                assert_eq!(got, want, "{preset}, adapter {}", lora.is_some());
                assert_eq!(got.len(), 20);
                // A random model repeating one token would make the check weak.
                let distinct: std::collections::BTreeSet<_> = got.iter().collect();
                assert!(distinct.len() > 1, "{preset}: {got:?}");
                // eos stops generation before it: the reference's k-th token as eos
                // gives the tokens up to its first occurrence.
                let eos = want[7];
                let first = want.iter().position(|&t| t == eos).unwrap();
                let stopped = greedy(&base, lora, &p, 20, Some(eos)).unwrap();
                assert_eq!(stopped, want[..first]);
            }
            assert!(greedy(&base, None, &p, 0, None).unwrap().is_empty());
            assert!(greedy(&base, None, &[], 4, None).is_err());
        }
    }

    #[test]
    fn cached_sampling_is_seeded_and_matches_full_recompute() {
        let base = tiny_model("tiny-window", 7);
        let lora = trained_like_adapter(&base, 8);
        let p = prompt(&base, 11, 9);
        let s = |seed| {
            Some(Sampling {
                temperature: 1.5,
                top_p: 0.95,
                seed,
            })
        };
        let a = generate(&base, Some(&lora), &p, 24, None, s(1)).unwrap();
        let b = generate(&base, Some(&lora), &p, 24, None, s(1)).unwrap();
        assert_eq!(a, b, "same seed, same tokens");
        assert_eq!(a.len(), 24);
        let c = generate(&base, Some(&lora), &p, 24, None, s(2)).unwrap();
        assert_ne!(a, c, "another seed draws other tokens");
        // Same RNG draws as the full-recompute path: the same tokens.
        assert_eq!(a, generate_uncached(&base, Some(&lora), &p, 24, None, s(1)));
        // Sampling differs from greedy on this hot a temperature.
        assert_ne!(a, greedy(&base, Some(&lora), &p, 24, None).unwrap());
    }

    /// CPU time of the calling thread (with RAYON_NUM_THREADS=1 all of candle's
    /// work runs on it, so this is immune to other processes on a shared machine).
    fn thread_cpu_time() -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0);
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// Not a timed test: measures the KV cache's speed-up for the report
    /// (`RAYON_NUM_THREADS=1 cargo test -p qtrain-train kv_cache_speedup -- --ignored
    /// --nocapture`). Best of 3 after a warm-up, wall clock and thread CPU time.
    /// Without RAYON_NUM_THREADS candle 0.11 re-reads /proc/cpuinfo on every CPU
    /// matmul (~55 us here), which weighs on the many small matmuls of a decode step.
    #[test]
    #[ignore]
    fn kv_cache_speedup() {
        let base = tiny_model("tiny", 1);
        let lora = trained_like_adapter(&base, 2);
        let p = prompt(&base, 32, 3);
        let best = |f: &dyn Fn() -> Vec<u32>| {
            let reference = f();
            let (mut wall, mut cpu) = (std::time::Duration::MAX, std::time::Duration::MAX);
            for _ in 0..3 {
                let (t0, c0) = (std::time::Instant::now(), thread_cpu_time());
                assert_eq!(f(), reference);
                wall = wall.min(t0.elapsed());
                cpu = cpu.min(thread_cpu_time() - c0);
            }
            (wall, cpu, reference)
        };
        let (uw, uc, want) = best(&|| generate_uncached(&base, Some(&lora), &p, 64, None, None));
        let (cw, cc, got) = best(&|| greedy(&base, Some(&lora), &p, 64, None).unwrap());
        assert_eq!(got, want);
        eprintln!(
            "64 new tokens after a 32-token prompt (tiny, NF4, adapter on all projections):\n  \
             wall: uncached {uw:?}, cached {cw:?}, speed-up {:.1}x\n  \
             thread CPU: uncached {uc:?}, cached {cc:?}, speed-up {:.1}x",
            uw.as_secs_f64() / cw.as_secs_f64(),
            uc.as_secs_f64() / cc.as_secs_f64()
        );
    }

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
