//! The [`Collective`] trait every backend implements (host-memory collectives among
//! the ranks of one run), its helpers for decisions all ranks must share, and
//! [`SingleProcess`], the world of one that a one-GPU run uses so that the training
//! loop has a single code path.
//!
//! Conventions shared by all backends:
//! - every rank calls the same collectives in the same order with the same lengths
//!   (the in-process backend checks this and returns [`DistError::Mismatch`]; NCCL
//!   would hang or corrupt memory, so the trainer must keep its control flow
//!   rank-independent, deciding branches through [`Collective::any`] and friends);
//! - the root of a broadcast is rank 0, the rank that owns checkpoints and the
//!   planner;
//! - sums are plain sums: the trainer divides by the global loss denominator
//!   itself (see [`crate::shard`]), never by the world size.

use crate::error::{DistError, Result};

/// Collectives over host memory among the ranks of a data-parallel run.
///
/// Object safe: the trainer holds a `Box<dyn Collective>` (or `Arc`) and never
/// needs to know which backend it talks to.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// How many ranks take part.
    fn world_size(&self) -> usize;

    /// Element-wise sum over ranks, in place; every rank ends with the same values.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// [`Collective::all_reduce_sum_f32`] in f64 (loss sums, metrics).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Element-wise sum of counters (valid target tokens, samples), exact.
    fn all_reduce_sum_u64(&self, buf: &mut [u64]) -> Result<()>;
    /// The maximum of one value over ranks.
    fn all_reduce_max_u64(&self, value: u64) -> Result<u64>;
    /// The minimum of one value over ranks.
    fn all_reduce_min_u64(&self, value: u64) -> Result<u64>;

    /// Rank 0's bytes to every rank: other ranks' `buf` is replaced (its length
    /// follows rank 0's). Serialized decisions, trainer state, a checkpoint file.
    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()>;
    /// Rank 0's values to every rank; every rank passes a buffer of the same length
    /// (the adapter at start-up or after a resume).
    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Sums `len` f32 at device address `ptr` over the ranks in place, enqueued on
    /// the CUDA stream `stream` and waited for. `Ok(false)` when this backend has
    /// no device path: the caller then stages the buffer through the host.
    ///
    /// # Safety
    /// `ptr` must address `len` f32 of device memory of this rank's GPU, allocated
    /// and not written by other streams until the call returns; `stream` must be a
    /// live stream of that GPU's context.
    unsafe fn device_all_reduce_sum_f32(
        &self,
        _ptr: u64,
        _len: usize,
        _stream: *mut std::ffi::c_void,
    ) -> Result<bool> {
        Ok(false)
    }

    /// Whether this is the rank that writes checkpoints, metrics and the adapter.
    fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// True on every rank when `flag` is true on at least one (a signal seen by
    /// any rank stops all of them at the same step).
    fn any(&self, flag: bool) -> Result<bool> {
        Ok(self.all_reduce_max_u64(flag as u64)? != 0)
    }

    /// True on every rank when `flag` is true on all of them.
    fn all(&self, flag: bool) -> Result<bool> {
        Ok(self.all_reduce_min_u64(flag as u64)? != 0)
    }

    /// Rank 0's `value` on every rank (the planner's step count, a stop decision).
    fn broadcast_u64(&self, value: u64) -> Result<u64> {
        let mut bytes = value.to_le_bytes().to_vec();
        self.broadcast_bytes(&mut bytes)?;
        let arr: [u8; 8] = bytes.as_slice().try_into().map_err(|_| {
            DistError::Invalid(format!(
                "broadcast_u64: rank 0 sent {} bytes, expected 8",
                bytes.len()
            ))
        })?;
        Ok(u64::from_le_bytes(arr))
    }

    /// Fails on every rank unless all ranks hold the same `value` (a fingerprint of
    /// the data cursor, the step number, the parameter count): catches ranks that
    /// drifted apart before they train on inconsistent state.
    fn check_same(&self, what: &str, value: u64) -> Result<()> {
        let min = self.all_reduce_min_u64(value)?;
        let max = self.all_reduce_max_u64(value)?;
        if min != max {
            return Err(DistError::Disagree {
                what: what.to_string(),
                min,
                max,
            });
        }
        Ok(())
    }
}

/// The world of one: every collective is the identity. A one-GPU run uses it so
/// the trainer has one code path and pays nothing for it.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_u64(&self, _buf: &mut [u64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_max_u64(&self, value: u64) -> Result<u64> {
        Ok(value)
    }
    fn all_reduce_min_u64(&self, value: u64) -> Result<u64> {
        Ok(value)
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// A 64-bit FNV-1a fingerprint of bytes, for [`Collective::check_same`] on
/// structured state (e.g. the JSON of the data cursor).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_process_is_the_identity() {
        let c = SingleProcess;
        let mut v = vec![1.5f32, -2.0];
        c.all_reduce_sum_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        let mut b = b"state".to_vec();
        c.broadcast_bytes(&mut b).unwrap();
        assert_eq!(b, b"state");
        assert!(c.any(true).unwrap());
        assert!(!c.all(false).unwrap());
        assert_eq!(c.broadcast_u64(42).unwrap(), 42);
        c.check_same("step", 7).unwrap();
        assert!(c.is_root());
    }

    #[test]
    fn fingerprint_separates_inputs() {
        assert_ne!(fingerprint(b"cursor-1"), fingerprint(b"cursor-2"));
        assert_eq!(fingerprint(b""), 0xcbf2_9ce4_8422_2325);
    }
}
