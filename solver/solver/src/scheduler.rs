//! The scheduler: walks the Definition's DAG, computes each vertex's cache
//! key, reuses cached results, runs the rest as soon as their inputs are
//! ready (independent vertices concurrently, each vertex once), and reports
//! every step as an [`Event`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::{try_join_all, BoxFuture};
use kiln_image::Platform;
use kiln_llb::{pb, LoadedDefinition};
use kiln_solver_protocol::Event;
use tokio::sync::{OnceCell, Semaphore};

use crate::ahead::{self, CopyAhead};
use crate::cache::{self, read_record, write_record, LocalRead, Record};
use crate::context::{ChecksumCache, LocalSource};
use crate::error::{SolveError, Stage, VertexError};
use crate::exec::Runtime;
use crate::ops::{self, Value};
use crate::pull::{self, PullProgress};
use crate::root::StateRoot;
use crate::snapshot::Layers;

/// Where events go.
pub trait EventSink: Send + Sync {
    /// Sends one event.
    fn emit(&self, event: Event);
}

/// A finished vertex: its cache key and its outputs.
#[derive(Debug)]
pub(crate) struct Done {
    /// The cache key.
    pub key: String,
    /// Outputs by index.
    pub outputs: Vec<Option<Value>>,
    /// It ran in this solve (it was not found in the cache).
    pub ran: bool,
}

/// Options of one solve.
pub(crate) struct SolveOptions {
    /// Directories of `local://NAME` sources.
    pub locals: BTreeMap<String, PathBuf>,
    /// Ignore cached results.
    pub no_cache: bool,
    /// Cap on concurrent ExecOps.
    pub jobs: Option<usize>,
    /// The OCI runtime.
    pub runtime: Runtime,
    /// Secret values by id.
    pub secrets: kiln_solver_protocol::Secrets,
    /// SSH agent sockets by id.
    pub ssh: BTreeMap<String, String>,
    /// The exporters want an image: compress the result's layers as soon
    /// as they are made, with timestamps clamped to this SOURCE_DATE_EPOCH.
    pub image_layers: Option<Option<i64>>,
}

/// One solve of one Definition.
pub(crate) struct Solver {
    root: Arc<StateRoot>,
    def: LoadedDefinition,
    index: HashMap<String, usize>,
    cells: HashMap<String, OnceCell<Result<Arc<Done>, SolveError>>>,
    opts: SolveOptions,
    exec_slots: Option<Semaphore>,
    registry: kiln_oci::RegistryClient,
    events: Arc<dyn EventSink>,
    start: Instant,
    checksums: Mutex<HashMap<PathBuf, Arc<ChecksumCache>>>,
    locals: Mutex<HashMap<String, Arc<LocalSource>>>,
    /// Vertices whose new layer ends up in the result, by output index.
    result_layers: HashMap<String, i64>,
    /// Layers being compressed ahead of the export.
    compressing: Mutex<Vec<tokio::task::JoinHandle<Option<()>>>>,
    /// Vertices that ran.
    pub executed: AtomicU32,
    /// Vertices found in the cache.
    pub cached: AtomicU32,
}

/// Each op's position in the definition, by digest.
fn op_index(def: &LoadedDefinition) -> HashMap<String, usize> {
    def.ops
        .iter()
        .enumerate()
        .map(|(i, o)| (o.digest.as_str().to_string(), i))
        .collect()
}

/// The vertices (and output index) whose newest layer is part of the
/// definition's result: from the result, down the input each output is built
/// on (a FileOp's base, an ExecOp's root mount, every input of a MergeOp).
fn result_spine(def: &LoadedDefinition, index: &HashMap<String, usize>) -> HashMap<String, i64> {
    use pb::op::Op;
    let mut spine = HashMap::new();
    let Some(last) = def.ops.last() else {
        return spine;
    };
    let mut todo: Vec<(String, i64)> = last.op.inputs.iter().map(|i| (i.digest.clone(), i.index)).collect();
    while let Some((digest, out)) = todo.pop() {
        let Some(&i) = index.get(digest.as_str()) else { continue };
        if spine.insert(digest.clone(), out).is_some() {
            continue;
        }
        let op = &def.ops[i].op;
        if matches!(op.op, Some(Op::Merge(_))) {
            todo.extend(op.inputs.iter().map(|i| (i.digest.clone(), i.index)));
        }
        if let Some(inp) = base_input(op, out)
            .and_then(|b| usize::try_from(b).ok())
            .and_then(|b| op.inputs.get(b))
        {
            todo.push((inp.digest.clone(), inp.index));
        }
    }
    spine
}

/// The input an output is built on, whose layers it extends: a FileOp
/// output's base (through its chain of actions), an ExecOp's root mount.
fn base_input(op: &pb::Op, out: i64) -> Option<i64> {
    use pb::op::Op;
    match &op.op {
        Some(Op::Exec(e)) => e.mounts.iter().find(|m| m.output == out && m.dest == "/").map(|m| m.input),
        Some(Op::File(f)) => {
            let n = op.inputs.len() as i64;
            let mut action = f.actions.iter().position(|a| a.output == out);
            // Follow earlier actions' results back to an op input.
            while let Some(a) = action {
                let from = f.actions[a].input;
                if from < n {
                    return Some(from);
                }
                action = usize::try_from(from - n).ok().filter(|&b| b < a);
            }
            None
        }
        _ => None,
    }
}

/// Locks a mutex; a holder that panicked leaves data that is still whole
/// here (counters, maps and task lists updated in one step), so it is used
/// rather than read as "nothing there".
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many [`in_background`] threads are running.
static BACKGROUND: (Mutex<usize>, std::sync::Condvar) = (Mutex::new(0), std::sync::Condvar::new());

/// Runs `work` on a thread of its own at the lowest priority: work done
/// ahead of need uses only processor time nothing else wants.
async fn in_background<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let count = |delta: isize| {
        let mut n = lock(&BACKGROUND.0);
        *n = n.saturating_add_signed(delta);
        BACKGROUND.1.notify_all();
    };
    count(1);
    let spawned = std::thread::Builder::new().name("kiln-ahead".into()).spawn(move || {
        // Linux: the nice value of this thread only.
        let _ = rustix::process::setpriority_process(None, 19);
        let _ = tx.send(work());
        count(-1);
    });
    if spawned.is_err() {
        count(-1);
        return None;
    }
    rx.await.ok()
}

/// Waits (at most `limit`) for work started ahead of need that nobody
/// awaits any more, after a failure: it may hold mounts and temporary layers,
/// which it removes when it ends.
pub fn wait_for_background_work(limit: std::time::Duration) {
    let n = lock(&BACKGROUND.0);
    let _ = BACKGROUND.1.wait_timeout_while(n, limit, |n| *n > 0);
}

impl Solver {
    /// A solver for `def`.
    pub(crate) fn new(root: Arc<StateRoot>, def: LoadedDefinition, opts: SolveOptions, events: Arc<dyn EventSink>) -> Solver {
        let index = op_index(&def);
        let cells = def.ops.iter().map(|o| (o.digest.as_str().to_string(), OnceCell::new())).collect();
        let exec_slots = opts.jobs.map(|n| Semaphore::new(n.max(1)));
        let result_layers = if opts.image_layers.is_some() {
            result_spine(&def, &index)
        } else {
            HashMap::new()
        };
        Solver {
            root,
            def,
            index,
            cells,
            opts,
            exec_slots,
            registry: kiln_oci::RegistryClient::new(kiln_oci::Credentials::from_docker_config()),
            events,
            start: Instant::now(),
            checksums: Mutex::new(HashMap::new()),
            locals: Mutex::new(HashMap::new()),
            result_layers,
            compressing: Mutex::new(Vec::new()),
            executed: AtomicU32::new(0),
            cached: AtomicU32::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Solves the whole graph; returns the terminator's input value.
    pub(crate) async fn solve(self: &Arc<Self>) -> Result<Option<Value>, SolveError> {
        let last = self.def.ops.last().ok_or_else(|| SolveError::Internal("empty definition".into()))?;
        let input = last
            .op
            .inputs
            .first()
            .ok_or_else(|| SolveError::Internal("terminator has no input".into()))?;
        let done = self.vertex(&input.digest).await?;
        let value = done.outputs.get(input.index as usize).cloned().flatten();
        self.save_checksums();
        Ok(value)
    }

    /// Writes remembered checksums back to the state root.
    pub(crate) fn save_checksums(&self) {
        for c in lock(&self.checksums).values() {
            let _ = c.save();
        }
    }

    /// A vertex's result, computing it once. Each vertex runs as its own
    /// task, so independent vertices use every core; dropping the returned
    /// future (a sibling failed) aborts the task, whose guards then remove
    /// its containers, mounts and unfinished layers.
    fn vertex<'a>(self: &'a Arc<Self>, digest: &'a str) -> BoxFuture<'a, Result<Arc<Done>, SolveError>> {
        Box::pin(async move {
            let cell = self
                .cells
                .get(digest)
                .ok_or_else(|| SolveError::Internal(format!("unknown vertex {digest}")))?;
            cell.get_or_init(|| async {
                let me = self.clone();
                let d = digest.to_string();
                let mut task = AbortOnDrop(tokio::spawn(async move { me.compute(&d).await }));
                match (&mut task.0).await {
                    Ok(r) => r,
                    Err(e) => Err(SolveError::Internal(format!("vertex {digest}: {e}"))),
                }
            })
            .await
            .clone()
        })
    }

    /// The op's display name.
    pub(crate) fn name_of(&self, digest: &str) -> String {
        if let Some(m) = self.def.metadata.get(digest) {
            if let Some(n) = m.description.get("llb.customname") {
                return n.clone();
            }
        }
        let Some(&i) = self.index.get(digest) else {
            return digest.to_string();
        };
        use pb::op::Op;
        match &self.def.ops[i].op.op {
            Some(Op::Source(s)) => s.identifier.clone(),
            Some(Op::Exec(e)) => e.meta.as_ref().map(|m| m.args.join(" ")).unwrap_or_default(),
            Some(Op::File(f)) => {
                let kinds: Vec<&str> = f
                    .actions
                    .iter()
                    .map(|a| match &a.action {
                        Some(pb::file_action::Action::Copy(_)) => "copy",
                        Some(pb::file_action::Action::Mkfile(_)) => "mkfile",
                        Some(pb::file_action::Action::Mkdir(_)) => "mkdir",
                        Some(pb::file_action::Action::Rm(_)) => "rm",
                        Some(pb::file_action::Action::Symlink(_)) => "symlink",
                        None => "?",
                    })
                    .collect();
                kinds.join(", ")
            }
            Some(Op::Merge(_)) => "merge".into(),
            Some(Op::Diff(_)) => "diff".into(),
            _ => digest.to_string(),
        }
    }

    fn platform_of(op: &pb::Op) -> Platform {
        match &op.platform {
            Some(p) if !p.os.is_empty() => Platform {
                os: p.os.clone(),
                architecture: p.architecture.clone(),
                variant: p.variant.clone(),
            },
            _ => Platform::linux_amd64(),
        }
    }

    fn checksum_cache(&self, dir: &std::path::Path) -> Arc<ChecksumCache> {
        lock(&self.checksums)
            .entry(dir.to_path_buf())
            .or_insert_with(|| Arc::new(ChecksumCache::load(&self.root, dir)))
            .clone()
    }

    /// The key an input contributes to a consumer's key. A local source
    /// contributes the checksum of what the consumer reads of it: the copied
    /// paths for a FileOp that only copies from it, else all it includes.
    fn dependency_key(&self, op: &pb::Op, input_idx: usize, done: &Done, value: Option<&Value>, index: i64) -> Result<String, String> {
        let Some(Value::Local(local)) = value else {
            return Ok(cache::input_contribution(&done.key, index));
        };
        let checksums = self.checksum_cache(&local.dir);
        let selectors = copy_selectors(op, input_idx as i64);
        let reads = tokio::task::block_in_place(|| -> Result<Vec<LocalRead>, String> {
            match selectors {
                Some(sel) => sel
                    .into_iter()
                    .map(|(src, wildcard, follow)| {
                        let checksum = local
                            .checksum(&checksums, &src, wildcard)
                            .map_err(|e| format!("checksum of {src}: {e}"))?;
                        Ok(LocalRead {
                            whole: false,
                            path: src,
                            wildcard,
                            follow,
                            checksum,
                        })
                    })
                    .collect(),
                None => {
                    let checksum = local
                        .checksum(&checksums, "/", false)
                        .map_err(|e| format!("checksum of {}: {e}", local.dir.display()))?;
                    Ok(vec![LocalRead {
                        whole: true,
                        path: "/".into(),
                        wildcard: false,
                        follow: false,
                        checksum,
                    }])
                }
            }
        })?;
        Ok(cache::local_read_key(&done.key, &reads))
    }

    async fn compute(self: &Arc<Self>, digest: &str) -> Result<Arc<Done>, SolveError> {
        let idx = *self
            .index
            .get(digest)
            .ok_or_else(|| SolveError::Internal(format!("unknown vertex {digest}")))?;
        let op = &self.def.ops[idx].op;
        let (inputs, ahead) = match ahead::plan(op) {
            Some(dests) => self.inputs_copying_ahead(op, &dests).await?,
            None => (try_join_all(op.inputs.iter().map(|i| self.vertex(&i.digest))).await?, None),
        };
        let fail_at = |stage: Stage| {
            move |message: String| SolveError::Vertex {
                digest: digest.to_string(),
                error: VertexError::at(stage, message),
            }
        };
        let mut values: Vec<Option<Value>> = Vec::new();
        for (i, input) in op.inputs.iter().enumerate() {
            let v = inputs[i].outputs.get(input.index as usize).cloned().flatten();
            if v.is_none() {
                return Err(fail_at(Stage::Setup)(format!(
                    "input {} has no output {}",
                    input.digest, input.index
                )));
            }
            values.push(v);
        }
        let name = self.name_of(digest);
        let ignore_cache = self.opts.no_cache || self.def.metadata.get(digest).is_some_and(|m| m.ignore_cache);

        use pb::op::Op;
        // Local sources are used in place: no key from content here, no record.
        if let Some(Op::Source(s)) = &op.op {
            if let Some(local_name) = s.identifier.strip_prefix("local://") {
                let dir = self
                    .opts
                    .locals
                    .get(local_name)
                    .ok_or_else(|| fail_at(Stage::Source)(format!("local source {local_name:?} was not given a directory")))?;
                let attrs: BTreeMap<String, String> = s.attrs.clone().into_iter().collect();
                let source = LocalSource::new(local_name, dir.clone(), &attrs).map_err(fail_at(Stage::Source))?;
                let source = Arc::new(source);
                lock(&self.locals).insert(digest.to_string(), source.clone());
                let at = self.now_ms();
                self.events.emit(Event::VertexStarted {
                    digest: digest.to_string(),
                    name: name.clone(),
                    at_ms: at,
                });
                self.events.emit(Event::VertexCompleted {
                    digest: digest.to_string(),
                    at_ms: self.now_ms(),
                    duration_ms: 0,
                });
                let key = cache::local_source_key(&self.def.ops[idx].bytes);
                return Ok(Arc::new(Done {
                    key,
                    outputs: vec![Some(Value::Local(source))],
                    ran: false,
                }));
            }
        }

        // The key: the op with each input replaced by what it contributes.
        let key = {
            let mut keyed = op.clone();
            for (i, input) in op.inputs.iter().enumerate() {
                let dep = self
                    .dependency_key(op, i, &inputs[i], values[i].as_ref(), input.index)
                    .map_err(fail_at(Stage::Cache))?;
                keyed.inputs[i].digest = dep;
                keyed.inputs[i].index = 0;
            }
            let mut extra: Vec<u8> = Vec::new();
            if let Some(Op::Source(s)) = &op.op {
                if let Some(src) = pull::parse_identifier(&s.identifier) {
                    // Unpinned images are pinned now: the key is the content.
                    let pinned = pull::pin(&self.registry, &src, &Self::platform_of(op))
                        .await
                        .map_err(fail_at(Stage::Source))?;
                    extra.extend_from_slice(pinned.as_bytes());
                }
            }
            cache::vertex_key(&keyed, &extra)
        };

        if !ignore_cache {
            let found = tokio::task::block_in_place(|| read_record(&self.root, &key));
            if let Some(record) = found {
                if let Some(Op::Source(s)) = &op.op {
                    if let Some(src) = pull::parse_identifier(&s.identifier) {
                        if let Some(d) = &src.digest {
                            let _ = tokio::task::block_in_place(|| pull::remember_tag(&self.root, &src, d));
                        }
                    }
                }
                self.cached.fetch_add(1, Ordering::Relaxed);
                self.events.emit(Event::VertexCached {
                    digest: digest.to_string(),
                    name,
                    at_ms: self.now_ms(),
                });
                let outputs = record.outputs.into_iter().map(|l| Some(Value::Layers(Arc::new(l)))).collect();
                return Ok(Arc::new(Done { key, outputs, ran: false }));
            }
        }

        if matches!(op.op, Some(Op::Exec(_))) {
            // The first step to run makes the runtime's sealed copy while the
            // others prepare their root filesystems.
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.opts.runtime.prepare());
        }
        // A capped ExecOp waits for its turn before it counts as started.
        let _permit = match (&op.op, &self.exec_slots) {
            (Some(Op::Exec(_)), Some(s)) => Some(s.acquire().await.map_err(|e| fail_at(Stage::Setup)(e.to_string()))?),
            _ => None,
        };
        let started = Instant::now();
        self.events.emit(Event::VertexStarted {
            digest: digest.to_string(),
            name: name.clone(),
            at_ms: self.now_ms(),
        });
        let made_ahead = ahead.and_then(|a| values.first().and_then(|base| base.as_ref()).and_then(|base| a.settle(base)));
        let result = match made_ahead {
            Some(outputs) => Ok(outputs),
            None => self.execute(digest, op, &values).await,
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(outputs) => {
                let record = Record {
                    outputs: outputs
                        .iter()
                        .map(|o| o.as_ref().map(|l| l.as_ref().clone()).unwrap_or_default())
                        .collect(),
                    created: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    description: name,
                };
                tokio::task::block_in_place(|| write_record(&self.root, &key, &record))
                    .map_err(|e| fail_at(Stage::Cache)(format!("writing cache record: {e}")))?;
                self.executed.fetch_add(1, Ordering::Relaxed);
                self.compress_ahead(digest, &outputs, &inputs);
                self.events.emit(Event::VertexCompleted {
                    digest: digest.to_string(),
                    at_ms: self.now_ms(),
                    duration_ms,
                });
                Ok(Arc::new(Done {
                    key,
                    outputs: outputs.into_iter().map(|o| o.map(Value::Layers)).collect(),
                    ran: true,
                }))
            }
            Err(error) => {
                self.events.emit(Event::VertexFailed {
                    digest: digest.to_string(),
                    at_ms: self.now_ms(),
                    duration_ms,
                    error: error.message.clone(),
                    exit_code: error.exit_code,
                    stage: Some(error.stage),
                });
                Err(SolveError::Vertex {
                    digest: digest.to_string(),
                    error,
                })
            }
        }
    }

    /// Starts compressing the layer a vertex added, when that layer will be
    /// in the exported image, so the export finds its blob made.
    fn compress_ahead(&self, digest: &str, outputs: &[Option<Layers>], inputs: &[Arc<Done>]) {
        let (Some(&index), Some(epoch)) = (self.result_layers.get(digest), self.opts.image_layers) else {
            return;
        };
        let Some(Some(layers)) = outputs.get(index as usize) else {
            return;
        };
        let Some(id) = layers.last() else {
            return;
        };
        let inherited = inputs.iter().flat_map(|d| d.outputs.iter().flatten()).any(|v| match v {
            Value::Layers(l) => l.contains(id),
            Value::Local(_) => false,
        });
        if inherited {
            return;
        }
        let root = self.root.clone();
        let id = id.clone();
        let task = tokio::spawn(in_background(move || {
            // A failure here is met again, and reported, by the export.
            let _ = crate::export::layer_blob(&root, &id, epoch);
        }));
        lock(&self.compressing).push(task);
    }

    /// Waits for the compressions started ahead of the export.
    pub(crate) async fn compressed(&self) {
        let tasks: Vec<_> = lock(&self.compressing).drain(..).collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Awaits a copying FileOp's inputs (see [`ahead`]); when its sources are
    /// ready before its destination, makes the copy meanwhile on the finished
    /// part of the destination.
    async fn inputs_copying_ahead(
        self: &Arc<Self>,
        op: &pb::Op,
        dests: &[std::path::PathBuf],
    ) -> Result<(Vec<Arc<Done>>, Option<CopyAhead>), SolveError> {
        let (first, others) = op
            .inputs
            .split_first()
            .ok_or_else(|| SolveError::Internal("a copy without inputs".into()))?;
        let base = self.vertex(&first.digest);
        let rest = async {
            let done = try_join_all(others.iter().map(|i| self.vertex(&i.digest))).await?;
            // A source that ran gives the copy a new cache key: it will run
            // too. Otherwise it may well be found in the cache.
            if self.finished(first).is_some() || !(self.opts.no_cache || done.iter().any(|d| d.ran)) {
                return Ok((done, None));
            }
            let chain = self.base_chain(first);
            if !chain.iter().any(|i| self.finished(i).is_some()) {
                // Not even the bottom (an image, usually) is there yet.
                if let Some(bottom) = chain.last() {
                    let _ = self.vertex(&bottom.digest).await;
                }
            }
            if self.finished(first).is_some() {
                return Ok((done, None));
            }
            let Some(prefix) = chain.iter().find_map(|i| match self.finished(i) {
                Some(Value::Layers(l)) => Some(l),
                _ => None,
            }) else {
                return Ok((done, None));
            };
            let sources: Option<Vec<Value>> = others
                .iter()
                .zip(&done)
                .map(|(i, d)| d.outputs.get(i.index as usize).cloned().flatten())
                .collect();
            let Some(sources) = sources else {
                return Ok((done, None));
            };
            let (root, op, dests) = (self.root.clone(), op.clone(), dests.to_vec());
            let made = in_background(move || ahead::copy(&root, &op, &dests, prefix, &sources))
                .await
                .flatten();
            Ok((done, made))
        };
        // The first failure ends the wait, as for any other op.
        let (base, (rest, made)) = tokio::try_join!(base, rest)?;
        let mut inputs = vec![base];
        inputs.extend(rest);
        Ok((inputs, made))
    }

    /// An input's value, if its vertex has finished.
    fn finished(&self, input: &pb::Input) -> Option<Value> {
        let cell = self.cells.get(input.digest.as_str())?;
        match cell.get()? {
            Ok(done) => done.outputs.get(input.index as usize).cloned().flatten(),
            Err(_) => None,
        }
    }

    /// `input` and the bases below it, down to one built on nothing: each
    /// one's layers are a prefix of the layers of those above it.
    fn base_chain(&self, input: &pb::Input) -> Vec<pb::Input> {
        let mut chain = vec![input.clone()];
        while let Some(below) = chain.last().and_then(|i| {
            let op = &self.def.ops[*self.index.get(i.digest.as_str())?].op;
            op.inputs.get(usize::try_from(base_input(op, i.index)?).ok()?).cloned()
        }) {
            chain.push(below);
        }
        chain
    }

    /// A value as layers, copying a local source into a layer if needed.
    pub(crate) async fn layers(&self, value: &Value) -> Result<Layers, String> {
        match value {
            Value::Layers(l) => Ok(l.clone()),
            Value::Local(local) => {
                let cache = self.checksum_cache(&local.dir);
                let root = self.root.clone();
                tokio::task::block_in_place(|| {
                    let sum = local.checksum(&cache, "/", false).map_err(|e| e.to_string())?;
                    let key = cache::materialized_local_key(&local.dir, &sum);
                    if let Some(r) = read_record(&root, &key) {
                        if let Some(l) = r.outputs.into_iter().next() {
                            return Ok(Arc::new(l));
                        }
                    }
                    let id = ops::materialize_local(&root, local)?;
                    let record = Record {
                        outputs: vec![vec![id.clone()]],
                        created: 0,
                        description: format!("local://{}", local.name),
                    };
                    write_record(&root, &key, &record).map_err(|e| e.to_string())?;
                    Ok(Arc::new(vec![id]))
                })
            }
        }
    }

    async fn execute(&self, digest: &str, op: &pb::Op, values: &[Option<Value>]) -> Result<Vec<Option<Layers>>, VertexError> {
        use pb::op::Op;
        let values: Vec<Value> = values
            .iter()
            .map(|v| v.clone().ok_or_else(|| VertexError::at(Stage::Setup, "missing input")))
            .collect::<Result<_, _>>()?;
        match &op.op {
            Some(Op::Source(s)) => {
                let src = pull::parse_identifier(&s.identifier).ok_or_else(|| {
                    VertexError::at(
                        Stage::Unsupported,
                        format!("source {:?} is not supported by this solver yet", s.identifier),
                    )
                })?;
                let platform = Self::platform_of(op);
                let pinned = pull::pin(&self.registry, &src, &platform)
                    .await
                    .map_err(|e| VertexError::at(Stage::Source, e))?;
                let progress = EventProgress {
                    events: self.events.clone(),
                    digest: digest.to_string(),
                };
                let image = pull::pull(&self.root, &self.registry, &src, &pinned, &platform, &progress)
                    .await
                    .map_err(|e| VertexError::at(Stage::Source, format!("pulling {}: {e}", s.identifier)))?;
                Ok(vec![Some(Arc::new(image.layers))])
            }
            Some(Op::Exec(e)) => {
                let mut layers = Vec::new();
                for v in &values {
                    layers.push(self.layers(v).await.map_err(|e| VertexError::at(Stage::Setup, e))?);
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
                let given = ops::StepSecrets {
                    secrets: &self.opts.secrets,
                    ssh: &self.opts.ssh,
                };
                ops::exec(&self.root, &self.opts.runtime, e, &layers, &given, id, on_output)
                    .await
                    .map_err(|e| VertexError {
                        stage: if e.exit_code.is_some() { Stage::Run } else { Stage::Setup },
                        message: e.message,
                        exit_code: e.exit_code,
                    })
            }
            Some(Op::File(f)) => {
                // Inputs used as a base must be layers; copy sources may stay local.
                let mut vals = Vec::new();
                for (i, v) in values.iter().enumerate() {
                    let base_use = f.actions.iter().any(|a| a.input == i as i64);
                    if base_use {
                        vals.push(Value::Layers(self.layers(v).await.map_err(|e| VertexError::at(Stage::Setup, e))?));
                    } else {
                        vals.push(v.clone());
                    }
                }
                let root = self.root.clone();
                let f = f.clone();
                tokio::task::spawn_blocking(move || ops::file(&root, &f, &vals))
                    .await
                    .map_err(|e| VertexError::at(Stage::File, e.to_string()))?
                    .map_err(|e| VertexError::at(Stage::File, e))
            }
            Some(Op::Merge(m)) => {
                let mut all = Vec::new();
                for mi in &m.inputs {
                    let v = values
                        .get(mi.input as usize)
                        .ok_or_else(|| VertexError::at(Stage::Layers, "merge input out of range"))?;
                    all.push(self.layers(v).await.map_err(|e| VertexError::at(Stage::Layers, e))?);
                }
                Ok(vec![Some(ops::merge(&all))])
            }
            Some(Op::Diff(d)) => {
                let side = |i: Option<i64>| -> Option<&Value> { i.filter(|i| *i >= 0).and_then(|i| values.get(i as usize)) };
                let lower = match side(d.lower.as_ref().map(|l| l.input)) {
                    Some(v) => self.layers(v).await.map_err(|e| VertexError::at(Stage::Layers, e))?,
                    None => Arc::new(Vec::new()),
                };
                let upper = match side(d.upper.as_ref().map(|u| u.input)) {
                    Some(v) => self.layers(v).await.map_err(|e| VertexError::at(Stage::Layers, e))?,
                    None => Arc::new(Vec::new()),
                };
                let root = self.root.clone();
                let r = tokio::task::spawn_blocking(move || ops::diff(&root, &lower, &upper))
                    .await
                    .map_err(|e| VertexError::at(Stage::Layers, e.to_string()))?
                    .map_err(|e| VertexError::at(Stage::Layers, e))?;
                Ok(vec![Some(r)])
            }
            _ => Err(VertexError::at(
                Stage::Unsupported,
                "this op type is not supported by kiln's solver",
            )),
        }
    }
}

/// Secrets and SSH agents that steps require but the request does not
/// give, as messages naming the step: checked before anything runs.
pub(crate) fn missing_secrets(
    def: &LoadedDefinition,
    secrets: &kiln_solver_protocol::Secrets,
    ssh: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for op in &def.ops {
        let Some(pb::op::Op::Exec(e)) = &op.op.op else { continue };
        let step = def
            .metadata
            .get(op.digest.as_str())
            .and_then(|m| m.description.get("llb.customname").cloned())
            .unwrap_or_else(|| e.meta.as_ref().map(|m| m.args.join(" ")).unwrap_or_default());
        for se in &e.secretenv {
            if !se.optional && !secrets.contains(&se.id) {
                out.push(format!(
                    "secret {:?} (env {}) is required by {step}; pass --secret id={},src=FILE|env=VAR",
                    se.id, se.name, se.id
                ));
            }
        }
        for m in &e.mounts {
            if let Some(s) = &m.secret_opt {
                if m.mount_type == pb::MountType::Secret as i32 && !s.optional && !secrets.contains(&s.id) {
                    out.push(format!(
                        "secret {:?} is required by {step}; pass --secret id={},src=FILE|env=VAR",
                        s.id, s.id
                    ));
                }
            }
            if let Some(s) = &m.ssh_opt {
                let id = if s.id.is_empty() { "default" } else { s.id.as_str() };
                if m.mount_type == pb::MountType::Ssh as i32 && !s.optional && !ssh.contains_key(id) {
                    out.push(format!("SSH agent {id:?} is required by {step}; pass --ssh {id}[=SOCKET]"));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// For a FileOp whose input `i` is only read by copies, the copies' source
/// selectors `(src, allow_wildcard, follow_symlink)`.
fn copy_selectors(op: &pb::Op, i: i64) -> Option<Vec<(String, bool, bool)>> {
    let Some(pb::op::Op::File(f)) = &op.op else { return None };
    let mut out = Vec::new();
    for a in &f.actions {
        if a.input == i {
            return None;
        }
        if a.secondary_input == i {
            match &a.action {
                Some(pb::file_action::Action::Copy(c)) => out.push((c.src.clone(), c.allow_wildcard, c.follow_symlink)),
                _ => return None,
            }
        }
    }
    Some(out)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_llb::builder::{Exec, FileInput, FileOp, State, VertexMeta};

    fn copy(src: &str, dest: &str) -> pb::file_action::Action {
        pb::file_action::Action::Copy(pb::FileActionCopy {
            src: src.into(),
            dest: dest.into(),
            ..Default::default()
        })
    }

    fn run(base: &State, script: &str) -> State {
        let exec = Exec {
            meta: pb::Meta {
                args: vec!["sh".into(), "-c".into(), script.into()],
                cwd: "/".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        base.run(exec, VertexMeta::default()).root
    }

    fn kinds(def: &LoadedDefinition, spine: &HashMap<String, i64>) -> Vec<String> {
        let mut v: Vec<String> = def
            .ops
            .iter()
            .filter(|o| spine.contains_key(o.digest.as_str()))
            .map(|o| match &o.op.op {
                Some(pb::op::Op::Source(s)) => s.identifier.clone(),
                Some(pb::op::Op::Exec(e)) => e.meta.as_ref().map(|m| m.args[2].clone()).unwrap_or_default(),
                Some(pb::op::Op::File(f)) => format!("file {}", f.actions.len()),
                Some(pb::op::Op::Merge(_)) => "merge".into(),
                _ => "?".into(),
            })
            .collect();
        v.sort();
        v
    }

    fn spine_of(result: &State) -> (LoadedDefinition, HashMap<String, i64>) {
        let def = LoadedDefinition::from_definition(result.marshal(Vec::new())).expect("definition");
        let spine = result_spine(&def, &op_index(&def));
        (def, spine)
    }

    #[test]
    fn the_result_spine_follows_bases_not_copy_sources() {
        let base = State::source("docker-image://busybox", BTreeMap::new(), None, VertexMeta::default());
        let other = State::source("docker-image://alpine", BTreeMap::new(), None, VertexMeta::default());
        let built = run(&other, "make");
        let stage = run(&base, "install");
        // COPY --from=built /out /out, then a second FileOp of two chained actions.
        let step1 = State::file(
            FileOp::default().then(&stage, FileInput::State(built.clone()), copy("/out", "/out")),
            VertexMeta::default(),
        );
        let step2 = State::file(
            FileOp::default()
                .then(&step1, FileInput::State(built), copy("/a", "/a"))
                .then(&step1, FileInput::Empty, copy("/b", "/b")),
            VertexMeta::default(),
        );
        let (def, spine) = spine_of(&step2);
        // The image's layers: busybox, install's, and the two FileOps' own;
        // not alpine's nor make's, which only feed copies.
        assert_eq!(kinds(&def, &spine), ["docker-image://busybox", "file 1", "file 2", "install"]);
    }

    #[test]
    fn a_merge_puts_every_input_on_the_spine() {
        let a = State::source("docker-image://busybox", BTreeMap::new(), None, VertexMeta::default());
        let b = State::source("docker-image://alpine", BTreeMap::new(), None, VertexMeta::default());
        let merged = State::merge(&[run(&a, "one"), run(&b, "two")], VertexMeta::default());
        let (def, spine) = spine_of(&merged);
        assert_eq!(
            kinds(&def, &spine),
            ["docker-image://alpine", "docker-image://busybox", "merge", "one", "two"]
        );
    }
}
