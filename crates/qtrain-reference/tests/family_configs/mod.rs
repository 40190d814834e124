//! Small configs of each family for the f64 tests of this crate (kept out of
//! `common`, which the engine's tests share and which needs no JSON).
#![allow(dead_code)]

use crate::common::small_config;
use qtrain_model::ModelConfig;

/// [`small_config`] turned into another family, with that family's features:
/// `qwen2` (q/k/v biases, tied embeddings), `qwen3` (q/k norms, head_dim 12, not
/// hidden / heads), `llama3` (Llama 3.1's RoPE scaling with an original context of
/// 64, so that the kept, blended and divided frequencies all occur at head_dim 8,
/// and tied embeddings), `llama-bias` (`attention_bias` and `mlp_bias`), `yarn`
/// (Qwen 2 with a YaRN block and an attention factor).
pub fn small_family_config(vocab: usize, family: &str) -> ModelConfig {
    let mut c = small_config(vocab, None);
    let set = |c: &mut ModelConfig, model_type: &str| {
        c.model_type = model_type.into();
        c.use_sliding_window = Some(false);
    };
    match family {
        "qwen2" => {
            set(&mut c, "qwen2");
            c.tie_word_embeddings = true;
        }
        "qwen3" => {
            set(&mut c, "qwen3");
            c.head_dim = Some(12);
        }
        "llama3" => {
            c.model_type = "llama".into();
            c.rope_theta = 500.0;
            c.rope_scaling = Some(serde_json::json!({
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64
            }));
            c.tie_word_embeddings = true;
        }
        "llama-bias" => {
            c.model_type = "llama".into();
            c.attention_bias = Some(true);
            c.mlp_bias = Some(true);
        }
        "yarn" => {
            set(&mut c, "qwen2");
            c.rope_theta = 1000.0;
            c.rope_scaling = Some(serde_json::json!({
                "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32
            }));
        }
        other => panic!("no small config for {other}"),
    }
    // Through config.json, so every family rule applies.
    let text = serde_json::to_string(&c.to_json()).unwrap();
    ModelConfig::from_json_str(&text, std::path::Path::new("small/config.json")).unwrap()
}
