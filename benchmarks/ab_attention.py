"""Two variants of pal_jax's Stage 2 DPO step, interleaved in one process.

--compare attention (default): model.attention = xla against xla_chunked (the causal attention in query chunks).
--compare dense: the projections and the LM head as transformer.dense (one 2-D matmul over the flattened leading
axes, the code since 2026-12-07) against jnp.tensordot over [B, T, d] (the einsum form before it; patched in for
that variant's trace only), both with model.attention = xla.
--compare flat: the shared-prompt step with its loss window per row against stage2.flat_window's (one list of
reply positions per data shard, the LM head on those only), both with model.attention = xla_chunked; the two-row
layout has no flat window, so only the shared rows are timed.

bench_stage2.py's step (its random-weight Llama of the shape, pure DPO, its pair batch) is built four times: the
two-row and the shared-prompt layout, each in both variants. After one compiling step and one more each, --rounds
rounds time one step of each in turn (bench_decode.interleaved), so that the VM's drift hits all four alike; the
medians and their ratios are printed, with each side's first-step loss and gradient norm and second-step loss
(equal to float rounding).

    .venv/bin/python benchmarks/ab_attention.py --shape tiny --rounds 15
    .venv/bin/python benchmarks/ab_attention.py --compare dense --shape tiny --rounds 15
    .venv/bin/python benchmarks/ab_attention.py --compare dense --shape 135m --rounds 3
    .venv/bin/python benchmarks/ab_attention.py --compare flat --shape tiny --rounds 15 [--cpu-devices 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import bench_stage2 as b  # noqa: E402  (puts the repository root on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pal_jax.model import transformer  # noqa: E402


def tensordot(x, w, n_in: int = 1, **kw):
    """transformer.dense's contraction as the einsum-style tensordot over [B, T, d] (the code before dense)."""
    return jnp.tensordot(x, w, axes=n_in, **kw)


DENSE = transformer.dense
# --compare -> its two variants: (name, model.attention, the projection function traced into the step, whether the
# shared batch has the flat loss window)
VARIANTS = {"attention": (("xla", "xla", DENSE, False), ("xla_chunked", "xla_chunked", DENSE, False)),
            "dense": (("tensordot", "xla", tensordot, False), ("dense", "xla", DENSE, False)),
            "flat": (("row window", "xla_chunked", DENSE, False), ("flat window", "xla_chunked", DENSE, True))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(b.SHAPES))
    ap.add_argument("--pairs", type=int, default=0, help="0 = bench_stage2's default for the shape")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15, help="timed steps of each variant, interleaved")
    ap.add_argument("--compare", default="attention", choices=sorted(VARIANTS))
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="split the host into this many CPU devices, the data-parallel mesh (bench_stage2.py's)")
    b.add_host_malloc_arg(ap)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.cpu_devices > 1:
        b.mesh_lib.cpu_devices(args.cpu_devices)  # before the backend starts (print_machine)
    b.print_machine(args.host_malloc)
    n = args.pairs or b.DEFAULT_PAIRS[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        _, cfg, _, params = b.build_models(args.shape, tmp)
    two, shared = b.pair_batch(n, args.seq_len, cfg.vocab_size, np.random.default_rng(0))
    flat = (b.pair_batch(n, args.seq_len, cfg.vocab_size, np.random.default_rng(0), flat_groups=jax.device_count())[1]
            if args.compare == "flat" else None)  # the same pairs, the shared rows with the flat window
    c = b.stage2_settings(n, None)
    steps = {}
    variants = VARIANTS[args.compare]
    layouts = (("shared", shared),) if args.compare == "flat" else (("two rows", two), ("shared", shared))
    for layout, batch in layouts:
        for name, attention, project, use_flat in variants:
            transformer.dense = project  # read when the step is traced (its first call)
            try:
                step = b.JaxDPO(c, dataclasses.replace(cfg, attention=attention), params,
                                flat if use_flat else batch)
                jax.block_until_ready(step())  # compile + the first step
            finally:
                transformer.dense = DENSE
            jax.block_until_ready(step())  # the second step (its loss is printed)
            steps[layout, name] = step
    median = {k: t for k, (t, _, _) in b.interleaved({k: (step, True) for k, step in steps.items()},
                                                       args.rounds).items()}
    print(f"[{args.shape}] {n} pairs x {args.seq_len}: median of {args.rounds} interleaved steps "
          f"(load average {os.getloadavg()[0]:.2f})")
    first, second = (v[0] for v in variants)
    for layout, batch in layouts:
        rows = {a: steps[layout, a] for a in (first, second)}
        shape = list(batch["inputs"].shape)
        for (a, step), (*_, use_flat) in zip(rows.items(), variants):
            (l1, g1), (l2, _) = step.loss(0), step.loss(1)
            window = (flat if use_flat else batch)["win_idx"].shape[1]
            print(f"  {layout} {shape} {a:12s} (loss window {window} a row) {median[layout, a] * 1e3:8.1f} ms | "
                  f"loss step 1 {l1:.6f}, grad norm {g1:.6g}, loss step 2 {l2:.6f}")
        ratio = median[layout, first] / median[layout, second]
        print(f"  {layout}: {first} / {second} = {ratio:.3f}x")


if __name__ == "__main__":
    main()
