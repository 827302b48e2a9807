//! Tidy checks on the workspace: dependency edges point one way
//! (cli → frontends → llb, cli → solver → llb), pure crates avoid IO crates,
//! and every Rust file opens with a `//!` line saying what it is for.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kiln_deps(manifest: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(manifest)).expect("manifest");
    let mut deps = Vec::new();
    let mut in_deps = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_deps = t == "[dependencies]";
            continue;
        }
        if in_deps {
            if let Some(name) = t.split(['.', ' ', '=']).next().filter(|n| n.starts_with("kiln")) {
                deps.push(name.to_string());
            }
        }
    }
    deps
}

#[test]
fn dependencies_point_one_way() {
    assert_eq!(kiln_deps("llb/Cargo.toml"), Vec::<String>::new(), "llb depends on no kiln crate");
    assert_eq!(kiln_deps("frontends/frontend/Cargo.toml"), vec!["kiln-llb"]);
    assert_eq!(kiln_deps("frontends/dockerfile/Cargo.toml"), vec!["kiln-llb", "kiln-frontend"]);
    for manifest in ["solver/oci/Cargo.toml", "solver/engine/Cargo.toml", "solver/protocol/Cargo.toml"] {
        for dep in kiln_deps(manifest) {
            assert!(
                !dep.contains("dockerfile"),
                "{manifest}: the solver side knows no Dockerfile frontend"
            );
            assert!(dep != "kiln", "{manifest}: the solver does not depend on the CLI");
        }
    }
    // The guest side (what plugins link) must build for wasm32: no host-only crates.
    assert_eq!(
        kiln_deps("frontends/guest/Cargo.toml"),
        vec!["kiln-llb", "kiln-frontend", "kiln-frontend-stdio"]
    );
    assert_eq!(kiln_deps("frontends/plugins/steps/Cargo.toml"), vec!["kiln-guest"]);
    assert_eq!(kiln_deps("frontends/wasm/Cargo.toml"), vec!["kiln-frontend", "kiln-frontend-stdio"]);
    assert_eq!(
        kiln_deps("frontends/recipe/Cargo.toml"),
        vec!["kiln-llb", "kiln-frontend", "kiln-dockerfile", "kiln-frontend-stdio"]
    );
    assert_eq!(
        kiln_deps("solver/protocol/Cargo.toml"),
        Vec::<String>::new(),
        "the protocol crate stands alone"
    );
    for pure in [
        "llb/Cargo.toml",
        "frontends/frontend/Cargo.toml",
        "frontends/dockerfile/Cargo.toml",
        "frontends/stdio/Cargo.toml",
        "frontends/guest/Cargo.toml",
        "frontends/plugins/steps/Cargo.toml",
        "frontends/recipe/Cargo.toml",
    ] {
        let text = std::fs::read_to_string(root().join(pure)).expect("manifest");
        let deps = text.split("[dependencies]").nth(1).unwrap_or("").split("\n[").next().unwrap_or("");
        for io in ["tokio", "reqwest", "walkdir", "wasmtime"] {
            assert!(!deps.contains(io), "{pure} must do no IO but depends on {io}");
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() && name != "target" && !name.starts_with('.') {
            rust_files(&p, out);
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_rust_file_says_what_it_is_for() {
    let mut files = Vec::new();
    for dir in ["llb", "frontends", "solver", "cli"] {
        rust_files(&root().join(dir), &mut files);
    }
    assert!(files.len() > 10);
    for f in files {
        let text = std::fs::read_to_string(&f).expect("source");
        assert!(text.starts_with("//!"), "{} has no //! header", f.display());
    }
}
