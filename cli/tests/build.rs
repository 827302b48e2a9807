//! End-to-end builds: `kiln build` with the real solver, runc and
//! overlayfs, on kiln's busybox fixture image; results checked with umoci.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{can_build, children_of, host_address, ok, processes_with, serve, umoci_unpack, Setup};
use serde_json::Value;

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["type"] == kind).count()
}

/// Names of the vertices that ran (not the local context, which always "runs").
fn ran(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "vertex_started")
        .map(|e| e["name"].as_str().unwrap_or("").to_string())
        .filter(|n| !n.contains("load build context"))
        .collect()
}

fn layer_entries(layout: &Path) -> Vec<Vec<String>> {
    common::layout_layers(layout, "")
        .into_iter()
        .map(|mut ar| {
            ar.entries()
                .expect("entries")
                .map(|e| e.expect("entry").path().expect("path").to_string_lossy().into_owned())
                .collect()
        })
        .collect()
}

#[test]
fn multi_stage_build_exports_the_expected_files_and_config() {
    if !can_build() {
        return;
    }
    let s = Setup::new("multistage");
    s.write(
        "Dockerfile",
        r#"FROM busybox AS base
ENV GREETING=hello
WORKDIR /work/dir
RUN echo "$GREETING" > greeting && mkdir -p /gone/deep && echo x > /gone/deep/file && echo y > /keep
RUN rm -rf /gone && ln -s /keep /link
ADD files.tar /unpacked/
COPY --chown=app:app ctx.txt /home/app/
USER app
RUN id -u > /tmp/uid && touch /home/app/made-by-app

FROM busybox AS other
RUN echo other > /other.txt

FROM base
COPY --from=other /other.txt /
CMD ["cat", "/work/dir/greeting"]
"#,
    );
    s.write("ctx.txt", "from the context\n");
    // A tar for ADD to unpack.
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o640);
    h.set_mtime(1_600_000_000);
    t.append_data(&mut h, "inner/a.txt", &b"in tar"[..]).expect("tar");
    std::fs::write(s.ctx().join("files.tar"), t.into_inner().expect("tar")).expect("write tar");

    let oci = s.dir.join("out.tar");
    let docker = s.dir.join("docker.tar");
    let local = s.dir.join("local");
    let flat = s.dir.join("flat.tar");
    let out = s.build(&[
        "--progress",
        "plain",
        "-t",
        "example.com/app:1",
        "-t",
        "app:latest",
        "-o",
        &format!("type=oci,dest={}", oci.display()),
        "-o",
        &format!("type=docker,dest={}", docker.display()),
        "-o",
        &format!("type=local,dest={}", local.display()),
        "-o",
        &format!("type=tar,dest={}", flat.display()),
    ]);
    ok(&out);
    let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");

    let unpacked = s.dir.join("unpacked");
    umoci_unpack(&oci, "example.com/app:1", &unpacked);
    let rootfs = unpacked.join("rootfs");
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("work/dir/greeting"), "hello\n");
    assert!(!rootfs.join("gone").exists(), "rm in a later step removes the directory");
    assert_eq!(std::fs::read_link(rootfs.join("link")).expect("symlink"), Path::new("/keep"));
    assert_eq!(read("unpacked/inner/a.txt"), "in tar");
    assert_eq!(
        std::fs::metadata(rootfs.join("unpacked/inner/a.txt")).expect("stat").mode() & 0o777,
        0o640
    );
    let ctx_file = std::fs::metadata(rootfs.join("home/app/ctx.txt")).expect("ctx.txt");
    assert_eq!((ctx_file.uid(), ctx_file.gid()), (1000, 1000), "--chown=app:app");
    assert_eq!(read("home/app/ctx.txt"), "from the context\n");
    assert_eq!(read("tmp/uid"), "1000\n", "USER app runs as uid 1000");
    assert_eq!(std::fs::metadata(rootfs.join("home/app/made-by-app")).expect("stat").uid(), 1000);
    assert_eq!(read("other.txt"), "other\n");
    // No mount points leak into the image.
    assert!(!rootfs.join("etc/hosts").exists() && !rootfs.join("etc/resolv.conf").exists());

    // The whiteout is in the layer of the `rm` step.
    let layers = layer_entries(&s.dir.join("unpacked.layout"));
    assert!(layers.iter().any(|l| l.iter().any(|p| p == ".wh.gone")), "{layers:?}");

    let config: Value = serde_json::from_slice(&std::fs::read(unpacked.join("config.json")).expect("config")).expect("json");
    assert_eq!(config["process"]["args"], serde_json::json!(["cat", "/work/dir/greeting"]));
    assert_eq!(config["process"]["cwd"], "/work/dir");
    assert_eq!(config["process"]["user"]["uid"], 1000);
    assert!(config["process"]["env"]
        .as_array()
        .expect("env")
        .iter()
        .any(|e| e == "GREETING=hello"));

    // Image config: one diff id per layer, one non-empty history entry per layer.
    let layout = s.dir.join("unpacked.layout");
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index")).expect("json");
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    let names: Vec<&str> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .collect();
    assert_eq!(names, ["example.com/app:1", "docker.io/library/app:latest"], "several tags");
    let blob = |d: &str| std::fs::read(layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).expect("blob");
    let manifest: Value = serde_json::from_slice(&blob(&digest)).expect("manifest");
    let image: Value = serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().expect("config"))).expect("config");
    let n_layers = manifest["layers"].as_array().expect("layers").len();
    assert_eq!(image["rootfs"]["diff_ids"].as_array().expect("diff_ids").len(), n_layers);
    let non_empty = image["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|h| h["empty_layer"] != true)
        .count();
    assert_eq!(non_empty, n_layers);
    // base, WORKDIR (a mkdir, a layer as in BuildKit), RUN, RUN, ADD, COPY, RUN, COPY --from.
    assert_eq!(n_layers, 8, "{manifest}");
    assert_eq!(image["config"]["User"], "app");
    assert_eq!(image["config"]["WorkingDir"], "/work/dir");
    assert!(image["created"].is_string());

    if common::have("skopeo") {
        let out = Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}:example.com/app:1", oci.display()))
            .output()
            .expect("skopeo");
        assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
        let out = Command::new("skopeo")
            .arg("inspect")
            .arg(format!("docker-archive:{}", docker.display()))
            .output()
            .expect("skopeo");
        assert!(
            out.status.success(),
            "skopeo docker-archive: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // docker load format: manifest.json with the tag.
    let dl = Command::new("tar")
        .arg("xOf")
        .arg(&docker)
        .arg("manifest.json")
        .output()
        .expect("tar");
    let dm: Value = serde_json::from_slice(&dl.stdout).expect("manifest.json");
    assert_eq!(
        dm[0]["RepoTags"],
        serde_json::json!(["example.com/app:1", "app:latest"]),
        "several tags"
    );
    assert_eq!(dm[0]["Layers"].as_array().expect("layers").len(), n_layers);

    // type=local and type=tar carry the same files.
    assert_eq!(std::fs::read_to_string(local.join("work/dir/greeting")).expect("local"), "hello\n");
    assert_eq!(std::fs::metadata(local.join("home/app/made-by-app")).expect("stat").uid(), 1000);
    let names = Command::new("tar").arg("tf").arg(&flat).output().expect("tar");
    let names = String::from_utf8_lossy(&names.stdout);
    assert!(names.lines().any(|l| l.trim_end_matches('/') == "work/dir/greeting"), "{names}");
    assert!(!names.contains("gone"));

    // The store has it; `kiln images` lists it.
    let images = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_GC", "off")
        .args(["images", "--no-trunc"])
        .env("KILN_ROOT", s.root())
        .output()
        .expect("images");
    let listing = String::from_utf8_lossy(&images.stdout);
    assert!(listing.contains("example.com/app:1") && listing.contains(&digest), "{listing}");
}

#[test]
fn rebuilds_run_only_what_changed() {
    if !can_build() {
        return;
    }
    let s = Setup::new("rebuild");
    s.write(
        "Dockerfile",
        "FROM busybox\nCOPY a.txt /a.txt\nRUN cat /a.txt > /copy-a\nCOPY b.txt /b.txt\nRUN cat /b.txt > /copy-b\n",
    );
    s.write("a.txt", "a1\n");
    s.write("b.txt", "b1\n");
    let (out, events) = s.build_events(&["-t", "rebuild:1"]);
    ok(&out);
    assert_eq!(ran(&events).len(), 5, "{:?}", ran(&events));
    let first = String::from_utf8_lossy(&out.stdout).trim().to_string();

    // Nothing changed: nothing runs, same image.
    let (out, events) = s.build_events(&["-t", "rebuild:1"]);
    ok(&out);
    assert_eq!(ran(&events), Vec::<String>::new());
    assert_eq!(count(&events, "vertex_cached"), 5);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        first,
        "a cached rebuild gives the same image"
    );

    // b.txt changed: only the steps after COPY b.txt run.
    s.write("b.txt", "b2\n");
    let (out, events) = s.build_events(&["-t", "rebuild:1"]);
    ok(&out);
    let r = ran(&events);
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r[0].contains("COPY b.txt") && r[1].contains("RUN cat /b.txt"), "{r:?}");

    // An unrelated file in the context changes nothing.
    s.write("unrelated.txt", "x\n");
    let (out, events) = s.build_events(&["-t", "rebuild:1"]);
    ok(&out);
    assert_eq!(ran(&events), Vec::<String>::new());

    // --no-cache runs everything again.
    let (out, events) = s.build_events(&["--no-cache"]);
    ok(&out);
    assert_eq!(ran(&events).len(), 5);
}

#[test]
fn a_bind_mount_from_the_context_is_keyed_on_what_it_mounts() {
    if !can_build() {
        return;
    }
    // The pattern Docker's guides teach: a bind mount of one context file
    // for a dependency step, the sources copied later.
    let s = Setup::new("bind-key");
    s.write(
        "Dockerfile",
        "FROM busybox\n\
         RUN --mount=type=bind,source=deps.txt,target=/deps.txt cat /deps.txt > /installed\n\
         RUN --mount=type=bind,source=conf,target=/conf cat /conf/a > /conf-a\n\
         COPY app.py /app.py\n",
    );
    s.write("deps.txt", "dep-1\n");
    s.write("conf/a", "a1\n");
    s.write("app.py", "print(1)\n");
    let (out, events) = s.build_events(&[]);
    ok(&out);
    assert_eq!(ran(&events).len(), 4, "{:?}", ran(&events));

    // The app changed: the mounting steps are cache hits.
    s.write("app.py", "print(2)\n");
    let (out, events) = s.build_events(&[]);
    ok(&out);
    let r = ran(&events);
    assert_eq!(r.len(), 1, "only the COPY runs: {r:?}");
    assert!(r[0].contains("COPY app.py"), "{r:?}");

    // What a step mounts changed: that step (and what follows it) runs.
    s.write("deps.txt", "dep-2\n");
    let (out, events) = s.build_events(&[]);
    ok(&out);
    let r = ran(&events);
    assert!(r.iter().any(|n| n.contains("cat /deps.txt")), "{r:?}");
    s.write("conf/b", "new file in the mounted directory\n");
    let (out, events) = s.build_events(&[]);
    ok(&out);
    let r = ran(&events);
    assert!(
        r.iter().any(|n| n.contains("cat /conf/a")),
        "a file added under a mounted directory counts: {r:?}"
    );
    assert!(!r.iter().any(|n| n.contains("cat /deps.txt")), "{r:?}");
}

#[test]
fn a_stage_that_remakes_the_same_files_leaves_its_readers_cached() {
    if !can_build() {
        return;
    }
    // The build stage reads the whole context and writes a stamp that
    // differs on every run; the final stage reads only /out/bin of it.
    let s = Setup::new("stage-content-key");
    s.write(
        "Dockerfile",
        "FROM busybox AS build\n\
         COPY . /src\n\
         RUN mkdir /out && cat /src/used.txt > /out/bin && chmod $(cat /src/mode.txt) /out/bin && cat /proc/sys/kernel/random/uuid > /out/stamp\n\
         FROM busybox\n\
         COPY --from=build /out/bin /copied\n\
         RUN --mount=type=bind,from=build,source=/out/bin,target=/m cat /m > /mounted\n\
         RUN --mount=type=bind,from=build,target=/b cat /b/out/bin > /whole\n",
    );
    s.write("used.txt", "v1\n");
    s.write("mode.txt", "755\n");
    let local = s.dir.join("fs");
    let out_arg = format!("type=local,dest={}", local.display());
    let (out, events) = s.build_events(&["-o", &out_arg]);
    ok(&out);
    assert_eq!(ran(&events).len(), 6, "the base and five steps: {:?}", ran(&events));

    // An unrelated file: the build stage re-runs and makes the same /out/bin
    // (new times, new stamp). What reads only /out/bin stays cached; the
    // whole-stage mount sees the new stamp, so that step runs.
    s.write("unrelated.txt", "x\n");
    let (out, events) = s.build_events(&["-o", &out_arg]);
    ok(&out);
    let r = ran(&events);
    assert_eq!(r.len(), 3, "{r:?}");
    assert!(r[0].contains("COPY . /src") && r[1].contains("RUN mkdir /out"), "{r:?}");
    assert!(r[2].contains("cat /b/out/bin"), "{r:?}");

    // Same bytes, another mode: the copy runs again (the mount's step reads
    // only content through cat, but its key covers the mode too).
    s.write("mode.txt", "700\n");
    let (out, events) = s.build_events(&["-o", &out_arg]);
    ok(&out);
    let r = ran(&events);
    assert!(r.iter().any(|n| n.contains("COPY --from=build /out/bin")), "{r:?}");
    assert!(r.iter().any(|n| n.contains("cat /m > /mounted")), "{r:?}");
    assert_eq!(std::fs::metadata(local.join("copied")).expect("stat").mode() & 0o777, 0o700);

    // New content reaches every reader.
    s.write("used.txt", "v2\n");
    let (out, events) = s.build_events(&["-o", &out_arg]);
    ok(&out);
    assert_eq!(ran(&events).len(), 5, "{:?}", ran(&events));
    for f in ["copied", "mounted", "whole"] {
        assert_eq!(std::fs::read_to_string(local.join(f)).expect("read"), "v2\n", "{f}");
    }
}

#[test]
fn privileged_steps_need_their_entitlement_by_name() {
    if !can_build() {
        return;
    }
    let s = Setup::new("entitlements");
    s.write(
        "Dockerfile",
        "FROM busybox\n\
         RUN echo ran > /first\n\
         RUN --security=insecure grep CapEff /proc/self/status > /caps\n\
         RUN --network=host true\n\
         RUN grep CapEff /proc/self/status > /default-caps\n",
    );
    // Refused before anything runs, at the step's line, naming the flag.
    let (out, events) = s.build_events(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("[Dockerfile:3:1]") && err.contains("--allow security.insecure"),
        "{err}"
    );
    assert!(err.contains("this step was refused"), "{err}");
    assert_eq!(ran(&events), Vec::<String>::new(), "nothing ran");
    let (out, _) = s.build_events(&["--allow", "security.insecure"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("[Dockerfile:4:1]") && err.contains("--allow network.host"), "{err}");

    // Both allowed (comma-separated, as buildx): it builds, and the insecure
    // step has every capability the default step lacks.
    let local = s.dir.join("fs");
    let (out, _) = s.build_events(&[
        "--allow",
        "security.insecure,network.host",
        "-o",
        &format!("type=local,dest={}", local.display()),
    ]);
    ok(&out);
    let caps = |f: &str| {
        let line = std::fs::read_to_string(local.join(f)).expect("caps");
        u64::from_str_radix(line.split_whitespace().nth(1).expect("mask"), 16).expect("hex")
    };
    let (insecure, default) = (caps("caps"), caps("default-caps"));
    assert!(insecure & (1 << 21) != 0, "CAP_SYS_ADMIN when insecure: {insecure:x}");
    assert!(default & (1 << 21) == 0, "no CAP_SYS_ADMIN by default: {default:x}");

    // `--network host` for every step needs it too; unknown names are refused.
    for (args, needle) in [
        (vec!["--network", "host"], "--allow network.host"),
        (vec!["--allow", "device"], "unknown entitlement"),
    ] {
        let out = s.build(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// A static x86-64 program that makes two system calls through the i386
/// entry (`int 0x80`), as 32-bit programs do: getpid (20), then
/// unshare(CLONE_NEWUSER) (310). Exit status: 0 when getpid works and unshare
/// is refused with EPERM, 1 when getpid fails, 2 when unshare is not refused;
/// killed by SIGSYS when a filter knows no i386 calls.
fn i386_calls_program() -> Vec<u8> {
    #[rustfmt::skip]
    let code: [u8; 51] = [
        0xB8, 20, 0, 0, 0,          // mov eax, 20 (getpid)
        0xCD, 0x80,                 // int 0x80
        0x85, 0xC0,                 // test eax, eax
        0x78, 21,                   // js fail1
        0xB8, 0x36, 0x01, 0, 0,     // mov eax, 310 (unshare)
        0xBB, 0, 0, 0, 0x10,        // mov ebx, CLONE_NEWUSER
        0xCD, 0x80,                 // int 0x80
        0x83, 0xF8, 0xFF,           // cmp eax, -1 (-EPERM)
        0x75, 11,                   // jne fail2
        0x31, 0xFF,                 // xor edi, edi
        0xEB, 12,                   // jmp exit
        0xBF, 1, 0, 0, 0,           // fail1: mov edi, 1
        0xEB, 5,                    // jmp exit
        0xBF, 2, 0, 0, 0,           // fail2: mov edi, 2
        0xB8, 60, 0, 0, 0,          // exit: mov eax, 60 (x86-64 exit)
        0x0F, 0x05,                 // syscall
    ];
    let base: u64 = 0x40_0000;
    let headers = 64 + 56;
    let size = (headers + code.len()) as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7F, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3Eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(base + headers as u64).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no sections
    elf.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0, base, base, size, size, 0x1000] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&code);
    elf
}

#[test]
fn steps_run_under_buildkits_seccomp_filter_unless_insecure() {
    if !can_build() {
        return;
    }
    let s = Setup::new("seccomp");
    s.write(
        "Dockerfile",
        "FROM busybox\n\
         RUN grep '^Seccomp:' /proc/self/status > /filter; \
             unshare -U -r true 2> /userns; echo $? >> /userns; \
             chroot / true && ping -c 1 -W 1 127.0.0.1 > /dev/null && echo allowed > /everyday\n\
         RUN --security=insecure grep '^Seccomp:' /proc/self/status > /insecure-filter; \
             unshare -U -r true; echo $? > /insecure-userns\n",
    );
    // 32-bit programs keep their system calls (the filter covers the i386
    // entry too, and refuses the same calls there).
    let i386 = cfg!(target_arch = "x86_64").then(i386_calls_program);
    if let Some(program) = &i386 {
        use std::os::unix::fs::PermissionsExt;
        let path = s.ctx().join("i386");
        std::fs::write(&path, program).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // On the host (root, no filter) unshare works: exit 2.
        let host = Command::new(&path).status().expect("runs on the host");
        assert_eq!(host.code(), Some(2), "the i386 entry works on this kernel: {host:?}");
        let mut dockerfile = std::fs::read_to_string(s.ctx().join("Dockerfile")).expect("read");
        dockerfile.push_str("COPY i386 /i386\nRUN /i386; echo $? > /i386-status\n");
        s.write("Dockerfile", &dockerfile);
    }
    let local = s.dir.join("fs");
    let out = s.build(&[
        "--allow",
        "security.insecure",
        "-o",
        &format!("type=local,dest={}", local.display()),
    ]);
    ok(&out);
    let read = |f: &str| std::fs::read_to_string(local.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    assert_eq!(read("filter").split_whitespace().nth(1), Some("2"), "a filter: {}", read("filter"));
    let userns = read("userns");
    assert!(
        userns.contains("Operation not permitted") && userns.trim_end().ends_with('1'),
        "no new user namespace: {userns}"
    );
    assert_eq!(read("everyday"), "allowed\n", "chroot and a raw socket (the step's capabilities)");
    assert_eq!(read("insecure-filter").split_whitespace().nth(1), Some("0"));
    assert_eq!(read("insecure-userns"), "0\n", "--security=insecure: no filter");
    if i386.is_some() {
        assert_eq!(read("i386-status"), "0\n", "i386 getpid allowed, i386 unshare refused");
    }
}

#[test]
fn steps_get_their_own_network_without_the_hosts_loopback() {
    if !can_build() {
        return;
    }
    // A service on the host's loopback only (a database, a Docker API on a
    // CI runner), and one on every interface, reached from outside.
    let private = serve("127.0.0.1:0", "HOST-LOOPBACK\n").port();
    let public = serve("0.0.0.0:0", "OUTSIDE\n").port();
    let host_ip = host_address();
    let s = Setup::new("netns");
    let ifaces = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort";
    s.write(
        "Dockerfile",
        &format!(
            "FROM busybox\n\
             RUN {ifaces} > /ifaces; cp /etc/resolv.conf /resolv; cp /etc/hosts /hosts-file; \\\n\
                 nc -w 2 127.0.0.1 {private} </dev/null > /loopback 2>&1; \\\n\
                 nc -w 2 10.0.2.2 {private} </dev/null > /gateway 2>&1; \\\n\
                 nc -w 5 {host_ip} {public} </dev/null > /outside 2>&1; true\n\
             RUN --network=none {ifaces} > /ifaces-none\n\
             RUN --network=host nc -w 2 127.0.0.1 {private} </dev/null > /host-net 2>&1; true\n"
        ),
    );
    let local = s.dir.join("fs");
    let (out, _) = s.build_events(&[
        "--allow",
        "network.host",
        "--add-host",
        "DB.internal:10.9.8.7",
        "-o",
        &format!("type=local,dest={}", local.display()),
    ]);
    ok(&out);
    let read = |f: &str| std::fs::read_to_string(local.join(f)).expect(f);
    assert_eq!(
        read("ifaces"),
        "lo\ntap0\n",
        "its own loopback and the NAT's interface, none of the host's"
    );
    assert!(!read("loopback").contains("HOST-LOOPBACK"), "{}", read("loopback"));
    assert!(!read("gateway").contains("HOST-LOOPBACK"), "{}", read("gateway"));
    assert_eq!(read("outside"), "OUTSIDE\n", "outbound connections work");
    assert!(!read("resolv").lines().any(|l| l.contains("nameserver 127.")), "{}", read("resolv"));
    assert!(read("hosts-file").contains("localhost buildkitsandbox"), "{}", read("hosts-file"));
    assert!(
        read("hosts-file").contains("10.9.8.7\tdb.internal\n"),
        "--add-host: {}",
        read("hosts-file")
    );
    assert_eq!(read("ifaces-none"), "lo\n");
    assert_eq!(read("host-net"), "HOST-LOOPBACK\n", "--network=host, allowed, is the host's");
    // Nothing of the namespaces is left.
    assert_eq!(mounts_under(&s.root()), Vec::<String>::new(), "no leftover mounts");
}

#[test]
fn independent_stages_run_at_once() {
    if !can_build() {
        return;
    }
    let s = Setup::new("parallel");
    let mut df = String::new();
    for i in 1..=8 {
        df.push_str(&format!("FROM busybox AS s{i}\nRUN sleep 1 && echo x{i} > /out\n\n"));
    }
    df.push_str("FROM busybox\n");
    for i in 1..=8 {
        df.push_str(&format!("COPY --from=s{i} /out /out{i}\n"));
    }
    s.write("Dockerfile", &df);
    let local = s.dir.join("fs");
    let (out, events) = s.build_events(&["-o", &format!("type=local,dest={}", local.display())]);
    ok(&out);
    // Every sleeping step started before the first one finished.
    let sleeps: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "vertex_started" && e["name"].as_str().unwrap_or("").contains("sleep 1"))
        .filter_map(|e| e["digest"].as_str())
        .collect();
    assert_eq!(sleeps.len(), 8);
    let pos = |kind: &str, d: &str| events.iter().position(|e| e["type"] == kind && e["digest"] == d).expect("event");
    let last_start = sleeps.iter().map(|d| pos("vertex_started", d)).max().expect("max");
    let first_done = sleeps.iter().map(|d| pos("vertex_completed", d)).min().expect("min");
    assert!(last_start < first_done, "the 8 stages did not overlap");
    for i in 1..=8 {
        assert_eq!(
            std::fs::read_to_string(local.join(format!("out{i}"))).expect("out"),
            format!("x{i}\n")
        );
    }
    // --jobs 1 serialises them.
    let (out, events) = s.build_events(&["--no-cache", "--jobs", "1"]);
    ok(&out);
    let mut running = 0;
    for e in &events {
        let sleeping = e["name"].as_str().unwrap_or("").contains("sleep 1");
        if e["type"] == "vertex_started" && sleeping {
            running += 1;
            assert!(running <= 1, "--jobs 1 ran two steps at once");
        }
        if e["type"] == "vertex_completed" && sleeps.contains(&e["digest"].as_str().unwrap_or("")) {
            running -= 1;
        }
    }
}

fn mounts_under(path: &Path) -> Vec<String> {
    let p = path.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&p))
        .collect()
}

fn containers(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("runc"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn a_failing_step_names_its_line_shows_its_output_and_cleans_up() {
    if !can_build() {
        return;
    }
    let s = Setup::new("failing");
    s.write(
        "Dockerfile",
        "FROM busybox AS slow\nRUN sleep 30\n\nFROM busybox\nRUN echo boom-output && echo to-stderr >&2 && exit 3\nCOPY --from=slow /etc/passwd /p\n",
    );
    let started = std::time::Instant::now();
    let out = s.build(&["--progress", "plain"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "a failed step exits 4:\n{err}");
    assert!(err.contains("[Dockerfile:5:1]"), "names the line:\n{err}");
    assert!(err.contains("boom-output") && err.contains("to-stderr"), "shows the output:\n{err}");
    assert!(err.contains("exit code: 3"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(25),
        "the slow sibling was cancelled"
    );
    assert_eq!(mounts_under(&s.root()), Vec::<String>::new(), "no leftover mounts");
    assert_eq!(containers(&s.root()), Vec::<String>::new(), "no leftover containers");
    // A frontend error is exit 1, a usage error 2.
    s.write("Dockerfile", "FROM busybox\nRUNN x\n");
    assert_eq!(s.build(&[]).status.code(), Some(1));
    assert_eq!(s.build(&["--output", "type=zip,dest=x"]).status.code(), Some(2));
}

#[test]
fn a_build_killed_mid_way_leaves_a_usable_root() {
    if !can_build() {
        return;
    }
    let s = Setup::new("sigkill");
    s.write(
        "Dockerfile",
        "FROM busybox\nRUN echo one > /one\nRUN echo started && sleep 30\nRUN echo three > /three\n",
    );
    let base = s.base_arg();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_GC", "off")
        .args(["build", "--progress", "rawjson", "--build-context", &base])
        .arg(s.ctx())
        .env("KILN_ROOT", s.root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln");
    let stderr = child.stderr.take().expect("stderr");
    let mut saw = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("line");
        if line.contains("\"type\":\"log\"") && line.contains("started") {
            saw = true;
            break;
        }
    }
    assert!(saw, "the long step started");
    // SIGKILL the CLI and the solver: nothing gets to clean up.
    let solver = children_of(child.id());
    let _ = Command::new("kill").arg("-9").arg(child.id().to_string()).status();
    for pid in &solver {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
    }
    let _ = child.wait();
    assert!(!solver.is_empty(), "the solver ran as a child");
    for _ in 0..50 {
        if solver.iter().all(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Replace the long step and build again on the same root.
    s.write(
        "Dockerfile",
        "FROM busybox\nRUN echo one > /one\nRUN echo quick\nRUN echo three > /three\n",
    );
    let local = s.dir.join("fs");
    let (out, events) = s.build_events(&["-o", &format!("type=local,dest={}", local.display())]);
    ok(&out);
    let r = ran(&events);
    assert!(
        !r.iter().any(|n| n.contains("echo one")),
        "the step finished before the kill is cached: {r:?}"
    );
    assert_eq!(std::fs::read_to_string(local.join("three")).expect("three"), "three\n");
    assert_eq!(mounts_under(&s.root()), Vec::<String>::new(), "stale mounts removed");
    assert_eq!(containers(&s.root()), Vec::<String>::new(), "stale containers removed");
    let tmp: Vec<_> = std::fs::read_dir(s.root().join("tmp")).expect("tmp").flatten().collect();
    assert!(tmp.is_empty(), "stale temp dirs removed");
}

#[test]
fn a_cancelled_build_stops_its_steps_at_once_and_caches_none_of_them() {
    if !can_build() {
        return;
    }
    let s = Setup::new("cancel");
    let token = format!("cancel-token-{}", std::process::id());
    s.write(
        "Dockerfile",
        &format!("FROM busybox\nRUN echo one > /one\nRUN echo started && sleep 60 && echo {token} > /marker\n"),
    );
    let base = s.base_arg();
    // The second round proves the first cached nothing: the step starts again.
    for (signal, code) in [("TERM", 143), ("INT", 130)] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_GC", "off")
            .args(["build", "--progress", "rawjson", "--build-context", &base])
            .arg(s.ctx())
            .env("KILN_ROOT", s.root())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let saw = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("\"type\":\"log\"") && l.contains("started"));
        assert!(saw, "SIG{signal} round: the long step started (it was not cached)");
        assert!(!processes_with(&token).is_empty(), "the step's shell runs");
        let solver = children_of(child.id());
        assert!(!solver.is_empty(), "the solver runs as a child");
        // Only the CLI is signalled, as CI runners cancel a job.
        let sent = std::time::Instant::now();
        let _ = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status();
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait().expect("wait");
        let took = sent.elapsed();
        assert_eq!(status.code(), Some(code), "SIG{signal} exits {code}: {rest:?}");
        assert!(took < std::time::Duration::from_secs(5), "kiln stopped {took:?} after SIG{signal}");
        assert!(
            rest.iter().any(|l| l.contains(&format!("interrupted by SIG{signal}"))),
            "says why it stopped: {rest:?}"
        );
        assert!(
            solver.iter().all(|p| !Path::new(&format!("/proc/{p}")).exists()),
            "the solver is gone when kiln exits"
        );
        assert_eq!(processes_with(&token), Vec::<u32>::new(), "the step's processes are gone");
        // The step's slirp4netns (named by its namespace under the root) stops
        // when the solver's end closes its exit fd.
        let root = s.root().to_string_lossy().into_owned();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !processes_with(&root).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(processes_with(&root), Vec::<u32>::new(), "no process of this root is left");
        assert_eq!(mounts_under(&s.root()), Vec::<String>::new(), "no mounts left");
        assert_eq!(containers(&s.root()), Vec::<String>::new(), "no containers left");
        for dir in ["tmp", "mnt"] {
            let left: Vec<_> = std::fs::read_dir(s.root().join(dir)).expect("dir").flatten().collect();
            assert!(left.is_empty(), "nothing left in {dir}/: {left:?}");
        }
    }
    // The root stays usable and keeps what finished before the signal.
    s.write("Dockerfile", "FROM busybox\nRUN echo one > /one\nRUN echo quick\n");
    let (out, events) = s.build_events(&[]);
    ok(&out);
    assert!(!ran(&events).iter().any(|n| n.contains("echo one")), "finished steps stay cached");
}

#[test]
fn two_builds_sharing_a_root_at_once_both_succeed() {
    if !can_build() {
        return;
    }
    let s = Setup::new("shared-root");
    s.write(
        "Dockerfile",
        "FROM busybox\nARG N\nRUN echo $N > /n && sleep 0.3\nRUN cat /n > /m\n",
    );
    let base = s.base_arg();
    let spawn = |n: &str, tag: &str| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_GC", "off")
            .args([
                "build",
                "--progress",
                "plain",
                "--build-context",
                &base,
                "--build-arg",
                &format!("N={n}"),
                "-t",
                tag,
            ])
            .arg(s.ctx())
            .env("KILN_ROOT", s.root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln")
    };
    let a = spawn("1", "shared:a");
    let b = spawn("2", "shared:b");
    ok(&a.wait_with_output().expect("a"));
    ok(&b.wait_with_output().expect("b"));
    let images = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_GC", "off")
        .arg("images")
        .env("KILN_ROOT", s.root())
        .output()
        .expect("images");
    let listing = String::from_utf8_lossy(&images.stdout);
    assert!(listing.contains("shared:a") && listing.contains("shared:b"), "{listing}");
}

#[test]
fn bases_come_from_a_registry_and_from_kiln_s_own_store() {
    if !can_build() || !common::have("docker-registry") || !common::have("skopeo") {
        return;
    }
    let s = Setup::new("registry");
    let registry = common::LocalRegistry::start(&s.dir.join("registry"));
    registry.push_layout(&s.dir.join("base"), "latest", "test/busybox");
    s.write(
        "Dockerfile",
        &format!("FROM {}/test/busybox:latest\nRUN echo pulled > /pulled\n", registry.addr),
    );
    let out = s.build(&["--progress", "plain", "-t", "local/first:1"]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("done"), "{err}");

    // With the registry gone, a build FROM the image kiln just made (and
    // from the pulled base, remembered by tag) needs nothing from it.
    drop(registry);
    s.write("Dockerfile", "FROM local/first:1\nRUN cat /pulled > /again\n");
    let local = s.dir.join("fs");
    let out = s.build(&["--progress", "plain", "-o", &format!("type=local,dest={}", local.display())]);
    ok(&out);
    assert_eq!(std::fs::read_to_string(local.join("again")).expect("again"), "pulled\n");
    let images = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_GC", "off")
        .arg("images")
        .env("KILN_ROOT", s.root())
        .output()
        .expect("images");
    let listing = String::from_utf8_lossy(&images.stdout);
    assert!(
        listing.contains("docker.io/local/first:1") && listing.contains("/test/busybox:latest"),
        "{listing}"
    );
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).expect("stat");
            let rel = p.strip_prefix(dir).expect("prefix").to_string_lossy().into_owned();
            let what = if m.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).expect("link").display())
            } else {
                std::fs::read_to_string(&p).map(|c| c.len().to_string()).unwrap_or_default()
            };
            out.push(format!("{rel} {:o} {}:{} {what}", m.mode() & 0o7777, m.uid(), m.gid()));
        }
    }
    out.sort();
    out
}

#[test]
fn the_copying_snapshotter_builds_the_same_files() {
    if !can_build() {
        return;
    }
    let s = Setup::new("copy-snapshotter");
    s.write(
        "Dockerfile",
        "FROM busybox\nRUN mkdir -p /gone/deep && echo x > /gone/deep/f && echo y > /etc/added\nRUN rm -rf /gone /etc/group && ln -s /etc/added /link\nCOPY --chown=app ctx.txt /home/app/\nUSER app\nRUN echo mine > /home/app/mine\n",
    );
    s.write("ctx.txt", "ctx\n");
    let overlay_dir = s.dir.join("overlay-fs");
    let out = s.build_env(
        &["--progress", "plain", "-o", &format!("type=local,dest={}", overlay_dir.display())],
        &[("KILN_SNAPSHOTTER", "overlayfs")],
    );
    ok(&out);
    std::fs::remove_dir_all(s.root()).expect("fresh root");
    let copy_dir = s.dir.join("copy-fs");
    let oci = s.dir.join("copy.tar");
    let out = s.build_env(
        &[
            "--progress",
            "plain",
            "-o",
            &format!("type=local,dest={}", copy_dir.display()),
            "-o",
            &format!("type=oci,dest={},name=copy:1", oci.display()),
        ],
        &[("KILN_SNAPSHOTTER", "copy")],
    );
    ok(&out);
    assert_eq!(listing(&copy_dir), listing(&overlay_dir));
    assert!(!copy_dir.join("gone").exists() && !copy_dir.join("etc/group").exists());
    assert_eq!(
        mounts_under(&s.root()),
        Vec::<String>::new(),
        "the copying snapshotter mounts nothing"
    );
    // Its layers carry the deletions as whiteouts too.
    umoci_unpack(&oci, "docker.io/library/copy:1", &s.dir.join("copy-unpacked"));
    let layers = layer_entries(&s.dir.join("copy-unpacked.layout"));
    assert!(
        layers
            .iter()
            .any(|l| l.iter().any(|p| p == ".wh.gone") && l.iter().any(|p| p == "etc/.wh.group")),
        "{layers:?}"
    );
    let tmp: Vec<_> = std::fs::read_dir(s.root().join("tmp")).expect("tmp").flatten().collect();
    assert!(tmp.is_empty(), "no temp dirs left: {tmp:?}");
}

#[test]
fn the_context_honours_dockerignore() {
    if !can_build() {
        return;
    }
    let s = Setup::new("dockerignore");
    s.write("Dockerfile", "FROM busybox\nCOPY . /all/\nRUN ls -R /all > /listing\n");
    s.write(".dockerignore", "*.log\nsecret/\n!secret/public.txt\n");
    s.write("keep.txt", "k\n");
    s.write("debug.log", "noise\n");
    s.write("secret/key", "s3cr3t\n");
    s.write("secret/public.txt", "p\n");
    s.write("sub/deep.txt", "d\n");
    let local = s.dir.join("fs");
    let (out, _) = s.build_events(&["-o", &format!("type=local,dest={}", local.display())]);
    ok(&out);
    assert!(local.join("all/keep.txt").is_file() && local.join("all/sub/deep.txt").is_file());
    assert!(!local.join("all/debug.log").exists(), "*.log ignored");
    assert!(!local.join("all/secret/key").exists(), "secret/ ignored");
    assert!(local.join("all/secret/public.txt").is_file(), "!exception kept");
    // Changing an ignored file changes nothing; changing a used one re-runs.
    s.write("debug.log", "more noise\n");
    let (out, events) = s.build_events(&[]);
    ok(&out);
    assert_eq!(ran(&events), Vec::<String>::new());
    s.write("keep.txt", "k2\n");
    let (out, events) = s.build_events(&[]);
    ok(&out);
    assert_eq!(ran(&events).len(), 2);
}

/// Every byte of an OCI tarball, with each gzip layer decompressed.
fn all_bytes(tarball: &Path) -> Vec<u8> {
    let mut out = std::fs::read(tarball).expect("tarball");
    let mut ar = tar::Archive::new(std::fs::File::open(tarball).expect("open"));
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut buf).expect("read");
        if buf.starts_with(&[0x1f, 0x8b]) {
            let mut plain = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(buf.as_slice()), &mut plain).expect("gunzip");
            out.extend(plain);
        }
        out.extend(buf);
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn secrets_reach_the_step_and_nothing_else() {
    if !can_build() {
        return;
    }
    let s = Setup::new("secrets");
    let value = "s3cr3t-VALUE-7f1d";
    let env_value = "env-SECRET-9a2c";
    std::fs::write(s.dir.join("token.txt"), value).expect("secret file");
    s.write(
        "Dockerfile",
        "FROM busybox\n\
         RUN --mount=type=secret,id=tok cat /run/secrets/tok | wc -c > /len\n\
         RUN --mount=type=secret,id=envtok,env=TOKEN,required sh -c 'echo ${#TOKEN} > /envlen; echo \"[$TOKEN]\" | wc -c'\n\
         RUN --mount=type=secret,id=tok,target=/etc/app.key,mode=0440,uid=1000 stat -c '%a %u' /etc/app.key > /keyperm\n",
    );
    let oci = s.dir.join("out.tar");
    let secret_arg = format!("id=tok,src={}", s.dir.join("token.txt").display());
    let out_arg = format!("type=oci,dest={},name=sec:1", oci.display());
    let out = s.build_env(
        &[
            "--progress",
            "rawjson",
            "--secret",
            &secret_arg,
            "--secret",
            "id=envtok,env=KILN_TEST_TOKEN",
            "-o",
            &out_arg,
        ],
        &[("KILN_TEST_TOKEN", env_value)],
    );
    ok(&out);
    let unpacked = s.dir.join("unpacked");
    umoci_unpack(&oci, "docker.io/library/sec:1", &unpacked);
    let rootfs = unpacked.join("rootfs");
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("len").trim(), value.len().to_string());
    assert_eq!(read("envlen").trim(), env_value.len().to_string());
    assert_eq!(read("keyperm").trim(), "440 1000");
    assert!(
        !rootfs.join("run/secrets").exists() && !rootfs.join("etc/app.key").exists(),
        "mount points do not stay"
    );
    // Not in any exported byte, layer, config or event.
    let bytes = all_bytes(&oci);
    for v in [value, env_value] {
        assert!(!contains(&bytes, v.as_bytes()), "{v} leaked into the image");
        assert!(
            !contains(&out.stderr, v.as_bytes()) && !contains(&out.stdout, v.as_bytes()),
            "{v} leaked into the events"
        );
    }
    // Nor anywhere in the state root.
    let grep = Command::new("grep")
        .args(["-r", "-l", "-a", value])
        .arg(s.root())
        .output()
        .expect("grep");
    assert!(
        grep.stdout.is_empty(),
        "found in the state root: {}",
        String::from_utf8_lossy(&grep.stdout)
    );

    // A required secret that is not given stops the build before anything runs.
    let (out, events) = s.build_events(&["--no-cache", "--secret", &secret_arg]);
    assert!(!out.status.success());
    assert_eq!(count(&events, "vertex_started"), 0, "nothing ran");
    let last = events.last().expect("events");
    assert_eq!(last["type"], "error");
    assert!(last["message"].as_str().unwrap_or("").contains("envtok"), "{last}");
}

#[test]
fn source_date_epoch_makes_builds_reproducible() {
    if !can_build() {
        return;
    }
    let s = Setup::new("reproducible");
    s.write(
        "Dockerfile",
        "FROM busybox\nRUN mkdir -p /app && echo built > /app/out && touch /app/stamp\nCOPY src/ /app/src/\nCMD [\"cat\", \"/app/out\"]\n",
    );
    s.write("src/a.txt", "a\n");
    let mut digests = Vec::new();
    for round in 0..2 {
        let _ = std::fs::remove_dir_all(s.root());
        let meta = s.dir.join(format!("meta-{round}.json"));
        let iid = s.dir.join(format!("iid-{round}"));
        let out = s.build_env(
            &[
                "--progress",
                "plain",
                "-t",
                "repro:1",
                "--metadata-file",
                meta.to_str().expect("utf8"),
                "--iidfile",
                iid.to_str().expect("utf8"),
            ],
            &[("SOURCE_DATE_EPOCH", "1700000000")],
        );
        ok(&out);
        let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let m: Value = serde_json::from_slice(&std::fs::read(&meta).expect("metadata file")).expect("json");
        assert_eq!(m["containerimage.digest"], digest.as_str());
        assert_eq!(m["image.name"], "repro:1");
        let id = std::fs::read_to_string(&iid).expect("iidfile");
        assert_eq!(m["containerimage.config.digest"], id.as_str());
        digests.push(digest);
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert_eq!(digests[0], digests[1], "two builds on clean roots give the same image");
    // Times in new layers are clamped, and the image says when.
    let oci = s.dir.join("repro.tar");
    let out = s.build_env(
        &[
            "--progress",
            "plain",
            "-o",
            &format!("type=oci,dest={},name=repro:1", oci.display()),
        ],
        &[("SOURCE_DATE_EPOCH", "1700000000")],
    );
    ok(&out);
    let unpacked = s.dir.join("unpacked");
    umoci_unpack(&oci, "docker.io/library/repro:1", &unpacked);
    assert!(std::fs::metadata(unpacked.join("rootfs/app/stamp")).expect("stamp").mtime() <= 1_700_000_000);
    let layout = s.dir.join("unpacked.layout");
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index")).expect("json");
    let blob = |d: &str| std::fs::read(layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).expect("blob");
    let manifest: Value = serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().expect("d"))).expect("m");
    let config: Value = serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().expect("c"))).expect("c");
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
}

#[test]
fn an_ssh_agent_is_forwarded_into_the_step() {
    if !can_build() || !common::have("ssh-agent") {
        return;
    }
    let s = Setup::new("ssh");
    let sock = s.dir.join("agent.sock");
    let agent = Command::new("ssh-agent")
        .arg("-a")
        .arg(&sock)
        .arg("-D")
        .stdout(Stdio::null())
        .spawn()
        .expect("ssh-agent");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Kill(agent);
    for _ in 0..50 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A key in the agent.
    let key = s.dir.join("id_test");
    let gen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-test-key", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(gen.success());
    let add = Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .expect("ssh-add");
    assert!(add.status.success(), "{}", String::from_utf8_lossy(&add.stderr));
    // The step runs the host's ssh-add: copy it and its libraries into the image.
    let ldd = Command::new("ldd").arg("/usr/bin/ssh-add").output().expect("ldd");
    let mut df = String::from("FROM busybox\nCOPY --from=host /usr/bin/ssh-add /usr/bin/ssh-add\n");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) else {
            continue;
        };
        let real = std::fs::canonicalize(path).expect("canonical");
        df.push_str(&format!("COPY --from=host {} {}\n", real.display(), path));
    }
    df.push_str("RUN --mount=type=ssh,required ssh-add -l > /keys && echo \"$SSH_AUTH_SOCK\" > /sockpath\n");
    s.write("Dockerfile", &df);
    let local = s.dir.join("fs");
    let out = s.build(&[
        "--progress",
        "plain",
        "--build-context",
        "host=/",
        "--ssh",
        &format!("default={}", sock.display()),
        "-o",
        &format!("type=local,dest={}", local.display()),
    ]);
    ok(&out);
    let keys = std::fs::read_to_string(local.join("keys")).expect("keys");
    assert!(
        keys.contains("kiln-test-key") && keys.contains("ED25519"),
        "ssh-add -l in the step: {keys}"
    );
    assert_eq!(
        std::fs::read_to_string(local.join("sockpath")).expect("sockpath").trim(),
        "/run/buildkit/ssh_agent.0"
    );
    assert!(!local.join("run/buildkit").exists());
    // Without --ssh: a clear error before anything runs.
    let out = s.build(&["--progress", "plain", "--no-cache", "--build-context", "host=/"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ssh default"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cache_mounts_persist_across_builds_and_share_as_asked() {
    if !can_build() {
        return;
    }
    let s = Setup::new("cache-mounts");
    s.write(
        "Dockerfile",
        "FROM busybox\nARG BUST\n\
         RUN --mount=type=cache,target=/var/cache/pkg,uid=1000,mode=0750 sh -c 'stat -c \"%u %a\" /var/cache/pkg > /cache-owner; if [ -f /var/cache/pkg/pkg.tar ]; then echo HIT; else echo MISS; echo payload > /var/cache/pkg/pkg.tar; fi; cp /var/cache/pkg/pkg.tar /installed; echo $BUST'\n",
    );
    let local = s.dir.join("fs");
    let out_arg = format!("type=local,dest={}", local.display());
    let out = s.build(&["--progress", "plain", "--build-arg", "BUST=1", "-o", &out_arg]);
    ok(&out);
    let said = |out: &Output, word: &str| {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .any(|l| l.ends_with(&format!(" {word}")))
    };
    assert!(said(&out, "MISS"));
    assert_eq!(
        std::fs::read_to_string(local.join("cache-owner")).expect("owner").trim(),
        "1000 750"
    );
    // The step re-runs (BUST changed) and finds what it downloaded before.
    let out = s.build(&["--progress", "plain", "--build-arg", "BUST=2", "-o", &out_arg]);
    ok(&out);
    assert!(said(&out, "HIT") && !said(&out, "MISS"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(local.join("installed")).expect("installed"), "payload\n");
    assert!(!local.join("var/cache/pkg").exists(), "the cache's contents never enter the image");

    // locked: two builds at once never hold the directory together;
    // private: the second build gets a directory of its own.
    for (sharing, expect_own) in [("locked", false), ("private", true)] {
        s.write(
            "Dockerfile",
            &format!(
                "FROM busybox\nARG N\nRUN --mount=type=cache,id=c-{sharing},target=/c,sharing={sharing} sh -c 'mkdir /c/busy || exit 7; ls /c > /seen; sleep 1; rmdir /c/busy; echo $N'\n"
            ),
        );
        let base = s.base_arg();
        let spawn = |n: &str| {
            Command::new(env!("CARGO_BIN_EXE_kiln"))
                .env("KILN_GC", "off")
                .args([
                    "build",
                    "--progress",
                    "plain",
                    "--build-context",
                    &base,
                    "--build-arg",
                    &format!("N={n}"),
                ])
                .arg(s.ctx())
                .env("KILN_ROOT", s.root())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("kiln")
        };
        let started = std::time::Instant::now();
        let a = spawn("a");
        let b = spawn("b");
        ok(&a.wait_with_output().expect("a"));
        ok(&b.wait_with_output().expect("b"));
        let took = started.elapsed();
        let dirs = std::fs::read_dir(s.root().join("cache-mounts"))
            .expect("cache-mounts")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains('-'))
            .count();
        if expect_own {
            assert!(dirs >= 1, "private made a second directory");
        } else {
            assert!(
                took >= std::time::Duration::from_secs(2),
                "locked steps ran one after the other ({took:?})"
            );
        }
    }
}

#[test]
fn images_are_pushed_then_pulled_back_as_bases() {
    if !can_build() || !common::have("docker-registry") || !common::have("skopeo") {
        return;
    }
    let s = Setup::new("push");
    let registry = common::LocalRegistry::start(&s.dir.join("registry"));
    registry.push_layout(&s.dir.join("base"), "latest", "lib/busybox");
    let app = format!("{}/team/app:1", registry.addr);
    s.write(
        "Dockerfile",
        &format!("FROM {}/lib/busybox:latest\nRUN echo pushed > /pushed\n", registry.addr),
    );
    // --push with -t: stored, then pushed; the base layer is mounted from lib/busybox.
    let out = s.build(&["--progress", "plain", "-t", &app, "--push"]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 uploaded") || err.contains("2 uploaded"), "{err}");
    assert!(err.contains("1 mounted"), "the base layer is mounted, not uploaded: {err}");
    // `kiln push` again: nothing is re-sent.
    let push = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_GC", "off")
        .args(["push", &app])
        .env("KILN_ROOT", s.root())
        .output()
        .expect("push");
    let perr = String::from_utf8_lossy(&push.stderr);
    assert!(push.status.success(), "{perr}");
    assert!(perr.contains("0 blobs uploaded") && perr.contains("3 already there"), "{perr}");
    // skopeo sees it; a fresh root builds FROM it through the registry.
    let inspect = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{app}"))
        .output()
        .expect("skopeo");
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    std::fs::remove_dir_all(s.root()).expect("fresh root");
    s.write("Dockerfile", &format!("FROM {app}\nRUN cat /pushed > /pulled\n"));
    let local = s.dir.join("fs");
    let out = s.build(&["--progress", "plain", "-o", &format!("type=local,dest={}", local.display())]);
    ok(&out);
    assert_eq!(std::fs::read_to_string(local.join("pulled")).expect("pulled"), "pushed\n");
}

fn kiln_at(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_GC", "off")
        .args(args)
        .env("KILN_ROOT", root)
        .output()
        .expect("kiln")
}

#[test]
fn du_lists_records_and_prune_removes_the_least_recently_used() {
    if !can_build() {
        return;
    }
    let s = Setup::new("prune");
    s.write(
        "Dockerfile.x",
        "FROM busybox\nRUN echo x > /x && dd if=/dev/zero of=/big bs=1k count=512 2>/dev/null\n",
    );
    s.write("Dockerfile.y", "FROM busybox\nRUN echo y > /y\n");
    let dx = s.ctx().join("Dockerfile.x");
    let dy = s.ctx().join("Dockerfile.y");
    let (dx, dy) = (dx.to_str().expect("utf8"), dy.to_str().expect("utf8"));
    ok(&s.build(&["-f", dx, "-t", "x:1"]));
    let du = kiln_at(&s.root(), &["du"]);
    let listing = String::from_utf8_lossy(&du.stdout);
    assert!(
        du.status.success() && listing.contains("RUN echo x") && listing.contains("FROM"),
        "{listing}"
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    ok(&s.build(&["-f", dy]));
    // Records not used in the last 2 s: x's step (the base was used again by y).
    let pruned = kiln_at(&s.root(), &["prune", "--filter", "until=2s"]);
    assert!(pruned.status.success(), "{}", String::from_utf8_lossy(&pruned.stderr));
    assert!(
        String::from_utf8_lossy(&pruned.stdout).contains("removed 1 records"),
        "{}",
        String::from_utf8_lossy(&pruned.stdout)
    );
    let (out, events) = s.build_events(&["-f", dy]);
    ok(&out);
    assert_eq!(ran(&events), Vec::<String>::new(), "y's records survived");
    let (out, events) = s.build_events(&["-f", dx]);
    ok(&out);
    assert_eq!(ran(&events).len(), 1, "x's step ran again");

    // A prune waits for a running build and removes nothing it uses.
    s.write("Dockerfile.z", "FROM busybox\nRUN sleep 2 && echo z > /z\n");
    let dz = s.ctx().join("Dockerfile.z");
    let base = s.base_arg();
    let build = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_GC", "off")
        .args([
            "build",
            "--progress",
            "plain",
            "--build-context",
            &base,
            "-f",
            dz.to_str().expect("utf8"),
            "-t",
            "z:1",
        ])
        .arg(s.ctx())
        .env("KILN_ROOT", s.root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln");
    std::thread::sleep(std::time::Duration::from_millis(700));
    let all = kiln_at(&s.root(), &["prune", "--all"]);
    assert!(all.status.success());
    let built = build.wait_with_output().expect("build");
    ok(&built);
    // --all removed every record; images in the store stay listed and pushable.
    let (out, events) = s.build_events(&["-f", dy]);
    ok(&out);
    assert_eq!(ran(&events).len(), 2, "after --all the base is unpacked and the step runs again");
    let images = String::from_utf8_lossy(&kiln_at(&s.root(), &["images"]).stdout).into_owned();
    assert!(images.contains("x:1") && images.contains("z:1"), "{images}");
    let du = kiln_at(&s.root(), &["du", "--json"]);
    let v: Value = serde_json::from_slice(&du.stdout).expect("du json");
    assert!(v["blobs"].as_u64().unwrap_or(0) > 0, "the store's blobs stay");
    // The automatic collector prunes down to its limit (here 1 byte: everything).
    let solver = Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name("kiln-solver");
    let gc = Command::new(&solver)
        .arg("gc")
        .arg("--root")
        .arg(s.root())
        .env("KILN_GC_KEEP", "1")
        .output()
        .expect("gc");
    assert!(gc.status.success(), "{}", String::from_utf8_lossy(&gc.stderr));
    let v: Value = serde_json::from_slice(&kiln_at(&s.root(), &["du", "--json"]).stdout).expect("du json");
    assert_eq!(v["records"].as_array().map(Vec::len), Some(0), "{v}");
}

#[test]
fn load_hands_the_image_to_docker_or_says_there_is_none() {
    if !can_build() {
        return;
    }
    let s = Setup::new("load");
    s.write(
        "Dockerfile",
        "FROM busybox\nRUN echo loaded > /loaded\nCMD [\"cat\", \"/loaded\"]\n",
    );
    let docker = std::env::var("DOCKER").unwrap_or_else(|_| "docker".into());
    let docker_up = Command::new(&docker)
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    let out = s.build(&["--progress", "plain", "-t", "kiln-load-test:1", "--load"]);
    let err = String::from_utf8_lossy(&out.stderr);
    if docker_up {
        ok(&out);
        assert!(err.contains("Loaded image: kiln-load-test:1"), "{err}");
        // The tarball --load went through is gone; the summary does not name it.
        let tarball = std::env::temp_dir().join("kiln-load-").display().to_string();
        assert!(
            err.contains("the image into Docker (docker load)") && !err.contains(&tarball),
            "{err}"
        );
        let run = common::docker_run(&docker, &["kiln-load-test:1"]);
        assert_eq!(
            String::from_utf8_lossy(&run.stdout),
            "loaded\n",
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let _ = Command::new(&docker).args(["image", "rm", "kiln-load-test:1"]).output();
    } else {
        assert_eq!(out.status.code(), Some(3));
        assert!(err.contains("--load needs a running Docker engine"), "{err}");
    }
}

#[test]
fn bind_and_tmpfs_mounts() {
    if !can_build() {
        return;
    }
    let s = Setup::new("bind-tmpfs");
    s.write("data/in.txt", "from the context\n");
    s.write(
        "Dockerfile",
        "FROM busybox AS other\nRUN mkdir /x && echo original > /x/f\n\n\
         FROM busybox\n\
         RUN --mount=type=bind,from=other,source=/x,target=/mnt/x,rw sh -c 'echo changed > /mnt/x/f && cat /mnt/x/f > /seen-rw'\n\
         RUN --mount=type=bind,from=other,source=/x,target=/mnt/x sh -c 'cat /mnt/x/f > /seen-ro; echo nope > /mnt/x/g 2>/dev/null && echo writable > /ro-check || echo readonly > /ro-check'\n\
         RUN --mount=type=bind,source=data,target=/ctx cat /ctx/in.txt > /seen-ctx\n\
         RUN --mount=type=tmpfs,target=/t,size=1m sh -c 'df -k /t | tail -1 | awk \"{print \\$2}\" > /tmpfs-size; echo x > /t/file'\n\
         COPY --from=other /x/f /other-after\n",
    );
    let local = s.dir.join("fs");
    let out = s.build(&["--progress", "plain", "-o", &format!("type=local,dest={}", local.display())]);
    ok(&out);
    let read = |p: &str| std::fs::read_to_string(local.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("seen-rw"), "changed\n");
    assert_eq!(read("other-after"), "original\n", "an rw bind is a throwaway copy");
    assert_eq!(read("seen-ro"), "original\n");
    assert_eq!(read("ro-check"), "readonly\n", "binds are read-only by default");
    assert_eq!(read("seen-ctx"), "from the context\n");
    assert_eq!(read("tmpfs-size").trim(), "1024", "tmpfs size=1m");
    assert!(
        !local.join("mnt").exists() && !local.join("t").exists() && !local.join("ctx").exists(),
        "mount points do not stay"
    );
}

#[test]
fn a_missing_bind_mount_source_is_named() {
    if !can_build() {
        return;
    }
    let s = Setup::new("bind-missing");
    s.write("present.txt", "here\n");
    s.write(
        "Dockerfile",
        "FROM busybox\nRUN --mount=type=bind,source=nope.txt,target=/etc/extra.crt cat /etc/extra.crt\n",
    );
    let out = s.build(&["--progress", "plain"]);
    assert_eq!(out.status.code(), Some(kiln_cli::EXIT_STEP), "a step failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"/nope.txt\" not found"), "{err}");
    assert!(
        !err.contains("runc") && !err.contains(&s.root().display().to_string()),
        "no runtime error or internal path: {err}"
    );
    // The step failed before it took a network: the ones made ahead are gone too.
    assert_eq!(mounts_under(&s.root()), Vec::<String>::new(), "no mounts left");
    let left: Vec<_> = std::fs::read_dir(s.root().join("mnt")).expect("mnt").flatten().collect();
    assert!(left.is_empty(), "nothing left in mnt/: {left:?}");
}

#[test]
fn copies_made_ahead_of_their_stage_match_copies_made_in_order() {
    if !can_build() {
        return;
    }
    // `src` is ready long before the last stage's first step, so its copies
    // are made ahead on the base image. That step then makes /dest a symlink:
    // the first copy must be made again through it; the second, elsewhere,
    // stands; the third copies from the context, also ahead.
    let s = Setup::new("copy-ahead");
    s.write("ctx.txt", "context\n");
    // Round two changes both stages, so both run again, with the cache on.
    for (round, word, no_cache) in [(1, "fast", true), (2, "quick", false)] {
        s.write(
            "Dockerfile",
            &format!(
                "FROM busybox AS src\nRUN echo {word} > /f\n\n\
                 FROM busybox\n\
                 RUN sleep 1 && mkdir /elsewhere && ln -s /elsewhere /dest && echo {round}\n\
                 COPY --from=src /f /dest/f\n\
                 COPY --from=src /f /other/f\n\
                 COPY ctx.txt /other/\n"
            ),
        );
        let local = s.dir.join(format!("fs-{round}"));
        let output = format!("type=local,dest={}", local.display());
        let mut args = vec!["--progress", "plain", "-o", &output];
        if no_cache {
            args.push("--no-cache");
        }
        let out = s.build(&args);
        ok(&out);
        let dest = std::fs::symlink_metadata(local.join("dest")).expect("dest");
        assert!(dest.file_type().is_symlink(), "round {round}: /dest stays the symlink the RUN made");
        assert_eq!(std::fs::read_link(local.join("dest")).expect("link"), Path::new("/elsewhere"));
        assert_eq!(
            std::fs::read_to_string(local.join("elsewhere/f")).expect("through the link"),
            format!("{word}\n")
        );
        assert_eq!(std::fs::read_to_string(local.join("other/f")).expect("other"), format!("{word}\n"));
        assert_eq!(std::fs::read_to_string(local.join("other/ctx.txt")).expect("ctx"), "context\n");
    }
}
