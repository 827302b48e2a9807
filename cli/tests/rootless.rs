//! Rootless builds: `kiln build` by an unprivileged user with subordinate
//! ids (a real user the tests create, real newuidmap, runc, overlayfs and
//! slirp4netns) makes the image a root build makes, keeps the network
//! sandbox's guarantees, writes nothing outside its state root and its
//! outputs, and says what to add when the machine is not set up for it.
//! (The conformance corpus is built rootless in conformance.rs.)
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

mod common;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use common::{
    busybox_layout, can_build, children_of, host_address, processes_with, rootless, scratch_dir, serve, Rootless, Scratch, ROOTLESS_USER,
};
use sha2::{Digest, Sha256};

/// One rootless test at a time: the write check looks at the whole machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every entry of every layer of the image in an OCI tarball, one line
/// each: layer, path, type, mode, owner, size, link target, content hash,
/// PAX records (times left out: they are when the step ran).
fn image_entries(tarball: &Path) -> Vec<String> {
    let mut files = std::collections::HashMap::new();
    let mut outer = tar::Archive::new(std::fs::File::open(tarball).expect("image tarball"));
    for e in outer.entries().expect("entries") {
        let mut e = e.expect("entry");
        let name = e.path().expect("path").to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        e.read_to_end(&mut bytes).expect("read");
        files.insert(name, bytes);
    }
    let json = |name: &str| -> serde_json::Value { serde_json::from_slice(&files[name]).expect("json") };
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let index = json("index.json");
    let manifest = json(&blob(index["manifests"][0]["digest"].as_str().expect("manifest")));
    let mut out = Vec::new();
    for (n, layer) in manifest["layers"].as_array().expect("layers").iter().enumerate() {
        let gz = &files[&blob(layer["digest"].as_str().expect("layer"))];
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
        for e in ar.entries().expect("layer entries") {
            let mut e = e.expect("layer entry");
            let mut pax: Vec<String> = e
                .pax_extensions()
                .ok()
                .flatten()
                .map(|p| {
                    p.flatten()
                        .filter(|x| !x.key().is_ok_and(|k| k.ends_with("time")))
                        .map(|x| format!("{}={}", x.key().unwrap_or("?"), hex::encode(x.value_bytes())))
                        .collect()
                })
                .unwrap_or_default();
            pax.sort();
            let h = e.header().clone();
            let mut content = Vec::new();
            e.read_to_end(&mut content).expect("content");
            out.push(format!(
                "{n} {} {:?} {:o} {}:{} {} {:?} {} {}",
                e.path().expect("path").display(),
                h.entry_type(),
                h.mode().unwrap_or(0),
                h.uid().unwrap_or(0),
                h.gid().unwrap_or(0),
                h.size().unwrap_or(0),
                h.link_name().ok().flatten(),
                hex::encode(&Sha256::digest(&content)[..8]),
                pax.join(",")
            ));
        }
    }
    out
}

/// A test's directory with `ctx/` and the busybox base in `base/`, and the
/// rootless user; `None` when the test is skipped.
fn setup(test: &str, name: &str) -> Option<(Scratch, PathBuf, Rootless)> {
    if !can_build() {
        return None;
    }
    let dir = scratch_dir(name);
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    busybox_layout(&dir.join("base"));
    let user = rootless(test, &dir)?;
    Some((dir, ctx, user))
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_rootless_build_makes_the_image_a_root_build_makes() {
    let test = "a_rootless_build_makes_the_image_a_root_build_makes";
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some((dir, ctx, user)) = setup(test, "rootless-same") else {
        return;
    };
    let private = serve("127.0.0.1:0", "HOST-LOOPBACK\n").port();
    let public = serve("0.0.0.0:0", "OUTSIDE\n").port();
    let host_ip = host_address();
    // Owners across the mapped range (200000 is past the usual 65536),
    // setuid, hard links, a fifo, whiteouts and an opaque directory, a
    // cache mount two steps share, a secret, a --link copy, a user step,
    // and the network sandbox.
    let dockerfile = format!(
        "FROM busybox AS build\n\
         RUN echo 'app:x:1234:1234::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1234:' >> /etc/group \\\n\
          && mkdir -p /out/keep /out/gone/deep && echo x > /out/gone/deep/f && echo a > /out/a && ln /out/a /out/a-link \\\n\
          && mkfifo /out/fifo && chown -R 1234:1234 /out && chown 200000:150000 /out/a && chmod 4755 /out/a && chmod 2775 /out/keep\n\
         RUN rm -rf /out/gone /out/keep && mkdir /out/gone && echo new > /out/gone/n && rm /bin/vi\n\
         RUN --mount=type=cache,target=/cache,id=shared echo filled > /cache/f\n\
         RUN --mount=type=cache,target=/cache,id=shared cp /cache/f /out/from-cache && stat -c '%u:%g %a %s %n' /cache /cache/f > /out/cache-owners\n\
         RUN --mount=type=secret,id=tok wc -c < /run/secrets/tok > /out/secret-bytes\n\
         RUN nc -w 2 127.0.0.1 {private} </dev/null > /out/loopback 2>&1; nc -w 5 {host_ip} {public} </dev/null > /out/outside 2>&1; \\\n\
             tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort > /out/ifaces; true\n\
         RUN --network=host nc -w 2 127.0.0.1 {private} </dev/null > /out/host-net 2>&1; true\n\
         RUN grep '^Seccomp:' /proc/self/status | tr -d ' \\t' > /out/seccomp; unshare -U true 2>/dev/null; echo $? > /out/userns\n\
         FROM build\n\
         COPY --from=build --chown=app /out /copied\n\
         COPY --link --from=build /out/a /linked/a\n\
         USER app\n\
         RUN id > /tmp/id && touch /tmp/made-by-app\n"
    );
    std::fs::write(ctx.join("Dockerfile"), dockerfile).expect("Dockerfile");
    std::fs::write(ctx.join("tok"), "s3cret").expect("secret");
    user.give(&dir);
    let base = format!("busybox=oci-layout://{}:latest", dir.join("base").display());
    let args = |out: &str| -> Vec<String> {
        [
            "build",
            "--progress",
            "plain",
            "--allow",
            "network.host",
            "--secret",
            "id=tok,src=tok",
            "--build-context",
            &base,
            "-o",
            out,
            ".",
        ]
        .map(str::to_string)
        .to_vec()
    };
    let (rootful, rootless_tar) = (dir.join("rootful.tar"), dir.join("rootless.tar"));
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args(&format!("type=oci,dest={}", rootful.display())))
        .current_dir(&ctx)
        .env("KILN_ROOT", dir.join("root-rootful"))
        .output()
        .expect("kiln runs");
    ok("the root build", &out);
    let out = user.kiln(
        &strs(&args(&format!("type=oci,dest={}", rootless_tar.display()))),
        &ctx,
        &dir.join("root-rootless"),
    );
    ok("the rootless build", &out);
    let (a, b) = (image_entries(&rootful), image_entries(&rootless_tar));
    let differ: Vec<String> = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| format!("root:     {x}\nrootless: {y}"))
        .collect();
    assert!(
        differ.is_empty() && a.len() == b.len(),
        "{} vs {} entries; differing:\n{}",
        a.len(),
        b.len(),
        differ.join("\n")
    );
    let has = |needle: &str| b.iter().any(|l| l.contains(needle));
    assert!(
        has(" linked/a Regular 104755 200000:150000 "),
        "owners past 65536 and setuid: {b:#?}"
    );
    assert!(has(" bin/.wh.vi "), "a whiteout: {b:#?}");
    assert!(has(" out/gone/.wh..wh..opq "), "an opaque directory: {b:#?}");
    assert!(has(" out/fifo Fifo "), "a fifo: {b:#?}");
    assert!(has(" out/a-link Link "), "a hard link: {b:#?}");

    // The same build to a directory: the rootless user's own files.
    let local = dir.join("fs");
    let out = user.kiln(
        &strs(&args(&format!("type=local,dest={}", local.display()))),
        &ctx,
        &dir.join("root-rootless"),
    );
    ok("the rootless local export", &out);
    let read = |f: &str| std::fs::read_to_string(local.join(f)).expect(f);
    assert_eq!(read("out/from-cache"), "filled\n", "the cache mount is shared by its steps");
    assert_eq!(read("out/secret-bytes").trim(), "6");
    assert!(!read("out/loopback").contains("HOST-LOOPBACK"), "{}", read("out/loopback"));
    assert_eq!(read("out/outside"), "OUTSIDE\n", "outbound connections work rootless");
    assert_eq!(read("out/ifaces"), "lo\ntap0\n", "its own network, none of the host's interfaces");
    assert_eq!(read("out/host-net"), "HOST-LOOPBACK\n", "--network=host, allowed, is the host's");
    assert_eq!(
        read("out/seccomp"),
        "Seccomp:2\n",
        "steps run under the seccomp filter rootless too"
    );
    assert_eq!(read("out/userns"), "1\n", "no user namespace inside the step");
    assert!(
        read("tmp/id").starts_with("uid=") && read("tmp/id").contains("(app)"),
        "{}",
        read("tmp/id")
    );
    let uid = Command::new("id").args(["-u", ROOTLESS_USER]).output().expect("id");
    let uid: u32 = String::from_utf8_lossy(&uid.stdout).trim().parse().expect("uid");
    let m = std::fs::symlink_metadata(local.join("out/a")).expect("out/a");
    assert_eq!(m.uid(), uid, "a local export is the user's own");
    assert_eq!(m.mode() & 0o7777, 0o4755, "modes kept");
}

/// Files under `dir` (not under `skip`) owned by `uids`, changed since `since`.
fn touched(dir: &Path, skip: &Path, uids: &dyn Fn(u32) -> bool, since: std::time::Duration, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.starts_with(skip) {
            continue;
        }
        let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
        let at = |s: i64, ns: i64| std::time::Duration::new(s.max(0) as u64, ns.clamp(0, 999_999_999) as u32);
        if uids(m.uid()) && (at(m.mtime(), m.mtime_nsec()) >= since || at(m.ctime(), m.ctime_nsec()) >= since) {
            found.push(p.clone());
        }
        if m.is_dir() {
            touched(&p, skip, uids, since, found);
        }
    }
}

#[test]
fn a_rootless_build_writes_only_its_state_root_and_outputs() {
    let test = "a_rootless_build_writes_only_its_state_root_and_outputs";
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some((dir, ctx, user)) = setup(test, "rootless-writes") else {
        return;
    };
    // A step with every capability its namespace gives still writes only
    // its own filesystem and the state root.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\n\
         RUN --mount=type=cache,target=/c echo x > /c/x && echo y > /y && mkdir -p /tmp/t && touch /tmp/t/z\n\
         RUN --security=insecure mount -t tmpfs none /mnt && touch /mnt/m && (echo 1 > /proc/sys/kernel/hostname) 2>/dev/null; true\n",
    )
    .expect("Dockerfile");
    user.give(&dir);
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
    let base = format!("busybox=oci-layout://{}:latest", dir.join("base").display());
    let forbidden = PathBuf::from(format!("/root/kiln-rootless-forbidden-{}", std::process::id()));
    let out = user.kiln(
        &[
            "build",
            "--allow",
            "security.insecure",
            "--build-context",
            &base,
            "-o",
            &format!("type=local,dest={}", forbidden.display()),
            ".",
        ],
        &ctx,
        &dir.join("root"),
    );
    assert!(!out.status.success(), "an output where the user may not write fails");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Permission denied") || stderr.contains("permission denied"),
        "{stderr}"
    );
    assert!(!forbidden.exists(), "nothing made at {}", forbidden.display());
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert_ne!(hostname.trim(), "1", "the host's hostname is untouched");

    let uid = Command::new("id").args(["-u", ROOTLESS_USER]).output().expect("id");
    let uid: u32 = String::from_utf8_lossy(&uid.stdout).trim().parse().expect("uid");
    // The user and its subordinate range (common::rootless gives 600000-899999).
    let ours = move |u: u32| u == uid || (600_000..900_000).contains(&u);
    let mut found = Vec::new();
    for top in [
        "/tmp",
        "/var/tmp",
        "/dev/shm",
        "/run",
        "/home",
        "/root",
        "/etc",
        "/var/lib",
        "/var/cache",
    ] {
        touched(Path::new(top), &dir, &ours, since, &mut found);
    }
    assert!(found.is_empty(), "written outside the state root: {found:#?}");
    let state: Vec<PathBuf> = {
        let mut v = Vec::new();
        touched(&dir.join("root"), Path::new("/nonexistent"), &ours, since, &mut v);
        v
    };
    assert!(!state.is_empty(), "the build did write its state root");
}

#[test]
fn a_machine_not_set_up_for_rootless_builds_is_told_what_to_add() {
    let test = "a_machine_not_set_up_for_rootless_builds_is_told_what_to_add";
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !can_build() {
        return;
    }
    let dir = scratch_dir("rootless-errors");
    std::fs::create_dir_all(dir.join("ctx")).expect("ctx");
    std::fs::write(dir.join("ctx/Dockerfile"), "FROM scratch\nCOPY Dockerfile /\n").expect("Dockerfile");
    let Some(user) = rootless(test, &dir) else {
        return;
    };
    // newuidmap not found.
    let out = user.kiln_with_path(&["build", "."], &dir.join("ctx"), &dir.join("root"), "/nonexistent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("newuidmap") && stderr.contains("apt-get install uidmap"),
        "{stderr}"
    );

    // A user without subordinate ids.
    let bare = "kiln-rootless-bare";
    if !Command::new("id").arg(bare).output().is_ok_and(|o| o.status.success()) {
        let made = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/bin/sh", bare])
            .status()
            .expect("useradd");
        assert!(made.success());
    }
    let bare_root = dir.join("root-bare");
    std::fs::create_dir_all(&bare_root).expect("root");
    Command::new("chmod").arg("0777").arg(&bare_root).status().expect("chmod");
    // A request bigger than a pipe holds: the solver stops before reading
    // it, and what it said still reaches the user.
    let big = format!("BIG={}", "x".repeat(100_000));
    let out = user.kiln_as(
        bare,
        &["build", "--build-arg", &big, "--build-arg", &big.replace("BIG", "BIGGER"), "."],
        &dir.join("ctx"),
        &bare_root,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {bare}")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_interrupted_rootless_build_stops_and_leaves_nothing_running() {
    let test = "an_interrupted_rootless_build_stops_and_leaves_nothing_running";
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some((dir, ctx, user)) = setup(test, "rootless-cancel") else {
        return;
    };
    let token = format!("rootless-cancel-{}", std::process::id());
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM busybox\nRUN echo started && sleep 60 && echo {token}\n"),
    )
    .expect("Dockerfile");
    user.give(&dir);
    let base = format!("busybox=oci-layout://{}:latest", dir.join("base").display());
    let root = dir.join("root");
    let mut child = user
        .spawn_kiln(&["build", "--progress", "rawjson", "--build-context", &base, "."], &ctx, &root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runuser");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().expect("stderr")));
    let saw = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("\"type\":\"log\"") && l.contains("started"));
    assert!(saw, "the step started");
    // The CLI alone is signalled; the rootless solver's outer process passes it on.
    let kiln: Vec<u32> = children_of(child.id())
        .into_iter()
        .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "kiln"))
        .collect();
    assert_eq!(kiln.len(), 1, "one kiln CLI: {kiln:?}");
    let sent = std::time::Instant::now();
    let _ = Command::new("kill").arg("-INT").arg(kiln[0].to_string()).status();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(
        sent.elapsed() < std::time::Duration::from_secs(5),
        "stopped after {:?}",
        sent.elapsed()
    );
    assert!(rest.iter().any(|l| l.contains("interrupted by SIGINT")), "{rest:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let root_text = root.display().to_string();
    while !(processes_with(&root_text).is_empty() && processes_with(&token).is_empty()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(processes_with(&token), Vec::<u32>::new(), "the step's processes are gone");
    assert_eq!(
        processes_with(&root_text),
        Vec::<u32>::new(),
        "no solver, runc or slirp4netns of this root is left"
    );
    for sub in ["tmp", "mnt"] {
        let left: Vec<_> = std::fs::read_dir(root.join(sub)).expect("dir").flatten().collect();
        assert!(left.is_empty(), "nothing left in {sub}/: {left:?}");
    }
}
