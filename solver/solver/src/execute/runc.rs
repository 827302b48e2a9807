//! Running one ExecOp's process in an OCI runtime (runc by default).
//!
//! The scheduler mounts the root filesystem and every input mount; this
//! module writes the runtime config (oci-spec), creates what the runtime
//! needs inside the root (cwd, mount points), runs the container with its
//! output streamed back, and afterwards removes the mount points it had to
//! create, so they do not end up in the step's layer.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};

use kiln_llb::pb;
use oci_spec::runtime::{Capability, LinuxNamespaceType, Mount, Spec};
use tokio::io::AsyncReadExt;

use super::netns::Sandboxes;
use crate::error::Failure;
use crate::fsutil::{mkdir_all, resolve_in_root, resolve_user};
use crate::snapshot::layer::set_mtime_nofollow;

/// The OCI runtime binary and where it keeps state.
pub(crate) struct Runtime {
    /// `runc`, `crun` or a path.
    pub binary: String,
    /// Its `--root`.
    pub state: PathBuf,
    /// A sealed in-memory copy of the binary, made once per solve.
    sealed: OnceLock<Option<SealedBinary>>,
    /// The steps' own networks (default network mode).
    sandboxes: Option<Arc<Sandboxes>>,
}

/// The runtime binary copied into a sealed memfd. runc starts each
/// container by re-executing itself; to keep a container from overwriting
/// the host's runc (CVE-2019-5736) runc 1.1 first clones its own binary
/// (a bind mount and a second exec, or a 9 MB copy) unless it already runs
/// from a sealed memfd, the arrangement runc's own `memfd-bind` tool
/// provides. Starting it from one copy per solve skips that work in every
/// container; the protection is the same, since a sealed memfd cannot be
/// written.
#[derive(Debug)]
struct SealedBinary {
    fd: rustix::fd::OwnedFd,
}

impl SealedBinary {
    fn create(binary: &str) -> std::io::Result<SealedBinary> {
        use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
        let path = find_program(binary).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, binary.to_string()))?;
        let mut source = fs::File::open(path)?;
        // Only a binary: a script run from a memfd would not find itself.
        let mut magic = [0u8; 4];
        std::io::Read::read_exact(&mut source, &mut magic)?;
        if magic != *b"\x7fELF" {
            return Err(std::io::Error::other("not an ELF binary"));
        }
        std::io::Seek::rewind(&mut source)?;
        let fd = memfd_create(binary, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        let mut copy = fs::File::from(fd);
        std::io::copy(&mut source, &mut copy)?;
        let fd = rustix::fd::OwnedFd::from(copy);
        // Exactly the seals runc checks for.
        fcntl_add_seals(&fd, SealFlags::SEAL | SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE)?;
        Ok(SealedBinary { fd })
    }

    fn path(&self) -> PathBuf {
        use rustix::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// `name` as a path: itself when it has a slash, else the first executable
/// file of that name on PATH.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

impl Runtime {
    /// The runtime `binary` keeping its state in `state`.
    pub(crate) fn new(binary: String, state: PathBuf) -> Runtime {
        Runtime {
            binary,
            state,
            sealed: OnceLock::new(),
            sandboxes: None,
        }
    }

    /// Steps in the default network mode get their network from `pool`.
    pub(crate) fn with_sandboxes(mut self, pool: Arc<Sandboxes>) -> Runtime {
        self.sandboxes = Some(pool);
        self
    }

    /// A step in the default network mode is about to run: its network is
    /// made while it waits for its turn and mounts its root.
    pub(crate) fn prepare_networks(&self) {
        if let Some(pool) = &self.sandboxes {
            pool.announce();
        }
    }

    /// Makes the sealed copy of the binary now (a few milliseconds), so the
    /// first step need not wait for it. Without memfd support, for a script,
    /// or with `KILN_SEALED_RUNTIME=off`, the binary is run from its path.
    pub(crate) fn prepare(&self) {
        self.sealed.get_or_init(|| {
            if std::env::var_os("KILN_SEALED_RUNTIME").is_some_and(|v| v == "off") {
                return None;
            }
            SealedBinary::create(&self.binary).ok()
        });
    }

    /// The program to execute: the sealed copy when there is one.
    fn program(&self) -> PathBuf {
        self.prepare();
        match self.sealed.get() {
            Some(Some(s)) => s.path(),
            _ => PathBuf::from(&self.binary),
        }
    }

    /// A command running the runtime, named as the binary in `ps`.
    fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(self.program());
        std::os::unix::process::CommandExt::arg0(&mut cmd, &self.binary);
        // runc (Go) mostly waits: one thread of Go code is enough, and it
        // costs less to start. The container's own environment is the step's.
        if std::env::var_os("GOMAXPROCS").is_none() {
            cmd.env("GOMAXPROCS", "1");
        }
        cmd.arg("--root").arg(&self.state);
        cmd
    }
}

/// One mount of the step besides the root.
#[derive(Debug, Clone)]
pub(crate) enum StepMount {
    /// A host directory or file bound at `dest`.
    Bind {
        /// Path in the container.
        dest: String,
        /// Host path.
        source: PathBuf,
        /// Mounted read-only.
        readonly: bool,
    },
    /// A tmpfs at `dest`.
    Tmpfs {
        /// Path in the container.
        dest: String,
        /// Size limit in bytes (0 = the kernel default).
        size: i64,
    },
}

impl StepMount {
    fn dest(&self) -> &str {
        match self {
            StepMount::Bind { dest, .. } | StepMount::Tmpfs { dest, .. } => dest,
        }
    }
}

/// Everything needed to run one step.
pub(crate) struct Step<'a> {
    /// The op's process settings.
    pub meta: &'a pb::Meta,
    /// `pb::NetMode` as its number.
    pub network: i32,
    /// `pb::SecurityMode` as its number.
    pub security: i32,
    /// The mounted, writable root filesystem.
    pub rootfs: &'a Path,
    /// Other mounts, in the op's order.
    pub mounts: Vec<StepMount>,
    /// A scratch directory for the bundle (config.json, hosts, resolv.conf);
    /// on a tmpfs when the step sees secrets.
    pub bundle: &'a Path,
    /// Environment added for this step only (secret env vars).
    pub extra_env: Vec<String>,
    /// A static emulator the step's command starts through (a foreign
    /// platform without binfmt_misc; see `emulate.rs`).
    pub emulator: Option<PathBuf>,
    /// The container id.
    pub id: String,
}

/// `docker`'s default capability set, which BuildKit also grants.
const DEFAULT_CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// The capabilities of a step that is not `--security=insecure`.
pub(crate) fn default_capabilities() -> HashSet<Capability> {
    DEFAULT_CAPS.iter().copied().collect()
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Kills and removes the container if the step is abandoned mid-way.
struct ContainerGuard<'a> {
    runtime: &'a Runtime,
    id: String,
    armed: bool,
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self
                .runtime
                .command()
                .args(["delete", "--force", &self.id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A path created only so that something could be mounted on it.
struct Stub {
    path: PathBuf,
    parent_mtime: Option<(i64, i64)>,
}

fn find_stubs(rootfs: &Path, dests: &[&str]) -> Vec<Stub> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for d in dests {
        let mut cur = String::new();
        for part in d.split('/').filter(|p| !p.is_empty()) {
            cur.push('/');
            cur.push_str(part);
            let Ok(p) = resolve_in_root(rootfs, &cur, true) else { break };
            if fs::symlink_metadata(&p).is_err() {
                if seen.insert(p.clone()) {
                    let parent_mtime = p.parent().and_then(|pp| fs::metadata(pp).ok()).map(|m| {
                        use std::os::unix::fs::MetadataExt;
                        (m.mtime(), m.mtime_nsec())
                    });
                    out.push(Stub { path: p, parent_mtime });
                }
                break;
            }
        }
    }
    out
}

fn remove_stubs(stubs: &[Stub]) -> std::io::Result<()> {
    for s in stubs.iter().rev() {
        let Ok(m) = fs::symlink_metadata(&s.path) else { continue };
        // Only what is still empty: the step may have written there itself.
        let removed = if m.is_dir() {
            remove_empty_tree(&s.path)
        } else if m.len() == 0 {
            fs::remove_file(&s.path).is_ok()
        } else {
            false
        };
        if removed {
            if let (Some(parent), Some((sec, ns))) = (s.path.parent(), s.parent_mtime) {
                set_mtime_nofollow(parent, sec, ns)?;
            }
        }
    }
    Ok(())
}

fn remove_empty_tree(dir: &Path) -> bool {
    let Ok(rd) = fs::read_dir(dir) else { return false };
    for e in rd.flatten() {
        let p = e.path();
        let ok = match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => remove_empty_tree(&p),
            Ok(m) if m.len() == 0 && m.is_file() => fs::remove_file(&p).is_ok(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    fs::remove_dir(dir).is_ok()
}

/// The step's resolv.conf: the host's, without loopback resolvers unless the
/// step shares the host's network; with none left, slirp4netns's forwarder
/// for a sandboxed step (it asks the host's resolvers), else public ones.
fn resolv_conf(host: &str, host_network: bool, slirp: bool) -> String {
    let mut out = String::new();
    let mut servers = 0;
    for line in host.lines() {
        let t = line.trim();
        if let Some(ip) = t.strip_prefix("nameserver") {
            let ip = ip.trim();
            if !host_network && (ip.starts_with("127.") || ip == "::1") {
                continue;
            }
            servers += 1;
        }
        out.push_str(line);
        out.push('\n');
    }
    if servers == 0 && slirp {
        out.push_str(&format!("nameserver {}\n", super::netns::SLIRP_DNS));
    } else if servers == 0 && !host_network {
        out.push_str("nameserver 8.8.8.8\nnameserver 8.8.4.4\n");
    }
    out
}

fn hosts_file(hostname: &str, extra: &[pb::HostIp]) -> String {
    let mut s = format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for h in extra {
        s.push_str(&format!("{}\t{}\n", h.ip, h.host));
    }
    s
}

fn bind(dest: &str, source: &Path, readonly: bool) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(dest));
    m.set_typ(Some("bind".into()));
    m.set_source(Some(source.to_path_buf()));
    let mut opts = vec!["rbind".to_string()];
    opts.push(if readonly { "ro" } else { "rw" }.to_string());
    m.set_options(Some(opts));
    m
}

/// Runs the step; `on_output(stream, bytes)` receives its output as it comes.
pub(crate) async fn run_step(runtime: &Runtime, step: Step<'_>, mut on_output: impl FnMut(u8, &[u8])) -> Result<(), Failure> {
    let meta = step.meta;
    if meta.args.is_empty() {
        return Err(Failure::invalid("the step has no command"));
    }
    let host_network = step.network == pb::NetMode::Host as i32;
    // The default mode: a namespace of the step's own, connected outside.
    let sandbox = if step.network == pb::NetMode::Unset as i32 {
        let pool = runtime
            .sandboxes
            .as_ref()
            .ok_or_else(|| Failure::Internal("no network sandboxes for this runtime".into()))?;
        Some(tokio::task::block_in_place(|| pool.take())?)
    } else {
        None
    };
    let insecure = step.security == pb::SecurityMode::Insecure as i32;
    let hostname = if meta.hostname.is_empty() {
        "buildkitsandbox"
    } else {
        &meta.hostname
    };

    // User and cwd from the root filesystem.
    // No user is root, without needing an /etc/passwd (a scratch-based step).
    let (owner, extra_gids) = if meta.user.is_empty() {
        (crate::fsutil::Owner { uid: 0, gid: 0 }, Vec::new())
    } else {
        resolve_user(step.rootfs, &meta.user).map_err(|e| Failure::invalid(e.to_string()))?
    };
    let cwd = if meta.cwd.is_empty() { "/".to_string() } else { meta.cwd.clone() };

    fs::create_dir_all(step.bundle).map_err(Failure::io(Some("creating the bundle"), step.bundle.display()))?;
    let hosts = step.bundle.join("hosts");
    let resolv = step.bundle.join("resolv.conf");
    fs::write(&hosts, hosts_file(hostname, &meta.extra_hosts)).map_err(Failure::io(Some("writing"), hosts.display()))?;
    fs::write(
        &resolv,
        resolv_conf(
            &fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            host_network,
            sandbox.is_some(),
        ),
    )
    .map_err(Failure::io(Some("writing"), resolv.display()))?;

    let mut spec = Spec::default();
    spec.set_hostname(Some(hostname.to_string()));
    if let Some(root) = spec.root_mut() {
        root.set_path(step.rootfs.to_path_buf());
        root.set_readonly(Some(false));
    }
    let mut mounts: Vec<Mount> = spec.mounts().clone().unwrap_or_default();
    let rootless = crate::rootless::in_user_namespace();
    if rootless {
        // The host's cgroups are not this user's to mount; sysfs mounts only
        // in a network namespace of this user namespace, so the host's is bound.
        mounts.retain(|m| m.destination() != Path::new("/sys/fs/cgroup"));
        if host_network {
            for m in mounts.iter_mut().filter(|m| m.destination() == Path::new("/sys")) {
                *m = bind("/sys", Path::new("/sys"), true);
            }
        }
    }
    mounts.push(bind("/etc/resolv.conf", &resolv, true));
    mounts.push(bind("/etc/hosts", &hosts, true));
    let mut user_mounts = step.mounts;
    // Parents before what is mounted inside them.
    user_mounts.sort_by_key(|m| m.dest().split('/').filter(|s| !s.is_empty()).count());
    for m in &user_mounts {
        match m {
            StepMount::Bind { dest, source, readonly } => mounts.push(bind(dest, source, *readonly)),
            StepMount::Tmpfs { dest, size } => {
                let mut t = Mount::default();
                t.set_destination(PathBuf::from(dest));
                t.set_typ(Some("tmpfs".into()));
                t.set_source(Some(PathBuf::from("tmpfs")));
                let mut opts = vec!["nosuid".to_string(), "nodev".to_string(), "mode=1777".to_string()];
                if *size > 0 {
                    opts.push(format!("size={size}"));
                }
                t.set_options(Some(opts));
                mounts.push(t);
            }
        }
    }
    if let Some(emulator) = &step.emulator {
        mounts.push(bind(super::emulate::EMULATOR_DEST, emulator, true));
    }
    let dests: Vec<String> = mounts.iter().map(|m| m.destination().to_string_lossy().into_owned()).collect();
    let dest_refs: Vec<&str> = dests.iter().map(String::as_str).collect();
    let stubs = find_stubs(step.rootfs, &dest_refs);
    spec.set_mounts(Some(mounts));

    let cwd_host = resolve_in_root(step.rootfs, &cwd, true).map_err(Failure::io(Some("working directory"), &cwd))?;
    mkdir_all(&cwd_host, 0o755, None, None).map_err(Failure::io(Some("creating working directory"), &cwd))?;

    let capabilities: HashSet<Capability> = if insecure { all_capabilities() } else { default_capabilities() };
    if let Some(process) = spec.process_mut() {
        let args = match &step.emulator {
            Some(_) => std::iter::once(super::emulate::EMULATOR_DEST.to_string())
                .chain(meta.args.iter().cloned())
                .collect(),
            None => meta.args.clone(),
        };
        process.set_args(Some(args));
        let mut env = meta.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, DEFAULT_PATH.to_string());
        }
        env.extend(step.extra_env.iter().cloned());
        process.set_env(Some(env));
        process.set_cwd(PathBuf::from(&cwd));
        let user = process.user_mut();
        user.set_uid(owner.uid);
        user.set_gid(owner.gid);
        // As BuildKit: the supplementary groups, the primary group first
        // unless it is one of them (so `id` lists it in groups=).
        let mut gids = extra_gids;
        if !gids.contains(&owner.gid) {
            gids.insert(0, owner.gid);
        }
        user.set_additional_gids(Some(gids));
        process.set_no_new_privileges(Some(!insecure));
        if let Some(caps) = process.capabilities().clone() {
            let set = capabilities.clone();
            let mut caps = caps;
            caps.set_bounding(Some(set.clone()));
            caps.set_effective(Some(set.clone()));
            caps.set_permitted(Some(set));
            caps.set_inheritable(None);
            caps.set_ambient(None);
            process.set_capabilities(Some(caps));
        }
        process.set_rlimits(None);
    }
    if let Some(linux) = spec.linux_mut() {
        if let Some(ns) = linux.namespaces().clone() {
            let kept: Vec<_> = ns
                .into_iter()
                .filter(|n| !(host_network && n.typ() == LinuxNamespaceType::Network))
                .filter(|n| n.typ() != LinuxNamespaceType::User && n.typ() != LinuxNamespaceType::Cgroup)
                .map(|mut n| {
                    if let (LinuxNamespaceType::Network, Some(s)) = (n.typ(), &sandbox) {
                        n.set_path(Some(s.path().to_path_buf()));
                    }
                    n
                })
                .collect();
            linux.set_namespaces(Some(kept));
        }
        if insecure {
            linux.set_masked_paths(None);
            linux.set_readonly_paths(None);
        } else if let Some(host) = super::seccomp::Host::current() {
            let filter =
                super::seccomp::default_filter(&capabilities, host).map_err(|e| Failure::Internal(format!("the seccomp filter: {e}")))?;
            linux.set_seccomp(Some(filter));
        }
        // Rootless, runc makes no cgroup: the user may not write the host's.
        linux.set_cgroups_path((!rootless).then(|| PathBuf::from(format!("/kiln/{}", step.id))));
    }
    let config = serde_json::to_vec(&spec).map_err(|e| Failure::Internal(format!("the runtime spec: {e}")))?;
    fs::write(step.bundle.join("config.json"), config).map_err(Failure::io(Some("writing"), step.bundle.join("config.json").display()))?;

    let mut guard = ContainerGuard {
        runtime,
        id: step.id.clone(),
        armed: true,
    };
    let command = tokio::task::block_in_place(|| runtime.command());
    let mut child = tokio::process::Command::from(command)
        .arg("run")
        .arg("--bundle")
        .arg(step.bundle)
        .arg("--no-new-keyring")
        .arg(&step.id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failure::Runtime {
            binary: runtime.binary.clone(),
            source: std::sync::Arc::new(e),
        })?;
    let mut out = child.stdout.take().ok_or_else(|| Failure::Internal("no stdout pipe".into()))?;
    let mut err = child.stderr.take().ok_or_else(|| Failure::Internal("no stderr pipe".into()))?;
    let mut out_buf = vec![0u8; 16 * 1024];
    let mut err_buf = vec![0u8; 16 * 1024];
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        tokio::select! {
            r = out.read(&mut out_buf), if out_open => match r {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => on_output(1, &out_buf[..n]),
            },
            r = err.read(&mut err_buf), if err_open => match r {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => on_output(2, &err_buf[..n]),
            },
        }
    }
    let status = child.wait().await.map_err(|e| Failure::Runtime {
        binary: runtime.binary.clone(),
        source: std::sync::Arc::new(e),
    })?;
    guard.armed = false;
    drop(guard);

    remove_stubs(&stubs).map_err(Failure::io(Some("removing mount points from"), step.rootfs.display()))?;
    let code = status.code().unwrap_or(-1);
    let valid = if meta.valid_exit_codes.is_empty() {
        code == 0
    } else {
        meta.valid_exit_codes.contains(&code)
    };
    if !valid {
        return Err(Failure::Exit {
            command: display_args(&meta.args),
            code,
        });
    }
    Ok(())
}

fn display_args(args: &[String]) -> String {
    args.join(" ")
}

/// The kernel's capabilities by number (`CAP_CHOWN` is 0), as the runtime
/// spec names them.
const KERNEL_CAPS: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// A capability by its spec name.
fn capability(name: &str) -> Option<Capability> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
}

/// Every capability the solver itself holds (its permitted set: a runtime
/// cannot grant more, e.g. inside a container that dropped some), for
/// `--security=insecure`.
fn all_capabilities() -> HashSet<Capability> {
    let held = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapPrm:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    KERNEL_CAPS
        .iter()
        .enumerate()
        .filter(|(bit, _)| held & (1 << bit) != 0)
        .filter_map(|(_, n)| capability(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{fcntl_get_seals, SealFlags};

    #[test]
    fn a_sandboxed_step_never_names_the_hosts_loopback_resolver() {
        let host = "search corp\nnameserver 127.0.0.53\nnameserver 10.1.2.3\noptions edns0\n";
        let own = resolv_conf(host, false, true);
        assert_eq!(own, "search corp\nnameserver 10.1.2.3\noptions edns0\n");
        let only_loopback = "nameserver 127.0.0.53\n";
        assert_eq!(
            resolv_conf(only_loopback, false, true),
            "nameserver 10.0.2.3\n",
            "slirp4netns forwards"
        );
        assert_eq!(
            resolv_conf(only_loopback, true, false),
            only_loopback,
            "the host's network keeps it"
        );
    }

    #[test]
    fn insecure_steps_get_every_capability_the_solver_holds() {
        let known: Vec<Capability> = KERNEL_CAPS.iter().filter_map(|n| capability(n)).collect();
        assert_eq!(known.len(), KERNEL_CAPS.len(), "every name parses");
        let all = all_capabilities();
        if rustix::process::geteuid().is_root() {
            assert!(all.contains(&Capability::SysAdmin), "{all:?}");
            assert!(all.is_superset(&DEFAULT_CAPS.iter().copied().collect()));
        }
    }

    #[test]
    fn a_binary_runtime_runs_from_a_sealed_copy() {
        let runtime = Runtime::new("true".into(), PathBuf::from("/nonexistent"));
        let program = runtime.program();
        assert!(program.starts_with("/proc/self/fd"), "{program:?}");
        let sealed = runtime.sealed.get().and_then(Option::as_ref).expect("sealed copy");
        let seals = fcntl_get_seals(&sealed.fd).expect("seals");
        assert_eq!(seals, SealFlags::SEAL | SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE);
        let bytes = fs::read(&program).expect("read copy");
        assert_eq!(bytes, fs::read(find_program("true").expect("on PATH")).expect("read original"));
        assert!(runtime.command().status().expect("runs").success());
    }

    #[test]
    fn a_script_runtime_runs_from_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("runtime");
        fs::write(&script, "#!/bin/sh\n[ \"$1\" = --root ] && exit 3\n").expect("script");
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let runtime = Runtime::new(script.to_string_lossy().into_owned(), PathBuf::from("/nonexistent"));
        assert_eq!(runtime.program(), script);
        assert_eq!(runtime.command().status().expect("runs").code(), Some(3));
    }
}
