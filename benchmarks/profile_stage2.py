"""Where a Stage 2 step's time goes: profile bench_stage2's pal_jax step and name each top op's HLO source.

Builds the same step as bench_stage2.py (random-weight Llama of the shape, pure DPO, the same [2N, L] batch), runs
--warmup steps, times --steps more, then records --trace steps with the JAX profiler (a Perfetto trace) and sums the
device time of every executed op (XLA fusion, dot, ...) by its name. Each of the --top ops is printed with the
shape it produces and the `op_name` metadata of the compiled HLO instruction (the jaxpr equation it came from, e.g.
`jit(step)/transpose(jvp(jit(silu)))` = the backward of the MLP's silu), and the ops are also summed by kind (the
fusion name without its number: ynn_fusion = a matmul through YNNPACK, copy_bitcast_fusion / transpose_copy_fusion
= a layout copy, ...). Times are per step; ops run concurrently on the thread pool, so they add up to more than
the step.

    .venv/bin/python benchmarks/profile_stage2.py --shape tiny
    .venv/bin/python benchmarks/profile_stage2.py --shape tiny --share-prompt        # one row per pair
    .venv/bin/python benchmarks/profile_stage2.py --shape 135m --warmup 1 --steps 1 --trace 2 --top 30
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import bench_stage2 as b  # noqa: E402  (puts the repository root on sys.path)
import jax  # noqa: E402

_INSTR = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"%?([\w.\-]+) \(.*\) -> .* \{$")


# printed as the source of an op of the step's HLO that has no op_name metadata, nor the computation it calls: ops
# XLA adds itself (the NaN guard's finiteness reductions, split by XLA:CPU into reduce-window + reduce)
NO_OP_NAME = "(no op_name: added by XLA)"


def hlo_index(text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (its shape, its op_name metadata)} of a compiled module's text. A fusion whose own line
    has no op_name (XLA:CPU wraps some ops without one) gets the op_name of the computation it calls (its root's,
    else the first one in it)."""
    out, calls, named = {}, {}, {}  # named: computation -> op_name (its root's, else its first)
    computation = None
    for line in text.splitlines():
        c = _COMPUTATION.match(line)
        if c:
            computation = c.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        op = _OP_NAME.search(line)
        out[m.group(1)] = (m.group(2), op.group(1) if op else "")
        if op and computation is not None and (computation not in named or line.lstrip().startswith("ROOT ")):
            named[computation] = op.group(1)
        call = _CALLS.search(line)
        if call and not op:
            calls[m.group(1)] = call.group(1)
    for name, computation in calls.items():
        out[name] = (out[name][0], named.get(computation, ""))
    return out


def op_times(trace_dir: str) -> collections.Counter:
    """Total microseconds of every executed XLA op (fusions, dots, wrapped ops) in the newest Perfetto trace."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}: the profiler wrote no Perfetto trace")
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    tot = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and "dur" in e and ("fusion" in name or name.startswith(("dot", "wrapped", "copy"))):
            if not name.startswith("end:"):
                tot[name] += e["dur"]
    return tot


def op_kind(name: str) -> str:
    """An executed op's kind: its name without the instance number (ynn_fusion.59 -> ynn_fusion)."""
    return re.sub(r"\.\d+$", "", name)


def by_kind(times) -> collections.Counter:
    """Op times ({op name: time}) summed by op_kind."""
    kinds = collections.Counter()
    for name, t in times.items():
        kinds[op_kind(name)] += t
    return kinds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(b.SHAPES))
    ap.add_argument("--pairs", type=int, default=0, help="0 = bench_stage2's default for the shape")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the compiling one")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median printed)")
    ap.add_argument("--trace", type=int, default=5, help="profiled steps")
    ap.add_argument("--top", type=int, default=25, help="ops printed")
    ap.add_argument("--share-prompt", action="store_true",
                    help="profile the step on the same pairs as share_prompt rows (one row per pair: bench_stage2's "
                         "--share-prompt row) instead of two rows per pair")
    ap.add_argument("--attention", default="xla", choices=("xla", "xla_chunked", "dot_product_attention"),
                    help="pal_jax's model.attention (bench_stage2.py --attention)")
    args = ap.parse_args(argv)
    if min(args.steps, args.trace) < 1 or args.warmup < 0:
        ap.error("--steps and --trace must be >= 1, --warmup >= 0")

    n = args.pairs or b.DEFAULT_PAIRS[args.shape]
    c = b.stage2_settings(n, None)
    with tempfile.TemporaryDirectory() as tmp:
        _, cfg, _, params = b.build_models(args.shape, tmp)
        cfg = dataclasses.replace(cfg, attention=args.attention)
        two_rows, shared = b.pair_batch(n, args.seq_len, cfg.vocab_size, np.random.default_rng(0))
        batch = shared if args.share_prompt else two_rows
        jx = b.JaxDPO(c, cfg, params, batch)
        del params
        hlo = hlo_index(jx.step_fn.lower(*jx.state, jx.batch, jx.task.reference).compile().as_text())
        for _ in range(1 + args.warmup):
            jax.block_until_ready(jx())
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            jax.block_until_ready(jx())
            times.append(time.perf_counter() - t0)
        trace_dir = os.path.join(tmp, "trace")
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(args.trace):
            jax.block_until_ready(jx())
        jax.profiler.stop_trace()
        tot = op_times(trace_dir)

    step_ms = statistics.median(times) * 1e3
    layout = f"{'shared ' if args.share_prompt else ''}rows {list(batch['inputs'].shape)}, attention {args.attention}"
    print(f"[{args.shape}] DPO step on {n} pairs x {args.seq_len} tokens ({layout}): median {step_ms:.1f} ms over "
          f"{args.steps} steps (load average {os.getloadavg()[0]:.2f}); op times below are per step, over {args.trace} "
          f"traced steps")
    print("\nby kind (ms per step, share of the step):")
    for kind, us in by_kind(tot).most_common(12):
        ms = us / args.trace / 1e3
        print(f"  {ms:9.1f} ms  {ms / step_ms:6.1%}  {kind}")
    print(f"\ntop {args.top} ops (ms per step, the shape it produces, its jaxpr source):")
    for name, us in tot.most_common(args.top):
        shape, src = hlo.get(name, ("?", ""))
        src = src or (NO_OP_NAME if shape != "?" else "")
        print(f"  {us / args.trace / 1e3:9.2f} ms  {name:30s} {shape:32s} {src[-90:]}")


if __name__ == "__main__":
    main()
