//! WASM modules shipped as OCI artifacts, in the CNCF "wasm OCI artifact"
//! layout: a manifest whose config has media type
//! `application/vnd.wasm.config.v0+json` and whose one layer is the module
//! (`application/wasm`; the older `application/vnd.wasm.content.layer.v1+wasm`
//! is accepted too). Every byte is checked against its digest.

use sha2::{Digest as _, Sha256};

use crate::document::Document;
use crate::{Layout, RegistryClient};

/// The config media type of a wasm artifact.
pub const WASM_CONFIG_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// The layer media type of the module.
pub const WASM_LAYER_TYPE: &str = "application/wasm";
/// The layer media type used by wasm-to-oci, also accepted.
pub const WASM_LAYER_TYPE_LEGACY: &str = "application/vnd.wasm.content.layer.v1+wasm";

/// A module fetched from an artifact.
#[derive(Debug, Clone)]
pub struct WasmArtifact {
    /// The manifest's digest (what pins the reference).
    pub manifest_digest: String,
    /// The module's digest.
    pub module_digest: String,
    /// The module.
    pub module: Vec<u8>,
}

/// The module's descriptor in a wasm artifact manifest: (digest, size).
pub fn module_layer(manifest: &[u8]) -> Result<(String, i64), String> {
    let doc: Document = serde_json::from_slice(manifest).map_err(|e| format!("not a manifest: {e}"))?;
    if !doc.is_manifest() {
        return Err("it is an image index, not a wasm artifact manifest".into());
    }
    let config_type = doc.config.as_ref().map(|c| c.media_type.as_str()).unwrap_or("");
    let modules: Vec<_> = doc
        .layers
        .iter()
        .filter(|l| l.media_type == WASM_LAYER_TYPE || l.media_type == WASM_LAYER_TYPE_LEGACY)
        .collect();
    match modules.as_slice() {
        [one] => Ok((one.digest.clone(), one.size)),
        [] => Err(format!(
            "not a wasm artifact: config {config_type:?}, no layer of type {WASM_LAYER_TYPE} (expected config {WASM_CONFIG_TYPE})"
        )),
        _ => Err("the artifact has several wasm layers; a frontend plugin is one module".into()),
    }
}

fn check(bytes: &[u8], digest: &str) -> Result<(), String> {
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    if actual != digest {
        return Err(format!("the module has digest {actual}, the manifest says {digest}"));
    }
    Ok(())
}

/// Fetches the module of the artifact `reference` (a normalized registry reference).
pub async fn from_registry(client: &RegistryClient, reference: &str, scratch: &std::path::Path) -> Result<WasmArtifact, String> {
    let (manifest, manifest_digest) = client.fetch_top_manifest(reference).await.map_err(|e| e.to_string())?;
    let (module_digest, size) = module_layer(&manifest)?;
    client
        .fetch_blob(reference, &module_digest, size, scratch)
        .await
        .map_err(|e| e.to_string())?;
    let module = std::fs::read(scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let _ = std::fs::remove_file(scratch);
    check(&module, &module_digest)?;
    Ok(WasmArtifact {
        manifest_digest,
        module_digest,
        module,
    })
}

/// Reads the module of the artifact tagged `tag` (or pinned by `digest`) in an OCI layout.
pub fn from_layout(layout: &Layout, tag: Option<&str>, digest: Option<&str>) -> Result<WasmArtifact, String> {
    let manifest_digest = match digest {
        Some(d) => d.to_string(),
        None => layout.manifest_digest(tag).map_err(|e| e.to_string())?,
    };
    let manifest = layout.blob(&manifest_digest).map_err(|e| e.to_string())?;
    let (module_digest, _) = module_layer(&manifest)?;
    let module = layout.blob(&module_digest).map_err(|e| e.to_string())?;
    check(&module, &module_digest)?;
    Ok(WasmArtifact {
        manifest_digest,
        module_digest,
        module,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_layer_is_found_by_media_type() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"{WASM_CONFIG_TYPE}","digest":"sha256:c","size":2}},
            "layers":[{{"mediaType":"{WASM_LAYER_TYPE}","digest":"sha256:m","size":9}}]}}"#
        );
        assert_eq!(module_layer(m.as_bytes()), Ok(("sha256:m".to_string(), 9)));
    }

    #[test]
    fn an_image_is_not_a_wasm_artifact() {
        let m = r#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:c","size":2},
            "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:l","size":9}]}"#;
        let err = module_layer(m.as_bytes()).expect_err("an image");
        assert!(err.contains("not a wasm artifact"), "{err}");
    }
}
