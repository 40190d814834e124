//! The CUDA side of [`crate::Dev`]: raw device allocations on candle's stream,
//! copies, kernel loading and launching, and the cuBLAS handle.
//!
//! Allocations are stream-ordered (`cuMemAllocAsync` / `cuMemFreeAsync` from the
//! driver's pool), so freeing a buffer while kernels that use it are still queued
//! is safe and re-allocating the same sizes every step costs no driver round trip.
//! We pass raw device addresses to kernels instead of cudarc's tracked slices: all
//! of our work runs on one stream, so cudarc's per-slice events would only add
//! overhead.

use crate::error::{KernelError, Result};
use candle_core::cuda_backend::cudarc;
use cudarc::driver::{result as drv, sys, CudaFunction, CudaModule, CudaStream, LaunchConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use cudarc::driver::{LaunchArgs, PushKernelArg};

pub(crate) fn cuda_err(op: &'static str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda {
        op,
        msg: format!("{e:?}"),
    }
}

/// One GPU as the kernels see it.
pub struct CudaDev {
    candle: candle_core::CudaDevice,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    funcs: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

/// An owned device allocation, freed on the stream when dropped.
pub(crate) struct DeviceMem {
    ptr: u64,
    stream: Arc<CudaStream>,
}

// SAFETY: a raw device address; the stream handle is thread-safe.
unsafe impl Send for DeviceMem {}

impl DeviceMem {
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated by malloc_async on this stream; later frees are ordered
            // after all work queued so far on the stream.
            let _ = unsafe { drv::free_async(self.ptr, self.stream.cu_stream()) };
        }
    }
}

/// The device address of a contiguous candle CUDA tensor's first element, `T` being
/// its element type (the caller checked the dtype). Matching on the storage variant
/// instead of going through candle's `CudaDType` keeps the callers generic over our
/// own `Elem` types alone.
pub(crate) fn tensor_dptr<T>(t: &candle_core::Tensor) -> Result<u64> {
    use candle_core::cuda_backend::CudaStorageSlice as S;
    use cudarc::driver::{CudaSlice, DevicePtr};
    fn ptr<E>(s: &CudaSlice<E>) -> u64 {
        let (p, _guard) = s.device_ptr(s.stream());
        p
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        return Err(KernelError::Unsupported {
            op: "borrow tensor",
            msg: "tensor is not on a CUDA device".into(),
        });
    };
    let base = match &s.slice {
        S::U8(x) | S::F6E2M3(x) | S::F6E3M2(x) | S::F4(x) | S::F8E8M0(x) => ptr(x),
        S::U32(x) => ptr(x),
        S::I16(x) => ptr(x),
        S::I32(x) => ptr(x),
        S::I64(x) => ptr(x),
        S::BF16(x) => ptr(x),
        S::F16(x) => ptr(x),
        S::F32(x) => ptr(x),
        S::F64(x) => ptr(x),
        S::F8E4M3(x) => ptr(x),
    };
    Ok(base + (layout.start_offset() * std::mem::size_of::<T>()) as u64)
}

impl CudaDev {
    pub(crate) fn new(candle: candle_core::CudaDevice) -> Result<Self> {
        let stream = candle.cuda_stream();
        Ok(Self {
            candle,
            stream,
            modules: Mutex::default(),
            funcs: Mutex::default(),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.stream.context().ordinal()
    }

    pub fn candle(&self) -> &candle_core::CudaDevice {
        &self.candle
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `(major, minor)` compute capability.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.stream
            .context()
            .compute_capability()
            .map_err(|e| cuda_err("compute capability", e))
    }

    pub fn name(&self) -> Result<String> {
        self.stream
            .context()
            .name()
            .map_err(|e| cuda_err("device name", e))
    }

    pub(crate) fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        drv::mem_get_info().map_err(|e| cuda_err("cuMemGetInfo", e))
    }

    fn bind(&self) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))
    }

    pub(crate) fn alloc_zeroed(&self, bytes: usize, what: &str, held: usize) -> Result<DeviceMem> {
        self.bind()?;
        if bytes == 0 {
            return Ok(DeviceMem {
                ptr: 0,
                stream: self.stream.clone(),
            });
        }
        // SAFETY: plain stream-ordered allocation; zeroed below before any use.
        let ptr = unsafe { drv::malloc_async(self.stream.cu_stream(), bytes) }.map_err(|e| {
            if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                KernelError::OutOfMemory {
                    what: what.to_string(),
                    bytes,
                    held,
                }
            } else {
                cuda_err("cuMemAllocAsync", e)
            }
        })?;
        let mem = DeviceMem {
            ptr,
            stream: self.stream.clone(),
        };
        self.memset0(ptr, bytes)?;
        Ok(mem)
    }

    pub(crate) fn memset0(&self, ptr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `ptr..ptr + bytes` lies inside one of our allocations.
        unsafe { drv::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("cuMemsetD8Async", e))
    }

    pub(crate) fn htod<T>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the destination holds src.len() elements. The copy from pageable
        // memory is staged by the driver before the call returns, so `src` may go.
        unsafe { drv::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("cuMemcpyHtoDAsync", e))?;
        self.synchronize()
    }

    pub(crate) fn dtoh<T: Default + Clone>(&self, src: u64, len: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); len];
        if len == 0 {
            return Ok(out);
        }
        self.bind()?;
        // SAFETY: `src` holds `len` elements; we wait for the copy before returning.
        unsafe { drv::memcpy_dtoh_async(&mut out, src, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("cuMemcpyDtoHAsync", e))?;
        self.synchronize()?;
        Ok(out)
    }

    pub(crate) fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges lie inside our allocations and do not overlap.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("cuMemcpyDtoDAsync", e))
    }

    /// The kernel `name` of the PTX module `module` (loaded once, then cached).
    pub fn func(
        &self,
        module: &'static str,
        ptx: &'static str,
        name: &'static str,
    ) -> Result<CudaFunction> {
        if let Some(f) = self.funcs.lock().unwrap().get(&(module, name)) {
            return Ok(f.clone());
        }
        let m = {
            let mut mods = self.modules.lock().unwrap();
            match mods.get(module) {
                Some(m) => m.clone(),
                None => {
                    let m = self
                        .stream
                        .context()
                        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                        .map_err(|e| cuda_err("load PTX module", (module, e)))?;
                    mods.insert(module, m.clone());
                    m
                }
            }
        };
        let f = m
            .load_function(name)
            .map_err(|e| cuda_err("load kernel", (name, e)))?;
        self.funcs.lock().unwrap().insert((module, name), f.clone());
        Ok(f)
    }

    /// Raises a kernel's dynamic shared memory limit (needed above 48 KiB).
    pub fn set_max_dynamic_smem(&self, f: &CudaFunction, bytes: u32) -> Result<()> {
        f.set_attribute(
            sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(|e| cuda_err("cuFuncSetAttribute", e))
    }

    /// A launch builder for `f` on our stream; push arguments, then [`launch`].
    pub fn builder<'a>(&'a self, f: &'a CudaFunction) -> LaunchArgs<'a> {
        self.stream.launch_builder(f)
    }

    /// The cuBLAS handle (candle's, bound to our stream).
    pub(crate) fn blas(&self) -> Arc<cudarc::cublas::CudaBlas> {
        self.candle.cublas_handle()
    }

    /// Multiprocessor count, for persistent grids.
    pub fn sm_count(&self) -> Result<u32> {
        self.stream
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map(|v| v as u32)
            .map_err(|e| cuda_err("device attribute", e))
    }

    /// Records an event now (for timing with [`CudaDev::elapsed_ms`]).
    pub fn event(&self) -> Result<cudarc::driver::CudaEvent> {
        self.stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("cuEventRecord", e))
    }
}

/// Launches a built kernel and checks the launch.
///
/// # Safety
/// The pushed arguments must match the kernel's parameters in number, order and
/// type, and every pointer must cover what the kernel reads and writes for `cfg`.
pub unsafe fn launch(op: &'static str, mut b: LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
    unsafe { b.launch(cfg) }.map_err(|e| cuda_err(op, e))?;
    Ok(())
}

/// A 1-D launch of `threads` threads in blocks of `block`.
pub fn grid_1d(threads: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((threads as u32).div_ceil(block).max(1), 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}
