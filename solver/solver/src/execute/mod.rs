//! Executing one op once the scheduler has decided it must run: image
//! sources are pulled, ExecOps run in the OCI runtime ([`step`], [`runc`]),
//! FileOps apply their actions ([`file`], [`fileop`]), MergeOps stack and
//! DiffOps compare layers ([`layers`]). Nothing here knows about cache keys.

pub(crate) mod cachemount;
pub(crate) mod emulate;
pub(crate) mod file;
pub(crate) mod fileop;
pub(crate) mod keep;
pub(crate) mod layers;
pub(crate) mod netns;
pub(crate) mod runc;
pub(crate) mod seccomp;
pub(crate) mod step;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_image::Platform;
use kiln_llb::pb;
use kiln_solver_protocol::Event;

use crate::cache::{self, read_record, write_record, Record};
use crate::error::{Failure, Stage, VertexError};
use crate::root::StateRoot;
use crate::schedule::background::lock;
use crate::schedule::EventSink;
use crate::snapshot::Layers;
use crate::source::context::{ChecksumCache, LocalSource};
use crate::source::pull::{self, PullProgress};

/// A vertex output.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    /// A filesystem made of layers.
    Layers(Layers),
    /// A local directory, used in place until something needs it as layers.
    Local(Arc<LocalSource>),
}

/// What executing ops needs from the solve: the state root, the runtime,
/// the registry, what steps may be given, and where events go.
pub(crate) struct Executor {
    pub(crate) root: Arc<StateRoot>,
    pub(crate) runtime: runc::Runtime,
    pub(crate) registry: kiln_oci::RegistryClient,
    secrets: kiln_solver_protocol::Secrets,
    ssh: BTreeMap<String, String>,
    events: Arc<dyn EventSink>,
    /// Checksums of local sources' files, by directory.
    checksums: Mutex<HashMap<PathBuf, Arc<ChecksumCache>>>,
    /// `--cache-from` caches (for cache mount contents).
    pub(crate) imports: Arc<Vec<crate::remotecache::Imported>>,
    /// `--on-error=keep=DIR`: where the first failed RUN step goes.
    pub(crate) keep_failed: Option<Arc<keep::KeepFailed>>,
}

/// The platform an op runs for (linux/amd64 when it names none).
pub(crate) fn platform_of(op: &pb::Op) -> Platform {
    match &op.platform {
        Some(p) if !p.os.is_empty() => Platform {
            os: p.os.clone(),
            architecture: p.architecture.clone(),
            variant: p.variant.clone(),
        },
        _ => Platform::linux_amd64(),
    }
}

impl Executor {
    /// An executor for one solve.
    pub(crate) fn new(
        root: Arc<StateRoot>,
        runtime: runc::Runtime,
        secrets: kiln_solver_protocol::Secrets,
        ssh: BTreeMap<String, String>,
        events: Arc<dyn EventSink>,
    ) -> Executor {
        Executor {
            root,
            runtime,
            registry: kiln_oci::RegistryClient::new(kiln_oci::Credentials::from_docker_config()),
            secrets,
            ssh,
            events,
            checksums: Mutex::new(HashMap::new()),
            imports: Arc::new(Vec::new()),
            keep_failed: None,
        }
    }

    /// The checksum cache of a local source's directory.
    pub(crate) fn checksum_cache(&self, dir: &Path) -> Arc<ChecksumCache> {
        lock(&self.checksums)
            .entry(dir.to_path_buf())
            .or_insert_with(|| Arc::new(ChecksumCache::load(&self.root, dir)))
            .clone()
    }

    /// Writes remembered checksums back to the state root.
    pub(crate) fn save_checksums(&self) {
        for c in lock(&self.checksums).values() {
            let _ = c.save();
        }
    }

    /// A value as layers, copying a local source into a layer if needed.
    pub(crate) async fn layers(&self, value: &Value) -> Result<Layers, Failure> {
        match value {
            Value::Layers(l) => Ok(l.clone()),
            Value::Local(local) => {
                let checksums = self.checksum_cache(&local.dir);
                let root = self.root.clone();
                tokio::task::block_in_place(|| {
                    let sum = local
                        .checksum(&checksums, "/", false)
                        .map_err(Failure::io(Some("checksum of"), local.dir.display()))?;
                    let key = cache::materialized_local_key(&local.dir, &sum);
                    if let Some(r) = read_record(&root, &key) {
                        if let Some(l) = r.outputs.into_iter().next() {
                            return Ok(Arc::new(l));
                        }
                    }
                    let id = file::materialize_local(&root, local)?;
                    let record = Record {
                        outputs: vec![vec![id.clone()]],
                        created: 0,
                        description: format!("local://{}", local.name),
                        parts: Default::default(),
                        key: None,
                    };
                    write_record(&root, &key, &record).map_err(Failure::io(Some("writing the cache record of"), local.dir.display()))?;
                    Ok(Arc::new(vec![id]))
                })
            }
        }
    }

    /// Runs `op` on its input values; returns the layers of each output.
    pub(crate) async fn execute(&self, digest: &str, op: &pb::Op, values: &[Option<Value>]) -> Result<Vec<Option<Layers>>, VertexError> {
        use pb::op::Op;
        let values: Vec<Value> = values
            .iter()
            .map(|v| {
                v.clone()
                    .ok_or_else(|| VertexError::at(Stage::Setup, Failure::invalid("missing input")))
            })
            .collect::<Result<_, _>>()?;
        match &op.op {
            Some(Op::Source(s)) => {
                let src = pull::parse_identifier(&s.identifier).ok_or_else(|| {
                    VertexError::at(
                        Stage::Unsupported,
                        Failure::invalid(format!("source {:?} is not supported by this solver yet", s.identifier)),
                    )
                })?;
                let platform = platform_of(op);
                let pinned = pull::pin(&self.registry, &src, &platform)
                    .await
                    .map_err(VertexError::during(Stage::Source))?;
                let progress = EventProgress {
                    events: self.events.clone(),
                    digest: digest.to_string(),
                };
                let image = pull::pull(&self.root, &self.registry, &src, &pinned, &platform, &progress)
                    .await
                    .map_err(VertexError::during(Stage::Source))?;
                Ok(vec![Some(Arc::new(image.layers))])
            }
            Some(Op::Exec(e)) => {
                let mut layers = Vec::new();
                for v in &values {
                    layers.push(self.layers(v).await.map_err(VertexError::during(Stage::Setup))?);
                }
                let events = self.events.clone();
                let d = digest.to_string();
                let on_output = move |stream: u8, bytes: &[u8]| {
                    events.emit(Event::Log {
                        digest: d.clone(),
                        stream,
                        data: String::from_utf8_lossy(bytes).into_owned(),
                    });
                };
                let id = format!("kiln-{}", self.root.unique());
                let warn_events = self.events.clone();
                let warn_digest = digest.to_string();
                let warn = move |message: &str| {
                    warn_events.emit(Event::Log {
                        digest: warn_digest.clone(),
                        stream: 2,
                        data: format!("{message}\n"),
                    })
                };
                let given = step::StepSecrets {
                    secrets: &self.secrets,
                    ssh: &self.ssh,
                    imports: &self.imports,
                    warn: &warn,
                };
                let emulator = match emulate::emulation(&platform_of(op)) {
                    Ok(emulate::Emulation::Emulator(path)) => Some(path),
                    Ok(_) => None,
                    Err(why) => return Err(VertexError::at(Stage::Setup, Failure::invalid(why))),
                };
                step::exec(
                    &self.root,
                    &self.runtime,
                    e,
                    &layers,
                    &given,
                    step::Launch {
                        id,
                        emulator,
                        keep: self.keep_failed.clone(),
                        say: &warn,
                    },
                    on_output,
                )
                .await
                .map_err(|failure| {
                    let stage = if failure.exit_code().is_some() { Stage::Run } else { Stage::Setup };
                    VertexError::at(stage, failure)
                })
            }
            Some(Op::File(f)) => {
                // Inputs used as a base must be layers; copy sources may stay local.
                let mut vals = Vec::new();
                for (i, v) in values.iter().enumerate() {
                    let base_use = f.actions.iter().any(|a| a.input == i as i64);
                    if base_use {
                        vals.push(Value::Layers(self.layers(v).await.map_err(VertexError::during(Stage::Setup))?));
                    } else {
                        vals.push(v.clone());
                    }
                }
                let root = self.root.clone();
                let f = f.clone();
                tokio::task::spawn_blocking(move || file::file(&root, &f, &vals))
                    .await
                    .map_err(|e| VertexError::at(Stage::File, Failure::Internal(format!("the file op's task ended: {e}"))))?
                    .map_err(VertexError::during(Stage::File))
            }
            Some(Op::Merge(m)) => {
                let mut all = Vec::new();
                for mi in &m.inputs {
                    let v = values
                        .get(mi.input as usize)
                        .ok_or_else(|| VertexError::at(Stage::Layers, Failure::invalid("merge input out of range")))?;
                    all.push(self.layers(v).await.map_err(VertexError::during(Stage::Layers))?);
                }
                Ok(vec![Some(layers::merge(&all))])
            }
            Some(Op::Diff(d)) => {
                let side = |i: Option<i64>| -> Option<&Value> { i.filter(|i| *i >= 0).and_then(|i| values.get(i as usize)) };
                let lower = match side(d.lower.as_ref().map(|l| l.input)) {
                    Some(v) => self.layers(v).await.map_err(VertexError::during(Stage::Layers))?,
                    None => Arc::new(Vec::new()),
                };
                let upper = match side(d.upper.as_ref().map(|u| u.input)) {
                    Some(v) => self.layers(v).await.map_err(VertexError::during(Stage::Layers))?,
                    None => Arc::new(Vec::new()),
                };
                let root = self.root.clone();
                let r = tokio::task::spawn_blocking(move || layers::diff(&root, &lower, &upper))
                    .await
                    .map_err(|e| VertexError::at(Stage::Layers, Failure::Internal(format!("the diff's task ended: {e}"))))?
                    .map_err(VertexError::during(Stage::Layers))?;
                Ok(vec![Some(r)])
            }
            _ => Err(VertexError::at(
                Stage::Unsupported,
                Failure::invalid("this op type is not supported by kiln's solver"),
            )),
        }
    }
}

/// Pull progress as events of the source's vertex.
struct EventProgress {
    events: Arc<dyn EventSink>,
    digest: String,
}

impl PullProgress for EventProgress {
    fn layer(&self, digest: &str, size: u64, done: bool) {
        self.events.emit(Event::Progress {
            digest: Some(self.digest.clone()),
            id: digest.to_string(),
            current: if done { size } else { 0 },
            total: size,
            done,
        });
    }
}
