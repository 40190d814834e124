//! The GGUF v3 container: header, typed metadata key/values, tensor infos, and the
//! aligned tensor data, written in one pass.
//!
//! Layout (all little-endian): `"GGUF"`, version `3` (u32), tensor count and
//! metadata count (u64); each key/value as a string key, a u32 value type and the
//! value (strings as u64 length + UTF-8 bytes, arrays as element type, u64 count
//! and elements); each tensor info as name, dimension count (u32), dimensions (u64,
//! ggml order: the row length first), ggml type (u32) and the data offset (u64,
//! relative to the data section, a multiple of the alignment); zero padding to the
//! alignment; the tensor data, each padded to the alignment.
//!
//! Every tensor's type and shape is known before its data exists, so the header is
//! written first and the data streams tensor by tensor: a 7B export holds one
//! tensor, never the model. The file is written beside its final name and renamed
//! into place by [`GgufWriter::finish`], so a crash leaves no truncated model.

use crate::error::GgufError;
use crate::types::GgmlType;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

/// GGUF's default (and llama.cpp's) data alignment.
pub const ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_NAME` minus the terminating NUL.
pub const MAX_TENSOR_NAME: usize = 63;

/// One metadata value. The variants are the GGUF value types qtrain writes.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(bool),
    String(String),
    ArrayString(Vec<String>),
    ArrayF32(Vec<f32>),
    ArrayI32(Vec<i32>),
}

// GGUF's `gguf_type` numbers.
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;

/// The metadata of a file, in the order it is written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
}

impl Metadata {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key`; a key set twice is a bug in the caller, so it panics.
    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        assert!(self.get(&key).is_none(), "metadata key {key} set twice");
        self.entries.push((key, value));
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn entries(&self) -> &[(String, Value)] {
        &self.entries
    }

    pub fn set_u32(&mut self, key: &str, v: u32) {
        self.set(key, Value::U32(v));
    }
    pub fn set_f32(&mut self, key: &str, v: f32) {
        self.set(key, Value::F32(v));
    }
    pub fn set_bool(&mut self, key: &str, v: bool) {
        self.set(key, Value::Bool(v));
    }
    pub fn set_str(&mut self, key: &str, v: impl Into<String>) {
        self.set(key, Value::String(v.into()));
    }
}

/// Name, shape and type of one tensor. `dims` are in ggml order (`ne[0]`, the
/// contiguous row length, first): a PyTorch `[out, in]` weight is `[in, out]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorInfo {
    /// A tensor from its PyTorch (row-major, outermost first) shape.
    pub fn from_torch_shape(name: impl Into<String>, shape: &[usize], ty: GgmlType) -> Self {
        Self {
            name: name.into(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
        }
    }

    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of the tensor's data.
    pub fn nbytes(&self) -> u64 {
        let row = self.dims.first().copied().unwrap_or(1);
        let rows = self.elements() / row.max(1);
        rows * self.ty.row_size(row as usize) as u64
    }
}

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// Writes one GGUF file: [`GgufWriter::create`] writes the header, each
/// [`GgufWriter::write_tensor`] the next tensor's data in header order, and
/// [`GgufWriter::finish`] makes the file appear under its name.
pub struct GgufWriter {
    /// `None` once finished.
    out: Option<BufWriter<std::fs::File>>,
    tmp: PathBuf,
    path: PathBuf,
    tensors: Vec<TensorInfo>,
    next: usize,
    /// Bytes of tensor data (with padding) written so far.
    data_pos: u64,
}

impl GgufWriter {
    /// Checks the tensor infos and writes header, metadata and tensor infos to a
    /// temporary file next to `path`.
    pub fn create(
        path: &Path,
        metadata: &Metadata,
        tensors: Vec<TensorInfo>,
    ) -> Result<Self, GgufError> {
        let mut seen = std::collections::HashSet::new();
        for t in &tensors {
            let bad = |msg: String| GgufError::Tensor {
                name: t.name.clone(),
                msg,
            };
            if t.name.len() > MAX_TENSOR_NAME {
                return Err(bad(format!(
                    "name longer than ggml's {MAX_TENSOR_NAME} bytes"
                )));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(bad("appears twice".into()));
            }
            if t.dims.is_empty() || t.dims.len() > 4 || t.dims.contains(&0) {
                return Err(bad(format!("dims {:?}: 1 to 4 non-zero dims", t.dims)));
            }
            if t.dims[0] % t.ty.block_size() as u64 != 0 {
                return Err(bad(format!(
                    "row length {} is not a multiple of the {} block size {}",
                    t.dims[0],
                    t.ty,
                    t.ty.block_size()
                )));
            }
        }
        let tmp = path.with_extension("gguf.partial");
        let io = |e| GgufError::io(&tmp, e);
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = Self {
            out: Some(BufWriter::with_capacity(1 << 22, file)),
            tmp: tmp.clone(),
            path: path.to_path_buf(),
            tensors,
            next: 0,
            data_pos: 0,
        };
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(w.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.entries().len() as u64).to_le_bytes());
        for (k, v) in metadata.entries() {
            put_str(&mut head, k);
            put_value(&mut head, v);
        }
        let mut offset = 0u64;
        for t in &w.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = align(offset + t.nbytes());
        }
        head.resize(align(head.len() as u64) as usize, 0);
        w.stream().write_all(&head).map_err(io)?;
        Ok(w)
    }

    /// Writes the data of the next tensor, which must be `name` with exactly its
    /// size in bytes.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<(), GgufError> {
        let t = self
            .tensors
            .get(self.next)
            .ok_or_else(|| GgufError::Tensor {
                name: name.to_string(),
                msg: "written after the last tensor of the header".into(),
            })?;
        if t.name != name {
            return Err(GgufError::Tensor {
                name: name.to_string(),
                msg: format!(
                    "written out of order: the header's next tensor is {}",
                    t.name
                ),
            });
        }
        if data.len() as u64 != t.nbytes() {
            return Err(GgufError::Tensor {
                name: name.to_string(),
                msg: format!(
                    "{} bytes, but {} {:?} needs {}",
                    data.len(),
                    t.ty,
                    t.dims,
                    t.nbytes()
                ),
            });
        }
        let tmp = self.tmp.clone();
        let io = |e| GgufError::io(&tmp, e);
        let end = self.data_pos + data.len() as u64;
        let padded = align(end);
        let out = self.stream();
        out.write_all(data).map_err(io)?;
        out.write_all(&vec![0u8; (padded - end) as usize])
            .map_err(io)?;
        self.data_pos = padded;
        self.next += 1;
        Ok(())
    }

    /// Checks every tensor was written, flushes to disk and renames the file into
    /// place.
    pub fn finish(mut self) -> Result<PathBuf, GgufError> {
        if self.next != self.tensors.len() {
            return Err(GgufError::Tensor {
                name: self.tensors[self.next].name.clone(),
                msg: "never written".into(),
            });
        }
        let tmp = self.tmp.clone();
        let io = |e| GgufError::io(&tmp, e);
        let mut out = self.out.take().expect("not finished twice");
        out.flush().map_err(io)?;
        let len = out.stream_position().map_err(io)?;
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        tracing::debug!("{}: {len} bytes", self.path.display());
        std::fs::rename(&self.tmp, &self.path).map_err(|e| GgufError::io(&self.path, e))?;
        Ok(self.path.clone())
    }

    fn stream(&mut self) -> &mut BufWriter<std::fs::File> {
        self.out.as_mut().expect("writer not finished")
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    let ty = |out: &mut Vec<u8>, t: u32| out.extend_from_slice(&t.to_le_bytes());
    let arr = |out: &mut Vec<u8>, t: u32, n: usize| {
        ty(out, T_ARRAY);
        ty(out, t);
        out.extend_from_slice(&(n as u64).to_le_bytes());
    };
    match v {
        Value::U32(x) => {
            ty(out, T_U32);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::I32(x) => {
            ty(out, T_I32);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::U64(x) => {
            ty(out, T_U64);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::F32(x) => {
            ty(out, T_F32);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::Bool(x) => {
            ty(out, T_BOOL);
            out.push(*x as u8);
        }
        Value::String(s) => {
            ty(out, T_STRING);
            put_str(out, s);
        }
        Value::ArrayString(xs) => {
            arr(out, T_STRING, xs.len());
            for s in xs {
                put_str(out, s);
            }
        }
        Value::ArrayF32(xs) => {
            arr(out, T_F32, xs.len());
            for x in xs {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        Value::ArrayI32(xs) => {
            arr(out, T_I32, xs.len());
            for x in xs {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        // An unfinished file (an error midway) is not left behind as `.partial`.
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
