//! NF4 quantization (with optional double quantization) of a weight already on the
//! compute device, bit-exact with `qtrain_quant::Nf4Tensor::quantize`.
//!
//! [`quantize`] takes a bf16, f16 or f32 tensor and returns both forms the loader keeps:
//! the host [`Nf4Tensor`] (for the bitsandbytes cache) and the [`Nf4Device`] the training
//! step dequantizes from. On the CPU it *is* the reference: it calls qtrain-quant. On CUDA
//! the kernels of `kernels/nf4_quant.cu` do all the per-weight work (absmax of every block,
//! the 4-bit codes, the packing) and the nested 8-bit quantization of the absmax values;
//! the host computes one number, the double-quantization offset, because its torch-exact
//! value is a compensated f64 sum ([`qtrain_quant::torch_cuda_mean_f32`]) over one f32
//! per 64 weights, and downloads the quantized result once for the host copy.
//!
//! `selftest` (with the `cuda` feature; run by `qtrain doctor`) checks the GPU path byte
//! for byte against the CPU quantizer on random matrices and times it.

use crate::Nf4Device;
use candle_core::{DType, Tensor};
use qtrain_quant::{Nf4Tensor, QuantError, NF4_BLOCKSIZES};

/// Why a tensor could not be quantized.
#[derive(Debug, thiserror::Error)]
pub enum Nf4QuantizeError {
    /// Bad blocksize or a NaN/Inf weight (with its index), as the CPU quantizer reports.
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("nf4 quantize: dtype {0:?} is not a float type the quantizer reads (bf16, f16, f32)")]
    Dtype(DType),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Quantizes `x` (any shape, row-major order) like bitsandbytes' `quantize_4bit`, on the
/// device `x` lives on. The result's shape is `x`'s.
pub fn quantize(
    x: &Tensor,
    blocksize: usize,
    double_quant: bool,
) -> Result<(Nf4Tensor, Nf4Device), Nf4QuantizeError> {
    if !matches!(x.dtype(), DType::BF16 | DType::F16 | DType::F32) {
        return Err(Nf4QuantizeError::Dtype(x.dtype()));
    }
    if !NF4_BLOCKSIZES.contains(&blocksize) {
        return Err(QuantError::BadBlocksize(blocksize).into());
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.elem_count() > 0 {
        return cuda::quantize(x, blocksize, double_quant, cuda::MAX_GRID);
    }
    quantize_reference(x, blocksize, double_quant)
}

/// The CPU path and the oracle of the kernels: widen to f32 on the host (exact for bf16
/// and f16) and run qtrain-quant's quantizer.
fn quantize_reference(
    x: &Tensor,
    blocksize: usize,
    double_quant: bool,
) -> Result<(Nf4Tensor, Nf4Device), Nf4QuantizeError> {
    let data: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let q = Nf4Tensor::quantize(&data, x.dims(), blocksize, double_quant)?;
    drop(data);
    let d = Nf4Device::from_host(&q, x.device())?;
    Ok((q, d))
}

/// The 15 NF4 thresholds as written in kernels/nf4_quant.cu (parsed like Rust parses
/// f32 literals); tests check them against the CPU decision tree.
#[cfg(any(test, feature = "cuda"))]
fn kernel_thresholds() -> Vec<f32> {
    let src = include_str!("../../../kernels/nf4_quant.cu");
    let key = "NF4_THRESHOLDS[15] = {";
    let start = src.find(key).expect("thresholds in nf4_quant.cu") + key.len();
    let end = start + src[start..].find("};").expect("end of the thresholds");
    src[start..end]
        .split(',')
        .map(|s| {
            s.trim()
                .trim_end_matches('f')
                .parse::<f32>()
                .expect("a float literal")
        })
        .collect()
}

#[cfg(feature = "cuda")]
pub use cuda::selftest;

#[cfg(feature = "cuda")]
mod cuda {
    use super::Nf4QuantizeError;
    use crate::Nf4Device;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
    use qtrain_quant::{
        signed_dynamic_map, torch_cuda_mean_f32, Absmax, DoubleQuantAbsmax, Nf4Tensor, QuantError,
        NESTED_BLOCKSIZE,
    };

    const MODULE: &str = "qtrain_nf4_quant";
    /// Threads per CTA of both kernels (`nf4_double_quant` requires exactly 256: one
    /// thread per value of a nested block).
    const THREADS: u32 = 256;
    /// Grid cap; the kernels loop over the remaining blocks (a 4096 x 14336 matrix at
    /// blocksize 64 needs 28,672 CTAs, far below it).
    pub(super) const MAX_GRID: usize = 1 << 20;

    /// What the per-weight kernel leaves on the device.
    pub(super) struct Stage1 {
        /// Packed codes, with `tail` spare bytes after them for the 8-bit absmax codes.
        pub codes: CudaSlice<u8>,
        pub absmax: CudaSlice<f32>,
        first_bad: CudaSlice<u64>,
    }

    fn cuda_device(x: &Tensor) -> candle_core::Result<CudaDevice> {
        match x.device() {
            Device::Cuda(d) => Ok(d.clone()),
            other => candle_core::bail!("nf4 quantize: expected a CUDA tensor, got {other:?}"),
        }
    }

    fn wrap<T: CudaDType + DeviceRepr>(s: CudaSlice<T>, dev: &CudaDevice) -> Tensor {
        let n = s.len();
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
        Tensor::from_storage(storage, n, BackpropOp::none(), false)
    }

    /// Allocates the outputs and launches `nf4_quant_{bf16,f16,f32}` on contiguous `x`.
    pub(super) fn stage1(
        x: &Tensor,
        blocksize: usize,
        tail: usize,
        max_grid: usize,
    ) -> candle_core::Result<Stage1> {
        let dev = cuda_device(x)?;
        let numel = x.elem_count();
        let mut out = Stage1 {
            codes: dev.alloc_zeros::<u8>(numel.div_ceil(2) + tail)?,
            absmax: dev.alloc_zeros::<f32>(numel.div_ceil(blocksize))?,
            first_bad: dev.clone_htod(&[u64::MAX])?,
        };
        run_stage1(x, blocksize, max_grid, &mut out)?;
        Ok(out)
    }

    /// Launches the per-weight kernel into existing outputs (the self-test times this).
    fn run_stage1(
        x: &Tensor,
        blocksize: usize,
        max_grid: usize,
        out: &mut Stage1,
    ) -> candle_core::Result<()> {
        let dev = cuda_device(x)?;
        let n_blocks = x.elem_count().div_ceil(blocksize);
        // Lanes per quantization block, as the kernel derives it.
        let group = (blocksize / 8).min(32);
        let groups_per_cta = THREADS as usize / group;
        let cfg = LaunchConfig {
            grid_dim: (
                n_blocks.div_ceil(groups_per_cta).clamp(1, max_grid) as u32,
                1,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            candle_core::bail!("nf4 quantize: expected CUDA storage")
        };
        let Some((o0, o1)) = layout.contiguous_offsets() else {
            candle_core::bail!("nf4 quantize: input must be contiguous")
        };
        match x.dtype() {
            DType::BF16 => {
                launch1::<half::bf16>(&dev, "nf4_quant_bf16", cs, o0..o1, out, blocksize, cfg)
            }
            DType::F16 => {
                launch1::<half::f16>(&dev, "nf4_quant_f16", cs, o0..o1, out, blocksize, cfg)
            }
            DType::F32 => launch1::<f32>(&dev, "nf4_quant_f32", cs, o0..o1, out, blocksize, cfg),
            other => candle_core::bail!("nf4 quantize: dtype {other:?} unsupported"),
        }
    }

    fn launch1<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        x: &CudaStorage,
        range: std::ops::Range<usize>,
        out: &mut Stage1,
        blocksize: usize,
        cfg: LaunchConfig,
    ) -> candle_core::Result<()> {
        let numel = (range.end - range.start) as u64;
        let xs = x.as_cuda_slice::<T>()?.slice(range);
        let func = dev.get_or_load_custom_func(name, MODULE, crate::ptx::NF4_QUANT)?;
        let mut b = func.builder();
        b.arg(&xs);
        b.arg(&mut out.codes);
        b.arg(&mut out.absmax);
        b.arg(&mut out.first_bad);
        let blocksize = blocksize as u32;
        b.arg(&numel);
        b.arg(&blocksize);
        // SAFETY: the arguments match the kernel's signature (x: numel elements of T,
        // codes: >= ceil(numel/2) bytes, absmax: ceil(numel/blocksize) floats, one u64);
        // every access in the kernel is bounded by numel, n_bytes or n_blocks.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    /// The index of the first NaN/Inf weight the kernel saw, if any (synchronizes).
    fn first_non_finite(dev: &CudaDevice, s: &Stage1) -> candle_core::Result<Option<usize>> {
        let bad = dev.clone_dtoh(&s.first_bad)?[0];
        Ok((bad != u64::MAX).then_some(bad as usize))
    }

    pub(super) fn quantize(
        x: &Tensor,
        blocksize: usize,
        double_quant: bool,
        max_grid: usize,
    ) -> Result<(Nf4Tensor, Nf4Device), Nf4QuantizeError> {
        let dev = cuda_device(x)?;
        let shape = x.dims().to_vec();
        let numel = x.elem_count();
        let n_bytes = numel.div_ceil(2);
        let n_blocks = numel.div_ceil(blocksize);
        let tail = if double_quant { n_blocks } else { 0 };
        let s = stage1(&x.contiguous()?, blocksize, tail, max_grid)?;
        if let Some(index) = first_non_finite(&dev, &s)? {
            return Err(QuantError::NonFinite { index }.into());
        }
        let Stage1 {
            mut codes, absmax, ..
        } = s;
        if !double_quant {
            let host = Nf4Tensor {
                shape: shape.clone(),
                blocksize,
                packed: dev.clone_dtoh(&codes)?,
                absmax: Absmax::F32(dev.clone_dtoh(&absmax)?),
            };
            let device = Nf4Device {
                codes: wrap(codes, &dev),
                stats: wrap(absmax, &dev),
                shape,
                blocksize,
                nested_blocksize: 1,
                double_quant: false,
            };
            return Ok((host, device));
        }
        // Double quantization: the offset on the host (see the module docs), the nested
        // 8-bit quantization on the device, into stats = [offset, code, nested_absmax]
        // and the spare tail of `codes`.
        let offset = torch_cuda_mean_f32(&dev.clone_dtoh(&absmax)?);
        let code = signed_dynamic_map();
        let n_nested = n_blocks.div_ceil(NESTED_BLOCKSIZE);
        let mut stats = dev.alloc_zeros::<f32>(1 + 256 + n_nested)?;
        let mut head = Vec::with_capacity(257);
        head.push(offset);
        head.extend_from_slice(code);
        dev.memcpy_htod(&head, &mut stats.slice_mut(0..257))?;
        {
            let func =
                dev.get_or_load_custom_func("nf4_double_quant", MODULE, crate::ptx::NF4_QUANT)?;
            let mut qabsmax = codes.slice_mut(n_bytes..);
            let n = n_blocks as u64;
            let cfg = LaunchConfig {
                grid_dim: (n_nested.clamp(1, max_grid) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = func.builder();
            b.arg(&absmax);
            b.arg(&n);
            b.arg(&offset);
            b.arg(&mut stats);
            b.arg(&mut qabsmax);
            // SAFETY: absmax has n_blocks floats, stats 257 + ceil(n_blocks/256), qabsmax
            // n_blocks bytes; the kernel bounds every index by n_blocks and needs exactly
            // 256 threads per CTA, which THREADS is.
            unsafe { b.launch(cfg) }.w()?;
        }
        drop(absmax);
        let host = Nf4Tensor {
            shape: shape.clone(),
            blocksize,
            packed: dev.clone_dtoh(&codes.slice(..n_bytes))?,
            absmax: Absmax::DoubleQuant(DoubleQuantAbsmax {
                quantized: dev.clone_dtoh(&codes.slice(n_bytes..))?,
                nested_absmax: dev.clone_dtoh(&stats.slice(257..))?,
                nested_code: code.to_vec(),
                offset,
                nested_blocksize: NESTED_BLOCKSIZE,
            }),
        };
        let device = Nf4Device {
            codes: wrap(codes, &dev),
            stats: wrap(stats, &dev),
            shape,
            blocksize,
            nested_blocksize: NESTED_BLOCKSIZE,
            double_quant: true,
        };
        Ok((host, device))
    }

    /// splitmix64: a few lines of deterministic randomness (no dependency for doctor).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Input {
        /// Random rows of very different scales, with some exact zeros.
        Random,
        /// Random, with block 3 and the (partial) last block all zero.
        ZeroBlocks,
        /// +-0.5 everywhere: every absmax equals the offset, so every nested block is
        /// all zero (the NaN path of the 8-bit search).
        Constant,
        /// A view starting 3 elements into its buffer (unaligned: the scalar loads).
        Unaligned,
        /// A transposed (non-contiguous) view.
        Transposed,
        /// Blocks whose absmax is a power of two and whose other values are the NF4
        /// thresholds times it and their f32 neighbours: normalized values land exactly
        /// on the thresholds, where only strict `>` gives the CPU's codes (f32 only).
        Ties,
    }

    struct Case {
        rows: usize,
        cols: usize,
        dtype: DType,
        blocksize: usize,
        double_quant: bool,
        input: Input,
        max_grid: usize,
    }

    /// `rows x cols` values, already rounded to `dtype` (so the f32 host copy is exactly
    /// what the device holds).
    fn make_data(rows: usize, cols: usize, dtype: DType, input: Input, seed: u64) -> Vec<f32> {
        let mut rng = Rng(seed);
        // 1e-30 underflows to zero in f16 (all-zero blocks); 1e-39 is subnormal in f32 and
        // bf16, so 1/absmax overflows to inf (denormals must not be flushed).
        let scales = [0.02f32, 1.0, 3e-3, 40.0, 1e-30, 1e-39];
        let mut v: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let r = i / cols;
                if input == Input::Constant {
                    if rng.next() & 1 == 0 {
                        0.5
                    } else {
                        -0.5
                    }
                } else if rng.next().is_multiple_of(97) {
                    0.0
                } else {
                    rng.unit() * scales[r % scales.len()]
                }
            })
            .collect();
        if input == Input::Ties {
            let t = super::kernel_thresholds();
            for (b, block) in v.chunks_mut(64).enumerate() {
                let scale = [1.0f32, 0.5, 1.0 / 1024.0, 8.0][b % 4];
                for (j, x) in block.iter_mut().enumerate().skip(1) {
                    let t = t[(j - 1) / 3 % 15];
                    let t = match (j - 1) % 3 {
                        0 => t,
                        1 => f32::from_bits(t.to_bits() + 1),
                        _ => f32::from_bits(t.to_bits() - 1),
                    };
                    *x = t * scale;
                }
                block[0] = scale;
            }
        }
        if input == Input::ZeroBlocks {
            let bs = 64.min(v.len());
            v[3 * bs..4 * bs].fill(0.0);
            let last = (v.len() - 1) / bs * bs;
            v[last..].fill(0.0);
        }
        round_to(&mut v, dtype);
        v
    }

    fn round_to(v: &mut [f32], dtype: DType) {
        match dtype {
            DType::BF16 => v
                .iter_mut()
                .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
            DType::F16 => v
                .iter_mut()
                .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
            _ => {}
        }
    }

    /// The device tensor holding `data` as `dtype`, laid out as `input` asks. The dtype
    /// conversion happens on the host (exact: `data` is already rounded to `dtype`), so
    /// the device holds exactly the CPU oracle's input.
    fn upload(
        data: &[f32],
        rows: usize,
        cols: usize,
        dtype: DType,
        input: Input,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let host = |v: &[f32]| -> candle_core::Result<Tensor> {
            Tensor::from_slice(v, v.len(), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)
        };
        match input {
            Input::Unaligned => {
                let mut padded = vec![0.25f32; 3];
                padded.extend_from_slice(data);
                host(&padded)?
                    .narrow(0, 3, data.len())?
                    .reshape((rows, cols))
            }
            Input::Transposed => host(data)?.reshape((rows, cols))?.t()?.contiguous()?.t(),
            _ => host(data)?.reshape((rows, cols)),
        }
    }

    /// The first difference between two byte/bit sequences, if any.
    fn first_diff<T: PartialEq + std::fmt::Debug>(what: &str, a: &[T], b: &[T]) -> Option<String> {
        if a.len() != b.len() {
            return Some(format!(
                "{what}: {} entries vs {} on the CPU",
                a.len(),
                b.len()
            ));
        }
        a.iter()
            .zip(b)
            .position(|(x, y)| x != y)
            .map(|i| format!("{what}[{i}]: gpu {:?} vs cpu {:?}", a[i], b[i]))
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Compares the GPU result with the CPU quantizer's, field by field and byte for
    /// byte, then the device buffers with those `Nf4Device::from_host` builds, then the
    /// GPU dequantization of the result with the CPU's.
    fn compare(
        gpu: &(Nf4Tensor, Nf4Device),
        cpu: &Nf4Tensor,
    ) -> candle_core::Result<Option<String>> {
        let (g, d) = gpu;
        if g.shape != cpu.shape || g.blocksize != cpu.blocksize {
            return Ok(Some(format!(
                "shape/blocksize {:?}/{} vs {:?}/{}",
                g.shape, g.blocksize, cpu.shape, cpu.blocksize
            )));
        }
        if let Some(e) = first_diff("packed", &g.packed, &cpu.packed) {
            return Ok(Some(e));
        }
        let e = match (&g.absmax, &cpu.absmax) {
            (Absmax::F32(a), Absmax::F32(b)) => first_diff("absmax bits", &bits(a), &bits(b)),
            (Absmax::DoubleQuant(a), Absmax::DoubleQuant(b)) => {
                if a.offset.to_bits() != b.offset.to_bits() {
                    Some(format!("offset: gpu {:e} vs cpu {:e}", a.offset, b.offset))
                } else if a.nested_blocksize != b.nested_blocksize {
                    Some("nested blocksize differs".to_string())
                } else {
                    first_diff("quantized absmax", &a.quantized, &b.quantized)
                        .or_else(|| {
                            first_diff(
                                "nested absmax bits",
                                &bits(&a.nested_absmax),
                                &bits(&b.nested_absmax),
                            )
                        })
                        .or_else(|| {
                            first_diff(
                                "nested code bits",
                                &bits(&a.nested_code),
                                &bits(&b.nested_code),
                            )
                        })
                }
            }
            _ => Some("absmax kind differs (double quant vs plain)".to_string()),
        };
        if e.is_some() {
            return Ok(e);
        }
        let want = Nf4Device::from_host(cpu, &Device::Cpu)?;
        if (
            d.shape.as_slice(),
            d.blocksize,
            d.nested_blocksize,
            d.double_quant,
        ) != (
            want.shape.as_slice(),
            want.blocksize,
            want.nested_blocksize,
            want.double_quant,
        ) {
            return Ok(Some(
                "device descriptor differs from from_host's".to_string(),
            ));
        }
        let e = first_diff(
            "device codes",
            &d.codes.to_vec1::<u8>()?,
            &want.codes.to_vec1::<u8>()?,
        )
        .or(first_diff(
            "device stats bits",
            &bits(&d.stats.to_vec1::<f32>()?),
            &bits(&want.stats.to_vec1::<f32>()?),
        ));
        if e.is_some() {
            return Ok(e);
        }
        let back: Vec<f32> = d.dequantize(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(first_diff(
            "gpu dequantized bits",
            &bits(&back),
            &bits(&cpu.dequantize_to_vec()),
        ))
    }

    fn run_case(device: &Device, c: &Case, seed: u64) -> candle_core::Result<(bool, String)> {
        let data = make_data(c.rows, c.cols, c.dtype, c.input, seed);
        let cpu = Nf4Tensor::quantize(&data, &[c.rows, c.cols], c.blocksize, c.double_quant)
            .map_err(candle_core::Error::wrap)?;
        let x = upload(&data, c.rows, c.cols, c.dtype, c.input, device)?;
        let gpu = quantize(&x, c.blocksize, c.double_quant, c.max_grid)
            .map_err(candle_core::Error::wrap)?;
        Ok(match compare(&gpu, &cpu)? {
            None => (
                true,
                format!(
                    "identical ({} weights, {} code bytes, {} blocks)",
                    data.len(),
                    cpu.packed.len(),
                    data.len().div_ceil(c.blocksize)
                ),
            ),
            Some(e) => (false, e),
        })
    }

    /// A NaN/Inf weight must be refused with the CPU's error (the first bad index).
    fn run_non_finite(
        device: &Device,
        dtype: DType,
        bad: &[(usize, f32)],
    ) -> candle_core::Result<(bool, String)> {
        let (rows, cols) = (37, 101);
        let mut data = make_data(rows, cols, dtype, Input::Random, 99);
        for &(i, v) in bad {
            data[i] = v;
        }
        let want = match Nf4Tensor::quantize(&data, &[rows, cols], 64, true) {
            Err(QuantError::NonFinite { index }) => index,
            other => candle_core::bail!("CPU quantizer did not refuse: {:?}", other.map(|_| ())),
        };
        let x = upload(&data, rows, cols, dtype, Input::Random, device)?;
        Ok(match quantize(&x, 64, true, MAX_GRID) {
            Err(Nf4QuantizeError::Quant(QuantError::NonFinite { index })) if index == want => (
                true,
                format!("refused, first bad index {index} as on the CPU"),
            ),
            Err(e) => (false, format!("wrong error: {e} (cpu: index {want})")),
            Ok(_) => (
                false,
                format!("accepted a tensor with a non-finite value at {want}"),
            ),
        })
    }

    /// Quantizes a 4096 x 14336 bf16 matrix (Mistral-7B's largest projection) on the GPU
    /// and the CPU, compares, and times the GPU: the per-weight kernel alone (GB/s over
    /// the bytes it must move) and the whole `quantize` call with its downloads.
    fn run_large(device: &Device, double_quant: bool) -> candle_core::Result<(bool, String)> {
        let (rows, cols, bs) = (4096usize, 14336usize, 64usize);
        let data = make_data(rows, cols, DType::BF16, Input::Random, 4096);
        let t = std::time::Instant::now();
        let cpu = Nf4Tensor::quantize(&data, &[rows, cols], bs, double_quant)
            .map_err(candle_core::Error::wrap)?;
        let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
        let x = upload(&data, rows, cols, DType::BF16, Input::Random, device)?;
        drop(data);
        let gpu = quantize(&x, bs, double_quant, MAX_GRID).map_err(candle_core::Error::wrap)?;
        let mismatch = compare(&gpu, &cpu)?;
        drop(gpu);
        let numel = rows * cols;
        let iters = 20;
        let mut outputs = stage1(&x, bs, 0, MAX_GRID)?;
        device.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            run_stage1(&x, bs, MAX_GRID, &mut outputs)?;
        }
        device.synchronize()?;
        drop(outputs);
        let kernel_s = t.elapsed().as_secs_f64() / iters as f64;
        let moved = (2 * numel + numel.div_ceil(2) + 4 * numel.div_ceil(bs)) as f64;
        let t = std::time::Instant::now();
        for _ in 0..5 {
            drop(quantize(&x, bs, double_quant, MAX_GRID).map_err(candle_core::Error::wrap)?);
        }
        device.synchronize()?;
        let full_ms = t.elapsed().as_secs_f64() * 1e3 / 5.0;
        let timing = format!(
            "kernel {:.1} us ({:.0} GB/s), whole quantize with downloads {full_ms:.2} ms, CPU quantizer {cpu_ms:.0} ms",
            kernel_s * 1e6,
            moved / kernel_s / 1e9
        );
        Ok(match mismatch {
            None => (true, format!("identical; {timing}")),
            Some(e) => (false, format!("{e}; {timing}")),
        })
    }

    /// GPU NF4 quantization against the CPU quantizer, byte for byte: random matrices of
    /// odd and even sizes in bf16, f16 and f32, every blocksize with and without double
    /// quantization, zero blocks, constant input, unaligned and transposed views, a grid
    /// small enough to make the kernels loop, NaN/Inf refusal, and the timed 4096 x 14336
    /// case. Each entry is (name, ok, detail); `qtrain doctor` prints them.
    pub fn selftest(device: &Device) -> Vec<(String, bool, String)> {
        use Input::*;
        let case = |rows, cols, dtype, blocksize, double_quant, input| Case {
            rows,
            cols,
            dtype,
            blocksize,
            double_quant,
            input,
            max_grid: MAX_GRID,
        };
        let mut cases = vec![
            case(7, 9, DType::F32, 64, true, Random),
            case(1001, 37, DType::F16, 64, false, Random),
            case(1001, 37, DType::BF16, 64, true, Random),
            case(257, 4096, DType::BF16, 64, true, Random),
            case(1024, 1024, DType::BF16, 64, false, Random),
            case(65, 129, DType::F32, 64, true, ZeroBlocks),
            case(65, 129, DType::BF16, 64, false, ZeroBlocks),
            case(64, 64, DType::BF16, 64, true, Constant),
            case(333, 77, DType::BF16, 64, true, Unaligned),
            case(333, 77, DType::F32, 128, false, Unaligned),
            case(300, 200, DType::F16, 64, true, Transposed),
            case(129, 65, DType::F32, 64, true, Ties),
            case(129, 65, DType::F32, 64, false, Ties),
        ];
        for (k, &bs) in qtrain_quant::NF4_BLOCKSIZES.iter().enumerate() {
            cases.push(case(333, 77, DType::F32, bs, k % 2 == 0, Random));
            cases.push(case(129, 515, DType::BF16, bs, k % 2 == 1, Random));
        }
        cases.push(Case {
            max_grid: 3,
            ..case(1000, 77, DType::F32, 32, true, Random)
        });
        cases.push(Case {
            max_grid: 2,
            ..case(999, 555, DType::BF16, 1024, false, Random)
        });
        let mut out = Vec::new();
        let report = |out: &mut Vec<(String, bool, String)>,
                      name: String,
                      r: candle_core::Result<(bool, String)>| {
            let (ok, detail) = r.unwrap_or_else(|e| (false, format!("error: {e}")));
            out.push((name, ok, detail));
        };
        for (i, c) in cases.iter().enumerate() {
            let name = format!(
                "{}x{} {:?} blocksize {} {}{}{}",
                c.rows,
                c.cols,
                c.dtype,
                c.blocksize,
                if c.double_quant {
                    "double-quant"
                } else {
                    "plain"
                },
                match c.input {
                    Random => "",
                    ZeroBlocks => ", zero blocks",
                    Constant => ", constant",
                    Unaligned => ", unaligned view",
                    Transposed => ", transposed view",
                    Ties => ", values on the thresholds",
                },
                if c.max_grid < MAX_GRID {
                    format!(", grid capped at {}", c.max_grid)
                } else {
                    String::new()
                }
            );
            report(&mut out, name, run_case(device, c, i as u64 + 1));
        }
        report(
            &mut out,
            "NaN/Inf refused (bf16)".into(),
            run_non_finite(
                device,
                DType::BF16,
                &[(2000, f32::INFINITY), (1234, f32::NAN)],
            ),
        );
        report(
            &mut out,
            "Inf in the last element refused (f32)".into(),
            run_non_finite(device, DType::F32, &[(37 * 101 - 1, f32::NEG_INFINITY)]),
        );
        for dq in [true, false] {
            report(
                &mut out,
                format!(
                    "4096x14336 BF16 blocksize 64 {}",
                    if dq { "double-quant" } else { "plain" }
                ),
                run_large(device, dq),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use qtrain_quant::quantize_nf4_value;
    use rand::{Rng, SeedableRng};

    /// Random values of mixed scales, rounded to `dtype` so the f32 copy is exact.
    fn data(n: usize, dtype: DType, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let v = rng.random_range(-1.0f32..1.0) * [0.05f32, 2.0, 1e-3][i % 3];
                match dtype {
                    DType::BF16 => half::bf16::from_f32(v).to_f32(),
                    DType::F16 => half::f16::from_f32(v).to_f32(),
                    _ => v,
                }
            })
            .collect()
    }

    fn buffers(d: &Nf4Device) -> (Vec<u8>, Vec<u32>) {
        let stats: Vec<f32> = d.stats.to_vec1().unwrap();
        (
            d.codes.to_vec1().unwrap(),
            stats.iter().map(|x| x.to_bits()).collect(),
        )
    }

    #[test]
    fn cpu_path_equals_quantizer_for_every_dtype() {
        let shapes: [&[usize]; 4] = [&[7, 9], &[33, 64], &[1001, 37], &[3, 5, 64]];
        for (k, dtype) in [DType::F32, DType::BF16, DType::F16]
            .into_iter()
            .enumerate()
        {
            for (s, shape) in shapes.iter().enumerate() {
                let n: usize = shape.iter().product();
                let v = data(n, dtype, (k * 10 + s) as u64);
                let x = Tensor::from_slice(&v, *shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                for (bs, dq) in [(64, true), (64, false), (32, true), (256, false)] {
                    let (q, d) = quantize(&x, bs, dq).unwrap();
                    let want = Nf4Tensor::quantize(&v, shape, bs, dq).unwrap();
                    assert_eq!(q, want, "{dtype:?} {shape:?} bs {bs} dq {dq}");
                    let want_d = Nf4Device::from_host(&want, &Device::Cpu).unwrap();
                    assert_eq!(buffers(&d), buffers(&want_d));
                    assert_eq!(
                        (&d.shape, d.blocksize, d.nested_blocksize, d.double_quant),
                        (
                            &want_d.shape,
                            want_d.blocksize,
                            want_d.nested_blocksize,
                            want_d.double_quant
                        )
                    );
                }
            }
        }
    }

    #[test]
    fn non_contiguous_input_is_quantized_in_logical_order() {
        let v = data(48 * 80, DType::F32, 5);
        let x = Tensor::from_slice(&v, (48, 80), &Device::Cpu).unwrap();
        let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!xt.is_contiguous());
        let (q, _) = quantize(&xt, 64, true).unwrap();
        assert_eq!(q, Nf4Tensor::quantize(&v, &[48, 80], 64, true).unwrap());
    }

    #[test]
    fn bad_inputs_get_clear_errors() {
        let x = Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap();
        let Err(e) = quantize(&x, 48, true) else {
            panic!("accepted a bad input")
        };
        assert!(
            matches!(e, Nf4QuantizeError::Quant(QuantError::BadBlocksize(48))),
            "{e}"
        );
        assert!(e.to_string().contains("blocksize 48"), "{e}");
        let Err(e) = quantize(&x.to_dtype(DType::U8).unwrap(), 64, true) else {
            panic!("accepted a bad input")
        };
        assert!(matches!(e, Nf4QuantizeError::Dtype(DType::U8)), "{e}");
        assert!(
            e.to_string().contains("U8") && e.to_string().contains("bf16"),
            "{e}"
        );
        let mut v = data(256, DType::BF16, 1);
        v[77] = f32::NAN;
        v[200] = f32::INFINITY;
        let x = Tensor::from_slice(&v, (4, 64), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let Err(e) = quantize(&x, 64, false) else {
            panic!("accepted a bad input")
        };
        assert!(
            matches!(
                e,
                Nf4QuantizeError::Quant(QuantError::NonFinite { index: 77 })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("index 77"), "{e}");
    }

    /// The kernel counts the thresholds below x; they must be exactly the decision
    /// tree's constants: each one goes to the lower code, the next f32 up to the higher.
    #[test]
    fn kernel_thresholds_equal_the_decision_tree() {
        let t = kernel_thresholds();
        assert_eq!(t.len(), 15);
        for (k, &t) in t.iter().enumerate() {
            assert_eq!(quantize_nf4_value(t) as usize, k, "threshold {k}");
            let up = if t > 0.0 {
                f32::from_bits(t.to_bits() + 1)
            } else {
                f32::from_bits(t.to_bits() - 1)
            };
            assert_eq!(
                quantize_nf4_value(up) as usize,
                k + 1,
                "above threshold {k}"
            );
        }
    }

    /// nvcc must have rounded the decimals to the same f32 values (the PTX stores the
    /// constant table as bytes). Needs only the PTX, not a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn ptx_thresholds_are_the_same_f32_bits() {
        let ptx = crate::ptx::NF4_QUANT;
        let start = ptx.find("NF4_THRESHOLDS[60] = {").expect("table in PTX") + 22;
        let end = start + ptx[start..].find('}').unwrap();
        let bytes: Vec<u8> = ptx[start..end]
            .split(',')
            .map(|s| s.trim().parse().unwrap())
            .collect();
        let got: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let want: Vec<u32> = kernel_thresholds().iter().map(|t| t.to_bits()).collect();
        assert_eq!(got, want);
    }
}
