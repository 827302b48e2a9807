//! The OCI image model both sides of kiln share: the image config a frontend
//! produces and the solver exports ([`ImageConfig`]), platforms
//! ([`Platform`]) and Docker image references ([`Reference`]).
//!
//! **Architecture invariant:** no IO; knows neither frontends nor the solver.

pub mod config;
pub mod platform;
pub mod reference;

pub use config::{Healthcheck, History, ImageConfig, RunConfig};
pub use platform::Platform;
pub use reference::{Reference, ReferenceError};
