//! Helpers shared by the integration tests: temp files and configs.
#![allow(dead_code)]

use qtrain_data::{DatasetConfig, Encoder};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(content.as_bytes()).unwrap();
    p
}

pub fn config(path: &Path) -> DatasetConfig {
    DatasetConfig {
        path: path.to_string_lossy().into_owned(),
        eval_fraction: 0.0,
        seq_len: 64,
        batch_size: 2,
        shuffle_buffer: 8,
        ..Default::default()
    }
}

pub fn tiny() -> Arc<Encoder> {
    Arc::new(Encoder::tiny())
}

/// Id of one character of the built-in tokenizer's vocabulary.
pub fn ch(c: char) -> u32 {
    Encoder::tiny()
        .tokenizer()
        .token_to_id(&c.to_string())
        .unwrap()
}

/// `n` alpaca records as JSONL, numbered so they can be told apart.
pub fn alpaca_lines(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!("{{\"instruction\": \"Echo {i}\", \"input\": \"\", \"output\": \"{i}\"}}\n")
        })
        .collect()
}
