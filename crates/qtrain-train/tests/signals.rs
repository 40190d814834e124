//! A real SIGTERM sent to this test process raises the stop flag the training loop
//! polls (its own test binary, so the handler does not affect other tests).

use std::time::{Duration, Instant};

#[test]
fn sigterm_raises_the_stop_flag() {
    let flag = qtrain_train::signals::install_handler().unwrap();
    assert!(!flag.is_set());
    // A second install returns the same flag.
    let again = qtrain_train::signals::install_handler().unwrap();
    // SAFETY: sending a signal to our own process; the handler installed above
    // catches it instead of the default action.
    let rc = unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    assert_eq!(rc, 0);
    let start = Instant::now();
    while !flag.is_set() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(flag.is_set(), "SIGTERM did not raise the stop flag");
    assert!(again.is_set(), "both handles see the same flag");
}
