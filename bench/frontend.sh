#!/usr/bin/env bash
# Frontend benchmark: whole-process `kiln dump-llb` on a 5,000-instruction,
# 50-stage Dockerfile and on BuildKit's 12-line smoke file, with the base
# image's config available locally (an OCI layout given as a build context,
# the deterministic busybox image BuildKit's figures were taken with), and
# also with --no-resolve. Wall time from hyperfine (or perf stat) and peak
# memory from /usr/bin/time.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${KILN_SHARED:-$here/../shared}
cargo build --release -q --manifest-path "$here/Cargo.toml"
kiln=$here/target/release/kiln
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 "$shared/tools/gen_big_dockerfile.py" 5000 50 > "$work/Dockerfile.big"
cp "$shared/reference/buildkit-llb/smoke.Dockerfile" "$work/Dockerfile.small"
python3 "$shared/tools/peer-lab/mkbase.py" "$work/busybox-oci" > /dev/null
base="127.0.0.1:5000/busybox:latest=oci-layout://$work/busybox-oci:latest"
cd "$work"
for f in big small; do
  for mode in local no-resolve; do
    if [ "$mode" = local ]; then args=(--build-context "$base"); else args=(--no-resolve); fi
    cmd=("$kiln" dump-llb "${args[@]}" -f "Dockerfile.$f" --format pb .)
    echo "== $f, base config $mode"
    if command -v hyperfine >/dev/null; then
      hyperfine -N --warmup 3 --runs 30 "${cmd[*]}" | grep -E "Time|Range"
    elif command -v perf >/dev/null; then
      perf stat -r 30 -e task-clock "${cmd[@]}" 2>&1 >/dev/null | grep -E "elapsed"
    fi
    /usr/bin/time -f "   peak RSS %M KiB" "${cmd[@]}" > /dev/null
  done
done
