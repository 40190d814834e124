//! RoPE frequencies and tables against transformers itself: the f32 bit patterns of
//! `ROPE_INIT_FUNCTIONS[...]` and of Qwen2's rotary embedding (cos/sin with YaRN's
//! attention factor) for the configs of Llama 3.1 (llama3), Qwen 2.5 (yarn), a
//! linear and a dynamic block, recorded by `scripts/hf_rope_golden.py` (transformers
//! 5.24, torch 2.15) into `tests/data/hf_rope.json`.

use qtrain_model::{RopePrecision, RopeSpec};
use serde_json::{json, Value};

fn golden() -> Value {
    serde_json::from_str(include_str!("data/hf_rope.json")).unwrap()
}

fn bits(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Largest distance in f32 units in the last place between ours and theirs.
fn ulps(ours: &[f64], theirs: &[u32]) -> u32 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(&a, &b)| (a as f32).to_bits().abs_diff(b))
        .max()
        .unwrap()
}

fn spec(block: Value, head_dim: usize, theta: f64, max_pos: usize) -> RopeSpec {
    RopeSpec::from_config_json(&json!({ "rope_scaling": block }), head_dim, theta, max_pos).unwrap()
}

#[test]
fn inverse_frequencies_equal_transformers_in_f32() {
    let g = golden();
    let cases = [
        (
            "llama3",
            spec(
                json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
                128,
                500_000.0,
                131072,
            ),
            1,
        ),
        (
            "yarn",
            spec(
                json!({"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}),
                128,
                1_000_000.0,
                131072,
            ),
            1,
        ),
        (
            "linear",
            spec(
                json!({"type": "linear", "factor": 2.0}),
                128,
                10_000.0,
                4096,
            ),
            1,
        ),
        (
            "dynamic6000",
            spec(
                json!({"type": "dynamic", "factor": 2.0}),
                128,
                10_000.0,
                4096,
            ),
            6000,
        ),
        ("default", spec(Value::Null, 128, 10_000.0, 4096), 1),
    ];
    for (name, s, seq_len) in cases {
        let theirs = &g[name];
        let f = s.frequencies(seq_len, RopePrecision::F32);
        let d = ulps(&f.inv_freq, &bits(&theirs[0]));
        let scale = theirs[1].as_f64().unwrap();
        eprintln!(
            "{name}: max {d} ulp, attention scaling {} vs {scale}",
            f.attention_scaling
        );
        // torch evaluates `base ** exponents` with its vectorized f32 pow (Sleef,
        // within 1 ulp, not correctly rounded); every other step is exact f32
        // arithmetic and agrees bit for bit.
        assert!(d <= 1, "{name}: {d} ulp from transformers");
        assert_eq!(f.attention_scaling, scale, "{name}");
    }
}

#[test]
fn yarn_cos_sin_equal_transformers_in_f32() {
    let g = golden();
    let s = spec(
        json!({"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}),
        128,
        1_000_000.0,
        131072,
    );
    let t = s.tables(&[0, 1, 17, 4095, 100000], RopePrecision::F32);
    // The angles are the same f32 numbers; torch's vectorized f32 cos/sin are not
    // correctly rounded (a few ulp, more at large angles such as 1e5 rad), while we
    // round the exact value. So the tables agree to a few f32 ulp of |x| <= 1.14.
    let worst = |ours: &[f64], theirs: &[u32]| {
        ours.iter()
            .zip(theirs)
            .map(|(&a, &b)| (a - f32::from_bits(b) as f64).abs())
            .fold(0f64, f64::max)
    };
    let (dc, ds) = (
        worst(&t.cos, &bits(&g["yarn_cos"])),
        worst(&t.sin, &bits(&g["yarn_sin"])),
    );
    eprintln!("yarn tables: cos max abs diff {dc:.1e}, sin {ds:.1e}");
    assert!(dc <= 2e-6 && ds <= 2e-6, "cos {dc:e} / sin {ds:e}");
    // The attention factor is applied: position 0 has cos = 1.1386...
    assert!((t.cos[0] - 1.138629436111989).abs() < 1e-7);
}
