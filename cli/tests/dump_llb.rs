//! `kiln dump-llb` end to end: formats, reading LLB back, OCI layout
//! resolution, exit codes and rendered diagnostics.

mod common;

use common::{config_json, kiln, scratch_dir, write_layout, FixtureImage};

const DOCKERFILE: &str = "FROM alpine AS build\nRUN make\nCOPY src/ /src/\nFROM scratch\nCOPY --from=build /out /\n";

#[test]
fn json_pb_and_dot_agree_and_pb_reads_back() {
    let dir = scratch_dir("formats");
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE).expect("write");
    std::fs::write(dir.join(".dockerignore"), "# comment\n*.log\n!keep.log\n").expect("write");
    let json = kiln(&["dump-llb", "--no-resolve", "."], &dir);
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let json_text = String::from_utf8(json.stdout).expect("utf8");
    let lines: Vec<serde_json::Value> = json_text.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert!(lines.len() >= 5);
    assert_eq!(lines.last().expect("terminator")["Op"]["Op"], serde_json::json!({}));
    // The context source asks only for what COPY uses and carries .dockerignore.
    let local = lines
        .iter()
        .find(|l| l["Op"]["Op"]["source"]["identifier"] == "local://context")
        .expect("context source");
    let attrs = &local["Op"]["Op"]["source"]["attrs"];
    assert_eq!(attrs["local.includepattern"], "[\"src\"]");
    assert_eq!(attrs["local.excludepatterns"], "[\"*.log\",\"!keep.log\"]");

    let pb = kiln(&["dump-llb", "--no-resolve", "--format", "pb", "."], &dir);
    assert!(pb.status.success());
    std::fs::write(dir.join("def.pb"), &pb.stdout).expect("write");
    let again = kiln(&["dump-llb", "--input", "def.pb"], &dir);
    assert_eq!(String::from_utf8_lossy(&again.stdout), json_text);

    let dot = kiln(&["dump-llb", "--input", "def.pb", "--format", "dot"], &dir);
    let dot = String::from_utf8(dot.stdout).expect("utf8");
    assert!(dot.starts_with("digraph"));
    assert!(dot.contains("[build 2/3] RUN make"), "{dot}");
}

#[test]
fn malformed_input_llb_is_an_error_not_a_panic() {
    let dir = scratch_dir("malformed");
    std::fs::write(dir.join("bad.pb"), [0x0a, 0xff, 0xff, 0x01]).expect("write");
    let out = kiln(&["dump-llb", "--input", "bad.pb"], &dir);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an LLB definition"));
}

#[test]
fn errors_render_with_file_line_column_and_caret() {
    let dir = scratch_dir("diag");
    std::fs::write(dir.join("Dockerfile"), "FROM alpine\nRUNN x\n").expect("write");
    let out = kiln(&["dump-llb", "--no-resolve", "."], &dir);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Dockerfile:2:1"), "{err}");
    assert!(err.contains("kiln::dockerfile::unknown_instruction"), "{err}");
    assert!(err.contains("──┬─"), "{err}");
}

#[test]
fn unresolvable_base_image_names_the_image_and_why() {
    let dir = scratch_dir("unresolved");
    // A loopback port nothing listens on: the registry lookup fails at once.
    std::fs::write(dir.join("Dockerfile"), "FROM 127.0.0.1:9/nope:1\n").expect("write");
    let out = kiln(&["dump-llb", "."], &dir);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:9/nope:1"), "{err}");
    assert!(err.contains("registry lookup failed: cannot connect to 127.0.0.1:9"), "{err}");
    assert!(!err.contains("not found"), "unreachable is not \"not found\": {err}");
    assert!(err.contains("--no-resolve"), "{err}");
    // `kiln build` has no --no-resolve: its hint does not name one.
    let build = kiln(&["build", "--progress", "plain", "."], &dir);
    let build_err = String::from_utf8_lossy(&build.stderr);
    assert!(build_err.contains("cannot connect to 127.0.0.1:9"), "{build_err}");
    assert!(!build_err.contains("--no-resolve"), "{build_err}");
}

#[test]
fn base_image_config_comes_from_an_oci_layout_build_context() {
    let dir = scratch_dir("layout");
    let layout = dir.join("layout");
    let config = config_json("amd64", &["PATH=/opt/bin:/bin"], "/work", &["RUN echo triggered"]);
    let digest = write_layout(
        &layout,
        "v1",
        &[FixtureImage {
            platform: ("linux", "amd64"),
            config,
        }],
    );
    std::fs::write(dir.join("Dockerfile"), "FROM base\nRUN make\n").expect("write");
    let ctx = format!("base=oci-layout://{}:v1", layout.display());
    let out = kiln(&["dump-llb", "--build-context", &ctx, "."], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("@{digest}")), "pinned: {text}");
    // The base's PATH and WORKDIR are used, and its ONBUILD trigger runs first.
    assert!(text.contains("\"PATH=/opt/bin:/bin\""), "{text}");
    assert!(text.contains("\"cwd\":\"/work\""), "{text}");
    assert!(text.contains("echo triggered"), "{text}");
}

#[test]
fn named_contexts_replace_images_and_stages() {
    let dir = scratch_dir("named");
    std::fs::create_dir_all(dir.join("vendor")).expect("dir");
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM alpine AS base\nCOPY --from=deps /lib /lib\nCOPY --from=tools /bin/x /x\n",
    )
    .expect("write");
    let out = kiln(
        &[
            "dump-llb",
            "--no-resolve",
            "--build-context",
            "alpine=docker-image://debian:12",
            "--build-context",
            "deps=vendor",
            "--build-context",
            "tools=docker-image://busybox:1.36",
            ".",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"identifier\":\"docker-image://docker.io/library/debian:12\""),
        "{text}"
    );
    assert!(!text.contains("library/alpine"), "{text}");
    assert!(text.contains("\"identifier\":\"local://deps\""), "{text}");
    assert!(
        text.contains("\"identifier\":\"docker-image://docker.io/library/busybox:1.36\""),
        "{text}"
    );

    let out = kiln(&["dump-llb", "--build-context", "deps=/no/such/dir", "."], &dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such directory"));
}

/// Every file of the real-world corpus, through the CLI as a user runs it
/// (`# syntax=` chosen by the CLI, not only the library compile the corpus
/// test uses): `kiln dump-llb --no-resolve` succeeds on each.
#[test]
fn every_real_world_dockerfile_dumps_through_the_cli() {
    let Some(corpus) = kiln_test_support::shared("every_real_world_dockerfile_dumps_through_the_cli", "conformance/real-world") else {
        return;
    };
    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read corpus").flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else if !matches!(p.file_name().and_then(|n| n.to_str()), Some("README.md" | "SOURCE")) {
                out.push(p);
            }
        }
    }
    let mut all = Vec::new();
    files(&corpus, &mut all);
    assert!(all.len() >= 254, "{} files", all.len());
    let scratch = scratch_dir("real-world");
    let failed: Vec<String> = all
        .iter()
        .filter_map(|f| {
            let out = kiln(
                &["dump-llb", "--no-resolve", "--format", "pb", "-f", &f.to_string_lossy(), "."],
                &scratch,
            );
            (!out.status.success()).then(|| format!("{}: {}", f.display(), String::from_utf8_lossy(&out.stderr)))
        })
        .collect();
    assert!(failed.is_empty(), "{} of {} fail:\n{}", failed.len(), all.len(), failed.join("\n"));
}
