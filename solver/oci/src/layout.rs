//! An OCI image layout directory: `oci-layout`, `index.json`, `blobs/sha256/…`.

use std::path::{Path, PathBuf};

use kiln_image::{ImageConfig, Platform};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// Why an image could not be read from a layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A document is not what it should be.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No manifest matches.
    #[error("{0}")]
    NotFound(String),
}

/// An image config found in a layout, with the manifest digest that pins it.
#[derive(Debug, Clone)]
pub struct ResolvedConfig {
    /// `sha256:…` of the manifest.
    pub manifest_digest: String,
    /// The config.
    pub config: ImageConfig,
}

/// An OCI image layout.
pub struct Layout {
    root: PathBuf,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<DescPlatform>,
}

#[derive(Deserialize)]
struct DescPlatform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: String,
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

impl Layout {
    /// Opens a layout directory (checks the `oci-layout` marker).
    pub fn open(root: impl Into<PathBuf>) -> Result<Layout, LayoutError> {
        let root = root.into();
        let marker = root.join("oci-layout");
        if !marker.is_file() {
            return Err(LayoutError::Invalid {
                path: root,
                message: "not an OCI image layout (no oci-layout file)".into(),
            });
        }
        Ok(Layout { root })
    }

    /// The layout's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn read(&self, path: PathBuf) -> Result<Vec<u8>, LayoutError> {
        std::fs::read(&path).map_err(|source| LayoutError::Io { path, source })
    }

    /// Reads a blob and checks its digest.
    pub fn blob(&self, digest: &str) -> Result<Vec<u8>, LayoutError> {
        let hex = digest.strip_prefix("sha256:").ok_or_else(|| LayoutError::Invalid {
            path: self.root.clone(),
            message: format!("unsupported digest {digest}"),
        })?;
        let path = self.root.join("blobs/sha256").join(hex);
        let bytes = self.read(path.clone())?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != hex {
            return Err(LayoutError::Invalid {
                path,
                message: format!("content has digest sha256:{actual}, expected {digest}"),
            });
        }
        Ok(bytes)
    }

    fn json<T: for<'de> Deserialize<'de>>(&self, bytes: &[u8], what: &str) -> Result<T, LayoutError> {
        serde_json::from_slice(bytes).map_err(|e| LayoutError::Invalid {
            path: self.root.clone(),
            message: format!("bad {what}: {e}"),
        })
    }

    /// Resolves the image tagged `tag` (any image when `tag` is None and there is one) for `platform`.
    pub fn resolve(&self, tag: Option<&str>, platform: &Platform) -> Result<ResolvedConfig, LayoutError> {
        let index = self.index()?;
        let candidates = self.tagged(&index, tag)?;
        let desc = match candidates.as_slice() {
            [one] => *one,
            many => many.iter().find(|d| platform_matches(d, platform)).copied().unwrap_or(many[0]),
        };
        self.resolve_descriptor(desc, platform)
    }

    /// The digest of the manifest tagged `tag` (the only one when `tag` is None).
    pub fn manifest_digest(&self, tag: Option<&str>) -> Result<String, LayoutError> {
        let index = self.index()?;
        match self.tagged(&index, tag)?.as_slice() {
            [one] => Ok(one.digest.clone()),
            _ => Err(LayoutError::NotFound(format!(
                "{} holds several manifests; name one with :TAG or @sha256:…",
                self.root.display()
            ))),
        }
    }

    fn index(&self) -> Result<Index, LayoutError> {
        self.json(&self.read(self.root.join("index.json"))?, "index.json")
    }

    /// The index entries tagged `tag` (all of them for None); none is an error listing the tags.
    fn tagged<'i>(&self, index: &'i Index, tag: Option<&str>) -> Result<Vec<&'i Descriptor>, LayoutError> {
        let found: Vec<&Descriptor> = match tag {
            Some(t) => index
                .manifests
                .iter()
                .filter(|d| {
                    d.annotations
                        .get(REF_NAME)
                        .is_some_and(|r| r == t || r.rsplit(':').next() == Some(t))
                })
                .collect(),
            None => index.manifests.iter().collect(),
        };
        if found.is_empty() {
            let tags: Vec<&str> = index
                .manifests
                .iter()
                .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
                .collect();
            return Err(LayoutError::NotFound(format!(
                "no image tagged {:?} in {} (tags: {})",
                tag.unwrap_or(""),
                self.root.display(),
                tags.join(", ")
            )));
        }
        Ok(found)
    }

    fn resolve_descriptor(&self, desc: &Descriptor, platform: &Platform) -> Result<ResolvedConfig, LayoutError> {
        let bytes = self.blob(&desc.digest)?;
        let is_index = desc.media_type.contains("index") || desc.media_type.contains("manifest.list");
        if is_index {
            let index: Index = self.json(&bytes, "image index")?;
            let child = index.manifests.iter().find(|d| platform_matches(d, platform)).ok_or_else(|| {
                LayoutError::NotFound(format!(
                    "image index {} has no manifest for {}",
                    desc.digest,
                    platform.to_string_form()
                ))
            })?;
            return self.resolve_descriptor(child, platform);
        }
        let manifest: Manifest = self.json(&bytes, "manifest")?;
        let config_bytes = self.blob(&manifest.config.digest)?;
        let config: ImageConfig = self.json(&config_bytes, "image config")?;
        Ok(ResolvedConfig {
            manifest_digest: desc.digest.clone(),
            config,
        })
    }
}

fn platform_matches(d: &Descriptor, p: &Platform) -> bool {
    d.platform
        .as_ref()
        .is_none_or(|dp| dp.os == p.os && dp.architecture == p.architecture && (p.variant.is_empty() || dp.variant == p.variant))
}
