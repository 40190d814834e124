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
use qtrain_device::nf4::{dequantize_view, Nf4Meta};
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
            layers.push(LayerWeights {
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
