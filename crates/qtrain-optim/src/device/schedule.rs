//! The double-buffered copy schedule of paged optimizer state, written once for both
//! devices: on the GPU each operation is an async copy or launch ordered by events,
//! on the CPU an immediate copy. [`Staging`] checks, on every run, that the schedule
//! never updates a buffer that does not hold the chunk's fresh state, never
//! overwrites a buffer whose update has not been written back, and writes back every
//! chunk exactly once, so CI tests the ordering the GPU's events rely on.

use crate::error::Result;

/// One paged step's operations, for chunk `k` in staging buffer `s` (0 or 1).
pub(super) trait Pipeline {
    /// Copy chunk `k`'s state from the host arena into staging buffer `s` (GPU: on the
    /// side stream, then record "uploaded `s`").
    fn upload(&mut self, k: usize, s: usize) -> Result<()>;
    /// Update chunk `k` from staging buffer `s` (GPU: the main stream waits for
    /// "uploaded `s`", launches, records "updated `s`").
    fn update(&mut self, k: usize, s: usize) -> Result<()>;
    /// Copy staging buffer `s` back to chunk `k` of the host arena (GPU: the side
    /// stream waits for "updated `s`", then copies).
    fn download(&mut self, k: usize, s: usize) -> Result<()>;
    /// End of the step (GPU: the main stream waits for the side stream).
    fn finish(&mut self) -> Result<()>;
}

/// Chunk `k` uses staging buffer `k % 2`. While chunk `k` is updated, the side
/// stream writes back chunk `k - 1` and then fills the same buffer with chunk `k + 1`.
pub(super) fn run_paged(chunks: usize, p: &mut impl Pipeline) -> Result<()> {
    if chunks > 0 {
        p.upload(0, 0)?;
        for k in 0..chunks {
            let s = k % 2;
            p.update(k, s)?;
            if k >= 1 {
                p.download(k - 1, 1 - s)?;
            }
            if k + 1 < chunks {
                p.upload(k + 1, 1 - s)?;
            }
        }
        p.download(chunks - 1, (chunks - 1) % 2)?;
    }
    p.finish()
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Buf {
    /// Holds nothing that still has to go anywhere.
    #[default]
    Free,
    /// Holds chunk `k` as uploaded, not yet updated.
    Fresh(usize),
    /// Holds chunk `k` updated, not yet written back.
    Dirty(usize),
}

/// The invariants of the schedule (violations are programming errors: panics).
#[derive(Debug, Default)]
pub(super) struct Staging {
    bufs: [Buf; 2],
    written_back: Vec<usize>,
}

impl Staging {
    pub(super) fn upload(&mut self, k: usize, s: usize) {
        assert_eq!(
            self.bufs[s],
            Buf::Free,
            "upload of chunk {k} into staging {s}, which still holds state"
        );
        self.bufs[s] = Buf::Fresh(k);
    }

    pub(super) fn update(&mut self, k: usize, s: usize) {
        assert_eq!(
            self.bufs[s],
            Buf::Fresh(k),
            "update of chunk {k} from staging {s}"
        );
        self.bufs[s] = Buf::Dirty(k);
    }

    pub(super) fn download(&mut self, k: usize, s: usize) {
        assert_eq!(
            self.bufs[s],
            Buf::Dirty(k),
            "write-back of chunk {k} from staging {s}"
        );
        self.bufs[s] = Buf::Free;
        self.written_back.push(k);
    }

    pub(super) fn finish(&mut self, chunks: usize) {
        assert_eq!(self.bufs, [Buf::Free; 2], "staging buffers left dirty");
        assert_eq!(
            self.written_back,
            (0..chunks).collect::<Vec<_>>(),
            "every chunk written back once, in order"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Log(Vec<String>, Staging, usize);
    impl Pipeline for Log {
        fn upload(&mut self, k: usize, s: usize) -> Result<()> {
            self.1.upload(k, s);
            self.0.push(format!("up {k}>{s}"));
            Ok(())
        }
        fn update(&mut self, k: usize, s: usize) -> Result<()> {
            self.1.update(k, s);
            self.0.push(format!("run {k}@{s}"));
            Ok(())
        }
        fn download(&mut self, k: usize, s: usize) -> Result<()> {
            self.1.download(k, s);
            self.0.push(format!("down {s}>{k}"));
            Ok(())
        }
        fn finish(&mut self) -> Result<()> {
            self.1.finish(self.2);
            Ok(())
        }
    }

    #[test]
    fn schedule_overlaps_neighbours_and_satisfies_its_invariants() {
        for n in 0..7 {
            let mut l = Log(Vec::new(), Staging::default(), n);
            run_paged(n, &mut l).unwrap();
            assert_eq!(l.0.len(), 3 * n);
        }
        let mut l = Log(Vec::new(), Staging::default(), 3);
        run_paged(3, &mut l).unwrap();
        assert_eq!(
            l.0,
            [
                "up 0>0", "run 0@0", "up 1>1", "run 1@1", "down 0>0", "up 2>0", "run 2@0",
                "down 1>1", "down 0>2"
            ]
        );
    }

    #[test]
    #[should_panic(expected = "still holds state")]
    fn overwriting_a_dirty_buffer_is_caught() {
        let mut s = Staging::default();
        s.upload(0, 0);
        s.update(0, 0);
        s.upload(2, 0);
    }
}
