//! Time-budgeted step planning: how many optimizer steps fit in the hours the user
//! paid for.
//!
//! The first steps are measured (the very first is ignored: it pays for allocation
//! and kernel loading), then the planner sets the total so that the run ends at the
//! budget minus the time reserved for the final checkpoint and export. The step time
//! is tracked as an exponential moving average and the total is re-planned when the
//! projected finish moves by more than 2%; periodic evaluation and checkpoint time
//! is measured too and spread over the steps. On resume the elapsed time stored in
//! the checkpoint counts against the budget. The learning-rate schedule follows the
//! current total, so it ends where the run ends.
//!
//! The clock is injected ([`Clock`]) so tests drive the planner with simulated time.

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the user bought: a wall-clock budget or a fixed number of steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Budget {
    Time(Duration),
    Steps(u64),
}

/// Monotonic time since the planner's process started.
pub trait Clock: Send + Sync {
    fn now(&self) -> Duration;
}

/// The real clock.
pub struct SystemClock(Instant);

impl SystemClock {
    pub fn new() -> Self {
        Self(Instant::now())
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock tests move by hand.
#[derive(Clone, Default)]
pub struct SimClock(Arc<Mutex<Duration>>);

impl SimClock {
    pub fn advance(&self, d: Duration) {
        *self.0.lock().expect("clock lock") += d;
    }
}

impl Clock for SimClock {
    fn now(&self) -> Duration {
        *self.0.lock().expect("clock lock")
    }
}

/// The plan as printed and as the schedule uses it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Optimizer steps of the whole run (done and to do).
    pub total_steps: u64,
    pub steps_done: u64,
    /// Projected time until the run (including final checkpoint) is done.
    pub eta: Duration,
    /// Tokens the whole run will have seen.
    pub tokens_planned: u64,
    /// Mean seconds per optimizer step used for the plan (None before measuring).
    pub step_seconds: Option<f64>,
}

/// Planner state saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannerState {
    pub elapsed_secs: f64,
    pub steps_done: u64,
    pub step_time_ema: Option<f64>,
    pub overhead_secs: f64,
}

/// Relative change of the projected total that triggers a re-plan.
const REPLAN_THRESHOLD: f64 = 0.02;
/// Smoothing of the step-time average (weight of the newest step).
const EMA_WEIGHT: f64 = 0.1;
/// Steps planned before anything is measured (the schedule needs some length).
const PROVISIONAL_STEPS: u64 = 1000;

pub struct Planner {
    budget: Budget,
    clock: Box<dyn Clock>,
    /// Time spent in earlier runs of this training (resume).
    elapsed_before: Duration,
    /// Clock reading when this process started training.
    start: Duration,
    reserve: Duration,
    tokens_per_step: u64,
    steps_done: u64,
    /// Steps recorded in this process (the first one is not measured).
    steps_this_run: u64,
    step_time_ema: Option<f64>,
    /// Eval + checkpoint seconds so far, spread over the steps when planning.
    overhead_secs: f64,
    plan: Plan,
    /// The total of the last plan reported to the user; re-plans are announced when
    /// the total has drifted from it by more than the threshold.
    announced_total: u64,
}

impl Planner {
    /// `reserve`: time kept for the final checkpoint and export.
    pub fn new(
        budget: Budget,
        clock: Box<dyn Clock>,
        reserve: Duration,
        tokens_per_step: u64,
    ) -> Self {
        let start = clock.now();
        let mut p = Self {
            budget,
            clock,
            elapsed_before: Duration::ZERO,
            start,
            reserve,
            tokens_per_step,
            steps_done: 0,
            steps_this_run: 0,
            step_time_ema: None,
            overhead_secs: 0.0,
            plan: Plan {
                total_steps: 0,
                steps_done: 0,
                eta: Duration::ZERO,
                tokens_planned: 0,
                step_seconds: None,
            },
            announced_total: 0,
        };
        p.plan = p.compute();
        p.announced_total = p.plan.total_steps;
        p
    }

    /// Continues a run from a checkpoint's planner state.
    pub fn resume(
        budget: Budget,
        clock: Box<dyn Clock>,
        reserve: Duration,
        tokens_per_step: u64,
        state: &PlannerState,
    ) -> Self {
        let mut p = Self::new(budget, clock, reserve, tokens_per_step);
        p.elapsed_before = Duration::from_secs_f64(state.elapsed_secs);
        p.steps_done = state.steps_done;
        p.step_time_ema = state.step_time_ema;
        p.overhead_secs = state.overhead_secs;
        p.plan = p.compute();
        p.announced_total = p.plan.total_steps;
        p
    }

    pub fn state(&self) -> PlannerState {
        PlannerState {
            elapsed_secs: self.elapsed().as_secs_f64(),
            steps_done: self.steps_done,
            step_time_ema: self.step_time_ema,
            overhead_secs: self.overhead_secs,
        }
    }

    /// Training time so far, earlier runs included.
    pub fn elapsed(&self) -> Duration {
        self.elapsed_before + self.clock.now().saturating_sub(self.start)
    }

    pub fn plan(&self) -> Plan {
        self.plan
    }

    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }

    /// Records one finished optimizer step; returns the new plan when it changed
    /// enough to announce (the first measured plan always counts as changed).
    pub fn record_step(&mut self, took: Duration) -> Option<Plan> {
        self.steps_done += 1;
        self.steps_this_run += 1;
        // The first step of a process pays one-off costs; do not let it skew the plan.
        if self.steps_this_run > 1 {
            let t = took.as_secs_f64();
            self.step_time_ema = Some(match self.step_time_ema {
                None => t,
                Some(e) => e + EMA_WEIGHT * (t - e),
            });
        }
        self.replan()
    }

    /// Records time spent outside steps (evaluation, periodic checkpoints).
    pub fn record_overhead(&mut self, took: Duration) {
        self.overhead_secs += took.as_secs_f64();
    }

    /// Re-plans (every step, so the schedule always sees the current estimate);
    /// returns the plan when it should be announced: the first measured plan, or a
    /// total that moved more than the threshold since the last announcement.
    fn replan(&mut self) -> Option<Plan> {
        let old = self.plan;
        let new = self.compute();
        self.plan = new;
        let first_measured = old.step_seconds.is_none() && new.step_seconds.is_some();
        let moved = (new.total_steps as f64 - self.announced_total as f64).abs()
            > REPLAN_THRESHOLD * self.announced_total.max(1) as f64;
        if first_measured || moved {
            self.announced_total = new.total_steps;
            Some(new)
        } else {
            None
        }
    }

    fn compute(&self) -> Plan {
        let done = self.steps_done;
        let (total, step_seconds) = match (self.budget, self.step_time_ema) {
            (Budget::Steps(n), ema) => (n.max(done), ema),
            (Budget::Time(_), None) => (done.max(PROVISIONAL_STEPS), None),
            (Budget::Time(budget), Some(ema)) => {
                // Overhead per step so far (evals and checkpoints recur at a steady rate).
                let per_step = ema + self.overhead_secs / done.max(1) as f64;
                let left = budget.as_secs_f64()
                    - self.reserve.as_secs_f64()
                    - self.elapsed().as_secs_f64();
                let more = if left > 0.0 {
                    (left / per_step).floor() as u64
                } else {
                    0
                };
                ((done + more).max(done + 1), Some(ema))
            }
        };
        let eta = match step_seconds {
            Some(s) => Duration::from_secs_f64(
                (total - done) as f64 * (s + self.overhead_secs / done.max(1) as f64)
                    + self.reserve.as_secs_f64(),
            ),
            None => Duration::ZERO,
        };
        Plan {
            total_steps: total,
            steps_done: done,
            eta,
            tokens_planned: total * self.tokens_per_step,
            step_seconds,
        }
    }

    /// Whether to stop before starting another step: the planned steps are done, or
    /// (time budgets) another step would eat into the reserve.
    pub fn should_stop(&self) -> bool {
        if self.steps_done >= self.plan.total_steps {
            return true;
        }
        match (self.budget, self.step_time_ema) {
            (Budget::Time(budget), Some(ema)) => {
                self.elapsed().as_secs_f64() + ema + self.reserve.as_secs_f64()
                    > budget.as_secs_f64()
            }
            (Budget::Time(budget), None) => self.elapsed() + self.reserve >= budget,
            (Budget::Steps(_), _) => false,
        }
    }

    /// Updates the time reserved for the final checkpoint (measured from periodic ones).
    pub fn set_reserve(&mut self, reserve: Duration) {
        self.reserve = reserve;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a simulated training loop; returns (steps, finish time).
    fn simulate(
        budget_s: f64,
        step_time: impl Fn(u64) -> f64,
        reserve_s: f64,
        final_ckpt_s: f64,
    ) -> (u64, f64, u64) {
        let clock = SimClock::default();
        let mut p = Planner::new(
            Budget::Time(Duration::from_secs_f64(budget_s)),
            Box::new(clock.clone()),
            Duration::from_secs_f64(reserve_s),
            4096,
        );
        let mut replans = 0;
        while !p.should_stop() {
            let t = step_time(p.steps_done());
            clock.advance(Duration::from_secs_f64(t));
            if p.record_step(Duration::from_secs_f64(t)).is_some() {
                replans += 1;
            }
        }
        clock.advance(Duration::from_secs_f64(final_ckpt_s));
        (p.steps_done(), p.elapsed().as_secs_f64(), replans)
    }

    fn window(budget: f64) -> (f64, f64) {
        (budget - (0.02 * budget).max(60.0), budget)
    }

    #[test]
    fn constant_step_time_fills_the_budget() {
        let budget = 3600.0;
        let (steps, end, _) = simulate(budget, |s| if s == 0 { 20.0 } else { 2.0 }, 30.0, 25.0);
        let (lo, hi) = window(budget);
        assert!(
            end <= hi && end >= lo,
            "ended at {end}, window [{lo}, {hi}]"
        );
        // (3600 - 30 - 20) / 2 + 1 steps fit.
        assert!((1770..=1776).contains(&steps), "{steps}");
    }

    #[test]
    fn drifting_step_time_replans_and_ends_in_window() {
        let budget = 8.0 * 3600.0;
        // Steps slow down by half over the run (thermal throttling, longer batches).
        let (steps, end, replans) = simulate(
            budget,
            |s| 3.0 * (1.0 + (s as f64 / 9600.0).min(0.5)),
            60.0,
            50.0,
        );
        let (lo, hi) = window(budget);
        assert!(
            end <= hi && end >= lo,
            "ended at {end}, window [{lo}, {hi}]"
        );
        assert!(replans >= 3, "expected several re-plans, got {replans}");
        assert!(steps > 6000, "{steps}");
    }

    #[test]
    fn resume_counts_elapsed_time() {
        let clock = SimClock::default();
        let state = PlannerState {
            elapsed_secs: 3000.0,
            steps_done: 1000,
            step_time_ema: Some(2.0),
            overhead_secs: 0.0,
        };
        let p = Planner::resume(
            Budget::Time(Duration::from_secs(3600)),
            Box::new(clock),
            Duration::from_secs(20),
            1,
            &state,
        );
        // 580 s left -> 290 more steps.
        assert_eq!(p.plan().total_steps, 1290);
        assert_eq!(p.elapsed(), Duration::from_secs(3000));
    }

    #[test]
    fn steps_budget_is_exact() {
        let clock = SimClock::default();
        let mut p = Planner::new(
            Budget::Steps(25),
            Box::new(clock.clone()),
            Duration::ZERO,
            10,
        );
        let mut n = 0;
        while !p.should_stop() {
            clock.advance(Duration::from_secs(1));
            p.record_step(Duration::from_secs(1));
            n += 1;
        }
        assert_eq!(n, 25);
        assert_eq!(p.plan().tokens_planned, 250);
    }

    #[test]
    fn overhead_is_planned_for() {
        let clock = SimClock::default();
        let budget = 1000.0;
        let mut p = Planner::new(
            Budget::Time(Duration::from_secs_f64(budget)),
            Box::new(clock.clone()),
            Duration::from_secs(10),
            1,
        );
        while !p.should_stop() {
            clock.advance(Duration::from_secs(1));
            p.record_step(Duration::from_secs(1));
            if p.steps_done().is_multiple_of(100) {
                // A 20 s evaluation every 100 steps.
                clock.advance(Duration::from_secs(20));
                p.record_overhead(Duration::from_secs(20));
            }
        }
        let end = p.elapsed().as_secs_f64() + 10.0;
        assert!(end <= budget && end >= budget - 60.0, "{end}");
    }
}
