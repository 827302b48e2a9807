//! `--cache-to`/`--cache-from` with `type=local`: a cache exported by one
//! state root lets a fresh one run nothing (proved by random bytes), in
//! BuildKit's format (BuildKit's own export imports cleanly); a tampered
//! blob is a miss, never content.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{busybox_layout, can_build, scratch_dir, Scratch};
use serde_json::Value;

struct Setup {
    dir: Scratch,
}

const DOCKERFILE: &str = "FROM busybox AS build
RUN head -c 16 /dev/urandom | od -An -tx1 > /nonce
RUN echo second > /second

FROM busybox
COPY --from=build /nonce /second /
RUN cat /nonce > /copy && head -c 8 /dev/urandom | od -An -tx1 > /nonce2
";

impl Setup {
    fn new(name: &str) -> Option<Setup> {
        if !can_build() {
            return None;
        }
        let dir = scratch_dir(name);
        std::fs::create_dir_all(dir.join("ctx")).expect("ctx");
        std::fs::write(dir.join("ctx/Dockerfile"), DOCKERFILE).expect("Dockerfile");
        busybox_layout(&dir.join("base"));
        Some(Setup { dir })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// `kiln build` of `ctx` on the state root `root`, the result in `out/`.
    fn command(&self, root: &str, out: &str, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("build")
            .arg("--build-context")
            .arg(format!("busybox=oci-layout://{}", self.path("base").display()))
            .args(["--progress", "plain", "--output"])
            .arg(format!("type=local,dest={}", self.path(out).display()))
            .args(args)
            .arg(self.path("ctx"))
            .env("KILN_ROOT", self.path(root))
            .env("KILN_GC", "off");
        c
    }

    fn build(&self, root: &str, out: &str, args: &[&str]) -> Output {
        let out = self.command(root, out, args).output().expect("kiln runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out
    }
}

/// "N steps ran, M cached" of the summary line.
fn counts(out: &Output) -> (u32, u32) {
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.starts_with("done: ")).unwrap_or_else(|| panic!("{err}"));
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .map(|n| n.parse().expect("number"))
        .collect();
    (nums[0], nums[1])
}

fn read(p: PathBuf) -> String {
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The cache config of a `type=local` cache directory.
fn cache_config(dir: &Path) -> Value {
    let blob = |d: &str| dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let index: Value = serde_json::from_str(&read(dir.join("index.json"))).expect("index");
    assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "latest");
    let manifest: Value = serde_json::from_str(&read(blob(index["manifests"][0]["digest"].as_str().unwrap()))).expect("manifest");
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.buildkit.cacheconfig.v0");
    for layer in manifest["layers"].as_array().unwrap() {
        assert!(layer["annotations"]["containerd.io/uncompressed"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")));
        assert!(blob(layer["digest"].as_str().unwrap()).is_file());
    }
    serde_json::from_str(&read(blob(manifest["config"]["digest"].as_str().unwrap()))).expect("config")
}

#[test]
fn a_fresh_root_with_the_exported_cache_runs_nothing() {
    let Some(s) = Setup::new("cache-local") else { return };
    let max = format!("type=local,dest={},mode=max", s.path("max").display());
    let min = format!("type=local,dest={}", s.path("min").display());
    let first = s.build("root1", "out1", &["--cache-to", &max, "--cache-to", &min]);
    assert_eq!(counts(&first).0, 5, "everything ran once");
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(
        err.contains(&format!("exporting cache type=local,dest={}: ", s.path("max").display())),
        "{err}"
    );

    // BuildKit's format: every step's record with mode=max, fewer with min.
    let max_records = cache_config(&s.path("max"))["records"].as_array().unwrap().len();
    let min_records = cache_config(&s.path("min"))["records"].as_array().unwrap().len();
    assert!(min_records < max_records, "min {min_records}, max {max_records}");
    // mode=min holds the result's steps only, found by their definition
    // keys: a fresh root runs nothing, and the build stage it copies from
    // is neither run nor fetched (BuildKit's mode=min on a multi-stage build).
    let from_min = format!("type=local,src={}", s.path("min").display());
    let min_build = s.build("root4", "out7", &["--cache-from", &from_min]);
    let err = String::from_utf8_lossy(&min_build.stderr);
    assert_eq!(counts(&min_build), (0, 3), "{err}");
    assert!(
        !err.contains("RUN head -c 16") && !err.contains("RUN echo second"),
        "the build stage's steps are not needed: {err}"
    );
    for f in ["nonce", "nonce2", "copy", "second"] {
        assert_eq!(read(s.path("out1").join(f)), read(s.path("out7").join(f)), "{f}");
    }

    let from = format!("type=local,src={}", s.path("max").display());
    let again = s.build("root2", "out2", &["--cache-from", &from]);
    assert_eq!(counts(&again), (0, 5), "{}", String::from_utf8_lossy(&again.stderr));
    for f in ["nonce", "nonce2", "copy", "second"] {
        assert_eq!(
            read(s.path("out1").join(f)),
            read(s.path("out2").join(f)),
            "{f}: the same bytes, not a re-run"
        );
    }
    // The results became the new root's own records. The build stage's
    // layers were never fetched: the copy was found by its definition key,
    // so nothing read them. Without the cache they are not there, and
    // neither needed nor shown (BuildKit's lazy cache results).
    let third = s.build("root2", "out3", &[]);
    assert_eq!(counts(&third), (0, 3), "{}", String::from_utf8_lossy(&third.stderr));
    assert_eq!(read(s.path("out1/nonce2")), read(s.path("out3/nonce2")));
    let cache_layers = layer_blobs(&s.path("max"));
    let fetched: Vec<&String> = cache_layers
        .iter()
        .filter(|d| s.path("root2/store/blobs/sha256").join(d.trim_start_matches("sha256:")).is_file())
        .collect();
    assert_eq!(cache_layers.len(), 5, "base, two build-stage steps, the copy, the last step");
    assert_eq!(fetched.len(), 3, "only the result's layers were fetched: {fetched:?}");
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("5 layers ("), "the import says what it lists: {said}");
    assert!(said.contains("cache layers fetched: 3 ("), "and what was fetched: {said}");

    // Two builds exporting to one directory at once leave a valid cache.
    let both = format!("type=local,dest={},mode=max", s.path("shared").display());
    let a = s.command("root2", "out4", &["--cache-to", &both]).spawn().expect("spawn");
    let b = s.command("root1", "out5", &["--cache-to", &both]).spawn().expect("spawn");
    for child in [a, b] {
        assert!(child.wait_with_output().expect("wait").status.success());
    }
    let from_shared = format!("type=local,src={}", s.path("shared").display());
    let fourth = s.build("root3", "out6", &["--cache-from", &from_shared]);
    // root2 knows only the result's steps (it never fetched the build
    // stage): whichever export came last, nothing runs.
    assert_eq!(counts(&fourth).0, 0);
    assert_eq!(read(s.path("out1/nonce2")), read(s.path("out6/nonce2")));
}

/// The layer blobs a `type=local` cache lists.
fn layer_blobs(dir: &Path) -> Vec<String> {
    cache_config(dir)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["blob"].as_str().unwrap().to_string())
        .collect()
}

/// Snapshots of `root` that hold a blob and no files yet.
fn blob_only_layers(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root.join("snapshots"))
        .expect("snapshots")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("layer.json").is_file() && !p.join("fs").exists())
        .collect()
}

#[test]
fn a_hit_no_step_reads_is_not_unpacked_until_something_mounts_it() {
    let Some(s) = Setup::new("cache-lazy") else { return };
    std::fs::write(
        s.path("ctx/Dockerfile"),
        "FROM busybox\nRUN head -c 16 /dev/urandom | od -An -tx1 > /a\nRUN echo b > /b\n",
    )
    .expect("Dockerfile");
    let max = format!("type=local,dest={},mode=max", s.path("cache").display());
    assert_eq!(counts(&s.build("root1", "out1", &["--cache-to", &max])).0, 3);
    // Into kiln's store (blobs only): every step hits (the base's source
    // step too), nothing is unpacked.
    let from = format!("type=local,src={}", s.path("cache").display());
    let stored = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("build")
        .arg("--build-context")
        .arg(format!("busybox=oci-layout://{}", s.path("base").display()))
        .args(["--progress", "plain", "-t", "lazy:1", "--cache-from", &from])
        .arg(s.path("ctx"))
        .env("KILN_ROOT", s.path("root2"))
        .env("KILN_GC", "off")
        .output()
        .expect("kiln runs");
    assert_eq!(counts(&stored), (0, 3), "{}", String::from_utf8_lossy(&stored.stderr));
    let lazy = blob_only_layers(&s.path("root2"));
    assert_eq!(lazy.len(), 3, "the base's and the two RUN layers are blobs: {lazy:?}");
    // A build that mounts them (the local exporter) unpacks them, diff ids checked.
    let out = s.build("root2", "out2", &[]);
    assert_eq!(counts(&out), (0, 3));
    assert_eq!(read(s.path("out1/a")), read(s.path("out2/a")));
    assert!(lazy.iter().all(|p| p.join("fs").is_dir()), "unpacked when mounted");
    assert!(blob_only_layers(&s.path("root2")).is_empty());
}

#[test]
fn a_tampered_blob_is_a_miss_and_the_step_runs() {
    let Some(s) = Setup::new("cache-tampered") else { return };
    let to = format!("type=local,dest={},mode=max", s.path("cache").display());
    s.build("root1", "out1", &["--cache-to", &to]);
    // Replace the blob of the last step's layer (the one with /nonce2).
    let config = cache_config(&s.path("cache"));
    let last = config["layers"].as_array().unwrap().iter().find(|l| {
        let blob = s
            .path("cache/blobs/sha256")
            .join(l["blob"].as_str().unwrap().trim_start_matches("sha256:"));
        let listing = Command::new("tar").arg("tzf").arg(&blob).output().expect("tar");
        String::from_utf8_lossy(&listing.stdout).lines().any(|n| n == "nonce2")
    });
    let blob = last.expect("a layer holding nonce2")["blob"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let path = s.path("cache/blobs/sha256").join(&blob);
    std::fs::write(&path, b"not the layer").expect("tamper");

    let from = format!("type=local,src={}", s.path("cache").display());
    let out = s.build("root2", "out2", &["--cache-from", &from]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(counts(&out), (1, 4), "only the step whose blob is bad ran: {err}");
    assert!(err.contains("cache import:") && err.contains("running the step instead"), "{err}");
    assert_eq!(
        read(s.path("out1/copy")),
        read(s.path("out2/copy")),
        "what came from the cache is intact"
    );
    assert!(read(s.path("out2/nonce2")).trim().len() > 8, "the step really ran");
}

#[test]
fn buildkits_exported_cache_imports_cleanly() {
    let Some(cache) = kiln_test_support::shared("buildkit_cache", "conformance/buildkit-cache/local-mode-max") else {
        return;
    };
    let Some(s) = Setup::new("cache-buildkit") else { return };
    // The corpus case BuildKit exported that cache for, built against it.
    let case = kiln_test_support::shared_dir().join("conformance/images/28-multistage-from");
    let ctx = s.path("case");
    assert!(Command::new("cp").arg("-r").arg(&case).arg(&ctx).status().expect("cp").success());
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("build")
        .arg("--build-context")
        .arg(format!("127.0.0.1:5000/busybox:latest=oci-layout://{}", s.path("base").display()))
        .args(["--progress", "plain", "--cache-from"])
        .arg(format!("type=local,src={}", cache.display()))
        .arg("--output")
        .arg(format!("type=local,dest={}", s.path("out").display()))
        .arg(&ctx)
        .env("KILN_ROOT", s.path("root"))
        .env("KILN_GC", "off")
        .output()
        .expect("kiln");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("importing cache from") && l.contains("local-mode-max: 21 records")),
        "it was read, all of its records: {err}"
    );
    assert!(!err.contains("warning") && !err.contains("cache import:"), "nothing refused: {err}");
    let (ran, _) = counts(&out);
    assert!(ran > 0, "BuildKit's records never match kiln's keys: the steps ran");
    assert_eq!(read(s.path("out/by-index")), "first\n");
    assert_eq!(read(s.path("out/derived/d")), "derived\n");
}

#[test]
fn a_registry_cache_serves_a_fresh_root() {
    let Some(s) = Setup::new("cache-registry") else { return };
    if !common::have("docker-registry") || !common::have("skopeo") {
        return;
    }
    let registry = common::LocalRegistry::start(&s.path("registry"));
    let reference = format!("{}/team/app-cache:main", registry.addr);
    let to = format!("type=registry,ref={reference},mode=max");
    let first = s.build("root1", "out1", &["--cache-to", &to]);
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(
        err.contains("exporting cache type=registry") && err.contains("blobs uploaded"),
        "{err}"
    );

    // What the registry holds is BuildKit's image-manifest form of a cache.
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo");
    assert!(raw.status.success(), "{}", String::from_utf8_lossy(&raw.stderr));
    let manifest: Value = serde_json::from_slice(&raw.stdout).expect("manifest");
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.buildkit.cacheconfig.v0");
    assert!(manifest["layers"].as_array().is_some_and(|l| !l.is_empty()));

    // A fresh root, the shorthand `--cache-from REF`: nothing runs.
    let image = format!("{}/team/app:1", registry.addr);
    let again = s.build("root2", "out2", &["--cache-from", &reference, "-t", &image, "--push"]);
    assert_eq!(counts(&again), (0, 5), "{}", String::from_utf8_lossy(&again.stderr));
    for f in ["nonce", "nonce2", "copy"] {
        assert_eq!(read(s.path("out1").join(f)), read(s.path("out2").join(f)), "{f}");
    }
    // Downloaded: the result's layers only, not the build stage's.
    let listed: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    let fetched = listed
        .iter()
        .filter(|d| s.path("root2/store/blobs/sha256").join(d.trim_start_matches("sha256:")).is_file())
        .count();
    assert_eq!((listed.len(), fetched), (5, 3), "{listed:?}");
    // Pushing the result to another repository mounts the layers the cache
    // repository has: only the image's config is uploaded.
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains(&format!("pushing {image}: 1 uploaded, 0 already there, 3 mounted")),
        "{err}"
    );
    // A second export sends no layer the repository has (at most a new
    // config: the records' times are this root's).
    let second = s.build("root2", "out3", &["--cache-to", &to]);
    let err = String::from_utf8_lossy(&second.stderr);
    let uploaded: u32 = err
        .split(" blobs uploaded")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(uploaded <= 1, "{err}");
    // A reference with no cache behind it is a warning; the build runs.
    let missing = format!("{}/team/none:main", registry.addr);
    let cold = s.build("root3", "out4", &["--cache-from", &missing]);
    let err = String::from_utf8_lossy(&cold.stderr);
    assert!(
        err.contains("warning: importing cache from") && err.contains("building without it"),
        "{err}"
    );
    assert_eq!(counts(&cold).0, 5);
}

#[test]
fn cache_mounts_travel_with_cache_mounts_true() {
    let Some(s) = Setup::new("cache-mounts") else { return };
    // The step keeps a random "download" in its cache mount; the build arg
    // makes it re-run on the fresh root, where it finds the mount's contents.
    std::fs::write(
        s.path("ctx/Dockerfile"),
        "FROM busybox\nARG V\nRUN --mount=type=cache,id=pkgs,target=/var/cache/pkgs \
         echo $V && (test -f /var/cache/pkgs/blob || head -c 16 /dev/urandom | od -An -tx1 > /var/cache/pkgs/blob) \
         && cp /var/cache/pkgs/blob /seen\n",
    )
    .expect("Dockerfile");
    let with = format!("type=local,dest={},mode=max,cache-mounts=true", s.path("with").display());
    let without = format!("type=local,dest={},mode=max", s.path("without").display());
    s.build(
        "root1",
        "out1",
        &["--build-arg", "V=1", "--cache-to", &with, "--cache-to", &without],
    );
    let first = read(s.path("out1/seen"));

    let from = format!("type=local,src={}", s.path("with").display());
    let out = s.build("root2", "out2", &["--build-arg", "V=2", "--cache-from", &from]);
    assert_eq!(counts(&out).0, 1, "the step re-ran: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        read(s.path("out2/seen")),
        first,
        "the fresh root's cache mount held the first build's contents"
    );

    // Without cache-mounts=true the mount starts empty on a fresh root.
    let from = format!("type=local,src={}", s.path("without").display());
    s.build("root3", "out3", &["--build-arg", "V=2", "--cache-from", &from]);
    assert_ne!(read(s.path("out3/seen")), first);
}

#[test]
fn an_image_pushed_with_an_inline_cache_is_its_own_cache() {
    let Some(s) = Setup::new("cache-inline") else { return };
    if !common::have("docker-registry") || !common::have("skopeo") {
        return;
    }
    let registry = common::LocalRegistry::start(&s.path("registry"));
    std::fs::write(
        s.path("ctx/Dockerfile"),
        "FROM busybox\nRUN head -c 16 /dev/urandom | od -An -tx1 > /nonce\nRUN cat /nonce > /copy && echo more > /more\n",
    )
    .expect("Dockerfile");
    let name = format!("{}/team/app:1", registry.addr);
    s.build("root1", "out1", &["-t", &name, "--push", "--cache-to", "type=inline"]);

    // The pushed image's config carries BuildKit's inline cache field.
    let config = Command::new("skopeo")
        .args(["inspect", "--config", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{name}"))
        .output()
        .expect("skopeo");
    assert!(config.status.success(), "{}", String::from_utf8_lossy(&config.stderr));
    let config: Value = serde_json::from_slice(&config.stdout).expect("config");
    assert!(config["moby.buildkit.cache.v0"].as_str().is_some_and(|c| !c.is_empty()), "{config}");

    let again = s.build("root2", "out2", &["--cache-from", &name]);
    assert_eq!(counts(&again), (0, 3), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(read(s.path("out1/nonce")), read(s.path("out2/nonce")));
}
