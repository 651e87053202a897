"""Golden loss curves: a fresh run of scripts/regen_golden.py (a fixed tiny Stage 1, 30 steps, then Stage 2, 20 steps)
has the per-step losses stored in tests/golden/stage1_stage2_tiny.json.

A change that moves a curve commits the regenerated file (python scripts/regen_golden.py) in the same commit.

Tolerance: CPU XLA is deterministic for a fixed device count, flags and versions: two fresh runs on this machine
gave bit-identical losses (largest difference 0), and the same run compiled at LLVM -O3 instead of -O0 differed by
at most 8.6e-7 relative. A real change moves the curves far more: the Stage 1 learning rate x 1.01 moved them by
up to 2.5e-3 relative. rtol 1e-4 sits between the two, with room for last-bit differences of another CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

GOLDEN = REPO / "tests" / "golden" / "stage1_stage2_tiny.json"
RTOL, ATOL = 1e-4, 1e-6


def test_stage1_stage2_loss_curves_match_the_golden_file(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    out = tmp_path / "curves.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}  # the script sets XLA_FLAGS itself
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "regen_golden.py"), f"--out={out}"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    fresh = json.loads(out.read_text())
    versions = {k: (golden["versions"][k], fresh["versions"][k]) for k in ("jax", "jaxlib")}
    if any(a != b for a, b in versions.values()):
        pytest.skip(f"the golden curves were made with {golden['versions']}, this venv has {fresh['versions']}: "
                    f"XLA's numerics differ between versions; regenerate with python scripts/regen_golden.py")
    assert fresh["config"] == golden["config"] and fresh["pair_turns"] == golden["pair_turns"], (
        "scripts/regen_golden.py's CONFIG differs from the one the golden file was made with: regenerate it")
    for stage in ("stage1", "stage2"):
        assert fresh[stage].keys() == golden[stage].keys(), stage
        for key, want in golden[stage].items():
            np.testing.assert_allclose(
                fresh[stage][key], want, rtol=RTOL, atol=ATOL,
                err_msg=f"{stage} {key}: the loss curve moved (versions here {fresh['versions']}, golden "
                        f"{golden['versions']}). An intended change commits the regenerated "
                        f"tests/golden/stage1_stage2_tiny.json (python scripts/regen_golden.py)")
    assert len(golden["stage1"]["loss"]) == 30 and len(golden["stage2"]["loss"]) == 20
