//! Merged full-model export: the source model with `W + scale * B @ A` in place of
//! every adapted projection, as bf16 Hugging Face safetensors shards with config and
//! tokenizer, loadable by transformers and vLLM without PEFT.
//!
//! The export streams: tensors are read from the memory-mapped source one at a time,
//! merged in f32 and written out, so memory holds one projection, not the model.
//! The merge base is either the original weights (what users usually ship) or the
//! NF4 round trip of them (exactly the base the adapter was trained against).

use crate::peft::PeftAdapter;
use qtrain_lora::lora::HostTensor;
use qtrain_model::safetensors_io::{
    f32_to_bf16_bytes, ShardedTensors, StreamingWriter, TensorSpec,
};
use qtrain_model::{ModelConfig, Proj, PROJECTIONS};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeBase {
    Original,
    Dequantized,
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Model(#[from] qtrain_model::ModelError),
    #[error("{0}")]
    Adapter(String),
}

/// `w += scale * b @ a` with `w: [out, in]`, `b: [out, r]`, `a: [r, in]`, in f32.
pub fn add_lora(w: &mut [f32], a: &[f32], b: &[f32], out: usize, r: usize, inp: usize, scale: f32) {
    assert_eq!(w.len(), out * inp);
    assert_eq!(a.len(), r * inp);
    assert_eq!(b.len(), out * r);
    for o in 0..out {
        let row = &mut w[o * inp..(o + 1) * inp];
        for k in 0..r {
            let c = scale * b[o * r + k];
            if c == 0.0 {
                continue;
            }
            for (x, &y) in row.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                *x += c * y;
            }
        }
    }
}

/// Writes the merged model into `out_dir`.
pub fn export_merged(
    source_dir: &Path,
    adapter: &PeftAdapter,
    out_dir: &Path,
    base: MergeBase,
    max_shard_bytes: usize,
) -> Result<(), MergeError> {
    let cfg = ModelConfig::from_file(&source_dir.join("config.json"))?;
    let st = ShardedTensors::open_model_dir(source_dir)?;
    let s = &adapter.settings;
    let scale = if s.rslora {
        s.alpha / (s.rank as f64).sqrt()
    } else {
        s.alpha / s.rank as f64
    } as f32;
    let lora: HashMap<&str, &HostTensor> =
        adapter.tensors.iter().map(|t| (t.0.as_str(), t)).collect();
    std::fs::create_dir_all(out_dir).map_err(|e| qtrain_model::ModelError::Io {
        path: out_dir.to_path_buf(),
        source: e,
    })?;

    // The dense tensors of the output: every source tensor that is not a piece of
    // bitsandbytes quant state (pre-quantized sources carry those next to weights).
    let prequant = cfg.is_prequantized();
    let is_proj = |n: &str| -> Option<(usize, Proj)> {
        (0..cfg.num_hidden_layers).find_map(|l| {
            PROJECTIONS
                .iter()
                .find(|p| p.weight_name(l) == n)
                .map(|&p| (l, p))
        })
    };
    let names: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !prequant || is_proj(n).is_some() || !n.contains(".weight."))
        .map(String::from)
        .collect();
    let shape_of = |n: &str| -> Result<Vec<usize>, MergeError> {
        Ok(match is_proj(n) {
            Some((_, p)) => cfg.proj_shape(p).to_vec(),
            None => st.get(n)?.shape.to_vec(),
        })
    };
    // Shards in name order, greedy by size (bf16).
    let mut shards: Vec<Vec<String>> = vec![Vec::new()];
    let mut size = 0usize;
    for n in &names {
        let bytes = shape_of(n)?.iter().product::<usize>() * 2;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("shard").push(n.clone());
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    let mut buf = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        let specs = shard
            .iter()
            .map(|n| {
                Ok(TensorSpec::new(
                    n.clone(),
                    safetensors::Dtype::BF16,
                    &shape_of(n)?,
                ))
            })
            .collect::<Result<Vec<_>, MergeError>>()?;
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let mut w = StreamingWriter::create(&out_dir.join(&file), specs, Some(meta))?;
        for n in shard {
            let mut v = match is_proj(n) {
                Some(_) if prequant => qtrain_model::bnb::read_nf4(&st, n)?.dequantize_to_vec(),
                _ => st.get(n)?.to_f32_vec()?,
            };
            if let Some((l, p)) = is_proj(n) {
                if base == MergeBase::Dequantized && !prequant {
                    let shape = cfg.proj_shape(p);
                    v = qtrain_quant::Nf4Tensor::quantize(&v, &shape, 64, true)
                        .map_err(|e| MergeError::Adapter(format!("{n}: {e}")))?
                        .dequantize_to_vec();
                }
                let a = lora.get(format!("layers.{l}.{}.lora_A", p.name()).as_str());
                let b = lora.get(format!("layers.{l}.{}.lora_B", p.name()).as_str());
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let [out, inp] = cfg.proj_shape(p);
                        if a.2 != [s.rank, inp] || b.2 != [out, s.rank] {
                            return Err(MergeError::Adapter(format!(
                                "layer {l} {}: adapter shapes A {:?} B {:?} do not fit the weight [{out}, {inp}] at r = {}",
                                p.name(), a.2, b.2, s.rank
                            )));
                        }
                        add_lora(&mut v, &a.1, &b.1, out, s.rank, inp, scale);
                    }
                    (None, None) => {}
                    _ => {
                        return Err(MergeError::Adapter(format!(
                            "layer {l} {}: the adapter has only one of lora_A, lora_B",
                            p.name()
                        )))
                    }
                }
            }
            f32_to_bf16_bytes(&v, &mut buf);
            w.write_next(&buf)?;
            weight_map.insert(n.clone(), file.clone().into());
            total += buf.len();
        }
        w.finish()?;
    }
    if count > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            out_dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).expect("json"),
        )
        .map_err(|e| qtrain_model::ModelError::Io {
            path: out_dir.join("model.safetensors.index.json"),
            source: e,
        })?;
    }
    qtrain_model::bnb::copy_tokenizer_files(source_dir, out_dir)?;
    let mut json = cfg.to_json();
    let obj = json.as_object_mut().expect("object");
    obj.remove("quantization_config");
    obj.insert("torch_dtype".into(), "bfloat16".into());
    let cpath = out_dir.join("config.json");
    std::fs::write(&cpath, serde_json::to_string_pretty(&json).expect("json")).map_err(|e| {
        qtrain_model::ModelError::Io {
            path: cpath,
            source: e,
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::PeftSettings;

    const TOK: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"<unk>":0,"a":1},"unk_token":"<unk>"}}"#;

    #[test]
    fn add_lora_matches_naive() {
        let (o, r, i) = (3, 2, 4);
        let a: Vec<f32> = (0..r * i).map(|x| x as f32 * 0.1).collect();
        let b: Vec<f32> = (0..o * r).map(|x| 1.0 - x as f32 * 0.3).collect();
        let mut w = vec![1.0f32; o * i];
        add_lora(&mut w, &a, &b, o, r, i, 2.0);
        for oo in 0..o {
            for ii in 0..i {
                let want = 1.0 + 2.0 * (0..r).map(|k| b[oo * r + k] * a[k * i + ii]).sum::<f32>();
                assert!((w[oo * i + ii] - want).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn merged_export_applies_adapter_and_copies_the_rest() {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut cfg = ModelConfig::preset("tiny", 64).unwrap();
        cfg.hidden_size = 32;
        cfg.head_dim = Some(8);
        cfg.intermediate_size = 48;
        cfg.num_hidden_layers = 2;
        qtrain_model::random::write_random_model(
            src.path(),
            &cfg,
            1,
            usize::MAX,
            TOK,
            &serde_json::json!({}),
        )
        .unwrap();
        let r = 2;
        let [qo, qi] = cfg.proj_shape(Proj::Q);
        let a: Vec<f32> = (0..r * qi).map(|x| (x % 7) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..qo * r).map(|x| (x % 5) as f32 * 0.02 - 0.04).collect();
        let adapter = PeftAdapter {
            settings: PeftSettings {
                rank: r,
                alpha: 4.0,
                dropout: 0.0,
                targets: vec![Proj::Q],
                rslora: false,
                base_model: "x".into(),
            },
            tensors: vec![
                ("layers.1.q_proj.lora_A".into(), a.clone(), vec![r, qi]),
                ("layers.1.q_proj.lora_B".into(), b.clone(), vec![qo, r]),
            ],
        };
        export_merged(
            src.path(),
            &adapter,
            out.path(),
            MergeBase::Original,
            30_000,
        )
        .unwrap();
        assert!(
            out.path().join("model.safetensors.index.json").exists(),
            "sharded"
        );
        let s_in = ShardedTensors::open_model_dir(src.path()).unwrap();
        let s_out = ShardedTensors::open_model_dir(out.path()).unwrap();
        // Untouched tensors are byte-identical (the source is bf16 already).
        for n in [
            "model.embed_tokens.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
        ] {
            let same = s_in.get(n).unwrap().bytes == s_out.get(n).unwrap().bytes;
            assert_eq!(same, n != "model.layers.1.self_attn.q_proj.weight", "{n}");
        }
        let w0 = s_in
            .get("model.layers.1.self_attn.q_proj.weight")
            .unwrap()
            .to_f32_vec()
            .unwrap();
        let w1 = s_out
            .get("model.layers.1.self_attn.q_proj.weight")
            .unwrap()
            .to_f32_vec()
            .unwrap();
        for (o, i) in [(0, 0), (5, 17), (qo - 1, qi - 1)] {
            let delta = 2.0 * (0..r).map(|k| b[o * r + k] * a[k * qi + i]).sum::<f32>();
            let want = half::bf16::from_f32(w0[o * qi + i] + delta).to_f32();
            assert_eq!(w1[o * qi + i], want, "({o}, {i})");
        }
        assert!(out.path().join("tokenizer.json").exists());
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        assert!(c.get("quantization_config").is_none());

        // Dequantized base: the projection equals the NF4 round trip plus the delta.
        let out2 = tempfile::tempdir().unwrap();
        export_merged(
            src.path(),
            &adapter,
            out2.path(),
            MergeBase::Dequantized,
            usize::MAX,
        )
        .unwrap();
        let s2 = ShardedTensors::open_model_dir(out2.path()).unwrap();
        let k0 = s_in
            .get("model.layers.0.self_attn.k_proj.weight")
            .unwrap()
            .to_f32_vec()
            .unwrap();
        let rt = qtrain_quant::Nf4Tensor::quantize(&k0, &cfg.proj_shape(Proj::K), 64, true)
            .unwrap()
            .dequantize_to_vec();
        let k2 = s2
            .get("model.layers.0.self_attn.k_proj.weight")
            .unwrap()
            .to_f32_vec()
            .unwrap();
        assert!(k2
            .iter()
            .zip(&rt)
            .all(|(x, y)| *x == half::bf16::from_f32(*y).to_f32()));
    }
}
