"""Side-by-side inference benchmark: pal_jax (JAX, XLA CPU) vs transformers/PyTorch on the same weights.

Rows per shape:
  decode  batch 1 and 16, prompt 128, 32 new tokens, greedy   -> new tokens/s
          pal_jax sampling.generate_jit  vs  HF model.generate(do_sample=False, max_new_tokens=32, min_new_tokens=32)
  score   4 prompts x 20 candidates, prompt 128, candidate 24 -> candidates/s
          pal_jax scoring.score_candidates_jit (prompt once, shared KV cache)
          vs a plain PyTorch loop: per prompt one forward over its 20 [prompt+candidate] rows, log-softmax, gather, sum

A random-weight LlamaForCausalLM is built with transformers, saved as safetensors, and loaded into pal_jax with
convert.load_hf_dir, so both sides run identical weights; logits (and scores) are compared before timing.
Both decoders produce exactly 32 new tokens: pal_jax gets an eos id that no token can equal (-1), HF gets
min_new_tokens == max_new_tokens (EOS suppressed for every step).

Each timing: one untimed warm-up call (the JAX compile; a short generate / one prompt on the PyTorch side), then
the median of --repeats timed calls (jax.block_until_ready on the JAX side). A side whose first timed call takes
longer than --row-budget / --repeats seconds runs fewer calls (at least 1); the table marks it "(n=K)".

Each row also gives both sides' achieved GFLOP/s (model FLOPs of the call, pal_jax.core.perf's count: matmuls only,
2 per multiply-add) beside a matmul peak measured in the same run on each side (a [1024, 1024] x [1024, 1024]
float32 product, best of a few: `jnp.matmul` under jit, `torch.mm`), so the distance to the machine's limit shows
beside the ratio to the peer. decode: the prompt once (LM head on its last position) and one position per further
new token, attending over the keys it needs (prompt + tokens so far); both sides run that model. score: each side
its own work (pal_jax the prompt once + the candidates over the shared cache; PyTorch K [prompt + candidate] rows).

The machine is shared: other processes on the same cores slow both sides, PyTorch's OpenMP (barrier per op)
far more than XLA's thread pool, so the load average is printed at the start and the end.

    .venv/bin/python benchmarks/bench_decode.py                      # tiny and 135m, 3 repeats
    .venv/bin/python benchmarks/bench_decode.py --shapes tiny --repeats 5
    .venv/bin/python benchmarks/bench_decode.py --shapes 135m --breakdown   # + prefill vs decode-loop split
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from pal_jax.core import host_malloc, perf
from pal_jax.weights import hf as convert
from pal_jax.inference import decode as sampling  # noqa: E402
from pal_jax.inference import scoring  # noqa: E402

SHAPES = {
    # the `tiny` preset of configs/common.py (its vocab comes from the trained tokenizer: 2048)
    "tiny": dict(vocab_size=2048, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=384, rope_theta=10000.0, tie_word_embeddings=True),
    # SmolLM2-135M
    "135m": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, intermediate_size=1536, rope_theta=100000.0, tie_word_embeddings=True),
}
PROMPT, NEW, DECODE_BATCHES = 128, 32, (1, 16)
SCORE_PROMPTS, SCORE_K, SCORE_C = 4, 20, 24
NEVER_EOS = -1  # pal_jax: no sampled token id equals -1, so no row ever finishes early


# ----------------------------------------------------------------------------------------------------------------
# models


def build_models(shape: str, tmp: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    s = dict(SHAPES[shape])
    theta = s.pop("rope_theta")
    hf_cfg = LlamaConfig(**s, rope_parameters={"rope_type": "default", "rope_theta": theta}, rms_norm_eps=1e-5,
                         max_position_embeddings=2048, hidden_act="silu", bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).eval().to(torch.float32)
    path = os.path.join(tmp, shape)
    hf.save_pretrained(path, safe_serialization=True)
    cfg, model = convert.load_hf_dir(path)
    graphdef, params = nnx.split(model, nnx.Param)
    return hf, cfg, graphdef, params


def parity(hf, graphdef, params, vocab: int, rng) -> float:
    tokens = rng.integers(3, vocab, size=(2, PROMPT)).astype(np.int32)
    jx = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens)
    with torch.inference_mode():
        pt = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    return float(np.max(np.abs(np.asarray(jx) - pt)))


# ----------------------------------------------------------------------------------------------------------------
# workloads


def jax_decode_fn(graphdef, params, tokens, new: int = NEW):
    scfg = sampling.SamplingConfig(method="greedy", max_new_tokens=new)
    key = jax.random.key(0)
    tokens, mask = jnp.asarray(tokens), jnp.ones(tokens.shape, bool)
    return lambda: sampling.generate_jit(graphdef, params, tokens, mask, key, cfg=scfg, eos_id=NEVER_EOS, pad_id=0)


def torch_decode_fn(hf, tokens, new: int = NEW):
    ids = torch.from_numpy(tokens.astype(np.int64))
    am = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                              eos_token_id=2, pad_token_id=0)
        return out[:, PROMPT:]
    return run


def score_inputs(vocab: int, rng):
    tokens = rng.integers(3, vocab, size=(SCORE_PROMPTS, PROMPT)).astype(np.int32)
    cands = rng.integers(3, vocab, size=(SCORE_PROMPTS, SCORE_K, SCORE_C)).astype(np.int32)
    # right-padded candidates of varied real length (8..24 tokens), as in ConvAI2 replies
    lengths = rng.integers(8, SCORE_C + 1, size=(SCORE_PROMPTS, SCORE_K))
    cmask = np.arange(SCORE_C)[None, None, :] < lengths[..., None]
    cands = np.where(cmask, cands, 0).astype(np.int32)
    return tokens, cands, cmask


def jax_score_fn(graphdef, params, tokens, cands, cmask):
    args = [jnp.asarray(a) for a in (tokens, np.ones(tokens.shape, bool), cands, cmask)]
    return lambda: scoring.score_candidates_jit(graphdef, params, *args)[0]


def torch_score_fn(hf, tokens, cands, cmask):
    """Plain loop: per prompt, one forward over its K [prompt + candidate] rows; log-softmax; gather; sum."""
    tk = torch.from_numpy(tokens.astype(np.int64))
    ck = torch.from_numpy(cands.astype(np.int64))
    cm = torch.from_numpy(cmask.astype(np.float32))

    def run(n_prompts=tk.shape[0]):
        out = []
        with torch.inference_mode():
            for b in range(n_prompts):
                seq = torch.cat([tk[b][None].expand(SCORE_K, -1), ck[b]], dim=1)  # [K, P+C]
                am = torch.cat([torch.ones(SCORE_K, PROMPT, dtype=torch.long), cm[b].long()], dim=1)
                logits = hf(seq, attention_mask=am).logits  # [K, P+C, V]
                lp = torch.log_softmax(logits[:, PROMPT - 1:-1].float(), dim=-1)  # predicts candidate tokens
                picked = lp.gather(-1, ck[b][..., None])[..., 0]
                out.append((picked * cm[b]).sum(-1))
        return torch.stack(out)
    return run


# ----------------------------------------------------------------------------------------------------------------
# model FLOPs and the matmul peaks


def decode_flops(cfg, batch: int, new: int = NEW) -> float:
    """Model FLOPs of greedy decoding `new` tokens after a PROMPT-token prompt, per call: the prompt's forward (LM
    head on its last position), then new - 1 one-position forwards, the i-th attending over PROMPT + i keys."""
    fwd = perf.forward_flops_per_token
    one = lambda keys: fwd(cfg, keys, head_positions=keys)  # noqa: E731  (one query: attention over keys, full head)
    return batch * (PROMPT * fwd(cfg, PROMPT, head_positions=1) + sum(one(PROMPT + i) for i in range(1, new)))


def score_flops(cfg, side: str) -> float:
    """Model FLOPs of one scoring call, each side its own work: pal_jax runs each prompt once (LM head on its last
    position), then every candidate's SCORE_C positions over the shared cache (about PROMPT + SCORE_C / 2 keys
    each); PyTorch runs SCORE_K full [prompt + candidate] rows per prompt, the head on every position."""
    fwd = perf.forward_flops_per_token
    rows, t = SCORE_PROMPTS * SCORE_K, PROMPT + SCORE_C
    if side == "pal_jax":
        return (SCORE_PROMPTS * PROMPT * fwd(cfg, PROMPT, head_positions=1)
                + rows * SCORE_C * fwd(cfg, PROMPT + (SCORE_C + 1) // 2))
    return rows * t * fwd(cfg, t)


def matmul_peaks(n: int = 1024, budget_s: float = 1.0) -> tuple[float, float]:
    """(JAX, PyTorch) float32 matmul FLOP/s on this machine, measured now: one [n, n] x [n, n] product, best of a
    few within ~budget_s each (JAX: perf.measure_cpu_peak on the first device; PyTorch: torch.mm, its threads)."""
    j = perf.measure_cpu_peak("float32", devices=jax.local_devices()[:1], n=n, budget_s=budget_s)
    a = torch.randn(n, n, dtype=torch.float32)
    b = torch.randn(n, n, dtype=torch.float32)
    torch.mm(a, b)
    best, spent, reps = float("inf"), 0.0, 0
    while reps < 2 or (spent < budget_s and reps < 20):
        t0 = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return j, 2.0 * n ** 3 / best


# ----------------------------------------------------------------------------------------------------------------
# timing


def _cpu_jiffies():
    """(busy jiffies of the whole machine, jiffies of this process) from /proc; None where /proc is missing."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            w = f.read().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], sum(v), int(w[11]) + int(w[12])  # busy, total, utime + stime of this process
    except (OSError, ValueError, IndexError):
        return None


def others_share(a, b) -> float:
    """Fraction of all cores' time used by *other* processes between two _cpu_jiffies() snapshots."""
    if a is None or b is None or b[1] <= a[1]:
        return float("nan")
    return max(0.0, ((b[0] - a[0]) - (b[2] - a[2])) / (b[1] - a[1]))


def wait_idle(max_wait: float, threshold: float = 0.10):
    """Block until other processes use < threshold of the cores over a 2 s window, or max_wait seconds pass."""
    t_end = time.perf_counter() + max_wait
    while max_wait > 0:
        a = _cpu_jiffies()
        time.sleep(2.0)
        share = others_share(a, _cpu_jiffies())
        if not share >= threshold or time.perf_counter() >= t_end:
            return share
    return float("nan")


def timed(fn, repeats: int, row_budget: float, is_jax: bool, warm_fn=None, idle_wait: float = 0.0):
    """-> (median seconds, calls timed, warm-up seconds, share of the cores used by other processes meanwhile).

    One untimed warm-up call (warm_fn, default fn; for JAX it includes the compile), then timed calls: the first
    one estimates the cost, and the row runs min(repeats, row_budget // cost) calls in all (at least 1)."""
    sync = jax.block_until_ready if is_jax else (lambda x: x)
    t0 = time.perf_counter()
    sync((warm_fn or fn)())
    warm = time.perf_counter() - t0
    wait_idle(idle_wait)
    ts = []
    snap = _cpu_jiffies()
    while True:
        t0 = time.perf_counter()
        sync(fn())
        ts.append(time.perf_counter() - t0)
        n = min(repeats, max(1, int(row_budget // ts[0])))
        if len(ts) >= n:
            return statistics.median(ts), n, warm, others_share(snap, _cpu_jiffies())


def interleaved(fns: dict, repeats: int, idle_wait: float = 0.0) -> dict:
    """{name: (fn, is_jax)} -> {name: (median seconds, calls timed, share of the cores used by other processes)}:
    `repeats` rounds, each timing one call of every fn in turn (no warm-up: the caller has made its first calls), so
    that the machine's drift over the rounds hits every side alike. The others' share is over all the rounds."""
    wait_idle(idle_wait)
    ts = {name: [] for name in fns}
    snap = _cpu_jiffies()
    for _ in range(repeats):
        for name, (fn, is_jax) in fns.items():
            t0 = time.perf_counter()
            out = fn()
            if is_jax:
                jax.block_until_ready(out)
            ts[name].append(time.perf_counter() - t0)
    others = others_share(snap, _cpu_jiffies())
    return {name: (statistics.median(t), len(t), others) for name, t in ts.items()}


def split_prefill(jax_fn1, jax_fn, torch_fn1, torch_fn, repeats: int, row_budget: float):
    """Generate with 1 new token vs NEW new tokens on both sides: per-step cost = (t_NEW - t_1) / (NEW - 1), and
    prefill (+ one step) = t_1. Returns {side: (t_1, seconds per further step)}."""
    out = {}
    for side, f1, fn, is_jax in (("pal_jax", jax_fn1, jax_fn, True), ("PyTorch", torch_fn1, torch_fn, False)):
        t1 = timed(f1, repeats, row_budget, is_jax)[0]
        tn = timed(fn, repeats, row_budget, is_jax)[0]
        out[side] = (t1, (tn - t1) / (NEW - 1))
    return out


# ----------------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def add_host_malloc_arg(ap):
    ap.add_argument("--host-malloc", default="auto", choices=host_malloc.VALUES,
                    help="glibc malloc for this process, both sides (config.host_malloc, pal_jax/core/host_malloc.py): "
                         "auto = keep freed memory on a CPU run, as pal_jax.main does; off = glibc's defaults")


def print_machine(malloc: str = "auto"):
    """Header lines shared by the benchmarks: CPU model, cores, versions, torch threads, host malloc, load average.

    Applies config.host_malloc's `malloc` first (before the JAX backend starts), for both sides of the process. Sets
    torch's thread count to the core count (as every benchmark here runs it)."""
    kept = host_malloc.setup(malloc)
    ncpu = os.cpu_count() or 1
    torch.set_num_threads(ncpu)
    print(f"machine: {cpu_name()}, {ncpu} cores | jax {jax.__version__} "
          f"({jax.devices()[0].platform}, {jax.device_count()} device(s)), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), fp32 | host malloc {malloc!r}: "
          f"{'freed memory kept (one arena, no mmap)' if kept else 'glibc defaults'}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes on these cores skew both columns; "
          f"PyTorch's spinning OpenMP threads suffer most)")


def print_table(rows, repeats: int, row_budget: float, fmt: str = ".1f", peaks=None):
    """Markdown table of rows (shape, workload, unit, pal_jax rate, its calls, PyTorch rate, its calls, others CPU,
    pal_jax FLOP/s, PyTorch FLOP/s); a side that ran fewer than `repeats` timed calls is marked (n=K). `fmt` formats
    the rates. peaks = (JAX, PyTorch) measured matmul FLOP/s: each side's GFLOP/s is shown with its share of them."""
    head = (f"| {'shape':<5} | {'workload':<12} | {'unit':<9} | {'pal_jax':>10} | {'PyTorch':>10} | "
            f"{'pal_jax/PyTorch':>15} | {'pal_jax GFLOP/s':>16} | {'PyTorch GFLOP/s':>16} | {'others CPU':>10} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    jp, tp = peaks if peaks else (None, None)
    gf = lambda f, peak: f"{f / 1e9:.1f} ({f / peak:.0%})" if peak else f"{f / 1e9:.1f}"  # noqa: E731
    for shape, wl, unit, j, jn, t, tn, other, jf, tf in rows:
        note = lambda n: "" if n == repeats else f" (n={n})"  # noqa: E731
        print(f"| {shape:<5} | {wl:<12} | {unit:<9} | {format(j, fmt) + note(jn):>10} | "
              f"{format(t, fmt) + note(tn):>10} | {j / t:>14.2f}x | {gf(jf, jp):>16} | {gf(tf, tp):>16} | "
              f"{other:>10.0%} |")
    print("others CPU: the largest share of the cores used by other processes while either side of the row was timed")
    if peaks:
        print(f"GFLOP/s: model FLOPs per second (pal_jax.core.perf's count), in brackets the share of that side's "
              f"measured float32 matmul peak ({jp / 1e9:.1f} GFLOP/s JAX, {tp / 1e9:.1f} GFLOP/s PyTorch)")
    if any(jn != repeats or tn != repeats for _, _, _, _, jn, _, tn, *_ in rows):
        print(f"(n=K: that side ran K timed calls instead of {repeats}, to stay within --row-budget "
              f"{row_budget:.0f}s)")


def print_peaks() -> tuple[float, float]:
    """Measure and print both sides' float32 matmul peaks (matmul_peaks); -> (JAX, PyTorch) FLOP/s."""
    jp, tp = matmul_peaks()
    print(f"float32 matmul peak, [1024,1024] x [1024,1024], measured now: JAX {jp / 1e9:.1f} GFLOP/s, "
          f"PyTorch {tp / 1e9:.1f} GFLOP/s", flush=True)
    return jp, tp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,135m", help="comma list of: " + ",".join(SHAPES))
    ap.add_argument("--workloads", default="decode,score", help="comma list of: decode, score")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per row (median is reported)")
    ap.add_argument("--row-budget", type=float, default=60.0,
                    help="seconds of timed calls per side of a row: a side whose first timed call takes longer "
                         "than row_budget/repeats runs fewer calls (at least 1)")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each timed side, wait up to this many seconds for other processes to use < 10%% "
                         "of the cores (shared machine); 0 = do not wait")
    ap.add_argument("--breakdown", action="store_true",
                    help="also split decode time into prefill and per-step cost on both sides "
                         "(generate 1 new token vs 32; extra compiles)")
    add_host_malloc_arg(ap)
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}; expected some of {sorted(SHAPES)}")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in ("decode", "score"):
            ap.error(f"--workloads: unknown workload {w!r}; expected some of ['decode', 'score']")

    print_machine(args.host_malloc)
    print(f"decode: prompt {PROMPT}, {NEW} new tokens, greedy | score: {SCORE_PROMPTS} prompts x {SCORE_K} "
          f"candidates, prompt {PROMPT}, candidate {SCORE_C} | median of {args.repeats} after a warm-up", flush=True)
    peaks = print_peaks()

    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            t0 = time.perf_counter()
            hf, cfg, graphdef, params = build_models(shape, tmp)
            rng = np.random.default_rng(0)
            diff = parity(hf, graphdef, params, cfg.vocab_size, rng)
            print(f"\n[{shape}] built + converted in {time.perf_counter() - t0:.1f}s; "
                  f"max |logit diff| pal_jax vs HF = {diff:.2e}", flush=True)
            if not diff < 1e-3:
                raise SystemExit(f"[{shape}] logits disagree (max diff {diff}); not timing different models")

            for b in (DECODE_BATCHES if "decode" in workloads else ()):
                tokens = rng.integers(3, cfg.vocab_size, size=(b, PROMPT)).astype(np.int32)
                jfn, tfn = jax_decode_fn(graphdef, params, tokens), torch_decode_fn(hf, tokens)
                jt, jn, jw, jo = timed(jfn, args.repeats, args.row_budget, True, idle_wait=args.wait_idle)
                tt, tn, tw, to = timed(tfn, args.repeats, args.row_budget, False,
                                       warm_fn=torch_decode_fn(hf, tokens[:, :8], new=2), idle_wait=args.wait_idle)
                jout, tout = np.asarray(jfn()), tfn().numpy()
                assert jout.shape == tout.shape == (b, NEW), (jout.shape, tout.shape)
                agree = float(np.mean(jout == tout))
                print(f"[{shape}] decode b={b}: pal_jax {jt:.3f}s (compile+run {jw:.1f}s), HF {tt:.3f}s; "
                      f"greedy tokens identical: {agree:.0%}", flush=True)
                f = decode_flops(cfg, b)
                rows.append((shape, f"decode b={b}", "new tok/s", b * NEW / jt, jn, b * NEW / tt, tn, max(jo, to),
                             f / jt, f / tt))
                if args.breakdown:
                    parts = split_prefill(jax_decode_fn(graphdef, params, tokens, 1), jfn,
                                          torch_decode_fn(hf, tokens, 1), tfn, args.repeats, args.row_budget)
                    for side, (t1, step) in parts.items():
                        print(f"[{shape}]   breakdown b={b} {side:<7}: prefill+1 step {t1 * 1e3:8.0f} ms | each "
                              f"further step {step * 1e3:6.1f} ms | {NEW - 1} steps {step * (NEW - 1) * 1e3:6.0f} ms",
                              flush=True)

            if "score" not in workloads:
                del hf
                continue
            tokens, cands, cmask = score_inputs(cfg.vocab_size, rng)
            jfn = jax_score_fn(graphdef, params, tokens, cands, cmask)
            tfn = torch_score_fn(hf, tokens, cands, cmask)
            jt, jn, jw, jo = timed(jfn, args.repeats, args.row_budget, True, idle_wait=args.wait_idle)
            tt, tn, tw, to = timed(tfn, args.repeats, args.row_budget, False, warm_fn=lambda: tfn(1),
                                   idle_wait=args.wait_idle)
            sdiff = float(np.max(np.abs(np.asarray(jfn()) - tfn().numpy())))
            print(f"[{shape}] score: pal_jax {jt:.3f}s (compile+run {jw:.1f}s), torch {tt:.3f}s; "
                  f"max |sum logprob diff| = {sdiff:.2e}", flush=True)
            rows.append((shape, f"score {SCORE_PROMPTS}x{SCORE_K}", "cand/s", SCORE_PROMPTS * SCORE_K / jt, jn,
                         SCORE_PROMPTS * SCORE_K / tt, tn, max(jo, to), score_flops(cfg, "pal_jax") / jt,
                         score_flops(cfg, "PyTorch") / tt))
            del hf

    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f}s; load average at end: {os.getloadavg()[0]:.2f}\n")
    print_table(rows, args.repeats, args.row_budget, peaks=peaks)


if __name__ == "__main__":
    main()
