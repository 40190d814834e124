//! [`Nccl`]: the GPU backend, one NCCL communicator per process (one process per
//! GPU), over cudarc's NCCL bindings as candle re-exports them.
//!
//! Two kinds of operation:
//! - **device** ([`Nccl::all_reduce_sum_f32_device`], [`Nccl::broadcast_f32_device`]):
//!   a raw device pointer, an element count and the CUDA stream to enqueue on. The
//!   fused engine keeps all LoRA gradients in one flat f32 device buffer and
//!   all-reduces slices of it (buckets) as the backward pass finishes them, on its
//!   own stream, so communication overlaps the remaining backward. They only
//!   enqueue; [`Nccl::wait`] waits for a stream with this communicator's timeout.
//! - **host** (the [`Collective`] trait): staged through device memory on the
//!   communicator's stream and waited for with the timeout, for the small things
//!   (loss sums, token counts, stop decisions, the serialized trainer state).
//!
//! Never a silent hang: waits poll the stream and `ncclCommGetAsyncError`; when a
//! peer fails (NCCL reports it) or the timeout passes, the communicator is aborted
//! and the call fails, so rank 0 can still write its checkpoint and exit. After
//! that every call fails with the original reason.
//!
//! The NCCL version the bindings are generated for is cudarc's default (2.30);
//! the functions used here are unchanged since NCCL 2.18, and the GPU machines run
//! 2.28. NVLink multicast is turned off before the communicator forms (see
//! [`crate::nvls`]).

use crate::collective::Collective;
use crate::env::WorldEnv;
use crate::error::{DistError, Result};
use crate::rendezvous::{exchange_id, UniqueId, ID_BYTES};
use candle_core::cuda_backend::cudarc;
use cudarc::driver::{sys as dsys, CudaStream, DevicePtrMut, DeviceRepr};
use cudarc::nccl::{result as nres, sys as nsys, NcclType};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Timeouts of the NCCL backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NcclOptions {
    /// How long the unique-id exchange may take (ranks start at different times:
    /// rank 0 may still be loading the model when rank 7 asks).
    pub rendezvous_timeout: Duration,
    /// How long one wait for a collective may take before the communicator is
    /// aborted. It bounds a step's all-reduce, so it must exceed the slowest rank's
    /// step time plus its checkpointing (rank 0 writes while the others wait in the
    /// next collective).
    pub op_timeout: Duration,
}

impl Default for NcclOptions {
    fn default() -> Self {
        Self {
            rendezvous_timeout: Duration::from_secs(15 * 60),
            op_timeout: Duration::from_secs(30 * 60),
        }
    }
}

struct Comm {
    raw: nsys::ncclComm_t,
    /// Why the communicator was aborted, if it was.
    aborted: Option<String>,
}

/// One rank's NCCL communicator and the stream its host-side collectives use.
pub struct Nccl {
    comm: Mutex<Comm>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    op_timeout: Duration,
}

// SAFETY: the raw communicator is only used under the `comm` mutex, which
// serializes every NCCL call on it (NCCL communicators are not thread-safe, but may
// be used from any thread one at a time); the CUDA context is bound to the calling
// thread before each use.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

fn error_string(r: nsys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string.
    let p = unsafe { nsys::ncclGetErrorString(r) };
    if p.is_null() {
        return format!("{r:?}");
    }
    let s = unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy();
    format!("{s} ({r:?})")
}

impl Nccl {
    /// Forms the communicator of `world` on the GPU of `stream` (candle's:
    /// `device.as_cuda_device()?.cuda_stream()`): turns NVLink multicast off, runs
    /// the unique-id rendezvous with rank 0 and initializes NCCL. Blocks until
    /// every rank has joined.
    pub fn init(world: &WorldEnv, stream: Arc<CudaStream>, opts: &NcclOptions) -> Result<Self> {
        crate::nvls::disable_nvls_unless_set();
        let (rank, size) = (world.rank, world.world_size);
        let cuda = |what: &'static str| {
            move |e: cudarc::driver::DriverError| DistError::Cuda {
                what,
                rank,
                msg: e.to_string(),
            }
        };
        stream
            .context()
            .bind_to_thread()
            .map_err(cuda("binding the context"))?;
        let id = exchange_id(
            &world.master_addr,
            world.rendezvous_port,
            rank,
            size,
            opts.rendezvous_timeout,
            || {
                let id = nres::get_uniqueid().map_err(|e| DistError::Nccl {
                    op: "ncclGetUniqueId",
                    rank,
                    msg: error_string(e.0),
                })?;
                let mut out = [0u8; ID_BYTES];
                for (o, c) in out.iter_mut().zip(id.internal.iter()) {
                    *o = *c as u8;
                }
                Ok(out)
            },
        )?;
        Self::from_id(stream, rank, size, &id, opts.op_timeout)
    }

    /// Initializes the communicator from an id obtained elsewhere.
    pub fn from_id(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: &UniqueId,
        op_timeout: Duration,
    ) -> Result<Self> {
        crate::nvls::disable_nvls_unless_set();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| DistError::Cuda {
                what: "binding the context",
                rank,
                msg: e.to_string(),
            })?;
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (o, b) in internal.iter_mut().zip(id.iter()) {
            *o = *b as std::ffi::c_char;
        }
        let uid = nsys::ncclUniqueId { internal };
        let mut raw = std::mem::MaybeUninit::<nsys::ncclComm_t>::uninit();
        let nranks = i32::try_from(world)
            .map_err(|_| DistError::Invalid(format!("world size {world} is too large")))?;
        // SAFETY: `raw` is a valid out-pointer; the id has the NCCL layout.
        unsafe { nres::comm_init_rank(raw.as_mut_ptr(), nranks, uid, rank as i32) }.map_err(
            |e| DistError::Nccl {
                op: "ncclCommInitRank",
                rank,
                msg: error_string(e.0),
            },
        )?;
        // SAFETY: initialized by the successful call above.
        let raw = unsafe { raw.assume_init() };
        Ok(Self {
            comm: Mutex::new(Comm { raw, aborted: None }),
            stream,
            rank,
            world,
            op_timeout,
        })
    }

    /// The stream the host-side collectives run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn lock(&self) -> Result<MutexGuard<'_, Comm>> {
        let g = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &g.aborted {
            return Err(DistError::Nccl {
                op: "communicator",
                rank: self.rank,
                msg: format!("aborted earlier: {why}"),
            });
        }
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| DistError::Cuda {
                what: "binding the context",
                rank: self.rank,
                msg: e.to_string(),
            })?;
        Ok(g)
    }

    fn nccl_err(&self, op: &'static str) -> impl Fn(nres::NcclError) -> DistError + '_ {
        move |e| DistError::Nccl {
            op,
            rank: self.rank,
            msg: error_string(e.0),
        }
    }

    fn cuda_err(
        &self,
        what: &'static str,
    ) -> impl Fn(cudarc::driver::DriverError) -> DistError + '_ {
        move |e| DistError::Cuda {
            what,
            rank: self.rank,
            msg: e.to_string(),
        }
    }

    fn abort(&self, comm: &mut Comm, why: String) {
        if comm.aborted.is_none() {
            // SAFETY: a live communicator, aborted once.
            unsafe {
                let _ = nres::comm_abort(comm.raw);
            }
            comm.aborted = Some(why);
        }
    }

    /// Waits until everything enqueued on `stream` has finished, failing (and
    /// aborting the communicator) when NCCL reports an asynchronous error or the
    /// timeout passes.
    fn wait_locked(&self, comm: &mut Comm, stream: dsys::CUstream, op: &'static str) -> Result<()> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            // SAFETY: querying a stream handle the caller vouches for.
            match unsafe { dsys::cuStreamQuery(stream) } {
                dsys::CUresult::CUDA_SUCCESS => return Ok(()),
                dsys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => {
                    return Err(DistError::Cuda {
                        what: "waiting for the stream",
                        rank: self.rank,
                        msg: format!("{e:?}"),
                    })
                }
            }
            let mut async_err = nsys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out-pointer.
            unsafe { nsys::ncclCommGetAsyncError(comm.raw, &mut async_err) };
            if !matches!(
                async_err,
                nsys::ncclResult_t::ncclSuccess | nsys::ncclResult_t::ncclInProgress
            ) {
                let msg = error_string(async_err);
                self.abort(comm, format!("{op}: {msg}"));
                return Err(DistError::Nccl {
                    op,
                    rank: self.rank,
                    msg: format!("{msg} (a peer failed?); the communicator was aborted"),
                });
            }
            if start.elapsed() >= self.op_timeout {
                self.abort(comm, format!("{op} timed out after {:?}", self.op_timeout));
                return Err(DistError::Timeout {
                    op,
                    rank: self.rank,
                    after: self.op_timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// Waits for `stream` (e.g. the engine's, after enqueuing its gradient
    /// all-reduces) with this communicator's timeout and error checks, instead of
    /// a blocking synchronize that would hang if a peer died.
    pub fn wait(&self, stream: dsys::CUstream) -> Result<()> {
        let mut comm = self.lock()?;
        self.wait_locked(&mut comm, stream, "wait")
    }

    /// Enqueues an in-place sum over ranks of `len` f32 at device address `ptr` on
    /// `stream`; returns without waiting.
    ///
    /// # Safety
    /// `ptr` must address `len` f32 of device memory on this communicator's GPU
    /// that stays allocated, and is not used by other streams without
    /// synchronization, until the operation completes on `stream`; `stream` must
    /// be a live stream of this GPU's context.
    pub unsafe fn all_reduce_sum_f32_device(
        &self,
        ptr: dsys::CUdeviceptr,
        len: usize,
        stream: dsys::CUstream,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let comm = self.lock()?;
        nres::all_reduce(
            ptr as *const _,
            ptr as *mut _,
            len,
            f32::as_nccl_type(),
            nsys::ncclRedOp_t::ncclSum,
            comm.raw,
            stream as nsys::cudaStream_t,
        )
        .map_err(self.nccl_err("ncclAllReduce"))?;
        Ok(())
    }

    /// Enqueues an in-place broadcast from rank 0 of `len` f32 at `ptr` on
    /// `stream` (the initial or resumed adapter); returns without waiting.
    ///
    /// # Safety
    /// As for [`Nccl::all_reduce_sum_f32_device`].
    pub unsafe fn broadcast_f32_device(
        &self,
        ptr: dsys::CUdeviceptr,
        len: usize,
        stream: dsys::CUstream,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let comm = self.lock()?;
        nres::broadcast(
            ptr as *const _,
            ptr as *mut _,
            len,
            f32::as_nccl_type(),
            0,
            comm.raw,
            stream as nsys::cudaStream_t,
        )
        .map_err(self.nccl_err("ncclBroadcast"))?;
        Ok(())
    }

    /// A host buffer through device memory: copy in, `op`, wait, copy out.
    fn staged<T>(
        &self,
        buf: &mut [T],
        name: &'static str,
        op: impl FnOnce(
            nsys::ncclComm_t,
            dsys::CUdeviceptr,
            nsys::cudaStream_t,
        ) -> std::result::Result<nres::NcclStatus, nres::NcclError>,
    ) -> Result<()>
    where
        T: DeviceRepr + Copy,
    {
        if buf.is_empty() {
            return Ok(());
        }
        let mut comm = self.lock()?;
        let s = &self.stream;
        let mut dev = s
            .clone_htod(&*buf)
            .map_err(self.cuda_err("copying to the GPU"))?;
        {
            let (ptr, _record) = dev.device_ptr_mut(s);
            op(comm.raw, ptr, s.cu_stream() as nsys::cudaStream_t).map_err(self.nccl_err(name))?;
        }
        self.wait_locked(&mut comm, s.cu_stream(), name)?;
        s.memcpy_dtoh(&dev, buf)
            .map_err(self.cuda_err("copying from the GPU"))?;
        s.synchronize().map_err(self.cuda_err("synchronizing"))?;
        Ok(())
    }

    fn all_reduce_host<T>(
        &self,
        buf: &mut [T],
        op: nsys::ncclRedOp_t,
        name: &'static str,
    ) -> Result<()>
    where
        T: DeviceRepr + Copy + NcclType,
    {
        let len = buf.len();
        self.staged(buf, name, |comm, ptr, stream| unsafe {
            // SAFETY: `ptr` is the staging buffer of `len` T, alive until the wait.
            nres::all_reduce(
                ptr as *const _,
                ptr as *mut _,
                len,
                T::as_nccl_type(),
                op,
                comm,
                stream,
            )
        })
    }

    fn broadcast_host<T>(&self, buf: &mut [T], name: &'static str) -> Result<()>
    where
        T: DeviceRepr + Copy + NcclType,
    {
        let len = buf.len();
        self.staged(buf, name, |comm, ptr, stream| unsafe {
            // SAFETY: as in `all_reduce_host`.
            nres::broadcast(
                ptr as *const _,
                ptr as *mut _,
                len,
                T::as_nccl_type(),
                0,
                comm,
                stream,
            )
        })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        let comm = self.comm.get_mut().unwrap_or_else(|e| e.into_inner());
        if comm.aborted.is_none() {
            // Abort rather than destroy: destroy may wait on peers that are gone.
            // SAFETY: a live communicator, released once.
            unsafe {
                let _ = nres::comm_abort(comm.raw);
            }
        }
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    unsafe fn device_all_reduce_sum_f32(
        &self,
        ptr: u64,
        len: usize,
        stream: *mut std::ffi::c_void,
    ) -> Result<bool> {
        let stream = stream as dsys::CUstream;
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.all_reduce_sum_f32_device(ptr as dsys::CUdeviceptr, len, stream)? };
        self.wait(stream)?;
        Ok(true)
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_host(buf, nsys::ncclRedOp_t::ncclSum, "ncclAllReduce(sum f32)")
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce_host(buf, nsys::ncclRedOp_t::ncclSum, "ncclAllReduce(sum f64)")
    }

    fn all_reduce_sum_u64(&self, buf: &mut [u64]) -> Result<()> {
        self.all_reduce_host(buf, nsys::ncclRedOp_t::ncclSum, "ncclAllReduce(sum u64)")
    }

    fn all_reduce_max_u64(&self, value: u64) -> Result<u64> {
        let mut v = [value];
        self.all_reduce_host(&mut v, nsys::ncclRedOp_t::ncclMax, "ncclAllReduce(max u64)")?;
        Ok(v[0])
    }

    fn all_reduce_min_u64(&self, value: u64) -> Result<u64> {
        let mut v = [value];
        self.all_reduce_host(&mut v, nsys::ncclRedOp_t::ncclMin, "ncclAllReduce(min u64)")?;
        Ok(v[0])
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()> {
        let mut len = [buf.len() as u64];
        self.broadcast_host(&mut len, "ncclBroadcast(length)")?;
        buf.resize(len[0] as usize, 0);
        self.broadcast_host(buf.as_mut_slice(), "ncclBroadcast(bytes)")
    }

    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.broadcast_host(buf, "ncclBroadcast(f32)")
    }

    fn barrier(&self) -> Result<()> {
        // NCCL has no barrier: a one-element all-reduce completes only when every
        // rank has entered it.
        let mut v = [0u64];
        self.all_reduce_host(&mut v, nsys::ncclRedOp_t::ncclSum, "barrier")
    }
}
