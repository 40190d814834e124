//! Dynamic loss scaling for fp16 training (GPUs of compute capability 7.x, which
//! have fp16 but no bf16 tensor cores).
//!
//! fp16's smallest normal value is 6e-5, so small gradients underflow to zero. The
//! loss is multiplied by a large scale before the backward (the trainer divides the
//! step's `loss_denominator` by it, which scales every gradient by the same
//! factor), the gradients are divided by it again before clipping and the update,
//! and the scale adapts: a step whose gradients overflowed (inf/NaN) is skipped and
//! the scale halved; after `growth_interval` good steps in a row it doubles. The
//! defaults are PyTorch's `GradScaler`'s. The state is part of the checkpoint, so a
//! resumed run scales exactly as the uninterrupted one would.

use serde::{Deserialize, Serialize};

/// The scaler's whole state (serialized into `trainer_state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    scale: f64,
    /// Good steps in a row since the last change of the scale.
    good_steps: u64,
    growth_interval: u64,
    /// Overflowed steps skipped so far (reported).
    pub skipped_steps: u64,
}

/// What [`LossScaler::update`] decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScaleUpdate {
    /// The gradients were finite: apply the step (the scale may have grown).
    Apply { grew: bool },
    /// They overflowed: skip the step; the scale was halved to `new_scale`.
    Skip { new_scale: f64 },
}

impl LossScaler {
    /// PyTorch's defaults: 2^16, doubling after 2000 good steps.
    pub const INIT_SCALE: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u64 = 2000;
    /// Below this the scale no longer protects anything: an overflow there is a real
    /// non-finite step (counted by the trainer's `max_nonfinite_steps`).
    pub const MIN_SCALE: f64 = 1.0;
    /// fp16's largest finite value is 65504; a larger scale only overflows.
    pub const MAX_SCALE: f64 = 16777216.0;

    pub fn new(init_scale: f64, growth_interval: u64) -> Self {
        assert!(init_scale > 0.0 && init_scale.is_finite() && growth_interval > 0);
        Self {
            scale: init_scale.clamp(Self::MIN_SCALE, Self::MAX_SCALE),
            good_steps: 0,
            growth_interval,
            skipped_steps: 0,
        }
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The denominator to hand to the step for a step of `valid` target tokens: the
    /// gradients come out multiplied by the scale.
    pub fn loss_denominator(&self, valid: f64) -> f64 {
        valid / self.scale
    }

    /// The factor that undoes the scale on the gradients.
    pub fn inv_scale(&self) -> f32 {
        (1.0 / self.scale) as f32
    }

    /// Whether an overflow at the current scale is the scale's fault (it can still
    /// be halved) rather than a genuinely non-finite step.
    pub fn can_back_off(&self) -> bool {
        self.scale > Self::MIN_SCALE
    }

    /// Records whether this step's (unscaled) gradients were all finite.
    pub fn update(&mut self, finite: bool) -> ScaleUpdate {
        if !finite {
            self.scale = (self.scale * 0.5).max(Self::MIN_SCALE);
            self.good_steps = 0;
            self.skipped_steps += 1;
            return ScaleUpdate::Skip {
                new_scale: self.scale,
            };
        }
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.good_steps = 0;
            let grown = (self.scale * 2.0).min(Self::MAX_SCALE);
            let grew = grown > self.scale;
            self.scale = grown;
            return ScaleUpdate::Apply { grew };
        }
        ScaleUpdate::Apply { grew: false }
    }
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new(Self::INIT_SCALE, Self::GROWTH_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_and_doubles_after_the_interval() {
        let mut s = LossScaler::new(1024.0, 3);
        assert_eq!(s.loss_denominator(100.0), 100.0 / 1024.0);
        assert_eq!(s.update(true), ScaleUpdate::Apply { grew: false });
        assert_eq!(s.update(true), ScaleUpdate::Apply { grew: false });
        // An overflow resets the count of good steps.
        assert_eq!(s.update(false), ScaleUpdate::Skip { new_scale: 512.0 });
        assert_eq!(s.update(true), ScaleUpdate::Apply { grew: false });
        assert_eq!(s.update(true), ScaleUpdate::Apply { grew: false });
        assert_eq!(s.update(true), ScaleUpdate::Apply { grew: true });
        assert_eq!(s.scale(), 1024.0);
        assert_eq!(s.inv_scale(), 1.0 / 1024.0);
        assert_eq!(s.skipped_steps, 1);
    }

    #[test]
    fn the_scale_stays_within_its_bounds() {
        let mut s = LossScaler::new(2.0, 1);
        assert!(s.can_back_off());
        assert_eq!(s.update(false), ScaleUpdate::Skip { new_scale: 1.0 });
        assert!(!s.can_back_off());
        assert_eq!(s.update(false), ScaleUpdate::Skip { new_scale: 1.0 });
        let mut s = LossScaler::new(LossScaler::MAX_SCALE, 1);
        assert_eq!(s.update(true), ScaleUpdate::Apply { grew: false });
        assert_eq!(s.scale(), LossScaler::MAX_SCALE);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = LossScaler::default();
        s.update(false);
        s.update(true);
        let back: LossScaler = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.scale(), 32768.0);
    }

    /// Scaling the loss denominator scales the gradients: with fp16-like rounding
    /// of a tiny gradient, the unscaled result keeps the digits plain fp16 loses.
    #[test]
    fn scaling_preserves_small_gradients_in_f16() {
        let g = 2.0e-8f64; // under half of f16's smallest subnormal (6e-8): rounds to 0
        let plain = half::f16::from_f64(g).to_f64();
        assert_eq!(plain, 0.0);
        let s = LossScaler::default();
        let scaled = half::f16::from_f64(g * s.scale()).to_f64() * s.inv_scale() as f64;
        assert!((scaled - g).abs() / g < 1e-3, "{scaled} vs {g}");
    }
}
