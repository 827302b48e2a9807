#!/usr/bin/env bash
# A fresh CI runner with a remote cache: an empty state root building with
# `--cache-from` a registry cache (mode=max) that another root exported,
# against dockerd's BuildKit on an empty builder cache with `--cache-from`
# the inline cache of the image it pushed (BUILDKIT_INLINE_CACHE=1), same
# registry (the peer lab's, 127.0.0.1:5000), same run. Cases: the lab's
# deepchain (60 steps) and copyheavy (20,000 files), and bench/cases'
# multistage (two stages making 36 MB the result does not keep: neither
# is fetched). Also the export's time and size for mode=min and mode=max
# (type=local, from a warm root), and what the fresh root downloaded.
# Prints medians (s) and kiln/BuildKit ratios.
# usage: bench/remotecache.sh [-r RUNS] [-c "CASES"]   (needs ../shared/tools/peer-lab/up.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${KILN_SHARED:-$here/../shared}
lab=$shared/tools/peer-lab
RUNS=5; CASES="deepchain copyheavy multistage"
while getopts "r:c:" o; do
  case $o in r) RUNS=$OPTARG;; c) CASES=$OPTARG;; *) sed -n 2,10p "$0"; exit 2;; esac
done
DOCKER=/usr/bin/docker
REG=127.0.0.1:5000
command -v hyperfine >/dev/null || { echo "hyperfine is needed: run $lab/up.sh" >&2; exit 1; }
$DOCKER image inspect $REG/busybox:latest >/dev/null 2>&1 || { echo "the lab is not up: run $lab/up.sh" >&2; exit 1; }
cargo build --release -q --locked --manifest-path "$here/Cargo.toml"
kiln=$here/target/release/kiln
out=$(mktemp -d)
ctx=$out/ctx
python3 "$lab/gen_contexts.py" "$lab/bench" "$ctx" >/dev/null
cp -r "$here/bench/cases/." "$ctx/"
for c in $CASES; do
  echo initial >"$ctx/$c/last.txt"
  # Seed both caches from a build of their own.
  KILN_GC=off KILN_ROOT=$out/seed-$c $kiln build --progress plain \
    --cache-to "type=registry,ref=$REG/kiln-cache-$c:max,mode=max" "$ctx/$c" >"$out/$c.seed.log" 2>&1
  DOCKER_BUILDKIT=1 $DOCKER build --network=none --build-arg BUILDKIT_INLINE_CACHE=1 -t "$REG/bk-cache-$c:inline" "$ctx/$c" >"$out/$c.bk-seed.log" 2>&1
  $DOCKER push "$REG/bk-cache-$c:inline" >>"$out/$c.bk-seed.log" 2>&1
  # Export cost, from the seeded (warm) root, per mode.
  for m in min max; do
    rm -rf "$out/export-$c-$m"
    KILN_GC=off KILN_ROOT=$out/seed-$c $kiln build --progress plain \
      --cache-to "type=local,dest=$out/export-$c-$m,mode=$m" "$ctx/$c" 2>&1 \
      | sed -n 's/.*exporting cache type=local[^:]*: \(.*\) DONE/\1/p' >"$out/$c.export-$m.txt"
    du -sb "$out/export-$c-$m" | cut -f1 >>"$out/$c.export-$m.txt"
  done
  hyperfine --shell=bash --style=none --runs "$RUNS" --export-json "$out/$c.kiln.json" \
    --prepare "rm -rf $out/fresh" \
    "KILN_GC=off KILN_ROOT=$out/fresh $kiln build --progress plain --cache-from $REG/kiln-cache-$c:max -t lab/fresh-$c:kiln $ctx/$c >$out/$c.kiln.log 2>&1" >/dev/null
  hyperfine --shell=bash --style=none --runs "$RUNS" --export-json "$out/$c.bk.json" \
    --prepare "$DOCKER image rm -f lab/fresh-$c:bk $REG/bk-cache-$c:inline >/dev/null 2>&1 || true; $DOCKER builder prune -af >/dev/null" \
    "DOCKER_BUILDKIT=1 $DOCKER build --network=none --progress=plain --cache-from $REG/bk-cache-$c:inline -t lab/fresh-$c:bk $ctx/$c >$out/$c.bk.log 2>&1" >/dev/null
  grep -c "CACHED" "$out/$c.bk.log" >"$out/$c.bk.cached" || true
  du -sb "$out/fresh/store/blobs" | cut -f1 >"$out/$c.kiln.fetched"
  sed -n 's/^done: //p' "$out/$c.kiln.log" >"$out/$c.kiln.done"
done
python3 - "$out" $CASES <<'PY'
import json, sys
out, cases = sys.argv[1], sys.argv[2:]
print(f"{'fresh runner':<12}{'kiln s':>9}{'BuildKit s':>12}{'ratio':>8}{'kiln fetched':>14}   kiln steps                BuildKit CACHED lines")
for c in cases:
    med = {w: json.load(open(f"{out}/{c}.{w}.json"))["results"][0]["median"] for w in ("kiln", "bk")}
    done = open(f"{out}/{c}.kiln.done").read().strip()
    cached = open(f"{out}/{c}.bk.cached").read().strip()
    fetched = open(f"{out}/{c}.kiln.fetched").read().strip()
    print(f"{c:<12}{med['kiln']:>9.2f}{med['bk']:>12.2f}{med['kiln'] / med['bk']:>7.2f}x{fetched:>14}   {done:<26}{cached}")
print()
print(f"{'export':<12}{'mode':>6}   {'what the export said':<60}{'bytes on disk':>14}")
for c in cases:
    for m in ("min", "max"):
        said, size = open(f"{out}/{c}.export-{m}.txt").read().strip().split("\n")[-2:]
        print(f"{c:<12}{m:>6}   {said:<60}{size:>14}")
PY
echo "raw results: $out"
