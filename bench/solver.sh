#!/usr/bin/env bash
# Solver benchmark: kiln on the peer-lab cases (parallel, deepchain, bigctx,
# copyheavy) in three modes, and BuildKit in the same run when
# ../shared/tools/peer-lab/up.sh has started dockerd:
#   cold  = every step runs (kiln --no-cache; BuildKit: builder prune + --no-cache)
#   warm  = same build again, nothing changed
#   touch = only last.txt changed (used by the last step only)
# Prints medians (s), kiln/BuildKit ratios, and kiln's peak RSS per case
# (the largest process of the build: CLI, solver or runtime).
# usage: bench/solver.sh [-r RUNS] [-c "CASES"] [-m "MODES"] [-n]   (-n: kiln only)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${KILN_SHARED:-$here/../shared}
lab=$shared/tools/peer-lab
RUNS=5; CASES="parallel deepchain bigctx copyheavy"; MODES="cold warm touch"; PEERS=1
while getopts "r:c:m:n" o; do
  case $o in r) RUNS=$OPTARG;; c) CASES=$OPTARG;; m) MODES=$OPTARG;; n) PEERS=0;; *) sed -n 2,12p "$0"; exit 2;; esac
done
command -v hyperfine >/dev/null || { echo "hyperfine is needed (apt-get install hyperfine)" >&2; exit 1; }
cargo build --release -q --locked --manifest-path "$here/Cargo.toml"
kiln=$here/target/release/kiln
ctx=${LAB_CTX:-/tmp/lab/ctx}
python3 "$lab/gen_contexts.py" "$lab/bench" "$ctx" >/dev/null
out=$(mktemp -d)
export KILN_ROOT=$out/root
base=127.0.0.1:5000/busybox:latest
kargs=(--progress plain)
if ! curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:5000/v2/ 2>/dev/null; then
  # No lab registry: the same deterministic base image as an OCI layout.
  python3 "$lab/mkbase.py" "$out/busybox-oci" >/dev/null
  kargs+=(--build-context "$base=oci-layout://$out/busybox-oci:latest")
  PEERS=0
fi
DOCKER=/usr/bin/docker
if [ "$PEERS" = 1 ] && ! $DOCKER info >/dev/null 2>&1; then PEERS=0; fi
[ "$PEERS" = 1 ] || echo "(BuildKit not running: kiln only; run $lab/up.sh for the side-by-side figures)"

prep() { # builder mode case
  case $2 in
    touch) echo "date +%s%N > $ctx/$3/last.txt" ;;
    cold) if [ "$1" = bk ]; then echo "$DOCKER image rm -f lab/kb-$3 >/dev/null 2>&1 || true; $DOCKER builder prune -af >/dev/null"; else echo "true"; fi ;;
    *) echo "true" ;;
  esac
}
cmd() { # builder mode case
  local nc=""; [ "$2" = cold ] && nc="--no-cache"
  if [ "$1" = bk ]; then echo "DOCKER_BUILDKIT=1 $DOCKER build $nc --network=none --progress=plain -t lab/kb-$3 $ctx/$3 >/dev/null 2>&1"
  else echo "$kiln build $nc ${kargs[*]} -t lab/kiln-$3 $ctx/$3 >/dev/null 2>&1"; fi
}
for c in $CASES; do
  echo initial > "$ctx/$c/last.txt"
  builders="kiln"; [ "$PEERS" = 1 ] && builders="kiln bk"
  for b in $builders; do
    for m in $MODES; do
      warm=1
      hyperfine --shell=bash --style=none --runs "$RUNS" --warmup "$warm" --prepare "$(prep $b $m $c)" \
        --export-json "$out/$c.$b.$m.json" "$(cmd $b $m $c)" >/dev/null
    done
    echo initial > "$ctx/$c/last.txt"
  done
  /usr/bin/time -f "%M" -o "$out/$c.rss" bash -c "$(cmd kiln cold $c)"
done
python3 "$here/bench/ratios.py" "$out" "$CASES" "$MODES"
echo "raw results: $out"
