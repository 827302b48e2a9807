//! SIGINT, SIGTERM and SIGHUP to `kiln`: the solver is told to stop
//! (it kills its containers, unmounts and caches nothing half-done), then
//! `kiln` exits with 128 + the signal's number, as shells expect.
//!
//! Without a solver running, `kiln` exits at once. A second signal while
//! the solver is stopping kills it outright (its leftovers are cleared by
//! the next solver on the same root).

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use rustix::process::{Pid, Signal};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// The running solver's pid, 0 when none.
static SOLVER: AtomicI32 = AtomicI32::new(0);
/// Whether the running solver has its request (and so state to clean up).
static BUSY: AtomicBool = AtomicBool::new(false);
/// The first signal caught, 0 when none.
static CAUGHT: AtomicI32 = AtomicI32::new(0);

/// How long a stopping solver may take before `kiln` gives up on it.
const GRACE: Duration = Duration::from_secs(20);

/// Catches the signals for the rest of the process's life (the `kiln`
/// binary calls it once; the library's callers keep their own handling).
pub fn install() -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for sig in signals.forever() {
            let first = CAUGHT.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst).is_ok();
            let pid = SOLVER.load(Ordering::SeqCst);
            let Some(pid) = Pid::from_raw(pid) else {
                std::process::exit(128 + sig);
            };
            if !BUSY.load(Ordering::SeqCst) {
                // Started ahead but given nothing yet: nothing to clean up.
                let _ = rustix::process::kill_process(pid, Signal::KILL);
                std::process::exit(128 + sig);
            }
            if first {
                let _ = rustix::process::kill_process(pid, Signal::TERM);
                std::thread::spawn(move || {
                    std::thread::sleep(GRACE);
                    let _ = rustix::process::kill_process(pid, Signal::KILL);
                    std::process::exit(128 + sig);
                });
            } else {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
                std::process::exit(128 + CAUGHT.load(Ordering::SeqCst));
            }
        }
    })?;
    Ok(())
}

/// Marks `pid` as the solver to stop on a signal.
pub(crate) fn solver_started(pid: u32) {
    SOLVER.store(i32::try_from(pid).unwrap_or(0), Ordering::SeqCst);
}

/// The solver is about to get its request: from now on a signal lets it
/// stop cleanly. Returns false when a signal came first (do not send it).
pub(crate) fn solver_busy() -> bool {
    BUSY.store(true, Ordering::SeqCst);
    CAUGHT.load(Ordering::SeqCst) == 0
}

/// The solver has ended: a signal now ends `kiln` at once.
pub(crate) fn solver_ended() {
    SOLVER.store(0, Ordering::SeqCst);
    BUSY.store(false, Ordering::SeqCst);
}

/// The signal that stopped the build, if one did.
pub fn caught() -> Option<i32> {
    match CAUGHT.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// The signal's conventional name, for messages.
pub fn name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
