//! Converting between layer directories (overlayfs form) and OCI layer
//! tarballs (whiteouts as `.wh.` files).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use sha2::{Digest as _, Sha256};

use crate::root::StateRoot;
use crate::snapshot::LayerBlob;

/// OCI media type of a gzip layer.
pub(crate) const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The namespaces of overlayfs's own extended attributes, as root and as
/// mounted with `userxattr` in a user namespace (rootless): they describe
/// the layer, not a file, and never enter an image.
pub(crate) const OVERLAY_XATTR_PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];

/// overlayfs's opaque-directory marker, in the same two namespaces.
const OPAQUE_XATTRS: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];

/// The opaque marker this process's overlayfs mounts read.
pub(crate) fn opaque_xattr() -> &'static str {
    OPAQUE_XATTRS[usize::from(crate::rootless::in_user_namespace())]
}

/// Whether a directory entry is an overlayfs whiteout.
pub(crate) fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Whether a directory is marked opaque (hides everything below it).
pub(crate) fn is_opaque(path: &Path) -> bool {
    OPAQUE_XATTRS
        .iter()
        .any(|name| matches!(rustix::fs::lgetxattr(path, *name, &mut [0u8; 4]), Ok(n) if n >= 1))
}

/// A writer hashing everything that passes through.
struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the layer directory `dir` as a tar stream (OCI whiteouts); a
/// directory's entries in name order before its subdirectories' contents.
/// With `clamp`, no timestamp is later than it (SOURCE_DATE_EPOCH).
pub(crate) fn write_tar<W: Write>(dir: &Path, out: W, clamp: Option<i64>) -> io::Result<W> {
    let mut builder = tar_builder(out);
    append_tree(&mut builder, dir, Path::new(""), clamp)?;
    builder.into_inner()
}

/// A tar writer as [`write_tar`] uses it (full metadata, links kept).
pub(crate) fn tar_builder<W: Write>(out: W) -> tar::Builder<W> {
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Complete);
    builder.follow_symlinks(false);
    builder
}

/// Appends the tree under `dir` as [`write_tar`] writes it, each path
/// under `prefix` (empty: at the top).
pub(crate) fn append_tree<W: Write>(builder: &mut tar::Builder<W>, dir: &Path, prefix: &Path, clamp: Option<i64>) -> io::Result<()> {
    let stamp = |t: i64| -> u64 { clamp.map_or(t, |c| t.min(c)).max(0) as u64 };
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut stack: Vec<(PathBuf, PathBuf)> = vec![(dir.to_path_buf(), prefix.to_path_buf())];
    while let Some((abs, rel)) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&abs)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        // Reverse push so that popping visits in order, depth first.
        let mut subdirs = Vec::new();
        if rel != prefix && is_opaque(&abs) {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(0);
            h.set_mode(0o644);
            h.set_mtime(0);
            builder.append_data(&mut h, rel.join(".wh..wh..opq"), io::empty())?;
        }
        for e in entries {
            let path = e.path();
            let name = e.file_name();
            let rel_path = rel.join(&name);
            let meta = fs::symlink_metadata(&path)?;
            if is_whiteout(&meta) {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(0);
                h.set_mode(0o644);
                h.set_mtime(0);
                let mut wh = std::ffi::OsString::from(".wh.");
                wh.push(&name);
                builder.append_data(&mut h, rel.join(wh), io::empty())?;
                continue;
            }
            // Extended attributes (file capabilities among them) travel as
            // PAX records, as BuildKit writes them. A hard link's entry
            // repeats its target's, as BuildKit's do: unpackers (Docker's)
            // chown the link, which clears the inode's file capability.
            let attrs = crate::fsutil::xattrs(&path)?;
            if !attrs.is_empty() {
                let keys: Vec<String> = attrs.iter().map(|(k, _)| format!("SCHILY.xattr.{k}")).collect();
                builder.append_pax_extensions(keys.iter().map(String::as_str).zip(attrs.iter().map(|(_, v)| v.as_slice())))?;
            }
            let mut h = tar::Header::new_gnu();
            h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            h.set_mtime(stamp(meta.mtime()));
            h.set_uid(meta.uid() as u64);
            h.set_gid(meta.gid() as u64);
            h.set_username("").ok();
            h.set_groupname("").ok();
            let ft = meta.file_type();
            if ft.is_dir() {
                h.set_size(0);
                builder.append_data(&mut h, &rel_path, io::empty())?;
                subdirs.push((path, rel_path));
            } else if ft.is_symlink() {
                let target = fs::read_link(&path)?;
                h.set_size(0);
                builder.append_link(&mut h, &rel_path, target)?;
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    let key = (meta.dev(), meta.ino());
                    if let Some(first) = links.get(&key) {
                        h.set_entry_type(tar::EntryType::Link);
                        h.set_size(0);
                        builder.append_link(&mut h, &rel_path, first)?;
                        continue;
                    }
                    links.insert(key, rel_path.clone());
                }
                let f = fs::File::open(&path)?;
                h.set_size(meta.len());
                builder.append_data(&mut h, &rel_path, f)?;
            } else {
                // fifos and device nodes
                h.set_size(0);
                if ft.is_char_device() || ft.is_block_device() {
                    let rdev = meta.rdev();
                    h.set_device_major(rustix::fs::major(rdev))?;
                    h.set_device_minor(rustix::fs::minor(rdev))?;
                }
                builder.append_data(&mut h, &rel_path, io::empty())?;
            }
        }
        for d in subdirs.into_iter().rev() {
            stack.push(d);
        }
    }
    Ok(())
}

/// Layers up to this size (as a tar) are hashed before they are compressed,
/// so that a step that re-ran and wrote the same files reuses the blob made
/// the first time (a re-run `COPY --from` of an unchanged binary, say)
/// instead of compressing it again.
const REUSE_LIMIT: u64 = 32 << 20;

/// A sink that counts and hashes, and gives up past a limit.
struct Measure {
    hash: Sha256,
    count: u64,
    limit: u64,
}

impl Write for Measure {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.count += buf.len() as u64;
        if self.count > self.limit {
            return Err(io::Error::other("over the reuse limit"));
        }
        self.hash.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `ROOT/diffids/HEX.json`: the blob last made for a layer tar of that digest.
fn diff_id_file(root: &StateRoot, diff_id: &str) -> std::path::PathBuf {
    root.path()
        .join("diffids")
        .join(format!("{}.json", diff_id.trim_start_matches("sha256:")))
}

/// The blob made before for the tar `diff_id`, if it is still stored.
fn blob_of_diff_id(root: &StateRoot, diff_id: &str) -> Option<LayerBlob> {
    let blob: LayerBlob = serde_json::from_slice(&fs::read(diff_id_file(root, diff_id)).ok()?).ok()?;
    (blob.diff_id == diff_id && root.blob_path(&blob.digest).is_file()).then_some(blob)
}

/// Makes (or finds) the gzip blob of a layer directory and stores it.
pub(crate) fn export_layer(root: &StateRoot, dir: &Path, clamp: Option<i64>) -> io::Result<LayerBlob> {
    let measured = write_tar(
        dir,
        Measure {
            hash: Sha256::new(),
            count: 0,
            limit: REUSE_LIMIT,
        },
        clamp,
    );
    if let Ok(m) = measured {
        let diff_id = format!("sha256:{}", hex::encode(m.hash.finalize()));
        if let Some(blob) = blob_of_diff_id(root, &diff_id) {
            return Ok(blob);
        }
    }
    let blob = compress_layer(root, dir, clamp)?;
    let record = serde_json::to_vec(&blob).map_err(io::Error::other)?;
    fs::create_dir_all(root.path().join("diffids"))?;
    crate::root::write_atomic(&diff_id_file(root, &blob.diff_id), &record, false)?;
    Ok(blob)
}

/// Writes the gzip blob of a layer directory into the store.
fn compress_layer(root: &StateRoot, dir: &Path, clamp: Option<i64>) -> io::Result<LayerBlob> {
    let tmp = root.temp_dir()?;
    let tmp_blob = tmp.join("blob");
    let file = fs::File::create(&tmp_blob)?;
    let compressed = HashingWriter {
        inner: io::BufWriter::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        count: 0,
    };
    let gz = GzEncoder::new(compressed, flate2::Compression::new(6));
    let plain = HashingWriter {
        inner: gz,
        hash: Sha256::new(),
        count: 0,
    };
    let plain = write_tar(dir, io::BufWriter::with_capacity(1 << 16, plain), clamp)?;
    let plain = plain.into_inner().map_err(|e| e.into_error())?;
    let diff_id = format!("sha256:{}", hex::encode(plain.hash.finalize()));
    let compressed = plain.inner.finish()?;
    let digest = format!("sha256:{}", hex::encode(compressed.hash.finalize()));
    let size = compressed.count;
    compressed.inner.into_inner().map_err(|e| e.into_error())?;
    let dest = root.blob_path(&digest);
    if !dest.exists() {
        fs::rename(&tmp_blob, &dest)?;
    }
    let _ = fs::remove_dir_all(&tmp);
    Ok(LayerBlob {
        digest,
        diff_id,
        size,
        media_type: GZIP_LAYER.to_string(),
    })
}

/// Unpacks an OCI layer tarball (gzip or plain) into a layer directory,
/// turning `.wh.` entries into overlayfs whiteouts. Returns its diff id.
pub(crate) fn unpack_layer<R: Read>(compressed: R, dest: &Path) -> io::Result<String> {
    unpack_counting(compressed, dest).map(|(diff_id, _)| diff_id)
}

/// [`unpack_layer`], also saying how many entries took the fast path.
fn unpack_counting<R: Read>(compressed: R, dest: &Path) -> io::Result<(String, usize)> {
    let mut reader = io::BufReader::with_capacity(1 << 16, compressed);
    let head = {
        use io::BufRead;
        reader.fill_buf()?.get(..2).map(|b| b.to_vec()).unwrap_or_default()
    };
    let plain: Box<dyn Read> = if head == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut hashing = HashingReader {
        inner: plain,
        hash: Sha256::new(),
    };
    let mut archive = tar::Archive::new(&mut hashing);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    let mut fast = FastUnpack::new(dest);
    let mut fast_entries = 0;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if let Some(hidden) = name.strip_prefix(".wh.").filter(|h| !h.starts_with(".wh.")) {
            fast.forget(&parent.join(hidden));
        }
        if name == ".wh..wh..opq" {
            let d = safe_join(dest, &parent)?;
            fs::create_dir_all(&d)?;
            rustix::fs::lsetxattr(&d, opaque_xattr(), b"y", rustix::fs::XattrFlags::empty())?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let d = safe_join(dest, &parent)?;
            fs::create_dir_all(&d)?;
            let target = d.join(hidden);
            let _ = crate::root::remove_all(&target);
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &target,
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::empty(),
                0,
            )?;
            continue;
        }
        if entry.header().entry_type().is_dir() {
            if let Ok(m) = entry.header().mtime() {
                dir_times.push((safe_join(dest, &path)?, m as i64));
            }
        }
        let header = entry.header();
        if let Some(e) = crate::rootless::unmapped_owner(
            header.uid().unwrap_or(0).try_into().unwrap_or(u32::MAX),
            header.gid().unwrap_or(0).try_into().unwrap_or(u32::MAX),
        ) {
            return Err(e);
        }
        if fast.unpack(&mut entry, &path)? {
            fast_entries += 1;
        } else {
            entry.unpack_in(dest)?;
            fast.forget(&path);
        }
    }
    // Drain what the tar reader left (padding) so the digest covers it all.
    io::copy(&mut hashing, &mut io::sink())?;
    for (d, t) in dir_times.into_iter().rev() {
        set_mtime_nofollow(&d, t, 0)?;
    }
    Ok((format!("sha256:{}", hex::encode(hashing.hash.finalize())), fast_entries))
}

/// What this unpack made at a path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Made {
    Dir,
    File,
    Other,
}

/// The common entries (directories, regular files, symlinks, hard links
/// to files of this layer) unpacked without the tar crate's per-component
/// checks: into a directory that was empty, every parent of an entry is a
/// directory this unpack made, so nothing can be written through a
/// symlink. Anything else (devices, fifos, a parent this unpack did not
/// make as a directory, a directory that was not empty) is left to
/// `Entry::unpack_in`, which checks every component.
struct FastUnpack<'a> {
    dest: &'a Path,
    /// None: the destination was not empty, so nothing is fast.
    made: Option<HashMap<PathBuf, Made>>,
    buf: Vec<u8>,
}

impl<'a> FastUnpack<'a> {
    fn new(dest: &'a Path) -> FastUnpack<'a> {
        let empty = fs::read_dir(dest).is_ok_and(|mut d| d.next().is_none());
        FastUnpack {
            dest,
            made: empty.then(HashMap::new),
            buf: vec![0; 1 << 16],
        }
    }

    /// Something else touched `rel`: not known any more (what was below it
    /// is unreachable: every use checks the whole chain of parents).
    fn forget(&mut self, rel: &Path) {
        if let (Some(made), Some(clean)) = (&mut self.made, clean_relative(rel)) {
            made.remove(&clean);
        }
    }

    /// Unpacks `entry` at `rel`; false when it is not a common entry (the
    /// caller unpacks it the careful way).
    fn unpack<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, rel: &Path) -> io::Result<bool> {
        let Some(made) = &mut self.made else { return Ok(false) };
        let Some(clean) = clean_relative(rel).filter(|c| !c.as_os_str().is_empty()) else {
            return Ok(false);
        };
        let header = entry.header();
        let kind = header.entry_type();
        let fast_kind = kind.is_dir() || kind.is_file() || kind.is_symlink() || kind.is_hard_link();
        if !fast_kind {
            return Ok(false);
        }
        // Every parent: a directory this unpack made, or missing (made now).
        let mut parent = PathBuf::new();
        let parents: Vec<&std::ffi::OsStr> = clean.iter().collect();
        for p in &parents[..parents.len() - 1] {
            parent.push(p);
            match made.get(&parent) {
                Some(Made::Dir) => {}
                Some(_) => return Ok(false),
                None => match fs::create_dir(self.dest.join(&parent)) {
                    Ok(()) => {
                        made.insert(parent.clone(), Made::Dir);
                    }
                    Err(_) => return Ok(false),
                },
            }
        }
        let target = self.dest.join(&clean);
        match made.get(&clean) {
            None => {}
            Some(Made::Dir) if kind.is_dir() => {}
            Some(Made::Dir) => return Ok(false),
            Some(_) => fs::remove_file(&target)?,
        }
        let mode = header.mode()? & 0o7777;
        let owner = crate::fsutil::Owner {
            uid: header.uid()?.try_into().unwrap_or(u32::MAX),
            gid: header.gid()?.try_into().unwrap_or(u32::MAX),
        };
        // As the tar crate: an mtime of 0 becomes 1 (some tools mistake 0 for unset).
        let mtime = (header.mtime()? as i64).max(1);
        let xattrs = pax_xattrs(entry)?;
        use std::os::unix::fs::PermissionsExt;
        // Something this unpack did not make is there (a whiteout, a parent
        // made by one): the careful path replaces it as the tar crate does.
        let exists = |e: &io::Error| e.kind() == io::ErrorKind::AlreadyExists;
        if kind.is_dir() {
            if made.get(&clean).is_none() {
                match fs::create_dir(&target) {
                    Ok(()) => {}
                    Err(e) if exists(&e) => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            // Owner and mode as the tar crate sets them (not xattrs, which it
            // sets on files only); the time is set at the end, with the others'.
            crate::fsutil::lchown(&target, owner)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
            made.insert(clean, Made::Dir);
            return Ok(true);
        }
        if kind.is_symlink() {
            if !xattrs.is_empty() {
                return Ok(false);
            }
            let Some(link) = entry.link_name()? else { return Ok(false) };
            match std::os::unix::fs::symlink(&link, &target) {
                Ok(()) => {}
                Err(e) if exists(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
            crate::fsutil::lchown(&target, owner)?;
            set_mtime_nofollow(&target, mtime, 0)?;
            made.insert(clean, Made::Other);
            return Ok(true);
        }
        if kind.is_hard_link() {
            let Some(link) = entry.link_name()? else { return Ok(false) };
            let Some(source) = clean_relative(&link) else { return Ok(false) };
            let parents_made = source
                .ancestors()
                .skip(1)
                .filter(|a| !a.as_os_str().is_empty())
                .all(|a| made.get(a) == Some(&Made::Dir));
            if made.get(&source) != Some(&Made::File) || !parents_made {
                return Ok(false);
            }
            match fs::hard_link(self.dest.join(&source), &target) {
                Ok(()) => {}
                Err(e) if exists(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
            made.insert(clean, Made::File);
            return Ok(true);
        }
        let mut file = match fs::OpenOptions::new().write(true).create_new(true).open(&target) {
            Ok(f) => f,
            Err(e) if exists(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        loop {
            let n = entry.read(&mut self.buf)?;
            if n == 0 {
                break;
            }
            file.write_all(&self.buf[..n])?;
        }
        // Owner first: a chown clears setuid bits and file capabilities.
        rustix::fs::fchown(
            &file,
            Some(rustix::process::Uid::from_raw(owner.uid)),
            Some(rustix::process::Gid::from_raw(owner.gid)),
        )?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        for (k, v) in &xattrs {
            rustix::fs::fsetxattr(&file, k.as_str(), v, rustix::fs::XattrFlags::empty())?;
        }
        let ts = rustix::fs::Timespec { tv_sec: mtime, tv_nsec: 0 };
        rustix::fs::futimens(
            &file,
            &rustix::fs::Timestamps {
                last_access: ts,
                last_modification: ts,
            },
        )?;
        made.insert(clean, Made::File);
        Ok(true)
    }
}

/// The `SCHILY.xattr.*` PAX records of an entry.
fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for e in exts {
            let e = e?;
            if let Ok(key) = e.key() {
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    out.push((name.to_string(), e.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(out)
}

struct HashingReader<R: Read> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A layer entry's path relative to the layer's root (`/` and `.` parts
/// dropped); `None` when it has a `..` part.
fn clean_relative(rel: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            std::path::Component::Normal(p) => out.push(p),
            std::path::Component::CurDir | std::path::Component::RootDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// `base/rel` with `..` parts refused.
fn safe_join(base: &Path, rel: &Path) -> io::Result<PathBuf> {
    clean_relative(rel)
        .map(|clean| {
            if clean.as_os_str().is_empty() {
                base.to_path_buf()
            } else {
                base.join(clean)
            }
        })
        .ok_or_else(|| io::Error::other(format!("layer entry escapes its root: {}", rel.display())))
}

/// Sets a path's mtime (and atime) without following a final symlink. A
/// failure is an error: an mtime left as "now" makes layers irreproducible.
pub(crate) fn set_mtime_nofollow(path: &Path, secs: i64, nanos: i64) -> io::Result<()> {
    let ts = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: nanos as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    rustix::fs::utimensat(rustix::fs::CWD, path, &times, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| io::Error::new(e.kind(), format!("setting the mtime of {}: {e}", path.display())))
}

/// `cap_net_raw=ep` as the kernel stores it (VFS_CAP_REVISION_2, effective),
/// for the tests of every path a file capability takes.
#[cfg(test)]
pub(crate) const CAP_NET_RAW_EP: [u8; 20] = [1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_capabilities_and_xattrs_round_trip_through_tar() {
        let src = tempfile::tempdir().expect("tmp");
        let ping = src.path().join("ping");
        fs::write(&ping, b"#!/bin/true").expect("write");
        // Owned by someone else: unpacking chowns it, which must not drop the capability.
        crate::fsutil::lchown(&ping, crate::fsutil::Owner { uid: 7, gid: 7 }).expect("chown");
        rustix::fs::lsetxattr(&ping, "security.capability", &CAP_NET_RAW_EP, rustix::fs::XattrFlags::empty())
            .expect("setting a file capability (needs root)");
        rustix::fs::lsetxattr(&ping, "trusted.overlay.origin", b"x", rustix::fs::XattrFlags::empty()).expect("trusted xattr");
        fs::hard_link(&ping, src.path().join("ping2")).expect("hard link");
        let tar = write_tar(src.path(), Vec::new(), None).expect("tar");
        let mut archive = tar::Archive::new(tar.as_slice());
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let keys: Vec<String> = entry
                .pax_extensions()
                .expect("pax")
                .expect("pax records")
                .map(|e| e.expect("record").key().expect("key").to_string())
                .collect();
            // The link's entry too: an unpacker that chowns the link keeps the capability.
            assert_eq!(keys, ["SCHILY.xattr.security.capability"], "overlayfs's own xattrs stay out");
        }
        let dest = tempfile::tempdir().expect("tmp");
        unpack_layer(tar.as_slice(), dest.path()).expect("unpack");
        for name in ["ping", "ping2"] {
            let mut value = [0u8; 64];
            let n = rustix::fs::lgetxattr(dest.path().join(name), "security.capability", &mut value[..]).expect("capability kept");
            assert_eq!(&value[..n], &CAP_NET_RAW_EP);
        }
        assert_eq!(fs::metadata(dest.path().join("ping2")).expect("link").nlink(), 2);
    }

    #[test]
    fn a_layer_with_the_tar_of_one_made_before_reuses_its_blob() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = StateRoot::open(&dir.path().join("root"), "runc").expect("root");
        let layer = dir.path().join("a");
        fs::create_dir_all(&layer).expect("mkdir");
        fs::write(layer.join("hello"), vec![7u8; 100_000]).expect("write");
        let first = export_layer(&root, &layer, None).expect("export");
        assert!(diff_id_file(&root, &first.diff_id).is_file(), "remembered by diff id");
        // The same files elsewhere (a step that re-ran): the remembered blob,
        // here swapped for another stored blob to show it is not remade.
        let other = crate::export::store_blob(&root, b"stand-in").expect("blob");
        let stand_in = LayerBlob {
            digest: other,
            ..first.clone()
        };
        fs::write(diff_id_file(&root, &first.diff_id), serde_json::to_vec(&stand_in).expect("json")).expect("index");
        let again = dir.path().join("b");
        fs::create_dir_all(&again).expect("mkdir");
        fs::copy(layer.join("hello"), again.join("hello")).expect("copy");
        let t = fs::metadata(layer.join("hello")).expect("stat").mtime();
        set_mtime_nofollow(
            &again.join("hello"),
            t,
            fs::metadata(layer.join("hello")).expect("stat").mtime_nsec(),
        )
        .expect("mtime");
        set_mtime_nofollow(
            &again,
            fs::metadata(&layer).expect("stat").mtime(),
            fs::metadata(&layer).expect("stat").mtime_nsec(),
        )
        .expect("mtime");
        assert_eq!(export_layer(&root, &again, None).expect("export"), stand_in);
        // A remembered blob that is gone is made again.
        fs::remove_file(root.blob_path(&stand_in.digest)).expect("rm");
        assert_eq!(export_layer(&root, &again, None).expect("export"), first);
    }

    #[test]
    fn whiteouts_round_trip_through_tar() {
        let src = tempfile::tempdir().expect("tmp");
        fs::create_dir(src.path().join("d")).expect("mkdir");
        fs::write(src.path().join("d/f"), b"hello").expect("write");
        std::os::unix::fs::symlink("d/f", src.path().join("link")).expect("symlink");
        let wh = src.path().join("gone");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &wh,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            0,
        )
        .expect("mknod (needs root)");
        let tar = write_tar(src.path(), Vec::new(), None).expect("tar");
        let names: Vec<String> = tar::Archive::new(tar.as_slice())
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry").path().expect("path").to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["d", ".wh.gone", "link", "d/f"]);
        let dest = tempfile::tempdir().expect("tmp");
        let diff_id = unpack_layer(tar.as_slice(), dest.path()).expect("unpack");
        assert_eq!(diff_id, format!("sha256:{}", hex::encode(Sha256::digest(&tar))));
        assert_eq!(fs::read(dest.path().join("d/f")).expect("read"), b"hello");
        assert!(is_whiteout(&fs::symlink_metadata(dest.path().join("gone")).expect("stat")));
        assert_eq!(fs::read_link(dest.path().join("link")).expect("readlink"), Path::new("d/f"));
    }

    /// A tar of every kind of entry, written entry by entry.
    fn every_kind_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str,
                       kind: tar::EntryType,
                       mode: u32,
                       owner: (u64, u64),
                       link: Option<&str>,
                       data: &[u8],
                       xattr: Option<(&str, &[u8])>| {
            if let Some((k, v)) = xattr {
                let key = format!("SCHILY.xattr.{k}");
                b.append_pax_extensions([(key.as_str(), v)]).expect("pax");
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(owner.0);
            h.set_gid(owner.1);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).expect("link name");
            }
            b.append_data(&mut h, path, data).expect("append");
        };
        use tar::EntryType as T;
        add("etc/", T::Directory, 0o755, (0, 0), None, b"", None);
        add("etc/passwd", T::Regular, 0o644, (0, 0), None, b"root:x:0:0\n", None);
        add(
            "usr/bin/ping",
            T::Regular,
            0o4755,
            (0, 0),
            None,
            b"ping",
            Some(("security.capability", &CAP_NET_RAW_EP)),
        );
        add("usr/bin/ping6", T::Link, 0o4755, (0, 0), Some("usr/bin/ping"), b"", None);
        add("usr/bin/sh", T::Symlink, 0o777, (0, 0), Some("busybox"), b"", None);
        add("home/app/", T::Directory, 0o2750, (1000, 1000), None, b"", None);
        add("home/app/notes", T::Regular, 0o600, (1000, 1000), None, b"v1", None);
        add("home/app/notes", T::Regular, 0o640, (1000, 1000), None, b"v2, replaced", None);
        add("tmp/", T::Directory, 0o1777, (0, 0), None, b"", None);
        add("run/fifo", T::Fifo, 0o600, (0, 0), None, b"", None);
        add("var/.wh.cache", T::Regular, 0o600, (0, 0), None, b"", None);
        add("opt/.wh..wh..opq", T::Regular, 0o600, (0, 0), None, b"", None);
        add("opt/tool", T::Regular, 0o755, (5, 6), None, b"tool", None);
        // A path whited out and then added again; an opaque marker before its directory's entry.
        add("srv/.wh.data", T::Regular, 0o600, (0, 0), None, b"", None);
        add("srv/data", T::Regular, 0o644, (0, 0), None, b"new", None);
        add("lib/.wh..wh..opq", T::Regular, 0o600, (0, 0), None, b"", None);
        add("lib/", T::Directory, 0o700, (0, 0), None, b"", None);
        b.into_inner().expect("tar")
    }

    /// Everything about each path below `dir`: kind, mode, owner, size, link, content, xattrs, mtime.
    fn describe(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
            let e = e.expect("walk");
            let m = fs::symlink_metadata(e.path()).expect("stat");
            let rel = e.path().strip_prefix(dir).expect("rel").display().to_string();
            let content = if m.is_file() {
                hex::encode(Sha256::digest(fs::read(e.path()).expect("read")))
            } else {
                String::new()
            };
            let link = fs::read_link(e.path()).map(|l| l.display().to_string()).unwrap_or_default();
            let mut xattrs = crate::fsutil::xattrs(e.path()).unwrap_or_default();
            xattrs.sort();
            let mtime = if m.is_dir() { 0 } else { m.mtime() };
            out.push(format!(
                "{rel} {:o} {}:{} {} {link} {content} {xattrs:?} {mtime} {}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.len(),
                m.nlink()
            ));
        }
        out
    }

    #[test]
    fn the_fast_unpack_makes_what_the_careful_one_makes() {
        let tar = every_kind_tar();
        let fast = tempfile::tempdir().expect("tmp");
        let (id_fast, n_fast) = unpack_counting(tar.as_slice(), fast.path()).expect("fast unpack");
        // A destination that is not empty takes the careful path for every entry.
        let careful = tempfile::tempdir().expect("tmp");
        fs::write(careful.path().join("marker"), b"").expect("marker");
        let (id_careful, n_careful) = unpack_counting(tar.as_slice(), careful.path()).expect("careful unpack");
        // Slow: the fifo, and opt/tool (its parent was made by the opaque whiteout, not as an entry).
        assert_eq!((n_fast, n_careful), (9, 0));
        assert_eq!(id_fast, id_careful);
        fs::remove_file(careful.path().join("marker")).expect("marker");
        let (a, b) = (describe(fast.path()), describe(careful.path()));
        assert_eq!(a, b);
        assert!(
            a.iter().any(|l| l.starts_with("usr/bin/ping 104755 0:0")),
            "setuid kept after the chown: {a:?}"
        );
        assert!(a.iter().any(|l| l.contains("security.capability")), "{a:?}");
        assert!(a.iter().any(|l| l.starts_with("home/app 42750 1000:1000")), "{a:?}");
    }

    #[test]
    fn the_fast_unpack_never_writes_through_a_symlink_or_out_of_its_root() {
        let outside = tempfile::tempdir().expect("tmp");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_link_name(outside.path()).expect("link");
        b.append_data(&mut h, "escape", &b""[..]).expect("append");
        let mut f = tar::Header::new_gnu();
        f.set_entry_type(tar::EntryType::Regular);
        f.set_size(3);
        f.set_mode(0o644);
        b.append_data(&mut f, "escape/pwned", &b"bad"[..]).expect("append");
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Link);
        l.set_size(0);
        l.set_link_name("escape/pwned").expect("link");
        b.append_data(&mut l, "hard", &b""[..]).expect("append");
        let tar = b.into_inner().expect("tar");
        let dest = tempfile::tempdir().expect("tmp");
        let _ = unpack_layer(tar.as_slice(), dest.path());
        assert!(!outside.path().join("pwned").exists(), "a file was written through the symlink");
    }
}
