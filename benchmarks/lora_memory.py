"""Stage 2 memory with and without LoRA: params + optimizer state + the frozen reference, in bytes.

For a preset's model shape (default smollm2_135m), without loading any weights:

  abstract   lora.stage2_bytes: the trees' shapes from jax.eval_shape (ModelSpec's abstract params, the AdamW
             chain of optim.make_optimizer applied with jax.eval_shape to them).
  allocated  (with --allocate) the trees Stage 2 holds, built the way stage2.train_stage2 builds them, from zeros
             instead of loaded weights: the reference params (without LoRA) or the base + Stage 1 adapters joined
             with lora.combine (with LoRA), the policy as a jitted copy of its start, the optimizer state from
             jax.jit(tx.init); then the bytes of jax.live_arrays(), each device buffer counted once. So the figure
             shows whether the reference really shares the base's buffers.

Activations, the batch and XLA's temporaries are not counted (they do not depend on LoRA except for the weight
gradients: a full fine-tune also materialises one param-sized gradient tree inside the step).

    .venv/bin/python benchmarks/lora_memory.py                       # smollm2_135m, rank 8, abstract only
    .venv/bin/python benchmarks/lora_memory.py --allocate            # + allocated on this machine's CPU
    .venv/bin/python benchmarks/lora_memory.py --preset llama3_8b --rank 16
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # the repository root: pal_jax, configs

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import common  # noqa: E402
from pal_jax.model import lora
from pal_jax.core import optim
from pal_jax.training import loop as train  # noqa: E402
from pal_jax.core import mesh as mesh_lib  # noqa: E402
from pal_jax.model.transformer import LoraConfig, ModelConfig  # noqa: E402
from pal_jax.model.spec import ModelSpec

MIB = 2 ** 20


def _live_bytes() -> int:
    seen = {}
    for a in jax.live_arrays():
        for shard in a.addressable_shards:
            seen[shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
    return sum(seen.values())


def allocate(ms, tx) -> int:
    """Bytes of the Stage 2 trees (zeros), as train_stage2 holds them during training."""
    zeros = lambda abstract: jax.tree.map(  # noqa: E731
        lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), abstract)
    before = _live_bytes()
    if ms.lora is None:
        reference = zeros(ms.abstract)
        start, frozen = reference, None
    else:
        frozen, start = zeros(ms.frozen_abstract), zeros(ms.abstract)
        reference = lora.combine(frozen, start)  # the same base arrays + the Stage 1 adapters
    policy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=ms.shardings)(start)
    opt_state = jax.jit(tx.init, out_shardings=train.optimizer_shardings(tx, ms))(policy)
    jax.block_until_ready((policy, opt_state, reference, frozen))
    return _live_bytes() - before


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2_135m", choices=sorted(common.MODEL_PRESETS))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="", help="comma-separated; default: the preset's config.lora.targets")
    ap.add_argument("--allocate", action="store_true", help="also allocate the trees (zeros) and count them")
    args = ap.parse_args()

    c = common.base_config("stage2", args.preset)
    targets = lora.parse_targets(args.targets or c.lora.targets)
    cfg = ModelConfig.from_dict(common.MODEL_PRESETS[args.preset])
    mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
    rules = mesh_lib.axis_rules(c)
    tx = optim.make_optimizer(c.train)
    rows = []
    for name, lo in (("full fine-tune", None),
                     (f"LoRA r={args.rank} ({','.join(targets)})",
                      LoraConfig(rank=args.rank, alpha=args.alpha, targets=targets))):
        ms = ModelSpec(cfg, mesh, rules, lora=lo)
        b = lora.stage2_bytes(ms, tx)
        held = allocate(ms, tx) if args.allocate else None
        rows.append((name, ms.n_params(), b, held))

    print(f"Stage 2 bytes held for params + optimizer state + reference, {args.preset} "
          f"({rows[0][1]:,} params, {c.model.param_dtype} params and AdamW moments), whole model (divide by the "
          f"fsdp x tensor shards for one device)\n")
    cols = ["run", "trainable params", "policy (trainable)", "optimizer state", "frozen base", "reference",
            "total", "allocated"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for name, n, b, held in rows:
        cells = [name, f"{n:,}"] + [f"{b[k] / MIB:,.1f} MiB" for k in ("trainable_params", "optimizer_state",
                                                                        "frozen_base", "reference", "total")]
        cells.append(f"{held / MIB:,.1f} MiB" if held is not None else "-")
        print("| " + " | ".join(cells) + " |")
    print(f"\nLoRA / full: {rows[1][2]['total'] / rows[0][2]['total']:.3f} of the bytes"
          + (f" (allocated: {rows[1][3] / rows[0][3]:.3f})" if args.allocate else ""))


if __name__ == "__main__":
    main()
