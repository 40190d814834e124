//! The device the fused kernels run on and the buffers they read and write.
//!
//! [`Dev`] is either the CPU, where every kernel runs its plain Rust reference, or a
//! CUDA GPU (feature `cuda`), where it launches the kernel from `kernels/*.cu` on
//! candle's stream (so our work and candle's are ordered without events).
//! [`DBuf<T>`] owns `len` elements on one device; [`View`] is a range of a buffer and
//! [`Mat`] a row-major matrix inside a view (rows, columns, leading dimension).
//!
//! Buffers behave like device memory: a kernel writes through a shared [`View`]
//! (interior mutability), exactly as a CUDA kernel writes through a pointer. The
//! kernel wrappers check that no output overlaps another argument of the same call
//! (except where an op is documented as in-place), which is what makes the CPU
//! references sound: they read their inputs into owned vectors, compute, and write
//! the outputs back element by element through raw pointers, never holding a Rust
//! reference into a buffer across another access.
//!
//! Every allocation is counted ([`Dev::held_bytes`], [`Dev::peak_bytes`]) so the
//! memory model can be compared with what the engine really holds. An optional cap
//! ([`Dev::set_memory_limit`]) makes an allocation past it fail exactly like a real
//! out-of-memory ([`DeviceError::OutOfMemory`]): how the CPU tests exercise the
//! trainer's out-of-memory recovery, and a way to emulate a smaller GPU's budget
//! for qtrain's own buffers on a larger one.

use crate::error::{ensure, DeviceError, Result};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

mod sealed {
    pub trait Sealed {}
}

/// A plain element type a buffer can hold.
pub trait Elem: Copy + Default + Send + Sync + std::fmt::Debug + 'static + sealed::Sealed {
    const NAME: &'static str;
}

/// The floating-point element types (storage of activations, weights, gradients).
/// Kernels compute in f32; `from_f32` rounds to nearest even like the GPU's
/// conversion intrinsics.
pub trait Float: Elem {
    const KIND: FloatKind;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// `v` rounded to this type and back: what a value looks like after a store.
    fn round(v: f32) -> f32 {
        Self::from_f32(v).to_f32()
    }
}

/// Which float type, for dispatch to the right kernel instantiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatKind {
    Bf16,
    F16,
    F32,
}

impl FloatKind {
    /// The suffix of a kernel's name for this type (`rmsnorm_fwd_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            FloatKind::Bf16 => "bf16",
            FloatKind::F16 => "f16",
            FloatKind::F32 => "f32",
        }
    }

    pub fn size(self) -> usize {
        match self {
            FloatKind::Bf16 | FloatKind::F16 => 2,
            FloatKind::F32 => 4,
        }
    }
}

macro_rules! elem {
    ($t:ty, $name:expr) => {
        impl sealed::Sealed for $t {}
        impl Elem for $t {
            const NAME: &'static str = $name;
        }
    };
}
elem!(half::bf16, "bf16");
elem!(half::f16, "f16");
elem!(f32, "f32");
elem!(u8, "u8");
elem!(u32, "u32");
elem!(i32, "i32");

impl Float for half::bf16 {
    const KIND: FloatKind = FloatKind::Bf16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}
impl Float for half::f16 {
    const KIND: FloatKind = FloatKind::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}
impl Float for f32 {
    const KIND: FloatKind = FloatKind::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

/// Bytes held and the high-water mark, shared by every buffer of a device; and the
/// optional cap on the bytes held (0: none).
#[derive(Default)]
struct Accounting {
    held: AtomicUsize,
    peak: AtomicUsize,
    limit: AtomicUsize,
}

impl Accounting {
    fn add(&self, bytes: usize) {
        let now = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
    fn sub(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

enum Kind {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaDev),
}

/// A compute device: the CPU (reference kernels) or one CUDA GPU. Cheap to clone.
#[derive(Clone)]
pub struct Dev {
    kind: Arc<Kind>,
    acct: Arc<Accounting>,
    prof: Arc<Profile>,
}

/// Where a region's time is read from: CUDA events on the device's stream (the
/// GPU's time, not the host's), or the host clock on the CPU.
enum Mark {
    Host(std::time::Instant, std::time::Instant),
    #[cfg(feature = "cuda")]
    Cuda(
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
    ),
}

/// The regions recorded while profiling is on ([`Dev::set_profiling`]).
#[derive(Default)]
struct Profile {
    on: std::sync::atomic::AtomicBool,
    marks: std::sync::Mutex<Vec<(&'static str, Mark)>>,
}

/// One named region's total over a profile ([`Dev::take_profile`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionTime {
    pub name: &'static str,
    pub calls: usize,
    pub ms: f64,
}

/// Times the work queued between its creation and its drop (see [`Dev::region`]).
pub struct Region<'a> {
    dev: &'a Dev,
    name: &'static str,
    start: Option<RegionStart>,
}

enum RegionStart {
    Host(std::time::Instant),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

impl Drop for Region<'_> {
    fn drop(&mut self) {
        let mark = match self.start.take() {
            None => return,
            Some(RegionStart::Host(t0)) => Mark::Host(t0, std::time::Instant::now()),
            #[cfg(feature = "cuda")]
            Some(RegionStart::Cuda(e0)) => match self.dev.cuda().map(|c| c.event()) {
                Some(Ok(e1)) => Mark::Cuda(e0, e1),
                // A failed record only loses this sample; the work itself is queued.
                _ => return,
            },
        };
        if let Ok(mut m) = self.dev.prof.marks.lock() {
            m.push((self.name, mark));
        }
    }
}

impl std::fmt::Debug for Dev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.kind {
            Kind::Cpu => write!(f, "Dev(cpu)"),
            #[cfg(feature = "cuda")]
            Kind::Cuda(c) => write!(f, "Dev(cuda:{})", c.ordinal()),
        }
    }
}

impl Dev {
    /// The CPU: every kernel runs its Rust reference.
    pub fn cpu() -> Self {
        Dev {
            kind: Arc::new(Kind::Cpu),
            acct: Arc::default(),
            prof: Arc::default(),
        }
    }

    /// The device of a candle [`candle_core::Device`]. On CUDA this shares candle's
    /// context, stream and cuBLAS handle, so buffers borrowed from candle tensors and
    /// our kernels are ordered on one stream.
    pub fn from_candle(device: &candle_core::Device) -> Result<Self> {
        match device {
            candle_core::Device::Cpu => Ok(Self::cpu()),
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(c) => Ok(Dev {
                kind: Arc::new(Kind::Cuda(crate::cuda::CudaDev::new(c.clone())?)),
                acct: Arc::default(),
                prof: Arc::default(),
            }),
            #[allow(unreachable_patterns)]
            other => Err(DeviceError::Unsupported {
                op: "device",
                msg: format!("{other:?} (build with --features cuda for GPUs)"),
            }),
        }
    }

    pub fn is_cuda(&self) -> bool {
        !matches!(*self.kind, Kind::Cpu)
    }

    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Option<&crate::cuda::CudaDev> {
        match &*self.kind {
            Kind::Cuda(c) => Some(c),
            Kind::Cpu => None,
        }
    }

    /// Turns region timing on or off (off by default; shared by every clone). While
    /// on, each [`Dev::region`] records a pair of CUDA events on the stream (a few
    /// microseconds of host time each; the GPU's timeline is not disturbed as long
    /// as the host stays ahead of it).
    pub fn set_profiling(&self, on: bool) {
        self.prof.on.store(on, Ordering::Relaxed);
    }

    /// A region named `name`: the device time of the work queued until the guard
    /// drops is added to `name` in [`Dev::take_profile`]. Free when profiling is off.
    pub fn region(&self, name: &'static str) -> Region<'_> {
        let start = if !self.prof.on.load(Ordering::Relaxed) {
            None
        } else {
            match &*self.kind {
                Kind::Cpu => Some(RegionStart::Host(std::time::Instant::now())),
                #[cfg(feature = "cuda")]
                Kind::Cuda(c) => c.event().ok().map(RegionStart::Cuda),
            }
        };
        Region {
            dev: self,
            name,
            start,
        }
    }

    /// Waits for the device, then returns the regions recorded since the last call,
    /// summed by name, in order of first appearance, and clears them.
    pub fn take_profile(&self) -> Result<Vec<RegionTime>> {
        self.synchronize()?;
        let marks = std::mem::take(&mut *self.prof.marks.lock().expect("profile lock"));
        let mut out: Vec<RegionTime> = Vec::new();
        for (name, mark) in marks {
            let ms = match mark {
                Mark::Host(a, b) => (b - a).as_secs_f64() * 1e3,
                #[cfg(feature = "cuda")]
                Mark::Cuda(a, b) => crate::cuda::CudaDev::elapsed_ms(&a, &b)?,
            };
            match out.iter_mut().find(|r| r.name == name) {
                Some(r) => {
                    r.calls += 1;
                    r.ms += ms;
                }
                None => out.push(RegionTime { name, calls: 1, ms }),
            }
        }
        Ok(out)
    }

    /// Bytes currently held by buffers this device allocated (not borrowed ones).
    pub fn held_bytes(&self) -> usize {
        self.acct.held.load(Ordering::Relaxed)
    }

    /// The most bytes held at once since creation or the last [`Dev::reset_peak`].
    pub fn peak_bytes(&self) -> usize {
        self.acct.peak.load(Ordering::Relaxed)
    }

    pub fn reset_peak(&self) {
        self.acct
            .peak
            .store(self.acct.held.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Caps the bytes this device's own buffers may hold at once (`None`: no cap,
    /// the default). An allocation that would pass the cap fails with
    /// [`DeviceError::OutOfMemory`], as if the device were full; borrowed buffers
    /// (candle tensors) are not counted. Shared by every clone of this `Dev`.
    pub fn set_memory_limit(&self, bytes: Option<usize>) {
        self.acct
            .limit
            .store(bytes.map_or(0, |b| b.max(1)), Ordering::Relaxed);
    }

    /// The cap set by [`Dev::set_memory_limit`].
    pub fn memory_limit(&self) -> Option<usize> {
        match self.acct.limit.load(Ordering::Relaxed) {
            0 => None,
            b => Some(b),
        }
    }

    /// `(free, total)` device memory as the driver reports it (None on the CPU).
    pub fn mem_info(&self) -> Result<Option<(usize, usize)>> {
        match &*self.kind {
            Kind::Cpu => Ok(None),
            #[cfg(feature = "cuda")]
            Kind::Cuda(c) => c.mem_info().map(Some),
        }
    }

    /// Waits for all queued work (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        match &*self.kind {
            Kind::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Kind::Cuda(c) => c.synchronize(),
        }
    }

    /// A zero-filled buffer of `len` elements; `what` names it in out-of-memory errors.
    pub fn zeros<T: Elem>(&self, len: usize, what: &str) -> Result<DBuf<T>> {
        let bytes = len * std::mem::size_of::<T>();
        if let Some(limit) = self.memory_limit() {
            let held = self.held_bytes();
            if held + bytes > limit {
                return Err(DeviceError::OutOfMemory {
                    what: what.to_string(),
                    bytes,
                    held,
                });
            }
        }
        let mem = match &*self.kind {
            Kind::Cpu => {
                let _ = what;
                Mem::Host((0..len).map(|_| UnsafeCell::new(T::default())).collect())
            }
            #[cfg(feature = "cuda")]
            Kind::Cuda(c) => Mem::Device(c.alloc_zeroed(bytes, what, self.held_bytes())?),
        };
        self.acct.add(bytes);
        Ok(DBuf {
            len,
            mem,
            acct: Some(self.acct.clone()),
        })
    }

    /// A buffer holding a copy of `data`.
    pub fn upload<T: Elem>(&self, data: &[T], what: &str) -> Result<DBuf<T>> {
        let buf = self.zeros::<T>(data.len(), what)?;
        self.write(buf.all(), data)?;
        Ok(buf)
    }

    /// Copies `data` into `dst` (same length).
    pub fn write<T: Elem>(&self, dst: View<'_, T>, data: &[T]) -> Result<()> {
        ensure!(
            dst.len == data.len(),
            "write",
            "view has {} elements, data {}",
            dst.len,
            data.len()
        );
        match &*self.kind {
            Kind::Cpu => {
                let p = dst.host_ptr();
                for (i, &v) in data.iter().enumerate() {
                    // SAFETY: `dst` is in bounds (checked at construction) and no
                    // reference into the buffer is alive.
                    unsafe { p.add(i).write(v) };
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Kind::Cuda(c) => c.htod(dst.dptr(), data),
        }
    }

    /// The elements of `v`, on the host (waits for queued work).
    pub fn download<T: Elem>(&self, v: View<'_, T>) -> Result<Vec<T>> {
        match &*self.kind {
            Kind::Cpu => Ok(read_view(v)),
            #[cfg(feature = "cuda")]
            Kind::Cuda(c) => c.dtoh(v.dptr(), v.len),
        }
    }

    /// `dst = src` (same length, not overlapping).
    pub fn copy<T: Elem>(&self, src: View<'_, T>, dst: View<'_, T>) -> Result<()> {
        ensure!(
            src.len == dst.len,
            "copy",
            "source has {} elements, destination {}",
            src.len,
            dst.len
        );
        check_disjoint("copy", &[dst.span()], &[src.span()])?;
        match &*self.kind {
            Kind::Cpu => {
                let (s, d) = (src.host_ptr(), dst.host_ptr());
                for i in 0..src.len {
                    // SAFETY: both in bounds, disjoint (checked above).
                    unsafe { d.add(i).write(s.add(i).read()) };
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Kind::Cuda(c) => c.dtod(dst.dptr(), src.dptr(), src.len * std::mem::size_of::<T>()),
        }
    }

    /// Sets every element of `v` to zero.
    pub fn fill_zero<T: Elem>(&self, v: View<'_, T>) -> Result<()> {
        match &*self.kind {
            Kind::Cpu => {
                let p = v.host_ptr();
                for i in 0..v.len {
                    // SAFETY: in bounds; no live references.
                    unsafe { p.add(i).write(T::default()) };
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Kind::Cuda(c) => c.memset0(v.dptr(), v.len * std::mem::size_of::<T>()),
        }
    }

    /// The data of a contiguous candle tensor of element type `T` as a buffer: on
    /// CUDA the tensor's own memory (kept alive by the buffer, not counted as held),
    /// on the CPU a copy.
    pub fn borrow_candle<T: Elem + candle_core::WithDType>(
        &self,
        t: &candle_core::Tensor,
    ) -> Result<DBuf<T>> {
        ensure!(
            t.dtype() == T::DTYPE,
            "borrow tensor",
            "tensor is {:?}, expected {}",
            t.dtype(),
            <T as Elem>::NAME
        );
        match &*self.kind {
            Kind::Cpu => {
                let v: Vec<T> = t.flatten_all()?.to_vec1()?;
                Ok(DBuf {
                    len: v.len(),
                    mem: Mem::Host(v.into_iter().map(UnsafeCell::new).collect()),
                    acct: None,
                })
            }
            #[cfg(feature = "cuda")]
            Kind::Cuda(_) => {
                let t = if t.is_contiguous() {
                    t.clone()
                } else {
                    t.contiguous()?
                };
                let ptr = crate::cuda::tensor_dptr(&t)?;
                Ok(DBuf {
                    len: t.elem_count(),
                    mem: Mem::Borrowed { ptr, _owner: t },
                    acct: None,
                })
            }
        }
    }
}

enum Mem<T> {
    Host(Box<[UnsafeCell<T>]>),
    #[cfg(feature = "cuda")]
    Device(crate::cuda::DeviceMem),
    #[cfg(feature = "cuda")]
    Borrowed {
        ptr: u64,
        _owner: candle_core::Tensor,
    },
}

/// `len` elements of `T` owned by (or borrowed onto) one device.
pub struct DBuf<T: Elem> {
    len: usize,
    mem: Mem<T>,
    acct: Option<Arc<Accounting>>,
}

// SAFETY: a DBuf is moved between threads only as a whole (the engine of one GPU
// lives in one thread); host memory is plain data, device memory a raw pointer.
unsafe impl<T: Elem> Send for DBuf<T> {}

impl<T: Elem> Drop for DBuf<T> {
    fn drop(&mut self) {
        if let (Some(a), false) = (&self.acct, self.is_borrowed()) {
            a.sub(self.len * std::mem::size_of::<T>());
        }
    }
}

impl<T: Elem> DBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn is_borrowed(&self) -> bool {
        #[cfg(feature = "cuda")]
        if matches!(self.mem, Mem::Borrowed { .. }) {
            return true;
        }
        false
    }

    /// The whole buffer.
    pub fn all(&self) -> View<'_, T> {
        View {
            buf: self,
            off: 0,
            len: self.len,
        }
    }

    /// Elements `off..off + len`. Panics when out of bounds (a programming error).
    pub fn view(&self, off: usize, len: usize) -> View<'_, T> {
        self.all().sub(off, len)
    }

    /// The whole buffer as a `rows x cols` contiguous matrix.
    pub fn mat(&self, rows: usize, cols: usize) -> Mat<'_, T> {
        self.all().mat(rows, cols, cols)
    }
}

/// A range of a buffer.
pub struct View<'a, T: Elem> {
    buf: &'a DBuf<T>,
    off: usize,
    len: usize,
}

impl<T: Elem> Clone for View<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: Elem> Copy for View<'_, T> {}

impl<'a, T: Elem> View<'a, T> {
    pub fn len(self) -> usize {
        self.len
    }

    pub fn is_empty(self) -> bool {
        self.len == 0
    }

    /// Elements `off..off + len` of this view. Panics when out of bounds.
    pub fn sub(self, off: usize, len: usize) -> View<'a, T> {
        assert!(
            off + len <= self.len,
            "view {off}..{} out of bounds of {} elements",
            off + len,
            self.len
        );
        View {
            buf: self.buf,
            off: self.off + off,
            len,
        }
    }

    /// A `rows x cols` matrix with leading dimension `ld` starting at this view's
    /// first element. Panics when it does not fit (a programming error).
    pub fn mat(self, rows: usize, cols: usize, ld: usize) -> Mat<'a, T> {
        assert!(cols <= ld || rows <= 1, "cols {cols} > ld {ld}");
        let need = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
        assert!(
            need <= self.len,
            "{rows}x{cols} matrix (ld {ld}) needs {need} elements, view has {}",
            self.len
        );
        Mat {
            v: self,
            rows,
            cols,
            ld,
        }
    }

    /// Host pointer to the first element (CPU buffers only).
    pub(crate) fn host_ptr(self) -> *mut T {
        match &self.buf.mem {
            // UnsafeCell<T> has the layout of T.
            Mem::Host(b) => unsafe { (b.as_ptr() as *mut T).add(self.off) },
            #[cfg(feature = "cuda")]
            _ => panic!("host_ptr of a device buffer"),
        }
    }

    /// Device address of the first element (CUDA buffers only).
    #[cfg(feature = "cuda")]
    pub fn dptr(self) -> u64 {
        let base = match &self.buf.mem {
            Mem::Device(d) => d.ptr(),
            Mem::Borrowed { ptr, .. } => *ptr,
            Mem::Host(_) => panic!("dptr of a host buffer"),
        };
        base + (self.off * std::mem::size_of::<T>()) as u64
    }

    /// Address range in bytes, for overlap checks (host or device addresses; a host
    /// and a device buffer never meet in one call).
    pub(crate) fn span(self) -> Span {
        let start = match &self.buf.mem {
            Mem::Host(_) => self.host_ptr() as u64,
            #[cfg(feature = "cuda")]
            _ => self.dptr(),
        };
        let size = std::mem::size_of::<T>() as u64;
        Span {
            start,
            end: start + self.len as u64 * size,
            ld_bytes: 0,
            col_start: 0,
            col_end: 0,
        }
    }
}

/// A row-major matrix inside a view: element `(r, c)` is `v[r * ld + c]`.
pub struct Mat<'a, T: Elem> {
    pub v: View<'a, T>,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl<T: Elem> Clone for Mat<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: Elem> Copy for Mat<'_, T> {}

impl<'a, T: Elem> Mat<'a, T> {
    /// Columns `start..start + n` (same rows and leading dimension).
    pub fn col_block(self, start: usize, n: usize) -> Mat<'a, T> {
        assert!(
            start + n <= self.cols,
            "columns {start}..{} of {}",
            start + n,
            self.cols
        );
        if self.rows == 0 {
            return Mat { cols: n, ..self };
        }
        let len = (self.rows - 1) * self.ld + n;
        Mat {
            v: self.v.sub(start, len),
            rows: self.rows,
            cols: n,
            ld: self.ld,
        }
    }

    /// Rows `start..start + n`.
    pub fn row_block(self, start: usize, n: usize) -> Mat<'a, T> {
        assert!(
            start + n <= self.rows,
            "rows {start}..{} of {}",
            start + n,
            self.rows
        );
        let len = if n == 0 {
            0
        } else {
            (n - 1) * self.ld + self.cols
        };
        Mat {
            v: self.v.sub(start * self.ld, len),
            rows: n,
            cols: self.cols,
            ld: self.ld,
        }
    }

    pub fn is_contiguous(self) -> bool {
        self.ld == self.cols || self.rows <= 1
    }

    pub fn numel(self) -> usize {
        self.rows * self.cols
    }

    /// Address range plus the column interval inside each row, so that two column
    /// blocks of one matrix (e.g. gate and up) are known to be disjoint.
    pub(crate) fn span(self) -> Span {
        let mut s = self.v.span();
        let size = std::mem::size_of::<T>() as u64;
        s.ld_bytes = self.ld as u64 * size;
        s.col_start = 0;
        s.col_end = self.cols as u64 * size;
        s
    }

    #[cfg(feature = "cuda")]
    pub fn dptr(self) -> u64 {
        self.v.dptr()
    }
}

/// The bytes an argument touches: `[start, end)`, and for a strided matrix the
/// bytes `[col_start, col_end)` of every `ld_bytes`-long row starting at `start`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    start: u64,
    end: u64,
    ld_bytes: u64,
    col_start: u64,
    col_end: u64,
}

impl Span {
    fn overlaps(&self, o: &Span) -> bool {
        if self.end <= o.start || o.end <= self.start || self.start == self.end || o.start == o.end
        {
            return false;
        }
        // Two strided matrices with the same row pitch: disjoint when their column
        // byte ranges (relative to one row start) never meet.
        if self.ld_bytes != 0 && self.ld_bytes == o.ld_bytes {
            let ld = self.ld_bytes;
            let (a0, a1) = (
                self.start % ld + self.col_start,
                self.start % ld + self.col_end,
            );
            let (b0, b1) = (o.start % ld + o.col_start, o.start % ld + o.col_end);
            // Compare on the circle of one row pitch (a block may wrap past the pitch).
            let meets = |x0: u64, x1: u64, y0: u64, y1: u64| x0 < y1 && y0 < x1;
            return meets(a0, a1, b0, b1)
                || meets(a0 + ld, a1 + ld, b0, b1)
                || meets(a0, a1, b0 + ld, b1 + ld);
        }
        true
    }
}

/// Fails when an output overlaps another output or an input.
pub(crate) fn check_disjoint(op: &'static str, outs: &[Span], ins: &[Span]) -> Result<()> {
    for (i, o) in outs.iter().enumerate() {
        for (j, p) in outs.iter().enumerate().skip(i + 1) {
            ensure!(!o.overlaps(p), op, "outputs {i} and {j} overlap");
        }
        for (j, p) in ins.iter().enumerate() {
            ensure!(!o.overlaps(p), op, "output {i} overlaps input {j}");
        }
    }
    Ok(())
}

/// The elements of a host view, copied out.
pub(crate) fn read_view<T: Elem>(v: View<'_, T>) -> Vec<T> {
    let p = v.host_ptr();
    // SAFETY: in bounds; elements are read one at a time, no reference is kept.
    (0..v.len).map(|i| unsafe { p.add(i).read() }).collect()
}

/// A host matrix as f32, row-major and dense (`rows * cols`).
pub(crate) fn read_mat<T: Float>(m: Mat<'_, T>) -> Vec<f32> {
    let p = m.v.host_ptr();
    let mut out = Vec::with_capacity(m.rows * m.cols);
    for r in 0..m.rows {
        for c in 0..m.cols {
            // SAFETY: (r, c) is inside the matrix, which fits in the view.
            out.push(unsafe { p.add(r * m.ld + c).read() }.to_f32());
        }
    }
    out
}

/// Writes a dense f32 `rows * cols` array into a host matrix, rounding to `T`.
pub(crate) fn write_mat<T: Float>(m: Mat<'_, T>, data: &[f32]) {
    assert_eq!(data.len(), m.rows * m.cols);
    let p = m.v.host_ptr();
    for r in 0..m.rows {
        for c in 0..m.cols {
            // SAFETY: as in read_mat; outputs were checked disjoint from inputs.
            unsafe { p.add(r * m.ld + c).write(T::from_f32(data[r * m.cols + c])) };
        }
    }
}

/// The elements of a host float view as f32.
pub(crate) fn read_f32<T: Float>(v: View<'_, T>) -> Vec<f32> {
    read_view(v).into_iter().map(Float::to_f32).collect()
}

/// Writes f32 values into a host float view, rounding to `T`.
pub(crate) fn write_f32<T: Float>(v: View<'_, T>, data: &[f32]) {
    assert_eq!(data.len(), v.len);
    let p = v.host_ptr();
    for (i, &x) in data.iter().enumerate() {
        // SAFETY: in bounds; no live references.
        unsafe { p.add(i).write(T::from_f32(x)) };
    }
}

/// Host-side data of a view for callers that just want numbers (tests, doctor).
pub fn to_f32_vec<T: Float>(dev: &Dev, v: View<'_, T>) -> Result<Vec<f32>> {
    Ok(dev.download(v)?.into_iter().map(Float::to_f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limit_fails_allocations_past_it_like_an_oom() {
        let dev = Dev::cpu();
        dev.set_memory_limit(Some(1000));
        let a = dev.zeros::<f32>(200, "a").unwrap(); // 800 bytes
        let Err(e) = dev.zeros::<f32>(60, "engine buffer b") else {
            panic!("allocated past the limit")
        };
        match &e {
            DeviceError::OutOfMemory { what, bytes, held } => {
                assert_eq!(
                    (what.as_str(), *bytes, *held),
                    ("engine buffer b", 240, 800)
                )
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("engine buffer b"), "{e}");
        // Exactly at the cap fits; freeing makes room again; clones share the cap.
        let b = dev.clone().zeros::<u8>(200, "c").unwrap();
        assert_eq!(dev.held_bytes(), 1000);
        drop((a, b));
        assert!(dev.zeros::<f32>(250, "d").is_ok());
        dev.set_memory_limit(None);
        assert!(dev.zeros::<f32>(10_000, "e").is_ok());
        assert_eq!(dev.memory_limit(), None);
    }

    #[test]
    fn views_and_blocks_stay_in_bounds_and_overlap_is_detected() {
        let dev = Dev::cpu();
        let b = dev
            .upload(&(0..24).map(|i| i as f32).collect::<Vec<_>>(), "t")
            .unwrap();
        let m = b.mat(4, 6);
        let g = m.col_block(0, 3);
        let u = m.col_block(3, 3);
        assert_eq!(
            read_mat(u),
            vec![3., 4., 5., 9., 10., 11., 15., 16., 17., 21., 22., 23.]
        );
        // Interleaved column blocks of one matrix do not overlap; a block and itself do.
        assert!(check_disjoint("t", &[g.span()], &[u.span()]).is_ok());
        assert!(check_disjoint("t", &[g.span()], &[g.span()]).is_err());
        assert!(check_disjoint(
            "t",
            &[m.row_block(0, 2).span()],
            &[m.row_block(2, 2).span()]
        )
        .is_ok());
        assert!(check_disjoint(
            "t",
            &[m.row_block(0, 3).span()],
            &[m.row_block(2, 2).span()]
        )
        .is_err());
        assert_eq!(dev.held_bytes(), 96);
        let c = dev.zeros::<f32>(24, "c").unwrap();
        dev.copy(b.all(), c.all()).unwrap();
        assert_eq!(
            dev.download(c.all()).unwrap(),
            dev.download(b.all()).unwrap()
        );
        assert!(dev.copy(b.view(0, 10), b.view(5, 10)).is_err());
        drop(c);
        assert_eq!(dev.held_bytes(), 96);
        assert_eq!(dev.peak_bytes(), 192);
    }
}
