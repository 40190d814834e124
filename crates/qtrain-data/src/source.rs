//! Where records come from: resolving `DatasetConfig::path` (local file or
//! directory, hub cache, built-in) into an ordered list of files, and streaming
//! readers over JSONL, JSON arrays, Parquet and the built-in set.
//!
//! Readers hold one line / array element / Parquet batch at a time, so memory does
//! not grow with the file. Each can report and reopen at a [`ReadPos`] (byte offset
//! for JSON text, row for Parquet and the built-in set), which is what makes the
//! stream's cursor exact and cheap to resume.

use crate::builtin::{self, BUILTIN_LEN};
use crate::config::{DatasetConfig, BUILTIN_INSTRUCTIONS};
use crate::error::{DataError, Location, LocationKind, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Jsonl,
    Json,
    Parquet,
    Builtin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub path: PathBuf,
    pub kind: FileKind,
}

/// A resolved dataset: its files in a fixed (sorted) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// What the user wrote, for messages.
    pub spec: String,
    pub files: Vec<SourceFile>,
}

/// Position of the next record in a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadPos {
    /// Byte offset (JSONL, JSON) or row (Parquet, built-in).
    pub offset: u64,
    /// Records before this position (bad ones included): the record's index.
    pub record: u64,
    /// Lines before this position (JSON text), for file:line messages.
    pub line: u64,
}

/// One record as read: parsed JSON, or the parser's complaint.
#[derive(Debug)]
pub struct RawRecord {
    pub value: std::result::Result<serde_json::Value, String>,
    /// Index of the record in its file (0-based).
    pub record: u64,
    pub at: Location,
}

pub trait RecordReader: Send {
    /// The next record, `None` at the end. `Err` only for I/O and structural damage
    /// the reader cannot step over.
    fn next_record(&mut self) -> Result<Option<RawRecord>>;
    /// Where the next record starts.
    fn pos(&self) -> ReadPos;
}

fn kind_of(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        Some(FileKind::Jsonl)
    } else if name.ends_with(".json") {
        Some(FileKind::Json)
    } else if name.ends_with(".parquet") {
        Some(FileKind::Parquet)
    } else {
        None
    }
}

impl Dataset {
    pub fn resolve(cfg: &DatasetConfig) -> Result<Self> {
        let spec = cfg.path.trim().to_string();
        let err = |message: String| DataError::Source {
            spec: spec.clone(),
            message,
        };
        if let Some(name) = spec.strip_prefix("builtin:") {
            if spec != BUILTIN_INSTRUCTIONS {
                return Err(err(format!(
                    "unknown built-in dataset `{name}` (known: {BUILTIN_INSTRUCTIONS})"
                )));
            }
            return Ok(Self {
                files: vec![SourceFile {
                    path: PathBuf::from(BUILTIN_INSTRUCTIONS),
                    kind: FileKind::Builtin,
                }],
                spec,
            });
        }
        let local = Path::new(&spec);
        let files = if local.exists() {
            collect_files(local, &cfg.split).map_err(|e| DataError::io(local, e))?
        } else if looks_like_hub_id(&spec) {
            let dir = hub_snapshot(&spec).map_err(err)?;
            collect_files(&dir, &cfg.split).map_err(|e| DataError::io(&dir, e))?
        } else {
            return Err(err(
                "no such file or directory, and not a hub id (`org/name[@revision]`)".into(),
            ));
        };
        if files.is_empty() {
            return Err(err(
                "holds no .jsonl, .json or .parquet file (dataset is empty)".into(),
            ));
        }
        Ok(Self { spec, files })
    }

    pub fn open(&self, file: usize, pos: ReadPos) -> Result<Box<dyn RecordReader>> {
        let f = &self.files[file];
        Ok(match f.kind {
            FileKind::Jsonl => Box::new(JsonlReader::open(&f.path, pos)?),
            FileKind::Json => {
                // Many `.json` files on the hub are JSON lines: decide by the first byte.
                if first_significant_byte(&f.path)? == Some(b'[') {
                    Box::new(JsonArrayReader::open(&f.path, pos)?)
                } else {
                    Box::new(JsonlReader::open(&f.path, pos)?)
                }
            }
            FileKind::Parquet => Box::new(ParquetReader::open(&f.path, pos)?),
            FileKind::Builtin => Box::new(BuiltinReader { row: pos.offset }),
        })
    }
}

fn looks_like_hub_id(s: &str) -> bool {
    let id = s.split('@').next().unwrap_or("");
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The Hugging Face cache directory: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(h) = std::env::var_os("HF_HOME") {
        return PathBuf::from(h).join("hub");
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cache/huggingface/hub")
}

/// `datasets--org--name/snapshots/<commit>` for `org/name[@revision]`; the revision
/// (default `main`) is a ref under `refs/` or a commit hash.
fn hub_snapshot(spec: &str) -> std::result::Result<PathBuf, String> {
    let (id, rev) = spec.split_once('@').unwrap_or((spec, "main"));
    let repo = hub_cache_dir().join(format!("datasets--{}", id.replace('/', "--")));
    if !repo.is_dir() {
        return Err(format!(
            "not in the Hugging Face cache ({} does not exist; download it with \
             `huggingface-cli download --repo-type dataset {id}`)",
            repo.display()
        ));
    }
    let commit = match std::fs::read_to_string(repo.join("refs").join(rev)) {
        Ok(c) => c.trim().to_string(),
        Err(_) => rev.to_string(),
    };
    let snap = repo.join("snapshots").join(&commit);
    if snap.is_dir() {
        Ok(snap)
    } else {
        Err(format!(
            "revision `{rev}` is not in the cache ({} does not exist)",
            snap.display()
        ))
    }
}

/// The data files under `root` (itself if a file), sorted; when several splits are
/// present, only those whose path mentions `split`.
fn collect_files(root: &Path, split: &str) -> std::io::Result<Vec<SourceFile>> {
    let mut found = Vec::new();
    if root.is_file() {
        let kind = kind_of(root).unwrap_or(FileKind::Jsonl);
        return Ok(vec![SourceFile {
            path: root.to_path_buf(),
            kind,
        }]);
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let p = entry?.path();
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            // `metadata` follows the hub cache's symlinks into `blobs/`.
            let meta = std::fs::metadata(&p)?;
            if meta.is_dir() {
                stack.push(p);
            } else if let Some(kind) = kind_of(&p) {
                found.push(SourceFile { path: p, kind });
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    let mentions = |f: &SourceFile| {
        f.path
            .strip_prefix(root)
            .unwrap_or(&f.path)
            .to_string_lossy()
            .to_ascii_lowercase()
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w == split.to_ascii_lowercase())
    };
    if !split.is_empty() && found.iter().any(mentions) {
        found.retain(mentions);
    }
    Ok(found)
}

fn first_significant_byte(path: &Path) -> Result<Option<u8>> {
    let mut r = BufReader::new(File::open(path).map_err(|e| DataError::io(path, e))?);
    loop {
        let buf = r.fill_buf().map_err(|e| DataError::io(path, e))?;
        if buf.is_empty() {
            return Ok(None);
        }
        // A UTF-8 byte-order mark counts as whitespace.
        if let Some(&b) = buf
            .iter()
            .find(|b| !b.is_ascii_whitespace() && ![0xEF, 0xBB, 0xBF].contains(*b))
        {
            return Ok(Some(b));
        }
        let n = buf.len();
        r.consume(n);
    }
}

fn open_at(path: &Path, offset: u64) -> Result<BufReader<File>> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| DataError::io(path, e))?;
    Ok(BufReader::with_capacity(1 << 16, f))
}

/// One JSON value per line; blank lines are skipped.
pub struct JsonlReader {
    path: PathBuf,
    r: BufReader<File>,
    pos: ReadPos,
    buf: Vec<u8>,
}

impl JsonlReader {
    pub fn open(path: &Path, pos: ReadPos) -> Result<Self> {
        Ok(Self {
            r: open_at(path, pos.offset)?,
            path: path.to_path_buf(),
            pos,
            buf: Vec::new(),
        })
    }
}

impl RecordReader for JsonlReader {
    fn next_record(&mut self) -> Result<Option<RawRecord>> {
        loop {
            self.buf.clear();
            let n = self
                .r
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| DataError::io(&self.path, e))?;
            if n == 0 {
                return Ok(None);
            }
            self.pos.offset += n as u64;
            self.pos.line += 1;
            let line = self.buf.trim_ascii();
            if line.is_empty() {
                continue;
            }
            // Only the first line of a file may carry a byte-order mark.
            let line = line.strip_prefix(&[0xEF, 0xBB, 0xBF][..]).unwrap_or(line);
            let value = serde_json::from_slice(line).map_err(|e| e.to_string());
            let record = self.pos.record;
            self.pos.record += 1;
            // After a very long line, do not keep its buffer.
            if self.buf.capacity() > 1 << 20 {
                self.buf = Vec::new();
            }
            return Ok(Some(RawRecord {
                value,
                record,
                at: Location {
                    file: self.path.clone(),
                    kind: LocationKind::Line,
                    index: self.pos.line,
                },
            }));
        }
    }
    fn pos(&self) -> ReadPos {
        self.pos
    }
}

/// A top-level JSON array, scanned element by element: the scanner only tracks
/// nesting and strings to find where each element ends, then parses that element.
pub struct JsonArrayReader {
    path: PathBuf,
    r: BufReader<File>,
    pos: ReadPos,
    /// Whether the opening `[` has been read.
    opened: bool,
    done: bool,
    buf: Vec<u8>,
}

impl JsonArrayReader {
    pub fn open(path: &Path, pos: ReadPos) -> Result<Self> {
        Ok(Self {
            r: open_at(path, pos.offset)?,
            path: path.to_path_buf(),
            opened: pos.offset > 0,
            pos,
            done: false,
            buf: Vec::new(),
        })
    }

    fn damaged(&self, what: &str) -> DataError {
        DataError::Malformed {
            at: Location {
                file: self.path.clone(),
                kind: LocationKind::Line,
                index: self.pos.line + 1,
            },
            message: what.to_string(),
        }
    }

    fn consume(&mut self, n: usize) {
        let chunk = &self.r.buffer()[..n];
        self.pos.line += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        self.pos.offset += n as u64;
        self.r.consume(n);
    }
}

impl RecordReader for JsonArrayReader {
    fn next_record(&mut self) -> Result<Option<RawRecord>> {
        if self.done {
            return Ok(None);
        }
        // Skip whitespace and separators up to the next element (or the end).
        loop {
            let buf = self
                .r
                .fill_buf()
                .map_err(|e| DataError::io(&self.path, e))?;
            let Some(&b) = buf.first() else {
                return Err(
                    self.damaged("unexpected end of file: the top-level array is not closed")
                );
            };
            match b {
                b' ' | b'\t' | b'\r' | b'\n' | 0xEF | 0xBB | 0xBF => self.consume(1),
                b'[' if !self.opened => {
                    self.opened = true;
                    self.consume(1);
                }
                b',' if self.opened => self.consume(1),
                b']' if self.opened => {
                    self.consume(1);
                    self.done = true;
                    return Ok(None);
                }
                _ if !self.opened => return Err(self.damaged("expected a top-level JSON array")),
                _ => break,
            }
        }
        let start_line = self.pos.line + 1;
        self.buf.clear();
        let (mut depth, mut in_str, mut esc) = (0usize, false, false);
        loop {
            let chunk = self
                .r
                .fill_buf()
                .map_err(|e| DataError::io(&self.path, e))?;
            if chunk.is_empty() {
                return Err(self.damaged("unexpected end of file inside an array element"));
            }
            let mut end = None;
            for (i, &b) in chunk.iter().enumerate() {
                if in_str {
                    if esc {
                        esc = false;
                    } else if b == b'\\' {
                        esc = true;
                    } else if b == b'"' {
                        in_str = false;
                    }
                    continue;
                }
                match b {
                    b'"' => in_str = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth > 0 => depth -= 1,
                    // The element ends before a separator or the array's `]`.
                    b',' | b']' if depth == 0 => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let take = end.unwrap_or(chunk.len());
            self.buf.extend_from_slice(&chunk[..take]);
            self.consume(take);
            if end.is_some() {
                break;
            }
        }
        let record = self.pos.record;
        self.pos.record += 1;
        Ok(Some(RawRecord {
            value: serde_json::from_slice(&self.buf).map_err(|e| e.to_string()),
            record,
            at: Location {
                file: self.path.clone(),
                kind: LocationKind::Line,
                index: start_line,
            },
        }))
    }
    fn pos(&self) -> ReadPos {
        self.pos
    }
}

/// The built-in set, generated row by row.
struct BuiltinReader {
    row: u64,
}

impl RecordReader for BuiltinReader {
    fn next_record(&mut self) -> Result<Option<RawRecord>> {
        if self.row >= BUILTIN_LEN {
            return Ok(None);
        }
        let row = self.row;
        self.row += 1;
        Ok(Some(RawRecord {
            value: Ok(builtin::record(row)),
            record: row,
            at: Location {
                file: PathBuf::from(BUILTIN_INSTRUCTIONS),
                kind: LocationKind::Row,
                index: row + 1,
            },
        }))
    }
    fn pos(&self) -> ReadPos {
        ReadPos {
            offset: self.row,
            record: self.row,
            line: 0,
        }
    }
}

/// Parquet rows as JSON objects, one record batch (a few hundred rows) in memory.
pub struct ParquetReader {
    path: PathBuf,
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    batch: Option<arrow_array::RecordBatch>,
    in_batch: usize,
    row: u64,
}

const PARQUET_BATCH: usize = 256;

impl ParquetReader {
    pub fn open(path: &Path, pos: ReadPos) -> Result<Self> {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let f = File::open(path).map_err(|e| DataError::io(path, e))?;
        let perr = |e: parquet::errors::ParquetError| DataError::Parquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let reader = ParquetRecordBatchReaderBuilder::try_new(f)
            .map_err(perr)?
            .with_batch_size(PARQUET_BATCH)
            .with_offset(pos.offset as usize)
            .build()
            .map_err(perr)?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            batch: None,
            in_batch: 0,
            row: pos.offset,
        })
    }
}

impl RecordReader for ParquetReader {
    fn next_record(&mut self) -> Result<Option<RawRecord>> {
        loop {
            if let Some(b) = &self.batch {
                if self.in_batch < b.num_rows() {
                    let value = crate::parquet_json::row_to_json(b, self.in_batch);
                    self.in_batch += 1;
                    let row = self.row;
                    self.row += 1;
                    return Ok(Some(RawRecord {
                        value,
                        record: row,
                        at: Location {
                            file: self.path.clone(),
                            kind: LocationKind::Row,
                            index: row + 1,
                        },
                    }));
                }
            }
            match self.reader.next() {
                None => return Ok(None),
                Some(Ok(b)) => {
                    self.batch = Some(b);
                    self.in_batch = 0;
                }
                Some(Err(e)) => {
                    return Err(DataError::Parquet {
                        path: self.path.clone(),
                        message: format!("near row {}: {e}", self.row + 1),
                    })
                }
            }
        }
    }
    fn pos(&self) -> ReadPos {
        ReadPos {
            offset: self.row,
            record: self.row,
            line: 0,
        }
    }
}
