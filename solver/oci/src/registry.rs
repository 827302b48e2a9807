//! Resolving image configs from an OCI distribution registry.
//!
//! Anonymous and token auth (the registry's `WWW-Authenticate` challenge is
//! answered by the client), credentials from `~/.docker/config.json`, plain
//! HTTP for loopback registries as Docker allows. The tag is pinned to the
//! digest of what it points to (an index or a manifest, as BuildKit pins), and
//! the platform's manifest and config are fetched by digest and verified.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use kiln_image::{ImageConfig, Platform};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::document::Document;
use crate::layout::ResolvedConfig;

/// Why a registry lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not parse.
    #[error("invalid reference {0:?}: {1}")]
    Reference(String, String),
    /// The registry answered with an error or could not be reached.
    #[error("{registry}: {message}")]
    Fetch {
        /// Registry host.
        registry: String,
        /// What went wrong.
        message: String,
    },
    /// A document is not what it should be.
    #[error("{0}")]
    Invalid(String),
}

/// The most bytes read of a document held in memory (an image config, or a
/// blob fetched without a known size): far above any real one, and a
/// registry cannot make kiln hold more.
pub const MAX_DOCUMENT_BYTES: u64 = 64 << 20;

/// A writer that refuses bytes past `left`: a registry may not send more
/// than the descriptor promised (or than [`MAX_DOCUMENT_BYTES`]).
struct Bounded<'a, W> {
    inner: W,
    left: u64,
    what: &'a str,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Bounded<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if buf.len() as u64 > self.left {
            let message = format!("the registry sent more bytes than {} has", self.what);
            return std::task::Poll::Ready(Err(std::io::Error::other(message)));
        }
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            self.left -= *n as u64;
        }
        polled
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How many bytes a blob of descriptor size `size` may have (no size, 0 or
/// negative: unknown, a document of at most [`MAX_DOCUMENT_BYTES`]).
fn blob_limit(size: i64) -> u64 {
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(MAX_DOCUMENT_BYTES)
}

/// Media types of manifests and indexes kiln reads.
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Registry credentials, from Docker's `config.json`.
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    auths: BTreeMap<String, (String, String)>,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

impl Credentials {
    /// Reads `config.json` from `$DOCKER_CONFIG` or `~/.docker`; none is no credentials.
    pub fn from_docker_config() -> Credentials {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker")));
        match dir.and_then(|d| std::fs::read(d.join("config.json")).ok()) {
            Some(bytes) => Credentials::parse(&bytes),
            None => Credentials::default(),
        }
    }

    /// Parses Docker's `config.json` (the `auths` section; credential helpers are not run).
    pub fn parse(bytes: &[u8]) -> Credentials {
        use base64::Engine as _;
        let Ok(config) = serde_json::from_slice::<DockerConfig>(bytes) else {
            return Credentials::default();
        };
        let mut auths = BTreeMap::new();
        for (key, entry) in config.auths {
            let (user, pass) = if !entry.auth.is_empty() {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(entry.auth.trim())
                    .unwrap_or_default();
                let text = String::from_utf8_lossy(&decoded).into_owned();
                match text.split_once(':') {
                    Some((u, p)) => (u.to_string(), p.to_string()),
                    None => continue,
                }
            } else if !entry.username.is_empty() {
                (entry.username, entry.password)
            } else {
                continue;
            };
            auths.insert(registry_key(&key), (user, pass));
        }
        Credentials { auths }
    }

    /// The auth to use for a registry host.
    pub fn for_registry(&self, registry: &str) -> RegistryAuth {
        match self.auths.get(&registry_key(registry)) {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

/// Normalizes a `config.json` key or registry host (`https://index.docker.io/v1/` → `docker.io`).
fn registry_key(key: &str) -> String {
    let host = key.trim_start_matches("https://").trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        h => h.to_string(),
    }
}

/// Whether a registry host is on this machine (plain HTTP allowed, as Docker does).
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.rsplit_once(':').map(|(h, _)| h).unwrap_or(registry),
    };
    host == "localhost" || host.starts_with("127.") || host == "::1"
}

/// A registry client for image config resolution.
pub struct RegistryClient {
    credentials: Credentials,
    /// One HTTP client per registry: making one reads every system root
    /// certificate (~10 ms), and a client keeps its connections and tokens.
    clients: std::sync::Mutex<HashMap<String, Client>>,
}

impl RegistryClient {
    /// A client using the given credentials.
    pub fn new(credentials: Credentials) -> RegistryClient {
        RegistryClient {
            credentials,
            clients: Default::default(),
        }
    }

    /// The HTTP client for a registry, made at its first use.
    fn client_for(&self, registry: &str) -> Client {
        let make = || {
            let protocol = if is_loopback(registry) {
                ClientProtocol::HttpsExcept(vec![registry.to_string()])
            } else {
                ClientProtocol::Https
            };
            Client::new(ClientConfig {
                protocol,
                platform_resolver: None,
                ..Default::default()
            })
        };
        match self.clients.lock() {
            Ok(mut clients) => clients.entry(registry.to_string()).or_insert_with(make).clone(),
            Err(_) => make(),
        }
    }

    /// Resolves `reference` (normalized, e.g. `docker.io/library/alpine:3.20`)
    /// to the digest that pins it and the config of its `platform` image.
    pub async fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedConfig, RegistryError> {
        let (top, top_digest) = self.fetch_top_manifest(reference).await?;
        let (parsed, registry, client, auth) = self.connect(reference)?;
        let fetch = fetch_error(&registry);
        let doc: Document = serde_json::from_slice(&top).map_err(|e| RegistryError::Invalid(format!("{reference}: bad manifest: {e}")))?;
        let manifest: Document = if doc.is_manifest() {
            doc
        } else {
            let entry = doc.entry_for(platform).ok_or_else(|| {
                RegistryError::Invalid(format!(
                    "{reference} has no image for {} (it has: {})",
                    platform.to_string_form(),
                    doc.platforms().join(", ")
                ))
            })?;
            let child = Reference::with_digest(registry.clone(), parsed.repository().to_string(), entry.digest.clone());
            let (bytes, digest) = client.pull_manifest_raw(&child, &auth, MANIFEST_TYPES).await.map_err(fetch)?;
            verify(&bytes, &digest)?;
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::Invalid(format!("{reference}: bad manifest {digest}: {e}")))?
        };
        let config_desc = manifest
            .config
            .ok_or_else(|| RegistryError::Invalid(format!("{reference}: manifest has no config")))?;
        let config_digest = config_desc.digest;
        if config_desc.size > MAX_DOCUMENT_BYTES as i64 {
            return Err(RegistryError::Invalid(format!(
                "{reference}: its image config is {} bytes, over the {} MiB limit",
                config_desc.size,
                MAX_DOCUMENT_BYTES >> 20
            )));
        }
        let mut config_bytes: Vec<u8> = Vec::new();
        let what = format!("the image config {config_digest}");
        let out = Bounded {
            inner: &mut config_bytes,
            left: blob_limit(config_desc.size),
            what: &what,
        };
        client.pull_blob(&parsed, config_digest.as_str(), out).await.map_err(fetch)?;
        verify(&config_bytes, &config_digest)?;
        let config: ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(|e| RegistryError::Invalid(format!("{reference}: bad image config: {e}")))?;
        Ok(ResolvedConfig {
            manifest_digest: top_digest,
            config,
        })
    }
}

impl RegistryClient {
    /// The parsed reference, its registry host, a client for it and the credentials to use.
    fn connect(&self, reference: &str) -> Result<(Reference, String, Client, RegistryAuth), RegistryError> {
        let parsed: Reference = reference
            .parse()
            .map_err(|e: oci_client::ParseError| RegistryError::Reference(reference.to_string(), e.to_string()))?;
        let registry = parsed.registry().to_string();
        let client = self.client_for(&registry);
        let auth = self.credentials.for_registry(&registry);
        Ok((parsed, registry, client, auth))
    }

    /// Fetches the manifest or index `reference` names (by tag or digest),
    /// verified; returns it and its digest.
    pub async fn fetch_top_manifest(&self, reference: &str) -> Result<(Vec<u8>, String), RegistryError> {
        let (parsed, registry, client, auth) = self.connect(reference)?;
        let (top, top_digest) = client
            .pull_manifest_raw(&parsed, &auth, MANIFEST_TYPES)
            .await
            .map_err(fetch_error(&registry))?;
        verify(&top, &top_digest)?;
        if let Some(wanted) = parsed.digest() {
            if wanted != top_digest {
                return Err(RegistryError::Invalid(format!("{reference}: registry returned {top_digest}")));
            }
        }
        Ok((top.to_vec(), top_digest))
    }

    /// Fetches a manifest or index of `reference`'s repository by digest, verified.
    pub async fn fetch_manifest(&self, reference: &str, digest: &str) -> Result<Vec<u8>, RegistryError> {
        let (parsed, registry, client, auth) = self.connect(reference)?;
        let by_digest = Reference::with_digest(registry.clone(), parsed.repository().to_string(), digest.to_string());
        let (bytes, got) = client
            .pull_manifest_raw(&by_digest, &auth, MANIFEST_TYPES)
            .await
            .map_err(fetch_error(&registry))?;
        verify(&bytes, digest)?;
        if got != digest {
            return Err(RegistryError::Invalid(format!("{reference}: registry returned {got} for {digest}")));
        }
        Ok(bytes.to_vec())
    }

    /// Streams a blob of `reference`'s repository into `path`, verified
    /// against `digest` while it arrives (a mismatch is an error and the
    /// caller must discard the file); at most `size` bytes, or
    /// [`MAX_DOCUMENT_BYTES`] when `size` is not positive (unknown).
    pub async fn fetch_blob(&self, reference: &str, digest: &str, size: i64, path: &Path) -> Result<(), RegistryError> {
        let (parsed, registry, client, auth) = self.connect(reference)?;
        let fetch = fetch_error(&registry);
        // Authenticate for pulls of this repository first (anonymous tokens too).
        client
            .auth(&parsed, &auth, oci_client::RegistryOperation::Pull)
            .await
            .map_err(fetch)?;
        let file = tokio::fs::File::create(path)
            .await
            .map_err(|e| RegistryError::Invalid(format!("{}: {e}", path.display())))?;
        let desc = oci_client::manifest::OciDescriptor {
            digest: digest.to_string(),
            size,
            ..Default::default()
        };
        let what = format!("the blob {digest}");
        let out = Bounded {
            inner: file,
            left: blob_limit(size),
            what: &what,
        };
        client.pull_blob(&parsed, &desc, out).await.map_err(fetch)?;
        Ok(())
    }
}

/// One blob to push: its digest, where its bytes are, and where else on
/// the same registry it may already be (for a cross-repository mount).
#[derive(Debug, Clone)]
pub struct PushBlob {
    /// `sha256:` digest.
    pub digest: String,
    /// The file holding it.
    pub path: std::path::PathBuf,
    /// Its size.
    pub size: u64,
    /// A `registry/repository` it was pulled from, if known.
    pub source: Option<String>,
}

/// What a push did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PushReport {
    /// Blobs sent.
    pub uploaded: usize,
    /// Blobs the registry already had in the repository.
    pub existing: usize,
    /// Blobs mounted from another repository of the registry.
    pub mounted: usize,
}

impl RegistryClient {
    /// Pushes an image: its blobs (skipping those the repository has,
    /// mounting those another repository of the same registry has), then
    /// its manifest under `reference`'s tag.
    pub async fn push(&self, reference: &str, blobs: &[PushBlob], manifest: &[u8], media_type: &str) -> Result<PushReport, RegistryError> {
        self.push_with(reference, blobs, manifest, media_type, &|_| Ok(())).await
    }

    /// [`Self::push`], calling `before_upload` for each blob the registry
    /// neither has nor could mount, before its file is read (to fetch a blob
    /// that is not on disk yet).
    pub async fn push_with(
        &self,
        reference: &str,
        blobs: &[PushBlob],
        manifest: &[u8],
        media_type: &str,
        before_upload: &(dyn Fn(&PushBlob) -> Result<(), String> + Sync),
    ) -> Result<PushReport, RegistryError> {
        let (parsed, registry, client, auth) = self.connect(reference)?;
        let fetch = fetch_error(&registry);
        client
            .auth(&parsed, &auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(fetch)?;
        let mut report = PushReport::default();
        for blob in blobs {
            if client.blob_exists(&parsed, &blob.digest).await.map_err(fetch)? {
                report.existing += 1;
                continue;
            }
            if let Some(source) = &blob.source {
                if let Ok(src) = source.parse::<Reference>() {
                    if src.registry() == parsed.registry() && src.repository() != parsed.repository() {
                        // Pull access to the source repository is needed for a mount.
                        let _ = client.auth(&src, &auth, oci_client::RegistryOperation::Pull).await;
                        if client.mount_blob(&parsed, &src, &blob.digest).await.is_ok()
                            && client.blob_exists(&parsed, &blob.digest).await.unwrap_or(false)
                        {
                            report.mounted += 1;
                            continue;
                        }
                    }
                }
            }
            before_upload(blob).map_err(RegistryError::Invalid)?;
            let file = tokio::fs::File::open(&blob.path)
                .await
                .map_err(|e| RegistryError::Invalid(format!("{}: {e}", blob.path.display())))?;
            let stream = futures::stream::unfold(file, |mut f| async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 1 << 20];
                match f.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(bytes::Bytes::from(buf)), f))
                    }
                    Err(e) => Some((Err(oci_client::errors::OciDistributionError::IoError(e)), f)),
                }
            });
            client
                .push_blob_stream(&parsed, stream, &blob.digest, Some(blob.size))
                .await
                .map_err(fetch)?;
            report.uploaded += 1;
        }
        let content_type = media_type
            .parse()
            .map_err(|_| RegistryError::Invalid(format!("bad media type {media_type:?}")))?;
        client
            .push_manifest_raw(&parsed, manifest.to_vec(), content_type)
            .await
            .map_err(fetch)?;
        Ok(report)
    }
}

/// Turns a client error into a [`RegistryError::Fetch`] naming the registry.
fn fetch_error(registry: &str) -> impl Fn(oci_client::errors::OciDistributionError) -> RegistryError + Copy + '_ {
    move |e| RegistryError::Fetch {
        registry: registry.to_string(),
        message: e.to_string(),
    }
}

/// Checks bytes against a `sha256:` digest.
fn verify(bytes: &[u8], digest: &str) -> Result<(), RegistryError> {
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    if digest.starts_with("sha256:") && actual != digest {
        return Err(RegistryError::Invalid(format!("content has digest {actual}, expected {digest}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry on loopback that answers every request with 200 and
    /// `body_bytes` bytes, however many the descriptor promised.
    fn oversending_registry(body_bytes: usize) -> String {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    loop {
                        // One request: its head up to the blank line.
                        let mut line = String::new();
                        while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                            line.clear();
                        }
                        if line.is_empty() {
                            return;
                        }
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {body_bytes}\r\n\r\n");
                        let sent = stream.write_all(head.as_bytes()).and_then(|()| {
                            let chunk = vec![b'x'; 64 * 1024];
                            let mut left = body_bytes;
                            while left > 0 {
                                let n = left.min(chunk.len());
                                stream.write_all(&chunk[..n])?;
                                left -= n;
                            }
                            Ok(())
                        });
                        if sent.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr.to_string()
    }

    #[test]
    fn a_registry_cannot_send_more_than_the_descriptor_says() {
        let registry = oversending_registry((MAX_DOCUMENT_BYTES + 1) as usize);
        let client = RegistryClient::new(Credentials::default());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let dir = std::env::temp_dir().join(format!("kiln-oci-bounded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let reference = format!("{registry}/x:latest");
        let digest = format!("sha256:{}", "0".repeat(64));
        for size in [1000i64, -1] {
            let file = dir.join(format!("blob{size}"));
            let err = rt
                .block_on(client.fetch_blob(&reference, &digest, size, &file))
                .expect_err("refused");
            assert!(err.to_string().contains("more bytes than the blob"), "{size}: {err}");
            let written = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            assert!(written <= blob_limit(size), "{size}: {written} bytes written");
        }
        // Unknown sizes are bounded by the document limit.
        assert_eq!(blob_limit(-1), MAX_DOCUMENT_BYTES);
        assert_eq!(blob_limit(0), MAX_DOCUMENT_BYTES);
        assert_eq!(blob_limit(5), 5);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn docker_config_auths_are_read() {
        let cfg = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"127.0.0.1:5000":{"username":"a","password":"b"}}}"#;
        let c = Credentials::parse(cfg);
        assert!(matches!(c.for_registry("docker.io"), RegistryAuth::Basic(u, p) if u == "user" && p == "pass"));
        assert!(matches!(c.for_registry("127.0.0.1:5000"), RegistryAuth::Basic(u, _) if u == "a"));
        assert!(matches!(c.for_registry("ghcr.io"), RegistryAuth::Anonymous));
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("docker.io"));
        assert!(!is_loopback("registry.example.com:5000"));
    }
}
