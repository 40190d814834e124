//! The Ollama `Modelfile` beside the GGUF: `FROM`, a Go-template `TEMPLATE`
//! translated from the model's Jinja chat template, and `PARAMETER stop` for the
//! end-of-turn tokens.
//!
//! The translation recognises a template by its structure, not its text: the Jinja
//! template is rendered (by the caller's renderer, set up as transformers renders
//! it) for a few probe conversations with sentinel contents, and the strings around
//! the sentinels give a [`ChatFormat`]:
//!
//! * turns wrapped as `USER_PRE content USER_POST` / `ASSISTANT_PRE content
//!   ASSISTANT_POST`, then the generation prompt;
//! * the system message either as a turn of its own before the conversation (with
//!   the text the template uses when there is none, e.g. Qwen 2.5's default system
//!   prompt or Llama 3.1's date header), or folded into the first user message
//!   (Llama 2's `<<SYS>>`) or into the final one (Mistral v0.3).
//!
//! That covers Mistral's `[INST]`, Llama 3's header format and ChatML (Qwen). The
//! format is then *checked*: rendering the probes (and longer conversations) with
//! the format the Go template encodes must give exactly the Jinja output; when it
//! does not, or the template needs something a format cannot express, the Modelfile
//! says so instead of guessing. The beginning-of-sequence token is left out of the
//! Go template when the GGUF tells llama.cpp to add it (as Ollama's own templates
//! do).

use std::fmt::Write;

/// Renders the model's Jinja chat template for `(role, content)` messages.
pub trait ChatRenderer {
    fn render(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> Result<String, String>;
}

/// Where a system message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemStyle {
    /// A block of its own before the turns: `pre + system + post`; `default` is what
    /// stands there when there is no system message (may be empty).
    Turn {
        pre: String,
        post: String,
        default: String,
    },
    /// Inside the first user message: `USER_PRE pre + system + sep content USER_POST`.
    FirstUser { pre: String, sep: String },
    /// Inside the user message that ends the conversation (Mistral v0.3).
    LastUser { pre: String, sep: String },
    /// The template refuses system messages.
    Unsupported,
}

/// A chat format a Go template can express.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatFormat {
    /// Text before everything (without the BOS token when llama.cpp adds it).
    pub prefix: String,
    /// Before the first user message (differs from `user_pre` when every turn
    /// repeats BOS and llama.cpp adds the first one).
    pub first_user_pre: String,
    pub user_pre: String,
    pub user_post: String,
    pub assistant_pre: String,
    pub assistant_post: String,
    /// After the final user message: the start of the assistant's turn.
    pub generation: String,
    pub system: SystemStyle,
}

const S: &str = "QTRAINSYSTEMPROBE";
const U1: &str = "QTRAINUSERPROBEONE";
const A1: &str = "QTRAINASSISTANTPROBEONE";
const U2: &str = "QTRAINUSERPROBETWO";
const A2: &str = "QTRAINASSISTANTPROBETWO";
const U3: &str = "QTRAINUSERPROBETHREE";

fn between<'a>(text: &'a str, a: &str, b: &str) -> Option<&'a str> {
    let i = text.find(a)? + a.len();
    let j = i + text[i..].find(b)?;
    Some(&text[i..j])
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

impl ChatFormat {
    /// Renders `messages` as Ollama would with the Go template of this format (the
    /// conversation must end with a user message: Ollama then generates).
    pub fn render(&self, messages: &[(&str, &str)]) -> String {
        let system: Vec<&str> = messages
            .iter()
            .filter(|m| m.0 == "system")
            .map(|m| m.1)
            .collect();
        let system = system.join("\n\n");
        let turns: Vec<&(&str, &str)> = messages.iter().filter(|m| m.0 != "system").collect();
        let mut out = self.prefix.clone();
        if let SystemStyle::Turn { pre, post, default } = &self.system {
            if system.is_empty() {
                out += default;
            } else {
                out += pre;
                out += &system;
                out += post;
            }
        }
        let mut first_user = true;
        for (i, (role, content)) in turns.iter().enumerate() {
            let last = i + 1 == turns.len();
            match *role {
                "user" => {
                    out += if first_user {
                        &self.first_user_pre
                    } else {
                        &self.user_pre
                    };
                    match &self.system {
                        SystemStyle::FirstUser { pre, sep } if first_user && !system.is_empty() => {
                            out += pre;
                            out += &system;
                            out += sep;
                        }
                        SystemStyle::LastUser { pre, sep } if last && !system.is_empty() => {
                            out += pre;
                            out += &system;
                            out += sep;
                        }
                        _ => {}
                    }
                    first_user = false;
                    out += content;
                    out += &self.user_post;
                    if last {
                        out += &self.generation;
                    }
                }
                _ => {
                    out += &self.assistant_pre;
                    out += content;
                    if !last {
                        out += &self.assistant_post;
                    }
                }
            }
        }
        out
    }

    /// Derives the format from the Jinja template through `r`, then checks it on
    /// the probes and longer conversations. `bos`: the BOS text when llama.cpp adds
    /// BOS itself (then the template's own is left out of the Go template).
    pub fn derive(r: &dyn ChatRenderer, bos: Option<&str>) -> Result<Self, String> {
        let render = |m: &[(&str, &str)], g: bool| r.render(m, g);
        let a = render(&[("user", U1)], true)?;
        let b = render(&[("user", U1), ("assistant", A1), ("user", U2)], true)?;
        let e = render(&[("user", U1), ("assistant", A1)], false)?;
        let no =
            |what: &str| format!("the template's output does not have the expected shape ({what})");
        let assistant_post = e
            .split_once(A1)
            .ok_or_else(|| no("assistant text"))?
            .1
            .to_string();
        let a_to_u = between(&b, A1, U2).ok_or_else(|| no("user after assistant"))?;
        let user_pre = a_to_u
            .strip_prefix(assistant_post.as_str())
            .ok_or_else(|| no("assistant end before the next user turn"))?
            .to_string();
        // After a user message comes the assistant's turn: `u_to_a` in history,
        // `after_u` when generating. Where the user's turn ends is a choice that
        // renders the same; the assistant's end marker is the natural one.
        let u_to_a = between(&b, U1, A1).ok_or_else(|| no("assistant after user"))?;
        let after_u = a.split_once(U1).ok_or_else(|| no("user text"))?.1;
        let k = if !assistant_post.is_empty()
            && u_to_a.starts_with(assistant_post.as_str())
            && after_u.starts_with(assistant_post.as_str())
        {
            assistant_post.len()
        } else {
            common_prefix(u_to_a, after_u)
        };
        let user_post = u_to_a[..k].to_string();
        let assistant_pre = u_to_a[k..].to_string();
        let generation = after_u[k..].to_string();
        let before_u = a.split_once(U1).expect("checked").0;
        let head = before_u
            .strip_suffix(user_pre.as_str())
            .ok_or_else(|| no("first user turn"))?;

        // The system message: its own block, or inside a user message.
        let system = match render(&[("system", S), ("user", U1)], true) {
            Err(_) => SystemStyle::Unsupported,
            Ok(c) => {
                let (before_s, after_s) =
                    c.split_once(S).ok_or_else(|| no("system text dropped"))?;
                let s_to_u = after_s
                    .split_once(U1)
                    .ok_or_else(|| no("user after system"))?
                    .0;
                if let Some(post) = s_to_u.strip_suffix(user_pre.as_str()) {
                    // A block before the first user turn, with nothing before it
                    // but the BOS token.
                    let p = match bos.filter(|b| !b.is_empty()) {
                        Some(b) if before_s.starts_with(b) && head.starts_with(b) => b.len(),
                        _ => 0,
                    };
                    SystemStyle::Turn {
                        pre: before_s[p..].to_string(),
                        post: post.to_string(),
                        default: head[p..].to_string(),
                    }
                } else {
                    let pre = before_s
                        .strip_prefix(head)
                        .and_then(|x| x.strip_prefix(user_pre.as_str()))
                        .ok_or_else(|| no("system text inside the user turn"))?
                        .to_string();
                    let sep = s_to_u.to_string();
                    let d = render(
                        &[("system", S), ("user", U1), ("assistant", A1), ("user", U2)],
                        true,
                    )?;
                    match (d.find(S), d.find(U1)) {
                        (Some(s), Some(u)) if s < u => SystemStyle::FirstUser { pre, sep },
                        (Some(_), Some(_)) => SystemStyle::LastUser { pre, sep },
                        _ => return Err(no("system text in a longer conversation")),
                    }
                }
            }
        };
        let prefix = match &system {
            SystemStyle::Turn { default, .. } => head[..head.len() - default.len()].to_string(),
            _ => head.to_string(),
        };
        let mut f = ChatFormat {
            prefix,
            first_user_pre: user_pre.clone(),
            user_pre,
            user_post,
            assistant_pre,
            assistant_post,
            generation,
            system,
        };
        // llama.cpp adds BOS: leave the template's own out, wherever it starts the
        // text (the prefix, or a first turn that repeats it every turn, Llama 2).
        let bos = bos.filter(|b| !b.is_empty());
        if let Some(b) = bos {
            if let Some(p) = f.prefix.strip_prefix(b) {
                f.prefix = p.to_string();
            } else if f.prefix.is_empty()
                && !matches!(f.system, SystemStyle::Turn { .. })
                && f.user_pre.starts_with(b)
            {
                f.first_user_pre = f.user_pre[b.len()..].to_string();
            } else if a.starts_with(b) {
                return Err(no("where the template writes the BOS token"));
            }
        }
        // The check: every probe, and longer conversations, render the same.
        let mut convs: Vec<Vec<(&str, &str)>> = vec![
            vec![("user", U1)],
            vec![("user", U1), ("assistant", A1), ("user", U2)],
            vec![
                ("user", U1),
                ("assistant", A1),
                ("user", U2),
                ("assistant", A2),
                ("user", U3),
            ],
        ];
        if f.system != SystemStyle::Unsupported {
            convs.push(vec![("system", S), ("user", U1)]);
            convs.push(vec![
                ("system", S),
                ("user", U1),
                ("assistant", A1),
                ("user", U2),
            ]);
            convs.push(vec![
                ("system", S),
                ("user", U1),
                ("assistant", A1),
                ("user", U2),
                ("assistant", A2),
                ("user", U3),
            ]);
        }
        for c in &convs {
            let raw = render(c, true)?;
            let want = match bos {
                Some(b) => raw.strip_prefix(b).unwrap_or(&raw),
                None => &raw,
            };
            let got = f.render(c);
            if want != got {
                return Err(format!(
                    "the derived turn format does not reproduce the template for a \
                     {}-message conversation:\n  jinja: {want:?}\n  go:    {got:?}",
                    c.len()
                ));
            }
        }
        Ok(f)
    }

    /// The Go template (Ollama's `.System` / `.Messages` interface). One line
    /// without whitespace trimming: every character outside the actions is the
    /// format's own text.
    pub fn go_template(&self) -> String {
        let mut t = esc(&self.prefix);
        if let SystemStyle::Turn { pre, post, default } = &self.system {
            let _ = write!(
                t,
                "{{{{ if .System }}}}{}{{{{ .System }}}}{}{{{{ else }}}}{}{{{{ end }}}}",
                esc(pre),
                esc(post),
                esc(default)
            );
        }
        t += "{{ $first := true }}{{ range $i, $_ := .Messages }}";
        t += "{{ $last := eq (len (slice $.Messages $i)) 1 }}";
        t += "{{ if eq .Role \"user\" }}";
        if self.first_user_pre == self.user_pre {
            t += &esc(&self.user_pre);
        } else {
            let _ = write!(
                t,
                "{{{{ if $first }}}}{}{{{{ else }}}}{}{{{{ end }}}}",
                esc(&self.first_user_pre),
                esc(&self.user_pre)
            );
        }
        let sys_in_user = match &self.system {
            SystemStyle::FirstUser { pre, sep } => Some(("$first", pre, sep)),
            SystemStyle::LastUser { pre, sep } => Some(("$last", pre, sep)),
            _ => None,
        };
        if let Some((cond, pre, sep)) = sys_in_user {
            let _ = write!(
                t,
                "{{{{ if and {cond} $.System }}}}{}{{{{ $.System }}}}{}{{{{ end }}}}",
                esc(pre),
                esc(sep)
            );
        }
        let _ = write!(
            t,
            "{{{{ .Content }}}}{}{{{{ if $last }}}}{}{{{{ end }}}}{{{{ $first = false }}}}",
            esc(&self.user_post),
            esc(&self.generation)
        );
        let _ = write!(
            t,
            "{{{{ else if eq .Role \"assistant\" }}}}{}{{{{ .Content }}}}{{{{ if not $last }}}}{}{{{{ end }}}}",
            esc(&self.assistant_pre),
            esc(&self.assistant_post)
        );
        t += "{{ end }}{{ end }}";
        t
    }
}

/// Literal text inside a Go template: `{{` would open an action, so it is written
/// as an action that prints it.
fn esc(s: &str) -> String {
    s.replace("{{", "{{ \"{{\" }}")
}

/// A Modelfile's triple-quoted string cannot contain `"""`.
fn quotable(s: &str) -> bool {
    !s.contains("\"\"\"")
}

/// What goes into the Modelfile.
#[derive(Debug, Clone)]
pub struct ModelfileSpec<'a> {
    /// File name of the GGUF next to the Modelfile.
    pub gguf_file: &'a str,
    pub format: Result<ChatFormat, String>,
    /// Texts that end a turn or the sequence (EOS, the assistant turn's end token).
    pub stops: Vec<String>,
    /// The model's chat template, kept in a comment when it cannot be translated.
    pub jinja: Option<&'a str>,
}

/// The Modelfile text, and a note for the log when the template was not translated.
pub fn modelfile(spec: &ModelfileSpec) -> (String, Option<String>) {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "# Written by qtrain export --gguf. Create the Ollama model with:"
    );
    let _ = writeln!(m, "#   ollama create NAME -f Modelfile");
    let _ = writeln!(m, "FROM ./{}", spec.gguf_file);
    let mut note = None;
    match &spec.format {
        Ok(f) => {
            let t = f.go_template();
            if quotable(&t) {
                let _ = writeln!(
                    m,
                    "# The chat template, translated from the model's Jinja chat template."
                );
                let _ = writeln!(m, "TEMPLATE \"\"\"{t}\"\"\"");
            } else {
                note = Some(
                    "the translated template contains \"\"\" and cannot be quoted in a Modelfile"
                        .to_string(),
                );
            }
        }
        Err(why) => {
            note = Some(match spec.jinja {
                Some(_) => format!(
                    "the chat template could not be translated to Ollama's Go template: {why}"
                ),
                None => "the model has no chat template".to_string(),
            });
        }
    }
    if let Some(n) = &note {
        let _ = writeln!(m, "# NOTE: no TEMPLATE: {}.", n.replace('\n', "\n#   "));
        let _ = writeln!(
            m,
            "# Ollama will pass prompts verbatim; write a TEMPLATE by hand (see \
             https://github.com/ollama/ollama/blob/main/docs/template.md)."
        );
    }
    for s in &spec.stops {
        if !s.is_empty() {
            let _ = writeln!(m, "PARAMETER stop {}", serde_json::Value::String(s.clone()));
        }
    }
    (m, note)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renderer written by hand for three real formats, as the Jinja templates
    /// of the models render.
    struct Fake(&'static str);
    impl ChatRenderer for Fake {
        fn render(&self, msgs: &[(&str, &str)], gen: bool) -> Result<String, String> {
            let (sys, rest): (Vec<&(&str, &str)>, Vec<_>) =
                msgs.iter().partition(|m| m.0 == "system");
            let sys = sys.first().map(|m| m.1);
            let mut o = String::new();
            match self.0 {
                "mistral3" => {
                    o += "<s>";
                    for (i, (r, c)) in rest.iter().enumerate() {
                        if *r == "user" {
                            match sys.filter(|_| i + 1 == rest.len()) {
                                Some(s) => o += &format!("[INST] {s}\n\n{c}[/INST]"),
                                None => o += &format!("[INST] {c}[/INST]"),
                            }
                        } else {
                            o += &format!(" {c}</s>");
                        }
                    }
                }
                "llama3" => {
                    o += "<|begin_of_text|>";
                    if let Some(s) = sys {
                        o +=
                            &format!("<|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|>");
                    }
                    for (r, c) in &rest {
                        o += &format!("<|start_header_id|>{r}<|end_header_id|>\n\n{c}<|eot_id|>");
                    }
                    if gen {
                        o += "<|start_header_id|>assistant<|end_header_id|>\n\n";
                    }
                }
                "qwen25" => {
                    let s = sys.unwrap_or(
                        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                    );
                    o += &format!("<|im_start|>system\n{s}<|im_end|>\n");
                    for (r, c) in &rest {
                        o += &format!("<|im_start|>{r}\n{c}<|im_end|>\n");
                    }
                    if gen {
                        o += "<|im_start|>assistant\n";
                    }
                }
                "llama2" => {
                    for (i, (r, c)) in rest.iter().enumerate() {
                        if *r == "user" {
                            o += "<s>[INST] ";
                            if let (0, Some(s)) = (i, sys) {
                                o += &format!("<<SYS>>\n{s}\n<</SYS>>\n\n");
                            }
                            o += &format!("{c} [/INST]");
                        } else {
                            o += &format!(" {c} </s>");
                        }
                    }
                }
                "nosystem" => {
                    if sys.is_some() {
                        return Err("system not supported".into());
                    }
                    o += "<s>";
                    for (r, c) in &rest {
                        o += &if *r == "user" {
                            format!("[INST] {c} [/INST]")
                        } else {
                            format!("{c}</s>")
                        };
                    }
                }
                "odd" => {
                    // Numbers its turns: no fixed wrapper per role.
                    for (i, (_, c)) in rest.iter().enumerate() {
                        o += &format!("#{i} {c}\n");
                    }
                }
                _ => unreachable!(),
            }
            Ok(o)
        }
    }

    fn conv<'a>() -> Vec<(&'a str, &'a str)> {
        vec![
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello!"),
            ("user", "Bye"),
        ]
    }

    #[test]
    fn mistral_v3_folds_the_system_message_into_the_last_user_turn() {
        let f = ChatFormat::derive(&Fake("mistral3"), Some("<s>")).unwrap();
        assert_eq!(f.user_pre, "[INST] ");
        assert_eq!(f.user_post, "[/INST]");
        assert_eq!(f.assistant_pre, " ");
        assert_eq!(f.assistant_post, "</s>");
        assert_eq!(f.generation, "");
        assert_eq!(f.prefix, "");
        assert_eq!(
            f.system,
            SystemStyle::LastUser {
                pre: "".into(),
                sep: "\n\n".into()
            }
        );
        assert_eq!(
            f.render(&conv()),
            "[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\nBye[/INST]"
        );
        let t = f.go_template();
        assert!(
            t.contains("{{ if and $last $.System }}{{ $.System }}\n\n{{ end }}"),
            "{t}"
        );
    }

    #[test]
    fn llama3_and_chatml_have_system_turns_with_defaults() {
        let f = ChatFormat::derive(&Fake("llama3"), Some("<|begin_of_text|>")).unwrap();
        assert_eq!(f.user_pre, "<|start_header_id|>user<|end_header_id|>\n\n");
        assert_eq!(f.assistant_post, "<|eot_id|>");
        assert_eq!(
            f.generation,
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(
            f.system,
            SystemStyle::Turn {
                pre: "<|start_header_id|>system<|end_header_id|>\n\n".into(),
                post: "<|eot_id|>".into(),
                default: "".into()
            }
        );
        let q = ChatFormat::derive(&Fake("qwen25"), None).unwrap();
        let SystemStyle::Turn { default, .. } = &q.system else {
            panic!("{q:?}")
        };
        assert!(default.contains("You are Qwen"), "{default}");
        assert_eq!(
            q.render(&[("user", "Hi")]),
            Fake("qwen25").render(&[("user", "Hi")], true).unwrap()
        );
        assert!(q
            .go_template()
            .contains("{{ else }}<|im_start|>system\nYou are Qwen"));
    }

    #[test]
    fn llama2_puts_the_system_message_in_the_first_turn() {
        let f = ChatFormat::derive(&Fake("llama2"), Some("<s>")).unwrap();
        assert!(matches!(f.system, SystemStyle::FirstUser { .. }), "{f:?}");
        assert_eq!(f.assistant_post, " </s>");
        assert_eq!(f.user_pre, "<s>[INST] ");
        assert_eq!(f.first_user_pre, "[INST] ");
        assert_eq!(
            f.render(&conv()),
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]"
        );
        assert!(f
            .go_template()
            .contains("{{ if $first }}[INST] {{ else }}<s>[INST] {{ end }}"));
    }

    #[test]
    fn unsupported_system_and_untranslatable_templates_are_reported() {
        let f = ChatFormat::derive(&Fake("nosystem"), Some("<s>")).unwrap();
        assert_eq!(f.system, SystemStyle::Unsupported);
        let e = ChatFormat::derive(&Fake("odd"), None).unwrap_err();
        assert!(e.contains("does not"), "{e}");
        let (m, note) = modelfile(&ModelfileSpec {
            gguf_file: "model-q8_0.gguf",
            format: Err(e),
            stops: vec!["</s>".into()],
            jinja: Some("..."),
        });
        assert!(note.is_some());
        assert!(m.contains("FROM ./model-q8_0.gguf\n"));
        assert!(!m.contains("TEMPLATE \"\"\""));
        assert!(m.contains("# NOTE: no TEMPLATE: the chat template could not be translated"));
        assert!(m.contains("PARAMETER stop \"</s>\"\n"));
    }

    #[test]
    fn go_template_escapes_braces() {
        assert_eq!(esc("a{{b"), "a{{ \"{{\" }}b");
    }
}
