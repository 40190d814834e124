//! The ggml tensor types qtrain writes and the GGUF file types (`general.file_type`)
//! it offers, with their numbers as ggml and llama.cpp define them.

use std::fmt;

/// A ggml tensor data type (the `type` field of a GGUF tensor info). Only the types
/// qtrain writes; the numbers are ggml's `enum ggml_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q5_0,
    Q4K,
    Q5K,
    Q6K,
}

/// Elements per super-block of the k-quants (`QK_K`).
pub const QK_K: usize = 256;

impl GgmlType {
    /// The number in ggml's `enum ggml_type`.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q5_0 => 6,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// ggml's name (`ggml_type_name`), also what gguf-py prints.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q4K => "q4_K",
            GgmlType::Q5K => "q5_K",
            GgmlType::Q6K => "q6_K",
        }
    }

    /// Elements per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 | GgmlType::Q5_0 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block (`sizeof(block_*)` in ggml-common.h).
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            // d (f16) + 32 int8
            GgmlType::Q8_0 => 34,
            // d (f16) + qh (4) + 16 nibble bytes
            GgmlType::Q5_0 => 22,
            // d, dmin (f16) + 12 scale bytes + 128 nibble bytes
            GgmlType::Q4K => 144,
            // d, dmin + 12 scales + 32 high bits + 128 nibbles
            GgmlType::Q5K => 176,
            // 128 low nibbles + 64 high 2-bit pairs + 16 int8 scales + d
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of one row of `n` elements (`ggml_row_size`); `n` must be a multiple of
    /// the block size.
    pub fn row_size(self, n: usize) -> usize {
        debug_assert_eq!(n % self.block_size(), 0);
        n / self.block_size() * self.type_size()
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What `qtrain export --gguf TYPE` writes: llama.cpp's `llama_ftype` of the same
/// name (`general.file_type`). Norms and other 1-d tensors are F32 in every one of
/// them, as llama.cpp's converter writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    /// Every matrix in f16 (`LLAMA_FTYPE_MOSTLY_F16`).
    F16,
    /// Every matrix in bf16 (`LLAMA_FTYPE_MOSTLY_BF16`).
    BF16,
    /// Every matrix in Q8_0 (`LLAMA_FTYPE_MOSTLY_Q8_0`).
    Q8_0,
    /// llama.cpp's Q4_K_M mix: Q4_K with Q6_K for the output matrix and for
    /// `attn_v`/`ffn_down` on the layers `use_more_bits` picks
    /// (`LLAMA_FTYPE_MOSTLY_Q4_K_M`).
    Q4KM,
}

impl FileType {
    pub const ALL: [FileType; 4] = [
        FileType::F16,
        FileType::BF16,
        FileType::Q8_0,
        FileType::Q4KM,
    ];

    /// The number in llama.cpp's `enum llama_ftype`.
    pub fn id(self) -> u32 {
        match self {
            FileType::F16 => 1,
            FileType::Q8_0 => 7,
            FileType::Q4KM => 15,
            FileType::BF16 => 32,
        }
    }

    /// The name users type (`--gguf q4_k_m`) and the file name's suffix.
    pub fn name(self) -> &'static str {
        match self {
            FileType::F16 => "f16",
            FileType::BF16 => "bf16",
            FileType::Q8_0 => "q8_0",
            FileType::Q4KM => "q4_k_m",
        }
    }

    /// Parses `f16`, `bf16`, `q8_0`, `q4_k_m` (any case).
    pub fn parse(s: &str) -> Option<FileType> {
        let s = s.to_ascii_lowercase();
        FileType::ALL.into_iter().find(|t| t.name() == s)
    }

    /// The type of most matrices (`llama_ftype_get_default_type`).
    pub fn default_type(self) -> GgmlType {
        match self {
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q4KM => GgmlType::Q4K,
        }
    }
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
