//! Hugging Face hub-cache fixtures of the three datasets the guide offers, with the
//! schemas and file layout the hub stores them in:
//!
//! * `OpenAssistant/oasst1`: `data/train-00000-of-00001-b42a775f407cee45.parquet`
//!   and `data/validation-00000-of-00001-134b8fd0c89408b6.parquet` (the names on
//!   the hub), one row per message with the 18 columns of its dataset card
//!   (`datasets` types: `string`, `int32`, `bool`, the `detoxify` struct, and the
//!   `emojis` / `labels` sequences of dicts, which `datasets` stores as structs of
//!   lists), next to the README and the `.jsonl.gz` exports the repository also
//!   holds;
//! * `trl-lib/Capybara`: `data/train-00000-of-00001.parquet` and
//!   `data/test-00000-of-00001.parquet` with `source: string` and `messages:
//!   list<struct<content: string, role: string>>`;
//! * `yahma/alpaca-cleaned`: `alpaca_data_cleaned.json` (one indented JSON array)
//!   on `main`, and the parquet-converter branch (`refs/convert/parquet`:
//!   `default/train/0000.parquet`, `instruction` / `input` / `output` strings).
//!
//! Files live in `blobs/` and the snapshot links to them, refs name the commit, as
//! `huggingface_hub` lays out its cache. Also used by qtrain-cli's end-to-end test
//! (included by path).
#![allow(dead_code)]

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int32Builder, ListBuilder, StringBuilder,
};
use arrow_array::{
    Array, ArrayRef, LargeListArray, LargeStringArray, ListArray, RecordBatch, StringArray,
    StructArray,
};
use arrow_schema::{DataType, Field, Fields};
use std::path::Path;
use std::sync::Arc;

pub const OASST_COMMIT: &str = "fdf72ae0827c1cda404aff25b6603abec9e3399b";
pub const CAPYBARA_COMMIT: &str = "e235e8449a0e3e3e05e5e5a2b4b1f1e5e3c9d0aa";
pub const ALPACA_COMMIT: &str = "dae3a87c66e7a3ab1fe3d8bdb1fa2e0e6b2bc7a5";
pub const ALPACA_PARQUET_COMMIT: &str = "f5c00ee1c0ffee0000000000000000000000beef";

/// Writes `files` (path in the repository, bytes) as the snapshot `commit` of
/// dataset `id` in the hub cache `cache`, with `refs/{reference}` naming it.
pub fn snapshot(cache: &Path, id: &str, reference: &str, commit: &str, files: &[(&str, Vec<u8>)]) {
    let repo = cache.join(format!("datasets--{}", id.replace('/', "--")));
    let blobs = repo.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let snap = repo.join("snapshots").join(commit);
    for (rel, bytes) in files {
        // Blobs are named by content hash; any stable name does here.
        let blob = format!("{:016x}{:016x}", fnv(bytes), bytes.len());
        std::fs::write(blobs.join(&blob), bytes).unwrap();
        let link = snap.join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        // Relative links, as huggingface_hub makes them: ../../blobs/X from the
        // snapshot root, one more ../ per directory level.
        let depth = rel.matches('/').count();
        let target = format!("{}../../blobs/{blob}", "../".repeat(depth));
        std::os::unix::fs::symlink(target, &link).unwrap();
    }
    let ref_path = repo.join("refs").join(reference);
    std::fs::create_dir_all(ref_path.parent().unwrap()).unwrap();
    std::fs::write(ref_path, commit).unwrap();
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub fn parquet_bytes(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
    out
}

/// One oasst1 message row, by readable names (turned into UUIDs).
#[derive(Debug, Clone, Copy)]
pub struct Msg<'a> {
    pub id: &'a str,
    pub parent: Option<&'a str>,
    pub tree: &'a str,
    pub role: &'a str,
    pub text: &'a str,
    pub lang: &'a str,
    pub rank: Option<i32>,
    pub deleted: bool,
    pub review: Option<bool>,
    pub state: &'a str,
}

pub const fn msg<'a>(
    id: &'a str,
    parent: Option<&'a str>,
    tree: &'a str,
    role: &'a str,
    text: &'a str,
) -> Msg<'a> {
    Msg {
        id,
        parent,
        tree,
        role,
        text,
        lang: "en",
        rank: None,
        deleted: false,
        review: Some(true),
        state: "ready_for_export",
    }
}

pub const fn ranked(m: Msg<'_>, rank: i32) -> Msg<'_> {
    Msg {
        rank: Some(rank),
        ..m
    }
}

/// The train split of the oasst1 fixture, deliberately not in tree order (a reply
/// may come before its parent). Trees:
///
/// * `p1` (en): three ranked answers: `a2` (rank 0, best) is followed up by `p2`,
///   whose rank-0 answer `a3` is deleted so `a4` (rank 1) is the best usable one;
///   `a1` (rank 1) ends there; `a5` (rank 2) failed review, and the thread below
///   it (`p3`, `a6`) is never used.
/// * `q1` (de): two ranked answers.
/// * `r1` (en): one answer `c1`, then two ranked follow-ups: `r2` (rank 0) has no
///   answer, so `r3` (rank 1) and its answer `c2` continue the conversation.
/// * `d1`: a deleted initial prompt; `e1`: its only answer is deleted; `f1`: a
///   tree that is not ready for export.
/// * `o1`: an orphan (its parent is in no split), with a reply `o2` below it.
pub const OASST_TRAIN: [Msg<'static>; 25] = [
    ranked(msg("a2", Some("p1"), "p1", "assistant", "Paris."), 0),
    msg(
        "p1",
        None,
        "p1",
        "prompter",
        "What is the capital of France?",
    ),
    ranked(
        msg("a1", Some("p1"), "p1", "assistant", "It is Paris, I think."),
        1,
    ),
    msg("p2", Some("a2"), "p1", "prompter", "And of Italy?"),
    Msg {
        deleted: true,
        ..ranked(
            msg("a3", Some("p2"), "p1", "assistant", "Rome, obviously!!"),
            0,
        )
    },
    ranked(msg("a4", Some("p2"), "p1", "assistant", "Rome."), 1),
    Msg {
        review: Some(false),
        ..ranked(msg("a5", Some("p1"), "p1", "assistant", "Berlin."), 2)
    },
    msg("p3", Some("a5"), "p1", "prompter", "Are you sure?"),
    msg("a6", Some("p3"), "p1", "assistant", "No."),
    Msg {
        lang: "de",
        ..msg("q1", None, "q1", "prompter", "Wie spät ist es?")
    },
    Msg {
        lang: "de",
        ..ranked(
            msg("b1", Some("q1"), "q1", "assistant", "Es ist zwölf Uhr."),
            0,
        )
    },
    Msg {
        lang: "de",
        ..ranked(msg("b2", Some("q1"), "q1", "assistant", "Keine Ahnung."), 1)
    },
    msg("c1", Some("r1"), "r1", "assistant", "Blue."),
    msg("r1", None, "r1", "prompter", "Name a color."),
    ranked(msg("r2", Some("c1"), "r1", "prompter", "Another one?"), 0),
    ranked(
        msg("r3", Some("c1"), "r1", "prompter", "One more, please."),
        1,
    ),
    msg("c2", Some("r3"), "r1", "assistant", "Green."),
    Msg {
        deleted: true,
        ..msg("d1", None, "d1", "prompter", "buy cheap watches")
    },
    msg("d2", Some("d1"), "d1", "assistant", "No."),
    msg("e1", None, "e1", "prompter", "Hello?"),
    Msg {
        deleted: true,
        ..msg("e2", Some("e1"), "e1", "assistant", "...")
    },
    Msg {
        state: "aborted_low_grade",
        ..msg("f1", None, "f1", "prompter", "Tell me a joke.")
    },
    Msg {
        state: "aborted_low_grade",
        ..msg("f2", Some("f1"), "f1", "assistant", "Knock knock.")
    },
    msg(
        "o1",
        Some("gone"),
        "gone",
        "assistant",
        "An answer to nothing.",
    ),
    msg("o2", Some("o1"), "gone", "prompter", "Below an orphan."),
];

/// The validation split: one tree.
pub const OASST_VALIDATION: [Msg<'static>; 3] = [
    msg("v1", None, "v1", "prompter", "Say hi."),
    ranked(msg("w1", Some("v1"), "v1", "assistant", "Hi!"), 0),
    ranked(msg("w2", Some("v1"), "v1", "assistant", "Hello."), 1),
];

/// The conversations the train split assembles to, best path per tree, in tree
/// order (by initial prompt row): (user, assistant) pairs.
pub fn oasst_train_best() -> Vec<Vec<(&'static str, &'static str)>> {
    vec![
        vec![
            ("What is the capital of France?", "Paris."),
            ("And of Italy?", "Rome."),
        ],
        vec![("Wie spät ist es?", "Es ist zwölf Uhr.")],
        vec![("Name a color.", "Blue."), ("One more, please.", "Green.")],
    ]
}

/// Every thread of the train split, depth first, best reply first.
pub fn oasst_train_all() -> Vec<Vec<(&'static str, &'static str)>> {
    vec![
        vec![
            ("What is the capital of France?", "Paris."),
            ("And of Italy?", "Rome."),
        ],
        vec![("What is the capital of France?", "It is Paris, I think.")],
        vec![("Wie spät ist es?", "Es ist zwölf Uhr.")],
        vec![("Wie spät ist es?", "Keine Ahnung.")],
        vec![("Name a color.", "Blue."), ("One more, please.", "Green.")],
    ]
}

/// A UUID-shaped id for a fixture name, as oasst1's ids are.
pub fn uuid(name: &str) -> String {
    let h = fnv(name.as_bytes());
    let g = fnv(format!("{name}#").as_bytes());
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        g >> 52,
        g & 0xffff_ffff_ffff
    )
}

/// The oasst1 Arrow schema, column by column as its card lists them.
pub fn oasst_table(rows: &[Msg<'_>]) -> RecordBatch {
    let strings = |f: &dyn Fn(&Msg) -> Option<String>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    };
    let int32 = |f: &dyn Fn(&Msg) -> Option<i32>| -> ArrayRef {
        let mut b = Int32Builder::new();
        rows.iter().for_each(|m| b.append_option(f(m)));
        Arc::new(b.finish())
    };
    let bools = |f: &dyn Fn(&Msg) -> Option<bool>| -> ArrayRef {
        let mut b = BooleanBuilder::new();
        rows.iter().for_each(|m| b.append_option(f(m)));
        Arc::new(b.finish())
    };
    // detoxify: seven float64 scores; null for languages detoxify does not cover.
    let detox_names = [
        "toxicity",
        "severe_toxicity",
        "obscene",
        "identity_attack",
        "insult",
        "threat",
        "sexual_explicit",
    ];
    let detox_fields: Fields = detox_names
        .iter()
        .map(|n| Field::new(*n, DataType::Float64, true))
        .collect();
    let detox_cols: Vec<ArrayRef> = detox_names
        .iter()
        .enumerate()
        .map(|(k, _)| {
            let mut b = Float64Builder::new();
            for (i, m) in rows.iter().enumerate() {
                b.append_option((m.lang == "en").then_some(0.0001 * (i + k) as f64));
            }
            Arc::new(b.finish()) as ArrayRef
        })
        .collect();
    let detox_valid: Vec<bool> = rows.iter().map(|m| m.lang == "en").collect();
    let detoxify =
        StructArray::try_new(detox_fields.clone(), detox_cols, Some(detox_valid.into())).unwrap();
    // emojis: {name: [..], count: [..]}; labels: {name, value, count}.
    let mut e_name = ListBuilder::new(StringBuilder::new());
    let mut e_count = ListBuilder::new(Int32Builder::new());
    let mut l_name = ListBuilder::new(StringBuilder::new());
    let mut l_value = ListBuilder::new(Float64Builder::new());
    let mut l_count = ListBuilder::new(Int32Builder::new());
    for m in rows {
        e_name.values().append_value("+1");
        e_count.values().append_value(m.text.len() as i32 % 7 + 1);
        if m.role == "assistant" {
            e_name.values().append_value("_skip_labeling");
            e_count.values().append_value(1);
        }
        e_name.append(true);
        e_count.append(true);
        for (name, v) in [("spam", 0.0), ("quality", 0.75)] {
            l_name.values().append_value(name);
            l_value.values().append_value(v);
            l_count.values().append_value(3);
        }
        l_name.append(true);
        l_value.append(true);
        l_count.append(true);
    }
    let e_cols: Vec<ArrayRef> = vec![Arc::new(e_name.finish()), Arc::new(e_count.finish())];
    let emojis = StructArray::try_new(
        e_cols
            .iter()
            .zip(["name", "count"])
            .map(|(a, n)| Field::new(n, a.data_type().clone(), true))
            .collect(),
        e_cols,
        None,
    )
    .unwrap();
    let l_cols: Vec<ArrayRef> = vec![
        Arc::new(l_name.finish()),
        Arc::new(l_value.finish()),
        Arc::new(l_count.finish()),
    ];
    let labels = StructArray::try_new(
        l_cols
            .iter()
            .zip(["name", "value", "count"])
            .map(|(a, n)| Field::new(n, a.data_type().clone(), true))
            .collect(),
        l_cols,
        None,
    )
    .unwrap();
    RecordBatch::try_from_iter_with_nullable([
        ("message_id", strings(&|m| Some(uuid(m.id))), true),
        ("parent_id", strings(&|m| m.parent.map(uuid)), true),
        (
            "user_id",
            strings(&|m| Some(uuid(&format!("user-{}", m.id)))),
            true,
        ),
        (
            "created_date",
            strings(&|m| {
                Some(format!(
                    "2023-02-{:02}T14:23:50.983374+00:00",
                    m.text.len() % 28 + 1
                ))
            }),
            true,
        ),
        ("text", strings(&|m| Some(m.text.to_string())), true),
        ("role", strings(&|m| Some(m.role.to_string())), true),
        ("lang", strings(&|m| Some(m.lang.to_string())), true),
        ("review_count", int32(&|_| Some(3)), true),
        ("review_result", bools(&|m| m.review), true),
        ("deleted", bools(&|m| Some(m.deleted)), true),
        ("rank", int32(&|m| m.rank), true),
        ("synthetic", bools(&|_| Some(false)), true),
        ("model_name", strings(&|_| None), true),
        ("detoxify", Arc::new(detoxify) as ArrayRef, true),
        ("message_tree_id", strings(&|m| Some(uuid(m.tree))), true),
        ("tree_state", strings(&|m| Some(m.state.to_string())), true),
        ("emojis", Arc::new(emojis) as ArrayRef, true),
        ("labels", Arc::new(labels) as ArrayRef, true),
    ])
    .unwrap()
}

/// The oasst1 rows as JSON lines (the `.messages.jsonl` export's shape).
pub fn oasst_jsonl(rows: &[Msg<'_>]) -> String {
    rows.iter()
        .map(|m| {
            serde_json::json!({
                "message_id": uuid(m.id),
                "parent_id": m.parent.map(uuid),
                "user_id": uuid(&format!("user-{}", m.id)),
                "created_date": "2023-02-05T14:23:50.983374+00:00",
                "text": m.text,
                "role": m.role,
                "lang": m.lang,
                "review_count": 3,
                "review_result": m.review,
                "deleted": m.deleted,
                "rank": m.rank,
                "synthetic": false,
                "model_name": null,
                "message_tree_id": uuid(m.tree),
                "tree_state": m.state,
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// Writes the oasst1 fixture into `cache`.
pub fn oasst1(cache: &Path) {
    snapshot(
        cache,
        "OpenAssistant/oasst1",
        "main",
        OASST_COMMIT,
        &[
            (
                "README.md",
                b"---\nlicense: apache-2.0\n---\n# OASST1\n".to_vec(),
            ),
            (
                "data/train-00000-of-00001-b42a775f407cee45.parquet",
                parquet_bytes(&oasst_table(&OASST_TRAIN)),
            ),
            (
                "data/validation-00000-of-00001-134b8fd0c89408b6.parquet",
                parquet_bytes(&oasst_table(&OASST_VALIDATION)),
            ),
            // The exports next to the tables: compressed, not read.
            (
                "2023-04-12_oasst_ready.trees.jsonl.gz",
                vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0],
            ),
        ],
    );
}

/// Capybara conversations: (source, turns as (role, content)).
pub fn capybara_train() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
    vec![
        (
            "Know-Logic",
            vec![
                ("user", "Which planet is largest?"),
                ("assistant", "Jupiter."),
                ("user", "How many moons does it have?"),
                ("assistant", "Ninety-five known moons."),
            ],
        ),
        (
            "Dove",
            vec![
                ("user", "Write a haiku."),
                ("assistant", "Old pond, a frog jumps."),
            ],
        ),
        ("GOAT", vec![("user", "12*3?"), ("assistant", "36")]),
    ]
}

pub fn capybara_test() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
    vec![(
        "EverythingLM",
        vec![("user", "Name a prime."), ("assistant", "Seven.")],
    )]
}

/// `source: string, messages: list<struct<content: string, role: string>>` as
/// `datasets` writes them; with `large`, the large variants (`large_string`,
/// `large_list`) polars writes by default.
pub fn capybara_table(rows: &[(&str, Vec<(&str, &str)>)], large: bool) -> RecordBatch {
    let turns: Vec<(&str, &str)> = rows.iter().flat_map(|(_, t)| t.iter().copied()).collect();
    let string_array = |v: Vec<&str>| -> ArrayRef {
        if large {
            Arc::new(LargeStringArray::from(v))
        } else {
            Arc::new(StringArray::from(v))
        }
    };
    let content = string_array(turns.iter().map(|t| t.1).collect());
    let role = string_array(turns.iter().map(|t| t.0).collect());
    let struct_fields: Fields = vec![
        Field::new("content", content.data_type().clone(), true),
        Field::new("role", role.data_type().clone(), true),
    ]
    .into();
    let structs = StructArray::try_new(struct_fields.clone(), vec![content, role], None).unwrap();
    let item = Arc::new(Field::new("item", DataType::Struct(struct_fields), true));
    let lens = rows.iter().map(|(_, t)| t.len());
    let messages: ArrayRef = if large {
        Arc::new(
            LargeListArray::try_new(
                item,
                arrow_buffer::OffsetBuffer::from_lengths(lens),
                Arc::new(structs),
                None,
            )
            .unwrap(),
        )
    } else {
        Arc::new(
            ListArray::try_new(
                item,
                arrow_buffer::OffsetBuffer::from_lengths(lens),
                Arc::new(structs),
                None,
            )
            .unwrap(),
        )
    };
    let source = string_array(rows.iter().map(|r| r.0).collect());
    RecordBatch::try_from_iter([("source", source), ("messages", messages)]).unwrap()
}

pub fn capybara(cache: &Path) {
    snapshot(
        cache,
        "trl-lib/Capybara",
        "main",
        CAPYBARA_COMMIT,
        &[
            (
                "README.md",
                b"---\ndataset_info:\n  features:\n  - name: source\n".to_vec(),
            ),
            (
                "data/train-00000-of-00001.parquet",
                parquet_bytes(&capybara_table(&capybara_train(), false)),
            ),
            (
                "data/test-00000-of-00001.parquet",
                parquet_bytes(&capybara_table(&capybara_test(), false)),
            ),
        ],
    );
}

/// alpaca-cleaned records: (instruction, input, output).
pub const ALPACA: [(&str, &str, &str); 3] = [
    (
        "Give three tips for staying healthy.",
        "",
        "Eat well, exercise, sleep.",
    ),
    ("Translate to French.", "Good morning", "Bonjour"),
    ("Add the numbers.", "2, 3", "5"),
];

/// The JSON array of `alpaca_data_cleaned.json`, indented as in the file.
pub fn alpaca_json() -> String {
    let items: Vec<String> = ALPACA
        .iter()
        .map(|(i, x, o)| {
            format!(
                "    {{\n        \"output\": {},\n        \"input\": {},\n        \"instruction\": {}\n    }}",
                serde_json::to_string(o).unwrap(),
                serde_json::to_string(x).unwrap(),
                serde_json::to_string(i).unwrap()
            )
        })
        .collect();
    format!("[\n{}\n]", items.join(",\n"))
}

pub fn alpaca_table() -> RecordBatch {
    let output: StringArray = ALPACA.iter().map(|r| Some(r.2)).collect();
    let input: StringArray = ALPACA.iter().map(|r| Some(r.1)).collect();
    let instruction: StringArray = ALPACA.iter().map(|r| Some(r.0)).collect();
    RecordBatch::try_from_iter([
        ("output", Arc::new(output) as ArrayRef),
        ("input", Arc::new(input) as ArrayRef),
        ("instruction", Arc::new(instruction) as ArrayRef),
    ])
    .unwrap()
}

/// `main` (the JSON file) and `refs/convert/parquet` (the converter's Parquet).
pub fn alpaca_cleaned(cache: &Path) {
    snapshot(
        cache,
        "yahma/alpaca-cleaned",
        "main",
        ALPACA_COMMIT,
        &[
            ("README.md", b"---\nlicense: cc-by-4.0\n---\n".to_vec()),
            ("alpaca_data_cleaned.json", alpaca_json().into_bytes()),
        ],
    );
    snapshot(
        cache,
        "yahma/alpaca-cleaned",
        "refs/convert/parquet",
        ALPACA_PARQUET_COMMIT,
        &[("default/train/0000.parquet", parquet_bytes(&alpaca_table()))],
    );
}

/// All three datasets in one cache.
pub fn all(cache: &Path) {
    oasst1(cache);
    capybara(cache);
    alpaca_cleaned(cache);
}
