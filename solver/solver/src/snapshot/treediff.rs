//! Comparing and replaying filesystem trees, without overlayfs: the
//! difference of two trees as a layer (whiteouts for deletions), and a layer
//! applied onto a directory. DiffOp uses the first; the copying snapshotter
//! (where overlayfs cannot be mounted) uses both. Owners, modes, times,
//! xattrs (file capabilities among them) and hard-link groups are kept.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
    // `setcap` changes neither content nor mtime.
    if crate::fsutil::xattrs(pa).ok() != crate::fsutil::xattrs(pb_).ok() {
        return false;
    }
    fs::read(pa).ok() == fs::read(pb_).ok()
}

/// An inode: device and number.
type Inode = (u64, u64);

/// Where each inode's first copy went, so later names become hard links.
type Copied = HashMap<Inode, PathBuf>;

/// The regular files of `root` with more than one name, by inode.
fn link_groups(root: &Path, rel: &Path, out: &mut HashMap<Inode, Vec<PathBuf>>) -> std::io::Result<()> {
    let Ok(rd) = fs::read_dir(root.join(rel)) else {
        return Ok(());
    };
    for e in rd {
        let e = e?;
        let r = rel.join(e.file_name());
        let m = fs::symlink_metadata(root.join(&r))?;
        if m.is_dir() {
            link_groups(root, &r, out)?;
        } else if m.is_file() && m.nlink() > 1 {
            out.entry((m.dev(), m.ino())).or_default().push(r);
        }
    }
    Ok(())
}

/// The hard-link groups of `upper` that differ from `lower`: a member is
/// new or changed, or the names were not one inode there. Every name of
/// such a group goes into the layer, linked, as overlayfs's copy-up does.
fn changed_groups(lower: &Path, upper: &Path) -> std::io::Result<HashSet<Inode>> {
    let mut groups = HashMap::new();
    link_groups(upper, Path::new(""), &mut groups)?;
    let mut changed = HashSet::new();
    for (inode, names) in groups {
        let mut lower_inodes = HashSet::new();
        let mut same = true;
        for r in &names {
            match (fs::symlink_metadata(lower.join(r)), fs::symlink_metadata(upper.join(r))) {
                (Ok(l), Ok(u)) if same_file(&l, &u, &lower.join(r), &upper.join(r)) && l.nlink() == u.nlink() => {
                    lower_inodes.insert((l.dev(), l.ino()));
                }
                _ => same = false,
            }
        }
        if !same || lower_inodes.len() != 1 {
            changed.insert(inode);
        }
    }
    Ok(changed)
}

/// Writes into `out` what turns `lower` into `upper`, in overlayfs layer
/// form: changed and new nodes copied, deleted ones as whiteouts.
pub(crate) fn diff_trees(lower: &Path, upper: &Path, out: &Path) -> std::io::Result<()> {
    let groups = changed_groups(lower, upper)?;
    diff_below(lower, upper, out, Path::new(""), &groups, &mut Copied::new())
}

fn diff_below(lower: &Path, upper: &Path, out: &Path, rel: &Path, groups: &HashSet<Inode>, copied: &mut Copied) -> std::io::Result<()> {
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
                let changed = if um.is_file() && um.nlink() > 1 {
                    // Decided for the whole group, every member compared once.
                    groups.contains(&(um.dev(), um.ino()))
                } else {
                    match &lm {
                        Some(l) => !same_file(l, &um, &lower.join(&r), &upper.join(&r)),
                        None => true,
                    }
                };
                if um.is_dir() {
                    let dir_replaced = lm.as_ref().is_some_and(|l| !l.is_dir());
                    if changed || dir_replaced {
                        copy_node(&upper.join(&r), &out.join(&r), &um, copied)?;
                    }
                    diff_below(lower, upper, out, &r, groups, copied)?;
                    if changed || dir_replaced || out.join(&r).exists() {
                        fs::create_dir_all(out.join(rel))?;
                        copy_node(&upper.join(&r), &out.join(&r), &um, copied)?;
                    }
                } else if changed {
                    fs::create_dir_all(out.join(rel))?;
                    copy_node(&upper.join(&r), &out.join(&r), &um, copied)?;
                }
            }
            (None, None) => {}
        }
    }
    Ok(())
}

/// Copies one node (not a directory's contents) with its owner, mode,
/// xattrs and mtime; a further name of an inode already copied is linked.
fn copy_node(src: &Path, dst: &Path, meta: &fs::Metadata, copied: &mut Copied) -> std::io::Result<()> {
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
            if meta.nlink() > 1 {
                let inode = (meta.dev(), meta.ino());
                if let Some(first) = copied.get(&inode) {
                    return fs::hard_link(first, dst);
                }
                copied.insert(inode, dst.to_path_buf());
            }
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
    // After the owner: a chown clears a file capability.
    crate::fsutil::copy_xattrs(src, dst)?;
    crate::snapshot::layer::set_mtime_nofollow(dst, meta.mtime(), meta.mtime_nsec())?;
    Ok(())
}

/// Applies a layer directory (overlayfs form) onto `dest`: whiteouts delete,
/// opaque directories replace, everything else is copied over.
pub(crate) fn apply_layer(layer: &Path, dest: &Path) -> std::io::Result<()> {
    apply_below(layer, dest, &mut Copied::new())
}

fn apply_below(layer: &Path, dest: &Path, copied: &mut Copied) -> std::io::Result<()> {
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
            apply_below(&src, &dst, copied)?;
            copy_node(&src, &dst, &meta, copied)?;
        } else {
            if fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir()) {
                crate::root::remove_all(&dst)?;
            }
            copy_node(&src, &dst, &meta, copied)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_xattr(p: &Path, name: &str, value: &[u8]) {
        rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty())
            .expect("xattr (needs root or a filesystem with user xattrs)");
    }

    /// `lower` and `upper` with the same `a` (content and mtime), then the
    /// edits a RUN step might make in `upper`.
    fn trees() -> (tempfile::TempDir, tempfile::TempDir) {
        let lower = tempfile::tempdir().expect("tmp");
        let upper = tempfile::tempdir().expect("tmp");
        for t in [&lower, &upper] {
            for f in ["a", "capped", "plain"] {
                fs::write(t.path().join(f), b"same").expect("write");
                crate::snapshot::layer::set_mtime_nofollow(&t.path().join(f), 1_600_000_000, 0).expect("mtime");
            }
        }
        (lower, upper)
    }

    #[test]
    fn a_new_hard_link_and_an_xattr_only_change_make_the_layer() {
        let (lower, upper) = trees();
        fs::hard_link(upper.path().join("a"), upper.path().join("b")).expect("link");
        set_xattr(&upper.path().join("capped"), "user.kiln", b"v");
        let out = tempfile::tempdir().expect("tmp");
        diff_trees(lower.path(), upper.path(), out.path()).expect("diff");
        let mut names: Vec<String> = fs::read_dir(out.path())
            .expect("out")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b", "capped"], "plain is unchanged; both names of the new group");
        let (a, b) = (
            fs::metadata(out.path().join("a")).expect("a"),
            fs::metadata(out.path().join("b")).expect("b"),
        );
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "one inode in the layer too");
        assert_eq!(
            crate::fsutil::xattrs(&out.path().join("capped")).expect("xattrs"),
            [("user.kiln".to_string(), b"v".to_vec())]
        );
        // Nothing changed: nothing in the layer.
        let again = tempfile::tempdir().expect("tmp");
        diff_trees(upper.path(), upper.path(), again.path()).expect("diff");
        assert_eq!(fs::read_dir(again.path()).expect("out").count(), 0);
    }

    #[test]
    fn applying_a_layer_keeps_links_owners_and_capabilities() {
        let layer = tempfile::tempdir().expect("tmp");
        let ping = layer.path().join("ping");
        fs::write(&ping, b"#!/bin/true").expect("write");
        crate::fsutil::lchown(&ping, crate::fsutil::Owner { uid: 7, gid: 7 }).expect("chown");
        let cap = crate::snapshot::layer::CAP_NET_RAW_EP;
        set_xattr(&ping, "security.capability", &cap);
        fs::hard_link(&ping, layer.path().join("ping2")).expect("link");
        let dest = tempfile::tempdir().expect("tmp");
        apply_layer(layer.path(), dest.path()).expect("apply");
        let (p1, p2) = (dest.path().join("ping"), dest.path().join("ping2"));
        let (m1, m2) = (fs::metadata(&p1).expect("ping"), fs::metadata(&p2).expect("ping2"));
        assert_eq!((m1.ino(), m1.nlink(), m1.uid()), (m2.ino(), 2, 7));
        let got = crate::fsutil::xattrs(&p1).expect("xattrs");
        assert_eq!(got, [("security.capability".to_string(), cap.to_vec())], "kept through the chown");
    }
}
