//! Streaming a large file keeps memory bounded: a counting allocator measures the
//! peak of live heap bytes while a 64 MB JSONL file is read end to end (reader
//! layer, and the eval stream, which scans every record), and while the training
//! stream runs over it. Its own test binary, so no other test allocates meanwhile.

mod common;
use qtrain_data::source::{Dataset, ReadPos};
use qtrain_data::{BatchStream, DatasetConfig, EvalStream};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Peak live bytes above the level at the start of `f`.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

#[test]
fn large_file_streams_in_bounded_memory() {
    const MB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut written = 0;
    let mut i = 0u64;
    while written < 64 * MB {
        let line = format!(
            "{{\"instruction\": \"Record {i}: {}\", \"output\": \"{}\"}}\n",
            "lorem ipsum dolor ".repeat(40),
            i % 97
        );
        f.write_all(line.as_bytes()).unwrap();
        written += line.len();
        i += 1;
    }
    f.flush().unwrap();
    drop(f);
    let records = i;
    let cfg = DatasetConfig {
        path: path.to_string_lossy().into(),
        seq_len: 256,
        batch_size: 4,
        shuffle_buffer: 1024,
        eval_fraction: 0.002,
        ..Default::default()
    };

    // The reader alone, every record.
    let ds = Dataset::resolve(&cfg).unwrap();
    let (n, peak) = peak_during(|| {
        let mut r = ds.open(0, ReadPos::default()).unwrap();
        let mut n = 0u64;
        while let Some(rec) = r.next_record().unwrap() {
            assert!(rec.value.is_ok());
            n += 1;
        }
        n
    });
    assert_eq!(n, records);
    eprintln!("reader peak: {peak} bytes over {written} bytes");
    assert!(
        peak < 2 * MB,
        "reader peak {peak} bytes for a {written}-byte file"
    );

    // The eval stream reads every record (it must look at all of them to find the
    // held-out ones) and tokenizes those.
    let enc = common::tiny();
    let (eval_records, peak) = peak_during(|| {
        let mut s = EvalStream::new(&cfg, enc.clone()).unwrap();
        for b in s.by_ref() {
            b.unwrap();
        }
        s.stats().eval_records
    });
    assert!(eval_records > 0 && eval_records < records / 100);
    eprintln!("eval scan peak: {peak} bytes");
    assert!(peak < 8 * MB, "eval scan peak {peak} bytes");

    // Training: shuffle buffer of 1024 records (~1 MB) plus prefetched batches.
    let (_, peak) = peak_during(|| {
        let s = BatchStream::new(&cfg, enc.clone()).unwrap();
        for b in s.take(300) {
            b.unwrap();
        }
    });
    eprintln!("training stream peak: {peak} bytes");
    assert!(peak < 24 * MB, "training stream peak {peak} bytes");
}
