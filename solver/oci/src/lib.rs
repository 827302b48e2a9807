//! OCI images on disk: reading an OCI image layout (and kiln's image store,
//! which is one) to resolve an image's config for a platform.
//!
//! Shared by the CLI's frontend host and the solver. The registry client will
//! live here too, so both can use it.

pub mod layout;

pub use layout::{Layout, LayoutError, ResolvedConfig};
