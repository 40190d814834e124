//! Small deterministic hashing helpers. Sample order, eval membership and cursor
//! fingerprints must not change between runs, platforms or Rust versions, so std's
//! `DefaultHasher` (unspecified algorithm) is not used.

/// FNV-1a, 64 bit.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's finalizer: a well-mixed 64-bit hash of a 64-bit value.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash of several values, order-sensitive.
pub fn hash_all(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x5171_7261_696e_u64, |h, &p| mix64(h ^ mix64(p)))
}

/// Maps a hash to [0, 1).
pub fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}
