#!/usr/bin/env bash
# Cost of each RUN step's own network: the peer lab's 60-step deepchain case
# built cold (--no-cache) with the default network (a namespace per step,
# slirp4netns) and with --network none, in one run. Prints the medians and
# the added wall time per RUN step.
# usage: bench/network.sh [-r RUNS]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${KILN_SHARED:-$here/../shared}
lab=$shared/tools/peer-lab
RUNS=10
while getopts "r:" o; do
  case $o in r) RUNS=$OPTARG;; *) sed -n 2,6p "$0"; exit 2;; esac
done
command -v hyperfine >/dev/null || { echo "hyperfine is needed (apt-get install hyperfine)" >&2; exit 1; }
cargo build --release -q --locked --manifest-path "$here/Cargo.toml"
kiln=$here/target/release/kiln
out=$(mktemp -d)
ctx=$out/ctx
python3 "$lab/gen_contexts.py" "$lab/bench" "$ctx" >/dev/null
echo initial > "$ctx/deepchain/last.txt"
export KILN_ROOT=$out/root KILN_GC=off
kargs=(--progress plain)
if ! curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:5000/v2/ 2>/dev/null; then
  python3 "$lab/mkbase.py" "$out/busybox-oci" >/dev/null
  kargs+=(--build-context "127.0.0.1:5000/busybox:latest=oci-layout://$out/busybox-oci:latest")
fi
steps=$(grep -c '^RUN' "$ctx/deepchain/Dockerfile")
for net in default none; do
  hyperfine --shell=bash --style=none --runs "$RUNS" --warmup 1 --export-json "$out/$net.json" \
    "$kiln build --no-cache --network $net ${kargs[*]} $ctx/deepchain >/dev/null 2>&1" >/dev/null
done
python3 - "$out" "$steps" <<'PY'
import json, sys
out, steps = sys.argv[1], int(sys.argv[2])
med = {n: json.load(open(f"{out}/{n}.json"))["results"][0]["median"] for n in ("default", "none")}
print(f"deepchain cold, {steps} RUN steps: default network {med['default']:.3f} s, --network none {med['none']:.3f} s")
print(f"added per RUN step: {(med['default'] - med['none']) / steps * 1000:.1f} ms")
PY
echo "raw results: $out"
