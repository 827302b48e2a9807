#!/usr/bin/env bash
# README's first command: build kiln, then build a real image with it.
# Installs what a fresh Debian machine lacks (runc for RUN steps, slirp4netns
# for their own network, Debian's static busybox as the image's only input), builds kiln in release mode,
# builds examples/busybox into kiln's store and an OCI tarball, and lists it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
missing=""
command -v runc >/dev/null || missing="$missing runc"
command -v slirp4netns >/dev/null || missing="$missing slirp4netns"
[ -x /bin/busybox ] || missing="$missing busybox-static"
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then echo "need root to install:$missing" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
cargo build --release --locked --manifest-path "$here/Cargo.toml"
kiln=$here/target/release/kiln
"$kiln" build --build-context busybox-static=/bin -t kiln-example:latest \
  -o "type=oci,dest=$here/target/kiln-example.oci.tar" "$here/examples/busybox"
"$kiln" images
echo "image: kiln-example:latest (kiln's store), $here/target/kiln-example.oci.tar (OCI layout tarball)"
