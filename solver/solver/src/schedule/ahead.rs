//! Copies made ahead of their destination.
//!
//! A `COPY --from=stage` in the last stage of a multi-stage build waits for
//! two things: its source stage and the step before it in its own stage. When
//! the source is ready first, the copy can be made on the part of the
//! destination that is already built: the newest finished step down its chain
//! of bases. Layers only ever stack, so that part is a prefix of the real
//! destination. When the real destination is ready, the copy's layer is kept
//! if the layers in between leave alone every path the copy depends on: each
//! destination path and its parents (none of which may be a symlink in the
//! prefix, so the copy wrote nowhere else) and anything the copy wrote outside
//! them. Otherwise the layer is thrown away and the copy made again on the real
//! destination, as it would have been without this.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use kiln_llb::pb;

use crate::execute::{file, Value};
use crate::root::{remove_all, StateRoot};
use crate::snapshot::{layer_fs, Layers};

/// The destination paths of a FileOp that can be copied ahead: a chain of
/// copy actions on its first input, from its other inputs, with one output
/// and owners given by number. Paths are relative to the root.
pub(crate) fn plan(op: &pb::Op) -> Option<Vec<PathBuf>> {
    use pb::file_action::Action;
    let Some(pb::op::Op::File(f)) = &op.op else { return None };
    let n = op.inputs.len() as i64;
    let last = f.actions.len().checked_sub(1)?;
    if n < 2 {
        return None;
    }
    let mut dests = Vec::new();
    for (i, a) in f.actions.iter().enumerate() {
        let Some(Action::Copy(c)) = &a.action else { return None };
        let chained = if i == 0 { a.input == 0 } else { a.input == n + i as i64 - 1 };
        let output_ok = if i == last { a.output == 0 } else { a.output < 0 };
        if !chained || !output_ok || !(1..n).contains(&a.secondary_input) || by_name(c.owner.as_ref()) {
            return None;
        }
        // Into the root: every path is under it, nothing to gain.
        dests.push(relative(&c.dest).filter(|d| !d.as_os_str().is_empty())?);
    }
    Some(dests)
}

fn by_name(chown: Option<&pb::ChownOpt>) -> bool {
    let named = |u: &Option<pb::UserOpt>| matches!(u.as_ref().and_then(|u| u.user.as_ref()), Some(pb::user_opt::User::ByName(_)));
    chown.is_some_and(|c| named(&c.user) || named(&c.group))
}

/// `/a/b/` as `a/b`; `None` for paths climbing with `..`.
fn relative(path: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// `a/b/c` -> `a`, `a/b`, `a/b/c`.
fn with_parents(path: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    path.ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
}

/// A copy made on a prefix of its destination, waiting to be kept or dropped.
pub(crate) struct CopyAhead {
    root: Arc<StateRoot>,
    prefix: Vec<String>,
    layer: Option<String>,
    watched: Vec<PathBuf>,
}

/// Makes the copies of `op` (planned by [`plan`], writing to `dests`) on
/// `prefix`, with `sources` the values of the op's inputs after the first.
/// `None` when a destination path runs through a symlink in the prefix, or
/// the copy fails there (it is then made, and fails, the ordinary way).
pub(crate) fn copy(root: &Arc<StateRoot>, op: &pb::Op, dests: &[PathBuf], prefix: Layers, sources: &[Value]) -> Option<CopyAhead> {
    let Some(pb::op::Op::File(f)) = &op.op else { return None };
    // Layers adopted lazily from a cache must be on disk to be looked at.
    if prefix.iter().any(|id| crate::snapshot::ensure_files(root, id).is_err()) {
        return None;
    }
    let through_symlink = dests
        .iter()
        .flat_map(|d| with_parents(d))
        .any(|p| prefix.iter().any(|id| is_symlink(&layer_fs(root, id).join(&p))));
    if through_symlink {
        return None;
    }
    let mut values = vec![Value::Layers(prefix.clone())];
    values.extend_from_slice(sources);
    let outputs = file::file(root, f, &values).ok()?;
    let layers = outputs.into_iter().next().flatten()?;
    let layer = layers.last()?.clone();
    let mut ahead = CopyAhead {
        root: root.clone(),
        prefix: prefix.to_vec(),
        layer: Some(layer.clone()),
        watched: dests.iter().flat_map(|d| with_parents(d)).collect(),
    };
    // What was written outside the destinations (a directory's parents made
    // by the copy are already watched; nothing else is expected).
    let written = layer_fs(root, &layer);
    let mut todo = vec![PathBuf::new()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(written.join(&dir)).ok()?.flatten() {
            let rel = dir.join(e.file_name());
            if dests.iter().any(|d| rel.starts_with(d)) {
                continue;
            }
            if !ahead.watched.contains(&rel) {
                ahead.watched.push(rel.clone());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(rel);
            }
        }
    }
    Some(ahead)
}

fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

impl CopyAhead {
    /// The op's outputs on the real destination `base`, if the copy made
    /// ahead holds there; else `None` and its layer is removed.
    pub(crate) fn settle(mut self, base: &Value) -> Option<Vec<Option<Layers>>> {
        let Value::Layers(real) = base else { return None };
        let between = real.strip_prefix(self.prefix.as_slice())?;
        if between.iter().any(|id| crate::snapshot::ensure_files(&self.root, id).is_err()) {
            return None;
        }
        let untouched = between.iter().all(|id| {
            let fs = layer_fs(&self.root, id);
            self.watched
                .iter()
                .all(|p| matches!(fs::symlink_metadata(fs.join(p)), Err(e) if e.kind() == std::io::ErrorKind::NotFound))
        });
        if !untouched {
            return None;
        }
        let layer = self.layer.take()?;
        let mut layers = real.as_ref().clone();
        layers.push(layer);
        Some(vec![Some(Arc::new(layers))])
    }
}

impl Drop for CopyAhead {
    fn drop(&mut self) {
        if let Some(id) = self.layer.take() {
            let _ = remove_all(&self.root.snapshot_dir(&id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_op(actions: Vec<(i64, i64, i64, &str)>, inputs: usize) -> pb::Op {
        let actions = actions
            .into_iter()
            .map(|(input, secondary_input, output, dest)| pb::FileAction {
                input,
                secondary_input,
                output,
                action: Some(pb::file_action::Action::Copy(pb::FileActionCopy {
                    src: "/x".into(),
                    dest: dest.into(),
                    ..Default::default()
                })),
            })
            .collect();
        pb::Op {
            inputs: (0..inputs)
                .map(|i| pb::Input {
                    digest: format!("sha256:{i}"),
                    index: 0,
                })
                .collect(),
            op: Some(pb::op::Op::File(pb::FileOp { actions })),
            ..Default::default()
        }
    }

    #[test]
    fn only_copies_chained_on_the_first_input_are_planned() {
        assert_eq!(plan(&copy_op(vec![(0, 1, 0, "/out1")], 2)), Some(vec![PathBuf::from("out1")]));
        assert_eq!(
            plan(&copy_op(vec![(0, 1, -1, "/a/"), (2, 1, 0, "/b/c")], 2)),
            Some(vec![PathBuf::from("a"), PathBuf::from("b/c")])
        );
        // Copying from the destination itself, from nothing, or onto another base.
        assert_eq!(plan(&copy_op(vec![(0, 0, 0, "/x")], 2)), None);
        assert_eq!(plan(&copy_op(vec![(0, -1, 0, "/x")], 2)), None);
        assert_eq!(plan(&copy_op(vec![(1, 0, 0, "/x")], 2)), None);
        // Two outputs, or a path climbing out.
        assert_eq!(plan(&copy_op(vec![(0, 1, 0, "/a"), (2, 1, 1, "/b")], 2)), None);
        assert_eq!(plan(&copy_op(vec![(0, 1, 0, "/../etc")], 2)), None);
        assert_eq!(plan(&copy_op(vec![(0, 1, 0, "/")], 2)), None);
        // An owner by name is read from the destination's /etc/passwd.
        let mut op = copy_op(vec![(0, 1, 0, "/x")], 2);
        if let Some(pb::op::Op::File(f)) = &mut op.op {
            if let Some(pb::file_action::Action::Copy(c)) = &mut f.actions[0].action {
                c.owner = Some(pb::ChownOpt {
                    user: Some(pb::UserOpt {
                        user: Some(pb::user_opt::User::ByName(pb::NamedUserOpt {
                            name: "app".into(),
                            input: 0,
                        })),
                    }),
                    group: None,
                });
            }
        }
        assert_eq!(plan(&op), None);
    }

    fn layer(root: &StateRoot, id: &str, files: &[&str]) -> String {
        let fs = layer_fs(root, id);
        fs::create_dir_all(&fs).expect("layer");
        for f in files {
            let p = fs.join(f);
            fs::create_dir_all(p.parent().expect("parent")).expect("dirs");
            fs::write(p, b"x").expect("file");
        }
        id.to_string()
    }

    #[test]
    fn a_copy_is_kept_only_when_the_layers_between_leave_its_paths_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Arc::new(StateRoot::open(dir.path(), "runc").expect("root"));
        let base = layer(&root, "base", &["bin/sh", "etc/passwd"]);
        let made = layer(&root, "made", &["app/out/f"]);
        let other = layer(&root, "other", &["srv/data"]);
        let clash = layer(&root, "clash", &["app/keep"]);
        let ahead = |id: &str| CopyAhead {
            root: root.clone(),
            prefix: vec![base.clone()],
            layer: Some(id.to_string()),
            watched: with_parents(Path::new("app/out")).collect(),
        };
        let real = |ids: &[&String]| Value::Layers(Arc::new(ids.iter().map(|s| s.to_string()).collect()));
        // A layer in between that writes elsewhere: kept, on top of the real base.
        let kept = ahead(&made).settle(&real(&[&base, &other])).expect("kept");
        assert_eq!(kept[0].as_deref(), Some(&vec![base.clone(), other.clone(), made.clone()]));
        assert!(layer_fs(&root, &made).is_dir());
        // One that writes a parent of the destination: dropped, layer removed.
        assert!(ahead(&made).settle(&real(&[&base, &other, &clash])).is_none());
        assert!(!root.snapshot_dir(&made).exists());
        // A base that is not an extension of the prefix.
        let again = layer(&root, "again", &["app/out/f"]);
        assert!(ahead(&again).settle(&real(&[&other])).is_none());
    }

    #[test]
    fn paths_are_listed_with_their_parents() {
        let all: Vec<PathBuf> = with_parents(Path::new("a/b/c")).collect();
        assert_eq!(all, [PathBuf::from("a"), PathBuf::from("a/b"), PathBuf::from("a/b/c")]);
        assert_eq!(relative("/a/./b/"), Some(PathBuf::from("a/b")));
        assert_eq!(relative("/"), Some(PathBuf::new()));
    }
}
