#!/usr/bin/env bash
# Cost of building rootless: the same cold builds (an empty state root, the
# page cache dropped) as root and as an unprivileged user with subordinate
# ids, in one run. Cases: the peer lab's 60-step busybox deepchain, and the
# distro workloads of cli/tests/distro/ on the lab's Debian base
# (127.0.0.1:5000/debian:bookworm, ../shared/tools/peer-lab/up.sh): apt,
# pip, npm and Go with cache mounts, through the host's CA bundle.
# The user is kiln-rootless (made as the tests make it when missing).
# Prints the medians (s) and rootless/root ratios.
# usage: bench/rootless.sh [-r RUNS] [-c "CASES"]   (cases: deepchain system python polyglot)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${KILN_SHARED:-$here/../shared}
lab=$shared/tools/peer-lab
RUNS=3; CASES="deepchain system"
while getopts "r:c:" o; do
  case $o in r) RUNS=$OPTARG;; c) CASES=$OPTARG;; *) sed -n 2,10p "$0"; exit 2;; esac
done
[ "$(id -u)" = 0 ] || { echo "run as root: it makes the rootless user and drops the page cache" >&2; exit 1; }
command -v hyperfine >/dev/null || { echo "hyperfine is needed (apt-get install hyperfine)" >&2; exit 1; }
command -v newuidmap >/dev/null || { echo "newuidmap is needed (apt-get install uidmap)" >&2; exit 1; }
user=kiln-rootless
id -u $user >/dev/null 2>&1 || useradd --system --no-create-home --shell /bin/sh $user
grep -qx "$user:600000:300000" /etc/subuid || usermod --add-subuids 600000-899999 --add-subgids 600000-899999 $user
[ -r /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" = 666 ] || chmod 0666 /dev/net/tun
cargo build --release -q --locked --manifest-path "$here/Cargo.toml"
out=$(mktemp -d)
chmod 0755 "$out"
# The user's copy of kiln, where it can reach it.
mkdir -p "$out/bin" && cp "$here/target/release/kiln" "$here/target/release/kiln-solver" "$out/bin/"
kiln=$out/bin/kiln
ctx=$out/ctx
mkdir -p "$ctx"
kargs=(--progress plain)
for c in $CASES; do
  if [ "$c" = deepchain ]; then
    python3 "$lab/gen_contexts.py" "$lab/bench" "$out/gen" >/dev/null
    cp -r "$out/gen/deepchain" "$ctx/deepchain"
    echo initial > "$ctx/deepchain/last.txt"
    python3 "$lab/mkbase.py" "$out/busybox-oci" >/dev/null
    kargs+=(--build-context "127.0.0.1:5000/busybox:latest=oci-layout://$out/busybox-oci:latest")
  else
    curl -fsS -o /dev/null --max-time 5 "http://127.0.0.1:5000/v2/debian/manifests/bookworm" \
      -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
      || { echo "the Debian base is not in the lab registry: run $lab/up.sh" >&2; exit 1; }
    cp -r "$here/cli/tests/distro/$c" "$ctx/$c"
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/$c/ca.crt"
  fi
done
chown -R $user: "$out"
drop="sync; echo 3 > /proc/sys/vm/drop_caches"
as_user="runuser -u $user -- env -i HOME=$out PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin KILN_GC=off"
for c in $CASES; do
  hyperfine --shell=bash --style=none --runs "$RUNS" --export-json "$out/$c.root.json" \
    --prepare "rm -rf $out/root-root; $drop" \
    "KILN_GC=off KILN_ROOT=$out/root-root $kiln build ${kargs[*]} $ctx/$c >/dev/null 2>&1" >/dev/null
  hyperfine --shell=bash --style=none --runs "$RUNS" --export-json "$out/$c.rootless.json" \
    --prepare "rm -rf $out/root-user; $drop" \
    "$as_user KILN_ROOT=$out/root-user $kiln build ${kargs[*]} $ctx/$c >/dev/null 2>&1" >/dev/null
done
python3 - "$out" $CASES <<'PY'
import json, sys
out, cases = sys.argv[1], sys.argv[2:]
print(f"{'cold build':<12}{'root s':>9}{'rootless s':>12}{'ratio':>8}")
for c in cases:
    med = {w: json.load(open(f"{out}/{c}.{w}.json"))["results"][0]["median"] for w in ("root", "rootless")}
    print(f"{c:<12}{med['root']:>9.2f}{med['rootless']:>12.2f}{med['rootless'] / med['root']:>7.2f}x")
PY
echo "raw results: $out"
