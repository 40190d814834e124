//! `Trainer::evaluate`: the held-out eval loss (micro-batched, recovering from an
//! out-of-memory as steps do) and the sample answers, each timed for the budget.

use super::Trainer;
use crate::backend::Backend;
use crate::budget::Phase;
use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::metrics::Record;
use crate::micro::{self, StepShape};
use qtrain_data::{DatasetConfig, Encoder, EvalStream, Message, Sample};
use qtrain_model::BaseModel;
use qtrain_step::LoraWeights;
use std::path::PathBuf;
use std::sync::Arc;

/// Which evaluation: where its out-of-memory leaves the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EvalAt {
    /// Before training (nothing to checkpoint yet).
    Start,
    /// Every `eval.every_steps` (checkpoint, then stop).
    Periodic,
    /// After the final checkpoint.
    Final,
}

impl Trainer {
    /// A fresh run's sample answers and eval loss before training; the plan.
    pub(super) fn evaluate_before_training(&mut self) -> Result<()> {
        if self.root {
            self.prompts = sample_prompts(&self.cfg.data, self.cfg.eval.samples)?;
        }
        if self.resumed_from.is_some() {
            self.before = vec![String::new(); self.prompts.len()];
        } else {
            self.before = self.answer_samples()?;
            if self.root {
                let l = self.evaluate(EvalAt::Start)?;
                if let Some(l) = l {
                    tracing::info!("eval loss before training: {l:.4}");
                }
                self.first_eval_loss = l;
            }
        }
        super::step::announce(&self.planner.plan(), self.tokens_per_step);
        Ok(())
    }

    /// The greedy answers of the current adapters to the held-out prompts, timed.
    pub(super) fn answer_samples(&mut self) -> Result<Vec<String>> {
        if self.prompts.is_empty() {
            return Ok(Vec::new());
        }
        let t = self.clock.now();
        let lora = self.backend.lora_weights(&self.base.device)?;
        let out = answer(
            &self.base,
            Some(&lora),
            &self.encoder,
            &self.prompts,
            self.cfg.eval.max_new_tokens,
        )?;
        let took = self.clock.now().saturating_sub(t);
        self.accounting.add(Phase::Samples, took);
        self.costs.record_samples(took);
        Ok(out)
    }

    /// One evaluation (rank 0), logged and timed. An out-of-memory that cannot be
    /// given back stops the run, naming the checkpoint it leaves.
    pub(super) fn evaluate(&mut self, at: EvalAt) -> Result<Option<f64>> {
        let t = self.clock.now();
        let result = evaluate_fitting(
            &mut self.backend,
            &self.base,
            &self.cfg,
            &self.data_cfg,
            &self.encoder,
            &mut self.shape,
        );
        let loss = match result {
            Err(e) if micro::is_oom(&e) => {
                let (detail, checkpoint) = match at {
                    EvalAt::Start => (format!("evaluating before training: {e}"), None),
                    EvalAt::Periodic => (
                        format!("during evaluation: {e}"),
                        self.save_checkpoint(None, 0, false)?,
                    ),
                    EvalAt::Final => (
                        format!("in the final evaluation: {e}"),
                        self.last_checkpoint.clone(),
                    ),
                };
                return Err(self.oom_stop(&detail, checkpoint));
            }
            r => r?,
        };
        let took = self.clock.now().saturating_sub(t);
        self.accounting.add(Phase::Evaluation, took);
        self.costs.record_eval(took);
        if let Some(l) = loss {
            self.sink.log(&Record {
                step: self.pos.step,
                eval_loss: Some(l),
                elapsed_s: self.planner.elapsed().as_secs_f64(),
                ..Record::default()
            })?;
        }
        self.replan_costs();
        Ok(loss)
    }

    /// The error that stops the run after an out-of-memory nothing could relieve.
    pub(super) fn oom_stop(&self, detail: &str, checkpoint: Option<PathBuf>) -> TrainError {
        TrainError::OutOfMemoryStop(micro::oom_stop_message(
            detail,
            &self.shape,
            self.cfg.data.seq_len,
            self.pos.step,
            checkpoint.as_deref(),
            &self.cfg.train.oom,
        ))
    }
}

/// Mean eval loss over the held-out split (at most `max_batches` batches, each cut
/// into micro-batches of `micro_rows` rows).
fn evaluate_split(
    backend: &mut Backend,
    base: &BaseModel,
    data: &DatasetConfig,
    enc: &Arc<Encoder>,
    max_batches: usize,
    micro_rows: usize,
) -> Result<Option<f64>> {
    let stream = EvalStream::new(data, enc.clone())?;
    let (mut sum, mut n) = (0.0, 0usize);
    for (i, b) in stream.enumerate() {
        if max_batches > 0 && i >= max_batches {
            break;
        }
        for part in micro::split_rows(&b?, micro_rows)? {
            let l = backend.eval_loss(base, &part)?;
            sum += l.loss_sum;
            n += l.valid_tokens;
        }
    }
    Ok((n > 0).then(|| sum / n as f64))
}

/// [`evaluate_split`], giving memory back on an out-of-memory when `train.oom =
/// "retry"` allows it.
fn evaluate_fitting(
    backend: &mut Backend,
    base: &BaseModel,
    cfg: &RunConfig,
    data: &DatasetConfig,
    enc: &Arc<Encoder>,
    shape: &mut StepShape,
) -> Result<Option<f64>> {
    loop {
        match evaluate_split(
            backend,
            base,
            data,
            enc,
            cfg.eval.max_batches,
            shape.micro_rows,
        ) {
            Err(e) if micro::is_oom(&e) => match micro::give_back_memory(backend, shape, cfg) {
                r @ (micro::Relief::DequantizedBase
                | micro::Relief::MlpActivations
                | micro::Relief::Residuals) => tracing::warn!(
                    "evaluation ran out of GPU memory ({e}); {}",
                    r.describe()
                ),
                micro::Relief::HalvedMicroBatch => tracing::warn!(
                    "evaluation ran out of GPU memory ({e}); continuing with micro-batches of {} rows",
                    shape.micro_rows
                ),
                micro::Relief::None => return Err(e),
            },
            r => return r,
        }
    }
}

/// Greedy answers to held-out prompts.
fn answer(
    base: &BaseModel,
    lora: Option<&LoraWeights>,
    enc: &Encoder,
    prompts: &[(Vec<Message>, String)],
    max_new: usize,
) -> Result<Vec<String>> {
    prompts
        .iter()
        .map(|(msgs, _)| {
            let ids = enc.encode_prompt(msgs)?;
            let out = crate::generate::greedy(base, lora, &ids, max_new, enc.eos_id())?;
            Ok(enc.decode(&out, true)?.trim().to_string())
        })
        .collect()
}

/// Held-out chat prompts (all turns but the last assistant one) with the reference answer.
fn sample_prompts(data: &DatasetConfig, n: usize) -> Result<Vec<(Vec<Message>, String)>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(qtrain_data::eval_samples(data, n)?
        .into_iter()
        .filter_map(|s| match s {
            Sample::Chat(mut msgs) if msgs.last().is_some_and(|m| m.is_assistant()) => {
                let reference = msgs.pop().expect("non-empty").content;
                Some((msgs, reference))
            }
            _ => None,
        })
        .collect())
}
