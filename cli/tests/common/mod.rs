//! Helpers shared by the CLI's end-to-end tests: running `kiln`, scratch
//! directories, OCI layout fixtures and a throwaway local registry.
#![allow(dead_code)]

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

/// A fresh empty directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
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

/// Whether a tool is installed; on CI a missing tool fails the test instead.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "{tool} is required on CI (.ci/run installs it)"
        );
        eprintln!("{tool} not installed; skipped");
    }
    found
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
