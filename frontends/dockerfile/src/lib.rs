//! The Dockerfile frontend.
pub mod parser;
pub mod shell;
