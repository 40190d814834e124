//! `Trainer::train_step` and what follows each step: one optimizer step
//! (micro-batches, out-of-memory recovery, clipping, fp16 loss scaling, the
//! non-finite guard, the update), then metrics, the periodic evaluation and the
//! periodic checkpoint.

use super::evaluate::EvalAt;
use super::{Stop, Trainer};
use crate::budget;
use crate::error::{dist, Result, TrainError};
use crate::loss_scale::{LossScaler, ScaleUpdate};
use crate::metrics::Record;
use crate::micro;
use crate::planner::{Budget, Plan};
use qtrain_data::DataCursor;
use qtrain_dist::{agreed_loss_denominator, StepShare};
use qtrain_step::TokenBatch;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A completed optimizer step, for the log.
pub(super) struct StepDone {
    loss: f64,
    lr: f32,
    grad_norm: f32,
}

impl Trainer {
    /// Whether to stop before another step: rank 0's planner decides; a signal on
    /// any rank stops all of them.
    pub(super) fn should_stop(&mut self) -> Result<Option<Stop>> {
        let planned = self
            .coll
            .broadcast_u64(self.planner.should_stop() as u64)
            .map_err(dist)?;
        if planned != 0 {
            return Ok(Some(Stop::Planned));
        }
        if self
            .coll
            .any(self.stop.load(Ordering::SeqCst))
            .map_err(dist)?
        {
            return Ok(Some(Stop::Signal));
        }
        Ok(None)
    }

    /// One optimizer step. `None` when it was skipped: every label masked, an fp16
    /// overflow, or a non-finite loss or gradient (up to `train.max_nonfinite_steps`
    /// in a row, then the run stops with a checkpoint).
    pub(super) fn train_step(&mut self) -> Result<Option<StepDone>> {
        let t0 = Instant::now();
        let step = self.pos.step;
        let cursor_before = self.stream.cursor();
        let stream = &mut self.stream;
        let share = self.sharding.take_step(
            self.coll.rank(),
            || -> Result<TokenBatch> {
                stream.next().ok_or(TrainError::NoData)?.map_err(Into::into)
            },
            |b| b.valid_targets() as u64,
        )?;
        let data_wait = t0.elapsed();
        let valid = agreed_loss_denominator(&*self.coll, &share).map_err(dist)? as usize;
        if valid == 0 {
            // Reported, never trained on: the data crate counts such documents too.
            tracing::warn!(
                "step {step}: every label of this optimizer step is masked; skipping it"
            );
            return Ok(None);
        }
        let denominator = self
            .scaler
            .as_ref()
            .map_or(valid as f64, |s| s.loss_denominator(valid as f64));
        let loss_sum = self.passes_fitting(&share, denominator, cursor_before)?;
        let mut loss_sum = [loss_sum];
        self.coll.all_reduce_sum_f64(&mut loss_sum).map_err(dist)?;
        let loss = loss_sum[0] / valid as f64;
        let unscale = self.scaler.as_ref().map_or(1.0, LossScaler::inv_scale);
        let grad_norm =
            self.backend
                .reduce_and_clip(&*self.coll, self.cfg.train.max_grad_norm, unscale)?;
        if let Some(s) = self.scaler.as_mut() {
            if loss.is_finite() && !grad_norm.is_finite() && s.can_back_off() {
                // The scale overflowed fp16, not the model: skip, halve, go on.
                if let ScaleUpdate::Skip { new_scale } = s.update(false) {
                    tracing::info!(
                        "step {step}: fp16 gradients overflowed; skipping the update, loss scale now {new_scale}"
                    );
                }
                return Ok(None);
            }
        }
        if !loss.is_finite() || !grad_norm.is_finite() {
            self.pos.nonfinite += 1;
            let n = self.pos.nonfinite;
            tracing::warn!(
                "step {step}: loss {loss}, grad norm {grad_norm}: skipping the update ({n} in a row)"
            );
            if n >= self.cfg.train.max_nonfinite_steps {
                let checkpoint = self.save_checkpoint(None, n, false)?.unwrap_or_default();
                return Err(TrainError::NonFinite {
                    count: n,
                    step,
                    checkpoint,
                });
            }
            return Ok(None);
        }
        self.pos.nonfinite = 0;
        if let Some(s) = self.scaler.as_mut() {
            s.update(true);
        }
        let total_steps = self
            .coll
            .broadcast_u64(self.planner.plan().total_steps)
            .map_err(dist)?;
        let lr = self.sched.lr_at(step, total_steps);
        self.backend.update(lr)?;
        self.pos.step += 1;
        // Micro-batches are packed to a fixed [batch, seq]: every step has the same
        // token count, whichever rank holds which micro-batch.
        self.pos.tokens_seen += self.tokens_per_step;
        self.pos.last_loss = Some(loss);
        let took = t0.elapsed();
        self.accounting.add(budget::Phase::Steps, took);
        self.timing.window_tokens += self.tokens_per_step;
        self.timing.window_step_s += took.as_secs_f64();
        if self.planner.steps_this_run() > 0 {
            // Not the first step of this process: it pays one-off costs.
            self.timing.steps += 1;
            self.timing.step_s += took.as_secs_f64();
            self.timing.data_wait_s += data_wait.as_secs_f64();
        }
        if let Some(plan) = self.planner.record_step(took) {
            announce(&plan, self.tokens_per_step);
            self.bar.set_length(plan.total_steps);
        }
        Ok(Some(StepDone {
            loss,
            lr,
            grad_norm,
        }))
    }

    /// The step's forward/backward passes, giving memory back and retrying the same
    /// data after an out-of-memory (with a checkpoint of the last completed step,
    /// data from before this one); stops with a checkpoint when nothing is left to
    /// give back.
    fn passes_fitting(
        &mut self,
        share: &StepShare<TokenBatch>,
        denominator: f64,
        cursor_before: DataCursor,
    ) -> Result<f64> {
        let step = self.pos.step;
        loop {
            let passes = micro::step_passes(
                &mut self.backend,
                &self.base,
                share,
                &self.sharding,
                &self.shape,
                step,
                &self.cfg,
                denominator,
            );
            // Every rank learns whether any ran out of memory, so all retry (or stop)
            // together instead of waiting on a collective the failed one never joins.
            let oom_here = matches!(&passes, Err(e) if micro::is_oom(e));
            let any_oom = self.coll.any(oom_here).map_err(dist)?;
            let passes = match passes {
                Ok(_) if any_oom => Err(TrainError::OutOfMemory(
                    "another rank ran out of GPU memory".into(),
                )),
                p => p,
            };
            let e = match passes {
                Ok(l) => return Ok(l),
                Err(e) if micro::is_oom(&e) => e,
                Err(e) => return Err(e),
            };
            let failed = self.shape;
            let relief = micro::give_back_memory(&mut self.backend, &mut self.shape, &self.cfg);
            if relief.keeps_micro_batch() {
                self.bar.suspend(|| {
                    tracing::warn!(
                        "step {step}: out of GPU memory ({e}); {}, retrying the step",
                        relief.describe()
                    )
                });
                continue;
            }
            let checkpoint = self
                .save_checkpoint(Some(cursor_before.clone()), self.pos.nonfinite, false)?
                .unwrap_or_default();
            if relief != micro::Relief::HalvedMicroBatch {
                return Err(TrainError::OutOfMemoryStop(micro::oom_stop_message(
                    &e.to_string(),
                    &failed,
                    self.cfg.data.seq_len,
                    step,
                    Some(&checkpoint),
                    &self.cfg.train.oom,
                )));
            }
            let shape = self.shape;
            self.bar.suspend(|| {
                tracing::warn!(
                    "step {step}: out of GPU memory with micro-batches of {} x {} ({e}); \
                     checkpoint in {}; retrying with {} rows per pass, {} passes per step \
                     (the same {} rows per optimizer step)",
                    failed.micro_rows,
                    self.cfg.data.seq_len,
                    checkpoint.display(),
                    shape.micro_rows,
                    shape.passes_per_step(),
                    shape.rows_per_step()
                )
            });
        }
    }

    /// After a completed step: the budget check of a fresh run's first step, the
    /// log, and the periodic evaluation and checkpoint (not after the last planned
    /// step: the final ones follow).
    pub(super) fn after_step(&mut self, done: &StepDone) -> Result<()> {
        let t = Instant::now();
        self.check_first_step()?;
        let step = self.pos.step;
        self.bar.set_position(step);
        if step.is_multiple_of(self.cfg.log.every_steps) {
            self.log_window(done)?;
        }
        let last = self.planner.should_stop();
        let halting = self.halt_at_step == Some(step);
        if self.timing.steps > 0 {
            self.timing.bookkeeping_s += t.elapsed().as_secs_f64();
        }
        let every = self.cfg.eval.every_steps;
        if self.root && every > 0 && step.is_multiple_of(every) && !last {
            if let Some(l) = self.evaluate(EvalAt::Periodic)? {
                let loss = done.loss;
                self.bar.suspend(|| {
                    tracing::info!("step {step}: train loss {loss:.4}, eval loss {l:.4}")
                });
            }
        }
        let c = &self.cfg.checkpoint;
        let minutes_since =
            (self.planner.elapsed().saturating_sub(self.last_ckpt_at)).as_secs_f64() / 60.0;
        let periodic = (c.every_steps > 0 && step.is_multiple_of(c.every_steps))
            || (c.every_minutes > 0.0 && minutes_since >= c.every_minutes)
            // Measure what a checkpoint costs early, so the final one is planned for.
            || self.measure_checkpoint;
        if periodic && !last && !halting && self.root {
            self.save_checkpoint(None, 0, false)?;
            self.measure_checkpoint = false;
            self.last_ckpt_at = self.planner.elapsed();
            self.replan_costs();
        }
        Ok(())
    }

    /// Metrics of the steps since the last log line: tokens/s over the steps' own
    /// time (evaluations and checkpoints excluded), comparable with `qtrain bench`.
    fn log_window(&mut self, done: &StepDone) -> Result<()> {
        let tps = self.timing.window_tokens as f64 / self.timing.window_step_s.max(1e-9);
        let step_s = self.timing.window_step_s
            / (self.timing.window_tokens / self.tokens_per_step.max(1)).max(1) as f64;
        self.timing.window_tokens = 0;
        self.timing.window_step_s = 0.0;
        let (loss, lr) = (done.loss, done.lr);
        self.bar
            .set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
        self.sink.log(&Record {
            step: self.pos.step,
            loss: Some(loss),
            lr: Some(lr as f64),
            tokens_per_s: Some(tps),
            grad_norm: Some(done.grad_norm as f64),
            elapsed_s: self.planner.elapsed().as_secs_f64(),
            extra: vec![("step_s".into(), step_s)],
            ..Record::default()
        })?;
        Ok(())
    }

    /// A fresh run's time budget must hold the first step and what follows the
    /// last: a budget below one step is an error, not an untrained adapter.
    fn check_first_step(&mut self) -> Result<()> {
        if self.first_step_checked {
            return Ok(());
        }
        self.first_step_checked = true;
        let Budget::Time(b) = self.planner.budget() else {
            return Ok(());
        };
        if self.resumed_from.is_some() {
            return Ok(());
        }
        let after = budget::final_phases(&self.costs, &self.sizes, self.planner.step_seconds());
        let now = self.planner.elapsed().as_secs_f64();
        if now + after > b.as_secs_f64() {
            return Err(TrainError::Budget(format!(
                "the time budget ({}) is below one training step: setup, loading and \
                 the first step took {now:.1} s (loading {:.1} s, evaluation {:.1} s, the \
                 step {:.1} s) and the final checkpoint, export, evaluation and sample answers \
                 need ~{after:.1} s more. Give a budget of at least {:.0} s",
                budget::format_secs(b.as_secs_f64()),
                self.accounting.secs(budget::Phase::Load),
                self.accounting.secs(budget::Phase::Evaluation),
                self.accounting.secs(budget::Phase::Steps),
                (now + after + budget::margin(b).as_secs_f64()).ceil()
            )));
        }
        Ok(())
    }
}

fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
}

pub(super) fn announce(plan: &Plan, tokens_per_step: u64) {
    match plan.step_seconds {
        Some(s) => tracing::info!(
            "plan: {} optimizer steps ({} done), {:.2}s/step, {} tokens/step, {:.1}M tokens in all, ETA {}",
            plan.total_steps,
            plan.steps_done,
            s,
            tokens_per_step,
            plan.tokens_planned as f64 / 1e6,
            format_duration(plan.eta)
        ),
        None => tracing::info!(
            "plan: {} optimizer steps (provisional until step time is measured)",
            plan.total_steps
        ),
    }
}
