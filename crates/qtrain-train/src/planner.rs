//! Time-budgeted step planning: how many optimizer steps fit in the hours the user
//! paid for.
//!
//! The budget is the whole process: the clock starts when the process does, so
//! loading, the first evaluation and everything before the first step count against
//! it. The first steps are measured (the very first is ignored: it pays for
//! allocation and kernel loading), then the planner sets the total so that the run
//! ends at the budget minus the time reserved for what follows the last step (final
//! checkpoint, export, final evaluation, sample answers: see [`crate::budget`]). The
//! step time is tracked as an exponential moving average and the total is re-planned
//! when the projected finish moves by more than 2%. Periodic evaluations and
//! checkpoints are planned like steps when their cost and cadence are known
//! ([`Periodic`]); otherwise their measured time is spread over the steps. On resume
//! the elapsed time stored in the checkpoint counts against the budget. The
//! learning-rate schedule follows the current total, so it ends where the run ends.
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

/// Monotonic time since the process started.
pub trait Clock: Send + Sync {
    fn now(&self) -> Duration;
}

/// The real clock.
pub struct SystemClock(Instant);

impl SystemClock {
    pub fn new() -> Self {
        Self(Instant::now())
    }

    /// A clock whose zero is `start` (the process's start, taken first thing in
    /// `main`).
    pub fn since(start: Instant) -> Self {
        Self(start)
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

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Duration {
        (**self).now()
    }
}

/// Evaluations and checkpoints that recur during the run, planned like steps: the
/// planner counts how many fall inside the steps it plans and reserves their time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Periodic {
    /// An evaluation after every N-th step (0: none). The last step's is not
    /// counted: the final evaluation (in the reserve) replaces it.
    pub eval_every_steps: u64,
    /// Seconds one evaluation takes (measured or predicted).
    pub eval_secs: f64,
    /// A checkpoint after every N-th step (0: none), the last step's excepted.
    pub ckpt_every_steps: u64,
    /// A checkpoint every so many seconds (0: none).
    pub ckpt_every_secs: f64,
    /// Seconds one checkpoint takes.
    pub ckpt_secs: f64,
}

impl Periodic {
    /// Seconds `more` further steps take after `done`, at `step` seconds each, with
    /// the evaluations and checkpoints that fall among them.
    pub fn cost(&self, done: u64, more: u64, step: f64) -> f64 {
        if more == 0 {
            return 0.0;
        }
        // Multiples of `every` in (done, done + more), the last step excluded.
        let among = |every: u64| match (
            (done + more - 1).checked_div(every),
            done.checked_div(every),
        ) {
            (Some(last), Some(first)) => last - first,
            _ => 0,
        };
        let steps = more as f64 * step;
        let by_time = if self.ckpt_every_secs > 0.0 {
            (steps / self.ckpt_every_secs).floor()
        } else {
            0.0
        };
        let ckpts = among(self.ckpt_every_steps) as f64 + by_time;
        steps + among(self.eval_every_steps) as f64 * self.eval_secs + ckpts * self.ckpt_secs
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
    reserve: Duration,
    /// Periodic evaluations and checkpoints planned like steps (when set, their
    /// measured time is not also spread over the steps).
    periodic: Option<Periodic>,
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
    /// `reserve`: time kept for what follows the last step (final checkpoint,
    /// export, ...). `clock` counts from the process's start.
    pub fn new(
        budget: Budget,
        clock: Box<dyn Clock>,
        reserve: Duration,
        tokens_per_step: u64,
    ) -> Self {
        let mut p = Self {
            budget,
            clock,
            elapsed_before: Duration::ZERO,
            reserve,
            periodic: None,
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

    /// Time so far (this process from its start, earlier runs included).
    pub fn elapsed(&self) -> Duration {
        self.elapsed_before + self.clock.now()
    }

    /// Time spent by earlier processes of this run (resumes).
    pub fn elapsed_before(&self) -> Duration {
        self.elapsed_before
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// The measured step time (moving average), once known.
    pub fn step_seconds(&self) -> Option<f64> {
        self.step_time_ema
    }

    pub fn plan(&self) -> Plan {
        self.plan
    }

    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }

    /// Steps recorded by this process (a resumed run's earlier ones excluded).
    pub fn steps_this_run(&self) -> u64 {
        self.steps_this_run
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
                let left = budget.as_secs_f64()
                    - self.reserve.as_secs_f64()
                    - self.elapsed().as_secs_f64();
                let more = match &self.periodic {
                    _ if left <= 0.0 => 0,
                    None => {
                        // Overhead per step so far (evals and checkpoints recur at a
                        // steady rate).
                        let per_step = ema + self.overhead_secs / done.max(1) as f64;
                        (left / per_step).floor() as u64
                    }
                    Some(p) => {
                        // The most further steps whose time, with the evaluations and
                        // checkpoints among them, fits in what is left.
                        let (mut lo, mut hi) = (0u64, (left / ema).floor() as u64);
                        while lo < hi {
                            let mid = lo + (hi - lo).div_ceil(2);
                            if p.cost(done, mid, ema) <= left {
                                lo = mid;
                            } else {
                                hi = mid - 1;
                            }
                        }
                        lo
                    }
                };
                ((done + more).max(done + 1), Some(ema))
            }
        };
        let eta = match (step_seconds, &self.periodic) {
            (Some(s), Some(p)) => {
                Duration::from_secs_f64(p.cost(done, total - done, s) + self.reserve.as_secs_f64())
            }
            (Some(s), None) => Duration::from_secs_f64(
                (total - done) as f64 * (s + self.overhead_secs / done.max(1) as f64)
                    + self.reserve.as_secs_f64(),
            ),
            (None, _) => Duration::ZERO,
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

    /// Updates the time reserved for what follows the last step, and re-plans.
    pub fn set_reserve(&mut self, reserve: Duration) {
        self.reserve = reserve;
        self.plan = self.compute();
    }

    pub fn reserve(&self) -> Duration {
        self.reserve
    }

    /// Plans the periodic evaluations and checkpoints like steps (see
    /// [`Periodic`]), and re-plans.
    pub fn set_periodic(&mut self, periodic: Periodic) {
        self.periodic = Some(periodic);
        self.plan = self.compute();
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

    /// Periodic evaluations and checkpoints planned like steps: the run ends inside
    /// the window although a tenth of its time goes to them, and the plan is right
    /// from the first measured step (no drift to correct).
    #[test]
    fn periodic_costs_are_planned_like_steps() {
        let clock = SimClock::default();
        let budget = 1000.0;
        let mut p = Planner::new(
            Budget::Time(Duration::from_secs_f64(budget)),
            Box::new(clock.clone()),
            Duration::from_secs(10),
            1,
        );
        p.set_periodic(Periodic {
            eval_every_steps: 100,
            eval_secs: 20.0,
            ckpt_every_steps: 0,
            ckpt_every_secs: 300.0,
            ckpt_secs: 5.0,
        });
        let mut since_ckpt = 0.0;
        let mut first_plan = None;
        while !p.should_stop() {
            clock.advance(Duration::from_secs(1));
            since_ckpt += 1.0;
            p.record_step(Duration::from_secs(1));
            if p.steps_done() == 2 {
                first_plan = Some(p.plan().total_steps);
            }
            let last = p.should_stop();
            if p.steps_done().is_multiple_of(100) && !last {
                clock.advance(Duration::from_secs(20));
            }
            if since_ckpt >= 300.0 && !last {
                clock.advance(Duration::from_secs(5));
                since_ckpt = 0.0;
            }
        }
        let end = p.elapsed().as_secs_f64() + 10.0;
        assert!(end <= budget && end >= budget - 30.0, "{end}");
        // 990 s: n steps + 20 s per 100 steps + 5 s per 300 s of steps.
        let planned = first_plan.unwrap();
        assert!(
            planned.abs_diff(p.steps_done()) <= 2,
            "{planned} vs {}",
            p.steps_done()
        );
        assert!((800..=830).contains(&p.steps_done()), "{}", p.steps_done());
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
