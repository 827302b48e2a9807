//! Each RUN step's own network, BuildKit's default ("sandbox") mode: a new
//! network namespace with its own loopback, reaching the outside through
//! slirp4netns, a user-mode NAT whose sockets live on the host's side.
//! With `--disable-host-loopback` the host's 127.0.0.1 is not reachable;
//! the host's interfaces are not visible in the step.
//!
//! Why slirp4netns rather than a veth pair into a NAT bridge: it needs no
//! bridge, no iptables or nftables rules and no host configuration that a
//! crashed build could leave behind; it works the same for root and for
//! rootless builds; and a namespace with its slirp4netns is made in a few
//! milliseconds, ahead of the steps that take one (a small pool), so a step
//! does not wait for its network. Each namespace serves one step and is
//! then removed: nothing a step leaves listening reaches the next.
//! slirp4netns runs with its own sandbox and seccomp filter, and exits when
//! the solver does (its exit fd is a pipe the solver holds).

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::Failure;
use crate::root::StateRoot;

/// slirp4netns's DNS forwarder, for a step whose host only names loopback resolvers.
pub(crate) const SLIRP_DNS: &str = "10.0.2.3";

/// At most this many namespaces are ready or being made at once.
const READY: usize = 2;

/// The program that connects a sandbox to the outside.
const SLIRP: &str = "slirp4netns";

/// Where slirp4netns is, or the sentence that says how to get it.
pub(crate) fn slirp_binary() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = FOUND.get_or_init(|| super::runc::find_program(SLIRP)).clone().ok_or_else(|| {
        "RUN steps get their own network through slirp4netns, which is not installed: \
             install it (apt-get install slirp4netns), or give a step no network (RUN --network=none)"
            .to_string()
    })?;
    // Rootless, the device is opened as the user: its usual mode is 0666.
    if crate::rootless::in_user_namespace() {
        if let Err(e) = fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
            return Err(format!(
                "RUN steps get their own network through /dev/net/tun, which this user cannot open ({e}): \
                 as root, `chmod 0666 /dev/net/tun` (its usual mode), or give a step no network (RUN --network=none)"
            ));
        }
    }
    Ok(found)
}

/// One network namespace connected by its own slirp4netns; removed on drop.
pub(crate) struct Sandbox {
    dir: PathBuf,
    ns: PathBuf,
    slirp: Option<(Child, ChildStdin)>,
}

impl Sandbox {
    /// The namespace, as a file the runtime joins.
    pub(crate) fn path(&self) -> &Path {
        &self.ns
    }

    /// A new namespace under `ROOT/mnt/`, with slirp4netns attached and ready.
    fn create(root: &StateRoot, slirp: &Path) -> io::Result<Sandbox> {
        let dir = root.mountpoint()?;
        let ns = dir.join("net");
        let mut sandbox = Sandbox {
            dir,
            ns: ns.clone(),
            slirp: None,
        };
        fs::File::create(&ns)?;
        // A thread of its own moves to a new namespace and pins it to the file.
        let target = ns.clone();
        std::thread::spawn(move || -> io::Result<()> {
            #[allow(deprecated, reason = "NEWNET shares no file table: the safe wrapper is sound here")]
            rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNET)?;
            rustix::mount::mount_bind("/proc/thread-self/ns/net", &target)?;
            Ok(())
        })
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))??;
        // Its messages go to a file beside the namespace; readiness comes
        // on a pipe of its own, as fd 3; its stdin is the exit fd.
        let log_path = sandbox.dir.join("slirp4netns.log");
        let log = fs::File::create(&log_path)?;
        let (ready_r, ready_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let mut cmd = Command::new(slirp);
        cmd.args([
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--enable-sandbox",
            "--netns-type=path",
            "--exit-fd=0",
            "--ready-fd=3",
        ])
        .arg(&ns)
        .arg("tap0")
        .stdin(Stdio::piped())
        .stdout(log.try_clone()?)
        .stderr(log);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&ready_w);
        // SAFETY: between fork and exec only async-signal-safe calls are
        // made (dup2 or fcntl on fds this process owns), nothing allocates.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let fd = rustix::fd::BorrowedFd::borrow_raw(raw);
                if raw == 3 {
                    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                } else {
                    let mut three = std::mem::ManuallyDrop::new(<rustix::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(3));
                    rustix::io::dup2(fd, &mut three)?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        drop(ready_w);
        let Some(stdin) = child.stdin.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other("slirp4netns has no stdin"));
        };
        sandbox.slirp = Some((child, stdin));
        // One byte when the namespace is configured; EOF when it failed.
        let mut byte = [0u8; 1];
        if fs::File::from(ready_r).read(&mut byte)? == 0 {
            let why = fs::read_to_string(&log_path).unwrap_or_default();
            return Err(io::Error::other(format!(
                "slirp4netns did not start: {}",
                why.lines().last().unwrap_or("no message")
            )));
        }
        Ok(sandbox)
    }
}

impl Drop for Sandbox {
    /// The namespace's file goes at once; slirp4netns is stopped in the
    /// background, since its tap device's teardown waits for the kernel
    /// (10-40 ms) and no step needs to wait for that. Should the solver exit
    /// first, slirp4netns sees its exit fd close and stops by itself.
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.ns, rustix::mount::UnmountFlags::DETACH);
        let _ = fs::remove_file(&self.ns);
        let _ = fs::remove_file(self.dir.join("slirp4netns.log"));
        let _ = fs::remove_dir(&self.dir);
        if let Some((mut child, stdin)) = self.slirp.take() {
            std::thread::spawn(move || {
                drop(stdin); // its exit fd: slirp4netns stops
                let _ = child.kill();
                let _ = child.wait();
            });
        }
    }
}

/// Namespaces made ahead of the steps that take them.
pub(crate) struct Sandboxes {
    root: Arc<StateRoot>,
    pool: Mutex<Pool>,
    /// Signalled when one is made (or failed to be).
    made: Condvar,
}

/// The pool's state, changed only under its lock: a fill can then never
/// start once [`Sandboxes::close`] has begun, and close sees every fill
/// that did start.
#[derive(Default)]
struct Pool {
    ready: Vec<Sandbox>,
    /// Namespaces being made by background threads.
    making: usize,
    /// Steps about to run that will take one ([`Sandboxes::announce`]) and
    /// have not yet: nothing is made beyond them, so a build that runs one
    /// step makes one namespace.
    wanted: usize,
    /// The solve is over: nothing more is made, what is made is removed.
    closed: bool,
}

impl Sandboxes {
    /// An empty pool for one solve.
    pub(crate) fn new(root: Arc<StateRoot>) -> Arc<Sandboxes> {
        Arc::new(Sandboxes {
            root,
            pool: Mutex::new(Pool::default()),
            made: Condvar::new(),
        })
    }

    /// A step that will take a namespace is about to run: one is started
    /// for it in the background.
    pub(crate) fn announce(self: &Arc<Self>) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.wanted += 1;
        }
        self.fill();
    }

    /// Starts making namespaces in the background for the steps announced
    /// and not yet served, at most [`READY`] ready or on their way.
    fn fill(self: &Arc<Self>) {
        let Ok(slirp) = slirp_binary() else { return };
        let Ok(mut pool) = self.pool.lock() else { return };
        if pool.closed {
            return;
        }
        let target = pool.wanted.min(READY);
        for _ in pool.ready.len() + pool.making..target {
            pool.making += 1;
            let me = self.clone();
            let slirp = slirp.clone();
            std::thread::spawn(move || {
                let made = Sandbox::create(&me.root, &slirp);
                let Ok(mut pool) = me.pool.lock() else { return };
                if let Ok(s) = made {
                    if pool.closed {
                        // The solve is over: removed before close() may
                        // return, which waits for `making` to reach zero.
                        drop(pool);
                        drop(s);
                        let Ok(again) = me.pool.lock() else { return };
                        pool = again;
                    } else {
                        pool.ready.push(s);
                    }
                }
                pool.making -= 1;
                drop(pool);
                me.made.notify_all();
            });
        }
    }

    /// Ends the pool with the solve: waits for the namespaces being made
    /// (a few milliseconds) and removes every unused one, so nothing of
    /// this solve outlives it.
    pub(crate) fn close(&self) {
        let Ok(mut pool) = self.pool.lock() else { return };
        pool.closed = true;
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.making > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.made.wait_timeout(pool, left) {
                Ok((p, _)) => pool = p,
                Err(_) => return,
            }
        }
        let unused = std::mem::take(&mut pool.ready);
        drop(pool);
        drop(unused);
    }

    /// A ready namespace (one on its way is waited for; made now if none
    /// is), and another started if more steps are announced.
    pub(crate) fn take(self: &Arc<Self>) -> Result<Sandbox, Failure> {
        let slirp = slirp_binary().map_err(Failure::invalid)?;
        let ready = self.pool.lock().ok().and_then(|mut pool| {
            pool.wanted = pool.wanted.saturating_sub(1);
            let deadline = Instant::now() + Duration::from_secs(10);
            while pool.ready.is_empty() && pool.making > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                pool = self.made.wait_timeout(pool, left).ok()?.0;
            }
            pool.ready.pop()
        });
        self.fill();
        match ready {
            Some(s) => Ok(s),
            None => Sandbox::create(&self.root, &slirp).map_err(|e| Failure::Internal(format!("the step's network: {e}"))),
        }
    }
}
