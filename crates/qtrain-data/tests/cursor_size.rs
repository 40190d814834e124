//! The training stream's cursor stays small whatever the records: a record far
//! longer than a row is split into thousands of pieces, and the cursor (what every
//! checkpoint stores) holds at most a batch's worth of them, yet resuming from it
//! anywhere inside that record continues exactly.

mod common;
use common::{config, tiny, write};
use qtrain_data::{BatchStream, DataCursor, DatasetConfig, Truncation};
use qtrain_step::TokenBatch as Batch;

#[test]
fn a_huge_record_keeps_the_cursor_small_and_resume_exact() {
    let d = tempfile::tempdir().unwrap();
    // ~200 kB of answer: ~3,000 pieces of 64 tokens, ~1,500 batches of two rows.
    let long = "abcdefghij ".repeat(20_000);
    let lines = format!(
        "{{\"instruction\": \"short one\", \"output\": \"1\"}}\n\
         {{\"instruction\": \"Copy\", \"output\": \"{long}\"}}\n\
         {{\"instruction\": \"short two\", \"output\": \"2\"}}\n"
    );
    let p = write(d.path(), "huge.jsonl", &lines);
    let cfg = DatasetConfig {
        truncation: Truncation::Split,
        shuffle_buffer: 1,
        ..config(&p)
    };
    let total = 40;
    let full: Vec<Batch> = BatchStream::new(&cfg, tiny())
        .unwrap()
        .take(total)
        .map(|b| b.unwrap())
        .collect();
    let mut s = BatchStream::new(&cfg, tiny()).unwrap();
    let mut largest = 0;
    for k in 0..total - 3 {
        let cursor = s.cursor();
        let json = serde_json::to_string(&cursor).unwrap();
        largest = largest.max(json.len());
        if k % 7 == 3 {
            // Resume from here (inside the long record's pieces for most k).
            let cur: DataCursor = serde_json::from_str(&json).unwrap();
            let rest: Vec<Batch> = BatchStream::resume(&cfg, tiny(), &cur)
                .unwrap()
                .take(3)
                .map(|b| b.unwrap())
                .collect();
            assert_eq!(rest, full[k..k + 3], "resume after {k} batches");
        }
        s.next().unwrap().unwrap();
    }
    // One batch of 2 x 64 tokens being filled and one ready, as JSON numbers, plus
    // the counters: a few kB, not the record's 3,000 pieces (~1 MB).
    assert!(
        largest < 16_000,
        "the cursor grew to {largest} bytes of JSON"
    );
    assert!(
        s.cursor().carry_fed.is_some(),
        "still inside the long record"
    );
}
