//! WASM frontend plugins end to end: the plugins are built from source for
//! wasm32-wasip1 (`frontends/build-wasm.sh`), selected only by `# syntax=`
//! (a file, the plugin directory, an OCI layout, a registry), and compared
//! with the built-in Dockerfile and recipe frontends and the native `steps` binary.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{busybox_layout, can_build, have, scratch_dir, wasm_plugins, write_wasm_artifact, LocalRegistry};
use kiln_frontend::{OfflineHost, Platform, Request};
use prost::Message;

/// `kiln ARGS` in `dir` with a private root, an empty plugin path, and `extra_path` first on PATH.
fn kiln_env(args: &[&str], dir: &Path, env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args)
        .current_dir(dir)
        .env("KILN_ROOT", dir.join("root"))
        .env("KILN_GC", "off")
        .env("HOME", dir)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("KILN_FRONTEND_PATH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("kiln runs")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "kiln failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every Dockerfile of the conformance corpora (parser cases and real-world files).
fn corpus_dockerfiles() -> Vec<PathBuf> {
    let shared = common::shared_dir();
    let mut out = Vec::new();
    let mut stack = vec![
        shared.join("conformance/real-world"),
        shared.join("conformance/buildkit-parser/testfiles"),
    ];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_dir() {
                stack.push(p);
            } else if name == "Dockerfile"
                || (p.starts_with(shared.join("conformance/real-world")) && !matches!(name, "README.md" | "SOURCE"))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.len() <= 250 {
        kiln_test_support::skip(
            "dockerfile.wasm corpus",
            &format!("the conformance corpus under {} has {} files", shared.display(), out.len()),
        );
    }
    out
}

#[test]
fn the_dockerfile_frontend_compiled_to_wasm_gives_the_built_in_llb_for_every_corpus_file() {
    let wasm = std::fs::read(wasm_plugins().join("dockerfile.wasm")).expect("dockerfile.wasm");
    let cache = scratch_dir("wasm-corpus");
    let host = kiln_frontend_wasm::PluginHost::new(Some(cache.to_path_buf())).expect("engine");
    let plugin = host.load("dockerfile.wasm", &wasm).expect("compiles");
    let files = corpus_dockerfiles();
    let mut compared = 0;
    for file in &files {
        let request = Request {
            definition: std::fs::read(file).expect("read"),
            filename: "Dockerfile".into(),
            build_platform: Platform::linux_amd64(),
            multi_platform: false,
            ..Default::default()
        };
        let native = kiln_dockerfile::compile(&request, &OfflineHost);
        let plugged = plugin
            .run(&request, &OfflineHost, None, kiln_frontend_wasm::Limits::default(), |_| {})
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!(
            native.definition.as_ref().map(|d| d.encode_to_vec()),
            plugged.definition.as_ref().map(|d| d.encode_to_vec()),
            "{}: the LLB differs",
            file.display()
        );
        assert_eq!(
            serde_json::to_string(&native.image_config).expect("json"),
            serde_json::to_string(&plugged.image_config).expect("json"),
            "{}: the image config differs",
            file.display()
        );
        assert_eq!(
            serde_json::to_string(&native.diagnostics).expect("json"),
            serde_json::to_string(&plugged.diagnostics).expect("json"),
            "{}: the diagnostics differ",
            file.display()
        );
        compared += usize::from(native.definition.is_some());
    }
    eprintln!("{} files, {compared} with LLB, identical through the plugin", files.len());
    let _ = std::fs::remove_dir_all(cache);
}

const STEPS: &str = "base busybox\nworkdir /app\ncopy site /app/site\nrun echo built by $(basename $0) > /app/built\ncmd cat /app/built\n";
const DOCKERFILE: &str =
    "FROM busybox\nWORKDIR /app\nCOPY site /app/site\nRUN echo built by $(basename $0) > /app/built\nCMD [\"cat\", \"/app/built\"]\n";

const RECIPE: &str = "stages:\n  main:\n    from: busybox\n    steps:\n      - workdir: /app\n      - copy: site\n        to: /app/site\n      - run: echo built by $(basename $0) > /app/built\n    image:\n      cmd: [cat, /app/built]\n";

/// The op digests of a `dump-llb` JSON dump, in order.
fn digests(dump: &str) -> Vec<String> {
    dump.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json line")["Digest"]
                .as_str()
                .expect("digest")
                .to_string()
        })
        .collect()
}

/// A context with both definitions, a plugin folder, an OCI layout holding
/// the steps plugin, and a bin folder with the native `kiln-frontend-steps`.
struct Lab {
    dir: common::Scratch,
}

impl Lab {
    fn new(name: &str) -> Lab {
        let dir = scratch_dir(name);
        let plugins = wasm_plugins();
        std::fs::create_dir_all(dir.join("ctx/site")).expect("ctx");
        std::fs::write(dir.join("ctx/site/index.html"), "<h1>kiln</h1>\n").expect("site");
        for p in ["steps.wasm", "dockerfile.wasm"] {
            std::fs::copy(plugins.join(p), dir.join("ctx").join(p)).expect("copy plugin");
        }
        std::fs::create_dir_all(dir.join("plugin-dir")).expect("plugin dir");
        std::fs::copy(plugins.join("steps.wasm"), dir.join("plugin-dir/steps.wasm")).expect("copy plugin");
        let wasm = std::fs::read(plugins.join("steps.wasm")).expect("steps.wasm");
        write_wasm_artifact(&dir.join("artifact"), "v1", &wasm);
        std::fs::create_dir_all(dir.join("bin")).expect("bin");
        let native = Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name("kiln-frontend-steps");
        assert!(native.is_file(), "{} is built by `cargo test --workspace`", native.display());
        std::os::unix::fs::symlink(&native, dir.join("bin/kiln-frontend-steps")).expect("symlink");
        Lab { dir }
    }

    /// Writes the definition for `syntax` and returns its file name.
    fn definition(&self, name: &str, syntax: &str, body: &str) -> String {
        std::fs::write(self.dir.join("ctx").join(name), format!("# syntax={syntax}\n{body}")).expect("definition");
        name.to_string()
    }

    fn kiln(&self, args: &[&str]) -> Output {
        let path = format!("{}:{}", self.dir.join("bin").display(), std::env::var("PATH").unwrap_or_default());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(args)
            .current_dir(&self.dir)
            .env("KILN_ROOT", self.dir.join("root"))
            .env("KILN_GC", "off")
            .env("HOME", &self.dir)
            .env("PATH", path)
            .env_remove("XDG_CONFIG_HOME")
            .env("KILN_FRONTEND_PATH", self.dir.join("plugin-dir"));
        cmd.output().expect("kiln runs")
    }

    fn dump(&self, file: &str) -> String {
        let f = format!("ctx/{file}");
        ok(&self.kiln(&["dump-llb", "--no-resolve", "-f", &f, "ctx"]))
    }

    /// The definitions selecting the steps plugin in every way, by file name.
    fn steps_selectors(&self, registry: Option<&str>) -> Vec<(String, String)> {
        let mut all = vec![
            ("native on PATH", self.definition("Stepfile.native", "steps", STEPS)),
            ("wasm file", self.definition("Stepfile.file", "./steps.wasm", STEPS)),
            (
                "oci layout",
                self.definition(
                    "Stepfile.layout",
                    &format!("oci-layout://{}:v1", self.dir.join("artifact").display()),
                    STEPS,
                ),
            ),
        ];
        // The same name finds the plugin directory before PATH.
        all.push(("plugin dir", self.definition("Stepfile.dir", "steps", STEPS)));
        if let Some(r) = registry {
            all.push(("registry", self.definition("Stepfile.registry", r, STEPS)));
        }
        all.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

#[test]
fn dump_llb_works_with_every_frontend_and_a_plugin_gives_the_same_llb_however_it_is_found() {
    let lab = Lab::new("plugins-dump");
    let builtin = lab.dump(&lab.definition("Dockerfile.builtin", "dockerfile", DOCKERFILE));
    let wasm_df = lab.dump(&lab.definition("Dockerfile.wasm", "./dockerfile.wasm", DOCKERFILE));
    assert_eq!(builtin.replace("Dockerfile.builtin", "X"), wasm_df.replace("Dockerfile.wasm", "X"));
    // The recipe saying the same thing has the same ops.
    let recipe = lab.dump(&lab.definition("recipe.yaml", "recipe", RECIPE));
    assert_eq!(digests(&recipe), digests(&builtin));
    let mut dumps = Vec::new();
    for (how, file) in lab.steps_selectors(None) {
        if how == "native on PATH" {
            // Without the plugin directory, `steps` is the native program.
            let f = format!("ctx/{file}");
            let out = kiln_env(
                &["dump-llb", "--no-resolve", "-f", &f, "ctx"],
                &lab.dir,
                &[("PATH", &PathBuf::from(format!("{}:/usr/bin:/bin", lab.dir.join("bin").display())))],
            );
            dumps.push((how, ok(&out)));
        } else {
            dumps.push((how, lab.dump(&file)));
        }
    }
    for (how, dump) in &dumps {
        assert_eq!(dump, &dumps[0].1, "{how} gives other LLB than {}", dumps[0].0);
        assert!(dump.contains("/app/site"), "{dump}");
    }
    // JSON, DOT and protobuf all work through a plugin.
    let dot = ok(&lab.kiln(&["dump-llb", "--no-resolve", "--format", "dot", "-f", "ctx/Stepfile.file", "ctx"]));
    assert!(dot.starts_with("digraph"), "{dot}");
}

#[test]
fn every_frontend_builds_the_same_files() {
    if !can_build() || !have("docker-registry") {
        return;
    }
    let lab = Lab::new("plugins-build");
    busybox_layout(&lab.dir.join("base"));
    let base = format!("busybox=oci-layout://{}", lab.dir.join("base").display());
    let registry = LocalRegistry::start(&lab.dir.join("registry"));
    let reference = format!("{}/kiln/steps-frontend:v1", registry.addr);
    push_artifact(&lab.dir.join("artifact"), &reference);

    let mut builds = vec![
        (
            "built-in Dockerfile".to_string(),
            lab.definition("Dockerfile.builtin", "dockerfile", DOCKERFILE),
        ),
        (
            "Dockerfile as wasm".to_string(),
            lab.definition("Dockerfile.wasm", "./dockerfile.wasm", DOCKERFILE),
        ),
    ];
    builds.extend(lab.steps_selectors(Some(&reference)));
    let mut results = Vec::new();
    for (how, file) in &builds {
        let out_dir = lab.dir.join(format!("out-{file}"));
        let f = format!("ctx/{file}");
        let o = format!("type=local,dest={}", out_dir.display());
        let out = lab.kiln(&["build", "--progress", "plain", "--build-context", &base, "-f", &f, "-o", &o, "ctx"]);
        assert!(out.status.success(), "{how}: {}", String::from_utf8_lossy(&out.stderr));
        let built = std::fs::read_to_string(out_dir.join("app/built")).unwrap_or_else(|e| panic!("{how}: app/built: {e}"));
        let site = std::fs::read_to_string(out_dir.join("app/site/index.html")).unwrap_or_else(|e| panic!("{how}: site: {e}"));
        results.push((how.clone(), built, site));
    }
    for (how, built, site) in &results {
        assert_eq!(built, "built by sh\n", "{how}");
        assert_eq!(site, "<h1>kiln</h1>\n", "{how}");
    }
    // The registry plugin is cached: with the registry gone, the same build still compiles.
    drop(registry);
    let out = lab.kiln(&["dump-llb", "--no-resolve", "-f", "ctx/Stepfile.registry", "ctx"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Pushes the artifact layout's manifest and blobs to `reference` with kiln's registry client.
fn push_artifact(layout: &Path, reference: &str) {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index")).expect("json");
    let digest = index["manifests"][0]["digest"].as_str().expect("digest").to_string();
    let blob = |d: &str| layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let manifest = std::fs::read(blob(&digest)).expect("manifest");
    let doc: serde_json::Value = serde_json::from_slice(&manifest).expect("json");
    let mut blobs = Vec::new();
    for d in std::iter::once(&doc["config"]).chain(doc["layers"].as_array().expect("layers")) {
        let digest = d["digest"].as_str().expect("digest").to_string();
        blobs.push(kiln_oci::PushBlob {
            path: blob(&digest),
            size: d["size"].as_u64().expect("size"),
            digest,
            source: None,
        });
    }
    let client = kiln_oci::RegistryClient::new(kiln_oci::Credentials::default());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime
        .block_on(client.push(reference, &blobs, &manifest, "application/vnd.oci.image.manifest.v1+json"))
        .expect("push");
}

#[test]
fn plugin_errors_are_shown_like_kilns_own() {
    let lab = Lab::new("plugins-errors");
    // A diagnostic from inside the plugin: rendered by miette at its line and column.
    let file = lab.definition("Stepfile.bad", "./steps.wasm", "base scratch\nwrokdir /app\n");
    let out = lab.kiln(&["dump-llb", "--no-resolve", "-f", &format!("ctx/{file}"), "ctx"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kiln::steps::unknown_verb"), "{err}");
    assert!(err.contains("Stepfile.bad:3:1"), "{err}");
    assert!(err.contains("did you mean `workdir`?"), "{err}");

    // A recipe error: rendered by miette at the YAML line and column, with the did-you-mean.
    let file = lab.definition(
        "recipe-bad.yaml",
        "recipe",
        "stages:\n  main:\n    from: busybox\n    steps:\n      - rnu: make\n",
    );
    let out = lab.kiln(&["dump-llb", "--no-resolve", "-f", &format!("ctx/{file}"), "ctx"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kiln::recipe::unknown_key"), "{err}");
    assert!(err.contains("recipe-bad.yaml:6:9"), "{err}");
    assert!(err.contains("did you mean `run`?"), "{err}");

    // An unresolvable directive lists what was tried.
    let file = lab.definition("Stepfile.none", "nosuchfrontend", "base scratch\n");
    let out = lab.kiln(&["dump-llb", "--no-resolve", "-f", &format!("ctx/{file}"), "ctx"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for tried in [
        "built-in frontends (dockerfile, docker/dockerfile:…, recipe)",
        "nosuchfrontend.wasm in the plugin directories",
        "kiln-frontend-nosuchfrontend on PATH",
    ] {
        assert!(err.contains(tried), "{tried}: {err}");
    }

    // A plugin that loops is stopped at the limit given on the command line.
    let looping = wat::parse_str("(module (memory (export \"memory\") 1) (func (export \"_start\") (loop (br 0))))").expect("wat");
    std::fs::write(lab.dir.join("ctx/loop.wasm"), looping).expect("write");
    let file = lab.definition("Stepfile.loop", "./loop.wasm", "base scratch\n");
    let start = std::time::Instant::now();
    let out = lab.kiln(&[
        "dump-llb",
        "--no-resolve",
        "--plugin-timeout",
        "0.5",
        "-f",
        &format!("ctx/{file}"),
        "ctx",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("loop.wasm was stopped after running for its time limit of 500ms"),
        "{err}"
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}
