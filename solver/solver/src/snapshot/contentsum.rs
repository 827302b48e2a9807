//! Content checksums of paths in a layer stack: what a copy or a read-only
//! mount reads of another vertex's output, so the consumer's cache key
//! covers that content instead of how it was made (cache.rs, rule 3). A
//! stage that re-runs and makes the same files leaves its consumers cached.
//!
//! A sum covers, for every node below the selected paths, its name, type,
//! mode (with setuid/setgid/sticky), owner, extended attributes, hard-link
//! group, link target, device number and file content; not its times (as
//! BuildKit's content hash). Sums are remembered per stack and selector in
//! the top layer's directory (`snapshots/TOP/sums/`): layers never change.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::fsutil::{matches_in_dir, resolve_in_root, xattrs};
use crate::root::{write_atomic, StateRoot};
use crate::snapshot::{empty_dir, mount_stack};
use crate::source::context::{join_rel, Sum};
use kiln_patterns::{clean_rel, has_wildcards};

/// Version of the sum's format; part of every remembered sum's name.
const SUM_SCHEME: &[u8] = b"kiln-stack-sum-v1";

/// One path a consumer reads: the path, whether it is a pattern, whether
/// its last component's symlink is followed (as the copy or mount does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selector {
    /// Path in the stack's root.
    pub(crate) path: String,
    /// The path is a pattern.
    pub(crate) wildcard: bool,
    /// A symlink at the path is followed.
    pub(crate) follow: bool,
}

/// The sum of each selector over `layers` (bottom first), from memory where
/// the stack was summed before, else from a read-only mount of it.
pub(crate) fn stack_sums(root: &StateRoot, layers: &[String], selectors: &[Selector]) -> io::Result<Vec<Sum>> {
    let memo = |s: &Selector| -> Option<std::path::PathBuf> {
        let top = layers.last()?;
        let mut h = Sha256::new();
        for part in [
            SUM_SCHEME,
            layers.join("\n").as_bytes(),
            s.path.as_bytes(),
            &[s.wildcard as u8, s.follow as u8],
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        Some(root.snapshot_dir(top).join("sums").join(hex::encode(h.finalize())))
    };
    let mut sums: Vec<Option<Sum>> = selectors
        .iter()
        .map(|s| {
            let bytes = fs::read(memo(s)?).ok()?;
            bytes.try_into().ok()
        })
        .collect();
    if sums.iter().all(Option::is_some) {
        return Ok(sums.into_iter().flatten().collect());
    }
    let view = if layers.is_empty() {
        None
    } else {
        Some(mount_stack(root, layers, None)?)
    };
    let empty = empty_dir(root)?;
    let dir = view.as_ref().map_or(empty.as_path(), |v| v.path());
    for (s, slot) in selectors.iter().zip(sums.iter_mut()) {
        if slot.is_some() {
            continue;
        }
        let sum = selector_sum(dir, s)?;
        if let Some(file) = memo(s) {
            // A sum that cannot be remembered is computed again next time.
            let _ = fs::create_dir_all(file.parent().unwrap_or(&file)).and_then(|()| write_atomic(&file, &sum, false));
        }
        *slot = Some(sum);
    }
    if let Some(v) = view {
        v.unmount()?;
    }
    Ok(sums.into_iter().flatten().collect())
}

/// The sum of what one selector reads in the tree at `dir`.
pub(crate) fn selector_sum(dir: &Path, s: &Selector) -> io::Result<Sum> {
    let rels: Vec<String> = if s.wildcard && has_wildcards(&clean_rel(&s.path)) {
        matches_in_dir(dir, &s.path)
            .into_iter()
            .filter_map(|p| p.strip_prefix(dir).ok().map(|r| r.to_string_lossy().into_owned()))
            .collect()
    } else {
        vec![clean_rel(&s.path)]
    };
    let mut w = Walker {
        h: Sha256::new(),
        links: HashMap::new(),
        buf: vec![0; 1 << 16],
    };
    for rel in rels {
        let abs = resolve_in_root(dir, &format!("/{rel}"), s.follow)?;
        let resolved = abs.strip_prefix(dir).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        w.record(&[b"select", rel.as_bytes(), resolved.as_bytes()]);
        match fs::symlink_metadata(&abs) {
            Ok(meta) => w.node(&abs, &resolved, &meta)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => w.record(&[b"missing"]),
            Err(e) => return Err(e),
        }
    }
    Ok(w.h.finalize().into())
}

/// One pass over a tree, feeding every node into one hash in a fixed order.
struct Walker {
    h: Sha256,
    /// Hard-linked files seen, by device and inode: the first path.
    links: HashMap<(u64, u64), String>,
    buf: Vec<u8>,
}

impl Walker {
    /// Length-prefixed parts, so no two records run together.
    fn record(&mut self, parts: &[&[u8]]) {
        self.h.update((parts.len() as u64).to_le_bytes());
        for p in parts {
            self.h.update((p.len() as u64).to_le_bytes());
            self.h.update(p);
        }
    }

    fn node(&mut self, abs: &Path, rel: &str, meta: &fs::Metadata) -> io::Result<()> {
        let mode = meta.permissions().mode();
        let header = format!("{mode:o} {}:{}", meta.uid(), meta.gid());
        self.record(&[b"node", rel.as_bytes(), header.as_bytes()]);
        for (name, value) in xattrs(abs)? {
            self.record(&[b"xattr", name.as_bytes(), &value]);
        }
        let ft = meta.file_type();
        if ft.is_dir() {
            let mut names: Vec<_> = fs::read_dir(abs)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
            names.sort();
            for name in names {
                let child = abs.join(&name);
                let child_meta = fs::symlink_metadata(&child)?;
                self.node(&child, &join_rel(rel, &name.to_string_lossy()), &child_meta)?;
            }
            self.record(&[b"end"]);
        } else if ft.is_symlink() {
            let target = fs::read_link(abs)?;
            self.record(&[b"symlink", target.as_os_str().as_encoded_bytes()]);
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = self.links.get(&(meta.dev(), meta.ino())) {
                    let first = first.clone();
                    self.record(&[b"hardlink", first.as_bytes()]);
                    return Ok(());
                }
                self.links.insert((meta.dev(), meta.ino()), rel.to_string());
            }
            self.record(&[b"file", &meta.size().to_le_bytes()]);
            let mut f = fs::File::open(abs)?;
            loop {
                let n = f.read(&mut self.buf)?;
                if n == 0 {
                    break;
                }
                self.h.update(&self.buf[..n]);
            }
        } else {
            self.record(&[b"special", &meta.rdev().to_le_bytes()]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn sel(path: &str) -> Selector {
        Selector {
            path: path.into(),
            wildcard: true,
            follow: true,
        }
    }

    #[test]
    fn sums_cover_content_and_metadata_but_not_times() {
        let d = tempfile::tempdir().expect("tmp");
        let root = d.path();
        fs::create_dir_all(root.join("out/sub")).expect("mkdir");
        fs::write(root.join("out/a"), "a").expect("write");
        fs::write(root.join("out/sub/b"), "b").expect("write");
        fs::write(root.join("other"), "o").expect("write");
        let sum = || selector_sum(root, &sel("/out")).expect("sum");
        let first = sum();

        // Outside the selection, and times: no change.
        fs::write(root.join("other"), "o2").expect("write");
        let f = fs::File::options().write(true).open(root.join("out/a")).expect("open");
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).expect("touch");
        assert_eq!(sum(), first);

        // Content, mode, a new file, a link instead of a copy: changes.
        fs::write(root.join("out/a"), "A").expect("write");
        let content = sum();
        assert_ne!(content, first);
        fs::set_permissions(root.join("out/a"), fs::Permissions::from_mode(0o4755)).expect("chmod");
        let mode = sum();
        assert_ne!(mode, content);
        fs::write(root.join("out/sub/c"), "").expect("write");
        let added = sum();
        assert_ne!(added, mode);
        fs::remove_file(root.join("out/sub/c")).expect("rm");
        fs::hard_link(root.join("out/a"), root.join("out/sub/c")).expect("link");
        assert_ne!(sum(), mode, "a hard link is not an empty file");

        // A symlink at the path is followed when the copy follows it.
        symlink("out", root.join("via")).expect("symlink");
        let followed = selector_sum(root, &sel("/via")).expect("sum");
        let not = selector_sum(
            root,
            &Selector {
                follow: false,
                ..sel("/via")
            },
        )
        .expect("sum");
        assert_ne!(followed, not);

        // Patterns select by name; a missing path has a sum of its own.
        assert_ne!(
            selector_sum(root, &sel("/out/*")).expect("glob"),
            selector_sum(root, &sel("/ou?")).expect("glob")
        );
        assert_ne!(
            selector_sum(root, &sel("/nope")).expect("missing"),
            selector_sum(root, &sel("/nope2")).expect("missing")
        );
    }
}
