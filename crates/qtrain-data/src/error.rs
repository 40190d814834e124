//! `DataError`: every way reading, templating or batching a dataset can fail. Each
//! variant names where (file and line or row, field, config key) so the message
//! alone tells the user what to fix.

use std::path::PathBuf;

/// Where a record came from: a file and its 1-based line (JSONL), element (JSON
/// array) or row (Parquet, built-in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub kind: LocationKind,
    /// 1-based.
    pub index: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocationKind {
    Line,
    Element,
    Row,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            // `file:line` is what editors and terminals turn into a link.
            LocationKind::Line => write!(f, "{}:{}", self.file.display(), self.index),
            LocationKind::Element => {
                write!(f, "{} (array element {})", self.file.display(), self.index)
            }
            LocationKind::Row => write!(f, "{} (row {})", self.file.display(), self.index),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{at}: malformed JSON: {message} (set on_bad_line = \"skip\" to skip and count such records)")]
    Malformed { at: Location, message: String },
    #[error("{at}: missing field `{field}` ({format} format)")]
    MissingField {
        at: Location,
        field: String,
        format: &'static str,
    },
    #[error("{at}: field `{field}` {problem}")]
    BadField {
        at: Location,
        field: String,
        problem: String,
    },
    #[error("{at}: cannot detect the format: expected a `messages`, `conversations`, `instruction`+`output` or `text` field, or an OpenAssistant message table (`message_id`, `parent_id`, `role`, `text`), found {found} (set `format` or map the columns)")]
    UnknownFormat { at: Location, found: String },
    #[error("{path}: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("dataset `{spec}`: {message}")]
    Source { spec: String, message: String },
    #[error("dataset config: `{key}`: {message}")]
    Config { key: &'static str, message: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{at}: chat template: {message}")]
    TemplateAt { at: Location, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("dataset `{spec}` is empty: {detail}")]
    Empty { spec: String, detail: String },
    #[error("batch {batch} has no trainable token (every label is -100); refusing to train on it")]
    AllMasked { batch: u64 },
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("the data loader thread stopped unexpectedly")]
    LoaderGone,
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
