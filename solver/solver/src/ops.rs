//! Executing ExecOp, FileOp, MergeOp and DiffOp on snapshots.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_llb::pb;

use crate::context::LocalSource;
use crate::exec::{run_step, Runtime, Step, StepError, StepMount};
use crate::fileop::{self, SourceView};
use crate::root::StateRoot;
use crate::snapshot::{mount_stack, Layers, Mounted, NewLayer};

/// A vertex output.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    /// A filesystem made of layers.
    Layers(Layers),
    /// A local directory, used in place until something needs it as layers.
    Local(Arc<LocalSource>),
}

/// Copies a local source's included files into a new layer.
pub(crate) fn materialize_local(root: &StateRoot, local: &LocalSource) -> Result<String, String> {
    let layer = NewLayer::create(root).map_err(|e| e.to_string())?;
    fileop::copy_tree(&layer.fs(), &SourceView::Local(local))?;
    layer.commit(root).map_err(|e| e.to_string())
}

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
}

/// Runs an ExecOp. `inputs` are the op's input values (locals already turned
/// into layers). Returns the layers of each output index.
pub(crate) async fn exec(
    root: &StateRoot,
    runtime: &Runtime,
    op: &pb::ExecOp,
    inputs: &[Layers],
    given: &StepSecrets<'_>,
    id: String,
    on_output: impl FnMut(u8, &[u8]),
) -> Result<Vec<Option<Layers>>, StepError> {
    let meta = op.meta.as_ref().ok_or_else(|| StepError {
        message: "exec op has no meta".into(),
        exit_code: None,
    })?;
    let setup = |m: String| StepError {
        message: m,
        exit_code: None,
    };
    let mut prepared: Vec<PreparedMount> = Vec::new();
    let mut step_mounts: Vec<StepMount> = Vec::new();
    let mut rootfs: Option<PathBuf> = None;
    // Secrets live on a private tmpfs (with the bundle, whose config may hold secret env).
    let has_secrets = !op.secretenv.is_empty() || op.mounts.iter().any(|m| m.mount_type == pb::MountType::Secret as i32);
    let secret_fs = if has_secrets {
        Some(tokio::task::block_in_place(|| crate::snapshot::mount_tmpfs(root)).map_err(|e| setup(format!("secrets tmpfs: {e}")))?)
    } else {
        None
    };
    // Held until the step is over: the cache directories' locks.
    let mut cache_locks: Vec<crate::cachemount::Acquired> = Vec::new();
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
            let acquired = tokio::task::block_in_place(|| crate::cachemount::acquire(root, &cache_id, opt.sharing, seed.as_ref()))
                .map_err(|e| setup(format!("cache mount {cache_id}: {e}")))?;
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
                .ok_or_else(|| setup("no secrets tmpfs".into()))?
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
            write().map_err(|e| setup(format!("secret {:?}: {e}", opt.id)))?;
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
        let (mounted, upper) = tokio::task::block_in_place(|| -> Result<_, String> {
            if writable {
                let upper = NewLayer::create(root).map_err(|e| e.to_string())?;
                let mounted = mount_stack(root, &base, Some(&upper)).map_err(|e| e.to_string())?;
                Ok((mounted, Some(upper)))
            } else {
                Ok((mount_stack(root, &base, None).map_err(|e| e.to_string())?, None))
            }
        })
        .map_err(setup)?;
        let path = if m.selector.is_empty() || m.selector == "/" {
            mounted.path().to_path_buf()
        } else {
            crate::fsutil::resolve_in_root(mounted.path(), &m.selector, true).map_err(|e| setup(e.to_string()))?
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
    let bundle = match &secret_fs {
        Some(fs_) => fs_.path().join("bundle"),
        None => root.temp_dir().map_err(|e| setup(e.to_string()))?,
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
            id,
        },
        on_output,
    )
    .await;
    let _ = fs::remove_dir_all(&bundle);
    if let Some(s) = secret_fs {
        s.unmount().map_err(|e| setup(format!("unmounting the secrets tmpfs: {e}")))?;
    }
    drop(cache_locks);
    // Unmount the non-root mounts first (they may sit inside the root).
    for p in prepared.iter_mut().rev() {
        if let Some(m) = p.mounted.take() {
            m.unmount().map_err(|e| setup(format!("unmounting: {e}")))?;
        }
    }
    result?;
    let mut outputs: Vec<Option<Layers>> = Vec::new();
    for p in prepared {
        if p.output < 0 {
            continue;
        }
        let Some(upper) = p.upper else { continue };
        let id = upper.commit(root).map_err(|e| setup(format!("committing layer: {e}")))?;
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

/// The working filesystem of a FileOp: a writable overlay over a base.
struct Working {
    action: usize,
    upper: NewLayer,
    mounted: Mounted,
    base: Vec<String>,
}

/// Runs a FileOp (blocking). Returns the layers of each output index.
pub(crate) fn file(root: &StateRoot, op: &pb::FileOp, inputs: &[Value]) -> Result<Vec<Option<Layers>>, String> {
    let n = inputs.len() as i64;
    let mut results: HashMap<usize, Layers> = HashMap::new();
    let mut outputs: Vec<Option<Layers>> = Vec::new();
    let mut working: Option<Working> = None;
    let mut ro_views: HashMap<i64, Mounted> = HashMap::new();

    // Layers of an input index (an op input, or an earlier action's result).
    let layers_of = |idx: i64, results: &HashMap<usize, Layers>| -> Result<Vec<String>, String> {
        if idx < 0 {
            return Ok(Vec::new());
        }
        if idx < n {
            return match &inputs[idx as usize] {
                Value::Layers(l) => Ok(l.as_ref().clone()),
                Value::Local(_) => Err("a local source cannot be a FileOp's base here".into()),
            };
        }
        let a = (idx - n) as usize;
        results
            .get(&a)
            .map(|l| l.as_ref().clone())
            .ok_or_else(|| format!("action input {idx} is not available"))
    };

    for (ai, action) in op.actions.iter().enumerate() {
        // The base: continue in place on the previous action's tree when it is the input.
        let continue_in_place = working
            .as_ref()
            .is_some_and(|w| action.input >= n && (action.input - n) as usize == w.action);
        if continue_in_place {
            let w = working.as_mut().ok_or("no working tree")?;
            w.action = ai;
        } else {
            if let Some(w) = working.take() {
                finish(root, w, &mut results)?;
            }
            let base = layers_of(action.input, &results)?;
            let upper = NewLayer::create(root).map_err(|e| e.to_string())?;
            let mounted = mount_stack(root, &base, Some(&upper)).map_err(|e| e.to_string())?;
            working = Some(Working {
                action: ai,
                upper,
                mounted,
                base,
            });
        }
        let w = working.as_ref().ok_or("no working tree")?;
        let dest_root = w.mounted.path().to_path_buf();
        use pb::file_action::Action;
        match &action.action {
            Some(Action::Copy(c)) => {
                let si = action.secondary_input;
                if si < n && si >= 0 {
                    match &inputs[si as usize] {
                        Value::Local(l) => fileop::copy(&dest_root, &SourceView::Local(l), c)?,
                        Value::Layers(layers) => {
                            if let std::collections::hash_map::Entry::Vacant(slot) = ro_views.entry(si) {
                                slot.insert(mount_stack(root, layers, None).map_err(|e| e.to_string())?);
                            }
                            let view = ro_views.get(&si).ok_or("view vanished")?.path().to_path_buf();
                            fileop::copy(&dest_root, &SourceView::Dir(&view), c)?;
                        }
                    }
                } else if si < 0 {
                    let empty = root.temp_dir().map_err(|e| e.to_string())?;
                    let r = fileop::copy(&dest_root, &SourceView::Dir(&empty), c);
                    let _ = fs::remove_dir_all(&empty);
                    r?;
                } else {
                    let layers = layers_of(si, &results)?;
                    let view = mount_stack(root, &layers, None).map_err(|e| e.to_string())?;
                    fileop::copy(&dest_root, &SourceView::Dir(view.path()), c)?;
                }
            }
            Some(Action::Mkfile(a)) => fileop::mkfile(&dest_root, a)?,
            Some(Action::Mkdir(a)) => fileop::mkdir(&dest_root, a)?,
            Some(Action::Rm(a)) => fileop::rm(&dest_root, a)?,
            Some(Action::Symlink(a)) => fileop::symlink(&dest_root, a)?,
            None => return Err(format!("file action {ai} is empty")),
        }
        if action.output >= 0 {
            // An output is frozen before a later action changes it.
            let w = working.take().ok_or("no working tree")?;
            let layers = finish(root, w, &mut results)?;
            let idx = action.output as usize;
            if outputs.len() <= idx {
                outputs.resize(idx + 1, None);
            }
            outputs[idx] = Some(layers);
        }
    }
    if let Some(w) = working.take() {
        finish(root, w, &mut results)?;
    }
    drop(ro_views);
    Ok(outputs)
}

fn finish(root: &StateRoot, w: Working, results: &mut HashMap<usize, Layers>) -> Result<Layers, String> {
    w.mounted.unmount().map_err(|e| format!("unmounting: {e}"))?;
    let id = w.upper.commit(root).map_err(|e| e.to_string())?;
    let mut layers = w.base;
    layers.push(id);
    let layers = Arc::new(layers);
    results.insert(w.action, layers.clone());
    Ok(layers)
}

/// MergeOp: the inputs' layers stacked in order.
pub(crate) fn merge(inputs: &[Layers]) -> Layers {
    Arc::new(inputs.iter().flat_map(|l| l.iter().cloned()).collect())
}

/// DiffOp: the changes from `lower` to `upper`, as layers.
pub(crate) fn diff(root: &StateRoot, lower: &[String], upper: &[String]) -> Result<Layers, String> {
    if upper.len() >= lower.len() && upper[..lower.len()] == *lower {
        return Ok(Arc::new(upper[lower.len()..].to_vec()));
    }
    // Not a prefix: compare the two trees and write the difference as one layer.
    let lo = mount_stack(root, lower, None).map_err(|e| e.to_string())?;
    let up = mount_stack(root, upper, None).map_err(|e| e.to_string())?;
    let layer = NewLayer::create(root).map_err(|e| e.to_string())?;
    crate::treediff::diff_trees(lo.path(), up.path(), &layer.fs(), Path::new("")).map_err(|e| e.to_string())?;
    drop(lo);
    drop(up);
    let id = layer.commit(root).map_err(|e| e.to_string())?;
    Ok(Arc::new(vec![id]))
}
