//! MergeOp and DiffOp: layers stacked, and the difference of two stacks.

use std::sync::Arc;

use crate::error::Failure;
use crate::root::StateRoot;
use crate::snapshot::{mount_stack, Layers, NewLayer};

/// MergeOp: the inputs' layers stacked in order.
pub(crate) fn merge(inputs: &[Layers]) -> Layers {
    Arc::new(inputs.iter().flat_map(|l| l.iter().cloned()).collect())
}

/// DiffOp: the changes from `lower` to `upper`, as layers.
pub(crate) fn diff(root: &StateRoot, lower: &[String], upper: &[String]) -> Result<Layers, Failure> {
    if upper.len() >= lower.len() && upper[..lower.len()] == *lower {
        return Ok(Arc::new(upper[lower.len()..].to_vec()));
    }
    // Not a prefix: compare the two trees and write the difference as one layer.
    let lo = mount_stack(root, lower, None).map_err(Failure::mount("the diff's lower side"))?;
    let up = mount_stack(root, upper, None).map_err(Failure::mount("the diff's upper side"))?;
    let layer = NewLayer::create(root).map_err(Failure::new_layer(root))?;
    crate::snapshot::treediff::diff_trees(lo.path(), up.path(), &layer.fs())
        .map_err(Failure::io(Some("writing the difference to"), layer.fs().display()))?;
    drop(lo);
    drop(up);
    let id = layer.commit(root).map_err(Failure::commit_layer(root))?;
    Ok(Arc::new(vec![id]))
}
