//! Path helpers for working inside a root filesystem: resolving paths the
//! way the container would see them (symlinks cannot escape the root),
//! creating parents with an owner, setting owners and times.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::source::context::join_rel;
use kiln_patterns::{clean_rel, glob_match, has_wildcards};

/// Resolves the container path `p` inside `root`: symlinks are followed as
/// if `root` were `/` (absolute targets and `..` stay inside), the last
/// component only when `follow_last`. Missing components are kept as they
/// are, so the result can name something to create.
pub(crate) fn resolve_in_root(root: &Path, p: &str, follow_last: bool) -> io::Result<PathBuf> {
    let mut parts: Vec<String> = Vec::new(); // resolved so far, relative to root
    let mut pending: Vec<String> = split(p).into_iter().rev().collect();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "." | "" => continue,
            ".." => {
                parts.pop();
                continue;
            }
            _ => {}
        }
        let is_last = pending.is_empty();
        let mut candidate = root.to_path_buf();
        candidate.extend(&parts);
        candidate.push(&part);
        if is_last && !follow_last {
            parts.push(part);
            break;
        }
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 255 {
                    return Err(io::Error::other(format!("too many levels of symbolic links in {p}")));
                }
                let target = fs::read_link(&candidate)?;
                let t = target.to_string_lossy().into_owned();
                if t.starts_with('/') {
                    parts.clear();
                }
                for c in split(&t).into_iter().rev() {
                    pending.push(c);
                }
            }
            _ => parts.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(parts);
    Ok(out)
}

/// Paths under `root` matching a `/`-separated glob, component by component.
pub(crate) fn matches_in_dir(root: &Path, pattern: &str) -> Vec<PathBuf> {
    let clean = clean_rel(pattern);
    let mut found = vec![String::new()];
    for part in clean.split('/') {
        let mut next = Vec::new();
        for base in &found {
            if has_wildcards(part) {
                let Ok(rd) = fs::read_dir(root.join(base)) else { continue };
                let mut names: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
                names.sort();
                next.extend(names.into_iter().filter(|n| glob_match(part, n)).map(|n| join_rel(base, &n)));
            } else {
                next.push(join_rel(base, part));
            }
        }
        found = next;
    }
    found
        .into_iter()
        .map(|p| root.join(p))
        .filter(|p| fs::symlink_metadata(p).is_ok())
        .collect()
}

fn split(p: &str) -> Vec<String> {
    Path::new(p)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_string()),
            _ => None,
        })
        .collect()
}

/// Owner of created files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Sets the owner of a path without following a final symlink.
pub(crate) fn lchown(path: &Path, owner: Owner) -> io::Result<()> {
    rustix::fs::chownat(
        rustix::fs::CWD,
        path,
        Some(rustix::fs::Uid::from_raw(owner.uid)),
        Some(rustix::fs::Gid::from_raw(owner.gid)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| crate::rootless::unmapped_owner(owner.uid, owner.gid).unwrap_or_else(|| e.into()))
}

/// Creates `dir` and its missing parents as BuildKit's copy does: each
/// with the permission bits of `perm` (setuid, setgid and sticky bits of
/// `perm` are not given; a setgid bit the kernel gives a directory made in
/// a setgid directory is kept, with that directory's group), owned by
/// `owner` when given and timestamped `time` when given. Existing
/// directories are left alone. `dir` must already be resolved inside its
/// root. Returns the directories it made, outermost first.
pub(crate) fn mkdir_all(dir: &Path, perm: u32, owner: Option<Owner>, time: Option<i64>) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cur = dir.to_path_buf();
    loop {
        match fs::metadata(&cur) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(io::Error::other(format!("{} is not a directory", cur.display()))),
            Err(_) => {
                missing.push(cur.clone());
                if !cur.pop() {
                    break;
                }
            }
        }
    }
    let mut made = Vec::with_capacity(missing.len());
    for d in missing.iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        let inherited = fs::symlink_metadata(d)?.mode() & 0o2000;
        fs::set_permissions(d, fs::Permissions::from_mode((perm & 0o777) | inherited))?;
        if let Some(o) = owner {
            lchown(d, o)?;
        }
        if let Some(t) = time {
            crate::snapshot::layer::set_mtime_nofollow(d, t / 1_000_000_000, t % 1_000_000_000)?;
        }
        made.push(d.clone());
    }
    Ok(made)
}

/// Makes a device node or fifo like `meta` at `dst`; false for what is not
/// one (a socket), which is not copied.
pub(crate) fn make_special(dst: &Path, meta: &fs::Metadata, mode: u32) -> io::Result<bool> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let ft = meta.file_type();
    let kind = if ft.is_char_device() {
        rustix::fs::FileType::CharacterDevice
    } else if ft.is_block_device() {
        rustix::fs::FileType::BlockDevice
    } else if ft.is_fifo() {
        rustix::fs::FileType::Fifo
    } else {
        return Ok(false);
    };
    rustix::fs::mknodat(rustix::fs::CWD, dst, kind, rustix::fs::Mode::from_raw_mode(mode), meta.rdev())?;
    Ok(true)
}

/// Looks a user up in `root`'s `/etc/passwd` (by name or number) and the
/// group in `/etc/group`; `user[:group]`. Returns the owner and the
/// supplementary groups (the `/etc/group` entries listing the user).
pub(crate) fn resolve_user(root: &Path, spec: &str) -> io::Result<(Owner, Vec<u32>)> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = account_file(root, "/etc/passwd")?;
    let groups = account_file(root, "/etc/group")?;
    let (uid, mut gid) = if user.is_empty() {
        (0, 0)
    } else if let Ok(n) = user.parse::<u32>() {
        let gid = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[2] == user)
            .and_then(|f| f[3].parse().ok())
            .unwrap_or(0);
        (n, gid)
    } else {
        let f = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == user)
            .ok_or_else(|| io::Error::other(format!("unable to find user {user}: no matching entries in passwd file")))?;
        (
            f[2].parse()
                .map_err(|_| io::Error::other(format!("bad uid for {user} in /etc/passwd")))?,
            f[3].parse()
                .map_err(|_| io::Error::other(format!("bad gid for {user} in /etc/passwd")))?,
        )
    };
    if let Some(g) = group {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| io::Error::other(format!("unable to find group {g}: no matching entries in group file")))?,
        };
    }
    // Supplementary groups (runc's rule: only when no group is given), by
    // the user's name, also when the user was given by number.
    let name = if user.parse::<u32>().is_ok() {
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == user)
            .map(|f| f[0].to_string())
            .unwrap_or_default()
    } else {
        user.to_string()
    };
    let mut extra = Vec::new();
    if group.is_none() && !name.is_empty() {
        for l in groups.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() > 3 && f[3].split(',').any(|m| m == name) {
                if let Ok(g) = f[2].parse::<u32>() {
                    if !extra.contains(&g) {
                        extra.push(g);
                    }
                }
            }
        }
    }
    Ok((Owner { uid, gid }, extra))
}

/// The most of an image's `/etc/passwd` or `/etc/group` that is read.
const MAX_ACCOUNT_FILE: usize = 64 << 20;

/// The text of an account file (`/etc/passwd`, `/etc/group`) of the image at
/// `root`: empty when the image has none or it cannot be read, an error when
/// it is not a regular file (a FIFO would block the solver) or is over
/// 64 MiB. Bytes that are not UTF-8 are replaced, not a reason to ignore it.
fn account_file(root: &Path, file: &str) -> io::Result<String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = resolve_in_root(root, file, true)?;
    // Non-blocking, so opening a FIFO returns at once; a regular file reads as usual.
    let Ok(f) = fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(&path)
    else {
        return Ok(String::new());
    };
    if !f.metadata()?.is_file() {
        return Err(io::Error::other(format!("{file} in the image is not a regular file")));
    }
    let mut bytes = Vec::new();
    if f.take(MAX_ACCOUNT_FILE as u64 + 1).read_to_end(&mut bytes).is_err() {
        return Ok(String::new());
    }
    if bytes.len() > MAX_ACCOUNT_FILE {
        return Err(io::Error::other(format!(
            "{file} in the image is over {} MiB",
            MAX_ACCOUNT_FILE >> 20
        )));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A group's gid from `root`'s `/etc/group` (a number is itself); `None`
/// when no entry has that name or the image has no such file.
pub(crate) fn lookup_group(root: &Path, name: &str) -> io::Result<Option<u32>> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(Some(n));
    }
    let text = account_file(root, "/etc/group")?;
    Ok(text
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[0] == name)
        .and_then(|f| f[2].parse().ok()))
}

/// The extended attributes of `path` (a symlink's own), except those of
/// overlayfs (`trusted.overlay.*`, or `user.overlay.*` when rootless: they
/// describe the layer, not the file).
/// A filesystem without extended attributes has none.
pub(crate) fn xattrs(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let unsupported = |e: &rustix::io::Errno| *e == rustix::io::Errno::NOTSUP || *e == rustix::io::Errno::OPNOTSUPP;
    let size = match rustix::fs::llistxattr_query(path) {
        Ok(0) => return Ok(Vec::new()),
        Ok(n) => n,
        Err(e) if unsupported(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut names = vec![0u8; size];
    let n = rustix::fs::llistxattr(path, &mut names[..])?;
    names.truncate(n);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else { continue };
        if crate::snapshot::layer::OVERLAY_XATTR_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let len = match rustix::fs::lgetxattr_query(path, name) {
            Ok(n) => n,
            Err(rustix::io::Errno::NODATA) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut value = vec![0u8; len];
        let got = rustix::fs::lgetxattr(path, name, &mut value[..])?;
        value.truncate(got);
        out.push((name.to_string(), value));
    }
    Ok(out)
}

/// Gives `dst` the extended attributes of `src` (after its owner and mode
/// are set: a chown clears `security.capability`). Attributes the
/// destination cannot hold (a symlink's `user.*`) are skipped.
pub(crate) fn copy_xattrs(src: &Path, dst: &Path) -> io::Result<()> {
    for (name, value) in xattrs(src)? {
        match rustix::fs::lsetxattr(dst, name.as_str(), &value, rustix::fs::XattrFlags::empty()) {
            Ok(()) => {}
            Err(rustix::io::Errno::PERM | rustix::io::Errno::NOTSUP) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A user's uid and primary gid from `root`'s `/etc/passwd` (a number is
/// its own uid and gid); `None` when no entry has that name or the image
/// has no such file.
pub(crate) fn lookup_user(root: &Path, name: &str) -> io::Result<Option<(u32, u32)>> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(Some((n, n)));
    }
    let text = account_file(root, "/etc/passwd")?;
    Ok(text
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == name)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_files_that_cannot_be_read_safely_are_refused() {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path();
        fs::create_dir_all(r.join("etc")).expect("mkdir");
        // None yet: no entries, not an error.
        assert_eq!(lookup_user(r, "root").expect("no file"), None);
        assert_eq!(lookup_user(r, "0").expect("numeric"), Some((0, 0)));
        // Not UTF-8: the entries around the bad bytes still count.
        fs::write(r.join("etc/passwd"), b"app:x:1000:1001:\xff\xfe:/home/app:/bin/sh\n").expect("passwd");
        assert_eq!(lookup_user(r, "app").expect("app"), Some((1000, 1001)));
        assert_eq!(lookup_user(r, "nobody").expect("no entry"), None);
        // A FIFO would block a plain open forever.
        fs::remove_file(r.join("etc/passwd")).expect("rm");
        rustix::fs::mknodat(rustix::fs::CWD, r.join("etc/passwd"), rustix::fs::FileType::Fifo, 0o644.into(), 0).expect("mkfifo");
        let err = lookup_user(r, "app").expect_err("a FIFO is refused");
        assert!(err.to_string().contains("/etc/passwd in the image is not a regular file"), "{err}");
        // Over the limit (sparse: nothing is written).
        fs::remove_file(r.join("etc/passwd")).expect("rm");
        let f = fs::File::create(r.join("etc/group")).expect("group");
        f.set_len(MAX_ACCOUNT_FILE as u64 + 1).expect("grow");
        let err = lookup_group(r, "staff").expect_err("an oversized file is refused");
        assert!(err.to_string().contains("/etc/group in the image is over 64 MiB"), "{err}");
    }

    #[test]
    fn symlinks_stay_inside_the_root() {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path();
        fs::create_dir_all(r.join("a/b")).expect("mkdir");
        std::os::unix::fs::symlink("/a", r.join("abs")).expect("ln");
        std::os::unix::fs::symlink("../../../../etc", r.join("a/up")).expect("ln");
        assert_eq!(resolve_in_root(r, "/abs/b", true).expect("resolve"), r.join("a/b"));
        assert_eq!(resolve_in_root(r, "/a/up/passwd", true).expect("resolve"), r.join("etc/passwd"));
        assert_eq!(resolve_in_root(r, "/abs", false).expect("resolve"), r.join("abs"));
        assert_eq!(resolve_in_root(r, "/../../x", true).expect("resolve"), r.join("x"));
    }

    #[test]
    fn users_resolve_from_the_rootfs() {
        let t = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(t.path().join("etc")).expect("mkdir");
        fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .expect("w");
        fs::write(t.path().join("etc/group"), "root:x:0:\napp:x:1001:\nwheel:x:10:app\n").expect("w");
        let (o, extra) = resolve_user(t.path(), "app").expect("user");
        assert_eq!((o.uid, o.gid, extra), (1000, 1001, vec![10]));
        assert_eq!(resolve_user(t.path(), "app:wheel").expect("user").0.gid, 10);
        assert_eq!(resolve_user(t.path(), "5:6").expect("ids").0, Owner { uid: 5, gid: 6 });
        assert!(resolve_user(t.path(), "nobody").is_err());
    }
}
