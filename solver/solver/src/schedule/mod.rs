//! The scheduler: walks the Definition's DAG, computes each vertex's cache
//! key, reuses cached results, runs the rest as soon as their inputs are
//! ready (independent vertices concurrently, each vertex once), and reports
//! every step as an [`Event`].

pub(crate) mod ahead;
pub(crate) mod background;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::{try_join_all, BoxFuture};
use kiln_llb::{pb, LoadedDefinition};
use kiln_solver_protocol::Event;
use tokio::sync::{OnceCell, Semaphore};

use self::ahead::CopyAhead;
pub use self::background::wait_for_background_work;
use self::background::{in_background, lock};
use crate::cache::{self, read_record, write_record, LocalRead, Record};
use crate::error::{Failure, SolveError, Stage, VertexError};
use crate::execute::{self, Executor, Value};
use crate::history::{self, InputReads, Recorder};
use crate::root::StateRoot;
use crate::snapshot::contentsum::{stack_sums, Selector};
use crate::snapshot::Layers;
use crate::source::context::LocalSource;
use crate::source::pull;
use kiln_solver_protocol::history::StepStatus;

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
    /// Its definition key ([`DefKey`]), when it has one that differs from `key`.
    pub def_key: Option<String>,
    /// Outputs by index.
    pub outputs: Vec<Option<Value>>,
    /// It ran in this solve (it was not found in the cache).
    pub ran: bool,
}

/// A vertex's definition key (`cache.rs` rule 6): its key with every
/// input that is not a local source contributing its own definition key,
/// so it is known before any input has a result.
#[derive(Debug, Clone)]
struct DefKey {
    /// `None`: the vertex or one of its inputs ignores the cache.
    key: Option<String>,
    /// The digest an image source is pinned to.
    pinned: String,
}

/// Options of one solve.
pub(crate) struct SolveOptions {
    /// Directories of `local://NAME` sources.
    pub locals: BTreeMap<String, PathBuf>,
    /// Ignore cached results.
    pub no_cache: bool,
    /// Cap on concurrent ExecOps.
    pub jobs: Option<usize>,
    /// The exporters want an image: compress the result's layers as soon
    /// as they are made, with timestamps clamped to this SOURCE_DATE_EPOCH.
    pub image_layers: Option<Option<i64>>,
    /// `--cache-from` caches, asked in order when the state root has no record.
    pub imports: Arc<Vec<crate::remotecache::Imported>>,
}

/// One solve of one Definition.
pub(crate) struct Solver {
    root: Arc<StateRoot>,
    def: LoadedDefinition,
    index: HashMap<String, usize>,
    cells: HashMap<String, OnceCell<Result<Arc<Done>, SolveError>>>,
    def_keys: HashMap<String, OnceCell<Result<DefKey, SolveError>>>,
    opts: SolveOptions,
    exec_slots: Option<Semaphore>,
    /// Runs the ops that are not found in the cache.
    exec: Executor,
    events: Arc<dyn EventSink>,
    start: Instant,
    locals: Mutex<HashMap<String, Arc<LocalSource>>>,
    /// Vertices whose new layer ends up in the result, by output index.
    result_layers: HashMap<String, i64>,
    /// Layers being compressed ahead of the export.
    compressing: Mutex<Vec<tokio::task::JoinHandle<Option<()>>>>,
    /// Records [`Self::would_hit`] read, by key, for the vertex's own lookup.
    peeked: Mutex<HashMap<String, Record>>,
    /// Vertices whose cache import failed, said once each.
    import_warned: Mutex<std::collections::HashSet<String>>,
    /// Vertices that ran.
    pub executed: AtomicU32,
    /// Vertices found in the cache.
    pub cached: AtomicU32,
    /// The build's history and cache-miss explanations, when the request says what the build is.
    pub history: Option<Arc<Recorder>>,
}

/// Runs a few small reads or writes of the state root's own files (a cache
/// record, a remembered tag) on the calling worker. `block_in_place` hands
/// the worker's queue to another thread, starting one when none is idle,
/// which costs more than such I/O: a warm build started ten threads for it.
fn small_io<T>(io: impl FnOnce() -> T) -> T {
    io()
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

impl Solver {
    /// A solver for `def`, running ops with `exec`.
    pub(crate) fn new(
        root: Arc<StateRoot>,
        def: LoadedDefinition,
        opts: SolveOptions,
        exec: Executor,
        events: Arc<dyn EventSink>,
    ) -> Solver {
        let index = op_index(&def);
        let cells = def.ops.iter().map(|o| (o.digest.as_str().to_string(), OnceCell::new())).collect();
        let def_keys = def.ops.iter().map(|o| (o.digest.as_str().to_string(), OnceCell::new())).collect();
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
            def_keys,
            opts,
            exec_slots,
            exec,
            events,
            start: Instant::now(),
            locals: Mutex::new(HashMap::new()),
            result_layers,
            compressing: Mutex::new(Vec::new()),
            import_warned: Mutex::new(Default::default()),
            peeked: Mutex::new(HashMap::new()),
            executed: AtomicU32::new(0),
            cached: AtomicU32::new(0),
            history: None,
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Solves the whole graph; returns the value of each of the
    /// terminator's inputs (one per target platform), all solved at once.
    pub(crate) async fn solve(self: &Arc<Self>) -> Result<Vec<Option<Value>>, SolveError> {
        let last = self.def.ops.last().ok_or_else(|| SolveError::Internal("empty definition".into()))?;
        if last.op.inputs.is_empty() {
            return Err(SolveError::Internal("terminator has no input".into()));
        }
        let done = futures::future::try_join_all(last.op.inputs.iter().map(|i| self.vertex(&i.digest))).await?;
        let values = done
            .iter()
            .zip(&last.op.inputs)
            .map(|(d, i)| d.outputs.get(i.index as usize).cloned().flatten())
            .collect();
        self.save_checksums();
        Ok(values)
    }

    /// Writes remembered checksums back to the state root.
    pub(crate) fn save_checksums(&self) {
        self.exec.save_checksums();
    }

    /// The result's value as layers (a local source copied into one).
    pub(crate) async fn layers(&self, value: &Value) -> Result<Layers, Failure> {
        self.exec.layers(value).await
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

    /// A vertex's definition key, computed once: from its op and its
    /// inputs' definition keys (a local source's: what the vertex reads of
    /// it), never from their results, so nothing runs or is fetched for it.
    fn def_key<'a>(self: &'a Arc<Self>, digest: &'a str) -> BoxFuture<'a, Result<DefKey, SolveError>> {
        Box::pin(async move {
            let cell = self
                .def_keys
                .get(digest)
                .ok_or_else(|| SolveError::Internal(format!("unknown vertex {digest}")))?;
            cell.get_or_init(|| self.compute_def_key(digest)).await.clone()
        })
    }

    async fn compute_def_key(self: &Arc<Self>, digest: &str) -> Result<DefKey, SolveError> {
        let idx = *self
            .index
            .get(digest)
            .ok_or_else(|| SolveError::Internal(format!("unknown vertex {digest}")))?;
        let op = &self.def.ops[idx].op;
        let fail_at = |stage: Stage| {
            move |failure: Failure| SolveError::Vertex {
                digest: digest.to_string(),
                error: VertexError::at(stage, failure),
            }
        };
        let usable = !self.ignores_cache(digest);
        let none = DefKey {
            key: None,
            pinned: String::new(),
        };
        if let Some(pb::op::Op::Source(s)) = &op.op {
            if s.identifier.starts_with("local://") {
                return Ok(none); // its consumers' keys cover what they read of it
            }
            let mut pinned = String::new();
            if let Some(src) = pull::parse_identifier(&s.identifier) {
                // Unpinned images are pinned now: the key is the content.
                pinned = pull::pin(&self.exec.registry, &src, &execute::platform_of(op))
                    .await
                    .map_err(fail_at(Stage::Source))?;
            }
            let key = cache::vertex_key(op, pinned.as_bytes());
            return Ok(DefKey {
                key: usable.then_some(key),
                pinned,
            });
        }
        let inputs = try_join_all(op.inputs.iter().map(|input| async move {
            if self.is_local_source(&input.digest) {
                return Ok(None);
            }
            self.def_key(&input.digest).await.map(Some)
        }))
        .await?;
        let mut keyed = op.clone();
        for (i, (input, def)) in op.inputs.iter().zip(inputs).enumerate() {
            let contribution = match def {
                Some(DefKey { key: Some(k), .. }) => cache::input_contribution(&k, input.index),
                Some(DefKey { key: None, .. }) => return Ok(none),
                None => {
                    let done = self.vertex(&input.digest).await?;
                    let value = done.outputs.get(input.index as usize).cloned().flatten();
                    self.dependency_key(op, i, &done, value.as_ref(), input.index)
                        .map_err(fail_at(Stage::Cache))?
                        .0
                }
            };
            keyed.inputs[i].digest = contribution;
            keyed.inputs[i].index = 0;
        }
        Ok(DefKey {
            key: usable.then(|| cache::vertex_key(&keyed, b"")),
            pinned: String::new(),
        })
    }

    /// The op is `local://…`.
    fn is_local_source(&self, digest: &str) -> bool {
        self.index
            .get(digest)
            .is_some_and(|&i| matches!(&self.def.ops[i].op.op, Some(pb::op::Op::Source(s)) if s.identifier.starts_with("local://")))
    }

    /// `--no-cache`, or the vertex's own no-cache flag.
    fn ignores_cache(&self, digest: &str) -> bool {
        self.opts.no_cache || self.def.metadata.get(digest).is_some_and(|m| m.ignore_cache)
    }

    /// The record of `key`: this root's (read already by [`Self::would_hit`],
    /// or now), else a `--cache-from` cache's.
    fn find(&self, digest: &str, key: &str, name: &str) -> Option<Record> {
        if let Some(record) = lock(&self.peeked).remove(key) {
            return Some(record);
        }
        read_record(&self.root, key).or_else(|| self.imported(digest, key, name))
    }

    /// Whether a vertex not computed yet would be found in a cache by its
    /// definition key (a local source always is: it is used in place).
    async fn would_hit(self: &Arc<Self>, digest: &str) -> bool {
        if self.cells.get(digest).is_none_or(|c| c.initialized()) {
            return false;
        }
        if self.is_local_source(digest) {
            return true;
        }
        let Ok(DefKey { key: Some(key), .. }) = self.def_key(digest).await else {
            return false;
        };
        small_io(|| match read_record(&self.root, &key) {
            Some(record) => {
                lock(&self.peeked).insert(key, record);
                true
            }
            None => self.opts.imports.iter().any(|i| i.holds(&self.root, &key)),
        })
    }

    /// After a vertex was found by its definition key: its inputs that a
    /// cache also holds are shown as cached (as a build that walks every
    /// step shows them); the others are not needed and neither run nor load.
    async fn show_cached_inputs(self: &Arc<Self>, op: &pb::Op) {
        let mut digests: Vec<&str> = op.inputs.iter().map(|i| i.digest.as_str()).collect();
        digests.sort_unstable();
        digests.dedup();
        futures::future::join_all(digests.into_iter().map(|d| async move {
            if self.would_hit(d).await {
                // A failure here belongs to whoever needs the vertex's result.
                let _ = self.vertex(d).await;
            }
        }))
        .await;
    }

    /// Also keeps a result under its definition key when that differs,
    /// so the next build finds it without its inputs' results.
    fn alias(&self, def_key: &str, key: &str, record: &Record) {
        if def_key == key || self.root.record_path(def_key).is_file() {
            return;
        }
        let alias = Record {
            key: Some(key.to_string()),
            parts: Default::default(),
            ..record.clone()
        };
        // Only a shortcut: a failure to write costs the next build a few checksums.
        let _ = write_record(&self.root, def_key, &alias);
    }

    /// What the history keeps of a step (its key's parts are added if it runs).
    fn draft(&self, digest: &str, op: &pb::Op, name: &str, key: &str) -> history::Draft {
        history::Draft {
            digest: digest.to_string(),
            name: name.to_string(),
            location: history::location(&self.def, digest),
            key: key.to_string(),
            parts: BTreeMap::new(),
            inputs: op.inputs.iter().map(|i| i.digest.to_string()).collect(),
        }
    }

    /// A vertex found in a cache: shown as cached and kept in the history.
    fn hit(&self, digest: &str, op: &pb::Op, name: String, key: String, def_key: Option<String>, record: Record) -> Arc<Done> {
        self.cached.fetch_add(1, Ordering::Relaxed);
        let at_ms = self.now_ms();
        if let Some(h) = &self.history {
            h.add(self.draft(digest, op, &name, &key), StepStatus::Cached, at_ms, 0, None);
        }
        self.events.emit(Event::VertexCached {
            digest: digest.to_string(),
            name,
            at_ms,
        });
        let outputs = record.outputs.into_iter().map(|l| Some(Value::Layers(Arc::new(l)))).collect();
        Arc::new(Done {
            def_key: def_key.filter(|d| *d != key),
            key,
            outputs,
            ran: false,
        })
    }

    /// A result from a `--cache-from` cache, made a record of this root.
    /// A cache that holds the key but not intact is a miss, said in a log line.
    fn imported(&self, digest: &str, key: &str, name: &str) -> Option<cache::Record> {
        for imported in self.opts.imports.iter() {
            match imported.take(&self.root, key) {
                Ok(Some(outputs)) => {
                    let record = cache::Record {
                        outputs,
                        created: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0),
                        description: name.to_string(),
                        parts: Default::default(),
                        key: None,
                    };
                    // Kept for the next build; a failure to write only costs that.
                    let _ = cache::write_record(&self.root, key, &record);
                    return Some(record);
                }
                Ok(None) => {}
                // Said once per vertex (it is asked by both its keys).
                Err(_) if !lock(&self.import_warned).insert(digest.to_string()) => {}
                Err(why) => self.events.emit(Event::Log {
                    digest: digest.to_string(),
                    stream: 2,
                    data: format!("cache import: {why}; running the step instead\n"),
                }),
            }
        }
        None
    }

    /// The ids of this solve's cache mounts.
    pub(crate) fn cache_mount_ids(&self) -> Vec<String> {
        cache_mount_ids(&self.def)
    }

    /// The cache of this solve for `--cache-to`: each vertex's key and
    /// outputs' layers; `all` every vertex with layers (mode=max), else
    /// those whose layers make the results (mode=min).
    pub(crate) fn cache_entries(&self, all: bool) -> Vec<(String, Vec<Vec<String>>)> {
        let spine = if all {
            HashMap::new()
        } else {
            result_spine(&self.def, &self.index)
        };
        let mut out = Vec::new();
        for op in &self.def.ops {
            let digest = op.digest.as_str();
            if !all && !spine.contains_key(digest) {
                continue;
            }
            let Some(Some(Ok(done))) = self.cells.get(digest).map(|c| c.get()) else {
                continue;
            };
            let outputs: Option<Vec<Vec<String>>> = done
                .outputs
                .iter()
                .map(|v| match v {
                    Some(Value::Layers(l)) => Some(l.as_ref().clone()),
                    _ => None,
                })
                .collect();
            if let Some(outputs) = outputs.filter(|o| !o.is_empty()) {
                if let Some(def_key) = &done.def_key {
                    out.push((def_key.clone(), outputs.clone()));
                }
                out.push((done.key.clone(), outputs));
            }
        }
        out
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

    /// The key an input contributes to a consumer's key. A local source
    /// contributes the checksum of what the consumer reads of it: the copied
    /// paths for a FileOp that only copies from it, else all it includes.
    /// Another vertex's output contributes the content the consumer reads
    /// of it when it only reads ([`content_selectors`]), else its key.
    fn dependency_key(
        &self,
        op: &pb::Op,
        input_idx: usize,
        done: &Done,
        value: Option<&Value>,
        index: i64,
    ) -> Result<(String, Option<InputReads>), Failure> {
        let local = match value {
            Some(Value::Local(local)) => local,
            Some(Value::Layers(layers)) => {
                let Some(selectors) = content_selectors(op, input_idx as i64) else {
                    return Ok((cache::input_contribution(&done.key, index), None));
                };
                let sums = tokio::task::block_in_place(|| stack_sums(&self.root, layers, &selectors))
                    .map_err(Failure::io(Some("checksum of"), self.name_of(&op.inputs[input_idx].digest)))?;
                return Ok((cache::content_read_key(&selectors, &sums), None));
            }
            None => return Ok((cache::input_contribution(&done.key, index), None)),
        };
        let checksums = self.exec.checksum_cache(&local.dir);
        let selectors = copy_selectors(op, input_idx as i64);
        let reads = tokio::task::block_in_place(|| -> Result<Vec<LocalRead>, Failure> {
            match selectors {
                Some(sel) => sel
                    .into_iter()
                    .map(|(src, wildcard, follow)| {
                        let checksum = local
                            .checksum(&checksums, &src, wildcard)
                            .map_err(Failure::io(Some("checksum of"), &src))?;
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
                        .map_err(Failure::io(Some("checksum of"), local.dir.display()))?;
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
        let key = cache::local_read_key(&done.key, &reads);
        Ok((
            key,
            Some(InputReads {
                source: local.clone(),
                cache: checksums,
                reads,
            }),
        ))
    }

    async fn compute(self: &Arc<Self>, digest: &str) -> Result<Arc<Done>, SolveError> {
        let idx = *self
            .index
            .get(digest)
            .ok_or_else(|| SolveError::Internal(format!("unknown vertex {digest}")))?;
        let op = &self.def.ops[idx].op;
        use pb::op::Op;
        if !matches!(op.op, Some(Op::Source(_))) {
            // Found by its definition key: its inputs' results are not needed.
            let def = self.def_key(digest).await?;
            if let Some(def_key) = def.key {
                let name = self.name_of(digest);
                if let Some(record) = small_io(|| self.find(digest, &def_key, &name)) {
                    self.show_cached_inputs(op).await;
                    let key = record.key.clone().unwrap_or_else(|| def_key.clone());
                    return Ok(self.hit(digest, op, name, key, Some(def_key), record));
                }
            }
        }
        let (inputs, ahead) = match ahead::plan(op) {
            Some(dests) => self.inputs_copying_ahead(op, &dests).await?,
            None => (try_join_all(op.inputs.iter().map(|i| self.vertex(&i.digest))).await?, None),
        };
        let fail_at = |stage: Stage| {
            move |failure: Failure| SolveError::Vertex {
                digest: digest.to_string(),
                error: VertexError::at(stage, failure),
            }
        };
        let mut values: Vec<Option<Value>> = Vec::new();
        for (i, input) in op.inputs.iter().enumerate() {
            let v = inputs[i].outputs.get(input.index as usize).cloned().flatten();
            if v.is_none() {
                return Err(fail_at(Stage::Setup)(Failure::invalid(format!(
                    "input {} has no output {}",
                    input.digest, input.index
                ))));
            }
            values.push(v);
        }
        let name = self.name_of(digest);
        let ignore_cache = self.ignores_cache(digest);

        // Local sources are used in place: no key from content here, no record.
        if let Some(Op::Source(s)) = &op.op {
            if let Some(local_name) = s.identifier.strip_prefix("local://") {
                let dir = self.opts.locals.get(local_name).ok_or_else(|| {
                    fail_at(Stage::Source)(Failure::invalid(format!("local source {local_name:?} was not given a directory")))
                })?;
                let attrs: BTreeMap<String, String> = s.attrs.clone().into_iter().collect();
                let source = LocalSource::new(local_name, dir.clone(), &attrs).map_err(fail_at(Stage::Source))?;
                let source = Arc::new(source);
                lock(&self.locals).insert(digest.to_string(), source.clone());
                let at = self.now_ms();
                self.events.emit(Event::VertexStarted {
                    digest: digest.to_string(),
                    name: name.clone(),
                    at_ms: at,
                    explain: None,
                });
                self.events.emit(Event::VertexCompleted {
                    digest: digest.to_string(),
                    at_ms: self.now_ms(),
                    duration_ms: 0,
                });
                let key = cache::local_source_key(&self.def.ops[idx].bytes);
                if let Some(h) = &self.history {
                    let draft = history::Draft {
                        digest: digest.to_string(),
                        name: name.clone(),
                        location: None,
                        key: key.clone(),
                        parts: BTreeMap::new(),
                        inputs: Vec::new(),
                    };
                    h.add(draft, StepStatus::Local, at, 0, None);
                }
                return Ok(Arc::new(Done {
                    key,
                    def_key: None,
                    outputs: vec![Some(Value::Local(source))],
                    ran: false,
                }));
            }
        }

        // The key: the op with each input replaced by what it contributes.
        let mut reads: Vec<InputReads> = Vec::new();
        let mut contributions: Vec<String> = Vec::with_capacity(op.inputs.len());
        let mut keyed = op.clone();
        for (i, input) in op.inputs.iter().enumerate() {
            let (dep, read) = self
                .dependency_key(op, i, &inputs[i], values[i].as_ref(), input.index)
                .map_err(fail_at(Stage::Cache))?;
            keyed.inputs[i].digest = dep.clone();
            keyed.inputs[i].index = 0;
            contributions.push(dep);
            reads.extend(read);
        }
        let def = self.def_key(digest).await?;
        let pinned = def.pinned;
        let key = cache::vertex_key(&keyed, pinned.as_bytes());
        let def_key = def.key.filter(|d| *d != key);
        // What the history remembers of this step; its key's parts only if it runs.
        let mut draft = self.history.as_ref().map(|_| self.draft(digest, op, &name, &key));
        let parts_of = |salt: &[u8; 32]| {
            let mut parts = history::op_parts(op, &pinned, salt);
            let mut read_iter = reads.iter();
            for (i, dep) in contributions.iter().enumerate() {
                let is_local = matches!(values[i], Some(Value::Local(_)));
                let r = if is_local {
                    read_iter.next().map(|r| r.reads.as_slice())
                } else {
                    None
                };
                history::input_parts(&mut parts, i, dep, r.unwrap_or_default());
            }
            parts
        };

        if !ignore_cache {
            let found = small_io(|| self.find(digest, &key, &name));
            if let Some(record) = found {
                if let Some(Op::Source(s)) = &op.op {
                    if let Some(src) = pull::parse_identifier(&s.identifier) {
                        if let Some(d) = &src.digest {
                            let _ = small_io(|| pull::remember_tag(&self.root, &src, d));
                        }
                    }
                }
                if let Some(d) = &def_key {
                    small_io(|| self.alias(d, &key, &record));
                }
                return Ok(self.hit(digest, op, name, key, def_key, record));
            }
        }
        // Why it runs, said before it waits for a slot.
        if let (Some(d), Some(h)) = (&mut draft, &self.history) {
            d.parts = parts_of(h.salt());
        }
        let parts = draft.as_ref().map(|d| d.parts.clone()).unwrap_or_default();
        let explained = match (&self.history, &draft) {
            (Some(h), Some(draft)) => {
                let flag = if self.opts.no_cache {
                    Some("--no-cache")
                } else if ignore_cache {
                    Some("no-cache is set for this step")
                } else {
                    None
                };
                Some(tokio::task::block_in_place(|| h.explain(draft, flag, &reads)))
            }
            _ => None,
        };

        if matches!(op.op, Some(Op::Exec(_))) {
            // The first step to run makes the runtime's sealed copy while the
            // others prepare their root filesystems.
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.exec.runtime.prepare());
        }
        if matches!(&op.op, Some(Op::Exec(e)) if e.network == pb::NetMode::Unset as i32) {
            self.exec.runtime.prepare_networks();
        }
        // A capped ExecOp waits for its turn before it counts as started.
        let waiting = Instant::now();
        let _permit = match (&op.op, &self.exec_slots) {
            (Some(Op::Exec(_)), Some(s)) => Some(
                s.acquire()
                    .await
                    .map_err(|e| fail_at(Stage::Setup)(Failure::Internal(e.to_string())))?,
            ),
            _ => None,
        };
        let queued_ms = waiting.elapsed().as_millis() as u64;
        let started = Instant::now();
        let at_ms = self.now_ms();
        let shown = explained.clone().filter(|_| self.history.as_ref().is_some_and(|h| h.explains()));
        if let (Some(h), Some(draft)) = (&self.history, draft) {
            h.add(draft, StepStatus::Ran, at_ms, queued_ms, explained);
        }
        self.events.emit(Event::VertexStarted {
            digest: digest.to_string(),
            name: name.clone(),
            at_ms,
            explain: shown,
        });
        let made_ahead = ahead.and_then(|a| values.first().and_then(|base| base.as_ref()).and_then(|base| a.settle(base)));
        let result = match made_ahead {
            Some(outputs) => Ok(outputs),
            None => self.exec.execute(digest, op, &values).await,
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
                    parts,
                    key: None,
                };
                small_io(|| write_record(&self.root, &key, &record))
                    .map_err(|e| fail_at(Stage::Cache)(Failure::io(Some("writing the cache record"), &key)(e)))?;
                if let Some(d) = &def_key {
                    small_io(|| self.alias(d, &key, &record));
                }
                self.executed.fetch_add(1, Ordering::Relaxed);
                if let Some(h) = &self.history {
                    h.finish(digest, StepStatus::Ran, duration_ms);
                }
                self.compress_ahead(digest, &outputs, &inputs);
                self.events.emit(Event::VertexCompleted {
                    digest: digest.to_string(),
                    at_ms: self.now_ms(),
                    duration_ms,
                });
                Ok(Arc::new(Done {
                    key,
                    def_key,
                    outputs: outputs.into_iter().map(|o| o.map(Value::Layers)).collect(),
                    ran: true,
                }))
            }
            Err(error) => {
                if let Some(h) = &self.history {
                    h.finish(digest, StepStatus::Failed, duration_ms);
                }
                self.events.emit(Event::VertexFailed {
                    digest: digest.to_string(),
                    at_ms: self.now_ms(),
                    duration_ms,
                    error: error.failure.to_string(),
                    exit_code: error.failure.exit_code(),
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
}

/// An ExecOp's name in the messages of the checks made before anything
/// runs: its `llb.customname`, else its command.
fn exec_name(def: &LoadedDefinition, digest: &str, e: &pb::ExecOp) -> String {
    def.metadata
        .get(digest)
        .and_then(|m| m.description.get("llb.customname").cloned())
        .unwrap_or_else(|| e.meta.as_ref().map(|m| m.args.join(" ")).unwrap_or_default())
}

/// Whether a step runs in the default network mode (its own namespace,
/// which needs slirp4netns).
pub(crate) fn uses_sandbox_network(def: &LoadedDefinition) -> bool {
    def.ops
        .iter()
        .any(|op| matches!(&op.op.op, Some(pb::op::Op::Exec(e)) if e.network == pb::NetMode::Unset as i32))
}

/// The ids of the definition's cache mounts (a mount's target when it names
/// no id), each once.
pub(crate) fn cache_mount_ids(def: &LoadedDefinition) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for op in &def.ops {
        let Some(pb::op::Op::Exec(e)) = &op.op.op else { continue };
        for m in e.mounts.iter().filter(|m| m.mount_type == pb::MountType::Cache as i32) {
            let id = match &m.cache_opt {
                Some(c) if !c.id.is_empty() => c.id.clone(),
                _ => m.dest.clone(),
            };
            if !out.contains(&id) {
                out.push(id);
            }
        }
    }
    out
}

/// The platforms the definition's steps (ExecOps) run for, each once.
pub(crate) fn step_platforms(def: &LoadedDefinition) -> Vec<kiln_image::Platform> {
    let mut out: Vec<kiln_image::Platform> = Vec::new();
    for op in &def.ops {
        if matches!(op.op.op, Some(pb::op::Op::Exec(_))) {
            let p = execute::platform_of(&op.op);
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The first step that asks for a privilege `granted` does not hold
/// (host network, every capability), as its digest and a message naming
/// the flag that grants it. Checked before anything runs, as BuildKit's
/// entitlements are.
pub(crate) fn refused_step(def: &LoadedDefinition, granted: &[String]) -> Option<(String, String)> {
    use kiln_solver_protocol::{NETWORK_HOST, SECURITY_INSECURE};
    let has = |e: &str| granted.iter().any(|g| g == e);
    for op in &def.ops {
        let Some(pb::op::Op::Exec(e)) = &op.op.op else { continue };
        let need = if e.network == pb::NetMode::Host as i32 && !has(NETWORK_HOST) {
            Some((NETWORK_HOST, "the host's network"))
        } else if e.security == pb::SecurityMode::Insecure as i32 && !has(SECURITY_INSECURE) {
            Some((SECURITY_INSECURE, "every capability, outside the sandbox"))
        } else {
            None
        };
        if let Some((entitlement, what)) = need {
            let step = exec_name(def, op.digest.as_str(), e);
            return Some((
                op.digest.as_str().to_string(),
                format!("{step} asks for {what}, which is not allowed: to allow it, add --allow {entitlement}"),
            ));
        }
    }
    None
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
        let step = exec_name(def, op.digest.as_str(), e);
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

/// The paths a consumer reads of its input `i`, `(path, allow_wildcard,
/// follow_symlink)`, when it reads only parts of it: a FileOp that only
/// copies from it (the copies' sources), an ExecOp that only bind-mounts
/// parts of it (the mounts' source paths). None: it reads all of it.
fn copy_selectors(op: &pb::Op, i: i64) -> Option<Vec<(String, bool, bool)>> {
    if let Some(pb::op::Op::Exec(e)) = &op.op {
        let mut out = Vec::new();
        for m in e.mounts.iter().filter(|m| m.input == i) {
            let whole = m.selector.is_empty() || m.selector == "/";
            if whole || m.dest == "/" || m.mount_type != pb::MountType::Bind as i32 {
                return None;
            }
            out.push((m.selector.clone(), false, true));
        }
        return (!out.is_empty()).then_some(out);
    }
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

/// What a consumer reads of another vertex's output (input `i`), when its
/// key may cover that content instead of the input's key (BuildKit's rule):
/// the sources of a FileOp that only copies from it, the selectors of an
/// ExecOp's read-only bind mounts of it (`/` for a whole mount). `None` for
/// any other use (a base to write on, a root, a writable or cache mount).
fn content_selectors(op: &pb::Op, i: i64) -> Option<Vec<Selector>> {
    if let Some(pb::op::Op::Exec(e)) = &op.op {
        let mut out = Vec::new();
        for m in e.mounts.iter().filter(|m| m.input == i) {
            if m.mount_type != pb::MountType::Bind as i32 || !m.readonly || m.dest == "/" || m.output >= 0 {
                return None;
            }
            let path = if m.selector.is_empty() {
                "/".to_string()
            } else {
                m.selector.clone()
            };
            out.push(Selector {
                path,
                wildcard: false,
                follow: true,
            });
        }
        return (!out.is_empty()).then_some(out);
    }
    let sources = copy_selectors(op, i)?;
    Some(
        sources
            .into_iter()
            .map(|(path, wildcard, follow)| Selector { path, wildcard, follow })
            .collect(),
    )
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
