//! Real signals against the handler of `qtrain_train::signals`, in their own test
//! binary so the installed handler does not affect other tests.
//!
//! - SIGTERM sent to this process raises the stop flag the training loop polls.
//! - Two signals make a child process (this binary re-run on one test) exit at once
//!   with status 130.

use qtrain_train::signals::{install_handler, EXIT_CODE_SECOND_SIGNAL};
use std::process::Command;
use std::time::{Duration, Instant};

/// Set in the child process of `a_second_signal_exits_at_once_with_130`.
const CHILD_ENV: &str = "QTRAIN_SIGNALS_TEST_CHILD";

fn kill_self(sig: libc::c_int) {
    // SAFETY: sending a signal to our own process; the handler installed before
    // catches it instead of the default action (termination).
    let rc = unsafe { libc::kill(libc::getpid(), sig) };
    assert_eq!(rc, 0, "kill failed");
}

fn wait_for(cond: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while !cond() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

#[test]
fn sigterm_raises_the_stop_flag() {
    if std::env::var_os(CHILD_ENV).is_some() {
        // The child runs only the other test (`--exact`); never here.
        return;
    }
    let flag = install_handler().unwrap();
    assert!(!flag.is_set());
    // A second install returns the same flag rather than failing.
    let again = install_handler().unwrap();
    let for_loop = flag.flag();
    kill_self(libc::SIGTERM);
    assert!(
        wait_for(|| flag.is_set()),
        "SIGTERM did not raise the stop flag"
    );
    assert!(again.is_set(), "both handles see the same flag");
    assert!(for_loop.load(std::sync::atomic::Ordering::SeqCst));
}

#[test]
fn a_second_signal_exits_at_once_with_130() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let flag = install_handler().unwrap();
        kill_self(libc::SIGINT);
        if !wait_for(|| flag.is_set()) {
            std::process::exit(3);
        }
        kill_self(libc::SIGTERM);
        // The handler thread exits the process; getting past this sleep is a failure.
        std::thread::sleep(Duration::from_secs(10));
        std::process::exit(4);
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_second_signal_exits_at_once_with_130",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(EXIT_CODE_SECOND_SIGNAL),
        "child stderr: {stderr}"
    );
    assert!(
        stderr.contains("signal received") && stderr.contains("second signal"),
        "{stderr}"
    );
}
