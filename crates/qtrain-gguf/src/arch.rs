//! The model as llama.cpp names it: which llama.cpp architecture a Hugging Face
//! `config.json` maps to, the architecture metadata (`{arch}.*` keys), the tensor
//! names (`token_embd`, `blk.N.attn_q`, ...) and the transforms llama.cpp's
//! converter applies on the way (`LlamaModel.permute` of the q/k rows, the Llama 3.1
//! `rope_freqs` tensor).
//!
//! Families: Llama and Mistral (`llama`), Qwen 2 / 2.5 (`qwen2`, with q/k/v biases)
//! and Qwen 3 (`qwen3`, with q/k norms). Anything else is refused by name.

use crate::error::GgufError;
use crate::writer::Metadata;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

/// A llama.cpp architecture qtrain exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// RoPE scaling as llama.cpp takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f32,
    },
    Yarn {
        factor: f32,
        original_context: u32,
        ext_factor: Option<f32>,
        attn_factor: Option<f32>,
        beta_fast: Option<f32>,
        beta_slow: Option<f32>,
    },
    /// Dynamic NTK scaling: it changes RoPE only past the trained context, and
    /// llama.cpp has no such mode for these architectures, so nothing is written
    /// (with a note).
    Dynamic {
        factor: f32,
    },
    /// Llama 3.1's frequency-dependent scaling: a `rope_freqs.weight` tensor.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: f32,
    },
}

/// The shapes and settings of `config.json` that the GGUF needs.
#[derive(Debug, Clone, PartialEq)]
pub struct HfModel {
    pub path: PathBuf,
    pub model_type: String,
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Stated `head_dim` (written as key/value length when present).
    pub head_dim: Option<usize>,
    pub context_length: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    /// Qwen's switch for its sliding window (off in the released models).
    pub use_sliding_window: bool,
}

impl HfModel {
    /// Reads `dir/config.json`; an unsupported family is refused with the reason.
    pub fn from_dir(dir: &Path) -> Result<Self, GgufError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| GgufError::io(&path, e))?;
        let raw: Json = serde_json::from_str(&text).map_err(|e| GgufError::Json {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Self::from_json(&raw, &path)
    }

    pub fn from_json(raw: &Json, path: &Path) -> Result<Self, GgufError> {
        let field = |key: &str, msg: String| GgufError::Field {
            path: path.to_path_buf(),
            key: key.into(),
            msg,
        };
        let usize_of = |key: &str| -> Result<Option<usize>, GgufError> {
            match raw.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|x| Some(x as usize))
                    .ok_or_else(|| field(key, format!("{v} is not a non-negative integer"))),
            }
        };
        let need = |key: &str| -> Result<usize, GgufError> {
            usize_of(key)?.ok_or_else(|| field(key, "missing".into()))
        };
        let f32_of = |v: Option<&Json>, key: &str| -> Result<Option<f32>, GgufError> {
            match v {
                None | Some(Json::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(|x| Some(x as f32))
                    .ok_or_else(|| field(key, format!("{v} is not a number"))),
            }
        };
        let model_type = raw
            .get("model_type")
            .and_then(Json::as_str)
            .ok_or_else(|| field("model_type", "missing".into()))?
            .to_string();
        let arch = match model_type.as_str() {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            other => {
                return Err(GgufError::Unsupported {
                    path: path.to_path_buf(),
                    msg: format!(
                        "model_type `{other}`: qtrain writes GGUF for llama, mistral (llama.cpp \
                         architecture `llama`), qwen2 and qwen3"
                    ),
                })
            }
        };
        if raw.get("num_local_experts").is_some() || raw.get("num_experts").is_some() {
            return Err(GgufError::Unsupported {
                path: path.to_path_buf(),
                msg: "mixture-of-experts models are not exported to GGUF by qtrain".into(),
            });
        }
        let n_heads = need("num_attention_heads")?;
        let hidden_size = need("hidden_size")?;
        let n_kv_heads = usize_of("num_key_value_heads")?.unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(field(
                "num_key_value_heads",
                format!("{n_kv_heads} does not divide num_attention_heads {n_heads}"),
            ));
        }
        // transformers 5 keeps theta and scaling in `rope_parameters`; older
        // configs use `rope_theta` and `rope_scaling`.
        let rope = raw
            .get("rope_parameters")
            .filter(|v| v.is_object())
            .or_else(|| raw.get("rope_scaling").filter(|v| v.is_object()));
        let rope_theta = f32_of(raw.get("rope_theta"), "rope_theta")?
            .or(f32_of(
                rope.and_then(|r| r.get("rope_theta")),
                "rope_parameters.rope_theta",
            )?)
            .unwrap_or(10_000.0);
        let context_length = need("max_position_embeddings")?;
        let rope_scaling = match rope {
            None => RopeScaling::None,
            Some(r) => {
                let kind = r
                    .get("rope_type")
                    .or_else(|| r.get("type"))
                    .and_then(Json::as_str)
                    .unwrap_or("default");
                let get = |k: &str| f32_of(r.get(k), &format!("rope_scaling.{k}"));
                let factor = get("factor")?;
                match (kind, factor) {
                    ("default", _) => RopeScaling::None,
                    ("linear", Some(factor)) => RopeScaling::Linear { factor },
                    ("dynamic", Some(factor)) => RopeScaling::Dynamic { factor },
                    ("yarn", Some(factor)) => RopeScaling::Yarn {
                        factor,
                        original_context: r
                            .get("original_max_position_embeddings")
                            .and_then(Json::as_u64)
                            .ok_or_else(|| {
                                field(
                                    "rope_scaling.original_max_position_embeddings",
                                    "missing for yarn".into(),
                                )
                            })? as u32,
                        ext_factor: get("extrapolation_factor")?,
                        attn_factor: get("attention_factor")?.or(get("attn_factor")?),
                        beta_fast: get("beta_fast")?,
                        beta_slow: get("beta_slow")?,
                    },
                    ("llama3", _) => RopeScaling::Llama3 {
                        factor: factor.unwrap_or(8.0),
                        low_freq_factor: get("low_freq_factor")?.unwrap_or(1.0),
                        high_freq_factor: get("high_freq_factor")?.unwrap_or(4.0),
                        original_context: get("original_max_position_embeddings")?
                            .unwrap_or(8192.0),
                    },
                    (kind, _) => {
                        return Err(GgufError::Unsupported {
                            path: path.to_path_buf(),
                            msg: format!(
                                "rope scaling `{kind}`: qtrain writes GGUF for default, linear, \
                                 yarn and llama3 RoPE"
                            ),
                        })
                    }
                }
            }
        };
        let m = Self {
            path: path.to_path_buf(),
            model_type,
            arch,
            vocab_size: need("vocab_size")?,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            n_layers: need("num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim: usize_of("head_dim")?,
            context_length,
            rms_norm_eps: f32_of(raw.get("rms_norm_eps"), "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw
                .get("tie_word_embeddings")
                .and_then(Json::as_bool)
                .unwrap_or(false),
            sliding_window: usize_of("sliding_window")?,
            use_sliding_window: raw
                .get("use_sliding_window")
                .and_then(Json::as_bool)
                .unwrap_or(false),
        };
        if m.arch == Arch::Llama && m.head_dim.is_some_and(|h| h * n_heads != hidden_size) {
            // llama.cpp's llama architecture runs RoPE over the whole head and needs
            // n_rot == head size; a head_dim that differs from hidden/heads is fine,
            // it is written as key/value length.
            tracing::debug!(
                "{}: head_dim differs from hidden_size / heads",
                path.display()
            );
        }
        Ok(m)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.n_heads)
    }

    /// Writes `general.architecture` and the `{arch}.*` keys as llama.cpp's
    /// converter does for this family.
    pub fn write_metadata(&self, md: &mut Metadata) {
        let a = self.arch.name();
        let k = |s: &str| format!("{a}.{s}");
        md.set_u32(&k("block_count"), self.n_layers as u32);
        md.set_u32(&k("context_length"), self.context_length as u32);
        md.set_u32(&k("embedding_length"), self.hidden_size as u32);
        md.set_u32(&k("feed_forward_length"), self.intermediate_size as u32);
        md.set_u32(&k("attention.head_count"), self.n_heads as u32);
        md.set_u32(&k("attention.head_count_kv"), self.n_kv_heads as u32);
        md.set_f32(&k("rope.freq_base"), self.rope_theta);
        md.set_f32(&k("attention.layer_norm_rms_epsilon"), self.rms_norm_eps);
        if let Some(h) = self.head_dim {
            md.set_u32(&k("attention.key_length"), h as u32);
            md.set_u32(&k("attention.value_length"), h as u32);
        }
        match &self.rope_scaling {
            RopeScaling::None | RopeScaling::Llama3 { .. } | RopeScaling::Dynamic { .. } => {}
            RopeScaling::Linear { factor } => {
                md.set_str(&k("rope.scaling.type"), "linear");
                md.set_f32(&k("rope.scaling.factor"), *factor);
            }
            RopeScaling::Yarn {
                factor,
                original_context,
                ext_factor,
                attn_factor,
                beta_fast,
                beta_slow,
            } => {
                md.set_str(&k("rope.scaling.type"), "yarn");
                md.set_f32(&k("rope.scaling.factor"), *factor);
                md.set_u32(
                    &k("rope.scaling.original_context_length"),
                    *original_context,
                );
                for (key, v) in [
                    ("rope.scaling.yarn_ext_factor", ext_factor),
                    ("rope.scaling.yarn_attn_factor", attn_factor),
                    ("rope.scaling.yarn_beta_fast", beta_fast),
                    ("rope.scaling.yarn_beta_slow", beta_slow),
                ] {
                    if let Some(v) = v {
                        md.set_f32(&k(key), *v);
                    }
                }
            }
        }
        if self.arch == Arch::Llama {
            md.set_u32(&k("vocab_size"), self.vocab_size as u32);
            md.set_u32(&k("rope.dimension_count"), self.head_dim() as u32);
        }
    }

    /// A note for the log when the GGUF cannot carry something the model has.
    pub fn caveats(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let RopeScaling::Dynamic { factor } = self.rope_scaling {
            out.push(format!(
                "config.json asks for dynamic NTK RoPE scaling (factor {factor}), which \
                 llama.cpp does not implement for `{}`; the GGUF uses plain RoPE, the same \
                 as the model up to its {} trained positions (dynamic scaling only changes \
                 longer sequences)",
                self.arch.name(),
                self.context_length
            ));
        }
        if self.arch != Arch::Llama && self.use_sliding_window {
            out.push(format!(
                "config.json enables Qwen's sliding window; llama.cpp's `{}` attends to the \
                 whole context",
                self.arch.name()
            ));
        }
        if let Some(w) = self.sliding_window {
            if self.arch == Arch::Llama && w < self.context_length {
                out.push(format!(
                    "config.json has sliding_window = {w}; llama.cpp's `llama` architecture \
                     (which runs every Mistral GGUF) attends to the whole context and reads no \
                     window, as for GGUFs from llama.cpp's own converter. Outputs match within \
                     the first {w} tokens"
                ));
            }
        }
        out
    }

    /// The `rope_freqs.weight` values of Llama 3.1 RoPE scaling (llama.cpp's
    /// converter's `generate_extra_tensors`), computed in f64 as Python does and
    /// stored as f32.
    pub fn rope_freqs(&self) -> Option<Vec<f32>> {
        let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } = self.rope_scaling
        else {
            return None;
        };
        let dim = self.head_dim();
        let (factor, lo, hi, old) = (
            factor as f64,
            low_freq_factor as f64,
            high_freq_factor as f64,
            original_context as f64,
        );
        let low_wavelen = old / lo;
        let high_wavelen = old / hi;
        let base = self.rope_theta as f64;
        Some(
            (0..dim / 2)
                .map(|i| {
                    // torch computes the frequencies in f32.
                    let exponent = (2 * i) as f32 / dim as f32;
                    let freq = 1.0f32 / (base as f32).powf(exponent);
                    let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
                    let f = if wavelen < high_wavelen {
                        1.0
                    } else if wavelen > low_wavelen {
                        factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    };
                    f as f32
                })
                .collect(),
        )
    }
}

/// What a GGUF tensor is made from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A tensor of the Hugging Face checkpoint.
    Hf {
        name: String,
        /// Undo HF's rotary layout for llama.cpp: `LlamaModel.permute` with this
        /// many heads.
        permute_heads: Option<usize>,
    },
    /// Computed values (`rope_freqs`).
    Generated(Vec<f32>),
}

/// One tensor of the GGUF: its llama.cpp name, PyTorch-order shape and source.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub source: Source,
}

/// The GGUF tensors of `m` in file order, from the HF tensors `available` (names
/// with shapes). Every HF tensor must be used, except the rotary `inv_freq`
/// buffers; a missing required one or a leftover is an error.
pub fn plan_tensors(
    m: &HfModel,
    available: &[(String, Vec<usize>)],
) -> Result<Vec<PlannedTensor>, GgufError> {
    let shapes: std::collections::HashMap<&str, &[usize]> = available
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let mut used = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut add = |gguf: String, hf: String, permute: Option<usize>, required: bool| match shapes
        .get(hf.as_str())
    {
        Some(s) => {
            used.insert(hf.clone());
            out.push(PlannedTensor {
                name: gguf,
                shape: s.to_vec(),
                source: Source::Hf {
                    name: hf,
                    permute_heads: permute,
                },
            });
            Ok(())
        }
        None if required => Err(GgufError::Tensor {
            name: hf,
            msg: format!("missing from the model (needed for {gguf})"),
        }),
        None => Ok(()),
    };
    add(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        None,
        true,
    )?;
    let permute = m.arch == Arch::Llama;
    for l in 0..m.n_layers {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let g = |s: &str| format!("blk.{l}.{s}");
        add(
            g("attn_norm.weight"),
            hf("input_layernorm.weight"),
            None,
            true,
        )?;
        for (p, gn, heads) in [
            ("q", "attn_q", m.n_heads),
            ("k", "attn_k", m.n_kv_heads),
            ("v", "attn_v", 0),
        ] {
            let perm = (permute && heads > 0).then_some(heads);
            add(
                g(&format!("{gn}.weight")),
                hf(&format!("self_attn.{p}_proj.weight")),
                perm,
                true,
            )?;
            add(
                g(&format!("{gn}.bias")),
                hf(&format!("self_attn.{p}_proj.bias")),
                perm,
                m.arch == Arch::Qwen2,
            )?;
        }
        if m.arch == Arch::Qwen3 {
            add(
                g("attn_q_norm.weight"),
                hf("self_attn.q_norm.weight"),
                None,
                true,
            )?;
            add(
                g("attn_k_norm.weight"),
                hf("self_attn.k_norm.weight"),
                None,
                true,
            )?;
        }
        let o = ("attn_output", "self_attn.o_proj");
        add(
            g(&format!("{}.weight", o.0)),
            hf(&format!("{}.weight", o.1)),
            None,
            true,
        )?;
        // Llama's attention_bias / mlp_bias: optional tensors llama.cpp reads.
        add(
            g(&format!("{}.bias", o.0)),
            hf(&format!("{}.bias", o.1)),
            None,
            false,
        )?;
        let norm = ("ffn_norm.weight", "post_attention_layernorm.weight");
        add(g(norm.0), hf(norm.1), None, true)?;
        for (p, gn) in [("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")] {
            add(
                g(&format!("{gn}.weight")),
                hf(&format!("mlp.{p}_proj.weight")),
                None,
                true,
            )?;
            add(
                g(&format!("{gn}.bias")),
                hf(&format!("mlp.{p}_proj.bias")),
                None,
                false,
            )?;
        }
    }
    add(
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        None,
        true,
    )?;
    // Tied embeddings have no lm_head; llama.cpp then uses token_embd.
    add(
        "output.weight".into(),
        "lm_head.weight".into(),
        None,
        !m.tie_word_embeddings,
    )?;
    if let Some(freqs) = m.rope_freqs() {
        out.insert(
            1,
            PlannedTensor {
                name: "rope_freqs.weight".into(),
                shape: vec![freqs.len()],
                source: Source::Generated(freqs),
            },
        );
    }
    let leftover: Vec<&str> = available
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !used.contains(*n) && !n.ends_with("rotary_emb.inv_freq"))
        .collect();
    if let Some(n) = leftover.first() {
        return Err(GgufError::Tensor {
            name: n.to_string(),
            msg: format!(
                "has no place in llama.cpp's `{}` architecture ({} such tensors); qtrain \
                 does not export this model variant",
                m.arch.name(),
                leftover.len()
            ),
        });
    }
    // Shapes llama.cpp checks on load.
    let hd = m.head_dim();
    for t in &out {
        let want: Option<Vec<usize>> = match t.name.rsplit_once('.').map(|x| x.0) {
            Some(n) if n.ends_with("attn_q") => Some(vec![m.n_heads * hd, m.hidden_size]),
            Some(n) if n.ends_with("attn_k") || n.ends_with("attn_v") => {
                Some(vec![m.n_kv_heads * hd, m.hidden_size])
            }
            Some("token_embd") | Some("output") => Some(vec![m.vocab_size, m.hidden_size]),
            _ => None,
        };
        if let Some(want) = want.filter(|_| t.name.ends_with(".weight")) {
            if t.shape != want {
                return Err(GgufError::Tensor {
                    name: t.name.clone(),
                    msg: format!("shape {:?}, but config.json implies {want:?}", t.shape),
                });
            }
        }
    }
    Ok(out)
}

/// `LlamaModel.permute` of llama.cpp's converter: the rows of a q/k projection
/// (or bias) `[n_heads * head_dim, ...]`, grouped per head as HF's rotate-half
/// layout `[first halves | second halves]`, reordered into llama.cpp's interleaved
/// pairs: within each head, row `2i + j` of the output is row `j * head_dim/2 + i`
/// of the input.
pub fn permute_rows(x: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    assert!(
        rows.is_multiple_of(2 * heads),
        "{rows} rows do not split into {heads} heads of pairs"
    );
    let cols = x.len() / rows;
    let half = rows / heads / 2;
    let mut out = vec![0f32; x.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * 2 * half + j * half + i;
                let dst = h * 2 * half + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&x[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(model_type: &str) -> Json {
        json!({
            "model_type": model_type, "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false
        })
    }

    fn hf_tensors(m: &HfModel, extra: &[&str]) -> Vec<(String, Vec<usize>)> {
        let (h, f, hd) = (m.hidden_size, m.intermediate_size, m.head_dim());
        let mut v = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![m.vocab_size, h],
            ),
            ("model.norm.weight".to_string(), vec![h]),
            ("lm_head.weight".to_string(), vec![m.vocab_size, h]),
        ];
        for l in 0..m.n_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            v.push((p("input_layernorm.weight"), vec![h]));
            v.push((p("post_attention_layernorm.weight"), vec![h]));
            v.push((p("self_attn.q_proj.weight"), vec![m.n_heads * hd, h]));
            v.push((p("self_attn.k_proj.weight"), vec![m.n_kv_heads * hd, h]));
            v.push((p("self_attn.v_proj.weight"), vec![m.n_kv_heads * hd, h]));
            v.push((p("self_attn.o_proj.weight"), vec![h, m.n_heads * hd]));
            v.push((p("mlp.gate_proj.weight"), vec![f, h]));
            v.push((p("mlp.up_proj.weight"), vec![f, h]));
            v.push((p("mlp.down_proj.weight"), vec![h, f]));
            for e in extra {
                let shape = if e.ends_with("norm.weight") {
                    vec![hd]
                } else if e.contains("q_proj") {
                    vec![m.n_heads * hd]
                } else if e.contains("o_proj") || e.contains("down_proj") {
                    vec![h]
                } else if e.contains("mlp.") {
                    vec![f]
                } else {
                    vec![m.n_kv_heads * hd]
                };
                v.push((p(e), shape));
            }
        }
        v
    }

    #[test]
    fn permute_interleaves_the_halves_of_each_head() {
        // 2 heads of 4 rows, 1 column: rows [h0: a0 a1 b0 b1 | h1: c0 c1 d0 d1]
        // (HF rotate-half: first halves then second halves) become pairs.
        let x: Vec<f32> = (0..8).map(|i| i as f32).collect();
        assert_eq!(permute_rows(&x, 8, 2), vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        // Columns move with their rows.
        let x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        assert_eq!(
            permute_rows(&x, 4, 1),
            vec![0., 1., 2., 3., 8., 9., 10., 11., 4., 5., 6., 7., 12., 13., 14., 15.]
        );
    }

    #[test]
    fn llama_and_mistral_map_to_llama_with_permuted_qk() {
        for t in ["llama", "mistral"] {
            let m = HfModel::from_json(&config(t), Path::new("config.json")).unwrap();
            assert_eq!(m.arch, Arch::Llama);
            let plan = plan_tensors(&m, &hf_tensors(&m, &[])).unwrap();
            assert_eq!(plan.len(), 3 + 2 * 9);
            assert_eq!(plan[0].name, "token_embd.weight");
            assert_eq!(plan.last().unwrap().name, "output.weight");
            let q = plan
                .iter()
                .find(|p| p.name == "blk.1.attn_q.weight")
                .unwrap();
            let k = plan
                .iter()
                .find(|p| p.name == "blk.1.attn_k.weight")
                .unwrap();
            let v = plan
                .iter()
                .find(|p| p.name == "blk.1.attn_v.weight")
                .unwrap();
            assert!(
                matches!(&q.source, Source::Hf { name, permute_heads: Some(4) } if name == "model.layers.1.self_attn.q_proj.weight")
            );
            assert!(matches!(
                &k.source,
                Source::Hf {
                    permute_heads: Some(2),
                    ..
                }
            ));
            assert!(matches!(
                &v.source,
                Source::Hf {
                    permute_heads: None,
                    ..
                }
            ));
            let mut md = Metadata::new();
            m.write_metadata(&mut md);
            assert_eq!(
                md.get("llama.rope.dimension_count"),
                Some(&crate::Value::U32(16))
            );
            assert_eq!(
                md.get("llama.rope.freq_base"),
                Some(&crate::Value::F32(500000.0))
            );
            assert_eq!(
                md.get("llama.attention.head_count_kv"),
                Some(&crate::Value::U32(2))
            );
        }
    }

    #[test]
    fn qwen_keeps_rows_and_adds_biases_or_norms() {
        let m = HfModel::from_json(&config("qwen2"), Path::new("c")).unwrap();
        let hf = hf_tensors(
            &m,
            &[
                "self_attn.q_proj.bias",
                "self_attn.k_proj.bias",
                "self_attn.v_proj.bias",
            ],
        );
        let plan = plan_tensors(&m, &hf).unwrap();
        assert!(plan.iter().all(|p| !matches!(
            p.source,
            Source::Hf {
                permute_heads: Some(_),
                ..
            }
        )));
        assert!(plan
            .iter()
            .any(|p| p.name == "blk.0.attn_k.bias" && p.shape == vec![32]));
        // qwen2 needs its biases.
        let e = plan_tensors(&m, &hf_tensors(&m, &[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("q_proj.bias") && e.contains("missing"), "{e}");

        let m = HfModel::from_json(&config("qwen3"), Path::new("c")).unwrap();
        let plan = plan_tensors(
            &m,
            &hf_tensors(&m, &["self_attn.q_norm.weight", "self_attn.k_norm.weight"]),
        )
        .unwrap();
        assert!(plan.iter().any(|p| p.name == "blk.1.attn_q_norm.weight"));
        let mut md = Metadata::new();
        m.write_metadata(&mut md);
        assert!(md.get("qwen3.block_count").is_some() && md.get("qwen3.vocab_size").is_none());
    }

    #[test]
    fn llama_attention_and_mlp_biases_are_kept_and_q_k_biases_permuted() {
        let m = HfModel::from_json(&config("llama"), Path::new("c")).unwrap();
        let extra = [
            "self_attn.q_proj.bias",
            "self_attn.k_proj.bias",
            "self_attn.v_proj.bias",
            "self_attn.o_proj.bias",
            "mlp.gate_proj.bias",
            "mlp.up_proj.bias",
            "mlp.down_proj.bias",
        ];
        let plan = plan_tensors(&m, &hf_tensors(&m, &extra)).unwrap();
        assert_eq!(plan.len(), 3 + 2 * (9 + 7));
        let get = |n: &str| plan.iter().find(|p| p.name == n).unwrap();
        assert!(matches!(
            get("blk.0.attn_q.bias").source,
            Source::Hf {
                permute_heads: Some(4),
                ..
            }
        ));
        assert!(matches!(
            get("blk.0.attn_k.bias").source,
            Source::Hf {
                permute_heads: Some(2),
                ..
            }
        ));
        assert_eq!(get("blk.1.ffn_up.bias").shape, vec![96]);
        assert_eq!(get("blk.1.attn_output.bias").shape, vec![64]);
    }

    #[test]
    fn tied_embeddings_leftovers_and_bad_shapes() {
        let mut c = config("llama");
        c["tie_word_embeddings"] = true.into();
        let m = HfModel::from_json(&c, Path::new("c")).unwrap();
        let mut hf = hf_tensors(&m, &[]);
        hf.retain(|(n, _)| n != "lm_head.weight");
        hf.push((
            "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
            vec![8],
        ));
        let plan = plan_tensors(&m, &hf).unwrap();
        assert!(plan.iter().all(|p| p.name != "output.weight"));

        hf.push(("model.layers.0.mlp.extra.weight".into(), vec![4, 4]));
        let e = plan_tensors(&m, &hf).unwrap_err().to_string();
        assert!(
            e.contains("mlp.extra.weight") && e.contains("no place"),
            "{e}"
        );

        let m = HfModel::from_json(&config("llama"), Path::new("c")).unwrap();
        let mut hf = hf_tensors(&m, &[]);
        hf[0].1 = vec![99, 64];
        let e = plan_tensors(&m, &hf).unwrap_err().to_string();
        assert!(e.contains("token_embd") && e.contains("[100, 64]"), "{e}");
    }

    #[test]
    fn rope_scaling_kinds() {
        let mut c = config("llama");
        c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        c["head_dim"] = 128.into();
        c["num_attention_heads"] = 4.into();
        c["hidden_size"] = 512.into();
        let m = HfModel::from_json(&c, Path::new("c")).unwrap();
        let f = m.rope_freqs().unwrap();
        assert_eq!(f.len(), 64);
        // High frequencies untouched, low ones scaled by the factor, smooth between.
        assert_eq!(f[0], 1.0);
        assert_eq!(*f.last().unwrap(), 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
        let plan = plan_tensors(&m, &hf_tensors(&m, &[])).unwrap();
        assert_eq!(plan[1].name, "rope_freqs.weight");

        c["rope_scaling"] =
            json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768});
        let m = HfModel::from_json(&c, Path::new("c")).unwrap();
        let mut md = Metadata::new();
        m.write_metadata(&mut md);
        assert_eq!(
            md.get("llama.rope.scaling.type"),
            Some(&crate::Value::String("yarn".into()))
        );
        assert_eq!(
            md.get("llama.rope.scaling.original_context_length"),
            Some(&crate::Value::U32(32768))
        );

        c["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 2.0});
        let m = HfModel::from_json(&c, Path::new("c")).unwrap();
        assert_eq!(m.rope_scaling, RopeScaling::Dynamic { factor: 2.0 });
        assert!(m.caveats()[0].contains("dynamic NTK"), "{:?}", m.caveats());

        c["rope_scaling"] = json!({"rope_type": "longrope", "factor": 4.0});
        let e = HfModel::from_json(&c, Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope scaling `longrope`"), "{e}");
    }
}
