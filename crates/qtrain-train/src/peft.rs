//! PEFT adapters on disk: `adapter_config.json` + `adapter_model.safetensors` with
//! PEFT's tensor names, e.g.
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, which HF PEFT's
//! `PeftModel.from_pretrained` loads as is. Inside qtrain the same tensors are named
//! `layers.0.q_proj.lora_A` (see `qtrain_lora::tensor_name`).

use qtrain_lora::lora::HostTensor;
use qtrain_model::safetensors_io::{ShardedTensors, StreamingWriter, TensorSpec};
use qtrain_model::Proj;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: key `{key}`: {msg}")]
    Config {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("{path}: tensor `{name}`: {msg}")]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    #[error(transparent)]
    Model(#[from] qtrain_model::ModelError),
}

/// The adapter hyper-parameters PEFT records.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftSettings {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Proj>,
    pub rslora: bool,
    pub base_model: String,
}

/// An adapter in qtrain's names: `(layers.{l}.{proj}.lora_A|lora_B, values, shape)`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapter {
    pub settings: PeftSettings,
    pub tensors: Vec<HostTensor>,
}

/// Element type of the written tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftDtype {
    F32,
    Bf16,
    F16,
}

/// `layers.3.q_proj.lora_A` → `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
pub fn to_peft_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (proj, part) = rest.split_once('.')?;
    let p = Proj::from_name(proj)?;
    if part != "lora_A" && part != "lora_B" {
        return None;
    }
    layer.parse::<usize>().ok()?;
    Some(format!(
        "base_model.model.model.layers.{layer}.{}.{proj}.{part}.weight",
        p.parent()
    ))
}

/// The inverse of [`to_peft_name`].
pub fn from_peft_name(name: &str) -> Option<String> {
    let rest = name
        .strip_prefix("base_model.model.model.layers.")?
        .strip_suffix(".weight")?;
    let mut it = rest.split('.');
    let (layer, parent, proj, part) = (it.next()?, it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    let p = Proj::from_name(proj)?;
    if p.parent() != parent || (part != "lora_A" && part != "lora_B") {
        return None;
    }
    layer.parse::<usize>().ok()?;
    Some(format!("layers.{layer}.{proj}.{part}"))
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
pub fn write_peft_adapter(
    dir: &Path,
    tensors: &[HostTensor],
    s: &PeftSettings,
    dtype: PeftDtype,
) -> Result<(), PeftError> {
    std::fs::create_dir_all(dir).map_err(|e| PeftError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let wpath = dir.join(WEIGHTS_FILE);
    let st_dtype = match dtype {
        PeftDtype::F32 => safetensors::Dtype::F32,
        PeftDtype::Bf16 => safetensors::Dtype::BF16,
        PeftDtype::F16 => safetensors::Dtype::F16,
    };
    let mut specs = Vec::with_capacity(tensors.len());
    for (name, _, shape) in tensors {
        let peft = to_peft_name(name).ok_or_else(|| PeftError::Tensor {
            path: wpath.clone(),
            name: name.clone(),
            msg: "not a qtrain LoRA tensor name (layers.N.PROJ.lora_A|lora_B)".into(),
        })?;
        specs.push(TensorSpec::new(peft, st_dtype, shape));
    }
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut w = StreamingWriter::create(&wpath, specs, Some(meta))?;
    for (_, v, _) in tensors {
        let bytes: Vec<u8> = match dtype {
            PeftDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            PeftDtype::Bf16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            PeftDtype::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
        };
        w.write_next(&bytes)?;
    }
    w.finish()?;
    let mut targets: Vec<&str> = s.targets.iter().map(|p| p.name()).collect();
    targets.sort();
    let config = serde_json::json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": s.base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": s.alpha,
        "lora_dropout": s.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": s.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": s.rslora,
    });
    crate::ckpt_io::write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&config)
            .expect("json")
            .as_bytes(),
    )
    .map_err(|e| PeftError::Io {
        path: dir.join(CONFIG_FILE),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Reads a PEFT LoRA adapter (f32, bf16 or f16 tensors).
pub fn read_peft_adapter(dir: &Path) -> Result<PeftAdapter, PeftError> {
    let cpath = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cpath).map_err(|e| PeftError::Io {
        path: cpath.clone(),
        source: e,
    })?;
    let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| PeftError::Config {
        path: cpath.clone(),
        key: "(file)".into(),
        msg: format!("not JSON: {e}"),
    })?;
    let bad = |key: &str, msg: &str| PeftError::Config {
        path: cpath.clone(),
        key: key.into(),
        msg: msg.into(),
    };
    if cfg.get("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
        return Err(bad("peft_type", "missing or not LORA"));
    }
    let rank = cfg
        .get("r")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("r", "missing or not an integer"))? as usize;
    let alpha = cfg
        .get("lora_alpha")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| bad("lora_alpha", "missing or not a number"))?;
    let dropout = cfg
        .get("lora_dropout")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    let rslora = cfg
        .get("use_rslora")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let targets = match cfg.get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .and_then(Proj::from_name)
                    .ok_or_else(|| bad("target_modules", &format!("unsupported module {t}")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(bad("target_modules", "missing or not a list")),
    };
    let base_model = cfg
        .get("base_model_name_or_path")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let wpath = dir.join(WEIGHTS_FILE);
    let st = ShardedTensors::open(std::slice::from_ref(&wpath))?;
    let mut tensors = Vec::new();
    for peft in st.names() {
        let name = from_peft_name(peft).ok_or_else(|| PeftError::Tensor {
            path: wpath.clone(),
            name: peft.to_string(),
            msg: "not a LoRA weight of a supported projection".into(),
        })?;
        let t = st.get(peft)?;
        let shape = t.shape.to_vec();
        let ok = shape.len() == 2
            && if name.ends_with("lora_A") {
                shape[0] == rank
            } else {
                shape[1] == rank
            };
        if !ok {
            return Err(PeftError::Tensor {
                path: wpath.clone(),
                name: peft.to_string(),
                msg: format!("shape {shape:?} does not fit r = {rank}"),
            });
        }
        tensors.push((name, t.to_f32_vec()?, shape));
    }
    Ok(PeftAdapter {
        settings: PeftSettings {
            rank,
            alpha,
            dropout,
            targets,
            rslora,
            base_model,
        },
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<HostTensor>, PeftSettings) {
        let t = vec![
            (
                "layers.0.q_proj.lora_A".to_string(),
                (0..8).map(|i| i as f32 * 0.1).collect(),
                vec![2, 4],
            ),
            (
                "layers.0.q_proj.lora_B".to_string(),
                (0..6).map(|i| -(i as f32) * 0.01).collect(),
                vec![3, 2],
            ),
            (
                "layers.1.down_proj.lora_A".to_string(),
                vec![0.5; 10],
                vec![2, 5],
            ),
            (
                "layers.1.down_proj.lora_B".to_string(),
                vec![0.25; 8],
                vec![4, 2],
            ),
        ];
        let s = PeftSettings {
            rank: 2,
            alpha: 4.0,
            dropout: 0.05,
            targets: vec![Proj::Q, Proj::Down],
            rslora: false,
            base_model: "org/model".into(),
        };
        (t, s)
    }

    #[test]
    fn names_follow_peft() {
        assert_eq!(
            to_peft_name("layers.0.q_proj.lora_A").unwrap(),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            to_peft_name("layers.31.gate_proj.lora_B").unwrap(),
            "base_model.model.model.layers.31.mlp.gate_proj.lora_B.weight"
        );
        assert_eq!(
            from_peft_name("base_model.model.model.layers.31.mlp.gate_proj.lora_B.weight").unwrap(),
            "layers.31.gate_proj.lora_B"
        );
        assert!(
            from_peft_name("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight").is_none()
        );
        assert!(to_peft_name("layers.x.q_proj.lora_A").is_none());
    }

    #[test]
    fn round_trips_and_writes_peft_config() {
        let (t, s) = sample();
        let dir = tempfile::tempdir().unwrap();
        write_peft_adapter(dir.path(), &t, &s, PeftDtype::F32).unwrap();
        let back = read_peft_adapter(dir.path()).unwrap();
        assert_eq!(
            back.settings,
            PeftSettings {
                targets: vec![Proj::Down, Proj::Q],
                ..s.clone()
            }
        );
        let mut want = t.clone();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        let mut got = back.tensors.clone();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap())
                .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["task_type"], "CAUSAL_LM");
        assert_eq!(cfg["r"], 2);
        assert_eq!(
            cfg["target_modules"],
            serde_json::json!(["down_proj", "q_proj"])
        );
        let st = ShardedTensors::open(&[dir.path().join(WEIGHTS_FILE)]).unwrap();
        assert!(st.contains("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"));
    }

    #[test]
    fn bf16_export_rounds_values() {
        let (t, s) = sample();
        let dir = tempfile::tempdir().unwrap();
        write_peft_adapter(dir.path(), &t, &s, PeftDtype::Bf16).unwrap();
        let back = read_peft_adapter(dir.path()).unwrap();
        for (name, v, _) in &t {
            let (_, g, _) = back.tensors.iter().find(|x| &x.0 == name).unwrap();
            for (a, b) in v.iter().zip(g) {
                assert_eq!(*b, half::bf16::from_f32(*a).to_f32());
            }
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let (t, s) = sample();
        let dir = tempfile::tempdir().unwrap();
        write_peft_adapter(dir.path(), &t, &s, PeftDtype::F32).unwrap();
        let p = dir.path().join(CONFIG_FILE);
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"r\": 2,", "");
        std::fs::write(&p, text).unwrap();
        let e = read_peft_adapter(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains("`r`"),
            "{e}"
        );
        let e = write_peft_adapter(
            dir.path(),
            &[("weird".into(), vec![1.0], vec![1])],
            &s,
            PeftDtype::F32,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("weird"), "{e}");
    }
}
