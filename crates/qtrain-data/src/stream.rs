//! The training and evaluation streams: files → records → shuffle → samples →
//! tokens → batches, with epochs, a held-out split, a background tokenizer thread
//! and an exact resumable [`DataCursor`].
//!
//! **Shuffling** is block-wise: each epoch visits the files in a seeded order and
//! reads them in blocks of `shuffle_buffer` records (a block may span files), each
//! block permuted by a ChaCha RNG seeded from `(seed, epoch, block number)`. Mixing
//! is therefore within `shuffle_buffer` records, like a streaming shuffle buffer,
//! and resuming needs no RNG state: the cursor names the block's start position and
//! how many of its records were consumed; resume re-reads that one block, permutes
//! it identically and skips the consumed records. Pending documents (not yet in an
//! emitted batch) are stored in the cursor, so nothing is lost or repeated.
//!
//! **Eval split**: record `r` of file `f` is held out when `hash(seed, f, r)` falls
//! under `eval_fraction` (stable as files grow, independent of shuffling), or, with
//! `eval_samples = N`, when it is among the first N records in file order.

use crate::batch::{fit, Batcher, Fit, Pending};
use crate::config::{DatasetConfig, OnBadLine};
use crate::encode::{Encoder, Tokenized};
use crate::error::{DataError, Result};
use crate::format::{to_sample, Sample};
use crate::source::{Dataset, RawRecord, ReadPos, RecordReader};
use crate::util::{fnv1a, hash_all, unit};
use crossbeam_channel::{bounded, Receiver};
use qtrain_step::TokenBatch;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Counters of what happened to the records; reported, never silent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStats {
    /// Records read for training (held-out ones excluded), all epochs.
    pub records: u64,
    /// Records skipped because they were malformed (`on_bad_line = "skip"`).
    pub bad_records: u64,
    /// Records skipped because they belong to the eval split.
    pub eval_records: u64,
    /// Samples longer than `seq_len` that were split / truncated / dropped.
    pub split: u64,
    pub truncated: u64,
    pub dropped_too_long: u64,
    /// Documents skipped because no token carried a loss (e.g. no assistant turn).
    pub no_trainable_tokens: u64,
    /// Tokens straddling a prompt/answer boundary (trained; see `encode`).
    pub straddling_tokens: u64,
    /// Documents fed to the batcher.
    pub documents: u64,
    pub batches: u64,
    pub valid_tokens: u64,
}

/// Exactly where the training stream stands; serialize it into checkpoints and
/// pass it to [`BatchStream::resume`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    pub version: u32,
    /// Of the config and the file list; a resume against other data is refused.
    pub fingerprint: u64,
    pub epoch: u64,
    /// Index into the epoch's file order of the file the current block starts in.
    pub block_file: usize,
    /// Where in that file the current block starts.
    pub block_pos: ReadPos,
    /// The block's number within the epoch (seeds its permutation).
    pub block_number: u64,
    /// Records of the block already consumed.
    pub block_consumed: usize,
    /// Training documents produced in this epoch so far (detects empty data).
    pub epoch_documents: u64,
    /// Documents read but not yet emitted.
    pub pending: Pending,
    pub stats: DataStats,
}

const CURSOR_VERSION: u32 = 1;

/// Decides which records are held out.
#[derive(Debug, Clone)]
struct EvalSplit {
    seed: u64,
    fraction: f64,
    /// `eval_samples`: number of held-out records at the start of each file.
    prefix: Option<Vec<u64>>,
}

impl EvalSplit {
    fn new(cfg: &DatasetConfig, ds: &Dataset) -> Result<Self> {
        let prefix = match cfg.eval_samples {
            None => None,
            Some(n) => {
                // Count the first n records in file order (reads only those).
                let mut left = n as u64;
                let mut prefix = vec![0u64; ds.files.len()];
                for (f, p) in prefix.iter_mut().enumerate() {
                    if left == 0 {
                        break;
                    }
                    let mut r = ds.open(f, ReadPos::default())?;
                    while left > 0 && r.next_record()?.is_some() {
                        *p += 1;
                        left -= 1;
                    }
                }
                Some(prefix)
            }
        };
        Ok(Self {
            seed: cfg.seed,
            fraction: cfg.eval_fraction,
            prefix,
        })
    }

    fn is_eval(&self, file: usize, record: u64) -> bool {
        match &self.prefix {
            Some(p) => record < p[file],
            None => {
                self.fraction > 0.0
                    && unit(hash_all(&[self.seed, 0xe7a1, file as u64, record])) < self.fraction
            }
        }
    }

    /// Whether a file can hold eval records at `record` or later.
    fn any_from(&self, file: usize, record: u64) -> bool {
        match &self.prefix {
            Some(p) => record < p[file],
            None => self.fraction > 0.0,
        }
    }
}

/// Record → documents, shared by the train and eval streams.
struct Converter {
    cfg: DatasetConfig,
    enc: Arc<Encoder>,
}

impl Converter {
    /// `Ok(None)`: the record was bad and skipped (counted).
    fn documents(&self, rec: RawRecord, stats: &mut DataStats) -> Result<Vec<Tokenized>> {
        let at = rec.at;
        let attempt = (|| {
            let value = rec.value.map_err(|message| DataError::Malformed {
                at: at.clone(),
                message,
            })?;
            let sample: Sample = to_sample(&value, self.cfg.format, &self.cfg.columns, &at)?;
            self.enc
                .encode(&sample, self.cfg.train_on_prompt)
                .map_err(|e| match e {
                    DataError::Template(message) => DataError::TemplateAt {
                        at: at.clone(),
                        message,
                    },
                    other => other,
                })
        })();
        let encoded = match attempt {
            Ok(e) => e,
            Err(e) => {
                let skippable = !matches!(e, DataError::Tokenizer(_) | DataError::Io { .. });
                if self.cfg.on_bad_line == OnBadLine::Skip && skippable {
                    stats.bad_records += 1;
                    if stats.bad_records <= 10 {
                        tracing::warn!("skipping bad record: {e}");
                    }
                    return Ok(Vec::new());
                }
                return Err(e);
            }
        };
        stats.straddling_tokens += encoded.straddling as u64;
        let (pieces, how) = fit(encoded.tokens, self.cfg.seq_len, self.cfg.truncation);
        match how {
            Fit::Whole => {}
            Fit::Split(_) => stats.split += 1,
            Fit::Truncated => stats.truncated += 1,
            Fit::Dropped => stats.dropped_too_long += 1,
        }
        let before = pieces.len();
        let docs: Vec<Tokenized> = pieces.into_iter().filter(|d| d.trainable() > 0).collect();
        stats.no_trainable_tokens += (before - docs.len()) as u64;
        stats.documents += docs.len() as u64;
        Ok(docs)
    }
}

/// The training pipeline's whole state; runs on the loader thread.
struct Pipeline {
    conv: Converter,
    ds: Arc<Dataset>,
    eval: EvalSplit,
    fingerprint: u64,
    epoch: u64,
    order: Vec<usize>,
    /// The current shuffled block: (file index, record).
    block: Vec<(usize, RawRecord)>,
    block_file: usize,
    block_pos: ReadPos,
    block_number: u64,
    consumed: usize,
    /// Reader for the next block: position in `order` and open reader.
    next_file: usize,
    reader: Option<Box<dyn RecordReader>>,
    batcher: Batcher,
    stats: DataStats,
    epoch_documents: u64,
}

fn fingerprint(cfg: &DatasetConfig, ds: &Dataset) -> u64 {
    let mut parts = vec![cfg.fingerprint()];
    for f in &ds.files {
        parts.push(fnv1a(f.path.to_string_lossy().as_bytes()));
    }
    hash_all(&parts)
}

impl Pipeline {
    fn new(cfg: &DatasetConfig, enc: Arc<Encoder>) -> Result<Self> {
        cfg.validate_for_batching()?;
        let ds = Arc::new(Dataset::resolve(cfg)?);
        let eval = EvalSplit::new(cfg, &ds)?;
        let batcher = Batcher {
            seq_len: cfg.seq_len,
            batch_size: cfg.batch_size,
            packing: cfg.packing,
            pad_id: enc.pad_id(),
            seed: cfg.seed,
            pending: Pending::default(),
        };
        let mut p = Self {
            fingerprint: fingerprint(cfg, &ds),
            conv: Converter {
                cfg: cfg.clone(),
                enc,
            },
            ds,
            eval,
            epoch: 0,
            order: Vec::new(),
            block: Vec::new(),
            block_file: 0,
            block_pos: ReadPos::default(),
            block_number: 0,
            consumed: 0,
            next_file: 0,
            reader: None,
            batcher,
            stats: DataStats::default(),
            epoch_documents: 0,
        };
        p.start_epoch(0);
        Ok(p)
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.order = (0..self.ds.files.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(hash_all(&[self.conv.cfg.seed, 0xf11e, epoch]));
        self.order.shuffle(&mut rng);
        self.next_file = 0;
        self.reader = None;
        self.block.clear();
        self.consumed = 0;
        self.block_number = 0;
        self.block_file = 0;
        self.block_pos = ReadPos::default();
        self.epoch_documents = 0;
    }

    fn resume(cfg: &DatasetConfig, enc: Arc<Encoder>, cursor: &DataCursor) -> Result<Self> {
        let mut p = Self::new(cfg, enc)?;
        if cursor.version != CURSOR_VERSION {
            return Err(DataError::Resume(format!(
                "cursor version {} (this build writes {CURSOR_VERSION})",
                cursor.version
            )));
        }
        if cursor.fingerprint != p.fingerprint {
            return Err(DataError::Resume(
                "the checkpoint was written with different dataset settings or files \
                 (path, format, template, seq_len, batch_size, packing, eval split, \
                 shuffle_buffer or seed changed)"
                    .into(),
            ));
        }
        if cursor.block_file > p.ds.files.len() {
            return Err(DataError::Resume("file index out of range".into()));
        }
        p.start_epoch(cursor.epoch);
        p.next_file = cursor.block_file;
        if cursor.block_file < p.order.len() {
            p.reader = Some(p.ds.open(p.order[cursor.block_file], cursor.block_pos)?);
        }
        p.block_number = cursor.block_number;
        p.fill_block()?;
        if cursor.block_consumed > p.block.len() {
            return Err(DataError::Resume(format!(
                "the block at the cursor has {} records, fewer than the {} consumed \
                 (did the file change?)",
                p.block.len(),
                cursor.block_consumed
            )));
        }
        p.consumed = cursor.block_consumed;
        p.epoch_documents = cursor.epoch_documents;
        p.batcher.pending = cursor.pending.clone();
        p.stats = cursor.stats.clone();
        Ok(p)
    }

    fn cursor(&self) -> DataCursor {
        DataCursor {
            version: CURSOR_VERSION,
            fingerprint: self.fingerprint,
            epoch: self.epoch,
            block_file: self.block_file,
            block_pos: self.block_pos,
            block_number: self.block_number,
            block_consumed: self.consumed,
            epoch_documents: self.epoch_documents,
            pending: self.batcher.pending.clone(),
            stats: self.stats.clone(),
        }
    }

    /// Reads and permutes the next block; empty when the epoch's files are done.
    fn fill_block(&mut self) -> Result<()> {
        self.block.clear();
        self.consumed = 0;
        self.block_file = self.next_file;
        self.block_pos = self.reader.as_ref().map(|r| r.pos()).unwrap_or_default();
        let cap = self.conv.cfg.shuffle_buffer;
        while self.block.len() < cap {
            let reader = match &mut self.reader {
                Some(r) => r,
                None => {
                    if self.next_file >= self.order.len() {
                        break;
                    }
                    let r = self
                        .ds
                        .open(self.order[self.next_file], ReadPos::default())?;
                    if self.block.is_empty() {
                        self.block_file = self.next_file;
                        self.block_pos = ReadPos::default();
                    }
                    self.reader.insert(r)
                }
            };
            match reader.next_record()? {
                Some(rec) => {
                    let file = self.order[self.next_file];
                    if self.eval.is_eval(file, rec.record) {
                        self.stats.eval_records += 1;
                    } else {
                        self.block.push((file, rec));
                    }
                }
                None => {
                    self.reader = None;
                    self.next_file += 1;
                }
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(hash_all(&[
            self.conv.cfg.seed,
            0xb10c,
            self.epoch,
            self.block_number,
        ]));
        self.block.shuffle(&mut rng);
        Ok(())
    }

    fn next_batch(&mut self) -> Result<(TokenBatch, DataCursor)> {
        loop {
            if let Some(batch) = self.batcher.pop() {
                self.stats.batches += 1;
                if batch.valid_targets() == 0 {
                    return Err(DataError::AllMasked {
                        batch: self.stats.batches,
                    });
                }
                self.stats.valid_tokens += batch.valid_targets() as u64;
                return Ok((batch, self.cursor()));
            }
            if self.consumed == self.block.len() {
                if !self.block.is_empty() {
                    self.block_number += 1;
                }
                self.fill_block()?;
                if self.block.is_empty() {
                    if self.epoch_documents == 0 {
                        let s = &self.stats;
                        return Err(DataError::Empty {
                            spec: self.ds.spec.clone(),
                            detail: format!(
                                "an epoch produced no trainable sample ({} records read, {} \
                                 bad, {} held out for eval, {} too long and dropped, {} \
                                 without any trainable token)",
                                s.records,
                                s.bad_records,
                                s.eval_records,
                                s.dropped_too_long,
                                s.no_trainable_tokens
                            ),
                        });
                    }
                    tracing::debug!("data epoch {} done", self.epoch);
                    self.start_epoch(self.epoch + 1);
                }
                continue;
            }
            // Take the record out, leaving a cheap placeholder (the block is only
            // re-read on resume, never re-used).
            let (_, rec) =
                std::mem::replace(&mut self.block[self.consumed], (0, placeholder_record()));
            self.consumed += 1;
            self.stats.records += 1;
            let docs = self.conv.documents(rec, &mut self.stats)?;
            self.epoch_documents += docs.len() as u64;
            for d in docs {
                self.batcher.push(d);
            }
        }
    }
}

fn placeholder_record() -> RawRecord {
    RawRecord {
        value: Ok(serde_json::Value::Null),
        record: 0,
        at: crate::error::Location {
            file: Default::default(),
            kind: crate::error::LocationKind::Row,
            index: 0,
        },
    }
}

type Msg = Result<(TokenBatch, DataCursor)>;

/// The training batches, endless over epochs, prepared by a background thread.
pub struct BatchStream {
    rx: Receiver<Msg>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    cursor: DataCursor,
    finished: bool,
}

impl std::fmt::Debug for BatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchStream")
            .field("epoch", &self.cursor.epoch)
            .field("stats", &self.cursor.stats)
            .finish()
    }
}

impl BatchStream {
    /// Starts at the beginning. Configuration and source errors are returned here;
    /// record errors come out of the iterator.
    pub fn new(cfg: &DatasetConfig, encoder: Arc<Encoder>) -> Result<Self> {
        Ok(Self::spawn(Pipeline::new(cfg, encoder)?, cfg.prefetch))
    }

    /// Continues exactly after the batch whose cursor this is.
    pub fn resume(cfg: &DatasetConfig, encoder: Arc<Encoder>, cursor: &DataCursor) -> Result<Self> {
        Ok(Self::spawn(
            Pipeline::resume(cfg, encoder, cursor)?,
            cfg.prefetch,
        ))
    }

    fn spawn(mut p: Pipeline, prefetch: usize) -> Self {
        let cursor = p.cursor();
        let (tx, rx) = bounded::<Msg>(prefetch);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("qtrain-data".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    let msg = p.next_batch();
                    let failed = msg.is_err();
                    if tx.send(msg).is_err() || failed {
                        break;
                    }
                }
            })
            .expect("spawning the data loader thread");
        Self {
            rx,
            stop,
            handle: Some(handle),
            cursor,
            finished: false,
        }
    }

    /// The position after the last batch returned: save it with the checkpoint.
    pub fn cursor(&self) -> DataCursor {
        self.cursor.clone()
    }

    /// The epoch the last returned batch's data came from (0-based).
    pub fn epoch(&self) -> u64 {
        self.cursor.epoch
    }

    pub fn stats(&self) -> &DataStats {
        &self.cursor.stats
    }
}

impl Iterator for BatchStream {
    type Item = Result<TokenBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        match self.rx.recv() {
            Ok(Ok((batch, cursor))) => {
                self.cursor = cursor;
                Some(Ok(batch))
            }
            Ok(Err(e)) => {
                self.finished = true;
                Some(Err(e))
            }
            Err(_) => {
                self.finished = true;
                Some(Err(DataError::LoaderGone))
            }
        }
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblock a producer waiting on a full channel, then wait for it.
        while self.rx.try_recv().is_ok() {}
        let rx = std::mem::replace(&mut self.rx, crossbeam_channel::never());
        drop(rx);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Reads the held-out records in file order.
struct EvalRecords {
    ds: Dataset,
    split: EvalSplit,
    file: usize,
    reader: Option<Box<dyn RecordReader>>,
}

impl EvalRecords {
    fn new(cfg: &DatasetConfig) -> Result<Self> {
        cfg.validate()?;
        let ds = Dataset::resolve(cfg)?;
        let split = EvalSplit::new(cfg, &ds)?;
        Ok(Self {
            ds,
            split,
            file: 0,
            reader: None,
        })
    }

    /// The next held-out record, `None` when there are no more.
    fn next_record(&mut self) -> Result<Option<RawRecord>> {
        loop {
            if self.file >= self.ds.files.len() {
                return Ok(None);
            }
            let reader = match &mut self.reader {
                Some(r) => r,
                None => {
                    if !self.split.any_from(self.file, 0) {
                        self.file += 1;
                        continue;
                    }
                    self.reader
                        .insert(self.ds.open(self.file, ReadPos::default())?)
                }
            };
            // With `eval_samples`, stop reading a file after its held-out prefix.
            if !self.split.any_from(self.file, reader.pos().record) {
                self.reader = None;
                self.file += 1;
                continue;
            }
            match reader.next_record()? {
                Some(rec) if self.split.is_eval(self.file, rec.record) => return Ok(Some(rec)),
                Some(_) => {}
                None => {
                    self.reader = None;
                    self.file += 1;
                }
            }
        }
    }
}

/// The held-out records as batches, in file order, unshuffled; finite (the last
/// batch may have fewer rows).
pub struct EvalStream {
    conv: Converter,
    records: EvalRecords,
    batcher: Batcher,
    stats: DataStats,
    done: bool,
    failed: bool,
}

impl EvalStream {
    pub fn new(cfg: &DatasetConfig, encoder: Arc<Encoder>) -> Result<Self> {
        cfg.validate_for_batching()?;
        let records = EvalRecords::new(cfg)?;
        let batcher = Batcher {
            seq_len: cfg.seq_len,
            batch_size: cfg.batch_size,
            packing: cfg.packing,
            pad_id: encoder.pad_id(),
            seed: cfg.seed,
            pending: Pending::default(),
        };
        Ok(Self {
            conv: Converter {
                cfg: cfg.clone(),
                enc: encoder,
            },
            records,
            batcher,
            stats: DataStats::default(),
            done: false,
            failed: false,
        })
    }

    /// `eval_records` = held-out records read, `documents`, `valid_tokens`, ...
    pub fn stats(&self) -> &DataStats {
        &self.stats
    }

    fn step(&mut self) -> Result<Option<TokenBatch>> {
        loop {
            if let Some(b) = self.batcher.pop() {
                self.stats.batches += 1;
                self.stats.valid_tokens += b.valid_targets() as u64;
                return Ok(Some(b));
            }
            if self.done {
                return Ok(None);
            }
            match self.records.next_record()? {
                Some(rec) => {
                    self.stats.eval_records += 1;
                    for d in self.conv.documents(rec, &mut self.stats)? {
                        self.batcher.push(d);
                    }
                }
                None => {
                    self.done = true;
                    self.batcher.flush();
                }
            }
        }
    }
}

impl Iterator for EvalStream {
    type Item = Result<TokenBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(b) => b.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// The first `limit` held-out samples (conversations or texts), for printing a
/// model's answers next to the reference ones.
pub fn eval_samples(cfg: &DatasetConfig, limit: usize) -> Result<Vec<Sample>> {
    let mut records = EvalRecords::new(cfg)?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(rec) = records.next_record()? else {
            break;
        };
        let parsed = rec
            .value
            .map_err(|message| DataError::Malformed {
                at: rec.at.clone(),
                message,
            })
            .and_then(|v| to_sample(&v, cfg.format, &cfg.columns, &rec.at));
        match parsed {
            Ok(sample) => out.push(sample),
            Err(e) if cfg.on_bad_line == OnBadLine::Skip => tracing::warn!("skipping: {e}"),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
