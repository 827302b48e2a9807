//! `kiln build --check`: BuildKit's Dockerfile rules, each finding a
//! diagnostic at its line under the rule's name; nothing is built; the
//! `# check=` directive and `BUILDKIT_DOCKERFILE_CHECK` configure it.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

mod common;

use std::path::Path;
use std::process::Output;

use common::{kiln, scratch_dir};

/// A Dockerfile that breaks a rule or more on every line.
const BROKEN: &str = "\
FROM busybox as Build
MAINTAINER someone
ENV API_TOKEN abc
ARG DB_PASSWORD=x
WORKDIR app
CMD echo one
cmd echo two
EXPOSE 80/TCP 127.0.0.1:8080:80
FROM build AS scratch
RUN echo a \\

  b
";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(dir: &Path, text: &str) {
    std::fs::write(dir.join("Dockerfile"), text).expect("Dockerfile");
}

#[test]
fn check_lists_every_rule_broken_and_builds_nothing() {
    let dir = scratch_dir("check-rules");
    write(&dir, BROKEN);
    let out = kiln(&["build", "--check", "."], &dir);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for rule in [
        "StageNameCasing",
        "FromAsCasing",
        "MaintainerDeprecated",
        "LegacyKeyValueFormat",
        "SecretsUsedInArgOrEnv",
        "WorkdirRelativePath",
        "JSONArgsRecommended",
        "MultipleInstructionsDisallowed",
        "ConsistentInstructionCasing",
        "ExposeProtoCasing",
        "ExposeInvalidFormat",
        "ReservedStageName",
        "NoEmptyContinuation",
    ] {
        assert!(text.contains(&format!("kiln::check::{rule}")), "{rule} missing:\n{text}");
    }
    assert!(text.contains("[Dockerfile:3:1]"), "each at its line: {text}");
    assert!(text.contains("check complete, 15 warnings found."), "{text}");
    assert!(!dir.join("root").exists(), "nothing built: no state root was made");
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../snapshots/check"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| insta::assert_snapshot!("every_rule", text));
}

#[test]
fn the_check_directive_and_build_arg_configure_the_rules() {
    let dir = scratch_dir("check-config");
    // Skipped rules are silent; a clean file passes.
    write(
        &dir,
        "# check=skip=JSONArgsRecommended,StageNameCasing\nFROM busybox AS Build\nCMD echo hi\n",
    );
    let out = kiln(&["build", "--check", "."], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("no warnings found"), "{}", stderr(&out));
    // The build argument replaces the directive.
    let out = kiln(
        &[
            "build",
            "--check",
            "--build-arg",
            "BUILDKIT_DOCKERFILE_CHECK=skip=StageNameCasing",
            ".",
        ],
        &dir,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("kiln::check::JSONArgsRecommended"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("kiln::check::StageNameCasing"), "{}", stderr(&out));
    // error=true: a finding fails the build as an error, before anything runs.
    write(&dir, "# check=error=true\nFROM busybox AS Build\n");
    let out = kiln(&["build", "."], &dir);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("× Stage name 'Build' should be lowercase"),
        "{}",
        stderr(&out)
    );
    // skip=all silences every rule; a malformed configuration is an error.
    write(&dir, "# check=skip=all\nFROM busybox AS Build\ncmd echo\n");
    assert_eq!(kiln(&["build", "--check", "."], &dir).status.code(), Some(0));
    write(&dir, "# check=skip\nFROM busybox\n");
    let out = kiln(&["build", "--check", "."], &dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid check option"), "{}", stderr(&out));
}

#[test]
fn the_from_rules_read_the_global_args() {
    let dir = scratch_dir("check-from");
    write(
        &dir,
        "ARG BASE_IMAGE\nARG VERSION=1\nFROM ${BASE_IMAGE}:${VERSON} AS one\n\
         FROM --platform=$TARGETPLATFORM busybox AS two\n\
         FROM --platform=linux/amd64 busybox AS three\n\
         FROM --platform=linux/amd64 busybox AS build-amd64\n\
         FROM --platform=$BUILDPLATFORM busybox AS four\n",
    );
    let out = kiln(&["build", "--check", "."], &dir);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for (rule, message, line) in [
        (
            "UndefinedArgInFrom",
            "FROM argument 'VERSON' is not declared (did you mean VERSION?)",
            3,
        ),
        (
            "InvalidDefaultArgInFrom",
            "Default value for ARG ${BASE_IMAGE}:${VERSON} results in empty or invalid base image name",
            3,
        ),
        (
            "RedundantTargetPlatform",
            "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior",
            4,
        ),
        (
            "FromPlatformFlagConstDisallowed",
            "FROM --platform flag should not use constant value \"linux/amd64\"",
            5,
        ),
    ] {
        assert!(
            text.contains(&format!("kiln::check::{rule}\n\n  ⚠ {message}\n   ╭─[Dockerfile:{line}:1]")),
            "{rule}:\n{text}"
        );
    }
    assert!(
        text.contains("check complete, 4 warnings found."),
        "a stage named for its platform and a variable platform pass: {text}"
    );
    // InvalidDefaultArgInFrom is about the defaults alone: a build arg does not silence it.
    let out = kiln(&["build", "--check", "--build-arg", "BASE_IMAGE=busybox", "."], &dir);
    assert!(stderr(&out).contains("check complete, 4 warnings found."), "{}", stderr(&out));
}

#[test]
fn the_rules_that_read_the_context_the_stage_environment_and_the_base() {
    let dir = scratch_dir("check-context-env");
    std::fs::write(dir.join(".dockerignore"), "secret.txt\nbuild/\n").expect(".dockerignore");
    write(
        &dir,
        "# check=experimental=InvalidDefinitionDescription\n\
         FROM scratch\n\
         ARG DECLARED\n\
         ENV GREETING=hi\n\
         ENV A=$UNDEFINED_X B=$GREETNG C=$DECLARED D=$PATH\n\
         WORKDIR /$NOPE\n\
         COPY secret.txt /\n\
         ADD build/out /\n\
         COPY ok.txt /\n\
         # the version to build\n\
         ARG VERSION=1\n\
         # VERSION2 is described\n\
         ARG VERSION2=1\n",
    );
    let out = kiln(&["build", "--check", "."], &dir);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for (rule, message, line) in [
        ("UndefinedVar", "Usage of undefined variable '$UNDEFINED_X'", 5),
        (
            "UndefinedVar",
            "Usage of undefined variable '$GREETNG' (did you mean $GREETING?)",
            5,
        ),
        ("UndefinedVar", "Usage of undefined variable '$NOPE'", 6),
        (
            "CopyIgnoredFile",
            "Attempting to Copy file \"secret.txt\" that is excluded by .dockerignore",
            7,
        ),
        (
            "CopyIgnoredFile",
            "Attempting to Add file \"build/out\" that is excluded by .dockerignore",
            8,
        ),
        (
            "InvalidDefinitionDescription",
            "Comment for ARG should follow the format: `# VERSION <description>`",
            11,
        ),
    ] {
        let head = format!("kiln::check::{rule}\n\n  ⚠ {message}\n");
        let at = text.find(&head).unwrap_or_else(|| panic!("{rule}: {message}:\n{text}"));
        let next = text[at + head.len()..].lines().next().unwrap_or("");
        assert_eq!(
            next.trim_start(),
            format!("╭─[Dockerfile:{line}:1]"),
            "{rule} at line {line}:\n{text}"
        );
    }
    assert!(
        text.contains("check complete, 6 warnings found."),
        "a declared ARG, PATH, a copied file not ignored and a described ARG pass: {text}"
    );
    // With an `!` exception BuildKit cannot tell statically: CopyIgnoredFile is off.
    std::fs::write(dir.join(".dockerignore"), "secret.txt\nbuild/\n!build/keep\n").expect(".dockerignore");
    let out = kiln(&["build", "--check", "."], &dir);
    assert!(!stderr(&out).contains("CopyIgnoredFile"), "{}", stderr(&out));
}

#[test]
fn a_base_image_of_another_platform_is_named() {
    if !kiln_test_support::tool(&common::current_test(), "busybox") {
        return;
    }
    let dir = scratch_dir("check-base-platform");
    common::busybox_layout(&dir.join("base"));
    write(&dir, "FROM busybox\nRUN true\n");
    let base = format!("busybox=oci-layout://{}", dir.join("base").display());
    // The fixture has only linux/amd64.
    let out = kiln(&["dump-llb", "--build-context", &base, "--platform", "linux/arm64", "."], &dir);
    let text = stderr(&out);
    assert!(
        text.contains(
            "kiln::check::InvalidBaseImagePlatform\n\n  ⚠ Base image busybox was pulled with platform \"linux/amd64\", \
             expected \"linux/arm64\" for current build\n   ╭─[Dockerfile:1:1]"
        ),
        "{text}"
    );
    let out = kiln(&["dump-llb", "--build-context", &base, "."], &dir);
    assert!(!stderr(&out).contains("InvalidBaseImagePlatform"), "{}", stderr(&out));
}
