//! Training metrics: one JSON object per line in `metrics.jsonl` and the same
//! scalars in a TensorBoard event file (see `tensorboard`), both in the run's
//! output directory. This module owns the record type, the JSONL format and the
//! mapping from record fields to TensorBoard tags.
//!
//! Both files are flushed after every record, so a crashed or killed run keeps its
//! curves, and `tail -f metrics.jsonl` or a live TensorBoard shows them as they come.
//! `metrics.jsonl` is appended to, so a resumed run continues the same file.

use crate::tensorboard::EventWriter;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const JSONL_FILE: &str = "metrics.jsonl";

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct MetricsError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// One logged point; `None` fields are left out of both files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub step: u64,
    pub loss: Option<f64>,
    pub lr: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub grad_norm: Option<f64>,
    pub elapsed_s: f64,
    pub gpu_mem_bytes: Option<u64>,
    pub eval_loss: Option<f64>,
    /// Further scalars: the key is the JSON key; the TensorBoard tag is the key if
    /// it contains a `/` (e.g. `eval/accuracy`), else `train/<key>`.
    pub extra: Vec<(String, f64)>,
}

impl Record {
    /// `(tag, value)` for TensorBoard, in a fixed order.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        let mut put = |tag: &str, v: Option<f64>| {
            if let Some(v) = v {
                out.push((tag.to_string(), v));
            }
        };
        put("train/loss", self.loss);
        put("train/lr", self.lr);
        put("train/tokens_per_s", self.tokens_per_s);
        put("train/grad_norm", self.grad_norm);
        put("train/gpu_mem_bytes", self.gpu_mem_bytes.map(|b| b as f64));
        put("eval/loss", self.eval_loss);
        for (k, v) in &self.extra {
            let tag = if k.contains('/') {
                k.clone()
            } else {
                format!("train/{k}")
            };
            out.push((tag, *v));
        }
        out
    }

    /// The JSONL object. A non-finite value (a diverged loss) has no JSON number, so
    /// it is written as `null`: present, unlike a field that was not measured.
    /// Extra keys that collide with a fixed field lose to it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut obj = serde_json::Map::new();
        for (k, v) in &self.extra {
            obj.insert(k.clone(), (*v).into());
        }
        obj.insert("step".into(), self.step.into());
        obj.insert("elapsed_s".into(), self.elapsed_s.into());
        let mut put = |k: &str, v: Option<f64>| {
            if let Some(v) = v {
                obj.insert(k.into(), v.into());
            }
        };
        put("loss", self.loss);
        put("lr", self.lr);
        put("tokens_per_s", self.tokens_per_s);
        put("grad_norm", self.grad_norm);
        put("eval_loss", self.eval_loss);
        // An integer, not a float: byte counts past 2^53 do not occur, and readers
        // (jq, pandas) keep the type.
        if let Some(b) = self.gpu_mem_bytes {
            obj.insert("gpu_mem_bytes".into(), b.into());
        }
        serde_json::Value::Object(obj)
    }
}

/// Where records go: either file, both or neither.
pub struct MetricsSink {
    jsonl: Option<(BufWriter<File>, PathBuf)>,
    tb: Option<EventWriter>,
}

impl MetricsSink {
    /// Opens `dir/metrics.jsonl` for appending and/or creates a new TensorBoard event
    /// file in `dir` (creating `dir` if needed).
    pub fn create(dir: &Path, jsonl: bool, tensorboard: bool) -> Result<Self, MetricsError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MetricsError { path, source }
        };
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        let jsonl = if jsonl {
            let p = dir.join(JSONL_FILE);
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(err(&p))?;
            Some((BufWriter::new(f), p))
        } else {
            None
        };
        let tb = if tensorboard {
            Some(EventWriter::create(dir).map_err(err(dir))?)
        } else {
            None
        };
        Ok(Self { jsonl, tb })
    }

    pub fn jsonl_path(&self) -> Option<&Path> {
        self.jsonl.as_ref().map(|(_, p)| p.as_path())
    }

    pub fn tensorboard_path(&self) -> Option<&Path> {
        self.tb.as_ref().map(|t| t.path())
    }

    /// Writes `r` to both files and flushes them.
    pub fn log(&mut self, r: &Record) -> Result<(), MetricsError> {
        if let Some((w, path)) = &mut self.jsonl {
            // One `write_all` of the whole line: with `O_APPEND` a line is never
            // interleaved with another writer's, and a crash cannot leave half of it
            // buffered.
            let mut line = r.to_json().to_string();
            line.push('\n');
            w.write_all(line.as_bytes())
                .and_then(|_| w.flush())
                .map_err(|source| MetricsError {
                    path: path.clone(),
                    source,
                })?;
        }
        if let Some(tb) = &mut self.tb {
            let tagged = r.scalars();
            // A record without scalars (only step and time) would be an empty event.
            if !tagged.is_empty() {
                let refs: Vec<(&str, f32)> = tagged
                    .iter()
                    .map(|(k, v)| (k.as_str(), *v as f32))
                    .collect();
                tb.scalars(r.step, &refs).map_err(|source| MetricsError {
                    path: tb.path().to_path_buf(),
                    source,
                })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensorboard::tests::read_events;

    fn read_jsonl(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(JSONL_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn jsonl_and_tensorboard_carry_the_same_points() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = MetricsSink::create(dir.path(), true, true).unwrap();
        s.log(&Record {
            step: 1,
            loss: Some(2.5),
            lr: Some(1e-3),
            tokens_per_s: Some(1234.5),
            grad_norm: Some(0.75),
            gpu_mem_bytes: Some(3_000_000_000),
            elapsed_s: 0.5,
            extra: vec![("loss_scale".into(), 8.0), ("eval/acc".into(), 0.5)],
            ..Record::default()
        })
        .unwrap();
        s.log(&Record {
            step: 2,
            eval_loss: Some(1.25),
            elapsed_s: 1.0,
            ..Record::default()
        })
        .unwrap();
        // Only step and time: a JSON line, no TensorBoard event.
        s.log(&Record {
            step: 3,
            elapsed_s: 1.5,
            ..Record::default()
        })
        .unwrap();

        let lines = read_jsonl(dir.path());
        assert_eq!(lines.len(), 3);
        let l0 = lines[0].as_object().unwrap();
        let mut keys: Vec<&str> = l0.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "elapsed_s",
                "eval/acc",
                "gpu_mem_bytes",
                "grad_norm",
                "loss",
                "loss_scale",
                "lr",
                "step",
                "tokens_per_s"
            ]
        );
        assert_eq!(l0["step"].as_u64(), Some(1));
        assert_eq!(l0["loss"].as_f64(), Some(2.5));
        assert_eq!(l0["lr"].as_f64(), Some(1e-3));
        assert_eq!(l0["tokens_per_s"].as_f64(), Some(1234.5));
        assert_eq!(l0["grad_norm"].as_f64(), Some(0.75));
        assert_eq!(l0["gpu_mem_bytes"].as_u64(), Some(3_000_000_000));
        assert_eq!(l0["elapsed_s"].as_f64(), Some(0.5));
        assert_eq!(l0["loss_scale"].as_f64(), Some(8.0));
        let l1 = lines[1].as_object().unwrap();
        assert_eq!(l1.len(), 3, "{l1:?}");
        assert_eq!(l1["eval_loss"].as_f64(), Some(1.25));
        assert!(l1.get("loss").is_none());
        assert_eq!(lines[2].as_object().unwrap().len(), 2);

        let ev = read_events(s.tensorboard_path().unwrap());
        assert_eq!(ev.len(), 3, "version event + two scalar events");
        assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(ev[1].step, Some(1));
        assert_eq!(
            ev[1].scalars,
            vec![
                ("train/loss".to_string(), 2.5),
                ("train/lr".to_string(), 1e-3),
                ("train/tokens_per_s".to_string(), 1234.5),
                ("train/grad_norm".to_string(), 0.75),
                ("train/gpu_mem_bytes".to_string(), 3e9),
                ("train/loss_scale".to_string(), 8.0),
                ("eval/acc".to_string(), 0.5),
            ]
        );
        assert_eq!(ev[2].step, Some(2));
        assert_eq!(ev[2].scalars, vec![("eval/loss".to_string(), 1.25)]);
    }

    #[test]
    fn jsonl_appends_across_sinks_and_nan_is_null() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = MetricsSink::create(dir.path(), true, false).unwrap();
        assert!(a.tensorboard_path().is_none());
        a.log(&Record {
            step: 1,
            loss: Some(f64::NAN),
            ..Record::default()
        })
        .unwrap();
        drop(a);
        // A resumed run opens the same file again and continues it.
        let mut b = MetricsSink::create(dir.path(), true, false).unwrap();
        b.log(&Record {
            step: 2,
            loss: Some(1.0),
            ..Record::default()
        })
        .unwrap();
        let lines = read_jsonl(dir.path());
        assert_eq!(lines.len(), 2);
        assert!(lines[0]["loss"].is_null());
        assert!(lines[0].as_object().unwrap().contains_key("loss"));
        assert_eq!(lines[1]["step"].as_u64(), Some(2));
        let events = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("tfevents")
            })
            .count();
        assert_eq!(events, 0, "tensorboard disabled");
    }

    #[test]
    fn tensorboard_only_writes_no_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = MetricsSink::create(&dir.path().join("sub"), false, true).unwrap();
        s.log(&Record {
            step: 5,
            grad_norm: Some(3.0),
            ..Record::default()
        })
        .unwrap();
        assert!(s.jsonl_path().is_none());
        assert!(!dir.path().join("sub").join(JSONL_FILE).exists());
        let ev = read_events(s.tensorboard_path().unwrap());
        assert_eq!(ev[1].scalars, vec![("train/grad_norm".to_string(), 3.0)]);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let e = MetricsSink::create(&file, true, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not-a-dir"), "{e}");
    }
}
