"""Stage 1 with and without sequence packing (data.packing), side by side in one process, on ConvAI2.

The tiny preset (configs/stage1.py:tiny: its own BPE tokenizer trained on the training split, a 2-layer llama) on
ConvAI2's validation file (ParlAI format; the corpus split as config.data says). For each mode:

  real-token fraction  real tokens / all tokens of the batches of epoch 0 (every batch of the epoch), real = the
                       prompt and target tokens of the examples, i.e. not padding (perf.batch_tokens, the training
                       loop's real_token_frac)
  steps/epoch          batches in epoch 0 (packed: each row holds several examples, so fewer steps)
  examples/step        mean examples per batch in epoch 0
  loss window          positions per row sent through the LM head (the longest target; packed: the target cap)
  step time            median of --steps timed Stage 1 training steps (train.make_train_step, the loop's own step:
                       loss, gradients, AdamW update, donated params), the steps 0.. of the epoch, after every
                       batch shape among them was compiled and run once untimed
  real tokens/s        median over the timed steps of (the step's real tokens / its time)

The two modes run interleaved (unpacked step i, then packed step i), from the same initial params, so a change in
the machine's load hits both columns alike. "others CPU" is the share of the cores other processes used meanwhile.

    .venv/bin/python benchmarks/bench_packing.py                     # 10 timed steps per mode
    .venv/bin/python benchmarks/bench_packing.py --steps 2           # a smoke check (not a measurement)

Without the data file it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "convai2", "valid_self_original_no_cands.txt")


from bench_decode import _cpu_jiffies, others_share  # noqa: E402  (the same machine-load accounting)


def make_config(data: str, batch_size: int, max_len: int, packing: bool):
    from configs import common
    c = common.base_config("stage1", "tiny")
    c.data.source = "convai2"
    c.data.path = data
    c.data.max_len = max_len
    c.data.buckets = tuple(b for b in (64, 128, 192, 256, 384, 512) if b < max_len) + (max_len,)
    c.data.packing = packing
    c.train.batch_size = batch_size
    c.train.sample_turns = 0
    c.compile_cache = "off"  # measure compiled programs, not a cache (and leave ~/.cache alone)
    return c


def epoch_figures(src, n_batches: int | None = None) -> dict:
    """Real-token fraction, examples per step and steps of epoch 0 (every batch of it)."""
    from pal_jax.core import perf
    batches = src.epoch_batches(0)
    real = padded = examples = 0
    for rows in batches[:n_batches]:
        b = src.make_batch(rows)
        p, r = perf.batch_tokens(b)
        padded, real = padded + p, real + r
        examples += sum(len(x) for x in rows) if isinstance(rows, list) else len(rows)
    n = len(batches[:n_batches])
    return {"steps": len(batches), "frac": real / max(padded, 1), "examples_per_step": examples / max(n, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="ConvAI2 file (ParlAI format)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode (>= 5 for a measurement)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per step (train.batch_size)")
    ap.add_argument("--max-len", type=int, default=256, help="data.max_len (a packed row's positions)")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.data):
        print(f"skipped: ConvAI2 file not found at {os.path.abspath(args.data)} (the data is not part of the "
              f"repository; pass --data)")
        return 0
    if args.steps < 5:
        print(f"note: --steps {args.steps} < 5: a smoke check, not a measurement")

    import jax
    import numpy as np

    from pal_jax.core import optim
    from pal_jax.core import perf
    from pal_jax.training import stage1
    from pal_jax.training import loop as train
    from pal_jax.data import pipeline
    from pal_jax.training.experiment import Experiment

    c = make_config(args.data, args.batch_size, args.max_len, packing=False)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        exp = Experiment(c, tmp, devices=jax.devices()[:1])
        enc = stage1.encode_split(exp, exp.corpus["train"], "train")
    print(f"data: {os.path.abspath(args.data)}: {len(enc.ids)} Stage 1 training examples (max_len {args.max_len}), "
          f"tokenizer + encoding {time.perf_counter() - t0:.1f}s")
    print(f"machine: {os.cpu_count()} cores | jax {jax.__version__} ({jax.devices()[0].platform}, 1 device) | "
          f"load average {os.getloadavg()[0]:.2f} | tiny preset, batch {args.batch_size} rows x <= {args.max_len}")
    ms = exp.model
    buckets = tuple(c.data.buckets)
    modes = {}
    for name, packing in (("unpacked", False), ("packed", True)):
        src = pipeline.batch_source(enc, args.batch_size, buckets, c.seed, c.data.select_ratio, packing)
        t1 = time.perf_counter()
        if packing:
            src.packed_rows(src.epoch_rows(1))  # the host's cost of packing one epoch
        t_pack = time.perf_counter() - t1
        task = train.Task(name="stage1", loss_fn=stage1.sft_loss_fn, train_batch=src.batch, eval_batches=None)
        tx = optim.make_optimizer(c.train)
        opt_sh = train.optimizer_shardings(tx, ms)
        step = train.make_train_step(ms, task, tx, 1, opt_sh)
        params = ms.init(c.seed)
        opt = jax.jit(tx.init, out_shardings=opt_sh)(params)
        modes[name] = {"src": src, "step": step, "params": params, "opt": opt, "times": [], "rates": [],
                       "epoch_s": t_pack, **epoch_figures(src)}
    n = args.steps
    # compile every batch shape of the timed steps, and run it once, untimed
    for name, m in modes.items():
        t1 = time.perf_counter()
        m["batches"] = [m["src"].batch(s) for s in range(n)]
        seen = set()
        for b in m["batches"]:
            key = perf.shape_key(b)
            if key not in seen:
                seen.add(key)
                m["params"], m["opt"], met = m["step"](m["params"], m["opt"], b, None)
                jax.block_until_ready(met)
        m["compile_s"], m["shapes"] = time.perf_counter() - t1, len(seen)
    snap = _cpu_jiffies()
    for i in range(n):
        for name, m in modes.items():
            b = m["batches"][i]
            real = perf.batch_tokens(b)[1]
            t1 = time.perf_counter()
            m["params"], m["opt"], met = m["step"](m["params"], m["opt"], b, None)
            jax.block_until_ready(met)
            dt = time.perf_counter() - t1
            m["times"].append(dt)
            m["rates"].append(real / dt)
            m.setdefault("losses", []).append(float(met["loss"]))
    others = others_share(snap, _cpu_jiffies())
    head = (f"| {'mode':<8} | {'real-token fraction':>19} | {'steps/epoch':>11} | {'examples/step':>13} | "
            f"{'loss window':>11} | {'step time':>9} | {'real tokens/s':>13} | {'shapes':>6} |")
    print(head)
    print("|" + "|".join("-" * len(col) for col in head.split("|")[1:-1]) + "|")
    for name, m in modes.items():
        print(f"| {name:<8} | {m['frac']:>19.1%} | {m['steps']:>11} | {m['examples_per_step']:>13.1f} | "
              f"{m['src'].window:>11} | {statistics.median(m['times']):>8.3f}s | "
              f"{statistics.median(m['rates']):>13,.0f} | {m['shapes']:>6} |")
    u, p = modes["unpacked"], modes["packed"]
    ratio = statistics.median(p["rates"]) / statistics.median(u["rates"])
    eps = {k: m["examples_per_step"] / statistics.median(m["times"]) for k, m in modes.items()}
    print(f"packed / unpacked real tokens/s: {ratio:.2f}x (median of {n} step(s) each; others CPU {others:.0%}); "
          f"examples/s (epoch mean examples per step / median step time): packed {eps['packed']:.1f}, "
          f"unpacked {eps['unpacked']:.1f}")
    print(f"packing one epoch on the host: {p['epoch_s']:.2f}s; compile + first run of each shape: unpacked "
          f"{u['compile_s']:.1f}s, packed {p['compile_s']:.1f}s")
    print(f"losses of the timed steps (finite check): unpacked {np.round(u['losses'], 3).tolist()}, "
          f"packed {np.round(p['losses'], 3).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
