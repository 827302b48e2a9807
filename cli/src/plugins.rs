//! Finding WASM frontend plugins: `.wasm` files, the plugin directories, and
//! OCI artifacts (pulled once into the state root, digest-verified, reused
//! by later builds without asking the registry unless `--pull`).

use std::path::{Path, PathBuf};

use kiln_oci::{artifact, Credentials, Layout, RegistryClient};
use sha2::{Digest, Sha256};

/// Directories searched for `NAME.wasm`: `$KILN_FRONTEND_PATH` (a PATH-like
/// list), then `$XDG_CONFIG_HOME/kiln/frontends` or `~/.config/kiln/frontends`.
pub fn plugin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("KILN_FRONTEND_PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(c) = config {
        dirs.push(c.join("kiln/frontends"));
    }
    dirs
}

/// Where the plugin cache lives: modules by digest, references by name, compiled code.
pub struct PluginCache {
    dir: PathBuf,
}

impl PluginCache {
    /// The cache under the state root.
    pub fn new(root: &Path) -> PluginCache {
        PluginCache { dir: root.join("plugins") }
    }

    /// Where compiled modules are kept.
    pub fn compiled_dir(&self) -> PathBuf {
        self.dir.join("compiled")
    }

    fn module_path(&self, digest: &str) -> PathBuf {
        self.dir.join("modules").join(digest.replace(':', "-"))
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        self.dir.join("refs").join(hex::encode(Sha256::digest(reference.as_bytes())))
    }

    /// A module already in the cache, checked against its digest.
    fn cached_module(&self, digest: &str) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.module_path(digest)).ok()?;
        (format!("sha256:{}", hex::encode(Sha256::digest(&bytes))) == digest).then_some(bytes)
    }

    fn store(&self, reference: &str, found: &artifact::WasmArtifact) -> std::io::Result<()> {
        write_atomically(&self.module_path(&found.module_digest), &found.module)?;
        write_atomically(&self.ref_path(reference), found.module_digest.as_bytes())
    }

    /// The cached file of the module `digest` (`module`, already verified),
    /// written there if it is not.
    pub fn module_file(&self, digest: &str, module: &[u8]) -> Result<PathBuf, String> {
        let path = self.module_path(digest);
        if !path.is_file() {
            write_atomically(&path, module).map_err(|e| format!("caching the plugin: {e}"))?;
        }
        Ok(path)
    }

    /// The module of the artifact `reference`: `oci-layout://PATH[:TAG|@DIGEST]`
    /// or a registry reference. A reference seen before is served from the
    /// cache (for a tag, unless `refresh`); a registry is asked otherwise.
    pub fn fetch(&self, reference: &str, refresh: bool) -> Result<(String, Vec<u8>), String> {
        if let Some(rest) = reference.strip_prefix("oci-layout://") {
            // A local layout is cheap to read and may change: read it every time.
            let (path, tag, digest) = split_layout_reference(rest);
            let layout = Layout::open(path).map_err(|e| e.to_string())?;
            let found = artifact::from_layout(&layout, tag, digest)?;
            let _ = self.store(reference, &found);
            return Ok((found.module_digest, found.module));
        }
        let parsed = kiln_image::Reference::parse(reference).map_err(|e| format!("{reference}: {e}"))?;
        let normalized = parsed.normalized();
        let pinned = normalized.contains("@sha256:");
        if !refresh || pinned {
            if let Ok(digest) = std::fs::read_to_string(self.ref_path(&normalized)) {
                if let Some(module) = self.cached_module(digest.trim()) {
                    return Ok((digest.trim().to_string(), module));
                }
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the registry client: {e}"))?;
        let client = RegistryClient::new(Credentials::from_docker_config());
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let scratch = self.dir.join(format!("download.{}", std::process::id()));
        let found = runtime
            .block_on(artifact::from_registry(&client, &normalized, &scratch))
            .map_err(|e| format!("{normalized}: {e}"))?;
        self.store(&normalized, &found).map_err(|e| format!("caching the plugin: {e}"))?;
        Ok((found.module_digest, found.module))
    }
}

/// `PATH[:TAG]` or `PATH@sha256:…` of an `oci-layout://` reference.
fn split_layout_reference(rest: &str) -> (&str, Option<&str>, Option<&str>) {
    if let Some((path, digest)) = rest.split_once('@') {
        return (path, None, Some(digest));
    }
    match rest.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') && !path.is_empty() => (path, Some(tag), None),
        _ => (rest, None, None),
    }
}

/// Writes `bytes` to `path` through a temporary file renamed into place, so
/// a reader never sees a partial module.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_references_split_into_path_tag_and_digest() {
        assert_eq!(split_layout_reference("/p/l:v1"), ("/p/l", Some("v1"), None));
        assert_eq!(split_layout_reference("/p/l"), ("/p/l", None, None));
        assert_eq!(split_layout_reference("/p/l@sha256:ab"), ("/p/l", None, Some("sha256:ab")));
    }
}
