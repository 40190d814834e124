//! The decoder architecture description: what `config.json` of a Hugging Face model
//! directory says about shapes, and the presets `qtrain init-random` writes.
//!
//! One struct covers Mistral (v0.1 with its 4096-token sliding window, v0.3 with the
//! 32768 vocabulary) and the Llama family: they share RMSNorm, RoPE, grouped-query
//! attention and a SwiGLU MLP, and differ only in numbers this struct carries.

use crate::error::ModelError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Architectures whose `model_type` we accept; anything else is refused by name.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["mistral", "llama"];

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
}

fn default_rms_norm_eps() -> f64 {
    1e-5
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
    /// Mistral v0.1 attends to the last 4096 tokens only; `null` means full causal.
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
                    msg: "missing (expected one of: mistral, llama)".into(),
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
        let mut cfg: ModelConfig =
            serde_json::from_value(raw.clone()).map_err(|e| ModelError::ConfigParse {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        cfg.raw = Some(raw);
        cfg.validate(path)?;
        Ok(cfg)
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
        if !self.head_dim().is_multiple_of(2) {
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
            + 2 * h;
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
        }
        ours
    }

    /// A named architecture with real shapes (weights come from `init-random`).
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
            raw: None,
        };
        Ok(match name {
            // Small enough to train for minutes on two CPU cores, big enough to have
            // every feature: GQA (4 heads over 2 KV heads), several layers, a window.
            "tiny" => base(
                "mistral",
                vocab_size_for_tiny,
                128,
                384,
                4,
                4,
                2,
                10_000.0,
                None,
                2048,
            ),
            "tiny-window" => base(
                "mistral",
                vocab_size_for_tiny,
                64,
                160,
                2,
                4,
                2,
                10_000.0,
                Some(8),
                256,
            ),
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
            "llama-2-7b" => {
                let mut c = base(
                    "llama", 32000, 4096, 11008, 32, 32, 32, 10_000.0, None, 4096,
                );
                c.rms_norm_eps = 1e-6;
                c
            }
            "llama-3-8b" => {
                let mut c = base(
                    "llama", 128256, 4096, 14336, 32, 32, 8, 500_000.0, None, 8192,
                );
                c.bos_token_id = Some(128000);
                c.eos_token_id = Some(serde_json::json!(128001));
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
    "mistral-7b-v0.1",
    "mistral-7b-v0.3",
    "llama-2-7b",
    "llama-3-8b",
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
