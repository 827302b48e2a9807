//! `kiln build --explain`, `kiln history` and `--on-error`: real builds (runc, overlayfs)
//! on kiln's busybox fixture, then what the explanations and the history say.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

mod common;

use std::process::{Command, Output};

use common::{can_build, ok, Setup};
use serde_json::Value;

/// The steps that ran, by name, with their explanation event field.
fn ran(events: &[Value]) -> Vec<(String, Value)> {
    events
        .iter()
        .filter(|e| e["type"] == "vertex_started")
        .map(|e| (e["name"].as_str().unwrap_or("").to_string(), e["explain"].clone()))
        .filter(|(n, _)| !n.contains("load build context"))
        .collect()
}

fn reason_of<'a>(ran: &'a [(String, Value)], needle: &str) -> &'a str {
    ran.iter()
        .find(|(n, _)| n.contains(needle))
        .unwrap_or_else(|| panic!("no step {needle:?} ran: {ran:?}"))
        .1["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("step {needle:?} has no reason: {ran:?}"))
}

fn kiln_in(setup: &Setup, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_ROOT", setup.root())
        .env("KILN_GC", "off")
        .output()
        .expect("kiln runs")
}

const DOCKERFILE: &str = r#"FROM busybox
RUN --mount=type=bind,source=req.txt,target=/req.txt cat /req.txt > /deps
COPY app/ /app/
ARG VERSION
ARG TOKEN
RUN echo "$VERSION" > /version
RUN --mount=type=secret,id=tok wc -c /run/secrets/tok > /len
"#;

#[test]
fn explain_names_the_changed_files_and_build_args_and_never_a_value() {
    if !can_build() {
        return;
    }
    let s = Setup::new("explain-names");
    s.write("Dockerfile", DOCKERFILE);
    s.write("req.txt", "requests==2\n");
    s.write("app/main.py", "print(1)\n");
    s.write("app/util.py", "x = 1\n");
    s.write("unrelated.txt", "not read by anything\n");
    let secret_file = s.dir.join("secret");
    let build = |version: &str, secret: &str, extra: &[&str]| {
        std::fs::write(&secret_file, secret).unwrap();
        let version = format!("VERSION={version}");
        let secret = format!("id=tok,src={}", secret_file.display());
        let mut args = vec![
            "--explain",
            "--build-arg",
            &version,
            "--build-arg",
            "TOKEN=arg-value-kept-quiet",
            "--secret",
            &secret,
        ];
        args.extend_from_slice(extra);
        let (out, events) = s.build_events(&args);
        ok(&out);
        events
    };

    let first = ran(&build("v-one-111", "secret-value-aaa", &[]));
    assert_eq!(first.len(), 5, "the base and four steps: {first:?}");
    for (name, explain) in &first {
        assert_eq!(explain["reason"], "not built here before", "{name}");
    }

    // One context file read by a COPY changes, one that nothing reads
    // changes, a build arg changes, the secret changes.
    s.write("app/main.py", "print(2)\n");
    s.write("unrelated.txt", "still not read\n");
    let second = ran(&build("v-two-222", "secret-value-bbb", &[]));
    let names: Vec<&str> = second.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        !names.iter().any(|n| n.contains("req.txt")),
        "the bind-mount step reads only req.txt: {names:?}"
    );
    assert_eq!(reason_of(&second, "COPY app/"), "context files changed: app/main.py");
    let version = reason_of(&second, "/version");
    assert!(version.contains("build arg VERSION changed"), "{version}");
    assert!(!version.contains("TOKEN"), "TOKEN did not change: {version}");
    // The secret step re-runs for the arg in its environment, not for the
    // secret (secrets are not part of keys).
    assert_eq!(reason_of(&second, "/len"), "build arg VERSION changed");
    let all: String = second.iter().map(|(_, e)| e.to_string()).collect();
    for value in ["v-one-111", "v-two-222", "arg-value-kept-quiet", "secret-value"] {
        assert!(!all.contains(value), "an explanation shows the value {value:?}: {all}");
    }

    // A file appears and another vanishes under the copied directory;
    // plain progress says it under the step.
    std::fs::remove_file(s.ctx().join("app/util.py")).unwrap();
    s.write("app/new.py", "y = 2\n");
    let secret_arg = format!("id=tok,src={}", secret_file.display());
    let plain = || {
        let out = s.build(&[
            "--explain",
            "--progress",
            "plain",
            "--build-arg",
            "VERSION=v-two-222",
            "--build-arg",
            "TOKEN=arg-value-kept-quiet",
            "--secret",
            &secret_arg,
        ]);
        ok(&out);
        out
    };
    let out = plain();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("ran: context files appeared: app/new.py; vanished: app/util.py"),
        "{text}"
    );
    let copy_step = text
        .lines()
        .find(|l| l.contains("COPY app/"))
        .and_then(|l| l.split_whitespace().next())
        .expect("the COPY step's number")
        .to_string();
    assert!(text.contains(&format!("ran: because of step {copy_step}")), "{text}");

    // Nothing changed: nothing runs, nothing is explained; --no-cache says so.
    let warm = plain();
    let warm_text = String::from_utf8_lossy(&warm.stderr);
    assert!(!warm_text.contains("ran:"), "{warm_text}");
    // The last build found every step cached: what a step's key was made
    // of is read from its cache record.
    s.write("req.txt", "requests==3\n");
    let after_warm = ran(&build("v-two-222", "secret-value-bbb", &[]));
    assert_eq!(reason_of(&after_warm, "req.txt"), "context files changed: req.txt");

    let forced = ran(&build("v-two-222", "secret-value-bbb", &["--no-cache"]));
    assert!(forced.iter().all(|(_, e)| e["reason"] == "--no-cache"), "{forced:?}");

    // An edited instruction is matched by its place in the file.
    s.write("Dockerfile", &DOCKERFILE.replace("cat /req.txt > /deps", "cat /req.txt > /deps2"));
    let edited = ran(&build("v-two-222", "secret-value-bbb", &[]));
    assert_eq!(reason_of(&edited, "/deps2"), "the command changed");
}

#[test]
fn history_lists_builds_and_shows_the_critical_path_and_waits() {
    if !can_build() {
        return;
    }
    let s = Setup::new("history-path");
    // The bench's parallel case, smaller: independent 1 s stages, then copies.
    let mut dockerfile = String::new();
    for i in 1..=4 {
        dockerfile.push_str(&format!("FROM busybox AS s{i}\nRUN sleep 1 && echo x{i} > /out\n\n"));
    }
    dockerfile.push_str("FROM busybox\n");
    for i in 1..=4 {
        dockerfile.push_str(&format!("COPY --from=s{i} /out /out{i}\n"));
    }
    s.write("Dockerfile", &dockerfile);
    let (out, events) = s.build_events(&["--jobs", "2"]);
    ok(&out);
    let result = events.iter().find(|e| e["type"] == "result").expect("result event");
    let id = result["history_id"].as_str().expect("a history id").to_string();
    let path: Vec<(String, u64)> = result["critical_path"]
        .as_array()
        .expect("a critical path")
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["duration_ms"].as_u64().unwrap()))
        .collect();
    let sleeps: Vec<&(String, u64)> = path.iter().filter(|(n, _)| n.contains("sleep 1")).collect();
    assert_eq!(sleeps.len(), 1, "one of the 1 s steps: {path:?}");
    assert!(sleeps[0].1 >= 1000, "{path:?}");
    let copies: Vec<&str> = path
        .iter()
        .map(|(n, _)| n.as_str())
        .skip_while(|n| !n.contains("sleep 1"))
        .skip(1)
        .collect();
    assert!(!copies.is_empty() && copies.iter().all(|n| n.contains("COPY --from")), "{path:?}");
    assert!(copies.last().unwrap().contains("/out4"), "the path ends at the last copy: {path:?}");

    // A second build, all cached; both are listed, newest last.
    ok(&s.build(&["--jobs", "2"]));
    let list = kiln_in(&s, &["history"]);
    ok(&list);
    let text = String::from_utf8_lossy(&list.stdout);
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(rows[0].starts_with(&id), "{text}");
    let cols: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!(
        &cols[4..6],
        ["9", "0"],
        "the first build ran the base, four RUN steps and four copies: {text}"
    );
    let cols: Vec<&str> = rows[1].split_whitespace().collect();
    assert_eq!(cols[4], "0", "the second build ran nothing: {text}");

    let show = kiln_in(&s, &["history", "show", &id[..12]]);
    ok(&show);
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(shown.contains("critical path ("), "{shown}");
    assert!(shown.contains(&sleeps[0].0), "{shown}");
    // Four 1 s steps on two job slots: two of them waited about a second.
    let waits = shown.split("longest waits for a job slot:").nth(1).expect("waits listed");
    let waited: Vec<&str> = waits
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter(|l| l.contains("sleep 1"))
        .collect();
    assert_eq!(waited.len(), 2, "{shown}");
    assert!(shown.contains("not built here before"), "{shown}");
    let json = kiln_in(&s, &["history", "show", "--json", "last"]);
    ok(&json);
    let record: Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(record["ran"], 0);
    assert!(kiln_in(&s, &["history", "show", "nope"]).status.code() != Some(0));
}

const FAILING: &str = r#"FROM busybox
ENV GREETING=hello
WORKDIR /work
RUN --mount=type=cache,target=/cache --mount=type=secret,id=s,env=TOKEN --mount=type=bind,source=data,target=/data \
    echo partial > /work/made && cp /data/x /work/seen && touch /cache/by-step && exit 3
"#;

/// A context whose last step writes, then fails; returns the secret's file.
fn failing_setup(name: &str) -> (Setup, String) {
    let s = Setup::new(name);
    s.write("Dockerfile", FAILING);
    s.write("data/x", "from the context\n");
    let secret = s.dir.join("secret");
    std::fs::write(&secret, "secret-value-zzz").unwrap();
    (s, format!("id=s,src={}", secret.display()))
}

/// Runs `command` on a pseudo-terminal (util-linux `script`), typing `input` after `delay`.
fn on_terminal(command: &str, input: &str, delay: u64) -> String {
    use std::io::Write as _;
    let mut child = Command::new("script")
        .args(["-qec", command, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script runs");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let typist = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(delay));
        for line in input.lines() {
            let _ = writeln!(stdin, "{line}");
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    });
    let out = child.wait_with_output().expect("script ends");
    typist.join().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn on_error_keep_leaves_what_the_failed_step_wrote_and_a_bundle_to_enter() {
    if !can_build() || !kiln_test_support::tool(&common::current_test(), "script") {
        return;
    }
    let (s, secret) = failing_setup("on-error-keep");
    let kept = s.dir.join("kept");
    let keep = format!("--on-error=keep={}", kept.display());
    let out = s.build(&["--secret", &secret, &keep]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "a step failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("the failed step is kept at {}", kept.display())),
        "{stderr}"
    );

    // What the step wrote before failing, on its base.
    let rootfs = kept.join("rootfs");
    assert_eq!(std::fs::read_to_string(rootfs.join("work/made")).unwrap(), "partial\n");
    assert_eq!(std::fs::read_to_string(rootfs.join("work/seen")).unwrap(), "from the context\n");
    assert!(rootfs.join("bin/busybox").is_file(), "the base is there too");
    // Its runtime config: a shell with the step's env, user and cwd; no secret.
    let config: Value = serde_json::from_slice(&std::fs::read(kept.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["process"]["cwd"], "/work");
    assert_eq!(config["process"]["terminal"], true);
    let env = config["process"]["env"].to_string();
    assert!(env.contains("GREETING=hello"), "{env}");
    let everything = String::from_utf8_lossy(&std::fs::read(kept.join("config.json")).unwrap()).into_owned();
    assert!(
        !everything.contains("TOKEN") && !everything.contains("secret-value"),
        "{everything}"
    );
    let cache = config["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == "/cache")
        .expect("the cache mount is kept");
    assert!(cache["options"].as_array().unwrap().iter().any(|o| o == "ro"), "{cache}");

    // Entering it: the step's files, env, working directory and mounts.
    let entered = on_terminal(
        &kept.join("enter.sh").display().to_string(),
        "cat /work/made; echo G=$GREETING; pwd; cat /data/x; touch /cache/x || echo cache-read-only; exit",
        2,
    );
    for expected in ["partial", "G=hello", "/work", "from the context", "cache-read-only"] {
        assert!(entered.contains(expected), "{expected:?} not in:\n{entered}");
    }

    // A directory that holds something is refused before anything runs.
    let again = s.build(&["--secret", &secret, &keep]);
    assert_eq!(again.status.code(), Some(2), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not empty"));
}

#[test]
fn on_error_shell_opens_a_shell_in_the_failed_step() {
    if !can_build() || !kiln_test_support::tool(&common::current_test(), "script") {
        return;
    }
    let (s, secret) = failing_setup("on-error-shell");
    // Without a terminal: a usage error naming what to use instead.
    let out = s.build(&["--secret", &secret, "--on-error=shell"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--on-error=keep=DIR"));

    let command = format!(
        "env KILN_ROOT={} KILN_GC=off {} build --progress plain --build-context {} --secret {secret} --on-error=shell {}",
        s.root().display(),
        env!("CARGO_BIN_EXE_kiln"),
        s.base_arg(),
        s.ctx().display()
    );
    let session = on_terminal(&command, "cat /work/made; echo T=$TOKEN; id -u; exit", 4);
    assert!(session.contains("opening a shell in the failed step"), "{session}");
    assert!(session.contains("partial"), "{session}");
    assert!(
        session.contains("T=\r\n") || session.contains("T=\n"),
        "no secret env in the shell: {session}"
    );
    assert!(!session.contains("secret-value"), "{session}");
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("kiln-shell-"))
        .collect();
    assert!(leftovers.is_empty(), "the shell's directory is removed: {leftovers:?}");
}
