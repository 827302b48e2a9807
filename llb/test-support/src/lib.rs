//! What kiln's tests need from the machine, decided in one place: whether
//! this is CI, where `../shared` is, whether a host tool or root is there.
//!
//! Off CI a missing prerequisite skips the test and says so on stderr
//! (`SKIPPED test: reason`); on CI (`CI` set to anything but `false`/`0`)
//! it fails the test, because `.ci/run` installs everything.
//! A dev-dependency only: no library links it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether the tests run on CI, where nothing may be skipped.
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "false" | "0"))
}

/// Skips (returns false, with a loud line on stderr) or, on CI, fails.
/// `test` names the test or group, `reason` what is missing and how to get it.
pub fn skip(test: &str, reason: &str) -> bool {
    assert!(!on_ci(), "{test}: {reason} (required on CI; .ci/run installs it)");
    eprintln!("SKIPPED {test}: {reason}");
    false
}

/// `ok`, or the result of [`skip`] when it is false.
pub fn require(test: &str, ok: bool, reason: &str) -> bool {
    ok || skip(test, reason)
}

/// The `shared` folder beside the checkout (`KILN_SHARED` overrides), whether or not it exists.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("KILN_SHARED") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("../shared"),
    }
}

/// `shared/REL` when it exists; else skips or fails.
pub fn shared(test: &str, rel: &str) -> Option<PathBuf> {
    let p = shared_dir().join(rel);
    if p.exists() {
        Some(p)
    } else {
        skip(
            test,
            &format!("{} not found (put ../shared beside the checkout or set KILN_SHARED)", p.display()),
        );
        None
    }
}

/// Whether `tool` is on PATH; else skips or fails.
pub fn tool(test: &str, tool: &str) -> bool {
    tools(test, &[tool])
}

/// Whether every tool in `tools` is on PATH; else skips or fails, naming
/// every missing one.
pub fn tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    require(test, missing.is_empty(), &format!("not installed: {}", missing.join(", ")))
}

/// Whether a program is on PATH.
pub fn on_path(tool: &str) -> bool {
    which(tool).is_some()
}

/// Where a program is on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    let out = Command::new("sh").args(["-c", &format!("command -v '{tool}'")]).output().ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

/// Whether the tests run as root; else skips or fails.
pub fn root(test: &str, why: &str) -> bool {
    require(test, is_root(), &format!("needs root ({why})"))
}

/// Whether the effective user is root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The workspace root (this crate sits at `llb/test-support`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
