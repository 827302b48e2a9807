//! A typed builder over the wire types.
//!
//! A [`State`] is a filesystem: scratch or one output of a vertex. Operations
//! on states make new vertices; [`State::marshal`] walks the graph inputs-first
//! and yields a [`pb::Definition`] in topological order, deduplicated by digest,
//! ending with the terminator op — the layout BuildKit's Go client produces.
//! Every vertex may carry metadata (progress names, caps) and source locations
//! that land in `Definition.metadata` and `Definition.Source`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use crate::marshal::{digest_of, marshal_op, marshal_op_with_inputs, Digest};
use crate::pb;

/// Output index meaning "no output" / "empty input".
pub const SKIP: i64 = -1;

/// A span of lines in one source file (1-based, inclusive), for `Definition.Source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSpan {
    /// Index into the infos given to [`State::marshal`].
    pub source_index: i32,
    /// First line.
    pub start_line: i32,
    /// Last line.
    pub end_line: i32,
}

/// What a vertex carries besides its op. Kept compact (caps are static
/// names) and turned into `pb::OpMetadata` only when marshalling.
#[derive(Clone, Debug, Default)]
pub struct VertexMeta {
    description: Vec<(&'static str, String)>,
    caps: Vec<&'static str>,
    ignore_cache: bool,
    progress_group: Option<pb::ProgressGroup>,
    /// Where the vertex came from.
    pub locations: Vec<SourceSpan>,
}

impl VertexMeta {
    /// Sets a description key (e.g. `llb.customname`).
    pub fn describe(mut self, key: &'static str, value: impl Into<String>) -> Self {
        let value = value.into();
        match self.description.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.description.push((key, value)),
        }
        self
    }

    /// Adds a solver capability.
    pub fn cap(mut self, cap: &'static str) -> Self {
        if !self.caps.contains(&cap) {
            self.caps.push(cap);
        }
        self
    }

    /// Adds a source location.
    pub fn at(mut self, span: SourceSpan) -> Self {
        self.locations.push(span);
        self
    }

    /// Shows the vertex in a progress group (`weak`: only while it has no other vertex).
    pub fn progress_group(mut self, id: impl Into<String>, name: impl Into<String>, weak: bool) -> Self {
        self.progress_group = Some(pb::ProgressGroup {
            id: id.into(),
            name: name.into(),
            weak,
        });
        self
    }

    /// Marks the vertex as never cached.
    pub fn ignore_cache(mut self, ignore: bool) -> Self {
        self.ignore_cache = ignore;
        self
    }

    /// The `OpMetadata` this describes.
    pub fn to_metadata(&self) -> pb::OpMetadata {
        pb::OpMetadata {
            ignore_cache: self.ignore_cache,
            description: self.description.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            caps: self.caps.iter().map(|c| (c.to_string(), true)).collect(),
            progress_group: self.progress_group.clone(),
            ..Default::default()
        }
    }
}

/// Source attributes fixed after the vertex is made (e.g. a build context's
/// include patterns, known only once every instruction using it is lowered).
pub type LateAttrs = Arc<OnceLock<BTreeMap<String, String>>>;

/// A graph vertex: an op template whose inputs are other vertices' outputs.
#[derive(Debug)]
struct Vertex {
    op: pb::Op,
    inputs: Vec<Output>,
    meta: VertexMeta,
    late_attrs: Option<LateAttrs>,
}

impl Drop for Vertex {
    /// Drops the inputs this vertex owns last without recursing, so dropping a
    /// chain of any length does not overflow the stack.
    fn drop(&mut self) {
        let mut pending: Vec<Output> = std::mem::take(&mut self.inputs);
        while let Some(output) = pending.pop() {
            if let Ok(mut vertex) = Arc::try_unwrap(output.vertex) {
                pending.append(&mut vertex.inputs);
            }
        }
    }
}

/// One output of a vertex.
#[derive(Clone, Debug)]
pub struct Output {
    vertex: Arc<Vertex>,
    index: i64,
}

impl Output {
    fn key(&self) -> (usize, i64) {
        (Arc::as_ptr(&self.vertex) as usize, self.index)
    }
}

/// A filesystem state: scratch (empty) or an output of a vertex.
#[derive(Clone, Debug, Default)]
pub struct State {
    output: Option<Output>,
}

/// A mount of an [`Exec`].
#[derive(Clone, Debug)]
pub struct Mount {
    /// Mount point.
    pub dest: String,
    /// Filesystem mounted; scratch mounts an empty directory.
    pub source: State,
    /// Sub-path of the source.
    pub selector: String,
    /// Read-only bind.
    pub readonly: bool,
    /// Kind and options.
    pub kind: MountKind,
    /// Do not expose the mount's result as an output.
    pub no_output: bool,
}

/// The kind of a [`Mount`].
#[derive(Clone, Debug, PartialEq)]
pub enum MountKind {
    /// A bind mount of the source.
    Bind,
    /// A persistent cache directory.
    Cache {
        /// Cache id.
        id: String,
        /// Sharing mode.
        sharing: pb::CacheSharingOpt,
    },
    /// A tmpfs of the given size (0 = default).
    Tmpfs {
        /// Size in bytes.
        size: i64,
    },
    /// A secret file.
    Secret(pb::SecretOpt),
    /// An SSH agent socket.
    Ssh(pb::SshOpt),
}

impl Mount {
    /// A read-write bind mount.
    pub fn bind(dest: impl Into<String>, source: State) -> Mount {
        Mount {
            dest: dest.into(),
            source,
            selector: String::new(),
            readonly: false,
            kind: MountKind::Bind,
            no_output: false,
        }
    }

    /// A mount of another kind on scratch.
    pub fn of_kind(dest: impl Into<String>, kind: MountKind) -> Mount {
        Mount {
            dest: dest.into(),
            source: State::scratch(),
            selector: String::new(),
            readonly: false,
            kind,
            no_output: false,
        }
    }
}

/// An exec vertex under construction.
#[derive(Clone, Debug, Default)]
pub struct Exec {
    /// The process.
    pub meta: pb::Meta,
    /// Mounts besides the root.
    pub mounts: Vec<Mount>,
    /// Network mode.
    pub network: pb::NetMode,
    /// Security mode.
    pub security: pb::SecurityMode,
    /// Secrets as environment variables.
    pub secret_env: Vec<pb::SecretEnv>,
    /// Platform of the op.
    pub platform: Option<pb::Platform>,
}

/// The states an exec produces.
#[derive(Clone, Debug)]
pub struct ExecResult {
    /// The root filesystem after the process ran.
    pub root: State,
    /// Outputs of writable mounts, by mount destination.
    pub mounts: BTreeMap<String, State>,
}

/// Where a file action reads or writes.
#[derive(Clone, Debug)]
pub enum FileInput {
    /// An op input (any state).
    State(State),
    /// The result of an earlier action of the same FileOp.
    Action(usize),
    /// An empty directory.
    Empty,
}

/// One action of a [`FileOp`] chain.
#[derive(Clone, Debug)]
pub struct FileAction {
    /// The filesystem acted on.
    pub input: FileInput,
    /// The copy source (copy only).
    pub secondary: FileInput,
    /// The action.
    pub action: pb::file_action::Action,
}

/// A chain of file actions; the last action's result is output 0.
#[derive(Clone, Debug, Default)]
pub struct FileOp {
    /// The actions, each usually acting on the previous one's result.
    pub actions: Vec<FileAction>,
}

impl FileOp {
    /// Appends an action on `target` (the first action) or on the previous result.
    pub fn then(mut self, target: &State, secondary: FileInput, action: pb::file_action::Action) -> Self {
        let input = match self.actions.len() {
            0 => FileInput::State(target.clone()),
            n => FileInput::Action(n - 1),
        };
        self.actions.push(FileAction { input, secondary, action });
        self
    }
}

impl State {
    /// The empty filesystem.
    pub fn scratch() -> State {
        State { output: None }
    }

    /// Whether this is scratch.
    pub fn is_scratch(&self) -> bool {
        self.output.is_none()
    }

    /// A vertex with the given op (its `inputs` are filled in when marshalling).
    pub fn from_op(op: pb::Op, inputs: Vec<Output>, meta: VertexMeta) -> Output {
        Output {
            vertex: Arc::new(Vertex {
                op,
                inputs,
                meta,
                late_attrs: None,
            }),
            index: 0,
        }
    }

    /// A source op: `docker-image://…`, `local://…`, `git://…`, `https://…`.
    pub fn source(
        identifier: impl Into<String>,
        attrs: BTreeMap<String, String>,
        platform: Option<pb::Platform>,
        meta: VertexMeta,
    ) -> State {
        State::source_vertex(identifier.into(), attrs, platform, None, meta)
    }

    /// A source op whose `late` attributes are merged in when marshalling.
    pub fn source_with_late_attrs(
        identifier: impl Into<String>,
        attrs: BTreeMap<String, String>,
        late: LateAttrs,
        meta: VertexMeta,
    ) -> State {
        State::source_vertex(identifier.into(), attrs, None, Some(late), meta)
    }

    fn source_vertex(
        identifier: String,
        attrs: BTreeMap<String, String>,
        platform: Option<pb::Platform>,
        late_attrs: Option<LateAttrs>,
        meta: VertexMeta,
    ) -> State {
        let op = pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp { identifier, attrs })),
            platform,
            constraints: Some(pb::WorkerConstraints::default()),
            ..Default::default()
        };
        let vertex = Arc::new(Vertex {
            op,
            inputs: Vec::new(),
            meta,
            late_attrs,
        });
        State {
            output: Some(Output { vertex, index: 0 }),
        }
    }

    /// The output this state is, unless scratch.
    pub fn output(&self) -> Option<&Output> {
        self.output.as_ref()
    }

    /// Runs a process with this state as the root filesystem.
    pub fn run(&self, mut exec: Exec, meta: VertexMeta) -> ExecResult {
        // As BuildKit's client: the first SSH mount is the step's agent unless it names one.
        let first_ssh = exec
            .mounts
            .iter()
            .find(|m| matches!(m.kind, MountKind::Ssh(_)))
            .map(|m| m.dest.clone());
        if let Some(dest) = first_ssh {
            if !exec.meta.env.iter().any(|e| e.starts_with("SSH_AUTH_SOCK=")) {
                exec.meta.env.push(format!("SSH_AUTH_SOCK={dest}"));
            }
        }
        // As BuildKit's client: filesystem mounts sorted by destination,
        // then secrets, then SSH sockets, each in the order given.
        let (sockets, filesystems): (Vec<Mount>, Vec<Mount>) = exec
            .mounts
            .into_iter()
            .partition(|m| matches!(m.kind, MountKind::Secret(_) | MountKind::Ssh(_)));
        let mut mounts = vec![Mount::bind("/", self.clone())];
        mounts.extend(filesystems);
        mounts.sort_by(|a, b| a.dest.cmp(&b.dest));
        let (secrets, ssh): (Vec<Mount>, Vec<Mount>) = sockets.into_iter().partition(|m| matches!(m.kind, MountKind::Secret(_)));
        mounts.extend(secrets);
        mounts.extend(ssh);
        let mut inputs: Vec<Output> = Vec::new();
        let mut pb_mounts = Vec::with_capacity(mounts.len());
        let mut outputs: Vec<(String, i64)> = Vec::new();
        let mut next_output = 0;
        for m in &mounts {
            let input = match &m.source.output {
                None => SKIP,
                Some(out) => match inputs.iter().position(|i| i.key() == out.key()) {
                    Some(i) => i as i64,
                    None => {
                        inputs.push(out.clone());
                        inputs.len() as i64 - 1
                    }
                },
            };
            let writable = !m.no_output && !m.readonly && matches!(m.kind, MountKind::Bind);
            let output = if writable {
                next_output += 1;
                outputs.push((m.dest.clone(), next_output - 1));
                next_output - 1
            } else if matches!(m.kind, MountKind::Secret(_) | MountKind::Ssh(_)) {
                // BuildKit leaves the field unset on these.
                0
            } else {
                SKIP
            };
            let mut pm = pb::Mount {
                input,
                dest: m.dest.clone(),
                output,
                readonly: m.readonly,
                selector: m.selector.clone(),
                ..Default::default()
            };
            match &m.kind {
                MountKind::Bind => {}
                MountKind::Cache { id, sharing } => {
                    pm.mount_type = pb::MountType::Cache as i32;
                    pm.cache_opt = Some(pb::CacheOpt {
                        id: id.clone(),
                        sharing: *sharing as i32,
                    });
                }
                MountKind::Tmpfs { size } => {
                    pm.mount_type = pb::MountType::Tmpfs as i32;
                    pm.tmpfs_opt = Some(pb::TmpfsOpt { size: *size });
                }
                MountKind::Secret(opt) => {
                    pm.mount_type = pb::MountType::Secret as i32;
                    pm.secret_opt = Some(opt.clone());
                }
                MountKind::Ssh(opt) => {
                    pm.mount_type = pb::MountType::Ssh as i32;
                    pm.ssh_opt = Some(opt.clone());
                }
            }
            pb_mounts.push(pm);
        }
        let op = pb::Op {
            op: Some(pb::op::Op::Exec(pb::ExecOp {
                meta: Some(exec.meta),
                mounts: pb_mounts,
                network: exec.network as i32,
                security: exec.security as i32,
                secretenv: exec.secret_env,
                cdi_devices: Vec::new(),
            })),
            platform: exec.platform,
            constraints: Some(pb::WorkerConstraints::default()),
            ..Default::default()
        };
        let vertex = Arc::new(Vertex {
            op,
            inputs,
            meta,
            late_attrs: None,
        });
        let state_of = |index: i64| State {
            output: Some(Output {
                vertex: vertex.clone(),
                index,
            }),
        };
        let mut root = State::scratch();
        let mut by_dest = BTreeMap::new();
        for (dest, index) in outputs {
            if dest == "/" {
                root = state_of(index);
            } else {
                by_dest.insert(dest, state_of(index));
            }
        }
        ExecResult { root, mounts: by_dest }
    }

    /// Applies a chain of file actions; the result is the last action's output.
    pub fn file(fileop: FileOp, meta: VertexMeta) -> State {
        if fileop.actions.is_empty() {
            return State::scratch();
        }
        let mut inputs: Vec<Output> = Vec::new();
        let mut resolve = |fi: &FileInput| -> (i64, Option<usize>) {
            match fi {
                FileInput::Empty => (SKIP, None),
                FileInput::State(State { output: None }) => (SKIP, None),
                FileInput::Action(i) => (0, Some(*i)),
                FileInput::State(State { output: Some(out) }) => match inputs.iter().position(|i| i.key() == out.key()) {
                    Some(i) => (i as i64, None),
                    None => {
                        inputs.push(out.clone());
                        (inputs.len() as i64 - 1, None)
                    }
                },
            }
        };
        let mut raw = Vec::with_capacity(fileop.actions.len());
        for a in &fileop.actions {
            let input = resolve(&a.input);
            let secondary = resolve(&a.secondary);
            raw.push((input, secondary));
        }
        let n = inputs.len() as i64;
        let fix = |(index, action): (i64, Option<usize>)| match action {
            Some(i) => n + i as i64,
            None => index,
        };
        let last = fileop.actions.len() - 1;
        let actions = fileop
            .actions
            .into_iter()
            .zip(raw)
            .enumerate()
            .map(|(i, (a, (input, secondary)))| pb::FileAction {
                input: fix(input),
                secondary_input: fix(secondary),
                output: if i == last { 0 } else { SKIP },
                action: Some(a.action),
            })
            .collect();
        let op = pb::Op {
            op: Some(pb::op::Op::File(pb::FileOp { actions })),
            constraints: Some(pb::WorkerConstraints::default()),
            ..Default::default()
        };
        State {
            output: Some(State::from_op(op, inputs, meta)),
        }
    }

    /// Stacks states, later ones on top (scratch inputs are skipped).
    pub fn merge(states: &[State], meta: VertexMeta) -> State {
        let outs: Vec<Output> = states.iter().filter_map(|s| s.output.clone()).collect();
        match outs.len() {
            0 => State::scratch(),
            1 => State {
                output: outs.into_iter().next(),
            },
            n => {
                let op = pb::Op {
                    op: Some(pb::op::Op::Merge(pb::MergeOp {
                        inputs: (0..n as i64).map(|input| pb::MergeInput { input }).collect(),
                    })),
                    constraints: Some(pb::WorkerConstraints::default()),
                    ..Default::default()
                };
                State {
                    output: Some(State::from_op(op, outs, meta)),
                }
            }
        }
    }

    /// The changes from `lower` to `upper`.
    pub fn diff(lower: &State, upper: &State, meta: VertexMeta) -> State {
        let mut inputs = Vec::new();
        let mut index = |s: &State| match &s.output {
            None => SKIP,
            Some(o) => {
                inputs.push(o.clone());
                inputs.len() as i64 - 1
            }
        };
        let lower_index = index(lower);
        let upper_index = index(upper);
        let op = pb::Op {
            op: Some(pb::op::Op::Diff(pb::DiffOp {
                lower: Some(pb::LowerDiffInput { input: lower_index }),
                upper: Some(pb::UpperDiffInput { input: upper_index }),
            })),
            constraints: Some(pb::WorkerConstraints::default()),
            ..Default::default()
        };
        State {
            output: Some(State::from_op(op, inputs, meta)),
        }
    }

    /// Marshals the graph ending at this state. `infos` become `Source.infos`,
    /// which the vertices' [`SourceSpan`]s index into.
    pub fn marshal(&self, infos: Vec<pb::SourceInfo>) -> pb::Definition {
        let mut m = Marshaller::default();
        let Some(out) = &self.output else {
            return pb::Definition::default();
        };
        let result = m.visit(&out.vertex);
        let terminator = pb::Op {
            inputs: vec![pb::Input {
                digest: result.to_string(),
                index: out.index,
            }],
            ..Default::default()
        };
        let bytes = marshal_op(&terminator);
        let digest = digest_of(&bytes);
        let mut caps = BTreeMap::new();
        caps.insert("constraints".to_string(), true);
        caps.insert("platform".to_string(), true);
        if m.any_description {
            caps.insert("meta.description".to_string(), true);
        }
        if m.any_ignore_cache {
            caps.insert("meta.ignorecache".to_string(), true);
        }
        let mut def = pb::Definition {
            def: Vec::with_capacity(m.ops.len() + 1),
            metadata: BTreeMap::new(),
            source: None,
        };
        let mut metadata = Vec::with_capacity(m.ops.len() + 1);
        let mut locations = Vec::new();
        for op in m.ops {
            def.def.push(op.bytes);
            let key = op.digest.into_string();
            if !op.locations.is_empty() {
                locations.push((key.clone(), pb::Locations { locations: op.locations }));
            }
            metadata.push((key, op.metadata));
        }
        // The terminator is its own op even if an identical one was marshalled.
        metadata.retain(|(k, _)| k != digest.as_str());
        metadata.push((
            digest.into_string(),
            pb::OpMetadata {
                caps,
                ..Default::default()
            },
        ));
        def.def.push(bytes);
        // Built from sorted, distinct keys: one pass, no per-entry rebalancing.
        metadata.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        locations.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        def.metadata = metadata.into_iter().collect();
        if !locations.is_empty() || !infos.is_empty() {
            def.source = Some(pb::Source {
                locations: locations.into_iter().collect(),
                infos,
            });
        }
        def
    }
}

/// Walks a graph into a Definition. Each distinct op is one entry of
/// `ops`; the digest-keyed maps are built once at the end from sorted
/// entries, not grown an insertion at a time.
#[derive(Default)]
struct Marshaller {
    /// Vertex (by address) to the index of its op in `ops`.
    memo: HashMap<usize, usize>,
    /// Digest to the index of its op in `ops`, to merge duplicates.
    by_digest: HashMap<Digest, usize>,
    ops: Vec<Marshalled>,
    any_description: bool,
    any_ignore_cache: bool,
}

/// One distinct op: its bytes, digest, merged metadata and source locations.
struct Marshalled {
    digest: Digest,
    bytes: Vec<u8>,
    metadata: pb::OpMetadata,
    locations: Vec<pb::Location>,
}

impl Marshaller {
    /// Marshals `root` and everything it depends on, inputs first, and returns
    /// its digest. Iterative (an explicit stack), so a chain of any length fits.
    fn visit(&mut self, root: &Arc<Vertex>) -> Digest {
        let key = |v: &Arc<Vertex>| Arc::as_ptr(v) as usize;
        let mut stack: Vec<(&Arc<Vertex>, usize)> = vec![(root, 0)];
        while let Some(top) = stack.last_mut() {
            let (vertex, next) = (top.0, top.1);
            if self.memo.contains_key(&key(vertex)) {
                stack.pop();
            } else if next < vertex.inputs.len() {
                top.1 += 1;
                let child = &vertex.inputs[next].vertex;
                if !self.memo.contains_key(&key(child)) {
                    stack.push((child, 0));
                }
            } else {
                stack.pop();
                self.emit(vertex);
            }
        }
        self.memo
            .get(&key(root))
            .map(|&i| self.ops[i].digest.clone())
            .unwrap_or_else(|| Digest::from_string(""))
    }

    /// Marshals one vertex whose inputs are all marshalled.
    fn emit(&mut self, vertex: &Arc<Vertex>) {
        let key = Arc::as_ptr(vertex) as usize;
        let inputs: Vec<pb::Input> = vertex
            .inputs
            .iter()
            .map(|i| pb::Input {
                digest: self
                    .memo
                    .get(&(Arc::as_ptr(&i.vertex) as usize))
                    .map(|&op| self.ops[op].digest.to_string())
                    .unwrap_or_default(),
                index: i.index,
            })
            .collect();
        let late = vertex.late_attrs.as_ref().and_then(|l| l.get()).filter(|l| !l.is_empty());
        let bytes = match (late, &vertex.op.op) {
            (Some(late), Some(pb::op::Op::Source(source))) => {
                // Only a source with late attributes is copied, to add them.
                let mut source = source.clone();
                source.attrs.extend(late.iter().map(|(k, v)| (k.clone(), v.clone())));
                let op = pb::Op {
                    op: Some(pb::op::Op::Source(source)),
                    ..vertex.op.clone()
                };
                marshal_op_with_inputs(&op, &inputs)
            }
            _ => marshal_op_with_inputs(&vertex.op, &inputs),
        };
        let digest = digest_of(&bytes);
        let meta = &vertex.meta;
        self.any_description |= !meta.description.is_empty();
        self.any_ignore_cache |= meta.ignore_cache;
        // Vertices with the same digest are one op; their metadata is merged, later
        // descriptions winning and capabilities adding up, as BuildKit merges it.
        let index = match self.by_digest.get(&digest) {
            Some(&i) => {
                merge_metadata(&mut self.ops[i].metadata, meta.to_metadata());
                i
            }
            None => {
                let i = self.ops.len();
                self.by_digest.insert(digest.clone(), i);
                self.ops.push(Marshalled {
                    digest,
                    bytes,
                    metadata: meta.to_metadata(),
                    locations: Vec::new(),
                });
                i
            }
        };
        self.memo.insert(key, index);
        let locations = &mut self.ops[index].locations;
        for span in &meta.locations {
            let range = pb::Range {
                start: Some(pb::Position {
                    line: span.start_line,
                    character: 0,
                }),
                end: Some(pb::Position {
                    line: span.end_line,
                    character: 0,
                }),
            };
            let loc = pb::Location {
                source_index: span.source_index,
                ranges: vec![range],
            };
            if !locations.contains(&loc) {
                locations.push(loc);
            }
        }
    }
}

fn merge_metadata(into: &mut pb::OpMetadata, from: pb::OpMetadata) {
    into.ignore_cache |= from.ignore_cache;
    into.description.extend(from.description);
    into.caps.extend(from.caps);
    if from.export_cache.is_some() {
        into.export_cache = from.export_cache;
    }
    if from.progress_group.is_some() {
        into.progress_group = from.progress_group;
    }
    if from.linux_resources.is_some() {
        into.linux_resources = from.linux_resources;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::LoadedDefinition;
    use prost::Message;

    fn image(name: &str) -> State {
        State::source(format!("docker-image://{name}"), BTreeMap::new(), None, VertexMeta::default())
    }

    fn loaded(state: &State) -> LoadedDefinition {
        LoadedDefinition::decode(&state.marshal(Vec::new()).encode_to_vec()).expect("valid definition")
    }

    #[test]
    fn merge_and_diff_reference_their_inputs_by_index() {
        let (a, b) = (image("a"), image("b"));
        let merged = State::merge(&[a.clone(), State::scratch(), b.clone()], VertexMeta::default());
        let diff = State::diff(&a, &merged, VertexMeta::default());
        let def = loaded(&diff);
        // a, b, merge, diff, terminator; `a` appears once although used twice.
        assert_eq!(def.ops.len(), 5);
        let merge_op = def
            .ops
            .iter()
            .find(|o| matches!(o.op.op, Some(pb::op::Op::Merge(_))))
            .expect("merge");
        let Some(pb::op::Op::Merge(m)) = &merge_op.op.op else {
            unreachable!()
        };
        assert_eq!(
            m.inputs.iter().map(|i| i.input).collect::<Vec<_>>(),
            vec![0, 1],
            "scratch is skipped"
        );
        let diff_op = &def.ops[3];
        let Some(pb::op::Op::Diff(d)) = &diff_op.op.op else {
            panic!("diff expected, got {:?}", diff_op.op)
        };
        assert_eq!((d.lower.map(|l| l.input), d.upper.map(|u| u.input)), (Some(0), Some(1)));
        assert_eq!(diff_op.op.inputs[1].digest, merge_op.digest.to_string());
        // Merging a single non-scratch state is that state.
        assert!(State::merge(&[State::scratch(), a.clone()], VertexMeta::default())
            .output()
            .is_some());
        assert!(State::merge(&[State::scratch()], VertexMeta::default()).is_scratch());
    }

    #[test]
    fn exec_mounts_are_sorted_and_only_writable_binds_get_outputs() {
        let base = image("base");
        let exec = Exec {
            meta: pb::Meta {
                args: vec!["true".into()],
                ..Default::default()
            },
            mounts: vec![
                Mount::of_kind(
                    "/cache",
                    MountKind::Cache {
                        id: "c".into(),
                        sharing: pb::CacheSharingOpt::Locked,
                    },
                ),
                Mount::bind("/a", image("other")),
            ],
            ..Default::default()
        };
        let result = base.run(exec, VertexMeta::default());
        assert!(result.mounts.contains_key("/a"));
        let def = loaded(&result.root);
        let Some(pb::op::Op::Exec(e)) = &def.ops[def.ops.len() - 2].op.op else {
            panic!("exec expected")
        };
        let dests: Vec<(&str, i64, i64)> = e.mounts.iter().map(|m| (m.dest.as_str(), m.input, m.output)).collect();
        assert_eq!(dests, vec![("/", 0, 0), ("/a", 1, 1), ("/cache", -1, -1)]);
    }
}
