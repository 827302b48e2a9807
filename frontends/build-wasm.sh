#!/usr/bin/env bash
# Builds kiln's WASM frontend plugins from source for wasm32-wasip1:
#   target/plugins/dockerfile.wasm  kiln's own Dockerfile frontend (proof the protocol is complete)
#   target/plugins/steps.wasm       the example plugin (frontends/plugins/frontend-steps)
# rustup cannot fetch a wasm target offline, so this uses Debian's rustc-web
# (Rust 1.96 with its std sources) and rebuilds std with -Zbuild-std
# (see frontends/AUTHORING.md). Installs those packages with apt-get when
# missing and running as root. Incremental: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${KILN_PLUGINS_DIR:-target/plugins}

need=()
for p in rustc-web cargo-web rust-web-src wasi-libc lld-22; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${need[*]} (the wasm32-wasip1 toolchain)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "missing packages: ${need[*]} (apt-get install them, as root)" >&2
    exit 1
  fi
fi

# Debian's rustc and cargo (1.96), not rustup's, which is first on PATH.
export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1
export CARGO_TARGET_WASM32_WASIP1_LINKER=/usr/bin/wasm-ld-22
export RUSTFLAGS="-C link-self-contained=no -L /usr/lib/wasm32-wasi -C link-arg=/usr/lib/wasm32-wasi/crt1-command.o"
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true
/usr/bin/cargo build --quiet --locked --release -Zbuild-std=std,panic_abort --target wasm32-wasip1 \
  --target-dir target/wasm32 -p kiln-frontend-dockerfile -p kiln-frontend-steps

mkdir -p "$out"
for pair in kiln-frontend-dockerfile:dockerfile kiln-frontend-steps:steps; do
  cp "target/wasm32/wasm32-wasip1/release/${pair%%:*}.wasm" "$out/${pair#*:}.wasm.tmp"
  mv "$out/${pair#*:}.wasm.tmp" "$out/${pair#*:}.wasm"
done
ls -l "$out"/*.wasm >&2
