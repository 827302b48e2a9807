//! Where a build's inputs come from: image sources pulled from registries
//! ([`pull`]) and local directories used in place ([`context`], seen
//! through `.dockerignore`-style patterns of the `kiln-patterns` crate).

pub(crate) mod context;
pub(crate) mod pull;
