//! Incremental decoding with a KV cache, for generation: the prompt goes through
//! the model once, then each new token costs one position instead of the whole
//! sequence.
//!
//! [`KvCache`] holds, for one sequence, every layer's keys (after RoPE) and values
//! `[1, kv_heads, len, head_dim]` in the model's compute dtype, plus the absolute
//! position of each entry. [`Decoder::forward`] takes the next chunk of tokens (the
//! whole prompt first, then one token at a time, or any chunking in between) at
//! the positions following the cached ones, appends its keys and values, and
//! returns the logits of the chunk's last position.
//!
//! The layer math is the training forward's, op for op: [`rmsnorm`], the frozen
//! projections with the LoRA branch of [`linear::forward`] (no dropout, as in
//! [`crate::forward_logits`]), [`rope::tables`] at the chunk's absolute positions,
//! grouped-query [`attention::forward`] with a rectangular mask (the chunk's
//! queries against cached + new keys, visibility from [`attention::visible`] on
//! absolute positions) and [`swiglu`]. So base + adapter decode exactly as they
//! were trained; `tests/decode.rs` checks the logits of every step against
//! [`crate::forward_logits`] on the full sequence.
//!
//! Frozen weights: like the training forward, each projection is dequantized right
//! before it is used and dropped right after, so decoding a 7B model needs no more
//! memory than its NF4 storage. When all dequantized projections fit in
//! [`DEFAULT_KEEP_WEIGHTS_BYTES`] (small models: the tiny CPU demo), the decoder
//! dequantizes them once and keeps them instead, because re-dequantizing every
//! weight for every token then dominates the cost of a step. Both give the same
//! values bit for bit ([`Decoder::with_weight_budget`] picks the budget).
//!
//! Sliding window (Mistral v0.1): a query at position `p` sees keys at `j` with
//! `p - window < j <= p`. After each chunk the cache keeps only the entries the
//! next query can still see (the last `window - 1` positions), so memory and
//! per-token work stay bounded by the window however long the generation runs.

use crate::error::{ReferenceError, Result};
use crate::ops::{self, attention, linear, rmsnorm, rope, swiglu};
use candle_core::{IndexOp, Tensor};
use qtrain_model::{BaseModel, ModelConfig, Proj, PROJECTIONS};
use qtrain_step::{LoraWeights, StepError};

/// Dequantized projections up to this many bytes in total are kept for the whole
/// decode (1 GiB: models up to ~0.5B parameters in bf16, never a 7B).
pub const DEFAULT_KEEP_WEIGHTS_BYTES: usize = 1 << 30;

/// Keys (after RoPE) and values of every layer for one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer `(k, v)`, each `[1, kv_heads, len, head_dim]`; `None` while empty.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Absolute position of each cached entry (ascending, shared by all layers).
    positions: Vec<u32>,
    /// Position the next token will get (= tokens seen so far).
    next_position: usize,
    window: Option<usize>,
}

impl KvCache {
    /// An empty cache for a model with `config`'s layers and sliding window.
    pub fn new(config: &ModelConfig) -> Self {
        Self {
            layers: vec![None; config.num_hidden_layers],
            positions: Vec::new(),
            next_position: 0,
            window: config.sliding_window,
        }
    }

    /// The absolute position the next token gets (the number of tokens seen).
    pub fn next_position(&self) -> usize {
        self.next_position
    }

    /// Entries held (at most `window - 1` with a sliding window).
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Absolute positions of the held entries, oldest first.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Layer `l`'s cached `(k, v)`, `[1, kv_heads, len, head_dim]`.
    pub fn layer(&self, l: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(l).and_then(Option::as_ref)
    }

    /// Forgets the sequence (the next chunk starts at position 0).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.positions.clear();
        self.next_position = 0;
    }

    /// Keys and values of layer `l` visible to the chunk: cached ++ new. Stores the
    /// concatenation (the cache is trimmed after the whole chunk, in [`Self::trim`]).
    fn append(&mut self, l: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match self.layers[l].take() {
            Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
            None => (k, v),
        };
        self.layers[l] = Some(kv.clone());
        Ok(kv)
    }

    /// Drops the entries no later query can see: the next query sits at
    /// `next_position` and sees keys `j > next_position - window`.
    fn trim(&mut self) -> Result<()> {
        let Some(w) = self.window else {
            return Ok(());
        };
        let oldest_visible = (self.next_position + 1).saturating_sub(w);
        let drop = self
            .positions
            .iter()
            .take_while(|&&p| (p as usize) < oldest_visible)
            .count();
        if drop == 0 {
            return Ok(());
        }
        self.positions.drain(..drop);
        let keep = self.positions.len();
        for slot in &mut self.layers {
            *slot = match slot.take() {
                Some((k, v)) if keep > 0 => {
                    let len = k.dim(2)?;
                    Some((
                        k.narrow(2, len - keep, keep)?,
                        v.narrow(2, len - keep, keep)?,
                    ))
                }
                _ => None,
            };
        }
        Ok(())
    }
}

/// Decodes one sequence with base + optional adapter, keeping a [`KvCache`].
pub struct Decoder<'a> {
    base: &'a BaseModel,
    lora: Option<&'a LoraWeights>,
    cache: KvCache,
    /// Every projection's dequantized weight, indexed `layer * 7 + proj`, when they
    /// fit the budget; empty otherwise (dequantized per use).
    kept: Vec<Tensor>,
    /// Reused host buffer for NF4 dequantization.
    scratch: Vec<f32>,
}

impl<'a> Decoder<'a> {
    /// A decoder at position 0. `lora` must have been made for `base`'s layers.
    /// Keeps the dequantized weights when they fit [`DEFAULT_KEEP_WEIGHTS_BYTES`].
    pub fn new(base: &'a BaseModel, lora: Option<&'a LoraWeights>) -> Result<Self> {
        Self::with_weight_budget(base, lora, DEFAULT_KEEP_WEIGHTS_BYTES)
    }

    /// Like [`Decoder::new`], keeping the dequantized projections only when they
    /// take at most `keep_weights_bytes` in the compute dtype (0: never).
    pub fn with_weight_budget(
        base: &'a BaseModel,
        lora: Option<&'a LoraWeights>,
        keep_weights_bytes: usize,
    ) -> Result<Self> {
        if let Some(l) = lora {
            if l.num_layers() != base.layers.len() {
                return Err(ReferenceError::LayerCount {
                    found: l.num_layers(),
                    expected: base.layers.len(),
                });
            }
        }
        let mut dec = Self {
            base,
            lora,
            cache: KvCache::new(&base.config),
            kept: Vec::new(),
            scratch: Vec::new(),
        };
        let bytes: usize = base
            .layers
            .iter()
            .flat_map(|l| &l.projs)
            .map(|p| p.out_features * p.in_features * base.dtype.size_in_bytes())
            .sum();
        if bytes <= keep_weights_bytes {
            for l in 0..base.layers.len() {
                for p in PROJECTIONS {
                    let w = dec.dequantize(l, p)?;
                    dec.kept.push(w);
                }
            }
        }
        Ok(dec)
    }

    /// Whether the dequantized weights are kept between steps.
    pub fn keeps_weights(&self) -> bool {
        !self.kept.is_empty()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// The absolute position the next token gets.
    pub fn position(&self) -> usize {
        self.cache.next_position()
    }

    /// Forgets the sequence, keeping the model and adapter.
    pub fn reset(&mut self) {
        self.cache.clear();
    }

    /// Runs `tokens` at positions `position() .. position() + tokens.len()`, appends
    /// their keys and values to the cache and returns the logits `[vocab]` of the
    /// last token in the accumulation dtype (f32, or f64 for an f64 model), i.e.
    /// the distribution of the token at `position()` after the call.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let cfg = &self.base.config;
        let n = tokens.len();
        if n == 0 {
            return Err(ReferenceError::Decode(
                "empty token chunk (pass the prompt first, then one token per step)".into(),
            ));
        }
        if let Some((index, &id)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= cfg.vocab_size)
        {
            return Err(StepError::TokenOutOfRange {
                index,
                id,
                vocab: cfg.vocab_size,
            }
            .into());
        }
        let start = self.cache.next_position;
        let end = start + n;
        if end > u32::MAX as usize {
            return Err(ReferenceError::Decode(format!(
                "position {end} does not fit the u32 position ids"
            )));
        }
        let positions: Vec<u32> = (start as u32..end as u32).collect();
        let (dtype, device) = (self.base.dtype, &self.base.device);
        let (cos, sin) = rope::tables(
            &positions,
            1,
            n,
            cfg.head_dim(),
            cfg.rope_theta,
            dtype,
            device,
        )?;
        // Rows: the chunk's queries; columns: cached entries, then the chunk.
        let key_positions: Vec<u32> = self
            .cache
            .positions
            .iter()
            .chain(&positions)
            .copied()
            .collect();
        let mask = decode_mask(
            &positions,
            &key_positions,
            cfg.sliding_window,
            ops::acc_dtype(dtype),
            device,
        )?;

        let ids = Tensor::from_slice(tokens, n, device)?;
        let mut x = self.base.embed_tokens.index_select(&ids, 0)?;
        for l in 0..self.base.layers.len() {
            x = self.layer(l, &x, &cos, &sin, &mask)?;
        }
        self.cache.positions.extend_from_slice(&positions);
        self.cache.next_position = end;
        self.cache.trim()?;

        let last = x.i(n - 1..n)?;
        let (hn, _) = rmsnorm::forward(&last, &self.base.norm, cfg.rms_norm_eps)?;
        let logits = hn
            .matmul(&self.base.lm_head.t()?)?
            .to_dtype(ops::acc_dtype(dtype))?
            .squeeze(0)?;
        Ok(logits)
    }

    /// `x W^T + s (x A^T) B^T` for `(layer, proj)`, the training projection without
    /// dropout.
    fn proj(&mut self, l: usize, proj: Proj, x: &Tensor) -> Result<Tensor> {
        let w = match self.kept.get(l * PROJECTIONS.len() + proj.index()) {
            Some(w) => w.clone(),
            None => self.dequantize(l, proj)?,
        };
        let branch = self
            .lora
            .and_then(|lora| lora.get(l, proj).map(|pair| (lora.scale(), pair)))
            .map(|(scale, pair)| linear::LoraBranch {
                a: &pair.a,
                b: &pair.b,
                scale,
                dropout_mask: None,
            });
        Ok(linear::forward(x, &w, branch.as_ref())?.0)
    }

    /// The full-precision weight of `(layer, proj)` in the compute dtype, as the
    /// training forward obtains it.
    fn dequantize(&mut self, l: usize, proj: Proj) -> Result<Tensor> {
        Ok(self.base.layers[l].proj(proj).weight(
            self.base.dtype,
            &self.base.device,
            &mut self.scratch,
        )?)
    }

    /// One decoder layer on the chunk `x: [n, h]`, reading and extending layer
    /// `l`'s cache.
    fn layer(
        &mut self,
        l: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let base = self.base;
        let cfg = &base.config;
        let layer = &base.layers[l];
        let eps = cfg.rms_norm_eps;
        let (nh, nkv, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let n = x.dim(0)?;
        // `[n, heads * d] -> [1, heads, n, d]`, as the training forward's split_heads.
        let split = |t: Tensor, heads: usize| -> Result<Tensor> {
            Ok(t.reshape((1, n, heads, d))?.transpose(1, 2)?.contiguous()?)
        };

        let (h1, _) = rmsnorm::forward(x, &layer.input_layernorm, eps)?;
        let q = self.proj(l, Proj::Q, &h1)?;
        let k = self.proj(l, Proj::K, &h1)?;
        let v = self.proj(l, Proj::V, &h1)?;
        let q = rope::forward(&split(q, nh)?, cos, sin)?;
        let k = rope::forward(&split(k, nkv)?, cos, sin)?;
        let v = split(v, nkv)?;
        let (k_all, v_all) = self.cache.append(l, k, v)?;
        let scale = 1.0 / (d as f64).sqrt();
        let (attn, _) = attention::forward(&q, &k_all, &v_all, mask, scale)?;
        let o_flat = attn.transpose(1, 2)?.reshape((n, nh * d))?;
        let x2 = (x + self.proj(l, Proj::O, &o_flat)?)?;

        let (h2, _) = rmsnorm::forward(&x2, &layer.post_attention_layernorm, eps)?;
        let g = self.proj(l, Proj::Gate, &h2)?;
        let u = self.proj(l, Proj::Up, &h2)?;
        let m = swiglu::forward(&g, &u)?;
        Ok((&x2 + self.proj(l, Proj::Down, &m)?)?)
    }
}

/// Decodes `tokens` (the first `prompt_len` as one chunk, then one token per step)
/// and returns the largest `max |cached - full| / max |full|` over the steps, where
/// `full` is [`crate::forward_logits`] on the whole sequence at the same position.
/// A self-check for devices the CPU tests do not reach (e.g. from `qtrain doctor`
/// on a GPU): ~1e-6 in f32; in bf16 the two paths round differently (their
/// matmuls have other shapes), so expect bf16-sized differences there.
pub fn max_rel_error_vs_full_forward(
    base: &BaseModel,
    lora: Option<&LoraWeights>,
    tokens: &[u32],
    prompt_len: usize,
) -> Result<f64> {
    if prompt_len == 0 || prompt_len > tokens.len() {
        return Err(ReferenceError::Decode(format!(
            "self-check: prompt_len {prompt_len} must be in 1..={}",
            tokens.len()
        )));
    }
    let batch = qtrain_step::TokenBatch::from_rows(&[tokens.to_vec()])?;
    let full = crate::forward_logits(base, lora, &batch)?.squeeze(0)?;
    let mut dec = Decoder::new(base, lora)?;
    let mut worst = 0f64;
    let mut end = prompt_len;
    let mut got = dec.forward(&tokens[..prompt_len])?;
    loop {
        let want = full.i(end - 1)?;
        let scale = want.abs()?.max(0)?.to_dtype(candle_core::DType::F64)?;
        let diff = (&got - &want)?
            .abs()?
            .max(0)?
            .to_dtype(candle_core::DType::F64)?;
        worst = worst.max(diff.to_scalar::<f64>()? / scale.to_scalar::<f64>()?);
        if end == tokens.len() {
            return Ok(worst);
        }
        got = dec.forward(&tokens[end..end + 1])?;
        end += 1;
    }
}

/// Additive mask `[1, 1, queries, keys]`: 0 where [`attention::visible`] on the
/// absolute positions, -inf elsewhere. Every query sees its own key (the last
/// columns hold the chunk), so no row is empty.
fn decode_mask(
    queries: &[u32],
    keys: &[u32],
    window: Option<usize>,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut m = Vec::with_capacity(queries.len() * keys.len());
    for &i in queries {
        m.extend(keys.iter().map(|&j| {
            if attention::visible(i as usize, j as usize, window, 0, 0) {
                0f32
            } else {
                f32::NEG_INFINITY
            }
        }));
    }
    Ok(Tensor::from_vec(m, (1, 1, queries.len(), keys.len()), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn mask_follows_absolute_positions_and_window() {
        // Cached entries at 5, 6 and a chunk at 7, 8 with a window of 3.
        let m = decode_mask(&[7, 8], &[5, 6, 7, 8], Some(3), DType::F32, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(v, vec![vec![0.0, 0.0, 0.0, inf], vec![inf, 0.0, 0.0, 0.0]]);
        let m = decode_mask(&[7, 8], &[5, 6, 7, 8], None, DType::F32, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(v, vec![vec![0.0, 0.0, 0.0, inf], vec![0.0; 4]]);
    }
}
