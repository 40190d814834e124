//! Learning-rate schedules: constant, linear and cosine decay, each with linear warmup
//! and (for the decaying kinds) a floor.
//!
//! The run length is not known up front: the step planner turns a wall-clock budget into
//! a step count and may re-plan during the run. So a schedule is a *pure function*
//! `lr_at(step, total_steps)` of the step index and the latest planned total, with no
//! state of its own. Consequences, by design:
//!
//! * Re-planning needs no bookkeeping: the next call passes the new total, and the lr
//!   moves onto the new plan's curve at the current step. The jump is
//!   `peak * (1 - floor) * |Δprogress|` at most for linear decay and at most `π/2` times
//!   that for cosine, where `Δprogress` is how far the re-plan moved the current step's
//!   fraction of the decay phase; re-plans correct small timing errors, so jumps are
//!   small, and the curve stays monotone for as long as the plan holds.
//! * Warmup depends only on the step, never on the total: warmup exists to let Adam's
//!   moment estimates settle, which is a matter of steps taken, and this way a re-plan
//!   during warmup changes nothing.
//! * Resume is trivially exact: the checkpoint's step count and the planner's total give
//!   the same lr as an uninterrupted run.
//!
//! # The formula
//!
//! `step` is the 0-based index of the update about to be applied (the optimizer's step
//! count before the call); `u = step + 1` counts updates including this one, `W` is
//! `warmup_steps`, `T` is `total_steps`, `f` is `min_lr_ratio`:
//!
//! * warmup, `u <= W`: `lr = peak * u / W` (the first update already moves; the update
//!   `u = W` runs at `peak`);
//! * after warmup, `progress = clamp((u - W) / (T - W), 0, 1)` (taken as 1 when `T <= W`);
//!   * constant: `lr = peak`;
//!   * linear: `lr = peak * (f + (1 - f) * (1 - progress))`;
//!   * cosine: `lr = peak * (f + (1 - f) * (1 + cos(π * progress)) / 2)`;
//!
//! so the last planned update (`u = T`) runs at the floor `peak * f`, and any steps past
//! the plan stay there. Arithmetic is in f64, rounded once to f32.

use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};

/// The shape of the decay after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// `peak_lr` after warmup; the floor is ignored.
    Constant,
    /// Straight line from `peak_lr` down to the floor at the last planned step.
    Linear,
    /// Half cosine from `peak_lr` down to the floor at the last planned step.
    Cosine,
}

/// A learning-rate schedule, embeddable in the trainer's TOML config:
///
/// ```toml
/// kind = "cosine"
/// peak-lr = 2e-4
/// warmup-steps = 20
/// min-lr-ratio = 0.1
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    /// The lr at the end of warmup.
    pub peak_lr: f32,
    /// Number of warmup updates (0: start at `peak_lr`).
    #[serde(default)]
    pub warmup_steps: u64,
    /// The floor as a fraction of `peak_lr`, in `[0, 1]`.
    #[serde(default)]
    pub min_lr_ratio: f32,
}

impl LrSchedule {
    /// Checks that `peak_lr` is finite and non-negative and `min_lr_ratio` is in `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if !self.peak_lr.is_finite() || self.peak_lr < 0.0 {
            return Err(OptimError::InvalidConfig(format!(
                "schedule peak-lr {} must be finite and >= 0",
                self.peak_lr
            )));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(OptimError::InvalidConfig(format!(
                "schedule min-lr-ratio {} must be in [0, 1]",
                self.min_lr_ratio
            )));
        }
        Ok(())
    }

    /// The learning rate for the update with 0-based index `step` when the run is
    /// currently planned to last `total_steps` updates. See the module docs.
    pub fn lr_at(&self, step: u64, total_steps: u64) -> f32 {
        let peak = f64::from(self.peak_lr);
        let u = step.saturating_add(1);
        let w = self.warmup_steps;
        if u <= w {
            return (peak * u as f64 / w as f64) as f32;
        }
        let progress = if total_steps <= w {
            1.0
        } else {
            ((u - w) as f64 / (total_steps - w) as f64).min(1.0)
        };
        let floor = f64::from(self.min_lr_ratio);
        let frac = match self.kind {
            ScheduleKind::Constant => return self.peak_lr,
            ScheduleKind::Linear => 1.0 - progress,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        (peak * (floor + (1.0 - floor) * frac)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: u64, floor: f32) -> LrSchedule {
        LrSchedule {
            kind,
            peak_lr: 1e-3,
            warmup_steps: warmup,
            min_lr_ratio: floor,
        }
    }

    fn close(a: f32, b: f64) -> bool {
        (f64::from(a) - b).abs() <= 1e-12 + 1e-6 * b.abs()
    }

    #[test]
    fn warmup_is_linear_from_the_first_update_and_ignores_total() {
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = sched(kind, 10, 0.1);
            assert!(close(s.lr_at(0, 100), 1e-4), "{kind:?}");
            assert!(close(s.lr_at(4, 100), 5e-4), "{kind:?}");
            assert!(close(s.lr_at(9, 100), 1e-3), "{kind:?}");
            // A re-plan during warmup changes nothing.
            assert_eq!(s.lr_at(4, 100), s.lr_at(4, 37));
        }
    }

    #[test]
    fn constant_stays_at_peak_and_ignores_floor() {
        let s = sched(ScheduleKind::Constant, 0, 0.5);
        for step in [0, 1, 50, 99, 100, 10_000] {
            assert_eq!(s.lr_at(step, 100), 1e-3);
        }
    }

    #[test]
    fn linear_values() {
        // W = 10, T = 110: decay phase of 100 updates, floor 0.1 * peak.
        let s = sched(ScheduleKind::Linear, 10, 0.1);
        // u = 11: progress 0.01 -> 1e-3 * (0.1 + 0.9 * 0.99)
        assert!(close(s.lr_at(10, 110), 1e-3 * (0.1 + 0.9 * 0.99)));
        // u = 60: progress 0.5
        assert!(close(s.lr_at(59, 110), 1e-3 * 0.55));
        // last planned update lands on the floor, and stays there past the plan
        assert!(close(s.lr_at(109, 110), 1e-4));
        assert!(close(s.lr_at(500, 110), 1e-4));
        // floor 0 reaches zero
        let z = sched(ScheduleKind::Linear, 0, 0.0);
        assert!(close(z.lr_at(49, 200), 1e-3 * 0.75));
        assert_eq!(z.lr_at(199, 200), 0.0);
    }

    #[test]
    fn cosine_values() {
        let s = sched(ScheduleKind::Cosine, 10, 0.1);
        // u = 60 is the middle of the decay: halfway between peak and floor.
        assert!(close(s.lr_at(59, 110), 1e-3 * 0.55));
        // u = 35: progress 0.25, (1 + cos(pi/4)) / 2
        let f = 0.5 * (1.0 + (std::f64::consts::FRAC_PI_4).cos());
        assert!(close(s.lr_at(34, 110), 1e-3 * (0.1 + 0.9 * f)));
        assert!(close(s.lr_at(109, 110), 1e-4));
        assert!(close(s.lr_at(1000, 110), 1e-4));
        // No warmup: the first update is just below peak.
        let n = sched(ScheduleKind::Cosine, 0, 0.0);
        let first = f64::from(n.lr_at(0, 1000));
        assert!(first < 1e-3 && first > 1e-3 * 0.99999);
    }

    #[test]
    fn cosine_is_monotone_and_replanning_moves_onto_the_new_curve() {
        let s = sched(ScheduleKind::Cosine, 5, 0.0);
        let mut prev = f32::INFINITY;
        for step in 5..200 {
            let lr = s.lr_at(step, 200);
            assert!(lr <= prev, "not monotone at {step}");
            prev = lr;
        }
        // Re-plan from 200 to 100 total steps at step 50: lr jumps to the new curve,
        // exactly what a run planned for 100 from the start would use.
        let fresh = sched(ScheduleKind::Cosine, 5, 0.0);
        assert_eq!(s.lr_at(50, 100), fresh.lr_at(50, 100));
        assert!(s.lr_at(50, 100) < s.lr_at(50, 200));
    }

    #[test]
    fn total_not_longer_than_warmup_goes_to_floor_after_warmup() {
        let s = sched(ScheduleKind::Linear, 10, 0.2);
        assert!(close(s.lr_at(9, 5), 1e-3));
        assert!(close(s.lr_at(10, 5), 2e-4));
        assert!(close(s.lr_at(10, 0), 2e-4));
    }

    #[test]
    fn validate_rejects_bad_values() {
        assert!(sched(ScheduleKind::Cosine, 0, 0.1).validate().is_ok());
        assert!(sched(ScheduleKind::Cosine, 0, 1.5).validate().is_err());
        assert!(sched(ScheduleKind::Cosine, 0, -0.1).validate().is_err());
        let mut s = sched(ScheduleKind::Linear, 0, 0.0);
        s.peak_lr = f32::NAN;
        assert!(s.validate().is_err());
    }

    #[test]
    fn toml_round_trip_with_kebab_names() {
        let text = "kind = \"cosine\"\npeak-lr = 2e-4\nwarmup-steps = 20\nmin-lr-ratio = 0.1\n";
        let s: LrSchedule = toml::from_str(text).unwrap();
        assert_eq!(
            s,
            LrSchedule {
                kind: ScheduleKind::Cosine,
                peak_lr: 2e-4,
                warmup_steps: 20,
                min_lr_ratio: 0.1,
            }
        );
        let back: LrSchedule = toml::from_str(&toml::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        // Defaults: no warmup, floor 0.
        let d: LrSchedule = toml::from_str("kind = \"linear\"\npeak-lr = 1e-3\n").unwrap();
        assert_eq!((d.warmup_steps, d.min_lr_ratio), (0, 0.0));
        assert!(toml::from_str::<LrSchedule>("kind = \"step\"\npeak-lr = 1e-3\n").is_err());
    }
}
