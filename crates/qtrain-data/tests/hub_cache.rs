//! Datasets in the Hugging Face hub cache layout, found through `$HF_HUB_CACHE`. Its
//! own test binary because it sets an environment variable.

mod common;
use qtrain_data::{BatchStream, DatasetConfig};

#[test]
fn reads_hub_cache_snapshot_with_split_and_revision() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("datasets--acme--chat");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit).join("data");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    // Real caches symlink snapshot files to blobs/.
    let blobs = repo.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let line = |a: &str| {
        format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"q\"}}, {{\"role\": \"assistant\", \"content\": \"{a}\"}}]}}\n")
    };
    std::fs::write(blobs.join("aaa"), line("train answer").repeat(3)).unwrap();
    std::fs::write(blobs.join("bbb"), line("test answer").repeat(3)).unwrap();
    std::os::unix::fs::symlink(blobs.join("aaa"), snap.join("train-00000.jsonl")).unwrap();
    std::os::unix::fs::symlink(blobs.join("bbb"), snap.join("test-00000.jsonl")).unwrap();
    std::env::set_var("HF_HUB_CACHE", cache.path());

    let cfg = DatasetConfig {
        path: "acme/chat".into(),
        eval_fraction: 0.0,
        seq_len: 64,
        batch_size: 1,
        packing: false,
        ..Default::default()
    };
    let enc = common::tiny();
    let decode = |cfg: &DatasetConfig| {
        let b = BatchStream::new(cfg, enc.clone())
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        enc.decode(&b.input_ids, true).unwrap()
    };
    assert!(decode(&cfg).contains("train answer"));
    let test = DatasetConfig {
        split: "test".into(),
        ..cfg.clone()
    };
    assert!(decode(&test).contains("test answer"));
    let pinned = DatasetConfig {
        path: format!("acme/chat@{commit}"),
        ..cfg.clone()
    };
    assert!(decode(&pinned).contains("train answer"));
    let err = BatchStream::new(
        &DatasetConfig {
            path: "acme/missing".into(),
            ..cfg.clone()
        },
        enc.clone(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("not in the Hugging Face cache") && err.contains("datasets--acme--missing"),
        "{err}"
    );
    let err = BatchStream::new(
        &DatasetConfig {
            path: "acme/chat@v9".into(),
            ..cfg
        },
        enc.clone(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("revision `v9`"), "{err}");
}
