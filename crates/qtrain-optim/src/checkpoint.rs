//! Saving and loading optimizer state as safetensors, for bit-exact resume.
//!
//! # Layout
//!
//! One tensor per moment buffer, keyed by the parameter's name:
//!
//! | key | dtype | shape | for |
//! | --- | --- | --- | --- |
//! | `state.<name>.m_q`, `state.<name>.v_q` | U8 | `[numel]` | 8-bit codes |
//! | `state.<name>.m_absmax`, `state.<name>.v_absmax` | F32 | `[ceil(numel / 256)]` | block absmax |
//! | `state.<name>.m`, `state.<name>.v` | F32 | `[numel]` | f32 state |
//!
//! Which of the two a parameter has follows from the optimizer kind, its size and the
//! saved `min_8bit_size`, so it is not stored separately. The safetensors metadata
//! holds everything else, as strings:
//!
//! * `format` = `qtrain-optim-state`, `format-version` = `1`, `blocksize` = `256`;
//! * `optimizer` = `adamw8bit` or `adamw32`;
//! * `step`: the step count;
//! * `beta1`, `beta2`, `eps`, `weight-decay`: Rust's shortest round-trip decimal for
//!   f32, parsed back with Rust's correctly rounded parser, hence exact (JSON would go
//!   through f64 and risk a double rounding);
//! * `min-8bit-size`; `paging`: the [`crate::PagingPolicy`] as JSON;
//! * `params`: JSON list of `{"name", "numel"}` in parameter order (safetensors sorts
//!   its tensors by name, so the order must be kept here).
//!
//! The placement is not saved: it is recomputed from the paging policy on load.
//!
//! Writes are atomic: a temporary file in the destination directory, fsynced, then
//! renamed over the destination, so a crash leaves either the old file or the new one.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::adamw::{
    check_names, num_blocks, Core, OptimizerKind, ParamSpec, ParamState, StateFormat, StateStorage,
    BLOCKSIZE,
};
use crate::error::{OptimError, Result};
use crate::paging::PagingPolicy;
use crate::AdamWConfig;

const FORMAT: &str = "qtrain-optim-state";
const FORMAT_VERSION: &str = "1";

/// A tensor to serialize, owning its little-endian bytes or borrowing u8 codes.
struct Buf<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl View for Buf<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_buf(x: &[f32]) -> Buf<'static> {
    Buf {
        dtype: Dtype::F32,
        shape: vec![x.len()],
        data: Cow::Owned(x.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

fn u8_buf(x: &[u8]) -> Buf<'_> {
    Buf {
        dtype: Dtype::U8,
        shape: vec![x.len()],
        data: Cow::Borrowed(x),
    }
}

fn key(name: &str, part: &str) -> String {
    format!("state.{name}.{part}")
}

#[derive(Serialize, Deserialize)]
struct SavedParam {
    name: String,
    numel: usize,
}

pub(crate) fn save(core: &Core, path: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Buf<'_>)> = Vec::with_capacity(4 * core.states.len());
    for s in &core.states {
        match &s.storage {
            StateStorage::F32 { m, v } => {
                tensors.push((key(&s.name, "m"), f32_buf(m)));
                tensors.push((key(&s.name, "v"), f32_buf(v)));
            }
            StateStorage::Blockwise8 {
                m_q,
                m_absmax,
                v_q,
                v_absmax,
            } => {
                tensors.push((key(&s.name, "m_q"), u8_buf(m_q)));
                tensors.push((key(&s.name, "m_absmax"), f32_buf(m_absmax)));
                tensors.push((key(&s.name, "v_q"), u8_buf(v_q)));
                tensors.push((key(&s.name, "v_absmax"), f32_buf(v_absmax)));
            }
        }
    }
    let params: Vec<SavedParam> = core
        .states
        .iter()
        .map(|s| SavedParam {
            name: s.name.clone(),
            numel: s.numel,
        })
        .collect();
    let c = &core.config;
    let json = |e: serde_json::Error| OptimError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("cannot encode metadata: {e}"),
    };
    let meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("format-version", FORMAT_VERSION.to_string()),
        ("blocksize", BLOCKSIZE.to_string()),
        ("optimizer", core.kind.as_str().to_string()),
        ("step", core.step.to_string()),
        ("beta1", c.betas.0.to_string()),
        ("beta2", c.betas.1.to_string()),
        ("eps", c.eps.to_string()),
        ("weight-decay", c.weight_decay.to_string()),
        ("min-8bit-size", c.min_8bit_size.to_string()),
        ("paging", serde_json::to_string(&c.paging).map_err(json)?),
        ("params", serde_json::to_string(&params).map_err(json)?),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let bytes = safetensors::serialize(tensors, Some(meta)).map_err(|e| OptimError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("cannot serialize: {e}"),
    })?;
    write_atomic(path, &bytes)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| OptimError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // A uniquely named sibling, so concurrent writers and leftovers of a crash never
    // collide, and the rename stays within one file system.
    let mut tmp = tempfile::Builder::new()
        .prefix(".qtrain-optim-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    // Make the rename itself durable. Directories cannot be opened this way on
    // every platform, so this is best effort.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the tensors of a state file. `expect`: the caller's parameters, which then
/// decide the order and are checked against the tensors; `None` trusts the file's
/// `params` list.
pub(crate) fn load(path: &Path, kind: OptimizerKind, expect: Option<&[ParamSpec]>) -> Result<Core> {
    let path_buf = path.to_path_buf();
    let corrupt = |reason: String| OptimError::Corrupt {
        path: path_buf.clone(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| OptimError::Io {
        path: path_buf.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let meta = header
        .metadata()
        .as_ref()
        .ok_or_else(|| corrupt("no metadata".into()))?;
    let get = |k: &str| {
        meta.get(k)
            .map(String::as_str)
            .ok_or_else(|| corrupt(format!("metadata '{k}' missing")))
    };
    fn parse<T: std::str::FromStr>(
        v: &str,
        k: &str,
        corrupt: &dyn Fn(String) -> OptimError,
    ) -> Result<T> {
        v.parse()
            .map_err(|_| corrupt(format!("metadata '{k}' = '{v}' is not valid")))
    }

    if get("format")? != FORMAT {
        return Err(corrupt(format!(
            "metadata 'format' is '{}', not '{FORMAT}'",
            get("format")?
        )));
    }
    if get("format-version")? != FORMAT_VERSION {
        return Err(corrupt(format!(
            "unsupported format-version '{}'",
            get("format-version")?
        )));
    }
    let blocksize: usize = parse(get("blocksize")?, "blocksize", &corrupt)?;
    if blocksize != BLOCKSIZE {
        return Err(corrupt(format!(
            "blocksize {blocksize} (only {BLOCKSIZE} is supported)"
        )));
    }
    let found = get("optimizer")?;
    if found != kind.as_str() {
        return Err(OptimError::WrongOptimizer {
            path: path_buf.clone(),
            expected: kind.as_str().to_string(),
            found: found.to_string(),
        });
    }
    let step: u64 = parse(get("step")?, "step", &corrupt)?;
    let config = AdamWConfig {
        betas: (
            parse(get("beta1")?, "beta1", &corrupt)?,
            parse(get("beta2")?, "beta2", &corrupt)?,
        ),
        eps: parse(get("eps")?, "eps", &corrupt)?,
        weight_decay: parse(get("weight-decay")?, "weight-decay", &corrupt)?,
        min_8bit_size: parse(get("min-8bit-size")?, "min-8bit-size", &corrupt)?,
        paging: serde_json::from_str::<PagingPolicy>(get("paging")?)
            .map_err(|e| corrupt(format!("metadata 'paging': {e}")))?,
    };
    config
        .validate()
        .map_err(|e| corrupt(format!("saved config: {e}")))?;

    let specs: Vec<ParamSpec> = match expect {
        Some(specs) => {
            check_names(specs.iter().map(|p| p.name.as_str()))?;
            specs.to_vec()
        }
        None => {
            let saved: Vec<SavedParam> = serde_json::from_str(get("params")?)
                .map_err(|e| corrupt(format!("metadata 'params': {e}")))?;
            check_names(saved.iter().map(|p| p.name.as_str()))
                .map_err(|e| corrupt(format!("metadata 'params': {e}")))?;
            saved
                .into_iter()
                .map(|p| ParamSpec::new(p.name, p.numel))
                .collect()
        }
    };

    let reader = Reader {
        st: &st,
        path: &path_buf,
    };
    let mut used = HashSet::new();
    let mut states = Vec::with_capacity(specs.len());
    for spec in specs {
        let n = spec.numel;
        let nb = num_blocks(n);
        let mut k = |part: &str| {
            let k = key(&spec.name, part);
            used.insert(k.clone());
            k
        };
        let storage = match kind.format_for(n, &config) {
            StateFormat::F32 => StateStorage::F32 {
                m: reader.f32s(&k("m"), n)?,
                v: reader.f32s(&k("v"), n)?,
            },
            StateFormat::Blockwise8 => StateStorage::Blockwise8 {
                m_q: reader.u8s(&k("m_q"), n)?,
                m_absmax: reader.f32s(&k("m_absmax"), nb)?,
                v_q: reader.u8s(&k("v_q"), n)?,
                v_absmax: reader.f32s(&k("v_absmax"), nb)?,
            },
        };
        states.push(ParamState {
            name: spec.name,
            numel: n,
            storage,
        });
    }
    let mut extra: Vec<&str> = st
        .names()
        .into_iter()
        .filter(|n| !used.contains(*n))
        .collect();
    extra.sort_unstable();
    if let Some(key) = extra.first() {
        return Err(OptimError::UnexpectedTensor {
            path: path_buf,
            key: key.to_string(),
        });
    }
    Ok(Core::from_parts(kind, config, states, step))
}

struct Reader<'a, 'data> {
    st: &'a SafeTensors<'data>,
    path: &'a PathBuf,
}

impl Reader<'_, '_> {
    fn raw(&self, key: &str, dtype: Dtype, len: usize) -> Result<&[u8]> {
        let t = self.st.tensor(key).map_err(|_| OptimError::MissingTensor {
            path: self.path.clone(),
            key: key.to_string(),
        })?;
        if t.dtype() != dtype || t.shape() != [len] {
            return Err(OptimError::TensorMismatch {
                path: self.path.clone(),
                key: key.to_string(),
                expected: format!("{dtype:?} [{len}]"),
                found: format!("{:?} {:?}", t.dtype(), t.shape()),
            });
        }
        Ok(t.data())
    }

    fn f32s(&self, key: &str, len: usize) -> Result<Vec<f32>> {
        let raw = self.raw(key, Dtype::F32, len)?;
        Ok(raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn u8s(&self, key: &str, len: usize) -> Result<Vec<u8>> {
        Ok(self.raw(key, Dtype::U8, len)?.to_vec())
    }
}
