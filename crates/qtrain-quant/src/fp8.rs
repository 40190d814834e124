//! FP8 E4M3 ("e4m3fn", OCP FP8 and NVIDIA's `__nv_fp8_e4m3`) and the fine-grained
//! scaling of the frozen base's products in `train.precision = "fp8"`: the CPU
//! reference the CUDA kernels (qtrain-device's `ops::fp8`) are checked against
//! bit for bit.
//!
//! E4M3: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, one
//! NaN pattern per sign (`S.1111.111`), largest finite value 448, smallest normal
//! 2⁻⁶, subnormals `m · 2⁻⁹`. Conversion from f32 rounds to nearest even and
//! saturates finite overflow to ±448, as CUDA's `__nv_cvt_float_to_fp8(x,
//! __NV_SATFINITE, __NV_E4M3)`; NaN stays NaN.
//!
//! Scaling (one f32 scale per row, the "outer vector" scaling of cuBLASLt's FP8
//! GEMM): `amax = max |x|` over the row, `scale = amax / 448` and each element
//! becomes `e4m3(x · (448 / amax))`, so the row's largest element lands on ±448 and
//! `x ≈ code · scale`. A zero row gets scale 1 (all codes 0). A NaN or infinite
//! element makes `amax` infinite, so the row's products come out NaN and the step
//! is caught as non-finite instead of silently training on zeros.

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The NaN pattern (positive sign).
pub const E4M3_NAN: u8 = 0x7F;

/// `x` as E4M3: round to nearest even, finite overflow saturates to ±448, NaN to
/// NaN.
pub fn e4m3_from_f32(x: f32) -> u8 {
    if x.is_nan() {
        return E4M3_NAN;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    // Exponent of `a` clamped to the smallest normal's (-6): below it the spacing
    // stays 2⁻⁹ (subnormals). `a · 2^(3 - e)` then lies in [0, 16) and its rounding
    // counts the steps of 2^(e - 3); carrying into 16 moves to the next binade,
    // which the code arithmetic does by itself.
    let e = if a == 0.0 {
        -6
    } else {
        ((a.to_bits() >> 23) as i32 - 127).max(-6)
    };
    // (For subnormals, e = -6: the code is `steps` itself.)
    let steps = (a * f32::powi(2.0, 3 - e)).round_ties_even() as i32;
    let code = ((e + 7) << 3) + steps - 8;
    sign | (code.min(0x7E) as u8)
}

/// The value of an E4M3 code.
pub fn e4m3_to_f32(c: u8) -> f32 {
    let sign = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((c >> 3) & 0xF) as i32;
    let man = (c & 7) as f32;
    if exp == 0xF && c & 7 == 7 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man * f32::powi(2.0, -9)
    } else {
        sign * (1.0 + man / 8.0) * f32::powi(2.0, exp - 7)
    }
}

/// The absolute maximum as the scaling sees it: NaN and ±inf count as +inf.
pub fn amax(values: impl IntoIterator<Item = f32>) -> f32 {
    values.into_iter().fold(0.0f32, |m, v| {
        let a = v.abs();
        if a.is_nan() {
            f32::INFINITY
        } else {
            m.max(a)
        }
    })
}

/// `(scale, 448 / amax)` of a row with absolute maximum `amax` (a zero row: 1, 1).
pub fn row_scale(amax: f32) -> (f32, f32) {
    if amax == 0.0 {
        (1.0, 1.0)
    } else {
        (amax / E4M3_MAX, E4M3_MAX / amax)
    }
}

/// Quantizes `row` with its own scale: returns the scale and writes the codes.
pub fn quantize_row(row: &[f32], codes: &mut [u8]) -> f32 {
    let (scale, inv) = row_scale(amax(row.iter().copied()));
    for (c, &x) in codes.iter_mut().zip(row) {
        *c = e4m3_from_f32(x * inv);
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finite_codes() -> impl Iterator<Item = u8> {
        (0..=255u8).filter(|c| c & 0x7F != 0x7F)
    }

    #[test]
    fn every_finite_code_round_trips_and_the_table_is_right() {
        for c in finite_codes() {
            let v = e4m3_to_f32(c);
            let back = e4m3_from_f32(v);
            // -0 and +0 are distinct codes with equal values.
            assert_eq!(back, c, "code {c:#04x} = {v}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x08), f32::powi(2.0, -6), "smallest normal");
        assert_eq!(e4m3_to_f32(0x01), f32::powi(2.0, -9), "smallest subnormal");
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0xB8), -1.0);
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        assert_eq!(finite_codes().count(), 254);
    }

    #[test]
    fn rounds_to_nearest_even_between_every_pair_of_neighbours() {
        let positives: Vec<u8> = (0..0x7Fu8).collect();
        for w in positives.windows(2) {
            let (lo, hi) = (e4m3_to_f32(w[0]), e4m3_to_f32(w[1]));
            let mid = (lo + hi) / 2.0; // exact: both are short binary fractions
            let even = if w[0] % 2 == 0 { w[0] } else { w[1] };
            assert_eq!(e4m3_from_f32(mid), even, "tie between {lo} and {hi}");
            let just_below = f32::from_bits(mid.to_bits() - 1);
            let just_above = f32::from_bits(mid.to_bits() + 1);
            assert_eq!(e4m3_from_f32(just_below), w[0], "below {mid}");
            assert_eq!(e4m3_from_f32(just_above), w[1], "above {mid}");
            assert_eq!(e4m3_from_f32(-just_above), w[1] | 0x80, "negative");
        }
    }

    #[test]
    fn saturates_overflow_and_keeps_nan() {
        for x in [448.0f32, 449.0, 463.9, 464.0, 1e6, f32::INFINITY] {
            assert_eq!(e4m3_from_f32(x), 0x7E, "{x}");
            assert_eq!(e4m3_from_f32(-x), 0xFE, "-{x}");
        }
        assert_eq!(e4m3_from_f32(f32::NAN), E4M3_NAN);
        // Below half the smallest subnormal: zero of the right sign.
        assert_eq!(e4m3_from_f32(f32::powi(2.0, -11)), 0x00);
        assert_eq!(e4m3_from_f32(-f32::powi(2.0, -11)), 0x80);
    }

    #[test]
    fn a_row_quantizes_onto_448_and_dequantizes_within_half_a_step() {
        let row: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let mut codes = vec![0u8; row.len()];
        let scale = quantize_row(&row, &mut codes);
        let m = amax(row.iter().copied());
        assert_eq!(scale, m / 448.0);
        assert!(codes.iter().any(|&c| c & 0x7F == 0x7E), "amax maps to ±448");
        for (&x, &c) in row.iter().zip(&codes) {
            let back = e4m3_to_f32(c) * scale;
            // 3 mantissa bits: relative error at most 2⁻⁴ for normals, plus the
            // subnormal spacing near zero.
            assert!(
                (back - x).abs() <= x.abs() / 16.0 + scale * f32::powi(2.0, -10),
                "{x} -> {back}"
            );
        }
        let zeros = [0.0f32; 8];
        let mut zc = [0xAAu8; 8];
        assert_eq!(quantize_row(&zeros, &mut zc), 1.0);
        assert!(zc.iter().all(|&c| c == 0));
        assert_eq!(amax([1.0, f32::NAN, -2.0]), f32::INFINITY);
    }
}
