#!/usr/bin/env bash
# Cost of remembering every step's key parts (the build history that
# --explain and `kiln history` read): warm builds (nothing changed) and touch
# builds (one context file changed, so manifests of what the re-run steps
# read are written) with the history on, against KILN_HISTORY=off, in one
# run. Cases: the peer lab's deepchain (60 RUN steps) and copyheavy (20,000
# files, COPY of the whole context), on the lab's deterministic busybox made
# locally (no registry needed). Target (issue 17): warm <= 1.10x.
# usage: bench/explain.sh [-r RUNS] [-c "CASES"]   (cases: deepchain copyheavy)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${KILN_SHARED:-$here/../shared}
lab=$shared/tools/peer-lab
RUNS=30; CASES="deepchain copyheavy"
while getopts "r:c:" o; do
  case $o in r) RUNS=$OPTARG;; c) CASES=$OPTARG;; *) sed -n 2,9p "$0"; exit 2;; esac
done
command -v hyperfine >/dev/null || { echo "hyperfine is needed (apt-get install hyperfine)" >&2; exit 1; }
cargo build --release -q --locked --manifest-path "$here/Cargo.toml"
kiln=$here/target/release/kiln
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python3 "$lab/gen_contexts.py" "$lab/bench" "$out/gen" >/dev/null
python3 "$lab/mkbase.py" "$out/busybox-oci" >/dev/null
kargs=(--progress plain --build-context "127.0.0.1:5000/busybox:latest=oci-layout://$out/busybox-oci:latest")
for c in $CASES; do
  ctx=$out/gen/$c
  [ -f "$ctx/last.txt" ] || echo initial > "$ctx/last.txt"
  # touch: a file the first COPY (copyheavy: of 20,000 files) or the last reads changes every run.
  touched=$ctx/last.txt
  [ "$c" = copyheavy ] && touched=$ctx/files/f00000.txt
  cmd() { echo "env KILN_GC=off KILN_ROOT=$out/root-$c-$1 KILN_HISTORY=$1 $kiln build ${kargs[*]} $ctx"; }
  for mode in on off; do $(cmd $mode) >/dev/null 2>&1; done
  # Both modes in one hyperfine run each, so they meet the same machine.
  hyperfine -N --style=none --warmup 3 --runs "$RUNS" --export-json "$out/$c.warm.json" "$(cmd on)" "$(cmd off)" >/dev/null
  hyperfine --style=none --runs "$RUNS" --export-json "$out/$c.touch.json" \
    --prepare "date +%s%N > $touched" "$(cmd on)" "$(cmd off)" >/dev/null
done
python3 - "$out" $CASES <<'PY'
import json, statistics, sys
out, cases = sys.argv[1], sys.argv[2:]
med = lambda f, i: statistics.median(json.load(open(f))["results"][i]["times"])
print(f"{'case':<11} {'kind':<6} {'history on':>11} {'off':>9} {'on/off':>7}")
for c in cases:
    for kind in ("warm", "touch"):
        on, off = med(f"{out}/{c}.{kind}.json", 0), med(f"{out}/{c}.{kind}.json", 1)
        print(f"{c:<11} {kind:<6} {on*1000:>9.1f}ms {off*1000:>7.1f}ms {on/off:>7.2f}")
PY
