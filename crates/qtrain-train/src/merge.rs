//! Merged full-model export: this module owns writing the source model with
//! `W + scale * B @ A` in place of every adapted projection, as bf16 Hugging Face
//! safetensors shards with `config.json` and tokenizer files, loadable by
//! transformers and vLLM without PEFT.
//!
//! The export streams: tensors are read from the memory-mapped source one at a time,
//! merged in f32 and written out, and their pages are released, so memory holds one
//! projection, not the model.
//!
//! The merge base is either the original weights (what users usually ship) or the
//! NF4 round trip of them (exactly the base the adapter was trained against, so the
//! merged model computes what the training run evaluated). A source that is already
//! bitsandbytes pre-quantized has no original weights: its NF4 data is dequantized.

use crate::peft::PeftAdapter;
use qtrain_model::safetensors_io::{RawTensor, ShardedTensors, StreamingWriter, TensorSpec};
use qtrain_model::{ModelConfig, ModelError, Proj, PROJECTIONS};
use qtrain_step::HostTensor;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What `W` is in `W + scale * B @ A`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeBase {
    /// The source checkpoint's weights.
    Original,
    /// `dequantize(quantize_nf4(W))`: the frozen base the adapter was trained on.
    Dequantized,
}

/// Everything [`export_merged_with`] needs besides the paths and the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeOptions {
    pub base: MergeBase,
    /// Largest shard in bytes; one tensor larger than this gets a shard of its own.
    pub max_shard_bytes: usize,
    /// NF4 settings of the training run, for [`MergeBase::Dequantized`] (the
    /// double-quantized absmax changes the dequantized values slightly).
    pub nf4_blocksize: usize,
    pub nf4_double_quant: bool,
}

impl MergeOptions {
    /// qtrain's default NF4 settings (block size 64, double quantization).
    pub fn new(base: MergeBase, max_shard_bytes: usize) -> Self {
        Self {
            base,
            max_shard_bytes,
            nf4_blocksize: 64,
            nf4_double_quant: true,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeSummary {
    /// Weight files in order (`model.safetensors` or `model-0000i-of-0000n.safetensors`).
    pub files: Vec<String>,
    pub tensors: usize,
    /// Projections that received an adapter delta.
    pub merged: usize,
    /// Bytes of tensor data (the index's `total_size`).
    pub total_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("adapter tensor `{tensor}`: {msg}")]
    Adapter { tensor: String, msg: String },
    #[error("{path}: {msg}")]
    OutDir { path: PathBuf, msg: String },
}

/// `w += scale * b @ a` with `w: [out, in]`, `b: [out, r]`, `a: [r, in]`, in f32.
///
/// The delta `scale * b @ a` is computed in f32 and added once per element, as
/// `W + scale * (B @ A)`. `a` (r x in, 256 KB at r = 16, in = 4096) stays in cache
/// while every output row streams past it; rows are split across threads.
pub fn add_lora(w: &mut [f32], a: &[f32], b: &[f32], out: usize, r: usize, inp: usize, scale: f32) {
    assert_eq!(w.len(), out * inp, "w is not [out, in]");
    assert_eq!(a.len(), r * inp, "a is not [r, in]");
    assert_eq!(b.len(), out * r, "b is not [out, r]");
    if out == 0 || inp == 0 {
        return;
    }
    let rows = |w: &mut [f32], first: usize| {
        let mut c = vec![0f32; r];
        for (j, row) in w.chunks_exact_mut(inp).enumerate() {
            let o = first + j;
            for (ck, &bk) in c.iter_mut().zip(&b[o * r..(o + 1) * r]) {
                *ck = scale * bk;
            }
            add_row(row, a, &c, inp);
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Threads only pay off for real projections, not the tiny test models.
    if threads == 1 || out * r * inp < (1 << 22) {
        rows(w, 0);
        return;
    }
    let per = out.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, chunk) in w.chunks_mut(per * inp).enumerate() {
            s.spawn(move || rows(chunk, t * per));
        }
    });
}

/// `row += sum_k c[k] * a[k, :]` for one output row. Columns are taken `LANES` at a
/// time with the sum over `k` (the rank) innermost, accumulated in registers, so
/// each element of `row` is loaded and stored once rather than `r` times, and the
/// fixed-size lane loop vectorizes.
fn add_row(row: &mut [f32], a: &[f32], c: &[f32], inp: usize) {
    const LANES: usize = 16;
    let full = inp - inp % LANES;
    for i0 in (0..full).step_by(LANES) {
        let mut acc = [0f32; LANES];
        for (k, &ck) in c.iter().enumerate() {
            let ar: &[f32; LANES] = a[k * inp + i0..k * inp + i0 + LANES]
                .try_into()
                .expect("LANES columns");
            for j in 0..LANES {
                acc[j] += ck * ar[j];
            }
        }
        for (x, d) in row[i0..i0 + LANES].iter_mut().zip(acc) {
            *x += d;
        }
    }
    for (i, x) in row.iter_mut().enumerate().skip(full) {
        *x += c
            .iter()
            .enumerate()
            .map(|(k, &ck)| ck * a[k * inp + i])
            .sum::<f32>();
    }
}

/// Compares tensor names with numbers as numbers, so `layers.2` precedes
/// `layers.10` and the output follows the model's structure.
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|seg| match seg.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, seg.to_string()),
        })
        .collect()
}

/// The source tensor as bf16 bytes: copied when it already is bf16 (so untouched
/// tensors are byte-identical), else rounded to nearest even.
fn to_bf16_bytes(raw: &RawTensor<'_>, out: &mut Vec<u8>) -> Result<(), ModelError> {
    out.clear();
    match raw.dtype {
        safetensors::Dtype::BF16 => out.extend_from_slice(raw.bytes),
        _ => {
            let v = raw.to_f32_vec()?;
            out.reserve(v.len() * 2);
            for x in v {
                out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
            }
        }
    }
    Ok(())
}

/// An adapter's `(lora_A, lora_B)` for one projection.
type LoraPair<'a> = (&'a HostTensor, &'a HostTensor);

/// A projection weight of the source and its adapter pair, if any.
struct Target<'a> {
    layer: usize,
    proj: Proj,
    pair: Option<LoraPair<'a>>,
}

/// Matches the adapter's tensors with the model's projections before anything is
/// written: every tensor must belong to an existing projection, come in an A/B
/// pair, and have that projection's shape at the adapter's rank.
fn pair_adapter<'a>(
    adapter: &'a PeftAdapter,
    cfg: &ModelConfig,
    st: &ShardedTensors,
) -> Result<HashMap<(usize, Proj), LoraPair<'a>>, MergeError> {
    let r = adapter.settings.rank;
    let mut parts: BTreeMap<(usize, Proj), [Option<&HostTensor>; 2]> = BTreeMap::new();
    for t in &adapter.tensors {
        let name = t.0.as_str();
        let bad = |msg: String| MergeError::Adapter {
            tensor: name.to_string(),
            msg,
        };
        let parsed = name.strip_prefix("layers.").and_then(|rest| {
            let (l, rest) = rest.split_once('.')?;
            let (p, part) = rest.split_once('.')?;
            let part = ["lora_A", "lora_B"].iter().position(|x| *x == part)?;
            Some((l.parse::<usize>().ok()?, Proj::from_name(p)?, part))
        });
        let (layer, proj, part) = parsed
            .ok_or_else(|| bad("not a LoRA tensor name (layers.N.PROJ.lora_A|lora_B)".into()))?;
        if layer >= cfg.num_hidden_layers {
            return Err(bad(format!(
                "layer {layer}, but the model has {} layers",
                cfg.num_hidden_layers
            )));
        }
        if !st.contains(&proj.weight_name(layer)) {
            return Err(bad(format!(
                "the model has no tensor {}",
                proj.weight_name(layer)
            )));
        }
        let [out, inp] = cfg.proj_shape(proj);
        let want = if part == 0 { [r, inp] } else { [out, r] };
        if t.2 != want {
            return Err(bad(format!(
                "shape {:?}, but the weight [{out}, {inp}] at r = {r} needs {want:?}",
                t.2
            )));
        }
        if t.1.len() != want[0] * want[1] {
            return Err(bad(format!("{} values for shape {want:?}", t.1.len())));
        }
        let slot = &mut parts.entry((layer, proj)).or_default()[part];
        if slot.is_some() {
            return Err(bad("appears twice".into()));
        }
        *slot = Some(t);
    }
    parts
        .into_iter()
        .map(|((l, p), [a, b])| match (a, b) {
            (Some(a), Some(b)) => Ok(((l, p), (a, b))),
            _ => Err(MergeError::Adapter {
                tensor: format!(
                    "layers.{l}.{}.{}",
                    p.name(),
                    ["lora_A", "lora_B"][a.is_some() as usize]
                ),
                msg: "missing: the adapter has only one of lora_A, lora_B".into(),
            }),
        })
        .collect()
}

/// Refuses an output directory that is the source or already holds model weights:
/// writing there would destroy the source (which is being read through mmap) or
/// leave a mix of old and new shards that loaders would combine.
fn check_out_dir(source_dir: &Path, out_dir: &Path) -> Result<(), MergeError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MergeError::Model(ModelError::Io { path, source })
    };
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let same = source_dir.canonicalize().map_err(io(source_dir))?
        == out_dir.canonicalize().map_err(io(out_dir))?;
    if same {
        return Err(MergeError::OutDir {
            path: out_dir.to_path_buf(),
            msg: "is the source model directory; choose another output directory".into(),
        });
    }
    for e in std::fs::read_dir(out_dir).map_err(io(out_dir))? {
        let name = e.map_err(io(out_dir))?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            return Err(MergeError::OutDir {
                path: out_dir.join(name.as_ref()),
                msg: "already exists; merge into an empty directory (or remove the old \
                      model files)"
                    .into(),
            });
        }
    }
    Ok(())
}

fn write_json_atomic(path: &Path, json: &serde_json::Value) -> Result<(), MergeError> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(json).expect("json serializes");
    std::fs::write(&tmp, text).map_err(|source| ModelError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// [`export_merged_with`] with qtrain's default NF4 settings.
pub fn export_merged(
    source_dir: &Path,
    adapter: &PeftAdapter,
    out_dir: &Path,
    base: MergeBase,
    max_shard_bytes: usize,
) -> Result<MergeSummary, MergeError> {
    export_merged_with(
        source_dir,
        adapter,
        out_dir,
        &MergeOptions::new(base, max_shard_bytes),
    )
}

/// The merged model, one tensor at a time: the source checkpoint with
/// `W + scale * B @ A` in every adapted projection, each tensor rounded to bf16 as
/// the merged export stores it. Both the safetensors export ([`export_merged_with`])
/// and the GGUF export read their tensors from here, so they hold the same values.
///
/// Tensors are read from the memory-mapped source on demand and their pages
/// released after, so memory holds one projection, not the model.
pub struct MergedModel<'a> {
    source_dir: PathBuf,
    cfg: ModelConfig,
    st: ShardedTensors,
    adapter: &'a PeftAdapter,
    opts: MergeOptions,
    prequant: bool,
    /// Output tensors in output order, with their projection and adapter pair.
    names: Vec<String>,
    targets: Vec<Option<Target<'a>>>,
    merged: usize,
}

impl<'a> MergedModel<'a> {
    /// Opens the source and matches the adapter to its projections (every adapter
    /// tensor must fit, before anything is read).
    pub fn open(
        source_dir: &Path,
        adapter: &'a PeftAdapter,
        opts: &MergeOptions,
    ) -> Result<Self, MergeError> {
        let cfg = ModelConfig::from_file(&source_dir.join("config.json"))?;
        let st = ShardedTensors::open_model_dir(source_dir)?;
        let pairs = pair_adapter(adapter, &cfg, &st)?;
        let prequant = cfg.is_prequantized();
        if prequant && opts.base == MergeBase::Original {
            tracing::warn!(
                "{}: the source is NF4 pre-quantized; merging into its dequantized weights",
                source_dir.display()
            );
        }
        let weight_names: HashMap<String, (usize, Proj)> = (0..cfg.num_hidden_layers)
            .flat_map(|l| PROJECTIONS.iter().map(move |&p| (p.weight_name(l), (l, p))))
            .collect();
        // The dense tensors of the output: every source tensor except bitsandbytes'
        // quant state (`<proj>.weight.absmax`, `.quant_map`, ...), which
        // pre-quantized sources carry next to each packed weight.
        let mut names: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| !prequant || weight_names.contains_key(*n) || !n.contains(".weight."))
            .map(str::to_string)
            .collect();
        names.sort_by_cached_key(|n| natural_key(n));
        let targets = names
            .iter()
            .map(|n| {
                weight_names.get(n).map(|&(layer, proj)| Target {
                    layer,
                    proj,
                    pair: pairs.get(&(layer, proj)).copied(),
                })
            })
            .collect();
        Ok(Self {
            source_dir: source_dir.to_path_buf(),
            cfg,
            st,
            adapter,
            opts: *opts,
            prequant,
            names,
            targets,
            merged: 0,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn source_dir(&self) -> &Path {
        &self.source_dir
    }

    /// Output tensor names, in output order (layers in numeric order).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Projections that received an adapter delta so far.
    pub fn merged(&self) -> usize {
        self.merged
    }

    /// The shape of output tensor `i`.
    pub fn shape(&self, i: usize) -> Result<Vec<usize>, MergeError> {
        Ok(match &self.targets[i] {
            // A packed NF4 weight is stored [n, 1]; its real shape is the config's.
            Some(t) => self.cfg.proj_shape(t.proj).to_vec(),
            None => self.st.get(&self.names[i])?.shape.to_vec(),
        })
    }

    /// Output tensor `i` as bf16 bytes into `buf`, then releases its source pages.
    pub fn bf16_bytes(&mut self, i: usize, buf: &mut Vec<u8>) -> Result<(), MergeError> {
        let name = self.names[i].as_str();
        let (st, cfg, opts, prequant) = (&self.st, &self.cfg, &self.opts, self.prequant);
        match &self.targets[i] {
            // A projection is rewritten only when it changes: with the original
            // base and no adapter pair it is copied like any other tensor.
            Some(t) if prequant || opts.base == MergeBase::Dequantized || t.pair.is_some() => {
                let shape = cfg.proj_shape(t.proj);
                let mut v = if prequant {
                    qtrain_model::bnb::read_nf4(st, name)?.dequantize_to_vec()
                } else {
                    st.get(name)?.to_f32_vec()?
                };
                if v.len() != shape[0] * shape[1] {
                    return Err(ModelError::ShapeMismatch {
                        path: st.get(name)?.path.to_path_buf(),
                        name: name.to_string(),
                        found: vec![v.len()],
                        expected: shape.to_vec(),
                    }
                    .into());
                }
                if opts.base == MergeBase::Dequantized && !prequant {
                    v = qtrain_quant::Nf4Tensor::quantize(
                        &v,
                        &shape,
                        opts.nf4_blocksize,
                        opts.nf4_double_quant,
                    )
                    .map_err(|source| ModelError::Quant {
                        path: st
                            .get(name)
                            .map(|r| r.path.to_path_buf())
                            .unwrap_or_default(),
                        name: name.to_string(),
                        source,
                    })?
                    .dequantize_to_vec();
                }
                if let Some((a, b)) = t.pair {
                    let [out, inp] = shape;
                    let scale = self.adapter.settings.scale() as f32;
                    add_lora(
                        &mut v,
                        &a.1,
                        &b.1,
                        out,
                        self.adapter.settings.rank,
                        inp,
                        scale,
                    );
                    self.merged += 1;
                    tracing::debug!("merged layer {} {}", t.layer, t.proj.name());
                }
                qtrain_model::safetensors_io::f32_to_bf16_bytes(&v, buf);
            }
            _ => to_bf16_bytes(&st.get(name)?, buf)?,
        }
        // The pages of this tensor are not needed again; without this a 14 GB
        // source would end up resident through the mapping.
        self.st.release(name);
        Ok(())
    }
}

/// Writes the merged model into `out_dir`: weights (sharded when larger than
/// `max_shard_bytes`, with `model.safetensors.index.json`), tokenizer files, and
/// `config.json` last (without `quantization_config`), so a directory with a config
/// is a complete model.
pub fn export_merged_with(
    source_dir: &Path,
    adapter: &PeftAdapter,
    out_dir: &Path,
    opts: &MergeOptions,
) -> Result<MergeSummary, MergeError> {
    let mut model = MergedModel::open(source_dir, adapter, opts)?;
    check_out_dir(source_dir, out_dir)?;
    let n = model.names().len();
    let shapes = (0..n)
        .map(|i| model.shape(i))
        .collect::<Result<Vec<_>, _>>()?;

    // Shards in output order, greedy by bf16 size, as HF's save_pretrained does.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0usize;
    for (i, shape) in shapes.iter().enumerate() {
        let bytes = shape.iter().product::<usize>() * 2;
        if size > 0 && size + bytes > opts.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("at least one shard").push(i);
    }
    let count = shards.len();
    let mut summary = MergeSummary {
        files: Vec::with_capacity(count),
        tensors: n,
        merged: 0,
        total_bytes: 0,
    };
    let mut weight_map = serde_json::Map::new();
    let mut buf = Vec::new();
    for (si, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", si + 1)
        };
        let specs = shard
            .iter()
            .map(|&i| TensorSpec::new(&model.names()[i], safetensors::Dtype::BF16, &shapes[i]))
            .collect::<Vec<_>>();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let mut w = StreamingWriter::create(&out_dir.join(&file), specs, Some(meta))?;
        for &i in shard {
            model.bf16_bytes(i, &mut buf)?;
            w.write_next(&buf)?;
            weight_map.insert(model.names()[i].clone(), file.clone().into());
            summary.total_bytes += buf.len();
        }
        w.finish()?;
        summary.files.push(file);
    }
    summary.merged = model.merged();
    if count > 1 {
        write_json_atomic(
            &out_dir.join("model.safetensors.index.json"),
            &serde_json::json!({
                "metadata": { "total_size": summary.total_bytes },
                "weight_map": weight_map,
            }),
        )?;
    }
    qtrain_model::bnb::copy_tokenizer_files(source_dir, out_dir)?;
    let mut json = model.config().to_json();
    let obj = json.as_object_mut().expect("config is an object");
    obj.remove("quantization_config");
    // Marks qtrain's quantized cache; the merged model is not one.
    obj.remove("qtrain_cache_format");
    obj.insert("torch_dtype".into(), "bfloat16".into());
    // Newer transformers write `dtype` instead; keep the two in agreement.
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), "bfloat16".into());
    }
    write_json_atomic(&out_dir.join("config.json"), &json)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::PeftSettings;

    const TOK: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"<unk>":0,"a":1},"unk_token":"<unk>"}}"#;

    #[test]
    fn add_lora_matches_naive() {
        // Large enough to take the threaded path, odd sizes to split unevenly.
        for (o, r, i) in [(3, 2, 4), (517, 16, 1031)] {
            let a: Vec<f32> = (0..r * i)
                .map(|x| ((x * 7) % 13) as f32 * 0.1 - 0.6)
                .collect();
            let b: Vec<f32> = (0..o * r)
                .map(|x| 1.0 - ((x * 5) % 11) as f32 * 0.3)
                .collect();
            let w0: Vec<f32> = (0..o * i).map(|x| (x % 17) as f32 * 0.01).collect();
            let mut w = w0.clone();
            add_lora(&mut w, &a, &b, o, r, i, 2.0);
            for oo in 0..o {
                for ii in 0..i {
                    let d: f64 = (0..r)
                        .map(|k| b[oo * r + k] as f64 * a[k * i + ii] as f64)
                        .sum();
                    let want = w0[oo * i + ii] as f64 + 2.0 * d;
                    let got = w[oo * i + ii] as f64;
                    assert!((got - want).abs() < 1e-4, "({oo}, {ii}): {got} vs {want}");
                }
            }
        }
    }

    fn tiny_model(dir: &Path, shard_bytes: usize) -> ModelConfig {
        let mut cfg = ModelConfig::preset("tiny", 64).unwrap();
        cfg.hidden_size = 64;
        cfg.head_dim = Some(16);
        cfg.num_attention_heads = 4;
        cfg.num_key_value_heads = Some(2);
        cfg.intermediate_size = 96;
        cfg.num_hidden_layers = 2;
        qtrain_model::random::write_random_model(
            dir,
            &cfg,
            7,
            shard_bytes,
            TOK,
            &serde_json::json!({"model_max_length": 128}),
        )
        .unwrap();
        cfg
    }

    /// An adapter on q_proj of layer 1 and down_proj of layer 0, with deltas large
    /// against bf16 rounding so a missing or wrong merge cannot pass.
    fn adapter(cfg: &ModelConfig) -> PeftAdapter {
        let r = 3;
        let mut tensors = Vec::new();
        for (l, p) in [(0, Proj::Down), (1, Proj::Q)] {
            let [o, i] = cfg.proj_shape(p);
            let a: Vec<f32> = (0..r * i)
                .map(|x| ((x * 31) % 19) as f32 * 0.02 - 0.18)
                .collect();
            let b: Vec<f32> = (0..o * r)
                .map(|x| ((x * 17) % 23) as f32 * 0.03 - 0.33)
                .collect();
            tensors.push((format!("layers.{l}.{}.lora_A", p.name()), a, vec![r, i]));
            tensors.push((format!("layers.{l}.{}.lora_B", p.name()), b, vec![o, r]));
        }
        PeftAdapter {
            settings: PeftSettings {
                rank: r,
                alpha: 6.0,
                dropout: 0.0,
                targets: vec![Proj::Q, Proj::Down],
                rslora: false,
                base_model: "x".into(),
            },
            tensors,
        }
    }

    fn f32s(st: &ShardedTensors, n: &str) -> Vec<f32> {
        st.get(n).unwrap().to_f32_vec().unwrap()
    }

    /// `W + 2 * B @ A` computed here in f64, independent of `add_lora`; every entry
    /// must be within one bf16 rounding of it.
    fn assert_merged(w_base: &[f32], got: &[f32], a: &HostTensor, b: &HostTensor, what: &str) {
        let (r, inp) = (a.2[0], a.2[1]);
        let out = b.2[0];
        let mut big = 0;
        for o in 0..out {
            for i in 0..inp {
                let d: f64 = (0..r)
                    .map(|k| b.1[o * r + k] as f64 * a.1[k * inp + i] as f64)
                    .sum::<f64>()
                    * 2.0;
                let want = w_base[o * inp + i] as f64 + d;
                let g = got[o * inp + i] as f64;
                // One bf16 ulp of the result (8 significant bits), plus slack for
                // f32 accumulation.
                let tol = want.abs() * 2f64.powi(-8) + 1e-6;
                assert!((g - want).abs() <= tol, "{what} ({o}, {i}): {g} vs {want}");
                if d.abs() > 10.0 * tol {
                    big += 1;
                }
            }
        }
        assert!(
            big > out * inp / 2,
            "{what}: the deltas are too small to test"
        );
    }

    fn pair(ad: &PeftAdapter, l: usize, p: Proj) -> LoraPair<'_> {
        let find = |part: &str| {
            ad.tensors
                .iter()
                .find(|t| t.0 == format!("layers.{l}.{}.{part}", p.name()))
                .unwrap()
        };
        (find("lora_A"), find("lora_B"))
    }

    #[test]
    fn merged_export_applies_adapter_and_copies_the_rest() {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let cfg = tiny_model(src.path(), usize::MAX);
        let ad = adapter(&cfg);
        let shard = 40_000;
        let summary =
            export_merged(src.path(), &ad, out.path(), MergeBase::Original, shard).unwrap();
        assert_eq!(summary.merged, 2);
        assert!(summary.files.len() > 2, "{:?}", summary.files);

        // Sharding: the index names every tensor, each in a shard within the limit
        // (or alone), and the shard files are exactly those listed.
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let map = index["weight_map"].as_object().unwrap();
        let s_in = ShardedTensors::open_model_dir(src.path()).unwrap();
        let s_out = ShardedTensors::open_model_dir(out.path()).unwrap();
        assert_eq!(s_in.names(), s_out.names());
        assert_eq!(map.len(), s_in.names().len());
        assert_eq!(
            index["metadata"]["total_size"].as_u64().unwrap() as usize,
            cfg.num_parameters() * 2
        );
        let n = summary.files.len();
        for (k, f) in summary.files.iter().enumerate() {
            assert_eq!(f, &format!("model-{:05}-of-{n:05}.safetensors", k + 1));
            let len = std::fs::metadata(out.path().join(f)).unwrap().len() as usize;
            let tensors_in = map.values().filter(|v| v.as_str() == Some(f)).count();
            assert!(tensors_in == 1 || len < shard + 4096, "{f}: {len} bytes");
        }

        // Untouched tensors are byte-identical (the source is bf16).
        for name in s_in.names() {
            let changed = name == "model.layers.1.self_attn.q_proj.weight"
                || name == "model.layers.0.mlp.down_proj.weight";
            let a = s_in.get(name).unwrap();
            let b = s_out.get(name).unwrap();
            assert_eq!(b.dtype, safetensors::Dtype::BF16);
            assert_eq!(a.shape, b.shape, "{name}");
            assert_eq!(a.bytes != b.bytes, changed, "{name}");
        }
        for (l, p) in [(1, Proj::Q), (0, Proj::Down)] {
            let n = p.weight_name(l);
            let (a, b) = pair(&ad, l, p);
            assert_merged(&f32s(&s_in, &n), &f32s(&s_out, &n), a, b, &n);
        }

        assert_eq!(
            std::fs::read_to_string(out.path().join("tokenizer.json")).unwrap(),
            TOK
        );
        assert!(out.path().join("tokenizer_config.json").exists());
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        assert!(c.get("quantization_config").is_none());
        assert_eq!(c["torch_dtype"], "bfloat16");
        assert_eq!(c["hidden_size"], 64);
        let back = ModelConfig::from_file(&out.path().join("config.json")).unwrap();
        assert!(!back.is_prequantized());

        // A second export into the same directory is refused, not mixed in.
        let e = export_merged(src.path(), &ad, out.path(), MergeBase::Original, shard)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already exists"), "{e}");
        let e = export_merged(src.path(), &ad, src.path(), MergeBase::Original, shard)
            .unwrap_err()
            .to_string();
        assert!(e.contains("source model directory"), "{e}");
    }

    #[test]
    fn dequantized_base_is_the_nf4_round_trip_also_from_a_prequantized_source() {
        let src = tempfile::tempdir().unwrap();
        let cfg = tiny_model(src.path(), usize::MAX);
        let ad = adapter(&cfg);
        let out = tempfile::tempdir().unwrap();
        let summary = export_merged(
            src.path(),
            &ad,
            out.path(),
            MergeBase::Dequantized,
            usize::MAX,
        )
        .unwrap();
        assert_eq!(summary.files, vec!["model.safetensors".to_string()]);
        assert!(!out.path().join("model.safetensors.index.json").exists());
        let s_in = ShardedTensors::open_model_dir(src.path()).unwrap();
        let s_out = ShardedTensors::open_model_dir(out.path()).unwrap();
        let round_trip = |n: &str, p: Proj| {
            qtrain_quant::Nf4Tensor::quantize(&f32s(&s_in, n), &cfg.proj_shape(p), 64, true)
                .unwrap()
                .dequantize_to_vec()
        };
        // Untargeted projections: exactly the NF4 round trip, rounded to bf16.
        for l in 0..cfg.num_hidden_layers {
            for p in PROJECTIONS {
                let n = p.weight_name(l);
                let rt = round_trip(&n, p);
                let got = f32s(&s_out, &n);
                match ad
                    .tensors
                    .iter()
                    .any(|t| t.0.starts_with(&format!("layers.{l}.{}.", p.name())))
                {
                    false => assert!(
                        got.iter()
                            .zip(&rt)
                            .all(|(g, w)| *g == half::bf16::from_f32(*w).to_f32()),
                        "{n}"
                    ),
                    true => {
                        let (a, b) = pair(&ad, l, p);
                        assert_merged(&rt, &got, a, b, &n);
                    }
                }
            }
        }
        // The round trip differs from the original, so the test can tell them apart.
        let n = Proj::K.weight_name(0);
        assert_ne!(f32s(&s_in, &n), f32s(&s_out, &n));

        // The same model saved in bitsandbytes format merges to identical bytes:
        // its NF4 data is what `Dequantized` recomputes.
        let bnb = tempfile::tempdir().unwrap();
        let model =
            qtrain_model::BaseModel::load(src.path(), &qtrain_model::LoadOptions::cpu_f32())
                .unwrap();
        qtrain_model::bnb::save_quantized(&model, bnb.path()).unwrap();
        drop(model);
        assert!(ModelConfig::from_file(&bnb.path().join("config.json"))
            .unwrap()
            .is_prequantized());
        let out2 = tempfile::tempdir().unwrap();
        export_merged(
            bnb.path(),
            &ad,
            out2.path(),
            MergeBase::Original,
            usize::MAX,
        )
        .unwrap();
        let s2 = ShardedTensors::open_model_dir(out2.path()).unwrap();
        assert_eq!(s2.names(), s_out.names(), "quant state is not exported");
        for n in s_out.names() {
            assert_eq!(s2.get(n).unwrap().bytes, s_out.get(n).unwrap().bytes, "{n}");
        }
        let c: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out2.path().join("config.json")).unwrap(),
        )
        .unwrap();
        assert!(c.get("quantization_config").is_none());
        assert!(c.get("qtrain_cache_format").is_none());
    }

    #[test]
    fn sharded_source_and_rslora_scale() {
        let src = tempfile::tempdir().unwrap();
        let cfg = tiny_model(src.path(), 30_000);
        assert!(src.path().join("model.safetensors.index.json").exists());
        let mut ad = adapter(&cfg);
        ad.settings.rslora = true;
        // alpha / sqrt(r) = 2 when alpha = 2 * sqrt(3): the same deltas as above.
        ad.settings.alpha = 2.0 * 3f64.sqrt();
        let out = tempfile::tempdir().unwrap();
        export_merged(src.path(), &ad, out.path(), MergeBase::Original, usize::MAX).unwrap();
        let s_in = ShardedTensors::open_model_dir(src.path()).unwrap();
        let s_out = ShardedTensors::open_model_dir(out.path()).unwrap();
        let n = Proj::Q.weight_name(1);
        let (a, b) = pair(&ad, 1, Proj::Q);
        assert_merged(&f32s(&s_in, &n), &f32s(&s_out, &n), a, b, &n);
    }

    #[test]
    fn adapters_that_do_not_fit_the_model_are_refused_before_writing() {
        let src = tempfile::tempdir().unwrap();
        let cfg = tiny_model(src.path(), usize::MAX);
        let good = adapter(&cfg);
        type Edit = Box<dyn Fn(&mut PeftAdapter)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|a| a.tensors[0].0 = "layers.5.down_proj.lora_A".into()),
                "the model has 2 layers",
            ),
            (
                Box::new(|a| {
                    a.tensors.remove(3);
                }),
                "only one of lora_A, lora_B",
            ),
            (
                Box::new(|a| {
                    a.tensors[2].2 = vec![3, 32];
                    a.tensors[2].1.truncate(96);
                }),
                "needs [3, 64]",
            ),
            (
                Box::new(|a| a.tensors[0].0 = "bogus".into()),
                "not a LoRA tensor name",
            ),
        ];
        for (edit, why) in cases {
            let mut ad = good.clone();
            edit(&mut ad);
            let out = tempfile::tempdir().unwrap();
            let e = export_merged(src.path(), &ad, out.path(), MergeBase::Original, usize::MAX)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(why) && e.contains("adapter tensor `"),
                "{why}: {e}"
            );
            assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0, "{why}");
        }
    }
}
