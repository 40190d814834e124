//! Where records come from: resolving `DatasetConfig::path` (local file or
//! directory, hub cache, built-in) into an ordered list of files of one split, and
//! streaming readers over JSONL, JSON arrays, Parquet and the built-in set.
//!
//! Hub datasets are read from the snapshot directory the Hugging Face cache keeps
//! (`datasets--OWNER--NAME/snapshots/COMMIT/...`, the commit named by
//! `refs/REVISION`), in whatever layout the repository has: `data/train-00000-of-
//! 00001.parquet` (what `push_to_hub` writes, optionally with a hash suffix), a
//! single JSON file at the top (`yahma/alpaca-cleaned`), or the parquet-converter
//! branch's `default/train/0000.parquet` (revision `refs/convert/parquet`). Splits
//! are found by the hub's naming rules ([`split_of`]).
//!
//! Before streaming, the columns of each file are looked at (a Parquet schema, the
//! first JSON record): an OpenAssistant message table becomes a single virtual file
//! of assembled conversations ([`crate::oasst`]), and a Parquet file whose columns
//! fit no format is refused at once, naming them.
//!
//! Readers hold one line / array element / Parquet batch at a time, so memory does
//! not grow with the file. Each can report and reopen at a [`ReadPos`] (byte offset
//! for JSON text, row for Parquet and the built-in set), which is what makes the
//! stream's cursor exact and cheap to resume.

use crate::builtin::{self, BUILTIN_LEN};
use crate::config::{Columns, DatasetConfig, Format, TreePaths, BUILTIN_INSTRUCTIONS};
use crate::error::{DataError, Location, LocationKind, Result};
use crate::format::{detect_fields, Field};
use crate::oasst::{self, Conversations, TreeOptions};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Jsonl,
    Json,
    Parquet,
    Builtin,
    /// The conversations assembled from OpenAssistant message tables
    /// ([`Dataset::message_trees`] holds the files they come from).
    MessageTrees,
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
    /// For OpenAssistant message tables: the table files; `files` is then one
    /// [`FileKind::MessageTrees`] entry, the conversations assembled from them.
    pub message_trees: Option<Arc<MessageTrees>>,
}

/// The message-table files of a split and how to assemble them; assembled once, on
/// first open.
pub struct MessageTrees {
    pub parts: Vec<SourceFile>,
    pub options: TreeOptions,
    /// The record layout of the assembled conversations (the configured names).
    columns: Columns,
    assembled: Mutex<Option<Arc<Conversations>>>,
}

impl MessageTrees {
    /// The assembled conversations (assembling them on the first call).
    pub fn conversations(&self) -> Result<Arc<Conversations>> {
        let mut slot = self.assembled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let c = oasst::assemble_shared(&self.parts, &self.options)?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

impl std::fmt::Debug for MessageTrees {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageTrees")
            .field("parts", &self.parts)
            .field("options", &self.options)
            .finish()
    }
}

impl PartialEq for MessageTrees {
    fn eq(&self, other: &Self) -> bool {
        (&self.parts, &self.options, &self.columns)
            == (&other.parts, &other.options, &other.columns)
    }
}

impl Eq for MessageTrees {}

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
            let ds = Self {
                files: vec![SourceFile {
                    path: PathBuf::from(BUILTIN_INSTRUCTIONS),
                    kind: FileKind::Builtin,
                }],
                spec,
                message_trees: None,
            };
            ds.refuse_tree_options(cfg, "the built-in set")?;
            return Ok(ds);
        }
        let local = Path::new(&spec);
        let files = if local.exists() {
            collect_files(local, &cfg.split).map_err(err)?
        } else if looks_like_hub_id(&spec) {
            let dir = hub_snapshot(&spec).map_err(err)?;
            collect_files(&dir, &cfg.split).map_err(err)?
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
        let mut ds = Self {
            spec,
            files,
            message_trees: None,
        };
        ds.classify(cfg)?;
        Ok(ds)
    }

    /// Looks at each file's columns: message tables become one assembled file;
    /// Parquet files fitting no format are refused here, naming their columns (JSON
    /// records are checked one by one as they are read, as their fields may vary).
    fn classify(&mut self, cfg: &DatasetConfig) -> Result<()> {
        if !matches!(cfg.format, Format::Auto | Format::Oasst) {
            return self.refuse_tree_options(cfg, &format!("a {} dataset", cfg.format.name()));
        }
        let mut probes = Vec::with_capacity(self.files.len());
        for f in &self.files {
            probes.push(probe_fields(f)?);
        }
        let is_table = |p: &Option<Vec<Field>>| p.as_deref().is_some_and(oasst::is_message_table);
        let tables = probes.iter().filter(|p| is_table(p)).count();
        let found = |p: &Option<Vec<Field>>| match p {
            Some(fs) => fs
                .iter()
                .map(|f| format!("`{}`", f.name))
                .collect::<Vec<_>>()
                .join(", "),
            None => "no readable first record".to_string(),
        };
        if tables > 0 && tables < self.files.len() || cfg.format == Format::Oasst && tables == 0 {
            let (i, p) = probes
                .iter()
                .enumerate()
                .find(|(_, p)| !is_table(p))
                .expect("some file is not a table");
            return Err(DataError::Source {
                spec: self.spec.clone(),
                message: format!(
                    "{} is not an OpenAssistant message table (columns {}; a table has {}){}",
                    self.files[i].path.display(),
                    found(p),
                    oasst::TABLE_COLUMNS.map(|c| format!("`{c}`")).join(", "),
                    if tables > 0 {
                        " while other files of the split are: a split must be all one or \
                         the other"
                    } else {
                        " (format = \"oasst\")"
                    }
                ),
            });
        }
        if tables > 0 {
            let parts = std::mem::take(&mut self.files);
            let path = match parts.as_slice() {
                [one] => one.path.clone(),
                many => common_parent(many),
            };
            self.files = vec![SourceFile {
                path,
                kind: FileKind::MessageTrees,
            }];
            self.message_trees = Some(Arc::new(MessageTrees {
                parts,
                options: TreeOptions {
                    languages: cfg.languages.clone(),
                    paths: cfg.tree_paths,
                    on_bad_line: cfg.on_bad_line,
                },
                columns: cfg.columns.clone(),
                assembled: Mutex::new(None),
            }));
            return Ok(());
        }
        if cfg.format == Format::Auto {
            for (f, p) in self.files.iter().zip(&probes) {
                if let (FileKind::Parquet, Some(fields)) = (f.kind, p) {
                    if let Err(found) = detect_fields(fields, &cfg.columns) {
                        return Err(DataError::UnknownFormat {
                            at: Location {
                                file: f.path.clone(),
                                kind: LocationKind::Row,
                                index: 1,
                            },
                            found: found.replacen("fields", "columns", 1),
                        });
                    }
                }
            }
        }
        self.refuse_tree_options(cfg, "a dataset without OpenAssistant message tables")
    }

    /// `languages` and `tree_paths` only mean something for message trees; set on
    /// other data they would silently do nothing.
    fn refuse_tree_options(&self, cfg: &DatasetConfig, what: &str) -> Result<()> {
        let (key, value) = if !cfg.languages.is_empty() {
            ("languages", format!("{:?}", cfg.languages))
        } else if cfg.tree_paths != TreePaths::Best {
            ("tree_paths", format!("\"{}\"", cfg.tree_paths.name()))
        } else {
            return Ok(());
        };
        Err(DataError::Config {
            key,
            message: format!(
                "= {value} applies to OpenAssistant message trees only, and `{}` is {what}",
                self.spec
            ),
        })
    }

    pub fn open(&self, file: usize, pos: ReadPos) -> Result<Box<dyn RecordReader>> {
        let f = &self.files[file];
        if f.kind == FileKind::MessageTrees {
            let trees = self
                .message_trees
                .as_ref()
                .expect("a MessageTrees file comes with its tables");
            return Ok(Box::new(ConversationReader {
                conversations: trees.conversations()?,
                columns: trees.columns.clone(),
                next: pos.offset,
            }));
        }
        open_at_pos(f, pos, None)
    }
}

/// A reader over one file from `pos`; for Parquet, `columns` (when given) limits
/// the columns decoded to those of them the file has.
fn open_at_pos(
    f: &SourceFile,
    pos: ReadPos,
    columns: Option<&[&str]>,
) -> Result<Box<dyn RecordReader>> {
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
        FileKind::Parquet => Box::new(ParquetReader::open_columns(&f.path, pos, columns)?),
        FileKind::Builtin => Box::new(BuiltinReader { row: pos.offset }),
        FileKind::MessageTrees => unreachable!("opened through Dataset::open"),
    })
}

/// One file of a message table from its start (see [`open_at_pos`]).
pub(crate) fn open_part(f: &SourceFile, columns: Option<&[&str]>) -> Result<Box<dyn RecordReader>> {
    open_at_pos(f, ReadPos::default(), columns)
}

/// The columns of a file: its Parquet schema, or the fields of its first JSON
/// record (`None` when there is none or it is not an object).
fn probe_fields(f: &SourceFile) -> Result<Option<Vec<Field>>> {
    match f.kind {
        FileKind::Parquet => {
            use arrow_schema::DataType;
            let file = File::open(&f.path).map_err(|e| DataError::io(&f.path, e))?;
            let builder =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .map_err(|e| DataError::Parquet {
                        path: f.path.clone(),
                        message: e.to_string(),
                    })?;
            let fields = builder
                .schema()
                .fields()
                .iter()
                .map(|field| Field {
                    name: field.name().clone(),
                    holds_records: match field.data_type() {
                        DataType::List(item)
                        | DataType::LargeList(item)
                        | DataType::ListView(item)
                        | DataType::LargeListView(item)
                        | DataType::FixedSizeList(item, _) => {
                            matches!(item.data_type(), DataType::Struct(_))
                        }
                        _ => false,
                    },
                })
                .collect();
            Ok(Some(fields))
        }
        FileKind::Jsonl | FileKind::Json => {
            let mut r = open_at_pos(f, ReadPos::default(), None)?;
            Ok(match r.next_record() {
                Ok(Some(RawRecord {
                    value: Ok(serde_json::Value::Object(obj)),
                    ..
                })) => Some(Field::of_object(&obj)),
                // Damage is reported where the stream reads it, with skipping if
                // configured.
                _ => None,
            })
        }
        FileKind::Builtin | FileKind::MessageTrees => Ok(None),
    }
}

/// The deepest directory holding every file.
fn common_parent(files: &[SourceFile]) -> PathBuf {
    let mut common = files[0]
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    for f in &files[1..] {
        while !f.path.starts_with(&common) {
            if !common.pop() {
                break;
            }
        }
    }
    common
}

/// The assembled message-tree conversations as `messages` records, one per
/// conversation; the position is the conversation's index.
struct ConversationReader {
    conversations: Arc<Conversations>,
    columns: Columns,
    next: u64,
}

impl RecordReader for ConversationReader {
    fn next_record(&mut self) -> Result<Option<RawRecord>> {
        let i = self.next as usize;
        if i >= self.conversations.len() {
            return Ok(None);
        }
        self.next += 1;
        Ok(Some(RawRecord {
            value: Ok(self.conversations.record(i, &self.columns)),
            record: i as u64,
            at: self.conversations.location(i),
        }))
    }
    fn pos(&self) -> ReadPos {
        ReadPos {
            offset: self.next,
            record: self.next,
            line: 0,
        }
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

/// The data files of `split` under `root` (just `root` if it is a file), sorted.
fn collect_files(root: &Path, split: &str) -> std::result::Result<Vec<SourceFile>, String> {
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    if root.is_file() {
        let kind = kind_of(root).unwrap_or(FileKind::Jsonl);
        return Ok(vec![SourceFile {
            path: root.to_path_buf(),
            kind,
        }]);
    }
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let p = entry.map_err(|e| io(&dir, e))?.path();
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            // `metadata` follows the hub cache's symlinks into `blobs/`.
            let meta = std::fs::metadata(&p).map_err(|e| io(&p, e))?;
            if meta.is_dir() {
                stack.push(p);
            } else if let Some(kind) = kind_of(&p) {
                found.push(SourceFile { path: p, kind });
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    if split.is_empty() {
        return Ok(found);
    }
    let want = canonical_split(split);
    let splits: Vec<Option<String>> = found
        .iter()
        .map(|f| split_of(f.path.strip_prefix(root).unwrap_or(&f.path)))
        .collect();
    if splits.iter().all(Option::is_none) {
        // No file names a split: the whole directory is the train split, as for
        // `datasets.load_dataset`.
        return if want == "train" || found.is_empty() {
            Ok(found)
        } else {
            Err(format!(
                "has no `{split}` split: no file name says which split it holds, so all \
                 {} file(s) form the `train` split (set split = \"train\")",
                found.len()
            ))
        };
    }
    let mut available: Vec<&str> = splits.iter().flatten().map(String::as_str).collect();
    available.sort_unstable();
    available.dedup();
    if !available.contains(&want.as_str()) {
        return Err(format!(
            "has no `{split}` split (its files hold the split{} {})",
            if available.len() == 1 { "" } else { "s" },
            available
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(found
        .into_iter()
        .zip(splits)
        .filter(|(_, s)| s.as_deref() == Some(want.as_str()))
        .map(|(f, _)| f)
        .collect())
}

/// The split names the hub treats as the same split, by their canonical name.
const SPLIT_KEYWORDS: [(&str, &[&str]); 3] = [
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "val", "dev"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];

/// `dev` -> `validation`, `training` -> `train`, ...; other names as written
/// (lowercase).
fn canonical_split(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    SPLIT_KEYWORDS
        .iter()
        .find(|(_, words)| words.contains(&lower.as_str()))
        .map_or(lower, |(canon, _)| canon.to_string())
}

/// The split a data file belongs to by the hub's naming rules
/// (huggingface.co/docs/hub/datasets-file-names-and-splits), from its path
/// relative to the dataset root: `SPLIT-00000-of-00003[-hash].ext` names any split;
/// otherwise a split keyword (`train`, `validation`/`valid`/`val`/`dev`,
/// `test`/`testing`/`eval`/`evaluation`, `training`) as a directory name or
/// delimited by non-letters in the file name (`my_train_file.jsonl`, `train1.csv`,
/// `partial-train/`), directories first. `None` when the path names no split.
pub fn split_of(rel: &Path) -> Option<String> {
    let name = rel.file_name()?.to_str()?;
    if let Some((split, rest)) = name.split_once('-') {
        let shard = rest.as_bytes();
        let sharded = shard.len() >= 14
            && shard[..5].iter().all(u8::is_ascii_digit)
            && &shard[5..9] == b"-of-"
            && shard[9..14].iter().all(u8::is_ascii_digit);
        if sharded && !split.is_empty() {
            return Some(canonical_split(split));
        }
    }
    let keyword = |s: &str| {
        s.split(|c: char| !c.is_ascii_alphabetic()).find_map(|w| {
            let w = w.to_ascii_lowercase();
            SPLIT_KEYWORDS
                .iter()
                .find(|(_, words)| words.contains(&w.as_str()))
                .map(|(canon, _)| canon.to_string())
        })
    };
    let dirs: Vec<&str> = rel
        .parent()
        .map(|p| p.iter().filter_map(|c| c.to_str()).collect())
        .unwrap_or_default();
    dirs.iter().rev().find_map(|d| keyword(d)).or_else(|| {
        let stem = name.split_once('.').map_or(name, |(stem, _)| stem);
        keyword(stem)
    })
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
        Self::open_columns(path, pos, None)
    }

    /// Decodes only the named columns the file has (all with `None`).
    pub fn open_columns(path: &Path, pos: ReadPos, columns: Option<&[&str]>) -> Result<Self> {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        use parquet::arrow::ProjectionMask;
        let f = File::open(path).map_err(|e| DataError::io(path, e))?;
        let perr = |e: parquet::errors::ParquetError| DataError::Parquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(perr)?;
        if let Some(columns) = columns {
            // Top-level Arrow fields are the Parquet schema's roots, in order.
            let roots: Vec<usize> = builder
                .schema()
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| columns.contains(&f.name().as_str()))
                .map(|(i, _)| i)
                .collect();
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            builder = builder.with_projection(mask);
        }
        let reader = builder
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_by_the_hubs_file_naming_rules() {
        let s = |p: &str| split_of(Path::new(p));
        for (path, want) in [
            // push_to_hub, with and without the old hash suffix
            ("data/train-00000-of-00001.parquet", Some("train")),
            (
                "data/validation-00000-of-00001-134b8fd0c89408b6.parquet",
                Some("validation"),
            ),
            ("data/test-00002-of-00003.parquet", Some("test")),
            // custom split names only through the sharded pattern
            ("data/random-00000-of-00003.csv", Some("random")),
            ("data/random.csv", None),
            // keywords in file names, delimited by non-letters
            ("train.jsonl", Some("train")),
            ("my_train_file.jsonl", Some("train")),
            ("train1.csv", Some("train")),
            ("dev.jsonl", Some("validation")),
            ("valid.jsonl", Some("validation")),
            ("eval.json", Some("test")),
            ("data/training.parquet", Some("train")),
            ("trainer.jsonl", None),
            ("contest.jsonl", None),
            // directories (the parquet converter's layout), before file names
            ("default/train/0000.parquet", Some("train")),
            ("default/partial-train/0000.parquet", Some("train")),
            ("data/test/train_like.parquet", Some("test")),
            ("alpaca_data_cleaned.json", None),
        ] {
            assert_eq!(s(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn split_names_are_canonical() {
        assert_eq!(canonical_split("Dev"), "validation");
        assert_eq!(canonical_split("training"), "train");
        assert_eq!(canonical_split("evaluation"), "test");
        assert_eq!(canonical_split("random"), "random");
    }
}
