//! Causal grouped-query attention, forward and backward, with sliding window and
//! packed-document (segment) masking: the kernels (`attention.cu`: flash-style
//! tiling, memory linear in the sequence length; `emu/` runs them on the host),
//! their launchers (`cuda.rs`), the CPU references ([`attention_fwd_ref`],
//! [`attention_bwd_ref`]) and the self-test (`selftest.rs`).
//!
//! Layout: `n = batch · seq` tokens, one row each. `q: [n, heads · d]`,
//! `k, v: [n, kv_heads · d]` (column blocks of the fused q/k/v buffer are fine),
//! `o: [n, heads · d]`. Query head `h` reads KV head `h / (heads / kv_heads)`.
//! Key `j` is visible from query `i` of the same batch row when `j <= i`,
//! `j > i − window` (if there is a window) and both tokens carry the same segment
//! id ([`visible`], which the reference decoder's mask uses too). On the GPU the ids
//! must be non-decreasing along each row (each packed document one run, as the data
//! pipeline writes them; the fused engine refuses other batches): the kernels then skip
//! the tiles of other documents, so a row of short documents costs what its documents
//! do, not what a causal row of its length does.
//!
//! The forward saves `lse = log Σ_j exp(s_ij)` per query and head, laid out
//! `[batch, heads, seq]`; the backward recomputes `P = exp(S − lse)` from it, and
//! uses `D_i = Σ_d dO_id · O_id` (the stored, rounded `O`, as FlashAttention does).
//! All softmax math is f32; outputs are rounded once to the storage type.

use crate::device::{
    check_disjoint, read_f32, read_mat, read_view, write_f32, write_mat, Dev, Float, Mat, View,
};
use crate::error::{ensure, Result};

#[cfg(feature = "cuda")]
mod cuda;
mod selftest;

pub use selftest::{self_test, speed};

/// The forward's kernels: `Mma4` (4 warps x 16 queries, mma.sync, every GPU from 8.0),
/// `Mma8` (head dim 128: 128 queries share each K/V tile, half the L2 traffic, one CTA
/// per SM), and on compute capability 9.0 `Wgmma4` / `Wgmma8` (head dim 128: the products
/// as Hopper's warpgroup MMA, one or two warpgroups per CTA, from the sm_90a build) and
/// `Wgmma4P` / `Wgmma8P` (`Wgmma4` / `Wgmma8` pipelined: each key tile's S = Q Kᵀ
/// issued beside the previous tile's O += P V, the softmax running while that product is
/// in flight; three K/V stages; bit-identical results to the unpipelined kernel).
/// [`FwdKernel::default_for`] picks per GPU and head dim what measured fastest and
/// correct there; `QTRAIN_ATTN_FWD` = `mma`, `mma8`, `wgmma`, `wgmma8`, `wgmma4p` or `wgmma8p` forces one for a
/// whole run (benchmarks of a variant end to end; an error where it cannot run), and
/// `qtrain doctor` checks every variant against the CPU reference and times it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwdKernel {
    Mma4,
    Mma8,
    Wgmma4,
    Wgmma8,
    Wgmma4P,
    Wgmma8P,
}

impl FwdKernel {
    pub const ALL: [FwdKernel; 6] = [
        Self::Mma4,
        Self::Mma8,
        Self::Wgmma4,
        Self::Wgmma8,
        Self::Wgmma4P,
        Self::Wgmma8P,
    ];

    /// The head dims the wgmma forward may run at: 128 only. `attn_fwdwg*_d64` are
    /// built (the emulator checks them) but gave wrong scores on an H100 (docs/perf.md
    /// v10), so no run may use them.
    pub const WGMMA_HEAD_DIMS: &'static [usize] = &[128];

    /// The name `QTRAIN_ATTN_FWD` takes and reports print.
    pub fn label(self) -> &'static str {
        match self {
            Self::Mma4 => "mma",
            Self::Mma8 => "mma8",
            Self::Wgmma4 => "wgmma",
            Self::Wgmma8 => "wgmma8",
            Self::Wgmma4P => "wgmma4p",
            Self::Wgmma8P => "wgmma8p",
        }
    }

    /// A Hopper (sm_90a) kernel.
    pub fn is_wgmma(self) -> bool {
        matches!(
            self,
            Self::Wgmma4 | Self::Wgmma8 | Self::Wgmma4P | Self::Wgmma8P
        )
    }

    /// `QTRAIN_ATTN_FWD`, read once; `None` when unset.
    pub fn from_env() -> Result<Option<Self>> {
        static CHOICE: std::sync::OnceLock<std::result::Result<Option<FwdKernel>, String>> =
            std::sync::OnceLock::new();
        env_choice(&CHOICE, "QTRAIN_ATTN_FWD", &Self::ALL, Self::label)
    }

    /// The forward a GPU of compute capability `cc` runs at `head_dim` unless
    /// `QTRAIN_ATTN_FWD` says otherwise (`wgmma_built`: the binary holds the sm_90a
    /// kernels). On 9.0 at head dim 128 the pipelined one-warpgroup wgmma kernel: 1.55x
    /// the mma.sync forward's rate on an H100 at 1 x 8192, 1.09x the two-warpgroup
    /// kernel's (v10's default), bit-identical to the unpipelined one-warpgroup kernel,
    /// which is correct on every masking case of the hardware check (docs/perf.md v15).
    /// At head dim 64 the wgmma forward gave wrong scores on the H100 although the
    /// emulator passes it (v10, v15), so it is not offered there; everywhere else the
    /// mma.sync kernel.
    pub fn default_for(cc: (i32, i32), head_dim: usize, wgmma_built: bool) -> Self {
        if cc == (9, 0) && wgmma_built && Self::WGMMA_HEAD_DIMS.contains(&head_dim) {
            Self::Wgmma4P
        } else {
            Self::Mma4
        }
    }
}

/// The kernels of the split backward ([`AttnBackward::Split`]): `Mma` (mma.sync, every
/// GPU from 8.0), or on compute capability 9.0 at head dims 64 and 128 `Wgmma` (the
/// dK/dV and dQ products as Hopper's warpgroup MMA, from the sm_90a build; the same
/// reductions in the same order per element, so still bit-reproducible run to run).
/// [`SplitKernels::default_for`] picks; `QTRAIN_ATTN_SPLIT` = `mma` or `wgmma` forces
/// one for a run; `qtrain doctor` checks and times both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitKernels {
    Mma,
    Wgmma,
}

impl SplitKernels {
    pub const ALL: [SplitKernels; 2] = [Self::Mma, Self::Wgmma];

    /// The head dims the wgmma split backward is built for (and passed the hardware
    /// check at).
    pub const WGMMA_HEAD_DIMS: &'static [usize] = &[64, 128];

    /// The name `QTRAIN_ATTN_SPLIT` takes and reports print.
    pub fn label(self) -> &'static str {
        match self {
            Self::Mma => "mma",
            Self::Wgmma => "wgmma",
        }
    }

    /// Hopper (sm_90a) kernels.
    pub fn is_wgmma(self) -> bool {
        self == Self::Wgmma
    }

    /// `QTRAIN_ATTN_SPLIT`, read once; `None` when unset.
    pub fn from_env() -> Result<Option<Self>> {
        static CHOICE: std::sync::OnceLock<std::result::Result<Option<SplitKernels>, String>> =
            std::sync::OnceLock::new();
        env_choice(&CHOICE, "QTRAIN_ATTN_SPLIT", &Self::ALL, Self::label)
    }

    /// The split backward's kernels on a GPU of compute capability `cc` at `head_dim`
    /// unless `QTRAIN_ATTN_SPLIT` says otherwise: on 9.0 (with the sm_90a build) at head
    /// dims 64 and 128 the wgmma pair, 1.78x the mma.sync pair's rate on an H200 at
    /// 1 x 8192 and correct on every case of `qtrain doctor` (docs/perf.md v10);
    /// elsewhere mma.sync.
    pub fn default_for(cc: (i32, i32), head_dim: usize, wgmma_built: bool) -> Self {
        if cc == (9, 0) && wgmma_built && Self::WGMMA_HEAD_DIMS.contains(&head_dim) {
            Self::Wgmma
        } else {
            Self::Mma
        }
    }
}

/// The attention kernels `attention_fwd` / `attention_bwd` run on `dev` at `head_dim`:
/// the environment's choice where set, else the GPU's defaults; `None` on the CPU (the
/// reference). For reports (`qtrain bench` records them).
pub fn kernels_for(dev: &Dev, head_dim: usize) -> Result<Option<(FwdKernel, SplitKernels)>> {
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        return Ok(Some((
            cuda::fwd_kernel_for(c, head_dim)?,
            cuda::split_kernels_for(c, head_dim)?,
        )));
    }
    let _ = (dev, head_dim);
    Ok(None)
}

/// Why `mode` cannot run on `dev` at `head_dim`, if it cannot (the stored-dS backward's
/// kernels are Hopper-only; every mode runs on the CPU, whose reference is exact).
pub fn backward_unsupported(
    dev: &Dev,
    mode: AttnBackward,
    head_dim: usize,
) -> Result<Option<String>> {
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        if mode == AttnBackward::StoredDs {
            return cuda::stored_ds_unsupported(c, head_dim);
        }
    }
    let _ = (dev, mode, head_dim);
    Ok(None)
}

/// The kernel choice an environment variable names, parsed once into `cell`: `None`
/// when unset (or empty), an error naming the variable and the choices when unknown.
fn env_choice<K: Copy + Send + Sync>(
    cell: &'static std::sync::OnceLock<std::result::Result<Option<K>, String>>,
    var: &str,
    all: &[K],
    label: fn(K) -> &'static str,
) -> Result<Option<K>> {
    cell.get_or_init(|| match std::env::var(var) {
        Err(_) => Ok(None),
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => all
            .iter()
            .copied()
            .find(|&k| label(k) == v.trim())
            .map(Some)
            .ok_or_else(|| {
                let names: Vec<_> = all.iter().map(|&k| label(k)).collect();
                format!("{var}={v:?}: expected one of {}", names.join(", "))
            }),
    })
    .clone()
    .map_err(|msg| crate::error::DeviceError::Unsupported {
        op: "attention",
        msg,
    })
}

/// The shape and masking of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Mistral v0.1's sliding window (keys `j > i − window` stay visible).
    pub window: Option<usize>,
    /// Multiplies the scores, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

/// How the GPU backward computes dQ (the CPU reference ignores it: it is exact).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum AttnBackward {
    /// Two kernels, dK/dV per key tile then dQ per query tile: seven products per
    /// (key tile, query tile) pair (the dQ kernel recomputes S and dP), bit-reproducible,
    /// no memory beyond the `D` terms.
    #[default]
    Split,
    /// One kernel per (query head, key tile) adds its share of dQ into an f32 buffer,
    /// the key tiles of a query tile one after the other in a fixed order (turn
    /// counters), and the heads of a GQA group sum their dK/dV shares the same way:
    /// five products, bit-reproducible, `tokens · (heads + 2 · kv_heads) · head_dim`
    /// f32 more scratch (dQ's rows padded to whole 64-query tiles); a key tile may wait
    /// a step for its turn.
    Fused,
    /// The same, with atomic adds for dQ (FlashAttention-2's way): no waiting, but the
    /// order of the adds and so the rounding of dQ vary run to run. On a 9.0 GPU at head
    /// dim 128 a wgmma kernel (two warpgroups per 128 keys, each key tile's dQ share
    /// added by the copy engine's bulk reduction, dK/dV of a GQA group summed in
    /// registers; docs/perf.md v14).
    FusedAtomic,
    /// Split, but the dK/dV kernel also writes every (key tile, query tile) pair's dS^T
    /// (bf16) to scratch and the dQ kernel reads it instead of recomputing S and dP: five
    /// products and one pass of dS through memory instead of seven, bit-reproducible.
    /// The dS store grows as seq^2 (8 KiB per pair of 64-row tiles of every head:
    /// 2.2 GB at 1 x 8192 with 32 heads), so the kernels run over chunks of kv heads
    /// whose dS fits [`DS_CHUNK_BYTES`] (one kv head at least). Hopper kernels only: a
    /// 9.0 GPU, the sm_90a build, head dim 128 (docs/perf.md v20).
    StoredDs,
}

/// The most the stored-dS backward's dS store takes (bytes) where a chunk of more than one
/// kv head would exceed it: 1 x 8192 with 8 kv heads of 4 (2.16 GB) runs as one chunk, longer
/// rows in several (a chunk then fills fewer SMs at once, see v20).
pub const DS_CHUNK_BYTES: usize = 5 << 29; // 2.5 GiB

impl AttnBackward {
    pub const ALL: [AttnBackward; 4] =
        [Self::Split, Self::Fused, Self::FusedAtomic, Self::StoredDs];

    /// The name in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Split => "split",
            Self::Fused => "fused",
            Self::FusedAtomic => "fused-atomic",
            Self::StoredDs => "stored-ds",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }

    /// Whether two runs give bit-identical gradients.
    pub fn reproducible(self) -> bool {
        self != Self::FusedAtomic
    }
}

impl std::fmt::Display for AttnBackward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the parts of the backward's scratch start (f32 units, 16-byte aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BwdScratch {
    /// Turn counters (u32): one per (batch row, head, 32-query step), then one per
    /// (batch row, kv head, 64-key tile) for the group's dK/dV sums; zeroed per launch.
    pub turns: usize,
    pub turns_len: usize,
    pub kv_turns: usize,
    /// The f32 dQ accumulator, `[tokens, heads · head_dim]` (mma.sync kernels) or
    /// `[batch, heads, query tiles, 64 · head_dim]` in register order (`attn_bwd_fusedwg`);
    /// for the stored-dS backward its dS blobs (bf16, [`AttnShape::ds_store_bytes`]).
    pub acc: usize,
    /// The f32 dK/dV accumulator of the query heads of a group, `[tokens, kv_heads,
    /// 2 · head_dim]` (empty without GQA).
    pub kv_acc: usize,
    pub len: usize,
}

impl AttnShape {
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// Entries of `lse`: `batch · heads · seq`.
    pub fn stats_len(&self) -> usize {
        self.batch * self.heads * self.seq
    }

    /// f32 entries of the backward's scratch: the `D` terms (`stats_len`), and for the
    /// fused backwards the dQ accumulator and its turn counters.
    pub fn bwd_scratch_len(&self, mode: AttnBackward) -> usize {
        self.bwd_scratch(mode).len
    }

    /// The stored-dS backward's dS blobs of one (batch row, query head): 64 x 64 tiles of
    /// bf16 for every causal pair (query tile, key tile <= it) (`DsBlob` in the kernels).
    pub fn ds_blobs_per_head(&self) -> usize {
        let tiles = self.seq.div_ceil(64);
        tiles * (tiles + 1) / 2
    }

    /// Bytes of one dS blob.
    pub const DS_BLOB_BYTES: usize = 64 * 64 * 2;

    /// How many kv heads one launch of the stored-dS kernels covers: the most (dividing
    /// `kv_heads`) whose dS store fits [`DS_CHUNK_BYTES`], at least one.
    pub fn ds_chunk_kv_heads(&self) -> usize {
        let group = self.heads / self.kv_heads.max(1);
        let per_kv = self.batch * group * self.ds_blobs_per_head() * Self::DS_BLOB_BYTES;
        (1..=self.kv_heads)
            .rev()
            .find(|&c| self.kv_heads.is_multiple_of(c) && c * per_kv <= DS_CHUNK_BYTES)
            .unwrap_or(1)
    }

    /// Bytes of the stored-dS backward's dS store (one chunk's).
    pub fn ds_store_bytes(&self) -> usize {
        let group = self.heads / self.kv_heads.max(1);
        self.batch
            * self.ds_chunk_kv_heads()
            * group
            * self.ds_blobs_per_head()
            * Self::DS_BLOB_BYTES
    }

    pub(crate) fn bwd_scratch(&self, mode: AttnBackward) -> BwdScratch {
        let up = |x: usize| x.next_multiple_of(4);
        let dsum = self.stats_len();
        if matches!(mode, AttnBackward::Split | AttnBackward::StoredDs) {
            // Stored dS: the blobs after the D terms (`acc`, 16-byte aligned).
            let acc = up(dsum);
            let len = match mode {
                AttnBackward::StoredDs => acc + self.ds_store_bytes() / 4,
                _ => dsum,
            };
            return BwdScratch {
                turns: dsum,
                turns_len: 0,
                kv_turns: dsum,
                acc,
                kv_acc: len,
                len,
            };
        }
        // Steps of 32 queries (the kernel's are 32 or 64 rows; every 64-query tile
        // counts two, a ragged last one too), then the key tiles.
        let tiles = self.seq.div_ceil(64);
        let q_turns = self.batch * self.heads * tiles * 2;
        let turns_len = q_turns + self.batch * self.kv_heads * tiles;
        let turns = up(dsum);
        let acc = up(turns + turns_len);
        // Every row padded to whole 64-query tiles: the Hopper kernel of `FusedAtomic`
        // accumulates whole tiles (the mma.sync kernels use the first tokens · heads rows).
        let kv_acc = acc + self.batch * self.seq.next_multiple_of(64) * self.heads * self.head_dim;
        let kv_len = if self.heads > self.kv_heads {
            self.tokens() * self.kv_heads * 2 * self.head_dim
        } else {
            0
        };
        BwdScratch {
            turns,
            turns_len,
            kv_turns: turns + q_turns,
            acc,
            kv_acc,
            len: kv_acc + kv_len,
        }
    }

    fn check(&self, op: &'static str) -> Result<()> {
        ensure!(
            self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            op,
            "{} heads over {} KV heads",
            self.heads,
            self.kv_heads
        );
        ensure!(
            self.window != Some(0),
            op,
            "a sliding window of 0 would hide every key"
        );
        Ok(())
    }
}

/// Whether key `j` is visible from query `i` (same row of the batch):
/// causal (`j <= i`), inside the sliding window when there is one (Hugging Face
/// Mistral semantics: `j > i - window`, i.e. the query and the `window - 1`
/// previous tokens; note candle-transformers' Mistral keeps one more), and in the
/// same packed document (`segment[i] == segment[j]`). The reference decoder's
/// mask and KV-cached decoding use this rule too.
pub fn visible(i: usize, j: usize, window: Option<usize>, seg_i: u32, seg_j: u32) -> bool {
    j <= i && window.is_none_or(|w| j + w > i) && seg_i == seg_j
}

fn check_mats<T: Float>(
    op: &'static str,
    s: &AttnShape,
    q: Mat<'_, T>,
    k: Mat<'_, T>,
    v: Mat<'_, T>,
    o: Mat<'_, T>,
) -> Result<()> {
    let n = s.tokens();
    let (qc, kc) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    for (name, m, cols) in [("q", q, qc), ("k", k, kc), ("v", v, kc), ("o", o, qc)] {
        ensure!(
            m.rows == n && m.cols == cols,
            op,
            "{name} is {}x{}, expected {n}x{cols}",
            m.rows,
            m.cols
        );
    }
    Ok(())
}

/// Reads a `[n, heads * d]` matrix as f32 `[n][heads][d]`.
struct Heads {
    data: Vec<f32>,
    heads: usize,
    d: usize,
}

impl Heads {
    fn new<T: Float>(m: Mat<'_, T>, d: usize) -> Self {
        Heads {
            data: read_mat(m),
            heads: m.cols / d,
            d,
        }
    }
    fn row(&self, t: usize, h: usize) -> &[f32] {
        let o = (t * self.heads + h) * self.d;
        &self.data[o..o + self.d]
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// CPU reference of the forward: `(o, lse)` as dense arrays (`o` before rounding).
pub fn attention_fwd_ref<T: Float>(
    s: &AttnShape,
    q: Mat<'_, T>,
    k: Mat<'_, T>,
    v: Mat<'_, T>,
    seg: Option<&[u32]>,
) -> (Vec<f32>, Vec<f32>) {
    let d = s.head_dim;
    let (qh, kh, vh) = (Heads::new(q, d), Heads::new(k, d), Heads::new(v, d));
    let groups = s.heads / s.kv_heads;
    let mut o = vec![0f32; s.tokens() * s.heads * d];
    let mut lse = vec![0f32; s.stats_len()];
    let segment = |t: usize| seg.map_or(0, |sg| sg[t]);
    let mut scores = vec![0f32; s.seq];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let kvh = h / groups;
            for i in 0..s.seq {
                let ti = b * s.seq + i;
                let qi = qh.row(ti, h);
                let mut m = f32::NEG_INFINITY;
                for (j, sc) in scores.iter_mut().enumerate().take(i + 1) {
                    let tj = b * s.seq + j;
                    *sc = if visible(i, j, s.window, segment(ti), segment(tj)) {
                        dot(qi, kh.row(tj, kvh)) * s.scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    m = m.max(*sc);
                }
                let mut l = 0f32;
                let out = &mut o[(ti * s.heads + h) * d..(ti * s.heads + h + 1) * d];
                for (j, &sc) in scores.iter().enumerate().take(i + 1) {
                    if sc == f32::NEG_INFINITY {
                        continue;
                    }
                    let p = (sc - m).exp();
                    l += p;
                    let vj = vh.row(b * s.seq + j, kvh);
                    for c in 0..d {
                        out[c] += p * vj[c];
                    }
                }
                for x in out.iter_mut() {
                    *x /= l;
                }
                lse[(b * s.heads + h) * s.seq + i] = m + l.ln();
            }
        }
    }
    (o, lse)
}

/// Gradients of the CPU reference: `(dq, dk, dv)` as dense arrays.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_ref<T: Float>(
    s: &AttnShape,
    q: Mat<'_, T>,
    k: Mat<'_, T>,
    v: Mat<'_, T>,
    o: Mat<'_, T>,
    d_o: Mat<'_, T>,
    lse: &[f32],
    seg: Option<&[u32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = s.head_dim;
    let (qh, kh, vh) = (Heads::new(q, d), Heads::new(k, d), Heads::new(v, d));
    let (oh, doh) = (Heads::new(o, d), Heads::new(d_o, d));
    let groups = s.heads / s.kv_heads;
    let n = s.tokens();
    let mut dq = vec![0f32; n * s.heads * d];
    let mut dk = vec![0f32; n * s.kv_heads * d];
    let mut dv = vec![0f32; n * s.kv_heads * d];
    let segment = |t: usize| seg.map_or(0, |sg| sg[t]);
    for b in 0..s.batch {
        for h in 0..s.heads {
            let kvh = h / groups;
            for i in 0..s.seq {
                let ti = b * s.seq + i;
                let (qi, doi) = (qh.row(ti, h), doh.row(ti, h));
                let delta = dot(doi, oh.row(ti, h));
                let li = lse[(b * s.heads + h) * s.seq + i];
                for j in 0..=i {
                    let tj = b * s.seq + j;
                    if !visible(i, j, s.window, segment(ti), segment(tj)) {
                        continue;
                    }
                    let (kj, vj) = (kh.row(tj, kvh), vh.row(tj, kvh));
                    let p = (dot(qi, kj) * s.scale - li).exp();
                    let dp = dot(doi, vj);
                    let ds = p * (dp - delta);
                    let kv_off = (tj * s.kv_heads + kvh) * d;
                    let q_off = (ti * s.heads + h) * d;
                    for c in 0..d {
                        dv[kv_off + c] += p * doi[c];
                        dq[q_off + c] += ds * kj[c] * s.scale;
                        dk[kv_off + c] += ds * qi[c] * s.scale;
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

/// `o = softmax(q kᵀ · scale + mask) v`, saving `lse: [batch, heads, seq]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd<T: Float>(
    dev: &Dev,
    s: &AttnShape,
    q: Mat<'_, T>,
    k: Mat<'_, T>,
    v: Mat<'_, T>,
    segments: Option<View<'_, u32>>,
    o: Mat<'_, T>,
    lse: View<'_, f32>,
) -> Result<()> {
    s.check("attention_fwd")?;
    check_mats("attention_fwd", s, q, k, v, o)?;
    ensure!(
        lse.len() == s.stats_len(),
        "attention_fwd",
        "lse has {} entries, need {}",
        lse.len(),
        s.stats_len()
    );
    if let Some(sg) = segments {
        ensure!(
            sg.len() == s.tokens(),
            "attention_fwd",
            "{} segment ids for {} tokens",
            sg.len(),
            s.tokens()
        );
    }
    let seg_span = segments.map(|s| s.span());
    let mut ins = vec![q.span(), k.span(), v.span()];
    ins.extend(seg_span);
    check_disjoint("attention_fwd", &[o.span(), lse.span()], &ins)?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        let kern = cuda::fwd_kernel_for(c, s.head_dim)?;
        return cuda::attention_fwd_kernel(c, s, q, k, v, segments, o, lse, kern);
    }
    let _ = dev;
    let seg = segments.map(read_view);
    let (ov, l) = attention_fwd_ref(s, q, k, v, seg.as_deref());
    write_mat(o, &ov);
    write_f32(lse, &l);
    Ok(())
}

/// Gradients of [`attention_fwd`]: writes `dq`, `dk`, `dv` (overwritten, not
/// accumulated). `scratch` holds `s.bwd_scratch_len(mode)` f32 (on the GPU the `D`
/// terms, and for the fused modes the dQ accumulator); `mode` picks the GPU kernels.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Float>(
    dev: &Dev,
    s: &AttnShape,
    mode: AttnBackward,
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
    s.check("attention_bwd")?;
    check_mats("attention_bwd", s, q, k, v, o)?;
    check_mats("attention_bwd", s, dq, dk, dv, d_o)?;
    ensure!(
        lse.len() == s.stats_len() && scratch.len() >= s.bwd_scratch_len(mode),
        "attention_bwd",
        "lse has {} entries (need {}) and scratch {} (need {} for the {mode} backward)",
        lse.len(),
        s.stats_len(),
        scratch.len(),
        s.bwd_scratch_len(mode)
    );
    let mut ins = vec![
        q.span(),
        k.span(),
        v.span(),
        o.span(),
        d_o.span(),
        lse.span(),
    ];
    ins.extend(segments.map(|s| s.span()));
    check_disjoint(
        "attention_bwd",
        &[dq.span(), dk.span(), dv.span(), scratch.span()],
        &ins,
    )?;
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        let split = cuda::split_kernels_for(c, s.head_dim)?;
        return cuda::attention_bwd_kernels(
            c, s, mode, split, q, k, v, o, d_o, lse, segments, dq, dk, dv, scratch,
        );
    }
    let _ = (dev, mode);
    let seg = segments.map(read_view);
    let (a, b, c) = attention_bwd_ref(s, q, k, v, o, d_o, &read_f32(lse), seg.as_deref());
    write_mat(dq, &a);
    write_mat(dk, &b);
    write_mat(dv, &c);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    // Each case reads its own variable into its own cell: `env_choice` parses once.
    #[test]
    fn kernel_choices_come_from_the_environment_with_a_clear_error() {
        static UNSET: OnceLock<std::result::Result<Option<FwdKernel>, String>> = OnceLock::new();
        static SET: OnceLock<std::result::Result<Option<FwdKernel>, String>> = OnceLock::new();
        static BAD: OnceLock<std::result::Result<Option<SplitKernels>, String>> = OnceLock::new();
        let all = FwdKernel::ALL;
        let unset = env_choice(&UNSET, "QTRAIN_TEST_ATTN_UNSET", &all, FwdKernel::label);
        assert_eq!(unset.unwrap(), None, "unset: the GPU's default");
        // No other test reads these variables (set_var is safe in edition 2021).
        std::env::set_var("QTRAIN_TEST_ATTN_SET", " wgmma8 ");
        let set = env_choice(&SET, "QTRAIN_TEST_ATTN_SET", &all, FwdKernel::label);
        assert_eq!(set.unwrap(), Some(FwdKernel::Wgmma8));
        std::env::set_var("QTRAIN_TEST_ATTN_BAD", "tma");
        let splits = SplitKernels::ALL;
        let err = env_choice(&BAD, "QTRAIN_TEST_ATTN_BAD", &splits, SplitKernels::label)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("QTRAIN_TEST_ATTN_BAD=\"tma\"") && err.contains("mma, wgmma"),
            "{err}"
        );
        // Every label names one kernel.
        let labels: Vec<_> = all.iter().map(|k| k.label()).collect();
        assert_eq!(
            labels,
            ["mma", "mma8", "wgmma", "wgmma8", "wgmma4p", "wgmma8p"]
        );
    }

    #[test]
    fn the_wgmma_kernels_are_the_default_only_where_they_were_measured_right() {
        use FwdKernel::*;
        let hopper = (9, 0);
        // Head dim 128 on a 9.0 GPU with the sm_90a build: wgmma both ways (the
        // forward pipelined, one warpgroup per CTA: docs/perf.md v15).
        assert_eq!(FwdKernel::default_for(hopper, 128, true), Wgmma4P);
        assert_eq!(
            SplitKernels::default_for(hopper, 128, true),
            SplitKernels::Wgmma
        );
        // Head dim 64: the backward's wgmma pair passed the hardware check, the
        // forward did not.
        assert_eq!(FwdKernel::default_for(hopper, 64, true), Mma4);
        assert_eq!(
            SplitKernels::default_for(hopper, 64, true),
            SplitKernels::Wgmma
        );
        // Head dims without wgmma kernels, other GPUs, or a binary built for another
        // CUDA_COMPUTE_CAP: mma.sync.
        for (cc, d, built) in [
            (hopper, 32, true),
            (hopper, 16, true),
            ((8, 9), 128, true),
            ((8, 0), 128, true),
            ((10, 0), 128, true),
            (hopper, 128, false),
        ] {
            assert_eq!(
                FwdKernel::default_for(cc, d, built),
                Mma4,
                "{cc:?} d{d} {built}"
            );
            assert_eq!(
                SplitKernels::default_for(cc, d, built),
                SplitKernels::Mma,
                "{cc:?} d{d} {built}"
            );
        }
    }

    #[test]
    fn the_stored_ds_store_is_chunked_by_kv_heads_within_its_bound() {
        let mistral = |batch, seq| AttnShape {
            batch,
            seq,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            window: None,
            scale: 1.0 / (128f32).sqrt(),
        };
        // 1 x 8192: 128 query tiles, 8 256 causal pairs of 8 KiB per head, all 32 heads at
        // once (2.16 GB, under the 2.5 GiB bound).
        let s = mistral(1, 8192);
        assert_eq!(s.ds_blobs_per_head(), 128 * 129 / 2);
        assert_eq!(s.ds_chunk_kv_heads(), 8);
        assert_eq!(s.ds_store_bytes(), 32 * 8256 * 8192);
        // 4 x 2048: 553 MB, one chunk.
        assert_eq!(mistral(4, 2048).ds_chunk_kv_heads(), 8);
        // 1 x 16384: 8.6 GB in all, so two kv heads (8 query heads) per launch.
        let s = mistral(1, 16384);
        assert_eq!(s.ds_chunk_kv_heads(), 2);
        assert!(s.ds_store_bytes() <= DS_CHUNK_BYTES);
        // 1 x 32768: one kv head's four query heads already take 4.3 GB: one at a time.
        let s = mistral(1, 32768);
        assert_eq!(s.ds_chunk_kv_heads(), 1);
        assert_eq!(s.ds_store_bytes(), 4 * (512 * 513 / 2) * 8192);
        // The scratch: the D terms, then the blobs on a 16-byte boundary; the other modes
        // are unchanged by it.
        let s = mistral(1, 100);
        let l = s.bwd_scratch(AttnBackward::StoredDs);
        assert_eq!(l.acc, s.stats_len().next_multiple_of(4));
        assert_eq!(l.len, l.acc + s.ds_store_bytes() / 4);
        assert_eq!(s.ds_store_bytes(), 32 * 3 * 8192); // two tiles: three pairs per head
        assert_eq!(s.bwd_scratch_len(AttnBackward::Split), s.stats_len());
    }
}
