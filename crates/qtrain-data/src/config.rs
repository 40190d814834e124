//! `DatasetConfig`: what to read and how to turn it into batches. Every field has a
//! default, unknown keys are rejected (a typo must not silently fall back to a
//! default), and [`DatasetConfig::validate`] names the offending key.

use crate::error::{DataError, Result};
use serde::{Deserialize, Serialize};

/// The source name of the embedded instruction dataset.
pub const BUILTIN_INSTRUCTIONS: &str = "builtin:instructions";

/// `batch_size = "auto"` as the field holds it: the trainer replaces it by a number
/// of rows (from its memory model) before any stream is built; the streams refuse
/// it. In TOML it is always written `"auto"`.
pub const AUTO_BATCH_SIZE: usize = 0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    /// A local `.jsonl`/`.json`/`.parquet` file or a directory of them, a hub
    /// dataset id `org/name` (optionally `@revision`) read from the local Hugging Face
    /// cache, or `builtin:instructions`.
    pub path: String,
    /// For directories and hub datasets holding several splits, the split to read,
    /// found by the hub's file naming rules (`data/train-00000-of-00001.parquet`,
    /// `train/0000.parquet`, `my_valid_file.jsonl`; `dev`/`val`/`valid` mean
    /// `validation`, `eval`/`testing` mean `test`, `training` means `train`). A
    /// directory whose files name no split is one `train` split. `""`: every file.
    pub split: String,
    pub format: Format,
    /// OpenAssistant message trees: keep the conversations whose initial prompt is
    /// in one of these languages (`lang` codes such as `"en"`, `"de"`); empty keeps
    /// every language. An error for datasets without message trees.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub languages: Vec<String>,
    /// OpenAssistant message trees: which threads become conversations.
    #[serde(skip_serializing_if = "TreePaths::is_best")]
    pub tree_paths: TreePaths,
    pub columns: Columns,
    /// `auto` (the model's `chat_template`, else Mistral's `[INST]` format),
    /// `model` (the model's, an error when it has none), `mistral`, or the path of a
    /// Jinja file.
    pub chat_template: String,
    /// Train on every token instead of only on the assistant turns.
    pub train_on_prompt: bool,
    /// Tokens per row.
    pub seq_len: usize,
    /// Rows per batch, or `"auto"` ([`AUTO_BATCH_SIZE`]): sized by the trainer.
    #[serde(with = "batch_size_serde")]
    pub batch_size: usize,
    /// Pack several documents per row (block-diagonal attention via `segment_ids`);
    /// `false` pads one document per row, bucketing rows of similar length.
    pub packing: bool,
    /// Fraction of the records held out for evaluation, chosen by hashing the
    /// record's index with `seed` (stable when the file grows).
    pub eval_fraction: f64,
    /// Instead of `eval_fraction`: hold out the first N records.
    pub eval_samples: Option<usize>,
    /// Records shuffled together (memory: this many raw records).
    pub shuffle_buffer: usize,
    pub seed: u64,
    pub on_bad_line: OnBadLine,
    /// What happens to a sample longer than `seq_len`.
    pub truncation: Truncation,
    /// Batches prepared ahead by the background thread.
    pub prefetch: usize,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            path: BUILTIN_INSTRUCTIONS.to_string(),
            split: "train".to_string(),
            format: Format::Auto,
            languages: Vec::new(),
            tree_paths: TreePaths::Best,
            columns: Columns::default(),
            chat_template: "auto".to_string(),
            train_on_prompt: false,
            seq_len: 512,
            batch_size: 4,
            packing: true,
            eval_fraction: 0.02,
            eval_samples: None,
            shuffle_buffer: 4096,
            seed: 0,
            on_bad_line: OnBadLine::Error,
            truncation: Truncation::Split,
            prefetch: 8,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Detected per record from its fields.
    Auto,
    /// `instruction` / `input` / `output` (and optional `system`).
    Alpaca,
    /// `conversations: [{from, value}]`.
    Sharegpt,
    /// `messages: [{role, content}]` (OpenAI / Capybara / OpenAssistant exports).
    Messages,
    /// `text`: trained on entirely.
    Text,
    /// An OpenAssistant message table (`message_id`, `parent_id`, `role`, `text`,
    /// ...; one row per message) or tree export: assembled into conversations.
    Oasst,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Alpaca => "alpaca",
            Format::Sharegpt => "sharegpt",
            Format::Messages => "messages",
            Format::Text => "text",
            Format::Oasst => "oasst",
        }
    }
}

/// Which threads of an OpenAssistant message tree become training conversations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TreePaths {
    /// One conversation per tree: from the initial prompt, at each turn the
    /// best-ranked usable reply (`rank` 0 first; deleted replies and replies that
    /// failed review are never used), as the guanaco-style exports do.
    #[default]
    Best,
    /// Every thread from the initial prompt to a last assistant reply: one
    /// conversation per branch (they share their common beginning).
    All,
}

impl TreePaths {
    pub fn name(self) -> &'static str {
        match self {
            TreePaths::Best => "best",
            TreePaths::All => "all",
        }
    }
    fn is_best(&self) -> bool {
        *self == TreePaths::Best
    }
}

/// Field names, for datasets that call them something else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Columns {
    pub instruction: String,
    pub input: String,
    pub output: String,
    pub system: String,
    pub conversations: String,
    pub from: String,
    pub value: String,
    pub messages: String,
    pub role: String,
    pub content: String,
    pub text: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            instruction: "instruction".into(),
            input: "input".into(),
            output: "output".into(),
            system: "system".into(),
            conversations: "conversations".into(),
            from: "from".into(),
            value: "value".into(),
            messages: "messages".into(),
            role: "role".into(),
            content: "content".into(),
            text: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadLine {
    /// Stop with the file:line and the parser's message.
    Error,
    /// Skip the record and count it (see `DataStats::bad_records`).
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Cut into `seq_len` pieces, each its own document (positions restart).
    Split,
    /// Drop the sample (counted).
    Drop,
    /// Keep the first `seq_len` tokens (counted).
    Truncate,
}

impl DatasetConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |key, message: &str| {
            Err(DataError::Config {
                key,
                message: message.to_string(),
            })
        };
        if self.path.trim().is_empty() {
            return bad("path", "is empty");
        }
        if self.seq_len < 2 {
            return bad("seq_len", "must be at least 2");
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return bad("eval_fraction", "must be in [0, 1)");
        }
        if self.shuffle_buffer == 0 {
            return bad("shuffle_buffer", "must be at least 1 (1 = no shuffling)");
        }
        if self.prefetch == 0 {
            return bad("prefetch", "must be at least 1");
        }
        if let Some(l) = self
            .languages
            .iter()
            .find(|l| l.trim().is_empty() || l.trim() != l.as_str())
        {
            return bad(
                "languages",
                &format!("`{l}` is not a language code (expected e.g. \"en\")"),
            );
        }
        Ok(())
    }

    /// Whether `batch_size` is `"auto"`.
    pub fn batch_size_is_auto(&self) -> bool {
        self.batch_size == AUTO_BATCH_SIZE
    }

    /// [`DatasetConfig::validate`], and a concrete `batch_size`: what a stream
    /// that batches needs.
    pub fn validate_for_batching(&self) -> Result<()> {
        self.validate()?;
        if self.batch_size_is_auto() {
            return Err(DataError::Config {
                key: "batch_size",
                message: "\"auto\" must be resolved to a number of rows before batching \
                          (the trainer does this with its memory model)"
                    .to_string(),
            });
        }
        Ok(())
    }

    /// Hash of everything that decides which batches come out in which order, stored
    /// in the cursor so a checkpoint is not resumed against different data settings.
    pub fn fingerprint(&self) -> u64 {
        let mut c = self.clone();
        c.prefetch = 0;
        c.on_bad_line = OnBadLine::Error;
        let s = serde_json::to_string(&c).expect("config serializes");
        crate::util::fnv1a(s.as_bytes())
    }
}

/// `batch_size` in TOML: a positive integer or `"auto"` ([`AUTO_BATCH_SIZE`]).
mod batch_size_serde {
    use super::AUTO_BATCH_SIZE;
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &usize, s: S) -> Result<S::Ok, S::Error> {
        if *v == AUTO_BATCH_SIZE {
            s.serialize_str("auto")
        } else {
            s.serialize_u64(*v as u64)
        }
    }

    struct V;

    const EXPECTED: &str = "a positive integer or \"auto\" for data.batch_size";

    impl Visitor<'_> for V {
        type Value = usize;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(EXPECTED)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
            if v == 0 {
                return Err(E::custom(format!("expected {EXPECTED}, found 0")));
            }
            usize::try_from(v).map_err(|_| E::custom(format!("expected {EXPECTED}, found {v}")))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
            if v <= 0 {
                return Err(E::custom(format!("expected {EXPECTED}, found {v}")));
            }
            self.visit_u64(v as u64)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
            if v == "auto" {
                Ok(AUTO_BATCH_SIZE)
            } else {
                Err(E::custom(format!("expected {EXPECTED}, found \"{v}\"")))
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        d.deserialize_any(V)
    }
}
