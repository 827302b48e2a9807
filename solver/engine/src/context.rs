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

use crate::pattern::{clean_rel, glob_match, has_wildcards, Matcher};
use crate::root::{write_atomic, StateRoot};

/// A 32-byte content checksum.
pub type Sum = [u8; 32];

/// One local source of the request.
#[derive(Debug)]
pub struct LocalSource {
    /// Its name (`context`, or a named context).
    pub name: String,
    /// The directory.
    pub dir: PathBuf,
    include: Option<Matcher>,
    exclude: Option<Matcher>,
}

#[derive(Clone, Copy)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

/// Remembered file checksums of one directory, loaded from and saved to the state root.
pub struct ChecksumCache {
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
    pub fn load(root: &StateRoot, dir: &Path) -> ChecksumCache {
        let id = hex::encode(&Sha256::digest(dir.as_os_str().as_encoded_bytes())[..12]);
        let file = root.path().join("context").join(format!("{id}.sums"));
        let mut entries = HashMap::new();
        if let Ok(text) = fs::read_to_string(&file) {
            for line in text.lines() {
                let mut it = line.splitn(6, ' ');
                let (Some(ino), Some(size), Some(m), Some(c), Some(sum), Some(path)) =
                    (it.next(), it.next(), it.next(), it.next(), it.next(), it.next())
                else {
                    continue;
                };
                let (Ok(ino), Ok(size), Ok(mtime_ns), Ok(ctime_ns)) = (ino.parse(), size.parse(), m.parse(), c.parse()) else {
                    continue;
                };
                let mut s = [0u8; 32];
                if hex::decode_to_slice(sum, &mut s).is_err() {
                    continue;
                }
                entries.insert(
                    path.to_string(),
                    (
                        Stamp {
                            ino,
                            size,
                            mtime_ns,
                            ctime_ns,
                        },
                        s,
                    ),
                );
            }
        }
        ChecksumCache {
            file,
            entries: Mutex::new(entries),
            dirty: AtomicBool::new(false),
        }
    }

    /// Writes the cache back if anything changed.
    pub fn save(&self) -> io::Result<()> {
        if !self.dirty.load(Ordering::Relaxed) {
            return Ok(());
        }
        let entries = self.entries.lock().map_err(|_| io::Error::other("checksum cache poisoned"))?;
        let mut out = String::with_capacity(entries.len() * 120);
        for (path, (s, sum)) in entries.iter() {
            if path.contains('\n') {
                continue;
            }
            out.push_str(&format!("{} {} {} {} {} {}\n", s.ino, s.size, s.mtime_ns, s.ctime_ns, hex::encode(sum), path));
        }
        write_atomic(&self.file, out.as_bytes(), false)
    }

    fn file_sum(&self, abs: &Path, meta: &fs::Metadata) -> io::Result<Sum> {
        let key = abs.to_string_lossy().into_owned();
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

fn json_list(attrs: &std::collections::BTreeMap<String, String>, key: &str) -> Result<Vec<String>, String> {
    match attrs.get(key) {
        None => Ok(Vec::new()),
        Some(v) if v.is_empty() => Ok(Vec::new()),
        Some(v) => serde_json::from_str(v).map_err(|e| format!("{key}: not a JSON list of strings: {e}")),
    }
}

impl LocalSource {
    /// A local source from its op's attributes and the directory backing it.
    pub fn new(name: &str, dir: PathBuf, attrs: &std::collections::BTreeMap<String, String>) -> Result<LocalSource, String> {
        let include = json_list(attrs, "local.includepattern")?;
        let mut follow = json_list(attrs, "local.followpaths")?;
        let exclude = json_list(attrs, "local.excludepatterns")?;
        // Follow paths are needed as well as includes.
        let mut inc = include;
        if !inc.is_empty() {
            inc.append(&mut follow);
        }
        Ok(LocalSource {
            name: name.to_string(),
            dir,
            include: if inc.is_empty() { None } else { Some(Matcher::new(&inc)?) },
            exclude: if exclude.is_empty() { None } else { Some(Matcher::new(&exclude)?) },
        })
    }

    /// Whether the relative path is part of the source.
    pub fn includes(&self, rel: &str) -> bool {
        if rel.is_empty() {
            return true;
        }
        if let Some(inc) = &self.include {
            if !inc.matches(rel) {
                return false;
            }
        }
        !self.exclude.as_ref().is_some_and(|e| e.matches(rel))
    }

    /// Whether a walk must enter the directory `rel` (it or something inside may be included).
    pub fn may_enter(&self, rel: &str) -> bool {
        if rel.is_empty() {
            return true;
        }
        if let Some(inc) = &self.include {
            if !inc.matches(rel) && !inc.may_contain_match(rel) {
                return false;
            }
        }
        // An excluded directory may still hold `!exception` paths; enter it unless nothing could be re-included.
        match &self.exclude {
            Some(e) if e.matches(rel) => e.has_exceptions(),
            _ => true,
        }
    }

    /// Paths (relative, clean) that `src` selects: itself, or with
    /// `wildcards` every path matching it component by component.
    pub fn select(&self, src: &str, wildcards: bool) -> io::Result<Vec<String>> {
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
    pub fn checksum(&self, cache: &ChecksumCache, src: &str, wildcards: bool) -> io::Result<Sum> {
        let mut h = Sha256::new();
        for rel in self.select(src, wildcards)? {
            h.update(rel.as_bytes());
            h.update([0]);
            h.update(self.tree_sum(cache, &rel)?);
        }
        Ok(h.finalize().into())
    }

    fn tree_sum(&self, cache: &ChecksumCache, rel: &str) -> io::Result<Sum> {
        let abs = self.dir.join(rel);
        let meta = fs::symlink_metadata(&abs)?;
        let mut h = Sha256::new();
        let mode = meta.permissions().mode();
        let ft = meta.file_type();
        if ft.is_dir() {
            h.update(format!("d {mode:o}\0"));
            let mut names: Vec<String> = fs::read_dir(&abs)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            names.sort();
            for n in names {
                let child = join_rel(rel, &n);
                let child_meta = fs::symlink_metadata(self.dir.join(&child))?;
                let take = if child_meta.is_dir() {
                    self.may_enter(&child)
                } else {
                    self.includes(&child)
                };
                if !take {
                    continue;
                }
                h.update(n.as_bytes());
                h.update([0]);
                h.update(self.tree_sum(cache, &child)?);
            }
        } else if ft.is_symlink() {
            h.update(format!("l {}\0", fs::read_link(&abs)?.to_string_lossy()));
        } else if ft.is_file() {
            h.update(format!("f {mode:o}\0"));
            h.update(cache.file_sum(&abs, &meta)?);
        } else {
            h.update(format!("o {mode:o} {}\0", meta.rdev()));
        }
        Ok(h.finalize().into())
    }
}

/// `base/name`, or `name` when base is empty.
pub fn join_rel(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}/{name}")
    }
}

