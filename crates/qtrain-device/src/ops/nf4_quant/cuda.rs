//! The CUDA side of [`super::quantize`]: the launches of `nf4_quant.cu`'s per-weight
//! kernel and of the nested 8-bit quantization of the absmax values, and the
//! assembly of the host and device results.

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

pub(super) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4_quant.ptx"));
const MODULE: &str = "qtrain_nf4_quant";
/// Threads per CTA of both kernels (`nf4_double_quant` requires exactly 256: one
/// thread per value of a nested block).
const THREADS: u32 = 256;

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
pub(super) fn run_stage1(
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
        DType::F16 => launch1::<half::f16>(&dev, "nf4_quant_f16", cs, o0..o1, out, blocksize, cfg),
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
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
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
        let func = dev.get_or_load_custom_func("nf4_double_quant", MODULE, PTX)?;
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
