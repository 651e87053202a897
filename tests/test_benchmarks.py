"""The benchmark and profiling scripts run, on the tiny shape with small sizes (their timings are not checked: only
that each script completes its own correctness checks and prints what its docs quote). A change to a benchmarked
API (bench_stage2.pair_batch returning both layouts broke profile_stage2.py unnoticed) fails here."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

pytest.importorskip("torch", reason="torch (test-only, CPU wheel): the benchmarks build their models with transformers")


def run(script: str, *args: str) -> str:
    # the scripts run as a user runs them: one CPU device (conftest splits the host into 8 for the tests)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("timing", [[], ["--interleave", "--flat-window"]],
                         ids=["one_side_then_the_other", "interleaved_flat_window"])
def test_bench_stage2_shared_rows_agree_with_two_rows_and_pytorch(timing):
    # the script stops (non-zero) when the first DPO loss is not log 2 on both sides, the gradient norms disagree,
    # or the shared rows' losses (with --flat-window: its loss window's) differ from the two-row step's
    out = run("bench_stage2.py", "--shapes", "tiny", "--pairs", "4", "--seq-len", "64", "--repeats", "2",
              "--share-prompt", *timing)
    m = re.search(r"step 2 loss \(after one AdamW update\) pal_jax ([\d.]+), PyTorch ([\d.]+)", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(float(m.group(2)), abs=1e-4)
    flat = "--flat-window" in timing
    # --host-malloc auto (the default, as pal_jax.main's config.host_malloc) on this CPU run, before the backend
    assert "host malloc 'auto': freed memory kept (one arena, no mmap)" in out, out
    assert re.search(r"\| tiny +\| DPO " + ("flat" if flat else "shared") + r" +\| pairs/s", out), out
    assert ("a row (flat_window)" in out) == flat, out


@pytest.mark.parametrize("layout", [[], ["--share-prompt"]], ids=["two_rows", "shared"])
def test_profile_stage2_names_the_ops_of_either_layout(layout):
    out = run("profile_stage2.py", "--shape", "tiny", "--pairs", "4", "--seq-len", "64", "--warmup", "0",
              "--steps", "1", "--trace", "1", "--top", "5", *layout)
    rows = "[4, " if layout else "[8, 64]"
    assert f"rows {rows}" in out, out
    assert "ynn_fusion" in out or "dot" in out, out
    listed = [line for line in out.split("top 5 ops")[1].splitlines() if re.match(r"\s+[\d.]+ ms ", line)]
    # each op is one of the compiled step's (its shape printed, not "?") and named by its jaxpr source, or marked as
    # one XLA added without op_name (the NaN guard's finiteness reductions: rare in a top 5, and once a flake here)
    assert len(listed) == 5 and all(" ? " not in line for line in listed), out
    assert all("jit(step)" in line or "(no op_name: added by XLA)" in line for line in listed), out
    assert any("jit(step)" in line and "dot_general" in line for line in listed), out


def test_profile_decode_splits_prefill_and_steps():
    out = run("profile_decode.py", "--shape", "tiny", "--batch", "2", "--repeats", "1", "--top", "3", "--floor")
    m = re.search(r"call (\d+) ms = prefill \+ 1 step (\d+) ms \+ 31 steps x ([\d.]+) ms", out)
    assert m, out
    call, prefill, step = int(m.group(1)), int(m.group(2)), float(m.group(3))
    assert call >= prefill > 0 and step >= 0
    for part in ("prefill + 1 step:", "one further step:", "floors (this process, now):"):
        assert part in out, out
    assert "dot_general" in out.split("one further step:")[1], out  # the loop's matmuls are listed per step


# the attention comparison's numbers are tests/model/test_attention.py's, the dense one's test_transformer's; in the
# default suite the flat one runs the script's code (the only comparison with its own batches: shared rows only)
@pytest.mark.parametrize("compare,names", [pytest.param("attention", ("xla", "xla_chunked"), marks=pytest.mark.slow),
                                           pytest.param("dense", ("tensordot", "dense"), marks=pytest.mark.slow),
                                           ("flat", ("row window", "flat window"))])
def test_ab_attention_times_both_variants_with_the_same_losses(compare, names):
    out = run("ab_attention.py", "--compare", compare, "--shape", "tiny", "--pairs", "4", "--seq-len", "64",
              "--rounds", "1")
    for layout in ("shared",) if compare == "flat" else ("two rows", "shared"):
        lines = [line for line in out.splitlines() if line.strip().startswith(layout + " [")]
        assert [re.search(r"\] (.+?) +\(loss window \d+ a row\)", line).group(1) for line in lines] == list(names), out
        losses = [re.search(r"loss step 1 ([\d.]+), grad norm ([\d.]+), loss step 2 ([\d.]+)", line).groups()
                  for line in lines]
        (a1, ag, a2), (b1, bg, b2) = ([float(x) for x in group] for group in losses)
        assert a1 == pytest.approx(b1, abs=1e-6) and ag == pytest.approx(bg, rel=1e-5)
        assert a2 == pytest.approx(b2, abs=1e-5)
        assert re.search(rf"{layout}: {names[0]} / {names[1]} = [\d.]+x", out), out
