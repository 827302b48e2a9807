//! Real distro workloads (`cli/tests/distro/`) on a Debian bookworm base
//! made by mmdebstrap from the host's apt mirror: apt with cache mounts,
//! file capabilities, xattrs, hard links, sparse and large files, a user,
//! pip and npm through the host's CA bundle, Go and Node stages at once.
//! The images are checked in their layers, in a child image kiln builds on
//! them, and under `docker run` after `--load`. All share one state root,
//! as a CI runner's builds share theirs (and its apt cache mounts).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::sync::{Arc, Mutex, Weak};

use common::{can_build, debian_layout, scratch_dir, umoci_unpack, Scratch};
use serde_json::Value;

/// The name the workloads' Dockerfiles give their base.
const BASE: &str = "127.0.0.1:5000/debian:bookworm";

/// What every workload test shares: the base layout and one state root.
struct Distro {
    layout: PathBuf,
    /// Shared while any workload test runs; removed after the last.
    root: Arc<Scratch>,
    dir: Scratch,
}

fn distro(test: &str) -> Option<Distro> {
    if !can_build() {
        return None;
    }
    let layout = debian_layout(test)?;
    static ROOT: Mutex<Weak<Scratch>> = Mutex::new(Weak::new());
    let root = {
        let mut shared = ROOT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        shared.upgrade().unwrap_or_else(|| {
            let root = Arc::new(scratch_dir("distro-root"));
            *shared = Arc::downgrade(&root);
            root
        })
    };
    let dir = scratch_dir(test);
    Some(Distro { layout, root, dir })
}

impl Distro {
    /// A copy of workload `case` with the host's CA bundle as `ca.crt`.
    fn context(&self, case: &str) -> PathBuf {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/distro").join(case);
        let dest = self.dir.join(case);
        let st = Command::new("cp").arg("-r").arg(&src).arg(&dest).status().expect("cp");
        assert!(st.success(), "copy {}", src.display());
        std::fs::copy("/etc/ssl/certs/ca-certificates.crt", dest.join("ca.crt")).expect("the host's CA bundle");
        dest
    }

    /// `kiln build` of `ctx` with rawjson progress; returns the output and
    /// the names of the steps that ran.
    fn build(&self, ctx: &Path, args: &[&str]) -> (Output, Vec<String>) {
        let base = format!("{BASE}=oci-layout://{}:bookworm", self.layout.display());
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_GC", "off")
            .env("KILN_ROOT", &*self.root)
            .args(["build", "--progress", "rawjson", "--build-context", &base])
            .args(args)
            .arg(ctx)
            .output()
            .expect("kiln runs");
        let ran = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["type"] == "vertex_started")
            .map(|e| e["name"].as_str().unwrap_or("").to_string())
            .filter(|n| !n.contains("load build context"))
            .collect();
        (out, ran)
    }
}

impl Distro {
    /// `ctx` built with `--load` as `tag` and run by `docker run`: its
    /// stdout, or `None` (skipped loudly; a failure on CI) without Docker.
    fn load_and_run(&self, test: &str, ctx: &Path, tag: &str) -> Option<String> {
        let Some(docker) = docker() else {
            kiln_test_support::skip(
                test,
                "no running Docker engine for `docker run` after --load (.ci/run starts dockerd)",
            );
            return None;
        };
        let (out, _) = self.build(ctx, &["-t", tag, "--load"]);
        ok(&out);
        Some(docker_run(&docker, tag))
    }
}

fn ok(out: &Output) {
    let logs: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| match serde_json::from_str::<Value>(l) {
            Err(_) => Some(format!("{l}\n")),
            Ok(e) => match e["type"].as_str() {
                Some("log") => e["data"].as_str().map(str::to_string),
                Some("error") | Some("vertex_failed") => Some(format!("{e}\n")),
                _ => None,
            },
        })
        .collect();
    let tail: String = logs.chars().rev().take(6000).collect::<Vec<_>>().into_iter().rev().collect();
    assert!(out.status.success(), "kiln build failed ({:?}):\n{tail}", out.status.code());
}

/// Every layer of image `name` in an OCI layout: path → (entry type, link
/// target, PAX records), last layer last.
type Layer = HashMap<String, Entry>;
/// One tar entry: its type, link target and PAX records.
type Entry = (tar::EntryType, Option<String>, HashMap<String, Vec<u8>>);

fn layers(layout: &Path, name: &str) -> Vec<Layer> {
    common::layout_layers(layout, name)
        .into_iter()
        .map(|mut ar| {
            let mut out = Layer::new();
            for e in ar.entries().expect("entries") {
                let mut e = e.expect("entry");
                let path = e.path().expect("path").to_string_lossy().trim_end_matches('/').to_string();
                let link = e.link_name().ok().flatten().map(|l| l.to_string_lossy().into_owned());
                let mut pax = HashMap::new();
                if let Ok(Some(exts)) = e.pax_extensions() {
                    for x in exts.flatten() {
                        if let Ok(k) = x.key() {
                            pax.insert(k.to_string(), x.value_bytes().to_vec());
                        }
                    }
                }
                let kind = e.header().entry_type();
                let mut sink = Vec::new();
                let _ = e.read_to_end(&mut sink);
                out.insert(path, (kind, link, pax));
            }
            out
        })
        .collect()
}

/// `getcap`'s form of a `security.capability` value holding only
/// cap_net_raw in the permitted set with the effective bit (VFS cap v2).
fn is_net_raw_ep(value: &[u8]) -> bool {
    // magic_etc (revision 2, effective flag), then permitted/inheritable words.
    value.len() >= 12
        && u32::from_le_bytes([value[0], value[1], value[2], value[3]]) == 0x0200_0001
        && u32::from_le_bytes([value[4], value[5], value[6], value[7]]) == 1 << 13
}

fn docker() -> Option<String> {
    let docker = std::env::var("DOCKER").unwrap_or_else(|_| "docker".into());
    let up = Command::new(&docker)
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    up.then_some(docker)
}

/// Runs image `tag` with `docker run` and returns its stdout.
fn docker_run(docker: &str, tag: &str) -> String {
    let run = common::docker_run(docker, &["--network", "none", tag]);
    assert!(run.status.success(), "docker run {tag}: {}", String::from_utf8_lossy(&run.stderr));
    let _ = Command::new(docker).args(["image", "rm", tag]).output();
    String::from_utf8_lossy(&run.stdout).into_owned()
}

#[test]
fn apt_with_cache_mounts_keeps_capabilities_xattrs_hard_links_and_big_files() {
    let test = "distro_system";
    let Some(d) = distro(test) else { return };
    let ctx = d.context("system");
    let tarball = d.dir.join("system.tar");
    let (out, _) = d.build(
        &ctx,
        &[
            "-t",
            "kiln-distro-system:test",
            "-o",
            &format!("type=oci,dest={}", tarball.display()),
        ],
    );
    ok(&out);
    let unpacked = d.dir.join("system-image");
    umoci_unpack(&tarball, "docker.io/library/kiln-distro-system:test", &unpacked);

    // In the layers, as BuildKit writes them: PAX SCHILY.xattr records, and
    // the hard link made to a file of an earlier layer inside its own layer.
    let layers = layers(&unpacked.with_extension("layout"), "docker.io/library/kiln-distro-system:test");
    let ping: Vec<&Entry> = layers.iter().filter_map(|l| l.get("usr/bin/ping")).collect();
    assert!(!ping.is_empty(), "ping is in a layer");
    for (kind, _, pax) in &ping {
        assert_eq!(*kind, tar::EntryType::Regular);
        let cap = pax.get("SCHILY.xattr.security.capability").expect("ping keeps its file capability");
        assert!(is_net_raw_ep(cap), "cap_net_raw=ep: {cap:?}");
    }
    let link_layer = layers
        .iter()
        .find(|l| l.contains_key("usr/local/bin/ping-link"))
        .expect("the hard link is in a layer");
    let (kind, target, pax) = &link_layer["usr/local/bin/ping-link"];
    assert_eq!(*kind, tar::EntryType::Link, "a hard link, not a copy");
    assert_eq!(target.as_deref(), Some("usr/bin/ping"));
    // As BuildKit's: the link repeats the capability, which Docker's unpack
    // needs (it chowns the link, and a chown clears the inode's capability).
    assert!(
        pax.get("SCHILY.xattr.security.capability").is_some_and(|c| is_net_raw_ep(c)),
        "the link's entry carries the capability"
    );
    assert!(link_layer.contains_key("usr/bin/ping"), "its target is in the same layer");
    let origin = layers
        .iter()
        .rev()
        .find_map(|l| l.get("etc/debian_version"))
        .and_then(|(_, _, pax)| pax.get("SCHILY.xattr.user.origin"));
    assert_eq!(origin.map(Vec::as_slice), Some(&b"kiln"[..]), "a user xattr");

    // Unpacked: the big files, the hard link, the user.
    let rootfs = unpacked.join("rootfs");
    let sparse = std::fs::metadata(rootfs.join("var/sparse.img")).expect("sparse file");
    assert_eq!(sparse.len(), 256 * 1024 * 1024 + 3);
    let large = std::fs::read(rootfs.join("var/large.bin")).expect("large file");
    let sum = std::fs::read_to_string(rootfs.join("var/large.sha256")).expect("sum");
    use sha2::Digest;
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&large)),
        sum.split_whitespace().next().expect("hex")
    );
    let a = std::fs::metadata(rootfs.join("usr/bin/ping")).expect("ping");
    let b = std::fs::metadata(rootfs.join("usr/local/bin/ping-link")).expect("link");
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "one inode, two names");
    let id = std::fs::read_to_string(rootfs.join("home/builder/work/id.txt")).expect("id.txt");
    assert!(
        id.starts_with("uid=1500(builder) gid=1500(builder) groups=1500(builder),100(users)"),
        "USER runs with the user's groups: {id}"
    );
    let stamp = std::fs::metadata(rootfs.join("home/builder/work/stamp.txt")).expect("stamp");
    assert_eq!((stamp.uid(), stamp.gid()), (1500, 1500), "--chown=builder takes builder's group");
    let config: Value = serde_json::from_slice(&std::fs::read(unpacked.join("config.json")).expect("config")).expect("json");
    assert_eq!(config["process"]["user"]["uid"], 1500);

    // A child image built on it sees the same capabilities and links.
    let child = d.dir.join("child");
    std::fs::create_dir_all(&child).expect("child ctx");
    std::fs::write(
        child.join("Dockerfile"),
        "FROM kiln-distro-system:test\nUSER root\nRUN getcap /usr/bin/ping /usr/local/bin/ping-link > /caps \\\n && getfattr --only-values -n user.origin /etc/debian_version > /origin \\\n && stat -c %h /usr/local/bin/ping-link > /links\n",
    )
    .expect("Dockerfile");
    let local = d.dir.join("child-fs");
    let (out, _) = d.build(&child, &["-o", &format!("type=local,dest={}", local.display())]);
    ok(&out);
    let caps = std::fs::read_to_string(local.join("caps")).expect("caps");
    assert_eq!(caps, "/usr/bin/ping cap_net_raw=ep\n/usr/local/bin/ping-link cap_net_raw=ep\n");
    assert_eq!(std::fs::read_to_string(local.join("origin")).expect("origin"), "kiln");
    assert_eq!(std::fs::read_to_string(local.join("links")).expect("links"), "2\n");

    // An edit of the last COPY's file re-runs that step and the one after.
    std::fs::write(ctx.join("stamp.txt"), "stamp 2\n").expect("touch");
    let (out, ran) = d.build(&ctx, &["-t", "kiln-distro-system:test"]);
    ok(&out);
    assert_eq!(ran.len(), 2, "only the COPY and the RUN after it: {ran:?}");

    // Docker runs it after --load, with the capability and xattr intact.
    if let Some(said) = d.load_and_run(test, &ctx, "kiln-distro-system:docker") {
        assert!(said.contains("/usr/bin/ping cap_net_raw=ep"), "{said}");
        assert!(said.contains("/usr/local/bin/ping-link cap_net_raw=ep"), "{said}");
        assert!(said.contains("kiln\n"), "{said}");
        assert!(said.contains("uid=1500(builder)") && said.contains("large ok"), "{said}");
    }
}

#[test]
fn a_python_venv_installs_through_the_ca_bundle_and_edits_do_not_reinstall() {
    let test = "distro_python";
    let Some(d) = distro(test) else { return };
    let ctx = d.context("python");
    let (out, _) = d.build(&ctx, &["-t", "kiln-distro-python:test"]);
    ok(&out);
    // Only app.py changes: pip (which bind-mounts requirements.txt and
    // ca.crt from the context) stays cached.
    std::fs::write(
        ctx.join("app.py"),
        "import six\n\nprint(\"python ok, edited, six\", six.__version__)\n",
    )
    .expect("edit");
    let local = d.dir.join("python-fs");
    let (out, ran) = d.build(
        &ctx,
        &[
            "-t",
            "kiln-distro-python:test",
            "-o",
            &format!("type=local,dest={}", local.display()),
        ],
    );
    ok(&out);
    assert_eq!(ran.len(), 1, "only COPY app.py re-runs: {ran:?}");
    assert!(ran[0].contains("COPY app.py"), "{ran:?}");
    let site = local.join("venv/lib/python3.11/site-packages/six.py");
    assert!(site.is_file(), "six is installed in the venv");
    assert!(local.join("venv/bin/python").exists(), "the venv's python");
    // The pip cache mount holds the download, not the image.
    assert!(!local.join("root/.cache/pip").exists(), "the pip cache stays out of the image");
    if let Some(said) = d.load_and_run(test, &ctx, "kiln-distro-python:docker") {
        assert_eq!(said, "python ok, edited, six 1.16.0\n");
    }
}

#[test]
fn go_and_node_stages_feed_one_image() {
    let test = "distro_polyglot";
    let Some(d) = distro(test) else { return };
    let ctx = d.context("polyglot");
    let local = d.dir.join("polyglot-fs");
    let (out, _) = d.build(
        &ctx,
        &[
            "-t",
            "kiln-distro-polyglot:test",
            "-o",
            &format!("type=local,dest={}", local.display()),
        ],
    );
    ok(&out);
    assert!(local.join("usr/local/bin/hello").is_file(), "the Go binary");
    assert!(
        local.join("web/node_modules/is-number/package.json").is_file(),
        "npm ci installed the lockfile"
    );
    assert!(!local.join("root/.npm/_cacache").exists(), "the npm cache stays out of the image");
    // An edit of index.js: npm ci and the Go stage stay cached.
    std::fs::write(
        ctx.join("index.js"),
        "const isNumber = require(\"is-number\");\n\nconsole.log(\"node ok, edited\", isNumber(5));\n",
    )
    .expect("edit");
    let (out, ran) = d.build(&ctx, &["-t", "kiln-distro-polyglot:test"]);
    ok(&out);
    assert!(
        ran.iter()
            .all(|n| !n.contains("npm ci") && !n.contains("go build") && !n.contains("apt-get")),
        "{ran:?}"
    );
    assert_eq!(ran.len(), 2, "COPY index.js and the COPY --from=go after it: {ran:?}");
    if let Some(said) = d.load_and_run(test, &ctx, "kiln-distro-polyglot:docker") {
        assert_eq!(said, "hello from go\nnode ok, edited true\n");
    }
}
