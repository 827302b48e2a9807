//! Cache mounts (`RUN --mount=type=cache`): persistent directories under
//! `ROOT/cache-mounts/`, one per cache id, kept across builds and never part
//! of a layer or a cache key.
//!
//! Sharing, as BuildKit: `shared` — concurrent steps use one directory;
//! `locked` — a second step waits for the first; `private` — a step that
//! finds the directory in use gets another one (`ID-1`, `ID-2`, … also kept).
//! A new directory is seeded from the mount's source (`from=`/`source=`, or
//! the owner and mode asked for), built aside and renamed into place.

use std::fs;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use sha2::{Digest as _, Sha256};

use crate::root::{remove_all, StateRoot};
use crate::snapshot::layer::set_mtime_nofollow;
use crate::snapshot::mount_stack;

/// A cache directory in use; its lock is released when dropped.
pub(crate) struct Acquired {
    /// The directory to mount.
    pub dir: PathBuf,
    _lock: fs::File,
}

/// `pb::CacheSharingOpt` values.
const SHARED: i32 = 0;
const PRIVATE: i32 = 1;
const LOCKED: i32 = 2;

/// Takes the cache directory for `id` with the given sharing, creating and
/// seeding it (from `seed` = input layers and a path in them) if new.
pub(crate) fn acquire(
    root: &StateRoot,
    id: &str,
    sharing: i32,
    seed: Option<&(crate::snapshot::Layers, String)>,
    restore: &dyn Fn(&Path) -> bool,
) -> std::io::Result<Acquired> {
    let base = root.path().join("cache-mounts");
    fs::create_dir_all(&base)?;
    let name = entry_name(id);
    for n in 0.. {
        let entry = if n == 0 {
            base.join(&name)
        } else {
            base.join(format!("{name}-{n}"))
        };
        ensure(root, &entry, seed, if n == 0 { restore } else { &|_| false })?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(entry.join("lock"))?;
        let op = match sharing {
            SHARED => FlockOperation::LockShared,
            LOCKED => FlockOperation::LockExclusive,
            PRIVATE => FlockOperation::NonBlockingLockExclusive,
            _ => FlockOperation::LockShared,
        };
        match rustix::fs::flock(&lock, op) {
            Ok(()) => {
                return Ok(Acquired {
                    dir: entry.join("data"),
                    _lock: lock,
                })
            }
            Err(rustix::io::Errno::WOULDBLOCK) if sharing == PRIVATE => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(std::io::Error::other("no cache directory available"))
}

/// The name of cache mount `id`'s first directory under `ROOT/cache-mounts/`.
fn entry_name(id: &str) -> String {
    hex::encode(&Sha256::digest(id.as_bytes())[..16])
}

/// The directory of cache mount `id` if it exists, held with a shared lock
/// (for an export of its contents; a `locked` step holding it is waited for).
pub(crate) fn existing(root: &StateRoot, id: &str) -> std::io::Result<Option<Acquired>> {
    let entry = root.path().join("cache-mounts").join(entry_name(id));
    if !entry.join("data").is_dir() {
        return Ok(None);
    }
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(entry.join("lock"))?;
    rustix::fs::flock(&lock, FlockOperation::LockShared)?;
    Ok(Some(Acquired {
        dir: entry.join("data"),
        _lock: lock,
    }))
}

/// Creates `entry/data` unless it exists: filled by `restore` (contents
/// from an imported cache) when it can, else seeded.
fn ensure(
    root: &StateRoot,
    entry: &Path,
    seed: Option<&(crate::snapshot::Layers, String)>,
    restore: &dyn Fn(&Path) -> bool,
) -> std::io::Result<()> {
    if entry.join("data").is_dir() {
        return Ok(());
    }
    let tmp = root.temp_dir()?;
    let data = tmp.join("data");
    fs::create_dir(&data)?;
    let restored = restore(&data) || {
        // A failed restore may have left part of a tree.
        remove_all(&data)?;
        fs::create_dir(&data)?;
        false
    };
    if let (false, Some((layers, selector))) = (restored, seed) {
        let view = mount_stack(root, layers, None)?;
        let src = crate::fsutil::resolve_in_root(view.path(), if selector.is_empty() { "/" } else { selector }, true)?;
        if src.is_dir() {
            crate::execute::fileop::copy_tree(&data, &crate::execute::fileop::SourceView::Dir(&src)).map_err(std::io::Error::other)?;
            // The directory itself takes the source's owner and mode.
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let meta = fs::metadata(&src)?;
            crate::fsutil::lchown(
                &data,
                crate::fsutil::Owner {
                    uid: meta.uid(),
                    gid: meta.gid(),
                },
            )?;
            fs::set_permissions(&data, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            set_mtime_nofollow(&data, meta.mtime(), meta.mtime_nsec())?;
        }
        view.unmount()?;
    }
    match fs::rename(&tmp, entry) {
        Ok(()) => Ok(()),
        // Another step created it meanwhile: use theirs.
        Err(_) if entry.join("data").is_dir() => {
            let _ = remove_all(&tmp);
            Ok(())
        }
        Err(e) => {
            let _ = remove_all(&tmp);
            Err(e)
        }
    }
}
