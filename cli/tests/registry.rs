//! Base image configs resolved from a real registry: Debian's
//! `docker-registry` on loopback, images pushed with skopeo, `kiln dump-llb`
//! pinning the tag to its digest and using the platform's config.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

mod common;

use common::{config_json, have, kiln, scratch_dir, write_layout, FixtureImage, LocalRegistry};

#[test]
fn multi_platform_image_is_pinned_and_its_platform_config_used() {
    if !have("docker-registry") || !have("skopeo") {
        return;
    }
    let dir = scratch_dir("registry");
    let registry = LocalRegistry::start(&dir.join("registry"));
    let layout = dir.join("layout");
    let images = [
        FixtureImage {
            platform: ("linux", "amd64"),
            config: config_json("amd64", &["PATH=/amd64/bin", "ARCH=amd64"], "/srv", &[]),
        },
        FixtureImage {
            platform: ("linux", "arm64"),
            config: config_json("arm64", &["PATH=/arm64/bin", "ARCH=arm64"], "/srv", &[]),
        },
    ];
    let index_digest = write_layout(&layout, "v1", &images);
    registry.push_layout(&layout, "v1", "kiln/base");

    let image = format!("{}/kiln/base:v1", registry.addr);
    std::fs::write(dir.join("Dockerfile"), format!("FROM {image}\nRUN make\n")).expect("write");
    for (platform, arch) in [("linux/amd64", "amd64"), ("linux/arm64", "arm64")] {
        let out = kiln(&["dump-llb", "--platform", platform, "."], &dir);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        // Pinned to the index digest, as BuildKit pins; the op's platform picks the image.
        assert!(
            text.contains(&format!("\"identifier\":\"docker-image://{image}@{index_digest}\"")),
            "{text}"
        );
        assert!(text.contains(&format!("\"PATH=/{arch}/bin\"")), "{platform}: {text}");
        assert!(text.contains("\"cwd\":\"/srv\""), "{text}");
    }

    // A platform the index lacks is a clear error naming what exists.
    let out = kiln(&["dump-llb", "--platform", "linux/s390x", "."], &dir);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has no image for linux/s390x (it has: linux/amd64, linux/arm64)"),
        "{err}"
    );

    // An unknown tag names the image and the registry's answer.
    std::fs::write(dir.join("Dockerfile"), format!("FROM {}/kiln/base:nope\n", registry.addr)).expect("write");
    let out = kiln(&["dump-llb", "."], &dir);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kiln/base:nope"), "{err}");
}

/// Ops of a `dump-llb` JSON stream that do not depend on a local source
/// (BuildKit's `local.unique` attribute is random per run), as their lines.
fn lines_without_context(text: &str) -> Vec<String> {
    let mut local = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        let digest = v["Digest"].as_str().unwrap_or("").to_string();
        let is_local = v["Op"]["Op"]["source"]["identifier"]
            .as_str()
            .is_some_and(|i| i.starts_with("local://"));
        let uses_local = v["Op"]["inputs"]
            .as_array()
            .is_some_and(|ins| ins.iter().any(|i| i["digest"].as_str().is_some_and(|d| local.contains(d))));
        if is_local || uses_local {
            local.insert(digest);
        } else {
            out.push(line.to_string());
        }
    }
    out
}

/// BuildKit's own LLB for the reference Dockerfiles was made with the
/// deterministic busybox base in a registry on 127.0.0.1:5000 and RUN network
/// none. With the same image (same digest) served the same way, kiln must print
/// the very same lines for every op that does not depend on the build context.
#[test]
fn reference_dockerfiles_give_buildkits_exact_llb() {
    if !have("docker-registry") || !have("skopeo") || !have("busybox") || !have("python3") {
        return;
    }
    let test = "reference_dockerfiles_give_buildkits_exact_llb";
    let Some(reference) = kiln_test_support::shared(test, "reference/buildkit-llb") else {
        return;
    };
    let shared = common::shared_dir();
    let free = std::net::TcpListener::bind("127.0.0.1:5000").is_ok();
    if !kiln_test_support::require(test, free, "127.0.0.1:5000 is in use (BuildKit's LLB names that registry)") {
        return;
    }
    let dir = scratch_dir("reference");
    let base = dir.join("busybox-oci");
    let made = std::process::Command::new("python3")
        .arg(shared.join("tools/peer-lab/mkbase.py"))
        .arg(&base)
        .output()
        .expect("mkbase runs");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let registry = LocalRegistry::start_at(&dir.join("registry"), "127.0.0.1:5000");
    registry.push_layout(&base, "latest", "busybox");
    for name in ["smoke", "parallel", "deepchain"] {
        let ctx = dir.join(name);
        std::fs::create_dir_all(&ctx).expect("ctx");
        std::fs::copy(reference.join(format!("{name}.Dockerfile")), ctx.join("Dockerfile")).expect("copy");
        let out = kiln(&["dump-llb", "--network", "none", "."], &ctx);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let ours = String::from_utf8(out.stdout).expect("utf8");
        let theirs = std::fs::read_to_string(reference.join(format!("{name}.jsonl"))).expect("reference");
        let ours: std::collections::HashSet<String> = ours.lines().map(str::to_string).collect();
        let expected = lines_without_context(&theirs);
        let missing: Vec<&String> = expected.iter().filter(|l| !ours.contains(*l)).collect();
        eprintln!(
            "{name}: {} of {} context-independent BuildKit lines reproduced byte for byte",
            expected.len() - missing.len(),
            expected.len()
        );
        assert!(
            missing.is_empty(),
            "{name}: lines kiln did not reproduce:\n{}",
            missing.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n")
        );
    }
}
