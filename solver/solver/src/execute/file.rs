//! FileOp: its actions applied in order on writable overlays, an action's
//! result frozen as a layer when it is an output or a later action's input.

use std::collections::HashMap;
use std::fs;
use std::sync::Arc;

use kiln_llb::pb;

use super::fileop::{self, SourceView};
use super::Value;
use crate::error::Failure;
use crate::root::StateRoot;
use crate::snapshot::{mount_stack, Layers, Mounted, NewLayer};
use crate::source::context::LocalSource;

/// Copies a local source's included files into a new layer.
pub(crate) fn materialize_local(root: &StateRoot, local: &LocalSource) -> Result<String, Failure> {
    let layer = NewLayer::create(root).map_err(Failure::new_layer(root))?;
    fileop::copy_tree(&layer.fs(), &SourceView::Local(local))?;
    layer.commit(root).map_err(Failure::commit_layer(root))
}

/// The working tree was expected and is not there: a bug, not an input.
fn no_tree() -> Failure {
    Failure::Internal("the file op lost its working tree".into())
}

/// The working filesystem of a FileOp: a writable overlay over a base.
struct Working {
    action: usize,
    upper: NewLayer,
    mounted: Mounted,
    base: Vec<String>,
}

/// Runs a FileOp (blocking). Returns the layers of each output index.
pub(crate) fn file(root: &StateRoot, op: &pb::FileOp, inputs: &[Value]) -> Result<Vec<Option<Layers>>, Failure> {
    let n = inputs.len() as i64;
    let mut results: HashMap<usize, Layers> = HashMap::new();
    let mut outputs: Vec<Option<Layers>> = Vec::new();
    let mut working: Option<Working> = None;
    let mut ro_views: HashMap<i64, Mounted> = HashMap::new();

    // Layers of an input index (an op input, or an earlier action's result).
    let layers_of = |idx: i64, results: &HashMap<usize, Layers>| -> Result<Vec<String>, Failure> {
        if idx < 0 {
            return Ok(Vec::new());
        }
        if idx < n {
            return match &inputs[idx as usize] {
                Value::Layers(l) => Ok(l.as_ref().clone()),
                Value::Local(_) => Err(Failure::invalid("a local source cannot be a FileOp's base here")),
            };
        }
        let a = (idx - n) as usize;
        results
            .get(&a)
            .map(|l| l.as_ref().clone())
            .ok_or_else(|| Failure::invalid(format!("action input {idx} is not available")))
    };

    for (ai, action) in op.actions.iter().enumerate() {
        // The base: continue in place on the previous action's tree when it is the input.
        let continue_in_place = working
            .as_ref()
            .is_some_and(|w| action.input >= n && (action.input - n) as usize == w.action);
        if continue_in_place {
            let w = working.as_mut().ok_or_else(no_tree)?;
            w.action = ai;
        } else {
            if let Some(w) = working.take() {
                finish(root, w, &mut results)?;
            }
            let base = layers_of(action.input, &results)?;
            let upper = NewLayer::create(root).map_err(Failure::new_layer(root))?;
            let mounted = mount_stack(root, &base, Some(&upper)).map_err(Failure::mount(format!("the base of file action {ai}")))?;
            working = Some(Working {
                action: ai,
                upper,
                mounted,
                base,
            });
        }
        let w = working.as_ref().ok_or_else(no_tree)?;
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
                                slot.insert(mount_stack(root, layers, None).map_err(Failure::mount(format!("input {si} of the file op")))?);
                            }
                            let view = ro_views.get(&si).ok_or_else(no_tree)?.path().to_path_buf();
                            fileop::copy(&dest_root, &SourceView::Dir(&view), c)?;
                        }
                    }
                } else if si < 0 {
                    let empty = root
                        .temp_dir()
                        .map_err(Failure::io(Some("making a directory in"), root.path().display()))?;
                    let r = fileop::copy(&dest_root, &SourceView::Dir(&empty), c);
                    let _ = fs::remove_dir_all(&empty);
                    r?;
                } else {
                    let layers = layers_of(si, &results)?;
                    let view = mount_stack(root, &layers, None).map_err(Failure::mount(format!("input {si} of the file op")))?;
                    fileop::copy(&dest_root, &SourceView::Dir(view.path()), c)?;
                }
            }
            Some(Action::Mkfile(a)) => fileop::mkfile(&dest_root, a)?,
            Some(Action::Mkdir(a)) => fileop::mkdir(&dest_root, a)?,
            Some(Action::Rm(a)) => fileop::rm(&dest_root, a)?,
            Some(Action::Symlink(a)) => fileop::symlink(&dest_root, a)?,
            None => return Err(Failure::invalid(format!("file action {ai} is empty"))),
        }
        if action.output >= 0 {
            // An output is frozen before a later action changes it.
            let w = working.take().ok_or_else(no_tree)?;
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

fn finish(root: &StateRoot, w: Working, results: &mut HashMap<usize, Layers>) -> Result<Layers, Failure> {
    w.mounted
        .unmount()
        .map_err(Failure::unmount(format!("the tree of file action {}", w.action)))?;
    let id = w.upper.commit(root).map_err(Failure::commit_layer(root))?;
    let mut layers = w.base;
    layers.push(id);
    let layers = Arc::new(layers);
    results.insert(w.action, layers.clone());
    Ok(layers)
}
