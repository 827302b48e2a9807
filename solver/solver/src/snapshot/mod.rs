//! Snapshots: immutable layer directories and overlayfs views over stacks
//! of them (the records naming which stack a vertex produced are in
//! [`crate::cache`]).
//!
//! A vertex result is a stack of layers (bottom first). A layer directory
//! holds one layer's changes in overlayfs form (a deleted path is a 0:0
//! character device, a replaced directory carries `trusted.overlay.opaque`,
//! `user.overlay.opaque` when rootless),
//! so a stack is mounted with overlayfs as it is, a new step's writes land in
//! a fresh upper directory, and that upper directory is the step's layer.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags};
use serde::{Deserialize, Serialize};

pub(crate) mod contentsum;
pub(crate) mod layer;
pub(crate) mod treediff;

use crate::root::{remove_all, write_atomic, StateRoot};

/// A stack of layer ids, bottom first. Empty is scratch.
pub(crate) type Layers = Arc<Vec<String>>;

/// The compressed blob of a layer, once made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct LayerBlob {
    /// `sha256:` of the compressed tar.
    pub digest: String,
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
    /// Size of the compressed tar.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
}

/// Fresh random layer id.
pub(crate) fn new_layer_id() -> String {
    let bytes: [u8; 10] = rand::random();
    hex::encode(bytes)
}

/// The directory of a layer's files.
pub(crate) fn layer_fs(root: &StateRoot, id: &str) -> PathBuf {
    root.snapshot_dir(id).join("fs")
}

/// Whether a layer is there: its files, or (adopted lazily from a cache)
/// its blob, to be unpacked when something mounts it.
pub(crate) fn layer_present(root: &StateRoot, id: &str) -> bool {
    layer_fs(root, id).is_dir() || (id.starts_with("blob-") && read_layer_blob(root, id, None).is_some())
}

/// Makes sure a layer's files are on disk: a layer adopted lazily
/// ([`crate::source::pull::adopt_blob`]) is unpacked now, its diff id checked.
pub(crate) fn ensure_files(root: &StateRoot, id: &str) -> std::io::Result<()> {
    if layer_fs(root, id).is_dir() {
        return Ok(());
    }
    let blob = read_layer_blob(root, id, None)
        .filter(|_| id.starts_with("blob-"))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("layer {id} is gone from the state root")))?;
    crate::source::pull::unpack_blob(root, &blob).map_err(|e| match e {
        crate::source::pull::Unpack::Refused(why) => std::io::Error::new(std::io::ErrorKind::InvalidData, why),
        crate::source::pull::Unpack::Failed(f) => std::io::Error::other(f.to_string()),
    })
}

/// When a layer was made (seconds since the epoch), 0 if unknown.
pub(crate) fn layer_created(root: &StateRoot, id: &str) -> i64 {
    fs::read_to_string(root.snapshot_dir(id).join("created"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The file remembering a layer's blob: one per SOURCE_DATE_EPOCH, since
/// clamped times make another blob. Pulled layers keep their own blob.
fn blob_file(root: &StateRoot, id: &str, epoch: Option<i64>) -> PathBuf {
    match epoch {
        Some(e) if !id.starts_with("blob-") => root.snapshot_dir(id).join(format!("layer-{e}.json")),
        _ => root.snapshot_dir(id).join("layer.json"),
    }
}

/// The layer's blob, if exported before (for this SOURCE_DATE_EPOCH): in
/// the store, or offered by a cache this solve may fetch it from (whoever
/// reads its bytes calls [`StateRoot::fetch_blob`] first).
pub(crate) fn read_layer_blob(root: &StateRoot, id: &str, epoch: Option<i64>) -> Option<LayerBlob> {
    let bytes = fs::read(blob_file(root, id, epoch)).ok()?;
    let blob: LayerBlob = serde_json::from_slice(&bytes).ok()?;
    root.has_blob(&blob.digest).then_some(blob)
}

/// Remembers a layer's blob.
pub(crate) fn write_layer_blob(root: &StateRoot, id: &str, epoch: Option<i64>, blob: &LayerBlob) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(blob).map_err(std::io::Error::other)?;
    write_atomic(&blob_file(root, id, epoch), &bytes, false)
}

/// A layer being written: `tmp/…/fs` (and `work` for overlayfs), moved to
/// `snapshots/ID` by [`NewLayer::commit`].
pub(crate) struct NewLayer {
    dir: PathBuf,
    id: String,
}

impl NewLayer {
    /// An empty new layer.
    pub(crate) fn create(root: &StateRoot) -> std::io::Result<NewLayer> {
        let dir = root.temp_dir()?;
        fs::create_dir(dir.join("fs"))?;
        fs::create_dir(dir.join("work"))?;
        Ok(NewLayer { dir, id: new_layer_id() })
    }

    /// Where its files go.
    pub(crate) fn fs(&self) -> PathBuf {
        self.dir.join("fs")
    }

    /// overlayfs's work directory for it.
    pub(crate) fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    /// Moves it into `snapshots/` and returns its id.
    pub(crate) fn commit(self, root: &StateRoot) -> std::io::Result<String> {
        let _ = remove_all(&self.work());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        fs::write(self.dir.join("created"), now.to_string())?;
        let dest = root.snapshot_dir(&self.id);
        fs::rename(&self.dir, &dest)?;
        Ok(self.id.clone())
    }

    /// Moves it into `snapshots/ID` under a chosen id (fails if that exists).
    pub(crate) fn commit_as(mut self, root: &StateRoot, id: &str) -> std::io::Result<()> {
        self.id = id.to_string();
        self.commit(root).map(|_| ())
    }
}

impl Drop for NewLayer {
    fn drop(&mut self) {
        // After commit the directory is gone and this is a no-op.
        let _ = remove_all(&self.dir);
    }
}

/// A mounted filesystem, unmounted when dropped. With the copying
/// snapshotter it is a private directory holding a copy of the stack.
pub(crate) struct Mounted {
    target: PathBuf,
    owned_dir: bool,
    copy: Option<CopyView>,
}

/// What a copied view needs to turn its changes into a layer.
struct CopyView {
    root: PathBuf,
    base: Vec<PathBuf>,
    upper: Option<PathBuf>,
}

impl Mounted {
    /// The mounted tree.
    pub(crate) fn path(&self) -> &Path {
        &self.target
    }

    /// Unmounts now, reporting failure. A writable copied view writes its
    /// changes into its layer here.
    pub(crate) fn unmount(mut self) -> std::io::Result<()> {
        if let Some(copy) = self.copy.take() {
            let result = match &copy.upper {
                // Rebuild the base and compare: what differs is the layer.
                Some(upper) => materialize(&copy.base, &copy.root)
                    .and_then(|()| crate::snapshot::treediff::diff_trees(&copy.root, &self.target, upper)),
                None => Ok(()),
            };
            let _ = remove_all(&copy.root);
            let _ = remove_all(&self.target);
            self.target = PathBuf::new();
            return result;
        }
        let r = unmount_path(&self.target);
        if r.is_ok() && self.owned_dir {
            let _ = fs::remove_dir(&self.target);
        }
        self.owned_dir = false;
        self.target = PathBuf::new();
        r
    }
}

fn unmount_path(target: &Path) -> std::io::Result<()> {
    match rustix::mount::unmount(target, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) => rustix::mount::unmount(target, UnmountFlags::DETACH).map_err(Into::into),
        Err(e) => Err(e.into()),
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.target.as_os_str().is_empty() {
            return;
        }
        if let Some(copy) = &self.copy {
            let _ = remove_all(&copy.root);
            let _ = remove_all(&self.target);
            return;
        }
        let _ = unmount_path(&self.target);
        if self.owned_dir {
            let _ = fs::remove_dir(&self.target);
        }
    }
}

/// An empty directory to stand in for a missing lower layer.
fn empty_dir(root: &StateRoot) -> std::io::Result<PathBuf> {
    let p = root.path().join("snapshots/.empty");
    if !p.is_dir() {
        fs::create_dir_all(&p)?;
    }
    Ok(p)
}

/// Which snapshotter to use: `KILN_SNAPSHOTTER=overlayfs|copy`, else
/// overlayfs until a mount fails, then copies from there on.
fn use_copies() -> bool {
    match std::env::var("KILN_SNAPSHOTTER").as_deref() {
        Ok("copy") => true,
        Ok("overlayfs") => false,
        _ => OVERLAY_FAILED.load(std::sync::atomic::Ordering::Relaxed),
    }
}

static OVERLAY_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Copies a stack of layer directories (bottom first) into `dest`.
fn materialize(layers: &[PathBuf], dest: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dest)?;
    for l in layers {
        crate::snapshot::treediff::apply_layer(l, dest)?;
    }
    Ok(())
}

/// The copying snapshotter: the stack copied into a private directory.
fn copy_stack(root: &StateRoot, layers: &[String], upper: Option<&NewLayer>) -> std::io::Result<Mounted> {
    let target = root.mountpoint()?;
    let base: Vec<PathBuf> = layers.iter().map(|id| layer_fs(root, id)).collect();
    let view = Mounted {
        target: target.clone(),
        owned_dir: true,
        copy: Some(CopyView {
            root: root.temp_dir()?,
            base: base.clone(),
            upper: upper.map(|u| u.fs()),
        }),
    };
    materialize(&base, &target)?;
    Ok(view)
}

/// Mounts `layers` (bottom first) with overlayfs, read-only, or writable
/// into `upper` when given; where overlayfs cannot be mounted, a copy.
pub(crate) fn mount_stack(root: &StateRoot, layers: &[String], upper: Option<&NewLayer>) -> std::io::Result<Mounted> {
    for id in layers {
        ensure_files(root, id)?;
    }
    if use_copies() {
        return copy_stack(root, layers, upper);
    }
    match mount_overlay_stack(root, layers, upper) {
        Ok(m) => Ok(m),
        Err(e) if std::env::var("KILN_SNAPSHOTTER").as_deref() == Ok("overlayfs") => Err(e),
        Err(_) => {
            OVERLAY_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
            copy_stack(root, layers, upper)
        }
    }
}

fn mount_overlay_stack(root: &StateRoot, layers: &[String], upper: Option<&NewLayer>) -> std::io::Result<Mounted> {
    let mut lowers: Vec<PathBuf> = layers.iter().rev().map(|id| layer_fs(root, id)).collect();
    // overlayfs needs one lower layer with an upper, two without.
    let need = if upper.is_some() { 1 } else { 2 };
    while lowers.len() < need {
        lowers.push(empty_dir(root)?);
    }
    let target = root.mountpoint()?;
    let upper_dirs = upper.map(|u| (u.fs(), u.work()));
    match mount_overlay_fsconfig(&lowers, upper_dirs.as_ref(), &target) {
        Ok(()) => {}
        Err(first) => {
            // Kernels before 6.8 lack `lowerdir+`: the classic string form.
            let mut opts = format!(
                "lowerdir={}",
                lowers
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(":")
            );
            if let Some((u, w)) = &upper_dirs {
                opts.push_str(&format!(",upperdir={},workdir={}", u.display(), w.display()));
            }
            if crate::rootless::in_user_namespace() {
                opts.push_str(",userxattr");
            }
            let data = std::ffi::CString::new(opts).map_err(std::io::Error::other)?;
            if let Err(second) = rustix::mount::mount(
                "overlay",
                &target,
                "overlay",
                rustix::mount::MountFlags::empty(),
                Some(data.as_c_str()),
            ) {
                let _ = fs::remove_dir(&target);
                return Err(std::io::Error::other(format!(
                    "cannot mount overlayfs ({} layers) at {}: {first}; {second}",
                    layers.len(),
                    target.display()
                )));
            }
        }
    }
    Ok(Mounted {
        target,
        owned_dir: true,
        copy: None,
    })
}

fn mount_overlay_fsconfig(lowers: &[PathBuf], upper: Option<&(PathBuf, PathBuf)>, target: &Path) -> std::io::Result<()> {
    let fs_fd = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    if crate::rootless::in_user_namespace() {
        // trusted.* xattrs are root's of the host alone.
        rustix::mount::fsconfig_set_flag(&fs_fd, "userxattr")?;
    }
    for l in lowers {
        rustix::mount::fsconfig_set_string(&fs_fd, "lowerdir+", l.as_path())?;
    }
    if let Some((u, w)) = upper {
        rustix::mount::fsconfig_set_string(&fs_fd, "upperdir", u.as_path())?;
        rustix::mount::fsconfig_set_string(&fs_fd, "workdir", w.as_path())?;
        // Layers are made durable by the record protocol, not per write.
        let _ = rustix::mount::fsconfig_set_flag(&fs_fd, "volatile");
    }
    rustix::mount::fsconfig_create(&fs_fd)?;
    let mnt = rustix::mount::fsmount(&fs_fd, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())?;
    rustix::mount::move_mount(&mnt, "", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)?;
    Ok(())
}

/// A private tmpfs (for secrets: their values never touch a disk).
pub(crate) fn mount_tmpfs(root: &StateRoot) -> std::io::Result<Mounted> {
    let target = root.mountpoint()?;
    rustix::mount::mount(
        "tmpfs",
        &target,
        "tmpfs",
        rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV | rustix::mount::MountFlags::NOEXEC,
        Some(c"size=16m,mode=0700"),
    )?;
    Ok(Mounted {
        target,
        owned_dir: true,
        copy: None,
    })
}
