//! The adapters as the engine trains them: every LoRA matrix of the model in one
//! flat f32 buffer (the master weights the optimizer updates), its gradient in a
//! second buffer of the same layout, and a copy in the compute type for the
//! products, refreshed before each pass.
//!
//! The layout is that of [`qtrain_step::LoraWeights::to_host`]: pairs by layer, then
//! projection in `PROJECTIONS` order, `A: [r, in]` before `B: [out, r]`, each
//! row-major. One flat buffer makes the optimizer one kernel over all parameters
//! and a data-parallel all-reduce one call.

use crate::error::{EngineError, Result};
use qtrain_device::rows::cast;
use qtrain_device::{DBuf, Dev, Float, Mat};
use qtrain_model::{ModelConfig, Proj, PROJECTIONS};
use qtrain_step::{HostTensor, LoraWeights};

/// Where one adapted projection's matrices live in the flat buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairSlot {
    pub layer: usize,
    pub proj: Proj,
    pub a_off: usize,
    pub b_off: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// The layout of all adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraLayout {
    pub rank: usize,
    pub scale: f32,
    pub dropout: f64,
    pub slots: Vec<PairSlot>,
    /// `(layer, proj) -> index into slots`.
    index: Vec<Option<usize>>,
    pub numel: usize,
    /// `(name, offset, numel, shape)` of every tensor in order (A, B, A, B, ...).
    pub tensors: Vec<(String, usize, usize, Vec<usize>)>,
}

impl LoraLayout {
    pub fn new(weights: &LoraWeights, cfg: &ModelConfig) -> Result<Self> {
        let lc = weights.config();
        let r = lc.rank;
        let mut slots = Vec::new();
        let mut tensors = Vec::new();
        let mut index = vec![None; cfg.num_hidden_layers * PROJECTIONS.len()];
        let mut off = 0;
        for pair in weights.pairs() {
            let [out, inp] = cfg.proj_shape(pair.proj);
            index[pair.layer * PROJECTIONS.len() + pair.proj.index()] = Some(slots.len());
            slots.push(PairSlot {
                layer: pair.layer,
                proj: pair.proj,
                a_off: off,
                b_off: off + r * inp,
                in_features: inp,
                out_features: out,
            });
            use qtrain_step::{tensor_name, LoraPart};
            tensors.push((
                tensor_name(pair.layer, pair.proj, LoraPart::A),
                off,
                r * inp,
                vec![r, inp],
            ));
            tensors.push((
                tensor_name(pair.layer, pair.proj, LoraPart::B),
                off + r * inp,
                out * r,
                vec![out, r],
            ));
            off += r * inp + out * r;
        }
        Ok(Self {
            rank: r,
            scale: weights.scale() as f32,
            dropout: lc.dropout,
            slots,
            index,
            numel: off,
            tensors,
        })
    }

    pub fn get(&self, layer: usize, proj: Proj) -> Option<&PairSlot> {
        self.index
            .get(layer * PROJECTIONS.len() + proj.index())
            .copied()
            .flatten()
            .map(|i| &self.slots[i])
    }

    /// How many projections of one layer carry an adapter (the most over layers).
    pub fn max_per_layer(&self, layers: usize) -> usize {
        (0..layers)
            .map(|l| {
                PROJECTIONS
                    .iter()
                    .filter(|&&p| self.get(l, p).is_some())
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

/// The trainable state on the device.
pub struct DeviceLora<T: Float> {
    pub layout: LoraLayout,
    /// Master weights, f32.
    pub params: DBuf<f32>,
    /// Gradients, f32, same layout (accumulated over micro-batches until zeroed).
    pub grads: DBuf<f32>,
    /// `params` in the compute type.
    pub compute: DBuf<T>,
}

/// Device bytes of the adapters' buffers for `numel` parameters in a compute type of
/// `elem` bytes: f32 master weights, f32 gradients and the compute copy, exactly
/// what [`DeviceLora::new`] allocates.
pub fn device_lora_bytes(numel: usize, elem: usize) -> usize {
    numel * (4 + 4 + elem)
}

impl<T: Float> DeviceLora<T> {
    pub fn new(dev: &Dev, weights: &LoraWeights, cfg: &ModelConfig) -> Result<Self> {
        let layout = LoraLayout::new(weights, cfg)?;
        let host: Vec<f32> = weights
            .to_host()?
            .into_iter()
            .flat_map(|(_, v, _)| v)
            .collect();
        debug_assert_eq!(host.len(), layout.numel);
        Ok(Self {
            params: dev.upload(&host, "LoRA parameters")?,
            grads: dev.zeros(layout.numel, "LoRA gradients")?,
            compute: dev.zeros(layout.numel, "LoRA parameters (compute copy)")?,
            layout,
        })
    }

    /// Refreshes the compute-type copy from the master weights.
    pub fn refresh(&self, dev: &Dev) -> Result<()> {
        cast(dev, self.params.all(), self.compute.all(), 1.0)?;
        Ok(())
    }

    /// `A: [r, in]` of a slot in the compute copy.
    pub fn a(&self, s: &PairSlot) -> Mat<'_, T> {
        self.compute
            .view(s.a_off, self.layout.rank * s.in_features)
            .mat(self.layout.rank, s.in_features, s.in_features)
    }

    /// `B: [out, r]` of a slot in the compute copy.
    pub fn b(&self, s: &PairSlot) -> Mat<'_, T> {
        let r = self.layout.rank;
        self.compute
            .view(s.b_off, s.out_features * r)
            .mat(s.out_features, r, r)
    }

    /// `dA`, `dB` of a slot in the gradient buffer.
    pub fn grad_a(&self, s: &PairSlot) -> Mat<'_, f32> {
        let r = self.layout.rank;
        self.grads
            .view(s.a_off, r * s.in_features)
            .mat(r, s.in_features, s.in_features)
    }

    pub fn grad_b(&self, s: &PairSlot) -> Mat<'_, f32> {
        let r = self.layout.rank;
        self.grads
            .view(s.b_off, s.out_features * r)
            .mat(s.out_features, r, r)
    }

    pub fn zero_grads(&self, dev: &Dev) -> Result<()> {
        dev.fill_zero(self.grads.all())?;
        Ok(())
    }

    fn split(&self, flat: Vec<f32>) -> Vec<HostTensor> {
        self.layout
            .tensors
            .iter()
            .map(|(name, off, n, shape)| {
                (name.clone(), flat[*off..off + n].to_vec(), shape.clone())
            })
            .collect()
    }

    /// The master weights as named host tensors (the `LoraWeights::to_host` format).
    pub fn params_to_host(&self, dev: &Dev) -> Result<Vec<HostTensor>> {
        Ok(self.split(dev.download(self.params.all())?))
    }

    pub fn grads_to_host(&self, dev: &Dev) -> Result<Vec<HostTensor>> {
        Ok(self.split(dev.download(self.grads.all())?))
    }

    /// Replaces the master weights by named host tensors (all of them, by name).
    pub fn params_from_host(&self, dev: &Dev, tensors: &[HostTensor]) -> Result<()> {
        let mut flat = vec![0f32; self.layout.numel];
        let mut seen = vec![false; self.layout.tensors.len()];
        for (name, values, shape) in tensors {
            let Some(i) = self.layout.tensors.iter().position(|t| &t.0 == name) else {
                return Err(EngineError::Adapter {
                    name: name.clone(),
                    msg: "not an adapter of this model".into(),
                });
            };
            let (_, off, n, want) = &self.layout.tensors[i];
            if shape != want || values.len() != *n {
                return Err(EngineError::Adapter {
                    name: name.clone(),
                    msg: format!(
                        "shape {shape:?} ({} values), expected {want:?}",
                        values.len()
                    ),
                });
            }
            flat[*off..off + n].copy_from_slice(values);
            seen[i] = true;
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(EngineError::Adapter {
                name: self.layout.tensors[i].0.clone(),
                msg: "missing".into(),
            });
        }
        dev.write(self.params.all(), &flat)?;
        Ok(())
    }
}
