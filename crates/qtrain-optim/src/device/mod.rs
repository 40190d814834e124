//! The optimizer on a [`qtrain_device::Dev`]: [`DeviceAdamW8bit`] (and
//! [`DeviceAdamW32`]) update a flat f32 parameter buffer in place from a flat
//! gradient buffer of the same layout, the fused engine's `DeviceLora::params` /
//! `grads`, with the fused CUDA kernel `kernels/adamw8bit.cu` on a GPU and with the
//! CPU oracle ([`crate::AdamW8bit`]'s per-tensor update) on [`Dev::cpu`]. Results
//! are bit-identical to [`crate::AdamW8bit::step`] on the same inputs; the state
//! converts to and from the host optimizer, so checkpoints are the host format
//! ([`crate::checkpoint`]) and a run can resume on either path. Also here:
//! [`clip_grad_norm`] over a flat gradient buffer, and the GPU [`selftest()`].
//!
//! # State arena
//!
//! All state lives in one byte arena, one *record* per parameter tensor, records in
//! parameter order, each starting on a 16-byte boundary:
//!
//! * 8-bit state: `m` codes `[numel]` u8, `v` codes `[numel]` u8, then (4-byte
//!   aligned) `m` absmax `[blocks]` f32 and `v` absmax `[blocks]` f32;
//! * f32 state: `m [numel]` f32, then `v [numel]` f32.
//!
//! Values are little-endian, as on every CUDA host. A small table (one 64-byte
//! entry per tensor: parameter offset, element count, first state block, format and
//! the four arena offsets) tells the kernel where everything is. Each tensor owns
//! `ceil(numel / 256)` state blocks (also for f32 state, where a block is only the
//! unit of work), numbered consecutively over all tensors; one CUDA block of 256
//! threads updates one state block, so blocks never cross tensors, as in the CPU code.
//!
//! # Placement (see [`crate::paging`])
//!
//! *Resident*: the arena is one buffer on the device; a step is one update launch
//! over all tensors plus one launch that sums the per-block statistics.
//!
//! *Paged*: the arena lives in host memory (page-locked on CUDA) and is streamed
//! through two device staging buffers in *chunks* (runs of consecutive records of at
//! most [`PAGED_CHUNK_BYTES`], or one record if a record is larger): the state of
//! chunk `k + 1` is uploaded and that of chunk `k - 1` written back on a side stream
//! while chunk `k` is updated on the main stream, with events ordering each copy
//! against the kernels (see `run_paged`). The device holds exactly two staging
//! buffers of the largest chunk's size.
//!
//! On [`Dev::cpu`] both placements run the same code paths with plain host memory
//! (the staging buffers are CPU buffers and copies are immediate), so CI tests the
//! arena layout, the chunking and the copy schedule against the host optimizer.
//!
//! # Exactness
//!
//! Every parameter, code and absmax equals the CPU's bit for bit: the kernel uses
//! explicitly rounded intrinsics (no FMA contraction), IEEE division and square
//! root, the CPU's nearest-code search and sign fix, and the per-step scalars are
//! computed on the host by the same code as the CPU's. What is *not* bit-exact:
//!
//! * `StepStats::update_norm` on the GPU: the f64 sum of squared updates is summed
//!   per block and then over blocks in a fixed (so repeatable) tree order instead of
//!   element order; each term is exact, so the relative difference of the f64 sum is
//!   at most about `n · 2⁻⁵³` (1.5e-9 for 13.6M parameters, typically ~1e-15), which
//!   rarely shows after the cast to f32. (The CPU optimizer itself sums per thread,
//!   so its value also depends on the core count beyond 1M parameters.)
//! * NaN payloads, only when the state itself overflows (a gradient above ~1.8e19,
//!   whose square is infinite): the GPU's canonical NaN differs from x86's.
//! * [`clip_grad_norm`] on the GPU: `qtrain_device::rows::sum_squares` sums in a
//!   grid-stride order, so the norm can differ from the CPU's in the last bits of
//!   the f64 sum (same bound as above); when clipping applies, the f32 scale factor
//!   can then differ by one ulp, and so can the clipped gradients.

mod schedule;
pub mod selftest;

#[cfg(feature = "cuda")]
mod gpu;

use std::ops::Range;
use std::path::Path;

use qtrain_device::{DBuf, Dev, View};

use crate::adamw::{
    num_blocks, update_storage, Acc, Coeffs, Core, OptimizerKind, ParamSpec, ParamState,
    StateFormat, StateStorage, BLOCKSIZE,
};
use crate::error::{OptimError, Result};
use crate::paging::StatePlacement;
use crate::{AdamW32, AdamW8bit, AdamWConfig, StepStats};

use schedule::{run_paged, Staging};
pub use selftest::selftest;

/// The target size of one paged chunk (4 MiB: large enough that each copy runs at
/// full PCIe bandwidth, small enough that the pipeline has several stages to
/// overlap). The two staging buffers are each the size of the largest chunk, which
/// is at most this or the largest single tensor's state.
pub const PAGED_CHUNK_BYTES: usize = 4 << 20;

/// u32 words per table entry (8 u64, `AdamTensor` in the kernel).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const ENTRY_WORDS: usize = 16;

fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Where one tensor lives: its parameters in the flat buffers, its blocks, its
/// record in the arena.
#[derive(Clone, Debug, PartialEq)]
struct Slot {
    name: String,
    numel: usize,
    format: StateFormat,
    param_off: usize,
    block_start: usize,
    rec_off: usize,
    rec_len: usize,
    /// Offsets inside the record: `m`, `v`, `m` absmax, `v` absmax (the last two
    /// unused for f32 state).
    parts: [usize; 4],
}

impl Slot {
    fn blocks(&self) -> usize {
        num_blocks(self.numel)
    }
}

/// `(record length, part offsets)` of a tensor's state record.
fn record_layout(numel: usize, format: StateFormat) -> (usize, [usize; 4]) {
    match format {
        StateFormat::F32 => (align(8 * numel, 16), [0, 4 * numel, 0, 0]),
        StateFormat::Blockwise8 => {
            let nb = num_blocks(numel);
            let ma = align(2 * numel, 4);
            let va = ma + 4 * nb;
            (align(va + 4 * nb, 16), [0, numel, ma, va])
        }
    }
}

/// The slots of `states`' tensors, in order.
fn layout(states: &[(String, usize, StateFormat)]) -> Vec<Slot> {
    let (mut param_off, mut block_start, mut rec_off) = (0, 0, 0);
    states
        .iter()
        .map(|(name, numel, format)| {
            let (rec_len, parts) = record_layout(*numel, *format);
            let s = Slot {
                name: name.clone(),
                numel: *numel,
                format: *format,
                param_off,
                block_start,
                rec_off,
                rec_len,
                parts,
            };
            param_off += numel;
            block_start += num_blocks(*numel);
            rec_off += rec_len;
            s
        })
        .collect()
}

/// A run of consecutive tensors updated by one launch (and, paged, moved by one copy
/// each way).
#[derive(Clone, Debug, PartialEq)]
struct Chunk {
    tensors: Range<usize>,
    /// Arena bytes of the chunk's records.
    bytes: Range<usize>,
    /// Elements of the flat parameter buffer.
    params: Range<usize>,
    /// Global state block indices.
    blocks: Range<usize>,
}

/// Greedy split of the slots into chunks of at most `cap` record bytes (a larger
/// record gets a chunk of its own). `cap = usize::MAX` gives one chunk.
fn plan_chunks(slots: &[Slot], cap: usize) -> Vec<Chunk> {
    let mut out: Vec<Chunk> = Vec::new();
    for (i, s) in slots.iter().enumerate() {
        let fits = out.last().is_some_and(|c| c.bytes.len() + s.rec_len <= cap);
        if fits {
            let c = out.last_mut().expect("a chunk");
            c.tensors.end = i + 1;
            c.bytes.end = s.rec_off + s.rec_len;
            c.params.end = s.param_off + s.numel;
            c.blocks.end = s.block_start + s.blocks();
        } else {
            out.push(Chunk {
                tensors: i..i + 1,
                bytes: s.rec_off..s.rec_off + s.rec_len,
                params: s.param_off..s.param_off + s.numel,
                blocks: s.block_start..s.block_start + s.blocks(),
            });
        }
    }
    out
}

/// Writes `storage` into its record bytes.
fn encode(storage: &StateStorage, slot: &Slot, rec: &mut [u8]) {
    fn put_f32(dst: &mut [u8], x: &[f32]) {
        for (d, v) in dst.chunks_exact_mut(4).zip(x) {
            d.copy_from_slice(&v.to_le_bytes());
        }
    }
    let n = slot.numel;
    let nb = slot.blocks();
    let [a, b, c, d] = slot.parts;
    match storage {
        StateStorage::F32 { m, v } => {
            put_f32(&mut rec[a..a + 4 * n], m);
            put_f32(&mut rec[b..b + 4 * n], v);
        }
        StateStorage::Blockwise8 {
            m_q,
            m_absmax,
            v_q,
            v_absmax,
        } => {
            rec[a..a + n].copy_from_slice(m_q);
            rec[b..b + n].copy_from_slice(v_q);
            put_f32(&mut rec[c..c + 4 * nb], m_absmax);
            put_f32(&mut rec[d..d + 4 * nb], v_absmax);
        }
    }
}

/// Reads a tensor's state back from its record bytes.
fn decode(rec: &[u8], slot: &Slot) -> StateStorage {
    fn get_f32(src: &[u8]) -> Vec<f32> {
        src.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
    let n = slot.numel;
    let nb = slot.blocks();
    let [a, b, c, d] = slot.parts;
    match slot.format {
        StateFormat::F32 => StateStorage::F32 {
            m: get_f32(&rec[a..a + 4 * n]),
            v: get_f32(&rec[b..b + 4 * n]),
        },
        StateFormat::Blockwise8 => StateStorage::Blockwise8 {
            m_q: rec[a..a + n].to_vec(),
            m_absmax: get_f32(&rec[c..c + 4 * nb]),
            v_q: rec[b..b + n].to_vec(),
            v_absmax: get_f32(&rec[d..d + 4 * nb]),
        },
    }
}

/// The kernel's tensor table: [`ENTRY_WORDS`] u32 per tensor, eight little-endian
/// u64 (`AdamTensor` in `kernels/adamw8bit.cu`), arena offsets absolute.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn table_words(slots: &[Slot]) -> Vec<u32> {
    let mut w = Vec::with_capacity(slots.len() * ENTRY_WORDS);
    for s in slots {
        let fmt = match s.format {
            StateFormat::F32 => 0,
            StateFormat::Blockwise8 => 1,
        };
        let [a, b, c, d] = s.parts.map(|p| s.rec_off + p);
        for x in [s.param_off, s.numel, s.block_start, fmt, a, b, c, d] {
            let x = x as u64;
            w.push(x as u32);
            w.push((x >> 32) as u32);
        }
    }
    w
}

/// The paged arena's home on the host.
enum HostArena {
    Plain(Vec<u8>),
    #[cfg(feature = "cuda")]
    Pinned(qtrain_device::cuda::PinnedBuf),
}

impl HostArena {
    /// The arena of a CPU optimizer.
    fn plain(&mut self) -> &mut Vec<u8> {
        match self {
            HostArena::Plain(v) => v,
            #[cfg(feature = "cuda")]
            HostArena::Pinned(_) => unreachable!("a CPU optimizer's arena is a Vec"),
        }
    }
}

enum Store {
    /// The arena on the device.
    Resident(DBuf<u8>),
    /// The arena on the host, streamed through two device staging buffers.
    Paged {
        host: HostArena,
        staging: [DBuf<u8>; 2],
    },
}

/// The shared implementation of [`DeviceAdamW8bit`] and [`DeviceAdamW32`].
struct DeviceCore {
    kind: OptimizerKind,
    config: AdamWConfig,
    step: u64,
    placement: StatePlacement,
    dev: Dev,
    slots: Vec<Slot>,
    numel: usize,
    /// State blocks over all tensors (the GPU's per-block statistics).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    blocks: usize,
    arena_len: usize,
    chunk_cap: usize,
    chunks: Vec<Chunk>,
    store: Store,
    #[cfg(feature = "cuda")]
    gpu: Option<gpu::Gpu>,
}

impl DeviceCore {
    fn from_core(core: &Core, dev: &Dev, chunk_bytes: usize) -> Result<Self> {
        if dev.is_cuda() && !cfg!(feature = "cuda") {
            return Err(OptimError::Device(
                qtrain_device::DeviceError::Unsupported {
                    op: "device optimizer",
                    msg: "qtrain-optim was built without its `cuda` feature".into(),
                },
            ));
        }
        let described: Vec<(String, usize, StateFormat)> = core
            .states
            .iter()
            .map(|s| (s.name.clone(), s.numel, s.format()))
            .collect();
        let slots = layout(&described);
        let numel = slots.iter().map(|s| s.numel).sum();
        let blocks = slots.iter().map(Slot::blocks).sum();
        let arena_len = slots.last().map_or(0, |s| s.rec_off + s.rec_len);
        let mut arena = vec![0u8; arena_len];
        for (s, st) in slots.iter().zip(&core.states) {
            encode(&st.storage, s, &mut arena[s.rec_off..s.rec_off + s.rec_len]);
        }
        let placement = core.placement;
        let chunk_cap = match placement {
            StatePlacement::Resident => usize::MAX,
            StatePlacement::Paged => chunk_bytes.max(1),
        };
        let chunks = plan_chunks(&slots, chunk_cap);
        let store = match placement {
            StatePlacement::Resident => {
                Store::Resident(dev.upload(&arena, "optimizer state (resident)")?)
            }
            StatePlacement::Paged => {
                let staging_len = chunks.iter().map(|c| c.bytes.len()).max().unwrap_or(0);
                let staging = [
                    dev.zeros::<u8>(staging_len, "optimizer state staging buffer")?,
                    dev.zeros::<u8>(staging_len, "optimizer state staging buffer")?,
                ];
                Store::Paged {
                    host: Self::host_arena(dev, arena)?,
                    staging,
                }
            }
        };
        #[cfg(feature = "cuda")]
        let gpu = match dev.cuda() {
            Some(c) => Some(gpu::Gpu::new(
                dev,
                c,
                &table_words(&slots),
                blocks,
                placement,
            )?),
            None => None,
        };
        dev.synchronize()?;
        Ok(DeviceCore {
            kind: core.kind,
            config: core.config,
            step: core.step,
            placement,
            dev: dev.clone(),
            slots,
            numel,
            blocks,
            arena_len,
            chunk_cap,
            chunks,
            store,
            #[cfg(feature = "cuda")]
            gpu,
        })
    }

    fn host_arena(dev: &Dev, arena: Vec<u8>) -> Result<HostArena> {
        #[cfg(feature = "cuda")]
        if let Some(c) = dev.cuda() {
            let mut p = c.alloc_pinned(arena.len())?;
            // SAFETY: freshly allocated, no copies queued yet.
            unsafe { p.as_mut_slice() }.copy_from_slice(&arena);
            return Ok(HostArena::Pinned(p));
        }
        let _ = dev;
        Ok(HostArena::Plain(arena))
    }

    /// The whole arena on the host (waits for queued work).
    fn arena_bytes(&self) -> Result<Vec<u8>> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            g.quiesce()?;
        }
        self.dev.synchronize()?;
        Ok(match &self.store {
            Store::Resident(buf) => self.dev.download(buf.all())?,
            Store::Paged { host, .. } => match host {
                HostArena::Plain(v) => v.clone(),
                // SAFETY: `quiesce` waited for every copy into the pinned arena.
                #[cfg(feature = "cuda")]
                HostArena::Pinned(p) => unsafe { p.as_slice() }.to_vec(),
            },
        })
    }

    fn to_core(&self) -> Result<Core> {
        let arena = self.arena_bytes()?;
        let states = self
            .slots
            .iter()
            .map(|s| ParamState {
                name: s.name.clone(),
                numel: s.numel,
                storage: decode(&arena[s.rec_off..s.rec_off + s.rec_len], s),
            })
            .collect();
        Ok(Core::from_parts(self.kind, self.config, states, self.step))
    }

    fn state_bytes(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| match s.format {
                StateFormat::F32 => 8 * s.numel as u64,
                StateFormat::Blockwise8 => 2 * s.numel as u64 + 8 * s.blocks() as u64,
            })
            .sum()
    }

    fn device_bytes(&self) -> u64 {
        let store = match &self.store {
            Store::Resident(b) => b.len(),
            Store::Paged { staging, .. } => staging[0].len() + staging[1].len(),
        } as u64;
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return store + g.bytes();
        }
        store
    }

    fn step(&mut self, params: View<'_, f32>, grads: View<'_, f32>, lr: f32) -> Result<StepStats> {
        for (what, len) in [("parameter", params.len()), ("gradient", grads.len())] {
            if len != self.numel {
                return Err(OptimError::FlatLen {
                    what,
                    expected: self.numel,
                    found: len,
                });
            }
        }
        if !lr.is_finite() || lr < 0.0 {
            return Err(OptimError::InvalidLr(lr));
        }
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            gpu::check_disjoint(params, grads)?;
        }
        self.step += 1;
        let c = Coeffs::new(&self.config, self.step, lr);
        let acc = self.run(params, grads, &c)?;
        Ok(StepStats {
            step: self.step,
            lr,
            nonfinite_grads: acc.nonfinite,
            update_norm: acc.update_sq.sqrt() as f32,
        })
    }

    fn run(&mut self, params: View<'_, f32>, grads: View<'_, f32>, c: &Coeffs) -> Result<Acc> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            let cuda = self.dev.cuda().expect("a CUDA device");
            let staging = match &mut self.store {
                Store::Resident(arena) => {
                    if let Some(ch) = self.chunks.first() {
                        g.update(cuda, params, grads, arena.all(), 0, ch, c)?;
                    }
                    None
                }
                Store::Paged { host, staging } => Some((host, &*staging)),
            };
            if let Some((host, staging)) = staging {
                let HostArena::Pinned(pinned) = host else {
                    unreachable!("a CUDA optimizer's paged arena is pinned")
                };
                let mut pipe = gpu::PagedPipe {
                    gpu: g,
                    cuda,
                    host: pinned,
                    staging,
                    chunks: &self.chunks,
                    params,
                    grads,
                    coeffs: c,
                    check: Staging::default(),
                };
                run_paged(self.chunks.len(), &mut pipe)?;
            }
            return g.stats(cuda, self.blocks, &self.dev);
        }
        let mut acc = Acc::default();
        match &mut self.store {
            Store::Resident(arena) => {
                for ch in &self.chunks {
                    let state = arena.view(ch.bytes.start, ch.bytes.len());
                    cpu_update(
                        &self.dev,
                        &self.slots,
                        ch,
                        state,
                        params,
                        grads,
                        c,
                        &mut acc,
                    )?;
                }
            }
            Store::Paged { host, staging } => {
                let host = host.plain();
                let mut pipe = CpuPipe {
                    dev: &self.dev,
                    slots: &self.slots,
                    chunks: &self.chunks,
                    host,
                    staging,
                    params,
                    grads,
                    coeffs: c,
                    acc: &mut acc,
                    check: Staging::default(),
                };
                run_paged(self.chunks.len(), &mut pipe)?;
            }
        }
        Ok(acc)
    }
}

#[cfg(feature = "cuda")]
impl Drop for DeviceCore {
    fn drop(&mut self) {
        // Copies on the side stream may still read the staging buffers and the pinned
        // arena: let them finish before either is freed.
        if let Some(g) = &self.gpu {
            let _ = g.quiesce();
        }
    }
}

/// The CPU reference of one launch: the host optimizer's per-tensor update over the
/// records of `chunk`, read from and written back to `state` (the chunk's bytes).
#[allow(clippy::too_many_arguments)]
fn cpu_update(
    dev: &Dev,
    slots: &[Slot],
    chunk: &Chunk,
    state: View<'_, u8>,
    params: View<'_, f32>,
    grads: View<'_, f32>,
    c: &Coeffs,
    acc: &mut Acc,
) -> Result<()> {
    let mut st = dev.download(state)?;
    let pv = params.sub(chunk.params.start, chunk.params.len());
    let mut p = dev.download(pv)?;
    let g = dev.download(grads.sub(chunk.params.start, chunk.params.len()))?;
    for s in &slots[chunk.tensors.clone()] {
        let r = s.rec_off - chunk.bytes.start..s.rec_off - chunk.bytes.start + s.rec_len;
        let mut storage = decode(&st[r.clone()], s);
        let pr = s.param_off - chunk.params.start..s.param_off - chunk.params.start + s.numel;
        update_storage(&mut storage, &mut p[pr.clone()], &g[pr], c, acc);
        encode(&storage, s, &mut st[r]);
    }
    dev.write(pv, &p)?;
    dev.write(state, &st)?;
    Ok(())
}

/// The paged schedule on the CPU: copies are immediate.
struct CpuPipe<'a, 'v> {
    dev: &'a Dev,
    slots: &'a [Slot],
    chunks: &'a [Chunk],
    host: &'a mut Vec<u8>,
    staging: &'a [DBuf<u8>; 2],
    params: View<'v, f32>,
    grads: View<'v, f32>,
    coeffs: &'a Coeffs,
    acc: &'a mut Acc,
    check: Staging,
}

impl schedule::Pipeline for CpuPipe<'_, '_> {
    fn upload(&mut self, k: usize, s: usize) -> Result<()> {
        self.check.upload(k, s);
        let b = self.chunks[k].bytes.clone();
        self.dev
            .write(self.staging[s].view(0, b.len()), &self.host[b])?;
        Ok(())
    }

    fn update(&mut self, k: usize, s: usize) -> Result<()> {
        self.check.update(k, s);
        let ch = &self.chunks[k];
        let state = self.staging[s].view(0, ch.bytes.len());
        cpu_update(
            self.dev,
            self.slots,
            ch,
            state,
            self.params,
            self.grads,
            self.coeffs,
            self.acc,
        )
    }

    fn download(&mut self, k: usize, s: usize) -> Result<()> {
        self.check.download(k, s);
        let b = self.chunks[k].bytes.clone();
        let back = self.dev.download(self.staging[s].view(0, b.len()))?;
        self.host[b].copy_from_slice(&back);
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.check.finish(self.chunks.len());
        Ok(())
    }
}

/// The common interface of [`DeviceAdamW8bit`] and [`DeviceAdamW32`], for callers
/// that pick one at run time.
pub trait DeviceOptimizer {
    /// One AdamW update of the flat parameter buffer; see [`DeviceAdamW8bit::step`].
    fn step(&mut self, params: View<'_, f32>, grads: View<'_, f32>, lr: f32) -> Result<StepStats>;
    /// Number of steps taken.
    fn step_count(&self) -> u64;
    /// Total bytes of state (the host optimizer's [`crate::AdamW8bit::state_bytes`]).
    fn state_bytes(&self) -> u64;
    /// Bytes of device memory this optimizer holds.
    fn device_bytes(&self) -> u64;
    /// Where the state lives.
    fn placement(&self) -> StatePlacement;
    /// Writes the state to a safetensors file, atomically (the host format).
    fn save_state(&self, path: &Path) -> Result<()>;
}

macro_rules! device_optimizer_type {
    ($(#[$doc:meta])* $name:ident, $host:ident, $kind:expr) => {
        $(#[$doc])*
        pub struct $name {
            core: DeviceCore,
        }

        impl $name {
            /// A fresh optimizer (zero state, step 0) on `dev` for `params`, in the
            /// order of the flat buffers: parameter `i` occupies the `params[i].numel`
            /// elements after those of parameters `0..i`.
            pub fn new(config: AdamWConfig, params: &[ParamSpec], dev: &Dev) -> Result<Self> {
                Self::from_host(&$host::new(config, params)?, dev)
            }

            /// The host optimizer's state (and step count, config) moved to `dev`,
            /// placed per its [`crate::PagingPolicy`].
            pub fn from_host(opt: &$host, dev: &Dev) -> Result<Self> {
                Self::from_host_chunked(opt, dev, PAGED_CHUNK_BYTES)
            }

            /// Like [`Self::from_host`], with paged chunks of at most `chunk_bytes`
            /// (ignored for resident state). Small values exercise the pipeline in tests.
            pub fn from_host_chunked(opt: &$host, dev: &Dev, chunk_bytes: usize) -> Result<Self> {
                Ok($name {
                    core: DeviceCore::from_core(&opt.core, dev, chunk_bytes)?,
                })
            }

            /// The state as a host optimizer (waits for queued work): equal to the host
            /// optimizer that took the same steps.
            pub fn to_host(&self) -> Result<$host> {
                Ok($host::from_core(self.core.to_core()?))
            }

            /// One AdamW update of every parameter: `params` and `grads` are the flat
            /// buffers (length the sum of the parameters' sizes, not overlapping),
            /// `params` is updated in place. Bit-identical to the host optimizer's
            /// `step` on the same slices (see the module docs for the statistics).
            /// Returns after the update has completed (it reads the statistics back).
            /// Length and learning-rate errors leave everything unchanged; a device
            /// error in the middle of the update leaves the state undefined.
            pub fn step(
                &mut self,
                params: View<'_, f32>,
                grads: View<'_, f32>,
                lr: f32,
            ) -> Result<StepStats> {
                self.core.step(params, grads, lr)
            }

            /// Number of steps taken. Pass it as `step` to
            /// [`crate::LrSchedule::lr_at`] for the next update.
            pub fn step_count(&self) -> u64 {
                self.core.step
            }

            pub fn config(&self) -> &AdamWConfig {
                &self.core.config
            }

            /// The parameters, in flat-buffer order.
            pub fn param_specs(&self) -> Vec<ParamSpec> {
                self.core
                    .slots
                    .iter()
                    .map(|s| ParamSpec::new(s.name.clone(), s.numel))
                    .collect()
            }

            /// Total elements of the flat buffers.
            pub fn numel(&self) -> usize {
                self.core.numel
            }

            /// Total bytes of optimizer state (as the host optimizer counts them).
            pub fn state_bytes(&self) -> u64 {
                self.core.state_bytes()
            }

            /// Bytes of device memory held: the arena (resident) or the two staging
            /// buffers (paged), plus the tensor table and per-block statistics.
            pub fn device_bytes(&self) -> u64 {
                self.core.device_bytes()
            }

            /// Bytes of the arena (host memory when paged).
            pub fn arena_bytes(&self) -> usize {
                self.core.arena_len
            }

            /// The largest paged chunk in bytes (`usize::MAX` when resident).
            pub fn chunk_cap(&self) -> usize {
                self.core.chunk_cap
            }

            /// Number of paged chunks (one update launch each; 1 when resident).
            pub fn chunks(&self) -> usize {
                self.core.chunks.len()
            }

            pub fn placement(&self) -> StatePlacement {
                self.core.placement
            }

            /// The device it runs on.
            pub fn dev(&self) -> &Dev {
                &self.core.dev
            }

            /// Writes the state in the host optimizer's checkpoint format (see
            /// [`crate::checkpoint`]), atomically: the file the CPU path writes.
            pub fn save_state(&self, path: &Path) -> Result<()> {
                self.to_host()?.save_state(path)
            }

            /// Restores from a state file (either path's), checked against the
            /// parameters trained now (see the host `load_state_for`).
            pub fn load_state_for(path: &Path, params: &[ParamSpec], dev: &Dev) -> Result<Self> {
                Self::from_host(&$host::load_state_for(path, params)?, dev)
            }
        }

        impl DeviceOptimizer for $name {
            fn step(
                &mut self,
                params: View<'_, f32>,
                grads: View<'_, f32>,
                lr: f32,
            ) -> Result<StepStats> {
                $name::step(self, params, grads, lr)
            }
            fn step_count(&self) -> u64 {
                $name::step_count(self)
            }
            fn state_bytes(&self) -> u64 {
                $name::state_bytes(self)
            }
            fn device_bytes(&self) -> u64 {
                $name::device_bytes(self)
            }
            fn placement(&self) -> StatePlacement {
                $name::placement(self)
            }
            fn save_state(&self, path: &Path) -> Result<()> {
                $name::save_state(self, path)
            }
        }
    };
}

device_optimizer_type!(
    /// [`crate::AdamW8bit`] on a device: 8-bit blockwise state for parameters of at
    /// least `min_8bit_size` elements, f32 state for the others, updated by the fused
    /// kernel `kernels/adamw8bit.cu` (CPU: the host optimizer's code).
    DeviceAdamW8bit,
    AdamW8bit,
    OptimizerKind::AdamW8bit
);

device_optimizer_type!(
    /// [`crate::AdamW32`] on a device: f32 state for every parameter, the same kernel.
    DeviceAdamW32,
    AdamW32,
    OptimizerKind::AdamW32
);

/// [`crate::clip_grad_norm`] over a flat gradient buffer on `dev`: the global L2
/// norm (f64 sum of squares), returned as measured before clipping; gradients are
/// scaled by `max_norm / (norm + 1e-6)` when that is below 1. `max_norm <= 0` or NaN
/// only measures; a non-finite norm leaves the gradients untouched (skip the step).
/// On the CPU this equals `clip_grad_norm` on the same values bit for bit; on the GPU
/// see the module docs.
pub fn clip_grad_norm(dev: &Dev, grads: View<'_, f32>, max_norm: f32) -> Result<f32> {
    let sum_sq = qtrain_device::rows::sum_squares(dev, grads)?;
    let norm = sum_sq.sqrt();
    if max_norm.is_nan() || max_norm <= 0.0 || !norm.is_finite() {
        return Ok(norm as f32);
    }
    let coef = f64::from(max_norm) / (norm + 1e-6);
    if coef < 1.0 {
        qtrain_device::rows::scale_in_place(dev, grads, coef as f32)?;
    }
    Ok(norm as f32)
}

#[cfg(test)]
mod tests;

/// The block size the arena and the kernel assume.
const _: () = assert!(BLOCKSIZE == 256);
