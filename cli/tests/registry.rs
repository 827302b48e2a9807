//! Base image configs resolved from a real registry: Debian's
//! `docker-registry` on loopback, images pushed with skopeo, `kiln dump-llb`
//! pinning the tag to its digest and using the platform's config.

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
