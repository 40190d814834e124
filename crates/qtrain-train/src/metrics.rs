//! Training metrics: one JSON object per line in `metrics.jsonl` and the same
//! scalars in a TensorBoard event file, both in the run's output directory and
//! flushed per record, so a crashed or killed run keeps its curves.

use crate::tensorboard::EventWriter;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct MetricsError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// One logged point; `None` fields are left out.
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
    pub extra: Vec<(String, f64)>,
}

pub struct MetricsSink {
    jsonl: Option<(BufWriter<File>, PathBuf)>,
    tb: Option<EventWriter>,
}

impl MetricsSink {
    pub fn create(dir: &Path, jsonl: bool, tensorboard: bool) -> Result<Self, MetricsError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MetricsError { path, source }
        };
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        let jsonl = if jsonl {
            let p = dir.join("metrics.jsonl");
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

    pub fn log(&mut self, r: &Record) -> Result<(), MetricsError> {
        let mut fields: Vec<(String, f64)> = Vec::new();
        let mut put = |k: &str, v: Option<f64>| {
            if let Some(v) = v {
                fields.push((k.to_string(), v));
            }
        };
        put("loss", r.loss);
        put("lr", r.lr);
        put("tokens_per_s", r.tokens_per_s);
        put("grad_norm", r.grad_norm);
        put("gpu_mem_bytes", r.gpu_mem_bytes.map(|b| b as f64));
        put("eval_loss", r.eval_loss);
        fields.extend(r.extra.iter().cloned());
        if let Some((w, path)) = &mut self.jsonl {
            let mut obj = serde_json::Map::new();
            obj.insert("step".into(), r.step.into());
            obj.insert("elapsed_s".into(), r.elapsed_s.into());
            for (k, v) in &fields {
                obj.insert(k.clone(), serde_json::json!(v));
            }
            writeln!(w, "{}", serde_json::Value::Object(obj))
                .and_then(|_| w.flush())
                .map_err(|source| MetricsError {
                    path: path.clone(),
                    source,
                })?;
        }
        if let Some(tb) = &mut self.tb {
            let tagged: Vec<(String, f32)> = fields
                .iter()
                .map(|(k, v)| {
                    let tag = match k.as_str() {
                        "eval_loss" => "eval/loss".to_string(),
                        other => format!("train/{other}"),
                    };
                    (tag, *v as f32)
                })
                .collect();
            let refs: Vec<(&str, f32)> = tagged.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            let path = tb.path().to_path_buf();
            tb.scalars(r.step, &refs)
                .map_err(|source| MetricsError { path, source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensorboard::tests::{decode_scalars, read_records};

    #[test]
    fn jsonl_and_tensorboard_carry_the_same_points() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = MetricsSink::create(dir.path(), true, true).unwrap();
        s.log(&Record {
            step: 1,
            loss: Some(2.5),
            lr: Some(1e-3),
            elapsed_s: 0.5,
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
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["loss"], 2.5);
        assert_eq!(lines[0]["step"], 1);
        assert!(lines[0].get("eval_loss").is_none());
        assert_eq!(lines[1]["eval_loss"], 1.25);
        let ev = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("events.out.tfevents.")
            })
            .unwrap();
        let recs = read_records(&std::fs::read(ev).unwrap());
        assert_eq!(
            decode_scalars(&recs[1]).1,
            vec![("train/loss".into(), 2.5), ("train/lr".into(), 1e-3)]
        );
        assert_eq!(
            decode_scalars(&recs[2]),
            (2, vec![("eval/loss".into(), 1.25)])
        );
    }
}
