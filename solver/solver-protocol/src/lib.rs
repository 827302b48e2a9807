//! The solver protocol: one [`SolveRequest`] in, a stream of [`Event`]s out.
//!
//! Both directions are JSON lines (one JSON object per `\n`-terminated line),
//! so the stream can be read incrementally, piped over ssh and shown by
//! `kiln build --progress rawjson` as it is. `solver/PROTOCOL.md` is the
//! reference for the format; [`VERSION`] is bumped on incompatible changes.
//!
//! **Architecture invariant:** no IO here beyond (de)serialising (and reading
//! the environment for the default state root); both the
//! CLI and the solver depend on this crate, never on each other.

pub mod history;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The state root when none is given: `$KILN_ROOT`, else
/// `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln` (the CLI and the solver
/// agree on it; the CLI always passes `--root`).
pub fn default_state_root() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(p) = std::env::var_os("KILN_ROOT") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(p).join("kiln");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/kiln")
}

/// Protocol version carried by every request and by the `hello` event.
pub const VERSION: u32 = 1;

/// The largest solve request the solver reads (256 MiB): a Definition of a
/// 5,000-instruction Dockerfile is about 6 MiB of it.
pub const MAX_REQUEST_BYTES: usize = 256 << 20;

/// What to build and where to put it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SolveRequest {
    /// Must equal [`VERSION`].
    pub version: u32,
    /// The marshalled `pb.Definition`, base64 (standard alphabet); empty
    /// when `platforms` carries the build.
    #[serde(default)]
    pub definition: String,
    /// The image config the frontend made (OCI/Docker image config JSON);
    /// the solver fills in `rootfs` and aligns `history` with the layers.
    #[serde(default)]
    pub image_config: Option<serde_json::Value>,
    /// Directories backing `local://NAME` sources, by name (`context`, …).
    #[serde(default)]
    pub locals: BTreeMap<String, String>,
    /// Where the result goes; none means build only (fill the cache).
    #[serde(default)]
    pub exporters: Vec<Exporter>,
    /// Ignore cached results of every vertex (results are still stored).
    #[serde(default)]
    pub no_cache: bool,
    /// At most this many ExecOps at once; none is no cap.
    #[serde(default)]
    pub jobs: Option<usize>,
    /// The OCI runtime binary (`runc`, `crun`, or a path).
    #[serde(default)]
    pub oci_runtime: Option<String>,
    /// Secret values by id, for `RUN --mount=type=secret` and secret env.
    #[serde(default, skip_serializing_if = "Secrets::is_empty")]
    pub secrets: Secrets,
    /// SSH agent sockets by id (paths on the solver's machine), for `RUN --mount=type=ssh`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ssh: BTreeMap<String, String>,
    /// `SOURCE_DATE_EPOCH`: clamps file times in new layers and sets the
    /// history and image creation times, for reproducible images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_date_epoch: Option<i64>,
    /// Privileges the user allowed by name ([`ENTITLEMENTS`]); a step that
    /// asks for one not listed is refused before anything runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entitlements: Vec<String>,
    /// A multi-platform build: one definition and image config per target
    /// platform, solved as one graph (a vertex the platforms share runs
    /// once); the image is an index with a manifest per entry, in order.
    /// When set, `definition` and `image_config` are empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformBuild>,
    /// Where the build's cache records and layers go (`--cache-to`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_to: Vec<CacheExport>,
    /// Caches to take results from when the state root has none (`--cache-from`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_from: Vec<CacheImport>,
    /// What the build is, for the state root's build history and for
    /// explaining cache misses; without it the build is not remembered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildInfo>,
    /// Keep the filesystem of a step that fails (`--on-error=keep=DIR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_failed: Option<String>,
}

/// What the CLI says of a build: where its definition came from. Builds of
/// the same definition file and target are compared with each other.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BuildInfo {
    /// The definition file (an absolute path).
    pub definition: String,
    /// The target stage, if one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Names of the build args given (never their values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub build_args: Vec<String>,
    /// Put each cache miss's reason in its `vertex_started` event.
    #[serde(default)]
    pub explain: bool,
}

/// Why a step ran instead of coming from the cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Explanation {
    /// One line: what changed since the last build of the same definition
    /// and target (names only, never values).
    pub reason: String,
    /// The upstream step that re-ran and made this one re-run (its digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub because_of: Option<String>,
}

impl Explanation {
    /// The reason's first clause when an upstream step re-ran (`because_of`).
    pub const UPSTREAM: &'static str = "an upstream step re-ran";

    /// The reason without the upstream clause (what else changed), if any.
    pub fn besides_upstream(&self) -> Option<&str> {
        let rest = self.reason.strip_prefix(Self::UPSTREAM).unwrap_or(&self.reason);
        let rest = rest.trim_start_matches("; ");
        (!rest.is_empty()).then_some(rest)
    }
}

/// One step of a build's critical path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PathStep {
    /// The op digest.
    pub digest: String,
    /// Its name.
    pub name: String,
    /// How long it took (0 when cached).
    pub duration_ms: u64,
}

/// How much of a build's cache an export holds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// The steps whose layers make the result.
    #[default]
    Min,
    /// Every step of the build.
    Max,
}

/// One `--cache-to` destination.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CacheExport {
    /// An OCI layout directory in BuildKit's cache format.
    Local {
        /// The directory (created if missing; blobs already there are kept).
        dest: String,
        /// How much to export.
        #[serde(default)]
        mode: CacheMode,
        /// The tag the cache manifest gets (default `latest`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        /// A failed export is a warning, not a failed build.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ignore_error: bool,
        /// Also the contents of the build's cache mounts, by id, which a
        /// `cache_from` of this cache seeds on a root that has none.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cache_mounts: bool,
    },
    /// The records of the result's steps inside the image's config
    /// (`moby.buildkit.cache.v0`, as BuildKit's inline cache), so the
    /// pushed image is its own cache.
    Inline {},
    /// A cache manifest (BuildKit's format) pushed to a registry.
    Registry {
        /// Where: `registry/repository:tag`.
        #[serde(rename = "ref")]
        reference: String,
        /// How much to export.
        #[serde(default)]
        mode: CacheMode,
        /// A failed export is a warning, not a failed build.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ignore_error: bool,
        /// Also the contents of the build's cache mounts, by id, which a
        /// `cache_from` of this cache seeds on a root that has none.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cache_mounts: bool,
    },
}

/// One `--cache-from` source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CacheImport {
    /// An OCI layout directory in BuildKit's cache format.
    Local {
        /// The directory.
        src: String,
        /// The tag of the cache manifest (default `latest`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
    },
    /// A cache manifest in a registry.
    Registry {
        /// Where: `registry/repository:tag`.
        #[serde(rename = "ref")]
        reference: String,
    },
}

/// One target platform of a multi-platform build.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlatformBuild {
    /// `os/arch[/variant]`, as the index names it.
    pub platform: String,
    /// The marshalled `pb.Definition` for this platform, base64.
    pub definition: String,
    /// Its image config.
    #[serde(default)]
    pub image_config: Option<serde_json::Value>,
}

impl PlatformBuild {
    /// One platform's build.
    pub fn new(platform: &str, definition: &[u8], image_config: Option<serde_json::Value>) -> PlatformBuild {
        use base64::Engine as _;
        PlatformBuild {
            platform: platform.to_string(),
            definition: base64::engine::general_purpose::STANDARD.encode(definition),
            image_config,
        }
    }

    /// The definition's bytes.
    pub fn definition_bytes(&self) -> Result<Vec<u8>, String> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(self.definition.as_bytes())
            .map_err(|e| format!("the {} definition is not base64: {e}", self.platform))
    }
}

/// `network.host`: a RUN step may use the host's network (`--network=host`).
pub const NETWORK_HOST: &str = "network.host";
/// `security.insecure`: a RUN step may run with every capability (`--security=insecure`).
pub const SECURITY_INSECURE: &str = "security.insecure";
/// Every entitlement a request may grant, as buildx names them.
pub const ENTITLEMENTS: &[&str] = &[NETWORK_HOST, SECURITY_INSECURE];

/// Secret values by id, base64 on the wire; never shown by `Debug`.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct Secrets(BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Secrets {
    /// Whether no secret is given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds a secret.
    pub fn insert(&mut self, id: &str, value: &[u8]) {
        use base64::Engine as _;
        self.0
            .insert(id.to_string(), base64::engine::general_purpose::STANDARD.encode(value));
    }

    /// A secret's value, if given (and decodable).
    pub fn get(&self, id: &str) -> Option<Vec<u8>> {
        use base64::Engine as _;
        self.0
            .get(id)
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
    }

    /// Whether a secret is given.
    pub fn contains(&self, id: &str) -> bool {
        self.0.contains_key(id)
    }
}

/// One output of the build (the `--output` forms of buildx).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Exporter {
    /// Into kiln's image store under these names (`kiln images`), and
    /// pushed to their registries when `push`.
    Image {
        /// Tags, e.g. `example.com/app:1`.
        names: Vec<String>,
        /// Push each name to its registry.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        push: bool,
    },
    /// An OCI image layout tarball.
    Oci {
        /// The tarball to write (`-` is not allowed: stdout carries events).
        dest: String,
        /// Names written as `org.opencontainers.image.ref.name` annotations.
        #[serde(default)]
        names: Vec<String>,
    },
    /// A `docker load` tarball.
    Docker {
        /// The tarball to write.
        dest: String,
        /// `RepoTags` of the manifest.
        #[serde(default)]
        names: Vec<String>,
    },
    /// The final filesystem, copied into a directory.
    Local {
        /// The directory (created if missing).
        dest: String,
    },
    /// The final filesystem as a tarball.
    Tar {
        /// The tarball to write.
        dest: String,
    },
}

/// One line of the solver's output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// First event: the solver's protocol version.
    Hello {
        /// [`VERSION`].
        version: u32,
    },
    /// A vertex started executing.
    VertexStarted {
        /// The op digest.
        digest: String,
        /// The op's name (its `llb.customname`, else a description of the op).
        name: String,
        /// Milliseconds since the solve began.
        at_ms: u64,
        /// Why it was not found in the cache (when the request asks to explain).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        explain: Option<Explanation>,
    },
    /// A vertex's result was found in the cache; it will not run.
    VertexCached {
        /// The op digest.
        digest: String,
        /// The op's name.
        name: String,
        /// Milliseconds since the solve began.
        at_ms: u64,
    },
    /// A vertex finished.
    VertexCompleted {
        /// The op digest.
        digest: String,
        /// Milliseconds since the solve began.
        at_ms: u64,
        /// How long it ran.
        duration_ms: u64,
    },
    /// A vertex failed; the build stops.
    VertexFailed {
        /// The op digest.
        digest: String,
        /// Milliseconds since the solve began.
        at_ms: u64,
        /// How long it ran.
        duration_ms: u64,
        /// What went wrong.
        error: String,
        /// The exit code of the step's process, when it ran and exited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        /// What the vertex was doing when it failed (absent from older solvers).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stage: Option<FailureStage>,
    },
    /// Output of a running step.
    Log {
        /// The op digest.
        digest: String,
        /// 1 = stdout, 2 = stderr.
        stream: u8,
        /// The bytes, lossily decoded as UTF-8.
        data: String,
    },
    /// Progress of a pull or an export item.
    Progress {
        /// The vertex it belongs to, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
        /// What is moving (`sha256:…` of a layer, `exporting layers`, …).
        id: String,
        /// Done so far.
        current: u64,
        /// Total, 0 if unknown.
        total: u64,
        /// Whether this item is finished.
        done: bool,
    },
    /// The build finished; the last event of a successful solve.
    Result(SolveResult),
    /// The solve failed; the last event of a failed solve.
    Error {
        /// What went wrong.
        message: String,
        /// The failing vertex, if a vertex failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
        /// Why: `request` (bad input), `vertex` (a step failed), `export`, `internal`.
        kind: ErrorKind,
    },
}

/// What a vertex was doing when it failed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureStage {
    /// Pinning or pulling an image source, or reading a local source.
    Source,
    /// Preparing a step: its layers, mounts, secrets, the runtime.
    Setup,
    /// The step's own process ran and failed.
    Run,
    /// A file operation (copy, mkdir, rm, symlink, unpack).
    File,
    /// Stacking or diffing layers.
    Layers,
    /// Computing the cache key (context checksums) or writing the record.
    Cache,
    /// An op this solver does not run.
    Unsupported,
}

/// The class of a solve failure.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request could not be read or is invalid.
    Request,
    /// A build step failed.
    Vertex,
    /// Writing an output failed.
    Export,
    /// Anything else (state root, runtime missing, …).
    Internal,
    /// A signal stopped the solve; the exit code is 128 + its number.
    Interrupted,
}

/// What a successful solve produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SolveResult {
    /// The image manifest digest, if an image was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// The image config digest (the image id), if an image was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// Paths and names written by the exporters.
    #[serde(default)]
    pub exported: Vec<String>,
    /// Vertices that ran.
    pub executed: u32,
    /// Vertices found in the cache.
    pub cached: u32,
    /// The build's id in the state root's history (`kiln history show ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_id: Option<String>,
    /// The chain of steps that decided the build's wall time, first to last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub critical_path: Vec<PathStep>,
}

impl SolveRequest {
    /// A request for a definition's bytes with nothing else set.
    pub fn new(definition: &[u8]) -> SolveRequest {
        use base64::Engine as _;
        SolveRequest {
            version: VERSION,
            definition: base64::engine::general_purpose::STANDARD.encode(definition),
            image_config: None,
            locals: BTreeMap::new(),
            exporters: Vec::new(),
            no_cache: false,
            jobs: None,
            oci_runtime: None,
            secrets: Secrets::default(),
            ssh: BTreeMap::new(),
            source_date_epoch: None,
            entitlements: Vec::new(),
            platforms: Vec::new(),
            cache_to: Vec::new(),
            cache_from: Vec::new(),
            build: None,
            keep_failed: None,
        }
    }

    /// The definition's bytes.
    pub fn definition_bytes(&self) -> Result<Vec<u8>, String> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(self.definition.as_bytes())
            .map_err(|e| format!("definition is not base64: {e}"))
    }
}

impl Event {
    /// The event as one JSON line (with the trailing newline).
    pub fn to_line(&self) -> String {
        let mut s =
            serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"type\":\"error\",\"message\":\"{e}\",\"kind\":\"internal\"}}"));
        s.push('\n');
        s
    }

    /// Parses one line.
    pub fn from_line(line: &str) -> Result<Event, serde_json::Error> {
        serde_json::from_str(line)
    }
}

// `kiln-solver du` and `kiln-solver prune` print these as JSON.

/// One cache record as `kiln du` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordUsage {
    /// The cache key.
    pub key: String,
    /// The op that made it.
    pub description: String,
    /// Bytes of the layers it owns.
    pub size: u64,
    /// When it was last used (seconds since the epoch).
    pub last_used: u64,
    /// When it was made.
    pub created: u64,
}

/// What the state root holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Usage {
    /// Cache records, most recently used first.
    pub records: Vec<RecordUsage>,
    /// Bytes of all layers.
    pub layers: u64,
    /// Bytes of all blobs (image store and layer blobs).
    pub blobs: u64,
    /// Bytes of cache mounts.
    pub cache_mounts: u64,
}

impl Usage {
    /// Everything together.
    pub fn total(&self) -> u64 {
        self.layers + self.blobs + self.cache_mounts
    }
}

/// What a prune did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PruneReport {
    /// Records removed.
    pub records: usize,
    /// Layers removed.
    pub layers: usize,
    /// Blobs removed.
    pub blobs: usize,
    /// Bytes freed.
    pub freed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_carries_bytes() {
        let mut req = SolveRequest::new(b"\x0a\x02hi");
        req.exporters.push(Exporter::Oci {
            dest: "out.tar".into(),
            names: vec!["a:1".into()],
        });
        let text = serde_json::to_string(&req).expect("serialise");
        assert!(text.contains("\"type\":\"oci\""), "{text}");
        let back: SolveRequest = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, req);
        req.secrets.insert("token", b"hunter2");
        assert!(!format!("{req:?}").contains("hunter2"), "Debug never shows secret values");
        let back: SolveRequest = serde_json::from_str(&serde_json::to_string(&req).expect("json")).expect("parse");
        assert_eq!(back.secrets.get("token").as_deref(), Some(&b"hunter2"[..]));
        assert_eq!(back.definition_bytes().expect("b64"), b"\x0a\x02hi");
    }

    #[test]
    fn events_are_tagged_lines() {
        let ev = Event::VertexCached {
            digest: "sha256:ab".into(),
            name: "[1/2] RUN x".into(),
            at_ms: 3,
        };
        let line = ev.to_line();
        assert!(line.ends_with('\n'));
        assert!(line.starts_with("{\"type\":\"vertex_cached\""), "{line}");
        assert_eq!(Event::from_line(line.trim_end()).expect("parse"), ev);
        let err = Event::from_line(r#"{"type":"error","message":"m","kind":"vertex","digest":"sha256:1"}"#).expect("parse");
        assert!(matches!(
            err,
            Event::Error {
                kind: ErrorKind::Vertex,
                ..
            }
        ));
    }
}
