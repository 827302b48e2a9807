//! Reading a marshalled Definition: decode, check the graph, keep the bytes.

use prost::Message;
use std::collections::HashMap;

use crate::marshal::{digest_of, Digest};
use crate::pb;

/// Why a Definition cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// The bytes are not a protobuf Definition.
    #[error("not an LLB definition: {0}")]
    Decode(#[from] prost::DecodeError),
    /// One `def` entry is not a protobuf Op.
    #[error("op {index} of the definition cannot be decoded: {source}")]
    DecodeOp {
        /// Position in `def`.
        index: usize,
        /// The protobuf error.
        source: prost::DecodeError,
    },
    /// Fewer than two ops (BuildKit needs at least one op and the terminator).
    #[error("definition has {0} ops; at least an op and the terminator are needed")]
    TooShort(usize),
    /// An input names an op that does not come before it.
    #[error("op {op} has input {input} which is not defined before it")]
    DanglingInput {
        /// The op with the bad input.
        op: Digest,
        /// The missing digest.
        input: String,
    },
    /// The terminator does not have exactly one input.
    #[error("the last op must be a terminator with one input, it has {0}")]
    BadTerminator(usize),
    /// A negative output index.
    #[error("op {0} has a negative input index")]
    NegativeIndex(Digest),
    /// An index inside an op (an input's output, a mount's or file action's
    /// input or output) that points past what exists.
    #[error("op {op}: {what} is out of range")]
    IndexOutOfRange {
        /// The op.
        op: Digest,
        /// Which index, and its value and bound.
        what: String,
    },
}

/// How many outputs an op can have: one per mount of an ExecOp, one per
/// action of a FileOp, one otherwise.
fn output_count(op: &pb::Op) -> usize {
    match &op.op {
        Some(pb::op::Op::Exec(e)) => e.mounts.len().max(1),
        Some(pb::op::Op::File(f)) => f.actions.len().max(1),
        _ => 1,
    }
}

/// Checks the indices inside an op against what they index, so no consumer
/// sizes anything by a number from the wire: mount inputs and outputs, file
/// action inputs (an op input, or an earlier action's result) and outputs,
/// merge and diff inputs.
fn check_indices(op: &pb::Op) -> Result<(), String> {
    let inputs = op.inputs.len() as i64;
    let input_ok = |i: i64| i == -1 || (0..inputs).contains(&i);
    match &op.op {
        Some(pb::op::Op::Exec(e)) => {
            let mounts = e.mounts.len() as i64;
            for (n, m) in e.mounts.iter().enumerate() {
                if !input_ok(m.input) {
                    return Err(format!("mount {n} has input {} of {inputs}", m.input));
                }
                if m.output < -1 || m.output >= mounts {
                    return Err(format!("mount {n} has output {} of {mounts}", m.output));
                }
            }
        }
        Some(pb::op::Op::File(f)) => {
            let actions = f.actions.len() as i64;
            for (n, a) in f.actions.iter().enumerate() {
                // Past the op's inputs, an index names the result of an earlier action.
                let ok = |i: i64| i == -1 || (0..inputs + n as i64).contains(&i);
                if !ok(a.input) || !ok(a.secondary_input) {
                    return Err(format!("file action {n} has input {}/{}", a.input, a.secondary_input));
                }
                if a.output < -1 || a.output >= actions {
                    return Err(format!("file action {n} has output {} of {actions}", a.output));
                }
            }
        }
        Some(pb::op::Op::Merge(m)) => {
            if let Some(i) = m.inputs.iter().find(|i| !(0..inputs).contains(&i.input)) {
                return Err(format!("merge input {} of {inputs}", i.input));
            }
        }
        Some(pb::op::Op::Diff(d)) => {
            for i in [d.lower.as_ref().map(|l| l.input), d.upper.as_ref().map(|u| u.input)]
                .into_iter()
                .flatten()
            {
                if !input_ok(i) {
                    return Err(format!("diff input {i} of {inputs}"));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// A decoded Definition with each op's original bytes and digest.
#[derive(Debug, Clone)]
pub struct LoadedDefinition {
    /// Ops in `def` order, the terminator last.
    pub ops: Vec<LoadedOp>,
    /// Metadata by digest.
    pub metadata: std::collections::BTreeMap<String, pb::OpMetadata>,
    /// The source map, if any.
    pub source: Option<pb::Source>,
}

/// One op of a [`LoadedDefinition`].
#[derive(Debug, Clone)]
pub struct LoadedOp {
    /// The digest of `bytes`.
    pub digest: Digest,
    /// The bytes exactly as found.
    pub bytes: Vec<u8>,
    /// The decoded op.
    pub op: pb::Op,
}

impl LoadedDefinition {
    /// Decodes and checks a marshalled `pb.Definition` as BuildKit's loader does.
    pub fn decode(bytes: &[u8]) -> Result<LoadedDefinition, DefinitionError> {
        let def = pb::Definition::decode(bytes)?;
        LoadedDefinition::from_definition(def)
    }

    /// Checks a decoded Definition.
    pub fn from_definition(def: pb::Definition) -> Result<LoadedDefinition, DefinitionError> {
        if def.def.len() < 2 {
            return Err(DefinitionError::TooShort(def.def.len()));
        }
        let mut ops = Vec::with_capacity(def.def.len());
        // Each op seen so far, with how many outputs it has.
        let mut seen: HashMap<Digest, usize> = HashMap::new();
        for (index, bytes) in def.def.into_iter().enumerate() {
            let op = pb::Op::decode(bytes.as_slice()).map_err(|source| DefinitionError::DecodeOp { index, source })?;
            let digest = digest_of(&bytes);
            for input in &op.inputs {
                if input.index < 0 {
                    return Err(DefinitionError::NegativeIndex(digest));
                }
                let Some(&outputs) = seen.get(&Digest::from_string(input.digest.clone())) else {
                    return Err(DefinitionError::DanglingInput {
                        op: digest,
                        input: input.digest.clone(),
                    });
                };
                if input.index as u64 >= outputs as u64 {
                    return Err(DefinitionError::IndexOutOfRange {
                        op: digest,
                        what: format!("input {} uses output {} of an op with {outputs}", input.digest, input.index),
                    });
                }
            }
            check_indices(&op).map_err(|what| DefinitionError::IndexOutOfRange { op: digest.clone(), what })?;
            seen.insert(digest.clone(), output_count(&op));
            ops.push(LoadedOp { digest, bytes, op });
        }
        let last = &ops[ops.len() - 1].op;
        if last.op.is_some() || last.inputs.len() != 1 {
            return Err(DefinitionError::BadTerminator(last.inputs.len()));
        }
        Ok(LoadedDefinition {
            ops,
            metadata: def.metadata,
            source: def.source,
        })
    }

    /// One graph of several definitions (a multi-platform build's, one per
    /// platform): each op once, in the order first seen (inputs still come
    /// first), the first metadata of an op kept, and a terminator with one
    /// input per definition, in their order, so a vertex the definitions
    /// share is one vertex. The source map is the first one's.
    pub fn merge(defs: Vec<LoadedDefinition>) -> LoadedDefinition {
        let mut ops: Vec<LoadedOp> = Vec::new();
        let mut seen: std::collections::HashSet<Digest> = std::collections::HashSet::new();
        let mut metadata = std::collections::BTreeMap::new();
        let mut source = None;
        let mut results = Vec::new();
        for def in defs {
            let n = def.ops.len();
            for (i, op) in def.ops.into_iter().enumerate() {
                if i + 1 == n {
                    results.extend(op.op.inputs);
                } else if seen.insert(op.digest.clone()) {
                    ops.push(op);
                }
            }
            for (k, v) in def.metadata {
                metadata.entry(k).or_insert(v);
            }
            source = source.or(def.source);
        }
        let terminator = pb::Op {
            inputs: results,
            ..Default::default()
        };
        let bytes = crate::marshal::marshal_op(&terminator);
        ops.push(LoadedOp {
            digest: digest_of(&bytes),
            bytes,
            op: terminator,
        });
        LoadedDefinition { ops, metadata, source }
    }

    /// Metadata of one op.
    pub fn metadata_of(&self, digest: &Digest) -> Option<&pb::OpMetadata> {
        self.metadata.get(digest.as_str())
    }

    /// The `dump-llb` JSON lines, one per op.
    pub fn to_json_lines(&self) -> String {
        let mut out = String::new();
        for op in &self.ops {
            out.push_str(&crate::json::dump_line(&op.op, &op.digest, self.metadata_of(&op.digest)));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::marshal::marshal_op;

    /// A scratch-based ExecOp with the given mounts, behind a source op, and the terminator.
    fn definition(mounts: Vec<pb::Mount>, input_index: i64) -> pb::Definition {
        let source = pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: "docker-image://docker.io/library/busybox:latest".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let source_bytes = marshal_op(&source);
        let source_digest = digest_of(&source_bytes);
        let exec = pb::Op {
            inputs: vec![pb::Input {
                digest: source_digest.as_str().to_string(),
                index: input_index,
            }],
            op: Some(pb::op::Op::Exec(pb::ExecOp {
                meta: Some(pb::Meta {
                    args: vec!["true".into()],
                    cwd: "/".into(),
                    ..Default::default()
                }),
                mounts,
                ..Default::default()
            })),
            ..Default::default()
        };
        let exec_bytes = marshal_op(&exec);
        let end = pb::Op {
            inputs: vec![pb::Input {
                digest: digest_of(&exec_bytes).as_str().to_string(),
                index: 0,
            }],
            ..Default::default()
        };
        pb::Definition {
            def: vec![source_bytes, exec_bytes, marshal_op(&end)],
            ..Default::default()
        }
    }

    fn root_mount(output: i64) -> pb::Mount {
        pb::Mount {
            input: 0,
            dest: "/".into(),
            output,
            ..Default::default()
        }
    }

    #[test]
    fn wire_indices_are_bounded_when_loaded() {
        assert!(LoadedDefinition::from_definition(definition(vec![root_mount(0)], 0)).is_ok());
        // An output index that would size a vector by a number from the wire.
        let huge = LoadedDefinition::from_definition(definition(vec![root_mount(1 << 40)], 0));
        assert!(matches!(huge, Err(DefinitionError::IndexOutOfRange { .. })), "{huge:?}");
        // A mount input past the op's inputs.
        let mut m = root_mount(0);
        m.input = 3;
        let bad_input = LoadedDefinition::from_definition(definition(vec![m], 0));
        assert!(matches!(bad_input, Err(DefinitionError::IndexOutOfRange { .. })), "{bad_input:?}");
        // An input naming output 7 of a source op, which has one.
        let bad_output = LoadedDefinition::from_definition(definition(vec![root_mount(0)], 7));
        assert!(matches!(bad_output, Err(DefinitionError::IndexOutOfRange { .. })), "{bad_output:?}");
    }

    #[test]
    fn merged_definitions_share_their_common_ops() {
        let a = LoadedDefinition::from_definition(definition(vec![root_mount(0)], 0)).expect("a");
        let mut ro = root_mount(-1);
        ro.readonly = true;
        let b = LoadedDefinition::from_definition(definition(vec![ro], 0)).expect("b");
        let (exec_a, exec_b) = (a.ops[1].digest.clone(), b.ops[1].digest.clone());
        assert_eq!(a.ops[0].digest, b.ops[0].digest, "the same source op");
        let merged = LoadedDefinition::merge(vec![a, b]);
        let digests: Vec<&Digest> = merged.ops.iter().map(|o| &o.digest).collect();
        assert_eq!(digests.len(), 4, "source once, two execs, one terminator: {digests:?}");
        assert_eq!((digests[1], digests[2]), (&exec_a, &exec_b));
        let results: Vec<&str> = merged.ops[3].op.inputs.iter().map(|i| i.digest.as_str()).collect();
        assert_eq!(results, [exec_a.as_str(), exec_b.as_str()], "one result per definition, in order");
        assert!(merged.ops[3].op.op.is_none(), "a terminator");
    }
}
