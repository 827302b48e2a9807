//! Cache keys and cache records: the solver's central invariant, in one place.
//!
//! # Key rules
//! 1. A key is the sha256 of length-prefixed parts, the first of which is
//!    [`KEY_SCHEME`]; changing any rule here bumps the scheme, so old records
//!    are never read under new rules.
//! 2. A vertex's key covers its op re-marshalled (Go's deterministic
//!    encoding) with each input's digest replaced by what that input
//!    contributes and its index set to 0 ([`vertex_key`]), plus, for an image
//!    source, the digest it is pinned to (an unpinned reference is pinned
//!    first: the key is the content, not the tag).
//! 3. An input contributes its own key and the output used (`KEY:INDEX`,
//!    [`input_contribution`]); a local source contributes instead a hash of
//!    its key and the content checksum of what the consumer reads of it
//!    ([`local_read_key`]): the copied paths for a FileOp that only copies
//!    from it, the mounted paths for an ExecOp that only bind-mounts parts
//!    of it (`RUN --mount=type=bind,source=go.mod`), everything it includes
//!    for any other consumer. So a changed context file re-runs only the
//!    steps that read it. Likewise another vertex's output contributes the
//!    content checksum of what the consumer reads of it, when it only reads
//!    (the sources of a FileOp that only copies from it, the read-only bind
//!    mounts of an ExecOp: [`content_read_key`]); then a stage that re-runs
//!    and makes the same files leaves those consumers cached, as BuildKit's
//!    content-based keys do. Its key takes no part: equal content is equal.
//! 4. Never in a key: proxy settings of a RUN (BuildKit's rule: a proxy
//!    changes how a step reaches the network, not what it makes), the
//!    contents of cache mounts, secret values and SSH sockets (only their
//!    ids and targets, which are part of the op).
//! 5. A local source used in place has a key from its op only
//!    ([`local_source_key`]) and no record; materialized as a layer (the
//!    result itself is the context) it is keyed by its directory and checksum
//!    ([`materialized_local_key`]).
//! 6. A vertex also has a *definition key*: rule 2 with every input that is
//!    not a local source contributing its own definition key instead of its
//!    key or content (a local source as in rule 3). It is known before any
//!    input has a result, so a vertex whose result is recorded under it is
//!    taken without computing, fetching or running its inputs (BuildKit's
//!    keys from definitions), and a cache exported with `mode=min` covers a
//!    multi-stage build without the stages the result only copies from. It
//!    is stricter than the key (any change upstream changes it), so it
//!    never finds a result the key would not; a result is recorded under
//!    both when they differ; the one under the definition key names the
//!    key (`Record::key`), which its consumers' keys build on. A result
//!    another root exported is found by either (a cache exports both); taken
//!    by its definition key, it carries no key of rule 2–3, so consumers
//!    build on the definition key (on that root, a later change upstream
//!    that leaves the content alike re-runs them once). A vertex or input
//!    that ignores the cache has none.
//!
//! # Records
//! A record names, for a key, the layer stack of each output
//! ([`Record`]). It is written after its layers, by temp-and-rename; a record
//! whose layers are gone is a miss and is removed ([`read_record`]).

use std::fs;

use kiln_llb::{marshal_op, pb};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::root::{write_atomic, StateRoot};
use crate::snapshot::contentsum::Selector;

/// Version of the key rules above.
pub(crate) const KEY_SCHEME: &[u8] = b"kiln-cache-v2";

/// sha256 over length-prefixed parts (so no two part lists collide).
pub(crate) fn hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Rule 2: the key of a vertex whose inputs were already replaced by their
/// contributions (`keyed`), with `pinned` the image digest of a source.
pub(crate) fn vertex_key(keyed: &pb::Op, pinned: &[u8]) -> String {
    let mut keyed = keyed.clone();
    if let Some(pb::op::Op::Exec(e)) = &mut keyed.op {
        if let Some(meta) = &mut e.meta {
            meta.proxy_env = None; // rule 4
        }
    }
    hash(&[KEY_SCHEME, &marshal_op(&keyed), pinned])
}

/// Rule 3: what an input contributes to its consumer's key.
pub(crate) fn input_contribution(input_key: &str, output: i64) -> String {
    format!("{input_key}:{output}")
}

/// One path a consumer reads of a local source: the path, whether it is a
/// wildcard, whether symlinks are followed, and the content checksum.
pub(crate) struct LocalRead {
    /// Everything the source includes (a consumer that is not a pure copy).
    pub(crate) whole: bool,
    /// Path in the source.
    pub(crate) path: String,
    /// The path is a pattern.
    pub(crate) wildcard: bool,
    /// Symlinks are followed.
    pub(crate) follow: bool,
    /// Content checksum of what the path selects.
    pub(crate) checksum: [u8; 32],
}

/// Rule 3: what a local source contributes, given what the consumer reads.
pub(crate) fn local_read_key(source_key: &str, reads: &[LocalRead]) -> String {
    let mut parts: Vec<Vec<u8>> = vec![source_key.as_bytes().to_vec()];
    for r in reads {
        if r.whole {
            parts.push(b"/".to_vec());
        } else {
            parts.push(format!("{}\0{}\0{}", r.path, r.wildcard, r.follow).into_bytes());
        }
        parts.push(r.checksum.to_vec());
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    hash(&refs)
}

/// Rule 3: what another vertex's output contributes when the consumer only
/// reads `selectors` of it, whose content sums are `sums`.
pub(crate) fn content_read_key(selectors: &[Selector], sums: &[[u8; 32]]) -> String {
    let mut parts: Vec<Vec<u8>> = vec![KEY_SCHEME.to_vec(), b"content".to_vec()];
    for (s, sum) in selectors.iter().zip(sums) {
        parts.push(format!("{}\0{}\0{}", s.path, s.wildcard, s.follow).into_bytes());
        parts.push(sum.to_vec());
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    hash(&refs)
}

/// Rule 5: a local source used in place.
pub(crate) fn local_source_key(op_bytes: &[u8]) -> String {
    hash(&[KEY_SCHEME, b"local", op_bytes])
}

/// Rule 5: a local source copied into a layer.
pub(crate) fn materialized_local_key(dir: &std::path::Path, checksum: &[u8]) -> String {
    hash(&[KEY_SCHEME, b"materialized-local", dir.as_os_str().as_encoded_bytes(), checksum])
}

/// What a cache record remembers of a vertex result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Each output's layers, bottom first, by output index.
    pub(crate) outputs: Vec<Vec<String>>,
    /// Seconds since the epoch when it was made.
    pub(crate) created: u64,
    /// The op that made it (its name), for `kiln du`.
    #[serde(default)]
    pub(crate) description: String,
    /// The parts of its key, by name, for `--explain` (`history.rs`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub(crate) parts: std::collections::BTreeMap<String, String>,
    /// Of a record kept under a definition key (rule 6): the key its result
    /// has under rules 2–3, which the vertex's consumers build on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<String>,
}

/// The key parts a record remembers, read without touching the record.
pub(crate) fn record_parts(root: &StateRoot, key: &str) -> Option<std::collections::BTreeMap<String, String>> {
    let bytes = fs::read(root.record_path(key)).ok()?;
    serde_json::from_slice::<Record>(&bytes).ok().map(|r| r.parts)
}

/// Reads a cache record; a missing or damaged record is a miss, and a record
/// whose layers are gone is removed.
pub(crate) fn read_record(root: &StateRoot, key: &str) -> Option<Record> {
    let path = root.record_path(key);
    let bytes = fs::read(&path).ok()?;
    let record: Record = serde_json::from_slice(&bytes).ok()?;
    if record.outputs.iter().flatten().all(|id| crate::snapshot::layer_present(root, id)) {
        // Its last use, for least-recently-used pruning: the mtime set to
        // now, by path (one call, where opening the file took three).
        let now = rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        };
        let omit = rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        };
        let times = rustix::fs::Timestamps {
            last_access: omit,
            last_modification: now,
        };
        let _ = rustix::fs::utimensat(rustix::fs::CWD, &path, &times, rustix::fs::AtFlags::empty());
        Some(record)
    } else {
        let _ = fs::remove_file(&path);
        None
    }
}

/// Writes a cache record (after its layers are in place).
pub(crate) fn write_record(root: &StateRoot, key: &str, record: &Record) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    write_atomic(&root.record_path(key), &bytes, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_op(proxy: Option<&str>) -> pb::Op {
        pb::Op {
            op: Some(pb::op::Op::Exec(pb::ExecOp {
                meta: Some(pb::Meta {
                    args: vec!["make".into()],
                    proxy_env: proxy.map(|p| pb::ProxyEnv {
                        http_proxy: p.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn proxies_never_enter_a_key_and_everything_else_does() {
        let plain = vertex_key(&run_op(None), b"");
        assert_eq!(plain, vertex_key(&run_op(Some("http://proxy:3128")), b""), "rule 4");
        assert_ne!(plain, vertex_key(&run_op(None), b"sha256:pinned"), "the pinned digest counts");
        let mut other = run_op(None);
        if let Some(pb::op::Op::Exec(e)) = &mut other.op {
            if let Some(m) = &mut e.meta {
                m.args = vec!["make".into(), "install".into()];
            }
        }
        assert_ne!(plain, vertex_key(&other, b""), "the op counts");
    }

    #[test]
    fn parts_are_length_prefixed() {
        assert_ne!(hash(&[b"ab", b"c"]), hash(&[b"a", b"bc"]));
        assert_ne!(input_contribution("k", 0), input_contribution("k", 1));
    }
}
