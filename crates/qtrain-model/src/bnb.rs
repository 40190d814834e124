//! The quantized base on disk, in bitsandbytes' serialization.
//!
//! A 7B model is quantized once; the result is written as a complete Hugging Face
//! model directory whose `model.safetensors` holds, for each projection, the packed
//! uint8 codes plus `absmax`, `quant_map`, `nested_absmax`, `nested_quant_map` and
//! `quant_state.bitsandbytes__nf4`, and whose `config.json` carries the
//! `quantization_config` transformers writes. Later starts read it in seconds, and
//! transformers + bitsandbytes load the same directory as a pre-quantized 4-bit model.

use crate::base::{BaseModel, FrozenStorage, LoadOptions, Quantization};
use crate::config::{Proj, PROJECTIONS};
use crate::error::{ModelError, Result};
use crate::safetensors_io::{ShardedTensors, StreamingWriter, TensorSpec};
use candle_core::{DType, Tensor};
use qtrain_quant::{Nf4Tensor, SerDtype, SerializedTensor};
use safetensors::Dtype;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Version of the cache layout; bump when what we write changes meaning.
/// 2: projection biases and Qwen 3's q/k norms are part of the cache (a format-1
/// cache of a Llama with `attention_bias` lacks them).
const CACHE_FORMAT: u32 = 2;

/// Reads one bitsandbytes-serialized NF4 weight.
pub fn read_nf4(tensors: &ShardedTensors, weight_name: &str) -> Result<Nf4Tensor> {
    let get = |key: &str| -> Option<(SerDtype, Vec<usize>, Cow<'_, [u8]>)> {
        let raw = tensors.get(key).ok()?;
        let dtype = match raw.dtype {
            Dtype::U8 => SerDtype::U8,
            Dtype::F32 => SerDtype::F32,
            _ => return None,
        };
        Some((dtype, raw.shape.to_vec(), Cow::Borrowed(raw.bytes)))
    };
    Nf4Tensor::from_bnb_entries(weight_name, get).map_err(|e| ModelError::Quant {
        path: tensors
            .get(weight_name)
            .map(|r| r.path.to_path_buf())
            .unwrap_or_default(),
        name: weight_name.to_string(),
        source: e,
    })
}

fn ser_dtype(d: SerDtype) -> Dtype {
    match d {
        SerDtype::U8 => Dtype::U8,
        SerDtype::F32 => Dtype::F32,
    }
}

/// The `quantization_config` transformers writes for `BitsAndBytesConfig(load_in_4bit=True,
/// bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=bf16)`.
pub fn bnb_quantization_config(double_quant: bool) -> serde_json::Value {
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

fn bf16_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v = t
        .to_dtype(DType::BF16)?
        .flatten_all()?
        .to_vec1::<half::bf16>()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Writes `model` (NF4-quantized) as a bitsandbytes pre-quantized HF directory.
/// Tokenizer files from the source directory are copied along.
pub fn save_quantized(model: &BaseModel, out_dir: &Path) -> Result<()> {
    let Quantization::Nf4 { double_quant, .. } = model.quantization else {
        return Err(ModelError::ConfigField {
            path: out_dir.to_path_buf(),
            key: "quantization".into(),
            msg: "only an NF4-quantized model can be saved in bitsandbytes format".into(),
        });
    };
    std::fs::create_dir_all(out_dir).map_err(|e| ModelError::io(out_dir, e))?;
    let cfg = &model.config;

    // The items in file order: a dense tensor or a projection's bnb entries.
    enum Item<'a> {
        Dense(String, &'a Tensor),
        Nf4(String, &'a Nf4Tensor),
    }
    let mut items = vec![Item::Dense(
        "model.embed_tokens.weight".into(),
        &model.embed_tokens,
    )];
    for (l, layer) in model.layers.iter().enumerate() {
        items.push(Item::Dense(
            format!("model.layers.{l}.input_layernorm.weight"),
            &layer.input_layernorm,
        ));
        items.push(Item::Dense(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            &layer.post_attention_layernorm,
        ));
        for p in PROJECTIONS {
            let proj = layer.proj(p);
            match (&proj.storage, proj.nf4()) {
                (_, Some(q)) => items.push(Item::Nf4(p.weight_name(l), q)),
                (FrozenStorage::Dense(t), None) => items.push(Item::Dense(p.weight_name(l), t)),
                (_, None) => unreachable!("only dense storage lacks NF4 data"),
            }
            // Biases stay in bf16 beside the packed weight, as bitsandbytes keeps them.
            if let Some(b) = &proj.bias {
                items.push(Item::Dense(p.bias_name(l), b));
            }
        }
        if let (Some(q), Some(k)) = (&layer.q_norm, &layer.k_norm) {
            let [qn, kn] = crate::config::qk_norm_names(l);
            items.push(Item::Dense(qn, q));
            items.push(Item::Dense(kn, k));
        }
    }
    items.push(Item::Dense("model.norm.weight".into(), &model.norm));
    if !cfg.tie_word_embeddings {
        items.push(Item::Dense("lm_head.weight".into(), &model.lm_head));
    }

    let entries_of =
        |name: &str, q: &Nf4Tensor| -> Vec<SerializedTensor> { q.to_bnb_entries(name, "bfloat16") };
    let mut specs = Vec::new();
    for item in &items {
        match item {
            Item::Dense(name, t) => specs.push(TensorSpec::new(name, Dtype::BF16, t.dims())),
            Item::Nf4(name, q) => {
                for e in entries_of(name, q) {
                    specs.push(TensorSpec::new(e.name, ser_dtype(e.dtype), &e.shape));
                }
            }
        }
    }
    let mut w = StreamingWriter::create(&out_dir.join("model.safetensors"), specs, {
        let mut m = std::collections::BTreeMap::new();
        m.insert("format".to_string(), "pt".to_string());
        Some(m)
    })?;
    for item in &items {
        match item {
            Item::Dense(_, t) => w.write_next(&bf16_bytes(t)?)?,
            Item::Nf4(name, q) => {
                for e in entries_of(name, q) {
                    w.write_next(&e.bytes)?;
                }
            }
        }
    }
    w.finish()?;

    copy_tokenizer_files(&model.source_dir, out_dir)?;
    // config.json last: its presence marks the directory complete.
    let mut json = cfg.to_json();
    let obj = json.as_object_mut().expect("config is an object");
    obj.insert(
        "quantization_config".into(),
        bnb_quantization_config(double_quant),
    );
    obj.insert("torch_dtype".into(), "bfloat16".into());
    obj.insert("qtrain_cache_format".into(), CACHE_FORMAT.into());
    write_json_atomic(&out_dir.join("config.json"), &json)
}

/// Copies tokenizer.json, tokenizer_config.json and friends if present.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "generation_config.json",
    ] {
        let src = from.join(f);
        if src.exists() && from != to {
            std::fs::copy(&src, to.join(f)).map_err(|e| ModelError::io(&src, e))?;
        }
    }
    Ok(())
}

pub(crate) fn write_json_atomic(path: &Path, json: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(json).expect("json serializes");
    std::fs::write(&tmp, text).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

/// What [`load_cached`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded the pre-quantized copy.
    Hit(PathBuf),
    /// Quantized from the source and wrote the copy for next time.
    Written(PathBuf),
    /// No cache used (quantization none, or the source is already pre-quantized).
    Bypassed,
}

/// Loads `dir` through the quantized cache under `cache_root`: the first call
/// quantizes and saves, later calls read the bitsandbytes copy.
pub fn load_cached(
    dir: &Path,
    opts: &LoadOptions,
    cache_root: &Path,
) -> Result<(BaseModel, CacheOutcome)> {
    let Quantization::Nf4 {
        blocksize,
        double_quant,
    } = opts.quantization
    else {
        return Ok((BaseModel::load(dir, opts)?, CacheOutcome::Bypassed));
    };
    let config_path = dir.join("config.json");
    let config = crate::config::ModelConfig::from_file(&config_path)?;
    if config.is_prequantized() {
        return Ok((BaseModel::load(dir, opts)?, CacheOutcome::Bypassed));
    }
    let key = fingerprint(dir, blocksize, double_quant)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let cached = cache_root.join(format!(
        "{name}-nf4-bs{blocksize}{}-{key:016x}",
        if double_quant { "-dq" } else { "" }
    ));
    if cached.join("config.json").exists() {
        let mut m = BaseModel::load(&cached, opts)?;
        m.source_dir = dir.to_path_buf();
        return Ok((m, CacheOutcome::Hit(cached)));
    }
    let m = BaseModel::load(dir, opts)?;
    save_quantized(&m, &cached)?;
    if opts.device.is_cuda() {
        // Quantizing on the GPU interleaves each projection's temporary bf16 upload
        // with the long-lived codes in the allocator's pool, and the freed gaps stay
        // reserved (7B: ~33 MiB per layer, 1 GiB in all, that trimming cannot return:
        // the pool releases only whole free chunks). Free everything, return it to the
        // device, and read the cache just written: its tensors are allocated back to
        // back, as on every later start (3-4 s for 7B; it also proves the cache loads).
        let device = opts.device.clone();
        drop(m);
        crate::base::trim_pool(&device)?;
        let m = BaseModel::load(&cached, opts)?;
        return Ok((m, CacheOutcome::Written(cached)));
    }
    Ok((m, CacheOutcome::Written(cached)))
}

/// Identifies a source model: its config and the names, sizes and mtimes of its
/// weight files, plus the quantization settings and cache format.
fn fingerprint(dir: &Path, blocksize: usize, double_quant: bool) -> Result<u64> {
    // FNV-1a: stable across runs and platforms, which std's hasher is not.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    feed(&CACHE_FORMAT.to_le_bytes());
    feed(&(blocksize as u64).to_le_bytes());
    feed(&[double_quant as u8]);
    let canonical = dir.canonicalize().map_err(|e| ModelError::io(dir, e))?;
    feed(canonical.to_string_lossy().as_bytes());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n == "config.json" || n.ends_with(".safetensors") || n.ends_with(".index.json")
        })
        .collect();
    files.sort();
    for f in files {
        let meta = std::fs::metadata(&f).map_err(|e| ModelError::io(&f, e))?;
        feed(f.file_name().unwrap().to_string_lossy().as_bytes());
        feed(&meta.len().to_le_bytes());
        if let Ok(t) = meta.modified() {
            if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
                feed(&d.as_nanos().to_le_bytes());
            }
        }
    }
    Ok(h)
}

/// The default cache root: `$QTRAIN_CACHE`, else `$XDG_CACHE_HOME/qtrain`, else
/// `~/.cache/qtrain`.
pub fn default_cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("QTRAIN_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("qtrain");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("qtrain")
}

/// Names of the bnb entries of projection `p` in layer `l` (for tests and tools).
pub fn bnb_entry_names(l: usize, p: Proj) -> Vec<String> {
    let w = p.weight_name(l);
    [
        "",
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        ".quant_state.bitsandbytes__nf4",
    ]
    .iter()
    .map(|s| format!("{w}{s}"))
    .collect()
}
