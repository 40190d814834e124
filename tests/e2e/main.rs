//! End-to-end tests of the real `qtrain` binary on the built-in tiny CPU model:
//! a run with a budget, resume, export and evaluation of the export, the doctor on
//! the CPU, and what a demanding user meets (issue 16): bad budgets and config
//! errors, signals and their exit codes, a reused output directory, a finished
//! run, kill -9 at random moments, short adapters, error messages.
//!
//! The whole-process budget timing is its own test binary (`tests/budget`), so
//! these tests running in parallel do not disturb it.

#[path = "../common/mod.rs"]
mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A run stopped at step 3 and resumed ends bit-exactly where an uninterrupted
/// run ends; its checkpoint exports as a PEFT adapter and as a merged model, and
/// both evaluate to the loss the adapter gives.
#[test]
fn a_run_resumes_exports_and_its_export_evaluates() {
    let (a, b, x) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    // A short warm-up, so that six steps visibly train.
    let steps = ["--steps", "6", "--set", "optimizer.warmup_steps=2"];
    let full = ok(quick_run(a.path(), &steps));
    assert!(
        stdout(&full).contains("trained 6 steps"),
        "{}",
        stdout(&full)
    );
    let half = ok(quick_run(
        b.path(),
        &[&steps[..], &["--stop-at-step", "3"]].concat(),
    ));
    let said = stdout(&half);
    assert!(said.contains("trained 3 steps"), "{said}");
    let resume = said
        .lines()
        .find_map(|l| l.strip_prefix("resume with:  "))
        .unwrap_or_else(|| panic!("no resume command in {said}"));
    assert!(resume.ends_with("--stop-at-step 3 --resume"), "{resume}");
    let rest = ok(quick_run(b.path(), &[&steps[..], &["--resume"]].concat()));
    assert!(
        stdout(&rest).contains("trained 6 steps"),
        "{}",
        stdout(&rest)
    );
    let adapter = |d: &Path| read(d.join("adapter/adapter_model.safetensors"));
    assert_eq!(adapter(a.path()), adapter(b.path()), "resume is bit-exact");

    // One permission mode for every file of a checkpoint.
    use std::os::unix::fs::PermissionsExt;
    let six = checkpoint(b.path(), 6);
    let modes: std::collections::BTreeSet<u32> = std::fs::read_dir(&six)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().permissions().mode() & 0o777)
        .collect();
    assert_eq!(modes.len(), 1, "{modes:?}");

    // Export: the checkpoint's adapter is the run's adapter.
    let peft = x.path().join("peft");
    let mut export = qtrain(["export", "--checkpoint"]);
    export.arg(&six).arg("--out").arg(&peft);
    ok(export);
    assert_eq!(
        read(peft.join("adapter_model.safetensors")),
        adapter(b.path())
    );
    // A non-empty output directory is refused unless --force.
    let o = fails({
        let mut c = qtrain(["export", "--checkpoint"]);
        c.arg(&six).arg("--out").arg(&peft);
        c
    });
    assert!(
        stderr(&o).contains("not empty") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    let mut export = qtrain(["export", "--force", "--checkpoint"]);
    export.arg(&six).arg("--out").arg(&peft);
    ok(export);

    // The export evaluates: lower loss than the base alone.
    let eval = |model: &Path, adapter: Option<&Path>, quant: &str| {
        let mut c = qtrain(["eval", "--data", "builtin:instructions", "--seq-len", "64"]);
        c.args([
            "--max-batches",
            "3",
            "--device",
            "cpu",
            "--quantization",
            quant,
        ]);
        c.arg("--model").arg(model);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        eval_loss(&ok(c))
    };
    let tiny = Path::new("builtin:tiny");
    let base = eval(tiny, None, "nf4");
    let trained = eval(tiny, Some(&peft), "nf4");
    assert!(trained < base - 0.01, "adapter {trained} vs base {base}");
    // Merged onto the dequantized NF4 base (what it was trained against) and read
    // back unquantized: the adapter's loss, up to the merged weights' bf16 rounding.
    let merged = x.path().join("merged");
    let mut export = qtrain([
        "export",
        "--merged",
        "--merge-base",
        "dequantized",
        "--checkpoint",
    ]);
    export.arg(&six).arg("--out").arg(&merged);
    ok(export);
    let m = eval(&merged, None, "none");
    assert!(
        (m - trained).abs() < 0.02 * trained,
        "merged {m} vs adapter {trained}"
    );
}

/// The doctor checks GPU installs; a CPU build says how to get one that can.
#[cfg(not(feature = "cuda"))]
#[test]
fn the_doctor_on_the_cpu_says_what_to_build() {
    let o = fails(qtrain(["doctor"]));
    assert!(
        stderr(&o).contains("built without CUDA") && stderr(&o).contains("--features cuda"),
        "{}",
        stderr(&o)
    );
}

/// `doctor --cpu --only GROUP` runs that group alone (what a profiler is pointed at).
#[test]
fn the_doctor_runs_one_group_on_request() {
    let o = ok(qtrain(["doctor", "--cpu", "--only", "attention"]));
    let out = stdout(&o);
    let checks: Vec<&str> = out.lines().filter(|l| l.ends_with(" ok")).collect();
    assert!(!checks.is_empty(), "{out}");
    assert!(checks.iter().all(|l| l.starts_with("attention")), "{out}");
    assert!(out.contains("all checks passed"), "{out}");
    // A group that does not exist is a usage error (exit 2) naming the groups.
    let o = qtrain(["doctor", "--cpu", "--only", "nothing"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("attention, optimizer"),
        "{}",
        stderr(&o)
    );
}

/// Budgets no run can use are refused at once, by flag or key, before loading
/// anything, never with a panic or TOML internals.
#[test]
fn absurd_budget_flags_are_refused_before_loading() {
    let out = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (
            &["--hours", "6e15"][..],
            "--hours 6000000000000000: longer than a year",
        ),
        (
            &["--minutes", "1e18"],
            "--minutes 1000000000000000000: longer",
        ),
        (&["--hours", "1e300"], "longer than a year"),
        (
            &["--minutes", "nan"],
            "--minutes NaN: not a number of minutes",
        ),
        (&["--minutes", "-5"], "the budget must be a positive number"),
        (
            &["--steps", "0"],
            "--steps 0: a run needs at least one step",
        ),
        (
            &["--hours", "1", "--set", "budget.reserve_seconds=1e30"],
            "budget.reserve_seconds: 1000000000000000000000000000000 is longer than a year",
        ),
    ] {
        let o = fails(quick_run(out.path(), args));
        let e = stderr(&o);
        assert!(e.contains(needle), "{args:?}: {e}");
        assert!(!e.contains("loaded"), "{args:?} loaded the model: {e}");
        assert!(!e.contains("v = "), "{args:?}: TOML internals: {e}");
    }
    assert!(!out.path().join("checkpoints").exists());
}

/// A budget below what the run's fixed costs take is an error with the numbers,
/// not an exit 0 with an untrained adapter; with the timings of an earlier run of
/// the model (the warm-up run's), it is refused before loading.
#[test]
fn a_budget_below_one_step_is_an_error_with_the_numbers() {
    let out = tempfile::tempdir().unwrap();
    let o = fails(quick_run(out.path(), &["--minutes", "0.0001"]));
    let e = stderr(&o);
    assert!(
        e.contains("the time budget (0.006 s) cannot hold this run's fixed costs"),
        "{e}"
    );
    assert!(
        e.contains("nothing was loaded") && e.contains("loading ~"),
        "{e}"
    );
    assert!(e.contains("Give a budget of at least"), "{e}");
    assert!(!out.path().join("adapter").exists());
}

/// With a budget flag, config errors still point at the line and column of the
/// user's file, and name the key.
#[test]
fn config_errors_point_into_the_users_file_with_a_budget_flag() {
    let d = tempfile::tempdir().unwrap();
    let mut text = String::from("[model]\npath = \"builtin:tiny\"\ndevice = \"cpu\"\n");
    while text.lines().count() < 14 {
        text.push_str("# a comment line\n");
    }
    text.push_str("[optimizer]\nlr = \"fast\"\n");
    let wrong_type = d.path().join("wrong-type.toml");
    std::fs::write(&wrong_type, &text).unwrap();
    let mut run = qtrain(["run", "--minutes", "1", "--config"]);
    run.arg(&wrong_type);
    let o = fails(run);
    let e = stderr(&o);
    assert!(
        e.contains("wrong-type.toml:16:6: optimizer.lr: "),
        "the wrong type is on line 16: {e}"
    );
    let mut text = String::from("[budget]\nhours = 2.0\n");
    while text.lines().count() < 16 {
        text.push_str("# a comment line\n");
    }
    text.push_str("[lora]\nrnak = 4\n");
    let unknown = d.path().join("unknown-key.toml");
    std::fs::write(&unknown, &text).unwrap();
    let mut run = qtrain(["run", "--hours", "1", "--config"]);
    run.arg(&unknown);
    let o = fails(run);
    let e = stderr(&o);
    assert!(e.contains("unknown-key.toml:18:1: lora.rnak: "), "{e}");
    let o = fails(qtrain(["run", "--steps", "1", "--set", "optimizer.lrr=1"]));
    assert!(
        stderr(&o).contains("--set optimizer.lrr=1"),
        "{}",
        stderr(&o)
    );
}

/// Starts a run with a long budget, waits until it trains, sends `signal`: the run
/// checkpoints, prints the exact resume command and exits 128 + signal.
fn stopped_by(signal: libc::c_int, out: &Path) -> (std::process::ExitStatus, String) {
    let mut child = quick_run(out, &["--minutes", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in err.lines() {
            let line = line.unwrap();
            if line.contains("plan: ") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the run did not start training");
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling the child we spawned.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let o = child.wait_with_output().unwrap();
    let err = reader.join().unwrap();
    assert!(err.contains("signal received"), "{err}");
    (o.status, stdout(&o))
}

#[test]
fn sigterm_exits_143_and_sigint_130_with_the_resume_command() {
    for (signal, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let out = tempfile::tempdir().unwrap();
        let (status, said) = stopped_by(signal, out.path());
        assert_eq!(status.code(), Some(code), "{said}");
        assert!(said.contains("(stopped by signal)"), "{said}");
        let resume = said
            .lines()
            .find_map(|l| l.strip_prefix("resume with:  "))
            .unwrap_or_else(|| panic!("no resume command: {said}"));
        let expected = format!(
            "{} run --out {} --set eval.samples=0 --set eval.max_batches=1 --set \
             eval.every_steps=0 --set log.tensorboard=false --minutes 5 --resume",
            exe(),
            out.path().display()
        );
        assert_eq!(resume, expected);
        let latest = std::fs::read_to_string(out.path().join("checkpoints/latest")).unwrap();
        assert!(out
            .path()
            .join("checkpoints")
            .join(latest.trim())
            .join("manifest.json")
            .exists());
    }
}

/// A fresh run into a directory with checkpoints refuses (naming --resume and
/// --overwrite); --overwrite replaces the earlier run.
#[test]
fn a_fresh_run_into_a_used_output_directory_asks_what_to_do() {
    let out = tempfile::tempdir().unwrap();
    ok(quick_run(out.path(), &["--steps", "2"]));
    let o = fails(quick_run(out.path(), &["--steps", "3"]));
    let e = stderr(&o);
    for needle in [
        "already holds checkpoints",
        "--resume",
        "--overwrite",
        "--out DIR",
    ] {
        assert!(e.contains(needle), "{needle}: {e}");
    }
    ok(quick_run(out.path(), &["--steps", "3", "--overwrite"]));
    // Only the new run is left: its final checkpoint, and one budget record.
    assert!(!checkpoint(out.path(), 2).exists());
    assert!(checkpoint(out.path(), 3).join("manifest.json").exists());
    let metrics = String::from_utf8(read(out.path().join("metrics.jsonl"))).unwrap();
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("budget/wall_s"))
            .count(),
        1,
        "{metrics}"
    );
}

/// Resuming a finished run says so and adds nothing to the metrics.
#[test]
fn resuming_a_finished_run_says_it_is_finished() {
    let out = tempfile::tempdir().unwrap();
    ok(quick_run(out.path(), &["--steps", "2"]));
    let before = read(out.path().join("metrics.jsonl"));
    let o = ok(quick_run(out.path(), &["--steps", "2", "--resume"]));
    assert!(
        stdout(&o).contains("nothing to do") && stdout(&o).contains("finished run"),
        "{}",
        stdout(&o)
    );
    assert_eq!(read(out.path().join("metrics.jsonl")), before);
}

/// kill -9 at random moments (loading, training, writing checkpoints, exporting),
/// each time resumed: the final adapter is bit for bit the uninterrupted run's.
#[test]
fn kill_9_at_random_moments_keeps_resuming_bit_exactly() {
    let args = [
        "--steps",
        "24",
        "--set",
        "checkpoint.every_steps=1",
        "--set",
        "lora.dropout=0.1",
    ];
    let straight = tempfile::tempdir().unwrap();
    let t = Instant::now();
    ok(quick_run(straight.path(), &args));
    let took = t.elapsed();
    // A fixed seed: the same moments on every run of the test (an LCG is enough).
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut uniform = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    // Resume whenever a complete checkpoint exists (a kill can land between a
    // checkpoint's rename and the `latest` pointer's update).
    let has_checkpoint = |d: &Path| {
        std::fs::read_dir(d.join("checkpoints")).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.path().join("manifest.json").exists())
        })
    };
    // The moments are fractions of the straight run's time. That run may have been
    // slowed by the other tests beside it, so a round in which the run finishes
    // before its second kill starts afresh with the moments halved.
    let mut round = |scale: f64| {
        let killed = tempfile::tempdir().unwrap();
        let mut kills = 0;
        for _ in 0..4 {
            let resume = has_checkpoint(killed.path());
            let mut cmd = quick_run(killed.path(), &args);
            if resume {
                cmd.arg("--resume");
            }
            let mut child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(took.mul_f64(scale * (0.05 + 0.4 * uniform())));
            if child.try_wait().unwrap().is_some() {
                break;
            }
            child.kill().unwrap();
            child.wait().unwrap();
            kills += 1;
        }
        (killed, kills)
    };
    let (mut killed, mut kills) = round(1.0);
    for halvings in 1..4 {
        if kills >= 2 {
            break;
        }
        (killed, kills) = round(0.5f64.powi(halvings));
    }
    assert!(
        kills >= 2,
        "the run finished before it could be killed twice, in four rounds"
    );
    let mut cmd = quick_run(killed.path(), &args);
    if has_checkpoint(killed.path()) {
        cmd.arg("--resume");
    }
    ok(cmd);
    let adapter = |d: &Path| read(d.join("adapter/adapter_model.safetensors"));
    assert_eq!(
        adapter(straight.path()),
        adapter(killed.path()),
        "after {kills} kills"
    );
    let state = |d: &Path| read(checkpoint(d, 24).join("adapter.safetensors"));
    assert_eq!(state(straight.path()), state(killed.path()));
}

/// An adapter with a layer's tensors missing is refused by eval, generate and
/// export --merged, each naming the --adapter/--checkpoint and the tensors.
#[test]
fn a_short_adapter_is_refused_by_eval_generate_and_merged_export() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    ok(quick_run(&run, &["--steps", "1"]));
    let mut adapter = qtrain_train::peft::read_peft_adapter(&run.join("adapter")).unwrap();
    adapter.tensors.retain(|t| !t.0.starts_with("layers.3."));
    let short = d.path().join("short");
    qtrain_train::peft::write_peft_adapter(
        &short,
        &adapter.tensors,
        &adapter.settings,
        qtrain_train::peft::PeftDtype::F32,
    )
    .unwrap();
    let missing = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight";
    let mut eval = qtrain([
        "eval",
        "--model",
        "builtin:tiny",
        "--data",
        "builtin:instructions",
    ]);
    eval.args(["--device", "cpu", "--adapter"]).arg(&short);
    let mut generate = qtrain(["generate", "--model", "builtin:tiny", "--prompt", "hi"]);
    generate.args(["--device", "cpu", "--adapter"]).arg(&short);
    for cmd in [eval, generate] {
        let o = fails(cmd);
        let e = stderr(&o);
        assert!(e.contains(&format!("--adapter {}", short.display())), "{e}");
        assert!(
            e.contains("the adapter lacks 14 of the 56") && e.contains(missing),
            "{e}"
        );
    }
    let o = fails({
        let mut c = qtrain(["export", "--merged", "--checkpoint"]);
        c.arg(&short).arg("--out").arg(d.path().join("merged"));
        c
    });
    assert!(stderr(&o).contains(missing), "{}", stderr(&o));
    assert!(!d.path().join("merged").exists());
}

/// Inputs are checked before the model is loaded, and errors say what is wrong
/// once: a model without a tokenizer, a missing data file, a directory that is not
/// a checkpoint.
#[test]
fn bad_inputs_are_named_before_loading_and_once() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("no-tokenizer");
    std::fs::create_dir_all(&model).unwrap();
    let tiny = cache().join("builtin/tiny-seed0");
    for e in std::fs::read_dir(&tiny).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "tokenizer.json" {
            std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
        }
    }
    let model_path = format!("model.path={}", model.display());
    let o = fails(quick_run(
        &d.path().join("out"),
        &["--steps", "1", "--set", &model_path],
    ));
    let e = stderr(&o);
    assert!(e.contains("tokenizer"), "{e}");
    assert!(!e.contains("loaded "), "the model was loaded first: {e}");

    let o = fails(quick_run(
        &d.path().join("out2"),
        &["--steps", "1", "--set", "data.path=/no/such/data.jsonl"],
    ));
    let e = stderr(&o);
    assert!(e.contains("/no/such/data.jsonl"), "{e}");
    let os = std::io::Error::from(std::io::ErrorKind::NotFound).to_string();
    assert!(e.matches(&os).count() <= 1, "the OS error repeats: {e}");
    assert!(!e.contains("loaded "), "{e}");

    let mut export = qtrain(["export", "--out"]);
    export
        .arg(d.path().join("x"))
        .arg("--checkpoint")
        .arg(d.path());
    let o = fails(export);
    let e = stderr(&o);
    assert!(
        e.contains("neither a qtrain checkpoint (it has no trainer_state.json) nor a PEFT adapter"),
        "{e}"
    );
}
