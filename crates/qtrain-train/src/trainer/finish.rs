//! `Trainer::finish`: the final checkpoint, the PEFT adapter, the final evaluation
//! and sample answers (when the budget ended the run), and the budget accounting
//! in the log and `metrics.jsonl`.

use super::evaluate::EvalAt;
use super::{RunSummary, SampleAnswer, StepTiming, Stop, Trainer};
use crate::budget::{History, Phase};
use crate::error::{dist, Result};
use crate::planner::Budget;
use std::path::PathBuf;

impl Trainer {
    pub(super) fn finish(mut self, stop: Stop) -> Result<RunSummary> {
        self.bar.finish_and_clear();
        let adapter_dir = self.out_dir.join("adapter");
        if !self.root {
            // Rank 0 writes; the others learn where the checkpoint went and leave.
            let mut path = Vec::new();
            self.coll.broadcast_bytes(&mut path).map_err(dist)?;
            let checkpoint = PathBuf::from(String::from_utf8_lossy(&path).into_owned());
            return Ok(self.summary(stop, checkpoint, adapter_dir, None, Vec::new()));
        }
        let nonfinite = self.pos.nonfinite;
        let checkpoint = self
            .save_checkpoint(None, nonfinite, stop == Stop::Planned)?
            .expect("rank 0 writes checkpoints");
        self.coll
            .broadcast_bytes(&mut checkpoint.to_string_lossy().into_owned().into_bytes())
            .map_err(dist)?;
        self.export_adapter(&adapter_dir)?;
        let final_eval_loss = match stop {
            Stop::Planned => self.evaluate(EvalAt::Final)?,
            Stop::Signal | Stop::Halt => None,
        };
        let after = match stop {
            Stop::Signal => Vec::new(),
            Stop::Planned | Stop::Halt => self.answer_samples()?,
        };
        let samples = self
            .prompts
            .iter()
            .zip(&self.before)
            .zip(after)
            .map(|(((msgs, reference), before), after)| SampleAnswer {
                prompt: msgs.last().map(|m| m.content.clone()).unwrap_or_default(),
                reference: reference.clone(),
                before: before.clone(),
                after,
            })
            .collect();
        if stop == Stop::Planned {
            self.remember_timings();
        }
        Ok(self.summary(stop, checkpoint, adapter_dir, final_eval_loss, samples))
    }

    /// The summary, with the budget accounting logged and written to the metrics.
    fn summary(
        &mut self,
        stop: Stop,
        checkpoint: PathBuf,
        adapter_dir: PathBuf,
        final_eval_loss: Option<f64>,
        samples: Vec<SampleAnswer>,
    ) -> RunSummary {
        let budget = match self.planner.budget() {
            Budget::Time(b) => Some(b),
            Budget::Steps(_) => None,
        };
        let before = self.planner.elapsed_before();
        let wall = self.clock.now();
        let budget_report = self.accounting.summary(budget, before, wall);
        if self.root {
            tracing::info!("{budget_report}");
            let record = self.accounting.record(self.pos.step, budget, before, wall);
            if let Err(e) = self.sink.log(&record) {
                tracing::warn!("writing the budget accounting: {e}");
            }
        }
        let t = &self.timing;
        let step_timing = (t.steps > 0).then(|| {
            let n = t.steps as f64;
            StepTiming {
                steps: t.steps,
                step_s: t.step_s / n,
                tokens_per_s: self.tokens_per_step as f64 * n / t.step_s.max(1e-9),
                data_wait_s: t.data_wait_s / n,
                bookkeeping_s: t.bookkeeping_s / n,
            }
        });
        RunSummary {
            steps: self.pos.step,
            tokens: self.pos.tokens_seen,
            elapsed: self.planner.elapsed(),
            last_train_loss: self.pos.last_loss,
            first_eval_loss: self.first_eval_loss,
            final_eval_loss,
            checkpoint,
            adapter_dir,
            samples,
            stopped_by_signal: stop == Stop::Signal,
            already_finished: false,
            budget_report,
            step_timing,
        }
    }

    /// Keeps this run's measured timings for the next run's forecast (real clocks
    /// only: a simulated one measures nothing).
    fn remember_timings(&self) {
        if self.clock.now().is_zero() {
            return;
        }
        let path = self.history_path();
        let mut h = History::read(&path).unwrap_or_default();
        let per = |secs: Option<f64>, n: u64| secs.filter(|_| n > 0).map(|s| s / n as f64);
        if self.accounting.secs(Phase::Load) > 0.0 {
            h.load_s = self.accounting.secs(Phase::Load);
        }
        if self.timing.steps > 0 {
            h.step_s_per_token =
                self.timing.step_s / self.timing.steps as f64 / self.tokens_per_step.max(1) as f64;
        }
        if let Some(v) = per(self.costs.eval_s, self.sizes.eval_tokens) {
            h.eval_s_per_token = v;
        }
        if let Some(v) = per(self.costs.samples_s, self.sizes.sample_tokens) {
            h.sample_s_per_token = v;
        }
        if let Some(r) = self.costs.write_bytes_per_s {
            h.write_bytes_per_s = r;
        }
        h.write(&path);
    }
}
