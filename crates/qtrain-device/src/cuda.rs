//! The CUDA side of [`crate::Dev`]: raw device allocations on candle's stream,
//! copies, kernel loading and launching, and the cuBLAS handle.
//!
//! Allocations are stream-ordered (`cuMemAllocAsync` / `cuMemFreeAsync` from the
//! driver's pool), so freeing a buffer while kernels that use it are still queued
//! is safe and re-allocating the same sizes every step costs no driver round trip.
//! We pass raw device addresses to kernels instead of cudarc's tracked slices: all
//! of our work runs on one stream, so cudarc's per-slice events would only add
//! overhead.
//!
//! For work that must overlap candle's stream (the paged optimizer state's copies),
//! [`SideStream`], [`StreamEvent`] and [`PinnedBuf`] wrap the raw driver objects.

use crate::error::{DeviceError, Result};
use candle_core::cuda_backend::cudarc;
use cudarc::driver::{result as drv, sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};

pub(crate) fn cuda_err(op: &'static str, e: impl std::fmt::Debug) -> DeviceError {
    DeviceError::Cuda {
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

/// The device address of a contiguous candle CUDA tensor's first element.
pub(crate) fn tensor_dptr(t: &candle_core::Tensor) -> Result<u64> {
    use candle_core::DType;
    use cudarc::driver::DevicePtr;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        return Err(DeviceError::Unsupported {
            op: "borrow tensor",
            msg: "tensor is not on a CUDA device".into(),
        });
    };
    macro_rules! ptr {
        ($t:ty) => {{
            let slice = s.as_cuda_slice::<$t>()?;
            let (p, _guard) = slice.device_ptr(slice.stream());
            p + (layout.start_offset() * std::mem::size_of::<$t>()) as u64
        }};
    }
    Ok(match t.dtype() {
        DType::U8 => ptr!(u8),
        DType::U32 => ptr!(u32),
        DType::BF16 => ptr!(half::bf16),
        DType::F16 => ptr!(half::f16),
        DType::F32 => ptr!(f32),
        other => {
            return Err(DeviceError::Unsupported {
                op: "borrow tensor",
                msg: format!("dtype {other:?}"),
            })
        }
    })
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

    /// The CUDA version the driver supports, e.g. `(13, 0)`.
    pub fn driver_version(&self) -> Result<(i32, i32)> {
        let mut v = 0i32;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(|e| cuda_err("cuDriverGetVersion", e))?;
        Ok((v / 1000, (v % 1000) / 10))
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
                DeviceError::OutOfMemory {
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

    /// Device memory in use (total - free) in MiB, for diagnostics.
    pub fn used_mib(&self) -> f64 {
        drv::mem_get_info()
            .map(|(free, total)| (total - free) as f64 / 1048576.0)
            .unwrap_or(f64::NAN)
    }

    /// The per-thread stack limit of the context (`CU_LIMIT_STACK_SIZE`), bytes.
    pub fn stack_limit(&self) -> Result<usize> {
        self.bind()?;
        let mut v = 0usize;
        // SAFETY: writes one usize.
        unsafe { sys::cuCtxGetLimit(&mut v, sys::CUlimit::CU_LIMIT_STACK_SIZE) }
            .result()
            .map_err(|e| cuda_err("cuCtxGetLimit", e))?;
        Ok(v)
    }

    /// Returns the memory the stream-ordered allocator keeps cached (freed blocks
    /// it holds for reuse) to the device, so that what the driver reports as used
    /// is what is really held. Called after loading, whose temporaries (uploads,
    /// quantization scratch) would otherwise stay reserved for the whole run.
    pub fn trim_pool(&self) -> Result<()> {
        self.synchronize()?;
        self.bind()?;
        let before = self.used_mib();
        let dev = self.stream.context().cu_device();
        let mut pool = std::mem::MaybeUninit::uninit();
        // SAFETY: plain driver queries on this context's device; the pool handle is
        // only used for the trim.
        unsafe {
            sys::cuDeviceGetMemPool(pool.as_mut_ptr(), dev)
                .result()
                .map_err(|e| cuda_err("cuDeviceGetMemPool", e))?;
            sys::cuMemPoolTrimTo(pool.assume_init(), 0)
                .result()
                .map_err(|e| cuda_err("cuMemPoolTrimTo", e))?;
        }
        tracing::debug!(
            "allocator pool trimmed: device memory in use {before:.0} -> {:.0} MiB",
            self.used_mib()
        );
        Ok(())
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

    /// Milliseconds between two recorded events (both must have completed).
    pub fn elapsed_ms(
        start: &cudarc::driver::CudaEvent,
        end: &cudarc::driver::CudaEvent,
    ) -> Result<f64> {
        start
            .elapsed_ms(end)
            .map(f64::from)
            .map_err(|e| cuda_err("cuEventElapsedTime", e))
    }
}

impl CudaDev {
    /// `bytes` of page-locked host memory (uninitialized contents are zeroed).
    pub fn alloc_pinned(&self, bytes: usize) -> Result<PinnedBuf> {
        PinnedBuf::new(self.stream.context().clone(), bytes)
    }

    /// A new stream beside candle's (see [`SideStream`]).
    pub fn side_stream(&self) -> Result<SideStream> {
        self.bind()?;
        let raw = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(|e| cuda_err("cuStreamCreate", e))?;
        Ok(SideStream {
            raw,
            ctx: self.stream.context().clone(),
        })
    }

    /// A new event without timing, for ordering streams.
    pub fn stream_event(&self) -> Result<StreamEvent> {
        self.bind()?;
        let raw = drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| cuda_err("cuEventCreate", e))?;
        Ok(StreamEvent {
            raw,
            ctx: self.stream.context().clone(),
        })
    }

    /// Records `ev` at the current end of candle's (the main) stream.
    pub fn record_on_main(&self, ev: &StreamEvent) -> Result<()> {
        self.bind()?;
        // SAFETY: both handles are alive (owned by `ev` and candle's device).
        unsafe { drv::event::record(ev.raw, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("cuEventRecord", e))
    }

    /// Makes work queued on the main stream from now on wait for `ev`.
    pub fn wait_on_main(&self, ev: &StreamEvent) -> Result<()> {
        self.bind()?;
        // SAFETY: both handles are alive.
        unsafe {
            drv::stream::wait_event(
                self.stream.cu_stream(),
                ev.raw,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| cuda_err("cuStreamWaitEvent", e))
    }
}

/// Page-locked host memory from `cuMemHostAlloc` (portable, *not* write-combined:
/// the host reads it back, e.g. to write a checkpoint, and write-combined memory is
/// uncached for host reads). Copies between it and the device are truly asynchronous.
pub struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain host memory owned by this value; the context handle is thread-safe.
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    fn new(ctx: Arc<CudaContext>, len: usize) -> Result<Self> {
        let mut ptr = std::ptr::null_mut();
        if len > 0 {
            ctx.bind_to_thread()
                .map_err(|e| cuda_err("bind context", e))?;
            // SAFETY: a plain allocation of `len` bytes; zeroed right below.
            ptr = unsafe { drv::malloc_host(len, sys::CU_MEMHOSTALLOC_PORTABLE) }
                .map_err(|e| cuda_err("cuMemHostAlloc", e))? as *mut u8;
            // SAFETY: `ptr` points to `len` writable bytes.
            unsafe { std::ptr::write_bytes(ptr, 0, len) };
        }
        Ok(PinnedBuf { ptr, len, ctx })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    /// The bytes.
    ///
    /// # Safety
    /// No asynchronous copy into this buffer may be in flight (synchronize the stream
    /// that copies first).
    pub unsafe fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` holds `len` initialized bytes; no concurrent writer (caller).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, for writing.
    ///
    /// # Safety
    /// No asynchronous copy from or into this buffer may be in flight.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as above, and `&mut self` excludes other host references.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: allocated by cuMemHostAlloc; the owner synchronized its copies.
            let _ = unsafe { drv::free_host(self.ptr as *mut std::ffi::c_void) };
        }
    }
}

/// A CUDA stream of our own beside candle's, created through the driver directly:
/// cudarc's `CudaContext::new_stream` would switch the context candle shares into
/// multi-stream mode, where cudarc records events on every use of candle's buffers.
/// Ordering against the main stream is the caller's job, with [`StreamEvent`]s.
pub struct SideStream {
    raw: sys::CUstream,
    ctx: Arc<CudaContext>,
}

// SAFETY: a driver stream handle; the driver API is thread-safe.
unsafe impl Send for SideStream {}

impl SideStream {
    /// Queues a copy of `bytes` bytes from host `src` to device `dst`.
    ///
    /// # Safety
    /// `src..src + bytes` must stay valid and unchanged until the copy has completed
    /// (page-locked for the copy to be asynchronous), and `dst..dst + bytes` must lie
    /// in a live device allocation that nothing else uses meanwhile.
    pub unsafe fn htod(&self, dst: u64, src: *const u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        // SAFETY: the caller's contract.
        unsafe { drv::memcpy_htod_async(dst, std::slice::from_raw_parts(src, bytes), self.raw) }
            .map_err(|e| cuda_err("cuMemcpyHtoDAsync", e))
    }

    /// Queues a copy of `bytes` bytes from device `src` to host `dst`.
    ///
    /// # Safety
    /// As [`SideStream::htod`], with the host side written: nothing may read or write
    /// `dst..dst + bytes` until the copy has completed.
    pub unsafe fn dtoh(&self, dst: *mut u8, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        // SAFETY: the caller's contract.
        unsafe { drv::memcpy_dtoh_async(std::slice::from_raw_parts_mut(dst, bytes), src, self.raw) }
            .map_err(|e| cuda_err("cuMemcpyDtoHAsync", e))
    }

    /// Records `ev` at the current end of this stream.
    pub fn record(&self, ev: &StreamEvent) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        // SAFETY: both handles are alive.
        unsafe { drv::event::record(ev.raw, self.raw) }.map_err(|e| cuda_err("cuEventRecord", e))
    }

    /// Makes work queued on this stream from now on wait for `ev`.
    pub fn wait(&self, ev: &StreamEvent) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        // SAFETY: both handles are alive.
        unsafe {
            drv::stream::wait_event(
                self.raw,
                ev.raw,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| cuda_err("cuStreamWaitEvent", e))
    }

    /// Waits until everything queued on this stream has completed.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        // SAFETY: the stream is alive.
        unsafe { drv::stream::synchronize(self.raw) }
            .map_err(|e| cuda_err("cuStreamSynchronize", e))
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: created by cuStreamCreate and destroyed once; queued work still
        // completes (the driver defers the release).
        unsafe {
            let _ = drv::stream::synchronize(self.raw);
            let _ = drv::stream::destroy(self.raw);
        }
    }
}

/// A CUDA event for ordering [`SideStream`] work against the main stream.
pub struct StreamEvent {
    raw: sys::CUevent,
    ctx: Arc<CudaContext>,
}

// SAFETY: a driver event handle; the driver API is thread-safe.
unsafe impl Send for StreamEvent {}

impl Drop for StreamEvent {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: created by cuEventCreate and destroyed once.
        let _ = unsafe { drv::event::destroy(self.raw) };
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
