//! Reading and writing safetensors files without holding a model in memory.
//!
//! Reading: every shard of a model directory is memory-mapped and only its header is
//! parsed up front, so a tensor's bytes are touched (paged in by the kernel) only when
//! the loader converts that one tensor. Writing: the header is computed from the shapes
//! first and the tensors are then streamed one by one, so writing a 14 GB random model
//! or a merged export needs memory for one tensor, not for the file.

use crate::error::{ModelError, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A set of memory-mapped safetensors shards seen as one name → tensor map.
pub struct ShardedTensors {
    shards: Vec<Shard>,
    /// tensor name → index into `shards`
    index: HashMap<String, usize>,
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    infos: HashMap<String, TensorInfo>,
}

/// A borrowed view of one tensor's raw little-endian bytes.
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl ShardedTensors {
    /// Opens the weights of a model directory: `model.safetensors`, or the shards a
    /// `model.safetensors.index.json` names.
    pub fn open_model_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::ConfigParse {
                    path: index_path.clone(),
                    msg: e.to_string(),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::ConfigField {
                    path: index_path.clone(),
                    key: "weight_map".into(),
                    msg: "missing or not an object".into(),
                })?;
            let mut files: Vec<String> = map
                .values()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| ModelError::ConfigField {
                            path: index_path.clone(),
                            key: "weight_map".into(),
                            msg: format!("value {v} is not a file name"),
                        })
                })
                .collect::<Result<_>>()?;
            files.sort();
            files.dedup();
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            let st = Self::open(&paths)?;
            // The index is a promise: every tensor it names must be in the shard it names.
            for (name, file) in map {
                let file = file.as_str().unwrap_or_default();
                match st.index.get(name) {
                    Some(&i) if st.shards[i].path == dir.join(file) => {}
                    _ => {
                        return Err(ModelError::MissingTensor {
                            path: dir.join(file),
                            name: name.clone(),
                        })
                    }
                }
            }
            Ok(st)
        } else if single.exists() {
            Self::open(&[single])
        } else {
            Err(ModelError::ModelNotFound {
                dir: dir.to_path_buf(),
                msg: "neither model.safetensors nor model.safetensors.index.json exists".into(),
            })
        }
    }

    /// Memory-maps the given files.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: the file is opened read-only; like every mmap-based loader
            // (candle, safetensors in Python) we assume nobody truncates it under us.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                    ModelError::Safetensors {
                        path: path.clone(),
                        msg: e.to_string(),
                    }
                })?;
            let infos: HashMap<String, TensorInfo> = meta
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.clone()))
                .collect();
            for name in infos.keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
                data_start: 8 + header_len,
                infos,
            });
        }
        Ok(Self { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    /// The tensor called `name`, or an error naming it and the model's files.
    pub fn get<'a>(&'a self, name: &str) -> Result<RawTensor<'a>> {
        let (name, &i) =
            self.index
                .get_key_value(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: self.describe_paths(),
                    name: name.to_string(),
                })?;
        let shard = &self.shards[i];
        let info = &shard.infos[name];
        let (a, b) = info.data_offsets;
        Ok(RawTensor {
            name: name.as_str(),
            path: &shard.path,
            dtype: info.dtype,
            shape: &info.shape,
            bytes: &shard.mmap[shard.data_start + a..shard.data_start + b],
        })
    }

    /// Tells the kernel the bytes of tensor `name` are no longer needed, so the pages
    /// the loader touched stop counting against this process. Loading converts each
    /// tensor once; without this the whole checkpoint (14.5 GB for Mistral-7B) would
    /// end up resident through the mapping by the end of the load.
    pub fn release(&self, name: &str) {
        let Some(&i) = self.index.get(name) else {
            return;
        };
        let shard = &self.shards[i];
        let (a, b) = shard.infos[name].data_offsets;
        let page = 4096;
        let start = (shard.data_start + a) / page * page;
        let end = (shard.data_start + b).min(shard.mmap.len());
        if end > start {
            // SAFETY: the mapping is a read-only shared mapping of a file: dropping its
            // pages only makes the next access fault them in again from the file, with
            // the same content. No `RawTensor` of this tensor is alive when the loader
            // calls this (its data was copied or quantized first).
            #[cfg(unix)]
            let _ = unsafe {
                shard.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    fn describe_paths(&self) -> PathBuf {
        match self.shards.as_slice() {
            [one] => one.path.clone(),
            many => {
                let dir = many
                    .first()
                    .and_then(|s| s.path.parent())
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                dir.join(format!("(any of {} shards)", many.len()))
            }
        }
    }
}

impl RawTensor<'_> {
    /// Checks the shape, naming the tensor and file on mismatch.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: self.path.to_path_buf(),
                name: self.name.to_string(),
                found: self.shape.to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(())
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts a floating-point tensor to f32 into `out` (len = numel).
    pub fn to_f32_into(&self, out: &mut [f32]) -> Result<()> {
        assert_eq!(out.len(), self.numel());
        match self.dtype {
            Dtype::BF16 => {
                for (o, c) in out.iter_mut().zip(self.bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            Dtype::F16 => {
                for (o, c) in out.iter_mut().zip(self.bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            Dtype::F32 => {
                for (o, c) in out.iter_mut().zip(self.bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            other => {
                return Err(ModelError::DtypeMismatch {
                    path: self.path.to_path_buf(),
                    name: self.name.to_string(),
                    found: format!("{other:?}"),
                    expected: "BF16, F16 or F32".into(),
                })
            }
        }
        Ok(())
    }

    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.numel()];
        self.to_f32_into(&mut v)?;
        Ok(v)
    }

    /// The raw bytes, insisting on a dtype (used for pre-quantized uint8 tensors).
    pub fn bytes_of(&self, dtype: Dtype) -> Result<&[u8]> {
        if self.dtype != dtype {
            return Err(ModelError::DtypeMismatch {
                path: self.path.to_path_buf(),
                name: self.name.to_string(),
                found: format!("{:?}", self.dtype),
                expected: format!("{dtype:?}"),
            });
        }
        Ok(self.bytes)
    }
}

/// What [`StreamingWriter`] needs to know about a tensor before any data is written.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes one safetensors file tensor by tensor, in the order of the specs given
/// to [`StreamingWriter::create`]. The file is written under a temporary name and
/// renamed into place by [`StreamingWriter::finish`], so a crash never leaves a
/// truncated file that looks complete.
pub struct StreamingWriter {
    out: BufWriter<File>,
    tmp_path: PathBuf,
    final_path: PathBuf,
    specs: Vec<TensorSpec>,
    next: usize,
}

impl StreamingWriter {
    pub fn create(
        path: &Path,
        specs: Vec<TensorSpec>,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<Self> {
        // safetensors requires the header sorted by nothing in particular, but offsets
        // must be contiguous in file order; we keep the caller's order.
        let mut header = serde_json::Map::new();
        if let Some(meta) = metadata {
            header.insert("__metadata__".into(), serde_json::to_value(meta).unwrap());
        }
        let mut offset = 0usize;
        for s in &specs {
            let len = s.byte_len();
            header.insert(
                s.name.clone(),
                serde_json::json!({
                    "dtype": format!("{:?}", s.dtype),
                    "shape": s.shape,
                    "data_offsets": [offset, offset + len],
                }),
            );
            offset += len;
        }
        let mut header_bytes = serde_json::to_vec(&header).expect("header serializes");
        // Pad with spaces to 8-byte alignment, as the reference implementation does.
        while !header_bytes.len().is_multiple_of(8) {
            header_bytes.push(b' ');
        }
        let tmp_path = path.with_extension("safetensors.tmp");
        let file = File::create(&tmp_path).map_err(|e| ModelError::io(&tmp_path, e))?;
        let mut out = BufWriter::with_capacity(1 << 22, file);
        out.write_all(&(header_bytes.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&header_bytes))
            .map_err(|e| ModelError::io(&tmp_path, e))?;
        Ok(Self {
            out,
            tmp_path,
            final_path: path.to_path_buf(),
            specs,
            next: 0,
        })
    }

    /// Writes the next tensor's bytes; they must match its spec's size.
    pub fn write_next(&mut self, bytes: &[u8]) -> Result<()> {
        let spec = self.specs.get(self.next).unwrap_or_else(|| {
            panic!(
                "more tensors written than declared for {:?}",
                self.final_path
            )
        });
        assert_eq!(
            bytes.len(),
            spec.byte_len(),
            "tensor {} byte length does not match its declared shape",
            spec.name
        );
        self.out
            .write_all(bytes)
            .map_err(|e| ModelError::io(&self.tmp_path, e))?;
        self.next += 1;
        Ok(())
    }

    /// The spec of the tensor to be written next.
    pub fn next_spec(&self) -> Option<&TensorSpec> {
        self.specs.get(self.next)
    }

    pub fn finish(mut self) -> Result<()> {
        assert_eq!(
            self.next,
            self.specs.len(),
            "not every declared tensor was written"
        );
        self.out
            .flush()
            .map_err(|e| ModelError::io(&self.tmp_path, e))?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| ModelError::io(&self.tmp_path, e.into_error()))?;
        file.sync_all()
            .map_err(|e| ModelError::io(&self.tmp_path, e))?;
        std::fs::rename(&self.tmp_path, &self.final_path)
            .map_err(|e| ModelError::io(&self.final_path, e))?;
        Ok(())
    }
}

/// f32 → bf16 bytes (round to nearest even, as torch does).
pub fn f32_to_bf16_bytes(src: &[f32], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(src.len() * 2);
    for &v in src {
        out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    }
}

pub fn f32_to_le_bytes(src: &[f32]) -> Vec<u8> {
    src.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_writer_output_reads_back_with_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let specs = vec![
            TensorSpec::new("x", Dtype::F32, &[2, 3]),
            TensorSpec::new("y", Dtype::BF16, &[5]),
        ];
        let mut w = StreamingWriter::create(&path, specs, None).unwrap();
        let x: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        w.write_next(&f32_to_le_bytes(&x)).unwrap();
        let mut y = Vec::new();
        f32_to_bf16_bytes(&[1.0, 2.0, 3.0, -4.0, 0.125], &mut y);
        w.write_next(&y).unwrap();
        w.finish().unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tx = st.tensor("x").unwrap();
        assert_eq!(tx.shape(), &[2, 3]);
        assert_eq!(tx.data(), f32_to_le_bytes(&x).as_slice());
        let ty = st.tensor("y").unwrap();
        assert_eq!(ty.dtype(), Dtype::BF16);

        let sharded = ShardedTensors::open(&[path]).unwrap();
        assert_eq!(
            sharded.get("y").unwrap().to_f32_vec().unwrap(),
            vec![1.0, 2.0, 3.0, -4.0, 0.125]
        );
        let err = sharded.get("z").err().unwrap().to_string();
        assert!(
            err.contains("`z`") && err.contains("a.safetensors"),
            "{err}"
        );
    }
}
