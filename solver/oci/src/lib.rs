//! OCI images: reading an OCI image layout (and kiln's image store, which is
//! one) or a distribution registry to resolve an image's config for a platform.
//!
//! Shared by the CLI's frontend host and the solver, as is the registry
//! client ([`registry`]).

pub mod artifact;
pub mod cacheconfig;
pub mod document;
pub mod layout;
pub mod registry;

pub use layout::{Layout, LayoutError, ResolvedConfig};
pub use registry::{Credentials, PushBlob, PushReport, RegistryClient, RegistryError};

use std::path::Path;

/// Remembers which `registry/repository` a blob was pulled from (under
/// `ROOT/blob-sources/`), so a push to another repository of the same
/// registry can mount it instead of uploading it.
pub fn record_blob_source(root: &Path, digest: &str, source: &str) -> std::io::Result<()> {
    let dir = root.join("blob-sources");
    std::fs::create_dir_all(&dir)?;
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let tmp = dir.join(format!(".{hex}.{}", std::process::id()));
    std::fs::write(&tmp, source)?;
    std::fs::rename(tmp, dir.join(hex))
}

/// Where a blob was pulled from, if recorded.
pub fn blob_source(root: &Path, digest: &str) -> Option<String> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    std::fs::read_to_string(root.join("blob-sources").join(hex)).ok()
}

/// Pushes the image whose manifest or index `digest` is in kiln's store
/// (`ROOT/store`) to `reference`. An index goes with every manifest it
/// lists, each pushed by digest before the index takes the tag; a blob
/// shared by platforms is sent once (the second finds it there).
pub async fn push_from_store(client: &RegistryClient, root: &Path, digest: &str, reference: &str) -> Result<PushReport, RegistryError> {
    let (bytes, doc) = read_document(root, digest)?;
    if doc.is_manifest() {
        return push_manifest(client, root, &bytes, &doc, reference).await;
    }
    let repository = reference
        .parse::<oci_client::Reference>()
        .map_err(|e| RegistryError::Invalid(format!("{reference}: {e}")))?;
    let mut report = PushReport::default();
    for entry in &doc.manifests {
        let (m_bytes, m_doc) = read_document(root, &entry.digest)?;
        let by_digest = format!("{}/{}@{}", repository.registry(), repository.repository(), entry.digest);
        let r = push_manifest(client, root, &m_bytes, &m_doc, &by_digest).await?;
        report.uploaded += r.uploaded;
        report.existing += r.existing;
        report.mounted += r.mounted;
    }
    let media_type = if doc.media_type.is_empty() {
        "application/vnd.oci.image.index.v1+json"
    } else {
        doc.media_type.as_str()
    };
    client.push(reference, &[], &bytes, media_type).await?;
    Ok(report)
}

/// A manifest or index of the store, parsed.
fn read_document(root: &Path, digest: &str) -> Result<(Vec<u8>, document::Document), RegistryError> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let bytes = std::fs::read(root.join("store/blobs/sha256").join(hex))
        .map_err(|e| RegistryError::Invalid(format!("manifest {digest} is not in kiln's store: {e}")))?;
    let doc = serde_json::from_slice(&bytes).map_err(|e| RegistryError::Invalid(format!("manifest {digest}: {e}")))?;
    Ok((bytes, doc))
}

/// Pushes one image manifest with its config and layers.
async fn push_manifest(
    client: &RegistryClient,
    root: &Path,
    bytes: &[u8],
    manifest: &document::Document,
    reference: &str,
) -> Result<PushReport, RegistryError> {
    let blobs_dir = root.join("store/blobs/sha256");
    let path_of = |d: &str| blobs_dir.join(d.strip_prefix("sha256:").unwrap_or(d));
    let config = manifest
        .config
        .as_ref()
        .ok_or_else(|| RegistryError::Invalid(format!("{reference} is not an image manifest")))?;
    let mut blobs = Vec::new();
    for d in manifest.layers.iter().chain(std::iter::once(config)) {
        blobs.push(PushBlob {
            digest: d.digest.clone(),
            path: path_of(&d.digest),
            size: d.size.max(0) as u64,
            source: blob_source(root, &d.digest),
        });
    }
    let media_type = if manifest.media_type.is_empty() {
        "application/vnd.oci.image.manifest.v1+json"
    } else {
        manifest.media_type.as_str()
    };
    client.push(reference, &blobs, bytes, media_type).await
}
