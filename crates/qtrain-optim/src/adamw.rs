//! AdamW: [`AdamW8bit`] with bitsandbytes-style 8-bit blockwise state, and [`AdamW32`],
//! the same optimizer with f32 state, used as the reference in tests and as the model
//! for the small-tensor path of the 8-bit optimizer.
//!
//! This is the CPU implementation and the oracle for the later fused CUDA kernel, so
//! the arithmetic follows bitsandbytes' kernels operation for operation
//! (`kOptimizer8bit2StateBlockwise` / `kOptimizerStatic8bit2StateBlockwise` and
//! `kOptimizer32bit2State` in `csrc/kernels.cu`, `Optimizer2State` in
//! `bitsandbytes/optim/optimizer.py`):
//!
//! * The step counter `t` is incremented *before* the update, so the first update uses
//!   `t = 1`.
//! * `c1 = 1 - b1^t`, `c2 = sqrt(1 - b2^t)`, `step_size = -lr * c2 / c1`, all in f32.
//! * Per element, for a finite gradient `g`:
//!   `v = v*b2 + (1-b2)*g*g`, `m = m*b1 + (1-b1)*g`,
//!   `p = p + step_size * (m / (sqrt(v) + c2*eps))` (epsilon scaled by `c2`, which is
//!   `lr * m̂ / (sqrt(v̂) + eps)` rearranged so that only `step_size` depends on `t`),
//!   then decoupled weight decay `p = p * (1 - lr*wd)` *after* the Adam update, as
//!   bitsandbytes does (PyTorch's `AdamW` decays first; the difference is second order,
//!   `lr² * wd * update`).
//! * A non-finite gradient element leaves its parameter untouched and resets both of its
//!   moments to 0 (bitsandbytes' 8-bit behaviour; we apply it to f32 state as well, where
//!   bitsandbytes' 32-bit kernel would let the NaN into the state, so that a parameter's
//!   fate does not depend on its size). The trainer normally skips such steps entirely,
//!   see [`crate::clip_grad_norm`].
//!
//! 8-bit state, per parameter with at least `min_8bit_size` (4096) elements: blocks of
//! [`BLOCKSIZE`] (256) elements, each with one f32 absmax per moment. Each step, per
//! block: dequantize `m` (signed dynamic map) and `v` (unsigned dynamic map), update them
//! and the parameter in f32 as above (the parameter sees the *unquantized* new moments),
//! take the new absmax of each moment over the block, and requantize with
//! `qtrain_quant::quantize_blockwise`. After quantizing `m`, a code whose sign bit
//! differs from the value's is moved one step toward the value's sign (bitsandbytes
//! does the same), so a small negative momentum is stored as the smallest negative code
//! instead of the map's +0.
//! Smaller parameters keep f32 state, as in bitsandbytes (`min_8bit_size`).
//!
//! Known, deliberate differences from the CUDA kernel, irrelevant to training but
//! relevant to whoever makes the CUDA port bit-exact against this oracle:
//! normalization by the absmax is whatever `qtrain_quant::quantize_blockwise` does (the
//! bitsandbytes optimizer kernel uses the approximate `__fdividef`); the kernel also
//! counts the padding lanes of a ragged last block in the absmax (this code counts only
//! real elements); and nvcc contracts `a*b + c` into FMAs by default while Rust never
//! does, so the port must build with `-fmad=false` or mirror this code's roundings.
//! The port is `device/adamw8bit.cu`, driven by [`crate::device`]; it follows this
//! code in all three points.

use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};
use crate::paging::{PagingPolicy, StatePlacement};

/// Elements per quantization block of 8-bit state (bitsandbytes' optimizer blocksize).
pub const BLOCKSIZE: usize = 256;

/// Parameters with fewer elements than this keep f32 state (bitsandbytes' default
/// `min_8bit_size`): for small tensors the absmax overhead and the quantization error
/// are not worth the few bytes saved.
pub const DEFAULT_MIN_8BIT_SIZE: usize = 4096;

/// Hyper-parameters of AdamW, except the learning rate.
///
/// The learning rate is an argument of every [`AdamW8bit::step`] call instead: it comes
/// from the [`crate::LrSchedule`] and changes every step, and a config field that the
/// step ignores would be a trap. Defaults are bitsandbytes' `AdamW8bit` defaults.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// `(beta1, beta2)`, the decay rates of the first and second moment.
    pub betas: (f32, f32),
    /// Added to `sqrt(v̂)` in the denominator.
    pub eps: f32,
    /// Decoupled weight decay: each step multiplies parameters by `1 - lr * weight_decay`.
    pub weight_decay: f32,
    /// Parameters with fewer elements keep f32 state in [`AdamW8bit`].
    pub min_8bit_size: usize,
    /// How the state's placement is chosen (see [`crate::paging`]).
    pub paging: PagingPolicy,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            min_8bit_size: DEFAULT_MIN_8BIT_SIZE,
            paging: PagingPolicy::default(),
        }
    }
}

impl AdamWConfig {
    /// Checks that betas are in `[0, 1)`, `eps` is finite and positive and
    /// `weight_decay` is finite and non-negative.
    pub fn validate(&self) -> Result<()> {
        let (b1, b2) = self.betas;
        for (name, b) in [("beta1", b1), ("beta2", b2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(OptimError::InvalidConfig(format!(
                    "{name} = {b} must be in [0, 1)"
                )));
            }
        }
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return Err(OptimError::InvalidConfig(format!(
                "eps = {} must be finite and > 0",
                self.eps
            )));
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return Err(OptimError::InvalidConfig(format!(
                "weight-decay = {} must be finite and >= 0",
                self.weight_decay
            )));
        }
        Ok(())
    }
}

/// A trainable parameter as the optimizer sees it: a stable, unique name (the
/// safetensors key prefix of its state) and its element count.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ParamSpec {
    pub name: String,
    pub numel: usize,
}

impl ParamSpec {
    pub fn new(name: impl Into<String>, numel: usize) -> Self {
        ParamSpec {
            name: name.into(),
            numel,
        }
    }
}

/// The storage of one parameter's two moments.
#[derive(Clone, Debug, PartialEq)]
pub enum StateStorage {
    /// Plain f32 moments.
    F32 { m: Vec<f32>, v: Vec<f32> },
    /// 8-bit codes into the signed (`m`) and unsigned (`v`) dynamic maps, with one f32
    /// absmax per [`BLOCKSIZE`] block.
    Blockwise8 {
        m_q: Vec<u8>,
        m_absmax: Vec<f32>,
        v_q: Vec<u8>,
        v_absmax: Vec<f32>,
    },
}

/// The storage format of one parameter's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateFormat {
    F32,
    Blockwise8,
}

impl StateFormat {
    /// The format an optimizer gives a parameter of `numel` elements: 8-bit
    /// (`eight_bit`, i.e. [`AdamW8bit`]) from `config.min_8bit_size` elements up,
    /// f32 otherwise. What the memory planner sizes the state with.
    pub fn for_param(eight_bit: bool, numel: usize, config: &AdamWConfig) -> Self {
        let kind = if eight_bit {
            OptimizerKind::AdamW8bit
        } else {
            OptimizerKind::AdamW32
        };
        kind.format_for(numel, config)
    }

    /// Bytes of state for `numel` elements in this format: two f32 moments, or two
    /// 8-bit moments plus one f32 absmax per moment and [`BLOCKSIZE`] block.
    pub fn bytes(self, numel: usize) -> u64 {
        let n = numel as u64;
        match self {
            StateFormat::F32 => 8 * n,
            StateFormat::Blockwise8 => 2 * n + 8 * num_blocks(numel) as u64,
        }
    }
}

/// Number of [`BLOCKSIZE`] blocks covering `numel` elements.
pub(crate) fn num_blocks(numel: usize) -> usize {
    numel.div_ceil(BLOCKSIZE)
}

/// The optimizer state of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamState {
    pub(crate) name: String,
    pub(crate) numel: usize,
    pub(crate) storage: StateStorage,
}

impl ParamState {
    /// Zero state, as bitsandbytes initializes it: zero codes and zero absmax
    /// dequantize to exactly zero moments.
    pub(crate) fn zeros(name: String, numel: usize, format: StateFormat) -> Self {
        let storage = match format {
            StateFormat::F32 => StateStorage::F32 {
                m: vec![0.0; numel],
                v: vec![0.0; numel],
            },
            StateFormat::Blockwise8 => StateStorage::Blockwise8 {
                m_q: vec![0; numel],
                m_absmax: vec![0.0; num_blocks(numel)],
                v_q: vec![0; numel],
                v_absmax: vec![0.0; num_blocks(numel)],
            },
        };
        ParamState {
            name,
            numel,
            storage,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn numel(&self) -> usize {
        self.numel
    }

    pub fn storage(&self) -> &StateStorage {
        &self.storage
    }

    pub fn format(&self) -> StateFormat {
        match self.storage {
            StateStorage::F32 { .. } => StateFormat::F32,
            StateStorage::Blockwise8 { .. } => StateFormat::Blockwise8,
        }
    }

    /// Bytes of state held for this parameter.
    pub fn bytes(&self) -> u64 {
        self.format().bytes(self.numel)
    }

    /// The moments `(m, v)` as f32 (dequantized for 8-bit state).
    pub fn moments(&self) -> (Vec<f32>, Vec<f32>) {
        match &self.storage {
            StateStorage::F32 { m, v } => (m.clone(), v.clone()),
            StateStorage::Blockwise8 {
                m_q,
                m_absmax,
                v_q,
                v_absmax,
            } => {
                let mut m = vec![0.0; self.numel];
                let mut v = vec![0.0; self.numel];
                qtrain_quant::dequantize_blockwise(
                    m_q,
                    m_absmax,
                    qtrain_quant::signed_dynamic_map(),
                    BLOCKSIZE,
                    &mut m,
                );
                qtrain_quant::dequantize_blockwise(
                    v_q,
                    v_absmax,
                    qtrain_quant::unsigned_dynamic_map(),
                    BLOCKSIZE,
                    &mut v,
                );
                (m, v)
            }
        }
    }
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The step count after this step (1 after the first step).
    pub step: u64,
    /// The learning rate used.
    pub lr: f32,
    /// Gradient elements that were NaN or infinite (their parameters were left alone and
    /// their moments reset).
    pub nonfinite_grads: u64,
    /// L2 norm of the change of all parameters (Adam update plus weight decay),
    /// accumulated in f64.
    pub update_norm: f32,
}

/// Which optimizer a [`Core`] is, as written to checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OptimizerKind {
    AdamW8bit,
    AdamW32,
}

impl OptimizerKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OptimizerKind::AdamW8bit => "adamw8bit",
            OptimizerKind::AdamW32 => "adamw32",
        }
    }

    /// The state format this optimizer gives a parameter of `numel` elements.
    pub(crate) fn format_for(self, numel: usize, config: &AdamWConfig) -> StateFormat {
        match self {
            OptimizerKind::AdamW8bit if numel >= config.min_8bit_size => StateFormat::Blockwise8,
            _ => StateFormat::F32,
        }
    }
}

/// The shared implementation behind [`AdamW8bit`] and [`AdamW32`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Core {
    pub(crate) kind: OptimizerKind,
    pub(crate) config: AdamWConfig,
    pub(crate) states: Vec<ParamState>,
    pub(crate) step: u64,
    pub(crate) placement: StatePlacement,
}

impl Core {
    pub(crate) fn new(
        kind: OptimizerKind,
        config: AdamWConfig,
        params: &[ParamSpec],
    ) -> Result<Self> {
        config.validate()?;
        check_names(params.iter().map(|p| p.name.as_str()))?;
        let states = params
            .iter()
            .map(|p| ParamState::zeros(p.name.clone(), p.numel, kind.format_for(p.numel, &config)))
            .collect();
        Ok(Core::from_parts(kind, config, states, 0))
    }

    /// Assembles a core from already validated parts and decides the placement.
    pub(crate) fn from_parts(
        kind: OptimizerKind,
        config: AdamWConfig,
        states: Vec<ParamState>,
        step: u64,
    ) -> Self {
        let bytes = states.iter().map(ParamState::bytes).sum();
        Core {
            kind,
            placement: config.paging.placement(bytes),
            config,
            states,
            step,
        }
    }

    pub(crate) fn state_bytes(&self) -> u64 {
        self.states.iter().map(ParamState::bytes).sum()
    }

    pub(crate) fn param_specs(&self) -> Vec<ParamSpec> {
        self.states
            .iter()
            .map(|s| ParamSpec::new(s.name.clone(), s.numel))
            .collect()
    }

    pub(crate) fn step(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        lr: f32,
    ) -> Result<StepStats> {
        // Validate everything before touching anything, so a failed call leaves the
        // optimizer exactly as it was.
        if params.len() != self.states.len() || grads.len() != self.states.len() {
            return Err(OptimError::ParamCount {
                expected: self.states.len(),
                params: params.len(),
                grads: grads.len(),
            });
        }
        for ((state, p), g) in self.states.iter().zip(params.iter()).zip(grads) {
            for (what, len) in [("parameter", p.len()), ("gradient", g.len())] {
                if len != state.numel {
                    return Err(OptimError::ParamLen {
                        name: state.name.clone(),
                        what,
                        expected: state.numel,
                        found: len,
                    });
                }
            }
        }
        if !lr.is_finite() || lr < 0.0 {
            return Err(OptimError::InvalidLr(lr));
        }

        self.step += 1;
        let c = Coeffs::new(&self.config, self.step, lr);
        // Parameters are independent: update them on all cores, in contiguous runs
        // of parameters per thread. Each element's arithmetic is the same whatever the
        // split, so results are bit-identical for any thread count; only the f64
        // update-norm statistic is summed per run and then in run order.
        let mut work: Vec<Work<'_>> = self
            .states
            .iter_mut()
            .zip(params.iter_mut())
            .zip(grads)
            .map(|((s, p), g)| (s, &mut **p, *g))
            .collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let total: usize = work.iter().map(|w| w.0.numel).sum();
        // Small problems (tests, tiny models) are not worth a thread.
        let runs = if total < (1 << 20) {
            1
        } else {
            threads.min(work.len()).max(1)
        };
        let per_run = total.div_ceil(runs);
        let mut chunks: Vec<Vec<Work<'_>>> = Vec::new();
        let mut filled = usize::MAX;
        for w in work.drain(..) {
            if filled >= per_run {
                chunks.push(Vec::new());
                filled = 0;
            }
            filled += w.0.numel;
            chunks.last_mut().expect("a run").push(w);
        }
        let update = |chunk: Vec<Work<'_>>| {
            let mut acc = Acc::default();
            for (state, p, g) in chunk {
                update_storage(&mut state.storage, p, g, &c, &mut acc);
            }
            acc
        };
        let accs: Vec<Acc> = if chunks.len() <= 1 {
            chunks.into_iter().map(update).collect()
        } else {
            std::thread::scope(|sc| {
                let handles: Vec<_> = chunks
                    .into_iter()
                    .map(|ch| sc.spawn(move || update(ch)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("optimizer thread panicked"))
                    .collect()
            })
        };
        let mut acc = Acc::default();
        for a in accs {
            acc.nonfinite += a.nonfinite;
            acc.update_sq += a.update_sq;
        }
        Ok(StepStats {
            step: self.step,
            lr,
            nonfinite_grads: acc.nonfinite,
            update_norm: acc.update_sq.sqrt() as f32,
        })
    }
}

/// Rejects empty and duplicate names (they are safetensors keys).
pub(crate) fn check_names<'a>(names: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if name.is_empty() {
            return Err(OptimError::InvalidConfig("empty parameter name".into()));
        }
        if !seen.insert(name) {
            return Err(OptimError::DuplicateName(name.to_string()));
        }
    }
    Ok(())
}

/// One AdamW update of one parameter's values `p` and state with gradient `g`
/// (same lengths, checked by the caller), in the arithmetic of its state format.
pub(crate) fn update_storage(
    storage: &mut StateStorage,
    p: &mut [f32],
    g: &[f32],
    c: &Coeffs,
    acc: &mut Acc,
) {
    match storage {
        StateStorage::F32 { m, v } => update_f32(p, g, m, v, c, acc),
        StateStorage::Blockwise8 {
            m_q,
            m_absmax,
            v_q,
            v_absmax,
        } => update_blockwise8(p, g, m_q, m_absmax, v_q, v_absmax, c, acc),
    }
}

/// One parameter's share of a step: its state, values and gradient.
type Work<'a> = (&'a mut ParamState, &'a mut [f32], &'a [f32]);

/// Per-step scalars, computed once in f32 exactly as bitsandbytes computes them (on
/// the host also for the CUDA kernel, which receives them as arguments).
pub(crate) struct Coeffs {
    pub(crate) b1: f32,
    pub(crate) b2: f32,
    pub(crate) step_size: f32,
    /// `c2 * eps`: epsilon moved inside the bias-corrected denominator.
    pub(crate) eps_hat: f32,
    /// `1 - lr*wd`, or `None` when weight decay is off (bitsandbytes tests `wd > 0`).
    pub(crate) decay: Option<f32>,
}

impl Coeffs {
    pub(crate) fn new(config: &AdamWConfig, step: u64, lr: f32) -> Self {
        let (b1, b2) = config.betas;
        let t = step as f32;
        let c1 = 1.0 - b1.powf(t);
        let c2 = (1.0 - b2.powf(t)).sqrt();
        Coeffs {
            b1,
            b2,
            step_size: -lr * c2 / c1,
            eps_hat: c2 * config.eps,
            decay: (config.weight_decay > 0.0).then_some(1.0 - lr * config.weight_decay),
        }
    }
}

/// What a step accumulates besides the update itself (see [`StepStats`]).
#[derive(Default)]
pub(crate) struct Acc {
    pub(crate) nonfinite: u64,
    pub(crate) update_sq: f64,
}

impl Acc {
    #[inline]
    fn moved(&mut self, old: f32, new: f32) {
        let d = f64::from(new) - f64::from(old);
        self.update_sq += d * d;
    }
}

/// f32 state: bitsandbytes' `kOptimizer32bit2State` (ADAM) arithmetic.
fn update_f32(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &Coeffs, acc: &mut Acc) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        if !g.is_finite() {
            *m = 0.0;
            *v = 0.0;
            acc.nonfinite += 1;
            continue;
        }
        *m = *m * c.b1 + (1.0 - c.b1) * g;
        *v = *v * c.b2 + (1.0 - c.b2) * (g * g);
        let old = *p;
        let mut new = old + c.step_size * (*m / (v.sqrt() + c.eps_hat));
        if let Some(d) = c.decay {
            new *= d;
        }
        *p = new;
        acc.moved(old, new);
    }
}

/// 8-bit blockwise state: bitsandbytes' `kOptimizer8bit2StateBlockwise` (ADAM)
/// arithmetic, one [`BLOCKSIZE`] block at a time through a stack scratch buffer, which
/// is also how the fused kernel works (one thread block per state block).
#[allow(clippy::too_many_arguments)]
fn update_blockwise8(
    p: &mut [f32],
    g: &[f32],
    m_q: &mut [u8],
    m_absmax: &mut [f32],
    v_q: &mut [u8],
    v_absmax: &mut [f32],
    c: &Coeffs,
    acc: &mut Acc,
) {
    let signed: &[f32] = qtrain_quant::signed_dynamic_map();
    let unsigned: &[f32] = qtrain_quant::unsigned_dynamic_map();
    let mut m_buf = [0.0f32; BLOCKSIZE];
    let mut v_buf = [0.0f32; BLOCKSIZE];
    for b in 0..num_blocks(p.len()) {
        let r = b * BLOCKSIZE..((b + 1) * BLOCKSIZE).min(p.len());
        let n = r.len();
        let (m, v) = (&mut m_buf[..n], &mut v_buf[..n]);
        let ab = b..b + 1;
        qtrain_quant::dequantize_blockwise(
            &m_q[r.clone()],
            &m_absmax[ab.clone()],
            signed,
            BLOCKSIZE,
            m,
        );
        qtrain_quant::dequantize_blockwise(
            &v_q[r.clone()],
            &v_absmax[ab.clone()],
            unsigned,
            BLOCKSIZE,
            v,
        );

        for (((p, &g), m), v) in p[r.clone()]
            .iter_mut()
            .zip(&g[r.clone()])
            .zip(m.iter_mut())
            .zip(v.iter_mut())
        {
            if !g.is_finite() {
                *m = 0.0;
                *v = 0.0;
                acc.nonfinite += 1;
                continue;
            }
            // Same order as the kernel: v first, and (1-b2)*g*g left to right.
            *v = *v * c.b2 + (1.0 - c.b2) * g * g;
            *m = *m * c.b1 + (1.0 - c.b1) * g;
            let old = *p;
            let mut new = old + c.step_size * (*m / (v.sqrt() + c.eps_hat));
            if let Some(d) = c.decay {
                new *= d;
            }
            *p = new;
            acc.moved(old, new);
        }

        qtrain_quant::quantize_blockwise(
            m,
            signed,
            BLOCKSIZE,
            &mut m_q[r.clone()],
            &mut m_absmax[ab.clone()],
        );
        keep_sign(m, signed, &mut m_q[r.clone()]);
        qtrain_quant::quantize_blockwise(v, unsigned, BLOCKSIZE, &mut v_q[r], &mut v_absmax[ab]);
    }
}

/// Moves every code whose map value has the opposite sign bit of the value it encodes
/// one step toward the value's sign, exactly as the bitsandbytes kernel does after
/// quantizing the first moment. In practice this catches one case: a negative momentum
/// below half the smallest code of its block rounds to the map's zero, which is +0, and
/// would lose its direction; it becomes the smallest negative code instead. (A small
/// positive momentum rounds to +0, whose sign bit agrees, and stays there.)
/// The u8 arithmetic wraps like the kernel's `unsigned char`.
pub(crate) fn keep_sign(values: &[f32], code: &[f32], q: &mut [u8]) {
    for (q, &x) in q.iter_mut().zip(values) {
        if code[usize::from(*q)].is_sign_negative() != x.is_sign_negative() {
            *q = if x > 0.0 {
                q.wrapping_add(1)
            } else {
                q.wrapping_sub(1)
            };
        }
    }
}

/// The common interface of [`AdamW8bit`] and [`AdamW32`], for callers that pick one at
/// run time. Both types also have these as inherent methods.
pub trait Optimizer {
    /// One AdamW update of all parameters with learning rate `lr`; see
    /// [`AdamW8bit::step`].
    fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]], lr: f32) -> Result<StepStats>;
    /// Number of steps taken.
    fn step_count(&self) -> u64;
    /// Per-parameter state, in parameter order.
    fn states(&self) -> &[ParamState];
    /// Total bytes of state.
    fn state_bytes(&self) -> u64;
    /// Where the state lives.
    fn placement(&self) -> StatePlacement;
    /// Writes the state to a safetensors file, atomically.
    fn save_state(&self, path: &std::path::Path) -> Result<()>;
}

macro_rules! optimizer_type {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq)]
        pub struct $name {
            pub(crate) core: Core,
        }

        impl $name {
            pub(crate) fn from_core(core: Core) -> Self {
                $name { core }
            }

            /// A fresh optimizer (zero state, step 0) for `params`, in the order in which
            /// `step` will receive them. Names must be unique and non-empty.
            pub fn new(config: AdamWConfig, params: &[ParamSpec]) -> Result<Self> {
                Ok($name {
                    core: Core::new($kind, config, params)?,
                })
            }

            /// One AdamW update of every parameter: `params[i]` and `grads[i]` belong to
            /// the `i`-th [`ParamSpec`] given at construction and must have its length.
            /// The step count is incremented first, so the first call uses `t = 1` for
            /// bias correction. On error nothing has changed.
            pub fn step(
                &mut self,
                params: &mut [&mut [f32]],
                grads: &[&[f32]],
                lr: f32,
            ) -> Result<StepStats> {
                self.core.step(params, grads, lr)
            }

            /// Number of steps taken (0 for a fresh optimizer). Pass it as `step` to
            /// [`crate::LrSchedule::lr_at`] for the next update.
            pub fn step_count(&self) -> u64 {
                self.core.step
            }

            pub fn config(&self) -> &AdamWConfig {
                &self.core.config
            }

            /// Per-parameter state, in parameter order.
            pub fn states(&self) -> &[ParamState] {
                &self.core.states
            }

            /// The parameters this optimizer was built for, in order.
            pub fn param_specs(&self) -> Vec<ParamSpec> {
                self.core.param_specs()
            }

            /// Total bytes of optimizer state.
            pub fn state_bytes(&self) -> u64 {
                self.core.state_bytes()
            }

            /// Where the state lives, as chosen by the config's [`PagingPolicy`] from
            /// [`Self::state_bytes`]. On the CPU both placements are plain host memory.
            pub fn placement(&self) -> StatePlacement {
                self.core.placement
            }

            /// Writes config, step count and all state to a safetensors file at `path`,
            /// atomically (temporary file in the same directory, fsync, rename). See
            /// [`crate::checkpoint`] for the layout.
            pub fn save_state(&self, path: &std::path::Path) -> Result<()> {
                crate::checkpoint::save(&self.core, path)
            }

            /// Restores an optimizer from a file written by `save_state`, trusting the
            /// file for the parameter list. Continuing from it is bit-exact.
            pub fn load_state(path: &std::path::Path) -> Result<Self> {
                Ok($name {
                    core: crate::checkpoint::load(path, $kind, None)?,
                })
            }

            /// Like [`Self::load_state`], but checks the file against the parameters the
            /// caller trains now: every one must have state of the right shape (errors
            /// name the tensor key), there must be no state for other parameters, and
            /// the result takes `params`' order.
            pub fn load_state_for(path: &std::path::Path, params: &[ParamSpec]) -> Result<Self> {
                Ok($name {
                    core: crate::checkpoint::load(path, $kind, Some(params))?,
                })
            }
        }

        impl Optimizer for $name {
            fn step(
                &mut self,
                params: &mut [&mut [f32]],
                grads: &[&[f32]],
                lr: f32,
            ) -> Result<StepStats> {
                $name::step(self, params, grads, lr)
            }
            fn step_count(&self) -> u64 {
                $name::step_count(self)
            }
            fn states(&self) -> &[ParamState] {
                $name::states(self)
            }
            fn state_bytes(&self) -> u64 {
                $name::state_bytes(self)
            }
            fn placement(&self) -> StatePlacement {
                $name::placement(self)
            }
            fn save_state(&self, path: &std::path::Path) -> Result<()> {
                $name::save_state(self, path)
            }
        }
    };
}

optimizer_type!(
    /// AdamW with 8-bit blockwise state for parameters of at least `min_8bit_size`
    /// elements and f32 state for smaller ones, as bitsandbytes' `AdamW8bit`.
    /// See the module docs for the exact arithmetic.
    AdamW8bit,
    OptimizerKind::AdamW8bit
);

optimizer_type!(
    /// AdamW with f32 state for every parameter (`min_8bit_size` is ignored): the
    /// reference the 8-bit optimizer is tested against, with the same arithmetic as
    /// bitsandbytes' 32-bit kernel.
    AdamW32,
    OptimizerKind::AdamW32
);
