//! End to end: `qtrain run --config configs/a10.toml --set data.path=OpenAssistant/oasst1`
//! with a hub cache holding oasst1 as the hub stores it (the fixture of
//! qtrain-data's tests) as `HF_HOME`: the message table is assembled into
//! conversations and trained on. On the CPU the model is overridden to
//! `builtin:tiny`, the rest of the A10 configuration stays.

#[path = "../../qtrain-data/tests/common/hub.rs"]
mod hub;

use std::path::Path;
use std::process::Command;

#[test]
fn a10_config_trains_on_assembled_oasst1_conversations() {
    let home = tempfile::tempdir().unwrap();
    hub::oasst1(&home.path().join("hub"));
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/a10.toml");
    let set = |kv: String| ["--set".to_string(), kv];
    let mut args: Vec<String> = vec![
        "run".into(),
        "--config".into(),
        config.to_string_lossy().into(),
    ];
    for kv in [
        "data.path=OpenAssistant/oasst1".to_string(),
        // What a CPU needs instead of Mistral-7B on a CUDA device.
        "model.path=builtin:tiny".into(),
        "model.device=cpu".into(),
        "model.dtype=auto".into(),
        // Small steps: the fixture has three conversations.
        "data.batch_size=2".into(),
        "train.grad_accum=1".into(),
        // Hold out the first conversation, so there is an eval loss.
        "data.eval_samples=1".into(),
        "eval.samples=1".into(),
        "eval.max_new_tokens=4".into(),
        format!("checkpoint.output_dir={}", out.path().display()),
    ] {
        args.extend(set(kv));
    }
    args.extend(["--steps".into(), "3".into()]);
    let o = Command::new(env!("CARGO_BIN_EXE_qtrain"))
        .args(&args)
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .env("QTRAIN_CACHE", cache.path())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{stdout}\n{stderr}");
    // The table was assembled, with its counts and the orphan reported.
    assert!(
        stderr.contains("OpenAssistant message trees in")
            && stderr.contains("train-00000-of-00001-b42a775f407cee45.parquet")
            && stderr.contains("25 messages, 6 trees -> 3 conversations"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 message whose parent_id names no message of this split"),
        "{stderr}"
    );
    assert!(stdout.contains("trained 3 steps"), "{stdout}");
    assert!(stdout.contains("eval loss:"), "{stdout}");

    // The checkpoint's data cursor: conversations read and trained on, none bad,
    // and each one whole document (a message fragment would not be).
    let ckpt = out.path().join("checkpoints");
    let last = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(last.join("trainer_state.json")).unwrap())
            .unwrap();
    let stats = &state["data_cursor"]["stats"];
    let n = |k: &str| stats[k].as_u64().unwrap_or_else(|| panic!("{k}: {stats}"));
    assert!(n("records") >= 2, "{stats}");
    assert_eq!(n("documents"), n("records"), "{stats}");
    assert_eq!(
        (n("bad_records"), n("no_trainable_tokens"), n("split")),
        (0, 0, 0),
        "{stats}"
    );
    assert!(n("valid_tokens") > 0, "{stats}");
    // Two of three conversations train; the first is held out (once per epoch).
    assert!(n("eval_records") >= 1, "{stats}");
}
