//! Rotary position embedding parameters: the one place that turns `config.json`
//! (`rope_theta`, `rope_scaling` or transformers 5's `rope_parameters`, `head_dim`,
//! `max_position_embeddings`) into inverse frequencies and the attention scaling
//! that multiplies the `cos`/`sin` tables. The CPU reference, the KV-cached decoder
//! and the fused engine's RoPE tables all read them from here, so the three can
//! never disagree about a model's rotations.
//!
//! The variants are those of transformers' `ROPE_INIT_FUNCTIONS` that our families
//! use, with transformers' formulas:
//!
//! * `default`: `inv_freq[i] = theta^(-2i/d)`;
//! * `linear`: the default divided by `factor`;
//! * `llama3` (Llama 3.1/3.2/3.3): low frequencies (wavelength above
//!   `original_max_position_embeddings / low_freq_factor`) divided by `factor`, high
//!   ones (wavelength below `original / high_freq_factor`) kept, a linear blend in
//!   between;
//! * `yarn` (Qwen's long-context configs): a ramp between the interpolated
//!   (`/ factor`) and the original frequencies over the dimensions
//!   `find_correction_range(beta_fast, beta_slow)` (rounded outwards unless
//!   `truncate` is false), and `attention_factor` (default `0.1 ln(factor) + 1`, or
//!   the `mscale`/`mscale_all_dim` ratio) multiplying `cos` and `sin`;
//! * `dynamic` (NTK-aware): the default frequencies while the longest sequence of a
//!   forward (`max(position_ids) + 1`) fits `max_position_embeddings`, and beyond
//!   that the base `theta * (factor * len / max - (factor - 1))^(d / (d - 2))`.
//!   transformers also keeps the largest frequencies it has grown to across calls
//!   until a short sequence resets them; qtrain computes them per forward from that
//!   forward's positions, which is what transformers does for any single forward of
//!   a fresh model.
//!
//! Anything else (`longrope`, `proportional`, `mrope`, per-layer-type parameters,
//! `partial_rotary_factor` below 1) is refused by name when the config is read.
//!
//! Precision: in [`RopePrecision::F32`] every step is the f32 operation transformers
//! performs on its float32 tensors (each result rounded to f32, which for `+ - * /`
//! is exactly IEEE f32 arithmetic), so a model fine-tuned with qtrain sees the
//! rotations it saw in pre-training; [`RopePrecision::F64`] computes everything in
//! f64 (the finite-difference tests run whole models in f64).

use serde_json::Value;

/// Which arithmetic the frequencies and tables are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopePrecision {
    /// transformers' float32 arithmetic (compute dtypes f32, bf16, f16).
    F32,
    /// Everything in f64 (f64 models).
    F64,
}

/// A RoPE variant and its parameters, as read from the config.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        /// Given in the config, or derived from `factor` (and the mscales).
        attention_factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
    },
    Dynamic {
        factor: f64,
        max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// transformers' `rope_type` name.
    pub fn name(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::Dynamic { .. } => "dynamic",
        }
    }
}

/// Everything that determines a model's rotations.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub head_dim: usize,
    pub scaling: RopeScaling,
}

/// Inverse frequencies (`head_dim / 2` of them) and the factor on `cos`/`sin`.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFrequencies {
    /// In f64; in [`RopePrecision::F32`] each value is an f32.
    pub inv_freq: Vec<f64>,
    pub attention_scaling: f64,
}

/// `cos` and `sin` per position, `[positions, head_dim]` row-major, already
/// multiplied by the attention scaling. Each half of a row repeats the other
/// (transformers' `cat(freqs, freqs)`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTables {
    pub cos: Vec<f64>,
    pub sin: Vec<f64>,
    pub head_dim: usize,
}

impl RopeTables {
    /// The tables as f32 (exact in [`RopePrecision::F32`]).
    pub fn to_f32(&self) -> (Vec<f32>, Vec<f32>) {
        (
            self.cos.iter().map(|&c| c as f32).collect(),
            self.sin.iter().map(|&s| s as f32).collect(),
        )
    }
}

/// Why a RoPE configuration cannot be used: `(key, message)`, the key as it
/// appears in `config.json` (e.g. `rope_scaling.rope_type`).
pub type RopeConfigError = (String, String);

fn get_f64(obj: &serde_json::Map<String, Value>, key: &str) -> Option<f64> {
    obj.get(key).and_then(Value::as_f64)
}

impl RopeSpec {
    /// Reads the RoPE parameters the way transformers standardizes them:
    /// `rope_scaling` (transformers 4, `type` or `rope_type`) wins over
    /// `rope_parameters` (transformers 5); `rope_theta` inside the dictionary wins
    /// over the top-level key; `original_max_position_embeddings` defaults to
    /// `max_position_embeddings` (or a top-level `original_max_position_embeddings`)
    /// for `llama3` and `yarn`.
    pub fn from_config_json(
        raw: &Value,
        head_dim: usize,
        top_level_theta: f64,
        max_position_embeddings: usize,
    ) -> Result<RopeSpec, RopeConfigError> {
        let err = |key: &str, msg: String| Err((key.to_string(), msg));
        let (key, params) = match (
            raw.get("rope_scaling").filter(|v| !v.is_null()),
            raw.get("rope_parameters").filter(|v| !v.is_null()),
        ) {
            (Some(p), _) => ("rope_scaling", Some(p)),
            (None, Some(p)) => ("rope_parameters", Some(p)),
            (None, None) => ("rope_scaling", None),
        };
        if let Some(f) = raw.get("partial_rotary_factor").and_then(Value::as_f64) {
            if f != 1.0 {
                return err(
                    "partial_rotary_factor",
                    format!("{f}: rotating only part of each head is not implemented"),
                );
            }
        }
        let Some(params) = params else {
            return Ok(RopeSpec {
                theta: top_level_theta,
                head_dim,
                scaling: RopeScaling::Default,
            });
        };
        let Some(obj) = params.as_object() else {
            return err(key, format!("{params} is not an object"));
        };
        let k = |sub: &str| format!("{key}.{sub}");
        if let Some(f) = get_f64(obj, "partial_rotary_factor") {
            if f != 1.0 {
                return err(
                    &k("partial_rotary_factor"),
                    format!("{f}: rotating only part of each head is not implemented"),
                );
            }
        }
        // Per-layer-type parameters (`{"full_attention": {...}, "sliding_attention": {...}}`).
        if obj.values().any(Value::is_object) {
            return err(
                key,
                "per-layer-type RoPE parameters are not implemented".into(),
            );
        }
        let theta = match obj.get("rope_theta") {
            None | Some(Value::Null) => top_level_theta,
            Some(v) => match v.as_f64() {
                Some(t) if t.is_finite() && t > 0.0 => t,
                _ => return err(&k("rope_theta"), format!("{v} is not a positive number")),
            },
        };
        let rope_type = match (obj.get("rope_type"), obj.get("type")) {
            (Some(Value::String(t)), _) => t.as_str(),
            (None | Some(Value::Null), Some(Value::String(t))) => t.as_str(),
            (None | Some(Value::Null), None | Some(Value::Null)) => "default",
            (Some(v), _) | (_, Some(v)) => {
                return err(&k("rope_type"), format!("{v} is not a string"));
            }
        };
        // A required positive number.
        let number = |sub: &str| -> Result<f64, RopeConfigError> {
            match obj.get(sub) {
                None | Some(Value::Null) => Err((
                    k(sub),
                    format!("missing (required for rope_type \"{rope_type}\")"),
                )),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| (k(sub), format!("{v} is not a positive number"))),
            }
        };
        let optional = |sub: &str| -> Result<Option<f64>, RopeConfigError> {
            match obj.get(sub) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .map(Some)
                    .ok_or_else(|| (k(sub), format!("{v} is not a number"))),
            }
        };
        // `original_max_position_embeddings` as transformers' standardization fills it.
        let original_max = || -> Result<f64, RopeConfigError> {
            if let Some(v) = raw
                .get("original_max_position_embeddings")
                .and_then(Value::as_f64)
            {
                return Ok(v);
            }
            match obj.get("original_max_position_embeddings") {
                None | Some(Value::Null) => Ok(max_position_embeddings as f64),
                Some(_) => number("original_max_position_embeddings"),
            }
        };
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: number("factor")?,
            },
            "llama3" => {
                let s = RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: number("low_freq_factor")?,
                    high_freq_factor: number("high_freq_factor")?,
                    original_max_position_embeddings: original_max()?,
                };
                if let RopeScaling::Llama3 {
                    low_freq_factor: lo,
                    high_freq_factor: hi,
                    ..
                } = s
                {
                    if hi == lo {
                        return err(
                            &k("high_freq_factor"),
                            format!("equals low_freq_factor ({lo}): the blend divides by their difference"),
                        );
                    }
                }
                s
            }
            "yarn" => {
                let orig = original_max()?;
                let factor = match optional("factor")? {
                    Some(f) => f,
                    None => max_position_embeddings as f64 / orig,
                };
                if factor <= 0.0 {
                    return err(&k("factor"), format!("{factor} is not positive"));
                }
                let get_mscale = |scale: f64, mscale: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * mscale * scale.ln() + 1.0
                    }
                };
                let attention_factor = match optional("attention_factor")? {
                    Some(a) => a,
                    None => match (optional("mscale")?, optional("mscale_all_dim")?) {
                        // Python truthiness: both present and non-zero.
                        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                            get_mscale(factor, m) / get_mscale(factor, a)
                        }
                        _ => get_mscale(factor, 1.0),
                    },
                };
                // `beta_fast or 32`: a missing, null or zero value takes the default.
                let beta = |sub: &str, default: f64| -> Result<f64, RopeConfigError> {
                    Ok(optional(sub)?.filter(|&b| b != 0.0).unwrap_or(default))
                };
                let truncate = match obj.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(v) => return err(&k("truncate"), format!("{v} is not a boolean")),
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: orig,
                    attention_factor,
                    beta_fast: beta("beta_fast", 32.0)?,
                    beta_slow: beta("beta_slow", 1.0)?,
                    truncate,
                }
            }
            "dynamic" => RopeScaling::Dynamic {
                factor: number("factor")?,
                max_position_embeddings,
            },
            other => {
                return err(
                    &k("rope_type"),
                    format!(
                        "\"{other}\" is not implemented (qtrain implements default, linear, llama3, yarn, dynamic)"
                    ),
                )
            }
        };
        if let RopeScaling::Dynamic { .. } = scaling {
            if head_dim <= 2 {
                return err(
                    "head_dim",
                    format!("{head_dim}: dynamic RoPE needs head_dim > 2"),
                );
            }
        }
        Ok(RopeSpec {
            theta,
            head_dim,
            scaling,
        })
    }

    /// The inverse frequencies and attention scaling of a forward whose longest
    /// sequence is `seq_len` positions (`max(position_ids) + 1`; only `dynamic`
    /// depends on it).
    pub fn frequencies(&self, seq_len: usize, precision: RopePrecision) -> RopeFrequencies {
        let f32_mode = precision == RopePrecision::F32;
        // One f32 operation: the f64 result of an operation on f32 values rounded to
        // f32 is the IEEE f32 result for + - * / (53 >= 2 * 24 + 2 bits).
        let r = |x: f64| if f32_mode { x as f32 as f64 } else { x };
        let dim = self.head_dim;
        let half = dim / 2;
        // transformers: `1.0 / (base ** (arange(0, dim, 2).float() / dim))`.
        let default_inv = |base: f64| -> Vec<f64> {
            (0..half)
                .map(|i| {
                    if f32_mode {
                        let e = (2 * i) as f32 / dim as f32;
                        (1.0f32 / (base as f32).powf(e)) as f64
                    } else {
                        1.0 / base.powf((2 * i) as f64 / dim as f64)
                    }
                })
                .collect()
        };
        match &self.scaling {
            RopeScaling::Default => RopeFrequencies {
                inv_freq: default_inv(self.theta),
                attention_scaling: 1.0,
            },
            RopeScaling::Linear { factor } => RopeFrequencies {
                inv_freq: default_inv(self.theta)
                    .into_iter()
                    .map(|f| r(f / r(*factor)))
                    .collect(),
                attention_scaling: 1.0,
            },
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let (factor, lo, hi, old) = (*factor, *low_freq_factor, *high_freq_factor, *old);
                // Python floats, compared against the f32 tensor as f32 scalars.
                let low_wavelen = r(old / lo);
                let high_wavelen = r(old / hi);
                let inv_freq = default_inv(self.theta)
                    .into_iter()
                    .map(|f| {
                        // torch evaluates `scalar / tensor` as `tensor.reciprocal() * scalar`.
                        let wavelen = r(r(1.0 / f) * r(2.0 * std::f64::consts::PI));
                        let llama = if wavelen > low_wavelen {
                            r(f / r(factor))
                        } else {
                            f
                        };
                        let smooth = r(r(r(r(1.0 / wavelen) * r(old)) - r(lo)) / r(hi - lo));
                        let smoothed =
                            r(r(r(r(1.0 - smooth) * llama) / r(factor)) + r(smooth * llama));
                        // transformers: `~(wavelen < high) * ~(wavelen > low)`; the
                        // wavelengths are finite, so this is the closed interval.
                        let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                        if medium {
                            smoothed
                        } else {
                            llama
                        }
                    })
                    .collect();
                RopeFrequencies {
                    inv_freq,
                    attention_scaling: 1.0,
                }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig,
                attention_factor,
                beta_fast,
                beta_slow,
                truncate,
            } => {
                let base = self.theta;
                let d = dim as f64;
                // Python floats (f64) in transformers.
                let correction_dim = |rotations: f64| {
                    d * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(d - 1.0);
                if low == high {
                    high += 0.001; // transformers: "Prevent singularity"
                }
                let inv_freq = (0..half)
                    .map(|i| {
                        // pos_freqs = base ** (arange(0, dim, 2).float() / dim)
                        let pos = if f32_mode {
                            (base as f32).powf((2 * i) as f32 / dim as f32) as f64
                        } else {
                            base.powf((2 * i) as f64 / d)
                        };
                        let extrapolation = r(1.0 / pos);
                        let interpolation = r(1.0 / r(r(*factor) * pos));
                        let ramp = r(r(i as f64 - r(low)) / r(high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = r(1.0 - ramp);
                        r(r(interpolation * r(1.0 - extrapolation_factor))
                            + r(extrapolation * extrapolation_factor))
                    })
                    .collect();
                RopeFrequencies {
                    inv_freq,
                    attention_scaling: *attention_factor,
                }
            }
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings: max,
            } => {
                let len = seq_len.max(*max) as f64;
                let base =
                    self.theta * ((factor * len / *max as f64) - (factor - 1.0)).powf(d_over(dim));
                RopeFrequencies {
                    inv_freq: default_inv(base),
                    attention_scaling: 1.0,
                }
            }
        }
    }

    /// `cos` and `sin` for `positions` (one row per entry), with the frequencies of
    /// a forward over exactly these positions (`dynamic` looks at their maximum).
    pub fn tables(&self, positions: &[u32], precision: RopePrecision) -> RopeTables {
        let seq_len = positions.iter().max().map_or(0, |&p| p as usize + 1);
        self.tables_with(&self.frequencies(seq_len, precision), positions, precision)
    }

    /// `cos` and `sin` for `positions` with given frequencies.
    pub fn tables_with(
        &self,
        freqs: &RopeFrequencies,
        positions: &[u32],
        precision: RopePrecision,
    ) -> RopeTables {
        let d = self.head_dim;
        let half = d / 2;
        let n = positions.len();
        let mut cos = vec![0f64; n * d];
        let mut sin = vec![0f64; n * d];
        let scale = freqs.attention_scaling;
        for (t, &p) in positions.iter().enumerate() {
            for (i, &f) in freqs.inv_freq.iter().enumerate() {
                let (c, s) = match precision {
                    RopePrecision::F64 => {
                        let (s, c) = (p as f64 * f).sin_cos();
                        (c * scale, s * scale)
                    }
                    RopePrecision::F32 => {
                        // transformers: freqs = pos.float() * inv_freq; cos = emb.cos() *
                        // attention_scaling, all in f32.
                        let angle = (p as f32 * f as f32) as f64;
                        let (s, c) = angle.sin_cos();
                        if scale == 1.0 {
                            (c as f32 as f64, s as f32 as f64)
                        } else {
                            let sc = scale as f32;
                            ((c as f32 * sc) as f64, (s as f32 * sc) as f64)
                        }
                    }
                };
                let row = t * d;
                cos[row + i] = c;
                cos[row + i + half] = c;
                sin[row + i] = s;
                sin[row + i + half] = s;
            }
        }
        RopeTables {
            cos,
            sin,
            head_dim: d,
        }
    }
}

/// `dim / (dim - 2)`, the exponent of dynamic NTK scaling.
fn d_over(dim: usize) -> f64 {
    dim as f64 / (dim as f64 - 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(raw: Value, head_dim: usize, theta: f64, max_pos: usize) -> RopeSpec {
        RopeSpec::from_config_json(&raw, head_dim, theta, max_pos).unwrap()
    }

    #[test]
    fn default_without_scaling_and_theta_inside_parameters_wins() {
        let s = spec(json!({}), 8, 10_000.0, 100);
        assert_eq!(s.scaling, RopeScaling::Default);
        let s = spec(
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}),
            8,
            10_000.0,
            100,
        );
        assert_eq!(s.theta, 5.0);
    }

    #[test]
    fn unknown_types_and_partial_rotation_are_refused_by_name() {
        let e = RopeSpec::from_config_json(
            &json!({"rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}}),
            8,
            1e4,
            10,
        )
        .unwrap_err();
        assert_eq!(e.0, "rope_scaling.rope_type");
        assert!(e.1.contains("longrope"), "{}", e.1);
        let e = RopeSpec::from_config_json(&json!({"partial_rotary_factor": 0.5}), 8, 1e4, 10)
            .unwrap_err();
        assert_eq!(e.0, "partial_rotary_factor");
        let e = RopeSpec::from_config_json(
            &json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
            8,
            1e4,
            10,
        )
        .unwrap_err();
        assert_eq!(e.0, "rope_scaling.low_freq_factor");
    }

    /// The Llama 3.1 formula written out in f64 from Meta's reference
    /// (`apply_scaling` in llama-models), independent of the code above.
    #[test]
    fn llama3_frequencies_follow_metas_reference() {
        let s = spec(
            json!({"rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}}),
            128,
            500_000.0,
            131072,
        );
        let got = s.frequencies(10, RopePrecision::F64);
        assert_eq!(got.attention_scaling, 1.0);
        let mut blended = 0;
        for (i, &f) in got.inv_freq.iter().enumerate() {
            let freq = 1.0 / 500_000f64.powf((2 * i) as f64 / 128.0);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let want = if wavelen < 8192.0 / 4.0 {
                freq
            } else if wavelen > 8192.0 {
                freq / 8.0
            } else {
                blended += 1;
                let smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
                (1.0 - smooth) * freq / 8.0 + smooth * freq
            };
            assert!((f - want).abs() <= 1e-15 * want, "{i}: {f} vs {want}");
        }
        assert!(blended > 0, "the blend region is exercised");
        // f32 mode stays within f32 rounding of the exact values.
        let f32s = s.frequencies(10, RopePrecision::F32);
        for (a, b) in f32s.inv_freq.iter().zip(&got.inv_freq) {
            assert!((a - b).abs() <= 4e-7 * b, "{a} vs {b}");
        }
    }

    #[test]
    fn yarn_from_the_paper_with_qwen_config() {
        // Qwen2.5's long-context block.
        let s = spec(
            json!({"rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}}),
            128,
            1_000_000.0,
            32768,
        );
        let got = s.frequencies(1, RopePrecision::F64);
        assert!((got.attention_scaling - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        // Correction range: d ln(L / (2 pi b)) / (2 ln base), floored / ceiled.
        let cd = |b: f64| {
            128.0 * (32768.0 / (b * 2.0 * std::f64::consts::PI)).ln() / (2.0 * 1e6f64.ln())
        };
        let (low, high) = (cd(32.0).floor(), cd(1.0).ceil());
        for (i, &f) in got.inv_freq.iter().enumerate() {
            let pos = 1e6f64.powf((2 * i) as f64 / 128.0);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            // ramp 0: original frequency (extrapolation); ramp 1: divided by factor.
            let want = (1.0 / pos) * (1.0 - ramp) + (1.0 / (4.0 * pos)) * ramp;
            assert!((f - want).abs() <= 1e-15 * want, "{i}: {f} vs {want}");
        }
        assert_eq!(got.inv_freq[0], 1.0);
        // Without truncation the range is not rounded, and frequencies change.
        let untruncated = spec(
            json!({"rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768,
                   "rope_type": "yarn", "truncate": false}}),
            128,
            1_000_000.0,
            32768,
        );
        assert_ne!(
            untruncated.frequencies(1, RopePrecision::F64).inv_freq,
            got.inv_freq
        );
        // mscale / mscale_all_dim (DeepSeek style) set the attention factor.
        let m = spec(
            json!({"rope_scaling": {"factor": 40.0, "original_max_position_embeddings": 4096,
                   "rope_type": "yarn", "mscale": 1.0, "mscale_all_dim": 0.707}}),
            64,
            10_000.0,
            163840,
        );
        let a = m.frequencies(1, RopePrecision::F64).attention_scaling;
        let want = (0.1 * 40f64.ln() + 1.0) / (0.1 * 0.707 * 40f64.ln() + 1.0);
        assert!((a - want).abs() < 1e-15, "{a} vs {want}");
    }

    #[test]
    fn dynamic_changes_frequencies_only_past_the_maximum() {
        let s = spec(
            json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
            16,
            10_000.0,
            64,
        );
        let plain = spec(json!({}), 16, 10_000.0, 64);
        for p in [RopePrecision::F32, RopePrecision::F64] {
            assert_eq!(s.frequencies(64, p), plain.frequencies(64, p));
            let long = s.frequencies(100, p);
            let base = 10_000.0 * (2.0 * 100.0 / 64.0 - 1.0f64).powf(16.0 / 14.0);
            let want = spec(json!({}), 16, base, 64).frequencies(1, p);
            assert_eq!(long, want);
            assert!(long.inv_freq[1] < plain.frequencies(1, p).inv_freq[1]);
        }
        // Tables look at the largest position.
        let t = s.tables(&[0, 99], RopePrecision::F64);
        let want = spec(
            json!({}),
            16,
            10_000.0 * (2.0 * 100.0 / 64.0 - 1.0f64).powf(16.0 / 14.0),
            64,
        )
        .tables(&[0, 99], RopePrecision::F64);
        assert_eq!(t, want);
    }

    #[test]
    fn linear_divides_and_tables_carry_the_attention_scaling() {
        let s = spec(
            json!({"rope_scaling": {"type": "linear", "factor": 4.0}}),
            8,
            10_000.0,
            64,
        );
        let plain = spec(json!({}), 8, 10_000.0, 64);
        let (a, b) = (
            s.frequencies(1, RopePrecision::F64),
            plain.frequencies(1, RopePrecision::F64),
        );
        for (x, y) in a.inv_freq.iter().zip(&b.inv_freq) {
            assert_eq!(*x, y / 4.0);
        }
        let f = RopeFrequencies {
            inv_freq: b.inv_freq.clone(),
            attention_scaling: 2.0,
        };
        let scaled = plain.tables_with(&f, &[3], RopePrecision::F64);
        let unscaled = plain.tables(&[3], RopePrecision::F64);
        for (x, y) in scaled.cos.iter().zip(&unscaled.cos) {
            assert_eq!(*x, 2.0 * y);
        }
        // Each half of a row repeats the other.
        assert_eq!(unscaled.cos[..4], unscaled.cos[4..]);
        assert_eq!((3.0 * b.inv_freq[1]).sin(), unscaled.sin[1]);
    }
}
