//! Bit-compatibility with ggml: `scripts/ggml_fixture.py` ran ggml's own quantizers
//! (`ggml_quantize_chunk` from the llama.cpp that llama-cpp-python 0.3.36 builds)
//! on fixed inputs and stored inputs and outputs in
//! `tests/fixtures/ggml_quants.safetensors`; qtrain's quantizers must produce the
//! same bytes for every case and type, and the dequantized values must be within
//! each type's step of the input.

use qtrain_gguf::quants::{dequantize, quantize};
use qtrain_gguf::GgmlType;
use safetensors::SafeTensors;
use std::sync::OnceLock;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ggml_quants.safetensors"
);

const CASES: [&str; 8] = [
    "normal_bf16",
    "heavy_tail",
    "outliers",
    "positive",
    "negative",
    "tiny",
    "large",
    "sparse",
];

const TYPES: [GgmlType; 7] = [
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q5_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

fn fixture() -> SafeTensors<'static> {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    let bytes = BYTES.get_or_init(|| {
        std::fs::read(FIXTURE).unwrap_or_else(|e| {
            panic!(
                "{FIXTURE}: {e}. Generate it with llama-cpp-python installed: \
                 python3 scripts/ggml_fixture.py {FIXTURE}"
            )
        })
    });
    SafeTensors::deserialize(bytes).expect("fixture parses; regenerate it")
}

fn input(st: &SafeTensors, case: &str) -> (Vec<f32>, usize) {
    let t = st.tensor(&format!("{case}.input")).expect("input");
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (v, t.shape()[1])
}

#[test]
fn quantizers_produce_ggmls_bytes() {
    let st = fixture();
    for case in CASES {
        let (x, row) = input(&st, case);
        assert!(x.iter().any(|v| *v != 0.0));
        for ty in TYPES {
            let want = st
                .tensor(&format!("{case}.{}", ty.name()))
                .unwrap_or_else(|_| panic!("fixture lacks {case}.{ty}"))
                .data();
            let mut got = Vec::new();
            quantize(ty, &x, row, &mut got);
            assert_eq!(got.len(), want.len(), "{case} {ty}: size");
            if got != want {
                let block = ty.type_size();
                let first = got
                    .iter()
                    .zip(want)
                    .position(|(a, b)| a != b)
                    .expect("differs");
                panic!(
                    "{case} {ty}: first difference at byte {first} (block {}, byte {} of it): \
                     qtrain {:?} vs ggml {:?}",
                    first / block,
                    first % block,
                    &got[first / block * block..(first / block + 1) * block],
                    &want[first / block * block..(first / block + 1) * block],
                );
            }
        }
    }
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap_or_else(|_| panic!("fixture lacks {name}"))
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Our dequantizers give ggml's `to_float` values, bit for bit.
#[test]
fn dequantizers_give_ggmls_values() {
    let st = fixture();
    for case in CASES {
        for ty in TYPES {
            let q = st.tensor(&format!("{case}.{}", ty.name())).unwrap().data();
            let want = f32s(&st, &format!("{case}.{}.dequantized", ty.name()));
            let got = dequantize(ty, q);
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{case} {ty} element {i}: {g} vs {w}"
                );
            }
        }
    }
}

/// The error each type allows, where the format bounds it per element: half a
/// step of the code plus the f16 rounding of the scale; and the overall error of
/// the k-quants on weight-like data (their per-element error depends on the
/// 6-bit scale quantization across the super-block).
#[test]
fn dequantized_values_are_within_the_formats_error() {
    let st = fixture();
    for case in CASES {
        let (x, row) = input(&st, case);
        for ty in TYPES {
            let mut q = Vec::new();
            quantize(ty, &x, row, &mut q);
            let back = dequantize(ty, &q);
            assert_eq!(back.len(), x.len());
            if matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) {
                if case == "tiny" {
                    // Values of 1e-6 put the super-block scales below f16's
                    // subnormals: the format loses them (ggml's bytes, checked
                    // above, do the same).
                    continue;
                }
                let num: f64 = x
                    .iter()
                    .zip(&back)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                let den: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
                let rel = (num / den).sqrt();
                let bound = match ty {
                    GgmlType::Q4K => 0.12,
                    GgmlType::Q5K => 0.06,
                    _ => 0.03,
                };
                eprintln!("{case} {ty}: relative RMS error {rel:.4}");
                assert!(rel < bound, "{case} {ty}: relative RMS error {rel}");
                continue;
            }
            let group = if ty.block_size() == 1 { 1 } else { 32 };
            for (g, (xs, bs)) in x.chunks(group).zip(back.chunks(group)).enumerate() {
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                // Half an f16 ulp of a scale d (subnormal steps are 2^-24).
                let f16_half_ulp = |d: f32| (d * 2f32.powi(-11)).max(2f32.powi(-25));
                let tol = match ty {
                    // Round to nearest: half an ulp (subnormal f16 steps are 2^-24).
                    GgmlType::F16 => amax * 2f32.powi(-11) + 2f32.powi(-25),
                    GgmlType::BF16 => amax * 2f32.powi(-8),
                    // Half a step, plus the f16 rounding of the scale times the
                    // largest code (|q| <= 127).
                    GgmlType::Q8_0 => amax / 127.0 * 0.5 + 127.0 * f16_half_ulp(amax / 127.0),
                    // Codes run from -16 to 15 against d = -max / 16: the value of
                    // the other sign than `max` with magnitude amax clamps to 15 and
                    // misses by a full step.
                    GgmlType::Q5_0 => amax / 16.0 + 16.0 * f16_half_ulp(amax / 16.0),
                    _ => unreachable!(),
                };
                for (i, (a, b)) in xs.iter().zip(bs).enumerate() {
                    assert!(
                        (a - b).abs() <= tol,
                        "{case} {ty} group {g} elem {i}: {a} -> {b} (tol {tol})"
                    );
                }
            }
        }
    }
}
