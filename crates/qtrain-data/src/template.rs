//! Chat templates: the model's own Jinja `chat_template` (from
//! `tokenizer_config.json`) rendered with minijinja, set up like `transformers`'
//! `apply_chat_template` so Hugging Face templates render byte-for-byte the same:
//!
//! * `trim_blocks` + `lstrip_blocks`, loop controls, Python string/dict methods
//!   (`.strip()`, `.items()`, ...) through minijinja-contrib's `pycompat`;
//! * the globals `raise_exception(msg)` and `strftime_now(fmt)`;
//! * a `tojson` filter formatting like Python's `json.dumps(ensure_ascii=False)`
//!   (`", "` / `": "` separators, no HTML escaping), as transformers' does;
//! * the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
//!   `unk_token`, `pad_token`.
//!
//! Mistral's v0.3 `[INST]` template is built in as the fallback for models without
//! one.

use crate::error::{DataError, Result};
use crate::tiny_tokenizer::MISTRAL_V3_CHAT_TEMPLATE;
use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// One chat turn. `role` is `system`, `user`, `assistant` (or whatever else the
/// template accepts, e.g. `tool`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
    pub fn is_assistant(&self) -> bool {
        self.role == "assistant"
    }
}

/// The special-token strings a template may refer to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpecialTokens {
    pub bos: String,
    pub eos: String,
    pub unk: Option<String>,
    pub pad: Option<String>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    tokens: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("tokens", &self.tokens)
            .finish()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; syntax errors are reported here, not at the first render.
    pub fn new(source: impl Into<String>, tokens: SpecialTokens) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| DataError::Template(e.to_string()))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| DataError::Template(format!("{e:#}")))?;
        Ok(Self {
            env,
            source,
            tokens,
        })
    }

    /// Mistral-7B-Instruct-v0.3's format: `<s>[INST] user[/INST] answer</s>`.
    pub fn mistral(tokens: SpecialTokens) -> Self {
        Self::new(MISTRAL_V3_CHAT_TEMPLATE, tokens).expect("the built-in template compiles")
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.tokens
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends where
    /// the assistant's answer should begin (for generation).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| DataError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.tokens.bos.as_str(),
            eos_token => self.tokens.eos.as_str(),
            unk_token => self.tokens.unk.as_deref(),
            pad_token => self.tokens.pad.as_deref(),
        };
        tmpl.render(ctx).map_err(|e| {
            // `raise_exception` messages are the template author's words: show them
            // without minijinja's error-kind prefix.
            if e.kind() == ErrorKind::InvalidOperation {
                if let Some(detail) = e.detail() {
                    return DataError::Template(detail.to_string());
                }
            }
            DataError::Template(format!("{e:#}"))
        })
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Like Python's `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, Error> {
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    // `sort_keys` and `separators` are accepted by transformers but rarely used.
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON").with_source(e)
    })?;
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).expect("string"));
                out.push_str(": ");
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).expect("scalar")),
    }
}

/// `strftime_now(format)`: the current UTC time, for templates (Llama 3) that put the
/// date in the system prompt. Supports `%Y %m %d %b %B %H %M %S %%`.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    strftime(secs, &format)
}

fn strftime(unix_secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('b') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> SpecialTokens {
        SpecialTokens {
            bos: "<s>".into(),
            eos: "</s>".into(),
            ..Default::default()
        }
    }

    #[test]
    fn mistral_v3_format() {
        let t = ChatTemplate::mistral(tokens());
        let conv = [
            Message::user("Hi there"),
            Message::assistant("  Hello! "),
            Message::user("2+2?"),
            Message::assistant("4"),
        ];
        assert_eq!(
            t.render(&conv, false).unwrap(),
            "<s>[INST] Hi there[/INST] Hello!</s>[INST] 2+2?[/INST] 4</s>"
        );
        assert_eq!(
            t.render(&conv[..3], true).unwrap(),
            "<s>[INST] Hi there[/INST] Hello!</s>[INST] 2+2?[/INST]"
        );
    }

    #[test]
    fn mistral_system_goes_into_last_user_turn() {
        let t = ChatTemplate::mistral(tokens());
        let conv = [
            Message::system("Be brief."),
            Message::user("a"),
            Message::assistant("b"),
            Message::user("c"),
        ];
        assert_eq!(
            t.render(&conv, true).unwrap(),
            "<s>[INST] a[/INST] b</s>[INST] Be brief.\n\nc[/INST]"
        );
    }

    #[test]
    fn raise_exception_message_is_reported() {
        let t = ChatTemplate::mistral(tokens());
        let err = t
            .render(&[Message::assistant("x"), Message::user("y")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("conversation roles must alternate"), "{err}");
    }

    #[test]
    fn hf_features_loop_trim_methods_and_generation_prompt() {
        // A ChatML-style template using loop variables, filters, Python methods,
        // whitespace control and the tojson filter.
        let src = "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}\
<|{{ m.role }}|>{{ m['content'] | trim }}{{ m.content.strip().upper()[:1] }}{{ eos_token }}\n\
{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}{{ {'a': [1, 'é']} | tojson }}";
        let t = ChatTemplate::new(src, tokens()).unwrap();
        let out = t
            .render(&[Message::user(" hi "), Message::assistant("yo")], true)
            .unwrap();
        assert_eq!(
            out,
            "<s><|user|>hiH</s>\n<|assistant|>yoY</s>\n<|assistant|>{\"a\": [1, \"é\"]}"
        );
    }

    #[test]
    fn syntax_errors_are_reported_at_construction() {
        let err = ChatTemplate::new("{% for m in messages %}", tokens()).unwrap_err();
        assert!(matches!(err, DataError::Template(_)), "{err}");
    }

    #[test]
    fn strftime_known_dates() {
        assert_eq!(strftime(0, "%d %b %Y %H:%M:%S"), "01 Jan 1970 00:00:00");
        // 2024-02-29 12:34:56 UTC.
        assert_eq!(
            strftime(1_709_210_096, "%Y-%m-%d %B %%"),
            "2024-02-29 February %"
        );
    }
}
