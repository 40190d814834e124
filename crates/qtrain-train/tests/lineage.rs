//! Nothing written is lost, and a resume says what it resumes: checkpoint lineage
//! (a reused output directory, resuming an old checkpoint with keep_last = 1, a
//! corrupt newest checkpoint, a full disk), the data cursor of a huge record, a
//! changed data file, changed settings, a finished run, a short adapter. On the
//! tiny CPU model, through the library (the binary's side is in tests/e2e).

use qtrain_train::ckpt_io;
use qtrain_train::config::RunConfig;
use qtrain_train::trainer::{run, Resume, RunOptions, RunSummary, TrainError, TrainerState};
use qtrain_train::SimClock;
use std::path::{Path, PathBuf};

fn config(out: &Path, steps: u64, extra: &str) -> RunConfig {
    let text = format!(
        r#"
[model]
path = "builtin:tiny"
device = "cpu"
[lora]
targets = ["q_proj", "v_proj"]
dropout = 0.1
[data]
seq_len = 48
batch_size = 4
eval_samples = 8
{extra}
[optimizer]
lr = 3e-3
warmup_steps = 2
[budget]
steps = {steps}
[checkpoint]
output_dir = "{}"
every_steps = 1
every_minutes = 0.0
keep_last = 2
[eval]
every_steps = 0
max_batches = 1
samples = 0
[log]
progress_bar = false
"#,
        out.display()
    );
    RunConfig::from_toml_str(&text, Path::new("test.toml"), &[]).unwrap()
}

fn opts(cfg: RunConfig, cache: &Path) -> RunOptions {
    RunOptions {
        clock: Box::new(SimClock::default()),
        ..RunOptions::new(cfg, cache.to_path_buf())
    }
}

// The trainer's error carries its context inline; boxing it for a test buys nothing.
#[allow(clippy::result_large_err)]
fn go(o: RunOptions) -> Result<RunSummary, TrainError> {
    run(o)
}

fn ckpt(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(ckpt_io::step_dir_name(step))
}

fn state(dir: &Path) -> TrainerState {
    serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap()).unwrap()
}

fn steps_on_disk(out: &Path) -> Vec<u64> {
    ckpt_io::list(&out.join("checkpoints"))
        .iter()
        .map(|l| l.manifest.step)
        .collect()
}

/// A fresh run into a directory holding another run's checkpoints refuses, naming
/// the choices; with `overwrite` it replaces that run, and its own checkpoints are
/// the only ones pruned and pointed at.
#[test]
fn a_fresh_run_refuses_a_used_output_directory() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    go(opts(config(out.path(), 3, ""), cache.path())).unwrap();
    let mut other = config(out.path(), 2, "");
    other.optimizer.lr = 1e-4;
    let e = go(opts(other.clone(), cache.path()))
        .unwrap_err()
        .to_string();
    for needle in [
        "already holds checkpoints",
        "--resume",
        "--overwrite",
        "step-00000003",
    ] {
        assert!(e.contains(needle), "{needle}: {e}");
    }
    assert_eq!(steps_on_disk(out.path()), vec![2, 3], "nothing was touched");
    let s = go(RunOptions {
        overwrite: true,
        ..opts(other, cache.path())
    })
    .unwrap();
    assert_eq!(s.steps, 2);
    assert_eq!(steps_on_disk(out.path()), vec![1, 2]);
    let latest = ckpt_io::latest(&out.path().join("checkpoints")).unwrap();
    assert_eq!(latest, ckpt(out.path(), 2));
    assert!(state(&latest).config_toml.contains("lr = 0.0001"));
}

/// Resuming an older checkpoint with keep_last = 1 never deletes it (nor is a
/// corrupt newer one the only thing left): the resumed-from checkpoint stays until
/// the run ends, and `latest` always names a complete checkpoint.
#[test]
fn resuming_an_old_checkpoint_with_keep_last_1_keeps_it() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(out.path(), 4, "");
    cfg.checkpoint.keep_last = 3;
    go(opts(cfg, cache.path())).unwrap();
    assert_eq!(steps_on_disk(out.path()), vec![2, 3, 4]);
    // Corrupt the newest; resume from the oldest with keep_last = 1.
    let four = ckpt(out.path(), 4);
    let f = four.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    let mut cfg = config(out.path(), 6, "");
    cfg.checkpoint.keep_last = 1;
    let two = ckpt(out.path(), 2);
    let s = go(RunOptions {
        resume: Some(Resume::Dir(two.clone())),
        ..opts(cfg, cache.path())
    })
    .unwrap();
    assert_eq!(s.steps, 6);
    assert!(two.exists(), "the resumed-from checkpoint was pruned");
    ckpt_io::verify(&two).unwrap();
    ckpt_io::verify(&ckpt(out.path(), 6)).unwrap();
    let latest = ckpt_io::latest(&out.path().join("checkpoints")).unwrap();
    assert_eq!(latest, ckpt(out.path(), 6));
}

/// `--resume` (latest) past a corrupt newest checkpoint: it falls back to the
/// newest complete one; naming the corrupt one explicitly is an error that names
/// the file and which check failed.
#[test]
fn a_corrupt_newest_checkpoint_falls_back_and_names_the_check() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    go(RunOptions {
        halt_at_step: Some(3),
        ..opts(config(out.path(), 6, ""), cache.path())
    })
    .unwrap();
    let three = ckpt(out.path(), 3);
    let f = three.join("adapter.safetensors");
    let n = std::fs::metadata(&f).unwrap().len();
    let mut bytes = std::fs::read(&f).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&f, &bytes).unwrap();
    let e = go(RunOptions {
        resume: Some(Resume::Dir(three.clone())),
        ..opts(config(out.path(), 6, ""), cache.path())
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("adapter.safetensors")
            && e.contains(&format!(
                "size check failed: {} bytes, the manifest says {n}",
                n - 10
            )),
        "{e}"
    );
    // Latest: step 2 is the newest complete checkpoint; the run continues from it.
    let s = go(RunOptions {
        resume: Some(Resume::Latest),
        ..opts(config(out.path(), 6, ""), cache.path())
    })
    .unwrap();
    assert_eq!(s.steps, 6);
    // The corrupt step 3 was written again by the continued run, then pruned as
    // keep_last = 2 asks: nothing corrupt is left, and `latest` is complete.
    assert!(!three.exists(), "the corrupt checkpoint is still there");
    let latest = ckpt_io::latest(&out.path().join("checkpoints")).unwrap();
    assert_eq!(latest, ckpt(out.path(), 6));
    ckpt_io::verify(&latest).unwrap();
}

/// The disk fills up while a checkpoint is written (the write-quota hook): the run
/// stops with an error that says so and how much was needed, the partial files are
/// gone, and the previous checkpoint is intact and still `latest`.
#[test]
fn a_full_disk_keeps_the_previous_checkpoint() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    go(RunOptions {
        halt_at_step: Some(2),
        ..opts(config(out.path(), 4, ""), cache.path())
    })
    .unwrap();
    let two = ckpt(out.path(), 2);
    let used: u64 = std::fs::read_dir(&two)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let e = go(RunOptions {
        resume: Some(Resume::Latest),
        write_quota: Some(used / 2),
        ..opts(config(out.path(), 4, ""), cache.path())
    })
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("no space left on the device"), "{msg}");
    assert!(msg.contains("the write needs about"), "{msg}");
    assert!(
        msg.contains("step-00000002") && msg.contains("is intact"),
        "{msg}"
    );
    let leftovers: Vec<String> = std::fs::read_dir(out.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(ckpt_io::TMP_PREFIX))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        ckpt_io::latest(&out.path().join("checkpoints")).unwrap(),
        two
    );
    ckpt_io::verify(&two).unwrap();
    // With room again, the resume goes on from it.
    let s = go(RunOptions {
        resume: Some(Resume::Latest),
        ..opts(config(out.path(), 4, ""), cache.path())
    })
    .unwrap();
    assert_eq!(s.steps, 4);
}

/// One record far longer than a row (split into thousands of pieces) keeps every
/// checkpoint's state small, and a resume inside it is exact.
#[test]
fn a_huge_record_keeps_checkpoints_small_and_resumes_exactly() {
    let cache = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let path = data.path().join("huge.jsonl");
    let mut lines = String::new();
    for i in 0..20 {
        lines.push_str(&format!(
            "{{\"instruction\": \"Echo {i}\", \"output\": \"{i}\"}}\n"
        ));
    }
    // ~250 kB of answer: ~5,000 pieces of 48 tokens.
    lines.push_str(&format!(
        "{{\"instruction\": \"Copy\", \"output\": \"{}\"}}\n",
        "lorem ipsum ".repeat(20_000)
    ));
    std::fs::write(&path, lines).unwrap();
    let extra = format!(
        "path = \"{}\"\nshuffle_buffer = 64\ntruncation = \"split\"",
        path.display()
    );
    let with = |out: &Path| config(out, 8, &extra);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let full = go(opts(with(a.path()), cache.path())).unwrap();
    for step in 1..=8 {
        let bytes = std::fs::metadata(ckpt(a.path(), step).join("trainer_state.json"))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(
            bytes < 64_000,
            "step {step}: trainer_state.json is {bytes} bytes"
        );
    }
    go(RunOptions {
        halt_at_step: Some(4),
        ..opts(with(b.path()), cache.path())
    })
    .unwrap();
    let rest = go(RunOptions {
        resume: Some(Resume::Latest),
        ..opts(with(b.path()), cache.path())
    })
    .unwrap();
    assert_eq!(
        std::fs::read(full.adapter_dir.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(rest.adapter_dir.join("adapter_model.safetensors")).unwrap()
    );
    assert_eq!(
        state(&ckpt(a.path(), 8)).data_cursor,
        state(&ckpt(b.path(), 8)).data_cursor
    );
}

/// The data file replaced under the same path: the resume refuses, naming the file
/// and what changed, unless `allow_data_change`.
#[test]
fn a_changed_data_file_is_refused_unless_allowed() {
    let cache = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let path = data.path().join("d.jsonl");
    let write = |tag: &str| {
        let lines: String = (0..60)
            .map(|i| format!("{{\"instruction\": \"{tag} {i}\", \"output\": \"{i}\"}}\n"))
            .collect();
        std::fs::write(&path, lines).unwrap();
    };
    write("Echo");
    let extra = format!("path = \"{}\"", path.display());
    let out = tempfile::tempdir().unwrap();
    go(RunOptions {
        halt_at_step: Some(2),
        ..opts(config(out.path(), 4, &extra), cache.path())
    })
    .unwrap();
    write("Ecko");
    let e = go(RunOptions {
        resume: Some(Resume::Latest),
        ..opts(config(out.path(), 4, &extra), cache.path())
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("d.jsonl") && e.contains("the first MiB differs"),
        "{e}"
    );
    assert!(e.contains("--allow-data-change"), "{e}");
    let s = go(RunOptions {
        resume: Some(Resume::Latest),
        allow_data_change: true,
        ..opts(config(out.path(), 4, &extra), cache.path())
    })
    .unwrap();
    assert_eq!(s.steps, 4);
}

/// A setting that cannot change within a run is refused by key, with its old and
/// new values, not by section.
#[test]
fn a_refused_resume_names_the_keys() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    go(RunOptions {
        halt_at_step: Some(1),
        ..opts(config(out.path(), 3, ""), cache.path())
    })
    .unwrap();
    let mut other = config(out.path(), 3, "");
    other.data.seq_len = 64;
    other.optimizer.kind = "adamw32".into();
    other.optimizer.lr = 1e-3;
    let e = go(RunOptions {
        resume: Some(Resume::Latest),
        ..opts(other, cache.path())
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("[data] seq_len: 48 -> 64"), "{e}");
    assert!(
        e.contains("[optimizer] kind: \"adamw8bit\" -> \"adamw32\""),
        "{e}"
    );
    assert!(
        !e.contains("[optimizer] lr"),
        "a changeable key is not refused: {e}"
    );
}

/// Resuming a run that finished its budget does nothing (no second final
/// evaluation in the metrics); a larger budget continues it.
#[test]
fn resuming_a_finished_run_says_so() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let first = go(opts(config(out.path(), 3, ""), cache.path())).unwrap();
    let metrics = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
    let again = go(RunOptions {
        resume: Some(Resume::Latest),
        ..opts(config(out.path(), 3, ""), cache.path())
    })
    .unwrap();
    assert!(again.already_finished);
    assert_eq!(again.steps, 3);
    assert_eq!(again.checkpoint, first.checkpoint);
    assert_eq!(
        std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap(),
        metrics,
        "nothing appended"
    );
    assert!(state(&first.checkpoint).finished);
    let more = go(RunOptions {
        resume: Some(Resume::Latest),
        ..opts(config(out.path(), 5, ""), cache.path())
    })
    .unwrap();
    assert!(!more.already_finished);
    assert_eq!(more.steps, 5);
}

/// An adapter with tensors missing (here: the last layer's) is refused by the
/// loader `eval` and `generate` use, naming what is missing.
#[test]
fn a_short_adapter_is_refused_naming_the_missing_tensors() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let s = go(opts(config(out.path(), 1, ""), cache.path())).unwrap();
    let mut adapter = qtrain_train::peft::read_peft_adapter(&s.adapter_dir).unwrap();
    let (base, _) =
        qtrain_train::models::load_base("builtin:tiny", "nf4", "cpu", "auto", cache.path())
            .unwrap();
    qtrain_train::models::lora_from_peft(&adapter, &base).unwrap();
    let last = base.config.num_hidden_layers - 1;
    adapter
        .tensors
        .retain(|t| !t.0.starts_with(&format!("layers.{last}.")));
    let e = qtrain_train::models::lora_from_peft(&adapter, &base)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("lacks 4 of the"), "{e}");
    assert!(
        e.contains(&format!(
            "base_model.model.model.layers.{last}.self_attn.q_proj.lora_A.weight"
        )),
        "{e}"
    );
}
