//! Tokenization with label masking: [`Encoder`] turns a [`Sample`] into
//! [`Tokenized`] `input_ids` + `labels`, where `labels` is a copy of the ids with
//! `-100` on every token that is not trained on (Hugging Face's convention; the model
//! shifts).
//!
//! Conversations are rendered with the chat template exactly as `transformers`'
//! `apply_chat_template(tokenize=True)` does, i.e. the template writes BOS/EOS itself
//! and the text is tokenized without adding special tokens, so the ids equal the
//! model's reference tokenization. The whole conversation is tokenized **once**; the
//! assistant turns are located as byte spans of the rendered text by rendering the
//! conversation prefix by prefix (`render(messages[..i], add_generation_prompt)` is
//! where turn `i` starts, `render(messages[..=i])` where it ends), and a token is
//! trained when its offsets overlap a span. Tokenizing once keeps token boundaries
//! identical to the reference (tokenizing the pieces separately would not, e.g. for
//! `▁` handling after special tokens), and a token straddling a boundary is counted
//! (it is trained, since it contains answer text).
//!
//! Templates that rewrite earlier turns when more follow (Mistral v0.3 moves the
//! system prompt into the *last* user turn) are handled by locating the start with a
//! sentinel answer, then by searching the answer text; if none works the sample is an
//! error rather than silently mis-masked.

use crate::error::{DataError, Result};
use crate::format::Sample;
use crate::template::{ChatTemplate, Message, SpecialTokens};
use qtrain_step::IGNORE_INDEX;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokenizers::Tokenizer;

/// One tokenized document. `labels[0]` is always [`IGNORE_INDEX`]: nothing in the
/// document precedes its first token, so it is never a target (this also keeps a
/// packed row from learning to predict the start of the next document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokenized {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Tokenized {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Tokens that carry a loss.
    pub fn trainable(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// A tokenizer, its chat template and special ids: everything needed to encode.
pub struct Encoder {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: u32,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_str(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The model's template: a string, or a list of named templates (use `default`).
fn model_template(cfg: &serde_json::Value) -> Option<String> {
    match cfg.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

impl Encoder {
    /// `tokenizer_config` is the content of `tokenizer_config.json`; `chat_template`
    /// is [`crate::DatasetConfig::chat_template`] (`auto`, `model`, `mistral` or a
    /// file path).
    pub fn new(
        tokenizer: Tokenizer,
        tokenizer_config: &serde_json::Value,
        chat_template: &str,
    ) -> Result<Self> {
        let bos = token_str(tokenizer_config, "bos_token").unwrap_or_else(|| "<s>".into());
        let eos = token_str(tokenizer_config, "eos_token").unwrap_or_else(|| "</s>".into());
        let pad = token_str(tokenizer_config, "pad_token");
        let tokens = SpecialTokens {
            unk: token_str(tokenizer_config, "unk_token"),
            pad: pad.clone(),
            bos: bos.clone(),
            eos: eos.clone(),
        };
        let template = match chat_template {
            "auto" => match model_template(tokenizer_config) {
                Some(src) => ChatTemplate::new(src, tokens)?,
                None => ChatTemplate::mistral(tokens),
            },
            "model" => ChatTemplate::new(
                model_template(tokenizer_config).ok_or(DataError::Config {
                    key: "chat_template",
                    message: "is `model` but tokenizer_config.json has no chat_template".into(),
                })?,
                tokens,
            )?,
            "mistral" => ChatTemplate::mistral(tokens),
            path => {
                let src = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
                ChatTemplate::new(src, tokens)?
            }
        };
        let bos_id = tokenizer.token_to_id(&bos);
        let eos_id = tokenizer.token_to_id(&eos);
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| pad.as_deref().and_then(|p| tokenizer.token_to_id(p)))
            .or(eos_id)
            .unwrap_or(0);
        Ok(Self {
            tokenizer,
            template,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// Reads `tokenizer.json` and `tokenizer_config.json` (optional) from a model
    /// directory.
    pub fn from_model_dir(dir: &Path, chat_template: &str) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tj)
            .map_err(|e| DataError::Tokenizer(format!("{}: {e}", tj.display())))?;
        let cj = dir.join("tokenizer_config.json");
        let cfg = match std::fs::read_to_string(&cj) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| DataError::Malformed {
                at: crate::error::Location {
                    file: cj.clone(),
                    kind: crate::error::LocationKind::Line,
                    index: e.line() as u64,
                },
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
            Err(e) => return Err(DataError::io(cj, e)),
        };
        Self::new(tokenizer, &cfg, chat_template)
    }

    /// The built-in tiny tokenizer with its Mistral template.
    pub fn tiny() -> Self {
        Self::new(
            crate::tiny_tokenizer::build_tiny_tokenizer(),
            &crate::tiny_tokenizer::tiny_tokenizer_config(),
            "auto",
        )
        .expect("the built-in tokenizer is consistent")
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }
    /// Filler for padded positions (never trained on, never attended to).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenizes text as the template produced it: special tokens in the text are
    /// parsed, none are added.
    pub fn tokenize_rendered(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.raw(text, false)?.get_ids().to_vec())
    }

    /// The ids a model is given to answer `messages` (generation prompt appended).
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.tokenize_rendered(&self.template.render(messages, true)?)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| DataError::Tokenizer(e.to_string()))
    }

    fn raw(&self, text: &str, add_special: bool) -> Result<tokenizers::Encoding> {
        self.tokenizer
            .encode(text, add_special)
            .map_err(|e| DataError::Tokenizer(e.to_string()))
    }

    /// Encodes one sample. Errors are the sample's (template refused it, assistant
    /// turn not found); the caller adds the record's location.
    pub fn encode(&self, sample: &Sample, train_on_prompt: bool) -> Result<Encoded> {
        match sample {
            Sample::Text(text) => {
                // Like `tokenizer(text)` (BOS from the post-processor) plus EOS, so
                // the model learns where a document ends.
                let mut ids = self.raw(text, true)?.get_ids().to_vec();
                if let Some(eos) = self.eos_id {
                    if ids.last() != Some(&eos) {
                        ids.push(eos);
                    }
                }
                let labels = ids.iter().map(|&t| t as i64).collect();
                Ok(Encoded::new(ids, labels, 0))
            }
            Sample::Chat(messages) => self.encode_chat(messages, train_on_prompt),
        }
    }

    fn encode_chat(&self, messages: &[Message], train_on_prompt: bool) -> Result<Encoded> {
        let full = self.template.render(messages, false)?;
        let enc = self.raw(&full, false)?;
        let ids = enc.get_ids().to_vec();
        if train_on_prompt {
            let labels = ids.iter().map(|&t| t as i64).collect();
            return Ok(Encoded::new(ids, labels, 0));
        }
        let mut spans = Vec::new();
        let mut from = 0;
        for i in 0..messages.len() {
            if messages[i].is_assistant() {
                let span = self.assistant_span(messages, i, &full, from)?;
                from = span.1;
                spans.push(span);
            }
        }
        let offsets = enc.get_offsets();
        let mut straddling = 0;
        let labels = ids
            .iter()
            .zip(offsets)
            .map(|(&id, &(s, e))| {
                let hit = spans.iter().find(|&&(a, b)| s < b && e > a && e > s);
                match hit {
                    Some(&(a, b)) => {
                        if s < a || e > b {
                            straddling += 1;
                        }
                        id as i64
                    }
                    None => IGNORE_INDEX,
                }
            })
            .collect();
        Ok(Encoded::new(ids, labels, straddling))
    }

    /// Byte span `[start, end)` of assistant turn `i` in the full rendering `full`.
    fn assistant_span(
        &self,
        messages: &[Message],
        i: usize,
        full: &str,
        from: usize,
    ) -> Result<(usize, usize)> {
        let t = &self.template;
        if let Ok(upto) = t.render(&messages[..=i], false) {
            if full.starts_with(&upto) && upto.len() >= from {
                let end = upto.len();
                if let Ok(prompt) = t.render(&messages[..i], true) {
                    if upto.starts_with(&prompt) && prompt.len() >= from {
                        return Ok((prompt.len(), end));
                    }
                }
                // The prompt rendering differs (e.g. the system message moved):
                // render this turn with a sentinel answer and see where it lands.
                const SENTINEL: &str = "\u{E000}qtrain\u{E001}";
                let mut probe = messages[..i].to_vec();
                probe.push(Message::assistant(SENTINEL));
                if let Ok(r) = t.render(&probe, false) {
                    if let Some(pos) = r.find(SENTINEL) {
                        if pos >= from
                            && pos <= end
                            && r.as_bytes()[..pos] == upto.as_bytes()[..pos]
                        {
                            return Ok((pos, end));
                        }
                    }
                }
            }
        }
        // Last resort: find the answer text itself (and the EOS right after it).
        let content = &messages[i].content;
        for needle in [content.as_str(), content.trim()] {
            if needle.is_empty() {
                continue;
            }
            if let Some(p) = full.get(from..).and_then(|rest| rest.find(needle)) {
                let start = from + p;
                let mut end = start + needle.len();
                if full[end..].starts_with(&t.special_tokens().eos) {
                    end += t.special_tokens().eos.len();
                }
                return Ok((start, end));
            }
        }
        Err(DataError::Template(format!(
            "cannot locate assistant message {i} in the rendered conversation, so the prompt \
             cannot be masked (set train_on_prompt = true or use a template that renders \
             answers verbatim)"
        )))
    }
}

/// An encoded sample and how many of its tokens straddled a prompt/answer boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub tokens: Tokenized,
    pub straddling: usize,
}

impl Encoded {
    fn new(input_ids: Vec<u32>, mut labels: Vec<i64>, straddling: usize) -> Self {
        if let Some(first) = labels.first_mut() {
            *first = IGNORE_INDEX;
        }
        Self {
            tokens: Tokenized { input_ids, labels },
            straddling,
        }
    }
}
