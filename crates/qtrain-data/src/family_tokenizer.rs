//! Built-in tokenizers of the Llama 3 and Qwen families, for the random models of
//! those families (`builtin:tiny-llama3`, `init-random --preset qwen2.5-7b`, ...).
//!
//! Nothing can be downloaded, so like [`crate::tiny_tokenizer`] (the
//! sentencepiece-style one of Mistral and Llama 2) these are real
//! [`tokenizers::Tokenizer`]s built in code, shaped like the family's own
//! `tokenizer.json` with a small vocabulary:
//!
//! * byte-level BPE (GPT-2's byte-to-unicode alphabet, so any UTF-8 text encodes
//!   without an unknown token) with a few merges (`Ġ` + lowercase letter and some
//!   frequent pairs), the `ByteLevel` pre-tokenizer and decoder;
//! * the family's special tokens with their real names and relative order: Llama 3's
//!   `<|begin_of_text|>`, `<|end_of_text|>`, `<|start_header_id|>`,
//!   `<|end_header_id|>`, `<|eom_id|>`, `<|eot_id|>`, `<|python_tag|>`, ...; Qwen's
//!   `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, the tool tokens and (Qwen 3)
//!   `<think>` / `</think>`, which are added but not special, as in Qwen's files;
//! * Llama 3 prepends `<|begin_of_text|>`; Qwen adds nothing (no BOS).
//!
//! The specials sit at `special_base + offset`, the offsets of the real
//! tokenizers (Llama 3: `<|eot_id|>` is base + 9; Qwen: `<|im_end|>` is base + 2).
//! The tiny presets use base 0 (specials first, then the byte alphabet); the
//! real-size presets use the real base (128000, 151643), so their config's
//! `bos_token_id` and `eos_token_id` name the right tokens.
//!
//! `tokenizer_config.json` carries the model's real chat template, verbatim from the
//! model's own `tokenizer_config.json` (files under `src/templates/`), and its real
//! `bos_token` / `eos_token` / `pad_token`.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// Llama 3.1 (and 3.3) Instruct's chat template.
pub const LLAMA_31_CHAT_TEMPLATE: &str = include_str!("templates/llama-3.1.jinja");
/// Llama 3.2 Instruct's chat template (the date from `strftime_now`).
pub const LLAMA_32_CHAT_TEMPLATE: &str = include_str!("templates/llama-3.2.jinja");
/// Qwen 2.5 Instruct's chat template (ChatML with a default system message).
pub const QWEN_25_CHAT_TEMPLATE: &str = include_str!("templates/qwen2.5.jinja");
/// Qwen 3's chat template (ChatML; `<think>` blocks of the last turn kept).
pub const QWEN_3_CHAT_TEMPLATE: &str = include_str!("templates/qwen3.jinja");

/// Which family's tokenizer and template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinTokenizer {
    /// Llama 3.0/3.1/3.3 Instruct.
    Llama31,
    /// Llama 3.2 Instruct (1B, 3B).
    Llama32,
    /// Qwen 2 / 2.5 Instruct.
    Qwen25,
    /// Qwen 3.
    Qwen3,
}

/// Llama 3's first 11 special tokens, at `128000 + index` in the real tokenizer.
pub const LLAMA3_SPECIALS: [&str; 11] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
];

/// Qwen's added tokens, at `151643 + index`; `true` for the special ones.
pub const QWEN_ADDED: [(&str, bool); 26] = [
    ("<|endoftext|>", true),
    ("<|im_start|>", true),
    ("<|im_end|>", true),
    ("<|object_ref_start|>", true),
    ("<|object_ref_end|>", true),
    ("<|box_start|>", true),
    ("<|box_end|>", true),
    ("<|quad_start|>", true),
    ("<|quad_end|>", true),
    ("<|vision_start|>", true),
    ("<|vision_end|>", true),
    ("<|vision_pad|>", true),
    ("<|image_pad|>", true),
    ("<|video_pad|>", true),
    ("<tool_call>", false),
    ("</tool_call>", false),
    ("<|fim_prefix|>", false),
    ("<|fim_middle|>", false),
    ("<|fim_suffix|>", false),
    ("<|fim_pad|>", false),
    ("<|repo_name|>", false),
    ("<|file_sep|>", false),
    ("<tool_response>", false),
    ("</tool_response>", false),
    ("<think>", false),
    ("</think>", false),
];

/// Qwen 2.5 has the first 22 (up to `<|file_sep|>`); Qwen 3 all 26.
const QWEN_25_ADDED: usize = 22;

impl BuiltinTokenizer {
    /// `(token, special)` in id order from `special_base`.
    fn added(self) -> Vec<(&'static str, bool)> {
        match self {
            Self::Llama31 | Self::Llama32 => LLAMA3_SPECIALS.iter().map(|t| (*t, true)).collect(),
            Self::Qwen25 => QWEN_ADDED[..QWEN_25_ADDED].to_vec(),
            Self::Qwen3 => QWEN_ADDED.to_vec(),
        }
    }

    fn is_llama(self) -> bool {
        matches!(self, Self::Llama31 | Self::Llama32)
    }

    /// The chat template of the family's Instruct model.
    pub fn chat_template(self) -> &'static str {
        match self {
            Self::Llama31 => LLAMA_31_CHAT_TEMPLATE,
            Self::Llama32 => LLAMA_32_CHAT_TEMPLATE,
            Self::Qwen25 => QWEN_25_CHAT_TEMPLATE,
            Self::Qwen3 => QWEN_3_CHAT_TEMPLATE,
        }
    }

    /// `(bos_token_id, eos_token_id)` for a model config: Llama 3's
    /// `<|begin_of_text|>` and `<|eot_id|>`; Qwen's `<|endoftext|>` and `<|im_end|>`.
    pub fn bos_eos_ids(self, special_base: u32) -> (u32, u32) {
        if self.is_llama() {
            (special_base, special_base + 9)
        } else {
            (special_base, special_base + 2)
        }
    }
}

/// GPT-2's reversible byte-to-unicode map: printable Latin-1 bytes stand for
/// themselves, the others (controls, space) for `U+0100` onwards (space is `Ġ`).
pub fn bytes_to_unicode() -> Vec<char> {
    let keep =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if keep(b) {
                char::from_u32(b).expect("Latin-1")
            } else {
                let c = char::from_u32(next).expect("below the surrogates");
                next += 1;
                c
            }
        })
        .collect()
}

/// Builds the tokenizer of `kind` with its added tokens at `special_base + i`.
/// With `special_base == 0` the added tokens come first and the byte alphabet and
/// merges follow; otherwise those start at 0 (`special_base` must then exceed them).
pub fn build_family_tokenizer(kind: BuiltinTokenizer, special_base: u32) -> Tokenizer {
    let added = kind.added();
    let alphabet = bytes_to_unicode();
    let space = alphabet[b' ' as usize].to_string();
    let mut regular: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    let mut merges: Vec<(String, String)> = (b'a'..=b'z')
        .map(|c| (space.clone(), (c as char).to_string()))
        .collect();
    for (a, b) in [
        ("t", "h"),
        ("i", "n"),
        ("e", "r"),
        ("o", "n"),
        ("a", "n"),
        ("r", "e"),
    ] {
        merges.push((a.to_string(), b.to_string()));
    }
    regular.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    let first_regular = if special_base == 0 {
        added.len() as u32
    } else {
        0
    };
    assert!(
        special_base == 0 || special_base as usize >= regular.len(),
        "special ids would collide with the byte alphabet"
    );
    let mut vocab: tokenizers::models::bpe::Vocab = regular
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), first_regular + i as u32))
        .collect();
    // The real-size presets put the specials at the real base (151643 for Qwen), far
    // above the few hundred regular tokens. Fill the ids between with unused pieces
    // so the vocabulary is contiguous, as every real tokenizer's is: a hole would
    // decode to nothing when a random model samples it, make `tokenizers` warn with
    // every missing id when the file is written, and leave GGUF writers to guess.
    // No merge produces them, so no text ever encodes to one.
    for id in first_regular + regular.len() as u32..special_base {
        vocab.insert(format!("<|unused_{id}|>"), id);
    }
    for (i, (t, _)) in added.iter().enumerate() {
        vocab.insert(t.to_string(), special_base + i as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .expect("every merge result is in the vocabulary");
    let mut tok = Tokenizer::new(bpe);
    if !kind.is_llama() {
        tok.with_normalizer(Some(NFC))
            .expect("NFC normalizes any text");
    }
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
    if kind.is_llama() {
        let bos = LLAMA3_SPECIALS[0];
        tok.with_post_processor(Some(
            TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .expect("valid template")
                .try_pair(format!("{bos} $A {bos} $B"))
                .expect("valid template")
                .special_tokens(vec![(bos, special_base)])
                .build()
                .expect("complete template"),
        ));
    } else {
        tok.with_post_processor(Some(ByteLevel::new(false, false, false)));
    }
    // Already in the vocabulary: this marks them as added tokens (matched before
    // the BPE runs), adding no ids.
    let specials: Vec<AddedToken> = added
        .iter()
        .filter(|(_, s)| *s)
        .map(|(t, _)| AddedToken::from(*t, true).normalized(false))
        .collect();
    tok.add_special_tokens(specials)
        .expect("special tokens are in the vocabulary");
    let plain: Vec<AddedToken> = added
        .iter()
        .filter(|(_, s)| !*s)
        .map(|(t, _)| AddedToken::from(*t, false).normalized(false))
        .collect();
    tok.add_tokens(plain)
        .expect("added tokens are in the vocabulary");
    debug_assert_eq!(tok.token_to_id(added[0].0), Some(special_base));
    tok
}

/// The `tokenizer_config.json` of `kind` (with ids from `special_base`).
pub fn family_tokenizer_config(kind: BuiltinTokenizer, special_base: u32) -> serde_json::Value {
    let added: serde_json::Map<String, serde_json::Value> = kind
        .added()
        .iter()
        .enumerate()
        .map(|(i, (t, special))| {
            (
                (special_base + i as u32).to_string(),
                serde_json::json!({
                    "content": t, "lstrip": false, "normalized": false,
                    "rstrip": false, "single_word": false, "special": special
                }),
            )
        })
        .collect();
    if kind.is_llama() {
        serde_json::json!({
            "added_tokens_decoder": added,
            "bos_token": LLAMA3_SPECIALS[0],
            "chat_template": kind.chat_template(),
            "clean_up_tokenization_spaces": true,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        })
    } else {
        let specials: Vec<&str> = kind
            .added()
            .iter()
            .skip(1)
            .filter(|(_, s)| *s)
            .map(|(t, _)| *t)
            .collect();
        serde_json::json!({
            "add_prefix_space": false,
            "added_tokens_decoder": added,
            "additional_special_tokens": specials,
            "bos_token": null,
            "chat_template": kind.chat_template(),
            "clean_up_tokenization_spaces": false,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": false,
            // The tokenizer.json is complete: load it as is (Qwen names its own
            // class, which reads the same tokenizer.json).
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": null,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::Encoder;
    use crate::format::Sample;
    use crate::template::Message;
    use qtrain_step::IGNORE_INDEX;

    fn encoder(kind: BuiltinTokenizer) -> Encoder {
        Encoder::new(
            build_family_tokenizer(kind, 0),
            &family_tokenizer_config(kind, 0),
            "auto",
        )
        .unwrap()
    }

    fn conversation() -> Vec<Message> {
        vec![
            Message::system("Be brief."),
            Message::user("Hi there"),
            Message::assistant("Hello!"),
            Message::user("2+2?"),
            Message::assistant("4"),
        ]
    }

    /// The trained tokens, decoded.
    fn answers(enc: &Encoder, messages: &[Message]) -> String {
        let e = enc.encode(&Sample::Chat(messages.to_vec()), false).unwrap();
        let ids: Vec<u32> = e
            .tokens
            .input_ids
            .iter()
            .zip(&e.tokens.labels)
            .filter(|(_, &l)| l != IGNORE_INDEX)
            .map(|(&id, _)| id)
            .collect();
        assert_eq!(
            e.straddling, 0,
            "a token straddles a prompt/answer boundary"
        );
        enc.decode(&ids, false).unwrap()
    }

    #[test]
    fn llama31_header_format_and_eot() {
        let enc = encoder(BuiltinTokenizer::Llama31);
        let text = enc.template().render(&conversation(), false).unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
             Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        );
        let prompt = enc.template().render(&conversation()[..4], true).unwrap();
        assert!(prompt.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
        // Special tokens are single ids; the BOS comes from the template only.
        let ids = enc.tokenize_rendered(&text).unwrap();
        assert_eq!(ids[0], 0);
        assert_eq!(ids.iter().filter(|&&i| i == 0).count(), 1);
        assert_eq!(enc.eos_id(), Some(9));
        assert_eq!(enc.tokenizer().token_to_id("<|start_header_id|>"), Some(6));
        // The answers and their <|eot_id|> are trained, nothing else.
        assert_eq!(
            answers(&enc, &conversation()),
            "Hello!<|eot_id|>4<|eot_id|>"
        );
        // Plain text gets <|begin_of_text|> ... and the EOS.
        let t = enc.encode(&Sample::Text("the cat".into()), false).unwrap();
        assert_eq!(t.tokens.input_ids.first(), Some(&0));
        assert_eq!(t.tokens.input_ids.last(), Some(&9));
        let n = t.tokens.input_ids.len();
        assert_eq!(
            enc.decode(&t.tokens.input_ids[1..n - 1], false).unwrap(),
            "the cat"
        );
    }

    #[test]
    fn llama32_puts_todays_date() {
        let enc = encoder(BuiltinTokenizer::Llama32);
        let text = enc.template().render(&conversation()[1..3], false).unwrap();
        assert!(text.contains("Cutting Knowledge Date: December 2023\nToday Date: "));
        assert!(!text.contains("26 Jul 2024"), "{text}");
        assert_eq!(answers(&enc, &conversation()[1..3]), "Hello!<|eot_id|>");
    }

    #[test]
    fn qwen25_chatml_with_default_system_message() {
        let enc = encoder(BuiltinTokenizer::Qwen25);
        let text = enc.template().render(&conversation()[1..3], false).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        );
        let ids = enc.tokenize_rendered(&text).unwrap();
        assert_eq!(ids[0], 1, "<|im_start|> first, no BOS");
        assert_eq!(enc.bos_id(), None);
        assert_eq!(enc.eos_id(), Some(2));
        assert_eq!(
            answers(&enc, &conversation()),
            "Hello!<|im_end|>\n4<|im_end|>\n"
        );
    }

    #[test]
    fn qwen3_passes_thinking_markers_through() {
        let enc = encoder(BuiltinTokenizer::Qwen3);
        let messages = vec![
            Message::user("2+2?"),
            Message::assistant("<think>\nadd them\n</think>\n\n4"),
        ];
        let text = enc.template().render(&messages, false).unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nadd them\n</think>\n\n4<|im_end|>\n"
        );
        let ids = enc.tokenize_rendered(&text).unwrap();
        let think = enc.tokenizer().token_to_id("<think>").unwrap();
        assert_eq!(think, 24);
        assert!(ids.contains(&think) && ids.contains(&25));
        assert_eq!(
            answers(&enc, &messages),
            "<think>\nadd them\n</think>\n\n4<|im_end|>\n"
        );
        // Without thinking, the last turn still gets an (empty) think block.
        let plain = vec![Message::user("hi"), Message::assistant("yo")];
        assert_eq!(
            enc.template().render(&plain, false).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nyo<|im_end|>\n"
        );
    }

    #[test]
    fn real_vocab_ids_at_the_real_base() {
        let tok = build_family_tokenizer(BuiltinTokenizer::Llama31, 128000);
        assert_eq!(tok.token_to_id("<|eot_id|>"), Some(128009));
        assert_eq!(
            tok.encode("<|begin_of_text|>hi", false).unwrap().get_ids()[0],
            128000
        );
        let tok = build_family_tokenizer(BuiltinTokenizer::Qwen3, 151643);
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(151645));
        // Contiguous ids: every id below the last added token names a token, and
        // ordinary text never encodes to a filler.
        let n = tok.get_vocab_size(true) as u32;
        assert_eq!(n, 151643 + BuiltinTokenizer::Qwen3.added().len() as u32);
        assert!((0..n).all(|id| tok.id_to_token(id).is_some()));
        let ids = tok
            .encode("the unused words <|unused_500|> stay text", false)
            .unwrap();
        assert!(
            ids.get_ids().iter().all(|&id| id < 400),
            "{:?}",
            ids.get_ids()
        );
        assert_eq!(tok.token_to_id("</think>"), Some(151668));
        assert_eq!(
            BuiltinTokenizer::Qwen25.bos_eos_ids(151643),
            (151643, 151645)
        );
    }
}
