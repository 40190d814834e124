//! LoRA adapters: configuration, the trainable `A`/`B` matrices of every targeted
//! projection, their gradients, and the deterministic dropout masks.
//!
//! Layout and names are stable: adapters are ordered by layer, then by projection in
//! [`PROJECTIONS`] order, `A` before `B`, and named `layers.{l}.{proj}.lora_A` /
//! `layers.{l}.{proj}.lora_B` (e.g. `layers.3.q_proj.lora_A`). The optimizer sees
//! them as host f32 slices through [`LoraWeights::to_host`] and
//! [`LoraWeights::update_from_host`].

use crate::error::{Result, StepError};
use candle_core::{DType, Device, Tensor};
use qtrain_model::{ModelConfig, Proj, PROJECTIONS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Hyper-parameters of the adapters (PEFT's `LoraConfig` subset qtrain supports).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout probability on the LoRA branch input, in `[0, 1)`.
    pub dropout: f64,
    pub targets: Vec<Proj>,
    /// rsLoRA scales by `alpha / sqrt(rank)` instead of `alpha / rank`.
    pub rslora: bool,
    /// Seeds the initialization of `A`.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: vec![Proj::Q, Proj::K, Proj::V, Proj::O],
            rslora: false,
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// The factor on the LoRA branch: `alpha / r`, or `alpha / sqrt(r)` (rsLoRA).
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Parses a comma-separated target list such as `q_proj,k_proj,v_proj,o_proj`.
    pub fn parse_targets(list: &str) -> Result<Vec<Proj>> {
        let mut out = Vec::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let p = Proj::from_name(name).ok_or_else(|| StepError::UnknownTarget {
                name: name.to_string(),
            })?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        Ok(out)
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(StepError::Config("rank must be > 0".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(StepError::Config(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(StepError::Config("no target projections".into()));
        }
        if !self.alpha.is_finite() {
            return Err(StepError::Config(format!(
                "alpha {} is not finite",
                self.alpha
            )));
        }
        Ok(())
    }
}

/// One tensor on the host as the optimizer sees it: `(name, row-major f32 values,
/// shape)`.
pub type HostTensor = (String, Vec<f32>, Vec<usize>);

/// Which of the two LoRA matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraPart {
    A,
    B,
}

/// `layers.{l}.{proj}.lora_A` / `lora_B`.
pub fn tensor_name(layer: usize, proj: Proj, part: LoraPart) -> String {
    let suffix = match part {
        LoraPart::A => "lora_A",
        LoraPart::B => "lora_B",
    };
    format!("layers.{layer}.{}.{suffix}", proj.name())
}

fn parse_name(name: &str) -> Option<(usize, Proj, LoraPart)> {
    let rest = name.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (proj, part) = rest.split_once('.')?;
    let part = match part {
        "lora_A" => LoraPart::A,
        "lora_B" => LoraPart::B,
        _ => return None,
    };
    Some((layer.parse().ok()?, Proj::from_name(proj)?, part))
}

/// The pair of matrices of one (layer, projection).
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub layer: usize,
    pub proj: Proj,
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
}

impl LoraPair {
    pub fn get(&self, part: LoraPart) -> &Tensor {
        match part {
            LoraPart::A => &self.a,
            LoraPart::B => &self.b,
        }
    }

    fn get_mut(&mut self, part: LoraPart) -> &mut Tensor {
        match part {
            LoraPart::A => &mut self.a,
            LoraPart::B => &mut self.b,
        }
    }
}

/// Pairs in stable order plus a `(layer, proj) -> position` index.
#[derive(Debug, Clone)]
struct PairSet {
    pairs: Vec<LoraPair>,
    index: Vec<Option<usize>>,
}

impl PairSet {
    fn new(num_layers: usize, pairs: Vec<LoraPair>) -> Self {
        let mut index = vec![None; num_layers * PROJECTIONS.len()];
        for (i, p) in pairs.iter().enumerate() {
            index[p.layer * PROJECTIONS.len() + p.proj.index()] = Some(i);
        }
        Self { pairs, index }
    }

    fn get(&self, layer: usize, proj: Proj) -> Option<&LoraPair> {
        let i = (*self.index.get(layer * PROJECTIONS.len() + proj.index())?)?;
        Some(&self.pairs[i])
    }

    fn get_mut(&mut self, layer: usize, proj: Proj) -> Option<&mut LoraPair> {
        let i = (*self.index.get(layer * PROJECTIONS.len() + proj.index())?)?;
        Some(&mut self.pairs[i])
    }

    fn lookup(&self, name: &str) -> Result<(&LoraPair, LoraPart)> {
        let unknown = || StepError::UnknownTensor {
            name: name.to_string(),
        };
        let (l, p, part) = parse_name(name).ok_or_else(unknown)?;
        Ok((self.get(l, p).ok_or_else(unknown)?, part))
    }

    fn lookup_mut(&mut self, name: &str) -> Result<&mut Tensor> {
        let unknown = || StepError::UnknownTensor {
            name: name.to_string(),
        };
        let (l, p, part) = parse_name(name).ok_or_else(unknown)?;
        Ok(self.get_mut(l, p).ok_or_else(unknown)?.get_mut(part))
    }

    fn named(&self) -> Vec<(String, &Tensor)> {
        self.pairs
            .iter()
            .flat_map(|p| {
                [
                    (tensor_name(p.layer, p.proj, LoraPart::A), &p.a),
                    (tensor_name(p.layer, p.proj, LoraPart::B), &p.b),
                ]
            })
            .collect()
    }

    fn to_host(&self) -> Result<Vec<HostTensor>> {
        self.named()
            .into_iter()
            .map(|(name, t)| {
                let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Ok((name, v, t.dims().to_vec()))
            })
            .collect()
    }
}

/// Replaces `slot` by `value` after checking shape (dtype and device follow `slot`).
fn replace(slot: &mut Tensor, name: &str, value: &Tensor) -> Result<()> {
    if value.dims() != slot.dims() {
        return Err(StepError::ShapeMismatch {
            name: name.to_string(),
            found: value.dims().to_vec(),
            expected: slot.dims().to_vec(),
        });
    }
    *slot = value.to_dtype(slot.dtype())?.to_device(slot.device())?;
    Ok(())
}

/// The trainable adapters of a model.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    config: LoraConfig,
    num_layers: usize,
    dtype: DType,
    device: Device,
    set: PairSet,
}

impl LoraWeights {
    /// PEFT's initialization in f32: `A ~ U(-1/sqrt(in), 1/sqrt(in))` (Kaiming-uniform
    /// with `a = sqrt(5)`), `B = 0`, so the adapted model starts equal to the base.
    pub fn init(config: &LoraConfig, model: &ModelConfig, device: &Device) -> Result<Self> {
        Self::init_with_dtype(config, model, device, DType::F32)
    }

    /// [`LoraWeights::init`] in another dtype (F64 for the finite-difference tests).
    /// Each `A` draws from its own ChaCha8 stream seeded by `(seed, layer, proj)`, so
    /// adding a target does not change the others.
    pub fn init_with_dtype(
        config: &LoraConfig,
        model: &ModelConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        config.validate()?;
        let r = config.rank;
        let mut pairs = Vec::new();
        for layer in 0..model.num_hidden_layers {
            for proj in PROJECTIONS {
                if !config.targets.contains(&proj) {
                    continue;
                }
                let [out, inp] = model.proj_shape(proj);
                let bound = 1.0 / (inp as f64).sqrt();
                let mut rng = ChaCha8Rng::seed_from_u64(mix(&[
                    config.seed,
                    layer as u64,
                    proj.index() as u64,
                ]));
                let a: Vec<f64> = (0..r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Tensor::from_vec(a, (r, inp), device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((out, r), dtype, device)?;
                pairs.push(LoraPair { layer, proj, a, b });
            }
        }
        Ok(Self {
            config: config.clone(),
            num_layers: model.num_hidden_layers,
            dtype,
            device: device.clone(),
            set: PairSet::new(model.num_hidden_layers, pairs),
        })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// The adapter of `(layer, proj)`, if that projection is targeted.
    pub fn get(&self, layer: usize, proj: Proj) -> Option<&LoraPair> {
        self.set.get(layer, proj)
    }

    /// All pairs in stable order.
    pub fn pairs(&self) -> &[LoraPair] {
        &self.set.pairs
    }

    /// `(name, tensor)` in stable order (layer, projection, A then B).
    pub fn tensors(&self) -> Vec<(String, &Tensor)> {
        self.set.named()
    }

    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        let (pair, part) = self.set.lookup(name)?;
        Ok(pair.get(part))
    }

    /// Replaces one tensor (cast to the adapters' dtype and device).
    pub fn set_tensor(&mut self, name: &str, value: &Tensor) -> Result<()> {
        replace(self.set.lookup_mut(name)?, name, value)
    }

    pub fn num_parameters(&self) -> usize {
        self.set
            .pairs
            .iter()
            .map(|p| p.a.elem_count() + p.b.elem_count())
            .sum()
    }

    /// `(name, values, shape)` of every tensor in stable order, as host f32.
    pub fn to_host(&self) -> Result<Vec<HostTensor>> {
        self.set.to_host()
    }

    /// The same adapters on `device` (a copy; the values and layout are unchanged).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let pairs = self
            .set
            .pairs
            .iter()
            .map(|p| {
                Ok(LoraPair {
                    layer: p.layer,
                    proj: p.proj,
                    a: p.a.to_device(device)?,
                    b: p.b.to_device(device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: self.config.clone(),
            num_layers: self.num_layers,
            dtype: self.dtype,
            device: device.clone(),
            set: PairSet::new(self.num_layers, pairs),
        })
    }

    /// Sets one tensor from host f32 values (row-major, the tensor's shape).
    pub fn set_from_host(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let slot = self.set.lookup_mut(name)?;
        if values.len() != slot.elem_count() {
            return Err(StepError::ShapeMismatch {
                name: name.to_string(),
                found: vec![values.len()],
                expected: slot.dims().to_vec(),
            });
        }
        let t = Tensor::from_slice(values, slot.dims(), slot.device())?.to_dtype(slot.dtype())?;
        *slot = t;
        Ok(())
    }

    /// Sets every tensor named in `params` (the layout [`LoraWeights::to_host`]
    /// returns; the shapes must match).
    pub fn update_from_host(&mut self, params: &[HostTensor]) -> Result<()> {
        for (name, values, shape) in params {
            let expected = self.tensor(name)?.dims().to_vec();
            if *shape != expected {
                return Err(StepError::ShapeMismatch {
                    name: name.clone(),
                    found: shape.clone(),
                    expected,
                });
            }
            self.set_from_host(name, values)?;
        }
        Ok(())
    }
}

/// Gradients of the adapters, laid out like [`LoraWeights`] and accumulated across
/// the micro-batches of an optimizer step.
#[derive(Debug, Clone)]
pub struct LoraGrads {
    set: PairSet,
}

impl LoraGrads {
    /// Zero gradients shaped like `weights` (same dtype and device).
    pub fn zeros_like(weights: &LoraWeights) -> Result<Self> {
        let pairs = weights
            .pairs()
            .iter()
            .map(|p| {
                Ok(LoraPair {
                    layer: p.layer,
                    proj: p.proj,
                    a: p.a.zeros_like()?,
                    b: p.b.zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            set: PairSet::new(weights.num_layers(), pairs),
        })
    }

    /// Resets every gradient to zero (start of an optimizer step).
    pub fn zero(&mut self) -> Result<()> {
        for p in &mut self.set.pairs {
            p.a = p.a.zeros_like()?;
            p.b = p.b.zeros_like()?;
        }
        Ok(())
    }

    pub fn get(&self, layer: usize, proj: Proj) -> Option<&LoraPair> {
        self.set.get(layer, proj)
    }

    pub fn pairs(&self) -> &[LoraPair] {
        &self.set.pairs
    }

    pub fn tensors(&self) -> Vec<(String, &Tensor)> {
        self.set.named()
    }

    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        let (pair, part) = self.set.lookup(name)?;
        Ok(pair.get(part))
    }

    pub fn to_host(&self) -> Result<Vec<HostTensor>> {
        self.set.to_host()
    }

    /// `grad += (da, db)` for one projection (the reference backward's accumulation).
    pub fn accumulate(&mut self, layer: usize, proj: Proj, da: &Tensor, db: &Tensor) -> Result<()> {
        let pair = self
            .set
            .get_mut(layer, proj)
            .ok_or_else(|| StepError::UnknownTensor {
                name: tensor_name(layer, proj, LoraPart::A),
            })?;
        pair.a = (&pair.a + da.to_dtype(pair.a.dtype())?)?;
        pair.b = (&pair.b + db.to_dtype(pair.b.dtype())?)?;
        Ok(())
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for p in &mut self.set.pairs {
            p.a = (&p.a * factor)?;
            p.b = (&p.b * factor)?;
        }
        Ok(())
    }

    /// The global L2 norm over all gradients (for clipping and logging).
    pub fn global_norm(&self) -> Result<f64> {
        let mut sq = 0.0;
        for (_, t) in self.set.named() {
            sq += t
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        Ok(sq.sqrt())
    }
}

/// A 64-bit mix of several words (splitmix64 finalizer chained over the inputs).
pub(crate) fn mix(words: &[u64]) -> u64 {
    let mut h = 0x243f_6a88_85a3_08d3u64;
    for &w in words {
        h = splitmix64(h ^ w);
    }
    h
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hash base of a mask (`dropout_mask` says how element `i` is drawn from it; the
/// fused engine's device kernels draw the same elements from this number).
pub fn dropout_base(key: DropoutKey) -> u64 {
    mix(&[
        key.seed,
        key.micro_step,
        key.layer as u64,
        key.proj.index() as u64,
    ])
}

/// Which dropout mask to draw: one per (seed, micro-step, layer, projection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    pub micro_step: u64,
    pub layer: usize,
    pub proj: Proj,
}

/// The inverted-dropout mask `[rows, cols]` for `key`: element `i` (row-major) is
/// dropped when the 16-bit lane `i % 4` (bits `16 (i % 4)..`) of
/// `splitmix64(mix(seed, micro_step, layer, proj) + i / 4)` is below `ceil(p · 2¹⁶)`
/// (so `p` acts rounded up to a multiple of 2⁻¹⁶); kept elements are `1/(1-p)`. One
/// hash serves four elements because the fused engine's dropout kernels are bound by
/// the hash. It is a pure function of its inputs (counter-based, no RNG state), so
/// gradient checkpointing regenerates the identical mask when it recomputes a layer,
/// and a GPU kernel can reproduce it element by element. Returns `None` when `p == 0`.
pub fn dropout_mask(
    p: f64,
    key: DropoutKey,
    rows: usize,
    cols: usize,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    if p <= 0.0 {
        return Ok(None);
    }
    let base = dropout_base(key);
    let keep = 1.0 / (1.0 - p);
    let threshold = (p * 65536.0).ceil().min(65536.0) as u64;
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let lane = (splitmix64(base.wrapping_add(i as u64 >> 2)) >> (16 * (i & 3))) & 0xffff;
            if lane < threshold {
                0.0
            } else {
                keep as f32
            }
        })
        .collect();
    let mask = Tensor::from_vec(values, (rows, cols), device)?;
    // 1/(1-p) is exact in f32 only for some p; build f64 masks from f64 directly.
    let mask = if dtype == DType::F64 {
        (mask.to_dtype(DType::F64)?.ne(0.0)?.to_dtype(DType::F64)? * keep)?
    } else {
        mask.to_dtype(dtype)?
    };
    Ok(Some(mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask of one key, pinned by an independent model of the rule (Python): its
    /// base is `mix(seed, micro_step, layer, proj)`, element `i` the 16-bit lane `i % 4`
    /// of `splitmix64(base + i / 4)` against `ceil(p · 2¹⁶)`. The device crate's
    /// `dropout_ref` and the CUDA kernels draw the same elements.
    #[test]
    fn dropout_mask_matches_its_definition() {
        let key = DropoutKey {
            seed: 7,
            micro_step: 2,
            layer: 3,
            proj: Proj::Q,
        };
        assert_eq!(dropout_base(key), 0x8a72_ef89_2d62_3577);
        let m = dropout_mask(0.3, key, 2, 12, DType::F32, &Device::Cpu)
            .unwrap()
            .unwrap();
        let flags: String = m
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| if v != 0.0 { '1' } else { '0' })
            .collect();
        assert_eq!(flags, "111111011011110111011111");
        assert!(dropout_mask(0.0, key, 2, 12, DType::F32, &Device::Cpu)
            .unwrap()
            .is_none());
    }
}
