//! OpenAssistant message trees: a table with one row per message (`message_id`,
//! `parent_id`, `role` prompter/assistant, `text`, `lang`, `rank`, `deleted`,
//! `review_result`, `tree_state`, ... as in `OpenAssistant/oasst1` and `oasst2`)
//! assembled into conversations.
//!
//! Every row has a `text`, so read as records these tables would be plain-text
//! fragments without a word of context. Instead the rows of a split (all its files
//! together: a tree may straddle two shards) are linked into trees by `parent_id`,
//! and each tree is threaded from its initial prompt (the root, a prompter message)
//! down its replies:
//!
//! * a message is *usable* when it is not `deleted` and its review did not fail
//!   (`review_result` is not `false`); an unusable message and everything below it
//!   are never trained on;
//! * a tree is used when its initial prompt is usable, the tree is
//!   `ready_for_export` (when a `tree_state` column exists) and its initial
//!   prompt's `lang` is one of `data.languages` (when set);
//! * the next turn after a message is one of its usable replies of the other role;
//!   a prompter reply only counts when it has a usable answer itself, so every
//!   conversation ends with an assistant turn;
//! * [`TreePaths::Best`] takes at each turn the best-ranked such reply (`rank` 0
//!   first, unranked after ranked, then file order): one conversation per tree,
//!   like the guanaco-style exports; [`TreePaths::All`] takes every thread down to
//!   a last assistant reply.
//!
//! Rows whose `parent_id` names no message of the split are *orphans*: their thread
//! cannot be rebuilt, so they (and the messages below them) are not used, and the
//! [`TreeReport`] counts them; a warning says so.
//!
//! Memory: the first pass reads every column but `text` (from Parquet only those
//! columns are decoded) and keeps a few bytes per message plus the ids until the
//! links are resolved; the second pass keeps the `text` of the messages that are in
//! a conversation, nothing else. Conversations are row-index lists, rendered into
//! `messages` records one at a time as the stream reads them.

use crate::config::{Columns, OnBadLine, TreePaths};
use crate::error::{DataError, Location, LocationKind, Result};
use crate::format::Field;
use crate::source::{open_part, SourceFile};
use crate::template::Message;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

/// The columns that make a table an OpenAssistant message table.
pub const TABLE_COLUMNS: [&str; 4] = ["message_id", "parent_id", "role", "text"];

/// The columns the first pass reads (those present): everything that decides the
/// tree shape and which messages are used, not the texts.
const SHAPE_COLUMNS: [&str; 8] = [
    "message_id",
    "parent_id",
    "role",
    "lang",
    "rank",
    "deleted",
    "review_result",
    "tree_state",
];

/// Whether records with these fields are rows of a message table.
pub fn is_message_table(fields: &[Field]) -> bool {
    TABLE_COLUMNS
        .iter()
        .all(|c| fields.iter().any(|f| f.name == *c))
}

/// How the trees become conversations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeOptions {
    /// Initial-prompt languages to keep; empty keeps all.
    pub languages: Vec<String>,
    pub paths: TreePaths,
    /// Skip (and count) rows that cannot be read instead of stopping.
    pub on_bad_line: OnBadLine,
}

/// What assembling found; logged, and available from [`Conversations::report`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeReport {
    /// Rows read (bad ones included).
    pub messages: u64,
    /// Rows skipped because they could not be read (`on_bad_line = "skip"`).
    pub bad_rows: u64,
    /// Messages marked `deleted`.
    pub deleted: u64,
    /// Messages whose review failed (`review_result = false`).
    pub failed_review: u64,
    /// Rows whose `parent_id` names no message of the split.
    pub orphans: u64,
    /// Messages below an orphan (or in a parent cycle): not reachable from any
    /// initial prompt.
    pub unreachable: u64,
    /// Initial prompts (rows without a parent).
    pub trees: u64,
    /// Trees not used because their initial prompt is deleted, failed review or is
    /// not a prompter message.
    pub trees_unusable_prompt: u64,
    /// Trees not used because their `tree_state` is not `ready_for_export`.
    pub trees_not_ready: u64,
    /// Trees not used because of `data.languages`.
    pub trees_other_language: u64,
    /// Trees used but without any usable assistant reply to the initial prompt.
    pub trees_without_answer: u64,
    /// Conversations assembled.
    pub conversations: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Prompter,
    Assistant,
}

/// What the first pass keeps of one row.
struct Shape {
    id: Box<str>,
    parent: Option<Box<str>>,
    role: Role,
    lang_ok: bool,
    rank: Option<i64>,
    usable: bool,
    ready: bool,
}

const NO_PARENT: u32 = u32::MAX;
const MISSING_PARENT: u32 = u32::MAX - 1;
/// A row that could not be read (skipped): never linked.
const BAD_ROW: u32 = u32::MAX - 2;

/// The assembled conversations of one split: row indices into the messages, the
/// roles and the texts of the messages used.
pub struct Conversations {
    parts: Vec<PathBuf>,
    /// Conversation `i` is `paths[starts[i]..starts[i + 1]]` (global row indices).
    paths: Vec<u32>,
    starts: Vec<u32>,
    /// Per row: whether it is an assistant message.
    assistant: Vec<bool>,
    /// Per row: its text, for rows used in a conversation.
    texts: Vec<Option<Box<str>>>,
    /// Per row: (part, kind, 1-based index) of where it was read, for messages.
    at: Vec<(u32, LocationKind, u64)>,
    report: TreeReport,
}

impl std::fmt::Debug for Conversations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conversations")
            .field("parts", &self.parts)
            .field("report", &self.report)
            .finish()
    }
}

impl Conversations {
    /// Reads the parts (the files of one split, in order) and assembles.
    pub fn assemble(parts: &[SourceFile], opts: &TreeOptions) -> Result<Self> {
        let part_paths: Vec<PathBuf> = parts.iter().map(|p| p.path.clone()).collect();
        let mut report = TreeReport::default();

        // ---- pass 1: the shape of every row.
        let mut shapes: Vec<Option<Shape>> = Vec::new();
        let mut at = Vec::new();
        for (pi, part) in parts.iter().enumerate() {
            let mut reader = open_part(part, Some(&SHAPE_COLUMNS))?;
            while let Some(rec) = reader.next_record()? {
                report.messages += 1;
                at.push((pi as u32, rec.at.kind, rec.at.index));
                let parsed = rec
                    .value
                    .map_err(|message| DataError::Malformed {
                        at: rec.at.clone(),
                        message,
                    })
                    .and_then(|v| shape_of(&v, &rec.at, opts));
                match parsed {
                    Ok(s) => {
                        report.deleted += s.1 as u64;
                        report.failed_review += s.2 as u64;
                        shapes.push(Some(s.0));
                    }
                    Err(e) if opts.on_bad_line == OnBadLine::Skip => {
                        report.bad_rows += 1;
                        if report.bad_rows <= 10 {
                            tracing::warn!("skipping bad message row: {e}");
                        }
                        shapes.push(None);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let n = shapes.len();
        if n >= BAD_ROW as usize {
            return Err(DataError::Source {
                spec: part_paths[0].display().to_string(),
                message: format!("{n} messages: more than this reader indexes"),
            });
        }
        let loc = |i: usize| {
            let (p, kind, index) = at[i];
            Location {
                file: part_paths[p as usize].clone(),
                kind,
                index,
            }
        };

        // ---- links: ids to rows, then parents to rows.
        let mut index: HashMap<&str, u32> = HashMap::with_capacity(n);
        for (i, s) in shapes.iter().enumerate() {
            let Some(s) = s else { continue };
            if let Some(first) = index.insert(&s.id, i as u32) {
                return Err(DataError::BadField {
                    at: loc(i),
                    field: "message_id".into(),
                    problem: format!(
                        "`{}` is used twice (first at {}): the message table is damaged",
                        s.id,
                        loc(first as usize)
                    ),
                });
            }
        }
        let parent: Vec<u32> = shapes
            .iter()
            .map(|s| match s {
                None => BAD_ROW,
                Some(s) => match &s.parent {
                    None => NO_PARENT,
                    Some(p) => index.get(&**p).copied().unwrap_or(MISSING_PARENT),
                },
            })
            .collect();
        drop(index);
        // From here on only the small per-row facts are needed.
        let role: Vec<Role> = shapes
            .iter()
            .map(|s| s.as_ref().map_or(Role::Prompter, |s| s.role))
            .collect();
        let usable: Vec<bool> = shapes
            .iter()
            .map(|s| s.as_ref().is_some_and(|s| s.usable))
            .collect();
        let rank: Vec<Option<i64>> = shapes
            .iter()
            .map(|s| s.as_ref().and_then(|s| s.rank))
            .collect();
        let tree_facts: Vec<(bool, bool)> = shapes
            .iter()
            .map(|s| s.as_ref().map_or((false, false), |s| (s.ready, s.lang_ok)))
            .collect();
        drop(shapes);

        // ---- children, in reply order: best rank first, unranked last, then rows.
        let mut start = vec![0u32; n + 1];
        for &p in &parent {
            if (p as usize) < n {
                start[p as usize + 1] += 1;
            }
        }
        for i in 0..n {
            start[i + 1] += start[i];
        }
        let mut fill = start.clone();
        let mut children = vec![0u32; start[n] as usize];
        for (c, &p) in parent.iter().enumerate() {
            if (p as usize) < n {
                children[fill[p as usize] as usize] = c as u32;
                fill[p as usize] += 1;
            }
        }
        drop(fill);
        for i in 0..n {
            children[start[i] as usize..start[i + 1] as usize]
                .sort_by_key(|&c| (rank[c as usize].is_none(), rank[c as usize], c));
        }
        let (children_r, start_r, usable_r, role_r) = (&children, &start, &usable, &role);
        let kids = move |i: u32| {
            &children_r[start_r[i as usize] as usize..start_r[i as usize + 1] as usize]
        };
        // The replies that continue a conversation at `i`: usable, of the other
        // role, and (for a prompter reply) answered by a usable assistant message.
        let next_turns = move |i: u32| {
            let (usable, role) = (usable_r, role_r);
            kids(i).iter().copied().filter(move |&c| {
                let cu = c as usize;
                usable[cu]
                    && role[cu] != role[i as usize]
                    && (role[cu] == Role::Assistant
                        || kids(c)
                            .iter()
                            .any(|&g| usable[g as usize] && role[g as usize] == Role::Assistant))
            })
        };

        // ---- orphans and what hangs below them.
        report.orphans = parent.iter().filter(|&&p| p == MISSING_PARENT).count() as u64;
        let mut reached = vec![false; n];
        let mut stack: Vec<u32> = (0..n as u32)
            .filter(|&i| parent[i as usize] == NO_PARENT)
            .collect();
        while let Some(i) = stack.pop() {
            reached[i as usize] = true;
            stack.extend_from_slice(kids(i));
        }
        report.unreachable = (0..n)
            .filter(|&i| !reached[i] && (parent[i] as usize) < n)
            .count() as u64;
        drop(reached);

        // ---- threads.
        let mut paths: Vec<u32> = Vec::new();
        let mut starts: Vec<u32> = vec![0];
        let mut path: Vec<u32> = Vec::new();
        for root in 0..n as u32 {
            let r = root as usize;
            if parent[r] != NO_PARENT {
                continue;
            }
            report.trees += 1;
            let (ready, lang_ok) = tree_facts[r];
            if !usable[r] || role[r] != Role::Prompter {
                report.trees_unusable_prompt += 1;
                continue;
            }
            if !ready {
                report.trees_not_ready += 1;
                continue;
            }
            if !lang_ok {
                report.trees_other_language += 1;
                continue;
            }
            let before = starts.len();
            match opts.paths {
                TreePaths::Best => {
                    path.clear();
                    path.push(root);
                    while let Some(next) = next_turns(*path.last().expect("root")).next() {
                        path.push(next);
                    }
                    if path.len() > 1 {
                        paths.extend_from_slice(&path);
                        starts.push(paths.len() as u32);
                    }
                }
                TreePaths::All => {
                    // Depth-first, best reply first; a thread ends where no turn
                    // continues it (always at an assistant message, see next_turns).
                    let mut todo: Vec<(u32, usize)> = vec![(root, 0)];
                    while let Some((i, depth)) = todo.pop() {
                        path.truncate(depth);
                        path.push(i);
                        let before_kids = todo.len();
                        todo.extend(next_turns(i).map(|c| (c, depth + 1)));
                        if todo.len() == before_kids {
                            if path.len() > 1 {
                                paths.extend_from_slice(&path);
                                starts.push(paths.len() as u32);
                            }
                        } else {
                            todo[before_kids..].reverse();
                        }
                    }
                }
            }
            if starts.len() == before {
                report.trees_without_answer += 1;
            }
        }
        report.conversations = (starts.len() - 1) as u64;
        drop(children);
        drop(start);

        // ---- pass 2: the texts of the messages in a conversation.
        let mut texts: Vec<Option<Box<str>>> = vec![None; n];
        let mut wanted = vec![false; n];
        for &i in &paths {
            wanted[i as usize] = true;
        }
        let mut row = 0usize;
        for part in parts {
            let mut reader = open_part(part, Some(&["text"]))?;
            while let Some(rec) = reader.next_record()? {
                if row < n && wanted[row] {
                    let v = rec.value.map_err(|message| DataError::Malformed {
                        at: rec.at.clone(),
                        message,
                    })?;
                    match v.get("text") {
                        Some(Value::String(s)) => texts[row] = Some(s.as_str().into()),
                        other => {
                            return Err(DataError::BadField {
                                at: rec.at.clone(),
                                field: "text".into(),
                                problem: format!(
                                    "must be a string, found {}",
                                    other.map_or("nothing", kind)
                                ),
                            })
                        }
                    }
                }
                row += 1;
            }
        }
        if row != n {
            return Err(DataError::Source {
                spec: part_paths[0].display().to_string(),
                message: format!(
                    "the message table changed while it was read ({n} rows, then {row})"
                ),
            });
        }

        let assistant = role.iter().map(|&r| r == Role::Assistant).collect();
        let conv = Self {
            parts: part_paths,
            paths,
            starts,
            assistant,
            texts,
            at,
            report,
        };
        conv.log(opts);
        Ok(conv)
    }

    fn log(&self, opts: &TreeOptions) {
        let r = &self.report;
        let files: Vec<String> = self.parts.iter().map(|p| p.display().to_string()).collect();
        tracing::info!(
            "OpenAssistant message trees in {}: {} messages, {} trees -> {} conversations \
             ({} path{}; trees skipped: {} unusable initial prompt, {} not ready for export, \
             {} other language, {} without an answer; {} deleted and {} failed-review \
             messages never used)",
            files.join(", "),
            r.messages,
            r.trees,
            r.conversations,
            opts.paths.name(),
            if opts.paths == TreePaths::Best {
                " per tree"
            } else {
                "s: every thread"
            },
            r.trees_unusable_prompt,
            r.trees_not_ready,
            r.trees_other_language,
            r.trees_without_answer,
            r.deleted,
            r.failed_review,
        );
        if r.orphans > 0 {
            tracing::warn!(
                "{}: {} message{} whose parent_id names no message of this split (orphans) \
                 and {} message{} below them cannot be threaded and are not trained on",
                files.join(", "),
                r.orphans,
                if r.orphans == 1 { "" } else { "s" },
                r.unreachable,
                if r.unreachable == 1 { "" } else { "s" },
            );
        }
        if r.bad_rows > 0 {
            tracing::warn!(
                "{}: {} unreadable message rows skipped",
                files.join(", "),
                r.bad_rows
            );
        }
    }

    pub fn len(&self) -> usize {
        self.starts.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn report(&self) -> &TreeReport {
        &self.report
    }

    /// Conversation `i`: prompter turns as `user`, assistant turns as `assistant`.
    pub fn messages(&self, i: usize) -> Vec<Message> {
        self.rows(i)
            .iter()
            .map(|&r| {
                let text = self.texts[r as usize].as_deref().unwrap_or_default();
                if self.assistant[r as usize] {
                    Message::assistant(text)
                } else {
                    Message::user(text)
                }
            })
            .collect()
    }

    /// Where conversation `i`'s initial prompt was read.
    pub fn location(&self, i: usize) -> Location {
        let (p, kind, index) = self.at[self.rows(i)[0] as usize];
        Location {
            file: self.parts[p as usize].clone(),
            kind,
            index,
        }
    }

    fn rows(&self, i: usize) -> &[u32] {
        &self.paths[self.starts[i] as usize..self.starts[i + 1] as usize]
    }

    /// Conversation `i` as a chat record in the configured column names, so it goes
    /// through the same format handling as a `messages` record read from a file.
    pub fn record(&self, i: usize, cols: &Columns) -> Value {
        let turns: Vec<Value> = self
            .messages(i)
            .into_iter()
            .map(|m| {
                let mut t = Map::with_capacity(2);
                t.insert(cols.role.clone(), Value::String(m.role));
                t.insert(cols.content.clone(), Value::String(m.content));
                Value::Object(t)
            })
            .collect();
        let mut obj = Map::with_capacity(1);
        obj.insert(cols.messages.clone(), Value::Array(turns));
        Value::Object(obj)
    }
}

/// The shape of one row, and whether it is deleted / failed review.
fn shape_of(v: &Value, at: &Location, opts: &TreeOptions) -> Result<(Shape, bool, bool)> {
    let bad = |field: &str, problem: String| DataError::BadField {
        at: at.clone(),
        field: field.into(),
        problem,
    };
    let Some(obj) = v.as_object() else {
        return Err(bad(
            "<record>",
            format!("must be a JSON object, found {}", kind(v)),
        ));
    };
    let string = |field: &str, required: bool| -> Result<Option<&str>> {
        match obj.get(field) {
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            None | Some(Value::Null) if !required => Ok(None),
            Some(other) => Err(bad(
                field,
                format!("must be a string, found {}", kind(other)),
            )),
            None => Err(DataError::MissingField {
                at: at.clone(),
                field: field.into(),
                format: "oasst",
            }),
        }
    };
    let flag = |field: &str| -> Result<Option<bool>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(bad(
                field,
                format!("must be a boolean, found {}", kind(other)),
            )),
        }
    };
    let id = string("message_id", true)?.unwrap_or_default();
    if id.is_empty() {
        return Err(bad("message_id", "is empty".into()));
    }
    let parent = string("parent_id", false)?.filter(|p| !p.is_empty());
    let role = match string("role", true)?.unwrap_or_default() {
        "prompter" | "user" => Role::Prompter,
        "assistant" => Role::Assistant,
        other => {
            return Err(bad(
                "role",
                format!("has unknown role `{other}` (expected prompter or assistant)"),
            ))
        }
    };
    let rank = match obj.get("rank") {
        None | Some(Value::Null) => None,
        Some(Value::Number(x)) if x.is_i64() => x.as_i64(),
        // pandas writes an integer column with nulls as float64.
        Some(Value::Number(x)) if x.as_f64().is_some_and(|f| f.fract() == 0.0) => {
            x.as_f64().map(|f| f as i64)
        }
        Some(other) => {
            return Err(bad(
                "rank",
                format!("must be an integer, found {}", kind(other)),
            ))
        }
    };
    let deleted = flag("deleted")?.unwrap_or(false);
    let failed = flag("review_result")? == Some(false);
    let lang_ok = opts.languages.is_empty()
        || string("lang", false)?.is_some_and(|l| opts.languages.iter().any(|x| x == l));
    let ready = string("tree_state", false)?.is_none_or(|s| s == "ready_for_export");
    Ok((
        Shape {
            id: id.into(),
            parent: parent.map(Into::into),
            role,
            lang_ok,
            rank,
            usable: !deleted && !failed,
            ready,
        },
        deleted,
        failed,
    ))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The identity of an assembly: the parts (path, size, modification time) and the
/// options.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    parts: Vec<(PathBuf, u64, Option<std::time::SystemTime>)>,
    opts: TreeOptions,
}

/// Assemblies alive in this process. The training stream, the eval stream and the
/// sample prompts resolve the dataset separately; this lets them share one copy
/// instead of assembling (and holding) the split two or three times.
static LIVE: Mutex<Vec<(Key, Weak<Conversations>)>> = Mutex::new(Vec::new());

/// [`Conversations::assemble`], shared with any live assembly of the same parts and
/// options.
pub(crate) fn assemble_shared(
    parts: &[SourceFile],
    opts: &TreeOptions,
) -> Result<Arc<Conversations>> {
    let key = Key {
        parts: parts
            .iter()
            .map(|p| {
                let meta = std::fs::metadata(&p.path).ok();
                (
                    p.path.clone(),
                    meta.as_ref().map_or(0, |m| m.len()),
                    meta.and_then(|m| m.modified().ok()),
                )
            })
            .collect(),
        opts: opts.clone(),
    };
    // Held while assembling: a second stream asking for the same split waits for
    // the first assembly instead of doing its own.
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|(_, w)| w.strong_count() > 0);
    if let Some(c) = live
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(c);
    }
    let c = Arc::new(Conversations::assemble(parts, opts)?);
    live.push((key, Arc::downgrade(&c)));
    Ok(c)
}
