//! Rootless builds. Started by a user other than root, the solver re-runs
//! itself in a new user namespace where that user is root and the user's
//! subordinate ids (`/etc/subuid`, `/etc/subgid`, mapped by uidmap's
//! setuid `newuidmap`/`newgidmap`) are uids and gids 1 and up, so layers
//! owned by many users unpack and build as they would as root. Inside it
//! the solver is root of its own mount namespace: overlayfs mounts with
//! `userxattr` (its markers become `user.overlay.*`), runc runs rootless
//! (no cgroups), and each step's network sandbox is made as before.
//!
//! The outer process only maps the ids, forwards signals and returns the
//! inner one's exit code; stdin and stdout pass straight through.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;

/// The environment variable naming the inner process's two pipe ends.
const SYNC_ENV: &str = "KILN_USERNS_SYNC";

/// Why a rootless build cannot start: each says what to add or install.
#[derive(Debug, thiserror::Error)]
pub enum RootlessError {
    /// The user has no subordinate ids.
    #[error(
        "rootless builds need subordinate ids for {user}, and {file} has none: as root, run `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}` (or add `{user}:100000:65536` to /etc/subuid and /etc/subgid)"
    )]
    NoRanges {
        /// The user's name (or uid when it has none).
        user: String,
        /// `/etc/subuid` or `/etc/subgid`.
        file: String,
    },
    /// `newuidmap` or `newgidmap` is not installed.
    #[error("rootless builds map ids with {tool}, which is not installed: install uidmap (apt-get install uidmap)")]
    NoTool {
        /// The missing program.
        tool: &'static str,
    },
    /// The kernel refuses user namespaces to this user.
    #[error("rootless builds need user namespaces, which this machine refuses: {0}")]
    Disabled(String),
    /// Mapping the ids failed.
    #[error("{tool} could not map the ids of {user} ({detail}): check {user}'s ranges in /etc/subuid and /etc/subgid")]
    Map {
        /// `newuidmap` or `newgidmap`.
        tool: &'static str,
        /// The user.
        user: String,
        /// What it printed, or its status.
        detail: String,
    },
    /// Starting or talking to the inner process failed.
    #[error("starting the rootless solver: {0}")]
    Io(#[from] std::io::Error),
}

/// Whether this process runs in a user namespace other than the host's
/// (its uid map is not the identity of every id).
pub fn in_user_namespace() -> bool {
    static INSIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INSIDE.get_or_init(|| {
        std::fs::read_to_string("/proc/self/uid_map")
            .map(|m| {
                let fields: Vec<&str> = m.split_whitespace().collect();
                fields != ["0", "0", "4294967295"]
            })
            .unwrap_or(false)
    })
}

/// How many uids and gids this process's user namespace maps, from 0.
fn mapped_ids() -> (u64, u64) {
    static MAPPED: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    *MAPPED.get_or_init(|| {
        let covered = |file: &str| {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let f: Vec<u64> = l.split_whitespace().filter_map(|n| n.parse().ok()).collect();
                    (f.len() == 3).then(|| f[0] + f[2])
                })
                .max()
                .unwrap_or(0)
        };
        (covered("/proc/self/uid_map"), covered("/proc/self/gid_map"))
    })
}

/// When rootless and `uid` or `gid` is beyond the mapped ids, the error
/// that says so (the kernel says only "invalid argument").
pub(crate) fn unmapped_owner(uid: u32, gid: u32) -> Option<std::io::Error> {
    if !in_user_namespace() {
        return None;
    }
    let (uids, gids) = mapped_ids();
    let (what, id, count, file) = if u64::from(uid) >= uids {
        ("uid", uid, uids, "/etc/subuid")
    } else if u64::from(gid) >= gids {
        ("gid", gid, gids, "/etc/subgid")
    } else {
        return None;
    };
    Some(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "owner {what} {id} is beyond the {count} ids this rootless build maps (0 and the user's ranges in {file}): give the user a range of more than {id} ids there"
        ),
    ))
}

/// Whether the solver must enter a user namespace first: it was started by
/// a user other than root and is not the inner process already.
pub fn needed() -> bool {
    !rustix::process::geteuid().is_root() && std::env::var_os(SYNC_ENV).is_none()
}

/// A user's subordinate ranges `(start, count)` in a `/etc/subuid`-style
/// text, where lines name the user or its uid.
pub fn ranges(text: &str, name: Option<&str>, id: u32) -> Vec<(u32, u32)> {
    let id = id.to_string();
    text.lines()
        .filter_map(|line| {
            let mut f = line.trim().split(':');
            let (who, start, count) = (f.next()?, f.next()?, f.next()?);
            if who != id && Some(who) != name {
                return None;
            }
            Some((start.parse().ok()?, count.parse().ok()?))
        })
        .filter(|&(_, count)| count > 0)
        .collect()
}

/// The `newuidmap` arguments after the pid: the user is 0, its ranges 1 and up.
pub fn map_args(own: u32, ranges: &[(u32, u32)]) -> Vec<String> {
    let mut args = vec!["0".to_string(), own.to_string(), "1".to_string()];
    let mut inside: u64 = 1;
    for &(start, count) in ranges {
        args.extend([inside.to_string(), start.to_string(), count.to_string()]);
        inside += u64::from(count);
    }
    args
}

/// The name of the user with `uid` in `/etc/passwd`.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
    })
}

/// What the kernel's settings say about unprivileged user namespaces.
fn userns_refused() -> Option<String> {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return Some("kernel.unprivileged_userns_clone is 0 (as root: sysctl -w kernel.unprivileged_userns_clone=1)".into());
    }
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return Some("user.max_user_namespaces is 0 (as root: sysctl -w user.max_user_namespaces=15000)".into());
    }
    None
}

/// Everything the outer process needs, checked before anything runs.
struct Plan {
    user: String,
    uid_args: Vec<String>,
    gid_args: Vec<String>,
    newuidmap: PathBuf,
    newgidmap: PathBuf,
}

fn plan() -> Result<Plan, RootlessError> {
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    let name = user_name(uid);
    let user = name.clone().unwrap_or_else(|| uid.to_string());
    let ids = |file: &str| -> Result<Vec<(u32, u32)>, RootlessError> {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let found = ranges(&text, name.as_deref(), uid);
        if found.is_empty() {
            return Err(RootlessError::NoRanges {
                user: user.clone(),
                file: file.to_string(),
            });
        }
        Ok(found)
    };
    let (subuids, subgids) = (ids("/etc/subuid")?, ids("/etc/subgid")?);
    let tool = |tool: &'static str| crate::execute::runc::find_program(tool).ok_or(RootlessError::NoTool { tool });
    let (newuidmap, newgidmap) = (tool("newuidmap")?, tool("newgidmap")?);
    if let Some(why) = userns_refused() {
        return Err(RootlessError::Disabled(why));
    }
    Ok(Plan {
        user,
        uid_args: map_args(uid, &subuids),
        gid_args: map_args(gid, &subgids),
        newuidmap,
        newgidmap,
    })
}

/// Runs this program again in a new user namespace with the user's ids
/// mapped, forwarding SIGINT, SIGTERM and SIGHUP; returns its exit code.
pub fn run_inside() -> Result<i32, RootlessError> {
    let plan = plan()?;
    let (to_inner_r, to_inner_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(std::io::Error::from)?;
    let (from_inner_r, from_inner_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(std::io::Error::from)?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(std::env::args_os().skip(1));
    if let Some(arg0) = std::env::args_os().next() {
        std::os::unix::process::CommandExt::arg0(&mut cmd, arg0);
    }
    let (r, w) = (to_inner_r.as_raw_fd(), from_inner_w.as_raw_fd());
    cmd.env(SYNC_ENV, format!("{r},{w}"));
    // SAFETY: only fcntl on fds this process owns runs between fork and
    // exec; nothing allocates.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            for fd in [r, w] {
                rustix::io::fcntl_setfd(rustix::fd::BorrowedFd::borrow_raw(fd), rustix::io::FdFlags::empty())?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop((to_inner_r, from_inner_w));
    let mut to_inner = std::fs::File::from(to_inner_w);
    if let Err(e) = map_child(&plan, child.id(), from_inner_r) {
        // The inner process exits when its pipe closes without a go.
        drop(to_inner);
        let _ = child.wait();
        return Err(e);
    }
    let _ = to_inner.write_all(b"y");
    drop(to_inner);
    forward_signals(child.id());
    let status = child.wait()?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)))
}

/// Waits for the inner process to enter its namespace, then maps its ids.
fn map_child(plan: &Plan, pid: u32, from_inner: OwnedFd) -> Result<(), RootlessError> {
    let mut said = Vec::new();
    // One status byte and at most a sentence.
    std::fs::File::from(from_inner).take(4096).read_to_end(&mut said)?;
    match said.first() {
        Some(b'u') => {}
        Some(b'e') => return Err(RootlessError::Disabled(String::from_utf8_lossy(&said[1..]).into_owned())),
        _ => {
            return Err(RootlessError::Io(std::io::Error::other(
                "the inner solver exited before entering its namespace",
            )))
        }
    }
    for (tool, path, args) in [
        ("newuidmap", &plan.newuidmap, &plan.uid_args),
        ("newgidmap", &plan.newgidmap, &plan.gid_args),
    ] {
        let out = Command::new(path).arg(pid.to_string()).args(args).output()?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(RootlessError::Map {
                tool,
                user: plan.user.clone(),
                detail: if stderr.is_empty() { out.status.to_string() } else { stderr },
            });
        }
    }
    Ok(())
}

/// Passes the signals that stop a solve on to the inner process, from a
/// thread of its own, for as long as this process lives.
fn forward_signals(pid: u32) {
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        rt.block_on(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                return;
            };
            loop {
                let sig = tokio::select! {
                    _ = int.recv() => rustix::process::Signal::INT,
                    _ = term.recv() => rustix::process::Signal::TERM,
                    _ = hup.recv() => rustix::process::Signal::HUP,
                };
                let _ = rustix::process::kill_process(pid, sig);
            }
        });
    });
}

/// In the inner process (before any thread starts): enters the new user
/// and mount namespaces, lets the outer process map the ids, and waits for
/// it. Does nothing in a process the outer one did not start.
pub fn enter_if_inner() -> Result<(), RootlessError> {
    let Some(fds) = std::env::var_os(SYNC_ENV) else {
        return Ok(());
    };
    let fds = fds.to_string_lossy().into_owned();
    let parse = |s: Option<&str>| s.and_then(|s| s.parse::<i32>().ok()).filter(|fd| *fd > 2);
    let mut it = fds.split(',');
    let (Some(r), Some(w)) = (parse(it.next()), parse(it.next())) else {
        return Err(RootlessError::Io(std::io::Error::other(format!(
            "{SYNC_ENV}={fds:?} is not two descriptors"
        ))));
    };
    // SAFETY: the outer process passed these two pipe ends for this
    // process alone; nothing else here owns them.
    let (mut from_outer, mut to_outer) = unsafe {
        (
            std::fs::File::from(<OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r)),
            std::fs::File::from(<OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(w)),
        )
    };
    // SAFETY: the process is still single-threaded and shares no file
    // table or filesystem information with another.
    let entered = unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWUSER | rustix::thread::UnshareFlags::NEWNS) };
    if let Err(e) = entered {
        let _ = to_outer.write_all(format!("eunshare(CLONE_NEWUSER): {e} (a security module or sysctl forbids it)").as_bytes());
        std::process::exit(crate::exit::INTERNAL);
    }
    to_outer.write_all(b"u")?;
    drop(to_outer);
    let mut go = [0u8; 1];
    if from_outer.read(&mut go)? != 1 || go[0] != b'y' {
        // The outer process reports why.
        std::process::exit(crate::exit::INTERNAL);
    }
    drop(from_outer);
    // Still single-threaded: nothing reads the environment concurrently.
    std::env::remove_var(SYNC_ENV);
    // Mounts made here stay here.
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::REC | rustix::mount::MountPropagationFlags::PRIVATE,
    )
    .map_err(std::io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_found_by_name_or_uid_and_mapped_after_the_user() {
        let text = "alice:100000:65536\n1001:200000:1000\nbob:300000:65536\nbroken line\ncarol:1:0\n";
        assert_eq!(ranges(text, Some("alice"), 1000), vec![(100000, 65536)]);
        assert_eq!(ranges(text, Some("dave"), 1001), vec![(200000, 1000)]);
        assert_eq!(ranges(text, None, 1001), vec![(200000, 1000)]);
        assert!(ranges(text, Some("carol"), 1002).is_empty(), "an empty range is none");
        assert_eq!(
            map_args(1000, &[(100000, 65536), (300000, 10)]),
            ["0", "1000", "1", "1", "100000", "65536", "65537", "300000", "10"]
        );
    }
}
