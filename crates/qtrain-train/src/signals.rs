//! SIGINT / SIGTERM: the first signal asks the training loop to save a checkpoint
//! and stop after the current step; a second one exits at once (code 130), for a
//! user who really wants out.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// The flag the loop polls between steps.
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

static FLAG: OnceLock<StopFlag> = OnceLock::new();
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// What a signal does: returns true when the process should exit immediately.
fn on_signal(flag: &StopFlag, count: &AtomicUsize) -> bool {
    flag.0.store(true, Ordering::SeqCst);
    count.fetch_add(1, Ordering::SeqCst) >= 1
}

/// Installs the handler once per process; later calls return the same flag.
pub fn install_handler() -> Result<StopFlag, ctrlc::Error> {
    if let Some(f) = FLAG.get() {
        return Ok(f.clone());
    }
    let flag = StopFlag::default();
    let f2 = flag.clone();
    ctrlc::set_handler(move || {
        if on_signal(&f2, &COUNT) {
            eprintln!("\nsecond signal: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!(
            "\nsignal received: saving a checkpoint after this step (signal again to quit now)"
        );
    })?;
    Ok(FLAG.get_or_init(|| flag).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_signal_sets_flag_second_exits() {
        let flag = StopFlag::default();
        let count = AtomicUsize::new(0);
        assert!(!flag.is_set());
        assert!(!on_signal(&flag, &count), "first signal must not exit");
        assert!(flag.is_set());
        assert!(on_signal(&flag, &count), "second signal exits");
    }
}
