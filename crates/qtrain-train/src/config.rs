//! The run configuration: the TOML schema of `qtrain run --config FILE`, its
//! defaults, `--set key.path=value` overrides, and validation that reports every
//! problem at once with its key path.
//!
//! Unknown keys are errors everywhere (`deny_unknown_fields`): a typo must never
//! silently fall back to a default. Parse errors carry the file, line and column.

use qtrain_data::DatasetConfig;
use qtrain_engine::AttnBackward;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A configuration problem, naming the file and where in it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A TOML syntax error, an unknown key or a wrong type, with line and column.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// `--set` problems.
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
    /// Values that parse but make no sense; every one is listed.
    #[error("{path}: invalid configuration:\n  {}", problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct RunConfig {
    pub model: ModelSection,
    pub lora: LoraSection,
    pub data: DatasetConfig,
    pub train: TrainSection,
    pub optimizer: OptimizerSection,
    pub budget: BudgetSection,
    pub checkpoint: CheckpointSection,
    pub eval: EvalSection,
    pub log: LogSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A Hugging Face model directory, a hub id (`org/name[@rev]`), or
    /// `builtin:tiny` (a seeded random tiny Mistral generated on first use).
    pub path: String,
    /// `nf4` (frozen 4-bit base) or `none` (base in the compute dtype).
    pub quantization: String,
    pub double_quant: bool,
    /// Quantize once, keep the bitsandbytes-format copy for later starts.
    pub quantized_cache: bool,
    /// `auto` (bf16 on GPUs that have it, f32 on the CPU), `bf16`, `f16`, `f32`.
    pub dtype: String,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

impl ModelSection {
    /// The frozen weights' storage `quantization` and `double_quant` ask for.
    pub fn quantization_spec(&self) -> qtrain_model::Quantization {
        if self.quantization == "none" {
            qtrain_model::Quantization::None
        } else {
            qtrain_model::Quantization::Nf4 {
                blocksize: 64,
                double_quant: self.double_quant,
            }
        }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: "builtin:tiny".into(),
            quantization: "nf4".into(),
            double_quant: true,
            quantized_cache: true,
            dtype: "auto".into(),
            device: "auto".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub targets: Vec<String>,
    pub rslora: bool,
    pub seed: u64,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            rslora: false,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Data batches (of `data.batch_size` rows) per optimizer step: the effective
    /// batch is `data.batch_size x grad_accum` rows. Stays 1 with
    /// `data.batch_size = "auto"`, where `effective_batch` sets it instead.
    pub grad_accum: usize,
    /// Rows per optimizer step, with `data.batch_size = "auto"` only (required
    /// then): the trainer runs `ceil(effective_batch / m)` passes per step, `m` the
    /// largest micro-batch that fits the GPU by the memory model (`qtrain plan`).
    pub effective_batch: Option<usize>,
    /// Out of GPU memory during the run: `retry` (checkpoint, then continue with
    /// half the micro-batch and twice the passes per step: the same rows per step,
    /// the same data order) or `stop` (checkpoint, then stop naming the setting to
    /// lower).
    pub oom: String,
    /// Recompute each layer in backward instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// Global-norm gradient clipping (0 disables).
    pub max_grad_norm: f32,
    /// Stop after this many optimizer steps in a row with a NaN/Inf loss.
    pub max_nonfinite_steps: usize,
    /// Seeds dropout masks.
    pub seed: u64,
    /// The step implementation: `fused` (hand-written kernels over preallocated
    /// buffers, bf16 or fp16 on GPUs), `reference` (candle ops, any device and
    /// dtype), or `auto` (fused on a GPU, reference otherwise).
    pub engine: String,
    /// Keep each layer's q/k/v (after RoPE), residual after attention, attention
    /// output and log-sum-exp from the forward, so that the backward recomputes
    /// neither the q/k/v product, RoPE, the attention forward nor the o projection
    /// (fused engine; costs `layers x tokens x (2 hidden + q/k/v width)`
    /// compute-type elements: 3.5 GiB for Mistral-7B at 4096 tokens per
    /// micro-batch): `on`, `off`, or `auto` (on when the memory
    /// model says it fits the GPU beside the micro-batch; the micro-batch comes
    /// first, and an out-of-memory turns it off before halving anything).
    pub keep_attention_residuals: String,
    /// Keep each layer's gate/up output from the forward, so that the backward does
    /// not recompute the gate/up product, the largest GEMM of the recomputation
    /// (fused engine; costs `layers x tokens x 2 x intermediate` compute-type
    /// elements: 7 GiB for Mistral-7B at 4096 tokens per micro-batch): `on`, `off`,
    /// or `auto` (every layer's when the memory model says they fit beside the
    /// micro-batch and the attention residuals, else the first layers' that fit;
    /// an out-of-memory gives them back first).
    pub keep_mlp_activations: String,
    /// Keep every layer's frozen weights dequantized in the compute type once they
    /// have been dequantized, instead of dequantizing each layer's NF4 weights into
    /// one shared buffer twice per step (fused engine, not with `precision =
    /// "fp8"`; costs a layer's weights per layer: 13 GiB for Mistral-7B in bf16;
    /// results are identical): `on`, `off`, or `auto` (on when the memory model says
    /// it fits after the kept activations; an out-of-memory gives it back first).
    pub keep_dequantized_base: String,
    /// Keep the gradient checkpoints (every layer's input: `layers x tokens x
    /// hidden` compute-type elements, 16 GiB for Mistral-7B at 65536 tokens) in
    /// pinned host memory instead of on the GPU, copied out and back on a side
    /// stream beside the compute (fused engine; gradients are identical): `on`,
    /// `off`, or `auto` (on when the memory model says the run does not fit the GPU
    /// without it and does with it, or when offloading is what lets more
    /// activations be kept (the attention half, whose buffers then travel too, or
    /// more layers' gate/up outputs) with the copies hidden behind the compute; and
    /// the host has the memory available: `memory::offload_checkpoints`).
    pub offload_checkpoints: String,
    /// The frozen base's products: `auto` (in the compute type, `model.dtype`) or
    /// `fp8` (E4M3 on the FP8 tensor cores of compute capability 8.9+, with one
    /// scale per token and per weight channel; fused engine only; opt-in, because
    /// it does not yet meet its quality gates on small models: docs/perf.md).
    pub precision: String,
    /// Tokens per MLP chunk of the fused engine: the SwiGLU output, its gradient
    /// and (unless `keep_mlp_activations` keeps every layer's) the gate/up output
    /// exist for this many tokens at a time (`tokens x 4 x intermediate`
    /// compute-type elements without kept gate/up: 448 MiB for Mistral-7B at 4096).
    /// A smaller chunk saves memory at the cost of reading each MLP weight once
    /// more per chunk (about 1% at 2048 on 7B).
    pub mlp_chunk_tokens: usize,
    /// Rows (tokens) per cross-entropy chunk of the fused engine: the f32 logits and
    /// their gradient exist for this many rows at a time (`rows x vocab x (4 + 2)`
    /// bytes in bf16: 192 MiB for a 32768-word vocabulary at 1024). 512 saves 96 MiB
    /// there for a few more, smaller lm_head products (the memory-saving set-up).
    pub loss_chunk_tokens: usize,
    /// The attention backward's kernels on a GPU: `split` (two kernels, dK/dV then dQ;
    /// bit-reproducible), `fused` (one pass over K/V, dQ summed in a fixed order:
    /// bit-reproducible, two of seven products fewer, `tokens x (heads + 2 kv_heads) x
    /// head_dim` f32 more memory: 24 KiB per token on Mistral-7B) or `fused-atomic` (the same with atomic adds, FlashAttention-2's
    /// way: no waiting, but dQ's rounding varies run to run). Both fused ones are 3.0x /
    /// 2.2x slower than `split` on an H100 today (docs/perf.md v8). `stored-ds` (H100/H200,
    /// head dim 128): split, with the dK/dV kernel's dS stored for the dQ kernel (five
    /// products, bit-reproducible; the dS store grows as seq^2, chunked by kv heads at
    /// 2.5 GiB: 2.2 GB at 1 x 8192 on Mistral-7B, docs/perf.md v20).
    pub attention_backward: String,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            grad_accum: 1,
            effective_batch: None,
            oom: "retry".into(),
            gradient_checkpointing: true,
            max_grad_norm: 1.0,
            max_nonfinite_steps: 5,
            seed: 0,
            engine: "auto".into(),
            keep_attention_residuals: "auto".into(),
            keep_mlp_activations: "auto".into(),
            keep_dequantized_base: "auto".into(),
            offload_checkpoints: "auto".into(),
            precision: "auto".into(),
            mlp_chunk_tokens: qtrain_engine::EngineOptions::default().mlp_chunk,
            loss_chunk_tokens: qtrain_engine::EngineOptions::default().ce_chunk,
            attention_backward: qtrain_engine::EngineOptions::default()
                .attention_backward
                .name()
                .into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSection {
    /// `adamw8bit` (bitsandbytes-style 8-bit state) or `adamw32`.
    pub kind: String,
    pub lr: f32,
    /// `constant`, `linear` or `cosine`; its length is the planner's step count.
    pub schedule: String,
    pub warmup_steps: u64,
    /// The schedule's floor as a fraction of `lr`.
    pub min_lr_ratio: f32,
    pub betas: [f32; 2],
    pub eps: f32,
    pub weight_decay: f32,
    /// Optimizer state in pinned host memory, streamed to the GPU: `auto`, `always`, `never`.
    pub paged: String,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            kind: "adamw8bit".into(),
            lr: 2e-4,
            schedule: "cosine".into(),
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            paged: "auto".into(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetSection {
    /// Wall-clock budget; exactly one of hours / minutes / steps.
    pub hours: Option<f64>,
    pub minutes: Option<f64>,
    /// A fixed number of optimizer steps instead of a time budget.
    pub steps: Option<u64>,
    /// Seconds kept free at the end for the final checkpoint and export; measured
    /// from the periodic checkpoints when unset.
    pub reserve_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Where checkpoints, metrics, the final adapter and logs go.
    pub output_dir: PathBuf,
    /// Checkpoint every N optimizer steps (0: off).
    pub every_steps: u64,
    /// Checkpoint every N minutes of training (0: off).
    pub every_minutes: f64,
    /// Keep the newest K checkpoints.
    pub keep_last: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/qtrain"),
            every_steps: 0,
            every_minutes: 15.0,
            keep_last: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Eval loss on the held-out split every N optimizer steps (0: only at the end).
    pub every_steps: u64,
    /// Batches per evaluation (0: the whole held-out split).
    pub max_batches: usize,
    /// Held-out prompts answered greedily at the end of the run, shown next to the
    /// reference answer.
    pub samples: usize,
    /// Tokens generated per sample at most.
    pub max_new_tokens: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every_steps: 100,
            max_batches: 16,
            samples: 4,
            max_new_tokens: 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub every_steps: u64,
    pub jsonl: bool,
    pub tensorboard: bool,
    /// Draw an indicatif progress bar (off automatically when stderr is no terminal).
    pub progress_bar: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            every_steps: 1,
            jsonl: true,
            tensorboard: true,
            progress_bar: true,
        }
    }
}

/// The longest time budget accepted: a year. Longer values are typos (or
/// `--hours 6e15`), and would overflow the clock.
pub const MAX_BUDGET_HOURS: f64 = 24.0 * 365.0;

/// A budget given on the command line, which replaces the config's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BudgetFlag {
    Hours(f64),
    Minutes(f64),
    Steps(u64),
}

const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl RunConfig {
    /// Reads `path`, applies `--set` overrides and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_toml_str(&text, path, overrides)
    }

    /// Parses TOML text (`path` names it in messages), applies `--set` overrides,
    /// then a command-line budget (which replaces the config's), and validates.
    /// Errors in the text point into it (line and column of the user's file);
    /// errors of an override name the `--set`.
    pub fn from_toml_str_with_budget(
        text: &str,
        path: &Path,
        overrides: &[String],
        budget: Option<BudgetFlag>,
    ) -> Result<Self, ConfigError> {
        let cfg = Self::parse_with_overrides(text, path, overrides)?;
        let cfg = match budget {
            Some(b) => cfg.with_budget(b),
            None => cfg,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Parses TOML text (`path` names it in messages).
    pub fn from_toml_str(
        text: &str,
        path: &Path,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let cfg = Self::parse_with_overrides(text, path, overrides)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn parse_with_overrides(
        text: &str,
        path: &Path,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        // Parse into the typed schema first so errors point into the user's file.
        let cfg: RunConfig = parse_typed(text, path)?;
        let cfg = if overrides.is_empty() {
            cfg
        } else {
            let mut table: toml::Table =
                toml::from_str(text).map_err(|e| parse_error(text, path, e))?;
            for arg in overrides {
                apply_override(&mut table, arg)?;
            }
            let merged = toml::to_string(&table).expect("a table serializes");
            toml::from_str::<RunConfig>(&merged).map_err(|e| ConfigError::Override {
                arg: overrides.join(" "),
                message: e.message().to_string(),
            })?
        };
        Ok(cfg)
    }

    /// Every problem with its key path; `Ok` when there is none.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        self.model_problems(&mut p);
        self.lora_problems(&mut p);
        if let Err(e) = self.data.validate() {
            p.push(format!("data: {e}"));
        }
        self.train_problems(&mut p);
        self.optimizer_problems(&mut p);
        self.budget_problems(&mut p);
        self.checkpoint_problems(&mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems: p,
            })
        }
    }

    /// The problems of `model`.
    fn model_problems(&self, p: &mut Vec<String>) {
        let m = &self.model;
        if m.path.trim().is_empty() {
            p.push("model.path: must name a model directory, hub id or builtin:tiny".to_string());
        }
        if !["nf4", "none"].contains(&m.quantization.as_str()) {
            p.push(format!(
                "model.quantization: `{}` (expected nf4 or none)",
                m.quantization
            ));
        }
        if !["auto", "bf16", "f16", "f32"].contains(&m.dtype.as_str()) {
            p.push(format!(
                "model.dtype: `{}` (expected auto, bf16, f16 or f32)",
                m.dtype
            ));
        }
        let dev_ok = ["auto", "cpu", "cuda"].contains(&m.device.as_str())
            || m.device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        if !dev_ok {
            p.push(format!(
                "model.device: `{}` (expected auto, cpu, cuda or cuda:N)",
                m.device
            ));
        }
    }

    /// The problems of `lora`.
    fn lora_problems(&self, p: &mut Vec<String>) {
        let l = &self.lora;
        if l.rank == 0 {
            p.push("lora.rank: must be > 0".into());
        }
        if !(l.alpha.is_finite() && l.alpha > 0.0) {
            p.push(format!("lora.alpha: {} must be finite and > 0", l.alpha));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            p.push(format!("lora.dropout: {} must be in [0, 1)", l.dropout));
        }
        if l.targets.is_empty() {
            p.push("lora.targets: at least one projection".into());
        }
        for t in &l.targets {
            if !TARGETS.contains(&t.as_str()) {
                p.push(format!(
                    "lora.targets: unknown `{t}` (expected some of {})",
                    TARGETS.join(", ")
                ));
            }
        }
    }

    /// The problems of `train` (some depend on `data.batch_size`).
    fn train_problems(&self, p: &mut Vec<String>) {
        let t = &self.train;
        if t.grad_accum == 0 {
            p.push("train.grad_accum: must be >= 1".into());
        }
        if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
            p.push(format!(
                "train.max_grad_norm: {} must be finite and >= 0",
                t.max_grad_norm
            ));
        }
        match (self.data.batch_size_is_auto(), t.effective_batch) {
            (true, None) => p.push(
                "train.effective_batch: required with data.batch_size = \"auto\" (rows per \
                 optimizer step; the micro-batch that fits is chosen by the memory model)"
                    .into(),
            ),
            (true, Some(0)) => p.push("train.effective_batch: must be >= 1".into()),
            (true, Some(_)) if t.grad_accum != 1 => p.push(format!(
                "train.grad_accum: {} with data.batch_size = \"auto\"; leave it at 1 (the \
                 accumulation is train.effective_batch / the micro-batch that fits)",
                t.grad_accum
            )),
            (false, Some(_)) => p.push(
                "train.effective_batch: only with data.batch_size = \"auto\" (with an integer \
                 batch size the effective batch is data.batch_size x train.grad_accum)"
                    .into(),
            ),
            _ => {}
        }
        for (key, v) in [
            ("keep_attention_residuals", &t.keep_attention_residuals),
            ("keep_mlp_activations", &t.keep_mlp_activations),
            ("keep_dequantized_base", &t.keep_dequantized_base),
            ("offload_checkpoints", &t.offload_checkpoints),
        ] {
            if !["auto", "on", "off"].contains(&v.as_str()) {
                p.push(format!("train.{key}: `{v}` (expected auto, on or off)"));
            }
        }
        if !["auto", "fp8"].contains(&t.precision.as_str()) {
            p.push(format!(
                "train.precision: `{}` (expected auto or fp8)",
                t.precision
            ));
        }
        if t.mlp_chunk_tokens == 0 {
            p.push("train.mlp_chunk_tokens: must be >= 1 (tokens per MLP chunk)".into());
        }
        if t.loss_chunk_tokens == 0 {
            p.push("train.loss_chunk_tokens: must be >= 1 (rows per cross-entropy chunk)".into());
        }
        if AttnBackward::parse(&t.attention_backward).is_none() {
            p.push(format!(
                "train.attention_backward: `{}` (expected split, fused, fused-atomic or stored-ds)",
                t.attention_backward
            ));
        }
        if t.precision == "fp8" && t.engine == "reference" {
            p.push(
                "train.precision = \"fp8\" runs on the fused engine, not train.engine = \"reference\""
                    .into(),
            );
        }
        if !["retry", "stop"].contains(&t.oom.as_str()) {
            p.push(format!("train.oom: `{}` (expected retry or stop)", t.oom));
        }
        if t.max_nonfinite_steps == 0 {
            p.push("train.max_nonfinite_steps: must be >= 1".into());
        }
        if !crate::backend::EngineKind::SETTINGS.contains(&t.engine.as_str()) {
            p.push(format!(
                "train.engine: `{}` (expected auto, fused or reference)",
                t.engine
            ));
        }
    }

    /// The problems of `optimizer`.
    fn optimizer_problems(&self, p: &mut Vec<String>) {
        let o = &self.optimizer;
        if !["adamw8bit", "adamw32"].contains(&o.kind.as_str()) {
            p.push(format!(
                "optimizer.kind: `{}` (expected adamw8bit or adamw32)",
                o.kind
            ));
        }
        if !(o.lr.is_finite() && o.lr > 0.0) {
            p.push(format!("optimizer.lr: {} must be finite and > 0", o.lr));
        }
        if !["constant", "linear", "cosine"].contains(&o.schedule.as_str()) {
            p.push(format!(
                "optimizer.schedule: `{}` (expected constant, linear or cosine)",
                o.schedule
            ));
        }
        if !(0.0..=1.0).contains(&o.min_lr_ratio) {
            p.push(format!(
                "optimizer.min_lr_ratio: {} must be in [0, 1]",
                o.min_lr_ratio
            ));
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                p.push(format!("optimizer.betas[{i}]: {b} must be in [0, 1)"));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            p.push(format!("optimizer.eps: {} must be finite and > 0", o.eps));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            p.push(format!(
                "optimizer.weight_decay: {} must be finite and >= 0",
                o.weight_decay
            ));
        }
        if !["auto", "always", "never"].contains(&o.paged.as_str()) {
            p.push(format!(
                "optimizer.paged: `{}` (expected auto, always or never)",
                o.paged
            ));
        }
    }

    /// The problems of `budget`.
    fn budget_problems(&self, p: &mut Vec<String>) {
        let b = &self.budget;
        let sources = [b.hours.is_some(), b.minutes.is_some(), b.steps.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        if sources > 1 {
            p.push("budget: set only one of hours, minutes, steps".into());
        }
        for (k, v, per_hour) in [
            ("budget.hours", b.hours, 1.0),
            ("budget.minutes", b.minutes, 60.0),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    p.push(format!("{k}: {v} must be a finite number > 0"));
                } else if v / per_hour > MAX_BUDGET_HOURS {
                    p.push(format!(
                        "{k}: {v} is longer than a year ({MAX_BUDGET_HOURS} hours); give the \
                         time the run may really take"
                    ));
                }
            }
        }
        if b.steps == Some(0) {
            p.push("budget.steps: must be >= 1".into());
        }
        if let Some(r) = b.reserve_seconds {
            if !(r.is_finite() && r >= 0.0) {
                p.push(format!(
                    "budget.reserve_seconds: {r} must be a finite number >= 0"
                ));
            } else if r > MAX_BUDGET_HOURS * 3600.0 {
                p.push(format!(
                    "budget.reserve_seconds: {r} is longer than a year; it is the time kept \
                     free at the end of the budget for the final checkpoint and export"
                ));
            } else if let Some(crate::planner::Budget::Time(t)) = self.budget_kind() {
                if r >= t.as_secs_f64() {
                    p.push(format!(
                        "budget.reserve_seconds: {r} s leaves nothing of the {:.0} s budget for \
                         training",
                        t.as_secs_f64()
                    ));
                }
            }
        }
    }

    /// The problems of `checkpoint` and `log`.
    fn checkpoint_problems(&self, p: &mut Vec<String>) {
        let c = &self.checkpoint;
        if c.keep_last == 0 {
            p.push("checkpoint.keep_last: must be >= 1".into());
        }
        if !(c.every_minutes.is_finite() && c.every_minutes >= 0.0) {
            p.push(format!(
                "checkpoint.every_minutes: {} must be finite and >= 0",
                c.every_minutes
            ));
        }
        if self.log.every_steps == 0 {
            p.push("log.every_steps: must be >= 1".into());
        }
    }

    /// The budget as the planner takes it, after CLI overrides. (Validation keeps
    /// it within a year; an unvalidated value is clamped to that, never a panic.)
    pub fn budget_kind(&self) -> Option<crate::planner::Budget> {
        use crate::planner::Budget;
        let secs = |s: f64| {
            std::time::Duration::from_secs_f64(if s.is_finite() {
                s.clamp(0.0, MAX_BUDGET_HOURS * 3600.0)
            } else {
                MAX_BUDGET_HOURS * 3600.0
            })
        };
        let b = &self.budget;
        if let Some(s) = b.steps {
            Some(Budget::Steps(s))
        } else if let Some(h) = b.hours {
            Some(Budget::Time(secs(h * 3600.0)))
        } else {
            b.minutes.map(|m| Budget::Time(secs(m * 60.0)))
        }
    }

    /// Replaces whatever budget the file and `--set` give with `budget` (the CLI's
    /// `--hours`, `--minutes` or `--steps`), keeping `reserve_seconds`.
    pub fn with_budget(mut self, budget: BudgetFlag) -> Self {
        let b = &mut self.budget;
        (b.hours, b.minutes, b.steps) = (None, None, None);
        match budget {
            BudgetFlag::Hours(h) => b.hours = Some(h),
            BudgetFlag::Minutes(m) => b.minutes = Some(m),
            BudgetFlag::Steps(s) => b.steps = Some(s),
        }
        self
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}

fn parse_typed(text: &str, path: &Path) -> Result<RunConfig, ConfigError> {
    toml::from_str(text).map_err(|e| parse_error(text, path, e))
}

/// A toml error as `file:line:column: key.path: message` (the key path when the
/// message does not already name it).
fn parse_error(text: &str, path: &Path, e: toml::de::Error) -> ConfigError {
    let mut message = e.message().trim().to_string();
    let (line, column) = match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            if let Some(key) = key_at(text, start) {
                if !message.contains(&key) {
                    message = format!("{key}: {message}");
                }
            }
            (line, column)
        }
        None => (0, 0),
    };
    ConfigError::Parse {
        path: path.to_path_buf(),
        line,
        column,
        message,
    }
}

/// The dotted key path whose line holds byte `offset` of a TOML text: the last
/// `[table]` header before it and the key left of the `=` on that line.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.split(']').next())
        .map(|t| t.trim().to_string());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

/// Applies `section.key=value` to a parsed table. The value is read as a TOML
/// value (`3e-4`, `true`, `["q_proj"]`), or as a string when it is not one.
pub fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Override {
        arg: arg.to_string(),
        message,
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected key.path=value".into()))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err(format!("`{key}` is not a key path")));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed v"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let mut cur = &mut *table;
    for part in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| err(format!("`{part}` is a value, not a section")))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    // An unknown key is caught when the merged table is read back into the schema.
    let probe = toml::to_string(&*table).expect("table serializes");
    toml::from_str::<RunConfig>(&probe)
        .map(|_| ())
        .map_err(|e| err(e.message().trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("run.toml")
    }

    #[test]
    fn every_shipped_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "toml") {
                RunConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 6, "expected the six shipped configs, found {n}");
    }

    #[test]
    fn typo_reports_line_column_and_key() {
        let text = "[lora]\nrank = 8\nrnak = 4\n";
        let e = RunConfig::from_toml_str(text, p(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("run.toml:3:1:"), "{e}");
        assert!(e.contains("rnak"), "{e}");
    }

    #[test]
    fn wrong_type_reports_position() {
        let text = "[optimizer]\nlr = \"fast\"\n";
        let e = RunConfig::from_toml_str(text, p(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("run.toml:2:6:"), "{e}");
    }

    #[test]
    fn all_problems_reported_at_once() {
        let text = "[lora]\nrank = 0\ndropout = 1.5\ntargets = [\"q_proj\", \"qkv\"]\n[optimizer]\nlr = -1.0\n[budget]\nhours = 1.0\nsteps = 10\n";
        let e = RunConfig::from_toml_str(text, p(), &[]).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &e else {
            panic!("{e}")
        };
        let all = problems.join("\n");
        for needle in [
            "lora.rank",
            "lora.dropout",
            "`qkv`",
            "optimizer.lr",
            "budget: set only one",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
        assert_eq!(problems.len(), 5, "{all}");
    }

    #[test]
    fn offload_checkpoints_takes_auto_on_or_off() {
        assert_eq!(RunConfig::default().train.offload_checkpoints, "auto");
        for v in ["auto", "on", "off"] {
            let text = format!("[train]\noffload_checkpoints = \"{v}\"\n");
            let cfg = RunConfig::from_toml_str(&text, p(), &[]).unwrap();
            assert_eq!(cfg.train.offload_checkpoints, v);
        }
        let e = RunConfig::from_toml_str("[train]\noffload_checkpoints = \"yes\"\n", p(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.offload_checkpoints: `yes` (expected auto, on or off)"),
            "{e}"
        );
    }

    #[test]
    fn attention_backward_is_split_by_default_and_names_its_choices() {
        assert_eq!(RunConfig::default().train.attention_backward, "split");
        let model = qtrain_model::ModelConfig::preset("mistral-7b-v0.3", 0).unwrap();
        for mode in AttnBackward::ALL {
            let text = format!("[train]\nattention_backward = \"{mode}\"\n");
            let cfg = RunConfig::from_toml_str(&text, p(), &[]).unwrap();
            let spec = crate::memory::MemorySpec::for_run(
                &cfg,
                &model,
                candle_core::DType::BF16,
                crate::backend::EngineKind::Fused,
                1,
                8192,
                Some((9, 0)),
            );
            assert_eq!(spec.engine_options.attention_backward, mode);
        }
        let e = RunConfig::from_toml_str("[train]\nattention_backward = \"fast\"\n", p(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "train.attention_backward: `fast` (expected split, fused, fused-atomic or stored-ds)"
            ),
            "{e}"
        );
    }

    #[test]
    fn mlp_chunk_tokens_defaults_to_the_engines_and_refuses_zero() {
        assert_eq!(RunConfig::default().train.mlp_chunk_tokens, 8192);
        let cfg = RunConfig::from_toml_str("[train]\nmlp_chunk_tokens = 2048\n", p(), &[]).unwrap();
        assert_eq!(cfg.train.mlp_chunk_tokens, 2048);
        let model = qtrain_model::ModelConfig::preset("mistral-7b-v0.3", 0).unwrap();
        let spec = crate::memory::MemorySpec::for_run(
            &cfg,
            &model,
            candle_core::DType::BF16,
            crate::backend::EngineKind::Fused,
            8,
            512,
            Some((9, 0)),
        );
        assert_eq!(spec.engine_options.mlp_chunk, 2048);
        let e = RunConfig::from_toml_str("[train]\nmlp_chunk_tokens = 0\n", p(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.mlp_chunk_tokens: must be >= 1"), "{e}");
    }

    #[test]
    fn loss_chunk_tokens_defaults_to_the_engines_and_refuses_zero() {
        assert_eq!(RunConfig::default().train.loss_chunk_tokens, 1024);
        let cfg = RunConfig::from_toml_str("[train]\nloss_chunk_tokens = 512\n", p(), &[]).unwrap();
        let model = qtrain_model::ModelConfig::preset("mistral-7b-v0.3", 0).unwrap();
        let spec = |cfg: &RunConfig| {
            crate::memory::MemorySpec::for_run(
                cfg,
                &model,
                candle_core::DType::BF16,
                crate::backend::EngineKind::Fused,
                8,
                512,
                Some((9, 0)),
            )
        };
        let (half, whole) = (spec(&cfg), spec(&RunConfig::default()));
        assert_eq!(half.engine_options.ce_chunk, 512);
        // Half the rows: half of the f32 logits and their bf16 gradient (32768 words)
        // and of the hidden rows gathered for them.
        let saved = whole.predict().total() - half.predict().total();
        let expected = 512 * (32768 * (4 + 2) + 2 * 4096 * 2);
        assert!(
            saved >= expected && saved < expected + expected / 20,
            "saved {saved} bytes, expected {expected} (+ slack)"
        );
        let e = RunConfig::from_toml_str("[train]\nloss_chunk_tokens = 0\n", p(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.loss_chunk_tokens: must be >= 1"), "{e}");
    }

    #[test]
    fn overrides_apply_and_unknown_keys_are_named() {
        let cfg = RunConfig::from_toml_str(
            "[optimizer]\nlr = 1e-4\n",
            p(),
            &[
                "optimizer.lr=3e-4".into(),
                "lora.targets=[\"q_proj\",\"v_proj\"]".into(),
                "model.path=some/dir".into(),
            ],
        )
        .unwrap();
        assert_eq!(cfg.optimizer.lr, 3e-4);
        assert_eq!(cfg.lora.targets, vec!["q_proj", "v_proj"]);
        assert_eq!(cfg.model.path, "some/dir");
        let e = RunConfig::from_toml_str("", p(), &["optimizer.lrr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("optimizer.lrr=1") && e.contains("lrr"), "{e}");
        let e = RunConfig::from_toml_str("", p(), &["nonsense".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key.path=value"), "{e}");
    }

    #[test]
    fn batch_size_takes_an_integer_or_auto() {
        let text = "[data]\nbatch_size = \"auto\"\n[train]\neffective_batch = 32\n";
        let cfg = RunConfig::from_toml_str(text, p(), &[]).unwrap();
        assert!(cfg.data.batch_size_is_auto());
        assert_eq!(cfg.train.effective_batch, Some(32));
        // Written back as "auto".
        assert!(
            cfg.to_toml().contains("batch_size = \"auto\""),
            "{}",
            cfg.to_toml()
        );
        assert_eq!(
            RunConfig::from_toml_str(&cfg.to_toml(), p(), &[]).unwrap(),
            cfg
        );
        for (bad, found) in [
            ("\"big\"", "\"big\""),
            ("0", "0"),
            ("-3", "-3"),
            ("1.5", "1.5"),
        ] {
            let text = format!("[data]\nseq_len = 64\nbatch_size = {bad}\n");
            let e = RunConfig::from_toml_str(&text, p(), &[])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("run.toml:3:14:"), "{e}");
            assert!(
                e.contains("data.batch_size") && e.contains("\"auto\""),
                "{e}"
            );
            assert!(e.contains(found), "{e}");
        }
        let e = RunConfig::from_toml_str("", p(), &["data.batch_size=lots".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.batch_size"), "{e}");
    }

    #[test]
    fn auto_batch_and_oom_settings_are_checked_by_key() {
        let problems = |text: &str| match RunConfig::from_toml_str(text, p(), &[]) {
            Err(ConfigError::Invalid { problems, .. }) => problems.join("\n"),
            other => panic!("{other:?}"),
        };
        let all = problems("[data]\nbatch_size = \"auto\"\n[train]\noom = \"pray\"\n");
        assert!(all.contains("train.effective_batch: required"), "{all}");
        assert!(all.contains("train.oom: `pray`"), "{all}");
        let all = problems(
            "[data]\nbatch_size = \"auto\"\n[train]\neffective_batch = 16\ngrad_accum = 4\n",
        );
        assert!(all.starts_with("train.grad_accum: 4"), "{all}");
        let all = problems("[data]\nbatch_size = 4\n[train]\neffective_batch = 16\n");
        assert!(all.starts_with("train.effective_batch: only with"), "{all}");
        let cfg = RunConfig::from_toml_str("[train]\noom = \"stop\"\n", p(), &[]).unwrap();
        assert_eq!(cfg.train.oom, "stop");
        assert_eq!(RunConfig::default().train.oom, "retry");
    }

    #[test]
    fn wrong_type_names_its_key() {
        let text = "[model]\npath = \"x\"\n\n[optimizer]\nwarmup_steps = 3\nlr = \"fast\"\n";
        let e = RunConfig::from_toml_str(text, p(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("run.toml:6:6: optimizer.lr: "), "{e}");
    }

    /// A budget given on the command line replaces the file's (conflicting ones
    /// included) without moving the positions of errors elsewhere in the file.
    #[test]
    fn budget_flags_keep_positions_in_the_users_file() {
        let mut text = String::from("[budget]\nhours = 1.0\nsteps = 5\n");
        for i in 0..14 {
            text.push_str(&format!("# line {}\n", i + 4));
        }
        text.push_str("[lora]\nrnak = 4\n");
        let flag = Some(BudgetFlag::Minutes(3.0));
        let e = RunConfig::from_toml_str_with_budget(&text, p(), &[], flag)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("run.toml:19:1: lora.rnak: "), "{e}");
        let typed = "[budget]\nhours = 1.0\n[optimizer]\n\n\nlr = true\n";
        let e = RunConfig::from_toml_str_with_budget(typed, p(), &[], flag)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("run.toml:6:6: optimizer.lr: "), "{e}");
        let cfg = RunConfig::from_toml_str_with_budget(
            "[budget]\nhours = 1.0\nsteps = 5\n",
            p(),
            &[],
            flag,
        )
        .unwrap();
        assert_eq!(
            (cfg.budget.minutes, cfg.budget.hours, cfg.budget.steps),
            (Some(3.0), None, None)
        );
        let e = RunConfig::from_toml_str_with_budget("", p(), &["optimizer.lr=x".into()], flag)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--set optimizer.lr=x: "), "{e}");
    }

    #[test]
    fn absurd_budgets_are_refused_without_panicking() {
        for (text, sets, needle) in [
            (
                "[budget]\nhours = 6e15\n",
                vec![],
                "budget.hours: 6000000000000000 is longer than a year",
            ),
            (
                "[budget]\nminutes = 1e18\n",
                vec![],
                "budget.minutes: 1000000000000000000 is longer",
            ),
            (
                "[budget]\nhours = 1.0\n",
                vec!["budget.reserve_seconds=1e30".to_string()],
                "budget.reserve_seconds: 1000000000000000000000000000000 is longer than a year",
            ),
            (
                "[budget]\nminutes = 1.0\nreserve_seconds = 60.0\n",
                vec![],
                "leaves nothing of the 60 s budget",
            ),
            (
                "[budget]\nminutes = nan\n",
                vec![],
                "budget.minutes: NaN must be a finite number > 0",
            ),
        ] {
            let e = RunConfig::from_toml_str(text, p(), &sets)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
        let mut c = RunConfig::default();
        c.budget.hours = Some(1e300);
        assert!(c.budget_kind().is_some(), "clamped, not a panic");
    }

    #[test]
    fn round_trips_through_toml() {
        let cfg = RunConfig::default();
        let back = RunConfig::from_toml_str(&cfg.to_toml(), p(), &[]).unwrap();
        assert_eq!(back, cfg);
    }
}
