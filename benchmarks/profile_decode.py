"""Where a greedy decoding call's time goes: the prompt's prefill and each further step, op by op, beside their floors.

Builds bench_decode.py's random-weight Llama of the shape (--shape) and its pal_jax decoding call (prompts of 128
random tokens, --batch rows, 32 new tokens, greedy, no early stop), and a second call that decodes 1 token (prefill
+ 1 step). Each is timed (median of --repeats), then traced once with the JAX profiler; every executed op's time is
summed (profile_stage2.op_times) and the 1-token call's is subtracted from the 32-token call's, so the loop's ops
come out per step. Ops of the same kind, output shape and jaxpr source (the layers' instances of one op) are listed
as one group, with their count. Op times are thread time (ops and the matmuls' tiles run on both cores at once), so
they add up to more than the wall time.

The floors (--floor) are measured in the same process with plain jitted matmuls of the model's shapes:
- prefill: the prompt tokens' matmul FLOPs (perf.forward_flops_per_token: every weight matrix, the attention
  products, the LM head on the last position) at the float32 matmul peak measured now ([1024, 1024] x [1024, 1024],
  bench_decode.print_peaks);
- one step: the layers' weight matrices ([B, d] x [d, n] for q, k, v, o, gate, up, down; one array per layer and
  matrix, as the model holds them), the LM head, and the layers' attention over a full KV cache (prompt + new
  tokens slots; the decode path's attend_cache), timed as one call each. A step must read every weight and the
  whole cache once; at batch 16 these small matmuls reach a fraction of the memory bandwidth and of the peak.

    .venv/bin/python benchmarks/profile_decode.py --shape 135m --batch 16 --floor
    .venv/bin/python benchmarks/profile_decode.py --shape tiny --batch 16 --top 20
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import bench_decode as bd  # noqa: E402  (puts the repository root on sys.path)
import profile_stage2 as ps  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pal_jax.core import perf  # noqa: E402
from pal_jax.inference import decode as sampling  # noqa: E402
from pal_jax.model.transformer import attend_cache  # noqa: E402


def median_time(fn, repeats: int) -> float:
    """The median seconds of `repeats` calls of fn, after one untimed call (the compile)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def traced(fn, trace_dir: str) -> collections.Counter:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    jax.block_until_ready(fn())
    jax.profiler.stop_trace()
    return ps.op_times(trace_dir)


def step_floor(cfg, batch: int, slots: int, repeats: int) -> tuple[float, float, float, float]:
    """(seconds for the layers' weight matrices at [batch, d], for the LM head, for the layers' attention over a
    full KV cache of `slots` slots, bytes of the weights) as plain jitted calls on random arrays of the model's
    shapes; the attention is the decode path's own (transformer.attend_cache, the cache in init_cache's layout)."""
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.hd
    shapes = {"q": (d, cfg.n_heads * hd), "k": (d, cfg.n_kv_heads * hd), "v": (d, cfg.n_kv_heads * hd),
              "o": (cfg.n_heads * hd, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    keys = jax.random.split(jax.random.key(0), cfg.n_layers * len(shapes) + 1)
    w = [{n: jax.random.normal(keys[i * len(shapes) + j], s, jnp.float32) * 0.02
          for j, (n, s) in enumerate(shapes.items())} for i in range(cfg.n_layers)]  # one dict per layer, as the model
    head = jax.random.normal(keys[-1], (d, cfg.vocab_size), jnp.float32) * 0.02

    def layers(x, w):
        for lw in w:
            q, k, v = x @ lw["q"], x @ lw["k"], x @ lw["v"]
            # stands in for the attention: a data dependence between the projections
            a = q + jnp.tile(k + v, (1, cfg.n_heads // cfg.n_kv_heads))
            x = x + a @ lw["o"]
            x = x + (jax.nn.silu(x @ lw["gate"]) * (x @ lw["up"])) @ lw["down"]
        return x

    x = jnp.ones((batch, d), jnp.float32)
    f_layers, f_head = jax.jit(layers), jax.jit(lambda x, h: x @ h)
    t_layers = median_time(lambda: f_layers(x, w), repeats)
    t_head = median_time(lambda: f_head(x, head), repeats)
    nbytes = 4 * (sum(a.size for lw in w for a in lw.values()) + head.size)

    kv = jax.random.split(jax.random.key(1), 2 * cfg.n_layers)
    caches = [(jax.random.normal(kv[2 * i], (batch, cfg.n_kv_heads, slots, hd), jnp.float32),
               jax.random.normal(kv[2 * i + 1], (batch, cfg.n_kv_heads, hd, slots), jnp.float32))
              for i in range(cfg.n_layers)]
    mask = jnp.ones((batch, 1, slots), bool)

    def attention(q, caches):
        for k, v in caches:  # each layer's output feeds the next one's query: a data dependence, as in the model
            q = q + 0.01 * attend_cache(q, k, v, mask)
        return q

    q0 = jnp.ones((batch, 1, cfg.n_heads, hd), jnp.float32)
    f_attn = jax.jit(attention)
    t_attn = median_time(lambda: f_attn(q0, caches), repeats)
    return t_layers, t_head, t_attn, nbytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="135m", choices=sorted(bd.SHAPES))
    ap.add_argument("--batch", type=int, default=16, help="prompts decoded together")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of each (median)")
    ap.add_argument("--top", type=int, default=12,
                    help="op groups listed for the prefill and for a step (a group: the ops of one kind, output "
                         "shape and source, e.g. the 30 layers' gate projections)")
    ap.add_argument("--floor", action="store_true", help="also measure the prefill's and a step's floors")
    bd.add_host_malloc_arg(ap)
    args = ap.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        ap.error("--batch and --repeats must be >= 1")
    bd.print_machine(args.host_malloc)
    peaks = bd.print_peaks() if args.floor else None

    with tempfile.TemporaryDirectory() as tmp:
        _, cfg, graphdef, params = bd.build_models(args.shape, tmp)
        tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(args.batch, bd.PROMPT)).astype(np.int32)
        full = bd.jax_decode_fn(graphdef, params, tokens)
        one = bd.jax_decode_fn(graphdef, params, tokens, new=1)
        scfg = sampling.SamplingConfig(method="greedy", max_new_tokens=bd.NEW)
        hlo = ps.hlo_index(sampling.generate_jit.lower(
            graphdef, params, jnp.asarray(tokens), jnp.ones(tokens.shape, bool), jax.random.key(0), cfg=scfg,
            eos_id=bd.NEVER_EOS, pad_id=0).compile().as_text())
        t_full, t_one = median_time(full, args.repeats), median_time(one, args.repeats)
        t_step = (t_full - t_one) / (bd.NEW - 1)
        ops_one = traced(one, os.path.join(tmp, "one"))
        ops_full = traced(full, os.path.join(tmp, "full"))
        floor = step_floor(cfg, args.batch, bd.PROMPT + bd.NEW, args.repeats) if args.floor else None

    steps = bd.NEW - 1
    ops_step = collections.Counter({k: (ops_full[k] - ops_one[k]) / steps for k in set(ops_full) | set(ops_one)})
    print(f"\n[{args.shape}] batch {args.batch}, prompt {bd.PROMPT}, {bd.NEW} new tokens: call {t_full * 1e3:.0f} ms = "
          f"prefill + 1 step {t_one * 1e3:.0f} ms + {steps} steps x {t_step * 1e3:.1f} ms (median of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.2f})")
    for label, ops, wall in (("prefill + 1 step", ops_one, t_one), ("one further step", ops_step, t_step)):
        kinds = ps.by_kind(ops)
        print(f"\n{label}: {wall * 1e3:.1f} ms wall; op thread time by kind (ms): "
              + ", ".join(f"{k} {us / 1e3:.1f}" for k, us in kinds.most_common(8) if us > 0))
        groups, count = collections.Counter(), collections.Counter()
        for name, us in ops.items():  # the 30 layers' instances of an op fall into one group
            shape, src = hlo.get(name, ("?", ""))
            key = (ps.op_kind(name), shape, src.rsplit("/", 1)[-1])
            groups[key] += us
            count[key] += 1
        for (kind, shape, src), us in groups.most_common(args.top):
            print(f"  {us / 1e3:9.2f} ms  x{count[kind, shape, src]:<3d} {kind:26s} {shape:30s} {src[:40]}")
    if floor:
        t_layers, t_head, t_attn, nbytes = floor
        t_floor = t_layers + t_head + t_attn
        # the prompt's positions, the LM head on the last one only (Transformer.decode(last_only=True))
        prefill_flops = perf.forward_flops_per_token(cfg, bd.PROMPT, head_positions=1) * args.batch * bd.PROMPT
        t_prefill = prefill_flops / peaks[0]
        print(f"\nfloors (this process, now):"
              f"\n  prefill: {prefill_flops / 1e9:.3g} GFLOP at the JAX matmul peak {peaks[0] / 1e9:.1f} GFLOP/s = "
              f"{t_prefill * 1e3:.0f} ms (measured prefill + 1 step {t_one * 1e3:.0f} ms)"
              f"\n  a step at batch {args.batch}: the layers' weight matmuls {t_layers * 1e3:.1f} ms + LM head "
              f"{t_head * 1e3:.1f} ms ({nbytes / 1e6:.3g} MB at {nbytes / (t_layers + t_head) / 1e9:.1f} GB/s) + the "
              f"attention over {bd.PROMPT + bd.NEW} cache slots {t_attn * 1e3:.1f} ms = {t_floor * 1e3:.1f} ms "
              f"(measured step {t_step * 1e3:.1f} ms)"
              f"\n  the call at these floors: {(t_prefill + bd.NEW * t_floor) * 1e3:.0f} ms "
              f"(measured {t_full * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
