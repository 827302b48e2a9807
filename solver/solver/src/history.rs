//! The build history and cache-miss explanations.
//!
//! Each step's key is remembered as named parts ([`op_parts`]: the command,
//! each environment variable, the mounts, a base image's pinned digest, what
//! each input contributed, the checksum of each context path it reads).
//! A step that misses the cache is compared, part by part, with the same
//! step of the last build of the same definition file and target
//! ([`Recorder::explain`]); the first difference is its reason. Parts are
//! short hashes keyed with the state root's own random salt
//! (`history/salt`), never values: an explanation names a changed build
//! arg, not what it was or became, and a hash in the root cannot be tried
//! against guesses of a value without the salt.
//!
//! Context paths a missed step reads get a manifest (path and checksum of
//! every file below) under `history/reads/`, by checksum, so the next
//! explanation can say which files changed. A manifest is written only
//! for a step that runs, so a warm build writes none.
//!
//! The parts are computed only for a step that runs, kept in its build
//! record and its cache record (a cached step's are read from the cache
//! record of its key when an explanation needs them), so a warm build
//! computes and writes none.
//!
//! The build itself is written to `history/ID.json` when it ends
//! ([`Recorder::write`]); the newest [`KEEP_BUILDS`] are kept.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kiln_llb::{marshal_op, pb, LoadedDefinition};
use kiln_solver_protocol::history::{BuildRecord, StepRecord, StepStatus, DIR};
use kiln_solver_protocol::{BuildInfo, Explanation, PathStep};
use sha2::{Digest as _, Sha256};

use crate::cache::LocalRead;
use crate::root::{write_atomic, StateRoot};
use crate::schedule::background::lock;
use crate::source::context::{ChecksumCache, LocalSource};

/// How many builds the history keeps.
pub(crate) const KEEP_BUILDS: usize = 200;
/// How many read manifests are kept (the oldest go first).
const KEEP_MANIFESTS: usize = 1000;
/// A history file larger than this is not read.
const MAX_RECORD: u64 = 64 << 20;
/// Paths an explanation lists before it counts the rest.
const SHOWN_PATHS: usize = 3;

/// A short hash of a part that is itself a hash (an input's key).
fn short(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

/// A short hash of a part that may hold a value, keyed with the root's salt.
fn salted(salt: &[u8; 32], bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(bytes);
    hex::encode(&h.finalize()[..8])
}

/// The state root's salt for part hashes, made on first use.
fn salt_of(dir: &std::path::Path) -> [u8; 32] {
    let path = dir.join("salt");
    if let Ok(bytes) = fs::read(&path) {
        if let Ok(salt) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return salt;
        }
    }
    let salt: [u8; 32] = rand::random();
    if fs::create_dir_all(dir).is_ok() {
        let _ = write_atomic(&path, &salt, false);
    }
    // A concurrent first build may have written its own: use the one that stayed.
    fs::read(&path)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .unwrap_or(salt)
}

/// The parts of a step's own op (not its inputs), by name, hashed with `salt`.
pub(crate) fn op_parts(op: &pb::Op, pinned: &str, salt: &[u8; 32]) -> BTreeMap<String, String> {
    let part = |bytes: &[u8]| salted(salt, bytes);
    let mut parts = BTreeMap::new();
    let mut bare = op.clone();
    bare.inputs.clear();
    parts.insert("op".to_string(), part(&marshal_op(&bare)));
    use pb::op::Op;
    match &op.op {
        Some(Op::Exec(e)) => {
            if let Some(m) = &e.meta {
                parts.insert("command".into(), part(m.args.join("\0").as_bytes()));
                for kv in &m.env {
                    let (name, value) = kv.split_once('=').unwrap_or((kv, ""));
                    parts.insert(format!("env:{name}"), part(value.as_bytes()));
                }
                parts.insert("cwd".into(), part(m.cwd.as_bytes()));
                parts.insert("user".into(), part(m.user.as_bytes()));
            }
            let mut mounts = e.mounts.clone();
            for m in &mut mounts {
                m.input = 0; // which input backs it is the inputs' part
            }
            parts.insert("mounts".into(), part(format!("{mounts:?}").as_bytes()));
            parts.insert("network".into(), part(&e.network.to_le_bytes()));
            parts.insert("security".into(), part(&e.security.to_le_bytes()));
        }
        Some(Op::Source(s)) => {
            parts.insert("source".into(), s.identifier.clone());
            if !pinned.is_empty() {
                parts.insert("pinned".into(), pinned.to_string());
            }
        }
        Some(Op::File(f)) => {
            parts.insert("actions".into(), part(format!("{:?}", f.actions).as_bytes()));
        }
        _ => {}
    }
    parts
}

/// The parts an input adds: what it contributed, and the checksum of each
/// context path the step reads of it.
pub(crate) fn input_parts(parts: &mut BTreeMap<String, String>, index: usize, contribution: &str, reads: &[LocalRead]) {
    parts.insert(format!("input:{index}"), short(contribution.as_bytes()));
    for r in reads {
        parts.insert(format!("read:{index}:{}", r.path), hex::encode(r.checksum));
    }
}

/// `FILE:LINE` of the instruction that made a vertex, from the source map.
pub(crate) fn location(def: &LoadedDefinition, digest: &str) -> Option<String> {
    let source = def.source.as_ref()?;
    let loc = source.locations.get(digest)?.locations.first()?;
    let info = source.infos.get(usize::try_from(loc.source_index).ok()?)?;
    let line = loc.ranges.first()?.start.as_ref()?.line;
    Some(format!("{}:{line}", info.filename))
}

/// The last build of the same definition and target.
struct Previous {
    record: BuildRecord,
    by_digest: HashMap<String, usize>,
    by_name: HashMap<String, usize>,
    by_location: HashMap<String, usize>,
}

impl Previous {
    fn find(&self, digest: &str, name: &str, location: Option<&str>) -> Option<&StepRecord> {
        let i = self
            .by_digest
            .get(digest)
            .or_else(|| self.by_name.get(name))
            .or_else(|| location.and_then(|l| self.by_location.get(l)))?;
        self.record.steps.get(*i)
    }
}

/// The context paths a step reads of one local source.
pub(crate) struct InputReads {
    pub source: Arc<LocalSource>,
    pub cache: Arc<ChecksumCache>,
    pub reads: Vec<LocalRead>,
}

/// What a step of this build is, as the scheduler knows it when it looks up the cache.
pub(crate) struct Draft {
    pub digest: String,
    pub name: String,
    pub location: Option<String>,
    pub key: String,
    pub parts: BTreeMap<String, String>,
    pub inputs: Vec<String>,
}

/// Remembers one build's steps and explains its cache misses.
pub(crate) struct Recorder {
    root: Arc<StateRoot>,
    dir: PathBuf,
    info: BuildInfo,
    platforms: Vec<String>,
    started: u64,
    /// Read at the first miss: a warm build never parses it.
    previous: std::sync::OnceLock<Option<Previous>>,
    /// The root's salt, read at the first miss.
    salt: std::sync::OnceLock<[u8; 32]>,
    steps: Mutex<(Vec<StepRecord>, HashMap<String, usize>)>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The file naming the last build of a definition and target.
fn last_file(dir: &std::path::Path, info: &BuildInfo) -> PathBuf {
    let key = short(format!("{}\0{}", info.definition, info.target.as_deref().unwrap_or("")).as_bytes());
    dir.join("last").join(key)
}

/// Reads one build of the history.
pub(crate) fn read_build(dir: &std::path::Path, id: &str) -> Option<BuildRecord> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return None;
    }
    let path = dir.join(format!("{id}.json"));
    if fs::metadata(&path).ok()?.len() > MAX_RECORD {
        return None;
    }
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

impl Recorder {
    /// A recorder for a build of `root`, with the last build of the same
    /// definition and target to compare with.
    pub(crate) fn new(root: Arc<StateRoot>, info: BuildInfo, platforms: Vec<String>) -> Recorder {
        Recorder {
            dir: root.path().join(DIR),
            root,
            info,
            platforms,
            started: now_secs(),
            previous: std::sync::OnceLock::new(),
            salt: std::sync::OnceLock::new(),
            steps: Mutex::new((Vec::new(), HashMap::new())),
        }
    }

    /// The salt part hashes are keyed with.
    pub(crate) fn salt(&self) -> &[u8; 32] {
        self.salt.get_or_init(|| salt_of(&self.dir))
    }

    /// The last build of the same definition and target, read once.
    fn previous(&self) -> Option<&Previous> {
        self.previous
            .get_or_init(|| {
                let record = fs::read_to_string(last_file(&self.dir, &self.info))
                    .ok()
                    .and_then(|id| read_build(&self.dir, id.trim()))?;
                let mut by_digest = HashMap::new();
                let mut by_name = HashMap::new();
                let mut by_location = HashMap::new();
                for (i, s) in record.steps.iter().enumerate() {
                    by_digest.insert(s.digest.clone(), i);
                    by_name.entry(s.name.clone()).or_insert(i);
                    if let Some(l) = &s.location {
                        by_location.entry(l.clone()).or_insert(i);
                    }
                }
                Some(Previous {
                    record,
                    by_digest,
                    by_name,
                    by_location,
                })
            })
            .as_ref()
    }

    /// Whether misses are explained in events.
    pub(crate) fn explains(&self) -> bool {
        self.info.explain
    }

    /// Adds a step that was found or is about to run.
    pub(crate) fn add(&self, draft: Draft, status: StepStatus, start_ms: u64, queued_ms: u64, explain: Option<Explanation>) {
        let step = StepRecord {
            digest: draft.digest,
            name: draft.name,
            location: draft.location,
            status,
            key: draft.key,
            start_ms,
            duration_ms: 0,
            queued_ms,
            inputs: draft.inputs,
            parts: draft.parts,
            explain,
        };
        let mut steps = lock(&self.steps);
        let i = steps.0.len();
        steps.1.insert(step.digest.clone(), i);
        steps.0.push(step);
    }

    /// Marks a step that ran as done or failed.
    pub(crate) fn finish(&self, digest: &str, status: StepStatus, duration_ms: u64) {
        let mut steps = lock(&self.steps);
        if let Some(&i) = steps.1.get(digest) {
            steps.0[i].status = status;
            steps.0[i].duration_ms = duration_ms;
        }
    }

    /// Why `draft` missed the cache. `reads` are the context paths it reads
    /// (by input index), whose manifests are written here for the next build.
    pub(crate) fn explain(&self, draft: &Draft, no_cache: Option<&str>, reads: &[InputReads]) -> Explanation {
        for input in reads {
            for read in &input.reads {
                self.write_manifest(&input.source, &input.cache, read);
            }
        }
        let plain = |reason: &str| Explanation {
            reason: reason.to_string(),
            because_of: None,
        };
        if let Some(flag) = no_cache {
            return plain(flag);
        }
        let Some(previous) = self.previous() else {
            return plain("not built here before");
        };
        let Some(before) = previous.find(&draft.digest, &draft.name, draft.location.as_deref()) else {
            return plain("a new step: not in the last build of this definition");
        };
        if before.status == StepStatus::Failed {
            return plain("it failed in the last build");
        }
        if before.key == draft.key {
            return plain("its cached result is gone (pruned, or the last build stopped before storing it)");
        }
        let before_parts = self.parts_of(before);
        if before_parts.is_empty() {
            // Its last result came from a cache import, or its record was pruned.
            return plain("its key changed; what it was made of last time is no longer in this state root");
        }
        let own = self.own_changes(&draft.parts, &before_parts);
        if !own.is_empty() {
            return plain(&own.join("; "));
        }
        // The inputs: context files that changed, and the first upstream step that re-ran.
        let mut said: Vec<String> = Vec::new();
        let mut because_of = None;
        for (i, input) in draft.inputs.iter().enumerate() {
            let part = format!("input:{i}");
            if draft.parts.get(&part) == before_parts.get(&part) {
                continue;
            }
            let prefix = format!("read:{i}:");
            let now_reads: BTreeMap<&str, &str> = reads_of(&draft.parts, &prefix);
            if !now_reads.is_empty() {
                let then_reads = reads_of(&before_parts, &prefix);
                said.push(self.context_changes(&now_reads, &then_reads));
                continue;
            }
            let steps = lock(&self.steps);
            let Some(upstream) = steps.1.get(input).map(|&j| &steps.0[j]) else {
                continue;
            };
            if let Some(e) = &upstream.explain {
                if because_of.is_none() {
                    because_of = Some(e.because_of.clone().unwrap_or_else(|| upstream.digest.clone()));
                }
                continue;
            }
            // A cached input with another key than last time: say what changed in it.
            let why = previous
                .find(&upstream.digest, &upstream.name, upstream.location.as_deref())
                .map(|b| (self.parts_of(upstream), self.parts_of(b)))
                .filter(|(now, then)| !now.is_empty() && !then.is_empty())
                .map(|(now, then)| self.own_changes(&now, &then))
                .unwrap_or_default();
            said.push(if why.is_empty() {
                format!("its input {} is another result than last time", upstream.name)
            } else {
                why.join("; ")
            });
        }
        if because_of.is_some() {
            said.insert(0, Explanation::UPSTREAM.to_string());
        }
        if said.is_empty() {
            said.push("its inputs changed".into());
        }
        Explanation {
            reason: said.join("; "),
            because_of,
        }
    }

    /// A step's key parts: kept with it when it ran, else in its cache record.
    fn parts_of(&self, step: &StepRecord) -> BTreeMap<String, String> {
        if !step.parts.is_empty() {
            return step.parts.clone();
        }
        crate::cache::record_parts(&self.root, &step.key).unwrap_or_default()
    }

    /// What differs in a step's own parts (not its inputs), said by name.
    fn own_changes(&self, now: &BTreeMap<String, String>, then: &BTreeMap<String, String>) -> Vec<String> {
        let differs = |k: &str| now.get(k) != then.get(k);
        let mut out = Vec::new();
        if differs("source") {
            out.push(format!(
                "the base is now {} (was {})",
                now.get("source").map(String::as_str).unwrap_or("nothing"),
                then.get("source").map(String::as_str).unwrap_or("nothing")
            ));
        } else if differs("pinned") {
            out.push(format!(
                "{} is now {} (was {})",
                now.get("source").map(String::as_str).unwrap_or("the image"),
                now.get("pinned").map(String::as_str).unwrap_or("unpinned"),
                then.get("pinned").map(String::as_str).unwrap_or("unpinned")
            ));
        }
        if differs("command") {
            out.push("the command changed".into());
        }
        let envs: BTreeSet<&str> = now.keys().chain(then.keys()).filter_map(|k| k.strip_prefix("env:")).collect();
        let (mut args, mut env) = (Vec::new(), Vec::new());
        for name in envs {
            if differs(&format!("env:{name}")) {
                if self.info.build_args.iter().any(|a| a == name) {
                    args.push(name);
                } else {
                    env.push(name);
                }
            }
        }
        if !args.is_empty() {
            out.push(format!("build arg {} changed", args.join(", ")));
        }
        if !env.is_empty() {
            out.push(format!("environment {} changed", env.join(", ")));
        }
        for (part, what) in [
            ("cwd", "the working directory changed"),
            ("user", "the user changed"),
            ("mounts", "its mounts changed"),
            ("network", "its network mode changed"),
            ("security", "its security mode changed"),
            ("actions", "the instruction changed"),
        ] {
            if differs(part) {
                out.push(what.into());
            }
        }
        if out.is_empty() && differs("op") {
            out.push("the instruction's flags changed".into());
        }
        out
    }

    /// Which context files differ between two sets of reads (path → checksum).
    fn context_changes(&self, now: &BTreeMap<&str, &str>, then: &BTreeMap<&str, &str>) -> String {
        let (mut changed, mut appeared, mut vanished) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        let mut unknown = Vec::new();
        for (path, sum) in now {
            match then.get(path) {
                Some(old) if old == sum => {}
                Some(old) => match (self.read_manifest(old), self.read_manifest(sum)) {
                    (Some(a), Some(b)) => {
                        for (p, s) in &b {
                            match a.get(p) {
                                Some(t) if t == s => {}
                                Some(_) => {
                                    changed.insert(p.clone());
                                }
                                None => {
                                    appeared.insert(p.clone());
                                }
                            }
                        }
                        vanished.extend(a.keys().filter(|p| !b.contains_key(*p)).cloned());
                    }
                    _ => unknown.push(*path),
                },
                None => unknown.push(*path),
            }
        }
        for path in then.keys().filter(|p| !now.contains_key(*p)) {
            unknown.push(path);
        }
        let mut said = Vec::new();
        for (what, set) in [("changed", &changed), ("appeared", &appeared), ("vanished", &vanished)] {
            if set.is_empty() {
                continue;
            }
            let shown: Vec<&str> = set.iter().take(SHOWN_PATHS).map(String::as_str).collect();
            let more = set.len().saturating_sub(SHOWN_PATHS);
            let lead = if said.is_empty() { "context files " } else { "" };
            said.push(format!(
                "{lead}{what}: {}{}",
                shown.join(", "),
                if more > 0 { format!(" and {more} more") } else { String::new() }
            ));
        }
        if said.is_empty() {
            let paths: Vec<&str> = unknown.iter().take(SHOWN_PATHS).copied().collect();
            if paths.is_empty() {
                return "its context files changed".into();
            }
            return format!("context files changed under {}", paths.join(", "));
        }
        said.join("; ")
    }

    fn manifest_path(&self, sum: &str) -> PathBuf {
        self.dir.join("reads").join(sum)
    }

    /// The manifest of a read: `SUM PATH` per line, for every node it selects.
    fn write_manifest(&self, source: &LocalSource, cache: &ChecksumCache, read: &LocalRead) {
        let path = self.manifest_path(&hex::encode(read.checksum));
        if path.exists() {
            return;
        }
        let src = if read.whole { "/" } else { read.path.as_str() };
        let Ok(entries) = source.manifest(cache, src, read.wildcard) else {
            return;
        };
        let mut text = String::new();
        for (p, sum) in entries {
            text.push_str(&hex::encode(sum));
            text.push(' ');
            text.push_str(&p);
            text.push('\n');
        }
        if fs::create_dir_all(self.dir.join("reads")).is_ok() {
            let _ = write_atomic(&path, text.as_bytes(), false);
        }
    }

    fn read_manifest(&self, sum: &str) -> Option<BTreeMap<String, String>> {
        if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let path = self.manifest_path(sum);
        if fs::metadata(&path).ok()?.len() > MAX_RECORD {
            return None;
        }
        let text = fs::read_to_string(path).ok()?;
        Some(
            text.lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(s, p)| (p.to_string(), s.to_string()))
                .collect(),
        )
    }

    /// Writes the build to the history; returns its id and critical path.
    pub(crate) fn write(
        &self,
        duration_ms: u64,
        ran: u32,
        cached: u32,
        result: Option<String>,
        error: Option<String>,
    ) -> (Option<String>, Vec<PathStep>) {
        let steps = std::mem::take(&mut lock(&self.steps).0);
        let id = {
            let h = Sha256::digest(format!("{}\0{}\0{:?}", self.started, std::process::id(), std::time::Instant::now()).as_bytes());
            format!("{}-{}", self.started, &hex::encode(h)[..8])
        };
        let record = BuildRecord {
            id: id.clone(),
            started: self.started,
            definition: self.info.definition.clone(),
            target: self.info.target.clone(),
            platforms: self.platforms.clone(),
            duration_ms,
            ran,
            cached,
            result,
            error,
            steps,
        };
        let path = record.critical_path();
        let written = serde_json::to_vec(&record).ok().and_then(|bytes| {
            fs::create_dir_all(self.dir.join("last")).ok()?;
            write_atomic(&self.dir.join(format!("{id}.json")), &bytes, false).ok()?;
            write_atomic(&last_file(&self.dir, &self.info), id.as_bytes(), false).ok()
        });
        // Trimming lists two directories: done on about one build in 16.
        if id.ends_with('0') {
            self.trim();
        }
        (written.map(|_| id), path)
    }

    /// Keeps the newest builds and the most recently written manifests
    /// (a directory is stat'ed only when it holds more than it keeps).
    fn trim(&self) {
        let trim_dir = |dir: &std::path::Path, suffix: &str, keep: usize| {
            let names: Vec<PathBuf> = fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
                .map(|e| e.path())
                .collect();
            if names.len() <= keep {
                return;
            }
            let mut dated: Vec<(std::time::SystemTime, PathBuf)> = names
                .into_iter()
                .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
                .collect();
            dated.sort_by_key(|d| std::cmp::Reverse(d.0));
            for (_, old) in dated.into_iter().skip(keep) {
                let _ = fs::remove_file(old);
            }
        };
        trim_dir(&self.dir, ".json", KEEP_BUILDS);
        trim_dir(&self.dir.join("reads"), "", KEEP_MANIFESTS);
    }
}

fn reads_of<'a>(parts: &'a BTreeMap<String, String>, prefix: &str) -> BTreeMap<&'a str, &'a str> {
    parts
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|p| (p, v.as_str())))
        .collect()
}
