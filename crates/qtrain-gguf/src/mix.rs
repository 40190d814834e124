//! Which ggml type each tensor gets, as llama.cpp decides it.
//!
//! f16, bf16 and q8_0 follow llama.cpp's converter (`convert_hf_to_gguf.py
//! --outtype`): 1-d tensors, norms and biases stay F32, every other matrix takes
//! the file's type (Q8_0 falls back to F16 for rows that are not a multiple of 32).
//!
//! Q4_K_M follows `llama-quantize` run on such a file (`llama_tensor_get_type` in
//! llama.cpp's src/llama-quant.cpp, for the dense architectures qtrain exports):
//!
//! * quantized at all: matrices whose name ends in `weight` and is not a norm;
//! * `output.weight` — or `token_embd.weight` when the embeddings are tied and there
//!   is no output matrix — Q6_K (Q8_0 when its rows are not a multiple of 256);
//! * `attn_v` and `ffn_down` of the layers `use_more_bits` picks (the first and last
//!   eighth and every third layer between) Q6_K; on a 70B Llama (80 layers with
//!   grouped-query attention) the other `attn_v` Q5_K;
//! * everything else Q4_K;
//! * a type whose block does not divide the row length falls back as
//!   `tensor_type_fallback` does: Q4_K → Q5_0, Q5_K → Q5_1 (not needed here),
//!   Q6_K → Q8_0, and F16 when even 32 does not divide it.

use crate::arch::{Arch, HfModel};
use crate::types::{FileType, GgmlType};

/// llama.cpp's `use_more_bits(i_layer, n_layers)`.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    let (i, n) = (i as i64, n as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The layer index of a `blk.N.*` name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// `tensor_type_fallback`: the type used when `ty`'s block does not divide `row`.
fn fallback(ty: GgmlType, row: usize) -> GgmlType {
    if row.is_multiple_of(ty.block_size()) {
        return ty;
    }
    let next = match ty {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other,
    };
    if row.is_multiple_of(next.block_size()) {
        next
    } else {
        GgmlType::F16
    }
}

/// The type of tensor `name` with PyTorch shape `shape` in a file of type `ft`.
pub fn tensor_type(
    ft: FileType,
    m: &HfModel,
    name: &str,
    shape: &[usize],
    has_output: bool,
) -> GgmlType {
    let row = *shape.last().expect("a tensor has a shape");
    if shape.len() < 2 || name.ends_with("_norm.weight") || !name.ends_with(".weight") {
        return GgmlType::F32;
    }
    match ft {
        FileType::F16 | FileType::BF16 => ft.default_type(),
        FileType::Q8_0 => {
            if row.is_multiple_of(32) {
                GgmlType::Q8_0
            } else {
                GgmlType::F16
            }
        }
        FileType::Q4KM => {
            let is_70b = m.arch == Arch::Llama && m.n_layers == 80 && m.n_heads != m.n_kv_heads;
            let ty = if name == "output.weight" || (!has_output && name == "token_embd.weight") {
                // Q8_0 unless 256 divides the row (then F16 unless 32 does).
                let ty = if row.is_multiple_of(256) {
                    GgmlType::Q6K
                } else {
                    GgmlType::Q8_0
                };
                return fallback(ty, row);
            } else if name.ends_with(".attn_v.weight") {
                let l = layer_of(name).expect("blk.N name");
                if use_more_bits(l, m.n_layers) {
                    GgmlType::Q6K
                } else if is_70b {
                    GgmlType::Q5K
                } else {
                    GgmlType::Q4K
                }
            } else if name.ends_with(".ffn_down.weight") {
                let l = layer_of(name).expect("blk.N name");
                if use_more_bits(l, m.n_layers) {
                    GgmlType::Q6K
                } else {
                    GgmlType::Q4K
                }
            } else {
                GgmlType::Q4K
            };
            fallback(ty, row)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_more_bits_matches_llama_cpp_for_32_layers() {
        // llama-quantize's Q4_K_M of a 32-layer model keeps these ffn_down/attn_v
        // layers at Q6_K: 0-3, 28-31, and 4 + 3k + 2 between.
        let got: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            got,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        let got: Vec<usize> = (0..4).filter(|&i| use_more_bits(i, 4)).collect();
        assert_eq!(got, vec![2, 3]);
    }

    #[test]
    fn fallbacks_follow_the_row_length() {
        assert_eq!(fallback(GgmlType::Q4K, 4096), GgmlType::Q4K);
        assert_eq!(fallback(GgmlType::Q4K, 128), GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q6K, 96), GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q4K, 100), GgmlType::F16);
    }
}
