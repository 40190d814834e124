//! Where a run starts: a fresh run claims its output directory (refusing one that
//! holds another run's checkpoints unless told to replace it); a resume finds its
//! checkpoint (falling back past a corrupt newest one, naming the file and the
//! check that failed), names every setting that changed since (refusing the ones
//! that cannot change within a run), refuses data files changed under the same path,
//! and recognizes a run that already finished its budget.

use super::{Resume, RunSummary, TrainerState, STATE_FILE};
use crate::ckpt_io;
use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::planner::Budget;
use qtrain_data::DatasetConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The checkpoint a run resumes from.
pub(super) struct Resumed {
    pub dir: PathBuf,
    pub state: TrainerState,
    /// The config the checkpoint's run started with.
    pub old: RunConfig,
}

/// A fresh run may write into `out_dir` only when no complete checkpoint is there,
/// or with `overwrite` (then the earlier run's checkpoints, metrics and adapter are
/// removed, by rank 0). Temporary directories of killed writes are cleared.
pub(super) fn claim_output(
    out_dir: &Path,
    ckpt_root: &Path,
    overwrite: bool,
    root: bool,
) -> Result<()> {
    let existing = ckpt_io::list(ckpt_root);
    if let Some(newest) = existing.last() {
        if !overwrite {
            return Err(TrainError::OutputInUse {
                dir: out_dir.to_path_buf(),
                newest: newest.dir.display().to_string(),
            });
        }
        if root {
            tracing::warn!(
                "--overwrite: removing the earlier run's {} checkpoint(s), metrics and adapter \
                 in {}",
                existing.len(),
                out_dir.display()
            );
            remove_earlier_run(out_dir, ckpt_root)?;
        }
    }
    if root {
        ckpt_io::remove_stale_temporaries(ckpt_root)?;
    }
    Ok(())
}

/// What a run writes into its output directory, and nothing else there.
fn remove_earlier_run(out_dir: &Path, ckpt_root: &Path) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| TrainError::Other(format!("{}: {e}", p.display()))
    };
    std::fs::remove_dir_all(ckpt_root).map_err(io(ckpt_root))?;
    let adapter = out_dir.join("adapter");
    if adapter.exists() {
        std::fs::remove_dir_all(&adapter).map_err(io(&adapter))?;
    }
    for e in std::fs::read_dir(out_dir).map_err(io(out_dir))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == crate::metrics::JSONL_FILE || name.starts_with("events.out.tfevents") {
            std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
        }
    }
    Ok(())
}

/// Finds, verifies and reads the checkpoint to resume, and checks `cfg` against
/// the config it was made with.
pub(super) fn open(ckpt_root: &Path, resume: &Resume, cfg: &RunConfig) -> Result<Resumed> {
    let dir = match resume {
        Resume::Dir(d) => d.clone(),
        Resume::Latest => {
            let (dir, problems) = ckpt_io::latest_verified(ckpt_root)?;
            for p in &problems {
                tracing::warn!(
                    "{p}; resuming from the newest complete checkpoint instead: {}",
                    dir.display()
                );
            }
            dir
        }
    };
    let (state, old) = read_state(&dir)?;
    check_config(&dir, &old, cfg)?;
    Ok(Resumed { dir, state, old })
}

/// Verifies a checkpoint against its manifest and reads its trainer state and the
/// config its run started with.
pub(super) fn read_state(dir: &Path) -> Result<(TrainerState, RunConfig)> {
    ckpt_io::verify(dir)?;
    let p = dir.join(STATE_FILE);
    let err = |msg: String| TrainError::Resume {
        path: p.clone(),
        msg,
    };
    let text = std::fs::read_to_string(&p).map_err(|e| err(e.to_string()))?;
    let st: TrainerState = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let cfg: RunConfig =
        toml::from_str(&st.config_toml).map_err(|e| err(format!("stored config: {e}")))?;
    Ok((st, cfg))
}

/// Settings that fix what a checkpoint holds or the data order: a resume with
/// other values would not be the same run.
fn cannot_change(key: &str) -> bool {
    key.starts_with("lora.")
        || (key.starts_with("data.") && key != "data.prefetch")
        || matches!(
            key,
            "model.path"
                | "model.quantization"
                | "model.double_quant"
                | "train.grad_accum"
                | "train.effective_batch"
                | "optimizer.kind"
        )
}

/// Settings whose change leaves the training itself exactly as it would have been.
fn keeps_training_exact(key: &str) -> bool {
    key.starts_with("checkpoint.")
        || key.starts_with("log.")
        || key.starts_with("eval.")
        || matches!(
            key,
            "model.device"
                | "model.quantized_cache"
                | "data.prefetch"
                | "train.oom"
                | "train.keep_attention_residuals"
                | "train.keep_mlp_activations"
                | "train.keep_dequantized_base"
                | "train.offload_checkpoints"
        )
}

/// `[section] key: old -> new`.
fn describe(key: &str, old: &Option<toml::Value>, new: &Option<toml::Value>) -> String {
    let show = |v: &Option<toml::Value>| match v {
        None => "unset".to_string(),
        // f32 settings (lr, betas) widen to f64 in the table: show them as written.
        Some(toml::Value::Float(f)) if (*f as f32) as f64 == *f => (*f as f32).to_string(),
        Some(v) => v.to_string(),
    };
    let shown = match key.split_once('.') {
        Some((section, rest)) => format!("[{section}] {rest}"),
        None => key.to_string(),
    };
    format!("{shown}: {} -> {}", show(old), show(new))
}

fn leaves(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&key, v, out);
            }
        }
        v => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// Every setting that differs between two configs, by key path.
pub(super) fn config_changes(
    old: &RunConfig,
    new: &RunConfig,
) -> Vec<(String, Option<toml::Value>, Option<toml::Value>)> {
    let flat = |c: &RunConfig| {
        let mut m = BTreeMap::new();
        if let Ok(v) = toml::Value::try_from(c) {
            leaves("", &v, &mut m);
        }
        m
    };
    let (a, b) = (flat(old), flat(new));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| (k.clone(), a.get(k).cloned(), b.get(k).cloned()))
        .collect()
}

/// Refuses changes that cannot be resumed (naming each key), and says which
/// changed settings make the run no longer an exact continuation.
fn check_config(dir: &Path, old: &RunConfig, new: &RunConfig) -> Result<()> {
    let changes = config_changes(old, new);
    let list = |pred: &dyn Fn(&str) -> bool| -> Vec<String> {
        changes
            .iter()
            .filter(|(k, _, _)| pred(k))
            .map(|(k, o, n)| describe(k, o, n))
            .collect()
    };
    let refused = list(&|k| cannot_change(k));
    if !refused.is_empty() {
        return Err(TrainError::Resume {
            path: dir.to_path_buf(),
            msg: format!(
                "the checkpoint was made with different values of settings that cannot change \
                 within a run: {}. Resume with the checkpoint's values (its config.toml is \
                 beside it) or start a new run in another output directory",
                refused.join("; ")
            ),
        });
    }
    let inexact = list(&|k| !cannot_change(k) && !keeps_training_exact(k));
    if !inexact.is_empty() {
        tracing::warn!(
            "resuming {} with changed settings: {}; the run is no longer an exact continuation \
             of the checkpoint",
            dir.display(),
            inexact.join("; ")
        );
    }
    let exact = list(&|k| keeps_training_exact(k));
    if !exact.is_empty() {
        tracing::info!(
            "resuming with changed settings that leave the training as it was: {}",
            exact.join("; ")
        );
    }
    Ok(())
}

impl Resumed {
    /// The summary of a resumed run with nothing left to do: it finished its
    /// budget, and the budget given now is not larger.
    pub fn finished_summary(&self, cfg: &RunConfig, out_dir: &Path) -> Option<RunSummary> {
        let st = &self.state;
        let budget = cfg.budget_kind().unwrap_or(Budget::Steps(100));
        let elapsed = st.planner.elapsed_secs;
        let done = match budget {
            Budget::Steps(n) => st.step >= n,
            Budget::Time(b) => {
                let same_or_smaller = matches!(
                    self.old.budget_kind(),
                    Some(Budget::Time(old)) if b <= old
                );
                (st.finished && same_or_smaller) || elapsed >= b.as_secs_f64()
            }
        };
        if !done {
            if st.finished {
                tracing::info!(
                    "{} finished its budget; continuing it with the larger budget given now",
                    self.dir.display()
                );
            }
            return None;
        }
        tracing::info!(
            "{} is the last checkpoint of a run that finished its budget (step {}, {:.0} s): \
             nothing to train",
            self.dir.display(),
            st.step,
            elapsed
        );
        Some(RunSummary {
            steps: st.step,
            tokens: st.tokens_seen,
            elapsed: Duration::from_secs_f64(elapsed),
            last_train_loss: None,
            first_eval_loss: st.first_eval_loss,
            final_eval_loss: None,
            checkpoint: self.dir.clone(),
            adapter_dir: out_dir.join("adapter"),
            samples: Vec::new(),
            stopped_by_signal: false,
            already_finished: true,
            budget_report: String::new(),
            step_timing: None,
        })
    }
}

/// Writes the PEFT adapter of a finished run's last checkpoint into `adapter_dir`
/// (the same bytes the run's own export wrote).
pub(super) fn restore_adapter(dir: &Path, adapter_dir: &Path, quota: Option<u64>) -> Result<()> {
    let (adapter, _) = super::adapter_from_checkpoint(dir)?;
    let bytes = adapter.tensors.iter().map(|t| t.1.len() as u64 * 4).sum();
    ckpt_io::write_dir_atomic(adapter_dir, Some(bytes), quota, |tmp| {
        crate::peft::write_peft_adapter(
            tmp,
            &adapter.tensors,
            &adapter.settings,
            crate::peft::PeftDtype::F32,
        )?;
        Ok(())
    })?;
    Ok(())
}

/// What identifies a data file's contents cheaply: size, modification time, and
/// hashes of its first and last MiB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub bytes: u64,
    pub modified_unix_ms: u64,
    /// FNV-1a 64 of the first MiB, hex.
    pub head: String,
    /// FNV-1a 64 of the last MiB, hex.
    pub tail: String,
}

const MIB: u64 = 1 << 20;

fn fnv_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

impl FileIdentity {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::io::{Read, Seek, SeekFrom};
        let meta = std::fs::metadata(path)?;
        let bytes = meta.len();
        let modified_unix_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        let mut f = std::fs::File::open(path)?;
        let mut buf = vec![0u8; bytes.min(MIB) as usize];
        f.read_exact(&mut buf)?;
        let head = fnv_hex(&buf);
        f.seek(SeekFrom::Start(bytes.saturating_sub(MIB)))?;
        f.read_exact(&mut buf)?;
        let tail = fnv_hex(&buf);
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            modified_unix_ms,
            head,
            tail,
        })
    }

    /// What differs from `then`, for the message.
    fn changes_since(&self, then: &FileIdentity) -> Vec<String> {
        let mut out = Vec::new();
        if self.bytes != then.bytes {
            out.push(format!("size {} -> {} bytes", then.bytes, self.bytes));
        }
        if self.head != then.head {
            out.push("the first MiB differs".into());
        }
        if self.tail != then.tail && self.bytes == then.bytes {
            out.push("the last MiB differs".into());
        }
        if self.modified_unix_ms != then.modified_unix_ms {
            let d = self.modified_unix_ms as f64 / 1e3 - then.modified_unix_ms as f64 / 1e3;
            out.push(format!(
                "modified {:.0} s {} the checkpoint's record",
                d.abs(),
                if d >= 0.0 { "after" } else { "before" }
            ));
        }
        out
    }
}

/// The identities of the training data's files (none for built-in data).
pub(super) fn identify_data(data: &DatasetConfig) -> Result<Vec<FileIdentity>> {
    let ds = qtrain_data::source::Dataset::resolve(data)?;
    ds.files
        .iter()
        .filter(|f| f.path.is_file())
        .map(|f| {
            FileIdentity::of(&f.path)
                .map_err(|e| TrainError::Other(format!("{}: {e}", f.path.display())))
        })
        .collect()
}

/// Refuses to resume on data files that changed since the checkpoint (unless
/// `allow`): the run would silently continue on other data.
pub(super) fn check_data_files(r: &Resumed, now: &[FileIdentity], allow: bool) -> Result<()> {
    let mut changed = Vec::new();
    for then in &r.state.data_files {
        match now.iter().find(|f| f.path == then.path) {
            None => changed.push(format!("{}: gone", then.path.display())),
            Some(f) => {
                let c = f.changes_since(then);
                if !c.is_empty() {
                    changed.push(format!("{}: {}", f.path.display(), c.join(", ")));
                }
            }
        }
    }
    if changed.is_empty() {
        return Ok(());
    }
    let what = format!(
        "the data changed since {} was written ({})",
        r.dir.display(),
        changed.join("; ")
    );
    if allow {
        tracing::warn!(
            "{what}; continuing on it as --allow-data-change asks (the run is no longer an \
             exact continuation)"
        );
        return Ok(());
    }
    Err(TrainError::Resume {
        path: r.dir.clone(),
        msg: format!(
            "{what}: resuming would continue on other data than the run started with. Restore \
             the data, or pass --allow-data-change to continue on the changed files"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> RunConfig {
        RunConfig::from_toml_str(text, Path::new("t.toml"), &[]).unwrap()
    }

    #[test]
    fn changes_are_listed_by_key_with_old_and_new_values() {
        let old = cfg("[optimizer]\nlr = 2e-4\n[budget]\nminutes = 3.0\n");
        let new = cfg("[optimizer]\nlr = 1e-4\n[budget]\nminutes = 5.0\n[lora]\nrank = 8\n");
        let c: Vec<String> = config_changes(&old, &new)
            .iter()
            .map(|(k, o, n)| describe(k, o, n))
            .collect();
        assert_eq!(c.len(), 3, "{c:?}");
        assert!(c.contains(&"[budget] minutes: 3 -> 5".to_string()), "{c:?}");
        assert!(c.contains(&"[lora] rank: 16 -> 8".to_string()), "{c:?}");
        assert!(
            c.contains(&"[optimizer] lr: 0.0002 -> 0.0001".to_string()),
            "{c:?}"
        );
        let e = check_config(Path::new("ck"), &old, &new)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[lora] rank: 16 -> 8") && !e.contains("optimizer"),
            "{e}"
        );
        let ok = cfg("[optimizer]\nlr = 1e-4\n[budget]\nminutes = 3.0\n");
        check_config(Path::new("ck"), &old, &ok).unwrap();
        assert!(cannot_change("data.seq_len") && cannot_change("optimizer.kind"));
        assert!(!cannot_change("optimizer.lr") && keeps_training_exact("eval.every_steps"));
    }

    #[test]
    fn file_identity_sees_replaced_contents() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jsonl");
        std::fs::write(&p, "one\n").unwrap();
        let a = FileIdentity::of(&p).unwrap();
        std::fs::write(&p, "two\n").unwrap();
        let b = FileIdentity::of(&p).unwrap();
        let c = b.changes_since(&a);
        assert!(c.iter().any(|s| s == "the first MiB differs"), "{c:?}");
        assert!(!c.iter().any(|s| s.starts_with("size")), "{c:?}");
        assert_eq!(
            FileIdentity::of(&p).unwrap().changes_since(&b),
            Vec::<String>::new()
        );
    }
}
