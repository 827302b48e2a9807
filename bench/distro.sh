#!/usr/bin/env bash
# Distro benchmark: kiln and dockerd's BuildKit on the real workloads of
# cli/tests/distro/ (apt with cache mounts, pip, npm, Go) on the peer lab's
# Debian base (127.0.0.1:5000/debian:bookworm, made by
# ../shared/tools/peer-lab/up.sh), in one run:
#   cold  = an empty state (kiln: a new state root; BuildKit: the image and
#           the base removed, builder prune -af): the base is pulled, every
#           step runs, cache mounts start empty
#   warm  = same build again, nothing changed
#   touch = one source file of the last stage changed
#   pull  = the base pulled and unpacked on an empty state (kiln: a build of
#           FROM base + RUN true on a new root; Docker: docker pull)
# Prints medians (s) and kiln/BuildKit ratios.
# usage: bench/distro.sh [-r RUNS] [-c "CASES"] [-m "MODES"] [-n]   (-n: kiln only)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
RUNS=3; CASES="system python polyglot"; MODES="cold warm touch pull"; PEERS=1
while getopts "r:c:m:n" o; do
  case $o in r) RUNS=$OPTARG;; c) CASES=$OPTARG;; m) MODES=$OPTARG;; n) PEERS=0;; *) sed -n 2,15p "$0"; exit 2;; esac
done
command -v hyperfine >/dev/null || { echo "hyperfine is needed (apt-get install hyperfine)" >&2; exit 1; }
BASE=127.0.0.1:5000/debian:bookworm
curl -fsS -o /dev/null --max-time 5 "http://127.0.0.1:5000/v2/debian/manifests/bookworm" \
  -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
  || { echo "$BASE is not in the lab registry: run ../shared/tools/peer-lab/up.sh" >&2; exit 1; }
cargo build --release -q --locked --manifest-path "$here/Cargo.toml"
kiln=$here/target/release/kiln
DOCKER=/usr/bin/docker   # Debian's 20.10 client: DOCKER_BUILDKIT=1 without the buildx plugin
if [ "$PEERS" = 1 ] && ! $DOCKER info >/dev/null 2>&1; then PEERS=0; fi
[ "$PEERS" = 1 ] || echo "(dockerd not running: kiln only; run ../shared/tools/peer-lab/up.sh for the side-by-side figures)"
out=$(mktemp -d)
export KILN_ROOT=$out/root KILN_GC=off
ctx=$out/ctx
mkdir -p "$ctx"
for c in $CASES; do
  cp -r "$here/cli/tests/distro/$c" "$ctx/$c"
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/$c/ca.crt"
done
mkdir -p "$ctx/pull" && printf 'FROM %s\nRUN true\n' "$BASE" > "$ctx/pull/Dockerfile"
# The file the touch mode edits, and how that file writes a comment.
touched() { case $1 in system) echo "stamp.txt #";; python) echo "app.py #";; polyglot) echo "index.js //";; esac; }

# An empty state: for BuildKit no image (tagged, or left untagged by an
# earlier build) holds the base's layers any more.
# The page cache is dropped for both: on these machines a full page cache
# makes every later unpack slower (2.7 s, then 6, 10, 14 s for the same pull).
drop="sync; echo 3 > /proc/sys/vm/drop_caches"
prep() { # builder mode case
  case $2 in
    cold|pull) if [ "$1" = bk ]; then
            echo "$DOCKER image rm -f lab/kb-distro-system lab/kb-distro-python lab/kb-distro-polyglot $BASE >/dev/null 2>&1 || true; $DOCKER image prune -f >/dev/null; $DOCKER builder prune -af >/dev/null; $drop"
          else echo "rm -rf $KILN_ROOT; $drop"; fi ;;
    touch) local t; t=($(touched "$3")); echo "echo \"${t[1]} \$(date +%s%N)\" >> $ctx/$3/${t[0]}" ;;
    *) echo "true" ;;
  esac
}
cmd() { # builder mode case
  if [ "$2" = pull ]; then
    if [ "$1" = bk ]; then echo "$DOCKER pull -q $BASE >/dev/null"
    else echo "$kiln build --progress plain $ctx/pull >/dev/null 2>&1"; fi
  elif [ "$1" = bk ]; then
    # The lab's dockerd has no bridge, so BuildKit's steps use the host's network;
    # kiln's get their own (slirp4netns): the comparison charges that to kiln.
    echo "DOCKER_BUILDKIT=1 $DOCKER build --network=host --progress=plain -t lab/kb-distro-$3 $ctx/$3 >/dev/null 2>&1"
  else echo "$kiln build --progress plain -t lab/kiln-distro-$3 $ctx/$3 >/dev/null 2>&1"; fi
}
builders="kiln"; [ "$PEERS" = 1 ] && builders="kiln bk"
cases=$CASES; [[ " $MODES " == *" pull "* ]] && cases="$CASES pull"
for c in $cases; do
  for b in $builders; do
    for m in $MODES; do
      if [ "$c" = pull ] && [ "$m" != pull ]; then continue; fi
      if [ "$c" != pull ] && [ "$m" = pull ]; then continue; fi
      warm=1; case $m in cold|pull) warm=0;; esac
      # Warm and touch start from a built state: one untimed build first.
      [ "$warm" = 1 ] && bash -c "$(cmd "$b" "$m" "$c")"
      hyperfine --shell=bash --style=none --runs "$RUNS" --prepare "$(prep "$b" "$m" "$c")" \
        --export-json "$out/$c.$b.$m.json" "$(cmd "$b" "$m" "$c")" >/dev/null
    done
  done
done
# Leave the lab as up.sh made it: the base in dockerd.
[ "$PEERS" = 1 ] && $DOCKER pull -q $BASE >/dev/null
python3 "$here/bench/ratios.py" "$out" "$cases" "$MODES"
echo "raw results: $out"
