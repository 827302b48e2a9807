//! The Dockerfile frontend.
pub mod shell;
