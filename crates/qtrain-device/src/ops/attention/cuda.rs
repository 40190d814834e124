//! CUDA launchers of the flash-attention kernels (`attention.cu`): kernel
//! choice (head dim, element type), the checks the kernels rely on (compute capability
//! 8.0+, 16-byte aligned rows), grids, dynamic shared memory, and the arguments in
//! the exact order of the kernels' parameters.
//!
//! Forward: `attn_fwd` over (heads, query tiles, batch). Backward: `attn_bwd_prep`
//! (`D = rowsum(dO ∘ O)` into the scratch), then `attn_bwd_dkdv` over (kv heads, key
//! tiles, batch) and `attn_bwd_dq` over (heads, query tiles, batch): every gradient
//! element has one writer, so the result is bit-reproducible (no atomics).
//!
//! Two PTX modules: `attention.ptx` (mma.sync, 8.0+) and, in a build for compute
//! capability 9.0, `attention_sm90a.ptx` with the wgmma variants ([`FwdKernel`],
//! [`SplitKernels`]), loaded only on a 9.0 GPU (sm_90a code runs on no other).

use super::{AttnBackward, AttnShape, FwdKernel, SplitKernels};
use crate::cuda::{launch, CudaDev, PushKernelArg};
use crate::device::{Float, FloatKind, Mat, View};
use crate::error::{DeviceError, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, LaunchConfig};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
/// The sm_90a build of the same file (`build_ptx.rs`): the wgmma forward. Empty unless
/// the crate was built for compute capability 9.0.
const PTX_SM90A: &str = include_str!(concat!(env!("OUT_DIR"), "/attention_sm90a.ptx"));

/// Rows per tile on both sides (`kBQ`, `kBK` in the kernel file).
const TILE: usize = 64;
/// Threads per CTA (4 warps).
const THREADS: u32 = 128;
/// Head dimensions with a kernel instantiation.
const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// What the launcher needs to know of each forward kernel.
impl FwdKernel {
    /// The kernel name's op part (`attn_{op}_d{D}_{type}`).
    fn op(self) -> &'static str {
        match self {
            Self::Mma4 => "fwd",
            Self::Mma8 => "fwd8",
            Self::Wgmma4 => "fwdwg",
            Self::Wgmma8 => "fwdwg8",
            Self::Wgmma4P => "fwdwgp4",
            Self::Wgmma8P => "fwdwgp",
        }
    }

    fn warps(self) -> usize {
        match self {
            Self::Mma4 | Self::Wgmma4 | Self::Wgmma4P => 4,
            Self::Mma8 | Self::Wgmma8 | Self::Wgmma8P => 8,
        }
    }

    /// K/V tiles in flight (`FwdSmem`'s `ST`): the pipelined kernels keep a third.
    fn pipelined(self) -> bool {
        matches!(self, Self::Wgmma4P | Self::Wgmma8P)
    }

    /// Why this kernel cannot run here, if it cannot: head dim 128 (`Mma8`, wgmma), and
    /// for wgmma a 9.0 GPU and a binary built for it.
    pub(super) fn unsupported(self, cc: (i32, i32), head_dim: usize) -> Option<String> {
        match self {
            Self::Mma4 => None,
            Self::Mma8 if head_dim != 128 => Some(format!(
                "the 8-warp forward is built for head dim 128, not {head_dim}"
            )),
            Self::Mma8 => None,
            Self::Wgmma4P | Self::Wgmma8P if head_dim != 128 => Some(format!(
                "the pipelined wgmma forward is built for head dim 128, not {head_dim}"
            )),
            _ => wgmma_unsupported(cc, head_dim, Self::WGMMA_HEAD_DIMS, "forward"),
        }
    }
}

/// Why a wgmma kernel (the `what` of the attention) cannot run here, if it cannot: it
/// needs a 9.0 GPU, the sm_90a build (a binary built with CUDA_COMPUTE_CAP=90) and one
/// of `head_dims`.
fn wgmma_unsupported(
    cc: (i32, i32),
    head_dim: usize,
    head_dims: &[usize],
    what: &str,
) -> Option<String> {
    if cc != (9, 0) {
        Some(format!(
            "the wgmma attention kernels need compute capability 9.0 (H100/H200); this GPU \
             is {}.{}",
            cc.0, cc.1
        ))
    } else if PTX_SM90A.is_empty() {
        Some(
            "the wgmma attention kernels are in the sm_90a build, and this binary was built \
             with CUDA_COMPUTE_CAP other than 90"
                .into(),
        )
    } else if !head_dims.contains(&head_dim) {
        Some(format!(
            "the wgmma attention {what} runs at head dims {head_dims:?} (docs/perf.md v10), \
             not {head_dim}"
        ))
    } else {
        None
    }
}

/// The forward this GPU runs at `head_dim`: `QTRAIN_ATTN_FWD`'s where set, else
/// [`FwdKernel::default_for`].
pub(super) fn fwd_kernel_for(c: &CudaDev, head_dim: usize) -> Result<FwdKernel> {
    let cc = c.compute_capability()?;
    Ok(FwdKernel::from_env()?
        .unwrap_or_else(|| FwdKernel::default_for(cc, head_dim, !PTX_SM90A.is_empty())))
}

/// The split backward's kernels this GPU runs at `head_dim`: `QTRAIN_ATTN_SPLIT`'s where
/// set, else [`SplitKernels::default_for`].
pub(super) fn split_kernels_for(c: &CudaDev, head_dim: usize) -> Result<SplitKernels> {
    let cc = c.compute_capability()?;
    Ok(SplitKernels::from_env()?
        .unwrap_or_else(|| SplitKernels::default_for(cc, head_dim, !PTX_SM90A.is_empty())))
}

/// Dynamic shared memory of each kernel, as laid out by `FwdSmem` (the Q tile, then two
/// or, pipelined, three stages of K, V and segment-id tiles; the pipelined one-warpgroup
/// kernel keeps Q in the third stage's K slot), `DkvSmem`, `DqSmem` (the wgmma kernels:
/// [`WGMMA_SMEM_PAD`] more).
fn fwd_smem(d: usize, warps: usize, pipelined: bool, wgmma: bool) -> u32 {
    let pad = if wgmma { WGMMA_SMEM_PAD } else { 0 };
    let stages = if pipelined { 3 } else { 2 };
    // `FwdSmem::kQInStage`: three stages and a Q tile the size of a K tile (64 rows).
    let (q, tile) = (32 * warps * d, 128 * d);
    let q_own = if stages == 3 && q == tile { 0 } else { q };
    (q_own + stages * (2 * tile + 256)) as u32 + pad
}
fn dkdv_smem(d: usize) -> u32 {
    (768 * d + 1536) as u32
}
fn dq_smem(d: usize) -> u32 {
    (768 * d + 512) as u32
}
/// What every wgmma kernel adds to its layout's shared memory (`kWgPad` in the kernel
/// file): the 1 KiB that lets it start its tiles on a 1024-byte boundary.
const WGMMA_SMEM_PAD: u32 = 1024;

impl SplitKernels {
    /// Why these kernels cannot run here, if they cannot (see [`FwdKernel::unsupported`]).
    pub(super) fn unsupported(self, cc: (i32, i32), head_dim: usize) -> Option<String> {
        match self {
            Self::Mma => None,
            Self::Wgmma => wgmma_unsupported(cc, head_dim, Self::WGMMA_HEAD_DIMS, "backward"),
        }
    }
}

/// `FusedSmem`: `DkvSmem` plus one query step's dS^T (64 keys x 32 or 64 queries).
fn fused_smem(d: usize) -> u32 {
    let step = if d == 128 { 32 } else { 64 };
    dkdv_smem(d) + (TILE * step * 2) as u32
}

/// `FusedWgSmem` (head dim 128): K, V, two stages of Q and dO (eight 64-row tiles), the
/// 128 keys' dS^T, two stages of the f32 dQ share, lse / D / segment ids, the 1 KiB pad.
fn fusedwg_smem(d: usize) -> u32 {
    (1536 * d + 18944) as u32
}

/// Whether the `fused-atomic` backward runs `attn_bwd_fusedwg` here (a 9.0 GPU, the
/// sm_90a build, head dim 128) rather than the mma.sync `attn_bwd_fusedu`.
pub(super) fn fused_wgmma_here(c: &CudaDev, head_dim: usize) -> Result<bool> {
    let cc = c.compute_capability()?;
    Ok(wgmma_unsupported(cc, head_dim, &[128], "fused backward").is_none())
}

/// Why the stored-dS backward (`attn_bwd_dkdvds` + `attn_bwd_dqds`: wgmma, head dim 128)
/// cannot run here, if it cannot.
pub(super) fn stored_ds_unsupported(c: &CudaDev, head_dim: usize) -> Result<Option<String>> {
    let cc = c.compute_capability()?;
    Ok(wgmma_unsupported(
        cc,
        head_dim,
        &[128],
        "stored-dS backward",
    ))
}

/// `DqDsSmem`: three stages of a K tile and a dS^T blob (64 x 64 bf16), the 1 KiB pad.
fn dqds_smem(d: usize) -> u32 {
    (3 * (TILE * d * 2 + TILE * TILE * 2)) as u32 + WGMMA_SMEM_PAD
}

/// `attn_{op}_d{d}_{bf16|f16}`, interned (kernel names must be `'static`).
fn kernel_name(op: &str, d: usize, kind: FloatKind) -> &'static str {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static NAMES: Mutex<Option<HashMap<String, &'static str>>> = Mutex::new(None);
    let key = format!("attn_{op}_d{d}_{}", kind.suffix());
    let mut g = NAMES.lock().unwrap();
    let map = g.get_or_insert_with(HashMap::new);
    if let Some(&n) = map.get(&key) {
        return n;
    }
    let leaked: &'static str = Box::leak(key.clone().into_boxed_str());
    map.insert(key, leaked);
    leaked
}

/// Loads `attn_{op}` for this shape and type, raising its shared-memory limit when needed.
fn kernel<T: Float>(c: &CudaDev, op: &str, d: usize, smem: u32) -> Result<CudaFunction> {
    let f = c.func("qtrain_attention", PTX, kernel_name(op, d, T::KIND))?;
    smem_limit(c, f, smem)
}

/// The same from the sm_90a module (the wgmma kernels).
fn kernel_sm90a<T: Float>(c: &CudaDev, op: &str, d: usize, smem: u32) -> Result<CudaFunction> {
    let f = c.func(
        "qtrain_attention_sm90a",
        PTX_SM90A,
        kernel_name(op, d, T::KIND),
    )?;
    smem_limit(c, f, smem)
}

fn smem_limit(c: &CudaDev, f: CudaFunction, smem: u32) -> Result<CudaFunction> {
    if smem > 48 * 1024 {
        c.set_max_dynamic_smem(&f, smem)?;
    }
    Ok(f)
}

fn unsupported(op: &'static str, msg: String) -> DeviceError {
    DeviceError::Unsupported { op, msg }
}

/// What every attention launch needs: a GPU with bf16 mma.sync and cp.async, a 16-bit
/// element type, an instantiated head dim, and sizes the grid can hold.
fn check_common<T: Float>(op: &'static str, c: &CudaDev, s: &AttnShape) -> Result<()> {
    let (major, minor) = c.compute_capability()?;
    if major < 8 {
        return Err(unsupported(
            op,
            format!(
                "the flash-attention kernels need compute capability 8.0 or newer \
                 (mma.sync bf16/f16 m16n8k16, cp.async); this GPU is {major}.{minor}"
            ),
        ));
    }
    if !matches!(T::KIND, FloatKind::Bf16 | FloatKind::F16) {
        return Err(unsupported(
            op,
            format!("element type {} (the kernels take bf16 or f16)", T::NAME),
        ));
    }
    if !HEAD_DIMS.contains(&s.head_dim) {
        return Err(unsupported(
            op,
            format!("head dim {} (kernels exist for {HEAD_DIMS:?})", s.head_dim),
        ));
    }
    let tiles = s.seq.div_ceil(TILE); // the most query/key tiles of any kernel
    let fits = s.seq <= i32::MAX as usize
        && s.heads <= i32::MAX as usize
        && tiles <= 65535
        && s.batch <= 65535;
    if !fits {
        return Err(unsupported(
            op,
            format!(
                "batch {} x seq {} x {} heads is beyond the launch grid (batch and \
                 seq/64 at most 65535)",
                s.batch, s.seq, s.heads
            ),
        ));
    }
    Ok(())
}

/// The kernels move rows 16 bytes at a time with cp.async and vector stores.
fn check_rows<T: Float>(op: &'static str, mats: &[(&str, Mat<'_, T>)]) -> Result<()> {
    for (name, m) in mats {
        if m.ld % 8 != 0 {
            return Err(crate::error::shape_err(
                op,
                format!(
                    "{name} has leading dimension {} elements; the CUDA kernel needs a \
                     multiple of 8 (16-byte rows)",
                    m.ld
                ),
            ));
        }
        if m.dptr() % 16 != 0 {
            return Err(crate::error::shape_err(
                op,
                format!("{name} does not start on a 16-byte boundary"),
            ));
        }
    }
    Ok(())
}

/// The kernels' `window` argument: 0 when there is none or it covers the whole sequence.
fn window_arg(s: &AttnShape) -> i32 {
    match s.window {
        Some(w) if w < s.seq => w as i32,
        _ => 0,
    }
}

fn cfg(grid: (usize, usize, usize), smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// The forward (`super::attention_fwd` on a GPU) with the given kernel.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_fwd_kernel<T: Float>(
    c: &CudaDev,
    s: &AttnShape,
    q: Mat<'_, T>,
    k: Mat<'_, T>,
    v: Mat<'_, T>,
    segments: Option<View<'_, u32>>,
    o: Mat<'_, T>,
    lse: View<'_, f32>,
    kern: FwdKernel,
) -> Result<()> {
    const OP: &str = "attention_fwd";
    if s.tokens() == 0 || s.heads == 0 {
        return Ok(());
    }
    check_common::<T>(OP, c, s)?;
    check_rows(OP, &[("q", q), ("k", k), ("v", v), ("o", o)])?;
    let d = s.head_dim;
    if let Some(why) = kern.unsupported(c.compute_capability()?, d) {
        return Err(unsupported(OP, why));
    }
    let warps = kern.warps();
    let rows = 16 * warps;
    let smem = fwd_smem(d, warps, kern.pipelined(), kern.is_wgmma());
    let f = if kern.is_wgmma() {
        kernel_sm90a::<T>(c, kern.op(), d, smem)?
    } else {
        kernel::<T>(c, kern.op(), d, smem)?
    };
    let (qp, ldq, kp, ldk, vp, ldv) = (
        q.dptr(),
        q.ld as u64,
        k.dptr(),
        k.ld as u64,
        v.dptr(),
        v.ld as u64,
    );
    let (sp, op, ldo, lp) = (
        segments.map_or(0u64, |g| g.dptr()),
        o.dptr(),
        o.ld as u64,
        lse.dptr(),
    );
    let (seq, heads, kvh, win, scale) = (
        s.seq as i32,
        s.heads as i32,
        s.kv_heads as i32,
        window_arg(s),
        s.scale,
    );
    let mut b = c.builder(&f);
    b.arg(&qp)
        .arg(&ldq)
        .arg(&kp)
        .arg(&ldk)
        .arg(&vp)
        .arg(&ldv)
        .arg(&sp)
        .arg(&op)
        .arg(&ldo)
        .arg(&lp)
        .arg(&seq)
        .arg(&heads)
        .arg(&kvh)
        .arg(&win)
        .arg(&scale);
    let grid = (s.heads, s.seq.div_ceil(rows), s.batch);
    let mut config = cfg(grid, smem);
    config.block_dim.0 = 32 * warps as u32;
    // SAFETY: arguments match `attn_fwd*_*` (every variant has one signature) in number,
    // order and type; the
    // wrapper checked every matrix's shape against `s`, lse's and the segments' lengths,
    // and overlaps; the kernel reads and writes only rows < seq of each batch row and the
    // columns of its head; the block has the 32 * warps threads it was compiled for.
    unsafe { launch(OP, b, config) }
}

/// The backward (`super::attention_bwd` on a GPU) with the given split-backward kernels
/// (ignored by the fused modes).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_bwd_kernels<T: Float>(
    c: &CudaDev,
    s: &AttnShape,
    mode: AttnBackward,
    split: SplitKernels,
    q: Mat<'_, T>,
    k: Mat<'_, T>,
    v: Mat<'_, T>,
    o: Mat<'_, T>,
    d_o: Mat<'_, T>,
    lse: View<'_, f32>,
    segments: Option<View<'_, u32>>,
    dq: Mat<'_, T>,
    dk: Mat<'_, T>,
    dv: Mat<'_, T>,
    scratch: View<'_, f32>,
) -> Result<()> {
    const OP: &str = "attention_bwd";
    if s.tokens() == 0 || s.heads == 0 {
        return Ok(());
    }
    check_common::<T>(OP, c, s)?;
    // Also checked by `attention_bwd`; the self-test calls in here directly, and the
    // stored dS would run past a short scratch.
    if scratch.len() < s.bwd_scratch_len(mode) {
        return Err(unsupported(
            OP,
            format!(
                "scratch has {} f32 entries; the {mode} backward needs {}",
                scratch.len(),
                s.bwd_scratch_len(mode)
            ),
        ));
    }
    check_rows(
        OP,
        &[
            ("q", q),
            ("k", k),
            ("v", v),
            ("o", o),
            ("dO", d_o),
            ("dq", dq),
            ("dk", dk),
            ("dv", dv),
        ],
    )?;
    let d = s.head_dim;
    let (seq, heads, kvh, win, scale) = (
        s.seq as i32,
        s.heads as i32,
        s.kv_heads as i32,
        window_arg(s),
        s.scale,
    );
    let (qp, ldq, kp, ldk, vp, ldv) = (
        q.dptr(),
        q.ld as u64,
        k.dptr(),
        k.ld as u64,
        v.dptr(),
        v.ld as u64,
    );
    let (op, ldo, dop, lddo) = (o.dptr(), o.ld as u64, d_o.dptr(), d_o.ld as u64);
    let (lp, dsp, sp) = (
        lse.dptr(),
        scratch.dptr(),
        segments.map_or(0u64, |g| g.dptr()),
    );

    // D = rowsum(dO ∘ O), one (token, head) row per D/8 threads.
    {
        let f = kernel::<T>(c, "bwd_prep", d, 0)?;
        let rows = (s.tokens() * s.heads) as u64;
        let per_block = (THREADS as usize) / (d / 8);
        let mut b = c.builder(&f);
        b.arg(&op)
            .arg(&ldo)
            .arg(&dop)
            .arg(&lddo)
            .arg(&dsp)
            .arg(&seq)
            .arg(&heads)
            .arg(&rows);
        let grid = ((rows as usize).div_ceil(per_block), 1, 1);
        // SAFETY: arguments match `attn_bwd_prep_*`; rows >= n * heads are skipped in the
        // kernel; scratch holds batch * heads * seq floats (checked by the wrapper).
        unsafe { launch(OP, b, cfg(grid, 0))? };
    }
    // The inputs in every backward kernel's order, then (dK/dV kernels) the outputs.
    let ins = [qp, ldq, kp, ldk, vp, ldv, dop, lddo, lp, dsp, sp];
    let dkdv_out = [dk.dptr(), dk.ld as u64, dv.dptr(), dv.ld as u64];
    if mode == AttnBackward::StoredDs {
        if let Some(why) = stored_ds_unsupported(c, d)? {
            return Err(unsupported(OP, why));
        }
        let ds = dsp + 4 * s.bwd_scratch(mode).acc as u64;
        let (dqp, lddq) = (dq.dptr(), dq.ld as u64);
        let chunk = s.ds_chunk_kv_heads();
        let group = s.heads / s.kv_heads;
        let dkdv = kernel_sm90a::<T>(c, "bwd_dkdvds", d, dkdv_smem(d) + WGMMA_SMEM_PAD)?;
        let dqds = kernel_sm90a::<T>(c, "bwd_dqds", d, dqds_smem(d))?;
        for kv0 in (0..s.kv_heads).step_by(chunk) {
            let (kv0, h0) = (kv0 as i32, (kv0 * group) as i32);
            let mut b = c.builder(&dkdv);
            for x in ins.iter().chain(&dkdv_out) {
                b.arg(x);
            }
            b.arg(&seq)
                .arg(&heads)
                .arg(&kvh)
                .arg(&win)
                .arg(&scale)
                .arg(&ds)
                .arg(&kv0);
            let grid = (chunk, s.seq.div_ceil(TILE), s.batch);
            // SAFETY: arguments match `attn_bwd_dkdvds_*`; shapes and overlaps checked by the
            // wrapper; each CTA writes only its key tile's rows < seq of dk and dv of kv head
            // kv0 + blockIdx.x < kv_heads, and its pairs' blobs of the chunk's heads, which
            // `bwd_scratch` sized (`ds_store_bytes`) after the D terms.
            unsafe { launch(OP, b, cfg(grid, dkdv_smem(d) + WGMMA_SMEM_PAD))? };
            let mut b = c.builder(&dqds);
            b.arg(&kp)
                .arg(&ldk)
                .arg(&ds)
                .arg(&sp)
                .arg(&dqp)
                .arg(&lddq)
                .arg(&seq)
                .arg(&heads)
                .arg(&kvh)
                .arg(&win)
                .arg(&scale)
                .arg(&h0);
            let grid = (chunk * group, s.seq.div_ceil(TILE), s.batch);
            // SAFETY: arguments match `attn_bwd_dqds_*`; each CTA reads the blobs the launch
            // above wrote for its (head, query tile) (the same key-tile range) and writes
            // only its query tile's rows < seq of dq for head h0 + blockIdx.x.
            unsafe { launch(OP, b, cfg(grid, dqds_smem(d)))? };
        }
        return Ok(());
    }
    if mode != AttnBackward::Split {
        return fused_bwd::<T>(c, s, mode, ins, dk, dv, dq, scratch);
    }
    if let Some(why) = split.unsupported(c.compute_capability()?, d) {
        return Err(unsupported(OP, why));
    }
    let wg = split == SplitKernels::Wgmma;
    let pad = if wg { WGMMA_SMEM_PAD } else { 0 };
    let load = |op: &str, wg_op: &str, smem: u32| {
        if wg {
            kernel_sm90a::<T>(c, wg_op, d, smem)
        } else {
            kernel::<T>(c, op, d, smem)
        }
    };
    // dK, dV per (kv head, key tile, batch row).
    {
        let smem = dkdv_smem(d) + pad;
        let f = load("bwd_dkdv", "bwd_dkdvwg", smem)?;
        let mut b = c.builder(&f);
        for x in ins.iter().chain(&dkdv_out) {
            b.arg(x);
        }
        b.arg(&seq).arg(&heads).arg(&kvh).arg(&win).arg(&scale);
        let grid = (s.kv_heads, s.seq.div_ceil(TILE), s.batch);
        // SAFETY: arguments match `attn_bwd_dkdv*_*`; shapes and overlaps checked by the
        // wrapper; each CTA writes only its key tile's rows < seq of dk and dv.
        unsafe { launch(OP, b, cfg(grid, smem))? };
    }
    // dQ per (head, query tile, batch row).
    {
        let smem = dq_smem(d) + pad;
        let f = load("bwd_dq", "bwd_dqwg", smem)?;
        let (dqp, lddq) = (dq.dptr(), dq.ld as u64);
        let mut b = c.builder(&f);
        b.arg(&qp)
            .arg(&ldq)
            .arg(&kp)
            .arg(&ldk)
            .arg(&vp)
            .arg(&ldv)
            .arg(&dop)
            .arg(&lddo)
            .arg(&lp)
            .arg(&dsp)
            .arg(&sp)
            .arg(&dqp)
            .arg(&lddq)
            .arg(&seq)
            .arg(&heads)
            .arg(&kvh)
            .arg(&win)
            .arg(&scale);
        let grid = (s.heads, s.seq.div_ceil(TILE), s.batch);
        // SAFETY: arguments match `attn_bwd_dq*_*`; each CTA writes only its query tile's
        // rows < seq of dq.
        unsafe { launch(OP, b, cfg(grid, smem)) }
    }
}

/// The fused backward (after `attn_bwd_prep`): `attn_bwd_fused` / `attn_bwd_fusedu` over
/// (heads, batch rows, key tiles), the accumulators and turn counters in `scratch` after
/// the `D` terms (`AttnShape::bwd_scratch`); the unordered one adds into zeros and `attn_bwd_dq_store`
/// converts. `ins` = q, ldq, k, ldk, v, ldv, dO, lddo, lse, D terms, segments (device
/// pointers and leading dimensions, as the split kernels take them).
#[allow(clippy::too_many_arguments)]
fn fused_bwd<T: Float>(
    c: &CudaDev,
    s: &AttnShape,
    mode: AttnBackward,
    ins: [u64; 11],
    dk: Mat<'_, T>,
    dv: Mat<'_, T>,
    dq: Mat<'_, T>,
    scratch: View<'_, f32>,
) -> Result<()> {
    const OP: &str = "attention_bwd";
    let d = s.head_dim;
    let layout = s.bwd_scratch(mode);
    let base = scratch.dptr();
    let at = |off: usize| base + 4 * off as u64;
    let (turns, kv_turns) = (at(layout.turns), at(layout.kv_turns));
    let (acc, kv_acc) = (at(layout.acc), at(layout.kv_acc));
    let ordered = mode == AttnBackward::Fused;
    if !ordered && fused_wgmma_here(c, d)? {
        return fused_wgmma_bwd::<T>(c, s, ins, dk, dv, dq, acc);
    }
    // Both variants sum the group's dK/dV in head order (turns); only the ordered one
    // hands the dQ sums on (its first key tile stores, so the accumulator needs no zeroing).
    c.memset0(turns, 4 * layout.turns_len)?;
    if !ordered {
        c.memset0(acc, 4 * s.tokens() * s.heads * d)?;
    }
    let (seq, heads, kvh, win, scale) = (
        s.seq as i32,
        s.heads as i32,
        s.kv_heads as i32,
        window_arg(s),
        s.scale,
    );
    let (dkp, lddk, dvp, lddv) = (dk.dptr(), dk.ld as u64, dv.dptr(), dv.ld as u64);
    let (dqp, lddq) = (dq.dptr(), dq.ld as u64);
    {
        let smem = fused_smem(d);
        let f = kernel::<T>(c, if ordered { "bwd_fused" } else { "bwd_fusedu" }, d, smem)?;
        let mut b = c.builder(&f);
        for x in &ins {
            b.arg(x);
        }
        b.arg(&dkp)
            .arg(&lddk)
            .arg(&dvp)
            .arg(&lddv)
            .arg(&acc)
            .arg(&turns)
            .arg(&dqp)
            .arg(&lddq)
            .arg(&kv_acc)
            .arg(&kv_turns)
            .arg(&seq)
            .arg(&heads)
            .arg(&kvh)
            .arg(&win)
            .arg(&scale);
        // Heads fastest, key tiles slowest: a CTA waits only for a lower key tile of its
        // column or the previous head of its group, which launch earlier.
        let grid = (s.heads, s.batch, s.seq.div_ceil(TILE));
        // SAFETY: arguments match `attn_bwd_fused_*` / `attn_bwd_fusedu_*` (the eleven
        // inputs in the split kernels' order, then dk, dv, the dQ accumulator and its
        // counters, dq, the dK/dV accumulator and its counters); the wrapper checked
        // shapes, overlaps and that scratch holds `bwd_scratch_len(mode)` floats (laid out
        // by `bwd_scratch`: counters zeroed above, accumulators zeroed or fully stored
        // before being read); each CTA writes only its key tile's rows < seq of dk, dv
        // (the group's last head) and dq rows < seq of its head.
        unsafe { launch(OP, b, cfg(grid, smem))? };
    }
    if !ordered {
        let f = kernel::<T>(c, "bwd_dq_store", d, 0)?;
        let rows = (s.tokens() * s.heads) as u64;
        let per_block = (THREADS as usize) / (d / 8);
        let mut b = c.builder(&f);
        b.arg(&acc)
            .arg(&dqp)
            .arg(&lddq)
            .arg(&heads)
            .arg(&rows)
            .arg(&scale);
        let grid = ((rows as usize).div_ceil(per_block), 1, 1);
        // SAFETY: arguments match `attn_bwd_dq_store_*`; rows >= tokens x heads are
        // skipped; the accumulator holds tokens x heads x d floats.
        unsafe { launch(OP, b, cfg(grid, 0))? };
    }
    Ok(())
}

/// `fused-atomic` on Hopper: `attn_bwd_fusedwg` over (kv heads, 128-key tiles, batch rows),
/// two warpgroups per CTA, adding each step's dQ share into the zeroed accumulator `acc`
/// (`[batch, heads, query tiles, 64 · d]` f32 in the kernel's register order) by bulk
/// reduction; then `attn_bwd_dq_storewg` scales and converts it into dq.
#[allow(clippy::too_many_arguments)]
fn fused_wgmma_bwd<T: Float>(
    c: &CudaDev,
    s: &AttnShape,
    ins: [u64; 11],
    dk: Mat<'_, T>,
    dv: Mat<'_, T>,
    dq: Mat<'_, T>,
    acc: u64,
) -> Result<()> {
    const OP: &str = "attention_bwd";
    let d = s.head_dim;
    let tiles = (s.batch * s.heads * s.seq.div_ceil(TILE)) as u64;
    c.memset0(acc, 4 * tiles as usize * TILE * d)?;
    let (seq, heads, kvh, win, scale) = (
        s.seq as i32,
        s.heads as i32,
        s.kv_heads as i32,
        window_arg(s),
        s.scale,
    );
    let (dkp, lddk, dvp, lddv) = (dk.dptr(), dk.ld as u64, dv.dptr(), dv.ld as u64);
    let (dqp, lddq) = (dq.dptr(), dq.ld as u64);
    {
        let smem = fusedwg_smem(d);
        let f = kernel_sm90a::<T>(c, "bwd_fusedwg", d, smem)?;
        let mut b = c.builder(&f);
        for x in &ins {
            b.arg(x);
        }
        b.arg(&dkp)
            .arg(&lddk)
            .arg(&dvp)
            .arg(&lddv)
            .arg(&acc)
            .arg(&seq)
            .arg(&heads)
            .arg(&kvh)
            .arg(&win)
            .arg(&scale);
        let mut config = cfg((s.kv_heads, s.seq.div_ceil(2 * TILE), s.batch), smem);
        config.block_dim.0 = 2 * THREADS;
        // SAFETY: arguments match `attn_bwd_fusedwg_*` (the eleven inputs in the split
        // kernels' order, dk, dv, the accumulator, the shape); the wrapper checked shapes,
        // overlaps and that scratch holds `bwd_scratch_len` floats, whose accumulator
        // part (`bwd_scratch`) holds every 64-row tile of every (batch row, head) and
        // was zeroed above; each CTA writes only its 128 keys' rows < seq of dk and dv
        // and adds into the accumulator tiles of its group's heads; the block has the
        // 256 threads the kernel was compiled for.
        unsafe { launch(OP, b, config)? };
    }
    let f = kernel_sm90a::<T>(c, "bwd_dq_storewg", d, 0)?;
    let mut b = c.builder(&f);
    b.arg(&acc)
        .arg(&dqp)
        .arg(&lddq)
        .arg(&seq)
        .arg(&heads)
        .arg(&tiles)
        .arg(&scale);
    let float4s = tiles as usize * TILE * d / 4;
    let grid = (float4s.div_ceil(THREADS as usize), 1, 1);
    // SAFETY: arguments match `attn_bwd_dq_storewg_*`; threads past `tiles` tiles return;
    // each writes the two dq elements pairs of its float4 at rows < seq of its head.
    unsafe { launch(OP, b, cfg(grid, 0)) }
}
