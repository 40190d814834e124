//! The built-in tokenizer and the chat template, token for token.

mod common;
use common::ch;
use qtrain_data::tiny_tokenizer::{build_tiny_tokenizer, tiny_tokenizer_config};
use qtrain_data::{Encoder, Message, Sample};
use qtrain_step::IGNORE_INDEX;

const M: i64 = IGNORE_INDEX;

#[test]
fn tiny_tokenizer_layout() {
    let t = build_tiny_tokenizer();
    for (i, s) in ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
        .iter()
        .enumerate()
    {
        assert_eq!(t.token_to_id(s), Some(i as u32), "{s}");
    }
    assert_eq!(t.token_to_id("<0x00>"), Some(5));
    assert_eq!(t.token_to_id("<0xFF>"), Some(260));
    assert_eq!(t.token_to_id("\u{2581}"), Some(261));
    let n = t.get_vocab_size(true);
    assert!((300..600).contains(&n), "vocab {n}");
    // Post-processor adds BOS; byte fallback covers non-ASCII; decode round-trips.
    let e = t.encode("héllo world", true).unwrap();
    assert_eq!(e.get_ids()[0], 1);
    assert!(
        e.get_tokens().contains(&"<0xC3>".to_string()),
        "{:?}",
        e.get_tokens()
    );
    assert!(!e.get_ids().contains(&0), "no <unk>");
    assert_eq!(t.decode(e.get_ids(), true).unwrap(), "héllo world");
}

#[test]
fn tiny_tokenizer_json_round_trips() {
    let t = build_tiny_tokenizer();
    let json = t.to_string(true).unwrap();
    assert_eq!(
        json,
        build_tiny_tokenizer().to_string(true).unwrap(),
        "deterministic"
    );
    let back: tokenizers::Tokenizer = json.parse().unwrap();
    let text = "[INST] Reverse the word: cat[/INST] tac</s>";
    assert_eq!(
        back.encode(text, false).unwrap().get_ids(),
        t.encode(text, false).unwrap().get_ids()
    );
    let cfg = tiny_tokenizer_config();
    assert_eq!(cfg["bos_token"], "<s>");
    assert_eq!(cfg["eos_token"], "</s>");
    assert_eq!(cfg["add_eos_token"], false);
    assert!(cfg["chat_template"].as_str().unwrap().contains("[INST]"));
}

#[test]
fn chat_template_token_for_token() {
    let enc = Encoder::tiny();
    let conv = Sample::Chat(vec![Message::user("Hi"), Message::assistant("ok")]);
    let t = enc.encode(&conv, false).unwrap().tokens;
    let sp = 261; // ▁
    let sp_o = enc.tokenizer().token_to_id("\u{2581}o").unwrap();
    // <s> [INST] ▁ H i [/INST] ▁o k </s>
    assert_eq!(
        t.input_ids,
        [1, 3, sp, ch('H'), ch('i'), 4, sp_o, ch('k'), 2]
    );
    assert_eq!(t.labels, [M, M, M, M, M, M, sp_o as i64, ch('k') as i64, 2]);
    // train_on_prompt: everything but the first token.
    let all = enc.encode(&conv, true).unwrap().tokens;
    assert_eq!(all.input_ids, t.input_ids);
    assert_eq!(all.labels[0], M);
    assert!(all.labels[1..].iter().all(|&l| l != M));
    // The generation prompt is exactly the masked prefix.
    let prompt = enc.encode_prompt(&[Message::user("Hi")]).unwrap();
    assert_eq!(prompt, t.input_ids[..6]);
}

#[test]
fn multi_turn_masks_every_prompt_and_trains_every_answer() {
    let enc = Encoder::tiny();
    let conv = Sample::Chat(vec![
        Message::system("Be terse."),
        Message::user("a"),
        Message::assistant("b"),
        Message::user("c"),
        Message::assistant("d"),
    ]);
    let t = enc.encode(&conv, false).unwrap().tokens;
    let text = enc.decode(&t.input_ids, false).unwrap();
    // Mistral v0.3: the system prompt only appears before a final user turn.
    assert_eq!(text, "<s>[INST] a[/INST] b</s>[INST] c[/INST] d</s>");
    let trained: Vec<u32> = t
        .labels
        .iter()
        .filter(|&&l| l != M)
        .map(|&l| l as u32)
        .collect();
    let sp_b = enc.tokenizer().token_to_id("\u{2581}b").unwrap();
    let sp_d = enc.tokenizer().token_to_id("\u{2581}d").unwrap();
    assert_eq!(trained, [sp_b, 2, sp_d, 2]);
}

#[test]
fn text_samples_get_bos_and_eos_and_train_everything() {
    let enc = Encoder::tiny();
    let t = enc
        .encode(&Sample::Text("ab".into()), false)
        .unwrap()
        .tokens;
    let sp_a = enc.tokenizer().token_to_id("\u{2581}a").unwrap();
    assert_eq!(t.input_ids, [1, sp_a, ch('b'), 2]);
    assert_eq!(t.labels, [M, sp_a as i64, ch('b') as i64, 2]);
}

#[test]
fn model_template_from_config_is_used() {
    // A ChatML-like template the model ships: assistant turns end with "<|end|>".
    let mut cfg = tiny_tokenizer_config();
    cfg["chat_template"] = serde_json::json!(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    );
    let enc = Encoder::new(build_tiny_tokenizer(), &cfg, "auto").unwrap();
    let s = Sample::Chat(vec![Message::user("x"), Message::assistant("y")]);
    let encoded = enc.encode(&s, false).unwrap();
    let t = encoded.tokens;
    assert_eq!(
        enc.decode(&t.input_ids, false).unwrap(),
        // trim_blocks eats the newline after `{% endif %}`, as in transformers.
        "user: xassistant: y</s>"
    );
    let trained: Vec<u32> = t
        .labels
        .iter()
        .filter(|&&l| l != M)
        .map(|&l| l as u32)
        .collect();
    // The prompt ends with "assistant: " and the space joins the answer in the token
    // "▁y": it straddles the boundary, is trained (it carries the answer) and counted.
    let sp_y = enc.tokenizer().token_to_id("\u{2581}y").unwrap();
    assert_eq!(trained, [sp_y, 2], "only the answer and its EOS");
    assert_eq!(encoded.straddling, 1);
    // `mistral` overrides the model's template.
    let m = Encoder::new(build_tiny_tokenizer(), &cfg, "mistral").unwrap();
    assert!(m
        .template()
        .render(&[Message::user("x")], true)
        .unwrap()
        .starts_with("<s>[INST]"));
    // `model` without one is a config error naming the key.
    let err = Encoder::new(build_tiny_tokenizer(), &serde_json::json!({}), "model").unwrap_err();
    assert!(err.to_string().contains("chat_template"), "{err}");
}

#[test]
fn template_errors_are_reported() {
    let enc = Encoder::tiny();
    let s = Sample::Chat(vec![Message::assistant("first"), Message::user("then")]);
    let err = enc.encode(&s, false).unwrap_err().to_string();
    assert!(err.contains("must alternate"), "{err}");
}
