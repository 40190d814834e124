//! The tokenizer as llama.cpp reads it (`tokenizer.ggml.*` and
//! `tokenizer.chat_template`), built from a Hugging Face model directory's
//! `tokenizer.json`, `tokenizer_config.json` and `config.json` the way llama.cpp's
//! converter (`convert_hf_to_gguf.py` with gguf-py's `SpecialVocab`) builds it.
//!
//! Two tokenizer kinds cover the families qtrain trains:
//!
//! * **SentencePiece BPE** (Mistral, Llama 2: a `tokenizer.json` BPE with byte
//!   fallback and the `▁` space marker) becomes tokenizer model `llama`: the
//!   pieces, their scores and token types. llama.cpp's SentencePiece tokenizer merges
//!   the adjacent pair whose result has the highest score, so each piece's score is
//!   minus the rank of the first merge that produces it: the same order the BPE merges
//!   of `tokenizer.json` (written by transformers from the SentencePiece scores)
//!   apply. Byte tokens `<0xXX>` are type BYTE, the unknown token UNKNOWN, special
//!   added tokens CONTROL.
//! * **Byte-level BPE** (Llama 3, Qwen) becomes tokenizer model `gpt2`: the tokens,
//!   the merges and the pre-tokenizer type (`tokenizer.ggml.pre`), recognised from
//!   the pre-tokenizer's split regex (llama.cpp implements each known regex under a
//!   name; an unknown one is refused, since llama.cpp would split text differently;
//!   a `ByteLevel` pre-tokenizer splitting with its own regex is GPT-2's, `gpt-2`).
//!
//! Special token ids come from `tokenizer_config.json` (`bos_token`, ...) matched
//! against the added tokens, then `config.json`'s `*_token_id`; whether BOS/EOS are
//! added from the post-processor, then `add_bos_token`/`add_eos_token` (gguf-py's
//! precedence).

use crate::error::GgufError;
use crate::writer::{Metadata, Value};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// llama.cpp's token types (`llama_token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// The SentencePiece word-boundary marker.
const SPACE_MARKER: char = '\u{2581}';

/// The pre-tokenizer split regexes llama.cpp implements, as they appear in
/// `tokenizer.json`, with the `tokenizer.ggml.pre` name that selects them.
const KNOWN_PRE: &[(&str, &str)] = &[
    (
        // Llama 3 / 3.1 / 3.2
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "llama-bpe",
    ),
    (
        // Qwen 2 / 2.5 / 3
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "qwen2",
    ),
];

/// What the tokenizer files say, ready to be written as metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTokenizer {
    /// `llama` or `gpt2`.
    pub model: &'static str,
    /// `default` for SentencePiece, the pre-tokenizer name for byte-level BPE.
    pub pre: String,
    pub tokens: Vec<String>,
    /// SentencePiece only.
    pub scores: Option<Vec<f32>>,
    pub token_types: Vec<i32>,
    /// Byte-level BPE only, as `"left right"`.
    pub merges: Option<Vec<String>>,
    /// `bos`, `eos`, `unk`, `sep`, `pad`, `cls`, `mask` ids, in that order.
    pub special_ids: Vec<(&'static str, u32)>,
    /// `add_bos`, `add_eos` (and `add_sep`) flags.
    pub add_special: Vec<(&'static str, bool)>,
    /// SentencePiece only: whether a space is put in front of the text.
    pub add_space_prefix: Option<bool>,
    /// The chat template(s): `(name, template)`, `default` first when present.
    pub chat_templates: Vec<(String, String)>,
}

const SPECIAL_TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

fn read_json(path: &Path) -> Result<Json, GgufError> {
    let text = std::fs::read_to_string(path).map_err(|e| GgufError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| GgufError::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

fn read_json_opt(path: &Path) -> Result<Option<Json>, GgufError> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// The text of a `tokenizer_config.json` token entry (a string or `{content}`).
fn token_text(v: Option<&Json>) -> Option<&str> {
    match v? {
        Json::String(s) => Some(s),
        Json::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

/// llama.cpp's converter marks some added tokens CONTROL even when they are not
/// flagged special (`does_token_look_special`).
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

fn is_byte_token(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && b[3].is_ascii_hexdigit()
        && b[4].is_ascii_hexdigit()
}

/// Every component of a (possibly `Sequence`) normalizer / pre-tokenizer /
/// post-processor / decoder object.
fn components<'a>(v: Option<&'a Json>, list_key: &str) -> Vec<&'a Json> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Vec::new();
    };
    match v.get("type").and_then(Json::as_str) {
        Some("Sequence") => v
            .get(list_key)
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .flat_map(|c| components(Some(c), list_key))
                    .collect()
            })
            .unwrap_or_default(),
        _ => vec![v],
    }
}

fn type_of(v: &Json) -> &str {
    v.get("type").and_then(Json::as_str).unwrap_or("")
}

/// Reads the tokenizer of the model in `dir`; `n_vocab` is the model's
/// `vocab_size` (the embedding rows), which may exceed the tokenizer's tokens.
pub fn read_tokenizer(dir: &Path, n_vocab: usize) -> Result<GgufTokenizer, GgufError> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(GgufError::Tokenizer {
            path: tok_path,
            msg: "missing (the GGUF export needs the fast-tokenizer file tokenizer.json)".into(),
        });
    }
    let tj = read_json(&tok_path)?;
    let tc = read_json_opt(&dir.join("tokenizer_config.json"))?;
    let cfg = read_json_opt(&dir.join("config.json"))?;
    let bad = |msg: String| GgufError::Tokenizer {
        path: tok_path.clone(),
        msg,
    };

    let model = tj.get("model").ok_or_else(|| bad("no `model`".into()))?;
    if type_of(model) != "BPE" {
        return Err(bad(format!(
            "model type `{}`: qtrain exports BPE tokenizers (SentencePiece-style with \
             byte fallback, or byte-level) to GGUF",
            type_of(model)
        )));
    }
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let merges = parse_merges(model.get("merges")).map_err(bad)?;
    let added: Vec<AddedToken> = tj
        .get("added_tokens")
        .and_then(Json::as_array)
        .map(|a| a.iter().filter_map(AddedToken::from_json).collect())
        .unwrap_or_default();

    let pre_parts = components(tj.get("pre_tokenizer"), "pretokenizers");
    let norm_parts = components(tj.get("normalizer"), "normalizers");
    let byte_level = pre_parts.iter().any(|p| type_of(p) == "ByteLevel");
    let metaspace = pre_parts.iter().find(|p| type_of(p) == "Metaspace");
    let norm_marker = norm_parts.iter().any(|n| {
        type_of(n) == "Replace" && n.get("content").and_then(Json::as_str) == Some("\u{2581}")
    });
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(Json::as_bool)
        .unwrap_or(false);

    // The ids: the vocabulary, the added tokens (which may extend it), and the
    // embedding rows beyond both.
    let mut max_id = 0usize;
    let mut by_id: HashMap<usize, String> = HashMap::new();
    for (t, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab entry `{t}`: id is not a number")))?
            as usize;
        max_id = max_id.max(id);
        by_id.insert(id, t.clone());
    }
    for a in &added {
        max_id = max_id.max(a.id);
    }
    if max_id >= n_vocab {
        return Err(bad(format!(
            "token id {max_id} is beyond the model's vocab_size {n_vocab}"
        )));
    }

    let spm = !byte_level && byte_fallback && (metaspace.is_some() || norm_marker);
    let mut out = if spm {
        sentencepiece_vocab(model, &by_id, &added, &merges, n_vocab, tc.as_ref())
    } else if byte_level {
        let pre = byte_level_pre(&pre_parts).map_err(bad)?;
        byte_level_vocab(&by_id, &added, merges, n_vocab, pre)
    } else {
        return Err(bad(
            "neither a SentencePiece-style BPE (byte fallback with the \u{2581} marker) \
             nor a byte-level BPE: llama.cpp has no tokenizer qtrain can map it to"
                .into(),
        ));
    };
    if spm {
        // llama.cpp's `add_space_prefix` puts a space before every stretch of text
        // that follows a special token (SentencePiece's legacy behaviour, and what
        // a `Prepend("▁")` normalizer or Metaspace's `always` scheme do). Metaspace's
        // `first` scheme (Mistral v0.3, transformers' `legacy: false`) marks only
        // the very start of the input, so text after `[INST]` gets no extra space:
        // without the prefix llama.cpp tokenizes chat prompts (which start with
        // special tokens) exactly as transformers does.
        let mut prefix = match metaspace {
            Some(m) => match m.get("prepend_scheme").and_then(Json::as_str) {
                Some(scheme) => scheme == "always",
                // Older tokenizers.json: `add_prefix_space` (always when true).
                None => m.get("add_prefix_space").and_then(Json::as_bool) != Some(false),
            },
            None => norm_parts.iter().any(|n| type_of(n) == "Prepend"),
        };
        if let Some(p) = tc
            .as_ref()
            .and_then(|c| c.get("add_prefix_space"))
            .and_then(Json::as_bool)
        {
            prefix = p;
        }
        out.add_space_prefix = Some(prefix);
    }
    special_vocab(&mut out, &tj, &added, tc.as_ref(), cfg.as_ref(), dir, spm)?;
    Ok(out)
}

#[derive(Debug, Clone)]
struct AddedToken {
    id: usize,
    content: String,
    special: bool,
}

impl AddedToken {
    fn from_json(v: &Json) -> Option<Self> {
        Some(Self {
            id: v.get("id")?.as_u64()? as usize,
            content: v.get("content")?.as_str()?.to_string(),
            special: v.get("special").and_then(Json::as_bool).unwrap_or(false),
        })
    }
}

/// `model.merges` as `"left right"` strings; pairs (transformers ≥ 4.45) whose
/// parts contain spaces get them as U+0120, as gguf-py encodes them.
fn parse_merges(v: Option<&Json>) -> Result<Vec<String>, String> {
    let Some(arr) = v.and_then(Json::as_array) else {
        return Ok(Vec::new());
    };
    arr.iter()
        .enumerate()
        .map(|(i, m)| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => {
                let part = |j: usize| {
                    p[j].as_str()
                        .map(|s| s.replace(' ', "\u{0120}"))
                        .ok_or_else(|| format!("merge {i}: not a pair of strings"))
                };
                Ok(format!("{} {}", part(0)?, part(1)?))
            }
            _ => Err(format!("merge {i}: neither \"a b\" nor [a, b]")),
        })
        .collect()
}

fn sentencepiece_vocab(
    model: &Json,
    by_id: &HashMap<usize, String>,
    added: &[AddedToken],
    merges: &[String],
    n_vocab: usize,
    tc: Option<&Json>,
) -> GgufTokenizer {
    use token_type::*;
    let unk = model.get("unk_token").and_then(Json::as_str);
    // Score of a piece: minus the rank of the first merge producing it.
    let mut rank: HashMap<String, usize> = HashMap::new();
    for (r, m) in merges.iter().enumerate() {
        if let Some((a, b)) = m.split_once(' ') {
            rank.entry(format!("{a}{b}")).or_insert(r);
        }
    }
    let mut tokens = Vec::with_capacity(n_vocab);
    let mut scores = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    for i in 0..n_vocab {
        match by_id.get(&i) {
            Some(t) => {
                let ty = if Some(t.as_str()) == unk {
                    UNKNOWN
                } else if is_byte_token(t) {
                    BYTE
                } else {
                    NORMAL
                };
                let score = match (ty, rank.get(t)) {
                    (NORMAL, Some(&r)) => -(r as f32),
                    _ => 0.0,
                };
                tokens.push(t.clone());
                scores.push(score);
                types.push(ty);
            }
            None => {
                tokens.push(format!("[PAD{i}]"));
                scores.push(-1000.0);
                types.push(UNUSED);
            }
        }
    }
    // Added tokens as the converter treats tokenizer_config's added_tokens_decoder:
    // special ones CONTROL, the others USER_DEFINED with the marker as a space.
    let decoder = tc
        .and_then(|c| c.get("added_tokens_decoder"))
        .and_then(Json::as_object);
    for a in added {
        let special = decoder
            .and_then(|d| d.get(&a.id.to_string()))
            .and_then(|e| e.get("special"))
            .and_then(Json::as_bool)
            .unwrap_or(a.special);
        if Some(a.content.as_str()) == unk {
            continue;
        }
        if special || looks_special(&a.content) {
            tokens[a.id] = a.content.clone();
            types[a.id] = CONTROL;
        } else {
            tokens[a.id] = a.content.replace(SPACE_MARKER, " ");
            types[a.id] = USER_DEFINED;
        }
        scores[a.id] = -1000.0;
    }
    GgufTokenizer {
        model: "llama",
        pre: "default".into(),
        tokens,
        scores: Some(scores),
        token_types: types,
        merges: None,
        special_ids: Vec::new(),
        add_special: Vec::new(),
        add_space_prefix: None,
        chat_templates: Vec::new(),
    }
}

/// The `tokenizer.ggml.pre` name of a byte-level BPE's pre-tokenizer.
fn byte_level_pre(parts: &[&Json]) -> Result<String, String> {
    let splits: Vec<&str> = parts
        .iter()
        .filter(|p| type_of(p) == "Split")
        .filter_map(|p| p.get("pattern")?.get("Regex")?.as_str())
        .collect();
    match splits.as_slice() {
        [regex] => KNOWN_PRE
            .iter()
            .find(|(r, _)| r == regex)
            .map(|(_, name)| name.to_string())
            .ok_or_else(|| {
                format!(
                    "the pre-tokenizer's split regex {regex:?} is not one llama.cpp implements \
                     (known: Llama 3's, Qwen 2's); llama.cpp would split text differently"
                )
            }),
        // ByteLevel splitting with its own regex is GPT-2's, which llama.cpp knows
        // as `gpt-2`.
        [] if parts.iter().any(|p| {
            type_of(p) == "ByteLevel" && p.get("use_regex").and_then(Json::as_bool) != Some(false)
        }) =>
        {
            Ok("gpt-2".into())
        }
        [] => Err(
            "a byte-level BPE that splits text without a regex: llama.cpp has no such \
                   pre-tokenizer"
                .into(),
        ),
        _ => Err(format!(
            "{} split regexes in the pre-tokenizer; llama.cpp's known ones have one",
            splits.len()
        )),
    }
}

fn byte_level_vocab(
    by_id: &HashMap<usize, String>,
    added: &[AddedToken],
    merges: Vec<String>,
    n_vocab: usize,
    pre: String,
) -> GgufTokenizer {
    use token_type::*;
    let mut tokens = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    for i in 0..n_vocab {
        match by_id.get(&i) {
            Some(t) => {
                tokens.push(t.clone());
                types.push(NORMAL);
            }
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(UNUSED);
            }
        }
    }
    for a in added {
        tokens[a.id] = a.content.clone();
        types[a.id] = if a.special || looks_special(&a.content) {
            CONTROL
        } else {
            USER_DEFINED
        };
    }
    GgufTokenizer {
        model: "gpt2",
        pre,
        tokens,
        scores: None,
        token_types: types,
        merges: Some(merges),
        special_ids: Vec::new(),
        add_special: Vec::new(),
        add_space_prefix: None,
        chat_templates: Vec::new(),
    }
}

/// gguf-py's `SpecialVocab`: special ids, add-BOS/EOS flags and the chat template.
fn special_vocab(
    out: &mut GgufTokenizer,
    tj: &Json,
    added: &[AddedToken],
    tc: Option<&Json>,
    cfg: Option<&Json>,
    dir: &Path,
    spm: bool,
) -> Result<(), GgufError> {
    let mut add: Vec<(&'static str, bool)> = Vec::new();
    let set_add =
        |add: &mut Vec<(&'static str, bool)>, k: &'static str, v: bool, force: bool| match add
            .iter_mut()
            .find(|(n, _)| *n == k)
        {
            Some(e) if force => e.1 = v,
            Some(_) => {}
            None => add.push((k, v)),
        };
    let tc_text = |k: &str| token_text(tc.and_then(|c| c.get(k)));
    let bos_text = tc_text("bos_token");
    let eos_text = tc_text("eos_token");
    for p in components(tj.get("post_processor"), "processors") {
        match type_of(p) {
            "ByteLevel" => {
                set_add(&mut add, "bos", false, false);
                set_add(&mut add, "eos", false, false);
            }
            "TemplateProcessing" => {
                let single = p.get("single").and_then(Json::as_array);
                let special = |e: Option<&Json>| {
                    e.and_then(|e| e.get("SpecialToken"))
                        .and_then(|s| s.get("id"))
                        .and_then(Json::as_str)
                        .map(str::to_string)
                };
                if let Some(single) = single.filter(|s| s.len() > 1) {
                    if let Some(first) = special(single.first()) {
                        let is_bos = bos_text.is_none_or(|b| b == first);
                        set_add(&mut add, "bos", is_bos, true);
                    }
                    if let Some(last) = special(single.last()) {
                        set_add(&mut add, "eos", eos_text == Some(last.as_str()), true);
                    }
                }
            }
            _ => {}
        }
    }
    let mut ids: Vec<(&'static str, u32)> = Vec::new();
    let n = out.tokens.len();
    let mut set_id = |typ: &'static str, id: Option<u64>| {
        if let Some(id) = id {
            if (!spm || (id as usize) < n) && !ids.iter().any(|(t, _)| *t == typ) {
                ids.push((typ, id as u32));
            }
        }
    };
    if let Some(tc) = tc {
        for typ in SPECIAL_TYPES {
            if let Some(b) = tc.get(format!("add_{typ}_token")).and_then(Json::as_bool) {
                set_add(&mut add, typ, b, false);
            }
            if let Some(text) = token_text(tc.get(format!("{typ}_token"))) {
                let id = added
                    .iter()
                    .find(|a| a.content == text)
                    .map(|a| a.id as u64);
                set_id(typ, id);
            }
        }
    }
    if let Some(cfg) = cfg {
        for typ in SPECIAL_TYPES {
            set_id(
                typ,
                cfg.get(format!("{typ}_token_id")).and_then(Json::as_u64),
            );
        }
    }
    // gguf-py writes ids and flags in the order the types are listed.
    ids.sort_by_key(|(t, _)| SPECIAL_TYPES.iter().position(|s| s == t));
    add.retain(|(t, _)| ["bos", "eos", "sep"].contains(t));
    out.special_ids = ids;
    out.add_special = add;
    out.chat_templates = chat_templates(tc, dir)?;
    Ok(())
}

/// The chat template: `tokenizer_config.json`'s `chat_template` (a string or a list
/// of `{name, template}`), else `chat_template.jinja` / `chat_template.json`.
fn chat_templates(tc: Option<&Json>, dir: &Path) -> Result<Vec<(String, String)>, GgufError> {
    let from_value = |v: &Json, path: PathBuf| -> Result<Vec<(String, String)>, GgufError> {
        match v {
            Json::String(s) => Ok(vec![("default".into(), s.clone())]),
            Json::Array(list) => {
                let mut out = Vec::new();
                for c in list {
                    let name = c.get("name").and_then(Json::as_str).unwrap_or("");
                    let name: String = name
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                        .collect();
                    if let (false, Some(t)) =
                        (name.is_empty(), c.get("template").and_then(Json::as_str))
                    {
                        out.push((name, t.to_string()));
                    }
                }
                out.sort_by_key(|(n, _)| n != "default");
                Ok(out)
            }
            Json::Null => Ok(Vec::new()),
            _ => Err(GgufError::Field {
                path,
                key: "chat_template".into(),
                msg: "neither a string nor a list of {name, template}".into(),
            }),
        }
    };
    if let Some(v) = tc.and_then(|c| c.get("chat_template")) {
        return from_value(v, dir.join("tokenizer_config.json"));
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let t = std::fs::read_to_string(&jinja).map_err(|e| GgufError::io(&jinja, e))?;
        return Ok(vec![("default".into(), t)]);
    }
    let json = dir.join("chat_template.json");
    if let Some(v) = read_json_opt(&json)? {
        if let Some(t) = v.get("chat_template") {
            return from_value(t, json);
        }
    }
    Ok(Vec::new())
}

impl GgufTokenizer {
    pub fn special_id(&self, typ: &str) -> Option<u32> {
        self.special_ids
            .iter()
            .find(|(t, _)| *t == typ)
            .map(|(_, id)| *id)
    }

    /// The default chat template, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_templates
            .iter()
            .find(|(n, _)| n == "default")
            .map(|(_, t)| t.as_str())
    }

    /// Writes the `tokenizer.*` keys in the converter's order.
    pub fn write_metadata(&self, md: &mut Metadata) {
        md.set_str("tokenizer.ggml.model", self.model);
        md.set_str("tokenizer.ggml.pre", self.pre.clone());
        md.set(
            "tokenizer.ggml.tokens",
            Value::ArrayString(self.tokens.clone()),
        );
        if let Some(s) = &self.scores {
            md.set("tokenizer.ggml.scores", Value::ArrayF32(s.clone()));
        }
        md.set(
            "tokenizer.ggml.token_type",
            Value::ArrayI32(self.token_types.clone()),
        );
        if let Some(m) = &self.merges {
            md.set("tokenizer.ggml.merges", Value::ArrayString(m.clone()));
        }
        for (typ, id) in &self.special_ids {
            let key = match *typ {
                "unk" => "tokenizer.ggml.unknown_token_id".to_string(),
                "sep" => "tokenizer.ggml.seperator_token_id".to_string(),
                "pad" => "tokenizer.ggml.padding_token_id".to_string(),
                t => format!("tokenizer.ggml.{t}_token_id"),
            };
            md.set_u32(&key, *id);
        }
        for (typ, v) in &self.add_special {
            md.set_bool(&format!("tokenizer.ggml.add_{typ}_token"), *v);
        }
        if let Some(p) = self.add_space_prefix {
            md.set_bool("tokenizer.ggml.add_space_prefix", p);
        }
        let named: Vec<String> = self
            .chat_templates
            .iter()
            .filter(|(n, _)| n != "default")
            .map(|(n, _)| n.clone())
            .collect();
        for (name, t) in &self.chat_templates {
            if name != "default" {
                md.set_str(&format!("tokenizer.chat_template.{name}"), t.clone());
            }
        }
        if !named.is_empty() {
            md.set("tokenizer.chat_templates", Value::ArrayString(named));
        }
        if let Some(t) = self.chat_template() {
            md.set_str("tokenizer.chat_template", t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    fn write(dir: &Path, tj: &Json, tc: &Json, cfg: &Json) {
        std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    }

    fn byte_level(regex: &str, post: Json) -> Json {
        json!({
            "added_tokens": [
                {"id": 6, "content": "<|begin_of_text|>", "special": true},
                {"id": 7, "content": "<|eot_id|>", "special": true},
                {"id": 8, "content": "hello world", "special": false},
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]},
            "post_processor": post,
            "model": {"type": "BPE", "ignore_merges": true, "byte_fallback": false,
                "vocab": {"a": 0, "b": 0x1, "Ġ": 2, "ab": 3, "Ġa": 4, "a b": 5},
                "merges": [["a", "b"], ["Ġ", "a"], ["a", " b"]]}
        })
    }

    #[test]
    fn llama3_byte_level_bpe() {
        let d = tempfile::tempdir().unwrap();
        let post = json!({"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing", "single": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}], "pair": [], "special_tokens": {}}
        ]});
        write(
            d.path(),
            &byte_level(LLAMA3_SPLIT, post),
            &json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": "T"}),
            &json!({"bos_token_id": 6, "eos_token_id": [7, 9]}),
        );
        let t = read_tokenizer(d.path(), 12).unwrap();
        assert_eq!(t.model, "gpt2");
        assert_eq!(t.pre, "llama-bpe");
        assert_eq!(t.tokens.len(), 12);
        assert_eq!(t.tokens[4], "Ġa");
        assert_eq!(t.tokens[9], "[PAD9]");
        use token_type::*;
        assert_eq!(
            &t.token_types[..10],
            &[
                NORMAL,
                NORMAL,
                NORMAL,
                NORMAL,
                NORMAL,
                NORMAL,
                CONTROL,
                CONTROL,
                USER_DEFINED,
                UNUSED
            ]
        );
        // A space inside a merge part is written as U+0120, as gguf-py does.
        assert_eq!(t.merges.as_deref().unwrap(), &["a b", "Ġ a", "a \u{120}b"]);
        assert_eq!(t.special_ids, vec![("bos", 6), ("eos", 7)]);
        assert_eq!(t.add_special, vec![("bos", true), ("eos", false)]);
        assert!(t.scores.is_none() && t.add_space_prefix.is_none());
        assert_eq!(t.chat_template(), Some("T"));
        let mut md = Metadata::new();
        t.write_metadata(&mut md);
        assert_eq!(
            md.get("tokenizer.ggml.pre"),
            Some(&Value::String("llama-bpe".into()))
        );
        assert_eq!(md.get("tokenizer.ggml.bos_token_id"), Some(&Value::U32(6)));
        assert_eq!(
            md.get("tokenizer.chat_template"),
            Some(&Value::String("T".into()))
        );
    }

    #[test]
    fn qwen_pre_tokenizer_and_unknown_regexes() {
        let d = tempfile::tempdir().unwrap();
        let qwen = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}");
        let post = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        let tc = json!({"bos_token": null, "eos_token": "<|eot_id|>",
            "chat_template": [{"name": "default", "template": "D"}, {"name": "tool use", "template": "U"}]});
        write(
            d.path(),
            &byte_level(&qwen, post.clone()),
            &tc,
            &json!({"eos_token_id": 7}),
        );
        let t = read_tokenizer(d.path(), 9).unwrap();
        assert_eq!(t.pre, "qwen2");
        assert_eq!(t.add_special, vec![("bos", false), ("eos", false)]);
        assert_eq!(t.special_ids, vec![("eos", 7)]);
        assert_eq!(
            t.chat_templates,
            vec![
                ("default".into(), "D".into()),
                ("tool_use".into(), "U".into())
            ]
        );
        let mut md = Metadata::new();
        t.write_metadata(&mut md);
        assert_eq!(
            md.get("tokenizer.chat_template.tool_use"),
            Some(&Value::String("U".into()))
        );
        assert_eq!(
            md.get("tokenizer.chat_templates"),
            Some(&Value::ArrayString(vec!["tool_use".into()]))
        );

        // ByteLevel with its built-in regex (no Split): GPT-2's pre-tokenizer.
        let mut gpt2 = byte_level(&qwen, post.clone());
        gpt2["pre_tokenizer"] =
            json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        write(d.path(), &gpt2, &tc, &json!({}));
        assert_eq!(read_tokenizer(d.path(), 9).unwrap().pre, "gpt-2");
        gpt2["pre_tokenizer"]["use_regex"] = false.into();
        write(d.path(), &gpt2, &tc, &json!({}));
        let e = read_tokenizer(d.path(), 9).unwrap_err().to_string();
        assert!(e.contains("without a regex"), "{e}");

        write(d.path(), &byte_level(r"\s+|\w+", post), &tc, &json!({}));
        let e = read_tokenizer(d.path(), 9).unwrap_err().to_string();
        assert!(e.contains("not one llama.cpp implements"), "{e}");
        // A token id beyond vocab_size is refused.
        let e = read_tokenizer(d.path(), 8).unwrap_err().to_string();
        assert!(e.contains("beyond the model's vocab_size 8"), "{e}");
    }

    #[test]
    fn sentencepiece_scores_follow_the_merge_ranks() {
        let d = tempfile::tempdir().unwrap();
        let tj = json!({
            "added_tokens": [
                {"id": 0, "content": "<unk>", "special": true},
                {"id": 1, "content": "<s>", "special": true},
                {"id": 2, "content": "</s>", "special": true},
                {"id": 3, "content": "[INST]", "special": true},
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false},
            "post_processor": {"type": "TemplateProcessing", "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]},
            "model": {"type": "BPE", "byte_fallback": true, "unk_token": "<unk>",
                "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "<0x0A>": 4,
                          "\u{2581}": 5, "a": 6, "b": 7, "ab": 8, "\u{2581}a": 9, "\u{2581}ab": 10},
                "merges": ["\u{2581} a", "a b", "\u{2581}a b", "\u{2581} ab"]}
        });
        let tc = json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": true, "add_eos_token": false,
            "added_tokens_decoder": {"3": {"content": "[INST]", "special": true}}});
        write(
            d.path(),
            &tj,
            &tc,
            &json!({"bos_token_id": 1, "eos_token_id": 2}),
        );
        let t = read_tokenizer(d.path(), 12).unwrap();
        assert_eq!(t.model, "llama");
        assert_eq!(t.pre, "default");
        use token_type::*;
        assert_eq!(
            t.token_types,
            vec![
                UNKNOWN, CONTROL, CONTROL, CONTROL, BYTE, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL,
                NORMAL, UNUSED
            ]
        );
        let s = t.scores.as_deref().unwrap();
        // ▁a first (rank 0), ab (1), ▁ab (2, its first merge); single pieces 0.
        assert_eq!((s[9], s[8], s[10]), (-0.0, -1.0, -2.0));
        assert_eq!((s[5], s[6]), (0.0, 0.0));
        assert_eq!(s[1], -1000.0);
        assert_eq!(t.special_ids, vec![("bos", 1), ("eos", 2), ("unk", 0)]);
        assert_eq!(t.add_special, vec![("bos", true), ("eos", false)]);
        assert_eq!(t.add_space_prefix, Some(false), "Metaspace `first`");
        let mut tj = tj;
        tj["pre_tokenizer"]["prepend_scheme"] = "always".into();
        write(d.path(), &tj, &tc, &json!({}));
        assert_eq!(
            read_tokenizer(d.path(), 12).unwrap().add_space_prefix,
            Some(true)
        );
        tj["pre_tokenizer"] = Json::Null;
        tj["normalizer"] = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]});
        write(d.path(), &tj, &tc, &json!({}));
        let t = read_tokenizer(d.path(), 12).unwrap();
        assert_eq!(
            (t.model, t.add_space_prefix),
            ("llama", Some(true)),
            "Llama 2 legacy"
        );
    }
}
