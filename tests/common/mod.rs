//! What the end-to-end tests share: the real `qtrain` binary (built by cargo for
//! these tests), one qtrain cache per test run (the built-in tiny model, its NF4
//! copy and the timing history, made once by a short warm-up run), and helpers to
//! run it and read what it wrote.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The binary under test.
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_qtrain")
}

/// The qtrain cache of these tests (under cargo's target directory, so a second
/// test run reuses the generated model), warmed up by a 2-step run.
pub fn cache() -> &'static Path {
    static CACHE: OnceLock<PathBuf> = OnceLock::new();
    CACHE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qtrain-e2e-cache");
        std::fs::create_dir_all(&dir).unwrap();
        let warm = dir.join("warm-up-run");
        let _ = std::fs::remove_dir_all(&warm);
        let mut cmd = bare(&dir);
        cmd.args(["run", "--steps", "2", "--out"]).arg(&warm);
        ok(cmd);
        dir
    })
}

fn bare(cache: &Path) -> Command {
    let mut cmd = Command::new(exe());
    cmd.env("QTRAIN_CACHE", cache).env("RUST_LOG", "info");
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

/// `qtrain ARGS` with the tests' cache.
pub fn qtrain<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = bare(cache());
    cmd.args(args);
    cmd
}

/// `qtrain run` of the built-in tiny demo into `out`, kept short (one eval batch,
/// no periodic evaluation, no sample answers), with `extra` arguments.
pub fn quick_run(out: &Path, extra: &[&str]) -> Command {
    let mut cmd = qtrain(["run", "--out"]);
    cmd.arg(out);
    for s in [
        "eval.samples=0",
        "eval.max_batches=1",
        "eval.every_steps=0",
        "log.tensorboard=false",
    ] {
        cmd.args(["--set", s]);
    }
    cmd.args(extra);
    cmd
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `cmd`, which must succeed.
pub fn ok(mut cmd: Command) -> Output {
    let o = cmd.output().expect("running qtrain");
    assert!(
        o.status.success(),
        "{cmd:?} exited with {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    o
}

/// Runs `cmd`, which must fail with exit status 1 (an error, not a panic).
pub fn fails(mut cmd: Command) -> Output {
    let o = cmd.output().expect("running qtrain");
    assert_eq!(
        o.status.code(),
        Some(1),
        "{cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
        stdout(&o),
        stderr(&o)
    );
    o
}

pub fn read(p: impl AsRef<Path>) -> Vec<u8> {
    let p = p.as_ref();
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn checkpoint(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:08}"))
}

/// The mean token loss `qtrain eval` printed.
pub fn eval_loss(o: &Output) -> f64 {
    let s = stdout(o);
    s.split("mean token loss: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no loss in {s}"))
}
