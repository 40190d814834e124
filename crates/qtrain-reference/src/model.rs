//! The decoder with adapters: explicit forward and backward of every layer, the
//! training step (`forward_backward`) with optional gradient checkpointing, and
//! the evaluation forwards (generation decodes incrementally in [`crate::decode`]).
//!
//! The frozen base gets no gradient; each projection's full-precision weight is
//! obtained from [`qtrain_model::FrozenLinear::weight`] right before it is used and
//! dropped right after (dequantized again in the backward), so at most one
//! dequantized matrix is alive at a time.
//!
//! Labels follow Hugging Face and the shift happens here (the rule is written
//! down on [`TokenBatch`]): position `t` is trained to predict `labels[t + 1]` of
//! the same row and document.

use crate::error::{ReferenceError, Result};
use crate::ops::{self, attention, cross_entropy, linear, rmsnorm, rope, swiglu};
use candle_core::{DType, Tensor};
use qtrain_model::{BaseModel, Proj};
use qtrain_step::{
    dropout_mask, DropoutKey, LoraGrads, LoraWeights, StepLoss, StepOptions, TokenBatch,
};
use std::cell::RefCell;

/// Shared state of one pass over a batch.
struct Ctx<'a> {
    base: &'a BaseModel,
    lora: Option<&'a LoraWeights>,
    /// `Some((seed, micro_step))` when LoRA dropout is active.
    dropout: Option<(u64, u64)>,
    batch: usize,
    seq: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    /// Reused host buffer for NF4 dequantization.
    scratch: RefCell<Vec<f32>>,
}

/// What one layer's backward needs from its forward.
struct LayerActs {
    x: Tensor,
    inv_rms1: Tensor,
    h1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_out: Tensor,
    attn_stats: attention::AttnStats,
    o_flat: Tensor,
    x2: Tensor,
    inv_rms2: Tensor,
    h2: Tensor,
    g: Tensor,
    u: Tensor,
    m: Tensor,
    /// `dropout(x) A^T` of each adapted projection, indexed by `Proj::index`.
    z: [Option<Tensor>; 7],
}

impl<'a> Ctx<'a> {
    fn new(
        base: &'a BaseModel,
        lora: Option<&'a LoraWeights>,
        batch: &TokenBatch,
        dropout: Option<(u64, u64)>,
    ) -> Result<Self> {
        let cfg = &base.config;
        batch.validate(cfg.vocab_size)?;
        if let Some(l) = lora {
            if l.num_layers() != base.layers.len() {
                return Err(ReferenceError::LayerCount {
                    found: l.num_layers(),
                    expected: base.layers.len(),
                });
            }
        }
        let dropout = dropout.filter(|_| lora.is_some_and(|l| l.config().dropout > 0.0));
        let (b, t) = (batch.batch_size, batch.seq_len);
        let (cos, sin) = rope::tables(
            &batch.position_ids,
            b,
            t,
            cfg.head_dim(),
            cfg.rope_theta,
            base.dtype,
            &base.device,
        )?;
        let mask = attention::build_mask(
            &batch.segment_ids,
            b,
            t,
            cfg.sliding_window,
            ops::acc_dtype(base.dtype),
            &base.device,
        )?;
        Ok(Self {
            base,
            lora,
            dropout,
            batch: b,
            seq: t,
            cos,
            sin,
            mask,
            scratch: RefCell::new(Vec::new()),
        })
    }

    fn weight(&self, layer: usize, proj: Proj) -> Result<Tensor> {
        let w = self.base.layers[layer].proj(proj).weight(
            self.base.dtype,
            &self.base.device,
            &mut self.scratch.borrow_mut(),
        )?;
        Ok(w)
    }

    /// The LoRA branch of `(layer, proj)` for `rows` input rows, with its dropout
    /// mask regenerated from the key (identical in forward and recomputation).
    fn branch(
        &self,
        layer: usize,
        proj: Proj,
        rows: usize,
    ) -> Result<Option<linear::LoraBranch<'a>>> {
        let Some(lora) = self.lora else {
            return Ok(None);
        };
        let Some(pair) = lora.get(layer, proj) else {
            return Ok(None);
        };
        let dropout_mask = match self.dropout {
            Some((seed, micro_step)) => dropout_mask(
                lora.config().dropout,
                DropoutKey {
                    seed,
                    micro_step,
                    layer,
                    proj,
                },
                rows,
                pair.a.dim(1)?,
                lora.dtype(),
                lora.device(),
            )?,
            None => None,
        };
        Ok(Some(linear::LoraBranch {
            a: &pair.a,
            b: &pair.b,
            scale: lora.scale(),
            dropout_mask,
        }))
    }

    fn proj_forward(
        &self,
        layer: usize,
        proj: Proj,
        x: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let w = self.weight(layer, proj)?;
        let branch = self.branch(layer, proj, x.dim(0)?)?;
        Ok(linear::forward(x, &w, branch.as_ref())?)
    }

    /// Backward of one projection: accumulates its LoRA gradients into `grads` and
    /// returns `dx` when `need_dx`.
    fn proj_backward(
        &self,
        (layer, proj): (usize, Proj),
        x: &Tensor,
        z: Option<&Tensor>,
        dy: &Tensor,
        need_dx: bool,
        grads: &mut LoraGrads,
    ) -> Result<Option<Tensor>> {
        let branch = self.branch(layer, proj, x.dim(0)?)?;
        if !need_dx && branch.is_none() {
            return Ok(None);
        }
        let w = if need_dx {
            Some(self.weight(layer, proj)?)
        } else {
            None
        };
        let g = linear::backward(x, w.as_ref(), branch.as_ref(), z, dy)?;
        if let Some((da, db)) = &g.lora {
            grads.accumulate(layer, proj, da, db)?;
        }
        Ok(g.dx)
    }

    /// `[n, heads * d] -> [b, heads, t, d]`
    fn split_heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let d = self.base.config.head_dim();
        Ok(x.reshape((self.batch, self.seq, heads, d))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// `[b, heads, t, d] -> [n, heads * d]`
    fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, t, d) = x.dims4()?;
        Ok(x.transpose(1, 2)?.reshape((b * t, h * d))?)
    }

    fn attn_scale(&self) -> f64 {
        1.0 / (self.base.config.head_dim() as f64).sqrt()
    }

    /// One decoder layer on `x: [n, h]`; with `save`, also what the backward needs.
    fn layer_forward(
        &self,
        l: usize,
        x: &Tensor,
        save: bool,
    ) -> Result<(Tensor, Option<LayerActs>)> {
        let cfg = &self.base.config;
        let layer = &self.base.layers[l];
        let eps = cfg.rms_norm_eps;
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let mut z: [Option<Tensor>; 7] = Default::default();

        let (h1, inv_rms1) = rmsnorm::forward(x, &layer.input_layernorm, eps)?;
        let (q, zq) = self.proj_forward(l, Proj::Q, &h1)?;
        let (k, zk) = self.proj_forward(l, Proj::K, &h1)?;
        let (v, zv) = self.proj_forward(l, Proj::V, &h1)?;
        z[Proj::Q.index()] = zq;
        z[Proj::K.index()] = zk;
        z[Proj::V.index()] = zv;
        let q = rope::forward(&self.split_heads(&q, nh)?, &self.cos, &self.sin)?;
        let k = rope::forward(&self.split_heads(&k, nkv)?, &self.cos, &self.sin)?;
        let v = self.split_heads(&v, nkv)?;
        let (attn_out, attn_stats) = attention::forward(&q, &k, &v, &self.mask, self.attn_scale())?;
        let o_flat = self.merge_heads(&attn_out)?;
        let (a, zo) = self.proj_forward(l, Proj::O, &o_flat)?;
        z[Proj::O.index()] = zo;
        let x2 = (x + a)?;

        let (h2, inv_rms2) = rmsnorm::forward(&x2, &layer.post_attention_layernorm, eps)?;
        let (g, zg) = self.proj_forward(l, Proj::Gate, &h2)?;
        let (u, zu) = self.proj_forward(l, Proj::Up, &h2)?;
        z[Proj::Gate.index()] = zg;
        z[Proj::Up.index()] = zu;
        let m = swiglu::forward(&g, &u)?;
        let (dn, zd) = self.proj_forward(l, Proj::Down, &m)?;
        z[Proj::Down.index()] = zd;
        let out = (&x2 + dn)?;

        let acts = save.then(|| LayerActs {
            x: x.clone(),
            inv_rms1,
            h1,
            q,
            k,
            v,
            attn_out,
            attn_stats,
            o_flat,
            x2,
            inv_rms2,
            h2,
            g,
            u,
            m,
            z,
        });
        Ok((out, acts))
    }

    /// Backward of one layer given `dout = ∂L/∂out`; returns `∂L/∂x` when `need_dx`
    /// (every layer but the first: the embedding is frozen).
    fn layer_backward(
        &self,
        l: usize,
        a: &LayerActs,
        dout: &Tensor,
        need_dx: bool,
        grads: &mut LoraGrads,
    ) -> Result<Option<Tensor>> {
        let layer = &self.base.layers[l];
        let z = |p: Proj| a.z[p.index()].as_ref();

        // MLP branch: out = x2 + down(swiglu(gate(h2), up(h2))), h2 = norm(x2).
        let dm = self
            .proj_backward((l, Proj::Down), &a.m, z(Proj::Down), dout, true, grads)?
            .expect("dx requested");
        let (dg, du) = swiglu::backward(&a.g, &a.u, &dm)?;
        let dh2_g = self.proj_backward((l, Proj::Gate), &a.h2, z(Proj::Gate), &dg, true, grads)?;
        let dh2_u = self.proj_backward((l, Proj::Up), &a.h2, z(Proj::Up), &du, true, grads)?;
        let dh2 = (dh2_g.expect("dx requested") + dh2_u.expect("dx requested"))?;
        // The residual passes dout straight through to x2.
        let dx2 =
            (dout + rmsnorm::backward(&a.x2, &a.inv_rms2, &layer.post_attention_layernorm, &dh2)?)?;

        // Attention branch: x2 = x + o_proj(attn(rope(q), rope(k), v)).
        let do_flat = self
            .proj_backward((l, Proj::O), &a.o_flat, z(Proj::O), &dx2, true, grads)?
            .expect("dx requested");
        let cfg = &self.base.config;
        let d_o = self.split_heads(&do_flat, cfg.num_attention_heads)?;
        let (dq, dk, dv) = attention::backward(
            &a.q,
            &a.k,
            &a.v,
            &a.attn_out,
            &a.attn_stats,
            &d_o,
            &self.mask,
            self.attn_scale(),
        )?;
        let dq = self.merge_heads(&rope::backward(&dq, &self.cos, &self.sin)?)?;
        let dk = self.merge_heads(&rope::backward(&dk, &self.cos, &self.sin)?)?;
        let dv = self.merge_heads(&dv)?;
        let mut dh1: Option<Tensor> = None;
        for (p, dy) in [(Proj::Q, &dq), (Proj::K, &dk), (Proj::V, &dv)] {
            if let Some(d) = self.proj_backward((l, p), &a.h1, z(p), dy, need_dx, grads)? {
                dh1 = Some(match dh1 {
                    Some(acc) => (acc + d)?,
                    None => d,
                });
            }
        }
        match dh1 {
            Some(dh1) if need_dx => {
                let dnorm = rmsnorm::backward(&a.x, &a.inv_rms1, &layer.input_layernorm, &dh1)?;
                Ok(Some((dx2 + dnorm)?))
            }
            _ => Ok(None),
        }
    }

    fn embed(&self, batch: &TokenBatch) -> Result<Tensor> {
        let ids = Tensor::from_slice(&batch.input_ids, batch.num_tokens(), &self.base.device)?;
        Ok(self.base.embed_tokens.index_select(&ids, 0)?)
    }

    /// All layers without saving anything; returns the final hidden state `[n, h]`.
    fn run_layers(&self, batch: &TokenBatch) -> Result<Tensor> {
        let mut x = self.embed(batch)?;
        for l in 0..self.base.layers.len() {
            x = self.layer_forward(l, &x, false)?.0;
        }
        Ok(x)
    }

    fn final_norm(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(rmsnorm::forward(
            x,
            &self.base.norm,
            self.base.config.rms_norm_eps,
        )?)
    }
}

/// One micro-batch of a training step: forward, loss and backward, adding the LoRA
/// gradients of `loss_sum / loss_denominator` into `grads`.
///
/// `loss_denominator` is the number of valid targets of the whole optimizer step
/// (the sum of [`TokenBatch::valid_targets`] over its micro-batches), so that
/// accumulating micro-batches gives the gradient of the step's mean loss, exactly
/// as one big batch would. Dropout (if the config has any) is keyed by
/// `opts.dropout_seed` and `opts.micro_step`.
pub fn forward_backward(
    base: &BaseModel,
    lora: &LoraWeights,
    batch: &TokenBatch,
    opts: &StepOptions,
    loss_denominator: f64,
    grads: &mut LoraGrads,
) -> Result<StepLoss> {
    if !(loss_denominator > 0.0 && loss_denominator.is_finite()) {
        return Err(ReferenceError::LossDenominator(loss_denominator));
    }
    let ctx = Ctx::new(
        base,
        Some(lora),
        batch,
        Some((opts.dropout_seed, opts.micro_step)),
    )?;
    let num_layers = base.layers.len();

    // Forward: with checkpointing keep each layer's input, otherwise its activations.
    let mut inputs: Vec<Tensor> = Vec::new();
    let mut saved: Vec<LayerActs> = Vec::new();
    let mut x = ctx.embed(batch)?;
    for l in 0..num_layers {
        if opts.checkpointing {
            inputs.push(x.clone());
            x = ctx.layer_forward(l, &x, false)?.0;
        } else {
            let (out, acts) = ctx.layer_forward(l, &x, true)?;
            saved.push(acts.expect("saved"));
            x = out;
        }
    }

    // Final norm and the chunked loss give ∂L/∂(final hidden).
    let (hn, inv_rms) = ctx.final_norm(&x)?;
    let targets = batch.shifted_targets();
    let (ce, dhn) = cross_entropy::forward_backward(
        &hn,
        &base.lm_head,
        &targets,
        1.0 / loss_denominator,
        cross_entropy::DEFAULT_CHUNK_ROWS,
    )?;
    let loss = StepLoss {
        loss_sum: ce.loss_sum,
        valid_tokens: ce.valid,
    };
    if ce.valid == 0 {
        // Everything masked: the gradient is zero, skip the backward.
        return Ok(loss);
    }
    let mut dx = rmsnorm::backward(&x, &inv_rms, &base.norm, &dhn)?;
    drop((x, hn));

    // Backward, last layer first; checkpointing recomputes one layer at a time.
    for l in (0..num_layers).rev() {
        let acts = if opts.checkpointing {
            let input = inputs.pop().expect("one input per layer");
            ctx.layer_forward(l, &input, true)?.1.expect("saved")
        } else {
            saved.pop().expect("one set of activations per layer")
        };
        match ctx.layer_backward(l, &acts, &dx, l > 0, grads)? {
            Some(d) => dx = d,
            None => break,
        }
    }
    Ok(loss)
}

/// The summed loss without gradients or dropout (evaluation). `lora = None` runs
/// the base model alone.
pub fn forward_loss(
    base: &BaseModel,
    lora: Option<&LoraWeights>,
    batch: &TokenBatch,
) -> Result<StepLoss> {
    loss_with(base, lora, batch, None)
}

/// The exact function [`forward_backward`] differentiates: the summed loss with
/// the dropout masks of `opts` (no gradients). Used to check gradients numerically.
pub fn forward_loss_train(
    base: &BaseModel,
    lora: &LoraWeights,
    batch: &TokenBatch,
    opts: &StepOptions,
) -> Result<StepLoss> {
    loss_with(
        base,
        Some(lora),
        batch,
        Some((opts.dropout_seed, opts.micro_step)),
    )
}

fn loss_with(
    base: &BaseModel,
    lora: Option<&LoraWeights>,
    batch: &TokenBatch,
    dropout: Option<(u64, u64)>,
) -> Result<StepLoss> {
    let ctx = Ctx::new(base, lora, batch, dropout)?;
    let (hn, _) = ctx.final_norm(&ctx.run_layers(batch)?)?;
    let ce = cross_entropy::forward(
        &hn,
        &base.lm_head,
        &batch.shifted_targets(),
        cross_entropy::DEFAULT_CHUNK_ROWS,
    )?;
    Ok(StepLoss {
        loss_sum: ce.loss_sum,
        valid_tokens: ce.valid,
    })
}

/// Logits `[batch, seq, vocab]` in the accumulation dtype (f32, or f64 for an f64
/// model), without dropout. Materializes all logits: for tests, and the
/// full-sequence oracle of the KV-cache decoder ([`crate::Decoder`]).
pub fn forward_logits(
    base: &BaseModel,
    lora: Option<&LoraWeights>,
    batch: &TokenBatch,
) -> Result<Tensor> {
    let ctx = Ctx::new(base, lora, batch, None)?;
    let (hn, _) = ctx.final_norm(&ctx.run_layers(batch)?)?;
    let logits = hn
        .matmul(&base.lm_head.t()?)?
        .to_dtype(ops::acc_dtype(base.dtype))?
        .reshape((batch.batch_size, batch.seq_len, base.config.vocab_size))?;
    Ok(logits)
}

/// The compute dtype's accumulation dtype, re-exported for callers sizing buffers.
pub fn logits_dtype(base: &BaseModel) -> DType {
    ops::acc_dtype(base.dtype)
}
