//! The local supervisor behind `qtrain run --gpus N`: it re-executes the current
//! binary once per GPU with torchrun's variables set, forwards SIGINT/SIGTERM to
//! the workers, and takes the run down cleanly when one of them fails.
//!
//! Each worker gets `RANK = LOCAL_RANK = r`, `WORLD_SIZE = LOCAL_WORLD_SIZE = N`,
//! `MASTER_ADDR`/`MASTER_PORT` (loopback and a free port unless given), the same
//! `CUDA_VISIBLE_DEVICES` (the chosen devices in rank order, so worker `r` computes
//! on `cuda:r`, as under torchrun; see [`crate::env`]), and `NCCL_NVLS_ENABLE=0`
//! unless the user set it (see [`crate::nvls`]).
//!
//! Signals and failures:
//! - workers run in their own process groups, so a terminal's Ctrl-C reaches only
//!   the supervisor, which forwards each signal exactly once to every worker's
//!   group (the trainer's "first signal: checkpoint and stop, second: exit now"
//!   then behaves as in a one-GPU run);
//! - on Linux each worker gets `SIGTERM` should the supervisor itself die
//!   (`PR_SET_PDEATHSIG`), so no orphan keeps a GPU busy;
//! - when a worker exits non-zero or is killed, the others get `SIGTERM` at once
//!   (rank 0 writes its checkpoint of the last completed step and exits), and
//!   whatever still runs after the grace period gets `SIGKILL`; the error names the
//!   first failed rank and its status. A worker stuck in a collective with the dead
//!   one therefore cannot hang the run;
//! - when rank 0 exits cleanly, the others must follow within the grace period
//!   (they have nothing left to do); when another rank exits cleanly first, rank 0
//!   may still be exporting, so the others get `finish_timeout`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default time between `SIGTERM` and `SIGKILL` when the run is torn down: room
/// for rank 0 to write a checkpoint.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// Default time the other workers get to finish after a rank other than 0 exits
/// cleanly (rank 0 may still write the final checkpoint, adapter and evaluation).
pub const DEFAULT_FINISH_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What went wrong in a supervised run.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("no GPU selected (--gpus must be at least 1, --devices must list one)")]
    NoDevices,
    #[error("--devices lists device {0} twice")]
    DuplicateDevice(usize),
    #[error("device {device} is not among CUDA_VISIBLE_DEVICES={visible} ({count} devices, numbered from 0)")]
    DeviceNotVisible {
        device: usize,
        visible: String,
        count: usize,
    },
    #[error("finding the qtrain binary to start the workers: {0}")]
    CurrentExe(std::io::Error),
    #[error("finding a free port for the rendezvous on {addr}: {source}")]
    Port {
        addr: String,
        source: std::io::Error,
    },
    #[error("installing the SIGINT/SIGTERM forwarding: {0}")]
    Signals(std::io::Error),
    #[error("starting worker rank {rank} ({program}): {source}")]
    Spawn {
        rank: usize,
        program: String,
        source: std::io::Error,
    },
    #[error("waiting for worker rank {rank}: {source}")]
    Wait { rank: usize, source: std::io::Error },
    #[error("worker rank {rank} {status}; the run was stopped ({others})")]
    WorkerFailed {
        rank: usize,
        status: String,
        /// How the other workers ended.
        others: String,
    },
    #[error(
        "rank {first} exited cleanly but ranks {stuck:?} had not exited {after:?} later \
         (stuck in a collective?); they were stopped ({others})"
    )]
    Stuck {
        first: usize,
        stuck: Vec<usize>,
        after: Duration,
        others: String,
    },
}

/// Which GPUs to train on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSelection {
    /// The first `n` devices (`--gpus n`).
    Count(usize),
    /// These device numbers, in rank order (`--devices 0,2`).
    List(Vec<usize>),
}

impl DeviceSelection {
    /// How many workers this selects.
    pub fn len(&self) -> usize {
        match self {
            DeviceSelection::Count(n) => *n,
            DeviceSelection::List(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `CUDA_VISIBLE_DEVICES` entries of the workers, in rank order. Device
    /// numbers count from 0 among the devices this process may use: when
    /// `visible` (the supervisor's own `CUDA_VISIBLE_DEVICES`) is set, they index
    /// into it, as CUDA itself would number them.
    pub fn resolve(&self, visible: Option<&str>) -> Result<Vec<String>, LaunchError> {
        let wanted: Vec<usize> = match self {
            DeviceSelection::Count(n) => (0..*n).collect(),
            DeviceSelection::List(v) => v.clone(),
        };
        if wanted.is_empty() {
            return Err(LaunchError::NoDevices);
        }
        for (i, d) in wanted.iter().enumerate() {
            if wanted[..i].contains(d) {
                return Err(LaunchError::DuplicateDevice(*d));
            }
        }
        let visible = visible.map(str::trim).filter(|v| !v.is_empty());
        match visible {
            None => Ok(wanted.iter().map(usize::to_string).collect()),
            Some(v) => {
                let entries: Vec<&str> = v.split(',').map(str::trim).collect();
                wanted
                    .iter()
                    .map(|&d| {
                        entries.get(d).map(|e| e.to_string()).ok_or_else(|| {
                            LaunchError::DeviceNotVisible {
                                device: d,
                                visible: v.to_string(),
                                count: entries.len(),
                            }
                        })
                    })
                    .collect()
            }
        }
    }
}

/// How to start and supervise the workers.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The worker program (the current binary for `qtrain run`).
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// `CUDA_VISIBLE_DEVICES` entries, one worker per entry, in rank order.
    pub devices: Vec<String>,
    pub master_addr: String,
    /// `None` picks a free port.
    pub master_port: Option<u16>,
    pub grace: Duration,
    pub finish_timeout: Duration,
    /// Extra environment of every worker.
    pub env: Vec<(OsString, OsString)>,
}

impl LaunchSpec {
    /// Workers that re-execute the current binary with `args` on `devices`
    /// (resolved against this process's `CUDA_VISIBLE_DEVICES`).
    pub fn current_exe(
        args: Vec<OsString>,
        devices: &DeviceSelection,
    ) -> Result<Self, LaunchError> {
        let program = std::env::current_exe().map_err(LaunchError::CurrentExe)?;
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        Ok(Self::new(
            program,
            args,
            devices.resolve(visible.as_deref())?,
        ))
    }

    /// Workers running `program args` on `devices`, with the default timeouts.
    pub fn new(program: impl Into<PathBuf>, args: Vec<OsString>, devices: Vec<String>) -> Self {
        Self {
            program: program.into(),
            args,
            devices,
            master_addr: "127.0.0.1".into(),
            master_port: None,
            grace: DEFAULT_GRACE,
            finish_timeout: DEFAULT_FINISH_TIMEOUT,
            env: Vec::new(),
        }
    }
}

/// How a supervised run ended without error.
#[derive(Debug, Clone)]
pub struct LaunchReport {
    pub statuses: Vec<ExitStatus>,
    /// The last signal forwarded to the workers, if any (the run was interrupted).
    pub forwarded_signal: Option<i32>,
}

/// `"exited with status 3"`, `"was killed by signal 9 (SIGKILL)"`.
pub fn describe_status(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(sig) => format!("was killed by signal {sig} ({})", signal_name(sig)),
        None => format!("ended with {status}"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "other",
    }
}

// ---- signal forwarding --------------------------------------------------------

static SIGINTS: AtomicUsize = AtomicUsize::new(0);
static SIGTERMS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Async-signal-safe: one atomic increment; the supervisor loop does the rest.
    match sig {
        libc::SIGINT => SIGINTS.fetch_add(1, Ordering::SeqCst),
        _ => SIGTERMS.fetch_add(1, Ordering::SeqCst),
    };
}

/// Installed handlers and the actions they replaced; shared by concurrent
/// supervisors in one process (tests), restored when the last one ends.
struct Installed {
    users: usize,
    old: Vec<(libc::c_int, libc::sigaction)>,
}

// SAFETY: `libc::sigaction` is plain data (a handler address, flags, a mask).
unsafe impl Send for Installed {}

static INSTALLED: Mutex<Installed> = Mutex::new(Installed {
    users: 0,
    old: Vec::new(),
});

struct SignalGuard;

impl SignalGuard {
    fn install() -> Result<Self, LaunchError> {
        let mut inst = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        if inst.users == 0 {
            let mut old = Vec::new();
            for sig in [libc::SIGINT, libc::SIGTERM] {
                // SAFETY: a zeroed sigaction with our handler and an empty mask is a
                // valid argument; `on_signal` only touches atomics.
                unsafe {
                    let mut act: libc::sigaction = std::mem::zeroed();
                    act.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                    act.sa_flags = libc::SA_RESTART;
                    libc::sigemptyset(&mut act.sa_mask);
                    let mut prev: libc::sigaction = std::mem::zeroed();
                    if libc::sigaction(sig, &act, &mut prev) != 0 {
                        let e = std::io::Error::last_os_error();
                        for (s, a) in &old {
                            libc::sigaction(*s, a, std::ptr::null_mut());
                        }
                        return Err(LaunchError::Signals(e));
                    }
                    old.push((sig, prev));
                }
            }
            inst.old = old;
        }
        inst.users += 1;
        Ok(SignalGuard)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        let mut inst = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        inst.users -= 1;
        if inst.users == 0 {
            for (sig, act) in inst.old.drain(..) {
                // SAFETY: restoring the action `sigaction` returned for this signal.
                unsafe {
                    libc::sigaction(sig, &act, std::ptr::null_mut());
                }
            }
        }
    }
}

/// Signals received since the last call, in the order SIGINTs then SIGTERMs.
struct SignalCursor {
    ints: usize,
    terms: usize,
}

impl SignalCursor {
    fn new() -> Self {
        Self {
            ints: SIGINTS.load(Ordering::SeqCst),
            terms: SIGTERMS.load(Ordering::SeqCst),
        }
    }

    fn take(&mut self) -> Vec<i32> {
        let (i, t) = (
            SIGINTS.load(Ordering::SeqCst),
            SIGTERMS.load(Ordering::SeqCst),
        );
        let mut out = vec![libc::SIGINT; i - self.ints];
        out.extend(std::iter::repeat_n(libc::SIGTERM, t - self.terms));
        (self.ints, self.terms) = (i, t);
        out
    }
}

// ---- the supervisor ---------------------------------------------------------

fn signal_group(child: &Child, sig: i32) {
    // Each worker leads its own process group (pgid = pid): signal the group so
    // helpers it started go too.
    // SAFETY: kill(2) with a negative pid signals that process group; it has no
    // memory-safety preconditions.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), sig);
    }
}

fn free_port(addr: &str) -> Result<u16, LaunchError> {
    std::net::TcpListener::bind((addr, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| LaunchError::Port {
            addr: addr.to_string(),
            source,
        })
}

fn spawn_worker(
    spec: &LaunchSpec,
    rank: usize,
    port: u16,
    nvls_default: bool,
) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let world = spec.devices.len();
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", &spec.master_addr)
        .env("MASTER_PORT", port.to_string())
        .env("CUDA_VISIBLE_DEVICES", spec.devices.join(","))
        // Only torchrun's agent occupies MASTER_PORT; ours does not.
        .env_remove("TORCHELASTIC_USE_AGENT_STORE")
        .env_remove("QTRAIN_RENDEZVOUS_PORT")
        .process_group(0);
    if nvls_default {
        cmd.env(crate::nvls::NVLS_VAR, "0");
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the closure runs between fork and exec and only makes the
        // async-signal-safe calls prctl(2), getppid(2) and _exit(2).
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor died between fork and prctl: do not run orphaned.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    cmd.spawn()
}

/// Starts one worker per device and supervises them until all have exited (see
/// the module docs). SIGINT/SIGTERM received meanwhile are forwarded.
pub fn launch_local(spec: &LaunchSpec) -> Result<LaunchReport, LaunchError> {
    if spec.devices.is_empty() {
        return Err(LaunchError::NoDevices);
    }
    let _signals = SignalGuard::install()?;
    let mut cursor = SignalCursor::new();
    let port = match spec.master_port {
        Some(p) => p,
        None => free_port(&spec.master_addr)?,
    };
    let nvls_default = std::env::var_os(crate::nvls::NVLS_VAR).is_none();
    let world = spec.devices.len();
    tracing::info!(
        "starting {world} workers on CUDA devices {} (rendezvous {})",
        spec.devices.join(","),
        crate::env::display_addr(&spec.master_addr, port)
    );

    let mut children = spawn_all(spec, port, nvls_default)?;

    let mut statuses: Vec<Option<ExitStatus>> = vec![None; world];
    let mut failed: Option<(usize, ExitStatus)> = None;
    let mut stuck: Option<(usize, Vec<usize>, Duration)> = None;
    let mut forwarded = None;
    // When the workers still running get SIGKILL (after a failure or a stall).
    let mut kill_at: Option<Instant> = None;
    // When the workers still running count as stuck (after a clean exit).
    let mut finish_by: Option<(Instant, usize, Duration)> = None;
    let mut killed = false;

    loop {
        for sig in cursor.take() {
            forwarded = Some(sig);
            for (r, c) in children.iter().enumerate() {
                if statuses[r].is_none() {
                    signal_group(c, sig);
                }
            }
        }
        for (r, c) in children.iter_mut().enumerate() {
            if statuses[r].is_some() {
                continue;
            }
            let Some(st) = c
                .try_wait()
                .map_err(|source| LaunchError::Wait { rank: r, source })?
            else {
                continue;
            };
            statuses[r] = Some(st);
            if st.success() {
                if finish_by.is_none() {
                    let wait = if r == 0 {
                        spec.grace
                    } else {
                        spec.finish_timeout
                    };
                    finish_by = Some((Instant::now() + wait, r, wait));
                }
            } else if failed.is_none() && stuck.is_none() && !killed {
                tracing::error!(
                    "worker rank {r} {}; stopping the others",
                    describe_status(&st)
                );
                failed = Some((r, st));
            }
        }
        let running: Vec<usize> = (0..world).filter(|&r| statuses[r].is_none()).collect();
        if running.is_empty() {
            break;
        }
        let now = Instant::now();
        if failed.is_some() && kill_at.is_none() {
            for &r in &running {
                signal_group(&children[r], libc::SIGTERM);
            }
            kill_at = Some(now + spec.grace);
        }
        if let (Some((deadline, first, wait)), None, None) = (finish_by, &failed, &stuck) {
            if now >= deadline {
                tracing::error!(
                    "rank {first} exited cleanly {wait:?} ago but ranks {running:?} are still running; stopping them"
                );
                for &r in &running {
                    signal_group(&children[r], libc::SIGTERM);
                }
                stuck = Some((first, running.clone(), wait));
                kill_at = Some(now + spec.grace);
            }
        }
        if let Some(t) = kill_at {
            if now >= t && !killed {
                for &r in &running {
                    tracing::error!(
                        "worker rank {r} did not exit within {:?}; killing it",
                        spec.grace
                    );
                    signal_group(&children[r], libc::SIGKILL);
                }
                killed = true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let statuses = statuses
        .into_iter()
        .map(|s| s.expect("all exited"))
        .collect();
    outcome(statuses, failed, stuck, forwarded)
}

/// One worker per device; on a failure to start one, the ones already started are
/// killed (they have done nothing worth saving yet).
fn spawn_all(spec: &LaunchSpec, port: u16, nvls_default: bool) -> Result<Vec<Child>, LaunchError> {
    let world = spec.devices.len();
    let mut children: Vec<Child> = Vec::with_capacity(world);
    for rank in 0..world {
        match spawn_worker(spec, rank, port, nvls_default) {
            Ok(c) => children.push(c),
            Err(source) => {
                for c in &mut children {
                    signal_group(c, libc::SIGKILL);
                    let _ = c.wait();
                }
                return Err(LaunchError::Spawn {
                    rank,
                    program: spec.program.display().to_string(),
                    source,
                });
            }
        }
    }
    Ok(children)
}

/// The launch's result once every worker has exited: the first failure, or the
/// ranks that had to be stopped after another exited cleanly, or the statuses.
fn outcome(
    statuses: Vec<ExitStatus>,
    failed: Option<(usize, ExitStatus)>,
    stuck: Option<(usize, Vec<usize>, Duration)>,
    forwarded: Option<i32>,
) -> Result<LaunchReport, LaunchError> {
    let others = |skip: &[usize]| -> String {
        statuses
            .iter()
            .enumerate()
            .filter(|(r, _)| !skip.contains(r))
            .map(|(r, s)| format!("rank {r} {}", describe_status(s)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some((rank, st)) = failed {
        return Err(LaunchError::WorkerFailed {
            rank,
            status: describe_status(&st),
            others: others(&[rank]),
        });
    }
    if let Some((first, stuck, after)) = stuck {
        let others = others(&[]);
        return Err(LaunchError::Stuck {
            first,
            stuck,
            after,
            others,
        });
    }
    Ok(LaunchReport {
        statuses,
        forwarded_signal: forwarded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_resolve_against_visible_devices() {
        assert_eq!(DeviceSelection::Count(2).resolve(None).unwrap(), ["0", "1"]);
        assert_eq!(
            DeviceSelection::List(vec![3, 1]).resolve(None).unwrap(),
            ["3", "1"]
        );
        assert_eq!(
            DeviceSelection::List(vec![1, 2])
                .resolve(Some("4,5,GPU-abc"))
                .unwrap(),
            ["5", "GPU-abc"]
        );
        assert_eq!(
            DeviceSelection::Count(2).resolve(Some("")).unwrap(),
            ["0", "1"]
        );
        let e = DeviceSelection::Count(3).resolve(Some("4,5")).unwrap_err();
        assert!(
            e.to_string()
                .contains("device 2 is not among CUDA_VISIBLE_DEVICES=4,5"),
            "{e}"
        );
        assert!(matches!(
            DeviceSelection::List(vec![0, 0]).resolve(None),
            Err(LaunchError::DuplicateDevice(0))
        ));
        assert!(matches!(
            DeviceSelection::Count(0).resolve(None),
            Err(LaunchError::NoDevices)
        ));
    }
}
