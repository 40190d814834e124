//! CUDA launchers of the flash-attention kernels (`kernels/attention.cu`).

use crate::attention::AttnShape;
use crate::cuda::CudaDev;
use crate::device::{Float, Mat, View};
use crate::error::{KernelError, Result};

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_fwd<T: Float>(
    _c: &CudaDev,
    _s: &AttnShape,
    _q: Mat<'_, T>,
    _k: Mat<'_, T>,
    _v: Mat<'_, T>,
    _segments: Option<View<'_, u32>>,
    _o: Mat<'_, T>,
    _lse: View<'_, f32>,
) -> Result<()> {
    Err(KernelError::Unsupported {
        op: "attention_fwd",
        msg: "the CUDA flash-attention kernel is being written".into(),
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_bwd<T: Float>(
    _c: &CudaDev,
    _s: &AttnShape,
    _q: Mat<'_, T>,
    _k: Mat<'_, T>,
    _v: Mat<'_, T>,
    _o: Mat<'_, T>,
    _d_o: Mat<'_, T>,
    _lse: View<'_, f32>,
    _segments: Option<View<'_, u32>>,
    _dq: Mat<'_, T>,
    _dk: Mat<'_, T>,
    _dv: Mat<'_, T>,
    _scratch: View<'_, f32>,
) -> Result<()> {
    Err(KernelError::Unsupported {
        op: "attention_bwd",
        msg: "the CUDA flash-attention kernel is being written".into(),
    })
}
