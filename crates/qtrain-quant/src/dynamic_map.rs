//! bitsandbytes' "dynamic" 8-bit quantization maps: a sign bit, a dynamic exponent
//! (leading zeros) and a fraction, giving 256 values dense near zero and sparse
//! near ±1. The signed map quantizes Adam's first moment and the double-quantized
//! NF4 absmax values; the unsigned map quantizes Adam's second moment.

use std::sync::OnceLock;

/// `torch.linspace(start, end, steps, dtype=float32)` bit for bit, as torch's CPU
/// kernel computes it: `step = (end - start) / (steps - 1)` in f32, then
/// `start + step * i` for the first half and `end - step * (steps - 1 - i)` for the
/// second, each contracted by the compiler into one fused multiply-add. (Checked
/// against bitsandbytes' maps in the fixture test: plain f32 arithmetic differs in
/// the last bit for 7 of the 64 top-decade entries.)
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits, total_bits)`.
/// Returns `max(256, 2^total_bits)` sorted values.
///
/// Python builds the list with torch f32 arithmetic for the boundaries and means,
/// then multiplies by a Python float power of ten (f32 tensor times Python scalar
/// stays f32), converts with `.tolist()` (exact f64 of the f32), and finally
/// `torch.tensor(data)` rounds to f32 again and sorts. We reproduce each rounding.
pub fn create_dynamic_map(signed: bool, max_exponent_bits: u32, total_bits: u32) -> Vec<f32> {
    let non_sign_bits = total_bits - 1;
    let additional_items = (1usize << (non_sign_bits - max_exponent_bits)) - 1;
    let mut data: Vec<f32> = Vec::with_capacity(1 << total_bits);
    // In torch, `python_float * f32_tensor` is computed in f32 with the scalar
    // rounded to f32 first.
    let push_scaled = |data: &mut Vec<f32>, scale: f64, means: &[f32]| {
        let s = scale as f32;
        data.extend(means.iter().map(|&m| s * m));
        if signed {
            let neg = (-scale) as f32;
            data.extend(means.iter().map(|&m| neg * m));
        }
    };
    let means_of = |b: &[f32]| -> Vec<f32> { b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect() };
    let mut last_i = 0;
    for i in 0..max_exponent_bits {
        let fraction_items = if signed {
            (1usize << (i + non_sign_bits - max_exponent_bits)) + 1
        } else {
            (1usize << (i + non_sign_bits - max_exponent_bits + 1)) + 1
        };
        let boundaries = linspace_f32(0.1, 1.0, fraction_items);
        let scale = 10f64.powi(-(max_exponent_bits as i32 - 1) + i as i32);
        push_scaled(&mut data, scale, &means_of(&boundaries));
        last_i = i;
    }
    if additional_items > 0 {
        let boundaries = linspace_f32(0.1, 1.0, additional_items + 1);
        let scale = 10f64.powi(-(max_exponent_bits as i32 - 1) + last_i as i32);
        push_scaled(&mut data, scale, &means_of(&boundaries));
    }
    data.push(0.0);
    data.push(1.0);
    assert_eq!(
        data.len(),
        1 << total_bits,
        "dynamic map has the wrong size"
    );
    // bitsandbytes pads a map of fewer than 8 bits with zeros to 256 entries (the
    // kernels always index a 256-entry table).
    data.resize(data.len().max(256), 0.0);
    data.sort_by(|a, b| a.partial_cmp(b).expect("finite map values"));
    data
}

/// The signed dynamic map `create_dynamic_map(true, 7, 8)` (bitsandbytes' default
/// `code` for `quantize_blockwise`).
pub fn signed_dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        create_dynamic_map(true, 7, 8)
            .try_into()
            .expect("256 entries")
    })
}

/// The unsigned dynamic map `create_dynamic_map(false, 7, 8)` (Adam's second moment).
pub fn unsigned_dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        create_dynamic_map(false, 7, 8)
            .try_into()
            .expect("256 entries")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_map_shape_and_landmarks() {
        let m = signed_dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
        // The most negative value is -(0.1 + 1) / 2 * ... of the widest exponent: -0.99297
        assert!((m[0] + 0.992_968_75).abs() < 1e-6, "{}", m[0]);
        // Smallest magnitudes come from the 1e-6 decade.
        let smallest_pos = m
            .iter()
            .copied()
            .filter(|&v| v > 0.0)
            .fold(f32::MAX, f32::min);
        assert!((smallest_pos - 5.5e-7).abs() < 1e-9, "{smallest_pos}");
    }

    #[test]
    fn unsigned_map_is_non_negative_with_endpoints() {
        let m = unsigned_dynamic_map();
        assert!(m.iter().all(|&v| v >= 0.0));
        assert_eq!(m[0], 0.0);
        assert_eq!(m[255], 1.0);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn signed_map_specific_entries() {
        let m = signed_dynamic_map();
        assert_eq!(m.len(), 256);
        // 127 negative values, then 0, then 128 positive values ending in 1.0.
        assert_eq!(m.iter().filter(|&&v| v < 0.0).count(), 127);
        assert_eq!(m[127], 0.0);
        assert_eq!((m[254], m[255]), (0.992_968_75, 1.0));
        // The top decade, m[191..255], holds the midpoints of linspace(0.1, 1, 65).
        assert!(
            (m[191] - (0.1 + 0.9 / 64.0 * 0.5)).abs() < 1e-7,
            "{}",
            m[191]
        );
        assert!(m[190] < 0.1);
        // Symmetric: every positive value but 1.0 has its negation.
        for &v in &m[128..255] {
            assert!(m.contains(&-v), "{v}");
        }
    }

    #[test]
    fn small_maps_are_padded_with_zeros_to_256() {
        // 4 bits, 3 exponent bits: 1 + 2 + 4 means per sign, 0 and 1 -> 16 values,
        // padded with 240 zeros like bitsandbytes does.
        let m = create_dynamic_map(true, 3, 4);
        assert_eq!(m.len(), 256);
        assert_eq!(m.iter().filter(|&&v| v == 0.0).count(), 241);
        assert_eq!(m[255], 1.0);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn linspace_matches_torch_halves() {
        let l = linspace_f32(0.1, 1.0, 5);
        assert_eq!(l[0], 0.1);
        assert_eq!(l[4], 1.0);
        assert_eq!(l[2], (-0.225f32).mul_add(2.0, 1.0));
    }
}
