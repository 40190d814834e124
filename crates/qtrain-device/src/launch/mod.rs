//! CUDA launchers of the kernels in `kernels/*.cu`, one function per op, called by
//! the op wrappers (`crate::norm`, ...) after they checked shapes and overlaps.
//! Each function picks the kernel instantiation for the element type, computes the
//! grid, and pushes the arguments in the exact order of the kernel's parameters.

mod attention;

pub(crate) use attention::{attention_bwd, attention_fwd, attention_fwd_warps};

use crate::cuda::{grid_1d, launch, CudaDev, PushKernelArg};
use crate::device::{Float, FloatKind, Mat, View};
use crate::error::{DeviceError, Result};
use crate::ptx;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

/// The kernel `{base}_{suffix of T}`, e.g. `rmsnorm_fwd_bf16`.
fn name<T: Float>(base: &'static str) -> &'static str {
    // Kernel names are a small fixed set: intern them once.
    use std::collections::HashMap;
    use std::sync::Mutex;
    static NAMES: Mutex<Option<HashMap<(&'static str, FloatKind), &'static str>>> =
        Mutex::new(None);
    let mut g = NAMES.lock().unwrap();
    let map = g.get_or_insert_with(HashMap::new);
    map.entry((base, T::KIND))
        .or_insert_with(|| Box::leak(format!("{base}_{}", T::KIND.suffix()).into_boxed_str()))
}

fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per row-block for a row of `cols` elements moved 8 at a time.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(8).div_ceil(32) * 32).clamp(32, 512) as u32
}

fn vec8<T: Float>(mats: &[(u64, usize, usize)]) -> bool {
    mats.iter()
        .all(|&(p, cols, ld)| cols % 8 == 0 && ld % 8 == 0 && p % 16 == 0)
        && std::mem::size_of::<T>() <= 4
}

pub(crate) fn rmsnorm_fwd<T: Float>(
    c: &CudaDev,
    x: Mat<'_, T>,
    w: View<'_, T>,
    eps: f32,
    y: Mat<'_, T>,
    inv: View<'_, f32>,
) -> Result<()> {
    if x.rows == 0 {
        return Ok(());
    }
    let f = c.func("qtrain_norm", ptx::NORM, name::<T>("rmsnorm_fwd"))?;
    let mut b = c.builder(&f);
    let (xp, ldx, wp, yp, ldy, ip) = (
        x.dptr(),
        x.ld as u64,
        w.dptr(),
        y.dptr(),
        y.ld as u64,
        inv.dptr(),
    );
    let cols = x.cols as u32;
    b.arg(&xp)
        .arg(&ldx)
        .arg(&wp)
        .arg(&yp)
        .arg(&ldy)
        .arg(&ip)
        .arg(&cols)
        .arg(&eps);
    // SAFETY: arguments match `rmsnorm_fwd_*`; one block per row of checked matrices.
    unsafe { launch("rmsnorm_fwd", b, rows_cfg(x.rows, row_threads(x.cols))) }
}

pub(crate) fn rmsnorm_bwd<T: Float>(
    c: &CudaDev,
    x: Mat<'_, T>,
    inv: View<'_, f32>,
    w: View<'_, T>,
    dy: Mat<'_, T>,
    dx: Mat<'_, T>,
    accumulate: bool,
) -> Result<()> {
    if x.rows == 0 {
        return Ok(());
    }
    let f = c.func("qtrain_norm", ptx::NORM, name::<T>("rmsnorm_bwd"))?;
    let mut b = c.builder(&f);
    let (xp, ldx, ip, wp) = (x.dptr(), x.ld as u64, inv.dptr(), w.dptr());
    let (dyp, lddy, dxp, lddx) = (dy.dptr(), dy.ld as u64, dx.dptr(), dx.ld as u64);
    let (cols, acc) = (x.cols as u32, accumulate as u32);
    b.arg(&xp)
        .arg(&ldx)
        .arg(&ip)
        .arg(&wp)
        .arg(&dyp)
        .arg(&lddy)
        .arg(&dxp)
        .arg(&lddx)
        .arg(&cols)
        .arg(&acc);
    // SAFETY: arguments match `rmsnorm_bwd_*`; one block per row.
    unsafe { launch("rmsnorm_bwd", b, rows_cfg(x.rows, row_threads(x.cols))) }
}

pub(crate) fn rope<T: Float>(
    c: &CudaDev,
    x: Mat<'_, T>,
    head_dim: usize,
    cos: View<'_, f32>,
    sin: View<'_, f32>,
    inverse: bool,
) -> Result<()> {
    let total = x.rows * x.cols / 2;
    if total == 0 {
        return Ok(());
    }
    let (xp, rows) = (x.dptr(), x.rows as u32);
    let (heads, hd) = ((x.cols / head_dim) as u32, head_dim as u32);
    let (cp, sp, inv) = (cos.dptr(), sin.dptr(), inverse as u32);
    let esize = std::mem::size_of::<T>() as u64;
    // Four pairs per thread where every vector access is aligned.
    let quads = (total / 4) as u64;
    if (head_dim / 2).is_multiple_of(4)
        && x.ld.is_multiple_of(4)
        && x.ld <= u32::MAX as usize
        && xp.is_multiple_of(4 * esize)
        && cp.is_multiple_of(16)
        && sp.is_multiple_of(16)
        && quads <= u32::MAX as u64
    {
        let f = c.func("qtrain_rope", ptx::ROPE, name::<T>("rope4"))?;
        let mut b = c.builder(&f);
        let ld = x.ld as u32;
        b.arg(&xp)
            .arg(&ld)
            .arg(&rows)
            .arg(&heads)
            .arg(&hd)
            .arg(&cp)
            .arg(&sp)
            .arg(&inv);
        // SAFETY: arguments match `rope4_*`; one thread per four pairs, bounds-checked
        // in the kernel; alignment checked above.
        return unsafe { launch("rope", b, grid_1d(quads as usize, 256)) };
    }
    let f = c.func("qtrain_rope", ptx::ROPE, name::<T>("rope"))?;
    let mut b = c.builder(&f);
    let ld = x.ld as u64;
    b.arg(&xp)
        .arg(&ld)
        .arg(&rows)
        .arg(&heads)
        .arg(&hd)
        .arg(&cp)
        .arg(&sp)
        .arg(&inv);
    // SAFETY: arguments match `rope_*`; one thread per pair, bounds-checked in the kernel.
    unsafe { launch("rope", b, grid_1d(total, 256)) }
}

pub(crate) fn swiglu_fwd<T: Float>(
    c: &CudaDev,
    g: Mat<'_, T>,
    u: Mat<'_, T>,
    m: Mat<'_, T>,
) -> Result<()> {
    swiglu(c, "swiglu_fwd", g, u, m)
}

pub(crate) fn swiglu_bwd<T: Float>(
    c: &CudaDev,
    g: Mat<'_, T>,
    u: Mat<'_, T>,
    dm: Mat<'_, T>,
) -> Result<()> {
    swiglu(c, "swiglu_bwd", g, u, dm)
}

fn swiglu<T: Float>(
    c: &CudaDev,
    base: &'static str,
    g: Mat<'_, T>,
    u: Mat<'_, T>,
    m: Mat<'_, T>,
) -> Result<()> {
    if g.rows * g.cols == 0 {
        return Ok(());
    }
    let vec = vec8::<T>(&[
        (g.dptr(), g.cols, g.ld),
        (u.dptr(), u.cols, u.ld),
        (m.dptr(), m.cols, m.ld),
    ]);
    let per_thread = if vec { 8 } else { 1 };
    let f = c.func("qtrain_swiglu", ptx::SWIGLU, name::<T>(base))?;
    let mut b = c.builder(&f);
    let (gp, ldg, up, ldu, mp, ldm) = (
        g.dptr(),
        g.ld as u64,
        u.dptr(),
        u.ld as u64,
        m.dptr(),
        m.ld as u64,
    );
    let (rows, cols, v) = (g.rows as u32, g.cols as u32, vec as u32);
    b.arg(&gp)
        .arg(&ldg)
        .arg(&up)
        .arg(&ldu)
        .arg(&mp)
        .arg(&ldm)
        .arg(&rows)
        .arg(&cols)
        .arg(&v);
    // SAFETY: arguments match `swiglu_*`; the kernel bounds-checks its index.
    unsafe { launch(base, b, grid_1d(g.rows * g.cols / per_thread, 256)) }
}

pub(crate) fn xent<T: Float>(
    c: &CudaDev,
    logits: Mat<'_, f32>,
    targets: View<'_, i32>,
    scale: f32,
    loss: View<'_, f32>,
    dlogits: Option<Mat<'_, T>>,
) -> Result<()> {
    if logits.rows == 0 {
        return Ok(());
    }
    let f = c.func("qtrain_xent", ptx::XENT, name::<T>("xent"))?;
    let mut b = c.builder(&f);
    let (lp, ldl, tp, lossp) = (logits.dptr(), logits.ld as u64, targets.dptr(), loss.dptr());
    let (dp, ldd) = dlogits.map_or((0u64, 0u64), |d| (d.dptr(), d.ld as u64));
    let (vocab, want) = (logits.cols as u32, dlogits.is_some() as u32);
    b.arg(&lp)
        .arg(&ldl)
        .arg(&tp)
        .arg(&scale)
        .arg(&lossp)
        .arg(&dp)
        .arg(&ldd)
        .arg(&vocab)
        .arg(&want);
    // SAFETY: arguments match `xent_*`; one block per row; `d` unused when want = 0.
    unsafe { launch("xent", b, rows_cfg(logits.rows, 512)) }
}

pub(crate) fn gather_rows<T: Float>(
    c: &CudaDev,
    src: Mat<'_, T>,
    ids: View<'_, u32>,
    out: Mat<'_, T>,
    scatter: bool,
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let f = c.func("qtrain_rows", ptx::ROWS, name::<T>("gather_rows"))?;
    let mut b = c.builder(&f);
    let (sp, lds, ip, op, ldo) = (
        src.dptr(),
        src.ld as u64,
        ids.dptr(),
        out.dptr(),
        out.ld as u64,
    );
    let (cols, sc) = (src.cols as u32, scatter as u32);
    b.arg(&sp)
        .arg(&lds)
        .arg(&ip)
        .arg(&op)
        .arg(&ldo)
        .arg(&cols)
        .arg(&sc);
    // SAFETY: arguments match `gather_rows_*`; ids were range-checked by the caller's
    // construction (the engine builds them from the batch).
    unsafe { launch("gather_rows", b, rows_cfg(ids.len(), 128)) }
}

pub(crate) fn cast<S: Float, D: Float>(
    c: &CudaDev,
    src: View<'_, S>,
    dst: View<'_, D>,
    scale: f32,
) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    let kname: &'static str = match (S::KIND, D::KIND) {
        (FloatKind::F32, FloatKind::Bf16) => "cast_f32_bf16",
        (FloatKind::F32, FloatKind::F16) => "cast_f32_f16",
        (FloatKind::F32, FloatKind::F32) => "cast_f32_f32",
        (FloatKind::Bf16, FloatKind::F32) => "cast_bf16_f32",
        (FloatKind::F16, FloatKind::F32) => "cast_f16_f32",
        (FloatKind::Bf16, FloatKind::Bf16) => "cast_bf16_bf16",
        (FloatKind::F16, FloatKind::F16) => "cast_f16_f16",
        (s, d) => {
            return Err(DeviceError::Unsupported {
                op: "cast",
                msg: format!("{s:?} -> {d:?}"),
            })
        }
    };
    let f = c.func("qtrain_rows", ptx::ROWS, kname)?;
    let mut b = c.builder(&f);
    let (sp, dp, n) = (src.dptr(), dst.dptr(), src.len() as u64);
    b.arg(&sp).arg(&dp).arg(&n).arg(&scale);
    // SAFETY: arguments match `cast_*`; bounds-checked in the kernel.
    unsafe { launch("cast", b, grid_1d(src.len(), 256)) }
}

pub(crate) fn scale(c: &CudaDev, v: View<'_, f32>, s: f32) -> Result<()> {
    if v.is_empty() {
        return Ok(());
    }
    let f = c.func("qtrain_rows", ptx::ROWS, "scale_f32")?;
    let mut b = c.builder(&f);
    let (p, n) = (v.dptr(), v.len() as u64);
    b.arg(&p).arg(&n).arg(&s);
    // SAFETY: arguments match `scale_f32`; bounds-checked in the kernel.
    unsafe { launch("scale", b, grid_1d(v.len(), 256)) }
}

pub(crate) fn sum_squares(c: &CudaDev, v: View<'_, f32>) -> Result<f64> {
    const BLOCKS: usize = 256;
    if v.is_empty() {
        return Ok(0.0);
    }
    let partial = c.alloc_zeroed(BLOCKS * 8, "sum of squares partials", 0)?;
    let f = c.func("qtrain_rows", ptx::ROWS, "sum_squares_f32")?;
    let mut b = c.builder(&f);
    let (p, n, out) = (v.dptr(), v.len() as u64, partial.ptr());
    b.arg(&p).arg(&n).arg(&out);
    let cfg = LaunchConfig {
        grid_dim: (BLOCKS as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match `sum_squares_f32`; `partial` holds one f64 per block.
    unsafe { launch("sum_squares", b, cfg)? };
    let parts: Vec<f64> = c.dtoh(partial.ptr(), BLOCKS)?;
    Ok(parts.iter().sum())
}

pub(crate) fn dropout<T: Float>(
    c: &CudaDev,
    x: Mat<'_, T>,
    out: Mat<'_, T>,
    base: u64,
    row_offset: usize,
    p: f64,
) -> Result<()> {
    if x.rows * x.cols == 0 {
        return Ok(());
    }
    let f = c.func("qtrain_rows", ptx::ROWS, name::<T>("dropout"))?;
    let mut b = c.builder(&f);
    let (xp, ldx, op, ldo) = (x.dptr(), x.ld as u64, out.dptr(), out.ld as u64);
    let (rows, cols, ro) = (x.rows as u32, x.cols as u32, row_offset as u64);
    let thr = crate::rows::dropout_threshold(p);
    let keep = (1.0 / (1.0 - p)) as f32;
    b.arg(&xp)
        .arg(&ldx)
        .arg(&op)
        .arg(&ldo)
        .arg(&rows)
        .arg(&cols)
        .arg(&base)
        .arg(&ro)
        .arg(&thr)
        .arg(&keep);
    // SAFETY: arguments match `dropout_*`; bounds-checked in the kernel.
    unsafe { launch("dropout", b, grid_1d(x.rows * x.cols, 256)) }
}

pub(crate) fn add_into<T: Float>(c: &CudaDev, src: Mat<'_, T>, dst: Mat<'_, T>) -> Result<()> {
    if src.rows * src.cols == 0 {
        return Ok(());
    }
    let f = c.func("qtrain_rows", ptx::ROWS, name::<T>("add_into"))?;
    let mut b = c.builder(&f);
    let (sp, lds, dp, ldd) = (src.dptr(), src.ld as u64, dst.dptr(), dst.ld as u64);
    let (rows, cols) = (src.rows as u32, src.cols as u32);
    b.arg(&sp)
        .arg(&lds)
        .arg(&dp)
        .arg(&ldd)
        .arg(&rows)
        .arg(&cols);
    // SAFETY: arguments match `add_into_*`; bounds-checked in the kernel.
    unsafe { launch("add_into", b, grid_1d(src.rows * src.cols, 256)) }
}
