//! `# syntax=` selects the frontend: the built-in one, or a native
//! `kiln-frontend-NAME` program on PATH speaking the frontend protocol.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::scratch_dir;

fn kiln_with_path(args: &[&str], dir: &Path, path_dir: &Path) -> Output {
    let path = format!("{}:{}", path_dir.display(), std::env::var("PATH").unwrap_or_default());
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("KILN_ROOT", dir.join("root"))
        .env("PATH", path)
        .output()
        .expect("kiln runs")
}

#[test]
fn a_native_frontend_on_path_gives_the_built_in_llb() {
    let binary = Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name("kiln-frontend-dockerfile");
    assert!(binary.is_file(), "{} is built by `cargo test --workspace`", binary.display());
    let dir = scratch_dir("native-frontend");
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).expect("bin");
    std::os::unix::fs::symlink(&binary, bin_dir.join("kiln-frontend-mydf")).expect("symlink");
    std::fs::write(
        dir.join("Dockerfile"),
        "# syntax=mydf\nFROM alpine AS build\nRUN echo hi > /x\nFROM scratch\nCOPY --from=build /x /x\nCMD [\"/x\"]\n",
    )
    .expect("Dockerfile");
    let native = kiln_with_path(&["dump-llb", "--no-resolve", "."], &dir, &bin_dir);
    assert!(native.status.success(), "{}", String::from_utf8_lossy(&native.stderr));
    let builtin = kiln_with_path(&["dump-llb", "--no-resolve", "--frontend", "dockerfile", "."], &dir, &bin_dir);
    assert!(builtin.status.success(), "{}", String::from_utf8_lossy(&builtin.stderr));
    assert!(!native.stdout.is_empty());
    assert_eq!(
        native.stdout, builtin.stdout,
        "the native frontend produced the built-in frontend's LLB"
    );

    // Its diagnostics come back with spans and are rendered like the built-in's.
    std::fs::write(dir.join("Dockerfile"), "# syntax=mydf\nFROM alpine\nRUNN x\n").expect("Dockerfile");
    let bad = kiln_with_path(&["dump-llb", "--no-resolve", "."], &dir, &bin_dir);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("[Dockerfile:3:1]") && err.contains("RUNN"), "{err}");
}

#[test]
fn an_unknown_syntax_lists_what_was_tried() {
    let dir = scratch_dir("unknown-frontend");
    std::fs::write(dir.join("Dockerfile"), "# syntax=nosuchfrontend\nFROM alpine\n").expect("Dockerfile");
    let out = kiln_with_path(&["dump-llb", "--no-resolve", "."], &dir, &dir);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kiln-frontend-nosuchfrontend on PATH")
            && err.contains("built-in frontends (dockerfile, docker/dockerfile:…, recipe)"),
        "{err}"
    );
    // BuildKit's own references are the built-in frontend.
    std::fs::write(dir.join("Dockerfile"), "# syntax=docker/dockerfile:1.7\nFROM alpine\n").expect("Dockerfile");
    let out = kiln_with_path(&["dump-llb", "--no-resolve", "."], &dir, &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
