#!/usr/bin/env bash
# Frontend benchmark: whole-process `kiln dump-llb` on a 5,000-instruction,
# 50-stage Dockerfile and on a 12-line one (BuildKit's smoke file), with
# hyperfine when installed, and peak memory from /usr/bin/time.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${KILN_SHARED:-$here/../shared}
cargo build --release -q --manifest-path "$here/Cargo.toml"
kiln=$here/target/release/kiln
work=$(mktemp -d)
python3 "$shared/tools/gen_big_dockerfile.py" 5000 50 > "$work/Dockerfile.big"
cp "$shared/reference/buildkit-llb/smoke.Dockerfile" "$work/Dockerfile.small"
cd "$work"
for f in big small; do
  if command -v hyperfine >/dev/null; then
    hyperfine -N --warmup 3 "$kiln dump-llb --no-resolve -f Dockerfile.$f --format pb ."
  fi
  /usr/bin/time -f "$f: %e s wall, %M KiB peak RSS" "$kiln" dump-llb --no-resolve -f "Dockerfile.$f" --format pb . > /dev/null
done
rm -rf "$work"
