//! Dataset record formats: turns one JSON record (a JSONL line, a JSON array element,
//! a Parquet row, a built-in example) into a [`Sample`], a conversation or a plain
//! text. The format is detected per record from its fields unless configured, and
//! every field name goes through the configured column mapping.

use crate::config::{Columns, Format};
use crate::error::{DataError, Location, Result};
use crate::template::Message;
use serde_json::Value;

/// One training example before tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    /// Rendered with the chat template; only assistant turns are trained on by
    /// default.
    Chat(Vec<Message>),
    /// Trained on entirely.
    Text(String),
}

/// A field (column) as format detection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// Whether it holds a list of records (objects / structs), as conversation
    /// turns do.
    pub holds_records: bool,
}

impl Field {
    /// The fields of a JSON object.
    pub fn of_object(obj: &serde_json::Map<String, Value>) -> Vec<Field> {
        obj.iter()
            .map(|(name, v)| Field {
                name: name.clone(),
                holds_records: v
                    .as_array()
                    .is_some_and(|a| a.first().is_some_and(Value::is_object)),
            })
            .collect()
    }
}

/// Field names that belong to structured (conversation, preference, QA, message
/// tree) formats: a record with one of them beside `text` is not a plain text, and
/// training on its `text` alone would train on fragments.
const STRUCTURED_FIELDS: [&str; 21] = [
    "role",
    "from",
    "parent_id",
    "message_id",
    "message_tree_id",
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "response",
    "question",
    "answer",
    "instruction",
    "input",
    "output",
    "conversation",
    "conversations",
    "messages",
    "dialog",
    "dialogue",
    "turns",
];

/// Which format records with these fields are in; `Err` describes the fields for
/// [`DataError::UnknownFormat`]. `text` is only taken as a plain text when no other
/// field looks structured (see [`STRUCTURED_FIELDS`], or a list of records).
pub fn detect_fields(fields: &[Field], cols: &Columns) -> std::result::Result<Format, String> {
    let has = |k: &str| fields.iter().any(|f| f.name == k);
    if has(&cols.messages) {
        return Ok(Format::Messages);
    }
    if has(&cols.conversations) {
        return Ok(Format::Sharegpt);
    }
    if has(&cols.instruction) && has(&cols.output) {
        return Ok(Format::Alpaca);
    }
    let listed = |fs: &[&Field]| {
        fs.iter()
            .map(|f| format!("`{}`", f.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let all: Vec<&Field> = fields.iter().collect();
    if fields.is_empty() {
        return Err("no fields".into());
    }
    if has(&cols.text) {
        let mapped = [
            &cols.role,
            &cols.from,
            &cols.instruction,
            &cols.input,
            &cols.output,
        ];
        let structured: Vec<&Field> = fields
            .iter()
            .filter(|f| f.name != cols.text)
            .filter(|f| {
                f.holds_records
                    || STRUCTURED_FIELDS.contains(&f.name.as_str())
                    || mapped.contains(&&f.name)
            })
            .collect();
        if structured.is_empty() {
            return Ok(Format::Text);
        }
        return Err(format!(
            "fields {}: {} belong to a structured format, so `{}` alone is not the \
             training text (set format = \"text\" to train on it anyway)",
            listed(&all),
            listed(&structured),
            cols.text
        ));
    }
    Err(format!("fields {}", listed(&all)))
}

/// Which format a record is in, from the fields it has.
pub fn detect(record: &Value, cols: &Columns) -> Option<Format> {
    detect_fields(&Field::of_object(record.as_object()?), cols).ok()
}

/// Converts a record. `at` locates it for error messages.
pub fn to_sample(record: &Value, format: Format, cols: &Columns, at: &Location) -> Result<Sample> {
    let Some(obj) = record.as_object() else {
        return Err(DataError::BadField {
            at: at.clone(),
            field: "<record>".into(),
            problem: format!("must be a JSON object, found {}", kind(record)),
        });
    };
    let format = match format {
        Format::Auto => detect_fields(&Field::of_object(obj), cols).map_err(|found| {
            DataError::UnknownFormat {
                at: at.clone(),
                found,
            }
        })?,
        // Assembled message-tree conversations are `messages` records
        // (crate::oasst).
        Format::Oasst => Format::Messages,
        f => f,
    };
    let name = format.name();
    let field = |key: &str| -> Result<&Value> {
        obj.get(key).ok_or_else(|| DataError::MissingField {
            at: at.clone(),
            field: key.to_string(),
            format: name,
        })
    };
    let string = |key: &str, v: &Value| -> Result<String> {
        text_of(v).ok_or_else(|| DataError::BadField {
            at: at.clone(),
            field: key.to_string(),
            problem: format!("must be a string, found {}", kind(v)),
        })
    };
    match format {
        Format::Text => Ok(Sample::Text(string(&cols.text, field(&cols.text)?)?)),
        Format::Alpaca => {
            let instruction = string(&cols.instruction, field(&cols.instruction)?)?;
            let output = string(&cols.output, field(&cols.output)?)?;
            let input = match obj.get(&cols.input) {
                None | Some(Value::Null) => String::new(),
                Some(v) => string(&cols.input, v)?,
            };
            let mut messages = Vec::with_capacity(3);
            match obj.get(&cols.system) {
                Some(Value::String(s)) if !s.is_empty() => messages.push(Message::system(s)),
                _ => {}
            }
            // The usual alpaca layout: the input below the instruction.
            let user = if input.trim().is_empty() {
                instruction
            } else {
                format!("{instruction}\n\n{input}")
            };
            messages.push(Message::user(user));
            messages.push(Message::assistant(output));
            Ok(Sample::Chat(messages))
        }
        Format::Sharegpt | Format::Messages => {
            let (list_key, role_key, content_key) = if format == Format::Sharegpt {
                (&cols.conversations, &cols.from, &cols.value)
            } else {
                (&cols.messages, &cols.role, &cols.content)
            };
            let list = field(list_key)?;
            let Some(turns) = list.as_array() else {
                return Err(DataError::BadField {
                    at: at.clone(),
                    field: list_key.clone(),
                    problem: format!("must be a list of turns, found {}", kind(list)),
                });
            };
            let mut messages = Vec::with_capacity(turns.len());
            for (i, turn) in turns.iter().enumerate() {
                let path = |k: &str| format!("{list_key}[{i}].{k}");
                let get = |k: &str| -> Result<&Value> {
                    turn.get(k).ok_or_else(|| DataError::MissingField {
                        at: at.clone(),
                        field: path(k),
                        format: name,
                    })
                };
                let role_v = get(role_key)?;
                let role = role_v.as_str().ok_or_else(|| DataError::BadField {
                    at: at.clone(),
                    field: path(role_key),
                    problem: format!("must be a string, found {}", kind(role_v)),
                })?;
                let role = normalize_role(role).ok_or_else(|| DataError::BadField {
                    at: at.clone(),
                    field: path(role_key),
                    problem: format!(
                        "has unknown role `{role}` (expected system, user/human/prompter, assistant/gpt, tool)"
                    ),
                })?;
                let content = string(&path(content_key), get(content_key)?)?;
                messages.push(Message::new(role, content));
            }
            if messages.is_empty() {
                return Err(DataError::BadField {
                    at: at.clone(),
                    field: list_key.clone(),
                    problem: "is empty".into(),
                });
            }
            Ok(Sample::Chat(messages))
        }
        Format::Auto | Format::Oasst => unreachable!("resolved above"),
    }
}

/// Maps the role names of ShareGPT, OpenAssistant and OpenAI exports onto the chat
/// template roles.
fn normalize_role(role: &str) -> Option<&'static str> {
    Some(match role.to_ascii_lowercase().as_str() {
        "system" => "system",
        "user" | "human" | "prompter" => "user",
        "assistant" | "gpt" | "model" | "bot" | "chatgpt" | "bard" => "assistant",
        "tool" | "function" | "observation" => "tool",
        _ => return None,
    })
}

/// A string, or OpenAI-style content parts `[{"type": "text", "text": ...}]` joined.
fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => out.push_str(t),
                    _ => return None,
                }
            }
            Some(out)
        }
        _ => None,
    }
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
