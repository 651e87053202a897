"""Compare two evaluation reports' metrics.json, timings aside: every value must be equal (floats exactly).

    python scripts/compare_metrics.py runs/before/eval/metrics.json runs/after/eval/metrics.json

What a change that should not move behaviour (a refactor, a move of modules) is checked with: run the same command
before and after it, then compare. Keys holding wall times (`seconds*`) and the checkpoint paths are skipped; NaN
equals NaN. Exits 1 when any value differs, listing the first 20.
"""
from __future__ import annotations

import json
import math
import sys

SKIPPED = ("checkpoints",)  # workdir paths: they name the two runs' folders


def differences(a, b, path=()) -> tuple[int, list]:
    """(values compared, [(path, a value, b value)]) over two JSON trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        n, out = 0, []
        for k in sorted(set(a) | set(b)):
            if "seconds" in str(k) or k in SKIPPED:
                continue
            if k not in a or k not in b:
                out.append((path + (k,), a.get(k, "<missing>"), b.get(k, "<missing>")))
                continue
            m, d = differences(a[k], b[k], path + (k,))
            n, out = n + m, out + d
        return n, out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        n, out = 0, []
        for i, (x, y) in enumerate(zip(a, b)):
            m, d = differences(x, y, path + (i,))
            n, out = n + m, out + d
        return n, out
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return 1, [] if a == b or both_nan else [(path, a, b)]


def main(argv) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    trees = []
    for p in argv[1:]:
        try:
            with open(p, encoding="utf-8") as f:
                trees.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"error: {p}: {e}; expected an evaluation's metrics.json", file=sys.stderr)
            return 2
    n, diffs = differences(*trees)
    print(f"{n} values compared (timings and checkpoint paths aside), {len(diffs)} differ")
    for path, x, y in diffs[:20]:
        print(f"  {'/'.join(map(str, path))}: {x!r} -> {y!r}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
