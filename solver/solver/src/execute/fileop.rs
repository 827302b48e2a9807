//! FileOp actions (copy, mkfile, mkdir, rm, symlink) applied to a writable
//! root, with the semantics of BuildKit's file backend and fsutil's copy.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_llb::pb;

use crate::error::Failure;
use crate::fsutil::{lchown, lookup_group, lookup_user, matches_in_dir, mkdir_all, resolve_in_root, Owner};
use crate::snapshot::layer::set_mtime_nofollow;
use crate::source::context::{join_rel, LocalSource};
use kiln_patterns::{clean_rel, has_wildcards, Filter};

/// Where a copy reads from.
pub(crate) enum SourceView<'a> {
    /// A mounted filesystem.
    Dir(&'a Path),
    /// A local source: its directory seen through its patterns, owned by root.
    Local(&'a LocalSource),
}

impl SourceView<'_> {
    fn root(&self) -> &Path {
        match self {
            SourceView::Dir(p) => p,
            SourceView::Local(l) => &l.dir,
        }
    }

    /// Whether a path (relative to the root) is visible.
    fn visible(&self, rel: &str, is_dir: bool) -> bool {
        match self {
            SourceView::Dir(_) => true,
            SourceView::Local(l) => {
                if is_dir {
                    l.may_enter(rel)
                } else {
                    l.includes(rel)
                }
            }
        }
    }

    /// Whether the source includes a path itself (a local source's
    /// patterns; everything of a mounted filesystem).
    fn included(&self, rel: &str, is_dir: bool) -> bool {
        match self {
            SourceView::Dir(_) => true,
            SourceView::Local(l) => is_dir && rel.is_empty() || l.includes(rel),
        }
    }

    /// Whether a directory the source leaves out may hold included paths.
    fn may_hold_included(&self, rel: &str) -> bool {
        match self {
            SourceView::Dir(_) => true,
            SourceView::Local(l) => l.may_enter(rel),
        }
    }

    fn owner_override(&self) -> Option<Owner> {
        match self {
            SourceView::Dir(_) => None,
            SourceView::Local(_) => Some(Owner { uid: 0, gid: 0 }),
        }
    }
}

/// An IO error with its causes (tar wraps its own errors in io::Error).
fn io_chain(e: &io::Error) -> String {
    match e.get_ref() {
        Some(inner) => chain(inner),
        None => e.to_string(),
    }
}

/// An error with its causes, `a: b: c`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

/// Resolves a ChownOpt against the destination root's /etc files, as
/// BuildKit's FileOp does: a user by id is also its own group, a user by
/// name brings its primary group, a group given replaces it; a name with
/// no entry (or no such file in the image) leaves the id at 0, never an
/// error (`COPY --chown=:staff` is root and staff).
fn owner_of(dest_root: &Path, chown: Option<&pb::ChownOpt>) -> Result<Option<Owner>, Failure> {
    let Some(c) = chown else { return Ok(None) };
    let lookup = |e: std::io::Error| Failure::invalid(e.to_string());
    let user: Option<(u32, u32)> = match c.user.as_ref().and_then(|u| u.user.as_ref()) {
        None => None,
        Some(pb::user_opt::User::ById(n)) => Some((*n, *n)),
        Some(pb::user_opt::User::ByName(n)) => Some(lookup_user(dest_root, &n.name).map_err(lookup)?.unwrap_or((0, 0))),
    };
    let group: Option<Option<u32>> = match c.group.as_ref().and_then(|g| g.user.as_ref()) {
        None => None,
        Some(pb::user_opt::User::ById(n)) => Some(Some(*n)),
        Some(pb::user_opt::User::ByName(n)) => Some(lookup_group(dest_root, &n.name).map_err(lookup)?),
    };
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let (uid, gid) = user.unwrap_or((0, 0));
    Ok(Some(Owner {
        uid,
        gid: group.flatten().unwrap_or(gid),
    }))
}

fn time_of(ts: i64) -> Option<i64> {
    (ts >= 0).then_some(ts)
}

/// Makes a directory, as BuildKit does: with the permission bits of the
/// action's mode (a setgid bit inherited from a setgid parent kept), the
/// owner and time given; with `make_parents`, missing parents alike; an
/// existing directory is left alone.
pub(crate) fn mkdir(dest_root: &Path, a: &pb::FileActionMkDir) -> Result<(), Failure> {
    let owner = owner_of(dest_root, a.owner.as_ref())?;
    let time = time_of(a.timestamp);
    let perm = a.mode as u32 & 0o777;
    let p = resolve_in_root(dest_root, &a.path, true).map_err(Failure::io(None, &a.path))?;
    if a.make_parents {
        mkdir_all(&p, perm, owner, time).map_err(Failure::io(Some("mkdir"), &a.path))?;
        return Ok(());
    }
    match fs::create_dir(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(Failure::io(Some("mkdir"), &a.path)(e)),
    }
    let inherited = fs::symlink_metadata(&p).map_err(Failure::io(None, &a.path))?.mode() & 0o2000;
    fs::set_permissions(&p, fs::Permissions::from_mode(perm | inherited)).map_err(Failure::io(None, &a.path))?;
    own_and_date(&p, owner, time).map_err(Failure::io(None, &a.path))
}

/// The last steps of making a node: its owner, then its time.
fn own_and_date(p: &Path, owner: Option<Owner>, time: Option<i64>) -> io::Result<()> {
    if let Some(o) = owner {
        lchown(p, o)?;
    }
    if let Some(t) = time {
        set_mtime_nofollow(p, t / 1_000_000_000, t % 1_000_000_000)?;
    }
    Ok(())
}

/// Writes a file, as BuildKit does: a new one gets the permission bits of
/// the action's mode, an existing one keeps its mode; then owner and time.
pub(crate) fn mkfile(dest_root: &Path, a: &pb::FileActionMkFile) -> Result<(), Failure> {
    let owner = owner_of(dest_root, a.owner.as_ref())?;
    let p = resolve_in_root(dest_root, &a.path, true).map_err(Failure::io(None, &a.path))?;
    let existed = fs::symlink_metadata(&p).is_ok();
    fs::write(&p, &a.data).map_err(Failure::io(Some("mkfile"), &a.path))?;
    if !existed {
        fs::set_permissions(&p, fs::Permissions::from_mode(a.mode as u32 & 0o777)).map_err(Failure::io(None, &a.path))?;
    }
    own_and_date(&p, owner, time_of(a.timestamp)).map_err(Failure::io(None, &a.path))
}

/// Makes a symlink.
pub(crate) fn symlink(dest_root: &Path, a: &pb::FileActionSymlink) -> Result<(), Failure> {
    let owner = owner_of(dest_root, a.owner.as_ref())?;
    let p = resolve_in_root(dest_root, &a.newpath, false).map_err(Failure::io(None, &a.newpath))?;
    std::os::unix::fs::symlink(&a.oldpath, &p).map_err(Failure::io(Some("symlink"), format!("{} -> {}", a.newpath, a.oldpath)))?;
    own_and_date(&p, owner, time_of(a.timestamp)).map_err(Failure::io(None, &a.newpath))
}

/// Removes a path (or what a wildcard matches).
pub(crate) fn rm(dest_root: &Path, a: &pb::FileActionRm) -> Result<(), Failure> {
    let targets: Vec<PathBuf> = if a.allow_wildcard && has_wildcards(&a.path) {
        matches_in_dir(dest_root, &a.path)
    } else {
        vec![resolve_in_root(dest_root, &a.path, false).map_err(Failure::io(None, &a.path))?]
    };
    if targets.is_empty() && !a.allow_not_found {
        return Err(Failure::invalid(format!("rm {}: no matches found", a.path)));
    }
    for t in targets {
        match fs::symlink_metadata(&t) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !a.allow_not_found {
                    return Err(Failure::io(Some("rm"), &a.path)(e));
                }
            }
            Err(e) => return Err(Failure::io(None, &a.path)(e)),
            Ok(m) if m.is_dir() => fs::remove_dir_all(&t).map_err(Failure::io(Some("rm"), &a.path))?,
            Ok(_) => fs::remove_file(&t).map_err(Failure::io(Some("rm"), &a.path))?,
        }
    }
    Ok(())
}

struct Copier<'a> {
    src: &'a SourceView<'a>,
    owner: Option<Owner>,
    mode: Option<ModeChange>,
    time: Option<i64>,
    filter: Filter,
    replace: bool,
    links: HashMap<(u64, u64), PathBuf>,
    /// Directories entered, innermost last.
    pending: Vec<Pending>,
}

/// A `--chmod` value: octal, or symbolic (`u+x,go=rX`).
#[derive(Debug, Clone)]
enum ModeChange {
    Octal(u32),
    Symbolic(String),
}

impl ModeChange {
    fn apply(&self, old: u32, is_dir: bool) -> u32 {
        match self {
            ModeChange::Octal(m) => *m & 0o7777,
            ModeChange::Symbolic(s) => apply_symbolic(s, old & 0o7777, is_dir),
        }
    }
}

/// Applies a symbolic chmod (`[ugoa]*[+-=]([rwxXst]*|[ugo])`, comma-separated).
fn apply_symbolic(spec: &str, mut mode: u32, is_dir: bool) -> u32 {
    for clause in spec.split(',') {
        let who_end = clause.find(['+', '-', '=']).unwrap_or(clause.len());
        let who = &clause[..who_end];
        let mut mask = 0u32;
        for c in who.chars() {
            mask |= match c {
                'u' => 0o4700,
                'g' => 0o2070,
                'o' => 0o1007,
                'a' => 0o7777,
                _ => 0,
            };
        }
        if who.is_empty() {
            mask = 0o7777;
        }
        let mut rest = &clause[who_end..];
        while let Some(op) = rest.chars().next() {
            let perms_end = rest[1..].find(['+', '-', '=']).map(|i| i + 1).unwrap_or(rest.len());
            let perms = &rest[1..perms_end];
            let mut bits = 0u32;
            for c in perms.chars() {
                // `g=u` and the like copy another class's current bits.
                let copied = |shift: u32| ((mode >> shift) & 0o7) * 0o111;
                bits |= match c {
                    'u' => copied(6),
                    'g' => copied(3),
                    'o' => copied(0),
                    'r' => 0o444,
                    'w' => 0o222,
                    'x' => 0o111,
                    'X' if is_dir || mode & 0o111 != 0 => 0o111,
                    's' => 0o6000,
                    't' => 0o1000,
                    _ => 0,
                };
            }
            let bits = bits & mask;
            match op {
                '+' => mode |= bits,
                '-' => mode &= !bits,
                '=' => mode = (mode & !(mask & 0o777)) | bits,
                _ => {}
            }
            rest = &rest[perms_end..];
        }
    }
    mode
}

/// Copies everything `src` shows into `dest_root` (owners, modes and times
/// kept): materialising a local source, seeding a cache mount, the local exporter.
pub(crate) fn copy_tree(dest_root: &Path, src: &SourceView) -> Result<(), Failure> {
    let action = pb::FileActionCopy {
        src: "/".into(),
        dest: "/".into(),
        mode: -1,
        dir_copy_contents: true,
        create_dest_path: true,
        timestamp: -1,
        ..Default::default()
    };
    copy(dest_root, src, &action)
}

/// Copies as `COPY`/`ADD` do (BuildKit's copy semantics). `dest_root` is
/// the writable root.
///
/// Directories the copy creates above what it copies get the permission
/// bits of an octal `--chmod` (else 0755) and the `--chown` owner; the
/// directory a directory's contents are copied into is never given the
/// source directory's metadata (created like the parents when missing,
/// left alone when it exists); directories inside the copy take the
/// source's mode and owner, existing ones included; a directory that
/// patterns exclude appears only when something inside it is copied.
pub(crate) fn copy(dest_root: &Path, src: &SourceView, a: &pb::FileActionCopy) -> Result<(), Failure> {
    let owner = owner_of(dest_root, a.owner.as_ref())?;
    let time = time_of(a.timestamp);
    let mode = if !a.mode_str.is_empty() {
        Some(ModeChange::Symbolic(a.mode_str.clone()))
    } else if a.mode >= 0 {
        Some(ModeChange::Octal(a.mode as u32))
    } else {
        None
    };
    // Directories the copy makes on the way.
    let parent_perm = match mode {
        Some(ModeChange::Octal(m)) => m & 0o777,
        _ => 0o755,
    };
    let dest_is_dir = a.dest.ends_with('/') || a.dest.ends_with("/.") || a.dest == "." || a.dest.is_empty();
    let dest_clean = format!("/{}", clean_rel(&a.dest));
    let dest_abs = resolve_in_root(dest_root, &dest_clean, true).map_err(Failure::io(None, &a.dest))?;
    if !a.create_dest_path {
        let parent = dest_abs.parent().unwrap_or(dest_root);
        if fs::symlink_metadata(parent).is_err() {
            return Err(Failure::invalid(format!("failed to stat {}: no such file or directory", a.dest)));
        }
    }
    let ensure = if dest_is_dir {
        dest_abs.clone()
    } else {
        dest_abs.parent().map(Path::to_path_buf).unwrap_or(dest_abs.clone())
    };

    let srcs: Vec<String> = if a.allow_wildcard && has_wildcards(&clean_rel(&a.src)) {
        let found = match src {
            SourceView::Local(l) => l.select(&a.src, true).map_err(Failure::io(None, &a.src))?,
            SourceView::Dir(d) => matches_in_dir(d, &a.src)
                .into_iter()
                .filter_map(|p| p.strip_prefix(d).ok().map(|r| r.to_string_lossy().into_owned()))
                .collect(),
        };
        if found.is_empty() {
            if a.allow_empty_wildcard {
                return Ok(());
            }
            return Err(Failure::invalid(format!("no matches found: {}", a.src)));
        }
        found
    } else {
        vec![clean_rel(&a.src)]
    };
    let mut c = Copier {
        src,
        owner: owner.or(src.owner_override()),
        mode,
        time,
        filter: Filter::new(&a.include_patterns, &a.exclude_patterns).map_err(|e| Failure::invalid(e.to_string()))?,
        replace: a.always_replace_existing_dest_paths,
        links: HashMap::new(),
        pending: Vec::new(),
    };
    // The destination's own parents, made once, before the first source
    // that is not an archive.
    let mut ensured = false;
    for rel in srcs {
        let src_abs = resolve_in_root(src.root(), &format!("/{rel}"), a.follow_symlink).map_err(Failure::io(None, &a.src))?;
        let rel_resolved = src_abs
            .strip_prefix(src.root())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or(rel.clone());
        let meta = match fs::symlink_metadata(&src_abs) {
            Ok(m) if src.visible(&rel_resolved, m.is_dir()) => m,
            _ => return Err(Failure::invalid(format!("\"/{rel}\": not found"))),
        };
        if a.attempt_unpack_docker_compatibility && meta.is_file() {
            if let Some(kind) = archive_kind(&src_abs) {
                // An archive goes into `dest` made as a directory (0755: `--chmod` is not
                // for archives), not through the copy's own parents.
                let target = dest_abs.clone();
                mkdir_all(&target, 0o755, owner, time).map_err(Failure::io(None, &a.dest))?;
                unpack_archive(&src_abs, kind, &target, owner)
                    .map_err(|e| Failure::invalid(format!("extracting {rel}: {}", io_chain(&e))))?;
                continue;
            }
        }
        if !ensured {
            mkdir_all(&ensure, parent_perm, owner, time).map_err(Failure::io(Some("creating"), &a.dest))?;
            ensured = true;
        }
        let mut dst = dest_abs.clone();
        let dst_meta = fs::metadata(&dst).ok();
        if (!a.dir_copy_contents && meta.is_dir() && dst_meta.is_some())
            || (!meta.is_dir() && dst_meta.as_ref().is_some_and(|m| m.is_dir()))
        {
            let base = Path::new(&rel).file_name().map(|n| n.to_os_string()).unwrap_or_default();
            dst = dst.join(base);
        }
        // A directory's contents go into `dst` itself, made like a parent.
        let target_dir = if a.dir_copy_contents && meta.is_dir() && dst_meta.is_none() {
            dst.clone()
        } else {
            dst.parent().map(Path::to_path_buf).unwrap_or(dst.clone())
        };
        mkdir_all(&target_dir, parent_perm, owner, time).map_err(Failure::io(None, &a.dest))?;
        c.copy_entry(&src_abs, &rel_resolved, "", &dst, &meta, false)
            .map_err(Failure::io(Some("copying"), &rel))?;
    }
    Ok(())
}

/// A directory the copy entered without copying it (patterns left it out),
/// made only when something inside it is copied.
struct Pending {
    src: PathBuf,
    dst: PathBuf,
    made: bool,
}

impl Copier<'_> {
    /// The owner, mode, times and extended attributes a copied entry gets,
    /// BuildKit's order: owner first (it clears setuid bits and file
    /// capabilities), then mode, times, and the source's xattrs.
    fn set_info(&self, src: &Path, dst: &Path, meta: &fs::Metadata) -> io::Result<()> {
        let ft = meta.file_type();
        let owner = self.owner.unwrap_or(Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        });
        lchown(dst, owner)?;
        if !ft.is_symlink() {
            let mode = match &self.mode {
                Some(m) => m.apply(meta.mode(), ft.is_dir()),
                None => meta.mode() & 0o7777,
            };
            fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
        }
        let (secs, nanos) = match self.time {
            Some(t) => (t / 1_000_000_000, t % 1_000_000_000),
            None => (meta.mtime(), meta.mtime_nsec()),
        };
        set_mtime_nofollow(dst, secs, nanos)?;
        crate::fsutil::copy_xattrs(src, dst)
    }

    /// Makes the directories entered but not yet made, outermost first.
    fn make_pending(&mut self, overwrite: bool) -> io::Result<()> {
        for i in 0..self.pending.len() {
            if self.pending[i].made {
                continue;
            }
            let (src, dst) = (self.pending[i].src.clone(), self.pending[i].dst.clone());
            let meta = fs::metadata(&src)?;
            if directory_only(&dst, &meta, overwrite)? {
                self.set_info(&src, &dst, &meta)?;
            }
            self.pending[i].made = true;
        }
        Ok(())
    }

    /// Copies one entry; `overwrite` (below the copy's top) gives existing
    /// directories the source's metadata.
    fn copy_entry(
        &mut self,
        src: &Path,
        src_rel: &str,
        rel_in_copy: &str,
        dst: &Path,
        meta: &fs::Metadata,
        overwrite: bool,
    ) -> io::Result<()> {
        let ft = meta.file_type();
        let include = self.src.included(src_rel, ft.is_dir()) && self.filter.includes(rel_in_copy);
        if !include && !ft.is_dir() {
            return Ok(());
        }
        let existing = fs::symlink_metadata(dst).ok();
        if include {
            self.make_pending(overwrite)?;
        }
        if ft.is_dir() {
            let created = if include {
                if let Some(m) = &existing {
                    if !m.is_dir() {
                        if self.replace {
                            fs::remove_file(dst)?;
                        } else {
                            return Err(io::Error::other(format!("cannot copy to non-directory: {}", dst.display())));
                        }
                    }
                }
                directory_only(dst, meta, overwrite)?
            } else {
                if !(self.src.may_hold_included(src_rel) && self.filter.may_enter(rel_in_copy)) {
                    return Ok(());
                }
                false
            };
            self.pending.push(Pending {
                src: src.to_path_buf(),
                dst: dst.to_path_buf(),
                made: include,
            });
            let mut names: Vec<_> = fs::read_dir(src)?.flatten().map(|e| e.file_name()).collect();
            names.sort();
            let mut result = Ok(());
            for n in names {
                let name = n.to_string_lossy();
                let child_src = src.join(&n);
                let child_meta = match fs::symlink_metadata(&child_src) {
                    Ok(m) => m,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                };
                let child_rel = join_rel(src_rel, &name);
                let child_in_copy = join_rel(rel_in_copy, &name);
                result = self.copy_entry(&child_src, &child_rel, &child_in_copy, &dst.join(&n), &child_meta, true);
                if result.is_err() {
                    break;
                }
            }
            self.pending.pop();
            result?;
            // The top of a copy keeps an existing directory's metadata.
            if include && (created || overwrite) {
                self.set_info(src, dst, meta)?;
            }
            return Ok(());
        }
        if let Some(m) = &existing {
            if m.is_dir() {
                if self.replace {
                    fs::remove_dir_all(dst)?;
                } else {
                    return Err(io::Error::other(format!("cannot replace directory {} with a file", dst.display())));
                }
            } else {
                fs::remove_file(dst)?;
            }
        }
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
            return self.set_info(src, dst, meta);
        }
        if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = self.links.get(&key) {
                    fs::hard_link(first, dst)?;
                    return Ok(());
                }
                self.links.insert(key, dst.to_path_buf());
            }
            fs::copy(src, dst)?;
        } else if !crate::fsutil::make_special(dst, meta, meta.mode() & 0o7777)? {
            return Ok(()); // sockets are not copied
        }
        self.set_info(src, dst, meta)
    }
}

/// Makes `dst` a directory with `meta`'s mode when missing (true: made);
/// gives an existing one `meta`'s mode when `overwrite`.
fn directory_only(dst: &Path, meta: &fs::Metadata, overwrite: bool) -> io::Result<bool> {
    match fs::symlink_metadata(dst) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir(dst)?;
            fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            Ok(true)
        }
        Err(e) => Err(e),
        Ok(m) if !m.is_dir() => Err(io::Error::other(format!("cannot copy to non-directory: {}", dst.display()))),
        Ok(_) => {
            if overwrite {
                fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            }
            Ok(false)
        }
    }
}

/// Compression of an archive `ADD` unpacks (Docker's set).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Archive {
    Tar,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

/// A reader that decompresses `path` as `kind`.
fn open_archive(path: &Path, kind: Archive) -> io::Result<Box<dyn Read>> {
    let f = io::BufReader::new(fs::File::open(path)?);
    Ok(match kind {
        Archive::Tar => Box::new(f),
        Archive::Gzip => Box::new(flate2::read::MultiGzDecoder::new(f)),
        Archive::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(f)),
        Archive::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(f)),
        Archive::Zstd => Box::new(ruzstd::decoding::StreamingDecoder::new(f).map_err(io::Error::other)?),
    })
}

/// Whether a file is an archive `ADD` unpacks: a tar, plain or compressed
/// with gzip, bzip2, xz or zstd (recognised by content, as Docker does).
fn archive_kind(path: &Path) -> Option<Archive> {
    let mut f = fs::File::open(path).ok()?;
    let mut magic = [0u8; 6];
    let n = read_full(&mut f, &mut magic).ok()?;
    let magic = &magic[..n];
    let kind = if magic.starts_with(&[0x1f, 0x8b, 0x08]) {
        Archive::Gzip
    } else if magic.starts_with(b"BZh") {
        Archive::Bzip2
    } else if magic.starts_with(&[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]) {
        Archive::Xz
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Archive::Zstd
    } else {
        Archive::Tar
    };
    let mut reader = open_archive(path, kind).ok()?;
    let mut head = [0u8; 512];
    let m = read_full(&mut reader, &mut head).ok()?;
    (m == 512 && is_tar_header(&head)).then_some(kind)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let m = r.read(&mut buf[n..])?;
        if m == 0 {
            break;
        }
        n += m;
    }
    Ok(n)
}

fn is_tar_header(h: &[u8; 512]) -> bool {
    if &h[257..262] == b"ustar" {
        return true;
    }
    // Old-style tar: check the header checksum.
    let stored = std::str::from_utf8(&h[148..156])
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim_matches(|c: char| c == '\0' || c == ' '), 8).ok());
    let sum: u32 = h
        .iter()
        .enumerate()
        .map(|(i, b)| if (148..156).contains(&i) { 32 } else { *b as u32 })
        .sum();
    stored == Some(sum) && h[0] != 0
}

/// Extracts an archive into `dest` as Docker's and BuildKit's untar does:
/// the archive's own root entry (`./`) leaves `dest` as it is; each entry
/// gets the header's owner (or `owner`, `ADD --chown`) and then the
/// header's mode, so setuid and setgid bits survive the chown; fifos and
/// devices are made as such; a hard link's header gives the shared inode
/// its owner and mode; PAX `SCHILY.xattr.*` records are set last (file
/// capabilities survive the chown). Directories the archive implies but
/// does not list are made 0755 and owned by root, even under `--chown`
/// (a setgid parent's bit is kept, its group is not). `--chmod` does not
/// apply to archive entries.
fn unpack_archive(src: &Path, kind: Archive, dest: &Path, owner: Option<Owner>) -> io::Result<()> {
    let mut ar = tar::Archive::new(open_archive(src, kind)?);
    ar.set_preserve_permissions(true);
    // Owners are set below: a blank uid field (some tar writers leave it so) means 0.
    ar.set_preserve_ownerships(false);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let rel = clean_rel(&path.to_string_lossy());
        if rel.is_empty() {
            continue;
        }
        // Extended attributes (file capabilities among them), set last: a
        // chown clears `security.capability`.
        let mut attrs: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(records) = entry.pax_extensions()? {
            for record in records {
                let record = record?;
                if let (Ok(key), value) = (record.key(), record.value_bytes()) {
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        attrs.push((name.to_string(), value.to_vec()));
                    }
                }
            }
        }
        let header = entry.header();
        let from_tar = Owner {
            uid: header.uid().unwrap_or(0) as u32,
            gid: header.gid().unwrap_or(0) as u32,
        };
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let kind = header.entry_type();
        let target = resolve_in_root(dest, &format!("/{rel}"), false)?;
        if let Some(parent) = target.parent() {
            mkdir_all(parent, 0o755, Some(Owner { uid: 0, gid: 0 }), None)?;
        }
        // What is already there gives way, unless a directory meets a
        // directory (then they merge): a later entry replaces an earlier
        // one of another type, as with Docker's untar.
        if let Ok(existing) = fs::symlink_metadata(&target) {
            if !(existing.is_dir() && kind == tar::EntryType::Directory) {
                if existing.is_dir() {
                    fs::remove_dir_all(&target)?;
                } else {
                    fs::remove_file(&target)?;
                }
            }
        }
        let special = match kind {
            tar::EntryType::Fifo => Some(rustix::fs::FileType::Fifo),
            tar::EntryType::Char => Some(rustix::fs::FileType::CharacterDevice),
            tar::EntryType::Block => Some(rustix::fs::FileType::BlockDevice),
            _ => None,
        };
        if let Some(node) = special {
            // Writers leave a fifo's device fields blank.
            let dev = rustix::fs::makedev(
                header.device_major().ok().flatten().unwrap_or(0),
                header.device_minor().ok().flatten().unwrap_or(0),
            );
            rustix::fs::mknodat(rustix::fs::CWD, &target, node, rustix::fs::Mode::from_raw_mode(mode), dev)?;
        } else if kind == tar::EntryType::Link {
            let Some(name) = entry.link_name()? else { continue };
            let linked = resolve_in_root(dest, &format!("/{}", clean_rel(&name.to_string_lossy())), false)?;
            fs::hard_link(&linked, &target)?;
        } else if !entry.unpack_in(dest)? {
            continue;
        }
        lchown(&target, owner.unwrap_or(from_tar))?;
        if kind != tar::EntryType::Symlink {
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
        }
        for (name, value) in &attrs {
            match rustix::fs::lsetxattr(&target, name.as_str(), value, rustix::fs::XattrFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::PERM | rustix::io::Errno::NOTSUP) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_action(src: &str, dest: &str) -> pb::FileActionCopy {
        pb::FileActionCopy {
            src: src.into(),
            dest: dest.into(),
            mode: -1,
            timestamp: -1,
            create_dest_path: true,
            ..Default::default()
        }
    }

    fn tree(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).expect("read_dir").flatten() {
                let p = e.path();
                let rel = p.strip_prefix(root).expect("prefix").to_string_lossy().into_owned();
                if fs::symlink_metadata(&p).expect("stat").is_dir() {
                    out.push(format!("{rel}/"));
                    stack.push(p);
                } else {
                    out.push(rel);
                }
            }
        }
        out.sort();
        out
    }

    /// A source tree: `dir/{a.txt,b.log,sub/c.txt}`, `top.txt`, `link -> dir/a.txt`.
    fn source() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(t.path().join("dir/sub")).expect("mkdir");
        fs::write(t.path().join("dir/a.txt"), "a").expect("w");
        fs::write(t.path().join("dir/b.log"), "b").expect("w");
        fs::write(t.path().join("dir/sub/c.txt"), "c").expect("w");
        fs::write(t.path().join("top.txt"), "top").expect("w");
        std::os::unix::fs::symlink("dir/a.txt", t.path().join("link")).expect("ln");
        t
    }

    #[test]
    fn copy_directory_itself_or_its_contents() {
        let src = source();
        let view = SourceView::Dir(src.path());
        // COPY dir /out/  (Dockerfile sets dir_copy_contents): contents land in /out.
        let d1 = tempfile::tempdir().expect("tmp");
        let mut a = copy_action("/dir", "/out/");
        a.dir_copy_contents = true;
        copy(d1.path(), &view, &a).expect("copy");
        assert_eq!(tree(d1.path()), ["out/", "out/a.txt", "out/b.log", "out/sub/", "out/sub/c.txt"]);
        // Without dir_copy_contents into an existing directory: the directory goes inside.
        let d2 = tempfile::tempdir().expect("tmp");
        fs::create_dir(d2.path().join("out")).expect("mkdir");
        copy(d2.path(), &view, &copy_action("/dir", "/out")).expect("copy");
        assert!(d2.path().join("out/dir/sub/c.txt").is_file());
        // A file onto a path ending in /: into that directory; onto a new name: renamed.
        let d3 = tempfile::tempdir().expect("tmp");
        copy(d3.path(), &view, &copy_action("/top.txt", "/x/")).expect("copy");
        copy(d3.path(), &view, &copy_action("/top.txt", "/y/renamed.txt")).expect("copy");
        assert_eq!(fs::read_to_string(d3.path().join("x/top.txt")).expect("r"), "top");
        assert_eq!(fs::read_to_string(d3.path().join("y/renamed.txt")).expect("r"), "top");
    }

    #[test]
    fn wildcards_patterns_symlinks_and_missing_parents() {
        let src = source();
        let view = SourceView::Dir(src.path());
        let d = tempfile::tempdir().expect("tmp");
        let mut a = copy_action("/dir/*.txt", "/w/");
        a.allow_wildcard = true;
        copy(d.path(), &view, &a).expect("wildcard");
        assert_eq!(tree(&d.path().join("w")), ["a.txt"]);
        let mut none = copy_action("/dir/*.nope", "/w/");
        none.allow_wildcard = true;
        let none_found = copy(d.path(), &view, &none).expect_err("no match");
        assert!(
            matches!(&none_found, Failure::Invalid(m) if m.contains("no matches")),
            "{none_found:?}"
        );
        none.allow_empty_wildcard = true;
        copy(d.path(), &view, &none).expect("empty wildcard allowed");

        // --exclude / include patterns apply below the copied directory.
        let mut ex = copy_action("/dir", "/ex/");
        ex.dir_copy_contents = true;
        ex.exclude_patterns = vec!["*.log".into(), "sub".into()];
        copy(d.path(), &view, &ex).expect("exclude");
        assert_eq!(tree(&d.path().join("ex")), ["a.txt"]);

        // A symlink is copied as a link unless follow_symlink.
        copy(d.path(), &view, &copy_action("/link", "/l1")).expect("link");
        assert_eq!(fs::read_link(d.path().join("l1")).expect("readlink"), Path::new("dir/a.txt"));
        let mut follow = copy_action("/link", "/l2");
        follow.follow_symlink = true;
        copy(d.path(), &view, &follow).expect("follow");
        assert_eq!(fs::read_to_string(d.path().join("l2")).expect("r"), "a");

        // Without create_dest_path the parent must exist.
        let mut strict = copy_action("/top.txt", "/missing/parent/f");
        strict.create_dest_path = false;
        assert!(copy(d.path(), &view, &strict).is_err());
        // Missing source.
        assert!(copy(d.path(), &view, &copy_action("/nope", "/n"))
            .expect_err("missing")
            .to_string()
            .contains("not found"));
    }

    #[test]
    fn modes_times_and_owners() {
        let src = source();
        let view = SourceView::Dir(src.path());
        let d = tempfile::tempdir().expect("tmp");
        let mut a = copy_action("/top.txt", "/m");
        a.mode = 0o600;
        a.timestamp = 1_600_000_000_000_000_000;
        copy(d.path(), &view, &a).expect("copy");
        let m = fs::metadata(d.path().join("m")).expect("stat");
        assert_eq!(m.mode() & 0o7777, 0o600);
        assert_eq!(m.mtime(), 1_600_000_000);
        let mut sym = copy_action("/top.txt", "/s");
        sym.mode_str = "u+x,go=".into();
        fs::set_permissions(src.path().join("top.txt"), fs::Permissions::from_mode(0o644)).expect("chmod");
        copy(d.path(), &view, &sym).expect("copy");
        assert_eq!(fs::metadata(d.path().join("s")).expect("stat").mode() & 0o7777, 0o744 & 0o700);
        // Owners by name resolve in the destination's /etc files.
        fs::create_dir_all(d.path().join("etc")).expect("mkdir");
        fs::write(d.path().join("etc/passwd"), "app:x:1234:1234::/:/bin/sh\n").expect("w");
        fs::write(d.path().join("etc/group"), "app:x:1234:\n").expect("w");
        let by_name = |name: &str| pb::UserOpt {
            user: Some(pb::user_opt::User::ByName(pb::NamedUserOpt {
                name: name.into(),
                input: 0,
            })),
        };
        let mut own = copy_action("/top.txt", "/owned");
        own.owner = Some(pb::ChownOpt {
            user: Some(by_name("app")),
            group: Some(by_name("app")),
        });
        if rustix::process::geteuid().is_root() {
            copy(d.path(), &view, &own).expect("chown");
            let m = fs::metadata(d.path().join("owned")).expect("stat");
            assert_eq!((m.uid(), m.gid()), (1234, 1234));
        }
        // As BuildKit: a name without an entry is id 0, not an error
        // (`--chown=:app` names the user "" and the group app).
        for (user, group, dest, want) in [
            ("nobody-here", None, "/unknown", (0, 0)),
            ("", Some("app"), "/group-only", (0, 1234)),
            ("app", Some("no-such-group"), "/unknown-group", (1234, 1234)),
        ] {
            own.dest = dest.into();
            own.owner = Some(pb::ChownOpt {
                user: Some(by_name(user)),
                group: group.map(by_name),
            });
            copy(d.path(), &view, &own).expect("chown by names");
            if rustix::process::geteuid().is_root() {
                let m = fs::metadata(d.path().join(dest.trim_start_matches('/'))).expect("stat");
                assert_eq!((m.uid(), m.gid()), want, "{user}:{group:?}");
            }
        }
    }

    #[test]
    fn mkdir_mkfile_rm_symlink() {
        let d = tempfile::tempdir().expect("tmp");
        mkdir(
            d.path(),
            &pb::FileActionMkDir {
                path: "/a/b/c".into(),
                mode: 0o750,
                make_parents: true,
                timestamp: -1,
                ..Default::default()
            },
        )
        .expect("mkdir -p");
        assert_eq!(fs::metadata(d.path().join("a/b/c")).expect("stat").mode() & 0o7777, 0o750);
        mkfile(
            d.path(),
            &pb::FileActionMkFile {
                path: "/a/f".into(),
                mode: 0o640,
                data: b"data".to_vec(),
                timestamp: -1,
                ..Default::default()
            },
        )
        .expect("mkfile");
        assert_eq!(fs::read(d.path().join("a/f")).expect("r"), b"data");
        assert_eq!(fs::metadata(d.path().join("a/f")).expect("stat").mode() & 0o7777, 0o640);
        // As BuildKit: writing over a file keeps its mode.
        fs::set_permissions(d.path().join("a/f"), fs::Permissions::from_mode(0o600)).expect("chmod");
        mkfile(
            d.path(),
            &pb::FileActionMkFile {
                path: "/a/f".into(),
                mode: 0o644,
                data: b"new".to_vec(),
                timestamp: -1,
                ..Default::default()
            },
        )
        .expect("mkfile over");
        assert_eq!(fs::read(d.path().join("a/f")).expect("r"), b"new");
        assert_eq!(fs::metadata(d.path().join("a/f")).expect("stat").mode() & 0o7777, 0o600);
        symlink(
            d.path(),
            &pb::FileActionSymlink {
                oldpath: "/a/f".into(),
                newpath: "/a/l".into(),
                timestamp: -1,
                ..Default::default()
            },
        )
        .expect("symlink");
        assert_eq!(fs::read_link(d.path().join("a/l")).expect("readlink"), Path::new("/a/f"));
        rm(
            d.path(),
            &pb::FileActionRm {
                path: "/a/*".into(),
                allow_wildcard: true,
                ..Default::default()
            },
        )
        .expect("rm wildcard");
        assert_eq!(tree(&d.path().join("a")), Vec::<String>::new());
        assert!(rm(
            d.path(),
            &pb::FileActionRm {
                path: "/gone".into(),
                ..Default::default()
            }
        )
        .is_err());
        rm(
            d.path(),
            &pb::FileActionRm {
                path: "/gone".into(),
                allow_not_found: true,
                ..Default::default()
            },
        )
        .expect("allow_not_found");
    }

    #[test]
    fn archives_keep_file_capabilities_under_add_chown() {
        let t = tempfile::tempdir().expect("tmp");
        let cap = crate::snapshot::layer::CAP_NET_RAW_EP;
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("SCHILY.xattr.security.capability", &cap[..])])
            .expect("pax");
        let mut h = tar::Header::new_ustar();
        h.set_size(1);
        h.set_mode(0o4755);
        b.append_data(&mut h, "bin/ping", &b"x"[..]).expect("tar");
        let archive = t.path().join("caps.tar");
        fs::write(&archive, b.into_inner().expect("tar")).expect("write");
        let dest = t.path().join("out");
        fs::create_dir(&dest).expect("mkdir");
        unpack_archive(&archive, Archive::Tar, &dest, Some(Owner { uid: 7, gid: 8 })).expect("unpack");
        let ping = dest.join("bin/ping");
        let meta = fs::metadata(&ping).expect("stat");
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (7, 8, 0o4755),
            "owner, then mode: setuid kept"
        );
        let mut value = [0u8; 64];
        let n = rustix::fs::lgetxattr(&ping, "security.capability", &mut value[..]).expect("capability kept");
        assert_eq!(&value[..n], &cap);
    }

    #[test]
    fn directories_an_archive_implies_are_roots_even_in_a_setgid_directory() {
        let t = tempfile::tempdir().expect("tmp");
        let mut b = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_ustar();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o2775);
        dir.set_uid(10);
        dir.set_gid(20);
        dir.set_size(0);
        b.append_data(&mut dir, "top/", std::io::empty()).expect("tar");
        let mut file = tar::Header::new_ustar();
        file.set_size(1);
        file.set_mode(0o444);
        b.append_data(&mut file, "top/sub/deep/f", &b"d"[..]).expect("tar");
        let archive = t.path().join("implied.tar");
        fs::write(&archive, b.into_inner().expect("tar")).expect("write");
        for (name, owner, entries) in [("plain", None, (10, 20)), ("chown", Some(Owner { uid: 33, gid: 44 }), (33, 44))] {
            let dest = t.path().join(name);
            fs::create_dir(&dest).expect("mkdir");
            unpack_archive(&archive, Archive::Tar, &dest, owner).expect("unpack");
            let stat = |p: &str| {
                let m = fs::symlink_metadata(dest.join(p)).expect("stat");
                (m.uid(), m.gid(), m.mode() & 0o7777)
            };
            assert_eq!(stat("top"), (entries.0, entries.1, 0o2775), "{name}: the listed directory");
            for implied in ["top/sub", "top/sub/deep"] {
                assert_eq!(stat(implied), (0, 0, 0o2755), "{name}: {implied}, as BuildKit's untar makes it");
            }
            assert_eq!(stat("top/sub/deep/f").2, 0o444);
        }
    }

    #[test]
    fn a_later_archive_entry_replaces_an_earlier_one_of_another_type() {
        let t = tempfile::tempdir().expect("tmp");
        let mut b = tar::Builder::new(Vec::new());
        let entry = |b: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(if kind == tar::EntryType::Directory { 0o750 } else { 0o644 });
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).expect("link");
            }
            b.append_data(&mut h, path, data).expect("tar");
        };
        entry(&mut b, "f-then-d", tar::EntryType::Regular, b"file", None);
        entry(&mut b, "f-then-d/", tar::EntryType::Directory, b"", None);
        entry(&mut b, "f-then-d/in", tar::EntryType::Regular, b"in", None);
        entry(&mut b, "d-then-f/", tar::EntryType::Directory, b"", None);
        entry(&mut b, "d-then-f/old", tar::EntryType::Regular, b"old", None);
        entry(&mut b, "d-then-f", tar::EntryType::Regular, b"now a file", None);
        entry(&mut b, "l-then-d", tar::EntryType::Symlink, b"", Some("f-then-d"));
        entry(&mut b, "l-then-d/", tar::EntryType::Directory, b"", None);
        entry(&mut b, "dup", tar::EntryType::Regular, b"first", None);
        entry(&mut b, "dup", tar::EntryType::Regular, b"second", None);
        let archive = t.path().join("replace.tar");
        fs::write(&archive, b.into_inner().expect("tar")).expect("write");
        let dest = t.path().join("out");
        fs::create_dir(&dest).expect("mkdir");
        // In the image already: a directory where the archive has a file.
        fs::create_dir_all(dest.join("dup/was-a-dir")).expect("mkdir");
        unpack_archive(&archive, Archive::Tar, &dest, None).expect("unpack");
        assert_eq!(fs::read(dest.join("f-then-d/in")).expect("read"), b"in");
        assert_eq!(fs::read(dest.join("d-then-f")).expect("read"), b"now a file");
        let l = fs::symlink_metadata(dest.join("l-then-d")).expect("stat");
        assert!(l.is_dir() && l.mode() & 0o777 == 0o750, "the symlink became a directory");
        assert_eq!(fs::read(dest.join("dup")).expect("read"), b"second");
    }

    #[test]
    fn add_recognises_compressed_tars_by_content() {
        let t = tempfile::tempdir().expect("tmp");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "x/y.txt", &b"hi"[..]).expect("tar");
        let plain = b.into_inner().expect("tar");
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, &plain).expect("gz");
            e.finish().expect("gz")
        };
        let bz = {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            std::io::Write::write_all(&mut e, &plain).expect("bz");
            e.finish().expect("bz")
        };
        let xz = {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            std::io::Write::write_all(&mut e, &plain).expect("xz");
            e.finish().expect("xz")
        };
        for (name, bytes, kind) in [
            ("a.tar", plain.clone(), Some(Archive::Tar)),
            ("a.tgz", gz, Some(Archive::Gzip)),
            ("a.tbz", bz, Some(Archive::Bzip2)),
            ("a.txz", xz, Some(Archive::Xz)),
            ("not-a-tar.gz", b"just text, not an archive at all".repeat(20), None),
        ] {
            let p = t.path().join(name);
            fs::write(&p, &bytes).expect("write");
            assert_eq!(archive_kind(&p), kind, "{name}");
            if let Some(k) = kind {
                let dest = t.path().join(format!("out-{name}"));
                fs::create_dir(&dest).expect("mkdir");
                unpack_archive(&p, k, &dest, None).expect("unpack");
                assert_eq!(fs::read(dest.join("x/y.txt")).expect("read"), b"hi", "{name}");
            }
        }
    }

    #[test]
    fn copies_keep_file_capabilities_through_a_chown() {
        let src = tempfile::tempdir().expect("tmp");
        let cap = crate::snapshot::layer::CAP_NET_RAW_EP;
        fs::write(src.path().join("ping"), b"x").expect("write");
        rustix::fs::lsetxattr(
            src.path().join("ping"),
            "security.capability",
            &cap,
            rustix::fs::XattrFlags::empty(),
        )
        .expect("setting a file capability (needs root)");
        let d = tempfile::tempdir().expect("tmp");
        let mut a = copy_action("/ping", "/bin/");
        a.owner = Some(pb::ChownOpt {
            user: Some(pb::UserOpt {
                user: Some(pb::user_opt::User::ById(7)),
            }),
            group: None,
        });
        copy(d.path(), &SourceView::Dir(src.path()), &a).expect("copy");
        let mut value = [0u8; 64];
        let n = rustix::fs::lgetxattr(d.path().join("bin/ping"), "security.capability", &mut value[..]).expect("capability kept");
        assert_eq!(&value[..n], &cap);
        assert_eq!(fs::metadata(d.path().join("bin/ping")).expect("stat").uid(), 7);
    }

    #[test]
    fn symbolic_modes() {
        assert_eq!(apply_symbolic("u+x", 0o644, false), 0o744);
        assert_eq!(apply_symbolic("go=rX", 0o700, true), 0o755);
        assert_eq!(apply_symbolic("go=rX", 0o600, false), 0o644);
        assert_eq!(apply_symbolic("a-w", 0o666, false), 0o444);
        assert_eq!(apply_symbolic("u=rw,g=r,o=", 0o777, false), 0o640);
        // Copying a class: `g=u` gives the group what the owner has.
        assert_eq!(apply_symbolic("g=u", 0o755, false), 0o775);
        assert_eq!(apply_symbolic("g=u", 0o644, false), 0o664);
        assert_eq!(apply_symbolic("o=g,g-w", 0o670, false), 0o657);
    }
}
