//! LLB: kiln's build-graph IR, wire-compatible with BuildKit's `pb.Definition`.
//!
//! - [`pb`]: the protobuf types generated from `proto/ops.proto`.
//! - [`marshal`]: deterministic op encoding and `sha256:` digests.
//! - [`builder`]: a typed API for making graphs (image, local, run, file, merge, diff).
//! - [`definition`]: reading and checking a marshalled Definition.
//! - [`json`] and [`dot`]: the `dump-llb` output formats.
//!
//! **Architecture invariant:** this crate does no IO and knows nothing of
//! Dockerfiles or of how ops are executed.

pub mod builder;
pub mod definition;
pub mod dot;
pub mod json;
pub mod marshal;

/// Protobuf wire types of BuildKit's `pb` package.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/pb.rs"));
}

pub use builder::{Output, State};
pub use definition::{DefinitionError, LoadedDefinition};
pub use marshal::{digest_of, marshal_op, Digest};
