//! OCI images: reading an OCI image layout (and kiln's image store, which is
//! one) or a distribution registry to resolve an image's config for a platform.
//!
//! Shared by the CLI's frontend host and the solver, as is the registry
//! client ([`registry`]).

pub mod layout;
pub mod registry;

pub use layout::{Layout, LayoutError, ResolvedConfig};
pub use registry::{Credentials, RegistryClient, RegistryError};
