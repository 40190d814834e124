//! A real SIGTERM to the supervisor reaches every worker once and the run ends
//! cleanly. Its own test binary: it signals its own process.

use qtrain_dist::launch::{launch_local, LaunchSpec};
use std::ffi::OsString;
use std::time::{Duration, Instant};

#[test]
fn sigterm_is_forwarded_to_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    // Each worker announces it is ready, then waits for signals and records each
    // one; it exits after the first, as the trainer does after its checkpoint.
    let script = r#"
        trap 'echo TERM >> "$OUT/rank$RANK.signals"; exit 0' TERM
        trap 'echo INT >> "$OUT/rank$RANK.signals"; exit 0' INT
        touch "$OUT/rank$RANK.ready"
        sleep 30 & wait
    "#;
    let mut spec = LaunchSpec::new(
        "/bin/sh",
        vec![OsString::from("-c"), OsString::from(script)],
        vec!["0".into(), "1".into()],
    );
    spec.grace = Duration::from_secs(5);
    spec.env
        .push(("OUT".into(), dir.path().as_os_str().to_os_string()));
    let ready: Vec<_> = (0..2)
        .map(|r| dir.path().join(format!("rank{r}.ready")))
        .collect();
    let t = Instant::now();
    let signaller = std::thread::spawn(move || {
        while !ready.iter().all(|p| p.exists()) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "workers never got ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: kill(2) on our own pid; the supervisor's handler is installed
        // (the workers only start after it is).
        unsafe {
            libc::kill(libc::getpid(), libc::SIGTERM);
        }
    });
    let report = launch_local(&spec).unwrap();
    signaller.join().unwrap();
    assert_eq!(report.forwarded_signal, Some(libc::SIGTERM));
    assert!(report.statuses.iter().all(|s| s.success()));
    for r in 0..2 {
        let got = std::fs::read_to_string(dir.path().join(format!("rank{r}.signals"))).unwrap();
        assert_eq!(got, "TERM\n", "rank {r} got exactly one SIGTERM");
    }
    assert!(t.elapsed() < Duration::from_secs(20));
}
