//! Loading HF model directories: sharded and single-file weights give the same model,
//! NF4 quantization while loading matches quantizing the tensor directly, the
//! bitsandbytes-format cache round-trips exactly, and every bad input is reported
//! with the file and the key.

use candle_core::{DType, Device, Tensor};
use qtrain_model::bnb::{self, CacheOutcome};
use qtrain_model::safetensors_io::{ShardedTensors, StreamingWriter, TensorSpec};
use qtrain_model::{
    BaseModel, FrozenStorage, LoadOptions, ModelConfig, Proj, Quantization, PROJECTIONS,
};
use std::path::Path;

/// A minimal but valid tokenizer.json (word level), enough for directory loading.
const TOKENIZER_JSON: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"<unk>":0,"a":1,"b":2},"unk_token":"<unk>"}}"#;

fn tiny_config() -> ModelConfig {
    let mut c = ModelConfig::preset("tiny", 96).unwrap();
    c.hidden_size = 64;
    c.head_dim = Some(16);
    c.intermediate_size = 160;
    c.num_hidden_layers = 2;
    c
}

fn write_model(dir: &Path, cfg: &ModelConfig, seed: u64, shard_bytes: usize) {
    qtrain_model::random::write_random_model(
        dir,
        cfg,
        seed,
        shard_bytes,
        TOKENIZER_JSON,
        &serde_json::json!({"bos_token": "<s>"}),
    )
    .unwrap();
}

fn dense_opts() -> LoadOptions {
    LoadOptions {
        quantization: Quantization::None,
        ..LoadOptions::cpu_f32()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn sharded_and_single_file_models_load_identically() {
    let cfg = tiny_config();
    let one = tempfile::tempdir().unwrap();
    let many = tempfile::tempdir().unwrap();
    write_model(one.path(), &cfg, 7, usize::MAX);
    // 20 KB shards: every layer spreads over several files.
    write_model(many.path(), &cfg, 7, 20_000);
    assert!(one.path().join("model.safetensors").exists());
    assert!(many.path().join("model.safetensors.index.json").exists());
    let n_shards = std::fs::read_dir(many.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("model-")
        })
        .count();
    assert!(n_shards >= 4, "expected several shards, got {n_shards}");

    let a = BaseModel::load(one.path(), &dense_opts()).unwrap();
    let b = BaseModel::load(many.path(), &dense_opts()).unwrap();
    assert_eq!(max_abs_diff(&a.embed_tokens, &b.embed_tokens), 0.0);
    assert_eq!(max_abs_diff(&a.lm_head, &b.lm_head), 0.0);
    let mut s = Vec::new();
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for p in PROJECTIONS {
            let wa = la.proj(p).weight(DType::F32, &Device::Cpu, &mut s).unwrap();
            let wb = lb.proj(p).weight(DType::F32, &Device::Cpu, &mut s).unwrap();
            assert_eq!(max_abs_diff(&wa, &wb), 0.0, "{p:?}");
        }
    }
    // Same seed, same bytes; a different seed, different weights.
    let other = tempfile::tempdir().unwrap();
    write_model(other.path(), &cfg, 8, usize::MAX);
    let c = BaseModel::load(other.path(), &dense_opts()).unwrap();
    assert!(max_abs_diff(&a.embed_tokens, &c.embed_tokens) > 0.01);
}

#[test]
fn random_weights_have_the_configured_statistics() {
    let cfg = tiny_config();
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &cfg, 1, usize::MAX);
    let st = ShardedTensors::open_model_dir(dir.path()).unwrap();
    let w = st
        .get(&Proj::Up.weight_name(1))
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let n = w.len() as f64;
    let mean = w.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 0.002, "mean {mean}");
    assert!((std - 0.02).abs() < 0.001, "std {std}");
    let norm = st.get("model.norm.weight").unwrap().to_f32_vec().unwrap();
    let nm = norm.iter().sum::<f32>() / norm.len() as f32;
    assert!((nm - 1.0).abs() < 0.05 && norm.iter().any(|&x| x != 1.0));
}

#[test]
fn nf4_load_quantizes_each_projection_like_the_reference() {
    let cfg = tiny_config();
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &cfg, 3, usize::MAX);
    let m = BaseModel::load(dir.path(), &LoadOptions::cpu_f32()).unwrap();
    let st = ShardedTensors::open_model_dir(dir.path()).unwrap();
    for (l, layer) in m.layers.iter().enumerate() {
        for p in PROJECTIONS {
            let src = st.get(&p.weight_name(l)).unwrap().to_f32_vec().unwrap();
            let want =
                qtrain_quant::Nf4Tensor::quantize(&src, &cfg.proj_shape(p), 64, true).unwrap();
            let FrozenStorage::Nf4(got) = &layer.proj(p).storage else {
                panic!("projection not quantized")
            };
            assert_eq!(got.packed, want.packed, "layer {l} {p:?}");
            // Dequantized weights are close to the source: NF4's error is bounded by
            // half the widest code gap times the block absmax (<= ~0.16 * absmax).
            let deq = got.dequantize_to_vec();
            let absmax = src.iter().fold(0f32, |a, &b| a.max(b.abs()));
            let err = src
                .iter()
                .zip(&deq)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(
                err <= 0.17 * absmax,
                "layer {l} {p:?}: err {err} absmax {absmax}"
            );
        }
    }
    // Storage per projection: 4-bit codes, one 8-bit absmax per 64 weights, one f32
    // per 256 absmax blocks, and the 256-entry nested map plus the offset.
    let expected: usize = PROJECTIONS
        .iter()
        .map(|&p| {
            let n: usize = cfg.proj_shape(p).iter().product();
            let blocks = n.div_ceil(64);
            n / 2 + blocks + 4 * blocks.div_ceil(256) + 4 * 256 + 4
        })
        .sum::<usize>()
        * cfg.num_hidden_layers;
    let nf4_bytes: usize = m
        .layers
        .iter()
        .flat_map(|l| l.projs.iter())
        .map(|p| p.storage_bytes())
        .sum();
    assert_eq!(nf4_bytes, expected);
}

#[test]
fn quantized_cache_round_trips_bit_exactly() {
    let cfg = tiny_config();
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    write_model(dir.path(), &cfg, 5, usize::MAX);
    let opts = LoadOptions::cpu_f32();
    let (first, outcome) = bnb::load_cached(dir.path(), &opts, cache.path()).unwrap();
    let CacheOutcome::Written(cached_dir) = outcome else {
        panic!("first load should write the cache, got {outcome:?}")
    };
    // The cache directory is a complete bitsandbytes pre-quantized HF model.
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cached_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg_json["quantization_config"]["quant_method"],
        "bitsandbytes"
    );
    assert_eq!(
        cfg_json["quantization_config"]["bnb_4bit_quant_type"],
        "nf4"
    );
    assert_eq!(
        cfg_json["quantization_config"]["bnb_4bit_use_double_quant"],
        true
    );
    assert!(cached_dir.join("tokenizer.json").exists());
    let st = ShardedTensors::open_model_dir(&cached_dir).unwrap();
    for name in bnb::bnb_entry_names(1, Proj::O) {
        assert!(st.contains(&name), "missing {name}");
    }
    let packed = st.get(&Proj::O.weight_name(1)).unwrap();
    assert_eq!(packed.dtype, safetensors::Dtype::U8);
    assert_eq!(packed.shape, &[64 * 64 / 2, 1]);

    let (second, outcome) = bnb::load_cached(dir.path(), &opts, cache.path()).unwrap();
    assert_eq!(outcome, CacheOutcome::Hit(cached_dir));
    assert_eq!(second.source_dir, dir.path());
    assert_eq!(max_abs_diff(&first.embed_tokens, &second.embed_tokens), 0.0);
    assert_eq!(max_abs_diff(&first.norm, &second.norm), 0.0);
    let mut s = Vec::new();
    for (la, lb) in first.layers.iter().zip(&second.layers) {
        assert_eq!(max_abs_diff(&la.input_layernorm, &lb.input_layernorm), 0.0);
        for p in PROJECTIONS {
            let (FrozenStorage::Nf4(qa), FrozenStorage::Nf4(qb)) =
                (&la.proj(p).storage, &lb.proj(p).storage)
            else {
                panic!("not nf4")
            };
            assert_eq!(qa.packed, qb.packed);
            assert_eq!(qa.absmax_f32(), qb.absmax_f32());
            let wa = la.proj(p).weight(DType::F32, &Device::Cpu, &mut s).unwrap();
            let wb = lb.proj(p).weight(DType::F32, &Device::Cpu, &mut s).unwrap();
            assert_eq!(max_abs_diff(&wa, &wb), 0.0);
        }
    }
}

// ---- bad inputs: each error names the file and the key ----

fn err_of(dir: &Path) -> String {
    match BaseModel::load(dir, &dense_opts()) {
        Ok(_) => panic!("loading {dir:?} should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_weights_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &tiny_config(), 1, usize::MAX);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = err_of(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
}

#[test]
fn missing_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = err_of(dir.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn malformed_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &tiny_config(), 1, usize::MAX);
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"mistral\",",
    )
    .unwrap();
    let e = err_of(dir.path());
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &tiny_config(), 1, usize::MAX);
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"mistral\"", "\"falcon\"");
    std::fs::write(&p, text).unwrap();
    let e = err_of(dir.path());
    assert!(
        e.contains("falcon") && e.contains("config.json") && e.contains("not supported"),
        "{e}"
    );
}

/// Rewrites the model's single safetensors file with one tensor changed.
fn rewrite_weights(dir: &Path, edit: impl Fn(&str, &[usize]) -> Option<Vec<usize>>) {
    let path = dir.join("model.safetensors");
    let st = ShardedTensors::open(std::slice::from_ref(&path)).unwrap();
    let names: Vec<String> = st.names().iter().map(|s| s.to_string()).collect();
    let mut specs = Vec::new();
    let mut datas = Vec::new();
    for n in &names {
        let t = st.get(n).unwrap();
        match edit(n, t.shape) {
            Some(shape) if shape.is_empty() => continue, // drop the tensor
            Some(shape) => {
                let len = shape.iter().product::<usize>() * 2;
                specs.push(TensorSpec::new(n.clone(), t.dtype, &shape));
                datas.push(vec![0u8; len]);
            }
            None => {
                specs.push(TensorSpec::new(n.clone(), t.dtype, t.shape));
                datas.push(t.bytes.to_vec());
            }
        }
    }
    drop(st);
    let out = dir.join("rewritten.safetensors");
    let mut w = StreamingWriter::create(&out, specs, None).unwrap();
    for d in &datas {
        w.write_next(d).unwrap();
    }
    w.finish().unwrap();
    std::fs::rename(out, path).unwrap();
}

#[test]
fn wrong_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &tiny_config(), 1, usize::MAX);
    let target = Proj::K.weight_name(1);
    rewrite_weights(dir.path(), |n, _| (n == target).then(|| vec![16, 64]));
    let e = err_of(dir.path());
    assert!(
        e.contains("model.layers.1.self_attn.k_proj.weight")
            && e.contains("model.safetensors")
            && e.contains("[16, 64]")
            && e.contains("[32, 64]"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &tiny_config(), 1, usize::MAX);
    rewrite_weights(dir.path(), |n, _| {
        (n == "model.layers.0.mlp.down_proj.weight").then(Vec::new)
    });
    let e = err_of(dir.path());
    assert!(
        e.contains("model.layers.0.mlp.down_proj.weight")
            && e.contains("model.safetensors")
            && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn shard_index_pointing_at_missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &tiny_config(), 1, 20_000);
    let p = dir.path().join("model.safetensors.index.json");
    let mut idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let first = idx["weight_map"]["model.embed_tokens.weight"].clone();
    idx["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first;
    std::fs::write(&p, idx.to_string()).unwrap();
    let e = err_of(dir.path());
    assert!(e.contains("model.layers.9.mlp.up_proj.weight"), "{e}");
}

// ---- families: biases, q/k norms, tied embeddings through loading and the cache ----

/// `preset` read back through config.json with a small vocabulary.
fn family_config(preset: &str) -> ModelConfig {
    let c = ModelConfig::preset(preset, 96).unwrap();
    ModelConfig::from_json_str(
        &serde_json::to_string(&c.to_json()).unwrap(),
        Path::new("config.json"),
    )
    .unwrap()
}

#[test]
fn family_tensors_load_and_survive_the_quantized_cache() {
    for preset in ["tiny-qwen2", "tiny-qwen3", "tiny-llama3"] {
        let cfg = family_config(preset);
        let dir = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        write_model(dir.path(), &cfg, 8, usize::MAX);
        let st = ShardedTensors::open_model_dir(dir.path()).unwrap();
        // Tied models are written without lm_head, as transformers saves them.
        assert_eq!(
            st.contains("lm_head.weight"),
            !cfg.tie_word_embeddings,
            "{preset}"
        );
        let opts = LoadOptions::cpu_f32();
        let (first, _) = bnb::load_cached(dir.path(), &opts, cache.path()).unwrap();
        let (second, outcome) = bnb::load_cached(dir.path(), &opts, cache.path()).unwrap();
        assert!(
            matches!(outcome, CacheOutcome::Hit(_)),
            "{preset}: {outcome:?}"
        );
        if cfg.tie_word_embeddings {
            assert_eq!(max_abs_diff(&second.lm_head, &second.embed_tokens), 0.0);
        }
        let mut biases = 0;
        for (l, (la, lb)) in first.layers.iter().zip(&second.layers).enumerate() {
            for p in PROJECTIONS {
                match (&la.proj(p).bias, &lb.proj(p).bias) {
                    (Some(a), Some(b)) => {
                        assert!(cfg.proj_has_bias(p));
                        assert_eq!(a.dims(), &[cfg.proj_shape(p)[0]]);
                        assert_eq!(max_abs_diff(a, b), 0.0, "{preset} layer {l} {p:?} bias");
                        // Stored bf16 values, not zeros.
                        assert!(
                            a.abs()
                                .unwrap()
                                .sum_all()
                                .unwrap()
                                .to_scalar::<f32>()
                                .unwrap()
                                > 0.0
                        );
                        biases += 1;
                    }
                    (None, None) => assert!(!cfg.proj_has_bias(p)),
                    _ => panic!("{preset}: the cache lost or invented a bias"),
                }
            }
            for (a, b) in [(&la.q_norm, &lb.q_norm), (&la.k_norm, &lb.k_norm)] {
                assert_eq!(a.is_some(), cfg.has_qk_norm(), "{preset}");
                if let (Some(a), Some(b)) = (a, b) {
                    assert_eq!(a.dims(), &[cfg.head_dim()]);
                    assert_eq!(max_abs_diff(a, b), 0.0);
                }
            }
        }
        let want = if preset == "tiny-qwen2" {
            3 * cfg.num_hidden_layers
        } else {
            0
        };
        assert_eq!(biases, want, "{preset}");
    }
}

#[test]
fn tensors_the_family_does_not_use_are_refused_by_name() {
    // A Llama checkpoint with q/k/v biases but a config without attention_bias.
    let qwen = family_config("tiny-qwen2");
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &qwen, 1, usize::MAX);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    json["model_type"] = "llama".into();
    std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
    let e = err_of(dir.path());
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.bias") && e.contains("attention_bias"),
        "{e}"
    );
    // Qwen 3's norms under a Qwen 2 config.
    let q3 = family_config("tiny-qwen3");
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &q3, 1, usize::MAX);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    json["model_type"] = "mistral".into();
    std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
    let e = err_of(dir.path());
    assert!(e.contains("k_norm.weight") && e.contains("mistral"), "{e}");
}
