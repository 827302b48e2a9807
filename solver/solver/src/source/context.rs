//! Local sources (`local://NAME`): a directory on this machine, seen through
//! the source's include and exclude patterns, and content checksums of its
//! paths, remembered by path, size, mtime, ctime and inode so an unchanged
//! context is stat'ed, not re-read.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

use crate::error::Failure;
use crate::root::{write_atomic, StateRoot};
use kiln_patterns::{clean_rel, glob_match, has_wildcards, Filter};

/// A 32-byte content checksum.
pub(crate) type Sum = [u8; 32];

/// One local source of the request.
#[derive(Debug)]
pub(crate) struct LocalSource {
    /// Its name (`context`, or a named context).
    pub name: String,
    /// The directory.
    pub dir: PathBuf,
    filter: Filter,
}

#[derive(Clone, Copy)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

/// Remembered file checksums of one directory, loaded from and saved to the state root.
pub(crate) struct ChecksumCache {
    file: PathBuf,
    entries: Mutex<HashMap<String, (Stamp, Sum)>>,
    dirty: AtomicBool,
}

fn stamp(m: &fs::Metadata) -> Stamp {
    Stamp {
        ino: m.ino(),
        size: m.size(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
    }
}

impl ChecksumCache {
    /// The cache for `dir`, read from `ROOT/context/`.
    pub(crate) fn load(root: &StateRoot, dir: &Path) -> ChecksumCache {
        let id = hex::encode(&Sha256::digest(dir.as_os_str().as_encoded_bytes())[..12]);
        let file = root.path().join("context").join(format!("{id}.sums"));
        let entries = fs::read(&file).map(|b| decode_sums(&b)).unwrap_or_default();
        ChecksumCache {
            file,
            entries: Mutex::new(entries),
            dirty: AtomicBool::new(false),
        }
    }

    /// Writes the cache back if anything changed.
    pub(crate) fn save(&self) -> io::Result<()> {
        if !self.dirty.load(Ordering::Relaxed) {
            return Ok(());
        }
        let entries = self.entries.lock().map_err(|_| io::Error::other("checksum cache poisoned"))?;
        write_atomic(&self.file, &encode_sums(&entries), false)
    }

    fn file_sum(&self, abs: &Path, rel: &str, meta: &fs::Metadata) -> io::Result<Sum> {
        let key = rel.to_string();
        let st = stamp(meta);
        if let Ok(map) = self.entries.lock() {
            if let Some((s, sum)) = map.get(&key) {
                if s.ino == st.ino && s.size == st.size && s.mtime_ns == st.mtime_ns && s.ctime_ns == st.ctime_ns {
                    return Ok(*sum);
                }
            }
        }
        let mut f = fs::File::open(abs)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let sum: Sum = h.finalize().into();
        if let Ok(mut map) = self.entries.lock() {
            map.insert(key, (st, sum));
            self.dirty.store(true, Ordering::Relaxed);
        }
        Ok(sum)
    }
}

/// File format of remembered checksums: a magic line, then per file
/// `ino size mtime_ns ctime_ns` (little-endian u64/i64), the 32-byte sum,
/// the path's length (u32) and the path.
const SUMS_MAGIC: &[u8] = b"kiln-sums-v1\n";

fn encode_sums(entries: &HashMap<String, (Stamp, Sum)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(SUMS_MAGIC.len() + entries.len() * 90);
    out.extend_from_slice(SUMS_MAGIC);
    for (path, (s, sum)) in entries {
        out.extend_from_slice(&s.ino.to_le_bytes());
        out.extend_from_slice(&s.size.to_le_bytes());
        out.extend_from_slice(&s.mtime_ns.to_le_bytes());
        out.extend_from_slice(&s.ctime_ns.to_le_bytes());
        out.extend_from_slice(sum);
        out.extend_from_slice(&(path.len() as u32).to_le_bytes());
        out.extend_from_slice(path.as_bytes());
    }
    out
}

/// Reads what [`encode_sums`] wrote; a damaged tail is dropped (files are re-read).
fn decode_sums(bytes: &[u8]) -> HashMap<String, (Stamp, Sum)> {
    let mut map = HashMap::new();
    let Some(mut rest) = bytes.strip_prefix(SUMS_MAGIC) else {
        return map;
    };
    let u64_at = |b: &[u8], i: usize| -> u64 { u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8])) };
    while rest.len() >= 68 {
        let stamp = Stamp {
            ino: u64_at(rest, 0),
            size: u64_at(rest, 8),
            mtime_ns: u64_at(rest, 16) as i64,
            ctime_ns: u64_at(rest, 24) as i64,
        };
        let mut sum = [0u8; 32];
        sum.copy_from_slice(&rest[32..64]);
        let len = u32::from_le_bytes(rest[64..68].try_into().unwrap_or([0; 4])) as usize;
        let Some(path) = rest.get(68..68 + len) else { break };
        let Ok(path) = std::str::from_utf8(path) else { break };
        map.insert(path.to_string(), (stamp, sum));
        rest = &rest[68 + len..];
    }
    map
}

fn json_list(attrs: &std::collections::BTreeMap<String, String>, key: &str) -> Result<Vec<String>, Failure> {
    match attrs.get(key) {
        None => Ok(Vec::new()),
        Some(v) if v.is_empty() => Ok(Vec::new()),
        Some(v) => serde_json::from_str(v).map_err(|e| Failure::invalid(format!("{key}: not a JSON list of strings: {e}"))),
    }
}

impl LocalSource {
    /// A local source from its op's attributes and the directory backing it.
    pub(crate) fn new(name: &str, dir: PathBuf, attrs: &std::collections::BTreeMap<String, String>) -> Result<LocalSource, Failure> {
        let include = json_list(attrs, "local.includepattern")?;
        let mut follow = json_list(attrs, "local.followpaths")?;
        let exclude = json_list(attrs, "local.excludepatterns")?;
        // Follow paths are needed as well as includes, and so is where their
        // symlinks lead (`COPY link-to-dir/file` reads the linked file).
        let mut inc = include;
        if !inc.is_empty() {
            let targets: Vec<String> = follow
                .iter()
                .filter(|p| !has_wildcards(p))
                .filter_map(|p| crate::fsutil::resolve_in_root(&dir, &format!("/{}", clean_rel(p)), true).ok())
                .filter_map(|t| t.strip_prefix(&dir).ok().map(|r| r.to_string_lossy().into_owned()))
                .filter(|r| !r.is_empty())
                .collect();
            inc.append(&mut follow);
            inc.extend(targets);
        }
        Ok(LocalSource {
            name: name.to_string(),
            dir,
            filter: Filter::new(&inc, &exclude).map_err(|e| Failure::invalid(e.to_string()))?,
        })
    }

    /// Whether the relative path is part of the source.
    pub(crate) fn includes(&self, rel: &str) -> bool {
        self.filter.includes(rel)
    }

    /// Whether a walk must enter the directory `rel` (it or something inside may be included).
    pub(crate) fn may_enter(&self, rel: &str) -> bool {
        self.filter.may_enter(rel)
    }

    /// Paths (relative, clean) that `src` selects: itself, or with
    /// `wildcards` every path matching it component by component.
    pub(crate) fn select(&self, src: &str, wildcards: bool) -> io::Result<Vec<String>> {
        let clean = clean_rel(src);
        if !wildcards || !has_wildcards(&clean) {
            return Ok(if self.exists(&clean) { vec![clean] } else { Vec::new() });
        }
        let mut found = vec![String::new()];
        for part in clean.split('/') {
            let mut next = Vec::new();
            for base in &found {
                if has_wildcards(part) {
                    let dir = self.dir.join(base);
                    let Ok(rd) = fs::read_dir(&dir) else { continue };
                    let mut names: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
                    names.sort();
                    for n in names {
                        if glob_match(part, &n) {
                            next.push(join_rel(base, &n));
                        }
                    }
                } else {
                    next.push(join_rel(base, part));
                }
            }
            found = next;
        }
        Ok(found.into_iter().filter(|p| self.exists(p)).collect())
    }

    fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.dir.join(rel)).is_ok() && (self.includes(rel) || self.has_included_below(rel))
    }

    fn has_included_below(&self, rel: &str) -> bool {
        self.may_enter(rel) && fs::metadata(self.dir.join(rel)).is_ok_and(|m| m.is_dir())
    }

    /// The content checksum of the paths `src` selects (names, types,
    /// modes, link targets and file contents; owners are always 0 here and
    /// times are not content).
    pub(crate) fn checksum(&self, cache: &ChecksumCache, src: &str, wildcards: bool) -> io::Result<Sum> {
        let mut h = Sha256::new();
        for rel in self.select(src, wildcards)? {
            h.update(rel.as_bytes());
            h.update([0]);
            h.update(self.tree_sum(cache, &rel)?);
        }
        Ok(h.finalize().into())
    }

    /// Every node `src` selects, with its checksum (directories by mode
    /// only): what an explanation compares to name the files that changed.
    pub(crate) fn manifest(&self, cache: &ChecksumCache, src: &str, wildcards: bool) -> io::Result<Vec<(String, Sum)>> {
        let mut out = Vec::new();
        let mut todo: Vec<(String, bool)> = Vec::new();
        for rel in self.select(src, wildcards)? {
            let whole = self.filter.takes_all_below(&rel);
            todo.push((rel, whole));
        }
        while let Some((rel, whole)) = todo.pop() {
            let abs = self.dir.join(&rel);
            let meta = fs::symlink_metadata(&abs)?;
            if !meta.is_dir() {
                out.push((rel.clone(), self.node_sum(cache, &abs, &rel, &meta, true, false)?));
                continue;
            }
            out.push((
                format!("{rel}/"),
                Sha256::digest(format!("d {:o}", meta.permissions().mode())).into(),
            ));
            for e in fs::read_dir(&abs)? {
                let e = e?;
                let child = join_rel(&rel, &e.file_name().to_string_lossy());
                let is_dir = e.file_type()?.is_dir();
                let take = whole || if is_dir { self.may_enter(&child) } else { self.includes(&child) };
                if take {
                    let child_whole = whole || self.filter.takes_all_below(&child);
                    todo.push((child, child_whole));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn tree_sum(&self, cache: &ChecksumCache, rel: &str) -> io::Result<Sum> {
        let abs = self.dir.join(rel);
        let meta = fs::symlink_metadata(&abs)?;
        // Below a directory that is included as a whole, no pattern needs checking.
        let whole = self.filter.takes_all_below(rel);
        self.node_sum(cache, &abs, rel, &meta, whole, true)
    }

    /// Checksum of one node; `whole` = everything below is included;
    /// `top` = split the first level of a big directory across threads.
    fn node_sum(&self, cache: &ChecksumCache, abs: &Path, rel: &str, meta: &fs::Metadata, whole: bool, top: bool) -> io::Result<Sum> {
        let mut h = Sha256::new();
        let mode = meta.permissions().mode();
        let ft = meta.file_type();
        if ft.is_dir() {
            h.update(format!("d {mode:o}\0"));
            let mut children: Vec<(String, fs::Metadata)> = Vec::new();
            for e in fs::read_dir(abs)? {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                // fstatat on the open directory: no path walk per file.
                let child_meta = e.metadata()?;
                if !whole {
                    let child = join_rel(rel, &name);
                    let take = if child_meta.is_dir() {
                        self.may_enter(&child)
                    } else {
                        self.includes(&child)
                    };
                    if !take {
                        continue;
                    }
                }
                children.push((name, child_meta));
            }
            children.sort_by(|a, b| a.0.cmp(&b.0));
            let child_whole = |name: &str| -> bool { whole || self.filter.takes_all_below(&join_rel(rel, name)) };
            let sums: Vec<io::Result<Sum>> = if top && children.len() > 8 {
                // Big trees: hash the children on all cores.
                let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 8);
                let next = std::sync::atomic::AtomicUsize::new(0);
                let slots: Vec<Mutex<Option<io::Result<Sum>>>> = children.iter().map(|_| Mutex::new(None)).collect();
                std::thread::scope(|sc| {
                    for _ in 0..workers {
                        sc.spawn(|| loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some((name, m)) = children.get(i) else { break };
                            let r = self.node_sum(cache, &abs.join(name), &join_rel(rel, name), m, child_whole(name), false);
                            if let Ok(mut slot) = slots[i].lock() {
                                *slot = Some(r);
                            }
                        });
                    }
                });
                slots
                    .into_iter()
                    .map(|m| {
                        m.into_inner()
                            .ok()
                            .flatten()
                            .unwrap_or_else(|| Err(io::Error::other("checksum worker failed")))
                    })
                    .collect()
            } else {
                children
                    .iter()
                    .map(|(name, m)| {
                        self.node_sum(
                            cache,
                            &abs.join(name),
                            &join_rel(rel, name),
                            m,
                            child_whole(name),
                            top && m.is_dir(),
                        )
                    })
                    .collect()
            };
            for ((name, _), sum) in children.iter().zip(sums) {
                h.update(name.as_bytes());
                h.update([0]);
                h.update(sum?);
            }
        } else if ft.is_symlink() {
            h.update(format!("l {}\0", fs::read_link(abs)?.to_string_lossy()));
        } else if ft.is_file() {
            h.update(format!("f {mode:o}\0"));
            h.update(cache.file_sum(abs, rel, meta)?);
        } else {
            h.update(format!("o {mode:o} {}\0", meta.rdev()));
        }
        Ok(h.finalize().into())
    }
}

/// `base/name`, or `name` when base is empty.
pub(crate) fn join_rel(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}/{name}")
    }
}
