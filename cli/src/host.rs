//! The CLI's frontend host: resolves base image configs from `--build-context`
//! OCI layouts, then kiln's image store, then the image's registry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_frontend::{Host, HostError, Platform, ResolvedImage};
use kiln_image::Reference;
use kiln_oci::{Credentials, Layout, RegistryClient};
use std::sync::OnceLock;

/// kiln's state root: `--root`, else `$KILN_ROOT`, else `$XDG_DATA_HOME/kiln` or `~/.local/share/kiln`.
pub fn state_root(flag: Option<&Path>) -> PathBuf {
    let root = match flag {
        Some(p) => p.to_path_buf(),
        None => kiln_solver_protocol::default_state_root(),
    };
    // Absolute, as the solver and the runtime it starts need it (`--root r`
    // would name a path relative to each process's own directory).
    if root.is_relative() {
        if let Ok(cwd) = std::env::current_dir() {
            return cwd.join(root);
        }
    }
    root
}

/// A host reading images from OCI layouts on this machine.
pub struct CliHost {
    contexts: BTreeMap<String, (PathBuf, Option<String>)>,
    store: PathBuf,
    registry: RegistryClient,
    /// Started on the first registry lookup only.
    runtime: OnceLock<Result<tokio::runtime::Runtime, String>>,
    /// Ask the registry even when the store has the tag (`--pull`).
    pub skip_store: bool,
    /// The command has `--no-resolve` (so its errors may suggest it).
    pub can_skip_resolve: bool,
}

impl CliHost {
    /// A host for the request's named contexts (`NAME` → `oci-layout:///path[:tag]`).
    pub fn new(named_contexts: &BTreeMap<String, String>, root: PathBuf) -> Result<CliHost, String> {
        let mut contexts = BTreeMap::new();
        for (name, src) in named_contexts {
            let Some(rest) = src.strip_prefix("oci-layout://") else {
                // docker-image:// and local directories are handled by the frontend itself.
                if src.starts_with("docker-image://") {
                    continue;
                }
                if src.contains("://") {
                    return Err(format!(
                        "--build-context {name}={src}: supported sources are oci-layout://PATH[:TAG], docker-image://REF and a local directory"
                    ));
                }
                if !Path::new(src).is_dir() {
                    return Err(format!("--build-context {name}={src}: no such directory"));
                }
                continue;
            };
            let (path, tag) = match rest.rsplit_once(':') {
                Some((p, t)) if !t.contains('/') => (p, Some(t.to_string())),
                _ => (rest, None),
            };
            let key = Reference::parse(name).map(|r| r.normalized()).unwrap_or_else(|_| name.to_string());
            contexts.insert(key, (PathBuf::from(path), tag));
        }
        Ok(CliHost {
            contexts,
            store: root.join("store"),
            registry: RegistryClient::new(Credentials::from_docker_config()),
            runtime: OnceLock::new(),
            skip_store: false,
            can_skip_resolve: false,
        })
    }
}

impl Host for CliHost {
    fn resolve_image(&self, reference: &str, platform: &Platform) -> Result<Option<ResolvedImage>, HostError> {
        if let Some((path, tag)) = self.contexts.get(reference) {
            let layout = Layout::open(path).map_err(|e| HostError {
                message: format!("build context for {reference}: {e}"),
            })?;
            let found = layout.resolve(tag.as_deref(), platform).map_err(|e| HostError {
                message: format!("build context for {reference}: {e}"),
            })?;
            let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            return Ok(Some(ResolvedImage {
                reference: format!("oci-layout://{}@{}", abs.display(), found.manifest_digest),
                config: found.config,
            }));
        }
        let store_error = match Layout::open(&self.store) {
            Ok(_) if self.skip_store => "the store was skipped (--pull)".to_string(),
            Ok(store) => match store.resolve(Some(reference), platform) {
                Ok(found) => {
                    let name = reference.split('@').next().unwrap_or(reference);
                    return Ok(Some(ResolvedImage {
                        reference: format!("{name}@{}", found.manifest_digest),
                        config: found.config,
                    }));
                }
                Err(e) => e.to_string(),
            },
            Err(_) => format!("kiln's image store {} is empty", self.store.display()),
        };
        let runtime = self.runtime.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        });
        let runtime = runtime.as_ref().map_err(|e| HostError {
            message: format!("cannot start the registry client: {e}"),
        })?;
        match runtime.block_on(self.registry.resolve(reference, platform)) {
            Ok(found) => {
                let name = reference.split('@').next().unwrap_or(reference);
                Ok(Some(ResolvedImage {
                    reference: format!("{name}@{}", found.manifest_digest),
                    config: found.config,
                }))
            }
            Err(e) => {
                // Say what the registry said: unreachable is not "not found".
                let reason = match &e {
                    kiln_oci::RegistryError::Fetch { registry, message } if is_connection_error(message) => {
                        format!("the registry lookup failed: cannot connect to {registry}: {message}")
                    }
                    other => format!("the registry lookup failed: {other}"),
                };
                let skip = if self.can_skip_resolve {
                    ", or --no-resolve to compile without base image configs"
                } else {
                    ""
                };
                Err(HostError {
                    message: format!(
                        "{reason}; no --build-context names it and {store_error} \
                         (pass --build-context {reference}=oci-layout:///PATH[:TAG]{skip})"
                    ),
                })
            }
        }
    }
}

/// Whether a registry client's error is about reaching the registry at all.
fn is_connection_error(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "connection refused",
        "error sending request",
        "dns error",
        "timed out",
        "connection reset",
        "unreachable",
    ]
    .iter()
    .any(|s| m.contains(s))
}
