//! SIGINT / SIGTERM / SIGHUP handling: this module owns the process's signal
//! handler, the stop flag the training loop polls between steps, and the exit
//! status a stopped run ends with.
//!
//! The first signal only raises the flag: the loop finishes the current step,
//! writes a checkpoint and stops, so `Ctrl-C` or a scheduler's SIGTERM (Slurm,
//! Kubernetes) loses no work. The process then exits with 128 + the signal's number
//! (130 for SIGINT, 143 for SIGTERM), as shells report a command the signal ended,
//! so a scheduler can tell a stopped run from a finished one. A second signal exits
//! at once with that same status, for a user who really wants out, e.g. while a
//! large checkpoint is being written.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The exit status after a second signal when the first was SIGINT (128 + 2).
pub const EXIT_CODE_SECOND_SIGNAL: i32 = 130;

/// The exit status of a process a signal stopped: 128 + its number.
pub fn exit_code(signal: i32) -> i32 {
    128 + signal
}

/// The flag the loop polls between steps. Clones share one flag.
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared atomic, for code that takes an `Arc<AtomicBool>` (the trainer).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Raises the flag as a signal would (for a programmatic stop).
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("installing the SIGINT/SIGTERM handler: {0}")]
pub struct SignalError(std::io::Error);

/// The process's flag once installed (a mutex so that two threads installing at
/// once install one handler), and the same flag where the handler reads it.
static INSTALLED: Mutex<Option<StopFlag>> = Mutex::new(None);
static HANDLER_FLAG: OnceLock<StopFlag> = OnceLock::new();
static SIGNALS: AtomicUsize = AtomicUsize::new(0);
/// The first signal received (0: none).
static FIRST_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// What one signal does to `flag`, given the count of earlier signals in `count`:
/// returns true when the process should exit immediately.
fn on_signal(flag: &StopFlag, count: &AtomicUsize) -> bool {
    flag.set();
    count.fetch_add(1, Ordering::SeqCst) >= 1
}

/// The signal that stopped this process (the first one received), if any.
pub fn received() -> Option<i32> {
    match FIRST_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `SIGINT`, `SIGTERM`, ... for messages.
pub fn name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// Writes to stderr from the handler (write(2) is async-signal-safe; formatting and
/// locks are not).
fn write_stderr(msg: &[u8]) {
    // SAFETY: writing a valid buffer to fd 2; a failed write is ignored.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

extern "C" fn handle(signal: libc::c_int) {
    let Some(flag) = HANDLER_FLAG.get() else {
        return;
    };
    let _ = FIRST_SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    if on_signal(flag, &SIGNALS) {
        write_stderr(b"\nsecond signal: exiting now, without a checkpoint\n");
        // SAFETY: _exit is async-signal-safe and ends the process at once.
        unsafe { libc::_exit(exit_code(FIRST_SIGNAL.load(Ordering::SeqCst))) };
    }
    write_stderr(match signal {
        libc::SIGINT => {
            b"\nsignal received (SIGINT): saving a checkpoint after this step and stopping \
              (signal again to quit at once)\n"
        }
        libc::SIGTERM => {
            b"\nsignal received (SIGTERM): saving a checkpoint after this step and stopping \
              (signal again to quit at once)\n"
        }
        _ => {
            b"\nsignal received: saving a checkpoint after this step and stopping \
              (signal again to quit at once)\n"
        }
    });
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP once per process; later
/// calls return the same flag.
pub fn install_handler() -> Result<StopFlag, SignalError> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = installed.as_ref() {
        return Ok(f.clone());
    }
    let flag = HANDLER_FLAG.get_or_init(StopFlag::new).clone();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler of the right signature and an
        // empty mask; the handler only touches atomics and calls write/_exit.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handle as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(SignalError(std::io::Error::last_os_error()));
        }
    }
    *installed = Some(flag.clone());
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_signal_sets_flag_second_exits() {
        let flag = StopFlag::new();
        let seen_by_loop = flag.flag();
        let count = AtomicUsize::new(0);
        assert!(!flag.is_set());
        assert!(!on_signal(&flag, &count), "the first signal must not exit");
        assert!(flag.is_set());
        assert!(
            seen_by_loop.load(Ordering::SeqCst),
            "the loop's Arc sees it"
        );
        assert!(on_signal(&flag, &count), "the second signal exits");
        assert!(on_signal(&flag, &count), "and so does any later one");
    }

    #[test]
    fn clones_share_the_flag() {
        let a = StopFlag::new();
        let b = a.clone();
        b.set();
        assert!(a.is_set());
        assert!(!StopFlag::new().is_set(), "a new flag is independent");
    }

    #[test]
    fn exit_codes_are_what_shells_report() {
        assert_eq!(exit_code(libc::SIGINT), 130);
        assert_eq!(exit_code(libc::SIGTERM), 143);
        assert_eq!(exit_code(libc::SIGINT), EXIT_CODE_SECOND_SIGNAL);
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
    }
}
