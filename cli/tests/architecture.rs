//! Tidy checks on the workspace, read from `cargo metadata`: every crate's
//! folder is named after it, the workspace's dependency edges are exactly
//! the allowed ones, the solver side and the frontend side never reach each
//! other (transitively), pure crates reach no IO crate, a plugin linking
//! `kiln-guest` gets neither a frontend nor a host runtime, and every Rust
//! file opens with a `//!` line saying what it is for.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The workspace as `cargo metadata` resolves it.
struct Workspace {
    /// Member name → its folder, relative to the workspace root.
    members: BTreeMap<String, PathBuf>,
    /// Package name → names of its normal (non-dev, non-build) dependencies.
    deps: BTreeMap<String, BTreeSet<String>>,
}

impl Workspace {
    fn load() -> Workspace {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--locked", "--filter-platform"])
            .arg(host_triple())
            .current_dir(root())
            .output()
            .expect("cargo metadata runs");
        assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
        let root_dir = PathBuf::from(meta["workspace_root"].as_str().expect("workspace_root"));
        let mut names = BTreeMap::new();
        for p in meta["packages"].as_array().expect("packages") {
            names.insert(
                p["id"].as_str().expect("id").to_string(),
                p["name"].as_str().expect("name").to_string(),
            );
        }
        let mut members = BTreeMap::new();
        for p in meta["packages"].as_array().expect("packages") {
            let id = p["id"].as_str().expect("id");
            if meta["workspace_members"].as_array().expect("members").iter().any(|m| m == id) {
                let manifest = PathBuf::from(p["manifest_path"].as_str().expect("manifest_path"));
                let dir = manifest
                    .parent()
                    .expect("folder")
                    .strip_prefix(&root_dir)
                    .expect("inside")
                    .to_path_buf();
                members.insert(names[id].clone(), dir);
            }
        }
        let mut deps = BTreeMap::new();
        for node in meta["resolve"]["nodes"].as_array().expect("resolve") {
            let name = names[node["id"].as_str().expect("id")].clone();
            let normal: BTreeSet<String> = node["deps"]
                .as_array()
                .expect("deps")
                .iter()
                .filter(|d| d["dep_kinds"].as_array().expect("kinds").iter().any(|k| k["kind"].is_null()))
                .map(|d| names[d["pkg"].as_str().expect("pkg")].clone())
                .collect();
            deps.entry(name).or_insert_with(BTreeSet::new).extend(normal);
        }
        Workspace { members, deps }
    }

    /// Every package `name` links, directly or not.
    fn closure(&self, name: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![name.to_string()];
        while let Some(n) = todo.pop() {
            for d in self.deps.get(&n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    }

    /// Workspace members `name` depends on directly.
    fn member_deps(&self, name: &str) -> BTreeSet<String> {
        self.deps[name].iter().filter(|d| self.members.contains_key(*d)).cloned().collect()
    }

    /// The top-level folder a member lives in (`llb`, `frontends`, `solver`, `cli`).
    fn side(&self, name: &str) -> String {
        self.members[name]
            .components()
            .next()
            .expect("a folder")
            .as_os_str()
            .to_string_lossy()
            .into_owned()
    }
}

fn host_triple() -> String {
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("-vV")
        .output()
        .expect("rustc runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

/// Every workspace crate and the workspace crates it may depend on directly.
/// A crate missing here fails the test: a new crate's place is decided here.
const ALLOWED: &[(&str, &[&str])] = &[
    ("kiln-llb", &[]),
    ("kiln-image", &["kiln-llb"]),
    ("kiln-patterns", &[]),
    ("kiln-test-support", &[]),
    ("kiln-frontend", &["kiln-llb", "kiln-image"]),
    ("kiln-dockerfile", &["kiln-llb", "kiln-image", "kiln-frontend", "kiln-patterns"]),
    ("kiln-recipe", &["kiln-llb", "kiln-image", "kiln-frontend", "kiln-dockerfile"]),
    ("kiln-frontend-stdio", &["kiln-llb", "kiln-image", "kiln-frontend"]),
    ("kiln-frontend-dockerfile", &["kiln-frontend-stdio", "kiln-dockerfile"]),
    ("kiln-frontend-recipe", &["kiln-frontend-stdio", "kiln-recipe"]),
    ("kiln-frontend-wasm", &["kiln-image", "kiln-frontend", "kiln-frontend-stdio"]),
    ("kiln-plugin-host", &["kiln-frontend", "kiln-frontend-stdio", "kiln-frontend-wasm"]),
    ("kiln-guest", &["kiln-llb", "kiln-image", "kiln-frontend", "kiln-frontend-stdio"]),
    ("kiln-frontend-steps", &["kiln-guest"]),
    ("kiln-oci", &["kiln-image"]),
    ("kiln-solver-protocol", &[]),
    (
        "kiln-solver",
        &["kiln-llb", "kiln-image", "kiln-patterns", "kiln-oci", "kiln-solver-protocol"],
    ),
];

/// Crates that do no IO: they may not link these, even indirectly.
const PURE: &[&str] = &[
    "kiln-llb",
    "kiln-image",
    "kiln-patterns",
    "kiln-frontend",
    "kiln-dockerfile",
    "kiln-recipe",
    "kiln-frontend-stdio",
    "kiln-frontend-dockerfile",
    "kiln-frontend-recipe",
    "kiln-guest",
    "kiln-frontend-steps",
];
const IO_CRATES: &[&str] = &["tokio", "mio", "reqwest", "oci-client", "walkdir", "wasmtime", "rustix", "tar"];

#[test]
fn folders_are_named_after_their_crates() {
    let ws = Workspace::load();
    for (name, dir) in &ws.members {
        let folder = dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        assert_eq!(
            Some(folder.as_str()),
            name.strip_prefix("kiln-"),
            "crate {name} lives in {}: its folder should be named {}",
            dir.display(),
            name.trim_start_matches("kiln-")
        );
    }
}

#[test]
fn workspace_edges_are_the_allowed_ones() {
    let ws = Workspace::load();
    let allowed: BTreeMap<&str, BTreeSet<String>> = ALLOWED
        .iter()
        .map(|(k, v)| (*k, v.iter().map(|s| s.to_string()).collect()))
        .collect();
    for name in ws.members.keys() {
        if name == "kiln-cli" {
            continue; // the glue: links both sides
        }
        let Some(ok) = allowed.get(name.as_str()) else {
            panic!("crate {name} is not in ALLOWED: decide which crates it may use");
        };
        let extra: Vec<_> = ws.member_deps(name).difference(ok).cloned().collect();
        assert!(
            extra.is_empty(),
            "{name} depends on {extra:?}, which its row in ALLOWED does not allow"
        );
    }
    for (name, _) in ALLOWED {
        assert!(
            ws.members.contains_key(*name),
            "ALLOWED names {name}, which is not a workspace crate"
        );
    }
}

#[test]
fn solver_and_frontends_never_reach_each_other() {
    let ws = Workspace::load();
    for name in ws.members.keys() {
        let side = ws.side(name);
        let reached: Vec<_> = ws.closure(name).into_iter().filter(|d| ws.members.contains_key(d)).collect();
        for d in &reached {
            let other = ws.side(d);
            assert!(d != "kiln-cli", "{name} links the CLI");
            match side.as_str() {
                "llb" => assert_eq!(other, "llb", "{name} (bottom) links {d}"),
                "solver" => assert!(other != "frontends", "{name} (solver side) links the frontend crate {d}"),
                "frontends" => assert!(other != "solver", "{name} (frontend side) links the solver crate {d}"),
                _ => {}
            }
        }
    }
    assert!(
        ws.closure("kiln-llb").iter().all(|d| !ws.members.contains_key(d)),
        "llb depends on no workspace crate"
    );
}

#[test]
fn pure_crates_link_no_io_crates() {
    let ws = Workspace::load();
    for name in PURE {
        let closure = ws.closure(name);
        for io in IO_CRATES {
            assert!(!closure.contains(*io), "{name} must do no IO but links {io}");
        }
    }
}

#[test]
fn the_cli_links_no_wasm_runtime() {
    // Plugins run in kiln-plugin-host: every other build starts without
    // wasmtime's code and relocations (~90 fewer page faults per start).
    let cli = Workspace::load().closure("kiln-cli");
    for banned in ["wasmtime", "kiln-frontend-wasm", "cranelift-codegen"] {
        assert!(!cli.contains(banned), "the kiln binary links {banned}");
    }
}

#[test]
fn a_plugin_gets_only_what_it_needs() {
    let ws = Workspace::load();
    let guest = ws.closure("kiln-guest");
    for banned in ["kiln-dockerfile", "kiln-recipe", "wasmtime", "tokio", "pest", "regex"] {
        assert!(!guest.contains(banned), "a plugin linking kiln-guest would get {banned}");
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
