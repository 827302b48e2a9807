//! Helpers shared by the CLI's end-to-end tests: running `kiln`, scratch
//! directories, OCI layout fixtures and a throwaway local registry.
#![allow(dead_code, reason = "each test binary uses some of the helpers")]
#![allow(unreachable_pub, reason = "helpers shared by test binaries")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use sha2::{Digest, Sha256};

/// Runs `kiln ARGS` in `dir` with a private state root.
pub fn kiln(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("KILN_ROOT", dir.join("root"))
        .output()
        .expect("kiln runs")
}

/// A fresh empty directory for one test, removed when the test passes (a
/// failing test's stays behind to be looked at). CI machines have little
/// disk: the distro tests alone leave gigabytes.
pub fn scratch_dir(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("kiln-cli-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    Scratch(dir)
}

/// A test's directory; see [`scratch_dir`].
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// One image of a fixture layout: its platform and config.
pub struct FixtureImage<'a> {
    /// `os/arch`.
    pub platform: (&'a str, &'a str),
    /// The image config JSON.
    pub config: String,
}

fn put(blobs: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = hex::encode(Sha256::digest(bytes));
    std::fs::write(blobs.join(&hex), bytes).expect("blob");
    (format!("sha256:{hex}"), bytes.len())
}

/// Writes an OCI layout whose tag `tag` names one manifest, or an index of
/// several when `images` has more than one. Returns the tag's digest.
pub fn write_layout(dir: &Path, tag: &str, images: &[FixtureImage<'_>]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs");
    let mut entries = Vec::new();
    for image in images {
        let (cdig, clen) = put(&blobs, image.config.as_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cdig}","size":{clen}}},"layers":[]}}"#
        );
        let (mdig, mlen) = put(&blobs, manifest.as_bytes());
        entries.push((mdig, mlen, image.platform));
    }
    let (top_type, top_digest, top_len) = if entries.len() == 1 {
        ("application/vnd.oci.image.manifest.v1+json", entries[0].0.clone(), entries[0].1)
    } else {
        let manifests: Vec<String> = entries
            .iter()
            .map(|(d, l, (os, arch))| {
                format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":{l},"platform":{{"os":"{os}","architecture":"{arch}"}}}}"#)
            })
            .collect();
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
            manifests.join(",")
        );
        let (d, l) = put(&blobs, index.as_bytes());
        ("application/vnd.oci.image.index.v1+json", d, l)
    };
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{top_type}","digest":"{top_digest}","size":{top_len},"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}}}}]}}"#
    );
    std::fs::write(dir.join("index.json"), index).expect("index");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("marker");
    top_digest
}

/// An image config with the given env, working dir and ONBUILD triggers.
pub fn config_json(arch: &str, env: &[&str], workdir: &str, onbuild: &[&str]) -> String {
    serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": env, "WorkingDir": workdir, "OnBuild": onbuild},
        "rootfs": {"type": "layers", "diff_ids": []}
    })
    .to_string()
}

/// Whether a tool is installed; on CI a missing tool fails the test instead
/// (`kiln_test_support` decides and reports).
pub fn have(tool: &str) -> bool {
    kiln_test_support::tool(&current_test(), tool)
}

/// The running test's name, for skip reports.
pub fn current_test() -> String {
    std::thread::current().name().unwrap_or("cli test").to_string()
}

/// The `../shared` folder beside the checkout (`KILN_SHARED` overrides).
pub fn shared_dir() -> PathBuf {
    kiln_test_support::shared_dir()
}

/// Debian's `docker-registry` serving plain HTTP on a free loopback port; stopped on drop.
pub struct LocalRegistry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    _dir: PathBuf,
}

impl LocalRegistry {
    /// Starts a registry on a free loopback port with its storage under `dir`.
    pub fn start(dir: &Path) -> LocalRegistry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        LocalRegistry::start_at(dir, &format!("127.0.0.1:{port}"))
    }

    /// Starts a registry listening on `addr`.
    pub fn start_at(dir: &Path, addr: &str) -> LocalRegistry {
        let addr = addr.to_string();
        std::fs::create_dir_all(dir.join("storage")).expect("storage");
        let config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("storage").display()
        );
        std::fs::write(dir.join("config.yml"), config).expect("config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry starts");
        let registry = LocalRegistry {
            child,
            addr,
            _dir: dir.to_path_buf(),
        };
        for _ in 0..100 {
            if registry.answers() {
                return registry;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("docker-registry did not answer on {}", registry.addr);
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(&self.addr) else {
            return false;
        };
        let _ = write!(s, "GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
    }

    /// Copies every image of an OCI layout tag into `repo:tag` with skopeo.
    pub fn push_layout(&self, layout: &Path, tag: &str, repo: &str) {
        let out = Command::new("skopeo")
            .args(["copy", "--all", "--preserve-digests", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.addr))
            .output()
            .expect("skopeo runs");
        assert!(out.status.success(), "skopeo copy failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fixed time of every fixture file (2020-01-01), so digests are stable.
pub const FIXTURE_EPOCH: u64 = 1_577_836_800;

fn tar_header(kind: tar::EntryType, mode: u32, size: u64, uid: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(FIXTURE_EPOCH);
    h.set_uid(uid);
    h.set_gid(uid);
    h
}

/// Writes kiln's test base image: Debian's static busybox with one symlink
/// per applet, `/etc/passwd` with `root` and `app` (1000:1000), and the
/// usual empty directories, as a deterministic OCI layout tagged `latest`.
/// Returns the manifest digest.
pub fn busybox_layout(dir: &Path) -> String {
    let busybox = host_busybox();
    let (mdig, mlen) = busybox_image(dir, &busybox, "amd64");
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{mdig}","size":{mlen},"platform":{{"architecture":"amd64","os":"linux"}},"annotations":{{"org.opencontainers.image.ref.name":"latest"}}}}]}}"#
    );
    std::fs::write(dir.join("index.json"), index).expect("index");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("marker");
    mdig
}

/// The host's static busybox.
fn host_busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("busybox-static is installed (.ci/run installs it)")
}

/// Where .ci/run puts Debian's `busybox-static:arm64` binary
/// (`$KILN_ARM64_BUSYBOX` overrides).
pub fn arm64_busybox() -> PathBuf {
    std::env::var_os("KILN_ARM64_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/lib/kiln-ci/arm64/bin/busybox"))
}

/// [`busybox_layout`] with two platforms: an image index tagged `latest`
/// with the host's busybox as linux/amd64 and [`arm64_busybox`] as
/// linux/arm64 (each platform's own binary, same files otherwise). `None`
/// when the arm64 binary is missing (off CI; on CI the test fails).
pub fn busybox_multi_layout(dir: &Path) -> Option<String> {
    let arm64 = arm64_busybox();
    if !arm64.is_file() {
        let why = format!("no arm64 busybox at {} (.ci/run puts it there)", arm64.display());
        kiln_test_support::skip(&current_test(), &why);
        return None;
    }
    let mut entries = Vec::new();
    for (binary, arch) in [(host_busybox(), "amd64"), (arm64, "arm64")] {
        let (d, l) = busybox_image(dir, &binary, arch);
        entries.push(format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":{l},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#
        ));
    }
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
        entries.join(",")
    );
    let (idig, ilen) = put(&dir.join("blobs/sha256"), index.as_bytes());
    let top = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"{idig}","size":{ilen},"annotations":{{"org.opencontainers.image.ref.name":"latest"}}}}]}}"#
    );
    std::fs::write(dir.join("index.json"), top).expect("index");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("marker");
    Some(idig)
}

/// One busybox image's blobs in the layout at `dir` (applets as the host's
/// busybox lists them, all links to `binary`); its manifest's digest and size.
fn busybox_image(dir: &Path, binary: &Path, arch: &str) -> (String, usize) {
    let list = Command::new(host_busybox())
        .arg("--list-full")
        .output()
        .expect("busybox --list-full");
    let mut applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    applets.sort();
    let binary = std::fs::read(binary).expect("read busybox");
    let mut tar = tar::Builder::new(Vec::new());
    let dirs = [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("home/app", 0o755),
        ("proc", 0o755),
        ("root", 0o700),
        ("sbin", 0o755),
        ("sys", 0o755),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("var", 0o755),
    ];
    for (d, mode) in dirs {
        let mut h = tar_header(tar::EntryType::Directory, mode, 0, if d == "home/app" { 1000 } else { 0 });
        tar.append_data(&mut h, format!("{d}/"), std::io::empty()).expect("dir");
    }
    let mut h = tar_header(tar::EntryType::Regular, 0o755, binary.len() as u64, 0);
    tar.append_data(&mut h, "bin/busybox", binary.as_slice()).expect("busybox");
    let files = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\napp:x:1000:\nstaff:x:50:app\nnogroup:x:65534:\n"),
    ];
    for (p, c) in files {
        let mut h = tar_header(tar::EntryType::Regular, 0o644, c.len() as u64, 0);
        tar.append_data(&mut h, p, c.as_bytes()).expect("file");
    }
    for a in &applets {
        if a == "bin/busybox" || !(a.starts_with("bin/") || a.starts_with("sbin/") || a.starts_with("usr/")) {
            continue;
        }
        let mut h = tar_header(tar::EntryType::Symlink, 0o777, 0, 0);
        tar.append_link(&mut h, a, "/bin/busybox").expect("link");
    }
    let layer = tar.into_inner().expect("tar");
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&layer)));
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer).expect("gzip");
    let compressed = gz.finish().expect("gzip");
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs");
    let (ldig, llen) = put(&blobs, &compressed);
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "created": "2020-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2020-01-01T00:00:00Z", "created_by": "kiln test fixture: busybox-static"}]
    })
    .to_string();
    let (cdig, clen) = put(&blobs, config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cdig}","size":{clen}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{ldig}","size":{llen}}}]}}"#
    );
    put(&blobs, manifest.as_bytes())
}

/// `docker run --rm ARGS…`, tried up to three times: dockerd 20.10's
/// containerd shim sometimes dies while a loaded 2-core machine starts the
/// container ("shim disconnected", no output), which says nothing of the
/// image. Each failed try is printed; the last one is returned.
pub fn docker_run(docker: &str, args: &[&str]) -> Output {
    let mut last = None;
    for attempt in 1..=3 {
        let out = Command::new(docker).args(["run", "--rm"]).args(args).output().expect("docker run");
        if out.status.success() {
            return out;
        }
        eprintln!(
            "docker run {args:?} failed (try {attempt} of 3, {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        last = Some(out);
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    last.expect("three tries")
}

/// Whether builds can run here (root, runc, slirp4netns, umoci, busybox); on CI they must.
pub fn can_build() -> bool {
    let test = current_test();
    kiln_test_support::root(&test, "runc and overlayfs mounts")
        && kiln_test_support::tools(&test, &["runc", "slirp4netns", "umoci", "busybox"])
}

/// Unpacks an OCI image tarball's image `name` with umoci into `dest`
/// (which receives `rootfs/` and `config.json`).
pub fn umoci_unpack(tarball: &Path, name: &str, dest: &Path) {
    let layout = dest.with_extension("layout");
    let _ = std::fs::remove_dir_all(&layout);
    std::fs::create_dir_all(&layout).expect("layout dir");
    let st = Command::new("tar")
        .arg("xf")
        .arg(tarball)
        .arg("-C")
        .arg(&layout)
        .status()
        .expect("tar");
    assert!(st.success(), "untar {}", tarball.display());
    let _ = std::fs::remove_dir_all(dest);
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{name}", layout.display()))
        .arg(dest)
        .output()
        .expect("umoci");
    assert!(out.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&out.stderr));
}

/// Builds kiln's WASM plugins from source once per test binary
/// (`frontends/build-wasm.sh`: the Dockerfile frontend and the `steps`
/// example, for wasm32-wasip1) and returns the folder holding
/// `dockerfile.wasm` and `steps.wasm`.
pub fn wasm_plugins() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let out = repo.join("target/plugins");
            let run = Command::new("bash")
                .arg(repo.join("frontends/build-wasm.sh"))
                .env("KILN_PLUGINS_DIR", &out)
                .output()
                .expect("bash runs");
            assert!(
                run.status.success(),
                "frontends/build-wasm.sh failed (it needs Debian's rustc-web; .ci/run installs it):\n{}",
                String::from_utf8_lossy(&run.stderr)
            );
            out
        })
        .clone()
}

/// Writes `wasm` as a CNCF wasm OCI artifact into an OCI layout at `dir`,
/// tagged `tag`; returns (manifest bytes, config bytes).
pub fn write_wasm_artifact(dir: &Path, tag: &str, wasm: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs");
    let put = |bytes: &[u8]| {
        let hex = hex::encode(Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).expect("blob");
        format!("sha256:{hex}")
    };
    let config = br#"{"created":"2026-01-01T00:00:00Z","architecture":"wasm","os":"wasip1","layerDigests":[],"component":{}}"#.to_vec();
    let config_digest = put(&config);
    let module_digest = put(wasm);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.wasm.config.v0+json","config":{{"mediaType":"application/vnd.wasm.config.v0+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/wasm","digest":"{module_digest}","size":{}}}]}}"#,
        config.len(),
        wasm.len()
    )
    .into_bytes();
    let manifest_digest = put(&manifest);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("marker");
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}}}}]}}"#,
            manifest.len()
        ),
    )
    .expect("index");
    (manifest, config)
}

/// The first `URIs:`/`deb` archive of the host's apt sources, main and
/// security, as `(main, security)`.
fn apt_mirrors() -> Option<(String, Option<String>)> {
    let mut uris = Vec::new();
    let dir = std::fs::read_dir("/etc/apt/sources.list.d").map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>());
    let mut files = dir.unwrap_or_default();
    files.sort();
    files.insert(0, PathBuf::from("/etc/apt/sources.list"));
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("URIs:") {
                uris.extend(rest.split_whitespace().map(str::to_string));
            } else if let Some(rest) = line.strip_prefix("deb ") {
                // deb [opts] URI suite …
                let rest = if rest.trim_start().starts_with('[') {
                    rest.split_once(']').map_or("", |(_, r)| r)
                } else {
                    rest
                };
                uris.extend(rest.split_whitespace().next().map(str::to_string));
            }
        }
    }
    let main = uris.iter().find(|u| !u.contains("security"))?.clone();
    let security = uris.iter().find(|u| u.contains("security")).cloned();
    Some((main, security))
}

/// A Debian bookworm minbase image (with ca-certificates) made by
/// mmdebstrap from the host's apt mirror, as an OCI layout tagged
/// `bookworm` (umoci puts the rootfs tar in verbatim: owners, modes, hard
/// links and xattrs as mmdebstrap wrote them). Made once per machine under
/// the temp dir and reused. `None` (skipped loudly) when mmdebstrap or the
/// mirror is missing off CI; on CI that fails the test.
pub fn debian_layout(test: &str) -> Option<PathBuf> {
    static MADE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut made = MADE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = made.as_ref() {
        return Some(p.clone());
    }
    if !kiln_test_support::tools(test, &["mmdebstrap", "umoci"]) {
        return None;
    }
    let Some((main, security)) = apt_mirrors() else {
        kiln_test_support::skip(test, "no Debian archive in /etc/apt/sources.list{,.d}");
        return None;
    };
    let dir = std::env::temp_dir().join("kiln-fixture-debian-bookworm");
    let layout = dir.join("oci");
    if layout.join("index.json").is_file() {
        *made = Some(layout.clone());
        return Some(layout);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fixture dir");
    let tarball = dir.join("rootfs.tar");
    let mut sources = vec![format!("deb {main} bookworm main"), format!("deb {main} bookworm-updates main")];
    if let Some(sec) = security {
        sources.push(format!("deb {sec} bookworm-security main"));
    }
    let out = Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--include=ca-certificates",
            "--aptopt=Acquire::Retries \"3\"",
            "bookworm",
        ])
        .arg(&tarball)
        .args(&sources)
        .env("SOURCE_DATE_EPOCH", "1747699200")
        .output()
        .expect("mmdebstrap runs");
    if !out.status.success() {
        let tail: String = String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n");
        kiln_test_support::skip(test, &format!("mmdebstrap could not make the Debian base from {main}:\n{tail}"));
        return None;
    }
    let tmp = dir.join("oci.tmp");
    let image = format!("{}:bookworm", tmp.display());
    let steps: [Vec<String>; 4] = [
        vec!["init".into(), "--layout".into(), tmp.display().to_string()],
        vec!["new".into(), "--image".into(), image.clone()],
        vec![
            "raw".into(),
            "add-layer".into(),
            "--image".into(),
            image.clone(),
            "--history.created_by".into(),
            "mmdebstrap --variant=minbase --include=ca-certificates bookworm".into(),
            tarball.display().to_string(),
        ],
        vec![
            "config".into(),
            "--image".into(),
            image,
            "--no-history".into(),
            "--config.env".into(),
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            "--config.cmd".into(),
            "bash".into(),
            "--architecture".into(),
            "amd64".into(),
            "--os".into(),
            "linux".into(),
        ],
    ];
    for args in steps {
        let out = Command::new("umoci").args(&args).output().expect("umoci runs");
        assert!(out.status.success(), "umoci {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = std::fs::remove_file(&tarball);
    std::fs::rename(&tmp, &layout).expect("fixture in place");
    *made = Some(layout.clone());
    Some(layout)
}

/// The unprivileged user that rootless tests build as.
pub const ROOTLESS_USER: &str = "kiln-rootless";

/// Builds as [`ROOTLESS_USER`]: a system user with subordinate ids
/// 600000-899999, created on first use (the tests run as root, as CI does).
pub struct Rootless {
    kiln: PathBuf,
    home: PathBuf,
}

/// Runs `program args`, failing the test with its output when it fails.
fn must(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The rootless builder for `test`, working in `dir` (which it is given).
/// `None` (skipped loudly; a failure on CI) when not root or a tool is missing.
pub fn rootless(test: &str, dir: &Path) -> Option<Rootless> {
    if !kiln_test_support::root(test, "creating the rootless test user")
        || !kiln_test_support::tools(
            test,
            &["useradd", "usermod", "runuser", "newuidmap", "newgidmap", "runc", "slirp4netns"],
        )
    {
        return None;
    }
    static MADE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut made = MADE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !*made {
        let exists = Command::new("id")
            .arg("-u")
            .arg(ROOTLESS_USER)
            .output()
            .is_ok_and(|o| o.status.success());
        if !exists {
            must("useradd", &["--system", "--no-create-home", "--shell", "/bin/sh", ROOTLESS_USER]);
        }
        // More than the usual 65536: the corpus has owners up to 200000.
        let has = |file: &str| {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .any(|l| l == format!("{ROOTLESS_USER}:600000:300000"))
        };
        if !has("/etc/subuid") || !has("/etc/subgid") {
            must(
                "usermod",
                &["--add-subuids", "600000-899999", "--add-subgids", "600000-899999", ROOTLESS_USER],
            );
        }
        // Its usual mode; some machines ship 0600, which only root can open.
        let tun = std::fs::metadata("/dev/net/tun").map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
        if tun.is_ok_and(|m| m & 0o006 != 0o006) {
            eprintln!("rootless tests: chmod 0666 /dev/net/tun (its usual mode) so an unprivileged user's steps get a network");
            must("chmod", &["0666", "/dev/net/tun"]);
        }
        *made = true;
    }
    drop(made);
    let home = dir.join("home");
    std::fs::create_dir_all(&home).expect("home");
    must("chown", &["-R", &format!("{ROOTLESS_USER}:"), &dir.display().to_string()]);
    // The user runs kiln where it was built, or a copy where the build is
    // not reachable for other users.
    let built = PathBuf::from(env!("CARGO_BIN_EXE_kiln"));
    let reachable = Command::new("runuser")
        .args(["-u", ROOTLESS_USER, "--", "test", "-x"])
        .arg(&built)
        .status()
        .is_ok_and(|s| s.success());
    let kiln = if reachable {
        built
    } else {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("bin");
        for name in ["kiln", "kiln-solver"] {
            std::fs::copy(built.with_file_name(name), bin.join(name)).expect("copy a binary");
        }
        bin.join("kiln")
    };
    Some(Rootless { kiln, home })
}

impl Rootless {
    /// `kiln ARGS` as the rootless user in `cwd`, state root `root`.
    pub fn kiln(&self, args: &[&str], cwd: &Path, root: &Path) -> Output {
        self.run(
            ROOTLESS_USER,
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            args,
            cwd,
            root,
        )
    }

    /// [`Rootless::kiln`] with another `PATH`.
    pub fn kiln_with_path(&self, args: &[&str], cwd: &Path, root: &Path, path: &str) -> Output {
        self.run(ROOTLESS_USER, path, args, cwd, root)
    }

    /// [`Rootless::kiln`] as another user.
    pub fn kiln_as(&self, user: &str, args: &[&str], cwd: &Path, root: &Path) -> Output {
        self.run(
            user,
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            args,
            cwd,
            root,
        )
    }

    fn run(&self, user: &str, path: &str, args: &[&str], cwd: &Path, root: &Path) -> Output {
        self.command(user, path, args, cwd, root).output().expect("runuser runs")
    }

    /// The command running `kiln ARGS` as the rootless user, to spawn.
    pub fn spawn_kiln(&self, args: &[&str], cwd: &Path, root: &Path) -> Command {
        self.command(
            ROOTLESS_USER,
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            args,
            cwd,
            root,
        )
    }

    fn command(&self, user: &str, path: &str, args: &[&str], cwd: &Path, root: &Path) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", user, "--", "env", "-i"])
            .arg(format!("HOME={}", self.home.display()))
            .arg(format!("PATH={path}"))
            .arg(format!("KILN_ROOT={}", root.display()))
            .arg("KILN_GC=off")
            .arg(&self.kiln)
            .args(args)
            .current_dir(cwd);
        cmd
    }

    /// Gives `path` (recursively) to the rootless user.
    pub fn give(&self, path: &Path) {
        must("chown", &["-R", &format!("{ROOTLESS_USER}:"), &path.display().to_string()]);
    }
}

/// A TCP server answering every connection with `reply`, until the test ends.
pub fn serve(addr: &str, reply: &'static str) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind(addr).expect("listen");
    let at = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut conn, reply.as_bytes());
        }
    });
    at
}

/// The host's address on its default route (no packet is sent).
pub fn host_address() -> std::net::IpAddr {
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
    udp.connect("192.0.2.1:9").expect("a default route");
    udp.local_addr().expect("address").ip()
}

/// The pids of running processes for which `keep` holds.
pub fn pids_where(keep: impl Fn(u32) -> bool) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&p| keep(p))
        .collect()
}

/// Processes whose command line contains `needle`.
pub fn processes_with(needle: &str) -> Vec<u32> {
    pids_where(|p| {
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        cmdline.windows(needle.len()).any(|w| w == needle.as_bytes())
    })
}

/// Processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    pids_where(|p| {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // pid (comm) state ppid …
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        after.split_whitespace().nth(1).and_then(|x| x.parse::<u32>().ok()) == Some(pid)
    })
}

/// A test's directories: `ctx/` (the context), `root/` (kiln's state root), `base/` (the fixture).
pub struct Setup {
    /// The scratch directory holding all three.
    pub dir: Scratch,
}

impl Setup {
    /// A fresh setup for the test `name`.
    pub fn new(name: &str) -> Setup {
        let dir = scratch_dir(name);
        std::fs::create_dir_all(dir.join("ctx")).expect("ctx");
        busybox_layout(&dir.join("base"));
        Setup { dir }
    }

    /// `ctx/`.
    pub fn ctx(&self) -> PathBuf {
        self.dir.join("ctx")
    }

    /// `root/`.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Writes a context file.
    pub fn write(&self, rel: &str, content: &str) {
        let p = self.ctx().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write");
    }

    /// The `--build-context` value naming the fixture `busybox`.
    pub fn base_arg(&self) -> String {
        format!("busybox=oci-layout://{}", self.dir.join("base").display())
    }

    /// `kiln build --build-context busybox=… ARGS ctx`.
    pub fn build(&self, args: &[&str]) -> Output {
        self.build_env(args, &[])
    }

    /// `build` with extra environment variables.
    pub fn build_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let base = self.base_arg();
        let mut all: Vec<&str> = vec!["build", "--build-context", &base];
        all.extend_from_slice(args);
        let ctx = self.ctx();
        let ctx = ctx.to_str().expect("utf8");
        all.push(ctx);
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_GC", "off")
            .args(&all)
            .current_dir(&self.dir)
            .env("KILN_ROOT", self.root())
            .envs(env.iter().copied())
            .output()
            .expect("kiln runs")
    }

    /// Builds with rawjson progress; returns the events.
    pub fn build_events(&self, args: &[&str]) -> (Output, Vec<serde_json::Value>) {
        let mut a = vec!["--progress", "rawjson"];
        a.extend_from_slice(args);
        let out = self.build(&a);
        let events = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect();
        (out, events)
    }
}

/// Fails the test with kiln's output unless it succeeded.
pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "kiln failed ({:?}):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The layer tars of the image `name` in an OCI layout (its first image
/// when no entry has that name), bottom first, ready to read.
pub fn layout_layers(layout: &Path, name: &str) -> Vec<tar::Archive<flate2::read::GzDecoder<std::fs::File>>> {
    let blob = |d: &str| layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index")).expect("json");
    let mdig = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
        .or_else(|| index["manifests"].get(0))
        .and_then(|m| m["digest"].as_str())
        .expect("manifest digest")
        .to_string();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(&mdig)).expect("manifest")).expect("json");
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            let f = std::fs::File::open(blob(l["digest"].as_str().expect("digest"))).expect("layer");
            tar::Archive::new(flate2::read::GzDecoder::new(f))
        })
        .collect()
}
