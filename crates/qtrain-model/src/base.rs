//! The frozen base model as qtrain holds it: NF4 double-quantized projections,
//! bf16 (or f32 on CPU) embeddings, norms and lm_head.
//!
//! Loading quantizes one projection at a time straight from the memory-mapped
//! shards, so the host never holds more than one full-precision matrix (the largest
//! Mistral-7B projection is 4096 x 14336, 235 MB in f32) besides the quantized model.
//! On the CPU, worker threads each widen one matrix to f32 and quantize it with
//! qtrain-quant. On a CUDA device each projection is instead uploaded in its stored
//! dtype straight from the mapping (bf16 for real checkpoints: no host copy at all),
//! quantized on the GPU by `qtrain_device::nf4_quant` (bit-exact with the CPU
//! quantizer), and only the quantized result is downloaded, for the host copy that the
//! bitsandbytes cache is written from; the device holds one full-precision matrix at
//! a time.

use crate::config::{ModelConfig, Proj, PROJECTIONS};
use crate::error::{ModelError, Result};
use crate::safetensors_io::{RawTensor, ShardedTensors};
use candle_core::{DType, Device, Tensor};
use qtrain_device::Nf4QuantizeError;
use qtrain_quant::Nf4Tensor;
use std::path::{Path, PathBuf};

/// How the projections of the decoder layers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// NF4 with the given block size; `double_quant` quantizes the absmax values too.
    Nf4 {
        blocksize: usize,
        double_quant: bool,
    },
    /// Keep projections in the compute dtype (for tests and small models).
    None,
}

impl Default for Quantization {
    fn default() -> Self {
        Quantization::Nf4 {
            blocksize: 64,
            double_quant: true,
        }
    }
}

/// Where and in which precision the model runs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype for embeddings, norms, lm_head and dequantized weights.
    pub dtype: DType,
    pub quantization: Quantization,
    /// Threads used for quantizing while loading (0 = all cores).
    pub threads: usize,
}

impl LoadOptions {
    pub fn cpu_f32() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            quantization: Quantization::default(),
            threads: 0,
        }
    }
}

/// A frozen linear map `y = x W^T` with `W: [out, in]`. It never receives a gradient;
/// its full-precision form exists only transiently, produced by [`FrozenLinear::weight`].
pub struct FrozenLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub storage: FrozenStorage,
}

pub enum FrozenStorage {
    /// NF4 codes and (double-quantized) absmax on the host. The CPU path dequantizes
    /// with the reference implementation of `qtrain-quant`.
    Nf4(Nf4Tensor),
    /// The same NF4 data resident on a GPU, dequantized by the CUDA kernel of
    /// `qtrain-device`. The host copy is kept for saving the quantized cache.
    Nf4Device(Box<(Nf4Tensor, qtrain_device::Nf4Device)>),
    /// Unquantized weight in the compute dtype, on the model's device.
    Dense(Tensor),
}

impl FrozenLinear {
    /// The weight `[out, in]` in `dtype` on `device`. For NF4 the dequantized values
    /// are written into `scratch` (reused across calls, so one buffer serves every
    /// projection of every layer) and copied into a fresh tensor that the caller
    /// drops after the layer's matmuls.
    pub fn weight(&self, dtype: DType, device: &Device, scratch: &mut Vec<f32>) -> Result<Tensor> {
        match &self.storage {
            FrozenStorage::Dense(t) => Ok(t.to_dtype(dtype)?),
            // On the GPU the kernel writes straight into a fresh buffer from the
            // stream-ordered allocator: only the layer's current weights are alive.
            FrozenStorage::Nf4Device(q) => Ok(q.1.dequantize(dtype)?),
            FrozenStorage::Nf4(q) => {
                let n = self.out_features * self.in_features;
                scratch.resize(n, 0.0);
                q.dequantize_into(&mut scratch[..n]);
                let t = Tensor::from_slice(
                    &scratch[..n],
                    (self.out_features, self.in_features),
                    device,
                )?;
                Ok(if dtype == DType::F32 {
                    t
                } else {
                    t.to_dtype(dtype)?
                })
            }
        }
    }

    /// Bytes this weight occupies as stored.
    pub fn storage_bytes(&self) -> usize {
        match &self.storage {
            FrozenStorage::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            FrozenStorage::Nf4(q) => q.storage_bytes(),
            FrozenStorage::Nf4Device(q) => q.1.storage_bytes(),
        }
    }

    /// The host NF4 data, when this weight is NF4-quantized.
    pub fn nf4(&self) -> Option<&Nf4Tensor> {
        match &self.storage {
            FrozenStorage::Nf4(q) => Some(q),
            FrozenStorage::Nf4Device(q) => Some(&q.0),
            FrozenStorage::Dense(_) => None,
        }
    }
}

/// One decoder layer's frozen parameters.
pub struct BaseLayer {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    /// Indexed by [`Proj::index`].
    pub projs: Vec<FrozenLinear>,
}

impl BaseLayer {
    pub fn proj(&self, p: Proj) -> &FrozenLinear {
        &self.projs[p.index()]
    }
}

/// The whole frozen base model.
pub struct BaseModel {
    pub config: ModelConfig,
    /// The directory it was loaded from (tokenizer files live there).
    pub source_dir: PathBuf,
    pub device: Device,
    pub dtype: DType,
    pub quantization: Quantization,
    /// `[vocab, hidden]`
    pub embed_tokens: Tensor,
    pub layers: Vec<BaseLayer>,
    /// `[hidden]`
    pub norm: Tensor,
    /// `[vocab, hidden]`; the same storage as `embed_tokens` when tied.
    pub lm_head: Tensor,
}

impl BaseModel {
    /// Loads (and quantizes, unless the checkpoint is pre-quantized) a HF model directory.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let tensors = ShardedTensors::open_model_dir(dir)?;
        Self::from_tensors(config, dir, &tensors, opts)
    }

    pub fn from_tensors(
        config: ModelConfig,
        dir: &Path,
        tensors: &ShardedTensors,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let h = config.hidden_size;
        let dense = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let raw = tensors.get(name)?;
            raw.expect_shape(shape)?;
            let t = raw_to_tensor(&raw, opts.dtype, &opts.device)?;
            tensors.release(name);
            Ok(t)
        };
        let embed_tokens = dense("model.embed_tokens.weight", &[config.vocab_size, h])?;
        tracing::debug!("embeddings loaded{}", device_note(&opts.device));
        let norm = dense("model.norm.weight", &[h])?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            dense("lm_head.weight", &[config.vocab_size, h])?
        };
        let prequantized = config.is_prequantized();
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.threads
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let input_layernorm = dense(&format!("model.layers.{l}.input_layernorm.weight"), &[h])?;
            let post_attention_layernorm = dense(
                &format!("model.layers.{l}.post_attention_layernorm.weight"),
                &[h],
            )?;
            let projs = if prequantized {
                PROJECTIONS
                    .iter()
                    .map(|&p| load_prequantized(tensors, &config, l, p, &opts.device))
                    .collect::<Result<Vec<_>>>()?
            } else {
                quantize_layer(tensors, &config, l, opts, threads)?
            };
            layers.push(BaseLayer {
                input_layernorm,
                post_attention_layernorm,
                projs,
            });
            tracing::debug!(layer = l, "loaded{}", device_note(&opts.device));
        }
        let quantization = if prequantized {
            let q = config.quantization_config.as_ref().expect("prequantized");
            Quantization::Nf4 {
                blocksize: 64,
                double_quant: q
                    .get("bnb_4bit_use_double_quant")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
            }
        } else {
            opts.quantization
        };
        // Loading's temporaries (uploads, GPU quantization scratch) were freed into
        // the stream-ordered allocator's pool; give them back to the device so a run
        // that quantized starts with as much free memory as one that read the cache.
        trim_pool(&opts.device)?;
        Ok(Self {
            config,
            source_dir: dir.to_path_buf(),
            device: opts.device.clone(),
            dtype: opts.dtype,
            quantization,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Bytes held by the frozen weights (what the device must hold for the base).
    pub fn storage_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let tied = self.config.tie_word_embeddings;
        dense(&self.embed_tokens)
            + if tied { 0 } else { dense(&self.lm_head) }
            + dense(&self.norm)
            + self
                .layers
                .iter()
                .map(|l| {
                    dense(&l.input_layernorm)
                        + dense(&l.post_attention_layernorm)
                        + l.projs
                            .iter()
                            .map(FrozenLinear::storage_bytes)
                            .sum::<usize>()
                })
                .sum::<usize>()
    }
}

/// The candle dtype of a stored float tensor, or an error naming it.
fn stored_dtype(raw: &RawTensor<'_>) -> Result<DType> {
    use safetensors::Dtype as S;
    match raw.dtype {
        S::BF16 => Ok(DType::BF16),
        S::F16 => Ok(DType::F16),
        S::F32 => Ok(DType::F32),
        other => Err(ModelError::DtypeMismatch {
            path: raw.path.to_path_buf(),
            name: raw.name.to_string(),
            found: format!("{other:?}"),
            expected: "BF16, F16 or F32".into(),
        }),
    }
}

/// Reads a float tensor into the compute dtype without going through f32 when the
/// stored dtype already matches (bf16 embeddings stay bf16 on the GPU).
pub(crate) fn raw_to_tensor(raw: &RawTensor<'_>, dtype: DType, device: &Device) -> Result<Tensor> {
    let t = Tensor::from_raw_buffer(raw.bytes, stored_dtype(raw)?, raw.shape, &Device::Cpu)?;
    Ok(t.to_dtype(dtype)?.to_device(device)?)
}

/// Quantizes the seven projections of layer `l`, `threads` matrices at a time on the
/// CPU; one after the other on a GPU, which quantizes each far faster than the host
/// can page it in (and then holds only one full-precision matrix).
fn quantize_layer(
    tensors: &ShardedTensors,
    config: &ModelConfig,
    l: usize,
    opts: &LoadOptions,
    threads: usize,
) -> Result<Vec<FrozenLinear>> {
    let on_gpu = opts.device.is_cuda() && matches!(opts.quantization, Quantization::Nf4 { .. });
    if on_gpu {
        return PROJECTIONS
            .iter()
            .map(|&p| load_one_projection(tensors, config, l, p, opts))
            .collect();
    }
    // Each worker converts one matrix to f32 and quantizes it; at most `threads`
    // f32 matrices exist at once.
    let mut out: Vec<Option<Result<FrozenLinear>>> = (0..PROJECTIONS.len()).map(|_| None).collect();
    for chunk in PROJECTIONS.chunks(threads.max(1)) {
        let results: Vec<Result<FrozenLinear>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&p| s.spawn(move || load_one_projection(tensors, config, l, p, opts)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("quantization thread panicked"))
                .collect()
        });
        for (&p, r) in chunk.iter().zip(results) {
            out[p.index()] = Some(r);
        }
    }
    out.into_iter()
        .map(|r| r.expect("every projection visited"))
        .collect()
}

fn load_one_projection(
    tensors: &ShardedTensors,
    config: &ModelConfig,
    l: usize,
    p: Proj,
    opts: &LoadOptions,
) -> Result<FrozenLinear> {
    let name = p.weight_name(l);
    let raw = tensors.get(&name)?;
    let [o, i] = config.proj_shape(p);
    raw.expect_shape(&[o, i])?;
    let storage = match opts.quantization {
        Quantization::None => {
            let t = raw_to_tensor(&raw, opts.dtype, &opts.device)?;
            tensors.release(&name);
            FrozenStorage::Dense(t)
        }
        Quantization::Nf4 {
            blocksize,
            double_quant,
        } if opts.device.is_cuda() => {
            // Uploaded from the mapping in the stored dtype, quantized on the GPU.
            let x = Tensor::from_raw_buffer(raw.bytes, stored_dtype(&raw)?, &[o, i], &opts.device)?;
            let quant_err = |e| match e {
                Nf4QuantizeError::Quant(source) => ModelError::Quant {
                    path: raw.path.to_path_buf(),
                    name: name.clone(),
                    source,
                },
                Nf4QuantizeError::Dtype(d) => ModelError::DtypeMismatch {
                    path: raw.path.to_path_buf(),
                    name: name.clone(),
                    found: format!("{d:?}"),
                    expected: "BF16, F16 or F32".into(),
                },
                Nf4QuantizeError::Candle(e) => ModelError::Candle(e),
            };
            let (q, d) = qtrain_device::nf4_quant::quantize(&x, blocksize, double_quant)
                .map_err(quant_err)?;
            drop(x);
            tensors.release(&name);
            FrozenStorage::Nf4Device(Box::new((q, d)))
        }
        Quantization::Nf4 {
            blocksize,
            double_quant,
        } => {
            let data = raw.to_f32_vec()?;
            let q = Nf4Tensor::quantize(&data, &[o, i], blocksize, double_quant).map_err(|e| {
                ModelError::Quant {
                    path: raw.path.to_path_buf(),
                    name: name.clone(),
                    source: e,
                }
            })?;
            drop(data);
            tensors.release(&name);
            nf4_storage(q, &opts.device)?
        }
    };
    Ok(FrozenLinear {
        out_features: o,
        in_features: i,
        storage,
    })
}

/// Host NF4 on the CPU; uploaded (host copy kept) on a GPU.
fn nf4_storage(q: Nf4Tensor, device: &Device) -> Result<FrozenStorage> {
    Ok(if device.is_cpu() {
        FrozenStorage::Nf4(q)
    } else {
        let d = qtrain_device::Nf4Device::from_host(&q, device)?;
        FrozenStorage::Nf4Device(Box::new((q, d)))
    })
}

fn load_prequantized(
    tensors: &ShardedTensors,
    config: &ModelConfig,
    l: usize,
    p: Proj,
    device: &Device,
) -> Result<FrozenLinear> {
    let name = p.weight_name(l);
    let [o, i] = config.proj_shape(p);
    let q = crate::bnb::read_nf4(tensors, &name)?;
    for entry in crate::bnb::bnb_entry_names(l, p) {
        tensors.release(&entry);
    }
    if q.shape != [o, i] {
        return Err(ModelError::ShapeMismatch {
            path: tensors.get(&name)?.path.to_path_buf(),
            name,
            found: q.shape.clone(),
            expected: vec![o, i],
        });
    }
    Ok(FrozenLinear {
        out_features: o,
        in_features: i,
        storage: nf4_storage(q, device)?,
    })
}

/// Returns the CUDA allocator pool's free memory to the device (nothing on the CPU).
pub(crate) fn trim_pool(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        if let Some(c) = qtrain_device::Dev::from_candle(device)?.cuda() {
            c.trim_pool()?;
        }
    }
    let _ = device;
    Ok(())
}

/// ", device memory in use N MiB, stack limit S" on CUDA (debug logging of loads).
fn device_note(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        if let Ok(d) = qtrain_device::Dev::from_candle(device) {
            if let Some(c) = d.cuda() {
                return format!(
                    ", device memory in use {:.0} MiB, stack limit {} B",
                    c.used_mib(),
                    c.stack_limit().unwrap_or(0)
                );
            }
        }
    }
    let _ = device;
    String::new()
}
