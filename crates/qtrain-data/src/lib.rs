//! qtrain-data: dataset streaming for fine-tuning.
//!
//! Reads local JSONL / JSON / Parquet files, datasets in the Hugging Face cache (in
//! the layouts the hub stores them, split by the hub's file naming rules) and the
//! embedded `builtin:instructions` set; understands alpaca, ShareGPT, chat
//! `messages` and plain `text` records, and assembles OpenAssistant message tables
//! into conversations; renders conversations with the model's chat
//! template (Mistral's `[INST]` format as fallback) and masks the prompt; packs
//! documents into fixed-length rows with per-document positions and segments; and
//! shuffles deterministically with an exact resumable cursor, tokenizing ahead on a
//! background thread.
//!
//! ```no_run
//! use qtrain_data::{BatchStream, DatasetConfig, Encoder};
//! use std::sync::Arc;
//! let cfg = DatasetConfig::default(); // builtin:instructions
//! let mut stream = BatchStream::new(&cfg, Arc::new(Encoder::tiny())).unwrap();
//! let batch = stream.next().unwrap().unwrap();
//! let cursor = stream.cursor(); // serialize into the checkpoint
//! # let _ = (batch, cursor);
//! ```

pub mod batch;
pub mod builtin;
pub mod config;
pub mod encode;
pub mod error;
pub mod format;
pub mod oasst;
mod parquet_json;
pub mod source;
pub mod stream;
pub mod template;
pub mod tiny_tokenizer;
mod util;

pub use config::{
    Columns, DatasetConfig, Format, OnBadLine, TreePaths, Truncation, AUTO_BATCH_SIZE,
    BUILTIN_INSTRUCTIONS,
};
pub use encode::{Encoder, Tokenized};
pub use error::{DataError, Location};
pub use format::Sample;
pub use stream::{eval_samples, BatchStream, DataCursor, DataStats, EvalStream};
pub use template::{ChatTemplate, Message, SpecialTokens};
