"""Side-by-side Stage 2 training-step benchmark: one DPO step of pal_jax (JAX, XLA CPU) vs transformers/PyTorch.

One row per shape: a DPO training step on N pairs of L tokens (chosen and rejected rows, 2N x L), reference
forward included, on the same random weights and the same batch -> pairs/s.

  pal_jax  the project's own step: train.make_train_step(ModelSpec, Task(loss_fn=stage2.make_loss_fn(...),
           reference=reference params), optim.make_optimizer(train config), ...), jitted, policy params and optimizer
           state donated, the reference params a separate non-donated argument; the batch is built by
           stage2.PairSource.make_batch (chosen rows first, then rejected rows, [2N, L]) from random token ids.
  PyTorch  policy = HF LlamaForCausalLM (train mode), reference = a frozen deep copy (eval, requires_grad False,
           forward under torch.no_grad); one concatenated forward of chosen + rejected rows per model; the LM
           head on the batch's target window only (the positions pal_jax's step sends through its head); sequence
           log-probs of the response tokens only (logit of the target - logsumexp, times the response mask,
           summed per row); loss = mean -logsigmoid(beta * ((pc - rc) - (pr - rr))); backward; global-norm
           clipping (torch.nn.utils.clip_grad_norm_); torch.optim.AdamW, weight decay on matrices only.

Both sides use the Stage 2 settings of configs/stage2.py (beta, lr, b1, b2, weight decay, clip norm) with a constant
learning rate (no warm-up: the step's cost is the same), align_weight = 0 and sft_weight = 0, i.e. pure DPO: the
embedding-alignment term and the chosen-reply NLL of pal_jax's Stage 2 loss are off (neither is implemented on the
PyTorch side). The table gives both sides' GFLOP/s (perf.batch_flops: policy forward + backward and the reference
forward, the LM head on the target window) beside each side's measured float32 matmul peak (bench_decode).

A random-weight LlamaForCausalLM is built with transformers, saved as safetensors and loaded into pal_jax with
convert.load_hf_dir (bench_decode.build_models); logits are compared first. Before timing, each side runs one step
from the same start (for pal_jax, compile + run): policy == reference there, so both DPO losses must be log 2; they
and the pre-clipping gradient norms are printed and compared. The loss of the second step (after one AdamW update,
the first timed call) is printed too, as a check that the two optimizers agree.

Timing (bench_decode.timed): after that first step, the median of --repeats timed steps, each call feeding the
updated params / optimizer state of the previous one (jax.block_until_ready on the JAX side). A side whose first
timed step takes longer than --row-budget / --repeats seconds runs fewer steps (at least 1): "(n=K)".

    .venv/bin/python benchmarks/bench_stage2.py --shapes tiny                       # 16 pairs x 128 tokens
    .venv/bin/python benchmarks/bench_stage2.py --shapes 135m --repeats 2 --row-budget 150   # 4 pairs x 128
    .venv/bin/python benchmarks/bench_stage2.py --shapes 135m --pairs 8 --seq-len 256
    .venv/bin/python benchmarks/bench_stage2.py --shapes tiny --share-prompt [--identical 0.88]   # + the shared rows
    .venv/bin/python benchmarks/bench_stage2.py --shapes tiny --share-prompt --attention xla_chunked
    .venv/bin/python benchmarks/bench_stage2.py --shapes tiny --share-prompt --flat-window --attention xla_chunked

--interleave times the sides in turn (one step of pal_jax, one of PyTorch, one of the shared rows, --repeats
rounds) instead of one side's steps after the other's, so that the VM's drift over the run hits all sides alike.

--share-prompt adds a row: pal_jax with stage2.share_prompt on the same pairs (one row per pair, [prompt | chosen |
rejected], the prompt run once; stage2.PairSource), against the same PyTorch step. Its first-step loss and gradient
norm, and its second-step loss, must equal the unshared step's (the script stops otherwise). --flat-window gives
that row stage2.flat_window's loss window (one list of reply positions per data shard, one shard per device).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: pal_jax, configs

from bench_decode import (SHAPES, add_host_malloc_arg, build_models, interleaved, parity,  # noqa: E402
                          print_machine, print_peaks, print_table, timed)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from pal_jax.core import mesh as mesh_lib  # noqa: E402
from pal_jax.core import perf
from pal_jax.core import optim
from pal_jax.training import stage2
from pal_jax.training import loop as train  # noqa: E402
from pal_jax.model.spec import ModelSpec

DEFAULT_PAIRS = {"tiny": 16, "135m": 4}
HEAD = 16  # tokens of the "persona block" at the start of each prompt (only the alignment term reads it; off here)


# ----------------------------------------------------------------------------------------------------------------
# config and batch


def stage2_settings(n_pairs: int, lr: float | None):
    """configs/stage2.py (its train settings: stage2.train_settings), pure DPO (no embedding-alignment term, no
    chosen-reply NLL: stage2.sft_weight's default is 1 since 2026-12-06), constant lr."""
    from configs import common  # (configs/stage2.py's get_config is base_config("stage2", preset))
    c = common.base_config("stage2", "tiny")
    c.stage2.batch_size = n_pairs
    c.stage2.warmup_steps = 0
    c.stage2.align_weight = 0.0
    c.stage2.sft_weight = 0.0
    if lr is not None:
        c.stage2.lr = lr
    c.train.schedule = "constant"
    return c


def pair_batch(n_pairs: int, seq_len: int, vocab: int, rng, identical: float = 0.0, flat_groups: int = 0):
    """(a [2N, L] pair batch from stage2.PairSource.make_batch, the same pairs as one [N, L'] share_prompt batch):
    random prompts of L/2..3L/4 tokens, chosen and rejected responses filling 1/2..all of the rest (each row
    right-padded to L; pair 0's chosen fills it). identical: the share of pairs (the last ones) whose rejected reply
    is their chosen one (stage2.identical_pairs=keep: 88% of the tiny main job's pairs). flat_groups > 0: the
    shared batch with stage2.flat_window's loss window, one group per data shard (PairSource flat_groups)."""
    prompts, chosen, rejected = [], [], []
    for i in range(n_pairs):
        plen = int(rng.integers(seq_len // 2, 3 * seq_len // 4 + 1))
        room = seq_len + 1 - plen  # prompt + response = L + 1 tokens -> L input positions
        clen = room if i == 0 else int(rng.integers(room // 2, room + 1))
        rlen = int(rng.integers(room // 2, room + 1))
        prompts.append(rng.integers(3, vocab, plen).tolist())
        chosen.append(rng.integers(3, vocab, clen).tolist())
        rejected.append(rng.integers(3, vocab, rlen).tolist())
    for i in range(n_pairs - int(round(identical * n_pairs)), n_pairs):
        rejected[i] = list(chosen[i])
    enc = stage2.PairEncoded(prompt=prompts, chosen=chosen, rejected=rejected, head_len=[HEAD] * n_pairs,
                             is_select=[False] * n_pairs, n_truncated=0, n_dropped=0)
    out = []
    for share in (False, True):
        src = stage2.PairSource(enc, n_pairs, (seq_len,), seed=0, share_prompt=share,
                                flat_groups=flat_groups if share else 0)
        src.set_pad(0)
        out.append(src.make_batch(np.arange(n_pairs)))
    assert out[0]["inputs"].shape == (2 * n_pairs, seq_len), out[0]["inputs"].shape
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------------
# the two steps


class JaxDPO:
    """pal_jax's Stage 2 train step, driven as train.run drives it (policy starts as a copy of the reference)."""

    def __init__(self, c, cfg, params, host_batch):
        mesh = mesh_lib.make_mesh(c.mesh)
        ms = ModelSpec(cfg, mesh, mesh_lib.axis_rules(c))
        self.ref = jax.device_put(nnx.to_pure_dict(params), ms.shardings)
        policy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=ms.shardings)(self.ref)
        tx = optim.make_optimizer(stage2.train_settings(c))  # what the Stage 2 loop trains with
        opt_shardings = jax.tree.map(  # as train.run: as XLA propagates them from the params; scalars replicated
            lambda s: s if isinstance(s, jax.sharding.NamedSharding) else mesh_lib.replicated(mesh),
            jax.jit(tx.init).lower(ms.abstract).compile().output_shardings)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(policy)
        self.task = train.Task(name="stage2", loss_fn=stage2.make_loss_fn(ms.graphdef, c.stage2),
                               train_batch=lambda step, rows_of=None: host_batch, eval_batches=lambda rows_of=None: [],
                               reference=self.ref)
        self.step_fn = train.make_train_step(ms, self.task, tx, c.train.grad_accum, opt_shardings)
        self.batch = mesh_lib.global_batch(host_batch, mesh)
        self.state = (policy, opt_state)
        self.metrics = []

    def __call__(self):
        params, opt_state, m = self.step_fn(*self.state, self.batch, self.task.reference)
        self.state = (params, opt_state)
        self.metrics.append(m)
        return params, opt_state, m

    def loss(self, i: int) -> tuple[float, float]:
        m = jax.device_get(self.metrics[i])
        return float(m["loss"]), float(m["grad_norm"])

    def reference_intact(self) -> bool:
        return not any(x.is_deleted() for x in jax.tree.leaves(self.ref))


class TorchDPO:
    """The same DPO step written plainly in PyTorch on the HF model."""

    def __init__(self, c, hf, host_batch):
        t, s2 = stage2.train_settings(c), c.stage2
        self.beta, self.clip = float(s2.beta), float(t.clip_norm)
        self.policy = hf.train()
        self.ref = copy.deepcopy(hf).eval().requires_grad_(False)
        params = [p for p in self.policy.parameters() if p.requires_grad]  # tied embedding counted once
        self.params = params
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": float(t.weight_decay)},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=float(t.lr), betas=(float(t.b1), float(t.b2)), eps=1e-8)
        self.inputs = torch.from_numpy(host_batch["inputs"].astype(np.int64))
        self.positions = torch.from_numpy(host_batch["positions"].astype(np.int64))
        # the same target window as pal_jax's step (data.pipeline.add_window): the LM head and the softmax run
        # on the W positions of each row's response only, not on all L
        self.win = host_batch.get("win_idx")
        key = "win_" if self.win is not None else ""
        self.targets = torch.from_numpy(host_batch[f"{key}targets"].astype(np.int64))
        self.weights = torch.from_numpy(host_batch[f"{key}weights"])
        if self.win is not None:
            self.win = torch.from_numpy(self.win.astype(np.int64))
        self.n = self.inputs.shape[0] // 2
        self.metrics = []

    def seq_logps(self, model):
        hidden = model.model(self.inputs, position_ids=self.positions).last_hidden_state
        if self.win is not None:
            hidden = hidden.gather(1, self.win[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = model.lm_head(hidden).float()
        picked = logits.gather(-1, self.targets[..., None])[..., 0]
        return ((picked - torch.logsumexp(logits, dim=-1)) * self.weights).sum(-1)

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            ref = self.seq_logps(self.ref)
        logps = self.seq_logps(self.policy)
        n = self.n
        logits = self.beta * ((logps[:n] - ref[:n]) - (logps[n:] - ref[n:]))
        loss = -torch.nn.functional.logsigmoid(logits).mean()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.metrics.append((loss.detach(), gnorm.detach()))
        return loss

    def loss(self, i: int) -> tuple[float, float]:
        return float(self.metrics[i][0]), float(self.metrics[i][1])


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,135m", help="comma list of: " + ",".join(SHAPES))
    ap.add_argument("--pairs", type=int, default=0,
                    help="preference pairs per step (the forward sees 2x rows); 0 = per shape: "
                         + ", ".join(f"{k} {v}" for k, v in DEFAULT_PAIRS.items()))
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per row (prompt + response, padded)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: configs stage2.lr)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per side (median is reported)")
    ap.add_argument("--row-budget", type=float, default=60.0,
                    help="seconds of timed steps per side of a row: a side whose first timed step takes longer "
                         "than row_budget/repeats runs fewer steps (at least 1)")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each timed side, wait up to this many seconds for other processes to use < 10%% "
                         "of the cores (shared machine); 0 = do not wait")
    ap.add_argument("--share-prompt", action="store_true",
                    help="also time pal_jax with stage2.share_prompt (one row per pair, the prompt run once) on the "
                         "same pairs: a second row, against the same PyTorch step")
    ap.add_argument("--flat-window", action="store_true",
                    help="the --share-prompt row with stage2.flat_window: each data shard's reply positions in one "
                         "list through the LM head, not a window of the longest reply's width on every row")
    ap.add_argument("--identical", type=float, default=0.0,
                    help="share of pairs whose rejected reply is their chosen one (identical_pairs=keep; the tiny "
                         "main job: 0.88); both sides compute them in full, except pal_jax with --share-prompt")
    ap.add_argument("--attention", default="xla", choices=("xla", "xla_chunked", "dot_product_attention"),
                    help="pal_jax's model.attention (xla_chunked: the causal attention in query chunks, the masked "
                         "blocks skipped; benchmarks/ab_attention.py compares it with xla interleaved)")
    ap.add_argument("--interleave", action="store_true",
                    help="time the sides in turn, one step each per round (--repeats rounds; --row-budget unused), "
                         "instead of one side's steps after the other's: the VM's drift hits both sides alike")
    ap.add_argument("--cpu-devices", type=int, default=1,
                    help="pal_jax on CPU: split the host into this many JAX devices, the batch data-parallel over "
                         "them (config mesh.cpu_devices; the tiny preset runs on 2); PyTorch is unchanged")
    add_host_malloc_arg(ap)
    args = ap.parse_args(argv)
    if args.cpu_devices < 1:
        ap.error("--cpu-devices must be >= 1")
    if args.flat_window and not args.share_prompt:
        ap.error("--flat-window is a setting of the --share-prompt row: give both")
    if args.cpu_devices > 1:
        mesh_lib.cpu_devices(args.cpu_devices)  # before the backend starts (print_machine)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}; expected some of {sorted(SHAPES)}")
    if args.pairs < 0 or args.seq_len < 16:
        ap.error("--pairs must be >= 0 and --seq-len >= 16")

    print_machine(args.host_malloc)
    c0 = stage2_settings(1, args.lr)
    t, s2 = stage2.train_settings(c0), c0.stage2
    sizes = ", ".join(f"{s} {args.pairs or DEFAULT_PAIRS[s]} pairs" for s in shapes)
    print(f"Stage 2 DPO step: {sizes} x {args.seq_len} tokens, pal_jax attention {args.attention} (forward rows = 2 "
          f"x pairs), reference forward included | pure DPO (align_weight 0, sft_weight 0), beta {s2.beta}, AdamW lr {t.lr} constant, b1 {t.b1}, b2 {t.b2}, "
          f"weight decay {t.weight_decay} (matrices), clip {t.clip_norm} | median of {args.repeats} after a first "
          f"step", flush=True)
    peaks = print_peaks()

    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            n_pairs = args.pairs or DEFAULT_PAIRS[shape]
            c = stage2_settings(n_pairs, args.lr)
            t0 = time.perf_counter()
            hf, cfg, graphdef, params = build_models(shape, tmp)
            cfg = dataclasses.replace(cfg, attention=args.attention)  # the parity check below runs xla
            rng = np.random.default_rng(0)
            diff = parity(hf, graphdef, params, cfg.vocab_size, rng)
            print(f"\n[{shape}] built + converted in {time.perf_counter() - t0:.1f}s; "
                  f"max |logit diff| pal_jax vs HF = {diff:.2e}; HF attention: {hf.config._attn_implementation}",
                  flush=True)
            if not diff < 1e-3:
                raise SystemExit(f"[{shape}] logits disagree (max diff {diff}); not timing different models")
            host_batch, shared_batch = pair_batch(n_pairs, args.seq_len, cfg.vocab_size, rng, args.identical,
                                                  jax.device_count() if args.flat_window else 0)
            resp = host_batch["weights"].sum(-1)
            print(f"[{shape}] batch [{2 * n_pairs}, {args.seq_len}]: response tokens per row {int(resp.min())}.."
                  f"{int(resp.max())} (mean {resp.mean():.0f}), real tokens "
                  f"{int((host_batch['inputs'] != 0).sum())}/{host_batch['inputs'].size}", flush=True)

            if args.share_prompt:
                print(f"[{shape}] share_prompt batch {list(shared_batch['inputs'].shape)}: tokens through the model "
                      f"{shared_batch['inputs'].size} vs {host_batch['inputs'].size}; loss window "
                      f"{shared_batch['win_idx'].shape[1]} a row"
                      f"{' (flat_window)' if args.flat_window else ''}", flush=True)
                js = JaxDPO(c, cfg, params, shared_batch)
                t0 = time.perf_counter()
                jax.block_until_ready(js())
                s_first = time.perf_counter() - t0
            jx = JaxDPO(c, cfg, params, host_batch)
            del params
            t0 = time.perf_counter()
            jax.block_until_ready(jx())
            j_first = time.perf_counter() - t0
            th = TorchDPO(c, hf, host_batch)
            t0 = time.perf_counter()
            th()
            t_first = time.perf_counter() - t0
            (jl, jg), (tl, tg) = jx.loss(0), th.loss(0)
            print(f"[{shape}] step 1 (policy == reference): DPO loss pal_jax {jl:.6f}, PyTorch {tl:.6f} "
                  f"(log 2 = {math.log(2):.6f}); grad norm before clipping pal_jax {jg:.6g}, PyTorch {tg:.6g} | "
                  f"first step pal_jax {j_first:.1f}s (compile + run), PyTorch {t_first:.2f}s", flush=True)
            if not (abs(jl - math.log(2)) < 1e-4 and abs(tl - math.log(2)) < 1e-4):
                raise SystemExit(f"[{shape}] first-step DPO loss is not log 2 on both sides ({jl}, {tl})")
            if not abs(jg - tg) <= 1e-3 * max(jg, tg, 1e-12):
                raise SystemExit(f"[{shape}] first-step gradient norms disagree ({jg} vs {tg})")
            if args.share_prompt:
                sl, sg = js.loss(0)
                print(f"[{shape}] share_prompt step 1: DPO loss {sl:.6f}, grad norm {sg:.6g} | first step "
                      f"{s_first:.1f}s (compile + run)", flush=True)
                if not (abs(sl - jl) < 1e-5 and abs(sg - jg) <= 1e-4 * max(jg, 1e-12)):
                    raise SystemExit(f"[{shape}] share_prompt's first step differs from the unshared one's "
                                     f"(loss {sl} vs {jl}, grad norm {sg} vs {jg})")

            nop = lambda: None  # noqa: E731  (the first step above was the warm-up)
            if args.interleave:  # one step of each side in turn, --repeats rounds
                both = interleaved({"jx": (jx, True), "th": (th, False), **({"js": (js, True)} if args.share_prompt
                                                                           else {})}, args.repeats, args.wait_idle)
                (jt, jn, jo), (tt, tn, to) = both["jx"], both["th"]
            else:
                jt, jn, _, jo = timed(jx, args.repeats, args.row_budget, True, warm_fn=nop, idle_wait=args.wait_idle)
                tt, tn, _, to = timed(th, args.repeats, args.row_budget, False, warm_fn=nop, idle_wait=args.wait_idle)
            (jl2, _), (tl2, _) = jx.loss(1), th.loss(1)
            assert jx.reference_intact()
            print(f"[{shape}] DPO step: pal_jax {jt:.3f}s, PyTorch {tt:.3f}s; step 2 loss (after one AdamW update) "
                  f"pal_jax {jl2:.6f}, PyTorch {tl2:.6f}", flush=True)
            f = perf.batch_flops(cfg, host_batch, perf.passes("stage2"))  # policy fwd + bwd, reference fwd
            rows.append((shape, f"DPO {n_pairs}x{args.seq_len}", "pairs/s", n_pairs / jt, jn, n_pairs / tt, tn,
                         max(jo, to), f / jt, f / tt))
            if args.share_prompt:
                if args.interleave:
                    st, sn, so = both["js"]
                else:
                    st, sn, _, so = timed(js, args.repeats, args.row_budget, True, warm_fn=nop,
                                          idle_wait=args.wait_idle)
                sl2 = js.loss(1)[0]
                print(f"[{shape}] share_prompt DPO step: {st:.3f}s ({jt / st:.2f}x the unshared step); step 2 loss "
                      f"{sl2:.6f}", flush=True)
                if not abs(sl2 - jl2) < 1e-4:
                    raise SystemExit(f"[{shape}] share_prompt's step 2 loss differs ({sl2} vs {jl2})")
                # GFLOP/s: the FLOPs the shared step computes (fewer than the unshared rows': the prompt once)
                fs = perf.batch_flops(cfg, shared_batch, perf.passes("stage2"))
                rows.append((shape, "DPO flat" if args.flat_window else "DPO shared", "pairs/s", n_pairs / st, sn,
                             n_pairs / tt, tn, max(so, to), fs / st, f / tt))
                del js
            del hf, jx, th

    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f}s; load average at end: {os.getloadavg()[0]:.2f}\n")
    print_table(rows, args.repeats, args.row_budget, fmt=".3g", peaks=peaks)
    print("ratio: pairs/s pal_jax / pairs/s PyTorch (> 1: pal_jax faster)")


if __name__ == "__main__":
    main()
