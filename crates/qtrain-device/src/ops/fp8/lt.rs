//! The scaled FP8 GEMM through cuBLASLt: E4M3 operands, f32 accumulation, the
//! per-row scales of both operands applied in the epilogue
//! (`CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F`), output and accumulation source in
//! the compute type.
//!
//! cuBLASLt's FP8 kernels take only the "TN" layout: both operands with `k`
//! contiguous. Row-major `C[m, n] = A[m, k] · B[n, k]ᵀ` is column-major
//! `Cᵀ (n x m) = op(B') · A'` with `B'` = our `b` seen as a column-major `k x n`
//! matrix, transposed (`op = T`), and `A'` = our `a` seen as `k x m`, not
//! transposed; the outer-vector scale of the first operand has one entry per row
//! of `op(B')` (our `sb`), that of the second one per column (our `sa`).
//!
//! One handle and one workspace per device, created on first use; the algorithm
//! chosen by cuBLASLt's heuristic is cached per shape (descriptors are cheap, the
//! heuristic is not).

use crate::cuda::{cuda_err, CudaDev, DeviceMem};
use crate::device::{Float, FloatKind, Mat, View};
use crate::error::{DeviceError, Result};
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

/// cuBLASLt's recommended workspace for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

struct LtState {
    handle: sys::cublasLtHandle_t,
    workspace: DeviceMem,
    algos: HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>,
}

// SAFETY: the handle is used under the mutex below only.
unsafe impl Send for LtState {}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct AlgoKey {
    ordinal: usize,
    dims: (usize, usize, usize),
    lds: (usize, usize, usize),
    out: FloatKind,
    beta: bool,
    fast: bool,
}

fn states() -> &'static Mutex<HashMap<usize, LtState>> {
    static S: OnceLock<Mutex<HashMap<usize, LtState>>> = OnceLock::new();
    S.get_or_init(Mutex::default)
}

fn lt_err(op: &'static str, e: impl std::fmt::Debug) -> DeviceError {
    cuda_err(op, e)
}

/// Destroys cuBLASLt objects when the call returns (also on errors).
struct Guard {
    desc: Option<sys::cublasLtMatmulDesc_t>,
    layouts: Vec<sys::cublasLtMatrixLayout_t>,
    pref: Option<sys::cublasLtMatmulPreference_t>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: each object was created by cuBLASLt and is destroyed once.
        unsafe {
            if let Some(d) = self.desc {
                let _ = lt::destroy_matmul_desc(d);
            }
            for &l in &self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            if let Some(p) = self.pref {
                let _ = lt::destroy_matmul_pref(p);
            }
        }
    }
}

fn set_desc<V>(
    d: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &V,
) -> Result<()> {
    // SAFETY: `v` is the attribute's C type (checked by the callers' choice of V).
    unsafe {
        lt::set_matmul_desc_attribute(
            d,
            attr,
            v as *const V as *const c_void,
            std::mem::size_of::<V>(),
        )
    }
    .map_err(|e| lt_err("cublasLtMatmulDescSetAttribute", (attr, e)))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_fp8<T: Float>(
    cu: &CudaDev,
    a: Mat<'_, u8>,
    sa: View<'_, f32>,
    b: Mat<'_, u8>,
    sb: View<'_, f32>,
    c: Mat<'_, T>,
    beta: f32,
    fast_accum: bool,
) -> Result<()> {
    use sys::cublasLtMatmulDescAttributes_t as A;
    let (m, k, n) = (a.rows, a.cols, b.rows);
    // FP8 GEMMs need 16-byte aligned operands and leading dimensions.
    let ld = |x: usize, cols: usize| x.max(cols).max(1);
    let (lda, ldb, ldc) = (ld(a.ld, a.cols), ld(b.ld, b.cols), ld(c.ld, c.cols));
    if !(k.is_multiple_of(16)
        && lda.is_multiple_of(16)
        && ldb.is_multiple_of(16)
        && a.dptr().is_multiple_of(16)
        && b.dptr().is_multiple_of(16))
    {
        return Err(DeviceError::Unsupported {
            op: "gemm_fp8",
            msg: format!(
                "cuBLASLt's FP8 GEMM needs k and the codes' row pitch to be multiples of 16 \
                 bytes (k = {k}, pitches {lda} and {ldb})"
            ),
        });
    }
    let out_type = match T::KIND {
        FloatKind::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        FloatKind::F16 => sys::cudaDataType::CUDA_R_16F,
        FloatKind::F32 => sys::cudaDataType::CUDA_R_32F,
    };
    let ordinal = cu.ordinal();
    let mut states = states().lock().unwrap();
    let st = match states.entry(ordinal) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let handle = lt::create_handle().map_err(|e| lt_err("cublasLtCreate", e))?;
            let workspace = cu.alloc_zeroed(WORKSPACE_BYTES, "cuBLASLt workspace", 0)?;
            e.insert(LtState {
                handle,
                workspace,
                algos: HashMap::new(),
            })
        }
    };

    let mut g = Guard {
        desc: None,
        layouts: Vec::new(),
        pref: None,
    };
    let desc = lt::create_matmul_desc(
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cudaDataType::CUDA_R_32F,
    )
    .map_err(|e| lt_err("cublasLtMatmulDescCreate", e))?;
    g.desc = Some(desc);
    set_desc(
        desc,
        A::CUBLASLT_MATMUL_DESC_TRANSA,
        &candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
    )?;
    set_desc(
        desc,
        A::CUBLASLT_MATMUL_DESC_TRANSB,
        &candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
    )?;
    set_desc(
        desc,
        A::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
        &(fast_accum as i8),
    )?;
    let mode = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode)?;
    set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode)?;
    // First operand: our b (its scales, one per output column of C); second: our a.
    let (sbp, sap) = (sb.dptr() as *const c_void, sa.dptr() as *const c_void);
    set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sbp)?;
    set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sap)?;

    let layout = |t: sys::cudaDataType, rows: usize, cols: usize, ld: usize| {
        lt::create_matrix_layout(t, rows as u64, cols as u64, ld as i64)
            .map_err(|e| lt_err("cublasLtMatrixLayoutCreate", e))
    };
    let la = layout(sys::cudaDataType::CUDA_R_8F_E4M3, k, n, ldb)?;
    g.layouts.push(la);
    let lb = layout(sys::cudaDataType::CUDA_R_8F_E4M3, k, m, lda)?;
    g.layouts.push(lb);
    let lc = layout(out_type, n, m, ldc)?;
    g.layouts.push(lc);

    let key = AlgoKey {
        ordinal,
        dims: (m, n, k),
        lds: (lda, ldb, ldc),
        out: T::KIND,
        beta: beta != 0.0,
        fast: fast_accum,
    };
    let algo = match st.algos.get(&key) {
        Some(a) => *a,
        None => {
            let pref = lt::create_matmul_pref()
                .map_err(|e| lt_err("cublasLtMatmulPreferenceCreate", e))?;
            g.pref = Some(pref);
            let ws = WORKSPACE_BYTES as u64;
            // SAFETY: MAX_WORKSPACE_BYTES is a uint64_t.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const c_void,
                    8,
                )
            }
            .map_err(|e| lt_err("cublasLtMatmulPreferenceSetAttribute", e))?;
            // SAFETY: every descriptor is alive (the guard owns them).
            let h = unsafe { lt::get_matmul_algo_heuristic(st.handle, desc, la, lb, lc, lc, pref) }
                .map_err(|e| {
                    lt_err(
                        "cublasLtMatmulAlgoGetHeuristic (FP8 e4m3, outer-vector scales)",
                        (e, m, n, k),
                    )
                })?;
            st.algos.insert(key, h.algo);
            h.algo
        }
    };
    let alpha = 1.0f32;
    // SAFETY: shapes and leading dimensions were checked by the caller and above;
    // the scale vectors hold m and n f32; C is read (beta != 0) and written in
    // place, which cuBLASLt allows when C and D share a layout; the workspace is
    // ours and only used on this stream.
    unsafe {
        lt::matmul(
            st.handle,
            desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            b.dptr() as *const c_void,
            la,
            a.dptr() as *const c_void,
            lb,
            c.dptr() as *const c_void,
            lc,
            c.dptr() as *mut c_void,
            lc,
            &algo,
            st.workspace.ptr() as *mut c_void,
            WORKSPACE_BYTES,
            cu.stream().cu_stream() as sys::cudaStream_t,
        )
    }
    .map_err(|e| lt_err("cublasLtMatmul (FP8 e4m3)", (e, m, n, k)))
}
