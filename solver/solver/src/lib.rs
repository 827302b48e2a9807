//! kiln-solver: executes an LLB Definition and exports its result.
//!
//! The binary reads one [`kiln_solver_protocol::SolveRequest`] on stdin and
//! writes [`kiln_solver_protocol::Event`]s on stdout; [`run`] is all of it.
//!
//! The phases, one module (or folder) each:
//! - [`schedule`]: the DAG walk: each vertex once, its cache key from its
//!   inputs' keys, a cache lookup, then execution; events; work done ahead.
//! - [`cache`]: the cache-key rules and the records of finished vertices.
//! - [`source`]: image sources (pull) and local sources (checksums, patterns).
//! - [`execute`]: what each op does: ExecOp in runc, FileOp actions,
//!   MergeOp and DiffOp.
//! - [`snapshot`]: layers on disk, overlayfs mounts, tar conversion,
//!   tree differences.
//! - [`export`]: images, tarballs and directories out; [`gc`]: pruning.
//! - [`root`]: the state root's layout and crash safety;
//!   [`error`]: the typed failures and their exit codes.
//!
//! **Architecture invariant:** the solver knows nothing of Dockerfiles or
//! any other frontend; everything it needs is in the request.

mod cache;
mod error;
mod execute;
mod export;
mod fsutil;
pub mod gc;
mod history;
mod remotecache;
mod root;
pub mod rootless;
mod schedule;
mod snapshot;
mod source;

pub use root::StateRoot;
pub use schedule::{wait_for_background_work, EventSink};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_llb::LoadedDefinition;
use kiln_solver_protocol::{Event, SolveRequest, SolveResult, VERSION};

use crate::error::{Failure, SolveError};
use crate::schedule::{SolveOptions, Solver};

pub use error::exit;

/// Closes the steps' network pool when the solve ends.
struct CloseOnDrop(Arc<execute::netns::Sandboxes>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Reads a request, solves it, exports, reporting everything to `events`
/// (after the `hello` event, which the caller has sent). Returns the
/// process exit code.
pub async fn run(request_bytes: &[u8], root_dir: PathBuf, events: Arc<dyn EventSink>) -> i32 {
    let fail = |events: &Arc<dyn EventSink>, error: SolveError| {
        events.emit(error.event());
        error.exit_code()
    };
    let request: SolveRequest = match serde_json::from_slice(request_bytes) {
        Ok(r) => r,
        Err(e) => return fail(&events, SolveError::Request(format!("the solve request is not valid: {e}"))),
    };
    if request.version != VERSION {
        return fail(
            &events,
            SolveError::Request(format!(
                "solve request version {} is not supported (this solver speaks {VERSION})",
                request.version
            )),
        );
    }
    let (def, targets) = match load_targets(&request) {
        Ok(t) => t,
        Err(e) => return fail(&events, SolveError::Request(e)),
    };
    if let Some(unknown) = request
        .entitlements
        .iter()
        .find(|e| !kiln_solver_protocol::ENTITLEMENTS.contains(&e.as_str()))
    {
        return fail(
            &events,
            SolveError::Request(format!(
                "unknown entitlement {unknown:?} (known: {})",
                kiln_solver_protocol::ENTITLEMENTS.join(", ")
            )),
        );
    }
    if let Some((digest, message)) = schedule::refused_step(&def, &request.entitlements) {
        return fail(&events, SolveError::Refused { digest, message });
    }
    if schedule::uses_sandbox_network(&def) {
        if let Err(msg) = execute::netns::slirp_binary() {
            return fail(&events, SolveError::Request(msg));
        }
    }
    if let Some(why) = schedule::step_platforms(&def)
        .iter()
        .find_map(|p| execute::emulate::emulation(p).err())
    {
        return fail(&events, SolveError::Request(why));
    }
    let missing = schedule::missing_secrets(&def, &request.secrets, &request.ssh);
    if !missing.is_empty() {
        return fail(&events, SolveError::Request(missing.join("\n")));
    }
    let runtime_bin = request.oci_runtime.clone().unwrap_or_else(|| "runc".to_string());
    let root = match root::StateRoot::open(&root_dir, &runtime_bin) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            return fail(
                &events,
                SolveError::StateRoot {
                    path: root_dir.display().to_string(),
                    message: e.to_string(),
                },
            )
        }
    };
    let sandboxes = execute::netns::Sandboxes::new(root.clone());
    // However the solve ends (done, failed, cancelled), its unused networks go.
    let _close = CloseOnDrop(sandboxes.clone());
    let locals: BTreeMap<String, PathBuf> = request.locals.iter().map(|(k, v)| (k.clone(), PathBuf::from(v))).collect();
    let imports = Arc::new(import_caches(&request.cache_from, &events).await);
    let keep_failed = request
        .keep_failed
        .as_ref()
        .map(|d| Arc::new(execute::keep::KeepFailed::new(PathBuf::from(d))));
    let mut attempts = 0;
    let (solver, outcome, started) = loop {
        let runtime = execute::runc::Runtime::new(runtime_bin.clone(), root.runtime_state()).with_sandboxes(sandboxes.clone());
        let mut exec = execute::Executor::new(root.clone(), runtime, request.secrets.clone(), request.ssh.clone(), events.clone());
        exec.imports = imports.clone();
        exec.keep_failed = keep_failed.clone();
        let mut solver = Solver::new(
            root.clone(),
            def.clone(),
            SolveOptions {
                locals: locals.clone(),
                no_cache: request.no_cache,
                jobs: request.jobs,
                image_layers: export::wants_image(&request.exporters).then_some(request.source_date_epoch),
                imports: imports.clone(),
            },
            exec,
            events.clone(),
        );
        solver.history = request.build.clone().map(|info| {
            let platforms = request.platforms.iter().map(|p| p.platform.clone()).collect();
            Arc::new(history::Recorder::new(root.clone(), info, platforms))
        });
        let solver = Arc::new(solver);
        let started = std::time::Instant::now();
        let damaged = root.damaged_count();
        let outcome = solve_and_export(&request, &root, &solver, targets.clone(), &events).await;
        attempts += 1;
        // A cache hit's layer that fails to fetch when something needs it
        // (damaged, truncated, unreachable) makes that hit a miss: solve
        // again, running what the damaged layers held (bounded: each retry
        // needs a layer that had not failed before).
        match &outcome {
            Err(e) if root.damaged_count() > damaged && attempts < 8 => {
                events.emit(Event::Log {
                    digest: String::new(),
                    stream: 2,
                    data: format!("cache import: {e}; running the steps it held instead\n"),
                });
            }
            _ => break (solver, outcome, started),
        }
    };
    let (history_id, critical_path) = match &solver.history {
        Some(h) => {
            let (digest, error) = match &outcome {
                Ok(r) => (r.image_digest.clone(), None),
                Err(e) => (None, Some(e.to_string())),
            };
            let counted = |n: &std::sync::atomic::AtomicU32| n.load(std::sync::atomic::Ordering::Relaxed);
            let h = h.clone();
            let (ran, cached) = (counted(&solver.executed), counted(&solver.cached));
            let took = started.elapsed().as_millis() as u64;
            tokio::task::block_in_place(move || h.write(took, ran, cached, digest, error))
        }
        None => (None, Vec::new()),
    };
    match outcome {
        Ok(mut result) => {
            result.history_id = history_id;
            result.critical_path = critical_path;
            events.emit(Event::Result(result));
            exit::OK
        }
        Err(e) => fail(&events, e),
    }
}

/// Solves the graph, exports the result and the cache.
async fn solve_and_export(
    request: &SolveRequest,
    root: &Arc<root::StateRoot>,
    solver: &Arc<Solver>,
    targets: Vec<TargetSpec>,
    events: &Arc<dyn EventSink>,
) -> Result<SolveResult, SolveError> {
    let values = match solver.solve().await {
        Ok(v) => v,
        Err(e) => {
            solver.save_checksums();
            return Err(e);
        }
    };
    let mut results = Vec::with_capacity(values.len());
    for (value, (platform, config)) in values.iter().zip(targets) {
        let layers = match value {
            Some(v) => match solver.layers(v).await {
                Ok(l) => l,
                Err(failure) => {
                    return Err(SolveError::Export {
                        what: "the result".into(),
                        failure,
                    })
                }
            },
            None => Arc::new(Vec::new()),
        };
        results.push(export::Target { platform, layers, config });
    }
    if request
        .cache_to
        .iter()
        .any(|c| matches!(c, kiln_solver_protocol::CacheExport::Inline {}))
    {
        // BuildKit's inline cache: the result's records in each image's config.
        let entries = solver.cache_entries(false);
        for t in &mut results {
            if let Some(records) = remotecache::inline_records(&entries, &t.layers, request.source_date_epoch) {
                let config = t.config.get_or_insert_with(|| serde_json::json!({}));
                if let Some(obj) = config.as_object_mut() {
                    obj.insert("moby.buildkit.cache.v0".into(), serde_json::Value::String(records));
                }
            }
        }
    }
    let mut result = SolveResult {
        executed: solver.executed.load(std::sync::atomic::Ordering::Relaxed),
        cached: solver.cached.load(std::sync::atomic::Ordering::Relaxed),
        ..Default::default()
    };
    if !request.exporters.is_empty() {
        events.emit(Event::Progress {
            digest: None,
            id: "exporting".into(),
            current: 0,
            total: request.exporters.len() as u64,
            done: false,
        });
        solver.compressed().await;
        let root2 = root.clone();
        let exporters = request.exporters.clone();
        let epoch = request.source_date_epoch;
        let exported = tokio::task::spawn_blocking(move || export::export(&root2, &results, &exporters, epoch)).await;
        match exported {
            Ok(Ok((image, written))) => {
                result.exported = written;
                if let Some(img) = image {
                    let to_push: Vec<String> = request
                        .exporters
                        .iter()
                        .filter_map(|e| match e {
                            kiln_solver_protocol::Exporter::Image { names, push: true } => Some(names.clone()),
                            _ => None,
                        })
                        .flatten()
                        .collect();
                    let registry = kiln_oci::RegistryClient::new(kiln_oci::Credentials::from_docker_config());
                    for name in to_push {
                        let full = export::normalize_name(&name);
                        events.emit(Event::Progress {
                            digest: None,
                            id: format!("pushing {full}"),
                            current: 0,
                            total: 0,
                            done: false,
                        });
                        match kiln_oci::push_from_store(&registry, root.path(), &img.digest, &full).await {
                            Ok(r) => {
                                events.emit(Event::Progress {
                                    digest: None,
                                    id: format!(
                                        "pushing {full}: {} uploaded, {} already there, {} mounted",
                                        r.uploaded, r.existing, r.mounted
                                    ),
                                    current: 1,
                                    total: 1,
                                    done: true,
                                });
                                result.exported.push(format!("pushed {full}"));
                            }
                            Err(e) => {
                                let failure = Failure::Registry {
                                    image: full.clone(),
                                    message: e.to_string(),
                                };
                                return Err(SolveError::Export {
                                    what: "push".into(),
                                    failure,
                                });
                            }
                        }
                    }
                    result.image_digest = Some(img.digest);
                    result.config_digest = img.config_digest;
                }
            }
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(SolveError::Internal(format!("the export task ended: {e}"))),
        }
        events.emit(Event::Progress {
            digest: None,
            id: "exporting".into(),
            current: request.exporters.len() as u64,
            total: request.exporters.len() as u64,
            done: true,
        });
    }
    export_caches(root, solver, &request.cache_to, events).await?;
    if !request.cache_from.is_empty() {
        let (n, bytes) = root.fetched();
        events.emit(Event::Progress {
            digest: None,
            id: format!("cache layers fetched: {n} ({})", size(bytes)),
            current: 1,
            total: 1,
            done: true,
        });
    }
    Ok(result)
}

/// A byte count for people: `1.2 MB`.
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1_000_000_000 => format!("{:.1} GB", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}

/// Reads each `--cache-from` source, as a progress line with its size and
/// time; one that cannot be read is a warning (the build runs without it).
async fn import_caches(sources: &[kiln_solver_protocol::CacheImport], events: &Arc<dyn EventSink>) -> Vec<remotecache::Imported> {
    use kiln_solver_protocol::CacheImport;
    let mut out = Vec::new();
    for source in sources {
        let start = std::time::Instant::now();
        let (id, read) = match source {
            CacheImport::Local { src, tag } => (
                format!("importing cache from {src}"),
                remotecache::import_local(std::path::Path::new(src), tag.as_deref()),
            ),
            CacheImport::Registry { reference } => {
                let full = export::normalize_name(reference);
                (format!("importing cache from {full}"), remotecache::import_registry(&full).await)
            }
        };
        match read {
            Ok(imported) => {
                events.emit(Event::Progress {
                    digest: None,
                    id: format!(
                        "{id}: {} records, {} layers ({}), {} ms; layers are fetched when needed",
                        imported.len(),
                        imported.layers().0,
                        size(imported.layers().1),
                        start.elapsed().as_millis()
                    ),
                    current: 1,
                    total: 1,
                    done: true,
                });
                out.push(imported);
            }
            Err(why) => events.emit(Event::Log {
                digest: String::new(),
                stream: 2,
                data: format!("warning: {id}: {why}; building without it\n"),
            }),
        }
    }
    out
}

/// Writes the solve's cache to each `--cache-to` destination, as a progress
/// line with what was written and its time; a failure fails the build
/// unless the destination says `ignore-error=true`.
async fn export_caches(
    root: &Arc<root::StateRoot>,
    solver: &Arc<Solver>,
    destinations: &[kiln_solver_protocol::CacheExport],
    events: &Arc<dyn EventSink>,
) -> Result<(), SolveError> {
    use kiln_solver_protocol::{CacheExport, CacheMode};
    for dest in destinations {
        if matches!(dest, CacheExport::Inline {}) {
            continue; // in the image's config (see `run`)
        }
        let start = std::time::Instant::now();
        let (mode, ignore_error, with_mounts) = match dest {
            CacheExport::Local {
                mode,
                ignore_error,
                cache_mounts,
                ..
            }
            | CacheExport::Registry {
                mode,
                ignore_error,
                cache_mounts,
                ..
            } => (*mode, *ignore_error, *cache_mounts),
            CacheExport::Inline {} => continue,
        };
        let entries = solver.cache_entries(mode == CacheMode::Max);
        // The cache mounts this build used that exist, held while packed.
        let mut held = Vec::new();
        if with_mounts {
            for id in solver.cache_mount_ids() {
                match execute::cachemount::existing(root, &id) {
                    Ok(Some(acquired)) => held.push((id, acquired)),
                    Ok(None) => {}
                    Err(e) => {
                        return Err(SolveError::Export {
                            what: format!("cache mount {id:?}"),
                            failure: Failure::io(Some("locking"), &id)(e),
                        })
                    }
                }
            }
        }
        let mounts: Vec<(String, PathBuf)> = held.iter().map(|(id, a)| (id.clone(), a.dir.clone())).collect();
        let (dest, done) = match dest.clone() {
            CacheExport::Local { dest, tag, .. } => {
                let root2 = root.clone();
                let dir = PathBuf::from(&dest);
                let tag = tag.unwrap_or_else(|| "latest".into());
                let done = tokio::task::spawn_blocking(move || remotecache::export_local(&root2, &dir, &tag, &entries, &mounts))
                    .await
                    .unwrap_or_else(|e| Err(Failure::Internal(format!("the cache export task ended: {e}"))));
                (format!("type=local,dest={dest}"), done)
            }
            CacheExport::Registry { reference, .. } => {
                let full = export::normalize_name(&reference);
                let done = remotecache::export_registry(root, &full, &entries, &mounts).await;
                (format!("type=registry,ref={full}"), done)
            }
            CacheExport::Inline {} => continue,
        };
        drop(held);
        match done {
            Ok(x) => events.emit(Event::Progress {
                digest: None,
                id: format!(
                    "exporting cache {dest}: {} records, {} layers, {}, {} ms",
                    x.records,
                    x.layers,
                    x.sent,
                    start.elapsed().as_millis()
                ),
                current: 1,
                total: 1,
                done: true,
            }),
            Err(failure) if ignore_error => events.emit(Event::Log {
                digest: String::new(),
                stream: 2,
                data: format!("warning: exporting cache {dest}: {failure}\n"),
            }),
            Err(failure) => {
                return Err(SolveError::Export {
                    what: format!("cache {dest}"),
                    failure,
                })
            }
        }
    }
    Ok(())
}

/// A target platform (`None`: the only one, unnamed) and its image config.
type TargetSpec = (Option<String>, Option<serde_json::Value>);

/// The request's definition and image config for each target platform
/// (one, with no platform, for a single-platform build), and the one graph
/// they are solved as.
fn load_targets(request: &SolveRequest) -> Result<(LoadedDefinition, Vec<TargetSpec>), String> {
    let decode = |bytes: Vec<u8>| LoadedDefinition::decode(&bytes).map_err(|e| format!("the definition cannot be used: {e}"));
    if request.platforms.is_empty() {
        let def = decode(request.definition_bytes()?)?;
        return Ok((def, vec![(None, request.image_config.clone())]));
    }
    if !request.definition.is_empty() || request.image_config.is_some() {
        return Err("a request with `platforms` carries its definitions there: `definition` and `image_config` must be empty".into());
    }
    let mut defs = Vec::with_capacity(request.platforms.len());
    let mut targets: Vec<TargetSpec> = Vec::with_capacity(request.platforms.len());
    for p in &request.platforms {
        if kiln_image::Platform::parse(&p.platform).is_none() {
            return Err(format!("platform {:?} is not os/arch[/variant]", p.platform));
        }
        if targets.iter().any(|(q, _)| q.as_deref() == Some(p.platform.as_str())) {
            return Err(format!("platform {} is asked for twice", p.platform));
        }
        defs.push(decode(p.definition_bytes()?).map_err(|e| format!("{}: {e}", p.platform))?);
        targets.push((Some(p.platform.clone()), p.image_config.clone()));
    }
    Ok((LoadedDefinition::merge(defs), targets))
}
