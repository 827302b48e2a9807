//! ExecOp: its mounts prepared (root and other layers, cache, tmpfs,
//! secrets, SSH agents), the step run by [`super::runc`], its writable
//! mounts committed as the op's outputs.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_llb::pb;

use super::runc::{run_step, Runtime, Step, StepMount};
use crate::error::Failure;
use crate::root::StateRoot;
use crate::snapshot::{mount_stack, Layers, Mounted, NewLayer};

/// Mounts for one ExecOp, in the op's mount order.
struct PreparedMount {
    mounted: Option<Mounted>,
    upper: Option<NewLayer>,
    base: Vec<String>,
    output: i64,
}

/// What a step may be given besides its inputs.
pub(crate) struct StepSecrets<'a> {
    /// Secret values by id.
    pub secrets: &'a kiln_solver_protocol::Secrets,
    /// SSH agent sockets by id.
    pub ssh: &'a std::collections::BTreeMap<String, String>,
    /// `--cache-from` caches, which may hold a cache mount's contents.
    pub imports: &'a [crate::remotecache::Imported],
    /// Reports a warning on the step's log.
    pub warn: &'a (dyn Fn(&str) + Send + Sync),
}

/// How a step's container starts.
pub(crate) struct Launch<'a> {
    /// The container id.
    pub id: String,
    /// A static emulator the command starts through (see `emulate.rs`).
    pub emulator: Option<PathBuf>,
    /// Where to keep the step's filesystem if it fails (`--on-error=keep`).
    pub keep: Option<Arc<super::keep::KeepFailed>>,
    /// Reports a line on the step's log.
    pub say: &'a (dyn Fn(&str) + Send + Sync),
}

/// Runs an ExecOp. `inputs` are the op's input values (locals already turned
/// into layers). Returns the layers of each output index.
pub(crate) async fn exec(
    root: &StateRoot,
    runtime: &Runtime,
    op: &pb::ExecOp,
    inputs: &[Layers],
    given: &StepSecrets<'_>,
    launch: Launch<'_>,
    on_output: impl FnMut(u8, &[u8]),
) -> Result<Vec<Option<Layers>>, Failure> {
    let meta = op.meta.as_ref().ok_or_else(|| Failure::invalid("exec op has no meta"))?;
    let setup = Failure::Invalid;
    let mut prepared: Vec<PreparedMount> = Vec::new();
    let mut step_mounts: Vec<StepMount> = Vec::new();
    let mut rootfs: Option<PathBuf> = None;
    // Secrets live on a private tmpfs (with the bundle, whose config may hold secret env).
    let has_secrets = !op.secretenv.is_empty() || op.mounts.iter().any(|m| m.mount_type == pb::MountType::Secret as i32);
    let secret_fs = if has_secrets {
        Some(tokio::task::block_in_place(|| crate::snapshot::mount_tmpfs(root)).map_err(Failure::mount("the secrets tmpfs"))?)
    } else {
        None
    };
    // Held until the step is over: the cache directories' locks.
    let mut cache_locks: Vec<crate::execute::cachemount::Acquired> = Vec::new();
    let mut extra_env = Vec::new();
    for se in &op.secretenv {
        match given.secrets.get(&se.id) {
            Some(v) => extra_env.push(format!("{}={}", se.name, String::from_utf8_lossy(&v))),
            None if se.optional => {}
            None => return Err(setup(format!("secret {:?} is required (as ${}) but was not given", se.id, se.name))),
        }
    }
    for (n, m) in op.mounts.iter().enumerate() {
        let mount_type = m.mount_type;
        if mount_type == pb::MountType::Tmpfs as i32 {
            step_mounts.push(StepMount::Tmpfs {
                dest: m.dest.clone(),
                size: m.tmpfs_opt.as_ref().map(|t| t.size).unwrap_or(0),
            });
            continue;
        }
        if mount_type == pb::MountType::Cache as i32 {
            let opt = m.cache_opt.clone().unwrap_or_default();
            let cache_id = if opt.id.is_empty() { m.dest.clone() } else { opt.id.clone() };
            let seed = if m.input >= 0 {
                let layers = inputs
                    .get(m.input as usize)
                    .ok_or_else(|| setup(format!("cache mount {} names input {} which does not exist", m.dest, m.input)))?;
                Some((layers.clone(), m.selector.clone()))
            } else {
                None
            };
            // On a root that has no such cache yet, an imported cache may hold its contents.
            let restore = |dir: &Path| {
                given.imports.iter().any(|i| match i.restore_mount(root, &cache_id, dir) {
                    Ok(done) => done,
                    Err(why) => {
                        (given.warn)(&format!("cache import: {why}; the cache mount starts empty"));
                        false
                    }
                })
            };
            let acquired =
                tokio::task::block_in_place(|| crate::execute::cachemount::acquire(root, &cache_id, opt.sharing, seed.as_ref(), &restore))
                    .map_err(Failure::io(Some("cache mount"), &cache_id))?;
            step_mounts.push(StepMount::Bind {
                dest: m.dest.clone(),
                source: acquired.dir.clone(),
                readonly: m.readonly,
            });
            cache_locks.push(acquired);
            continue;
        }
        if mount_type == pb::MountType::Secret as i32 {
            let opt = m.secret_opt.clone().unwrap_or_default();
            let Some(value) = given.secrets.get(&opt.id) else {
                if opt.optional {
                    continue;
                }
                return Err(setup(format!("secret {:?} is required at {} but was not given", opt.id, m.dest)));
            };
            let dir = secret_fs
                .as_ref()
                .ok_or_else(|| Failure::Internal("no secrets tmpfs".into()))?
                .path()
                .to_path_buf();
            let file = dir.join(format!("secret-{n}"));
            let write = || -> std::io::Result<()> {
                use std::os::unix::fs::PermissionsExt;
                fs::write(&file, &value)?;
                fs::set_permissions(&file, fs::Permissions::from_mode(opt.mode & 0o7777))?;
                crate::fsutil::lchown(
                    &file,
                    crate::fsutil::Owner {
                        uid: opt.uid,
                        gid: opt.gid,
                    },
                )
            };
            write().map_err(Failure::io(Some("writing secret"), format!("{:?}", opt.id)))?;
            step_mounts.push(StepMount::Bind {
                dest: m.dest.clone(),
                source: file,
                readonly: true,
            });
            continue;
        }
        if mount_type == pb::MountType::Ssh as i32 {
            let opt = m.ssh_opt.clone().unwrap_or_default();
            let id = if opt.id.is_empty() { "default".to_string() } else { opt.id.clone() };
            let Some(socket) = given.ssh.get(&id) else {
                if opt.optional {
                    continue;
                }
                return Err(setup(format!(
                    "SSH agent {id:?} is required at {} but was not given (kiln build --ssh {id})",
                    m.dest
                )));
            };
            step_mounts.push(StepMount::Bind {
                dest: m.dest.clone(),
                source: PathBuf::from(socket),
                readonly: false,
            });
            continue;
        }
        let base: Vec<String> = if m.input < 0 {
            Vec::new()
        } else {
            inputs
                .get(m.input as usize)
                .map(|l| l.as_ref().clone())
                .ok_or_else(|| setup(format!("mount {} names input {} which does not exist", m.dest, m.input)))?
        };
        let writable = m.dest == "/" || m.output >= 0 || !m.readonly;
        let (mounted, upper) = tokio::task::block_in_place(|| -> Result<_, Failure> {
            let what = || format!("the step's {}", m.dest);
            if writable {
                let upper = NewLayer::create(root).map_err(Failure::new_layer(root))?;
                let mounted = mount_stack(root, &base, Some(&upper)).map_err(Failure::mount(what()))?;
                Ok((mounted, Some(upper)))
            } else {
                Ok((mount_stack(root, &base, None).map_err(Failure::mount(what()))?, None))
            }
        })?;
        let path = if m.selector.is_empty() || m.selector == "/" {
            mounted.path().to_path_buf()
        } else {
            let p = crate::fsutil::resolve_in_root(mounted.path(), &m.selector, true).map_err(Failure::io(None, &m.selector))?;
            // As BuildKit: a missing mount source is named before anything
            // runs, not left to the runtime's mount error.
            if fs::symlink_metadata(&p).is_err() {
                return Err(Failure::invalid(format!("\"/{}\" not found", m.selector.trim_start_matches('/'))));
            }
            p
        };
        if m.dest == "/" {
            rootfs = Some(path);
        } else {
            step_mounts.push(StepMount::Bind {
                dest: m.dest.clone(),
                source: path,
                readonly: !writable,
            });
        }
        prepared.push(PreparedMount {
            mounted: Some(mounted),
            upper,
            base,
            output: m.output,
        });
    }
    let rootfs = rootfs.ok_or_else(|| setup("exec op has no root mount".into()))?;
    // What a kept failure must leave out or bind read-only.
    let mut private: Vec<PathBuf> = secret_fs.iter().map(|f| f.path().to_path_buf()).collect();
    private.extend(given.ssh.values().map(PathBuf::from));
    let caches: Vec<PathBuf> = cache_locks.iter().map(|c| c.dir.clone()).collect();
    let kept_mounts = launch.keep.as_ref().map(|_| step_mounts.clone());
    let private_env = extra_env.clone();
    let bundle = match &secret_fs {
        Some(fs_) => fs_.path().join("bundle"),
        None => root
            .temp_dir()
            .map_err(Failure::io(Some("making a directory in"), root.path().display()))?,
    };
    let result = run_step(
        runtime,
        Step {
            meta,
            network: op.network,
            security: op.security,
            rootfs: &rootfs,
            mounts: step_mounts,
            bundle: &bundle,
            extra_env,
            emulator: launch.emulator,
            id: launch.id,
        },
        on_output,
    )
    .await;
    if let (Err(Failure::Exit { .. }), Some(keep), Some(mounts)) = (&result, &launch.keep, &kept_mounts) {
        if keep.claim() {
            let failed = super::keep::Failed {
                bundle: &bundle,
                rootfs: &rootfs,
                mounts,
                private: &private,
                caches: &caches,
                private_env: &private_env,
            };
            let id = format!("kiln-kept-{}", std::process::id());
            match tokio::task::block_in_place(|| super::keep::save(&keep.dir, &id, &failed)) {
                Ok(enter) => (launch.say)(&format!(
                    "the failed step's filesystem is kept at {}; enter it with: {enter}",
                    keep.dir.display()
                )),
                Err(why) => (launch.say)(&format!("--on-error=keep: {why}")),
            }
        }
    }
    let _ = fs::remove_dir_all(&bundle);
    if let Some(s) = secret_fs {
        s.unmount().map_err(Failure::unmount("the secrets tmpfs"))?;
    }
    drop(cache_locks);
    // Unmount the non-root mounts first (they may sit inside the root).
    for p in prepared.iter_mut().rev() {
        if let Some(m) = p.mounted.take() {
            m.unmount().map_err(Failure::unmount("a step mount"))?;
        }
    }
    result?;
    let mut outputs: Vec<Option<Layers>> = Vec::new();
    for p in prepared {
        if p.output < 0 {
            continue;
        }
        let Some(upper) = p.upper else { continue };
        let id = upper.commit(root).map_err(Failure::commit_layer(root))?;
        let idx = p.output as usize;
        if outputs.len() <= idx {
            outputs.resize(idx + 1, None);
        }
        let mut layers = p.base;
        layers.push(id);
        outputs[idx] = Some(Arc::new(layers));
    }
    Ok(outputs)
}
