//! Same image as BuildKit: every build context of
//! `../shared/conformance/images/` built with kiln and compared, file by file
//! and field by field, with the image BuildKit 0.32 built from it
//! (`expected.json`, compared by the corpus's own `compare-image.py`).
//!
//! The base `127.0.0.1:5000/busybox:latest` is the corpus's deterministic
//! busybox (`tools/peer-lab/mkbase.py`, the same manifest digest as when the
//! records were made), given as a named build context, so no registry is
//! needed. Steps run without a network, as the records were made.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{can_build, scratch_dir, Rootless};

const BASE: &str = "127.0.0.1:5000/busybox:latest";
/// The manifest digest the records were made against (the corpus README).
const BASE_MANIFEST: &str = "sha256:6ebaea4e741914a8ed023e2ac2b41e32dc3078d6d5b2a803f584427eaf591932";

/// The corpus's cases, in order.
fn cases(images: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(images)
        .expect("read the image corpus")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    out.sort();
    out
}

/// Copies a case out of the (read-only on CI) corpus, symlinks kept, and
/// gives the owner back its write bit, as the corpus README says.
fn copy_case(case: &Path, dest: &Path) {
    let status = Command::new("cp").arg("-a").arg(case).arg(dest).status().expect("cp runs");
    assert!(status.success(), "copying {}", case.display());
    let status = Command::new("chmod").args(["-R", "u+w"]).arg(dest).status().expect("chmod runs");
    assert!(status.success(), "chmod -R u+w {}", dest.display());
    if case.file_name().is_some_and(|n| n.to_string_lossy().starts_with("27-")) {
        restore_symlinks(dest);
    }
}

/// The corpus README asks for case 27's context symlinks to be checked out
/// as symlinks; a checkout without `core.symlinks` leaves each as a small
/// file holding its target (no newline, as git writes it). Makes those
/// symlinks again.
fn restore_symlinks(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("read case").flatten() {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        if meta.is_dir() {
            restore_symlinks(&path);
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if !meta.is_file() || meta.len() > 255 || name == "Dockerfile" || name.starts_with("expected") {
            continue;
        }
        let content = std::fs::read(&path).expect("read");
        if content.is_empty() || content.contains(&b'\n') || content.contains(&0) {
            continue;
        }
        let target = String::from_utf8(content).expect("utf8 target");
        std::fs::remove_file(&path).expect("remove");
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
    }
}

/// The case's build flags (`--build-arg`, `--target`), as the corpus tool gives them.
fn case_flags(tools: &Path, case: &Path) -> Vec<String> {
    let out = Command::new("python3")
        .arg(tools.join("imagefs.py"))
        .arg("flags")
        .arg(case)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "imagefs.py flags: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .expect("utf8 flags")
        .split('\0')
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect()
}

/// Builds one case into an OCI tarball and compares it; `None` when identical,
/// else what differs.
fn check(case: &Path, work: &Path, base: &Path, tools: &Path, rootless: Option<&Rootless>) -> Option<String> {
    let name = case.file_name().expect("case name").to_string_lossy().into_owned();
    let ctx = work.join(&name);
    copy_case(case, &ctx);
    if let Some(user) = rootless {
        user.give(&ctx);
    }
    let image = work.join(format!("{name}.tar"));
    let mut args: Vec<String> = vec![
        "build".into(),
        "--progress".into(),
        "plain".into(),
        "--no-cache".into(),
        "--network".into(),
        "none".into(),
        "--build-context".into(),
        format!("{BASE}=oci-layout://{}:latest", base.display()),
        "-o".into(),
        format!("type=oci,dest={}", image.display()),
    ];
    args.extend(case_flags(tools, &ctx));
    args.push(".".into());
    let out = match rootless {
        Some(user) => user.kiln(&args.iter().map(String::as_str).collect::<Vec<_>>(), &ctx, &work.join("root")),
        None => Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .current_dir(&ctx)
            .env("KILN_ROOT", work.join("root"))
            .output()
            .expect("kiln runs"),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Some(format!(
            "{name}: kiln build failed\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    let cmp = Command::new("python3")
        .arg(tools.join("compare-image.py"))
        .arg(case.join("expected.json"))
        .arg(&image)
        .args(["--max", "40"])
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_dir_all(&ctx);
    match cmp.status.code() {
        Some(0) => None,
        _ => Some(format!(
            "{name}:\n{}{}",
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        )),
    }
}

#[test]
fn every_case_builds_the_image_buildkit_built() {
    every_case("every_case_builds_the_image_buildkit_built", false);
}

/// The same images from a user without root (subordinate ids, a user
/// namespace): owners, modes, whiteouts and all.
#[test]
fn every_case_builds_the_image_buildkit_built_rootless() {
    every_case("every_case_builds_the_image_buildkit_built_rootless", true);
}

fn every_case(test: &str, rootless: bool) {
    let Some(images) = kiln_test_support::shared(test, "conformance/images") else {
        return;
    };
    if !can_build() || !kiln_test_support::tool(test, "python3") {
        return;
    }
    let tools = kiln_test_support::shared_dir().join("tools");
    let work = scratch_dir(if rootless { "conformance-rootless" } else { "conformance" });
    let user = if rootless {
        let Some(user) = common::rootless(test, &work) else {
            return;
        };
        Some(user)
    } else {
        None
    };
    let base = work.join("busybox-oci");
    let made = Command::new("python3")
        .arg(tools.join("peer-lab/mkbase.py"))
        .arg(&base)
        .output()
        .expect("python3 runs");
    assert!(made.status.success(), "mkbase.py: {}", String::from_utf8_lossy(&made.stderr));
    assert!(
        String::from_utf8_lossy(&made.stdout).contains(BASE_MANIFEST),
        "mkbase.py no longer makes the base the records were made against: {}",
        String::from_utf8_lossy(&made.stdout)
    );
    let all = cases(&images);
    assert!(all.len() >= 29, "the corpus has {} cases", all.len());
    // KILN_CONFORMANCE_CASES=04,13 checks only those (while working on them).
    let only: Vec<String> = std::env::var("KILN_CONFORMANCE_CASES")
        .map(|v| v.split(',').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect())
        .unwrap_or_default();
    let all: Vec<PathBuf> = all
        .into_iter()
        .filter(|c| {
            only.is_empty()
                || only
                    .iter()
                    .any(|o| c.file_name().is_some_and(|n| n.to_string_lossy().starts_with(o.as_str())))
        })
        .collect();
    let failures: Vec<String> = all
        .iter()
        .filter_map(|case| check(case, &work, &base, &tools, user.as_ref()))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from BuildKit's image:\n\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}
