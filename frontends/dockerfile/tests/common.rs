//! Shared helpers for the Dockerfile frontend's tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The `../shared` folder beside the project (override with `KILN_SHARED`).
pub fn shared() -> PathBuf {
    std::env::var_os("KILN_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

/// A corpus folder under `shared()`, or None (a failure on CI) when missing.
pub fn corpus(rel: &str) -> Option<PathBuf> {
    let p = shared().join(rel);
    if p.is_dir() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").map(|v| v != "true").unwrap_or(true),
        "{} is required on CI",
        p.display()
    );
    eprintln!("{} not found; skipped", p.display());
    None
}
