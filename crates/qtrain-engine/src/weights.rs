//! The frozen base model as device buffers: norms, embedding and lm_head borrowed
//! from the candle tensors of [`qtrain_model::BaseModel`] (no copy on the GPU), and
//! each projection's NF4 codes and statistics (or its dense weight).
//!
//! The four weight groups of a layer the engine multiplies with are
//! `[q; k; v]` (one fused `[qc, h]` product), `o`, `[gate; up]` (one `[2I, h]`
//! product) and `down`. [`FrozenWeights::materialize`] writes a group's
//! full-precision weight into a reused buffer: one dequantization kernel per NF4
//! projection, at its row offset inside the group.

use crate::error::{EngineError, Result};
use qtrain_device::ops::nf4::{dequantize_view, Nf4Meta};
use qtrain_device::{DBuf, Dev, Float, View};
use qtrain_model::{BaseModel, FrozenStorage, Proj};

/// One projection's weight as the device holds it.
pub enum ProjWeight<T: Float> {
    Nf4 {
        codes: DBuf<u8>,
        stats: DBuf<f32>,
        meta: Nf4Meta,
    },
    Dense(DBuf<T>),
}

impl<T: Float> ProjWeight<T> {
    /// Writes the `[out, in]` weight into `out` (exactly `out·in` elements).
    pub fn materialize(&self, dev: &Dev, out: View<'_, T>) -> Result<()> {
        match self {
            ProjWeight::Nf4 { codes, stats, meta } => {
                dequantize_view(dev, codes.all(), stats.all(), out, *meta)?
            }
            ProjWeight::Dense(w) => dev.copy(w.all(), out)?,
        }
        Ok(())
    }
}

/// A decoder layer's frozen parameters.
pub struct LayerWeights<T: Float> {
    pub input_norm: DBuf<T>,
    pub post_norm: DBuf<T>,
    /// Indexed by [`Proj::index`].
    pub projs: Vec<ProjWeight<T>>,
    /// Indexed by [`Group::index`]: the biases of the group's projections
    /// concatenated like their outputs (`[b_q; b_k; b_v]`, zeros for a projection
    /// without one), when any projection of the group has a bias. One add per
    /// fused product.
    pub biases: [Option<DBuf<T>>; 4],
    /// Qwen 3's per-head RMSNorm weights `[head_dim]` of q and k.
    pub qk_norm: Option<(DBuf<T>, DBuf<T>)>,
}

/// The weight groups the engine multiplies with, in layer order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Qkv,
    O,
    GateUp,
    Down,
}

impl Group {
    pub const ALL: [Group; 4] = [Group::Qkv, Group::O, Group::GateUp, Group::Down];

    /// Position in [`Group::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn projs(self) -> &'static [Proj] {
        match self {
            Group::Qkv => &[Proj::Q, Proj::K, Proj::V],
            Group::O => &[Proj::O],
            Group::GateUp => &[Proj::Gate, Proj::Up],
            Group::Down => &[Proj::Down],
        }
    }
}

/// All frozen weights of the model on the engine's device.
pub struct FrozenWeights<T: Float> {
    pub embed: DBuf<T>,
    pub final_norm: DBuf<T>,
    pub lm_head: DBuf<T>,
    pub layers: Vec<LayerWeights<T>>,
}

fn borrow<T: Float + candle_core::WithDType>(
    dev: &Dev,
    t: &candle_core::Tensor,
    what: &str,
) -> Result<DBuf<T>> {
    if t.dtype() != T::DTYPE {
        return Err(EngineError::Dtype(format!(
            "{what} is {:?} but the engine computes in {}",
            t.dtype(),
            <T as qtrain_device::Elem>::NAME
        )));
    }
    Ok(dev.borrow_candle::<T>(t)?)
}

impl<T: Float + candle_core::WithDType> FrozenWeights<T> {
    /// Views `base` as device buffers (borrowed on CUDA, copied on the CPU).
    pub fn from_base(dev: &Dev, base: &BaseModel) -> Result<Self> {
        let mut layers = Vec::with_capacity(base.layers.len());
        for (l, layer) in base.layers.iter().enumerate() {
            let mut projs = Vec::with_capacity(layer.projs.len());
            for (p, fl) in layer.projs.iter().enumerate() {
                projs.push(
                    proj_weight(dev, &fl.storage, fl.out_features * fl.in_features).map_err(
                        |e| EngineError::Dtype(format!("layer {l} projection {p}: {e}")),
                    )?,
                );
            }
            let mut biases: [Option<DBuf<T>>; 4] = Default::default();
            for g in Group::ALL {
                biases[g.index()] = group_bias(dev, layer, g)
                    .map_err(|e| EngineError::Dtype(format!("layer {l} bias: {e}")))?;
            }
            let qk_norm = match (&layer.q_norm, &layer.k_norm) {
                (Some(q), Some(k)) => Some((borrow(dev, q, "q_norm")?, borrow(dev, k, "k_norm")?)),
                (None, None) => None,
                _ => {
                    return Err(EngineError::Unsupported(format!(
                        "layer {l} has only one of q_norm and k_norm"
                    )))
                }
            };
            layers.push(LayerWeights {
                biases,
                qk_norm,
                input_norm: borrow(dev, &layer.input_layernorm, "input_layernorm")?,
                post_norm: borrow(
                    dev,
                    &layer.post_attention_layernorm,
                    "post_attention_layernorm",
                )?,
                projs,
            });
        }
        Ok(Self {
            embed: borrow(dev, &base.embed_tokens, "embed_tokens")?,
            final_norm: borrow(dev, &base.norm, "norm")?,
            lm_head: borrow(dev, &base.lm_head, "lm_head")?,
            layers,
        })
    }
}

impl<T: Float> FrozenWeights<T> {
    /// Writes the weights of `group` of `layer`, stacked by rows, into `out`
    /// (`[Σ out_features, in]`).
    pub fn materialize(
        &self,
        dev: &Dev,
        layer: usize,
        group: Group,
        sizes: &[usize],
        out: View<'_, T>,
    ) -> Result<()> {
        let mut off = 0;
        for (&p, &numel) in group.projs().iter().zip(sizes) {
            self.layers[layer].projs[p.index()].materialize(dev, out.sub(off, numel))?;
            off += numel;
        }
        Ok(())
    }
}

/// The concatenated bias of group `g` of `layer` (see [`LayerWeights::biases`]).
fn group_bias<T: Float + candle_core::WithDType>(
    dev: &Dev,
    layer: &qtrain_model::BaseLayer,
    g: Group,
) -> Result<Option<DBuf<T>>> {
    let projs = g.projs().iter().map(|&p| layer.proj(p));
    if projs.clone().all(|fl| fl.bias.is_none()) {
        return Ok(None);
    }
    let total = projs.clone().map(|fl| fl.out_features).sum();
    let out = dev.zeros::<T>(total, "engine projection biases")?;
    let mut off = 0;
    for fl in projs {
        if let Some(b) = &fl.bias {
            if b.elem_count() != fl.out_features {
                return Err(EngineError::Dtype(format!(
                    "a bias of {} elements for {} outputs",
                    b.elem_count(),
                    fl.out_features
                )));
            }
            let src = borrow::<T>(dev, b, "bias")?;
            dev.copy(src.all(), out.view(off, fl.out_features))?;
        }
        off += fl.out_features;
    }
    Ok(Some(out))
}

fn proj_weight<T: Float + candle_core::WithDType>(
    dev: &Dev,
    s: &FrozenStorage,
    numel: usize,
) -> Result<ProjWeight<T>> {
    Ok(match s {
        FrozenStorage::Dense(t) => ProjWeight::Dense(borrow(dev, t, "dense projection")?),
        FrozenStorage::Nf4Device(q) => {
            let d = &q.1;
            ProjWeight::Nf4 {
                codes: dev.borrow_candle::<u8>(&d.codes)?,
                stats: dev.borrow_candle::<f32>(&d.stats)?,
                meta: d.meta(),
            }
        }
        FrozenStorage::Nf4(q) => {
            // A host-resident NF4 weight (the CPU model): lay it out like the GPU
            // copy and hand it to the reference dequantizer.
            let d = qtrain_device::Nf4Device::from_host(q, &candle_core::Device::Cpu)?;
            debug_assert_eq!(d.numel(), numel);
            ProjWeight::Nf4 {
                codes: dev.borrow_candle::<u8>(&d.codes)?,
                stats: dev.borrow_candle::<f32>(&d.stats)?,
                meta: d.meta(),
            }
        }
    })
}
