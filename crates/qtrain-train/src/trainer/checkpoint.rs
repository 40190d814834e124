//! `Trainer::save_checkpoint`: the run's current state as a checkpoint of its
//! lineage (written by rank 0 only), timed for the budget; and the final PEFT
//! adapter export.

use super::{Trainer, TrainerState, ADAPTER_FILE, OPTIMIZER_FILE, STATE_FILE};
use crate::budget::Phase;
use crate::ckpt_io::{self, SaveOptions};
use crate::error::Result;
use crate::peft::{self, PeftDtype};
use qtrain_data::DataCursor;
use qtrain_step::HostTensor;
use std::path::{Path, PathBuf};

/// Room for the trainer state and config beside the tensors.
const STATE_BYTES: u64 = 1 << 20;

impl Trainer {
    /// The checkpoint's non-tensor state. `cursor`: where the data stands (the
    /// stream's cursor after the step, or the one from before a step that did not
    /// complete).
    fn state(&self, cursor: DataCursor, nonfinite: usize, finished: bool) -> TrainerState {
        TrainerState {
            step: self.pos.step,
            tokens_seen: self.pos.tokens_seen,
            planner: self.planner.state(),
            data_cursor: cursor,
            nonfinite_in_a_row: nonfinite,
            first_eval_loss: self.first_eval_loss,
            config_toml: self.cfg.to_toml(),
            model_dir: self.model_dir.clone(),
            micro_batch: Some(self.shape.micro_rows),
            loss_scaler: self.scaler.clone(),
            run_id: self.run_id.clone(),
            finished,
            data_files: self.data_files.clone(),
            phase_costs: self.costs.clone(),
        }
    }

    /// Writes a checkpoint of the current step (rank 0; the others get `None`).
    /// `cursor`: the data position to record when it is not the stream's (a step
    /// that did not complete); `finished`: the run's budget is done.
    pub(super) fn save_checkpoint(
        &mut self,
        cursor: Option<DataCursor>,
        nonfinite: usize,
        finished: bool,
    ) -> Result<Option<PathBuf>> {
        if !self.root {
            return Ok(None);
        }
        let t = self.clock.now();
        let state = self.state(
            cursor.unwrap_or_else(|| self.stream.cursor()),
            nonfinite,
            finished,
        );
        let params = self.backend.params()?;
        let opts = SaveOptions {
            keep_last: self.cfg.checkpoint.keep_last,
            run_id: self.run_id.clone(),
            protect: self.resumed_from.clone(),
            expected_bytes: Some(self.sizes.checkpoint_bytes + STATE_BYTES),
            write_quota: self.write_quota,
        };
        let backend = &self.backend;
        let dir = ckpt_io::save_with(
            &self.ckpt_root,
            self.pos.step,
            state.planner.elapsed_secs,
            &opts,
            |d| {
                save_lora(&d.join(ADAPTER_FILE), &params)?;
                backend.save_optimizer(&d.join(OPTIMIZER_FILE))?;
                // Compact: the pending data documents are bounded, but thousands of
                // token ids one per line would still make it large.
                std::fs::write(d.join(STATE_FILE), serde_json::to_string(&state)?)?;
                std::fs::write(d.join("config.toml"), &state.config_toml)?;
                Ok(())
            },
        )?;
        let took = self.clock.now().saturating_sub(t);
        self.accounting.add(Phase::Checkpoints, took);
        self.costs.record_checkpoint(took, dir_bytes(&dir));
        self.last_checkpoint = Some(dir.clone());
        Ok(Some(dir))
    }

    /// Writes the PEFT adapter into `dir` (atomically: a failed write leaves the
    /// previous adapter), timed for the budget.
    pub(super) fn export_adapter(&mut self, dir: &Path) -> Result<()> {
        let t = self.clock.now();
        let params = self.backend.params()?;
        let lcfg = super::setup::lora_config(&self.cfg)?;
        let settings = super::setup::peft_settings(&lcfg, &self.cfg.model.path);
        ckpt_io::write_dir_atomic(
            dir,
            Some(self.sizes.adapter_bytes + STATE_BYTES),
            self.write_quota,
            |tmp| {
                Ok(peft::write_peft_adapter(
                    tmp,
                    &params,
                    &settings,
                    PeftDtype::F32,
                )?)
            },
        )?;
        self.accounting
            .add(Phase::Export, self.clock.now().saturating_sub(t));
        Ok(())
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Writes LoRA tensors (qtrain names, f32) as safetensors.
fn save_lora(path: &Path, params: &[HostTensor]) -> Result<()> {
    use qtrain_model::safetensors_io::{f32_to_le_bytes, StreamingWriter, TensorSpec};
    let specs = params
        .iter()
        .map(|(n, _, s)| TensorSpec::new(n.clone(), safetensors::Dtype::F32, s))
        .collect();
    let mut w = StreamingWriter::create(path, specs, None)?;
    for (_, v, _) in params {
        w.write_next(&f32_to_le_bytes(v))?;
    }
    Ok(w.finish()?)
}
