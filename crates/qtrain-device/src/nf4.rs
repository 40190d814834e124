//! NF4 weights on the compute device and their dequantization into a reused buffer.
//!
//! [`Nf4Device`] holds one projection's quantized weight as two device tensors (the
//! layout is documented in `kernels/nf4.cu`), and [`Nf4Device::dequantize_into`]
//! writes the full-precision weight into a caller-owned buffer with an in-place
//! candle op: on CUDA the `nf4_dequant_*` kernels, on the CPU the plain loop below,
//! which is the reference the kernel is tested against (and which is itself tested
//! against `qtrain_quant::Nf4Tensor::dequantize_into`).

use candle_core::{CpuStorage, DType, Device, InplaceOp3, Layout, Result, Tensor};
use qtrain_quant::{Absmax, Nf4Tensor, NF4_CODE};

/// Which CUDA kernel dequantizes (both give bit-identical results; `qtrain doctor`
/// times each on the GPU at hand).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DequantKernel {
    /// The default: a CTA of 128 threads decodes a tile of 4096 weights into shared
    /// memory and each warp stores its part lane-contiguously (512 contiguous bytes
    /// per store instruction), after the tile's absmax values are computed once.
    Tile,
    /// 8 code bytes (16 weights) per thread, two 16-byte stores of its own 32 bytes:
    /// the simple form, about 15% slower on an H200 (the warp's stores are strided).
    Chunk8,
}

/// How one dequantization is launched.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct LaunchShape {
    kernel: &'static str,
    blocks: u32,
    threads: u32,
}

impl DequantKernel {
    pub const ALL: [DequantKernel; 2] = [DequantKernel::Tile, DequantKernel::Chunk8];

    /// The kernel, grid and block for `numel` weights into `kind` outputs (the tile
    /// size and thread count are those of `kernels/nf4.cu`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn launch_shape(self, kind: crate::FloatKind, numel: usize) -> LaunchShape {
        use crate::FloatKind::{Bf16, F16, F32};
        const TILE_WEIGHTS: usize = 4096;
        const TILE_THREADS: u32 = 128;
        let chunk8 = |kernel| LaunchShape {
            kernel,
            blocks: numel.div_ceil(2).div_ceil(8).div_ceil(256).max(1) as u32,
            threads: 256,
        };
        let tile = |kernel| LaunchShape {
            kernel,
            blocks: numel.div_ceil(TILE_WEIGHTS).max(1) as u32,
            threads: TILE_THREADS,
        };
        match (self, kind) {
            (DequantKernel::Chunk8, F32) => chunk8("nf4_dequant_f32"),
            (DequantKernel::Chunk8, Bf16) => chunk8("nf4_dequant_bf16"),
            (DequantKernel::Chunk8, F16) => chunk8("nf4_dequant_f16"),
            (DequantKernel::Tile, Bf16) => tile("nf4_dequant_bf16_tile"),
            (DequantKernel::Tile, F16) => tile("nf4_dequant_f16_tile"),
            (DequantKernel::Tile, F32) => tile("nf4_dequant_f32_tile"),
        }
    }
}

static DEQUANT_KERNEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
static DEQUANT_KERNEL_ENV: std::sync::Once = std::sync::Once::new();

impl std::str::FromStr for DequantKernel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tile" => Ok(DequantKernel::Tile),
            "chunk8" => Ok(DequantKernel::Chunk8),
            other => Err(format!(
                "`{other}` is not a dequantization kernel (tile or chunk8)"
            )),
        }
    }
}

/// `QTRAIN_NF4_KERNEL` (tile or chunk8) picks the starting choice.
fn init_from_env() {
    DEQUANT_KERNEL_ENV.call_once(|| {
        if let Ok(v) = std::env::var("QTRAIN_NF4_KERNEL") {
            match v.parse::<DequantKernel>() {
                Ok(k) => store_kernel(k),
                Err(e) => eprintln!("warning: QTRAIN_NF4_KERNEL: {e}; using tile"),
            }
        }
    });
}

fn store_kernel(k: DequantKernel) {
    let v = DequantKernel::ALL.iter().position(|&x| x == k).unwrap_or(0) as u8;
    DEQUANT_KERNEL.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// Selects the dequantization kernel for every later call (process-wide).
pub fn set_dequant_kernel(k: DequantKernel) {
    init_from_env();
    store_kernel(k);
}

/// The kernel in use: `Tile` unless `QTRAIN_NF4_KERNEL` or [`set_dequant_kernel`]
/// chose another.
pub fn dequant_kernel() -> DequantKernel {
    init_from_env();
    DequantKernel::ALL[DEQUANT_KERNEL.load(std::sync::atomic::Ordering::Relaxed) as usize
        % DequantKernel::ALL.len()]
}

/// The shape of one quantized weight, as the dequantization kernel needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nf4Meta {
    pub numel: usize,
    pub blocksize: usize,
    pub nested_blocksize: usize,
    pub double_quant: bool,
}

/// Dequantizes one weight (codes and stats laid out as [`Nf4Device`] holds them)
/// into `out`, a range of a reused buffer: the engine's path, on raw buffers.
pub fn dequantize_view<T: crate::Float>(
    dev: &crate::Dev,
    codes: crate::View<'_, u8>,
    stats: crate::View<'_, f32>,
    out: crate::View<'_, T>,
    meta: Nf4Meta,
) -> crate::Result<()> {
    use crate::error::ensure;
    ensure!(
        out.len() == meta.numel,
        "nf4 dequantize",
        "output has {} elements, weight {}",
        out.len(),
        meta.numel
    );
    let op = Nf4DequantOp {
        numel: meta.numel,
        blocksize: meta.blocksize,
        nested_blocksize: meta.nested_blocksize,
        double_quant: meta.double_quant,
    };
    #[cfg(feature = "cuda")]
    if let Some(c) = dev.cuda() {
        ensure!(
            meta.blocksize.is_multiple_of(16) && out.len().is_multiple_of(16),
            "nf4 dequantize",
            "the CUDA kernel needs a blocksize and size multiple of 16"
        );
        use crate::cuda::PushKernelArg;
        let shape = dequant_kernel().launch_shape(T::KIND, meta.numel);
        let f = c.func("qtrain_nf4_raw", crate::ptx::NF4, shape.kernel)?;
        let mut b = c.builder(&f);
        let (cp, sp, op_) = (codes.dptr(), stats.dptr(), out.dptr());
        let (numel, bs, nb, dq) = (
            meta.numel as u64,
            meta.blocksize as u32,
            meta.nested_blocksize as u32,
            meta.double_quant as u32,
        );
        b.arg(&cp)
            .arg(&sp)
            .arg(&op_)
            .arg(&numel)
            .arg(&bs)
            .arg(&nb)
            .arg(&dq);
        let cfg = crate::cuda::LaunchConfig {
            grid_dim: (shape.blocks, 1, 1),
            block_dim: (shape.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match `nf4_dequant_*`; the grid covers every weight and
        // each kernel bounds-checks the last chunk or tile.
        return unsafe { crate::cuda::launch("nf4 dequantize", b, cfg) };
    }
    let _ = dev;
    let codes = crate::device::read_view(codes);
    let stats = crate::device::read_view(stats);
    let vals: Vec<f32> = (0..meta.numel)
        .map(|i| op.value(&codes, &stats, i))
        .collect();
    crate::device::write_f32(out, &vals);
    Ok(())
}

/// One quantized weight resident on a device.
pub struct Nf4Device {
    /// Packed codes followed (double quant) by the 8-bit absmax codes. U8.
    pub codes: Tensor,
    /// Double quant: `[offset, nested_code[256], nested_absmax..]`; else `[absmax..]`. F32.
    pub stats: Tensor,
    pub shape: Vec<usize>,
    pub blocksize: usize,
    pub nested_blocksize: usize,
    pub double_quant: bool,
}

impl Nf4Device {
    /// Uploads a host-quantized weight.
    pub fn from_host(q: &Nf4Tensor, device: &Device) -> Result<Self> {
        let (codes, stats, nested_blocksize, double_quant) = match &q.absmax {
            Absmax::F32(a) => (q.packed.clone(), a.clone(), 1, false),
            Absmax::DoubleQuant(dq) => {
                let mut codes = Vec::with_capacity(q.packed.len() + dq.quantized.len());
                codes.extend_from_slice(&q.packed);
                codes.extend_from_slice(&dq.quantized);
                let mut stats = Vec::with_capacity(1 + 256 + dq.nested_absmax.len());
                stats.push(dq.offset);
                stats.extend_from_slice(&dq.nested_code);
                stats.extend_from_slice(&dq.nested_absmax);
                (codes, stats, dq.nested_blocksize, true)
            }
        };
        let n_codes = codes.len();
        let n_stats = stats.len();
        Ok(Self {
            codes: Tensor::from_vec(codes, n_codes, device)?,
            stats: Tensor::from_vec(stats, n_stats, device)?,
            shape: q.shape.clone(),
            blocksize: q.blocksize,
            nested_blocksize,
            double_quant,
        })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// What [`dequantize_view`] needs to know about this weight.
    pub fn meta(&self) -> Nf4Meta {
        Nf4Meta {
            numel: self.numel(),
            blocksize: self.blocksize,
            nested_blocksize: self.nested_blocksize,
            double_quant: self.double_quant,
        }
    }

    /// Device bytes held by this weight.
    pub fn storage_bytes(&self) -> usize {
        self.codes.elem_count() + 4 * self.stats.elem_count()
    }

    /// Writes the dequantized weight into `out` (contiguous, `numel` elements of bf16,
    /// f16 or f32, on the same device). `out` is typically one buffer reused for every
    /// projection of every layer.
    pub fn dequantize_into(&self, out: &Tensor) -> Result<()> {
        if out.elem_count() != self.numel() || !out.is_contiguous() {
            candle_core::bail!(
                "nf4 dequantize: output buffer has {} elements (contiguous: {}), weight has {}",
                out.elem_count(),
                out.is_contiguous(),
                self.numel()
            );
        }
        let op = Nf4DequantOp {
            numel: self.numel(),
            blocksize: self.blocksize,
            nested_blocksize: self.nested_blocksize,
            double_quant: self.double_quant,
        };
        out.inplace_op3(&self.codes, &self.stats, &op)
    }

    /// Allocates a buffer and dequantizes into it (for tests and one-off use).
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let out = Tensor::zeros(self.shape.as_slice(), dtype, self.codes.device())?;
        self.dequantize_into(&out)?;
        Ok(out)
    }
}

struct Nf4DequantOp {
    numel: usize,
    blocksize: usize,
    nested_blocksize: usize,
    double_quant: bool,
}

impl Nf4DequantOp {
    /// Weight `i` as f32 (the formula of the kernel).
    fn value(&self, codes: &[u8], stats: &[f32], i: usize) -> f32 {
        let byte = codes[i / 2];
        let nibble = if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        };
        NF4_CODE[nibble as usize] * self.absmax(codes, stats, i / self.blocksize)
    }

    /// The absmax of quantization block `b`, undoing double quantization.
    fn absmax(&self, codes: &[u8], stats: &[f32], b: usize) -> f32 {
        if self.double_quant {
            let qabsmax = codes[self.numel.div_ceil(2) + b] as usize;
            stats[1 + qabsmax] * stats[257 + b / self.nested_blocksize] + stats[0]
        } else {
            stats[b]
        }
    }
}

/// The contiguous slice a layout covers (our buffers are always contiguous).
fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("nf4 dequantize: {what} must be contiguous"),
    }
}

impl InplaceOp3 for Nf4DequantOp {
    fn name(&self) -> &'static str {
        "nf4-dequantize"
    }

    /// The CPU reference: one weight at a time, exactly the formula of the kernel.
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        codes: &CpuStorage,
        codes_l: &Layout,
        stats: &CpuStorage,
        stats_l: &Layout,
    ) -> Result<()> {
        let codes = contiguous(codes.as_slice::<u8>()?, codes_l, "codes")?;
        let stats = contiguous(stats.as_slice::<f32>()?, stats_l, "stats")?;
        let Some((d0, d1)) = dst_l.contiguous_offsets() else {
            candle_core::bail!("nf4 dequantize: output must be contiguous")
        };
        let value = |i: usize| self.value(codes, stats, i);
        match dst {
            CpuStorage::F32(v) => {
                for (i, o) in v[d0..d1].iter_mut().enumerate() {
                    *o = value(i);
                }
            }
            CpuStorage::BF16(v) => {
                for (i, o) in v[d0..d1].iter_mut().enumerate() {
                    *o = half::bf16::from_f32(value(i));
                }
            }
            CpuStorage::F16(v) => {
                for (i, o) in v[d0..d1].iter_mut().enumerate() {
                    *o = half::f16::from_f32(value(i));
                }
            }
            _ => candle_core::bail!("nf4 dequantize: output must be f32, bf16 or f16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        codes: &candle_core::CudaStorage,
        codes_l: &Layout,
        stats: &candle_core::CudaStorage,
        stats_l: &Layout,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        if !self.blocksize.is_multiple_of(16) {
            candle_core::bail!("nf4 dequantize on CUDA needs a blocksize multiple of 16");
        }
        let dev = dst.device().clone();
        let (c0, c1) = codes_l.contiguous_offsets().expect("contiguous codes");
        let (s0, s1) = stats_l.contiguous_offsets().expect("contiguous stats");
        let (d0, d1) = dst_l.contiguous_offsets().expect("contiguous output");
        let codes = codes.as_cuda_slice::<u8>()?.slice(c0..c1);
        let stats = stats.as_cuda_slice::<f32>()?.slice(s0..s1);
        let kind = match dst.dtype() {
            DType::BF16 => crate::FloatKind::Bf16,
            DType::F16 => crate::FloatKind::F16,
            DType::F32 => crate::FloatKind::F32,
            other => candle_core::bail!("nf4 dequantize: output dtype {other:?} unsupported"),
        };
        let shape = dequant_kernel().launch_shape(kind, self.numel);
        let kname = shape.kernel;
        let cfg = LaunchConfig {
            grid_dim: (shape.blocks, 1, 1),
            block_dim: (shape.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let numel = self.numel as u64;
        let blocksize = self.blocksize as u32;
        let nested = self.nested_blocksize as u32;
        let dq = self.double_quant as u32;
        match dst.dtype() {
            DType::BF16 => {
                let func = dev.get_or_load_custom_func(kname, "qtrain_nf4", crate::ptx::NF4)?;
                let mut out = dst.as_cuda_slice_mut::<half::bf16>()?.slice_mut(d0..d1);
                let mut b = func.builder();
                b.arg(&codes);
                b.arg(&stats);
                b.arg(&mut out);
                candle_core::builder_arg!(b, numel, blocksize, nested, dq);
                // SAFETY: argument types match the kernel signature; the grid covers
                // every code byte, each thread bounds-checked.
                unsafe { b.launch(cfg) }.w()?;
            }
            DType::F16 => {
                let func = dev.get_or_load_custom_func(kname, "qtrain_nf4", crate::ptx::NF4)?;
                let mut out = dst.as_cuda_slice_mut::<half::f16>()?.slice_mut(d0..d1);
                let mut b = func.builder();
                b.arg(&codes);
                b.arg(&stats);
                b.arg(&mut out);
                candle_core::builder_arg!(b, numel, blocksize, nested, dq);
                // SAFETY: as above.
                unsafe { b.launch(cfg) }.w()?;
            }
            DType::F32 => {
                let func = dev.get_or_load_custom_func(kname, "qtrain_nf4", crate::ptx::NF4)?;
                let mut out = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d1);
                let mut b = func.builder();
                b.arg(&codes);
                b.arg(&stats);
                b.arg(&mut out);
                candle_core::builder_arg!(b, numel, blocksize, nested, dq);
                // SAFETY: as above.
                unsafe { b.launch(cfg) }.w()?;
            }
            other => candle_core::bail!("nf4 dequantize: output dtype {other:?} unsupported"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_weight(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..rows * cols)
            .map(|_| rng.random_range(-0.05f32..0.05))
            .collect()
    }

    #[test]
    fn cpu_op_matches_quant_reference_with_and_without_double_quant() {
        for (dq, rows, cols) in [(true, 48, 320), (false, 33, 64), (true, 7, 9)] {
            let w = random_weight(rows, cols, rows as u64);
            let q = Nf4Tensor::quantize(&w, &[rows, cols], 64, dq).unwrap();
            let want = q.dequantize_to_vec();
            let dev = Nf4Device::from_host(&q, &Device::Cpu).unwrap();
            let got: Vec<f32> = dev
                .dequantize(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, want, "dq={dq} {rows}x{cols}");
            let got_bf16: Vec<half::bf16> = dev
                .dequantize(DType::BF16)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (g, w) in got_bf16.iter().zip(&want) {
                assert_eq!(*g, half::bf16::from_f32(*w));
            }
        }
    }

    #[test]
    fn buffer_is_reused_and_checked() {
        let w = random_weight(16, 64, 1);
        let q = Nf4Tensor::quantize(&w, &[16, 64], 64, true).unwrap();
        let dev = Nf4Device::from_host(&q, &Device::Cpu).unwrap();
        let buf = Tensor::zeros((16, 64), DType::F32, &Device::Cpu).unwrap();
        dev.dequantize_into(&buf).unwrap();
        let first: Vec<f32> = buf.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(first, q.dequantize_to_vec());
        let wrong = Tensor::zeros((16, 63), DType::F32, &Device::Cpu).unwrap();
        let err = dev.dequantize_into(&wrong).unwrap_err().to_string();
        assert!(err.contains("1008") && err.contains("1024"), "{err}");
    }

    /// The kernel source carries its own copy of the codebook (constant memory); it
    /// must be the same numbers as the CPU reference's.
    #[test]
    fn kernel_codebook_equals_reference() {
        let src = include_str!("../../../kernels/nf4.cu");
        let start = src.find("NF4_CODE[16] = {").expect("codebook in nf4.cu") + 16;
        let end = start + src[start..].find("};").unwrap();
        let values: Vec<f32> = src[start..end]
            .split(',')
            .map(|s| s.trim().trim_end_matches('f').parse::<f32>().unwrap())
            .collect();
        assert_eq!(values.as_slice(), NF4_CODE.as_slice());
    }

    /// The tile launch's constants are those the kernel source was written for, and
    /// every launch shape covers all weights (a partial last tile or chunk included).
    #[test]
    fn launch_shapes_cover_every_weight() {
        let src = include_str!("../../../kernels/nf4.cu");
        let constant = |name: &str| -> usize {
            let at = src.find(&format!("constexpr int {name} = ")).expect(name) + name.len() + 17;
            src[at..at + src[at..].find(';').unwrap()]
                .trim()
                .parse()
                .unwrap()
        };
        let tile_threads = constant("NF4_CTA_THREADS");
        let tile_weights = tile_threads * constant("NF4_CTA_CHUNKS") * 16;
        use crate::FloatKind::{Bf16, F16, F32};
        for numel in [16, 48, 4096, 4112, 12480, 4096 * 14336] {
            for k in DequantKernel::ALL {
                for kind in [Bf16, F16, F32] {
                    let s = k.launch_shape(kind, numel);
                    let per_block = if s.kernel.ends_with("_tile") {
                        assert_eq!(s.threads as usize, tile_threads, "{}", s.kernel);
                        tile_weights
                    } else {
                        s.threads as usize * 16
                    };
                    let covered = s.blocks as usize * per_block;
                    assert!(
                        covered >= numel && covered < numel + per_block,
                        "{} {numel}",
                        s.kernel
                    );
                    // The kernel is instantiated in the source under that name.
                    let s_name = s.kernel.trim_start_matches("nf4_dequant_");
                    let (ty, macro_) = match s_name.trim_end_matches("_tile") {
                        "bf16" => ("__nv_bfloat16", "QT_NF4"),
                        "f16" => ("__half", "QT_NF4"),
                        "f32" => ("float", "QT_NF4"),
                        other => panic!("unexpected kernel {other}"),
                    };
                    let macro_ = if s_name.ends_with("_tile") {
                        "QT_NF4_TILE"
                    } else {
                        macro_
                    };
                    let inst = format!("{macro_}({ty}, {})", s_name.trim_end_matches("_tile"));
                    assert!(src.contains(&inst), "{inst} not in nf4.cu");
                }
            }
        }
        assert_eq!(
            DequantKernel::Tile.launch_shape(F32, 64).kernel,
            "nf4_dequant_f32_tile"
        );
        assert_eq!(
            DequantKernel::Chunk8.launch_shape(F32, 64).kernel,
            "nf4_dequant_f32"
        );
        assert_eq!(
            DequantKernel::Tile.launch_shape(Bf16, 64).kernel,
            "nf4_dequant_bf16_tile"
        );
        assert_eq!(
            DequantKernel::Chunk8.launch_shape(F16, 64).kernel,
            "nf4_dequant_f16"
        );
    }

    #[test]
    fn kernel_choice_parses() {
        assert_eq!("tile".parse::<DequantKernel>(), Ok(DequantKernel::Tile));
        assert_eq!("chunk8".parse::<DequantKernel>(), Ok(DequantKernel::Chunk8));
        let err = "chunk8x4".parse::<DequantKernel>().unwrap_err();
        assert!(err.contains("chunk8x4") && err.contains("tile"), "{err}");
    }
}
