//! Multi-platform builds: `--platform linux/amd64,linux/arm64` on a
//! two-platform busybox base, the arm64 steps really emulated by QEMU
//! (binfmt_misc, or the emulator binary itself), the index checked with
//! skopeo and umoci, pushed to a real registry and used again as a base.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{busybox_multi_layout, can_build, have, scratch_dir, LocalRegistry, Scratch};
use serde_json::Value;

/// `ctx/` (the context), `root/` (kiln's state root), `base/` (the two-platform fixture).
struct Setup {
    dir: Scratch,
}

impl Setup {
    /// None when a needed part is missing (off CI; on CI the test fails).
    fn new(name: &str) -> Option<Setup> {
        if !can_build() || !have("skopeo") || !have("qemu-aarch64-static") {
            return None;
        }
        let dir = scratch_dir(name);
        std::fs::create_dir_all(dir.join("ctx")).expect("ctx");
        busybox_multi_layout(&dir.join("base"))?;
        Some(Setup { dir })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn write(&self, rel: &str, content: &str) {
        let p = self.dir.join("ctx").join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write");
    }

    /// `kiln build --build-context busybox=<the fixture> ARGS ctx`, with `env`.
    fn build(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let base = format!("busybox=oci-layout://{}", self.dir.join("base").display());
        let ctx = self.dir.join("ctx");
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("build")
            .args(["--build-context", &base])
            .args(args)
            .arg(&ctx)
            .current_dir(&*self.dir)
            .env("KILN_ROOT", self.dir.join("root"))
            .env("KILN_GC", "off")
            .envs(env.iter().copied())
            .output()
            .expect("kiln runs")
    }
}

fn events(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// The names of the vertices that ran (not from the cache).
fn ran(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "vertex_started")
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect()
}

/// `skopeo inspect --raw` of an image reference (`oci:DIR:TAG`, `docker://…`).
fn raw(reference: &str) -> Value {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", reference])
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// One platform of an OCI layout's index, copied out by skopeo (which picks
/// by `--override-arch`) and unpacked by umoci: the rootfs.
fn unpack_platform(layout: &Path, tag: &str, arch: &str, dest: &Path) -> PathBuf {
    let single = dest.with_extension("oci");
    let out = Command::new("skopeo")
        .args(["copy", "-q", "--override-arch", arch])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("oci:{}:{arch}", single.display()))
        .output()
        .expect("skopeo");
    assert!(out.status.success(), "skopeo copy {arch}: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{arch}", single.display()))
        .arg(dest)
        .output()
        .expect("umoci");
    assert!(out.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&out.stderr));
    dest.join("rootfs")
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const DOCKERFILE: &str = r#"FROM --platform=$BUILDPLATFORM busybox AS tools
RUN uname -m > /built-on && head -c 16 /dev/urandom | od -An -tx1 > /nonce

FROM --platform=$BUILDPLATFORM busybox AS cross
ARG TARGETARCH
RUN echo "$(uname -m) for $TARGETARCH" > /cross

FROM busybox
ARG TARGETPLATFORM TARGETOS TARGETARCH BUILDPLATFORM
COPY --from=tools /built-on /nonce /
COPY --from=cross /cross /
RUN uname -m > /arch && echo "$TARGETPLATFORM $TARGETOS $TARGETARCH $BUILDPLATFORM" > /args
"#;

#[test]
fn a_two_platform_build_makes_one_index_and_shares_the_build_platform_stage() {
    let Some(s) = Setup::new("platforms-index") else { return };
    s.write("Dockerfile", DOCKERFILE);
    let oci = s.path("out.tar");
    let dest = format!("type=oci,dest={}", oci.display());
    let meta = s.path("metadata.json");
    let meta_arg = meta.to_str().unwrap();
    let out = s.build(
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--progress",
            "rawjson",
            "-t",
            "app:1",
            "--output",
            &dest,
            "--metadata-file",
            meta_arg,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ran = ran(&events(&out));

    // The build-platform stage without TARGET args is one vertex for both
    // platforms: it ran once. The one using TARGETARCH ran per platform,
    // natively, named as BuildKit names a cross stage.
    let tools: Vec<&String> = ran.iter().filter(|n| n.contains("RUN uname -m > /built-on")).collect();
    assert_eq!(tools.len(), 1, "the shared stage runs once: {ran:#?}");
    assert!(tools[0].starts_with("[linux/amd64 tools 2/2]"), "{tools:?}");
    let cross: Vec<&String> = ran.iter().filter(|n| n.contains("> /cross")).collect();
    assert_eq!(cross.len(), 2, "{ran:#?}");
    assert!(cross.iter().any(|n| n.starts_with("[linux/amd64->arm64 cross 2/2]")), "{cross:?}");
    assert!(
        ran.iter().any(|n| n.starts_with("[linux/arm64 stage-2 4/4] RUN uname -m")),
        "{ran:#?}"
    );

    // An OCI layout whose tag names an image index of two platforms.
    let layout = s.path("layout");
    std::fs::create_dir_all(&layout).expect("layout");
    assert!(Command::new("tar")
        .arg("xf")
        .arg(&oci)
        .arg("-C")
        .arg(&layout)
        .status()
        .expect("tar")
        .success());
    let top: Value = serde_json::from_str(&read(layout.join("index.json"))).expect("index.json");
    assert_eq!(top["manifests"][0]["mediaType"], "application/vnd.oci.image.index.v1+json");
    let tag = "docker.io/library/app:1";
    let index = raw(&format!("oci:{}:{tag}", layout.display()));
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap(),
                m["platform"]["architecture"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    let metadata: Value = serde_json::from_str(&read(meta)).expect("metadata");
    assert_eq!(
        metadata["containerimage.digest"], top["manifests"][0]["digest"],
        "the index digest is recorded"
    );

    let amd = unpack_platform(&layout, tag, "amd64", &s.path("amd64"));
    let arm = unpack_platform(&layout, tag, "arm64", &s.path("arm64"));
    assert_eq!(read(amd.join("arch")), "x86_64\n");
    assert_eq!(read(arm.join("arch")), "aarch64\n", "the arm64 step ran under emulation");
    assert_eq!(read(amd.join("args")), "linux/amd64 linux amd64 linux/amd64\n");
    assert_eq!(read(arm.join("args")), "linux/arm64 linux arm64 linux/amd64\n");
    assert_eq!(read(arm.join("built-on")), "x86_64\n", "the build-platform stage runs natively");
    assert_eq!(read(amd.join("nonce")), read(arm.join("nonce")), "one run fed both platforms");
    assert_eq!(read(amd.join("cross")), "x86_64 for amd64\n");
    assert_eq!(read(arm.join("cross")), "x86_64 for arm64\n");
    // Each manifest's config names its own platform.
    for m in index["manifests"].as_array().unwrap() {
        let arch = m["platform"]["architecture"].as_str().unwrap();
        let blob = |digest: &str| layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
        let manifest: Value = serde_json::from_str(&read(blob(m["digest"].as_str().unwrap()))).expect("manifest");
        let cfg: Value = serde_json::from_str(&read(blob(manifest["config"]["digest"].as_str().unwrap()))).expect("config");
        assert_eq!(cfg["architecture"], arch);
        assert_eq!(cfg["os"], "linux");
    }

    // kiln's store holds the index; `kiln images` names both platforms.
    let images = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["images", "--root"])
        .arg(s.path("root"))
        .output()
        .expect("kiln images");
    let listing = String::from_utf8_lossy(&images.stdout);
    let line = listing.lines().find(|l| l.starts_with(tag)).unwrap_or_else(|| panic!("{listing}"));
    assert!(line.ends_with("linux/amd64,linux/arm64"), "{line}");
}

#[test]
fn file_outputs_get_a_folder_per_platform_and_docker_is_refused_up_front() {
    let Some(s) = Setup::new("platforms-files") else { return };
    s.write("Dockerfile", "FROM busybox\nRUN uname -m > /arch\n");
    let local = s.path("local");
    let out = s.build(
        &[
            "--platform",
            "linux/arm64",
            "--platform",
            "linux/amd64",
            "--output",
            &format!("type=local,dest={}", local.display()),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read(local.join("linux_arm64/arch")), "aarch64\n");
    assert_eq!(read(local.join("linux_amd64/arch")), "x86_64\n");

    let tarball = s.path("fs.tar");
    let out = s.build(
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--output",
            &format!("type=tar,dest={}", tarball.display()),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listing = Command::new("tar").arg("tf").arg(&tarball).output().expect("tar");
    let names = String::from_utf8_lossy(&listing.stdout);
    for want in [
        "linux_amd64/",
        "linux_amd64/arch",
        "linux_arm64/",
        "linux_arm64/arch",
        "linux_arm64/bin/busybox",
    ] {
        assert!(names.lines().any(|l| l == want), "{want} in the tar: {names}");
    }

    // A docker tarball holds one platform: refused before anything runs.
    let out = s.build(
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--progress",
            "rawjson",
            "--output",
            &format!("type=docker,dest={}", s.path("d.tar").display()),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(kiln_cli::EXIT_USAGE));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("type=oci") && err.contains("one --platform"), "{err}");
    assert!(events(&out).is_empty(), "nothing ran: {err}");
    assert!(!s.path("d.tar").exists());
}

#[test]
fn a_pushed_index_is_the_base_of_a_later_arm64_build() {
    let Some(s) = Setup::new("platforms-push") else { return };
    if !have("docker-registry") {
        return;
    }
    let registry = LocalRegistry::start(&s.path("registry"));
    s.write(
        "Dockerfile",
        "FROM busybox\nRUN uname -m > /arch && head -c 8 /dev/urandom | od -An -tx1 > /nonce\n",
    );
    let name = format!("{}/multi/app:1", registry.addr);
    let out = s.build(
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "-t",
            &name,
            "--push",
            "--progress",
            "plain",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    // busybox's layer differs per platform; each platform's blobs are sent once.
    assert!(err.contains(&format!("pushing {name}: 6 uploaded, 0 already there")), "{err}");

    let index = raw(&format!("docker://{name}"));
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(index["manifests"].as_array().map(Vec::len), Some(2));
    // `kiln push` of the stored index again: every blob is there already.
    let again = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["push", &name, "--root"])
        .arg(s.path("root"))
        .output()
        .expect("kiln push");
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&again.stdout),
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(said.contains("0 blobs uploaded, 6 already there"), "{said}");

    // A later build, on a fresh root, takes the arm64 image from the registry.
    std::fs::write(
        s.path("ctx/Dockerfile"),
        format!("FROM {name}\nRUN cat /arch > /seen && uname -m >> /seen\n"),
    )
    .expect("write");
    let local = s.path("again");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "--platform", "linux/arm64", "--output"])
        .arg(format!("type=local,dest={}", local.display()))
        .arg(s.path("ctx"))
        .env("KILN_ROOT", s.path("root2"))
        .env("KILN_GC", "off")
        .output()
        .expect("kiln");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read(local.join("seen")), "aarch64\naarch64\n");
    assert!(!local.join("linux_arm64").exists(), "one platform: no platform folder");
}

#[test]
fn without_binfmt_the_step_starts_through_the_emulator_binary() {
    let Some(s) = Setup::new("platforms-emulator") else { return };
    s.write(
        "Dockerfile",
        "FROM busybox\nRUN [\"/bin/uname\", \"-m\"]\nRUN test -x /dev/.kiln-qemu-emulator && uname -m > /arch\n",
    );
    let local = s.path("local");
    let dest = format!("type=local,dest={}", local.display());
    let out = s.build(
        &["--platform", "linux/arm64", "--progress", "rawjson", "--output", &dest],
        &[("KILN_BINFMT", "ignore")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let logs: String = events(&out)
        .iter()
        .filter(|e| e["type"] == "log")
        .filter_map(|e| e["data"].as_str().map(str::to_string))
        .collect();
    assert!(logs.contains("aarch64"), "the exec-form step printed its machine: {logs}");
    assert_eq!(read(local.join("arch")), "aarch64\n");
    assert!(!local.join("dev/.kiln-qemu-emulator").exists(), "the emulator is not in the image");

    // No emulator at all (PATH without one, binfmt ignored): one sentence
    // naming the package, before anything runs.
    let bin = s.path("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    for tool in ["runc", "slirp4netns"] {
        let found = kiln_test_support::which(tool).expect("on PATH");
        std::os::unix::fs::symlink(found, bin.join(tool)).expect("link");
    }
    let out = s.build(
        &[
            "--platform",
            "linux/arm64",
            "--no-cache",
            "--progress",
            "rawjson",
            "--output",
            &dest,
        ],
        &[("KILN_BINFMT", "ignore"), ("PATH", bin.to_str().unwrap())],
    );
    assert_eq!(
        out.status.code(),
        Some(kiln_cli::EXIT_OTHER),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("linux/arm64") && err.contains("install qemu-user-static"), "{err}");
    assert!(ran(&events(&out)).is_empty(), "nothing ran: {err}");
}

#[test]
fn dump_llb_prints_one_definition_per_platform() {
    let dir = scratch_dir("platforms-dump");
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["dump-llb", "--no-resolve", "--platform", "linux/amd64,linux/arm64/v8"])
        .arg(&*dir)
        .output()
        .expect("kiln");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let sections: Vec<&str> = text.split("# platform: ").skip(1).collect();
    assert_eq!(sections.len(), 2, "{text}");
    assert!(
        sections[0].starts_with("linux/amd64\n") && sections[1].starts_with("linux/arm64\n"),
        "normalized: {text}"
    );
    for (section, arch) in sections.iter().zip(["amd64", "arm64"]) {
        let ops: Vec<Value> = section
            .lines()
            .skip(1)
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        let execs: Vec<&Value> = ops.iter().filter(|o| o["Op"]["Op"]["exec"].is_object()).collect();
        assert_eq!(execs.len(), 3, "{section}");
        assert!(
            execs.iter().any(|o| o["Op"]["platform"]["Architecture"] == arch),
            "a step for {arch}: {section}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "dump-llb",
            "--no-resolve",
            "--format",
            "pb",
            "--platform",
            "linux/amd64,linux/arm64",
        ])
        .arg(&*dir)
        .output()
        .expect("kiln");
    assert_eq!(out.status.code(), Some(kiln_cli::EXIT_USAGE));
}
