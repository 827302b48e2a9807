//! The state root: where the cache, snapshots and image store live, and how
//! it stays consistent when builds share it or are killed mid-way.
//!
//! ```text
//! ROOT/lock                  shared flock held by every solve (GC takes it exclusively)
//! ROOT/store/                OCI image layout: every blob, and the image store's index.json
//! ROOT/store.lock            exclusive flock around index.json updates
//! ROOT/snapshots/ID/fs       one layer's files, overlayfs-style (whiteouts are 0:0 char devices);
//!                            absent for a layer adopted from a cache until something mounts it
//! ROOT/snapshots/ID/layer.json   its compressed blob's digest and diff id, once exported
//! ROOT/cache/KEY.json        cache record: a vertex result's layers
//! ROOT/context/NAME.sums     remembered checksums of build-context files
//! ROOT/diffids/HEX.json      the compressed blob made for a layer tar of that digest
//! ROOT/tmp/PID-…             work in progress of solver PID (removed when PID is gone)
//! ROOT/mnt/PID-…             mountpoints of solver PID (unmounted when PID is gone)
//! ROOT/runc/                 the OCI runtime's state (containers named kiln-PID-N)
//! ```
//!
//! Every file is written to a temporary name and renamed into place, so a
//! reader sees the old or the new content, never half; a record is written
//! only after what it points at is complete. A killed solver leaves only
//! `tmp/`, `mnt/` and runtime entries tagged with its pid, which the next
//! solver removes.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::FlockOperation;

/// Fetches one blob into the store (checked against its digest), for a
/// blob this solve may use but has not downloaded ([`StateRoot::offer_blob`]).
pub(crate) type FetchBlob = dyn Fn(&StateRoot) -> Result<(), String> + Send + Sync;

/// A blob offered by a cache: how to fetch it, and a lock so one fetch runs.
struct Offered {
    fetch: Arc<FetchBlob>,
    once: Mutex<()>,
}

/// The opened state root, holding the shared build lock.
pub struct StateRoot {
    path: PathBuf,
    _lock: fs::File,
    counter: AtomicU64,
    /// Blobs this process may fetch when something reads them (a
    /// `--cache-from` hit's layers); known to this process only, so a
    /// later solve never relies on a cache it was not given.
    offered: Mutex<HashMap<String, Arc<Offered>>>,
    /// Offered blobs whose fetch failed (damaged, truncated, unreachable):
    /// no longer offered, and a miss for any cache that lists them.
    damaged: Mutex<HashSet<String>>,
    /// Offered blobs fetched so far: how many, how many bytes.
    fetched: (AtomicU64, AtomicU64),
}

impl StateRoot {
    /// Opens (creating if needed) the root, takes the shared lock and cleans
    /// up after solvers that died.
    pub fn open(path: &Path, runtime: &str) -> std::io::Result<StateRoot> {
        for dir in ["store/blobs/sha256", "snapshots", "cache", "context", "tmp", "mnt", "runc"] {
            fs::create_dir_all(path.join(dir))?;
        }
        let layout = path.join("store/oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#, false)?;
        }
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join("lock"))?;
        rustix::fs::flock(&lock, FlockOperation::LockShared)?;
        let root = StateRoot {
            path: path.to_path_buf(),
            _lock: lock,
            counter: AtomicU64::new(0),
            offered: Mutex::new(HashMap::new()),
            damaged: Mutex::new(HashSet::new()),
            fetched: (AtomicU64::new(0), AtomicU64::new(0)),
        };
        root.recover(runtime);
        Ok(root)
    }

    /// The root directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `ROOT/store`, the OCI layout holding every blob.
    pub fn store(&self) -> PathBuf {
        self.path.join("store")
    }

    /// The path of a blob by `sha256:` digest.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.path.join("store/blobs/sha256").join(hex)
    }

    /// Offers a blob this process can fetch when it is read ([`Self::fetch_blob`]).
    pub(crate) fn offer_blob(&self, digest: &str, fetch: Arc<FetchBlob>) {
        if let Ok(mut offered) = self.offered.lock() {
            offered.entry(digest.to_string()).or_insert_with(|| {
                Arc::new(Offered {
                    fetch,
                    once: Mutex::new(()),
                })
            });
        }
    }

    /// Whether the blob is in the store or can be fetched into it.
    pub(crate) fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_file() || self.offered.lock().is_ok_and(|o| o.contains_key(digest))
    }

    /// Whether the blob is in the store now (not only offered).
    pub(crate) fn blob_is_local(&self, digest: &str) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Makes sure a blob is in the store, fetching an offered one now (one
    /// fetch per blob, however many ask at once).
    pub(crate) fn fetch_blob(&self, digest: &str) -> std::io::Result<()> {
        if self.blob_path(digest).is_file() {
            return Ok(());
        }
        let offered = self.offered.lock().ok().and_then(|o| o.get(digest).cloned());
        let Some(offered) = offered else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("blob {digest} is not in the state root"),
            ));
        };
        let _one = offered.once.lock().map_err(|_| std::io::Error::other("a blob fetch panicked"))?;
        if self.blob_path(digest).is_file() {
            return Ok(());
        }
        (offered.fetch)(self)
            .map(|()| {
                let size = fs::metadata(self.blob_path(digest)).map_or(0, |m| m.len());
                self.fetched.0.fetch_add(1, Ordering::Relaxed);
                self.fetched.1.fetch_add(size, Ordering::Relaxed);
            })
            .map_err(|why| {
                if let (Ok(mut offered), Ok(mut damaged)) = (self.offered.lock(), self.damaged.lock()) {
                    offered.remove(digest);
                    damaged.insert(digest.to_string());
                }
                std::io::Error::other(why)
            })
    }

    /// Offered blobs fetched so far: how many, and their bytes.
    pub(crate) fn fetched(&self) -> (u64, u64) {
        (self.fetched.0.load(Ordering::Relaxed), self.fetched.1.load(Ordering::Relaxed))
    }

    /// Whether fetching this offered blob failed in this process.
    pub(crate) fn is_damaged(&self, digest: &str) -> bool {
        self.damaged.lock().is_ok_and(|d| d.contains(digest))
    }

    /// How many offered blobs failed to fetch in this process.
    pub(crate) fn damaged_count(&self) -> usize {
        self.damaged.lock().map_or(0, |d| d.len())
    }

    /// `ROOT/snapshots/ID`.
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.path.join("snapshots").join(id)
    }

    /// `ROOT/cache/KEY.json`.
    pub fn record_path(&self, key: &str) -> PathBuf {
        self.path
            .join("cache")
            .join(format!("{}.json", key.strip_prefix("sha256:").unwrap_or(key)))
    }

    /// `ROOT/runc`, the runtime's `--root`.
    pub fn runtime_state(&self) -> PathBuf {
        self.path.join("runc")
    }

    /// A fresh name unique to this process: `PID-N`.
    pub fn unique(&self) -> String {
        format!("{}-{}", std::process::id(), self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// A new empty directory under `tmp/`, owned by this process.
    pub fn temp_dir(&self) -> std::io::Result<PathBuf> {
        let dir = self.path.join("tmp").join(self.unique());
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// A new empty mountpoint under `mnt/`.
    pub fn mountpoint(&self) -> std::io::Result<PathBuf> {
        let dir = self.path.join("mnt").join(self.unique());
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Takes the root's exclusive lock (no build runs while it is held),
    /// waiting for running builds. Returns the lock's file.
    pub fn lock_exclusive(path: &Path, wait: bool) -> std::io::Result<Option<fs::File>> {
        fs::create_dir_all(path)?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join("lock"))?;
        let op = if wait {
            FlockOperation::LockExclusive
        } else {
            FlockOperation::NonBlockingLockExclusive
        };
        match rustix::fs::flock(&lock, op) {
            Ok(()) => Ok(Some(lock)),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes the store's exclusive lock (held while the returned file lives).
    pub fn lock_store(&self) -> std::io::Result<fs::File> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path.join("store.lock"))?;
        rustix::fs::flock(&f, FlockOperation::LockExclusive)?;
        Ok(f)
    }

    /// Removes what dead solvers left: mounts, runtime containers, temp dirs.
    fn recover(&self, runtime: &str) {
        let dead = |name: &str| -> bool {
            let pid = name.split('-').next().and_then(|p| p.parse::<i32>().ok());
            match pid {
                Some(pid) if pid as u32 == std::process::id() => false,
                Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
                None => true,
            }
        };
        self.sweep(Some(runtime), dead);
    }

    /// Removes the runtime containers (when `runtime` is given), mounts and
    /// temp dirs whose `PID-N` name `dead` picks.
    fn sweep(&self, runtime: Option<&str>, dead: impl Fn(&str) -> bool) {
        // Containers first: they hold the mounts busy.
        if let Some(runtime) = runtime {
            if let Ok(entries) = fs::read_dir(self.runtime_state()) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.strip_prefix("kiln-").is_some_and(&dead) {
                        let _ = std::process::Command::new(runtime)
                            .arg("--root")
                            .arg(self.runtime_state())
                            .args(["delete", "--force", &name])
                            .stdout(std::process::Stdio::null())
                            .stderr(std::process::Stdio::null())
                            .status();
                        let _ = fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let mut stale_mounts: Vec<PathBuf> = Vec::new();
        if let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") {
            let mnt = self.path.join("mnt");
            for line in mounts.lines() {
                if let Some(point) = line.split(' ').nth(4) {
                    let point = PathBuf::from(unescape_mountinfo(point));
                    if let Ok(rest) = point.strip_prefix(&mnt) {
                        let first = rest.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned());
                        if first.is_some_and(|f| dead(&f)) {
                            stale_mounts.push(point);
                        }
                    }
                }
            }
        }
        // Deepest first.
        stale_mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in stale_mounts {
            let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
        }
        for dir in ["mnt", "tmp"] {
            if let Ok(entries) = fs::read_dir(self.path.join(dir)) {
                for e in entries.flatten() {
                    if dead(&e.file_name().to_string_lossy()) {
                        let _ = remove_all(&e.path());
                    }
                }
            }
        }
    }
}

impl Drop for StateRoot {
    /// The last holder is gone (a finished or cancelled solve): whatever of
    /// this process is still under `tmp/` and `mnt/` is leftover work.
    fn drop(&mut self) {
        if self.counter.load(Ordering::Relaxed) == 0 {
            return; // this process made nothing under tmp/ or mnt/
        }
        let me = std::process::id().to_string();
        self.sweep(None, |name| name.split('-').next() == Some(me.as_str()));
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes a file or tree; missing is fine. Makes read-only dirs writable first.
pub(crate) fn remove_all(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => match fs::remove_dir_all(path) {
            Ok(()) => Ok(()),
            Err(_) => {
                // A mount may still sit inside (a killed solver's): detach and retry.
                let _ = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH);
                fs::remove_dir_all(path)
            }
        },
        Ok(_) => fs::remove_file(path),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, path)
}
