//! PEFT LoRA adapters on disk: this module owns the `adapter_config.json` format, the
//! mapping between qtrain's tensor names and PEFT's, and the checks on adapters read
//! from elsewhere.
//!
//! A directory holds `adapter_config.json` + `adapter_model.safetensors` with PEFT's
//! tensor names, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`,
//! which HF PEFT's `PeftModel.from_pretrained` loads as is. Inside qtrain the same
//! tensor is `layers.0.q_proj.lora_A` (see `qtrain_step::tensor_name`); `lora_A` is
//! `[r, in]` and `lora_B` is `[out, r]` in both, so no tensor is transposed.

use qtrain_model::safetensors_io::{ShardedTensors, StreamingWriter, TensorSpec};
use qtrain_model::{Proj, PROJECTIONS};
use qtrain_step::HostTensor;
use std::collections::BTreeMap;
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
    /// `base_model_name_or_path`: a hub id or a local path.
    pub base_model: String,
}

impl PeftSettings {
    /// The factor on `B @ A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (the same
    /// rule as `qtrain_step::LoraConfig::scale` and PEFT).
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// An adapter in qtrain's names: `(layers.{l}.{proj}.lora_A|lora_B, values, shape)`,
/// ordered by layer, then projection, then A before B (the order of
/// `LoraWeights::to_host`).
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

/// `lora_A` or `lora_B`, as a sort key (A first).
fn part_index(part: &str) -> Option<usize> {
    match part {
        "lora_A" => Some(0),
        "lora_B" => Some(1),
        _ => None,
    }
}

/// Parses qtrain's `layers.{l}.{proj}.lora_A|lora_B`.
fn parse_qtrain_name(name: &str) -> Option<(usize, Proj, usize)> {
    let rest = name.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (proj, part) = rest.split_once('.')?;
    // `parse::<usize>` would accept "+3"; PEFT's names never carry a sign.
    if !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((
        layer.parse().ok()?,
        Proj::from_name(proj)?,
        part_index(part)?,
    ))
}

/// `layers.3.q_proj.lora_A` → `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
pub fn to_peft_name(name: &str) -> Option<String> {
    let (layer, p, part) = parse_qtrain_name(name)?;
    let part = ["lora_A", "lora_B"][part];
    Some(format!(
        "base_model.model.model.layers.{layer}.{}.{}.{part}.weight",
        p.parent(),
        p.name()
    ))
}

/// The inverse of [`to_peft_name`]; `None` for anything else (a DoRA magnitude, a
/// bias, a `modules_to_save` copy, a projection under the wrong parent).
pub fn from_peft_name(name: &str) -> Option<String> {
    let rest = name
        .strip_prefix("base_model.model.model.layers.")?
        .strip_suffix(".weight")?;
    let mut it = rest.split('.');
    let (layer, parent, proj, part) = (it.next()?, it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let p = Proj::from_name(proj)?;
    part_index(part)?;
    if p.parent() != parent {
        return None;
    }
    Some(format!(
        "layers.{}.{proj}.{part}",
        layer.parse::<usize>().ok()?
    ))
}

/// Sort key of a qtrain tensor name: (layer, projection, A/B).
fn order_key(name: &str) -> (usize, usize, usize) {
    parse_qtrain_name(name)
        .map(|(l, p, part)| (l, p.index(), part))
        .unwrap_or((usize::MAX, usize::MAX, usize::MAX))
}

/// The `adapter_config.json` object.
///
/// These are the keys PEFT's `LoraConfig.save_pretrained` writes that matter for
/// loading a plain LoRA, with PEFT's own values for features we do not use. Keys of
/// newer PEFT releases (`lora_bias`, `eva_config`, `exclude_modules`, ...) are left
/// out on purpose: PEFT fills missing keys with their defaults, while releases that
/// predate a key refuse or warn about it. Keys are sorted, as PEFT writes them.
pub fn adapter_config_json(s: &PeftSettings) -> serde_json::Value {
    let mut targets: Vec<&str> = s.targets.iter().map(|p| p.name()).collect();
    targets.sort_unstable();
    targets.dedup();
    // `lora_alpha` is an int in PEFT's dataclass; write it as one when it is one.
    let alpha = if s.alpha.fract() == 0.0 && s.alpha.abs() < 1e15 {
        serde_json::json!(s.alpha as i64)
    } else {
        serde_json::json!(s.alpha)
    };
    serde_json::json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": s.base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": alpha,
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
    })
}

/// Checks that `tensors` are a set of complete LoRA pairs for `targets` at rank `r`
/// with as many values as their shapes say; errors name the tensor and `path`.
fn check_tensors(
    tensors: &[HostTensor],
    rank: usize,
    targets: &[Proj],
    path: &Path,
) -> Result<(), PeftError> {
    let bad = |name: &str, msg: String| PeftError::Tensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        msg,
    };
    // (layer, proj) -> [A shape, B shape]
    let mut pairs: BTreeMap<(usize, Proj), [Option<&[usize]>; 2]> = BTreeMap::new();
    for (name, values, shape) in tensors {
        let (layer, p, part) = parse_qtrain_name(name).ok_or_else(|| {
            bad(
                name,
                "not a LoRA tensor name (layers.N.PROJ.lora_A|lora_B)".into(),
            )
        })?;
        if !targets.contains(&p) {
            return Err(bad(
                name,
                format!(
                    "{} is not among the target_modules of {CONFIG_FILE}",
                    p.name()
                ),
            ));
        }
        // A is [r, in]: r first; B is [out, r]: r second.
        let fits = shape.len() == 2 && shape[part] == rank && shape[1 - part] > 0;
        if !fits {
            let want = ["[r, in]", "[out, r]"][part];
            return Err(bad(
                name,
                format!("shape {shape:?} is not {want} with r = {rank} ({CONFIG_FILE})"),
            ));
        }
        if values.len() != shape.iter().product::<usize>() {
            return Err(bad(
                name,
                format!("{} values for shape {shape:?}", values.len()),
            ));
        }
        let slot = &mut pairs.entry((layer, p)).or_default()[part];
        if slot.is_some() {
            return Err(bad(name, "appears twice".into()));
        }
        *slot = Some(shape);
    }
    for ((layer, p), [a, b]) in &pairs {
        if a.is_none() || b.is_none() {
            let missing = if a.is_none() { "lora_A" } else { "lora_B" };
            return Err(bad(
                &format!("layers.{layer}.{}.{missing}", p.name()),
                "missing: every LoRA pair needs both lora_A and lora_B".into(),
            ));
        }
    }
    if pairs.is_empty() {
        return Err(bad("(none)", "the adapter has no LoRA tensors".into()));
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename, so a reader
/// never sees half a config. (Kept here rather than borrowed from the checkpoint
/// code, whose errors speak of checkpoints.)
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PeftError> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| PeftError::Io { path: p, source }
    };
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Writes `adapter_model.safetensors` and then `adapter_config.json` into `dir`
/// (the config last: a directory with a config is a complete adapter). Both are
/// written under temporary names and renamed into place.
pub fn write_peft_adapter(
    dir: &Path,
    tensors: &[HostTensor],
    s: &PeftSettings,
    dtype: PeftDtype,
) -> Result<(), PeftError> {
    let wpath = dir.join(WEIGHTS_FILE);
    let cpath = dir.join(CONFIG_FILE);
    let bad_setting = |key: &str, msg: String| PeftError::Config {
        path: cpath.clone(),
        key: key.into(),
        msg,
    };
    if s.rank == 0 {
        return Err(bad_setting("r", "must be at least 1".into()));
    }
    if s.targets.is_empty() {
        return Err(bad_setting("target_modules", "empty".into()));
    }
    if !s.alpha.is_finite() {
        return Err(bad_setting(
            "lora_alpha",
            format!("{} is not finite", s.alpha),
        ));
    }
    if !(0.0..1.0).contains(&s.dropout) {
        return Err(bad_setting(
            "lora_dropout",
            format!("{} is not in [0, 1)", s.dropout),
        ));
    }
    check_tensors(tensors, s.rank, &s.targets, &wpath)?;
    std::fs::create_dir_all(dir).map_err(|e| PeftError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;

    let st_dtype = match dtype {
        PeftDtype::F32 => safetensors::Dtype::F32,
        PeftDtype::Bf16 => safetensors::Dtype::BF16,
        PeftDtype::F16 => safetensors::Dtype::F16,
    };
    let mut order: Vec<&HostTensor> = tensors.iter().collect();
    order.sort_by_key(|t| order_key(&t.0));
    let specs = order
        .iter()
        .map(|(name, _, shape)| {
            let peft = to_peft_name(name).expect("checked by check_tensors");
            TensorSpec::new(peft, st_dtype, shape)
        })
        .collect();
    // PEFT writes this metadata; transformers refuses files without `format`.
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut w = StreamingWriter::create(&wpath, specs, Some(meta))?;
    let mut bytes = Vec::new();
    for (_, v, _) in order {
        bytes.clear();
        match dtype {
            PeftDtype::F32 => bytes.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            // Round to nearest even, as torch's `.to(torch.bfloat16)` does.
            PeftDtype::Bf16 => bytes.extend(
                v.iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()),
            ),
            PeftDtype::F16 => {
                bytes.extend(v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()))
            }
        }
        w.write_next(&bytes)?;
    }
    w.finish()?;
    let text = serde_json::to_string_pretty(&adapter_config_json(s)).expect("json serializes");
    write_atomic(&cpath, text.as_bytes())
}

/// Reads a PEFT LoRA adapter directory (f32, bf16 or f16 tensors), checking the
/// config and every tensor against it.
///
/// Adapters that need more than `W + scale * B @ A` per projection are refused by
/// key rather than loaded wrong: DoRA, trained biases, per-module ranks or alphas,
/// extra trained modules, transposed (`fan_in_fan_out`) weights. A `target_modules`
/// given as a regular expression is accepted; the targets are then the projections
/// the tensors belong to.
pub fn read_peft_adapter(dir: &Path) -> Result<PeftAdapter, PeftError> {
    let cpath = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cpath).map_err(|e| PeftError::Io {
        path: cpath.clone(),
        source: e,
    })?;
    let bad = |key: &str, msg: String| PeftError::Config {
        path: cpath.clone(),
        key: key.into(),
        msg,
    };
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad("(file)", format!("not JSON: {e}")))?;
    let cfg = cfg
        .as_object()
        .ok_or_else(|| bad("(file)", "not a JSON object".into()))?;
    // A present `null` means the default, as in PEFT.
    let get = |key: &str| cfg.get(key).filter(|v| !v.is_null());

    match get("peft_type").and_then(|v| v.as_str()) {
        Some("LORA") => {}
        Some(other) => {
            return Err(bad(
                "peft_type",
                format!("`{other}`; only LORA is supported"),
            ))
        }
        None => return Err(bad("peft_type", "missing".into())),
    }
    // r, lora_alpha and target_modules have PEFT defaults (8, 8, per-architecture),
    // but an adapter written without them is not one we could merge faithfully.
    let rank = match get("r") {
        None => return Err(bad("r", "missing".into())),
        Some(v) => v
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("r", format!("{v} is not a positive integer")))?
            as usize,
    };
    let alpha = match get("lora_alpha") {
        None => return Err(bad("lora_alpha", "missing".into())),
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite())
            .ok_or_else(|| bad("lora_alpha", format!("{v} is not a number")))?,
    };
    let dropout = match get("lora_dropout") {
        None => 0.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| bad("lora_dropout", format!("{v} is not a number")))?,
    };
    let flag = |key: &str| -> Result<bool, PeftError> {
        match get(key) {
            None => Ok(false),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad(key, format!("{v} is not a boolean"))),
        }
    };
    let rslora = flag("use_rslora")?;
    for key in ["use_dora", "fan_in_fan_out"] {
        if flag(key)? {
            return Err(bad(key, "true is not supported".into()));
        }
    }
    if let Some(b) = get("bias") {
        if b.as_str() != Some("none") {
            return Err(bad(
                "bias",
                format!("{b}: only \"none\" is supported (trained biases)"),
            ));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if get(key).is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty())) {
            return Err(bad(
                key,
                "per-module ranks or alphas are not supported".into(),
            ));
        }
    }
    if get("modules_to_save").is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(bad(
            "modules_to_save",
            "fully trained extra modules are not supported".into(),
        ));
    }
    if get("layer_replication").is_some() {
        return Err(bad("layer_replication", "not supported".into()));
    }
    let declared: Option<Vec<Proj>> = match get("target_modules") {
        None => return Err(bad("target_modules", "missing".into())),
        Some(serde_json::Value::Array(a)) => {
            let mut out = Vec::new();
            for t in a {
                // PEFT matches a key against the end of a module path, so
                // `self_attn.q_proj` targets q_proj too.
                let p = t
                    .as_str()
                    .and_then(|s| s.rsplit('.').next())
                    .and_then(Proj::from_name)
                    .ok_or_else(|| {
                        bad(
                            "target_modules",
                            format!("{t} is not one of the projections qtrain adapts"),
                        )
                    })?;
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            if out.is_empty() {
                return Err(bad("target_modules", "empty".into()));
            }
            Some(out)
        }
        Some(serde_json::Value::String(s)) if s == "all-linear" => Some(PROJECTIONS.to_vec()),
        Some(serde_json::Value::String(s)) => Proj::from_name(s).map(|p| vec![p]),
        Some(v) => return Err(bad("target_modules", format!("{v} is not a list"))),
    };
    let base_model = get("base_model_name_or_path")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();

    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.exists() && dir.join("adapter_model.bin").exists() {
        return Err(PeftError::Io {
            path: wpath,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "missing; adapter_model.bin (a PyTorch pickle) is not read: save the \
                 adapter with safe_serialization=True",
            ),
        });
    }
    let st = ShardedTensors::open(std::slice::from_ref(&wpath))?;
    let mut tensors = Vec::new();
    for peft in st.names() {
        let name = from_peft_name(peft).ok_or_else(|| PeftError::Tensor {
            path: wpath.clone(),
            name: peft.to_string(),
            msg: "not the LoRA A/B weight of a decoder projection \
                  (base_model.model.model.layers.N.{self_attn|mlp}.PROJ.lora_A|lora_B.weight)"
                .into(),
        })?;
        let t = st.get(peft)?;
        tensors.push((name, t.to_f32_vec()?, t.shape.to_vec()));
    }
    tensors.sort_by_key(|t| order_key(&t.0));
    let targets = match declared {
        Some(t) => t,
        None => {
            // A regular expression: the projections that carry tensors.
            let mut t: Vec<Proj> = tensors
                .iter()
                .filter_map(|(n, _, _)| parse_qtrain_name(n).map(|x| x.1))
                .collect();
            t.sort();
            t.dedup();
            t
        }
    };
    // Errors from here name the PEFT tensor, as the file spells it.
    check_tensors(&tensors, rank, &targets, &wpath).map_err(|e| match e {
        PeftError::Tensor { path, name, msg } => PeftError::Tensor {
            path,
            name: to_peft_name(&name).unwrap_or(name),
            msg,
        },
        other => other,
    })?;
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
                (0..8).map(|i| i as f32 * 0.1 + 0.01).collect(),
                vec![2, 4],
            ),
            (
                "layers.0.q_proj.lora_B".to_string(),
                (0..6).map(|i| -(i as f32) * 0.013).collect(),
                vec![3, 2],
            ),
            (
                "layers.1.down_proj.lora_A".to_string(),
                (0..10).map(|i| 1.0 / (i as f32 + 3.0)).collect(),
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

    fn read_config(dir: &Path) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap()
    }

    fn write_config(dir: &Path, cfg: &serde_json::Value) {
        std::fs::write(dir.join(CONFIG_FILE), cfg.to_string()).unwrap();
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
        for p in PROJECTIONS {
            let q = format!("layers.7.{}.lora_B", p.name());
            let peft = to_peft_name(&q).unwrap();
            let parent = if matches!(p, Proj::Gate | Proj::Up | Proj::Down) {
                "mlp"
            } else {
                "self_attn"
            };
            assert_eq!(
                peft,
                format!(
                    "base_model.model.model.layers.7.{parent}.{}.lora_B.weight",
                    p.name()
                )
            );
            assert_eq!(from_peft_name(&peft).unwrap(), q);
        }
        for bad in [
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.lm_head.weight",
        ] {
            assert!(from_peft_name(bad).is_none(), "{bad}");
        }
        assert!(to_peft_name("layers.x.q_proj.lora_A").is_none());
        assert!(to_peft_name("layers.+1.q_proj.lora_A").is_none());
        assert!(to_peft_name("layers.1.q_proj.lora_C").is_none());
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
        // Exact values, and in LoraWeights order (layer, projection, A before B).
        assert_eq!(back.tensors, t);

        let cfg = read_config(dir.path());
        let keys: Vec<&str> = cfg
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(
            keys, sorted,
            "keys sorted like PEFT's json.dumps(sort_keys=True)"
        );
        assert_eq!(
            cfg,
            serde_json::json!({
                "alpha_pattern": {},
                "auto_mapping": null,
                "base_model_name_or_path": "org/model",
                "bias": "none",
                "fan_in_fan_out": false,
                "inference_mode": true,
                "init_lora_weights": true,
                "layers_pattern": null,
                "layers_to_transform": null,
                "lora_alpha": 4,
                "lora_dropout": 0.05,
                "modules_to_save": null,
                "peft_type": "LORA",
                "r": 2,
                "rank_pattern": {},
                "revision": null,
                "target_modules": ["down_proj", "q_proj"],
                "task_type": "CAUSAL_LM",
                "use_dora": false,
                "use_rslora": false,
            })
        );
        assert!(cfg["lora_alpha"].is_u64(), "alpha written as an int");

        let st = ShardedTensors::open(&[dir.path().join(WEIGHTS_FILE)]).unwrap();
        assert_eq!(
            st.names(),
            vec![
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight",
                "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
            ]
        );
        let a = st
            .get("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
            .unwrap();
        assert_eq!(a.dtype, safetensors::Dtype::F32);
        assert_eq!(a.shape, &[2, 5]);
        // No temporary files are left behind.
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, [CONFIG_FILE, WEIGHTS_FILE]);
    }

    #[test]
    fn bf16_and_f16_exports_round_values() {
        let (t, s) = sample();
        for (dtype, st_dtype) in [
            (PeftDtype::Bf16, safetensors::Dtype::BF16),
            (PeftDtype::F16, safetensors::Dtype::F16),
        ] {
            let dir = tempfile::tempdir().unwrap();
            write_peft_adapter(dir.path(), &t, &s, dtype).unwrap();
            let st = ShardedTensors::open(&[dir.path().join(WEIGHTS_FILE)]).unwrap();
            for n in st.names() {
                assert_eq!(st.get(n).unwrap().dtype, st_dtype, "{n}");
            }
            let back = read_peft_adapter(dir.path()).unwrap();
            for ((name, v, shape), (gname, g, gshape)) in t.iter().zip(&back.tensors) {
                assert_eq!((name, shape), (gname, gshape));
                for (a, b) in v.iter().zip(g) {
                    let (want, rel) = match dtype {
                        PeftDtype::Bf16 => (half::bf16::from_f32(*a).to_f32(), 2f32.powi(-8)),
                        _ => (half::f16::from_f32(*a).to_f32(), 2f32.powi(-11)),
                    };
                    assert_eq!(*b, want, "{name}");
                    // Within half an ulp of the format, relative.
                    assert!((b - a).abs() <= a.abs() * rel, "{name}: {a} -> {b}");
                }
            }
        }
    }

    #[test]
    fn rslora_scale_and_non_integer_alpha() {
        let (t, mut s) = sample();
        s.rslora = true;
        s.alpha = 2.5;
        assert!((s.scale() - 2.5 / 2f64.sqrt()).abs() < 1e-12);
        let dir = tempfile::tempdir().unwrap();
        write_peft_adapter(dir.path(), &t, &s, PeftDtype::F32).unwrap();
        let cfg = read_config(dir.path());
        assert_eq!(cfg["lora_alpha"].as_f64(), Some(2.5));
        assert_eq!(cfg["use_rslora"], true);
        let back = read_peft_adapter(dir.path()).unwrap();
        assert!(back.settings.rslora);
        assert_eq!(back.settings.alpha, 2.5);
    }

    #[test]
    fn config_variants_other_tools_write_are_read() {
        let (t, s) = sample();
        let dir = tempfile::tempdir().unwrap();
        write_peft_adapter(dir.path(), &t, &s, PeftDtype::F32).unwrap();
        let mut cfg = read_config(dir.path());
        // Keys of newer PEFT releases with their defaults, suffix-style targets.
        cfg["lora_bias"] = false.into();
        cfg["exclude_modules"] = serde_json::Value::Null;
        cfg["rank_pattern"] = serde_json::Value::Null;
        cfg["target_modules"] = serde_json::json!(["self_attn.q_proj", "down_proj", "q_proj"]);
        write_config(dir.path(), &cfg);
        let back = read_peft_adapter(dir.path()).unwrap();
        assert_eq!(back.settings.targets, vec![Proj::Q, Proj::Down]);
        // A regular expression: the targets are what the tensors adapt.
        cfg["target_modules"] = r".*\.(q_proj|down_proj)".into();
        write_config(dir.path(), &cfg);
        let back = read_peft_adapter(dir.path()).unwrap();
        assert_eq!(back.settings.targets, vec![Proj::Q, Proj::Down]);
        cfg["target_modules"] = "all-linear".into();
        write_config(dir.path(), &cfg);
        assert_eq!(
            read_peft_adapter(dir.path()).unwrap().settings.targets,
            PROJECTIONS.to_vec()
        );
    }

    #[test]
    fn config_errors_name_the_file_and_key() {
        let (t, s) = sample();
        let dir = tempfile::tempdir().unwrap();
        write_peft_adapter(dir.path(), &t, &s, PeftDtype::F32).unwrap();
        let good = read_config(dir.path());
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            ("r", serde_json::Value::Null, "missing"),
            ("r", 0.into(), "positive"),
            ("lora_alpha", "x".into(), "not a number"),
            ("peft_type", "IA3".into(), "only LORA"),
            ("target_modules", serde_json::json!(["lm_head"]), "lm_head"),
            ("target_modules", serde_json::json!(["v_proj"]), "q_proj"),
            ("use_dora", true.into(), "not supported"),
            ("bias", "all".into(), "none"),
            ("fan_in_fan_out", true.into(), "not supported"),
            (
                "rank_pattern",
                serde_json::json!({"q_proj": 4}),
                "per-module",
            ),
            ("modules_to_save", serde_json::json!(["lm_head"]), "extra"),
            ("r", 3.into(), "r = 3"),
        ];
        for (key, value, why) in cases {
            let mut cfg = good.clone();
            if value.is_null() {
                cfg.as_object_mut().unwrap().remove(key);
            } else {
                cfg[key] = value.clone();
            }
            write_config(dir.path(), &cfg);
            let e = read_peft_adapter(dir.path()).unwrap_err().to_string();
            assert!(e.contains("adapter_config.json"), "{key}={value}: {e}");
            assert!(e.contains(why), "{key}={value}: {e}");
            // The last two cases are caught on the tensors, which are named instead.
            if !["r = 3", "q_proj"].contains(&why) {
                assert!(e.contains(&format!("`{key}`")), "{key}={value}: {e}");
            } else {
                assert!(e.contains("adapter_model.safetensors"), "{e}");
            }
        }
        std::fs::write(dir.path().join(CONFIG_FILE), "{ not json").unwrap();
        let e = read_peft_adapter(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains("not JSON"),
            "{e}"
        );
    }

    #[test]
    fn unknown_tensor_names_are_reported_with_the_file() {
        let (t, s) = sample();
        let dir = tempfile::tempdir().unwrap();
        write_peft_adapter(dir.path(), &t, &s, PeftDtype::F32).unwrap();
        // Replace the weights by a file with one foreign tensor beside a good pair.
        let mut specs = vec![
            TensorSpec::new(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                safetensors::Dtype::F32,
                &[2, 4],
            ),
            TensorSpec::new(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                safetensors::Dtype::F32,
                &[3, 2],
            ),
        ];
        specs.push(TensorSpec::new(
            "base_model.model.lm_head.lora_A.weight",
            safetensors::Dtype::F32,
            &[2, 2],
        ));
        let sizes: Vec<usize> = specs.iter().map(|s| s.byte_len()).collect();
        let mut w = StreamingWriter::create(&dir.path().join(WEIGHTS_FILE), specs, None).unwrap();
        for n in sizes {
            w.write_next(&vec![0u8; n]).unwrap();
        }
        w.finish().unwrap();
        let e = read_peft_adapter(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("base_model.model.lm_head.lora_A.weight")
                && e.contains("adapter_model.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn incomplete_or_inconsistent_tensors_are_refused_on_write() {
        let (t, s) = sample();
        let dir = tempfile::tempdir().unwrap();
        let e = |tensors: &[HostTensor], s: &PeftSettings| {
            write_peft_adapter(dir.path(), tensors, s, PeftDtype::F32)
                .unwrap_err()
                .to_string()
        };
        let msg = e(&[("weird".into(), vec![1.0], vec![1])], &s);
        assert!(msg.contains("weird") && msg.contains(WEIGHTS_FILE), "{msg}");
        let msg = e(&t[..3], &s);
        assert!(
            msg.contains("layers.1.down_proj.lora_B") && msg.contains("missing"),
            "{msg}"
        );
        let mut wrong = t.clone();
        wrong[1].2 = vec![2, 3];
        let msg = e(&wrong, &s);
        assert!(
            msg.contains("layers.0.q_proj.lora_B") && msg.contains("[out, r]"),
            "{msg}"
        );
        let msg = e(
            &t,
            &PeftSettings {
                targets: vec![Proj::Q],
                ..s.clone()
            },
        );
        assert!(
            msg.contains("down_proj is not among the target_modules"),
            "{msg}"
        );
        let msg = e(
            &t,
            &PeftSettings {
                rank: 0,
                ..s.clone()
            },
        );
        assert!(msg.contains("`r`"), "{msg}");
        assert!(!dir.path().join(CONFIG_FILE).exists(), "nothing written");
    }
}
