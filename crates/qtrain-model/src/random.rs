//! Seeded random models in Hugging Face's directory layout.
//!
//! No hub is reachable from our build and test machines, so tests and GPU benchmarks
//! get their models here: real shapes, weights drawn like HF's `_init_weights`
//! (normal with `initializer_range`), norms near one, written as bf16 safetensors
//! shards with an index, `config.json`, `generation_config.json` and the tokenizer
//! files the caller provides. Every tensor is generated and written on its own, in
//! chunks with independent seeded streams, so a 14.5 GB model needs little memory
//! and the bytes do not depend on the number of threads.

use crate::bnb::write_json_atomic;
use crate::config::{qk_norm_names, ModelConfig, PROJECTIONS};
use crate::error::{ModelError, Result};
use crate::safetensors_io::{StreamingWriter, TensorSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use safetensors::Dtype;
use std::path::Path;

/// Elements per independently seeded chunk.
const CHUNK: usize = 1 << 20;

/// How the values of a tensor are drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    Normal {
        std: f32,
    },
    /// 1 + N(0, std): norms start near one but not exactly, so a test catches a
    /// forward pass that forgets to multiply by the norm weight.
    NearOne {
        std: f32,
    },
}

/// The tensors of a model in the order HF writes them, with their init.
fn tensor_plan(cfg: &ModelConfig) -> Vec<(TensorSpec, Init)> {
    let h = cfg.hidden_size;
    let std = cfg.initializer_range as f32;
    let mut plan = vec![(
        TensorSpec::new(
            "model.embed_tokens.weight",
            Dtype::BF16,
            &[cfg.vocab_size, h],
        ),
        Init::Normal { std },
    )];
    for l in 0..cfg.num_hidden_layers {
        plan.push((
            TensorSpec::new(
                format!("model.layers.{l}.input_layernorm.weight"),
                Dtype::BF16,
                &[h],
            ),
            Init::NearOne { std: 0.05 },
        ));
        for p in PROJECTIONS {
            plan.push((
                TensorSpec::new(p.weight_name(l), Dtype::BF16, &cfg.proj_shape(p)),
                Init::Normal { std },
            ));
            // HF initializes biases to zero; random ones make a test notice a forward
            // that forgets them. Their scale is that of the projections' outputs
            // (std ≈ initializer_range · sqrt(in), 0.16 on the tiny presets), not far
            // above it: with std 0.5, v was nearly the same row for every token, so
            // attention hardly depended on q and k, their LoRA gradients were ~1e-5
            // and, in bf16, mostly rounding (the doctor's bf16 step checks of the
            // reference and of the engine on tiny-qwen2 compared noise and failed).
            if cfg.proj_has_bias(p) {
                plan.push((
                    TensorSpec::new(p.bias_name(l), Dtype::BF16, &[cfg.proj_shape(p)[0]]),
                    Init::Normal { std: 0.1 },
                ));
            }
        }
        if cfg.has_qk_norm() {
            for name in qk_norm_names(l) {
                plan.push((
                    TensorSpec::new(name, Dtype::BF16, &[cfg.head_dim()]),
                    Init::NearOne { std: 0.05 },
                ));
            }
        }
        plan.push((
            TensorSpec::new(
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                Dtype::BF16,
                &[h],
            ),
            Init::NearOne { std: 0.05 },
        ));
    }
    plan.push((
        TensorSpec::new("model.norm.weight", Dtype::BF16, &[h]),
        Init::NearOne { std: 0.05 },
    ));
    if !cfg.tie_word_embeddings {
        plan.push((
            TensorSpec::new("lm_head.weight", Dtype::BF16, &[cfg.vocab_size, h]),
            Init::Normal { std },
        ));
    }
    plan
}

/// A stable 64-bit seed for one chunk of one tensor.
fn chunk_seed(seed: u64, name: &str, chunk: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.rotate_left(17);
    for &b in name.as_bytes().iter().chain(&(chunk as u64).to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Fills `out` (bf16 little-endian, 2 bytes per element) with the tensor's values.
fn generate_bf16(seed: u64, spec: &TensorSpec, init: Init, out: &mut [u8], threads: usize) {
    let n = out.len() / 2;
    let chunks: Vec<(usize, &mut [u8])> = out.chunks_mut(CHUNK * 2).enumerate().collect();
    let per_thread = chunks.len().div_ceil(threads.max(1)).max(1);
    let mut chunks = chunks;
    std::thread::scope(|s| {
        while !chunks.is_empty() {
            let take = per_thread.min(chunks.len());
            let mine: Vec<(usize, &mut [u8])> = chunks.drain(..take).collect();
            s.spawn(move || {
                for (ci, bytes) in mine {
                    let mut rng = ChaCha8Rng::seed_from_u64(chunk_seed(seed, &spec.name, ci));
                    for c in bytes.chunks_exact_mut(2) {
                        let z: f32 = rng.sample(StandardNormal);
                        let v = match init {
                            Init::Normal { std } => z * std,
                            Init::NearOne { std } => 1.0 + z * std,
                        };
                        c.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                    }
                }
            });
        }
    });
    debug_assert_eq!(n, spec.shape.iter().product::<usize>());
}

/// Writes a random model for `cfg` into `out_dir`, split into shards of at most
/// `max_shard_bytes` (a single `model.safetensors` when everything fits in one).
/// `tokenizer_json` and `tokenizer_config` are written beside the weights.
pub fn write_random_model(
    out_dir: &Path,
    cfg: &ModelConfig,
    seed: u64,
    max_shard_bytes: usize,
    tokenizer_json: &str,
    tokenizer_config: &serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(out_dir).map_err(|e| ModelError::io(out_dir, e))?;
    let plan = tensor_plan(cfg);
    // Greedy split into shards in file order, the way HF's save_pretrained does.
    let mut shards: Vec<Vec<(TensorSpec, Init)>> = vec![Vec::new()];
    let mut size = 0usize;
    for item in plan {
        let len = item.0.byte_len();
        if size > 0 && size + len > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += len;
        shards.last_mut().expect("non-empty").push(item);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n_shards = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    let mut buf = Vec::new();
    for (si, shard) in shards.into_iter().enumerate() {
        let file = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n_shards)
        };
        let specs: Vec<TensorSpec> = shard.iter().map(|(s, _)| s.clone()).collect();
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let mut w = StreamingWriter::create(&out_dir.join(&file), specs, Some(meta))?;
        for (spec, init) in &shard {
            buf.resize(spec.byte_len(), 0);
            generate_bf16(seed, spec, *init, &mut buf, threads);
            w.write_next(&buf)?;
            weight_map.insert(spec.name.clone(), file.clone().into());
            total += spec.byte_len();
        }
        w.finish()?;
    }
    if n_shards > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        write_json_atomic(&out_dir.join("model.safetensors.index.json"), &index)?;
    }
    let tok_path = out_dir.join("tokenizer.json");
    std::fs::write(&tok_path, tokenizer_json).map_err(|e| ModelError::io(&tok_path, e))?;
    write_json_atomic(&out_dir.join("tokenizer_config.json"), tokenizer_config)?;
    write_json_atomic(
        &out_dir.join("generation_config.json"),
        &serde_json::json!({
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "_from_model_config": true,
        }),
    )?;
    // config.json last: a directory with a config is a complete model.
    let mut json = cfg.to_json();
    let obj = json.as_object_mut().expect("object");
    obj.insert(
        "architectures".into(),
        serde_json::json!([cfg.family().architecture()]),
    );
    obj.insert("torch_dtype".into(), "bfloat16".into());
    obj.insert("qtrain_random_seed".into(), seed.into());
    write_json_atomic(&out_dir.join("config.json"), &json)
}
