//! `--on-error=keep=DIR`: the filesystem of the first RUN step that fails,
//! kept as an OCI bundle to enter (`runc run --bundle DIR ID`).
//!
//! DIR gets `rootfs/` (a copy of the step's root as it was when the command
//! exited: its base and everything it wrote), `mounts/N/` (copies of its
//! other layer mounts), and `config.json`: the step's own runtime config
//! with a shell for its process, on a terminal. Kept as the step had them:
//! environment, user, working directory, tmpfs mounts, cache mounts (bound
//! read-only: a debugging session never changes a cache). Left out: secret
//! files and secret environment variables, SSH agent sockets, the step's
//! network (the shell gets a namespace with loopback only) and its cgroup.
//! Nothing of it is a cache record.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

use super::fileop::{copy_tree, SourceView};
use super::runc::StepMount;
use crate::error::Failure;

/// Where the failed step goes; only the first failure of a build is kept.
#[derive(Debug)]
pub(crate) struct KeepFailed {
    /// The directory (must not exist, or be empty).
    pub dir: PathBuf,
    taken: AtomicBool,
}

impl KeepFailed {
    /// Keeps the first failed step at `dir`.
    pub(crate) fn new(dir: PathBuf) -> KeepFailed {
        KeepFailed {
            dir,
            taken: AtomicBool::new(false),
        }
    }

    /// Claims the directory for one failed step; false when another has it.
    pub(crate) fn claim(&self) -> bool {
        !self.taken.swap(true, Ordering::SeqCst)
    }
}

/// What the step ran with, as [`save`] needs it.
pub(crate) struct Failed<'a> {
    /// The bundle the step ran from (its config.json, hosts, resolv.conf).
    pub bundle: &'a Path,
    /// The step's mounted root filesystem.
    pub rootfs: &'a Path,
    /// Its other mounts.
    pub mounts: &'a [StepMount],
    /// Host paths that are secrets or agent sockets: never kept.
    pub private: &'a [PathBuf],
    /// Cache mount directories (kept bound, read-only).
    pub caches: &'a [PathBuf],
    /// Environment entries only the step may see (secret env).
    pub private_env: &'a [String],
}

/// The shell the kept process runs: the first of these the root has.
const SHELLS: &[&str] = &["/bin/bash", "/bin/sh", "/busybox/sh"];

/// Writes the failed step to `dir`; returns the command that enters it.
pub(crate) fn save(dir: &Path, id: &str, step: &Failed<'_>) -> Result<String, Failure> {
    let io = |what: &'static str| Failure::io(Some(what), dir.display());
    if fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Failure::invalid(format!(
            "--on-error=keep: {} is not empty; name a new directory",
            dir.display()
        )));
    }
    fs::create_dir_all(dir.join("rootfs")).map_err(io("creating"))?;
    copy_tree(&dir.join("rootfs"), &SourceView::Dir(step.rootfs))?;
    let config = fs::read(step.bundle.join("config.json")).map_err(io("reading the step's config for"))?;
    let mut spec: Spec = serde_json::from_slice(&config).map_err(|e| Failure::Internal(format!("the step's runtime config: {e}")))?;
    if let Some(root) = spec.root_mut() {
        root.set_path(dir.join("rootfs"));
    }
    for name in ["hosts", "resolv.conf"] {
        let _ = fs::copy(step.bundle.join(name), dir.join(name));
    }
    let mut kept: Vec<Mount> = Vec::new();
    let mut copies = 0;
    for m in spec.mounts().clone().unwrap_or_default() {
        let Some(source) = m.source().clone() else {
            kept.push(m);
            continue;
        };
        let is_bind = m.typ().as_deref() == Some("bind");
        if !is_bind {
            kept.push(m);
            continue;
        }
        let mut m = m;
        if source.starts_with(step.bundle) {
            // hosts and resolv.conf, copied beside the config.
            let name = source.file_name().map(|n| n.to_owned()).unwrap_or_default();
            m.set_source(Some(dir.join(name)));
        } else if step.private.iter().any(|p| source.starts_with(p)) {
            continue;
        } else if step.caches.iter().any(|c| source.starts_with(c)) {
            let mut options = m.options().clone().unwrap_or_default();
            options.retain(|o| o != "rw");
            if !options.iter().any(|o| o == "ro") {
                options.push("ro".into());
            }
            m.set_options(Some(options));
        } else if step
            .mounts
            .iter()
            .any(|s| matches!(s, StepMount::Bind { source: s, .. } if *s == source))
            && source.is_dir()
        {
            // A layer mount: gone when the step's mounts are, so copied.
            copies += 1;
            let copy = dir.join("mounts").join(copies.to_string());
            fs::create_dir_all(&copy).map_err(io("creating"))?;
            copy_tree(&copy, &SourceView::Dir(&source))?;
            m.set_source(Some(copy));
        }
        kept.push(m);
    }
    spec.set_mounts(Some(kept));
    let root = dir.join("rootfs");
    let shell = SHELLS
        .iter()
        .find(|s| fs::symlink_metadata(root.join(s.trim_start_matches('/'))).is_ok())
        .copied()
        .unwrap_or("/bin/sh");
    if let Some(process) = spec.process_mut() {
        process.set_args(Some(vec![shell.to_string()]));
        process.set_terminal(Some(true));
        let env: Vec<String> = process
            .env()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| !step.private_env.contains(e))
            .collect();
        process.set_env(Some(env));
    }
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(None);
        if let Some(ns) = linux.namespaces().clone() {
            let fresh: Vec<_> = ns
                .into_iter()
                .map(|mut n| {
                    if n.typ() == LinuxNamespaceType::Network {
                        n.set_path(None);
                    }
                    n
                })
                .collect();
            linux.set_namespaces(Some(fresh));
        }
    }
    let config = serde_json::to_vec_pretty(&spec).map_err(|e| Failure::Internal(format!("the kept runtime config: {e}")))?;
    fs::write(dir.join("config.json"), config).map_err(io("writing the config of"))?;
    let enter = format!("runc run --bundle {} {id}", dir.display());
    let script = format!("#!/bin/sh\n# Enters the failed step kept by kiln build --on-error=keep.\nexec {enter} \"$@\"\n");
    fs::write(dir.join("enter.sh"), script).map_err(io("writing enter.sh in"))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.join("enter.sh"), fs::Permissions::from_mode(0o755)).map_err(io("making enter.sh executable in"))?;
    Ok(enter)
}
