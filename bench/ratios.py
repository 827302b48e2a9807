"""The table the bench scripts print: per case and mode, the median (s)
of kiln's and BuildKit's hyperfine runs (OUT/CASE.kiln.MODE.json,
OUT/CASE.bk.MODE.json) and their ratio. A case with OUT/CASE.rss also
gets its peak RSS line.
usage: python3 bench/ratios.py OUT "CASES" "MODES"
"""
import json
import os
import sys


def median(out, case, builder, mode):
    path = f"{out}/{case}.{builder}.{mode}.json"
    if not os.path.exists(path):
        return None
    return json.load(open(path))["results"][0]["median"]


def main(out, cases, modes):
    print(f"\n{'case':<10} {'mode':<6} {'kiln s':>8} {'BuildKit s':>11} {'ratio':>7}")
    for c in cases:
        for m in modes:
            k, b = median(out, c, "kiln", m), median(out, c, "bk", m)
            if k is None:
                continue
            ratio = f"{k / b:.2f}x" if b else "-"
            print(f"{c:<10} {m:<6} {k:>8.3f} {(f'{b:.3f}' if b else '-'):>11} {ratio:>7}")
        rss = f"{out}/{c}.rss"
        if os.path.exists(rss):
            kib = int(open(rss).read().strip())
            print(f"{c:<10} peak RSS of the build's largest process: {kib / 1024:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(), sys.argv[3].split())
