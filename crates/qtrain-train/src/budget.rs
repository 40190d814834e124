//! The whole-process time budget: what the run's phases outside the steps cost
//! (measured, or predicted before they happen), the checks that refuse a budget
//! they do not fit, and the accounting the run ends with.
//!
//! The contract: from process start to exit, a run with a time budget `B` ends
//! within `[B - max(1% of B, 30 s), B]`. The planner ([`crate::planner`]) fills the
//! time with steps and the periodic evaluations and checkpoints; what follows the
//! last step (final checkpoint, PEFT export, final evaluation, sample answers) is
//! reserved from measurements of the same phases earlier in the run, plus a safety
//! margin of [`MARGIN_SHARE`] of the window for step-time noise.
//!
//! Before loading, the fixed costs are forecast from the timings of the last run of
//! the same model on the same device (a small JSON file in the qtrain cache,
//! [`History`]), else from the model's size at an optimistic disk rate; a budget
//! they do not fit is refused with the numbers before anything is loaded.

use crate::metrics::Record;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the process's time went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Checking the inputs, resolving the model, reading the tokenizer.
    Setup,
    /// Loading (and on the first run quantizing) the frozen base.
    Load,
    /// Evaluations: before training, periodic, final.
    Evaluation,
    /// Sample answers before and after training.
    Samples,
    /// Optimizer steps.
    Steps,
    /// Checkpoints: periodic and final.
    Checkpoints,
    /// The PEFT adapter export.
    Export,
}

const PHASES: [Phase; 7] = [
    Phase::Setup,
    Phase::Load,
    Phase::Evaluation,
    Phase::Samples,
    Phase::Steps,
    Phase::Checkpoints,
    Phase::Export,
];

impl Phase {
    pub fn key(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Load => "load",
            Phase::Evaluation => "evaluation",
            Phase::Samples => "samples",
            Phase::Steps => "steps",
            Phase::Checkpoints => "checkpoints",
            Phase::Export => "export",
        }
    }
}

/// Seconds per phase of this process.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accounting {
    secs: [f64; PHASES.len()],
}

impl Accounting {
    pub fn add(&mut self, phase: Phase, d: Duration) {
        self.secs[phase as usize] += d.as_secs_f64();
    }

    pub fn secs(&self, phase: Phase) -> f64 {
        self.secs[phase as usize]
    }

    /// `budget 240 s (of it 0 s used before this resume), process 231.2 s: load
    /// 20.1 s, ..., other 0.4 s`.
    pub fn summary(&self, budget: Option<Duration>, before: Duration, wall: Duration) -> String {
        let known: f64 = self.secs.iter().sum();
        let mut parts: Vec<String> = PHASES
            .iter()
            .map(|&p| format!("{} {:.1} s", p.key(), self.secs(p)))
            .collect();
        parts.push(format!(
            "other {:.1} s",
            (wall.as_secs_f64() - known).max(0.0)
        ));
        let budget = match budget {
            Some(b) if before.is_zero() => format!("budget {:.1} s, ", b.as_secs_f64()),
            Some(b) => format!(
                "budget {:.1} s ({:.1} s of it spent before this resume), ",
                b.as_secs_f64(),
                before.as_secs_f64()
            ),
            None => String::new(),
        };
        format!(
            "{budget}process wall time {:.1} s: {}",
            wall.as_secs_f64(),
            parts.join(", ")
        )
    }

    /// The same as a metrics record (`budget/*` keys).
    pub fn record(
        &self,
        step: u64,
        budget: Option<Duration>,
        before: Duration,
        wall: Duration,
    ) -> Record {
        let mut extra = Vec::new();
        if let Some(b) = budget {
            extra.push(("budget/budget_s".to_string(), b.as_secs_f64()));
        }
        extra.push(("budget/before_s".to_string(), before.as_secs_f64()));
        extra.push(("budget/wall_s".to_string(), wall.as_secs_f64()));
        let known: f64 = self.secs.iter().sum();
        for p in PHASES {
            extra.push((format!("budget/{}_s", p.key()), self.secs(p)));
        }
        extra.push((
            "budget/other_s".to_string(),
            (wall.as_secs_f64() - known).max(0.0),
        ));
        Record {
            step,
            elapsed_s: (before + wall).as_secs_f64(),
            extra,
            ..Record::default()
        }
    }
}

/// Seconds for messages: `0.006 s`, `36.5 s`, `240 s`.
pub fn format_secs(s: f64) -> String {
    if s < 1.0 {
        format!("{s:.3} s")
    } else if s < 100.0 {
        format!("{s:.1} s")
    } else {
        format!("{s:.0} s")
    }
}

/// Share of the window `max(1% of B, 30 s)` kept free at the end against step-time
/// noise and mispredicted final phases.
pub const MARGIN_SHARE: f64 = 0.3;

/// The lower edge of the window a run of budget `b` must end in: `b - max(1%, 30 s)`.
pub fn window(b: Duration) -> Duration {
    b.saturating_sub(Duration::from_secs_f64((0.01 * b.as_secs_f64()).max(30.0)))
}

/// The safety margin of a budget `b`.
pub fn margin(b: Duration) -> Duration {
    (b - window(b)).mul_f64(MARGIN_SHARE)
}

/// Disk write rate assumed before one is measured (bytes/s): a slow network disk.
const DEFAULT_WRITE_RATE: f64 = 100e6;
/// Read rate assumed for a model never loaded here (bytes/s): a fast NVMe disk, so
/// the forecast is a lower bound and refuses only budgets that cannot work.
const OPTIMISTIC_READ_RATE: f64 = 3e9;
/// Seconds per generated token assumed before sampling was measured.
const DEFAULT_SAMPLE_S_PER_TOKEN: f64 = 0.05;

/// What the phases after the last step cost, measured during the run and carried
/// by checkpoints so a resume plans with them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseCosts {
    /// One evaluation, seconds (moving average).
    pub eval_s: Option<f64>,
    /// The sample answers, seconds.
    pub samples_s: Option<f64>,
    /// One checkpoint, seconds (moving average).
    pub ckpt_s: Option<f64>,
    /// The rate checkpoints were written at, bytes/s (predicts the export).
    pub write_bytes_per_s: Option<f64>,
}

fn average(old: Option<f64>, new: f64) -> Option<f64> {
    Some(match old {
        None => new,
        Some(o) => o + 0.5 * (new - o),
    })
}

impl PhaseCosts {
    pub fn record_eval(&mut self, d: Duration) {
        self.eval_s = average(self.eval_s, d.as_secs_f64());
    }

    pub fn record_checkpoint(&mut self, d: Duration, bytes: u64) {
        self.ckpt_s = average(self.ckpt_s, d.as_secs_f64());
        if d.as_secs_f64() > 0.0 {
            self.write_bytes_per_s =
                average(self.write_bytes_per_s, bytes as f64 / d.as_secs_f64());
        }
    }

    pub fn record_samples(&mut self, d: Duration) {
        self.samples_s = Some(d.as_secs_f64());
    }
}

/// The sizes and settings the predictions scale with.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sizes {
    /// Bytes of one checkpoint (adapter, optimizer state, trainer state).
    pub checkpoint_bytes: u64,
    /// Bytes of the exported PEFT adapter.
    pub adapter_bytes: u64,
    /// Tokens of one evaluation (0 when the whole split is read: unknown).
    pub eval_tokens: u64,
    /// Tokens of one optimizer step.
    pub step_tokens: u64,
    /// Tokens the sample answers generate at most.
    pub sample_tokens: u64,
    /// Whether the run ends with an evaluation and sample answers.
    pub final_eval: bool,
    pub samples: bool,
}

/// Seconds of what follows the last step: final checkpoint, export, evaluation and
/// sample answers, from the measured costs where known, else predicted from the
/// sizes (the step time, when known, stands in for an unmeasured evaluation).
pub fn final_phases(costs: &PhaseCosts, sizes: &Sizes, step_s: Option<f64>) -> f64 {
    let rate = costs
        .write_bytes_per_s
        .unwrap_or(DEFAULT_WRITE_RATE)
        .max(1.0);
    let ckpt = costs.ckpt_s.unwrap_or(sizes.checkpoint_bytes as f64 / rate);
    let export = sizes.adapter_bytes as f64 / rate;
    let eval = if sizes.final_eval {
        costs.eval_s.unwrap_or_else(|| match step_s {
            // A forward pass is about a third of a training step's work; half is
            // the conservative side.
            Some(s) if sizes.step_tokens > 0 => {
                s * 0.5 * sizes.eval_tokens as f64 / sizes.step_tokens as f64
            }
            _ => 0.0,
        })
    } else {
        0.0
    };
    let samples = if sizes.samples {
        costs
            .samples_s
            .unwrap_or(sizes.sample_tokens as f64 * DEFAULT_SAMPLE_S_PER_TOKEN)
    } else {
        0.0
    };
    ckpt + export + eval + samples
}

/// Timings of the last run of a model on a device, kept in the qtrain cache so the
/// next run can forecast its fixed costs before loading anything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Seconds to load the model (from the quantized cache when that was used).
    pub load_s: f64,
    pub step_s_per_token: f64,
    pub eval_s_per_token: f64,
    /// Seconds per generated token of the sample answers.
    pub sample_s_per_token: f64,
    pub write_bytes_per_s: f64,
}

impl History {
    /// `CACHE/timings/<hash of model dir, device, dtype, quantization>.json`.
    pub fn path(cache_root: &Path, model_dir: &Path, key: &str) -> PathBuf {
        let dir = model_dir
            .canonicalize()
            .unwrap_or_else(|_| model_dir.to_path_buf());
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in dir.to_string_lossy().bytes().chain(key.bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        cache_root.join("timings").join(format!("{h:016x}.json"))
    }

    pub fn read(path: &Path) -> Option<Self> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    /// Best effort: a cache that cannot be written only loses the forecast.
    pub fn write(&self, path: &Path) {
        let r = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                std::fs::write(path, serde_json::to_string_pretty(self).unwrap_or_default())
            });
        if let Err(e) = r {
            tracing::debug!("{}: not writing the timing history: {e}", path.display());
        }
    }
}

/// The fixed costs of a run forecast before loading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Forecast {
    pub load_s: f64,
    /// The evaluation before training (fresh runs).
    pub first_eval_s: f64,
    /// Sample answers before (fresh runs) and after training.
    pub samples_s: f64,
    pub step_s: f64,
    /// Final checkpoint, export, evaluation, samples.
    pub final_s: f64,
    /// Where the numbers come from, for the message.
    pub source: String,
}

impl Forecast {
    /// From the last run's timings when there are some, else from the model's size.
    pub fn new(
        history: Option<&History>,
        history_path: &Path,
        model_bytes: u64,
        sizes: &Sizes,
        fresh: bool,
    ) -> Self {
        match history {
            Some(h) => {
                let costs = PhaseCosts {
                    eval_s: Some(h.eval_s_per_token * sizes.eval_tokens as f64),
                    samples_s: Some(h.sample_s_per_token * sizes.sample_tokens as f64),
                    ckpt_s: None,
                    write_bytes_per_s: (h.write_bytes_per_s > 0.0).then_some(h.write_bytes_per_s),
                };
                let step_s = h.step_s_per_token * sizes.step_tokens as f64;
                Forecast {
                    load_s: h.load_s,
                    first_eval_s: if fresh {
                        costs.eval_s.unwrap_or(0.0)
                    } else {
                        0.0
                    },
                    samples_s: if fresh && sizes.samples {
                        costs.samples_s.unwrap_or(0.0)
                    } else {
                        0.0
                    },
                    step_s,
                    final_s: final_phases(&costs, sizes, Some(step_s)),
                    source: format!(
                        "timings of the last run of this model here ({})",
                        history_path.display()
                    ),
                }
            }
            None => Forecast {
                load_s: model_bytes as f64 / OPTIMISTIC_READ_RATE,
                source: format!(
                    "no earlier run of this model here: loading {} at {:.0} GB/s, the rest \
                     unknown until measured",
                    crate::ckpt_io::human_bytes(model_bytes),
                    OPTIMISTIC_READ_RATE / 1e9
                ),
                ..Forecast::default()
            },
        }
    }

    /// Everything but the steps, plus one step.
    pub fn minimum(&self) -> f64 {
        self.load_s + self.first_eval_s + self.samples_s + self.step_s + self.final_s
    }

    pub fn describe(&self) -> String {
        format!(
            "loading ~{:.1} s, evaluation before training ~{:.1} s, sample answers before \
             training ~{:.1} s, one step ~{:.1} s, final checkpoint, export, evaluation and \
             sample answers ~{:.1} s: at least {:.1} s ({})",
            self.load_s,
            self.first_eval_s,
            self.samples_s,
            self.step_s,
            self.final_s,
            self.minimum(),
            self.source
        )
    }
}

/// The bytes of a model directory's weight files.
pub fn model_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.ends_with(".safetensors") || n.ends_with(".bin")
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_and_margin() {
        let b = Duration::from_secs(240);
        assert_eq!(window(b), Duration::from_secs(210));
        assert_eq!(margin(b), Duration::from_secs(9));
        let h8 = Duration::from_secs(8 * 3600);
        assert_eq!(window(h8), Duration::from_secs(8 * 3600 - 288));
    }

    #[test]
    fn accounting_sums_to_the_wall_time() {
        let mut a = Accounting::default();
        a.add(Phase::Load, Duration::from_secs(3));
        a.add(Phase::Steps, Duration::from_secs(20));
        a.add(Phase::Steps, Duration::from_secs(5));
        let s = a.summary(
            Some(Duration::from_secs(40)),
            Duration::ZERO,
            Duration::from_secs(30),
        );
        assert!(
            s.contains("budget 40.0 s") && s.contains("steps 25.0 s"),
            "{s}"
        );
        assert!(s.contains("other 2.0 s"), "{s}");
        let r = a.record(
            7,
            Some(Duration::from_secs(40)),
            Duration::ZERO,
            Duration::from_secs(30),
        );
        let get = |k: &str| r.extra.iter().find(|(n, _)| n == k).unwrap().1;
        assert_eq!(get("budget/wall_s"), 30.0);
        assert_eq!(get("budget/load_s"), 3.0);
        assert_eq!(get("budget/other_s"), 2.0);
    }

    #[test]
    fn final_phases_use_measurements_then_sizes() {
        let sizes = Sizes {
            checkpoint_bytes: 200_000_000,
            adapter_bytes: 100_000_000,
            eval_tokens: 1000,
            step_tokens: 2000,
            sample_tokens: 100,
            final_eval: true,
            samples: true,
        };
        // Nothing measured: 2 s + 1 s at the default rate, the eval from the step
        // time (0.5 x 4 s x 1000/2000), samples at the default per-token time.
        let f = final_phases(&PhaseCosts::default(), &sizes, Some(4.0));
        assert!((f - (2.0 + 1.0 + 1.0 + 5.0)).abs() < 1e-9, "{f}");
        let mut c = PhaseCosts::default();
        c.record_checkpoint(Duration::from_secs(1), 200_000_000);
        c.record_eval(Duration::from_secs(3));
        c.record_samples(Duration::from_secs(2));
        let f = final_phases(&c, &sizes, Some(4.0));
        assert!((f - (1.0 + 0.5 + 3.0 + 2.0)).abs() < 1e-9, "{f}");
    }
}
