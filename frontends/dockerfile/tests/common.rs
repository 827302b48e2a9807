//! Shared helpers for the Dockerfile frontend's tests.
#![allow(dead_code, reason = "each test binary uses some of the helpers")]
#![allow(unreachable_pub, reason = "helpers shared by test binaries")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

use std::path::PathBuf;

/// The `../shared` folder beside the project (override with `KILN_SHARED`).
pub fn shared() -> PathBuf {
    kiln_test_support::shared_dir()
}

/// A corpus folder under `shared()`, or None (a failure on CI) when missing.
pub fn corpus(rel: &str) -> Option<PathBuf> {
    kiln_test_support::shared(rel, rel)
}
