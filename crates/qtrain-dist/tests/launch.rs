//! The supervisor with real child processes (`sh -c` scripts stand in for the
//! workers): the launcher variables, clean runs, failures that take the run down
//! quickly and name the rank, workers that ignore SIGTERM, stuck workers.

use qtrain_dist::launch::{launch_local, LaunchError, LaunchSpec};
use std::ffi::OsString;
use std::time::{Duration, Instant};

fn sh(script: &str, devices: &[&str]) -> LaunchSpec {
    let mut spec = LaunchSpec::new(
        "/bin/sh",
        vec![OsString::from("-c"), OsString::from(script)],
        devices.iter().map(|d| d.to_string()).collect(),
    );
    spec.grace = Duration::from_millis(500);
    spec.finish_timeout = Duration::from_secs(20);
    spec
}

/// Sleeps until SIGTERM, then exits 0 (a trainer writing its checkpoint).
const WAIT_FOR_TERM: &str = "trap 'exit 0' TERM; sleep 30 & wait";

#[test]
fn workers_get_the_launcher_variables() {
    let script = r#"
        test "$WORLD_SIZE" = 3 || exit 10
        test "$LOCAL_WORLD_SIZE" = 3 || exit 11
        test "$RANK" -ge 0 && test "$RANK" -lt 3 || exit 12
        test "$LOCAL_RANK" = "$RANK" || exit 13
        test "$CUDA_VISIBLE_DEVICES" = "5,GPU-x,2" || exit 14
        test "$MASTER_ADDR" = 127.0.0.1 || exit 15
        test "$MASTER_PORT" -gt 0 || exit 16
        test "$NCCL_NVLS_ENABLE" = 0 || exit 17
        test "$QTRAIN_TEST_EXTRA" = yes || exit 18
        exit 0
    "#;
    let mut spec = sh(script, &["5", "GPU-x", "2"]);
    spec.env.push(("QTRAIN_TEST_EXTRA".into(), "yes".into()));
    let report = launch_local(&spec).unwrap();
    assert_eq!(report.statuses.len(), 3);
    assert!(report.statuses.iter().all(|s| s.success()));
    assert_eq!(report.forwarded_signal, None);
}

#[test]
fn a_failing_worker_stops_the_others_and_is_named() {
    let t = Instant::now();
    let script = format!(r#"if [ "$RANK" = 1 ]; then sleep 0.3; exit 3; fi; {WAIT_FOR_TERM}"#);
    let e = launch_local(&sh(&script, &["0", "1", "2"])).unwrap_err();
    match &e {
        LaunchError::WorkerFailed {
            rank,
            status,
            others,
        } => {
            assert_eq!(*rank, 1);
            assert_eq!(status, "exited with status 3");
            // The survivors got SIGTERM and exited cleanly (their checkpoint).
            assert_eq!(
                others,
                "rank 0 exited with status 0, rank 2 exited with status 0"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "worker rank 1 exited with status 3; the run was stopped \
         (rank 0 exited with status 0, rank 2 exited with status 0)"
    );
    // Long before the survivors' 30 s sleep would end.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn a_killed_worker_is_reported_with_its_signal() {
    let script = format!(r#"if [ "$RANK" = 0 ]; then kill -9 $$; fi; {WAIT_FOR_TERM}"#);
    let e = launch_local(&sh(&script, &["0", "1"])).unwrap_err();
    match e {
        LaunchError::WorkerFailed { rank, status, .. } => {
            assert_eq!(rank, 0);
            assert_eq!(status, "was killed by signal 9 (SIGKILL)");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn workers_that_ignore_sigterm_are_killed_after_the_grace_period() {
    let t = Instant::now();
    let script = r#"if [ "$RANK" = 1 ]; then exit 2; fi; trap '' TERM; sleep 30 & wait"#;
    let e = launch_local(&sh(script, &["0", "1"])).unwrap_err();
    match &e {
        LaunchError::WorkerFailed { rank, others, .. } => {
            assert_eq!(*rank, 1);
            assert_eq!(others, "rank 0 was killed by signal 9 (SIGKILL)");
        }
        other => panic!("{other:?}"),
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

#[test]
fn workers_left_running_after_rank_0_finished_are_stuck() {
    let t = Instant::now();
    let script = format!(r#"if [ "$RANK" = 0 ]; then exit 0; fi; {WAIT_FOR_TERM}"#);
    let e = launch_local(&sh(&script, &["0", "1", "2"])).unwrap_err();
    match &e {
        LaunchError::Stuck { first, stuck, .. } => {
            assert_eq!(*first, 0);
            assert_eq!(stuck, &vec![1, 2]);
        }
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_rank_finishing_early_is_fine_while_rank_0_still_works() {
    // Rank 0 "exports the adapter" for a while after rank 1 is done.
    let script = r#"if [ "$RANK" = 0 ]; then sleep 1; fi; exit 0"#;
    let report = launch_local(&sh(script, &["0", "1"])).unwrap();
    assert!(report.statuses.iter().all(|s| s.success()));
}

#[test]
fn a_missing_program_is_a_spawn_error() {
    let spec = LaunchSpec::new(
        "/nonexistent/qtrain",
        Vec::new(),
        vec!["0".into(), "1".into()],
    );
    match launch_local(&spec).unwrap_err() {
        LaunchError::Spawn { rank, program, .. } => {
            assert_eq!(rank, 0);
            assert_eq!(program, "/nonexistent/qtrain");
        }
        other => panic!("{other:?}"),
    }
}
