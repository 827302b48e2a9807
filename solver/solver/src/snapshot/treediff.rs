//! Comparing and replaying filesystem trees, without overlayfs: the
//! difference of two trees as a layer (whiteouts for deletions), and a layer
//! applied onto a directory. DiffOp uses the first; the copying snapshotter
//! (where overlayfs cannot be mounted) uses both.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::snapshot::layer::{is_opaque, is_whiteout};

fn same_file(a: &fs::Metadata, b: &fs::Metadata, pa: &Path, pb_: &Path) -> bool {
    if a.file_type() != b.file_type() || a.mode() != b.mode() || a.uid() != b.uid() || a.gid() != b.gid() {
        return false;
    }
    if a.is_dir() {
        return true;
    }
    if a.file_type().is_symlink() {
        return fs::read_link(pa).ok() == fs::read_link(pb_).ok();
    }
    if a.len() != b.len() || a.mtime() != b.mtime() || a.mtime_nsec() != b.mtime_nsec() {
        return false;
    }
    fs::read(pa).ok() == fs::read(pb_).ok()
}

/// Writes into `out` what turns `lower` into `upper` (below `rel`), in
/// overlayfs layer form: changed and new nodes copied, deleted ones as whiteouts.
pub(crate) fn diff_trees(lower: &Path, upper: &Path, out: &Path, rel: &Path) -> std::io::Result<()> {
    let lo_dir = lower.join(rel);
    let up_dir = upper.join(rel);
    let mut names: std::collections::BTreeSet<std::ffi::OsString> = std::collections::BTreeSet::new();
    if let Ok(rd) = fs::read_dir(&lo_dir) {
        names.extend(rd.flatten().map(|e| e.file_name()));
    }
    if let Ok(rd) = fs::read_dir(&up_dir) {
        names.extend(rd.flatten().map(|e| e.file_name()));
    }
    for name in names {
        let r = rel.join(&name);
        let lm = fs::symlink_metadata(lower.join(&r)).ok();
        let um = fs::symlink_metadata(upper.join(&r)).ok();
        match (lm, um) {
            (Some(_), None) => {
                fs::create_dir_all(out.join(rel))?;
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    out.join(&r),
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::Mode::empty(),
                    0,
                )?;
            }
            (lm, Some(um)) => {
                let changed = match &lm {
                    Some(l) => !same_file(l, &um, &lower.join(&r), &upper.join(&r)),
                    None => true,
                };
                if um.is_dir() {
                    let dir_replaced = lm.as_ref().is_some_and(|l| !l.is_dir());
                    if changed || dir_replaced {
                        copy_node(&upper.join(&r), &out.join(&r), &um)?;
                    }
                    diff_trees(lower, upper, out, &r)?;
                    if changed || dir_replaced || out.join(&r).exists() {
                        fs::create_dir_all(out.join(rel))?;
                        copy_node(&upper.join(&r), &out.join(&r), &um)?;
                    }
                } else if changed {
                    fs::create_dir_all(out.join(rel))?;
                    copy_node(&upper.join(&r), &out.join(&r), &um)?;
                }
            }
            (None, None) => {}
        }
    }
    Ok(())
}

/// Copies one node (not a directory's contents) with its owner, mode and mtime.
fn copy_node(src: &Path, dst: &Path, meta: &fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent)?;
    }
    let ft = meta.file_type();
    if ft.is_dir() {
        if !dst.is_dir() {
            fs::create_dir(dst)?;
        }
    } else {
        // Never write through whatever is there (it may be a symlink).
        match fs::symlink_metadata(dst) {
            Ok(m) if m.is_dir() => crate::root::remove_all(dst)?,
            Ok(_) => fs::remove_file(dst)?,
            Err(_) => {}
        }
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
        } else if ft.is_file() {
            fs::copy(src, dst)?;
        } else if !crate::fsutil::make_special(dst, meta, meta.mode() & 0o7777)? {
            return Ok(());
        }
    }
    crate::fsutil::lchown(
        dst,
        crate::fsutil::Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        },
    )?;
    if !ft.is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    crate::snapshot::layer::set_mtime_nofollow(dst, meta.mtime(), meta.mtime_nsec())?;
    Ok(())
}

/// Applies a layer directory (overlayfs form) onto `dest`: whiteouts delete,
/// opaque directories replace, everything else is copied over.
pub(crate) fn apply_layer(layer: &Path, dest: &Path) -> std::io::Result<()> {
    for e in fs::read_dir(layer)? {
        let e = e?;
        let src = e.path();
        let dst = dest.join(e.file_name());
        let meta = fs::symlink_metadata(&src)?;
        if is_whiteout(&meta) {
            crate::root::remove_all(&dst)?;
            continue;
        }
        if meta.is_dir() {
            let existing = fs::symlink_metadata(&dst).ok();
            if existing.as_ref().is_some_and(|m| !m.is_dir()) || (existing.is_some() && is_opaque(&src)) {
                crate::root::remove_all(&dst)?;
            }
            if !dst.exists() {
                fs::create_dir(&dst)?;
            }
            apply_layer(&src, &dst)?;
            copy_node(&src, &dst, &meta)?;
        } else {
            if fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir()) {
                crate::root::remove_all(&dst)?;
            }
            copy_node(&src, &dst, &meta)?;
        }
    }
    Ok(())
}
