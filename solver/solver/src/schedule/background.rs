//! Work done ahead of need on threads of its own at the lowest priority
//! (compressing layers, copying ahead), and waiting for it after a failure.

use std::sync::Mutex;

/// Locks a mutex; a holder that panicked leaves data that is still whole
/// here (counters, maps and task lists updated in one step), so it is used
/// rather than read as "nothing there".
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many [`in_background`] threads are running.
static BACKGROUND: (Mutex<usize>, std::sync::Condvar) = (Mutex::new(0), std::sync::Condvar::new());

/// Runs `work` on a thread of its own at the lowest priority: work done
/// ahead of need uses only processor time nothing else wants.
pub(crate) async fn in_background<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let count = |delta: isize| {
        let mut n = lock(&BACKGROUND.0);
        *n = n.saturating_add_signed(delta);
        BACKGROUND.1.notify_all();
    };
    count(1);
    let spawned = std::thread::Builder::new().name("kiln-ahead".into()).spawn(move || {
        // Linux: the nice value of this thread only.
        let _ = rustix::process::setpriority_process(None, 19);
        let _ = tx.send(work());
        count(-1);
    });
    if spawned.is_err() {
        count(-1);
        return None;
    }
    rx.await.ok()
}

/// Waits (at most `limit`) for work started ahead of need that nobody
/// awaits any more, after a failure: it may hold mounts and temporary layers,
/// which it removes when it ends.
pub fn wait_for_background_work(limit: std::time::Duration) {
    let n = lock(&BACKGROUND.0);
    let _ = BACKGROUND.1.wait_timeout_while(n, limit, |n| *n > 0);
}
