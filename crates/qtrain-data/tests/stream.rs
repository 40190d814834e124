//! Formats from files, packing through the stream, shuffling, epochs, the eval
//! split, cursor resume and every bad-input message.

mod common;
use common::{alpaca_lines, config, tiny, write};
use qtrain_data::{
    eval_samples, BatchStream, DataCursor, DataError, DatasetConfig, EvalStream, Format, Message,
    OnBadLine, Sample, Truncation,
};
use qtrain_step::{TokenBatch, IGNORE_INDEX};
use std::path::Path;

fn first_batches(cfg: &DatasetConfig, n: usize) -> Vec<TokenBatch> {
    BatchStream::new(cfg, tiny())
        .unwrap()
        .take(n)
        .map(|b| b.unwrap())
        .collect()
}

/// Every document of a batch as text, answers only (the trained tokens).
fn answers(b: &TokenBatch) -> Vec<String> {
    let enc = qtrain_data::Encoder::tiny();
    let mut out = Vec::new();
    for r in 0..b.batch_size {
        let row = r * b.seq_len..(r + 1) * b.seq_len;
        let (ids, labels, segs) = (
            &b.input_ids[row.clone()],
            &b.labels[row.clone()],
            &b.segment_ids[row],
        );
        let mut cur: Vec<u32> = Vec::new();
        for i in 0..ids.len() {
            if i > 0 && segs[i] != segs[i - 1] && !cur.is_empty() {
                out.push(enc.decode(&cur, true).unwrap());
                cur.clear();
            }
            if labels[i] != IGNORE_INDEX {
                cur.push(ids[i]);
            }
        }
        if !cur.is_empty() {
            out.push(enc.decode(&cur, true).unwrap());
        }
    }
    out
}

fn single_sample(dir: &Path, name: &str, content: &str, format: Format) -> Vec<String> {
    let p = write(dir, name, content);
    let cfg = DatasetConfig {
        format,
        batch_size: 1,
        packing: false,
        ..config(&p)
    };
    let b = first_batches(&cfg, 1).remove(0);
    answers(&b)
}

#[test]
fn each_format_from_files() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let alpaca = r#"{"instruction": "Add", "input": "2 3", "output": "5"}"#;
    let sharegpt =
        r#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}]}"#;
    let messages = r#"{"messages": [{"role": "prompter", "content": "q"}, {"role": "assistant", "content": "ans"}]}"#;
    let text = r#"{"text": "plain words"}"#;
    for (i, (line, want)) in [
        (alpaca, "5"),
        (sharegpt, "hey"),
        (messages, "ans"),
        (text, "plain words"),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(
            single_sample(p, &format!("{i}.jsonl"), line, Format::Auto),
            [want],
            "{line}"
        );
    }
    // Explicit formats and a JSON array file (records spanning lines, strings with
    // brackets and escaped quotes).
    let arr = "[\n  {\"instruction\": \"say ]\", \"output\": \"a \\\"}\\\" b\"},\n  {\"instruction\": \"x\",\n \"output\": \"y\"}\n]\n";
    let p2 = write(p, "arr.json", arr);
    let cfg = DatasetConfig {
        format: Format::Alpaca,
        packing: false,
        ..config(&p2)
    };
    let mut got: Vec<String> = first_batches(&cfg, 8).iter().flat_map(answers).collect();
    got.sort();
    got.dedup();
    assert_eq!(got, ["a \"}\" b", "y"]);
    // Column mapping.
    let custom = r#"{"q": "Question?", "a": "Answer"}"#;
    let p3 = write(p, "custom.jsonl", custom);
    let mut cfg = DatasetConfig {
        batch_size: 1,
        packing: false,
        ..config(&p3)
    };
    cfg.columns.instruction = "q".into();
    cfg.columns.output = "a".into();
    assert_eq!(answers(&first_batches(&cfg, 1)[0]), ["Answer"]);
}

#[test]
fn parquet_files_stream_like_json() {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use std::sync::Arc;
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("train-00000-of-00001.parquet");
    let n = 600; // several parquet read batches
    let instr: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..n).map(|i| format!("Echo {i}")),
    ));
    let out: ArrayRef = Arc::new(StringArray::from_iter_values((0..n).map(|i| i.to_string())));
    let batch = RecordBatch::try_from_iter([("instruction", instr), ("output", out)]).unwrap();
    let f = std::fs::File::create(&path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let cfg = DatasetConfig {
        path: d.path().to_string_lossy().into(),
        shuffle_buffer: 1,
        ..config(&path)
    };
    let b = first_batches(&cfg, 1).remove(0);
    assert_eq!(answers(&b)[..2], ["0", "1"]);
    // Resume mid-file seeks by row.
    let mut s = BatchStream::new(&cfg, tiny()).unwrap();
    for _ in 0..30 {
        s.next().unwrap().unwrap();
    }
    let cur = s.cursor();
    let expect: Vec<TokenBatch> = s.take(5).map(|b| b.unwrap()).collect();
    let got: Vec<TokenBatch> = BatchStream::resume(&cfg, tiny(), &cur)
        .unwrap()
        .take(5)
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(got, expect);
}

#[test]
fn packed_batches_respect_documents() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "a.jsonl", &alpaca_lines(50));
    let cfg = DatasetConfig {
        seq_len: 48,
        batch_size: 3,
        ..config(&p)
    };
    for b in first_batches(&cfg, 5) {
        assert_eq!(b.input_ids.len(), 3 * 48);
        for r in 0..3 {
            let s = &b.segment_ids[r * 48..(r + 1) * 48];
            let pos = &b.position_ids[r * 48..(r + 1) * 48];
            let lab = &b.labels[r * 48..(r + 1) * 48];
            let ids = &b.input_ids[r * 48..(r + 1) * 48];
            assert_eq!(pos[0], 0);
            assert!(s.len() > 1);
            for i in 1..48 {
                if s[i] == s[i - 1] {
                    assert_eq!(pos[i], pos[i - 1] + 1, "positions run within a document");
                } else {
                    assert_eq!(s[i], s[i - 1] + 1);
                    assert_eq!(pos[i], 0, "positions restart at each document");
                    assert_eq!(
                        lab[i], IGNORE_INDEX,
                        "a document's first token is no target"
                    );
                }
            }
            // Every document (not padding) starts with BOS and has trained tokens.
            let mut start = 0;
            for i in 1..=48 {
                if i == 48 || s[i] != s[i - 1] {
                    let is_pad =
                        lab[start..i].iter().all(|&l| l == IGNORE_INDEX) && ids[start] != 1;
                    if !is_pad {
                        assert_eq!(ids[start], 1, "BOS starts each document");
                        assert_eq!(ids[i - 1], 2, "EOS ends it");
                        assert_eq!(lab[i - 1], 2, "and EOS is trained");
                    }
                    start = i;
                }
            }
        }
        assert_eq!(
            b.valid_targets(),
            b.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
        );
    }
}

#[test]
fn shuffling_is_seeded_and_epochs_cover_everything() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "a.jsonl", &alpaca_lines(40));
    let cfg = DatasetConfig {
        seq_len: 40,
        batch_size: 1,
        packing: false,
        shuffle_buffer: 16,
        ..config(&p)
    };
    let run = |seed| -> Vec<String> {
        let cfg = DatasetConfig {
            seed,
            ..cfg.clone()
        };
        first_batches(&cfg, 80).iter().flat_map(answers).collect()
    };
    let a = run(1);
    assert_eq!(a, run(1), "same seed, same order");
    assert_ne!(a, run(2), "another seed, another order");
    let mut e0: Vec<&String> = a[..40].iter().collect();
    let mut e1: Vec<&String> = a[40..].iter().collect();
    assert_ne!(e0, e1, "each epoch is reshuffled");
    e0.sort();
    e1.sort();
    let mut all: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    all.sort();
    assert_eq!(
        e0,
        all.iter().collect::<Vec<_>>(),
        "epoch 0 sees every record once"
    );
    assert_eq!(e1, e0);
    assert_ne!(
        a[..40].to_vec(),
        (0..40).map(|i| i.to_string()).collect::<Vec<_>>(),
        "shuffled"
    );
}

fn check_resume(cfg: &DatasetConfig, total: usize) {
    let full: Vec<TokenBatch> = first_batches(cfg, total);
    for k in [0, 1, total / 3, total / 2, total - 2] {
        let mut s = BatchStream::new(cfg, tiny()).unwrap();
        for _ in 0..k {
            s.next().unwrap().unwrap();
        }
        // Through JSON, as a checkpoint would store it.
        let json = serde_json::to_string(&s.cursor()).unwrap();
        drop(s);
        let cur: DataCursor = serde_json::from_str(&json).unwrap();
        let rest: Vec<TokenBatch> = BatchStream::resume(cfg, tiny(), &cur)
            .unwrap()
            .take(total - k)
            .map(|b| b.unwrap())
            .collect();
        assert_eq!(rest, full[k..], "resume after {k} batches");
    }
}

#[test]
fn resume_is_exact_packing_and_padding_across_epochs() {
    let d = tempfile::tempdir().unwrap();
    let p1 = write(d.path(), "a.jsonl", &alpaca_lines(23));
    write(d.path(), "b.jsonl", &alpaca_lines(17));
    let _ = p1;
    let base = DatasetConfig {
        path: d.path().to_string_lossy().into(),
        eval_fraction: 0.1,
        shuffle_buffer: 7,
        seq_len: 40,
        batch_size: 2,
        ..Default::default()
    };
    // ~40 records per epoch: 30+ batches cross several epochs and blocks.
    check_resume(&base, 36);
    check_resume(
        &DatasetConfig {
            packing: false,
            ..base.clone()
        },
        50,
    );
    // A cursor from other settings is refused.
    let s = BatchStream::new(&base, tiny()).unwrap();
    let err =
        BatchStream::resume(&DatasetConfig { seed: 9, ..base }, tiny(), &s.cursor()).unwrap_err();
    assert!(matches!(err, DataError::Resume(_)), "{err}");
}

#[test]
fn eval_split_is_disjoint_and_deterministic() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "a.jsonl", &alpaca_lines(400));
    let cfg = DatasetConfig {
        eval_fraction: 0.1,
        seq_len: 40,
        batch_size: 1,
        packing: false,
        shuffle_buffer: 64,
        ..config(&p)
    };
    let eval: Vec<String> = EvalStream::new(&cfg, tiny())
        .unwrap()
        .flat_map(|b| answers(&b.unwrap()))
        .collect();
    assert!((20..70).contains(&eval.len()), "{} held out", eval.len());
    let again: Vec<String> = EvalStream::new(&cfg, tiny())
        .unwrap()
        .flat_map(|b| answers(&b.unwrap()))
        .collect();
    assert_eq!(eval, again);
    let train: Vec<String> = first_batches(&cfg, 400 - eval.len())
        .iter()
        .flat_map(answers)
        .collect();
    let mut everything: Vec<String> = train.iter().chain(&eval).cloned().collect();
    everything.sort();
    everything.dedup();
    assert_eq!(
        everything.len(),
        400,
        "train and eval partition the records"
    );
    // First-N mode, and the raw samples for generation.
    let cfg_n = DatasetConfig {
        eval_samples: Some(5),
        ..cfg
    };
    let eval_n: Vec<String> = EvalStream::new(&cfg_n, tiny())
        .unwrap()
        .flat_map(|b| answers(&b.unwrap()))
        .collect();
    let mut sorted = eval_n.clone();
    sorted.sort();
    assert_eq!(sorted, ["0", "1", "2", "3", "4"]);
    let samples = eval_samples(&cfg_n, 2).unwrap();
    assert_eq!(
        samples,
        [
            Sample::Chat(vec![Message::user("Echo 0"), Message::assistant("0")]),
            Sample::Chat(vec![Message::user("Echo 1"), Message::assistant("1")]),
        ]
    );
    let train: Vec<String> = first_batches(&cfg_n, 395)
        .iter()
        .flat_map(answers)
        .collect();
    assert_eq!(train.len(), 395);
    assert!(["0", "1", "2", "3", "4"]
        .iter()
        .all(|h| !train.contains(&h.to_string())));
}

#[test]
fn builtin_dataset_streams() {
    let cfg = DatasetConfig {
        seq_len: 128,
        batch_size: 4,
        ..Default::default()
    };
    let batches = first_batches(&cfg, 3);
    let texts: Vec<String> = batches.iter().flat_map(answers).collect();
    assert!(texts.len() >= 12, "several examples per packed row");
    let eval: Vec<TokenBatch> = EvalStream::new(&cfg, tiny())
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    let docs: usize = eval.iter().map(|b| answers(b).len()).sum();
    assert!((40..130).contains(&docs), "2% of 4000 held out, got {docs}");
}

fn stream_error(cfg: &DatasetConfig) -> String {
    let mut s = BatchStream::new(cfg, tiny()).unwrap();
    loop {
        match s
            .next()
            .expect("errors are reported before the stream ends")
        {
            Ok(_) => continue,
            Err(e) => return e.to_string(),
        }
    }
}

#[test]
fn bad_input_messages() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let good = r#"{"instruction": "a", "output": "b"}"#;
    // Malformed JSON: file:line, and skip mode counts it.
    let p = write(
        dir,
        "bad.jsonl",
        &format!(
            "{good}\n\n{{\"instruction\": \"a\", \n{}",
            format!("{good}\n").repeat(20)
        ),
    );
    let err = stream_error(&config(&p));
    assert!(
        err.contains(&format!("{}:3: malformed JSON", p.display())),
        "{err}"
    );
    // Padding mode, batch 1: the first batch comes after 8 documents, within the
    // first epoch (whose first block of 8 records holds the bad one).
    let cfg = DatasetConfig {
        on_bad_line: OnBadLine::Skip,
        batch_size: 1,
        packing: false,
        ..config(&p)
    };
    let mut s = BatchStream::new(&cfg, tiny()).unwrap();
    s.next().unwrap().unwrap();
    assert_eq!((s.stats().bad_records, s.stats().records), (1, 9));
    // Missing field names the field and the line.
    let p = write(
        dir,
        "missing.jsonl",
        &format!("{good}\n{{\"instruction\": \"a\", \"outptu\": \"b\"}}\n"),
    );
    let cfg = DatasetConfig {
        format: Format::Alpaca,
        ..config(&p)
    };
    let err = stream_error(&cfg);
    assert!(
        err.contains("missing.jsonl:2: missing field `output` (alpaca format)"),
        "{err}"
    );
    let p = write(dir, "turn.jsonl", r#"{"messages": [{"role": "user"}]}"#);
    let err = stream_error(&config(&p));
    assert!(
        err.contains("turn.jsonl:1: missing field `messages[0].content`"),
        "{err}"
    );
    // Unknown format lists the fields found.
    let p = write(dir, "odd.jsonl", r#"{"prompt": "a", "completion": "b"}"#);
    let err = stream_error(&config(&p));
    assert!(
        err.contains("odd.jsonl:1: cannot detect the format") && err.contains("`prompt`"),
        "{err}"
    );
    // Wrong types and unknown roles.
    let p = write(
        dir,
        "role.jsonl",
        r#"{"conversations": [{"from": "narrator", "value": "x"}]}"#,
    );
    let err = stream_error(&config(&p));
    assert!(
        err.contains("conversations[0].from` has unknown role `narrator`"),
        "{err}"
    );
    let p = write(dir, "type.jsonl", r#"{"text": 5}"#);
    assert!(stream_error(&config(&p)).contains("field `text` must be a string, found a number"));
    // Template refusal carries the location.
    let p = write(
        dir,
        "tmpl.jsonl",
        r#"{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}"#,
    );
    let err = stream_error(&config(&p));
    assert!(
        err.contains("tmpl.jsonl:1: chat template: ") && err.contains("alternate"),
        "{err}"
    );
    // Nothing trainable (no assistant turn) is an empty dataset, never trained on.
    let p = write(
        dir,
        "noans.jsonl",
        r#"{"messages": [{"role": "user", "content": "x"}]}"#,
    );
    let err = stream_error(&config(&p));
    assert!(
        err.contains("is empty") && err.contains("1 without any trainable token"),
        "{err}"
    );
    // Empty file, and everything held out.
    let p = write(dir, "empty.jsonl", "\n");
    assert!(stream_error(&config(&p)).contains("is empty"));
    let p = write(dir, "one.jsonl", good);
    let cfg = DatasetConfig {
        eval_samples: Some(1),
        ..config(&p)
    };
    let err = stream_error(&cfg);
    assert!(err.contains("1 held out for eval"), "{err}");
    // Too long: dropped and counted.
    let long = format!(r#"{{"instruction": "a", "output": "{}"}}"#, "x".repeat(200));
    let p = write(
        dir,
        "long.jsonl",
        &format!("{long}\n{}", format!("{good}\n").repeat(20)),
    );
    let cfg = DatasetConfig {
        truncation: Truncation::Drop,
        batch_size: 1,
        packing: false,
        ..config(&p)
    };
    let mut s = BatchStream::new(&cfg, tiny()).unwrap();
    s.next().unwrap().unwrap();
    assert_eq!(s.stats().dropped_too_long, 1);
    // Split: pieces of seq_len.
    let cfg = DatasetConfig {
        truncation: Truncation::Split,
        ..cfg
    };
    let mut s = BatchStream::new(&cfg, tiny()).unwrap();
    let b = s.next().unwrap().unwrap();
    assert!(b.seq_len <= 64);
    assert_eq!(s.stats().split, 1);
    let st = s.stats();
    assert_eq!(
        st.documents,
        st.records + 3,
        "the long sample became 4 pieces of <= 64 tokens"
    );
    // Config and source errors come from the constructor.
    let err = BatchStream::new(
        &DatasetConfig {
            seq_len: 1,
            ..config(&p)
        },
        tiny(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("`seq_len`"), "{err}");
    let err = BatchStream::new(&config(&dir.join("nope.jsonl")), tiny()).unwrap_err();
    assert!(err.to_string().contains("no such file"), "{err}");
    let bad: Result<DatasetConfig, _> = serde_json::from_str(r#"{"pth": "x"}"#);
    assert!(bad.unwrap_err().to_string().contains("unknown field `pth`"));
}

#[test]
fn truncated_json_array_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "cut.json", "[{\"text\": \"a\"},\n{\"text\": \"b");
    let err = stream_error(&DatasetConfig {
        batch_size: 1,
        ..config(&p)
    });
    assert!(
        err.contains("cut.json:2") && err.contains("unexpected end of file"),
        "{err}"
    );
}
