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
        let mut seen: HashMap<Digest, ()> = HashMap::new();
        for (index, bytes) in def.def.into_iter().enumerate() {
            let op = pb::Op::decode(bytes.as_slice()).map_err(|source| DefinitionError::DecodeOp { index, source })?;
            let digest = digest_of(&bytes);
            for input in &op.inputs {
                if input.index < 0 {
                    return Err(DefinitionError::NegativeIndex(digest));
                }
                if !seen.contains_key(&Digest::from_string(input.digest.clone())) {
                    return Err(DefinitionError::DanglingInput {
                        op: digest,
                        input: input.digest.clone(),
                    });
                }
            }
            seen.insert(digest.clone(), ());
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
