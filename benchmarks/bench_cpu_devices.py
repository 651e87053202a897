"""Stage 1 steps on one CPU device vs the host split into N CPU devices (config mesh.cpu_devices), side by side.

    .venv/bin/python benchmarks/bench_cpu_devices.py [--devices 2] [--steps 120] [--preset tiny]

Runs `python -m pal_jax.main --config=configs/stage1.py:PRESET` twice in fresh processes (the device count is
fixed when JAX starts), alternating 1 device and N devices, and reads the steady-state step time that the train
loop logs (compiling steps are excluded there; the first log window is left out here). Prints both and the ratio.
Nothing is written outside a temporary directory.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_RE = re.compile(r"step (\d+)/\d+ loss .*?\| ([0-9.]+) s/step ([0-9,]+) tok/s")


def run(devices: int, steps: int, preset: str, workdir: str) -> tuple[float, float]:
    """Median s/step and tok/s over the log windows after the first, for one Stage 1 run on `devices` devices."""
    cmd = [sys.executable, "-m", "pal_jax.main", f"--config=configs/stage1.py:{preset}", f"--workdir={workdir}",
           f"--config.train.steps={steps}", f"--config.mesh.cpu_devices={devices}", "--config.train.eval_every=100000",
           "--config.train.checkpoint_every=100000", "--config.train.log_every=20"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # it would override mesh.cpu_devices
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    rows = [(int(m[1]), float(m[2]), float(m[3].replace(",", ""))) for m in STEP_RE.finditer(out.stderr)]
    rows = [r for r in rows if r[0] > 20]
    if not rows:
        sys.exit(f"no step lines after step 20 in the log of {' '.join(cmd)}; expected --steps > 20")
    return statistics.median(r[1] for r in rows), statistics.median(r[2] for r in rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=2, help="CPU devices of the peer run (default 2)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs, alternating (default 1)")
    args = ap.parse_args()
    print(f"host: {len(os.sched_getaffinity(0))} cores; load average {os.getloadavg()[0]:.2f}")
    res = {1: [], args.devices: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for d in (1, args.devices):
                s, tok = run(d, args.steps, args.preset, os.path.join(tmp, f"d{d}_{r}"))
                res[d].append((s, tok))
                print(f"[{args.preset}] {d} CPU device(s), run {r + 1}: {s:.3f} s/step, {tok:,.0f} tok/s")
    one = statistics.median(s for s, _ in res[1])
    many = statistics.median(s for s, _ in res[args.devices])
    print(f"| preset | 1 device s/step | {args.devices} devices s/step | speed ratio (1 device / {args.devices}) |")
    print(f"| {args.preset} | {one:.3f} | {many:.3f} | {one / many:.2f}x |")


if __name__ == "__main__":
    main()
