#!/usr/bin/env bash
# Frontend plugin benchmark: what selecting a frontend by `# syntax=` costs a
# build. Whole-process `kiln dump-llb --no-resolve` of one small definition
# through: the built-in Dockerfile frontend; kiln's Dockerfile frontend as a
# WASM plugin (compiled code cached — the case the <20 ms target is about —
# and, once, cold); the `steps` example as a WASM plugin and as a native
# program on PATH; the built-in recipe frontend. Timed with hyperfine.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release -q --manifest-path "$here/Cargo.toml" -p kiln-cli -p kiln-plugin-host -p kiln-frontend-steps
"$here/frontends/build-wasm.sh" 2>/dev/null
kiln=$here/target/release/kiln
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export KILN_ROOT=$work/root HOME=$work
mkdir -p "$work/ctx/site" "$work/bin"
echo hi > "$work/ctx/site/index.html"
cp "$here"/target/plugins/*.wasm "$work/ctx/"
ln -s "$here/target/release/kiln-frontend-steps" "$work/bin/kiln-frontend-steps"
body_df='FROM busybox\nWORKDIR /app\nCOPY site /app/site\nRUN echo built > /app/built\nCMD ["cat", "/app/built"]\n'
body_steps='base busybox\nworkdir /app\ncopy site /app/site\nrun echo built > /app/built\ncmd cat /app/built\n'
body_recipe='stages:\n  main:\n    from: busybox\n    steps:\n      - workdir: /app\n      - copy: site\n        to: /app/site\n      - run: echo built > /app/built\n    image:\n      cmd: [cat, /app/built]\n'
printf "# syntax=dockerfile\n$body_df" > "$work/ctx/Dockerfile.builtin"
printf "# syntax=./dockerfile.wasm\n$body_df" > "$work/ctx/Dockerfile.wasm"
printf "# syntax=./steps.wasm\n$body_steps" > "$work/ctx/Stepfile.wasm"
printf "# syntax=steps\n$body_steps" > "$work/ctx/Stepfile.native"
printf "# syntax=recipe\n$body_recipe" > "$work/ctx/recipe.yaml"
cd "$work"
export PATH="$work/bin:$PATH"

echo "== cold: first use of dockerfile.wasm (compiles it, fills the cache)"
/usr/bin/time -f "   %e s, peak RSS %M KiB" "$kiln" dump-llb --no-resolve -f ctx/Dockerfile.wasm ctx > /dev/null
"$kiln" dump-llb --no-resolve -f ctx/Stepfile.wasm ctx > /dev/null
cmds=()
for f in Dockerfile.builtin Dockerfile.wasm Stepfile.wasm Stepfile.native recipe.yaml; do
  cmds+=("$kiln dump-llb --no-resolve -f ctx/$f ctx")
done
if command -v hyperfine >/dev/null; then
  hyperfine -N --warmup 5 --runs 50 "${cmds[@]}" 2>/dev/null | grep -E "^Benchmark|Time \(mean"
else
  for c in "${cmds[@]}"; do
    start=$(date +%s%N); for _ in $(seq 50); do $c > /dev/null; done; end=$(date +%s%N)
    echo "$c: $(( (end - start) / 50000 )) µs mean"
  done
fi
for f in Dockerfile.builtin Dockerfile.wasm; do
  /usr/bin/time -f "   $f: peak RSS %M KiB" "$kiln" dump-llb --no-resolve -f "ctx/$f" ctx > /dev/null
done
