//! Shared helpers for the Dockerfile frontend's tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The `../shared` folder beside the project (override with `KILN_SHARED`).
pub fn shared() -> PathBuf {
    kiln_test_support::shared_dir()
}

/// A corpus folder under `shared()`, or None (a failure on CI) when missing.
pub fn corpus(rel: &str) -> Option<PathBuf> {
    kiln_test_support::shared(rel, rel)
}
