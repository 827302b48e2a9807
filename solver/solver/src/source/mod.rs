//! Where a build's inputs come from: image sources pulled from registries
//! ([`pull`]) and local directories used in place ([`context`], with the
//! `.dockerignore`-style [`pattern`]s both they and copies use).

pub(crate) mod context;
pub(crate) mod pattern;
pub(crate) mod pull;
