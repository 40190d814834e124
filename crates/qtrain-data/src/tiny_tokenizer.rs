//! The built-in tokenizer written into every random model qtrain generates.
//!
//! Nothing can be downloaded, so the tiny models need a tokenizer of their own. It is
//! a real [`tokenizers::Tokenizer`] shaped like Llama/Mistral's sentencepiece export
//! (what `tokenizer.json` of Mistral-7B-v0.3 looks like once converted by
//! `transformers`), only with a small vocabulary so the tiny model's embedding stays
//! small:
//!
//! * ids 0..5: `<unk>`, `<s>`, `</s>`, `[INST]`, `[/INST]` (special added tokens,
//!   the same ids Mistral v0.3 uses for them);
//! * the 256 byte-fallback tokens `<0x00>`..`<0xFF>`, so any UTF-8 text encodes;
//! * `▁` (the sentencepiece space) and every printable ASCII character;
//! * a handful of merges (`▁` + lowercase letter and a few frequent English
//!   pairs), enough to exercise the BPE path without making words opaque to a tiny
//!   model.
//!
//! The Metaspace pre-tokenizer (`prepend_scheme: first`, no split) turns spaces into
//! `▁` and prefixes the start of the text with one, exactly like the non-legacy
//! Llama/Mistral fast tokenizers; the post-processor adds `<s>` in front.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, Tokenizer};

/// The special tokens, in id order.
pub const SPECIAL_TOKENS: [&str; 5] = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"];
/// The sentencepiece word-boundary marker.
pub const SPACE_MARKER: char = '\u{2581}';

/// Pairs merged by the BPE model (besides `▁` + each lowercase letter). Kept short:
/// the tiny models must still see the letters of a word to learn to reverse it.
const EXTRA_MERGES: [(&str, &str); 6] = [
    ("t", "h"),
    ("i", "n"),
    ("e", "r"),
    ("o", "n"),
    ("a", "n"),
    ("r", "e"),
];

/// Mistral-7B-Instruct-v0.3's chat template, equal in behaviour (system message
/// folded into the last user turn, strict user/assistant alternation, tools), written
/// for the jinja dialect `transformers` uses (`trim_blocks`, `lstrip_blocks`).
pub const MISTRAL_V3_CHAT_TEMPLATE: &str = r#"{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- Roles must alternate user/assistant; tool calls and tool results do not count. #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token }}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"#;

/// The vocabulary in id order: specials, byte fallbacks, `▁`, printable ASCII, merges.
fn vocab_and_merges() -> (Vec<String>, Vec<(String, String)>) {
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    tokens.extend((0u32..256).map(|b| format!("<0x{b:02X}>")));
    tokens.push(SPACE_MARKER.to_string());
    // ' ' never reaches the model (Metaspace replaces it), so start after it.
    tokens.extend((b'!'..=b'~').map(|c| (c as char).to_string()));
    let mut merges = Vec::new();
    for c in b'a'..=b'z' {
        merges.push((SPACE_MARKER.to_string(), (c as char).to_string()));
    }
    for (a, b) in EXTRA_MERGES {
        merges.push((a.to_string(), b.to_string()));
    }
    for (a, b) in &merges {
        tokens.push(format!("{a}{b}"));
    }
    (tokens, merges)
}

/// Builds the tokenizer. Deterministic: the same JSON every time.
pub fn build_tiny_tokenizer() -> Tokenizer {
    let (tokens, merges) = vocab_and_merges();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token("<unk>".to_string())
        .byte_fallback(true)
        .fuse_unk(true)
        .build()
        .expect("the built-in vocabulary contains every merge result");
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(Metaspace::new(
        SPACE_MARKER,
        PrependScheme::First,
        false,
    )));
    // Llama/Mistral's decoder: `▁` back to spaces, byte tokens back to bytes, then
    // drop the one space the pre-tokenizer put in front of the text.
    let decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE_MARKER.to_string(), " ")
            .expect("a plain string pattern")
            .into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
        Strip::new(' ', 1, 0).into(),
    ];
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("<s> $A")
            .expect("valid template")
            .try_pair("<s> $A <s> $B")
            .expect("valid template")
            .special_tokens(vec![("<s>", 1)])
            .build()
            .expect("complete template"),
    ));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true).normalized(false))
        .collect();
    // Already in the vocabulary: this marks them special, adding no ids.
    tok.add_special_tokens(specials)
        .expect("special tokens are in the vocabulary");

    debug_assert_eq!(tok.token_to_id("[/INST]"), Some(4));
    tok
}

/// The `tokenizer_config.json` that goes next to `tokenizer.json`.
pub fn tiny_tokenizer_config() -> serde_json::Value {
    let added: serde_json::Map<String, serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, t)| {
            (
                id.to_string(),
                serde_json::json!({
                    "content": t, "lstrip": false, "normalized": false,
                    "rstrip": false, "single_word": false, "special": true
                }),
            )
        })
        .collect();
    serde_json::json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": null,
        "chat_template": MISTRAL_V3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "legacy": false,
        "model_max_length": 32768,
        "spaces_between_special_tokens": false,
        // The tokenizer.json is complete (post-processor included): load it as is.
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}
