//! SIGINT / SIGTERM handling: this module owns the process's signal handler and the
//! stop flag the training loop polls between steps.
//!
//! The first signal only raises the flag: the loop finishes the current step,
//! writes a checkpoint and exits cleanly, so `Ctrl-C` or a scheduler's SIGTERM
//! (Slurm, Kubernetes) loses no work. A second signal exits at once with status 130
//! (128 + SIGINT, what shells report for an interrupted command), for a user who
//! really wants out, e.g. while a large checkpoint is being written.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The exit status after a second signal.
pub const EXIT_CODE_SECOND_SIGNAL: i32 = 130;

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
pub struct SignalError(#[from] ctrlc::Error);

/// The process's flag once installed. A mutex rather than a `OnceLock` so two
/// threads installing at the same time cannot both reach `ctrlc::set_handler`
/// (the second would fail with `MultipleHandlers`).
static INSTALLED: Mutex<Option<StopFlag>> = Mutex::new(None);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// What one signal does to `flag`, given the count of earlier signals in `count`:
/// returns true when the process should exit immediately.
fn on_signal(flag: &StopFlag, count: &AtomicUsize) -> bool {
    flag.set();
    count.fetch_add(1, Ordering::SeqCst) >= 1
}

/// Installs the handler once per process; later calls return the same flag.
///
/// Fails if another SIGINT/SIGTERM handler was installed through `ctrlc` outside
/// this function.
pub fn install_handler() -> Result<StopFlag, SignalError> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = installed.as_ref() {
        return Ok(f.clone());
    }
    let flag = StopFlag::new();
    let handler_flag = flag.clone();
    // ctrlc runs this on its own thread (not in the signal handler proper), so
    // printing and exiting here are safe.
    ctrlc::set_handler(move || {
        if on_signal(&handler_flag, &SIGNALS) {
            eprintln!("\nsecond signal: exiting now, without a checkpoint");
            std::process::exit(EXIT_CODE_SECOND_SIGNAL);
        }
        eprintln!(
            "\nsignal received: saving a checkpoint after this step and stopping \
             (signal again to quit at once)"
        );
    })?;
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
}
