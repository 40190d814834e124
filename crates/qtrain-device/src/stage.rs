//! Host memory that device buffers are copied to and back from beside the main
//! stream: where the fused engine keeps the gradient checkpoints (layer inputs)
//! that do not fit on the device (`EngineOptions::offload_layer_inputs`).
//!
//! A [`HostStage<T>`] owns `len` elements of host memory, a side stream and one
//! pair of events per device *slot* (the device buffers its copies read and write,
//! e.g. a ring of layer inputs). On CUDA the memory is page-locked, so the copies
//! are truly asynchronous and overlap the kernels of the main (candle's) stream;
//! the events order the two streams:
//!
//! ```text
//! main:  ... writes slot s ─[mark]──────────────── wait(saved[s]) → overwrites slot s
//! side:                      wait(mark) → copy s → host ─[saved[s]]
//!
//! main:  ... last read of slot s ─[mark]──── wait(loaded[s]) → reads slot s
//! side:                            wait(mark) → copy host → s ─[loaded[s]]
//! ```
//!
//! A copy starts only after everything the main stream had queued when it was
//! issued (the slot's writer, or its last reader), and the main stream touches the
//! slot again only after waiting on the copy's event. Copies run in issue order on
//! the side stream, so a load from host memory follows the save that filled it.
//!
//! On the CPU the same calls are plain copies in program order (the waits are
//! no-ops), so the engine's offload path runs, and is tested, without a GPU.

use crate::device::{Dev, Elem, View};
use crate::error::{ensure, Result};
use std::cell::UnsafeCell;

/// `len` elements of host memory with asynchronous copies to and from device
/// slots (see the module docs).
pub struct HostStage<T: Elem> {
    len: usize,
    slots: usize,
    /// For the main stream's side of the events.
    #[cfg(feature = "cuda")]
    dev: Dev,
    mem: StageMem<T>,
}

enum StageMem<T> {
    Host(Box<[UnsafeCell<T>]>),
    #[cfg(feature = "cuda")]
    Cuda(CudaStage),
}

/// The CUDA side: the side stream, events, and the page-locked memory.
#[cfg(feature = "cuda")]
struct CudaStage {
    // Declared (hence dropped) first: dropping the side stream waits for its copies,
    // so the pinned memory below is never freed under a copy still in flight.
    side: crate::cuda::SideStream,
    /// Recorded on the main stream right before a copy is queued; the side stream
    /// waits on it (re-recording is fine: a wait takes the record of its call).
    mark: crate::cuda::StreamEvent,
    saved: Vec<crate::cuda::StreamEvent>,
    loaded: Vec<crate::cuda::StreamEvent>,
    pinned: crate::cuda::PinnedBuf,
}

// SAFETY: the host memory is plain data written only through the copies queued by
// the owner (one thread drives one engine); the CUDA handles are thread-safe.
unsafe impl<T: Elem> Send for HostStage<T> {}

impl<T: Elem> HostStage<T> {
    /// Host memory for `len` elements of `T` (zeroed; page-locked on CUDA) with
    /// `slots` device slots to copy from and into. `what` names it in errors.
    pub fn new(dev: &Dev, len: usize, slots: usize, what: &str) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Some(c) = dev.cuda() {
            let bytes = len * std::mem::size_of::<T>();
            let pinned = c
                .alloc_pinned(bytes)
                .map_err(|e| crate::DeviceError::Cuda {
                    op: "pinned host memory",
                    msg: format!("{what}: {:.1} MiB: {e}", bytes as f64 / 1048576.0),
                })?;
            let events = |n: usize| (0..n).map(|_| c.stream_event()).collect::<Result<Vec<_>>>();
            let mem = StageMem::Cuda(CudaStage {
                side: c.side_stream()?,
                mark: c.stream_event()?,
                saved: events(slots)?,
                loaded: events(slots)?,
                pinned,
            });
            return Ok(Self {
                len,
                slots,
                dev: dev.clone(),
                mem,
            });
        }
        let _ = (dev, what);
        let mem = StageMem::Host((0..len).map(|_| UnsafeCell::new(T::default())).collect());
        Ok(Self {
            len,
            slots,
            #[cfg(feature = "cuda")]
            dev: dev.clone(),
            mem,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of host memory held.
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    fn check(&self, op: &'static str, off: usize, n: usize, slot: usize) -> Result<()> {
        ensure!(
            off + n <= self.len,
            op,
            "host elements {off}..{} out of {}",
            off + n,
            self.len
        );
        ensure!(slot < self.slots, op, "slot {slot} of {} slots", self.slots);
        Ok(())
    }

    /// Queues `host[off..off + src.len()] = src` after everything queued on the
    /// main stream so far (what wrote `src`); its completion is slot `slot`'s
    /// `saved` event ([`HostStage::wait_saved`]).
    pub fn save(&self, src: View<'_, T>, off: usize, slot: usize) -> Result<()> {
        self.check("stage save", off, src.len(), slot)?;
        match &self.mem {
            StageMem::Host(h) => {
                let s = src.host_ptr();
                for i in 0..src.len() {
                    // SAFETY: in bounds (checked); a device buffer and the stage's
                    // own memory never overlap; no references are held.
                    unsafe { h[off + i].get().write(s.add(i).read()) };
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            StageMem::Cuda(c) => {
                let cuda = self.cuda();
                cuda.record_on_main(&c.mark)?;
                c.side.wait(&c.mark)?;
                let bytes = src.len() * std::mem::size_of::<T>();
                let dst = c.pinned.as_ptr() as *mut u8;
                // SAFETY: the destination lies in our pinned memory (checked), which
                // outlives the copy (Drop waits for the side stream) and which the
                // host reads only after `synchronize`; the source is a live device
                // buffer that the main stream overwrites only after `wait_saved`.
                unsafe {
                    c.side
                        .dtoh(dst.add(off * std::mem::size_of::<T>()), src.dptr(), bytes)?
                };
                c.side.record(&c.saved[slot])
            }
        }
    }

    /// Queues `dst = host[off..off + dst.len()]` after everything queued on the
    /// main stream so far (the last reader of `dst`'s old contents); its completion
    /// is slot `slot`'s `loaded` event ([`HostStage::wait_loaded`]).
    pub fn load(&self, dst: View<'_, T>, off: usize, slot: usize) -> Result<()> {
        self.check("stage load", off, dst.len(), slot)?;
        match &self.mem {
            StageMem::Host(h) => {
                let d = dst.host_ptr();
                for i in 0..dst.len() {
                    // SAFETY: as in `save`, the other way.
                    unsafe { d.add(i).write(h[off + i].get().read()) };
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            StageMem::Cuda(c) => {
                let cuda = self.cuda();
                cuda.record_on_main(&c.mark)?;
                c.side.wait(&c.mark)?;
                let bytes = dst.len() * std::mem::size_of::<T>();
                let src = c.pinned.as_ptr();
                // SAFETY: the source lies in our pinned memory (checked) and is only
                // written by earlier copies of this side stream (ordered before this
                // one); the destination is a live device buffer that the main stream
                // reads only after `wait_loaded`.
                unsafe {
                    c.side
                        .htod(dst.dptr(), src.add(off * std::mem::size_of::<T>()), bytes)?
                };
                c.side.record(&c.loaded[slot])
            }
        }
    }

    /// Makes the main stream's later work wait until slot `slot`'s last save has
    /// completed (before overwriting the slot).
    pub fn wait_saved(&self, slot: usize) -> Result<()> {
        self.check("stage wait", 0, 0, slot)?;
        match &self.mem {
            StageMem::Host(_) => Ok(()),
            #[cfg(feature = "cuda")]
            StageMem::Cuda(c) => self.cuda().wait_on_main(&c.saved[slot]),
        }
    }

    /// Makes the main stream's later work wait until slot `slot`'s last load has
    /// completed (before reading the slot).
    pub fn wait_loaded(&self, slot: usize) -> Result<()> {
        self.check("stage wait", 0, 0, slot)?;
        match &self.mem {
            StageMem::Host(_) => Ok(()),
            #[cfg(feature = "cuda")]
            StageMem::Cuda(c) => self.cuda().wait_on_main(&c.loaded[slot]),
        }
    }

    /// Host elements `off..off + n`, after every queued copy has completed (tests
    /// and diagnostics).
    pub fn read(&self, off: usize, n: usize) -> Result<Vec<T>> {
        self.check("stage read", off, n, 0)?;
        match &self.mem {
            // SAFETY: in bounds; elements are read one at a time.
            StageMem::Host(h) => Ok((off..off + n)
                .map(|i| unsafe { h[i].get().read() })
                .collect()),
            #[cfg(feature = "cuda")]
            StageMem::Cuda(c) => {
                c.side.synchronize()?;
                let p = c.pinned.as_ptr() as *const T;
                // SAFETY: in bounds; no copy is in flight after the synchronize (the
                // owner queues none while it reads).
                Ok((off..off + n).map(|i| unsafe { p.add(i).read() }).collect())
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> &crate::cuda::CudaDev {
        self.dev
            .cuda()
            .expect("a CUDA stage lives on a CUDA device")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Saves and loads move exactly the elements asked, between a slot and the
    /// host range asked; bad ranges and slots are refused; nothing is counted as
    /// device memory.
    #[test]
    fn save_and_load_round_trip_through_the_host() {
        let dev = Dev::cpu();
        let ring = dev
            .upload(&(0..8).map(|i| i as f32).collect::<Vec<_>>(), "ring")
            .unwrap();
        let held = dev.held_bytes();
        let stage = HostStage::<f32>::new(&dev, 12, 2, "checkpoints").unwrap();
        assert_eq!(dev.held_bytes(), held);
        assert_eq!((stage.len(), stage.bytes()), (12, 48));
        stage.save(ring.view(4, 4), 8, 1).unwrap();
        stage.save(ring.view(0, 4), 0, 0).unwrap();
        stage.wait_saved(1).unwrap();
        assert_eq!(
            stage.read(0, 12).unwrap(),
            vec![0., 1., 2., 3., 0., 0., 0., 0., 4., 5., 6., 7.]
        );
        dev.fill_zero(ring.all()).unwrap();
        stage.load(ring.view(0, 4), 8, 0).unwrap();
        stage.wait_loaded(0).unwrap();
        assert_eq!(
            dev.download(ring.all()).unwrap(),
            vec![4., 5., 6., 7., 0., 0., 0., 0.]
        );
        assert!(stage.save(ring.view(0, 8), 8, 0).is_err());
        assert!(stage.load(ring.view(0, 4), 0, 2).is_err());
        assert!(stage.wait_loaded(5).is_err());
    }
}
