//! Manifest and index documents as kiln reads them (the fields it uses of
//! OCI and Docker v2 manifests, indexes and manifest lists), and picking a
//! platform's manifest from an index.

use kiln_image::Platform;
use serde::Deserialize;

/// A manifest or an index: an index has `manifests`, a manifest `config` and `layers`.
#[derive(Debug, Clone, Deserialize)]
pub struct Document {
    /// Its media type, if it says.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// Index entries.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    /// A manifest's config.
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// A manifest's layers, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    /// `sha256:…`.
    pub digest: String,
    /// Size in bytes.
    #[serde(default)]
    pub size: i64,
    /// Media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// An index entry's platform.
    #[serde(default)]
    pub platform: Option<DescriptorPlatform>,
}

/// The platform of an index entry.
#[derive(Debug, Clone, Deserialize)]
pub struct DescriptorPlatform {
    /// `os`.
    pub os: String,
    /// `architecture`.
    pub architecture: String,
    /// `variant`.
    #[serde(default)]
    pub variant: String,
}

impl Document {
    /// Whether this is a manifest (not an index).
    pub fn is_manifest(&self) -> bool {
        self.config.is_some()
    }

    /// The index entry for `platform` (a wanted variant must match; none asked matches any).
    pub fn entry_for(&self, platform: &Platform) -> Option<&Descriptor> {
        self.manifests.iter().find(|m| {
            m.platform.as_ref().is_some_and(|p| {
                p.os == platform.os
                    && p.architecture == platform.architecture
                    && (platform.variant.is_empty() || p.variant == platform.variant)
            })
        })
    }

    /// The platforms an index offers, `os/arch`, for error messages.
    pub fn platforms(&self) -> Vec<String> {
        self.manifests
            .iter()
            .filter_map(|m| m.platform.as_ref().map(|p| format!("{}/{}", p.os, p.architecture)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_platform_entry() {
        let doc: Document = serde_json::from_str(
            r#"{"manifests":[{"digest":"sha256:a","platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
                              {"digest":"sha256:b","platform":{"os":"linux","architecture":"amd64"}}]}"#,
        )
        .expect("json");
        assert!(!doc.is_manifest());
        assert_eq!(doc.entry_for(&Platform::linux_amd64()).map(|d| d.digest.as_str()), Some("sha256:b"));
        let arm = Platform::parse("linux/arm64/v7").expect("platform");
        assert!(doc.entry_for(&arm).is_none());
        assert_eq!(doc.platforms(), ["linux/arm64", "linux/amd64"]);
    }
}
