#!/usr/bin/env bash
# Cost of a two-platform build: the peer lab's parallel case (8 stages of a
# 1 s step, then the final copies) built cold (an empty state root) for
# linux/amd64, for linux/arm64 (under QEMU), and for both at once, on a
# two-platform busybox base made offline (../shared/tools/peer-lab/mkmulti.py;
# the arm64 busybox from Debian's busybox-static:arm64, as .ci/run gets it).
# Cases: `parallel` as the lab has it (every stage per platform), and
# `crossparallel`, the same with `FROM --platform=$BUILDPLATFORM` stages (the
# cross-compiling pattern: the 8 steps are the same for both platforms).
# Prints the medians (s), the two-platform time against the sum and the max
# of the single-platform ones and against the two run at once as two
# processes, and the share of the two-platform build's steps that ran once
# for both platforms.
# usage: bench/platforms.sh [-r RUNS] [-c "CASES"]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${KILN_SHARED:-$here/../shared}
lab=$shared/tools/peer-lab
RUNS=5; CASES="parallel crossparallel"
while getopts "r:c:" o; do
  case $o in r) RUNS=$OPTARG;; c) CASES=$OPTARG;; *) sed -n 2,13p "$0"; exit 2;; esac
done
command -v hyperfine >/dev/null || { echo "hyperfine is needed (apt-get install hyperfine)" >&2; exit 1; }
arm64=${KILN_ARM64_BUSYBOX:-/usr/local/lib/kiln-ci/arm64/bin/busybox}
[ -x "$arm64" ] || { echo "no arm64 busybox at $arm64 (.ci/run shows how to get it; KILN_ARM64_BUSYBOX overrides)" >&2; exit 1; }
cargo build --release -q --locked --manifest-path "$here/Cargo.toml"
kiln=$here/target/release/kiln
out=$(mktemp -d)
python3 "$lab/mkmulti.py" "$out/base" /bin/busybox "$arm64" >/dev/null
for c in $CASES; do
  mkdir -p "$out/$c"
  echo initial >"$out/$c/last.txt"
  case $c in
    parallel) cp "$lab/bench/parallel/Dockerfile" "$out/$c/" ;;
    crossparallel) sed 's/^FROM \(127[^ ]*\) AS/FROM --platform=$BUILDPLATFORM \1 AS/' "$lab/bench/parallel/Dockerfile" >"$out/$c/Dockerfile" ;;
    *) echo "unknown case $c" >&2; exit 2 ;;
  esac
done
kargs=(--progress plain --build-context "127.0.0.1:5000/busybox:latest=oci-layout://$out/base:latest")
for c in $CASES; do
  for p in amd64 arm64 both; do
    plat=linux/$p; [ $p = both ] && plat=linux/amd64,linux/arm64
    hyperfine --shell=bash --style=none --runs "$RUNS" --export-json "$out/$c.$p.json" \
      --prepare "rm -rf $out/root-$p" \
      "KILN_GC=off KILN_ROOT=$out/root-$p $kiln build ${kargs[*]} --platform $plat $out/$c >/dev/null 2>&1" >/dev/null
    if [ $p = both ]; then
      # The two single-platform builds run at once, as two processes on
      # roots of their own: what the two-platform build must not exceed.
      hyperfine --shell=bash --style=none --runs "$RUNS" --export-json "$out/$c.concurrent.json" \
        --prepare "rm -rf $out/root-c1 $out/root-c2" \
        "(KILN_GC=off KILN_ROOT=$out/root-c1 $kiln build ${kargs[*]} --platform linux/amd64 $out/$c >/dev/null 2>&1 & \
          KILN_GC=off KILN_ROOT=$out/root-c2 $kiln build ${kargs[*]} --platform linux/arm64 $out/$c >/dev/null 2>&1 & wait)" >/dev/null
    fi
    # Steps that ran, from one more cold build's summary line.
    rm -rf "$out/root-$p"
    KILN_GC=off KILN_ROOT=$out/root-$p $kiln build "${kargs[@]}" --platform $plat "$out/$c" 2>&1 \
      | sed -n 's/^done: \([0-9]*\) steps ran.*/\1/p' >"$out/$c.$p.ran"
  done
done
python3 - "$out" $CASES <<'PY'
import json, sys
out, cases = sys.argv[1], sys.argv[2:]
print(f"{'cold build':<14}{'amd64 s':>9}{'arm64 s':>9}{'both s':>9}{'/sum':>7}{'/max':>7}{'2 procs s':>10}{'/2 procs':>9}{'ran':>11}{'shared':>8}")
for c in cases:
    med = {p: json.load(open(f"{out}/{c}.{p}.json"))["results"][0]["median"] for p in ("amd64", "arm64", "both", "concurrent")}
    ran = {p: int(open(f"{out}/{c}.{p}.ran").read().strip() or 0) for p in ("amd64", "arm64", "both")}
    once = ran["amd64"] + ran["arm64"] - ran["both"]
    print(f"{c:<14}{med['amd64']:>9.2f}{med['arm64']:>9.2f}{med['both']:>9.2f}"
          f"{med['both'] / (med['amd64'] + med['arm64']):>6.2f}x{med['both'] / max(med['amd64'], med['arm64']):>6.2f}x"
          f"{med['concurrent']:>10.2f}{med['both'] / med['concurrent']:>8.2f}x"
          f"{ran['amd64']:>3}+{ran['arm64']:>2}>{ran['both']:>3}{once / ran['both']:>8.0%}")
PY
echo "raw results: $out"
