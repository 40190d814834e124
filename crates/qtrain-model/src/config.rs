//! The decoder architecture description: what `config.json` of a Hugging Face model
//! directory says about shapes and math, and the presets `qtrain init-random` writes.
//!
//! One struct covers four families that share RMSNorm, RoPE, grouped-query attention
//! and a SwiGLU MLP ([`Family`]): Mistral (v0.1 with its 4096-token sliding window,
//! v0.3 with the 32768 vocabulary), Llama (2, 3.x with `llama3` RoPE scaling and tied
//! embeddings on the small sizes, optional `attention_bias`/`mlp_bias`), Qwen 2/2.5
//! (biases on q/k/v) and Qwen 3 (per-head RMSNorm on q and k before RoPE).
//!
//! Every key that changes the math is either implemented or refused by name when the
//! config is read, never ignored: RoPE variants ([`crate::rope`]), biases, q/k norms,
//! sliding windows (per family, as transformers reads them), soft-capping, partial
//! rotation, attention dropout. Keys transformers itself ignores for a family (a
//! `sliding_window` in a Llama config) are ignored the same way. Defaults of absent
//! keys are the family's transformers defaults.

use crate::error::ModelError;
use crate::rope::RopeSpec;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Architectures whose `model_type` we accept; anything else is refused by name.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["mistral", "llama", "qwen2", "qwen3"];

/// A decoder family: what `model_type` selects beyond the shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Mistral: sliding window (default 4096 when the key is absent), no biases.
    Mistral,
    /// Llama 1/2/3.x: `attention_bias` (q, k, v, o) and `mlp_bias` (gate, up, down)
    /// when set, no sliding window.
    Llama,
    /// Qwen 2 / 2.5: always a bias on q, k and v; windows only with
    /// `use_sliding_window`.
    Qwen2,
    /// Qwen 3: per-head RMSNorm on q and k before RoPE; `attention_bias` (q, k, v, o).
    Qwen3,
}

impl Family {
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        match model_type {
            "mistral" => Some(Family::Mistral),
            "llama" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            _ => None,
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Mistral => "mistral",
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// The `architectures` entry transformers writes for a causal LM.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Mistral => "MistralForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// Keys of other architectures that change the math and that no family here
/// implements; a config carrying one with a non-null, non-default value is refused
/// (it most likely describes weights of another architecture under a wrong
/// `model_type`). `(key, its neutral value)`; `None` means only null is neutral.
const FOREIGN_MATH_KEYS: &[(&str, Option<f64>)] = &[
    ("attn_logit_softcapping", None),
    ("final_logit_softcapping", None),
    ("logit_softcapping", None),
    ("query_pre_attn_scalar", None),
    ("logits_scaling", Some(1.0)),
    ("logit_scale", Some(1.0)),
    ("embedding_multiplier", Some(1.0)),
    ("residual_multiplier", Some(1.0)),
    ("attention_multiplier", None),
    ("scale_emb", Some(1.0)),
    ("scale_depth", Some(1.0)),
    ("use_qk_norm", Some(0.0)),
    ("qk_layernorm", Some(0.0)),
    ("qk_norm", Some(0.0)),
    ("no_rope_layers", None),
    ("attention_chunk_size", None),
];

/// The seven projections of a decoder layer, in the order the layer uses them.
pub const PROJECTIONS: [Proj; 7] = [
    Proj::Q,
    Proj::K,
    Proj::V,
    Proj::O,
    Proj::Gate,
    Proj::Up,
    Proj::Down,
];

/// One of the seven linear maps inside a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    /// The module name Hugging Face (and PEFT) use, e.g. `q_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The parent module: `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    /// Parses `q_proj` etc.
    pub fn from_name(name: &str) -> Option<Proj> {
        PROJECTIONS.iter().copied().find(|p| p.name() == name)
    }

    /// Index into [`PROJECTIONS`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The weight's tensor name in a HF checkpoint, e.g.
    /// `model.layers.3.self_attn.q_proj.weight`.
    pub fn weight_name(self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}.weight",
            self.parent(),
            self.name()
        )
    }

    /// The bias's tensor name, e.g. `model.layers.3.self_attn.q_proj.bias`.
    pub fn bias_name(self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}.bias",
            self.parent(),
            self.name()
        )
    }
}

/// Qwen 3's per-head norm weights: `model.layers.{l}.self_attn.q_norm.weight` and
/// `k_norm.weight`.
pub fn qk_norm_names(layer: usize) -> [String; 2] {
    [
        format!("model.layers.{layer}.self_attn.q_norm.weight"),
        format!("model.layers.{layer}.self_attn.k_norm.weight"),
    ]
}

fn default_rms_norm_eps() -> f64 {
    // transformers' LlamaConfig, MistralConfig, Qwen2Config and Qwen3Config.
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_hidden_act() -> String {
    "silu".to_string()
}
fn default_max_pos() -> usize {
    4096
}
fn default_init_range() -> f64 {
    0.02
}

/// The fields of `config.json` that shape the computation. Unknown fields are kept
/// out of this struct on purpose (HF configs carry many irrelevant keys) but the
/// whole JSON object is preserved in [`ModelConfig::raw`] so exports can write it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Absent in Llama-1 style configs: then it equals `num_attention_heads` (MHA).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Mistral v0.3 and some Llama derivatives state it; otherwise hidden/heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// The window every layer attends within (`null`: full causal), as the family
    /// reads it: Mistral's key (4096 when absent, as transformers), Qwen's only with
    /// `use_sliding_window` on every layer, never for Llama. [`ModelConfig::to_json`]
    /// writes back the key as the source config had it.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// Present when the directory holds a bitsandbytes pre-quantized model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<serde_json::Value>,
    /// transformers 4's RoPE scaling block (`llama3`, `yarn`, ...); see [`crate::rope`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5's name for the same block (with `rope_theta` inside).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// Llama, Qwen 3: a bias on q, k, v and o.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Llama: a bias on gate, up and down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// Qwen: `sliding_window` applies only when this is true, and then only from
    /// layer `max_window_layers` on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// The full original JSON (for faithful re-export); not part of equality checks
    /// that matter, but kept so nothing the user had is lost.
    #[serde(skip)]
    pub raw: Option<serde_json::Value>,
}

impl ModelConfig {
    /// Reads and validates `config.json`; every error names the file and the key.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses config JSON; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ModelError> {
        let raw: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ModelError::ConfigParse {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        // Check the architecture first so an unsupported model gets that message
        // rather than a complaint about a field its config happens to lack.
        match raw.get("model_type").and_then(|v| v.as_str()) {
            None => {
                return Err(ModelError::ConfigField {
                    path: path.to_path_buf(),
                    key: "model_type".into(),
                    msg: "missing (expected one of: mistral, llama, qwen2, qwen3)".into(),
                })
            }
            Some(t) if !SUPPORTED_MODEL_TYPES.contains(&t) => {
                return Err(ModelError::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    model_type: t.to_string(),
                })
            }
            Some(_) => {}
        }
        let family =
            Family::from_model_type(raw["model_type"].as_str().expect("checked")).expect("checked");
        let obj = raw.as_object().expect("a model_type was read from it");
        // transformers' per-family defaults for keys the file does not have.
        let mut with_defaults = raw.clone();
        let fill = |v: &mut serde_json::Value, key: &str, value: serde_json::Value| {
            if !obj.contains_key(key) {
                v[key] = value;
            }
        };
        match family {
            Family::Mistral => {
                fill(&mut with_defaults, "sliding_window", 4096.into());
                fill(&mut with_defaults, "num_key_value_heads", 8.into());
            }
            Family::Llama => {}
            Family::Qwen2 | Family::Qwen3 => {
                fill(&mut with_defaults, "num_key_value_heads", 32.into());
                fill(&mut with_defaults, "max_window_layers", 28.into());
                fill(&mut with_defaults, "use_sliding_window", false.into());
                fill(&mut with_defaults, "sliding_window", 4096.into());
            }
        }
        if family == Family::Qwen3 {
            fill(&mut with_defaults, "head_dim", 128.into());
        }
        let mut cfg: ModelConfig =
            serde_json::from_value(with_defaults).map_err(|e| ModelError::ConfigParse {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        cfg.raw = Some(raw);
        cfg.sliding_window = cfg.effective_window(path)?;
        cfg.refuse_unimplemented(path)?;
        cfg.validate(path)?;
        // The effective theta (transformers 5 keeps it inside `rope_parameters`).
        cfg.rope_theta = cfg.rope_at(path)?.theta;
        Ok(cfg)
    }

    /// The window all layers attend within, as transformers reads this family's
    /// config; windows on some layers only are refused by name.
    fn effective_window(&self, path: &Path) -> Result<Option<usize>, ModelError> {
        let field = |key: &str, msg: String| ModelError::ConfigField {
            path: path.to_path_buf(),
            key: key.to_string(),
            msg,
        };
        let layer_types = self
            .raw
            .as_ref()
            .and_then(|r| r.get("layer_types"))
            .filter(|v| !v.is_null());
        match self.family() {
            // MistralAttention applies `sliding_window` to every layer.
            Family::Mistral => Ok(self.sliding_window),
            // LlamaAttention has no window: transformers ignores the key.
            Family::Llama => Ok(None),
            Family::Qwen2 | Family::Qwen3 => {
                let window = if self.use_sliding_window == Some(true) {
                    self.sliding_window
                } else {
                    None
                };
                // transformers: layer i slides when a window is set and i >= max_window_layers.
                let sliding: Vec<bool> = match layer_types {
                    Some(v) => {
                        let list = v
                            .as_array()
                            .ok_or_else(|| field("layer_types", format!("{v} is not a list")))?;
                        if list.len() != self.num_hidden_layers {
                            return Err(field(
                                "layer_types",
                                format!(
                                    "{} entries for {} layers",
                                    list.len(),
                                    self.num_hidden_layers
                                ),
                            ));
                        }
                        list.iter()
                            .map(|t| match t.as_str() {
                                Some("full_attention") => Ok(false),
                                Some("sliding_attention") => Ok(true),
                                _ => Err(field(
                                    "layer_types",
                                    format!("{t}: only full_attention and sliding_attention exist"),
                                )),
                            })
                            .collect::<Result<_, _>>()?
                    }
                    None => (0..self.num_hidden_layers)
                        .map(|i| window.is_some() && i >= self.max_window_layers.unwrap_or(28))
                        .collect(),
                };
                let any = sliding.iter().any(|&s| s);
                let all = sliding.iter().all(|&s| s);
                match (any && window.is_some(), all) {
                    (false, _) => Ok(None),
                    (true, true) => Ok(window),
                    (true, false) => Err(field(
                        if layer_types.is_some() {
                            "layer_types"
                        } else {
                            "max_window_layers"
                        },
                        format!(
                            "a sliding window on some layers only ({} of {}) is not implemented",
                            sliding.iter().filter(|&&s| s).count(),
                            self.num_hidden_layers
                        ),
                    )),
                }
            }
        }
    }

    /// Refuses, by key, what changes the math and qtrain does not implement.
    fn refuse_unimplemented(&self, path: &Path) -> Result<(), ModelError> {
        let field = |key: &str, msg: String| ModelError::ConfigField {
            path: path.to_path_buf(),
            key: key.to_string(),
            msg,
        };
        let Some(raw) = self.raw.as_ref().and_then(|r| r.as_object()) else {
            return Ok(());
        };
        for &(key, neutral) in FOREIGN_MATH_KEYS {
            let Some(v) = raw.get(key).filter(|v| !v.is_null()) else {
                continue;
            };
            let is_neutral = match (neutral, v) {
                (Some(n), serde_json::Value::Bool(b)) => (*b as u8 as f64) == n,
                (Some(n), v) => v.as_f64() == Some(n),
                (None, _) => false,
            };
            if !is_neutral {
                return Err(field(
                    key,
                    format!(
                        "{v} changes the math and is not implemented for model_type {} \
                         (is this config really a {} model?)",
                        self.model_type, self.model_type
                    ),
                ));
            }
        }
        if let Some(v) = raw.get("attention_dropout").filter(|v| !v.is_null()) {
            if v.as_f64() != Some(0.0) {
                return Err(field(
                    "attention_dropout",
                    format!("{v}: dropout on attention probabilities is not implemented (set it to 0.0)"),
                ));
            }
        }
        if let Some(v) = raw.get("pretraining_tp").filter(|v| !v.is_null()) {
            // transformers 4 splits the projections into `pretraining_tp` slices and
            // sums them: the same product, only rounded differently. Anything but a
            // positive integer is a broken config.
            if v.as_u64().is_none_or(|n| n == 0) {
                return Err(field(
                    "pretraining_tp",
                    format!("{v} is not a positive integer"),
                ));
            }
        }
        Ok(())
    }

    /// The family `model_type` names (validated when the config was read).
    pub fn family(&self) -> Family {
        Family::from_model_type(&self.model_type).unwrap_or_else(|| {
            panic!(
                "model_type `{}` is not one of {SUPPORTED_MODEL_TYPES:?}",
                self.model_type
            )
        })
    }

    /// Whether projection `p` has a (frozen) bias: Qwen 2's q, k, v; Llama's and
    /// Qwen 3's attention projections with `attention_bias`; Llama's MLP with
    /// `mlp_bias`.
    pub fn proj_has_bias(&self, p: Proj) -> bool {
        let attention = matches!(p, Proj::Q | Proj::K | Proj::V | Proj::O);
        match self.family() {
            Family::Mistral => false,
            Family::Qwen2 => matches!(p, Proj::Q | Proj::K | Proj::V),
            Family::Llama => {
                if attention {
                    self.attention_bias == Some(true)
                } else {
                    self.mlp_bias == Some(true)
                }
            }
            Family::Qwen3 => attention && self.attention_bias == Some(true),
        }
    }

    /// Whether any projection has a bias.
    pub fn has_biases(&self) -> bool {
        PROJECTIONS.iter().any(|&p| self.proj_has_bias(p))
    }

    /// Qwen 3: RMSNorm over each head's `head_dim` of q and k, before RoPE.
    pub fn has_qk_norm(&self) -> bool {
        self.family() == Family::Qwen3
    }

    /// The longest context the model's positions were trained for, as its config
    /// states it: `max_position_embeddings`, extended by the RoPE scaling that
    /// exists to go past it (`linear` and `dynamic` by their factor, `yarn` to
    /// `factor · original_max_position_embeddings`; Llama 3.1's `llama3` configs
    /// already state the extended length). `None` when the RoPE block is invalid
    /// (loading refuses it with the reason).
    pub fn trained_context(&self) -> Option<usize> {
        use crate::rope::RopeScaling;
        let base = self.max_position_embeddings;
        let extended = match self.rope().ok()?.scaling {
            RopeScaling::Default | RopeScaling::Llama3 { .. } => base as f64,
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor, .. } => {
                base as f64 * factor
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                ..
            } => original_max_position_embeddings * factor,
        };
        Some(base.max(extended.round() as usize))
    }

    /// The RoPE parameters (theta, variant) of this config.
    pub fn rope(&self) -> Result<RopeSpec, ModelError> {
        self.rope_at(Path::new("config.json"))
    }

    fn rope_at(&self, path: &Path) -> Result<RopeSpec, ModelError> {
        let mut view = serde_json::json!({
            "rope_scaling": self.rope_scaling,
            "rope_parameters": self.rope_parameters,
        });
        if let Some(f) = self
            .raw
            .as_ref()
            .and_then(|r| r.get("partial_rotary_factor"))
        {
            view["partial_rotary_factor"] = f.clone();
        }
        RopeSpec::from_config_json(
            &view,
            self.head_dim(),
            self.rope_theta,
            self.max_position_embeddings,
        )
        .map_err(|(key, msg)| ModelError::ConfigField {
            path: path.to_path_buf(),
            key,
            msg,
        })
    }

    fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let field = |key: &str, msg: String| ModelError::ConfigField {
            path: path.to_path_buf(),
            key: key.to_string(),
            msg,
        };
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ] {
            if v == 0 {
                return Err(field(key, "must be > 0".into()));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(field(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(field("head_dim", "RoPE needs an even head_dim".into()));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(field(
                "num_key_value_heads",
                format!(
                    "{kv} does not divide num_attention_heads {}",
                    self.num_attention_heads
                ),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(field(
                "hidden_act",
                format!("'{}' is not supported (only silu)", self.hidden_act),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(field("rms_norm_eps", "must be finite and > 0".into()));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(field("rope_theta", "must be finite and > 0".into()));
        }
        if self.sliding_window == Some(0) {
            return Err(field("sliding_window", "must be > 0 (or null)".into()));
        }
        self.rope_at(path)?;
        if let Some(q) = &self.quantization_config {
            let method = q.get("quant_method").and_then(|v| v.as_str());
            let four = q.get("load_in_4bit").and_then(|v| v.as_bool());
            let qtype = q.get("bnb_4bit_quant_type").and_then(|v| v.as_str());
            if method != Some("bitsandbytes") || four != Some(true) || qtype != Some("nf4") {
                return Err(field(
                    "quantization_config",
                    format!(
                        "only bitsandbytes 4-bit nf4 pre-quantized models are supported, found {q}"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `[out_features, in_features]` of a projection, as stored in HF checkpoints.
    pub fn proj_shape(&self, p: Proj) -> [usize; 2] {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.num_kv_heads() * self.head_dim();
        let i = self.intermediate_size;
        match p {
            Proj::Q => [q, h],
            Proj::K | Proj::V => [kv, h],
            Proj::O => [h, q],
            Proj::Gate | Proj::Up => [i, h],
            Proj::Down => [h, i],
        }
    }

    /// Whether the checkpoint on disk is already NF4-quantized by bitsandbytes.
    pub fn is_prequantized(&self) -> bool {
        self.quantization_config.is_some()
    }

    /// Total parameter count (embeddings, all layers, final norm, lm_head unless tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let per_layer: usize = PROJECTIONS
            .iter()
            .map(|&p| {
                let [o, i] = self.proj_shape(p);
                o * i
            })
            .sum::<usize>()
            + 2 * h
            + PROJECTIONS
                .iter()
                .filter(|&&p| self.proj_has_bias(p))
                .map(|&p| self.proj_shape(p)[0])
                .sum::<usize>()
            + if self.has_qk_norm() {
                2 * self.head_dim()
            } else {
                0
            };
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_hidden_layers * per_layer + h + head
    }

    /// The JSON to write as `config.json`: the original object when there was one
    /// (so unknown keys survive) with our fields laid over it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut ours = serde_json::to_value(self).expect("config serializes");
        if let Some(serde_json::Value::Object(raw)) = &self.raw {
            let obj = ours.as_object_mut().expect("object");
            for (k, v) in raw {
                if !obj.contains_key(k) && k != "quantization_config" {
                    obj.insert(k.clone(), v.clone());
                }
            }
            // `sliding_window` holds the effective window; outside Mistral the key
            // means something else (Qwen: the size when `use_sliding_window`) or
            // nothing (Llama), so the source's value goes back unchanged.
            if self.family() != Family::Mistral {
                match raw.get("sliding_window") {
                    Some(v) => obj.insert("sliding_window".into(), v.clone()),
                    None => obj.remove("sliding_window"),
                };
            }
        }
        ours
    }

    /// A named architecture with real shapes (weights come from `init-random`), or
    /// a tiny one of a family for tests (`tiny*`, whose vocabulary is
    /// `vocab_size_for_tiny`: the size of the built-in tokenizer of that family,
    /// which puts its special tokens at the ids the tiny configs name).
    pub fn preset(name: &str, vocab_size_for_tiny: usize) -> Result<Self, ModelError> {
        let base = |model_type: &str,
                    vocab: usize,
                    hidden: usize,
                    inter: usize,
                    layers: usize,
                    heads: usize,
                    kv: usize,
                    theta: f64,
                    window: Option<usize>,
                    max_pos: usize| ModelConfig {
            model_type: model_type.into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            head_dim: Some(hidden / heads),
            hidden_act: "silu".into(),
            max_position_embeddings: max_pos,
            rms_norm_eps: 1e-5,
            rope_theta: theta,
            sliding_window: window,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(serde_json::json!(2)),
            initializer_range: 0.02,
            quantization_config: None,
            rope_scaling: None,
            rope_parameters: None,
            attention_bias: None,
            mlp_bias: None,
            use_sliding_window: None,
            max_window_layers: None,
            raw: None,
        };
        // Llama 3.1's RoPE block (3.2 has factor 32).
        let llama3_rope = |factor: f64| {
            Some(serde_json::json!({
                "factor": factor,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3"
            }))
        };
        let llama3 = |c: &mut ModelConfig, special_base: u32, factor: Option<f64>| {
            c.rms_norm_eps = 1e-5;
            c.bos_token_id = Some(special_base);
            // <|end_of_text|>, <|eom_id|>, <|eot_id|> (the Instruct generation config).
            c.eos_token_id = Some(serde_json::json!([
                special_base + 1,
                special_base + 8,
                special_base + 9
            ]));
            c.rope_scaling = factor.and_then(llama3_rope);
        };
        let qwen = |c: &mut ModelConfig, special_base: u32, max_window_layers: usize| {
            c.rms_norm_eps = 1e-6;
            // <|endoftext|> and <|im_end|>.
            c.bos_token_id = Some(special_base);
            c.eos_token_id = Some(serde_json::json!(special_base + 2));
            c.use_sliding_window = Some(false);
            c.max_window_layers = Some(max_window_layers);
        };
        let tiny = vocab_size_for_tiny;
        Ok(match name {
            // Small enough to train for minutes on two CPU cores, big enough to have
            // every feature: GQA (4 heads over 2 KV heads), several layers, a window.
            "tiny" => base("mistral", tiny, 128, 384, 4, 4, 2, 10_000.0, None, 2048),
            "tiny-window" => base("mistral", tiny, 64, 160, 2, 4, 2, 10_000.0, Some(8), 256),
            // Tiny models of the other families, with each family's features: Llama 3
            // with its RoPE scaling and tied embeddings (like 3.2 1B/3B), Llama 2 with
            // full multi-head attention, Qwen 2.5 with q/k/v biases and tied
            // embeddings (like 0.5B), Qwen 3 with q/k norms and a head_dim that is
            // not hidden / heads (like 0.6B).
            "tiny-llama3" => {
                let mut c = base("llama", tiny, 64, 160, 2, 4, 2, 500_000.0, None, 131072);
                llama3(&mut c, 0, Some(8.0));
                c.tie_word_embeddings = true;
                c
            }
            "tiny-llama2" => base("llama", tiny, 64, 160, 2, 4, 4, 10_000.0, None, 4096),
            "tiny-qwen2" => {
                let mut c = base("qwen2", tiny, 64, 160, 2, 4, 2, 1_000_000.0, None, 32768);
                qwen(&mut c, 0, 2);
                c.tie_word_embeddings = true;
                c
            }
            "tiny-qwen3" => {
                let mut c = base("qwen3", tiny, 64, 160, 2, 4, 2, 1_000_000.0, None, 40960);
                qwen(&mut c, 0, 2);
                c.head_dim = Some(32);
                c.attention_bias = Some(false);
                c
            }
            "mistral-7b-v0.1" => base(
                "mistral",
                32000,
                4096,
                14336,
                32,
                32,
                8,
                10_000.0,
                Some(4096),
                32768,
            ),
            "mistral-7b-v0.3" => base(
                "mistral",
                32768,
                4096,
                14336,
                32,
                32,
                8,
                1_000_000.0,
                None,
                32768,
            ),
            "llama-2-7b" => base(
                "llama", 32000, 4096, 11008, 32, 32, 32, 10_000.0, None, 4096,
            ),
            // TowerInstruct-13B's base: 40 heads without GQA, hidden 5120.
            "llama-2-13b" => base(
                "llama", 32000, 5120, 13824, 40, 40, 40, 10_000.0, None, 4096,
            ),
            "llama-3-8b" => {
                let mut c = base(
                    "llama", 128256, 4096, 14336, 32, 32, 8, 500_000.0, None, 8192,
                );
                llama3(&mut c, 128000, None);
                // Llama 3.0 has no <|eom_id|>.
                c.eos_token_id = Some(serde_json::json!(128001));
                c
            }
            "llama-3.1-8b" => {
                let mut c = base(
                    "llama", 128256, 4096, 14336, 32, 32, 8, 500_000.0, None, 131072,
                );
                llama3(&mut c, 128000, Some(8.0));
                c
            }
            "llama-3.2-1b" => {
                let mut c = base(
                    "llama", 128256, 2048, 8192, 16, 32, 8, 500_000.0, None, 131072,
                );
                llama3(&mut c, 128000, Some(32.0));
                c.tie_word_embeddings = true;
                c
            }
            "llama-3.2-3b" => {
                let mut c = base(
                    "llama", 128256, 3072, 8192, 28, 24, 8, 500_000.0, None, 131072,
                );
                llama3(&mut c, 128000, Some(32.0));
                c.tie_word_embeddings = true;
                c
            }
            "qwen2.5-7b" => {
                let mut c = base(
                    "qwen2",
                    152064,
                    3584,
                    18944,
                    28,
                    28,
                    4,
                    1_000_000.0,
                    None,
                    32768,
                );
                qwen(&mut c, 151643, 28);
                c
            }
            "qwen2.5-0.5b" => {
                let mut c = base(
                    "qwen2",
                    151936,
                    896,
                    4864,
                    24,
                    14,
                    2,
                    1_000_000.0,
                    None,
                    32768,
                );
                qwen(&mut c, 151643, 21);
                c.tie_word_embeddings = true;
                c
            }
            "qwen3-8b" => {
                let mut c = base(
                    "qwen3",
                    151936,
                    4096,
                    12288,
                    36,
                    32,
                    8,
                    1_000_000.0,
                    None,
                    40960,
                );
                qwen(&mut c, 151643, 36);
                c.head_dim = Some(128);
                c.attention_bias = Some(false);
                c
            }
            other => {
                return Err(ModelError::UnknownPreset {
                    name: other.to_string(),
                    known: PRESETS.join(", "),
                })
            }
        })
    }
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &[
    "tiny",
    "tiny-window",
    "tiny-llama3",
    "tiny-llama2",
    "tiny-qwen2",
    "tiny-qwen3",
    "mistral-7b-v0.1",
    "mistral-7b-v0.3",
    "llama-2-7b",
    "llama-2-13b",
    "llama-3-8b",
    "llama-3.1-8b",
    "llama-3.2-1b",
    "llama-3.2-3b",
    "qwen2.5-7b",
    "qwen2.5-0.5b",
    "qwen3-8b",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistral_7b_parameter_count() {
        let c = ModelConfig::preset("mistral-7b-v0.3", 0).unwrap();
        // 7.248B parameters, the figure Mistral publishes for v0.3.
        assert_eq!(c.num_parameters(), 7_248_023_552);
        assert_eq!(c.proj_shape(Proj::K), [1024, 4096]);
        assert_eq!(c.proj_shape(Proj::Down), [4096, 14336]);
    }

    #[test]
    fn trained_context_follows_the_rope_scaling() {
        // Mistral v0.3: no scaling, 32k.
        let m = ModelConfig::preset("mistral-7b-v0.3", 0).unwrap();
        assert_eq!(m.trained_context(), Some(32768));
        // Llama 3.1 states the extended length itself (131072 with rope_type llama3).
        let l = ModelConfig::preset("llama-3.1-8b", 0).unwrap();
        assert_eq!(l.rope().unwrap().scaling.name(), "llama3");
        assert_eq!(l.trained_context(), Some(131072));
        // Qwen 2.5's long-context recipe: yarn x4 over 32768.
        let mut q = ModelConfig::preset("qwen2.5-7b", 0).unwrap();
        q.rope_scaling = Some(serde_json::json!({
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768
        }));
        assert_eq!(q.trained_context(), Some(131072));
        // Linear scaling by 2 over the config's length.
        let mut lin = m.clone();
        lin.rope_scaling = Some(serde_json::json!({"rope_type": "linear", "factor": 2.0}));
        assert_eq!(lin.trained_context(), Some(65536));
        // An invalid block is not guessed at.
        let mut bad = m.clone();
        bad.rope_scaling = Some(serde_json::json!({"rope_type": "yarn", "factor": "four"}));
        assert_eq!(bad.trained_context(), None);
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let err = ModelConfig::from_json_str(
            r#"{"model_type":"gpt2","vocab_size":10}"#,
            Path::new("/m/config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("gpt2") && err.contains("/m/config.json"),
            "{err}"
        );
    }

    #[test]
    fn missing_field_names_key_and_file() {
        let err = ModelConfig::from_json_str(
            r#"{"model_type":"mistral","vocab_size":10}"#,
            Path::new("/m/config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("hidden_size") && err.contains("/m/config.json"),
            "{err}"
        );
    }

    #[test]
    fn bad_gqa_is_refused() {
        let mut c = ModelConfig::preset("tiny", 300).unwrap();
        c.num_key_value_heads = Some(3);
        let text = serde_json::to_string(&c).unwrap();
        let err = ModelConfig::from_json_str(&text, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }

    /// The published parameter counts of each family's real-size preset (biases,
    /// q/k norms and tied embeddings included).
    #[test]
    fn family_presets_have_the_published_parameter_counts() {
        for (name, params) in [
            ("llama-3.1-8b", 8_030_261_248),
            ("llama-3.2-1b", 1_235_814_400),
            ("llama-3.2-3b", 3_212_749_824),
            ("qwen2.5-7b", 7_615_616_512),
            ("qwen2.5-0.5b", 494_032_768),
            ("qwen3-8b", 8_190_735_360),
            ("llama-2-13b", 13_015_864_320),
        ] {
            let c = ModelConfig::preset(name, 0).unwrap();
            assert_eq!(c.num_parameters(), params, "{name}");
            // Every preset survives config.json unchanged.
            let back = parse(&serde_json::to_string(&c.to_json()).unwrap()).unwrap();
            assert_eq!(back.rope().unwrap(), c.rope().unwrap(), "{name}");
            assert_eq!(back.sliding_window, c.sliding_window, "{name}");
            assert_eq!(back.tie_word_embeddings, c.tie_word_embeddings, "{name}");
        }
        let q = ModelConfig::preset("qwen2.5-7b", 0).unwrap();
        assert!(q.proj_has_bias(Proj::K) && !q.proj_has_bias(Proj::O));
        assert!(ModelConfig::preset("qwen3-8b", 0).unwrap().has_qk_norm());
        assert_eq!(
            ModelConfig::preset("llama-3.1-8b", 0)
                .unwrap()
                .rope()
                .unwrap()
                .scaling
                .name(),
            "llama3"
        );
    }

    fn parse(text: &str) -> Result<ModelConfig, ModelError> {
        ModelConfig::from_json_str(text, Path::new("/m/config.json"))
    }

    /// A Qwen 2.5 / Llama config as published, with `extra` keys laid over it.
    fn published(model_type: &str, extra: serde_json::Value) -> Result<ModelConfig, ModelError> {
        let mut v = serde_json::json!({
            "model_type": model_type, "vocab_size": 1000, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        parse(&v.to_string())
    }

    #[test]
    fn windows_as_each_family_reads_them() {
        use serde_json::json;
        // Qwen: the window needs use_sliding_window, and then from max_window_layers on.
        let q = published(
            "qwen2",
            json!({"sliding_window": 131072, "use_sliding_window": false}),
        )
        .unwrap();
        assert_eq!(q.sliding_window, None);
        // The exported config keeps Qwen's own key.
        assert_eq!(q.to_json()["sliding_window"], 131072);
        let all = published(
            "qwen2",
            json!({"sliding_window": 64, "use_sliding_window": true, "max_window_layers": 0}),
        )
        .unwrap();
        assert_eq!(all.sliding_window, Some(64));
        let none = published(
            "qwen2",
            json!({"sliding_window": 64, "use_sliding_window": true, "max_window_layers": 4}),
        )
        .unwrap();
        assert_eq!(none.sliding_window, None);
        let err = published(
            "qwen2",
            json!({"sliding_window": 64, "use_sliding_window": true, "max_window_layers": 2}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("max_window_layers") && err.contains("2 of 4"),
            "{err}"
        );
        let err = published(
            "qwen3",
            json!({"sliding_window": 64, "use_sliding_window": true,
                   "layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"]}),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("layer_types"), "{err}");
        // Llama has no window, whatever the file says.
        let l = published("llama", json!({"sliding_window": 16})).unwrap();
        assert_eq!(l.sliding_window, None);
        // Mistral: 4096 when absent (transformers' default), null means none.
        let m = published("mistral", json!({})).unwrap();
        assert_eq!(m.sliding_window, Some(4096));
        let m = published("mistral", json!({"sliding_window": null})).unwrap();
        assert_eq!(m.sliding_window, None);
    }

    #[test]
    fn family_defaults_of_absent_keys() {
        use serde_json::json;
        let mut v = json!({
            "model_type": "qwen3", "vocab_size": 1000, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        });
        // Qwen3Config's 32 KV heads, which 4 heads cannot share.
        let err = parse(&v.to_string()).unwrap_err().to_string();
        assert!(
            err.contains("num_key_value_heads") && err.contains("32"),
            "{err}"
        );
        v["num_key_value_heads"] = 2.into();
        let q = parse(&v.to_string()).unwrap();
        // Qwen3Config: head_dim 128 (not hidden / heads = 16), eps 1e-6.
        assert_eq!(q.head_dim(), 128);
        assert_eq!(q.proj_shape(Proj::Q), [512, 64]);
        assert_eq!(q.rms_norm_eps, 1e-6);
        v["model_type"] = "qwen2".into();
        assert_eq!(parse(&v.to_string()).unwrap().head_dim(), 16);
    }

    #[test]
    fn math_changing_keys_are_refused_by_name() {
        use serde_json::json;
        for (extra, key) in [
            (
                json!({"final_logit_softcapping": 30.0}),
                "final_logit_softcapping",
            ),
            (
                json!({"attn_logit_softcapping": 50.0}),
                "attn_logit_softcapping",
            ),
            (
                json!({"partial_rotary_factor": 0.5}),
                "partial_rotary_factor",
            ),
            (json!({"attention_dropout": 0.1}), "attention_dropout"),
            (
                json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}),
                "rope_scaling.rope_type",
            ),
            (
                json!({"rope_scaling": {"rope_type": "yarn", "factor": "four"}}),
                "rope_scaling.factor",
            ),
            (
                json!({"rope_parameters": {"full_attention": {"rope_type": "default"}}}),
                "rope_parameters",
            ),
            (json!({"hidden_act": "gelu"}), "hidden_act"),
            (json!({"use_qk_norm": true}), "use_qk_norm"),
        ] {
            let err = published("llama", extra.clone()).unwrap_err().to_string();
            assert!(
                err.contains(&format!("key `{key}`")) && err.contains("/m/config.json"),
                "{extra}: {err}"
            );
        }
        // Neutral values are fine.
        for extra in [
            json!({"final_logit_softcapping": null, "attention_dropout": 0.0}),
            json!({"partial_rotary_factor": 1.0, "pretraining_tp": 1, "use_qk_norm": false}),
        ] {
            published("llama", extra.clone()).unwrap_or_else(|e| panic!("{extra}: {e}"));
        }
    }

    #[test]
    fn transformers_5_rope_parameters_and_biases_per_family() {
        use serde_json::json;
        let c = published(
            "llama",
            json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192},
                   "attention_bias": true}),
        )
        .unwrap();
        // The theta inside the dictionary is the model's (and is written top-level too).
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.to_json()["rope_theta"], 500000.0);
        assert_eq!(c.rope().unwrap().scaling.name(), "llama3");
        assert!(c.proj_has_bias(Proj::O) && !c.proj_has_bias(Proj::Up));
        // Qwen 2 always has q/k/v biases, never others; Mistral never.
        let q = published("qwen2", json!({"attention_bias": false, "mlp_bias": true})).unwrap();
        assert!(q.proj_has_bias(Proj::Q) && !q.proj_has_bias(Proj::Down));
        let m = published("mistral", json!({"attention_bias": true})).unwrap();
        assert!(!m.has_biases());
    }

    #[test]
    fn proj_names_round_trip() {
        for p in PROJECTIONS {
            assert_eq!(Proj::from_name(p.name()), Some(p));
        }
        assert_eq!(
            Proj::Gate.weight_name(5),
            "model.layers.5.mlp.gate_proj.weight"
        );
    }
}
