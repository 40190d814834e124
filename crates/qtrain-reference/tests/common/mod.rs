//! Shared test fixtures: tiny random base models built in memory, packed batches,
//! and a naive differentiable implementation of the whole model written with plain
//! candle ops so candle's autograd can serve as an independent gradient oracle.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var, D};
use qtrain_model::{
    BaseLayer, BaseModel, FrozenLinear, FrozenStorage, ModelConfig, Proj, Quantization, PROJECTIONS,
};
use qtrain_step::{dropout_mask, DropoutKey, LoraConfig, LoraWeights, TokenBatch};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::PathBuf;

/// Small enough for finite differences, with every feature: GQA (4 heads over 2
/// KV heads), two layers, an optional sliding window.
pub fn small_config(vocab: usize, window: Option<usize>) -> ModelConfig {
    let mut c = ModelConfig::preset("tiny", vocab).expect("preset");
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c.head_dim = Some(8);
    c.sliding_window = window;
    c
}

fn normal(rng: &mut ChaCha8Rng, n: usize, mean: f64, std: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            // Box-Muller keeps this independent of rand_distr's API.
            let u1: f64 = rng.random_range(1e-12..1.0);
            let u2: f64 = rng.random::<f64>();
            mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

/// HF-named random weights (`model.layers.0.self_attn.q_proj.weight`, ...). The
/// projections use a larger std than HF's 0.02 so the layers do real work.
pub fn random_weights(cfg: &ModelConfig, seed: u64, dtype: DType) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = HashMap::new();
    let h = cfg.hidden_size;
    let mut put = |name: String, shape: &[usize], mean: f64, std: f64, rng: &mut ChaCha8Rng| {
        let n = shape.iter().product();
        let t = Tensor::from_vec(normal(rng, n, mean, std), shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        w.insert(name, t);
    };
    put(
        "model.embed_tokens.weight".into(),
        &[cfg.vocab_size, h],
        0.0,
        1.0,
        &mut rng,
    );
    for l in 0..cfg.num_hidden_layers {
        put(
            format!("model.layers.{l}.input_layernorm.weight"),
            &[h],
            1.0,
            0.1,
            &mut rng,
        );
        put(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            &[h],
            1.0,
            0.1,
            &mut rng,
        );
        for p in PROJECTIONS {
            let [o, i] = cfg.proj_shape(p);
            put(
                p.weight_name(l),
                &[o, i],
                0.0,
                1.0 / (i as f64).sqrt(),
                &mut rng,
            );
        }
    }
    put("model.norm.weight".into(), &[h], 1.0, 0.1, &mut rng);
    put(
        "lm_head.weight".into(),
        &[cfg.vocab_size, h],
        0.0,
        0.3,
        &mut rng,
    );
    w
}

/// A dense (unquantized) in-memory `BaseModel` over `weights`.
pub fn base_from_weights(
    cfg: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    dtype: DType,
) -> BaseModel {
    let get = |n: &str| weights[n].clone();
    let layers = (0..cfg.num_hidden_layers)
        .map(|l| BaseLayer {
            input_layernorm: get(&format!("model.layers.{l}.input_layernorm.weight")),
            post_attention_layernorm: get(&format!(
                "model.layers.{l}.post_attention_layernorm.weight"
            )),
            projs: PROJECTIONS
                .iter()
                .map(|&p| {
                    let [o, i] = cfg.proj_shape(p);
                    FrozenLinear {
                        out_features: o,
                        in_features: i,
                        storage: FrozenStorage::Dense(get(&p.weight_name(l))),
                    }
                })
                .collect(),
        })
        .collect();
    BaseModel {
        config: cfg.clone(),
        source_dir: PathBuf::new(),
        device: Device::Cpu,
        dtype,
        quantization: Quantization::None,
        embed_tokens: get("model.embed_tokens.weight"),
        layers,
        norm: get("model.norm.weight"),
        lm_head: get("lm_head.weight"),
    }
}

pub fn random_base(
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
) -> (BaseModel, HashMap<String, Tensor>) {
    let w = random_weights(cfg, seed, dtype);
    (base_from_weights(cfg, &w, dtype), w)
}

/// Adapters on every projection with a non-zero `B` (PEFT starts at `B = 0`, which
/// would make every `A` gradient vanish and hide bugs in it).
pub fn random_lora(cfg: &ModelConfig, lcfg: &LoraConfig, seed: u64, dtype: DType) -> LoraWeights {
    let mut lora = LoraWeights::init_with_dtype(lcfg, cfg, &Device::Cpu, dtype).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let names: Vec<(String, Vec<usize>)> = lora
        .tensors()
        .into_iter()
        .filter(|(n, _)| n.ends_with("lora_B"))
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();
    for (name, dims) in names {
        let n = dims.iter().product();
        let t = Tensor::from_vec(normal(&mut rng, n, 0.0, 0.05), dims, &Device::Cpu).unwrap();
        lora.set_tensor(&name, &t).unwrap();
    }
    lora
}

pub fn all_targets_config(dropout: f64) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout,
        targets: PROJECTIONS.to_vec(),
        rslora: false,
        seed: 7,
    }
}

/// Two rows of `seq` tokens; row 0 packs three documents (positions restart,
/// segment ids change), row 1 is one document; a few labels are masked.
pub fn packed_batch(vocab: usize, seq: usize, seed: u64) -> TokenBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..2 * seq)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let mut labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let cut1 = seq / 3;
    let cut2 = 2 * seq / 3 + 1;
    let mut seg = Vec::new();
    let mut pos = Vec::new();
    for t in 0..seq {
        let (s, start) = if t < cut1 {
            (0, 0)
        } else if t < cut2 {
            (1, cut1)
        } else {
            (2, cut2)
        };
        seg.push(s);
        pos.push((t - start) as u32);
    }
    seg.extend(std::iter::repeat_n(5, seq));
    pos.extend(0..seq as u32);
    // Prompt-style masking: the first two labels of row 1 carry no loss.
    labels[seq] = -100;
    labels[seq + 1] = -100;
    labels[3] = -100;
    TokenBatch::new(ids, labels, pos, seg, 2, seq).unwrap()
}

pub fn random_rows(vocab: usize, rows: usize, seq: usize, seed: u64) -> TokenBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rows: Vec<Vec<u32>> = (0..rows)
        .map(|_| {
            (0..seq)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect()
        })
        .collect();
    TokenBatch::from_rows(&rows).unwrap()
}

pub fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// `[b, t]` host vector to a `[b, t]` tensor.
fn ids_tensor(v: &[u32], b: usize, t: usize) -> Result<Tensor> {
    Tensor::from_slice(v, (b, t), &Device::Cpu)
}

/// The naive model: whole-tensor candle ops only (no fused kernels, no chunking),
/// `[b, t, h]` layout, KV heads repeated with `index_select`, masks and RoPE built
/// here from the definitions. Returns `loss_sum / denominator` as a scalar tensor
/// (differentiable in the `vars`) and, separately, the logits `[b, t, vocab]`.
pub struct Naive<'a> {
    pub cfg: &'a ModelConfig,
    pub weights: &'a HashMap<String, Tensor>,
    /// `(layer, proj) -> (A, B)`
    pub lora: HashMap<(usize, Proj), (Var, Var)>,
    pub scale: f64,
    /// `(p, seed, micro_step)`
    pub dropout: Option<(f64, u64, u64)>,
}

impl<'a> Naive<'a> {
    pub fn new(
        cfg: &'a ModelConfig,
        weights: &'a HashMap<String, Tensor>,
        lora: Option<&LoraWeights>,
    ) -> Self {
        let mut map = HashMap::new();
        let mut scale = 0.0;
        if let Some(l) = lora {
            scale = l.scale();
            for p in l.pairs() {
                map.insert(
                    (p.layer, p.proj),
                    (
                        Var::from_tensor(&p.a).unwrap(),
                        Var::from_tensor(&p.b).unwrap(),
                    ),
                );
            }
        }
        Self {
            cfg,
            weights,
            lora: map,
            scale,
            dropout: None,
        }
    }

    fn w(&self, name: &str) -> &Tensor {
        &self.weights[name]
    }

    fn rms(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + self.cfg.rms_norm_eps)?.sqrt()?)?
            .broadcast_mul(w)
    }

    /// `x: [b, t, in]`
    fn linear(&self, l: usize, p: Proj, x: &Tensor) -> Result<Tensor> {
        let (b, t, i) = x.dims3()?;
        let x2 = x.reshape((b * t, i))?;
        let mut y = x2.matmul(&self.w(&p.weight_name(l)).t()?)?;
        if let Some((a, bb)) = self.lora.get(&(l, p)) {
            let xd = match self.dropout {
                Some((prob, seed, micro_step)) => {
                    let key = DropoutKey {
                        seed,
                        micro_step,
                        layer: l,
                        proj: p,
                    };
                    let m = dropout_mask(prob, key, b * t, i, x.dtype(), &Device::Cpu)
                        .unwrap()
                        .unwrap();
                    (&x2 * m)?
                }
                None => x2.clone(),
            };
            let yl = xd
                .matmul(&a.as_tensor().t()?)?
                .matmul(&bb.as_tensor().t()?)?;
            y = (y + (yl * self.scale)?)?;
        }
        y.reshape((b, t, ()))
    }

    fn rope_tables(&self, batch: &TokenBatch, dtype: DType) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.head_dim();
        let (b, t) = (batch.batch_size, batch.seq_len);
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for &p in &batch.position_ids {
            for j in 0..d {
                let i = j % (d / 2);
                let inv = self.cfg.rope_theta.powf(-((2 * i) as f64) / d as f64);
                cos.push((p as f64 * inv).cos());
                sin.push((p as f64 * inv).sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (b, 1, t, d), &Device::Cpu)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (b, 1, t, d), &Device::Cpu)?.to_dtype(dtype)?,
        ))
    }

    fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(3)?;
        let x1 = x.narrow(3, 0, d / 2)?;
        let x2 = x.narrow(3, d / 2, d / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
        x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
    }

    fn mask(&self, batch: &TokenBatch, dtype: DType) -> Result<Tensor> {
        let (b, t) = (batch.batch_size, batch.seq_len);
        let mut m = vec![0f64; b * t * t];
        for r in 0..b {
            for i in 0..t {
                for j in 0..t {
                    let seg = &batch.segment_ids[r * t..];
                    let ok = j <= i
                        && self.cfg.sliding_window.is_none_or(|w| i - j < w)
                        && seg[i] == seg[j];
                    if !ok {
                        m[(r * t + i) * t + j] = -1e9;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu)?.to_dtype(dtype)
    }

    pub fn logits(&self, batch: &TokenBatch) -> Result<Tensor> {
        let cfg = self.cfg;
        let (b, t) = (batch.batch_size, batch.seq_len);
        let (nh, nkv, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let dtype = self.w("lm_head.weight").dtype();
        let ids = ids_tensor(&batch.input_ids, b, t)?.flatten_all()?;
        let mut x = self
            .w("model.embed_tokens.weight")
            .index_select(&ids, 0)?
            .reshape((b, t, cfg.hidden_size))?;
        let (cos, sin) = self.rope_tables(batch, dtype)?;
        let mask = self.mask(batch, dtype)?;
        let kv_index: Vec<u32> = (0..nh).map(|h| (h / (nh / nkv)) as u32).collect();
        let kv_index = Tensor::from_vec(kv_index, nh, &Device::Cpu)?;
        for l in 0..cfg.num_hidden_layers {
            let h1 = self.rms(
                &x,
                self.w(&format!("model.layers.{l}.input_layernorm.weight")),
            )?;
            let heads = |y: Tensor, n: usize| -> Result<Tensor> {
                y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()
            };
            let q = Self::rope(&heads(self.linear(l, Proj::Q, &h1)?, nh)?, &cos, &sin)?;
            let k = Self::rope(&heads(self.linear(l, Proj::K, &h1)?, nkv)?, &cos, &sin)?;
            let v = heads(self.linear(l, Proj::V, &h1)?, nkv)?;
            let k = k.index_select(&kv_index, 1)?;
            let v = v.index_select(&kv_index, 1)?;
            let s = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
            let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let o = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * d))?;
            x = (x + self.linear(l, Proj::O, &o)?)?;
            let h2 = self.rms(
                &x,
                self.w(&format!("model.layers.{l}.post_attention_layernorm.weight")),
            )?;
            let g = self.linear(l, Proj::Gate, &h2)?;
            let u = self.linear(l, Proj::Up, &h2)?;
            let sig = (g.neg()?.exp()? + 1.0)?.recip()?;
            let m = ((g * sig)? * u)?;
            x = (x + self.linear(l, Proj::Down, &m)?)?;
        }
        let hn = self.rms(&x, self.w("model.norm.weight"))?;
        hn.reshape((b * t, cfg.hidden_size))?
            .matmul(&self.w("lm_head.weight").t()?)?
            .reshape((b, t, cfg.vocab_size))
    }

    /// HF's shifted loss, written out: position `t` predicts `labels[t+1]` of the
    /// same row and document.
    pub fn loss(&self, batch: &TokenBatch, denominator: f64) -> Result<Tensor> {
        let (b, t) = (batch.batch_size, batch.seq_len);
        let logits = self.logits(batch)?.reshape((b * t, self.cfg.vocab_size))?;
        let mut rows = Vec::new();
        let mut tgts = Vec::new();
        for r in 0..b {
            for p in 0..t - 1 {
                let i = r * t + p;
                let lab = batch.labels[i + 1];
                if lab != -100 && batch.segment_ids[i] == batch.segment_ids[i + 1] {
                    rows.push(i as u32);
                    tgts.push(lab as u32);
                }
            }
        }
        let n = rows.len();
        let sel = logits.index_select(&Tensor::from_vec(rows, n, &Device::Cpu)?, 0)?;
        let m = sel.max_keepdim(1)?;
        let lse = (sel.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + &m)?;
        let picked = sel.gather(&Tensor::from_vec(tgts, (n, 1), &Device::Cpu)?, 1)?;
        (lse - picked)?.sum_all()? / denominator
    }
}
