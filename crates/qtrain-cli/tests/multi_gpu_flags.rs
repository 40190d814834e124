//! `qtrain run --gpus/--devices` and the launcher variables: what a CPU build says,
//! and the errors that name the offending flag or variable. None of these trains.

use std::process::{Command, Output};

fn qtrain(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qtrain"));
    cmd.args(args);
    for v in qtrain_dist::env::VARS {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running qtrain")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[cfg(not(feature = "cuda"))]
#[test]
fn a_cpu_build_refuses_several_gpus() {
    for args in [
        &["run", "--gpus", "2"][..],
        &["run", "--devices", "0,1"][..],
    ] {
        let o = qtrain(args, &[]);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&o).contains("multi-GPU training needs the CUDA build"),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn gpus_and_devices_exclude_each_other() {
    let o = qtrain(&["run", "--gpus", "2", "--devices", "0,1"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--devices"), "{}", stderr(&o));
}

#[test]
fn zero_gpus_is_an_error() {
    let o = qtrain(&["run", "--gpus", "0"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--gpus must be at least 1"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn launcher_variables_are_checked_by_name() {
    let o = qtrain(&["run"], &[("RANK", "1"), ("WORLD_SIZE", "2")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("environment variable MASTER_ADDR"),
        "{}",
        stderr(&o)
    );
    let o = qtrain(&["run"], &[("RANK", "2"), ("WORLD_SIZE", "2")]);
    assert!(
        stderr(&o).contains("environment variable RANK: 2 is not below WORLD_SIZE=2"),
        "{}",
        stderr(&o)
    );
}
