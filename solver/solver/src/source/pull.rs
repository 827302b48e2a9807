//! Image sources: `docker-image://` (kiln's store first, then the registry)
//! and `oci-layout://PATH@DIGEST`. Manifests and layers are verified
//! against their digests; each layer is unpacked once into a snapshot named
//! after its blob, shared by every image that has it.

use std::fs;
use std::path::{Path, PathBuf};

use kiln_oci::document::Document;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::error::Failure;
use crate::root::StateRoot;
use crate::snapshot::layer::unpack_layer;
use crate::snapshot::{write_layer_blob, LayerBlob, NewLayer};

/// Where an image comes from.
#[derive(Debug, Clone)]
pub(crate) enum ImageLocation {
    /// A registry reference (normalized, maybe with `@digest`).
    Registry(String),
    /// An OCI layout directory.
    Layout(PathBuf),
}

/// An image source to pull.
#[derive(Debug, Clone)]
pub(crate) struct ImageSource {
    /// Where it is.
    pub location: ImageLocation,
    /// The pinned digest (index or manifest), if any.
    pub digest: Option<String>,
}

impl ImageSource {
    /// The image as the user named it.
    pub(crate) fn name(&self) -> String {
        match &self.location {
            ImageLocation::Registry(r) => r.clone(),
            ImageLocation::Layout(dir) => format!("oci-layout://{}", dir.display()),
        }
    }

    /// A failure to resolve or pull this image.
    fn refused(&self, message: impl std::fmt::Display) -> Failure {
        Failure::Registry {
            image: self.name(),
            message: message.to_string(),
        }
    }
}

/// Parses a SourceOp identifier of an image.
pub(crate) fn parse_identifier(identifier: &str) -> Option<ImageSource> {
    if let Some(rest) = identifier.strip_prefix("docker-image://") {
        let digest = rest.split_once('@').map(|(_, d)| d.to_string());
        return Some(ImageSource {
            location: ImageLocation::Registry(rest.to_string()),
            digest,
        });
    }
    if let Some(rest) = identifier.strip_prefix("oci-layout://") {
        let (path, digest) = match rest.rsplit_once('@') {
            Some((p, d)) => (p, Some(d.to_string())),
            None => (rest, None),
        };
        return Some(ImageSource {
            location: ImageLocation::Layout(PathBuf::from(path)),
            digest,
        });
    }
    None
}

#[derive(Deserialize)]
struct ConfigDoc {
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Progress of a pull, for events.
pub(crate) trait PullProgress: Send + Sync {
    /// A layer starts (`done = false`) or is ready (`done = true`).
    fn layer(&self, digest: &str, size: u64, done: bool);
}

fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Fetches a blob's bytes (small documents) into the store and returns them.
async fn document(
    root: &StateRoot,
    registry: &kiln_oci::RegistryClient,
    src: &ImageSource,
    digest: &str,
    manifest: bool,
) -> Result<Vec<u8>, Failure> {
    let stored = root.blob_path(digest);
    if let Ok(bytes) = fs::read(&stored) {
        if sha256_of(&bytes) == digest {
            return Ok(bytes);
        }
    }
    let bytes = match &src.location {
        ImageLocation::Layout(dir) => {
            let hex = digest
                .strip_prefix("sha256:")
                .ok_or_else(|| src.refused(format!("unsupported digest {digest}")))?;
            let path = dir.join("blobs/sha256").join(hex);
            fs::read(&path).map_err(Failure::io(Some("reading"), path.display()))?
        }
        ImageLocation::Registry(reference) => {
            if manifest {
                registry.fetch_manifest(reference, digest).await.map_err(|e| src.refused(e))?
            } else {
                let tmp = root.temp_dir().map_err(temp(root))?;
                let file = tmp.join("blob");
                let r = registry.fetch_blob(reference, digest, -1, &file).await;
                let bytes = r
                    .map_err(|e| src.refused(e))
                    .and_then(|()| fs::read(&file).map_err(Failure::io(Some("reading"), file.display())));
                let _ = fs::remove_dir_all(&tmp);
                bytes?
            }
        }
    };
    if sha256_of(&bytes) != digest {
        return Err(src.refused(format!("content of {digest} does not match its digest")));
    }
    crate::root::write_atomic(&stored, &bytes, false).map_err(Failure::io(Some("writing"), stored.display()))?;
    Ok(bytes)
}

/// The media type of a manifest or index document.
pub(crate) fn media_type_of(bytes: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Typed {
        #[serde(rename = "mediaType", default)]
        media_type: String,
        #[serde(default)]
        manifests: Option<Vec<serde_json::Value>>,
    }
    match serde_json::from_slice::<Typed>(bytes) {
        Ok(t) if !t.media_type.is_empty() => t.media_type,
        Ok(t) if t.manifests.is_some() => "application/vnd.oci.image.index.v1+json".into(),
        _ => crate::export::MANIFEST.into(),
    }
}

/// The resolved manifest of an image for a platform.
pub(crate) struct PulledImage {
    /// Layer snapshot ids, bottom first.
    pub layers: Vec<String>,
}

/// The snapshot id of a layer blob.
pub(crate) fn layer_id_for_blob(digest: &str) -> String {
    format!("blob-{}", digest.strip_prefix("sha256:").unwrap_or(digest))
}

/// Resolves an unpinned source to a digest (registry tag or layout index).
pub(crate) async fn pin(
    registry: &kiln_oci::RegistryClient,
    src: &ImageSource,
    platform: &kiln_image::Platform,
) -> Result<String, Failure> {
    if let Some(d) = &src.digest {
        return Ok(d.clone());
    }
    match &src.location {
        ImageLocation::Registry(r) => registry
            .resolve(r, platform)
            .await
            .map(|c| c.manifest_digest)
            .map_err(|e| src.refused(e)),
        ImageLocation::Layout(dir) => kiln_oci::Layout::open(dir)
            .and_then(|l| l.resolve(None, platform))
            .map(|c| c.manifest_digest)
            .map_err(|e| src.refused(e)),
    }
}

/// Pulls the image's `platform` manifest and makes sure every layer is unpacked.
pub(crate) async fn pull(
    root: &StateRoot,
    registry: &kiln_oci::RegistryClient,
    src: &ImageSource,
    digest: &str,
    platform: &kiln_image::Platform,
    progress: &dyn PullProgress,
) -> Result<PulledImage, Failure> {
    let top = document(root, registry, src, digest, true).await?;
    let mut doc: Document = serde_json::from_slice(&top).map_err(|e| src.refused(format!("manifest {digest}: {e}")))?;
    if !doc.is_manifest() {
        let entry = doc.entry_for(platform).ok_or_else(|| {
            src.refused(format!(
                "image {digest} has no manifest for {} (it has: {})",
                platform.to_string_form(),
                doc.platforms().join(", ")
            ))
        })?;
        let child = entry.digest.clone();
        let bytes = document(root, registry, src, &child, true).await?;
        doc = serde_json::from_slice(&bytes).map_err(|e| src.refused(format!("manifest {child}: {e}")))?;
    }
    let config = doc
        .config
        .clone()
        .ok_or_else(|| src.refused(format!("manifest {digest} has no config")))?;
    let config_bytes = document(root, registry, src, &config.digest, false).await?;
    let config_doc: ConfigDoc =
        serde_json::from_slice(&config_bytes).map_err(|e| src.refused(format!("image config {}: {e}", config.digest)))?;
    let diff_ids = config_doc.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != doc.layers.len() {
        return Err(src.refused(format!(
            "image config {} lists {} layers, the manifest {}",
            config.digest,
            diff_ids.len(),
            doc.layers.len()
        )));
    }
    let mut layers = Vec::new();
    for (desc, diff_id) in doc.layers.iter().zip(diff_ids) {
        let id = layer_id_for_blob(&desc.digest);
        layers.push(id.clone());
        if root.snapshot_dir(&id).join("fs").is_dir() {
            continue;
        }
        progress.layer(&desc.digest, desc.size.max(0) as u64, false);
        let blob = root.blob_path(&desc.digest);
        if !blob.is_file() {
            let tmp = root.temp_dir().map_err(temp(root))?;
            let part = tmp.join("blob");
            match &src.location {
                ImageLocation::Registry(r) => registry
                    .fetch_blob(r, &desc.digest, desc.size, &part)
                    .await
                    .map_err(|e| src.refused(e))?,
                ImageLocation::Layout(dir) => {
                    let hex = desc.digest.strip_prefix("sha256:").unwrap_or(&desc.digest);
                    let path = dir.join("blobs/sha256").join(hex);
                    fs::copy(&path, &part).map_err(Failure::io(Some("reading"), path.display()))?;
                    let actual = file_digest(&part).map_err(Failure::io(Some("reading"), part.display()))?;
                    if actual != desc.digest {
                        return Err(src.refused(format!("layer {} in {} has digest {actual}", desc.digest, dir.display())));
                    }
                }
            }
            fs::rename(&part, &blob).map_err(Failure::io(Some("storing"), blob.display()))?;
            let _ = fs::remove_dir_all(&tmp);
            if let ImageLocation::Registry(r) = &src.location {
                let _ = kiln_oci::record_blob_source(root.path(), &desc.digest, repository_of(r));
            }
        }
        let media_type = if desc.media_type.is_empty() {
            crate::snapshot::layer::GZIP_LAYER.to_string()
        } else {
            desc.media_type.clone()
        };
        let layer_blob = LayerBlob {
            digest: desc.digest.clone(),
            diff_id,
            size: desc.size.max(0) as u64,
            media_type,
        };
        tokio::task::block_in_place(|| unpack_blob(root, &layer_blob)).map_err(|e| match e {
            Unpack::Refused(why) => src.refused(why),
            Unpack::Failed(f) => f,
        })?;
        progress.layer(&desc.digest, desc.size.max(0) as u64, true);
    }
    remember_tag(root, src, digest)?;
    Ok(PulledImage { layers })
}

/// `registry/repository` of a reference, its tag and digest dropped.
pub(crate) fn repository_of(reference: &str) -> &str {
    let repo = reference.split('@').next().unwrap_or(reference);
    match repo.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => repo,
    }
}

/// Why a blob did not become a layer.
pub(crate) enum Unpack {
    /// The blob is not what it says (its content or diff id).
    Refused(String),
    /// The state root failed.
    Failed(Failure),
}

/// Unpacks a layer blob already in the store (digest checked) into the
/// snapshot named after it ([`layer_id_for_blob`]), checking that it
/// unpacks to its diff id; a snapshot another solver made meanwhile is kept.
pub(crate) fn unpack_blob(root: &StateRoot, blob: &LayerBlob) -> Result<(), Unpack> {
    let id = layer_id_for_blob(&blob.digest);
    let final_dir = root.snapshot_dir(&id);
    if final_dir.join("fs").is_dir() {
        return Ok(());
    }
    root.fetch_blob(&blob.digest)
        .map_err(|e| Unpack::Refused(format!("fetching layer {}: {e}", blob.digest)))?;
    let layer = NewLayer::create(root).map_err(|e| Unpack::Failed(Failure::new_layer(root)(e)))?;
    let path = root.blob_path(&blob.digest);
    let got = fs::File::open(&path)
        .and_then(|f| unpack_layer(f, &layer.fs()))
        .map_err(|e| Unpack::Refused(format!("unpacking layer {}: {e}", blob.digest)))?;
    if got != blob.diff_id {
        return Err(Unpack::Refused(format!(
            "layer {} unpacks to {got}, not {}",
            blob.digest, blob.diff_id
        )));
    }
    if final_dir.is_dir() {
        // Adopted lazily before ([`adopt_blob`]): its files go in now.
        return match fs::rename(layer.fs(), final_dir.join("fs")) {
            Ok(()) => Ok(()),
            Err(_) if final_dir.join("fs").is_dir() => Ok(()), // another solver unpacked it meanwhile
            Err(e) => Err(Unpack::Failed(Failure::commit_layer(root)(e))),
        };
    }
    match layer.commit_as(root, &id) {
        Ok(()) => {}
        Err(_) if final_dir.join("fs").is_dir() => {} // another solver unpacked it meanwhile
        Err(e) => return Err(Unpack::Failed(Failure::commit_layer(root)(e))),
    }
    write_layer_blob(root, &id, None, blob).map_err(|e| Unpack::Failed(Failure::io(Some("recording the blob of"), final_dir.display())(e)))
}

/// Makes a layer of a blob in the store or offered by a cache, without
/// unpacking it: its snapshot holds the blob's record and no files until
/// something mounts it ([`crate::snapshot::ensure_files`] fetches the blob
/// if needed and unpacks it then, checking digest and diff id). A cache
/// hit whose layers no step reads, only the exporter, is never unpacked.
pub(crate) fn adopt_blob(root: &StateRoot, blob: &LayerBlob) -> std::io::Result<()> {
    let id = layer_id_for_blob(&blob.digest);
    let dir = root.snapshot_dir(&id);
    if dir.join("fs").is_dir() || crate::snapshot::read_layer_blob(root, &id, None).is_some() {
        return Ok(());
    }
    fs::create_dir_all(&dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    fs::write(dir.join("created"), now.to_string())?;
    write_layer_blob(root, &id, None, blob)
}

/// Records a registry image's tag in kiln's store, so later builds find it
/// there without a registry round trip (`kiln build --pull` asks again).
pub(crate) fn remember_tag(root: &StateRoot, src: &ImageSource, digest: &str) -> Result<(), Failure> {
    let ImageLocation::Registry(reference) = &src.location else {
        return Ok(());
    };
    let name = reference.split('@').next().unwrap_or(reference);
    let tagged = name.rsplit('/').next().is_some_and(|last| last.contains(':'));
    if !tagged {
        return Ok(());
    }
    let Ok(top) = fs::read(root.blob_path(digest)) else { return Ok(()) };
    crate::export::store_names(root, &[name.to_string()], digest, &media_type_of(&top), top.len(), None)
}

/// Maps an error making a temporary directory in `root`.
fn temp(root: &StateRoot) -> impl FnOnce(std::io::Error) -> Failure + '_ {
    Failure::io(Some("making a directory in"), root.path().display())
}

pub(crate) fn file_digest(path: &Path) -> std::io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}
