//! The CUDA side of the device optimizer: the kernel launches of
//! `kernels/adamw8bit.cu`, the per-block statistics, and the paged pipeline's side
//! stream, events and copies.

use qtrain_device::cuda::{
    grid_1d, launch, CudaDev, PinnedBuf, PushKernelArg, SideStream, StreamEvent,
};
use qtrain_device::{ptx, DBuf, Dev, DeviceError, View};

use super::schedule::{Pipeline, Staging};
use super::{Chunk, ENTRY_WORDS};
use crate::adamw::{Acc, Coeffs};
use crate::error::{OptimError, Result};
use crate::paging::StatePlacement;

const MODULE: &str = "qtrain_adamw8bit";
const THREADS: u32 = 256;

/// Device buffers and streams of one optimizer.
pub(super) struct Gpu {
    /// The tensor table (`AdamTensor[]`).
    table: DBuf<u32>,
    /// Signed then unsigned dynamic map, 512 f32.
    maps: DBuf<f32>,
    /// Per-block statistics: `blocks` f64 sums of squared updates, then `blocks` u32
    /// non-finite counts.
    part: DBuf<u32>,
    /// `[sum (f64 bits), count (u64)]` as four u32.
    out: DBuf<u32>,
    pipe: Option<Pipe>,
}

/// The side stream and events of the paged pipeline.
struct Pipe {
    side: SideStream,
    uploaded: [StreamEvent; 2],
    updated: [StreamEvent; 2],
    done: StreamEvent,
}

impl Gpu {
    pub(super) fn new(
        dev: &Dev,
        c: &CudaDev,
        table: &[u32],
        blocks: usize,
        placement: StatePlacement,
    ) -> Result<Self> {
        let mut maps = qtrain_quant::signed_dynamic_map().to_vec();
        maps.extend_from_slice(qtrain_quant::unsigned_dynamic_map());
        let pipe = match placement {
            StatePlacement::Resident => None,
            StatePlacement::Paged => Some(Pipe {
                side: c.side_stream()?,
                uploaded: [c.stream_event()?, c.stream_event()?],
                updated: [c.stream_event()?, c.stream_event()?],
                done: c.stream_event()?,
            }),
        };
        // Load the module now, so a broken PTX fails at construction.
        c.func(MODULE, ptx::ADAMW8BIT, "adamw_update")?;
        c.func(MODULE, ptx::ADAMW8BIT, "adamw_stats")?;
        Ok(Gpu {
            table: dev.upload(table, "optimizer tensor table")?,
            maps: dev.upload(&maps, "optimizer quantization maps")?,
            part: dev.zeros(3 * blocks.max(1), "optimizer per-block statistics")?,
            out: dev.zeros(4, "optimizer statistics")?,
            pipe,
        })
    }

    pub(super) fn bytes(&self) -> u64 {
        4 * (self.table.len() + self.maps.len() + self.part.len() + self.out.len()) as u64
    }

    /// Waits for everything the side stream has queued (copies into the pinned arena
    /// and out of the staging buffers).
    pub(super) fn quiesce(&self) -> Result<()> {
        if let Some(p) = &self.pipe {
            p.side.synchronize()?;
        }
        Ok(())
    }

    /// Launches the update of `chunk`, whose records start at arena offset
    /// `state_base` in `state`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn update(
        &self,
        c: &CudaDev,
        params: View<'_, f32>,
        grads: View<'_, f32>,
        state: View<'_, u8>,
        state_base: usize,
        chunk: &Chunk,
        k: &Coeffs,
    ) -> Result<()> {
        let nblocks = chunk.blocks.len();
        if nblocks == 0 {
            return Ok(());
        }
        assert!(
            state.len() >= chunk.bytes.len(),
            "state view holds the chunk"
        );
        let f = c.func(MODULE, ptx::ADAMW8BIT, "adamw_update")?;
        let mut b = c.builder(&f);
        let (pp, gp, sp) = (params.dptr(), grads.dptr(), state.dptr());
        let base = state_base as u64;
        let tp = self
            .table
            .view(
                chunk.tensors.start * ENTRY_WORDS,
                chunk.tensors.len() * ENTRY_WORDS,
            )
            .dptr();
        let nt = chunk.tensors.len() as u32;
        let block_base = chunk.blocks.start as u64;
        let mp = self.maps.all().dptr();
        let (b1, b2) = (k.b1, k.b2);
        let (omb1, omb2) = (1.0 - k.b1, 1.0 - k.b2);
        let (step_size, eps_hat) = (k.step_size, k.eps_hat);
        let (decay, has_decay) = (k.decay.unwrap_or(1.0), k.decay.is_some() as u32);
        let blocks_total = self.part.len() / 3;
        let part_sq = self.part.view(0, 2 * blocks_total).dptr();
        let part_nf = self.part.view(2 * blocks_total, blocks_total).dptr();
        b.arg(&pp)
            .arg(&gp)
            .arg(&sp)
            .arg(&base)
            .arg(&tp)
            .arg(&nt)
            .arg(&block_base)
            .arg(&mp)
            .arg(&b1)
            .arg(&b2)
            .arg(&omb1)
            .arg(&omb2)
            .arg(&step_size)
            .arg(&eps_hat)
            .arg(&decay)
            .arg(&has_decay)
            .arg(&part_sq)
            .arg(&part_nf);
        let mut cfg = grid_1d(nblocks * THREADS as usize, THREADS);
        cfg.grid_dim = (nblocks as u32, 1, 1);
        // SAFETY: the arguments match `adamw_update`'s parameters; the table entries
        // were built from the same layout as the arena and the flat buffers, whose
        // lengths the caller checked; `state` holds the chunk's records from
        // `state_base` on; the statistics hold one entry per global block.
        unsafe { launch("adamw_update", b, cfg) }?;
        Ok(())
    }

    /// Sums the per-block statistics of all `blocks` blocks and reads them back.
    pub(super) fn stats(&self, c: &CudaDev, blocks: usize, dev: &Dev) -> Result<Acc> {
        if blocks == 0 {
            dev.synchronize()?;
            return Ok(Acc::default());
        }
        let f = c.func(MODULE, ptx::ADAMW8BIT, "adamw_stats")?;
        let mut b = c.builder(&f);
        let total = self.part.len() / 3;
        let sq = self.part.view(0, 2 * total).dptr();
        let nf = self.part.view(2 * total, total).dptr();
        let n = blocks as u64;
        let op = self.out.all().dptr();
        b.arg(&sq).arg(&nf).arg(&n).arg(&op);
        let mut cfg = grid_1d(1024, 1024);
        cfg.grid_dim = (1, 1, 1);
        // SAFETY: arguments match `adamw_stats`; `blocks` entries of each statistic
        // were written by this step's update launches; `out` holds two u64.
        unsafe { launch("adamw_stats", b, cfg) }?;
        let w = dev.download(self.out.all())?;
        Ok(Acc {
            update_sq: f64::from_bits(u64::from(w[0]) | (u64::from(w[1]) << 32)),
            nonfinite: u64::from(w[2]) | (u64::from(w[3]) << 32),
        })
    }
}

/// Fails when the parameter and gradient buffers overlap (the kernel reads one while
/// writing the other).
pub(super) fn check_disjoint(params: View<'_, f32>, grads: View<'_, f32>) -> Result<()> {
    let (p0, g0) = (params.dptr(), grads.dptr());
    let (p1, g1) = (p0 + 4 * params.len() as u64, g0 + 4 * grads.len() as u64);
    if !params.is_empty() && p0 < g1 && g0 < p1 {
        return Err(OptimError::Device(DeviceError::Shape {
            op: "optimizer step",
            msg: "the parameter and gradient buffers overlap".into(),
        }));
    }
    Ok(())
}

/// The paged schedule on the GPU: copies on the side stream, updates on the main
/// stream, events in between.
pub(super) struct PagedPipe<'a, 'v> {
    pub(super) gpu: &'a Gpu,
    pub(super) cuda: &'a CudaDev,
    pub(super) host: &'a mut PinnedBuf,
    pub(super) staging: &'a [DBuf<u8>; 2],
    pub(super) chunks: &'a [Chunk],
    pub(super) params: View<'v, f32>,
    pub(super) grads: View<'v, f32>,
    pub(super) coeffs: &'a Coeffs,
    pub(super) check: Staging,
}

impl PagedPipe<'_, '_> {
    fn pipe(&self) -> &Pipe {
        self.gpu
            .pipe
            .as_ref()
            .expect("paged state has a side stream")
    }
}

impl Pipeline for PagedPipe<'_, '_> {
    fn upload(&mut self, k: usize, s: usize) -> Result<()> {
        self.check.upload(k, s);
        let b = self.chunks[k].bytes.clone();
        let dst = self.staging[s].view(0, b.len()).dptr();
        let p = self.pipe();
        // SAFETY: the source is this chunk's bytes of the pinned arena, which lives
        // until the optimizer is dropped (Drop waits for the side stream) and which
        // the host touches only after `quiesce`; the staging buffer is free by the
        // schedule (its previous chunk's write-back is queued before on this stream).
        unsafe { p.side.htod(dst, self.host.as_ptr().add(b.start), b.len())? };
        p.side.record(&p.uploaded[s])?;
        Ok(())
    }

    fn update(&mut self, k: usize, s: usize) -> Result<()> {
        self.check.update(k, s);
        let p = self.pipe();
        self.cuda.wait_on_main(&p.uploaded[s])?;
        let ch = &self.chunks[k];
        self.gpu.update(
            self.cuda,
            self.params,
            self.grads,
            self.staging[s].all(),
            ch.bytes.start,
            ch,
            self.coeffs,
        )?;
        self.cuda.record_on_main(&p.updated[s])?;
        Ok(())
    }

    fn download(&mut self, k: usize, s: usize) -> Result<()> {
        self.check.download(k, s);
        let b = self.chunks[k].bytes.clone();
        let src = self.staging[s].view(0, b.len()).dptr();
        let dst = self.host.as_mut_ptr();
        let p = self.pipe();
        p.side.wait(&p.updated[s])?;
        // SAFETY: as in `upload`; the update that wrote the staging buffer is
        // complete before the copy starts (the wait above).
        unsafe { p.side.dtoh(dst.add(b.start), src, b.len())? };
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.check.finish(self.chunks.len());
        let p = self.pipe();
        p.side.record(&p.done)?;
        // Everything later on the main stream (the statistics read-back, the next
        // step's kernels, a synchronize before reading the state) follows the
        // write-backs.
        self.cuda.wait_on_main(&p.done)?;
        Ok(())
    }
}
