//! The frontend interface: what a frontend receives ([`Request`]), what it may
//! ask its host ([`Host`]), and what it returns ([`Response`]: LLB, the image
//! config for the exporter, and diagnostics).
//!
//! **Architecture invariant:** no IO here and in the frontends; the host trait
//! is the only way out.

pub mod diagnostic;

use std::collections::BTreeMap;

pub use diagnostic::{Diagnostic, Severity};
/// The image model the interface speaks in (from `kiln-image`).
pub use kiln_image::{ImageConfig, Platform};
pub use kiln_llb::pb;

/// Everything a frontend compiles from.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The definition file's bytes.
    pub definition: Vec<u8>,
    /// Its name, for diagnostics and the source map (e.g. `Dockerfile`).
    pub filename: String,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--target` stage.
    pub target: Option<String>,
    /// Target platform (defaults to the build platform).
    pub platform: Option<Platform>,
    /// The platform the build runs on.
    pub build_platform: Platform,
    /// This compile is one of several target platforms of one build:
    /// progress names carry the platform, as BuildKit's do.
    pub multi_platform: bool,
    /// `--build-context NAME=…` names the host can resolve.
    pub named_contexts: BTreeMap<String, String>,
    /// Patterns from `.dockerignore`, if the host found one.
    pub ignore_patterns: Vec<String>,
    /// Network mode for RUN steps that do not set one (`default`, `none`, `host`),
    /// as buildx's `--network`.
    pub network: Option<String>,
    /// `--add-host`: extra `/etc/hosts` entries for every RUN step, as
    /// (host name, IP address) pairs.
    pub extra_hosts: Vec<(String, String)>,
}

/// An image's config as the host resolved it.
#[derive(Debug, Clone, Default)]
pub struct ResolvedImage {
    /// The normalized reference, pinned (`…@sha256:…`) when the host knows the digest;
    /// or a full source identifier such as `oci-layout://…@sha256:…`.
    pub reference: String,
    /// The image config.
    pub config: ImageConfig,
}

/// Why the host could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct HostError {
    /// Explanation naming what was tried.
    pub message: String,
}

/// What a frontend may ask of the program running it.
pub trait Host {
    /// Resolves an image reference (already normalized) for a platform.
    /// `Ok(None)` means the host resolves nothing (offline compilation).
    fn resolve_image(&self, reference: &str, platform: &Platform) -> Result<Option<ResolvedImage>, HostError>;

    /// Reads a file of the build context (a relative path). `None` when the
    /// host has no context, the file does not exist, or the path leaves the
    /// context. In-process frontends get what they need in the [`Request`].
    fn read_file(&self, _path: &str) -> Option<Vec<u8>> {
        None
    }

    /// Reports progress to the user (a line of text).
    fn progress(&self, _message: &str) {}
}

/// A host that resolves nothing: base images are taken as empty and left unpinned.
pub struct OfflineHost;

impl Host for OfflineHost {
    fn resolve_image(&self, _: &str, _: &Platform) -> Result<Option<ResolvedImage>, HostError> {
        Ok(None)
    }
}

/// What a frontend returns.
#[derive(Debug, Clone, Default)]
pub struct Response {
    /// The LLB, when compilation succeeded.
    pub definition: Option<pb::Definition>,
    /// The result image's config.
    pub image_config: Option<ImageConfig>,
    /// Errors and warnings.
    pub diagnostics: Vec<Diagnostic>,
}

impl Response {
    /// Whether any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(|d| d.severity == Severity::Error)
    }
}
