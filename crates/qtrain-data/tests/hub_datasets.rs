//! The three datasets the guide offers, read from a hub cache laid out as the hub
//! stores them (tests/common/hub.rs): OpenAssistant/oasst1 message trees assembled
//! into conversations, trl-lib/Capybara `messages`, yahma/alpaca-cleaned in its JSON
//! and converted-Parquet forms; splits by the hub's file names; formats that fit
//! nothing refused by their columns. Checked token for token against the chat
//! template, with the masks. Its own test binary: it sets `HF_HUB_CACHE`.

mod common;
#[path = "common/hub.rs"]
mod hub;

use common::{tiny, write};
use hub::Msg;
use qtrain_data::oasst::TreeReport;
use qtrain_data::source::Dataset;
use qtrain_data::{
    eval_samples, BatchStream, DatasetConfig, Encoder, EvalStream, Format, Message, OnBadLine,
    Sample, TreePaths,
};
use qtrain_step::{TokenBatch, IGNORE_INDEX};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One cache with all three datasets for the whole binary (the variable is
/// process-wide, so every test must agree on it).
fn cache() -> &'static Path {
    static CACHE: OnceLock<tempfile::TempDir> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            let d = tempfile::tempdir().unwrap();
            hub::all(d.path());
            std::env::set_var("HF_HUB_CACHE", d.path());
            d
        })
        .path()
}

fn cfg(path: &str) -> DatasetConfig {
    cache();
    DatasetConfig {
        path: path.into(),
        eval_fraction: 0.0,
        seq_len: 256,
        batch_size: 1,
        shuffle_buffer: 64,
        ..Default::default()
    }
}

/// A document as the stream hands it over: ids and labels.
type Doc = (Vec<u32>, Vec<i64>);

/// The documents of a batch (padding left out).
fn docs(b: &TokenBatch) -> Vec<Doc> {
    let mut out = Vec::new();
    for r in 0..b.batch_size {
        let row = r * b.seq_len..(r + 1) * b.seq_len;
        let (ids, labels, segs) = (
            &b.input_ids[row.clone()],
            &b.labels[row.clone()],
            &b.segment_ids[row],
        );
        let mut start = 0;
        for i in 1..=ids.len() {
            if i == ids.len() || segs[i] != segs[i - 1] {
                // Documents start with BOS; the padding segment does not.
                if ids[start] == 1 {
                    out.push((ids[start..i].to_vec(), labels[start..i].to_vec()));
                }
                start = i;
            }
        }
    }
    out
}

/// What the tiny model's template (Mistral v0.3) makes of a conversation, written
/// out by hand: `<s>[INST] u[/INST] a</s>` per turn pair; the ids of that text,
/// and labels that train exactly each ` a</s>`.
fn expected(turns: &[(&str, &str)]) -> Doc {
    let enc = Encoder::tiny();
    let t = enc.tokenizer();
    let ids_of = |s: &str| -> Vec<u32> { t.encode(s, false).unwrap().get_ids().to_vec() };
    let mut text = String::from("<s>");
    let mut spans = Vec::new();
    for (u, a) in turns {
        text.push_str(&format!("[INST] {u}[/INST]"));
        let start = ids_of(&text).len();
        text.push_str(&format!(" {a}</s>"));
        spans.push(start..ids_of(&text).len());
    }
    let ids = ids_of(&text);
    let mut labels = vec![IGNORE_INDEX; ids.len()];
    for s in spans {
        for i in s {
            labels[i] = ids[i] as i64;
        }
    }
    (ids, labels)
}

/// Streams at least `rounds` epochs' worth of documents and checks that every
/// document is one of `want` (ids and labels, token for token) and every one of
/// `want` comes.
fn stream_matches(cfg: &DatasetConfig, want: &[Doc], rounds: usize) {
    let mut s = BatchStream::new(cfg, tiny()).unwrap();
    let mut seen = vec![0usize; want.len()];
    let mut n = 0;
    while n < rounds * want.len() {
        for d in docs(&s.next().unwrap().unwrap()) {
            let enc = Encoder::tiny();
            let k = want.iter().position(|w| *w == d).unwrap_or_else(|| {
                panic!(
                    "unexpected document {:?}\n labels {:?}",
                    enc.decode(&d.0, false).unwrap(),
                    d.1
                )
            });
            seen[k] += 1;
            n += 1;
        }
    }
    assert!(
        seen.iter().all(|&c| c > 0),
        "every conversation comes: {seen:?}"
    );
}

fn pairs_of(messages: &[Message]) -> Vec<(String, String)> {
    messages
        .chunks(2)
        .map(|c| {
            assert_eq!(
                (c[0].role.as_str(), c[1].role.as_str()),
                ("user", "assistant")
            );
            (c[0].content.clone(), c[1].content.clone())
        })
        .collect()
}

fn owned(convs: Vec<Vec<(&str, &str)>>) -> Vec<Vec<(String, String)>> {
    convs
        .into_iter()
        .map(|c| c.into_iter().map(|(u, a)| (u.into(), a.into())).collect())
        .collect()
}

/// The assembled conversations and the report of a message-tree dataset.
fn assembled(cfg: &DatasetConfig) -> (Vec<Vec<(String, String)>>, TreeReport) {
    let ds = Dataset::resolve(cfg).unwrap();
    let trees = ds.message_trees.as_ref().expect("a message-tree dataset");
    let c = trees.conversations().unwrap();
    let convs = (0..c.len()).map(|i| pairs_of(&c.messages(i))).collect();
    (convs, c.report().clone())
}

#[test]
fn oasst1_best_paths_train_token_for_token() {
    let cfg = cfg("OpenAssistant/oasst1");
    let want: Vec<Doc> = hub::oasst_train_best()
        .iter()
        .map(|c| expected(c))
        .collect();
    stream_matches(&cfg, &want, 4);
    // Padding mode (one conversation per row) and the eval stream agree.
    stream_matches(
        &DatasetConfig {
            packing: false,
            ..cfg.clone()
        },
        &want,
        3,
    );
    let eval: Vec<Doc> = EvalStream::new(
        &DatasetConfig {
            eval_samples: Some(1),
            ..cfg.clone()
        },
        tiny(),
    )
    .unwrap()
    .flat_map(|b| docs(&b.unwrap()))
    .collect();
    assert_eq!(eval, want[..1], "the first conversation is held out");
}

#[test]
fn oasst1_assembly_counts_every_skipped_message() {
    let (convs, report) = assembled(&cfg("OpenAssistant/oasst1"));
    assert_eq!(convs, owned(hub::oasst_train_best()));
    assert_eq!(
        report,
        TreeReport {
            messages: 25,
            bad_rows: 0,
            deleted: 3,
            failed_review: 1,
            orphans: 1,
            unreachable: 1,
            trees: 6,
            trees_unusable_prompt: 1,
            trees_not_ready: 1,
            trees_other_language: 0,
            trees_without_answer: 1,
            conversations: 3,
        }
    );
}

#[test]
fn oasst1_every_path_and_language_filter() {
    let all = DatasetConfig {
        tree_paths: TreePaths::All,
        ..cfg("OpenAssistant/oasst1")
    };
    let (convs, report) = assembled(&all);
    assert_eq!(convs, owned(hub::oasst_train_all()));
    assert_eq!(report.conversations, 5);
    let want: Vec<Doc> = hub::oasst_train_all().iter().map(|c| expected(c)).collect();
    stream_matches(&all, &want, 3);

    let en = DatasetConfig {
        languages: vec!["en".into()],
        ..cfg("OpenAssistant/oasst1")
    };
    let (convs, report) = assembled(&en);
    let best = owned(hub::oasst_train_best());
    assert_eq!(convs, [best[0].clone(), best[2].clone()]);
    assert_eq!((report.trees_other_language, report.conversations), (1, 2));
    let en_all = DatasetConfig {
        tree_paths: TreePaths::All,
        ..en.clone()
    };
    assert_eq!(assembled(&en_all).0.len(), 3);
    let de = DatasetConfig {
        languages: vec!["de".into()],
        ..en
    };
    assert_eq!(assembled(&de).0, [best[1].clone()]);
    let none = DatasetConfig {
        languages: vec!["fr".into()],
        ..cfg("OpenAssistant/oasst1")
    };
    let err = BatchStream::new(&none, tiny())
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("is empty"), "{err}");
}

#[test]
fn oasst1_splits_by_hub_file_names() {
    let want = vec![vec![("Say hi.".to_string(), "Hi!".to_string())]];
    for split in ["validation", "dev", "valid"] {
        let c = DatasetConfig {
            split: split.into(),
            ..cfg("OpenAssistant/oasst1")
        };
        assert_eq!(assembled(&c).0, want, "{split}");
    }
    let pinned = DatasetConfig {
        split: "validation".into(),
        ..cfg(&format!("OpenAssistant/oasst1@{}", hub::OASST_COMMIT))
    };
    assert_eq!(assembled(&pinned).0, want);
    let err = Dataset::resolve(&DatasetConfig {
        split: "test".into(),
        ..cfg("OpenAssistant/oasst1")
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("has no `test` split") && err.contains("`train`, `validation`"),
        "{err}"
    );
    // Every file: both tables assemble together.
    let both = DatasetConfig {
        split: String::new(),
        ..cfg("OpenAssistant/oasst1")
    };
    assert_eq!(assembled(&both).1.conversations, 4);
}

#[test]
fn oasst_table_from_jsonl_is_the_same() {
    cache();
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "2023-04-12_oasst_ready.messages.jsonl",
        &hub::oasst_jsonl(&hub::OASST_TRAIN),
    );
    let c = DatasetConfig {
        path: p.to_string_lossy().into(),
        ..cfg("")
    };
    let (convs, report) = assembled(&c);
    assert_eq!(convs, owned(hub::oasst_train_best()));
    assert_eq!((report.orphans, report.messages), (1, 25));
    // A bad row: an error naming the line and field, or skipped and counted.
    let mut text = hub::oasst_jsonl(&hub::OASST_TRAIN);
    text = text.replacen("\"role\":\"assistant\"", "\"role\":\"narrator\"", 1);
    let p = write(d.path(), "bad.jsonl", &text);
    let c = DatasetConfig {
        path: p.to_string_lossy().into(),
        ..cfg("")
    };
    let err = BatchStream::new(&c, tiny())
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.jsonl:1: field `role` has unknown role `narrator`"),
        "{err}"
    );
    let skip = DatasetConfig {
        on_bad_line: OnBadLine::Skip,
        ..c
    };
    let (convs, report) = assembled(&skip);
    // Row 1 is `a2`, the best answer of the first tree: `a1` takes its place, and
    // `p2` below it becomes an orphan.
    assert_eq!(report.bad_rows, 1);
    assert_eq!(report.orphans, 2);
    assert_eq!(
        convs[0],
        [(
            "What is the capital of France?".to_string(),
            "It is Paris, I think.".to_string()
        )]
    );
}

#[test]
fn oasst1_resumes_exactly_and_gives_sample_prompts() {
    let cfg = DatasetConfig {
        shuffle_buffer: 2,
        ..cfg("OpenAssistant/oasst1")
    };
    let mut s = BatchStream::new(&cfg, tiny()).unwrap();
    for _ in 0..3 {
        s.next().unwrap().unwrap();
    }
    let cur = s.cursor();
    let expect: Vec<TokenBatch> = s.take(4).map(|b| b.unwrap()).collect();
    let got: Vec<TokenBatch> = BatchStream::resume(&cfg, tiny(), &cur)
        .unwrap()
        .take(4)
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(got, expect);
    let samples = eval_samples(
        &DatasetConfig {
            eval_samples: Some(2),
            ..cfg
        },
        5,
    )
    .unwrap();
    let best = hub::oasst_train_best();
    assert_eq!(samples.len(), 2);
    for (s, want) in samples.iter().zip(&best) {
        let Sample::Chat(m) = s else {
            panic!("a conversation")
        };
        assert_eq!(pairs_of(m), owned(vec![want.clone()])[0]);
    }
}

#[test]
fn capybara_messages_token_for_token_and_its_splits() {
    let want: Vec<Doc> = hub::capybara_train()
        .iter()
        .map(|(_, turns)| {
            let pairs: Vec<(&str, &str)> = turns.chunks(2).map(|c| (c[0].1, c[1].1)).collect();
            expected(&pairs)
        })
        .collect();
    stream_matches(&cfg("trl-lib/Capybara"), &want, 3);
    let test = DatasetConfig {
        split: "test".into(),
        ..cfg("trl-lib/Capybara")
    };
    stream_matches(&test, &[expected(&[("Name a prime.", "Seven.")])], 2);
    let err = Dataset::resolve(&DatasetConfig {
        split: "validation".into(),
        ..cfg("trl-lib/Capybara")
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("has no `validation` split") && err.contains("`test`, `train`"),
        "{err}"
    );
    // Message-tree options on a dataset without trees say so.
    for bad in [
        DatasetConfig {
            languages: vec!["en".into()],
            ..cfg("trl-lib/Capybara")
        },
        DatasetConfig {
            tree_paths: TreePaths::All,
            ..cfg("trl-lib/Capybara")
        },
    ] {
        let err = Dataset::resolve(&bad).unwrap_err().to_string();
        assert!(
            err.contains("applies to OpenAssistant message trees only")
                && err.contains("trl-lib/Capybara"),
            "{err}"
        );
    }
    let err = Dataset::resolve(&DatasetConfig {
        format: Format::Oasst,
        ..cfg("trl-lib/Capybara")
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("train-00000-of-00001.parquet is not an OpenAssistant message table")
            && err.contains("`source`, `messages`"),
        "{err}"
    );
}

#[test]
fn large_arrow_types_read_the_same() {
    cache();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("train-00000-of-00001.parquet");
    std::fs::write(
        &p,
        hub::parquet_bytes(&hub::capybara_table(&hub::capybara_train(), true)),
    )
    .unwrap();
    let schema = hub::capybara_table(&hub::capybara_train(), true).schema();
    // The fixture really has the large types.
    let arrow_schema::DataType::LargeList(item) = schema.field(1).data_type() else {
        panic!("{schema:?}")
    };
    let arrow_schema::DataType::Struct(turn) = item.data_type() else {
        panic!("{item:?}")
    };
    assert!(turn
        .iter()
        .all(|f| f.data_type() == &arrow_schema::DataType::LargeUtf8));
    assert_eq!(
        schema.field(0).data_type(),
        &arrow_schema::DataType::LargeUtf8
    );
    let want: Vec<Doc> = hub::capybara_train()
        .iter()
        .map(|(_, turns)| {
            let pairs: Vec<(&str, &str)> = turns.chunks(2).map(|c| (c[0].1, c[1].1)).collect();
            expected(&pairs)
        })
        .collect();
    let c = DatasetConfig {
        path: d.path().to_string_lossy().into(),
        ..cfg("")
    };
    stream_matches(&c, &want, 2);
}

#[test]
fn alpaca_cleaned_json_and_converted_parquet() {
    let want: Vec<Doc> = hub::ALPACA
        .iter()
        .map(|(i, x, o)| {
            let user = if x.is_empty() {
                i.to_string()
            } else {
                format!("{i}\n\n{x}")
            };
            expected(&[(user.as_str(), *o)])
        })
        .collect();
    stream_matches(&cfg("yahma/alpaca-cleaned"), &want, 3);
    stream_matches(&cfg("yahma/alpaca-cleaned@refs/convert/parquet"), &want, 3);
    // The JSON file names no split: it is the train split, and only that.
    let err = Dataset::resolve(&DatasetConfig {
        split: "test".into(),
        ..cfg("yahma/alpaca-cleaned")
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("no file name says which split"), "{err}");
}

#[test]
fn unrecognised_columns_are_an_error_naming_them() {
    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use std::sync::Arc;
    cache();
    let d = tempfile::tempdir().unwrap();
    let parquet = |name: &str, cols: Vec<(&str, ArrayRef)>| -> PathBuf {
        let p = d.path().join(name);
        std::fs::write(
            &p,
            hub::parquet_bytes(&RecordBatch::try_from_iter(cols).unwrap()),
        )
        .unwrap();
        p
    };
    let s = |v: &[&str]| -> ArrayRef { Arc::new(StringArray::from(v.to_vec())) };
    // Preference pairs: no format of ours; refused before streaming.
    let p = parquet(
        "pairs.parquet",
        vec![
            ("prompt", s(&["q"])),
            ("chosen", s(&["a"])),
            ("rejected", s(&["b"])),
        ],
    );
    let c = DatasetConfig {
        path: p.to_string_lossy().into(),
        ..cfg("")
    };
    let err = BatchStream::new(&c, tiny()).unwrap_err().to_string();
    assert!(
        err.contains("pairs.parquet (row 1): cannot detect the format")
            && err.contains("columns `prompt`, `chosen`, `rejected`"),
        "{err}"
    );
    // A `text` column beside structured ones is not taken as plain text...
    let p = parquet(
        "msgs.parquet",
        vec![
            ("id", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
            ("text", s(&["Hello"])),
            ("role", s(&["prompter"])),
        ],
    );
    let c = DatasetConfig {
        path: p.to_string_lossy().into(),
        ..cfg("")
    };
    let err = BatchStream::new(&c, tiny()).unwrap_err().to_string();
    assert!(
        err.contains("columns `id`, `text`, `role`: `role` belong to a structured format")
            && err.contains("format = \"text\""),
        "{err}"
    );
    // ... unless asked for.
    let text = DatasetConfig {
        format: Format::Text,
        ..c
    };
    BatchStream::new(&text, tiny())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    // Plain text with metadata columns stays text.
    let p = parquet(
        "web.parquet",
        vec![
            ("text", s(&["Some words of a web page."])),
            ("url", s(&["https://example.com"])),
            ("id", Arc::new(Int64Array::from(vec![7])) as ArrayRef),
        ],
    );
    let c = DatasetConfig {
        path: p.to_string_lossy().into(),
        ..cfg("")
    };
    BatchStream::new(&c, tiny())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    // JSON records are checked one by one, naming the line.
    let p = write(
        d.path(),
        "rows.jsonl",
        "{\"text\": \"hi\", \"parent_id\": null, \"turns\": [{\"a\": 1}]}\n",
    );
    let c = DatasetConfig {
        path: p.to_string_lossy().into(),
        ..cfg("")
    };
    let err = BatchStream::new(&c, tiny())
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rows.jsonl:1: cannot detect the format")
            && err.contains("`parent_id`, `turns` belong to a structured format"),
        "{err}"
    );
    // A message table next to other records is refused.
    let dir = d.path().join("mixed");
    std::fs::create_dir(&dir).unwrap();
    write(&dir, "a.jsonl", &hub::oasst_jsonl(&hub::OASST_VALIDATION));
    write(&dir, "b.jsonl", &common::alpaca_lines(3));
    let c = DatasetConfig {
        path: dir.to_string_lossy().into(),
        ..cfg("")
    };
    let err = Dataset::resolve(&c).unwrap_err().to_string();
    assert!(
        err.contains("b.jsonl is not an OpenAssistant message table")
            && err.contains("a split must be all one or the other"),
        "{err}"
    );
}

/// Counts the bytes this test binary has allocated, now and at the peak, so the
/// assembly's memory is measured exactly (resident-set sizes hide it behind memory
/// the allocator kept from building the fixture).
struct Counting;

static NOW: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        let now = NOW.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(now, Relaxed);
        std::alloc::System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        NOW.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// At oasst1's size: 84,400 messages in 8,440 trees (an initial prompt, three
/// ranked answers, two ranked follow-ups below the best one, each answered twice),
/// texts of 100 to 2,000 bytes (~88 MB), one Parquet file: assembly time and the
/// memory it adds. With `QTRAIN_OASST_PARQUET=FILE` that file (e.g. the real
/// oasst1 train split) is assembled instead. Ignored: run with
/// `cargo test -p qtrain-data --test hub_datasets -- --ignored --nocapture oasst1_sized`.
#[test]
#[ignore]
fn oasst1_sized_table_assembles_in_seconds() {
    use qtrain_data::oasst::{Conversations, TreeOptions};
    use qtrain_data::source::{FileKind, SourceFile};
    let d = tempfile::tempdir().unwrap();
    let synthetic = std::env::var_os("QTRAIN_OASST_PARQUET").is_none();
    let path = match std::env::var_os("QTRAIN_OASST_PARQUET") {
        Some(p) => PathBuf::from(p),
        None => {
            let trees = 8440;
            let word = "lorem ipsum dolor sit amet consectetur ";
            let mut names: Vec<[String; 10]> = Vec::with_capacity(trees);
            let mut texts: Vec<String> = Vec::with_capacity(trees * 10);
            for t in 0..trees {
                names.push(std::array::from_fn(|k| format!("t{t}-{k}")));
                for k in 0..10 {
                    let len = 100 + (t * 7919 + k * 104_729) % 1900;
                    texts.push(word.repeat(len / word.len() + 1)[..len].to_string());
                }
            }
            let mut rows = Vec::with_capacity(trees * 10);
            for (t, n) in names.iter().enumerate() {
                let text = |k: usize| texts[t * 10 + k].as_str();
                let m = |k: usize, parent: Option<usize>, role, rank| Msg {
                    rank,
                    ..hub::msg(&n[k], parent.map(|p| n[p].as_str()), &n[0], role, text(k))
                };
                rows.extend([
                    m(0, None, "prompter", None),
                    m(1, Some(0), "assistant", Some(0)),
                    m(2, Some(0), "assistant", Some(1)),
                    m(3, Some(0), "assistant", Some(2)),
                    m(4, Some(1), "prompter", Some(0)),
                    m(5, Some(1), "prompter", Some(1)),
                    m(6, Some(4), "assistant", Some(0)),
                    m(7, Some(4), "assistant", Some(1)),
                    m(8, Some(5), "assistant", Some(0)),
                    m(9, Some(5), "assistant", Some(1)),
                ]);
            }
            let p = d.path().join("train-00000-of-00001.parquet");
            std::fs::write(&p, hub::parquet_bytes(&hub::oasst_table(&rows))).unwrap();
            p
        }
    };
    let parts = [SourceFile {
        path: path.clone(),
        kind: FileKind::Parquet,
    }];
    for paths in [TreePaths::Best, TreePaths::All] {
        let opts = TreeOptions {
            languages: Vec::new(),
            paths,
            on_bad_line: OnBadLine::Error,
        };
        use std::sync::atomic::Ordering::Relaxed;
        let before = NOW.load(Relaxed);
        PEAK.store(before, Relaxed);
        let t0 = std::time::Instant::now();
        let c = Conversations::assemble(&parts, &opts).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let (peak, after) = (PEAK.load(Relaxed), NOW.load(Relaxed));
        let r = c.report();
        let texts: usize = (0..c.len())
            .flat_map(|i| c.messages(i))
            .map(|m| m.content.len())
            .sum();
        println!(
            "{} ({:.1} MB), {} paths: {} messages, {} trees -> {} conversations in {secs:.2}s; \
             allocated {:.1} MiB at the peak of assembling, {:.1} MiB held after \
             (the conversations' texts, shared ones counted per conversation: {:.1} MiB)",
            path.display(),
            std::fs::metadata(&path).unwrap().len() as f64 / 1e6,
            paths.name(),
            r.messages,
            r.trees,
            r.conversations,
            mib(peak - before),
            mib(after - before),
            mib(texts),
        );
        if synthetic {
            assert_eq!((r.messages, r.trees), (84_400, 8_440));
            // Best: P, A(rank 0), P(rank 0), A(rank 0); all: 2 + 2 under the best
            // answer, and the two other answers.
            let per_tree = if paths == TreePaths::Best { 1 } else { 6 };
            assert_eq!(r.conversations, 8_440 * per_tree);
        }
    }
}
