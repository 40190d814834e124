//! bitsandbytes' serialized 4-bit quant state, as `QuantState.as_dict(packed=True)`
//! produces it and transformers stores it next to each quantized weight `P`:
//!
//! | key | dtype | content |
//! |---|---|---|
//! | `P` | uint8 `[ceil(n/2), 1]` | packed codes |
//! | `P.absmax` | uint8 (nested) or f32 | per-block absmax |
//! | `P.quant_map` | f32 `[16]` | the NF4 code |
//! | `P.nested_absmax` | f32 | absmax of the absmax blocks |
//! | `P.nested_quant_map` | f32 `[256]` | the signed dynamic map |
//! | `P.quant_state.bitsandbytes__nf4` | uint8 | JSON of the non-tensor fields |
//!
//! The JSON is `json.dumps` of `{quant_type, blocksize, dtype, shape, nested_blocksize,
//! nested_dtype, nested_offset}` in that order with Python's default separators.

use crate::error::QuantError;
use crate::nf4::{Absmax, DoubleQuantAbsmax, Nf4Tensor, NF4_CODE};
use std::borrow::Cow;

/// Element type of a serialized entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerDtype {
    U8,
    F32,
}

/// One tensor to write into a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct SerializedTensor {
    pub name: String,
    pub dtype: SerDtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

const STATE_SUFFIX: &str = "quant_state.bitsandbytes__nf4";

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_from_bytes(key: &str, b: &[u8]) -> Result<Vec<f32>, QuantError> {
    if !b.len().is_multiple_of(4) {
        return Err(QuantError::BadEntry {
            key: key.to_string(),
            msg: format!("{} bytes is not a whole number of f32", b.len()),
        });
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Python's `repr(float)`: the shortest string that round-trips, with `.0` for
/// integral values and exponent form outside [1e-4, 1e16).
fn python_float_repr(v: f64) -> String {
    if v == 0.0 {
        return if v.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let a = v.abs();
    if (1e-4..1e16).contains(&a) {
        let s = format!("{v}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        // Rust: 1.5e-5 -> "1.5e-5"; Python: "1.5e-05" (two-digit exponent minimum).
        let s = format!("{v:e}");
        let (mant, exp) = s.split_once('e').expect("exponent form");
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ("-", d),
            None => ("+", exp),
        };
        format!("{mant}e{sign}{digits:0>2}")
    }
}

impl Nf4Tensor {
    /// The entries bitsandbytes writes for this weight under `weight_name`.
    /// `compute_dtype` is the original weight dtype as torch names it (`bfloat16`).
    pub fn to_bnb_entries(&self, weight_name: &str, compute_dtype: &str) -> Vec<SerializedTensor> {
        let key = |s: &str| format!("{weight_name}.{s}");
        let mut out = vec![SerializedTensor {
            name: weight_name.to_string(),
            dtype: SerDtype::U8,
            shape: vec![self.packed.len(), 1],
            bytes: self.packed.clone(),
        }];
        let shape_json = self
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let json = match &self.absmax {
            Absmax::F32(a) => {
                out.push(SerializedTensor {
                    name: key("absmax"),
                    dtype: SerDtype::F32,
                    shape: vec![a.len()],
                    bytes: f32_bytes(a),
                });
                out.push(SerializedTensor {
                    name: key("quant_map"),
                    dtype: SerDtype::F32,
                    shape: vec![16],
                    bytes: f32_bytes(&NF4_CODE),
                });
                format!(
                    "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{compute_dtype}\", \"shape\": [{shape_json}]}}",
                    self.blocksize
                )
            }
            Absmax::DoubleQuant(d) => {
                out.push(SerializedTensor {
                    name: key("absmax"),
                    dtype: SerDtype::U8,
                    shape: vec![d.quantized.len()],
                    bytes: d.quantized.clone(),
                });
                out.push(SerializedTensor {
                    name: key("quant_map"),
                    dtype: SerDtype::F32,
                    shape: vec![16],
                    bytes: f32_bytes(&NF4_CODE),
                });
                out.push(SerializedTensor {
                    name: key("nested_absmax"),
                    dtype: SerDtype::F32,
                    shape: vec![d.nested_absmax.len()],
                    bytes: f32_bytes(&d.nested_absmax),
                });
                out.push(SerializedTensor {
                    name: key("nested_quant_map"),
                    dtype: SerDtype::F32,
                    shape: vec![d.nested_code.len()],
                    bytes: f32_bytes(&d.nested_code),
                });
                format!(
                    "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{compute_dtype}\", \"shape\": [{shape_json}], \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}}}",
                    self.blocksize,
                    d.nested_blocksize,
                    python_float_repr(d.offset as f64)
                )
            }
        };
        let bytes = json.into_bytes();
        out.push(SerializedTensor {
            name: key(STATE_SUFFIX),
            dtype: SerDtype::U8,
            shape: vec![bytes.len()],
            bytes,
        });
        out
    }

    /// Reads a weight back from its bitsandbytes entries; `get(key)` returns an
    /// entry's dtype, shape and little-endian bytes. Errors name the missing or
    /// malformed key.
    pub fn from_bnb_entries<'a>(
        weight_name: &str,
        get: impl Fn(&str) -> Option<(SerDtype, Vec<usize>, Cow<'a, [u8]>)>,
    ) -> Result<Self, QuantError> {
        let need = |k: &str| get(k).ok_or_else(|| QuantError::MissingEntry(k.to_string()));
        let key = |s: &str| format!("{weight_name}.{s}");
        let bad = |k: &str, msg: String| QuantError::BadEntry {
            key: k.to_string(),
            msg,
        };

        let state_key = key(STATE_SUFFIX);
        let (_, _, state_bytes) = need(&state_key)?;
        let state: serde_json::Value = serde_json::from_slice(&state_bytes)
            .map_err(|e| bad(&state_key, format!("not JSON: {e}")))?;
        if state["quant_type"] != "nf4" {
            return Err(bad(
                &state_key,
                format!("quant_type {} is not nf4", state["quant_type"]),
            ));
        }
        let blocksize = state["blocksize"]
            .as_u64()
            .ok_or_else(|| bad(&state_key, "blocksize missing".into()))?
            as usize;
        let shape: Vec<usize> = state["shape"]
            .as_array()
            .ok_or_else(|| bad(&state_key, "shape missing".into()))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(&state_key, "shape is not a list of integers".into()))?;
        let numel: usize = shape.iter().product();
        let n_blocks = numel.div_ceil(blocksize);

        let (dtype, _, packed) = need(weight_name)?;
        if dtype != SerDtype::U8 || packed.len() != numel.div_ceil(2) {
            return Err(bad(
                weight_name,
                format!(
                    "expected {} uint8 bytes for shape {shape:?}, found {} {dtype:?}",
                    numel.div_ceil(2),
                    packed.len()
                ),
            ));
        }
        let quant_map_key = key("quant_map");
        let (_, _, qm) = need(&quant_map_key)?;
        if f32_from_bytes(&quant_map_key, &qm)? != NF4_CODE {
            return Err(bad(&quant_map_key, "is not the NF4 code".into()));
        }
        let absmax_key = key("absmax");
        let (adtype, _, abytes) = need(&absmax_key)?;
        let absmax = if state.get("nested_offset").is_some() {
            if adtype != SerDtype::U8 || abytes.len() != n_blocks {
                return Err(bad(&absmax_key, format!("expected {n_blocks} uint8 codes")));
            }
            let nk = key("nested_absmax");
            let nested_absmax = f32_from_bytes(&nk, &need(&nk)?.2)?;
            let nqk = key("nested_quant_map");
            let nested_code = f32_from_bytes(&nqk, &need(&nqk)?.2)?;
            if nested_code.len() != 256 {
                return Err(bad(
                    &nqk,
                    format!("has {} entries, expected 256", nested_code.len()),
                ));
            }
            let nested_blocksize = state["nested_blocksize"]
                .as_u64()
                .ok_or_else(|| bad(&state_key, "nested_blocksize missing".into()))?
                as usize;
            if nested_absmax.len() != n_blocks.div_ceil(nested_blocksize) {
                return Err(bad(
                    &nk,
                    format!("expected {} values", n_blocks.div_ceil(nested_blocksize)),
                ));
            }
            let offset = state["nested_offset"]
                .as_f64()
                .ok_or_else(|| bad(&state_key, "nested_offset is not a number".into()))?
                as f32;
            Absmax::DoubleQuant(DoubleQuantAbsmax {
                quantized: abytes.into_owned(),
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            })
        } else {
            let a = f32_from_bytes(&absmax_key, &abytes)?;
            if adtype != SerDtype::F32 || a.len() != n_blocks {
                return Err(bad(
                    &absmax_key,
                    format!("expected {n_blocks} float32 values"),
                ));
            }
            Absmax::F32(a)
        };
        Ok(Nf4Tensor {
            shape,
            blocksize,
            packed: packed.into_owned(),
            absmax,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn sample(dq: bool) -> Nf4Tensor {
        let x: Vec<f32> = (0..64 * 40)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        Nf4Tensor::quantize(&x, &[40, 64], 64, dq).unwrap()
    }

    fn as_map(e: &[SerializedTensor]) -> HashMap<String, SerializedTensor> {
        e.iter().map(|t| (t.name.clone(), t.clone())).collect()
    }

    #[test]
    fn entries_round_trip_with_and_without_double_quant() {
        for dq in [true, false] {
            let q = sample(dq);
            let entries = q.to_bnb_entries("w", "bfloat16");
            let map = as_map(&entries);
            let back = Nf4Tensor::from_bnb_entries("w", |k| {
                map.get(k)
                    .map(|t| (t.dtype, t.shape.clone(), Cow::Owned(t.bytes.clone())))
            })
            .unwrap();
            assert_eq!(back, q);
        }
    }

    #[test]
    fn entry_names_shapes_and_json() {
        let q = sample(true);
        let entries = q.to_bnb_entries("model.layers.0.self_attn.q_proj.weight", "bfloat16");
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        let p = "model.layers.0.self_attn.q_proj.weight";
        assert_eq!(
            names,
            vec![
                p.to_string(),
                format!("{p}.absmax"),
                format!("{p}.quant_map"),
                format!("{p}.nested_absmax"),
                format!("{p}.nested_quant_map"),
                format!("{p}.quant_state.bitsandbytes__nf4"),
            ]
        );
        assert_eq!(entries[0].shape, vec![64 * 40 / 2, 1]);
        assert_eq!(entries[1].shape, vec![40]);
        let json = String::from_utf8(entries[5].bytes.clone()).unwrap();
        let Absmax::DoubleQuant(d) = &q.absmax else {
            panic!()
        };
        assert!(
            json.starts_with(
                "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [40, 64], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": "
            ),
            "{json}"
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["nested_offset"].as_f64().unwrap() as f32, d.offset);
    }

    #[test]
    fn missing_entry_is_named() {
        let q = sample(true);
        let map = as_map(&q.to_bnb_entries("w", "bfloat16"));
        let err = Nf4Tensor::from_bnb_entries("w", |k| {
            (k != "w.nested_absmax")
                .then(|| {
                    map.get(k)
                        .map(|t| (t.dtype, t.shape.clone(), Cow::Owned(t.bytes.clone())))
                })
                .flatten()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "bitsandbytes state: missing entry `w.nested_absmax`"
        );
    }

    #[test]
    fn python_float_repr_matches_python() {
        // Expected strings from Python: repr(struct-rounded f32 values), i.e. what
        // `json.dumps(offset.item())` writes for an f32 offset.
        let cases: [(f32, &str); 6] = [
            (0.011_003_558, "0.011003557592630386"),
            (0.0123456, "0.012345599941909313"),
            (1.5e-5, "1.4999999621068127e-05"),
            (3.051_757_8e-5, "3.0517578125e-05"),
            (0.013671875, "0.013671875"),
            (123456789.0, "123456792.0"),
        ];
        for (v, want) in cases {
            assert_eq!(python_float_repr(v as f64), want);
        }
        assert_eq!(python_float_repr(0.5), "0.5");
        assert_eq!(python_float_repr(2.0), "2.0");
    }
}
